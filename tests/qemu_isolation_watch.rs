//! Isolation is verified again while the clone runs: a port that a host
//! network manager enslaves to the clone's bridge after resume fails the
//! backup (the clone is killed, nothing is stored). Needs root and QEMU.

mod common;

use common::*;
use std::process::Stdio;
use std::time::Duration;

#[test]
fn needs_root_qemu_a_veth_enslaved_after_resume_fails_the_backup() {
    let _s = serial();
    if !rig_available() {
        return;
    }
    let dir = TempDir::new("rewatch");
    let net = TestNet::new();
    let vm = Vm::start(
        &net,
        dir.path(),
        VmOptions {
            with_nic: true,
            // The clone keeps running for the whole stop timeout.
            ignore_power_button: true,
            ..Default::default()
        },
    );
    // The operator's bridge, isolated as coldclone wants it.
    let ns = network_isolation::Namespace::named(&net.ns);
    network_isolation::create_bridge(&ns, "opbr").unwrap();
    let setup = Setup::new(
        dir.path(),
        &vm.qmp,
        "",
        "[isolation]\nbridge = \"opbr\"\n[defaults]\non_clone_failure = \"crash\"\n",
    );
    let cfg = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace("stop_timeout_secs = 60\n", "stop_timeout_secs = 15\n");
    std::fs::write(&setup.config, cfg).unwrap();
    let child = setup
        .command(Some(&net.ns), &["--json", "backup"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Checked again before the stop request: still fine. Then a host
    // network manager puts a veth on the bridge while the clone runs.
    wait_for_milestone(
        &setup,
        "isolation:reverified-before-stop",
        Duration::from_secs(300),
    );
    let out = sh(&format!(
        "ip -n {n} link add hostv0 type veth peer name hostv1 && ip -n {n} link set hostv0 master opbr up",
        n = net.ns
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = stdout
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{report} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = report["error"].as_str().unwrap_or("");
    assert!(err.contains("unexpected port hostv0"), "{err}");
    assert!(setup.snapshots().is_empty(), "no backup may be recorded");
    vm.assert_unharmed();
    let _ = sh(&format!("ip -n {} link del hostv0", net.ns));
    setup.assert_nothing_left(&net);
}
