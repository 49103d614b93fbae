//! The clone's command line against what real managers generate (fixtures
//! written after Proxmox VE's qemu-server, libvirt and virt-install), and a
//! property test over generated command lines: whatever the original's
//! spelling, the derived clone never holds a non-tap network backend, a
//! shared memory backend, a host share, or a path of the original's.

use coldclone_backends::qemu::cmdline::{self, clone_command, parse, CloneSpec, Props};
use proptest::prelude::*;
use std::collections::BTreeMap;

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn derive(argv: &[String], drives: &[&str]) -> coldclone_backends::Result<cmdline::CloneCommand> {
    let overlays: BTreeMap<String, String> = drives
        .iter()
        .map(|d| {
            (
                d.to_string(),
                format!("/var/lib/coldclone/runs/r1/clone-{d}.qcow2"),
            )
        })
        .collect();
    let opts = parse(argv)?;
    clone_command(
        &opts,
        &CloneSpec {
            name: "coldclone-clone-r1",
            uuid: "5c4f3ad2-0000-4000-8000-000000000001",
            qmp_socket: "/var/lib/coldclone/runs/r1/clone.qmp",
            pidfile: "/var/lib/coldclone/runs/r1/clone.pid",
            console_log: "/var/lib/coldclone/runs/r1/clone-console.log",
            disk_overlays: &overlays,
            tap_prefix: "ccr1t",
            incoming: true,
            agent_socket: Some("/var/lib/coldclone/runs/r1/clone-agent.sock"),
        },
    )
}

/// What every accepted clone must satisfy; `forbidden` are substrings (the
/// original's host paths) that must not survive.
fn assert_safe(args: &[String], forbidden: &[&str]) -> std::result::Result<(), String> {
    let opts = parse(args).map_err(|e| format!("the derived argv does not parse again: {e}"))?;
    let mut net = false;
    for o in &opts {
        let a = o.arg.as_deref().unwrap_or("");
        match o.name.as_str() {
            "virtfs" | "fsdev" | "snapshot" | "add-fd" | "plugin" | "daemonize" | "no-shutdown"
            | "trace" | "set" | "mem-path" | "readconfig" => {
                return Err(format!("-{} survived", o.name))
            }
            // A -blockdev is the clone's overlay, or a read-only medium's node kept
            // verbatim (the original's writable images are in `forbidden`).
            "blockdev" => {
                let ours = a.contains("file.filename=/var/lib/coldclone/runs/r1/clone-")
                    && a.starts_with("driver=qcow2,");
                if !ours && !a.starts_with('{') {
                    return Err(format!("-blockdev {a}"));
                }
            }
            "netdev" | "nic" | "net" => {
                net = true;
                let p = Props::parse(&o.name, a, Some("type"), true).map_err(|e| e.to_string())?;
                let ok = match (o.name.as_str(), p.get("type")) {
                    (_, Some("tap")) => {
                        p.get("script") == Some("no")
                            && p.get("downscript") == Some("no")
                            && p.get("fd").is_none()
                            && p.get("ifname").is_some_and(|i| i.starts_with("ccr1t"))
                    }
                    ("nic", Some("none")) | ("net", Some("none" | "nic")) => true,
                    _ => false,
                };
                if !ok {
                    return Err(format!("network option -{} {a}", o.name));
                }
            }
            "object" => {
                let p =
                    Props::parse("object", a, Some("qom-type"), true).map_err(|e| e.to_string())?;
                let ty = p.get("qom-type").unwrap_or("");
                if ty == "memory-backend-file"
                    || (ty.starts_with("memory-backend")
                        && p.bool("share", ty == "memory-backend-memfd") != Ok(false))
                    || ty.starts_with("filter-")
                    || ty == "input-barrier"
                {
                    return Err(format!("-object {a}"));
                }
            }
            // Character devices: null, or the run's own console file / QMP socket.
            "chardev" => {
                let p = Props::parse("chardev", a, Some("backend"), false)
                    .map_err(|e| e.to_string())?;
                let ours = |k: &str| {
                    p.get(k)
                        .is_some_and(|v| v.starts_with("/var/lib/coldclone/runs/r1/"))
                };
                let ok = match p.get("backend") {
                    Some("null") => p.pairs.len() == 2,
                    Some("file") => ours("path"),
                    // The QMP socket, or the clone's own guest agent socket.
                    Some("socket") => {
                        ours("path")
                            && (p.get("id") == Some("coldclone-qmp")
                                || p.get("path")
                                    == Some("/var/lib/coldclone/runs/r1/clone-agent.sock"))
                    }
                    _ => false,
                };
                if !ok {
                    return Err(format!("-chardev {a}"));
                }
            }
            "serial" | "parallel" | "debugcon"
                if !(matches!(a, "none" | "null") || a.starts_with("chardev:")) =>
            {
                return Err(format!("-{} {a}", o.name));
            }
            "audiodev" if !a.starts_with("none,") => return Err(format!("-audiodev {a}")),
            "device"
                if ["9p", "vhost-user", "vfio", "ivshmem", "vsock"]
                    .iter()
                    .any(|d| a.contains(d)) =>
            {
                return Err(format!("-device {a}"));
            }
            _ => {}
        }
    }
    if !net && !args.windows(2).any(|w| w[0] == "-nic" && w[1] == "none") {
        return Err("no network option and no -nic none".into());
    }
    for f in forbidden {
        if let Some(a) = args.iter().find(|a| a.contains(f)) {
            return Err(format!("{f} survived in {a}"));
        }
    }
    Ok(())
}

