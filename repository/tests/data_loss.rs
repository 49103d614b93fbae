//! Where data could be lost: an incremental whose parent is gone, a disk that shrinks, two
//! hosts with a VM of the same name, a prune process beside a running backup process.
// Changed-block maps are lists of ranges; a list of one range is meant.
#![allow(clippy::single_range_in_vec_init)]
mod common;
use coldclone_repository::*;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn meta_on(host: &str, vm: &str) -> SnapshotMeta {
    SnapshotMeta {
        host: host.into(),
        host_uuid: String::new(),
        ..meta(vm, "xvda")
    }
}

fn backup(repo: &Repository, img: &[u8], m: SnapshotMeta, opts: BackupOptions) -> BackupSummary {
    repo.backup_disk(&MemSource(img.to_vec()), m, &opts, &NoProgress)
        .unwrap()
}

fn incremental(parent: &str, changed: &[std::ops::Range<u64>]) -> BackupOptions {
    BackupOptions {
        parent: Some(parent.into()),
        changed_ranges: Some(changed.to_vec()),
    }
}

fn restored(repo: &Repository, id: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("restored");
    repo.restore_with(id, &out, &FORCE, &NoProgress).unwrap();
    std::fs::read(&out).unwrap()
}

fn keep_last(n: u32) -> RetentionPolicy {
    RetentionPolicy {
        default: Keep {
            last: n,
            ..Default::default()
        },
        per_vm: Default::default(),
    }
}

#[test]
fn an_incremental_restores_after_its_parent_was_forgotten_and_pruned() {
    let dir = TempDir::new("orphaninc");
    let loc = Location::Local(dir.path().join("repo"));
    let mut o = opts(16384);
    o.pack_size = 1 << 20;
    let repo = Repository::init_with(&loc, "pw", &o).unwrap();
    let mut img = disk_image(1, 6 << 20);
    let full = backup(&repo, &img, meta("vm", "xvda"), BackupOptions::default());
    let mut changed = Vec::new();
    for (k, off) in [100_000u64, 2_500_000, 5_000_000].into_iter().enumerate() {
        img[off as usize..off as usize + 5000].copy_from_slice(&random_bytes(10 + k as u64, 5000));
        changed.push(off..off + 5000);
    }
    let inc = backup(
        &repo,
        &img,
        meta("vm", "xvda"),
        incremental(&full.snapshot_id, &changed),
    );
    assert!(inc.reused_unread_chunks > 300, "{inc:?}");
    repo.forget(&full.snapshot_id).unwrap();
    let p = repo.prune(&RetentionPolicy::default(), false).unwrap();
    assert_eq!(p.kept.len(), 1);
    assert!(
        p.packs_deleted + p.packs_repacked > 0,
        "the parent's own chunks go: {p:?}"
    );
    let c = repo.check(true).unwrap();
    assert!(c.ok, "{c:?}");
    assert!(
        restored(&repo, &inc.snapshot_id, dir.path()) == img,
        "incremental differs"
    );
    // And the chain goes on from the orphan.
    img[3_000_000..3_000_100].copy_from_slice(&random_bytes(20, 100));
    let inc2 = backup(
        &repo,
        &img,
        meta("vm", "xvda"),
        incremental(&inc.snapshot_id, &[3_000_000..3_000_100]),
    );
    repo.forget(&inc.snapshot_id).unwrap();
    repo.prune(&RetentionPolicy::default(), false).unwrap();
    assert!(restored(&repo, &inc2.snapshot_id, dir.path()) == img);
    assert!(repo.check(true).unwrap().ok);
}

