//! XAPI backend (XenServer / XCP-ng), over XAPI's JSON-RPC.
//!
//! checkpoint = `VM.checkpoint` (memory in a suspend VDI + disk snapshots,
//! the original resumed by XAPI). The clone is *not* `VM.clone` of the
//! checkpoint: xapi hard-shuts a clone of a snapshot that is not Halted,
//! destroying its memory (xapi/xapi_vm.ml `clone`, `hard_shutdown`). It is
//! built the way Xen Orchestra restores a VM with its memory: `VDI.clone` of
//! each of the checkpoint's disks and of its suspend VDI, `VM.create` of a
//! Suspended VM from the checkpoint's record with the cloned suspend VDI
//! (xapi >= 1.257.0), `VBD.create` of each disk, `VIF.create` of each NIC
//! straight onto a network made for the run with no PIF →
//! `VM.resume(start_paused)` → check that no VIF is on a network with a PIF
//! → `VM.unpause` → `VM.clean_shutdown` → wait with `event.from` → export
//! the clone's VDIs (`/export_raw_vdi`) → destroy in xe's order.
//!
//! Journal entries name XAPI objects by name label or uuid and the host by
//! URL and credential *source*; every object coldclone makes is journaled
//! before it exists. Clean-up follows xe's `vm-uninstall`
//! (xapi-cli-server/cli_operations.ml): the VM's VDIs are read first, then
//! `VM.hard_shutdown` if not Halted, `VM.destroy`, each VDI, the suspend VDI.
//!
//! Tested against `xapi-sim`, not a real host: see docs/xapi.md.

pub mod cbt;
pub mod client;
pub mod definition;
pub mod restore;

pub use client::{Client, XapiError, XapiTarget};

use crate::{
    BackendError, Checkpoint, CloneDisk, CloneNetwork, CloneOutcome, DiskInfo, FrozenDisk,
    Hypervisor, Journal, Opaque, OpaqueMut, PauseTimes, PausedClone, Result, StopMethod, VmInfo,
    VmLocator,
};
use client::{refs, str_field, u64_field, NULL_REF};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The oldest xapi whose `VM.create` makes a Suspended VM from a suspend VDI
/// (idl/datamodel_vm.ml: power_state, suspend_VDI and last_booted_record
/// "Changed 1.257.0 ... to allow Suspended VM creation"). XCP-ng 8.2 and
/// Citrix Hypervisor 8.2 (xapi 1.249) lack it.
pub const MIN_XAPI: (u64, u64) = (1, 257);

/// The other_config key a checkpoint VDI carries before coldclone clones it;
/// `VDI.clone` copies other_config (xapi/xapi_vdi.ml `snapshot_and_clone`),
/// so a clone made just before a crash is found by it.
pub const CLONE_SOURCE_KEY: &str = "coldclone_clone_source";

/// Per-VM settings of the XAPI backend, from the config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct XapiOptions {
    /// SHA-256 fingerprint of the host's (self-signed) certificate.
    pub tls_fingerprint_sha256: Option<String>,
    /// coldclone runs in a host's dom0: an HVM guest without PV drivers can
    /// be sent the ACPI power button with `xl trigger DOMID power`, when the
    /// clone runs on this host.
    #[serde(default)]
    pub dom0_acpi: bool,
    /// Where this dom0's host names itself (`INSTALLATION_UUID=`); default
    /// /etc/xensource-inventory.
    #[serde(default)]
    pub dom0_inventory: Option<PathBuf>,
    /// Accept an `http://` URL (the simulator, a lab host).
    #[serde(default)]
    pub insecure_http: bool,
}

/// What the XAPI backend creates on the pool, with what it takes to undo it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum XapiResource {
    /// A XAPI VM made for the run (checkpoint or clone), by its unique name
    /// label (undo: xe's order: hard shutdown, VM.destroy, its VDIs).
    XapiVm {
        target: XapiTarget,
        name_label: String,
    },
    /// A XAPI network with no PIF made for the run (undo: network.destroy).
    XapiNetwork {
        target: XapiTarget,
        name_label: String,
    },
    /// A VDI: one coldclone clones (by the name it gets, and by the clone
    /// source's mark in its SR), or one of the checkpoint's (by uuid), which
    /// outlives its VM between `VM.destroy` and `VDI.destroy`.
    XapiVdi {
        target: XapiTarget,
        #[serde(default)]
        name_label: Option<String>,
        #[serde(default)]
        uuid: Option<String>,
        #[serde(default)]
        sr_uuid: Option<String>,
        #[serde(default)]
        source_uuid: Option<String>,
    },
    /// The original's dynamic memory range before coldclone lowered it (undo: set it back).
    XapiMemoryRange {
        target: XapiTarget,
        vm_uuid: String,
        dynamic_min: u64,
        dynamic_max: u64,
    },
}

/// Attempts at `VDI.destroy` answered VDI_IN_USE: right after an export the
/// VDI can be held a moment (Xen Orchestra retries too).
const VDI_IN_USE_TRIES: u32 = 8;

fn is_code(e: &XapiError, code: &str) -> bool {
    e.code() == Some(code)
}

