//! `coldclone files VM [--snapshot ID] ls [FS[:PATH]]` and
//! `coldclone files VM [--snapshot ID] get FS:PATH... --to DIR [--force]`: single files
//! and folders out of a backup, without restoring its disks and without mounting
//! anything in the host kernel. Every disk of the backup is served read-only from the
//! repository on a private NBD socket (`serve`'s export) and added, read-only, to one
//! libguestfs appliance (its own small VM: the guest's partition tables, LVM metadata
//! and file systems are parsed by the appliance's kernel, never the host's). Files come
//! out as guestfish `download`/`tar-out` streams that we write ourselves (`extract`),
//! so what the guest names cannot land outside `--to`.
//!
//! File systems are named as `ls` without a path lists them: `DISK` (a file system on a
//! whole disk), `DISK:N` (partition N), `VG/LV` (an LVM logical volume), or the
//! appliance's device (`/dev/sda1`). A path is `FS:/PATH`, e.g. `disk0:1:/etc/hostname`.

pub mod extract;
pub mod guestfish;

use super::open_repository;
use super::restore_vm::backup_of;
use super::serve::with_private_export;
use crate::config::Config;
use crate::progress::stderr_is_terminal;
use anyhow::{bail, Context, Result};
use coldclone_backends::util::random_hex;
use coldclone_repository::{Repository, Snapshot};
use extract::{Extracted, Meta};
use guestfish::{printable, quote, FileKind, Guestfish, Stat};
use serde::Serialize;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub enum Action {
    Ls {
        path: Option<String>,
    },
    Get {
        paths: Vec<String>,
        to: PathBuf,
        force: bool,
    },
}

/// A file named by the user: a file system and an absolute path in it.
#[derive(Debug, Clone, PartialEq)]
struct Spec {
    fs: String,
    /// Normalised: starts with '/', no empty, '.' or '..' components, no trailing '/'.
    path: String,
}

impl Spec {
    fn parse(s: &str) -> Result<Spec> {
        let Some(i) = s.find(":/") else {
            bail!(
                "{s:?}: name a file as FS:/PATH, e.g. disk0:1:/etc/hostname or vg0/root:/etc \
                 (`coldclone files VM ls` lists the file systems)"
            );
        };
        let (fs, path) = (&s[..i], &s[i + 1..]);
        if fs.is_empty() {
            bail!("{s:?}: no file system before ':/'");
        }
        let mut comps = Vec::new();
        for c in path.split('/') {
            match c {
                "" => {}
                "." | ".." => bail!(
                    "{s:?}: give the path without '.' or '..' (symlinks and '..' are resolved \
                     inside the guest, from its root)"
                ),
                c => comps.push(c),
            }
        }
        Ok(Spec {
            fs: fs.to_string(),
            path: format!("/{}", comps.join("/")),
        })
    }

    /// (parent, name) of a path that is not the root.
    fn split(&self) -> Option<(&str, &str)> {
        let i = self.path.rfind('/')?;
        let name = &self.path[i + 1..];
        if name.is_empty() {
            return None;
        }
        Some((if i == 0 { "/" } else { &self.path[..i] }, name))
    }

