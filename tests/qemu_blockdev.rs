//! A QEMU guest whose disk is a `-blockdev` graph (libvirt's shape: a qcow2
//! format node over a file node), backed up through the binary: snapshot by
//! `blockdev-add` + `blockdev-snapshot` in one transaction, the clone's graph
//! derived, the overlay node closed again. Needs root, QEMU, iproute2,
//! tcpdump (`needs_root_qemu_`).

mod common;

use common::*;
use serde_json::{json, Value};
use std::time::Duration;

const DISK: &str = "libvirt-1-format";

/// No node of coldclone's (`cc-...`) is left in the original's block graph.
fn assert_no_overlay_node(vm: &Vm) {
    let nodes = vm.qmp("query-named-block-nodes", json!({"flat": true}));
    let ours: Vec<String> = nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["node-name"].as_str())
        .filter(|n| n.starts_with("cc-"))
        .map(str::to_string)
        .collect();
    assert!(
        ours.is_empty(),
        "overlay nodes left in the original: {ours:?}"
    );
}

#[test]
fn needs_root_qemu_a_blockdev_guest_is_backed_up_clean_and_the_original_unharmed() {
    let _s = serial();
    if !rig_available() {
        return;
    }
    let dir = TempDir::new("blockdev");
    let net = TestNet::new();
    let vm = Vm::start(
        &net,
        dir.path(),
        VmOptions {
            blockdev: true,
            with_nic: true,
            ..Default::default()
        },
    );
    let setup = Setup::new(dir.path(), &vm.qmp, "", "");
    let before = vm.counter();
    let cap = Capture::start(&net, dir.path(), &vm.guest_ip);
    let (code, report, stderr) = setup.backup(&net.ns);
    std::thread::sleep(Duration::from_secs(2));
    let seqs = cap.stop();
    assert_eq!(code, 0, "backup failed: {report} {stderr}");
    assert_eq!(report["status"], "ok");
    assert_eq!(report["consistency"], "clean-shutdown", "{report}");
    assert_eq!(report["disks"][0]["name"], DISK, "{report}");
    assert_eq!(report["disks"][0]["bytes"], 64 << 20);
    assert!(seqs.len() >= 10, "the capture saw {} pings", seqs.len());
    assert!(
        duplicates(&seqs).is_empty(),
        "the clone reached the original's network"
    );
    let restored = restore_disk_checked(&setup, DISK, None);
    assert!(
        restored.counter >= before,
        "the backup's counter {} is older than before the backup {before}",
        restored.counter
    );
    vm.assert_unharmed();
    assert_no_overlay_node(&vm);
    setup.assert_nothing_left(&net);

    // Incremental: the dirty bitmap lives on the format node.
    let (code, report2, stderr) = setup.backup(&net.ns);
    assert_eq!(code, 0, "second backup failed: {report2} {stderr}");
    assert_eq!(
        report2["disks"][0]["changed_block_map"], "qemu-bitmap",
        "{report2}"
    );
    let second = report2["snapshot_id"]
        .as_str()
        .expect("snapshot id")
        .to_string();
    assert!(restore_disk_checked(&setup, DISK, Some(&second)).counter >= restored.counter);
    vm.assert_unharmed();
    assert_no_overlay_node(&vm);

    // Killed with the original on the added overlay node: recover commits it
    // back and closes the node.
    let step = "checkpoint:memory-saved";
    let mut child = setup
        .command(Some(&net.ns), &["--json", "backup"])
        .env("COLDCLONE_TEST_HALT_AT", step)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn coldclone");
    wait_for_milestone(&setup, step, Duration::from_secs(180));
    // coldclone holds the QMP socket now: ask on the second one.
    let blocks = vm.observe("query-block", json!({})).unwrap_or_default();
    let on: Value = blocks
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["inserted"]["ro"] == false)
        .cloned()
        .unwrap_or_default();
    assert!(
        on["inserted"]["node-name"]
            .as_str()
            .is_some_and(|n| n.starts_with("cc-")),
        "at {step} the original should run on coldclone's overlay node: {on}"
    );
    child.kill().expect("kill -9");
    let _ = child.wait();
    recover_ok(&setup, &net, step);
    vm.assert_unharmed();
    assert_no_overlay_node(&vm);
    setup.assert_nothing_left(&net);
    assert_eq!(setup.snapshots().len(), 2, "the killed run stored nothing");
}
