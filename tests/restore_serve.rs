//! `coldclone serve`: a backup's disk as a read-only NBD export straight from the
//! repository, read by QEMU's own NBD client. `qemu-img compare` against a full
//! restore says identical. Needs qemu-img (`needs_qemu_`).

mod cli_rig;
use cli_rig::*;
use coldclone_repository::{
    BackupOptions, Location, MemSource, NoProgress, Repository, SnapshotMeta,
};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The serve process, ended (SIGTERM, then waited for) also when the test fails.
struct Server(Option<Child>);
impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = self.0.take() {
            stop(child);
        }
    }
}

fn serve(cfg: &Path, socket: &Path) -> Server {
    let child = Command::new(BIN)
        .arg("--config")
        .arg(cfg)
        .args(["serve", "web1", "--disk", "xvda", "--socket"])
        .arg(socket)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn serve");
    let t = Instant::now();
    while !socket.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "serve did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Server(Some(child))
}

fn stop(mut child: Child) {
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
}

fn disk() -> Vec<u8> {
    // 3 MiB + an odd tail: random data, a run of zeros, repeated content.
    let mut x = 99u64;
    let mut v: Vec<u8> = (0..(3 << 20) + 4321)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect();
    v[1 << 20..2 << 20].fill(0);
    let head: Vec<u8> = v[..65536].to_vec();
    v[(2 << 20) + 65536..(2 << 20) + 131072].copy_from_slice(&head);
    v
}

#[test]
fn needs_qemu_serve_exports_a_backup_that_qemu_reads_identically() {
    if !coldclone_testkit::require_tools(&["qemu-img"]) {
        return;
    }
    let d = std::env::temp_dir().join(format!("coldclone-serve-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let d = Dir(d);
    let cfg = config(&d.0);
    let init = coldclone(&cfg, &["init"]);
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let repo = Repository::open(&Location::Local(d.0.join("repo")), "pw").unwrap();
    let data = disk();
    repo.backup_disk(
        &MemSource(data.clone()),
        SnapshotMeta {
            vm: "web1".into(),
            disk: "xvda".into(),
            backend: "qemu".into(),
            host: "h".into(),
            host_uuid: String::new(),
            consistency: "clean-shutdown".into(),
            tags: Default::default(),
            vm_config: None,
        },
        &BackupOptions::default(),
        &NoProgress,
    )
    .unwrap();

    let restored = d.0.join("restored.raw");
    let out = coldclone(
        &cfg,
        &[
            "restore",
            "web1",
            "--disk",
            "xvda",
            "--to",
            &restored.display().to_string(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let socket = d.0.join("serve.sock");
    let server = serve(&cfg, &socket);
    let mode = std::fs::metadata(&socket).map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o777
    });
    assert_eq!(mode.ok(), Some(0o600));
    let url = format!("nbd+unix:///xvda?socket={}", socket.display());
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&restored)
        .arg(&url)
        .output()
        .expect("qemu-img");
    assert!(
        cmp.status.success(),
        "qemu-img compare: {} {}",
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
    assert!(String::from_utf8_lossy(&cmp.stdout).contains("identical"));
    // A second client, a whole read through QEMU's block layer.
    let copy = d.0.join("copy.raw");
    let conv = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", &url])
        .arg(&copy)
        .output()
        .expect("qemu-img");
    assert!(
        conv.status.success(),
        "{}",
        String::from_utf8_lossy(&conv.stderr)
    );
    // The export is announced in whole sectors (src/nbd.rs, announced_size): the
    // snapshot's bytes, then zeros to the next 512.
    let copied = std::fs::read(&copy).unwrap();
    assert_eq!(copied.len(), data.len().div_ceil(512) * 512);
    assert!(
        copied[..data.len()] == data[..],
        "the export's bytes differ"
    );
    assert!(copied[data.len()..].iter().all(|b| *b == 0));
    // An existing socket path is never taken over.
    let again = coldclone(
        &cfg,
        &[
            "serve",
            "web1",
            "--disk",
            "xvda",
            "--socket",
            &socket.display().to_string(),
        ],
    );
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));
    drop(server);
    assert!(!socket.exists(), "serve left its socket");

    // A damaged chunk: QEMU's reader gets an I/O error, never wrong bytes. Flip a byte in
    // every pack's middle (the data of this small repository is in one or two).
    for pack in packs(&d.0.join("repo")) {
        let mut bytes = std::fs::read(&pack).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x55;
        std::fs::write(&pack, &bytes).unwrap();
    }
    let server = serve(&cfg, &socket);
    let broken = d.0.join("broken.raw");
    let conv = Command::new("timeout")
        .args(["60", "qemu-img", "convert", "-f", "raw", "-O", "raw", &url])
        .arg(&broken)
        .output()
        .expect("qemu-img");
    assert_ne!(
        conv.status.code(),
        Some(124),
        "qemu-img hung on a damaged export"
    );
    assert!(
        !conv.status.success(),
        "a damaged chunk was read without an error"
    );
    assert!(
        String::from_utf8_lossy(&conv.stderr).contains("Input/output error"),
        "{}",
        String::from_utf8_lossy(&conv.stderr)
    );
    drop(server);
    assert!(!socket.exists(), "serve left its socket");
}
