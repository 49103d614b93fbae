//! forget by policy, then garbage-collect data no snapshot uses.
//!
//! Safety: prune holds the exclusive lock, so no backup, restore or check runs meanwhile
//! (see lock.rs). Order of writes, each step leaving a valid repository if interrupted:
//! 1. delete the snapshot files the policy drops;
//! 2. copy the still-used blobs of mostly-unused packs into new packs (+ their index);
//! 3. write one index listing every pack that stays;
//! 4. delete the old index files;
//! 5. delete packs no index lists any more (the dropped ones, and unindexed packs left by
//!    killed backups).
//!
//! Young packs (written less than the grace period ago, 1 h, on the storage's clock) are
//! never dropped, repacked or deleted, indexed or not: a backup whose lock this prune could
//! not see as live (a holder whose refreshes did not arrive) may have written them and
//! be about to commit a snapshot that uses them. While prune holds its exclusive lock no
//! other lock is live, so "newer than the oldest live lock" is covered by the grace.

use crate::backup::Packer;
use crate::crypto::Id;
use crate::error::{RepoError, Result};
use crate::pack::{decode_index, pack_key, PackDesc, INDEX_KIND};
use crate::util::{civil_from_days, id_from_hex, IdSet};
use crate::{Repository, Snapshot};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Temporary upload files younger than this are left alone.
pub(crate) const ORPHAN_GRACE_SECS: i64 = 3600;

static PACK_GRACE: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(3600);

/// Set the age (seconds) below which prune leaves packs alone: for tests that prune data
/// they have just written only. The default is one hour.
#[doc(hidden)]
pub fn set_prune_grace_for_tests(secs: i64) {
    PACK_GRACE.store(secs.max(0), std::sync::atomic::Ordering::Relaxed);
}

fn pack_grace() -> i64 {
    PACK_GRACE.load(std::sync::atomic::Ordering::Relaxed)
}
/// Repack a pack when at least this share of its bytes is unused.
const REPACK_UNUSED_SHARE: f64 = 0.3;

/// How many snapshots to keep, per vm+disk. All zero = keep everything.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Keep {
    #[serde(default)]
    pub last: u32,
    #[serde(default)]
    pub daily: u32,
    #[serde(default)]
    pub weekly: u32,
    #[serde(default)]
    pub monthly: u32,
    #[serde(default)]
    pub yearly: u32,
}

impl Keep {
    pub fn keeps_all(&self) -> bool {
        self.last == 0
            && self.daily == 0
            && self.weekly == 0
            && self.monthly == 0
            && self.yearly == 0
    }
}

/// A default `Keep` and overrides per VM name.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub default: Keep,
    #[serde(default)]
    pub per_vm: BTreeMap<String, Keep>,
}

/// A snapshot named in a report.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotRef {
    pub id: String,
    pub vm: String,
    pub disk: String,
    pub time: String,
}

impl From<&Snapshot> for SnapshotRef {
    fn from(s: &Snapshot) -> Self {
        SnapshotRef {
            id: s.id.clone(),
            vm: s.vm.clone(),
            disk: s.disk.clone(),
            time: s.time.clone(),
        }
    }
}

/// What prune did (or, with `dry_run`, would do).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub kept: Vec<SnapshotRef>,
    pub removed: Vec<SnapshotRef>,
    pub packs_deleted: u64,
    pub packs_repacked: u64,
    pub packs_written: u64,
    pub unindexed_packs_deleted: u64,
    /// Bytes of storage freed (deleted packs minus new packs).
    pub bytes_freed: u64,
    pub bytes_repacked: u64,
}

