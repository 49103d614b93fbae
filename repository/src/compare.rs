//! A snapshot compared with a disk, chunk by chunk, without storing anything: the check
//! behind `COLDCLONE_VERIFY_INCREMENTAL`, which reads the whole disk after a backup that
//! a changed-block map let skip most of it, so a wrong map can never go unnoticed.

use crate::source::DiskSource;
use crate::{util, Repository, Result, ZERO_ID};
use serde::Serialize;

/// How a snapshot and a disk compared.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CompareReport {
    pub chunks: u64,
    /// Chunks whose content differs.
    pub mismatched: u64,
    /// Byte offsets of the first differing chunks (at most 16).
    pub first_mismatches: Vec<u64>,
    pub bytes_read: u64,
}

impl CompareReport {
    pub fn is_equal(&self) -> bool {
        self.mismatched == 0
    }
}

pub(crate) fn compare(
    repo: &Repository,
    id: &str,
    source: &dyn DiskSource,
) -> Result<CompareReport> {
    let snap = repo.find_snapshot(id)?;
    let _lock = repo.lock_for_reading("compare")?;
    let index = repo.load_index()?;
    let cs = snap.chunk_size as u64;
    let mut report = CompareReport::default();
    if source.len() != snap.size {
        // Every chunk counts as different: the sizes alone say the copy is not the disk.
        report.chunks = snap.size.div_ceil(cs.max(1));
        report.mismatched = report.chunks;
        return Ok(report);
    }
    let mut buf = vec![0u8; cs as usize];
    let mut known = util::IdMap::default();
    // Every segment is visited (`false`): a repeated map blob still covers other offsets.
    repo.visit_map(&snap, &index, &mut known, |first, ids| {
        for (k, want) in ids.iter().enumerate() {
            let off = (first + k as u64) * cs;
            let n = cs.min(snap.size - off) as usize;
            read_full(source, &mut buf[..n], off)?;
            report.bytes_read += n as u64;
            report.chunks += 1;
            let data = &buf[..n];
            let got = if util::is_zero(data) {
                ZERO_ID
            } else {
                repo.key.chunk_id(data)
            };
            if got != *want {
                report.mismatched += 1;
                if report.first_mismatches.len() < 16 {
                    report.first_mismatches.push(off);
                }
            }
        }
        Ok(false)
    })?;
    Ok(report)
}

fn read_full(source: &dyn DiskSource, buf: &mut [u8], offset: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let at = offset + done as u64;
        let n = source
            .read_at(&mut buf[done..], at)
            .map_err(|source| crate::RepoError::Source { offset: at, source })?;
        if n == 0 {
            return Err(crate::RepoError::Source {
                offset: at,
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the disk ended before its size",
                ),
            });
        }
        done += n;
    }
    Ok(())
}
