//! Step 5: each stopped disk of the clone into the repository: deduplicated,
//! compressed, encrypted, incremental against the VM's previous backup.
//! A backup becomes visible only when every one of its disks is stored.

use super::changes;
use super::{PipelineError, Run, RunContext};
use crate::journal::RepositoryResource;
use crate::progress::BarProgress;
use crate::report::{DiskReport, VmReport};
use coldclone_backends::image_export::ImageExport;
use coldclone_backends::shared::SharedResource;
use coldclone_backends::{Checkpoint, CloneDisk, CloneNetwork, DiskAccess, Journal, VmInfo};
use coldclone_repository::{BackupOptions, DiskSource, FileSource, SnapshotMeta};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

pub fn run(
    run: &mut Run,
    ctx: &RunContext,
    info: &VmInfo,
    net: &CloneNetwork,
    checkpoint: &Checkpoint,
    stopped: &super::stop::Stopped,
    report: &mut VmReport,
) -> Result<(), PipelineError> {
    let (consistency, quiesced) = (stopped.consistency, stopped.quiesced.as_ref());
    // Whatever reached the bridge while the clone shut down taints its disk.
    super::stop::reverify(run, net, "before-archive")?;
    let disks = match quiesced {
        // The original's disks at the frozen instant: no clone wrote them.
        Some(q) => q.disks.iter().map(|(d, _)| d.clone()).collect(),
        None => run
            .clone
            .as_ref()
            .map(|c| c.disks.clone())
            .ok_or(PipelineError::NoClone("no clone disks to archive"))?,
    };
    let mut written: Vec<String> = Vec::new();
    // Until every disk is stored, the run's snapshots are a partial backup
    // that `recover` withdraws should this process die.
    let partial = run.journal.record(
        RepositoryResource::RepositoryBackup {
            run: run.id.clone(),
        }
        .into(),
    )?;
    // The VM's definition goes with each of its disks; a backup never fails for want of it.
    let vm_config = match run.backend.vm_definition(info) {
        Ok(d) => d.map(|d| coldclone_repository::VmConfig {
            kind: d.kind.as_str().to_string(),
            text: d.text,
        }),
        Err(e) => {
            tracing::warn!("the VM's definition is not kept with this backup: {e}");
            None
        }
    };
    let result = (|| {
        for disk in &disks {
            let quiesced_access = quiesced.and_then(|q| {
                q.disks
                    .iter()
                    .find(|(d, _)| d.name == disk.name)
                    .map(|(_, a)| a.clone())
            });
            let (access, clone_writes) = if let Some(a) = quiesced_access {
                // No map covers the later instant of a quiesced copy: a whole read.
                (a, None)
            } else {
                let clone = run
                    .clone
                    .as_ref()
                    .ok_or(PipelineError::NoClone("no clone disks to archive"))?;
                let writes = match run.backend.clone_writes(clone, disk, &mut run.journal) {
                    Ok(w) => w,
                    Err(e) => {
                        tracing::warn!(
                            disk = disk.name,
                            "what the clone wrote is unknown ({e}); reading the disk whole"
                        );
                        None
                    }
                };
                (run.backend.disk_access(clone, disk), writes)
            };
            let opened = open_disk(run, access, disk)?;
            let source_box = opened.source()?;
            let source = source_box.as_ref();
            let parent = ctx.repo.find_latest(&run.vm.name, &disk.name)?;
            // No map covers the later instant of a quiesced copy: a whole read.
            let maps = match quiesced {
                Some(_) => None,
                None => checkpoint.change_maps.get(&disk.name),
            };
            let planned = match quiesced {
                Some(_) => Err("a quiesced copy: no changed-block map covers the later instant of its snapshot".to_string()),
                None => changes::plan_explained(
                    parent.as_ref(),
                    &ctx.host,
                    &ctx.repo.host().uuid,
                    maps,
                    clone_writes.as_deref(),
                ),
            };
            let (changed_ranges, changed_block_map, full_read_reason) = match planned {
                Ok((ranges, kind)) => (Some(ranges), kind, None),
                Err(why) => (None, crate::report::ChangedBlockMap::None, Some(why)),
            };
            let parent = parent.map(|s| s.id);
            let mut tags = BTreeMap::new();
            tags.insert("run".to_string(), run.id.clone());
            changes::tag(&mut tags, maps, clone_writes.as_deref());
            let meta = SnapshotMeta {
                vm: run.vm.name.clone(),
                disk: disk.name.clone(),
                backend: run.backend.name().to_string(),
                host: ctx.host.clone(),
                host_uuid: ctx.repo.host().uuid.clone(),
                consistency: consistency.as_str().to_string(),
                tags,
                vm_config: vm_config.clone(),
            };
            let read_in_place = matches!(opened, OpenedDisk::InPlace(_));
            let progress =
                BarProgress::new(ctx.show_progress, &format!("{} {}", run.vm.name, disk.name));
            let summary = ctx.repo.backup_disk(
                source,
                meta,
                &BackupOptions {
                    parent,
                    changed_ranges: changed_ranges.clone(),
                },
                &progress,
            )?;
            progress.finish();
            // Never wrong: with the verify mode on, a map-driven read is checked against
            // a read of the whole disk before the backup counts.
            let verified = if changed_ranges.is_some() && changes::verify_requested() {
                // A stream is read once: the whole read is a stream of its own.
                let again = match &opened {
                    OpenedDisk::Stream(_) => {
                        let clone = run
                            .clone
                            .as_ref()
                            .ok_or(PipelineError::NoClone("no clone disks to archive"))?;
                        Some(StreamSource::new(
                            run.backend.open_disk_stream(clone, disk)?,
                        ))
                    }
                    _ => None,
                };
                let whole: &dyn DiskSource = match &again {
                    Some(s) => s,
                    None => source,
                };
                let cmp = ctx.repo.compare_disk(&summary.snapshot_id, whole)?;
                if let Some(s) = &again {
                    s.finish(true).map_err(|source| PipelineError::Io {
                        path: disk.overlay.clone(),
                        source,
                    })?;
                }
                if !cmp.is_equal() {
                    written.push(summary.snapshot_id.clone());
                    return Err(PipelineError::IncrementalMismatch {
                        disk: disk.name.clone(),
                        map: changed_block_map,
                        chunks: cmp.mismatched,
                        first: cmp.first_mismatches.first().copied().unwrap_or(0),
                    });
                }
                Some(cmp.bytes_read)
            } else {
                None
            };
            test_fault(&disk.name, &mut run.journal)?;
            written.push(summary.snapshot_id.clone());
            // The scratch is largest now: the memory image and this disk's copy, if any.
            report.note_scratch(&run.work_dir);
            drop(source_box);
            // A map-driven read need not fetch the rest of a stream.
            opened.close(changed_ranges.is_none(), &mut run.journal)?;
            report.disks.push(DiskReport {
                name: disk.name.clone(),
                bytes: summary.bytes,
                stored_bytes: summary.stored_bytes,
                bytes_read: summary.bytes_read,
                snapshot_id: summary.snapshot_id,
                read_in_place,
                changed_block_map,
                full_read_reason,
                verify_bytes_read: verified,
            });
            run.journal.milestone("archive:disk-stored")?;
        }
        Ok::<(), PipelineError>(())
    })();
    if let Err(e) = result {
        // A backup with some disks missing is no backup: withdraw every disk
        // snapshot tagged with the run, not only those whose store reported
        // success (a snapshot written whose store then failed, e.g. an S3 PUT
        // that timed out after landing, is one too). Should the withdrawal
        // fail, the journal keeps the entry: the clean-up, or `recover`, tries again.
        report.disks.clear();
        match crate::journal::forget_run(ctx.repo, &run.id) {
            Ok(()) => run.journal.removed(partial)?,
            Err(f) => tracing::error!(
                run = run.id,
                stored = written.len(),
                "could not withdraw a partial backup: {f}"
            ),
        }
        return Err(e);
    }
    run.journal.removed(partial)?;
    report.snapshot_id = Some(run.id.clone());
    Ok(())
}

