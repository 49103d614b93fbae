//! XAPI backend (XenServer / XCP-ng), over XAPI's JSON-RPC.
//!
//! checkpoint = `VM.checkpoint` (memory in a suspend VDI + disk snapshots,
//! the original resumed by XAPI) → clone = `VM.clone` of the checkpoint, made
//! startable (`VM.set_is_a_template false`), still suspended with its memory
//! → every VIF `VIF.move`d to a network made for the run with no PIF →
//! `VM.resume(start_paused)` → check that no VIF is on a network with a PIF →
//! `VM.unpause` → `VM.clean_shutdown` → wait with `event.from` → export the
//! clone's VDIs (`/export_raw_vdi`) → destroy clone, VDIs, checkpoint, network.
//!
//! Journal entries name XAPI objects by name label (unique per run, known
//! before the object exists) and the host by URL and credential *source*.
//! `VM.destroy` keeps VDIs, so a VM's VDIs are destroyed first, then the VM:
//! a crash in between leaves the VM, which the next clean-up finds again.
//!
//! Tested against `xapi-sim`, not a real host: see docs/xapi.md.

pub mod client;

pub use client::{Client, XapiError, XapiTarget};

use crate::{
    BackendError, Checkpoint, CloneDisk, CloneNetwork, CloneOutcome, DiskInfo, FrozenDisk,
    Hypervisor, Journal, Opaque, OpaqueMut, PauseTimes, PausedClone, Result, StopMethod, VmInfo,
    VmLocator,
};
use client::{refs, str_field, u64_field, NULL_REF};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Per-VM settings of the XAPI backend, from the config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct XapiOptions {
    /// SHA-256 fingerprint of the host's (self-signed) certificate.
    pub tls_fingerprint_sha256: Option<String>,
    /// coldclone runs in the host's dom0: an HVM guest without PV drivers can
    /// be sent the ACPI power button with `xl trigger DOMID power`.
    #[serde(default)]
    pub dom0_acpi: bool,
    /// Accept an `http://` URL (the simulator, a lab host): passwords and session ids
    /// then travel in the clear. Off unless the config says `xapi_insecure_http = true`.
    #[serde(default)]
    pub insecure_http: bool,
}

/// What the XAPI backend creates on the pool, with what it takes to undo it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum XapiResource {
    /// A XAPI VM made for the run (checkpoint or clone), by its unique name
    /// label (undo: destroy its VDIs, then the VM).
    XapiVm {
        target: XapiTarget,
        name_label: String,
    },
    /// A XAPI network with no PIF made for the run (undo: network.destroy).
    XapiNetwork {
        target: XapiTarget,
        name_label: String,
    },
}

