mod common;
use coldclone_repository::*;
use common::*;

#[test]
fn init_open_backup_restore_roundtrip() {
    let dir = TempDir::new("roundtrip");
    let loc = Location::Local(dir.path().join("repo"));
    let repo = Repository::init_with(&loc, "secret", &opts(16384)).unwrap();
    assert!(matches!(
        Repository::init_with(&loc, "secret", &opts(16384)),
        Err(RepoError::AlreadyExists(_))
    ));
    // Size deliberately not a multiple of the chunk size.
    let img = disk_image(1, 3 * 1024 * 1024 + 1234);
    let sum = repo
        .backup_disk(
            &MemSource(img.clone()),
            meta("vm1", "xvda"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap();
    assert_eq!(sum.bytes, img.len() as u64);
    assert_eq!(sum.bytes_read, img.len() as u64);
    assert!(
        sum.zero_chunks >= 60,
        "zero third must be detected: {}",
        sum.zero_chunks
    );
    // Random third is incompressible, text third compresses: stored is near a third plus a bit.
    assert!(
        sum.stored_bytes < img.len() as u64 / 2,
        "stored {}",
        sum.stored_bytes
    );

    // Reopen with the password; wrong password fails clearly.
    assert!(matches!(
        Repository::open(&loc, "wrong"),
        Err(RepoError::WrongPassword(_))
    ));
    let repo = Repository::open(&loc, "secret").unwrap();
    let snaps = repo.snapshots().unwrap();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0].id, sum.snapshot_id);
    assert_eq!(snaps[0].vm, "vm1");
    assert_eq!(snaps[0].size, img.len() as u64);

    let out = dir.path().join("restored.img");
    let r = repo
        .restore_with(&sum.snapshot_id[..8], &out, &FORCE, &NoProgress)
        .unwrap();
    assert_eq!(r.bytes, img.len() as u64);
    let got = std::fs::read(&out).unwrap();
    assert!(got == img, "restored image differs");
}

#[test]
fn open_missing_repository_says_so() {
    let dir = TempDir::new("missing");
    let loc = Location::Local(dir.path().join("nothing"));
    assert!(matches!(
        Repository::open(&loc, "x"),
        Err(RepoError::NotFound { .. })
    ));
}

