//! The xl.cfg of a domain made again from a backup (`coldclone restore VM --as NEW
//! --vg VG`), derived from the `xl list -l` JSON kept with the backup (libxl's
//! `libxl_domain_config`, field names from tools/libs/light/libxl_types.idl).
//!
//! An allow-list, not a copy: what the kept JSON says is written only where it is one
//! of the settings below and its value has the shape xl.cfg(5) gives it; anything
//! else (passed-through devices, device-model overrides, scripts, stubdomains, the
//! original's uuid, its vfb and its VNC password) is left out, and the left-out
//! settings that matter are named in the notes. Written:
//! - `name` (the new one), no `uuid` (xl makes a fresh one);
//! - `type` (pv, pvh, hvm), `memory`/`maxmem` (c_info/b_info target_memkb, max_memkb),
//!   `vcpus`/`maxvcpus` (avail_vcpus, max_vcpus);
//! - PV/PVH boot: `kernel`, `ramdisk`, `cmdline` (b_info, or b_info.type.pv before
//!   Xen 4.10), or `bootloader` (pygrub) with `bootloader_args`;
//! - HVM: `boot`, `acpi`, `apic`, `pae`, `hpet`, `viridian`, `xen_platform_pci`,
//!   `serial = "pty"`, `vnc = 0`;
//! - one disk per disk of the backup, `target=` the new LV, its vdev and access as the
//!   original had them; CD-ROMs and disks not in the backup are left out (noted);
//! - vifs with new MACs (Xen's OUI 00:16:3e), on the bridge the user named with
//!   `script=vif-bridge`; no bridge named: no vif at all (xl would put a vif without
//!   `bridge=` on its default bridge), the lines written commented out, ready;
//! - `on_poweroff`/`on_reboot`/`on_crash` as the original had them, if one of xl's
//!   actions.

use crate::{BackendError, Result};
use serde_json::Value;

/// What the new domain is made of.
pub struct RestoreSpec<'a> {
    pub name: &'a str,
    /// The kept `xl list -l` JSON (one domain: the object, or an array of one).
    pub original: &'a Value,
    /// vdev → the new LV's path, for each disk in the backup.
    pub disks: &'a [(String, String)],
    /// The bridge for the vifs; `None`: no vif.
    pub bridge: Option<&'a str>,
    /// One new MAC per vif of the original, in order.
    pub macs: &'a [String],
}

/// The derived config and what the user should know about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Derived {
    pub text: String,
    pub notes: Vec<String>,
    /// The vifs written (or commented out): (new MAC, bridge).
    pub vifs: Vec<String>,
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn text<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_str().filter(|s| !s.is_empty())
}

/// The domain's `config` object.
fn config(original: &Value) -> Result<&Value> {
    let one = match original {
        Value::Array(a) if a.len() == 1 => &a[0],
        Value::Array(a) => {
            return Err(BackendError::Unsupported(format!(
                "the kept xl definition lists {} domains, not one",
                a.len()
            )))
        }
        v => v,
    };
    one.get("config")
        .filter(|c| c.is_object())
        .ok_or_else(|| BackendError::Unsupported("the kept xl definition has no config".into()))
}

/// A path xl may be given: absolute, printable, no quote or separator xl.cfg parses.
fn plain_path(p: &str) -> bool {
    p.starts_with('/')
        && p.len() < 4096
        && !p.chars().any(|c| c.is_control() || "\"',=[]".contains(c))
}

/// A vdev: xvd*, hd*, sd* with letters, or a number (xl-disk-configuration(5)).
fn plain_vdev(v: &str) -> bool {
    let letters =
        |s: &str| !s.is_empty() && s.len() <= 4 && s.bytes().all(|b| b.is_ascii_lowercase());
    (["xvd", "hd", "sd"]
        .iter()
        .any(|p| v.strip_prefix(p).is_some_and(letters)))
        || (!v.is_empty() && v.len() <= 6 && v.bytes().all(|b| b.is_ascii_digit()))
}

/// libxl's action names (libxl_types.idl `libxl_action_on_shutdown`, lower-cased in
/// its JSON) as xl.cfg(5) spells them.
fn action(a: &str) -> Option<&'static str> {
    Some(match a {
        "destroy" => "destroy",
        "restart" => "restart",
        "restart_rename" => "rename-restart",
        "preserve" => "preserve",
        "coredump_destroy" => "coredump-destroy",
        "coredump_restart" => "coredump-restart",
        "soft_reset" => "soft-reset",
        _ => return None,
    })
}

