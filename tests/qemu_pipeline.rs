//! The whole pipeline on real QEMU guests (TCG): backups, isolation, faults.
//! Every test here needs root, QEMU, iproute2 and tcpdump (`needs_root_qemu_`).

mod common;

use common::*;
use serde_json::Value;
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

/// A guest with a NIC on the original's network, pinging the peer there.
fn networked(tag: &str) -> Option<(TempDir, TestNet, Vm)> {
    start(
        tag,
        VmOptions {
            with_nic: true,
            ..Default::default()
        },
    )
}

/// `backup --json` while capturing the guest's pings on the original's
/// network; returns the exit code, the report and the ping sequence numbers.
fn backup_captured(
    setup: &Setup,
    net: &TestNet,
    vm: &Vm,
    dir: &std::path::Path,
) -> (i32, Value, String, Vec<u64>) {
    let cap = Capture::start(net, dir, &vm.guest_ip);
    let (code, report, stderr) = setup.backup(&net.ns);
    // Let the original ping on for a while after the backup.
    std::thread::sleep(Duration::from_secs(2));
    (code, report, stderr, cap.stop())
}

/// The guest pings 5 times a second; a capture over a whole backup holds many
/// more probes than this. Fewer means the capture itself failed (tcpdump did not
/// run, or watched the wrong bridge), and "no duplicates" would prove nothing.
const MIN_PROBES: usize = 10;

/// The clone never sent on the original's network: the capture did see the
/// original's pings, and no sequence number twice (the clone resumes with the
/// original's memory, so its pinger repeats numbers the original already sent).
fn assert_clone_stayed_off_the_original_network(seqs: &[u64]) {
    assert!(
        seqs.len() >= MIN_PROBES,
        "the capture saw {} of the original's pings (at least {MIN_PROBES} expected): it did not watch the network",
        seqs.len()
    );
    let dup = duplicates(seqs);
    assert!(
        dup.is_empty(),
        "the clone's pings reached the original's network: {dup:?}"
    );
}

/// A finished run's timings hang together: every step ran and took time, the
/// steps fit in the total, the original's pause lies inside the checkpoint
/// step and splits into its parts, and the total fits in the time the test
/// saw the command run. No figure about how fast: that is the benchmark's job.
fn assert_durations_consistent(report: &Value, observed: Duration) {
    let d = &report["durations_ms"];
    let ms = |k: &str| {
        d[k].as_u64()
            .unwrap_or_else(|| panic!("durations_ms.{k} missing: {report}"))
    };
    let steps = ["checkpoint", "restore", "stop", "archive"];
    for k in steps {
        assert!(ms(k) > 0, "step {k} ran but took 0 ms: {d}");
    }
    let sum: u64 = steps.iter().map(|k| ms(k)).sum::<u64>() + ms("cleanup");
    let total = ms("total");
    assert!(
        sum <= total,
        "the steps ({sum} ms) exceed the total ({total} ms): {d}"
    );
    assert!(
        u128::from(total) <= observed.as_millis(),
        "the report's total {total} ms is longer than the command ran ({} ms)",
        observed.as_millis()
    );
    let pause = report["original_pause_ms"]
        .as_f64()
        .expect("original_pause_ms");
    // +1 ms: the step is truncated to whole milliseconds, the pause is not.
    assert!(
        pause > 0.0 && pause <= ms("checkpoint") as f64 + 1.0,
        "the pause ({pause} ms) is not inside the checkpoint step ({} ms)",
        ms("checkpoint")
    );
    let split = &report["original_pause"];
    let disk = split["disk_snapshot_ms"]
        .as_f64()
        .expect("disk_snapshot_ms");
    let mem = split["memory_ms"].as_f64().expect("memory_ms");
    assert!(
        disk > 0.0 && disk <= pause,
        "the disk snapshot ({disk} ms) is not part of the pause ({pause} ms)"
    );
    assert!(
        (disk + mem - pause).abs() < 0.01,
        "the pause's parts ({disk} + {mem} ms) do not add up to it ({pause} ms)"
    );
    let stop_s = report["clone_stop_seconds"]
        .as_f64()
        .expect("clone_stop_seconds");
    assert!(
        stop_s > 0.0 && stop_s * 1000.0 <= ms("stop") as f64 + 1.0,
        "the clone's stop ({stop_s} s) is not inside the stop step ({} ms)",
        ms("stop")
    );
    let (started, finished) = (
        report["started_at"].as_f64().expect("started_at"),
        report["finished_at"].as_f64().expect("finished_at"),
    );
    assert!(
        started > 0.0 && finished >= started,
        "{started} .. {finished}"
    );
}