#[test]
fn find_latest_and_prefixes() {
    let dir = TempDir::new("latest");
    let loc = Location::Local(dir.path().join("repo"));
    let repo = Repository::init_with(&loc, "pw", &opts(4096)).unwrap();
    let a = repo
        .backup_disk(
            &MemSource(random_bytes(1, 50_000)),
            meta("vm1", "a"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap();
    let b = repo
        .backup_disk(
            &MemSource(random_bytes(2, 50_000)),
            meta("vm1", "a"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap();
    let c = repo
        .backup_disk(
            &MemSource(random_bytes(3, 50_000)),
            meta("vm2", "a"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap();
    assert_eq!(repo.snapshots().unwrap().len(), 3);
    let latest = repo.find_latest("vm1", "a").unwrap().unwrap();
    // Both in one second, likely: the sequence number, not the random id, says b is later.
    assert_eq!(latest.id, b.snapshot_id);
    let order: Vec<String> = repo
        .snapshots()
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    let (pa, pb) = (
        order.iter().position(|i| *i == a.snapshot_id).unwrap(),
        order.iter().position(|i| *i == b.snapshot_id).unwrap(),
    );
    assert!(pa < pb, "a listed after b: {order:?}");
    // Too short a prefix names nothing, even when it is unique today.
    assert!(matches!(
        repo.find_snapshot(&a.snapshot_id[..1]),
        Err(RepoError::InvalidArgument(_))
    ));
    assert_eq!(
        repo.find_latest("vm2", "a").unwrap().unwrap().id,
        c.snapshot_id
    );
    assert!(repo.find_latest("vm3", "a").unwrap().is_none());
    assert!(matches!(
        repo.find_snapshot("zz"),
        Err(RepoError::SnapshotNotFound(_))
    ));
    assert!(matches!(
        repo.find_snapshot(""),
        Err(RepoError::SnapshotNotFound(_))
    ));
    assert_eq!(
        repo.find_snapshot(&a.snapshot_id).unwrap().id,
        a.snapshot_id
    );
    repo.forget(&a.snapshot_id[..10]).unwrap();
    assert_eq!(repo.snapshots().unwrap().len(), 2);
}

#[test]
fn incremental_with_changed_ranges_reads_only_changes() {
    let dir = TempDir::new("incr");
    let loc = Location::Local(dir.path().join("repo"));
    let repo = Repository::init_with(&loc, "pw", &opts(16384)).unwrap();
    let mut img = random_bytes(7, 4 << 20);
    let full = repo
        .backup_disk(
            &MemSource(img.clone()),
            meta("vm", "d"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap();
    // Change three 4 KiB blocks.
    let mut changed = Vec::new();
    for (k, off) in [5000usize, 1_000_000, 3_000_000].into_iter().enumerate() {
        let off = off / 4096 * 4096;
        img[off..off + 4096].copy_from_slice(&random_bytes(100 + k as u64, 4096));
        changed.push(off as u64..off as u64 + 4096);
    }
    let inc = repo
        .backup_disk(
            &MemSource(img.clone()),
            meta("vm", "d"),
            &BackupOptions {
                parent: Some(full.snapshot_id.clone()),
                changed_ranges: Some(changed),
            },
            &NoProgress,
        )
        .unwrap();
    assert_eq!(
        inc.bytes_read,
        3 * 16384,
        "only the three touched chunks are read"
    );
    assert!(inc.stored_bytes < 120_000, "stored {}", inc.stored_bytes);
    assert_eq!(inc.reused_unread_chunks, 256 - 3);
    let out = dir.path().join("r.img");
    repo.restore_with(&inc.snapshot_id, &out, &FORCE, &NoProgress)
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == img);
    // The full one still restores the old content.
    repo.restore_with(&full.snapshot_id, &out, &FORCE, &NoProgress)
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == random_bytes(7, 4 << 20));

    // Without a changed map: everything is read, still only changes are stored.
    img[2_000_000] ^= 0xff;
    let inc2 = repo
        .backup_disk(
            &MemSource(img.clone()),
            meta("vm", "d"),
            &BackupOptions {
                parent: Some(inc.snapshot_id.clone()),
                changed_ranges: None,
            },
            &NoProgress,
        )
        .unwrap();
    assert_eq!(inc2.bytes_read, 4 << 20);
    assert_eq!(inc2.new_chunks, 1);
    repo.restore_with(&inc2.snapshot_id, &out, &FORCE, &NoProgress)
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == img);
}

#[test]
fn growing_disk_with_changed_ranges() {
    let dir = TempDir::new("grow");
    let loc = Location::Local(dir.path().join("repo"));
    let repo = Repository::init_with(&loc, "pw", &opts(4096)).unwrap();
    let mut img = random_bytes(9, 100_000);
    let a = repo
        .backup_disk(
            &MemSource(img.clone()),
            meta("vm", "d"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap();
    img.extend_from_slice(&random_bytes(10, 50_000));
    let b = repo
        .backup_disk(
            &MemSource(img.clone()),
            meta("vm", "d"),
            &BackupOptions {
                parent: Some(a.snapshot_id),
                changed_ranges: Some(vec![]),
            },
            &NoProgress,
        )
        .unwrap();
    let out = dir.path().join("r.img");
    repo.restore_with(&b.snapshot_id, &out, &FORCE, &NoProgress)
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == img);
}

#[test]
fn sparse_source_and_sparse_restore() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let dir = TempDir::new("sparse");
    let img_path = dir.path().join("disk.img");
    let f = std::fs::File::create(&img_path).unwrap();
    let size = 256u64 << 20;
    f.set_len(size).unwrap();
    let d1 = random_bytes(1, 1 << 20);
    let d2 = random_bytes(2, 1 << 20);
    f.write_all_at(&d1, 10 << 20).unwrap();
    f.write_all_at(&d2, 200 << 20).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let src = FileSource::open(&img_path).unwrap();
    let ranges = src.data_ranges().unwrap();
    let loc = Location::Local(dir.path().join("repo"));
    let repo = Repository::init_with(&loc, "pw", &opts(65536)).unwrap();
    let s = repo
        .backup_disk(
            &src,
            meta("vm", "d"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap();
    if ranges.is_some() {
        assert!(
            s.bytes_read <= 8 << 20,
            "holes must not be read: read {}",
            s.bytes_read
        );
    }
    let out = dir.path().join("out.img");
    repo.restore_with(&s.snapshot_id, &out, &FORCE, &NoProgress)
        .unwrap();
    let md = std::fs::metadata(&out).unwrap();
    assert_eq!(md.len(), size);
    assert!(
        md.blocks() * 512 < 16 << 20,
        "restore must be sparse: {} bytes allocated",
        md.blocks() * 512
    );
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&img_path).unwrap());
}

#[test]
fn reports_serialize() {
    let s = BackupSummary {
        snapshot_id: "ab".into(),
        bytes: 1,
        bytes_read: 1,
        stored_bytes: 1,
        new_chunks: 1,
        zero_chunks: 0,
        reused_unread_chunks: 0,
        duration: std::time::Duration::from_millis(5),
    };
    let j = serde_json::to_string(&s).unwrap();
    assert!(j.contains("\"snapshot_id\":\"ab\""));
}

#[test]
fn needs_root_restore_to_a_block_device_needs_force_and_writes_every_byte() {
    use std::process::Command;
    let dir = TempDir::new("blockdev");
    let backing = dir.path().join("dev.img");
    // The device starts full of 0xff, so zero chunks must really be written.
    std::fs::write(&backing, vec![0xffu8; 4 << 20]).unwrap();
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&backing)
        .output();
    let dev = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => {
            // In CI a missing loop device fails the test; elsewhere it is a counted skip.
            coldclone_testkit::require(false, "a loop device (losetup needs root and /dev/loop*)");
            return;
        }
    };
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }
    let _d = Detach(dev.clone());
    let loc = Location::Local(dir.path().join("repo"));
    let repo = Repository::init_with(&loc, "pw", &opts(16384)).unwrap();
    let mut img = disk_image(3, 3 << 20);
    img[0] = 7;
    let s = repo
        .backup_disk(
            &MemSource(img.clone()),
            meta("vm", "d"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap();
    // A device is overwritten only with force, and not while someone holds it exclusively
    // (a mounted file system does).
    let e = repo
        .restore(&s.snapshot_id, std::path::Path::new(&dev), &NoProgress)
        .unwrap_err();
    assert!(e.to_string().contains("--force"), "{e}");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let _held = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(&dev)
            .unwrap();
        let e = repo
            .restore_with(
                &s.snapshot_id,
                std::path::Path::new(&dev),
                &FORCE,
                &NoProgress,
            )
            .unwrap_err();
        assert!(matches!(e, RepoError::Target { .. }), "{e}");
    }
    let r = repo
        .restore_with(
            &s.snapshot_id,
            std::path::Path::new(&dev),
            &FORCE,
            &NoProgress,
        )
        .unwrap();
    assert_eq!(r.bytes_written, img.len() as u64);
    let got = std::fs::read(&dev).unwrap();
    assert!(got[..img.len()] == img[..], "device content differs");
    assert!(
        got[img.len()..].iter().all(|&b| b == 0xff),
        "bytes past the image are left alone"
    );

    // Backing up from the block device reads it all (no allocation map for devices).
    let src = FileSource::open(std::path::Path::new(&dev)).unwrap();
    assert_eq!(src.len(), 4 << 20);
    assert!(src.data_ranges().unwrap().is_none());
}

#[test]
fn large_sparse_disk_spans_many_map_segments() {
    use std::os::unix::fs::FileExt;
    let dir = TempDir::new("segments");
    let img = dir.path().join("big.img");
    let f = std::fs::File::create(&img).unwrap();
    // 4 KiB chunks: a map segment covers 32 MiB, a restore group 512 MiB.
    let size = 600u64 << 20;
    f.set_len(size).unwrap();
    let offsets = [
        0u64,
        (32 << 20) - 6000,
        100 << 20,
        (512 << 20) - 3000,
        size - 5000,
    ];
    for (k, off) in offsets.iter().enumerate() {
        f.write_all_at(&random_bytes(k as u64 + 1, 5000), *off)
            .unwrap();
    }
    f.sync_all().unwrap();
    let loc = Location::Local(dir.path().join("repo"));
    let repo = Repository::init_with(&loc, "pw", &opts(4096)).unwrap();
    let full = repo
        .backup_disk(
            &FileSource::open(&img).unwrap(),
            meta("vm", "d"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap();
    assert_eq!(repo.find_snapshot(&full.snapshot_id).unwrap().map.len(), 19);

    // Change bytes in three segments, one of them past the first restore group.
    let changes = [(40u64 << 20) + 1, (300 << 20) + 7, (550 << 20) + 4090];
    for (k, off) in changes.iter().enumerate() {
        f.write_all_at(&random_bytes(50 + k as u64, 100), *off)
            .unwrap();
    }
    f.sync_all().unwrap();
    let inc = repo
        .backup_disk(
            &FileSource::open(&img).unwrap(),
            meta("vm", "d"),
            &BackupOptions {
                parent: Some(full.snapshot_id.clone()),
                changed_ranges: Some(changes.iter().map(|o| *o..*o + 100).collect()),
            },
            &NoProgress,
        )
        .unwrap();
    // The last change crosses a chunk boundary: four chunks read.
    assert_eq!(inc.bytes_read, 4 * 4096);
    let out = dir.path().join("out.img");
    repo.restore_with(&inc.snapshot_id, &out, &FORCE, &NoProgress)
        .unwrap();
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&img).unwrap(),
        "incremental restore differs"
    );
    assert!(repo.check(true).unwrap().ok);
}

#[test]
fn restore_from_a_read_only_repository() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("readonly");
    let root = dir.path().join("repo");
    let loc = Location::Local(root.clone());
    let repo = Repository::init_with(&loc, "pw", &opts(16384)).unwrap();
    let img = random_bytes(5, 300_000);
    let s = repo
        .backup_disk(
            &MemSource(img.clone()),
            meta("vm", "d"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap();
    // Root ignores permission bits: use a read-only bind mount when we are root, else chmod.
    let ro = dir.path().join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    let mounted = std::process::Command::new("mount")
        .arg("--bind")
        .arg(&root)
        .arg(&ro)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
        && std::process::Command::new("mount")
            .args(["-o", "remount,bind,ro"])
            .arg(&ro)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
    let path = if mounted {
        ro.clone()
    } else {
        std::fs::set_permissions(root.join("locks"), std::fs::Permissions::from_mode(0o555))
            .unwrap();
        root.clone()
    };
    let r = Repository::open(&Location::Local(path), "pw").unwrap();
    let out = dir.path().join("out");
    let res = r.restore_with(&s.snapshot_id, &out, &FORCE, &NoProgress);
    let chk = r.check(false);
    if mounted {
        let _ = std::process::Command::new("umount").arg(&ro).status();
    }
    res.unwrap();
    assert!(chk.unwrap().ok);
    assert!(std::fs::read(&out).unwrap() == img);
}

#[test]
fn empty_and_all_zero_disks() {
    let dir = TempDir::new("empty");
    let loc = Location::Local(dir.path().join("repo"));
    let repo = Repository::init_with(&loc, "pw", &opts(16384)).unwrap();
    let e = repo
        .backup_disk(
            &MemSource(Vec::new()),
            meta("vm", "empty"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap();
    let z = repo
        .backup_disk(
            &MemSource(vec![0u8; 1 << 20]),
            meta("vm", "zero"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap();
    assert_eq!(z.new_chunks, 0);
    assert_eq!(z.zero_chunks, 64);
    let out = dir.path().join("out");
    repo.restore_with(&e.snapshot_id, &out, &FORCE, &NoProgress)
        .unwrap();
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 0);
    repo.restore_with(&z.snapshot_id, &out, &FORCE, &NoProgress)
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == vec![0u8; 1 << 20]);
    assert!(repo.check(true).unwrap().ok);
}

#[test]
fn snapshot_json_for_reports_leaves_out_the_map() {
    let dir = TempDir::new("json");
    let loc = Location::Local(dir.path().join("repo"));
    let repo = Repository::init_with(&loc, "pw", &opts(4096)).unwrap();
    repo.backup_disk(
        &MemSource(random_bytes(1, 100_000)),
        meta("vm", "d"),
        &BackupOptions::default(),
        &NoProgress,
    )
    .unwrap();
    let s = &repo.snapshots().unwrap()[0];
    assert_eq!(s.map.len(), 1, "the map is read back from storage");
    let j = serde_json::to_string(s).unwrap();
    assert!(!j.contains("\"map\""), "{j}");
    assert!(j.contains("\"vm\":\"vm\""));
}

#[test]
fn forget_run_forgets_every_disk_of_one_run() {
    let dir = TempDir::new("forgetrun");
    let loc = Location::Local(dir.path().join("repo"));
    let repo = Repository::init_with(&loc, "pw", &opts(4096)).unwrap();
    let tagged = |disk: &str, run: &str| {
        let mut m = meta("vm1", disk);
        m.tags.insert("run".into(), run.into());
        m
    };
    for (disk, run) in [("a", "r1"), ("b", "r1"), ("a", "r2")] {
        repo.backup_disk(
            &MemSource(random_bytes(9, 9000)),
            tagged(disk, run),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap();
    }
    assert_eq!(repo.forget_run("r1").unwrap().len(), 2);
    assert!(repo.forget_run("r1").unwrap().is_empty());
    assert!(repo.forget_run("").is_err());
    let left = repo.snapshots().unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].tags["run"], "r2");
}

#[allow(clippy::single_range_in_vec_init)]
/// The verify mode's check: a snapshot compared with its disk is equal; an incremental
/// made from a map that missed a change is caught chunk by chunk, at the right offsets.
#[test]
fn compare_disk_catches_an_incremental_from_a_wrong_map() {
    let dir = TempDir::new("compare");
    let loc = Location::Local(dir.path().join("repo"));
    let repo = Repository::init_with(&loc, "pw", &opts(4096)).unwrap();
    let mut disk = random_bytes(7, 64 * 4096);
    disk[10 * 4096..12 * 4096].fill(0);
    let full = repo
        .backup_disk(
            &MemSource(disk.clone()),
            meta("vm1", "a"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap();
    let same = repo
        .compare_disk(&full.snapshot_id, &MemSource(disk.clone()))
        .unwrap();
    assert!(same.is_equal(), "{same:?}");
    assert_eq!(same.chunks, 64);
    assert_eq!(same.bytes_read, 64 * 4096);

    // Two chunks change; the map names only the first.
    disk[3 * 4096] ^= 0xff;
    disk[40 * 4096 + 17] ^= 0xff;
    let inc = repo
        .backup_disk(
            &MemSource(disk.clone()),
            meta("vm1", "a"),
            &BackupOptions {
                parent: Some(full.snapshot_id.clone()),
                changed_ranges: Some(vec![3 * 4096..3 * 4096 + 1]),
            },
            &NoProgress,
        )
        .unwrap();
    let caught = repo
        .compare_disk(&inc.snapshot_id, &MemSource(disk.clone()))
        .unwrap();
    assert_eq!(caught.mismatched, 1, "{caught:?}");
    assert_eq!(caught.first_mismatches, vec![40 * 4096]);
    // A disk of another size is never equal.
    let short = repo
        .compare_disk(&inc.snapshot_id, &MemSource(disk[..4096].to_vec()))
        .unwrap();
    assert!(!short.is_equal());
}
