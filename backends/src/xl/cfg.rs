//! The clone's xl.cfg, written from the original's `xl list -l` JSON.
//!
//! `xl restore CONFIG IMAGE` replaces the config stored in the image entirely
//! and parses CONFIG as xl.cfg, so everything the clone needs is written here:
//! a new name and no `uuid=` (xl makes a fresh one: a clone with the
//! original's UUID would clobber the original's /vm/<uuid> node in xenstore),
//! the same type, vCPUs, memory and vdev names (the memory image expects them),
//! disks = the snapshot LVs, and every vif on the isolated bridge with the
//! vif-bridge script (an original on vif-route or vif-nat must not take its
//! clone there).
//!
//! MACs are kept: the clone's NICs only ever see the isolated bridge, which has
//! no other port, so a duplicate MAC cannot meet its twin; and the guest's
//! memory (and, for HVM, the emulated NIC's saved state) already holds them,
//! so a new MAC would make the guest see a different NIC than it had while it
//! shuts down (udev renames, first-boot network set-up).

use crate::{BackendError, Result};
use serde_json::Value;

/// What the clone's config is made from.
pub struct CloneSpec<'a> {
    pub name: &'a str,
    pub original: &'a Value,
    /// The memory the clone starts with (the original's target at the save).
    pub memory_kib: u64,
    pub max_memory_kib: u64,
    /// (vdev, snapshot device path) for each disk that was snapshotted.
    pub snapshots: &'a [(String, String)],
    pub bridge: &'a str,
    /// Interface name prefix for the clone's vifs (index appended).
    pub vif_prefix: &'a str,
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

/// The domain type: "pv", "pvh" or "hvm".
pub fn domain_type(original: &Value) -> String {
    text(original, &["config", "c_info", "type"])
        .unwrap_or("pv")
        .to_string()
}

/// The vif interface names the clone will have, in order (an HVM emulated NIC
/// also gets a tap named `<vifname>-emu`).
pub fn vif_names(original: &Value, vif_prefix: &str) -> Vec<String> {
    let hvm = domain_type(original) == "hvm";
    let mut out = Vec::new();
    for (i, nic) in nics(original).iter().enumerate() {
        let name = format!("{vif_prefix}{i}");
        let emulated = hvm && text(nic, &["nictype"]) != Some("vif");
        out.push(name.clone());
        if emulated {
            out.push(format!("{name}-emu"));
        }
    }
    out
}

