//! The `Hypervisor` seam and its implementations.
//!
//! A backend knows how to checkpoint a running VM, restore a paused clone of
//! it on an isolated network, ask the clone to stop, hand out its stopped
//! disks, and put the original back the way it was. Every resource a backend
//! creates is announced to a [`Journal`] *before* it exists, so that
//! `coldclone recover` can remove it after a crash; [`recover_resource`]
//! sends each [`Resource`] to the undo of the backend that owns its kind.

pub mod agent;
pub mod image_export;
pub mod libvirt;
pub mod qemu;
pub mod secrets;
pub mod shared;
pub mod util;
pub mod xapi;
pub mod xl;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Qemu(#[from] qemu::QemuError),
    #[error(transparent)]
    Xl(#[from] xl::XlError),
    #[error(transparent)]
    Agent(#[from] agent::AgentError),
    #[error("timed out after {seconds}s waiting for {what}")]
    Timeout { what: String, seconds: u64 },
    #[error("the VM's configuration is not supported: {0}")]
    Unsupported(String),
    #[error("`{command}` failed: {stderr}")]
    Tool { command: String, stderr: String },
    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("the clone failed: {0}")]
    Clone(String),
    #[error("checkpoint failed: {0}")]
    Checkpoint(String),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the run journal refused an entry: {0}")]
    Journal(String),
    #[error(transparent)]
    Network(#[from] network_isolation::IsolationError),
    /// Not `#[from]`: that would make the inner error the source too, and `{:#}` print it
    /// twice.
    #[error("XAPI: {0}")]
    Xapi(xapi::XapiError),
}

impl From<xapi::XapiError> for BackendError {
    fn from(e: xapi::XapiError) -> Self {
        BackendError::Xapi(e)
    }
}

pub type Result<T> = std::result::Result<T, BackendError>;

/// What the audit's boot test saw (QEMU runs it today).
pub use qemu::boot::BootTest;

/// What the audit's boot test boots, where, and how long it waits.
#[derive(Debug, Clone, Copy)]
pub struct BootSpec<'a> {
    /// Disk name → raw image, left unmodified (the VM writes into throwaway overlays).
    pub images: &'a std::collections::BTreeMap<String, PathBuf>,
    pub net: &'a CloneNetwork,
    pub name: &'a str,
    pub work_dir: &'a Path,
    /// The console text that says the guest is up.
    pub heartbeat: &'a str,
    pub timeout: Duration,
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BackendError + '_ {
    move |source| BackendError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Every resource a backend may create, with what it takes to remove it:
/// the shared kinds and each backend's own. Untagged: each inner enum carries
/// its `kind`, so the journal's JSON is what it was when they were one enum.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Resource {
    Shared(shared::SharedResource),
    Qemu(qemu::QemuResource),
    Xl(xl::XlResource),
    Xapi(xapi::XapiResource),
    Libvirt(libvirt::LibvirtResource),
}

/// Printed as the inner kind (`File { path: .. }`), as when they were one
/// enum: `recover` and the clean-up's errors show it.
impl std::fmt::Debug for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resource::Shared(r) => r.fmt(f),
            Resource::Qemu(r) => r.fmt(f),
            Resource::Xl(r) => r.fmt(f),
            Resource::Xapi(r) => r.fmt(f),
            Resource::Libvirt(r) => r.fmt(f),
        }
    }
}

macro_rules! resource_from {
    ($($variant:ident($inner:ty)),*) => {$(
        impl From<$inner> for Resource {
            fn from(r: $inner) -> Self {
                Resource::$variant(r)
            }
        }
    )*};
}
resource_from!(
    Shared(shared::SharedResource),
    Qemu(qemu::QemuResource),
    Xl(xl::XlResource),
    Xapi(xapi::XapiResource),
    Libvirt(libvirt::LibvirtResource)
);

