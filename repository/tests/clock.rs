//! The wall clock going backwards (an NTP step, a wrong RTC): latest-snapshot selection,
//! retention and lock staleness must not follow it. The clock of this process is moved with
//! `set_clock_offset_for_tests`, process-wide: a test binary of its own, its tests one at
//! a time.
mod common;
use coldclone_repository::*;
use common::*;
use std::sync::Mutex;
use std::time::Duration;

static SERIAL: Mutex<()> = Mutex::new(());
const DAY: i64 = 86_400;

/// Holds the process-wide clock and lock timings; puts them back on drop.
struct Clock(#[allow(dead_code)] std::sync::MutexGuard<'static, ()>);
impl Clock {
    fn take() -> Clock {
        Clock(SERIAL.lock().unwrap_or_else(|e| e.into_inner()))
    }
    fn set(&self, offset: i64) {
        set_clock_offset_for_tests(offset);
    }
}
impl Drop for Clock {
    fn drop(&mut self) {
        set_clock_offset_for_tests(0);
        set_lock_timings_for_tests(300, 1800);
    }
}

fn backup(repo: &Repository, img: &[u8], parent: Option<String>, changed: Vec<u64>) -> String {
    let changed_ranges = parent
        .as_ref()
        .map(|_| changed.iter().map(|o| *o..*o + 100).collect());
    repo.backup_disk(
        &MemSource(img.to_vec()),
        meta("vm", "xvda"),
        &BackupOptions {
            parent,
            changed_ranges,
        },
        &NoProgress,
    )
    .unwrap()
    .snapshot_id
}

fn latest(repo: &Repository) -> String {
    repo.find_latest_on("testhost", "vm", "xvda")
        .unwrap()
        .unwrap()
        .id
}

#[test]
fn latest_snapshot_and_retention_follow_the_order_of_backups_not_the_clock() {
    let clock = Clock::take();
    let dir = TempDir::new("clock");
    let loc = Location::Local(dir.path().join("repo"));
    let repo = Repository::init_with(&loc, "pw", &opts(4096)).unwrap();
    let mut img = random_bytes(1, 200_000);
    let a = backup(&repo, &img, None, vec![]);
    clock.set(DAY);
    img[10_000..10_100].copy_from_slice(&random_bytes(2, 100));
    let b = backup(&repo, &img, Some(latest(&repo)), vec![10_000]);
    assert_eq!(latest(&repo), b);
    // The clock steps back ten days: C is newer than B all the same.
    clock.set(-10 * DAY);
    img[50_000..50_100].copy_from_slice(&random_bytes(3, 100));
    let c = backup(&repo, &img, Some(latest(&repo)), vec![50_000]);
    assert_eq!(latest(&repo), c, "the newest backup is the latest");
    // D's changed ranges are relative to C: taking B as the parent would lose C's change.
    img[150_000..150_100].copy_from_slice(&random_bytes(4, 100));
    let d = backup(&repo, &img, Some(latest(&repo)), vec![150_000]);
    assert_eq!(latest(&repo), d);
    assert_eq!(repo.find_latest("vm", "xvda").unwrap().unwrap().id, d);
    let out = dir.path().join("out");
    repo.restore_with(&d, &out, &FORCE, &NoProgress).unwrap();
    assert!(
        std::fs::read(&out).unwrap() == img,
        "D restores the disk as it was"
    );

    // Retention: "last 1" keeps D, the newest, whatever its time says; daily keeps the
    // newest of each day (D for the day the clock stepped back to, B for its day).
    let keep = |k: Keep| RetentionPolicy {
        default: k,
        per_vm: Default::default(),
    };
    let ids = |r: &PruneReport| {
        let mut v: Vec<String> = r.kept.iter().map(|s| s.id.clone()).collect();
        v.sort();
        v
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let r = repo
        .prune(
            &keep(Keep {
                daily: 2,
                ..Default::default()
            }),
            true,
        )
        .unwrap();
    assert_eq!(ids(&r), sorted(vec![b.clone(), d.clone()]), "{r:?}");
    let r = repo
        .prune(
            &keep(Keep {
                last: 1,
                ..Default::default()
            }),
            false,
        )
        .unwrap();
    assert_eq!(ids(&r), vec![d.clone()], "{r:?}");
    assert_eq!(r.removed.len(), 3);
    let _ = (a, c);
    repo.restore_with(&d, &out, &FORCE, &NoProgress).unwrap();
    assert!(std::fs::read(&out).unwrap() == img);
    let c = repo.check(true).unwrap();
    assert!(c.ok, "{c:?}");
}

#[test]
fn a_lock_is_judged_on_the_storage_clock_not_on_the_holders_or_ours() {
    let clock = Clock::take();
    let dir = TempDir::new("clocklock");
    let root = dir.path().join("repo");
    let loc = Location::Local(root.clone());
    let repo = Repository::init_with(&loc, "pw", &opts(4096)).unwrap();
    backup(&repo, &random_bytes(1, 50_000), None, vec![]);

    // A backup on another host whose clock is two hours behind (or went back): its lock
    // says "two hours old", but the storage saw it written just now. It is live.
    write_lock(&root, "behind", "other-host", real_now() - 7200, false, 0);
    let r = repo.prune(&RetentionPolicy::default(), false);
    assert!(
        matches!(r, Err(RepoError::Locked(_))),
        "prune ran beside a live backup: {r:?}"
    );
    assert_eq!(repo.remove_stale_locks().unwrap(), 0);
    std::fs::remove_file(root.join("locks/behind")).unwrap();

    // A lock really left two hours ago, judged after our clock stepped back three hours:
    // to our clock it comes from the future, but it is stale all the same.
    write_lock(&root, "dead", "other-host", real_now() - 7200, false, 7200);
    clock.set(-3 * 3600);
    repo.prune(&RetentionPolicy::default(), false)
        .expect("a dead lock must not block prune because our clock went back");
    assert_eq!(repo.remove_stale_locks().unwrap(), 1);
    assert!(!root.join("locks/dead").exists());

    // A live exclusive lock still blocks a backup whatever our clock says.
    write_lock(&root, "prune", "other-host", real_now() + 7200, true, 0);
    let e = repo
        .backup_disk(
            &MemSource(vec![1; 1000]),
            meta("vm", "xvda"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap_err();
    assert!(matches!(e, RepoError::Locked(_)), "{e}");
}

/// A disk whose reads take their time.
struct Slow(MemSource, Duration);
impl DiskSource for Slow {
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        std::thread::sleep(self.1);
        self.0.read_at(buf, offset)
    }
    fn data_ranges(&self) -> std::io::Result<Option<Vec<std::ops::Range<u64>>>> {
        Ok(None)
    }
}

#[test]
fn a_holder_whose_clock_went_back_does_not_commit_after_a_silence() {
    let clock = Clock::take();
    // Stale after 4 s; the lock is never refreshed during this backup (every 1000 s).
    set_lock_timings_for_tests(1000, 4);
    let dir = TempDir::new("clockfresh");
    let loc = Location::Local(dir.path().join("repo"));
    let repo = Repository::init_with(&loc, "pw", &opts(16384)).unwrap();
    let img = random_bytes(5, 2 * (4 << 20)); // two 4 MiB reads, 3 s each
    let r = std::thread::scope(|s| {
        let h = s.spawn(|| {
            repo.backup_disk(
                &Slow(MemSource(img.clone()), Duration::from_secs(3)),
                meta("vm", "xvda"),
                &BackupOptions::default(),
                &NoProgress,
            )
        });
        std::thread::sleep(Duration::from_secs(1));
        // The wall clock steps back an hour while the backup runs.
        clock.set(-3600);
        h.join().unwrap()
    });
    // Six seconds without a refresh: others may have taken the lock for stale and pruned.
    match r {
        Err(RepoError::Locked(m)) => assert!(m.contains("not refreshed"), "{m}"),
        r => panic!("the backup committed after 6 s without a refresh: {r:?}"),
    }
    assert!(repo.snapshots().unwrap().is_empty());
    assert!(repo.check(false).unwrap().ok);
}