// ---- Proxmox VE ---------------------------------------------------------

/// Written after qemu-server's pve-q35-4.0.cfg (same sections and keys,
/// abbreviated): USB controllers, audio, PCIe root ports, the DMI-PCI
/// bridge and PCI bridges of a q35 VM.
const PVE_Q35_CFG: &str = r#"[device "ehci"]
  driver = "ich9-usb-ehci1"
  multifunction = "on"
  bus = "pcie.0"
  addr = "1d.7"

[device "uhci-1"]
  driver = "ich9-usb-uhci1"
  multifunction = "on"
  bus = "pcie.0"
  addr = "1d.0"
  masterbus = "ehci.0"
  firstport = "0"

[device "audio0"]
  driver = "ich9-intel-hda"
  bus = "pcie.0"
  addr = "1b.0"

[device "ich9-pcie-port-1"]
  driver = "pcie-root-port"
  x-speed = "16"
  x-width = "32"
  multifunction = "on"
  bus = "pcie.0"
  addr = "1c.0"
  port = "1"
  chassis = "1"

##
# a comment, as in the original file
[device "pcidmi"]
  driver = "i82801b11-bridge"
  bus = "pcie.0"
  addr = "1e.0"

[device "pci.0"]
  driver = "pci-bridge"
  bus = "pcidmi"
  addr = "1.0"
  chassis_nr = "1"
"#;

