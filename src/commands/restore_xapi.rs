//! `coldclone restore VM --as NEW --sr SR [--network NET] [--snapshot ID]`: the VM made
//! again on its XAPI pool from a backup whose kept definition is a XAPI VM record: a VDI
//! per disk on SR with the backup's bytes (`/import_raw_vdi`, read straight from the
//! repository), `VM.create` from the kept record with the new name, its VBDs, and VIFs
//! on NET only if named (new MACs), left halted. The XAPI work, and the clean-up of a
//! failed restore, is `coldclone_backends::xapi::restore`.
//!
//! The pool and its credentials are the config's entry for VM (the VM whose backup it
//! is): a lost VM's entry is still there.

use super::open_repository;
use super::restore_vm::backup_of;
use crate::config::Config;
use crate::progress::stderr_is_terminal;
use anyhow::{bail, Context, Result};
use coldclone_backends::xapi::definition::{self, XapiDefinition};
use coldclone_backends::xapi::restore::{self, RestoreSpec};
use coldclone_backends::xapi::{Client, XapiTarget};
use coldclone_backends::{VmDefinitionKind, VmLocator};
use coldclone_repository::SnapshotReader;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

pub struct Request<'a> {
    pub vm: &'a str,
    pub new_name: &'a str,
    pub snapshot: Option<&'a str>,
    pub sr: &'a str,
    pub network: Option<&'a str>,
    pub json: bool,
}

/// A XAPI name label for a new VM: printable, no control characters, not one of
/// coldclone's own working names.
fn valid_label(name: &str) -> bool {
    !name.trim().is_empty()
        && name.len() <= 128
        && !name.chars().any(char::is_control)
        && !name.starts_with("coldclone-")
}

/// A snapshot read from its first byte to its last (what `/import_raw_vdi` sends).
struct Sequential<'r> {
    reader: SnapshotReader<'r>,
    pos: u64,
    /// Progress on stderr every this many bytes (0: none).
    every: u64,
    name: String,
}

impl Read for Sequential<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self
            .reader
            .read_at(buf, self.pos)
            .map_err(|e| std::io::Error::other(format!("the repository: {e}")))?;
        let before = self.pos;
        self.pos += n as u64;
        if self.every > 0 && before / self.every != self.pos / self.every {
            eprintln!(
                "  {}: {} of {} MiB",
                self.name,
                self.pos >> 20,
                self.reader.len() >> 20
            );
        }
        Ok(n)
    }
}

/// The kept definition, checked: it comes from the repository (sealed, but written
/// by whatever coldclone made the backup), so only what is understood is taken.
pub fn parse_definition(text: &str) -> Result<XapiDefinition> {
    let mut def: XapiDefinition =
        serde_json::from_str(text).context("the backup's XAPI VM record cannot be read")?;
    def.vm
        .retain(|k, _| definition::KEPT_FIELDS.contains(&k.as_str()));
    for k in [
        "memory_static_max",
        "memory_dynamic_max",
        "memory_dynamic_min",
        "memory_static_min",
        "VCPUs_max",
        "VCPUs_at_startup",
    ] {
        if def.vm.get(k).and_then(serde_json::Value::as_u64).is_none() {
            bail!("the backup's XAPI VM record has no number {k}: it cannot make a VM");
        }
    }
    for b in &def.vbds {
        let numeric = !b.userdevice.is_empty() && b.userdevice.bytes().all(|c| c.is_ascii_digit());
        if !numeric || !["Disk", "CD"].contains(&b.kind.as_str()) {
            bail!(
                "the backup's XAPI VM record has a VBD {:?} of type {:?}: not understood",
                b.userdevice,
                b.kind
            );
        }
    }
    for v in &def.vifs {
        if v.device.is_empty() || !v.device.bytes().all(|c| c.is_ascii_digit()) {
            bail!(
                "the backup's XAPI VM record has a VIF device {:?}: not a number",
                v.device
            );
        }
        if !(68..=65535).contains(&v.mtu) {
            bail!(
                "the backup's XAPI VM record has a VIF MTU {}: out of range",
                v.mtu
            );
        }
    }
    Ok(def)
}

fn target_of(cfg: &Config, vm: &str) -> Result<XapiTarget> {
    match cfg.vm(vm).map(|v| &v.locator) {
        Some(VmLocator::Xapi {
            url,
            credentials_file,
            options,
            ..
        }) => Ok(XapiTarget {
            url: url.clone(),
            credentials_file: credentials_file.clone(),
            tls_fingerprint_sha256: options.tls_fingerprint_sha256.clone(),
            insecure_http: options.insecure_http,
        }),
        Some(_) => {
            bail!("vm {vm:?} is not an XAPI VM in the config: --sr restores onto its XAPI pool")
        }
        None => bail!(
            "vm {vm:?} is not in the config: the restore reaches its XAPI pool through the \
             VM's [[vm]] entry (xapi_url, xapi_credentials_file); put it back, with the pool \
             to restore onto"
        ),
    }
}

