//! Consistency audits on real QEMU guests. Needs root and QEMU.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The test guest's own invariant, as a user probe: both counters present and equal.
fn counter_probe(dir: &Path) -> PathBuf {
    let p = dir.join("probe.sh");
    std::fs::write(
        &p,
        "#!/bin/sh\nimg=$COLDCLONE_AUDIT_DISK_d0\na=$(debugfs -R 'cat /a.txt' \"$img\" 2>/dev/null)\nb=$(debugfs -R 'cat /b.txt' \"$img\" 2>/dev/null)\n\
         echo \"a=$a b=$b\"\n[ -n \"$a\" ] && [ \"$a\" = \"$b\" ]\n",
    )
    .unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&p)
        .status()
        .unwrap();
    p
}

fn audit(setup: &Setup, ns: &str, extra: &[&str]) -> (i32, Value) {
    let mut args = vec!["--json", "audit", "t1"];
    args.extend_from_slice(extra);
    if !extra.contains(&"--boot-timeout") {
        args.extend_from_slice(&["--boot-timeout", "120"]);
    }
    let out = setup.coldclone(Some(ns), &args);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "audit printed no JSON: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), v)
}

#[test]
fn needs_root_qemu_audits_pass_a_good_backup_and_fail_bad_ones() {
    let _s = serial();
    if !rig_available() {
        return;
    }
    let dir = TempDir::new("audit");
    let net = TestNet::new();
    let vm = Vm::start(&net, dir.path(), VmOptions::default());
    let probe = counter_probe(dir.path());
    let setup = Setup::new(dir.path(), &vm.qmp, "audit_heartbeat = \"HB a=\"\n", "");
    let (code, report, stderr) = setup.backup(&net.ns);
    assert_eq!(code, 0, "{report} {stderr}");

    // A good backup passes: fsck clean, booted to its heartbeat, probe happy.
    let (code, a) = audit(&setup, &net.ns, &["--probe", probe.to_str().unwrap()]);
    assert_eq!(code, 0, "{a:#}");
    assert_eq!(a["pass"], true, "{a:#}");
    let fs = &a["examination"]["filesystems"][0];
    assert_eq!(fs["fs_type"], "ext4");
    assert_eq!(fs["clean"], true);
    assert_eq!(fs["state"], "clean");
    assert_eq!(a["boot"]["booted"], true, "{a:#}");
    assert!(a["boot"]["console_tail"]
        .as_str()
        .unwrap_or("")
        .contains("HB a="));
    assert_eq!(a["examination"]["probe"]["exit_code"], 0);
    // Stored with the backup, shown by `snapshots`.
    let snaps = setup.snapshots();
    assert_eq!(snaps[0]["audit"]["pass"], true, "{snaps:?}");
    setup.assert_nothing_left(&net);

    // A probe that fails fails the audit.
    let failing = dir.path().join("fail.sh");
    std::fs::write(&failing, "#!/bin/sh\necho 'orders table missing'\nexit 3\n").unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&failing)
        .status()
        .unwrap();
    let (code, a) = audit(&setup, &net.ns, &["--probe", failing.to_str().unwrap()]);
    assert_eq!(code, 4);
    assert_eq!(a["pass"], false);
    let reasons = a["reasons"].to_string();
    assert!(
        reasons.contains("exited 3") && reasons.contains("orders table missing"),
        "{reasons}"
    );

    // A heartbeat that never comes fails the boot test.
    let cfg = std::fs::read_to_string(&setup.config).unwrap();
    std::fs::write(
        &setup.config,
        cfg.replace(
            "audit_heartbeat = \"HB a=\"",
            "audit_heartbeat = \"never printed\"",
        ),
    )
    .unwrap();
    let (code, a) = audit(&setup, &net.ns, &["--boot-timeout", "15"]);
    assert_eq!(code, 4);
    assert!(
        a["reasons"].to_string().contains("boot test failed"),
        "{a:#}"
    );
    std::fs::write(&setup.config, cfg).unwrap();
    setup.assert_nothing_left(&net);
    vm.assert_unharmed();
}

#[test]
fn needs_root_qemu_an_audit_fails_a_backup_of_a_corrupted_file_system() {
    let _s = serial();
    if !rig_available() {
        return;
    }
    let dir = TempDir::new("auditbad");
    let net = TestNet::new();
    // The data disk carries a real inconsistency (a wrong link count) that the
    // guest does not notice: every backup of it inherits it.
    let raw = dir.path().join("data.raw");
    std::fs::copy(guest().join("data.raw"), &raw).unwrap();
    let st = std::process::Command::new("debugfs")
        .args(["-w", "-R", "set_inode_field / links_count 7"])
        .arg(&raw)
        .output()
        .unwrap();
    assert!(st.status.success());
    let vm = Vm::start_with_disk(&net, dir.path(), VmOptions::default(), &raw);
    let setup = Setup::new(dir.path(), &vm.qmp, "audit_heartbeat = \"HB a=\"\n", "");
    let (code, report, stderr) = setup.backup(&net.ns);
    assert_eq!(code, 0, "{report} {stderr}");
    let (code, a) = audit(&setup, &net.ns, &[]);
    assert_eq!(code, 4, "{a:#}");
    assert_eq!(a["pass"], false);
    let reasons = a["reasons"].to_string();
    assert!(
        reasons.contains("disk d0") && reasons.contains("ext4 check failed"),
        "{reasons}"
    );
    assert!(a["examination"]["filesystems"][0]["fsck_output"]
        .as_str()
        .unwrap_or("")
        .contains("count"));
    let snaps = setup.snapshots();
    assert_eq!(snaps[0]["audit"]["pass"], false);
    setup.assert_nothing_left(&net);
}

#[test]
fn needs_root_qemu_compare_shows_what_the_crash_copy_lacks() {
    let _s = serial();
    if !rig_available() {
        return;
    }
    let dir = TempDir::new("compare");
    let net = TestNet::new();
    let vm = Vm::start(&net, dir.path(), VmOptions::default());
    let probe = counter_probe(dir.path());
    let setup = Setup::new(dir.path(), &vm.qmp, "", "");
    let out = setup.coldclone(
        Some(&net.ns),
        &[
            "--json",
            "audit",
            "t1",
            "--compare",
            "--probe",
            probe.to_str().unwrap(),
        ],
    );
    let r: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.code(), Some(0), "{r:#}");
    assert_eq!(r["clean_consistent"], true, "{r:#}");
    let clean_fs = &r["clean_shutdown"]["filesystems"][0];
    assert_eq!(clean_fs["needs_recovery"], false);
    assert_eq!(clean_fs["state"], "clean");
    // The crash copy of the same instant: the file system was mounted and its
    // journal holds unapplied writes; the probe sees the counters torn or lost.
    assert_eq!(r["crash_consistent_ok"], false, "{r:#}");
    let diffs = r["differences"].to_string();
    assert!(
        diffs.contains("journal needs replaying") || diffs.contains("probe"),
        "{diffs}"
    );
    assert!(!r["differences"].as_array().unwrap().is_empty());
    // The clean backup was stored as a normal backup.
    assert_eq!(setup.snapshots().len(), 1);
    vm.assert_unharmed();
    setup.assert_nothing_left(&net);
}
