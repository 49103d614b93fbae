//! A stateful XAPI simulator for coldclone's tests.
//!
//! XAPI (the XenServer / XCP-ng toolstack) cannot run on the test machines,
//! so coldclone's XAPI backend is tested against this: an HTTP server that
//! speaks XAPI's JSON-RPC wire format (`POST /jsonrpc`, JSON-RPC 1.0 and 2.0
//! envelopes, error codes as XAPI sends them) and `GET /export_raw_vdi`, and
//! keeps the state those calls change: sessions, VMs (originals, checkpoints,
//! clones), VDIs backed by real files, VBDs, VIFs, networks, PIFs, tasks and
//! an event stream. It models only what coldclone uses; see `docs/xapi.md`.
//!
//! Tests can inject faults ([`Faults`]): fail a method's Nth call (or every
//! call from it on) or every call of a method, expire every session at a
//! call, hold, slow or cut an export, a guest that ignores the shutdown
//! request. Each fault that takes effect is recorded ([`State::fired`]). The simulator also keeps evidence a real
//! host would not: every VIF's network while its VM had a domain, and a copy
//! of each disk as the guest left it at a clean shutdown.

mod http;

use base64::Engine;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// XAPI's null reference.
pub const NULL: &str = "OpaqueRef:NULL";
/// CBT granularity: one bit of `VDI.list_changed_blocks` per 64 KiB.
pub const CBT_BLOCK: u64 = 64 << 10;

/// The `occurrence`th call (1-based) of `method`, as the call log names it
/// (`"Async.VM.checkpoint"`; `"export_raw_vdi"` for an export request).
/// Polling does not shift it, as it shifts a call's index in the run.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct At {
    pub method: String,
    pub occurrence: u64,
}

impl At {
    pub fn new(method: &str, occurrence: u64) -> At {
        At {
            method: method.into(),
            occurrence,
        }
    }
}

impl std::fmt::Display for At {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} #{}", self.method, self.occurrence)
    }
}

/// Faults a test can inject. Each one that takes effect is recorded in
/// [`State::fired`], so a test can tell a fault that fired from one that
/// lay past the calls its run made.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// This call fails with INTERNAL_ERROR; for an `Async.` call the task is
    /// returned and then fails; an export request answers HTTP 500.
    pub fail_at: Option<At>,
    /// This call and every later call of the same method fail so (an export
    /// that fails on every attempt from then on).
    pub fail_from: Option<At>,
    /// Every call of this method fails (`"export_raw_vdi"` fails exports).
    pub fail_method: Option<String>,
    /// At this call every session becomes invalid (a toolstack restart).
    pub expire_sessions_at: Option<At>,
    /// The first export request finds every session invalid.
    pub expire_sessions_at_first_export: bool,
    /// This call is refused with OTHER_OPERATION_IN_PROGRESS (an `Async.` call's task
    /// fails so), as xapi refuses work on an object that another operation holds.
    pub busy_at: Option<At>,
    /// Export requests from the Nth (1-based) on wait, their connection open,
    /// until this is cleared (a test kills the client between two disks there).
    pub hold_exports_from: Option<u64>,
    /// The export pauses this long after every 64 KiB.
    pub export_delay_per_block: Duration,
    /// The first `drop_export_count` exports close the connection after this many bytes.
    pub drop_export_after: Option<u64>,
    pub drop_export_count: u32,
    /// The guest never acts on a clean shutdown request.
    pub guest_ignores_shutdown: bool,
    /// Exports answer 302 first, as a pool master does for a VDI on another host's storage.
    pub redirect_exports: bool,
    /// `VIF.move` answers success but moves nothing (a broken host): isolation checks must catch it.
    pub vif_move_noop: bool,
}

/// A fault that took effect: which one, at which call, and the call's index in the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Fired {
    /// The [`Faults`] field: "fail_at", "fail_from", "fail_method", "busy_at",
    /// "expire_sessions_at", "expire_sessions_at_first_export", "hold_exports_from".
    pub fault: &'static str,
    pub at: At,
    /// 1-based index in [`State::call_log`].
    pub call: u64,
}

/// An original VM to put on the simulated host.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    /// Disk sizes in bytes (each a multiple of 64 KiB).
    pub disks: Vec<u64>,
    pub nics: usize,
    /// PV drivers in the guest: `VM.clean_shutdown` works.
    pub pv_drivers: bool,
    /// The VM can be suspended (so checkpointed).
    pub can_suspend: bool,
    pub cbt: bool,
    pub memory: u64,
    /// Each disk's VBD `userdevice`; empty: "0", "1", .. in disk order.
    pub userdevices: Vec<String>,
}

impl VmSpec {
    pub fn new(name: &str, disks: &[u64]) -> VmSpec {
        VmSpec {
            name: name.into(),
            disks: disks.to_vec(),
            nics: 2,
            pv_drivers: true,
            can_suspend: true,
            cbt: false,
            memory: 8 << 20,
            userdevices: vec![],
        }
    }
}

