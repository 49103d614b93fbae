//! `coldclone check [--read-data]`: is every backup restorable?

use super::open_repository;
use crate::config::Config;
use anyhow::Result;

/// Returns whether the repository is sound.
pub fn run(cfg: &Config, read_data: bool, json: bool) -> Result<bool> {
    let repo = open_repository(cfg)?;
    let report = repo.check(read_data)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(report.ok);
    }
    println!(
        "checked {} snapshot(s), {} pack(s), {} blob(s){}",
        report.snapshots,
        report.packs,
        report.blobs,
        if read_data {
            format!(", read {} bytes", report.bytes_read)
        } else {
            " (structure only; --read-data reads and verifies every chunk)".into()
        }
    );
    for w in &report.warnings {
        println!("warning: {w}");
    }
    for e in &report.errors {
        println!("ERROR: {e}");
    }
    for d in &report.damaged_snapshots {
        println!(
            "DAMAGED: snapshot {} (vm {}, disk {}, {}): {} chunk(s) missing or corrupt",
            d.snapshot_id.get(..8).unwrap_or(&d.snapshot_id),
            d.vm,
            d.disk,
            d.time,
            d.damaged_chunks
        );
    }
    println!(
        "{}",
        if report.ok {
            "repository OK"
        } else {
            "repository DAMAGED"
        }
    );
    Ok(report.ok)
}
