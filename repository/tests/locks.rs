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

/// A pid that existed a moment ago and does not any more.
fn dead_pid() -> u32 {
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

#[test]
fn a_live_backup_on_a_cloned_host_of_the_same_name_is_not_taken_for_stale() {
    // Finding 6: two hypervisors cloned from one image share a host name. The other one's
    // backup holds a fresh lock whose pid does not exist here: it is live all the same.
    let dir = TempDir::new("clonedhost");
    let root = dir.path().join("repo");
    let loc = Location::Local(root.clone());
    let repo = Repository::init_with(&loc, "pw", &opts(16384)).unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    let now = real_now();
    let lock = serde_json::json!({"host": host, "host_id": "another-machine/another-boot/pid:[1]",
        "pid": dead_pid(), "time_unix": now, "exclusive": false, "purpose": "backup"});
    std::fs::write(root.join("locks/clone"), lock.to_string()).unwrap();
    let r = repo.prune(&RetentionPolicy::default(), false);
    assert!(
        matches!(r, Err(RepoError::Locked(_))),
        "prune ran beside the cloned host's live backup: {r:?}"
    );
    assert_eq!(repo.remove_stale_locks().unwrap(), 0);
    // A lock of an older version (no host id) is judged by its age only.
    let lock = serde_json::json!({"host": host, "pid": dead_pid(), "time_unix": now,
        "exclusive": false, "purpose": "backup"});
    std::fs::write(root.join("locks/clone"), lock.to_string()).unwrap();
    assert!(matches!(
        repo.prune(&RetentionPolicy::default(), false),
        Err(RepoError::Locked(_))
    ));
    std::fs::remove_file(root.join("locks/clone")).unwrap();
    // This host's own dead process: stale.
    let mine = serde_json::json!({"host": host, "host_id": own_host_id(&root), "pid": dead_pid(),
        "time_unix": now, "exclusive": false, "purpose": "backup"});
    std::fs::write(root.join("locks/mine"), mine.to_string()).unwrap();
    repo.prune(&RetentionPolicy::default(), false).unwrap();
    assert_eq!(repo.remove_stale_locks().unwrap(), 1);
}

/// This host's id as a lock of this process records it.
fn own_host_id(root: &std::path::Path) -> String {
    let loc = Location::Local(root.to_path_buf());
    let repo = Repository::open(&loc, "pw").unwrap();
    // A backup of a slow disk holds its lock long enough to read it.
    let src = Slow(MemSource(vec![1u8; 20_000]));
    std::thread::scope(|s| {
        let b = s.spawn(|| {
            repo.backup_disk(
                &src,
                meta("vm", "d"),
                &BackupOptions::default(),
                &NoProgress,
            )
        });
        let id = loop {
            let found = std::fs::read_dir(root.join("locks"))
                .unwrap()
                .filter_map(|e| std::fs::read(e.unwrap().path()).ok())
                .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .find(|v| v["pid"] == std::process::id());
            if let Some(v) = found {
                break v["host_id"].as_str().unwrap().to_string();
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        b.join().unwrap().unwrap();
        assert!(!id.is_empty(), "this host has no host id");
        id
    })
}

#[test]
fn an_unreadable_lock_is_held_until_unlocked_on_purpose() {
    // Finding 13: a lock object nobody can parse may be an exclusive one.
    let dir = TempDir::new("badlock");
    let root = dir.path().join("repo");
    let loc = Location::Local(root.clone());
    let repo = Repository::init_with(&loc, "pw", &opts(16384)).unwrap();
    std::fs::write(root.join("locks/0badc0de"), b"{not json").unwrap();
    let e = repo
        .backup_disk(
            &MemSource(vec![1; 5000]),
            meta("vm", "d"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, RepoError::Locked(_)) && msg.contains("coldclone unlock 0badc0de"),
        "{msg}"
    );
    assert!(matches!(
        repo.prune(&RetentionPolicy::default(), false),
        Err(RepoError::Locked(_))
    ));
    assert_eq!(repo.remove_stale_locks().unwrap(), 0);
    assert!(repo.unlock("nonexistent").is_err());
    assert!(repo.unlock("../config").is_err());
    assert_eq!(repo.unlock("0badc0de").unwrap(), "locks/0badc0de");
    repo.backup_disk(
        &MemSource(vec![1; 5000]),
        meta("vm", "d"),
        &BackupOptions::default(),
        &NoProgress,
    )
    .unwrap();
}
