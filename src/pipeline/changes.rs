//! Which ranges of a clone disk can differ from its previous backup, from the
//! backend's changed-block maps. Between two backups the clean copy changes only where
//! the original wrote between the two checkpoints, where the previous clone wrote while
//! it shut down, or where this clone did; a backup reads just those ranges when all
//! three are known, and the whole disk otherwise.

use crate::report::ChangedBlockMap;
use coldclone_backends::{ChangedRange, DiskChangeMaps};
use coldclone_repository::Snapshot;
use std::collections::BTreeMap;

/// The snapshot tag naming the map its checkpoint started.
pub const TAG_CHANGE_MAP: &str = "change-map";
/// The snapshot tag listing the ranges its clone wrote.
pub const TAG_CLONE_WRITES: &str = "clone-writes";
/// Beyond this many ranges a list is coarsened (a superset: never wrong, only larger).
const MAX_RANGES: usize = 4096;

/// `COLDCLONE_VERIFY_INCREMENTAL=1`: check every map-driven read against a whole read.
pub fn verify_requested() -> bool {
    std::env::var("COLDCLONE_VERIFY_INCREMENTAL").is_ok_and(|v| v == "1")
}

/// The ranges to read, or `None` for the whole disk, and which map said so.
pub fn plan(
    parent: Option<&Snapshot>,
    host: &str,
    host_uuid: &str,
    maps: Option<&DiskChangeMaps>,
    clone_writes: Option<&[ChangedRange]>,
) -> (Option<Vec<ChangedRange>>, ChangedBlockMap) {
    match plan_explained(parent, host, host_uuid, maps, clone_writes) {
        Ok((ranges, kind)) => (Some(ranges), kind),
        Err(_) => (None, ChangedBlockMap::None),
    }
}

/// [`plan`], with the reason for a whole read (`Err`) for the report.
pub fn plan_explained(
    parent: Option<&Snapshot>,
    host: &str,
    host_uuid: &str,
    maps: Option<&DiskChangeMaps>,
    clone_writes: Option<&[ChangedRange]>,
) -> Result<(Vec<ChangedRange>, ChangedBlockMap), String> {
    let parent = parent.ok_or("no earlier backup of this disk")?;
    let maps = maps.ok_or("the backend keeps no changed-block map for this disk")?;
    let mine = clone_writes.ok_or("what the clone wrote to the disk is unknown")?;
    // Maps are this host's: another host's snapshot says nothing of them, even when
    // that host has the same name (a host cloned from one image): uuids tell them apart.
    if !parent.is_from(host, host_uuid) {
        return Err("the earlier backup was made on another host".into());
    }
    let kind =
        map_kind(&maps.started).ok_or_else(|| format!("unknown kind of map {:?}", maps.started))?;
    let named = parent
        .tags
        .get(TAG_CHANGE_MAP)
        .ok_or("the earlier backup names no changed-block map")?;
    let since = maps.since.get(named).ok_or_else(|| {
        let mut why = format!("the earlier backup's map {named} is not held any more");
        if !maps.notes.is_empty() {
            why.push_str(": ");
            why.push_str(&maps.notes.join("; "));
        }
        why
    })?;
    let theirs = parent
        .tags
        .get(TAG_CLONE_WRITES)
        .and_then(|t| decode(t))
        .ok_or("the earlier backup has no readable record of its clone's writes")?;
    let mut all: Vec<ChangedRange> = since.iter().chain(&theirs).chain(mine).cloned().collect();
    // The read plan is only merged, never coarsened: coarsening is for the tag's size,
    // and 1 MiB blocks turned 16,384 scattered 4 KiB writes into a whole-disk read
    // (docs/performance.md, 2026-12-04).
    Ok((coalesce(&mut all, usize::MAX), kind))
}

/// The tags a new snapshot carries for the next run.
pub fn tag(
    tags: &mut BTreeMap<String, String>,
    maps: Option<&DiskChangeMaps>,
    clone_writes: Option<&[ChangedRange]>,
) {
    if let (Some(maps), Some(w)) = (maps, clone_writes) {
        tags.insert(TAG_CHANGE_MAP.into(), maps.started.clone());
        tags.insert(TAG_CLONE_WRITES.into(), encode(w));
    }
}

