//! check: is every snapshot restorable? Structure always; with `read_data`, every byte.

use crate::crypto::Id;
use crate::error::Result;
use crate::pack::{open_blob, pack_key, parse_pack_header, BlobEntry};
use crate::util::{to_hex, IdMap, IdSet};
use crate::{Repository, ZERO_ID};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A snapshot that cannot be restored whole.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DamagedSnapshot {
    pub snapshot_id: String,
    pub vm: String,
    pub disk: String,
    pub time: String,
    /// Chunks whose data is missing or damaged.
    pub damaged_chunks: u64,
    /// Disk bytes those chunks cover.
    pub damaged_bytes: u64,
    /// The chunk list itself is unreadable: nothing of the snapshot can be restored.
    pub map_unreadable: bool,
}

/// Result of `check`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CheckReport {
    /// No errors: every snapshot restorable (as far as checked).
    pub ok: bool,
    pub read_data: bool,
    pub snapshots: u64,
    pub packs: u64,
    pub blobs: u64,
    /// Bytes read from packs (`read_data` only).
    pub bytes_read: u64,
    /// Packs no index lists (left by interrupted backups; prune removes them).
    pub unindexed_packs: u64,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    pub damaged_snapshots: Vec<DamagedSnapshot>,
}

pub(crate) fn check(repo: &Repository, read_data: bool) -> Result<CheckReport> {
    let _lock = repo.lock_for_reading("check")?;
    let mut rep = CheckReport {
        read_data,
        ..Default::default()
    };
    let be = &repo.backend;

    // Indexes: a damaged one is reported, and the packs it listed read from their headers.
    let index = repo.load_index()?;
    for (f, e) in &index.damaged {
        rep.errors.push(format!(
            "index file {f}: {e}; run `coldclone repair-index` to rebuild the index from the packs"
        ));
    }
    rep.packs = index.packs.len() as u64;
    rep.blobs = index.blobs.len() as u64;

    // Blobs of each pack.
    let mut per_pack: Vec<Vec<BlobEntry>> = vec![Vec::new(); index.packs.len()];
    for (id, l) in &index.blobs {
        per_pack[l.pack as usize].push(BlobEntry {
            id: *id,
            kind: l.kind,
            flags: l.flags,
            offset: l.offset,
            stored_len: l.stored_len,
            raw_len: l.raw_len,
        });
    }

    // Packs present in storage.
    let stored: IdMap<u64> = be
        .list("data")?
        .into_iter()
        .filter_map(|o| {
            let name = o.key.rsplit('/').next()?;
            Some((crate::util::id_from_hex(name)?, o.size))
        })
        .collect();
    let mut bad: IdSet = IdSet::default();
    let mut ok_packs = Vec::new();
    for (i, (pid, size)) in index.packs.iter().enumerate() {
        match stored.get(pid) {
            None => {
                rep.errors.push(format!(
                    "pack {} is listed in the index but missing from storage",
                    pack_key(pid)
                ));
                bad.extend(per_pack[i].iter().map(|b| b.id));
            }
            Some(s) if s != size => {
                rep.errors.push(format!(
                    "pack {} has {s} bytes, the index says {size}",
                    pack_key(pid)
                ));
                bad.extend(per_pack[i].iter().map(|b| b.id));
            }
            Some(_) => ok_packs.push(i),
        }
    }
    let indexed: IdSet = index.packs.iter().map(|p| p.0).collect();
    rep.unindexed_packs = stored.keys().filter(|k| !indexed.contains(*k)).count() as u64;
    if rep.unindexed_packs > 0 {
        rep.warnings.push(format!(
            "{} packs are in no index (left by interrupted backups or prunes); `prune` removes them",
            rep.unindexed_packs
        ));
    }

    if read_data {
        let jobs = Mutex::new(ok_packs.into_iter());
        let found: Mutex<(Vec<String>, IdSet)> = Mutex::new((Vec::new(), IdSet::default()));
        let bytes = AtomicU64::new(0);
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(1, 8);
        std::thread::scope(|s| {
            for _ in 0..threads.max(be.parallel_requests()) {
                s.spawn(|| loop {
                    let Some(i) = jobs.lock().ok().and_then(|mut j| j.next()) else {
                        return;
                    };
                    let (pid, _) = index.packs[i];
                    let key = pack_key(&pid);
                    let mut errs = Vec::new();
                    let mut badl = Vec::new();
                    match be.get(&key) {
                        Err(e) => {
                            errs.push(format!("pack {key}: {e}"));
                            badl.extend(per_pack[i].iter().map(|b| b.id));
                        }
                        Ok(data) => {
                            bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                            if *blake3::hash(&data).as_bytes() != pid {
                                errs.push(format!(
                                    "pack {key}: content does not match its name (damaged)"
                                ));
                            }
                            match parse_pack_header(&repo.key, &key, &data) {
                                Err(e) => errs.push(format!("{e}")),
                                Ok(hdr) => {
                                    let listed: std::collections::HashSet<(Id, u32, u32)> = hdr
                                        .iter()
                                        .map(|h| (h.id, h.offset, h.stored_len))
                                        .collect();
                                    if per_pack[i]
                                        .iter()
                                        .any(|b| !listed.contains(&(b.id, b.offset, b.stored_len)))
                                    {
                                        errs.push(format!(
                                            "pack {key}: its header and the index disagree"
                                        ));
                                    }
                                }
                            }
                            for b in &per_pack[i] {
                                let (a, z) =
                                    (b.offset as usize, b.offset as usize + b.stored_len as usize);
                                let r = match data.get(a..z) {
                                    Some(sl) => open_blob(&repo.key, b, sl, &key).map(|_| ()),
                                    None => Err(crate::RepoError::corrupt(
                                        &key,
                                        "blob beyond the end of the pack",
                                    )),
                                };
                                if let Err(e) = r {
                                    errs.push(format!("{e}"));
                                    badl.push(b.id);
                                }
                            }
                        }
                    }
                    if let Ok(mut f) = found.lock() {
                        f.0.extend(errs);
                        f.1.extend(badl);
                    }
                });
            }
        });
        let (errs, badl) = found.into_inner().unwrap_or_default();
        rep.errors.extend(errs);
        bad.extend(badl);
        rep.bytes_read = bytes.into_inner();
    }

    // Snapshots: every chunk listed must be indexed and undamaged.
    let mut clean_maps: IdMap<u64> = IdMap::default();
    for o in be.list("snapshots")? {
        let id = o.key.trim_start_matches("snapshots/").to_string();
        rep.snapshots += 1;
        let s = match repo.load_snapshot(&id) {
            Ok(s) => s,
            Err(e) => {
                rep.errors.push(format!("snapshot {id}: {e}"));
                rep.damaged_snapshots.push(DamagedSnapshot {
                    snapshot_id: id,
                    map_unreadable: true,
                    ..Default::default()
                });
                continue;
            }
        };
        let mut d = DamagedSnapshot {
            snapshot_id: s.id.clone(),
            vm: s.vm.clone(),
            disk: s.disk.clone(),
            time: s.time.clone(),
            ..Default::default()
        };
        let map_bad = s
            .map
            .iter()
            .filter_map(|m| crate::util::id_from_hex(m))
            .any(|m| bad.contains(&m));
        let (cs, size) = (s.chunk_size as u64, s.size);
        let mut lost: Vec<String> = Vec::new();
        let mut missing: IdSet = IdSet::default();
        let (mut damaged_chunks, mut damaged_bytes) = (0u64, 0u64);
        let map = if map_bad {
            Err(crate::RepoError::corrupt(
                format!("snapshots/{id}"),
                "a map blob is damaged",
            ))
        } else {
            // Segment by segment; a map blob already found clean is not read again.
            repo.visit_map(&s, &index, &mut clean_maps, |first, ids| {
                let mut clean = true;
                for (j, c) in ids.iter().enumerate() {
                    if *c == ZERO_ID {
                        continue;
                    }
                    let gone = !index.contains(c);
                    if gone || bad.contains(c) {
                        clean = false;
                        damaged_chunks += 1;
                        damaged_bytes += crate::backup::chunk_len(first + j as u64, cs, size);
                        if gone && missing.insert(*c) {
                            lost.push(format!(
                                "snapshot {}: chunk {} is in no index (lost)",
                                s.short_id(),
                                to_hex(c)
                            ));
                        }
                    }
                }
                Ok(clean)
            })
        };
        match map {
            Err(e) => {
                rep.errors.push(format!(
                    "snapshot {} ({} {}): chunk list unreadable: {e}",
                    s.short_id(),
                    s.vm,
                    s.disk
                ));
                d.map_unreadable = true;
                d.damaged_bytes = s.size;
                d.damaged_chunks = s.size.div_ceil(s.chunk_size.max(1) as u64);
            }
            Ok(()) => {
                rep.errors.extend(lost);
                d.damaged_chunks = damaged_chunks;
                d.damaged_bytes = damaged_bytes;
            }
        }
        if d.damaged_chunks > 0 || d.map_unreadable {
            rep.damaged_snapshots.push(d);
        }
    }
    rep.ok = rep.errors.is_empty();
    Ok(rep)
}

