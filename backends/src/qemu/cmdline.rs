//! The clone's QEMU command line, derived from the original's.
//!
//! The clone must have exactly the original's devices (the memory image
//! carries their state), so the command line is kept as it is except for what
//! must differ: disk files (writable overlays), network backends (taps on the
//! isolated bridge), monitors and sockets (the clone's own), name and UUID.

use crate::{BackendError, Result};
use std::collections::BTreeMap;

/// QEMU options that take no argument (everything else takes exactly one).
const FLAGS: &[&str] = &[
    "S",
    "s",
    "nographic",
    "no-reboot",
    "no-shutdown",
    "daemonize",
    "enable-kvm",
    "snapshot",
    "no-user-config",
    "nodefaults",
    "no-hpet",
    "no-acpi",
    "full-screen",
    "no-fd-bootchk",
    "win2k-hack",
    "usb",
    "only-migratable",
    "preconfig",
    "semihosting",
    "no-quit",
    "no-frame",
    "alt-grab",
    "ctrl-grab",
    "old-param",
    "enable-fips",
    "xen-attach",
    "version",
    "help",
];

/// One option of a QEMU command line: `-name` and its argument, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Opt {
    pub name: String,
    pub arg: Option<String>,
}

/// Splits argv (without the program) into options.
pub fn parse(args: &[String]) -> Result<Vec<Opt>> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let Some(name) = a.strip_prefix("--").or_else(|| a.strip_prefix('-')) else {
            // A bare word is the disk image shorthand (`qemu disk.img`).
            return Err(BackendError::Unsupported(format!(
                "positional argument {a:?} (a disk given without -drive); start the VM with -drive"
            )));
        };
        if FLAGS.contains(&name) {
            out.push(Opt {
                name: name.to_string(),
                arg: None,
            });
        } else {
            let arg = it.next().ok_or_else(|| {
                BackendError::Unsupported(format!("option -{name} has no argument"))
            })?;
            out.push(Opt {
                name: name.to_string(),
                arg: Some(arg.clone()),
            });
        }
    }
    Ok(out)
}

/// A QEMU option argument: `type,key=value,...`, with `,,` as an escaped comma.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyValues {
    /// The leading bare word (`tap` in `tap,id=n0`), if any.
    pub head: Option<String>,
    pub pairs: Vec<(String, String)>,
}

impl KeyValues {
    pub fn parse(s: &str) -> KeyValues {
        let mut parts = Vec::new();
        let mut cur = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                } else {
                    parts.push(std::mem::take(&mut cur));
                }
            } else {
                cur.push(c);
            }
        }
        parts.push(cur);
        let mut head = None;
        let mut pairs = Vec::new();
        for (i, p) in parts.into_iter().enumerate() {
            match p.split_once('=') {
                Some((k, v)) => pairs.push((k.to_string(), v.to_string())),
                None if i == 0 => head = Some(p),
                None => pairs.push((p, String::new())),
            }
        }
        KeyValues { head, pairs }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn set(&mut self, key: &str, value: &str) {
        match self.pairs.iter_mut().find(|(k, _)| k == key) {
            Some(p) => p.1 = value.to_string(),
            None => self.pairs.push((key.to_string(), value.to_string())),
        }
    }

    pub fn remove(&mut self, key: &str) {
        self.pairs.retain(|(k, _)| k != key);
    }

    pub fn render(&self) -> String {
        let esc = |s: &str| s.replace(',', ",,");
        let mut parts: Vec<String> = Vec::new();
        if let Some(h) = &self.head {
            parts.push(esc(h));
        }
        for (k, v) in &self.pairs {
            parts.push(format!("{}={}", esc(k), esc(v)));
        }
        parts.join(",")
    }
}

