//! The clone's QEMU command line, derived from the original's.
//!
//! The clone must have exactly the original's devices (the memory image
//! carries their state), so the command line is kept except for what must
//! differ: disk files (writable overlays), network backends (taps on the
//! isolated bridge), monitors and character devices (null, or files in the
//! run's own folder), name and UUID.
//!
//! It is an allow-list, not a deny-list: every option must be in [`OPTIONS`]
//! (which also gives its arity, so that nothing unknown can shift the
//! parser), and every `-object`, `-device` and `-netdev` type must be one
//! coldclone understands. Anything else refuses the VM, naming the option,
//! before anything is created or paused.
//!
//! Option arguments are read the way QEMU reads them (util/qemu-option.c,
//! `get_opt_name_value`): `,,` is an escaped comma; a first word without `=`
//! is the option's implied key (`tap` in `-netdev tap,id=n0`); any other
//! word without `=` is a boolean, `foo` meaning `foo=on` and `nofoo`
//! meaning `foo=off`. QEMU keeps the last of a repeated key
//! (`qemu_opt_find` walks the list backwards); coldclone refuses repeated
//! keys instead, so that no reading of them can differ from QEMU's. `-object`,
//! `-device`, `-netdev`, `-audiodev` and `-blockdev` also take a JSON object
//! (`-object '{"qom-type":...}'`), read here with the same rules.

