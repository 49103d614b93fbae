//! A stateful XAPI simulator for coldclone's tests, built on xapi's own
//! semantics.
//!
//! XAPI (the XenServer / XCP-ng toolstack) cannot run on the test machines,
//! so coldclone's XAPI backend is tested against this: an HTTP server that
//! speaks XAPI's JSON-RPC wire format (`POST /jsonrpc`, JSON-RPC 1.0 and 2.0
//! envelopes) and `GET /export_raw_vdi`, and keeps the state those calls
//! change. Every behaviour it models carries a comment naming the file and
//! function of xapi-project/xen-api (commit e2ee48d6, paths under `ocaml/`)
//! it follows; a behaviour with no such comment is the simulator's own
//! plumbing (faults, evidence), not a claim about xapi.
//!
//! Tests can inject faults ([`Faults`]); each one that takes effect is
//! recorded ([`State::fired`]). The simulator also keeps evidence a real host
//! would not: every VIF's network over its life, the suspend image each VM
//! resumed from, which domain each ACPI button press reached, and a copy of
//! each disk as the guest left it at a clean shutdown.

mod http;

use base64::Engine;
use serde_json::{json, Map, Value};
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
/// The xapi version the simulated hosts report in `software_version["xapi"]`
/// (xapi/xapi_globs.ml `software_version`: "major.minor").
pub const DEFAULT_XAPI_VERSION: &str = "24.19";

/// The `occurrence`th call (1-based) of `method`, as the call log names it
/// (`"Async.VM.checkpoint"`; `"export_raw_vdi"` for an export request).
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

/// Faults a test can inject. Each one that takes effect is recorded in [`State::fired`].
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// This call fails with INTERNAL_ERROR; for an `Async.` call the task is
    /// returned and then fails; an export request answers HTTP 500.
    pub fail_at: Option<At>,
    /// This call and every later call of the same method fail so.
    pub fail_from: Option<At>,
    /// Every call of this method fails (`"export_raw_vdi"` fails exports).
    pub fail_method: Option<String>,
    /// At this call every session becomes invalid (a toolstack restart).
    pub expire_sessions_at: Option<At>,
    /// The first export request finds every session invalid.
    pub expire_sessions_at_first_export: bool,
    /// This call is refused with OTHER_OPERATION_IN_PROGRESS (an `Async.`
    /// call's task fails so): what a client sees when xapi's own retry
    /// (xapi/helpers.ml, up to 2 h inside the call) gave up or was not used.
    pub busy_at: Option<At>,
    /// Export requests from the Nth (1-based) on wait until this is cleared.
    pub hold_exports_from: Option<u64>,
    /// The export pauses this long after every 64 KiB.
    pub export_delay_per_block: Duration,
    /// The first `drop_export_count` exports close the connection after this many bytes.
    pub drop_export_after: Option<u64>,
    pub drop_export_count: u32,
    /// The guest never acknowledges a clean shutdown request.
    pub guest_ignores_shutdown: bool,
    /// The guest acknowledges a clean shutdown request and never halts.
    pub guest_acks_but_never_halts: bool,
    /// Exports answer 302 to an absolute URL first, as a pool master does for
    /// a VDI on another host's storage.
    pub redirect_exports: bool,
    /// `VDI.destroy` answers VDI_IN_USE this many times after an export of the VDI.
    pub vdi_in_use_after_export: u32,
    /// `VM.resume` places the VM on the host with this name label.
    pub resume_on_host: Option<String>,
    /// A broken host: `VIF.create` answers success but puts the VIF on the
    /// pool's uplink network, whatever it was asked (isolation checks must catch it).
    pub vif_create_on_uplink: bool,
    /// An import (`PUT /import_raw_vdi`) fails after writing this many bytes of its
    /// body (the connection is closed, the task fails): a host that lost its storage
    /// mid-transfer.
    pub fail_import_after: Option<u64>,
    /// Imports wait, before their answer, until this is cleared (a kill -9 test's hold).
    pub hold_imports: bool,
}

/// A fault that took effect: which one, at which call, and the call's index in the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Fired {
    pub fault: &'static str,
    pub at: At,
    /// 1-based index in [`State::call_log`].
    pub call: u64,
}

/// A VM's power state (xapi's `vm_power_state` enum, idl/datamodel_vm.ml).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    Halted,
    Paused,
    Running,
    Suspended,
}

impl Power {
    pub fn as_str(self) -> &'static str {
        match self {
            Power::Halted => "Halted",
            Power::Paused => "Paused",
            Power::Running => "Running",
            Power::Suspended => "Suspended",
        }
    }
    /// As errors name it (xapi/record_util.ml `vm_power_state_to_lowercase_string`).
    pub fn lower(self) -> String {
        self.as_str().to_ascii_lowercase()
    }
    pub fn has_domain(self) -> bool {
        matches!(self, Power::Running | Power::Paused)
    }
    fn parse(s: &str) -> Option<Power> {
        Some(match s {
            "Halted" => Power::Halted,
            "Paused" => Power::Paused,
            "Running" => Power::Running,
            "Suspended" => Power::Suspended,
            _ => return None,
        })
    }
}

impl PartialEq<&str> for Power {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// What a guest is: it travels with its memory image (a suspend VDI), so a
/// VM resumed from a copy of that image is the same guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guest {
    /// PV drivers: `VM.clean_shutdown` works.
    pub pv_drivers: bool,
    pub can_suspend: bool,
    /// A balloon driver: the guest follows its dynamic memory range.
    pub balloon: bool,
}

/// An original VM to put on the simulated host.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    /// Disk sizes in bytes (each a multiple of 64 KiB).
    pub disks: Vec<u64>,
    pub nics: usize,
    pub pv_drivers: bool,
    pub can_suspend: bool,
    pub balloon: bool,
    pub cbt: bool,
    /// memory_static_max = dynamic_max = the memory the guest has.
    pub memory: u64,
    /// Each disk's VBD `userdevice`; empty: "0", "1", .. in disk order.
    pub userdevices: Vec<String>,
    /// The host it runs on (name label); None: the master.
    pub host: Option<String>,
}

