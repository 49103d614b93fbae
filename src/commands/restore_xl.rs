//! `coldclone restore VM --as NEW --vg VG [--network BRIDGE] [--to DIR] [--force]`: an
//! xl domain made again from a backup whose kept definition is `xl list -l` JSON: one
//! LV per disk in VG (`NEW-VDEV`, sized to the snapshot), the backup written into it
//! by the repository's restore to a block device (opened O_EXCL: not while in use),
//! and an xl config `DIR/NEW.cfg` (default /etc/xen/NEW.cfg) derived through
//! `coldclone_backends::xl::restore_cfg`'s allow-list. The domain is not started.
//!
//! Nothing that exists is overwritten without `--force`: not the config file, not an
//! LV of the name. A failure removes the LVs this command made (only those) and
//! writes no config; the config is written last, so its presence means the disks are
//! whole.

use super::open_repository;
use super::restore_vm::backup_of;
use crate::config::Config;
use crate::progress::{stderr_is_terminal, BarProgress};
use anyhow::{bail, Context, Result};
use coldclone_backends::xl::{lvm, restore_cfg};
use coldclone_backends::VmDefinitionKind;
use coldclone_repository::RestoreOptions;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Request<'a> {
    pub vm: &'a str,
    pub new_name: &'a str,
    pub snapshot: Option<&'a str>,
    pub vg: &'a str,
    pub bridge: Option<&'a str>,
    /// Where the config goes; `None`: /etc/xen.
    pub cfg_dir: Option<&'a Path>,
    pub force: bool,
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct RestoredDomain {
    pub name: String,
    pub from_vm: String,
    pub backup: String,
    pub taken: String,
    pub consistency: String,
    pub config: PathBuf,
    /// vdev → the LV's path.
    pub disks: BTreeMap<String, PathBuf>,
    pub macs: Vec<String>,
    pub bridge: Option<String>,
    pub notes: Vec<String>,
}

/// A domain (and LV) name: letters, digits, '-', '_', '.', not starting with '.' or
/// '-' (lvcreate(8) refuses leading '-'), 1-48 characters (an LV name with `-VDEV`
/// stays under LVM's 127).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 48
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with(['.', '-'])
}

fn valid_vg(vg: &str) -> bool {
    !vg.is_empty()
        && vg.len() <= 64
        && vg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'))
        && !vg.starts_with(['.', '-'])
}