/// Undoes one of the XAPI backend's own resources.
pub(crate) fn recover(resource: &XapiResource) -> Result<()> {
    match resource {
        XapiResource::XapiVm { target, name_label } => {
            let c = Client::login(target)?;
            let found = c.call("VM.get_by_name_label", vec![json!(name_label)])?;
            for r in found.as_array().into_iter().flatten() {
                let r = client::value_string(r);
                // Only what coldclone named: its labels carry the run id.
                if name_label.starts_with("coldclone-") {
                    destroy_vm_and_disks(&c, &r)?;
                }
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
    }
}

/// What the backend learned about the original.
#[derive(Debug, Clone)]
pub struct XapiVm {
    /// The session opened at inspection; the run's calls all go through it.
    pub client: Arc<Client>,
    pub target: XapiTarget,
    pub vm_ref: String,
    pub uuid: String,
    /// `clean_shutdown` is among the VM's allowed operations (PV drivers present).
    pub pv_drivers: bool,
}

/// The XAPI part of a checkpoint: the checkpoint VM and its journal entry.
#[derive(Debug, Clone)]
struct XapiCheckpoint {
    vm_ref: String,
    journal_id: u64,
}

#[derive(Debug)]
pub struct XapiClone {
    client: Arc<Client>,
    /// The run's isolated network (ref) and its bridge.
    network: String,
    bridge: String,
    vm_ref: String,
    journal_id: u64,
    /// The clone's VIFs by uuid (refs mean nothing in a report).
    vifs: Vec<String>,
    /// Disk name → (VDI ref, VDI uuid, size).
    disks: BTreeMap<String, (String, String, u64)>,
    shutdown_task: Option<String>,
    destroyed: bool,
}

pub struct XapiBackend {
    options: XapiOptions,
    /// Attempts per VDI export (a dropped connection is tried again).
    pub export_attempts: u32,
    pub task_timeout: Duration,
}

impl XapiBackend {
    pub fn with_options(options: XapiOptions) -> XapiBackend {
        XapiBackend {
            options,
            export_attempts: 3,
            task_timeout: Duration::from_secs(3600),
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

/// The VM's disk VDIs by disk name: (VDI ref, uuid, size). A disk is named
/// by its VBD's `userdevice` (device names are only known while attached):
/// xvda..xvdz for 0-25 as always (a repository's incremental parents are
/// found by name), xvdaa, xvdab.. above, as xen-blkfront names them. A disk
/// that cannot be named, or whose name another disk has, is refused: a
/// backup that silently left a disk out would pass for a good one.
fn vm_disks(c: &Client, vm_ref: &str) -> Result<BTreeMap<String, (String, String, u64)>> {
    let rec = c.record("VM", vm_ref)?;
    let mut out = BTreeMap::new();
    // Disk name → (VBD uuid, userdevice), for naming a clash.
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
                "VM {}: disk VBD {vbd_uuid} has userdevice {userdevice:?}, not a device number;                  coldclone names disks by it and backs up all of a VM's disks or none",
                str_field(&rec, "name_label")
            ))
        })?;
        if let Some((other, other_dev)) = named.get(&name) {
            return Err(BackendError::Unsupported(format!(
                "VM {}: disk VBDs {other} (userdevice {other_dev:?}) and {vbd_uuid} (userdevice                  {userdevice:?}) would both be disk {name}; give each disk its own userdevice",
                str_field(&rec, "name_label")
            )));
        }
        named.insert(name.clone(), (vbd_uuid, userdevice));
        let v = c.record("VDI", &vdi)?;
        out.insert(
            name,
            (vdi, str_field(&v, "uuid"), u64_field(&v, "virtual_size")),
        );
    }
    Ok(out)
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
fn disk_vdis(c: &Client, vm_ref: &str) -> Result<Vec<String>> {
    let rec = c.record("VM", vm_ref)?;
    let mut out = vec![];
    for vbd in refs(&rec, "VBDs") {
        let b = c.record("VBD", &vbd)?;
        let vdi = str_field(&b, "VDI");
        if str_field(&b, "type") == "Disk" && vdi != NULL_REF && !vdi.is_empty() {
            out.push(vdi);
        }
    }
    Ok(out)
}

/// Destroys a VM we made, and its VDIs first (`VM.destroy` keeps them), its
/// suspend image included. A running one is powered off first.
fn destroy_vm_and_disks(c: &Client, vm_ref: &str) -> Result<()> {
    let rec = match c.record("VM", vm_ref) {
        Ok(r) => r,
        Err(XapiError::HandleInvalid { .. }) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let ps = str_field(&rec, "power_state");
    if ps == "Running" || ps == "Paused" {
        c.call("VM.hard_shutdown", vec![json!(vm_ref)])?;
    }
    let mut vdis = disk_vdis(c, vm_ref)?;
    let suspend = str_field(&rec, "suspend_VDI");
    if suspend != NULL_REF && !suspend.is_empty() {
        vdis.push(suspend);
    }
    for vdi in vdis {
        match c.call("VDI.destroy", vec![json!(vdi)]) {
            Ok(_) | Err(XapiError::HandleInvalid { .. }) => {}
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
                "MTU": "1500",
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
        let label = checkpoint_label(&run_tag(work_dir));
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
        let ckpt = r?;
        journal.milestone("checkpoint:disks-snapshotted")?;
        let rec = c.record("VM", &ckpt)?;
        let suspend = str_field(&rec, "suspend_VDI");
        let (memory_image_bytes, suspend_uuid) = if suspend != NULL_REF && !suspend.is_empty() {
            let v = c.record("VDI", &suspend)?;
            (u64_field(&v, "virtual_size"), str_field(&v, "uuid"))
        } else {
            (0, String::new())
        };
        let disks = vm_disks(c, &ckpt)?
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
            // XAPI does not report the pause; the call's duration bounds it.
            pause: PauseTimes {
                total_ms: took,
                disk_snapshot_ms: 0.0,
                memory_ms: took,
            },
            disks,
            detail: Opaque::new(XapiCheckpoint {
                vm_ref: ckpt,
                journal_id: id,
            }),
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
        let ckpt = checkpoint
            .detail
            .get::<XapiCheckpoint>()
            .map(|k| k.vm_ref.clone())
            .ok_or_else(|| BackendError::Clone("no XAPI checkpoint to clone".into()))?;
        let bridge = net.bridge.clone();
        let net = net.handle.clone().ok_or_else(|| {
            BackendError::Clone(
                "no isolated XAPI network: the pipeline must call isolated_network first".into(),
            )
        })?;
        let journal_id = journal.will_create(
            &XapiResource::XapiVm {
                target: xv.target.clone(),
                name_label: clone_name.to_string(),
            }
            .into(),
        )?;
        let clone = c.call_async(
            "VM.clone",
            vec![json!(ckpt), json!(clone_name)],
            self.task_timeout,
        )?;
        let mut pc = PausedClone {
            name: clone_name.to_string(),
            taps: vec![],
            disks: vec![],
            console_log: PathBuf::new(),
            detail: OpaqueMut::new(XapiClone {
                client: c.clone(),
                network: net.clone(),
                bridge,
                vm_ref: clone.clone(),
                journal_id,
                vifs: vec![],
                disks: BTreeMap::new(),
                shutdown_task: None,
                destroyed: false,
            }),
        };
        c.call("VM.set_is_a_template", vec![json!(clone), json!(false)])?;
        let rec = c.record("VM", &clone)?;
        let vifs = refs(&rec, "VIFs");
        // On a suspended VM, VIF.move only changes the database: nothing runs yet.
        for vif in &vifs {
            c.call("VIF.move", vec![json!(vif), json!(net)])?;
        }
        let disks = vm_disks(c, &clone)?;
        pc.disks = disks
            .iter()
            .map(|(name, (_, uuid, bytes))| CloneDisk {
                name: name.clone(),
                overlay: PathBuf::from(format!("xapi:vdi/{uuid}")),
                bytes: *bytes,
            })
            .collect();
        let vifs = vifs
            .iter()
            .map(|v| c.record("VIF", v).map(|r| str_field(&r, "uuid")))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        pc.taps = vifs.clone();
        {
            let d = xapi_clone(&mut pc.detail)?;
            d.vifs = vifs;
            d.disks = disks.clone();
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
                "the clone has {} VIFs, {} were moved",
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
                let domid = c.call_str("VM.get_domid", vec![json!(d.vm_ref)])?;
                let mut cmd = std::process::Command::new("xl");
                cmd.args(["trigger", &domid, "power"]);
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
        while outcome.is_none() {
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
                    if !client::is_busy(&e) || reissued >= 5 {
                        return Err(e.into());
                    }
                    // Refused because the VM was busy: ask again.
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
                tracing::warn!("the clone did not power off in time; hard shutdown");
                match c.call("VM.hard_shutdown", vec![json!(d.vm_ref)]) {
                    Ok(_) => CloneOutcome::Killed,
                    // It powered off by itself just as time ran out.
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
        if d.destroyed {
            return Ok(());
        }
        if let Some(t) = d.shutdown_task.take() {
            let _ = c.call("task.cancel", vec![json!(t)]);
            c.destroy_task(&t);
        }
        destroy_vm_and_disks(&c, &d.vm_ref)?;
        journal.removed(d.journal_id)?;
        d.destroyed = true;
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

    fn release_checkpoint(
        &self,
        vm: &VmInfo,
        checkpoint: &Checkpoint,
        journal: &mut dyn Journal,
    ) -> Result<()> {
        let c = &xapi_vm(vm)?.client;
        if let Some(k) = checkpoint.detail.get::<XapiCheckpoint>() {
            destroy_vm_and_disks(c, &k.vm_ref)?;
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
}

#[cfg(test)]
mod tests {
    use super::disk_name;

    #[test]
    fn userdevices_name_disks_one_to_one() {
        // The names existing repositories hold for 0-25 stay.
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
}