#[test]
fn needs_root_qemu_backup_of_a_writing_guest_is_clean_and_the_original_unharmed() {
    let _s = serial();
    let Some((dir, net, vm)) = networked("backup") else {
        return;
    };
    let setup = Setup::new(dir.path(), &vm.qmp, "", "");
    let counter_before = vm.counter();
    let t = std::time::Instant::now();
    let (code, report, stderr) = setup.backup(&net.ns);
    let observed = t.elapsed();
    assert_eq!(code, 0, "backup failed: {report} {stderr}");
    assert_eq!(report["status"], "ok");
    assert_eq!(report["consistency"], "clean-shutdown");
    assert_eq!(report["backend"], "qemu");
    assert_eq!(report["clone_stop"], "acpi");
    assert_durations_consistent(&report, observed);
    assert_eq!(report["disks"][0]["name"], "d0");
    assert_eq!(report["disks"][0]["bytes"], 64 << 20);
    assert!(report["isolated_network"]["bridge"]
        .as_str()
        .is_some_and(|b| b.starts_with("ccbr")));
    // The clone's disk is read where it lies: no copy of it in the state folder,
    // whose peak is the memory image and the clone's small overlay.
    assert_eq!(report["disks"][0]["read_in_place"], true, "{report}");
    assert_eq!(report["disks"][0]["changed_block_map"], "none");
    let scratch = report["scratch_bytes"].as_u64().expect("scratch_bytes");
    let memory = report["memory_image_bytes"].as_u64().expect("memory image");
    assert!(
        scratch > 0 && scratch <= memory + (8 << 20),
        "scratch {scratch} bytes for a memory image of {memory}: a disk copy was written?"
    );

    let in_backup = assert_restored_disk_is_clean(&setup, None);
    assert!(
        in_backup >= counter_before,
        "the backup's counter {in_backup} is older than before the backup {counter_before}"
    );
    vm.assert_unharmed();
    setup.assert_nothing_left(&net);

    // A second backup is incremental: the unchanged blocks cost nothing.
    let (code, report2, stderr) = setup.backup(&net.ns);
    assert_eq!(code, 0, "second backup failed: {report2} {stderr}");
    assert_eq!(
        report2["disks"][0]["changed_block_map"], "qemu-bitmap",
        "{report2}"
    );
    let stored = report2["disks"][0]["stored_bytes"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert!(
        stored < 8 << 20,
        "the second backup stored {stored} bytes of a 64 MiB disk"
    );
    let snaps = setup.snapshots();
    assert_eq!(snaps.len(), 2);
    let second = report2["snapshot_id"]
        .as_str()
        .expect("snapshot id")
        .to_string();
    assert!(assert_restored_disk_is_clean(&setup, Some(&second)) >= in_backup);
    vm.assert_unharmed();
    setup.assert_nothing_left(&net);

    // The repository verbs over what the pipeline stored.
    let check = setup.coldclone(None, &["--json", "check", "--read-data"]);
    assert!(
        check.status.success(),
        "check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let first = report["snapshot_id"].as_str().expect("first run id");
    let forget = setup.coldclone(None, &["forget", first]);
    assert!(
        forget.status.success(),
        "forget: {}",
        String::from_utf8_lossy(&forget.stderr)
    );
    let prune = setup.coldclone(None, &["--json", "prune"]);
    assert!(
        prune.status.success(),
        "prune: {}",
        String::from_utf8_lossy(&prune.stderr)
    );
    assert_eq!(setup.snapshots().len(), 1);
    assert!(assert_restored_disk_is_clean(&setup, None) >= in_backup);
}

#[test]
fn needs_root_qemu_the_clone_never_reaches_the_original_network() {
    let _s = serial();
    let Some((dir, net, vm)) = networked("isolation") else {
        return;
    };
    let setup = Setup::new(dir.path(), &vm.qmp, "", "");
    let (code, report, stderr, seqs) = backup_captured(&setup, &net, &vm, dir.path());
    assert_eq!(code, 0, "backup failed: {report} {stderr}");
    assert_clone_stayed_off_the_original_network(&seqs);
    // The clone did run (and so ping, on its own bridge) until it powered off.
    assert_eq!(report["consistency"], "clean-shutdown");
    vm.assert_unharmed();
    setup.assert_nothing_left(&net);
}

#[test]
fn needs_root_qemu_a_clone_whose_isolation_check_fails_is_never_resumed() {
    let _s = serial();
    let Some((dir, net, vm)) = networked("badbridge") else {
        return;
    };
    // The operator names the original's own bridge (it has an address and an
    // uplink port): the check must refuse it and the clone must never run.
    let setup = Setup::new(dir.path(), &vm.qmp, "", "[isolation]\nbridge = \"obr\"\n");
    let (code, report, stderr, seqs) = backup_captured(&setup, &net, &vm, dir.path());
    assert_eq!(
        code, 1,
        "a backup with a failed isolation check must fail: {report} {stderr}"
    );
    let err = report["error"].as_str().unwrap_or("");
    assert!(
        err.contains("obr") && err.contains("failed verification"),
        "unclear error: {err}"
    );
    assert!(
        err.contains("IP address") && err.contains("unexpected port"),
        "the problems are not named: {err}"
    );
    assert!(
        report["clone_stop"].is_null(),
        "the clone was asked to stop, so it ran"
    );
    assert_clone_stayed_off_the_original_network(&seqs);
    assert!(setup.snapshots().is_empty(), "a failed run stored a backup");
    // The operator's bridge is not ours: still there, untouched.
    assert!(net.links().contains(&"obr".to_string()));
    vm.assert_unharmed();
    setup.assert_nothing_left(&net);
}

#[test]
fn needs_root_qemu_kill_9_at_every_step_then_recover_leaves_nothing() {
    let _s = serial();
    let Some((dir, net, vm)) = networked("faults") else {
        return;
    };
    let setup = Setup::new(dir.path(), &vm.qmp, "", "");
    let steps = [
        "checkpoint:paused",
        "checkpoint:disks-snapshotted",
        "checkpoint:memory-saved",
        "isolate:bridge-ready",
        "restore:clone-started",
        "restore:memory-loaded",
        "restore:isolation-verified",
        "restore:clone-running",
        "stop:requested",
        "stop:stopped",
        "archive:disk-stored",
    ];
    for step in steps {
        let mut child = setup
            .command(Some(&net.ns), &["--json", "backup"])
            .env("COLDCLONE_TEST_HALT_AT", step)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn coldclone");
        let journal_dir = setup.state.join("journal");
        wait_until(
            &format!("coldclone to reach {step}"),
            Duration::from_secs(120),
            || {
                std::fs::read_dir(&journal_dir)
                    .map(|d| {
                        d.flatten().any(|e| {
                            std::fs::read_to_string(e.path())
                                .unwrap_or_default()
                                .contains(&format!("\"name\":\"{step}\""))
                        })
                    })
                    .unwrap_or(false)
            },
        );
        child.kill().expect("kill -9");
        let _ = child.wait();
        let out = setup.coldclone(Some(&net.ns), &["--json", "recover"]);
        assert!(
            out.status.success(),
            "recover after a kill at {step} failed: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let rec: Value = serde_json::from_slice(&out.stdout).expect("recover json");
        assert_eq!(rec.as_array().map(Vec::len), Some(1), "after {step}: {rec}");
        vm.assert_unharmed();
        // No backup was ever stored: no changed-block bitmap may outlive its run.
        let bitmaps = vm.coldclone_bitmaps();
        assert!(
            bitmaps.is_empty(),
            "after a kill at {step}: bitmaps left {bitmaps:?}"
        );
        setup.assert_nothing_left(&net);
        assert!(
            setup.snapshots().is_empty(),
            "a killed run left a backup visible (killed at {step})"
        );
        let mem_images = sh(&format!("find {} -name memory.bin", setup.state.display()));
        assert!(String::from_utf8_lossy(&mem_images.stdout)
            .trim()
            .is_empty());
    }
    // And after all that, a normal backup still works.
    let (code, report, stderr) = setup.backup(&net.ns);
    assert_eq!(code, 0, "{report} {stderr}");
    assert_restored_disk_is_clean(&setup, None);
}

#[test]
fn needs_root_qemu_a_clone_that_ignores_the_power_button() {
    let _s = serial();
    let opts = VmOptions {
        ignore_power_button: true,
        ..Default::default()
    };
    let Some((dir, net, vm)) = start("ignore", opts) else {
        return;
    };
    let setup = Setup::new(
        dir.path(),
        &vm.qmp,
        "",
        "[defaults]\nstop_timeout_secs = 5\n",
    );
    // Setup's [[vm]] says 60 s; a per-VM setting wins, so write a config where it is 5.
    let cfg = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace("stop_timeout_secs = 60\n", "");
    std::fs::write(&setup.config, &cfg).unwrap();
    let (code, report, _) = setup.backup(&net.ns);
    assert_eq!(code, 1, "{report}");
    let err = report["error"].as_str().unwrap_or("");
    assert!(
        err.contains("did not power off within 5 s"),
        "unclear error: {err}"
    );
    assert!(report["snapshot_id"].is_null());
    assert!(setup.snapshots().is_empty(), "no backup may be recorded");
    vm.assert_unharmed();
    setup.assert_nothing_left(&net);

    // With on_clone_failure = "crash" the killed clone's disk is kept, labelled crash.
    std::fs::write(
        &setup.config,
        cfg.replace(
            "stop_timeout_secs = 5\n",
            "stop_timeout_secs = 5\non_clone_failure = \"crash\"\n",
        ),
    )
    .unwrap();
    let (code, report, stderr) = setup.backup(&net.ns);
    assert_eq!(code, 0, "{report} {stderr}");
    assert_eq!(report["consistency"], "crash");
    assert!(report["warnings"][0]
        .as_str()
        .unwrap_or("")
        .contains("crash-consistent"));
    let snaps = setup.snapshots();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0]["consistency"], "crash");
    vm.assert_unharmed();
    setup.assert_nothing_left(&net);
}

#[test]
fn needs_root_qemu_clones_in_their_own_network_namespace() {
    let _s = serial();
    let Some((dir, net, vm)) = start(
        "netns",
        VmOptions {
            with_nic: true,
            ..Default::default()
        },
    ) else {
        return;
    };
    let iso_ns = format!("cciso{}", std::process::id());
    let setup = Setup::new(
        dir.path(),
        &vm.qmp,
        "",
        &format!("[isolation]\nnetns = \"{iso_ns}\"\n"),
    );
    let (code, report, stderr, seqs) = backup_captured(&setup, &net, &vm, dir.path());
    assert_eq!(code, 0, "{report} {stderr}");
    assert_eq!(report["isolated_network"]["namespace"], iso_ns.as_str());
    assert_clone_stayed_off_the_original_network(&seqs);
    assert!(
        !std::path::Path::new("/run/netns").join(&iso_ns).exists(),
        "the namespace made for the run was not removed"
    );
    assert_restored_disk_is_clean(&setup, None);
    vm.assert_unharmed();
    setup.assert_nothing_left(&net);
}

#[test]
fn needs_root_qemu_doctor_checks_the_host_and_the_vms() {
    let _s = serial();
    let Some((dir, net, vm)) = start("doctor", VmOptions::default()) else {
        return;
    };
    let setup = Setup::new(dir.path(), &vm.qmp, "", "");
    let out = setup.coldclone(Some(&net.ns), &["--json", "doctor"]);
    let checks: Vec<Value> = serde_json::from_slice(&out.stdout).expect("doctor json");
    let vm_check = checks
        .iter()
        .find(|c| c["name"] == "vm t1")
        .expect("a check for vm t1");
    assert_eq!(vm_check["ok"], true, "{vm_check}");
    assert!(
        vm_check["detail"]
            .as_str()
            .unwrap_or("")
            .contains("256 MiB"),
        "{vm_check}"
    );
    assert!(checks
        .iter()
        .any(|c| c["name"] == "repository" && c["ok"] == true));
    assert_eq!(out.status.code(), Some(0), "{checks:?}");
    // A VM whose socket is gone is reported, and doctor exits 4.
    drop(vm);
    let out = setup.coldclone(Some(&net.ns), &["--json", "doctor"]);
    assert_eq!(out.status.code(), Some(4));
    let checks: Vec<Value> = serde_json::from_slice(&out.stdout).expect("doctor json");
    let vm_check = checks
        .iter()
        .find(|c| c["name"] == "vm t1")
        .expect("a check for vm t1");
    assert!(
        vm_check["detail"]
            .as_str()
            .unwrap_or("")
            .contains("cannot reach"),
        "{vm_check}"
    );
}

#[test]
fn needs_root_qemu_pre_switchover_checkpoints_are_clean_and_isolated_too() {
    let _s = serial();
    let Some((dir, net, vm)) = networked("preswitch") else {
        return;
    };
    let setup = Setup::new(
        dir.path(),
        &vm.qmp,
        "checkpoint_method = \"pre-switchover\"\n",
        "",
    );
    let t = std::time::Instant::now();
    let (code, report, stderr, seqs) = backup_captured(&setup, &net, &vm, dir.path());
    let observed = t.elapsed();
    assert_eq!(code, 0, "{report} {stderr}");
    assert_eq!(report["checkpoint_method"], "pause-before-switchover");
    assert_durations_consistent(&report, observed);
    assert_clone_stayed_off_the_original_network(&seqs);
    assert_restored_disk_is_clean(&setup, None);
    vm.assert_unharmed();
    // The original's migration settings are as they were.
    let caps = vm.qmp("query-migrate-capabilities", serde_json::json!({}));
    for c in caps.as_array().unwrap() {
        if c["capability"] == "pause-before-switchover" || c["capability"] == "background-snapshot"
        {
            assert_eq!(c["state"], false, "{c}");
        }
    }
    setup.assert_nothing_left(&net);
}
