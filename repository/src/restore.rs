//! Restore: one pass per pack, in parallel; chunks are verified before they are written.

use crate::crypto::Id;
use crate::error::{RepoError, Result};
use crate::pack::{open_blob, pack_key, BlobEntry};
use crate::source::Progress;
use crate::util::IdMap;
use crate::{Repository, RestoreSummary, MAP_ENTRIES, ZERO_ID};

/// Map segments restored per round (2 GiB of disk at 16 KiB chunks).
const GROUP_SEGMENTS: usize = 16;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Read neighbouring blobs of a pack in one request when the gap is below this.
const MAX_GAP: u64 = 1 << 20;

struct Want {
    entry: BlobEntry,
    /// Chunk indices (u64: disks may have 2^32 chunks and more).
    chunks: Vec<u64>,
}

pub(crate) fn restore(
    repo: &Repository,
    id: &str,
    target: &Path,
    opts: &RestoreOptions,
    progress: &dyn Progress,
) -> Result<RestoreSummary> {
    let start = Instant::now();
    let snap = repo.find_snapshot(id)?;
    let _lock = repo.lock_for_reading("restore")?;
    let index = repo.load_index()?;
    // Everything that can be checked without reading the data, before the first write.
    validate(repo, &snap, &index)?;
    let tdisp = target.display().to_string();
    let terr = |e: std::io::Error| RepoError::Target {
        path: tdisp.clone(),
        source: e,
    };
    let out = Output::open(target, snap.size, opts.force).map_err(|e| match e {
        OpenError::Io(e) => terr(e),
        OpenError::Refused(m) => RepoError::InvalidArgument(m),
    })?;
    let is_blockdev = out.is_blockdev();
    let file = out.file();
    let cs = snap.chunk_size as u64;
    let len = snap.size;
    progress.set_total(len);

    if cs == 0 || snap.map.len() != (len.div_ceil(cs) as usize).div_ceil(MAP_ENTRIES) {
        return Err(RepoError::corrupt(
            format!("snapshots/{}", snap.id),
            "the number of map segments does not fit the disk size",
        ));
    }
    let n = len.div_ceil(cs) as usize;
    let nseg = snap.map.len();
    let written = AtomicU64::new(0);
    // A full segment whose map blob is the zero segment's is a hole: nothing to read.
    let zero_segment = crate::util::to_hex(&repo.zero_segment_id());
    let is_hole = |seg: usize| snap.map[seg] == zero_segment && (seg + 1) * MAP_ENTRIES <= n;
    // Groups of adjacent map segments, so that memory does not grow with the disk.
    let mut seg = 0;
    while seg < nseg {
        if is_hole(seg) {
            let a = (seg * MAP_ENTRIES) as u64 * cs;
            let b = (a + MAP_ENTRIES as u64 * cs).min(len);
            if is_blockdev {
                write_zeros(file, a..b, &written, progress).map_err(terr)?;
            } else {
                progress.advance(b - a);
            }
            seg += 1;
            continue;
        }
        let mut end = seg + 1;
        while end < nseg && end - seg < GROUP_SEGMENTS && !is_hole(end) {
            end += 1;
        }
        let first = seg * MAP_ENTRIES;
        let mut map: Vec<Id> = Vec::with_capacity((end - seg) * MAP_ENTRIES);
        for h in &snap.map[seg..end] {
            let id = crate::map_blob_id(&snap, h)?;
            map.extend(repo.read_map_blob(&index, &id, h)?);
        }
        let expect = (n - first).min((end - seg) * MAP_ENTRIES);
        if map.len() != expect {
            return Err(RepoError::corrupt(
                format!("snapshots/{}", snap.id),
                format!(
                    "map segments {seg}..{end} list {} chunks, {expect} expected",
                    map.len()
                ),
            ));
        }
        restore_group(
            repo,
            &index,
            &snap.id,
            &map,
            first,
            file,
            is_blockdev,
            cs,
            len,
            &written,
            progress,
            &terr,
        )?;
        seg = end;
    }
    file.sync_all().map_err(terr)?;
    out.commit().map_err(terr)?;
    Ok(RestoreSummary {
        snapshot_id: snap.id,
        target: target.to_path_buf(),
        bytes: len,
        bytes_written: written.into_inner(),
        duration: start.elapsed(),
    })
}

