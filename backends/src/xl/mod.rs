//! Xen `xl` backend: coldclone runs in dom0 and drives the `xl` toolstack,
//! reads xenstore, and snapshots LVM disks.
//!
//! Checkpoint: (balloon down) → `xl save -p` (memory image; the domain ends
//! resumed but paused) → `lvcreate -s` of every writable disk while paused →
//! `xl unpause` on every path → (balloon back). The clone: `xl restore -p -e`
//! with a rewritten config (see [`cfg`]), unpaused only after the pipeline
//! verified its bridge; stopped with `xl shutdown` (PV, PVH, HVM with PV
//! drivers) or the ACPI power button (`xl trigger power`, HVM); the wait is
//! on xenstore's `@releaseDomain` watch.
//!
//! Known trap, reported as a warning: `xl save` ends the original's `xl
//! create` monitor process, so its on_poweroff/on_reboot/on_crash actions are
//! no longer applied (xl has no way to re-attach one); see docs/xl.md.

pub mod cfg;
pub mod cli;
mod libxl;
pub mod live;
pub mod lvm;
pub mod restore_cfg;
pub mod thin;
pub mod xs;

use crate::shared::SharedResource;
use crate::{
    io_err, BackendError, Checkpoint, CloneDisk, CloneNetwork, CloneOutcome, DiskInfo, FrozenDisk,
    Hypervisor, Journal, Opaque, OpaqueMut, PauseTimes, PausedClone, Result, StopMethod, VmInfo,
    VmLocator,
};
use cli::{state, xl, xl_bounded};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Per-VM settings of the xl backend (from the `[[vm]]` section).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XlOptions {
    /// Size of classic (non-thin) LVM snapshots, as lvcreate takes it:
    /// "512m", "2g", or "20%ORIGIN" (the default). Thin snapshots need none.
    pub snapshot_size: Option<String>,
    /// "auto" (the default: live through libxl, else `xl save -p`), "live" (libxl
    /// only) or "save-pause" (`xl save -p` only).
    #[serde(default)]
    pub checkpoint: Option<String>,
}

/// How the memory image is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XlCheckpointMethod {
    /// Live through libxl when it loads and accepts, else `xl save -p` (reason logged).
    Auto,
    /// Live through libxl, or fail.
    Live,
    /// `xl save -p`: the domain stays suspended for its whole memory save.
    SavePause,
}

impl XlOptions {
    pub fn method(&self) -> std::result::Result<XlCheckpointMethod, String> {
        match self.checkpoint.as_deref() {
            None | Some("auto") => Ok(XlCheckpointMethod::Auto),
            Some("live") => Ok(XlCheckpointMethod::Live),
            Some("save-pause") => Ok(XlCheckpointMethod::SavePause),
            Some(other) => Err(format!(
                "xl_checkpoint {other:?}: use \"auto\", \"live\" or \"save-pause\""
            )),
        }
    }
}

/// What can go wrong that only the xl backend knows.
#[derive(Debug, thiserror::Error)]
pub enum XlError {
    #[error("xenstore: {0}")]
    Xenstore(String),
    #[error("the snapshot {lv} overflowed: its copy-on-write space filled up while the backup ran, so its contents are invalid and it is not archived; give classic snapshots more room (xl_snapshot_size) or use thin volumes")]
    SnapshotOverflow { lv: String },
}

/// What the xl backend creates, with what it takes to undo it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum XlResource {
    /// The original domain was paused by us (undo: unpause it if it is
    /// still paused and is the same domain, by UUID).
    XlOriginalPaused {
        domain: String,
        uuid: String,
        /// The memory image a save was writing (recover waits for that xl to end).
        #[serde(default)]
        image: Option<PathBuf>,
    },
    /// The original suspended by our libxl_domain_suspend (live checkpoint). Undo:
    /// once no libxl save helper of ours works on it, resume it with suspend_cancel
    /// if it is still suspended and is the same domain, by UUID.
    XlOriginalSuspended {
        domain: String,
        uuid: String,
        domid: u32,
    },
    /// The original's balloon target we lowered (undo: set it back).
    XlBalloon {
        domain: String,
        uuid: String,
        target_kib: u64,
    },
    /// An LVM snapshot of one of the original's disks (undo: lvremove it).
    LvmSnapshot {
        vg: String,
        lv: String,
        origin: String,
    },
    /// A clone domain (undo: xl destroy it, if it is still ours by name).
    XlDomain { name: String },
    /// A metadata snapshot reserved in a thin pool for `thin_delta` (undo: release it if
    /// the pool still holds one; see [`thin`]).
    ThinMetadataSnap { vg: String, pool: String },
}