fn map_kind(name: &str) -> Option<ChangedBlockMap> {
    match name.split_once(':')?.0 {
        "qemu-bitmap" => Some(ChangedBlockMap::QemuBitmap),
        "xapi-cbt" => Some(ChangedBlockMap::XapiCbt),
        "lvm-thin" => Some(ChangedBlockMap::LvmThin),
        _ => None,
    }
}

/// Sorted, merged; coarsened to ever larger aligned blocks while there are too many.
fn coalesce(r: &mut [ChangedRange], max_ranges: usize) -> Vec<ChangedRange> {
    r.sort_by_key(|x| x.start);
    let mut grain = 1u64;
    loop {
        let mut out: Vec<ChangedRange> = Vec::new();
        for x in r.iter().filter(|x| x.start < x.end) {
            let start = x.start / grain * grain;
            let end = x.end.div_ceil(grain).saturating_mul(grain);
            match out.last_mut() {
                Some(last) if last.end >= start => last.end = last.end.max(end),
                _ => out.push(start..end),
            }
        }
        if out.len() <= max_ranges {
            return out;
        }
        grain = if grain == 1 { 1 << 20 } else { grain * 4 };
    }
}

/// `start+length` in hex, comma-separated.
fn encode(r: &[ChangedRange]) -> String {
    let mut v = r.to_vec();
    coalesce(&mut v, MAX_RANGES)
        .iter()
        .map(|x| format!("{:x}+{:x}", x.start, x.end - x.start))
        .collect::<Vec<_>>()
        .join(",")
}

