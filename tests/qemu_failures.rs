//! Failures where data can be lost, on real QEMU guests (TCG): multi-disk VMs
//! failing or killed between their disks, kill -9 during pre-switchover,
//! during ballooning and during `recover` itself. After every failure: the
//! partial backup is withdrawn, `check` is clean, nothing of the run is left,
//! and the original runs (seen on its observer QMP socket) on its own images.
//! Every test needs root, QEMU, iproute2 and tcpdump (`needs_root_qemu_`).
//! Fault hooks (debug builds): COLDCLONE_TEST_HALT_AT (journal milestones),
//! COLDCLONE_TEST_ARCHIVE_FAULT (archive.rs), COLDCLONE_TEST_RECOVER_HALT_AFTER
//! (journal.rs, `recover`).

mod common;

use common::*;
use serde_json::{json, Value};
use std::process::{Child, Stdio};
use std::time::Duration;

fn start(tag: &str, opts: VmOptions) -> Option<(TempDir, TestNet, Vm)> {
    if !rig_available() {
        return None;
    }
    let dir = TempDir::new(tag);
    let net = TestNet::new();
    let vm = Vm::start(&net, dir.path(), opts);
    Some((dir, net, vm))
}

/// `backup --json` in the background with `env` set (a fault hook).
fn spawn_backup(setup: &Setup, net: &TestNet, env: (&str, &str)) -> Child {
    setup
        .command(Some(&net.ns), &["--json", "backup"])
        .env(env.0, env.1)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn coldclone")
}

fn kill_9(mut child: Child) {
    // Child::kill is SIGKILL: no clean-up code of coldclone runs.
    child.kill().expect("kill -9");
    let _ = child.wait();
}

/// The id of the one live (unfinished) run, from its journal's file name.
fn live_run_id(setup: &Setup) -> String {
    let dir = setup.state.join("journal");
    let ids: Vec<String> = std::fs::read_dir(&dir)
        .expect("journal folder")
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_suffix(".jsonl")
                .map(str::to_string)
        })
        .collect();
    assert_eq!(ids.len(), 1, "expected one live run: {ids:?}");
    ids[0].clone()
}

/// The repository's snapshots of one run.
fn snapshots_of_run(setup: &Setup, run: &str) -> Vec<Value> {
    setup
        .snapshots()
        .into_iter()
        .filter(|s| s["tags"]["run"] == run)
        .collect()
}

/// Everything that must hold after a failure once it is dealt with: no
/// snapshot of the failed run, the earlier backups intact, `check` clean,
/// nothing of the run left, the original running on its own images.
fn assert_failure_left_nothing(
    setup: &Setup,
    net: &TestNet,
    vm: &Vm,
    extra: u32,
    failed_run: &str,
    good_snapshots: usize,
    what: &str,
) {
    assert!(
        snapshots_of_run(setup, failed_run).is_empty(),
        "{what}: the partial backup of run {failed_run} is still listed: {:?}",
        snapshots_of_run(setup, failed_run)
    );
    assert_eq!(
        setup.snapshots().len(),
        good_snapshots,
        "{what}: the earlier backups are not intact"
    );
    assert_repository_clean(setup, what);
    setup.assert_nothing_left(net);
    assert_no_memory_image(setup);
    vm.assert_all_disks_unharmed(extra);
}

