//! `-blockdev` node graphs, as libvirt (since 5.x with QEMU 4.2), Proxmox VE
//! and modern hand-written command lines give disks: a format node (qcow2 or
//! raw) over a protocol node (a file or a host block device), the guest's
//! device naming the format node (`-device virtio-blk-pci,drive=NODE`).
//!
//! The same allow-list as the rest of the command line: a graph of exactly
//! that shape is understood; any other node (a filter such as throttle or
//! copy-on-read, a network protocol, a backing chain given as nodes, a key
//! coldclone does not know) refuses the VM, naming the node.
//!
//! For the clone, a writable disk's two nodes become one: the format node,
//! under its own name (the device still finds it), now qcow2 over the
//! clone's overlay file, whose header names the frozen image as its backing.
//! Read-only nodes (install media) are kept as they are.

use super::cmdline::{esc, id_ok, keyval_pairs, Opt};
use crate::{BackendError, Result};
use std::collections::BTreeMap;

fn unsupported(msg: impl Into<String>) -> BackendError {
    BackendError::Unsupported(msg.into())
}

/// Protocol drivers understood: the image is a plain local file or device.
const PROTOCOLS: &[&str] = &["file", "host_device"];
/// Format drivers understood.
const FORMATS: &[&str] = &["qcow2", "raw"];

/// Keys of a protocol node. Anything else (`locking`, `x-check-cache-dropped`,
/// `pr-manager`, `offset`...) is refused.
const PROTOCOL_KEYS: &[&str] = &[
    "driver",
    "node-name",
    "filename",
    "read-only",
    "auto-read-only",
    "discard",
    "detect-zeroes",
    "aio",
    "cache.direct",
    "cache.no-flush",
];
/// Keys of a format node (qcow2's cache tuning is guest-invisible; raw's
/// `offset`/`size` would make the image a window into a file: refused).
const FORMAT_KEYS: &[&str] = &[
    "driver",
    "node-name",
    "file",
    "backing",
    "read-only",
    "auto-read-only",
    "discard",
    "detect-zeroes",
    "cache.direct",
    "cache.no-flush",
    "lazy-refcounts",
    "cache-size",
    "l2-cache-size",
    "l2-cache-entry-size",
    "refcount-cache-size",
    "cache-clean-interval",
];
/// What the clone's overlay node keeps of the original's format and protocol nodes.
const CLONE_FORMAT_KEYS: &[&str] = &["discard", "detect-zeroes", "cache.direct", "cache.no-flush"];
const CLONE_PROTOCOL_KEYS: &[&str] = &["discard", "aio", "cache.direct", "cache.no-flush"];

/// One `-blockdev`, its keys flattened (`file.filename`, `cache.direct`).
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub name: String,
    pub driver: String,
    pub pairs: Vec<(String, String)>,
    /// Index of the `-blockdev` option it came from.
    pub option: usize,
}

impl Node {
    fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn read_only(&self) -> Result<bool> {
        match self.get("read-only") {
            None | Some("off" | "false") => Ok(false),
            Some("on" | "true") => Ok(true),
            Some(v) => Err(unsupported(format!(
                "-blockdev node {}: read-only={v} is not a boolean",
                self.name
            ))),
        }
    }
}

/// A disk in the graph: its format node over its protocol node.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphDisk {
    /// The format node (what the guest's device names).
    pub node: String,
    pub format: String,
    /// The protocol node's name (given, or QEMU's for an inline one: none).
    pub protocol_node: Option<String>,
    /// Where its protocol node is an inline `file.*` of the format node.
    pub inline: bool,
    pub filename: String,
    pub read_only: bool,
    /// Keys of the protocol node, without the `file.` prefix.
    pub protocol_pairs: Vec<(String, String)>,
}

