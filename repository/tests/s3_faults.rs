//! The S3 client against a real server (moto, s3s-fs) behind a proxy that injects the
//! faults object storage really shows: 503 SlowDown, 500 after the request was carried
//! out, connections reset before or after the server acted, stalls past the timeout, and
//! listings that break the rules. A process of its own: the timeouts it shortens are global.
mod common;
use coldclone_repository::*;
use common::fault_proxy::{Fault, FaultProxy, Plan};
use common::servers::*;
use common::*;
use std::time::{Duration, Instant};

const TIMEOUT_SECS: u64 = 2;

fn stall() -> Fault {
    Fault::Stall(Duration::from_secs(TIMEOUT_SECS + 2))
}

fn backup(
    repo: &Repository,
    img: &[u8],
    vm: &str,
    parent: Option<String>,
) -> Result<BackupSummary, RepoError> {
    repo.backup_disk(
        &MemSource(img.to_vec()),
        meta(vm, "xvda"),
        &BackupOptions {
            parent,
            changed_ranges: None,
        },
        &NoProgress,
    )
}

fn restored(repo: &Repository, id: &str) -> Vec<u8> {
    let dir = TempDir::new("s3f");
    let out = dir.path().join("out");
    repo.restore_with(id, &out, &FORCE, &NoProgress).unwrap();
    std::fs::read(&out).unwrap()
}

/// Every 3rd request fails, by each kind of fault in turn (a damaged body is caught by
/// the server's Content-MD5 check or by its ETag, and sent again): the whole life of a repository
/// (init, backups, an incremental, restores, check --read-data, forget, prune) still
/// works, every fault kind fired, and the repository is clean afterwards.
fn transient_faults(server_port: u16) {
    set_s3_timeout_for_tests(TIMEOUT_SECS);
    let proxy = FaultProxy::start(server_port);
    proxy.set_plan(Plan {
        every: 3,
        cycle: vec![
            Fault::SlowDown,
            Fault::InternalAfterDone,
            Fault::ResetBefore,
            Fault::ResetAfterDone,
            stall(),
            Fault::CorruptBody,
        ],
        ..Plan::default()
    });
    let loc = s3_loc(proxy.port, "faults");
    let mut o = opts(16384);
    o.pack_size = 1 << 20;
    let repo = Repository::init_with(&loc, "pw", &o).unwrap();
    let a = disk_image(1, 3 << 20);
    let b = disk_image(2, 2 << 20);
    let sa = backup(&repo, &a, "vma", None).unwrap().snapshot_id;
    let sb = backup(&repo, &b, "vmb", None).unwrap().snapshot_id;
    let mut a2 = a.clone();
    a2[100_000..104_096].copy_from_slice(&random_bytes(3, 4096));
    let sa2 = backup(&repo, &a2, "vma", Some(sa.clone()))
        .unwrap()
        .snapshot_id;
    assert!(restored(&repo, &sa) == a);
    assert!(restored(&repo, &sb) == b);
    assert!(restored(&repo, &sa2) == a2);
    let c = repo.check(true).unwrap();
    assert!(c.ok, "{:?}", c.errors);
    repo.forget(&sb).unwrap();
    let p = repo.prune(&RetentionPolicy::default(), false).unwrap();
    assert_eq!(p.kept.len(), 2, "{p:?}");
    assert!(restored(&repo, &sa2) == a2);
    let s = &proxy.stats;
    let fired = [
        ("503 SlowDown", FaultProxy::count(&s.slowdowns)),
        ("500 after done", FaultProxy::count(&s.internal_after_done)),
        ("reset before", FaultProxy::count(&s.resets_before)),
        ("reset after done", FaultProxy::count(&s.resets_after_done)),
        ("stall past the timeout", FaultProxy::count(&s.stalls)),
        (
            "body damaged on the way",
            FaultProxy::count(&s.bodies_corrupted),
        ),
    ];
    eprintln!(
        "{} requests; faults fired: {fired:?}",
        FaultProxy::count(&s.requests)
    );
    for (what, n) in fired {
        assert!(n > 0, "the fault {what} never fired");
    }
    // Checked without faults: nothing the faults did is left damaged.
    proxy.set_plan(Plan::default());
    let c = Repository::open(&loc, "pw").unwrap().check(true).unwrap();
    assert!(c.ok, "{:?}", c.errors);
}

