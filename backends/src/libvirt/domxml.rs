//! libvirt domain XML: read into a small tree, checked against an allow-list,
//! and rewritten for the clone.
//!
//! The XML comes from libvirt (`virsh dumpxml`, and the header of the memory
//! image the snapshot wrote, `virsh save-image-dumpxml`), but it describes a
//! VM someone else configured, and the memory image lies in a folder: both are
//! input to check. Every element of `<domain>` and `<devices>` is either
//! understood (kept, rewritten, or dropped because it is host-side only) or
//! the VM is refused, with the element named. The clone's XML is derived
//! from the save image's, because libvirt restores a memory image only under
//! an ABI-compatible definition of the same VM.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// An element: name, attributes in document order, children.
#[derive(Debug, Clone, PartialEq)]
pub struct Elem {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Node>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    Elem(Elem),
    Text(String),
}

impl Elem {
    pub fn new(name: &str) -> Elem {
        Elem {
            name: name.to_string(),
            attrs: Vec::new(),
            children: Vec::new(),
        }
    }
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn set_attr(&mut self, name: &str, value: &str) {
        match self.attrs.iter_mut().find(|(k, _)| k == name) {
            Some(a) => a.1 = value.to_string(),
            None => self.attrs.push((name.to_string(), value.to_string())),
        }
    }
    pub fn with_attr(mut self, name: &str, value: &str) -> Elem {
        self.set_attr(name, value);
        self
    }
    pub fn with_child(mut self, child: Elem) -> Elem {
        self.children.push(Node::Elem(child));
        self
    }
    pub fn elems(&self) -> impl Iterator<Item = &Elem> {
        self.children.iter().filter_map(|n| match n {
            Node::Elem(e) => Some(e),
            Node::Text(_) => None,
        })
    }
    pub fn elems_mut(&mut self) -> impl Iterator<Item = &mut Elem> {
        self.children.iter_mut().filter_map(|n| match n {
            Node::Elem(e) => Some(e),
            Node::Text(_) => None,
        })
    }
    pub fn child(&self, name: &str) -> Option<&Elem> {
        self.elems().find(|e| e.name == name)
    }
    pub fn child_mut(&mut self, name: &str) -> Option<&mut Elem> {
        self.elems_mut().find(|e| e.name == name)
    }
    /// The text content (concatenated, trimmed).
    pub fn text(&self) -> String {
        let mut s = String::new();
        for n in &self.children {
            if let Node::Text(t) = n {
                s.push_str(t);
            }
        }
        s.trim().to_string()
    }
    /// Removes every child element named `name`.
    pub fn remove(&mut self, name: &str) {
        self.children
            .retain(|n| !matches!(n, Node::Elem(e) if e.name == name));
    }
    /// Sets the text of child `name`, creating it.
    pub fn set_child_text(&mut self, name: &str, text: &str) {
        self.remove(name);
        let mut e = Elem::new(name);
        e.children.push(Node::Text(text.to_string()));
        self.children.push(Node::Elem(e));
    }

    /// Serializes as XML (attributes in single quotes, as libvirt writes them).
    pub fn to_xml(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out
    }