/// Write-ahead record of what a run creates.
pub trait Journal {
    /// Records that `resource` is about to be created. Must be durable when it returns.
    fn will_create(&mut self, resource: &Resource) -> Result<u64>;
    /// Records that the resource with this id is gone.
    fn removed(&mut self, id: u64) -> Result<()>;
    /// Records that a pipeline milestone was reached (for progress and fault tests).
    fn milestone(&mut self, name: &str) -> Result<()>;
}

/// How a user names a VM in the config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "backend", rename_all = "snake_case")]
pub enum VmLocator {
    Qemu {
        qmp: PathBuf,
        #[serde(default)]
        options: qemu::QemuOptions,
    },
    /// A domain of the local Xen host, driven with `xl` (coldclone runs in dom0).
    Xl {
        domain: String,
        #[serde(default)]
        options: xl::XlOptions,
    },
    /// A VM of a XenServer / XCP-ng pool, driven through XAPI.
    Xapi {
        /// The pool master, `https://host`.
        url: String,
        /// Name label or uuid.
        vm: String,
        /// `username = ...` / `password = ...`; else $COLDCLONE_XAPI_USERNAME/_PASSWORD.
        credentials_file: Option<PathBuf>,
        #[serde(default)]
        options: xapi::XapiOptions,
    },
    /// A domain of a libvirt QEMU/KVM host, driven with `virsh`.
    Libvirt {
        /// Name or UUID (`virsh list`).
        domain: String,
        /// The connection; `qemu:///system` when unset.
        uri: Option<String>,
        #[serde(default)]
        options: libvirt::LibvirtOptions,
    },
}

/// Memory free for clones on a pool of hosts (XAPI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRoom {
    /// Names the pool (its master's URL): clones of one pool share its room.
    pub pool: String,
    /// The most a clone can get on one host of the pool now.
    pub free_bytes: u64,
}

/// What a backend learned about a running VM.
#[derive(Debug, Clone, Serialize)]
pub struct VmInfo {
    pub name: String,
    pub backend: &'static str,
    pub running: bool,
    pub memory_bytes: u64,
    pub disks: Vec<DiskInfo>,
    pub nics: usize,
    /// The backend's own knowledge of the VM (e.g. `qemu::QemuVm`).
    #[serde(skip)]
    pub detail: Opaque,
}

/// A backend's own part of a shared value (a VM, a checkpoint): the pipeline
/// carries it, and only the backend that made it reads it back.
#[derive(Clone, Default)]
pub struct Opaque(Option<std::sync::Arc<dyn std::any::Any + Send + Sync>>);

impl Opaque {
    pub fn new<T: std::any::Any + Send + Sync>(state: T) -> Self {
        Opaque(Some(std::sync::Arc::new(state)))
    }
    /// The state, if it is a `T` (`None`: another backend's, or none).
    pub fn get<T: std::any::Any>(&self) -> Option<&T> {
        self.0.as_deref().and_then(|s| s.downcast_ref())
    }
}

impl std::fmt::Debug for Opaque {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Opaque(..)")
    }
}

/// `vm`'s state as the backend named `backend` made it.
pub(crate) fn vm_state<'a, T: std::any::Any>(vm: &'a VmInfo, backend: &str) -> Result<&'a T> {
    vm.detail.get().ok_or_else(|| {
        BackendError::Unsupported(format!(
            "the {backend} backend was handed another backend's VM"
        ))
    })
}

/// A clone's state as the backend named `backend` made it.
pub(crate) fn clone_state<'a, T: std::any::Any>(
    detail: &'a mut OpaqueMut,
    backend: &str,
) -> Result<&'a mut T> {
    detail.get_mut().ok_or_else(|| {
        BackendError::Unsupported(format!(
            "the {backend} backend was handed another backend's clone"
        ))
    })
}

/// The same for a value the backend changes as it goes (a clone).
#[derive(Default)]
pub struct OpaqueMut(Option<Box<dyn std::any::Any + Send>>);

