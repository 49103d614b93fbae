//! Changed-block maps of LVM thin volumes (issue 15): what changed between two thin
//! snapshots of one origin is where their block mappings differ, which `thin_delta`
//! (thin-provisioning-tools) reads from the pool's metadata.
//!
//! Sources followed:
//! - thin-provisioning-tools, `man8/thin_delta.txt`: "This tool cannot be run on live
//!   metadata unless the --metadata-snap option is used"; `src/thin/delta.rs`
//!   `dump_delta_mappings`: every mapped block of either device is reported as `same`
//!   (both map it to one data block), `different`, `left_only` or `right_only`, in runs
//!   of pool blocks of the superblock's `data_block_size` (512-byte sectors);
//!   `src/thin/delta_visitor.rs` `SimpleXmlWriter`: the XML (`<superblock
//!   data_block_size=..><diff left= right=><different begin= length=/>...`).
//! - The kernel's dm-thin (drivers/md/dm-thin.c `process_reserve_metadata_snap_mesg`):
//!   `reserve_metadata_snap` commits the pool's metadata, then takes its snapshot, so a
//!   write that completed before the message is in it; `release_metadata_snap` drops it.
//!   Only one may be held per pool, and it holds metadata blocks until released: every
//!   reservation here is journaled first and released on every path (`recover` releases
//!   one a killed run left, seen in the pool's status: Documentation/admin-guide/
//!   device-mapper/thin-provisioning.rst, "held metadata root", `-` when none).
//! - lvm2's lvmthin(7): thin snapshots share the origin's blocks and get their own thin
//!   device id (`lvs -o thin_id`); a write to a shared block maps a new block for the
//!   writer only (so a block two devices map to the same data block holds the same
//!   bytes in both); thin snapshots carry the activation-skip flag (`-k`), and an origin
//!   may be removed while its thin snapshots stay.
//!
//! Why the map is never wrong: the kept snapshot K of run n shares every block of run
//! n's frozen snapshot S(n) and is never activated; S(n+1) is the origin at checkpoint
//! n+1. A block K and S(n+1) map to one data block was never written in between (a write
//! to a shared block is copied first), so everything else — `different`, `left_only`
//! (discarded since), `right_only` (new) — is the original's writes. The clone writes to
//! its own snapshot C of S, never to S: its writes are thin_delta(S, C).