/// What `repair_index` did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RepairReport {
    /// Packs whose headers were read into the new index.
    pub packs_read: u64,
    /// Packs left out: they do not match their name or their header is unreadable.
    pub unreadable_packs: Vec<String>,
    pub index_files_written: u64,
    pub index_files_removed: u64,
}

/// Packs per index file written by `repair_index`.
const REPAIR_PACKS_PER_FILE: usize = 1024;

pub(crate) fn repair_index(repo: &Repository) -> Result<RepairReport> {
    let lock = repo.lock(true, "repair-index")?;
    let be = &repo.backend;
    let mut rep = RepairReport::default();
    let old: Vec<String> = be.list("index")?.into_iter().map(|o| o.key).collect();
    let mut descs = Vec::new();
    for o in be.list("data")? {
        let Some(id) = o.key.rsplit('/').next().and_then(crate::util::id_from_hex) else {
            rep.unreadable_packs.push(o.key);
            continue;
        };
        match repo.read_pack_desc(&o.key, &id)? {
            Some(d) => descs.push(d),
            None => rep.unreadable_packs.push(o.key),
        }
    }
    rep.packs_read = descs.len() as u64;
    for batch in descs.chunks(REPAIR_PACKS_PER_FILE) {
        repo.save_index(batch)?;
        rep.index_files_written += 1;
    }
    // The new index is complete: only now do the old files go.
    lock.check_fresh()?;
    for k in &old {
        be.delete(k)?;
        rep.index_files_removed += 1;
    }
    Ok(rep)
}
