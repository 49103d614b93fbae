//! The guest agent on plain QEMU VMs: a clone that ignores the power button shut down
//! through its own agent socket (`guest-shutdown`), `on_clone_failure = "quiesced"`
//! (the original frozen through its agent around a disk-only snapshot, thawed at once),
//! a freeze that never returns, and a kill -9 while the guest is frozen then `recover`.
//! With the test guest's stand-in agent (tests/guest/build-guest.sh, `cc_agent=1`: its
//! fsfreeze is busybox's, the FIFREEZE/FITHAW ioctls qemu-ga issues) and with Debian's
//! own qemu-ga (`cc_qga=1`).

mod common;

use coldclone_backends::agent::{Agent, FreezeStatus, Peer};
use common::*;
use serde_json::Value;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn start(tag: &str, opts: VmOptions) -> Option<(TempDir, TestNet, Vm)> {
    if !rig_available() {
        return None;
    }
    let dir = TempDir::new(tag);
    let net = TestNet::new();
    let vm = Vm::start(&net, dir.path(), opts);
    Some((dir, net, vm))
}

/// A config whose one VM `t1` has these settings.
fn setup(dir: &TempDir, vm: &Vm, settings: &str) -> Setup {
    Setup::with_body(
        dir.path(),
        "",
        &format!(
            "[[vm]]\nname = \"t1\"\nqmp = \"{}\"\n{settings}\n",
            vm.qmp.display()
        ),
    )
}

/// The original's agent, asked directly (the test's own connection).
fn agent_status(vm: &Vm) -> FreezeStatus {
    let mut a = Agent::connect(&vm.agent_socket, &Peer::default(), Duration::from_secs(20))
        .expect("connect to the original's agent");
    a.fsfreeze_status(Duration::from_secs(20))
        .expect("guest-fsfreeze-status")
}

fn warnings(report: &Value) -> String {
    report["warnings"].to_string()
}

/// A clone that ignores the button is stopped through its own agent: clean-shutdown.
fn agent_shutdown_fallback(tag: &str, agent: GuestAgent) {
    let _g = serial();
    let opts = VmOptions {
        ignore_power_button: true,
        agent,
        ..Default::default()
    };
    let Some((dir, net, vm)) = start(tag, opts) else {
        return;
    };
    let setup = setup(&dir, &vm, "stop_timeout_secs = 8");
    let t = Instant::now();
    let (code, report, stderr) = setup.backup(&net.ns);
    eprintln!("backup took {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(code, 0, "{report} {stderr}");
    assert_eq!(report["consistency"], "clean-shutdown", "{report}");
    assert!(
        warnings(&report).contains("guest agent (guest-shutdown)"),
        "no warning of the agent's shutdown: {report}"
    );
    // The clone's own socket was used: the original was never asked to shut down.
    assert!(
        !vm.console().contains("AGENT SHUTDOWN") && !vm.console().contains("SHUTDOWN -h"),
        "the original's agent got the shutdown"
    );
    assert_restored_disk_is_clean(&setup, None);
    vm.assert_unharmed();
    setup.assert_nothing_left(&net);
}

#[test]
fn needs_root_qemu_agent_stand_in_shuts_down_a_clone_that_ignores_the_button() {
    agent_shutdown_fallback("ag-sd", GuestAgent::StandIn);
}

#[test]
fn needs_root_qemu_qga_shuts_down_a_clone_that_ignores_the_button() {
    agent_shutdown_fallback("qga-sd", GuestAgent::Qga);
}

/// Button and agent shutdown ignored: the clone is killed and the original's disks are
/// taken frozen through its agent.
/// `blockdev`: d0 as libvirt's `-blockdev` graph (the quiesced snapshot is then a
/// `blockdev-add` + `blockdev-snapshot` over the checkpoint's overlay node).
fn quiesced(tag: &str, agent: GuestAgent, froze_line: &str, blockdev: bool) {
    let _g = serial();
    let opts = VmOptions {
        ignore_power_button: true,
        agent,
        knobs: "cc_agent_shutdown=ignore".into(),
        blockdev,
        ..Default::default()
    };
    let disk = if blockdev { "libvirt-1-format" } else { "d0" };
    let Some((dir, net, vm)) = start(tag, opts) else {
        return;
    };
    let setup = setup(
        &dir,
        &vm,
        "stop_timeout_secs = 6\non_clone_failure = \"quiesced\"\nfreeze_timeout_secs = 20",
    );
    let t = Instant::now();
    let (code, report, stderr) = setup.backup(&net.ns);
    eprintln!("backup took {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(code, 0, "{report} {stderr}");
    assert_eq!(report["consistency"], "quiesced", "{report}");
    assert!(
        report["quiesce"]["frozen_filesystems"].as_u64() >= Some(1),
        "{report}"
    );
    assert!(warnings(&report).contains("quiesced"), "{report}");
    let snaps = setup.snapshots();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0]["consistency"], "quiesced", "{snaps:?}");
    if !froze_line.is_empty() {
        assert!(vm.console().contains(froze_line), "{}", vm.console());
    }
    assert_eq!(agent_status(&vm), FreezeStatus::Thawed);
    assert_eq!(report["disks"][0]["name"], disk, "{report}");
    assert_restored_fs_frozen_clean(&setup, disk);
    // Both overlays (the checkpoint's and the quiesced snapshot's) are merged back.
    vm.assert_unharmed();
    setup.assert_nothing_left(&net);
}