    fn write(&self, out: &mut String, depth: usize) {
        let pad = "  ".repeat(depth);
        let _ = write!(out, "{pad}<{}", self.name);
        for (k, v) in &self.attrs {
            let _ = write!(out, " {k}='{}'", escape(v));
        }
        let has_elems = self.elems().next().is_some();
        let text = self.text();
        if !has_elems && text.is_empty() {
            out.push_str("/>\n");
        } else if !has_elems {
            let _ = writeln!(out, ">{}</{}>", escape(&text), self.name);
        } else {
            out.push_str(">\n");
            for e in self.elems() {
                e.write(out, depth + 1);
            }
            let _ = writeln!(out, "{pad}</{}>", self.name);
        }
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// Parses a domain XML. Elements in a namespace (`<qemu:commandline>`,
/// metadata of management tools) keep their prefix-free name with the
/// namespace noted, so the allow-list can name and refuse them.
pub fn parse(text: &str) -> Result<Elem, String> {
    let doc = roxmltree::Document::parse(text).map_err(|e| format!("not XML: {e}"))?;
    let root = doc.root_element();
    Ok(convert(root))
}

fn convert(n: roxmltree::Node) -> Elem {
    let tag = n.tag_name();
    let name = match tag.namespace() {
        Some(ns) if !ns.is_empty() => format!("{{{ns}}}{}", tag.name()),
        _ => tag.name().to_string(),
    };
    let mut e = Elem::new(&name);
    for a in n.attributes() {
        let an = match a.namespace() {
            Some(ns) if !ns.is_empty() => format!("{{{ns}}}{}", a.name()),
            _ => a.name().to_string(),
        };
        e.attrs.push((an, a.value().to_string()));
    }
    for c in n.children() {
        if c.is_element() {
            e.children.push(Node::Elem(convert(c)));
        } else if c.is_text() {
            let t = c.text().unwrap_or("");
            if !t.trim().is_empty() {
                e.children.push(Node::Text(t.to_string()));
            }
        }
    }
    e
}

/// A writable disk of the VM, as the XML names it.
#[derive(Debug, Clone, PartialEq)]
pub struct XmlDisk {
    /// `<target dev=...>` (vda): what virsh's disk commands take.
    pub target: String,
    pub file: PathBuf,
    /// `<driver type=...>`: raw or qcow2.
    pub format: String,
}

/// What the allow-list learned of a domain.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub name: String,
    pub uuid: String,
    pub memory_bytes: u64,
    pub disks: Vec<XmlDisk>,
    pub nics: usize,
    pub emulator: PathBuf,
}

fn refuse(what: &str, why: &str) -> String {
    format!("{what}: {why}; coldclone refuses VMs whose domain XML it does not fully understand")
}

/// `<memory unit=..>N</memory>` in bytes.
fn memory_bytes(e: &Elem) -> Result<u64, String> {
    let n: u64 = e
        .text()
        .parse()
        .map_err(|_| refuse("<memory>", "not a number"))?;
    let mult: u64 = match e.attr("unit").unwrap_or("KiB") {
        "b" | "bytes" => 1,
        "KiB" | "k" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "TiB" | "T" => 1 << 40,
        "KB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => return Err(refuse("<memory>", &format!("unit {other:?} is not known"))),
    };
    n.checked_mul(mult)
        .ok_or_else(|| refuse("<memory>", "too large"))
}

/// Top-level children of `<domain>`: kept as they are (guest-visible, or
/// harmless), or dropped from the clone (host-side only).
const DOMAIN_KEEP: &[&str] = &[
    "name",
    "uuid",
    "genid",
    "title",
    "description",
    "memory",
    "currentMemory",
    "vcpu",
    "os",
    "features",
    "cpu",
    "clock",
    "on_poweroff",
    "on_reboot",
    "on_crash",
    "pm",
    "sysinfo",
    "devices",
];
const DOMAIN_DROP: &[&str] = &["metadata", "resource", "seclabel", "cputune", "iothreads"];

/// Devices whose whole element is kept for the clone (guest-visible, no host
/// resource behind them that the clone could share with the original).
const DEVICES_KEEP: &[&str] = &[
    "controller",
    "input",
    "video",
    "memballoon",
    "watchdog",
    "panic",
    "hub",
    "iommu",
    "sound",
];

/// Checks a domain XML against the allow-list; the first element not
/// understood is named in the error.
pub fn check(dom: &Elem) -> Result<Checked, String> {
    if dom.name != "domain" {
        return Err(refuse(&format!("<{}>", dom.name), "not a <domain>"));
    }
    match dom.attr("type") {
        Some("kvm" | "qemu") => {}
        other => {
            return Err(refuse(
                "<domain type>",
                &format!("{other:?} is not a QEMU domain (kvm or qemu)"),
            ))
        }
    }
    for (k, _) in &dom.attrs {
        if k != "type" && k != "id" {
            return Err(refuse(
                &format!("<domain {k}=...>"),
                "attribute not understood",
            ));
        }
    }
    for e in dom.elems() {
        let n = e.name.as_str();
        if !DOMAIN_KEEP.contains(&n) && !DOMAIN_DROP.contains(&n) {
            return Err(refuse(&format!("<{n}>"), "element not understood"));
        }
    }
    let name = dom
        .child("name")
        .map(Elem::text)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| refuse("<name>", "missing"))?;
    let uuid = dom
        .child("uuid")
        .map(Elem::text)
        .ok_or_else(|| refuse("<uuid>", "missing"))?;
    if uuid.len() != 36 || !uuid.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Err(refuse("<uuid>", &format!("{uuid:?} is not a UUID")));
    }
    let memory_bytes = memory_bytes(
        dom.child("currentMemory")
            .or_else(|| dom.child("memory"))
            .ok_or_else(|| refuse("<memory>", "missing"))?,
    )?;
    if let Some(os) = dom.child("os") {
        for e in os.elems() {
            match e.name.as_str() {
                "type" | "kernel" | "initrd" | "cmdline" | "boot" | "bootmenu" | "smbios"
                | "bios" | "dtb" => {}
                // A read-only firmware image is fine; its writable variable store is per VM.
                "loader" if e.attr("readonly") != Some("no") => {}
                "nvram" => return Err(refuse(
                    "<os><nvram>",
                    "the UEFI variable store is the original's writable file; not supported yet",
                )),
                other => return Err(refuse(&format!("<os><{other}>"), "element not understood")),
            }
        }
    }
    let devices = dom
        .child("devices")
        .ok_or_else(|| refuse("<devices>", "missing"))?;
    let mut disks = Vec::new();
    let mut nics = 0;
    let mut emulator = None;
    for d in devices.elems() {
        let what = format!("<devices><{}>", d.name);
        match d.name.as_str() {
            "emulator" => {
                let p = PathBuf::from(d.text());
                if !crate::util::is_qemu_binary(&p) {
                    return Err(refuse(
                        &what,
                        &format!("{} is not a qemu-system emulator", p.display()),
                    ));
                }
                emulator = Some(p);
            }
            "disk" => {
                if let Some(disk) = check_disk(d)? {
                    disks.push(disk);
                }
            }
            "interface" => {
                check_interface(d)?;
                nics += 1;
            }
            "serial" | "console" => {
                for c in d.elems() {
                    if !matches!(
                        c.name.as_str(),
                        "source" | "target" | "alias" | "address" | "log" | "protocol"
                    ) {
                        return Err(refuse(
                            &format!("{what}<{}>", c.name),
                            "element not understood",
                        ));
                    }
                }
            }
            "channel" => {
                let target = d.child("target");
                let ttype = target.and_then(|t| t.attr("type")).unwrap_or("");
                if ttype != "virtio" {
                    return Err(refuse(
                        &format!("{what}<target type={ttype:?}>"),
                        "only virtio channels are understood (a guestfwd channel reaches host sockets)",
                    ));
                }
                if !matches!(d.attr("type"), Some("unix" | "pty" | "null")) {
                    return Err(refuse(
                        &format!("{what} type={:?}", d.attr("type").unwrap_or("")),
                        "only unix, pty or null channels are understood",
                    ));
                }
            }
            "graphics" => match d.attr("type") {
                Some("vnc" | "spice" | "egl-headless") => {}
                other => return Err(refuse(&format!("{what} type={other:?}"), "not understood")),
            },
            "audio" => {}
            "rng" => {
                let backend = d.child("backend").and_then(|b| b.attr("model"));
                if backend != Some("random") {
                    return Err(refuse(
                        &format!("{what}<backend model={backend:?}>"),
                        "only the random (host /dev/urandom) backend is understood",
                    ));
                }
            }
            "input" => {
                if matches!(d.attr("type"), Some("passthrough" | "evdev")) {
                    return Err(refuse(&what, "a host input device passed through"));
                }
            }
            n if DEVICES_KEEP.contains(&n) => {}
            n if n.starts_with('{') => {
                return Err(refuse(&what, "element in a foreign namespace"));
            }
            _ => return Err(refuse(&what, "device not understood")),
        }
    }
    let emulator = emulator.ok_or_else(|| refuse("<devices><emulator>", "missing"))?;
    if disks.is_empty() {
        return Err(refuse("<devices><disk>", "the VM has no writable disk"));
    }
    Ok(Checked {
        name,
        uuid,
        memory_bytes,
        disks,
        nics,
        emulator,
    })
}

