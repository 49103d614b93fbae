//! QEMU/KVM backend over QMP.
//!
//! A VM is named by its QMP socket; everything else (process, command line,
//! disks, NICs) is learned from the running QEMU. The checkpoint uses QEMU's
//! `background-snapshot` migration: the VM is stopped only for the disk
//! snapshot transaction and the device state, while RAM is written out
//! afterwards with userfaultfd write protection. Where that capability is
//! missing, `pause-before-switchover` is the fallback (a longer pause).
//!
//! The original's disk chain: the snapshot makes the original write into a
//! new qcow2 overlay while its image stays frozen for the clone; afterwards a
//! `block-commit` merges the overlay back so the chain is one image again.

mod bitmap;
pub mod blockdev;
pub mod boot;
pub mod cmdline;
pub mod qmp;
pub mod space;

use crate::shared::SharedResource;
pub use crate::util::is_qemu_binary;
use crate::util::{self, absolute, run_tool};
use crate::{
    io_err, BackendError, Checkpoint, CloneDisk, CloneNetwork, CloneOutcome, DiskInfo, FrozenDisk,
    Hypervisor, Journal, Opaque, OpaqueMut, PauseTimes, PausedClone, Result, StopMethod, VmInfo,
    VmLocator,
};
use qmp::{Event, Qmp};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What can go wrong talking to QEMU (the other backend errors are shared).
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("cannot reach the VM's QMP socket {path}: {source} (is the VM running, and is this the socket given to -qmp?)")]
    QmpConnect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("QMP I/O on {path} failed: {source}")]
    QmpIo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("QMP command {command} failed: {class}: {desc}")]
    QmpCommand {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP protocol error on {path}: {what}")]
    QmpProtocol { path: PathBuf, what: String },
}

/// What the QEMU backend creates on the original, with what it takes to undo it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum QemuResource {
    /// The original was paused by us (undo: resume it if it is still paused).
    OriginalPaused { qmp: PathBuf },
    /// Migration capabilities/parameters we changed on the original and a
    /// migration we started (undo: cancel it, put the settings back).
    OriginalMigration {
        qmp: PathBuf,
        capabilities: Vec<(String, bool)>,
        max_bandwidth: Option<u64>,
        #[serde(default)]
        downtime_limit: Option<u64>,
    },
    /// A qcow2 overlay that the original now writes into, on top of its
    /// frozen image (undo: commit it back into the image, delete it).
    OriginalOverlay {
        qmp: PathBuf,
        original_pid: u32,
        device: String,
        base_node: String,
        base_file: PathBuf,
        overlay_file: PathBuf,
        overlay_node: String,
    },
    /// The original's memory was ballooned down (undo: set it back to `restore_bytes`).
    Balloon { qmp: PathBuf, restore_bytes: u64 },
    /// A dirty bitmap this run started on an original's image node (undo: remove it;
    /// a stored backup releases it to the next run instead).
    DirtyBitmap {
        qmp: PathBuf,
        original_pid: u32,
        node: String,
        name: String,
    },
    /// An earlier run's bitmap, disabled while this run reads it. Undo: remove it (the
    /// next backup reads whole disks): a run killed before enabling it again may have
    /// missed writes into the image, and a bitmap that missed one must never be read.
    DirtyBitmapDisabled {
        qmp: PathBuf,
        original_pid: u32,
        node: String,
        name: String,
    },
    /// The NBD server started on the original to read its bitmaps (undo: stop it).
    OriginalNbdServer {
        qmp: PathBuf,
        original_pid: u32,
        socket: PathBuf,
    },
    /// The original's file systems are (about to be) frozen through its guest agent
    /// (undo: thaw them, if that very QEMU still serves that agent socket and its
    /// agent says they are frozen).
    GuestFrozen {
        qmp: PathBuf,
        original_pid: u32,
        agent_socket: PathBuf,
        #[serde(default)]
        vm_uid: Option<u32>,
    },
}

/// Undoes one of the QEMU backend's own resources.
pub(crate) fn recover(resource: &QemuResource) -> Result<()> {
    match resource {
        QemuResource::OriginalPaused { qmp } => match Qmp::connect(qmp) {
            Ok(mut q) => QemuBackend::resume_if_paused(&mut q),
            // No QEMU behind the socket: nothing is paused.
            Err(BackendError::Qemu(QemuError::QmpConnect { .. })) => Ok(()),
            Err(e) => Err(e),
        },
        QemuResource::OriginalMigration {
            qmp,
            capabilities,
            max_bandwidth,
            downtime_limit,
        } => match Qmp::connect(qmp) {
            Ok(mut q) => {
                cancel_migration(&mut q)?;
                restore_migration_settings(&mut q, capabilities, *max_bandwidth, *downtime_limit)?;
                QemuBackend::resume_if_paused(&mut q)
            }
            Err(BackendError::Qemu(QemuError::QmpConnect { .. })) => Ok(()),
            Err(e) => Err(e),
        },
        QemuResource::OriginalOverlay {
            qmp,
            original_pid,
            device,
            base_node,
            base_file,
            overlay_file,
            overlay_node,
        } => match Qmp::connect(qmp) {
            Ok(mut q) if q.peer_pid().ok() == Some(*original_pid) => {
                cancel_migration(&mut q)?;
                merge_back_live(
                    &mut q,
                    device,
                    base_node,
                    base_file,
                    overlay_file,
                    overlay_node,
                )
            }
            _ => merge_back_offline(*original_pid, overlay_file, base_file),
        },
        QemuResource::DirtyBitmap {
            qmp,
            original_pid,
            node,
            name,
        }
        | QemuResource::DirtyBitmapDisabled {
            qmp,
            original_pid,
            node,
            name,
        } => match Qmp::connect(qmp) {
            // Only on the very QEMU that had it: another process at the socket is not ours.
            Ok(mut q) if q.peer_pid().ok() == Some(*original_pid) => {
                bitmap::remove(&mut q, node, name)
            }
            // The original is gone, and a bitmap with it (or, persistent, it is marked
            // inconsistent and the next run drops it).
            _ => Ok(()),
        },
        QemuResource::OriginalNbdServer {
            qmp,
            original_pid,
            socket,
        } => match Qmp::connect(qmp) {
            Ok(mut q) if q.peer_pid().ok() == Some(*original_pid) => {
                bitmap::undo_nbd_server(&mut q, socket)
            }
            _ => util::remove_file_if_exists(socket),
        },
        QemuResource::GuestFrozen {
            original_pid,
            agent_socket,
            vm_uid,
            ..
        } => thaw_after_crash(*original_pid, agent_socket, *vm_uid),
        QemuResource::Balloon { qmp, restore_bytes } => match Qmp::connect(qmp) {
            Ok(mut q) => q
                .execute("balloon", json!({ "value": restore_bytes }))
                .map(|_| ()),
            Err(BackendError::Qemu(QemuError::QmpConnect { .. })) => Ok(()),
            Err(e) => Err(e),
        },
    }
}

/// What the backend knows about a running QEMU.
#[derive(Debug, Clone)]
pub struct QemuVm {
    pub qmp: PathBuf,
    pub pid: u32,
    pub exe: PathBuf,
    pub cwd: PathBuf,
    pub options: Vec<cmdline::Opt>,
    pub disks: Vec<QemuDisk>,
    /// The guest agent's channel, its socket path made absolute (QEMU's folder).
    pub agent: Option<cmdline::AgentChannel>,
}

#[derive(Debug, Clone)]
pub struct QemuDisk {
    /// How QMP finds the disk: the -drive id (`device` of query-block), or, for a
    /// -blockdev disk (no drive id), the guest device's `qdev`.
    pub device: String,
    /// The disk's name in the backup and on the clone's command line: the -drive
    /// id, or the -blockdev format node's name.
    pub name: String,
    /// A -blockdev disk: snapshotted with `blockdev-add` + `blockdev-snapshot`.
    pub blockdev: bool,
    pub node_name: String,
    pub file: PathBuf,
    pub format: String,
    pub bytes: u64,
}

pub struct QemuClone {
    qmp: Option<Qmp>,
    child: Option<Child>,
    marker: String,
    process_journal_id: u64,
    tap_journal_ids: Vec<u64>,
    namespace: network_isolation::Namespace,
    stopped: bool,
    /// The clone's own guest agent socket (in its run folder), where the VM has an
    /// agent channel: the fallback when the power button is ignored.
    agent: Option<PathBuf>,
}

impl std::fmt::Debug for QemuClone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuClone")
            .field("marker", &self.marker)
            .field("pid", &self.child.as_ref().map(Child::id))
            .finish()
    }
}

/// The overlay a checkpoint put on top of one of the original's disks.
#[derive(Debug, Clone)]
struct OriginalOverlay {
    /// Its `QemuResource::OriginalOverlay` entry.
    journal_id: u64,
    device: String,
    /// The overlay's node (a -blockdev disk's is ours to `blockdev-del`).
    overlay_node: String,
    /// The block node of the frozen image (empty: found by file).
    base_node: String,
    base_file: PathBuf,
    overlay: PathBuf,
}

/// The QEMU part of a checkpoint: what goes back into the original.
#[derive(Debug, Clone, Default)]
struct QemuCheckpoint {
    overlays: Vec<OriginalOverlay>,
    /// Changed-block tracking, per disk (device) where it could be set up.
    bitmaps: Vec<(String, bitmap::DiskBitmaps)>,
}