impl VmSpec {
    pub fn new(name: &str, disks: &[u64]) -> VmSpec {
        VmSpec {
            name: name.into(),
            disks: disks.to_vec(),
            nics: 2,
            pv_drivers: true,
            can_suspend: true,
            balloon: true,
            cbt: false,
            memory: 8 << 20,
            userdevices: vec![],
            host: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Vm {
    pub uuid: String,
    pub name_label: String,
    pub power_state: Power,
    pub is_a_template: bool,
    pub is_a_snapshot: bool,
    pub snapshot_of: String,
    pub suspend_vdi: String,
    pub vbds: Vec<String>,
    pub vifs: Vec<String>,
    /// The guest while it has a domain or a memory image; None for a VM
    /// created Halted with no image.
    pub guest: Option<Guest>,
    pub memory_static_min: u64,
    pub memory_static_max: u64,
    pub memory_dynamic_min: u64,
    pub memory_dynamic_max: u64,
    /// VM_metrics.memory_actual: what the domain holds now.
    pub memory_actual: u64,
    /// When the guest last got a new dynamic range (the balloon moves after a moment).
    pub range_changed: Option<Instant>,
    pub metrics: String,
    pub domid: i64,
    pub resident_on: String,
    pub last_booted_record: String,
    pub last_boot_cpu_flags: BTreeMap<String, String>,
    pub other_config: BTreeMap<String, String>,
    /// The static fields given to `VM.create` or copied from the source VM
    /// (VCPUs, platform, ..): returned in the record as given.
    pub statics: Map<String, Value>,
    /// A clean shutdown the guest was asked for and has not done (its task).
    pub shutdown_task: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VdiType {
    User,
    Suspend,
    /// xapi/xapi_vdi.ml `_data_destroy`: a snapshot whose data is gone, its CBT log kept.
    CbtMetadata,
}

impl VdiType {
    fn as_str(self) -> &'static str {
        match self {
            VdiType::User => "user",
            VdiType::Suspend => "suspend",
            VdiType::CbtMetadata => "cbt_metadata",
        }
    }
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
    pub kind: VdiType,
    pub sr: String,
    pub other_config: BTreeMap<String, String>,
    /// Evidence: the uuid of the VDI this one was cloned or snapshotted from.
    pub copied_from: Option<String>,
    /// For a suspend image: the guest whose memory it holds.
    pub image_of: Option<Guest>,
    /// VDI_IN_USE answers still due after an export (Faults::vdi_in_use_after_export).
    pub busy_after_export: u32,
}

/// One CBT log (sm libs/sm/cbtutil.py: a bitmap of 64 KiB blocks written, the
/// disk's size, the uuids of the log before and after it in the chain).
#[derive(Debug, Clone, Default)]
pub struct CbtLog {
    pub size: u64,
    /// Blocks written while this log was the leaf's.
    pub blocks: std::collections::BTreeSet<u64>,
    pub parent: Option<String>,
    pub child: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Vbd {
    pub uuid: String,
    pub vm: String,
    pub vdi: String,
    pub userdevice: String,
    pub device: String,
    pub currently_attached: bool,
    pub mode: String,
    pub bootable: bool,
    /// `Disk` or `CD`.
    pub kind: String,
    /// A CD drive with no disc (its VDI is NULL).
    pub empty: bool,
}

#[derive(Debug, Clone)]
pub struct Vif {
    pub uuid: String,
    pub vm: String,
    pub network: String,
    pub device: String,
    pub mac: String,
    pub mtu: i64,
    pub currently_attached: bool,
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
pub struct Host {
    pub uuid: String,
    pub name_label: String,
    /// `software_version["xapi"]`.
    pub xapi_version: String,
    /// The host's memory for guests.
    pub memory_total: u64,
    next_domid: i64,
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

/// A VIF's network at a moment: when it was created or moved, and whenever
/// its VM gained a domain.
#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    pub vm: String,
    pub vm_name: String,
    pub vif: String,
    pub network: String,
    pub network_has_pif: bool,
    pub power_state: String,
}

/// A VM resumed: from which suspend VDI, and what that VDI was copied from.
#[derive(Debug, Clone, PartialEq)]
pub struct Resumed {
    pub vm_name: String,
    pub host: String,
    pub suspend_vdi_uuid: String,
    /// The VDI the suspend VDI was cloned from, if any.
    pub cloned_from_uuid: Option<String>,
    /// The snapshot VM whose suspend VDI that was (the checkpoint), when it still exists.
    pub cloned_from_checkpoint: Option<String>,
    /// The memory the image holds (the domain's size).
    pub memory_bytes: u64,
}

/// An ACPI power button press through the stand-in `xl` (evidence).
#[derive(Debug, Clone, PartialEq)]
pub struct Press {
    pub host: String,
    pub domid: i64,
    /// The VM whose domain that is on that host, if any.
    pub vm_name: Option<String>,
}

/// The scaled-down timeouts of xenopsd and xapi.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// xenopsd/lib/xenops_server.ml `domain_shutdown_ack_timeout` (60 s).
    pub shutdown_ack: Duration,
    /// xapi/xapi_globs.ml `domain_shutdown_total_timeout` (1200 s).
    pub shutdown_total: Duration,
    /// How long a balloon takes to reach its target.
    pub balloon: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            shutdown_ack: Duration::from_millis(300),
            shutdown_total: Duration::from_millis(1200),
            balloon: Duration::from_millis(40),
        }
    }
}

/// Everything the simulated pool knows.
#[derive(Debug, Default)]
pub struct State {
    pub users: BTreeMap<String, String>,
    pub sessions: BTreeMap<String, String>,
    pub pool: String,
    pub master: String,
    pub hosts: BTreeMap<String, Host>,
    pub vms: BTreeMap<String, Vm>,
    pub vdis: BTreeMap<String, Vdi>,
    pub vbds: BTreeMap<String, Vbd>,
    pub vifs: BTreeMap<String, Vif>,
    pub networks: BTreeMap<String, Network>,
    pub pifs: BTreeMap<String, Pif>,
    pub tasks: BTreeMap<String, Task>,
    pub sr: String,
    pub sr_uuid: String,
    pub attachments: Vec<Attachment>,
    pub resumed: Vec<Resumed>,
    pub presses: Vec<Press>,
    /// The most domains the pool ran at once (originals included).
    pub peak_domains: usize,
    /// Every `VM.set_memory_dynamic_range` that took effect: (VM name, min, max).
    pub ranges_set: Vec<(String, u64, u64)>,
    pub call_log: Vec<String>,
    pub call_counts: BTreeMap<String, u64>,
    pub fired: Vec<Fired>,
    pub exports_held: u64,
    /// Copies of each disk as the guest left it at a clean shutdown: VDI uuid → file.
    pub halted_images: BTreeMap<String, PathBuf>,
    /// The SR's changed-block-tracking logs by VDI uuid (sm libs/sm/VDI.py: one
    /// `<uuid>.cbtlog` per CBT-enabled VDI, linked to its neighbours by parent/child uuids).
    pub cbt_logs: BTreeMap<String, CbtLog>,
    pub faults: Faults,
    pub timeouts: Timeouts,
    pub exports_completed: u64,
    /// Imports whose every byte was written.
    pub imports_completed: u64,
    /// Imports waiting on `Faults::hold_imports` now.
    pub imports_held: u64,
    exports_dropped: u32,
    events: Vec<Event>,
    next_event: u64,
    next_bridge: u32,
    data_dir: PathBuf,
    url: String,
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

fn invalid(class: &str, r: &str) -> Vec<String> {
    vec!["HANDLE_INVALID".into(), class.into(), r.into()]
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

fn str_map(v: Option<&Value>) -> BTreeMap<String, String> {
    v.and_then(Value::as_object)
        .map(|o| o.iter().map(|(k, v)| (k.clone(), s(v))).collect())
        .unwrap_or_default()
}

/// An Int field of a record argument: xapi's JSON-RPC sends Int as a JSON
/// number (ocaml-rpc's jsonrpc encoder, `Rpc.Int`); the simulator insists on
/// it so that a client sending strings fails here as it may on a host.
fn int_arg(rec: &Value, key: &str) -> XResult<Option<i64>> {
    match rec.get(key) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .map(Some)
            .ok_or_else(|| vec!["FIELD_TYPE_ERROR".into(), key.into()]),
        Some(_) => err("FIELD_TYPE_ERROR", &[key]),
    }
}

impl State {
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

    /// A class's record as `<class>.get_record` returns it. Int fields are
    /// JSON numbers (ocaml-rpc jsonrpc; sdk-gen/component-test/spec/xapi-24/
    /// vm_get_all_records.json has `"domid": 50`).
    fn record(&self, class: &str, r: &str) -> XResult<Value> {
        Ok(match class {
            "vm" => {
                let v = self.vms.get(r).ok_or_else(|| invalid("VM", r))?;
                let mut rec = v.statics.clone();
                let dynamic = json!({
                    "uuid": v.uuid, "name_label": v.name_label,
                    "power_state": v.power_state.as_str(), "is_a_template": v.is_a_template,
                    "is_a_snapshot": v.is_a_snapshot, "snapshot_of": v.snapshot_of,
                    "suspend_VDI": v.suspend_vdi, "VBDs": v.vbds, "VIFs": v.vifs,
                    "domid": v.domid,
                    "resident_on": v.resident_on,
                    "memory_static_min": v.memory_static_min,
                    "memory_static_max": v.memory_static_max,
                    "memory_dynamic_min": v.memory_dynamic_min,
                    "memory_dynamic_max": v.memory_dynamic_max,
                    "memory_target": v.memory_dynamic_min,
                    "metrics": v.metrics,
                    "is_control_domain": false,
                    "allowed_operations": self.allowed_operations(v),
                    "other_config": v.other_config,
                    "last_booted_record": v.last_booted_record,
                    "last_boot_CPU_flags": v.last_boot_cpu_flags,
                });
                if let Value::Object(d) = dynamic {
                    rec.extend(d);
                }
                Value::Object(rec)
            }
            "vm_metrics" => {
                let v = self
                    .vms
                    .values()
                    .find(|v| v.metrics == r)
                    .ok_or_else(|| invalid("VM_metrics", r))?;
                json!({"uuid": "", "memory_actual": self.memory_actual(v), "VCPUs_number": 1})
            }
            "vdi" => {
                let v = self.vdis.get(r).ok_or_else(|| invalid("VDI", r))?;
                // idl/datamodel.ml VDI `snapshots`: the reverse of `snapshot_of`.
                let snapshots: Vec<&String> = self
                    .vdis
                    .iter()
                    .filter(|(_, x)| x.snapshot_of == r)
                    .map(|(k, _)| k)
                    .collect();
                json!({
                    "uuid": v.uuid, "name_label": v.name_label,
                    "virtual_size": v.virtual_size,
                    "physical_utilisation": v.virtual_size,
                    "is_a_snapshot": v.is_a_snapshot, "snapshot_of": v.snapshot_of,
                    "snapshots": snapshots,
                    "cbt_enabled": v.cbt_enabled, "VBDs": v.vbds, "type": v.kind.as_str(),
                    "read_only": false, "SR": v.sr, "other_config": v.other_config,
                })
            }
            "vbd" => {
                let v = self.vbds.get(r).ok_or_else(|| invalid("VBD", r))?;
                json!({
                    "uuid": v.uuid, "VM": v.vm, "VDI": v.vdi, "userdevice": v.userdevice,
                    "device": v.device, "bootable": v.bootable, "unpluggable": true,
                    "type": v.kind, "mode": v.mode, "currently_attached": v.currently_attached,
                    "empty": v.empty, "other_config": {}, "qos_algorithm_type": "",
                    "qos_algorithm_params": {},
                })
            }
            "vif" => {
                let v = self.vifs.get(r).ok_or_else(|| invalid("VIF", r))?;
                json!({"uuid": v.uuid, "VM": v.vm, "network": v.network, "device": v.device,
                       "MAC": v.mac, "MTU": v.mtu, "currently_attached": v.currently_attached,
                       "other_config": {}, "qos_algorithm_type": "", "qos_algorithm_params": {},
                       "locking_mode": "network_default", "ipv4_allowed": [], "ipv6_allowed": []})
            }
            "network" => {
                let n = self.networks.get(r).ok_or_else(|| invalid("network", r))?;
                let vifs: Vec<&String> = self
                    .vifs
                    .iter()
                    .filter(|(_, v)| v.network == r)
                    .map(|(k, _)| k)
                    .collect();
                json!({
                    "uuid": n.uuid, "name_label": n.name_label, "name_description": n.name_description,
                    "bridge": n.bridge, "PIFs": n.pifs, "VIFs": vifs, "MTU": 1500,
                    "other_config": n.other_config,
                })
            }
            "pif" => {
                let p = self.pifs.get(r).ok_or_else(|| invalid("PIF", r))?;
                json!({"uuid": p.uuid, "network": p.network, "device": p.device, "physical": true})
            }
            "host" => {
                let h = self.hosts.get(r).ok_or_else(|| invalid("host", r))?;
                json!({"uuid": h.uuid, "name_label": h.name_label,
                       "software_version": {"xapi": h.xapi_version, "product_brand": "XCP-ng"},
                       "API_version_major": 2, "API_version_minor": 21})
            }
            "pool" => {
                if r != self.pool {
                    return Err(invalid("pool", r));
                }
                json!({"uuid": "", "name_label": "", "master": self.master, "other_config": {}})
            }
            "sr" => {
                if r != self.sr {
                    return Err(invalid("SR", r));
                }
                let vdis: Vec<&String> = self.vdis.keys().collect();
                json!({"uuid": self.sr_uuid, "name_label": "Local storage", "VDIs": vdis, "type": "ext"})
            }
            "task" => {
                let t = self.tasks.get(r).ok_or_else(|| invalid("task", r))?;
                json!({
                    "uuid": t.uuid, "name_label": t.name_label, "status": t.status,
                    "progress": t.progress, "result": t.result, "error_info": t.error_info,
                })
            }
            _ => return err("HANDLE_INVALID", &[class, r]),
        })
    }

    /// xapi/xapi_vm_lifecycle.ml `allowed_operations` (a subset: the operations coldclone reads).
    fn allowed_operations(&self, v: &Vm) -> Vec<&'static str> {
        let mut ops = vec![];
        let g = v.guest.unwrap_or(Guest {
            pv_drivers: false,
            can_suspend: false,
            balloon: false,
        });
        match v.power_state {
            Power::Running => {
                ops.extend(["hard_shutdown", "pause", "changing_dynamic_range"]);
                if g.pv_drivers {
                    ops.push("clean_shutdown");
                }
                if g.can_suspend {
                    ops.extend(["checkpoint", "suspend"]);
                }
            }
            Power::Paused => ops.extend(["hard_shutdown", "unpause"]),
            Power::Suspended => ops.extend(["resume", "hard_shutdown", "destroy"]),
            Power::Halted => ops.extend(["start", "clone", "destroy", "changing_dynamic_range"]),
        }
        ops
    }

    /// The guest's memory now: with a balloon driver it has reached its
    /// dynamic_max a moment after the range changed (squeezed sets the target
    /// within the range; with free memory, at its top).
    fn memory_actual(&self, v: &Vm) -> u64 {
        if !v.power_state.has_domain() {
            return 0;
        }
        match (v.guest, v.range_changed) {
            (Some(g), Some(t)) if g.balloon && t.elapsed() >= self.timeouts.balloon => {
                v.memory_dynamic_max
            }
            _ => v.memory_actual,
        }
    }

    fn settle_balloon(&mut self, vm: &str) {
        let actual = self.vms.get(vm).map(|v| self.memory_actual(v));
        if let (Some(a), Some(v)) = (actual, self.vms.get_mut(vm)) {
            v.memory_actual = a;
        }
    }

    fn record_attachments(&mut self, vm: &str) {
        let Some(v) = self.vms.get(vm) else { return };
        let (name, ps, vifs) = (v.name_label.clone(), v.power_state, v.vifs.clone());
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
                    power_state: ps.as_str().into(),
                });
            }
        }
    }

    /// A domain starts on `host` (domids are per host: each host's Xen counts its own).
    fn start_domain(&mut self, vm: &str, host: &str, ps: Power) {
        let domid = self.hosts.get_mut(host).map(|h| {
            h.next_domid += 1;
            h.next_domid
        });
        if let Some(v) = self.vms.get_mut(vm) {
            v.power_state = ps;
            v.domid = domid.unwrap_or(-1);
            v.resident_on = host.into();
        }
        let running = self
            .vms
            .values()
            .filter(|v| v.power_state.has_domain())
            .count();
        self.peak_domains = self.peak_domains.max(running);
        self.record_attachments(vm);
        self.emit("vm", vm, "mod");
    }

    /// xapi/xapi_vm_lifecycle.ml `force_state_reset_keep_current_operations`:
    /// Halted marks every VBD and VIF of the VM detached.
    fn force_state_reset(&mut self, vm: &str, ps: Power) {
        let Some(v) = self.vms.get_mut(vm) else {
            return;
        };
        v.power_state = ps;
        if !ps.has_domain() {
            v.domid = -1;
            v.resident_on = NULL.into();
        }
        if ps == Power::Halted {
            let (vbds, vifs) = (v.vbds.clone(), v.vifs.clone());
            for b in vbds {
                if let Some(b) = self.vbds.get_mut(&b) {
                    b.currently_attached = false;
                }
            }
            for f in vifs {
                if let Some(f) = self.vifs.get_mut(&f) {
                    f.currently_attached = false;
                }
            }
        }
        self.emit("vm", vm, "mod");
    }

    fn vm(&self, r: &str) -> XResult<&Vm> {
        self.vms.get(r).ok_or_else(|| invalid("VM", r))
    }

    /// xapi/xapi_vm_lifecycle.ml `check_operation_error`: VM_BAD_POWER_STATE [vm; expected; actual].
    fn need_power(&self, r: &str, allowed: &[Power]) -> XResult<()> {
        let v = self.vm(r)?;
        if !allowed.contains(&v.power_state) {
            let expected: Vec<String> = allowed.iter().map(|p| p.lower()).collect();
            return err(
                "VM_BAD_POWER_STATE",
                &[r, &expected.join(", "), &v.power_state.lower()],
            );
        }
        Ok(())
    }

    fn new_vdi(&mut self, name: &str, size: u64, kind: VdiType) -> XResult<String> {
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
                kind,
                sr: self.sr.clone(),
                other_config: BTreeMap::new(),
                copied_from: None,
                image_of: None,
                busy_after_export: 0,
            },
        );
        self.emit("vdi", &r, "add");
        Ok(r)
    }

    /// xapi/xapi_vdi.ml `snapshot_and_clone`: a copy of the VDI's data; the
    /// new VDI takes the source's name_label, type and other_config.
    fn copy_vdi(&mut self, src: &str, snapshot: bool) -> XResult<String> {
        let v = self
            .vdis
            .get(src)
            .cloned()
            .ok_or_else(|| invalid("VDI", src))?;
        let r = self.new_vdi(&v.name_label, v.virtual_size, v.kind)?;
        let file = self.vdis[&r].file.clone();
        if let Err(e) = sparse_copy(&v.file, &file) {
            return err("SR_BACKEND_FAILURE", &[&e.to_string()]);
        }
        // sm libs/sm/drivers/FileSR.py `_snapshot`: a snapshot of a CBT-enabled VDI is
        // CBT-enabled and takes over its log (`_cbt_snapshot`); a clone is not
        // (quicktest/quicktest_cbt.ml `vdi_clone_copy_test`: "VDI.clone failed to set
        // cbt_enabled to false").
        let tracked = snapshot && v.cbt_enabled && self.cbt_logs.contains_key(&v.uuid);
        let new_uuid = self.vdis[&r].uuid.clone();
        if tracked {
            self.cbt_snapshot(&v.uuid, &new_uuid);
        }
        if let Some(n) = self.vdis.get_mut(&r) {
            n.is_a_snapshot = snapshot;
            n.snapshot_of = if snapshot { src.into() } else { NULL.into() };
            n.cbt_enabled = tracked;
            n.other_config = v.other_config.clone();
            n.copied_from = Some(v.uuid.clone());
            n.image_of = v.image_of;
        }
        Ok(r)
    }

    /// sm libs/sm/VDI.py `_cbt_snapshot`: the VDI's log becomes the snapshot's (the
    /// blocks written since the previous snapshot), the previous snapshot's child is
    /// the new one, and the VDI starts a fresh log whose parent is the snapshot.
    fn cbt_snapshot(&mut self, vdi_uuid: &str, snap_uuid: &str) {
        let Some(mut old) = self.cbt_logs.remove(vdi_uuid) else {
            return;
        };
        if let Some(p) = old.parent.clone() {
            if let Some(pl) = self.cbt_logs.get_mut(&p) {
                pl.child = Some(snap_uuid.into());
            }
        }
        let size = old.size;
        let prev_child = old.child.take();
        old.child = Some(vdi_uuid.into());
        self.cbt_logs.insert(snap_uuid.into(), old);
        self.cbt_logs.insert(
            vdi_uuid.into(),
            CbtLog {
                size,
                blocks: Default::default(),
                parent: Some(snap_uuid.into()),
                child: prev_child,
            },
        );
    }

    /// sm libs/sm/VDI.py `delete` (not data_only): the log leaves the chain, its
    /// neighbours are linked, and its bitmap is merged into its child's
    /// (`cbtutil.coalesce_bitmap`).
    fn cbt_delete(&mut self, uuid: &str) {
        let Some(log) = self.cbt_logs.remove(uuid) else {
            return;
        };
        if let Some(p) = &log.parent {
            if let Some(pl) = self.cbt_logs.get_mut(p) {
                pl.child = log.child.clone();
            }
        }
        if let Some(c) = &log.child {
            if let Some(cl) = self.cbt_logs.get_mut(c) {
                cl.parent = log.parent.clone();
                cl.blocks.extend(log.blocks.iter().copied());
            }
        }
    }

    /// sm libs/sm/VDI.py `list_changed_blocks`: from `from`'s child along the child
    /// links to `to`, the union of the logs' bitmaps; base64 of the bitmap in
    /// `bitarray` order after `bytereverse` (block i: byte i/8, bit 0x80 >> i%8).
    /// Errors as xapi/storage_utils.ml `transform_storage_exn` passes SM's on:
    /// CBTChangedBlocksError is code 460 (sm core/XE_SR_ERRORCODES.xml).
    fn cbt_list(&self, from: &str, to: &str) -> XResult<String> {
        let failure = |why: &str| {
            err(
                "SR_BACKEND_FAILURE_460",
                &[
                    "",
                    &format!("Failed to calculate changed blocks for given VDIs. [opterr={why}]"),
                    "",
                ],
            )
        };
        if from == to {
            return failure("Source and target VDI are same");
        }
        if self.cbt_logs.contains_key(from) && self.cbt_logs.contains_key(to) {
            let mut merged: std::collections::BTreeSet<u64> = Default::default();
            let mut cur = from.to_string();
            let mut steps = 0;
            while let Some(next) = self.cbt_logs.get(&cur).and_then(|l| l.child.clone()) {
                let Some(log) = self.cbt_logs.get(&next) else {
                    break;
                };
                merged.extend(log.blocks.iter().copied());
                if next == to {
                    let nblocks = log.size.div_ceil(CBT_BLOCK);
                    let mut bitmap = vec![0u8; nblocks.div_ceil(8) as usize];
                    for b in merged.iter().filter(|b| **b < nblocks) {
                        bitmap[(b / 8) as usize] |= 0x80 >> (b % 8);
                    }
                    return Ok(base64::engine::general_purpose::STANDARD.encode(bitmap));
                }
                cur = next;
                steps += 1;
                if steps > self.cbt_logs.len() {
                    break;
                }
            }
        }
        failure("Source and target VDI are unrelated")
    }

    /// A write into a VDI's data; a CBT-enabled VDI's log marks the 64 KiB blocks it
    /// touches (sm libs/sm/VDI.py `activate` hands tapdisk the log, which records
    /// every write).
    fn write_vdi(&mut self, vdi: &str, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let v = self
            .vdis
            .get(vdi)
            .ok_or_else(|| std::io::Error::other(format!("no VDI {vdi}")))?;
        write_at(&v.file, offset, data)?;
        if let Some(log) = self.cbt_logs.get_mut(&v.uuid) {
            if !data.is_empty() {
                let last = (offset + data.len() as u64 - 1) / CBT_BLOCK;
                log.blocks.extend(offset / CBT_BLOCK..=last);
            }
        }
        Ok(())
    }

    fn add_vbd(&mut self, vm: &str, vdi: &str, userdevice: &str, attached: bool) -> String {
        let (r, u) = new_ref();
        self.vbds.insert(
            r.clone(),
            Vbd {
                uuid: u,
                vm: vm.into(),
                vdi: vdi.into(),
                userdevice: userdevice.into(),
                device: if attached {
                    device_name(userdevice)
                } else {
                    String::new()
                },
                currently_attached: attached,
                mode: "RW".into(),
                bootable: userdevice == "0",
                kind: "Disk".into(),
                empty: false,
            },
        );
        if let Some(v) = self.vms.get_mut(vm) {
            v.vbds.push(r.clone());
        }
        if let Some(d) = self.vdis.get_mut(vdi) {
            d.vbds.push(r.clone());
        }
        r
    }

    fn add_vif(
        &mut self,
        vm: &str,
        network: &str,
        device: &str,
        mac: Option<String>,
        attached: bool,
    ) -> String {
        let (r, u) = new_ref();
        let mac = mac.unwrap_or_else(|| format!("00:16:3e:{}:{}:{}", &u[0..2], &u[2..4], &u[4..6]));
        self.vifs.insert(
            r.clone(),
            Vif {
                uuid: u,
                vm: vm.into(),
                network: network.into(),
                device: device.into(),
                mac,
                mtu: 1500,
                currently_attached: attached,
            },
        );
        if let Some(v) = self.vms.get_mut(vm) {
            v.vifs.push(r.clone());
        }
        r
    }

    fn disks_of(&self, vm: &str) -> Vec<(String, String)> {
        self.vms
            .get(vm)
            .map(|v| {
                v.vbds
                    .iter()
                    .filter_map(|b| self.vbds.get(b))
                    .filter(|b| self.vdis.contains_key(&b.vdi))
                    .map(|b| (b.vdi.clone(), b.userdevice.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// xapi/xapi_vdi.ml `destroy_and_data_destroy_common`: VDI_IN_USE while
    /// any VBD of the VDI is currently_attached (or reserved); else the VDI
    /// and its VBDs go (xapi/xapi_vdi.ml `destroy`: VBDs are destroyed with it).
    fn destroy_vdi(&mut self, r: &str) -> XResult<()> {
        let v = self.vdis.get(r).cloned().ok_or_else(|| invalid("VDI", r))?;
        if v.vbds
            .iter()
            .any(|b| self.vbds.get(b).is_some_and(|b| b.currently_attached))
        {
            return err("VDI_IN_USE", &[r, "destroy"]);
        }
        if v.busy_after_export > 0 {
            // Not xapi's code: the tapdisk of a just-finished export may still
            // hold the VDI a moment (Xen Orchestra retries VDI_IN_USE,
            // @xen-orchestra/xapi/index.mjs `_vdiDestroyRetryWhenInUse`).
            if let Some(x) = self.vdis.get_mut(r) {
                x.busy_after_export -= 1;
            }
            return err("VDI_IN_USE", &[r, "destroy"]);
        }
        for b in &v.vbds {
            if let Some(vbd) = self.vbds.remove(b) {
                if let Some(m) = self.vms.get_mut(&vbd.vm) {
                    m.vbds.retain(|x| x != b);
                }
            }
        }
        let _ = std::fs::remove_file(&v.file);
        self.cbt_delete(&v.uuid);
        self.vdis.remove(r);
        self.emit("vdi", r, "del");
        Ok(())
    }

    /// xapi/xapi_vdi.ml `check_operation_error` (`allowed_for_cbt_metadata_vdi`): clone,
    /// copy, snapshot and CBT changes are refused on a cbt_metadata VDI with
    /// VDI_INCOMPATIBLE_TYPE [vdi; "cbt_metadata"].
    fn cbt_allowed(&self, vdi: &str) -> XResult<()> {
        let v = self.vdis.get(vdi).ok_or_else(|| invalid("VDI", vdi))?;
        if v.kind == VdiType::CbtMetadata {
            return err("VDI_INCOMPATIBLE_TYPE", &[vdi, "cbt_metadata"]);
        }
        Ok(())
    }

    /// xapi/xapi_vm.ml `hard_shutdown`: a Suspended VM loses its suspend VDI
    /// (destroyed, errors ignored, the field cleared) and is forced Halted;
    /// a Running or Paused one is shut down.
    fn hard_shutdown(&mut self, vm: &str) -> XResult<()> {
        // xapi/xapi_vm_lifecycle.ml: hard_shutdown is allowed Paused, Suspended, Running.
        self.need_power(vm, &[Power::Paused, Power::Suspended, Power::Running])?;
        let v = self.vm(vm)?.clone();
        if v.power_state == Power::Suspended {
            if v.suspend_vdi != NULL {
                let _ = self.destroy_vdi(&v.suspend_vdi);
            }
            if let Some(m) = self.vms.get_mut(vm) {
                m.suspend_vdi = NULL.into();
            }
            self.force_state_reset(vm, Power::Halted);
            return Ok(());
        }
        // xapi/message_forwarding.ml VM.hard_shutdown: other operations of the VM are cancelled.
        if let Some(t) = v.shutdown_task {
            finish_task(self, &t, err("TASK_CANCELLED", &[&t]));
        }
        if let Some(m) = self.vms.get_mut(vm) {
            m.shutdown_task = None;
        }
        self.force_state_reset(vm, Power::Halted);
        Ok(())
    }

    /// xapi/xapi_host.ml `compute_free_memory` →
    /// Memory_check.host_compute_free_memory_with_maximum_compression: the
    /// host's memory less what its domains hold at their dynamic_min.
    fn host_free_memory(&self, host: &str) -> u64 {
        let total = self.hosts.get(host).map(|h| h.memory_total).unwrap_or(0);
        let used: u64 = self
            .vms
            .values()
            .filter(|v| v.resident_on == host && v.power_state.has_domain())
            .map(|v| v.memory_dynamic_min)
            .sum();
        total.saturating_sub(used)
    }

    fn host_by_name(&self, name: &str) -> Option<String> {
        self.hosts
            .iter()
            .find(|(_, h)| h.name_label == name)
            .map(|(k, _)| k.clone())
    }
}

/// xapi/xapi_vif_helpers.ml `gen_mac`: six bytes of a hash chain over the VM's
/// mac_seed, `device * 2` links long, so one seed and device give one MAC. (xapi
/// hashes with MD5; the simulator's hash differs, the dependence on seed and device
/// is what it models.) Local bit set, multicast bit clear, as
/// xapi-cli-server/record_util.ml `mac_from_int_array` makes it.
fn gen_mac(device: u32, seed: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    seed.hash(&mut h);
    device.hash(&mut h);
    let b = h.finish().to_be_bytes();
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        (b[0] & 0xfe) | 0x02,
        b[1],
        b[2],
        b[3],
        b[4],
        b[5]
    )
}

/// xapi/helpers.ml `is_valid_MAC`: six pairs of hex digits separated by `:`.
fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// The guest's name for a VBD's disk (xvda..xvdz, xvdaa..).
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

/// Parameters each method takes after the session (for MESSAGE_PARAMETER_COUNT_MISMATCH).
fn arity(method: &str) -> Option<usize> {
    Some(match method {
        "session.logout" | "VM.get_all" | "network.get_all" | "task.get_all" | "pool.get_all"
        | "host.get_all" | "SR.get_all" => 0,
        "VM.get_record"
        | "VM.get_power_state"
        | "VM.get_by_uuid"
        | "VM.get_by_name_label"
        | "VM.get_uuid"
        | "VM.unpause"
        | "VM.clean_shutdown"
        | "VM.hard_shutdown"
        | "VM.destroy"
        | "VM.get_domid"
        | "VM.get_resident_on"
        | "VM.get_metrics"
        | "VM.create"
        | "VM_metrics.get_memory_actual"
        | "VM_metrics.get_record"
        | "VDI.get_record"
        | "VDI.get_by_uuid"
        | "VDI.get_by_name_label"
        | "VDI.get_uuid"
        | "VDI.destroy"
        | "VBD.get_record"
        | "VBD.create"
        | "VIF.get_record"
        | "VIF.create"
        | "network.get_record"
        | "network.get_by_uuid"
        | "network.get_by_name_label"
        | "network.destroy"
        | "network.get_PIFs"
        | "network.create"
        | "PIF.get_record"
        | "host.get_record"
        | "host.get_uuid"
        | "host.get_software_version"
        | "host.compute_free_memory"
        | "pool.get_record"
        | "pool.get_master"
        | "SR.get_record"
        | "SR.get_by_uuid"
        | "SR.get_by_name_label"
        | "VDI.create"
        | "SR.get_VDIs"
        | "task.get_record"
        | "task.destroy"
        | "task.cancel"
        | "VDI.enable_cbt"
        | "VDI.disable_cbt"
        | "VDI.data_destroy" => 1,
        "VM.checkpoint"
        | "VM.clone"
        | "VM.set_is_a_template"
        | "VIF.move"
        | "VDI.clone"
        | "VDI.snapshot"
        | "VDI.set_name_label"
        | "VM.set_name_label"
        | "VDI.remove_from_other_config"
        | "VDI.list_changed_blocks"
        | "task.create"
        | "VM.send_trigger" => 2,
        "VM.resume" | "event.from" | "VM.set_memory_dynamic_range" | "VDI.add_to_other_config" => 3,
        _ => return None,
    })
}

impl Sim {
    /// Starts a one-host pool on 127.0.0.1 (a free port), VDI files under `data_dir`.
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
                url: format!("http://{addr}"),
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
            let (p, _) = new_ref();
            st.pool = p;
            let (sr, sr_uuid) = new_ref();
            st.sr = sr;
            st.sr_uuid = sr_uuid;
            // The pool's physical network: what the clone must never touch.
            let (n, nu) = new_ref();
            let (pif, pu) = new_ref();
            st.pifs.insert(
                pif.clone(),
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
                    pifs: vec![pif],
                    other_config: BTreeMap::new(),
                },
            );
        });
        sim.add_host("host0", DEFAULT_XAPI_VERSION);
        Ok(sim)
    }

    /// Adds a host to the pool (the first one is the master). Returns its uuid.
    pub fn add_host(&self, name: &str, xapi_version: &str) -> String {
        self.with_state(|st| {
            let (r, u) = new_ref();
            st.hosts.insert(
                r.clone(),
                Host {
                    uuid: u.clone(),
                    name_label: name.into(),
                    xapi_version: xapi_version.into(),
                    memory_total: 64 << 30,
                    next_domid: 0,
                },
            );
            if st.master.is_empty() {
                st.master = r;
            }
            u
        })
    }

    /// The uuid of the host with this name label.
    pub fn host_uuid(&self, name: &str) -> Option<String> {
        let st = self.state();
        st.host_by_name(name).map(|h| st.hosts[&h].uuid.clone())
    }

    /// Sets a host's memory for guests.
    pub fn set_host_memory(&self, name: &str, bytes: u64) {
        self.with_state(|st| {
            if let Some(h) = st.host_by_name(name) {
                if let Some(h) = st.hosts.get_mut(&h) {
                    h.memory_total = bytes;
                }
            }
        });
    }

    /// Sets every host's `software_version["xapi"]`.
    pub fn set_xapi_version(&self, v: &str) {
        self.with_state(|st| {
            for h in st.hosts.values_mut() {
                h.xapi_version = v.into();
            }
        });
    }

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

    /// Puts a running VM on the pool: disks filled with data, NICs on the
    /// pool network, VBDs and VIFs attached. Returns (ref, uuid).
    pub fn add_vm(&self, spec: &VmSpec) -> std::io::Result<(String, String)> {
        self.with_state(|st| {
            let net = st
                .networks
                .iter()
                .find(|(_, n)| !n.pifs.is_empty())
                .map(|(k, _)| k.clone())
                .unwrap_or_default();
            let host = match &spec.host {
                Some(h) => st
                    .host_by_name(h)
                    .ok_or_else(|| std::io::Error::other(format!("no host {h}")))?,
                None => st.master.clone(),
            };
            let (r, u) = new_ref();
            let (metrics, _) = new_ref();
            let mut statics = Map::new();
            for (k, v) in [
                ("name_description", json!("")),
                ("user_version", json!(1)),
                ("VCPUs_max", json!(2)),
                ("VCPUs_at_startup", json!(2)),
                ("VCPUs_params", json!({})),
                ("actions_after_shutdown", json!("destroy")),
                ("actions_after_reboot", json!("restart")),
                ("actions_after_crash", json!("restart")),
                ("PV_bootloader", json!("")),
                ("PV_kernel", json!("")),
                ("PV_ramdisk", json!("")),
                ("PV_args", json!("")),
                ("PV_bootloader_args", json!("")),
                ("PV_legacy_args", json!("")),
                (
                    "HVM_boot_policy",
                    json!(if spec.pv_drivers { "" } else { "BIOS order" }),
                ),
                ("HVM_boot_params", json!({})),
                ("HVM_shadow_multiplier", json!(1.0)),
                ("platform", json!({})),
                ("PCI_bus", json!("")),
                ("recommendations", json!("")),
                ("xenstore_data", json!({})),
                ("ha_always_run", json!(false)),
                ("ha_restart_priority", json!("")),
                ("tags", json!([])),
                ("blocked_operations", json!({})),
                ("affinity", json!(NULL)),
                (
                    "domain_type",
                    json!(if spec.pv_drivers { "pv" } else { "hvm" }),
                ),
                ("NVRAM", json!({})),
            ] {
                statics.insert(k.into(), v);
            }
            st.vms.insert(
                r.clone(),
                Vm {
                    uuid: u.clone(),
                    name_label: spec.name.clone(),
                    power_state: Power::Halted,
                    is_a_template: false,
                    is_a_snapshot: false,
                    snapshot_of: NULL.into(),
                    suspend_vdi: NULL.into(),
                    vbds: vec![],
                    vifs: vec![],
                    guest: Some(Guest {
                        pv_drivers: spec.pv_drivers,
                        can_suspend: spec.can_suspend,
                        balloon: spec.balloon,
                    }),
                    memory_static_min: spec.memory / 4,
                    memory_static_max: spec.memory,
                    memory_dynamic_min: spec.memory,
                    memory_dynamic_max: spec.memory,
                    memory_actual: spec.memory,
                    range_changed: None,
                    metrics,
                    domid: -1,
                    resident_on: NULL.into(),
                    last_booted_record: format!("(boot record of {u})"),
                    last_boot_cpu_flags: BTreeMap::from([
                        ("vendor".to_string(), "GenuineIntel".to_string()),
                        ("features".to_string(), "1fcbfbff-f7fa3223".to_string()),
                    ]),
                    other_config: BTreeMap::new(),
                    statics,
                    shutdown_task: None,
                },
            );
            for (i, size) in spec.disks.iter().enumerate() {
                let d = st
                    .new_vdi(&format!("{} disk {i}", spec.name), *size, VdiType::User)
                    .map_err(|e| std::io::Error::other(e.join(" ")))?;
                fill_disk(&st.vdis[&d].file, *size, i as u64 + 7)?;
                if spec.cbt {
                    // sm libs/sm/VDI.py `_create_cbt_log`: an empty log of the disk's size.
                    let u = st.vdis[&d].uuid.clone();
                    st.cbt_logs.insert(
                        u,
                        CbtLog {
                            size: *size,
                            ..Default::default()
                        },
                    );
                    if let Some(v) = st.vdis.get_mut(&d) {
                        v.cbt_enabled = true;
                    }
                }
                let dev = spec.userdevices.get(i).cloned().unwrap_or(i.to_string());
                st.add_vbd(&r, &d, &dev, true);
            }
            for i in 0..spec.nics {
                st.add_vif(&r, &net, &i.to_string(), None, true);
            }
            st.start_domain(&r, &host, Power::Running);
            Ok((r, u))
        })
    }

    /// Not XAPI: the guest of a running VM writes `data` at `offset` of its disk
    /// with this `userdevice` (what a real guest's I/O does through tapdisk, CBT log
    /// included).
    pub fn guest_write(
        &self,
        vm: &str,
        userdevice: &str,
        offset: u64,
        data: &[u8],
    ) -> std::io::Result<()> {
        self.with_state(|st| {
            let vdi = st
                .disks_of(vm)
                .into_iter()
                .find(|(_, dev)| dev == userdevice)
                .map(|(v, _)| v)
                .ok_or_else(|| {
                    std::io::Error::other(format!("VM {vm} has no disk {userdevice}"))
                })?;
            st.write_vdi(&vdi, offset, data)
        })
    }

    /// What xapi's database GC does after a while (xapi/db_gc.ml: completed
    /// tasks after 65 minutes; idle sessions): for a killed client's leftovers.
    pub fn gc_completed_tasks_and_idle_sessions(&self) {
        self.with_state(|st| {
            st.tasks.retain(|_, t| t.status == "pending");
            st.sessions.clear();
        });
    }

    pub fn calls(&self) -> u64 {
        self.state().call_log.len() as u64
    }

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
        let _ = TcpStream::connect(self.addr);
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|p| p.into_inner())
}

