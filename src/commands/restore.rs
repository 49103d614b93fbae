//! `coldclone restore VM --disk NAME --to FILE [--format raw|qcow2] [--snapshot ID] [--force]`.

use super::open_repository;
use crate::config::Config;
use crate::progress::{stderr_is_terminal, BarProgress};
use anyhow::{bail, Result};
use coldclone_repository::RestoreOptions;
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// The image format a disk is restored as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A sparse raw file, or a block device.
    Raw,
    /// A qcow2 image file (through a private NBD export of the repository and qemu-img).
    Qcow2,
}

#[allow(clippy::too_many_arguments)]
pub fn run(
    cfg: &Config,
    vm: &str,
    disk: &str,
    snapshot: Option<&str>,
    to: &Path,
    format: Format,
    force: bool,
    json: bool,
) -> Result<()> {
    let repo = open_repository(cfg)?;
    let snap = choose_snapshot(&repo, vm, disk, snapshot)?;
    if format == Format::Qcow2 {
        return run_qcow2(&repo, &snap, to, force, json);
    }
    let progress = BarProgress::new(stderr_is_terminal() && !json, &format!("restore {disk}"));
    let summary = repo.restore_with(&snap.id, to, &RestoreOptions { force }, &progress)?;
    progress.finish();
    // Write errors (a closed pipe) end the command; see main.rs.
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string(&summary)?)?;
    } else {
        writeln!(
            out,
            "restored {} ({} bytes, {} consistency, taken {}) to {} in {:.1} s",
            snap.short_id(),
            summary.bytes,
            snap.consistency,
            snap.time,
            to.display(),
            summary.duration.as_secs_f64()
        )?;
    }
    Ok(())
}

/// `--format qcow2`: the snapshot through `snapshot_to_qcow2` (a temporary file beside the
/// target, renamed into place when whole: a failure leaves the target as it was).
fn run_qcow2(
    repo: &coldclone_repository::Repository,
    snap: &coldclone_repository::Snapshot,
    to: &Path,
    force: bool,
    json: bool,
) -> Result<()> {
    match std::fs::symlink_metadata(to) {
        Ok(m) if m.file_type().is_block_device() || m.file_type().is_char_device() => bail!(
            "{} is a device: a qcow2 image is written to a file; restore to a device with --format raw",
            to.display()
        ),
        Ok(m) if !m.file_type().is_file() => bail!(
            "{} exists and is not a regular file; give a new file name",
            to.display()
        ),
        Ok(_) if !force => bail!(
            "{} exists; give another --to, or --force to replace it",
            to.display()
        ),
        _ => {}
    }
    let start = std::time::Instant::now();
    let progress = stderr_is_terminal() && !json;
    super::restore_vm::snapshot_to_qcow2(repo, snap, to, force, progress, None)?;
    let duration = start.elapsed();
    let written = std::fs::metadata(to).map(|m| m.len()).unwrap_or(0);
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(
            out,
            "{}",
            serde_json::json!({
                "snapshot_id": snap.id,
                "target": to,
                "format": "qcow2",
                "bytes": snap.size,
                "image_bytes": written,
                "duration": duration,
            })
        )?;
    } else {
        writeln!(
            out,
            "restored {} ({} bytes, {} consistency, taken {}) to {} as qcow2 in {:.1} s",
            snap.short_id(),
            snap.size,
            snap.consistency,
            snap.time,
            to.display(),
            duration.as_secs_f64()
        )?;
    }
    Ok(())
}

/// The snapshot of `vm`/`disk` that `--snapshot` names (a backup's run id, or a disk
/// snapshot id or unique prefix), or the latest; a clear error naming the VM's disks
/// when there is none.
pub fn choose_snapshot(
    repo: &coldclone_repository::Repository,
    vm: &str,
    disk: &str,
    snapshot: Option<&str>,
) -> Result<coldclone_repository::Snapshot> {
    let snaps = repo.snapshots()?;
    let chosen = match snapshot.map(str::trim) {
        Some("") => bail!(
            "--snapshot is empty: name a backup (run) id or a snapshot id (see `coldclone snapshots --vm {vm}`)"
        ),
        // A run id (the backup's id), else a disk snapshot id or unique prefix.
        Some(id) => match snaps
            .iter()
            .rfind(|s| s.vm == vm && s.disk == disk && s.tags.get("run").map(String::as_str) == Some(id))
        {
            Some(s) => Some(s.clone()),
            None => {
                let s = repo.find_snapshot(id)?;
                if s.vm != vm || s.disk != disk {
                    bail!(
                        "snapshot {} is of vm {:?} disk {:?}, not of vm {vm:?} disk {disk:?}",
                        s.short_id(),
                        s.vm,
                        s.disk
                    );
                }
                Some(s)
            }
        },
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
    Ok(snap)
}