/// Flattens a JSON value into dotted keys as QEMU's keyval does
/// (`{"cache":{"direct":true}}` → `cache.direct=on`); `null` is the empty
/// string (QEMU takes `backing: null` and `backing=""` alike, block.c
/// `bdrv_open_inherit`).
fn flatten(
    prefix: &str,
    v: &serde_json::Value,
    out: &mut Vec<(String, String)>,
) -> std::result::Result<(), String> {
    use serde_json::Value;
    let s = match v {
        Value::Object(m) => {
            for (k, v) in m {
                flatten(&format!("{prefix}.{k}"), v, out)?;
            }
            return Ok(());
        }
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "on" } else { "off" }.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Null => String::new(),
        Value::Array(_) => {
            return Err(format!(
                "member {prefix:?} is a list, which coldclone does not read"
            ))
        }
    };
    out.push((prefix.to_string(), s));
    Ok(())
}

/// Reads one `-blockdev` argument (JSON or keyval, implied key `driver`).
pub fn parse_node(arg: &str, option: usize) -> Result<Node> {
    let bad = |why: String| unsupported(format!("-blockdev {arg}: {why}"));
    let pairs = if arg.trim_start().starts_with('{') {
        let mut out = Vec::new();
        for (k, v) in super::cmdline::json_members(arg).map_err(bad)? {
            flatten(&k, &v, &mut out).map_err(bad)?;
        }
        out
    } else {
        keyval_pairs(arg, Some("driver"))
    };
    let mut seen = std::collections::BTreeSet::new();
    for (k, _) in &pairs {
        if !seen.insert(k.as_str()) {
            return Err(bad(format!("key {k:?} is given more than once")));
        }
    }
    let get = |k: &str| pairs.iter().find(|(x, _)| x == k).map(|(_, v)| v.clone());
    let name = get("node-name").ok_or_else(|| {
        bad("no node-name (QEMU would name it itself, and no device could name it)".into())
    })?;
    if !id_ok(&name) {
        return Err(bad(format!("node-name {name:?} is not a QEMU id")));
    }
    let driver = get("driver").ok_or_else(|| bad("no driver".into()))?;
    Ok(Node {
        name,
        driver,
        pairs,
        option,
    })
}