/// Undoes one of the xl backend's own resources.
pub(crate) fn recover(resource: &XlResource) -> Result<()> {
    match resource {
        XlResource::XlOriginalPaused {
            domain,
            uuid,
            image,
        } => {
            if let Some(img) = image {
                // A save still writing after our crash ends paused: wait for it.
                cli::wait_for_xl_processes(&img.display().to_string(), SAVE_TIMEOUT);
            }
            match same_domain(domain, uuid)? {
                Some(d) if d.paused() => xl(&["unpause", domain]).map(|_| ()),
                _ => Ok(()),
            }
        }
        XlResource::XlOriginalSuspended {
            domain,
            uuid,
            domid,
        } => {
            // A save helper outliving us may still suspend the domain: wait for it.
            wait_for_save_helper(*domid, SAVE_TIMEOUT);
            match same_domain(domain, uuid)? {
                Some(d) if d.shut_down() && d.reason == Some(2) => {
                    let mut lib = libxl::Libxl::open(None).map_err(|e| {
                        BackendError::Checkpoint(format!(
                            "domain {domain} was left suspended by a killed live checkpoint, and libxenlight cannot resume it here: {e}"
                        ))
                    })?;
                    resume_original(&mut lib, domain, uuid, None)
                }
                _ => Ok(()),
            }
        }
        XlResource::XlBalloon {
            domain,
            uuid,
            target_kib,
        } => match same_domain(domain, uuid)? {
            Some(_) => xl(&["mem-set", domain, &format!("{target_kib}k")]).map(|_| ()),
            None => Ok(()),
        },
        XlResource::LvmSnapshot { vg, lv, origin } => lvm::remove_snapshot(vg, lv, origin),
        XlResource::ThinMetadataSnap { vg, pool } => thin::recover_metadata_snap(vg, pool),
        XlResource::XlDomain { name } => {
            cli::wait_for_xl_processes(name, Duration::from_secs(120));
            if state(name)?.is_some() {
                xl(&["destroy", name])?;
            }
            Ok(())
        }
    }
}

/// What the backend knows about a running domain.
#[derive(Debug, Clone)]
pub struct XlVm {
    pub name: String,
    pub domid: u32,
    pub uuid: String,
    /// "pv", "pvh" or "hvm".
    pub kind: String,
    /// `xl list -l` as read at inspection.
    pub config: Value,
    pub disks: Vec<XlDisk>,
}

#[derive(Debug, Clone)]
pub struct XlDisk {
    pub vdev: String,
    pub lv: lvm::Lv,
}

/// What a checkpoint keeps for the clone and the changed-block maps.
#[derive(Debug, Clone, Default)]
struct XlCheckpoint {
    /// The thin disks: the clone writes to its own snapshot of each, and a copy of the
    /// frozen snapshot is kept for the next run's map.
    thin: Vec<thin::ThinDisk>,
    run: String,
}

/// A clone domain.
#[derive(Debug)]
pub struct XlClone {
    name: String,
    journal_id: u64,
    /// Thin disks, whose clone snapshots tell the clone's writes.
    thin: Vec<thin::ThinDisk>,
    /// Classic snapshots under the clone, checked for overflow once it stopped.
    snapshots: Vec<PathBuf>,
    stopped: bool,
}

#[derive(Debug, Clone, Default)]
pub struct XlBackend {
    pub options: XlOptions,
}

const SAVE_TIMEOUT: Duration = Duration::from_secs(1800);
const RESTORE_TIMEOUT: Duration = Duration::from_secs(1800);

fn xl_vm(vm: &VmInfo) -> Result<&XlVm> {
    crate::vm_state(vm, "xl")
}