#[test]
fn needs_root_qemu_agent_stand_in_quiesced_freezes_snapshots_and_thaws() {
    quiesced("ag-q", GuestAgent::StandIn, "AGENT FROZE 1", false);
}

#[test]
fn needs_root_qemu_agent_quiesced_on_a_blockdev_graph_freezes_snapshots_and_thaws() {
    quiesced("ag-qb", GuestAgent::StandIn, "AGENT FROZE 1", true);
}

#[test]
fn needs_root_qemu_qga_quiesced_really_freezes_ext4() {
    quiesced("qga-q", GuestAgent::Qga, "", false);
}

#[test]
fn needs_root_qemu_agent_quiesced_is_refused_before_anything_without_an_agent() {
    let _g = serial();
    let Some((dir, net, vm)) = start("ag-none", VmOptions::default()) else {
        return;
    };
    let setup = setup(&dir, &vm, "on_clone_failure = \"quiesced\"");
    let (code, report, _) = setup.backup(&net.ns);
    assert_eq!(code, 1, "{report}");
    let err = report["error"].as_str().unwrap_or("");
    assert!(
        err.contains("needs the VM's guest agent") && err.contains("org.qemu.guest_agent.0"),
        "unclear error: {err}"
    );
    // Refused at inspection: no run journal, nothing paused, no checkpoint.
    assert!(
        report["checkpoint_method"].is_null() && report["original_pause_ms"].is_null(),
        "{report}"
    );
    vm.assert_unharmed();
}

#[test]
fn needs_root_qemu_agent_freeze_that_never_returns_fails_within_the_timeout_and_thaws() {
    let _g = serial();
    let opts = VmOptions {
        ignore_power_button: true,
        agent: GuestAgent::StandIn,
        knobs: "cc_agent_shutdown=ignore cc_agent_freeze=hang".into(),
        ..Default::default()
    };
    let Some((dir, net, vm)) = start("ag-hang", opts) else {
        return;
    };
    let setup = setup(
        &dir,
        &vm,
        "stop_timeout_secs = 6\non_clone_failure = \"quiesced\"\nfreeze_timeout_secs = 5",
    );
    let (code, report, stderr) = setup.backup(&net.ns);
    assert_eq!(code, 1, "{report} {stderr}");
    let err = report["error"].as_str().unwrap_or("");
    assert!(
        err.contains("could not be frozen")
            && err.contains("did not answer guest-fsfreeze-freeze within 5.0 s")
            && err.contains("thawed again"),
        "unclear error: {err}"
    );
    // The stop step: two bounded waits of 6 s, the kill, the freeze's 5 s and the thaw.
    let stop_ms = report["durations_ms"]["stop"].as_u64().unwrap_or(u64::MAX);
    assert!(
        stop_ms < 60_000,
        "the stop step took {stop_ms} ms: {report}"
    );
    let console = vm.console();
    assert!(console.contains("AGENT FREEZE HANGS"), "{console}");
    assert!(
        console.contains("AGENT THAW 1"),
        "no thaw reached the guest: {console}"
    );
    assert_eq!(agent_status(&vm), FreezeStatus::Thawed);
    assert!(setup.snapshots().is_empty(), "no backup may be recorded");
    vm.assert_unharmed();
    setup.assert_nothing_left(&net);
}

