//! Driving libvirt with `virsh`: one-shot commands against a URI, and a
//! long-lived interactive `virsh` holding an embedded driver open
//! (`qemu:///embed?root=DIR`), its stdin the command channel.

use crate::util::run_tool;
use crate::{BackendError, Result};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `virsh -q -c URI ARGS...`; stdout, or the tool's error with its stderr.
pub fn virsh(uri: &str, args: &[&str]) -> Result<String> {
    let mut c = Command::new("virsh");
    c.arg("-q").arg("-c").arg(uri).args(args);
    run_tool(c)
}

/// Whether a virsh error says the domain is not there.
pub fn no_such_domain(e: &BackendError) -> bool {
    matches!(e, BackendError::Tool { stderr, .. }
        if stderr.contains("failed to get domain") || stderr.contains("Domain not found"))
}

/// A domain's state word (`running`, `paused`, `shut off`...) and reason.
pub fn domstate(uri: &str, dom: &str) -> Result<(String, String)> {
    let out = virsh(uri, &["domstate", dom, "--reason"])?;
    Ok(parse_state(&out))
}

/// `running (booted)` → ("running", "booted").
pub fn parse_state(out: &str) -> (String, String) {
    let line = out
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    match line.split_once(" (") {
        Some((s, r)) => (s.to_string(), r.trim_end_matches(')').to_string()),
        None => (line.to_string(), String::new()),
    }
}

/// `domblklist --details`: (target, source) of every disk.
pub fn domblklist(uri: &str, dom: &str) -> Result<Vec<(String, String)>> {
    let out = virsh(uri, &["domblklist", dom, "--details"])?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Type Device Target Source
            (f.len() >= 4).then(|| (f[2].to_string(), f[3..].join(" ")))
        })
        .collect())
}

/// A quoted argument for virsh's own command parser (interactive mode).
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// An interactive `virsh` on an embedded driver. The driver (and so the
/// clone QEMU's supervision) lives as long as this process does.
pub struct Session {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    seq: u64,
    pub uri: String,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("uri", &self.uri)
            .field("pid", &self.child.id())
            .finish()
    }
}

fn pump(mut r: impl Read + Send + 'static, buf: Arc<Mutex<Vec<u8>>>) {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Ok(mut b) = buf.lock() {
                        b.extend_from_slice(&chunk[..n]);
                    }
                }
            }
        }
    });
}