/// A server that answers every request with 503: a backup fails within a bounded time
/// with an error naming the request, no snapshot is presented, and once the server is
/// back the repository is clean and the next backup works.
fn persistent_outage(server_port: u16) {
    set_s3_timeout_for_tests(TIMEOUT_SECS);
    let proxy = FaultProxy::start(server_port);
    let loc = s3_loc(proxy.port, "outage");
    let repo = Repository::init_with(&loc, "pw", &opts(16384)).unwrap();
    let img = disk_image(5, 1 << 20);
    let first = backup(&repo, &img, "vm", None).unwrap().snapshot_id;
    for fault in [Fault::SlowDown, stall()] {
        proxy.set_plan(Plan {
            always: true,
            cycle: vec![fault],
            ..Plan::default()
        });
        let t = Instant::now();
        let e = backup(&repo, &disk_image(6, 1 << 20), "vm", Some(first.clone()))
            .expect_err("a backup into a store that is down must fail");
        let took = t.elapsed();
        let msg = e.to_string();
        assert!(matches!(e, RepoError::S3 { .. }), "{fault:?}: {msg}");
        assert!(
            msg.contains("coldclone-test/"),
            "the error names the object: {msg}"
        );
        if fault == Fault::SlowDown {
            assert!(msg.contains("503"), "{msg}");
        }
        // 4 attempts, 2.8 s of backoff, and each stalled attempt waits out the timeout.
        let bound = Duration::from_secs(4 + 4 * (TIMEOUT_SECS + 1));
        assert!(
            took < bound,
            "{fault:?}: failed after {took:?}, more than {bound:?}"
        );
        proxy.set_plan(Plan::default());
        let snaps = repo.snapshots().unwrap();
        assert_eq!(snaps.len(), 1, "{fault:?}: no second snapshot is presented");
        let c = repo.check(true).unwrap();
        assert!(c.ok, "{fault:?}: {:?}", c.errors);
    }
    let next = backup(&repo, &disk_image(6, 1 << 20), "vm", Some(first)).unwrap();
    assert!(restored(&repo, &next.snapshot_id) == disk_image(6, 1 << 20));
}

/// A listing that names a key outside the repository's prefix, or a page that says it is
/// truncated but gives no way on: refused with an error, never a panic, never a short
/// listing taken for the whole one.
fn hostile_listings(server_port: u16) {
    let proxy = FaultProxy::start(server_port);
    let loc = s3_loc(proxy.port, "hostile");
    let repo = Repository::init_with(&loc, "pw", &opts(16384)).unwrap();
    backup(&repo, &disk_image(7, 256 << 10), "vm", None).unwrap();
    let cases = [
        (
            "<Key>hostile/snapshots/",
            "<Key>other-repo/snapshots/x</Key></Contents><Contents><Key>hostile/snapshots/",
            "outside",
        ),
        (
            "<Key>hostile/snapshots/",
            "<Key>hostil\u{e9}/snapshots/",
            "outside",
        ),
        (
            "<IsTruncated>false</IsTruncated>",
            "<IsTruncated>true</IsTruncated>",
            "NextContinuationToken",
        ),
    ];
    for (find, replace, expect) in cases {
        proxy.set_plan(Plan {
            rewrite_listing: Some((find.into(), replace.into())),
            ..Plan::default()
        });
        let before = FaultProxy::count(&proxy.stats.listings_rewritten);
        let e = repo.snapshots().expect_err("a hostile listing is refused");
        assert!(FaultProxy::count(&proxy.stats.listings_rewritten) > before);
        assert!(e.to_string().contains(expect), "{replace}: {e}");
    }
    proxy.set_plan(Plan::default());
    assert_eq!(repo.snapshots().unwrap().len(), 1);
}