/// `VDI.destroy` with a bounded retry of VDI_IN_USE; a VDI already gone is fine.
fn destroy_vdi(c: &Client, vdi: &str) -> Result<()> {
    let mut tries = 0;
    loop {
        match c.call("VDI.destroy", vec![json!(vdi)]) {
            Ok(_) | Err(XapiError::HandleInvalid { .. }) => return Ok(()),
            Err(e) if is_code(&e, "VDI_IN_USE") && tries + 1 < VDI_IN_USE_TRIES => {
                tries += 1;
                tracing::info!(vdi, "VDI.destroy: VDI_IN_USE; asking again");
                std::thread::sleep(Duration::from_millis(50 << tries.min(5)));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Undoes one of the XAPI backend's own resources.
pub(crate) fn recover(resource: &XapiResource) -> Result<()> {
    match resource {
        XapiResource::XapiVm { target, name_label } => {
            // Only what coldclone named: its labels carry the run id.
            if !name_label.starts_with("coldclone-") {
                return Ok(());
            }
            let c = Client::login(target)?;
            let found = c.call("VM.get_by_name_label", vec![json!(name_label)])?;
            for r in found.as_array().into_iter().flatten() {
                destroy_vm_and_disks(&c, &client::value_string(r))?;
            }
            Ok(())
        }
        XapiResource::XapiNetwork { target, name_label } => {
            let c = Client::login(target)?;
            let found = c.call("network.get_by_name_label", vec![json!(name_label)])?;
            for n in found.as_array().into_iter().flatten() {
                let n = client::value_string(n);
                let rec = c.record("network", &n)?;
                let ours = rec
                    .get("other_config")
                    .and_then(|o| o.get("coldclone_run"))
                    .is_some();
                if ours && refs(&rec, "PIFs").is_empty() {
                    match c.call("network.destroy", vec![json!(n)]) {
                        Ok(_) | Err(XapiError::HandleInvalid { .. }) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            Ok(())
        }
        XapiResource::XapiVdi {
            target,
            name_label,
            uuid,
            sr_uuid,
            source_uuid,
        } => {
            let c = Client::login(target)?;
            let mut found = vec![];
            if let Some(u) = uuid {
                match c.call_str("VDI.get_by_uuid", vec![json!(u)]) {
                    Ok(r) => found.push(r),
                    Err(e) if is_code(&e, "UUID_INVALID") => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if let Some(n) = name_label.as_ref().filter(|n| n.starts_with("coldclone-")) {
                let all = c.call("VDI.get_by_name_label", vec![json!(n)])?;
                found.extend(
                    all.as_array()
                        .into_iter()
                        .flatten()
                        .map(client::value_string),
                );
            }
            // A clone made just before a crash, not yet renamed: it carries its
            // source's mark; the source itself is not ours to destroy here.
            if let (Some(sr), Some(src)) = (sr_uuid, source_uuid) {
                let sr = match c.call_str("SR.get_by_uuid", vec![json!(sr)]) {
                    Ok(r) => Some(r),
                    Err(e) if is_code(&e, "UUID_INVALID") => None,
                    Err(e) => return Err(e.into()),
                };
                if let Some(sr) = sr {
                    let vdis = c.call("SR.get_VDIs", vec![json!(sr)])?;
                    for v in vdis.as_array().into_iter().flatten() {
                        let v = client::value_string(v);
                        let rec = match c.record("VDI", &v) {
                            Ok(r) => r,
                            Err(XapiError::HandleInvalid { .. }) => continue,
                            Err(e) => return Err(e.into()),
                        };
                        let mark = rec
                            .get("other_config")
                            .and_then(|o| o.get(CLONE_SOURCE_KEY));
                        if mark.and_then(Value::as_str) == Some(src.as_str())
                            && str_field(&rec, "uuid") != *src
                        {
                            found.push(v);
                        }
                    }
                }
            }
            found.sort();
            found.dedup();
            for vdi in found {
                destroy_our_vdi(&c, &vdi)?;
            }
            Ok(())
        }
        XapiResource::XapiMemoryRange {
            target,
            vm_uuid,
            dynamic_min,
            dynamic_max,
        } => {
            let c = Client::login(target)?;
            let vm = match c.call_str("VM.get_by_uuid", vec![json!(vm_uuid)]) {
                Ok(r) => r,
                Err(e) if is_code(&e, "UUID_INVALID") => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            c.call(
                "VM.set_memory_dynamic_range",
                vec![json!(vm), json!(dynamic_min), json!(dynamic_max)],
            )?;
            Ok(())
        }
    }
}

/// Destroys a VDI coldclone made or was left with. While a VM of coldclone's
/// (a checkpoint) still holds it attached, that VM goes first, in xe's order;
/// a VDI held by any other VM is refused.
fn destroy_our_vdi(c: &Client, vdi: &str) -> Result<()> {
    let rec = match c.record("VDI", vdi) {
        Ok(r) => r,
        Err(XapiError::HandleInvalid { .. }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for vbd in refs(&rec, "VBDs") {
        let b = match c.record("VBD", &vbd) {
            Ok(b) => b,
            Err(XapiError::HandleInvalid { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        let vm = str_field(&b, "VM");
        let name = match c.record("VM", &vm) {
            Ok(v) => str_field(&v, "name_label"),
            Err(XapiError::HandleInvalid { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        if !name.starts_with("coldclone-") {
            return Err(BackendError::Unsupported(format!(
                "VDI {} is attached to VM {name:?}, which coldclone did not make; left alone",
                str_field(&rec, "uuid")
            )));
        }
        destroy_vm_and_disks(c, &vm)?;
    }
    destroy_vdi(c, vdi)
}

/// What the backend learned about the original.
#[derive(Debug, Clone)]
pub struct XapiVm {
    pub client: Arc<Client>,
    pub target: XapiTarget,
    pub vm_ref: String,
    pub uuid: String,
    /// `clean_shutdown` is among the VM's allowed operations (PV drivers present).
    pub pv_drivers: bool,
    pub memory_static_min: u64,
    pub memory_dynamic_min: u64,
    pub memory_dynamic_max: u64,
}

/// The XAPI part of a checkpoint: the checkpoint VM and its journal entries.
#[derive(Debug, Clone)]
struct XapiCheckpoint {
    vm_ref: String,
    journal_id: u64,
    /// Its VDIs' journal entries (by uuid).
    vdi_ids: Vec<u64>,
    /// The run it belongs to (names the maps it keeps).
    run: String,
    /// Its disk snapshots that are changed-block maps, by disk name.
    tracked: BTreeMap<String, cbt::Tracked>,
}

#[derive(Debug)]
pub struct XapiClone {
    client: Arc<Client>,
    network: String,
    bridge: String,
    vm_ref: String,
    uuid: String,
    journal_id: u64,
    /// The clone's VDIs' journal entries and refs.
    vdi_ids: Vec<(u64, String)>,
    vifs: Vec<String>,
    /// Disk name → (VDI ref, VDI uuid, size).
    disks: BTreeMap<String, (String, String, u64)>,
    /// Disk name → the snapshot of its clone VDI taken before the clone ran (CBT).
    cbt_bases: BTreeMap<String, String>,
    shutdown_task: Option<String>,
    destroyed: bool,
}

pub struct XapiBackend {
    options: XapiOptions,
    pub export_attempts: u32,
    pub task_timeout: Duration,
    /// Ranges lowered by `balloon`, put back after the checkpoint: VM uuid →
    /// (journal id, dynamic_min, dynamic_max).
    lowered: Mutex<BTreeMap<String, (u64, u64, u64)>>,
}

impl XapiBackend {
    pub fn with_options(options: XapiOptions) -> XapiBackend {
        XapiBackend {
            options,
            export_attempts: 3,
            task_timeout: Duration::from_secs(3600),
            lowered: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Default for XapiBackend {
    fn default() -> Self {
        Self::with_options(XapiOptions::default())
    }
}

fn xapi_vm(vm: &VmInfo) -> Result<&XapiVm> {
    crate::vm_state(vm, "XAPI")
}

fn xapi_clone(detail: &mut OpaqueMut) -> Result<&mut XapiClone> {
    crate::clone_state(detail, "XAPI")
}

fn looks_like_uuid(s: &str) -> bool {
    s.len() == 36 && s.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// A disk VBD of a VM: its record and its VDI's.
pub(crate) struct DiskVbd {
    name: String,
    vbd: Value,
    vdi_ref: String,
    vdi: Value,
}

/// The VM's disks by name. A disk is named by its VBD's `userdevice`:
/// xvda..xvdz for 0-25 as always (a repository's incremental parents are
/// found by name), xvdaa, xvdab.. above, as xen-blkfront names them. A disk
/// that cannot be named, or whose name another disk has, is refused: a
/// backup that silently left a disk out would pass for a good one.
fn vm_disk_vbds(c: &Client, vm_ref: &str) -> Result<Vec<DiskVbd>> {
    let rec = c.record("VM", vm_ref)?;
    let mut out: Vec<DiskVbd> = vec![];
    let mut named: BTreeMap<String, (String, String)> = BTreeMap::new();
    for vbd in refs(&rec, "VBDs") {
        let b = c.record("VBD", &vbd)?;
        let vdi = str_field(&b, "VDI");
        if str_field(&b, "type") != "Disk" || vdi == NULL_REF || vdi.is_empty() {
            continue;
        }
        let (vbd_uuid, userdevice) = (str_field(&b, "uuid"), str_field(&b, "userdevice"));
        let name = disk_name(&userdevice).ok_or_else(|| {
            BackendError::Unsupported(format!(
                "VM {}: disk VBD {vbd_uuid} has userdevice {userdevice:?}, not a device number; \
                 coldclone names disks by it and backs up all of a VM's disks or none",
                str_field(&rec, "name_label")
            ))
        })?;
        if let Some((other, other_dev)) = named.get(&name) {
            return Err(BackendError::Unsupported(format!(
                "VM {}: disk VBDs {other} (userdevice {other_dev:?}) and {vbd_uuid} (userdevice \
                 {userdevice:?}) would both be disk {name}; give each disk its own userdevice",
                str_field(&rec, "name_label")
            )));
        }
        named.insert(name.clone(), (vbd_uuid, userdevice));
        let v = c.record("VDI", &vdi)?;
        out.push(DiskVbd {
            name,
            vbd: b,
            vdi_ref: vdi,
            vdi: v,
        });
    }
    Ok(out)
}

fn vm_disks(c: &Client, vm_ref: &str) -> Result<BTreeMap<String, (String, String, u64)>> {
    Ok(vm_disk_vbds(c, vm_ref)?
        .into_iter()
        .map(|d| {
            let (uuid, size) = (str_field(&d.vdi, "uuid"), u64_field(&d.vdi, "virtual_size"));
            (d.name, (d.vdi_ref, uuid, size))
        })
        .collect())
}

/// `xvd` + the userdevice number in xen-blkfront's letters (0 → a, 25 → z,
/// 26 → aa, 701 → zz, 702 → aaa): one name per number. None for anything
/// but a plain decimal number ("01" would name disk 1 a second way).
fn disk_name(userdevice: &str) -> Option<String> {
    if userdevice.is_empty()
        || !userdevice.bytes().all(|b| b.is_ascii_digit())
        || (userdevice.len() > 1 && userdevice.starts_with('0'))
    {
        return None;
    }
    let mut n: u64 = userdevice.parse().ok()?;
    let mut letters = vec![];
    loop {
        letters.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    letters.reverse();
    Some(format!("xvd{}", String::from_utf8_lossy(&letters)))
}

/// Every disk VDI of a VM, named or not (clean-up must not depend on naming).
fn disk_vdis(c: &Client, rec: &Value) -> Result<Vec<String>> {
    let mut out = vec![];
    for vbd in refs(rec, "VBDs") {
        let b = match c.record("VBD", &vbd) {
            Ok(b) => b,
            Err(XapiError::HandleInvalid { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        let vdi = str_field(&b, "VDI");
        if str_field(&b, "type") == "Disk" && vdi != NULL_REF && !vdi.is_empty() {
            out.push(vdi);
        }
    }
    Ok(out)
}

/// Destroys a VM coldclone made and its VDIs, in xe's order
/// (xapi-cli-server/cli_operations.ml `vm_uninstall_common`): the VDIs and
/// the suspend VDI are read first; `VM.hard_shutdown` if it is not Halted
/// (a Suspended VM loses its suspend VDI and its VBDs are detached, which
/// lets its VDIs go: xapi/xapi_vm.ml `hard_shutdown`); `VM.destroy`; each
/// VDI; the suspend VDI. A VDI already gone is fine.
fn destroy_vm_and_disks(c: &Client, vm_ref: &str) -> Result<()> {
    let rec = match c.record("VM", vm_ref) {
        Ok(r) => r,
        Err(XapiError::HandleInvalid { .. }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let vdis = disk_vdis(c, &rec)?;
    let suspend = str_field(&rec, "suspend_VDI");
    shut_and_destroy_vm(c, vm_ref, &rec)?;
    for vdi in vdis {
        destroy_vdi(c, &vdi)?;
    }
    if suspend != NULL_REF && !suspend.is_empty() {
        destroy_vdi(c, &suspend)?;
    }
    Ok(())
}

/// The first half of xe's order: the VM goes, its disk VDIs stay (its suspend VDI goes
/// with `VM.hard_shutdown` of a Suspended VM).
fn destroy_vm_keep_vdis(c: &Client, vm_ref: &str) -> Result<()> {
    let rec = match c.record("VM", vm_ref) {
        Ok(r) => r,
        Err(XapiError::HandleInvalid { .. }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    shut_and_destroy_vm(c, vm_ref, &rec)
}

fn shut_and_destroy_vm(c: &Client, vm_ref: &str, rec: &Value) -> Result<()> {
    if str_field(rec, "power_state") != "Halted" {
        match c.call("VM.hard_shutdown", vec![json!(vm_ref)]) {
            Ok(_) => {}
            // Halted meanwhile (the guest finished its shutdown).
            Err(XapiError::BadPowerState { actual, .. }) if actual == "halted" => {}
            Err(e) => return Err(e.into()),
        }
    }
    match c.call("VM.destroy", vec![json!(vm_ref)]) {
        Ok(_) | Err(XapiError::HandleInvalid { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Networks never leave the host's dom0: a network with no PIF reaches nothing.
fn network_has_pif(c: &Client, net: &str) -> Result<bool> {
    let pifs = c.call("network.get_PIFs", vec![json!(net)])?;
    Ok(pifs.as_array().is_none_or(|a| !a.is_empty()))
}

fn run_tag(work_dir: &Path) -> String {
    work_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| crate::util::random_hex(4))
}

pub fn checkpoint_label(tag: &str) -> String {
    format!("coldclone-checkpoint-{tag}")
}

pub fn network_label(tag: &str) -> String {
    format!("coldclone-isolated-{tag}")
}

/// xapi's version from `software_version["xapi"]` ("major.minor", xapi/xapi_globs.ml `software_version`).
fn parse_xapi_version(v: &str) -> Option<(u64, u64)> {
    let mut it = v.trim().split('.');
    let major = it.next()?.parse().ok()?;
    let minor = it.next().unwrap_or("0").parse().ok()?;
    Some((major, minor))
}

/// Refuses a pool with a host older than [`MIN_XAPI`] (the clone path needs
/// `VM.create` of a Suspended VM; `VM.resume` may place the clone on any
/// host, so every host must have it). Only reads.
fn check_pool_version(c: &Client, url: &str) -> Result<()> {
    let hosts = c.call("host.get_all", vec![])?;
    for h in hosts.as_array().into_iter().flatten() {
        let h = client::value_string(h);
        let rec = c.record("host", &h)?;
        let v = rec
            .get("software_version")
            .and_then(|s| s.get("xapi"))
            .map(client::value_string)
            .unwrap_or_default();
        let ok = parse_xapi_version(&v).is_some_and(|got| got >= MIN_XAPI);
        if !ok {
            return Err(BackendError::Unsupported(format!(
                "XAPI at {url}: host {} runs xapi {v:?}; coldclone needs xapi {}.{} or later \
                 (XCP-ng 8.3, XenServer 8): it restores the clone with VM.create of a Suspended VM, \
                 which older xapi refuses, and VM.clone of a checkpoint drops its memory",
                str_field(&rec, "name_label"),
                MIN_XAPI.0,
                MIN_XAPI.1
            )));
        }
    }
    Ok(())
}

/// This dom0's host uuid (`INSTALLATION_UUID=` in the xensource inventory).
fn local_host_uuid(inventory: &Path) -> Result<String> {
    let text = std::fs::read_to_string(inventory).map_err(crate::io_err(inventory))?;
    text.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == "INSTALLATION_UUID")
        .map(|(_, v)| v.trim().trim_matches('\'').trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            BackendError::Unsupported(format!(
                "{} names no INSTALLATION_UUID: cannot tell which host this dom0 is",
                inventory.display()
            ))
        })
}

/// The fields of the checkpoint's record `VM.create` takes as they are
/// (idl/datamodel_vm.ml, the StaticRO/RW fields; Xen Orchestra's
/// @xen-orchestra/xapi/vm.mjs `create` passes the same set).
const CREATE_FIELDS: &[&str] = &[
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
    "recommendations",
    "xenstore_data",
    "tags",
    "blocked_operations",
    "order",
    "start_delay",
    "shutdown_delay",
    "suspend_SR",
    "version",
    "generation_id",
    "hardware_platform_version",
    "has_vendor_device",
    "reference_label",
    "domain_type",
    "NVRAM",
    "last_boot_CPU_flags",
    "last_booted_record",
];

impl XapiBackend {
    /// Makes the run's network with no PIF (XAPI's host-internal network).
    fn make_network(
        &self,
        c: &Client,
        target: &XapiTarget,
        tag: &str,
        journal: &mut dyn Journal,
    ) -> Result<CloneNetwork> {
        let label = network_label(tag);
        journal.will_create(
            &XapiResource::XapiNetwork {
                target: target.clone(),
                name_label: label.clone(),
            }
            .into(),
        )?;
        let net = c.call_str(
            "network.create",
            vec![json!({
                "name_label": label,
                "name_description": "coldclone: isolated network (no PIF) for a backup clone; removed after the run",
                "MTU": 1500,
                "other_config": {"coldclone_run": tag},
                "tags": [],
            })],
        )?;
        if network_has_pif(c, &net)? {
            return Err(BackendError::Clone(format!(
                "the network {label} made for the clone has a PIF"
            )));
        }
        let rec = c.record("network", &net)?;
        let bridge = str_field(&rec, "bridge");
        journal.milestone("isolate:xapi-network-ready")?;
        Ok(CloneNetwork {
            namespace: network_isolation::Namespace::current(),
            bridge,
            tap_prefix: String::new(),
            handle: Some(net),
        })
    }

    /// Puts back a range `balloon` lowered, and forgets its journal entry.
    fn restore_range(&self, xv: &XapiVm, journal: &mut dyn Journal) -> Result<()> {
        let entry = match self.lowered.lock() {
            Ok(mut g) => g.remove(&xv.uuid),
            Err(p) => p.into_inner().remove(&xv.uuid),
        };
        if let Some((id, min, max)) = entry {
            xv.client.call(
                "VM.set_memory_dynamic_range",
                vec![json!(xv.vm_ref), json!(min), json!(max)],
            )?;
            journal.removed(id)?;
        }
        Ok(())
    }

    /// VDI.clone of `src` (one of the checkpoint's VDIs) named `name`,
    /// journaled first. Returns (ref, uuid, size, journal id, SR uuid).
    fn clone_vdi(
        &self,
        c: &Client,
        target: &XapiTarget,
        src: &str,
        name: &str,
        journal: &mut dyn Journal,
    ) -> Result<(String, String, u64, u64, String)> {
        let rec = c.record("VDI", src)?;
        let src_uuid = str_field(&rec, "uuid");
        let sr = c.record("SR", &str_field(&rec, "SR"))?;
        // The mark the clone inherits (a retried run finds it already there).
        match c.call(
            "VDI.add_to_other_config",
            vec![json!(src), json!(CLONE_SOURCE_KEY), json!(src_uuid)],
        ) {
            Ok(_) => {}
            Err(e) if is_code(&e, "MAP_DUPLICATE_KEY") => {}
            Err(e) => return Err(e.into()),
        }
        let sr_uuid = str_field(&sr, "uuid");
        let id = journal.will_create(
            &XapiResource::XapiVdi {
                target: target.clone(),
                name_label: Some(name.to_string()),
                uuid: None,
                sr_uuid: Some(sr_uuid.clone()),
                source_uuid: Some(src_uuid),
            }
            .into(),
        )?;
        let vdi = c.call_async("VDI.clone", vec![json!(src), json!({})], self.task_timeout)?;
        c.call("VDI.set_name_label", vec![json!(vdi), json!(name)])?;
        let v = c.record("VDI", &vdi)?;
        Ok((
            vdi,
            str_field(&v, "uuid"),
            u64_field(&v, "virtual_size"),
            id,
            sr_uuid,
        ))
    }
}

impl Hypervisor for XapiBackend {
    fn name(&self) -> &'static str {
        "xapi"
    }

    fn inspect(&self, vm: &VmLocator) -> Result<VmInfo> {
        let VmLocator::Xapi {
            url,
            vm: handle,
            credentials_file,
            options,
        } = vm
        else {
            return Err(BackendError::Unsupported(
                "the XAPI backend was handed another backend's VM".into(),
            ));
        };
        let target = XapiTarget {
            url: url.clone(),
            credentials_file: credentials_file.clone(),
            tls_fingerprint_sha256: options.tls_fingerprint_sha256.clone(),
            insecure_http: options.insecure_http,
        };
        let c = Arc::new(Client::login(&target)?);
        let vm_ref = if looks_like_uuid(handle) {
            c.call_str("VM.get_by_uuid", vec![json!(handle)])?
        } else {
            let mut found = vec![];
            let all = c.call("VM.get_by_name_label", vec![json!(handle)])?;
            for r in all.as_array().into_iter().flatten() {
                let r = client::value_string(r);
                let rec = c.record("VM", &r)?;
                if rec.get("is_a_template") != Some(&json!(true))
                    && rec.get("is_a_snapshot") != Some(&json!(true))
                {
                    found.push(r);
                }
            }
            match found.len() {
                1 => found.remove(0),
                0 => {
                    return Err(BackendError::Unsupported(format!(
                        "XAPI at {url} has no VM named {handle:?}"
                    )))
                }
                n => {
                    return Err(BackendError::Unsupported(format!(
                        "XAPI at {url} has {n} VMs named {handle:?}; name it by uuid"
                    )))
                }
            }
        };
        let rec = c.record("VM", &vm_ref)?;
        if rec.get("is_a_template") == Some(&json!(true))
            || rec.get("is_control_domain") == Some(&json!(true))
        {
            return Err(BackendError::Unsupported(format!(
                "{handle} is a template or a control domain, not a VM to back up"
            )));
        }
        let allowed = refs(&rec, "allowed_operations");
        let disks = vm_disks(&c, &vm_ref)?;
        check_pool_version(&c, url)?;
        let info = VmInfo {
            name: str_field(&rec, "name_label"),
            backend: "xapi",
            running: str_field(&rec, "power_state") == "Running",
            memory_bytes: u64_field(&rec, "memory_static_max"),
            disks: disks
                .iter()
                .map(|(name, (_, uuid, bytes))| DiskInfo {
                    name: name.clone(),
                    file: PathBuf::from(format!("xapi:vdi/{uuid}")),
                    format: "raw".into(),
                    read_only: false,
                    bytes: *bytes,
                })
                .collect(),
            nics: refs(&rec, "VIFs").len(),
            detail: Opaque::new(XapiVm {
                client: c,
                target,
                vm_ref,
                uuid: str_field(&rec, "uuid"),
                pv_drivers: allowed.iter().any(|o| o == "clean_shutdown"),
                memory_static_min: u64_field(&rec, "memory_static_min"),
                memory_dynamic_min: u64_field(&rec, "memory_dynamic_min"),
                memory_dynamic_max: u64_field(&rec, "memory_dynamic_max"),
            }),
        };
        Ok(info)
    }

    fn checkpoint(
        &self,
        vm: &VmInfo,
        work_dir: &Path,
        journal: &mut dyn Journal,
    ) -> Result<Checkpoint> {
        let xv = xapi_vm(vm)?;
        if !vm.running {
            return Err(BackendError::Checkpoint(
                "the VM is not running; coldclone backs up running VMs".into(),
            ));
        }
        let c = &xv.client;
        let run = run_tag(work_dir);
        let label = checkpoint_label(&run);
        // CBT on before the snapshot, so that the snapshot is a map (Xen Orchestra
        // enables it right before its snapshot too).
        let before = cbt::prepare(c, &vm_disk_vbds(c, &xv.vm_ref)?);
        let id = journal.will_create(
            &XapiResource::XapiVm {
                target: xv.target.clone(),
                name_label: label.clone(),
            }
            .into(),
        )?;
        let t = Instant::now();
        let r = c.call_async(
            "VM.checkpoint",
            vec![json!(xv.vm_ref), json!(label)],
            self.task_timeout,
        );
        let took = t.elapsed().as_secs_f64() * 1000.0;
        // XAPI resumes the original itself; make sure, whatever happened.
        match c.call_str("VM.get_power_state", vec![json!(xv.vm_ref)]) {
            Ok(ps) if ps == "Paused" => {
                tracing::warn!("the original is paused after the checkpoint; unpausing it");
                c.call("VM.unpause", vec![json!(xv.vm_ref)])?;
            }
            Ok(ps) if ps == "Suspended" => {
                tracing::warn!("the original is suspended after the checkpoint; resuming it");
                c.call(
                    "VM.resume",
                    vec![json!(xv.vm_ref), json!(false), json!(false)],
                )?;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("cannot read the original's power state: {e}"),
        }
        // The memory image is taken: the original gets its memory back now
        // (the journal entry stays the undo if this fails).
        let restored = self.restore_range(xv, journal);
        let ckpt = r?;
        restored?;
        journal.milestone("checkpoint:disks-snapshotted")?;
        let rec = c.record("VM", &ckpt)?;
        let suspend = str_field(&rec, "suspend_VDI");
        let (memory_image_bytes, suspend_uuid) = if suspend != NULL_REF && !suspend.is_empty() {
            let v = c.record("VDI", &suspend)?;
            (u64_field(&v, "virtual_size"), str_field(&v, "uuid"))
        } else {
            (0, String::new())
        };
        let ckpt_vbds = vm_disk_vbds(c, &ckpt)?;
        let disks: BTreeMap<String, (String, String, u64)> = ckpt_vbds
            .iter()
            .map(|d| {
                let (uuid, size) = (str_field(&d.vdi, "uuid"), u64_field(&d.vdi, "virtual_size"));
                (d.name.clone(), (d.vdi_ref.clone(), uuid, size))
            })
            .collect();
        // The checkpoint's VDIs outlive its VM between VM.destroy and
        // VDI.destroy: each gets its own entry (undone before the VM's).
        let mut vdi_ids = vec![];
        let mut disk_ids = BTreeMap::new();
        for (name, uuid) in disks
            .iter()
            .map(|(n, (_, u, _))| (Some(n.clone()), u.clone()))
            .chain((!suspend_uuid.is_empty()).then(|| (None, suspend_uuid.clone())))
        {
            let id = journal.will_create(
                &XapiResource::XapiVdi {
                    target: xv.target.clone(),
                    name_label: None,
                    uuid: Some(uuid),
                    sr_uuid: None,
                    source_uuid: None,
                }
                .into(),
            )?;
            vdi_ids.push(id);
            if let Some(n) = name {
                disk_ids.insert(n, id);
            }
        }
        let (tracked, change_maps) = cbt::after_checkpoint(c, &before, &ckpt_vbds, &disk_ids);
        let disks = disks
            .into_iter()
            .map(|(name, (_, uuid, bytes))| FrozenDisk {
                name,
                frozen_file: PathBuf::from(format!("xapi:vdi/{uuid}")),
                format: "raw".into(),
                bytes,
            })
            .collect();
        Ok(Checkpoint {
            method: "xapi-checkpoint",
            memory_image: PathBuf::from(if suspend_uuid.is_empty() {
                String::new()
            } else {
                format!("xapi:vdi/{suspend_uuid}")
            }),
            memory_image_bytes,
            pause: PauseTimes {
                total_ms: took,
                disk_snapshot_ms: 0.0,
                memory_ms: took,
            },
            disks,
            guest_memory_bytes: Some(memory_image_bytes),
            detail: Opaque::new(XapiCheckpoint {
                vm_ref: ckpt,
                journal_id: id,
                vdi_ids,
                run,
                tracked,
            }),
            change_maps,
            ..Default::default()
        })
    }

    fn isolated_network(
        &self,
        vm: &VmInfo,
        run_id: &str,
        journal: &mut dyn Journal,
    ) -> Result<Option<CloneNetwork>> {
        let xv = xapi_vm(vm)?;
        self.make_network(&xv.client, &xv.target, run_id, journal)
            .map(Some)
    }

    fn restore_clone(
        &self,
        vm: &VmInfo,
        checkpoint: &Checkpoint,
        net: &CloneNetwork,
        clone_name: &str,
        _work_dir: &Path,
        journal: &mut dyn Journal,
    ) -> Result<PausedClone> {
        let xv = xapi_vm(vm)?;
        let c = &xv.client;
        let (ckpt, tracked) = checkpoint
            .detail
            .get::<XapiCheckpoint>()
            .map(|k| (k.vm_ref.clone(), k.tracked.clone()))
            .ok_or_else(|| BackendError::Clone("no XAPI checkpoint to clone".into()))?;
        let bridge = net.bridge.clone();
        let net = net.handle.clone().ok_or_else(|| {
            BackendError::Clone(
                "no isolated XAPI network: the pipeline must call isolated_network first".into(),
            )
        })?;
        let rec = c.record("VM", &ckpt)?;
        let suspend = str_field(&rec, "suspend_VDI");
        if suspend == NULL_REF || suspend.is_empty() {
            return Err(BackendError::Clone(
                "the checkpoint has no suspend VDI: there is no memory to resume".into(),
            ));
        }
        let mut pc = PausedClone {
            name: clone_name.to_string(),
            taps: vec![],
            disks: vec![],
            console_log: PathBuf::new(),
            detail: OpaqueMut::new(XapiClone {
                client: c.clone(),
                network: net.clone(),
                bridge,
                vm_ref: String::new(),
                uuid: String::new(),
                journal_id: 0,
                vdi_ids: vec![],
                vifs: vec![],
                disks: BTreeMap::new(),
                cbt_bases: BTreeMap::new(),
                shutdown_task: None,
                // Nothing to destroy until the VM exists; its VDIs are journaled.
                destroyed: true,
            }),
        };
        // 1. The disks and the memory, each cloned and named for the run.
        let mut disks = BTreeMap::new();
        let mut vbds = vec![];
        for d in vm_disk_vbds(c, &ckpt)? {
            let (r, uuid, size, id, sr_uuid) = self.clone_vdi(
                c,
                &xv.target,
                &d.vdi_ref,
                &format!("{clone_name}-{}", d.name),
                journal,
            )?;
            xapi_clone(&mut pc.detail)?.vdi_ids.push((id, r.clone()));
            // The clone's own writes, for the next run's map (a VDI.clone is not tracked).
            if let Some(t) = tracked.get(&d.name) {
                match cbt::track_clone_vdi(
                    c,
                    &xv.target,
                    &r,
                    &format!("{clone_name}-{}-cbt-base", d.name),
                    (&sr_uuid, &t.vdi_uuid),
                    self.task_timeout,
                    journal,
                ) {
                    Ok((base, bid)) => {
                        let x = xapi_clone(&mut pc.detail)?;
                        x.vdi_ids.push((bid, base.clone()));
                        x.cbt_bases.insert(d.name.clone(), base);
                    }
                    Err(e) => tracing::warn!(
                        disk = d.name,
                        "the clone's writes cannot be tracked ({e}); the next backup reads \
                         this disk whole"
                    ),
                }
            }
            disks.insert(d.name.clone(), (r.clone(), uuid, size));
            vbds.push((r, d.vbd));
        }
        let (mem, _, _, id, _) = self.clone_vdi(
            c,
            &xv.target,
            &suspend,
            &format!("{clone_name}-memory"),
            journal,
        )?;
        xapi_clone(&mut pc.detail)?.vdi_ids.push((id, mem.clone()));
        journal.milestone("restore:vdis-cloned")?;
        // 2. A Suspended VM from the checkpoint's record with the cloned memory
        // (xapi/xapi_vm.ml `create`).
        let journal_id = journal.will_create(
            &XapiResource::XapiVm {
                target: xv.target.clone(),
                name_label: clone_name.to_string(),
            }
            .into(),
        )?;
        let mut create = serde_json::Map::new();
        for k in CREATE_FIELDS {
            if let Some(v) = rec.get(*k) {
                create.insert(k.to_string(), v.clone());
            }
        }
        let mut other_config = rec
            .get("other_config")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        // A fresh mac_seed is made when there is none; the VIFs get their MACs explicitly.
        other_config.remove("mac_seed");
        other_config.insert("coldclone_clone".into(), json!(clone_name));
        create.insert("name_label".into(), json!(clone_name));
        create.insert("other_config".into(), Value::Object(other_config));
        create.insert("is_a_template".into(), json!(false));
        create.insert("ha_always_run".into(), json!(false));
        create.insert("ha_restart_priority".into(), json!(""));
        create.insert("affinity".into(), json!(NULL_REF));
        create.insert("appliance".into(), json!(NULL_REF));
        create.insert("power_state".into(), json!("Suspended"));
        create.insert("suspend_VDI".into(), json!(mem));
        let clone = c.call_str("VM.create", vec![Value::Object(create)])?;
        {
            let d = xapi_clone(&mut pc.detail)?;
            d.vm_ref = clone.clone();
            d.journal_id = journal_id;
            d.destroyed = false;
        }
        // 3. The disks attached as the checkpoint had them (xapi/xapi_vbd.ml
        // `create` keeps device and currently_attached for a Suspended VM).
        for (vdi, b) in &vbds {
            c.call(
                "VBD.create",
                vec![json!({
                    "VM": clone, "VDI": vdi,
                    "userdevice": str_field(b, "userdevice"),
                    "device": str_field(b, "device"),
                    "bootable": b.get("bootable").cloned().unwrap_or(json!(false)),
                    "mode": str_field(b, "mode"),
                    "type": "Disk",
                    "unpluggable": b.get("unpluggable").cloned().unwrap_or(json!(true)),
                    "empty": false,
                    "other_config": {},
                    "currently_attached": b.get("currently_attached").cloned().unwrap_or(json!(true)),
                    "qos_algorithm_type": "",
                    "qos_algorithm_params": {},
                })],
            )?;
        }
        // 4. Every NIC straight onto the run's network, never anywhere else
        // (xapi/xapi_vif.ml `create`); the same MAC, which the guest's memory holds.
        let mut vif_uuids = vec![];
        for vif in refs(&rec, "VIFs") {
            let v = c.record("VIF", &vif)?;
            let mtu = v.get("MTU").and_then(Value::as_i64).unwrap_or(1500);
            let made = c.call_str(
                "VIF.create",
                vec![json!({
                    "device": str_field(&v, "device"),
                    "network": net,
                    "VM": clone,
                    "MAC": str_field(&v, "MAC"),
                    "MTU": mtu,
                    "other_config": {},
                    "currently_attached": true,
                    "qos_algorithm_type": "",
                    "qos_algorithm_params": {},
                    "locking_mode": "network_default",
                    "ipv4_allowed": [],
                    "ipv6_allowed": [],
                })],
            )?;
            vif_uuids.push(str_field(&c.record("VIF", &made)?, "uuid"));
        }
        let crec = c.record("VM", &clone)?;
        pc.disks = disks
            .iter()
            .map(|(name, (_, uuid, bytes))| CloneDisk {
                name: name.clone(),
                overlay: PathBuf::from(format!("xapi:vdi/{uuid}")),
                bytes: *bytes,
            })
            .collect();
        pc.taps = vif_uuids.clone();
        {
            let d = xapi_clone(&mut pc.detail)?;
            d.vifs = vif_uuids;
            d.disks = disks;
            d.uuid = str_field(&crec, "uuid");
        }
        journal.milestone("restore:clone-created")?;
        c.call_async(
            "VM.resume",
            vec![json!(clone), json!(true), json!(false)],
            self.task_timeout,
        )?;
        let ps = c.call_str("VM.get_power_state", vec![json!(clone)])?;
        if ps != "Paused" {
            return Err(BackendError::Clone(format!(
                "the clone is {ps} after a paused resume; isolation was not checked yet"
            )));
        }
        journal.milestone("restore:memory-loaded")?;
        Ok(pc)
    }

    fn verify_isolation(
        &self,
        clone: &mut PausedClone,
    ) -> Result<Option<network_isolation::Verified>> {
        let d = xapi_clone(&mut clone.detail)?;
        let (c, net, bridge) = (d.client.clone(), d.network.clone(), d.bridge.clone());
        let rec = c.record("VM", &d.vm_ref)?;
        let mut problems = vec![];
        if str_field(&rec, "power_state") != "Paused" {
            problems.push(format!(
                "the clone is {}, not Paused",
                str_field(&rec, "power_state")
            ));
        }
        let vifs = refs(&rec, "VIFs");
        if vifs.len() != d.vifs.len() {
            problems.push(format!(
                "the clone has {} VIFs, {} were made",
                vifs.len(),
                d.vifs.len()
            ));
        }
        let mut ports = vec![];
        for vif in &vifs {
            let v = c.record("VIF", vif)?;
            ports.push(str_field(&v, "uuid"));
            let on = str_field(&v, "network");
            if network_has_pif(&c, &on)? {
                problems.push(format!(
                    "VIF {} is on network {on}, which has a PIF (an uplink)",
                    str_field(&v, "device")
                ));
            } else if on != net {
                problems.push(format!(
                    "VIF {} is on network {on}, not the run's isolated network",
                    str_field(&v, "device")
                ));
            }
        }
        if !problems.is_empty() {
            return Err(BackendError::Network(
                network_isolation::IsolationError::NotIsolated { bridge, problems },
            ));
        }
        Ok(Some(network_isolation::Verified {
            bridge,
            namespace: None,
            ports,
        }))
    }

    fn resume_clone(
        &self,
        clone: &mut PausedClone,
        verified: &network_isolation::Verified,
    ) -> Result<()> {
        let d = xapi_clone(&mut clone.detail)?;
        let c = d.client.clone();
        if verified.bridge != d.bridge || d.vifs.iter().any(|v| !verified.ports.contains(v)) {
            return Err(BackendError::Clone(
                "the clone's VIFs are not the ones whose isolation was verified".into(),
            ));
        }
        c.call("VM.unpause", vec![json!(d.vm_ref)])?;
        Ok(())
    }

    fn request_stop(&self, clone: &mut PausedClone, method: StopMethod) -> Result<()> {
        let d = xapi_clone(&mut clone.detail)?;
        let c = d.client.clone();
        match method {
            StopMethod::Pv => {
                // Async: the guest takes its time; wait_stopped watches the VM and this task.
                let task = c.call_str("Async.VM.clean_shutdown", vec![json!(d.vm_ref)])?;
                d.shutdown_task = Some(task);
                Ok(())
            }
            StopMethod::Acpi if self.options.dom0_acpi => {
                // VM.resume may have placed the clone on any host of the pool
                // (xapi/message_forwarding.ml): a domid means something only on
                // the host the clone runs on, so the button is pressed only when
                // that is this dom0's host, and only on the clone's own domain.
                let inventory = self
                    .options
                    .dom0_inventory
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("/etc/xensource-inventory"));
                let here = local_host_uuid(&inventory)?;
                let host = c.call_str("VM.get_resident_on", vec![json!(d.vm_ref)])?;
                let host_uuid = c.call_str("host.get_uuid", vec![json!(host)])?;
                if host_uuid != here {
                    return Err(BackendError::Unsupported(format!(
                        "the clone runs on host {host_uuid}, not on this dom0's host {here}: \
                         `xl trigger` here would press the button of whatever domain has the \
                         clone's id on this host. The ACPI path works only when the clone lands \
                         on the host coldclone runs on"
                    )));
                }
                let domid = c.call("VM.get_domid", vec![json!(d.vm_ref)])?;
                let domid = domid.as_i64().filter(|n| *n > 0).ok_or_else(|| {
                    XapiError::Protocol {
                        method: "VM.get_domid".into(),
                        detail: format!("expected a domain id (an Int), got {domid}"),
                    }
                })?;
                let mut list = std::process::Command::new("xl");
                list.args(["list", "-l", &domid.to_string()]);
                let out = crate::util::run_tool(list)?;
                let owner = serde_json::from_str::<Value>(&out)
                    .ok()
                    .and_then(|v| {
                        v.get(0)
                            .and_then(|d| d.pointer("/config/c_info/uuid"))
                            .map(client::value_string)
                    })
                    .unwrap_or_default();
                if owner != d.uuid {
                    return Err(BackendError::Clone(format!(
                        "domain {domid} on this host is {owner:?}, not the clone {}: the ACPI \
                         button is not pressed",
                        d.uuid
                    )));
                }
                let mut cmd = std::process::Command::new("xl");
                cmd.args(["trigger", &domid.to_string(), "power"]);
                crate::util::run_tool(cmd).map(|_| ())
            }
            StopMethod::Acpi => Err(BackendError::Unsupported(
                "this guest has no PV drivers, so VM.clean_shutdown fails (VM_LACKS_FEATURE), and XAPI has no \
                 ACPI power-button call (VM.send_trigger is not implemented). Install the guest tools, or run \
                 coldclone in the host's dom0 with xapi_dom0_acpi = true so the button is pressed with `xl trigger`"
                    .into(),
            )),
        }
    }

    fn wait_stopped(&self, clone: &mut PausedClone, timeout: Duration) -> Result<CloneOutcome> {
        let d = xapi_clone(&mut clone.detail)?;
        let c = d.client.clone();
        let start = Instant::now();
        let mut classes = vec![json!(format!("vm/{}", d.vm_ref))];
        if let Some(t) = &d.shutdown_task {
            classes.push(json!(format!("task/{t}")));
        }
        let mut token = String::new();
        let mut outcome = None;
        let mut reissued = 0;
        // The guest refused or never finished (xenopsd's timeouts): power it off.
        let mut give_up = false;
        while outcome.is_none() && !give_up {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                break;
            }
            let batch = c.call(
                "event.from",
                vec![
                    json!(classes),
                    json!(token),
                    json!(left.as_secs_f64().min(30.0)),
                ],
            )?;
            token = str_field(&batch, "token");
            if c.call_str("VM.get_power_state", vec![json!(d.vm_ref)])? == "Halted" {
                outcome = Some(CloneOutcome::StoppedByGuest);
                break;
            }
            if let Some(t) = d.shutdown_task.clone() {
                let rec = c.record("task", &t)?;
                let status = str_field(&rec, "status");
                if status != "pending" && status != "success" {
                    let info: Vec<String> = refs(&rec, "error_info");
                    let e = XapiError::from_description("VM.clean_shutdown", &info);
                    // xenopsd/lib/xenops_server.ml VM_shutdown_domain: no
                    // acknowledgement, or acknowledged and not halted in time.
                    if is_code(&e, "VM_FAILED_SHUTDOWN_ACKNOWLEDGMENT")
                        || is_code(&e, "VM_SHUTDOWN_TIMEOUT")
                    {
                        tracing::warn!("the clone's guest did not shut down: {e}");
                        c.destroy_task(&t);
                        d.shutdown_task = None;
                        give_up = true;
                        continue;
                    }
                    if !client::is_busy(&e) || reissued >= 5 {
                        return Err(e.into());
                    }
                    reissued += 1;
                    c.destroy_task(&t);
                    d.shutdown_task = None;
                    std::thread::sleep(Duration::from_millis(200 * reissued));
                    let nt = c.call_str("Async.VM.clean_shutdown", vec![json!(d.vm_ref)])?;
                    classes = vec![
                        json!(format!("vm/{}", d.vm_ref)),
                        json!(format!("task/{nt}")),
                    ];
                    d.shutdown_task = Some(nt);
                }
            }
        }
        let outcome = match outcome {
            Some(o) => o,
            None => {
                tracing::warn!("the clone did not power off; hard shutdown");
                match c.call("VM.hard_shutdown", vec![json!(d.vm_ref)]) {
                    Ok(_) => CloneOutcome::Killed,
                    Err(XapiError::BadPowerState { .. })
                        if c.call_str("VM.get_power_state", vec![json!(d.vm_ref)])? == "Halted" =>
                    {
                        CloneOutcome::StoppedByGuest
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        if let Some(t) = d.shutdown_task.take() {
            let _ = c.wait_task(&t, "VM.clean_shutdown", Duration::from_secs(30));
        }
        Ok(outcome)
    }

    fn destroy_clone(&self, clone: &mut PausedClone, journal: &mut dyn Journal) -> Result<()> {
        let d = xapi_clone(&mut clone.detail)?;
        let c = d.client.clone();
        if let Some(t) = d.shutdown_task.take() {
            let _ = c.call("task.cancel", vec![json!(t)]);
            c.destroy_task(&t);
        }
        if !d.destroyed {
            destroy_vm_and_disks(&c, &d.vm_ref)?;
            journal.removed(d.journal_id)?;
            d.destroyed = true;
        }
        // The clone's disks went with it, in xe's order; its memory VDI went
        // at resume. Each is asked for once more before its entry goes.
        for (id, vdi) in std::mem::take(&mut d.vdi_ids) {
            destroy_vdi(&c, &vdi)?;
            journal.removed(id)?;
        }
        Ok(())
    }

    fn export_disk(&self, clone: &PausedClone, disk: &CloneDisk, dest: &Path) -> Result<()> {
        let d: &XapiClone = clone.detail.get().ok_or_else(|| {
            BackendError::Unsupported("the XAPI backend was handed another backend's clone".into())
        })?;
        let (vdi, uuid, size) =
            d.disks.get(&disk.name).cloned().ok_or_else(|| {
                BackendError::Clone(format!("no clone VDI for disk {}", disk.name))
            })?;
        d.client
            .export_raw_vdi(&vdi, &uuid, size, dest, self.export_attempts)?;
        Ok(())
    }

    /// `/export_raw_vdi` read straight into the repository.
    fn disk_access(&self, _clone: &PausedClone, _disk: &CloneDisk) -> crate::DiskAccess {
        crate::DiskAccess::Stream
    }

    fn open_disk_stream(&self, clone: &PausedClone, disk: &CloneDisk) -> Result<crate::DiskStream> {
        let d: &XapiClone = clone.detail.get().ok_or_else(|| {
            BackendError::Unsupported("the XAPI backend was handed another backend's clone".into())
        })?;
        let (vdi, uuid, size) =
            d.disks.get(&disk.name).cloned().ok_or_else(|| {
                BackendError::Clone(format!("no clone VDI for disk {}", disk.name))
            })?;
        let s = d
            .client
            .stream_raw_vdi(&vdi, &uuid, size, self.export_attempts)?;
        Ok(crate::DiskStream {
            len: size,
            reader: Box::new(s),
        })
    }

    /// What the halted clone wrote: CBT of its VDI since the snapshot taken before it ran.
    fn clone_writes(
        &self,
        clone: &PausedClone,
        disk: &CloneDisk,
        _journal: &mut dyn Journal,
    ) -> Result<Option<Vec<crate::ChangedRange>>> {
        let Some(d) = clone.detail.get::<XapiClone>() else {
            return Ok(None);
        };
        let (Some(base), Some((vdi, _, size))) =
            (d.cbt_bases.get(&disk.name), d.disks.get(&disk.name))
        else {
            return Ok(None);
        };
        cbt::clone_writes(&d.client, base, vdi, *size).map(Some)
    }

    /// Once stored, each tracked disk snapshot is kept as metadata only for the next run.
    fn settle_change_maps(
        &self,
        vm: &VmInfo,
        checkpoint: &Checkpoint,
        stored: bool,
        journal: &mut dyn Journal,
    ) -> Result<()> {
        let Some(k) = checkpoint.detail.get::<XapiCheckpoint>() else {
            return Ok(());
        };
        if !stored {
            return Ok(());
        }
        let c = &xapi_vm(vm)?.client;
        cbt::keep(c, &k.vm_ref, &k.run, &k.tracked, journal)?;
        journal.milestone("archive:maps-kept")
    }

    fn release_checkpoint(
        &self,
        vm: &VmInfo,
        checkpoint: &Checkpoint,
        journal: &mut dyn Journal,
    ) -> Result<()> {
        let c = &xapi_vm(vm)?.client;
        if let Some(k) = checkpoint.detail.get::<XapiCheckpoint>() {
            destroy_vm_and_disks(c, &k.vm_ref)?;
            for id in k.vdi_ids.iter().rev() {
                journal.removed(*id)?;
            }
            journal.removed(k.journal_id)?;
        }
        Ok(())
    }

    fn clone_uses_local_memory(&self) -> bool {
        false
    }

    fn stop_methods(&self, vm: &VmInfo) -> StopMethod {
        match xapi_vm(vm) {
            Ok(x) if x.pv_drivers => StopMethod::Pv,
            _ => StopMethod::Acpi,
        }
    }

    fn balloon_supported(&self, _vm: &VmInfo) -> bool {
        true
    }

    /// The clone may land on any host (xapi/message_forwarding.ml VM.resume):
    /// the most free on one host (`host.compute_free_memory`) is what it can get.
    fn clone_memory_pool(&self, vm: &VmInfo) -> Result<Option<crate::PoolRoom>> {
        let xv = xapi_vm(vm)?;
        let c = &xv.client;
        let mut best = 0;
        for h in c
            .call("host.get_all", vec![])?
            .as_array()
            .into_iter()
            .flatten()
        {
            let free = c.call("host.compute_free_memory", vec![h.clone()])?;
            best = best.max(client::value_u64(&free).unwrap_or(0));
        }
        Ok(Some(crate::PoolRoom {
            pool: xv.target.url.clone(),
            free_bytes: best,
        }))
    }

    /// Lowers the original's dynamic range to `target_bytes`
    /// (xapi/xapi_vm.ml `set_memory_dynamic_range`; the guest's balloon
    /// driver follows it), journaled first; put back after the checkpoint.
    fn balloon(&self, vm: &VmInfo, target_bytes: u64, journal: &mut dyn Journal) -> Result<u64> {
        let xv = xapi_vm(vm)?;
        let c = &xv.client;
        let rec = c.record("VM", &xv.vm_ref)?;
        let (smin, dmin, dmax) = (
            u64_field(&rec, "memory_static_min"),
            u64_field(&rec, "memory_dynamic_min"),
            u64_field(&rec, "memory_dynamic_max"),
        );
        if target_bytes < smin {
            return Err(BackendError::Unsupported(format!(
                "the balloon target {} MiB is below the VM's memory_static_min {} MiB, which XAPI \
                 refuses (MEMORY_CONSTRAINT_VIOLATION)",
                target_bytes >> 20,
                smin >> 20
            )));
        }
        let before = self.memory_actual(vm)?.unwrap_or(dmax);
        if target_bytes >= dmax {
            return Ok(before);
        }
        let id = journal.will_create(
            &XapiResource::XapiMemoryRange {
                target: xv.target.clone(),
                vm_uuid: xv.uuid.clone(),
                dynamic_min: dmin,
                dynamic_max: dmax,
            }
            .into(),
        )?;
        match self.lowered.lock() {
            Ok(mut g) => g.insert(xv.uuid.clone(), (id, dmin, dmax)),
            Err(p) => p.into_inner().insert(xv.uuid.clone(), (id, dmin, dmax)),
        };
        c.call(
            "VM.set_memory_dynamic_range",
            vec![
                json!(xv.vm_ref),
                json!(dmin.min(target_bytes)),
                json!(target_bytes),
            ],
        )?;
        Ok(before)
    }

    /// The VM's record through the allow-list of [`definition`], with its VBD and VIF
    /// layout: what `restore --as NEW --sr SR` makes the VM again from.
    fn vm_definition(&self, vm: &VmInfo) -> Result<Option<crate::VmDefinition>> {
        let xv = xapi_vm(vm)?;
        let def = definition::read(&xv.client, &xv.vm_ref)?;
        let text = serde_json::to_string_pretty(&def)
            .map_err(|e| BackendError::Unsupported(format!("the VM's definition: {e}")))?;
        Ok(Some(crate::VmDefinition {
            kind: crate::VmDefinitionKind::XapiVmRecord,
            text,
        }))
    }

    /// VM_metrics.memory_actual: what the domain holds now.
    fn memory_actual(&self, vm: &VmInfo) -> Result<Option<u64>> {
        let xv = xapi_vm(vm)?;
        let c = &xv.client;
        let metrics = c.call_str("VM.get_metrics", vec![json!(xv.vm_ref)])?;
        let v = c.call("VM_metrics.get_memory_actual", vec![json!(metrics)])?;
        Ok(client::value_u64(&v))
    }
}

#[cfg(test)]
mod tests {
    use super::{disk_name, parse_xapi_version, MIN_XAPI};

    #[test]
    fn userdevices_name_disks_one_to_one() {
        assert_eq!(disk_name("0").as_deref(), Some("xvda"));
        assert_eq!(disk_name("1").as_deref(), Some("xvdb"));
        assert_eq!(disk_name("25").as_deref(), Some("xvdz"));
        assert_eq!(disk_name("26").as_deref(), Some("xvdaa"));
        assert_eq!(disk_name("27").as_deref(), Some("xvdab"));
        assert_eq!(disk_name("701").as_deref(), Some("xvdzz"));
        assert_eq!(disk_name("702").as_deref(), Some("xvdaaa"));
        let names: std::collections::BTreeSet<String> = (0..2000)
            .filter_map(|n| disk_name(&n.to_string()))
            .collect();
        assert_eq!(names.len(), 2000, "no two device numbers share a name");
        for bad in ["", "x", "autodetect", "-1", "01", "1.5", " 1"] {
            assert_eq!(disk_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn xapi_versions_compare_old_and_calendar_numbers() {
        assert!(parse_xapi_version("1.249").unwrap() < MIN_XAPI);
        assert!(parse_xapi_version("1.257").unwrap() >= MIN_XAPI);
        // Calendar versions (xapi 23.x on) are newer than every 1.x.
        assert!(parse_xapi_version("24.11").unwrap() >= MIN_XAPI);
        assert_eq!(parse_xapi_version("x"), None);
    }
}
