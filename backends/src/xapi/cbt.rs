//! Changed-block tracking through XAPI's CBT, the route Xen Orchestra takes
//! (`@xen-orchestra/backups/_runners/_vmRunners/_AbstractXapi.mjs`: `VDI.enable_cbt` on
//! the VM's disks before the snapshot, and after the transfer `VM.destroy` of the
//! snapshot then `VDI.data_destroy` of its disks; `@xen-orchestra/xapi/vdi.mjs`
//! `listChangedBlock`: `VDI.list_changed_blocks(base, ref)`).
//!
//! How the storage keeps the map (xapi-project/sm `libs/sm/VDI.py`): every CBT-enabled
//! VDI has a log of the 64 KiB blocks written to it; a snapshot takes over the VDI's log
//! (the writes since the previous snapshot) and the VDI starts a new one, chained to it
//! (`_cbt_snapshot`); `list_changed_blocks(from, to)` joins the logs from `from`'s
//! successor to `to`; destroying a snapshot merges its log into its successor's
//! (`delete`); `data_destroy` deletes a snapshot's data and keeps its log, as a VDI of
//! type `cbt_metadata`.
//!
//! So, per disk of the original: CBT is enabled before each checkpoint; the checkpoint's
//! disk snapshot is this run's map (`xapi-cbt:<its uuid>`); once the backup is stored
//! the snapshot is kept as metadata only (renamed `coldclone-cbt-<run>-<disk>`, marked
//! with the original VDI's uuid) and the earlier ones are destroyed; the next checkpoint
//! asks for the blocks written between that snapshot and its own.
//!
//! The clone's own writes: a `VDI.clone` is not tracked (quicktest_cbt.ml
//! `vdi_clone_copy_test`), so CBT is enabled on the clone's VDI and a snapshot of it is
//! taken before the clone runs; once it is halted, `list_changed_blocks(that snapshot,
//! the clone's VDI)` is what it wrote.
//!
//! Anything that does not fit (CBT was off before this checkpoint, the previous map is
//! gone, the call fails, the VM's VDI was replaced: its `snapshots` do not hold the
//! map) leaves the map out, and the pipeline reads the disk whole.

use super::client::{self, refs, str_field, u64_field, Client, XapiError};
use super::XapiResource;
use crate::{ChangedRange, Journal, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// The other_config key of a kept metadata-only snapshot: the uuid of the VDI it is a
/// snapshot of.
pub const CBT_OF_KEY: &str = "coldclone_cbt_of";
/// The other_config key with the run that kept it (run ids sort by time).
pub const CBT_RUN_KEY: &str = "coldclone_cbt_run";
/// The prefix of a changed-block map's name in a snapshot's tags.
pub const MAP_PREFIX: &str = "xapi-cbt:";

/// The name a kept metadata-only snapshot gets.
pub fn metadata_label(run: &str, disk: &str) -> String {
    format!("coldclone-cbt-{run}-{disk}")
}

/// One disk of the original, before the checkpoint.
#[derive(Debug, Clone)]
pub(crate) struct Before {
    pub vdi_uuid: String,
    /// CBT was on before this run (not just enabled by it).
    pub was_enabled: bool,
    /// coldclone's metadata-only snapshots of this VDI: (run, ref, uuid), newest last.
    pub kept: Vec<(String, String, String)>,
}

/// One tracked disk of the checkpoint.
#[derive(Debug, Clone)]
pub(crate) struct Tracked {
    /// The checkpoint's snapshot of the disk (this run's map).
    pub vdi_ref: String,
    pub vdi_uuid: String,
    /// The original's VDI uuid.
    pub of_uuid: String,
    /// The journal entry of the snapshot (it goes with the checkpoint unless kept).
    pub journal_id: u64,
    /// The earlier maps of this disk (refs), removed once this one is kept.
    pub earlier: Vec<String>,
}

/// Turns CBT on for each disk of the original and finds coldclone's earlier maps.
/// A disk whose CBT cannot be turned on is left out (a warning): it is read whole.
pub(crate) fn prepare(c: &Client, disks: &[super::DiskVbd]) -> BTreeMap<String, Before> {
    let mut out = BTreeMap::new();
    for d in disks {
        let uuid = str_field(&d.vdi, "uuid");
        let was_enabled = d.vdi.get("cbt_enabled") == Some(&json!(true));
        if !was_enabled {
            // Idempotent; not on snapshots or non-user VDIs (xapi/xapi_vdi.ml
            // `check_operation_error`); needs the CBT licence feature.
            if let Err(e) = c.call("VDI.enable_cbt", vec![json!(d.vdi_ref)]) {
                tracing::warn!(
                    disk = d.name,
                    "VDI.enable_cbt: {e}; this disk is read whole at every backup"
                );
                continue;
            }
        }
        let kept = match kept_maps(c, &d.vdi, &uuid) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(disk = d.name, "cannot list the earlier maps: {e}");
                vec![]
            }
        };
        out.insert(
            d.name.clone(),
            Before {
                vdi_uuid: uuid,
                was_enabled,
                kept,
            },
        );
    }
    out
}

