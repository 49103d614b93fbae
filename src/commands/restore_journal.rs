//! Restores are journaled like backups (`crate::journal`): what `restore --as` makes in the
//! user's folder (work folders, disk images, overlays, the start script), and what an
//! instant restore starts (exporters, the VM), is written to a run journal *before* it
//! takes its place, so that `coldclone recover` removes a restore killed half-way (kill -9,
//! a crash). A restore that finishes marks all of it kept: `recover` never touches a
//! finished restore. Each undo acts only on what is still what the restore made: a file
//! by its device and inode, a folder by its name, a process by the socket or monitor path
//! in its command line (paths the restore made for itself).

use crate::journal::{JournalError, RestoreResource, RunJournal, RunResource, Undone};
use anyhow::{Context, Result};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The prefix of a restore's work folders.
pub const WORK_PREFIX: &str = ".coldclone-restore-";

/// A journal for one restore, in the state folder's journals like a backup's.
pub fn start(state_dir: &Path, vm: &str, new_name: &str) -> Result<RunJournal> {
    let run_id = format!(
        "restore-{}-{}",
        super::restore_vm::safe_name(new_name),
        coldclone_backends::util::random_hex(6)
    );
    RunJournal::create(state_dir, &run_id, vm).context("cannot start the restore's journal")
}

/// Journals a work folder `parent/.coldclone-restore-XXXX`, then makes it (0700).
pub fn make_work_dir(j: &mut RunJournal, parent: &Path) -> Result<(u64, PathBuf)> {
    use std::os::unix::fs::PermissionsExt;
    let work = parent.join(format!(
        "{WORK_PREFIX}{}",
        coldclone_backends::util::random_hex(6)
    ));
    let id = j.record(RestoreResource::RestoreWorkDir { path: work.clone() }.into())?;
    std::fs::create_dir(&work).with_context(|| format!("cannot make {}", work.display()))?;
    std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o700))?;
    Ok((id, work))
}

/// Journals that `staged` (a file of ours) is about to become `dest`.
pub fn journal_file(
    j: &mut RunJournal,
    staged: &Path,
    dest: &Path,
    instant_vm: Option<&Path>,
) -> Result<u64> {
    let m = std::fs::symlink_metadata(staged)
        .with_context(|| format!("cannot stat {}", staged.display()))?;
    Ok(j.record(
        RestoreResource::RestoredFile {
            path: dest.to_path_buf(),
            dev: m.dev(),
            ino: m.ino(),
            instant_vm: instant_vm.map(Path::to_path_buf),
        }
        .into(),
    )?)
}

/// A failed restore: undoes what its journal still has open (what the restore's own
/// clean-up left), newest first, and closes the journal if all of it is gone.
pub fn abandon(mut j: RunJournal) {
    let open: Vec<(u64, RunResource)> = j.open_resources().to_vec();
    for (id, r) in open.into_iter().rev() {
        let RunResource::Restore(r) = r else { continue };
        match undo(&r) {
            Ok(Undone::Removed) => {
                let _ = j.removed_id(id);
            }
            Ok(Undone::Kept(why)) => {
                tracing::warn!(?r, "left: {why}");
                let _ = j.kept_id(id);
            }
            Err(e) => tracing::error!(?r, "could not remove: {e}"),
        }
    }
    if let Err(e) = j.finish() {
        tracing::warn!("the restore's journal: {e}");
    }
}

/// A finished restore: everything it made stays.
pub fn finish(mut j: RunJournal) -> Result<(), JournalError> {
    j.keep_all()?;
    j.finish()
}

/// The processes whose command line `matches`; zombies are not counted.
fn processes(matches: impl Fn(&[&[u8]]) -> bool) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if pid == std::process::id() as i32 || is_zombie(pid) {
            continue;
        }
        let argv = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = argv.split(|b| *b == 0).collect();
        if matches(&args) {
            out.push(pid);
        }
    }
    out
}

fn is_zombie(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // pid (comm) STATE ...: the state follows the last ')'.
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
        .unwrap_or(true)
}

/// The VM an instant restore started: `-chardev socket,id=coldclone-restore,path=MONITOR,...`.
pub fn monitor_chardev(monitor: &Path) -> String {
    format!(
        "socket,id=coldclone-restore,path={},server=on,wait=off",
        monitor.display().to_string().replace(',', ",,")
    )
}

fn instant_vm_pids(monitor: &Path) -> Vec<i32> {
    let want = monitor_chardev(monitor).into_bytes();
    processes(|args| args.contains(&want.as_slice()))
}

fn exporter_pids(socket: &Path) -> Vec<i32> {
    let want = socket.as_os_str().as_encoded_bytes();
    processes(|args| {
        args.contains(&&b"serve"[..])
            && args.contains(&&b"--once"[..])
            && args.windows(2).any(|w| w[0] == b"--socket" && w[1] == want)
    })
}

