//! Changed-block tracking on the original: a dirty bitmap `coldclone-<run>` on each
//! disk's image node, started in the checkpoint's own transaction, so it holds every
//! write the original makes after that instant, including those that reach the image
//! later through the overlay's merge-back (block-commit writes through the image node,
//! which marks its bitmaps: checked in tests/qemu_incremental.rs).
//!
//! At the next checkpoint the previous run's bitmap is disabled in the same transaction
//! (the image takes no writes while the original runs on its new overlay), read over a
//! read-only NBD export of the image node with QEMU's `qemu:dirty-bitmap:` meta context,
//! and enabled again before anything can commit into the image. A bitmap that is not
//! recording, is marked inconsistent (QEMU died holding it), or is missing (VM restarted
//! on a raw image, bitmap removed, image replaced) yields no map: a full read.

use super::qmp::Qmp;
use super::QemuResource;
use crate::util::{self, run_tool};
use crate::{BackendError, ChangedRange, Journal, Result};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// Bytes per bitmap bit: the repository's default chunk size (a finer bit saves no
/// read, the repository reads whole chunks; QEMU's default, the 64 KiB cluster, reads
/// 4x more for scattered 4 KiB writes: measured in benches/incremental.rs). The bitmap
/// costs 8 MiB of the original's RAM per TiB of disk.
const GRANULARITY: u64 = 16 << 10;

/// The prefix of coldclone's bitmaps; no other bitmap is ever touched.
pub(crate) const PREFIX: &str = "coldclone-";

#[derive(Debug, Clone, Deserialize)]
struct BitmapInfo {
    name: String,
    #[serde(default)]
    recording: bool,
    #[serde(default)]
    inconsistent: bool,
    #[serde(default)]
    busy: bool,
}

/// One disk's bitmaps at a checkpoint.
#[derive(Debug, Clone, Default)]
pub(crate) struct DiskBitmaps {
    /// The image node the bitmaps live on.
    pub node: String,
    /// The bitmap this checkpoint starts.
    pub started: String,
    pub started_journal_id: u64,
    /// coldclone's earlier bitmaps that can be read (recording, consistent).
    pub readable: Vec<String>,
    /// Their `DirtyBitmapDisabled` journal entries, in the same order.
    pub disabled_ids: Vec<u64>,
}

fn bitmaps_on(q: &mut Qmp, node: &str) -> Result<Vec<BitmapInfo>> {
    let nodes = q.execute("query-named-block-nodes", json!({"flat": true}))?;
    let Some(entry) = nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n.get("node-name").and_then(Value::as_str) == Some(node))
    else {
        return Ok(Vec::new());
    };
    let list = entry
        .get("dirty-bitmaps")
        .cloned()
        .unwrap_or(Value::Array(vec![]));
    serde_json::from_value::<Vec<BitmapInfo>>(list).map_err(|e| {
        BackendError::Checkpoint(format!(
            "QEMU's dirty-bitmaps of node {node} are unreadable: {e}"
        ))
    })
}

/// Whether a node's image can hold persistent bitmaps (qcow2 v3).
fn can_persist(q: &mut Qmp, node: &str) -> Result<bool> {
    let nodes = q.execute("query-named-block-nodes", json!({"flat": true}))?;
    Ok(nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n.get("node-name").and_then(Value::as_str) == Some(node))
        .and_then(|n| n.pointer("/image/format-specific"))
        .is_some_and(|f| {
            f.get("type").and_then(Value::as_str) == Some("qcow2")
                && f.pointer("/data/compat").and_then(Value::as_str) == Some("1.1")
        }))
}

/// Plans one disk's bitmaps and journals what the transaction will change; returns the
/// plan and the transaction's actions for it.
pub(crate) fn plan(
    q: &mut Qmp,
    qmp: &Path,
    original_pid: u32,
    node: &str,
    run_tag: &str,
    journal: &mut dyn Journal,
) -> Result<(DiskBitmaps, Vec<Value>)> {
    let existing: Vec<BitmapInfo> = bitmaps_on(q, node)?
        .into_iter()
        .filter(|b| b.name.starts_with(PREFIX))
        .collect();
    let persistent = can_persist(q, node)?;
    let started = format!("{PREFIX}{run_tag}");
    let mut plan = DiskBitmaps {
        node: node.to_string(),
        started: started.clone(),
        ..Default::default()
    };
    // Run ids start with the time in fixed-width hex: the greatest name is the newest.
    // Only the newest can be the parent's (a stored run's bitmap outlives the one
    // before it by one run); older ones are removed now, while the image is writable.
    let newest = existing
        .iter()
        .filter(|b| b.recording && !b.inconsistent && !b.busy)
        .map(|b| b.name.clone())
        .max();
    for b in existing {
        if Some(&b.name) == newest.as_ref() {
            plan.readable.push(b.name);
        } else if let Err(e) = q.execute(
            "block-dirty-bitmap-remove",
            json!({"node": node, "name": b.name}),
        ) {
            // Never read again either way; a leftover costs a few bytes in the image.
            tracing::warn!(node, bitmap = b.name, "could not remove an old bitmap: {e}");
        }
    }
    plan.started_journal_id = journal.will_create(
        &QemuResource::DirtyBitmap {
            qmp: qmp.to_path_buf(),
            original_pid,
            node: node.to_string(),
            name: started.clone(),
        }
        .into(),
    )?;
    let mut actions = vec![json!({"type": "block-dirty-bitmap-add", "data": {
        "node": node, "name": started, "persistent": persistent,
        "granularity": GRANULARITY}})];
    for name in &plan.readable {
        let id = journal.will_create(
            &QemuResource::DirtyBitmapDisabled {
                qmp: qmp.to_path_buf(),
                original_pid,
                node: node.to_string(),
                name: name.clone(),
            }
            .into(),
        )?;
        plan.disabled_ids.push(id);
        actions.push(json!({"type": "block-dirty-bitmap-disable", "data": {
            "node": node, "name": name}}));
    }
    Ok((plan, actions))
}