use crate::{BackendError, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How many arguments an option takes (qemu-options.hx: `DEF(name, HAS_ARG|0, ...)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arity {
    Flag,
    Arg,
}

/// What the clone does with an option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// Same on the clone: guest-visible configuration with no host resource.
    Keep,
    /// Left out: the clone gets its own (monitor, name, pidfile, display).
    Drop,
    /// Looked at by `clone_command`, rewritten or refused there.
    Judge,
    /// Refuses the VM, with the reason.
    Refuse(&'static str),
}

use Arity::{Arg, Flag};
use Rule::{Drop, Judge, Keep, Refuse};

const SHARE: &str =
    "a host folder shared with the guest: the clone would write into the original's files";
const SHORTHAND: &str =
    "a shorthand disk; start the VM with -drive file=...,id=NAME so that coldclone can give the clone an overlay";

/// Every option coldclone understands, with its arity as in QEMU 7.2's
/// qemu-options.hx (checked against `qemu-system-x86_64`: an option with an
/// argument fails with "requires an argument" when it has none).
const OPTIONS: &[(&str, Arity, Rule)] = &[
    // Machine, CPU, memory, firmware: the guest's hardware, kept.
    ("machine", Arg, Judge),
    ("M", Arg, Judge),
    ("accel", Arg, Keep),
    ("cpu", Arg, Keep),
    ("smp", Arg, Keep),
    ("m", Arg, Keep),
    ("numa", Arg, Keep),
    ("boot", Arg, Keep),
    ("rtc", Arg, Keep),
    ("k", Arg, Keep),
    ("vga", Arg, Keep),
    ("kernel", Arg, Keep),
    ("initrd", Arg, Keep),
    ("append", Arg, Keep),
    ("dtb", Arg, Keep),
    ("bios", Arg, Keep),
    ("L", Arg, Keep),
    ("option-rom", Arg, Keep),
    ("fw_cfg", Arg, Keep),
    ("acpitable", Arg, Keep),
    ("smbios", Arg, Keep),
    ("sandbox", Arg, Keep),
    ("msg", Arg, Keep),
    ("overcommit", Arg, Keep),
    ("compat", Arg, Keep),
    ("seed", Arg, Keep),
    ("echr", Arg, Keep),
    ("watchdog-action", Arg, Keep),
    ("rotate", Arg, Keep),
    ("runas", Arg, Keep),
    ("iscsi", Arg, Keep),
    ("enable-kvm", Flag, Keep),
    ("no-user-config", Flag, Keep),
    ("nodefaults", Flag, Keep),
    ("no-hpet", Flag, Keep),
    ("no-acpi", Flag, Keep),
    ("no-reboot", Flag, Keep),
    ("no-fd-bootchk", Flag, Keep),
    ("win2k-hack", Flag, Keep),
    ("usb", Flag, Keep),
    ("only-migratable", Flag, Keep),
    ("mem-prealloc", Flag, Keep),
    ("async-teardown", Flag, Keep),
    ("enable-sync-profile", Flag, Keep),
    ("portrait", Flag, Keep),
    ("singlestep", Flag, Keep),
    // The clone gets its own of these.
    // `-id N`: Proxmox VE's QEMU (its pve-qemu patches) names the VM by number.
    ("id", Arg, Drop),
    ("name", Arg, Drop),
    ("uuid", Arg, Drop),
    ("pidfile", Arg, Drop),
    ("incoming", Arg, Drop),
    ("loadvm", Arg, Drop),
    ("vnc", Arg, Drop),
    ("spice", Arg, Drop),
    ("display", Arg, Drop),
    ("gdb", Arg, Drop),
    ("D", Arg, Drop),
    ("d", Arg, Drop),
    ("dfilter", Arg, Drop),
    ("qmp", Arg, Drop),
    ("qmp-pretty", Arg, Drop),
    ("monitor", Arg, Drop),
    ("mon", Arg, Drop),
    ("S", Flag, Drop),
    ("s", Flag, Drop),
    ("nographic", Flag, Drop),
    ("full-screen", Flag, Drop),
    // The clone's stop must be seen as a clean exit: a QEMU that stays
    // after the guest's power-off, or one that forks away, would not be.
    ("no-shutdown", Flag, Drop),
    ("daemonize", Flag, Drop),
    // Looked at one by one.
    ("device", Arg, Judge),
    ("object", Arg, Judge),
    ("netdev", Arg, Judge),
    ("nic", Arg, Judge),
    ("net", Arg, Judge),
    ("chardev", Arg, Judge),
    ("serial", Arg, Judge),
    ("parallel", Arg, Judge),
    ("debugcon", Arg, Judge),
    ("audiodev", Arg, Judge),
    ("audio", Arg, Judge),
    ("drive", Arg, Judge),
    ("blockdev", Arg, Judge),
    ("cdrom", Arg, Judge),
    ("trace", Arg, Judge),
    ("icount", Arg, Judge),
    ("global", Arg, Judge),
    ("action", Arg, Judge),
    ("usbdevice", Arg, Judge),
    ("readconfig", Arg, Judge),
    // Refused.
    ("snapshot", Flag, Refuse("-snapshot: the original's writes go to a temporary file that the clone and the backup cannot see")),
    ("virtfs", Arg, Refuse(SHARE)),
    ("fsdev", Arg, Refuse(SHARE)),
    ("add-fd", Arg, Refuse("-add-fd: file descriptors of the original's process cannot be given to a clone")),
    ("plugin", Arg, Refuse("-plugin: a TCG plugin is host code that coldclone does not know")),
    ("set", Arg, Refuse("-set can change any option after it was checked")),
    ("mem-path", Arg, Refuse("-mem-path: guest RAM in a file of the original's")),
    ("tpmdev", Arg, Refuse("-tpmdev: a TPM is a host device or an emulator process of the original's")),
    ("chroot", Arg, Refuse("-chroot: the clone's files would be looked up elsewhere")),
    ("hda", Arg, Refuse(SHORTHAND)),
    ("hdb", Arg, Refuse(SHORTHAND)),
    ("hdc", Arg, Refuse(SHORTHAND)),
    ("hdd", Arg, Refuse(SHORTHAND)),
    ("fda", Arg, Refuse(SHORTHAND)),
    ("fdb", Arg, Refuse(SHORTHAND)),
    ("mtdblock", Arg, Refuse(SHORTHAND)),
    ("sd", Arg, Refuse(SHORTHAND)),
    ("pflash", Arg, Refuse(SHORTHAND)),
    ("preconfig", Flag, Refuse("--preconfig: the machine is configured over the monitor, not by its command line")),
    ("dump-vmstate", Arg, Refuse("-dump-vmstate writes a file and exits")),
    ("xen-domid", Arg, Refuse("Xen device-model options: back such a VM up with the xl or XAPI backend")),
    ("xen-attach", Flag, Refuse("Xen device-model options: back such a VM up with the xl or XAPI backend")),
    ("xen-domid-restrict", Flag, Refuse("Xen device-model options: back such a VM up with the xl or XAPI backend")),
    ("h", Flag, Refuse("-help is not a VM")),
    ("help", Flag, Refuse("-help is not a VM")),
    ("version", Flag, Refuse("-version is not a VM")),
    ("audio-help", Flag, Refuse("-audio-help is not a VM")),
];

/// Devices coldclone understands: guest-visible hardware that reaches no host
/// resource except through a drive, netdev, chardev or memory backend, each
/// of which is judged on its own. `-transitional`/`-non-transitional`
/// variants of virtio devices are the same device.
const DEVICES: &[&str] = &[
    // buses and bridges
    "pci-bridge",
    "pcie-pci-bridge",
    "pcie-root-port",
    "ioh3420",
    "x3130-upstream",
    "xio3130-downstream",
    "i82801b11-bridge",
    "pxb",
    "pxb-pcie",
    "usb-hub",
    // USB controllers and input
    "piix3-usb-uhci",
    "piix4-usb-uhci",
    "ich9-usb-ehci1",
    "ich9-usb-ehci2",
    "ich9-usb-uhci1",
    "ich9-usb-uhci2",
    "ich9-usb-uhci3",
    "ich9-usb-uhci4",
    "ich9-usb-uhci5",
    "ich9-usb-uhci6",
    "usb-ehci",
    "nec-usb-xhci",
    "qemu-xhci",
    "usb-tablet",
    "usb-mouse",
    "usb-kbd",
    "usb-storage",
    "usb-bot",
    "usb-uas",
    // display
    "VGA",
    "cirrus-vga",
    "qxl",
    "qxl-vga",
    "vmware-svga",
    "bochs-display",
    "ramfb",
    "virtio-vga",
    "virtio-gpu",
    "virtio-gpu-pci",
    "secondary-vga",
    // storage
    "virtio-blk",
    "virtio-blk-pci",
    "virtio-scsi",
    "virtio-scsi-pci",
    "scsi-hd",
    "scsi-cd",
    "ide-hd",
    "ide-cd",
    "ide-drive",
    "ahci",
    "ich9-ahci",
    "nvme",
    "nvme-ns",
    "megasas",
    "megasas-gen2",
    "lsi53c895a",
    "lsi",
    "mptsas1068",
    "pvscsi",
    "am53c974",
    "dc390",
    "floppy",
    "isa-fdc",
    // network cards (their backends are judged as -netdev)
    "virtio-net",
    "virtio-net-pci",
    "e1000",
    "e1000-82544gc",
    "e1000-82545em",
    "e1000e",
    "igb",
    "rtl8139",
    "vmxnet3",
    "ne2k_pci",
    "ne2k_isa",
    "pcnet",
    "i82550",
    "i82551",
    "i82557a",
    "i82557b",
    "i82557c",
    "i82558a",
    "i82558b",
    "i82559a",
    "i82559b",
    "i82559c",
    "i82559er",
    "i82562",
    "i82801",
    "tulip",
    "usb-net",
    // serial lines and consoles (their chardevs are rewritten)
    "isa-serial",
    "pci-serial",
    "pci-serial-2x",
    "pci-serial-4x",
    "virtio-serial",
    "virtio-serial-pci",
    "virtserialport",
    "virtconsole",
    "isa-parallel",
    "isa-debugcon",
    "sga",
    // sound (audiodevs are rewritten to none)
    "intel-hda",
    "ich9-intel-hda",
    "hda-duplex",
    "hda-micro",
    "hda-output",
    "AC97",
    "ES1370",
    "sb16",
    "adlib",
    "cs4231a",
    "gus",
    "usb-audio",
    // the rest of a PC
    "virtio-balloon",
    "virtio-balloon-pci",
    "virtio-rng",
    "virtio-rng-pci",
    "i6300esb",
    "ib700",
    "pvpanic",
    "pvpanic-pci",
    "isa-debug-exit",
    "vmcoreinfo",
    "intel-iommu",
    "amd-iommu",
    "virtio-iommu-pci",
    "pc-dimm",
    "virtio-mem-pci",
    "virtio-keyboard-pci",
    "virtio-mouse-pci",
    "virtio-tablet-pci",
    "virtio-keyboard",
    "virtio-mouse",
    "virtio-tablet",
    "virtio-crypto-pci",
    "isa-applesmc",
    "hyperv-synic",
    "kvm-pit",
    "isa-ipmi-kcs",
    "ipmi-bmc-sim",
    "smbus-ipmi",
    "edu",
    "pci-testdev",
    "vmgenid",
];

/// Devices refused with a reason of their own (anything not in [`DEVICES`]
/// is refused too; these only get a better message).
const DEVICE_REASONS: &[(&str, &str)] = &[
    (
        "vfio",
        "a host PCI device passed through: it cannot be in two VMs",
    ),
    (
        "vhost-user",
        "a vhost-user device talks to a backend process of the original's",
    ),
    ("vhost-vsock", "a vsock device reaches host services"),
    (
        "vhost-scsi",
        "vhost-scsi is a host SCSI target of the original's",
    ),
    ("vhost-vdpa", "a vDPA device is host hardware"),
    ("virtio-9p", SHARE),
    (
        "ivshmem",
        "ivshmem shares memory with the host and other VMs",
    ),
    ("usb-host", "a host USB device passed through"),
    ("usb-redir", "USB redirection reaches a remote host"),
    ("scsi-generic", "a host SCSI device passed through"),
    ("scsi-block", "a host SCSI device passed through"),
    ("virtio-input-host", "a host input device passed through"),
    ("nvdimm", "an NVDIMM is backed by a host file"),
    (
        "tpm-",
        "a TPM is a host device or an emulator process of the original's",
    ),
];

/// `-object` types coldclone understands. Memory backends are judged for
/// `share`; `memory-backend-file` is refused (guest RAM in a host file).
const OBJECTS: &[&str] = &[
    "memory-backend-ram",
    "memory-backend-memfd",
    "iothread",
    "main-loop",
    "thread-context",
    "secret",
    "rng-builtin",
    "rng-random",
    "throttle-group",
    "cryptodev-backend-builtin",
];

const OBJECT_REASONS: &[(&str, &str)] = &[
    (
        "memory-backend-file",
        "guest RAM in a host file of the original's",
    ),
    (
        "filter-",
        "a network filter (dump, mirror, redirector) writes or forwards the clone's traffic",
    ),
    (
        "input-barrier",
        "input-barrier connects to a host's barrier server",
    ),
    ("input-linux", "a host input device passed through"),
    (
        "pr-manager-helper",
        "a persistent-reservation helper socket of the original's",
    ),
    (
        "tls-creds",
        "TLS credentials serve the original's remote displays and migration",
    ),
    (
        "colo-compare",
        "COLO compares traffic over the original's chardevs",
    ),
    ("can-host-socketcan", "a host CAN bus"),
];

fn unsupported(msg: impl Into<String>) -> BackendError {
    BackendError::Unsupported(msg.into())
}

fn lookup(name: &str) -> Option<(Arity, Rule)> {
    OPTIONS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, a, r)| (*a, *r))
}

/// One option of a QEMU command line: `-name` and its argument, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct Opt {
    pub name: String,
    pub arg: Option<String>,
}

/// Splits argv (without the program) into options, each with the arity
/// QEMU gives it. An option coldclone does not know refuses the VM here: its
/// arity is unknown, so nothing after it could be read reliably.
/// `-readconfig` files are read (see [`read_config`]) relative to `cwd`,
/// QEMU's working folder, and their sections become options.
pub fn parse_in(args: &[String], cwd: Option<&Path>) -> Result<Vec<Opt>> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        // qemu_init's lookup_opt: one or two leading dashes, then the exact name.
        let Some(name) = a
            .strip_prefix("--")
            .or_else(|| a.strip_prefix('-'))
            .filter(|n| !n.is_empty())
        else {
            // A bare word is the disk image shorthand (`qemu disk.img`).
            return Err(unsupported(format!(
                "positional argument {a:?} (a disk given without -drive); start the VM with -drive"
            )));
        };
        let Some((arity, _)) = lookup(name) else {
            return Err(unsupported(format!(
                "QEMU option -{name} is not one coldclone knows; the clone's command line is built \
                 from options it understands only, so this VM is refused"
            )));
        };
        let arg = match arity {
            Flag => None,
            Arg => Some(
                it.next()
                    .ok_or_else(|| unsupported(format!("option -{name} has no argument")))?
                    .clone(),
            ),
        };
        if name == "readconfig" {
            let file = arg.unwrap_or_default();
            out.extend(read_config(&file, cwd)?);
            continue;
        }
        out.push(Opt {
            name: name.to_string(),
            arg,
        });
    }
    Ok(out)
}

/// [`parse_in`] without a working folder: a relative `-readconfig` is refused.
pub fn parse(args: &[String]) -> Result<Vec<Opt>> {
    parse_in(args, None)
}

/// Sections of a `-readconfig` file that coldclone turns into options.
const CONFIG_SECTIONS: &[(&str, &str)] = &[
    ("device", "device"),
    ("chardev", "chardev"),
    ("netdev", "netdev"),
    ("drive", "drive"),
    ("object", "object"),
    ("machine", "machine"),
    ("memory", "m"),
    ("smp-opts", "smp"),
    ("boot-opts", "boot"),
];

/// Reads a `-readconfig` file (QEMU's format, util/qemu-config.c: `[group]`
/// or `[group "id"]` headers, `key = "value"` lines, `#` comments) into the
/// options it stands for, so that the clone gets them inline and every
/// section is judged like the same option on the command line. The file
/// must be root's and not group/world-writable, or someone else could
/// change what the clone runs between this check and any later read.
pub fn read_config(file: &str, cwd: Option<&Path>) -> Result<Vec<Opt>> {
    use std::os::unix::fs::MetadataExt;
    let path = Path::new(file);
    let path = match (path.is_absolute(), cwd) {
        (true, _) => path.to_path_buf(),
        (false, Some(c)) => c.join(path),
        (false, None) => {
            return Err(unsupported(format!(
                "-readconfig {file}: a relative path whose folder is unknown"
            )))
        }
    };
    let refuse = |why: String| unsupported(format!("-readconfig {}: {why}", path.display()));
    let meta = std::fs::metadata(&path).map_err(|e| refuse(format!("cannot read it: {e}")))?;
    if !meta.is_file() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(refuse(format!(
            "must be a regular file owned by root and not group- or world-writable \
             (it is uid {}, mode {:o})",
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    let text =
        std::fs::read_to_string(&path).map_err(|e| refuse(format!("cannot read it: {e}")))?;
    parse_config(&text).map_err(refuse)
}

/// The text of a `-readconfig` file into options.
pub fn parse_config(text: &str) -> std::result::Result<Vec<Opt>, String> {
    let mut out: Vec<Opt> = Vec::new();
    let mut current: Option<(String, Vec<(String, String)>)> = None;
    let flush = |cur: Option<(String, Vec<(String, String)>)>, out: &mut Vec<Opt>| {
        if let Some((name, pairs)) = cur {
            out.push(Opt {
                name,
                arg: Some(render_pairs(None, &pairs)),
            });
        }
    };
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(h) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            flush(current.take(), &mut out);
            let (group, id) = match h.split_once(' ') {
                Some((g, id)) => {
                    let id = id.trim();
                    let id = id
                        .strip_prefix('"')
                        .and_then(|i| i.strip_suffix('"'))
                        .ok_or_else(|| format!("line {}: a section id must be quoted", n + 1))?;
                    (g.to_string(), Some(id.to_string()))
                }
                None => (h.to_string(), None),
            };
            let Some((_, option)) = CONFIG_SECTIONS.iter().find(|(s, _)| *s == group) else {
                return Err(format!(
                    "section [{group}] is not one coldclone knows, so the file is refused"
                ));
            };
            let mut pairs = Vec::new();
            if let Some(id) = id {
                pairs.push(("id".to_string(), id));
            }
            current = Some((option.to_string(), pairs));
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: expected key = \"value\"", n + 1))?;
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|x| x.strip_suffix('"'))
            .ok_or_else(|| format!("line {}: the value must be quoted", n + 1))?;
        let Some((_, pairs)) = current.as_mut() else {
            return Err(format!("line {}: a key outside any section", n + 1));
        };
        pairs.push((k.trim().to_string(), v.to_string()));
    }
    flush(current.take(), &mut out);
    Ok(out)
}

pub(super) fn esc(s: &str) -> String {
    s.replace(',', ",,")
}

fn render_pairs(head: Option<&str>, pairs: &[(String, String)]) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(h) = head {
        parts.push(esc(h));
    }
    for (k, v) in pairs {
        parts.push(format!("{}={}", esc(k), esc(v)));
    }
    parts.join(",")
}