#[test]
fn a_disk_that_shrinks_restores_at_its_new_size() {
    let dir = TempDir::new("shrink");
    let loc = Location::Local(dir.path().join("repo"));
    let repo = Repository::init_with(&loc, "pw", &opts(4096)).unwrap();
    let big = disk_image(3, (1 << 20) + 1234);
    let a = backup(&repo, &big, meta("vm", "xvda"), BackupOptions::default());
    // Shrinks to a size inside a chunk; the changed-block map also names the cut-off tail.
    let mut small = big[..600_077].to_vec();
    small[300_000..300_010].copy_from_slice(b"0123456789");
    let b = backup(
        &repo,
        &small,
        meta("vm", "xvda"),
        incremental(
            &a.snapshot_id,
            &[300_000..300_010, 600_000..(1 << 20) + 1234],
        ),
    );
    assert_eq!(b.bytes, 600_077);
    // Restored over the bigger disk's image: the file takes the smaller size.
    let out = dir.path().join("restored");
    repo.restore_with(&a.snapshot_id, &out, &FORCE, &NoProgress)
        .unwrap();
    repo.restore_with(&b.snapshot_id, &out, &FORCE, &NoProgress)
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == small, "shrunk disk differs");
    // Shrinks again, to a whole number of chunks, with no changed-block map; then grows.
    let smaller = small[..40 * 4096].to_vec();
    let c = backup(
        &repo,
        &smaller,
        meta("vm", "xvda"),
        BackupOptions {
            parent: Some(b.snapshot_id.clone()),
            changed_ranges: None,
        },
    );
    assert!(restored(&repo, &c.snapshot_id, dir.path()) == smaller);
    let mut grown = smaller.clone();
    grown.extend(random_bytes(4, 10_000));
    let d = backup(
        &repo,
        &grown,
        meta("vm", "xvda"),
        incremental(&c.snapshot_id, &[]),
    );
    assert!(restored(&repo, &d.snapshot_id, dir.path()) == grown);
    // The older, bigger snapshots are untouched.
    assert!(restored(&repo, &a.snapshot_id, dir.path()) == big);
    assert!(restored(&repo, &b.snapshot_id, dir.path()) == small);
    assert!(repo.check(true).unwrap().ok);
}

#[test]
fn two_hosts_with_a_vm_of_the_same_name_are_kept_apart() {
    let dir = TempDir::new("twohosts");
    let loc = Location::Local(dir.path().join("repo"));
    let repo = Repository::init_with(&loc, "pw", &opts(4096)).unwrap();
    // Host a is this machine (find_latest prefers it); host b is another one.
    let here = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    let (ha, hb) = (here.as_str(), "other-host-b");
    let mut img_a = random_bytes(1, 100_000);
    let mut img_b = random_bytes(2, 100_000);
    let a1 = backup(&repo, &img_a, meta_on(ha, "web"), BackupOptions::default());
    let b1 = backup(&repo, &img_b, meta_on(hb, "web"), BackupOptions::default());
    let latest = |h: &str| repo.find_latest_on(h, "web", "xvda").unwrap().unwrap().id;
    assert_eq!(latest(ha), a1.snapshot_id);
    assert_eq!(latest(hb), b1.snapshot_id);
    img_a[1000..1100].copy_from_slice(&random_bytes(3, 100));
    let a2 = backup(
        &repo,
        &img_a,
        meta_on(ha, "web"),
        incremental(&latest(ha), &[1000..1100]),
    );
    img_b[9000..9100].copy_from_slice(&random_bytes(4, 100));
    let b2 = backup(
        &repo,
        &img_b,
        meta_on(hb, "web"),
        incremental(&latest(hb), &[9000..9100]),
    );
    assert_eq!(latest(ha), a2.snapshot_id);
    assert_eq!(latest(hb), b2.snapshot_id);
    // The name alone: this host's latest, though host b's backup is newer.
    assert_eq!(
        repo.find_latest("web", "xvda").unwrap().unwrap().id,
        a2.snapshot_id
    );
    // A caller that passes the other host's snapshot as the parent of a changed-block
    // incremental: its chunks cannot stand for this disk's, everything is read.
    img_a[50_000..50_100].copy_from_slice(&random_bytes(5, 100));
    let a3 = backup(
        &repo,
        &img_a,
        meta_on(ha, "web"),
        incremental(&b2.snapshot_id, &[50_000..50_100]),
    );
    assert_eq!(a3.bytes_read, 100_000);
    assert!(restored(&repo, &a3.snapshot_id, dir.path()) == img_a);

    // Retention is per host: "last 1" keeps the newest of each host.
    let r = repo.prune(&keep_last(1), false).unwrap();
    let mut kept: Vec<String> = r.kept.iter().map(|s| s.id.clone()).collect();
    kept.sort();
    let mut want = vec![a3.snapshot_id.clone(), b2.snapshot_id.clone()];
    want.sort();
    assert_eq!(kept, want, "{r:?}");
    assert!(restored(&repo, &b2.snapshot_id, dir.path()) == img_b);
    // Forgetting and pruning host b's backup leaves host a's whole.
    repo.forget(&b2.snapshot_id).unwrap();
    repo.prune(&RetentionPolicy::default(), false).unwrap();
    assert!(restored(&repo, &a3.snapshot_id, dir.path()) == img_a);
    assert!(repo.find_latest_on(hb, "web", "xvda").unwrap().is_none());
    assert!(repo.check(true).unwrap().ok);
}