fn serve(shared: &Arc<Shared>, conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    let Some((req, body)) = http::read_request(&conn) else {
        return;
    };
    match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/jsonrpc") => jsonrpc(shared, &conn, &req.body),
        ("PUT", "/import_raw_vdi") => import(shared, &conn, &req, body),
        ("GET", "/export_raw_vdi") => export(shared, &conn, &req.query),
        ("POST", "/sim/acpi_power_button") => acpi_power_button(shared, &conn, &req.query),
        ("GET", "/sim/domain") => sim_domain(shared, &conn, &req.query),
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
        // xapi/xapi_vm_lifecycle.ml `check_operation_error`: OTHER_OPERATION_IN_PROGRESS
        // carries ["VM"; ref; the operation(s) in progress; their task ref(s)].
        vec![
            "OTHER_OPERATION_IN_PROGRESS".to_string(),
            "VM".to_string(),
            params.get(1).map(s).unwrap_or_default(),
            "clean_shutdown".to_string(),
            "OpaqueRef:another-client-task".to_string(),
        ]
    } else {
        vec![
            "INTERNAL_ERROR".to_string(),
            format!("injected fault at call {n} ({method} #{occurrence})"),
        ]
    };
    let injected = injected || busy;
    if method == "session.login_with_password" {
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
        st.fire(which, method, occurrence, n);
    }
    if name == "session.logout" {
        st.sessions.remove(&session);
        return Ok(json!(""));
    }
    if name == "event.from" {
        let timeout = args
            .get(2)
            .and_then(Value::as_f64)
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
                .wait_timeout(st, left.min(Duration::from_millis(50)))
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
        if st.vms.get(&vm).map(|v| v.power_state) != Some(Power::Running) {
            return;
        }
        let name = st.vms[&vm].name_label.clone();
        for (vdi, _) in st.disks_of(&vm) {
            let (f, u) = (st.vdis[&vdi].file.clone(), st.vdis[&vdi].uuid.clone());
            let _ = st.write_vdi(&vdi, 8192, format!("clean shutdown of {name}").as_bytes());
            let keep = st.data_dir.join(format!("halted-{u}.img"));
            if sparse_copy(&f, &keep).is_ok() {
                st.halted_images.insert(u, keep);
            }
        }
        if let Some(m) = st.vms.get_mut(&vm) {
            m.shutdown_task = None;
        }
        st.force_state_reset(&vm, Power::Halted);
        if let Some(task) = task {
            finish_task(&mut st, &task, Ok(json!("")));
        }
        drop(st);
        shared.changed.notify_all();
    });
}