/// coldclone's metadata-only snapshots of a VDI, oldest first.
fn kept_maps(c: &Client, vdi: &Value, uuid: &str) -> Result<Vec<(String, String, String)>> {
    let mut out = vec![];
    for s in refs(vdi, "snapshots") {
        let rec = match c.record("VDI", &s) {
            Ok(r) => r,
            Err(XapiError::HandleInvalid { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        let oc = rec.get("other_config");
        let mark = |k: &str| oc.and_then(|o| o.get(k)).map(client::value_string);
        if str_field(&rec, "type") == "cbt_metadata" && mark(CBT_OF_KEY).as_deref() == Some(uuid) {
            out.push((
                mark(CBT_RUN_KEY).unwrap_or_default(),
                s,
                str_field(&rec, "uuid"),
            ));
        }
    }
    out.sort();
    Ok(out)
}

/// After the checkpoint: each tracked disk's map, and the original's writes since the
/// newest earlier map (when CBT ran all along).
pub(crate) fn after_checkpoint(
    c: &Client,
    before: &BTreeMap<String, Before>,
    ckpt_disks: &[super::DiskVbd],
    journal_ids: &BTreeMap<String, u64>,
) -> (
    BTreeMap<String, Tracked>,
    BTreeMap<String, crate::DiskChangeMaps>,
) {
    let mut tracked = BTreeMap::new();
    let mut maps = BTreeMap::new();
    for d in ckpt_disks {
        let (Some(b), Some(id)) = (before.get(&d.name), journal_ids.get(&d.name)) else {
            continue;
        };
        // sm FileSR.py `_snapshot`: the snapshot of a CBT-enabled VDI is CBT-enabled.
        if d.vdi.get("cbt_enabled") != Some(&json!(true)) {
            tracing::warn!(disk = d.name, "the checkpoint's snapshot is not tracked");
            continue;
        }
        let uuid = str_field(&d.vdi, "uuid");
        let size = u64_field(&d.vdi, "virtual_size");
        let mut since = BTreeMap::new();
        if let (true, Some((_, from, from_uuid))) = (b.was_enabled, b.kept.last()) {
            match c.changed_ranges(from, &d.vdi_ref, size) {
                Ok(r) => {
                    since.insert(format!("{MAP_PREFIX}{from_uuid}"), r);
                }
                Err(e) => tracing::warn!(
                    disk = d.name,
                    "VDI.list_changed_blocks: {e}; this disk is read whole"
                ),
            }
        }
        maps.insert(
            d.name.clone(),
            crate::DiskChangeMaps {
                started: format!("{MAP_PREFIX}{uuid}"),
                since,
                ..Default::default()
            },
        );
        tracked.insert(
            d.name.clone(),
            Tracked {
                vdi_ref: d.vdi_ref.clone(),
                vdi_uuid: uuid,
                of_uuid: b.vdi_uuid.clone(),
                journal_id: *id,
                earlier: b.kept.iter().map(|(_, r, _)| r.clone()).collect(),
            },
        );
    }
    (tracked, maps)
}

/// Keeps each tracked disk's snapshot as metadata only, for the next run: the
/// checkpoint VM goes first (`VDI.data_destroy` waits for the VDI's VBDs to go:
/// xapi/xapi_vdi.ml `destroy_and_data_destroy_common`), then each snapshot is marked,
/// its data destroyed, and only then taken out of the run's journal; the earlier maps
/// are destroyed last. A disk that fails keeps its journal entry: the clean-up removes
/// its snapshot, and the next run reads that disk whole.
pub(crate) fn keep(
    c: &Client,
    ckpt_vm: &str,
    run: &str,
    tracked: &BTreeMap<String, Tracked>,
    journal: &mut dyn Journal,
) -> Result<()> {
    if tracked.is_empty() {
        return Ok(());
    }
    super::destroy_vm_keep_vdis(c, ckpt_vm)?;
    let mut first_err = None;
    for (disk, t) in tracked {
        let r = (|| -> Result<()> {
            for (k, v) in [(CBT_OF_KEY, t.of_uuid.as_str()), (CBT_RUN_KEY, run)] {
                match c.call(
                    "VDI.add_to_other_config",
                    vec![json!(t.vdi_ref), json!(k), json!(v)],
                ) {
                    Ok(_) => {}
                    Err(e) if super::is_code(&e, "MAP_DUPLICATE_KEY") => {
                        c.call(
                            "VDI.remove_from_other_config",
                            vec![json!(t.vdi_ref), json!(k)],
                        )?;
                        c.call(
                            "VDI.add_to_other_config",
                            vec![json!(t.vdi_ref), json!(k), json!(v)],
                        )?;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            c.call(
                "VDI.set_name_label",
                vec![json!(t.vdi_ref), json!(metadata_label(run, disk))],
            )?;
            c.call_async(
                "VDI.data_destroy",
                vec![json!(t.vdi_ref)],
                std::time::Duration::from_secs(600),
            )?;
            Ok(())
        })();
        match r {
            Ok(()) => {
                journal.removed(t.journal_id)?;
                for e in &t.earlier {
                    if let Err(x) = super::destroy_vdi(c, e) {
                        tracing::warn!(disk, "could not remove an earlier map: {x}");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(disk, "the changed-block map is not kept: {e}");
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Tracks a clone VDI's own writes: CBT on, then a snapshot to compare with after the
/// clone halts, journaled first (by its name, and by the clone source's mark that it
/// inherits with other_config). Returns (snapshot ref, journal id).
/// `mark` is (the SR's uuid, the clone source's uuid).
pub(crate) fn track_clone_vdi(
    c: &Client,
    target: &client::XapiTarget,
    vdi: &str,
    name: &str,
    mark: (&str, &str),
    task_timeout: std::time::Duration,
    journal: &mut dyn Journal,
) -> Result<(String, u64)> {
    c.call("VDI.enable_cbt", vec![json!(vdi)])?;
    let id = journal.will_create(
        &XapiResource::XapiVdi {
            target: target.clone(),
            name_label: Some(name.to_string()),
            uuid: None,
            sr_uuid: Some(mark.0.to_string()),
            source_uuid: Some(mark.1.to_string()),
        }
        .into(),
    )?;
    let snap = c.call_async("VDI.snapshot", vec![json!(vdi), json!({})], task_timeout)?;
    c.call("VDI.set_name_label", vec![json!(snap), json!(name)])?;
    Ok((snap, id))
}

/// What the halted clone wrote to a tracked VDI.
pub(crate) fn clone_writes(
    c: &Client,
    base: &str,
    vdi: &str,
    size: u64,
) -> Result<Vec<ChangedRange>> {
    Ok(c.changed_ranges(base, vdi, size)?)
}
