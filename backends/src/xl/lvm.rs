//! LVM through the lvm2 command-line tools (`--reportformat json`): look a
//! disk up, snapshot it (classic copy-on-write or thin), check a classic
//! snapshot did not overflow, remove it.

use crate::util::run_tool;
use crate::{BackendError, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One logical volume as `lvs` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Lv {
    pub vg: String,
    pub name: String,
    pub path: PathBuf,
    pub bytes: u64,
    pub attr: String,
    /// The thin pool, for a thin volume.
    pub pool: Option<String>,
    /// The origin, for a snapshot.
    pub origin: Option<String>,
    /// How full a classic snapshot (or a thin pool) is, in percent.
    pub data_percent: Option<f64>,
}

impl Lv {
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.vg, self.name)
    }
    /// Thin volumes have lv_attr 'V'; their snapshots need no size.
    pub fn is_thin(&self) -> bool {
        self.attr.starts_with('V') || self.pool.is_some()
    }
    /// A classic snapshot whose copy-on-write space ran out is marked invalid
    /// (state 'I' in lv_attr's fifth place) or reports 100 % full.
    pub fn overflowed(&self) -> bool {
        let invalid = self.attr.chars().nth(4) == Some('I');
        let classic_snapshot = self.attr.starts_with('s') || self.attr.starts_with('S');
        invalid || (classic_snapshot && self.data_percent.is_some_and(|p| p >= 100.0))
    }
}

#[derive(Deserialize)]
struct Report {
    report: Vec<ReportLvs>,
}
#[derive(Deserialize)]
struct ReportLvs {
    #[serde(default)]
    lv: Vec<RawLv>,
}
#[derive(Deserialize)]
struct RawLv {
    lv_name: String,
    vg_name: String,
    #[serde(default)]
    lv_path: String,
    #[serde(default)]
    lv_size: String,
    #[serde(default)]
    lv_attr: String,
    #[serde(default)]
    pool_lv: String,
    #[serde(default)]
    origin: String,
    #[serde(default)]
    data_percent: String,
}

const FIELDS: &str = "lv_name,vg_name,lv_path,lv_size,lv_attr,pool_lv,origin,data_percent";

/// Parses `lvs --reportformat json` output.
pub fn parse_lvs(json: &str) -> Result<Vec<Lv>> {
    let r: Report = serde_json::from_str(json).map_err(|e| BackendError::Tool {
        command: "lvs --reportformat json".into(),
        stderr: format!("unreadable report: {e}"),
    })?;
    let none_if_empty = |s: String| (!s.is_empty()).then_some(s);
    Ok(r.report
        .into_iter()
        .flat_map(|l| l.lv)
        .map(|l| Lv {
            path: if l.lv_path.is_empty() {
                PathBuf::from(format!("/dev/{}/{}", l.vg_name, l.lv_name))
            } else {
                PathBuf::from(l.lv_path)
            },
            bytes: l.lv_size.trim().parse().unwrap_or(0),
            attr: l.lv_attr,
            pool: none_if_empty(l.pool_lv),
            origin: none_if_empty(l.origin),
            data_percent: l.data_percent.trim().parse().ok(),
            vg: l.vg_name,
            name: l.lv_name,
        })
        .collect())
}

fn lvs(args: &[&str]) -> Result<Vec<Lv>> {
    let mut c = Command::new("lvs");
    c.args([
        "--reportformat",
        "json",
        "--units",
        "b",
        "--nosuffix",
        "-o",
        FIELDS,
    ])
    .args(args);
    parse_lvs(&run_tool(c)?)
}

