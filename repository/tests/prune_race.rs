//! A real prune process against a running backup (finding 6): the prune cannot see the
//! backup's lock as live (here: it judges locks stale after 2 s, as a host whose view of
//! the lock went wrong would), so only the grace period for young packs stands between it
//! and the packs the backup has indexed but not yet referenced from a snapshot.
mod common;
use coldclone_repository::*;
use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "COLDCLONE_TEST_PRUNE_CHILD_REPO";
/// The backup stops reading here until the prune process has run.
const GATE: u64 = 40 << 20;

struct Gated<'a> {
    disk: MemSource,
    open: &'a AtomicBool,
}

impl DiskSource for Gated<'_> {
    fn len(&self) -> u64 {
        self.disk.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        while offset >= GATE && !self.open.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.disk.read_at(buf, offset)
    }
    fn data_ranges(&self) -> std::io::Result<Option<Vec<std::ops::Range<u64>>>> {
        Ok(None)
    }
}

/// The prune process: this test binary run again, with only this test, by the one below.
#[test]
#[ignore = "the child process of a_prune_process_racing_a_backup_leaves_its_young_packs_alone"]
fn prune_child() {
    // Run only as that child: without the variable there is nothing to prune.
    let Ok(root) = std::env::var(CHILD_ENV) else {
        return;
    };
    set_lock_timings_for_tests(1, 2);
    let repo = Repository::open(&Location::Local(root.into()), "pw").unwrap();
    let r = repo.prune(&RetentionPolicy::default(), false).unwrap();
    println!("child prune: {r:?}");
}

#[test]
fn a_prune_process_racing_a_backup_leaves_its_young_packs_alone() {
    let dir = TempDir::new("prunerace");
    let root = dir.path().join("repo");
    let loc = Location::Local(root.clone());
    let repo = Repository::init_with(&loc, "pw", &opts(16384)).unwrap();
    // Random: every chunk new, about one pack per MiB; an index file after 32 packs.
    let img = random_bytes(6, 48 << 20);
    let open = AtomicBool::new(false);
    let src = Gated {
        disk: MemSource(img.clone()),
        open: &open,
    };
    let snap = std::thread::scope(|s| {
        let b = s.spawn(|| {
            repo.backup_disk(
                &src,
                meta("vm", "d"),
                &BackupOptions::default(),
                &NoProgress,
            )
        });
        // Wait for the first index file: packs indexed, no snapshot uses them yet.
        let t0 = Instant::now();
        while std::fs::read_dir(root.join("index")).unwrap().count() == 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "no index was written"
            );
            assert!(!b.is_finished(), "the backup ended early");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Older than the child's 2 s stale age, long before this process refreshes.
        std::thread::sleep(Duration::from_secs(3));
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "prune_child", "--ignored", "--nocapture"])
            .env(CHILD_ENV, &root)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "the prune process failed: {text}");
        assert!(
            text.contains("child prune"),
            "the prune did not run: {text}"
        );
        open.store(true, Ordering::SeqCst);
        b.join().unwrap().unwrap()
    });
    let c = repo.check(true).unwrap();
    assert!(
        c.ok,
        "the backup committed a snapshot of pruned data: {} errors, first {:?}",
        c.errors.len(),
        c.errors.first()
    );
    let out = dir.path().join("out");
    repo.restore(&snap.snapshot_id, &out, &NoProgress).unwrap();
    assert!(std::fs::read(&out).unwrap() == img);
}
