//! A disk image (qcow2 with its backing chain, or raw) served read-only as a raw file
//! where it lies: a `qemu-storage-daemon` FUSE export. The archive reads a stopped
//! clone's disk through it instead of converting the chain to a raw copy in the
//! state folder first; unallocated and zero ranges answer `SEEK_HOLE`, so the
//! repository skips them without reading.
//!
//! The daemon and its mount are journaled ([`crate::shared::SharedResource::ImageExport`])
//! before they exist, so a killed run leaves nothing that `recover` cannot take down.

use crate::{io_err, util, BackendError, Journal, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The daemon's program name, as `/proc/PID/exe` shows it.
const DAEMON: &str = "qemu-storage-daemon";

/// How an image's bytes are laid out on disk (QEMU's driver name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Qcow2,
    Raw,
}

impl ImageFormat {
    fn driver(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }
}

/// A running read-only export; [`ImageExport::stop`] takes it down.
#[derive(Debug)]
pub struct ImageExport {
    mountpoint: PathBuf,
    pidfile: PathBuf,
    journal_id: u64,
}

impl ImageExport {
    /// Serves `image` read-only at `mountpoint` (a file that must not exist yet; its
    /// folder is the run's). Returns once the export answers reads.
    pub fn start(
        image: &Path,
        format: ImageFormat,
        mountpoint: &Path,
        journal: &mut dyn Journal,
    ) -> Result<ImageExport> {
        let pidfile = pidfile_for(mountpoint);
        let journal_id = journal.will_create(
            &crate::shared::SharedResource::ImageExport {
                mountpoint: mountpoint.to_path_buf(),
                pidfile: pidfile.clone(),
            }
            .into(),
        )?;
        // FUSE mounts over an existing regular file.
        std::fs::File::create(mountpoint).map_err(io_err(mountpoint))?;
        let export = ImageExport {
            mountpoint: mountpoint.to_path_buf(),
            pidfile,
            journal_id,
        };
        let mut c = Command::new(DAEMON);
        // QemuOpts: a comma inside a value is written twice.
        let quote = |p: &Path| p.to_string_lossy().replace(',', ",,");
        c.arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=cc-file,filename={},read-only=on",
                quote(image)
            ))
            .arg("--blockdev")
            .arg(format!(
                "driver={},node-name=cc-image,file=cc-file,read-only=on",
                format.driver()
            ))
            .arg("--export")
            .arg(format!(
                "type=fuse,id=cc-export,node-name=cc-image,mountpoint={},writable=off",
                quote(mountpoint)
            ))
            .arg("--pidfile")
            .arg(&export.pidfile)
            // The parent exits once the export is set up (qemu-storage-daemon(1)).
            .arg("--daemonize");
        if let Err(e) = util::run_tool(c) {
            // Whatever half started goes now; the journal entry stays if it cannot.
            let _ = export.take_down();
            return Err(e);
        }
        export.wait_mounted()?;
        Ok(export)
    }

    /// The raw view of the image.
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Stops the daemon, unmounts, removes the mount point; then the journal entry.
    pub fn stop(self, journal: &mut dyn Journal) -> Result<()> {
        self.take_down()?;
        journal.removed(self.journal_id)
    }

    fn take_down(&self) -> Result<()> {
        take_down(&self.mountpoint, &self.pidfile)
    }

    fn wait_mounted(&self) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if is_mounted(&self.mountpoint)? {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.take_down();
        Err(BackendError::Clone(format!(
            "{DAEMON} did not mount its export at {} within 10 s",
            self.mountpoint.display()
        )))
    }
}

/// The pid file beside a mount point.
fn pidfile_for(mountpoint: &Path) -> PathBuf {
    let mut name = mountpoint.as_os_str().to_owned();
    name.push(".pid");
    PathBuf::from(name)
}

/// Takes an export down by its mount point and pid file (the stop, and `recover`, whose
/// caller has checked both paths lie in the run folders). The pid is acted on only if
/// that process is a qemu-storage-daemon serving this very mount point.
pub(crate) fn take_down(mountpoint: &Path, pidfile: &Path) -> Result<()> {
    if let Some(pid) = read_pid(pidfile)? {
        if is_our_daemon(pid, mountpoint) {
            // SIGTERM first: the daemon unmounts its export as it exits.
            // SAFETY: kill(2) on a pid just checked to be our daemon.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
            let start = Instant::now();
            while util::pid_alive(pid) && start.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if util::pid_alive(pid) && !util::kill_and_wait(pid, Duration::from_secs(10)) {
                return Err(BackendError::Clone(format!(
                    "{DAEMON} {pid} serving {} does not die",
                    mountpoint.display()
                )));
            }
        }
    }
    // A daemon killed hard leaves its mount behind ("transport endpoint is not connected").
    if is_mounted(mountpoint)? {
        let c = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes())
            .map_err(|_| BackendError::Clone(format!("{}: NUL in path", mountpoint.display())))?;
        // SAFETY: a valid C string; MNT_DETACH so a reader still holding it cannot block us.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(BackendError::Io {
                path: mountpoint.to_path_buf(),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    util::remove_file_if_exists(mountpoint)?;
    util::remove_file_if_exists(pidfile)
}

/// The pid in a pid file; `None` when there is no file. A file that does not hold a
/// plain number is refused rather than guessed at.
fn read_pid(pidfile: &Path) -> Result<Option<u32>> {
    match std::fs::read_to_string(pidfile) {
        Ok(s) => s.trim().parse::<u32>().map(Some).map_err(|_| {
            BackendError::Unsupported(format!(
                "{} does not hold a process id; left alone",
                pidfile.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(BackendError::Io {
            path: pidfile.to_path_buf(),
            source: e,
        }),
    }
}

/// Whether `pid` runs qemu-storage-daemon with an export at `mountpoint`.
fn is_our_daemon(pid: u32, mountpoint: &Path) -> bool {
    let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
        return false;
    };
    let name = exe.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name.trim_end_matches(" (deleted)") != DAEMON {
        return false;
    }
    let want = format!(
        "mountpoint={},",
        mountpoint.to_string_lossy().replace(',', ",,")
    );
    util::process_cmdline(pid)
        .unwrap_or_default()
        .iter()
        .any(|a| a.starts_with("type=fuse,") && a.contains(&want))
}

/// Whether a file system is mounted exactly at `path` (from /proc/self/mountinfo).
pub(crate) fn is_mounted(path: &Path) -> Result<bool> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err(Path::new("/proc/self/mountinfo")))?;
    let want = path.to_string_lossy();
    Ok(info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| unescape_mountinfo(m) == want))
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_read() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/end\"), r"/end\");
        assert_eq!(unescape_mountinfo(r"/x\134y"), r"/x\y");
        assert_eq!(unescape_mountinfo(r"/x\777"), r"/x\777");
    }

    #[test]
    fn a_pid_file_with_garbage_is_refused() {
        let dir = std::env::temp_dir().join(format!("cc-pid-{}", util::random_hex(4)));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.pid");
        std::fs::write(&p, "1; rm -rf /").unwrap();
        assert!(read_pid(&p).is_err());
        std::fs::write(&p, "1234\n").unwrap();
        assert_eq!(read_pid(&p).unwrap(), Some(1234));
        assert_eq!(read_pid(&dir.join("none.pid")).unwrap(), None);
        // pid 1 is not a qemu-storage-daemon: never signalled.
        assert!(!is_our_daemon(1, &dir.join("x")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
