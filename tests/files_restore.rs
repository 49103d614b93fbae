//! `coldclone files`: single files out of a backup, read by libguestfs's appliance over a
//! private NBD export of the repository. Real disk images made with sfdisk, mkfs.ext4,
//! mkfs.xfs and LVM on loop devices, backed up into a real repository; the binary lists
//! and extracts from an ext4 partition, an xfs partition and an LVM LV (two guests whose
//! VGs have one name), keeps owners, modes,
//! times and symlinks (never followed, nothing outside --to), refuses to overwrite, and
//! fails cleanly on fuzzed ext4 and xfs superblocks: non-zero exit, a clear message, no
//! socket, temporary file or appliance process left. Needs root (loop devices, mounts,
//! LVM) and libguestfs-tools; each command boots the appliance (tens of seconds under TCG).

use coldclone_repository::{
    BackupOptions, FileSource, Location, NoProgress, Repository, SnapshotMeta,
};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_coldclone");
/// One appliance at a time: they are QEMU guests under TCG on a shared machine.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// One name for both guests' volume groups (and the host's copy of one of them).
const VG: &str = "ccfilesdupvg";

struct Lab {
    dir: PathBuf,
    /// Loop devices still attached (detached on drop).
    loops: Vec<String>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for l in self.loops.drain(..) {
            let _ = sh(&format!(
                "vgchange --devices {l} -an {VG} >/dev/null 2>&1; losetup -d {l}"
            ));
        }
        let _ = sh(&format!(
            "for m in $(awk '$2 ~ \"^{}\" {{print $2}}' /proc/mounts); do umount -l $m; done",
            self.dir.display()
        ));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sh(script: &str) -> Output {
    Command::new("sh")
        .args(["-ec", script])
        .output()
        .expect("run sh")
}

fn ok(script: &str) -> String {
    let out = sh(script);
    assert!(
        out.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Lab {
    fn new() -> Lab {
        let dir = std::env::temp_dir().join(format!("ccfiles-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        std::fs::write(dir.join("pw"), "pw\n").unwrap();
        std::fs::write(
            dir.join("c.toml"),
            format!(
                "state_dir = \"{0}/state\"\n[repository]\npath = \"{0}/repo\"\npassword_file = \"{0}/pw\"\n",
                dir.display()
            ),
        )
        .unwrap();
        Lab { dir, loops: vec![] }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A loop device over `img`, or over `len` bytes of it from `at` (a partition: no
    /// partition nodes appear without udev).
    fn attach_at(&mut self, img: &Path, at: u64, len: u64) -> String {
        let l = ok(&format!(
            "losetup -f --show -o {at} --sizelimit {len} {}",
            img.display()
        ));
        self.loops.push(l.clone());
        l
    }

    fn attach(&mut self, img: &Path) -> String {
        let l = ok(&format!("losetup -f --show {}", img.display()));
        self.loops.push(l.clone());
        l
    }

    fn detach(&mut self, l: &str) {
        ok(&format!(
            "vgchange --devices {l} -an {VG} >/dev/null 2>&1 || true; losetup -d {l}"
        ));
        self.loops.retain(|x| x != l);
    }

    /// Runs `fill` (shell, with $M the mount point) on `dev` mounted.
    fn fill(&self, dev: &str, fill: &str) {
        let m = self.p("mnt");
        std::fs::create_dir_all(&m).unwrap();
        ok(&format!(
            "mount {dev} {m}; M={m}; cd $M; {fill}; cd /; umount {m}",
            m = m.display()
        ));
    }

    /// An LVM guest disk: one PV, VG `VG`, LV `root` with ext4 holding `lvm.txt` = `text`,
    /// and a clone of it (same VG name and UUID: two guests made from one template) with
    /// `clone_text`. This host's kernel has no device-mapper, so the LV is made by LVM in
    /// the libguestfs appliance; the files are written on the host through a loop device
    /// at the LV's first extent (pe_start, read back with pvs).
    fn lvm_disks(
        &mut self,
        name: &str,
        text: &str,
        clone: &str,
        clone_text: &str,
    ) -> (PathBuf, PathBuf) {
        let img = self.p(name);
        ok(&format!("truncate -s 64M {}", img.display()));
        let script = format!(
            "run\npvcreate /dev/sda\nvgcreate {VG} /dev/sda\nlvcreate-free root {VG} 100\n\
             mkfs ext4 /dev/{VG}/root\n"
        );
        ok(&format!(
            "printf '{script}' | LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg \
             LIBGUESTFS_CACHEDIR=/var/tmp guestfish --format=raw -a {}",
            img.display()
        ));
        let l = self.attach(&img);
        let pe_start = ok(&format!(
            "pvs --devices {l} --noheadings --units b --nosuffix -o pe_start {l} 2>/dev/null"
        ));
        let pe_start: u64 = pe_start.trim().parse().expect("pe_start");
        self.detach(&l);
        let copy = self.p(clone);
        ok(&format!(
            "cp --sparse=always {} {}",
            img.display(),
            copy.display()
        ));
        for (i, t) in [(&img, text), (&copy, clone_text)] {
            let lv = self.attach_at(i, pe_start, 60 << 20);
            self.fill(&lv, &format!("echo {t} > lvm.txt"));
            self.detach(&lv);
        }
        (img, copy)
    }
}

fn backup(repo: &Repository, vm: &str, run: &str, disks: &[(&str, &Path)]) {
    for (disk, img) in disks {
        let src = FileSource::open(img).unwrap();
        repo.backup_disk(
            &src,
            SnapshotMeta {
                vm: vm.into(),
                disk: (*disk).into(),
                backend: "qemu".into(),
                host: "h".into(),
                host_uuid: "00000000-0000-4000-8000-000000000001".into(),
                consistency: "clean-shutdown".into(),
                tags: [("run".to_string(), run.to_string())].into(),
                vm_config: None,
            },
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap();
    }
}

/// `coldclone files ARGS`, with the lab's TMPDIR so that what it leaves is seen.
fn files(lab: &Lab, args: &[&str]) -> Output {
    let t = std::time::Instant::now();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(lab.p("c.toml"))
        .arg("files")
        .args(args)
        .env("TMPDIR", lab.p("tmp"))
        // The appliance is cached where libguestfs keeps it, not in our TMPDIR.
        .env("LIBGUESTFS_CACHEDIR", "/var/tmp")
        // This host's /dev/kvm cannot run guests (QEMU aborts on an MSR): TCG, as for
        // every other QEMU test here.
        .env("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
        .env_remove("COLDCLONE_PASSWORD")
        .output()
        .expect("run coldclone");
    eprintln!(
        "files {args:?}: {:?} in {:.0} s",
        out.status.code(),
        t.elapsed().as_secs_f64()
    );
    assert_nothing_left(lab);
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// No temporary file (our export sockets, libguestfs's own) and no process (guestfish,
/// the appliance's QEMU) that names the lab.
fn assert_nothing_left(lab: &Lab) {
    let left: Vec<_> = std::fs::read_dir(lab.p("tmp")).unwrap().flatten().collect();
    assert!(left.is_empty(), "left in TMPDIR: {left:?}");
    let needle = lab.dir.display().to_string();
    // libguestfs's recovery process ends QEMU within a moment of guestfish.
    for _ in 0..50 {
        let mut found = Vec::new();
        for p in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(c) = std::fs::read(p.path().join("cmdline")) {
                let c = String::from_utf8_lossy(&c).replace('\0', " ");
                if c.contains(&needle) && !c.contains("cargo") {
                    found.push(c);
                }
            }
        }
        if found.is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    panic!("processes left naming {needle}");
}

#[test]
fn needs_root_libguestfs_files_ls_and_get_from_ext4_xfs_and_lvm() {
    if !coldclone_testkit::require_root_and_tools(
        "loop devices, mounts and LVM to build the guest disks",
        &[
            "guestfish",
            "sfdisk",
            "mkfs.xfs",
            "mkfs.ext4",
            "pvcreate",
            "losetup",
            "stdbuf",
        ],
    ) {
        return;
    }
    let _serial = serial();
    let mut lab = Lab::new();
    let init = Command::new(BIN)
        .arg("--config")
        .arg(lab.p("c.toml"))
        .arg("init")
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", stderr(&init));

    // VM "multi": disk0 with an ext4 and an xfs partition (xfs needs 300 MB), disk1 LVM.
    let d0 = lab.p("multi0.img");
    ok(&format!(
        "truncate -s 400M {0}; \
         printf 'label: dos\\nstart=2048,size=131072,type=83\\nstart=133120,type=83\\n' \
         | sfdisk -q {0}",
        d0.display()
    ));
    let p1 = lab.attach_at(&d0, 2048 * 512, 131072 * 512);
    let p2 = lab.attach_at(&d0, 133120 * 512, (819200 - 133120) * 512);
    ok(&format!("mkfs.ext4 -q {p1}; mkfs.xfs -q {p2}"));
    lab.fill(
        &p1,
        "mkdir -p etc tree/sub tree/ro; echo multi-ext4 > etc/hostname; \
         printf 'secret' > tree/a.txt; chown 1234:2345 tree/a.txt; chmod 0640 tree/a.txt; \
         touch -h -d '2001-02-03 04:05:06 UTC' tree/a.txt; \
         ln -s ../../../../../../../../tmp/ccfiles-escaped tree/escape; \
         ln -s /etc/passwd tree/abs; chown -h 77:88 tree/abs; \
         ln tree/a.txt tree/sub/hard; printf x > tree/suid; chmod 4755 tree/suid; \
         echo deep > tree/ro/f; chmod 0555 tree/ro; mkfifo tree/fifo; \
         touch -d '2002-03-04 05:06:07 UTC' tree/sub; ln -s /tree etc/link-to-tree",
    );
    lab.fill(
        &p2,
        "mkdir data; echo multi-xfs > data/xfs.txt; chmod 0600 data/xfs.txt",
    );
    lab.detach(&p1);
    lab.detach(&p2);
    // disk1: LVM; VM "other": a clone of that disk (same VG name) with its own file.
    let (d1, o0) = lab.lvm_disks("multi1.img", "multi-lvm", "other0.img", "other-lvm");
    let repo = Repository::open(&Location::Local(lab.p("repo")), "pw").unwrap();
    backup(
        &repo,
        "multi",
        "run-multi",
        &[("disk0", &d0), ("disk1", &d1)],
    );
    backup(&repo, "other", "run-other", &[("disk0", &o0)]);

    // The file systems of a VM with two disks.
    let out = files(&lab, &["multi", "ls"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for (name, fstype) in [
        ("disk0:1", "ext4"),
        ("disk0:2", "xfs"),
        (&format!("{VG}/root") as &str, "ext4"),
    ] {
        assert!(
            text.lines().any(|l| l.contains(name) && l.contains(fstype)),
            "{name} {fstype} not listed:\n{text}"
        );
    }

    // A folder listing as JSON: owners, modes, links shown, not followed.
    let out = files(&lab, &["multi", "--json", "ls", "disk0:1:/tree"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entries = v["entries"].as_array().unwrap();
    let e = |n: &str| {
        entries
            .iter()
            .find(|e| e["name"] == n)
            .unwrap_or_else(|| panic!("{n} not in {v}"))
            .clone()
    };
    assert_eq!(e("a.txt")["uid"], 1234);
    assert_eq!(e("a.txt")["mode"], "0640");
    assert_eq!(e("a.txt")["size"], 6);
    assert_eq!(e("escape")["kind"], "symlink");
    assert_eq!(
        e("escape")["target"],
        "../../../../../../../../tmp/ccfiles-escaped"
    );
    assert_eq!(e("fifo")["kind"], "fifo");

    // Files from the three file systems and a folder, in one appliance run.
    let to = lab.p("out");
    let to_s = to.display().to_string();
    let vg_file = format!("{VG}/root:/lvm.txt");
    let out = files(
        &lab,
        &[
            "multi",
            "--json",
            "get",
            "disk0:1:/etc/hostname",
            "disk0:2:/data/xfs.txt",
            &vg_file,
            // A link, and a path through it: an absolute link means the guest's root.
            "disk0:1:/etc/link-to-tree",
            "disk0:1:/etc/link-to-tree/sub",
            "disk0:1:/tree",
            "--to",
            &to_s,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(to.join("hostname")).unwrap(),
        "multi-ext4\n"
    );
    assert_eq!(
        std::fs::read_to_string(to.join("xfs.txt")).unwrap(),
        "multi-xfs\n"
    );
    let m = std::fs::metadata(to.join("xfs.txt")).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o600);
    assert_eq!(
        std::fs::read_to_string(to.join("lvm.txt")).unwrap(),
        "multi-lvm\n"
    );
    // The last component is not followed: a symlink comes out as one.
    assert_eq!(
        std::fs::read_link(to.join("link-to-tree")).unwrap(),
        Path::new("/tree")
    );
    assert!(to.join("sub").join("hard").is_file());
    let t = to.join("tree");
    let a = std::fs::metadata(t.join("a.txt")).unwrap();
    assert_eq!((a.uid(), a.gid(), a.mode() & 0o7777), (1234, 2345, 0o640));
    assert_eq!(a.mtime(), 981_173_106, "2001-02-03 04:05:06 UTC");
    assert_eq!(std::fs::read(t.join("a.txt")).unwrap(), b"secret");
    // A hard link stays one.
    assert_eq!(
        std::fs::metadata(t.join("sub/hard")).unwrap().ino(),
        a.ino()
    );
    assert_eq!(
        std::fs::metadata(t.join("sub")).unwrap().mtime(),
        1_015_218_367
    );
    // Symlinks are links, pointing where they pointed, never followed.
    assert_eq!(
        std::fs::read_link(t.join("escape")).unwrap(),
        Path::new("../../../../../../../../tmp/ccfiles-escaped")
    );
    assert!(!Path::new("/tmp/ccfiles-escaped").exists());
    let abs = std::fs::symlink_metadata(t.join("abs")).unwrap();
    assert!(abs.file_type().is_symlink());
    assert_eq!((abs.uid(), abs.gid()), (77, 88));
    assert_eq!(
        std::fs::read_link(t.join("abs")).unwrap(),
        Path::new("/etc/passwd")
    );
    // setuid dropped, a read-only folder written into and then made read-only, no FIFO.
    assert_eq!(
        std::fs::metadata(t.join("suid")).unwrap().mode() & 0o7777,
        0o755
    );
    assert_eq!(std::fs::read_to_string(t.join("ro/f")).unwrap(), "deep\n");
    assert_eq!(
        std::fs::metadata(t.join("ro")).unwrap().mode() & 0o7777,
        0o555
    );
    assert!(std::fs::symlink_metadata(t.join("fifo")).is_err());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tree = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["source"] == "disk0:1:/tree")
        .unwrap();
    assert_eq!(tree["setid_dropped"], 1, "{tree}");
    assert_eq!(tree["skipped"].as_array().unwrap().len(), 1, "{tree}");
    // Only what was asked for is in --to: no staging folder left.
    let mut names: Vec<String> = std::fs::read_dir(&to)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "hostname",
            "link-to-tree",
            "lvm.txt",
            "sub",
            "tree",
            "xfs.txt"
        ]
    );

    // An existing target is refused before anything runs, kept as it was.
    std::fs::write(to.join("hostname"), "mine\n").unwrap();
    let again = files(
        &lab,
        &["multi", "get", "disk0:1:/etc/hostname", "--to", &to_s],
    );
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
    assert!(stderr(&again).contains("exists"), "{}", stderr(&again));
    assert_eq!(
        std::fs::read_to_string(to.join("hostname")).unwrap(),
        "mine\n"
    );
    // The other guest's VG has the same name (and UUID): its own file, not multi's.
    let out = files(
        &lab,
        &[
            "other",
            "get",
            &vg_file,
            "--to",
            &lab.p("other").display().to_string(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(lab.p("other/lvm.txt")).unwrap(),
        "other-lvm\n"
    );
    // Bad names fail before the appliance starts, with the way to name a file.
    let bad = files(&lab, &["multi", "get", "/etc/hostname", "--to", &to_s]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("FS:/PATH"), "{}", stderr(&bad));
}

#[test]
fn needs_root_libguestfs_files_fuzzed_superblocks_fail_cleanly() {
    if !coldclone_testkit::require_root_and_tools(
        "the appliance (QEMU) and mkfs of the test images",
        &["guestfish", "mkfs.xfs", "mkfs.ext4", "stdbuf"],
    ) {
        return;
    }
    let _serial = serial();
    let lab = Lab::new();
    let init = Command::new(BIN)
        .arg("--config")
        .arg(lab.p("c.toml"))
        .arg("init")
        .output()
        .unwrap();
    assert!(init.status.success(), "{}", stderr(&init));
    let e = lab.p("ext4.img");
    let x = lab.p("xfs.img");
    ok(&format!(
        "truncate -s 32M {e}; mkfs.ext4 -q -F {e}; truncate -s 320M {x}; mkfs.xfs -q {x}",
        e = e.display(),
        x = x.display()
    ));
    // Overwrite the superblocks with pseudo-random bytes, keeping the magic numbers so
    // that both are still taken for ext4/xfs and handed to the appliance's kernel: ext4's
    // at 1024 (magic at +0x38), xfs's at 0 (magic "XFSB" at 0).
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut fuzz = |path: &Path, at: u64, len: usize, keep: std::ops::Range<usize>| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = vec![0u8; len];
        f.read_at(&mut b, at).unwrap();
        for (i, byte) in b.iter_mut().enumerate() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            if !keep.contains(&i) {
                *byte = seed as u8;
            }
        }
        f.write_at(&b, at).unwrap();
    };
    fuzz(&e, 1024, 1024, 0x38..0x3a);
    fuzz(&x, 0, 512, 0..4);
    let repo = Repository::open(&Location::Local(lab.p("repo")), "pw").unwrap();
    backup(&repo, "bad", "run-bad", &[("disk0", &e), ("disk1", &x)]);
    for (fs, what) in [("disk0", "ext4"), ("disk1", "xfs")] {
        let to = lab.p(&format!("out-{what}"));
        let out = files(
            &lab,
            &[
                "bad",
                "get",
                &format!("{fs}:/lost+found"),
                "--to",
                &to.display().to_string(),
            ],
        );
        let err = stderr(&out);
        eprintln!("fuzzed {what}: {}", err.trim());
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert!(
            err.contains(fs) && (err.contains("cannot mount") || err.contains("no file system")),
            "{what}: not a clear error: {err}"
        );
        // Nothing half-written presented as good: --to holds nothing.
        let left: Vec<_> = std::fs::read_dir(&to).unwrap().flatten().collect();
        assert!(left.is_empty(), "{what}: left in --to: {left:?}");
    }
}