/// Two hosts cloned from one image: one host name, one VM name, a uuid each (their
/// state folders'). Before host uuids, "last 1" kept one of the two hosts' backups and
/// the second host's next backup took the first's as its parent.
#[test]
fn two_hosts_of_one_name_are_kept_apart_by_their_uuids() {
    let dir = TempDir::new("uuidhosts");
    let loc = Location::Local(dir.path().join("repo"));
    let repo = Repository::init_with(&loc, "pw", &opts(4096)).unwrap();
    // A backup from before host uuids, of this host name.
    let here = HostIdentity::by_name_only();
    let mut img_a = random_bytes(11, 100_000);
    let legacy = backup(
        &repo,
        &img_a,
        meta_on(&here.name, "web"),
        BackupOptions::default(),
    );
    let ha = HostIdentity::load_or_create(&dir.path().join("state-a")).unwrap();
    let hb = HostIdentity::load_or_create(&dir.path().join("state-b")).unwrap();
    assert_eq!(ha.name, hb.name);
    assert_ne!(ha.uuid, hb.uuid);
    let on = |h: &HostIdentity| SnapshotMeta {
        host: h.name.clone(),
        host_uuid: h.uuid.clone(),
        ..meta("web", "xvda")
    };
    // Host A (upgraded) carries on the chain of its name: the old snapshot is its parent.
    let latest = |h: &HostIdentity| repo.find_latest_of(h, "web", "xvda").unwrap().unwrap();
    assert_eq!(latest(&ha).id, legacy.snapshot_id);
    img_a[0..100].copy_from_slice(&random_bytes(12, 100));
    let a1 = backup(
        &repo,
        &img_a,
        on(&ha),
        incremental(&latest(&ha).id, &[0..100]),
    );
    // The changed chunk (and the short last chunk), not the whole disk.
    assert!(
        a1.bytes_read <= 2 * 4096,
        "the chain of its name did not carry on: {a1:?}"
    );
    // Host B's first backup; B is newer, yet A's latest is A's, and B's is B's.
    let img_b = random_bytes(13, 100_000);
    let b1 = backup(&repo, &img_b, on(&hb), BackupOptions::default());
    assert_eq!(latest(&ha).id, a1.snapshot_id);
    assert_eq!(latest(&hb).id, b1.snapshot_id);
    // B's map-driven incremental with A's snapshot as parent: refused, all read.
    let b2 = backup(
        &repo,
        &img_b,
        on(&hb),
        incremental(&a1.snapshot_id, &[0..100]),
    );
    assert_eq!(b2.bytes_read, 100_000);
    assert!(restored(&repo, &b2.snapshot_id, dir.path()) == img_b);
    // The same uuid under a new host name (renamed host): still A's chain.
    let renamed = HostIdentity {
        name: "renamed-a".into(),
        uuid: ha.uuid.clone(),
    };
    assert_eq!(latest(&renamed).id, a1.snapshot_id);
    // Retention per uuid: "last 1" keeps A's and B's newest (and the old one, a group of
    // its own: snapshots without a uuid are kept by host name).
    let r = repo.prune(&keep_last(1), false).unwrap();
    let kept: std::collections::BTreeSet<String> = r.kept.iter().map(|s| s.id.clone()).collect();
    let want: std::collections::BTreeSet<String> =
        [&a1.snapshot_id, &b2.snapshot_id, &legacy.snapshot_id]
            .into_iter()
            .cloned()
            .collect();
    assert_eq!(kept, want, "{r:?}");
    assert!(restored(&repo, &a1.snapshot_id, dir.path()) == img_a);
    // Snapshots show their host's uuid.
    let s = repo.find_snapshot(&b2.snapshot_id).unwrap();
    assert_eq!(s.host_uuid, hb.uuid);
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["host_uuid"], hb.uuid.as_str());
    assert!(repo.check(true).unwrap().ok);
}

