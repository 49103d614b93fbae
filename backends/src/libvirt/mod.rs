//! libvirt-managed QEMU/KVM VMs, driven with `virsh` (docs/libvirt.md).
//!
//! - Checkpoint: one external live snapshot with memory, atomic across the
//!   disks (`snapshot-create-as --live --memspec --diskspec --atomic
//!   --no-metadata`): the original writes into new qcow2 overlays beside its
//!   images while the images stay frozen for the clone; libvirt writes the
//!   memory image. The pause is read from QEMU's STOP/RESUME events
//!   (`qemu-monitor-event`).
//! - Clone: the memory image restored paused in an embedded QEMU driver
//!   (`qemu:///embed?root=DIR`, an interactive `virsh` kept running as its
//!   command channel), under a domain XML derived from the save image's
//!   ([`domxml`]): disks on overlays over the frozen images, NICs on the
//!   isolated bridge, no graphics, consoles to a file.
//! - Stop: the ACPI button (`shutdown --mode acpi`), bounded, then destroy.
//! - Merge back: `blockcommit --active --pivot --wait` of each overlay.

pub mod domxml;
pub mod virsh;

use crate::shared::SharedResource;
use crate::util::{self, run_tool};
use crate::{
    io_err, BackendError, Checkpoint, CloneDisk, CloneNetwork, CloneOutcome, DiskInfo, FrozenDisk,
    Hypervisor, Journal, Opaque, OpaqueMut, PauseTimes, PausedClone, Result, StopMethod, VmInfo,
    VmLocator,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use virsh::{virsh, Session};

/// The default libvirt connection.
pub const DEFAULT_URI: &str = "qemu:///system";

/// What the libvirt backend creates, with what it takes to undo it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LibvirtResource {
    /// The snapshot may leave the original paused if libvirt fails half-way
    /// (undo: resume it if libvirt says it is paused for a snapshot).
    LibvirtOriginalPaused { uri: String, uuid: String },
    /// The overlay the original writes into over its frozen image (undo:
    /// `blockcommit --active --pivot` it back, delete it).
    LibvirtOriginalOverlay {
        uri: String,
        uuid: String,
        disk: String,
        base_file: PathBuf,
        overlay_file: PathBuf,
    },
    /// An embedded driver's root with the clone running in it (undo: kill
    /// its QEMU and virsh, remove the root).
    LibvirtEmbeddedClone { root: PathBuf, uuid: String },
    /// The original's file systems are (about to be) frozen through its guest agent
    /// (undo: ask the agent, through libvirt, and thaw if it says frozen). A killed
    /// run's freeze call goes on inside libvirtd, holding the domain's agent job, until
    /// its timeout: the undo waits that long for the job (bounded).
    LibvirtGuestFrozen {
        uri: String,
        uuid: String,
        #[serde(default)]
        freeze_timeout_secs: u64,
    },
}

/// Undoes one of the libvirt backend's own resources.
pub(crate) fn recover(resource: &LibvirtResource) -> Result<()> {
    match resource {
        LibvirtResource::LibvirtOriginalPaused { uri, uuid } => resume_if_ours(uri, uuid),
        LibvirtResource::LibvirtOriginalOverlay {
            uri,
            uuid,
            disk,
            base_file,
            overlay_file,
        } => merge_back(uri, uuid, disk, base_file, overlay_file),
        LibvirtResource::LibvirtEmbeddedClone { root, .. } => take_down_embedded(root),
        LibvirtResource::LibvirtGuestFrozen {
            uri,
            uuid,
            freeze_timeout_secs,
        } => thaw_if_frozen(uri, uuid, Duration::from_secs(*freeze_timeout_secs)),
    }
}

/// Per-VM settings from the config.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LibvirtOptions {}

/// What the backend knows of a libvirt domain.
#[derive(Debug, Clone)]
pub struct LibvirtVm {
    pub uri: String,
    pub name: String,
    pub uuid: String,
    pub checked: domxml::Checked,
    /// The domain has a guest agent channel (`org.qemu.guest_agent.0`).
    pub agent: bool,
    /// The domain's definition as read before the checkpoint (`dumpxml
    /// --inactive`: what `virsh define` takes; after the snapshot it names the
    /// overlays), secrets removed; or why it could not be read.
    pub definition: std::result::Result<String, String>,
}

#[derive(Debug, Clone, Default)]
struct LibvirtCheckpoint {
    /// (journal id, disk target, frozen image, overlay)
    overlays: Vec<(u64, String, PathBuf, PathBuf)>,
}

struct LibvirtClone {
    session: Option<Session>,
    uuid: String,
    root: PathBuf,
    root_journal_id: u64,
    tap_journal_ids: Vec<u64>,
    namespace: network_isolation::Namespace,
    stopped: bool,
    /// The domain has a guest agent channel (`org.qemu.guest_agent.0`), now on
    /// a socket of the clone's own: the fallback when the button is ignored.
    agent: bool,
}

impl std::fmt::Debug for LibvirtClone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtClone")
            .field("root", &self.root)
            .field("session", &self.session)
            .finish()
    }
}

/// Settings and timeouts of the libvirt backend.
#[derive(Debug, Clone)]
pub struct LibvirtBackend {
    pub snapshot_timeout: Duration,
    pub restore_timeout: Duration,
}

impl Default for LibvirtBackend {
    fn default() -> Self {
        LibvirtBackend {
            snapshot_timeout: Duration::from_secs(1800),
            restore_timeout: Duration::from_secs(1800),
        }
    }
}

fn lv_vm(vm: &VmInfo) -> Result<&LibvirtVm> {
    crate::vm_state(vm, "libvirt")
}

fn lv_clone(detail: &mut OpaqueMut) -> Result<&mut LibvirtClone> {
    crate::clone_state(detail, "libvirt")
}