/// xenopsd/lib/xenops_server.ml `VM_shutdown_domain`: no acknowledgement
/// within `domain_shutdown_ack_timeout` fails with
/// Failed_to_acknowledge_shutdown_request (xapi/xapi_xenops.ml: VM_FAILED_SHUTDOWN_ACKNOWLEDGMENT
/// [vm]); acknowledged but not halted within the total timeout, Failed_to_shutdown
/// (VM_SHUTDOWN_TIMEOUT [vm; timeout]).
fn shutdown_times_out(shared: &Arc<Shared>, vm: &str, task: &str, acked: bool) {
    let (shared, vm, task) = (shared.clone(), vm.to_string(), task.to_string());
    std::thread::spawn(move || {
        let t = lock(&shared).timeouts;
        std::thread::sleep(if acked {
            t.shutdown_total
        } else {
            t.shutdown_ack
        });
        let mut st = lock(&shared);
        if st.tasks.get(&task).map(|t| t.status.as_str()) != Some("pending") {
            return;
        }
        let e = if acked {
            err(
                "VM_SHUTDOWN_TIMEOUT",
                &[
                    &vm,
                    &format!("{:.1}", t.shutdown_total.as_secs_f64() * 1000.0),
                ],
            )
        } else {
            err("VM_FAILED_SHUTDOWN_ACKNOWLEDGMENT", &[&vm])
        };
        if let Some(m) = st.vms.get_mut(&vm) {
            m.shutdown_task = None;
        }
        finish_task(&mut st, &task, e);
        drop(st);
        shared.changed.notify_all();
    });
}