/// What the clone gets instead of the original's resources.
pub struct CloneSpec<'a> {
    pub name: &'a str,
    pub uuid: &'a str,
    pub qmp_socket: &'a str,
    pub pidfile: &'a str,
    pub console_log: &'a str,
    /// drive id -> clone overlay file (qcow2)
    pub disk_overlays: &'a BTreeMap<String, String>,
    /// tap names for the NICs, in order of appearance
    pub tap_prefix: &'a str,
    /// Wait for a memory image (`-incoming defer`); false for a fresh boot
    /// of the disks (the audit's boot test).
    pub incoming: bool,
}

/// The result of rewriting: argv and the taps it will create.
#[derive(Debug)]
pub struct CloneCommand {
    pub args: Vec<String>,
    pub taps: Vec<String>,
}

fn tap_args(tap: &str) -> Vec<(String, String)> {
    vec![
        ("ifname".into(), tap.into()),
        ("script".into(), "no".into()),
        ("downscript".into(), "no".into()),
    ]
}

/// Rewrites the original's options for the clone. Refuses what it cannot make safe.
pub fn clone_command(original: &[Opt], spec: &CloneSpec) -> Result<CloneCommand> {
    let mut args: Vec<String> = Vec::new();
    let mut taps = Vec::new();
    let mut serial_done = false;
    let mut used_overlays = 0usize;
    let push = |args: &mut Vec<String>, name: &str, arg: Option<String>| {
        args.push(format!("-{name}"));
        if let Some(a) = arg {
            args.push(a);
        }
    };
    let next_tap = |taps: &mut Vec<String>| {
        let t = format!("{}{}", spec.tap_prefix, taps.len());
        taps.push(t.clone());
        t
    };
    for opt in original {
        let arg = opt.arg.clone();
        match opt.name.as_str() {
            // The clone gets its own monitor, console, pidfile, name and UUID.
            "qmp" | "qmp-pretty" | "monitor" | "mon" | "pidfile" | "daemonize" | "incoming"
            | "loadvm" | "vnc" | "spice" | "display" | "nographic" | "S" | "D" | "name"
            | "uuid" | "gdb" | "s" => {}
            "serial" => {
                if arg.as_deref() == Some("none") {
                    push(&mut args, "serial", arg);
                } else if !serial_done {
                    serial_done = true;
                    push(
                        &mut args,
                        "serial",
                        Some(format!("file:{}", spec.console_log)),
                    );
                } else {
                    push(&mut args, "serial", Some("null".into()));
                }
            }
            "parallel" => {
                let a = if arg.as_deref() == Some("none") {
                    arg
                } else {
                    Some("null".into())
                };
                push(&mut args, "parallel", a);
            }
            // Character devices keep their ids (devices refer to them) but
            // lose their sockets, files and terminals.
            "chardev" => {
                let kv = KeyValues::parse(arg.as_deref().unwrap_or(""));
                let id = kv
                    .get("id")
                    .ok_or_else(|| BackendError::Unsupported("a -chardev without id".into()))?;
                push(
                    &mut args,
                    "chardev",
                    Some(format!("null,id={}", id.replace(',', ",,"))),
                );
            }
            "drive" => {
                let mut kv = KeyValues::parse(arg.as_deref().unwrap_or(""));
                let id = kv.get("id").map(str::to_string);
                let has_file = kv.get("file").is_some_and(|f| !f.is_empty());
                let read_only = matches!(kv.get("readonly"), Some("on" | "true" | "yes" | ""))
                    || kv.get("media") == Some("cdrom");
                match id.as_deref().and_then(|i| spec.disk_overlays.get(i)) {
                    Some(overlay) => {
                        kv.set("file", overlay);
                        kv.set("format", "qcow2");
                        kv.remove("snapshot");
                        used_overlays += 1;
                    }
                    None if has_file && !read_only => {
                        return Err(BackendError::Unsupported(format!(
                            "writable -drive {} has no id, or was not found by query-block; give every -drive an id=",
                            arg.as_deref().unwrap_or("")
                        )))
                    }
                    None => {}
                }
                push(&mut args, "drive", Some(kv.render()));
            }
            "hda" | "hdb" | "hdc" | "hdd" | "fda" | "fdb" | "mtdblock" | "sd" | "pflash" => {
                return Err(BackendError::Unsupported(format!(
                    "-{} shorthand disks; start the VM with -drive file=...,id=NAME",
                    opt.name
                )))
            }
            "blockdev" => {
                return Err(BackendError::Unsupported(
                    "-blockdev node graphs are not supported yet; use -drive with id=".into(),
                ))
            }
            "readconfig" | "chroot" => {
                return Err(BackendError::Unsupported(format!(
                    "-{}: the clone's command line cannot be derived from it",
                    opt.name
                )))
            }
            "object" => {
                let kv = KeyValues::parse(arg.as_deref().unwrap_or(""));
                let shared = matches!(kv.get("share"), Some("on" | "true" | "yes"));
                if shared
                    && kv
                        .head
                        .as_deref()
                        .is_some_and(|h| h.starts_with("memory-backend"))
                {
                    return Err(BackendError::Unsupported(
                        "a shared memory backend (share=on): a clone would share the original's RAM".into(),
                    ));
                }
                push(&mut args, "object", arg);
            }
            "netdev" => {
                let kv = KeyValues::parse(arg.as_deref().unwrap_or(""));
                let id = kv
                    .get("id")
                    .ok_or_else(|| BackendError::Unsupported("a -netdev without id".into()))?;
                let mut new = KeyValues {
                    head: Some("tap".into()),
                    pairs: vec![("id".into(), id.to_string())],
                };
                let tap = next_tap(&mut taps);
                new.pairs.extend(tap_args(&tap));
                if let Some(q) = kv.get("queues") {
                    new.set("queues", q);
                }
                push(&mut args, "netdev", Some(new.render()));
            }
            "nic" => {
                let kv = KeyValues::parse(arg.as_deref().unwrap_or(""));
                if kv.head.as_deref() == Some("none") {
                    push(&mut args, "nic", arg);
                    continue;
                }
                let mut new = KeyValues {
                    head: Some("tap".into()),
                    pairs: Vec::new(),
                };
                let tap = next_tap(&mut taps);
                new.pairs.extend(tap_args(&tap));
                for k in ["id", "model", "mac"] {
                    if let Some(v) = kv.get(k) {
                        new.set(k, v);
                    }
                }
                push(&mut args, "nic", Some(new.render()));
            }
            "net" => {
                let kv = KeyValues::parse(arg.as_deref().unwrap_or(""));
                match kv.head.as_deref() {
                    Some("nic") | Some("none") => push(&mut args, "net", arg),
                    _ => {
                        let mut new = KeyValues {
                            head: Some("tap".into()),
                            pairs: Vec::new(),
                        };
                        let tap = next_tap(&mut taps);
                        new.pairs.extend(tap_args(&tap));
                        for k in ["id", "vlan", "name"] {
                            if let Some(v) = kv.get(k) {
                                new.set(k, v);
                            }
                        }
                        push(&mut args, "net", Some(new.render()));
                    }
                }
            }
            _ => push(&mut args, &opt.name, arg),
        }
    }
    if used_overlays != spec.disk_overlays.len() {
        return Err(BackendError::Unsupported(format!(
            "{} of {} snapshotted disks were found as -drive id= on the command line",
            used_overlays,
            spec.disk_overlays.len()
        )));
    }
    if !serial_done {
        args.push("-serial".into());
        args.push(format!("file:{}", spec.console_log));
    }
    // -S: never start by itself. A memory image saved from a running VM
    // (pre-switchover) would otherwise start the clone as soon as it is
    // loaded, before its network is verified.
    args.push("-S".into());
    for (k, v) in [
        ("name", spec.name.to_string()),
        ("uuid", spec.uuid.to_string()),
        (
            "qmp",
            format!("unix:{},server=on,wait=off", spec.qmp_socket),
        ),
        ("pidfile", spec.pidfile.to_string()),
        ("display", "none".to_string()),
        ("monitor", "none".to_string()),
    ] {
        args.push(format!("-{k}"));
        args.push(v);
    }
    if spec.incoming {
        args.push("-incoming".into());
        args.push("defer".into());
    }
    Ok(CloneCommand { args, taps })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn key_values_round_trip_with_escaped_commas() {
        let kv = KeyValues::parse("file=/a,,b.qcow2,if=none,id=d0");
        assert_eq!(kv.get("file"), Some("/a,b.qcow2"));
        assert_eq!(kv.render(), "file=/a,,b.qcow2,if=none,id=d0");
        let kv = KeyValues::parse("user,id=n0,hostfwd=tcp::2222-:22");
        assert_eq!(kv.head.as_deref(), Some("user"));
        assert_eq!(kv.get("id"), Some("n0"));
    }

    #[test]
    fn clone_command_replaces_disks_nics_and_monitors() {
        let orig = parse(&s(&[
            "-accel",
            "tcg",
            "-m",
            "256",
            "-nographic",
            "-drive",
            "file=base.qcow2,if=none,id=d0,format=qcow2",
            "-device",
            "virtio-blk-pci,drive=d0",
            "-netdev",
            "user,id=n0,hostfwd=tcp::2222-:22",
            "-device",
            "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
            "-nic",
            "bridge,br=br0,model=virtio,mac=52:54:00:00:00:02",
            "-qmp",
            "unix:orig.qmp,server=on,wait=off",
            "-name",
            "web1",
        ]))
        .unwrap();
        let mut overlays = BTreeMap::new();
        overlays.insert("d0".to_string(), "/run/c/d0.qcow2".to_string());
        let cmd = clone_command(
            &orig,
            &CloneSpec {
                name: "coldclone-clone-x",
                uuid: "u",
                qmp_socket: "/run/c/qmp",
                pidfile: "/run/c/pid",
                console_log: "/run/c/console",
                disk_overlays: &overlays,
                tap_prefix: "ccx",
                incoming: true,
            },
        )
        .unwrap();
        let a = cmd.args.join(" ");
        assert!(
            a.contains("-drive file=/run/c/d0.qcow2,if=none,id=d0,format=qcow2"),
            "{a}"
        );
        assert!(
            a.contains("-netdev tap,id=n0,ifname=ccx0,script=no,downscript=no"),
            "{a}"
        );
        assert!(
            a.contains(
                "-nic tap,ifname=ccx1,script=no,downscript=no,model=virtio,mac=52:54:00:00:00:02"
            ),
            "{a}"
        );
        assert!(
            !a.contains("orig.qmp")
                && !a.contains("hostfwd")
                && !a.contains("web1")
                && !a.contains("br0"),
            "{a}"
        );
        assert!(
            a.contains("-incoming defer") && a.contains("-qmp unix:/run/c/qmp,server=on,wait=off")
        );
        assert_eq!(cmd.taps, vec!["ccx0", "ccx1"]);
    }

    #[test]
    fn unsafe_command_lines_are_refused() {
        let overlays = BTreeMap::new();
        let spec = CloneSpec {
            name: "n",
            uuid: "u",
            qmp_socket: "q",
            pidfile: "p",
            console_log: "c",
            disk_overlays: &overlays,
            tap_prefix: "t",
            incoming: true,
        };
        for bad in [
            vec!["-drive", "file=x.raw,format=raw"],
            vec!["-hda", "x.img"],
            vec![
                "-object",
                "memory-backend-file,id=m,size=1G,mem-path=/dev/shm/x,share=on",
            ],
            vec!["disk.img"],
        ] {
            let r = parse(&s(&bad)).and_then(|o| clone_command(&o, &spec));
            assert!(r.is_err(), "{bad:?} was accepted");
        }
    }
}