    /// The name the extracted copy gets in `--to`.
    fn top_name(&self) -> String {
        match self.split() {
            Some((_, name)) => name.to_string(),
            // A whole file system: after its name (`disk0:1` -> `disk0_1`).
            None => self.fs.replace(['/', ':'], "_"),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Filesystem {
    /// How to name it: DISK, DISK:N or VG/LV.
    pub name: String,
    /// The appliance's device (also accepted as a name).
    pub device: String,
    pub fstype: String,
    pub size: Option<u64>,
    /// Why it cannot be read, when it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

fn lvm_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('-')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '_' | '.' | '-'))
}

fn disk_name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Our name for an appliance device, given the appliance's disk devices in the order
/// of the backup's disks.
fn friendly(dev: &str, disks: &[(String, String)]) -> Option<String> {
    // Longest device first: /dev/sdaa before /dev/sda.
    let mut by_len: Vec<&(String, String)> = disks.iter().collect();
    by_len.sort_by_key(|(d, _)| std::cmp::Reverse(d.len()));
    for (d, name) in by_len {
        if dev == d {
            return Some(name.clone());
        }
        if let Some(rest) = dev.strip_prefix(d.as_str()) {
            if !rest.is_empty() && rest.len() <= 3 && rest.chars().all(|c| c.is_ascii_digit()) {
                return Some(format!("{name}:{rest}"));
            }
        }
    }
    let rest = dev.strip_prefix("/dev/")?;
    let (vg, lv) = rest.split_once('/')?;
    (vg != "mapper" && lvm_name_ok(vg) && lvm_name_ok(lv)).then(|| format!("{vg}/{lv}"))
}

/// The lines of a command's output (guest-derived: checked by the callers).
fn lines(out: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(out)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// One value printed by guestfish: its output less the one newline after it.
fn single(mut out: Vec<u8>) -> Vec<u8> {
    if out.last() == Some(&b'\n') {
        out.pop();
    }
    out
}

/// The session over one backup's disks: the appliance and what it found.
struct Session {
    g: Guestfish,
    work: PathBuf,
    filesystems: Vec<Filesystem>,
    mounted: Option<String>,
    transfers: u32,
}

impl Session {
    fn start(urls: &[String], disks: &[String], work: &Path) -> Result<Session> {
        if stderr_is_terminal() {
            eprintln!(
                "starting the libguestfs appliance over {} disk(s) (tens of seconds; minutes \
                 without KVM)...",
                urls.len()
            );
        }
        let mut g = Guestfish::launch(urls)?;
        let devices = lines(&g.command("list-devices")?);
        if devices.len() != disks.len() {
            bail!(
                "the appliance shows {} disks for the backup's {}: refused",
                devices.len(),
                disks.len()
            );
        }
        for d in &devices {
            let ok = d
                .strip_prefix("/dev/sd")
                .is_some_and(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase()));
            if !ok {
                bail!(
                    "the appliance named a disk {}: not understood",
                    printable(d.as_bytes())
                );
            }
        }
        let pairs: Vec<(String, String)> = devices.into_iter().zip(disks.iter().cloned()).collect();
        // VG names come from the guest's LVM metadata. Two VGs of one name (on two disks
        // of this VM) make /dev/VG/LV ambiguous: such LVs are listed, not read.
        let vgs = lines(&g.command("vgs")?);
        let mut seen = BTreeMap::new();
        for v in &vgs {
            *seen.entry(v.clone()).or_insert(0u32) += 1;
        }
        let mut filesystems = Vec::new();
        for l in lines(&g.command("list-filesystems")?) {
            let Some((dev, fstype)) = l.rsplit_once(": ") else {
                continue;
            };
            let dev_ok = dev.starts_with("/dev/")
                && !dev.contains(":/")
                && dev
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "/_.+-".contains(c));
            if !dev_ok {
                filesystems.push(Filesystem {
                    name: printable(dev.as_bytes()),
                    device: printable(dev.as_bytes()),
                    fstype: printable(fstype.as_bytes()),
                    size: None,
                    note: Some("a device name coldclone does not address".into()),
                });
                continue;
            }
            let name = friendly(dev, &pairs).unwrap_or_else(|| dev.to_string());
            let mut note = None;
            if let Some((vg, _)) = name.split_once('/').filter(|_| !name.starts_with('/')) {
                if seen.get(vg).copied().unwrap_or(0) > 1 {
                    note = Some(format!(
                        "two volume groups named {vg} on this VM's disks: not read (ambiguous)"
                    ));
                }
            }
            let fstype_ok = fstype
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
            filesystems.push(Filesystem {
                name,
                device: dev.to_string(),
                fstype: if fstype_ok {
                    fstype.to_string()
                } else {
                    printable(fstype.as_bytes())
                },
                size: None,
                note,
            });
        }
        Ok(Session {
            g,
            work: work.to_path_buf(),
            filesystems,
            mounted: None,
            transfers: 0,
        })
    }

    fn find(&self, fs: &str) -> Result<Filesystem> {
        let found = self
            .filesystems
            .iter()
            .find(|f| f.name == fs || f.device == fs)
            .cloned();
        let Some(f) = found else {
            let names: Vec<&str> = self.filesystems.iter().map(|f| f.name.as_str()).collect();
            bail!("no file system {fs:?} in this backup; it has {names:?}");
        };
        if let Some(n) = &f.note {
            bail!("file system {}: {n}", f.name);
        }
        if matches!(f.fstype.as_str(), "swap" | "unknown") {
            bail!(
                "{} holds no file system libguestfs recognises ({}): the guest may have left \
                 it damaged, or it is not a file system",
                f.name,
                f.fstype
            );
        }
        Ok(f)
    }

