//! `restore VM --as NEW --to DIR --instant`: the new VM runs at once, on a qcow2 overlay
//! per disk whose backing is that disk of the backup served read-only over NBD straight
//! from the repository (`coldclone serve --once`, one per disk); QEMU's `block-stream`
//! then copies the rest into the overlays while the guest runs (Proxmox's live-restore).
//! When a job ends QEMU drops the backing node, which closes its NBD connection, and the
//! exporter exits: the VM no longer depends on the repository.
//!
//! How the pieces live: the VM and the exporters are started in sessions of their own
//! (`setsid`), so they outlive this command; the copy is QEMU's own job. This command
//! stays in the foreground until every job has ended, showing progress, then checks that
//! no disk has a backing file left, makes sure the exporters are gone and only then
//! writes the start script: a start script in DIR means the disks are whole. If this
//! command is killed meanwhile (kill -9, Ctrl-C), the VM keeps running and QEMU's jobs go
//! on (the exporters do not depend on it either); no start script is written. If a job
//! fails, or the VM stops before its disks are whole, or anything fails before the copy
//! starts, the VM and the exporters are stopped and the overlays removed: the guest's
//! writes since it started are lost (as with Proxmox's live-restore), and nothing in DIR
//! is presented as a restore.

use crate::journal::{RestoreResource, RunJournal};
use anyhow::{bail, Context, Result};
use coldclone_backends::qemu::qmp::Qmp;
use coldclone_repository::Snapshot;
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Spec<'a> {
    pub config_path: &'a Path,
    pub vm: &'a str,
    pub backup: &'a [Snapshot],
    /// disk (= drive id) -> the overlay to make
    pub disks: &'a BTreeMap<String, PathBuf>,
    pub dir: &'a Path,
    pub new_name: &'a str,
    pub program: &'a Path,
    pub cwd: &'a Path,
    pub args: &'a [String],
    pub qmp: &'a Path,
    pub log: &'a Path,
    pub stream_rate_kib: u64,
    pub progress: bool,
    /// Whether files in the way (from an earlier restore) may be replaced.
    pub force: bool,
}

#[derive(Debug, Serialize)]
pub struct InstantReport {
    /// The VM's QEMU process (it runs on after this command).
    pub pid: u32,
    /// From the start of the restore until QEMU was running the guest.
    pub vm_started_after_ms: u64,
    /// From the start of the restore until every disk was whole in its overlay.
    pub streamed_after_ms: u64,
    pub streamed_bytes: u64,
    /// Every exporter exited once QEMU dropped its backing (false: one had to be ended).
    pub exports_ended_by_themselves: bool,
    pub log: PathBuf,
}

/// What this command started and made, undone unless `disarm`ed.
struct Undo {
    exporters: Vec<(String, Child)>,
    qemu: Option<Child>,
    /// Overlays and sockets made for this restore.
    overlays: Vec<PathBuf>,
    armed: bool,
}

impl Drop for Undo {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Our own children, by their handles: the VM first (it holds the exports).
        if let Some(q) = self.qemu.as_mut() {
            let _ = q.kill();
            let _ = q.wait();
        }
        for (_, e) in &mut self.exporters {
            let _ = e.kill();
            let _ = e.wait();
        }
        for o in &self.overlays {
            // The work folder is a folder of ours (random name); the rest are files.
            if o.is_dir() && !o.is_symlink() {
                let _ = std::fs::remove_dir_all(o);
            } else {
                let _ = std::fs::remove_file(o);
            }
        }
    }
}

fn log_file(log: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot write {}", log.display()))
}

