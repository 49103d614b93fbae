#![allow(dead_code)]
use coldclone_repository::*;

pub mod fault_proxy;
pub mod garage;
pub mod servers;
use std::path::{Path, PathBuf};

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let mut r = [0u8; 8];
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        r.copy_from_slice(&(n as u64 ^ std::process::id() as u64).to_le_bytes());
        let p = std::env::temp_dir().join(format!(
            "ccrepo-{tag}-{}-{:x}",
            std::process::id(),
            u64::from_le_bytes(r)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Options of a test repository. Also turns prune's grace for young packs off (process
/// wide): the tests prune data they have just written.
pub fn opts(chunk: u32) -> InitOptions {
    set_prune_grace_for_tests(0);
    InitOptions {
        chunk_size: chunk,
        pack_size: 1 << 20,
        compression_level: 1,
        kdf: KdfParams::insecure_for_tests(),
    }
}

pub fn meta(vm: &str, disk: &str) -> SnapshotMeta {
    SnapshotMeta {
        vm: vm.into(),
        disk: disk.into(),
        backend: "test".into(),
        host: "testhost".into(),
        host_uuid: String::new(),
        consistency: "clean-shutdown".into(),
        tags: Default::default(),
        vm_config: None,
    }
}

/// Deterministic pseudo-random bytes (xorshift).
pub fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// A disk image: random, zero, text-like regions; `n` bytes.
pub fn disk_image(seed: u64, n: usize) -> Vec<u8> {
    let mut v = random_bytes(seed, n);
    let text = b"the quick brown fox jumps over the lazy dog; lorem ipsum dolor sit amet. ";
    let third = n / 3;
    for b in &mut v[third..2 * third] {
        *b = 0;
    }
    for (i, b) in v[2 * third..].iter_mut().enumerate() {
        *b = text[i % text.len()];
    }
    v
}

/// A mount point, unmounted on drop (also when the test panics).
pub struct Mount(pub PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// Mount a tmpfs of `size` (e.g. "64m") on `dir` (created). The caller has checked for
/// root with coldclone-testkit; a failing mount then fails the test.
pub fn mount_tmpfs(dir: &Path, size: &str) -> Mount {
    std::fs::create_dir_all(dir).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .expect("run mount");
    assert!(st.success(), "mount -t tmpfs on {} failed", dir.display());
    Mount(dir.to_path_buf())
}

/// The data ranges of a file (SEEK_DATA/SEEK_HOLE), merged.
pub fn data_ranges_of(path: &Path) -> Vec<std::ops::Range<u64>> {
    let src = FileSource::open(path).unwrap();
    src.data_ranges()
        .unwrap()
        .expect("the file system reports holes")
}

/// Seconds since the Unix epoch on the real clock (not the repository's test offset).
pub fn real_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Write a lock object of another holder into a local repository: `time_unix` is what its
/// holder's clock said; the file's modification time (the storage's clock) is set
/// `written_secs_ago` seconds back.
pub fn write_lock(
    root: &Path,
    name: &str,
    host: &str,
    time_unix: i64,
    exclusive: bool,
    written_secs_ago: i64,
) {
    let lock = serde_json::json!({"host": host, "pid": 1, "time_unix": time_unix,
        "exclusive": exclusive, "purpose": if exclusive { "prune" } else { "backup" }});
    let p = root.join("locks").join(name);
    std::fs::write(&p, lock.to_string()).unwrap();
    let t = std::time::UNIX_EPOCH
        + std::time::Duration::from_secs((real_now() - written_secs_ago) as u64);
    std::fs::File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

/// Restore over what is there (the tests restore to one file again and again).
pub const FORCE: RestoreOptions = RestoreOptions { force: true };
