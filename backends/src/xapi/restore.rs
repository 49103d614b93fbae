//! Makes a VM again on a XAPI pool from the definition kept with a backup
//! ([`super::definition`]) and the backup's disks (`coldclone restore VM --as NEW --sr
//! SR [--network NET]`), the calls Xen Orchestra's VM restore makes too:
//!
//! 1. `VDI.create` on the SR per disk (xapi/xapi_vdi.ml `create`), then its bytes
//!    through `PUT /import_raw_vdi` ([`Client::import_raw_vdi`]);
//! 2. `VM.create` from the kept record, Halted (xapi/xapi_vm.ml `create`: a fresh uuid;
//!    no `mac_seed` is given, so xapi makes a new one and the VIFs get new MACs), with a
//!    fresh `generation_id` as xapi gives a copy (xapi/xapi_vm_clone.ml, via
//!    xapi_vm_helpers.ml `fresh_genid`);
//! 3. `VBD.create` per VBD as the original had them (device numbers, bootable, mode; a
//!    CD comes back as an empty drive: its ISO is not in the backup);
//! 4. `VIF.create` per NIC on the network the user named, with `MAC = ""` so xapi
//!    derives a new one from the new VM's seed (xapi/xapi_vif_helpers.ml `create`,
//!    `gen_mac`); no network named: no VIF, and the report says what the original had.
//!
//! Until the last step everything is named `coldclone-restoring-TAG-NEW...`: the VM
//! takes its name (`VM.set_name_label`) only when all of it exists, so no half VM is
//! ever visible under the new name. A failure destroys what was made (xe's order: the
//! VM, then its VDIs); what cannot be destroyed is named in the error. A restore
//! killed outright leaves those `coldclone-restoring-` objects for the user to remove.

use super::client::{refs, str_field, u64_field, Client, XapiError, NULL_REF};
use super::definition::{KeptVbd, XapiDefinition};
use super::{destroy_vdi, is_code, looks_like_uuid, shut_and_destroy_vm};
use crate::{BackendError, Result};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::Read;
use std::time::Duration;

/// Opens a disk of the backup by name: its bytes from the first, or why not.
pub type OpenDisk<'a, 'r> = dyn FnMut(&str) -> std::result::Result<Box<dyn Read + 'r>, String> + 'a;

