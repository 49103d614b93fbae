//! A client of the QEMU guest agent (qemu-ga) over the host end of its virtio-serial
//! port: the unix socket QEMU serves for `-chardev socket,path=...,server=on` bound to
//! `-device virtserialport,name=org.qemu.guest_agent.0`. Shared by the QEMU and libvirt
//! backends (a libvirt clone's agent channel is a socket of the clone's own too).
//!
//! The protocol, as qemu/qemu documents it in `qga/qapi-schema.json`:
//! - one JSON object per request, `{"execute": NAME, "arguments": {...}}`; one JSON
//!   object per reply, `{"return": ...}` or `{"error": {"class": ..., "desc": ...}}`,
//!   each sent by qemu-ga followed by a newline (`qga/main.c`, `send_response`);
//! - `guest-sync-delimited` (`id`: an integer): "must be issued upon initial connection,
//!   and after any client-side timeouts"; the request is preceded by a 0xFF byte so that
//!   the agent drops a partial request of an earlier client, and the reply is preceded by
//!   a 0xFF sentinel: everything before it, and every reply that does not carry our id,
//!   is stale;
//! - `guest-ping`: `{}`; `guest-shutdown` (`mode`: "powerdown"): "does NOT return a
//!   response on success" (`'success-response': 'no'`); qemu-ga runs `/sbin/shutdown -P
//!   +0` (qga/commands-posix.c, `qmp_guest_shutdown`) and answers only an error;
//! - `guest-fsfreeze-freeze` → the number of file systems frozen ("On error, all
//!   filesystems will be thawed"); `guest-fsfreeze-thaw` → the number thawed;
//!   `guest-fsfreeze-status` → `"thawed"` or `"frozen"` (`GuestFsfreezeStatus`).
//!
//! Everything the peer sends is untrusted: every read is bounded by a deadline and a
//! size limit, replies are parsed into types, and a timeout poisons the connection
//! (the next command reconnects and syncs again, as the schema asks).

use serde::Deserialize;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The virtio-serial port name qemu-ga opens in the guest.
pub const PORT_NAME: &str = "org.qemu.guest_agent.0";
/// The most one reply may take (qemu-ga's replies to the commands used here are tiny).
pub const MAX_REPLY_BYTES: usize = 64 * 1024;
/// The most stale data skipped while syncing.
const MAX_STALE_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to the guest agent socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("guest agent socket {path}: {why}; not used")]
    Untrusted { path: PathBuf, why: String },
    #[error("guest agent I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the guest agent at {path} did not answer {command} within {seconds:.1} s")]
    Timeout {
        path: PathBuf,
        command: String,
        seconds: f64,
    },
    #[error("the guest agent at {path} closed the connection during {command}")]
    Closed { path: PathBuf, command: String },
    #[error("the guest agent at {path} answered {command} with {what}")]
    Protocol {
        path: PathBuf,
        command: String,
        what: String,
    },
    #[error("the guest agent refused {command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

pub type Result<T> = std::result::Result<T, AgentError>;

/// `GuestFsfreezeStatus` (qga/qapi-schema.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FreezeStatus {
    Thawed,
    Frozen,
}

/// Who may be behind an agent socket. The socket file must be a socket owned by root
/// (or `uid`, the VM's configured QEMU user); and when `pid` is given, the process
/// serving it (SO_PEERCRED, which the kernel vouches for) must be that QEMU.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peer {
    pub pid: Option<u32>,
    pub uid: Option<u32>,
}

/// Checks the socket file itself (not following a symlink): a socket, owned by root
/// or by `peer.uid`.
pub fn check_socket(path: &Path, peer: &Peer) -> Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let untrusted = |why: String| AgentError::Untrusted {
        path: path.to_path_buf(),
        why,
    };
    let meta = std::fs::symlink_metadata(path).map_err(|source| AgentError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.file_type().is_socket() {
        return Err(untrusted("it is not a socket".into()));
    }
    if meta.uid() != 0 && Some(meta.uid()) != peer.uid {
        return Err(untrusted(format!(
            "it is owned by uid {}, neither root nor the VM's QEMU user",
            meta.uid()
        )));
    }
    Ok(())
}