/// The tag as written by [`encode`]; anything else (or a range past 2^64) is no list.
fn decode(s: &str) -> Option<Vec<ChangedRange>> {
    if s.is_empty() {
        return Some(Vec::new());
    }
    s.split(',')
        .map(|p| {
            let (a, b) = p.split_once('+')?;
            let start = u64::from_str_radix(a, 16).ok()?;
            let len = u64::from_str_radix(b, 16).ok()?;
            Some(start..start.checked_add(len)?)
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    fn snap(host: &str, tags: &[(&str, &str)]) -> Snapshot {
        let mut s: Snapshot = serde_json::from_value(serde_json::json!({
            "time": "", "time_unix": 0, "vm": "v", "disk": "d", "backend": "qemu",
            "host": host, "consistency": "clean-shutdown", "tags": {}, "size": 1,
            "chunk_size": 1, "parent": null, "bytes_read": 0, "stored_bytes": 0}))
        .expect("a snapshot");
        for (k, v) in tags {
            s.tags.insert(k.to_string(), v.to_string());
        }
        s
    }

    fn maps(since: &[(&str, Vec<ChangedRange>)]) -> DiskChangeMaps {
        DiskChangeMaps {
            started: "qemu-bitmap:coldclone-new".into(),
            since: since
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            notes: vec![],
        }
    }

    #[test]
    fn the_three_sources_are_joined() {
        let p = snap(
            "h",
            &[
                (TAG_CHANGE_MAP, "qemu-bitmap:coldclone-old"),
                (TAG_CLONE_WRITES, "0+10,100+10"),
            ],
        );
        let m = maps(&[("qemu-bitmap:coldclone-old", vec![5..20, 1000..1001])]);
        let (r, kind) = plan(Some(&p), "h", "", Some(&m), Some(&[105..200]));
        assert_eq!(r, Some(vec![0..20, 105..200, 256..272, 1000..1001]));
        assert_eq!(kind, ChangedBlockMap::QemuBitmap);
    }

    #[test]
    fn many_scattered_changes_are_read_as_they_are_not_coarsened() {
        // 16,384 4 KiB writes 64 KiB apart: more ranges than a tag holds.
        let since: Vec<ChangedRange> = (0..16384u64).map(|i| i * 65536..i * 65536 + 4096).collect();
        let parent = snap(
            "h",
            &[(TAG_CHANGE_MAP, "qemu-bitmap:a"), (TAG_CLONE_WRITES, "0+1")],
        );
        let m = maps(&[("qemu-bitmap:a", since)]);
        let (plan, kind) = plan(Some(&parent), "h", "", Some(&m), Some(&[]));
        let plan = plan.expect("a map-driven read");
        assert_eq!(kind, ChangedBlockMap::QemuBitmap);
        let bytes: u64 = plan.iter().map(|r| r.end - r.start).sum();
        assert_eq!(bytes, 16384 * 4096, "the read is exactly what changed");
    }

    #[test]
    fn anything_unknown_means_a_whole_read() {
        let good = [
            (TAG_CHANGE_MAP, "qemu-bitmap:coldclone-old"),
            (TAG_CLONE_WRITES, "0+10"),
        ];
        let m = maps(&[("qemu-bitmap:coldclone-old", vec![5..20])]);
        let whole = (None, ChangedBlockMap::None);
        // No parent; another host's parent; no maps; unknown clone writes.
        assert_eq!(plan(None, "h", "", Some(&m), Some(&[])), whole);
        assert_eq!(
            plan(Some(&snap("other", &good)), "h", "", Some(&m), Some(&[])),
            whole
        );
        assert_eq!(
            plan(Some(&snap("h", &good)), "h", "", None, Some(&[])),
            whole
        );
        // A host of the same name with another uuid (cloned from one image): not ours.
        let mut twin = snap("h", &good);
        twin.host_uuid = "11111111-1111-4111-8111-111111111111".into();
        let mine = "22222222-2222-4222-8222-222222222222";
        assert_eq!(plan(Some(&twin), "h", mine, Some(&m), Some(&[])), whole);
        // The same uuid under another name (the host was renamed): still ours.
        let mut renamed = snap("old-name", &good);
        renamed.host_uuid = mine.into();
        assert!(plan(Some(&renamed), "h", mine, Some(&m), Some(&[]))
            .0
            .is_some());
        // A snapshot from before host uuids, of this host's name: ours.
        assert!(
            plan(Some(&snap("h", &good)), "h", mine, Some(&m), Some(&[]))
                .0
                .is_some()
        );
        assert_eq!(
            plan(Some(&snap("h", &good)), "h", "", Some(&m), None),
            whole
        );
        // The parent's map is not held any more (bitmap lost, VM restarted).
        let gone = maps(&[("qemu-bitmap:coldclone-older", vec![5..20])]);
        assert_eq!(
            plan(Some(&snap("h", &good)), "h", "", Some(&gone), Some(&[])),
            whole
        );
        // The parent has no record of its clone's writes, or a damaged one.
        let no_writes = [(TAG_CHANGE_MAP, "qemu-bitmap:coldclone-old")];
        assert_eq!(
            plan(Some(&snap("h", &no_writes)), "h", "", Some(&m), Some(&[])),
            whole
        );
        for bad in ["x", "1+", "+1", "ffffffffffffffff+2", "1+2,,"] {
            let t = [
                (TAG_CHANGE_MAP, "qemu-bitmap:coldclone-old"),
                (TAG_CLONE_WRITES, bad),
            ];
            assert_eq!(
                plan(Some(&snap("h", &t)), "h", "", Some(&m), Some(&[])),
                whole,
                "{bad}"
            );
        }
    }

    #[test]
    fn encoding_round_trips_and_coarsens_to_a_superset() {
        let r = vec![0..1, 4096..8192, 1 << 40..(1 << 40) + 5];
        assert_eq!(decode(&encode(&r)), Some(r));
        assert_eq!(decode(""), Some(vec![]));
        let many: Vec<ChangedRange> = (0..10_000u64).map(|i| i * 8192..i * 8192 + 1).collect();
        let coarse = decode(&encode(&many)).expect("decodes");
        assert!(coarse.len() <= MAX_RANGES);
        for x in &many {
            assert!(
                coarse.iter().any(|c| c.start <= x.start && x.end <= c.end),
                "{x:?} lost"
            );
        }
    }
}