/// After the checkpoint: reads each readable bitmap's dirty ranges over NBD, enables it
/// again. A failure to read is a warning (no map: a full
/// read); a failure to enable again is an error (the journal still holds it).
pub(crate) fn read_and_reenable(
    q: &mut Qmp,
    qmp: &Path,
    original_pid: u32,
    plans: &[DiskBitmaps],
    work_dir: &Path,
    journal: &mut dyn Journal,
) -> Result<BTreeMap<String, BTreeMap<String, Vec<ChangedRange>>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<ChangedRange>>> = BTreeMap::new();
    let any = plans.iter().any(|p| !p.readable.is_empty());
    if any {
        match read_all(q, qmp, original_pid, plans, work_dir, journal) {
            Ok(m) => out = m,
            Err(e) => tracing::warn!(
                "could not read the original's dirty bitmaps ({e}); every disk is read whole"
            ),
        }
    }
    reenable(q, plans, journal)?;
    Ok(out)
}

/// Enables every bitmap the transaction disabled, before anything can commit into the
/// image again.
pub(crate) fn reenable(
    q: &mut Qmp,
    plans: &[DiskBitmaps],
    journal: &mut dyn Journal,
) -> Result<()> {
    let mut first_err = None;
    for p in plans {
        for (name, id) in p.readable.iter().zip(&p.disabled_ids) {
            match q.execute(
                "block-dirty-bitmap-enable",
                json!({"node": p.node, "name": name}),
            ) {
                Ok(_) => journal.removed(*id)?,
                Err(e) => {
                    tracing::error!(
                        node = p.node,
                        bitmap = name,
                        "could not enable the bitmap again: {e}"
                    );
                    first_err.get_or_insert(e);
                }
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn read_all(
    q: &mut Qmp,
    qmp: &Path,
    original_pid: u32,
    plans: &[DiskBitmaps],
    work_dir: &Path,
    journal: &mut dyn Journal,
) -> Result<BTreeMap<String, BTreeMap<String, Vec<ChangedRange>>>> {
    let socket = work_dir.join("bitmaps.nbd");
    let id = journal.will_create(
        &QemuResource::OriginalNbdServer {
            qmp: qmp.to_path_buf(),
            original_pid,
            socket: socket.clone(),
        }
        .into(),
    )?;
    q.execute(
        "nbd-server-start",
        json!({"addr": {"type": "unix", "data": {"path": socket}}}),
    )?;
    let result = (|| {
        let mut out = BTreeMap::new();
        for (i, p) in plans.iter().enumerate() {
            if p.readable.is_empty() {
                continue;
            }
            let export = format!("cc-bitmaps-{i}");
            q.execute(
                "block-export-add",
                json!({"type": "nbd", "id": export, "node-name": p.node, "name": export,
                       "writable": false, "bitmaps": p.readable}),
            )?;
            let mut per = BTreeMap::new();
            let read = (|| {
                for name in &p.readable {
                    per.insert(name.clone(), dirty_ranges(&socket, &export, name)?);
                }
                Ok::<(), BackendError>(())
            })();
            let del = q.execute("block-export-del", json!({"id": export}));
            read?;
            del?;
            out.insert(p.node.clone(), per);
        }
        Ok::<_, BackendError>(out)
    })();
    let stopped = q.execute("nbd-server-stop", json!({}));
    let _ = util::remove_file_if_exists(&socket);
    let out = result?;
    stopped?;
    journal.removed(id)?;
    Ok(out)
}

/// One bitmap's dirty ranges: `qemu-img map` over the export with `x-dirty-bitmap`
/// reports dirty extents as `"data": false` (QEMU block/nbd.c maps the bitmap's dirty
/// flag onto NBD_STATE_HOLE).
fn dirty_ranges(socket: &Path, export: &str, bitmap: &str) -> Result<Vec<ChangedRange>> {
    let quote = |s: &str| s.replace(',', ",,");
    let mut c = Command::new("qemu-img");
    c.args(["map", "--output=json", "--image-opts"])
        .arg(format!(
        "driver=nbd,server.type=unix,server.path={},export={},x-dirty-bitmap=qemu:dirty-bitmap:{}",
        quote(&socket.to_string_lossy()),
        quote(export),
        quote(bitmap)
    ));
    let out = run_tool(c)?;
    let ranges = map_ranges(&out, |e| !e.data)?;
    Ok(ranges)
}

#[derive(Debug, Deserialize)]
struct MapEntry {
    start: u64,
    length: u64,
    #[serde(default)]
    depth: u64,
    #[serde(default)]
    present: bool,
    #[serde(default)]
    data: bool,
}

/// The extents of `qemu-img map --output=json` that `keep` selects, coalesced.
fn map_ranges(json_text: &str, keep: impl Fn(&MapEntry) -> bool) -> Result<Vec<ChangedRange>> {
    let entries: Vec<MapEntry> = serde_json::from_str(json_text).map_err(|e| {
        BackendError::Checkpoint(format!("qemu-img map printed what is not its JSON: {e}"))
    })?;
    let mut out: Vec<ChangedRange> = Vec::new();
    for e in entries.iter().filter(|e| keep(e)) {
        let end = e
            .start
            .checked_add(e.length)
            .ok_or_else(|| BackendError::Checkpoint("qemu-img map: an extent past 2^64".into()))?;
        match out.last_mut() {
            Some(last) if last.end >= e.start => last.end = last.end.max(end),
            _ => out.push(e.start..end),
        }
    }
    Ok(out)
}

/// What a stopped clone wrote: the extents allocated in its own overlay (depth 0),
/// data and zeroes alike.
pub(crate) fn clone_writes(overlay: &Path) -> Result<Vec<ChangedRange>> {
    let mut c = Command::new("qemu-img");
    c.args(["map", "--output=json", "-f", "qcow2"]).arg(overlay);
    let out = run_tool(c)?;
    map_ranges(&out, |e| e.depth == 0 && e.present)
}

/// Undo of [`QemuResource::DirtyBitmap`] and [`QemuResource::DirtyBitmapDisabled`]:
/// removes one of coldclone's bitmaps from the original, if it is still there.
pub(crate) fn remove(q: &mut Qmp, node: &str, name: &str) -> Result<()> {
    if !name.starts_with(PREFIX) {
        return Err(BackendError::Unsupported(format!(
            "recover refuses: bitmap {name:?} is not coldclone's"
        )));
    }
    if !bitmaps_on(q, node)?.iter().any(|b| b.name == name) {
        return Ok(());
    }
    q.execute(
        "block-dirty-bitmap-remove",
        json!({"node": node, "name": name}),
    )
    .map(|_| ())
}

/// Undo of [`QemuResource::OriginalNbdServer`]: our socket file exists only if our
/// `nbd-server-start` succeeded (QEMU refuses a second server), so the server behind
/// it is ours to stop.
pub(crate) fn undo_nbd_server(q: &mut Qmp, socket: &Path) -> Result<()> {
    if socket.exists() {
        let exports = q.execute("query-block-exports", json!({}))?;
        for id in exports
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e.get("id").and_then(Value::as_str))
            .filter(|id| id.starts_with("cc-bitmaps-"))
        {
            q.execute("block-export-del", json!({"id": id, "mode": "hard"}))?;
        }
        q.execute("nbd-server-stop", json!({}))?;
        util::remove_file_if_exists(socket)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_output_is_coalesced_and_filtered() {
        let j = r#"[{ "start": 0, "length": 4096, "depth": 0, "present": true, "zero": false, "data": true},
            { "start": 4096, "length": 4096, "depth": 0, "present": true, "zero": true, "data": false},
            { "start": 8192, "length": 8192, "depth": 1, "present": true, "zero": false, "data": true},
            { "start": 16384, "length": 4096, "depth": 0, "present": true, "zero": false, "data": true}]"#;
        assert_eq!(
            map_ranges(j, |e| e.depth == 0 && e.present).unwrap(),
            vec![0..8192, 16384..20480]
        );
        assert_eq!(map_ranges(j, |e| !e.data).unwrap(), vec![4096..8192]);
        assert!(map_ranges("not json", |_| true).is_err());
        let overflow = r#"[{"start": 18446744073709551615, "length": 2, "depth": 0, "present": true, "data": true}]"#;
        assert!(map_ranges(overflow, |_| true).is_err());
    }
}
