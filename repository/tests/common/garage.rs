//! A three-node Garage cluster (crates.io `garage`, AGPL-3.0: run here as a separate test
//! server process, never linked) on 127.0.0.1 ports, replication factor 3, started by the
//! tests themselves.
//!
//! Set up as Garage's own documentation does it: the configuration keys from the
//! reference manual (https://garagehq.deuxfleurs.fr/documentation/reference-manual/configuration/:
//! `metadata_dir`, `data_dir`, `db_engine = "lmdb"`, `replication_factor`, `rpc_secret`
//! shared by all nodes, `rpc_bind_addr`/`rpc_public_addr`, `[s3_api]`), then the steps of
//! the quick start (https://garagehq.deuxfleurs.fr/documentation/quick-start/: `garage
//! status`, `layout assign -z dc1 -c 1G`, `layout apply --version 1`, `key create`, `bucket
//! create`, `bucket allow --read --write`) for several nodes as the real-world deployment
//! cookbook joins them (https://garagehq.deuxfleurs.fr/documentation/cookbook/real-world/:
//! `garage node id`, `garage node connect ID@ADDR`, one zone, three-way replication).
//! Garage's own integration tests start their server the same way
//! (garage-2.5.0/tests/common/garage.rs).

use super::servers::free_port;
use super::TempDir;
use coldclone_repository::{InitOptions, KdfParams, Location, RepoError, Repository};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Garage release scripts/setup.sh installs (`COLDCLONE_GARAGE=1`).
pub const GARAGE_VERSION: &str = "2.5.0";
pub const BUCKET: &str = "coldclone";
pub const REGION: &str = "garage";

/// Where scripts/setup.sh puts Garage, or `COLDCLONE_GARAGE_BIN`, or `garage` on PATH.
pub fn garage_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("COLDCLONE_GARAGE_BIN") {
        return Some(PathBuf::from(p));
    }
    let cached = PathBuf::from(format!(
        "/var/cache/coldclone/garage-{GARAGE_VERSION}/bin/garage"
    ));
    if cached.is_file() {
        return Some(cached);
    }
    coldclone_testkit::have_tool("garage").then(|| PathBuf::from("garage"))
}

pub struct Node {
    pub conf: PathBuf,
    pub s3_port: u16,
    pub rpc_port: u16,
    log: PathBuf,
    child: Option<Child>,
}