/// Every `-blockdev` of `options`, judged as a graph; its disks.
pub fn judge(options: &[Opt]) -> Result<Vec<GraphDisk>> {
    let mut nodes: Vec<Node> = Vec::new();
    for (i, o) in options.iter().enumerate() {
        if o.name == "blockdev" {
            nodes.push(parse_node(o.arg.as_deref().unwrap_or(""), i)?);
        }
    }
    let mut by_name: BTreeMap<&str, &Node> = BTreeMap::new();
    for n in &nodes {
        if by_name.insert(n.name.as_str(), n).is_some() {
            return Err(unsupported(format!(
                "-blockdev node {} is defined twice",
                n.name
            )));
        }
    }
    let mut used: BTreeMap<&str, &str> = BTreeMap::new();
    let mut disks = Vec::new();
    for n in &nodes {
        let refuse = |why: String| unsupported(format!("-blockdev node {}: {why}", n.name));
        if PROTOCOLS.contains(&n.driver.as_str()) {
            check_protocol(&n.name, &n.pairs)?;
            continue;
        }
        if !FORMATS.contains(&n.driver.as_str()) {
            return Err(refuse(format!(
                "driver {} is not one coldclone understands (a qcow2 or raw format node over a \
                 file or host_device node); the VM is refused",
                n.driver
            )));
        }
        let (outer, inner): (Vec<_>, Vec<_>) = n
            .pairs
            .iter()
            .cloned()
            .partition(|(k, _)| !k.starts_with("file."));
        for (k, _) in &outer {
            if !FORMAT_KEYS.contains(&k.as_str()) {
                return Err(refuse(format!("key {k} is not one coldclone understands")));
            }
        }
        if n.get("backing").is_some_and(|b| !b.is_empty()) {
            return Err(refuse(
                "a backing chain given as nodes (backing=NODE) is not supported; only backing \
                 null or the image's own header"
                    .into(),
            ));
        }
        let read_only = n.read_only()?;
        let disk = if inner.is_empty() {
            let pname = n
                .get("file")
                .filter(|f| !f.is_empty())
                .ok_or_else(|| refuse("no file node".into()))?;
            let p = by_name.get(pname).ok_or_else(|| {
                refuse(format!(
                    "its file node {pname} is not a -blockdev of the VM"
                ))
            })?;
            if !PROTOCOLS.contains(&p.driver.as_str()) {
                return Err(refuse(format!(
                    "its file node {pname} is a {} node, not a file or host_device",
                    p.driver
                )));
            }
            if let Some(other) = used.insert(pname, n.name.as_str()) {
                return Err(refuse(format!(
                    "its file node {pname} is under {other} too"
                )));
            }
            GraphDisk {
                node: n.name.clone(),
                format: n.driver.clone(),
                protocol_node: Some(pname.to_string()),
                inline: false,
                filename: p.get("filename").unwrap_or("").to_string(),
                read_only: read_only || p.read_only()?,
                protocol_pairs: p.pairs.clone(),
            }
        } else {
            if n.get("file").is_some() {
                return Err(refuse("file is given both as a node and inline".into()));
            }
            let pairs: Vec<(String, String)> = inner
                .iter()
                .map(|(k, v)| (k["file.".len()..].to_string(), v.clone()))
                .collect();
            let pname = format!("{}.file", n.name);
            check_protocol(&pname, &pairs)?;
            let p = pairs
                .iter()
                .find(|(k, _)| k == "node-name")
                .map(|(_, v)| v.clone());
            GraphDisk {
                node: n.name.clone(),
                format: n.driver.clone(),
                protocol_node: p,
                inline: true,
                filename: pairs
                    .iter()
                    .find(|(k, _)| k == "filename")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default(),
                read_only,
                protocol_pairs: pairs,
            }
        };
        disks.push(disk);
    }
    for n in &nodes {
        if PROTOCOLS.contains(&n.driver.as_str()) && !used.contains_key(n.name.as_str()) {
            return Err(unsupported(format!(
                "-blockdev node {} is a {} node under no format node; coldclone needs a qcow2 \
                 or raw node over it",
                n.name, n.driver
            )));
        }
    }
    Ok(disks)
}

fn check_protocol(name: &str, pairs: &[(String, String)]) -> Result<()> {
    let refuse = |why: String| unsupported(format!("-blockdev node {name}: {why}"));
    let get = |k: &str| pairs.iter().find(|(x, _)| x == k).map(|(_, v)| v.as_str());
    let driver = get("driver").unwrap_or("");
    if !PROTOCOLS.contains(&driver) {
        return Err(refuse(format!(
            "protocol driver {driver:?} is not one coldclone understands (file or host_device); \
             the clone could reach the image over it"
        )));
    }
    for (k, _) in pairs {
        if !PROTOCOL_KEYS.contains(&k.as_str()) {
            return Err(refuse(format!("key {k} is not one coldclone understands")));
        }
    }
    let f = get("filename").unwrap_or("");
    if f.is_empty() {
        return Err(refuse("no filename".into()));
    }
    Ok(())
}