use super::XlResource;
use crate::util::run_tool;
use crate::{BackendError, ChangedRange, Journal, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Kept snapshots are named `coldclone-<origin>-<run>` ...
pub const KEPT_PREFIX: &str = "coldclone-";
/// ... and tagged with the origin's name and uuid, the run, the pool's block size and the
/// origin's size (LVM tags take `A-Za-z0-9_+.-/=!:&#`: lvm(8), "Tags").
const TAG_ORIGIN: &str = "coldclone.origin=";
const TAG_ORIGIN_UUID: &str = "coldclone.origin_uuid=";
const TAG_RUN: &str = "coldclone.run=";
const TAG_CHUNK: &str = "coldclone.chunk=";
const TAG_SIZE: &str = "coldclone.size=";
/// The milestone a kill test halts at while a metadata snapshot is held.
pub const MILESTONE_RESERVED: &str = "thin:metadata-snap-reserved";

/// A thin LV with what the map needs (`lvs -o lv_uuid,thin_id,lv_tags,...`).
#[derive(Debug, Clone, PartialEq)]
pub struct ThinLv {
    pub vg: String,
    pub name: String,
    pub uuid: String,
    pub thin_id: Option<u64>,
    pub pool: Option<String>,
    pub bytes: u64,
    pub tags: Vec<String>,
}

impl ThinLv {
    fn tag(&self, prefix: &str) -> Option<&str> {
        self.tags.iter().find_map(|t| t.strip_prefix(prefix))
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
    lv_uuid: String,
    #[serde(default)]
    thin_id: String,
    #[serde(default)]
    pool_lv: String,
    #[serde(default)]
    lv_size: String,
    #[serde(default)]
    lv_tags: String,
    #[serde(default)]
    chunk_size: String,
}

fn lvs_json(args: &[&str], fields: &str) -> Result<Vec<RawLv>> {
    let mut c = Command::new("lvs");
    c.args([
        "--reportformat",
        "json",
        "--units",
        "b",
        "--nosuffix",
        "-o",
        fields,
    ])
    .args(args);
    let out = run_tool(c)?;
    let r: Report = serde_json::from_str(&out).map_err(|e| BackendError::Tool {
        command: "lvs --reportformat json".into(),
        stderr: format!("unreadable report: {e}"),
    })?;
    Ok(r.report.into_iter().flat_map(|l| l.lv).collect())
}

/// Parses the rows of [`thin_lvs`].
fn thin_lv(l: RawLv) -> ThinLv {
    ThinLv {
        thin_id: l.thin_id.trim().parse().ok(),
        pool: (!l.pool_lv.is_empty()).then_some(l.pool_lv),
        bytes: l.lv_size.trim().parse().unwrap_or(0),
        tags: l
            .lv_tags
            .split(',')
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect(),
        uuid: l.lv_uuid,
        vg: l.vg_name,
        name: l.lv_name,
    }
}

/// Every LV of `vg` with its thin id, uuid and tags.
pub fn thin_lvs(vg: &str) -> Result<Vec<ThinLv>> {
    Ok(lvs_json(
        &[vg],
        "lv_name,vg_name,lv_uuid,thin_id,pool_lv,lv_size,lv_tags",
    )?
    .into_iter()
    .map(thin_lv)
    .collect())
}

/// The pool's block ("chunk") size in bytes.
pub fn pool_chunk_bytes(vg: &str, pool: &str) -> Result<u64> {
    let rows = lvs_json(&[&format!("{vg}/{pool}")], "lv_name,vg_name,chunk_size")?;
    rows.first()
        .and_then(|r| r.chunk_size.trim().parse().ok())
        .filter(|&b: &u64| b > 0)
        .ok_or_else(|| BackendError::Tool {
            command: format!("lvs -o chunk_size {vg}/{pool}"),
            stderr: "no chunk size reported".into(),
        })
}

/// Device-mapper's name of `vg/lv`: each `-` in either doubled, joined by `-`
/// (lvm2 libdm `dm_build_dm_name`).
pub fn dm_name(vg: &str, lv: &str) -> String {
    format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
}

/// The pool's `tpool` layer (lvm2 `dm_build_dm_name(vg, lv, "tpool")`: the layer is
/// not escaped).
fn tpool(vg: &str, pool: &str) -> String {
    format!("{}-tpool", dm_name(vg, pool))
}

fn tmeta(vg: &str, pool: &str) -> PathBuf {
    PathBuf::from(format!(
        "/dev/mapper/{}",
        dm_name(vg, &format!("{pool}_tmeta"))
    ))
}

fn pool_message(vg: &str, pool: &str, msg: &str) -> Result<()> {
    let mut c = Command::new("dmsetup");
    c.args(["message", &tpool(vg, pool), "0", msg]);
    run_tool(c).map(|_| ())
}

/// The "held metadata root" of a thin-pool status line (`0 524288 thin-pool 1 11/4096
/// 0/4096 - rw ...`): `None` when none is held.
fn held_root(status: &str) -> Result<Option<u64>> {
    let fields: Vec<&str> = status.split_whitespace().collect();
    match (fields.get(2), fields.get(6)) {
        (Some(&"thin-pool"), Some(&"-")) => Ok(None),
        (Some(&"thin-pool"), Some(v)) => v.parse().map(Some).map_err(|_| BackendError::Tool {
            command: "dmsetup status".into(),
            stderr: format!("unreadable thin-pool status {status:?}"),
        }),
        _ => Err(BackendError::Tool {
            command: "dmsetup status".into(),
            stderr: format!("not a thin-pool status: {status:?}"),
        }),
    }
}

/// Whether the pool holds a metadata snapshot; `None` when the pool is not active.
pub fn metadata_snap_held(vg: &str, pool: &str) -> Result<Option<bool>> {
    let mut c = Command::new("dmsetup");
    c.args(["status", &tpool(vg, pool)]);
    match run_tool(c) {
        Ok(s) => Ok(Some(held_root(s.trim())?.is_some())),
        Err(BackendError::Tool { stderr, .. })
            if stderr.contains("No such device") || stderr.contains("not exist") =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// `recover`: releases a metadata snapshot a killed run reserved, if one is still held.
pub fn recover_metadata_snap(vg: &str, pool: &str) -> Result<()> {
    match metadata_snap_held(vg, pool)? {
        Some(true) => pool_message(vg, pool, "release_metadata_snap"),
        _ => Ok(()),
    }
}

/// Runs `f` on the pool's metadata device with a metadata snapshot reserved: one run at
/// a time per pool (a lock file), journaled before it is reserved, released on every
/// path; a release that fails leaves the journal entry for the clean-up and `recover`.
pub fn with_metadata_snap<T>(
    vg: &str,
    pool: &str,
    journal: &mut dyn Journal,
    f: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    let lock_path = PathBuf::from(format!("/run/coldclone-thin-{}.lock", tpool(vg, pool)));
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(crate::io_err(&lock_path))?;
    lock.lock().map_err(crate::io_err(&lock_path))?;
    let id = journal.will_create(
        &XlResource::ThinMetadataSnap {
            vg: vg.to_string(),
            pool: pool.to_string(),
        }
        .into(),
    )?;
    if let Err(e) = pool_message(vg, pool, "reserve_metadata_snap") {
        // Not reserved by us (perhaps held by another tool): nothing to release.
        journal.removed(id)?;
        return Err(e);
    }
    let result = journal
        .milestone(MILESTONE_RESERVED)
        .and_then(|()| f(&tmeta(vg, pool)));
    pool_message(vg, pool, "release_metadata_snap")?;
    journal.removed(id)?;
    drop(lock);
    result
}

/// What `thin_delta` says differs between two thin devices.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    /// The pool's block size in bytes.
    pub block_bytes: u64,
    /// Runs of blocks mapped differently (or by one side only), in blocks.
    pub blocks: Vec<std::ops::Range<u64>>,
}

impl Delta {
    /// The runs as byte ranges of a disk of `disk_bytes`.
    pub fn byte_ranges(&self, disk_bytes: u64) -> Vec<ChangedRange> {
        self.blocks
            .iter()
            .filter_map(|b| {
                let start = b.start.saturating_mul(self.block_bytes);
                let end = b.end.saturating_mul(self.block_bytes).min(disk_bytes);
                (start < end).then_some(start..end)
            })
            .collect()
    }
}

fn attr_u64(n: roxmltree::Node, name: &str) -> std::result::Result<u64, String> {
    n.attribute(name)
        .ok_or_else(|| format!("<{}> has no {name}", n.tag_name().name()))?
        .parse()
        .map_err(|_| format!("<{}> {name} is not a number", n.tag_name().name()))
}

/// Parses thin_delta's (non-verbose) XML for the diff of `left` and `right`.
pub fn parse_delta(xml: &str, left: u64, right: u64) -> std::result::Result<Delta, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("not XML: {e}"))?;
    let sb = doc.root_element();
    if sb.tag_name().name() != "superblock" {
        return Err(format!(
            "<{}> where <superblock> was expected",
            sb.tag_name().name()
        ));
    }
    let sectors = attr_u64(sb, "data_block_size")?;
    if sectors == 0 {
        return Err("data_block_size 0".into());
    }
    let mut diffs = sb.children().filter(|n| n.is_element());
    let diff = diffs.next().ok_or("no <diff>")?;
    if diffs.next().is_some() || diff.tag_name().name() != "diff" {
        return Err("not exactly one <diff>".into());
    }
    if attr_u64(diff, "left")? != left || attr_u64(diff, "right")? != right {
        return Err(format!("a diff of other devices than {left} and {right}"));
    }
    let mut blocks: Vec<std::ops::Range<u64>> = Vec::new();
    for n in diff.children().filter(|n| n.is_element()) {
        let begin = attr_u64(n, "begin")?;
        let len = attr_u64(n, "length")?;
        match n.tag_name().name() {
            "same" => continue,
            "different" | "left_only" | "right_only" => {
                let end = begin.checked_add(len).ok_or("a run past 2^64")?;
                match blocks.last_mut() {
                    Some(last) if last.end >= begin => last.end = last.end.max(end),
                    _ => blocks.push(begin..end),
                }
            }
            other => return Err(format!("unknown element <{other}>")),
        }
    }
    blocks.sort_by_key(|b| b.start);
    Ok(Delta {
        block_bytes: sectors * 512,
        blocks,
    })
}

/// `thin_delta -m --snap1 LEFT --snap2 RIGHT` on a reserved metadata snapshot.
pub fn thin_delta(tmeta: &Path, left: u64, right: u64) -> Result<Delta> {
    let mut c = Command::new("thin_delta");
    c.args([
        "-m",
        "--snap1",
        &left.to_string(),
        "--snap2",
        &right.to_string(),
    ])
    .arg(tmeta);
    let out = run_tool(c)?;
    parse_delta(&out, left, right).map_err(|e| BackendError::Tool {
        command: format!("thin_delta --snap1 {left} --snap2 {right}"),
        stderr: format!("unreadable output: {e}"),
    })
}

/// One thin disk of a checkpoint, as the map needs it.
#[derive(Debug, Clone)]
pub struct ThinDisk {
    pub vdev: String,
    pub vg: String,
    pub pool: String,
    pub origin: String,
    pub origin_uuid: String,
    pub bytes: u64,
    /// The frozen snapshot of this checkpoint.
    pub frozen: String,
    /// The name its kept copy gets once the backup is stored.
    pub kept: String,
    /// The clone's own snapshot of `frozen`, which it writes to.
    pub clone: String,
    pub chunk_bytes: u64,
}

impl ThinDisk {
    /// The map id the repository snapshot records (`lvm-thin:<kept name>`).
    pub fn map_id(&self) -> String {
        map_id(&self.kept)
    }
}

fn map_id(kept: &str) -> String {
    format!("lvm-thin:{kept}")
}

/// The name of the snapshot kept for the next run.
pub fn kept_name(origin: &str, run: &str) -> String {
    format!("{KEPT_PREFIX}{origin}-{run}")
}

/// Whether `lv` is a snapshot coldclone kept of the LV named `origin`.
fn is_kept_of(lv: &ThinLv, origin: &str) -> bool {
    lv.name.starts_with(KEPT_PREFIX) && lv.tag(TAG_ORIGIN) == Some(origin)
}

/// The kept snapshot, checked against the disk now; `Err`: why it cannot serve.
fn usable(k: &ThinLv, d: &ThinDisk) -> std::result::Result<u64, String> {
    if k.tag(TAG_ORIGIN_UUID) != Some(d.origin_uuid.as_str()) {
        return Err(format!(
            "the kept snapshot {} is of an earlier LV named {} (uuid {:?}, now {}): the origin was replaced",
            k.name,
            d.origin,
            k.tag(TAG_ORIGIN_UUID),
            d.origin_uuid
        ));
    }
    if k.pool.as_deref() != Some(d.pool.as_str()) {
        return Err(format!(
            "the kept snapshot {} is in pool {:?}, the disk in {}",
            k.name, k.pool, d.pool
        ));
    }
    if k.tag(TAG_CHUNK) != Some(d.chunk_bytes.to_string().as_str()) {
        return Err(format!(
            "the pool's block size changed ({:?} bytes when {} was kept, {} now)",
            k.tag(TAG_CHUNK),
            k.name,
            d.chunk_bytes
        ));
    }
    if k.tag(TAG_SIZE) != Some(d.bytes.to_string().as_str()) || k.bytes != d.bytes {
        return Err(format!(
            "the disk's size changed since {} was kept ({} bytes, now {})",
            k.name, k.bytes, d.bytes
        ));
    }
    k.thin_id
        .ok_or_else(|| format!("lvs reports no thin id for {}", k.name))
}

/// A thin_delta to run: (disk index, kept name, kept thin id, frozen thin id).
type Pair = (usize, String, u64, u64);

/// The original's writes since each usable kept snapshot, per disk, for the
/// checkpoint's change maps; the notes say why a kept snapshot could not serve.
pub fn since_kept(
    disks: &[ThinDisk],
    journal: &mut dyn Journal,
) -> BTreeMap<String, crate::DiskChangeMaps> {
    let mut out = BTreeMap::new();
    // Per pool (vg, pool), for one reservation each.
    let mut work: BTreeMap<(String, String), Vec<Pair>> = BTreeMap::new();
    for (i, d) in disks.iter().enumerate() {
        let mut maps = crate::DiskChangeMaps {
            started: d.map_id(),
            ..Default::default()
        };
        match thin_lvs(&d.vg) {
            Err(e) => maps.notes.push(format!("lvs {}: {e}", d.vg)),
            Ok(all) => {
                let frozen = all
                    .iter()
                    .find(|l| l.name == d.frozen)
                    .and_then(|l| l.thin_id);
                let kept: Vec<&ThinLv> = all.iter().filter(|l| is_kept_of(l, &d.origin)).collect();
                if kept.is_empty() {
                    maps.notes.push(format!(
                        "no snapshot of {}/{} is kept from an earlier backup",
                        d.vg, d.origin
                    ));
                }
                for k in kept {
                    match (usable(k, d), frozen) {
                        (Ok(kid), Some(fid)) => work
                            .entry((d.vg.clone(), d.pool.clone()))
                            .or_default()
                            .push((i, k.name.clone(), kid, fid)),
                        (Ok(_), None) => maps
                            .notes
                            .push(format!("lvs reports no thin id for {}", d.frozen)),
                        (Err(why), _) => maps.notes.push(why),
                    }
                }
            }
        }
        out.insert(d.vdev.clone(), maps);
    }
    for ((vg, pool), pairs) in work {
        let mut deltas = Vec::new();
        let r = with_metadata_snap(&vg, &pool, journal, |tmeta| {
            for (i, kept, kid, fid) in &pairs {
                deltas.push((*i, kept.clone(), thin_delta(tmeta, *kid, *fid)));
            }
            Ok(())
        });
        if let Err(e) = r {
            for (i, ..) in &pairs {
                if let Some(m) = out.get_mut(&disks[*i].vdev) {
                    m.notes
                        .push(format!("pool {vg}/{pool}'s metadata snapshot: {e}"));
                }
            }
            continue;
        }
        for (i, kept, delta) in deltas {
            let d = &disks[i];
            let Some(m) = out.get_mut(&d.vdev) else {
                continue;
            };
            match delta {
                Ok(delta) if delta.block_bytes == d.chunk_bytes => {
                    m.since.insert(map_id(&kept), delta.byte_ranges(d.bytes));
                }
                Ok(delta) => m.notes.push(format!(
                    "thin_delta's block size {} differs from the pool's {}",
                    delta.block_bytes, d.chunk_bytes
                )),
                Err(e) => m.notes.push(format!("{e}")),
            }
        }
    }
    out
}

/// What the clone wrote to its snapshot `d.clone` of `d.frozen`.
pub fn clone_writes(d: &ThinDisk, journal: &mut dyn Journal) -> Result<Vec<ChangedRange>> {
    let all = thin_lvs(&d.vg)?;
    let id = |name: &str| {
        all.iter()
            .find(|l| l.name == name)
            .and_then(|l| l.thin_id)
            .ok_or_else(|| BackendError::Tool {
                command: format!("lvs -o thin_id {}/{name}", d.vg),
                stderr: "no thin id reported".into(),
            })
    };
    let (left, right) = (id(&d.frozen)?, id(&d.clone)?);
    let delta = with_metadata_snap(&d.vg, &d.pool, journal, |tmeta| {
        thin_delta(tmeta, left, right)
    })?;
    if delta.block_bytes != d.chunk_bytes {
        return Err(BackendError::Tool {
            command: "thin_delta".into(),
            stderr: format!(
                "block size {} differs from the pool's {}",
                delta.block_bytes, d.chunk_bytes
            ),
        });
    }
    Ok(delta.byte_ranges(d.bytes))
}

/// The clone's own snapshot of the frozen one, active (`-kn`: no activation skip), so
/// that the clone's writes stay out of the frozen snapshot.
pub fn clone_snapshot(d: &ThinDisk) -> Result<()> {
    let mut c = Command::new("lvcreate");
    c.args(["--yes", "--quiet", "-s", "-kn", "-n", &d.clone])
        .arg(format!("{}/{}", d.vg, d.frozen));
    run_tool(c).map(|_| ())
}

/// After a stored backup: keeps a thin snapshot of the frozen one (inactive, with the
/// activation-skip flag, tagged), then removes the earlier kept ones of the same origin.
pub fn keep(d: &ThinDisk, run: &str, journal: &mut dyn Journal) -> Result<()> {
    let id = journal.will_create(
        &XlResource::LvmSnapshot {
            vg: d.vg.clone(),
            lv: d.kept.clone(),
            origin: d.frozen.clone(),
        }
        .into(),
    )?;
    let mut c = Command::new("lvcreate");
    c.args([
        "--yes",
        "--quiet",
        "-s",
        "--setactivationskip",
        "y",
        "--activate",
        "n",
        "-n",
        &d.kept,
    ]);
    for t in [
        format!("{TAG_ORIGIN}{}", d.origin),
        format!("{TAG_ORIGIN_UUID}{}", d.origin_uuid),
        format!("{TAG_RUN}{run}"),
        format!("{TAG_CHUNK}{}", d.chunk_bytes),
        format!("{TAG_SIZE}{}", d.bytes),
    ] {
        c.args(["--addtag", &t]);
    }
    c.arg(format!("{}/{}", d.vg, d.frozen));
    run_tool(c)?;
    // From here it belongs to the next run, not to this run's clean-up.
    journal.removed(id)?;
    for old in thin_lvs(&d.vg)? {
        if is_kept_of(&old, &d.origin) && old.name != d.kept {
            remove_kept(&old.vg, &old.name, &d.origin)?;
        }
    }
    Ok(())
}

/// Removes a snapshot coldclone kept of `origin` (checked by name and tag), never another.
pub fn remove_kept(vg: &str, lv: &str, origin: &str) -> Result<()> {
    let Some(found) = thin_lvs(vg)?.into_iter().find(|l| l.name == lv) else {
        return Ok(());
    };
    if !is_kept_of(&found, origin) {
        return Err(BackendError::Unsupported(format!(
            "{vg}/{lv} is not a snapshot coldclone kept of {origin}; not removing it"
        )));
    }
    let mut c = Command::new("lvremove");
    c.args(["--yes", "--quiet", "-f"]).arg(format!("{vg}/{lv}"));
    run_tool(c).map(|_| ())
}

/// The thin disks of a checkpoint: those on thin LVs, with their pool's block size.
pub fn thin_disks(
    disks: &[super::XlDisk],
    frozen: &[crate::FrozenDisk],
    run: &str,
) -> Result<Vec<ThinDisk>> {
    let mut out = Vec::new();
    for d in disks.iter().filter(|d| d.lv.is_thin()) {
        let Some(pool) = d.lv.pool.clone() else {
            continue;
        };
        let Some(f) = frozen.iter().find(|f| f.name == d.vdev) else {
            continue;
        };
        let Some(frozen_name) = f.frozen_file.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let uuid = thin_lvs(&d.lv.vg)?
            .into_iter()
            .find(|l| l.name == d.lv.name)
            .map(|l| l.uuid)
            .ok_or_else(|| BackendError::Tool {
                command: format!("lvs {}", d.lv.full_name()),
                stderr: "the origin is not listed".into(),
            })?;
        out.push(ThinDisk {
            vdev: d.vdev.clone(),
            vg: d.lv.vg.clone(),
            chunk_bytes: pool_chunk_bytes(&d.lv.vg, &pool)?,
            pool,
            origin: d.lv.name.clone(),
            origin_uuid: uuid,
            bytes: d.lv.bytes,
            frozen: frozen_name.to_string(),
            kept: kept_name(&d.lv.name, run),
            clone: format!("{frozen_name}w"),
        });
    }
    Ok(out)
}

/// Whether `path` is the clone snapshot of one of `disks`.
pub fn by_clone_path<'a>(disks: &'a [ThinDisk], path: &Path) -> Option<&'a ThinDisk> {
    disks.iter().find(|d| lvm_path(&d.vg, &d.clone) == path)
}