/// The logical volume behind a device path, or `None` if it is not one.
pub fn lookup(dev: &Path) -> Result<Option<Lv>> {
    let Some(s) = dev.to_str() else {
        return Ok(None);
    };
    match lvs(&[s]) {
        Ok(mut v) if v.len() == 1 => Ok(v.pop()),
        Ok(_) => Ok(None),
        // "Volume group ... not found" / "not a valid LV": not LVM.
        Err(BackendError::Tool { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The volume `vg/lv`, if it exists.
pub fn find(vg: &str, lv: &str) -> Result<Option<Lv>> {
    match lvs(&[&format!("{vg}/{lv}")]) {
        Ok(mut v) => Ok(v.pop()),
        Err(BackendError::Tool { stderr, .. })
            if stderr.contains("not found") || stderr.contains("Failed to find") =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Snapshots `origin` as `vg/name`: thin when the origin is thin (no size,
/// activated despite thin snapshots' activation-skip flag), else a classic
/// snapshot of `classic_size` (an lvcreate size such as "512m" or "20%ORIGIN").
///
/// Taken while the original is paused, so it does what the snapshot needs and no
/// more (measured in docs/xl.md, "Where lvcreate -s spends the pause"):
/// `--noudevsync`: no wait for udev to create the /dev nodes of the new LV (device-
/// mapper's own node is made by libdevmapper; [`after_pause`] settles udev later);
/// `--autobackup n`: the text copy of the VG metadata in /etc/lvm/backup (written and
/// fsynced after the change; not the metadata on the PVs, which is committed as
/// always) is written by [`after_pause`] instead (`vgcfgbackup`).
pub fn snapshot(origin: &Lv, name: &str, classic_size: &str) -> Result<()> {
    let mut c = Command::new("lvcreate");
    c.args([
        "--yes",
        "--quiet",
        "--noudevsync",
        "--autobackup",
        "n",
        "-s",
        "-n",
        name,
    ]);
    if origin.is_thin() {
        c.args(["-kn"]);
    } else if classic_size.contains('%') {
        c.args(["-l", classic_size]);
    } else {
        c.args(["-L", classic_size]);
    }
    c.arg(origin.full_name());
    run_tool(c).map(|_| ())
}

/// What [`snapshot`] left for after the pause: udev's view of the new LVs (only
/// when udev runs) and the metadata backup of each VG. Failures are logged: the
/// snapshots themselves are complete without either.
pub fn after_pause(vgs: &[String]) {
    if Path::new("/run/udev/control").exists() {
        let mut c = Command::new("udevadm");
        c.args(["settle", "--timeout=60"]);
        if let Err(e) = run_tool(c) {
            tracing::warn!("udevadm settle after the snapshots: {e}");
        }
    }
    let mut done: Vec<&String> = Vec::new();
    for vg in vgs {
        if done.contains(&vg) {
            continue;
        }
        done.push(vg);
        let mut c = Command::new("vgcfgbackup");
        c.arg(vg);
        if let Err(e) = run_tool(c) {
            tracing::warn!("vgcfgbackup {vg} after the snapshots: {e}");
        }
    }
}

/// Removes `vg/lv` if it exists and is a snapshot of `origin`; never anything else.
pub fn remove_snapshot(vg: &str, lv: &str, origin: &str) -> Result<()> {
    let Some(found) = find(vg, lv)? else {
        return Ok(());
    };
    if found.origin.as_deref() != Some(origin) {
        return Err(BackendError::Unsupported(format!(
            "{vg}/{lv} is not a snapshot of {origin} (origin {:?}); not removing it",
            found.origin
        )));
    }
    let mut c = Command::new("lvremove");
    c.args(["--yes", "--quiet", "-f"]).arg(format!("{vg}/{lv}"));
    run_tool(c).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvs_reports_parse_and_overflow_is_seen() {
        let json = r#"{ "report": [ { "lv": [
            {"lv_name":"g1", "vg_name":"vg0", "lv_path":"/dev/vg0/g1", "lv_size":"33554432", "lv_attr":"owi-aos---", "pool_lv":"", "origin":"", "data_percent":""},
            {"lv_name":"g1snap", "vg_name":"vg0", "lv_path":"/dev/vg0/g1snap", "lv_size":"33554432", "lv_attr":"swi-I-s---", "pool_lv":"", "origin":"g1", "data_percent":"100.00"},
            {"lv_name":"g2", "vg_name":"vg0", "lv_path":"/dev/vg0/g2", "lv_size":"33554432", "lv_attr":"Vwi-a-tz--", "pool_lv":"pool", "origin":"", "data_percent":"12.50"},
            {"lv_name":"ok", "vg_name":"vg0", "lv_path":"", "lv_size":"8388608", "lv_attr":"swi-a-s---", "pool_lv":"", "origin":"g1", "data_percent":"3.10"}
        ] } ] }"#;
        let lvs = parse_lvs(json).unwrap();
        assert_eq!(lvs.len(), 4);
        assert_eq!(lvs[0].bytes, 32 << 20);
        assert!(!lvs[0].is_thin() && !lvs[0].overflowed());
        assert!(lvs[1].overflowed());
        assert_eq!(lvs[1].origin.as_deref(), Some("g1"));
        assert!(lvs[2].is_thin() && !lvs[2].overflowed());
        assert_eq!(lvs[3].path, PathBuf::from("/dev/vg0/ok"));
        assert!(!lvs[3].overflowed());
        assert!(parse_lvs("not json").is_err());
    }
}
