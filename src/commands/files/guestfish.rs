//! A guestfish session: the guest's disks read by libguestfs inside its own appliance VM,
//! so no guest file system, partition table or LVM metadata ever reaches the host
//! kernel. One guestfish process per `files` command, driven over its stdin: each
//! command is followed by `echo MARKER`, and its output is what guestfish printed
//! before the marker. Every argument is sent double-quoted with all but a few plain
//! bytes as `\xHH` (guestfish's own escapes), so no guest name is ever parsed as
//! guestfish syntax. What guestfish prints comes from the guest: parsed by allow-lists.

use anyhow::{bail, Context, Result};
use coldclone_backends::util::random_hex;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// libguestfs's appliance boots a kernel; under TCG on a loaded host that takes minutes.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(900);
/// One command; transfers (tar-out, download) get longer (see `command_long`).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(600);
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// guestfish's stderr kept for error messages.
const STDERR_TAIL: usize = 16 * 1024;

pub struct Guestfish {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<Vec<u8>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    marker: String,
}

/// `s` as one guestfish argument.
pub fn quote(s: &[u8]) -> Result<String> {
    if s.contains(&0) {
        bail!("a path with a NUL byte cannot be named");
    }
    let mut out = String::from("\"");
    for &b in s {
        if b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-' | b'+') {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out.push('"');
    Ok(out)
}

/// Text from the guest (or guestfish about it) made safe to print: control bytes escaped.
pub fn printable(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

impl Guestfish {
    /// Starts guestfish over `drives` (NBD URLs, added read-only, raw) and launches the
    /// appliance. The direct backend: guestfish runs QEMU itself, as this user, so it can
    /// reach our private (0700) export sockets; libvirt's QEMU user could not.
    pub fn launch(drives: &[String]) -> Result<Guestfish> {
        let mut cmd = Command::new("stdbuf");
        // Line-buffered stdout: guestfish's output reaches us as each command ends.
        cmd.args([
            "-oL",
            "guestfish",
            "--ro",
            "--format=raw",
            "--no-progress-bars",
        ]);
        for d in drives {
            // guestfish spells a unix-socket NBD export nbd:///NAME?socket=PATH.
            let d = match d.strip_prefix("nbd+unix://") {
                Some(rest) => format!("nbd://{rest}"),
                None => d.clone(),
            };
            cmd.arg("-a").arg(d);
        }
        cmd.env("LIBGUESTFS_BACKEND", "direct")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // If coldclone dies, guestfish goes too; libguestfs's recovery process then ends
        // the appliance.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .context("cannot run guestfish (install libguestfs-tools: scripts/setup.sh)")?;
        let stdout = child.stdout.take().context("guestfish stdout")?;
        let stderr_pipe = child.stderr.take().context("guestfish stderr")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            loop {
                let mut line = Vec::new();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if line.last() == Some(&b'\n') {
                            line.pop();
                        }
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let tail = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut r = stderr_pipe;
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if let Ok(mut t) = tail.lock() {
                    t.extend_from_slice(&buf[..n]);
                    if t.len() > STDERR_TAIL {
                        let cut = t.len() - STDERR_TAIL;
                        t.drain(..cut);
                    }
                }
            }
        });
        let mut g = Guestfish {
            stdin: child.stdin.take(),
            child,
            lines,
            stderr,
            marker: format!("coldclone-end-{}", random_hex(12)),
        };
        g.run_with("run", LAUNCH_TIMEOUT)
            .context("the libguestfs appliance did not start")?;
        Ok(g)
    }

    /// Runs one guestfish command line (arguments already quoted), returning its output.
    pub fn command(&mut self, line: &str) -> Result<Vec<u8>> {
        self.run_with(line, COMMAND_TIMEOUT)
    }

    /// A command that moves a whole file or tree.
    pub fn command_long(&mut self, line: &str) -> Result<Vec<u8>> {
        self.run_with(line, TRANSFER_TIMEOUT)
    }

    fn run_with(&mut self, line: &str, timeout: Duration) -> Result<Vec<u8>> {
        let verb = line.split(' ').next().unwrap_or(line).to_string();
        let stdin = self.stdin.as_mut().context("guestfish has ended")?;
        let sent = writeln!(stdin, "{line}")
            .and_then(|_| writeln!(stdin, "echo {}", self.marker))
            .and_then(|_| stdin.flush());
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        if sent.is_ok() {
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.lines.recv_timeout(left) {
                    Ok(l) if l == self.marker.as_bytes() => return Ok(out),
                    Ok(l) => {
                        out.extend_from_slice(&l);
                        out.push(b'\n');
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        self.kill();
                        bail!(
                            "guestfish `{verb}` did not finish in {} s: stopped",
                            timeout.as_secs()
                        );
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        // guestfish stops at a failed command (it reads a script): its stderr says why.
        self.stdin = None;
        let status = self.wait(Duration::from_secs(60));
        bail!(
            "guestfish `{verb}` failed ({status}): {}",
            self.error_text()
        )
    }

    /// The libguestfs error lines of guestfish's stderr, else its last lines.
    fn error_text(&self) -> String {
        let t = self.stderr.lock().map(|t| t.clone()).unwrap_or_default();
        let text = printable_lines(&t);
        let errors: Vec<&str> = text
            .iter()
            .map(String::as_str)
            .filter(|l| l.contains("error"))
            .collect();
        let chosen: Vec<&str> = if errors.is_empty() {
            text.iter()
                .rev()
                .take(5)
                .rev()
                .map(String::as_str)
                .collect()
        } else {
            errors.into_iter().rev().take(5).rev().collect()
        };
        if chosen.is_empty() {
            "no message".into()
        } else {
            chosen.join("; ")
        }
    }

    fn wait(&mut self, limit: Duration) -> String {
        let t = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => return s.to_string(),
                Ok(None) if t.elapsed() < limit => std::thread::sleep(Duration::from_millis(100)),
                _ => {
                    self.kill();
                    return "killed after it did not exit".into();
                }
            }
        }
    }

    fn kill(&mut self) {
        // Our own child, by its handle.
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stdin = None;
    }

    /// Ends the session: guestfish shuts the appliance down on end of input.
    pub fn close(mut self) -> Result<()> {
        self.stdin = None;
        let status = self.wait(Duration::from_secs(120));
        if status.contains("killed") {
            bail!("guestfish did not exit: killed");
        }
        Ok(())
    }
}

impl Drop for Guestfish {
    fn drop(&mut self) {
        if self.stdin.is_some() || matches!(self.child.try_wait(), Ok(None)) {
            self.stdin = None;
            let _ = self.wait(Duration::from_secs(120));
        }
    }
}

fn printable_lines(b: &[u8]) -> Vec<String> {
    b.split(|c| *c == b'\n')
        .filter(|l| !l.is_empty())
        .map(printable)
        .collect()
}

/// What `lstatns` prints, for the fields we use.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stat {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u64,
    pub atime: (i64, i64),
    pub mtime: (i64, i64),
}