/// A clone disk open for the repository to read, and what closing it takes.
enum OpenedDisk {
    /// Served where it lies; stopping the export is all.
    InPlace(ImageExport),
    /// Copied into the run folder (journal id of the copy).
    Copy { path: std::path::PathBuf, id: u64 },
    /// Streamed from the backend straight into the repository.
    Stream(StreamSource),
}

impl OpenedDisk {
    /// The repository's source over it.
    fn source(&self) -> Result<Box<dyn DiskSource + '_>, PipelineError> {
        let file = |path: &Path| {
            FileSource::open(path).map_err(|source| PipelineError::Io {
                path: path.to_path_buf(),
                source,
            })
        };
        Ok(match self {
            OpenedDisk::InPlace(e) => Box::new(file(e.path())?),
            OpenedDisk::Copy { path, .. } => Box::new(file(path)?),
            OpenedDisk::Stream(s) => Box::new(StreamRef(s)),
        })
    }

    /// `whole`: the repository read every byte, so a stream is read to its end (which
    /// confirms it); otherwise it is dropped where the reading stopped.
    fn close(self, whole: bool, journal: &mut dyn Journal) -> Result<(), PipelineError> {
        match self {
            OpenedDisk::Stream(s) => {
                s.finish(whole).map_err(|source| PipelineError::Io {
                    path: "stream".into(),
                    source,
                })?;
            }
            OpenedDisk::InPlace(e) => e.stop(journal)?,
            OpenedDisk::Copy { path, id } => {
                std::fs::remove_file(&path).map_err(|source| PipelineError::Io {
                    path: path.clone(),
                    source,
                })?;
                journal.removed(id)?;
            }
        }
        Ok(())
    }
}

