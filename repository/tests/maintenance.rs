mod common;
use coldclone_repository::*;
use common::*;
use std::path::Path;

fn backup(repo: &Repository, img: &[u8], vm: &str) -> BackupSummary {
    repo.backup_disk(
        &MemSource(img.to_vec()),
        meta(vm, "xvda"),
        &BackupOptions::default(),
        &NoProgress,
    )
    .unwrap()
}

fn packs(repo: &Path) -> Vec<std::path::PathBuf> {
    let mut v = Vec::new();
    for d in std::fs::read_dir(repo.join("data")).unwrap() {
        for f in std::fs::read_dir(d.unwrap().path()).unwrap() {
            let p = f.unwrap().path();
            if !p.file_name().unwrap().to_string_lossy().starts_with(".tmp") {
                v.push(p);
            }
        }
    }
    v
}

#[test]
fn check_passes_on_a_sound_repository() {
    let dir = TempDir::new("checkok");
    let loc = Location::Local(dir.path().join("repo"));
    let repo = Repository::init_with(&loc, "pw", &opts(16384)).unwrap();
    backup(&repo, &disk_image(1, 2 << 20), "vm1");
    backup(&repo, &disk_image(2, 2 << 20), "vm2");
    for read_data in [false, true] {
        let r = repo.check(read_data).unwrap();
        assert!(r.ok, "{r:?}");
        assert_eq!(r.snapshots, 2);
        assert!(r.damaged_snapshots.is_empty());
        assert!(r.packs > 0 && r.blobs > 0);
        if read_data {
            assert!(r.bytes_read > 0);
        }
    }
}

#[test]
fn corrupted_chunk_is_reported_with_the_snapshots_it_hurts() {
    let dir = TempDir::new("corrupt");
    let root = dir.path().join("repo");
    let loc = Location::Local(root.clone());
    let mut o = opts(16384);
    o.pack_size = 1 << 20;
    let repo = Repository::init_with(&loc, "pw", &o).unwrap();
    // vm1 and vm2 share the first half; vm3 is unrelated.
    let shared = random_bytes(5, 1 << 20);
    let mut a = shared.clone();
    a.extend(random_bytes(6, 1 << 20));
    let mut b = shared.clone();
    b.extend(random_bytes(7, 1 << 20));
    let sa = backup(&repo, &a, "vm1");
    let sb = backup(&repo, &b, "vm2");
    // Flip one byte in the middle of the first pack written (holds the shared chunks).
    let mut ps = packs(&root);
    ps.sort_by_key(|p| std::fs::metadata(p).unwrap().modified().unwrap());
    let victim = &ps[0];
    let mut bytes = std::fs::read(victim).unwrap();
    bytes[1000] ^= 0x55;
    std::fs::write(victim, &bytes).unwrap();
    let sc = backup(&repo, &random_bytes(8, 1 << 20), "vm3");

    // Structure alone does not see it; reading the data does.
    assert!(repo.check(false).unwrap().ok);
    let r = repo.check(true).unwrap();
    assert!(!r.ok);
    assert!(
        r.errors
            .iter()
            .any(|e| e.contains("authentication") || e.contains("damaged")),
        "{:?}",
        r.errors
    );
    let hurt: Vec<&str> = r
        .damaged_snapshots
        .iter()
        .map(|d| d.snapshot_id.as_str())
        .collect();
    assert!(hurt.contains(&sa.snapshot_id.as_str()), "{hurt:?}");
    assert!(hurt.contains(&sb.snapshot_id.as_str()), "{hurt:?}");
    assert!(!hurt.contains(&sc.snapshot_id.as_str()), "{hurt:?}");
    for d in &r.damaged_snapshots {
        assert!(d.damaged_chunks >= 1);
        assert!(!d.vm.is_empty());
    }
    // Restore of a hurt snapshot fails loudly, never writes wrong data silently.
    let out = dir.path().join("out");
    assert!(matches!(
        repo.restore(&sa.snapshot_id, &out, &NoProgress),
        Err(RepoError::Corrupt { .. })
    ));
    repo.restore(&sc.snapshot_id, &out, &NoProgress).unwrap();
}