#[test]
fn needs_root_qemu_agent_kill_9_while_frozen_then_recover_thaws() {
    let _g = serial();
    let opts = VmOptions {
        ignore_power_button: true,
        agent: GuestAgent::StandIn,
        knobs: "cc_agent_shutdown=ignore cc_agent_freeze=hang".into(),
        ..Default::default()
    };
    let Some((dir, net, vm)) = start("ag-kill", opts) else {
        return;
    };
    let setup = setup(
        &dir,
        &vm,
        "stop_timeout_secs = 6\non_clone_failure = \"quiesced\"\nfreeze_timeout_secs = 300",
    );
    let mut child = setup
        .command(Some(&net.ns), &["--json", "backup"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn coldclone");
    wait_for_milestone(&setup, "quiesce:freezing", Duration::from_secs(240));
    wait_until("the guest to freeze", Duration::from_secs(60), || {
        vm.console().contains("AGENT FREEZE HANGS")
    });
    // Child::kill is SIGKILL: no clean-up code of coldclone runs.
    child.kill().expect("kill -9");
    let _ = child.wait();
    // The guest is frozen for real: its writer stands still.
    assert_frozen_until_recover_thaws(
        &setup,
        &net,
        &vm,
        "a kill -9 while the guest was frozen",
        Some("AGENT THAW 1"),
    );
}

#[test]
fn needs_root_qemu_qga_kill_9_while_frozen_then_recover_thaws() {
    let _g = serial();
    let opts = VmOptions {
        ignore_power_button: true,
        agent: GuestAgent::Qga,
        knobs: "cc_agent_shutdown=ignore".into(),
        ..Default::default()
    };
    let Some((dir, net, vm)) = start("qga-kill", opts) else {
        return;
    };
    let setup = setup(
        &dir,
        &vm,
        "stop_timeout_secs = 6\non_clone_failure = \"quiesced\"\nfreeze_timeout_secs = 20",
    );
    // Halted right after qemu-ga froze the file systems (debug builds' fault hook).
    let mut child = setup
        .command(Some(&net.ns), &["--json", "backup"])
        .env("COLDCLONE_TEST_HALT_AT", "quiesce:frozen")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn coldclone");
    wait_for_milestone(&setup, "quiesce:frozen", Duration::from_secs(240));
    child.kill().expect("kill -9");
    let _ = child.wait();
    // qemu-ga keeps them frozen: nothing thaws a guest but a thaw.
    assert_frozen_until_recover_thaws(
        &setup,
        &net,
        &vm,
        "a kill -9 while qemu-ga held the guest frozen",
        None,
    );
}

/// After a kill -9 of coldclone while the guest is frozen: the agent says frozen and the
/// writer stands still, until `recover` thaws it (`thaw_line`: what the guest's console
/// then shows); the original unharmed, nothing left.
fn assert_frozen_until_recover_thaws(
    setup: &Setup,
    net: &TestNet,
    vm: &Vm,
    why: &str,
    thaw_line: Option<&str>,
) {
    assert_eq!(agent_status(vm), FreezeStatus::Frozen);
    // (The heartbeat may still print the last value written before the freeze.)
    std::thread::sleep(Duration::from_secs(2));
    let c = vm.counter();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(vm.counter(), c, "the writer ran on a frozen file system");
    recover_ok(setup, net, why);
    if let Some(line) = thaw_line {
        assert!(vm.console().contains(line), "{}", vm.console());
    }
    assert_eq!(agent_status(vm), FreezeStatus::Thawed);
    vm.assert_unharmed();
    setup.assert_nothing_left(net);
}