/// An option argument as QEMU reads it: key/value pairs in order, the
/// implied key made explicit, booleans spelled out, repeated keys refused.
#[derive(Debug, Clone, PartialEq)]
pub struct Props {
    /// Written as a JSON object.
    pub json: bool,
    pub pairs: Vec<(String, String)>,
}

impl Props {
    /// Reads `s`, the argument of `-option`. `implied` is the option's
    /// implied key, if it has one; `json_ok` whether QEMU takes the JSON form.
    pub fn parse(option: &str, s: &str, implied: Option<&str>, json_ok: bool) -> Result<Props> {
        let bad = |why: String| unsupported(format!("-{option} {s}: {why}"));
        let pairs = if s.trim_start().starts_with('{') {
            if !json_ok {
                return Err(bad("QEMU does not take this option as JSON".into()));
            }
            json_pairs(s).map_err(bad)?
        } else {
            keyval_pairs(s, implied)
        };
        let mut seen = std::collections::BTreeSet::new();
        for (k, _) in &pairs {
            if !seen.insert(k.as_str()) {
                return Err(bad(format!("key {k:?} is given more than once")));
            }
        }
        Ok(Props {
            json: s.trim_start().starts_with('{'),
            pairs,
        })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A boolean property: QEMU's spellings (QemuOpts on/off, the QAPI
    /// visitor's yes/no/true/false too), `default` when absent.
    pub fn bool(&self, key: &str, default: bool) -> std::result::Result<bool, String> {
        match self.get(key) {
            None => Ok(default),
            Some("on" | "yes" | "true" | "y") => Ok(true),
            Some("off" | "no" | "false" | "n") => Ok(false),
            Some(v) => Err(format!("{key}={v} is not a boolean coldclone can read")),
        }
    }
}

pub(super) fn keyval_pairs(s: &str, implied: Option<&str>) -> Vec<(String, String)> {
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
    if !cur.is_empty() || parts.is_empty() {
        parts.push(cur);
    }
    let mut out = Vec::new();
    for (i, p) in parts.into_iter().enumerate() {
        if p.is_empty() && i == 0 {
            continue;
        }
        match p.split_once('=') {
            Some((k, v)) => out.push((k.to_string(), v.to_string())),
            None => match implied {
                Some(key) if i == 0 => out.push((key.to_string(), p)),
                // get_opt_name_value: a flag, "no" negating it.
                _ => match p.strip_prefix("no") {
                    Some(rest) => out.push((rest.to_string(), "off".into())),
                    None => out.push((p, "on".into())),
                },
            },
        }
    }
    out
}

/// A JSON object's top-level members in order, repeated keys kept.
pub(super) fn json_members(
    s: &str,
) -> std::result::Result<Vec<(String, serde_json::Value)>, String> {
    use serde::de::{Deserializer, MapAccess, Visitor};
    struct Pairs;
    impl<'de> Visitor<'de> for Pairs {
        type Value = Vec<(String, serde_json::Value)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(
            self,
            mut m: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut v = Vec::new();
            while let Some((k, val)) = m.next_entry::<String, serde_json::Value>()? {
                v.push((k, val));
            }
            Ok(v)
        }
    }
    let mut de = serde_json::Deserializer::from_str(s);
    let members = de
        .deserialize_map(Pairs)
        .map_err(|e| format!("bad JSON: {e}"))?;
    de.end().map_err(|e| format!("bad JSON: {e}"))?;
    Ok(members)
}

/// A JSON object's members in order, repeated keys kept (so that they can
/// be refused), scalars as QEMU turns them into option strings
/// (`qemu_opts_from_qdict_entry`: booleans on/off, numbers as written).
fn json_pairs(s: &str) -> std::result::Result<Vec<(String, String)>, String> {
    json_members(s)?
        .into_iter()
        .map(|(k, v)| {
            let s = match v {
                serde_json::Value::String(s) => s,
                serde_json::Value::Bool(b) => if b { "on" } else { "off" }.to_string(),
                serde_json::Value::Number(n) => n.to_string(),
                other => {
                    return Err(format!(
                        "member {k:?} is {other}; coldclone reads only strings, numbers and booleans here"
                    ))
                }
            };
            Ok((k, s))
        })
        .collect()
}

/// A QEMU file name with a protocol (`nbd:`, `iscsi://`, `json:`...): QEMU
/// takes a name as a protocol when a ':' comes before any '/'.
fn has_protocol(file: &str) -> bool {
    let end = file.find(['/', '\\']).unwrap_or(file.len());
    file[..end].contains(':')
}

/// A QEMU id (`id_wellformed`): a letter, then letters, digits, '-', '.', '_'.
pub(super) fn id_ok(id: &str) -> bool {
    let mut c = id.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|x| x.is_ascii_alphanumeric() || matches!(x, '-' | '.' | '_'))
}