const DISK_CHILDREN: &[&str] = &[
    "driver",
    "source",
    "backingStore",
    "target",
    "alias",
    "address",
    "readonly",
    "serial",
    "boot",
    "wwn",
    "vendor",
    "product",
    "blockio",
    "iotune",
    "geometry",
];

/// A disk: `Some` for a writable one (snapshotted), `None` for a read-only one.
fn check_disk(d: &Elem) -> Result<Option<XmlDisk>, String> {
    let target = d
        .child("target")
        .and_then(|t| t.attr("dev"))
        .unwrap_or("")
        .to_string();
    let what = format!("<disk> {target}");
    if target.is_empty() || !target.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(refuse(&what, "no plain <target dev>"));
    }
    for c in d.elems() {
        if !DISK_CHILDREN.contains(&c.name.as_str()) {
            return Err(refuse(
                &format!("{what} <{}>", c.name),
                "element not understood",
            ));
        }
    }
    let readonly = d.child("readonly").is_some();
    let device = d.attr("device").unwrap_or("disk");
    if readonly || device == "cdrom" {
        // Read-only media are shared as they are; the clone cannot write them.
        if let Some(t) = d.attr("type").filter(|t| *t != "file" && *t != "block") {
            return Err(refuse(&what, &format!("read-only disk of type {t:?}")));
        }
        return Ok(None);
    }
    if device != "disk" {
        return Err(refuse(
            &what,
            &format!("device={device:?} is not understood"),
        ));
    }
    if d.attr("type") != Some("file") {
        return Err(refuse(
            &what,
            &format!(
                "disk type {:?}: only file-backed disks are supported yet",
                d.attr("type").unwrap_or("")
            ),
        ));
    }
    let file = d
        .child("source")
        .and_then(|s| s.attr("file"))
        .ok_or_else(|| refuse(&what, "no <source file>"))?;
    let file = PathBuf::from(file);
    if !file.is_absolute() {
        return Err(refuse(&what, "the source file is not an absolute path"));
    }
    if file.to_string_lossy().contains(".coldclone-") {
        return Err(refuse(
            &what,
            &format!(
                "it runs on {}, an overlay of an earlier coldclone run; run `coldclone recover`",
                file.display()
            ),
        ));
    }
    let format = d
        .child("driver")
        .and_then(|dr| dr.attr("type"))
        .unwrap_or("raw")
        .to_string();
    if format != "raw" && format != "qcow2" {
        return Err(refuse(
            &what,
            &format!("format {format:?} (raw or qcow2 only)"),
        ));
    }
    if d.child("source")
        .is_some_and(|s| s.elems().next().is_some())
    {
        return Err(refuse(
            &format!("{what} <source>"),
            "child elements (seclabel, reservations...) are not understood",
        ));
    }
    if d.child("backingStore")
        .is_some_and(|b| b.elems().next().is_some())
    {
        return Err(refuse(
            &format!("{what} <backingStore>"),
            "the disk already has a backing chain libvirt tracks (an earlier snapshot?)",
        ));
    }
    Ok(Some(XmlDisk {
        target,
        file,
        format,
    }))
}

