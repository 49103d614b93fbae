//! Backup: read the chunks that may have changed, hash, dedup, compress, seal, pack.
//!
//! Threads: one reader (large sequential reads into recycled buffers) and one worker per
//! core (zero test, keyed BLAKE3, dedup, zstd, XChaCha20-Poly1305, append to the shared
//! pack). Memory is bounded by the buffer pool and by one open pack per worker.

use crate::crypto::{random_id, Id, MasterKey};
use crate::error::{RepoError, Result};
use crate::lock::LockGuard;
use crate::pack::{pack_key, Index, PackBuilder, PackDesc, FLAG_ZSTD, KIND_DATA, KIND_MAP};
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
    try_compress: bool,
) -> (u8, Vec<u8>) {
    let compressed = if try_compress {
        comp.compress(data)
            .ok()
            .filter(|c| c.len() < data.len() - data.len() / 32)
    } else {
        None
    };
    match compressed {
        Some(c) => (
            FLAG_ZSTD,
            key.seal(&c, &crate::pack::blob_aad(id, kind, FLAG_ZSTD)),
        ),
        None => (0, key.seal(data, &crate::pack::blob_aad(id, kind, 0))),
    }
}

/// Sort and merge ranges; clip them to `len`.
fn normalize(mut r: Vec<Range<u64>>, len: u64) -> Vec<Range<u64>> {
    r.retain(|x| x.start < x.end.min(len));
    r.sort_by_key(|x| x.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(r.len());
    for x in r {
        let x = x.start..x.end.min(len);
        match out.last_mut() {
            Some(l) if x.start <= l.end => l.end = l.end.max(x.end),
            _ => out.push(x),
        }
    }
    out
}

/// Walks sorted, disjoint ranges segment by segment.
struct RangeCursor {
    ranges: Vec<Range<u64>>,
    pos: usize,
}

impl RangeCursor {
    /// Whether a range intersects `a..b`. Calls must come in increasing order of `a`.
    fn touches(&mut self, a: u64, b: u64) -> bool {
        while self.pos < self.ranges.len() && self.ranges[self.pos].end <= a {
            self.pos += 1;
        }
        self.pos < self.ranges.len() && self.ranges[self.pos].start < b
    }

    /// Mark in `out` the chunks `first..first+out.len()` that intersect a range.
    fn mark(&mut self, first: usize, out: &mut [bool], cs: u64) {
        let a = first as u64 * cs;
        let b = (first + out.len()) as u64 * cs;
        while self.pos < self.ranges.len() && self.ranges[self.pos].end <= a {
            self.pos += 1;
        }
        let mut j = self.pos;
        while j < self.ranges.len() && self.ranges[j].start < b {
            let r = &self.ranges[j];
            let s = (r.start.max(a) / cs) as usize - first;
            let e = ((r.end.min(b) - 1) / cs) as usize - first;
            for x in &mut out[s..=e] {
                *x = true;
            }
            j += 1;
        }
    }
}

/// A map segment being filled by the workers.
struct Segment {
    ids: Vec<Id>,
    remaining: usize,
}

/// Up to `per_batch` chunks (not necessarily adjacent): chunk `idx[k]` is at `k * cs` in `buf`.
/// Chunk indices are u64: a disk of 2^32 chunks (16 TiB at 4 KiB, 64 TiB at 16 KiB) is
/// allowed.
struct Batch {
    idx: Vec<u64>,
    /// Per chunk: its previous version was stored uncompressed (incompressible), so the
    /// new one, which differs only a little, is not worth a zstd attempt.
    raw: Vec<bool>,
    buf: Vec<u8>,
}

struct Shared<'a> {
    repo: &'a Repository,
    index: &'a Index,
    packer: Packer<'a>,
    new_ids: Mutex<IdSet>,
    segments: Mutex<std::collections::HashMap<usize, Segment>>,
    map_ids: Mutex<Vec<Option<String>>>,
    abort: AtomicBool,
    first_err: Mutex<Option<RepoError>>,
}

