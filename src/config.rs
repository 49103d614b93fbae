//! The TOML configuration: where state and backups live, how clones are
//! isolated, and the VMs to back up (each named once, by its hypervisor handle).

use coldclone_backends::VmLocator;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

pub const DEFAULT_CONFIG: &str = "/etc/coldclone/coldclone.toml";
pub const DEFAULT_HEARTBEAT: &str = "login:";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/coldclone";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Run journals, work folders and the lock live here.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub repository: RepositoryConfig,
    #[serde(default)]
    pub isolation: IsolationConfig,
    #[serde(default)]
    pub run: RunConfig,
    #[serde(default)]
    pub defaults: VmPolicy,
    /// The `[[vm]]` sections as written.
    #[serde(default, rename = "vm")]
    pub vm_sections: Vec<VmConfig>,
    /// The same, checked once by [`Config::parse`]: what the rest reads.
    #[serde(skip)]
    pub vms: Vec<Vm>,
}

/// A `[[vm]]` as checked: its name, its one hypervisor handle (the
/// precedence xapi > xl > qemu applied here only) and its effective settings.
#[derive(Debug, Clone, Serialize)]
pub struct Vm {
    pub name: String,
    pub locator: VmLocator,
    pub policy: EffectivePolicy,
    pub audit: AuditSettings,
}

/// What `audit` uses of a VM's section.
#[derive(Debug, Clone, Serialize, Default)]
pub struct AuditSettings {
    /// The console text that says the booted backup is up (default "login:").
    pub heartbeat: Option<String>,
    /// A probe program run over the restored disks (exit 0 = good).
    pub probe: Option<PathBuf>,
}

/// How one invocation schedules its VMs.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// VMs (so clones) in flight at once (default 1).
    pub max_parallel: Option<usize>,
    /// Memory the clones may use at once, in MiB (default: the host's
    /// available memory at the start, less the reserve).
    pub memory_budget_mib: Option<u64>,
    /// Memory always left to the host, in MiB (default 1024).
    pub memory_reserve_mib: Option<u64>,
    /// How long a VM that does not fit waits for room before it is skipped (default 3600).
    pub wait_for_memory_secs: Option<u64>,
    /// Prometheus textfile to write after each run (node_exporter's textfile collector).
    pub metrics_file: Option<PathBuf>,
}

/// Shrinking the original's memory before its checkpoint: a smaller memory
/// image and a clone that fits in less RAM. Undone after the backup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BalloonPolicy {
    /// "50%" of the VM's memory, or a size: "512MiB", "2GiB".
    pub target: String,
    /// Never below this many MiB (default 256).
    pub floor_mib: Option<u64>,
    /// How long to wait for the guest to give the memory back (default 60).
    pub timeout_secs: Option<u64>,
}

impl BalloonPolicy {
    /// The target in bytes for a VM with `memory_bytes` of RAM.
    pub fn target_bytes(&self, memory_bytes: u64) -> Result<u64, String> {
        let t = self.target.trim();
        let bytes = if let Some(p) = t.strip_suffix('%') {
            let pct: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("balloon target {t:?}: not a percentage"))?;
            if !(1.0..=100.0).contains(&pct) {
                return Err(format!("balloon target {t:?}: must be 1% to 100%"));
            }
            (memory_bytes as f64 * pct / 100.0) as u64
        } else {
            parse_size(t)?
        };
        let floor = self.floor_mib.unwrap_or(256) << 20;
        Ok(bytes.max(floor).min(memory_bytes))
    }
}

