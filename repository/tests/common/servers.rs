//! Real S3-compatible servers started by the tests on 127.0.0.1: moto_server (PyPI
//! `moto[server]`) and s3s-fs (crates.io `s3s-fs`, file-backed, checks signatures).
use super::TempDir;
use coldclone_repository::Location;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    child: Child,
    pub port: u16,
    /// s3s-fs: the folder whose `BUCKET/KEY` files are the objects.
    pub root: Option<PathBuf>,
    _dir: Option<TempDir>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn works(cmd: &[&str]) -> bool {
    Command::new(cmd[0])
        .args(&cmd[1..])
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn wait_listening(name: &str, port: u16) {
    let t = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{name} did not listen within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How to run moto's server: `moto_server`, or `python3 -m moto.server`.
fn moto_command() -> Option<Vec<&'static str>> {
    [vec!["moto_server"], vec!["python3", "-m", "moto.server"]]
        .into_iter()
        .find(|c| works(c))
}

/// Start moto_server on a free port; install it with pip when missing. None (a counted
/// skip outside CI, a failure in CI) when it cannot run.
pub fn start_moto() -> Option<Server> {
    if moto_command().is_none() {
        eprintln!("moto_server not found: installing it with pip (moto[server])");
        let _ = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--break-system-packages"])
            .arg("moto[server]")
            .status();
    }
    let Some(cmd) = moto_command() else {
        coldclone_testkit::require(false, "moto_server (pip install 'moto[server]')");
        return None;
    };
    let port = free_port();
    let child = Command::new(cmd[0])
        .args(&cmd[1..])
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start moto_server");
    let s = Server {
        child,
        port,
        root: None,
        _dir: None,
    };
    wait_listening("moto_server", port);
    Some(s)
}

/// Start s3s-fs over a fresh folder (access key and secret `testing`).
pub fn start_s3s_fs() -> Option<Server> {
    if !works(&["s3s-fs"]) {
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
        return None;
    }
    let dir = TempDir::new("s3s");
    let port = free_port();
    let child = Command::new("s3s-fs")
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", "testing", "--secret-key", "testing"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start s3s-fs");
    let s = Server {
        child,
        port,
        root: Some(dir.path().to_path_buf()),
        _dir: Some(dir),
    };
    wait_listening("s3s-fs", port);
    Some(s)
}

pub const BUCKET: &str = "coldclone-test";

pub fn s3_loc(port: u16, prefix: &str) -> Location {
    Location::S3 {
        endpoint: format!("http://127.0.0.1:{port}"),
        bucket: BUCKET.into(),
        prefix: prefix.into(),
        region: "us-east-1".into(),
        access_key: "testing".into(),
        secret_key: "testing".into(),
    }
}
