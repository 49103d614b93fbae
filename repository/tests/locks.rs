//! Lock refresh and expiry with shortened timings (a test binary of its own, because the
//! timings are process-wide).
mod common;
use coldclone_repository::*;
use common::*;
use std::time::Duration;

/// A disk that takes its time.
struct Slow(MemSource);

impl DiskSource for Slow {
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        std::thread::sleep(Duration::from_millis(2500));
        self.0.read_at(buf, offset)
    }
    fn data_ranges(&self) -> std::io::Result<Option<Vec<std::ops::Range<u64>>>> {
        Ok(None)
    }
}

#[test]
fn a_long_backup_keeps_its_lock_alive_and_prune_waits() {
    // Stale after 8 s, refreshed every second (with margin for a loaded machine).
    set_lock_timings_for_tests(1, 8);
    let dir = TempDir::new("locks");
    let loc = Location::Local(dir.path().join("repo"));
    let mut o = opts(16384);
    o.pack_size = 1 << 20;
    let repo = Repository::init_with(&loc, "pw", &o).unwrap();
    // 6 reads of 4 MiB batches, 2.5 s each: about 15 s, twice the stale age.
    let img = random_bytes(1, 6 * (4 << 20));
    std::thread::scope(|s| {
        let b = s.spawn(|| {
            repo.backup_disk(
                &Slow(MemSource(img.clone())),
                meta("vm", "d"),
                &BackupOptions::default(),
                &NoProgress,
            )
        });
        let other = Repository::open(&loc, "pw").unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let mut refused = 0;
        while !b.is_finished() {
            // Pretend to be another host: this host's locks are also judged by their pid.
            match other.prune(&RetentionPolicy::default(), true) {
                Err(RepoError::Locked(_)) => refused += 1,
                Ok(_) if b.is_finished() => {}
                r => panic!("prune ran during a backup: {r:?}"),
            }
            std::thread::sleep(Duration::from_millis(700));
        }
        assert!(refused >= 8, "prune was refused {refused} times");
        b.join().unwrap().unwrap();
    });
    // Once the backup is done its lock is gone.
    repo.prune(&RetentionPolicy::default(), false).unwrap();
    assert!(repo.check(true).unwrap().ok);
}
