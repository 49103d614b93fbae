//! The clone's derived command line, started for real (QEMU under TCG): its
//! network is only taps on the verified bridge, in every spelling the
//! original used, and nothing at all for a VM without NICs. A VM that QEMU
//! gave its default user-mode NIC is refused.

use coldclone_backends::qemu::cmdline::{clone_command, parse, CloneSpec};
use coldclone_backends::qemu::qmp::Qmp;
use network_isolation::{self as iso, Namespace};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

struct Lab {
    ns: Namespace,
    name: String,
    dir: PathBuf,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        let name = format!("cc{tag}{}", std::process::id() % 100000);
        let _ = iso::delete_namespace(&name);
        iso::create_namespace(&name).expect("netns");
        // A comma in the folder: the clone's QMP socket, console and pidfile
        // paths must reach QEMU escaped (`,,`), not as new keys.
        let dir = std::env::temp_dir().join(format!("coldclone-{name},state"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Lab {
            ns: Namespace::named(&name),
            name,
            dir,
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("ip netns pids {} | xargs -r kill -9", self.name))
            .status();
        let _ = iso::delete_namespace(&self.name);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Started {
    child: Child,
    qmp: Qmp,
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.qmp.execute("quit", json!({}));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(lab: &Lab, args: &[String], qmp: &Path) -> Started {
    let mut c = lab.ns.command("qemu-system-x86_64");
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(lab.dir.join("qemu.log")).unwrap());
    let mut child = c.spawn().expect("start qemu");
    let q = Qmp::connect_retry(qmp, Duration::from_secs(60), &mut || {
        matches!(child.try_wait(), Ok(None))
    })
    .unwrap_or_else(|e| {
        panic!(
            "QEMU did not come up ({e}): {}",
            std::fs::read_to_string(lab.dir.join("qemu.log")).unwrap_or_default()
        )
    });
    Started { child, qmp: q }
}

/// `info network` as (type, ifname) per backend and NIC.
fn network(q: &mut Qmp) -> Vec<(String, Option<String>)> {
    let out = q
        .execute(
            "human-monitor-command",
            json!({"command-line": "info network"}),
        )
        .expect("info network");
    let text = out.as_str().unwrap_or_default().to_string();
    text.lines()
        .filter_map(|l| {
            let kv = l.split(": ").last()?;
            let get = |k: &str| {
                kv.split(',')
                    .find_map(|p| p.strip_prefix(&format!("{k}=")).map(str::to_string))
            };
            Some((get("type")?, get("ifname")))
        })
        .collect()
}

fn derive(
    lab: &Lab,
    argv: &[String],
) -> coldclone_backends::Result<(Vec<String>, Vec<String>, PathBuf)> {
    let qmp = lab.dir.join("clone.qmp");
    let overlays = BTreeMap::new();
    let cmd = clone_command(
        &parse(argv)?,
        &CloneSpec {
            name: "coldclone-clone-net",
            uuid: "5c4f3ad2-0000-4000-8000-000000000002",
            qmp_socket: &qmp.display().to_string(),
            pidfile: &lab.dir.join("clone.pid").display().to_string(),
            console_log: &lab.dir.join("console.log").display().to_string(),
            disk_overlays: &overlays,
            tap_prefix: "ccnt",
            incoming: false,
            agent_socket: None,
        },
    )?;
    Ok((cmd.args, cmd.taps, qmp))
}

fn rig() -> bool {
    coldclone_testkit::require_root_and_tools(
        "network namespaces, bridges, taps",
        &["qemu-system-x86_64", "ip"],
    )
}

#[test]
fn needs_root_qemu_clone_argv_has_only_taps_on_the_verified_bridge() {
    if !rig() {
        return;
    }
    let lab = Lab::new("na");
    iso::create_bridge(&lab.ns, "ccntbr").unwrap();
    // Every way of giving a VM a NIC that coldclone takes, each with host
    // resources of the original's (scripts, bridges, helpers, fds).
    let argv = s(&[
        "-machine",
        "pc",
        "-accel",
        "tcg",
        "-m",
        "64",
        "-nodefaults",
        "-netdev",
        "tap,id=n0,ifname=vnet0,script=/etc/qemu-ifup,downscript=/etc/qemu-ifdown",
        "-device",
        "virtio-net-pci,netdev=n0,mac=52:54:00:77:01:01",
        "-netdev",
        r#"{"type":"tap","id":"n1","fd":"40","vhost":false}"#,
        "-device",
        r#"{"driver":"e1000","netdev":"n1","mac":"52:54:00:77:01:02"}"#,
        "-netdev",
        "type=bridge,id=n2,br=virbr0,helper=/usr/lib/qemu/qemu-bridge-helper",
        "-device",
        "rtl8139,netdev=n2,mac=52:54:00:77:01:03",
        "-nic",
        "bridge,br=br0,model=virtio-net-pci,mac=52:54:00:77:01:04",
        "-net",
        "nic,model=e1000,macaddr=52:54:00:77:01:05",
        "-net",
        "tap,ifname=vnet9,script=no",
    ]);
    let (args, taps, qmp) = derive(&lab, &argv).expect("derived");
    assert_eq!(taps.len(), 5, "{args:?}");
    let mut vm = start(&lab, &args, &qmp);
    for t in &taps {
        iso::attach_port(&lab.ns, "ccntbr", t).unwrap();
    }
    let verified = iso::verify(&lab.ns, "ccntbr", &taps).expect("the bridge verifies");
    assert_eq!(verified.ports.len(), 5);
    let net = network(&mut vm.qmp);
    let backends: Vec<_> = net.iter().filter(|(t, _)| t != "nic").collect();
    assert_eq!(backends.len(), 5, "{net:?}");
    for (ty, ifname) in &backends {
        assert_eq!(ty, "tap", "{net:?}");
        assert!(ifname.as_ref().is_some_and(|i| taps.contains(i)), "{net:?}");
    }
    // query-netdev, where this QEMU has it (7.2 does not).
    match vm.qmp.execute("query-netdev", json!({})) {
        Ok(Value::Array(list)) => {
            for n in list {
                assert_eq!(n.get("type").and_then(Value::as_str), Some("tap"), "{n}");
            }
        }
        Ok(other) => panic!("query-netdev: {other}"),
        Err(e) => assert!(
            e.to_string().contains("CommandNotFound") || e.to_string().contains("not been found"),
            "{e}"
        ),
    }
}

#[test]
fn needs_root_qemu_a_vm_without_nics_gets_no_network_at_all() {
    if !rig() {
        return;
    }
    let lab = Lab::new("nb");
    let (args, taps, qmp) = derive(
        &lab,
        &s(&["-machine", "pc", "-accel", "tcg", "-m", "64", "-nodefaults"]),
    )
    .unwrap();
    assert!(taps.is_empty());
    assert!(args.windows(2).any(|w| w == ["-nic", "none"]), "{args:?}");
    let mut vm = start(&lab, &args, &qmp);
    let net = network(&mut vm.qmp);
    assert!(net.is_empty(), "{net:?}");
}

#[test]
fn needs_root_qemu_a_vm_on_the_default_user_mode_nic_is_refused() {
    if !rig() {
        return;
    }
    let lab = Lab::new("nc");
    let qmp = lab.dir.join("orig.qmp");
    // What QEMU really does with such a command line: a NIC on SLIRP.
    let mut orig = s(&[
        "-machine", "pc", "-accel", "tcg", "-m", "64", "-S", "-display", "none",
    ]);
    orig.extend(s(&[
        "-qmp",
        &format!(
            "unix:{},server=on,wait=off",
            qmp.display().to_string().replace(',', ",,")
        ),
    ]));
    let mut vm = start(&lab, &orig, &qmp);
    let net = network(&mut vm.qmp);
    assert!(net.iter().any(|(t, _)| t == "user"), "{net:?}");
    let e = derive(&lab, &orig).unwrap_err();
    assert!(e.to_string().contains("user-mode networking"), "{e}");
}
