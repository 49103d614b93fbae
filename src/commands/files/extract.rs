//! Writing what came out of a guest under a folder of ours, and nowhere else: every
//! path is checked to be plain names below the top (no `..`, no absolute path), no
//! parent on the way may be a symlink (a link the guest made is created as a link and
//! never followed), nothing that exists is replaced (the top is new, in a staging
//! folder). Owner, permissions and times are kept; set-user/group-id bits are not (a
//! guest's setuid-root file must not become one on the host).

use super::guestfish::Stat;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::ffi::{CString, OsStr};
use std::fs::OpenOptions;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, Default, Serialize)]
pub struct Extracted {
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub bytes: u64,
    /// Entries not written (devices, FIFOs, sockets), by name.
    pub skipped: Vec<String>,
    /// Files whose setuid/setgid bits were dropped.
    pub setid_dropped: u64,
}

/// Ownership, permissions and times to give a written entry.
#[derive(Debug, Clone, Copy)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: (i64, i64),
    pub mtime: (i64, i64),
}

impl From<&Stat> for Meta {
    fn from(s: &Stat) -> Meta {
        Meta {
            mode: s.mode,
            uid: s.uid,
            gid: s.gid,
            atime: s.atime,
            mtime: s.mtime,
        }
    }
}

fn owners_kept() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The archive path `p` as plain components below the top: `./` and empty parts
/// dropped, anything else refused.
pub fn plain_components(p: &[u8]) -> Result<Vec<&[u8]>> {
    if p.first() == Some(&b'/') {
        bail!(
            "entry {} is an absolute path: refused",
            super::guestfish::printable(p)
        );
    }
    let mut out = Vec::new();
    for c in p.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => bail!(
                "entry {} climbs out with '..': refused",
                super::guestfish::printable(p)
            ),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// `top`/`comps`, after checking that every folder on the way is a real directory (not
/// a symlink) we made, and that the entry itself does not exist yet.
fn place(top: &Path, comps: &[&[u8]]) -> Result<PathBuf> {
    let mut p = top.to_path_buf();
    for (i, c) in comps.iter().enumerate() {
        p.push(OsStr::from_bytes(c));
        let last = i + 1 == comps.len();
        match std::fs::symlink_metadata(&p) {
            Ok(m) if !last && m.file_type().is_dir() => {}
            Ok(_) if !last => bail!(
                "{} is not a directory (a link or file from the guest): nothing is written \
                 through it",
                p.display()
            ),
            Ok(_) => bail!(
                "{} appears twice in the guest's stream: refused",
                p.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && last => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "{} comes before its folder {} in the guest's stream: refused",
                top.join(OsStr::from_bytes(&comps.join(&b'/'))).display(),
                p.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("cannot look at {}", p.display())),
        }
    }
    Ok(p)
}

fn cpath(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).context("a path with a NUL byte")
}

fn timespec(t: (i64, i64)) -> libc::timespec {
    libc::timespec {
        tv_sec: t.0 as libc::time_t,
        tv_nsec: t.1.clamp(0, 999_999_999) as _,
    }
}

/// Owner, mode and times of `p`, the link itself for a symlink (never its target).
fn apply_meta(p: &Path, m: &Meta, is_link: bool, ex: &mut Extracted) -> Result<()> {
    if owners_kept() {
        std::os::unix::fs::lchown(p, Some(m.uid), Some(m.gid))
            .with_context(|| format!("cannot set the owner of {}", p.display()))?;
    }
    if !is_link {
        let mut mode = m.mode & 0o7777;
        let is_dir = std::fs::symlink_metadata(p)
            .map(|x| x.is_dir())
            .unwrap_or(false);
        if !is_dir && mode & 0o6000 != 0 {
            mode &= !0o6000;
            ex.setid_dropped += 1;
        }
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot set the mode of {}", p.display()))?;
    }
    let c = cpath(p)?;
    let times = [timespec(m.atime), timespec(m.mtime)];
    // SAFETY: c is a valid C string, times two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot set the times of {}", p.display()));
    }
    Ok(())
}

fn create_file(p: &Path) -> Result<std::fs::File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)
        .with_context(|| format!("cannot create {}", p.display()))
}

/// A regular file of `size` bytes from `data` at `target` (which must not exist).
pub fn write_file(data: impl Read, size: u64, target: &Path, meta: &Meta) -> Result<Extracted> {
    let mut ex = Extracted::default();
    let mut f = create_file(target)?;
    let n = std::io::copy(&mut data.take(size), &mut f)
        .with_context(|| format!("cannot write {}", target.display()))?;
    if n != size {
        bail!(
            "the guest's file ended after {n} of {size} bytes: {} not kept",
            target.display()
        );
    }
    f.sync_all()?;
    drop(f);
    apply_meta(target, meta, false, &mut ex)?;
    ex.files = 1;
    ex.bytes = n;
    Ok(ex)
}