/// A q35 VM as qemu-server starts it (`qm showcmd`), LVM-thin disk, tap
/// with the pve-bridge script, guest agent, VNC, -daemonize, -no-shutdown.
fn proxmox_argv(cfg: &str) -> Vec<String> {
    s(&[
        "-id", "100", "-name", "web1,debug-threads=on", "-no-shutdown",
        "-chardev", "socket,id=qmp,path=/var/run/qemu-server/100.qmp,server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", "socket,id=qmp-event,path=/var/run/qmeventd.sock,reconnect=5",
        "-mon", "chardev=qmp-event,mode=control",
        "-pidfile", "/var/run/qemu-server/100.pid", "-daemonize",
        "-smbios", "type=1,uuid=0b6b7c3e-1111-4222-8333-444455556666",
        "-smp", "2,sockets=1,cores=2,maxcpus=2", "-nodefaults",
        "-boot", "menu=on,strict=on,reboot-timeout=1000,splash=/usr/share/qemu-server/bootsplash.jpg",
        "-vnc", "unix:/var/run/qemu-server/100.vnc,password=on",
        "-cpu", "qemu64,+aes,enforce,+kvm_pv_eoi,+kvm_pv_unhalt,+pni,+popcnt,+sse4.1,+sse4.2,+ssse3",
        "-m", "2048",
        "-object", "iothread,id=iothread-virtioscsi0",
        "-readconfig", cfg,
        "-device", "vmgenid,guid=6f1b1c2d-aaaa-4bbb-8ccc-ddddeeeeffff",
        "-device", "usb-tablet,id=tablet,bus=ehci.0,port=1",
        "-device", "VGA,id=vga,bus=pcie.0,addr=0x1",
        "-chardev", "socket,path=/var/run/qemu-server/100.qga,server=on,wait=off,id=qga0",
        "-device", "virtio-serial,id=qga0,bus=pci.0,addr=0x8",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-device", "virtio-balloon-pci,id=balloon0,bus=pci.0,addr=0x3,free-page-reporting=on",
        "-iscsi", "initiator-name=iqn.1993-08.org.debian:01:0123456789ab",
        "-drive", "if=none,id=drive-ide2,media=cdrom,aio=io_uring",
        "-device", "ide-cd,bus=ide.1,unit=0,drive=drive-ide2,id=ide2,bootindex=101",
        "-device", "virtio-scsi-pci,id=virtioscsi0,bus=pci.3,addr=0x1,iothread=iothread-virtioscsi0",
        "-drive", "file=/dev/pve/vm-100-disk-0,if=none,id=drive-scsi0,format=raw,cache=none,aio=io_uring,detect-zeroes=on",
        "-device", "scsi-hd,bus=virtioscsi0.0,channel=0,scsi-id=0,lun=0,drive=drive-scsi0,id=scsi0,bootindex=100",
        "-netdev", "type=tap,id=net0,ifname=tap100i0,script=/var/lib/qemu-server/pve-bridge,downscript=/var/lib/qemu-server/pve-bridgedown,vhost=on",
        "-device", "virtio-net-pci,mac=BC:24:11:00:00:01,netdev=net0,bus=pci.0,addr=0x12,id=net0,rx_queue_size=1024,tx_queue_size=256",
        "-machine", "type=pc-q35-7.2+pve0",
    ])
}

const PVE_PATHS: &[&str] = &[
    "/var/run/qemu-server",
    "qmeventd",
    "/dev/pve",
    "pve-bridge",
    "tap100i0",
    "pve-q35",
];