impl<'a> Shared<'a> {
    fn new(repo: &'a Repository, index: &'a Index, nseg: usize) -> Shared<'a> {
        Shared {
            repo,
            index,
            packer: Packer::new(repo),
            new_ids: Mutex::new(IdSet::default()),
            segments: Mutex::new(std::collections::HashMap::new()),
            map_ids: Mutex::new(vec![None; nseg]),
            abort: AtomicBool::new(false),
            first_err: Mutex::new(None),
        }
    }

    fn fail(&self, e: RepoError) {
        self.abort.store(true, Ordering::SeqCst);
        if let Ok(mut f) = self.first_err.lock() {
            if f.is_none() {
                *f = Some(e);
            }
        }
    }

    /// Store one blob unless the repository (or this backup) has it already.
    fn store(
        &self,
        comp: &mut zstd::bulk::Compressor<'_>,
        id: Id,
        kind: u8,
        data: &[u8],
        try_compress: bool,
    ) -> Result<bool> {
        if self.index.contains(&id) || !self.new_ids.lock().map_err(|_| poisoned())?.insert(id) {
            return Ok(false);
        }
        let (flags, sealed) = seal_blob(&self.repo.key, comp, &id, kind, data, try_compress);
        self.packer
            .add(id, kind, flags, &sealed, data.len() as u32)?;
        Ok(true)
    }

    /// A segment is complete: store its map blob.
    fn finish_segment(
        &self,
        comp: &mut zstd::bulk::Compressor<'_>,
        seg: usize,
        ids: &[Id],
    ) -> Result<()> {
        let mut b = Vec::with_capacity(ids.len() * 32);
        for id in ids {
            b.extend_from_slice(id);
        }
        let id = self.repo.key.chunk_id(&b);
        self.store(comp, id, KIND_MAP, &b, true)?;
        self.map_ids.lock().map_err(|_| poisoned())?[seg] = Some(to_hex(&id));
        Ok(())
    }

    /// A full segment of zero chunks: its map blob is stored once per repository.
    fn finish_hole_segment(&self, comp: &mut zstd::bulk::Compressor<'_>, seg: usize) -> Result<()> {
        let id = self.repo.zero_segment_id();
        let known =
            self.index.contains(&id) || self.new_ids.lock().map_err(|_| poisoned())?.contains(&id);
        if !known {
            self.store(comp, id, KIND_MAP, &vec![0u8; MAP_ENTRIES * 32], true)?;
        }
        self.map_ids.lock().map_err(|_| poisoned())?[seg] = Some(to_hex(&id));
        Ok(())
    }

    /// Record chunk ids computed by a worker; finish the segments they complete.
    fn record(&self, comp: &mut zstd::bulk::Compressor<'_>, idx: &[u64], ids: &[Id]) -> Result<()> {
        let mut done = Vec::new();
        {
            let mut segs = self.segments.lock().map_err(|_| poisoned())?;
            for (i, id) in idx.iter().zip(ids) {
                let (sg, k) = (
                    (*i / MAP_ENTRIES as u64) as usize,
                    (*i % MAP_ENTRIES as u64) as usize,
                );
                let Some(s) = segs.get_mut(&sg) else { continue };
                s.ids[k] = *id;
                s.remaining -= 1;
                if s.remaining == 0 {
                    if let Some(s) = segs.remove(&sg) {
                        done.push((sg, s.ids));
                    }
                }
            }
        }
        for (sg, ids) in done {
            self.finish_segment(comp, sg, &ids)?;
        }
        Ok(())
    }
}

fn compressor(level: i32) -> Result<zstd::bulk::Compressor<'static>> {
    zstd::bulk::Compressor::new(level)
        .map_err(|e| RepoError::InvalidArgument(format!("zstd level {level}: {e}")))
}

/// The parent's chunk ids of segment `seg`, or None when they cannot be used.
fn parent_segment(
    repo: &Repository,
    index: &Index,
    parent: &Snapshot,
    seg: usize,
    count: usize,
) -> Result<Option<Vec<Id>>> {
    let Some(h) = parent.map.get(seg) else {
        return Ok(None);
    };
    let id = crate::map_blob_id(parent, h)?;
    // A malformed or short parent segment is not an error here: the segment is read anew.
    let Some(mut ids) = crate::decode_map_blob(&repo.read_blob(index, &id)?) else {
        return Ok(None);
    };
    if ids.len() < count {
        return Ok(None);
    }
    ids.truncate(count);
    Ok(Some(ids))
}