fn unsupported(e: String) -> BackendError {
    BackendError::Unsupported(e)
}

/// `Capacity: N` of `virsh domblkinfo`.
fn disk_bytes(uri: &str, dom: &str, target: &str) -> Result<u64> {
    let out = virsh(uri, &["domblkinfo", dom, target])?;
    out.lines()
        .find_map(|l| l.strip_prefix("Capacity:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| unsupported(format!("virsh domblkinfo {target}: no capacity in {out:?}")))
}

/// The original's overlay of a disk: beside its image (same file system, a
/// folder its QEMU may write in), hidden, named by the run.
fn overlay_path_for(base: &Path, run_tag: &str) -> PathBuf {
    let dir = base.parent().unwrap_or(Path::new("/"));
    let name = base
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.join(format!(".{name}.coldclone-{run_tag}.qcow2"))
}

/// Waits until libvirt runs no job on the domain (a snapshot a killed run
/// left going finishes inside libvirtd).
fn wait_no_job(uri: &str, dom: &str, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let out = virsh(uri, &["domjobinfo", dom])?;
        let none = out
            .lines()
            .find_map(|l| l.strip_prefix("Job type:"))
            .is_none_or(|t| t.trim() == "None");
        if none {
            return Ok(());
        }
        if start.elapsed() > timeout {
            return Err(BackendError::Timeout {
                what: format!("libvirt's job on domain {dom} to end"),
                seconds: timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Resumes the original only if libvirt says it is paused by a snapshot or
/// save (never one a user paused).
fn resume_if_ours(uri: &str, uuid: &str) -> Result<()> {
    match virsh::domstate(uri, uuid) {
        Err(e) if virsh::no_such_domain(&e) => Ok(()),
        Err(e) => Err(e),
        Ok(_) => {
            wait_no_job(uri, uuid, Duration::from_secs(300))?;
            let (state, reason) = virsh::domstate(uri, uuid)?;
            if state == "paused" && matches!(reason.as_str(), "snapshot" | "migrating" | "saving") {
                virsh(uri, &["resume", uuid])?;
            }
            Ok(())
        }
    }
}

/// Puts the original's disk back on its image: a live `blockcommit` of our
/// overlay when the domain runs on it; an offline `qemu-img commit` when the
/// domain is gone; nothing (an error to act on) when it is defined but shut
/// off on the overlay.
fn merge_back(uri: &str, uuid: &str, disk: &str, base: &Path, overlay: &Path) -> Result<()> {
    let name = overlay
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !virsh::plain_absolute(overlay) || !name.contains(".coldclone-") || !name.ends_with(".qcow2")
    {
        return Err(unsupported(format!(
            "recover refuses: {} is not an overlay coldclone names",
            overlay.display()
        )));
    }
    let list = match virsh::domblklist(uri, uuid) {
        Err(e) if virsh::no_such_domain(&e) => {
            if !overlay.exists() {
                return Ok(());
            }
            // The domain is gone (a transient one that stopped): its last writes are
            // in the overlay; commit them into the image it was made over.
            util::check_backing(overlay, base)?;
            let mut c = Command::new("qemu-img");
            c.args(["commit", "-q", "-f", "qcow2"]).arg(overlay);
            run_tool(c)?;
            return util::remove_file_if_exists(overlay);
        }
        Err(e) => return Err(e),
        Ok(l) => l,
    };
    let (state, _) = virsh::domstate(uri, uuid)?;
    let source = list
        .iter()
        .find(|(t, _)| t == disk)
        .map(|(_, s)| PathBuf::from(s));
    if source.as_deref() == Some(overlay) {
        if state == "shut off" {
            return Err(BackendError::Checkpoint(format!(
                "domain {uuid} is shut off with its disk {disk} on {}; start it and run `coldclone recover` again",
                overlay.display()
            )));
        }
        wait_no_job(uri, uuid, Duration::from_secs(600))?;
        let base_s = base.display().to_string();
        virsh(
            uri,
            &[
                "blockcommit",
                uuid,
                disk,
                "--active",
                "--pivot",
                "--wait",
                "--base",
                &base_s,
            ],
        )?;
        let now = virsh::domblklist(uri, uuid)?
            .into_iter()
            .find(|(t, _)| t == disk)
            .map(|(_, s)| PathBuf::from(s));
        if now.as_deref() != Some(base) {
            return Err(BackendError::Checkpoint(format!(
                "after blockcommit, {disk} runs on {now:?}, not on {}",
                base.display()
            )));
        }
    } else if source.as_deref() != Some(base) && overlay.exists() {
        return Err(BackendError::Checkpoint(format!(
            "{disk} of domain {uuid} runs on {source:?}, neither its image nor our overlay; not touching it"
        )));
    }
    util::remove_file_if_exists(overlay)
}

/// Kills what runs in an embedded driver's root (the clone QEMU, the virsh
/// holding it) and removes the root.
fn take_down_embedded(root: &Path) -> Result<()> {
    let parent = Path::new(virsh::EMBED_PARENT);
    let named = root
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("embed-") && !n.contains('/'));
    if !virsh::plain_absolute(root) || root.parent() != Some(parent) || !named {
        return Err(unsupported(format!(
            "recover refuses: {} is not an embedded root coldclone makes",
            root.display()
        )));
    }
    let marker = root.display().to_string();
    for pid in util::find_processes_with_marker(&marker) {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        let exe = PathBuf::from(exe.to_string_lossy().trim_end_matches(" (deleted)"));
        let is_virsh = exe.file_name().is_some_and(|n| n == "virsh");
        if !util::is_qemu_binary(&exe) && !is_virsh {
            return Err(unsupported(format!(
                "recover refuses: process {pid} ({}) names {} but is neither QEMU nor virsh; left running",
                exe.display(),
                root.display()
            )));
        }
        if !util::kill_and_wait(pid, Duration::from_secs(10)) {
            return Err(BackendError::Clone(format!(
                "process {pid} of the embedded clone does not die"
            )));
        }
    }
    match std::fs::symlink_metadata(root) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(root)(e)),
        Ok(m) if !m.is_dir() => Err(unsupported(format!(
            "recover refuses: {} is not a folder",
            root.display()
        ))),
        Ok(_) => std::fs::remove_dir_all(root).map_err(io_err(root)),
    }
}

/// The embedded driver's own config: no security driver (it would relabel
/// the frozen images the original still reads), no ownership changes, and
/// the clone QEMU runs as coldclone does (root), like the QEMU backend's
/// clones: its files are in the run folder, which only root may enter.
const EMBED_QEMU_CONF: &str = "security_driver = \"none\"\ndynamic_ownership = 0\nremember_owner = 0\nuser = \"root\"\ngroup = \"root\"\n";

/// Copies QEMU capability caches (`*.xml`) from `from` into `to`: probing a
/// QEMU takes about a minute under TCG; libvirt checks a cached entry against
/// the binary and itself, and probes again if it is stale.
fn copy_caps(from: &Path, to: &Path) {
    let Ok(dir) = std::fs::read_dir(from) else {
        return;
    };
    let _ = std::fs::create_dir_all(to);
    for e in dir.flatten() {
        let p = e.path();
        let is_xml = p.extension().is_some_and(|x| x == "xml");
        if is_xml && e.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::copy(&p, to.join(e.file_name()));
        }
    }
}

impl LibvirtBackend {
    pub fn with_options(_options: &LibvirtOptions) -> LibvirtBackend {
        LibvirtBackend::default()
    }
}

/// The original's pause from QEMU's events: STOP → RESUME; the part after the
/// memory copy completed is the disk snapshot (libvirt makes the overlays and
/// runs the transaction then).
fn pause_from_events(events: &[virsh::MonitorEvent]) -> Option<PauseTimes> {
    let stop = events.iter().position(|e| e.name == "STOP")?;
    let resume = events[stop..].iter().find(|e| e.name == "RESUME")?;
    let stop_t = events[stop].timestamp_us;
    let total_ms = (resume.timestamp_us - stop_t) as f64 / 1000.0;
    let completed = events[stop..]
        .iter()
        .filter(|e| {
            e.name == "MIGRATION"
                && e.data.contains("completed")
                && e.timestamp_us <= resume.timestamp_us
        })
        .map(|e| e.timestamp_us)
        .next_back()
        .unwrap_or(stop_t);
    let disk_ms = (resume.timestamp_us - completed) as f64 / 1000.0;
    Some(PauseTimes {
        total_ms,
        disk_snapshot_ms: disk_ms,
        memory_ms: (total_ms - disk_ms).max(0.0),
    })
}

impl Hypervisor for LibvirtBackend {
    fn name(&self) -> &'static str {
        "libvirt"
    }

    fn inspect(&self, vm: &VmLocator) -> Result<VmInfo> {
        let VmLocator::Libvirt { domain, uri, .. } = vm else {
            return Err(unsupported(
                "the libvirt backend was handed another backend's VM".into(),
            ));
        };
        let uri = uri.clone().unwrap_or_else(|| DEFAULT_URI.to_string());
        let xml = virsh(&uri, &["dumpxml", domain])?;
        let dom = domxml::parse(&xml).map_err(|e| unsupported(format!("domain {domain}: {e}")))?;
        let checked =
            domxml::check(&dom).map_err(|e| unsupported(format!("domain {domain}: {e}")))?;
        let (state, _) = virsh::domstate(&uri, &checked.uuid)?;
        // Never `--security-info`: libvirt then leaves graphics passwords out.
        let definition = virsh(&uri, &["dumpxml", "--inactive", &checked.uuid])
            .map_err(|e| e.to_string())
            .and_then(|x| domxml::without_secrets(&x));
        let mut disks = Vec::new();
        for d in &checked.disks {
            disks.push(DiskInfo {
                name: d.target.clone(),
                file: d.file.clone(),
                format: d.format.clone(),
                read_only: false,
                bytes: disk_bytes(&uri, &checked.uuid, &d.target)?,
            });
        }
        Ok(VmInfo {
            name: checked.name.clone(),
            backend: "libvirt",
            running: state == "running",
            memory_bytes: checked.memory_bytes,
            disks,
            nics: checked.nics,
            detail: Opaque::new(LibvirtVm {
                uri,
                name: checked.name.clone(),
                uuid: checked.uuid.clone(),
                agent: domxml::has_agent_channel(&dom),
                checked,
                definition,
            }),
        })
    }

    fn checkpoint(
        &self,
        vm: &VmInfo,
        work_dir: &Path,
        journal: &mut dyn Journal,
    ) -> Result<Checkpoint> {
        let lv = lv_vm(vm)?;
        let (uri, uuid) = (lv.uri.as_str(), lv.uuid.as_str());
        let (state, _) = virsh::domstate(uri, uuid)?;
        if state != "running" {
            return Err(BackendError::Checkpoint(format!(
                "domain {} is {state}, not running",
                lv.name
            )));
        }
        let tag = work_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| util::random_hex(4));
        let memory_image = work_dir.join("memory.bin");
        let mut state = LibvirtCheckpoint::default();
        let mut args: Vec<String> = vec![
            "snapshot-create-as".into(),
            uuid.into(),
            format!("coldclone-{tag}"),
            "--memspec".into(),
            format!("file={},snapshot=external", memory_image.display()),
        ];
        let mut disks = Vec::new();
        for d in &vm.disks {
            let overlay = overlay_path_for(&d.file, &tag);
            let id = journal.will_create(
                &LibvirtResource::LibvirtOriginalOverlay {
                    uri: uri.into(),
                    uuid: uuid.into(),
                    disk: d.name.clone(),
                    base_file: d.file.clone(),
                    overlay_file: overlay.clone(),
                }
                .into(),
            )?;
            // virsh splits --diskspec at commas (doubled commas escape one).
            args.push("--diskspec".into());
            args.push(format!(
                "{},snapshot=external,file={}",
                d.name,
                overlay.display().to_string().replace(',', ",,")
            ));
            state
                .overlays
                .push((id, d.name.clone(), d.file.clone(), overlay));
            disks.push(FrozenDisk {
                name: d.name.clone(),
                frozen_file: d.file.clone(),
                format: d.format.clone(),
                bytes: d.bytes,
            });
        }
        args.extend(["--live", "--atomic", "--no-metadata"].map(String::from));
        let paused_id = journal.will_create(
            &LibvirtResource::LibvirtOriginalPaused {
                uri: uri.into(),
                uuid: uuid.into(),
            }
            .into(),
        )?;
        let mem_id = journal.will_create(
            &SharedResource::File {
                path: memory_image.clone(),
            }
            .into(),
        )?;
        let watch = virsh::EventWatch::start(uri, uuid)?;
        // qemu-monitor-event registers its callback after connecting.
        std::thread::sleep(Duration::from_millis(500));
        let mut c = Command::new("virsh");
        c.arg("-q")
            .arg("-c")
            .arg(uri)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let t = Instant::now();
        let child = c.spawn().map_err(|source| BackendError::Spawn {
            command: "virsh snapshot-create-as".into(),
            source,
        })?;
        // While libvirt takes the snapshot (a run killed here leaves it to libvirtd).
        journal.milestone("checkpoint:snapshot-started")?;
        let res = child
            .wait_with_output()
            .map_err(|source| BackendError::Spawn {
                command: "virsh snapshot-create-as".into(),
                source,
            })
            .and_then(|out| util::tool_result(format!("virsh {}", args.join(" ")), out));
        let wall_ms = t.elapsed().as_secs_f64() * 1000.0;
        let events = watch.finish();
        if let Err(e) = res {
            // --atomic: libvirt rolled the disks back; put right what it did not.
            let mut first = None;
            for (id, disk, base, overlay) in &state.overlays {
                match merge_back(uri, uuid, disk, base, overlay) {
                    Ok(()) => {
                        let _ = journal.removed(*id);
                    }
                    Err(e2) => {
                        tracing::error!(disk, "after a failed snapshot: {e2}");
                        first.get_or_insert(e2);
                    }
                }
            }
            if resume_if_ours(uri, uuid).is_ok() {
                let _ = journal.removed(paused_id);
            }
            if util::remove_file_if_exists(&memory_image).is_ok() {
                let _ = journal.removed(mem_id);
            }
            return Err(BackendError::Checkpoint(format!(
                "virsh snapshot-create-as: {e}"
            )));
        }
        let (after, _) = virsh::domstate(uri, uuid)?;
        if after != "running" {
            resume_if_ours(uri, uuid)?;
        }
        journal.removed(paused_id)?;
        journal.milestone("checkpoint:memory-saved")?;
        // The original runs on the overlays now: check, not trust.
        let list = virsh::domblklist(uri, uuid)?;
        for (_, disk, _, overlay) in &state.overlays {
            let on = list
                .iter()
                .find(|(t, _)| t == disk)
                .map(|(_, s)| s.as_str());
            if on != Some(overlay.to_string_lossy().as_ref()) {
                return Err(BackendError::Checkpoint(format!(
                    "after the snapshot, {disk} runs on {on:?}, not on {}",
                    overlay.display()
                )));
            }
        }
        let mut warnings = Vec::new();
        let pause = match pause_from_events(&events) {
            Some(p) => p,
            None => {
                let w = format!(
                    "QEMU's STOP/RESUME events were not seen; the pause is reported as the whole snapshot command ({wall_ms:.0} ms)"
                );
                tracing::warn!("{w}");
                warnings.push(w);
                PauseTimes {
                    total_ms: wall_ms,
                    disk_snapshot_ms: wall_ms,
                    memory_ms: 0.0,
                }
            }
        };
        let memory_image_bytes = std::fs::metadata(&memory_image)
            .map_err(io_err(&memory_image))?
            .len();
        Ok(Checkpoint {
            method: "libvirt-external-snapshot",
            memory_image,
            memory_image_bytes,
            pause,
            disks,
            warnings,
            detail: Opaque::new(state),
            ..Default::default()
        })
    }

    fn restore_clone(
        &self,
        vm: &VmInfo,
        checkpoint: &Checkpoint,
        net: &CloneNetwork,
        _clone_name: &str,
        work_dir: &Path,
        journal: &mut dyn Journal,
    ) -> Result<PausedClone> {
        let lv = lv_vm(vm)?;
        let tag = work_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| util::random_hex(4));
        let root = virsh::embed_root(&tag);
        let root_id = journal.will_create(
            &LibvirtResource::LibvirtEmbeddedClone {
                root: root.clone(),
                uuid: lv.uuid.clone(),
            }
            .into(),
        )?;
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root.join("etc"))
                .map_err(io_err(&root))?;
        }
        let conf = root.join("etc/qemu.conf");
        std::fs::write(&conf, EMBED_QEMU_CONF).map_err(io_err(&conf))?;
        // A state folder's cache of QEMU's capabilities, else the system driver's.
        let state_dir = work_dir.parent().and_then(Path::parent).unwrap_or(work_dir);
        let cache = state_dir.join("libvirt-embed-cache");
        let caps = root.join("cache/qemu/capabilities");
        copy_caps(Path::new("/var/cache/libvirt/qemu/capabilities"), &caps);
        copy_caps(&cache, &caps);

        let mut overlays = Vec::new();
        let mut clone_disks = Vec::new();
        for d in &checkpoint.disks {
            let overlay = work_dir.join(format!("clone-{}.qcow2", d.name));
            journal.will_create(
                &SharedResource::File {
                    path: overlay.clone(),
                }
                .into(),
            )?;
            let mut c = Command::new("qemu-img");
            c.args(["create", "-q", "-u", "-f", "qcow2", "-F", &d.format, "-b"])
                .arg(&d.frozen_file)
                .arg(&overlay)
                .arg(d.bytes.to_string());
            run_tool(c)?;
            overlays.push((
                d.name.clone(),
                overlay.clone(),
                d.frozen_file.clone(),
                d.format.clone(),
            ));
            clone_disks.push(CloneDisk {
                name: d.name.clone(),
                overlay,
                bytes: d.bytes,
            });
        }
        let uri = format!("qemu:///embed?root={}", root.display());
        let mem = checkpoint.memory_image.display().to_string();
        let saved_xml = virsh(&uri, &["save-image-dumpxml", &mem])?;
        // The driver has probed QEMU by now: keep its capabilities for the next run.
        copy_caps(&caps, &cache);
        let saved = domxml::parse(&saved_xml)
            .map_err(|e| BackendError::Clone(format!("the memory image's domain XML: {e}")))?;
        let taps: Vec<String> = (0..vm.nics)
            .map(|i| format!("{}{i}", net.tap_prefix))
            .collect();
        let console_log = work_dir.join("clone-console.log");
        let clone_xml = domxml::derive_clone(
            &saved,
            &domxml::CloneParts {
                overlays: &overlays,
                bridge: &net.bridge,
                taps: &taps,
                console_log: &console_log,
                channel_dir: work_dir,
            },
        )
        .map_err(BackendError::Clone)?;
        if clone_xml.child("uuid").map(domxml::Elem::text).as_deref() != Some(lv.uuid.as_str()) {
            return Err(BackendError::Clone(
                "the memory image belongs to another domain".into(),
            ));
        }
        let xml_path = work_dir.join("clone.xml");
        std::fs::write(&xml_path, clone_xml.to_xml()).map_err(io_err(&xml_path))?;
        let mut tap_ids = Vec::new();
        for t in &taps {
            tap_ids.push(
                journal.will_create(
                    &SharedResource::Tap {
                        namespace: net.namespace.0.clone(),
                        name: t.clone(),
                    }
                    .into(),
                )?,
            );
        }
        let session = Session::start(net.namespace.command("virsh"), &root)?;
        let mut clone = PausedClone {
            name: lv.name.clone(),
            taps: taps.clone(),
            disks: clone_disks,
            console_log,
            detail: OpaqueMut::new(LibvirtClone {
                session: Some(session),
                uuid: lv.uuid.clone(),
                root: root.clone(),
                root_journal_id: root_id,
                tap_journal_ids: tap_ids,
                namespace: net.namespace.clone(),
                stopped: false,
                agent: domxml::has_agent_channel(&saved),
            }),
        };
        journal.milestone("restore:clone-started")?;
        let timeout = self.restore_timeout;
        let c = lv_clone(&mut clone.detail)?;
        let s = c
            .session
            .as_mut()
            .ok_or_else(|| BackendError::Clone("no embedded session".into()))?;
        s.run(
            &format!(
                "restore {} --xml {} --paused",
                virsh::quote(&mem),
                virsh::quote(&xml_path.display().to_string())
            ),
            timeout,
        )
        .map_err(|e| BackendError::Clone(format!("restoring the memory image: {e}")))?;
        let st = s.run(&format!("domstate {}", c.uuid), Duration::from_secs(60))?;
        let (state, _) = virsh::parse_state(&st);
        if state != "paused" {
            return Err(BackendError::Clone(format!(
                "the restored clone is {state:?}, not paused: isolation was not checked yet"
            )));
        }
        journal.milestone("restore:memory-loaded")?;
        Ok(clone)
    }

    fn resume_clone(
        &self,
        clone: &mut PausedClone,
        verified: &network_isolation::Verified,
    ) -> Result<()> {
        for t in &clone.taps {
            if !verified.ports.contains(t) {
                return Err(BackendError::Clone(format!(
                    "tap {t} was not among the verified ports of {}",
                    verified.bridge
                )));
            }
        }
        let c = lv_clone(&mut clone.detail)?;
        let uuid = c.uuid.clone();
        let s = c
            .session
            .as_mut()
            .ok_or_else(|| BackendError::Clone("no embedded session".into()))?;
        s.run(&format!("resume {uuid}"), Duration::from_secs(60))
            .map(|_| ())
    }

    fn request_stop(&self, clone: &mut PausedClone, method: StopMethod) -> Result<()> {
        if method != StopMethod::Acpi {
            return Err(unsupported(
                "libvirt guests are stopped with the ACPI power button".into(),
            ));
        }
        let c = lv_clone(&mut clone.detail)?;
        let uuid = c.uuid.clone();
        let s = c
            .session
            .as_mut()
            .ok_or_else(|| BackendError::Clone("no embedded session".into()))?;
        s.run(
            &format!("shutdown {uuid} --mode acpi"),
            Duration::from_secs(60),
        )
        .map(|_| ())
    }

    fn wait_stopped(&self, clone: &mut PausedClone, timeout: Duration) -> Result<CloneOutcome> {
        let c = lv_clone(&mut clone.detail)?;
        let uuid = c.uuid.clone();
        let s = c
            .session
            .as_mut()
            .ok_or_else(|| BackendError::Clone("no embedded session".into()))?;
        let mut start = Instant::now();
        let mut asked_agent = false;
        let stopped = |asked: bool| {
            if asked {
                CloneOutcome::StoppedByGuestAgent
            } else {
                CloneOutcome::StoppedByGuest
            }
        };
        // on_poweroff = destroy: a clone that powered off is gone from the
        // driver; one that rebooted or crashed stays (on_reboot/on_crash = preserve).
        let outcome = loop {
            match s.run(
                &format!("domstate {uuid} --reason"),
                Duration::from_secs(60),
            ) {
                Err(e) if virsh::no_such_domain(&e) => break stopped(asked_agent),
                Err(e) => return Err(e),
                Ok(out) => {
                    let (state, reason) = virsh::parse_state(&out);
                    if state == "shut off" && reason == "shutdown" {
                        break stopped(asked_agent);
                    }
                    if state != "running" && state != "in shutdown" {
                        tracing::warn!(state, reason, "the clone stopped, but not by a power-off");
                        break CloneOutcome::Killed;
                    }
                }
            }
            if start.elapsed() > timeout {
                if !c.agent || asked_agent {
                    break CloneOutcome::Killed;
                }
                // The button was ignored: ask the guest agent, through the clone's
                // own channel, once, for another bounded wait. libvirt returns once
                // QEMU reports the guest's SHUTDOWN, or fails after its agent timeout.
                asked_agent = true;
                tracing::warn!("the clone ignored the ACPI power button; asking its guest agent");
                match s.run(
                    &format!("shutdown {uuid} --mode agent"),
                    Duration::from_secs(120),
                ) {
                    Ok(_) => start = Instant::now(),
                    Err(e) if virsh::no_such_domain(&e) => break CloneOutcome::StoppedByGuestAgent,
                    Err(e) => {
                        tracing::warn!("the guest agent's shutdown failed: {e}");
                        break CloneOutcome::Killed;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        if outcome == CloneOutcome::Killed {
            match s.run(&format!("destroy {uuid}"), Duration::from_secs(60)) {
                Err(e) if virsh::no_such_domain(&e) => {}
                Err(e) => tracing::warn!("destroying the clone: {e}"),
                Ok(_) => {}
            }
        }
        c.stopped = true;
        Ok(outcome)
    }

    fn destroy_clone(&self, clone: &mut PausedClone, journal: &mut dyn Journal) -> Result<()> {
        let taps = clone.taps.clone();
        let c = lv_clone(&mut clone.detail)?;
        if let Some(mut s) = c.session.take() {
            if !c.stopped {
                let _ = s.run(&format!("destroy {}", c.uuid), Duration::from_secs(60));
            }
            s.close();
        }
        take_down_embedded(&c.root)?;
        journal.removed(c.root_journal_id)?;
        for (t, id) in taps.iter().zip(c.tap_journal_ids.iter()) {
            network_isolation::delete_link(&c.namespace, t)?;
            journal.removed(*id)?;
        }
        c.stopped = true;
        Ok(())
    }

    fn export_disk(&self, _clone: &PausedClone, disk: &CloneDisk, dest: &Path) -> Result<()> {
        let mut c = Command::new("qemu-img");
        c.args(["convert", "-q", "-O", "raw", "-S", "4k"])
            .arg(&disk.overlay)
            .arg(dest);
        run_tool(c).map(|_| ())
    }

    /// The clone's overlay over the frozen image is read where it lies.
    fn disk_access(&self, _clone: &PausedClone, disk: &CloneDisk) -> crate::DiskAccess {
        crate::DiskAccess::Image {
            path: disk.overlay.clone(),
            format: crate::image_export::ImageFormat::Qcow2,
        }
    }

    fn release_checkpoint(
        &self,
        vm: &VmInfo,
        checkpoint: &Checkpoint,
        journal: &mut dyn Journal,
    ) -> Result<()> {
        let lv = lv_vm(vm)?;
        let state: &LibvirtCheckpoint = checkpoint.detail.get().ok_or_else(|| {
            unsupported("the libvirt backend was handed another backend's checkpoint".into())
        })?;
        for (id, disk, base, overlay) in &state.overlays {
            merge_back(&lv.uri, &lv.uuid, disk, base, overlay)?;
            journal.removed(*id)?;
        }
        journal.milestone("cleanup:original-chain-restored")?;
        Ok(())
    }

    fn stop_methods(&self, _vm: &VmInfo) -> StopMethod {
        StopMethod::Acpi
    }

    fn check_quiesce(&self, vm: &VmInfo) -> Result<()> {
        let lv = lv_vm(vm)?;
        if !lv.agent {
            return Err(unsupported(format!(
                "on_clone_failure = \"quiesced\" needs the VM's guest agent: domain {} has no <channel> named {}",
                lv.name,
                crate::agent::PORT_NAME
            )));
        }
        Ok(())
    }

    /// The freeze and thaw go through libvirt's own agent connection with
    /// `qemu-agent-command --timeout`: `domfsfreeze` and `snapshot-create-as --quiesce`
    /// wait with the domain's agent timeout, which blocks forever by default
    /// (libvirt src/qemu/qemu_domain.c, qemuDomainObjPrivateAlloc: "agent commands block
    /// by default"; qemu_agent.c, qemuAgentFSFreeze uses agent->timeout), while
    /// qemuDomainQemuAgentCommand takes the caller's. After a timeout libvirt syncs its
    /// agent connection again itself (qemu_agent.c, qemuAgentGuestSync).
    fn quiesced_snapshot(
        &self,
        vm: &VmInfo,
        checkpoint: &Checkpoint,
        work_dir: &Path,
        freeze_timeout: Duration,
        journal: &mut dyn Journal,
    ) -> Result<crate::QuiescedSnapshot> {
        self.check_quiesce(vm)?;
        let lv = lv_vm(vm)?;
        let (uri, uuid) = (lv.uri.as_str(), lv.uuid.as_str());
        let state: &LibvirtCheckpoint = checkpoint.detail.get().ok_or_else(|| {
            unsupported("the libvirt backend was handed another backend's checkpoint".into())
        })?;
        let tag = format!(
            "{}-q",
            work_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| util::random_hex(4))
        );
        let list = virsh::domblklist(uri, uuid)?;
        let mut args: Vec<String> = vec![
            "snapshot-create-as".into(),
            uuid.into(),
            format!("coldclone-{tag}"),
            "--disk-only".into(),
            "--atomic".into(),
            "--no-metadata".into(),
        ];
        let mut made = Vec::new();
        for (_, disk, _, overlay1) in &state.overlays {
            let on = list
                .iter()
                .find(|(t, _)| t == disk)
                .map(|(_, s)| PathBuf::from(s));
            if on.as_deref() != Some(overlay1.as_path()) {
                return Err(BackendError::Checkpoint(format!(
                    "{disk} runs on {on:?}, not on the checkpoint's overlay {}",
                    overlay1.display()
                )));
            }
            let overlay = overlay_path_for(overlay1, &tag);
            let id = journal.will_create(
                &LibvirtResource::LibvirtOriginalOverlay {
                    uri: uri.into(),
                    uuid: uuid.into(),
                    disk: disk.clone(),
                    base_file: overlay1.clone(),
                    overlay_file: overlay.clone(),
                }
                .into(),
            )?;
            args.push("--diskspec".into());
            args.push(format!(
                "{disk},snapshot=external,file={}",
                overlay.display().to_string().replace(',', ",,")
            ));
            made.push((id, disk.clone(), overlay1.clone(), overlay));
        }
        let undo_made = |journal: &mut dyn Journal| {
            for (id, disk, base, overlay) in made.iter().rev() {
                match merge_back(uri, uuid, disk, base, overlay) {
                    Ok(()) => {
                        let _ = journal.removed(*id);
                    }
                    Err(e) => tracing::error!(disk, "the quiesced snapshot's overlay: {e}"),
                }
            }
        };
        let frozen_id = journal.will_create(
            &LibvirtResource::LibvirtGuestFrozen {
                uri: uri.into(),
                uuid: uuid.into(),
                freeze_timeout_secs: freeze_timeout.as_secs(),
            }
            .into(),
        )?;
        journal.milestone("quiesce:freezing")?;
        let froze =
            agent_command(uri, uuid, "guest-fsfreeze-freeze", freeze_timeout).and_then(|v| {
                v.as_u64().ok_or_else(|| {
                    BackendError::Checkpoint(format!("guest-fsfreeze-freeze returned {v}"))
                })
            });
        let frozen_at = Instant::now();
        let snap = match &froze {
            Ok(_) => {
                journal.milestone("quiesce:frozen")?;
                let argv: Vec<&str> = args.iter().map(String::as_str).collect();
                let r = virsh(uri, &argv);
                if r.is_ok() {
                    journal.milestone("quiesce:snapshotted")?;
                }
                Some(r)
            }
            Err(e) => {
                tracing::error!("freezing the original's file systems failed: {e}; thawing");
                None
            }
        };
        // Thaw at once, on every path; a second try after a failure.
        let thawed = agent_command(uri, uuid, "guest-fsfreeze-thaw", THAW_TIMEOUT).or_else(|e| {
            tracing::warn!("thaw: {e}; trying again");
            agent_command(uri, uuid, "guest-fsfreeze-thaw", THAW_TIMEOUT)
        });
        let frozen_ms = frozen_at.elapsed().as_secs_f64() * 1000.0;
        if thawed.is_ok() {
            journal.removed(frozen_id)?;
            journal.milestone("quiesce:thawed")?;
        }
        let n = match (froze, snap) {
            (Ok(n), Some(Ok(_))) => n,
            (Ok(_), Some(Err(e))) => {
                undo_made(journal);
                return Err(e);
            }
            (Ok(_), None) => {
                undo_made(journal);
                return Err(BackendError::Checkpoint(
                    "the quiesced disk snapshot was not taken".into(),
                ));
            }
            (Err(e), _) => {
                undo_made(journal);
                return Err(BackendError::Checkpoint(format!(
                    "the original's file systems could not be frozen through its guest agent ({e}){}; no quiesced copy was taken",
                    if thawed.is_ok() { "; thawed again" } else { "; the thaw failed too" }
                )));
            }
        };
        if let Err(e) = thawed {
            return Err(BackendError::Checkpoint(format!(
                "the original's file systems were frozen for the snapshot but could not be thawed: {e}"
            )));
        }
        // Check, not trust: the original writes into the new overlays now.
        let list = virsh::domblklist(uri, uuid)?;
        let mut disks = Vec::new();
        for (_, disk, overlay1, overlay) in &made {
            let on = list
                .iter()
                .find(|(t, _)| t == disk)
                .map(|(_, s)| PathBuf::from(s));
            if on.as_deref() != Some(overlay.as_path()) {
                return Err(BackendError::Checkpoint(format!(
                    "after the quiesced snapshot, {disk} runs on {on:?}, not on {}",
                    overlay.display()
                )));
            }
            let bytes = vm
                .disks
                .iter()
                .find(|d| &d.name == disk)
                .map(|d| d.bytes)
                .unwrap_or(0);
            disks.push((
                CloneDisk {
                    name: disk.clone(),
                    overlay: overlay1.clone(),
                    bytes,
                },
                crate::DiskAccess::Image {
                    path: overlay1.clone(),
                    format: crate::image_export::ImageFormat::Qcow2,
                },
            ));
        }
        Ok(crate::QuiescedSnapshot {
            disks,
            frozen_filesystems: n,
            frozen_ms,
        })
    }

    fn vm_definition(&self, vm: &VmInfo) -> Result<Option<crate::VmDefinition>> {
        let lv = lv_vm(vm)?;
        let text = lv
            .definition
            .clone()
            .map_err(|e| unsupported(format!("domain {}: its definition: {e}", lv.name)))?;
        Ok(Some(crate::VmDefinition {
            kind: crate::VmDefinitionKind::LibvirtXml,
            text,
        }))
    }

    fn export_frozen_disk(&self, disk: &FrozenDisk, dest: &Path) -> Result<()> {
        let mut c = Command::new("qemu-img");
        c.args([
            "convert",
            "-q",
            "-U",
            "-O",
            "raw",
            "-S",
            "4k",
            "-f",
            &disk.format,
        ])
        .arg(&disk.frozen_file)
        .arg(dest);
        run_tool(c).map(|_| ())
    }
}

/// How long a thaw may take.
const THAW_TIMEOUT: Duration = Duration::from_secs(10);

/// One guest agent command through libvirt's own agent connection, bounded by
/// `timeout` (`qemu-agent-command --timeout`); its `return` value, typed by the caller.
fn agent_command(
    uri: &str,
    uuid: &str,
    command: &str,
    timeout: Duration,
) -> Result<serde_json::Value> {
    let req = serde_json::json!({ "execute": command }).to_string();
    let secs = timeout.as_secs().max(1).to_string();
    let out = virsh(uri, &["qemu-agent-command", uuid, &req, "--timeout", &secs])?;
    let text = out.trim();
    if text.len() > crate::agent::MAX_REPLY_BYTES {
        return Err(BackendError::Checkpoint(format!(
            "{command}: a reply longer than 64 KiB"
        )));
    }
    let v: serde_json::Value = serde_json::from_str(text).map_err(|_| {
        BackendError::Checkpoint(format!(
            "{command}: the agent answered {:?}",
            text.chars().take(200).collect::<String>()
        ))
    })?;
    v.get("return").cloned().ok_or_else(|| {
        BackendError::Checkpoint(format!(
            "{command}: the agent answered {:?}",
            text.chars().take(200).collect::<String>()
        ))
    })
}

/// `recover` of a guest a killed run may have left frozen: libvirt names the domain by
/// its uuid; its agent is asked, and thaws only if it says frozen. A killed run's
/// `qemu-agent-command` goes on inside libvirtd until its own timeout, holding the
/// domain's job ("cannot acquire state change lock (held by
/// agent=qemuDispatchDomainAgentCommand)"): waited for, up to `freeze_timeout` + 60 s.
fn thaw_if_frozen(uri: &str, uuid: &str, freeze_timeout: Duration) -> Result<()> {
    match virsh::domstate(uri, uuid) {
        Err(e) if virsh::no_such_domain(&e) => return Ok(()),
        Err(e) => return Err(e),
        Ok((state, _)) if state != "running" && state != "paused" => return Ok(()),
        Ok(_) => {}
    }
    let start = Instant::now();
    let limit = freeze_timeout + Duration::from_secs(60);
    let status = loop {
        match agent_command(uri, uuid, "guest-fsfreeze-status", THAW_TIMEOUT) {
            Ok(v) => break v,
            Err(e)
                if e.to_string().contains("cannot acquire state change lock")
                    && start.elapsed() < limit =>
            {
                tracing::info!("the domain's agent is busy (a killed run's freeze call); waiting");
                std::thread::sleep(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    };
    match serde_json::from_value::<crate::agent::FreezeStatus>(status.clone()) {
        Ok(crate::agent::FreezeStatus::Thawed) => Ok(()),
        Ok(crate::agent::FreezeStatus::Frozen) => {
            agent_command(uri, uuid, "guest-fsfreeze-thaw", THAW_TIMEOUT)?;
            tracing::warn!(uuid, "thawed a guest a killed run had left frozen");
            Ok(())
        }
        Err(_) => Err(BackendError::Checkpoint(format!(
            "guest-fsfreeze-status returned {status}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virsh::parse_event;

    #[test]
    fn the_pause_is_stop_to_resume_split_at_the_memory_copy() {
        let lines = [
            "event MIGRATION at 1796322431.083427 for domain 'w': {\"status\":\"active\"}",
            "event STOP at 1796322431.390505 for domain 'w': <null>",
            "event MIGRATION at 1796322431.422649 for domain 'w': {\"status\":\"completed\"}",
            "event RESUME at 1796322431.493217 for domain 'w': <null>",
        ];
        let ev: Vec<_> = lines.iter().filter_map(|l| parse_event(l)).collect();
        let p = pause_from_events(&ev).unwrap();
        assert!((p.total_ms - 102.712).abs() < 0.001, "{p:?}");
        assert!((p.disk_snapshot_ms - 70.568).abs() < 0.001, "{p:?}");
        assert!((p.memory_ms + p.disk_snapshot_ms - p.total_ms).abs() < 0.001);
        assert!(pause_from_events(&ev[..2]).is_none(), "no RESUME: unknown");
    }

    #[test]
    fn recover_touches_only_what_coldclone_names() {
        let e = take_down_embedded(Path::new("/var/lib/libvirt")).unwrap_err();
        assert!(e.to_string().contains("refuses"), "{e}");
        let e = take_down_embedded(Path::new("/run/coldclone/../etc")).unwrap_err();
        assert!(e.to_string().contains("refuses"), "{e}");
        let e = merge_back(
            "qemu:///system",
            "u",
            "vda",
            Path::new("/vm/a.qcow2"),
            Path::new("/vm/a.qcow2"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("refuses"), "{e}");
    }
}