    /// Mounts `fs` read-only as the appliance's root (one at a time).
    fn mount(&mut self, fs: &str) -> Result<Filesystem> {
        let f = self.find(fs)?;
        if self.mounted.as_deref() != Some(f.device.as_str()) {
            if self.mounted.take().is_some() {
                self.g.command("umount-all")?;
            }
            self.g
                .command(&format!("mount-ro {} /", quote(f.device.as_bytes())?))
                .with_context(|| {
                    format!(
                        "cannot mount {} ({}) read-only in the appliance: the file system is \
                         damaged or of a kind libguestfs does not read",
                        f.name, f.fstype
                    )
                })?;
            self.mounted = Some(f.device.clone());
        }
        Ok(f)
    }

    /// `path` with its symlinks resolved inside the guest (libguestfs's realpath runs
    /// chrooted in the guest's root, so an absolute link means the guest's root).
    fn realpath(&mut self, path: &str) -> Result<Vec<u8>> {
        let out = single(
            self.g
                .command(&format!("realpath {}", quote(path.as_bytes())?))?,
        );
        if out.first() != Some(&b'/') || out.contains(&0) {
            bail!(
                "the appliance resolved {path} to {}: not an absolute path",
                printable(&out)
            );
        }
        Ok(out)
    }

    fn lstat(&mut self, path: &[u8]) -> Result<Stat> {
        let out = self.g.command(&format!("lstatns {}", quote(path)?))?;
        guestfish::parse_stat(&out)
            .with_context(|| format!("the status of {} cannot be read", printable(path)))
    }

    fn readlink(&mut self, path: &[u8]) -> Result<Vec<u8>> {
        let out = single(self.g.command(&format!("readlink {}", quote(path)?))?);
        if out.contains(&0) {
            bail!("the symlink {} has a NUL byte", printable(path));
        }
        Ok(out)
    }

    /// The names in a guest directory (`ls0`: NUL-separated, into a file of ours).
    fn names(&mut self, dir: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.transfers += 1;
        let file = self.work.join(format!("names{}", self.transfers));
        self.g.command(&format!(
            "ls0 {} {}",
            quote(dir)?,
            quote(file.as_os_str().as_bytes())?
        ))?;
        let bytes =
            std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
        let _ = std::fs::remove_file(&file);
        let mut names = Vec::new();
        for n in bytes.split(|b| *b == 0).filter(|n| !n.is_empty()) {
            if n.contains(&b'/') || n == b"." || n == b".." {
                bail!(
                    "the appliance listed {} in {}: not a name, refused",
                    printable(n),
                    printable(dir)
                );
            }
            names.push(n.to_vec());
        }
        names.sort();
        Ok(names)
    }

    /// Runs `line(fifo)` (a guestfish command writing to a local file) with `consume`
    /// reading that file as a FIFO while guestfish writes it: nothing is staged on disk.
    fn transfer<T: Send>(
        &mut self,
        line: impl FnOnce(&str) -> String,
        consume: impl FnOnce(&mut std::fs::File) -> Result<T> + Send,
    ) -> Result<T> {
        self.transfers += 1;
        let fifo = self.work.join(format!("stream{}", self.transfers));
        let c = std::ffi::CString::new(fifo.as_os_str().as_bytes())?;
        // SAFETY: c is a valid C string.
        if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot make {}", fifo.display()));
        }
        // Our read end first (non-blocking open, then blocking reads), and a writer of
        // ours held until guestfish's command has ended: the reader sees the end of the
        // stream only then, also when guestfish fails before it opens the FIFO.
        let mut reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)?;
        {
            use std::os::fd::AsRawFd;
            let fd = reader.as_raw_fd();
            // SAFETY: fcntl on a descriptor we own.
            unsafe {
                let fl = libc::fcntl(fd, libc::F_GETFL);
                libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK);
            }
        }
        let holder = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)?;
        let cmd = line(&quote(fifo.as_os_str().as_bytes())?);
        let g = &mut self.g;
        let (ran, consumed) = std::thread::scope(|s| {
            let t = s.spawn(move || {
                let r = consume(&mut reader);
                // Read to the end, so guestfish never writes into a closed pipe.
                let _ = std::io::copy(&mut reader, &mut std::io::sink());
                r
            });
            let ran = g.command_long(&cmd);
            drop(holder);
            let consumed = t
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the extraction thread panicked")));
            (ran, consumed)
        });
        let _ = std::fs::remove_file(&fifo);
        match (ran, consumed) {
            (Ok(_), Ok(v)) => Ok(v),
            (_, Err(e)) => Err(e),
            (Err(e), Ok(_)) => Err(e),
        }
    }
}