#[test]
fn missing_pack_is_reported() {
    let dir = TempDir::new("missing-pack");
    let root = dir.path().join("repo");
    let loc = Location::Local(root.clone());
    let repo = Repository::init_with(&loc, "pw", &opts(16384)).unwrap();
    let s = backup(&repo, &random_bytes(1, 3 << 20), "vm1");
    std::fs::remove_file(&packs(&root)[0]).unwrap();
    let r = repo.check(false).unwrap();
    assert!(!r.ok);
    assert!(
        r.errors.iter().any(|e| e.contains("missing")),
        "{:?}",
        r.errors
    );
    assert_eq!(r.damaged_snapshots.len(), 1);
    assert_eq!(r.damaged_snapshots[0].snapshot_id, s.snapshot_id);
}

#[test]
fn forget_and_prune_free_space_and_keep_the_rest_restorable() {
    let dir = TempDir::new("prune");
    let root = dir.path().join("repo");
    let loc = Location::Local(root.clone());
    let repo = Repository::init_with(&loc, "pw", &opts(16384)).unwrap();
    let imgs: Vec<Vec<u8>> = (0..4).map(|i| random_bytes(100 + i, 2 << 20)).collect();
    let ids: Vec<String> = imgs
        .iter()
        .map(|im| backup(&repo, im, "vm1").snapshot_id)
        .collect();
    let before: u64 = packs(&root)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();

    let policy = RetentionPolicy {
        default: Keep {
            last: 2,
            ..Default::default()
        },
        per_vm: Default::default(),
    };
    // Same second: order by (time, id); whatever is kept, exactly two stay.
    let dry = repo.prune(&policy, true).unwrap();
    assert!(dry.dry_run);
    assert_eq!(dry.removed.len(), 2);
    assert_eq!(
        repo.snapshots().unwrap().len(),
        4,
        "dry run changes nothing"
    );

    let r = repo.prune(&policy, false).unwrap();
    assert_eq!(r.removed.len(), 2);
    assert_eq!(r.kept.len(), 2);
    let after: u64 = packs(&root)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(after < before * 6 / 10, "before {before} after {after}");
    let c = repo.check(true).unwrap();
    assert!(c.ok, "{c:?}");
    for k in &r.kept {
        let i = ids.iter().position(|x| *x == k.id).unwrap();
        let out = dir.path().join("out");
        repo.restore(&k.id, &out, &NoProgress).unwrap();
        assert!(std::fs::read(&out).unwrap() == imgs[i]);
    }

    // forget + prune with a keep-all policy removes exactly the forgotten data.
    repo.forget(&r.kept[0].id).unwrap();
    let r2 = repo.prune(&RetentionPolicy::default(), false).unwrap();
    assert_eq!(r2.kept.len(), 1);
    assert!(r2.bytes_freed > 1 << 20, "{r2:?}");
    assert!(repo.check(true).unwrap().ok);
}

#[test]
fn prune_is_refused_while_a_lock_is_live() {
    let dir = TempDir::new("prunelock");
    let root = dir.path().join("repo");
    let loc = Location::Local(root.clone());
    let repo = Repository::init_with(&loc, "pw", &opts(16384)).unwrap();
    backup(&repo, &random_bytes(1, 100_000), "vm1");
    // A live shared lock of another process on this host (pid 1 always exists).
    let lock = serde_json::json!({"host": "some-other-host", "pid": 1, "time_unix":
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
        "exclusive": false, "purpose": "backup"});
    std::fs::write(root.join("locks/feedface"), lock.to_string()).unwrap();
    assert!(matches!(
        repo.prune(&RetentionPolicy::default(), false),
        Err(RepoError::Locked(_))
    ));
    // A stale one (not written for an hour, on the storage's clock) does not block.
    write_lock(&root, "feedface", "some-other-host", 1000, false, 3600);
    repo.prune(&RetentionPolicy::default(), false).unwrap();
    assert_eq!(repo.remove_stale_locks().unwrap(), 1);
    assert!(!root.join("locks/feedface").exists());
    // An exclusive lock blocks backups.
    let lock = serde_json::json!({"host": "some-other-host", "pid": 1, "time_unix":
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
        "exclusive": true, "purpose": "prune"});
    std::fs::write(root.join("locks/feedface"), lock.to_string()).unwrap();
    let e = repo
        .backup_disk(
            &MemSource(vec![1; 1000]),
            meta("vm", "d"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap_err();
    assert!(matches!(e, RepoError::Locked(_)), "{e}");
}
