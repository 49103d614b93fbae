//! Against a real S3-compatible server started here: moto_server (PyPI `moto[server]`).
mod common;
use coldclone_repository::*;
use common::*;
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How to run moto's server: `moto_server`, or `python3 -m moto.server` when the script
/// is not on PATH.
fn moto_command() -> Option<Vec<&'static str>> {
    for cmd in [vec!["moto_server"], vec!["python3", "-m", "moto.server"]] {
        let ok = Command::new(cmd[0])
            .args(&cmd[1..])
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Some(cmd);
        }
    }
    None
}

/// Start moto_server on a free port; install it with pip when missing.
fn start_server() -> Option<Server> {
    if moto_command().is_none() {
        eprintln!("moto_server not found: installing it with pip (moto[server])");
        let _ = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--break-system-packages",
                "moto[server]",
            ])
            .status();
    }
    let Some(cmd) = moto_command() else {
        coldclone_testkit::require(false, "moto_server (pip install 'moto[server]')");
        return None;
    };
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = Command::new(cmd[0])
        .args(&cmd[1..])
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto_server");
    let s = Server { child, port };
    let t = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "moto_server did not listen within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(s)
}

fn loc(port: u16, prefix: &str) -> Location {
    Location::S3 {
        endpoint: format!("http://127.0.0.1:{port}"),
        bucket: "coldclone-test".into(),
        prefix: prefix.into(),
        region: "us-east-1".into(),
        access_key: "testing".into(),
        secret_key: "testing".into(),
    }
}

#[test]
fn moto_s3_repository_full_cycle_and_concurrent_writers() {
    let Some(server) = start_server() else { return };
    full_cycle(server.port);
}

/// s3s-fs (crates.io: `cargo install s3s-fs@0.14.1 --features binary --locked`) stores
/// objects as files and checks AWS signatures, which moto does not.
#[test]
fn s3s_fs_repository_full_cycle_and_signatures() {
    let ok = Command::new("s3s-fs")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !ok.map(|s| s.success()).unwrap_or(false) {
        // COLDCLONE_REQUIRE_S3S (set by scripts/test.sh) makes it required outside CI too.
        let required = std::env::var_os("COLDCLONE_REQUIRE_S3S").is_some();
        assert!(
            !required,
            "s3s-fs is required: cargo install s3s-fs@0.14.1 --features binary --locked"
        );
        coldclone_testkit::require(
            false,
            "s3s-fs (cargo install s3s-fs@0.14.1 --features binary --locked)",
        );
        return;
    }
    let dir = TempDir::new("s3s");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = Command::new("s3s-fs")
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--access-key",
            "testing",
            "--secret-key",
            "testing",
        ])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start s3s-fs");
    let _server = Server { child, port };
    let t = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "s3s-fs did not listen within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A wrong secret is refused by the server: the signature is really checked.
    let Location::S3 {
        endpoint,
        bucket,
        prefix,
        region,
        access_key,
        ..
    } = loc(port, "sig")
    else {
        unreachable!()
    };
    let bad = Location::S3 {
        endpoint,
        bucket,
        prefix,
        region,
        access_key,
        secret_key: "wrong".into(),
    };
    let e = Repository::init_with(&bad, "pw", &opts(16384))
        .err()
        .expect("a wrong secret key must fail");
    assert!(matches!(e, RepoError::S3 { .. }), "{e}");
    full_cycle(port);
}

fn full_cycle(port: u16) {
    let loc = loc(port, "fleet/repo1");
    let mut o = opts(16384);
    o.pack_size = 1 << 20;
    let repo = Repository::init_with(&loc, "pw", &o).unwrap();
    assert!(matches!(
        Repository::init_with(&loc, "pw", &o),
        Err(RepoError::AlreadyExists(_))
    ));
    assert!(matches!(
        Repository::open(&loc, "nope"),
        Err(RepoError::WrongPassword(_))
    ));

    // Several writers ("hosts") at once, each with its own handle, into one repository.
    // They share half their data, so they also race on the same chunks.
    let shared = random_bytes(99, 1 << 20);
    let imgs: Vec<Vec<u8>> = (0..3)
        .map(|i| {
            let mut v = shared.clone();
            v.extend(disk_image(10 + i, 3 << 20));
            v
        })
        .collect();
    let ids: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = imgs
            .iter()
            .enumerate()
            .map(|(i, img)| {
                let loc = loc.clone();
                s.spawn(move || {
                    let r = Repository::open(&loc, "pw").unwrap();
                    r.backup_disk(
                        &MemSource(img.clone()),
                        meta(&format!("vm{i}"), "xvda"),
                        &BackupOptions::default(),
                        &NoProgress,
                    )
                    .unwrap()
                    .snapshot_id
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let repo2 = Repository::open(&loc, "pw").unwrap();
    assert_eq!(repo2.snapshots().unwrap().len(), 3);
    let c = repo2.check(true).unwrap();
    assert!(c.ok, "{c:?}");
    let dir = TempDir::new("s3");
    for (i, id) in ids.iter().enumerate() {
        let out = dir.path().join(format!("out{i}"));
        repo2.restore(id, &out, &NoProgress).unwrap();
        assert!(
            std::fs::read(&out).unwrap() == imgs[i],
            "restore {i} differs"
        );
    }

    // Incremental with changed ranges over S3.
    let mut img = imgs[0].clone();
    img[2_000_000..2_004_096].copy_from_slice(&random_bytes(5, 4096));
    let inc = repo
        .backup_disk(
            &MemSource(img.clone()),
            meta("vm0", "xvda"),
            &BackupOptions {
                parent: Some(ids[0].clone()),
                changed_ranges: Some(std::iter::once(2_000_000..2_004_096).collect()),
            },
            &NoProgress,
        )
        .unwrap();
    assert!(inc.bytes_read <= 2 * 16384);
    let out = dir.path().join("inc");
    repo.restore(&inc.snapshot_id, &out, &NoProgress).unwrap();
    assert!(std::fs::read(&out).unwrap() == img);

    // forget + prune over S3.
    repo.forget(&ids[1]).unwrap();
    let p = repo.prune(&RetentionPolicy::default(), false).unwrap();
    assert_eq!(p.kept.len(), 3);
    assert!(p.bytes_freed > 0, "{p:?}");
    let c = repo.check(true).unwrap();
    assert!(c.ok, "{c:?}");
    repo.restore(&ids[2], &out, &NoProgress).unwrap();
    assert!(std::fs::read(&out).unwrap() == imgs[2]);

    // Another prefix in the same bucket is another (absent) repository.
    assert!(matches!(
        Repository::open(&self::loc(port, "elsewhere"), "pw"),
        Err(RepoError::NotFound { .. })
    ));
}
