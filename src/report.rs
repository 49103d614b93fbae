//! What a run tells its user: one report per VM (`--json` prints it as is).

use coldclone_backends::StopMethod;
use serde::Serialize;

/// How a VM's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Ok,
    Failed,
    /// It could not fit in the memory budget.
    Skipped,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Ok => "ok",
            RunStatus::Failed => "failed",
            RunStatus::Skipped => "skipped",
        }
    }
}

/// What a stored backup's disks are consistent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    /// The clone shut itself down: its file systems are clean.
    CleanShutdown,
    /// The clone was killed (on_clone_failure = "crash"): as after a power cut.
    Crash,
    /// The clone was killed (on_clone_failure = "quiesced"); the disks are the
    /// original's, snapshotted while its guest agent held its file systems frozen:
    /// file systems consistent, applications not told.
    Quiesced,
}

impl Consistency {
    /// As the snapshot's metadata and the metrics spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::CleanShutdown => "clean-shutdown",
            Consistency::Crash => "crash",
            Consistency::Quiesced => "quiesced",
        }
    }
}

/// The freeze of a `quiesced` backup.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct QuiesceReport {
    pub frozen_filesystems: u64,
    pub frozen_ms: f64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Durations {
    pub checkpoint: u64,
    pub restore: u64,
    pub stop: u64,
    pub archive: u64,
    /// Clone removal, original's overlay merged back (block-commit), files removed.
    pub cleanup: u64,
    pub total: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    pub name: String,
    pub bytes: u64,
    pub stored_bytes: u64,
    pub bytes_read: u64,
    pub snapshot_id: String,
    /// Read where it lies (an image export), not from a copy in the state folder.
    pub read_in_place: bool,
    /// What told the repository which ranges changed since the previous backup.
    pub changed_block_map: ChangedBlockMap,
    /// Why the disk was read whole (`changed_block_map: "none"`): no earlier backup, no
    /// map kept, the map lost or not matching.
    pub full_read_reason: Option<String>,
    /// With COLDCLONE_VERIFY_INCREMENTAL=1: the bytes of the whole-disk read that
    /// confirmed a map-driven backup (`None`: not verified).
    pub verify_bytes_read: Option<u64>,
}

/// The source of a disk's changed ranges; `none` means every allocated byte was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChangedBlockMap {
    None,
    QemuBitmap,
    XapiCbt,
    LvmThin,
}

