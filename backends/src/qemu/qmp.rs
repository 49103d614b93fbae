//! A small synchronous QMP client: JSON lines over a unix socket.
//!
//! Events that arrive while a command is in flight are kept, so that the
//! caller can wait for `STOP`/`RESUME`/`MIGRATION`/`BLOCK_JOB_*` afterwards
//! without polling, and read QEMU's own timestamps from them.

use super::QemuError;
use crate::{BackendError, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Event {
    pub name: String,
    pub data: Value,
    /// QEMU's timestamp of the event, in microseconds since the epoch.
    pub timestamp_us: i64,
}

pub struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Event>,
    command_timeout: Duration,
}

impl Qmp {
    /// Connects and negotiates capabilities.
    pub fn connect(path: &Path) -> Result<Qmp> {
        let stream = UnixStream::connect(path).map_err(|source| {
            BackendError::Qemu(QemuError::QmpConnect {
                path: path.to_path_buf(),
                source,
            })
        })?;
        Self::from_stream(path, stream)
    }

    /// Connects, retrying while the socket does not exist yet (a QEMU we just started).
    pub fn connect_retry(
        path: &Path,
        timeout: Duration,
        alive: &mut dyn FnMut() -> bool,
    ) -> Result<Qmp> {
        let start = Instant::now();
        loop {
            match UnixStream::connect(path) {
                Ok(s) => return Self::from_stream(path, s),
                Err(source) => {
                    if start.elapsed() > timeout || !alive() {
                        return Err(BackendError::Qemu(QemuError::QmpConnect {
                            path: path.to_path_buf(),
                            source,
                        }));
                    }
                    std::thread::sleep(Duration::from_millis(25));
                }
            }
        }
    }

    fn from_stream(path: &Path, stream: UnixStream) -> Result<Qmp> {
        let io = |source| {
            BackendError::Qemu(QemuError::QmpIo {
                path: path.to_path_buf(),
                source,
            })
        };
        let writer = stream.try_clone().map_err(io)?;
        let mut q = Qmp {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
            command_timeout: Duration::from_secs(60),
        };
        let greeting = q.read_message(Duration::from_secs(10))?;
        if greeting.get("QMP").is_none() {
            return Err(q.protocol(format!("expected a QMP greeting, got {greeting}")));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn protocol(&self, what: String) -> BackendError {
        BackendError::Qemu(QemuError::QmpProtocol {
            path: self.path.clone(),
            what,
        })
    }

    fn read_message(&mut self, timeout: Duration) -> Result<Value> {
        let path = self.path.clone();
        let io = |source| {
            BackendError::Qemu(QemuError::QmpIo {
                path: path.clone(),
                source,
            })
        };
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(io)?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(self.protocol("QEMU closed the connection".into())),
            Ok(_) => serde_json::from_str(&line)
                .map_err(|e| self.protocol(format!("bad JSON {line:?}: {e}"))),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(BackendError::Timeout {
                    what: format!("a message from QMP {}", self.path.display()),
                    seconds: timeout.as_secs(),
                })
            }
            Err(e) => Err(io(e)),
        }
    }

    fn keep_event(&mut self, msg: &Value) -> bool {
        let Some(name) = msg.get("event").and_then(Value::as_str) else {
            return false;
        };
        let ts = msg.get("timestamp");
        let secs = ts
            .and_then(|t| t.get("seconds"))
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let us = ts
            .and_then(|t| t.get("microseconds"))
            .and_then(Value::as_i64)
            .unwrap_or(0);
        self.events.push(Event {
            name: name.to_string(),
            data: msg.get("data").cloned().unwrap_or(Value::Null),
            timestamp_us: secs * 1_000_000 + us,
        });
        true
    }

    /// Runs a command and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let msg = if arguments.as_object().is_some_and(|o| o.is_empty()) {
            json!({ "execute": command })
        } else {
            json!({ "execute": command, "arguments": arguments })
        };
        let mut line = msg.to_string();
        line.push('\n');
        let path = self.path.clone();
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| BackendError::Qemu(QemuError::QmpIo { path, source }))?;
        let deadline = Instant::now() + self.command_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BackendError::Timeout {
                    what: format!("QMP command {command}"),
                    seconds: self.command_timeout.as_secs(),
                });
            }
            let reply = self.read_message(left)?;
            if self.keep_event(&reply) {
                continue;
            }
            if let Some(err) = reply.get("error") {
                return Err(BackendError::Qemu(QemuError::QmpCommand {
                    command: command.to_string(),
                    class: err
                        .get("class")
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string(),
                    desc: err
                        .get("desc")
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string(),
                }));
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            return Err(self.protocol(format!("unexpected reply {reply}")));
        }
    }

    /// Waits for the first event (already received or new) that `want` accepts, and removes it.
    pub fn wait_event(
        &mut self,
        what: &str,
        timeout: Duration,
        want: &dyn Fn(&Event) -> bool,
    ) -> Result<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.events.iter().position(want) {
                return Ok(self.events.remove(i));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BackendError::Timeout {
                    what: what.to_string(),
                    seconds: timeout.as_secs(),
                });
            }
            match self.read_message(left) {
                Ok(msg) => {
                    self.keep_event(&msg);
                }
                Err(BackendError::Timeout { .. }) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Drops events received so far.
    pub fn clear_events(&mut self) {
        self.events.clear();
    }

    pub fn status(&mut self) -> Result<String> {
        let st = self.execute("query-status", json!({}))?;
        Ok(st
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string())
    }

    /// The QEMU process on the other end of the socket (SO_PEERCRED).
    pub fn peer_pid(&self) -> Result<u32> {
        self.peer_cred().map(|(pid, _)| pid)
    }

    /// The pid and uid of the process on the other end (SO_PEERCRED: as they
    /// were when it created the socket, which the kernel vouches for).
    pub fn peer_cred(&self) -> Result<(u32, u32)> {
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
                self.writer.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if rc != 0 || cred.pid <= 0 {
            return Err(self.protocol(format!(
                "cannot learn the QEMU process behind the socket: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok((cred.pid as u32, cred.uid))
    }
}
