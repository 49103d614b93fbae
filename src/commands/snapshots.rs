//! `coldclone snapshots`: the backups in the repository.

use super::open_repository;
use crate::config::Config;
use anyhow::Result;

pub fn run(cfg: &Config, vm: Option<&str>, json: bool) -> Result<()> {
    let repo = open_repository(cfg)?;
    let mut snaps = repo.snapshots()?;
    snaps.retain(|s| vm.is_none_or(|v| s.vm == v));
    snaps.sort_by(|a, b| a.time_unix.cmp(&b.time_unix).then(a.disk.cmp(&b.disk)));
    if json {
        println!("{}", serde_json::to_string_pretty(&snaps)?);
        return Ok(());
    }
    println!(
        "{:<10} {:<20} {:<16} {:<10} {:<15} {:>12} {:>12}  run",
        "id", "time", "vm", "disk", "consistency", "size", "added"
    );
    for s in &snaps {
        println!(
            "{:<10} {:<20} {:<16} {:<10} {:<15} {:>12} {:>12}  {}",
            s.short_id(),
            s.time.get(..19).unwrap_or(&s.time),
            s.vm,
            s.disk,
            s.consistency,
            s.size,
            s.stored_bytes,
            s.tags.get("run").map(String::as_str).unwrap_or("-")
        );
    }
    println!("{} snapshot(s)", snaps.len());
    Ok(())
}