/// What one backup does, fixed before any data is read.
struct Plan<'a> {
    source: &'a dyn DiskSource,
    /// Chunk size.
    cs: u64,
    /// Disk size.
    len: u64,
    /// Chunks of the disk.
    n: usize,
    /// Map segments of the disk.
    nseg: usize,
    parent: Option<Snapshot>,
    /// The new snapshot's sequence number (see `Snapshot::seq`).
    seq: u64,
    /// The parent's chunk ids stand for the chunks the changed ranges do not touch.
    by_map: bool,
    /// Chunks wholly inside both the parent's and this size: only they can come from the
    /// parent.
    whole: usize,
    workers: usize,
    /// Chunks per read batch.
    per_batch: usize,
}

/// Where the reader is in the changed ranges and in the source's allocation map.
struct Cursors {
    changed: RangeCursor,
    /// `None`: no allocation map, every chunk may hold data.
    data: Option<RangeCursor>,
}

impl<'a> Plan<'a> {
    fn new(
        repo: &Repository,
        source: &'a dyn DiskSource,
        meta: &SnapshotMeta,
        opts: &BackupOptions,
    ) -> Result<(Plan<'a>, Cursors)> {
        let cs = repo.config.chunk_size as u64;
        let len = source.len();
        let n = usize::try_from(len.div_ceil(cs)).map_err(|_| {
            RepoError::InvalidArgument(format!(
                "a disk of {len} bytes has too many chunks for this platform"
            ))
        })?;
        let parent = match &opts.parent {
            Some(p) => Some(repo.find_snapshot(p)?),
            None => None,
        };
        let by_map = parent_stands_for_unchanged(parent.as_ref(), meta, opts, cs);
        let seq = next_seq(repo, meta)?;
        let whole = parent
            .as_ref()
            .map(|p| (p.size.min(len) / cs) as usize)
            .unwrap_or(0);
        let changed = RangeCursor {
            ranges: normalize(opts.changed_ranges.clone().unwrap_or_default(), len),
            pos: 0,
        };
        let data = allocation_map(source, by_map, len);
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .clamp(1, 8);
        let plan = Plan {
            source,
            cs,
            len,
            n,
            nseg: n.div_ceil(MAP_ENTRIES),
            parent,
            seq,
            by_map,
            whole,
            workers,
            per_batch: (BATCH_BYTES as u64 / cs).max(1) as usize,
        };
        Ok((plan, Cursors { changed, data }))
    }
}

/// 1 + the highest sequence number among the snapshots of this host, VM and disk.
fn next_seq(repo: &Repository, meta: &SnapshotMeta) -> Result<u64> {
    let top = repo
        .snapshots()?
        .iter()
        .filter(|s| s.same_disk(&meta.host, &meta.host_uuid, &meta.vm, &meta.disk))
        .map(|s| s.seq)
        .max()
        .unwrap_or(0);
    Ok(top + 1)
}

/// Whether the parent's chunk ids can stand for the chunks the changed ranges leave out.
/// Changed ranges are relative to the previous backup of this very disk: a parent of
/// another host, VM or disk (two hosts with a VM of the same name) cannot stand for it.
fn parent_stands_for_unchanged(
    parent: Option<&Snapshot>,
    meta: &SnapshotMeta,
    opts: &BackupOptions,
    cs: u64,
) -> bool {
    match (parent, &opts.changed_ranges) {
        (Some(p), Some(_)) if !p.same_disk(&meta.host, &meta.host_uuid, &meta.vm, &meta.disk) => {
            tracing::warn!(
                "parent {} is a backup of {}/{}/{}, not of {}/{}/{}; reading everything",
                p.short_id(),
                p.host,
                p.vm,
                p.disk,
                meta.host,
                meta.vm,
                meta.disk
            );
            false
        }
        (Some(p), Some(_)) if p.chunk_size as u64 == cs => true,
        (Some(p), Some(_)) => {
            tracing::warn!(
                "parent {} has another chunk size; reading everything",
                p.short_id()
            );
            false
        }
        (None, Some(_)) => {
            tracing::warn!(
                "changed ranges given without a parent snapshot: ignored, reading everything"
            );
            false
        }
        _ => false,
    }
}

