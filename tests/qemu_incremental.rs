//! Incremental backups driven by QEMU dirty bitmaps, with the verify mode on
//! (COLDCLONE_VERIFY_INCREMENTAL=1: every map-driven backup is compared with a read of
//! the whole clone disk, chunk by chunk, before it counts). The original is the test
//! guest writing its counter on d0, plus a scratch disk s0 (all allocated, random data)
//! that the test writes into through the original's own block layer (HMP qemu-io), so
//! the bitmap sees exactly what a guest write would make it see.
//! Needs root, QEMU, iproute2 (`needs_root_qemu_`).

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const SCRATCH_MIB: u64 = 64;

fn backup_verified(setup: &Setup, net: &TestNet) -> Value {
    let out = setup
        .command(Some(&net.ns), &["--json", "backup"])
        .env("COLDCLONE_VERIFY_INCREMENTAL", "1")
        .output()
        .expect("run coldclone");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = stdout
        .lines()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or(Value::Null);
    assert!(
        out.status.success(),
        "backup failed: {report} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    report
}

fn disk<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["disks"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["name"] == name))
        .unwrap_or_else(|| panic!("no disk {name} in {report}"))
}

/// `count` writes of 4 KiB at pseudo-random 4 KiB-aligned offsets of s0, through the
/// original QEMU; returns the bytes written.
fn scribble(vm: &Vm, seed: u64, count: u64) -> u64 {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    for _ in 0..count {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let block = (x >> 33) % (SCRATCH_MIB * 256);
        let pattern = (x >> 17) & 0xff;
        let line = format!("qemu-io s0 \"write -P {pattern} {} 4096\"", block * 4096);
        let r = vm
            .observe("human-monitor-command", json!({"command-line": line}))
            .expect("qemu-io through HMP");
        // QEMU 7.2 prints qemu-io's result on its stdout (the VM log), and only
        // errors come back here; the writes' effect is checked by the restores.
        assert!(
            r.as_str().is_some_and(|s| s.trim().is_empty()),
            "qemu-io: {r}"
        );
    }
    count * 4096
}

