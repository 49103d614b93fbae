//! `coldclone restore VM --disk NAME --to FILE [--snapshot ID]`.

use super::open_repository;
use crate::config::Config;
use crate::progress::{stderr_is_terminal, BarProgress};
use anyhow::{bail, Result};
use std::path::Path;

pub fn run(
    cfg: &Config,
    vm: &str,
    disk: &str,
    snapshot: Option<&str>,
    to: &Path,
    json: bool,
) -> Result<()> {
    let repo = open_repository(cfg)?;
    let snaps = repo.snapshots()?;
    let chosen = match snapshot {
        // A run id (the backup's id) or a disk snapshot id prefix.
        Some(id) => snaps
            .iter()
            .filter(|s| s.vm == vm && s.disk == disk)
            .find(|s| s.tags.get("run").map(String::as_str) == Some(id) || s.id.starts_with(id))
            .cloned(),
        None => repo.find_latest(vm, disk)?,
    };
    let Some(snap) = chosen else {
        let disks: Vec<String> = snaps
            .iter()
            .filter(|s| s.vm == vm)
            .map(|s| s.disk.clone())
            .collect();
        if disks.is_empty() {
            bail!("no backup of vm {vm:?} in the repository (see `coldclone snapshots`)");
        }
        bail!(
            "no matching backup of disk {disk:?} of vm {vm:?}; its disks are {:?} (see `coldclone snapshots --vm {vm}`)",
            disks
        );
    };
    let progress = BarProgress::new(stderr_is_terminal() && !json, &format!("restore {disk}"));
    let summary = repo.restore(&snap.id, to, &progress)?;
    progress.finish();
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "restored {} ({} bytes, {} consistency, taken {}) to {} in {:.1} s",
            snap.short_id(),
            summary.bytes,
            snap.consistency,
            snap.time,
            to.display(),
            summary.duration.as_secs_f64()
        );
    }
    Ok(())
}
