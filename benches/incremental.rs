//! Nightly cost against disk size, in one run: for an all-allocated data disk (random
//! data) of each size, a full backup, then 64 MiB of random 4 KiB writes into it and an
//! incremental backup read by QEMU's dirty bitmap, then the same amount of writes and an
//! incremental without a map (the bitmap removed by hand: how every incremental read
//! before changed-block maps). Wall time, bytes read and peak scratch bytes per backup.
//! The writes go through the original QEMU's block layer (HMP qemu-io), as a guest's
//! would. Needs root and QEMU; images are cached in target/bench-images.
//!
//!     cargo bench --bench incremental                 # 1, 4 and 16 GiB
//!     BENCH_SIZES_GIB=1,4 cargo bench --bench incremental

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Instant;

const WRITES: u64 = 16384; // 64 MiB of 4 KiB writes

fn random_image(gib: u64) -> std::path::PathBuf {
    let dir = workspace_root().join("target/bench-images");
    std::fs::create_dir_all(&dir).expect("image dir");
    let path = dir.join(format!("random-{gib}g.raw"));
    if std::fs::metadata(&path).ok().map(|m| m.len()) != Some(gib << 30) {
        let tmp = path.with_extension("tmp");
        let st = sh(&format!(
            "head -c {} /dev/urandom > {} && mv {} {}",
            gib << 30,
            tmp.display(),
            tmp.display(),
            path.display()
        ));
        assert!(st.status.success(), "making {}", path.display());
    }
    path
}

fn scribble(vm: &Vm, seed: u64, blocks: u64) {
    let mut q = coldclone_backends::qemu::qmp::Qmp::connect(&vm.observe_qmp).expect("qmp");
    let mut x = seed;
    for _ in 0..WRITES {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let line = format!(
            "qemu-io s0 \"write -P {} {} 4096\"",
            (x >> 17) & 0xff,
            ((x >> 33) % blocks) * 4096
        );
        q.execute("human-monitor-command", json!({"command-line": line}))
            .expect("qemu-io");
    }
}

struct Row {
    gib: u64,
    kind: &'static str,
    map: String,
    secs: f64,
    read: u64,
    scratch: u64,
    memory: u64,
}

fn row(gib: u64, kind: &'static str, r: &Value, secs: f64) -> Row {
    let s0 = r["disks"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["name"] == "s0"))
        .cloned()
        .unwrap_or(Value::Null);
    Row {
        gib,
        kind,
        map: s0["changed_block_map"].as_str().unwrap_or("?").to_string(),
        secs,
        read: s0["bytes_read"].as_u64().unwrap_or(0),
        scratch: r["scratch_bytes"].as_u64().unwrap_or(0),
        memory: r["memory_image_bytes"].as_u64().unwrap_or(0),
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !rig_available() {
        return;
    }
    let sizes: Vec<u64> = std::env::var("BENCH_SIZES_GIB")
        .unwrap_or_else(|_| "1,4,16".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let mut rows = Vec::new();
    for gib in sizes {
        let base = random_image(gib);
        let dir = TempDir::new(&format!("bench-inc{gib}"));
        let net = TestNet::new();
        let vm = Vm::start(
            &net,
            dir.path(),
            VmOptions {
                scratch_overlay_of: Some(base),
                ..Default::default()
            },
        );
        let setup = Setup::new(dir.path(), &vm.qmp, "", "");
        let timed = |what: &str| {
            let t = Instant::now();
            let (code, r, err) = setup.backup(&net.ns);
            assert_eq!(code, 0, "{what} backup failed: {r} {err}");
            (r, t.elapsed().as_secs_f64())
        };
        let (r, s) = timed("full");
        rows.push(row(gib, "full", &r, s));
        scribble(&vm, 1, gib << 18);
        let (r, s) = timed("incremental");
        rows.push(row(gib, "incremental, bitmap", &r, s));
        scribble(&vm, 2, gib << 18);
        for (node, name, _) in vm.coldclone_bitmaps() {
            vm.observe(
                "block-dirty-bitmap-remove",
                json!({"node": node, "name": name}),
            );
        }
        let (r, s) = timed("incremental without a map");
        rows.push(row(gib, "incremental, no map", &r, s));
        drop(vm);
    }
    println!(
        "\n64 MiB of random 4 KiB writes between backups; data disk s0 all allocated (random)."
    );
    println!(
        "| disk | backup | s0 map | wall s | s0 bytes read | scratch peak | scratch beyond memory image |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} GiB | {} | {} | {:.1} | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
            r.gib,
            r.kind,
            r.map,
            r.secs,
            r.read as f64 / 1048576.0,
            r.scratch as f64 / 1048576.0,
            r.scratch.saturating_sub(r.memory) as f64 / 1048576.0
        );
    }
}