/// One connection to a guest agent, in sync.
pub struct Agent {
    stream: UnixStream,
    path: PathBuf,
    /// Bytes read past the last reply.
    buf: Vec<u8>,
    /// A command timed out: the stream is out of step until synced again.
    poisoned: bool,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("path", &self.path).finish()
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    class: String,
    #[serde(default)]
    desc: String,
}

/// A reply, typed: exactly one of `return` and `error`.
#[derive(Deserialize)]
struct Reply {
    #[serde(rename = "return")]
    ret: Option<Value>,
    error: Option<ErrorBody>,
}

impl Agent {
    /// Connects to the socket after checking it (and its peer), then syncs
    /// (`guest-sync-delimited`) within `timeout`.
    pub fn connect(path: &Path, peer: &Peer, timeout: Duration) -> Result<Agent> {
        check_socket(path, peer)?;
        let stream = UnixStream::connect(path).map_err(|source| AgentError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        if let Some(want) = peer.pid {
            let got = peer_pid(&stream).map_err(|source| AgentError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            if got != want {
                return Err(AgentError::Untrusted {
                    path: path.to_path_buf(),
                    why: format!("it is served by pid {got}, not by the VM's QEMU (pid {want})"),
                });
            }
        }
        let mut a = Agent {
            stream,
            path: path.to_path_buf(),
            buf: Vec::new(),
            poisoned: true,
        };
        a.sync(timeout)?;
        Ok(a)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `guest-sync-delimited`: 0xFF, the request; then everything up to the reply's
    /// 0xFF sentinel is dropped, and replies are read until one returns our id.
    pub fn sync(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let id = sync_id();
        let cmd = "guest-sync-delimited";
        let mut req = vec![0xFFu8];
        req.extend_from_slice(
            json!({"execute": cmd, "arguments": {"id": id}})
                .to_string()
                .as_bytes(),
        );
        req.push(b'\n');
        self.buf.clear();
        self.send(&req, cmd, deadline)?;
        let mut skipped = 0usize;
        loop {
            // Drop everything up to (and with) the sentinel.
            loop {
                if let Some(at) = self.buf.iter().position(|b| *b == 0xFF) {
                    self.buf.drain(..=at);
                    break;
                }
                skipped += self.buf.len();
                self.buf.clear();
                if skipped > MAX_STALE_BYTES {
                    return Err(self.protocol(cmd, "more than 1 MiB of data before the sentinel"));
                }
                self.fill(cmd, deadline)?;
            }
            let line = self.read_line(cmd, deadline)?;
            match parse_reply(&line) {
                Ok(Some(v)) if v.as_i64() == Some(id) => {
                    self.poisoned = false;
                    return Ok(());
                }
                // A stale reply, or noise after a sentinel: wait for the next sentinel.
                _ => skipped += line.len(),
            }
        }
    }

    /// Sends one command and returns its `return` value.
    fn execute(&mut self, cmd: &str, args: Option<Value>, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        if self.poisoned {
            self.sync(timeout)?;
        }
        let mut req = match args {
            Some(a) => json!({"execute": cmd, "arguments": a}),
            None => json!({ "execute": cmd }),
        }
        .to_string()
        .into_bytes();
        req.push(b'\n');
        self.send(&req, cmd, deadline)?;
        let line = self.read_line(cmd, deadline).inspect_err(|_| {
            self.poisoned = true;
        })?;
        match serde_json::from_slice::<Reply>(&line) {
            Ok(Reply {
                ret: Some(v),
                error: None,
            }) => Ok(v),
            Ok(Reply {
                ret: None,
                error: Some(e),
            }) => Err(AgentError::Command {
                command: cmd.to_string(),
                class: clip(&e.class),
                desc: clip(&e.desc),
            }),
            _ => {
                self.poisoned = true;
                Err(self.protocol(cmd, &format!("{:?}", clip(&String::from_utf8_lossy(&line)))))
            }
        }
    }

    /// `guest-ping`.
    pub fn ping(&mut self, timeout: Duration) -> Result<()> {
        self.execute("guest-ping", None, timeout).map(|_| ())
    }

    /// `guest-shutdown` (powerdown). Success has no reply: an error reply within
    /// `grace` is a refusal; silence (or the agent going away) is success.
    pub fn shutdown(&mut self, grace: Duration) -> Result<()> {
        let cmd = "guest-shutdown";
        if self.poisoned {
            self.sync(grace)?;
        }
        let mut req = json!({"execute": cmd, "arguments": {"mode": "powerdown"}})
            .to_string()
            .into_bytes();
        req.push(b'\n');
        let deadline = Instant::now() + grace;
        self.send(&req, cmd, deadline)?;
        self.poisoned = true;
        match self.read_line(cmd, deadline) {
            Err(AgentError::Timeout { .. } | AgentError::Closed { .. }) => Ok(()),
            Err(e) => Err(e),
            Ok(line) => match serde_json::from_slice::<Reply>(&line) {
                Ok(Reply { error: Some(e), .. }) => Err(AgentError::Command {
                    command: cmd.to_string(),
                    class: clip(&e.class),
                    desc: clip(&e.desc),
                }),
                _ => Err(self.protocol(
                    cmd,
                    &format!(
                        "{:?} (it has no reply on success)",
                        clip(&String::from_utf8_lossy(&line))
                    ),
                )),
            },
        }
    }

    /// `guest-fsfreeze-freeze`: the number of file systems frozen.
    pub fn fsfreeze_freeze(&mut self, timeout: Duration) -> Result<u64> {
        let cmd = "guest-fsfreeze-freeze";
        let v = self.execute(cmd, None, timeout)?;
        self.count(cmd, &v)
    }

    /// `guest-fsfreeze-thaw`: the number of file systems thawed.
    pub fn fsfreeze_thaw(&mut self, timeout: Duration) -> Result<u64> {
        let cmd = "guest-fsfreeze-thaw";
        let v = self.execute(cmd, None, timeout)?;
        self.count(cmd, &v)
    }

    /// `guest-fsfreeze-status`.
    pub fn fsfreeze_status(&mut self, timeout: Duration) -> Result<FreezeStatus> {
        let cmd = "guest-fsfreeze-status";
        let v = self.execute(cmd, None, timeout)?;
        serde_json::from_value(v.clone()).map_err(|_| self.protocol(cmd, &clip(&v.to_string())))
    }

    fn count(&self, cmd: &str, v: &Value) -> Result<u64> {
        v.as_u64()
            .ok_or_else(|| self.protocol(cmd, &format!("{} (not a count)", clip(&v.to_string()))))
    }

    fn protocol(&self, cmd: &str, what: &str) -> AgentError {
        AgentError::Protocol {
            path: self.path.clone(),
            command: cmd.to_string(),
            what: what.to_string(),
        }
    }

    fn timeout(&self, cmd: &str, total: Duration) -> AgentError {
        AgentError::Timeout {
            path: self.path.clone(),
            command: cmd.to_string(),
            seconds: total.as_secs_f64(),
        }
    }

    fn send(&mut self, req: &[u8], cmd: &str, deadline: Instant) -> Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.timeout(cmd, Duration::ZERO));
        }
        self.stream
            .set_write_timeout(Some(left))
            .map_err(|source| AgentError::Io {
                path: self.path.clone(),
                source,
            })?;
        match self.stream.write_all(req) {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                self.poisoned = true;
                Err(self.timeout(cmd, left))
            }
            Err(source) => Err(AgentError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Reads more bytes into the buffer, before the deadline.
    fn fill(&mut self, cmd: &str, deadline: Instant) -> Result<()> {
        let start = Instant::now();
        let left = deadline.saturating_duration_since(start);
        if left.is_zero() {
            self.poisoned = true;
            return Err(self.timeout(cmd, left));
        }
        self.stream
            .set_read_timeout(Some(left))
            .map_err(|source| AgentError::Io {
                path: self.path.clone(),
                source,
            })?;
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) => {
                self.poisoned = true;
                Err(AgentError::Closed {
                    path: self.path.clone(),
                    command: cmd.to_string(),
                })
            }
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                self.poisoned = true;
                Err(self.timeout(cmd, left))
            }
            Err(source) => Err(AgentError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// One reply line (without its newline), bounded in size and time. Empty lines
    /// are skipped.
    fn read_line(&mut self, cmd: &str, deadline: Instant) -> Result<Vec<u8>> {
        loop {
            if let Some(at) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=at).take(at).collect();
                let trimmed = line.trim_ascii();
                if trimmed.is_empty() {
                    continue;
                }
                return Ok(trimmed.to_vec());
            }
            if self.buf.len() > MAX_REPLY_BYTES {
                self.poisoned = true;
                return Err(self.protocol(cmd, "a reply longer than 64 KiB"));
            }
            self.fill(cmd, deadline)?;
        }
    }
}