/// Which snapshots the policy keeps (ids). Each disk of each VM of each host is a group of
/// its own: two hosts' VMs of the same name never share a retention. Within a group
/// "newest" is by sequence number (`Snapshot::order_key`); the calendar rules keep the
/// newest snapshot of each day, week, month or year, even when the wall clock went back
/// and the days do not come in order.
pub(crate) fn select_kept(snaps: &[Snapshot], policy: &RetentionPolicy) -> IdStrSet {
    // A host is its uuid; snapshots written before host uuids, its name.
    type Group<'a> = ((bool, &'a str), &'a str, &'a str);
    let mut groups: BTreeMap<Group, Vec<&Snapshot>> = BTreeMap::new();
    for s in snaps {
        groups
            .entry((s.host_key(), &s.vm, &s.disk))
            .or_default()
            .push(s);
    }
    let mut keep = IdStrSet::new();
    for ((_, vm, _), mut g) in groups {
        let k = policy.per_vm.get(vm).unwrap_or(&policy.default);
        if k.keeps_all() {
            keep.extend(g.iter().map(|s| s.id.clone()));
            continue;
        }
        g.sort_by(|a, b| b.order_key().cmp(&a.order_key())); // newest first
        let day = |s: &Snapshot| s.time_unix.div_euclid(86_400);
        let rules: [(u32, Bucket); 5] = [
            (k.last, Box::new(|i, _| i as i64)),
            (k.daily, Box::new(move |_, s| day(s))),
            // Weeks start on Monday; 1970-01-01 was a Thursday.
            (k.weekly, Box::new(move |_, s| (day(s) + 3).div_euclid(7))),
            (
                k.monthly,
                Box::new(move |_, s| {
                    let (y, m, _) = civil_from_days(day(s));
                    y * 12 + m as i64
                }),
            ),
            (k.yearly, Box::new(move |_, s| civil_from_days(day(s)).0)),
        ];
        for (n, bucket) in rules.iter() {
            let mut seen = std::collections::BTreeSet::new();
            for (i, s) in g.iter().enumerate() {
                if seen.len() >= *n as usize {
                    break;
                }
                if seen.insert(bucket(i, s)) {
                    keep.insert(s.id.clone());
                }
            }
        }
    }
    keep
}

pub(crate) type IdStrSet = std::collections::BTreeSet<String>;
type Bucket = Box<dyn Fn(usize, &Snapshot) -> i64>;