pub fn lvm_path(vg: &str, lv: &str) -> PathBuf {
    PathBuf::from(format!("/dev/{vg}/{lv}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The shape SimpleXmlWriter writes (thin-provisioning-tools src/thin/delta_visitor.rs).
    const XML: &str = r#"<superblock uuid="" time="3" transaction="7" data_block_size="128" nr_data_blocks="4096">
  <diff left="4" right="9">
    <same begin="0" length="10"/>
    <different begin="10" length="2"/>
    <right_only begin="12" length="1"/>
    <same begin="13" length="3"/>
    <left_only begin="16" length="4"/>
    <right_only begin="400" length="100"/>
  </diff>
</superblock>
"#;

    #[test]
    fn thin_delta_xml_parses_to_byte_ranges() {
        let d = parse_delta(XML, 4, 9).expect("parses");
        assert_eq!(d.block_bytes, 65536);
        assert_eq!(d.blocks, vec![10..13, 16..20, 400..500]);
        // Clipped to the disk: 32 MiB = 512 blocks of 64 KiB.
        let r = d.byte_ranges(450 * 65536 + 100);
        assert_eq!(
            r,
            vec![
                10 * 65536..13 * 65536,
                16 * 65536..20 * 65536,
                400 * 65536..450 * 65536 + 100
            ]
        );
    }

    #[test]
    fn anything_unexpected_in_thin_delta_output_is_refused() {
        assert!(parse_delta(XML, 4, 8).is_err(), "another pair of devices");
        assert!(parse_delta("garbage", 4, 9).is_err());
        assert!(parse_delta(&XML.replace("left_only", "moved"), 4, 9).is_err());
        assert!(parse_delta(&XML.replace("length=\"4\"", "length=\"x\""), 4, 9).is_err());
        assert!(parse_delta(&XML.replace("data_block_size=\"128\"", ""), 4, 9).is_err());
        assert!(parse_delta(
            r#"<superblock data_block_size="128"><diff left="4" right="9"/><diff left="4" right="9"/></superblock>"#,
            4,
            9
        )
        .is_err());
        // No differences: an empty map, not an error.
        let empty = parse_delta(
            r#"<superblock data_block_size="128"><diff left="4" right="9"><same begin="0" length="8"/></diff></superblock>"#,
            4,
            9,
        )
        .expect("parses");
        assert!(empty.blocks.is_empty());
    }

    #[test]
    fn pool_status_held_root() {
        let none =
            "0 524288 thin-pool 1 11/4096 0/4096 - rw discard_passdown queue_if_no_space - 1024";
        assert_eq!(held_root(none).unwrap(), None);
        let held =
            "0 524288 thin-pool 1 12/4096 3/4096 45 rw discard_passdown queue_if_no_space - 1024";
        assert_eq!(held_root(held).unwrap(), Some(45));
        assert!(held_root("0 65536 linear").is_err());
        assert!(held_root("0 524288 thin-pool 1 12/4096 3/4096 x rw").is_err());
    }

    #[test]
    fn dm_names_double_dashes() {
        assert_eq!(tpool("vg0", "pool"), "vg0-pool-tpool");
        assert_eq!(tpool("my-vg", "thin-pool"), "my--vg-thin--pool-tpool");
        assert_eq!(
            tmeta("vg0", "pool"),
            PathBuf::from("/dev/mapper/vg0-pool_tmeta")
        );
    }

    #[test]
    fn a_kept_snapshot_serves_only_the_same_origin_pool_block_and_size() {
        let d = ThinDisk {
            vdev: "xvda".into(),
            vg: "vg0".into(),
            pool: "pool".into(),
            origin: "g2".into(),
            origin_uuid: "U1".into(),
            bytes: 32 << 20,
            frozen: "g2-ccabc".into(),
            kept: kept_name("g2", "r2"),
            clone: "g2-ccabcw".into(),
            chunk_bytes: 65536,
        };
        let k = ThinLv {
            vg: "vg0".into(),
            name: kept_name("g2", "r1"),
            uuid: "K".into(),
            thin_id: Some(5),
            pool: Some("pool".into()),
            bytes: 32 << 20,
            tags: vec![
                format!("{TAG_ORIGIN}g2"),
                format!("{TAG_ORIGIN_UUID}U1"),
                format!("{TAG_RUN}r1"),
                format!("{TAG_CHUNK}65536"),
                format!("{TAG_SIZE}{}", 32 << 20),
            ],
        };
        assert!(is_kept_of(&k, "g2"));
        assert!(!is_kept_of(&k, "g1"));
        assert_eq!(usable(&k, &d), Ok(5));
        let mut replaced = d.clone();
        replaced.origin_uuid = "U2".into();
        assert!(usable(&k, &replaced).unwrap_err().contains("replaced"));
        let mut rechunked = d.clone();
        rechunked.chunk_bytes = 131072;
        assert!(usable(&k, &rechunked).unwrap_err().contains("block size"));
        let mut grown = d.clone();
        grown.bytes = 64 << 20;
        assert!(usable(&k, &grown).unwrap_err().contains("size"));
        let mut no_id = k.clone();
        no_id.thin_id = None;
        assert!(usable(&no_id, &d).is_err());
        // Not ours by name: never a kept snapshot, whatever its tags.
        let mut other = k.clone();
        other.name = "backup-g2".into();
        assert!(!is_kept_of(&other, "g2"));
    }
}