fn normalize_device(driver: &str) -> &str {
    driver
        .strip_suffix("-non-transitional")
        .or_else(|| driver.strip_suffix("-transitional"))
        .unwrap_or(driver)
}

fn judge_device(p: &Props, arg: &str) -> Result<()> {
    let driver = p
        .get("driver")
        .ok_or_else(|| unsupported(format!("-device {arg}: no driver")))?;
    let d = normalize_device(driver);
    if let Some((_, why)) = DEVICE_REASONS.iter().find(|(pre, _)| d.starts_with(pre)) {
        return Err(unsupported(format!("-device {driver}: {why}")));
    }
    if !DEVICES.contains(&d) {
        return Err(unsupported(format!(
            "-device {driver} is not a device coldclone knows; the VM is refused"
        )));
    }
    Ok(())
}

fn judge_object(p: &Props, arg: &str) -> Result<()> {
    let ty = p
        .get("qom-type")
        .ok_or_else(|| unsupported(format!("-object {arg}: no qom-type")))?;
    if let Some((_, why)) = OBJECT_REASONS.iter().find(|(pre, _)| ty.starts_with(pre)) {
        return Err(unsupported(format!("-object {ty}: {why}")));
    }
    if !OBJECTS.contains(&ty) {
        return Err(unsupported(format!(
            "-object {ty} is not an object type coldclone knows; the VM is refused"
        )));
    }
    if ty.starts_with("memory-backend") {
        // memfd is shared unless told otherwise: QEMU 7.2 reports share=true
        // (qom-get) for a memory-backend-memfd given without share=.
        let shared = p
            .bool("share", ty == "memory-backend-memfd")
            .map_err(|e| unsupported(format!("-object {ty}: {e}")))?;
        if shared {
            return Err(unsupported(format!(
                "-object {ty} with share on: a shared memory backend; a clone would share RAM \
                 with whatever the original shares it with"
            )));
        }
    }
    if ty == "rng-random" {
        let f = p.get("filename").unwrap_or("/dev/urandom");
        if !matches!(f, "/dev/urandom" | "/dev/random" | "/dev/hwrng") {
            return Err(unsupported(format!(
                "-object rng-random: filename {f} is not a host RNG"
            )));
        }
    }
    Ok(())
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
    /// The clone's own guest agent socket (in its run folder): the chardev of the
    /// agent's port becomes a socket QEMU serves there. `None`: a null chardev.
    pub agent_socket: Option<&'a str>,
}

/// The guest agent's channel on a command line: the chardev of a `virtserialport`
/// named `org.qemu.guest_agent.0`, and the path of its unix socket when QEMU serves
/// it (`-chardev socket,path=...,server=on`), as written (relative to QEMU's folder).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentChannel {
    pub chardev: String,
    pub socket: Option<PathBuf>,
}

/// Finds the guest agent's channel, if the VM has one.
pub fn agent_channel(original: &[Opt]) -> Option<AgentChannel> {
    let chardev = original
        .iter()
        .filter(|o| o.name == "device")
        .filter_map(|o| Props::parse("device", o.arg.as_deref()?, Some("driver"), true).ok())
        .find(|p| {
            p.get("driver") == Some("virtserialport")
                && p.get("name") == Some(crate::agent::PORT_NAME)
        })?
        .get("chardev")?
        .to_string();
    let socket = original
        .iter()
        .filter(|o| o.name == "chardev")
        .filter_map(|o| Props::parse("chardev", o.arg.as_deref()?, Some("backend"), false).ok())
        .find(|p| p.get("id") == Some(chardev.as_str()))
        .filter(|p| p.get("backend") == Some("socket") && p.bool("server", false) == Ok(true))
        .and_then(|p| p.get("path").map(PathBuf::from));
    Some(AgentChannel { chardev, socket })
}

/// The result of rewriting: argv and the taps it will create.
#[derive(Debug)]
pub struct CloneCommand {
    pub args: Vec<String>,
    pub taps: Vec<String>,
}

/// The chardev that carries the clone's console (a file in the run's folder).
const CONSOLE_ID: &str = "coldclone-console";
const QMP_ID: &str = "coldclone-qmp";

/// Network backend keys a clone's tap keeps (guest-visible or performance);
/// everything naming a host resource (fd, ifname, script, br, helper) goes.
const TAP_KEEP: &[&str] = &[
    "id",
    "queues",
    "vhost",
    "vhostforce",
    "vnet_hdr",
    "sndbuf",
    "poll-us",
];

fn net_type<'a>(p: &'a Props, option: &str) -> Result<&'a str> {
    p.get("type").ok_or_else(|| {
        unsupported(format!(
            "-{option} without a type is user-mode networking (SLIRP), a real uplink; give it a tap"
        ))
    })
}

fn refuse_net(option: &str, ty: &str) -> BackendError {
    unsupported(format!(
        "-{option} {ty}: only tap and bridge network backends can be moved onto the isolated \
         bridge; a {ty} backend would reach the original's network or host"
    ))
}