/// How a restore treats its target.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Replace an existing file, or write over a block device (opened with O_EXCL, so not
    /// while it is mounted or in use). Without it an existing target is refused.
    pub force: bool,
}

/// The structure of a snapshot: every map blob readable and of the right length, every
/// chunk in the index, every pack they are in present in the storage with its indexed size.
fn validate(repo: &Repository, snap: &crate::Snapshot, index: &crate::pack::Index) -> Result<()> {
    let cs = snap.chunk_size as u64;
    if cs == 0 || snap.map.len() as u64 != snap.size.div_ceil(cs).div_ceil(MAP_ENTRIES as u64) {
        return Err(RepoError::corrupt(
            format!("snapshots/{}", snap.id),
            "the number of map segments does not fit the disk size",
        ));
    }
    let mut packs: IdMap<u64> = IdMap::default();
    let mut known = IdMap::default();
    let mut missing: Option<Id> = None;
    repo.visit_map(snap, index, &mut known, |_, ids| {
        for c in ids.iter().filter(|c| **c != ZERO_ID) {
            match index.blobs.get(c) {
                Some(l) => {
                    let (pid, size) = index.packs[l.pack as usize];
                    packs.insert(pid, size);
                }
                None => {
                    missing.get_or_insert(*c);
                }
            }
        }
        Ok(true)
    })?;
    if let Some(c) = missing {
        return Err(RepoError::corrupt(
            format!("snapshots/{}", snap.id),
            format!(
                "chunk {} is in no index (data lost?); nothing was written",
                crate::util::to_hex(&c)
            ),
        ));
    }
    let stored: IdMap<u64> = repo
        .backend
        .list("data")?
        .into_iter()
        .filter_map(|o| Some((crate::util::id_from_hex(o.key.rsplit('/').next()?)?, o.size)))
        .collect();
    for (pid, size) in &packs {
        match stored.get(pid) {
            Some(s) if s == size => {}
            Some(s) => {
                return Err(RepoError::corrupt(
                    pack_key(pid),
                    format!("{s} bytes, the index says {size}; nothing was written"),
                ))
            }
            None => {
                return Err(RepoError::corrupt(
                    pack_key(pid),
                    "missing from the storage; nothing was written",
                ))
            }
        }
    }
    Ok(())
}

enum OpenError {
    Io(std::io::Error),
    Refused(String),
}

impl From<std::io::Error> for OpenError {
    fn from(e: std::io::Error) -> Self {
        OpenError::Io(e)
    }
}

/// Where the restore writes: a block device in place, or a temporary file beside the
/// target that replaces it only when complete (and is removed otherwise).
enum Output {
    Device(File),
    Temp {
        file: File,
        tmp: PathBuf,
        target: PathBuf,
        replace: bool,
        done: bool,
    },
}