/// "512MiB", "2GiB", "1024M", "1G" → bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size {s:?}: expected a number and a unit, like 512MiB"))?;
    let mult = match unit.trim() {
        "MiB" | "M" | "MB" => 1 << 20,
        "GiB" | "G" | "GB" => 1 << 30,
        "KiB" | "K" | "KB" => 1 << 10,
        other => {
            return Err(format!(
                "size {s:?}: unknown unit {other:?} (use MiB or GiB)"
            ))
        }
    };
    Ok(n * mult)
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    /// A local folder (default: STATE_DIR/repository).
    pub path: Option<PathBuf>,
    /// A file holding the repository password (else $COLDCLONE_PASSWORD).
    pub password_file: Option<PathBuf>,
    /// S3-compatible object storage instead of a folder: endpoint URL.
    pub s3_endpoint: Option<String>,
    pub s3_bucket: Option<String>,
    /// Objects go under this prefix (default "coldclone").
    pub s3_prefix: Option<String>,
    /// Default "us-east-1".
    pub s3_region: Option<String>,
    /// A file with two lines `access_key = ...` and `secret_key = ...` (TOML);
    /// else $AWS_ACCESS_KEY_ID and $AWS_SECRET_ACCESS_KEY.
    pub s3_credentials_file: Option<PathBuf>,
}

/// How many backups `prune` keeps per VM and disk: the repository's own type.
pub use coldclone_repository::Keep;

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct IsolationConfig {
    /// Put the isolated bridge and the clones in this network namespace
    /// (created for the run, and removed after, if it does not exist).
    pub netns: Option<String>,
    /// Reuse this existing bridge instead of making one per run. It is
    /// verified like any other: it must have no uplink, address or forwarding.
    pub bridge: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnCloneFailure {
    /// No backup when the clone does not stop by itself.
    #[default]
    Fail,
    /// Archive the killed clone's disk, labelled `crash`.
    Crash,
    /// Kill the clone and archive a disk-only snapshot of the original taken with its
    /// file systems frozen through its guest agent, labelled `quiesced` (the VM needs
    /// a guest agent channel; checked before anything is paused).
    Quiesced,
}

/// Settings that `[defaults]` gives every VM and a `[[vm]]` may override.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct VmPolicy {
    /// Seconds the clone gets to power off after the request (default 300).
    pub stop_timeout_secs: Option<u64>,
    pub on_clone_failure: Option<OnCloneFailure>,
    /// `quiesced`: seconds the guest agent gets to freeze the file systems (default 10).
    pub freeze_timeout_secs: Option<u64>,
    /// Retention for `prune` (default: last 7, daily 7, weekly 4, monthly 6, yearly 1).
    pub keep: Option<Keep>,
    /// Higher runs first (default 0).
    pub priority: Option<i32>,
    pub balloon: Option<BalloonPolicy>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub name: String,
    /// QEMU: the VM's QMP socket (the path given to -qmp unix:PATH,server=on).
    pub qmp: Option<PathBuf>,
    pub stop_timeout_secs: Option<u64>,
    pub on_clone_failure: Option<OnCloneFailure>,
    /// `quiesced`: seconds the guest agent gets to freeze the file systems (default 10).
    pub freeze_timeout_secs: Option<u64>,
    pub keep: Option<Keep>,
    pub priority: Option<i32>,
    pub balloon: Option<BalloonPolicy>,
    /// QEMU: "background-snapshot" (default: the pause does not wait for RAM
    /// to be written) or "pre-switchover" (RAM copied while the VM runs).
    pub checkpoint_method: Option<String>,
    /// QEMU, pre-switchover: QEMU's downtime target in ms (default 20).
    pub downtime_limit_ms: Option<u64>,
    /// QEMU: the uid the VM's QEMU runs as when it is not root (libvirt's
    /// `qemu` user); the QMP socket's peer must be root or this uid.
    pub qemu_uid: Option<u32>,
    /// Xen: the domain's name (`xl list`); coldclone then runs in dom0 and
    /// drives `xl`, xenstore and LVM.
    pub xl_domain: Option<String>,
    /// Xen: size of classic LVM snapshots, as lvcreate takes it ("512m",
    /// "20%ORIGIN", the default); thin volumes need none.
    pub xl_snapshot_size: Option<String>,
    /// Xen: "auto" (default: the live checkpoint through libxenlight, else `xl save
    /// -p`), "live" (libxenlight only) or "save-pause" (`xl save -p` only).
    pub xl_checkpoint: Option<String>,
    /// `audit`: the console text that says the booted backup is up (default "login:").
    pub audit_heartbeat: Option<String>,
    /// `audit`: a probe program run over the restored disks (exit 0 = good).
    pub audit_probe: Option<PathBuf>,
    /// XenServer / XCP-ng: the pool master's URL (`https://host`).
    pub xapi_url: Option<String>,
    /// XAPI: the VM's name label or uuid.
    pub xapi_vm: Option<String>,
    /// XAPI: a file with `username = "..."` and `password = "..."` (else
    /// $COLDCLONE_XAPI_USERNAME and $COLDCLONE_XAPI_PASSWORD).
    pub xapi_credentials_file: Option<PathBuf>,
    /// XAPI: SHA-256 fingerprint of the host's self-signed certificate (several,
    /// comma-separated, for the pool's hosts).
    pub xapi_tls_fingerprint_sha256: Option<String>,
    /// XAPI: coldclone runs in the host's dom0 and may press an HVM guest's
    /// ACPI power button with `xl trigger` (XAPI itself has no call for it).
    pub xapi_dom0_acpi: Option<bool>,
    /// XAPI, with xapi_dom0_acpi: the dom0's inventory naming its host
    /// (`INSTALLATION_UUID=`); default /etc/xensource-inventory.
    pub xapi_dom0_inventory: Option<PathBuf>,
    /// Accept an `http://` xapi_url (a simulator or lab host only: credentials in the clear).
    #[serde(default)]
    pub xapi_insecure_http: bool,
    /// libvirt: the domain's name or UUID (`virsh list`).
    pub libvirt_domain: Option<String>,
    /// libvirt: the connection URI (default `qemu:///system`).
    pub libvirt_uri: Option<String>,
}