/// Rewrites the original's options for the clone. Refuses what it cannot make safe.
pub fn clone_command(original: &[Opt], spec: &CloneSpec) -> Result<CloneCommand> {
    let mut args: Vec<String> = Vec::new();
    let mut taps = Vec::new();
    let mut used_overlays = 0usize;
    let mut has_net = false;
    let nodefaults = original.iter().any(|o| o.name == "nodefaults");
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
    let tap = |taps: &mut Vec<String>, p: &Props, keep: &[&str]| {
        let t = next_tap(taps);
        let mut pairs: Vec<(String, String)> = p
            .pairs
            .iter()
            .filter(|(k, _)| keep.contains(&k.as_str()))
            .cloned()
            .collect();
        pairs.push(("ifname".into(), t));
        pairs.push(("script".into(), "no".into()));
        pairs.push(("downscript".into(), "no".into()));
        render_pairs(Some("tap"), &pairs)
    };
    // The console: the first serial line, whether given as -serial or as a
    // serial device on a chardev.
    let mut console_chardev: Option<String> = None;
    let mut console_serial = false;
    for o in original {
        let arg = o.arg.as_deref().unwrap_or("");
        if o.name == "serial" && !matches!(arg, "none" | "null") {
            console_serial = true;
            console_chardev = arg.strip_prefix("chardev:").map(str::to_string);
            break;
        }
    }
    if !console_serial {
        console_chardev = original
            .iter()
            .filter(|o| o.name == "device")
            .filter_map(|o| Props::parse("device", o.arg.as_deref()?, Some("driver"), true).ok())
            .find(|p| matches!(p.get("driver"), Some("isa-serial" | "pci-serial")))
            .and_then(|p| p.get("chardev").map(str::to_string));
    }
    // The -blockdev graph, judged whole: protocol nodes come before the
    // format nodes that name them.
    let graph = super::blockdev::judge(original)?;
    let agent_chardev = agent_channel(original).map(|a| a.chardev);
    let mut serial_seen = false;
    for (index, opt) in original.iter().enumerate() {
        let raw = opt.arg.clone();
        let a = raw.as_deref().unwrap_or("");
        let name = opt.name.as_str();
        let rule = lookup(name).map(|(_, r)| r).ok_or_else(|| {
            unsupported(format!("QEMU option -{name} is not one coldclone knows"))
        })?;
        match rule {
            Keep => {
                push(&mut args, name, raw);
                continue;
            }
            Drop => continue,
            Refuse(why) => return Err(unsupported(format!("-{name}: {why}"))),
            Judge => {}
        }
        match name {
            "machine" | "M" => {
                let mut p = Props::parse(name, a, Some("type"), false)?;
                // dumpdtb writes a file of the original's and exits.
                p.pairs.retain(|(k, _)| k != "dumpdtb");
                push(&mut args, "machine", Some(render_pairs(None, &p.pairs)));
            }
            "device" => {
                let p = Props::parse(name, a, Some("driver"), true)?;
                judge_device(&p, a)?;
                push(&mut args, name, raw);
            }
            "object" => {
                let p = Props::parse(name, a, Some("qom-type"), true)?;
                judge_object(&p, a)?;
                push(&mut args, name, raw);
            }
            "netdev" => {
                let p = Props::parse(name, a, Some("type"), true)?;
                let ty = net_type(&p, name)?;
                if !matches!(ty, "tap" | "bridge") {
                    return Err(refuse_net(name, ty));
                }
                let id = p
                    .get("id")
                    .ok_or_else(|| unsupported("a -netdev without id"))?;
                if !id_ok(id) {
                    return Err(unsupported(format!("-netdev id {id:?} is not a QEMU id")));
                }
                has_net = true;
                let t = tap(&mut taps, &p, TAP_KEEP);
                push(&mut args, name, Some(t));
            }
            "nic" => {
                let p = Props::parse(name, a, Some("type"), false)?;
                let ty = net_type(&p, name)?;
                has_net = true;
                match ty {
                    "none" => push(&mut args, name, Some("none".into())),
                    "tap" | "bridge" => {
                        let mut keep = TAP_KEEP.to_vec();
                        keep.extend(["model", "mac"]);
                        let t = tap(&mut taps, &p, &keep);
                        push(&mut args, name, Some(t));
                    }
                    other => return Err(refuse_net(name, other)),
                }
            }
            "net" => {
                let p = Props::parse(name, a, Some("type"), false)?;
                let ty = net_type(&p, name)?;
                has_net = true;
                match ty {
                    // The guest's card (on hub 0, or on netdev=), and "none".
                    "nic" | "none" => push(&mut args, name, raw),
                    "tap" | "bridge" => {
                        let mut keep = TAP_KEEP.to_vec();
                        keep.push("name");
                        let t = tap(&mut taps, &p, &keep);
                        push(&mut args, name, Some(t));
                    }
                    other => return Err(refuse_net(name, other)),
                }
            }
            // Character devices keep their ids (devices refer to them) but
            // lose their sockets, files and terminals; the console's goes
            // to a file in the run's folder.
            "chardev" => {
                let p = Props::parse(name, a, Some("backend"), false)?;
                let id = p
                    .get("id")
                    .ok_or_else(|| unsupported("a -chardev without id"))?;
                if !id_ok(id) {
                    return Err(unsupported(format!("-chardev id {id:?} is not a QEMU id")));
                }
                let new = if console_chardev.as_deref() == Some(id) {
                    format!("file,id={id},path={}", esc(spec.console_log))
                } else if let (Some(sock), true) =
                    (spec.agent_socket, agent_chardev.as_deref() == Some(id))
                {
                    // The clone's own agent socket, never the original's.
                    format!("socket,id={id},path={},server=on,wait=off", esc(sock))
                } else {
                    format!("null,id={id}")
                };
                push(&mut args, name, Some(new));
            }
            "serial" => {
                let new = match a {
                    "none" | "null" => a.to_string(),
                    _ if !serial_seen => {
                        serial_seen = true;
                        match &console_chardev {
                            Some(id) => format!("chardev:{id}"),
                            None => format!("chardev:{CONSOLE_ID}"),
                        }
                    }
                    _ => "null".to_string(),
                };
                push(&mut args, name, Some(new));
            }
            "parallel" | "debugcon" => {
                let new = if a == "none" { "none" } else { "null" };
                push(&mut args, name, Some(new.into()));
            }
            "audiodev" => {
                let p = Props::parse(name, a, Some("driver"), true)?;
                let id = p
                    .get("id")
                    .ok_or_else(|| unsupported("an -audiodev without id"))?;
                if !id_ok(id) {
                    return Err(unsupported(format!("-audiodev id {id:?} is not a QEMU id")));
                }
                push(&mut args, name, Some(format!("none,id={id}")));
            }
            "audio" => {
                let p = Props::parse(name, a, Some("driver"), false)?;
                let mut pairs = vec![("driver".to_string(), "none".to_string())];
                if let Some(m) = p.get("model") {
                    pairs.push(("model".into(), m.into()));
                }
                push(&mut args, name, Some(render_pairs(None, &pairs)));
            }
            "drive" => {
                let mut p = Props::parse(name, a, None, false)?;
                if let Some((k, _)) = p.pairs.iter().find(|(k, _)| k.contains('.')) {
                    return Err(unsupported(format!(
                        "-drive {a}: {k}= (a nested block option) is not supported; use file= with a plain file"
                    )));
                }
                let id = p.get("id").map(str::to_string);
                let file = p.get("file").unwrap_or("").to_string();
                let read_only =
                    p.bool("readonly", false).unwrap_or(false) || p.get("media") == Some("cdrom");
                match id.as_deref().and_then(|i| spec.disk_overlays.get(i)) {
                    Some(overlay) => {
                        set(&mut p.pairs, "file", overlay);
                        set(&mut p.pairs, "format", "qcow2");
                        p.pairs.retain(|(k, _)| k != "snapshot");
                        used_overlays += 1;
                    }
                    None if !file.is_empty() && !read_only => {
                        return Err(unsupported(format!(
                            "writable -drive {a} has no id, or was not found by query-block; give every -drive an id="
                        )))
                    }
                    None if has_protocol(&file) => {
                        return Err(unsupported(format!(
                            "-drive {a}: a network or protocol image ({file}) would be reached by the clone"
                        )))
                    }
                    None => p.pairs.retain(|(k, _)| k != "snapshot"),
                }
                push(&mut args, name, Some(render_pairs(None, &p.pairs)));
            }
            "blockdev" => {
                let node = super::blockdev::parse_node(a, index)?;
                // A protocol node under a writable disk goes with its format node.
                let under_writable = graph.iter().any(|d| {
                    !d.read_only
                        && !d.inline
                        && d.protocol_node.as_deref() == Some(node.name.as_str())
                });
                if under_writable {
                    continue;
                }
                match graph.iter().find(|d| d.node == node.name) {
                    Some(d) if !d.read_only => match spec.disk_overlays.get(&d.node) {
                        Some(overlay) => {
                            used_overlays += 1;
                            push(
                                &mut args,
                                name,
                                Some(super::blockdev::clone_node(d, &node, overlay)),
                            );
                        }
                        None => {
                            return Err(unsupported(format!(
                                "writable -blockdev node {} was not found by query-block among the VM's disks",
                                d.node
                            )))
                        }
                    },
                    // Read-only media, and their protocol nodes: shared as they are.
                    _ => push(&mut args, name, raw),
                }
            }
            "cdrom" => {
                if has_protocol(a) {
                    return Err(unsupported(format!(
                        "-cdrom {a}: a network or protocol image would be reached by the clone"
                    )));
                }
                push(&mut args, name, raw);
            }
            "trace" => {
                let p = Props::parse(name, a, Some("enable"), false)?;
                if p.get("file").is_some() {
                    return Err(unsupported(format!(
                        "-trace {a}: file= writes the original's trace file"
                    )));
                }
                // Tracing is left out of the clone.
            }
            "icount" => {
                let p = Props::parse(name, a, Some("shift"), false)?;
                if p.get("rr").is_some() || p.get("rrfile").is_some() {
                    return Err(unsupported(format!(
                        "-icount {a}: record/replay files of the original's"
                    )));
                }
                push(&mut args, name, raw);
            }
            "global" => {
                let p = Props::parse(name, a, None, false)?;
                let (driver, prop) = match (p.get("driver"), p.get("property")) {
                    (Some(d), Some(pr)) => (d.to_string(), pr.to_string()),
                    _ => {
                        let (k, _) = p.pairs.first().cloned().unwrap_or_default();
                        match k.rsplit_once('.') {
                            Some((d, pr)) => (d.to_string(), pr.to_string()),
                            None => {
                                return Err(unsupported(format!("-global {a}: cannot read it")))
                            }
                        }
                    }
                };
                if driver.starts_with("memory-backend")
                    || matches!(
                        prop.as_str(),
                        "share" | "mem-path" | "path" | "file" | "filename"
                    )
                {
                    return Err(unsupported(format!(
                        "-global {a}: a global default for {driver}.{prop} could share memory or files"
                    )));
                }
                push(&mut args, name, raw);
            }
            "action" => {
                let mut p = Props::parse(name, a, None, false)?;
                // shutdown=pause would make the clone's power-off look like a hang.
                p.pairs.retain(|(k, _)| k != "shutdown");
                if !p.pairs.is_empty() {
                    push(&mut args, name, Some(render_pairs(None, &p.pairs)));
                }
            }
            "usbdevice" => {
                if !matches!(a, "tablet" | "mouse" | "keyboard") {
                    return Err(unsupported(format!(
                        "-usbdevice {a} is not one coldclone knows"
                    )));
                }
                push(&mut args, name, raw);
            }
            other => {
                return Err(unsupported(format!(
                    "QEMU option -{other} is not one coldclone knows"
                )))
            }
        }
    }
    if used_overlays != spec.disk_overlays.len() {
        return Err(unsupported(format!(
            "{} of {} snapshotted disks were found as -drive id= on the command line",
            used_overlays,
            spec.disk_overlays.len()
        )));
    }
    if !has_net {
        // Without -nodefaults and any -net/-nic/-netdev, QEMU gives the VM
        // a NIC on user-mode networking (SLIRP; `info network` shows
        // type=user, see backends/tests/qemu_clone_network.rs), an uplink to everything
        // the host reaches. A clone cannot have it and must have the same
        // devices, so such a VM is refused; otherwise the clone gets
        // `-nic none` so that it never gets a default NIC.
        if !nodefaults {
            return Err(unsupported(
                "the VM has no -netdev/-nic/-net option and no -nodefaults, so QEMU gave it its \
                 default NIC on user-mode networking (SLIRP), a real uplink; start it with \
                 -nic none or with a tap",
            ));
        }
        args.push("-nic".into());
        args.push("none".into());
    }
    let console_used = console_serial || console_chardev.is_some();
    if !console_used && !nodefaults {
        // Replaces QEMU's default serial line, so the devices stay the same.
        args.push("-serial".into());
        args.push(format!("chardev:{CONSOLE_ID}"));
    }
    if console_chardev.is_none() {
        args.push("-chardev".into());
        args.push(format!(
            "file,id={CONSOLE_ID},path={}",
            esc(spec.console_log)
        ));
    }
    // -S: never start by itself. A memory image saved from a running VM
    // (pre-switchover) would otherwise start the clone as soon as it is
    // loaded, before its network is verified.
    args.push("-S".into());
    for (k, v) in [
        ("name", esc(spec.name)),
        ("uuid", spec.uuid.to_string()),
        (
            "chardev",
            format!(
                "socket,id={QMP_ID},path={},server=on,wait=off",
                esc(spec.qmp_socket)
            ),
        ),
        ("mon", format!("chardev={QMP_ID},mode=control")),
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

/// What a VM restored from a backup gets instead of the original's resources.
pub struct RestoreSpec<'a> {
    pub name: &'a str,
    pub uuid: &'a str,
    pub qmp_socket: &'a str,
    pub pidfile: &'a str,
    pub console_log: &'a str,
    /// drive id -> the restored image (qcow2)
    pub disks: &'a BTreeMap<String, String>,
    /// The NICs' taps: made by QEMU at start, attached to nothing (no network) until
    /// the user attaches them.
    pub tap_prefix: &'a str,
    /// One fresh MAC per NIC, in order of appearance.
    pub macs: &'a [String],
}

/// The command line of a new VM made from a backup's kept definition: the clone's
/// allow-list (so nothing of the original's host resources is reached), then a new
/// MAC on every NIC and no `-S`: it boots at once.
pub fn restored_command(original: &[Opt], spec: &RestoreSpec) -> Result<CloneCommand> {
    let cloned = clone_command(
        original,
        &CloneSpec {
            name: spec.name,
            uuid: spec.uuid,
            qmp_socket: spec.qmp_socket,
            pidfile: spec.pidfile,
            console_log: spec.console_log,
            disk_overlays: spec.disks,
            tap_prefix: spec.tap_prefix,
            incoming: false,
            agent_socket: None,
        },
    )?;
    let mut args = Vec::with_capacity(cloned.args.len());
    let mut macs = spec.macs.iter();
    let mut next_mac = || {
        macs.next().cloned().ok_or_else(|| {
            unsupported("more NICs than MAC addresses were made for them".to_string())
        })
    };
    let mut it = cloned.args.into_iter().peekable();
    while let Some(a) = it.next() {
        if a == "-S" {
            continue;
        }
        let nic_arg = match a.as_str() {
            "-device" | "-nic" | "-net" => it.peek().cloned(),
            _ => None,
        };
        args.push(a.clone());
        let Some(arg) = nic_arg else { continue };
        it.next();
        let rewritten = match a.as_str() {
            "-device" => {
                let mut p = Props::parse("device", &arg, Some("driver"), true)?;
                if p.json || p.get("netdev").is_none() {
                    arg
                } else {
                    set(&mut p.pairs, "mac", &next_mac()?);
                    render_headed(&p, "driver")
                }
            }
            "-nic" => {
                let mut p = Props::parse("nic", &arg, Some("type"), false)?;
                if p.get("type") == Some("none") {
                    arg
                } else {
                    set(&mut p.pairs, "mac", &next_mac()?);
                    render_headed(&p, "type")
                }
            }
            _ => {
                let mut p = Props::parse("net", &arg, Some("type"), false)?;
                if p.get("type") == Some("nic") {
                    set(&mut p.pairs, "macaddr", &next_mac()?);
                    render_headed(&p, "type")
                } else {
                    arg
                }
            }
        };
        args.push(rewritten);
    }
    Ok(CloneCommand {
        args,
        taps: cloned.taps,
    })
}

/// `p` written back with its implied key's value first, bare, as QEMU's own
/// documentation spells these options (`virtio-net-pci,netdev=n0,...`).
fn render_headed(p: &Props, implied: &str) -> String {
    match p.pairs.first() {
        Some((k, v)) if k == implied => render_pairs(Some(v), &p.pairs[1..]),
        _ => render_pairs(None, &p.pairs),
    }
}

fn set(pairs: &mut Vec<(String, String)>, key: &str, value: &str) {
    match pairs.iter_mut().find(|(k, _)| k == key) {
        Some(p) => p.1 = value.to_string(),
        None => pairs.push((key.to_string(), value.to_string())),
    }
}

/// What a removed secret is replaced by in a kept definition.
pub const SECRET_REMOVED: &str = "removed-by-coldclone";

/// Keys whose values are secrets wherever they appear (`-object secret,data=`, SPICE's
/// `password=`, a VNC `password-secret=` names an object and stays).
fn is_secret_key(option: &str, qom_type: Option<&str>, key: &str) -> bool {
    matches!(key, "password" | "passwd")
        || (option == "object" && qom_type == Some("secret") && matches!(key, "data" | "iv"))
}

/// The original's options as argv for the definition kept with a backup: each option as
/// the VM was started with it, secret values replaced by [`SECRET_REMOVED`].
pub fn definition_argv(options: &[Opt]) -> Vec<String> {
    let mut argv = Vec::new();
    for o in options {
        argv.push(format!("-{}", o.name));
        let Some(arg) = &o.arg else { continue };
        let implied = match o.name.as_str() {
            "object" => Some("qom-type"),
            _ => None,
        };
        let kept = match Props::parse(&o.name, arg, implied, true) {
            Ok(p) if !p.json => {
                let ty = p.get("qom-type").map(str::to_string);
                let secret = p
                    .pairs
                    .iter()
                    .any(|(k, _)| is_secret_key(&o.name, ty.as_deref(), k));
                if secret {
                    let pairs: Vec<(String, String)> = p
                        .pairs
                        .iter()
                        .map(|(k, v)| {
                            if is_secret_key(&o.name, ty.as_deref(), k) {
                                (k.clone(), SECRET_REMOVED.to_string())
                            } else {
                                (k.clone(), v.clone())
                            }
                        })
                        .collect();
                    render_pairs(None, &pairs)
                } else {
                    arg.clone()
                }
            }
            // A JSON argument with a secret in it: the whole argument goes.
            Ok(p)
                if p.pairs
                    .iter()
                    .any(|(k, _)| is_secret_key(&o.name, p.get("qom-type"), k)) =>
            {
                SECRET_REMOVED.to_string()
            }
            _ => arg.clone(),
        };
        argv.push(kept);
    }
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn a_kept_definition_holds_no_secret() {
        let argv = s(&[
            "-name",
            "web1",
            "-object",
            "secret,id=sec0,data=hunter2,format=raw",
            "-object",
            r#"{"qom-type":"secret","id":"sec1","data":"hunter3"}"#,
            "-spice",
            "port=5900,password=hunter4",
            "-drive",
            "file=/v/a,,b.qcow2,if=virtio,id=d0",
        ]);
        let kept = definition_argv(&parse(&argv).unwrap());
        let joined = kept.join(" ");
        assert!(!joined.contains("hunter"), "{joined}");
        assert!(
            kept.contains(
                &"qom-type=secret,id=sec0,data=removed-by-coldclone,format=raw".to_string()
            ),
            "{kept:?}"
        );
        assert!(kept.contains(&"file=/v/a,,b.qcow2,if=virtio,id=d0".to_string()));
        assert_eq!(kept.len(), argv.len());
    }

    fn spec(overlays: &BTreeMap<String, String>) -> CloneSpec<'_> {
        CloneSpec {
            name: "coldclone-clone-x",
            uuid: "u",
            qmp_socket: "/run/c,1/qmp",
            pidfile: "/run/c/pid",
            console_log: "/run/c/console",
            disk_overlays: overlays,
            tap_prefix: "ccx",
            incoming: true,
            agent_socket: Some("/run/c/agent.sock"),
        }
    }

    #[test]
    fn option_arguments_are_read_like_qemu() {
        let p = Props::parse("drive", "file=/a,,b.qcow2,if=none,id=d0", None, false).unwrap();
        assert_eq!(p.get("file"), Some("/a,b.qcow2"));
        let p = Props::parse(
            "netdev",
            "user,id=n0,hostfwd=tcp::2222-:22",
            Some("type"),
            true,
        )
        .unwrap();
        assert_eq!(p.get("type"), Some("user"));
        let p = Props::parse(
            "object",
            "memory-backend-ram,id=m,share,noprealloc",
            Some("qom-type"),
            true,
        )
        .unwrap();
        assert_eq!(p.get("share"), Some("on"));
        assert_eq!(p.get("prealloc"), Some("off"));
        let p = Props::parse(
            "object",
            r#"{"qom-type":"memory-backend-ram","id":"m","size":1024,"share":true}"#,
            Some("qom-type"),
            true,
        )
        .unwrap();
        assert!(p.json);
        assert_eq!(p.get("share"), Some("on"));
        assert_eq!(p.get("size"), Some("1024"));
        assert!(Props::parse(
            "object",
            "memory-backend-ram,id=m,share=off,share=on",
            Some("qom-type"),
            true
        )
        .is_err());
        assert!(Props::parse(
            "object",
            r#"{"qom-type":"x","share":false,"share":true}"#,
            Some("qom-type"),
            true
        )
        .is_err());
        assert!(
            has_protocol("nbd:host:10809")
                && has_protocol("iscsi://h/t/0")
                && !has_protocol("/a:b")
                && !has_protocol("vm.qcow2")
        );
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
            "tap,id=n0,ifname=vnet0,script=/etc/qemu-ifup,vhost=on,vhostfd=9,fd=8",
            "-device",
            "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
            "-nic",
            "bridge,br=br0,model=virtio,mac=52:54:00:00:00:02",
            "-qmp",
            "unix:orig.qmp,server=on,wait=off",
            "-name",
            "web1",
            "-no-shutdown",
            "-daemonize",
        ]))
        .unwrap();
        let mut overlays = BTreeMap::new();
        overlays.insert("d0".to_string(), "/run/c/d0.qcow2".to_string());
        let cmd = clone_command(&orig, &spec(&overlays)).unwrap();
        let a = cmd.args.join(" ");
        assert!(
            a.contains("-drive file=/run/c/d0.qcow2,if=none,id=d0,format=qcow2"),
            "{a}"
        );
        assert!(
            a.contains("-netdev tap,id=n0,vhost=on,ifname=ccx0,script=no,downscript=no"),
            "{a}"
        );
        assert!(
            a.contains(
                "-nic tap,model=virtio,mac=52:54:00:00:00:02,ifname=ccx1,script=no,downscript=no"
            ),
            "{a}"
        );
        for gone in [
            "orig.qmp",
            "web1",
            "br0",
            "vhostfd",
            "fd=8",
            "qemu-ifup",
            "no-shutdown",
            "daemonize",
        ] {
            assert!(!a.contains(gone), "{gone}: {a}");
        }
        assert!(a.contains("-incoming defer"), "{a}");
        // A comma in the state folder is escaped, not a new key.
        assert!(
            a.contains("-chardev socket,id=coldclone-qmp,path=/run/c,,1/qmp,server=on,wait=off"),
            "{a}"
        );
        assert_eq!(cmd.taps, vec!["ccx0", "ccx1"]);
    }

    #[test]
    fn unsafe_command_lines_are_refused_naming_the_option() {
        let overlays = BTreeMap::new();
        for (bad, named) in [
            (vec!["-drive", "file=x.raw,format=raw"], "-drive"),
            (vec!["-hda", "x.img"], "-hda"),
            (
                vec!["-object", "memory-backend-ram,id=m,size=1G,share=on"],
                "share",
            ),
            (
                vec!["-object", "memory-backend-ram,id=m,size=1G,share"],
                "share",
            ),
            (
                vec![
                    "-object",
                    "qom-type=memory-backend-ram,id=m,size=1G,share=yes",
                ],
                "share",
            ),
            (
                vec![
                    "-object",
                    r#"{"qom-type":"memory-backend-ram","id":"m","size":1024,"share":true}"#,
                ],
                "share",
            ),
            (
                vec!["-object", "memory-backend-memfd,id=m,size=1G"],
                "share",
            ),
            (
                vec![
                    "-object",
                    "memory-backend-file,id=m,size=1G,mem-path=/dev/shm/x",
                ],
                "memory-backend-file",
            ),
            (
                vec!["-object", "filter-dump,id=f,netdev=n0,file=/tmp/x"],
                "filter-dump",
            ),
            (
                vec!["-object", "input-barrier,id=b,name=x"],
                "input-barrier",
            ),
            (
                vec!["-virtfs", "local,path=/srv,mount_tag=s,security_model=none"],
                "-virtfs",
            ),
            (
                vec!["-fsdev", "local,id=f,path=/srv,security_model=none"],
                "-fsdev",
            ),
            (vec!["-snapshot"], "-snapshot"),
            (vec!["-trace", "enable=*,file=/tmp/t"], "-trace"),
            (vec!["-add-fd", "fd=3,set=1"], "-add-fd"),
            (vec!["-plugin", "file=/x.so"], "-plugin"),
            (vec!["-netdev", "user,id=n0"], "user"),
            (
                vec![
                    "-netdev",
                    r#"{"type":"stream","id":"n0","addr":{"type":"unix","path":"/x"}}"#,
                ],
                "-netdev",
            ),
            (vec!["-netdev", "socket,id=n0,connect=1.2.3.4:5"], "socket"),
            (vec!["-netdev", "type=vde,id=n0"], "vde"),
            (
                vec![
                    "-netdev",
                    "dgram,id=n0,remote.type=inet,remote.host=1.2.3.4,remote.port=5",
                ],
                "dgram",
            ),
            (vec!["-nic", "user,model=virtio"], "user"),
            (vec!["-nic", "model=virtio"], "-nic"),
            (vec!["-net", "user"], "user"),
            (vec!["-device", "vfio-pci,host=01:00.0"], "vfio-pci"),
            (
                vec!["-device", "vhost-vsock-pci,guest-cid=3"],
                "vhost-vsock",
            ),
            (
                vec![
                    "-device",
                    r#"{"driver":"virtio-9p-pci","fsdev":"f","mount_tag":"t"}"#,
                ],
                "virtio-9p",
            ),
            (
                vec!["-mem-prealloc", "-daemonize", "-frobnicate", "x"],
                "-frobnicate",
            ),
            (vec!["disk.img"], "disk.img"),
            (vec!["-m", "256"], "-nodefaults"),
        ] {
            let r = parse(&s(&bad)).and_then(|o| clone_command(&o, &spec(&overlays)));
            match r {
                Ok(c) => panic!("{bad:?} was accepted: {:?}", c.args),
                Err(e) => assert!(e.to_string().contains(named), "{bad:?}: {e}"),
            }
        }
    }

    #[test]
    fn a_vm_without_nics_gets_nic_none_and_a_flag_never_shifts_the_parser() {
        let overlays = BTreeMap::new();
        let o = parse(&s(&["-nodefaults", "-mem-prealloc", "-m", "64"])).unwrap();
        assert_eq!(
            o[1],
            Opt {
                name: "mem-prealloc".into(),
                arg: None
            }
        );
        let a = clone_command(&o, &spec(&overlays)).unwrap().args.join(" ");
        assert!(a.contains("-nic none"), "{a}");
        assert!(a.contains("-m 64"), "{a}");
    }

    #[test]
    fn managers_chardevs_consoles_and_audio_are_rewritten() {
        let overlays = BTreeMap::new();
        let o = parse(&s(&[
            "-nodefaults",
            "-nic",
            "none",
            "-chardev",
            "socket,id=charmonitor,fd=30,server=on,wait=off",
            "-mon",
            "chardev=charmonitor,id=monitor,mode=control",
            "-chardev",
            "pty,id=charserial0,logfile=/var/log/libvirt/qemu/x.log",
            "-device",
            "isa-serial,chardev=charserial0,id=serial0",
            "-debugcon",
            "file:/tmp/debug.log",
            "-parallel",
            "tcp:1.2.3.4:5",
            "-audiodev",
            "pa,id=snd0,server=/run/pulse/native",
            "-action",
            "shutdown=pause,panic=pause",
        ]))
        .unwrap();
        let a = clone_command(&o, &spec(&overlays)).unwrap().args.join(" ");
        assert!(a.contains("-chardev null,id=charmonitor"), "{a}");
        assert!(
            a.contains("-chardev file,id=charserial0,path=/run/c/console"),
            "{a}"
        );
        assert!(
            a.contains("-debugcon null") && a.contains("-parallel null"),
            "{a}"
        );
        assert!(a.contains("-audiodev none,id=snd0"), "{a}");
        assert!(
            a.contains("-action panic=pause") && !a.contains("shutdown=pause"),
            "{a}"
        );
        for gone in ["fd=30", "/var/log", "debug.log", "1.2.3.4", "pulse"] {
            assert!(!a.contains(gone), "{gone}: {a}");
        }
    }

    #[test]
    fn readconfig_sections_become_options() {
        let o = parse_config(
            "# comment\n[device \"ehci\"]\n  driver = \"ich9-usb-ehci1\"\n  addr = \"1d.7\"\n\n[machine]\n  type = \"q35\"\n",
        )
        .unwrap();
        assert_eq!(o[0].name, "device");
        assert_eq!(
            o[0].arg.as_deref(),
            Some("id=ehci,driver=ich9-usb-ehci1,addr=1d.7")
        );
        assert_eq!(o[1].arg.as_deref(), Some("type=q35"));
        assert!(parse_config("[fsdev \"f\"]\n path = \"/srv\"\n").is_err());
    }

    #[test]
    fn the_agent_channel_is_found_and_the_clone_gets_its_own_socket() {
        let argv = s(&[
            "-device",
            "virtio-serial-pci,id=vs0",
            "-chardev",
            "socket,id=qga0,path=/var/run/orig/qga.sock,server=on,wait=off",
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-chardev",
            "socket,id=other,path=/var/run/orig/other.sock,server=on,wait=off",
            "-device",
            "virtserialport,chardev=other,name=com.example.other",
            "-nic",
            "none",
        ]);
        let opts = parse(&argv).unwrap();
        assert_eq!(
            agent_channel(&opts),
            Some(AgentChannel {
                chardev: "qga0".into(),
                socket: Some("/var/run/orig/qga.sock".into())
            })
        );
        let overlays = BTreeMap::new();
        let a = clone_command(&opts, &spec(&overlays))
            .unwrap()
            .args
            .join(" ");
        assert!(
            a.contains("-chardev socket,id=qga0,path=/run/c/agent.sock,server=on,wait=off"),
            "{a}"
        );
        assert!(
            !a.contains("/var/run/orig"),
            "the original's sockets stay out: {a}"
        );
        assert!(a.contains("-chardev null,id=other"), "{a}");
        // A client chardev (QEMU connects out) is no socket of the original's to use.
        let argv = s(&[
            "-chardev",
            "socket,id=qga0,path=/x/qga.sock,server=off",
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]);
        assert_eq!(agent_channel(&parse(&argv).unwrap()).unwrap().socket, None);
        assert_eq!(agent_channel(&parse(&s(&["-nic", "none"])).unwrap()), None);
    }
}
