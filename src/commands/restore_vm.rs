//! `coldclone restore VM --as NEW --to DIR [--snapshot ID] [--force]`: a new VM made from
//! a backup: every disk of that backup as a qcow2 image, and a start script with the
//! original's command line as kept with the backup, put through the clone's allow-list,
//! with a new name, UUID and MACs, and NICs attached to nothing (no network until the
//! user attaches them). The disks are read through a private NBD export of the
//! repository (`serve`'s), so no raw copy is written first.

use super::open_repository;
use super::serve::with_private_export;
use crate::config::Config;
use crate::journal::RunJournal;
use crate::progress::stderr_is_terminal;
use anyhow::{bail, Context, Result};
use coldclone_backends::qemu::cmdline;
use coldclone_backends::util::random_hex;
use coldclone_backends::VmDefinitionKind;
use coldclone_repository::{Repository, Snapshot};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Request<'a> {
    pub vm: &'a str,
    pub new_name: &'a str,
    pub snapshot: Option<&'a str>,
    pub to: &'a Path,
    pub force: bool,
    pub json: bool,
    /// `--instant`: boot at once over the export, copy in the background.
    pub instant: Option<Instant<'a>>,
}

pub struct Instant<'a> {
    /// The config file, for the exporters (`coldclone serve`) the restore starts.
    pub config_path: &'a Path,
    pub stream_rate_kib: u64,
}

#[derive(Debug, Serialize)]
pub struct RestoredVm {
    pub name: String,
    pub uuid: String,
    pub from_vm: String,
    pub backup: String,
    pub taken: String,
    pub consistency: String,
    pub disks: BTreeMap<String, PathBuf>,
    pub start_script: PathBuf,
    pub qmp_socket: PathBuf,
    pub console_log: PathBuf,
    /// The NICs' taps: made by QEMU when it starts, attached to nothing.
    pub taps: Vec<String>,
    pub macs: Vec<String>,
    /// What the user must do before the VM runs as the original did.
    pub notes: Vec<String>,
    /// `--instant`: the VM that runs, and how its disks were copied in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instant: Option<super::restore_instant::InstantReport>,
}