/// The ranges of the source that may hold data. With a changed-block map only the touched
/// chunks are read, and a touched chunk that became a hole reads as zeros: the allocation
/// map would not save anything then.
fn allocation_map(source: &dyn DiskSource, by_map: bool, len: u64) -> Option<RangeCursor> {
    let ranges = if by_map {
        Ok(None)
    } else {
        source.data_ranges()
    };
    match ranges {
        Ok(r) => r.map(|r| RangeCursor {
            ranges: normalize(r, len),
            pos: 0,
        }),
        Err(e) => {
            tracing::warn!("no allocation map for the source ({e}); reading all of it");
            None
        }
    }
}

/// What a backup counts as it goes.
#[derive(Default)]
struct Counters {
    bytes_read: AtomicU64,
    new_chunks: AtomicU64,
    zero_chunks: AtomicU64,
    reused_unread: AtomicU64,
}

/// One map segment, planned: which chunks must be read, which are known already.
struct SegmentPlan {
    /// Index of the segment's first chunk.
    first: usize,
    /// Chunk ids known without reading (zero, or the parent's); the rest are filled in
    /// by the workers.
    ids: Vec<Id>,
    /// Per chunk: it must be read.
    need: Vec<bool>,
    /// Per chunk: the source may hold data there.
    maybe: Vec<bool>,
    /// Per chunk: its previous version was stored uncompressed.
    raw: Vec<bool>,
}

/// The reader thread: plans one map segment at a time and reads what must be read, in
/// batches of up to `per_batch` chunks, for the workers.
struct Reader<'s, 'a> {
    sh: &'s Shared<'a>,
    plan: &'s Plan<'s>,
    cursors: Cursors,
    counters: &'s Counters,
    progress: &'s dyn Progress,
    comp: zstd::bulk::Compressor<'static>,
    pending: Vec<u64>,
    pending_raw: Vec<bool>,
    pool_rx: mpsc::Receiver<Vec<u8>>,
    work_tx: mpsc::SyncSender<Batch>,
}

impl Reader<'_, '_> {
    fn run(&mut self) -> Result<()> {
        for seg in 0..self.plan.nseg {
            if self.sh.abort.load(Ordering::Relaxed) {
                return Ok(());
            }
            if self.hole_segment(seg)? {
                continue;
            }
            let sp = self.plan_segment(seg)?;
            let remaining = self.count_known(&sp);
            if remaining == 0 {
                self.sh.finish_segment(&mut self.comp, seg, &sp.ids)?;
                continue;
            }
            self.queue_segment(seg, sp, remaining)?;
        }
        if !self.pending.is_empty() {
            self.send_batch()?;
        }
        Ok(())
    }

    /// A full segment known to be a hole without looking at its chunks one by one: the
    /// allocation map has no data there, or (with changed ranges) no range touches it and
    /// it is a hole in the parent. Stores it as such and returns true. Same result as the
    /// chunk-by-chunk path, in O(1): a 64 TiB thin disk has half a million segments.
    fn hole_segment(&mut self, seg: usize) -> Result<bool> {
        let plan = self.plan;
        let first = seg * MAP_ENTRIES;
        if plan.n - first < MAP_ENTRIES {
            return Ok(false);
        }
        let a = first as u64 * plan.cs;
        let b = ((first + MAP_ENTRIES) as u64 * plan.cs).min(plan.len);
        if let Some(d) = self.cursors.data.as_mut() {
            if d.touches(a, b) {
                return Ok(false);
            }
            self.counters
                .zero_chunks
                .fetch_add(MAP_ENTRIES as u64, Ordering::Relaxed);
        } else {
            let parent_hole = plan.by_map
                && first + MAP_ENTRIES <= plan.whole
                && plan.parent.as_ref().and_then(|p| p.map.get(seg))
                    == Some(&to_hex(&self.sh.repo.zero_segment_id()));
            if !parent_hole || self.cursors.changed.touches(a, b) {
                return Ok(false);
            }
            self.counters
                .reused_unread
                .fetch_add(MAP_ENTRIES as u64, Ordering::Relaxed);
        }
        self.progress.advance(b - a);
        self.sh.finish_hole_segment(&mut self.comp, seg)?;
        Ok(true)
    }

