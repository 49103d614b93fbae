//! Small helpers shared by backends: running tools, looking at processes.

use crate::{BackendError, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs a tool, returns stdout; a non-zero exit becomes `BackendError::Tool` with its stderr.
pub fn run_tool(cmd: Command) -> Result<String> {
    network_isolation::run_tool(cmd).map_err(Into::into)
}

/// A finished tool's stdout, or `BackendError::Tool` with its stderr when it failed.
pub fn tool_result(command: String, out: std::process::Output) -> Result<String> {
    network_isolation::tool_output(command, out).map_err(Into::into)
}

impl From<network_isolation::ToolFailure> for BackendError {
    fn from(f: network_isolation::ToolFailure) -> Self {
        match f {
            network_isolation::ToolFailure::Spawn { command, source } => {
                BackendError::Spawn { command, source }
            }
            network_isolation::ToolFailure::Failed { command, stderr } => {
                BackendError::Tool { command, stderr }
            }
        }
    }
}

pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid)
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

pub fn process_cmdline(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
    )
}

/// Processes whose command line contains `marker` as a whole argument part.
pub fn find_processes_with_marker(marker: &str) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Some(args) = process_cmdline(pid) {
            if args.iter().any(|a| a.contains(marker)) && !is_zombie(pid) {
                found.push(pid);
            }
        }
    }
    found
}

/// SIGKILL and wait until the process is gone (bounded).
pub fn kill_and_wait(pid: u32, timeout: Duration) -> bool {
    // SAFETY: kill(2) with a pid we looked up; no memory is shared.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    let start = Instant::now();
    while start.elapsed() < timeout {
        if !pid_alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    !pid_alive(pid)
}

/// 16 random bytes from the kernel, as hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // getrandom(2) never fails for small requests after boot; fall back to time+pid.
    // SAFETY: buf is valid for buf.len() bytes.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
            ^ u128::from(std::process::id());
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (seed >> ((i % 16) * 8)) as u8;
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A random RFC 4122 version 4 UUID.
pub fn random_uuid() -> String {
    let h = random_hex(16);
    let mut b: Vec<char> = h.chars().collect();
    b[12] = '4';
    b[16] = ['8', '9', 'a', 'b'][(b[16].to_digit(16).unwrap_or(0) & 3) as usize];
    let s: String = b.into_iter().collect();
    format!(
        "{}-{}-{}-{}-{}",
        &s[0..8],
        &s[8..12],
        &s[12..16],
        &s[16..20],
        &s[20..32]
    )
}

pub fn remove_file_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(BackendError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Resolves `p` against `cwd` when it is relative.
pub fn absolute(cwd: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        cwd.join(p)
    }
}

/// Whether `exe` names a QEMU system emulator (`qemu-system-x86_64`...).
/// /proc/PID/exe is the resolved binary, so a `kvm` symlink (Proxmox VE) or
/// wrapper script (Debian) shows up as the qemu-system binary it runs.
pub fn is_qemu_binary(exe: &Path) -> bool {
    let name = exe.file_name().and_then(|n| n.to_str()).unwrap_or("");
    name.strip_prefix("qemu-system-").is_some_and(|arch| {
        !arch.is_empty() && arch.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

/// `qemu-img info --output=json` of `overlay` must show a qcow2 image whose
/// backing file is exactly `base_file`.
pub fn check_backing(overlay: &Path, base_file: &Path) -> Result<()> {
    let mut c = Command::new("qemu-img");
    c.args(["info", "--output=json", "-f", "qcow2"])
        .arg(overlay);
    let out = run_tool(c)?;
    let info: serde_json::Value = serde_json::from_str(&out).map_err(|e| {
        crate::BackendError::Checkpoint(format!(
            "qemu-img info {}: unreadable output: {e}",
            overlay.display()
        ))
    })?;
    let backing = info
        .get("backing-filename")
        .and_then(serde_json::Value::as_str);
    let full = info
        .get("full-backing-filename")
        .and_then(serde_json::Value::as_str);
    let want = base_file.to_string_lossy();
    if backing != Some(want.as_ref()) || full.is_some_and(|f| f != want) {
        return Err(crate::BackendError::Checkpoint(format!(
            "{} is backed by {:?}, not by the journaled image {}; not committing it",
            overlay.display(),
            full.or(backing),
            base_file.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn uuids_look_like_uuids() {
        let u = random_uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(random_uuid(), u);
    }
}