#[test]
fn needs_root_proxmox_command_line_is_taken_with_its_readconfig_inlined() {
    if !coldclone_testkit::require(
        coldclone_testkit::is_root(),
        "root (a root-owned -readconfig file)",
    ) {
        return;
    }
    let dir = tempdir("pve");
    let cfg = dir.join("pve-q35-4.0.cfg");
    std::fs::write(&cfg, PVE_Q35_CFG).unwrap();
    let argv = proxmox_argv(&cfg.display().to_string());
    let cmd = derive(&argv, &["drive-scsi0"]).expect("a Proxmox VE command line is taken");
    assert_safe(&cmd.args, PVE_PATHS).unwrap();
    let a = cmd.args.join(" ");
    // The file's sections are on the clone's command line, checked.
    assert!(
        a.contains("-device id=pci.0,driver=pci-bridge,bus=pcidmi,addr=1.0,chassis_nr=1"),
        "{a}"
    );
    assert!(
        a.contains("-netdev tap,id=net0,vhost=on,ifname=ccr1t0,script=no,downscript=no"),
        "{a}"
    );
    assert!(
        a.contains("file=/var/lib/coldclone/runs/r1/clone-drive-scsi0.qcow2"),
        "{a}"
    );
    assert_eq!(cmd.taps, vec!["ccr1t0"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_readconfig_anyone_could_change_or_with_unknown_sections_is_refused() {
    let dir = tempdir("cfg");
    let cfg = dir.join("vm.cfg");
    std::fs::write(&cfg, PVE_Q35_CFG).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o664)).unwrap();
    let e = derive(&proxmox_argv(&cfg.display().to_string()), &["drive-scsi0"]).unwrap_err();
    assert!(
        e.to_string().contains("not group- or world-writable"),
        "{e}"
    );
    let e = cmdline::parse_config("[fsdev \"share\"]\n  fsdriver = \"local\"\n  path = \"/srv\"\n")
        .unwrap_err();
    assert!(e.contains("[fsdev]"), "{e}");
    let e = cmdline::parse_config("[device \"x\"]\n  driver = \"vfio-pci\"\n")
        .map(|o| clone_command(&o, &dummy_spec()).map(|_| ()));
    assert!(matches!(e, Ok(Err(_))), "{e:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn dummy_spec() -> CloneSpec<'static> {
    static NONE: std::sync::OnceLock<BTreeMap<String, String>> = std::sync::OnceLock::new();
    CloneSpec {
        name: "n",
        uuid: "u",
        qmp_socket: "/q",
        pidfile: "/p",
        console_log: "/c",
        disk_overlays: NONE.get_or_init(BTreeMap::new),
        tap_prefix: "ccr1t",
        incoming: true,
        agent_socket: None,
    }
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("coldclone-cmdline-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

// ---- libvirt and virt-install ----------------------------------------------

/// A q35 domain as libvirt 9 starts it, with the disk in the `-drive` form
/// (libvirt's own `-blockdev` form: see below).
fn libvirt_argv(disk: &[&str], netdev: &str) -> Vec<String> {
    let mut v = s(&[
        "-name",
        "guest=vm1,debug-threads=on",
        "-S",
        "-object",
        r#"{"qom-type":"secret","id":"masterKey0","format":"raw","file":"/var/lib/libvirt/qemu/domain-1-vm1/master-key.aes"}"#,
        "-machine",
        "pc-q35-7.2,usb=off,vmport=off,dump-guest-core=off,memory-backend=pc.ram,hpet=off,acpi=on",
        "-accel",
        "kvm",
        "-cpu",
        "host,migratable=on",
        "-m",
        "size=2097152k",
        "-object",
        r#"{"qom-type":"memory-backend-ram","id":"pc.ram","size":2147483648}"#,
        "-overcommit",
        "mem-lock=off",
        "-smp",
        "2,sockets=2,cores=1,threads=1",
        "-uuid",
        "8a2b5bd2-7c3e-4a47-9a9d-0123456789ab",
        "-no-user-config",
        "-nodefaults",
        "-chardev",
        "socket,id=charmonitor,fd=30,server=on,wait=off",
        "-mon",
        "chardev=charmonitor,id=monitor,mode=control",
        "-rtc",
        "base=utc,driftfix=slew",
        "-global",
        "kvm-pit.lost_tick_policy=delay",
        "-no-shutdown",
        "-global",
        "ICH9-LPC.disable_s3=1",
        "-global",
        "ICH9-LPC.disable_s4=1",
        "-boot",
        "strict=on",
        "-device",
        r#"{"driver":"pcie-root-port","port":16,"chassis":1,"id":"pci.1","bus":"pcie.0","multifunction":true,"addr":"0x2"}"#,
        "-device",
        r#"{"driver":"pcie-root-port","port":17,"chassis":2,"id":"pci.2","bus":"pcie.0","addr":"0x2.0x1"}"#,
        "-device",
        r#"{"driver":"qemu-xhci","p2":15,"p3":15,"id":"usb","bus":"pci.2","addr":"0x0"}"#,
        "-device",
        r#"{"driver":"virtio-serial-pci","id":"virtio-serial0","bus":"pci.2","addr":"0x0"}"#,
    ]);
    v.extend(s(disk));
    v.extend(s(&[
        "-netdev", netdev,
        "-device", r#"{"driver":"virtio-net-pci","netdev":"hostnet0","id":"net0","mac":"52:54:00:aa:bb:cc","bus":"pci.1","addr":"0x0"}"#,
        "-chardev", "pty,id=charserial0",
        "-device", r#"{"driver":"isa-serial","chardev":"charserial0","id":"serial0","index":0}"#,
        "-chardev", "socket,id=charchannel0,fd=28,server=on,wait=off",
        "-device", r#"{"driver":"virtserialport","bus":"virtio-serial0.0","nr":1,"chardev":"charchannel0","id":"channel0","name":"org.qemu.guest_agent.0"}"#,
        "-audiodev", r#"{"id":"audio1","driver":"spice"}"#,
        "-spice", "port=5900,addr=127.0.0.1,disable-ticketing=on,seamless-migration=on",
        "-device", r#"{"driver":"virtio-vga","id":"video0","max_outputs":1,"bus":"pcie.0","addr":"0x1"}"#,
        "-device", r#"{"driver":"ich9-intel-hda","id":"sound0","bus":"pcie.0","addr":"0x1b"}"#,
        "-device", r#"{"driver":"hda-duplex","id":"sound0-codec0","bus":"sound0.0","cad":0,"audiodev":"audio1"}"#,
        "-device", r#"{"driver":"virtio-balloon-pci","id":"balloon0","bus":"pci.2","addr":"0x0"}"#,
        "-object", r#"{"qom-type":"rng-random","id":"objrng0","filename":"/dev/urandom"}"#,
        "-device", r#"{"driver":"virtio-rng-pci","rng":"objrng0","id":"rng0","bus":"pci.2","addr":"0x0"}"#,
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-msg", "timestamp=on",
    ]));
    v
}

const LIBVIRT_DRIVE: &[&str] = &[
    "-drive",
    "file=/var/lib/libvirt/images/vm1.qcow2,format=qcow2,if=none,id=drive-virtio-disk0",
    "-device",
    r#"{"driver":"virtio-blk-pci","bus":"pci.2","addr":"0x0","drive":"drive-virtio-disk0","id":"virtio-disk0","bootindex":1}"#,
];
const LIBVIRT_TAP: &str = r#"{"type":"tap","fd":"32","vhost":true,"vhostfd":"34","id":"hostnet0"}"#;
const LIBVIRT_PATHS: &[&str] = &[
    "fd=30",
    "fd=28",
    "\"fd\"",
    "vhostfd",
    "/var/lib/libvirt/images",
    "spice",
];

#[test]
fn libvirt_command_line_is_taken() {
    let cmd = derive(
        &libvirt_argv(LIBVIRT_DRIVE, LIBVIRT_TAP),
        &["drive-virtio-disk0"],
    )
    .expect("a libvirt command line is taken");
    assert_safe(&cmd.args, LIBVIRT_PATHS).unwrap();
    let a = cmd.args.join(" ");
    assert!(
        a.contains("-netdev tap,vhost=on,id=hostnet0,ifname=ccr1t0,script=no,downscript=no"),
        "{a}"
    );
    // The guest's serial line (a pty in the original) is the clone's console file.
    assert!(
        a.contains(
            "-chardev file,id=charserial0,path=/var/lib/coldclone/runs/r1/clone-console.log"
        ),
        "{a}"
    );
    assert!(a.contains("-chardev null,id=charmonitor"), "{a}");
    // The guest agent's channel: the clone's own socket in its run folder.
    assert!(
        a.contains("-chardev socket,id=charchannel0,path=/var/lib/coldclone/runs/r1/clone-agent.sock,server=on,wait=off"),
        "{a}"
    );
    assert!(
        a.contains("-audiodev none,id=audio1")
            && a.contains("-msg timestamp=on")
            && a.contains("-sandbox on"),
        "{a}"
    );
    // -nodefaults and a serial device already there: no extra serial line.
    assert!(!cmd.args.iter().any(|x| x == "-serial"), "{a}");
}

/// The disk as libvirt 9 really gives it: a file node under a qcow2 node,
/// and a read-only CD-ROM the same way.
const LIBVIRT_BLOCKDEV: &[&str] = &[
    "-blockdev",
    r#"{"driver":"file","filename":"/var/lib/libvirt/images/vm1.qcow2","node-name":"libvirt-2-storage","auto-read-only":true,"discard":"unmap"}"#,
    "-blockdev",
    r#"{"node-name":"libvirt-2-format","read-only":false,"discard":"unmap","driver":"qcow2","file":"libvirt-2-storage","backing":null}"#,
    "-device",
    r#"{"driver":"virtio-blk-pci","bus":"pci.2","addr":"0x0","drive":"libvirt-2-format","id":"virtio-disk0","bootindex":1}"#,
    "-blockdev",
    r#"{"driver":"file","filename":"/iso/debian-12.iso","node-name":"libvirt-1-storage","auto-read-only":true,"discard":"unmap"}"#,
    "-blockdev",
    r#"{"node-name":"libvirt-1-format","read-only":true,"driver":"raw","file":"libvirt-1-storage"}"#,
    "-device",
    r#"{"driver":"ide-cd","bus":"ide.0","drive":"libvirt-1-format","id":"sata0-0-0"}"#,
];

#[test]
fn libvirt_blockdev_disks_are_taken_and_other_graphs_refused_naming_the_node() {
    let cmd = derive(
        &libvirt_argv(LIBVIRT_BLOCKDEV, LIBVIRT_TAP),
        &["libvirt-2-format"],
    )
    .expect("libvirt's -blockdev graph is taken");
    assert_safe(&cmd.args, LIBVIRT_PATHS).unwrap();
    let a = cmd.args.join(" ");
    // The format node keeps its name (the device names it), now over the overlay.
    assert!(
        a.contains(
            "-blockdev driver=qcow2,node-name=libvirt-2-format,file.driver=file,file.filename=/var/lib/coldclone/runs/r1/clone-libvirt-2-format.qcow2,file.node-name=libvirt-2-storage,file.discard=unmap,discard=unmap"
        ),
        "{a}"
    );
    assert!(
        !a.contains("libvirt-2-storage\",") && !a.contains("backing"),
        "{a}"
    );
    // The install medium stays, read-only.
    assert!(a.contains("/iso/debian-12.iso"), "{a}");
    // A writable node with no overlay: refused, named.
    let e = derive(&libvirt_argv(LIBVIRT_BLOCKDEV, LIBVIRT_TAP), &[]).unwrap_err();
    assert!(e.to_string().contains("libvirt-2-format"), "{e}");
    // Keyval spelling with an inline file node, over a host block device (Proxmox-like).
    let kv = [
        "-blockdev",
        "driver=raw,node-name=drive-scsi0,file.driver=host_device,file.filename=/dev/pve/vm-100-disk-0,cache.direct=on,file.aio=native,file.cache.direct=on",
        "-device",
        "scsi-hd,drive=drive-scsi0,id=scsi0",
    ];
    let cmd = derive(&libvirt_argv(&kv, LIBVIRT_TAP), &["drive-scsi0"]).expect("keyval graph");
    assert_safe(&cmd.args, &["/dev/pve"]).unwrap();
    // Shapes coldclone does not understand: the node is named.
    let refused: &[(&[&str], &str)] = &[
        (
            &[
                "-blockdev",
                r#"{"driver":"nbd","node-name":"remote0","server":{"type":"inet","host":"10.0.0.5","port":"10809"}}"#,
            ],
            "remote0",
        ),
        (
            &[
                "-blockdev",
                r#"{"driver":"file","filename":"/vm/a.qcow2","node-name":"f0"}"#,
                "-blockdev",
                r#"{"driver":"qcow2","node-name":"q0","file":"f0"}"#,
                "-blockdev",
                r#"{"driver":"throttle","node-name":"drive-scsi0","throttle-group":"tg0","file":"q0"}"#,
            ],
            "drive-scsi0",
        ),
        (
            &[
                "-blockdev",
                r#"{"driver":"rbd","node-name":"ceph0","pool":"rbd","image":"vm-1"}"#,
            ],
            "ceph0",
        ),
        (
            &[
                "-blockdev",
                r#"{"driver":"file","filename":"/vm/a.qcow2","node-name":"f0","locking":"off"}"#,
                "-blockdev",
                r#"{"driver":"qcow2","node-name":"q0","file":"f0"}"#,
            ],
            "f0",
        ),
    ];
    for (disk, node) in refused {
        let e = derive(&libvirt_argv(disk, LIBVIRT_TAP), &[node]).unwrap_err();
        assert!(e.to_string().contains(node), "{disk:?}: {e}");
    }
}

/// `virt-install --name web --memory 1024 --disk size=10 --cdrom debian.iso
/// --os-variant debian12`: on qemu:///system a tap on the "default" network
/// (virbr0) is taken; on qemu:///session its user-mode NIC is refused.
#[test]
fn virt_install_guests_system_taken_session_refused() {
    let mut disk = LIBVIRT_DRIVE.to_vec();
    disk.extend([
        "-drive", "file=/var/lib/libvirt/boot/debian.iso,format=raw,if=none,id=drive-sata0-0-0,media=cdrom,readonly=on",
        "-device", r#"{"driver":"ide-cd","bus":"ide.0","drive":"drive-sata0-0-0","id":"sata0-0-0","bootindex":2}"#,
    ]);
    let cmd = derive(&libvirt_argv(&disk, LIBVIRT_TAP), &["drive-virtio-disk0"]).unwrap();
    assert_safe(&cmd.args, LIBVIRT_PATHS).unwrap();
    let e = derive(
        &libvirt_argv(&disk, r#"{"type":"user","id":"hostnet0"}"#),
        &["drive-virtio-disk0"],
    )
    .unwrap_err();
    assert!(e.to_string().contains("user"), "{e}");
    let e = derive(&libvirt_argv(&disk, r#"{"type":"stream","id":"hostnet0","addr":{"type":"unix","path":"/run/user/1000/libvirt/qemu/run/passt/1-web-net0.socket"}}"#), &["drive-virtio-disk0"]).unwrap_err();
    assert!(e.to_string().contains("-netdev"), "{e}");
}

// ---- generated command lines ---------------------------------------------

fn benign() -> impl Strategy<Value = Vec<String>> {
    let v = |x: &[&str]| s(x);
    prop_oneof![
        // benign, as managers write them
        Just(v(&["-m", "256"])),
        Just(v(&["-nodefaults"])),
        Just(v(&["-mem-prealloc"])),
        Just(v(&["--enable-kvm"])),
        Just(v(&["-kernel", "/ro/vmlinuz"])),
        Just(v(&["-netdev", "tap,id=n0,fd=3,script=/orig/ifup"])),
        Just(v(&[
            "-netdev",
            r#"{"type":"tap","id":"n1","fd":"40","vhostfd":"41","vhost":true}"#
        ])),
        Just(v(&[
            "-netdev",
            "type=bridge,id=n2,br=br0,helper=/orig/helper"
        ])),
        Just(v(&["-device", "virtio-net-pci,netdev=n0"])),
        Just(v(&[
            "-chardev",
            "socket,id=c0,path=/orig/c0.sock,server=on,wait=off"
        ])),
        Just(v(&["-serial", "unix:/orig/serial.sock,server=on"])),
        Just(v(&["-serial", "file:/orig/console.log"])),
        Just(v(&[
            "-drive",
            "file=/orig/vm.qcow2,if=none,id=d0,format=qcow2"
        ])),
        Just(v(&["-drive", "file=/ro/cd.iso,media=cdrom,if=none,id=cd0"])),
        Just(v(&["-monitor", "unix:/orig/mon,server,nowait"])),
        Just(v(&["--qmp", "unix:/orig/qmp.sock,server=on"])),
        Just(v(&["-pidfile", "/orig/pid"])),
        Just(v(&["-D", "/orig/qemu.log"])),
        Just(v(&["-debugcon", "file:/orig/debug"])),
        Just(v(&["-audiodev", "wav,id=a0,path=/orig/a.wav"])),
        Just(v(&[
            "-audiodev",
            r#"{"driver":"wav","id":"a1","path":"/orig/b.wav"}"#
        ])),
        Just(v(&["-parallel", "file:/orig/lp"])),
        Just(v(&["-nic", "none"])),
        Just(v(&["-nic", "tap,model=e1000,script=/orig/ifup"])),
        Just(v(&["-net", "nic,model=rtl8139"])),
        Just(v(&["-net", "bridge,br=br0,helper=/orig/helper"])),
        Just(v(&["-object", "memory-backend-ram,id=r0,size=64M"])),
        Just(v(&[
            "-object",
            "memory-backend-memfd,id=r1,size=64M,share=off"
        ])),
        Just(v(&[
            "-object",
            "memory-backend-memfd,id=r2,size=64M,noshare"
        ])),
        Just(v(&["-daemonize"])),
        Just(v(&["--no-shutdown"])),
        Just(v(&["-trace", "enable=virtio*"])),
        Just(v(&["-vnc", "unix:/orig/vnc"])),
    ]
}

fn dangerous() -> impl Strategy<Value = Vec<String>> {
    let share = prop_oneof![
        Just("share=on"),
        Just("share=true"),
        Just("share=yes"),
        Just("share"),
        Just("share=y")
    ];
    let backend = prop_oneof![Just("memory-backend-ram"), Just("memory-backend-memfd")];
    let netty = prop_oneof![
        Just("user"),
        Just("socket"),
        Just("vde"),
        Just("stream"),
        Just("dgram"),
        Just("l2tpv3"),
        Just("vhost-user"),
        Just("hubport"),
        Just("vhost-vdpa")
    ];
    let v = |x: &[&str]| s(x);
    prop_oneof![
        // in every spelling
        (backend.clone(), share)
            .prop_map(|(b, sh)| vec!["-object".into(), format!("{b},id=s0,size=64M,{sh}")]),
        backend.clone().prop_map(|b| vec![
            "-object".into(),
            format!("qom-type={b},id=s1,size=64M,share=on")
        ]),
        backend.prop_map(|b| vec![
            "-object".into(),
            format!(r#"{{"qom-type":"{b}","id":"s2","size":67108864,"share":true}}"#)
        ]),
        Just(v(&["-object", "memory-backend-memfd,id=s3,size=64M"])),
        Just(v(&[
            "-object",
            "memory-backend-ram,id=s4,size=64M,share=off,share=on"
        ])),
        Just(v(&[
            "-object",
            "memory-backend-file,id=s5,size=64M,mem-path=/orig/mem,share=off"
        ])),
        Just(v(&[
            "-object",
            r#"{"qom-type":"memory-backend-file","id":"s6","size":1,"mem-path":"/orig/mem"}"#
        ])),
        Just(v(&[
            "-virtfs",
            "local,path=/orig/share,mount_tag=t,security_model=none"
        ])),
        Just(v(&[
            "--fsdev",
            "local,id=f0,path=/orig/share,security_model=none"
        ])),
        Just(v(&["-device", "virtio-9p-pci,fsdev=f0,mount_tag=t"])),
        Just(v(&[
            "-device",
            r#"{"driver":"vhost-user-fs-pci","chardev":"c0","tag":"t"}"#
        ])),
        Just(v(&["-device", "ivshmem-plain,memdev=r0"])),
        Just(v(&["-snapshot"])),
        Just(v(&["-trace", "enable=*,file=/orig/trace"])),
        Just(v(&["-trace", "file=/orig/trace"])),
        Just(v(&[
            "-object",
            "filter-dump,id=fd0,netdev=n0,file=/orig/dump"
        ])),
        Just(v(&[
            "-object",
            r#"{"qom-type":"filter-dump","id":"fd1","netdev":"n0","file":"/orig/dump"}"#
        ])),
        Just(v(&["-object", "input-barrier,id=b0,name=x"])),
        Just(v(&["-add-fd", "fd=3,set=1"])),
        Just(v(&["-plugin", "/orig/p.so"])),
        Just(v(&["-set", "netdev.n0.type=user"])),
        Just(v(&["-global", "memory-backend-ram.share=on"])),
        Just(v(&["-mem-path", "/orig/hugepages"])),
        Just(v(&[
            "-drive",
            "file=nbd:10.0.0.1:10809,if=none,id=r9,readonly=on"
        ])),
        Just(v(&["-drive", "file=/orig/data.raw,if=none,id=d9"])),
        Just(v(&["/orig/disk.img"])),
        Just(v(&["-frobnicate"])),
        Just(v(&["-frobnicate", "-daemonize"])),
        Just(v(&["-nic", "user,model=virtio,hostfwd=tcp::22-:22"])),
        Just(v(&["-nic", "model=virtio"])),
        Just(v(&["-net", "user"])),
        netty
            .clone()
            .prop_map(|t| vec!["-netdev".into(), format!("{t},id=u0")]),
        netty
            .clone()
            .prop_map(|t| vec!["-netdev".into(), format!("type={t},id=u1")]),
        netty
            .clone()
            .prop_map(|t| vec!["-netdev".into(), format!(r#"{{"type":"{t}","id":"u2"}}"#)]),
        netty.prop_map(|t| vec!["-nic".into(), format!("{t},model=e1000")]),
    ]
}

/// Mostly what managers write, with a dangerous option now and then, so
/// that many derived command lines are accepted and checked.
fn token() -> impl Strategy<Value = Vec<String>> {
    prop_oneof![9 => benign(), 1 => dangerous()]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
    #[test]
    fn derived_clone_never_holds_an_uplink_shared_memory_a_host_share_or_the_originals_paths(
        tokens in proptest::collection::vec(token(), 0..12)
    ) {
        let argv: Vec<String> = tokens.concat();
        let drives: Vec<&str> = if argv.iter().any(|a| a.contains("id=d0")) { vec!["d0"] } else { vec![] };
        if let Ok(cmd) = derive(&argv, &drives) {
            prop_assert!(assert_safe(&cmd.args, &["/orig/"]).is_ok(),
                "{:?}\n -> {:?}\n: {:?}", argv, cmd.args, assert_safe(&cmd.args, &["/orig/"]));
        }
    }
}
