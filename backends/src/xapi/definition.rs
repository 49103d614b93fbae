//! The VM definition the XAPI backend keeps with a backup: the VM's record
//! (`VM.get_record`) through an allow-list of the fields `VM.create` takes, secrets
//! removed, and the VBD and VIF layout needed to make the VM again (`restore --as
//! NEW --sr SR`).
//!
//! What is kept, and why (field names from xen-api ocaml/idl/datamodel_vm.ml):
//! - the StaticRO/RW fields `VM.create` takes ([`KEPT_FIELDS`]), as
//!   xapi/xapi_vm.ml `create` takes them;
//! - not `last_booted_record` (a marshalled copy of the whole record at the last boot,
//!   other_config and xenstore_data included: secrets twice over; `VM.create` only uses
//!   it for a Suspended VM), not `last_boot_CPU_flags` (same), not the references into
//!   the old pool (`suspend_SR`, `affinity`, `appliance`): they mean nothing elsewhere;
//! - the string maps (`other_config`, `platform`, `xenstore_data`, `HVM_boot_params`,
//!   `VCPUs_params`, `blocked_operations`) entry by entry: an entry whose key names a
//!   secret ([`secret_key`]) is removed; every `xenstore_data` entry is removed
//!   (`vm-data/...`, written into the guest's xenstore at boot, is where provisioning
//!   tools hand guests passwords and keys, datamodel_vm.ml `xenstore_data`), and
//!   `mac_seed` is removed from other_config (xapi/xapi_vm.ml `create` makes a fresh one
//!   when there is none, so the restored VM's MACs are new:
//!   xapi/xapi_vif_helpers.ml `gen_mac`);
//! - `PV_args`, the guest's kernel command line: a `key=value` word whose key names a
//!   secret has its value removed.
//!
//! Every removal is listed in `removed` (`other_config/KEY`, ...), values never.
//! VTPMs (which hold the guest's secrets) are not kept at all.

use super::client::{refs, str_field, u64_field, Client, NULL_REF};
use super::disk_name;
use crate::Result;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// What a removed value is replaced with where a value must stay (PV_args).
pub const SECRET_REMOVED: &str = "removed-by-coldclone";

/// The record's fields kept as they are (xen-api idl/datamodel_vm.ml; the arguments of
/// xapi/xapi_vm.ml `create` that describe the VM rather than its place in a pool).
pub const KEPT_FIELDS: &[&str] = &[
    "name_label",
    "name_description",
    "user_version",
    "memory_static_max",
    "memory_dynamic_max",
    "memory_dynamic_min",
    "memory_static_min",
    "memory_target",
    "VCPUs_params",
    "VCPUs_max",
    "VCPUs_at_startup",
    "actions_after_shutdown",
    "actions_after_reboot",
    "actions_after_crash",
    "actions_after_softreboot",
    "PV_bootloader",
    "PV_kernel",
    "PV_ramdisk",
    "PV_args",
    "PV_bootloader_args",
    "PV_legacy_args",
    "HVM_boot_policy",
    "HVM_boot_params",
    "HVM_shadow_multiplier",
    "platform",
    "PCI_bus",
    "other_config",
    "recommendations",
    "xenstore_data",
    "tags",
    "blocked_operations",
    "order",
    "start_delay",
    "shutdown_delay",
    "version",
    "generation_id",
    "hardware_platform_version",
    "has_vendor_device",
    "reference_label",
    "domain_type",
    "NVRAM",
    // Not given to VM.create: kept to say which VM this was.
    "uuid",
];

/// The string maps read entry by entry.
const MAPS: &[&str] = &[
    "other_config",
    "platform",
    "xenstore_data",
    "HVM_boot_params",
    "VCPUs_params",
    "blocked_operations",
];

/// Whether a map key or a `key=value` word names a secret.
pub fn secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "passw",
        "passwd",
        "pwd",
        "secret",
        "token",
        "credential",
        "private",
        "apikey",
        "api_key",
        "api-key",
        "auth",
        "cookie",
        "session",
    ]
    .iter()
    .any(|w| k.contains(w))
        // rootpw=, root_pw: installers' and kickstart's spelling.
        || k.ends_with("pw")
}