/// libxl_defbool in JSON: "True"/"False" ("<default>" when unset).
fn defbool(v: Option<&Value>) -> Option<&'static str> {
    match v.and_then(Value::as_str) {
        Some("True") => Some("1"),
        Some("False") => Some("0"),
        _ => None,
    }
}

pub fn derive(spec: &RestoreSpec) -> Result<Derived> {
    let c = config(spec.original)?;
    let b = c
        .get("b_info")
        .filter(|b| b.is_object())
        .ok_or_else(|| BackendError::Unsupported("the kept xl definition has no b_info".into()))?;
    let mut notes = Vec::new();
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k} = {v}\n"));
    line("name", quote(spec.name));
    let ty = text(c, &["c_info", "type"]).unwrap_or("pv");
    if !["pv", "pvh", "hvm"].contains(&ty) {
        return Err(BackendError::Unsupported(format!(
            "the kept xl definition is of a {ty:?} domain; coldclone makes pv, pvh and hvm"
        )));
    }
    line("type", quote(ty));
    let kib = |k: &str| b.get(k).and_then(Value::as_u64).filter(|n| *n > 0);
    let target = kib("target_memkb").or(kib("max_memkb")).ok_or_else(|| {
        BackendError::Unsupported("the kept xl definition has no memory size".into())
    })?;
    let max = kib("max_memkb").unwrap_or(target).max(target);
    line("memory", target.div_ceil(1024).to_string());
    line("maxmem", max.div_ceil(1024).to_string());
    let max_vcpus = b
        .get("max_vcpus")
        .and_then(Value::as_u64)
        .filter(|n| (1..=512).contains(n))
        .unwrap_or(1);
    let avail = b
        .get("avail_vcpus")
        .and_then(Value::as_array)
        .map(|a| a.len() as u64)
        .filter(|n| (1..=max_vcpus).contains(n))
        .unwrap_or(max_vcpus);
    line("vcpus", avail.to_string());
    line("maxvcpus", max_vcpus.to_string());
    let sub = format!("type.{ty}");
    let boot_text = |key: &str| text(b, &[key]).or_else(|| text(b, &[&sub, key]));
    if ty != "hvm" {
        let bootloader = boot_text("bootloader");
        let kernel = boot_text("kernel");
        match (kernel, bootloader) {
            (Some(k), _) => {
                for (key, v) in [("kernel", Some(k)), ("ramdisk", boot_text("ramdisk"))] {
                    if let Some(v) = v {
                        if !plain_path(v) {
                            return Err(BackendError::Unsupported(format!(
                                "the kept {key} {v:?} is not a plain absolute path"
                            )));
                        }
                        line(key, quote(v));
                    }
                }
                if let Some(cmd) = boot_text("cmdline") {
                    line("cmdline", quote(cmd));
                }
            }
            (None, Some(bl)) => {
                if !plain_path(bl) && bl != "pygrub" {
                    return Err(BackendError::Unsupported(format!(
                        "the kept bootloader {bl:?} is not pygrub or a plain absolute path"
                    )));
                }
                line("bootloader", quote(bl));
                let args: Vec<String> = b
                    .get("bootloader_args")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_str).map(quote).collect())
                    .unwrap_or_default();
                if !args.is_empty() {
                    line("bootloader_args", format!("[ {} ]", args.join(", ")));
                }
            }
            (None, None) if ty == "pv" => {
                return Err(BackendError::Unsupported(
                    "the kept PV domain names neither a kernel nor a bootloader: it cannot boot"
                        .into(),
                ))
            }
            (None, None) => {}
        }
    } else {
        let h = b.get("type.hvm").cloned().unwrap_or(Value::Null);
        if let Some(boot) = text(&h, &["boot"]) {
            if boot.len() <= 8 && boot.bytes().all(|c| b"acdn".contains(&c)) {
                line("boot", quote(boot));
            }
        }
        // Direct kernel boot of an HVM guest (as the lab's h1 does).
        if let Some(k) = text(b, &["kernel"]).filter(|k| plain_path(k)) {
            line("kernel", quote(k));
            if let Some(r) = text(b, &["ramdisk"]).filter(|r| plain_path(r)) {
                line("ramdisk", quote(r));
            }
            if let Some(cmd) = text(b, &["cmdline"]) {
                line("cmdline", quote(cmd));
            }
        }
        if let Some(v) = defbool(h.get("xen_platform_pci")) {
            line("xen_platform_pci", v.into());
        }
        for key in ["acpi", "apic", "pae", "hpet", "viridian"] {
            if let Some(v) = defbool(h.get(key)).or_else(|| defbool(b.get(key))) {
                line(key, v.into());
            }
        }
        line("serial", quote("pty"));
        line("vnc", "0".into());
        line("sdl", "0".into());
    }
    // Disks: the backup's, on their new LVs.
    let mut disk_specs = Vec::new();
    for d in c
        .get("disks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let vdev = text(d, &["vdev"]).unwrap_or_default();
        let cdrom = d.get("is_cdrom").and_then(Value::as_i64) == Some(1);
        match spec.disks.iter().find(|(v, _)| v == vdev) {
            Some((_, lv)) if !cdrom => {
                if !plain_vdev(vdev) || !plain_path(lv) {
                    return Err(BackendError::Unsupported(format!(
                        "disk {vdev:?} on {lv:?}: not a vdev and path xl can be given"
                    )));
                }
                let rw = d.get("readwrite").and_then(Value::as_i64) != Some(0);
                disk_specs.push(quote(&format!(
                    "format=raw, vdev={vdev}, access={}, target={lv}",
                    if rw { "rw" } else { "ro" }
                )));
            }
            _ => notes.push(format!(
                "{} {vdev} is not in the backup and is left out",
                if cdrom { "the CD-ROM" } else { "disk" }
            )),
        }
    }
    for (vdev, _) in spec.disks {
        let listed = c
            .get("disks")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|d| text(d, &["vdev"]) == Some(vdev.as_str())));
        if !listed {
            return Err(BackendError::Unsupported(format!(
                "the backup holds disk {vdev}, which the kept xl definition does not list"
            )));
        }
    }
    line("disk", format!("[ {} ]", disk_specs.join(", ")));
    // vifs: new MACs; on the named bridge, or none.
    let nics: Vec<&Value> = c
        .get("nics")
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    if spec.macs.len() < nics.len() {
        return Err(BackendError::Unsupported(format!(
            "{} vifs and {} new MACs",
            nics.len(),
            spec.macs.len()
        )));
    }
    let mut vifs = Vec::new();
    for (i, nic) in nics.iter().enumerate() {
        let mut s = format!(
            "mac={}, bridge={}, script=vif-bridge",
            spec.macs[i],
            spec.bridge.unwrap_or("BRIDGE")
        );
        if ty == "hvm" {
            match text(nic, &["nictype"]) {
                Some("vif") => s.push_str(", type=vif"),
                _ => s.push_str(", type=ioemu"),
            }
            if let Some(m) = text(nic, &["model"]).filter(|m| {
                m.len() <= 16 && m.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
            }) {
                s.push_str(&format!(", model={m}"));
            }
        }
        vifs.push(quote(&s));
    }
    if let Some(br) = spec.bridge {
        if br.is_empty()
            || br.len() > 15
            || !br
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
        {
            return Err(BackendError::Unsupported(format!(
                "bridge {br:?} is not an interface name"
            )));
        }
        line("vif", format!("[ {} ]", vifs.join(", ")));
    } else {
        line("vif", "[ ]".into());
        if !vifs.is_empty() {
            out.push_str(&format!(
                "# No network: the original's vifs, with new MACs, on no bridge yet. To attach \
                 them, set BRIDGE and use this line instead:\n# vif = [ {} ]\n",
                vifs.join(", ")
            ));
            notes.push(format!(
                "no network: the original's {} vif(s) are in the config commented out, with new \
                 MACs; give --network BRIDGE, or edit the config",
                vifs.len()
            ));
        }
    }
    for k in ["on_poweroff", "on_reboot", "on_crash"] {
        if let Some(a) = c.get(k).and_then(Value::as_str).and_then(action) {
            out.push_str(&format!("{k} = {}\n", quote(a)));
        }
    }
    for (key, what) in [
        ("pcidevs", "passed-through PCI devices"),
        ("vtpms", "vTPMs"),
        ("usbdevs", "USB devices"),
        ("dtdevs", "device-tree devices"),
        ("p9s", "9p shares"),
        ("vfbs", "a graphical console"),
    ] {
        if c.get(key)
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
        {
            notes.push(format!("the original had {what} ({key}): not carried over"));
        }
    }
    let vifs_out = vifs;
    Ok(Derived {
        text: out,
        notes,
        vifs: vifs_out,
    })
}