fn lvcreate(vg: &str, name: &str, bytes: u64) -> Result<()> {
    let out = Command::new("lvcreate")
        .args(["--yes", "--quiet", "--wipesignatures", "y", "-n", name])
        .arg("-L")
        .arg(format!("{bytes}b"))
        .arg(vg)
        .output()
        .context("cannot run lvcreate (install lvm2)")?;
    if !out.status.success() {
        bail!(
            "lvcreate of {vg}/{name} ({bytes} bytes) failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn lvremove(vg: &str, name: &str) -> Result<()> {
    let out = Command::new("lvremove")
        .args(["--yes", "--quiet", "-f"])
        .arg(format!("{vg}/{name}"))
        .output()
        .context("cannot run lvremove")?;
    if !out.status.success() {
        bail!(
            "lvremove {vg}/{name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub fn run(cfg: &Config, req: &Request) -> Result<()> {
    if !valid_name(req.new_name) {
        bail!(
            "--as {:?}: an xl domain name here is 1-48 letters, digits, '-', '_' or '.', not \
             starting with '.' or '-'",
            req.new_name
        );
    }
    if !valid_vg(req.vg) {
        bail!("--vg {:?} is not a volume group name", req.vg);
    }
    let repo = open_repository(cfg)?;
    let backup = backup_of(&repo, req.vm, req.snapshot)?;
    let first = backup.first().context("the backup has no disks")?.clone();
    let run_id = first.tags.get("run").cloned().unwrap_or_default();
    let Some(config) = backup.iter().find_map(|s| s.vm_config.clone()) else {
        bail!(
            "backup {run_id} of vm {:?} holds no VM definition (it was made before coldclone \
             kept them); restore its disks one by one with `restore {} --disk NAME --to DEVICE \
             --force`",
            req.vm,
            req.vm
        );
    };
    match VmDefinitionKind::parse(&config.kind) {
        Some(VmDefinitionKind::XlJson) => {}
        Some(VmDefinitionKind::XapiVmRecord) => bail!(
            "backup {run_id} of vm {:?} is of a XAPI VM: restore it with --sr SR",
            req.vm
        ),
        _ => bail!(
            "backup {run_id} of vm {:?} holds a {} definition; --vg makes xl domains",
            req.vm,
            config.kind
        ),
    }
    let original: serde_json::Value =
        serde_json::from_str(&config.text).context("the backup's xl definition is not JSON")?;

    // Everything refused before anything is made.
    let dir = req.cfg_dir.unwrap_or(Path::new("/etc/xen"));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot make {}", dir.display()))?;
    let cfg_path = dir.join(format!("{}.cfg", req.new_name));
    if !req.force && std::fs::symlink_metadata(&cfg_path).is_ok() {
        bail!(
            "{} exists; give another --as or --to, or --force to replace it",
            cfg_path.display()
        );
    }
    let mut lvs: Vec<(String, String, u64, bool)> = Vec::new(); // (vdev, lv name, bytes, exists)
    for s in &backup {
        let vdev_ok = !s.disk.is_empty()
            && s.disk.len() <= 16
            && s.disk.bytes().all(|c| c.is_ascii_alphanumeric());
        if !vdev_ok {
            bail!("the backup's disk {:?} is not a vdev name", s.disk);
        }
        let lv = format!("{}-{}", req.new_name, s.disk);
        let found =
            lvm::find(req.vg, &lv).with_context(|| format!("cannot look up {}/{lv}", req.vg))?;
        if let Some(f) = &found {
            if !req.force {
                bail!(
                    "the LV {}/{lv} exists; give another --as, or --force to overwrite it",
                    req.vg
                );
            }
            if f.bytes < s.size {
                bail!(
                    "the LV {}/{lv} exists with {} bytes, less than disk {} ({} bytes); remove \
                     or extend it",
                    req.vg,
                    f.bytes,
                    s.disk,
                    s.size
                );
            }
        }
        lvs.push((s.disk.clone(), lv, s.size, found.is_some()));
    }
    let macs: Vec<String> = (0..original
        .pointer("/0/config/nics")
        .or_else(|| original.pointer("/config/nics"))
        .and_then(|n| n.as_array())
        .map_or(0, Vec::len))
        .map(|_| restore_cfg::new_mac())
        .collect();
    let disk_paths: Vec<(String, String)> = lvs
        .iter()
        .map(|(vdev, lv, _, _)| (vdev.clone(), format!("/dev/{}/{lv}", req.vg)))
        .collect();
    let derived = restore_cfg::derive(&restore_cfg::RestoreSpec {
        name: req.new_name,
        original: &original,
        disks: &disk_paths,
        bridge: req.bridge,
        macs: &macs,
    })
    .context("the backup's xl definition cannot be made into a new domain")?;

    // The LVs, then their data; a failure removes the ones made here.
    let mut made: Vec<String> = Vec::new();
    let progress = stderr_is_terminal() && !req.json;
    let result = (|| -> Result<()> {
        for (_, lv, bytes, exists) in &lvs {
            if !exists {
                lvcreate(req.vg, lv, *bytes)?;
                made.push(lv.clone());
            }
        }
        for (s, (_, lv, _, _)) in backup.iter().zip(&lvs) {
            let dev = PathBuf::from(format!("/dev/{}/{lv}", req.vg));
            let bar = BarProgress::new(progress, &format!("restore {}", s.disk));
            repo.restore_with(&s.id, &dev, &RestoreOptions { force: true }, &bar)
                .with_context(|| format!("writing disk {} into {}", s.disk, dev.display()))?;
            bar.finish();
        }
        // Last: the config names the disks only once they are whole.
        let partial = dir.join(format!(".{}.cfg.partial", req.new_name));
        let mut text = format!(
            "# xl domain {} restored by coldclone from backup {run_id} of VM {} (taken {}, \
             {}). Not started: `xl create {}`.\n",
            req.new_name,
            req.vm,
            first.time,
            first.consistency,
            cfg_path.display()
        );
        for n in &derived.notes {
            text.push_str(&format!("# note: {n}\n"));
        }
        text.push_str(&derived.text);
        {
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::remove_file(&partial);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&partial)
                .with_context(|| format!("cannot write {}", partial.display()))?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&partial, &cfg_path)
            .with_context(|| format!("cannot write {}", cfg_path.display()))?;
        Ok(())
    })();
    if let Err(e) = result {
        let mut left = Vec::new();
        for lv in made.iter().rev() {
            if let Err(r) = lvremove(req.vg, lv) {
                left.push(format!("{r:#}"));
            }
        }
        if left.is_empty() {
            return Err(e);
        }
        return Err(e.context(format!(
            "and the LVs made for it could not all be removed: {}",
            left.join("; ")
        )));
    }
    let restored = RestoredDomain {
        name: req.new_name.to_string(),
        from_vm: req.vm.to_string(),
        backup: run_id,
        taken: first.time.clone(),
        consistency: first.consistency.clone(),
        config: cfg_path,
        disks: disk_paths
            .into_iter()
            .map(|(v, p)| (v, PathBuf::from(p)))
            .collect(),
        macs: if req.bridge.is_some() { macs } else { vec![] },
        bridge: req.bridge.map(str::to_string),
        notes: derived.notes,
    };
    let mut out = std::io::stdout().lock();
    if req.json {
        writeln!(out, "{}", serde_json::to_string(&restored)?)?;
    } else {
        writeln!(
            out,
            "restored vm {} as xl domain {} from backup {} (taken {}, {}): start it with `xl \
             create {}`",
            restored.from_vm,
            restored.name,
            restored.backup,
            restored.taken,
            restored.consistency,
            restored.config.display()
        )?;
        for (d, p) in &restored.disks {
            writeln!(out, "  disk {d}: {}", p.display())?;
        }
        for n in &restored.notes {
            writeln!(out, "  note: {n}")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(valid_name("g1-restored"));
        assert!(!valid_name("-x") && !valid_name(".x") && !valid_name("a/b") && !valid_name(""));
        assert!(valid_vg("vg0") && !valid_vg("../vg") && !valid_vg("-vg"));
    }
}