pub(crate) fn prune(
    repo: &Repository,
    policy: &RetentionPolicy,
    dry_run: bool,
) -> Result<PruneReport> {
    let lock = repo.lock(true, "prune")?;
    let be = &repo.backend;
    let mut rep = PruneReport {
        dry_run,
        ..Default::default()
    };
    let snaps = repo.snapshots_strict().map_err(|e| {
        RepoError::Aborted(format!(
            "prune stopped before deleting anything: a snapshot cannot be read ({e}); run `coldclone check`, then `coldclone forget` the damaged snapshot"
        ))
    })?;
    let keep = select_kept(&snaps, policy);
    let (kept, removed): (Vec<&Snapshot>, Vec<&Snapshot>) =
        snaps.iter().partition(|s| keep.contains(&s.id));
    rep.kept = kept.iter().map(|s| SnapshotRef::from(*s)).collect();
    rep.removed = removed.iter().map(|s| SnapshotRef::from(*s)).collect();

    // Used blobs: of the snapshots that stay. Any unreadable one stops the prune.
    let index = repo.load_index()?;
    let mut used = IdSet::default();
    // A map blob met before (a hole segment, or a segment shared with another snapshot)
    // has its chunks in `used` already: it is not read again.
    let mut known: crate::util::IdMap<u64> = crate::util::IdMap::default();
    for s in &kept {
        for m in &s.map {
            used.insert(
                id_from_hex(m).ok_or_else(|| {
                    RepoError::corrupt(format!("snapshots/{}", s.id), "bad map id")
                })?,
            );
        }
        repo.visit_map(s, &index, &mut known, |_, ids| {
            used.extend(ids.iter().filter(|c| **c != crate::ZERO_ID));
            Ok(true)
        })
        .map_err(|e| {
            RepoError::Aborted(format!(
                "prune stopped, nothing deleted from the data: snapshot {} cannot be read ({e}); run `coldclone check`",
                s.short_id()
            ))
        })?;
    }

    // The index files as they are (with duplicates), to see each pack's content.
    let mut packs: Vec<PackDesc> = Vec::new();
    let mut seen_packs = IdSet::default();
    for f in &index.files {
        let sealed = be.get(f)?;
        let plain = repo.open_file(INDEX_KIND, f, &sealed)?;
        for p in decode_index(&plain, f)? {
            if seen_packs.insert(p.id) {
                packs.push(p);
            }
        }
    }
    // Packs of damaged index files, from their headers.
    for p in &index.recovered {
        if seen_packs.insert(p.id) {
            packs.push(p.clone());
        }
    }
    let stored = be.list("data")?;
    // Pack ages on the storage's clock (the packs' times are the storage's), not ours.
    let now = lock.storage_now();
    let grace = pack_grace();
    // Young packs: left as they are (see the module's notes). mtime 0 = unknown: young.
    let young: IdSet = stored
        .iter()
        .filter(|o| o.mtime == 0 || now - o.mtime < grace)
        .filter_map(|o| id_from_hex(o.key.rsplit('/').next()?))
        .collect();

    // Classify packs. One copy of each used blob is kept.
    let mut have = IdSet::default();
    let mut keep_packs: Vec<&PackDesc> = Vec::new();
    let mut repack: Vec<(&PackDesc, Vec<usize>)> = Vec::new();
    let mut drop_packs: Vec<Id> = Vec::new();
    // Packs with most used bytes first, so that they are the ones kept.
    let mut order: Vec<(u64, usize)> = packs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                p.blobs
                    .iter()
                    .filter(|b| used.contains(&b.id))
                    .map(|b| b.stored_len as u64)
                    .sum(),
                i,
            )
        })
        .collect();
    order.sort_by(|a, b| b.cmp(a));
    for (_, i) in order {
        let p = &packs[i];
        if young.contains(&p.id) {
            have.extend(p.blobs.iter().map(|b| b.id));
            keep_packs.push(p);
            continue;
        }
        let mut needed = Vec::new();
        let mut used_bytes = 0u64;
        for (k, b) in p.blobs.iter().enumerate() {
            if used.contains(&b.id) && have.insert(b.id) {
                needed.push(k);
                used_bytes += b.stored_len as u64;
            }
        }
        let total: u64 = p
            .blobs
            .iter()
            .map(|b| b.stored_len as u64)
            .sum::<u64>()
            .max(1);
        if needed.is_empty() {
            drop_packs.push(p.id);
        } else if (total - used_bytes) as f64 / total as f64 >= REPACK_UNUSED_SHARE {
            repack.push((p, needed));
        } else {
            keep_packs.push(p);
        }
    }
    let indexed: IdSet = packs.iter().map(|p| p.id).collect();
    let sizes: crate::util::IdMap<u64> = packs.iter().map(|p| (p.id, p.size)).collect();
    let orphans: Vec<(Id, u64)> = stored
        .iter()
        .filter_map(|o| Some((id_from_hex(o.key.rsplit('/').next()?)?, o.size, o.mtime)))
        .filter(|(id, _, _)| !indexed.contains(id) && !young.contains(id))
        .map(|(id, size, _)| (id, size))
        .collect();

    rep.packs_deleted = drop_packs.len() as u64;
    rep.packs_repacked = repack.len() as u64;
    rep.unindexed_packs_deleted = orphans.len() as u64;
    let freed: u64 = drop_packs
        .iter()
        .chain(repack.iter().map(|(p, _)| &p.id))
        .map(|id| sizes.get(id).copied().unwrap_or(0))
        .sum::<u64>()
        + orphans.iter().map(|o| o.1).sum::<u64>();
    rep.bytes_repacked = repack
        .iter()
        .map(|(p, n)| n.iter().map(|&k| p.blobs[k].stored_len as u64).sum::<u64>())
        .sum();
    if dry_run {
        rep.bytes_freed = freed.saturating_sub(rep.bytes_repacked);
        return Ok(rep);
    }

    // 1. snapshots
    for s in &removed {
        be.delete(&format!("snapshots/{}", s.id))?;
    }
    // 2. repack
    let packer = Packer::new(repo);
    for (p, needed) in &repack {
        let key = pack_key(&p.id);
        let data = be.get(&key)?;
        if *blake3::hash(&data).as_bytes() != p.id {
            return Err(RepoError::corrupt(&key, "pack content does not match its name; prune stopped before deleting anything; run `coldclone check --read-data`"));
        }
        for &k in needed {
            let b = &p.blobs[k];
            let (a, z) = (b.offset as usize, (b.offset + b.stored_len) as usize);
            let sealed = data
                .get(a..z)
                .ok_or_else(|| RepoError::corrupt(&key, "blob beyond the end of the pack"))?;
            // Blobs are sealed on their own: they move without re-encryption.
            packer.add(b.id, b.kind, b.flags, sealed, b.raw_len)?;
        }
    }
    packer.flush()?;
    rep.packs_written = packer
        .packs_written
        .load(std::sync::atomic::Ordering::Relaxed);
    let written = packer
        .stored_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    lock.check_fresh()?;
    // 3. one index for the packs that stay whole
    if !keep_packs.is_empty() {
        let kp: Vec<PackDesc> = keep_packs.iter().map(|p| (*p).clone()).collect();
        repo.save_index(&kp)?;
    }
    // 4. old index files (the damaged ones too: the packs they listed that are still
    //    readable are in the index written in 3)
    for f in index.files.iter().chain(index.damaged.iter().map(|d| &d.0)) {
        be.delete(f)?;
    }
    // 5. packs
    for id in drop_packs
        .iter()
        .chain(repack.iter().map(|(p, _)| &p.id))
        .chain(orphans.iter().map(|o| &o.0))
    {
        be.delete(&pack_key(id))?;
    }
    be.cleanup_tmp(ORPHAN_GRACE_SECS);
    rep.bytes_freed = freed.saturating_sub(written);
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, vm: &str, t: i64) -> Snapshot {
        Snapshot {
            id: id.into(),
            time: crate::util::rfc3339(t),
            time_unix: t,
            vm: vm.into(),
            disk: "d".into(),
            backend: String::new(),
            host: String::new(),
            host_uuid: String::new(),
            consistency: String::new(),
            tags: Default::default(),
            vm_config: None,
            size: 0,
            chunk_size: 4096,
            parent: None,
            bytes_read: 0,
            stored_bytes: 0,
            seq: 0,
            map: vec![],
        }
    }

    #[test]
    fn retention_buckets() {
        let day = 86_400;
        let base = 1_795_000_000 - 1_795_000_000 % day; // midnight
                                                        // Two snapshots a day for 40 days.
        let mut v = Vec::new();
        for d in 0..40 {
            v.push(snap(&format!("a{d:02}m"), "vm", base + d * day + 3600));
            v.push(snap(&format!("a{d:02}e"), "vm", base + d * day + 20 * 3600));
        }
        v.push(snap("other", "vm2", base));
        let p = RetentionPolicy {
            default: Keep {
                last: 3,
                daily: 7,
                ..Default::default()
            },
            per_vm: BTreeMap::new(),
        };
        let k = select_kept(&v, &p);
        // last 3: a39e a39m a38e; daily 7: the evening one of days 33..39.
        let mut want: Vec<String> = (33..40).map(|d| format!("a{d:02}e")).collect();
        want.push("a39m".into());
        want.push("other".into()); // vm2: a group of its own, default policy keeps it (newest)
        want.sort();
        assert_eq!(k.into_iter().collect::<Vec<_>>(), want);

        // Monthly + per-VM override that keeps all.
        let mut p2 = RetentionPolicy {
            default: Keep {
                monthly: 2,
                ..Default::default()
            },
            per_vm: BTreeMap::new(),
        };
        let k2 = select_kept(&v, &p2);
        assert_eq!(k2.len(), 3, "{k2:?}"); // two months for vm, one for vm2
        p2.per_vm.insert("vm".into(), Keep::default());
        assert_eq!(select_kept(&v, &p2).len(), 81);
    }
}