/// Serves every disk of the backup on its own private socket under `work` and runs `f`
/// with their NBD URLs; the exports end when `f` returns.
fn with_exports<T>(
    repo: &Repository,
    snaps: &[Snapshot],
    work: &Path,
    urls: &mut Vec<String>,
    f: &mut dyn FnMut(&[String]) -> Result<T>,
) -> Result<T> {
    let Some((s, rest)) = snaps.split_first() else {
        return f(urls);
    };
    let dir = work.join(format!("disk{}", urls.len()));
    std::fs::create_dir(&dir).with_context(|| format!("cannot make {}", dir.display()))?;
    with_private_export(repo, &s.id, "disk", &dir, |url| {
        urls.push(url.to_string());
        with_exports(repo, rest, work, urls, f)
    })
}

/// A folder of ours (random name, 0700), removed with everything in it when dropped.
struct OwnDir(PathBuf);
impl OwnDir {
    fn make(parent: &Path, prefix: &str) -> Result<OwnDir> {
        let p = parent.join(format!("{prefix}{}", random_hex(6)));
        std::fs::create_dir(&p).with_context(|| format!("cannot make {}", p.display()))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700))?;
        Ok(OwnDir(p))
    }
}
impl Drop for OwnDir {
    fn drop(&mut self) {
        // Made by us above with a random name: only what we put there is in it.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Serialize)]
struct Entry {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    name_hex: Option<String>,
    kind: FileKind,
    mode: String,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn entry(name: &[u8], st: &Stat, target: Option<Vec<u8>>) -> Entry {
    let utf8 = std::str::from_utf8(name).is_ok();
    Entry {
        name: String::from_utf8_lossy(name).into_owned(),
        name_hex: (!utf8).then(|| hex(name)),
        kind: st.kind(),
        mode: format!("{:04o}", st.mode & 0o7777),
        uid: st.uid,
        gid: st.gid,
        size: st.size,
        mtime: st.mtime.0,
        target: target.map(|t| String::from_utf8_lossy(&t).into_owned()),
    }
}

fn mode_string(kind: FileKind, mode: u32) -> String {
    let t = match kind {
        FileKind::Directory => 'd',
        FileKind::Symlink => 'l',
        FileKind::CharDevice => 'c',
        FileKind::BlockDevice => 'b',
        FileKind::Fifo => 'p',
        FileKind::Socket => 's',
        FileKind::File => '-',
        FileKind::Unknown => '?',
    };
    let mut s = String::from(t);
    for shift in [6u32, 3, 0] {
        let b = (mode >> shift) & 7;
        s.push(if b & 4 != 0 { 'r' } else { '-' });
        s.push(if b & 2 != 0 { 'w' } else { '-' });
        s.push(if b & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// UTC date and time of a Unix time (H. Hinnant's civil_from_days).
fn utc(t: i64) -> String {
    let days = t.div_euclid(86400);
    let secs = t.rem_euclid(86400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        secs / 3600,
        (secs % 3600) / 60
    )
}

pub fn run(
    cfg: &Config,
    vm: &str,
    snapshot: Option<&str>,
    action: &Action,
    json: bool,
) -> Result<()> {
    // Everything that can be refused without the appliance is refused first.
    let (specs, target) = match action {
        Action::Ls { path } => {
            let spec = match path.as_deref() {
                None => None,
                Some(p) if p.contains(":/") => Some(Spec::parse(p)?),
                // A file system alone: its root.
                Some(fs) => Some(Spec::parse(&format!("{fs}:/"))?),
            };
            (spec.into_iter().collect::<Vec<_>>(), None)
        }
        Action::Get { paths, to, force } => {
            if paths.is_empty() {
                bail!("name at least one FS:/PATH to get");
            }
            let specs = paths
                .iter()
                .map(|p| Spec::parse(p))
                .collect::<Result<Vec<_>>>()?;
            std::fs::create_dir_all(to).with_context(|| format!("cannot make {}", to.display()))?;
            let dir = to
                .canonicalize()
                .with_context(|| format!("cannot resolve {}", to.display()))?;
            let mut tops = BTreeMap::new();
            for s in &specs {
                let top = s.top_name();
                if let Some(other) = tops.insert(top.clone(), s.clone()) {
                    bail!(
                        "{}:{} and {}:{} would both be written to {}: get them one at a time \
                         into different folders",
                        other.fs,
                        other.path,
                        s.fs,
                        s.path,
                        dir.join(&top).display()
                    );
                }
                let t = dir.join(&top);
                if !force && std::fs::symlink_metadata(&t).is_ok() {
                    bail!(
                        "{} exists; give another --to, or --force to replace it",
                        t.display()
                    );
                }
            }
            (specs, Some((dir, *force)))
        }
    };
    let repo = open_repository(cfg)?;
    let backup = backup_of(&repo, vm, snapshot)?;
    let first = backup.first().context("the backup has no disks")?.clone();
    let run_id = first.tags.get("run").cloned().unwrap_or_default();
    let disks: Vec<String> = backup.iter().map(|s| s.disk.clone()).collect();
    if let Some(bad) = disks.iter().find(|d| !disk_name_ok(d)) {
        bail!(
            "backup {run_id} has a disk named {}: only letters, digits, '_', '.' and '-' can be \
             addressed here",
            printable(bad.as_bytes())
        );
    }
    let work = OwnDir::make(&std::env::temp_dir(), "coldclone-files-")?;
    let staging = match &target {
        Some((dir, _)) => Some(OwnDir::make(dir, ".coldclone-files-")?),
        None => None,
    };
    let mut urls = Vec::new();
    let mut out = std::io::stdout().lock();
    with_exports(&repo, &backup, &work.0, &mut urls, &mut |urls| {
        let mut s = Session::start(urls, &disks, &work.0)?;
        match (&target, &staging) {
            (Some((dir, force)), Some(staging)) => {
                let items = get(&mut s, &specs, &staging.0)?;
                // The appliance is done with the exports before anything is moved.
                s.g.close()?;
                let placed = place_all(items, &staging.0, dir, *force)?;
                report_get(&mut out, vm, &run_id, dir, &placed, json)
            }
            _ => match specs.first() {
                None => {
                    let mut fss = s.filesystems.clone();
                    for f in fss.iter_mut().filter(|f| f.note.is_none()) {
                        let size = s.g.command(&format!(
                            "blockdev-getsize64 {}",
                            quote(f.device.as_bytes())?
                        ))?;
                        f.size = String::from_utf8_lossy(&size).trim().parse().ok();
                    }
                    s.g.close()?;
                    report_filesystems(&mut out, vm, &run_id, &fss, json)
                }
                Some(spec) => {
                    let (fs, entries) = ls(&mut s, spec)?;
                    s.g.close()?;
                    report_ls(&mut out, &fs, spec, &entries, json)
                }
            },
        }
    })
}

fn ls(s: &mut Session, spec: &Spec) -> Result<(Filesystem, Vec<Entry>)> {
    let fs = s.mount(&spec.fs)?;
    let real = s
        .realpath(&spec.path)
        .with_context(|| format!("{}:{} cannot be found", fs.name, spec.path))?;
    let st = s.lstat(&real)?;
    if st.kind() != FileKind::Directory {
        let name = real.rsplit(|b| *b == b'/').next().unwrap_or(&real).to_vec();
        let target = if st.kind() == FileKind::Symlink {
            Some(s.readlink(&real)?)
        } else {
            None
        };
        return Ok((fs, vec![entry(&name, &st, target)]));
    }
    let mut entries = Vec::new();
    for name in s.names(&real)? {
        let mut p = real.clone();
        if p != b"/" {
            p.push(b'/');
        }
        p.extend_from_slice(&name);
        let st = s.lstat(&p)?;
        let target = if st.kind() == FileKind::Symlink {
            Some(s.readlink(&p)?)
        } else {
            None
        };
        entries.push(entry(&name, &st, target));
    }
    Ok((fs, entries))
}

struct Item {
    source: String,
    top: String,
    kind: FileKind,
    extracted: Extracted,
}

fn get(s: &mut Session, specs: &[Spec], staging: &Path) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    for spec in specs {
        let fs = s.mount(&spec.fs)?;
        let source = format!("{}:{}", fs.name, spec.path);
        // The parent resolved inside the guest; the name itself is not followed.
        let full: Vec<u8> = match spec.split() {
            None => b"/".to_vec(),
            Some((parent, name)) => {
                let mut p = s
                    .realpath(parent)
                    .with_context(|| format!("{source} cannot be found"))?;
                if p != b"/" {
                    p.push(b'/');
                }
                p.extend_from_slice(name.as_bytes());
                p
            }
        };
        let st = s
            .lstat(&full)
            .with_context(|| format!("{source} cannot be found"))?;
        let top = spec.top_name();
        let dest = staging.join(OsStr::new(&top));
        let meta = Meta::from(&st);
        let extracted = match st.kind() {
            FileKind::File => {
                let size = st.size;
                let d = dest.clone();
                s.transfer(
                    |fifo| format!("download {} {fifo}", quote(&full).unwrap_or_default()),
                    move |r| extract::write_file(r, size, &d, &meta),
                )
            }
            FileKind::Directory => {
                let d = dest.clone();
                s.transfer(
                    |fifo| {
                        format!(
                            "tar-out {} {fifo} numericowner:true",
                            quote(&full).unwrap_or_default()
                        )
                    },
                    move |r| extract::unpack_tar(r, &d, &meta),
                )
            }
            FileKind::Symlink => {
                let to = s.readlink(&full)?;
                extract::write_symlink(&to, &dest, &meta)
            }
            other => {
                bail!("{source} is a {other:?}: only files, folders and symlinks are extracted")
            }
        }
        .with_context(|| format!("{source} could not be extracted"))?;
        items.push(Item {
            source,
            top,
            kind: st.kind(),
            extracted,
        });
    }
    Ok(items)
}

#[derive(Serialize)]
struct Placed {
    source: String,
    target: PathBuf,
    kind: FileKind,
    #[serde(flatten)]
    extracted: Extracted,
}

/// Moves each extracted top from the staging folder into `dir`: never over something
/// that is there without `force`; with it, what was there goes only once the new copy
/// is in place.
fn place_all(items: Vec<Item>, staging: &Path, dir: &Path, force: bool) -> Result<Vec<Placed>> {
    let mut placed = Vec::new();
    for it in items {
        let from = staging.join(&it.top);
        let to = dir.join(&it.top);
        let exists = std::fs::symlink_metadata(&to).is_ok();
        if exists && !force {
            bail!(
                "{} exists; give another --to, or --force to replace it",
                to.display()
            );
        }
        if exists {
            let old = staging.join(format!(".old-{}", random_hex(4)));
            std::fs::rename(&to, &old)
                .with_context(|| format!("cannot move {} aside", to.display()))?;
            std::fs::rename(&from, &to)
                .with_context(|| format!("cannot move the copy to {}", to.display()))?;
            // `old` is in our staging folder, removed with it.
        } else {
            rename_noreplace(&from, &to)?;
        }
        placed.push(Placed {
            source: it.source,
            target: to,
            kind: it.kind,
            extracted: it.extracted,
        });
    }
    Ok(placed)
}

fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    let a = std::ffi::CString::new(from.as_os_str().as_bytes())?;
    let b = std::ffi::CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: valid C strings.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot move the copy to {}", to.display()));
    }
    Ok(())
}

fn report_filesystems(
    out: &mut impl Write,
    vm: &str,
    run_id: &str,
    fss: &[Filesystem],
    json: bool,
) -> Result<()> {
    if json {
        writeln!(
            out,
            "{}",
            serde_json::json!({"vm": vm, "backup": run_id, "filesystems": fss})
        )?;
        return Ok(());
    }
    writeln!(out, "file systems of vm {vm}, backup {run_id}:")?;
    for f in fss {
        let size = f.size.map(|s| format!("{s}")).unwrap_or_else(|| "-".into());
        write!(
            out,
            "  {:<20} {:<8} {:>14}  {}",
            f.name, f.fstype, size, f.device
        )?;
        if let Some(n) = &f.note {
            write!(out, "  ({n})")?;
        }
        writeln!(out)?;
    }
    Ok(())
}

fn report_ls(
    out: &mut impl Write,
    fs: &Filesystem,
    spec: &Spec,
    entries: &[Entry],
    json: bool,
) -> Result<()> {
    if json {
        writeln!(
            out,
            "{}",
            serde_json::json!({"filesystem": fs.name, "path": spec.path, "entries": entries})
        )?;
        return Ok(());
    }
    for e in entries {
        let mode = u32::from_str_radix(&e.mode, 8).unwrap_or(0);
        write!(
            out,
            "{} {:>6} {:>6} {:>12} {} {}",
            mode_string(e.kind, mode),
            e.uid,
            e.gid,
            e.size,
            utc(e.mtime),
            printable(e.name.as_bytes())
        )?;
        if let Some(t) = &e.target {
            write!(out, " -> {}", printable(t.as_bytes()))?;
        }
        writeln!(out)?;
    }
    Ok(())
}

fn report_get(
    out: &mut impl Write,
    vm: &str,
    run_id: &str,
    dir: &Path,
    placed: &[Placed],
    json: bool,
) -> Result<()> {
    if json {
        writeln!(
            out,
            "{}",
            serde_json::json!({"vm": vm, "backup": run_id, "to": dir, "items": placed})
        )?;
        return Ok(());
    }
    for p in placed {
        let e = &p.extracted;
        write!(
            out,
            "{} -> {} ({:?}: {} files, {} folders, {} symlinks, {} bytes",
            p.source,
            p.target.display(),
            p.kind,
            e.files,
            e.directories,
            e.symlinks,
            e.bytes
        )?;
        if e.setid_dropped > 0 {
            write!(out, "; setuid/setgid dropped on {}", e.setid_dropped)?;
        }
        if !e.skipped.is_empty() {
            write!(out, "; not written: {}", e.skipped.join(", "))?;
        }
        writeln!(out, ")")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_name_a_file_system_and_a_clean_path() {
        let s = Spec::parse("disk0:1:/etc//hostname/").unwrap();
        assert_eq!(
            (s.fs.as_str(), s.path.as_str()),
            ("disk0:1", "/etc/hostname")
        );
        assert_eq!(s.split(), Some(("/etc", "hostname")));
        assert_eq!(s.top_name(), "hostname");
        let l = Spec::parse("vg0/root:/a:/b").unwrap();
        assert_eq!((l.fs.as_str(), l.path.as_str()), ("vg0/root", "/a:/b"));
        let d = Spec::parse("/dev/sda1:/").unwrap();
        assert_eq!((d.fs.as_str(), d.path.as_str()), ("/dev/sda1", "/"));
        assert_eq!(d.split(), None);
        assert_eq!(d.top_name(), "_dev_sda1");
        assert_eq!(Spec::parse("disk0:/x").unwrap().split(), Some(("/", "x")));
        for bad in [
            "/etc/hostname",
            "disk0:1",
            ":/etc",
            "disk0:/etc/../x",
            "d:/./x",
        ] {
            assert!(Spec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn appliance_devices_get_our_names() {
        let disks = vec![
            ("/dev/sda".to_string(), "disk0".to_string()),
            ("/dev/sdb".to_string(), "xvdb".to_string()),
        ];
        assert_eq!(friendly("/dev/sda", &disks).as_deref(), Some("disk0"));
        assert_eq!(friendly("/dev/sda2", &disks).as_deref(), Some("disk0:2"));
        assert_eq!(friendly("/dev/sdb1", &disks).as_deref(), Some("xvdb:1"));
        assert_eq!(
            friendly("/dev/vg0/root", &disks).as_deref(),
            Some("vg0/root")
        );
        assert_eq!(friendly("/dev/mapper/x", &disks), None);
        assert_eq!(friendly("/dev/sdc1", &disks), None);
        assert_eq!(utc(0), "1970-01-01 00:00");
        assert_eq!(utc(1_796_394_814), "2026-12-04 14:33");
        assert_eq!(mode_string(FileKind::Directory, 0o755), "drwxr-xr-x");
    }
}
