//! A disk of more than 2^32 chunks (chunk indices are u64): a sparse 16 TiB file on a
//! tmpfs (which allows files of many TiB), with data only at a few offsets past chunk 2^32.
//! Needs root (the tmpfs mount).
mod common;
use coldclone_repository::*;
use common::*;
use std::os::unix::fs::FileExt;

const CS: u64 = 4096;
const SEG: u64 = 8192; // chunk ids per map segment

#[test]
fn a_disk_of_more_than_2_pow_32_chunks_backs_up_and_restores() {
    if !coldclone_testkit::require(
        coldclone_testkit::is_root(),
        "root (a tmpfs mount for a 16 TiB sparse file)",
    ) {
        return;
    }
    let dir = TempDir::new("huge");
    let _m = mount_tmpfs(&dir.path().join("mnt"), "256m");
    let mnt = dir.path().join("mnt");
    // 2^32 + 3 segments + 100 chunks, minus a little: not a multiple of the chunk size.
    let chunks = (1u64 << 32) + 3 * SEG + 100;
    let size = chunks * CS - 1234;
    let img = mnt.join("huge.img");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&img)
        .unwrap();
    f.set_len(size).unwrap();
    // Data at chunk 0 and at chunk 2^32 (which a u32 index wraps onto chunk 0), across a
    // chunk boundary two segments further, and at the very end of the disk.
    let writes: Vec<(u64, Vec<u8>)> = vec![
        (0, random_bytes(1, 5000)),
        ((1u64 << 32) * CS, random_bytes(2, 4096)),
        (
            ((1u64 << 32) + 2 * SEG + 5) * CS + 3000,
            random_bytes(3, 3000),
        ),
        (size - 777, random_bytes(4, 777)),
    ];
    for (off, d) in &writes {
        f.write_all_at(d, *off).unwrap();
    }
    f.sync_all().unwrap();
    let repo_loc = Location::Local(dir.path().join("repo"));
    let repo = Repository::init_with(&repo_loc, "pw", &opts(CS as u32)).unwrap();
    let t = std::time::Instant::now();
    let full = repo
        .backup_disk(
            &FileSource::open(&img).unwrap(),
            meta("huge", "xvda"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap();
    eprintln!("full backup of {size} bytes: {:?}", t.elapsed());
    assert_eq!(full.bytes, size);
    assert!(
        full.bytes_read < 1 << 20,
        "holes were read: {}",
        full.bytes_read
    );
    assert_eq!(full.new_chunks, 6, "{full:?}"); // 2 + 1 + 2 + 1 chunks hold data
    assert_eq!(
        repo.find_snapshot(&full.snapshot_id).unwrap().map.len() as u64,
        chunks.div_ceil(SEG)
    );

    // An incremental: two chunks past 2^32 change, the changed-block map says so.
    let changes: Vec<(u64, Vec<u8>)> = vec![
        (((1u64 << 32) + 1) * CS + 10, random_bytes(5, 100)),
        (
            ((1u64 << 32) + 2 * SEG + 5) * CS + 3500,
            random_bytes(6, 10),
        ),
    ];
    for (off, d) in &changes {
        f.write_all_at(d, *off).unwrap();
    }
    f.sync_all().unwrap();
    let t = std::time::Instant::now();
    let inc = repo
        .backup_disk(
            &FileSource::open(&img).unwrap(),
            meta("huge", "xvda"),
            &BackupOptions {
                parent: Some(full.snapshot_id.clone()),
                changed_ranges: Some(
                    changes
                        .iter()
                        .map(|(o, d)| *o..*o + d.len() as u64)
                        .collect(),
                ),
            },
            &NoProgress,
        )
        .unwrap();
    eprintln!("incremental: {:?}", t.elapsed());
    // The two touched chunks, and the short last chunk, which is never taken from a parent.
    assert_eq!(
        inc.bytes_read,
        2 * CS + (CS - 1234),
        "only touched chunks are read"
    );
    assert_eq!(inc.reused_unread_chunks, chunks - 3);

    // Restore both to sparse files on the tmpfs: the bytes at every written offset, and
    // no data anywhere else.
    let check_restore = |id: &str, expect: &[(u64, Vec<u8>)]| {
        let out = mnt.join("out.img");
        let t = std::time::Instant::now();
        let r = repo.restore_with(id, &out, &FORCE, &NoProgress).unwrap();
        eprintln!("restore: {:?}", t.elapsed());
        assert_eq!(r.bytes, size);
        assert_eq!(std::fs::metadata(&out).unwrap().len(), size);
        let o = std::fs::File::open(&out).unwrap();
        for (off, d) in expect {
            let mut got = vec![0u8; d.len()];
            o.read_exact_at(&mut got, *off).unwrap();
            assert!(got == *d, "restored bytes at offset {off} differ");
        }
        let chunk_of = |x: u64| x / CS;
        let allowed: std::collections::BTreeSet<u64> = expect
            .iter()
            .flat_map(|(off, d)| chunk_of(*off)..=chunk_of(off + d.len() as u64 - 1))
            .collect();
        for r in data_ranges_of(&out) {
            for c in chunk_of(r.start)..=chunk_of(r.end - 1) {
                assert!(allowed.contains(&c), "data in chunk {c}, which holds none");
            }
        }
        std::fs::remove_file(&out).unwrap();
    };
    let mut now = Vec::new();
    for (off, d) in writes.iter().chain(&changes) {
        let mut got = vec![0u8; d.len()];
        f.read_exact_at(&mut got, *off).unwrap();
        now.push((*off, got));
    }
    check_restore(&inc.snapshot_id, &now);
    check_restore(&full.snapshot_id, &writes);
    let c = repo.check(false).unwrap();
    assert!(c.ok, "{c:?}");
}
