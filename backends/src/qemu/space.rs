//! Where the checkpoint's files may go: on a real file system with room.
//!
//! The original's write overlay holds every write the production VM makes
//! during the backup, acknowledged to its guest; the memory image holds all
//! of its RAM. Neither may live in RAM (tmpfs, devtmpfs, ramfs) or on a
//! pseudo file system, and neither may run out of room: a full overlay
//! makes QEMU stop the original on ENOSPC (`-drive` werror's default).
//!
//! The bounded policy: before anything is paused, the file system of each
//! file must have free (for unprivileged users: `f_bavail`) at least
//! * the memory image: the VM's RAM size, plus [`RESERVE`];
//! * the original's overlay of a disk: its virtual size, capped at
//!   [`OVERLAY_BOUND`], plus [`RESERVE`] (files on one file system add up).
//!
//! The cap means a VM that rewrites more than 8 GiB during its backup on a
//! file system with less room than its disk can still fill it; the room
//! check makes that a choice of the operator (a bigger state_dir), never an
//! accident of where the image happened to be.

use crate::{BackendError, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Bytes kept free beyond what the files are expected to need.
pub const RESERVE: u64 = 64 << 20;
/// At most this much room is demanded for one original overlay.
pub const OVERLAY_BOUND: u64 = 8 << 30;

/// File systems that keep their data in RAM or are not storage at all
/// (magic numbers of linux/magic.h).
const REFUSED: &[(i64, &str)] = &[
    (0x0102_1994, "tmpfs/devtmpfs (RAM)"),
    (0x8584_58f6, "ramfs (RAM)"),
    (0x9584_58f6, "hugetlbfs (RAM)"),
    (0x9fa0, "proc"),
    (0x6265_6572, "sysfs"),
    (0x1cd1, "devpts"),
    (0x0027_e0eb, "cgroup"),
    (0x6367_7270, "cgroup2"),
    (0x6462_6720, "debugfs"),
    (0x7472_6163, "tracefs"),
    (0x7363_6673, "securityfs"),
    (0x6165_676c, "pstore"),
    (0xde5e_81e4, "efivarfs"),
    (0x6265_6570, "configfs"),
    (0xcafe_4a11, "bpf"),
    (0x7371_7368, "squashfs (read-only)"),
    (0x9660, "iso9660 (read-only)"),
];

/// One file the checkpoint will write, and the room it needs.
#[derive(Debug, Clone)]
pub struct Need {
    pub dir: PathBuf,
    pub bytes: u64,
    pub what: String,
}

/// What statfs(2) says about the file system holding `dir`.
#[derive(Debug, Clone, Copy)]
pub struct FsInfo {
    pub kind: i64,
    pub available: u64,
    pub fsid: (i32, i32),
}

pub fn statfs(dir: &Path) -> Result<FsInfo> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|_| BackendError::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: statfs writes a `struct statfs` into `st`, which is zeroed and ours.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path; `st` is a valid out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(BackendError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: fsid_t is two ints on Linux; it is read as such.
    let fsid: (i32, i32) = unsafe { std::mem::transmute_copy(&st.f_fsid) };
    Ok(FsInfo {
        kind: st.f_type as i64,
        available: (st.f_bavail as u64).saturating_mul(st.f_bsize as u64),
        fsid,
    })
}

/// The name of a refused file system type, if `kind` is one.
pub fn refused_kind(kind: i64) -> Option<&'static str> {
    REFUSED.iter().find(|(k, _)| *k == kind).map(|(_, n)| *n)
}

/// Checks every need: a real file system, and room for all of them that
/// share one. Refuses naming the file, the folder and what is missing.
pub fn check(needs: &[Need]) -> Result<()> {
    let mut per_fs: BTreeMap<(i32, i32), (FsInfo, u64, Vec<String>)> = BTreeMap::new();
    for n in needs {
        let fs = statfs(&n.dir)?;
        if let Some(name) = refused_kind(fs.kind) {
            return Err(BackendError::Unsupported(format!(
                "{} would go to {}, on {name}: the original's writes or RAM must be on a real \
                 file system; set state_dir to one",
                n.what,
                n.dir.display()
            )));
        }
        let e = per_fs.entry(fs.fsid).or_insert((fs, 0, Vec::new()));
        e.1 = e.1.saturating_add(n.bytes);
        e.2.push(format!("{} in {}", n.what, n.dir.display()));
    }
    for (fs, need, what) in per_fs.values() {
        if fs.available < *need {
            return Err(BackendError::Unsupported(format!(
                "not enough room for {}: {} MiB needed, {} MiB free; nothing was paused \
                 (free space, or a state_dir on a bigger file system)",
                what.join(" and "),
                need >> 20,
                fs.available >> 20
            )));
        }
    }
    Ok(())
}

/// The room demanded for the original's overlay of a disk of `virtual_size`.
pub fn overlay_need(virtual_size: u64) -> u64 {
    virtual_size.min(OVERLAY_BOUND).saturating_add(RESERVE)
}