/// SIGKILL, then waits (bounded) until the process is gone or a zombie.
fn kill_and_wait(pid: i32) -> Result<(), String> {
    // SAFETY: kill(2) with a pid read from /proc and a valid signal.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let t = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid) {
        if t.elapsed() > Duration::from_secs(20) {
            return Err(format!("process {pid} did not end after SIGKILL"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn remove_socket(path: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| format!("{}: {e}", path.display()))
        }
        _ => Ok(()), // gone, or not a socket: not ours to remove
    }
}

/// Whether `overlay` (a qcow2 image) still has a backing file (`qemu-img info -U`).
fn has_backing(overlay: &Path) -> Result<bool, String> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(overlay)
        .output()
        .map_err(|e| format!("cannot run qemu-img: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img info {}: {}",
            overlay.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("qemu-img info {}: {e}", overlay.display()))?;
    Ok(!v["backing-filename"].is_null())
}

/// Undoes one resource of a restore whose run is gone.
pub fn undo(r: &RestoreResource) -> Result<Undone, String> {
    match r {
        RestoreResource::RestoreWorkDir { path } => {
            let ours = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(WORK_PREFIX))
                && path.is_absolute();
            if !ours {
                return Err(format!("{} is not a restore's work folder", path.display()));
            }
            match std::fs::symlink_metadata(path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Undone::Removed),
                Err(e) => Err(format!("{}: {e}", path.display())),
                Ok(m) if m.file_type().is_dir() => std::fs::remove_dir_all(path)
                    .map(|()| Undone::Removed)
                    .map_err(|e| format!("{}: {e}", path.display())),
                Ok(_) => Err(format!("{} is not a folder", path.display())),
            }
        }
        RestoreResource::RestoredFile {
            path,
            dev,
            ino,
            instant_vm,
        } => {
            let m = match std::fs::symlink_metadata(path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Undone::Removed),
                Err(e) => return Err(format!("{}: {e}", path.display())),
                Ok(m) => m,
            };
            if !m.file_type().is_file() || m.dev() != *dev || m.ino() != *ino {
                return Ok(Undone::Kept(format!(
                    "{} is no longer the file the restore made",
                    path.display()
                )));
            }
            if let Some(monitor) = instant_vm {
                // Whole: a finished disk, whatever became of the restore.
                if !has_backing(path)? {
                    return Ok(Undone::Kept(format!(
                        "{}: whole (its copy ended after the restore was interrupted)",
                        path.display()
                    )));
                }
                // Still copying into it: the running VM's disk. Left open in the journal
                // (an error, not kept) for a later `recover` to look at again.
                if !instant_vm_pids(monitor).is_empty() {
                    return Err(format!(
                        "{}: the disk of the running VM restored with it, still being copied \
                         in: left",
                        path.display()
                    ));
                }
            }
            std::fs::remove_file(path)
                .map(|()| Undone::Removed)
                .map_err(|e| format!("{}: {e}", path.display()))
        }
        RestoreResource::RestoreExporter { socket, instant_vm } => {
            let pids = exporter_pids(socket);
            if !pids.is_empty() && !instant_vm_pids(instant_vm).is_empty() {
                // Left open in the journal: it ends by itself when the copy is done.
                return Err(format!(
                    "the exporter on {} serves the running VM restored with it: left",
                    socket.display()
                ));
            }
            for pid in pids {
                kill_and_wait(pid)?;
            }
            remove_socket(socket)?;
            Ok(Undone::Removed)
        }
        RestoreResource::RestoredVm { monitor, name } => {
            let pids = instant_vm_pids(monitor);
            let Some(&pid) = pids.first() else {
                remove_socket(monitor)?;
                return Ok(Undone::Removed);
            };
            // Running: never stopped here (it may be in use since it started). Whole, it
            // is a finished restore; still copying, it is left and reported.
            let mut q = coldclone_backends::qemu::qmp::Qmp::connect(monitor)
                .map_err(|e| format!("the VM {name} (pid {pid}) runs; its monitor: {e}"))?;
            if q.peer_pid().ok() != Some(pid as u32) {
                return Err(format!(
                    "{} is not served by the VM {name} (pid {pid})",
                    monitor.display()
                ));
            }
            let blocks = q
                .execute("query-block", serde_json::json!({}))
                .map_err(|e| format!("the VM {name}: query-block: {e}"))?;
            let copying: Vec<String> = blocks
                .as_array()
                .into_iter()
                .flatten()
                .filter(|b| !b["inserted"]["image"]["backing-image"].is_null())
                .filter_map(|b| b["device"].as_str().map(str::to_string))
                .collect();
            if copying.is_empty() {
                Ok(Undone::Kept(format!(
                    "the VM {name} (pid {pid}) runs on whole disks: its restore finished \
                     copying; no start script was written"
                )))
            } else {
                Err(format!(
                    "the VM {name} (pid {pid}) from an interrupted instant restore runs and its \
                     disks {} are still being copied in: left running; run `coldclone recover` \
                     again once the copy has ended (query-block-jobs on its QMP socket), or \
                     stop the VM to have its overlays removed",
                    copying.join(", ")
                ))
            }
        }
    }
}
