//! Backup: read the chunks that may have changed, hash, dedup, compress, seal, pack.
//!
//! Threads: one reader (large sequential reads into recycled buffers) and one worker per
//! core (zero test, keyed BLAKE3, dedup, zstd, XChaCha20-Poly1305, append to the shared
//! pack). Memory is bounded by the buffer pool and by one open pack per worker.

use crate::crypto::{random_id, Id, MasterKey};
use crate::error::{RepoError, Result};
use crate::pack::{pack_key, PackBuilder, PackDesc, FLAG_ZSTD, KIND_DATA, KIND_MAP};
use crate::source::{read_full, DiskSource, Progress};
use crate::util::{is_zero, now_unix, rfc3339, to_hex, IdSet};
use crate::{
    BackupOptions, BackupSummary, Repository, Snapshot, SnapshotMeta, MAP_ENTRIES, ZERO_ID,
};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Instant;

/// Bytes per read from the source.
const BATCH_BYTES: usize = 4 << 20;
/// Write an index file after this many new packs, so an interrupted backup's data can be
/// reused by the next one.
const INDEX_EVERY_PACKS: usize = 32;

/// Collects sealed blobs into packs and packs into index files. Shared by the workers.
pub(crate) struct Packer<'a> {
    repo: &'a Repository,
    cur: Mutex<PackBuilder>,
    unindexed: Mutex<Vec<PackDesc>>,
    pub stored_bytes: AtomicU64,
    pub packs_written: AtomicU64,
}