pub struct Cluster {
    bin: PathBuf,
    pub nodes: Vec<Node>,
    pub key_id: String,
    pub secret: String,
    pub dir: TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Start the cluster. Opt-in: without `COLDCLONE_GARAGE=1`, None (a recorded skip, in CI
/// too); with it, a missing Garage fails the test.
pub fn start_cluster(tag: &str) -> Option<Cluster> {
    let what = format!(
        "garage {GARAGE_VERSION}, built by `COLDCLONE_GARAGE=1 bash scripts/setup.sh` into /var/cache/coldclone/garage-{GARAGE_VERSION}"
    );
    if !coldclone_testkit::opt_in("COLDCLONE_GARAGE", &what) {
        return None;
    }
    let bin = garage_bin().unwrap_or_else(|| panic!("COLDCLONE_GARAGE=1 but no {what}"));
    let dir = TempDir::new(&format!("garage-{tag}"));
    let secret = hex32();
    let mut nodes = Vec::new();
    for i in 0..3 {
        let (rpc_port, s3_port) = (free_port(), free_port());
        let root = dir.path().join(format!("node{i}"));
        std::fs::create_dir_all(&root).unwrap();
        let conf = root.join("garage.toml");
        std::fs::write(
            &conf,
            format!(
                r#"metadata_dir = "{root}/meta"
data_dir = "{root}/data"
db_engine = "lmdb"
replication_factor = 3
consistency_mode = "consistent"
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"
"#,
                root = root.display()
            ),
        )
        .unwrap();
        nodes.push(Node {
            conf,
            s3_port,
            rpc_port,
            log: root.join("server.log"),
            child: None,
        });
    }
    let mut c = Cluster {
        bin,
        nodes,
        key_id: String::new(),
        secret: String::new(),
        dir,
    };
    for i in 0..3 {
        c.start_node(i);
    }
    // Each node's id (`garage node id -q`: ID@ADDR), once its server made its key.
    let ids: Vec<String> = (0..3)
        .map(|i| {
            c.retry(&format!("node {i} id"), 60, || {
                c.garage(i, &["node", "id", "-q"])
                    .map(|s| s.trim().to_string())
            })
        })
        .collect();
    for id in &ids[1..] {
        c.retry("node connect", 60, || c.garage(0, &["node", "connect", id]));
    }
    for id in &ids {
        let short = id.split('@').next().unwrap_or_default();
        c.retry("layout assign", 60, || {
            c.garage(0, &["layout", "assign", "-z", "dc1", "-c", "1G", short])
        });
    }
    c.retry("layout apply", 60, || {
        c.garage(0, &["layout", "apply", "--version", "1"])
    });
    let key = c.retry("key create", 60, || {
        c.garage(0, &["key", "create", "coldclone-test"])
    });
    let field = |name: &str| {
        key.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {name:?} in `garage key create`:\n{key}"))
    };
    c.key_id = field("Key ID:");
    c.secret = field("Secret key:");
    c.retry("bucket create", 60, || {
        c.garage(0, &["bucket", "create", BUCKET])
    });
    c.retry("bucket allow", 60, || {
        c.garage(
            0,
            &[
                "bucket",
                "allow",
                "--read",
                "--write",
                "--owner",
                BUCKET,
                "--key",
                "coldclone-test",
            ],
        )
    });
    c.wait_healthy();
    Some(c)
}

fn hex32() -> String {
    let mut b = [0u8; 32];
    let f = std::fs::File::open("/dev/urandom").unwrap();
    std::io::Read::read_exact(&mut &f, &mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Cluster {
    /// `garage -c NODE.toml ARGS`: its stdout, or its stderr as the error.
    pub fn garage(&self, node: usize, args: &[&str]) -> Result<String, String> {
        let o = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.nodes[node].conf)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.bin.display()))?;
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        } else {
            Err(format!(
                "garage {args:?} on node {node}: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ))
        }
    }

    fn retry(
        &self,
        what: &str,
        secs: u64,
        mut f: impl FnMut() -> Result<String, String>,
    ) -> String {
        let t = Instant::now();
        loop {
            match f() {
                Ok(s) => return s,
                Err(e) if t.elapsed() > Duration::from_secs(secs) => {
                    panic!("Garage: {what} failed for {secs} s: {e}\n{}", self.logs())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }

    /// The tails of the nodes' logs, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let t = std::fs::read_to_string(&n.log).unwrap_or_default();
            let tail: Vec<&str> = t.lines().rev().take(15).collect();
            out += &format!("--- node {i} log (last lines) ---\n");
            for l in tail.iter().rev() {
                out += l;
                out.push('\n');
            }
        }
        out
    }

    /// Start node `i` (again: its metadata and data folders are kept, so it rejoins the
    /// cluster from its stored peer list).
    pub fn start_node(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_none(), "node {i} is running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.nodes[i].log)
            .unwrap();
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.nodes[i].conf)
            .arg("server")
            .env("RUST_LOG", "garage=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start garage server");
        self.nodes[i].child = Some(child);
        let port = self.nodes[i].s3_port;
        let t = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "Garage node {i} did not listen on {port} within 60 s\n{}",
                self.logs()
            );
            if let Some(Ok(Some(st))) = self.nodes[i].child.as_mut().map(|c| c.try_wait()) {
                panic!("Garage node {i} exited: {st}\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kill node `i` (SIGKILL: no goodbye to its peers).
    pub fn kill_node(&mut self, i: usize) {
        let mut c = self.nodes[i].child.take().expect("node running");
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Wait until every node is up and the cluster reports itself healthy (all three
    /// storage nodes up, every partition fully replicated: `garage health`), and a write
    /// and a read through each node's S3 endpoint work.
    pub fn wait_healthy(&self) {
        let up: Vec<usize> = (0..3).filter(|&i| self.nodes[i].child.is_some()).collect();
        let node = up[0];
        self.retry("health", 120, || {
            let h = self.garage(node, &["health"])?;
            let field = |k: &str| {
                h.lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_default()
            };
            if field("Cluster health:") == "HEALTHY"
                && field("Storage nodes up:") == up.len().to_string()
            {
                Ok(h)
            } else {
                Err(h)
            }
        });
        for &i in &up {
            let loc = self.location(i, &format!("health-probe-{i}-{}", hex32()));
            let t = Instant::now();
            loop {
                let o = InitOptions {
                    kdf: KdfParams::insecure_for_tests(),
                    ..Default::default()
                };
                match Repository::init_with(&loc, "probe", &o)
                    .and_then(|_| Repository::open(&loc, "probe"))
                {
                    Ok(_) => break,
                    Err(e) if t.elapsed() > Duration::from_secs(120) => {
                        panic!("Garage node {i} S3 not usable: {e}\n{}", self.logs())
                    }
                    Err(RepoError::AlreadyExists(_)) => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(500)),
                }
            }
        }
    }

    /// A repository location under `prefix` through node `i`'s S3 endpoint.
    pub fn location(&self, i: usize, prefix: &str) -> Location {
        Location::S3 {
            endpoint: format!("http://127.0.0.1:{}", self.nodes[i].s3_port),
            bucket: BUCKET.into(),
            prefix: prefix.into(),
            region: REGION.into(),
            access_key: self.key_id.clone(),
            secret_key: self.secret.clone(),
        }
    }

    /// `s3:http://127.0.0.1:PORT/BUCKET/PREFIX`, for child processes (credentials go in
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION).
    pub fn url(&self, i: usize, prefix: &str) -> String {
        format!(
            "s3:http://127.0.0.1:{}/{BUCKET}/{prefix}",
            self.nodes[i].s3_port
        )
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.nodes[i]
            .conf
            .parent()
            .map(|p| p.join("data"))
            .unwrap_or_default()
    }
}

/// Bytes under a folder (Garage's data blocks of one node).
pub fn du(p: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => n += du(&e.path()),
                Ok(_) => n += e.metadata().map(|m| m.len()).unwrap_or(0),
                Err(_) => {}
            }
        }
    }
    n
}