/// A disk name as it may appear in a file name.
pub(crate) fn safe_name(disk: &str) -> String {
    disk.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The kept QEMU definition (see `QemuBackend::vm_definition`).
#[derive(serde::Deserialize)]
struct QemuDefinition {
    program: PathBuf,
    cwd: PathBuf,
    argv: Vec<String>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
}

/// The snapshots of one backup of `vm`: the run `--snapshot` names (a run id, or any of
/// its disks' snapshot ids), or the latest.
pub fn backup_of(repo: &Repository, vm: &str, snapshot: Option<&str>) -> Result<Vec<Snapshot>> {
    let snaps: Vec<Snapshot> = repo
        .snapshots()?
        .into_iter()
        .filter(|s| s.vm == vm)
        .collect();
    if snaps.is_empty() {
        bail!("no backup of vm {vm:?} in the repository (see `coldclone snapshots`)");
    }
    let run = match snapshot.map(str::trim) {
        Some("") => bail!("--snapshot is empty: name a backup (run) id or a snapshot id"),
        Some(id)
            if snaps
                .iter()
                .any(|s| s.tags.get("run").map(String::as_str) == Some(id)) =>
        {
            id.to_string()
        }
        Some(id) => {
            let s = repo.find_snapshot(id)?;
            if s.vm != vm {
                bail!("snapshot {} is of vm {:?}, not {vm:?}", s.short_id(), s.vm);
            }
            s.tags
                .get("run")
                .cloned()
                .with_context(|| format!("snapshot {} belongs to no backup run", s.short_id()))?
        }
        None => {
            let mut latest: Option<Snapshot> = None;
            let disks: std::collections::BTreeSet<&str> =
                snaps.iter().map(|s| s.disk.as_str()).collect();
            for d in disks {
                if let Some(s) = repo.find_latest(vm, d)? {
                    if latest.as_ref().is_none_or(|l| s.time_unix > l.time_unix) {
                        latest = Some(s);
                    }
                }
            }
            latest
                .and_then(|s| s.tags.get("run").cloned())
                .with_context(|| format!("the latest backup of vm {vm:?} has no run id"))?
        }
    };
    let mut of_run: Vec<Snapshot> = snaps
        .into_iter()
        .filter(|s| s.tags.get("run") == Some(&run))
        .collect();
    of_run.sort_by(|a, b| a.disk.cmp(&b.disk));
    Ok(of_run)
}

/// Writes `snap` as a qcow2 image at `dest`, through a temporary file of ours beside it
/// that is renamed into place when whole (so a failure leaves `dest` as it was). An
/// existing `dest` is replaced only with `replace`: without it the rename itself refuses
/// (RENAME_NOREPLACE), so a file that appeared meanwhile is not lost either.
///
/// With a journal (`restore --as`), the work folder and the image are journaled before
/// they are made or put in place (restore_journal.rs), and the milestones
/// `restore:converting` and `restore:disk-written` are passed.
pub fn snapshot_to_qcow2(
    repo: &Repository,
    snap: &Snapshot,
    dest: &Path,
    replace: bool,
    progress: bool,
    mut journal: Option<&mut RunJournal>,
) -> Result<()> {
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let (work_id, work) = match journal.as_deref_mut() {
        Some(j) => {
            let (id, w) = super::restore_journal::make_work_dir(j, parent)?;
            (Some(id), w)
        }
        None => {
            let work = parent.join(format!(
                "{}{}",
                super::restore_journal::WORK_PREFIX,
                random_hex(6)
            ));
            std::fs::create_dir(&work)
                .with_context(|| format!("cannot make {}", work.display()))?;
            std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o700))?;
            (None, work)
        }
    };
    // Inside our own folder: never a file of someone else's.
    let partial = work.join("image.qcow2.partial");
    let mut j2 = journal.as_deref_mut();
    let result = with_private_export(repo, &snap.id, "disk", &work, |url| {
        if let Some(j) = j2.as_deref_mut() {
            coldclone_backends::Journal::milestone(j, "restore:converting")?;
        }
        let mut c = Command::new("qemu-img");
        c.args(["convert", "-f", "raw", "-O", "qcow2"]);
        if progress {
            c.arg("-p");
        }
        let out = c
            .arg(url)
            .arg(&partial)
            .stdout(if progress {
                std::process::Stdio::inherit()
            } else {
                std::process::Stdio::null()
            })
            .output()
            .context("cannot run qemu-img (install qemu-utils)")?;
        if !out.status.success() {
            bail!(
                "qemu-img convert of snapshot {} failed: {}",
                snap.short_id(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    })
    .and_then(|()| {
        std::fs::File::open(&partial)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot sync {}", partial.display()))?;
        if let Some(j) = j2 {
            super::restore_journal::journal_file(j, &partial, dest, None)?;
        }
        rename_into_place(&partial, dest, replace)
    });
    // The folder is ours (made above, random name): only its socket and image can be in it.
    let _ = std::fs::remove_dir_all(&work);
    if let (Some(j), Some(id)) = (journal.as_deref_mut(), work_id) {
        if std::fs::symlink_metadata(&work).is_err() {
            j.removed_id(id)?;
        }
    }
    result?;
    if let Some(j) = journal {
        coldclone_backends::Journal::milestone(j, "restore:disk-written")?;
    }
    Ok(())
}

/// Renames `from` to `to`; without `replace`, refuses (atomically) when `to` exists.
pub(crate) fn rename_into_place(from: &Path, to: &Path, replace: bool) -> Result<()> {
    if replace {
        return std::fs::rename(from, to)
            .with_context(|| format!("cannot rename {} to {}", from.display(), to.display()));
    }
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes());
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: two valid NUL-terminated paths; renameat2 reads them only.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            bail!(
                "{} exists (it appeared during the restore); nothing was replaced: give another \
                 target, or --force to replace it",
                to.display()
            );
        }
        return Err(e)
            .with_context(|| format!("cannot rename {} to {}", from.display(), to.display()));
    }
    Ok(())
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn new_mac() -> String {
    // QEMU's own prefix 52:54:00 (locally administered), three random bytes.
    let h = random_hex(3);
    format!("52:54:00:{}:{}:{}", &h[0..2], &h[2..4], &h[4..6])
}

