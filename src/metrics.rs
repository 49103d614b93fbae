//! A Prometheus textfile (node_exporter's textfile collector) after every
//! run: per VM the last success time, last consistency, pause, bytes read and
//! stored, duration, and whether the last run succeeded. The last success
//! survives failed runs (kept in STATE_DIR/metrics-state.json), so an alert
//! on its age fires when backups silently stop.

use crate::report::{RunStatus, VmReport};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VmMetrics {
    pub last_run_time: f64,
    pub last_run_success: bool,
    pub last_run_skipped: bool,
    pub last_success_time: Option<f64>,
    pub last_consistency: Option<String>,
    pub pause_ms: Option<f64>,
    pub bytes_read: u64,
    pub bytes_stored: u64,
    pub duration_seconds: f64,
    /// When the newest backup that passed an audit was taken, and when it was audited.
    #[serde(default)]
    pub last_verified_good_backup_time: Option<f64>,
    /// Peak bytes the last good backup held in the state folder.
    #[serde(default)]
    pub scratch_bytes: u64,
    /// Disks of the last good backup read from a changed-block map, by map kind.
    #[serde(default)]
    pub changed_block_maps: BTreeMap<String, u64>,
}

pub type State = BTreeMap<String, VmMetrics>;

fn load(path: &Path) -> State {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default()
}