#[derive(Debug, Clone)]
pub struct Vm {
    pub uuid: String,
    pub name_label: String,
    pub power_state: String,
    pub is_a_template: bool,
    pub is_a_snapshot: bool,
    pub snapshot_of: String,
    pub suspend_vdi: String,
    pub vbds: Vec<String>,
    pub vifs: Vec<String>,
    pub pv_drivers: bool,
    pub can_suspend: bool,
    pub memory: u64,
    pub domid: i64,
    pub other_config: BTreeMap<String, String>,
    /// A clean shutdown the guest was asked for and has not done (its task).
    pub shutdown_task: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Vdi {
    pub uuid: String,
    pub name_label: String,
    pub virtual_size: u64,
    pub file: PathBuf,
    pub is_a_snapshot: bool,
    pub snapshot_of: String,
    pub cbt_enabled: bool,
    pub vbds: Vec<String>,
    /// "user" or "suspend".
    pub kind: String,
}

#[derive(Debug, Clone)]
pub struct Vbd {
    pub uuid: String,
    pub vm: String,
    pub vdi: String,
    pub userdevice: String,
}

#[derive(Debug, Clone)]
pub struct Vif {
    pub uuid: String,
    pub vm: String,
    pub network: String,
    pub device: String,
    pub mac: String,
}

#[derive(Debug, Clone)]
pub struct Network {
    pub uuid: String,
    pub name_label: String,
    pub name_description: String,
    pub bridge: String,
    pub pifs: Vec<String>,
    pub other_config: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct Pif {
    pub uuid: String,
    pub network: String,
    pub device: String,
}

#[derive(Debug, Clone)]
pub struct Task {
    pub uuid: String,
    pub name_label: String,
    pub status: String,
    pub progress: f64,
    pub result: String,
    pub error_info: Vec<String>,
}

#[derive(Debug, Clone)]
struct Event {
    id: u64,
    class: String,
    reference: String,
    operation: String,
    snapshot: Value,
}

/// A VIF's network at a moment its VM had a domain (Running or Paused).
#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    pub vm: String,
    pub vm_name: String,
    pub vif: String,
    pub network: String,
    pub network_has_pif: bool,
    pub power_state: String,
}

/// Everything the simulated host knows.
#[derive(Debug, Default)]
pub struct State {
    pub users: BTreeMap<String, String>,
    pub sessions: BTreeMap<String, String>,
    pub vms: BTreeMap<String, Vm>,
    pub vdis: BTreeMap<String, Vdi>,
    pub vbds: BTreeMap<String, Vbd>,
    pub vifs: BTreeMap<String, Vif>,
    pub networks: BTreeMap<String, Network>,
    pub pifs: BTreeMap<String, Pif>,
    pub tasks: BTreeMap<String, Task>,
    pub attachments: Vec<Attachment>,
    /// Every RPC method called, in order (an export request as "export_raw_vdi").
    pub call_log: Vec<String>,
    /// Calls so far per method (the `occurrence` of [`At`]).
    pub call_counts: BTreeMap<String, u64>,
    /// Every injected fault that took effect, in order.
    pub fired: Vec<Fired>,
    /// Export requests held by `hold_exports_from` right now.
    pub exports_held: u64,
    /// Copies of each disk as the guest left it at a clean shutdown: VDI uuid → file.
    pub halted_images: BTreeMap<String, PathBuf>,
    pub faults: Faults,
    /// Exports that ran to the end.
    pub exports_completed: u64,
    exports_dropped: u32,
    events: Vec<Event>,
    next_event: u64,
    next_bridge: u32,
    next_domid: i64,
    data_dir: PathBuf,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

/// A running simulator; it stops when dropped.
pub struct Sim {
    pub url: String,
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
}

type XResult<T> = std::result::Result<T, Vec<String>>;

fn err<T>(code: &str, params: &[&str]) -> XResult<T> {
    let mut v = vec![code.to_string()];
    v.extend(params.iter().map(|s| s.to_string()));
    Err(v)
}

static COUNTER: AtomicU64 = AtomicU64::new(1);

/// A random-looking, unique UUID (the simulator needs uniqueness, not entropy).
fn uuid() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let a = h.finish();
    h.write_u64(a);
    let b = h.finish();
    format!(
        "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

fn new_ref() -> (String, String) {
    let u = uuid();
    (format!("OpaqueRef:{}", uuid()), u)
}

fn lower(s: &str) -> String {
    s.to_ascii_lowercase()
}

/// A disk's initial contents: two thirds of its 64 KiB blocks hold data, the rest are zero.
fn fill_disk(path: &Path, size: u64, seed: u64) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let mut block = vec![0u8; CBT_BLOCK as usize];
    for i in 0..size / CBT_BLOCK {
        if i % 3 == 2 {
            continue;
        }
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i.wrapping_add(1);
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        f.seek(SeekFrom::Start(i * CBT_BLOCK))?;
        f.write_all(&block)?;
    }
    Ok(())
}

/// Copies a disk image keeping its holes (a memory image is mostly holes).
fn sparse_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    let mut src = std::fs::File::open(from)?;
    let len = src.metadata()?.len();
    let mut dst = std::fs::File::create(to)?;
    dst.set_len(len)?;
    let mut buf = vec![0u8; CBT_BLOCK as usize];
    let mut off = 0u64;
    loop {
        let n = read_full(&mut src, &mut buf)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|b| *b != 0) {
            dst.seek(SeekFrom::Start(off))?;
            dst.write_all(&buf[..n])?;
        }
        off += n as u64;
    }
    Ok(())
}

fn write_at(path: &Path, offset: u64, data: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(data)
}

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

fn matches(at: &Option<At>, method: &str, occurrence: u64) -> bool {
    at.as_ref()
        .is_some_and(|a| a.method == method && a.occurrence == occurrence)
}

fn matches_from(at: &Option<At>, method: &str, occurrence: u64) -> bool {
    at.as_ref()
        .is_some_and(|a| a.method == method && occurrence >= a.occurrence)
}

impl State {
    /// Logs a call; returns its index in the log and its occurrence of `method`.
    fn log_call(&mut self, method: &str) -> (u64, u64) {
        self.call_log.push(method.to_string());
        let c = self.call_counts.entry(method.to_string()).or_insert(0);
        *c += 1;
        (self.call_log.len() as u64, *c)
    }

    fn fire(&mut self, fault: &'static str, method: &str, occurrence: u64, call: u64) {
        self.fired.push(Fired {
            fault,
            at: At::new(method, occurrence),
            call,
        });
    }

    fn emit(&mut self, class: &str, reference: &str, operation: &str) {
        self.next_event += 1;
        let snapshot = if operation == "del" {
            Value::Null
        } else {
            self.record(class, reference).unwrap_or(Value::Null)
        };
        self.events.push(Event {
            id: self.next_event,
            class: class.into(),
            reference: reference.into(),
            operation: operation.into(),
            snapshot,
        });
    }

    fn record(&self, class: &str, r: &str) -> XResult<Value> {
        let invalid = || {
            vec![
                "HANDLE_INVALID".to_string(),
                class_name(class).to_string(),
                r.to_string(),
            ]
        };
        Ok(match class {
            "vm" => {
                let v = self.vms.get(r).ok_or_else(invalid)?;
                json!({
                    "uuid": v.uuid, "name_label": v.name_label, "name_description": "",
                    "power_state": v.power_state, "is_a_template": v.is_a_template,
                    "is_a_snapshot": v.is_a_snapshot, "snapshot_of": v.snapshot_of,
                    "suspend_VDI": v.suspend_vdi, "VBDs": v.vbds, "VIFs": v.vifs,
                    "domid": v.domid.to_string(),
                    "memory_static_max": v.memory.to_string(),
                    "memory_dynamic_max": v.memory.to_string(),
                    "is_control_domain": false,
                    "allowed_operations": self.allowed_operations(v),
                    "other_config": v.other_config,
                    "HVM_boot_policy": if v.pv_drivers { "" } else { "BIOS order" },
                })
            }
            "vdi" => {
                let v = self.vdis.get(r).ok_or_else(invalid)?;
                json!({
                    "uuid": v.uuid, "name_label": v.name_label,
                    "virtual_size": v.virtual_size.to_string(),
                    "is_a_snapshot": v.is_a_snapshot, "snapshot_of": v.snapshot_of,
                    "cbt_enabled": v.cbt_enabled, "VBDs": v.vbds, "type": v.kind,
                    "read_only": false, "SR": "OpaqueRef:sim-local-sr",
                })
            }
            "vbd" => {
                let v = self.vbds.get(r).ok_or_else(invalid)?;
                let attached = self
                    .vms
                    .get(&v.vm)
                    .is_some_and(|m| has_domain(&m.power_state));
                json!({
                    "uuid": v.uuid, "VM": v.vm, "VDI": v.vdi, "userdevice": v.userdevice,
                    "device": device_name(&v.userdevice),
                    "type": "Disk", "mode": "RW", "currently_attached": attached, "empty": false,
                })
            }
            "vif" => {
                let v = self.vifs.get(r).ok_or_else(invalid)?;
                json!({"uuid": v.uuid, "VM": v.vm, "network": v.network, "device": v.device, "MAC": v.mac})
            }
            "network" => {
                let n = self.networks.get(r).ok_or_else(invalid)?;
                let vifs: Vec<&String> = self
                    .vifs
                    .iter()
                    .filter(|(_, v)| v.network == r)
                    .map(|(k, _)| k)
                    .collect();
                json!({
                    "uuid": n.uuid, "name_label": n.name_label, "name_description": n.name_description,
                    "bridge": n.bridge, "PIFs": n.pifs, "VIFs": vifs, "MTU": "1500",
                    "other_config": n.other_config,
                })
            }
            "pif" => {
                let p = self.pifs.get(r).ok_or_else(invalid)?;
                json!({"uuid": p.uuid, "network": p.network, "device": p.device, "physical": true})
            }
            "task" => {
                let t = self.tasks.get(r).ok_or_else(invalid)?;
                json!({
                    "uuid": t.uuid, "name_label": t.name_label, "status": t.status,
                    "progress": t.progress, "result": t.result, "error_info": t.error_info,
                })
            }
            _ => return err("HANDLE_INVALID", &[class, r]),
        })
    }