fn xl_clone(detail: &mut OpaqueMut) -> Result<&mut XlClone> {
    crate::clone_state(detail, "xl")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The domain named `name`, if it is still the one with `uuid`.
fn same_domain(name: &str, uuid: &str) -> Result<Option<cli::DomState>> {
    Ok(state(name)?.filter(|d| d.uuid == uuid))
}

fn memory_target_kib(domid: u32) -> Result<Option<u64>> {
    xs::read_u64(&format!("/local/domain/{domid}/memory/target"))
}

/// Unpauses the original, retrying a few times: it must never stay paused.
fn unpause_original(name: &str, uuid: &str) -> Result<()> {
    let mut last = None;
    for _ in 0..5 {
        match same_domain(name, uuid) {
            Ok(Some(d)) if !d.paused() => return Ok(()),
            Ok(None) => return Ok(()),
            _ => {}
        }
        match xl(&["unpause", name]) {
            Ok(_) => return Ok(()),
            Err(e) => {
                tracing::error!(domain = name, "xl unpause failed: {e}; retrying");
                last = Some(e);
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }
    Err(last.unwrap_or_else(|| BackendError::Checkpoint(format!("cannot unpause {name}"))))
}

/// Resumes the original with suspend_cancel while it is suspended (shut down with
/// reason suspend) and still the domain with `uuid`; retries: it must never stay
/// suspended. `ours`: the domid our own suspend just left suspended, resumed at once
/// without a listing first (that listing would lengthen the pause).
fn resume_original(
    lib: &mut libxl::Libxl,
    name: &str,
    uuid: &str,
    ours: Option<u32>,
) -> Result<()> {
    let mut last = None;
    if let Some(domid) = ours {
        if let Err(rc) = lib.resume_cancel(domid) {
            last = Some(format!("libxl error {rc}{}", lib.log_tail()));
        }
    }
    for attempt in 0..6 {
        match same_domain(name, uuid)? {
            Some(d) if d.shut_down() && d.reason == Some(2) => {
                if attempt == 5 {
                    break;
                }
                tracing::warn!(
                    domain = name,
                    "still suspended; libxl_domain_resume(suspend_cancel) again"
                );
                match lib.resume_cancel(d.domid) {
                    Ok(()) => {}
                    Err(rc) => {
                        last = Some(format!("libxl error {rc}{}", lib.log_tail()));
                        std::thread::sleep(Duration::from_millis(300));
                    }
                }
            }
            // Running, or gone, or not ours: nothing of ours to resume.
            _ => return Ok(()),
        }
    }
    Err(BackendError::Checkpoint(format!(
        "cannot resume {name} from its suspension: {}",
        last.unwrap_or_else(|| "it stays suspended".into())
    )))
}

/// Waits (bounded) until no libxl save helper works on `domid`: tools/libs/light/
/// libxl_save_callout.c `run_helper` starts it as `libxl-save-helper --save-domain
/// <fd> <back-fd> <domid> ...`.
fn wait_for_save_helper(domid: u32, timeout: Duration) {
    let start = Instant::now();
    let id = domid.to_string();
    while start.elapsed() < timeout {
        let busy = crate::util::find_processes_with_marker("--save-domain")
            .into_iter()
            .any(|pid| {
                crate::util::process_cmdline(pid).is_some_and(|a| {
                    a.first().is_some_and(|p| p.ends_with("libxl-save-helper"))
                        && a.get(1).map(String::as_str) == Some("--save-domain")
                        && a.get(4) == Some(&id)
                })
            });
        if !busy {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl XlBackend {
    pub fn with_options(options: XlOptions) -> Self {
        XlBackend { options }
    }

    fn disk_snapshots(
        &self,
        x: &XlVm,
        short: &str,
        journal: &mut dyn Journal,
        disks: &mut Vec<FrozenDisk>,
    ) -> Result<()> {
        let size = self.options.snapshot_size.as_deref().unwrap_or("20%ORIGIN");
        for d in &x.disks {
            let name = format!("{}-cc{short}", d.lv.name);
            journal.will_create(
                &XlResource::LvmSnapshot {
                    vg: d.lv.vg.clone(),
                    lv: name.clone(),
                    origin: d.lv.name.clone(),
                }
                .into(),
            )?;
            lvm::snapshot(&d.lv, &name, size)?;
            disks.push(FrozenDisk {
                name: d.vdev.clone(),
                frozen_file: PathBuf::from(format!("/dev/{}/{name}", d.lv.vg)),
                format: "raw".into(),
                bytes: d.lv.bytes,
            });
        }
        Ok(())
    }

    /// `xl save -p` then the snapshots, then `xl unpause`: paused for the whole save.
    fn checkpoint_save_pause(
        &self,
        x: &XlVm,
        image: &Path,
        short: &str,
        guest_kib: u64,
        journal: &mut dyn Journal,
    ) -> Result<Checkpoint> {
        journal.will_create(
            &SharedResource::File {
                path: image.to_path_buf(),
            }
            .into(),
        )?;
        let paused_id = journal.will_create(
            &XlResource::XlOriginalPaused {
                domain: x.name.clone(),
                uuid: x.uuid.clone(),
                image: Some(image.to_path_buf()),
            }
            .into(),
        )?;
        let image_s = image.display().to_string();
        let t0 = Instant::now();
        let saved = xl_bounded(&["save", "-p", &x.name, &image_s], SAVE_TIMEOUT);
        let memory = t0.elapsed();
        if let Err(e) = saved {
            // xl resumes the domain itself when a save fails; make sure.
            unpause_original(&x.name, &x.uuid)?;
            journal.removed(paused_id)?;
            return Err(BackendError::Checkpoint(format!("xl save failed: {e}")));
        }
        let snap = (|| {
            journal.milestone("checkpoint:memory-saved")?;
            let t = Instant::now();
            let mut disks = Vec::new();
            let r = self.disk_snapshots(x, short, journal, &mut disks);
            let disk_time = t.elapsed();
            r?;
            journal.milestone("checkpoint:disks-snapshotted")?;
            Ok::<_, BackendError>((disks, disk_time))
        })();
        // Every path out of here resumes the original.
        let unpaused = unpause_original(&x.name, &x.uuid);
        let total = t0.elapsed();
        unpaused?;
        journal.removed(paused_id)?;
        let (disks, disk_time) = snap?;
        lvm::after_pause(&x.disks.iter().map(|d| d.lv.vg.clone()).collect::<Vec<_>>());
        let memory_image_bytes = std::fs::metadata(image).map_err(io_err(image))?.len();
        Ok(Checkpoint {
            method: "xl-save-pause",
            memory_image: image.to_path_buf(),
            memory_image_bytes,
            pause: PauseTimes {
                total_ms: ms(total),
                disk_snapshot_ms: ms(disk_time),
                memory_ms: ms(memory),
            },
            disks,
            guest_memory_bytes: Some(guest_kib * 1024),
            ..Default::default()
        })
    }

    /// The live checkpoint (issue 17): libxl's live save writes the memory image in
    /// pre-copy rounds while the domain runs and suspends it for the last round only
    /// (`libxl_domain_suspend` with LIBXL_SUSPEND_LIVE: tools/libs/light/libxl_domain.c
    /// sets `dss->live`; libxl_dom_save.c `libxl__domain_save` turns it into
    /// XCFLAGS_LIVE; tools/libs/guest/xg_sr_save.c `send_domain_memory_live` runs the
    /// rounds under `simple_precopy_policy`, at most 5 or until < 50 pages are dirty,
    /// then `suspend_and_send_dirty`). The call returns with the domain suspended:
    /// the disks are snapshotted then, and `libxl_domain_resume(.., suspend_cancel=1)`
    /// continues it, as `xl save -c` does (tools/xl/xl_saverestore.c, `save_domain`:
    /// suspend without the live flag, then resume with suspend_cancel; on a failed
    /// suspend, resume too). Remus's checkpoint callback (libxl_dom_save.c,
    /// `libxl__remus_domain_checkpoint_callback`) is only called for checkpointed
    /// streams, which `xl restore` cannot read from a file: not used.
    ///
    /// `Ok(Err(reason))`: libxl refused before anything was left to undo (the domain
    /// runs); the caller may fall back to `xl save -p`.
    fn checkpoint_live(
        &self,
        x: &XlVm,
        work_dir: &Path,
        image: &Path,
        short: &str,
        guest_kib: u64,
        journal: &mut dyn Journal,
    ) -> Result<std::result::Result<Checkpoint, String>> {
        let log = work_dir.join("libxl.log");
        journal.will_create(&SharedResource::File { path: log.clone() }.into())?;
        let mut lib = match libxl::Libxl::open(Some(&log)) {
            Ok(l) => l,
            Err(e) => return Ok(Err(format!("libxenlight could not be used: {e}"))),
        };
        journal.will_create(
            &SharedResource::File {
                path: image.to_path_buf(),
            }
            .into(),
        )?;
        let file = live::create_image(image, &x.config).map_err(BackendError::Checkpoint)?;
        let suspended_id = journal.will_create(
            &XlResource::XlOriginalSuspended {
                domain: x.name.clone(),
                uuid: x.uuid.clone(),
                domid: x.domid,
            }
            .into(),
        )?;
        journal.milestone("checkpoint:live-started")?;
        // The pause as the hypervisor shows it; without libxenctrl, our own clock.
        let monitor = live::PauseMonitor::start(x.domid)
            .map_err(|e| {
                tracing::warn!(
                    "no pause monitor ({e}): the pause is timed from the end of the suspend call"
                )
            })
            .ok();
        let t0 = Instant::now();
        let saved = lib.suspend_live(x.domid, std::os::fd::AsFd::as_fd(&file));
        let memory = t0.elapsed();
        let t_suspended = Instant::now();
        drop(file);
        if let Err(rc) = saved {
            let reason = format!(
                "libxl_domain_suspend(LIBXL_SUSPEND_LIVE) failed with libxl error {rc}{}",
                lib.log_tail()
            );
            // As xl's save_domain does on a failed suspend: resume with suspend_cancel
            // (only if it did get suspended: see resume_original).
            let resumed = resume_original(&mut lib, &x.name, &x.uuid, None);
            if let Some(m) = monitor {
                let _ = m.finish();
            }
            resumed?;
            journal.removed(suspended_id)?;
            crate::util::remove_file_if_exists(image)?;
            return Ok(Err(reason));
        }
        let snap = (|| {
            journal.milestone("checkpoint:memory-saved")?;
            let t = Instant::now();
            let mut disks = Vec::new();
            let r = self.disk_snapshots(x, short, journal, &mut disks);
            let disk_time = t.elapsed();
            r?;
            journal.milestone("checkpoint:disks-snapshotted")?;
            Ok::<_, BackendError>((disks, disk_time))
        })();
        // Every path out of here resumes the original.
        let resumed = resume_original(&mut lib, &x.name, &x.uuid, Some(x.domid));
        let own_clock = t_suspended.elapsed();
        let measured = monitor.map(live::PauseMonitor::finish);
        resumed?;
        journal.removed(suspended_id)?;
        let (disks, disk_time) = snap?;
        lvm::after_pause(&x.disks.iter().map(|d| d.lv.vg.clone()).collect::<Vec<_>>());
        let total = match measured {
            Some(Ok(m)) => {
                tracing::info!(
                    pause_ms = m.pause_ms,
                    resolution_ms = m.resolution_ms,
                    samples = m.samples,
                    windows = m.windows,
                    "the original's pause, from the hypervisor's domain flags"
                );
                m.pause_ms
            }
            Some(Err(e)) => {
                tracing::warn!(
                    "the pause monitor failed ({e}): pause timed from the end of the suspend call"
                );
                ms(own_clock)
            }
            None => ms(own_clock),
        };
        let memory_image_bytes = std::fs::metadata(image).map_err(io_err(image))?.len();
        Ok(Ok(Checkpoint {
            method: "xl-live",
            memory_image: image.to_path_buf(),
            memory_image_bytes,
            pause: PauseTimes {
                total_ms: total,
                disk_snapshot_ms: ms(disk_time),
                memory_ms: ms(memory),
            },
            disks,
            guest_memory_bytes: Some(guest_kib * 1024),
            ..Default::default()
        }))
    }

    /// Classic snapshots that overflowed, among `paths`.
    fn overflowed(paths: &[PathBuf]) -> Result<Option<String>> {
        for p in paths {
            if let Some(lv) = lvm::lookup(p)? {
                if lv.overflowed() {
                    return Ok(Some(lv.full_name()));
                }
            }
        }
        Ok(None)
    }
}

impl Hypervisor for XlBackend {
    fn name(&self) -> &'static str {
        "xl"
    }

    fn inspect(&self, vm: &VmLocator) -> Result<VmInfo> {
        let VmLocator::Xl { domain, .. } = vm else {
            return Err(BackendError::Unsupported(
                "the xl backend was handed another backend's VM".into(),
            ));
        };
        let st = state(domain)?.ok_or_else(|| {
            BackendError::Unsupported(format!(
                "there is no domain named {domain} on this host (see `xl list`)"
            ))
        })?;
        let config = cli::config(domain)?;
        cfg::refuse_unclonable(&config)?;
        let kind = cfg::domain_type(&config);
        let mut disks = Vec::new();
        let mut infos = Vec::new();
        for d in cfg::disks(&config) {
            let vdev = d
                .get("vdev")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let pdev = PathBuf::from(
                d.get("pdev_path")
                    .and_then(Value::as_str)
                    .unwrap_or_default(),
            );
            let rw = d.get("readwrite").and_then(Value::as_i64) == Some(1);
            let cdrom = d.get("is_cdrom").and_then(Value::as_i64) == Some(1);
            if !rw || cdrom {
                continue; // shared read-only with the clone, not archived
            }
            let lv = lvm::lookup(&pdev)?.ok_or_else(|| {
                BackendError::Unsupported(format!(
                    "disk {vdev} of {domain} ({}) is not an LVM logical volume: the xl backend snapshots LVM volumes only",
                    pdev.display()
                ))
            })?;
            infos.push(DiskInfo {
                name: vdev.clone(),
                file: lv.path.clone(),
                format: if lv.is_thin() { "lvm-thin" } else { "lvm" }.into(),
                read_only: false,
                bytes: lv.bytes,
            });
            disks.push(XlDisk { vdev, lv });
        }
        let nics = config
            .pointer("/config/nics")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        let memory_kib = memory_target_kib(st.domid)?.unwrap_or(st.mem_mib * 1024);
        Ok(VmInfo {
            name: domain.clone(),
            backend: "xl",
            running: !st.paused() && !st.shut_down(),
            memory_bytes: memory_kib * 1024,
            disks: infos,
            nics,
            detail: Opaque::new(XlVm {
                name: domain.clone(),
                domid: st.domid,
                uuid: st.uuid,
                kind,
                config,
                disks,
            }),
        })
    }

    fn checkpoint(
        &self,
        vm: &VmInfo,
        work_dir: &Path,
        journal: &mut dyn Journal,
    ) -> Result<Checkpoint> {
        let x = xl_vm(vm)?;
        let now = same_domain(&x.name, &x.uuid)?.ok_or_else(|| {
            BackendError::Checkpoint(format!(
                "domain {} went away since it was inspected",
                x.name
            ))
        })?;
        if now.paused() || now.shut_down() {
            // Never unpause what we did not pause.
            return Err(BackendError::Checkpoint(format!(
                "domain {} is not running (state {}); coldclone checkpoints running domains only",
                x.name, now.flags
            )));
        }
        let run = work_dir
            .file_name()
            .and_then(|s| s.to_str())
            .unwrap_or("run");
        let short = &run[run.len().saturating_sub(6)..];
        let image = work_dir.join("memory.xl");
        // The memory the image will hold: the target now (after any balloon),
        // plus video RAM, which libxl keeps out of memory/target (HVM: 8 MiB by
        // default; a clone given less fails with "Failed to populate physmap").
        let videoram =
            xs::read_u64(&format!("/local/domain/{}/memory/videoram", x.domid))?.unwrap_or(0);
        let guest_kib = memory_target_kib(x.domid)?.unwrap_or(vm.memory_bytes / 1024) + videoram;
        let method = self.options.method().map_err(BackendError::Unsupported)?;
        let mut fallback_note = None;
        let result = match method {
            XlCheckpointMethod::SavePause => {
                self.checkpoint_save_pause(x, &image, short, guest_kib, journal)
            }
            // HVM: the Xen lab's HVM clone restored from a live image never answered its
            // shutdown (2026-12-04, docs/xl.md), where the `xl save -p` image's clone
            // did. Until that is understood, HVM guests keep the path that worked.
            XlCheckpointMethod::Auto if x.kind == "hvm" => {
                tracing::warn!(
                    domain = x.name,
                    "HVM guest: using xl save -p, not the live checkpoint"
                );
                fallback_note = Some(
                    "an HVM guest is checkpointed with `xl save -p` (the live checkpoint is used for PV and PVH guests only): the original was paused for its whole memory save".to_string(),
                );
                self.checkpoint_save_pause(x, &image, short, guest_kib, journal)
            }
            XlCheckpointMethod::Live if x.kind == "hvm" => Err(BackendError::Checkpoint(format!(
                "domain {} is HVM: the live checkpoint (xl_checkpoint = \"live\") is used for PV and PVH guests only; set xl_checkpoint = \"auto\" or \"save-pause\"",
                x.name
            ))),
            XlCheckpointMethod::Live | XlCheckpointMethod::Auto => {
                match self.checkpoint_live(x, work_dir, &image, short, guest_kib, journal)? {
                    Ok(c) => Ok(c),
                    Err(reason) if method == XlCheckpointMethod::Auto => {
                        tracing::warn!(
                            domain = x.name,
                            "live checkpoint refused ({reason}); using xl save -p"
                        );
                        fallback_note = Some(format!(
                            "the live checkpoint was refused ({reason}): `xl save -p` was used, so the original was paused for its whole memory save"
                        ));
                        self.checkpoint_save_pause(x, &image, short, guest_kib, journal)
                    }
                    Err(reason) => Err(BackendError::Checkpoint(format!(
                        "the live checkpoint (xl_checkpoint = \"live\") was refused: {reason}; set xl_checkpoint = \"auto\" to fall back to xl save -p"
                    ))),
                }
            }
        };
        let mut ckpt = result?;
        ckpt.warnings.extend(fallback_note);
        // Changed-block maps, after the original runs again: thin disks only (classic
        // snapshots keep no map; they are read whole).
        match thin::thin_disks(&x.disks, &ckpt.disks, run) {
            Ok(disks) => {
                ckpt.change_maps = thin::since_kept(&disks, journal);
                ckpt.detail = Opaque::new(XlCheckpoint {
                    thin: disks,
                    run: run.to_string(),
                });
            }
            Err(e) => {
                tracing::warn!("thin disks: {e}; no changed-block maps, disks read whole");
            }
        }
        ckpt.warnings.push(format!(
            "xl's monitor process of domain {} ended with `xl save`: its on_poweroff/on_reboot/on_crash \
             actions no longer apply (a shutdown leaves it listed until `xl destroy`; a reboot stops it); \
             see docs/xl.md",
            x.name
        ));
        tracing::info!(
            memory_ms = ckpt.pause.memory_ms,
            disk_ms = ckpt.pause.disk_snapshot_ms,
            "xl checkpoint taken"
        );
        Ok(ckpt)
    }

    fn restore_clone(
        &self,
        vm: &VmInfo,
        checkpoint: &Checkpoint,
        net: &CloneNetwork,
        clone_name: &str,
        work_dir: &Path,
        journal: &mut dyn Journal,
    ) -> Result<PausedClone> {
        let x = xl_vm(vm)?;
        if net.namespace.0.is_some() {
            return Err(BackendError::Unsupported(
                "xl plugs vifs into bridges of dom0's own network namespace: remove isolation.netns for xl VMs".into(),
            ));
        }
        // A thin disk's clone writes to its own thin snapshot of the frozen one (no size,
        // no copy), so that the frozen snapshot stays as the checkpoint left it and the
        // clone's writes are thin_delta(frozen, clone). Classic disks: the frozen
        // snapshot itself.
        let thin_disks = checkpoint
            .detail
            .get::<XlCheckpoint>()
            .map(|c| c.thin.clone())
            .unwrap_or_default();
        for t in &thin_disks {
            journal.will_create(
                &XlResource::LvmSnapshot {
                    vg: t.vg.clone(),
                    lv: t.clone.clone(),
                    origin: t.frozen.clone(),
                }
                .into(),
            )?;
            thin::clone_snapshot(t)?;
        }
        let disk_path = |d: &FrozenDisk| match thin_disks.iter().find(|t| t.vdev == d.name) {
            Some(t) => thin::lvm_path(&t.vg, &t.clone),
            None => d.frozen_file.clone(),
        };
        let snapshots: Vec<(String, String)> = checkpoint
            .disks
            .iter()
            .map(|d| (d.name.clone(), disk_path(d).display().to_string()))
            .collect();
        let b = x.config.pointer("/config/b_info");
        let max_kib = b
            .and_then(|b| b.get("max_memkb"))
            .and_then(Value::as_u64)
            .unwrap_or(vm.memory_bytes / 1024);
        // The memory the image holds: the target at the save (after any balloon).
        let memory_kib = checkpoint.guest_memory_bytes.unwrap_or(vm.memory_bytes) / 1024;
        let text = cfg::render(&cfg::CloneSpec {
            name: clone_name,
            original: &x.config,
            memory_kib,
            max_memory_kib: max_kib,
            snapshots: &snapshots,
            bridge: &net.bridge,
            vif_prefix: &net.tap_prefix,
        })?;
        let cfg_path = work_dir.join("clone.cfg");
        journal.will_create(
            &SharedResource::File {
                path: cfg_path.clone(),
            }
            .into(),
        )?;
        std::fs::write(&cfg_path, text).map_err(io_err(&cfg_path))?;
        let journal_id = journal.will_create(
            &XlResource::XlDomain {
                name: clone_name.to_string(),
            }
            .into(),
        )?;
        let cfg_s = cfg_path.display().to_string();
        let img_s = checkpoint.memory_image.display().to_string();
        // -p: paused until the isolation is verified; -e: no monitor process
        // (nothing to orphan if we crash; the clone is destroyed by us).
        xl_bounded(&["restore", "-p", "-e", &cfg_s, &img_s], RESTORE_TIMEOUT)
            .map_err(|e| BackendError::Clone(format!("xl restore failed: {e}")))?;
        journal.milestone("restore:clone-started")?;
        let st = state(clone_name)?.ok_or_else(|| {
            BackendError::Clone(format!("{clone_name} is not listed after xl restore"))
        })?;
        if !st.paused() {
            return Err(BackendError::Clone(format!(
                "{clone_name} runs (state {}) before its isolation was verified",
                st.flags
            )));
        }
        journal.milestone("restore:memory-loaded")?;
        let classic: Vec<PathBuf> = checkpoint
            .disks
            .iter()
            .map(|d| d.frozen_file.clone())
            .collect();
        Ok(PausedClone {
            name: clone_name.to_string(),
            taps: cfg::vif_names(&x.config, &net.tap_prefix),
            disks: checkpoint
                .disks
                .iter()
                .map(|d| CloneDisk {
                    name: d.name.clone(),
                    overlay: disk_path(d),
                    bytes: d.bytes,
                })
                .collect(),
            console_log: PathBuf::from(format!("/var/log/xen/console/guest-{clone_name}.log")),
            detail: OpaqueMut::new(XlClone {
                name: clone_name.to_string(),
                journal_id,
                thin: thin_disks.clone(),
                snapshots: classic,
                stopped: false,
            }),
        })
    }

    fn resume_clone(
        &self,
        clone: &mut PausedClone,
        verified: &network_isolation::Verified,
    ) -> Result<()> {
        for t in &clone.taps {
            if !verified.ports.contains(t) {
                return Err(BackendError::Clone(format!(
                    "vif {t} was not among the verified ports of {}",
                    verified.bridge
                )));
            }
        }
        let c = xl_clone(&mut clone.detail)?;
        xl(&["unpause", &c.name])?;
        match state(&c.name)? {
            Some(s) if !s.paused() => Ok(()),
            Some(s) => Err(BackendError::Clone(format!(
                "{} is still paused after xl unpause (state {})",
                c.name, s.flags
            ))),
            None => Err(BackendError::Clone(format!(
                "{} vanished on unpause",
                c.name
            ))),
        }
    }

    fn request_stop(&self, clone: &mut PausedClone, method: StopMethod) -> Result<()> {
        let c = xl_clone(&mut clone.detail)?;
        match method {
            // Writes control/shutdown=poweroff and waits (up to 60 s) for the guest's acknowledgement.
            StopMethod::Pv => {
                xl_bounded(&["shutdown", &c.name], Duration::from_secs(90)).map(|_| ())
            }
            StopMethod::Acpi => {
                // `xl trigger` exits 0 even when the trigger failed: read its stderr.
                let out = Command::new("xl")
                    .args(["trigger", &c.name, "power"])
                    .output()
                    .map_err(|source| BackendError::Spawn {
                        command: "xl trigger".into(),
                        source,
                    })?;
                let err = String::from_utf8_lossy(&out.stderr);
                if !out.status.success() || err.contains("failed") {
                    return Err(BackendError::Tool {
                        command: format!("xl trigger {} power", c.name),
                        stderr: err.trim().to_string(),
                    });
                }
                Ok(())
            }
        }
    }

    fn wait_stopped(&self, clone: &mut PausedClone, timeout: Duration) -> Result<CloneOutcome> {
        let c = xl_clone(&mut clone.detail)?;
        let name = c.name.clone();
        let mut last = None;
        let stopped = xs::wait_release_domain(timeout, || {
            let s = state(&name)?;
            let done = s.as_ref().is_none_or(|s| s.shut_down());
            last = s;
            Ok(done)
        })?;
        let outcome = match (&last, stopped) {
            (Some(s), true) if s.powered_off() => CloneOutcome::StoppedByGuest,
            (s, _) => {
                tracing::warn!(state = ?s, "the clone did not power off by itself; destroying it");
                CloneOutcome::Killed
            }
        };
        if state(&name)?.is_some() {
            xl(&["destroy", &name])?;
        }
        c.stopped = true;
        // An overflowed classic snapshot is not a backup, however the clone ended.
        if let Some(lv) = Self::overflowed(&c.snapshots)? {
            return Err(BackendError::Xl(XlError::SnapshotOverflow { lv }));
        }
        Ok(outcome)
    }

    fn destroy_clone(&self, clone: &mut PausedClone, journal: &mut dyn Journal) -> Result<()> {
        let c = xl_clone(&mut clone.detail)?;
        if state(&c.name)?.is_some() {
            xl(&["destroy", &c.name])?;
        }
        c.stopped = true;
        journal.removed(c.journal_id)
    }

    /// A thin disk's clone writes: thin_delta between the frozen snapshot and the clone's
    /// own snapshot of it. Classic disks: unknown (no map).
    fn clone_writes(
        &self,
        clone: &PausedClone,
        disk: &CloneDisk,
        journal: &mut dyn Journal,
    ) -> Result<Option<Vec<crate::ChangedRange>>> {
        let Some(c) = clone.detail.get::<XlClone>() else {
            return Ok(None);
        };
        match thin::by_clone_path(&c.thin, &disk.overlay) {
            Some(t) => thin::clone_writes(t, journal).map(Some),
            None => Ok(None),
        }
    }

    /// After a stored backup, each thin disk's frozen snapshot is kept (as a thin snapshot
    /// of it, inactive) for the next run's map, and the earlier kept ones go.
    fn settle_change_maps(
        &self,
        _vm: &VmInfo,
        checkpoint: &Checkpoint,
        stored: bool,
        journal: &mut dyn Journal,
    ) -> Result<()> {
        let Some(c) = checkpoint.detail.get::<XlCheckpoint>() else {
            return Ok(());
        };
        if !stored {
            return Ok(());
        }
        let mut first_err = None;
        for t in &c.thin {
            if let Err(e) = thin::keep(t, &c.run, journal) {
                tracing::warn!(
                    disk = t.vdev,
                    "keeping the thin snapshot for the next run: {e}"
                );
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The snapshot LV itself is the stopped disk: `dest` becomes a symlink
    /// to it, which the repository reads as a block device (no copy).
    fn export_disk(&self, _clone: &PausedClone, disk: &CloneDisk, dest: &Path) -> Result<()> {
        let lv = lvm::lookup(&disk.overlay)?.ok_or_else(|| {
            BackendError::Clone(format!("snapshot {} is gone", disk.overlay.display()))
        })?;
        if lv.overflowed() {
            return Err(BackendError::Xl(XlError::SnapshotOverflow {
                lv: lv.full_name(),
            }));
        }
        crate::util::remove_file_if_exists(dest)?;
        std::os::unix::fs::symlink(&lv.path, dest).map_err(io_err(dest))
    }

    fn release_checkpoint(
        &self,
        _vm: &VmInfo,
        _checkpoint: &Checkpoint,
        _journal: &mut dyn Journal,
    ) -> Result<()> {
        // The original's disks never changed; snapshots and the image are
        // journaled and removed with the run.
        Ok(())
    }

    /// The domain's actual memory (xl's Mem column: the guest's balloon
    /// driver reports nothing back through xenstore).
    fn memory_actual(&self, vm: &VmInfo) -> Result<Option<u64>> {
        let x = xl_vm(vm)?;
        Ok(same_domain(&x.name, &x.uuid)?.map(|d| d.mem_mib << 20))
    }

    /// `xl mem-set`: writes memory/target (and lowers maxmem); read back from
    /// xenstore to be sure it took. Returns the target it replaced, in bytes.
    fn balloon(&self, vm: &VmInfo, target_bytes: u64, journal: &mut dyn Journal) -> Result<u64> {
        let x = xl_vm(vm)?;
        let target_path = format!("/local/domain/{}/memory/target", x.domid);
        let before = xs::read_u64(&target_path)?.ok_or_else(|| {
            BackendError::Xl(XlError::Xenstore(format!("{target_path} is missing")))
        })?;
        let kib = target_bytes / 1024;
        journal.will_create(
            &XlResource::XlBalloon {
                domain: x.name.clone(),
                uuid: x.uuid.clone(),
                target_kib: before,
            }
            .into(),
        )?;
        xl(&["mem-set", &x.name, &format!("{kib}k")])?;
        let written = xs::read_u64(&target_path)?;
        if written != Some(kib) {
            return Err(BackendError::Checkpoint(format!(
                "xl mem-set {} {kib}k left {target_path} at {written:?}",
                x.name
            )));
        }
        Ok(before * 1024)
    }

    fn balloon_supported(&self, _vm: &VmInfo) -> bool {
        true
    }

    /// Clones take Xen's free memory (`xl info free_memory`, MiB), not dom0's.
    fn free_memory_for_clones(&self) -> Result<Option<u64>> {
        let info = xl(&["info"])?;
        Ok(info
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "free_memory").then(|| v.trim().parse::<u64>().ok())?
            })
            .map(|mib| mib << 20))
    }

    fn vm_definition(&self, vm: &VmInfo) -> Result<Option<crate::VmDefinition>> {
        let xv = xl_vm(vm)?;
        let mut config = xv.config.clone();
        remove_passwords(&mut config);
        let text = serde_json::to_string_pretty(&config)
            .map_err(|e| BackendError::Unsupported(format!("the domain's definition: {e}")))?;
        Ok(Some(crate::VmDefinition {
            kind: crate::VmDefinitionKind::XlJson,
            text,
        }))
    }

    fn stop_methods(&self, vm: &VmInfo) -> StopMethod {
        let Ok(x) = xl_vm(vm) else {
            return StopMethod::Pv;
        };
        if x.kind != "hvm" {
            return StopMethod::Pv;
        }
        // An HVM guest with PV drivers acknowledges PV shutdown; one without
        // only understands the ACPI power button.
        match xs::read(&format!(
            "/local/domain/{}/control/feature-poweroff",
            x.domid
        )) {
            Ok(Some(v)) if v == "1" => StopMethod::Pv,
            _ => StopMethod::Acpi,
        }
    }
}

/// libxl keeps VNC and SPICE passwords in the domain's configuration (`vnc.passwd`,
/// `spice.passwd`): they are not kept with a backup.
fn remove_passwords(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                if k.contains("passwd") || k.contains("password") {
                    *val = Value::String("removed-by-coldclone".into());
                } else {
                    remove_passwords(val);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(remove_passwords),
        _ => {}
    }
}