/// One VBD of the VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeptVbd {
    pub userdevice: String,
    /// `Disk` or `CD`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `RW` or `RO`.
    pub mode: String,
    pub bootable: bool,
    pub unpluggable: bool,
    pub empty: bool,
    /// The backup's disk name (`xvda`..) for a disk VBD; `None` for a CD.
    pub disk: Option<String>,
    pub vdi: Option<KeptVdi>,
}

/// What a disk VBD's VDI was.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeptVdi {
    pub uuid: String,
    pub name_label: String,
    pub name_description: String,
    pub virtual_size: u64,
    pub sharable: bool,
    pub read_only: bool,
    pub sr_uuid: String,
    pub sr_name_label: String,
}

/// One VIF of the VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeptVif {
    pub device: String,
    /// The original's MAC: the restored VM gets new ones.
    #[serde(rename = "MAC")]
    pub mac: String,
    #[serde(rename = "MTU")]
    pub mtu: i64,
    pub network_uuid: String,
    pub network_name_label: String,
}

/// The kept definition (`xapi-vm-record`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct XapiDefinition {
    /// The VM record's kept fields.
    pub vm: Map<String, Value>,
    pub vbds: Vec<KeptVbd>,
    pub vifs: Vec<KeptVif>,
    /// What was removed (`other_config/KEY`, `PV_args/KEY`), values never.
    #[serde(default)]
    pub removed: Vec<String>,
}

/// The record's kept fields with secrets removed; the removals, named.
pub fn keep_record(rec: &Value) -> (Map<String, Value>, Vec<String>) {
    let mut out = Map::new();
    let mut removed = Vec::new();
    for k in KEPT_FIELDS {
        let Some(v) = rec.get(*k) else { continue };
        let mut v = v.clone();
        if MAPS.contains(k) {
            if let Value::Object(m) = &mut v {
                let keys: Vec<String> = m.keys().cloned().collect();
                for key in keys {
                    let drop = *k == "xenstore_data"
                        || secret_key(&key)
                        || (*k == "other_config" && key == "mac_seed");
                    if drop {
                        m.remove(&key);
                        if key != "mac_seed" {
                            removed.push(format!("{k}/{key}"));
                        }
                    }
                }
            }
        }
        if *k == "PV_args" {
            if let Some(s) = v.as_str() {
                let (clean, gone) = clean_args(s);
                removed.extend(gone.into_iter().map(|g| format!("PV_args/{g}")));
                v = Value::String(clean);
            }
        }
        out.insert(k.to_string(), v);
    }
    (out, removed)
}

/// A kernel command line with the values of its secret `key=value` words removed.
pub fn clean_args(args: &str) -> (String, Vec<String>) {
    let mut gone = Vec::new();
    let words: Vec<String> = args
        .split(' ')
        .map(|w| match w.split_once('=') {
            Some((k, _)) if secret_key(k) => {
                gone.push(k.to_string());
                format!("{k}={SECRET_REMOVED}")
            }
            _ => w.to_string(),
        })
        .collect();
    (words.join(" "), gone)
}