/// What to make.
pub struct RestoreSpec<'a> {
    /// The new VM's name label.
    pub name: &'a str,
    /// The SR for its disks: uuid or name label.
    pub sr: &'a str,
    /// The network for its NICs (uuid or name label); `None`: no NIC.
    pub network: Option<&'a str>,
    pub def: &'a XapiDefinition,
    /// The backup's disks: name → size in bytes.
    pub disks: &'a BTreeMap<String, u64>,
    /// Said in the new VM's other_config (`coldclone_restored_from`).
    pub from: &'a str,
    pub task_timeout: Duration,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoredDisk {
    pub vdi_uuid: String,
    pub userdevice: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoredNic {
    pub device: String,
    #[serde(rename = "MAC")]
    pub mac: String,
    pub network: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestoredXapiVm {
    pub uuid: String,
    pub name: String,
    pub sr_uuid: String,
    pub power_state: String,
    pub disks: BTreeMap<String, RestoredDisk>,
    pub nics: Vec<RestoredNic>,
    pub notes: Vec<String>,
}

/// The fields of the kept record given to `VM.create` (the rest of the record is set
/// here: name, power state, pool references).
const NOT_GIVEN: &[&str] = &["uuid", "name_label"];

/// An object by uuid, or by a name label only one object of the class has.
fn find_one(c: &Client, class: &str, handle: &str, what: &str) -> Result<String> {
    if looks_like_uuid(handle) {
        match c.call_str(&format!("{class}.get_by_uuid"), vec![json!(handle)]) {
            Ok(r) => return Ok(r),
            Err(e) if is_code(&e, "UUID_INVALID") => {}
            Err(e) => return Err(e.into()),
        }
    }
    let found = c.call(&format!("{class}.get_by_name_label"), vec![json!(handle)])?;
    let found: Vec<String> = found
        .as_array()
        .into_iter()
        .flatten()
        .map(super::client::value_string)
        .collect();
    match found.len() {
        1 => Ok(found[0].clone()),
        0 => Err(BackendError::Unsupported(format!(
            "XAPI at {} has no {what} {handle:?} (give its name label or uuid)",
            c.target().url
        ))),
        n => Err(BackendError::Unsupported(format!(
            "XAPI at {} has {n} {what}s named {handle:?}; give its uuid",
            c.target().url
        ))),
    }
}

/// `"%Ld:%Ld"` of two random non-negative 63-bit numbers, as xapi/xapi_vm_helpers.ml
/// `fresh_genid` makes it ("" stays "": the VM has no generation id).
fn fresh_genid(current: &str) -> String {
    if current.is_empty() {
        return String::new();
    }
    let h = crate::util::random_hex(16);
    let a = u64::from_str_radix(&h[..16], 16).unwrap_or(1) >> 1;
    let b = u64::from_str_radix(&h[16..], 16).unwrap_or(2) >> 1;
    format!("{a}:{b}")
}

/// The `VM.create` record from the kept one.
pub fn create_record(def: &XapiDefinition, label: &str, from: &str) -> Map<String, Value> {
    let mut rec = Map::new();
    for (k, v) in &def.vm {
        if !NOT_GIVEN.contains(&k.as_str()) {
            rec.insert(k.clone(), v.clone());
        }
    }
    let mut other = rec
        .get("other_config")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    // Never the original's seed: the MACs would be the original's again.
    other.remove("mac_seed");
    other.insert("coldclone_restored_from".into(), json!(from));
    rec.insert("other_config".into(), Value::Object(other));
    let genid = rec
        .get("generation_id")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    rec.insert("generation_id".into(), json!(fresh_genid(&genid)));
    rec.insert("name_label".into(), json!(label));
    rec.insert("power_state".into(), json!("Halted"));
    rec.insert("is_a_template".into(), json!(false));
    rec.insert("suspend_VDI".into(), json!(NULL_REF));
    rec.insert("suspend_SR".into(), json!(NULL_REF));
    rec.insert("affinity".into(), json!(NULL_REF));
    rec.insert("appliance".into(), json!(NULL_REF));
    rec.insert("ha_always_run".into(), json!(false));
    rec.insert("ha_restart_priority".into(), json!(""));
    rec.insert("last_booted_record".into(), json!(""));
    rec.insert("last_boot_CPU_flags".into(), json!({}));
    rec
}

/// What has been made so far, for the clean-up.
#[derive(Default)]
struct Made {
    vm: Option<String>,
    vdis: Vec<(String, String)>,
}

fn clean_up(c: &Client, made: &Made) -> Vec<String> {
    let mut left = Vec::new();
    if let Some(vm) = &made.vm {
        let r = c
            .record("VM", vm)
            .map_err(BackendError::from)
            .and_then(|rec| shut_and_destroy_vm(c, vm, &rec));
        match r {
            Ok(()) | Err(BackendError::Xapi(XapiError::HandleInvalid { .. })) => {}
            Err(e) => left.push(format!("VM {vm} ({e})")),
        }
    }
    for (vdi, uuid) in &made.vdis {
        if let Err(e) = destroy_vdi(c, vdi) {
            left.push(format!("VDI {uuid} ({e})"));
        }
    }
    left
}

/// Makes the VM; on failure destroys what it made. `open` gives a disk's bytes.
pub fn restore<'r>(
    c: &Client,
    spec: &RestoreSpec,
    open: &mut OpenDisk<'_, 'r>,
) -> Result<RestoredXapiVm> {
    // Everything that can be refused is refused before anything is made.
    let sr = find_one(c, "SR", spec.sr, "SR")?;
    let sr_uuid = str_field(&c.record("SR", &sr)?, "uuid");
    let net = match spec.network {
        Some(n) => {
            let r = find_one(c, "network", n, "network")?;
            Some((
                r.clone(),
                str_field(&c.record("network", &r)?, "name_label"),
            ))
        }
        None => None,
    };
    let taken = c.call("VM.get_by_name_label", vec![json!(spec.name)])?;
    if taken.as_array().is_some_and(|a| !a.is_empty()) {
        return Err(BackendError::Unsupported(format!(
            "XAPI at {} already has a VM named {:?}: give another --as",
            c.target().url,
            spec.name
        )));
    }
    for b in &spec.def.vbds {
        if let Some(d) = &b.disk {
            if !spec.disks.contains_key(d) {
                return Err(BackendError::Unsupported(format!(
                    "the kept definition has disk {d} (userdevice {}), which this backup does \
                     not hold; restore from a backup with all of the VM's disks",
                    b.userdevice
                )));
            }
        }
    }
    for d in spec.disks.keys() {
        if !spec.def.vbds.iter().any(|b| b.disk.as_deref() == Some(d)) {
            return Err(BackendError::Unsupported(format!(
                "the backup holds disk {d}, which the kept definition has no VBD for"
            )));
        }
    }
    let tag = crate::util::random_hex(3);
    let temp = format!("coldclone-restoring-{tag}-{}", spec.name);
    let mut made = Made::default();
    let r = make(c, spec, open, &sr, &sr_uuid, net.as_ref(), &temp, &mut made);
    match r {
        Ok(v) => Ok(v),
        Err(e) => {
            let left = clean_up(c, &made);
            if left.is_empty() {
                Err(e)
            } else {
                Err(BackendError::Clone(format!(
                    "{e}; the half-made VM could not all be removed, remove by hand (named \
                     {temp}...): {}",
                    left.join(", ")
                )))
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn make<'r>(
    c: &Client,
    spec: &RestoreSpec,
    open: &mut OpenDisk<'_, 'r>,
    sr: &str,
    sr_uuid: &str,
    net: Option<&(String, String)>,
    temp: &str,
    made: &mut Made,
) -> Result<RestoredXapiVm> {
    // 1. The disks, each written whole before the VM exists.
    let mut vdis: BTreeMap<String, (String, RestoredDisk)> = BTreeMap::new();
    for b in &spec.def.vbds {
        let Some(disk) = &b.disk else { continue };
        let bytes = spec.disks[disk];
        let kept = b.vdi.as_ref();
        let size = kept.map_or(bytes, |v| v.virtual_size.max(bytes));
        let vdi = c.call_str(
            "VDI.create",
            vec![json!({
                "name_label": format!("{temp}-{disk}"),
                "name_description": kept.map(|v| v.name_description.clone()).unwrap_or_default(),
                "SR": sr,
                "virtual_size": size,
                "type": "user",
                "sharable": false,
                "read_only": false,
                "other_config": {"coldclone_restored_from": spec.from},
                "xenstore_data": {},
                "sm_config": {},
                "tags": [],
            })],
        )?;
        // Made: it is the clean-up's from here on, whatever fails next.
        made.vdis.push((vdi.clone(), format!("{temp}-{disk}")));
        let rec = c.record("VDI", &vdi)?;
        let uuid = str_field(&rec, "uuid");
        // An SR may round a size up (xapi_vdi.ml `create` logs it), never down.
        let got = u64_field(&rec, "virtual_size");
        if got < bytes {
            return Err(BackendError::Clone(format!(
                "VDI.create on SR {sr_uuid} made a VDI of {got} bytes for disk {disk} of {bytes}"
            )));
        }
        let mut reader = open(disk).map_err(BackendError::Clone)?;
        c.import_raw_vdi(&vdi, &uuid, bytes, &mut *reader, spec.task_timeout)?;
        vdis.insert(
            disk.clone(),
            (
                vdi,
                RestoredDisk {
                    vdi_uuid: uuid,
                    userdevice: b.userdevice.clone(),
                    bytes,
                },
            ),
        );
    }
    // 2. The VM, halted, under its temporary name.
    let vm = c.call_str(
        "VM.create",
        vec![Value::Object(create_record(spec.def, temp, spec.from))],
    )?;
    made.vm = Some(vm.clone());
    // 3. Its VBDs as the original had them.
    for b in &spec.def.vbds {
        c.call("VBD.create", vec![vbd_record(&vm, b, &vdis)?])?;
    }
    // 4. Its NICs on the named network, with new MACs; or none.
    let mut nics = Vec::new();
    let mut notes = Vec::new();
    match net {
        Some((net_ref, net_name)) => {
            for v in &spec.def.vifs {
                let vif = c.call_str(
                    "VIF.create",
                    vec![json!({
                        "device": v.device, "network": net_ref, "VM": vm, "MAC": "",
                        "MTU": v.mtu, "other_config": {}, "currently_attached": false,
                        "qos_algorithm_type": "", "qos_algorithm_params": {},
                        "locking_mode": "network_default", "ipv4_allowed": [], "ipv6_allowed": [],
                    })],
                )?;
                let rec = c.record("VIF", &vif)?;
                nics.push(RestoredNic {
                    device: v.device.clone(),
                    mac: str_field(&rec, "MAC"),
                    network: net_name.clone(),
                });
            }
        }
        None if !spec.def.vifs.is_empty() => {
            let was: Vec<String> = spec
                .def
                .vifs
                .iter()
                .map(|v| format!("device {} on {:?}", v.device, v.network_name_label))
                .collect();
            notes.push(format!(
                "no network: the VM has no NIC (the original had {}); give --network NET, or \
                 add them with `xe vif-create`",
                was.join(", ")
            ));
        }
        None => {}
    }
    if spec.def.vbds.iter().any(|b| b.kind == "CD") {
        notes.push("CD drives are back empty: their ISOs are not in the backup".into());
    }
    if !spec.def.removed.is_empty() {
        notes.push(format!(
            "not kept with the backup (secrets): {}",
            spec.def.removed.join(", ")
        ));
    }
    // 5. The names, the VM's last: until then nothing is visible under the new name.
    for (disk, (vdi, _)) in &vdis {
        c.call(
            "VDI.set_name_label",
            vec![json!(vdi), json!(format!("{} {disk}", spec.name))],
        )?;
    }
    c.call("VM.set_name_label", vec![json!(vm), json!(spec.name)])?;
    let rec = c.record("VM", &vm)?;
    let attached = refs(&rec, "VBDs").len();
    if attached != spec.def.vbds.len() {
        return Err(BackendError::Clone(format!(
            "the new VM has {attached} VBDs, not the {} made",
            spec.def.vbds.len()
        )));
    }
    Ok(RestoredXapiVm {
        uuid: str_field(&rec, "uuid"),
        name: spec.name.to_string(),
        sr_uuid: sr_uuid.to_string(),
        power_state: str_field(&rec, "power_state"),
        disks: vdis.into_iter().map(|(k, (_, d))| (k, d)).collect(),
        nics,
        notes,
    })
}

fn vbd_record(
    vm: &str,
    b: &KeptVbd,
    vdis: &BTreeMap<String, (String, RestoredDisk)>,
) -> Result<Value> {
    let common = |vdi: &str, kind: &str, mode: &str, empty: bool| {
        json!({
            "VM": vm, "VDI": vdi, "userdevice": b.userdevice, "device": "",
            "bootable": b.bootable, "mode": mode, "type": kind,
            "unpluggable": b.unpluggable, "empty": empty, "other_config": {},
            "currently_attached": false, "qos_algorithm_type": "", "qos_algorithm_params": {},
        })
    };
    match (&b.disk, b.kind.as_str()) {
        (Some(d), "Disk") => {
            let (vdi, _) = vdis
                .get(d)
                .ok_or_else(|| BackendError::Clone(format!("no VDI was made for disk {d}")))?;
            let mode = if b.mode == "RO" { "RO" } else { "RW" };
            Ok(common(vdi, "Disk", mode, false))
        }
        // xapi/xapi_vbd.ml `create`: only a CD may be empty, and a CD is RO.
        (_, "CD") => Ok(common(NULL_REF, "CD", "RO", true)),
        (_, other) => Err(BackendError::Unsupported(format!(
            "VBD userdevice {} is of type {other:?} with no disk in the backup; coldclone \
             restores Disk and CD VBDs",
            b.userdevice
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_create_record_is_halted_with_no_seed_and_a_fresh_generation_id() {
        let def = XapiDefinition {
            vm: json!({"uuid": "u", "name_label": "old", "memory_static_max": 1,
                       "generation_id": "1:2", "other_config": {"folder": "/x"}})
            .as_object()
            .unwrap()
            .clone(),
            vbds: vec![],
            vifs: vec![],
            removed: vec![],
        };
        let r = create_record(&def, "coldclone-restoring-x-new", "web1/run1");
        assert_eq!(r["name_label"], json!("coldclone-restoring-x-new"));
        assert_eq!(r["power_state"], json!("Halted"));
        assert!(!r.contains_key("uuid"));
        assert_eq!(
            r["other_config"],
            json!({"folder": "/x", "coldclone_restored_from": "web1/run1"})
        );
        let g = r["generation_id"].as_str().unwrap();
        assert!(g != "1:2" && g.split(':').count() == 2, "{g}");
        assert!(g.split(':').all(|n| n.parse::<i64>().is_ok()), "{g}");
        assert_eq!(fresh_genid(""), "");
    }
}