/// A new MAC in Xen's OUI (00:16:3e, as xl makes them), from three random bytes.
pub fn new_mac() -> String {
    let h = crate::util::random_hex(3);
    format!("00:16:3e:{}:{}:{}", &h[0..2], &h[2..4], &h[4..6])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The lab's PV guest g1 in the shape of `xl list -l` (field names and value forms
    /// from tools/libs/light/libxl_types.idl: defbools as "True"/"<default>", enums
    /// lower-cased), written by hand, not captured; with a CD, a vfb whose password the
    /// kept definition removed, and a passed-through PCI device.
    fn pv_guest() -> Value {
        json!([{
            "domid": 3,
            "config": {
                "c_info": {"type": "pv", "name": "g1",
                           "uuid": "7c44e2dc-73bd-4098-a49d-224e250ae566", "run_hotplug_scripts": "True"},
                "b_info": {"max_vcpus": 2, "avail_vcpus": [0], "max_memkb": 131072,
                           "target_memkb": 98304, "video_memkb": -1, "shadow_memkb": 1536,
                           "device_model_version": "qemu_xen",
                           "sched_params": {}, "claim_mode": "<default>",
                           "kernel": "/root/domu/vmlinuz", "cmdline": "console=hvc0 quiet cc_heartbeat",
                           "ramdisk": "/root/domu/initrd.gz",
                           "type.pv": {"slack_memkb": 0}, "arch_arm": {}},
                "disks": [
                    {"pdev_path": "/dev/vg0/g1", "vdev": "xvda", "backend": "phy", "format": "raw",
                     "removable": 1, "readwrite": 1},
                    {"pdev_path": "/srv/x.iso", "vdev": "xvdc", "backend": "qdisk", "format": "raw",
                     "readwrite": 0, "is_cdrom": 1}
                ],
                "nics": [{"devid": 0, "mac": "00:16:3e:7a:00:01", "bridge": "xenbr0",
                          "script": "/etc/xen/scripts/vif-route", "nictype": "vif"}],
                "vfbs": [{"vnc": {"enable": "True", "passwd": "removed-by-coldclone"}}],
                "on_poweroff": "destroy", "on_reboot": "restart", "on_crash": "restart_rename",
                "pcidevs": [{"func": 0, "dev": 1, "bus": 0, "domain": 0, "vdevfn": 0}]
            }
        }])
    }

    #[test]
    fn a_pv_domain_gets_its_boot_memory_and_vcpus_new_disks_new_macs_and_no_network() {
        let o = pv_guest();
        let disks = vec![("xvda".to_string(), "/dev/vgr/g1r-xvda".to_string())];
        let macs = vec!["00:16:3e:01:02:03".to_string()];
        let d = derive(&RestoreSpec {
            name: "g1r",
            original: &o,
            disks: &disks,
            bridge: None,
            macs: &macs,
        })
        .unwrap();
        let t = &d.text;
        assert!(t.starts_with("name = \"g1r\"\ntype = \"pv\"\n"), "{t}");
        assert!(!t.contains("uuid") && !t.contains("7c44e2dc"), "{t}");
        assert!(
            t.contains("memory = 96\nmaxmem = 128\nvcpus = 1\nmaxvcpus = 2\n"),
            "{t}"
        );
        assert!(t.contains("kernel = \"/root/domu/vmlinuz\"\nramdisk = \"/root/domu/initrd.gz\"\ncmdline = \"console=hvc0 quiet cc_heartbeat\"\n"), "{t}");
        assert!(
            t.contains("disk = [ \"format=raw, vdev=xvda, access=rw, target=/dev/vgr/g1r-xvda\" ]"),
            "{t}"
        );
        assert!(!t.contains("/dev/vg0/g1") && !t.contains("x.iso"), "{t}");
        assert!(t.contains("vif = [ ]\n"), "{t}");
        assert!(
            t.contains("# vif = [ \"mac=00:16:3e:01:02:03, bridge=BRIDGE, script=vif-bridge\" ]"),
            "{t}"
        );
        assert!(
            !t.contains("00:16:3e:7a:00:01") && !t.contains("xenbr0") && !t.contains("vif-route"),
            "{t}"
        );
        assert!(t.contains("on_poweroff = \"destroy\"\non_reboot = \"restart\"\non_crash = \"rename-restart\"\n"), "{t}");
        assert!(!t.contains("passwd") && !t.contains("pci"), "{t}");
        assert!(
            d.notes.iter().any(|n| n.contains("CD-ROM xvdc")),
            "{:?}",
            d.notes
        );
        assert!(
            d.notes.iter().any(|n| n.contains("pcidevs")),
            "{:?}",
            d.notes
        );
        assert!(
            d.notes.iter().any(|n| n.contains("no network")),
            "{:?}",
            d.notes
        );
        // Every line is `key = value` or a comment: xl parses nothing else.
        for l in t.lines() {
            assert!(l.starts_with('#') || l.contains(" = "), "{l}");
        }
    }

    #[test]
    fn a_named_bridge_gets_the_vifs_and_hvm_settings_come_through_their_allow_list() {
        let o = json!({"config": {
            "c_info": {"type": "hvm", "name": "h1"},
            "b_info": {"max_vcpus": 1, "avail_vcpus": [0], "max_memkb": 131072, "target_memkb": 131072,
                       "kernel": "/root/domu/vmlinuz", "ramdisk": "/root/domu/initrd.gz",
                       "cmdline": "console=ttyS0", "device_model_override": "/tmp/evil",
                       "type.hvm": {"boot": "cd", "xen_platform_pci": "False", "acpi": "True",
                                    "hpet": "<default>", "vnc": {"passwd": "removed-by-coldclone"}}},
            "disks": [{"pdev_path": "/dev/vg0/h1", "vdev": "hda", "format": "raw", "readwrite": 1}],
            "nics": [{"devid": 0, "mac": "00:16:3e:00:00:09", "model": "e1000", "script": "/tmp/evil"}]}});
        let disks = vec![("hda".to_string(), "/dev/vgr/h1r-hda".to_string())];
        let macs = vec!["00:16:3e:0a:0b:0c".to_string()];
        let d = derive(&RestoreSpec {
            name: "h1r",
            original: &o,
            disks: &disks,
            bridge: Some("xenbr1"),
            macs: &macs,
        })
        .unwrap();
        let t = &d.text;
        assert!(t.contains("type = \"hvm\"\n"), "{t}");
        assert!(
            t.contains("boot = \"cd\"\n")
                && t.contains("xen_platform_pci = 0\n")
                && t.contains("acpi = 1\n"),
            "{t}"
        );
        assert!(!t.contains("hpet"), "{t}");
        assert!(t.contains("vif = [ \"mac=00:16:3e:0a:0b:0c, bridge=xenbr1, script=vif-bridge, type=ioemu, model=e1000\" ]"), "{t}");
        assert!(!t.contains("evil") && !t.contains("passwd"), "{t}");
        // Hostile values are refused, not written.
        let bad = json!({"config": {"c_info": {"type": "pv"}, "b_info": {"max_memkb": 1024,
            "kernel": "/boot/vmlinuz\", bootloader=\"/tmp/x"}}});
        assert!(derive(&RestoreSpec {
            name: "x",
            original: &bad,
            disks: &[],
            bridge: None,
            macs: &[]
        })
        .is_err());
        assert!(derive(&RestoreSpec {
            name: "x",
            original: &o,
            disks: &disks,
            bridge: Some("a b"),
            macs: &macs
        })
        .is_err());
        let stubdom = json!({"config": {"c_info": {"type": "pv"}, "b_info": {"max_memkb": 1024}}});
        assert!(derive(&RestoreSpec {
            name: "x",
            original: &stubdom,
            disks: &[],
            bridge: None,
            macs: &[]
        })
        .is_err());
        assert!(new_mac().starts_with("00:16:3e:"));
    }
}