impl Session {
    /// Starts `virsh -c qemu:///embed?root=ROOT` (in `command`, e.g. the
    /// isolated network's namespace), its own process group.
    pub fn start(mut command: Command, root: &Path) -> Result<Session> {
        let uri = format!("qemu:///embed?root={}", root.display());
        command
            .arg("-q")
            .arg("-c")
            .arg(&uri)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        {
            use std::os::unix::process::CommandExt;
            command.process_group(0);
        }
        let mut child = command.spawn().map_err(|source| BackendError::Spawn {
            command: "virsh".into(),
            source,
        })?;
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        if let Some(o) = child.stdout.take() {
            pump(o, out.clone());
        }
        if let Some(e) = child.stderr.take() {
            pump(e, err.clone());
        }
        let stdin = child.stdin.take();
        Ok(Session {
            child,
            stdin,
            out,
            err,
            seq: 0,
            uri,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs one virsh command line; returns its stdout (prompts removed), or
    /// its `error:` lines as the error.
    pub fn run(&mut self, line: &str, timeout: Duration) -> Result<String> {
        self.seq += 1;
        let mark = format!("__coldclone_{}__", self.seq);
        let command = format!("virsh {line}");
        let stdin = self.stdin.as_mut().ok_or_else(|| BackendError::Tool {
            command: command.clone(),
            stderr: "the embedded virsh session is closed".into(),
        })?;
        // Split in two quoted halves: the echoed command line never holds the mark,
        // only echo's output does.
        let half = mark.len() / 2;
        let (a, b) = mark.split_at(half);
        let text = format!("{line}\necho --err \"{a}\"\"{b}\"\necho \"{a}\"\"{b}\"\n");
        stdin
            .write_all(text.as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(|e| BackendError::Tool {
                command: command.clone(),
                stderr: format!("the embedded virsh session is gone: {e}"),
            })?;
        let start = Instant::now();
        loop {
            let done_out = self
                .out
                .lock()
                .map(|b| contains(&b, &mark))
                .unwrap_or(false);
            let done_err = self
                .err
                .lock()
                .map(|b| contains(&b, &mark))
                .unwrap_or(false);
            if done_out && done_err {
                break;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(BackendError::Tool {
                    command,
                    stderr: format!(
                        "the embedded virsh session ended ({st}): {}",
                        String::from_utf8_lossy(
                            &self.err.lock().map(|b| b.clone()).unwrap_or_default()
                        )
                    ),
                });
            }
            if start.elapsed() > timeout {
                return Err(BackendError::Timeout {
                    what: command,
                    seconds: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = take_until(&self.out, &mark);
        let err = take_until(&self.err, &mark);
        let errors: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with("error:") && !l.contains(&mark))
            .collect();
        if !errors.is_empty() {
            return Err(BackendError::Tool {
                command,
                stderr: errors.join("\n"),
            });
        }
        Ok(strip_prompts(&out).replace(&mark, ""))
    }

    /// Ends the session (the embedded driver with it), bounded.
    pub fn close(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.write_all(b"quit\n");
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.close();
    }
}

/// Removes virsh's prompts with the command lines it echoes after them
/// (`virsh # LINE\n`): what is left is the commands' output.
pub fn strip_prompts(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("virsh # ") {
        out.push_str(&rest[..i]);
        rest = match rest[i..].find('\n') {
            Some(n) => &rest[i + n + 1..],
            None => "",
        };
    }
    out.push_str(rest);
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Removes and returns the buffer's text up to and including the line with `mark`.
fn take_until(buf: &Arc<Mutex<Vec<u8>>>, mark: &str) -> String {
    let Ok(mut b) = buf.lock() else {
        return String::new();
    };
    let pos = b
        .windows(mark.len())
        .position(|w| w == mark.as_bytes())
        .map(|p| p + mark.len())
        .unwrap_or(b.len());
    let end = b[pos..]
        .iter()
        .position(|c| *c == b'\n')
        .map(|n| pos + n + 1)
        .unwrap_or(pos);
    let taken: Vec<u8> = b.drain(..end).collect();
    String::from_utf8_lossy(&taken).into_owned()
}

/// Watches the original's QMP events through libvirt
/// (`virsh qemu-monitor-event DOM --loop`), for the pause's STOP/RESUME times.
pub struct EventWatch {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
}

/// One event: name, QEMU's timestamp in µs, its data as printed.
#[derive(Debug, Clone, PartialEq)]
pub struct MonitorEvent {
    pub name: String,
    pub timestamp_us: i64,
    pub data: String,
}

impl EventWatch {
    pub fn start(uri: &str, dom: &str) -> Result<EventWatch> {
        let mut c = Command::new("virsh");
        c.args(["-q", "-c", uri, "qemu-monitor-event", dom, "--loop"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = c.spawn().map_err(|source| BackendError::Spawn {
            command: "virsh qemu-monitor-event".into(),
            source,
        })?;
        let out = Arc::new(Mutex::new(Vec::new()));
        if let Some(o) = child.stdout.take() {
            pump(o, out.clone());
        }
        Ok(EventWatch { child, out })
    }

    /// Stops watching; the events seen.
    pub fn finish(mut self) -> Vec<MonitorEvent> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The reader thread ends at EOF; give it a moment to take the tail.
        std::thread::sleep(Duration::from_millis(50));
        let text = self
            .out
            .lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        text.lines().filter_map(parse_event).collect()
    }
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `event STOP at 1796322431.390505 for domain 'web1': <null>`
pub fn parse_event(line: &str) -> Option<MonitorEvent> {
    let rest = line.strip_prefix("event ")?;
    let (name, rest) = rest.split_once(" at ")?;
    let (ts, rest) = rest.split_once(' ')?;
    let (secs, micros) = ts.split_once('.')?;
    let secs: i64 = secs.parse().ok()?;
    let micros: i64 = micros.parse().ok()?;
    let data = rest.split_once("': ").map(|(_, d)| d).unwrap_or("");
    Some(MonitorEvent {
        name: name.to_string(),
        timestamp_us: secs * 1_000_000 + micros,
        data: data.to_string(),
    })
}

/// A plain absolute path (for the embedded root's checks).
pub fn plain_absolute(p: &Path) -> bool {
    p.is_absolute()
        && p.components().all(|c| {
            matches!(
                c,
                std::path::Component::RootDir | std::path::Component::Normal(_)
            )
        })
}

/// Where embedded drivers' roots live: short (libvirt's socket paths under the
/// root must fit in 108 bytes), on tmpfs, one per run.
pub const EMBED_PARENT: &str = "/run/coldclone";

pub fn embed_root(run_tag: &str) -> PathBuf {
    PathBuf::from(EMBED_PARENT).join(format!("embed-{run_tag}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn events_and_states_parse() {
        let e = parse_event("event STOP at 1796322431.390505 for domain 'web1': <null>").unwrap();
        assert_eq!(e.name, "STOP");
        assert_eq!(e.timestamp_us, 1_796_322_431_390_505);
        let e = parse_event(
            "event MIGRATION at 1796322431.422649 for domain 'web1': {\"status\":\"completed\"}",
        )
        .unwrap();
        assert!(e.data.contains("completed"));
        assert!(parse_event("Domain 'x' suspended").is_none());
        assert_eq!(
            parse_state("paused (snapshot)\n\n"),
            ("paused".into(), "snapshot".into())
        );
        assert_eq!(
            parse_state("shut off (destroyed)"),
            ("shut off".into(), "destroyed".into())
        );
        assert_eq!(quote("a'b"), "'a'\\''b'");
        assert_eq!(
            strip_prompts(
                "virsh # domstate x\npaused\n\nvirsh # echo \"__a\"\"b__\"\n__ab__virsh # q\n"
            ),
            "paused\n\n__ab__"
        );
    }
}