fn nics(original: &Value) -> Vec<Value> {
    original
        .pointer("/config/nics")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

pub fn disks(original: &Value) -> Vec<Value> {
    original
        .pointer("/config/disks")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// Settings a clone cannot safely duplicate.
pub fn refuse_unclonable(original: &Value) -> Result<()> {
    for key in ["pcidevs", "vtpms", "usbdevs", "dtdevs"] {
        if original
            .pointer(&format!("/config/{key}"))
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
        {
            return Err(BackendError::Unsupported(format!(
                "the domain has {key}: a clone cannot share passed-through devices"
            )));
        }
    }
    Ok(())
}

pub fn render(spec: &CloneSpec) -> Result<String> {
    let o = spec.original;
    let ty = domain_type(o);
    let b = o
        .pointer("/config/b_info")
        .ok_or_else(|| BackendError::Unsupported("xl list -l has no b_info".into()))?;
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k} = {v}\n"));
    line("name", quote(spec.name));
    line("type", quote(&ty));
    let mib = |kib: u64| kib.div_ceil(1024);
    line("memory", mib(spec.memory_kib).to_string());
    line(
        "maxmem",
        mib(spec.max_memory_kib.max(spec.memory_kib)).to_string(),
    );
    let max_vcpus = b.get("max_vcpus").and_then(Value::as_u64).unwrap_or(1);
    let avail = b
        .get("avail_vcpus")
        .and_then(Value::as_array)
        .map(|a| a.len() as u64)
        .filter(|n| *n > 0)
        .unwrap_or(max_vcpus);
    line("vcpus", avail.to_string());
    line("maxvcpus", max_vcpus.to_string());
    // Kernel, ramdisk and command line: top-level in b_info since Xen 4.10,
    // under type.pv before. A restore does not boot them, but xl wants a PV
    // config to name a kernel or a bootloader.
    let sub = format!("type.{ty}");
    for (key, cfg_key) in [
        ("kernel", "kernel"),
        ("ramdisk", "ramdisk"),
        ("cmdline", "cmdline"),
        ("bootloader", "bootloader"),
    ] {
        if let Some(v) = text(b, &[key]).or_else(|| text(b, &[&sub, key])) {
            line(cfg_key, quote(v));
        }
    }
    if ty == "hvm" {
        let h = b.get("type.hvm").cloned().unwrap_or(Value::Null);
        if let Some(v) = text(b, &["device_model_version"]) {
            line("device_model_version", quote(v));
        }
        if let Some(v) = h.get("xen_platform_pci").and_then(Value::as_str) {
            line(
                "xen_platform_pci",
                if v == "True" { "1" } else { "0" }.into(),
            );
        }
        for key in ["acpi", "apic", "pae", "hpet", "viridian"] {
            if let Some(v) = h.get(key).and_then(Value::as_str) {
                line(key, if v == "True" { "1" } else { "0" }.into());
            }
        }
        line("vnc", "0".into());
        line("sdl", "0".into());
        line("serial", quote("pty"));
    }
    let mut disk_specs = Vec::new();
    for d in disks(o) {
        let vdev = text(&d, &["vdev"]).unwrap_or_default().to_string();
        let cdrom = d.get("is_cdrom").and_then(Value::as_i64) == Some(1);
        let rw = d.get("readwrite").and_then(Value::as_i64) == Some(1);
        let format = text(&d, &["format"]).unwrap_or("raw");
        let target = match spec.snapshots.iter().find(|(v, _)| *v == vdev) {
            Some((_, snap)) => snap.clone(),
            None if cdrom || !rw => text(&d, &["pdev_path"]).unwrap_or_default().to_string(),
            None => {
                return Err(BackendError::Clone(format!(
                    "writable disk {vdev} has no snapshot; the clone would write into the original's disk"
                )))
            }
        };
        let mut s = format!(
            "format={format}, vdev={vdev}, access={}",
            if rw { "rw" } else { "ro" }
        );
        if cdrom {
            s.push_str(", devtype=cdrom");
        }
        if !target.is_empty() {
            s.push_str(&format!(", target={target}"));
        }
        disk_specs.push(quote(&s));
    }
    line("disk", format!("[ {} ]", disk_specs.join(", ")));
    let mut vif_specs = Vec::new();
    for (i, nic) in nics(o).iter().enumerate() {
        let mut s = String::new();
        if let Some(mac) = text(nic, &["mac"]) {
            s.push_str(&format!("mac={mac}, "));
        }
        s.push_str(&format!(
            "bridge={}, vifname={}{i}, script=vif-bridge",
            spec.bridge, spec.vif_prefix
        ));
        if ty == "hvm" {
            match text(nic, &["nictype"]) {
                Some("vif") => s.push_str(", type=vif"),
                _ => s.push_str(", type=ioemu"),
            }
            if let Some(m) = text(nic, &["model"]) {
                s.push_str(&format!(", model={m}"));
            }
        }
        vif_specs.push(quote(&s));
    }
    line("vif", format!("[ {} ]", vif_specs.join(", ")));
    // The clone runs without an xl monitor (restore -e); "preserve" keeps a
    // stopped clone listed so its shutdown reason can be read.
    for k in ["on_poweroff", "on_reboot", "on_crash", "on_watchdog"] {
        line(k, quote("preserve"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn original() -> Value {
        json!({"domid": 1, "config": {
            "c_info": {"type": "pv", "name": "g1", "uuid": "7c44e2dc-73bd-4098-a49d-224e250ae566"},
            "b_info": {"max_vcpus": 2, "avail_vcpus": [0], "max_memkb": 131072, "target_memkb": 131072,
                       "kernel": "/root/domu/vmlinuz", "cmdline": "console=hvc0 \"q\"", "ramdisk": "/root/domu/initrd.gz",
                       "type.pv": {}},
            "disks": [{"pdev_path": "/dev/vg0/g1", "vdev": "xvda", "format": "raw", "readwrite": 1},
                      {"pdev_path": "/srv/iso/x.iso", "vdev": "xvdc", "format": "raw", "readwrite": 0, "is_cdrom": 1}],
            "nics": [{"devid": 0, "mac": "00:16:3e:7a:00:01", "bridge": "xenbr0", "nictype": "vif", "script": "vif-route"}],
            "on_reboot": "restart"}})
    }

    #[test]
    fn the_clone_config_has_a_new_name_no_uuid_snapshot_disks_and_the_isolated_bridge() {
        let o = original();
        let snaps = vec![("xvda".to_string(), "/dev/vg0/g1-ccabc".to_string())];
        let cfg = render(&CloneSpec {
            name: "coldclone-clone-x",
            original: &o,
            memory_kib: 98304,
            max_memory_kib: 131072,
            snapshots: &snaps,
            bridge: "ccbr123456",
            vif_prefix: "cc123456t",
        })
        .unwrap();
        assert!(cfg.contains("name = \"coldclone-clone-x\"\n"), "{cfg}");
        assert!(!cfg.contains("uuid"), "{cfg}");
        assert!(
            cfg.contains("memory = 96\nmaxmem = 128\nvcpus = 1\nmaxvcpus = 2\n"),
            "{cfg}"
        );
        assert!(
            cfg.contains("cmdline = \"console=hvc0 \\\"q\\\"\""),
            "{cfg}"
        );
        assert!(cfg.contains("target=/dev/vg0/g1-ccabc"), "{cfg}");
        assert!(
            !cfg.contains("/dev/vg0/g1,") && !cfg.contains("target=/dev/vg0/g1\""),
            "{cfg}"
        );
        assert!(
            cfg.contains("access=ro, devtype=cdrom, target=/srv/iso/x.iso"),
            "{cfg}"
        );
        assert!(cfg.contains("\"mac=00:16:3e:7a:00:01, bridge=ccbr123456, vifname=cc123456t0, script=vif-bridge\""), "{cfg}");
        assert!(
            !cfg.contains("xenbr0") && !cfg.contains("vif-route"),
            "{cfg}"
        );
        assert!(cfg.contains("on_poweroff = \"preserve\""));
        assert_eq!(vif_names(&o, "cc1t"), vec!["cc1t0".to_string()]);
    }

    #[test]
    fn a_writable_disk_without_snapshot_is_refused() {
        let o = original();
        let e = render(&CloneSpec {
            name: "c",
            original: &o,
            memory_kib: 1024,
            max_memory_kib: 1024,
            snapshots: &[],
            bridge: "b",
            vif_prefix: "p",
        })
        .unwrap_err();
        assert!(e.to_string().contains("xvda"), "{e}");
        let mut p = original();
        p["config"]["pcidevs"] = json!([{"bdf": "0000:01:00.0"}]);
        assert!(refuse_unclonable(&p).is_err());
        assert!(refuse_unclonable(&o).is_ok());
    }
}