/// Opens one stopped clone disk: in place where the backend allows, else as a copy
/// in the run folder. Both are journaled before they exist.
fn open_disk(
    run: &mut Run,
    access: DiskAccess,
    disk: &CloneDisk,
) -> Result<OpenedDisk, PipelineError> {
    let safe_name = disk.name.replace('/', "_");
    match access {
        DiskAccess::Image { path, format } => {
            let mountpoint = run.work_dir.join(format!("read-{safe_name}.raw"));
            Ok(OpenedDisk::InPlace(ImageExport::start(
                &path,
                format,
                &mountpoint,
                &mut run.journal,
            )?))
        }
        DiskAccess::Stream => {
            let clone = run
                .clone
                .as_ref()
                .ok_or(PipelineError::NoClone("no clone disks to archive"))?;
            Ok(OpenedDisk::Stream(StreamSource::new(
                run.backend.open_disk_stream(clone, disk)?,
            )))
        }
        DiskAccess::Export => {
            let raw = run.work_dir.join(format!("export-{safe_name}.raw"));
            let id = run
                .journal
                .will_create(&SharedResource::File { path: raw.clone() }.into())?;
            let clone = run
                .clone
                .as_ref()
                .ok_or(PipelineError::NoClone("no clone disks to archive"))?;
            run.backend.export_disk(clone, disk, &raw)?;
            Ok(OpenedDisk::Copy { path: raw, id })
        }
    }
}

/// A disk stream as a repository source: read forward only (the repository's reader
/// asks for increasing offsets); what it skips is read and dropped.
pub(crate) struct StreamSource {
    len: u64,
    inner: Mutex<(Box<dyn Read + Send>, u64)>,
}

impl StreamSource {
    fn new(s: coldclone_backends::DiskStream) -> StreamSource {
        StreamSource {
            len: s.len,
            inner: Mutex::new((s.reader, 0)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Box<dyn Read + Send>, u64)> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// With `drain`: reads to the end, which must come at `len` (the reader checks the
    /// transfer there); without, the stream is dropped as it is.
    fn finish(&self, drain: bool) -> std::io::Result<()> {
        let mut g = self.lock();
        if !drain {
            // A reader that ends early discards the rest; nothing read is kept.
            g.0 = Box::new(std::io::empty());
            return Ok(());
        }
        let (r, pos) = &mut *g;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => *pos += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if *pos != self.len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the disk stream ended at {} of {} bytes", pos, self.len),
            ));
        }
        Ok(())
    }
}

impl DiskSource for StreamSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let mut g = self.lock();
        let (r, pos) = &mut *g;
        if offset < *pos {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a disk stream at {pos} cannot go back to {offset}"),
            ));
        }
        let mut skip = vec![0u8; (offset - *pos).min(1 << 20) as usize];
        while *pos < offset {
            let want = skip.len().min((offset - *pos) as usize);
            match r.read(&mut skip[..want]) {
                Ok(0) => return Ok(0),
                Ok(n) => *pos += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let n = r.read(buf)?;
        *pos += n as u64;
        Ok(n)
    }

    fn data_ranges(&self) -> std::io::Result<Option<Vec<std::ops::Range<u64>>>> {
        Ok(None)
    }
}

/// A borrowed [`StreamSource`] as a source (the disk stays open to be closed after).
struct StreamRef<'a>(&'a StreamSource);

impl DiskSource for StreamRef<'_> {
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn data_ranges(&self) -> std::io::Result<Option<Vec<std::ops::Range<u64>>>> {
        self.0.data_ranges()
    }
}

/// Fault hook for tests, debug builds only: `COLDCLONE_TEST_ARCHIVE_FAULT`
/// = `fail:DISK` fails the step right after DISK's snapshot is stored, as a
/// lost acknowledgement would (stored, reported failed); `halt:DISK` stops
/// the process there, between disks, for a kill -9.
#[cfg(debug_assertions)]
fn test_fault(disk: &str, journal: &mut dyn Journal) -> Result<(), PipelineError> {
    let Ok(v) = std::env::var("COLDCLONE_TEST_ARCHIVE_FAULT") else {
        return Ok(());
    };
    match v.split_once(':') {
        Some(("fail", d)) if d == disk => Err(PipelineError::InjectedFault(disk.to_string())),
        Some(("halt", d)) if d == disk => {
            // Recorded, so that the test knows when to kill.
            journal.milestone("archive:test-halt")?;
            tracing::warn!("COLDCLONE_TEST_ARCHIVE_FAULT: halting after disk {disk} was stored");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        _ => Ok(()),
    }
}

#[cfg(not(debug_assertions))]
fn test_fault(_disk: &str, _journal: &mut dyn Journal) -> Result<(), PipelineError> {
    Ok(())
}