    /// Which chunks of segment `seg` may hold data, and which the parent stands for.
    fn plan_segment(&mut self, seg: usize) -> Result<SegmentPlan> {
        let (plan, index) = (self.plan, self.sh.index);
        let first = seg * MAP_ENTRIES;
        let cnt = MAP_ENTRIES.min(plan.n - first);
        let mut maybe = vec![self.cursors.data.is_none(); cnt];
        if let Some(d) = self.cursors.data.as_mut() {
            d.mark(first, &mut maybe, plan.cs);
        }
        let mut sp = SegmentPlan {
            first,
            ids: vec![ZERO_ID; cnt],
            need: maybe.clone(),
            maybe,
            raw: vec![false; cnt],
        };
        if !(plan.by_map && first < plan.whole) {
            return Ok(sp);
        }
        let mut touched = vec![false; cnt];
        self.cursors.changed.mark(first, &mut touched, plan.cs);
        let Some(p) = plan.parent.as_ref() else {
            return Ok(sp);
        };
        let Some(pids) = parent_segment(self.sh.repo, index, p, seg, cnt.min(plan.whole - first))?
        else {
            return Ok(sp);
        };
        for (k, pid) in pids.iter().enumerate() {
            if sp.maybe[k] && !touched[k] && (*pid == ZERO_ID || index.contains(pid)) {
                sp.ids[k] = *pid;
                sp.need[k] = false;
                self.counters.reused_unread.fetch_add(1, Ordering::Relaxed);
            } else if let Some(l) = index.blobs.get(pid) {
                sp.raw[k] = l.flags & FLAG_ZSTD == 0;
            }
        }
        Ok(sp)
    }