fn new_uuid() -> String {
    let h = random_hex(16);
    // Version 4, variant 1.
    let v = format!("4{}", &h[13..16]);
    let variant = ["8", "9", "a", "b"][usize::from(h.as_bytes()[16] % 4)];
    format!(
        "{}-{}-{}-{}{}-{}",
        &h[0..8],
        &h[8..12],
        v,
        variant,
        &h[17..20],
        &h[20..32]
    )
}

pub fn run(cfg: &Config, req: &Request) -> Result<()> {
    if !valid_name(req.new_name) {
        bail!(
            "--as {:?}: a VM name is 1-64 letters, digits, '-', '_' or '.', not starting with '.'",
            req.new_name
        );
    }
    let repo = open_repository(cfg)?;
    let backup = backup_of(&repo, req.vm, req.snapshot)?;
    let first = backup.first().context("the backup has no disks")?.clone();
    let run_id = first.tags.get("run").cloned().unwrap_or_default();
    let Some(config) = backup.iter().find_map(|s| s.vm_config.clone()) else {
        bail!(
            "backup {run_id} of vm {:?} holds no VM definition (it was made before coldclone kept \
             them); restore its disks one by one with `restore {} --disk NAME --to FILE`",
            req.vm,
            req.vm
        );
    };
    let kind = VmDefinitionKind::parse(&config.kind);
    // The other backends' restores have their own flags (restore_xapi.rs, restore_xl.rs).
    match kind {
        Some(VmDefinitionKind::XapiVmRecord) => bail!(
            "backup {run_id} of vm {:?} is of a XAPI VM: restore it with --sr SR [--network NET]",
            req.vm
        ),
        Some(VmDefinitionKind::XlJson) => bail!(
            "backup {run_id} of vm {:?} is of an xl domain: restore it with --vg VG",
            req.vm
        ),
        _ => {}
    }
    if kind != Some(VmDefinitionKind::QemuCommandLine) {
        bail!(
            "backup {run_id} of vm {:?} holds a {} definition; `restore --as` makes QEMU VMs so \
             far: restore its disks with `restore {} --disk NAME --to FILE`",
            req.vm,
            config.kind,
            req.vm
        );
    }
    let def: QemuDefinition = serde_json::from_str(&config.text)
        .context("the backup's QEMU definition cannot be read")?;
    let program_ok = def.program.is_absolute()
        && def
            .program
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("qemu-system-"));
    if !program_ok {
        bail!(
            "the backup's definition names {} as QEMU: not an absolute path to qemu-system-*; \
             refused",
            def.program.display()
        );
    }
    let options = cmdline::parse(&def.argv)
        .context("the backup's QEMU command line is not one coldclone can restore")?;

    std::fs::create_dir_all(req.to).with_context(|| format!("cannot make {}", req.to.display()))?;
    let dir = req
        .to
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", req.to.display()))?;
    let file = |suffix: &str| dir.join(format!("{}{suffix}", req.new_name));
    let mut disks = BTreeMap::new();
    for s in &backup {
        let safe = safe_name(&s.disk);
        disks.insert(s.disk.clone(), file(&format!("-{safe}.qcow2")));
    }
    if disks.len() != backup.len() {
        bail!("two disks of the backup have the same name: refused");
    }
    let script = file(".sh");
    let definition = file(".definition.json");
    let qmp = file(".qmp");
    let console = file(".console.log");
    let pidfile = file(".pid");
    // Never a destroyed restore target: what is there stays unless --force.
    let instant_log = file(".instant.log");
    let mut targets: Vec<&PathBuf> = disks.values().chain([&script, &definition]).collect();
    if req.instant.is_some() {
        targets.push(&instant_log);
    }
    if !req.force {
        if let Some(t) = targets
            .iter()
            .find(|t| std::fs::symlink_metadata(t).is_ok())
        {
            bail!(
                "{} exists; give another --to or --as, or --force to replace it",
                t.display()
            );
        }
    }
    // A VM restored here earlier and still running: never its disks, whatever --force says.
    if std::os::unix::net::UnixStream::connect(&qmp).is_ok() {
        bail!(
            "{} answers: a VM restored as {} earlier runs from {}; stop it, or give another --as \
             or --to",
            qmp.display(),
            req.new_name,
            dir.display()
        );
    }
    let uuid = new_uuid();
    let macs: Vec<String> = (0..options.len()).map(|_| new_mac()).collect();
    let tap_prefix = format!("r{}", random_hex(3));
    let drive_images: BTreeMap<String, String> = disks
        .iter()
        .map(|(k, v)| (k.clone(), v.display().to_string()))
        .collect();
    let as_str = |p: &Path| p.display().to_string();
    let command = cmdline::restored_command(
        &options,
        &cmdline::RestoreSpec {
            name: req.new_name,
            uuid: &uuid,
            qmp_socket: &as_str(&qmp),
            pidfile: &as_str(&pidfile),
            console_log: &as_str(&console),
            disks: &drive_images,
            tap_prefix: &tap_prefix,
            macs: &macs,
        },
    )
    .context("the backup's QEMU command line cannot be made into a new VM")?;
    let used_macs: Vec<String> = macs
        .iter()
        .filter(|m| command.args.iter().any(|a| a.contains(m.as_str())))
        .cloned()
        .collect();

    let progress = stderr_is_terminal() && !req.json;
    let cwd = if def.cwd.is_dir() {
        def.cwd.clone()
    } else {
        dir.clone()
    };
    // Journaled from here: a restore killed from now on is removed by `recover`.
    let mut journal = super::restore_journal::start(&cfg.state_dir, req.vm, req.new_name)?;
    let j = &mut journal;
    let made = (|| -> Result<_> {
        let instant = match &req.instant {
            None => {
                let mut written: Vec<&PathBuf> = Vec::new();
                for s in &backup {
                    let dest = &disks[&s.disk];
                    if progress {
                        eprintln!(
                            "restoring {} ({} bytes) to {}",
                            s.disk,
                            s.size,
                            dest.display()
                        );
                    }
                    if let Err(e) = snapshot_to_qcow2(&repo, s, dest, req.force, progress, Some(j))
                    {
                        // No half of a VM left behind: the disks this run wrote go too.
                        for w in written {
                            let _ = std::fs::remove_file(w);
                        }
                        return Err(e);
                    }
                    written.push(dest);
                }
                None
            }
            Some(i) => Some(super::restore_instant::run(
                &super::restore_instant::Spec {
                    config_path: i.config_path,
                    vm: req.vm,
                    backup: &backup,
                    disks: &disks,
                    dir: &dir,
                    new_name: req.new_name,
                    program: &def.program,
                    cwd: &cwd,
                    args: &command.args,
                    qmp: &qmp,
                    log: &instant_log,
                    stream_rate_kib: i.stream_rate_kib,
                    progress,
                    force: req.force,
                },
                j,
            )?),
        };

        let mut notes = Vec::new();
        if def.argv.iter().any(|a| a.contains(cmdline::SECRET_REMOVED)) {
            notes.push(format!(
                "the original's secrets were not kept with the backup: edit {} where it says {}",
                script.display(),
                cmdline::SECRET_REMOVED
            ));
        }
        if !command.taps.is_empty() {
            notes.push(format!(
                "no network: its NICs are the taps {} (made by QEMU, attached to nothing); attach \
             them once it runs, e.g. `ip link set {} master BRIDGE up`",
                command.taps.join(", "),
                command.taps[0]
            ));
        }
        let mut text = String::from("#!/bin/sh\n");
        text.push_str(&format!(
            "# VM {} restored by coldclone from backup {run_id} of VM {} (taken {}, {}).\n\
         # QMP: {}; console: {}.\n",
            req.new_name,
            req.vm,
            first.time,
            first.consistency,
            qmp.display(),
            console.display()
        ));
        for n in &notes {
            text.push_str(&format!("# {n}\n"));
        }
        text.push_str(&format!(
            "cd {} || exit 1\n",
            shell_quote(&cwd.display().to_string())
        ));
        text.push_str(&format!(
            "exec {}",
            shell_quote(&def.program.display().to_string())
        ));
        for a in &command.args {
            text.push_str(" \\\n  ");
            text.push_str(&shell_quote(a));
        }
        text.push('\n');
        write_staged(
            j,
            &dir,
            &definition,
            config.text.as_bytes(),
            0o600,
            req.force,
        )?;
        // Last: a start script means the restore is whole.
        write_staged(j, &dir, &script, text.as_bytes(), 0o700, req.force)?;
        Ok((instant, notes))
    })();
    let (instant, notes) = match made {
        Ok(m) => m,
        Err(e) => {
            super::restore_journal::abandon(journal);
            return Err(e);
        }
    };
    super::restore_journal::finish(journal)?;

    let restored = RestoredVm {
        name: req.new_name.to_string(),
        uuid,
        from_vm: req.vm.to_string(),
        backup: run_id,
        taken: first.time.clone(),
        consistency: first.consistency.clone(),
        disks,
        start_script: script,
        qmp_socket: qmp,
        console_log: console,
        taps: command.taps,
        macs: used_macs,
        notes,
        instant,
    };
    let mut out = std::io::stdout().lock();
    if req.json {
        writeln!(out, "{}", serde_json::to_string(&restored)?)?;
    } else {
        writeln!(
            out,
            "restored vm {} as {} from backup {} (taken {}, {}): start it with {}",
            restored.from_vm,
            restored.name,
            restored.backup,
            restored.taken,
            restored.consistency,
            restored.start_script.display()
        )?;
        for (d, p) in &restored.disks {
            writeln!(out, "  disk {d}: {}", p.display())?;
        }
        for n in &restored.notes {
            writeln!(out, "  note: {n}")?;
        }
        if let Some(i) = &restored.instant {
            writeln!(
                out,
                "  running now (pid {}, QMP {}): started after {:.1} s, its disks copied in \
                 after {:.1} s; the export has stopped",
                i.pid,
                restored.qmp_socket.display(),
                i.vm_started_after_ms as f64 / 1000.0,
                i.streamed_after_ms as f64 / 1000.0
            )?;
        }
    }
    Ok(())
}

