//! The original's pause per checkpoint against guest RAM, in one run:
//! coldclone (background-snapshot: stop, disk snapshot, device state; RAM is
//! written afterwards under write protection) vs QEMU's own `savevm` vs a
//! plain `stop` / migrate to a file / `cont`.
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
        let setup = Setup::new(dir.path(), &vm.qmp, "", "");
        let (mut cc, mut cc_disk, mut cc_total, mut sv, mut plain) =
            (vec![], vec![], vec![], vec![], vec![]);
        for _ in 0..reps {
            let (code, report, stderr) = setup.backup(&net.ns);
            assert_eq!(code, 0, "coldclone backup failed: {report} {stderr}");
            cc.push(report["original_pause_ms"].as_f64().unwrap_or(f64::NAN));
            cc_disk.push(
                report["original_pause"]["disk_snapshot_ms"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
            );
            cc_total.push(report["durations_ms"]["total"].as_f64().unwrap_or(f64::NAN) / 1000.0);
            sv.push(savevm(&vm));
            plain.push(stop_migrate_cont(&vm, dir.path()));
        }
        vm.assert_unharmed();
        rows.push((
            mib,
            median(&mut cc),
            median(&mut cc_disk),
            median(&mut cc_total),
            median(&mut sv),
            median(&mut plain),
        ));
    }
    println!();
    println!("original's pause per checkpoint (median of {reps}; QEMU STOP->RESUME timestamps; 45% of RAM non-zero)");
    println!(
        "| guest RAM | coldclone pause ms | of which disk snapshot ms | savevm pause ms | stop+migrate+cont pause ms | savevm / coldclone | coldclone whole backup s |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (mib, cc, disk, total, sv, plain) in rows {
        println!(
            "| {mib} MiB | {cc:.1} | {disk:.1} | {sv:.0} | {plain:.0} | {:.0}x | {total:.1} |",
            sv / cc
        );
    }
}
