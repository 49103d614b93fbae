//! The `xl` command line: what we run, and parsing of what it prints.

use crate::util::{self, run_tool};
use crate::{BackendError, Result};
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub fn xl(args: &[&str]) -> Result<String> {
    let mut c = Command::new("xl");
    c.args(args);
    run_tool(c)
}

/// Runs xl, killing it after `timeout` (xl shutdown waits up to 60 s for an
/// acknowledgement; a save or restore can hang on a broken backend).
pub fn xl_bounded(args: &[&str], timeout: Duration) -> Result<String> {
    let command = format!("xl {}", args.join(" "));
    let mut child = Command::new("xl")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| BackendError::Spawn {
            command: command.clone(),
            source,
        })?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(BackendError::Timeout {
                    what: command,
                    seconds: timeout.as_secs(),
                });
            }
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|source| BackendError::Spawn {
            command: command.clone(),
            source,
        })?;
    crate::util::tool_result(command, out)
}

/// One row of `xl list -v`.
#[derive(Debug, Clone, PartialEq)]
pub struct DomState {
    pub name: String,
    pub domid: u32,
    pub mem_mib: u64,
    /// Six flags: r b p s c d (running, blocked, paused, shutdown, crashed, dying).
    pub flags: String,
    pub uuid: String,
    /// The shutdown reason code when shut down: 0 poweroff, 1 reboot, 2 suspend, 3 crash, 4 watchdog.
    pub reason: Option<u32>,
}

impl DomState {
    pub fn paused(&self) -> bool {
        self.flags.contains('p')
    }
    pub fn shut_down(&self) -> bool {
        self.flags.contains('s') || self.flags.contains('c') || self.flags.contains('d')
    }
    pub fn powered_off(&self) -> bool {
        self.flags.contains('s') && self.reason == Some(0)
    }
}

/// Parses `xl list -v` output (header line first).
pub fn parse_list_verbose(text: &str) -> Vec<DomState> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            Some(DomState {
                name: f[0].to_string(),
                domid: f[1].parse().ok()?,
                mem_mib: f[2].parse().ok()?,
                flags: f[4].to_string(),
                uuid: f[6].to_string(),
                reason: f[7].parse().ok(),
            })
        })
        .collect()
}

/// The state of one domain, `None` if there is no domain of that name.
pub fn state(name: &str) -> Result<Option<DomState>> {
    match xl(&["list", "-v", name]) {
        Ok(out) => Ok(parse_list_verbose(&out)
            .into_iter()
            .find(|d| d.name == name)),
        Err(BackendError::Tool { stderr, .. })
            if stderr.contains("is an invalid domain identifier")
                || stderr.contains("invalid domain") =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The JSON config of a running domain (`xl list -l`).
pub fn config(name: &str) -> Result<Value> {
    let out = xl(&["list", "-l", name])?;
    let v: Value = serde_json::from_str(&out).map_err(|e| BackendError::Tool {
        command: format!("xl list -l {name}"),
        stderr: format!("unreadable JSON: {e}"),
    })?;
    v.as_array()
        .and_then(|a| a.first())
        .cloned()
        .ok_or_else(|| BackendError::Unsupported(format!("xl list -l {name} printed no domain")))
}

/// Waits (bounded) for `xl` processes working on `marker` (a path in their
/// arguments) to end: after a crash, a save may still be writing.
pub fn wait_for_xl_processes(marker: &str, timeout: Duration) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        let busy = util::find_processes_with_marker(marker)
            .into_iter()
            .any(|pid| {
                util::process_cmdline(pid)
                    .and_then(|a| a.first().cloned())
                    .is_some_and(|a| a == "xl" || a.ends_with("/xl"))
            });
        if !busy {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_verbose_parses() {
        let text = "Name                                        ID   Mem VCPUs\tState\tTime(s)   UUID                            Reason-Code\tSecurity Label
Domain-0                                     0  1024     2     r-----      43.0 00000000-0000-0000-0000-000000000000        -                -
g1                                           1   128     1     --p---      11.3 7c44e2dc-73bd-4098-a49d-224e250ae566        -                -
c1                                           2   128     1     ---s--       6.7 7b9279a1-8fa4-41c2-8453-621dc2366041        0                -
";
        let d = parse_list_verbose(text);
        assert_eq!(d.len(), 3);
        assert!(d[1].paused() && !d[1].shut_down());
        assert_eq!(d[1].uuid, "7c44e2dc-73bd-4098-a49d-224e250ae566");
        assert_eq!(d[1].reason, None);
        assert!(d[2].shut_down() && d[2].powered_off());
        assert_eq!(d[2].domid, 2);
        assert_eq!(d[0].mem_mib, 1024);
    }
}