impl OpaqueMut {
    pub fn new<T: std::any::Any + Send>(state: T) -> Self {
        OpaqueMut(Some(Box::new(state)))
    }
    pub fn get<T: std::any::Any>(&self) -> Option<&T> {
        self.0.as_deref().and_then(|s| s.downcast_ref())
    }
    pub fn get_mut<T: std::any::Any>(&mut self) -> Option<&mut T> {
        self.0.as_deref_mut().and_then(|s| s.downcast_mut())
    }
}

impl std::fmt::Debug for OpaqueMut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpaqueMut(..)")
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DiskInfo {
    pub name: String,
    pub file: PathBuf,
    pub format: String,
    pub read_only: bool,
    pub bytes: u64,
}

/// The original's pause during a checkpoint, split into its parts.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PauseTimes {
    pub total_ms: f64,
    pub disk_snapshot_ms: f64,
    pub memory_ms: f64,
}

#[derive(Debug, Clone, Default)]
pub struct Checkpoint {
    pub method: &'static str,
    pub memory_image: PathBuf,
    pub memory_image_bytes: u64,
    pub pause: PauseTimes,
    pub disks: Vec<FrozenDisk>,
    /// Things the user should know about the original after the checkpoint
    /// (e.g. xl's monitor process ended); the report lists them.
    pub warnings: Vec<String>,
    /// The guest's memory when it was saved (after any balloon), where the
    /// backend needs it to size the clone.
    pub guest_memory_bytes: Option<u64>,
    /// The backend's own record of what the checkpoint made (QEMU: the
    /// original's overlays; XAPI: the checkpoint VM).
    pub detail: Opaque,
    /// Changed-block tracking, per disk name; empty where the backend has none.
    pub change_maps: BTreeMap<String, DiskChangeMaps>,
}

/// A byte range of a disk.
pub type ChangedRange = std::ops::Range<u64>;

/// What changed-block tracking knows of one disk at a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct DiskChangeMaps {
    /// The map this checkpoint started: the snapshot names it, so that the next run can
    /// ask for the changes since (`qemu-bitmap:coldclone-<run>`).
    pub started: String,
    /// The original's writes since each earlier map still held, by the name the
    /// snapshot of that run recorded. A map missing here means a full read.
    pub since: BTreeMap<String, Vec<ChangedRange>>,
    /// Why an earlier map is not among `since` (kept snapshot gone, origin replaced, a
    /// tool failed), for the report of a whole read.
    pub notes: Vec<String>,
}

/// A disk as it was at the checkpoint.
#[derive(Debug, Clone)]
pub struct FrozenDisk {
    pub name: String,
    pub frozen_file: PathBuf,
    pub format: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopMethod {
    /// PV shutdown request through the hypervisor's control channel.
    Pv,
    /// ACPI power button.
    Acpi,
}

/// Where the clone's NICs go.
#[derive(Debug, Clone)]
pub struct CloneNetwork {
    pub namespace: network_isolation::Namespace,
    pub bridge: String,
    pub tap_prefix: String,
    /// The hypervisor's own handle of the network where it made it (XAPI:
    /// the network's ref); `None` for a Linux bridge.
    pub handle: Option<String>,
}

/// A restored clone: running its memory image but paused.
#[derive(Debug)]
pub struct PausedClone {
    pub name: String,
    pub taps: Vec<String>,
    pub disks: Vec<CloneDisk>,
    pub console_log: PathBuf,
    /// The backend's own state of the clone (process, connection, refs).
    pub detail: OpaqueMut,
}

#[derive(Debug, Clone)]
pub struct CloneDisk {
    pub name: String,
    pub overlay: PathBuf,
    pub bytes: u64,
}

/// How the archive reads a stopped clone disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskAccess {
    /// Copied out with [`Hypervisor::export_disk`] first (a stream over HTTP, or a
    /// device the export only links to).
    Export,
    /// An image file that the archive serves read-only where it lies
    /// ([`image_export`]): no copy in the state folder.
    Image {
        path: PathBuf,
        format: image_export::ImageFormat,
    },
    /// A stream of the disk's raw bytes, first to last ([`Hypervisor::open_disk_stream`]),
    /// read straight into the repository: nothing is written under the state folder.
    Stream,
}

