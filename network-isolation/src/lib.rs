//! Networks with no uplink for coldclone's clones.
//!
//! A clone is a copy of a running VM: same MACs, same IP addresses, same
//! services. If it ever reached the original's network it would answer for the
//! original. So every clone NIC goes on a Linux bridge that has no physical
//! port, no IP address and no forwarding, and the clone is only resumed after
//! [`verify`] has looked at the bridge as it really is in the kernel.
//!
//! The crate drives iproute2 (`ip -json`) rather than netlink directly: it is
//! on every host that runs a hypervisor, it makes and inspects bridges in any
//! network namespace, and its JSON output is stable.

use serde::{Deserialize, Serialize};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    #[error("could not run `{command}`: {source} (is iproute2 installed?)")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("could not parse the output of `{command}`: {source}")]
    Parse {
        command: String,
        source: serde_json::Error,
    },
    #[error("interface name {name:?} is invalid: {why}")]
    BadName { name: String, why: &'static str },
    #[error("network namespace {0:?} does not exist (create it with `ip netns add {0}`, or let coldclone create one by naming a new one)")]
    NoSuchNamespace(String),
    #[error("isolated bridge {bridge} failed verification: {problems:?}; the clone stays paused and is destroyed")]
    NotIsolated {
        bridge: String,
        problems: Vec<String>,
    },
}

pub type Result<T> = std::result::Result<T, IsolationError>;

/// Where a bridge lives: the caller's network namespace or a named one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Namespace(pub Option<String>);

impl Namespace {
    pub fn current() -> Self {
        Namespace(None)
    }
    pub fn named(name: impl Into<String>) -> Self {
        Namespace(Some(name.into()))
    }
    /// `ip` with `-n NS` when the namespace is named.
    fn ip(&self) -> Command {
        let mut c = Command::new("ip");
        if let Some(ns) = &self.0 {
            c.arg("-n").arg(ns);
        }
        c
    }
    /// Wraps a program so that it runs inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        match &self.0 {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }
    pub fn describe(&self) -> String {
        match &self.0 {
            Some(ns) => format!("network namespace {ns}"),
            None => "the current network namespace".to_string(),
        }
    }
}

/// A tool that could not be started, or that exited with an error.
#[derive(Debug)]
pub enum ToolFailure {
    Spawn {
        command: String,
        source: std::io::Error,
    },
    Failed {
        command: String,
        stderr: String,
    },
}

/// Runs a tool, returns its stdout; the one place coldclone runs a tool and
/// reads its exit (the backends map [`ToolFailure`] into their own errors).
pub fn run_tool(mut cmd: Command) -> std::result::Result<String, ToolFailure> {
    let command = format!("{cmd:?}").replace('"', "");
    match cmd.output() {
        Ok(out) => tool_output(command, out),
        Err(source) => Err(ToolFailure::Spawn { command, source }),
    }
}

