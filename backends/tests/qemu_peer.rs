//! Root never trusts a QMP peer or an overlay header it did not check: the
//! peer must be root or the VM's configured uid and run a qemu-system
//! binary; the offline merge-back commits an overlay only into the frozen
//! image the journal recorded.

use coldclone_backends::qemu::{self, QemuBackend, QemuOptions};
use coldclone_backends::{Hypervisor, VmLocator};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("coldclone-peer-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn locator(qmp: &Path, uid: Option<u32>) -> VmLocator {
    VmLocator::Qemu {
        qmp: qmp.to_path_buf(),
        options: QemuOptions {
            uid,
            ..Default::default()
        },
    }
}

fn backend(uid: Option<u32>) -> QemuBackend {
    QemuBackend::with_options(&QemuOptions {
        uid,
        ..Default::default()
    })
}

/// A QMP server that is not QEMU (this test process): it greets and
/// answers everything, as a planted socket would.
fn fake_qmp(path: &Path) {
    let l = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut w = s.try_clone().unwrap();
            let _ = w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n");
            for line in BufReader::new(s).lines().map_while(|l| l.ok()) {
                let _ = line;
                let _ = w.write_all(b"{\"return\": {}}\n");
            }
        }
    });
}

#[test]
fn a_qmp_peer_that_is_not_qemu_is_refused_before_anything() {
    let dir = tempdir("fake");
    let qmp = dir.join("vm.qmp");
    fake_qmp(&qmp);
    let e = backend(None).inspect(&locator(&qmp, None)).unwrap_err();
    assert!(e.to_string().contains("not a QEMU system emulator"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn qemu_binaries_are_recognised_by_name() {
    assert!(qemu::is_qemu_binary(Path::new(
        "/usr/bin/qemu-system-x86_64"
    )));
    assert!(qemu::is_qemu_binary(Path::new(
        "/usr/local/bin/qemu-system-aarch64"
    )));
    for not in [
        "/bin/sh",
        "/usr/bin/kvm",
        "/tmp/qemu-system-",
        "/tmp/qemu-system-x86_64 (deleted)",
        "/usr/bin/python3",
    ] {
        assert!(!qemu::is_qemu_binary(Path::new(not)), "{not}");
    }
}

#[test]
fn needs_root_qemu_a_qemu_of_another_user_is_refused_unless_configured() {
    if !coldclone_testkit::require_root_and_tools(
        "starting QEMU as another user",
        &["qemu-system-x86_64", "setpriv"],
    ) {
        return;
    }
    let dir = tempdir("uid");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let qmp = dir.join("vm.qmp");
    let mut child = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "qemu-system-x86_64",
        ])
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !qmp.exists() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let refused = backend(None).inspect(&locator(&qmp, None));
    let accepted = backend(Some(65534)).inspect(&locator(&qmp, Some(65534)));
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let e = refused.unwrap_err();
    assert!(e.to_string().contains("uid 65534"), "{e}");
    accepted.expect("the configured uid is accepted");
}

fn img(args: &[&str]) {
    let st = Command::new("qemu-img")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img {args:?}");
}

/// A qcow2 overlay at `overlay` backed by `backing`, with 64 KiB written into it.
fn overlay_with_a_write(backing: &Path, overlay: &Path) {
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        backing.to_str().unwrap(),
        overlay.to_str().unwrap(),
    ]);
    let st = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 64k"])
        .arg(overlay)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
}

fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

#[test]
fn needs_root_qemu_offline_merge_back_only_into_the_journaled_image() {
    if !coldclone_testkit::require_root_and_tools(
        "qemu-img on root's files",
        &["qemu-img", "qemu-io"],
    ) {
        return;
    }
    let dir = tempdir("merge");
    let base = dir.join("vm.qcow2");
    let victim = dir.join("root-only.qcow2");
    let overlay = dir.join(".vm.qcow2.coldclone-r1.qcow2");
    img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "1M"]);
    img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        victim.to_str().unwrap(),
        "1M",
    ]);
    let victim_before = std::fs::read(&victim).unwrap();
    // A planted overlay whose header names another file.
    overlay_with_a_write(&victim, &overlay);
    let e = qemu::merge_back_offline(dead_pid(), &overlay, &base).unwrap_err();
    assert!(e.to_string().contains("not by the journaled image"), "{e}");
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        victim_before,
        "the other file was written"
    );
    assert!(overlay.exists());
    // The real one: committed into the frozen image, overlay gone.
    std::fs::remove_file(&overlay).unwrap();
    overlay_with_a_write(&base, &overlay);
    qemu::merge_back_offline(dead_pid(), &overlay, &base).unwrap();
    assert!(!overlay.exists());
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0x5a 0 64k"])
        .arg(&base)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("read 65536/65536"),
        "{out:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