/// A symlink to `to` (the guest's bytes, never resolved on the host) at `target`.
pub fn write_symlink(to: &[u8], target: &Path, meta: &Meta) -> Result<Extracted> {
    let mut ex = Extracted::default();
    std::os::unix::fs::symlink(OsStr::from_bytes(to), target)
        .with_context(|| format!("cannot make the symlink {}", target.display()))?;
    apply_meta(target, meta, true, &mut ex)?;
    ex.symlinks = 1;
    Ok(ex)
}

/// Unpacks the tar stream of a guest directory (GNU tar's, from libguestfs `tar-out`)
/// into `top`, which must not exist; `top_meta` is the directory's own.
pub fn unpack_tar(stream: impl Read, top: &Path, top_meta: &Meta) -> Result<Extracted> {
    let mut ex = Extracted::default();
    std::fs::create_dir(top).with_context(|| format!("cannot make {}", top.display()))?;
    std::fs::set_permissions(top, std::fs::Permissions::from_mode(0o700))?;
    let mut dirs: Vec<(PathBuf, Meta)> = vec![(top.to_path_buf(), *top_meta)];
    let mut archive = tar::Archive::new(stream);
    for entry in archive
        .entries()
        .context("the guest's tar stream cannot be read")?
    {
        let mut entry = entry.context("the guest's tar stream is damaged")?;
        let raw = entry.path_bytes().into_owned();
        let comps = plain_components(&raw)?;
        let h = entry.header();
        let meta = Meta {
            mode: h.mode().context("an entry's mode")?,
            uid: u32::try_from(h.uid().context("an entry's uid")?).context("uid too large")?,
            gid: u32::try_from(h.gid().context("an entry's gid")?).context("gid too large")?,
            // GNU tar keeps the modification time only (to the second).
            atime: (h.mtime().unwrap_or(0) as i64, 0),
            mtime: (h.mtime().unwrap_or(0) as i64, 0),
        };
        let kind = h.entry_type();
        if comps.is_empty() {
            if kind.is_dir() {
                dirs[0].1 = meta;
                continue;
            }
            bail!("the guest's stream names its top as a non-directory: refused");
        }
        let target = place(top, &comps)?;
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let mut f = create_file(&target)?;
                let n = std::io::copy(&mut entry, &mut f)
                    .with_context(|| format!("cannot write {}", target.display()))?;
                drop(f);
                apply_meta(&target, &meta, false, &mut ex)?;
                ex.files += 1;
                ex.bytes += n;
            }
            tar::EntryType::Directory => {
                std::fs::create_dir(&target)
                    .with_context(|| format!("cannot make {}", target.display()))?;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700))?;
                ex.directories += 1;
                dirs.push((target, meta));
            }
            tar::EntryType::Symlink => {
                let to = entry
                    .link_name_bytes()
                    .context("a symlink without a target in the guest's stream")?
                    .into_owned();
                std::os::unix::fs::symlink(OsStr::from_bytes(&to), &target)
                    .with_context(|| format!("cannot make the symlink {}", target.display()))?;
                apply_meta(&target, &meta, true, &mut ex)?;
                ex.symlinks += 1;
            }
            tar::EntryType::Link => {
                let to = entry
                    .link_name_bytes()
                    .context("a hard link without a target in the guest's stream")?
                    .into_owned();
                let to_comps = plain_components(&to)?;
                if to_comps.is_empty() {
                    bail!("a hard link to the top folder: refused");
                }
                // The link's source: a regular file already written, reached through
                // real folders only.
                let (last, parents) = to_comps.split_last().context("empty link")?;
                let mut src = top.to_path_buf();
                for c in parents {
                    src.push(OsStr::from_bytes(c));
                    let m = std::fs::symlink_metadata(&src).ok();
                    if !m.is_some_and(|m| m.file_type().is_dir()) {
                        bail!(
                            "hard link {} goes through {}, not a folder: refused",
                            target.display(),
                            src.display()
                        );
                    }
                }
                src.push(OsStr::from_bytes(last));
                let m = std::fs::symlink_metadata(&src).ok();
                if !m.is_some_and(|m| m.file_type().is_file()) {
                    bail!(
                        "hard link {} names {}, not a file written before: refused",
                        target.display(),
                        src.display()
                    );
                }
                std::fs::hard_link(&src, &target)
                    .with_context(|| format!("cannot link {}", target.display()))?;
                ex.hardlinks += 1;
            }
            // Device nodes, FIFOs: nothing a restore of files should make on the host.
            _ => ex.skipped.push(format!(
                "{} ({:?})",
                super::guestfish::printable(&raw),
                kind
            )),
        }
    }
    // Folders last, deepest first: a read-only folder is written into before its mode
    // is set, and writing into it does not change the time set.
    for (d, m) in dirs.iter().rev() {
        apply_meta(d, m, false, &mut ex)?;
    }
    Ok(ex)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("coldclone-extract-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn meta() -> Meta {
        Meta {
            mode: 0o755,
            uid: 0,
            gid: 0,
            atime: (1_000_000, 0),
            mtime: (1_000_000, 0),
        }
    }

    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(1_234_567);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    /// (type, name, link target, data) of one raw entry.
    type Raw<'a> = (tar::EntryType, &'a [u8], &'a [u8], &'a [u8]);

    /// A raw tar stream with arbitrary names (the tar crate's builder refuses `..`).
    fn stream(entries: &[Raw]) -> Vec<u8> {
        let mut out = Vec::new();
        for (kind, name, link, data) in entries {
            let mut h = header(*kind, data.len() as u64);
            {
                let g = h.as_old_mut();
                g.name[..name.len()].copy_from_slice(name);
                g.linkname[..link.len()].copy_from_slice(link);
            }
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    #[test]
    fn a_tree_keeps_links_as_links_and_modes() {
        let d = tmp("tree");
        let s = stream(&[
            (tar::EntryType::Directory, b"./", b"", b""),
            (tar::EntryType::Regular, b"./a.txt", b"", b"hello"),
            (tar::EntryType::Symlink, b"./out", b"../../../../etc", b""),
            (tar::EntryType::Link, b"./b.txt", b"./a.txt", b""),
            (tar::EntryType::Directory, b"./sub", b"", b""),
            (tar::EntryType::Fifo, b"./sub/fifo", b"", b""),
        ]);
        let top = d.join("top");
        let ex = unpack_tar(&s[..], &top, &meta()).unwrap();
        assert_eq!(
            (ex.files, ex.symlinks, ex.hardlinks, ex.directories),
            (1, 1, 1, 1)
        );
        assert_eq!(ex.skipped.len(), 1);
        assert_eq!(std::fs::read(top.join("b.txt")).unwrap(), b"hello");
        assert_eq!(
            std::fs::read_link(top.join("out")).unwrap(),
            Path::new("../../../../etc")
        );
        let m = std::fs::metadata(top.join("a.txt")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o644);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(m.mtime(), 1_234_567);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn nothing_is_written_outside_the_top() {
        let d = tmp("escape");
        for (i, s) in [
            stream(&[(tar::EntryType::Regular, b"../x", b"", b"x")]),
            stream(&[(tar::EntryType::Regular, b"/x", b"", b"x")]),
            stream(&[(tar::EntryType::Regular, b"./a/../../x", b"", b"x")]),
            // A link, then a file through it.
            stream(&[
                (
                    tar::EntryType::Symlink,
                    b"./l",
                    d.as_os_str().as_bytes(),
                    b"",
                ),
                (tar::EntryType::Regular, b"./l/x", b"", b"x"),
            ]),
            // A hard link to something outside.
            stream(&[(tar::EntryType::Link, b"./h", b"../outside", b"")]),
            stream(&[
                (
                    tar::EntryType::Symlink,
                    b"./l",
                    d.as_os_str().as_bytes(),
                    b"",
                ),
                (tar::EntryType::Link, b"./h", b"./l/outside", b""),
            ]),
            // The same name twice: the second would replace the first.
            stream(&[
                (tar::EntryType::Symlink, b"./l", b"/etc/passwd", b""),
                (tar::EntryType::Regular, b"./l", b"", b"x"),
            ]),
        ]
        .iter()
        .enumerate()
        {
            std::fs::write(d.join("outside"), b"keep").unwrap();
            let top = d.join(format!("top{i}"));
            let r = unpack_tar(&s[..], &top, &meta());
            assert!(r.is_err(), "case {i} was accepted");
            assert!(!d.join("x").exists(), "case {i} wrote outside");
            assert_eq!(std::fs::read(d.join("outside")).unwrap(), b"keep");
            let links = std::fs::symlink_metadata(top.join("h")).is_ok();
            assert!(!links, "case {i} linked outside");
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn setuid_is_dropped_and_short_files_fail() {
        let d = tmp("setid");
        let m = Meta {
            mode: 0o104755,
            ..meta()
        };
        let ex = write_file(&b"abc"[..], 3, &d.join("f"), &m).unwrap();
        assert_eq!(ex.setid_dropped, 1);
        let mode = std::fs::metadata(d.join("f")).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o755);
        assert!(write_file(&b"ab"[..], 3, &d.join("g"), &meta()).is_err());
        assert!(
            write_file(&b"abc"[..], 3, &d.join("f"), &meta()).is_err(),
            "replaced"
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