const NIC_KEEP: &[&str] = &[
    "mac", "model", "address", "alias", "driver", "mtu", "link", "boot", "rom", "acpi",
];
const NIC_DROP: &[&str] = &[
    "source",
    "target",
    "filterref",
    "bandwidth",
    "virtualport",
    "vlan",
    "ip",
    "route",
    "backend",
    "tune",
    "script",
    "downscript",
    "coalesce",
];

fn check_interface(d: &Elem) -> Result<(), String> {
    let t = d.attr("type").unwrap_or("");
    if !matches!(t, "network" | "bridge" | "ethernet" | "user" | "direct") {
        return Err(refuse(
            &format!("<interface type={t:?}>"),
            "only network, bridge, ethernet, user and direct interfaces are understood",
        ));
    }
    for c in d.elems() {
        let n = c.name.as_str();
        if !NIC_KEEP.contains(&n) && !NIC_DROP.contains(&n) {
            return Err(refuse(
                &format!("<interface><{n}>"),
                "element not understood",
            ));
        }
    }
    Ok(())
}

/// Elements that hold credentials or name them: a disk's or iSCSI host device's
/// `<auth>` (user name and the libvirt secret it logs in with), `<secret>` (an
/// encryption's or auth's key, by usage or UUID).
const SECRET_ELEMENTS: &[&str] = &["auth", "secret"];
/// Attributes that hold a credential, or the time one expires: `<graphics passwd>`
/// (VNC, SPICE), `<tpm><encryption secret>`.
const SECRET_ATTRS: &[&str] = &["passwd", "passwdValidTo", "password", "secret"];
/// Children of `<launchSecurity>` (AMD SEV) that carry session keys.
const LAUNCH_SECRETS: &[&str] = &["dhCert", "session"];