impl Output {
    fn open(target: &Path, size: u64, force: bool) -> std::result::Result<Output, OpenError> {
        let refuse = |m: String| Err(OpenError::Refused(m));
        let t = target.display();
        let (target, existing) = match std::fs::metadata(target) {
            Ok(m) => (std::fs::canonicalize(target)?, Some(m)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (target.to_path_buf(), None),
            Err(e) => return Err(e.into()),
        };
        if let Some(m) = &existing {
            let ft = m.file_type();
            if ft.is_block_device() {
                if !force {
                    return refuse(format!(
                        "{t} is a block device: pass --force to overwrite it (all its data is replaced)"
                    ));
                }
                // O_EXCL on a block device: refused while it is mounted or held open.
                let f = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_EXCL)
                    .open(&target)?;
                let dev_len = {
                    use std::io::Seek;
                    let mut r = &f;
                    r.seek(std::io::SeekFrom::End(0))?
                };
                if dev_len < size {
                    return refuse(format!(
                        "block device {t} has {dev_len} bytes, the snapshot needs {size}"
                    ));
                }
                return Ok(Output::Device(f));
            }
            if !ft.is_file() {
                return refuse(format!("{t} is neither a file nor a block device"));
            }
            if !force {
                return refuse(format!(
                    "{t} exists: pass --force to replace it, or name a new file"
                ));
            }
        }
        let name = target
            .file_name()
            .ok_or_else(|| OpenError::Refused(format!("{t} does not name a file")))?;
        let tmp = target.with_file_name(format!(
            ".{}.coldclone-restore-{}-{}",
            name.to_string_lossy(),
            std::process::id(),
            &crate::crypto::random_id()[..8]
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let out = Output::Temp {
            file,
            tmp,
            target,
            replace: existing.is_some(),
            done: false,
        };
        out.file().set_len(size)?;
        Ok(out)
    }

    fn file(&self) -> &File {
        match self {
            Output::Device(f) => f,
            Output::Temp { file, .. } => file,
        }
    }

    fn is_blockdev(&self) -> bool {
        matches!(self, Output::Device(_))
    }

    /// Put the complete temporary file in the target's place.
    fn commit(mut self) -> std::io::Result<()> {
        let Output::Temp {
            tmp,
            target,
            replace,
            done,
            ..
        } = &mut self
        else {
            return Ok(());
        };
        if *replace {
            std::fs::rename(&*tmp, &*target)?;
        } else {
            rename_noreplace(tmp, target)?;
        }
        *done = true;
        if let Some(dir) = target.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if let Output::Temp {
            tmp, done: false, ..
        } = self
        {
            let _ = std::fs::remove_file(&*tmp);
        }
    }
}

/// Rename without replacing what appeared at `to` meanwhile.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (f, t) = (c(from)?, c(to)?);
    // SAFETY: two valid NUL-terminated paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        // A file system without RENAME_NOREPLACE: a hard link fails if the target exists.
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            std::fs::hard_link(from, to)?;
            std::fs::remove_file(from)
        }
        _ => Err(e),
    }
}