/// Folds this run's reports into the kept state.
pub fn update(mut state: State, reports: &[VmReport]) -> State {
    for r in reports {
        let m = state.entry(r.vm.clone()).or_default();
        m.last_run_time = r.finished_at;
        m.last_run_success = r.status == RunStatus::Ok;
        m.last_run_skipped = r.status == RunStatus::Skipped;
        if r.status == RunStatus::Ok {
            m.last_success_time = Some(r.finished_at);
            m.last_consistency = r.consistency.map(|c| c.as_str().to_string());
            m.pause_ms = r.original_pause_ms;
            m.bytes_read = r.disks.iter().map(|d| d.bytes_read).sum();
            m.bytes_stored = r.disks.iter().map(|d| d.stored_bytes).sum();
            m.scratch_bytes = r.scratch_bytes;
            m.changed_block_maps.clear();
            for d in &r.disks {
                *m.changed_block_maps
                    .entry(d.changed_block_map.as_str().to_string())
                    .or_default() += 1;
            }
        }
        m.duration_seconds = r.durations_ms.total as f64 / 1000.0;
    }
    state
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(state: &State) -> String {
    let mut out = String::new();
    let metric =
        |out: &mut String, name: &str, help: &str, kind: &str, rows: Vec<(String, f64)>| {
            let _ = writeln!(out, "# HELP coldclone_{name} {help}");
            let _ = writeln!(out, "# TYPE coldclone_{name} {kind}");
            for (labels, v) in rows {
                let _ = writeln!(out, "coldclone_{name}{{{labels}}} {v}");
            }
        };
    let per = |f: &dyn Fn(&VmMetrics) -> Option<f64>| -> Vec<(String, f64)> {
        state
            .iter()
            .filter_map(|(vm, m)| f(m).map(|v| (format!("vm=\"{}\"", label(vm)), v)))
            .collect()
    };
    metric(
        &mut out,
        "last_success_timestamp_seconds",
        "When the VM's last good backup finished.",
        "gauge",
        per(&|m| m.last_success_time),
    );
    metric(
        &mut out,
        "last_run_timestamp_seconds",
        "When the VM's last backup attempt finished.",
        "gauge",
        per(&|m| Some(m.last_run_time)),
    );
    metric(
        &mut out,
        "last_run_success",
        "1 if the VM's last backup attempt succeeded.",
        "gauge",
        per(&|m| Some(f64::from(u8::from(m.last_run_success)))),
    );
    metric(
        &mut out,
        "last_run_skipped",
        "1 if the VM was skipped for lack of memory in its last run.",
        "gauge",
        per(&|m| Some(f64::from(u8::from(m.last_run_skipped)))),
    );
    let consistency: Vec<(String, f64)> = state
        .iter()
        .filter_map(|(vm, m)| {
            m.last_consistency.as_ref().map(|c| {
                (
                    format!("vm=\"{}\",consistency=\"{}\"", label(vm), label(c)),
                    1.0,
                )
            })
        })
        .collect();
    metric(
        &mut out,
        "last_success_consistency",
        "The consistency of the VM's last good backup (clean-shutdown, quiesced or crash).",
        "gauge",
        consistency,
    );
    metric(
        &mut out,
        "last_pause_milliseconds",
        "How long the original was paused in its last good backup.",
        "gauge",
        per(&|m| m.pause_ms),
    );
    metric(
        &mut out,
        "last_scratch_bytes",
        "Peak bytes the VM's last good backup held in the state folder.",
        "gauge",
        per(&|m| Some(m.scratch_bytes as f64)),
    );
    let maps: Vec<(String, f64)> = state
        .iter()
        .flat_map(|(vm, m)| {
            m.changed_block_maps.iter().map(move |(k, n)| {
                (
                    format!("vm=\"{}\",map=\"{}\"", label(vm), label(k)),
                    *n as f64,
                )
            })
        })
        .collect();
    metric(
        &mut out,
        "last_changed_block_map_disks",
        "Disks of the VM's last good backup by what told it what changed (none: read whole).",
        "gauge",
        maps,
    );
    metric(
        &mut out,
        "last_bytes_read",
        "Bytes read from the VM's disks in its last good backup.",
        "gauge",
        per(&|m| Some(m.bytes_read as f64)),
    );
    metric(
        &mut out,
        "last_bytes_stored",
        "Bytes added to the repository by the VM's last good backup.",
        "gauge",
        per(&|m| Some(m.bytes_stored as f64)),
    );
    metric(
        &mut out,
        "last_duration_seconds",
        "How long the VM's last backup attempt took.",
        "gauge",
        per(&|m| Some(m.duration_seconds)),
    );
    out
}

/// Records a passed audit (the backup's own time counts: the last verified-good point).
pub fn record_audit(
    state_dir: &Path,
    metrics_file: &Path,
    audit: &crate::audit::AuditReport,
) -> std::io::Result<()> {
    let state_path = state_dir.join("metrics-state.json");
    let mut state = load(&state_path);
    if audit.pass {
        let t = state
            .get(&audit.vm)
            .and_then(|m| m.last_verified_good_backup_time)
            .unwrap_or(0.0);
        let backup_time = audit_backup_unix(audit).unwrap_or(audit.audited_at);
        let m = state.entry(audit.vm.clone()).or_default();
        m.last_verified_good_backup_time = Some(t.max(backup_time));
    }
    save(state_dir, metrics_file, &state)
}

fn audit_backup_unix(audit: &crate::audit::AuditReport) -> Option<f64> {
    // RFC 3339 "YYYY-MM-DDTHH:MM:SS...Z" -> seconds since the epoch (UTC).
    let t = &audit.backup_time;
    let n = |r: std::ops::Range<usize>| t.get(r).and_then(|s| s.parse::<i64>().ok());
    let (y, mo, d, h, mi, s) = (
        n(0..4)?,
        n(5..7)?,
        n(8..10)?,
        n(11..13)?,
        n(14..16)?,
        n(17..19)?,
    );
    let (y2, m2) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some((days * 86400 + h * 3600 + mi * 60 + s) as f64)
}

fn save(state_dir: &Path, metrics_file: &Path, state: &State) -> std::io::Result<()> {
    let state_path = state_dir.join("metrics-state.json");
    let tmp = state_path.with_extension("json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, &state_path)?;
    let tmp = metrics_file.with_extension("prom.tmp");
    std::fs::write(&tmp, render(state))?;
    std::fs::rename(&tmp, metrics_file)
}

/// Updates the kept state and writes the textfile atomically (temp + rename).
pub fn write(state_dir: &Path, metrics_file: &Path, reports: &[VmReport]) -> std::io::Result<()> {
    let state_path = state_dir.join("metrics-state.json");
    let state = update(load(&state_path), reports);
    save(state_dir, metrics_file, &state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Consistency;

    #[test]
    fn a_failed_run_keeps_the_last_success() {
        let mut ok = VmReport::new("web1", "r1");
        ok.status = RunStatus::Ok;
        ok.consistency = Some(Consistency::CleanShutdown);
        ok.finished_at = 100.0;
        ok.original_pause_ms = Some(12.5);
        let state = update(State::new(), &[ok]);
        let mut bad = VmReport::new("web1", "r2");
        bad.finished_at = 200.0;
        let state = update(state, &[bad]);
        let text = render(&state);
        assert!(
            text.contains("coldclone_last_success_timestamp_seconds{vm=\"web1\"} 100"),
            "{text}"
        );
        assert!(
            text.contains("coldclone_last_run_success{vm=\"web1\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("coldclone_last_run_timestamp_seconds{vm=\"web1\"} 200"),
            "{text}"
        );
        assert!(text.contains("consistency=\"clean-shutdown\""), "{text}");
    }

    #[test]
    fn scratch_and_changed_block_maps_are_exported() {
        use crate::report::{ChangedBlockMap, DiskReport};
        let mut ok = VmReport::new("web1", "r1");
        ok.status = RunStatus::Ok;
        ok.scratch_bytes = 4096;
        for (name, map) in [
            ("d0", ChangedBlockMap::QemuBitmap),
            ("d1", ChangedBlockMap::None),
        ] {
            ok.disks.push(DiskReport {
                name: name.into(),
                bytes: 1,
                stored_bytes: 1,
                bytes_read: 1,
                snapshot_id: "x".into(),
                read_in_place: true,
                changed_block_map: map,
                full_read_reason: None,
                verify_bytes_read: None,
            });
        }
        let text = render(&update(State::new(), &[ok]));
        assert!(
            text.contains("coldclone_last_scratch_bytes{vm=\"web1\"} 4096"),
            "{text}"
        );
        assert!(
            text.contains(
                "coldclone_last_changed_block_map_disks{vm=\"web1\",map=\"qemu-bitmap\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("coldclone_last_changed_block_map_disks{vm=\"web1\",map=\"none\"} 1"),
            "{text}"
        );
    }
}