/// How the QEMU backend takes its checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointMethod {
    /// background-snapshot below `AUTO_PRE_SWITCHOVER_BYTES` of guest RAM,
    /// pre-switchover from there on (measured: docs/performance.md).
    Auto,
    /// `background-snapshot`: RAM written after the VM resumes, under
    /// userfaultfd write protection; the pause is device state + disk
    /// snapshot + write-protecting RAM.
    BackgroundSnapshot,
    /// `pause-before-switchover`: RAM copied while the VM runs; the pause is
    /// the last dirty pages (bounded by `downtime_limit_ms`) + disk snapshot.
    PreSwitchover,
}

/// From this much guest RAM on, `auto` uses pre-switchover.
pub const AUTO_PRE_SWITCHOVER_BYTES: u64 = 2 << 30;

/// Per-VM settings of the QEMU backend, from the config.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QemuOptions {
    /// "background-snapshot" (default) or "pre-switchover".
    pub checkpoint_method: Option<String>,
    /// QEMU's downtime target for pre-switchover, in ms (default 20).
    pub downtime_limit_ms: Option<u64>,
    /// The uid the VM's QEMU runs as, when not root: the QMP socket's peer
    /// must be root or this uid (see [`check_peer`]).
    #[serde(default)]
    pub uid: Option<u32>,
}

impl QemuOptions {
    pub fn method(&self) -> std::result::Result<CheckpointMethod, String> {
        match self.checkpoint_method.as_deref() {
            None | Some("auto") => Ok(CheckpointMethod::Auto),
            Some("background-snapshot") => Ok(CheckpointMethod::BackgroundSnapshot),
            Some("pre-switchover") => Ok(CheckpointMethod::PreSwitchover),
            Some(other) => Err(format!(
                "checkpoint_method {other:?}: use \"auto\", \"background-snapshot\" or \"pre-switchover\""
            )),
        }
    }
}

/// Settings and timeouts of the QEMU backend.
#[derive(Debug, Clone)]
pub struct QemuBackend {
    pub method: CheckpointMethod,
    /// QEMU's downtime target for the pre-switchover method.
    pub downtime_limit_ms: u64,
    pub memory_save_timeout: Duration,
    pub clone_start_timeout: Duration,
    /// Besides root, the uid the original's QEMU may run as.
    pub vm_uid: Option<u32>,
}

impl QemuBackend {
    pub fn with_options(options: &QemuOptions) -> QemuBackend {
        let d = QemuBackend::default();
        QemuBackend {
            method: options.method().unwrap_or(d.method),
            downtime_limit_ms: options.downtime_limit_ms.unwrap_or(d.downtime_limit_ms),
            vm_uid: options.uid,
            ..d
        }
    }
}

impl Default for QemuBackend {
    fn default() -> Self {
        QemuBackend {
            method: CheckpointMethod::Auto,
            downtime_limit_ms: 20,
            memory_save_timeout: Duration::from_secs(1800),
            clone_start_timeout: Duration::from_secs(120),
            vm_uid: None,
        }
    }
}

fn qemu_clone(detail: &mut OpaqueMut) -> Result<&mut QemuClone> {
    crate::clone_state(detail, "QEMU")
}

pub(crate) fn qemu_vm(vm: &VmInfo) -> Result<&QemuVm> {
    crate::vm_state(vm, "QEMU")
}