    /// Count the chunks known without reading (progress, zero chunks); returns how many
    /// must be read.
    fn count_known(&self, sp: &SegmentPlan) -> usize {
        let (cs, len) = (self.plan.cs, self.plan.len);
        let mut skipped = 0;
        let mut remaining = 0;
        for (k, nd) in sp.need.iter().enumerate() {
            if *nd {
                remaining += 1;
            } else {
                skipped += chunk_len((sp.first + k) as u64, cs, len);
                if !sp.maybe[k] {
                    self.counters.zero_chunks.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        self.progress.advance(skipped);
        remaining
    }

    /// Register the segment for the workers to complete and queue its chunks for reading.
    fn queue_segment(&mut self, seg: usize, sp: SegmentPlan, remaining: usize) -> Result<()> {
        self.sh.segments.lock().map_err(|_| poisoned())?.insert(
            seg,
            Segment {
                ids: sp.ids,
                remaining,
            },
        );
        for (k, nd) in sp.need.iter().enumerate() {
            if *nd {
                self.pending.push((sp.first + k) as u64);
                self.pending_raw.push(sp.raw[k]);
                if self.pending.len() == self.plan.per_batch {
                    self.send_batch()?;
                }
            }
        }
        Ok(())
    }

    /// Read the pending chunks into a pooled buffer (one read per run of adjacent chunks)
    /// and hand them to the workers.
    fn send_batch(&mut self) -> Result<()> {
        let per_batch = self.plan.per_batch;
        let idx = std::mem::replace(&mut self.pending, Vec::with_capacity(per_batch));
        let raw = std::mem::replace(&mut self.pending_raw, Vec::with_capacity(per_batch));
        let Ok(mut buf) = self.pool_rx.recv() else {
            return Ok(());
        };
        let (cs, len) = (self.plan.cs, self.plan.len);
        let last = *idx.last().unwrap_or(&0);
        let blen = (idx.len() - 1) * cs as usize + chunk_len(last, cs, len) as usize;
        buf.resize(blen, 0);
        let mut k = 0;
        while k < idx.len() {
            let mut e = k + 1;
            while e < idx.len() && idx[e] == idx[e - 1] + 1 {
                e += 1;
            }
            let off = idx[k] * cs;
            let a = k * cs as usize;
            let z = ((e - 1) * cs as usize + chunk_len(idx[e - 1], cs, len) as usize).min(blen);
            read_full(self.plan.source, &mut buf[a..z], off).map_err(|err| RepoError::Source {
                offset: off,
                source: err,
            })?;
            self.counters
                .bytes_read
                .fetch_add((z - a) as u64, Ordering::Relaxed);
            k = e;
        }
        let _ = self.work_tx.send(Batch { idx, raw, buf });
        Ok(())
    }
}

/// A worker thread: zero test, chunk id, dedup, compress, seal and pack each chunk of the
/// batches it takes; records the ids in their map segments.
fn work(
    sh: &Shared<'_>,
    plan: &Plan<'_>,
    work_rx: &Mutex<mpsc::Receiver<Batch>>,
    pool_tx: mpsc::SyncSender<Vec<u8>>,
    counters: &Counters,
    progress: &dyn Progress,
) {
    let repo = sh.repo;
    let mut comp = match compressor(repo.config.compression_level) {
        Ok(c) => c,
        Err(e) => return sh.fail(e),
    };
    let mut ids: Vec<Id> = Vec::with_capacity(plan.per_batch);
    loop {
        let batch = {
            let Ok(rx) = work_rx.lock() else { return };
            match rx.recv() {
                Ok(b) => b,
                Err(_) => return,
            }
        };
        if sh.abort.load(Ordering::Relaxed) {
            // Drain, and give buffers back, so the reader never blocks forever.
            let _ = pool_tx.send(batch.buf);
            continue;
        }
        ids.clear();
        let mut res = Ok(());
        let chunks = batch.buf.chunks(plan.cs as usize).take(batch.idx.len());
        for (data, raw) in chunks.zip(&batch.raw) {
            if is_zero(data) {
                counters.zero_chunks.fetch_add(1, Ordering::Relaxed);
                ids.push(ZERO_ID);
                continue;
            }
            let id = repo.key.chunk_id(data);
            ids.push(id);
            match sh.store(&mut comp, id, KIND_DATA, data, !raw) {
                Ok(true) => {
                    counters.new_chunks.fetch_add(1, Ordering::Relaxed);
                }
                Ok(false) => {}
                Err(e) => {
                    res = Err(e);
                    break;
                }
            }
        }
        let res = res.and_then(|_| sh.record(&mut comp, &batch.idx, &ids));
        if let Err(e) = res {
            sh.fail(e);
        }
        progress.advance(batch.buf.len() as u64);
        let _ = pool_tx.send(batch.buf);
    }
}

/// Run the reader and the workers until every map segment is stored or one failed.
fn read_and_store(
    sh: &Shared<'_>,
    plan: &Plan<'_>,
    cursors: Cursors,
    counters: &Counters,
    progress: &dyn Progress,
) {
    let nbuf = plan.workers * 2 + 1;
    let (pool_tx, pool_rx) = mpsc::sync_channel::<Vec<u8>>(nbuf);
    for _ in 0..nbuf {
        let _ = pool_tx.send(Vec::with_capacity(plan.per_batch * plan.cs as usize));
    }
    let (work_tx, work_rx) = mpsc::sync_channel::<Batch>(nbuf);
    let work_rx = Mutex::new(work_rx);
    std::thread::scope(|s| {
        s.spawn(move || {
            let comp = match compressor(3) {
                Ok(c) => c,
                Err(e) => return sh.fail(e),
            };
            let mut reader = Reader {
                sh,
                plan,
                cursors,
                counters,
                progress,
                comp,
                pending: Vec::with_capacity(plan.per_batch),
                pending_raw: Vec::with_capacity(plan.per_batch),
                pool_rx,
                work_tx,
            };
            if let Err(e) = reader.run() {
                sh.fail(e);
            }
            // Dropping the reader closes the work channel: the workers end.
        });
        for _ in 0..plan.workers {
            let (work_rx, pool_tx) = (&work_rx, pool_tx.clone());
            s.spawn(move || work(sh, plan, work_rx, pool_tx, counters, progress));
        }
        drop(pool_tx);
    });
}

/// After the data phase: the first error, or the map ids with every pack written and
/// indexed. On failure the packs no index lists yet are deleted.
fn finish_data<'a>(sh: Shared<'a>, lock: &LockGuard) -> Result<(Packer<'a>, Vec<String>)> {
    let Shared {
        packer,
        map_ids,
        first_err,
        ..
    } = sh;
    let mut result = match first_err.into_inner().ok().flatten() {
        Some(e) => Err(e),
        None => map_ids.into_inner().map_err(|_| poisoned()).and_then(|m| {
            m.into_iter()
                .collect::<Option<Vec<String>>>()
                .ok_or_else(|| RepoError::Aborted("a map segment was not completed".into()))
        }),
    };
    if result.is_ok() {
        if let Err(e) = packer.flush().and_then(|_| lock.check_fresh()) {
            result = Err(e);
        }
    }
    match result {
        Ok(m) => Ok((packer, m)),
        Err(e) => {
            // Indexed packs already written stay as unreferenced data: prune removes them.
            packer.abandon();
            Err(e)
        }
    }
}

/// Write the snapshot: until it exists, the backup is invisible.
fn commit_snapshot(
    repo: &Repository,
    meta: SnapshotMeta,
    plan: Plan<'_>,
    map: Vec<String>,
    bytes_read: u64,
    stored_bytes: u64,
) -> Result<Snapshot> {
    let now = now_unix();
    let mut snap = Snapshot {
        id: random_id(),
        time: rfc3339(now),
        time_unix: now,
        vm: meta.vm,
        disk: meta.disk,
        backend: meta.backend,
        host: meta.host,
        host_uuid: meta.host_uuid,
        consistency: meta.consistency,
        tags: meta.tags,
        vm_config: meta.vm_config,
        size: plan.len,
        chunk_size: plan.cs as u32,
        parent: plan.parent.map(|p| p.id),
        bytes_read,
        stored_bytes,
        seq: plan.seq,
        map,
    };
    let sn = repo.save_snapshot(&snap)?;
    snap.stored_bytes += sn;
    Ok(snap)
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
    let index = repo.load_index()?;
    let t_index = start.elapsed();
    progress.set_total(source.len());
    let (plan, cursors) = Plan::new(repo, source, &meta, opts)?;
    let sh = Shared::new(repo, &index, plan.nseg);
    let counters = Counters::default();
    read_and_store(&sh, &plan, cursors, &counters, progress);
    let t_data = start.elapsed();
    let (packer, map) = finish_data(sh, &lock)?;
    let len = plan.len;
    let snap = commit_snapshot(
        repo,
        meta,
        plan,
        map,
        counters.bytes_read.load(Ordering::Relaxed),
        packer.stored_bytes.load(Ordering::Relaxed),
    )?;
    tracing::debug!(
        "backup timings: index {t_index:?}, data {t_data:?}, done {:?}",
        start.elapsed()
    );
    drop(lock);
    Ok(BackupSummary {
        snapshot_id: snap.id,
        bytes: len,
        bytes_read: snap.bytes_read,
        stored_bytes: snap.stored_bytes,
        new_chunks: counters.new_chunks.into_inner(),
        zero_chunks: counters.zero_chunks.into_inner(),
        reused_unread_chunks: counters.reused_unread.into_inner(),
        duration: start.elapsed(),
    })
}

/// Length of chunk `i` of a disk of `len` bytes (the last one may be short).
pub(crate) fn chunk_len(i: u64, cs: u64, len: u64) -> u64 {
    let off = i.saturating_mul(cs);
    cs.min(len.saturating_sub(off))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_normalize_and_mark() {
        let r = normalize(vec![10..20, 0..5, 15..30, 100..200, 40..40], 150);
        assert_eq!(r, vec![0..5, 10..30, 100..150]);
        let mut c = RangeCursor { ranges: r, pos: 0 };
        let mut a = vec![false; 4]; // chunks 0..4 of 10 bytes
        c.mark(0, &mut a, 10);
        assert_eq!(a, vec![true, true, true, false]);
        let mut b = vec![false; 4]; // chunks 8..12
        c.mark(8, &mut b, 10);
        assert_eq!(b, vec![false, false, true, true]);
        let mut z = vec![false; 2]; // chunks 20..22: beyond
        c.mark(20, &mut z, 10);
        assert_eq!(z, vec![false, false]);
    }
}