/// Not XAPI: what `xl trigger DOMID power` does in a host's dom0, for a
/// stand-in `xl` (`POST /sim/acpi_power_button?host=UUID&domid=N`). The
/// press reaches whatever domain has that id on that host.
fn acpi_power_button(shared: &Arc<Shared>, conn: &TcpStream, q: &BTreeMap<String, String>) {
    let domid: i64 = q.get("domid").and_then(|d| d.parse().ok()).unwrap_or(-1);
    let mut st = lock(shared);
    let host = q.get("host").cloned().unwrap_or_default();
    let Some(href) = st
        .hosts
        .iter()
        .find(|(_, h)| h.uuid == host)
        .map(|(k, _)| k.clone())
    else {
        drop(st);
        return http::respond(conn, "400 Bad Request", "text/plain", b"unknown host");
    };
    let vm = st
        .vms
        .iter()
        .find(|(_, v)| v.domid == domid && v.resident_on == href && v.power_state.has_domain())
        .map(|(k, v)| (k.clone(), v.name_label.clone(), v.power_state));
    st.presses.push(Press {
        host: host.clone(),
        domid,
        vm_name: vm.as_ref().map(|v| v.1.clone()),
    });
    drop(st);
    match vm {
        Some((vm, _, Power::Running)) => {
            guest_powers_off(shared, &vm, None);
            http::respond(conn, "200 OK", "text/plain", b"");
        }
        _ => http::respond(
            conn,
            "404 Not Found",
            "text/plain",
            b"no running domain with that id",
        ),
    }
}