/// A VM with `extra` + 1 disks: a whole backup, then a failure injected right
/// after disk `fail_disk` is stored, then a kill -9 right after disk
/// `halt_disk` is stored, then a whole backup again.
fn multi_disk(tag: &str, extra: u32, fail_disk: &str, halt_disk: &str) {
    let Some((dir, net, vm)) = start(
        tag,
        VmOptions {
            extra_disks: extra,
            ..Default::default()
        },
    ) else {
        return;
    };
    let n = extra as usize + 1;
    let setup = Setup::new(dir.path(), &vm.qmp, "", "");
    let names: Vec<String> = (0..n).map(|i| format!("d{i}")).collect();

    // 1. Every disk archived, each restored disk clean, all at one counter.
    let (code, report, stderr) = setup.backup(&net.ns);
    assert_eq!(code, 0, "backup failed: {report} {stderr}");
    let archived: Vec<&str> = report["disks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert_eq!(archived, names, "not every disk was archived");
    assert_eq!(setup.snapshots().len(), n);
    let restored: Vec<RestoredDisk> = names
        .iter()
        .map(|d| restore_disk_checked(&setup, d, None))
        .collect();
    for (i, r) in restored.iter().enumerate().skip(1) {
        // Each disk holds its own data: no two disks swapped or duplicated.
        assert_eq!(
            r.id,
            format!("vd{}", disk_letter(i as u32)),
            "d{i} restored another disk's data"
        );
        // One writer writes every disk and a clean stop ends its last round:
        // all disks of one backup hold the same counter.
        assert_eq!(
            r.counter, restored[0].counter,
            "d{i} and d0 were not stopped at the same moment"
        );
    }
    vm.assert_all_disks_unharmed(extra);
    setup.assert_nothing_left(&net);
    assert_repository_clean(&setup, "a whole backup");

    // 2. A failure after `fail_disk` is stored (stored, reported failed): the
    // run withdraws its partial backup itself, without `recover`.
    let (code, report, stderr) = {
        let out = setup
            .command(Some(&net.ns), &["--json", "backup"])
            .env("COLDCLONE_TEST_ARCHIVE_FAULT", format!("fail:{fail_disk}"))
            .output()
            .expect("run coldclone");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let report = stdout
            .lines()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
            .unwrap_or(Value::Null);
        (
            out.status.code().unwrap_or(-1),
            report,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(
        code, 1,
        "the injected failure did not fail the backup: {report} {stderr}"
    );
    assert!(
        report["error"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("after disk {fail_disk} was stored")),
        "the fault did not fire where it was meant to: {report}"
    );
    let failed_run = report["run_id"].as_str().expect("run id").to_string();
    assert!(report["snapshot_id"].is_null(), "{report}");
    assert_failure_left_nothing(
        &setup,
        &net,
        &vm,
        extra,
        &failed_run,
        n,
        "a failure between disks",
    );

    // 3. kill -9 after `halt_disk` is stored: the partial backup is visible
    // until `recover` withdraws it.
    let child = spawn_backup(
        &setup,
        &net,
        ("COLDCLONE_TEST_ARCHIVE_FAULT", &format!("halt:{halt_disk}")),
    );
    wait_for_milestone(&setup, "archive:test-halt", Duration::from_secs(300));
    let killed_run = live_run_id(&setup);
    let partial = snapshots_of_run(&setup, &killed_run);
    let partial_disks: Vec<&str> = partial.iter().filter_map(|s| s["disk"].as_str()).collect();
    let upto = names
        .iter()
        .position(|d| d == halt_disk)
        .expect("halt disk")
        + 1;
    assert_eq!(
        partial_disks,
        names[..upto].iter().map(String::as_str).collect::<Vec<_>>(),
        "the kill did not fall between disks"
    );
    kill_9(child);
    let rec = recover_ok(&setup, &net, "a kill between disks");
    assert_eq!(rec.as_array().map(Vec::len), Some(1), "{rec}");
    assert_failure_left_nothing(
        &setup,
        &net,
        &vm,
        extra,
        &killed_run,
        n,
        "a kill between disks",
    );

    // 4. And a whole backup again, every disk clean.
    let (code, report, stderr) = setup.backup(&net.ns);
    assert_eq!(code, 0, "backup after the failures: {report} {stderr}");
    assert_eq!(setup.snapshots().len(), 2 * n);
    let c0 = restore_disk_checked(&setup, "d0", None).counter;
    for d in &names[1..] {
        assert_eq!(restore_disk_checked(&setup, d, None).counter, c0, "{d}");
    }
    assert_repository_clean(&setup, "the last backup");
}

#[test]
fn needs_root_qemu_a_two_disk_vm_failing_or_killed_between_its_disks() {
    let _s = serial();
    // A failure right after the FIRST disk is stored: the case where the run
    // has no disk of its own on record and must withdraw by the run's tag.
    multi_disk("twodisk", 1, "d0", "d0");
}

#[test]
fn needs_root_qemu_a_three_disk_vm_failing_or_killed_between_its_disks() {
    let _s = serial();
    multi_disk("threedisk", 2, "d1", "d1");
}

/// What a failure during a checkpoint must leave on the original: running,
/// no migration under way, its migration settings as they were.
fn assert_migration_settings_back(vm: &Vm, what: &str) {
    let mig = vm
        .observe("query-migrate", json!({}))
        .expect("query-migrate");
    let status = mig["status"].as_str().unwrap_or("none");
    assert!(
        matches!(status, "none" | "completed" | "cancelled" | "failed"),
        "{what}: a migration is still under way: {mig}"
    );
    let caps = vm
        .observe("query-migrate-capabilities", json!({}))
        .expect("capabilities");
    for c in caps.as_array().into_iter().flatten() {
        if c["capability"] == "pause-before-switchover" || c["capability"] == "background-snapshot"
        {
            assert_eq!(c["state"], false, "{what}: {c}");
        }
    }
}

#[test]
fn needs_root_qemu_kill_9_during_pre_switchover_then_recover_leaves_nothing() {
    let _s = serial();
    // Non-zero memory, so that the RAM copy takes a while and can be hit.
    let Some((dir, net, vm)) = start(
        "preswkill",
        VmOptions {
            fill_mib: 64,
            ..Default::default()
        },
    ) else {
        return;
    };
    let setup = Setup::new(
        dir.path(),
        &vm.qmp,
        "checkpoint_method = \"pre-switchover\"\n",
        "",
    );
    // While RAM is sent and the original still runs (no milestone: watched on
    // the observer socket), then at each milestone of the checkpoint.
    let points = [
        "ram-copy",
        "checkpoint:paused",
        "checkpoint:disks-snapshotted",
        "checkpoint:memory-saved",
    ];
    for point in points {
        let child = if point == "ram-copy" {
            let child = spawn_backup(&setup, &net, ("COLDCLONE_TEST_HALT_AT", "never"));
            let mut seen = String::new();
            wait_until("the memory save to start", Duration::from_secs(120), || {
                seen = vm
                    .observe("query-migrate", json!({}))
                    .and_then(|m| m["status"].as_str().map(str::to_string))
                    .unwrap_or_default();
                matches!(seen.as_str(), "setup" | "active" | "pre-switchover")
            });
            eprintln!("killing coldclone with the migration {seen}");
            child
        } else {
            let child = spawn_backup(&setup, &net, ("COLDCLONE_TEST_HALT_AT", point));
            wait_for_milestone(&setup, point, Duration::from_secs(120));
            child
        };
        let run = live_run_id(&setup);
        kill_9(child);
        recover_ok(&setup, &net, point);
        assert_migration_settings_back(&vm, point);
        assert_failure_left_nothing(&setup, &net, &vm, 0, &run, 0, point);
    }
    let (code, report, stderr) = setup.backup(&net.ns);
    assert_eq!(code, 0, "{report} {stderr}");
    assert_eq!(report["checkpoint_method"], "pause-before-switchover");
    assert_restored_disk_is_clean(&setup, None);
    assert_repository_clean(&setup, "the last backup");
}

fn balloon_actual(vm: &Vm) -> u64 {
    vm.observe("query-balloon", json!({}))
        .and_then(|b| b["actual"].as_u64())
        .unwrap_or(0)
}

#[test]
fn needs_root_qemu_kill_9_while_the_balloon_is_lowered_then_recover_gives_the_memory_back() {
    let _s = serial();
    let Some((dir, net, vm)) = start(
        "balloonkill",
        VmOptions {
            balloon: true,
            ..Default::default()
        },
    ) else {
        return;
    };
    let full = 256u64 << 20;
    assert_eq!(balloon_actual(&vm), full, "balloon before");
    let setup = Setup::with_body(
        dir.path(),
        "[defaults]\nballoon = { target = \"50%\", floor_mib = 64, timeout_secs = 60 }\n",
        &format!(
            "[[vm]]\nname = \"t1\"\nqmp = \"{}\"\nstop_timeout_secs = 60\n",
            vm.qmp.display()
        ),
    );
    // Right after the request, and later with the clone running (the balloon
    // stays down until clean-up).
    for point in ["balloon:requested", "stop:requested"] {
        let child = spawn_backup(&setup, &net, ("COLDCLONE_TEST_HALT_AT", point));
        wait_for_milestone(&setup, point, Duration::from_secs(180));
        wait_until("the balloon to be lowered", Duration::from_secs(90), || {
            balloon_actual(&vm) <= (128 + 8) << 20
        });
        let run = live_run_id(&setup);
        kill_9(child);
        assert!(
            balloon_actual(&vm) < full,
            "the balloon was not down at the kill"
        );
        recover_ok(&setup, &net, point);
        wait_until(
            "the balloon to be back at its full size",
            Duration::from_secs(60),
            || balloon_actual(&vm) == full,
        );
        assert_failure_left_nothing(&setup, &net, &vm, 0, &run, 0, point);
    }
}

/// `recover` in the background, halted by its fault hook after it undid the
/// first resource of `kind` (before its journal records that); its stderr.
fn spawn_recover_halting(setup: &Setup, net: &TestNet, kind: &str) -> (Child, std::path::PathBuf) {
    let log = setup.dir.join(format!("recover-{kind}.log"));
    let child = setup
        .command(Some(&net.ns), &["--json", "recover"])
        .env("COLDCLONE_TEST_RECOVER_HALT_AFTER", kind)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn recover");
    (child, log)
}

#[test]
fn needs_root_qemu_kill_9_during_recover_then_recover_again_leaves_nothing() {
    let _s = serial();
    // Two disks: two overlays on the original, so a kill can fall between them.
    let Some((dir, net, vm)) = start(
        "recoverkill",
        VmOptions {
            extra_disks: 1,
            with_nic: true,
            ..Default::default()
        },
    ) else {
        return;
    };
    let setup = Setup::new(dir.path(), &vm.qmp, "", "");
    // (where the backup is killed, the resource after whose undo recover is killed)
    let cases = [
        // The original paused with both disks on overlays; recover killed
        // after merging one back, before resuming the original.
        ("checkpoint:disks-snapshotted", "original_overlay"),
        // The clone running on its own network; recover killed after the
        // clone is gone, then after the clone's bridge is gone.
        ("restore:clone-running", "clone_process"),
        ("restore:clone-running", "bridge"),
    ];
    for (point, kind) in cases {
        let what = format!("a kill at {point}, then of recover after {kind}");
        let child = spawn_backup(&setup, &net, ("COLDCLONE_TEST_HALT_AT", point));
        wait_for_milestone(&setup, point, Duration::from_secs(180));
        let run = live_run_id(&setup);
        kill_9(child);
        let (rec, log) = spawn_recover_halting(&setup, &net, kind);
        wait_until(
            &format!("recover to halt after {kind}"),
            Duration::from_secs(120),
            || {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("COLDCLONE_TEST_RECOVER_HALT_AFTER")
            },
        );
        eprintln!(
            "{what}: the original is {} at the kill of recover",
            vm.observed_status()
        );
        kill_9(rec);
        // The journal still names the resource undone: the second recover
        // must take it as done, and finish the rest.
        let again = recover_ok(&setup, &net, &what);
        assert_eq!(again.as_array().map(Vec::len), Some(1), "{what}: {again}");
        assert_failure_left_nothing(&setup, &net, &vm, 1, &run, 0, &what);
    }
    let (code, report, stderr) = setup.backup(&net.ns);
    assert_eq!(code, 0, "{report} {stderr}");
    assert_eq!(
        restore_disk_checked(&setup, "d0", None).counter,
        restore_disk_checked(&setup, "d1", None).counter
    );
    assert_repository_clean(&setup, "the last backup");
}