/// A stopped clone disk as a stream of its raw bytes, first to last. The reader checks
/// what it can (XAPI: the length and the export's task) and fails a read otherwise;
/// reading it to its end (0) is what confirms the whole disk came.
pub struct DiskStream {
    pub len: u64,
    pub reader: Box<dyn std::io::Read + Send>,
}

/// What kind of VM definition a backend keeps with a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmDefinitionKind {
    /// `{"program": ..., "cwd": ..., "argv": [...]}`: the original's QEMU command line,
    /// options as coldclone parsed them (`-readconfig` inlined), secrets removed.
    QemuCommandLine,
    /// libxl's domain configuration as `xl list -l` gives it (JSON), passwords removed.
    XlJson,
    /// The VM's XAPI record (JSON).
    XapiVmRecord,
    /// The domain's libvirt XML.
    LibvirtXml,
}

impl VmDefinitionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VmDefinitionKind::QemuCommandLine => "qemu-command-line",
            VmDefinitionKind::XlJson => "xl-json",
            VmDefinitionKind::XapiVmRecord => "xapi-vm-record",
            VmDefinitionKind::LibvirtXml => "libvirt-xml",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        [
            VmDefinitionKind::QemuCommandLine,
            VmDefinitionKind::XlJson,
            VmDefinitionKind::XapiVmRecord,
            VmDefinitionKind::LibvirtXml,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// A VM's definition, kept with its backup so that a lost VM can be made again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDefinition {
    pub kind: VmDefinitionKind,
    pub text: String,
}

/// How the clone ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CloneOutcome {
    /// It shut itself down after the request: its disks are clean.
    StoppedByGuest,
    /// It ignored the request, then shut itself down when its guest agent was
    /// asked (`guest-shutdown`): its disks are clean too.
    StoppedByGuestAgent,
    /// It did not stop in time and was killed.
    Killed,
}

/// The original's disks at an instant when its file systems were frozen through its
/// guest agent (`on_clone_failure = "quiesced"`), ready for the archive.
#[derive(Debug)]
pub struct QuiescedSnapshot {
    /// Each disk, named as in the checkpoint, and how the archive reads it.
    pub disks: Vec<(CloneDisk, DiskAccess)>,
    /// The file systems the agent reported frozen.
    pub frozen_filesystems: u64,
    /// From the freeze's reply to the thaw's.
    pub frozen_ms: f64,
}