/// The domain's XML as it is kept with a backup: as libvirt wrote it, byte for
/// byte, less every credential (libvirt leaves graphics passwords out unless
/// asked with `--security-info`, which coldclone never passes; this takes out
/// what is left, and the rest should that ever change). Cut from the text rather
/// than rewritten, so namespaced metadata and comments stay as they were.
pub fn without_secrets(text: &str) -> Result<String, String> {
    let doc = roxmltree::Document::parse(text).map_err(|e| format!("not XML: {e}"))?;
    let mut cuts: Vec<std::ops::Range<usize>> = Vec::new();
    for n in doc.descendants().filter(roxmltree::Node::is_element) {
        let name = n.tag_name().name();
        let in_launch = n
            .parent_element()
            .is_some_and(|p| p.tag_name().name() == "launchSecurity");
        if SECRET_ELEMENTS.contains(&name) || (in_launch && LAUNCH_SECRETS.contains(&name)) {
            cuts.push(n.range());
            continue;
        }
        for a in n.attributes() {
            if SECRET_ATTRS.contains(&a.name()) {
                let r = a.range();
                // With the blank before it.
                let start = text[..r.start].trim_end().len();
                cuts.push(start..r.end);
            }
        }
    }
    cuts.sort_by_key(|r| r.start);
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for r in cuts {
        if r.start < at {
            continue; // inside an element already cut
        }
        out.push_str(&text[at..r.start]);
        at = r.end;
    }
    out.push_str(&text[at..]);
    // Check, not trust: what is kept parses, and nothing secret is left in it.
    let kept =
        roxmltree::Document::parse(&out).map_err(|e| format!("after removing secrets: {e}"))?;
    for n in kept.descendants().filter(roxmltree::Node::is_element) {
        let secret_attr = n.attributes().any(|a| SECRET_ATTRS.contains(&a.name()));
        if SECRET_ELEMENTS.contains(&n.tag_name().name()) || secret_attr {
            return Err(format!("<{}> still holds a secret", n.tag_name().name()));
        }
    }
    Ok(out)
}

/// Whether the domain has a QEMU guest agent channel.
pub fn has_agent_channel(dom: &Elem) -> bool {
    dom.child("devices").is_some_and(|d| {
        d.elems().any(|c| {
            c.name == "channel"
                && c.child("target").and_then(|t| t.attr("name")) == Some("org.qemu.guest_agent.0")
        })
    })
}

/// Where the clone's parts go.
#[derive(Debug, Clone)]
pub struct CloneParts<'a> {
    /// Disk target → the clone's overlay (qcow2 over the frozen image).
    pub overlays: &'a [(String, PathBuf, PathBuf, String)],
    pub bridge: &'a str,
    pub taps: &'a [String],
    pub console_log: &'a Path,
    /// The folder for the clone's own channel sockets (agent, others).
    pub channel_dir: &'a Path,
}

