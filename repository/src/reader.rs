#![allow(clippy::map_entry)] // the entry API would hold the map borrowed across the fallible read
//! Random access to one snapshot straight from the repository: the disk as it was
//! backed up, read chunk by chunk on demand (each verified: authenticated, decompressed,
//! its keyed BLAKE3 checked), with a small cache. What `coldclone serve` exports over
//! NBD; a chunk that fails its check is an error to the reader, never wrong data.

use crate::pack::Index;
use crate::util::to_hex;
use crate::{Id, RepoError, Repository, Result, Snapshot, MAP_ENTRIES, ZERO_ID};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Chunks kept decoded (16 KiB each by default: 4 MiB).
const CACHE_CHUNKS: usize = 256;

pub struct SnapshotReader<'r> {
    repo: &'r Repository,
    snap: Snapshot,
    index: Index,
    cs: u64,
    state: Mutex<ReaderState>,
    /// A shared lock for as long as the reader lives: prune must not take the packs.
    _lock: Option<crate::lock::LockGuard>,
}

#[derive(Default)]
struct ReaderState {
    /// Map segments read so far, by segment number.
    segments: HashMap<usize, Vec<Id>>,
    cache: HashMap<u64, Vec<u8>>,
    order: VecDeque<u64>,
}

impl<'r> SnapshotReader<'r> {
    pub(crate) fn open(repo: &'r Repository, id: &str) -> Result<SnapshotReader<'r>> {
        let snap = repo.find_snapshot(id)?;
        let cs = snap.chunk_size as u64;
        if cs == 0 || snap.map.len() != (snap.size.div_ceil(cs) as usize).div_ceil(MAP_ENTRIES) {
            return Err(RepoError::corrupt(
                format!("snapshots/{}", snap.id),
                "the number of map segments does not fit the disk size",
            ));
        }
        let lock = repo.lock_for_reading("serve")?;
        let index = repo.load_index()?;
        Ok(SnapshotReader {
            repo,
            snap,
            index,
            cs,
            state: Mutex::new(ReaderState::default()),
            _lock: lock,
        })
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snap
    }

    pub fn len(&self) -> u64 {
        self.snap.size
    }

    pub fn is_empty(&self) -> bool {
        self.snap.size == 0
    }

    /// Reads `buf.len()` bytes at `offset` (short only at the end of the disk).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        if offset >= self.snap.size {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(self.snap.size - offset) as usize;
        let mut done = 0;
        while done < want {
            let pos = offset + done as u64;
            let chunk = pos / self.cs;
            let within = (pos % self.cs) as usize;
            let n = (self.cs as usize - within).min(want - done);
            self.with_chunk(chunk, |data| {
                buf[done..done + n].copy_from_slice(&data[within..within + n]);
            })?;
            done += n;
        }
        Ok(want)
    }

    fn chunk_id(&self, st: &mut ReaderState, chunk: u64) -> Result<Id> {
        let seg = (chunk / MAP_ENTRIES as u64) as usize;
        if !st.segments.contains_key(&seg) {
            let hex = &self.snap.map[seg];
            let blob = crate::map_blob_id(&self.snap, hex)?;
            let ids = if blob == self.repo.zero_segment_id() {
                vec![ZERO_ID; MAP_ENTRIES]
            } else {
                self.repo.read_map_blob(&self.index, &blob, hex)?
            };
            st.segments.insert(seg, ids);
        }
        let ids = &st.segments[&seg];
        ids.get((chunk % MAP_ENTRIES as u64) as usize)
            .copied()
            .ok_or_else(|| {
                RepoError::corrupt(
                    format!("snapshots/{}", self.snap.id),
                    format!("map segment {seg} is short"),
                )
            })
    }

    fn with_chunk(&self, chunk: u64, f: impl FnOnce(&[u8])) -> Result<()> {
        let lock = || {
            self.state
                .lock()
                .map_err(|_| RepoError::InvalidArgument("snapshot reader poisoned".into()))
        };
        let id = {
            let mut st = lock()?;
            if let Some(data) = st.cache.get(&chunk) {
                f(data);
                return Ok(());
            }
            self.chunk_id(&mut st, chunk)?
        };
        // Fetched and verified without the lock: readers on other threads (the NBD
        // server's workers) are not held up by this chunk's fetch, nor it by theirs.
        let len = self.cs.min(self.snap.size - chunk * self.cs) as usize;
        let mut data = if id == ZERO_ID {
            vec![0u8; len]
        } else {
            self.repo.read_blob(&self.index, &id)?
        };
        if data.len() < len {
            return Err(RepoError::corrupt(
                format!("snapshots/{}", self.snap.id),
                format!("chunk {} ({}) is short", chunk, to_hex(&id)),
            ));
        }
        data.truncate(len);
        f(&data);
        let mut st = lock()?;
        if !st.cache.contains_key(&chunk) {
            st.cache.insert(chunk, data);
            st.order.push_back(chunk);
        }
        while st.order.len() > CACHE_CHUNKS {
            if let Some(old) = st.order.pop_front() {
                st.cache.remove(&old);
            }
        }
        Ok(())
    }
}