pub trait Hypervisor {
    fn name(&self) -> &'static str;
    fn inspect(&self, vm: &VmLocator) -> Result<VmInfo>;
    /// Memory + disks at one instant; every path out of here leaves the original running.
    fn checkpoint(
        &self,
        vm: &VmInfo,
        work_dir: &Path,
        journal: &mut dyn Journal,
    ) -> Result<Checkpoint>;
    /// A paused clone with disks = writable overlays over the checkpoint and
    /// every NIC on `net`'s bridge.
    fn restore_clone(
        &self,
        vm: &VmInfo,
        checkpoint: &Checkpoint,
        net: &CloneNetwork,
        clone_name: &str,
        work_dir: &Path,
        journal: &mut dyn Journal,
    ) -> Result<PausedClone>;
    /// Unpauses the clone. Needs proof that its network was verified.
    fn resume_clone(
        &self,
        clone: &mut PausedClone,
        verified: &network_isolation::Verified,
    ) -> Result<()>;
    fn request_stop(&self, clone: &mut PausedClone, method: StopMethod) -> Result<()>;
    fn wait_stopped(&self, clone: &mut PausedClone, timeout: Duration) -> Result<CloneOutcome>;
    fn destroy_clone(&self, clone: &mut PausedClone, journal: &mut dyn Journal) -> Result<()>;
    /// Writes a stopped clone disk as a sparse raw image at `dest`.
    fn export_disk(&self, clone: &PausedClone, disk: &CloneDisk, dest: &Path) -> Result<()>;
    /// Every range the clone itself wrote to `disk` (while it shut down); `None` when the
    /// backend cannot tell, which rules out an incremental read from a map.
    /// `journal`: for what finding out holds for a moment (xl: a thin pool's metadata
    /// snapshot).
    fn clone_writes(
        &self,
        _clone: &PausedClone,
        _disk: &CloneDisk,
        _journal: &mut dyn Journal,
    ) -> Result<Option<Vec<ChangedRange>>> {
        Ok(None)
    }
    /// After the archive step: `stored` when every disk is in the repository, so the maps
    /// this checkpoint started are the next run's and the earlier ones can go; otherwise
    /// the run's clean-up removes the started ones (they are journaled).
    fn settle_change_maps(
        &self,
        _vm: &VmInfo,
        _checkpoint: &Checkpoint,
        _stored: bool,
        _journal: &mut dyn Journal,
    ) -> Result<()> {
        Ok(())
    }
    /// Opens a stopped clone disk as a stream, for [`DiskAccess::Stream`]; each call is a
    /// new stream from the first byte.
    fn open_disk_stream(&self, _clone: &PausedClone, _disk: &CloneDisk) -> Result<DiskStream> {
        Err(BackendError::Unsupported(format!(
            "the {} backend exports disks to files, not as streams",
            self.name()
        )))
    }
    /// How the archive reads a stopped clone disk; [`DiskAccess::Export`] unless the
    /// backend's clone disks are image files the archive can serve in place.
    fn disk_access(&self, _clone: &PausedClone, _disk: &CloneDisk) -> DiskAccess {
        DiskAccess::Export
    }
    /// The VM's definition (secrets removed) to keep with its backup; `None` where the
    /// backend keeps none.
    fn vm_definition(&self, _vm: &VmInfo) -> Result<Option<VmDefinition>> {
        Ok(None)
    }
    /// Puts the original's disks back to one image each, and removes the
    /// checkpoint's files.
    fn release_checkpoint(
        &self,
        vm: &VmInfo,
        checkpoint: &Checkpoint,
        journal: &mut dyn Journal,
    ) -> Result<()>;
    fn stop_methods(&self, vm: &VmInfo) -> StopMethod;
    /// Whether [`Hypervisor::quiesced_snapshot`] can work for this VM (it has a guest
    /// agent channel coldclone may use); checked before anything is paused.
    fn check_quiesce(&self, _vm: &VmInfo) -> Result<()> {
        Err(BackendError::Unsupported(format!(
            "on_clone_failure = \"quiesced\" is not available for {} VMs",
            self.name()
        )))
    }
    /// After a clone that could not be stopped cleanly: a disk-only snapshot of the
    /// running original, its file systems frozen through its own guest agent for the
    /// snapshot only (the freeze bounded by `freeze_timeout`, a thaw on every path,
    /// the frozen state journaled first). The snapshot's overlays are journaled and
    /// merged back by the clean-up like the checkpoint's.
    fn quiesced_snapshot(
        &self,
        _vm: &VmInfo,
        _checkpoint: &Checkpoint,
        _work_dir: &Path,
        _freeze_timeout: Duration,
        _journal: &mut dyn Journal,
    ) -> Result<QuiescedSnapshot> {
        Err(BackendError::Unsupported(format!(
            "quiesced snapshots are not available for {} VMs",
            self.name()
        )))
    }
    /// Whether the clone runs on this machine and takes its memory here (the
    /// scheduler's memory budget); XAPI clones run on the pool's host.
    fn clone_uses_local_memory(&self) -> bool {
        true
    }
    /// Makes the clone's isolated network when the hypervisor owns it (XAPI:
    /// a network with no PIF), journaled. `None`: the pipeline makes a Linux
    /// bridge (QEMU, xl).
    fn isolated_network(
        &self,
        _vm: &VmInfo,
        _run_id: &str,
        _journal: &mut dyn Journal,
    ) -> Result<Option<CloneNetwork>> {
        Ok(None)
    }
    /// Checks the paused clone's isolation when the hypervisor owns the
    /// network. `None`: the pipeline checks its bridge with `network_isolation::verify`.
    fn verify_isolation(
        &self,
        _clone: &mut PausedClone,
    ) -> Result<Option<network_isolation::Verified>> {
        Ok(None)
    }
    /// The guest's current memory (after ballooning), if the backend can tell.
    fn memory_actual(&self, _vm: &VmInfo) -> Result<Option<u64>> {
        Ok(None)
    }
    /// Writes a disk as it was at the checkpoint (crash-consistent: the
    /// running original's disk at that instant) as a sparse raw image.
    fn export_frozen_disk(&self, _disk: &FrozenDisk, _dest: &Path) -> Result<()> {
        Err(BackendError::Unsupported(format!(
            "crash-consistent copies are not available for {} VMs",
            self.name()
        )))
    }
    /// Memory free for clones when it is not the memory of the host coldclone
    /// runs on (Xen: the hypervisor's free memory, not dom0's). `None`: the host's.
    fn free_memory_for_clones(&self) -> Result<Option<u64>> {
        Ok(None)
    }
    /// Where the clone takes its memory when not on this machine (XAPI: the
    /// pool), and how much is free there now. `None`: this machine's memory.
    fn clone_memory_pool(&self, _vm: &VmInfo) -> Result<Option<PoolRoom>> {
        Ok(None)
    }
    /// Whether [`Hypervisor::balloon`] can work for this VM (for `doctor`).
    fn balloon_supported(&self, _vm: &VmInfo) -> bool {
        false
    }
    /// Whether [`Hypervisor::boot_test`] can boot this backend's VMs.
    fn can_boot_test(&self) -> bool {
        false
    }
    /// The audit's boot test: boots the spec's images fresh with `vm`'s
    /// devices until its heartbeat shows on the console; everything it makes
    /// is journaled and destroyed after.
    fn boot_test(
        &self,
        _vm: &VmInfo,
        _spec: &BootSpec,
        _journal: &mut dyn Journal,
    ) -> Result<BootTest> {
        Err(BackendError::Unsupported(format!(
            "boot tests are not available for {} VMs",
            self.name()
        )))
    }
    /// Asks the guest to balloon to `target_bytes`; journals how to undo it. Does not wait.
    fn balloon(&self, _vm: &VmInfo, _target_bytes: u64, _journal: &mut dyn Journal) -> Result<u64> {
        Err(BackendError::Unsupported(format!(
            "ballooning is not available for {} VMs",
            self.name()
        )))
    }
}