/// A reply's `return` value (`None` for an error reply); `Err` for something else.
fn parse_reply(line: &[u8]) -> std::result::Result<Option<Value>, ()> {
    match serde_json::from_slice::<Reply>(line) {
        Ok(Reply {
            ret: Some(v),
            error: None,
        }) => Ok(Some(v)),
        Ok(Reply {
            ret: None,
            error: Some(_),
        }) => Ok(None),
        _ => Err(()),
    }
}

/// Text from the peer, shortened for an error message.
fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(200).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// A fresh id for guest-sync: random, positive, below 2^53 (a JSON number any parser
/// keeps exact).
fn sync_id() -> i64 {
    let hex = crate::util::random_hex(6);
    i64::from_str_radix(&hex, 16).unwrap_or(0x5eed) & ((1 << 53) - 1)
}

/// The pid of the process on the other end (SO_PEERCRED).
fn peer_pid(s: &UnixStream) -> std::io::Result<u32> {
    use std::os::unix::io::AsRawFd;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, a valid ucred.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.pid as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    /// A peer on a socket in a temp folder, run by `serve` on its one connection.
    fn peer(
        serve: impl FnOnce(UnixStream) + Send + 'static,
    ) -> (PathBuf, std::thread::JoinHandle<()>) {
        let dir = std::env::temp_dir().join(format!(
            "cc-agent-test-{}-{}",
            std::process::id(),
            crate::util::random_hex(4)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("qga.sock");
        let l = UnixListener::bind(&path).unwrap();
        let h = std::thread::spawn(move || {
            if let Ok((s, _)) = l.accept() {
                serve(s);
            }
        });
        (path, h)
    }

    /// Reads one request line (dropping any leading 0xFF), returns its JSON.
    fn request(r: &mut std::io::BufReader<UnixStream>) -> Option<Value> {
        let mut line = Vec::new();
        r.read_until(b'\n', &mut line).ok()?;
        let start = line.iter().position(|b| *b != 0xFF)?;
        serde_json::from_slice(&line[start..]).ok()
    }

    fn sync_reply(req: &Value) -> Vec<u8> {
        let mut out = b"{\"return\": 1}\n\xff".to_vec();
        out.extend_from_slice(format!("{{\"return\": {}}}\n", req["arguments"]["id"]).as_bytes());
        out
    }

    const T: Duration = Duration::from_secs(5);

    /// The sockets the tests make are this process's user's.
    fn me() -> Peer {
        // SAFETY: getuid has no preconditions.
        Peer {
            pid: None,
            uid: Some(unsafe { libc::getuid() }),
        }
    }

    #[test]
    fn syncs_past_stale_data_then_freezes_thaws_and_reads_the_status() {
        let (path, h) = peer(|s| {
            let mut w = s.try_clone().unwrap();
            let mut r = std::io::BufReader::new(s);
            let req = request(&mut r).unwrap();
            assert_eq!(req["execute"], "guest-sync-delimited");
            // Stale bytes of an earlier client, then the sentinel and our id.
            w.write_all(b"{\"return\": {\"half").unwrap();
            w.write_all(&sync_reply(&req)).unwrap();
            for (cmd, reply) in [
                ("guest-fsfreeze-freeze", "{\"return\": 2}\n"),
                ("guest-fsfreeze-status", "{\"return\": \"frozen\"}\n"),
                ("guest-fsfreeze-thaw", "{\"return\": 2}\n"),
                ("guest-ping", "{\"return\": {}}\n"),
            ] {
                let req = request(&mut r).unwrap();
                assert_eq!(req["execute"], cmd);
                w.write_all(reply.as_bytes()).unwrap();
            }
        });
        let mut a = Agent::connect(&path, &me(), T).unwrap();
        assert_eq!(a.fsfreeze_freeze(T).unwrap(), 2);
        assert_eq!(a.fsfreeze_status(T).unwrap(), FreezeStatus::Frozen);
        assert_eq!(a.fsfreeze_thaw(T).unwrap(), 2);
        a.ping(T).unwrap();
        h.join().unwrap();
    }

    #[test]
    fn a_freeze_that_never_returns_times_out_and_the_next_command_syncs_again() {
        let (path, h) = peer(|s| {
            let mut w = s.try_clone().unwrap();
            let mut r = std::io::BufReader::new(s);
            let req = request(&mut r).unwrap();
            w.write_all(&sync_reply(&req)).unwrap();
            let req = request(&mut r).unwrap();
            assert_eq!(req["execute"], "guest-fsfreeze-freeze");
            // No answer. The client must sync again before its thaw.
            let req = request(&mut r).unwrap();
            assert_eq!(req["execute"], "guest-sync-delimited");
            // The late freeze reply arrives first: it must be dropped as stale.
            w.write_all(b"{\"return\": 1}\n").unwrap();
            w.write_all(&sync_reply(&req)).unwrap();
            let req = request(&mut r).unwrap();
            assert_eq!(req["execute"], "guest-fsfreeze-thaw");
            w.write_all(b"{\"return\": 1}\n").unwrap();
        });
        let mut a = Agent::connect(&path, &me(), T).unwrap();
        let t = Instant::now();
        let e = a.fsfreeze_freeze(Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, AgentError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));
        assert_eq!(a.fsfreeze_thaw(T).unwrap(), 1);
        h.join().unwrap();
    }

    #[test]
    fn untrusted_replies_are_errors_not_panics() {
        for bad in [
            &b"{\"return\": -1}\n"[..],
            b"{\"return\": \"lots\"}\n",
            b"not json\n",
            b"{\"return\": 1, \"error\": {\"class\": \"x\"}}\n",
            b"{}\n",
        ] {
            let bad = bad.to_vec();
            let (path, h) = peer(move |s| {
                let mut w = s.try_clone().unwrap();
                let mut r = std::io::BufReader::new(s);
                let req = request(&mut r).unwrap();
                w.write_all(&sync_reply(&req)).unwrap();
                let _ = request(&mut r);
                let _ = w.write_all(&bad);
            });
            let mut a = Agent::connect(&path, &me(), T).unwrap();
            let e = a.fsfreeze_freeze(T).unwrap_err();
            assert!(matches!(e, AgentError::Protocol { .. }), "{e}");
            h.join().unwrap();
        }
        // A reply without end is cut at the size limit.
        let (path, h) = peer(|s| {
            let mut w = s.try_clone().unwrap();
            let mut r = std::io::BufReader::new(s);
            let req = request(&mut r).unwrap();
            w.write_all(&sync_reply(&req)).unwrap();
            let _ = request(&mut r);
            let _ = w.write_all(&vec![b'x'; MAX_REPLY_BYTES + 8192]);
        });
        let mut a = Agent::connect(&path, &me(), T).unwrap();
        let e = a.fsfreeze_status(T).unwrap_err();
        assert!(e.to_string().contains("64 KiB"), "{e}");
        h.join().unwrap();
    }

    #[test]
    fn an_error_reply_is_the_agents_refusal_and_shutdown_succeeds_silently() {
        let (path, h) = peer(|s| {
            let mut w = s.try_clone().unwrap();
            let mut r = std::io::BufReader::new(s);
            let req = request(&mut r).unwrap();
            w.write_all(&sync_reply(&req)).unwrap();
            let _ = request(&mut r);
            w.write_all(
                b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"fsfreeze is disabled\"}}\n",
            )
            .unwrap();
            let req = request(&mut r).unwrap();
            assert_eq!(req["execute"], "guest-shutdown");
            assert_eq!(req["arguments"]["mode"], "powerdown");
            // qemu-ga: no reply on success.
        });
        let mut a = Agent::connect(&path, &me(), T).unwrap();
        let e = a.fsfreeze_freeze(T).unwrap_err();
        assert!(e.to_string().contains("fsfreeze is disabled"), "{e}");
        a.shutdown(Duration::from_millis(300)).unwrap();
        h.join().unwrap();
    }

    #[test]
    fn a_socket_served_by_another_process_or_not_a_socket_is_refused() {
        let (path, h) = peer(|_s| {});
        let e = Agent::connect(
            &path,
            &Peer {
                pid: Some(1),
                ..me()
            },
            T,
        )
        .unwrap_err();
        assert!(matches!(e, AgentError::Untrusted { .. }), "{e}");
        h.join().unwrap();
        let file = path.with_file_name("plain");
        std::fs::write(&file, b"").unwrap();
        let e = check_socket(&file, &me()).unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}
