//! kill -9 during a backup, and a full file system.
mod common;
use coldclone_repository::*;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "COLDCLONE_TEST_KILL_CHILD_REPO";

/// Not a test on its own: the body of the child process `kill9_during_backup` kills.
#[test]
fn kill9_child_helper() {
    let Ok(repo) = std::env::var(CHILD_ENV) else {
        return;
    };
    let r = Repository::open(&Location::Local(PathBuf::from(repo)), "pw").unwrap();
    let img = random_bytes(4242, 192 << 20);
    r.backup_disk(
        &MemSource(img),
        meta("victim", "xvda"),
        &BackupOptions::default(),
        &NoProgress,
    )
    .unwrap();
    // Only reached when the parent failed to kill in time.
    std::process::exit(3);
}

fn count_files(dir: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if !e.file_name().to_string_lossy().starts_with(".tmp") {
                n += 1;
            }
        }
    }
    n
}

#[test]
fn kill9_during_backup_leaves_a_valid_repository() {
    let dir = TempDir::new("kill9");
    let root = dir.path().join("repo");
    let loc = Location::Local(root.clone());
    let mut o = opts(16384);
    o.pack_size = 1 << 20;
    let repo = Repository::init_with(&loc, "pw", &o).unwrap();
    let before = repo
        .backup_disk(
            &MemSource(random_bytes(1, 1 << 20)),
            meta("keep", "xvda"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap();

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "kill9_child_helper",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &root)
        .spawn()
        .unwrap();
    // Kill it once it has written packs (and at least one index), mid-backup.
    let t = Instant::now();
    loop {
        if count_files(&root.join("index")) >= 2 && count_files(&root.join("data")) >= 40 {
            break;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!("child ended before it could be killed: {st}");
        }
        assert!(t.elapsed() < Duration::from_secs(300), "child too slow");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    let st = child.wait().unwrap();
    assert!(!st.success());

    let repo = Repository::open(&loc, "pw").unwrap();
    // The partial backup is invisible, the earlier one intact.
    let snaps = repo.snapshots().unwrap();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0].id, before.snapshot_id);
    let c = repo.check(true).unwrap();
    assert!(c.ok, "{c:?}");
    // The dead backup's lock does not block prune (its process is gone); prune keeps the
    // repository sound and removes the indexed leftovers.
    let p = repo.prune(&RetentionPolicy::default(), false).unwrap();
    assert!(p.packs_deleted > 0, "{p:?}");
    assert!(repo.check(true).unwrap().ok);
    // And backups go on.
    let img = random_bytes(7, 2 << 20);
    let s = repo
        .backup_disk(
            &MemSource(img.clone()),
            meta("after", "xvda"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap();
    let out = dir.path().join("out");
    repo.restore_with(&s.snapshot_id, &out, &FORCE, &NoProgress)
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == img);
}

struct Mount(PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_disk_gives_a_clear_error_and_no_damage() {
    let dir = TempDir::new("full");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=6m", "tmpfs"])
        .arg(&mnt)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !coldclone_testkit::require(ok, "a tmpfs mount (needs root)") {
        return;
    }
    let _m = Mount(mnt.clone());
    let root = mnt.join("repo");
    let loc = Location::Local(root.clone());
    let mut o = opts(16384);
    o.pack_size = 1 << 20;
    let repo = Repository::init_with(&loc, "pw", &o).unwrap();
    let small = random_bytes(1, 1 << 20);
    let first = repo
        .backup_disk(
            &MemSource(small.clone()),
            meta("vm", "a"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap();
    let e = repo
        .backup_disk(
            &MemSource(random_bytes(2, 16 << 20)),
            meta("vm", "b"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap_err();
    assert!(matches!(e, RepoError::StorageFull { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("storage full") && msg.contains("not damaged"),
        "{msg}"
    );
    // No temporary files left behind, the failed backup invisible, the repository sound.
    let mut tmp = 0;
    for d in std::fs::read_dir(root.join("data")).unwrap().flatten() {
        for f in std::fs::read_dir(d.path()).unwrap().flatten() {
            if f.file_name().to_string_lossy().starts_with(".tmp") {
                tmp += 1;
            }
        }
    }
    assert_eq!(tmp, 0);
    assert_eq!(repo.snapshots().unwrap().len(), 1);
    let c = repo.check(true).unwrap();
    assert!(c.ok, "{c:?}");
    // Prune frees the space the failed backup took; then a small backup fits again.
    repo.prune(&RetentionPolicy::default(), false).unwrap();
    let out = dir.path().join("out");
    repo.restore_with(&first.snapshot_id, &out, &FORCE, &NoProgress)
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == small);
    repo.backup_disk(
        &MemSource(random_bytes(3, 1 << 20)),
        meta("vm", "c"),
        &BackupOptions::default(),
        &NoProgress,
    )
    .unwrap();
    assert!(repo.check(true).unwrap().ok);
}

const WRITER_ENV: &str = "COLDCLONE_TEST_WRITER_REPO";

/// Not a test on its own: the body of the writer processes of `concurrent_writer_processes`.
#[test]
fn concurrent_writer_helper() {
    let Ok(repo) = std::env::var(WRITER_ENV) else {
        return;
    };
    let k: u64 = std::env::var("COLDCLONE_TEST_WRITER_K")
        .unwrap()
        .parse()
        .unwrap();
    let r = Repository::open(&Location::Local(PathBuf::from(repo)), "pw").unwrap();
    let mut img = random_bytes(777, 2 << 20); // shared by all writers
    img.extend(random_bytes(1000 + k, 6 << 20));
    let s = r
        .backup_disk(
            &MemSource(img),
            meta(&format!("vm{k}"), "xvda"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap();
    println!("SNAPSHOT {} {}", k, s.snapshot_id);
}

#[test]
fn concurrent_writer_processes_share_one_repository() {
    let dir = TempDir::new("writers");
    let root = dir.path().join("repo");
    let loc = Location::Local(root.clone());
    let mut o = opts(16384);
    o.pack_size = 1 << 20;
    Repository::init_with(&loc, "pw", &o).unwrap();
    let children: Vec<_> = (0..3u64)
        .map(|k| {
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "concurrent_writer_helper",
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(WRITER_ENV, &root)
                .env("COLDCLONE_TEST_WRITER_K", k.to_string())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut ids = std::collections::BTreeMap::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "a writer failed");
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            // libtest prints "test … ... " on the same line first.
            if let Some(rest) = l.find("SNAPSHOT ").map(|p| &l[p + 9..]) {
                let mut it = rest.split_whitespace();
                let k: u64 = it.next().unwrap().parse().unwrap();
                ids.insert(k, it.next().unwrap().to_string());
            }
        }
    }
    assert_eq!(ids.len(), 3);
    let repo = Repository::open(&loc, "pw").unwrap();
    assert_eq!(repo.snapshots().unwrap().len(), 3);
    let c = repo.check(true).unwrap();
    assert!(c.ok, "{c:?}");
    for (k, id) in &ids {
        let out = dir.path().join(format!("out{k}"));
        repo.restore_with(id, &out, &FORCE, &NoProgress).unwrap();
        let mut img = random_bytes(777, 2 << 20);
        img.extend(random_bytes(1000 + k, 6 << 20));
        assert!(
            std::fs::read(&out).unwrap() == img,
            "writer {k}'s disk differs"
        );
    }
    // Prune after concurrent writers keeps every snapshot restorable.
    repo.prune(&RetentionPolicy::default(), false).unwrap();
    assert!(repo.check(true).unwrap().ok);
}