/// A finished tool's stdout, or [`ToolFailure::Failed`] with its stderr.
pub fn tool_output(
    command: String,
    out: std::process::Output,
) -> std::result::Result<String, ToolFailure> {
    if !out.status.success() {
        return Err(ToolFailure::Failed {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl From<ToolFailure> for IsolationError {
    fn from(f: ToolFailure) -> Self {
        match f {
            ToolFailure::Spawn { command, source } => IsolationError::Spawn { command, source },
            ToolFailure::Failed { command, stderr } => IsolationError::Command { command, stderr },
        }
    }
}

fn run(cmd: Command) -> Result<String> {
    run_tool(cmd).map_err(Into::into)
}

fn run_json<T: for<'de> Deserialize<'de>>(cmd: Command) -> Result<T> {
    let command = format!("{cmd:?}").replace('"', "");
    let text = run(cmd)?;
    if text.trim().is_empty() {
        return serde_json::from_str("[]")
            .map_err(|source| IsolationError::Parse { command, source });
    }
    serde_json::from_str(&text).map_err(|source| IsolationError::Parse { command, source })
}

/// Linux interface names: 1..=15 bytes, no '/', no whitespace, not "." or "..".
pub fn check_ifname(name: &str) -> Result<()> {
    let bad = |why| {
        Err(IsolationError::BadName {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() || name.len() > 15 {
        return bad("must be 1 to 15 characters");
    }
    if name == "." || name == ".." {
        return bad("reserved name");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return bad("only letters, digits, '-', '_' and '.' are allowed");
    }
    Ok(())
}

pub fn namespace_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

/// Creates a named network namespace. Returns false if it already existed.
pub fn create_namespace(name: &str) -> Result<bool> {
    if namespace_exists(name) {
        return Ok(false);
    }
    let mut c = Command::new("ip");
    c.args(["netns", "add", name]);
    run(c)?;
    Ok(true)
}

pub fn delete_namespace(name: &str) -> Result<()> {
    if !namespace_exists(name) {
        return Ok(());
    }
    let mut c = Command::new("ip");
    c.args(["netns", "del", name]);
    run(c).map(|_| ())
}

#[derive(Debug, Deserialize)]
struct Link {
    ifname: String,
    #[serde(default)]
    master: Option<String>,
    #[serde(default)]
    link: Option<String>,
    #[serde(default)]
    linkinfo: Option<LinkInfo>,
}

#[derive(Debug, Deserialize)]
struct LinkInfo {
    #[serde(default)]
    info_kind: Option<String>,
}

#[derive(Debug, Deserialize)]
struct AddrLink {
    #[serde(default)]
    addr_info: Vec<serde_json::Value>,
}

fn links(ns: &Namespace) -> Result<Vec<Link>> {
    let mut c = ns.ip();
    c.args(["-j", "-d", "link", "show"]);
    run_json(c)
}

/// Each link of `ns` with its kind as `ip -d` reports it (`bridge`, `tun`, `veth`, ...;
/// `None` for a plain one). A namespace that does not exist has none.
pub fn link_kinds(ns: &Namespace) -> Result<Vec<(String, Option<String>)>> {
    if let Some(n) = &ns.0 {
        if !namespace_exists(n) {
            return Ok(Vec::new());
        }
    }
    Ok(links(ns)?
        .into_iter()
        .map(|l| (l.ifname, l.linkinfo.and_then(|i| i.info_kind)))
        .collect())
}

pub fn link_exists(ns: &Namespace, name: &str) -> Result<bool> {
    if let Some(n) = &ns.0 {
        if !namespace_exists(n) {
            return Ok(false);
        }
    }
    Ok(links(ns)?.iter().any(|l| l.ifname == name))
}

/// Creates a bridge with no uplink: no address (IPv6 address generation off,
/// IPv6 disabled), IPv4 forwarding off, link up.
pub fn create_bridge(ns: &Namespace, name: &str) -> Result<()> {
    check_ifname(name)?;
    if let Some(n) = &ns.0 {
        if !namespace_exists(n) {
            return Err(IsolationError::NoSuchNamespace(n.clone()));
        }
    }
    let mut c = ns.ip();
    c.args(["link", "add", name, "type", "bridge"]);
    run(c)?;
    let mut c = ns.ip();
    c.args(["link", "set", "dev", name, "addrgenmode", "none"]);
    run(c)?;
    write_sysctl(ns, &format!("net/ipv4/conf/{name}/forwarding"), "0")?;
    // A host without IPv6 has no such file: nothing to disable then.
    let _ = write_sysctl(ns, &format!("net/ipv6/conf/{name}/disable_ipv6"), "1");
    let mut c = ns.ip();
    c.args(["link", "set", "dev", name, "up"]);
    run(c).map(|_| ())
}

fn sysctl_path(key: &str) -> String {
    format!("/proc/sys/{key}")
}

fn write_sysctl(ns: &Namespace, key: &str, value: &str) -> Result<()> {
    let mut c = ns.command("sh");
    c.arg("-c")
        .arg(format!("echo {value} > {}", sysctl_path(key)));
    run(c).map(|_| ())
}

fn read_sysctl(ns: &Namespace, key: &str) -> Result<Option<String>> {
    let mut c = ns.command("sh");
    c.arg("-c").arg(format!(
        "[ -e {p} ] && cat {p} || true",
        p = sysctl_path(key)
    ));
    let out = run(c)?;
    let v = out.trim();
    Ok(if v.is_empty() {
        None
    } else {
        Some(v.to_string())
    })
}

/// Deletes an interface (bridge or tap) if it exists.
pub fn delete_link(ns: &Namespace, name: &str) -> Result<()> {
    if !link_exists(ns, name)? {
        return Ok(());
    }
    let mut c = ns.ip();
    c.args(["link", "del", "dev", name]);
    match run(c) {
        // Gone between the look and the delete (a tap vanishes when its QEMU
        // exits): what was asked for is true.
        Err(IsolationError::Command { stderr, .. }) if stderr.contains("Cannot find device") => {
            Ok(())
        }
        other => other.map(|_| ()),
    }
}

/// Puts a port (the clone's tap) on the bridge and brings it up.
pub fn attach_port(ns: &Namespace, bridge: &str, port: &str) -> Result<()> {
    let mut c = ns.ip();
    c.args(["link", "set", "dev", port, "master", bridge, "up"]);
    run(c).map(|_| ())
}

/// A Xen netback vif (a guest's NIC in dom0): like a tap, it leads only to its guest.
fn is_xen_vif(ns: &Namespace, ifname: &str) -> bool {
    ns.0.is_none()
        && std::fs::read_link(format!("/sys/class/net/{ifname}/device/driver"))
            .is_ok_and(|p| p.file_name().is_some_and(|n| n == "vif"))
}

/// What [`verify`] saw.
#[derive(Debug, Clone, Serialize)]
pub struct Verified {
    pub bridge: String,
    pub namespace: Option<String>,
    pub ports: Vec<String>,
}

/// Checks, from the kernel's current state, that `bridge` can reach nothing:
/// it is a bridge; its only ports are `allowed_ports`, each a tap; no other
/// device is stacked on it (VLAN, macvlan); it has no IP address; IPv4
/// forwarding on it is off. Any problem fails the check.
pub fn verify(ns: &Namespace, bridge: &str, allowed_ports: &[String]) -> Result<Verified> {
    let mut problems = Vec::new();
    if let Some(n) = &ns.0 {
        if !namespace_exists(n) {
            return Err(IsolationError::NoSuchNamespace(n.clone()));
        }
    }
    let all = links(ns)?;
    match all.iter().find(|l| l.ifname == bridge) {
        None => problems.push(format!("bridge {bridge} does not exist")),
        Some(l) => {
            let kind = l.linkinfo.as_ref().and_then(|i| i.info_kind.as_deref());
            if kind != Some("bridge") {
                problems.push(format!("{bridge} is not a bridge (kind {kind:?})"));
            }
            if let Some(m) = &l.master {
                problems.push(format!("{bridge} is itself enslaved to {m}"));
            }
        }
    }
    let mut ports = Vec::new();
    for l in &all {
        if l.master.as_deref() == Some(bridge) {
            ports.push(l.ifname.clone());
            if !allowed_ports.contains(&l.ifname) {
                problems.push(format!("unexpected port {} on {bridge}", l.ifname));
            } else {
                let kind = l.linkinfo.as_ref().and_then(|i| i.info_kind.as_deref());
                if kind != Some("tun") && !is_xen_vif(ns, &l.ifname) {
                    problems.push(format!("port {} is not a tap (kind {kind:?})", l.ifname));
                }
            }
        }
        if l.link.as_deref() == Some(bridge) && l.ifname != bridge {
            problems.push(format!("device {} is stacked on {bridge}", l.ifname));
        }
    }
    if all.iter().any(|l| l.ifname == bridge) {
        let mut c = ns.ip();
        c.args(["-j", "addr", "show", "dev", bridge]);
        let addrs: Vec<AddrLink> = run_json(c)?;
        let n: usize = addrs.iter().map(|a| a.addr_info.len()).sum();
        if n > 0 {
            problems.push(format!("{bridge} has {n} IP address(es)"));
        }
        match read_sysctl(ns, &format!("net/ipv4/conf/{bridge}/forwarding"))? {
            Some(v) if v != "0" => problems.push(format!("IPv4 forwarding is on for {bridge}")),
            _ => {}
        }
    }
    if problems.is_empty() {
        Ok(Verified {
            bridge: bridge.to_string(),
            namespace: ns.0.clone(),
            ports,
        })
    } else {
        Err(IsolationError::NotIsolated {
            bridge: bridge.to_string(),
            problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        assert!(check_ifname("ccbr0").is_ok());
        assert!(check_ifname("").is_err());
        assert!(check_ifname("a-name-that-is-too-long").is_err());
        assert!(check_ifname("bad/name").is_err());
        assert!(check_ifname("..").is_err());
    }
}