    fn allowed_operations(&self, v: &Vm) -> Vec<&'static str> {
        let mut ops = vec![];
        match v.power_state.as_str() {
            "Running" => {
                ops.extend(["hard_shutdown", "pause"]);
                if v.pv_drivers {
                    ops.push("clean_shutdown");
                }
                if v.can_suspend {
                    ops.extend(["checkpoint", "suspend"]);
                }
            }
            "Paused" => ops.extend(["hard_shutdown", "unpause"]),
            "Suspended" => ops.extend(["resume", "clone", "destroy"]),
            _ => ops.extend(["start", "clone", "destroy"]),
        }
        ops
    }

    fn record_attachments(&mut self, vm: &str) {
        let Some(v) = self.vms.get(vm) else { return };
        if !has_domain(&v.power_state) {
            return;
        }
        let (name, ps, vifs) = (v.name_label.clone(), v.power_state.clone(), v.vifs.clone());
        for vif in vifs {
            if let Some(x) = self.vifs.get(&vif) {
                let has_pif = self
                    .networks
                    .get(&x.network)
                    .is_some_and(|n| !n.pifs.is_empty());
                self.attachments.push(Attachment {
                    vm: vm.into(),
                    vm_name: name.clone(),
                    vif: vif.clone(),
                    network: x.network.clone(),
                    network_has_pif: has_pif,
                    power_state: ps.clone(),
                });
            }
        }
    }

    fn set_power(&mut self, vm: &str, ps: &str) {
        if let Some(v) = self.vms.get_mut(vm) {
            v.power_state = ps.into();
            if has_domain(ps) {
                if v.domid < 0 {
                    self.next_domid += 1;
                    v.domid = self.next_domid;
                }
            } else {
                v.domid = -1;
            }
        }
        self.record_attachments(vm);
        self.emit("vm", vm, "mod");
    }

    fn vm(&self, r: &str) -> XResult<&Vm> {
        self.vms
            .get(r)
            .ok_or_else(|| vec!["HANDLE_INVALID".into(), "VM".into(), r.into()])
    }

    fn need_power(&self, r: &str, expected: &str) -> XResult<()> {
        let v = self.vm(r)?;
        if v.power_state != expected {
            return err(
                "VM_BAD_POWER_STATE",
                &[r, &lower(expected), &lower(&v.power_state)],
            );
        }
        Ok(())
    }

    fn new_vdi(&mut self, name: &str, size: u64, kind: &str) -> XResult<String> {
        let (r, u) = new_ref();
        let file = self.data_dir.join(format!("{u}.img"));
        let f = std::fs::File::create(&file).and_then(|f| f.set_len(size));
        if let Err(e) = f {
            return err("SR_BACKEND_FAILURE", &[&e.to_string()]);
        }
        self.vdis.insert(
            r.clone(),
            Vdi {
                uuid: u,
                name_label: name.into(),
                virtual_size: size,
                file,
                is_a_snapshot: false,
                snapshot_of: NULL.into(),
                cbt_enabled: false,
                vbds: vec![],
                kind: kind.into(),
            },
        );
        self.emit("vdi", &r, "add");
        Ok(r)
    }

    /// A copy of a VDI (a snapshot or a clone's disk).
    fn copy_vdi(&mut self, src: &str, snapshot: bool) -> XResult<String> {
        let v = self
            .vdis
            .get(src)
            .cloned()
            .ok_or_else(|| vec!["HANDLE_INVALID".into(), "VDI".into(), src.into()])?;
        let r = self.new_vdi(&v.name_label, v.virtual_size, &v.kind)?;
        let file = self.vdis[&r].file.clone();
        if let Err(e) = sparse_copy(&v.file, &file) {
            return err("SR_BACKEND_FAILURE", &[&e.to_string()]);
        }
        if let Some(n) = self.vdis.get_mut(&r) {
            n.is_a_snapshot = snapshot;
            n.snapshot_of = if snapshot { src.into() } else { NULL.into() };
            n.cbt_enabled = v.cbt_enabled;
        }
        Ok(r)
    }

    fn add_vbd(&mut self, vm: &str, vdi: &str, userdevice: &str) {
        let (r, u) = new_ref();
        self.vbds.insert(
            r.clone(),
            Vbd {
                uuid: u,
                vm: vm.into(),
                vdi: vdi.into(),
                userdevice: userdevice.into(),
            },
        );
        if let Some(v) = self.vms.get_mut(vm) {
            v.vbds.push(r.clone());
        }
        if let Some(d) = self.vdis.get_mut(vdi) {
            d.vbds.push(r);
        }
    }

    fn add_vif(&mut self, vm: &str, network: &str, device: &str) {
        let (r, u) = new_ref();
        let mac = format!("00:16:3e:{}:{}:{}", &u[0..2], &u[2..4], &u[4..6]);
        self.vifs.insert(
            r.clone(),
            Vif {
                uuid: u,
                vm: vm.into(),
                network: network.into(),
                device: device.into(),
                mac,
            },
        );
        if let Some(v) = self.vms.get_mut(vm) {
            v.vifs.push(r);
        }
    }

    /// A new VM record like `src` (VBDs over `disks`, VIFs on the same networks).
    fn copy_vm(&mut self, src: &str, name: &str, disks: &[(String, String)]) -> XResult<String> {
        let s = self.vm(src)?.clone();
        let (r, u) = new_ref();
        self.vms.insert(
            r.clone(),
            Vm {
                uuid: u,
                name_label: name.into(),
                vbds: vec![],
                vifs: vec![],
                domid: -1,
                shutdown_task: None,
                other_config: BTreeMap::new(),
                ..s.clone()
            },
        );
        for (vdi, dev) in disks {
            self.add_vbd(&r, vdi, dev);
        }
        for vif in &s.vifs {
            if let Some(x) = self.vifs.get(vif).cloned() {
                self.add_vif(&r, &x.network, &x.device);
            }
        }
        Ok(r)
    }

    fn disks_of(&self, vm: &str) -> Vec<(String, String)> {
        self.vms
            .get(vm)
            .map(|v| {
                v.vbds
                    .iter()
                    .filter_map(|b| self.vbds.get(b))
                    .map(|b| (b.vdi.clone(), b.userdevice.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn destroy_vdi(&mut self, r: &str) -> XResult<()> {
        let v = self
            .vdis
            .get(r)
            .cloned()
            .ok_or_else(|| vec!["HANDLE_INVALID".into(), "VDI".into(), r.into()])?;
        for b in &v.vbds {
            let vm = self.vbds.get(b).map(|b| b.vm.clone()).unwrap_or_default();
            if self
                .vms
                .get(&vm)
                .is_some_and(|m| has_domain(&m.power_state))
            {
                return err("VDI_IN_USE", &[r, "destroy"]);
            }
        }
        // Like xapi: the VBDs of a destroyed VDI go with it.
        for b in &v.vbds {
            if let Some(vbd) = self.vbds.remove(b) {
                if let Some(m) = self.vms.get_mut(&vbd.vm) {
                    m.vbds.retain(|x| x != b);
                }
            }
        }
        for m in self.vms.values_mut() {
            if m.suspend_vdi == r {
                m.suspend_vdi = NULL.into();
            }
        }
        let _ = std::fs::remove_file(&v.file);
        self.vdis.remove(r);
        self.emit("vdi", r, "del");
        Ok(())
    }
}

/// The guest's name for a VBD's disk, as xen-blkfront names it (xvda..xvdz,
/// xvdaa..); none for a userdevice that is not a number.
fn device_name(userdevice: &str) -> String {
    let Ok(mut n) = userdevice.parse::<u64>() else {
        return String::new();
    };
    let mut letters = vec![];
    loop {
        letters.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    letters.reverse();
    format!("xvd{}", String::from_utf8_lossy(&letters))
}

fn has_domain(ps: &str) -> bool {
    ps == "Running" || ps == "Paused"
}

fn class_name(c: &str) -> &str {
    match c {
        "vm" => "VM",
        "vdi" => "VDI",
        "vbd" => "VBD",
        "vif" => "VIF",
        "pif" => "PIF",
        other => other,
    }
}

/// Parameters each method takes after the session (for MESSAGE_PARAMETER_COUNT_MISMATCH).
fn arity(method: &str) -> Option<usize> {
    Some(match method {
        "session.logout" | "VM.get_all" | "network.get_all" | "task.get_all" => 0,
        "VM.get_record"
        | "VM.get_power_state"
        | "VM.get_by_uuid"
        | "VM.get_by_name_label"
        | "VM.unpause"
        | "VM.clean_shutdown"
        | "VM.hard_shutdown"
        | "VM.destroy"
        | "VM.get_domid"
        | "VDI.get_record"
        | "VDI.get_by_uuid"
        | "VDI.destroy"
        | "VBD.get_record"
        | "VIF.get_record"
        | "network.get_record"
        | "network.get_by_uuid"
        | "network.get_by_name_label"
        | "network.destroy"
        | "network.get_PIFs"
        | "network.create"
        | "PIF.get_record"
        | "task.get_record"
        | "task.destroy"
        | "task.cancel"
        | "VDI.enable_cbt" => 1,
        "VM.checkpoint"
        | "VM.clone"
        | "VM.set_is_a_template"
        | "VIF.move"
        | "VDI.list_changed_blocks"
        | "task.create"
        | "VM.send_trigger" => 2,
        "VM.resume" | "event.from" => 3,
        _ => return None,
    })
}

impl Sim {
    /// Starts a simulator on 127.0.0.1 (a free port), VDI files under `data_dir`.
    pub fn start(data_dir: &Path) -> std::io::Result<Sim> {
        Self::start_on("127.0.0.1:0", data_dir)
    }

    pub fn start_on(listen: &str, data_dir: &Path) -> std::io::Result<Sim> {
        std::fs::create_dir_all(data_dir)?;
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                data_dir: data_dir.to_path_buf(),
                next_bridge: 0,
                ..State::default()
            }),
            changed: Condvar::new(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        {
            let shared = shared.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let shared = shared.clone();
                    std::thread::spawn(move || serve(&shared, conn));
                }
            });
        }
        let sim = Sim {
            url: format!("http://{addr}"),
            addr,
            shared,
            stop,
        };
        sim.with_state(|st| {
            // The pool's physical network: what the clone must never touch.
            let (n, nu) = new_ref();
            let (p, pu) = new_ref();
            st.pifs.insert(
                p.clone(),
                Pif {
                    uuid: pu,
                    network: n.clone(),
                    device: "eth0".into(),
                },
            );
            st.networks.insert(
                n,
                Network {
                    uuid: nu,
                    name_label: "Pool-wide network associated with eth0".into(),
                    name_description: String::new(),
                    bridge: "xenbr0".into(),
                    pifs: vec![p],
                    other_config: BTreeMap::new(),
                },
            );
        });
        Ok(sim)
    }

    /// Locks the state (tests read and change it directly).
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut g = self.state();
        let r = f(&mut g);
        drop(g);
        self.shared.changed.notify_all();
        r
    }

    pub fn add_user(&self, user: &str, password: &str) {
        self.with_state(|st| st.users.insert(user.into(), password.into()));
    }

    pub fn set_faults(&self, f: Faults) {
        self.with_state(|st| st.faults = f);
    }

    /// Puts a running VM on the host: disks filled with data, NICs on the pool network.
    /// Returns (ref, uuid).
    pub fn add_vm(&self, spec: &VmSpec) -> std::io::Result<(String, String)> {
        self.with_state(|st| {
            let net = st
                .networks
                .iter()
                .find(|(_, n)| !n.pifs.is_empty())
                .map(|(k, _)| k.clone())
                .unwrap_or_default();
            let (r, u) = new_ref();
            st.vms.insert(
                r.clone(),
                Vm {
                    uuid: u.clone(),
                    name_label: spec.name.clone(),
                    power_state: "Halted".into(),
                    is_a_template: false,
                    is_a_snapshot: false,
                    snapshot_of: NULL.into(),
                    suspend_vdi: NULL.into(),
                    vbds: vec![],
                    vifs: vec![],
                    pv_drivers: spec.pv_drivers,
                    can_suspend: spec.can_suspend,
                    memory: spec.memory,
                    domid: -1,
                    other_config: BTreeMap::new(),
                    shutdown_task: None,
                },
            );
            for (i, size) in spec.disks.iter().enumerate() {
                let d = st
                    .new_vdi(&format!("{} disk {i}", spec.name), *size, "user")
                    .map_err(|e| std::io::Error::other(e.join(" ")))?;
                fill_disk(&st.vdis[&d].file, *size, i as u64 + 7)?;
                if let Some(v) = st.vdis.get_mut(&d) {
                    v.cbt_enabled = spec.cbt;
                }
                let dev = spec.userdevices.get(i).cloned().unwrap_or(i.to_string());
                st.add_vbd(&r, &d, &dev);
            }
            for i in 0..spec.nics {
                st.add_vif(&r, &net, &i.to_string());
            }
            st.set_power(&r, "Running");
            Ok((r, u))
        })
    }

    /// What xapi's database GC does after a while (`db_gc.ml`: completed tasks
    /// after 65 minutes, idle sessions after 24 hours): for a killed client's leftovers.
    pub fn gc_completed_tasks_and_idle_sessions(&self) {
        self.with_state(|st| {
            st.tasks.retain(|_, t| t.status == "pending");
            st.sessions.clear();
        });
    }

    /// RPC calls made so far.
    pub fn calls(&self) -> u64 {
        self.state().call_log.len() as u64
    }

    /// The calls made so far, each as its method's occurrence.
    pub fn call_sequence(&self) -> Vec<At> {
        let mut seen: BTreeMap<&str, u64> = BTreeMap::new();
        let st = self.state();
        st.call_log
            .iter()
            .map(|m| {
                let c = seen.entry(m).or_insert(0);
                *c += 1;
                At::new(m, *c)
            })
            .collect()
    }

    /// The injected faults that took effect so far.
    pub fn fired(&self) -> Vec<Fired> {
        self.state().fired.clone()
    }

    /// Performs one API call as the JSON-RPC endpoint would.
    pub fn call(&self, method: &str, params: &[Value]) -> XResult<Value> {
        call(&self.shared, method, params)
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|p| p.into_inner())
}