/// What `recover` may touch: a journal is read back from disk, so every path in it must
/// lie in the run folders of this state folder (`STATE_DIR/runs/...`).
#[derive(Debug, Clone)]
pub struct RecoverScope {
    pub state_dir: std::path::PathBuf,
}

/// Undoes any resource, whichever backend created it (used by `recover`):
/// the one dispatcher; each backend undoes only its own kinds.
pub fn recover_resource(resource: &Resource, scope: &RecoverScope) -> Result<()> {
    match resource {
        Resource::Shared(r) => r.undo(scope),
        Resource::Qemu(r) => qemu::recover(r),
        Resource::Xl(r) => xl::recover(r),
        Resource::Xapi(r) => xapi::recover(r),
        Resource::Libvirt(r) => libvirt::recover(r),
    }
}

/// The backend for a locator.
pub fn backend_for(locator: &VmLocator) -> Box<dyn Hypervisor> {
    match locator {
        VmLocator::Qemu { options, .. } => Box::new(qemu::QemuBackend::with_options(options)),
        VmLocator::Xl { options, .. } => Box::new(xl::XlBackend::with_options(options.clone())),
        VmLocator::Xapi { options, .. } => {
            Box::new(xapi::XapiBackend::with_options(options.clone()))
        }
        VmLocator::Libvirt { options, .. } => {
            Box::new(libvirt::LibvirtBackend::with_options(options))
        }
    }
}