/// A disk whose reads wait until `.1` is set (at most a minute).
struct Gated(MemSource, std::sync::atomic::AtomicBool);
impl DiskSource for Gated {
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let t = Instant::now();
        while !self.1.load(std::sync::atomic::Ordering::SeqCst) && t.elapsed().as_secs() < 60 {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.0.read_at(buf, offset)
    }
    fn data_ranges(&self) -> std::io::Result<Option<Vec<std::ops::Range<u64>>>> {
        Ok(None)
    }
}

/// A lock names its holder's host uuid, and a refusal shows it.
#[test]
fn a_lock_names_its_holders_uuid() {
    let dir = TempDir::new("lockuuid");
    let root = dir.path().join("repo");
    let loc = Location::Local(root.clone());
    let _ = Repository::init_with(&loc, "pw", &opts(16384)).unwrap();
    let h = HostIdentity::load_or_create(&dir.path().join("state")).unwrap();
    let mut repo = Repository::open(&loc, "pw").unwrap();
    repo.set_host(h.clone());
    // Reads wait until the test has tried its prune: the lock is held meanwhile.
    let src = Gated(
        MemSource(vec![1u8; 1 << 20]),
        std::sync::atomic::AtomicBool::new(false),
    );
    std::thread::scope(|s| {
        let b = s.spawn(|| {
            repo.backup_disk(
                &src,
                meta("vm", "d"),
                &BackupOptions::default(),
                &NoProgress,
            )
        });
        let t = Instant::now();
        let lock = loop {
            let found = std::fs::read_dir(root.join("locks"))
                .unwrap()
                .flatten()
                // Not the local backend's temporary file of a lock being written.
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .filter_map(|e| std::fs::read(e.path()).ok())
                .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .find(|v| v["purpose"] == "backup");
            if let Some(v) = found {
                break v;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "no lock");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(lock["host_uuid"], h.uuid.as_str());
        assert_eq!(lock["host"], h.name.as_str());
        let other = Repository::open(&loc, "pw").unwrap();
        match other.prune(&RetentionPolicy::default(), false) {
            Err(RepoError::Locked(m)) => assert!(m.contains(&h.uuid[..8]), "{m}"),
            r => panic!("prune beside a backup: {r:?}"),
        }
        src.1.store(true, std::sync::atomic::Ordering::SeqCst);
        b.join().unwrap().unwrap();
    });
}

// ---- a prune process against a running backup process ----

const BACKUP_ENV: &str = "COLDCLONE_TEST_SLOW_BACKUP_REPO";
const PRUNE_ENV: &str = "COLDCLONE_TEST_PRUNE_LOOP_REPO";

/// The disk the backup process writes: the forgotten snapshot's first 8 MiB (which it
/// dedups against), then 16 MiB of its own.
fn running_backup_image() -> Vec<u8> {
    let mut v = random_bytes(500, 8 << 20);
    v.extend(random_bytes(501, 16 << 20));
    v
}

/// 4 MiB reads, 1 s each.
struct Slow(MemSource);
impl DiskSource for Slow {
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        std::thread::sleep(Duration::from_millis(1000));
        self.0.read_at(buf, offset)
    }
    fn data_ranges(&self) -> std::io::Result<Option<Vec<std::ops::Range<u64>>>> {
        Ok(None)
    }
}

