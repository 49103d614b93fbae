//! What a run tells its user: one report per VM (`--json` prints it as is).

use serde::Serialize;

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
pub struct VmReport {
    pub vm: String,
    pub backend: String,
    pub run_id: String,
    /// The backup's id: the run id, carried as tag `run` by every disk snapshot.
    pub snapshot_id: Option<String>,
    /// "ok" or "failed"
    pub status: &'static str,
    /// "clean-shutdown" or "crash" when a backup was stored.
    pub consistency: Option<&'static str>,
    pub checkpoint_method: Option<&'static str>,
    pub original_pause_ms: Option<f64>,
    pub original_pause: Option<PauseSplit>,
    pub memory_image_bytes: Option<u64>,
    /// "acpi" or "pv"
    pub clone_stop: Option<&'static str>,
    pub clone_stop_seconds: Option<f64>,
    pub isolated_network: Option<IsolatedNetwork>,
    pub disks: Vec<DiskReport>,
    pub durations_ms: Durations,
    pub warnings: Vec<String>,
    pub error: Option<String>,
}

impl VmReport {
    pub fn new(vm: &str, run_id: &str) -> VmReport {
        VmReport {
            vm: vm.to_string(),
            backend: String::new(),
            run_id: run_id.to_string(),
            snapshot_id: None,
            status: "failed",
            consistency: None,
            checkpoint_method: None,
            original_pause_ms: None,
            original_pause: None,
            memory_image_bytes: None,
            clone_stop: None,
            clone_stop_seconds: None,
            isolated_network: None,
            disks: Vec::new(),
            durations_ms: Durations::default(),
            warnings: Vec::new(),
            error: None,
        }
    }

    /// One line for people.
    pub fn summary_line(&self) -> String {
        match self.status {
            "ok" => format!(
                "{}: ok, {} backup {} (pause {:.0} ms, clone stopped in {:.1} s, {} disk(s), {} new bytes, {:.1} s total)",
                self.vm,
                self.consistency.unwrap_or("?"),
                self.snapshot_id.as_deref().unwrap_or("?"),
                self.original_pause_ms.unwrap_or(0.0),
                self.clone_stop_seconds.unwrap_or(0.0),
                self.disks.len(),
                self.disks.iter().map(|d| d.stored_bytes).sum::<u64>(),
                self.durations_ms.total as f64 / 1000.0
            ),
            _ => format!(
                "{}: FAILED: {}",
                self.vm,
                self.error.as_deref().unwrap_or("unknown error")
            ),
        }
    }
}
