//! Benchmark driver for the repository library (used by benches/repository.sh).
//!
//! cc-bench genimage PATH SIZE_MIB SEED         4 GiB-style synthetic VM image (sparse zeros)
//! cc-bench mutate PATH PERCENT SEED RANGES_OUT  change PERCENT % of 4 KiB blocks at random
//! cc-bench init REPO CHUNK_SIZE                 (password from CC_PASSWORD)
//! REPO: a folder or s3:http://HOST:PORT/BUCKET/PREFIX (credentials from AWS_*)
//! cc-bench backup REPO IMAGE [PARENT [RANGES]]  prints the BackupSummary as JSON
//! cc-bench restore REPO SNAPSHOT TARGET         prints the RestoreSummary as JSON

#![allow(clippy::manual_is_multiple_of)] // Rust 1.80 support

use coldclone_repository::*;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let x = self.next().to_le_bytes();
            c.copy_from_slice(&x[..c.len()]);
        }
    }
}

const WORDS: &[&str] = &[
    "the",
    "kernel",
    "mount",
    "error",
    "user",
    "session",
    "opened",
    "closed",
    "for",
    "root",
    "by",
    "systemd",
    "started",
    "stopped",
    "disk",
    "network",
    "interface",
    "eth0",
    "link",
    "up",
    "down",
    "packet",
    "from",
    "to",
    "database",
    "query",
    "select",
    "insert",
    "update",
    "where",
    "id",
    "=",
    "value",
    "log",
    "info",
    "warn",
    "debug",
    "request",
    "GET",
    "POST",
    "/api/v1/items",
    "200",
    "404",
    "500",
    "ms",
    "bytes",
    "cache",
    "hit",
    "miss",
    "worker",
    "thread",
    "pool",
    "timeout",
    "retry",
    "connection",
    "reset",
    "peer",
    "config",
    "loaded",
];

fn text_block(rng: &mut Rng, b: &mut [u8]) {
    let mut i = 0;
    let mut line = 0u64;
    while i < b.len() {
        let w: String = if rng.next() % 8 == 0 {
            line += 1;
            format!(
                "\n2026-11-23T09:{:02}:{:02}.{:06} host{} ",
                line % 60,
                rng.next() % 60,
                rng.next() % 1_000_000,
                rng.next() % 16
            )
        } else if rng.next() % 10 == 0 {
            format!("{} ", rng.next() % 100_000)
        } else {
            format!("{} ", WORDS[(rng.next() % WORDS.len() as u64) as usize])
        };
        let n = w.len().min(b.len() - i);
        b[i..i + n].copy_from_slice(&w.as_bytes()[..n]);
        i += n;
    }
}

/// A folder, or `s3:http://host:port/bucket/prefix` (credentials and region from
/// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION).
fn location(s: &str) -> Location {
    Location::parse(s).unwrap_or_else(|e| die(e.to_string()))
}