/// s0 as the original holds it now, and as the latest backup restored it.
fn assert_scratch_restores_equal(setup: &Setup, vm: &Vm, snapshot: &str) {
    let live = setup.dir.join("s0-live.raw");
    let restored = setup.dir.join("s0-restored.raw");
    let _ = std::fs::remove_file(&live);
    let _ = std::fs::remove_file(&restored);
    // -U: the original holds its image; nothing writes s0 while the test does not.
    let st = sh(&format!(
        "qemu-img convert -U -O raw {} {}",
        vm.dir.join("scratch.qcow2").display(),
        live.display()
    ));
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let out = setup.coldclone(
        None,
        &[
            "restore",
            "t1",
            "--disk",
            "s0",
            "--snapshot",
            snapshot,
            "--to",
            &restored.display().to_string(),
        ],
    );
    assert!(
        out.status.success(),
        "restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cmp = sh(&format!("cmp {} {}", live.display(), restored.display()));
    assert!(
        cmp.status.success(),
        "the restored incremental differs from the disk: {}",
        String::from_utf8_lossy(&cmp.stdout)
    );
}

#[test]
fn needs_root_qemu_incremental_backups_read_what_changed_and_fall_back_when_a_map_is_lost() {
    let _s = serial();
    if !rig_available() {
        return;
    }
    let dir = TempDir::new("incremental");
    let net = TestNet::new();
    // All allocated, random: a whole read costs every byte.
    let raw = dir.path().join("scratch-src.raw");
    let st = sh(&format!(
        "head -c {} /dev/urandom > {}",
        SCRATCH_MIB << 20,
        raw.display()
    ));
    assert!(st.status.success());
    let vm = Vm::start(
        &net,
        dir.path(),
        VmOptions {
            scratch_disk: Some(raw),
            ..Default::default()
        },
    );
    let setup = Setup::new(dir.path(), &vm.qmp, "", "");

    // 1. The first backup reads everything and starts a bitmap per disk.
    let r1 = backup_verified(&setup, &net);
    assert_eq!(disk(&r1, "s0")["changed_block_map"], "none");
    assert!(disk(&r1, "s0")["bytes_read"].as_u64() >= Some(SCRATCH_MIB << 20));
    let bitmaps = vm.coldclone_bitmaps();
    assert_eq!(
        bitmaps.len(),
        2,
        "one recording bitmap per disk: {bitmaps:?}"
    );
    assert!(bitmaps.iter().all(|b| b.2), "{bitmaps:?}");

    // 2. Random writes, then an incremental: only the changes are read, and the
    // verify mode's whole read agrees with it.
    let written = scribble(&vm, 1, 400);
    let r2 = backup_verified(&setup, &net);
    let s0 = disk(&r2, "s0");
    assert_eq!(s0["changed_block_map"], "qemu-bitmap", "{r2}");
    assert_eq!(s0["verify_bytes_read"].as_u64(), Some(SCRATCH_MIB << 20));
    let read = s0["bytes_read"].as_u64().expect("bytes_read");
    // 64 KiB bitmap granularity: each 4 KiB write may cost 64 KiB.
    assert!(
        read <= written * 16 + (1 << 20),
        "the incremental read {read} bytes for {written} bytes written"
    );
    assert_eq!(disk(&r2, "d0")["changed_block_map"], "qemu-bitmap");
    assert_scratch_restores_equal(&setup, &vm, r2["snapshot_id"].as_str().expect("id"));
    // This run's bitmaps record; the previous run's stay until the next checkpoint
    // (QEMU cannot remove a bitmap of an image that is a backing file), then go.
    let run2 = r2["run_id"].as_str().expect("run id").to_string();
    let bitmaps = vm.coldclone_bitmaps();
    let current = bitmaps
        .iter()
        .filter(|b| b.1.ends_with(&run2) && b.2)
        .count();
    assert_eq!(current, 2, "{bitmaps:?}");
    assert!(bitmaps.len() <= 4, "{bitmaps:?}");

    // 3. A bitmap removed by hand: that disk is read whole (labelled), the other not.
    let (node, name, _) = vm
        .coldclone_bitmaps()
        .into_iter()
        .find(|b| !b.0.is_empty())
        .expect("a bitmap");
    vm.observe(
        "block-dirty-bitmap-remove",
        json!({"node": node, "name": name}),
    )
    .expect("remove the bitmap");
    scribble(&vm, 2, 50);
    let r3 = backup_verified(&setup, &net);
    let maps: Vec<&str> = ["d0", "s0"]
        .iter()
        .map(|d| disk(&r3, d)["changed_block_map"].as_str().unwrap_or("?"))
        .collect();
    assert!(
        maps.contains(&"none") && maps.contains(&"qemu-bitmap"),
        "one disk lost its bitmap: {maps:?} {r3}"
    );
    assert_scratch_restores_equal(&setup, &vm, r3["snapshot_id"].as_str().expect("id"));
    // Never more than two per disk: this run's and the one it read.
    let run3 = r3["run_id"].as_str().expect("run id").to_string();
    let bitmaps = vm.coldclone_bitmaps();
    assert_eq!(bitmaps.len(), 4, "{bitmaps:?}");
    assert_eq!(
        bitmaps.iter().filter(|b| b.1.ends_with(&run3)).count(),
        2,
        "{bitmaps:?}"
    );

    // 4. Killed while the previous bitmap is disabled for reading: `recover` cannot
    // know whether it missed writes, so it drops it; the next backup reads whole
    // disks, and the one after is incremental again.
    let mut child = setup
        .command(Some(&net.ns), &["--json", "backup"])
        .env("COLDCLONE_TEST_HALT_AT", "checkpoint:disks-snapshotted")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn coldclone");
    wait_for_milestone(
        &setup,
        "checkpoint:disks-snapshotted",
        Duration::from_secs(120),
    );
    child.kill().expect("kill -9");
    let _ = child.wait();
    recover_ok(&setup, &net, "a kill with the bitmaps disabled");
    assert!(
        vm.coldclone_bitmaps().is_empty(),
        "{:?}",
        vm.coldclone_bitmaps()
    );
    scribble(&vm, 3, 50);
    let r4 = backup_verified(&setup, &net);
    assert_eq!(disk(&r4, "s0")["changed_block_map"], "none", "{r4}");
    scribble(&vm, 4, 50);
    let r5 = backup_verified(&setup, &net);
    assert_eq!(disk(&r5, "s0")["changed_block_map"], "qemu-bitmap", "{r5}");
    assert_scratch_restores_equal(&setup, &vm, r5["snapshot_id"].as_str().expect("id"));

    vm.assert_unharmed();
    setup.assert_nothing_left(&net);
    assert_repository_clean(&setup, "the incremental backups");
}