fn log_tail(log: &Path) -> String {
    let t = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

/// In a session of its own: a Ctrl-C meant for this command does not reach it.
fn detached(c: &mut Command) -> &mut Command {
    // SAFETY: setsid(2) is async-signal-safe and touches only the new child.
    unsafe {
        c.pre_exec(|| {
            libc::setsid();
            Ok(())
        })
    }
}

/// NBD's unix socket paths are at most 107 bytes (sun_path).
const MAX_SOCKET_PATH: usize = 107;

/// Runs the instant restore. Everything it makes or starts is journaled in `j` first
/// (restore_journal.rs): the instant log and the overlays (made in a work folder, renamed
/// into place), each exporter (by its socket) and the VM (by its restore monitor), and it
/// passes the milestones `restore:exporters-started`, `restore:vm-started` and
/// `restore:copying`.
pub fn run(s: &Spec, j: &mut RunJournal) -> Result<InstantReport> {
    use coldclone_backends::Journal as _;
    let start = Instant::now();
    let exe = std::env::current_exe().context("cannot find the coldclone executable")?;
    let config = s
        .config_path
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", s.config_path.display()))?;
    let mut undo = Undo {
        exporters: Vec::new(),
        qemu: None,
        overlays: Vec::new(),
        armed: true,
    };
    // The restore's own monitor of the VM: also how `recover` knows the VM (its path is in
    // the VM's command line).
    let monitor = s.dir.join(format!(".{}.restore.qmp", s.new_name));
    if monitor.as_os_str().len() > MAX_SOCKET_PATH {
        bail!(
            "{}: too long for a unix socket; give a shorter --to",
            monitor.display()
        );
    }
    let (work_id, work) = super::restore_journal::make_work_dir(j, s.dir)?;
    undo.overlays.push(work.clone());
    {
        let staged = work.join("instant.log");
        std::fs::File::create_new(&staged)
            .with_context(|| format!("cannot write {}", staged.display()))?;
        super::restore_journal::journal_file(j, &staged, s.log, None)?;
        super::restore_vm::rename_into_place(&staged, s.log, s.force)?;
    }

    // One exporter per disk.
    let mut sockets = BTreeMap::new();
    for snap in s.backup {
        let sock = s.dir.join(format!(
            ".{}-{}.nbd",
            s.new_name,
            super::restore_vm::safe_name(&snap.disk)
        ));
        if sock.as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "{}: too long for a unix socket ({} bytes, at most {MAX_SOCKET_PATH}); give a \
                 shorter --to",
                sock.display(),
                sock.as_os_str().len()
            );
        }
        if std::fs::symlink_metadata(&sock).is_ok() {
            bail!(
                "{} exists (another instant restore of {} in {}?); coldclone does not remove \
                 what it did not make",
                sock.display(),
                s.new_name,
                s.dir.display()
            );
        }
        j.record(
            RestoreResource::RestoreExporter {
                socket: sock.clone(),
                instant_vm: monitor.clone(),
            }
            .into(),
        )?;
        let child = detached(
            Command::new(&exe)
                .arg("--config")
                .arg(&config)
                .args(["serve", s.vm, "--disk", &snap.disk, "--snapshot", &snap.id])
                .arg("--socket")
                .arg(&sock)
                .arg("--once")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_file(s.log)?),
        )
        .spawn()
        .context("cannot start the exporter (coldclone serve)")?;
        undo.exporters.push((snap.disk.clone(), child));
        sockets.insert(snap.disk.clone(), sock);
    }
    for (disk, child) in &mut undo.exporters {
        let sock = &sockets[disk.as_str()];
        let t = Instant::now();
        while std::fs::symlink_metadata(sock).is_err() {
            if let Ok(Some(st)) = child.try_wait() {
                bail!(
                    "the exporter of disk {disk} exited ({st}) before listening:\n{}",
                    log_tail(s.log)
                );
            }
            if t.elapsed() > Duration::from_secs(120) {
                bail!(
                    "the exporter of disk {disk} did not listen on {} within 120 s",
                    sock.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    j.milestone("restore:exporters-started")?;

    // The overlays: qcow2 over the export. -u: the size is given, so qemu-img does not
    // connect (the exporter serves one client, the VM).
    for snap in s.backup {
        let overlay = &s.disks[&snap.disk];
        let backing = format!(
            "json:{}",
            json!({
                "driver": "raw",
                "file": {
                    "driver": "nbd",
                    "server": {"type": "unix", "path": sockets[&snap.disk]},
                    "export": snap.disk,
                },
            })
        );
        // The export announces whole 512-byte sectors (serve.rs).
        let size = snap.size.div_ceil(512) * 512;
        let staged = work.join(format!(
            "{}.qcow2",
            super::restore_vm::safe_name(&snap.disk)
        ));
        let out = Command::new("qemu-img")
            .args([
                "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", &backing,
            ])
            .arg(&staged)
            .arg(size.to_string())
            .output()
            .context("cannot run qemu-img (install qemu-utils)")?;
        if !out.status.success() {
            bail!(
                "qemu-img create of {} failed: {}",
                overlay.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        super::restore_journal::journal_file(j, &staged, overlay, Some(&monitor))?;
        super::restore_vm::rename_into_place(&staged, overlay, s.force)?;
        undo.overlays.push(overlay.clone());
    }
    // The work folder is ours (random name, made above): only staged files were in it.
    let _ = std::fs::remove_dir_all(&work);
    if std::fs::symlink_metadata(&work).is_err() {
        j.removed_id(work_id)?;
    }

    // The VM, with a second QMP monitor of the restore's own: it holds that one for the
    // whole copy (QEMU's events arrive there), and the VM's own socket stays free.
    let _ = std::fs::remove_file(s.qmp);
    let _ = std::fs::remove_file(&monitor);
    undo.overlays.push(monitor.clone());
    let monitor_arg = super::restore_journal::monitor_chardev(&monitor);
    j.record(
        RestoreResource::RestoredVm {
            monitor: monitor.clone(),
            name: s.new_name.to_string(),
        }
        .into(),
    )?;
    let child = detached(
        Command::new(s.program)
            .args(s.args)
            .args(["-chardev", &monitor_arg])
            .args(["-mon", "chardev=coldclone-restore,mode=control"])
            .current_dir(s.cwd)
            .stdin(Stdio::null())
            .stdout(log_file(s.log)?)
            .stderr(log_file(s.log)?),
    )
    .spawn()
    .with_context(|| format!("cannot start {}", s.program.display()))?;
    let pid = child.id();
    undo.qemu = Some(child);
    let alive = |undo: &mut Undo| {
        undo.qemu
            .as_mut()
            .is_some_and(|q| matches!(q.try_wait(), Ok(None)))
    };
    let mut q = {
        let mut alive_now = || alive(&mut undo);
        Qmp::connect_retry(&monitor, Duration::from_secs(120), &mut alive_now).with_context(
            || {
                format!(
                    "the new VM did not open its QMP socket:\n{}",
                    log_tail(s.log)
                )
            },
        )?
    };
    // The QEMU on the socket is the one we started (not one that took the path meanwhile).
    if q.peer_pid()? != pid {
        bail!(
            "{} is served by another process than the VM started",
            monitor.display()
        );
    }
    let status = q.status()?;
    if status != "running" {
        bail!("the new VM is {status}, not running");
    }
    let vm_started_after_ms = start.elapsed().as_millis() as u64;
    j.milestone("restore:vm-started")?;

    // QEMU's defaults: the job finalizes and dismisses itself when done, which drops the
    // backing node and so the NBD connection, with or without this command.
    let speed = s.stream_rate_kib.saturating_mul(1024);
    for disk in s.disks.keys() {
        q.execute(
            "block-stream",
            json!({"job-id": job_id(disk), "device": disk, "speed": speed}),
        )
        .with_context(|| format!("block-stream of disk {disk}"))?;
    }
    j.milestone("restore:copying")?;

    let mut done: BTreeMap<String, u64> = BTreeMap::new();
    let mut last_print = Instant::now();
    while done.len() < s.disks.len() {
        if !alive(&mut undo) {
            bail!(
                "the new VM stopped before its disks were copied in ({} of {} done); its \
                 overlays depend on the export and were removed:\n{}",
                done.len(),
                s.disks.len(),
                log_tail(s.log)
            );
        }
        let ended = q.wait_event("a copy job to end", Duration::from_millis(500), &|e| {
            matches!(
                e.name.as_str(),
                "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED"
            )
        });
        match ended {
            Ok(e) => {
                let id = e.data["device"].as_str().unwrap_or("");
                let Some(disk) = s.disks.keys().find(|d| job_id(d) == id) else {
                    continue;
                };
                if e.name == "BLOCK_JOB_CANCELLED" {
                    bail!(
                        "the copy of disk {disk} was cancelled (the new VM quit, or the job was \
                         cancelled); the VM is stopped and its overlays, which depend on the \
                         export, were removed"
                    );
                }
                if let Some(err) = e.data["error"].as_str() {
                    bail!(
                        "the copy of disk {disk} failed: {err}; the VM is stopped and its \
                         overlays, which depend on the export, were removed"
                    );
                }
                let len = e.data["len"].as_u64().unwrap_or(0);
                if e.data["offset"].as_u64() != Some(len) {
                    bail!("the copy of disk {disk} ended short: {}", e.data);
                }
                done.insert(disk.clone(), len);
                continue;
            }
            Err(coldclone_backends::BackendError::Timeout { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        if s.progress && last_print.elapsed() > Duration::from_secs(2) {
            let jobs = q.execute("query-block-jobs", json!({}))?;
            let shown: Vec<String> = jobs
                .as_array()
                .into_iter()
                .flatten()
                .map(|j| {
                    format!(
                        "{} {:.1}/{:.1} MiB",
                        j["device"].as_str().unwrap_or("?"),
                        j["offset"].as_u64().unwrap_or(0) as f64 / 1048576.0,
                        j["len"].as_u64().unwrap_or(0) as f64 / 1048576.0
                    )
                })
                .collect();
            eprintln!("copying in while {} runs: {}", s.new_name, shown.join(", "));
            last_print = Instant::now();
        }
    }
    let streamed_after_ms = start.elapsed().as_millis() as u64;

    // No disk depends on the export any more.
    let blocks = q.execute("query-block", json!({}))?;
    drop(q);
    // Nobody else is to reach the restore's monitor: QEMU keeps listening, on no path.
    let _ = std::fs::remove_file(&monitor);
    for disk in s.disks.keys() {
        let b = blocks
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["device"].as_str() == Some(disk.as_str()))
            .with_context(|| format!("the new VM has no disk {disk}"))?;
        if !b["inserted"]["image"]["backing-image"].is_null()
            || !b["inserted"]["backing_file"].is_null()
        {
            bail!(
                "disk {disk} still has a backing file after its copy: {}",
                b["inserted"]
            );
        }
    }
    // The exporters end when QEMU drops their connection; one that has not after 60 s is
    // ended (ours: started above, by handle) and its socket removed (made for this restore).
    let mut exports_ended_by_themselves = true;
    for (disk, e) in &mut undo.exporters {
        let t = Instant::now();
        while matches!(e.try_wait(), Ok(None)) && t.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(100));
        }
        if matches!(e.try_wait(), Ok(None)) {
            tracing::warn!("the exporter of disk {disk} still ran after its copy: ended");
            exports_ended_by_themselves = false;
            let _ = e.kill();
            let _ = e.wait();
            let _ = std::fs::remove_file(&sockets[disk.as_str()]);
        }
    }
    undo.armed = false;
    Ok(InstantReport {
        pid,
        vm_started_after_ms,
        streamed_after_ms,
        streamed_bytes: done.values().sum(),
        exports_ended_by_themselves,
        log: s.log.to_path_buf(),
    })
}

fn job_id(disk: &str) -> String {
    format!("coldclone-restore-{disk}")
}