/// Not a test on its own: the backup process of `prune_process_beside_a_backup_process`.
#[test]
fn slow_backup_process_helper() {
    let Ok(root) = std::env::var(BACKUP_ENV) else {
        return;
    };
    let r = Repository::open(&Location::Local(PathBuf::from(root)), "pw").unwrap();
    let s = r
        .backup_disk(
            &Slow(MemSource(running_backup_image())),
            meta("running", "xvda"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap();
    println!("SNAPSHOT {}", s.snapshot_id);
}

/// Not a test on its own: prunes in a loop until the file `stop` appears beside the
/// repository, then prunes once more.
#[test]
fn prune_loop_process_helper() {
    let Ok(root) = std::env::var(PRUNE_ENV) else {
        return;
    };
    // The data here is seconds old: the lock, not the grace for young packs, is tested.
    set_prune_grace_for_tests(0);
    let root = PathBuf::from(root);
    let stop = root.with_file_name("stop");
    let t = Instant::now();
    loop {
        let last = stop.exists();
        let r = Repository::open(&Location::Local(root.clone()), "pw").unwrap();
        match r.prune(&RetentionPolicy::default(), false) {
            Ok(p) => println!(
                "PRUNE OK {} {}",
                p.packs_deleted + p.packs_repacked,
                p.removed.len()
            ),
            Err(RepoError::Locked(_)) => println!("PRUNE LOCKED"),
            Err(e) => panic!("prune failed: {e}"),
        }
        if last || t.elapsed() > Duration::from_secs(120) {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn helper(name: &str, env: &str, root: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(env, root)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn prune_process_beside_a_backup_process_loses_nothing() {
    let dir = TempDir::new("pruneproc");
    let root = dir.path().join("repo");
    let loc = Location::Local(root.clone());
    let mut o = opts(16384);
    o.pack_size = 1 << 20;
    let repo = Repository::init_with(&loc, "pw", &o).unwrap();
    // A forgotten snapshot whose data prune may free: half of it the running backup will
    // find in the index and not store again.
    let mut old = random_bytes(500, 8 << 20);
    old.extend(random_bytes(502, 8 << 20));
    let s0 = backup(&repo, &old, meta("old", "xvda"), BackupOptions::default());
    repo.forget(&s0.snapshot_id).unwrap();

    let backup_child = helper("slow_backup_process_helper", BACKUP_ENV, &root);
    // Start the prune process once the backup holds its lock.
    let t = Instant::now();
    // The backup's own lock, not the probe object the stale-lock check writes and removes
    // at open (seen first under load, it let prune in before the backup locked).
    let backup_locked = || {
        std::fs::read_dir(root.join("locks"))
            .unwrap()
            .flatten()
            .any(|e| {
                std::fs::read_to_string(e.path())
                    .is_ok_and(|t| t.contains("\"purpose\":\"backup\""))
            })
    };
    while !backup_locked() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the backup took no lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let prune_child = helper("prune_loop_process_helper", PRUNE_ENV, &root);
    let b = backup_child.wait_with_output().unwrap();
    assert!(b.status.success(), "the backup process failed");
    std::fs::write(dir.path().join("stop"), b"").unwrap();
    let p = prune_child.wait_with_output().unwrap();
    assert!(p.status.success(), "the prune process failed");

    let bout = String::from_utf8_lossy(&b.stdout);
    let id = bout
        .lines()
        .find_map(|l| l.find("SNAPSHOT ").map(|i| l[i + 9..].trim().to_string()))
        .expect("the backup printed its snapshot");
    let pout = String::from_utf8_lossy(&p.stdout);
    let locked = pout.matches("PRUNE LOCKED").count();
    let oks: Vec<&str> = pout.lines().filter(|l| l.contains("PRUNE OK")).collect();
    assert!(locked >= 1, "prune never met the running backup:\n{pout}");
    assert!(!oks.is_empty(), "prune never ran:\n{pout}");
    let freed: u64 = oks
        .iter()
        .map(|l| {
            l.split_whitespace()
                .rev()
                .nth(1)
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert!(
        freed > 0,
        "the forgotten snapshot's own data was not freed:\n{pout}"
    );

    let repo = Repository::open(&loc, "pw").unwrap();
    let snaps = repo.snapshots().unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0].id, id);
    let c = repo.check(true).unwrap();
    assert!(c.ok, "{c:?}");
    assert!(restored(&repo, &id, dir.path()) == running_backup_image());
}

/// Flip one byte in the middle of the largest pack: a chunk in it fails authentication.
fn damage_a_pack(root: &Path) {
    let mut packs: Vec<PathBuf> = Vec::new();
    for d in std::fs::read_dir(root.join("data")).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            packs.push(f.unwrap().path());
        }
    }
    let p = packs
        .iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut b = std::fs::read(p).unwrap();
    let mid = b.len() / 3;
    b[mid] ^= 0x40;
    std::fs::write(p, b).unwrap();
}

#[test]
fn a_failed_restore_leaves_the_existing_target_as_it_was() {
    // Finding 7: restore used to truncate its target first, write what it could and fail.
    let dir = TempDir::new("restoretarget");
    let root = dir.path().join("repo");
    let repo = Repository::init_with(&Location::Local(root.clone()), "pw", &opts(4096)).unwrap();
    let img = random_bytes(3, 3 << 20);
    let s = backup(&repo, &img, meta("vm", "xvda"), BackupOptions::default());
    let target = dir.path().join("vm.img");
    let before = random_bytes(4, 5 << 20);
    std::fs::write(&target, &before).unwrap();

    // Without force an existing file is refused, and left alone.
    let e = repo
        .restore(&s.snapshot_id, &target, &NoProgress)
        .unwrap_err();
    assert!(e.to_string().contains("--force"), "{e}");
    assert!(std::fs::read(&target).unwrap() == before);

    // With force, a chunk that fails authentication half-way leaves the target unchanged
    // and no temporary file behind.
    damage_a_pack(&root);
    let e = repo
        .restore_with(&s.snapshot_id, &target, &FORCE, &NoProgress)
        .unwrap_err();
    assert!(matches!(e, RepoError::Corrupt { .. }), "{e}");
    assert!(
        std::fs::read(&target).unwrap() == before,
        "the failed restore changed the target"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("coldclone-restore"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");

    // A snapshot whose pack is gone is refused before anything is created.
    let s2 = backup(
        &repo,
        &random_bytes(5, 100_000),
        meta("vm", "xvdb"),
        BackupOptions::default(),
    );
    let newest = std::fs::read_dir(root.join("data"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|f| f.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap())
        .unwrap();
    std::fs::remove_file(newest).unwrap();
    let fresh = dir.path().join("fresh.img");
    assert!(repo.restore(&s2.snapshot_id, &fresh, &NoProgress).is_err());
    assert!(!fresh.exists());

    // A good restore with force replaces the file whole.
    let s3 = backup(
        &repo,
        &random_bytes(6, 200_000),
        meta("vm", "xvdc"),
        BackupOptions::default(),
    );
    repo.restore_with(&s3.snapshot_id, &target, &FORCE, &NoProgress)
        .unwrap();
    assert!(std::fs::read(&target).unwrap() == random_bytes(6, 200_000));
}