fn str_of(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn migration_status(ev: &Event) -> Option<&str> {
    (ev.name == "MIGRATION")
        .then(|| ev.data.get("status").and_then(Value::as_str))
        .flatten()
}

/// `cont`, retried while QEMU is still finalizing a migration that has just
/// reported `completed` (it refuses with "Migration is not finalized yet").
pub fn cont(q: &mut Qmp) -> Result<()> {
    let start = Instant::now();
    loop {
        match q.execute("cont", json!({})) {
            Ok(_) => return Ok(()),
            Err(BackendError::Qemu(QemuError::QmpCommand { desc, .. }))
                if desc.contains("not finalized") && start.elapsed() < Duration::from_secs(30) =>
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads the migration capabilities we are about to change, to put them back later.
fn current_capabilities(q: &mut Qmp, names: &[&str]) -> Result<Vec<(String, bool)>> {
    let caps = q.execute("query-migrate-capabilities", json!({}))?;
    let mut out = Vec::new();
    for n in names {
        let state = caps
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|c| c.get("capability").and_then(Value::as_str) == Some(n))
            })
            .and_then(|c| c.get("state").and_then(Value::as_bool))
            .unwrap_or(false);
        out.push((n.to_string(), state));
    }
    Ok(out)
}

fn set_capabilities(q: &mut Qmp, caps: &[(String, bool)]) -> Result<()> {
    let list: Vec<Value> = caps
        .iter()
        .map(|(c, s)| json!({"capability": c, "state": s}))
        .collect();
    q.execute("migrate-set-capabilities", json!({ "capabilities": list }))
        .map(|_| ())
}

fn restore_migration_settings(
    q: &mut Qmp,
    caps: &[(String, bool)],
    bandwidth: Option<u64>,
    downtime: Option<u64>,
) -> Result<()> {
    // One at a time: turning background-snapshot off while events is listed
    // first would be refused as a whole if any single one is refused.
    for c in caps {
        set_capabilities(q, std::slice::from_ref(c))?;
    }
    if let Some(bw) = bandwidth {
        q.execute("migrate-set-parameters", json!({ "max-bandwidth": bw }))?;
    }
    if let Some(d) = downtime {
        q.execute("migrate-set-parameters", json!({ "downtime-limit": d }))?;
    }
    Ok(())
}

fn active_migration(q: &mut Qmp) -> Result<Option<String>> {
    let m = q.execute("query-migrate", json!({}))?;
    let st = str_of(&m, "status");
    Ok(match st.as_str() {
        "setup" | "active" | "pre-switchover" | "device" | "postcopy-active" | "wait-unplug"
        | "cancelling" => Some(st),
        _ => None,
    })
}

/// Cancels a migration that is under way and waits until it has ended.
fn cancel_migration(q: &mut Qmp) -> Result<()> {
    if active_migration(q)?.is_none() {
        return Ok(());
    }
    q.execute("migrate_cancel", json!({}))?;
    let start = Instant::now();
    while active_migration(q)?.is_some() {
        if start.elapsed() > Duration::from_secs(60) {
            return Err(BackendError::Timeout {
                what: "the original's migration to be cancelled".into(),
                seconds: 60,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A file name as QEMU reports it, made absolute against QEMU's working folder.
fn qemu_path(q: &Qmp, name: &str) -> PathBuf {
    let p = PathBuf::from(name);
    if p.is_absolute() {
        return p;
    }
    match q.peer_pid() {
        Ok(pid) => std::fs::read_link(format!("/proc/{pid}/cwd"))
            .map(|cwd| cwd.join(&p))
            .unwrap_or(p),
        Err(_) => p,
    }
}

/// The file a drive currently writes into (its active layer).
fn active_file(q: &mut Qmp, device: &str) -> Result<Option<PathBuf>> {
    Ok(inserted(q, device)?.map(|i| node_file(q, &str_of(&i, "file"))))
}

/// The file a node writes into. QEMU names a node whose backing is not what
/// its header says (a -blockdev overlay over a base opened by a relative
/// name) with a `json:` pseudo-filename; its top-level `file.filename` is the file.
fn node_file(q: &Qmp, name: &str) -> PathBuf {
    let top = name
        .strip_prefix("json:")
        .and_then(|j| serde_json::from_str::<Value>(j).ok())
        .and_then(|v| {
            v.get("file")
                .and_then(|f| f.get("filename"))
                .and_then(Value::as_str)
                .map(str::to_string)
        });
    qemu_path(q, top.as_deref().unwrap_or(name))
}

/// The query-block entry of a disk: by drive id, or (a -blockdev disk, whose
/// `device` is empty) by its guest device's `qdev`.
fn block_entry(q: &mut Qmp, device: &str) -> Result<Option<Value>> {
    let blocks = q.execute("query-block", json!({}))?;
    Ok(blocks.as_array().and_then(|a| {
        a.iter()
            .find(|b| {
                let d = str_of(b, "device");
                d == device || (d.is_empty() && str_of(b, "qdev") == device)
            })
            .cloned()
    }))
}

/// The block-query entry of a drive, if it has a medium.
fn inserted(q: &mut Qmp, device: &str) -> Result<Option<Value>> {
    Ok(block_entry(q, device)?.and_then(|b| b.get("inserted").cloned()))
}

/// Active commit of the top overlay of `device` into `base_node`; waits for it.
fn commit_overlay(q: &mut Qmp, device: &str, base_node: &str, job_id: &str) -> Result<()> {
    // block-commit takes a drive id, or the root node of a -blockdev disk.
    let target = match block_entry(q, device)? {
        Some(b) if str_of(&b, "device").is_empty() => b
            .get("inserted")
            .map(|i| str_of(i, "node-name"))
            .unwrap_or_default(),
        _ => device.to_string(),
    };
    q.execute(
        "block-commit",
        json!({"device": target, "job-id": job_id, "base-node": base_node, "auto-dismiss": true}),
    )?;
    let ready = |e: &Event| {
        (e.name == "BLOCK_JOB_READY"
            || e.name == "BLOCK_JOB_COMPLETED"
            || e.name == "BLOCK_JOB_ERROR")
            && e.data.get("device").and_then(Value::as_str) == Some(job_id)
    };
    let ev = q.wait_event(
        "block-commit to be ready",
        Duration::from_secs(3600),
        &ready,
    )?;
    if ev.name == "BLOCK_JOB_ERROR" {
        return Err(BackendError::Checkpoint(format!(
            "block-commit failed: {}",
            ev.data
        )));
    }
    if ev.name == "BLOCK_JOB_READY" {
        q.execute("block-job-complete", json!({ "device": job_id }))?;
        let done = |e: &Event| {
            e.name == "BLOCK_JOB_COMPLETED"
                && e.data.get("device").and_then(Value::as_str) == Some(job_id)
        };
        let ev = q.wait_event("block-commit to complete", Duration::from_secs(600), &done)?;
        if let Some(err) = ev.data.get("error") {
            return Err(BackendError::Checkpoint(format!(
                "block-commit failed: {err}"
            )));
        }
    } else if let Some(err) = ev.data.get("error") {
        return Err(BackendError::Checkpoint(format!(
            "block-commit failed: {err}"
        )));
    }
    Ok(())
}

impl QemuBackend {
    fn resume_if_paused(q: &mut Qmp) -> Result<()> {
        cancel_migration(q)?;
        let st = q.status()?;
        if matches!(st.as_str(), "paused" | "postmigrate" | "finish-migrate") {
            cont(q)?;
        }
        Ok(())
    }

    /// Memory + disks with `background-snapshot`: stop, snapshot disks, start
    /// the RAM save (QEMU resumes the VM itself once RAM is write-protected).
    fn checkpoint_background(
        &self,
        q: &mut Qmp,
        actions: &Value,
        mem_uri: &str,
        journal: &mut dyn Journal,
    ) -> Result<(PauseTimes, Value)> {
        let qmp_path = q.path().to_path_buf();
        let paused_id =
            journal.will_create(&QemuResource::OriginalPaused { qmp: qmp_path }.into())?;
        q.clear_events();
        let wall = Instant::now();
        q.execute("stop", json!({}))?;
        let res = (|| {
            let stop = q.wait_event("the original to stop", Duration::from_secs(30), &|e| {
                e.name == "STOP"
            })?;
            journal.milestone("checkpoint:paused")?;
            let t = Instant::now();
            q.execute("transaction", json!({ "actions": actions }))?;
            let disk_ms = t.elapsed().as_secs_f64() * 1000.0;
            journal.milestone("checkpoint:disks-snapshotted")?;
            q.execute("migrate", json!({ "uri": mem_uri }))?;
            let ev = q.wait_event("the original to resume", Duration::from_secs(120), &|e| {
                e.name == "RESUME" || matches!(migration_status(e), Some("failed" | "cancelled"))
            })?;
            if ev.name != "RESUME" {
                return Err(BackendError::Checkpoint(format!(
                    "memory save failed: {}",
                    ev.data
                )));
            }
            let total_ms = (ev.timestamp_us - stop.timestamp_us) as f64 / 1000.0;
            Ok(PauseTimes {
                total_ms,
                disk_snapshot_ms: disk_ms,
                memory_ms: (total_ms - disk_ms).max(0.0),
            })
        })();
        match res {
            Ok(p) => {
                journal.removed(paused_id)?;
                tracing::debug!(
                    wall_ms = wall.elapsed().as_millis() as u64,
                    "original resumed"
                );
                let done = q.wait_event(
                    "the memory image to be written",
                    self.memory_save_timeout,
                    &|e| {
                        matches!(
                            migration_status(e),
                            Some("completed" | "failed" | "cancelled")
                        )
                    },
                )?;
                Ok((p, done.data))
            }
            Err(e) => {
                // Every path out of the checkpoint resumes the original.
                if let Err(e2) = Self::resume_if_paused(q) {
                    tracing::error!(
                        "could not resume the original after a failed checkpoint: {e2}"
                    );
                    return Err(e);
                }
                journal.removed(paused_id)?;
                Err(e)
            }
        }
    }

    /// Memory + disks with `pause-before-switchover`: RAM is sent while the VM
    /// runs; QEMU pauses it before the switch, the disks are snapshotted, then
    /// the migration ends and the VM continues.
    /// Waits until QEMU pauses the VM before the switch-over. A guest that
    /// dirties memory faster than it can be copied never gets there within a
    /// tight downtime target: every 10 s without it, the target doubles (up
    /// to 2 s), so the checkpoint always ends, with the pause that was needed.
    fn wait_pre_switchover(&self, q: &mut Qmp) -> Result<()> {
        let start = Instant::now();
        let mut downtime = self.downtime_limit_ms.max(1);
        loop {
            let ev = q.wait_event(
                "the memory save to reach pre-switchover",
                Duration::from_secs(10),
                &|e| {
                    matches!(
                        migration_status(e),
                        Some("pre-switchover" | "failed" | "cancelled")
                    )
                },
            );
            match ev {
                Ok(ev) if migration_status(&ev) == Some("pre-switchover") => return Ok(()),
                Ok(ev) => {
                    return Err(BackendError::Checkpoint(format!(
                        "memory save failed: {}",
                        ev.data
                    )))
                }
                Err(BackendError::Timeout { .. }) if start.elapsed() < self.memory_save_timeout => {
                    downtime = (downtime * 2).min(2000);
                    tracing::warn!(
                        downtime_ms = downtime,
                        "the memory copy does not converge; raising QEMU's downtime target"
                    );
                    q.execute(
                        "migrate-set-parameters",
                        json!({ "downtime-limit": downtime }),
                    )?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn checkpoint_pre_switchover(
        &self,
        q: &mut Qmp,
        actions: &Value,
        mem_uri: &str,
        journal: &mut dyn Journal,
    ) -> Result<(PauseTimes, Value)> {
        let paused_id = journal.will_create(
            &QemuResource::OriginalPaused {
                qmp: q.path().to_path_buf(),
            }
            .into(),
        )?;
        q.clear_events();
        q.execute("migrate", json!({ "uri": mem_uri }))?;
        let res = (|| {
            self.wait_pre_switchover(q)?;
            let stop = q.wait_event("the original to stop", Duration::from_secs(30), &|e| {
                e.name == "STOP"
            })?;
            journal.milestone("checkpoint:paused")?;
            let t = Instant::now();
            q.execute("transaction", json!({ "actions": actions }))?;
            let disk_ms = t.elapsed().as_secs_f64() * 1000.0;
            journal.milestone("checkpoint:disks-snapshotted")?;
            q.execute("migrate-continue", json!({"state": "pre-switchover"}))?;
            let done = q.wait_event(
                "the memory image to be written",
                Duration::from_secs(300),
                &|e| {
                    matches!(
                        migration_status(e),
                        Some("completed" | "failed" | "cancelled")
                    )
                },
            )?;
            if migration_status(&done) != Some("completed") {
                return Err(BackendError::Checkpoint(format!(
                    "memory save failed: {}",
                    done.data
                )));
            }
            cont(q)?;
            let resume = q.wait_event("the original to resume", Duration::from_secs(30), &|e| {
                e.name == "RESUME"
            })?;
            let total_ms = (resume.timestamp_us - stop.timestamp_us) as f64 / 1000.0;
            Ok((
                PauseTimes {
                    total_ms,
                    disk_snapshot_ms: disk_ms,
                    memory_ms: (total_ms - disk_ms).max(0.0),
                },
                done.data,
            ))
        })();
        match res {
            Ok(r) => {
                journal.removed(paused_id)?;
                Ok(r)
            }
            Err(e) => {
                if let Err(e2) = Self::resume_if_paused(q) {
                    tracing::error!(
                        "could not resume the original after a failed checkpoint: {e2}"
                    );
                    return Err(e);
                }
                journal.removed(paused_id)?;
                Err(e)
            }
        }
    }
}

/// Where the original's write overlay of `disk` goes: beside its image when
/// that is a file (same file system, same owner's folder), or, for a block
/// device (a logical volume: beside it is devtmpfs, RAM), in
/// `STATE_DIR/originals/`, which no run's clean-up removes (a failed merge
/// leaves the original running on it).
fn overlay_path_for(base: &Path, run_tag: &str, work_dir: &Path, device: &str) -> PathBuf {
    use std::os::unix::fs::FileTypeExt;
    let on_device = std::fs::metadata(base).is_ok_and(|m| m.file_type().is_block_device());
    if on_device {
        let state_dir = work_dir.parent().and_then(Path::parent).unwrap_or(work_dir);
        let safe: String = device
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        return state_dir
            .join("originals")
            .join(format!("{run_tag}-{safe}.qcow2"));
    }
    let dir = base.parent().unwrap_or(Path::new("/"));
    let name = base
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.join(format!(".{name}.coldclone-{run_tag}.qcow2"))
}

/// The checkpoint's files (memory image, original overlays) on real file
/// systems with room (space.rs), checked before anything is paused.
fn check_checkpoint_room(
    vm: &VmInfo,
    qv: &QemuVm,
    work_dir: &Path,
    overlays: &[PathBuf],
) -> Result<()> {
    let mut needs = vec![space::Need {
        dir: work_dir.to_path_buf(),
        bytes: vm.memory_bytes.saturating_add(space::RESERVE),
        what: "the memory image".into(),
    }];
    for (d, o) in qv.disks.iter().zip(overlays) {
        let dir = o.parent().unwrap_or(Path::new("/")).to_path_buf();
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io_err(&dir))?;
        }
        needs.push(space::Need {
            dir,
            bytes: space::overlay_need(d.bytes),
            what: format!("the original's write overlay of {}", d.name),
        });
    }
    space::check(&needs)
}

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

impl Hypervisor for QemuBackend {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn inspect(&self, vm: &VmLocator) -> Result<VmInfo> {
        let VmLocator::Qemu { qmp: path, .. } = vm else {
            return Err(BackendError::Unsupported(
                "the QEMU backend was handed another backend's VM".into(),
            ));
        };
        let mut q = Qmp::connect(path)?;
        let pid = q.peer_pid()?;
        // Before anything of the peer's is used: its uid and its executable.
        let exe = check_peer(&q, self.vm_uid)?;
        let argv = util::process_cmdline(pid).ok_or_else(|| {
            BackendError::Unsupported(format!(
                "cannot read the command line of QEMU process {pid}"
            ))
        })?;
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))
            .map_err(io_err(Path::new("/proc/PID/cwd")))?;
        let options = cmdline::parse_in(argv.get(1..).unwrap_or(&[]), Some(&cwd))?;
        let agent = cmdline::agent_channel(&options).map(|mut a| {
            a.socket = a.socket.map(|p| absolute(&cwd, &p));
            a
        });
        let name_v = q.execute("query-name", json!({}))?;
        let name = match str_of(&name_v, "name") {
            n if !n.is_empty() => n,
            _ => path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        let running = q.status()? == "running";
        let mem = q.execute("query-memory-size-summary", json!({}))?;
        let memory_bytes = mem.get("base-memory").and_then(Value::as_u64).unwrap_or(0);
        let blocks = q.execute("query-block", json!({}))?;
        let mut disks = Vec::new();
        for b in blocks.as_array().into_iter().flatten() {
            let Some(ins) = b.get("inserted") else {
                continue;
            };
            if ins.get("ro").and_then(Value::as_bool).unwrap_or(false) {
                continue;
            }
            let drive = str_of(b, "device");
            let node = str_of(ins, "node-name");
            let qdev = str_of(b, "qdev");
            // A -blockdev disk: no drive id; its device's qdev and its format node.
            let blockdev = drive.is_empty();
            if blockdev && (node.is_empty() || qdev.is_empty()) {
                return Err(BackendError::Unsupported(format!(
                    "a writable disk with neither a drive id nor a named node and device ({b})"
                )));
            }
            let (device, disk_name) = if blockdev {
                (qdev, node.clone())
            } else {
                (drive.clone(), drive)
            };
            let bytes = ins
                .get("image")
                .and_then(|i| i.get("virtual-size"))
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let file = absolute(&cwd, Path::new(&str_of(ins, "file")));
            if str_of(ins, "file").starts_with("json:") || !file.exists() {
                return Err(BackendError::Unsupported(format!(
                    "disk {device} is not a plain file ({})",
                    str_of(ins, "file")
                )));
            }
            disks.push(QemuDisk {
                device,
                name: disk_name,
                blockdev,
                node_name: node,
                file,
                format: str_of(ins, "drv"),
                bytes,
            });
        }
        // Derive the clone's command line now, so that an unsupported VM fails
        // before anything is created or paused.
        let overlays: BTreeMap<String, String> =
            disks.iter().map(|d| (d.name.clone(), "x".into())).collect();
        let probe = cmdline::clone_command(
            &options,
            &cmdline::CloneSpec {
                name: "probe",
                uuid: "probe",
                qmp_socket: "probe",
                pidfile: "probe",
                console_log: "probe",
                disk_overlays: &overlays,
                tap_prefix: "probe",
                incoming: true,
                agent_socket: Some("probe"),
            },
        )?;
        Ok(VmInfo {
            name,
            backend: "qemu",
            running,
            memory_bytes,
            nics: probe.taps.len(),
            disks: disks
                .iter()
                .map(|d| DiskInfo {
                    name: d.name.clone(),
                    file: d.file.clone(),
                    format: d.format.clone(),
                    read_only: false,
                    bytes: d.bytes,
                })
                .collect(),
            detail: Opaque::new(QemuVm {
                qmp: path.clone(),
                pid,
                exe,
                cwd,
                options,
                disks,
                agent,
            }),
        })
    }

    fn checkpoint(
        &self,
        vm: &VmInfo,
        work_dir: &Path,
        journal: &mut dyn Journal,
    ) -> Result<Checkpoint> {
        let qv = qemu_vm(vm)?;
        if !vm.running {
            return Err(BackendError::Checkpoint(
                "the VM is not running (paused or stopped); coldclone backs up running VMs".into(),
            ));
        }
        let mut q = Qmp::connect(&qv.qmp)?;
        let tag = work_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| util::random_hex(4));
        let memory_image = work_dir.join("memory.bin");
        let overlays: Vec<PathBuf> = qv
            .disks
            .iter()
            .map(|d| overlay_path_for(&d.file, &tag, work_dir, &d.name))
            .collect();
        check_checkpoint_room(vm, qv, work_dir, &overlays)?;
        let mem_uri = format!("exec:cat > {}", shell_quote(&memory_image));

        // The configured method; background-snapshot falls back to
        // pause-before-switchover where QEMU refuses it.
        let mut method = match self.method {
            CheckpointMethod::BackgroundSnapshot => "background-snapshot",
            CheckpointMethod::PreSwitchover => "pause-before-switchover",
            // Write-protecting a large RAM inside the pause costs more than
            // the last dirty pages do (performance.md).
            CheckpointMethod::Auto if vm.memory_bytes >= AUTO_PRE_SWITCHOVER_BYTES => {
                "pause-before-switchover"
            }
            CheckpointMethod::Auto => "background-snapshot",
        };
        let mut caps = current_capabilities(
            &mut q,
            &["events", "background-snapshot", "pause-before-switchover"],
        )?;
        let params = q.execute("query-migrate-parameters", json!({}))?;
        let old_bandwidth = params.get("max-bandwidth").and_then(Value::as_u64);
        let old_downtime = params.get("downtime-limit").and_then(Value::as_u64);
        let mig_id = journal.will_create(
            &QemuResource::OriginalMigration {
                qmp: qv.qmp.clone(),
                capabilities: caps.clone(),
                max_bandwidth: old_bandwidth,
                downtime_limit: old_downtime,
            }
            .into(),
        )?;
        let want_bg = vec![
            ("events".to_string(), true),
            ("background-snapshot".to_string(), true),
        ];
        let bg = if method == "background-snapshot" {
            set_capabilities(&mut q, &want_bg)
        } else {
            Err(BackendError::Unsupported("not chosen".into()))
        };
        if let Err(e) = bg {
            if method == "background-snapshot" {
                tracing::warn!(
                    "background-snapshot unavailable ({e}); using pause-before-switchover"
                );
            }
            method = "pause-before-switchover";
            set_capabilities(
                &mut q,
                &[
                    ("events".to_string(), true),
                    ("pause-before-switchover".to_string(), true),
                ],
            )?;
        }
        // RAM is written to a local file: QEMU's default 128 MiB/s cap only slows it.
        q.execute(
            "migrate-set-parameters",
            json!({"max-bandwidth": 1u64 << 40, "downtime-limit": self.downtime_limit_ms}),
        )?;

        let mut disks = Vec::new();
        let mut state = QemuCheckpoint::default();
        let mut actions = Vec::new();
        for (i, d) in qv.disks.iter().enumerate() {
            let overlay = overlays[i].clone();
            let overlay_node = format!("cc-{tag}-{i}");
            // The bitmaps go in the same transaction: they start, and the earlier one
            // stops, at the very instant the image is frozen. Journaled before the
            // overlay, so that a clean-up undoes them after the merge-back, once the
            // image is writable again (QEMU refuses to remove a read-only node's bitmap).
            let mut bitmap_actions = Vec::new();
            if !d.node_name.is_empty() {
                let (plan, acts) =
                    bitmap::plan(&mut q, &qv.qmp, qv.pid, &d.node_name, &tag, journal)?;
                bitmap_actions = acts;
                state.bitmaps.push((d.name.clone(), plan));
            }
            let id = journal.will_create(
                &QemuResource::OriginalOverlay {
                    qmp: qv.qmp.clone(),
                    original_pid: qv.pid,
                    device: d.device.clone(),
                    base_node: d.node_name.clone(),
                    base_file: d.file.clone(),
                    overlay_file: overlay.clone(),
                    overlay_node: overlay_node.clone(),
                }
                .into(),
            )?;
            if d.blockdev {
                // As libvirt does: the overlay made and opened first (its header
                // naming the frozen image, which it does not open: `backing: null`),
                // then attached over the format node inside the transaction.
                add_overlay_node(&mut q, d, &overlay, &overlay_node)?;
                actions.push(json!({"type": "blockdev-snapshot", "data": {
                    "node": d.node_name, "overlay": overlay_node}}));
            } else {
                actions.push(json!({"type": "blockdev-snapshot-sync", "data": {
                    "device": d.device, "snapshot-file": overlay, "snapshot-node-name": overlay_node,
                    "format": "qcow2", "mode": "absolute-paths"}}));
            }
            actions.extend(bitmap_actions);

            disks.push(FrozenDisk {
                name: d.name.clone(),
                frozen_file: d.file.clone(),
                format: d.format.clone(),
                bytes: d.bytes,
            });
            state.overlays.push(OriginalOverlay {
                journal_id: id,
                device: d.device.clone(),
                overlay_node: overlay_node.clone(),
                base_node: d.node_name.clone(),
                base_file: d.file.clone(),
                overlay,
            });
        }
        let mem_id = journal.will_create(
            &SharedResource::File {
                path: memory_image.clone(),
            }
            .into(),
        )?;
        let actions = Value::Array(actions);
        let result = if method == "background-snapshot" {
            self.checkpoint_background(&mut q, &actions, &mem_uri, journal)
        } else {
            self.checkpoint_pre_switchover(&mut q, &actions, &mem_uri, journal)
        };
        // Put the original's migration settings back on every path.
        let restored = restore_migration_settings(&mut q, &caps, old_bandwidth, old_downtime);
        let (pause, _mig) = match result {
            Ok(r) => r,
            Err(e) => {
                // Earlier bitmaps record again before any overlay commits into the image.
                let plans: Vec<_> = state.bitmaps.iter().map(|(_, p)| p.clone()).collect();
                if let Err(e2) = bitmap::reenable(&mut q, &plans, journal) {
                    tracing::error!("could not enable the earlier dirty bitmaps again: {e2}");
                }
                self.release_partial(&mut q, &state, journal);
                let _ = util::remove_file_if_exists(&memory_image).map(|_| journal.removed(mem_id));
                if restored.is_ok() {
                    let _ = journal.removed(mig_id);
                }
                return Err(e);
            }
        };
        restored?;
        journal.removed(mig_id)?;
        caps.clear();
        journal.milestone("checkpoint:memory-saved")?;
        let plans: Vec<_> = state.bitmaps.iter().map(|(_, p)| p.clone()).collect();
        let read = bitmap::read_and_reenable(&mut q, &qv.qmp, qv.pid, &plans, work_dir, journal)?;
        let mut change_maps = BTreeMap::new();
        for (device, p) in &state.bitmaps {
            let since = read
                .get(&p.node)
                .into_iter()
                .flatten()
                .map(|(name, ranges)| (format!("qemu-bitmap:{name}"), ranges.clone()))
                .collect();
            change_maps.insert(
                device.clone(),
                crate::DiskChangeMaps {
                    started: format!("qemu-bitmap:{}", p.started),
                    since,
                    ..Default::default()
                },
            );
        }
        let memory_image_bytes = std::fs::metadata(&memory_image)
            .map_err(io_err(&memory_image))?
            .len();
        Ok(Checkpoint {
            method,
            memory_image,
            memory_image_bytes,
            pause,
            disks,
            detail: Opaque::new(state),
            change_maps,
            ..Default::default()
        })
    }

    fn clone_writes(
        &self,
        _clone: &PausedClone,
        disk: &CloneDisk,
        _journal: &mut dyn Journal,
    ) -> Result<Option<Vec<crate::ChangedRange>>> {
        bitmap::clone_writes(&disk.overlay).map(Some)
    }

    fn settle_change_maps(
        &self,
        vm: &VmInfo,
        checkpoint: &Checkpoint,
        stored: bool,
        journal: &mut dyn Journal,
    ) -> Result<()> {
        let Some(state) = checkpoint.detail.get::<QemuCheckpoint>() else {
            return Ok(());
        };
        if !stored || state.bitmaps.is_empty() {
            return Ok(());
        }
        let _ = vm;
        // The started bitmaps now belong to the next run, not to this run's clean-up;
        // the earlier ones go at the next checkpoint, while the image is writable.
        for (_, p) in &state.bitmaps {
            journal.removed(p.started_journal_id)?;
        }
        Ok(())
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
        let qv = qemu_vm(vm)?;
        let mut overlays = BTreeMap::new();
        let mut clone_disks = Vec::new();
        for d in &checkpoint.disks {
            let overlay = work_dir.join(format!("clone-{}.qcow2", d.name.replace('/', "_")));
            journal.will_create(
                &SharedResource::File {
                    path: overlay.clone(),
                }
                .into(),
            )?;
            let mut c = Command::new("qemu-img");
            // -u: the frozen image is held by the running original; its size is known.
            c.args(["create", "-q", "-u", "-f", "qcow2", "-F", &d.format, "-b"])
                .arg(&d.frozen_file)
                .arg(&overlay)
                .arg(d.bytes.to_string());
            run_tool(c)?;
            overlays.insert(d.name.clone(), overlay.display().to_string());
            clone_disks.push(CloneDisk {
                name: d.name.clone(),
                overlay,
                bytes: d.bytes,
            });
        }
        let qmp_path = work_dir.join("clone.qmp");
        let console_log = work_dir.join("clone-console.log");
        let qemu_log = work_dir.join("clone-qemu.log");
        let pidfile = work_dir.join("clone.pid");
        // In the run folder (removed with it): the clone's agent, never the original's.
        let agent_socket = qv.agent.as_ref().map(|_| work_dir.join("clone-agent.sock"));
        let agent_arg = agent_socket.as_ref().map(|p| p.display().to_string());
        let uuid = util::random_uuid();
        let cmd = cmdline::clone_command(
            &qv.options,
            &cmdline::CloneSpec {
                name: clone_name,
                uuid: &uuid,
                qmp_socket: &qmp_path.display().to_string(),
                pidfile: &pidfile.display().to_string(),
                console_log: &console_log.display().to_string(),
                disk_overlays: &overlays,
                tap_prefix: &net.tap_prefix,
                incoming: true,
                agent_socket: agent_arg.as_deref(),
            },
        )?;
        let (mut child, process_id, tap_ids) =
            spawn_journaled(qv, &cmd, net, clone_name, &qmp_path, &qemu_log, journal)?;
        let mut clone = PausedClone {
            name: clone_name.to_string(),
            taps: cmd.taps.clone(),
            disks: clone_disks,
            console_log,
            detail: OpaqueMut::new(QemuClone {
                qmp: None,
                child: None,
                marker: clone_name.to_string(),
                process_journal_id: process_id,
                tap_journal_ids: tap_ids,
                namespace: net.namespace.clone(),
                stopped: false,
                agent: agent_socket,
            }),
        };
        let connected = Qmp::connect_retry(&qmp_path, self.clone_start_timeout, &mut || {
            matches!(child.try_wait(), Ok(None))
        });
        qemu_clone(&mut clone.detail)?.child = Some(child);
        let mut q = match connected {
            Ok(q) => q,
            Err(e) => {
                let tail = std::fs::read_to_string(&qemu_log).unwrap_or_default();
                return Err(BackendError::Clone(format!(
                    "the clone QEMU did not come up ({e}); its log says: {}",
                    tail.trim()
                )));
            }
        };
        journal.milestone("restore:clone-started")?;
        for t in &cmd.taps {
            network_isolation::attach_port(&net.namespace, &net.bridge, t)?;
        }
        set_capabilities(&mut q, &[("events".to_string(), true)])?;
        q.execute(
            "migrate-incoming",
            json!({"uri": format!("exec:cat {}", shell_quote(&checkpoint.memory_image))}),
        )?;
        let ev = q.wait_event(
            "the clone to load the memory image",
            self.memory_save_timeout,
            &|e| matches!(migration_status(e), Some("completed" | "failed")),
        )?;
        if migration_status(&ev) != Some("completed") {
            return Err(BackendError::Clone(format!(
                "loading the memory image failed: {}",
                ev.data
            )));
        }
        let st = q.status()?;
        if st == "running" {
            // Never happens with -incoming defer; if it did, isolation was not checked yet.
            return Err(BackendError::Clone(
                "the clone started running before isolation was verified".into(),
            ));
        }
        journal.milestone("restore:memory-loaded")?;
        qemu_clone(&mut clone.detail)?.qmp = Some(q);
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
        let q = qemu_clone(&mut clone.detail)?
            .qmp
            .as_mut()
            .ok_or_else(|| BackendError::Clone("no QMP connection to the clone".into()))?;
        cont(q)?;
        q.wait_event("the clone to run", Duration::from_secs(30), &|e| {
            e.name == "RESUME"
        })?;
        Ok(())
    }

    fn request_stop(&self, clone: &mut PausedClone, method: StopMethod) -> Result<()> {
        if method != StopMethod::Acpi {
            return Err(BackendError::Unsupported(
                "QEMU guests are stopped with the ACPI power button".into(),
            ));
        }
        let q = qemu_clone(&mut clone.detail)?
            .qmp
            .as_mut()
            .ok_or_else(|| BackendError::Clone("no QMP connection to the clone".into()))?;
        q.execute("system_powerdown", json!({})).map(|_| ())
    }

    fn wait_stopped(&self, clone: &mut PausedClone, timeout: Duration) -> Result<CloneOutcome> {
        let start = Instant::now();
        let mut outcome = CloneOutcome::Killed;
        let c = qemu_clone(&mut clone.detail)?;
        let clone_pid = c.child.as_ref().map(Child::id);
        let agent = c.agent.clone();
        if let Some(q) = c.qmp.as_mut() {
            match wait_guest_shutdown(q, timeout)? {
                Some(true) => outcome = CloneOutcome::StoppedByGuest,
                Some(false) => {}
                // The button was ignored: ask the clone's own guest agent, once, for
                // another bounded wait (as the libvirt backend does).
                None => {
                    if let Some(sock) = agent {
                        tracing::warn!(
                            "the clone ignored the ACPI power button; asking its guest agent"
                        );
                        match agent_shutdown(&sock, clone_pid, self.vm_uid) {
                            Ok(()) => {
                                if wait_guest_shutdown(q, timeout)? == Some(true) {
                                    outcome = CloneOutcome::StoppedByGuestAgent;
                                }
                            }
                            Err(e) => tracing::warn!("the guest agent's shutdown failed: {e}"),
                        }
                    }
                }
            }
        }
        let child = qemu_clone(&mut clone.detail)?.child.as_mut();
        if let Some(child) = child {
            let left = timeout
                .saturating_sub(start.elapsed())
                .max(Duration::from_secs(5));
            let t = Instant::now();
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if t.elapsed() < left => std::thread::sleep(Duration::from_millis(20)),
                    _ => {
                        outcome = CloneOutcome::Killed;
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        qemu_clone(&mut clone.detail)?.qmp = None;
        qemu_clone(&mut clone.detail)?.stopped = true;
        Ok(outcome)
    }

    fn destroy_clone(&self, clone: &mut PausedClone, journal: &mut dyn Journal) -> Result<()> {
        let taps = clone.taps.clone();
        let d = qemu_clone(&mut clone.detail)?;
        d.qmp = None;
        if let Some(mut child) = d.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        for pid in util::find_processes_with_marker(&d.marker) {
            util::kill_and_wait(pid, Duration::from_secs(10));
        }
        journal.removed(d.process_journal_id)?;
        for (t, id) in taps.iter().zip(d.tap_journal_ids.iter()) {
            network_isolation::delete_link(&d.namespace, t)?;
            journal.removed(*id)?;
        }
        d.stopped = true;
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
        let qv = qemu_vm(vm)?;
        let mut q = Qmp::connect(&qv.qmp);
        let state: &QemuCheckpoint = checkpoint.detail.get().ok_or_else(|| {
            BackendError::Unsupported(
                "the QEMU backend was handed another backend's checkpoint".into(),
            )
        })?;
        let mut first_err = None;
        for o in &state.overlays {
            let r = match q.as_mut() {
                Ok(q) => merge_back_live(
                    q,
                    &o.device,
                    &o.base_node,
                    &o.base_file,
                    &o.overlay,
                    &o.overlay_node,
                ),
                Err(_) => merge_back_offline(qv.pid, &o.overlay, &o.base_file),
            };
            match r {
                Ok(()) => journal.removed(o.journal_id)?,
                Err(e) => {
                    tracing::error!(
                        disk = o.device,
                        "could not merge the original's overlay back: {e}"
                    );
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        journal.milestone("cleanup:original-chain-restored")?;
        Ok(())
    }

    fn vm_definition(&self, vm: &VmInfo) -> Result<Option<crate::VmDefinition>> {
        let qv = qemu_vm(vm)?;
        let text = serde_json::to_string_pretty(&serde_json::json!({
            "program": qv.exe,
            "cwd": qv.cwd,
            "argv": cmdline::definition_argv(&qv.options),
        }))
        .map_err(|e| BackendError::Unsupported(format!("the VM's definition: {e}")))?;
        Ok(Some(crate::VmDefinition {
            kind: crate::VmDefinitionKind::QemuCommandLine,
            text,
        }))
    }

    fn stop_methods(&self, _vm: &VmInfo) -> StopMethod {
        StopMethod::Acpi
    }

    fn check_quiesce(&self, vm: &VmInfo) -> Result<()> {
        self.original_agent(qemu_vm(vm)?).map(|_| ())
    }

    fn quiesced_snapshot(
        &self,
        vm: &VmInfo,
        checkpoint: &Checkpoint,
        work_dir: &Path,
        freeze_timeout: Duration,
        journal: &mut dyn Journal,
    ) -> Result<crate::QuiescedSnapshot> {
        let qv = qemu_vm(vm)?;
        let socket = self.original_agent(qv)?;
        let state: &QemuCheckpoint = checkpoint.detail.get().ok_or_else(|| {
            BackendError::Unsupported(
                "the QEMU backend was handed another backend's checkpoint".into(),
            )
        })?;
        let mut q = Qmp::connect(&qv.qmp)?;
        if q.peer_pid()? != qv.pid {
            return Err(BackendError::Checkpoint(format!(
                "another process serves {} now; the original (pid {}) is gone",
                qv.qmp.display(),
                qv.pid
            )));
        }
        let tag = format!(
            "{}-q",
            work_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| util::random_hex(4))
        );
        // The new overlays, made and journaled before the freeze: frozen, the guest
        // waits only for the snapshot transaction. Each is undone like the checkpoint's
        // (committed back into the checkpoint's overlay, which then goes back into the image).
        let mut made: Vec<(u64, &OriginalOverlay, PathBuf, String)> = Vec::new();
        let mut actions = Vec::new();
        let prepared = (|| {
            for (i, o) in state.overlays.iter().enumerate() {
                let d = qv
                    .disks
                    .iter()
                    .find(|d| d.device == o.device)
                    .ok_or_else(|| {
                        BackendError::Checkpoint(format!("disk {} is not the original's", o.device))
                    })?;
                if active_file(&mut q, &o.device)?.as_deref() != Some(o.overlay.as_path()) {
                    return Err(BackendError::Checkpoint(format!(
                        "{} no longer writes into the checkpoint's overlay {}",
                        o.device,
                        o.overlay.display()
                    )));
                }
                let overlay = overlay_path_for(&o.base_file, &tag, work_dir, &o.device);
                let node = format!("cc-{tag}-{i}");
                let id = journal.will_create(
                    &QemuResource::OriginalOverlay {
                        qmp: qv.qmp.clone(),
                        original_pid: qv.pid,
                        device: o.device.clone(),
                        base_node: o.overlay_node.clone(),
                        base_file: o.overlay.clone(),
                        overlay_file: overlay.clone(),
                        overlay_node: node.clone(),
                    }
                    .into(),
                )?;
                made.push((id, o, overlay.clone(), node.clone()));
                if d.blockdev {
                    let top = QemuDisk {
                        file: o.overlay.clone(),
                        format: "qcow2".into(),
                        ..d.clone()
                    };
                    add_overlay_node(&mut q, &top, &overlay, &node)?;
                    actions.push(json!({"type": "blockdev-snapshot", "data": {
                        "node": o.overlay_node, "overlay": node}}));
                } else {
                    actions.push(json!({"type": "blockdev-snapshot-sync", "data": {
                        "device": o.device, "snapshot-file": overlay, "snapshot-node-name": node,
                        "format": "qcow2", "mode": "absolute-paths"}}));
                }
            }
            Ok(())
        })();
        let undo_made =
            |q: &mut Qmp,
             journal: &mut dyn Journal,
             made: &[(u64, &OriginalOverlay, PathBuf, String)]| {
                for (id, o, overlay, node) in made.iter().rev() {
                    match merge_back_live(q, &o.device, &o.overlay_node, &o.overlay, overlay, node) {
                    Ok(()) => {
                        let _ = journal.removed(*id);
                    }
                    Err(e) => tracing::error!(
                        disk = o.device,
                        "could not remove the quiesced snapshot's overlay: {e}; the clean-up retries"
                    ),
                }
                }
            };
        if let Err(e) = prepared {
            undo_made(&mut q, journal, &made);
            return Err(e);
        }
        let peer = crate::agent::Peer {
            pid: Some(qv.pid),
            uid: self.vm_uid,
        };
        // Journaled before the freeze: a run killed while the guest is frozen leaves
        // `recover` what it needs to thaw it.
        let frozen_id = journal.will_create(
            &QemuResource::GuestFrozen {
                qmp: qv.qmp.clone(),
                original_pid: qv.pid,
                agent_socket: socket.clone(),
                vm_uid: self.vm_uid,
            }
            .into(),
        )?;
        journal.milestone("quiesce:freezing")?;
        let mut agent = None;
        let froze =
            crate::agent::Agent::connect(&socket, &peer, freeze_timeout.min(AGENT_SYNC_TIMEOUT))
                .and_then(|mut a| {
                    let n = a.fsfreeze_freeze(freeze_timeout);
                    agent = Some(a);
                    n
                });
        let frozen_at = Instant::now();
        let snapshot = match &froze {
            Ok(n) => {
                tracing::info!(filesystems = n, "the original's file systems are frozen");
                journal.milestone("quiesce:frozen")?;
                let r = q.execute("transaction", json!({ "actions": actions }));
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
        // Thaw at once, on every path: also after a failed or timed-out freeze (qemu-ga
        // may have frozen some file systems, or still be freezing).
        let thawed = thaw(agent.as_mut(), &socket, &peer);
        let frozen_ms = frozen_at.elapsed().as_secs_f64() * 1000.0;
        match &thawed {
            Ok(n) => {
                journal.removed(frozen_id)?;
                journal.milestone("quiesce:thawed")?;
                tracing::info!(thawed = n, frozen_ms, "the original's file systems are thawed");
            }
            Err(e) => tracing::error!(
                "thawing the original's file systems failed: {e}; the clean-up (or `coldclone recover`) retries"
            ),
        }
        let n = match (froze, snapshot) {
            (Ok(n), Some(Ok(_))) => n,
            (Ok(_), Some(Err(e))) => {
                undo_made(&mut q, journal, &made);
                return Err(e);
            }
            (Ok(_), None) => {
                undo_made(&mut q, journal, &made);
                return Err(BackendError::Checkpoint(
                    "the quiesced disk snapshot was not taken".into(),
                ));
            }
            (Err(e), _) => {
                undo_made(&mut q, journal, &made);
                return Err(BackendError::Checkpoint(format!(
                    "the original's file systems could not be frozen through its guest agent ({e}){}; no quiesced copy was taken",
                    match &thawed {
                        Ok(_) => "; thawed again",
                        Err(_) => "; the thaw failed too",
                    }
                )));
            }
        };
        if let Err(e) = thawed {
            // The snapshot is good, but a guest left frozen must not pass unnoticed.
            return Err(BackendError::Checkpoint(format!(
                "the original's file systems were frozen for the snapshot but could not be thawed: {e}"
            )));
        }
        let disks = made
            .iter()
            .map(|(_, o, _, _)| {
                let bytes = qv
                    .disks
                    .iter()
                    .find(|d| d.device == o.device)
                    .map(|d| d.bytes)
                    .unwrap_or(0);
                let name = qv
                    .disks
                    .iter()
                    .find(|d| d.device == o.device)
                    .map(|d| d.name.clone())
                    .unwrap_or_else(|| o.device.clone());
                (
                    CloneDisk {
                        name,
                        overlay: o.overlay.clone(),
                        bytes,
                    },
                    // The checkpoint's overlay, frozen now, over the image: read in place.
                    crate::DiskAccess::Image {
                        path: o.overlay.clone(),
                        format: crate::image_export::ImageFormat::Qcow2,
                    },
                )
            })
            .collect();
        Ok(crate::QuiescedSnapshot {
            disks,
            frozen_filesystems: n,
            frozen_ms,
        })
    }

    fn can_boot_test(&self) -> bool {
        true
    }

    fn boot_test(
        &self,
        vm: &VmInfo,
        s: &crate::BootSpec,
        journal: &mut dyn Journal,
    ) -> Result<crate::BootTest> {
        // The inherent one, in boot.rs.
        let (images, net, name, dir) = (s.images, s.net, s.name, s.work_dir);
        QemuBackend::boot_test(
            self,
            vm,
            images,
            net,
            name,
            dir,
            s.heartbeat,
            s.timeout,
            journal,
        )
    }

    fn memory_actual(&self, vm: &VmInfo) -> Result<Option<u64>> {
        let mut q = Qmp::connect(&qemu_vm(vm)?.qmp)?;
        match q.execute("query-balloon", json!({})) {
            Ok(v) => Ok(v.get("actual").and_then(Value::as_u64)),
            // No balloon device: the guest has all its memory.
            Err(BackendError::Qemu(QemuError::QmpCommand { class, .. }))
                if class == "DeviceNotActive" =>
            {
                Ok(Some(vm.memory_bytes))
            }
            Err(e) => Err(e),
        }
    }

    fn export_frozen_disk(&self, disk: &FrozenDisk, dest: &Path) -> Result<()> {
        // -U: the frozen image is the running original's backing file.
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

    fn balloon_supported(&self, vm: &VmInfo) -> bool {
        qemu_vm(vm)
            .and_then(|qv| Qmp::connect(&qv.qmp))
            .and_then(|mut q| q.execute("query-balloon", json!({})))
            .is_ok()
    }

    fn balloon(&self, vm: &VmInfo, target_bytes: u64, journal: &mut dyn Journal) -> Result<u64> {
        let qmp = qemu_vm(vm)?.qmp.clone();
        let mut q = Qmp::connect(&qmp)?;
        let before = match q.execute("query-balloon", json!({})) {
            Ok(v) => v
                .get("actual")
                .and_then(Value::as_u64)
                .unwrap_or(vm.memory_bytes),
            Err(BackendError::Qemu(QemuError::QmpCommand { class, .. }))
                if class == "DeviceNotActive" =>
            {
                return Err(BackendError::Unsupported(
                    "the VM has no balloon device (-device virtio-balloon-pci)".into(),
                ))
            }
            Err(e) => return Err(e),
        };
        journal.will_create(
            &QemuResource::Balloon {
                qmp,
                restore_bytes: before,
            }
            .into(),
        )?;
        q.execute("balloon", json!({ "value": target_bytes }))?;
        Ok(before)
    }
}

impl QemuBackend {
    /// The original's guest agent socket, checked: the VM has an agent channel on a
    /// socket QEMU serves, and the socket file is a socket owned by root (or the VM's
    /// configured QEMU user).
    fn original_agent(&self, qv: &QemuVm) -> Result<PathBuf> {
        let refuse = |why: String| {
            BackendError::Unsupported(format!(
                "on_clone_failure = \"quiesced\" needs the VM's guest agent: {why}"
            ))
        };
        let channel = qv.agent.as_ref().ok_or_else(|| {
            refuse(format!(
                "the VM has no `-device virtserialport,name={}` channel",
                crate::agent::PORT_NAME
            ))
        })?;
        let socket = channel.socket.clone().ok_or_else(|| {
            refuse(format!(
                "its channel's chardev {} is not a unix socket QEMU serves (`-chardev socket,path=...,server=on`)",
                channel.chardev
            ))
        })?;
        let peer = crate::agent::Peer {
            pid: Some(qv.pid),
            uid: self.vm_uid,
        };
        crate::agent::check_socket(&socket, &peer).map_err(|e| refuse(e.to_string()))?;
        Ok(socket)
    }

    /// After a failed checkpoint: merge back any overlay the transaction made.
    fn release_partial(&self, q: &mut Qmp, state: &QemuCheckpoint, journal: &mut dyn Journal) {
        for o in &state.overlays {
            match merge_back_live_by_file(q, &o.device, &o.base_file, &o.overlay, &o.overlay_node) {
                Ok(()) => {
                    let _ = journal.removed(o.journal_id);
                }
                Err(e) => tracing::error!(
                    disk = o.device,
                    "could not merge back after a failed checkpoint: {e}"
                ),
            }
        }
    }
}

/// The QMP socket's peer must be QEMU run by root or by the VM's configured
/// uid: coldclone, as root, runs that peer's executable with (a rewrite of)
/// its argv for the clone, so a socket that anyone else made must not lead
/// there. Returns the executable, read from /proc/PID/exe (not argv[0]).
pub fn check_peer(q: &Qmp, vm_uid: Option<u32>) -> Result<PathBuf> {
    let (pid, uid) = q.peer_cred()?;
    if uid != 0 && Some(uid) != vm_uid {
        return Err(BackendError::Unsupported(format!(
            "the process behind QMP socket {} (pid {pid}) runs as uid {uid}, neither root nor the \
             VM's configured qemu_uid; coldclone does not run what an unknown user started",
            q.path().display()
        )));
    }
    let link = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map_err(io_err(Path::new(&format!("/proc/{pid}/exe"))))?;
    let text = link.to_string_lossy();
    if text.ends_with(" (deleted)") {
        return Err(BackendError::Unsupported(format!(
            "the QEMU behind {} (pid {pid}) runs a deleted executable ({text}); restart it",
            q.path().display()
        )));
    }
    if !is_qemu_binary(&link) {
        return Err(BackendError::Unsupported(format!(
            "the process behind QMP socket {} (pid {pid}) is {}, not a QEMU system emulator",
            q.path().display(),
            link.display()
        )));
    }
    Ok(link)
}

/// Starts a QEMU made from `vm`'s command line (a clone, or an audit's boot
/// test) in the network's namespace, its taps and process journaled first.
/// Returns the child, the process's journal id and the taps' journal ids.
pub(crate) fn spawn_journaled(
    qv: &QemuVm,
    cmd: &cmdline::CloneCommand,
    net: &CloneNetwork,
    marker: &str,
    qmp_path: &Path,
    log_path: &Path,
    journal: &mut dyn Journal,
) -> Result<(Child, u64, Vec<u64>)> {
    let mut tap_ids = Vec::new();
    for t in &cmd.taps {
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
    let process_id = journal.will_create(
        &SharedResource::CloneProcess {
            marker: marker.to_string(),
            qmp: qmp_path.to_path_buf(),
        }
        .into(),
    )?;
    let log = std::fs::File::create(log_path).map_err(io_err(log_path))?;
    let log2 = log.try_clone().map_err(io_err(log_path))?;
    let mut command = net.namespace.command(&qv.exe.display().to_string());
    command
        .args(&cmd.args)
        .current_dir(&qv.cwd)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    {
        use std::os::unix::process::CommandExt;
        // Its own process group: a Ctrl-C meant for coldclone must not kill
        // it behind the journal's back.
        command.process_group(0);
    }
    tracing::debug!(?command, "starting a QEMU of ours");
    let child = command.spawn().map_err(|source| BackendError::Spawn {
        command: qv.exe.display().to_string(),
        source,
    })?;
    Ok((child, process_id, tap_ids))
}

/// Finds the node of `base_file` below the active layer, then commits into it.
fn merge_back_live_by_file(
    q: &mut Qmp,
    device: &str,
    base_file: &Path,
    overlay: &Path,
    overlay_node: &str,
) -> Result<()> {
    let nodes = q.execute("query-named-block-nodes", json!({"flat": true}))?;
    let base_node = nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| qemu_path(q, &str_of(n, "file")) == base_file && str_of(n, "drv") != "file")
        .map(|n| str_of(n, "node-name"))
        .unwrap_or_default();
    if base_node.is_empty() {
        return Err(BackendError::Checkpoint(format!(
            "cannot find the block node of {} to commit {} into",
            base_file.display(),
            overlay.display()
        )));
    }
    merge_back_live(q, device, &base_node, base_file, overlay, overlay_node)
}

/// Commits the original's overlay back into its image while it runs, if the
/// overlay is its active layer; then deletes the overlay file.
fn merge_back_live(
    q: &mut Qmp,
    device: &str,
    base_node: &str,
    base_file: &Path,
    overlay: &Path,
    overlay_node: &str,
) -> Result<()> {
    let active = active_file(q, device)?;
    if active.as_deref() == Some(overlay) {
        if base_node.is_empty() {
            return merge_back_live_by_file(q, device, base_file, overlay, overlay_node);
        }
        let node = base_node;
        let job = format!("cc-commit-{}", util::random_hex(3));
        commit_overlay(q, device, node, &job)?;
        let now = active_file(q, device)?;
        if now.as_deref() != Some(base_file) {
            return Err(BackendError::Checkpoint(format!(
                "after block-commit, {device} runs on {now:?} instead of {}",
                base_file.display()
            )));
        }
    } else if overlay.exists() && active.as_deref() != Some(base_file) {
        // The original runs on something we do not know: leave everything.
        return Err(BackendError::Checkpoint(format!(
            "{device} runs on {active:?}, neither its image nor our overlay; not touching it"
        )));
    }
    drop_overlay_node(q, overlay_node, overlay)?;
    util::remove_file_if_exists(overlay)
}

/// Makes a -blockdev disk's overlay file and opens it as a node of the
/// original, not yet attached to anything.
fn add_overlay_node(q: &mut Qmp, d: &QemuDisk, overlay: &Path, node: &str) -> Result<()> {
    let mut c = Command::new("qemu-img");
    // -u: the image is the running original's; its size is known.
    c.args(["create", "-q", "-u", "-f", "qcow2", "-F", &d.format, "-b"])
        .arg(&d.file)
        .arg(overlay)
        .arg(d.bytes.to_string());
    run_tool(c)?;
    q.execute(
        "blockdev-add",
        json!({"driver": "qcow2", "node-name": node, "backing": null,
               "file": {"driver": "file", "filename": overlay, "node-name": format!("{node}-f")}}),
    )
    .map(|_| ())
}

/// Closes an overlay node coldclone added (`blockdev-add`) once it is no
/// longer in the disk's chain; a node QEMU made itself (`blockdev-snapshot-sync`)
/// went with the commit. Only a node of coldclone's name over `overlay`.
fn drop_overlay_node(q: &mut Qmp, node: &str, overlay: &Path) -> Result<()> {
    if node.is_empty() || !node.starts_with("cc-") {
        return Ok(());
    }
    let nodes = q.execute("query-named-block-nodes", json!({"flat": true}))?;
    let ours = nodes
        .as_array()
        .into_iter()
        .flatten()
        .any(|n| str_of(n, "node-name") == node && node_file(q, &str_of(n, "file")) == overlay);
    if ours {
        q.execute("blockdev-del", json!({ "node-name": node }))?;
    }
    Ok(())
}

/// The original QEMU has gone away while running on our overlay: commit the
/// overlay into its backing image with qemu-img so the next start sees all
/// data. `qemu-img commit` writes into whatever backing file the overlay's
/// header names, so it runs only if that is exactly `base_file`, the frozen
/// image the journal recorded, and the overlay is a plain qcow2 file.
pub fn merge_back_offline(original_pid: u32, overlay: &Path, base_file: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(overlay) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(overlay)(e)),
        Ok(m) => m,
    };
    if util::pid_alive(original_pid) {
        return Err(BackendError::Checkpoint(format!(
            "the original (pid {original_pid}) still runs on {} but its QMP socket cannot be reached; \
             free the socket and run `coldclone recover` again",
            overlay.display()
        )));
    }
    if !meta.file_type().is_file() {
        return Err(BackendError::Checkpoint(format!(
            "{} is not a regular file; not committing it",
            overlay.display()
        )));
    }
    check_backing(overlay, base_file)?;
    let mut c = Command::new("qemu-img");
    c.args(["commit", "-q", "-f", "qcow2"]).arg(overlay);
    run_tool(c)?;
    util::remove_file_if_exists(overlay)
}

pub use crate::util::check_backing;

/// Waits for the clone's SHUTDOWN event: `Some(true)` a guest power-off, `Some(false)`
/// another stop (or QEMU went away), `None` nothing within `timeout`.
fn wait_guest_shutdown(q: &mut Qmp, timeout: Duration) -> Result<Option<bool>> {
    match q.wait_event("the clone to shut down", timeout, &|e| e.name == "SHUTDOWN") {
        Ok(ev) => {
            let reason = ev.data.get("reason").and_then(Value::as_str).unwrap_or("");
            if reason == "guest-shutdown" {
                Ok(Some(true))
            } else {
                tracing::warn!(reason, "the clone stopped, but not by a guest power-off");
                Ok(Some(false))
            }
        }
        Err(BackendError::Timeout { .. }) => Ok(None),
        // QEMU closing the socket as it exits is a stop too; the exit status decides.
        Err(BackendError::Qemu(QemuError::QmpProtocol { .. })) => Ok(Some(false)),
        Err(e) => Err(e),
    }
}

/// How long connecting to an agent and syncing may take.
const AGENT_SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a thaw may take.
const THAW_TIMEOUT: Duration = Duration::from_secs(10);

/// `guest-shutdown` through the clone's own agent socket, served by the clone's QEMU.
fn agent_shutdown(sock: &Path, clone_pid: Option<u32>, vm_uid: Option<u32>) -> Result<()> {
    let peer = crate::agent::Peer {
        pid: clone_pid,
        uid: vm_uid,
    };
    let mut a = crate::agent::Agent::connect(sock, &peer, AGENT_SYNC_TIMEOUT)?;
    a.shutdown(Duration::from_secs(2))?;
    Ok(())
}

/// `recover` of a guest a killed run may have left frozen. Nothing is taken from the
/// journal on its word: the pid must still be a QEMU, the socket must be the agent
/// socket on that QEMU's own command line, served by it (SO_PEERCRED) and owned by
/// root (or the VM's user); then the agent is asked, and thaws only if frozen.
fn thaw_after_crash(pid: u32, socket: &Path, vm_uid: Option<u32>) -> Result<()> {
    if !util::pid_alive(pid) {
        return Ok(());
    }
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    if !is_qemu_binary(&exe) {
        tracing::warn!(
            pid,
            "the frozen guest's QEMU is gone (the pid is another process's)"
        );
        return Ok(());
    }
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
    let own = util::process_cmdline(pid)
        .and_then(|argv| cmdline::parse_in(argv.get(1..).unwrap_or(&[]), Some(&cwd)).ok())
        .and_then(|o| cmdline::agent_channel(&o))
        .and_then(|a| a.socket)
        .map(|p| absolute(&cwd, &p));
    if own.as_deref() != Some(socket) {
        tracing::warn!(
            pid,
            socket = %socket.display(),
            "QEMU {pid} has no such agent socket now; not touching it"
        );
        return Ok(());
    }
    let peer = crate::agent::Peer {
        pid: Some(pid),
        uid: vm_uid,
    };
    let mut a = crate::agent::Agent::connect(socket, &peer, AGENT_SYNC_TIMEOUT)?;
    match a.fsfreeze_status(THAW_TIMEOUT)? {
        crate::agent::FreezeStatus::Thawed => Ok(()),
        crate::agent::FreezeStatus::Frozen => {
            let n = a.fsfreeze_thaw(THAW_TIMEOUT)?;
            tracing::warn!(
                pid,
                thawed = n,
                "thawed a guest a killed run had left frozen"
            );
            Ok(())
        }
    }
}

/// `guest-fsfreeze-thaw`, bounded: on the connection of the freeze if there is one
/// (it syncs again after a timeout), else on a new one.
fn thaw(
    agent: Option<&mut crate::agent::Agent>,
    socket: &Path,
    peer: &crate::agent::Peer,
) -> std::result::Result<u64, crate::agent::AgentError> {
    if let Some(a) = agent {
        match a.fsfreeze_thaw(THAW_TIMEOUT) {
            Ok(n) => return Ok(n),
            Err(e) => tracing::warn!("thaw on the freeze's connection: {e}; connecting again"),
        }
    }
    let mut a = crate::agent::Agent::connect(socket, peer, AGENT_SYNC_TIMEOUT)?;
    a.fsfreeze_thaw(THAW_TIMEOUT)
}