fn serve(shared: &Arc<Shared>, conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let Some(req) = http::read_request(&conn) else {
        return;
    };
    match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/jsonrpc") => jsonrpc(shared, &conn, &req.body),
        ("GET", "/export_raw_vdi") => export(shared, &conn, &req.query),
        ("POST", "/sim/acpi_power_button") => acpi_power_button(shared, &conn, &req.query),
        ("POST", "/") => {
            http::internal_error(&conn, "the simulator speaks JSON-RPC only: POST /jsonrpc")
        }
        _ => http::respond(&conn, "404 Not Found", "text/plain", b"not found"),
    }
}

fn jsonrpc(shared: &Arc<Shared>, conn: &TcpStream, body: &[u8]) {
    let req: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return http::internal_error(conn, &format!("Jsonrpc.Parse_error({e})")),
    };
    let (Some(method), Some(params), Some(id)) = (
        req.get("method").and_then(Value::as_str),
        req.get("params").and_then(Value::as_array),
        req.get("id").filter(|i| !i.is_null()),
    ) else {
        return http::internal_error(
            conn,
            "Jsonrpc.Malformed_method_request(\"{jsonrpc=...,method=...,id=...}\")",
        );
    };
    let v2 = req.get("jsonrpc").and_then(Value::as_str) == Some("2.0");
    let out = call(shared, method, params);
    let resp = match (out, v2) {
        (Ok(r), true) => json!({"jsonrpc": "2.0", "result": r, "id": id}),
        (Ok(r), false) => json!({"result": r, "error": null, "id": id}),
        (Err(e), true) => json!({"jsonrpc": "2.0", "error": {
            "code": 1, "message": e.first().cloned().unwrap_or_default(), "data": e.get(1..).unwrap_or(&[])
        }, "id": id}),
        (Err(e), false) => json!({"result": null, "error": e, "id": id}),
    };
    http::respond(
        conn,
        "200 OK",
        "application/json",
        resp.to_string().as_bytes(),
    );
}