impl VmConfig {
    /// The one place the handles' precedence is decided.
    fn locator(&self) -> Option<VmLocator> {
        if let (Some(url), Some(vm)) = (&self.xapi_url, &self.xapi_vm) {
            return Some(VmLocator::Xapi {
                url: url.clone(),
                vm: vm.clone(),
                credentials_file: self.xapi_credentials_file.clone(),
                options: coldclone_backends::xapi::XapiOptions {
                    tls_fingerprint_sha256: self.xapi_tls_fingerprint_sha256.clone(),
                    dom0_acpi: self.xapi_dom0_acpi.unwrap_or(false),
                    dom0_inventory: self.xapi_dom0_inventory.clone(),
                    insecure_http: self.xapi_insecure_http,
                },
            });
        }
        if let Some(domain) = &self.libvirt_domain {
            return Some(VmLocator::Libvirt {
                domain: domain.clone(),
                uri: self.libvirt_uri.clone(),
                options: coldclone_backends::libvirt::LibvirtOptions::default(),
            });
        }
        if let Some(domain) = &self.xl_domain {
            return Some(VmLocator::Xl {
                domain: domain.clone(),
                options: coldclone_backends::xl::XlOptions {
                    snapshot_size: self.xl_snapshot_size.clone(),
                    checkpoint: self.xl_checkpoint.clone(),
                },
            });
        }
        self.qmp.as_ref().map(|q| VmLocator::Qemu {
            qmp: q.clone(),
            options: coldclone_backends::qemu::QemuOptions {
                checkpoint_method: self.checkpoint_method.clone(),
                downtime_limit_ms: self.downtime_limit_ms,
                uid: self.qemu_uid,
            },
        })
    }
}

/// A VM's effective settings: its own over the defaults over built-ins.
#[derive(Debug, Clone, Serialize)]
pub struct EffectivePolicy {
    pub stop_timeout_secs: u64,
    pub on_clone_failure: OnCloneFailure,
    pub freeze_timeout_secs: u64,
    pub keep: Keep,
    pub priority: i32,
    pub balloon: Option<BalloonPolicy>,
}

