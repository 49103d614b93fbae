//! The original's write overlay and the memory image only on a real file
//! system with room: a VM on a block device gets its overlay in the state
//! folder (never beside the device, in devtmpfs); a state folder on tmpfs,
//! or one where the overlay cannot fit, refuses the backup before anything
//! is paused.

use coldclone_backends::qemu::qmp::Qmp;
use coldclone_backends::qemu::{space, QemuBackend};
use coldclone_backends::{Hypervisor, VmLocator};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod common;
use common::TestJournal;

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn ram_and_pseudo_file_systems_are_refused() {
    let shm = Path::new("/dev/shm");
    let shm_is_tmpfs = space::statfs(shm).is_ok_and(|f| space::refused_kind(f.kind).is_some());
    if !coldclone_testkit::require(shm_is_tmpfs, "/dev/shm on tmpfs") {
        return;
    }
    for dir in ["/dev/shm", "/proc", "/dev"] {
        let e = space::check(&[space::Need {
            dir: dir.into(),
            bytes: 1,
            what: "the memory image".into(),
        }])
        .unwrap_err();
        assert!(e.to_string().contains("real file system"), "{dir}: {e}");
    }
    let e = space::check(&[space::Need {
        dir: std::env::temp_dir(),
        bytes: u64::MAX / 2,
        what: "the memory image".into(),
    }])
    .unwrap_err();
    assert!(e.to_string().contains("not enough room"), "{e}");
    assert_eq!(
        space::overlay_need(1 << 40),
        space::OVERLAY_BOUND + space::RESERVE
    );
}

struct Rig {
    dir: PathBuf,
    loops: Vec<String>,
    mounts: Vec<PathBuf>,
    vm: Option<Child>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(mut c) = self.vm.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg(m).status();
        }
        for l in &self.loops {
            let _ = Command::new("losetup").args(["-d", l]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn status(qmp: &Path) -> String {
    let mut q = Qmp::connect(qmp).unwrap();
    q.status().unwrap()
}

fn active_file(qmp: &Path) -> String {
    let mut q = Qmp::connect(qmp).unwrap();
    let b = q.execute("query-block", json!({})).unwrap();
    b.as_array()
        .and_then(|a| a.iter().find(|x| x["device"] == "d0"))
        .and_then(|x| x["inserted"]["file"].as_str())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn needs_root_qemu_a_vm_on_a_block_device_overlays_only_where_it_fits() {
    if !coldclone_testkit::require_root_and_tools(
        "loop devices and mounts",
        &[
            "qemu-system-x86_64",
            "qemu-img",
            "losetup",
            "mkfs.ext4",
            "mount",
        ],
    ) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("coldclone-space-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut rig = Rig {
        dir: dir.clone(),
        loops: vec![],
        mounts: vec![],
        vm: None,
    };
    // The original's disk: a 64 MiB block device.
    sh(&format!("truncate -s 64M {}/disk.raw", dir.display()));
    let dev = sh(&format!("losetup --find --show {}/disk.raw", dir.display()));
    rig.loops.push(dev.clone());
    // A state folder too small for its overlay (16 MiB ext4), one on tmpfs,
    // and one with room.
    sh(&format!(
        "truncate -s 16M {d}/small.img && mkfs.ext4 -q -F {d}/small.img",
        d = dir.display()
    ));
    let small = dir.join("small");
    std::fs::create_dir_all(&small).unwrap();
    sh(&format!(
        "mount -o loop {}/small.img {}",
        dir.display(),
        small.display()
    ));
    rig.mounts.push(small.clone());
    let ram = dir.join("ram");
    std::fs::create_dir_all(&ram).unwrap();
    sh(&format!(
        "mount -t tmpfs -o size=512m tmpfs {}",
        ram.display()
    ));
    rig.mounts.push(ram.clone());
    let roomy = dir.join("roomy");

    let qmp = dir.join("vm.qmp");
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "pc",
            "-accel",
            "tcg",
            "-m",
            "32",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args([
            "-drive",
            &format!("file={dev},format=raw,if=none,id=d0"),
            "-device",
            "virtio-blk-pci,drive=d0",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    rig.vm = Some(child);
    let t = std::time::Instant::now();
    while !qmp.exists() && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let backend = QemuBackend::default();
    let vm = backend
        .inspect(&VmLocator::Qemu {
            qmp: qmp.clone(),
            options: Default::default(),
        })
        .unwrap();

    for (state, why) in [(&small, "not enough room"), (&ram, "tmpfs")] {
        let work = state.join("runs").join("r1");
        std::fs::create_dir_all(&work).unwrap();
        let mut j = TestJournal::default();
        let e = backend.checkpoint(&vm, &work, &mut j).unwrap_err();
        assert!(e.to_string().contains(why), "{}: {e}", state.display());
        // Refused before anything: running, on its device, nothing journaled.
        assert_eq!(status(&qmp), "running");
        assert_eq!(active_file(&qmp), dev);
        assert!(j.open.is_empty(), "{:?}", j.open);
    }

    // With room: the overlay is in STATE_DIR/originals, not beside /dev/loopN.
    let work = roomy.join("runs").join("r2");
    std::fs::create_dir_all(&work).unwrap();
    let mut j = TestJournal::default();
    let cp = backend.checkpoint(&vm, &work, &mut j).expect("checkpoint");
    let active = active_file(&qmp);
    assert!(
        active.starts_with(&roomy.join("originals").display().to_string()),
        "{active}"
    );
    assert_eq!(
        space::statfs(Path::new(&active))
            .map(|f| space::refused_kind(f.kind))
            .unwrap(),
        None
    );
    backend
        .release_checkpoint(&vm, &cp, &mut j)
        .expect("merge back");
    assert_eq!(active_file(&qmp), dev);
    assert!(!Path::new(&active).exists());
    let _ = std::fs::remove_file(&cp.memory_image);
    let mut q = Qmp::connect(&qmp).unwrap();
    let _ = q.execute("quit", Value::Object(Default::default()));
}