/// The clone's `-blockdev` for a writable disk: its format node's name over
/// the clone's overlay (qcow2; the frozen image is the overlay's backing, from
/// its header).
pub fn clone_node(disk: &GraphDisk, original: &Node, overlay: &str) -> String {
    let mut pairs: Vec<(String, String)> = vec![
        ("driver".into(), "qcow2".into()),
        ("node-name".into(), disk.node.clone()),
        ("file.driver".into(), "file".into()),
        ("file.filename".into(), overlay.to_string()),
    ];
    if let Some(p) = &disk.protocol_node {
        pairs.push(("file.node-name".into(), p.clone()));
    }
    for (k, v) in &disk.protocol_pairs {
        if CLONE_PROTOCOL_KEYS.contains(&k.as_str()) {
            pairs.push((format!("file.{k}"), v.clone()));
        }
    }
    for (k, v) in &original.pairs {
        if CLONE_FORMAT_KEYS.contains(&k.as_str()) {
            pairs.push((k.clone(), v.clone()));
        }
    }
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", esc(k), esc(v)))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: &[&str]) -> Vec<Opt> {
        v.iter()
            .map(|a| Opt {
                name: "blockdev".into(),
                arg: Some(a.to_string()),
            })
            .collect()
    }

    #[test]
    fn libvirt_and_keyval_shapes_are_read() {
        let d = judge(&opts(&[
            r#"{"driver":"file","filename":"/vm/a.qcow2","node-name":"libvirt-1-storage","auto-read-only":true,"discard":"unmap"}"#,
            r#"{"node-name":"libvirt-1-format","read-only":false,"driver":"qcow2","file":"libvirt-1-storage","backing":null}"#,
            "driver=raw,node-name=d1,file.driver=host_device,file.filename=/dev/vg/lv,cache.direct=on",
            r#"{"driver":"file","filename":"/iso/x.iso","node-name":"cd-storage","read-only":true}"#,
            r#"{"driver":"raw","node-name":"cd-format","file":"cd-storage","read-only":true}"#,
        ]))
        .unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d[0].node, "libvirt-1-format");
        assert_eq!(d[0].filename, "/vm/a.qcow2");
        assert!(!d[0].read_only);
        assert_eq!(d[1].format, "raw");
        assert!(d[1].inline);
        assert_eq!(d[1].filename, "/dev/vg/lv");
        assert!(d[2].read_only);
    }

    #[test]
    fn other_graphs_are_refused_naming_the_node() {
        let cases: &[(&[&str], &str)] = &[
            (
                &[r#"{"driver":"nbd","node-name":"n1","server":{"type":"unix","path":"/x"}}"#],
                "n1",
            ),
            (
                &[
                    r#"{"driver":"file","filename":"/a","node-name":"p1"}"#,
                    r#"{"driver":"throttle","node-name":"t1","file":"p1","throttle-group":"g"}"#,
                ],
                "t1",
            ),
            (
                &[r#"{"driver":"file","filename":"/a","node-name":"p1"}"#],
                "p1",
            ),
            (
                &[
                    r#"{"driver":"file","filename":"/a","node-name":"p1","locking":"off"}"#,
                    r#"{"driver":"qcow2","node-name":"f1","file":"p1"}"#,
                ],
                "locking",
            ),
            (
                &[
                    r#"{"driver":"file","filename":"/a","node-name":"p1"}"#,
                    r#"{"driver":"qcow2","node-name":"b1","file":"p1"}"#,
                    r#"{"driver":"file","filename":"/b","node-name":"p2"}"#,
                    r#"{"driver":"qcow2","node-name":"f2","file":"p2","backing":"b1"}"#,
                ],
                "f2",
            ),
            (
                &[
                    r#"{"driver":"file","filename":"/a","node-name":"p1"}"#,
                    r#"{"driver":"raw","node-name":"f1","file":"p1","offset":512}"#,
                ],
                "offset",
            ),
            (
                &["driver=qcow2,node-name=f1,file.driver=iscsi,file.portal=h"],
                "f1.file",
            ),
            (
                &[
                    r#"{"driver":"file","filename":"/a","node-name":"p1"}"#,
                    r#"{"driver":"qcow2","node-name":"f1","file":"p1"}"#,
                    r#"{"driver":"qcow2","node-name":"f2","file":"p1"}"#,
                ],
                "f2",
            ),
            (&[r#"{"driver":"file","filename":"/a"}"#], "node-name"),
        ];
        for (args, want) in cases {
            let e = judge(&opts(args)).unwrap_err().to_string();
            assert!(e.contains(want), "{args:?}: {e}");
        }
    }
}