pub const DEFAULT_KEEP: Keep = Keep {
    last: 7,
    daily: 7,
    weekly: 4,
    monthly: 6,
    yearly: 1,
};

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.vms = cfg.check(path)?;
        Ok(cfg)
    }

    /// Checks the whole config; returns the VMs as the rest of coldclone reads them.
    fn check(&self, path: &Path) -> Result<Vec<Vm>, ConfigError> {
        // (VM names: see `check_vm_name`.)
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let mut seen = std::collections::BTreeSet::new();
        let mut vms = Vec::new();
        for vm in &self.vm_sections {
            check_vm_name(&vm.name).map_err(invalid)?;
            if !seen.insert(vm.name.clone()) {
                return Err(invalid(format!("vm {:?} is listed twice", vm.name)));
            }
            let xapi_set = vm.xapi_url.is_some() || vm.xapi_vm.is_some();
            if xapi_set && (vm.xapi_url.is_none() || vm.xapi_vm.is_none()) {
                return Err(invalid(format!(
                    "vm {:?}: xapi_url and xapi_vm go together",
                    vm.name
                )));
            }
            if xapi_set && (vm.qmp.is_some() || vm.xl_domain.is_some()) {
                return Err(invalid(format!(
                    "vm {:?} names xapi_vm and qmp or xl_domain: a VM has one hypervisor handle",
                    vm.name
                )));
            }
            if let Some(u) = &vm.xapi_url {
                let plain = u.starts_with("http://");
                if plain && !vm.xapi_insecure_http {
                    return Err(invalid(format!(
                        "vm {:?}: xapi_url {u:?} is plain http: the XAPI password and session would travel in the clear; use https://, or set xapi_insecure_http = true for a test host",
                        vm.name
                    )));
                }
                if !(u.starts_with("https://") || plain) {
                    return Err(invalid(format!(
                        "vm {:?}: xapi_url {u:?} must start with https://",
                        vm.name
                    )));
                }
            }
            if let Some(fp) = &vm.xapi_tls_fingerprint_sha256 {
                coldclone_backends::xapi::client::parse_fingerprints(fp).map_err(|e| {
                    invalid(format!(
                        "vm {:?}: xapi_tls_fingerprint_sha256: {e}",
                        vm.name
                    ))
                })?;
            }
            if let Some(f) = &vm.xapi_credentials_file {
                if !f.is_absolute() {
                    return Err(invalid(format!(
                        "vm {:?}: xapi_credentials_file must be an absolute path",
                        vm.name
                    )));
                }
            }
            let handles = [
                vm.qmp.is_some(),
                vm.xl_domain.is_some(),
                xapi_set,
                vm.libvirt_domain.is_some(),
            ];
            if vm.libvirt_domain.is_some() && handles.iter().filter(|h| **h).count() > 1 {
                return Err(invalid(format!(
                    "vm {:?} names libvirt_domain and another hypervisor handle (qmp, xl_domain, xapi_vm): a VM has one hypervisor handle",
                    vm.name
                )));
            }
            if vm.libvirt_uri.is_some() && vm.libvirt_domain.is_none() {
                return Err(invalid(format!(
                    "vm {:?}: libvirt_uri needs libvirt_domain",
                    vm.name
                )));
            }
            if vm.libvirt_domain.as_ref().is_some_and(|d| {
                d.is_empty()
                    || d.starts_with('-')
                    || d.chars().any(|c| c.is_whitespace() || c.is_control())
            }) {
                return Err(invalid(format!(
                    "vm {:?}: libvirt_domain must be a domain name or UUID",
                    vm.name
                )));
            }
            let Some(locator) = vm.locator() else {
                return Err(invalid(format!(
                    "vm {:?} names no hypervisor handle: add qmp = \"/path/to/vm.qmp\" (QEMU), libvirt_domain = \"name\" (libvirt), xl_domain = \"name\" (Xen) or xapi_url + xapi_vm (XenServer / XCP-ng)",
                    vm.name
                )));
            };
            if vm.qmp.is_some() && vm.xl_domain.is_some() {
                return Err(invalid(format!(
                    "vm {:?} names both qmp and xl_domain: a VM has one hypervisor handle",
                    vm.name
                )));
            }
            if vm
                .xl_domain
                .as_ref()
                .is_some_and(|d| d.is_empty() || d.chars().any(char::is_whitespace))
            {
                return Err(invalid(format!(
                    "vm {:?}: xl_domain must be a domain name",
                    vm.name
                )));
            }
            coldclone_backends::xl::XlOptions {
                snapshot_size: None,
                checkpoint: vm.xl_checkpoint.clone(),
            }
            .method()
            .map_err(|e| invalid(format!("vm {:?}: {e}", vm.name)))?;
            if let Some(b) = vm.balloon.as_ref().or(self.defaults.balloon.as_ref()) {
                b.target_bytes(1 << 40)
                    .map_err(|e| invalid(format!("vm {:?}: {e}", vm.name)))?;
            }
            coldclone_backends::qemu::QemuOptions {
                checkpoint_method: vm.checkpoint_method.clone(),
                downtime_limit_ms: None,
                uid: None,
            }
            .method()
            .map_err(|e| invalid(format!("vm {:?}: {e}", vm.name)))?;
            if vm.stop_timeout_secs == Some(0) {
                return Err(invalid(format!(
                    "vm {:?}: stop_timeout_secs must be > 0",
                    vm.name
                )));
            }
            vms.push(Vm {
                name: vm.name.clone(),
                locator,
                policy: self.policy(vm),
                audit: AuditSettings {
                    heartbeat: vm.audit_heartbeat.clone(),
                    probe: vm.audit_probe.clone(),
                },
            });
        }
        let r = &self.repository;
        let s3_set = r.s3_endpoint.is_some() || r.s3_bucket.is_some();
        if s3_set && (r.s3_endpoint.is_none() || r.s3_bucket.is_none()) {
            return Err(invalid(
                "repository: s3_endpoint and s3_bucket go together".into(),
            ));
        }
        if s3_set && r.path.is_some() {
            return Err(invalid(
                "repository: give either path (a folder) or s3_endpoint + s3_bucket, not both"
                    .into(),
            ));
        }
        for n in [&self.isolation.bridge].into_iter().flatten() {
            network_isolation::check_ifname(n)
                .map_err(|e| invalid(format!("isolation.bridge: {e}")))?;
        }
        Ok(vms)
    }

    pub fn repository_path(&self) -> PathBuf {
        self.repository
            .path
            .clone()
            .unwrap_or_else(|| self.state_dir.join("repository"))
    }

    pub fn vm(&self, name: &str) -> Option<&Vm> {
        self.vms.iter().find(|v| v.name == name)
    }

    fn policy(&self, vm: &VmConfig) -> EffectivePolicy {
        EffectivePolicy {
            stop_timeout_secs: vm
                .stop_timeout_secs
                .or(self.defaults.stop_timeout_secs)
                .unwrap_or(300),
            on_clone_failure: vm
                .on_clone_failure
                .or(self.defaults.on_clone_failure)
                .unwrap_or_default(),
            freeze_timeout_secs: vm
                .freeze_timeout_secs
                .or(self.defaults.freeze_timeout_secs)
                .unwrap_or(10)
                .max(1),
            keep: vm.keep.or(self.defaults.keep).unwrap_or(DEFAULT_KEEP),
            priority: vm.priority.or(self.defaults.priority).unwrap_or(0),
            balloon: vm.balloon.clone().or_else(|| self.defaults.balloon.clone()),
        }
    }
}

