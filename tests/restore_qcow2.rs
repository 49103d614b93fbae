//! `coldclone restore VM --disk D --to FILE --format qcow2`: the same content as the raw
//! restore (`qemu-img compare`), an existing target kept without `--force`, a failed
//! restore (damaged pack) leaving the target as it was. Needs qemu-img (`needs_qemu_`).

mod cli_rig;
use cli_rig::*;
use coldclone_repository::{
    BackupOptions, Location, MemSource, NoProgress, Repository, SnapshotMeta,
};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// 5 MiB + an odd tail: random data, a run of zeros, repeated content.
fn disk() -> Vec<u8> {
    let mut x = 7u64;
    let mut v: Vec<u8> = (0..(5 << 20) + 777)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect();
    v[1 << 20..3 << 20].fill(0);
    let head: Vec<u8> = v[..65536].to_vec();
    v[(4 << 20)..(4 << 20) + 65536].copy_from_slice(&head);
    v
}

fn info(img: &Path) -> Value {
    let o = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(img)
        .output()
        .expect("qemu-img");
    assert!(o.status.success(), "{}", err(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn needs_qemu_disk_restore_as_qcow2_holds_what_the_raw_restore_holds() {
    if !coldclone_testkit::require_tools(&["qemu-img"]) {
        return;
    }
    let d = std::env::temp_dir().join(format!("coldclone-qcow2-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let d = Dir(d);
    let cfg = config(&d.0);
    let init = coldclone(&cfg, &["init"]);
    assert!(init.status.success(), "{}", err(&init));
    let repo = Repository::open(&Location::Local(d.0.join("repo")), "pw").unwrap();
    let data = disk();
    repo.backup_disk(
        &MemSource(data.clone()),
        SnapshotMeta {
            vm: "web1".into(),
            disk: "xvda".into(),
            backend: "qemu".into(),
            host: "h".into(),
            host_uuid: "00000000-0000-4000-8000-000000000001".into(),
            consistency: "clean-shutdown".into(),
            tags: Default::default(),
            vm_config: None,
        },
        &BackupOptions::default(),
        &NoProgress,
    )
    .unwrap();
    drop(repo);

    let raw = d.0.join("r.raw");
    let qcow = d.0.join("r.qcow2");
    let (raw_s, qcow_s) = (raw.display().to_string(), qcow.display().to_string());
    let o = coldclone(&cfg, &["restore", "web1", "--disk", "xvda", "--to", &raw_s]);
    assert!(o.status.success(), "{}", err(&o));
    let o = coldclone(
        &cfg,
        &[
            "--json", "restore", "web1", "--disk", "xvda", "--to", &qcow_s, "--format", "qcow2",
        ],
    );
    assert!(o.status.success(), "{}", err(&o));
    let report: Value = serde_json::from_slice(&o.stdout).expect("json report");
    assert_eq!(report["format"], "qcow2", "{report}");
    assert_eq!(report["bytes"], data.len() as u64);
    let i = info(&qcow);
    assert_eq!(i["format"], "qcow2", "{i}");
    assert!(i["backing-filename"].is_null(), "{i}");
    assert_eq!(
        i["virtual-size"].as_u64(),
        Some(data.len().div_ceil(512) as u64 * 512)
    );
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&raw)
        .arg(&qcow)
        .output()
        .expect("qemu-img compare");
    assert!(
        cmp.status.success() && String::from_utf8_lossy(&cmp.stdout).contains("identical"),
        "qemu-img compare: {} {}",
        String::from_utf8_lossy(&cmp.stdout),
        err(&cmp)
    );
    // Zeros stay unallocated: the image is smaller than the disk's data.
    assert!(
        std::fs::metadata(&qcow).unwrap().len() < data.len() as u64,
        "{i}"
    );

    // An existing target is kept without --force.
    let before = std::fs::read(&qcow).unwrap();
    let o = coldclone(
        &cfg,
        &[
            "restore", "web1", "--disk", "xvda", "--to", &qcow_s, "--format", "qcow2",
        ],
    );
    assert!(!o.status.success());
    assert!(
        err(&o).contains("exists") && err(&o).contains("--force"),
        "{}",
        err(&o)
    );
    assert_eq!(std::fs::read(&qcow).unwrap(), before);
    // Not a regular file, and --format with --as: refused, named.
    let o = coldclone(
        &cfg,
        &[
            "restore",
            "web1",
            "--disk",
            "xvda",
            "--to",
            &d.0.display().to_string(),
            "--format",
            "qcow2",
        ],
    );
    assert!(!o.status.success());
    assert!(err(&o).contains("not a regular file"), "{}", err(&o));
    let o = coldclone(
        &cfg,
        &[
            "restore",
            "web1",
            "--as",
            "n",
            "--to",
            &d.0.display().to_string(),
            "--format",
            "qcow2",
        ],
    );
    assert!(!o.status.success());
    assert!(err(&o).contains("--format"), "{}", err(&o));
    let o = coldclone(
        &cfg,
        &[
            "restore", "web1", "--disk", "xvda", "--to", &qcow_s, "--format", "vmdk",
        ],
    );
    assert!(!o.status.success());
    assert!(err(&o).contains("vmdk"), "{}", err(&o));

    // A damaged pack: the restore fails, even --force leaves the target as it was and
    // nothing of the attempt beside it.
    for pack in packs(&d.0.join("repo")) {
        let mut bytes = std::fs::read(&pack).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x55;
        std::fs::write(&pack, &bytes).unwrap();
    }
    let o = coldclone(
        &cfg,
        &[
            "restore", "web1", "--disk", "xvda", "--to", &qcow_s, "--format", "qcow2", "--force",
        ],
    );
    assert!(!o.status.success(), "a damaged backup restored");
    assert_eq!(
        std::fs::read(&qcow).unwrap(),
        before,
        "a failed restore changed the target"
    );
    let left: Vec<String> = std::fs::read_dir(&d.0)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("coldclone-restore") || n.contains("partial"))
        .collect();
    assert!(left.is_empty(), "a failed restore left {left:?}");
}