fn die(msg: String) -> ! {
    eprintln!("cc-bench: {msg}");
    std::process::exit(2)
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let pw = std::env::var("CC_PASSWORD").unwrap_or_else(|_| "bench-password".into());
    match a.get(1).map(|s| s.as_str()) {
        Some("genimage") => {
            let path = Path::new(&a[2]);
            let mib: u64 = a[3].parse().unwrap_or_else(|e| die(format!("size: {e}")));
            let mut rng = Rng(a[4].parse::<u64>().unwrap_or(1) | 1);
            let f = std::fs::File::create(path)
                .unwrap_or_else(|e| die(format!("{}: {e}", path.display())));
            f.set_len(mib << 20).unwrap_or_else(|e| die(e.to_string()));
            // 16 MiB regions: 40 % random, 30 % zero (holes), 30 % text-like.
            let region = 16u64 << 20;
            let mut buf = vec![0u8; region as usize];
            for r in 0..(mib << 20) / region {
                let kind = rng.next() % 10;
                if kind < 4 {
                    rng.fill(&mut buf);
                } else if kind < 7 {
                    continue;
                } else {
                    text_block(&mut rng, &mut buf);
                }
                f.write_all_at(&buf, r * region)
                    .unwrap_or_else(|e| die(e.to_string()));
            }
            f.sync_all().unwrap_or_else(|e| die(e.to_string()));
        }
        Some("mutate") => {
            let path = Path::new(&a[2]);
            let pct: f64 = a[3]
                .parse()
                .unwrap_or_else(|e| die(format!("percent: {e}")));
            let mut rng = Rng(a[4].parse::<u64>().unwrap_or(1) | 1);
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .unwrap_or_else(|e| die(e.to_string()));
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            let blocks = len / 4096;
            let n = (blocks as f64 * pct / 100.0) as u64;
            let mut chosen = std::collections::BTreeSet::new();
            while (chosen.len() as u64) < n {
                chosen.insert(rng.next() % blocks);
            }
            let mut out = std::fs::File::create(&a[5]).unwrap_or_else(|e| die(e.to_string()));
            let mut b = vec![0u8; 4096];
            for blk in chosen {
                rng.fill(&mut b);
                f.write_all_at(&b, blk * 4096)
                    .unwrap_or_else(|e| die(e.to_string()));
                writeln!(out, "{} {}", blk * 4096, blk * 4096 + 4096)
                    .unwrap_or_else(|e| die(e.to_string()));
            }
            f.sync_all().unwrap_or_else(|e| die(e.to_string()));
        }
        Some("init") => {
            let cs: u32 = a[3]
                .parse()
                .unwrap_or_else(|e| die(format!("chunk size: {e}")));
            let o = InitOptions {
                chunk_size: cs,
                ..Default::default()
            };
            Repository::init_with(&location(&a[2]), &pw, &o).unwrap_or_else(|e| die(e.to_string()));
        }
        Some("backup") => {
            let repo =
                Repository::open(&location(&a[2]), &pw).unwrap_or_else(|e| die(e.to_string()));
            let src = FileSource::open(Path::new(&a[3]))
                .unwrap_or_else(|e| die(format!("{}: {e}", a[3])));
            let changed = a.get(5).map(|p| {
                std::fs::read_to_string(p)
                    .unwrap_or_else(|e| die(e.to_string()))
                    .lines()
                    .filter_map(|l| {
                        let mut it = l.split_whitespace().map(|x| x.parse::<u64>());
                        Some(it.next()?.ok()?..it.next()?.ok()?)
                    })
                    .collect::<Vec<_>>()
            });
            let opts = BackupOptions {
                parent: a.get(4).cloned(),
                changed_ranges: changed,
            };
            let m = SnapshotMeta {
                vm: "bench".into(),
                disk: "xvda".into(),
                backend: "file".into(),
                host: "bench".into(),
                host_uuid: String::new(),
                consistency: "crash".into(),
                // CC_BENCH_RUN: a run id, so that the coldclone binary's backup-level
                // verbs (`files`, `restore --as`) find it (benches/restore.sh).
                tags: std::env::var("CC_BENCH_RUN")
                    .map(|r| [("run".to_string(), r)].into())
                    .unwrap_or_default(),
                // CC_BENCH_VM_CONFIG=FILE: a QEMU definition (`{"program", "cwd", "argv"}`,
                // what the QEMU backend keeps with a backup) stored with the snapshot, so
                // that `restore --as`/`--instant` can boot the image (benches/restore.sh).
                vm_config: std::env::var("CC_BENCH_VM_CONFIG").ok().map(|p| {
                    coldclone_repository::VmConfig {
                        kind: "qemu-command-line".into(),
                        text: std::fs::read_to_string(&p)
                            .unwrap_or_else(|e| die(format!("{p}: {e}"))),
                    }
                }),
            };
            let s = repo
                .backup_disk(&src, m, &opts, &NoProgress)
                .unwrap_or_else(|e| die(e.to_string()));
            println!("{}", serde_json::to_string(&s).unwrap_or_default());
        }
        Some("restore") => {
            let repo =
                Repository::open(&location(&a[2]), &pw).unwrap_or_else(|e| die(e.to_string()));
            let s = repo
                .restore_with(
                    &a[3],
                    Path::new(&a[4]),
                    &RestoreOptions { force: true },
                    &NoProgress,
                )
                .unwrap_or_else(|e| die(e.to_string()));
            println!("{}", serde_json::to_string(&s).unwrap_or_default());
        }
        Some("check") => {
            let repo =
                Repository::open(&location(&a[2]), &pw).unwrap_or_else(|e| die(e.to_string()));
            let r = repo
                .check(a.get(3).map(|s| s == "--read-data").unwrap_or(false))
                .unwrap_or_else(|e| die(e.to_string()));
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            if !r.ok {
                std::process::exit(1);
            }
        }
        _ => die("usage: see the source".into()),
    }
}