impl<'a> Packer<'a> {
    pub(crate) fn new(repo: &'a Repository) -> Packer<'a> {
        Packer {
            repo,
            cur: Mutex::new(PackBuilder::with_capacity(
                repo.config.pack_size as usize + (1 << 20),
            )),
            unindexed: Mutex::new(Vec::new()),
            stored_bytes: AtomicU64::new(0),
            packs_written: AtomicU64::new(0),
        }
    }

    pub(crate) fn add(
        &self,
        id: Id,
        kind: u8,
        flags: u8,
        sealed: &[u8],
        raw_len: u32,
    ) -> Result<()> {
        let full = {
            let mut cur = self.cur.lock().map_err(|_| poisoned())?;
            cur.add(id, kind, flags, sealed, raw_len);
            if cur.buf.len() >= self.repo.config.pack_size as usize {
                Some(std::mem::replace(
                    &mut *cur,
                    PackBuilder::with_capacity(self.repo.config.pack_size as usize + (1 << 20)),
                ))
            } else {
                None
            }
        };
        match full {
            Some(p) => self.write_pack(p),
            None => Ok(()),
        }
    }

    fn write_pack(&self, p: PackBuilder) -> Result<()> {
        let (bytes, desc) = p.finish(&self.repo.key);
        self.repo.backend.put(&pack_key(&desc.id), &bytes)?;
        self.stored_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        self.packs_written.fetch_add(1, Ordering::Relaxed);
        let batch = {
            let mut u = self.unindexed.lock().map_err(|_| poisoned())?;
            u.push(desc);
            if u.len() >= INDEX_EVERY_PACKS {
                Some(std::mem::take(&mut *u))
            } else {
                None
            }
        };
        if let Some(b) = batch {
            self.save_index_or_restore(b)?;
        }
        Ok(())
    }

    /// Index `packs`; on failure keep them in the unindexed list so that `abandon` sees them.
    fn save_index_or_restore(&self, packs: Vec<PackDesc>) -> Result<()> {
        match self.repo.save_index(&packs) {
            Ok(n) => {
                self.stored_bytes.fetch_add(n, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                if let Ok(mut u) = self.unindexed.lock() {
                    u.extend(packs);
                }
                Err(e)
            }
        }
    }

    /// After a failure: delete the packs this writer wrote that no index lists yet. Nobody
    /// else can use them (others only dedup against indexed packs), so this is safe, and it
    /// gives back the space at once (for example after the storage ran full).
    pub(crate) fn abandon(&self) {
        if let Ok(mut u) = self.unindexed.lock() {
            for p in u.drain(..) {
                let _ = self.repo.backend.delete(&pack_key(&p.id));
            }
        }
    }

    /// Write the open pack and an index for all packs not yet indexed.
    pub(crate) fn flush(&self) -> Result<()> {
        let p = std::mem::take(&mut *self.cur.lock().map_err(|_| poisoned())?);
        if !p.is_empty() {
            self.write_pack(p)?;
        }
        let rest = std::mem::take(&mut *self.unindexed.lock().map_err(|_| poisoned())?);
        if !rest.is_empty() {
            self.save_index_or_restore(rest)?;
        }
        Ok(())
    }
}

fn poisoned() -> RepoError {
    RepoError::Aborted("a worker thread panicked".into())
}

/// Compress (if it pays) and seal one blob. Returns (flags, sealed).
pub(crate) fn seal_blob(
    key: &MasterKey,
    comp: &mut zstd::bulk::Compressor<'_>,
    id: &Id,
    kind: u8,
    data: &[u8],
) -> (u8, Vec<u8>) {
    let compressed = comp
        .compress(data)
        .ok()
        .filter(|c| c.len() < data.len() - data.len() / 32);
    match compressed {
        Some(c) => (
            FLAG_ZSTD,
            key.seal(&c, &crate::pack::blob_aad(id, kind, FLAG_ZSTD)),
        ),
        None => (0, key.seal(data, &crate::pack::blob_aad(id, kind, 0))),
    }
}

fn mark(v: &mut [bool], ranges: &[Range<u64>], cs: u64, len: u64) {
    for r in ranges {
        let end = r.end.min(len);
        if r.start >= end {
            continue;
        }
        let (a, b) = ((r.start / cs) as usize, ((end - 1) / cs) as usize);
        for x in &mut v[a..=b] {
            *x = true;
        }
    }
}

/// Up to `per_batch` chunks (not necessarily adjacent): chunk `idx[k]` is at `k * cs` in `buf`.
struct Batch {
    idx: Vec<u32>,
    buf: Vec<u8>,
}

pub(crate) fn backup_disk(
    repo: &Repository,
    source: &dyn DiskSource,
    meta: SnapshotMeta,
    opts: &BackupOptions,
    progress: &dyn Progress,
) -> Result<BackupSummary> {
    let start = Instant::now();
    let lock = repo.lock(false, "backup")?;
    let t_lock = start.elapsed();
    let index = repo.load_index()?;
    let t_index = start.elapsed();
    let cs = repo.config.chunk_size as u64;
    let len = source.len();
    let n = len.div_ceil(cs) as usize;
    progress.set_total(len);

    // Which chunks may hold data.
    let mut maybe_data = vec![true; n];
    // With a parent and a changed-block map only the touched chunks are read, and a touched
    // chunk that became a hole reads as zeros: the allocation map would not save anything.
    let by_map = opts.parent.is_some() && opts.changed_ranges.is_some();
    let ranges = if by_map {
        Ok(None)
    } else {
        source.data_ranges()
    };
    match ranges {
        Ok(Some(r)) => {
            maybe_data = vec![false; n];
            mark(&mut maybe_data, &r, cs, len);
        }
        Ok(None) => {}
        Err(e) => tracing::warn!("no allocation map for the source ({e}); reading all of it"),
    }

    // Parent and changed ranges: chunks outside the changed ranges keep the parent's ids.
    let mut map: Vec<Id> = vec![ZERO_ID; n];
    let mut need: Vec<bool> = maybe_data.clone();
    let mut parent_id = None;
    let mut reused_unread = 0u64;
    if let Some(p) = &opts.parent {
        let ps = repo.find_snapshot(p)?;
        parent_id = Some(ps.id.clone());
        if let Some(changed) = &opts.changed_ranges {
            if ps.chunk_size as u64 != cs {
                tracing::warn!(
                    "parent {} has another chunk size; reading everything",
                    ps.short_id()
                );
            } else {
                let pmap = repo.load_map(&ps, &index)?;
                let mut touched = vec![false; n];
                mark(&mut touched, changed, cs, len);
                // Chunks wholly inside both the old and the new size, untouched, keep their ids.
                let whole = (ps.size.min(len) / cs) as usize;
                for i in 0..whole {
                    if !maybe_data[i] || touched[i] {
                        continue;
                    }
                    let pid = pmap[i];
                    if pid == ZERO_ID || index.contains(&pid) {
                        map[i] = pid;
                        need[i] = false;
                        reused_unread += 1;
                    }
                }
            }
        }
    } else if opts.changed_ranges.is_some() {
        tracing::warn!(
            "changed ranges given without a parent snapshot: ignored, reading everything"
        );
    }
    let t_plan = start.elapsed();
    let skipped: u64 = (0..n)
        .filter(|&i| !need[i])
        .map(|i| chunk_len(i, cs, len))
        .sum();
    progress.advance(skipped);

    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 8);
    let per_batch = (BATCH_BYTES as u64 / cs).max(1) as usize;
    let packer = Packer::new(repo);
    let new_ids: Mutex<IdSet> = Mutex::new(IdSet::default());
    let results: Mutex<&mut Vec<Id>> = Mutex::new(&mut map);
    let abort = AtomicBool::new(false);
    let first_err: Mutex<Option<RepoError>> = Mutex::new(None);
    let bytes_read = AtomicU64::new(0);
    let new_chunks = AtomicU64::new(0);
    let zero_chunks = AtomicU64::new(0);
    let fail = |e: RepoError| {
        abort.store(true, Ordering::SeqCst);
        if let Ok(mut f) = first_err.lock() {
            if f.is_none() {
                *f = Some(e);
            }
        }
    };

    let nbuf = workers * 2 + 1;
    let (pool_tx, pool_rx) = mpsc::sync_channel::<Vec<u8>>(nbuf);
    for _ in 0..nbuf {
        let _ = pool_tx.send(Vec::with_capacity(per_batch * cs as usize));
    }
    let (work_tx, work_rx) = mpsc::sync_channel::<Batch>(nbuf);
    let work_rx = Mutex::new(work_rx);
    std::thread::scope(|s| {
        // Reader.
        let need = &need;
        let (abort_r, fail_r, bytes_read_r) = (&abort, &fail, &bytes_read);
        s.spawn(move || {
            let mut i = 0usize;
            loop {
                if abort_r.load(Ordering::Relaxed) {
                    return;
                }
                // Gather the next chunks to read; scattered chunks share one batch, so that
                // an incremental's many small reads do not cost a hand-over each.
                let mut idx: Vec<u32> = Vec::with_capacity(per_batch);
                while i < n && idx.len() < per_batch {
                    if need[i] {
                        idx.push(i as u32);
                    }
                    i += 1;
                }
                if idx.is_empty() {
                    return;
                }
                let Ok(mut buf) = pool_rx.recv() else { return };
                let last = *idx.last().unwrap_or(&0) as usize;
                let blen = (idx.len() - 1) * cs as usize + chunk_len(last, cs, len) as usize;
                buf.resize(blen, 0);
                // One read per run of adjacent chunks.
                let mut k = 0;
                while k < idx.len() {
                    let mut e = k + 1;
                    while e < idx.len() && idx[e] == idx[e - 1] + 1 {
                        e += 1;
                    }
                    let off = idx[k] as u64 * cs;
                    let a = k * cs as usize;
                    let z = ((e - 1) * cs as usize
                        + chunk_len(idx[e - 1] as usize, cs, len) as usize)
                        .min(blen);
                    if let Err(err) = read_full(source, &mut buf[a..z], off) {
                        fail_r(RepoError::Source {
                            offset: off,
                            source: err,
                        });
                        return;
                    }
                    bytes_read_r.fetch_add((z - a) as u64, Ordering::Relaxed);
                    k = e;
                }
                if work_tx.send(Batch { idx, buf }).is_err() {
                    return;
                }
            }
        });

        for _ in 0..workers {
            let (work_rx, pool_tx) = (&work_rx, pool_tx.clone());
            let (packer, new_ids, results, index) = (&packer, &new_ids, &results, &index);
            let (abort, fail, new_chunks, zero_chunks) = (&abort, &fail, &new_chunks, &zero_chunks);
            s.spawn(move || {
                let mut comp = match zstd::bulk::Compressor::new(repo.config.compression_level) {
                    Ok(c) => c,
                    Err(e) => {
                        fail(RepoError::InvalidArgument(format!("zstd: {e}")));
                        return;
                    }
                };
                let mut ids: Vec<Id> = Vec::with_capacity(per_batch);
                loop {
                    let batch = {
                        let Ok(rx) = work_rx.lock() else { return };
                        match rx.recv() {
                            Ok(b) => b,
                            Err(_) => return,
                        }
                    };
                    if abort.load(Ordering::Relaxed) {
                        // Drain, and give buffers back, so the reader never blocks forever.
                        let _ = pool_tx.send(batch.buf);
                        continue;
                    }
                    ids.clear();
                    for data in batch.buf.chunks(cs as usize).take(batch.idx.len()) {
                        if is_zero(data) {
                            zero_chunks.fetch_add(1, Ordering::Relaxed);
                            ids.push(ZERO_ID);
                            continue;
                        }
                        let id = repo.key.chunk_id(data);
                        ids.push(id);
                        if index.contains(&id) {
                            continue;
                        }
                        let fresh = match new_ids.lock() {
                            Ok(mut set) => set.insert(id),
                            Err(_) => {
                                fail(poisoned());
                                break;
                            }
                        };
                        if !fresh {
                            continue;
                        }
                        let (flags, sealed) = seal_blob(&repo.key, &mut comp, &id, KIND_DATA, data);
                        if let Err(e) = packer.add(id, KIND_DATA, flags, &sealed, data.len() as u32)
                        {
                            fail(e);
                            break;
                        }
                        new_chunks.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Ok(mut m) = results.lock() {
                        for (i, id) in batch.idx.iter().zip(&ids) {
                            m[*i as usize] = *id;
                        }
                    }
                    progress.advance(batch.buf.len() as u64);
                    let _ = pool_tx.send(batch.buf);
                }
            });
        }
        drop(pool_tx);
    });

    if let Some(e) = first_err.into_inner().ok().flatten() {
        // Indexed packs already written stay as unreferenced data: harmless, prune removes them.
        packer.abandon();
        return Err(e);
    }
    let zero_chunks =
        zero_chunks.into_inner() + need.iter().filter(|&&x| !x).count() as u64 - reused_unread;

    let t_data = start.elapsed();
    // Map blobs.
    let mut comp = zstd::bulk::Compressor::new(3)
        .map_err(|e| RepoError::InvalidArgument(format!("zstd: {e}")))?;
    let mut map_ids = Vec::new();
    for seg in map.chunks(MAP_ENTRIES) {
        let mut b = Vec::with_capacity(seg.len() * 32);
        for id in seg {
            b.extend_from_slice(id);
        }
        let id = repo.key.chunk_id(&b);
        let fresh = !index.contains(&id) && new_ids.lock().map_err(|_| poisoned())?.insert(id);
        if fresh {
            let (flags, sealed) = seal_blob(&repo.key, &mut comp, &id, KIND_MAP, &b);
            if let Err(e) = packer.add(id, KIND_MAP, flags, &sealed, b.len() as u32) {
                packer.abandon();
                return Err(e);
            }
        }
        map_ids.push(to_hex(&id));
    }
    if let Err(e) = packer.flush().and_then(|_| lock.check_fresh()) {
        packer.abandon();
        return Err(e);
    }

    let now = now_unix();
    let mut snap = Snapshot {
        id: random_id(),
        time: rfc3339(now),
        time_unix: now,
        vm: meta.vm,
        disk: meta.disk,
        backend: meta.backend,
        host: meta.host,
        consistency: meta.consistency,
        tags: meta.tags,
        size: len,
        chunk_size: cs as u32,
        parent: parent_id,
        bytes_read: bytes_read.load(Ordering::Relaxed),
        stored_bytes: packer.stored_bytes.load(Ordering::Relaxed),
        map: map_ids,
    };
    // The snapshot is written last: until it exists, the backup is invisible.
    let sn = repo.save_snapshot(&snap)?;
    tracing::debug!(
        "backup timings: lock {t_lock:?}, index {t_index:?}, plan {t_plan:?}, data {t_data:?}, done {:?}",
        start.elapsed()
    );
    if std::env::var_os("COLDCLONE_TIMINGS").is_some() {
        eprintln!("backup timings: lock {t_lock:?}, index {t_index:?}, plan {t_plan:?}, data {t_data:?}, done {:?}", start.elapsed());
    }
    snap.stored_bytes += sn;
    drop(lock);
    Ok(BackupSummary {
        snapshot_id: snap.id,
        bytes: len,
        bytes_read: snap.bytes_read,
        stored_bytes: snap.stored_bytes,
        new_chunks: new_chunks.into_inner(),
        zero_chunks,
        reused_unread_chunks: reused_unread,
        duration: start.elapsed(),
    })
}

pub(crate) fn chunk_len(i: usize, cs: u64, len: u64) -> u64 {
    let off = i as u64 * cs;
    cs.min(len.saturating_sub(off))
}