/// Packs larger than the multipart threshold (5 MiB here; 8 MiB packs) go up in parts.
/// Faults on the parts and completions (a 503, a 500 after the server acted, a reset
/// after, a reset before, a part's body damaged on the way) are retried part by part; a
/// completion whose answer was lost is found done; a damaged body is refused by the server
/// (Content-MD5) and sent again. Restores are byte-equal and check --read-data is clean.
fn multipart_under_faults(server_port: u16) {
    set_s3_timeout_for_tests(TIMEOUT_SECS);
    set_s3_multipart_threshold(5 << 20);
    let proxy = FaultProxy::start(server_port);
    let loc = s3_loc(proxy.port, "multipart");
    let mut o = opts(65536);
    o.pack_size = 8 << 20;
    let repo = Repository::init_with(&loc, "pw", &o).unwrap();
    // Random data does not compress: ~3 packs of 8 MiB, each in two parts.
    let a = random_bytes(21, 20 << 20);
    proxy.set_plan(Plan {
        every: 2,
        cycle: vec![
            Fault::CorruptBody,
            Fault::InternalAfterDone,
            Fault::ResetAfterDone,
            Fault::SlowDown,
            Fault::ResetBefore,
        ],
        only_matching: vec!["uploadId=".into()],
        ..Plan::default()
    });
    let sa = backup(&repo, &a, "vma", None).unwrap().snapshot_id;
    let s = &proxy.stats;
    let created = FaultProxy::count(&s.uploads_created);
    let parts = FaultProxy::count(&s.parts_uploaded);
    eprintln!(
        "multipart: {created} uploads, {parts} part requests, {} completions, {} aborts; {} bodies damaged",
        FaultProxy::count(&s.uploads_completed),
        FaultProxy::count(&s.uploads_aborted),
        FaultProxy::count(&s.bodies_corrupted)
    );
    assert!(created >= 2, "packs of 8 MiB went up in multipart uploads");
    assert!(parts >= 2 * created, "each in two parts or more");
    assert!(FaultProxy::count(&s.bodies_corrupted) > 0);
    assert!(FaultProxy::count(&s.internal_after_done) > 0);
    // Every other completion's answer is lost after the server completed it.
    proxy.set_plan(Plan {
        every: 2,
        cycle: vec![Fault::InternalAfterDone],
        only_matching: vec!["POST ".into(), "uploadId=".into()],
        ..Plan::default()
    });
    let b = random_bytes(22, 20 << 20);
    let sb = backup(&repo, &b, "vmb", None).unwrap().snapshot_id;
    assert!(FaultProxy::count(&s.internal_after_done) > 1);
    proxy.set_plan(Plan::default());
    assert!(restored(&repo, &sa) == a, "multipart restore a");
    assert!(restored(&repo, &sb) == b, "multipart restore b");
    let c = Repository::open(&loc, "pw").unwrap().check(true).unwrap();
    assert!(c.ok, "{:?}", c.errors);
}

#[test]
fn moto_s3_multipart_uploads_under_faults() {
    let Some(server) = start_moto() else { return };
    multipart_under_faults(server.port);
}

#[test]
fn s3s_fs_multipart_uploads_under_faults() {
    let Some(server) = start_s3s_fs() else { return };
    multipart_under_faults(server.port);
}

#[test]
fn moto_s3_transient_faults_are_retried() {
    let Some(server) = start_moto() else { return };
    transient_faults(server.port);
}

#[test]
fn s3s_fs_transient_faults_are_retried() {
    let Some(server) = start_s3s_fs() else { return };
    transient_faults(server.port);
}

#[test]
fn moto_s3_outage_fails_bounded_and_leaves_the_repository_clean() {
    let Some(server) = start_moto() else { return };
    persistent_outage(server.port);
}

#[test]
fn s3s_fs_hostile_listings_are_refused() {
    let Some(server) = start_s3s_fs() else { return };
    hostile_listings(server.port);
}
