//! coldclone's repository: deduplicated, compressed, encrypted storage for disk images.
//!
//! A disk is cut into offset-aligned fixed-size chunks; each chunk is identified by a keyed
//! BLAKE3 hash of its content, compressed with zstd, sealed with XChaCha20-Poly1305 and
//! stored once in a pack file. A snapshot lists the chunk ids of one disk (through "map"
//! blobs). The on-disk format is specified in docs/format.md.
//!
//! ```no_run
//! use coldclone_repository::*;
//! # fn main() -> Result<(), RepoError> {
//! let loc = Location::parse("/srv/coldclone")?;
//! let repo = Repository::open(&loc, "password from a file or the environment")?;
//! let disk = FileSource::open(std::path::Path::new("/dev/vg0/web1-snap")).map_err(|e| {
//!     RepoError::Source { offset: 0, source: e }
//! })?;
//! let parent = repo.find_latest("web1", "xvda")?.map(|s| s.id);
//! let meta = SnapshotMeta { vm: "web1".into(), disk: "xvda".into(), ..Default::default() };
//! let opts = BackupOptions { parent, changed_ranges: None };
//! let summary = repo.backup_disk(&disk, meta, &opts, &NoProgress)?;
//! repo.restore(&summary.snapshot_id, std::path::Path::new("/tmp/web1.img"), &NoProgress)?;
//! # Ok(()) }
//! ```

// `is_multiple_of` needs Rust 1.87; the workspace supports 1.80.
#![allow(clippy::manual_is_multiple_of)]

mod backend;
mod backup;
mod check;
mod compare;
mod crypto;
mod error;
mod host;
mod lock;
mod pack;
mod prune;
mod reader;
mod restore;
mod source;
mod util;

#[doc(hidden)]
pub use backend::s3::{
    set_s3_list_page_size_for_tests, set_s3_multipart_threshold, set_s3_timeout_for_tests,
    DEFAULT_MULTIPART_THRESHOLD,
};
pub use check::{CheckReport, DamagedSnapshot, RepairReport};
pub use compare::CompareReport;
pub use crypto::KdfParams;
pub use error::RepoError;
pub use host::{is_uuid, HostIdentity, HOST_UUID_FILE};
#[doc(hidden)]
pub use lock::set_lock_timings_for_tests;
#[doc(hidden)]
pub use prune::set_prune_grace_for_tests;
pub use prune::{Keep, PruneReport, RetentionPolicy, SnapshotRef};
pub use reader::SnapshotReader;
pub use restore::RestoreOptions;
pub use source::{seek_data_ranges, DiskSource, FileSource, MemSource, NoProgress, Progress};
pub use util::set_clock_offset_for_tests;

use backend::Backend;
use crypto::{Id, MasterKey};
use error::Result;
use pack::{Index, INDEX_KIND};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use util::{id_from_hex, to_hex};

/// Where a repository lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Location {
    /// A local folder (or any mounted file system).
    Local(PathBuf),
    /// An S3-compatible bucket; objects go under `prefix/`.
    S3 {
        /// e.g. `https://s3.eu-west-1.amazonaws.com` or `http://127.0.0.1:9000`
        endpoint: String,
        bucket: String,
        prefix: String,
        region: String,
        access_key: String,
        secret_key: String,
    },
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(p) => write!(f, "{}", p.display()),
            Location::S3 {
                endpoint,
                bucket,
                prefix,
                ..
            } => write!(
                f,
                "s3:{}/{}/{}",
                endpoint.trim_end_matches('/'),
                bucket,
                prefix
            ),
        }
    }
}