/// The task-result encoding xapi uses even over JSON-RPC: an XML-RPC value.
fn xml_value(v: &Value) -> String {
    match v {
        Value::String(s) if s.is_empty() => String::new(),
        Value::String(s) => format!("<value>{s}</value>"),
        other => format!("<value>{other}</value>"),
    }
}

fn call(shared: &Arc<Shared>, method: &str, params: &[Value]) -> XResult<Value> {
    let mut st = lock(shared);
    let (n, occurrence) = st.log_call(method);
    if matches(&st.faults.expire_sessions_at, method, occurrence) {
        st.sessions.clear();
        st.fire("expire_sessions_at", method, occurrence, n);
    }
    let (failed, fail_from) = (
        matches(&st.faults.fail_at, method, occurrence),
        matches_from(&st.faults.fail_from, method, occurrence),
    );
    let by_method = st.faults.fail_method.as_deref() == Some(method)
        || (st.faults.fail_method.is_some()
            && st.faults.fail_method.as_deref() == method.strip_prefix("Async."));
    let busy = matches(&st.faults.busy_at, method, occurrence);
    // Which fault this call meets, recorded when it takes effect.
    let which: &'static str = if busy {
        "busy_at"
    } else if failed {
        "fail_at"
    } else if fail_from {
        "fail_from"
    } else {
        "fail_method"
    };
    let injected = failed || fail_from || by_method;
    let fault = if busy {
        vec![
            "OTHER_OPERATION_IN_PROGRESS".to_string(),
            "VM".to_string(),
            params.get(1).map(s).unwrap_or_default(),
        ]
    } else {
        vec![
            "INTERNAL_ERROR".to_string(),
            format!("injected fault at call {n} ({method} #{occurrence})"),
        ]
    };
    let injected = injected || busy;
    if method == "session.login_with_password" {
        // A login is never refused as busy.
        if injected && !busy {
            st.fire(which, method, occurrence, n);
            return Err(fault);
        }
        let (u, p) = (
            params.first().map(s).unwrap_or_default(),
            params.get(1).map(s).unwrap_or_default(),
        );
        if params.len() < 2 {
            return err(
                "MESSAGE_PARAMETER_COUNT_MISMATCH",
                &[method, "4", &params.len().to_string()],
            );
        }
        if st.users.get(&u) != Some(&p) {
            return err(
                "SESSION_AUTHENTICATION_FAILED",
                &[&u, "Authentication failure"],
            );
        }
        let (r, _) = new_ref();
        st.sessions.insert(r.clone(), u);
        return Ok(json!(r));
    }
    let session = params.first().map(s).unwrap_or_default();
    if !st.sessions.contains_key(&session) {
        return err("SESSION_INVALID", &[&session]);
    }
    let (is_async, name) = match method.strip_prefix("Async.") {
        Some(m) => (true, m),
        None => (false, method),
    };
    let args = &params[1..];
    let Some(want) = arity(name) else {
        return err("MESSAGE_METHOD_UNKNOWN", &[method]);
    };
    if args.len() != want {
        return err(
            "MESSAGE_PARAMETER_COUNT_MISMATCH",
            &[method, &(want + 1).to_string(), &params.len().to_string()],
        );
    }
    if injected && !is_async {
        st.fire(which, method, occurrence, n);
        return Err(fault);
    }
    if injected {
        // The task is returned, then fails.
        st.fire(which, method, occurrence, n);
    }
    if name == "session.logout" {
        st.sessions.remove(&session);
        return Ok(json!(""));
    }
    if name == "event.from" {
        let timeout = args
            .get(2)
            .and_then(|t| {
                t.as_f64()
                    .or_else(|| t.as_str().and_then(|s| s.parse().ok()))
            })
            .unwrap_or(0.0)
            .clamp(0.0, 60.0);
        let deadline = Instant::now() + Duration::from_secs_f64(timeout);
        loop {
            if let Some(v) = event_from(&st, args, deadline)? {
                return Ok(v);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            st = shared
                .changed
                .wait_timeout(st, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
    if !is_async && name != "VM.clean_shutdown" {
        let r = exec(shared, &mut st, name, args, None);
        drop(st);
        shared.changed.notify_all();
        return r;
    }
    // Async (and clean_shutdown, which waits for the guest): a task.
    let (task, tu) = new_ref();
    st.tasks.insert(
        task.clone(),
        Task {
            uuid: tu,
            name_label: format!("Async.{name}"),
            status: "pending".into(),
            progress: 0.0,
            result: String::new(),
            error_info: vec![],
        },
    );
    st.emit("task", &task, "add");
    drop(st);
    {
        let shared = shared.clone();
        let (task, name, args) = (task.clone(), name.to_string(), args.to_vec());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(3));
            let mut st = lock(&shared);
            let out = if injected {
                Err(fault)
            } else {
                exec(&shared, &mut st, &name, &args, Some(&task))
            };
            match out {
                Ok(Value::Null) => {} // the operation completes the task itself later
                Ok(v) => finish_task(&mut st, &task, Ok(v)),
                Err(e) => finish_task(&mut st, &task, Err(e)),
            }
            drop(st);
            shared.changed.notify_all();
        });
    }
    if is_async {
        return Ok(json!(task));
    }
    // A synchronous call that runs as a task: wait for it, then drop the task.
    let mut st = lock(shared);
    loop {
        match st.tasks.get(&task) {
            Some(t) if t.status == "pending" => {}
            Some(t) => {
                let t = t.clone();
                st.tasks.remove(&task);
                return if t.status == "success" {
                    Ok(json!(t
                        .result
                        .trim_start_matches("<value>")
                        .trim_end_matches("</value>")))
                } else {
                    Err(t.error_info)
                };
            }
            None => return err("INTERNAL_ERROR", &["task vanished"]),
        }
        st = shared
            .changed
            .wait_timeout(st, Duration::from_secs(1))
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0);
    }
}

/// The guest acts on a shutdown request (PV or the ACPI button): after a
/// moment it flushes (a marker in each of its disks), unmounts, powers off.
fn guest_powers_off(shared: &Arc<Shared>, vm: &str, task: Option<String>) {
    let (shared, vm) = (shared.clone(), vm.to_string());
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        let mut st = lock(&shared);
        if st.vms.get(&vm).map(|v| v.power_state.as_str()) != Some("Running") {
            return;
        }
        let name = st.vms[&vm].name_label.clone();
        for (vdi, _) in st.disks_of(&vm) {
            let (f, u) = (st.vdis[&vdi].file.clone(), st.vdis[&vdi].uuid.clone());
            let _ = write_at(&f, 8192, format!("clean shutdown of {name}").as_bytes());
            let keep = st.data_dir.join(format!("halted-{u}.img"));
            if sparse_copy(&f, &keep).is_ok() {
                st.halted_images.insert(u, keep);
            }
        }
        if let Some(m) = st.vms.get_mut(&vm) {
            m.shutdown_task = None;
        }
        st.set_power(&vm, "Halted");
        if let Some(task) = task {
            finish_task(&mut st, &task, Ok(json!("")));
        }
        drop(st);
        shared.changed.notify_all();
    });
}