/// Write zeros over `r` of a block device (a hole of the snapshot).
fn write_zeros(
    file: &File,
    r: std::ops::Range<u64>,
    written: &AtomicU64,
    progress: &dyn Progress,
) -> std::io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    let mut off = r.start;
    while off < r.end {
        let l = (r.end - off).min(zeros.len() as u64);
        file.write_all_at(&zeros[..l as usize], off)?;
        written.fetch_add(l, Ordering::Relaxed);
        progress.advance(l);
        off += l;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn restore_pack(
    repo: &Repository,
    pid: &Id,
    wants: &mut [Want],
    file: &File,
    cs: u64,
    len: u64,
    written: &AtomicU64,
    progress: &dyn Progress,
    terr: &(dyn Fn(std::io::Error) -> RepoError + Sync),
) -> Result<()> {
    let key = pack_key(pid);
    wants.sort_by_key(|w| w.entry.offset);
    let mut i = 0;
    while i < wants.len() {
        // A run of blobs read with one request.
        let start = wants[i].entry.offset as u64;
        let mut end = start + wants[i].entry.stored_len as u64;
        let mut j = i + 1;
        while j < wants.len() {
            let o = wants[j].entry.offset as u64;
            if o > end + MAX_GAP || o + wants[j].entry.stored_len as u64 - start > 64 << 20 {
                break;
            }
            end = end.max(o + wants[j].entry.stored_len as u64);
            j += 1;
        }
        let buf = repo.backend.get_range(&key, start, end - start)?;
        for w in &wants[i..j] {
            let a = (w.entry.offset as u64 - start) as usize;
            let data = open_blob(
                &repo.key,
                &w.entry,
                &buf[a..a + w.entry.stored_len as usize],
                &key,
            )?;
            for &c in &w.chunks {
                let off = c * cs;
                let l = crate::backup::chunk_len(c, cs, len) as usize;
                if data.len() < l {
                    return Err(RepoError::corrupt(
                        &key,
                        "chunk shorter than its place in the disk",
                    ));
                }
                file.write_all_at(&data[..l], off).map_err(terr)?;
                written.fetch_add(l as u64, Ordering::Relaxed);
                progress.advance(l as u64);
            }
        }
        i = j;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn restore_group(
    repo: &Repository,
    index: &crate::pack::Index,
    snap_id: &str,
    map: &[Id],
    first: usize,
    file: &File,
    is_blockdev: bool,
    cs: u64,
    len: u64,
    written: &AtomicU64,
    progress: &dyn Progress,
    terr: &(dyn Fn(std::io::Error) -> RepoError + Sync),
) -> Result<()> {
    // Plan: pack -> blobs wanted -> chunk positions.
    let mut by_blob: IdMap<Vec<u64>> = IdMap::default();
    let mut zero_chunks = Vec::new();
    for (j, id) in map.iter().enumerate() {
        let i = (first + j) as u64;
        if *id == ZERO_ID {
            zero_chunks.push(i);
        } else {
            by_blob.entry(*id).or_default().push(i);
        }
    }
    let mut by_pack: BTreeMap<Id, Vec<Want>> = BTreeMap::new();
    for (id, chunks) in by_blob {
        let (pid, entry) = index.entry(&id).ok_or_else(|| {
            RepoError::corrupt(
                format!("snapshots/{snap_id}"),
                format!(
                    "chunk {} is in no index (data lost?)",
                    crate::util::to_hex(&id)
                ),
            )
        })?;
        by_pack.entry(pid).or_default().push(Want { entry, chunks });
    }
    let jobs: Mutex<std::vec::IntoIter<(Id, Vec<Want>)>> =
        Mutex::new(by_pack.into_iter().collect::<Vec<_>>().into_iter());

    let zero_bytes: u64 = zero_chunks
        .iter()
        .map(|&i| crate::backup::chunk_len(i, cs, len))
        .sum();
    let abort = AtomicBool::new(false);
    let first_err: Mutex<Option<RepoError>> = Mutex::new(None);
    let fail = |e: RepoError| {
        abort.store(true, Ordering::SeqCst);
        if let Ok(mut f) = first_err.lock() {
            if f.is_none() {
                *f = Some(e);
            }
        }
    };

    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 8)
        .max(repo.backend.parallel_requests());
    std::thread::scope(|s| {
        if is_blockdev && !zero_chunks.is_empty() {
            let (file, zero_chunks, fail, written, terr) =
                (&file, &zero_chunks, &fail, &written, &terr);
            s.spawn(move || {
                let zeros = vec![0u8; cs as usize];
                for &i in zero_chunks {
                    let off = i * cs;
                    let l = crate::backup::chunk_len(i, cs, len) as usize;
                    if let Err(e) = file.write_all_at(&zeros[..l], off) {
                        fail(terr(e));
                        return;
                    }
                    written.fetch_add(l as u64, Ordering::Relaxed);
                    progress.advance(l as u64);
                }
            });
        } else {
            progress.advance(zero_bytes);
        }
        for _ in 0..threads {
            let (jobs, file, fail, abort, written, terr) =
                (&jobs, &file, &fail, &abort, &written, &terr);
            s.spawn(move || loop {
                if abort.load(Ordering::Relaxed) {
                    return;
                }
                let job = match jobs.lock() {
                    Ok(mut j) => j.next(),
                    Err(_) => return,
                };
                let Some((pid, mut wants)) = job else { return };
                if let Err(e) = restore_pack(
                    repo, &pid, &mut wants, file, cs, len, written, progress, terr,
                ) {
                    fail(e);
                    return;
                }
            });
        }
    });
    match first_err.into_inner().ok().flatten() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
