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
        repo.restore_with(&sa.snapshot_id, &out, &FORCE, &NoProgress),
        Err(RepoError::Corrupt { .. })
    ));
    repo.restore_with(&sc.snapshot_id, &out, &FORCE, &NoProgress)
        .unwrap();
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
        repo.restore_with(&k.id, &out, &FORCE, &NoProgress).unwrap();
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

fn files_in(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with(".tmp"))
        .collect();
    v.sort();
    v
}

fn flip_byte(p: &Path, at: usize) {
    let mut b = std::fs::read(p).unwrap();
    let at = at.min(b.len() - 1);
    b[at] ^= 0x20;
    std::fs::write(p, b).unwrap();
}

#[test]
fn a_damaged_index_file_blocks_no_restore_backup_or_prune() {
    // Finding 8: one bad index file used to fail every restore, backup and prune.
    let dir = TempDir::new("badindex");
    let root = dir.path().join("repo");
    let loc = Location::Local(root.clone());
    let repo = Repository::init_with(&loc, "pw", &opts(16384)).unwrap();
    let (a, b) = (disk_image(1, 2 << 20), disk_image(2, 2 << 20));
    let sa = backup(&repo, &a, "vm1");
    let sb = backup(&repo, &b, "vm2");
    let idx = files_in(&root.join("index"));
    assert_eq!(idx.len(), 2);
    for f in &idx {
        flip_byte(f, 40);
    }
    // Restores: the packs are read from their headers.
    let out = dir.path().join("out");
    for (s, img) in [(&sa, &a), (&sb, &b)] {
        repo.restore_with(&s.snapshot_id, &out, &FORCE, &NoProgress)
            .unwrap();
        assert!(std::fs::read(&out).unwrap() == *img);
    }
    // check reports the damaged files and names the repair, but finds every chunk.
    let c = repo.check(true).unwrap();
    assert!(!c.ok);
    assert_eq!(c.errors.len(), 2, "{:?}", c.errors);
    assert!(c.errors.iter().all(|e| e.contains("repair-index")), "{c:?}");
    assert!(c.damaged_snapshots.is_empty(), "{c:?}");
    // A backup still deduplicates against the packs of the damaged files.
    let again = backup(&repo, &a, "vm1");
    assert_eq!(again.new_chunks, 0);
    // Prune frees vm2's data, writes one index for what stays and removes the damaged
    // files.
    repo.forget(&sb.snapshot_id).unwrap();
    let p = repo.prune(&RetentionPolicy::default(), false).unwrap();
    assert!(p.packs_deleted > 0, "{p:?}");
    for f in &idx {
        assert!(!f.exists(), "damaged index {} left", f.display());
    }
    let c = repo.check(true).unwrap();
    assert!(c.ok, "{c:?}");
    repo.restore_with(&again.snapshot_id, &out, &FORCE, &NoProgress)
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == a);
}

#[test]
fn repair_index_rebuilds_the_index_from_the_packs() {
    let dir = TempDir::new("repairindex");
    let root = dir.path().join("repo");
    let loc = Location::Local(root.clone());
    let repo = Repository::init_with(&loc, "pw", &opts(16384)).unwrap();
    let a = disk_image(3, 3 << 20);
    let s = backup(&repo, &a, "vm1");
    let idx = files_in(&root.join("index"));
    flip_byte(&idx[0], 30);
    // One pack damaged too: it is reported and left out.
    let mut ps = packs(&root);
    ps.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    let victim = ps[0].clone();
    flip_byte(&victim, 10);
    let r = repo.repair_index().unwrap();
    assert_eq!(r.packs_read as usize, ps.len() - 1, "{r:?}");
    assert_eq!(r.unreadable_packs.len(), 1, "{r:?}");
    assert!(r.unreadable_packs[0].ends_with(&*victim.file_name().unwrap().to_string_lossy()));
    assert_eq!(r.index_files_removed, 1);
    assert!(!idx[0].exists());
    let c = repo.check(false).unwrap();
    assert!(c.errors.iter().all(|e| !e.contains("index file")), "{c:?}");
    // Undamaged, it restores whole again after a second repair (nothing left out).
    flip_byte(&victim, 10);
    let r = repo.repair_index().unwrap();
    assert!(r.unreadable_packs.is_empty(), "{r:?}");
    assert!(repo.check(true).unwrap().ok);
    let out = dir.path().join("out");
    repo.restore(&s.snapshot_id, &out, &NoProgress).unwrap();
    assert!(std::fs::read(&out).unwrap() == a);
}