/// Not XAPI: what `xl trigger DOMID power` does on a real host's dom0, for a
/// stand-in `xl` in tests (`POST /sim/acpi_power_button?domid=N`).
fn acpi_power_button(shared: &Arc<Shared>, conn: &TcpStream, q: &BTreeMap<String, String>) {
    let domid: i64 = q.get("domid").and_then(|d| d.parse().ok()).unwrap_or(-1);
    let st = lock(shared);
    let vm = st
        .vms
        .iter()
        .find(|(_, v)| v.domid == domid && v.power_state == "Running")
        .map(|(k, _)| k.clone());
    drop(st);
    match vm {
        Some(vm) => {
            guest_powers_off(shared, &vm, None);
            http::respond(conn, "200 OK", "text/plain", b"");
        }
        None => http::respond(
            conn,
            "404 Not Found",
            "text/plain",
            b"no running domain with that id",
        ),
    }
}

fn finish_task(st: &mut State, task: &str, out: XResult<Value>) {
    if let Some(t) = st.tasks.get_mut(task) {
        match out {
            Ok(v) => {
                t.status = "success".into();
                t.result = xml_value(&v);
            }
            Err(e) => {
                t.status = "failure".into();
                t.error_info = e;
            }
        }
        t.progress = 1.0;
    }
    st.emit("task", task, "mod");
}

