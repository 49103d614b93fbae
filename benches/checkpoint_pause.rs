//! The original's pause per checkpoint against guest RAM, in one run:
//! coldclone with each of its two checkpoint methods (background-snapshot:
//! stop, disk snapshot, device state, write-protect RAM, resume, then write
//! RAM; pre-switchover: copy RAM while the VM runs, pause for the last dirty
//! pages + disk snapshot) vs QEMU's own `savevm` vs a plain `stop` / migrate
//! to a file / `cont`.
//!
//! Pauses are QEMU's own STOP→RESUME event timestamps. The guests fill 45 %
//! of their RAM with non-zero data first (QEMU skips zero pages, so an idle
//! guest would flatter every method). Needs root and QEMU.
//!
//!     cargo bench --bench checkpoint_pause            # 256 MiB, 1 GiB, 4 GiB; 3 runs each
//!     BENCH_SIZES=256,1024 BENCH_REPS=5 cargo bench --bench checkpoint_pause

#[path = "../tests/common/mod.rs"]
mod common;

use coldclone_backends::qemu::qmp::Qmp;
use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

fn pause_of(q: &mut Qmp) -> f64 {
    let stop = q
        .wait_event("STOP", Duration::from_secs(600), &|e| e.name == "STOP")
        .expect("STOP event");
    let resume = q
        .wait_event("RESUME", Duration::from_secs(600), &|e| e.name == "RESUME")
        .expect("RESUME event");
    (resume.timestamp_us - stop.timestamp_us) as f64 / 1000.0
}

fn savevm(vm: &Vm) -> f64 {
    let mut q = Qmp::connect(&vm.qmp).expect("qmp");
    q.clear_events();
    let out = q
        .execute(
            "human-monitor-command",
            json!({"command-line": "savevm coldclone-bench"}),
        )
        .expect("savevm");
    assert!(
        out.as_str().unwrap_or("").trim().is_empty(),
        "savevm said: {out}"
    );
    let p = pause_of(&mut q);
    q.execute(
        "human-monitor-command",
        json!({"command-line": "delvm coldclone-bench"}),
    )
    .expect("delvm");
    p
}

fn stop_migrate_cont(vm: &Vm, dir: &std::path::Path) -> f64 {
    let mut q = Qmp::connect(&vm.qmp).expect("qmp");
    let file = dir.join("plain-migrate.bin");
    q.execute(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}]}),
    )
    .expect("caps");
    q.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 1u64 << 40}),
    )
    .expect("bandwidth");
    q.clear_events();
    q.execute("stop", json!({})).expect("stop");
    q.execute(
        "migrate",
        json!({"uri": format!("exec:cat > {}", file.display())}),
    )
    .expect("migrate");
    q.wait_event("migration", Duration::from_secs(900), &|e| {
        e.name == "MIGRATION" && matches!(e.data["status"].as_str(), Some("completed" | "failed"))
    })
    .expect("migration end");
    coldclone_backends::qemu::cont(&mut q).expect("cont");
    let p = pause_of(&mut q);
    let _ = std::fs::remove_file(&file);
    p
}

struct Row {
    mib: u32,
    bg: f64,
    bg_disk: f64,
    bg_total: f64,
    pbs: f64,
    pbs_total: f64,
    savevm: f64,
    plain: f64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` lists; nothing to list
    }
    if !rig_available() {
        return;
    }
    let sizes: Vec<u32> = std::env::var("BENCH_SIZES")
        .unwrap_or_else(|_| "256,1024,4096".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let mut rows = Vec::new();
    for mib in sizes {
        let dir = TempDir::new(&format!("bench{mib}"));
        let net = TestNet::new();
        let t = Instant::now();
        let vm = Vm::start(
            &net,
            dir.path(),
            VmOptions {
                memory_mib: mib,
                fill_mib: mib * 45 / 100,
                ..Default::default()
            },
        );
        eprintln!(
            "{mib} MiB guest up and filled in {:.0} s",
            t.elapsed().as_secs_f64()
        );
        let setup = Setup::new(
            dir.path(),
            &vm.qmp,
            "checkpoint_method = \"background-snapshot\"\n",
            "",
        );
        let pbs_dir = dir.path().join("pbs");
        std::fs::create_dir_all(&pbs_dir).expect("pbs dir");
        let setup_pbs = Setup::new(
            &pbs_dir,
            &vm.qmp,
            "checkpoint_method = \"pre-switchover\"\n",
            "",
        );
        let (mut cc, mut cc_disk, mut cc_total) = (vec![], vec![], vec![]);
        let (mut pbs, mut pbs_total, mut sv, mut plain) = (vec![], vec![], vec![], vec![]);
        let ms = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        for _ in 0..reps {
            let (code, report, stderr) = setup.backup(&net.ns);
            assert_eq!(code, 0, "coldclone backup failed: {report} {stderr}");
            assert_eq!(report["checkpoint_method"], "background-snapshot");
            cc.push(ms(&report, "original_pause_ms"));
            cc_disk.push(ms(&report["original_pause"], "disk_snapshot_ms"));
            cc_total.push(ms(&report["durations_ms"], "total") / 1000.0);
            let (code, report, stderr) = setup_pbs.backup(&net.ns);
            assert_eq!(
                code, 0,
                "coldclone backup (pre-switchover) failed: {report} {stderr}"
            );
            assert_eq!(report["checkpoint_method"], "pause-before-switchover");
            pbs.push(ms(&report, "original_pause_ms"));
            pbs_total.push(ms(&report["durations_ms"], "total") / 1000.0);
            sv.push(savevm(&vm));
            plain.push(stop_migrate_cont(&vm, dir.path()));
        }
        vm.assert_unharmed();
        rows.push(Row {
            mib,
            bg: median(&mut cc),
            bg_disk: median(&mut cc_disk),
            bg_total: median(&mut cc_total),
            pbs: median(&mut pbs),
            pbs_total: median(&mut pbs_total),
            savevm: median(&mut sv),
            plain: median(&mut plain),
        });
    }
    println!();
    println!("original's pause per checkpoint (median of {reps}; QEMU STOP->RESUME timestamps; 45% of RAM non-zero)");
    println!(
        "| guest RAM | coldclone background-snapshot ms | (disk snapshot ms) | coldclone pre-switchover ms | savevm ms | stop+migrate+cont ms | savevm / best coldclone | whole backup s (bg / pre-sw) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} MiB | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0}x | {:.1} / {:.1} |",
            r.mib,
            r.bg,
            r.bg_disk,
            r.pbs,
            r.savevm,
            r.plain,
            r.savevm / r.bg.min(r.pbs),
            r.bg_total,
            r.pbs_total
        );
    }
}