/// The definition of the VM `vm_ref`, read from the host now.
pub fn read(c: &Client, vm_ref: &str) -> Result<XapiDefinition> {
    let rec = c.record("VM", vm_ref)?;
    let (vm, removed) = keep_record(&rec);
    let mut vbds = Vec::new();
    for vbd in refs(&rec, "VBDs") {
        let b = c.record("VBD", &vbd)?;
        let kind = str_field(&b, "type");
        let empty = b.get("empty").and_then(Value::as_bool).unwrap_or(false);
        let vdi_ref = str_field(&b, "VDI");
        let userdevice = str_field(&b, "userdevice");
        let (disk, vdi) = if kind == "Disk" && !empty && vdi_ref != NULL_REF && !vdi_ref.is_empty()
        {
            let v = c.record("VDI", &vdi_ref)?;
            let sr_ref = str_field(&v, "SR");
            let (sr_uuid, sr_name) = match c.record("SR", &sr_ref) {
                Ok(sr) => (str_field(&sr, "uuid"), str_field(&sr, "name_label")),
                Err(_) => (String::new(), String::new()),
            };
            (
                disk_name(&userdevice),
                Some(KeptVdi {
                    uuid: str_field(&v, "uuid"),
                    name_label: str_field(&v, "name_label"),
                    name_description: str_field(&v, "name_description"),
                    virtual_size: u64_field(&v, "virtual_size"),
                    sharable: v.get("sharable").and_then(Value::as_bool).unwrap_or(false),
                    read_only: v.get("read_only").and_then(Value::as_bool).unwrap_or(false),
                    sr_uuid,
                    sr_name_label: sr_name,
                }),
            )
        } else {
            (None, None)
        };
        // A CD's ISO is not in the backup: it comes back as an empty drive.
        let empty = empty || kind == "CD";
        vbds.push(KeptVbd {
            userdevice,
            kind,
            mode: str_field(&b, "mode"),
            bootable: b.get("bootable").and_then(Value::as_bool).unwrap_or(false),
            unpluggable: b
                .get("unpluggable")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            empty,
            disk,
            vdi,
        });
    }
    vbds.sort_by(|a, b| {
        let n = |d: &str| d.parse::<u64>().unwrap_or(u64::MAX);
        n(&a.userdevice).cmp(&n(&b.userdevice))
    });
    let mut vifs = Vec::new();
    for vif in refs(&rec, "VIFs") {
        let v = c.record("VIF", &vif)?;
        let net_ref = str_field(&v, "network");
        let (network_uuid, network_name_label) = match c.record("network", &net_ref) {
            Ok(n) => (str_field(&n, "uuid"), str_field(&n, "name_label")),
            Err(_) => (String::new(), String::new()),
        };
        vifs.push(KeptVif {
            device: str_field(&v, "device"),
            mac: str_field(&v, "MAC"),
            mtu: v.get("MTU").and_then(Value::as_i64).unwrap_or(1500),
            network_uuid,
            network_name_label,
        });
    }
    vifs.sort_by(|a, b| {
        let n = |d: &str| d.parse::<u64>().unwrap_or(u64::MAX);
        n(&a.device).cmp(&n(&b.device))
    });
    Ok(XapiDefinition {
        vm,
        vbds,
        vifs,
        removed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secrets_and_pool_references_are_not_kept() {
        let rec = json!({
            "uuid": "u1", "name_label": "web", "memory_static_max": 1024,
            "other_config": {"mac_seed": "s", "folder": "/prod", "install-password": "x",
                             "XenCenter.CustomFields.api_token": "y"},
            "xenstore_data": {"vm-data/hostname": "web", "vm-data/root_pw": "z"},
            "platform": {"keymap": "en-us", "vnc_passwd": "w"},
            "PV_args": "console=hvc0 rootpw=hunter2 quiet",
            "last_booted_record": "(secret copy)",
            "last_boot_CPU_flags": {"vendor": "x"},
            "suspend_SR": "OpaqueRef:1", "affinity": "OpaqueRef:2", "VBDs": ["OpaqueRef:3"],
        });
        let (vm, removed) = keep_record(&rec);
        let text = serde_json::to_string(&vm).unwrap();
        for secret in [
            "hunter2",
            "\"x\"",
            "\"y\"",
            "\"z\"",
            "\"w\"",
            "secret copy",
            "\"s\"",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        for gone in [
            "last_booted_record",
            "last_boot_CPU_flags",
            "suspend_SR",
            "affinity",
            "VBDs",
        ] {
            assert!(!vm.contains_key(gone), "{gone}");
        }
        assert_eq!(vm["other_config"], json!({"folder": "/prod"}));
        assert_eq!(vm["platform"], json!({"keymap": "en-us"}));
        assert_eq!(vm["xenstore_data"], json!({}));
        assert_eq!(
            vm["PV_args"],
            json!("console=hvc0 rootpw=removed-by-coldclone quiet")
        );
        assert_eq!(vm["memory_static_max"], json!(1024));
        assert!(removed.contains(&"other_config/install-password".to_string()));
        assert!(removed.contains(&"xenstore_data/vm-data/hostname".to_string()));
        assert!(removed.contains(&"PV_args/rootpw".to_string()));
        assert!(!removed.iter().any(|r| r.contains("mac_seed")));
    }
}