pub const S_IFMT: u32 = 0o170000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;

impl Stat {
    pub fn kind(&self) -> FileKind {
        match self.mode & S_IFMT {
            S_IFDIR => FileKind::Directory,
            S_IFREG => FileKind::File,
            S_IFLNK => FileKind::Symlink,
            0o020000 => FileKind::CharDevice,
            0o060000 => FileKind::BlockDevice,
            0o010000 => FileKind::Fifo,
            0o140000 => FileKind::Socket,
            _ => FileKind::Unknown,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileKind {
    File,
    Directory,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
    Unknown,
}

/// Parses `lstatns` output ("st_mode: 33188" lines); every field we use must be there.
pub fn parse_stat(out: &[u8]) -> Result<Stat> {
    let text = std::str::from_utf8(out).context("lstatns printed something not UTF-8")?;
    let mut fields = std::collections::HashMap::new();
    for l in text.lines() {
        if let Some((k, v)) = l.split_once(": ") {
            fields.insert(k.trim(), v.trim());
        }
    }
    let get = |k: &str| -> Result<i64> {
        fields
            .get(k)
            .with_context(|| format!("lstatns printed no {k}"))?
            .parse::<i64>()
            .with_context(|| format!("lstatns printed a {k} that is not a number"))
    };
    let unsigned = |k: &str| -> Result<u64> {
        u64::try_from(get(k)?).with_context(|| format!("lstatns printed a negative {k}"))
    };
    let small = |k: &str| -> Result<u32> {
        u32::try_from(get(k)?).with_context(|| format!("lstatns printed {k} out of range"))
    };
    Ok(Stat {
        mode: small("st_mode")?,
        uid: small("st_uid")?,
        gid: small("st_gid")?,
        size: unsigned("st_size")?,
        nlink: unsigned("st_nlink")?,
        atime: (get("st_atime_sec")?, get("st_atime_nsec")?),
        mtime: (get("st_mtime_sec")?, get("st_mtime_nsec")?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_leaves_no_syntax() {
        assert_eq!(
            quote(b"/etc/host-name_1.txt").unwrap(),
            "\"/etc/host-name_1.txt\""
        );
        assert_eq!(
            quote(b"/a b\"\n\\$x").unwrap(),
            "\"/a\\x20b\\x22\\x0a\\x5c\\x24x\""
        );
        assert!(quote(b"/a\0b").is_err());
        assert_eq!(printable(b"a\nb\x1b[2J"), "a\\nb\\u{1b}[2J");
    }

    #[test]
    fn stat_output_is_parsed_and_checked() {
        let out = b"st_dev: 2048\nst_ino: 14\nst_mode: 33188\nst_nlink: 1\nst_uid: 1234\nst_gid: 5\n\
st_rdev: 0\nst_size: 6\nst_atime_sec: 10\nst_atime_nsec: 20\nst_mtime_sec: -30\nst_mtime_nsec: 40\n";
        let s = parse_stat(out).unwrap();
        assert_eq!(s.kind(), FileKind::File);
        assert_eq!((s.uid, s.gid, s.size, s.mtime), (1234, 5, 6, (-30, 40)));
        assert!(parse_stat(b"st_mode: 1\n").is_err());
        let neg = String::from_utf8_lossy(out).replace("st_size: 6", "st_size: -6");
        assert!(parse_stat(neg.as_bytes()).is_err());
    }
}