/// The clone's domain XML from the save image's: same name and UUID (libvirt
/// restores a memory image only into its own domain; the embedded driver the
/// clone runs in holds nothing else), every writable disk on its overlay,
/// every NIC on the isolated bridge, no graphics, consoles to a file,
/// channels on the clone's own sockets, and no host-side extras.
pub fn derive_clone(saved: &Elem, parts: &CloneParts) -> Result<Elem, String> {
    let checked = check(saved)?;
    let mut dom = saved.clone();
    dom.attrs.retain(|(k, _)| k == "type");
    for n in DOMAIN_DROP {
        dom.remove(n);
    }
    // A clone that powers off (or reboots: libvirt's QEMU driver has no
    // `preserve` for either) goes; one that crashes with a panic device stays
    // for the stop step to see.
    dom.set_child_text("on_poweroff", "destroy");
    dom.set_child_text("on_reboot", "destroy");
    dom.set_child_text("on_crash", "preserve");
    for (target, _, _, _) in parts.overlays {
        if !checked.disks.iter().any(|d| &d.target == target) {
            return Err(format!(
                "the memory image's domain has no writable disk {target}: it is not this VM's"
            ));
        }
    }
    if checked.disks.len() != parts.overlays.len() {
        return Err(format!(
            "the memory image's domain has {} writable disks, the checkpoint {}",
            checked.disks.len(),
            parts.overlays.len()
        ));
    }
    let devices = dom
        .child_mut("devices")
        .ok_or_else(|| "no <devices>".to_string())?;
    let mut nic = 0usize;
    let mut serial = 0usize;
    let mut channel = 0usize;
    let mut out = Vec::new();
    for node in std::mem::take(&mut devices.children) {
        let Node::Elem(mut d) = node else { continue };
        match d.name.as_str() {
            "graphics" => continue,
            "disk" => {
                let target = d
                    .child("target")
                    .and_then(|t| t.attr("dev"))
                    .unwrap_or("")
                    .to_string();
                if let Some((_, overlay, frozen, fmt)) =
                    parts.overlays.iter().find(|(t, ..)| *t == target)
                {
                    d.set_attr("type", "file");
                    d.remove("source");
                    d.remove("backingStore");
                    let driver = d.child_mut("driver");
                    match driver {
                        Some(dr) => dr.set_attr("type", "qcow2"),
                        None => d.children.push(Node::Elem(
                            Elem::new("driver")
                                .with_attr("name", "qemu")
                                .with_attr("type", "qcow2"),
                        )),
                    }
                    d.children.push(Node::Elem(
                        Elem::new("source").with_attr("file", &overlay.display().to_string()),
                    ));
                    d.children.push(Node::Elem(
                        Elem::new("backingStore")
                            .with_attr("type", "file")
                            .with_child(Elem::new("format").with_attr("type", fmt))
                            .with_child(
                                Elem::new("source")
                                    .with_attr("file", &frozen.display().to_string()),
                            )
                            .with_child(Elem::new("backingStore")),
                    ));
                } else if let Some(s) = d.child_mut("source") {
                    s.children.clear();
                }
            }
            "interface" => {
                let tap = parts
                    .taps
                    .get(nic)
                    .ok_or_else(|| "fewer taps than interfaces".to_string())?;
                nic += 1;
                d.set_attr("type", "bridge");
                d.children.retain(|n| match n {
                    Node::Elem(e) => NIC_KEEP.contains(&e.name.as_str()),
                    Node::Text(_) => false,
                });
                d.children.push(Node::Elem(
                    Elem::new("source").with_attr("bridge", parts.bridge),
                ));
                d.children
                    .push(Node::Elem(Elem::new("target").with_attr("dev", tap)));
            }
            "serial" | "console" => {
                let first = d.name == "serial" && serial == 0
                    || d.name == "console"
                        && d.child("target").and_then(|t| t.attr("type")) != Some("virtio");
                if d.name == "serial" {
                    serial += 1;
                }
                d.children.retain(|n| {
                    matches!(n, Node::Elem(e) if matches!(e.name.as_str(), "target" | "alias" | "address"))
                });
                if first {
                    d.set_attr("type", "file");
                    d.children.insert(
                        0,
                        Node::Elem(
                            Elem::new("source")
                                .with_attr("path", &parts.console_log.display().to_string()),
                        ),
                    );
                } else {
                    d.set_attr("type", "null");
                }
                d.attrs.retain(|(k, _)| k == "type");
            }
            "channel" => {
                let sock = parts.channel_dir.join(format!("channel{channel}.sock"));
                channel += 1;
                d.set_attr("type", "unix");
                d.children.retain(|n| {
                    matches!(n, Node::Elem(e) if matches!(e.name.as_str(), "target" | "alias" | "address"))
                });
                d.children.insert(
                    0,
                    Node::Elem(
                        Elem::new("source")
                            .with_attr("mode", "bind")
                            .with_attr("path", &sock.display().to_string()),
                    ),
                );
                if let Some(t) = d.child_mut("target") {
                    t.attrs.retain(|(k, _)| k == "type" || k == "name");
                }
            }
            "audio" => {
                let id = d.attr("id").unwrap_or("1").to_string();
                d = Elem::new("audio")
                    .with_attr("id", &id)
                    .with_attr("type", "none");
            }
            _ => {}
        }
        out.push(Node::Elem(d));
    }
    if nic != parts.taps.len() {
        return Err(format!(
            "the memory image's domain has {nic} interfaces, the VM {}",
            parts.taps.len()
        ));
    }
    devices.children = out;
    Ok(dom)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVE: &str = r#"<domain type='qemu' id='1'>
  <name>web1</name>
  <uuid>3f7a2e90-ad8d-448f-b6d6-0df71b3d64ae</uuid>
  <memory unit='KiB'>262144</memory>
  <currentMemory unit='KiB'>262144</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <resource><partition>/machine</partition></resource>
  <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type><kernel>/k</kernel><boot dev='hd'/></os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/vm/web1.qcow2' index='1'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>
    </disk>
    <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='hdc' bus='ide'/><readonly/></disk>
    <controller type='usb' index='0' model='piix3-uhci'/>
    <interface type='network'>
      <mac address='52:54:00:11:22:33'/>
      <source network='default' bridge='virbr0'/>
      <target dev='vnet0'/>
      <model type='virtio'/>
      <filterref filter='clean-traffic'/>
    </interface>
    <serial type='pty'><source path='/dev/pts/3'/><target type='isa-serial' port='0'><model name='isa-serial'/></target></serial>
    <console type='pty' tty='/dev/pts/3'><source path='/dev/pts/3'/><target type='serial' port='0'/></console>
    <channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-1-web1/org.qemu.guest_agent.0'/><target type='virtio' name='org.qemu.guest_agent.0' state='connected'/></channel>
    <input type='mouse' bus='ps2'/>
    <graphics type='vnc' port='5900' autoport='yes' listen='0.0.0.0'><listen type='address' address='0.0.0.0'/></graphics>
    <audio id='1' type='none'/>
    <video><model type='cirrus' vram='16384' heads='1' primary='yes'/></video>
    <memballoon model='virtio'/>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'><label>+64055:+64055</label></seclabel>
</domain>"#;

    #[test]
    fn a_plain_domain_is_understood() {
        let c = check(&parse(LIVE).unwrap()).unwrap();
        assert_eq!(c.name, "web1");
        assert_eq!(c.memory_bytes, 256 << 20);
        assert_eq!(c.nics, 1);
        assert_eq!(
            c.disks,
            vec![XmlDisk {
                target: "vda".into(),
                file: "/vm/web1.qcow2".into(),
                format: "qcow2".into()
            }]
        );
    }

    #[test]
    fn what_is_not_understood_is_named() {
        let cases = [
            ("<hostdev mode='subsystem' type='pci'/>", "<devices><hostdev>"),
            ("<filesystem type='mount'><source dir='/'/><target dir='x'/></filesystem>", "<devices><filesystem>"),
            ("<channel type='unix'><target type='guestfwd' address='10.0.2.1' port='80'/></channel>", "guestfwd"),
            ("<rng model='virtio'><backend model='egd' type='tcp'/></rng>", "egd"),
            ("<interface type='vhostuser'><mac address='52:54:00:00:00:01'/></interface>", "vhostuser"),
            ("<interface type='bridge'><teaming type='persistent'/></interface>", "<interface><teaming>"),
            ("<disk type='network' device='disk'><source protocol='rbd' name='p/x'/><target dev='vdb'/></disk>", "vdb"),
            ("<disk type='file' device='disk'><driver type='vmdk'/><source file='/a'/><target dev='vdc'/></disk>", "vmdk"),
            ("<vsock model='virtio'><cid auto='yes'/></vsock>", "<devices><vsock>"),
            ("<tpm model='tpm-crb'/>", "<devices><tpm>"),
        ];
        for (dev, want) in cases {
            let xml = LIVE.replace("<memballoon", &format!("{dev}<memballoon"));
            let e = check(&parse(&xml).unwrap()).unwrap_err();
            assert!(e.contains(want), "{dev}: {e}");
        }
        let xml = LIVE.replace(
            "</devices>",
            "</devices><qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><qemu:arg value='-s'/></qemu:commandline>",
        );
        let e = check(&parse(&xml).unwrap()).unwrap_err();
        assert!(e.contains("commandline"), "{e}");
        let xml = LIVE.replace(
            "<os>",
            "<os><nvram>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>",
        );
        assert!(check(&parse(&xml).unwrap()).unwrap_err().contains("nvram"));
        let xml = LIVE.replace("/vm/web1.qcow2", "/vm/.web1.qcow2.coldclone-ab.qcow2");
        assert!(check(&parse(&xml).unwrap())
            .unwrap_err()
            .contains("recover"));
        let xml = LIVE.replace("/usr/bin/qemu-system-x86_64", "/bin/sh");
        assert!(check(&parse(&xml).unwrap())
            .unwrap_err()
            .contains("emulator"));
    }

    #[test]
    fn the_clone_is_on_its_overlay_its_bridge_and_nothing_of_the_host() {
        let saved = parse(LIVE).unwrap();
        let overlays = vec![(
            "vda".to_string(),
            PathBuf::from("/state/runs/r/clone-vda.qcow2"),
            PathBuf::from("/vm/web1.qcow2"),
            "qcow2".to_string(),
        )];
        let taps = vec!["ccr1t0".to_string()];
        let parts = CloneParts {
            overlays: &overlays,
            bridge: "ccbrr1",
            taps: &taps,
            console_log: Path::new("/state/runs/r/clone-console.log"),
            channel_dir: Path::new("/state/runs/r"),
        };
        let clone = derive_clone(&saved, &parts).unwrap();
        let xml = clone.to_xml();
        // The result reads back as XML.
        let again = parse(&xml).unwrap();
        assert_eq!(
            again.child("uuid").map(Elem::text).as_deref(),
            Some("3f7a2e90-ad8d-448f-b6d6-0df71b3d64ae")
        );
        assert!(
            xml.contains("<source file='/state/runs/r/clone-vda.qcow2'/>"),
            "{xml}"
        );
        for gone in [
            "graphics",
            "0.0.0.0",
            "seclabel",
            "virbr0",
            "default",
            "vnet0",
            "filterref",
            "/dev/pts",
            "/var/lib/libvirt",
            "resource",
        ] {
            assert!(!xml.contains(gone), "{gone} is still in {xml}");
        }
        for here in [
            "<source bridge='ccbrr1'/>",
            "<target dev='ccr1t0'/>",
            "<mac address='52:54:00:11:22:33'/>",
            "<source path='/state/runs/r/clone-console.log'/>",
            "/state/runs/r/channel0.sock",
            "<source file='/vm/web1.qcow2'/>",
            "<source file='/iso/x.iso'/>",
            "<on_reboot>destroy</on_reboot>",
            "<on_crash>preserve</on_crash>",
        ] {
            assert!(xml.contains(here), "{here} is missing in {xml}");
        }
        // A memory image of another VM's shape is refused.
        let taps2: Vec<String> = vec![];
        let e = derive_clone(
            &saved,
            &CloneParts {
                taps: &taps2,
                ..parts.clone()
            },
        )
        .unwrap_err();
        assert!(e.contains("taps"), "{e}");
    }

    #[test]
    fn the_kept_definition_holds_no_secret() {
        let xml = LIVE
            .replace(
                "<graphics type='vnc' port='5900'",
                "<graphics type='vnc' passwd='hunter2' passwdValidTo='2030-01-01T00:00:00' port='5900'",
            )
            .replace(
                "<memballoon",
                "<disk type='network' device='disk'><source protocol='iscsi' name='iqn.2013-07.com.example:iscsi-pool/1'><host name='example.com' port='3260'/><auth username='myuser'><secret type='iscsi' usage='libvirtiscsi'/></auth></source><target dev='vdb'/><encryption format='luks'><secret type='passphrase' uuid='0a81f5b2-8403-7b23-c8d6-21ccc2f80d6f'/></encryption></disk>\n    <tpm model='tpm-crb'><backend type='emulator'><encryption secret='6dd3e4a5-1d76-44ce-961f-f119f5aad935'/></backend></tpm>\n    <memballoon",
            )
            .replace(
                "</domain>",
                "<launchSecurity type='sev'><policy>0x0003</policy><dhCert>RBBBSDDD=</dhCert><session>ZZZZZZ=</session></launchSecurity>\n  <metadata><libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'><libosinfo:os id='http://debian.org/debian/12'/></libosinfo:libosinfo></metadata>\n</domain>",
            );
        let kept = without_secrets(&xml).unwrap();
        for gone in [
            "hunter2",
            "passwd",
            "myuser",
            "libvirtiscsi",
            "0a81f5b2",
            "6dd3e4a5",
            "RBBBSDDD",
            "ZZZZZZ",
            "<auth",
        ] {
            assert!(!kept.contains(gone), "{gone} is kept: {kept}");
        }
        // Everything else as libvirt wrote it, namespaced metadata included.
        for here in [
            "<graphics type='vnc' port='5900' autoport='yes' listen='0.0.0.0'>",
            "<host name='example.com' port='3260'/>",
            "<encryption format='luks'>",
            "<policy>0x0003</policy>",
            "<libosinfo:os id='http://debian.org/debian/12'/>",
            "<source file='/vm/web1.qcow2' index='1'/>",
        ] {
            assert!(kept.contains(here), "{here} is lost: {kept}");
        }
        assert_eq!(without_secrets(LIVE).unwrap(), LIVE);
        assert!(without_secrets("<domain").is_err());
    }
}