pub fn run(cfg: &Config, req: &Request) -> Result<()> {
    if !valid_label(req.new_name) {
        bail!(
            "--as {:?}: a VM name is 1-128 printable characters and not coldclone's own \
             (coldclone-...)",
            req.new_name
        );
    }
    let repo = open_repository(cfg)?;
    let backup = backup_of(&repo, req.vm, req.snapshot)?;
    let first = backup.first().context("the backup has no disks")?.clone();
    let run_id = first.tags.get("run").cloned().unwrap_or_default();
    let Some(config) = backup.iter().find_map(|s| s.vm_config.clone()) else {
        bail!(
            "backup {run_id} of vm {:?} holds no VM definition (it was made before coldclone \
             kept them); restore its disks one by one with `restore {} --disk NAME --to FILE`",
            req.vm,
            req.vm
        );
    };
    match VmDefinitionKind::parse(&config.kind) {
        Some(VmDefinitionKind::XapiVmRecord) => {}
        Some(VmDefinitionKind::XlJson) => bail!(
            "backup {run_id} of vm {:?} is of an xl domain: restore it with --vg VG",
            req.vm
        ),
        Some(VmDefinitionKind::QemuCommandLine) => bail!(
            "backup {run_id} of vm {:?} is of a QEMU VM: restore it with --to DIR",
            req.vm
        ),
        _ => bail!(
            "backup {run_id} of vm {:?} holds a {} definition; --sr makes XAPI VMs",
            req.vm,
            config.kind
        ),
    }
    let def = parse_definition(&config.text)?;
    let target = target_of(cfg, req.vm)?;
    let disks: BTreeMap<String, u64> = backup.iter().map(|s| (s.disk.clone(), s.size)).collect();
    let ids: BTreeMap<String, String> = backup
        .iter()
        .map(|s| (s.disk.clone(), s.id.clone()))
        .collect();
    let progress = stderr_is_terminal() && !req.json;
    let client = Client::login(&target)?;
    let from = format!("{}/{run_id}", req.vm);
    let spec = RestoreSpec {
        name: req.new_name,
        sr: req.sr,
        network: req.network,
        def: &def,
        disks: &disks,
        from: &from,
        task_timeout: Duration::from_secs(6 * 3600),
    };
    let repo_ref = &repo;
    let mut open = |disk: &str| -> std::result::Result<Box<dyn Read + '_>, String> {
        let id = ids
            .get(disk)
            .ok_or_else(|| format!("the backup has no disk {disk}"))?;
        let reader = repo_ref
            .open_snapshot(id)
            .map_err(|e| format!("disk {disk}: the repository: {e}"))?;
        if progress {
            eprintln!("restoring {disk} ({} bytes)", reader.len());
        }
        Ok(Box::new(Sequential {
            reader,
            pos: 0,
            every: if progress { 256 << 20 } else { 0 },
            name: disk.to_string(),
        }))
    };
    let made = restore::restore(&client, &spec, &mut open);
    client.logout();
    let made = made.with_context(|| {
        format!(
            "restoring backup {run_id} of vm {:?} as {:?} on {}",
            req.vm, req.new_name, target.url
        )
    })?;
    let mut out = std::io::stdout().lock();
    if req.json {
        let v = serde_json::json!({
            "name": made.name, "uuid": made.uuid, "from_vm": req.vm, "backup": run_id,
            "taken": first.time, "consistency": first.consistency, "power_state": made.power_state,
            "sr_uuid": made.sr_uuid, "disks": made.disks, "nics": made.nics, "notes": made.notes,
        });
        writeln!(out, "{v}")?;
    } else {
        writeln!(
            out,
            "restored vm {} as {} (uuid {}, {}) from backup {run_id} (taken {}, {})",
            req.vm, made.name, made.uuid, made.power_state, first.time, first.consistency
        )?;
        for (d, r) in &made.disks {
            writeln!(
                out,
                "  disk {d}: VDI {} (userdevice {})",
                r.vdi_uuid, r.userdevice
            )?;
        }
        for n in &made.nics {
            writeln!(out, "  nic {}: {} on {:?}", n.device, n.mac, n.network)?;
        }
        for n in &made.notes {
            writeln!(out, "  note: {n}")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_definition_is_taken_only_as_far_as_it_is_understood() {
        let good = r#"{"vm": {"name_label": "w", "memory_static_max": 8, "memory_dynamic_max": 8,
            "memory_dynamic_min": 8, "memory_static_min": 2, "VCPUs_max": 2, "VCPUs_at_startup": 2,
            "is_control_domain": true, "resident_on": "OpaqueRef:x"},
            "vbds": [{"userdevice": "0", "type": "Disk", "mode": "RW", "bootable": true,
                      "unpluggable": true, "empty": false, "disk": "xvda", "vdi": null}],
            "vifs": [{"device": "0", "MAC": "aa:bb:cc:dd:ee:ff", "MTU": 1500,
                      "network_uuid": "", "network_name_label": "n"}]}"#;
        let d = parse_definition(good).unwrap();
        assert!(!d.vm.contains_key("is_control_domain"));
        assert!(!d.vm.contains_key("resident_on"));
        let bad_vbd = good.replace("\"userdevice\": \"0\"", "\"userdevice\": \"../0\"");
        assert!(parse_definition(&bad_vbd).is_err());
        let bad_mtu = good.replace("1500", "9");
        assert!(parse_definition(&bad_mtu).is_err());
        let no_mem = good.replace("\"memory_static_max\": 8,", "");
        assert!(parse_definition(&no_mem).is_err());
        assert!(parse_definition("not json").is_err());
        assert!(valid_label("web1 restored"));
        assert!(!valid_label("coldclone-restoring-x"));
        assert!(!valid_label("a\nb"));
    }
}