/// Not XAPI: what `xl list -l DOMID` tells in a host's dom0 about a domain
/// (its uuid), for the stand-in `xl` (`GET /sim/domain?host=UUID&domid=N`).
fn sim_domain(shared: &Arc<Shared>, conn: &TcpStream, q: &BTreeMap<String, String>) {
    let domid: i64 = q.get("domid").and_then(|d| d.parse().ok()).unwrap_or(-1);
    let host = q.get("host").cloned().unwrap_or_default();
    let st = lock(shared);
    let found = st.vms.values().find(|v| {
        v.domid == domid
            && v.power_state.has_domain()
            && st.hosts.get(&v.resident_on).is_some_and(|h| h.uuid == host)
    });
    let body = match found {
        Some(v) => {
            json!([{"domid": domid, "config": {"c_info": {"uuid": v.uuid, "name": v.name_label}}}])
        }
        None => json!([]),
    };
    drop(st);
    http::respond(
        conn,
        "200 OK",
        "application/json",
        body.to_string().as_bytes(),
    );
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

/// The fields of a VM record `VM.create` takes as given (idl/datamodel_vm.ml:
/// the StaticRO and RW fields); the rest are the simulator's own.
const VM_STATIC_FIELDS: &[&str] = &[
    "name_description",
    "user_version",
    "VCPUs_max",
    "VCPUs_at_startup",
    "VCPUs_params",
    "actions_after_shutdown",
    "actions_after_reboot",
    "actions_after_crash",
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
    "ha_always_run",
    "ha_restart_priority",
    "tags",
    "blocked_operations",
    "affinity",
    "domain_type",
    "NVRAM",
    "actions_after_softreboot",
    "order",
    "start_delay",
    "shutdown_delay",
    "version",
    "generation_id",
    "hardware_platform_version",
    "has_vendor_device",
    "reference_label",
];

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
        "pool.get_all" => Ok(json!([st.pool])),
        "pool.get_record" => st.record("pool", &a0),
        "pool.get_master" => {
            st.record("pool", &a0)?;
            Ok(json!(st.master))
        }
        "host.get_all" => Ok(json!(st.hosts.keys().collect::<Vec<_>>())),
        "host.get_record" => st.record("host", &a0),
        "host.get_uuid" => Ok(json!(
            st.hosts.get(&a0).ok_or_else(|| invalid("host", &a0))?.uuid
        )),
        "host.get_software_version" => Ok(st.record("host", &a0)?["software_version"].clone()),
        "host.compute_free_memory" => {
            st.hosts.get(&a0).ok_or_else(|| invalid("host", &a0))?;
            Ok(json!(st.host_free_memory(&a0)))
        }
        "SR.get_all" => Ok(json!([st.sr])),
        "SR.get_record" => st.record("sr", &a0),
        "SR.get_by_uuid" => {
            if a0 == st.sr_uuid {
                Ok(json!(st.sr))
            } else {
                err("UUID_INVALID", &["SR", &a0])
            }
        }
        "SR.get_by_name_label" => Ok(json!(if a0 == "Local storage" {
            vec![st.sr.clone()]
        } else {
            vec![]
        })),
        "SR.get_VDIs" => Ok(st.record("sr", &a0)?["VDIs"].clone()),
        "VM.get_all" => Ok(json!(st.vms.keys().collect::<Vec<_>>())),
        "VM.get_record" => st.record("vm", &a0),
        "VM.get_uuid" => Ok(json!(st.vm(&a0)?.uuid)),
        "VM.get_power_state" => Ok(json!(st.vm(&a0)?.power_state.as_str())),
        // An Int field: a JSON number (ocaml-rpc jsonrpc `Rpc.Int`).
        "VM.get_domid" => Ok(json!(st.vm(&a0)?.domid)),
        "VM.get_resident_on" => Ok(json!(st.vm(&a0)?.resident_on)),
        "VM.get_metrics" => Ok(json!(st.vm(&a0)?.metrics)),
        "VM_metrics.get_record" => st.record("vm_metrics", &a0),
        "VM_metrics.get_memory_actual" => {
            Ok(st.record("vm_metrics", &a0)?["memory_actual"].clone())
        }
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
        "VM.set_memory_dynamic_range" => {
            // xapi/xapi_vm.ml `set_memory_dynamic_range`: allowed Halted or Running
            // (xapi_vm_lifecycle.ml `changing_dynamic_range`), checked by
            // Vm_memory_constraints (static_min <= min <= max <= static_max).
            st.need_power(&a0, &[Power::Halted, Power::Running])?;
            let (min, max) = (
                a.get(1)
                    .and_then(Value::as_i64)
                    .ok_or_else(|| vec!["FIELD_TYPE_ERROR".to_string(), "min".into()])?,
                a.get(2)
                    .and_then(Value::as_i64)
                    .ok_or_else(|| vec!["FIELD_TYPE_ERROR".to_string(), "max".into()])?,
            );
            let v = st.vm(&a0)?.clone();
            let (min, max) = (min.max(0) as u64, max.max(0) as u64);
            if !(v.memory_static_min <= min && min <= max && max <= v.memory_static_max) {
                return err("MEMORY_CONSTRAINT_VIOLATION", &["Memory limits must satisfy: static_min <= dynamic_min <= dynamic_max <= static_max"]);
            }
            st.settle_balloon(&a0);
            if let Some(m) = st.vms.get_mut(&a0) {
                m.memory_dynamic_min = min;
                m.memory_dynamic_max = max;
                m.range_changed = Some(Instant::now());
            }
            st.ranges_set.push((v.name_label.clone(), min, max));
            st.emit("vm", &a0, "mod");
            void
        }
        "VM.checkpoint" => {
            // xapi/xapi_vm_snapshot.ml `checkpoint`: suspend the VM (memory →
            // a suspend VDI), clone it as a snapshot with Disk_op_checkpoint
            // (xapi/xapi_vm_clone.ml: disks and the suspend VDI snapshotted,
            // the VBDs keep currently_attached as the suspended VM had them),
            // then resume the original.
            st.need_power(&a0, &[Power::Running])?;
            let v = st.vm(&a0)?.clone();
            let guest = v
                .guest
                .ok_or_else(|| vec!["INTERNAL_ERROR".to_string(), "no guest".into()])?;
            if !guest.can_suspend {
                return err("VM_LACKS_FEATURE", &[&a0]);
            }
            st.settle_balloon(&a0);
            let actual = st.vms[&a0].memory_actual;
            // The image holds the memory the domain had (after any balloon).
            let mem = st.new_vdi(
                &format!("Suspend image for {}", v.name_label),
                actual,
                VdiType::Suspend,
            )?;
            let file = st.vdis[&mem].file.clone();
            let _ = write_at(&file, 0, format!("memory of {}", v.uuid).as_bytes());
            if let Some(m) = st.vdis.get_mut(&mem) {
                m.image_of = Some(guest);
                m.is_a_snapshot = true;
            }
            let (snap, su) = new_ref();
            let (metrics, _) = new_ref();
            st.vms.insert(
                snap.clone(),
                Vm {
                    uuid: su,
                    name_label: a1.clone(),
                    power_state: Power::Suspended,
                    is_a_template: true,
                    is_a_snapshot: true,
                    snapshot_of: a0.clone(),
                    suspend_vdi: mem.clone(),
                    vbds: vec![],
                    vifs: vec![],
                    metrics,
                    domid: -1,
                    resident_on: NULL.into(),
                    memory_actual: actual,
                    range_changed: None,
                    shutdown_task: None,
                    other_config: BTreeMap::new(),
                    ..v.clone()
                },
            );
            for (vdi, dev) in st.disks_of(&a0) {
                let c = st.copy_vdi(&vdi, true)?;
                st.add_vbd(&snap, &c, &dev, true);
            }
            for vif in v.vifs.clone() {
                if let Some(x) = st.vifs.get(&vif).cloned() {
                    st.add_vif(&snap, &x.network, &x.device, Some(x.mac), true);
                }
            }
            st.emit("vm", &snap, "add");
            // The original runs on and writes: its disks move past the checkpoint.
            for (vdi, _) in st.disks_of(&a0) {
                let _ = st.write_vdi(&vdi, 4096, b"the original wrote this after the checkpoint");
            }
            Ok(json!(snap))
        }
        "VM.clone" => {
            // xapi/xapi_vm_lifecycle.ml: clone is allowed Halted, and Suspended
            // for a snapshot (or with the pool's allow_clone_suspended_vm).
            st.need_power(&a0, &[Power::Halted, Power::Suspended])?;
            let v = st.vm(&a0)?.clone();
            if v.power_state == Power::Suspended && !v.is_a_snapshot {
                return err("VM_BAD_POWER_STATE", &[&a0, "halted", "suspended"]);
            }
            let (c, cu) = new_ref();
            let (metrics, _) = new_ref();
            let suspend = if v.suspend_vdi != NULL {
                st.copy_vdi(&v.suspend_vdi, false)?
            } else {
                NULL.into()
            };
            st.vms.insert(
                c.clone(),
                Vm {
                    uuid: cu,
                    name_label: a1.clone(),
                    is_a_snapshot: false,
                    snapshot_of: NULL.into(),
                    suspend_vdi: suspend,
                    vbds: vec![],
                    vifs: vec![],
                    metrics,
                    domid: -1,
                    resident_on: NULL.into(),
                    shutdown_task: None,
                    other_config: BTreeMap::new(),
                    ..v.clone()
                },
            );
            for (vdi, dev) in st.disks_of(&a0) {
                let d = st.copy_vdi(&vdi, false)?;
                st.add_vbd(&c, &d, &dev, v.power_state == Power::Suspended);
            }
            for vif in v.vifs.clone() {
                if let Some(x) = st.vifs.get(&vif).cloned() {
                    st.add_vif(
                        &c,
                        &x.network,
                        &x.device,
                        None,
                        v.power_state == Power::Suspended,
                    );
                }
            }
            st.emit("vm", &c, "add");
            // xapi/xapi_vm.ml `clone`: a clone of a snapshot that is not Halted
            // is hard-shut at once (so it loses the suspend VDI: `hard_shutdown`).
            if v.is_a_snapshot && st.vms[&c].power_state != Power::Halted {
                st.hard_shutdown(&c)?;
            }
            Ok(json!(c))
        }
        "VM.create" => vm_create(st, a.first().unwrap_or(&Value::Null)),
        // The generated setter of the RW field name_label (idl/datamodel_vm.ml).
        "VM.set_name_label" => {
            let v = st.vms.get_mut(&a0).ok_or_else(|| invalid("VM", &a0))?;
            v.name_label = a1.clone();
            st.emit("vm", &a0, "mod");
            void
        }
        "VM.set_is_a_template" => {
            st.vm(&a0)?;
            let val = a.get(1).and_then(Value::as_bool).unwrap_or(false);
            if let Some(v) = st.vms.get_mut(&a0) {
                // xapi/xapi_vm_helpers.ml `set_is_a_template`: a snapshot stays a template.
                if v.is_a_snapshot && !val {
                    return err("VM_IS_SNAPSHOT", &[&a0]);
                }
                v.is_a_template = val;
            }
            st.emit("vm", &a0, "mod");
            void
        }
        "VIF.get_record" => st.record("vif", &a0),
        "VIF.create" => {
            // xapi/xapi_vif.ml `create`: currently_attached is kept only for a
            // Suspended VM (its VIFs are plugged at resume).
            let rec = a.first().cloned().unwrap_or(Value::Null);
            let vm = rec.get("VM").map(s).unwrap_or_default();
            let net = rec.get("network").map(s).unwrap_or_default();
            let ps = st.vm(&vm)?.power_state;
            if !st.networks.contains_key(&net) {
                return Err(invalid("network", &net));
            }
            int_arg(&rec, "MTU")?;
            let device = rec.get("device").map(s).unwrap_or_default();
            // xapi/xapi_vif_helpers.ml `create`: the device must be a number
            // (INVALID_DEVICE); an empty MAC is made from the VM's mac_seed and the
            // device (`gen_mac`); the MAC must be valid (MAC_INVALID).
            let Ok(devno) = device.parse::<u32>() else {
                return err("INVALID_DEVICE", &[&device]);
            };
            let attached = ps == Power::Suspended
                && rec
                    .get("currently_attached")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
            let mut mac = rec.get("MAC").map(s).unwrap_or_default();
            if mac.is_empty() {
                if let Some(seed) = st.vm(&vm)?.other_config.get("mac_seed") {
                    mac = gen_mac(devno, seed);
                }
            }
            if !valid_mac(&mac) {
                return err("MAC_INVALID", &[&mac]);
            }
            let mac = Some(mac);
            let net = if st.faults.vif_create_on_uplink {
                st.networks
                    .iter()
                    .find(|(_, n)| !n.pifs.is_empty())
                    .map(|(k, _)| k.clone())
                    .unwrap_or(net)
            } else {
                net
            };
            let r = st.add_vif(&vm, &net, &device, mac, attached);
            st.record_attachments(&vm);
            st.emit("vif", &r, "add");
            Ok(json!(r))
        }
        "VIF.move" => {
            // xapi/xapi_vif.ml `move`: the database first, the device too when active.
            let vm = st
                .vifs
                .get(&a0)
                .map(|v| v.vm.clone())
                .ok_or_else(|| invalid("VIF", &a0))?;
            if !st.networks.contains_key(&a1) {
                return Err(invalid("network", &a1));
            }
            if let Some(v) = st.vifs.get_mut(&a0) {
                v.network = a1.clone();
            }
            st.record_attachments(&vm);
            st.emit("vif", &a0, "mod");
            void
        }
        "VBD.get_record" => st.record("vbd", &a0),
        "VBD.create" => {
            // xapi/xapi_vbd.ml `create`: device and currently_attached are kept
            // only for a Suspended VM; the VDI's type must be one a VBD takes.
            let rec = a.first().cloned().unwrap_or(Value::Null);
            let vm = rec.get("VM").map(s).unwrap_or_default();
            let vdi = rec.get("VDI").map(s).unwrap_or_default();
            let ps = st.vm(&vm)?.power_state;
            // Only a CD may be empty, and a CD is RO; a VBD that is not empty needs a
            // VDI of a type a VBD takes (cbt_metadata is not one).
            let kind = rec.get("type").map(s).unwrap_or_else(|| "Disk".into());
            let empty = rec.get("empty").and_then(Value::as_bool).unwrap_or(false);
            let mode = rec.get("mode").map(s).unwrap_or_else(|| "RW".into());
            if !empty {
                let Some(v) = st.vdis.get(&vdi) else {
                    return Err(invalid("VDI", &vdi));
                };
                if v.kind == VdiType::CbtMetadata {
                    return err("VDI_INCOMPATIBLE_TYPE", &[&vdi, "cbt_metadata"]);
                }
            }
            if kind == "CD" && mode != "RO" {
                return err("VBD_CDS_MUST_BE_READONLY", &[]);
            }
            if kind != "CD" && empty {
                return err("VBD_NOT_REMOVABLE_MEDIA", &["in constructor"]);
            }
            let userdevice = rec.get("userdevice").map(s).unwrap_or_default();
            let attached = ps == Power::Suspended
                && rec
                    .get("currently_attached")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
            let vdi = if empty { NULL.to_string() } else { vdi };
            let r = st.add_vbd(&vm, &vdi, &userdevice, attached);
            if let Some(b) = st.vbds.get_mut(&r) {
                b.device = if ps == Power::Suspended {
                    rec.get("device").map(s).unwrap_or_default()
                } else {
                    String::new()
                };
                b.bootable = rec
                    .get("bootable")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                b.mode = mode;
                b.kind = kind;
                b.empty = empty;
            }
            st.emit("vbd", &r, "add");
            Ok(json!(r))
        }
        "VM.resume" => {
            // xapi/xapi_vm_lifecycle.ml: resume needs Suspended and not a template.
            st.need_power(&a0, &[Power::Suspended])?;
            if st.vm(&a0)?.is_a_template {
                return err("VM_IS_TEMPLATE", &[&a0, "resume"]);
            }
            let paused = a.get(1).and_then(Value::as_bool).unwrap_or(false);
            let v = st.vm(&a0)?.clone();
            let Some(image) = st.vdis.get(&v.suspend_vdi).cloned() else {
                return err("VM_BAD_POWER_STATE", &[&a0, "suspended", "halted"]);
            };
            let Some(guest) = image.image_of else {
                return err("INTERNAL_ERROR", &["the suspend image holds no memory"]);
            };
            // xapi/message_forwarding.ml VM.resume: forward_to_suitable_host
            // (any host of the pool that sees the VM's storage).
            let host = st
                .faults
                .resume_on_host
                .clone()
                .and_then(|h| st.host_by_name(&h))
                .unwrap_or_else(|| st.master.clone());
            // xapi/xapi_vm_helpers.ml `assert_enough_memory_available`: the
            // domain needs its memory free on the host.
            let free = st.host_free_memory(&host);
            if image.virtual_size > free {
                return err(
                    "HOST_NOT_ENOUGH_FREE_MEMORY",
                    &[&image.virtual_size.to_string(), &free.to_string()],
                );
            }
            let checkpoint = image.copied_from.as_ref().and_then(|src| {
                st.vms
                    .values()
                    .find(|m| {
                        m.is_a_snapshot
                            && st.vdis.get(&m.suspend_vdi).is_some_and(|d| &d.uuid == src)
                    })
                    .map(|m| m.name_label.clone())
            });
            st.resumed.push(Resumed {
                vm_name: v.name_label.clone(),
                host: st
                    .hosts
                    .get(&host)
                    .map(|h| h.uuid.clone())
                    .unwrap_or_default(),
                suspend_vdi_uuid: image.uuid.clone(),
                cloned_from_uuid: image.copied_from.clone(),
                cloned_from_checkpoint: checkpoint,
                memory_bytes: image.virtual_size,
            });
            if let Some(m) = st.vms.get_mut(&a0) {
                m.guest = Some(guest);
                m.memory_actual = image.virtual_size;
                m.range_changed = None;
            }
            // Devices the record says are attached are plugged with the domain.
            for b in v.vbds.iter() {
                if let Some(b) = st.vbds.get_mut(b) {
                    b.currently_attached = true;
                }
            }
            for f in v.vifs.iter() {
                if let Some(f) = st.vifs.get_mut(f) {
                    f.currently_attached = true;
                }
            }
            st.start_domain(
                &a0,
                &host,
                if paused {
                    Power::Paused
                } else {
                    Power::Running
                },
            );
            // xapi/xapi_xenops.ml `resume`: the suspend VDI is destroyed once the domain runs from it.
            if let Some(m) = st.vms.get_mut(&a0) {
                m.suspend_vdi = NULL.into();
            }
            let _ = st.destroy_vdi(&v.suspend_vdi);
            void
        }
        "VM.unpause" => {
            st.need_power(&a0, &[Power::Paused])?;
            if let Some(m) = st.vms.get_mut(&a0) {
                m.power_state = Power::Running;
            }
            st.record_attachments(&a0);
            st.emit("vm", &a0, "mod");
            void
        }
        "VM.hard_shutdown" => st.hard_shutdown(&a0).map(|_| json!("")),
        "VM.clean_shutdown" => {
            st.need_power(&a0, &[Power::Running])?;
            let v = st.vm(&a0)?.clone();
            if !v.guest.is_some_and(|g| g.pv_drivers) {
                return err("VM_LACKS_FEATURE", &[&a0]);
            }
            let Some(task) = task else {
                return err("INTERNAL_ERROR", &["clean_shutdown without a task"]);
            };
            if let Some(m) = st.vms.get_mut(&a0) {
                m.shutdown_task = Some(task.to_string());
            }
            if st.faults.guest_ignores_shutdown {
                shutdown_times_out(shared, &a0, task, false);
            } else if st.faults.guest_acks_but_never_halts {
                shutdown_times_out(shared, &a0, task, true);
            } else {
                guest_powers_off(shared, &a0, Some(task.to_string()));
            }
            Ok(Value::Null)
        }
        "VM.destroy" => {
            // xapi/xapi_vm_lifecycle.ml: destroy is allowed Halted or Suspended;
            // xapi/xapi_vm_helpers.ml `destroy`: VBDs and VIFs go, VDIs stay.
            st.need_power(&a0, &[Power::Halted, Power::Suspended])?;
            let v = st.vm(&a0)?.clone();
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
        // xapi/xapi_vm.ml `send_trigger`: not implemented.
        "VM.send_trigger" => err("NOT_IMPLEMENTED", &["VM.send_trigger"]),
        "VDI.get_record" => st.record("vdi", &a0),
        "VDI.get_uuid" => Ok(json!(
            st.vdis.get(&a0).ok_or_else(|| invalid("VDI", &a0))?.uuid
        )),
        "VDI.get_by_uuid" => st
            .vdis
            .iter()
            .find(|(_, v)| v.uuid == a0)
            .map(|(k, _)| json!(k))
            .ok_or_else(|| vec!["UUID_INVALID".into(), "VDI".into(), a0.clone()]),
        "VDI.get_by_name_label" => Ok(json!(st
            .vdis
            .iter()
            .filter(|(_, v)| v.name_label == a0)
            .map(|(k, _)| k)
            .collect::<Vec<_>>())),
        "VDI.create" => {
            // xapi/xapi_vdi.ml `create`: cbt_metadata VDIs cannot be made
            // (VDI_INCOMPATIBLE_TYPE [""; "cbt_metadata"]); the SR must be plugged
            // (`Sm.assert_pbd_is_plugged`); SM makes the volume, its size at least the
            // one asked (the sim's file SR: exactly); other_config, sharable, tags and
            // xenstore_data are set as given. The simulator makes user and suspend VDIs.
            let rec = a.first().cloned().unwrap_or(Value::Null);
            let kind = match rec.get("type").map(s).as_deref() {
                Some("user") => VdiType::User,
                Some("suspend") => VdiType::Suspend,
                Some("cbt_metadata") => return err("VDI_INCOMPATIBLE_TYPE", &["", "cbt_metadata"]),
                Some(other) => {
                    return err(
                        "INTERNAL_ERROR",
                        &[&format!(
                            "the simulator makes user and suspend VDIs, not {other}"
                        )],
                    )
                }
                None => return err("FIELD_TYPE_ERROR", &["type"]),
            };
            let sr = rec.get("SR").map(s).unwrap_or_default();
            if sr != st.sr {
                return Err(invalid("SR", &sr));
            }
            let size = int_arg(&rec, "virtual_size")?
                .ok_or_else(|| vec!["FIELD_TYPE_ERROR".to_string(), "virtual_size".into()])?;
            if size < 0 {
                return err("FIELD_TYPE_ERROR", &["virtual_size"]);
            }
            let name = rec.get("name_label").map(s).unwrap_or_default();
            let r = st.new_vdi(&name, size as u64, kind)?;
            if let Some(v) = st.vdis.get_mut(&r) {
                v.other_config = str_map(rec.get("other_config"));
            }
            st.emit("vdi", &r, "mod");
            Ok(json!(r))
        }
        "VDI.destroy" => st.destroy_vdi(&a0).map(|_| json!("")),
        "VDI.clone" => {
            // xapi/xapi_vdi.ml `check_operation_error`: clone may run with
            // attached VBDs (operation_can_be_performed_live); `clone` →
            // `snapshot_and_clone`.
            st.cbt_allowed(&a0)?;
            st.copy_vdi(&a0, false).map(|r| json!(r))
        }
        "VDI.snapshot" => {
            // xapi/xapi_vdi.ml `check_operation_error`: snapshot may run live, not on
            // a cbt_metadata VDI; `snapshot` → `snapshot_and_clone`.
            st.cbt_allowed(&a0)?;
            st.copy_vdi(&a0, true).map(|r| json!(r))
        }
        "VDI.set_name_label" => {
            let v = st.vdis.get_mut(&a0).ok_or_else(|| invalid("VDI", &a0))?;
            v.name_label = a1.clone();
            st.emit("vdi", &a0, "mod");
            void
        }
        "VDI.add_to_other_config" => {
            let v = st.vdis.get_mut(&a0).ok_or_else(|| invalid("VDI", &a0))?;
            // Generated map setters refuse a key that exists (MAP_DUPLICATE_KEY).
            if v.other_config.contains_key(&a1) {
                return err("MAP_DUPLICATE_KEY", &["VDI", "other_config", &a0, &a1]);
            }
            v.other_config
                .insert(a1.clone(), a.get(2).map(s).unwrap_or_default());
            st.emit("vdi", &a0, "mod");
            void
        }
        "VDI.remove_from_other_config" => {
            let v = st.vdis.get_mut(&a0).ok_or_else(|| invalid("VDI", &a0))?;
            v.other_config.remove(&a1);
            void
        }
        "VDI.enable_cbt" | "VDI.disable_cbt" => {
            // xapi/xapi_vdi.ml `check_operation_error` (enable_cbt | disable_cbt: not on
            // a snapshot, only user or system VDIs) and `change_cbt_status` (a no-op
            // when already so); sm libs/sm/VDI.py `configure_blocktracking`: enabling
            // creates an empty log, disabling deletes it and unlinks it from its parent.
            st.cbt_allowed(&a0)?;
            let v = st.vdis[&a0].clone();
            if v.is_a_snapshot {
                return err(
                    "OPERATION_NOT_ALLOWED",
                    &[&format!("VDI is a snapshot: {a0}")],
                );
            }
            if v.kind != VdiType::User {
                return err("VDI_INCOMPATIBLE_TYPE", &[&a0, v.kind.as_str()]);
            }
            let enable = name == "VDI.enable_cbt";
            if v.cbt_enabled != enable {
                if enable {
                    st.cbt_logs.insert(
                        v.uuid.clone(),
                        CbtLog {
                            size: v.virtual_size,
                            ..Default::default()
                        },
                    );
                } else if let Some(log) = st.cbt_logs.remove(&v.uuid) {
                    if let Some(pl) = log.parent.and_then(|p| st.cbt_logs.get_mut(&p)) {
                        pl.child = None;
                    }
                }
                if let Some(x) = st.vdis.get_mut(&a0) {
                    x.cbt_enabled = enable;
                }
                st.emit("vdi", &a0, "mod");
            }
            void
        }
        "VDI.data_destroy" => {
            // xapi/xapi_vdi.ml `check_operation_error` (data_destroy: a snapshot, with
            // CBT) and `_data_destroy`: a no-op on a cbt_metadata VDI; else it waits
            // (4 s) for the VDI's VBDs to go and answers VDI_IN_USE if any remain
            // (`destroy_and_data_destroy_common`; the simulator does not wait); the type
            // becomes cbt_metadata. sm libs/sm/drivers/FileSR.py `delete(data_only)`:
            // the data file goes, the CBT log stays.
            let v = st
                .vdis
                .get(&a0)
                .cloned()
                .ok_or_else(|| invalid("VDI", &a0))?;
            if !v.is_a_snapshot {
                return err(
                    "OPERATION_NOT_ALLOWED",
                    &[&format!("VDI is not a snapshot: {a0}")],
                );
            }
            if !v.cbt_enabled {
                return err("VDI_NO_CBT_METADATA", &[&a0]);
            }
            if v.kind == VdiType::CbtMetadata {
                return void;
            }
            if !v.vbds.is_empty() {
                return err("VDI_IN_USE", &[&a0, "data_destroy"]);
            }
            let _ = std::fs::remove_file(&v.file);
            if let Some(x) = st.vdis.get_mut(&a0) {
                x.kind = VdiType::CbtMetadata;
                x.other_config.insert(
                    "content_id".into(),
                    "/No content: this is a cbt_metadata VDI/".into(),
                );
            }
            st.emit("vdi", &a0, "mod");
            void
        }
        "VDI.list_changed_blocks" => {
            // xapi/xapi_vdi.ml `check_operation_error`: VDI_IN_USE while vdi_to is
            // attached to a VM that is not a snapshot; `list_changed_blocks` → SM.
            let (Some(from), Some(to)) = (st.vdis.get(&a0), st.vdis.get(&a1)) else {
                let bad = if st.vdis.contains_key(&a0) { &a1 } else { &a0 };
                return Err(invalid("VDI", bad));
            };
            let attached_to_a_vm = to.vbds.iter().filter_map(|b| st.vbds.get(b)).any(|b| {
                b.currently_attached && st.vms.get(&b.vm).is_some_and(|m| !m.is_a_snapshot)
            });
            if attached_to_a_vm {
                return err("VDI_IN_USE", &[&a1, "list_changed_blocks"]);
            }
            let (fu, tu) = (from.uuid.clone(), to.uuid.clone());
            st.cbt_list(&fu, &tu).map(|b| json!(b))
        }
        "network.get_all" => Ok(json!(st.networks.keys().collect::<Vec<_>>())),
        "network.get_record" => st.record("network", &a0),
        "network.get_PIFs" => Ok(json!(
            st.networks
                .get(&a0)
                .ok_or_else(|| invalid("network", &a0))?
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
            // xapi/xapi_network.ml `create`: a network with no PIF is host-internal (bridge xapiN).
            let rec = a.first().cloned().unwrap_or(Value::Null);
            let Some(label) = rec.get("name_label").and_then(Value::as_str) else {
                return err("FIELD_TYPE_ERROR", &["name_label"]);
            };
            int_arg(&rec, "MTU")?;
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
                    other_config: str_map(rec.get("other_config")),
                },
            );
            st.emit("network", &r, "add");
            Ok(json!(r))
        }
        "network.destroy" => {
            if !st.networks.contains_key(&a0) {
                return err("HANDLE_INVALID", &["network", &a0]);
            }
            // xapi/xapi_network.ml `destroy`: refused while VIFs are on it.
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

/// xapi/xapi_vm.ml `create`: a VM is made Halted, or Suspended when the
/// record says so — then suspend_VDI, last_booted_record and
/// last_boot_CPU_flags must all be given, else VM_BAD_POWER_STATE [vm;
/// halted; suspended]. VBDs and VIFs are added by the caller.
fn vm_create(st: &mut State, rec: &Value) -> XResult<Value> {
    let Some(label) = rec.get("name_label").and_then(Value::as_str) else {
        return err("FIELD_TYPE_ERROR", &["name_label"]);
    };
    let ps = match rec.get("power_state").and_then(Value::as_str) {
        None => Power::Halted,
        Some(p) => Power::parse(p)
            .ok_or_else(|| vec!["FIELD_TYPE_ERROR".to_string(), "power_state".into()])?,
    };
    let mut mem = [0u64; 4];
    for (i, k) in [
        "memory_static_min",
        "memory_static_max",
        "memory_dynamic_min",
        "memory_dynamic_max",
    ]
    .iter()
    .enumerate()
    {
        mem[i] = int_arg(rec, k)?
            .ok_or_else(|| vec!["FIELD_TYPE_ERROR".to_string(), k.to_string()])?
            .max(0) as u64;
    }
    for k in ["VCPUs_max", "VCPUs_at_startup", "user_version"] {
        int_arg(rec, k)?;
    }
    let (r, u) = new_ref();
    let suspended = ps == Power::Suspended;
    let suspend_vdi = if suspended {
        rec.get("suspend_VDI").map(s).unwrap_or_else(|| NULL.into())
    } else {
        NULL.into()
    };
    let lbr = if suspended {
        rec.get("last_booted_record").map(s).unwrap_or_default()
    } else {
        String::new()
    };
    let flags = if suspended {
        str_map(rec.get("last_boot_CPU_flags"))
    } else {
        BTreeMap::new()
    };
    if suspended && (flags.is_empty() || lbr.is_empty() || suspend_vdi == NULL) {
        return err("VM_BAD_POWER_STATE", &[&r, "halted", "suspended"]);
    }
    if suspended && !st.vdis.contains_key(&suspend_vdi) {
        return Err(invalid("VDI", &suspend_vdi));
    }
    let mut statics = Map::new();
    for k in VM_STATIC_FIELDS {
        if let Some(v) = rec.get(*k) {
            statics.insert(k.to_string(), v.clone());
        }
    }
    let (metrics, _) = new_ref();
    let image = st.vdis.get(&suspend_vdi).and_then(|v| v.image_of);
    // xapi/xapi_vm.ml `create`: a random mac_seed when other_config has none.
    let mut other_config = str_map(rec.get("other_config"));
    other_config
        .entry("mac_seed".to_string())
        .or_insert_with(uuid);
    st.vms.insert(
        r.clone(),
        Vm {
            uuid: u,
            name_label: label.into(),
            power_state: if suspended {
                Power::Suspended
            } else {
                Power::Halted
            },
            is_a_template: rec
                .get("is_a_template")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            is_a_snapshot: false,
            snapshot_of: NULL.into(),
            suspend_vdi,
            vbds: vec![],
            vifs: vec![],
            guest: image,
            memory_static_min: mem[0],
            memory_static_max: mem[1],
            memory_dynamic_min: mem[2],
            memory_dynamic_max: mem[3],
            memory_actual: 0,
            range_changed: None,
            metrics,
            domid: -1,
            resident_on: NULL.into(),
            last_booted_record: lbr,
            last_boot_cpu_flags: flags,
            other_config,
            statics,
            shutdown_task: None,
        },
    );
    st.emit("vm", &r, "add");
    Ok(json!(r))
}

/// xapi/xapi_event.ml `Token`: "" is (0, 0); else two decimal numbers
/// "%020Ld,%020Ld"; anything else is EVENT_FROM_TOKEN_PARSE_FAILURE [token].
fn parse_token(token: &str) -> XResult<u64> {
    if token.is_empty() {
        return Ok(0);
    }
    let parts: Vec<&str> = token.split(',').collect();
    match parts.as_slice() {
        [a, b] if a.parse::<i64>().is_ok() && b.parse::<i64>().is_ok() => {
            Ok(a.parse::<u64>().unwrap_or(0))
        }
        _ => err("EVENT_FROM_TOKEN_PARSE_FAILURE", &[token]),
    }
}

fn token_of(last: u64) -> String {
    format!("{last:020},{:020}", 0)
}

/// xapi/xapi_event.ml `from`: events after `token` in `classes` ("vm",
/// "vm/<ref>", "*"), each with an Int `id`; token "" (0) returns every current
/// object of those classes as an "add". `None`: nothing yet, deadline not passed.
fn event_from(st: &State, a: &[Value], deadline: Instant) -> XResult<Option<Value>> {
    let classes: Vec<String> = a
        .first()
        .and_then(Value::as_array)
        .map(|c| c.iter().map(|x| s(x).to_ascii_lowercase()).collect())
        .unwrap_or_default();
    let token = a.get(1).map(s).unwrap_or_default();
    let since = parse_token(&token)?;
    let wanted = |class: &str, r: &str| {
        classes
            .iter()
            .any(|c| c == "*" || c == class || c.eq_ignore_ascii_case(&format!("{class}/{r}")))
    };
    let ev = |e: &Event| {
        json!({"id": e.id, "class": e.class, "operation": e.operation,
               "ref": e.reference, "snapshot": e.snapshot, "timestamp": "20260101T00:00:00Z"})
    };
    if since == 0 {
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
            json!({"events": out, "valid_ref_counts": {}, "token": token_of(st.next_event)}),
        ));
    }
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
                   "token": token_of(st.next_event.max(since))})))
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
/// bytes to EOF, no content-length (xapi/export_raw_vdi.ml, as xapi streams it).
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
        // xapi/importexport.ml: a request for a VDI another host serves is
        // answered 302 with an absolute https://<member>/... Location (here
        // http://, the simulator's own address).
        let base = st.url.clone();
        drop(st);
        let query: Vec<String> = q.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let head = format!(
            "HTTP/1.1 302 Found\r\nlocation: {base}/export_raw_vdi?{}&redirected=1\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
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
    if v.kind == VdiType::CbtMetadata {
        // sm libs/sm/drivers/FileSR.py `delete(data_only)`: a cbt_metadata VDI has no
        // data file left to attach and read.
        refuse(&mut st, "cbt_metadata");
        return http::internal_error(conn, &format!("VDI_INCOMPATIBLE_TYPE {vdi} cbt_metadata"));
    }
    if v.vbds.iter().any(|b| {
        st.vbds
            .get(b)
            .and_then(|b| st.vms.get(&b.vm))
            .is_some_and(|m| m.power_state.has_domain())
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
        let n = st.faults.vdi_in_use_after_export;
        if let Some(x) = st.vdis.get_mut(&vdi) {
            x.busy_after_export = n;
        }
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

/// `PUT /import_raw_vdi?session_id=&task_id=&vdi=&format=raw` with a Content-Length:
/// the body's bytes written into the VDI from its first byte, as
/// xapi/import_raw_vdi.ml `localhost_handler` does it: `vdi` is a ref or a uuid
/// (xapi/importexport.ml `vdi_of_req`); `format` defaults to raw
/// (importexport.ml `Format.of_req`), an unknown one fails the task and answers 404;
/// a Transfer-Encoding (HTTP chunked) is refused the same way ("Cannot handle
/// encoding"); the 200 answer (with the task id) is sent *before* the body is read,
/// then vhd-tool copies exactly content-length bytes, and the task completes with
/// the VDI's ref, or fails. A VDI a running domain holds is refused (the RW attach of
/// `Sm_fs_ops.with_block_attached_device`: VDI_IN_USE). More bytes than the VDI holds
/// fail on a write (the FIXME in `localhost_handler`). The simulator takes raw only.
fn import(
    shared: &Arc<Shared>,
    conn: &TcpStream,
    req: &http::Request,
    mut body: std::io::BufReader<TcpStream>,
) {
    let q = &req.query;
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    let (session, task, vdi_arg) = (get("session_id"), get("task_id"), get("vdi"));
    let mut st = lock(shared);
    let (n, occurrence) = st.log_call("import_raw_vdi");
    const M: &str = "import_raw_vdi";
    if st.faults.hold_imports {
        st.fire("hold_imports", M, occurrence, n);
        st.imports_held += 1;
        drop(st);
        shared.changed.notify_all();
        st = lock(shared);
        while st.faults.hold_imports {
            st = shared
                .changed
                .wait_timeout(st, Duration::from_secs(1))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        st.imports_held -= 1;
    }
    // xapi/import_raw_vdi.ml `fail_task_in_request` / `TaskHelper.failed`.
    let fail = |st: &mut State, e: Vec<String>| {
        if st.tasks.contains_key(&task) {
            finish_task(st, &task, Err(e));
        }
    };
    // xapi/xapi_http.ml `assert_credentials_ok`: no valid session, no import.
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
        let msg = format!("injected import fault at call {n} ({M} #{occurrence})");
        fail(&mut st, vec!["INTERNAL_ERROR".into(), msg.clone()]);
        drop(st);
        shared.changed.notify_all();
        return http::internal_error(conn, &msg);
    }
    let format = q.get("format").map(String::as_str).unwrap_or("raw");
    if !["raw", "vhd", "tar", "qcow2"].contains(&format) {
        fail(
            &mut st,
            vec!["INTERNAL_ERROR".into(), format!("Unknown format {format}")],
        );
        drop(st);
        shared.changed.notify_all();
        return http::respond(conn, "404 Not Found", "text/plain", b"");
    }
    if format != "raw" {
        fail(
            &mut st,
            vec![
                "INTERNAL_ERROR".into(),
                "the simulator imports format=raw only".into(),
            ],
        );
        drop(st);
        shared.changed.notify_all();
        return http::respond(
            conn,
            "400 Bad Request",
            "text/plain",
            b"the simulator imports format=raw only",
        );
    }
    if let Some(te) = &req.transfer_encoding {
        fail(
            &mut st,
            vec![
                "INTERNAL_ERROR".into(),
                format!("Cannot handle encoding: {te}"),
            ],
        );
        drop(st);
        shared.changed.notify_all();
        return http::respond(conn, "404 Not Found", "text/plain", b"");
    }
    let vdi = if st.vdis.contains_key(&vdi_arg) {
        Some(vdi_arg.clone())
    } else {
        st.vdis
            .iter()
            .find(|(_, v)| v.uuid == vdi_arg)
            .map(|(k, _)| k.clone())
    };
    let Some(vdi) = vdi else {
        // importexport.ml `vdi_of_req`: Db.VDI.get_by_uuid raises UUID_INVALID; no
        // `vdi` (and no SR) is VDI_MISSING.
        let e = if vdi_arg.is_empty() {
            vec!["VDI_MISSING".to_string()]
        } else {
            vec!["UUID_INVALID".into(), "VDI".into(), vdi_arg.clone()]
        };
        fail(&mut st, e);
        drop(st);
        shared.changed.notify_all();
        return http::respond(conn, "400 Bad Request", "text/plain", b"");
    };
    let v = st.vdis[&vdi].clone();
    let in_use = v.vbds.iter().any(|b| {
        st.vbds
            .get(b)
            .and_then(|b| st.vms.get(&b.vm))
            .is_some_and(|m| m.power_state.has_domain())
    });
    if in_use || v.kind == VdiType::CbtMetadata {
        let e = if in_use {
            vec!["VDI_IN_USE".to_string(), vdi.clone(), "import".into()]
        } else {
            vec![
                "VDI_INCOMPATIBLE_TYPE".into(),
                vdi.clone(),
                "cbt_metadata".into(),
            ]
        };
        fail(&mut st, e);
        drop(st);
        shared.changed.notify_all();
        return http::internal_error(conn, "the VDI cannot be attached for the import");
    }
    let Some(len) = req.content_length else {
        // vhd-tool is given content-length; with neither it nor chunking there is
        // nothing to copy ("Not enough info supplied to import").
        fail(
            &mut st,
            vec![
                "INTERNAL_ERROR".into(),
                "Not enough info supplied to import".into(),
            ],
        );
        drop(st);
        shared.changed.notify_all();
        return http::respond(conn, "400 Bad Request", "text/plain", b"");
    };
    let fail_after = st.faults.fail_import_after;
    if fail_after.is_some() {
        st.fire("fail_import_after", M, occurrence, n);
    }
    drop(st);
    let head = format!(
        "HTTP/1.1 200 OK\r\ntask-id: {task}\r\ncontent-type: application/octet-stream\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    let mut out = conn;
    if out.write_all(head.as_bytes()).is_err() {
        return;
    }
    let result: Result<(), String> = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&v.file)
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; CBT_BLOCK as usize];
        let mut done = 0u64;
        while done < len {
            let want = (len - done).min(buf.len() as u64) as usize;
            if let Some(limit) = fail_after {
                if done + want as u64 > limit {
                    return Err(format!("injected: storage lost after {limit} bytes"));
                }
            }
            let mut got = 0;
            while got < want {
                match body.read(&mut buf[got..want]) {
                    Ok(0) => {
                        return Err(format!(
                            "end of file after {} of {len} bytes",
                            done + got as u64
                        ))
                    }
                    Ok(k) => got += k,
                    Err(e) => return Err(e.to_string()),
                }
            }
            if done + got as u64 > v.virtual_size {
                return Err(format!(
                    "write beyond the end of the VDI ({} bytes)",
                    v.virtual_size
                ));
            }
            // The new VDI reads as zeros (prezeroed, Sm_fs_ops.must_write_zeroes_into_new_vdi):
            // zero blocks are skipped, as vhd-tool skips them.
            if buf[..got].iter().any(|b| *b != 0) {
                f.seek(SeekFrom::Start(done)).map_err(|e| e.to_string())?;
                f.write_all(&buf[..got]).map_err(|e| e.to_string())?;
            }
            done += got as u64;
            if !task.is_empty() {
                let mut st = lock(shared);
                if let Some(t) = st.tasks.get_mut(&task) {
                    t.progress = done as f64 / len.max(1) as f64;
                }
            }
        }
        f.sync_all().map_err(|e| e.to_string())
    })();
    let mut st = lock(shared);
    match result {
        Ok(()) => {
            st.imports_completed += 1;
            if st.tasks.contains_key(&task) {
                finish_task(&mut st, &task, Ok(json!(vdi)));
            }
            st.emit("vdi", &vdi, "mod");
        }
        Err(why) => {
            if st.tasks.contains_key(&task) {
                finish_task(&mut st, &task, err("VDI_IO_ERROR", &[&why]));
            }
        }
    }
    drop(st);
    shared.changed.notify_all();
    let _ = conn.shutdown(std::net::Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_parse_as_xapi_event_token() {
        assert_eq!(parse_token(""), Ok(0));
        assert_eq!(parse_token(&token_of(42)), Ok(42));
        assert_eq!(token_of(7), "00000000000000000007,00000000000000000000");
        for bad in ["42", "x,y", "1,2,3", "abc"] {
            assert_eq!(
                parse_token(bad)
                    .err()
                    .and_then(|e| e.first().cloned())
                    .as_deref(),
                Some("EVENT_FROM_TOKEN_PARSE_FAILURE"),
                "{bad}"
            );
        }
    }
}