/// A VM name becomes part of file names, folder names, QEMU option values and command
/// lines: 1 to 64 of `A-Z a-z 0-9 . _ -`, starting with a letter, digit or `_` (so never
/// `..`, an option such as `-rf`, a `,` or `=` that QEMU would split on, or a control
/// character).
pub fn check_vm_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    if name.len() > 64 || !first_ok || !name.chars().all(ok_char) {
        return Err(format!(
            "vm name {name:?} must be 1 to 64 of A-Z a-z 0-9 . _ -, starting with a letter, a digit or _"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_config_parses_and_overrides_apply() {
        let c = Config::parse(
            r#"
state_dir = "/tmp/cc"
[repository]
path = "/backups/repo"
[defaults]
stop_timeout_secs = 60
[[vm]]
name = "web1"
qmp = "/run/web1.qmp"
on_clone_failure = "crash"
[[vm]]
name = "db1"
qmp = "/run/db1.qmp"
stop_timeout_secs = 600
"#,
            Path::new("t.toml"),
        )
        .unwrap();
        let web = c.vm("web1").unwrap();
        assert_eq!(web.policy.stop_timeout_secs, 60);
        assert_eq!(web.policy.on_clone_failure, OnCloneFailure::Crash);
        let db = c.vm("db1").unwrap();
        assert_eq!(db.policy.stop_timeout_secs, 600);
        assert_eq!(db.policy.on_clone_failure, OnCloneFailure::Fail);
    }

    #[test]
    fn balloon_targets_and_sizes() {
        let b = BalloonPolicy {
            target: "50%".into(),
            floor_mib: None,
            timeout_secs: None,
        };
        assert_eq!(b.target_bytes(1 << 30), Ok(512 << 20));
        assert_eq!(b.target_bytes(300 << 20), Ok(256 << 20), "the floor holds");
        let b = BalloonPolicy {
            target: "2GiB".into(),
            floor_mib: Some(64),
            timeout_secs: None,
        };
        assert_eq!(
            b.target_bytes(1 << 30),
            Ok(1 << 30),
            "never above the VM's memory"
        );
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert!(parse_size("12 parsecs").is_err());
        assert!(BalloonPolicy {
            target: "150%".into(),
            floor_mib: None,
            timeout_secs: None
        }
        .target_bytes(1 << 30)
        .is_err());
    }

    #[test]
    fn a_libvirt_domain_is_a_libvirt_vm() {
        let c = Config::parse(
            "[[vm]]\nname = \"web1\"\nlibvirt_domain = \"web1\"\n",
            Path::new("x.toml"),
        )
        .unwrap();
        match c.vm("web1").map(|v| &v.locator) {
            Some(VmLocator::Libvirt { domain, uri, .. }) => {
                assert_eq!(domain, "web1");
                assert_eq!(uri, &None);
            }
            other => panic!("{other:?}"),
        }
        let c = Config::parse(
            "[[vm]]\nname = \"a\"\nlibvirt_domain = \"a\"\nlibvirt_uri = \"qemu+ssh://h/system\"\n",
            Path::new("x.toml"),
        )
        .unwrap();
        assert!(matches!(
            c.vm("a").map(|v| &v.locator),
            Some(VmLocator::Libvirt { uri: Some(u), .. }) if u == "qemu+ssh://h/system"
        ));
        for (body, want) in [
            (
                "libvirt_domain = \"a\"\nqmp = \"/q\"\n",
                "one hypervisor handle",
            ),
            (
                "libvirt_domain = \"a\"\nxl_domain = \"a\"\n",
                "one hypervisor handle",
            ),
            (
                "libvirt_uri = \"qemu:///system\"\nqmp = \"/q\"\n",
                "needs libvirt_domain",
            ),
            ("libvirt_domain = \"--all\"\n", "domain name or UUID"),
        ] {
            let e = Config::parse(
                &format!("[[vm]]\nname = \"a\"\n{body}"),
                Path::new("x.toml"),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains(want), "{body}: {e}");
        }
    }

    #[test]
    fn an_xl_domain_is_a_xen_vm() {
        let c = Config::parse(
            "[[vm]]\nname = \"web1\"\nxl_domain = \"web1\"\nxl_snapshot_size = \"2g\"\n",
            Path::new("x.toml"),
        )
        .unwrap();
        match c.vm("web1").map(|v| &v.locator) {
            Some(VmLocator::Xl { domain, options }) => {
                assert_eq!(domain, "web1");
                assert_eq!(options.snapshot_size.as_deref(), Some("2g"));
            }
            other => panic!("{other:?}"),
        }
        let e = Config::parse(
            "[[vm]]\nname = \"a\"\nxl_domain = \"a\"\nqmp = \"/q\"\n",
            Path::new("x.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("both qmp and xl_domain"), "{e}");
    }

    #[test]
    fn xapi_vms_parse_and_mistakes_are_named() {
        let c = Config::parse(
            "[[vm]]\nname = \"web\"\nxapi_url = \"https://pool1\"\nxapi_vm = \"web01\"\nxapi_credentials_file = \"/etc/coldclone/xapi.cred\"\nxapi_tls_fingerprint_sha256 = \"AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89\"\n",
            Path::new("c.toml"),
        )
        .unwrap();
        assert!(matches!(
            &c.vm("web").unwrap().locator,
            VmLocator::Xapi { url, vm, .. } if url == "https://pool1" && vm == "web01"
        ));
        for (text, needle) in [
            ("[[vm]]\nname = \"a\"\nxapi_url = \"https://h\"\n", "go together"),
            ("[[vm]]\nname = \"a\"\nxapi_url = \"h\"\nxapi_vm = \"v\"\n", "https://"),
            ("[[vm]]\nname = \"a\"\nxapi_url = \"http://h\"\nxapi_vm = \"v\"\n", "xapi_insecure_http = true"),
            ("[[vm]]\nname = \"a\"\nxapi_url = \"https://h\"\nxapi_vm = \"v\"\nqmp = \"q\"\n", "one hypervisor handle"),
            ("[[vm]]\nname = \"a\"\nxapi_url = \"https://h\"\nxapi_vm = \"v\"\nxapi_tls_fingerprint_sha256 = \"12\"\n", "64 hex digits"),
        ] {
            let e = Config::parse(text, Path::new("c.toml")).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn mistakes_are_named() {
        for (text, needle) in [
            ("[[vm]]\nname = \"a\"\n", "names no hypervisor handle"),
            (
                "[[vm]]\nname = \"a\"\nqmp = \"x\"\n[[vm]]\nname = \"a\"\nqmp = \"y\"\n",
                "listed twice",
            ),
            ("stat_dir = \"/x\"\n", "unknown field"),
            (
                "[[vm]]\nname = \"a\"\nqmp = \"x\"\non_clone_failure = \"maybe\"\n",
                "unknown variant",
            ),
        ] {
            let e = Config::parse(text, Path::new("c.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle) && e.contains("c.toml"), "{e}");
        }
    }

    #[test]
    fn vm_names_are_checked_at_load() {
        for good in ["web1", "db-01.prod", "_x", "A"] {
            assert!(check_vm_name(good).is_ok(), "{good}");
        }
        let long = "a".repeat(65);
        for bad in [
            "",
            "..",
            ".",
            "-rf",
            "a,b=c",
            "a b",
            "a/b",
            "x\u{7}",
            "tab\t",
            long.as_str(),
            "é",
        ] {
            assert!(check_vm_name(bad).is_err(), "{bad:?} accepted");
        }
        let dir = std::env::temp_dir().join(format!("cc-vmname-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("c.toml");
        std::fs::write(&p, "[[vm]]\nname = \"-rf\"\nqmp = \"/q\"\n").unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(e.contains("vm name"), "{e}");
    }
}
