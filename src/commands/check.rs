//! `coldclone check [--read-data]`: is every backup restorable?

use super::open_repository;
use crate::config::Config;
use anyhow::Result;
use std::io::Write;

/// Returns whether the repository is sound.
pub fn run(cfg: &Config, read_data: bool, json: bool) -> Result<bool> {
    let repo = open_repository(cfg)?;
    // Write errors (a closed pipe: `| head`) end the command; see main.rs.
    let mut out = std::io::stdout().lock();
    let report = repo.check(read_data)?;
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(report.ok);
    }
    writeln!(
        out,
        "checked {} snapshot(s), {} pack(s), {} blob(s){}",
        report.snapshots,
        report.packs,
        report.blobs,
        if read_data {
            format!(", read {} bytes", report.bytes_read)
        } else {
            " (structure only; --read-data reads and verifies every chunk)".into()
        }
    )?;
    for w in &report.warnings {
        writeln!(out, "warning: {w}")?;
    }
    for e in &report.errors {
        writeln!(out, "ERROR: {e}")?;
    }
    for d in &report.damaged_snapshots {
        writeln!(
            out,
            "DAMAGED: snapshot {} (vm {}, disk {}, {}): {} chunk(s) missing or corrupt",
            d.snapshot_id.get(..8).unwrap_or(&d.snapshot_id),
            d.vm,
            d.disk,
            d.time,
            d.damaged_chunks
        )?;
    }
    writeln!(
        out,
        "{}",
        if report.ok {
            "repository OK"
        } else {
            "repository DAMAGED"
        }
    )?;
    Ok(report.ok)
}

/// `coldclone unlock KEY`: remove one lock object on purpose.
pub fn unlock(cfg: &Config, key: &str, json: bool) -> Result<()> {
    let repo = open_repository(cfg)?;
    let removed = repo.unlock(key)?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::json!({ "removed": removed }))?;
    } else {
        writeln!(out, "removed lock {removed}")?;
    }
    Ok(())
}

/// `coldclone repair-index`: rebuild the index from the packs' headers.
pub fn repair_index(cfg: &Config, json: bool) -> Result<()> {
    let repo = open_repository(cfg)?;
    let r = repo.repair_index()?;
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&r)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "read {} pack(s), wrote {} index file(s), removed {} old index file(s)",
        r.packs_read, r.index_files_written, r.index_files_removed
    )?;
    for p in &r.unreadable_packs {
        writeln!(
            out,
            "warning: pack {p} is unreadable and was left out of the index"
        )?;
    }
    Ok(())
}