#[test]
fn the_repository_is_untrusted_storage() {
    // Finding 13.
    let dir = TempDir::new("untrusted");
    let root = dir.path().join("repo");
    let loc = Location::Local(root.clone());
    let repo = Repository::init_with(&loc, "pw", &opts(16384)).unwrap();
    assert_eq!(repo.config().version, 2);
    let s = backup(&repo, &disk_image(4, 1 << 20), "vm1");
    drop(repo);

    // `config` is authenticated: one pack per blob is not for a stranger to decide.
    let cfg_path = root.join("config");
    let good_cfg = std::fs::read(&cfg_path).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_slice(&good_cfg).unwrap();
    cfg["pack_size"] = serde_json::json!(2 << 20);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = Repository::open(&loc, "pw")
        .err()
        .expect("a changed config opened");
    assert!(matches!(e, RepoError::Corrupt { .. }), "{e}");
    cfg["pack_size"] = serde_json::json!(0);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    assert!(Repository::open(&loc, "pw").is_err());
    std::fs::write(&cfg_path, &good_cfg).unwrap();

    // A snapshot file copied under another name is not a second snapshot.
    let copy = "ab".repeat(32);
    std::fs::copy(
        root.join("snapshots").join(&s.snapshot_id),
        root.join("snapshots").join(&copy),
    )
    .unwrap();
    let repo = Repository::open(&loc, "pw").unwrap();
    let ids: Vec<String> = repo
        .snapshots()
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(ids, vec![s.snapshot_id.clone()]);
    assert!(repo.find_snapshot(&copy).is_err());
    std::fs::remove_file(root.join("snapshots").join(&copy)).unwrap();

    // Argon2 parameters from a key file are bounded: 4e9 KiB aborted the process, a huge
    // t_cost hung it. Such a key file is refused, and does not hide the good one.
    let keys = files_in(&root.join("keys"));
    let good_key = std::fs::read(&keys[0]).unwrap();
    let mut kf: serde_json::Value = serde_json::from_slice(&good_key).unwrap();
    for (m, t) in [(4_000_000_000u64, 1u64), (64, 4_000_000_000)] {
        kf["params"]["m_cost_kib"] = serde_json::json!(m);
        kf["params"]["t_cost"] = serde_json::json!(t);
        std::fs::write(root.join("keys").join("planted"), kf.to_string()).unwrap();
        let t0 = std::time::Instant::now();
        Repository::open(&loc, "pw").unwrap();
        std::fs::remove_file(&keys[0]).unwrap();
        let e = Repository::open(&loc, "pw")
            .err()
            .expect("opened with a planted key file");
        assert!(e.to_string().contains("out of bounds"), "{e}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(10));
        std::fs::write(&keys[0], &good_key).unwrap();
    }
}

/// `coldclone serve`'s reader: any range of a snapshot, across chunks and map segments,
/// holes and the disk's end, equals the disk; a damaged chunk is an error to the reader,
/// never other bytes.
#[test]
fn a_snapshot_reads_at_random_and_a_damaged_chunk_is_an_error() {
    let dir = TempDir::new("reader");
    let root = dir.path().join("repo");
    let loc = Location::Local(root.clone());
    let mut o = opts(4096);
    o.pack_size = 1 << 20;
    let repo = Repository::init_with(&loc, "pw", &o).unwrap();
    // 9000 chunks of 4 KiB: two map segments; a hole of zeros in the middle; an odd end.
    let mut disk = random_bytes(11, 9000 * 4096 + 777);
    disk[100 * 4096..300 * 4096].fill(0);
    let id = backup(&repo, &disk, "vm1").snapshot_id;
    let r = repo.open_snapshot(&id).unwrap();
    assert_eq!(r.len(), disk.len() as u64);
    let mut x = 12345u64;
    for _ in 0..300 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (x >> 20) % disk.len() as u64;
        let len = ((x >> 8) % 20000) as usize + 1;
        let mut buf = vec![0xeeu8; len];
        let n = r.read_at(&mut buf, off).unwrap();
        let end = (off as usize + len).min(disk.len());
        assert_eq!(n, end - off as usize);
        assert_eq!(&buf[..n], &disk[off as usize..end], "at {off}+{len}");
    }
    let mut buf = [0u8; 10];
    assert_eq!(r.read_at(&mut buf, disk.len() as u64).unwrap(), 0);
    drop(r);

    for p in packs(&root) {
        flip_byte(&p, 5000);
    }
    let r = repo.open_snapshot(&id).unwrap();
    let mut errors = 0;
    for chunk in (0..9000u64).step_by(5) {
        let mut buf = vec![0u8; 4096];
        match r.read_at(&mut buf, chunk * 4096) {
            Ok(_) => assert_eq!(&buf[..], &disk[chunk as usize * 4096..][..4096]),
            Err(_) => errors += 1,
        }
    }
    assert!(errors > 0, "a damaged pack went unnoticed");
}