impl Location {
    /// Parse a repository location: a path, or `s3:<endpoint>/<bucket>[/<prefix>]`
    /// (e.g. `s3:http://127.0.0.1:9000/backups/fleet`). S3 credentials and region come from
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_REGION` (or
    /// `AWS_DEFAULT_REGION`; default `us-east-1`); callers may overwrite the fields after.
    pub fn parse(s: &str) -> Result<Location> {
        let Some(rest) = s.strip_prefix("s3:") else {
            if s.is_empty() {
                return Err(RepoError::InvalidArgument(
                    "empty repository location".into(),
                ));
            }
            return Ok(Location::Local(PathBuf::from(s)));
        };
        let (scheme, after) = rest.split_once("://").ok_or_else(|| {
            RepoError::InvalidArgument(format!(
                "S3 location {s:?} must look like s3:https://host[:port]/bucket[/prefix]"
            ))
        })?;
        let mut parts = after.splitn(3, '/');
        let host = parts.next().unwrap_or_default();
        let bucket = parts.next().unwrap_or_default();
        let prefix = parts.next().unwrap_or_default().trim_matches('/');
        if host.is_empty() || bucket.is_empty() {
            return Err(RepoError::InvalidArgument(format!(
                "S3 location {s:?} needs a host and a bucket: s3:https://host[:port]/bucket[/prefix]"
            )));
        }
        let env = |k: &str| std::env::var(k).unwrap_or_default();
        let region = [env("AWS_REGION"), env("AWS_DEFAULT_REGION")]
            .into_iter()
            .find(|r| !r.is_empty())
            .unwrap_or_else(|| "us-east-1".into());
        Ok(Location::S3 {
            endpoint: format!("{scheme}://{host}"),
            bucket: bucket.into(),
            prefix: prefix.into(),
            region,
            access_key: env("AWS_ACCESS_KEY_ID"),
            secret_key: env("AWS_SECRET_ACCESS_KEY"),
        })
    }
}

/// Options fixed when a repository is created.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// Chunk size in bytes: a power of two from 4 KiB to 4 MiB.
    pub chunk_size: u32,
    /// Target pack size in bytes.
    pub pack_size: u32,
    /// zstd level for chunks.
    pub compression_level: i32,
    /// Password key derivation cost.
    pub kdf: KdfParams,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            pack_size: 16 << 20,
            compression_level: 1,
            kdf: KdfParams::default(),
        }
    }
}

const MIN_PACK_SIZE: u32 = 1 << 20;
const MAX_PACK_SIZE: u32 = 1 << 30;

/// Default chunk size (chosen by measurement, see docs/performance.md).
pub const DEFAULT_CHUNK_SIZE: u32 = 16 << 10;

/// The shortest snapshot id prefix accepted.
pub const MIN_ID_PREFIX: usize = 4;

/// Number of chunk ids per map blob.
pub(crate) const MAP_ENTRIES: usize = 8192;

/// The repository's `config` object (plaintext JSON; from format 2 on authenticated by
/// `mac`, see docs/format.md).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RepoConfig {
    pub format: String,
    pub version: u32,
    pub id: String,
    pub chunk_size: u32,
    pub pack_size: u32,
    pub compression_level: i32,
    /// Format 2: keyed BLAKE3 (a key derived from the master key) of this object's JSON
    /// without `mac`, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl RepoConfig {
    /// The bytes the MAC covers: the JSON of every field but `mac`.
    fn mac_body(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(&RepoConfig {
            mac: None,
            ..self.clone()
        })
        .map_err(|e| RepoError::InvalidArgument(e.to_string()))
    }
}

const FORMAT_NAME: &str = "coldclone-repository";
/// The format new repositories get. 2: `config` authenticated, index and snapshot files
/// bound to their names. Format 1 repositories are read and written as format 1.
const FORMAT_VERSION: u32 = 2;
/// The oldest format this code reads.
const OLDEST_FORMAT_VERSION: u32 = 1;
const SNAPSHOT_KIND: &str = "snapshot";

/// What describes the disk being backed up.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub vm: String,
    pub disk: String,
    pub backend: String,
    pub host: String,
    /// The host's uuid (`HostIdentity::uuid`, from its state folder); empty: the host is
    /// known by its name alone.
    #[serde(default)]
    pub host_uuid: String,
    /// `clean-shutdown` or `crash`.
    pub consistency: String,
    pub tags: BTreeMap<String, String>,
    /// The VM's definition when it was backed up, so that a lost VM can be made again.
    pub vm_config: Option<VmConfig>,
}

/// A VM's definition as its backend derived it, secrets removed; stored sealed with each
/// disk's snapshot.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VmConfig {
    /// What `text` is: `qemu-argv` (a JSON array), `xl-config`, `xapi-vm-record` (JSON),
    /// `libvirt-xml`.
    pub kind: String,
    pub text: String,
}

/// Options of one backup.
#[derive(Clone, Debug, Default)]
pub struct BackupOptions {
    /// Snapshot id (or unique prefix) of the previous backup of this disk.
    pub parent: Option<String>,
    /// Ranges changed since `parent`, from a changed-block map; `None` = unknown. With a
    /// parent and these ranges, chunks that do not touch them are not read at all.
    pub changed_ranges: Option<Vec<Range<u64>>>,
}

/// What a backup did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackupSummary {
    pub snapshot_id: String,
    /// Disk size.
    pub bytes: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes added to the repository (packs, index, snapshot).
    pub stored_bytes: u64,
    /// Chunks newly stored.
    pub new_chunks: u64,
    /// Chunks that were all zero or in holes.
    pub zero_chunks: u64,
    /// Chunks taken from the parent without reading them.
    pub reused_unread_chunks: u64,
    pub duration: Duration,
}

/// What a restore did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestoreSummary {
    pub snapshot_id: String,
    pub target: PathBuf,
    /// Disk size.
    pub bytes: u64,
    /// Bytes written to the target (zero regions of files are left as holes).
    pub bytes_written: u64,
    pub duration: Duration,
}

/// One backup of one disk.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Snapshot {
    /// Hex id (64 characters); the first 8 are enough to name it in commands.
    #[serde(default)]
    pub id: String,
    /// UTC, RFC 3339.
    pub time: String,
    pub time_unix: i64,
    pub vm: String,
    pub disk: String,
    pub backend: String,
    pub host: String,
    /// The uuid of the host that made it (absent in snapshots written before host uuids).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host_uuid: String,
    pub consistency: String,
    pub tags: BTreeMap<String, String>,
    /// The VM's definition at the backup (absent in snapshots written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_config: Option<VmConfig>,
    /// Disk size in bytes.
    pub size: u64,
    pub chunk_size: u32,
    pub parent: Option<String>,
    pub bytes_read: u64,
    pub stored_bytes: u64,
    /// Position among the snapshots of the same host, VM and disk: 1 + the highest before
    /// it. "Latest" and retention go by it, not by `time_unix`, which follows the wall clock
    /// (and so may go backwards). 0 for snapshots written before it existed; they come
    /// before every numbered one, in time order. Stored, but left out of the JSON of
    /// reports.
    #[serde(skip_serializing, default)]
    pub seq: u64,
    /// Ids of the map blobs listing the chunk ids, `MAP_ENTRIES` per blob. Stored, but left
    /// out of the JSON of reports (it grows with the disk).
    #[serde(skip_serializing, default)]
    pub map: Vec<String>,
}

/// A snapshot as stored: the report fields plus the map.
#[derive(Serialize)]
struct StoredSnapshot<'a> {
    #[serde(flatten)]
    snap: &'a Snapshot,
    #[serde(skip_serializing_if = "is_zero_u64")]
    seq: u64,
    map: &'a [String],
}

fn is_zero_u64(x: &u64) -> bool {
    *x == 0
}

impl Snapshot {
    pub fn short_id(&self) -> &str {
        self.id.get(..8).unwrap_or(&self.id)
    }

    /// The key that orders the snapshots of one host, VM and disk, oldest first.
    pub(crate) fn order_key(&self) -> (u64, i64, &str) {
        (self.seq, self.time_unix, &self.id)
    }

    /// Whether this snapshot was made by the host `name`/`uuid`: by uuid when both have
    /// one (a renamed host is still itself, two hosts of one name are not one), by name
    /// when either has none (snapshots written before host uuids).
    pub fn is_from(&self, name: &str, uuid: &str) -> bool {
        if !self.host_uuid.is_empty() && !uuid.is_empty() {
            self.host_uuid == uuid
        } else {
            self.host == name
        }
    }

    /// Whether this snapshot is a backup of the same disk: same host (`is_from`), VM and
    /// disk.
    pub(crate) fn same_disk(&self, host: &str, uuid: &str, vm: &str, disk: &str) -> bool {
        self.is_from(host, uuid) && self.vm == vm && self.disk == disk
    }

    /// The host a retention group is kept for: its uuid, or its name when it has none.
    pub(crate) fn host_key(&self) -> (bool, &str) {
        if self.host_uuid.is_empty() {
            (false, &self.host)
        } else {
            (true, &self.host_uuid)
        }
    }
}

/// An open repository.
pub struct Repository {
    backend: Arc<dyn Backend>,
    key: MasterKey,
    config: RepoConfig,
    location: Location,
    /// Who this process is: written into its locks, and "this host" of `find_latest`.
    host: HostIdentity,
    /// Id of a full map segment of zero chunks (a hole of `MAP_ENTRIES` chunks).
    zero_segment: std::sync::OnceLock<Id>,
}

fn make_backend(location: &Location) -> Result<Arc<dyn Backend>> {
    Ok(match location {
        Location::Local(p) => Arc::new(backend::local::LocalBackend::new(p)),
        Location::S3 { .. } => Arc::new(backend::s3::S3Backend::new(location)?),
    })
}

impl Repository {
    /// Create a repository with default options.
    pub fn init(location: &Location, password: &str) -> Result<Repository> {
        Self::init_with(location, password, &InitOptions::default())
    }

    /// Create a repository.
    pub fn init_with(
        location: &Location,
        password: &str,
        opts: &InitOptions,
    ) -> Result<Repository> {
        if !opts.chunk_size.is_power_of_two() || !(4096..=(4 << 20)).contains(&opts.chunk_size) {
            return Err(RepoError::InvalidArgument(format!(
                "chunk size {} must be a power of two from 4096 to 4194304",
                opts.chunk_size
            )));
        }
        if password.is_empty() {
            return Err(RepoError::InvalidArgument(
                "the repository password is empty".into(),
            ));
        }
        let backend = make_backend(location)?;
        if backend.exists("config")? {
            return Err(RepoError::AlreadyExists(location.to_string()));
        }
        backend.create()?;
        let (key, raw) = MasterKey::generate();
        let kf = crypto::make_key_file(password, &raw, opts.kdf)?;
        let kf_json = serde_json::to_vec_pretty(&kf)
            .map_err(|e| RepoError::InvalidArgument(e.to_string()))?;
        backend.put(&format!("keys/{}", crypto::random_id()), &kf_json)?;
        if let Err(d) = opts.kdf.check() {
            return Err(RepoError::InvalidArgument(d));
        }
        let mut config = RepoConfig {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            id: crypto::random_id(),
            chunk_size: opts.chunk_size,
            pack_size: opts.pack_size.clamp(MIN_PACK_SIZE, MAX_PACK_SIZE),
            compression_level: opts.compression_level.clamp(-7, 22),
            mac: None,
        };
        config.mac = Some(to_hex(&key.config_mac(&config.mac_body()?)));
        let cj = serde_json::to_vec_pretty(&config)
            .map_err(|e| RepoError::InvalidArgument(e.to_string()))?;
        // config last: a repository without it is not one yet.
        backend.put("config", &cj)?;
        Ok(Repository {
            backend,
            key,
            config,
            location: location.clone(),
            host: HostIdentity::by_name_only(),
            zero_segment: Default::default(),
        })
    }

    /// Open an existing repository.
    pub fn open(location: &Location, password: &str) -> Result<Repository> {
        let backend = make_backend(location)?;
        let cfg = match backend.get("config") {
            Ok(c) => c,
            Err(e) if e.is_not_found() => {
                return Err(RepoError::NotFound {
                    location: location.to_string(),
                    detail: "it has no `config` object".into(),
                })
            }
            Err(e) => return Err(e),
        };
        let config: RepoConfig =
            serde_json::from_slice(&cfg).map_err(|e| RepoError::Unsupported {
                location: location.to_string(),
                detail: format!("`config` is not a coldclone repository configuration: {e}"),
            })?;
        if config.format != FORMAT_NAME
            || !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&config.version)
        {
            return Err(RepoError::Unsupported {
                location: location.to_string(),
                detail: format!(
                    "format {} version {} (this coldclone reads {FORMAT_NAME} versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION})",
                    config.format, config.version
                ),
            });
        }
        // Checked before the MAC too: format 1 has none.
        if !(MIN_PACK_SIZE..=MAX_PACK_SIZE).contains(&config.pack_size)
            || !(-7..=22).contains(&config.compression_level)
        {
            return Err(RepoError::corrupt(
                "config",
                format!(
                    "pack size {} or compression level {} out of range",
                    config.pack_size, config.compression_level
                ),
            ));
        }
        if !config.chunk_size.is_power_of_two()
            || config.chunk_size < 4096
            || config.chunk_size > (4 << 20)
        {
            return Err(RepoError::corrupt(
                "config",
                format!("chunk size {}", config.chunk_size),
            ));
        }
        let keys = backend.list("keys")?;
        if keys.is_empty() {
            return Err(RepoError::corrupt(
                format!("{location}/keys"),
                "no key files",
            ));
        }
        let mut refused: Option<RepoError> = None;
        let mut tried = 0;
        for k in keys {
            let body = backend.get(&k.key)?;
            let Ok(kf) = serde_json::from_slice::<crypto::KeyFile>(&body) else {
                tracing::warn!("ignoring unreadable key file {}", k.key);
                continue;
            };
            let key = match crypto::open_key_file(&kf, password, &k.key) {
                Ok(Some(key)) => key,
                Ok(None) => {
                    tried += 1;
                    continue;
                }
                // A damaged or planted key file must not keep the good ones from opening.
                Err(e @ RepoError::Corrupt { .. }) => {
                    tracing::warn!("ignoring key file {}: {e}", k.key);
                    refused.get_or_insert(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            if config.version >= 2 {
                let want = to_hex(&key.config_mac(&config.mac_body()?));
                if config.mac.as_deref() != Some(want.as_str()) {
                    return Err(RepoError::corrupt(
                        format!("{location}/config"),
                        "`config` fails authentication: it was changed by someone without the repository's key",
                    ));
                }
            } else {
                tracing::info!(
                    "repository {location} is of format 1: its config is not authenticated"
                );
            }
            return Ok(Repository {
                backend,
                key,
                config,
                location: location.clone(),
                host: HostIdentity::by_name_only(),
                zero_segment: Default::default(),
            });
        }
        match refused {
            Some(e) if tried == 0 => Err(e),
            _ => Err(RepoError::WrongPassword(location.to_string())),
        }
    }

    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Back up one disk as one snapshot.
    pub fn backup_disk(
        &self,
        source: &dyn DiskSource,
        meta: SnapshotMeta,
        opts: &BackupOptions,
        progress: &dyn Progress,
    ) -> Result<BackupSummary> {
        backup::backup_disk(self, source, meta, opts, progress)
    }

    /// All snapshots, oldest first (by time, then sequence number, then id). A damaged snapshot file is left out with a warning
    /// (tracing) so that the others stay usable; `check` reports it.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let mut out = Vec::new();
        for o in self.backend.list("snapshots")? {
            let id = o.key.trim_start_matches("snapshots/").to_string();
            match self.load_snapshot(&id) {
                Ok(s) => out.push(s),
                Err(e) if e.is_not_found() => continue, // forgotten meanwhile
                Err(e @ RepoError::Corrupt { .. }) => {
                    tracing::warn!("snapshot {id} left out: {e}");
                }
                Err(e) => return Err(e),
            }
        }
        // Two backups in one second: the sequence number, not the random id, orders them.
        out.sort_by(|a, b| (a.time_unix, a.seq, &a.id).cmp(&(b.time_unix, b.seq, &b.id)));
        Ok(out)
    }

    /// All snapshots; any unreadable one is an error (prune must see every snapshot).
    pub(crate) fn snapshots_strict(&self) -> Result<Vec<Snapshot>> {
        let mut out = Vec::new();
        for o in self.backend.list("snapshots")? {
            let id = o.key.trim_start_matches("snapshots/").to_string();
            match self.load_snapshot(&id) {
                Ok(s) => out.push(s),
                Err(e) if e.is_not_found() => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Who this process is in the repository: its locks carry it, and `find_latest`
    /// prefers its snapshots. By default the host name alone ([`HostIdentity::by_name_only`]);
    /// coldclone sets the state folder's ([`HostIdentity::load_or_create`]).
    pub fn set_host(&mut self, host: HostIdentity) {
        self.host = host;
    }

    pub fn host(&self) -> &HostIdentity {
        &self.host
    }

    /// The newest snapshot of `vm`/`disk` taken by this host ([`Repository::set_host`])
    /// when there is one, else the newest of any host. VMs of the same name on several
    /// hosts are kept apart: use [`Repository::find_latest_of`] to name the host.
    pub fn find_latest(&self, vm: &str, disk: &str) -> Result<Option<Snapshot>> {
        let snaps = self.snapshots()?;
        let here = &self.host;
        let mine = latest_of(&snaps, |s| s.same_disk(&here.name, &here.uuid, vm, disk));
        if mine.is_some() {
            return Ok(mine);
        }
        Ok(latest_of(&snaps, |s| s.vm == vm && s.disk == disk))
    }

    /// The newest snapshot of `vm`/`disk` from the host named `host` (the `host` of its
    /// `SnapshotMeta`), for snapshots without host uuids: see [`Repository::find_latest_of`].
    pub fn find_latest_on(&self, host: &str, vm: &str, disk: &str) -> Result<Option<Snapshot>> {
        self.find_latest_of(
            &HostIdentity {
                name: host.into(),
                uuid: String::new(),
            },
            vm,
            disk,
        )
    }

    /// The newest snapshot of `vm`/`disk` made by `host` ([`Snapshot::is_from`]): the
    /// parent for that host's next backup of that disk. Newest by sequence number, so a
    /// wall clock that went backwards does not make an older snapshot the latest.
    pub fn find_latest_of(
        &self,
        host: &HostIdentity,
        vm: &str,
        disk: &str,
    ) -> Result<Option<Snapshot>> {
        Ok(latest_of(&self.snapshots()?, |s| {
            s.same_disk(&host.name, &host.uuid, vm, disk)
        }))
    }

    /// The snapshot with this id or unique id prefix (at least [`MIN_ID_PREFIX`]
    /// characters: a shorter one would match another snapshot tomorrow).
    pub fn find_snapshot(&self, id: &str) -> Result<Snapshot> {
        let id = id.trim();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(RepoError::SnapshotNotFound(id.into()));
        }
        if id.len() < MIN_ID_PREFIX {
            return Err(RepoError::InvalidArgument(format!(
                "snapshot id prefix {id:?} is too short: give at least {MIN_ID_PREFIX} characters"
            )));
        }
        let id = id.to_ascii_lowercase();
        let all = self.backend.list("snapshots")?;
        let matches: Vec<String> = all
            .into_iter()
            .map(|o| o.key.trim_start_matches("snapshots/").to_string())
            .filter(|k| k.starts_with(&id))
            .collect();
        match matches.len() {
            0 => Err(RepoError::SnapshotNotFound(id)),
            1 => self.load_snapshot(&matches[0]),
            n => Err(RepoError::AmbiguousSnapshot {
                prefix: id,
                matches: n,
            }),
        }
    }

    /// Restore a snapshot to a new file (written sparse): an existing target is refused.
    /// See [`Repository::restore_with`].
    pub fn restore(
        &self,
        id: &str,
        target: &Path,
        progress: &dyn Progress,
    ) -> Result<RestoreSummary> {
        restore::restore(self, id, target, &RestoreOptions::default(), progress)
    }

    /// Restore a snapshot to a file (written sparse) or, with `force`, a block device
    /// (written whole, opened with O_EXCL). The snapshot's structure is checked before the
    /// first write; a file is written to a temporary file beside it and renamed into place
    /// when complete, so a failed restore leaves an existing file as it was. An existing
    /// file is replaced only with `force`.
    pub fn restore_with(
        &self,
        id: &str,
        target: &Path,
        opts: &RestoreOptions,
        progress: &dyn Progress,
    ) -> Result<RestoreSummary> {
        restore::restore(self, id, target, opts, progress)
    }

    /// Random access to snapshot `id`, chunk by chunk on demand, each chunk verified.
    pub fn open_snapshot(&self, id: &str) -> Result<SnapshotReader<'_>> {
        SnapshotReader::open(self, id)
    }

    /// Compares snapshot `id` with `source` chunk by chunk, storing nothing: every byte
    /// of the source is read.
    pub fn compare_disk(&self, id: &str, source: &dyn DiskSource) -> Result<CompareReport> {
        compare::compare(self, id, source)
    }

    /// Verify the repository's structure; with `read_data`, every byte of every pack.
    pub fn check(&self, read_data: bool) -> Result<CheckReport> {
        check::check(self, read_data)
    }

    /// Remove one snapshot (its data goes at the next prune).
    pub fn forget(&self, id: &str) -> Result<()> {
        let s = self.find_snapshot(id)?;
        self.backend.delete(&format!("snapshots/{}", s.id))
    }

    /// Remove every snapshot of one backup run (those tagged `run` = `run`, one per disk);
    /// returns their ids, oldest first. None is not an error: a crashed run may have
    /// committed nothing.
    pub fn forget_run(&self, run: &str) -> Result<Vec<String>> {
        if run.trim().is_empty() {
            return Err(RepoError::InvalidArgument("an empty run id".into()));
        }
        let mut out = Vec::new();
        for s in self.snapshots()? {
            if s.tags.get("run").map(String::as_str) == Some(run) {
                self.backend.delete(&format!("snapshots/{}", s.id))?;
                out.push(s.id);
            }
        }
        Ok(out)
    }

    /// Apply a retention policy and remove data no snapshot uses any more.
    pub fn prune(&self, policy: &RetentionPolicy, dry_run: bool) -> Result<PruneReport> {
        prune::prune(self, policy, dry_run)
    }

    /// Remove lock objects whose holder is gone (older than 30 minutes without refresh, or
    /// of a process of this host that no longer exists). Returns how many were removed.
    pub fn remove_stale_locks(&self) -> Result<usize> {
        lock::remove_stale(self.backend.as_ref(), &self.host)
    }

    /// Remove one lock object on purpose (`coldclone unlock KEY`), whatever it holds: for a
    /// lock left by a process known to be gone, or an unreadable one. Returns its key.
    pub fn unlock(&self, name: &str) -> Result<String> {
        lock::unlock(self.backend.as_ref(), name)
    }

    // ---- internals ----

    pub(crate) fn load_snapshot(&self, id: &str) -> Result<Snapshot> {
        let key = format!("snapshots/{id}");
        let sealed = self.backend.get(&key)?;
        let plain = self.open_file(SNAPSHOT_KIND, &key, &sealed)?;
        let mut s: Snapshot = serde_json::from_slice(&plain)
            .map_err(|e| RepoError::corrupt(&key, format!("snapshot is not valid JSON: {e}")))?;
        s.id = id.to_string();
        Ok(s)
    }

    pub(crate) fn save_snapshot(&self, s: &Snapshot) -> Result<u64> {
        let body = serde_json::to_vec(&StoredSnapshot {
            snap: s,
            seq: s.seq,
            map: &s.map,
        })
        .map_err(|e| RepoError::InvalidArgument(e.to_string()))?;
        let key = format!("snapshots/{}", s.id);
        let sealed = self.seal_file(SNAPSHOT_KIND, &key, &body);
        self.backend.put(&key, &sealed)?;
        Ok(sealed.len() as u64)
    }

    /// The AAD of a sealed repository file: its kind, and from format 2 on its key, so
    /// that a file copied or renamed to another name fails authentication.
    fn file_aad(&self, kind: &str, key: &str) -> Vec<u8> {
        if self.config.version >= 2 {
            format!("{kind}\0{key}").into_bytes()
        } else {
            kind.as_bytes().to_vec()
        }
    }

    pub(crate) fn open_file(&self, kind: &str, key: &str, sealed: &[u8]) -> Result<Vec<u8>> {
        self.key.open_file(&self.file_aad(kind, key), key, sealed)
    }

    pub(crate) fn seal_file(&self, kind: &str, key: &str, plain: &[u8]) -> Vec<u8> {
        self.key.seal_file(&self.file_aad(kind, key), plain)
    }

    /// Load and merge all index files. A damaged index file is reported (tracing, and in
    /// `Index::damaged`) and left out; the packs no readable index lists are then read
    /// from their own headers, so one bad index file blocks no restore, backup or prune.
    pub(crate) fn load_index(&self) -> Result<Index> {
        let mut idx = Index::default();
        for o in self.backend.list("index")? {
            let sealed = match self.backend.get(&o.key) {
                Ok(b) => b,
                Err(e) if e.is_not_found() => continue, // replaced by a prune meanwhile
                Err(e) => return Err(e),
            };
            let packs = self
                .open_file(INDEX_KIND, &o.key, &sealed)
                .and_then(|plain| pack::decode_index(&plain, &o.key));
            match packs {
                Ok(packs) => {
                    for p in packs {
                        idx.add_pack(&p);
                    }
                    idx.files.push(o.key);
                }
                Err(e @ RepoError::Corrupt { .. }) => {
                    tracing::warn!(
                        "index file {} left out: {e}; its packs are read from their headers (`coldclone repair-index` rebuilds the index)",
                        o.key
                    );
                    idx.damaged.push((o.key, e.to_string()));
                }
                Err(e) => return Err(e),
            }
        }
        if !idx.damaged.is_empty() {
            self.index_unlisted_packs(&mut idx)?;
        }
        Ok(idx)
    }

    /// Add to `idx` the packs in the storage it does not list, from their headers. A pack
    /// that is damaged itself is reported and left out.
    fn index_unlisted_packs(&self, idx: &mut Index) -> Result<()> {
        let listed: util::IdSet = idx.packs.iter().map(|p| p.0).collect();
        for o in self.backend.list("data")? {
            let Some(id) = o.key.rsplit('/').next().and_then(id_from_hex) else {
                continue;
            };
            if listed.contains(&id) {
                continue;
            }
            match self.read_pack_desc(&o.key, &id) {
                Ok(Some(d)) => {
                    idx.add_pack(&d);
                    idx.recovered.push(d);
                }
                Ok(None) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A pack's description from its own header; `None` (with a warning) when the pack is
    /// damaged; storage errors are errors.
    pub(crate) fn read_pack_desc(&self, key: &str, id: &Id) -> Result<Option<pack::PackDesc>> {
        let data = match self.backend.get(key) {
            Ok(d) => d,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        if blake3::hash(&data).as_bytes() != id {
            tracing::warn!("pack {key} does not match its name (damaged): left out");
            return Ok(None);
        }
        match pack::parse_pack_header(&self.key, key, &data) {
            Ok(blobs) => Ok(Some(pack::PackDesc {
                id: *id,
                size: data.len() as u64,
                blobs,
            })),
            Err(e) => {
                tracing::warn!("pack {key} left out: {e}");
                Ok(None)
            }
        }
    }

    /// Rebuild the index from the packs' headers: every pack in the storage is read (the
    /// damaged ones are reported and left out), new index files are written, then the old
    /// ones are removed. Holds the exclusive lock.
    pub fn repair_index(&self) -> Result<RepairReport> {
        check::repair_index(self)
    }

    pub(crate) fn save_index(&self, packs: &[pack::PackDesc]) -> Result<u64> {
        let plain = pack::encode_index(packs);
        let key = format!("index/{}", crypto::random_id());
        let sealed = self.seal_file(INDEX_KIND, &key, &plain);
        self.backend.put(&key, &sealed)?;
        Ok(sealed.len() as u64)
    }

    /// Read one blob through the index.
    pub(crate) fn read_blob(&self, index: &Index, id: &Id) -> Result<Vec<u8>> {
        let (pack_id, e) = index.entry(id).ok_or_else(|| {
            RepoError::corrupt("index", format!("blob {} is in no index", to_hex(id)))
        })?;
        let key = pack::pack_key(&pack_id);
        let sealed = self
            .backend
            .get_range(&key, e.offset as u64, e.stored_len as u64)?;
        pack::open_blob(&self.key, &e, &sealed, &key)
    }

    /// The id of the map blob of a full segment of zero chunks. A snapshot's map segment
    /// with this id is a hole of `MAP_ENTRIES` chunks: backup, restore, check and prune
    /// need not read it (a 64 TiB thin disk has half a million of them).
    pub(crate) fn zero_segment_id(&self) -> Id {
        *self
            .zero_segment
            .get_or_init(|| self.key.chunk_id(&vec![0u8; MAP_ENTRIES * 32]))
    }

    /// Visit the chunk ids of a snapshot one map segment at a time (memory does not grow
    /// with the disk: a 64 TiB disk lists 2^32 chunk ids). `f(first, ids)` gets the index
    /// of the segment's first chunk and its ids; when it returns `Ok(true)` the map blob is
    /// remembered in `known` (its id and number of chunk ids), and its later occurrences, in
    /// this snapshot or in others visited with the same `known`, are neither read nor
    /// visited. Fails when a map blob is unreadable or the map does not fit the disk size.
    pub(crate) fn visit_map(
        &self,
        s: &Snapshot,
        index: &Index,
        known: &mut util::IdMap<u64>,
        mut f: impl FnMut(u64, &[Id]) -> Result<bool>,
    ) -> Result<()> {
        let cs = s.chunk_size as u64;
        if cs == 0 {
            return Err(RepoError::corrupt(
                format!("snapshots/{}", s.id),
                "chunk size 0",
            ));
        }
        let n = s.size.div_ceil(cs);
        let mut count = 0u64;
        for m in &s.map {
            let id = map_blob_id(s, m)?;
            if let Some(k) = known.get(&id) {
                count += k;
                continue;
            }
            let ids = self.read_map_blob(index, &id, m)?;
            if f(count, &ids)? {
                known.insert(id, ids.len() as u64);
            }
            count += ids.len() as u64;
        }
        if count != n {
            return Err(RepoError::corrupt(
                format!("snapshots/{}", s.id),
                format!("map lists {count} chunks, the disk size needs {n}"),
            ));
        }
        Ok(())
    }

    /// The chunk ids listed by the map blob `id` (`hex` as the snapshot names it).
    pub(crate) fn read_map_blob(&self, index: &Index, id: &Id, hex: &str) -> Result<Vec<Id>> {
        let b = self.read_blob(index, id)?;
        decode_map_blob(&b).ok_or_else(|| {
            RepoError::corrupt(format!("map blob {hex}"), "length is not a multiple of 32")
        })
    }

    pub(crate) fn lock(&self, exclusive: bool, purpose: &str) -> Result<lock::LockGuard> {
        lock::acquire(self.backend.clone(), &self.host, exclusive, purpose)
    }

    /// A shared lock for a reader (restore, check). On storage that cannot be written
    /// (a read-only mount, read-only S3 credentials) go on without one: a disaster
    /// recovery must not need write access.
    pub(crate) fn lock_for_reading(&self, purpose: &str) -> Result<Option<lock::LockGuard>> {
        match self.lock(false, purpose) {
            Ok(l) => Ok(Some(l)),
            Err(RepoError::Io {
                ref source,
                ref path,
            }) if source.raw_os_error() == Some(libc::EROFS)
                || source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                tracing::warn!("cannot write a lock ({path}: {source}); reading without one");
                Ok(None)
            }
            Err(RepoError::S3 { ref detail, .. }) if detail.contains("AccessDenied") => {
                tracing::warn!("cannot write a lock ({detail}); reading without one");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

pub(crate) const ZERO_ID: Id = [0u8; 32];

/// The id of a map blob as snapshot `s` lists it (hex).
pub(crate) fn map_blob_id(s: &Snapshot, hex: &str) -> Result<Id> {
    id_from_hex(hex)
        .ok_or_else(|| RepoError::corrupt(format!("snapshots/{}", s.id), "map id is not hex"))
}

/// The chunk ids in a map blob's plaintext: 32 bytes each; None when it is not a whole
/// number of them.
pub(crate) fn decode_map_blob(b: &[u8]) -> Option<Vec<Id>> {
    if b.len() % 32 != 0 {
        return None;
    }
    Some(
        b.chunks_exact(32)
            .map(|c| {
                let mut a = [0u8; 32];
                a.copy_from_slice(c);
                a
            })
            .collect(),
    )
}

/// The newest (by [`Snapshot::order_key`]) of the snapshots that `pick` selects.
fn latest_of(snaps: &[Snapshot], pick: impl Fn(&Snapshot) -> bool) -> Option<Snapshot> {
    snaps
        .iter()
        .filter(|s| pick(s))
        .max_by(|a, b| a.order_key().cmp(&b.order_key()))
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn repository_is_shareable_between_threads() {
        assert_send_sync::<Repository>();
    }

    #[test]
    fn locations_parse() {
        assert_eq!(
            Location::parse("/srv/repo").unwrap(),
            Location::Local("/srv/repo".into())
        );
        assert!(Location::parse("").is_err());
        assert!(Location::parse("s3:nohost").is_err());
        assert!(Location::parse("s3:http://h:9000").is_err());
        match Location::parse("s3:http://127.0.0.1:9000/bkt/a/b/").unwrap() {
            Location::S3 {
                endpoint,
                bucket,
                prefix,
                ..
            } => {
                assert_eq!(endpoint, "http://127.0.0.1:9000");
                assert_eq!(bucket, "bkt");
                assert_eq!(prefix, "a/b");
            }
            l => panic!("{l:?}"),
        }
    }
}