/// Writes `bytes` to `dest` (mode `mode`) through a journaled work folder in `dir`: the
/// file is made there, journaled, then renamed into place (replacing only with `replace`).
fn write_staged(
    j: &mut RunJournal,
    dir: &Path,
    dest: &Path,
    bytes: &[u8],
    mode: u32,
    replace: bool,
) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let (work_id, work) = super::restore_journal::make_work_dir(j, dir)?;
    let staged = work.join("file");
    let written = (|| -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&staged)
            .with_context(|| format!("cannot write {}", staged.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        super::restore_journal::journal_file(j, &staged, dest, None)?;
        rename_into_place(&staged, dest, replace)
    })();
    // Ours: made above with a random name.
    let _ = std::fs::remove_dir_all(&work);
    if std::fs::symlink_metadata(&work).is_err() {
        j.removed_id(work_id)?;
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_uuids_and_macs_are_well_formed() {
        assert!(valid_name("web1-restored"));
        assert!(!valid_name("../x"));
        assert!(!valid_name(".hidden"));
        assert!(!valid_name("a b"));
        let u = new_uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        let m = new_mac();
        assert!(m.starts_with("52:54:00:") && m.len() == 17, "{m}");
        assert_eq!(shell_quote("a'b"), "'a'\\''b'");
    }
}