/// One API operation on the state. `Ok(Null)` from a task-backed operation
/// means it finishes its task later (clean shutdown).
fn exec(
    shared: &Arc<Shared>,
    st: &mut State,
    name: &str,
    a: &[Value],
    task: Option<&str>,
) -> XResult<Value> {
    let a0 = a.first().map(s).unwrap_or_default();
    let a1 = a.get(1).map(s).unwrap_or_default();
    let void = Ok(json!(""));
    match name {
        "VM.get_all" => Ok(json!(st.vms.keys().collect::<Vec<_>>())),
        "VM.get_record" => st.record("vm", &a0),
        "VM.get_power_state" => Ok(json!(st.vm(&a0)?.power_state)),
        "VM.get_domid" => Ok(json!(st.vm(&a0)?.domid.to_string())),
        "VM.get_by_uuid" => st
            .vms
            .iter()
            .find(|(_, v)| v.uuid == a0)
            .map(|(k, _)| json!(k))
            .ok_or_else(|| vec!["UUID_INVALID".into(), "VM".into(), a0.clone()]),
        "VM.get_by_name_label" => Ok(json!(st
            .vms
            .iter()
            .filter(|(_, v)| v.name_label == a0)
            .map(|(k, _)| k)
            .collect::<Vec<_>>())),
        "VM.checkpoint" => {
            st.need_power(&a0, "Running")?;
            let v = st.vm(&a0)?.clone();
            if !v.can_suspend {
                return err("VM_LACKS_FEATURE", &[&a0]);
            }
            // Suspend (memory → a suspend VDI), snapshot disks and memory, resume.
            let mem = st.new_vdi(
                &format!("Suspend image for {}", v.name_label),
                v.memory,
                "suspend",
            )?;
            let file = st.vdis[&mem].file.clone();
            let _ = write_at(&file, 0, format!("memory of {}", v.uuid).as_bytes());
            let mut disks = vec![];
            for (vdi, dev) in st.disks_of(&a0) {
                disks.push((st.copy_vdi(&vdi, true)?, dev));
            }
            let snap = st.copy_vm(&a0, &a1, &disks)?;
            if let Some(sv) = st.vms.get_mut(&snap) {
                sv.is_a_snapshot = true;
                sv.is_a_template = true;
                sv.snapshot_of = a0.clone();
                sv.power_state = "Suspended".into();
                sv.suspend_vdi = mem.clone();
            }
            if let Some(m) = st.vdis.get_mut(&mem) {
                m.is_a_snapshot = true;
            }
            st.emit("vm", &snap, "add");
            // The original runs on and writes: its disks move past the checkpoint.
            for (vdi, _) in st.disks_of(&a0) {
                let f = st.vdis[&vdi].file.clone();
                let _ = write_at(&f, 4096, b"the original wrote this after the checkpoint");
            }
            Ok(json!(snap))
        }
        "VM.clone" => {
            let v = st.vm(&a0)?.clone();
            if has_domain(&v.power_state) {
                return err(
                    "VM_BAD_POWER_STATE",
                    &[&a0, "halted", &lower(&v.power_state)],
                );
            }
            let mut disks = vec![];
            for (vdi, dev) in st.disks_of(&a0) {
                disks.push((st.copy_vdi(&vdi, false)?, dev));
            }
            let suspend = if v.suspend_vdi != NULL {
                st.copy_vdi(&v.suspend_vdi, false)?
            } else {
                NULL.into()
            };
            let c = st.copy_vm(&a0, &a1, &disks)?;
            if let Some(cv) = st.vms.get_mut(&c) {
                cv.is_a_snapshot = false;
                cv.snapshot_of = NULL.into();
                cv.suspend_vdi = suspend;
            }
            st.emit("vm", &c, "add");
            Ok(json!(c))
        }
        "VM.set_is_a_template" => {
            st.vm(&a0)?;
            let val = a.get(1).and_then(Value::as_bool).unwrap_or(false);
            if let Some(v) = st.vms.get_mut(&a0) {
                if v.is_a_snapshot && !val {
                    return err("VM_IS_SNAPSHOT", &[&a0]);
                }
                v.is_a_template = val;
            }
            st.emit("vm", &a0, "mod");
            void
        }
        "VIF.get_record" => st.record("vif", &a0),
        "VIF.move" => {
            let vm = st
                .vifs
                .get(&a0)
                .map(|v| v.vm.clone())
                .ok_or_else(|| vec!["HANDLE_INVALID".into(), "VIF".into(), a0.clone()])?;
            if !st.networks.contains_key(&a1) {
                return err("HANDLE_INVALID", &["network", &a1]);
            }
            if !st.faults.vif_move_noop {
                if let Some(v) = st.vifs.get_mut(&a0) {
                    v.network = a1.clone();
                }
            }
            st.record_attachments(&vm);
            st.emit("vif", &a0, "mod");
            void
        }
        "VM.resume" => {
            st.need_power(&a0, "Suspended")?;
            if st.vm(&a0)?.is_a_template {
                return err("VM_IS_TEMPLATE", &[&a0, "resume"]);
            }
            let paused = a.get(1).and_then(Value::as_bool).unwrap_or(false);
            let mem = st.vm(&a0)?.suspend_vdi.clone();
            st.set_power(&a0, if paused { "Paused" } else { "Running" });
            // xapi drops the suspend image once the domain runs from it.
            if mem != NULL {
                st.destroy_vdi(&mem)?;
            }
            void
        }
        "VM.unpause" => {
            st.need_power(&a0, "Paused")?;
            st.set_power(&a0, "Running");
            void
        }
        "VM.hard_shutdown" => {
            let v = st.vm(&a0)?.clone();
            if !has_domain(&v.power_state) {
                return err(
                    "VM_BAD_POWER_STATE",
                    &[&a0, "running", &lower(&v.power_state)],
                );
            }
            if let Some(t) = v.shutdown_task {
                finish_task(st, &t, err("VM_SHUTDOWN_TIMEOUT", &[&a0, "hard shutdown"]));
            }
            if let Some(m) = st.vms.get_mut(&a0) {
                m.shutdown_task = None;
            }
            st.set_power(&a0, "Halted");
            void
        }
        "VM.clean_shutdown" => {
            st.need_power(&a0, "Running")?;
            let v = st.vm(&a0)?.clone();
            if !v.pv_drivers {
                return err("VM_LACKS_FEATURE", &[&a0]);
            }
            let Some(task) = task else {
                return err("INTERNAL_ERROR", &["clean_shutdown without a task"]);
            };
            if let Some(m) = st.vms.get_mut(&a0) {
                m.shutdown_task = Some(task.to_string());
            }
            if st.faults.guest_ignores_shutdown {
                return Ok(Value::Null);
            }
            guest_powers_off(shared, &a0, Some(task.to_string()));
            Ok(Value::Null)
        }
        "VM.destroy" => {
            let v = st.vm(&a0)?.clone();
            if has_domain(&v.power_state) {
                return err(
                    "VM_BAD_POWER_STATE",
                    &[&a0, "halted", &lower(&v.power_state)],
                );
            }
            // VBDs and VIFs go; VDIs stay (as in xapi).
            for b in &v.vbds {
                if let Some(vbd) = st.vbds.remove(b) {
                    if let Some(d) = st.vdis.get_mut(&vbd.vdi) {
                        d.vbds.retain(|x| x != b);
                    }
                }
            }
            for f in &v.vifs {
                st.vifs.remove(f);
            }
            st.vms.remove(&a0);
            st.emit("vm", &a0, "del");
            void
        }
        "VM.send_trigger" => err("NOT_IMPLEMENTED", &["VM.send_trigger"]),
        "VBD.get_record" => st.record("vbd", &a0),
        "VDI.get_record" => st.record("vdi", &a0),
        "VDI.get_by_uuid" => st
            .vdis
            .iter()
            .find(|(_, v)| v.uuid == a0)
            .map(|(k, _)| json!(k))
            .ok_or_else(|| vec!["UUID_INVALID".into(), "VDI".into(), a0.clone()]),
        "VDI.destroy" => st.destroy_vdi(&a0).map(|_| json!("")),
        "VDI.enable_cbt" => {
            let v = st
                .vdis
                .get_mut(&a0)
                .ok_or_else(|| vec!["HANDLE_INVALID".into(), "VDI".into(), a0.clone()])?;
            v.cbt_enabled = true;
            void
        }
        "VDI.list_changed_blocks" => {
            let (Some(from), Some(to)) = (st.vdis.get(&a0), st.vdis.get(&a1)) else {
                return err("HANDLE_INVALID", &["VDI", &a0]);
            };
            if !from.cbt_enabled || !to.cbt_enabled {
                return err("VDI_CBT_ENABLED_FALSE", &[&a0]);
            }
            changed_blocks(&from.file, &to.file).map(|b| json!(b))
        }
        "network.get_all" => Ok(json!(st.networks.keys().collect::<Vec<_>>())),
        "network.get_record" => st.record("network", &a0),
        "network.get_PIFs" => Ok(json!(
            st.networks
                .get(&a0)
                .ok_or_else(|| vec!["HANDLE_INVALID".into(), "network".into(), a0.clone()])?
                .pifs
        )),
        "network.get_by_uuid" => st
            .networks
            .iter()
            .find(|(_, v)| v.uuid == a0)
            .map(|(k, _)| json!(k))
            .ok_or_else(|| vec!["UUID_INVALID".into(), "network".into(), a0.clone()]),
        "network.get_by_name_label" => Ok(json!(st
            .networks
            .iter()
            .filter(|(_, v)| v.name_label == a0)
            .map(|(k, _)| k)
            .collect::<Vec<_>>())),
        "network.create" => {
            let rec = a.first().cloned().unwrap_or(Value::Null);
            let Some(label) = rec.get("name_label").and_then(Value::as_str) else {
                return err("FIELD_TYPE_ERROR", &["name_label"]);
            };
            let other_config = rec
                .get("other_config")
                .and_then(Value::as_object)
                .map(|o| o.iter().map(|(k, v)| (k.clone(), s(v))).collect())
                .unwrap_or_default();
            let (r, u) = new_ref();
            let bridge = format!("xapi{}", st.next_bridge);
            st.next_bridge += 1;
            st.networks.insert(
                r.clone(),
                Network {
                    uuid: u,
                    name_label: label.into(),
                    name_description: rec.get("name_description").map(s).unwrap_or_default(),
                    bridge,
                    pifs: vec![],
                    other_config,
                },
            );
            st.emit("network", &r, "add");
            Ok(json!(r))
        }
        "network.destroy" => {
            if !st.networks.contains_key(&a0) {
                return err("HANDLE_INVALID", &["network", &a0]);
            }
            let vifs: Vec<String> = st
                .vifs
                .iter()
                .filter(|(_, v)| v.network == a0)
                .map(|(k, _)| k.clone())
                .collect();
            if !vifs.is_empty() {
                let mut e = vec!["NETWORK_CONTAINS_VIF".to_string()];
                e.extend(vifs);
                return Err(e);
            }
            if !st.networks[&a0].pifs.is_empty() {
                return err("NETWORK_CONTAINS_PIF", &[&a0]);
            }
            st.networks.remove(&a0);
            st.emit("network", &a0, "del");
            void
        }
        "PIF.get_record" => st.record("pif", &a0),
        "task.create" => {
            let (r, u) = new_ref();
            st.tasks.insert(
                r.clone(),
                Task {
                    uuid: u,
                    name_label: a0.clone(),
                    status: "pending".into(),
                    progress: 0.0,
                    result: String::new(),
                    error_info: vec![],
                },
            );
            st.emit("task", &r, "add");
            Ok(json!(r))
        }
        "task.get_all" => Ok(json!(st.tasks.keys().collect::<Vec<_>>())),
        "task.get_record" => st.record("task", &a0),
        "task.destroy" => {
            if st.tasks.remove(&a0).is_none() {
                return err("HANDLE_INVALID", &["task", &a0]);
            }
            st.emit("task", &a0, "del");
            void
        }
        "task.cancel" => {
            if !st.tasks.contains_key(&a0) {
                return err("HANDLE_INVALID", &["task", &a0]);
            }
            finish_task(st, &a0, err("TASK_CANCELLED", &[&a0]));
            void
        }
        _ => err("MESSAGE_METHOD_UNKNOWN", &[name]),
    }
}

/// `event.from(classes, token, timeout)`: events after `token` in `classes`
/// ("vm", "vm/<ref>", "*"). Token "" returns every current object of those
/// classes as an "add". `None`: nothing yet, and `deadline` has not passed.
fn event_from(st: &State, a: &[Value], deadline: Instant) -> XResult<Option<Value>> {
    let classes: Vec<String> = a
        .first()
        .and_then(Value::as_array)
        .map(|c| c.iter().map(|x| lower(&s(x))).collect())
        .unwrap_or_default();
    let token = a.get(1).map(s).unwrap_or_default();
    let wanted = |class: &str, r: &str| {
        classes
            .iter()
            .any(|c| c == "*" || c == class || *c == format!("{class}/{}", lower(r)))
    };
    let ev = |e: &Event| {
        json!({"id": e.id.to_string(), "class": e.class, "operation": e.operation,
               "ref": e.reference, "snapshot": e.snapshot, "timestamp": "20260101T00:00:00Z"})
    };
    if token.is_empty() {
        let mut out = vec![];
        for (class, refs) in [
            ("vm", st.vms.keys().cloned().collect::<Vec<_>>()),
            ("task", st.tasks.keys().cloned().collect()),
            ("network", st.networks.keys().cloned().collect()),
            ("vdi", st.vdis.keys().cloned().collect()),
        ] {
            for r in refs {
                if wanted(class, &r) {
                    out.push(ev(&Event {
                        id: st.next_event,
                        class: class.into(),
                        reference: r.clone(),
                        operation: "add".into(),
                        snapshot: st.record(class, &r)?,
                    }));
                }
            }
        }
        return Ok(Some(
            json!({"events": out, "valid_ref_counts": {}, "token": st.next_event.to_string()}),
        ));
    }
    let Ok(since) = token.parse::<u64>() else {
        return err("EVENT_FROM_TOKEN_PARSE_FAILURE", &[&token]);
    };
    let found: Vec<Value> = st
        .events
        .iter()
        .filter(|e| e.id > since && wanted(&e.class, &e.reference))
        .map(ev)
        .collect();
    if found.is_empty() && Instant::now() < deadline {
        return Ok(None);
    }
    Ok(Some(json!({"events": found, "valid_ref_counts": {},
                   "token": st.next_event.max(since).to_string()})))
}

