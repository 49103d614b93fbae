//! `coldclone snapshots`: the backups in the repository.

use super::open_repository;
use crate::config::Config;
use anyhow::Result;
use std::io::Write;

pub fn run(cfg: &Config, vm: Option<&str>, json: bool) -> Result<()> {
    let repo = open_repository(cfg)?;
    // Write errors (a closed pipe: `| head`) end the command; see main.rs.
    let mut out = std::io::stdout().lock();
    let mut snaps = repo.snapshots()?;
    snaps.retain(|s| vm.is_none_or(|v| s.vm == v));
    snaps.sort_by(|a, b| a.time_unix.cmp(&b.time_unix).then(a.disk.cmp(&b.disk)));
    if json {
        // Each snapshot with the audit of its backup, if one was made.
        let with_audit: Vec<serde_json::Value> = snaps
            .iter()
            .map(|s| {
                let mut v = serde_json::to_value(s).unwrap_or_default();
                let run = s.tags.get("run").map(String::as_str).unwrap_or("");
                if let Some(a) = crate::audit::load(&cfg.state_dir, &s.vm, run) {
                    v["audit"] = serde_json::json!({"pass": a.pass, "audited_at": a.audited_at, "reasons": a.reasons});
                }
                v
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&with_audit)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<10} {:<20} {:<16} {:<10} {:<15} {:>12} {:>12}  {:<6} {:<14} host",
        "id", "time", "vm", "disk", "consistency", "size", "added", "audit", "run"
    )?;
    for s in &snaps {
        let run = s.tags.get("run").map(String::as_str).unwrap_or("-");
        let audit = match crate::audit::load(&cfg.state_dir, &s.vm, run) {
            Some(a) if a.pass => "pass",
            Some(_) => "FAIL",
            None => "-",
        };
        writeln!(
            out,
            "{:<10} {:<20} {:<16} {:<10} {:<15} {:>12} {:>12}  {:<6} {:<14} {}",
            s.short_id(),
            s.time.get(..19).unwrap_or(&s.time),
            s.vm,
            s.disk,
            s.consistency,
            s.size,
            s.stored_bytes,
            audit,
            run,
            // Hosts of one name (cloned from one image) differ by their uuid.
            coldclone_repository::HostIdentity {
                name: s.host.clone(),
                uuid: s.host_uuid.clone()
            }
            .describe()
        )?;
    }
    writeln!(out, "{} snapshot(s)", snaps.len())?;
    Ok(())
}