impl ChangedBlockMap {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangedBlockMap::None => "none",
            ChangedBlockMap::QemuBitmap => "qemu-bitmap",
            ChangedBlockMap::XapiCbt => "xapi-cbt",
            ChangedBlockMap::LvmThin => "lvm-thin",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct IsolatedNetwork {
    pub bridge: String,
    pub namespace: Option<String>,
    pub ports: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PauseSplit {
    pub disk_snapshot_ms: f64,
    pub memory_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BalloonReport {
    /// The original's memory before; it is set back to this at clean-up.
    pub original_bytes: u64,
    pub target_bytes: u64,
    /// What the guest had given back when the checkpoint was taken.
    pub reached_bytes: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmReport {
    pub vm: String,
    pub backend: String,
    pub run_id: String,
    /// The backup's id: the run id, carried as tag `run` by every disk snapshot.
    pub snapshot_id: Option<String>,
    pub status: RunStatus,
    /// Memory its clone was budgeted (MiB).
    pub clone_memory_mib: Option<u64>,
    pub balloon: Option<BalloonReport>,
    /// When the backup started and ended (seconds since the epoch).
    pub started_at: f64,
    pub finished_at: f64,
    /// Set when a backup was stored.
    pub consistency: Option<Consistency>,
    pub checkpoint_method: Option<&'static str>,
    pub original_pause_ms: Option<f64>,
    pub original_pause: Option<PauseSplit>,
    pub memory_image_bytes: Option<u64>,
    pub clone_stop: Option<StopMethod>,
    pub clone_stop_seconds: Option<f64>,
    /// `quiesced`: how many file systems the guest agent froze, and for how long.
    pub quiesce: Option<QuiesceReport>,
    pub isolated_network: Option<IsolatedNetwork>,
    pub disks: Vec<DiskReport>,
    /// Peak bytes the run held in its folder of the state folder (memory image, copies
    /// of disks), sampled after each step and after each disk is stored.
    pub scratch_bytes: u64,
    pub durations_ms: Durations,
    pub warnings: Vec<String>,
    pub error: Option<String>,
}

impl VmReport {
    /// Raises `scratch_bytes` to what `dir` holds now.
    pub fn note_scratch(&mut self, dir: &std::path::Path) {
        self.scratch_bytes = self.scratch_bytes.max(allocated_bytes(dir));
    }

    pub fn new(vm: &str, run_id: &str) -> VmReport {
        VmReport {
            vm: vm.to_string(),
            backend: String::new(),
            run_id: run_id.to_string(),
            snapshot_id: None,
            status: RunStatus::Failed,
            clone_memory_mib: None,
            balloon: None,
            started_at: 0.0,
            finished_at: 0.0,
            consistency: None,
            checkpoint_method: None,
            original_pause_ms: None,
            original_pause: None,
            memory_image_bytes: None,
            clone_stop: None,
            clone_stop_seconds: None,
            quiesce: None,
            isolated_network: None,
            disks: Vec::new(),
            scratch_bytes: 0,
            durations_ms: Durations::default(),
            warnings: Vec::new(),
            error: None,
        }
    }

    /// One line for people.
    pub fn summary_line(&self) -> String {
        match self.status {
            RunStatus::Ok => format!(
                "{}: ok, {} backup {} (pause {:.0} ms, clone stopped in {:.1} s, {} disk(s), {} new bytes, {:.1} s total)",
                self.vm,
                self.consistency.map_or("?", Consistency::as_str),
                self.snapshot_id.as_deref().unwrap_or("?"),
                self.original_pause_ms.unwrap_or(0.0),
                self.clone_stop_seconds.unwrap_or(0.0),
                self.disks.len(),
                self.disks.iter().map(|d| d.stored_bytes).sum::<u64>(),
                self.durations_ms.total as f64 / 1000.0
            ),
            RunStatus::Skipped => format!(
                "{}: SKIPPED: {}",
                self.vm,
                self.error.as_deref().unwrap_or("no reason given")
            ),
            RunStatus::Failed => format!(
                "{}: FAILED: {}",
                self.vm,
                self.error.as_deref().unwrap_or("unknown error")
            ),
        }
    }
}

/// The run as a whole (the last line of `backup --json`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub vms: usize,
    pub ok: usize,
    pub failed: usize,
    pub skipped: usize,
    pub clean_shutdown: usize,
    pub quiesced: usize,
    pub crash: usize,
    pub bytes_read: u64,
    pub bytes_stored: u64,
    pub duration_ms: u64,
}

impl Summary {
    pub fn of(reports: &[VmReport], duration_ms: u64) -> Summary {
        let count = |f: &dyn Fn(&VmReport) -> bool| reports.iter().filter(|r| f(r)).count();
        Summary {
            vms: reports.len(),
            ok: count(&|r| r.status == RunStatus::Ok),
            failed: count(&|r| r.status == RunStatus::Failed),
            skipped: count(&|r| r.status == RunStatus::Skipped),
            clean_shutdown: count(&|r| r.consistency == Some(Consistency::CleanShutdown)),
            quiesced: count(&|r| r.consistency == Some(Consistency::Quiesced)),
            crash: count(&|r| r.consistency == Some(Consistency::Crash)),
            bytes_read: reports
                .iter()
                .flat_map(|r| &r.disks)
                .map(|d| d.bytes_read)
                .sum(),
            bytes_stored: reports
                .iter()
                .flat_map(|r| &r.disks)
                .map(|d| d.stored_bytes)
                .sum(),
            duration_ms,
        }
    }
}

fn human_bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

/// The end-of-run table for people.
pub fn table(reports: &[VmReport], summary: &Summary) -> String {
    let mut rows = vec![[
        "VM".to_string(),
        "STATUS".into(),
        "CONSISTENCY".into(),
        "PAUSE".into(),
        "READ".into(),
        "STORED".into(),
        "TIME".into(),
        "NOTE".into(),
    ]];
    for r in reports {
        rows.push([
            r.vm.clone(),
            r.status.as_str().to_string(),
            r.consistency.map_or("-", Consistency::as_str).to_string(),
            r.original_pause_ms
                .map(|p| format!("{p:.0} ms"))
                .unwrap_or_else(|| "-".into()),
            human_bytes(r.disks.iter().map(|d| d.bytes_read).sum()),
            human_bytes(r.disks.iter().map(|d| d.stored_bytes).sum()),
            format!("{:.1} s", r.durations_ms.total as f64 / 1000.0),
            r.error
                .clone()
                .or_else(|| r.warnings.first().cloned())
                .unwrap_or_default(),
        ]);
    }
    let mut widths = [0usize; 8];
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row.iter()).take(7) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, c) in row.iter().enumerate() {
            if i < 7 {
                line.push_str(&format!("{c:<w$}  ", w = widths[i]));
            } else {
                line.push_str(c);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.push_str(&format!(
        "{} VM(s): {} ok, {} failed, {} skipped; {} read, {} stored, {:.1} s\n",
        summary.vms,
        summary.ok,
        summary.failed,
        summary.skipped,
        human_bytes(summary.bytes_read),
        human_bytes(summary.bytes_stored),
        summary.duration_ms as f64 / 1000.0
    ));
    out
}

/// Bytes allocated on disk under `dir`, on `dir`'s own file system only: an image
/// export mounted in the run folder is a view of the clone's disk, not scratch.
pub fn allocated_bytes(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fn walk(dir: &std::path::Path, dev: u64) -> u64 {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut total = 0;
        for e in entries.flatten() {
            // symlink_metadata: a link (xl's export of an LV) is not followed.
            let Ok(md) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if md.dev() != dev {
                continue;
            }
            total += md.blocks() * 512;
            if md.is_dir() {
                total += walk(&e.path(), dev);
            }
        }
        total
    }
    match std::fs::metadata(dir) {
        Ok(md) => walk(dir, md.dev()),
        Err(_) => 0,
    }
}