/// The CBT bitmap between two disk images: one bit per 64 KiB that differs, base64.
fn changed_blocks(a: &Path, b: &Path) -> XResult<String> {
    let io = |e: std::io::Error| vec!["SR_BACKEND_FAILURE".to_string(), e.to_string()];
    let mut fa = std::fs::File::open(a).map_err(io)?;
    let mut fb = std::fs::File::open(b).map_err(io)?;
    let len = fb.metadata().map_err(io)?.len();
    let blocks = len.div_ceil(CBT_BLOCK);
    let mut bitmap = vec![0u8; blocks.div_ceil(8) as usize];
    let (mut ba, mut bb) = (vec![0u8; CBT_BLOCK as usize], vec![0u8; CBT_BLOCK as usize]);
    for i in 0..blocks {
        let na = read_full(&mut fa, &mut ba).map_err(io)?;
        let nb = read_full(&mut fb, &mut bb).map_err(io)?;
        if ba[..na] != bb[..nb] {
            bitmap[(i / 8) as usize] |= 0x80 >> (i % 8);
        }
    }
    Ok(base64::engine::general_purpose::STANDARD.encode(bitmap))
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// `GET /export_raw_vdi?session_id=&task_id=&vdi=&format=raw`: the VDI's
/// bytes to EOF, no content-length (as xapi streams it).
fn export(shared: &Arc<Shared>, conn: &TcpStream, q: &BTreeMap<String, String>) {
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    let (session, task, vdi) = (get("session_id"), get("task_id"), get("vdi"));
    let mut st = lock(shared);
    let (n, occurrence) = st.log_call("export_raw_vdi");
    const M: &str = "export_raw_vdi";
    if st.faults.hold_exports_from.is_some_and(|h| occurrence >= h) {
        st.fire("hold_exports_from", M, occurrence, n);
        st.exports_held += 1;
        drop(st);
        shared.changed.notify_all();
        st = lock(shared);
        while st.faults.hold_exports_from.is_some_and(|h| occurrence >= h) {
            st = shared
                .changed
                .wait_timeout(st, Duration::from_secs(1))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        st.exports_held -= 1;
    }
    if matches(&st.faults.expire_sessions_at, M, occurrence) {
        st.sessions.clear();
        st.fire("expire_sessions_at", M, occurrence, n);
    }
    if occurrence == 1 && st.faults.expire_sessions_at_first_export {
        st.sessions.clear();
        st.fire("expire_sessions_at_first_export", M, occurrence, n);
    }
    // xapi fails the export's task when the handler refuses the request.
    let refuse = |st: &mut State, why: &str| {
        if st.tasks.contains_key(&task) {
            finish_task(st, &task, err("VDI_IO_ERROR", &[why]));
        }
    };
    if !st.sessions.contains_key(&session) {
        return http::respond(conn, "401 Unauthorized", "text/plain", b"SESSION_INVALID");
    }
    let which = if matches(&st.faults.fail_at, M, occurrence) {
        Some("fail_at")
    } else if matches_from(&st.faults.fail_from, M, occurrence) {
        Some("fail_from")
    } else if st.faults.fail_method.as_deref() == Some(M) {
        Some("fail_method")
    } else {
        None
    };
    if let Some(which) = which {
        st.fire(which, M, occurrence, n);
        refuse(&mut st, "injected export fault");
        drop(st);
        shared.changed.notify_all();
        return http::internal_error(
            conn,
            &format!("injected export fault at call {n} ({M} #{occurrence})"),
        );
    }
    if st.faults.redirect_exports && !q.contains_key("redirected") {
        drop(st);
        let query: Vec<String> = q.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let head = format!(
            "HTTP/1.1 302 Found\r\nlocation: /export_raw_vdi?{}&redirected=1\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            query.join("&")
        );
        let mut c = conn;
        let _ = c.write_all(head.as_bytes());
        return;
    }
    let format = q.get("format").map(String::as_str).unwrap_or("vhd");
    if format != "raw" {
        refuse(&mut st, "format");
        return http::respond(
            conn,
            "400 Bad Request",
            "text/plain",
            b"the simulator exports format=raw only",
        );
    }
    let Some(v) = st.vdis.get(&vdi).cloned() else {
        refuse(&mut st, "no such VDI");
        return http::respond(conn, "404 Not Found", "text/plain", b"VDI not found");
    };
    if v.vbds.iter().any(|b| {
        st.vbds
            .get(b)
            .and_then(|b| st.vms.get(&b.vm))
            .is_some_and(|m| has_domain(&m.power_state))
    }) {
        refuse(&mut st, "VDI_IN_USE");
        return http::internal_error(conn, &format!("VDI_IN_USE {vdi}"));
    }
    let drop_after = if st.exports_dropped < st.faults.drop_export_count {
        st.faults
            .drop_export_after
            .inspect(|_| st.exports_dropped += 1)
    } else {
        None
    };
    let delay = st.faults.export_delay_per_block;
    drop(st);
    let mut out = conn;
    let head =
        "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\nconnection: close\r\n\r\n";
    if out.write_all(head.as_bytes()).is_err() {
        return;
    }
    let mut f = match std::fs::File::open(&v.file) {
        Ok(f) => f,
        Err(_) => return,
    };
    let mut buf = vec![0u8; CBT_BLOCK as usize];
    let mut sent = 0u64;
    let ok = loop {
        let n = match read_full(&mut f, &mut buf) {
            Ok(0) => break true,
            Ok(n) => n,
            Err(_) => break false,
        };
        let mut n = n;
        if let Some(limit) = drop_after {
            if sent + n as u64 >= limit {
                n = (limit - sent) as usize;
                let _ = out.write_all(&buf[..n]);
                // The connection dies mid-transfer.
                let _ = conn.shutdown(std::net::Shutdown::Both);
                break false;
            }
        }
        if out.write_all(&buf[..n]).is_err() {
            break false;
        }
        sent += n as u64;
        if !task.is_empty() {
            let mut st = lock(shared);
            if let Some(t) = st.tasks.get_mut(&task) {
                t.progress = sent as f64 / v.virtual_size.max(1) as f64;
            }
        }
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
    };
    let _ = out.flush();
    let mut st = lock(shared);
    if ok {
        st.exports_completed += 1;
    }
    if st.tasks.contains_key(&task) {
        let r = if ok {
            Ok(json!(""))
        } else {
            err("VDI_IO_ERROR", &["the export connection was closed"])
        };
        finish_task(&mut st, &task, r);
    }
    drop(st);
    shared.changed.notify_all();
    let _ = conn.shutdown(std::net::Shutdown::Write);
}
