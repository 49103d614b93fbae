//! `restore --as` dispatch and refusals by the kept definition's kind, on backups
//! written straight into a repository (no hypervisor): an xl backup asks for `--vg`, a
//! XAPI one for `--sr`; `--vg` refuses an existing config before touching LVM, and a
//! failing `lvcreate` leaves no config. No root: this machine's LVM has no
//! device-mapper, so the LVs themselves are the Xen lab's (tests/xl_lab.rs, `restore`).

mod cli_rig;
use cli_rig::*;
use coldclone_repository::{
    BackupOptions, Location, MemSource, NoProgress, Repository, SnapshotMeta, VmConfig,
};
use std::path::PathBuf;

const XL_JSON: &str = r#"{"domid": 3, "config": {
  "c_info": {"type": "pv", "name": "g1"},
  "b_info": {"max_vcpus": 1, "avail_vcpus": [0], "max_memkb": 131072, "target_memkb": 131072,
             "kernel": "/root/domu/vmlinuz", "ramdisk": "/root/domu/initrd.gz", "cmdline": "console=hvc0"},
  "disks": [{"pdev_path": "/dev/vg0/g1", "vdev": "xvda", "format": "raw", "readwrite": 1}],
  "nics": [{"devid": 0, "mac": "00:16:3e:7a:00:01", "bridge": "xenbr0"}]}}"#;

/// A repository with one backup each of `g1` (xl) and `x1` (XAPI record).
fn repo(tag: &str) -> (Dir, PathBuf) {
    let d = std::env::temp_dir().join(format!("coldclone-kinds-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("pw"), "pw\n").unwrap();
    let cfg = d.join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{0}/state\"\n[repository]\npath = \"{0}/repo\"\npassword_file = \"{0}/pw\"\n",
            d.display()
        ),
    )
    .unwrap();
    let o = coldclone(&cfg, &["init"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let repo = Repository::open(&Location::Local(d.join("repo")), "pw").unwrap();
    for (vm, kind, text) in [
        ("g1", "xl-json", XL_JSON),
        (
            "x1",
            "xapi-vm-record",
            r#"{"vm": {}, "vbds": [], "vifs": []}"#,
        ),
    ] {
        repo.backup_disk(
            &MemSource(vec![7u8; 1 << 20]),
            SnapshotMeta {
                vm: vm.into(),
                disk: "xvda".into(),
                backend: "test".into(),
                host: "h".into(),
                host_uuid: "00000000-0000-4000-8000-000000000001".into(),
                consistency: "clean-shutdown".into(),
                tags: [("run".to_string(), format!("run-{vm}"))].into(),
                vm_config: Some(VmConfig {
                    kind: kind.into(),
                    text: text.into(),
                }),
            },
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap();
    }
    (Dir(d), cfg)
}

#[test]
fn restore_as_asks_for_the_flags_of_the_backups_kind_and_refuses_before_making_anything() {
    let (d, cfg) = repo("dispatch");
    let out = d.0.join("out");
    let out_s = out.display().to_string();
    // An xl backup through the QEMU form: told to use --vg; nothing written.
    let o = coldclone(&cfg, &["restore", "g1", "--as", "g1r", "--to", &out_s]);
    assert!(!o.status.success());
    assert!(err(&o).contains("--vg VG"), "{}", err(&o));
    // A XAPI backup through --vg, or the QEMU form: told to use --sr.
    let o = coldclone(
        &cfg,
        &[
            "restore", "x1", "--as", "x1r", "--vg", "vg0", "--to", &out_s,
        ],
    );
    assert!(!o.status.success());
    assert!(err(&o).contains("--sr SR"), "{}", err(&o));
    let o = coldclone(&cfg, &["restore", "x1", "--as", "x1r", "--to", &out_s]);
    assert!(err(&o).contains("--sr SR"), "{}", err(&o));
    // An xl backup through --sr: told to use --vg.
    let o = coldclone(
        &cfg,
        &["restore", "g1", "--as", "g1r", "--sr", "Local storage"],
    );
    assert!(!o.status.success());
    assert!(err(&o).contains("--vg VG"), "{}", err(&o));
    // --network without --sr or --vg, and --sr with --to, are refused by the CLI.
    let o = coldclone(
        &cfg,
        &[
            "restore",
            "g1",
            "--as",
            "g1r",
            "--to",
            &out_s,
            "--network",
            "br0",
        ],
    );
    assert!(!o.status.success());
    let o = coldclone(
        &cfg,
        &["restore", "x1", "--as", "x1r", "--sr", "s", "--to", &out_s],
    );
    assert!(!o.status.success());
    // Bad names and volume groups.
    for (name, vg) in [
        ("../x", "vg0"),
        ("-x", "vg0"),
        ("g1r", "../vg"),
        ("g1r", "-vg"),
    ] {
        let o = coldclone(
            &cfg,
            &["restore", "g1", "--as", name, "--vg", vg, "--to", &out_s],
        );
        assert!(!o.status.success(), "{name} {vg}");
        assert!(!err(&o).contains("panicked"), "{}", err(&o));
    }
    // An existing config is refused before LVM is asked anything, and left as it was.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("g1r.cfg"), "keep me\n").unwrap();
    let o = coldclone(
        &cfg,
        &[
            "restore", "g1", "--as", "g1r", "--vg", "vg0", "--to", &out_s,
        ],
    );
    assert!(!o.status.success());
    assert!(err(&o).contains("g1r.cfg exists"), "{}", err(&o));
    assert_eq!(
        std::fs::read_to_string(out.join("g1r.cfg")).unwrap(),
        "keep me\n"
    );
    // Where no LV can be made (no such VG here): a clear error and no config at all.
    if coldclone_testkit::have_tool("lvcreate") {
        let o = coldclone(
            &cfg,
            &[
                "restore",
                "g1",
                "--as",
                "g1s",
                "--vg",
                "coldclone-no-such-vg",
                "--to",
                &out_s,
            ],
        );
        assert!(!o.status.success());
        let e = err(&o);
        assert!(
            e.contains("coldclone-no-such-vg") && !e.contains("panicked"),
            "{e}"
        );
        assert!(!out.join("g1s.cfg").exists(), "no config without its disks");
        let left: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left.len(), 1, "only the kept file: {left:?}");
    }
}
