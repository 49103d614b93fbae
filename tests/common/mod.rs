//! Test rig for integration tests on real QEMU guests: the test guest (built
//! once, cached by the hash of its recipe), a network namespace per test with
//! the "original's network" (a bridge with an address that the guest pings),
//! original VMs, and helpers to run coldclone and inspect what it left.
#![allow(dead_code)]

use coldclone_backends::qemu::qmp::Qmp;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_coldclone");
static COUNTER: AtomicU32 = AtomicU32::new(0);
/// TCG guests on 2 cores: one VM test at a time keeps timings sane.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Tests named `needs_root_qemu_*` need root, QEMU, iproute2 and tcpdump.
/// Through coldclone-testkit: in CI a missing one fails the test; elsewhere
/// the test is recorded as skipped (scripts/test.sh counts it), never passed.
pub fn rig_available() -> bool {
    coldclone_testkit::require_root_and_tools(
        "network namespaces, bridges, taps",
        &[
            "qemu-system-x86_64",
            "qemu-img",
            "ip",
            "tcpdump",
            "e2fsck",
            "dumpe2fs",
            "debugfs",
        ],
    )
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The test guest, built once per recipe version.
pub fn guest() -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let script = workspace_root().join("tests/guest/build-guest.sh");
    let recipe = std::fs::read(&script).expect("tests/guest/build-guest.sh");
    let hash = recipe_hash(&recipe);
    let dir = workspace_root().join("target/test-guest").join(&hash[..16]);
    if !dir.join("guest.cpio.gz").exists() || !dir.join("guest-qga.cpio.gz").exists() {
        let st = Command::new("bash")
            .arg(&script)
            .arg(&dir)
            .status()
            .expect("run build-guest.sh");
        assert!(st.success(), "building the test guest failed");
    }
    dir
}

fn recipe_hash(data: &[u8]) -> String {
    // A tiny FNV-1a, enough to key a cache by the recipe's content.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}{:016x}", data.len())
}

pub fn sh(cmd: &str) -> Output {
    Command::new("sh").arg("-c").arg(cmd).output().expect("sh")
}

/// A network namespace standing for the host, with the original's network:
/// bridge `obr` carrying 10.77.N.1, the peer the guest pings.
pub struct TestNet {
    pub ns: String,
    pub subnet: u32,
}

impl TestNet {
    pub fn new() -> TestNet {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let subnet = (std::process::id() + n * 7) % 200 + 20;
        let ns = format!("cct{}x{n}", std::process::id());
        let _ = sh(&format!("ip netns del {ns} 2>/dev/null"));
        let out = sh(&format!(
            "set -e; ip netns add {ns}; ip -n {ns} link set lo up; ip -n {ns} link add obr type bridge; \
             ip -n {ns} addr add 10.77.{subnet}.1/24 dev obr; ip -n {ns} link set obr up"
        ));
        assert!(
            out.status.success(),
            "test netns: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TestNet { ns, subnet }
    }

    pub fn links(&self) -> Vec<String> {
        let out = sh(&format!(
            "ip -n {} -o link show | awk -F': ' '{{print $2}}'",
            self.ns
        ));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split('@').next().unwrap_or("").to_string())
            .collect()
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = sh(&format!(
            "ip netns pids {} | xargs -r kill -9; ip netns del {}",
            self.ns, self.ns
        ));
    }
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let p =
            std::env::temp_dir().join(format!("coldclone-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The guest agent of a test VM, on a virtio-serial port `org.qemu.guest_agent.0` whose
/// host end is the socket `qga.sock` in the VM's folder.
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
pub enum GuestAgent {
    #[default]
    None,
    /// The test guest's stand-in (`cc_agent=1`).
    StandIn,
    /// Debian's qemu-ga (`cc_qga=1`, guest-qga.cpio.gz).
    Qga,
}

#[derive(Default, Clone)]
pub struct VmOptions {
    pub agent: GuestAgent,
    /// More kernel command line knobs (`cc_agent_freeze=hang`, ...).
    pub knobs: String,
    pub ignore_power_button: bool,
    pub memory_mib: u32,
    pub with_nic: bool,
    /// MiB of guest RAM to fill with non-zero data before the guest reports up.
    pub fill_mib: u32,
    /// A virtio-balloon device.
    pub balloon: bool,
    /// Data disks beside d0: d1, d2, ... (vm1.qcow2, ...), each a copy of the
    /// 64 MiB disk; the guest writes its counter on every one.
    pub extra_disks: u32,
    /// A disk `s0` (scratch.qcow2) made from this raw image, which the guest leaves
    /// alone: the tests write into it through the original's block layer (HMP qemu-io).
    pub scratch_disk: Option<PathBuf>,
    /// Like `scratch_disk`, but s0 is a qcow2 overlay over this raw image (benchmarks:
    /// a large, allocated disk without copying it per VM).
    pub scratch_overlay_of: Option<PathBuf>,
    /// d0 as a `-blockdev` graph the way libvirt writes it (a qcow2 format node
    /// `libvirt-1-format` over a file node), not as `-drive`.
    pub blockdev: bool,
}

/// An "original" VM: the test guest writing its counter, pinging the peer.
pub struct Vm {
    pub dir: PathBuf,
    pub qmp: PathBuf,
    /// A second QMP socket for the test to watch the VM while coldclone holds the first.
    pub observe_qmp: PathBuf,
    pub image: PathBuf,
    pub log: PathBuf,
    pub guest_ip: String,
    /// The host end of the guest agent's port (when the VM has one).
    pub agent_socket: PathBuf,
    child: Child,
}

impl Vm {
    pub fn start(net: &TestNet, dir: &Path, opts: VmOptions) -> Vm {
        Vm::start_with_disk(net, dir, opts, &guest().join("data.raw"))
    }

    /// Like `start`, with the data disk made from `data` (a raw ext4 image).
    pub fn start_with_disk(net: &TestNet, dir: &Path, opts: VmOptions, data: &Path) -> Vm {
        let g = guest();
        let image = dir.join("vm.qcow2");
        let st = Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(data)
            .arg(&image)
            .status()
            .expect("qemu-img");
        assert!(st.success());
        let qmp = dir.join("vm.qmp");
        let observe_qmp = dir.join("observe.qmp");
        let log = dir.join("vm.log");
        let guest_ip = format!("10.77.{}.2", net.subnet);
        let mut append = "console=ttyS0 quiet panic=-1".to_string();
        if opts.with_nic {
            append.push_str(&format!(
                " cc_ip={guest_ip}/24 cc_peer=10.77.{}.1",
                net.subnet
            ));
        }
        if opts.fill_mib > 0 {
            append.push_str(&format!(" cc_fill_mb={}", opts.fill_mib));
        }
        if opts.ignore_power_button {
            append.push_str(" cc_ignore_powerbutton=1");
        }
        if opts.extra_disks > 0 {
            append.push_str(&format!(" cc_disks={}", opts.extra_disks + 1));
        }
        match opts.agent {
            GuestAgent::None => {}
            GuestAgent::StandIn => append.push_str(" cc_agent=1"),
            GuestAgent::Qga => append.push_str(" cc_qga=1"),
        }
        if !opts.knobs.is_empty() {
            append.push(' ');
            append.push_str(&opts.knobs);
        }
        let agent_socket = dir.join("qga.sock");
        let initrd = if opts.agent == GuestAgent::Qga {
            "guest-qga.cpio.gz"
        } else {
            "guest.cpio.gz"
        };
        let mem = if opts.memory_mib == 0 {
            256
        } else {
            opts.memory_mib
        };
        let tap = format!("otap{}", COUNTER.fetch_add(1, Ordering::SeqCst));
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &net.ns,
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-m",
        ])
        .arg(mem.to_string())
        .args(["-nographic", "-kernel"])
        .arg(g.join("vmlinuz"))
        .arg("-initrd")
        .arg(g.join(initrd))
        .args(["-append", &append])
        .args(if opts.blockdev {
            vec![
                "-blockdev",
                r#"{"driver":"file","filename":"vm.qcow2","node-name":"libvirt-1-storage","auto-read-only":true,"discard":"unmap"}"#,
                "-blockdev",
                r#"{"node-name":"libvirt-1-format","read-only":false,"driver":"qcow2","file":"libvirt-1-storage","backing":null}"#,
                "-device",
                "virtio-blk-pci,drive=libvirt-1-format,id=virtio-disk0",
            ]
        } else {
            // A relative image path, as users often write it.
            vec![
                "-drive",
                "file=vm.qcow2,if=none,id=d0,format=qcow2",
                "-device",
                "virtio-blk-pci,drive=d0",
            ]
        })
        .args([
            "-qmp",
            &format!("unix:{},server=on,wait=off", qmp.display()),
        ])
        .args([
            "-qmp",
            &format!("unix:{},server=on,wait=off", observe_qmp.display()),
        ])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).expect("log"))
        .stderr(Stdio::inherit());
        if opts.with_nic {
            cmd.args([
                "-netdev",
                &format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
                "-device",
                "virtio-net-pci,netdev=n0,mac=52:54:00:77:00:02",
            ]);
        } else {
            cmd.args(["-nic", "none"]);
        }
        if opts.balloon {
            cmd.args(["-device", "virtio-balloon-pci,id=balloon0"]);
        }
        if opts.agent != GuestAgent::None {
            cmd.args([
                "-device",
                "virtio-serial-pci,id=vs0",
                "-chardev",
                &format!(
                    "socket,id=qga0,path={},server=on,wait=off",
                    agent_socket.display()
                ),
                "-device",
                "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            ]);
        }
        for i in 1..=opts.extra_disks {
            let st = Command::new("qemu-img")
                .args(["convert", "-O", "qcow2"])
                .arg(data)
                .arg(dir.join(format!("vm{i}.qcow2")))
                .status()
                .expect("qemu-img");
            assert!(st.success());
            cmd.args([
                "-drive",
                &format!("file=vm{i}.qcow2,if=none,id=d{i},format=qcow2"),
                "-device",
                &format!("virtio-blk-pci,drive=d{i}"),
            ]);
        }
        if let Some(raw) = &opts.scratch_disk {
            let st = Command::new("qemu-img")
                .args(["convert", "-O", "qcow2"])
                .arg(raw)
                .arg(dir.join("scratch.qcow2"))
                .status()
                .expect("qemu-img");
            assert!(st.success());
            cmd.args([
                "-drive",
                "file=scratch.qcow2,if=none,id=s0,format=qcow2",
                "-device",
                "virtio-blk-pci,drive=s0",
            ]);
        }
        if let Some(base) = &opts.scratch_overlay_of {
            let st = Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(base)
                .arg(dir.join("scratch.qcow2"))
                .status()
                .expect("qemu-img");
            assert!(st.success());
            cmd.args([
                "-drive",
                "file=scratch.qcow2,if=none,id=s0,format=qcow2",
                "-device",
                "virtio-blk-pci,drive=s0",
            ]);
        }
        let child = cmd.spawn().expect("start qemu");
        let vm = Vm {
            dir: dir.to_path_buf(),
            qmp,
            observe_qmp,
            image,
            log,
            guest_ip,
            agent_socket,
            child,
        };
        if opts.with_nic {
            wait_until("the tap to appear", Duration::from_secs(20), || {
                sh(&format!("ip -n {} link set {tap} master obr up", net.ns))
                    .status
                    .success()
            });
        }
        wait_until("the guest to boot", Duration::from_secs(120), || {
            vm.console().contains("GUEST UP")
        });
        wait_until("the writer to run", Duration::from_secs(60), || {
            vm.counter() > 100
        });
        vm
    }

    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// The latest counter value the guest printed on its console.
    pub fn counter(&self) -> u64 {
        let c = self.console();
        c.rsplit("HB a=")
            .filter_map(|s| {
                s.split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .next()
            .unwrap_or(0)
    }

    pub fn qmp(&self, cmd: &str, args: Value) -> Value {
        let mut q = Qmp::connect(&self.qmp).expect("connect to the original's QMP");
        q.execute(cmd, args).expect("QMP command")
    }

    /// coldclone's dirty bitmaps on the original, as (node, name, recording).
    pub fn coldclone_bitmaps(&self) -> Vec<(String, String, bool)> {
        let nodes = self
            .observe("query-named-block-nodes", json!({"flat": true}))
            .unwrap_or_default();
        let mut out = Vec::new();
        for n in nodes.as_array().into_iter().flatten() {
            for b in n["dirty-bitmaps"].as_array().into_iter().flatten() {
                let name = b["name"].as_str().unwrap_or("").to_string();
                if name.starts_with("coldclone-") {
                    out.push((
                        n["node-name"].as_str().unwrap_or("").to_string(),
                        name,
                        b["recording"].as_bool().unwrap_or(false),
                    ));
                }
            }
        }
        out
    }

    /// A QMP command on the observer socket (never competes with coldclone).
    pub fn observe(&self, cmd: &str, args: Value) -> Option<Value> {
        let mut q = match Qmp::connect(&self.observe_qmp) {
            Ok(q) => q,
            Err(e) => {
                eprintln!("observer QMP {}: {e}", self.observe_qmp.display());
                return None;
            }
        };
        match q.execute(cmd, args) {
            Ok(v) => Some(v),
            Err(e) => {
                eprintln!("observer QMP {cmd}: {e}");
                None
            }
        }
    }

    pub fn status(&self) -> String {
        self.qmp("query-status", json!({}))["status"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// d0's query-block entry: the first writable disk (a -blockdev disk's
    /// entry comes after QEMU's default drives, which have no medium).
    pub fn d0(&self) -> Value {
        let blocks = self.qmp("query-block", json!({}));
        blocks
            .as_array()
            .into_iter()
            .flatten()
            .find(|b| b["inserted"]["ro"] == false)
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// The file the original's disk writes into now.
    pub fn active_image(&self) -> PathBuf {
        let f = self.d0()["inserted"]["file"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let p = PathBuf::from(&f);
        if p.is_absolute() {
            p
        } else {
            self.dir.join(p)
        }
    }

    /// Running, advancing its counter, on its one image: the original is unharmed.
    pub fn assert_unharmed(&self) {
        assert_eq!(self.status(), "running", "the original is not running");
        // Any advance shows the writer runs; how fast it runs under load is no
        // property (the bound only keeps a stuck guest from hanging the test).
        let before = self.counter();
        wait_until(
            "the original's counter to advance",
            Duration::from_secs(120),
            || self.counter() > before,
        );
        assert_eq!(
            self.active_image(),
            self.image,
            "the original's disk chain is not back to one image"
        );
        let backing = self.d0()["inserted"]["image"]["backing-filename"].clone();
        assert!(
            backing.is_null(),
            "the original's image has a backing file now: {backing}"
        );
        let leftovers: Vec<_> = std::fs::read_dir(&self.dir)
            .expect("vm dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".coldclone-"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "overlays left beside the image: {leftovers:?}"
        );
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A config for one VM, a repository and a state folder under `dir`.
pub struct Setup {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub state: PathBuf,
}

impl Setup {
    /// A config with `body` (sections and [[vm]]s) after the state folder and repository.
    pub fn with_body(dir: &Path, top: &str, body: &str) -> Setup {
        let state = dir.join("state");
        let config = dir.join("coldclone.toml");
        std::fs::write(dir.join("password"), "test password\n").expect("pw");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{}\"\n{top}\n[repository]\npassword_file = \"{}\"\n\n{body}\n",
                state.display(),
                dir.join("password").display()
            ),
        )
        .expect("config");
        let s = Setup {
            dir: dir.to_path_buf(),
            config,
            state,
        };
        let out = s.coldclone(None, &["init"]);
        assert!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        s
    }

    pub fn new(dir: &Path, vm_qmp: &Path, extra_vm: &str, extra_top: &str) -> Setup {
        Setup::with_body(
            dir,
            extra_top,
            &format!(
                "[[vm]]\nname = \"t1\"\nqmp = \"{}\"\nstop_timeout_secs = 60\n{extra_vm}\n",
                vm_qmp.display()
            ),
        )
    }

    pub fn command(&self, ns: Option<&str>, args: &[&str]) -> Command {
        let mut c = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        c.arg("--config").arg(&self.config).args(args);
        c.env_remove("COLDCLONE_PASSWORD");
        c
    }

    pub fn coldclone(&self, ns: Option<&str>, args: &[&str]) -> Output {
        self.command(ns, args).output().expect("run coldclone")
    }

    /// `backup --json`: exit status and the report.
    pub fn backup(&self, ns: &str) -> (i32, Value, String) {
        let out = self.coldclone(Some(ns), &["--json", "backup"]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let report = stdout
            .lines()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
            .unwrap_or(Value::Null);
        (out.status.code().unwrap_or(-1), report, stderr)
    }

    pub fn snapshots(&self) -> Vec<Value> {
        let out = self.coldclone(None, &["--json", "snapshots"]);
        assert!(
            out.status.success(),
            "snapshots: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Vec<Value>>(&out.stdout).expect("snapshots json")
    }

    /// Nothing of any run is left: no journal, no work folder, no clone, no
    /// coldclone interface in the namespace.
    pub fn assert_nothing_left(&self, net: &TestNet) {
        // Every caller ran a backup first, which keeps its journal here: a
        // missing folder means the check looks in the wrong place.
        assert!(
            self.state.join("journal/done").is_dir(),
            "no finished run's journal in {}: nothing to check",
            self.state.display()
        );
        for sub in ["journal", "runs"] {
            let d = self.state.join(sub);
            // Finished runs' journals move to journal/done: a record, not a leftover.
            let left: Vec<_> = std::fs::read_dir(&d)
                .map(|r| {
                    r.flatten()
                        .map(|e| e.path())
                        .filter(|p| !p.ends_with("done"))
                        .collect()
                })
                .unwrap_or_default();
            assert!(left.is_empty(), "{} still holds {left:?}", d.display());
        }
        // This setup's clones only: their command lines name overlays in its
        // state folder. Other tests' and other hosts' clones are not ours to judge.
        let clones = sh("pgrep -af coldclone-clone- || true");
        let state = self.state.display().to_string();
        let ours: Vec<String> = String::from_utf8_lossy(&clones.stdout)
            .lines()
            .filter(|l| l.contains(&state) && !l.contains("pgrep"))
            .map(str::to_string)
            .collect();
        assert!(ours.is_empty(), "clone processes left: {ours:?}");
        // The archive's read-only exports of clone disks: daemons and their mounts.
        let daemons = sh("pgrep -af qemu-storage-daemon || true");
        let ours: Vec<String> = String::from_utf8_lossy(&daemons.stdout)
            .lines()
            .filter(|l| l.contains(&state) && !l.contains("pgrep"))
            .map(str::to_string)
            .collect();
        assert!(ours.is_empty(), "image export daemons left: {ours:?}");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let ours: Vec<&str> = mounts.lines().filter(|l| l.contains(&state)).collect();
        assert!(ours.is_empty(), "mounts left in the state folder: {ours:?}");
        let ours: Vec<String> = net
            .links()
            .into_iter()
            .filter(|l| l.starts_with("cc"))
            .collect();
        assert!(ours.is_empty(), "interfaces left in {}: {ours:?}", net.ns);
    }
}

/// Restores the latest backup's `disk` and checks a file system taken frozen (quiesced):
/// e2fsck clean, state clean, no journal needing recovery (FIFREEZE flushes the journal
/// and clears the flag: the kernel's ext4_freeze). The counters may differ: a freeze keeps
/// the file system consistent, not the application's two writes.
pub fn assert_restored_fs_frozen_clean(setup: &Setup, disk: &str) {
    let img = setup.dir.join("restored-frozen.raw");
    let img_s = img.display().to_string();
    let out = setup.coldclone(None, &["restore", "t1", "--disk", disk, "--to", &img_s]);
    assert!(
        out.status.success(),
        "restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&img)
        .output()
        .expect("e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck found errors: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let dump = Command::new("dumpe2fs")
        .arg("-h")
        .arg(&img)
        .output()
        .expect("dumpe2fs");
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        !dump.contains("needs_recovery"),
        "the journal needs recovery: the image was not taken frozen\n{dump}"
    );
    assert!(
        dump.lines()
            .any(|l| l.starts_with("Filesystem state:") && l.trim_end().ends_with("clean")),
        "the file system state is not clean\n{dump}"
    );
    let _ = std::fs::remove_file(&img);
}

/// Restores the latest backup's disk d0 and checks it: e2fsck clean, state
/// clean (unmounted), both counters equal. Returns the counter.
pub fn assert_restored_disk_is_clean(setup: &Setup, snapshot: Option<&str>) -> u64 {
    let img = setup.dir.join("restored.raw");
    let _ = std::fs::remove_file(&img);
    let mut args = vec!["restore", "t1", "--disk", "d0", "--to"];
    let img_s = img.display().to_string();
    args.push(&img_s);
    if let Some(s) = snapshot {
        args.push("--snapshot");
        args.push(s);
    }
    let out = setup.coldclone(None, &args);
    assert!(
        out.status.success(),
        "restore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&img)
        .output()
        .expect("e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck found errors: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let dump = Command::new("dumpe2fs")
        .arg("-h")
        .arg(&img)
        .output()
        .expect("dumpe2fs");
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.lines()
            .any(|l| l.starts_with("Filesystem state:") && l.trim_end().ends_with("clean")),
        "the file system was not unmounted cleanly"
    );
    // A clean state with the journal's needs_recovery flag still set means the
    // guest powered off without unmounting: not a clean shutdown.
    assert!(
        !dump
            .lines()
            .any(|l| l.starts_with("Filesystem features:") && l.contains("needs_recovery")),
        "the file system's journal needs recovery: it was not unmounted"
    );
    let cat = |f: &str| {
        let o = Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat /{f}"))
            .arg(&img)
            .output()
            .expect("debugfs");
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let (a, b) = (cat("a.txt"), cat("b.txt"));
    assert!(!a.is_empty(), "a.txt is empty in the backup");
    assert_eq!(a, b, "the two counters differ: a torn copy");
    let _ = std::fs::remove_file(&img);
    a.parse()
        .unwrap_or_else(|_| panic!("a.txt in the backup is not a counter: {a:?}"))
}

/// Captures ICMP echo requests from `src` on the original's bridge.
pub struct Capture {
    child: Child,
    file: PathBuf,
    src: String,
}

impl Capture {
    pub fn start(net: &TestNet, dir: &Path, src: &str) -> Capture {
        Capture::start_on(Some(&net.ns), "obr", dir, src)
    }

    /// A capture on `bridge`, in the namespace `netns` or the host's.
    pub fn start_on(netns: Option<&str>, bridge: &str, dir: &Path, src: &str) -> Capture {
        let file = dir.join("capture.pcap");
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "tcpdump"]);
                c
            }
            None => Command::new("tcpdump"),
        };
        let child = command
            .args(["-i", bridge, "-n", "-U", "-w"])
            .arg(&file)
            .arg("icmp")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump");
        std::thread::sleep(Duration::from_millis(1500));
        Capture {
            child,
            file,
            src: src.to_string(),
        }
    }

    /// Stops the capture; returns the ICMP echo sequence numbers seen from `src`.
    pub fn stop(mut self) -> Vec<u64> {
        std::thread::sleep(Duration::from_millis(500));
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        let _ = self.child.wait();
        let out = Command::new("tcpdump")
            .args(["-n", "-r"])
            .arg(&self.file)
            .output()
            .expect("tcpdump -r");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains(&format!("IP {} >", self.src)) && l.contains("echo request"))
            .filter_map(|l| {
                l.split("seq ")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .trim()
                    .parse()
                    .ok()
            })
            .collect()
    }
}

/// Sequence numbers that were sent twice: a second sender with the guest's
/// memory (a clone) on the original's network.
pub fn duplicates(seqs: &[u64]) -> Vec<u64> {
    let mut seen = std::collections::BTreeSet::new();
    seqs.iter().filter(|s| !seen.insert(**s)).copied().collect()
}

// ---- Multi-disk VMs and failure checks (tests/qemu_failures.rs) ----

/// The guest's device letter of data disk `i` (d0 is vda, d1 vdb, ...).
pub fn disk_letter(i: u32) -> char {
    char::from(b'a' + i as u8)
}

impl Vm {
    /// The latest counter the guest printed for its extra disk `i` (>= 1).
    pub fn disk_counter(&self, i: u32) -> u64 {
        let key = format!("vd{}=", disk_letter(i));
        let c = self.console();
        c.rsplit("HB a=")
            .filter_map(|hb| {
                let line = hb.lines().next()?;
                let v = line.split(&key).nth(1)?;
                v.split_whitespace().next()?.parse::<u64>().ok()
            })
            .next()
            .unwrap_or(0)
    }

    /// The original's run state, asked on the observer socket.
    pub fn observed_status(&self) -> String {
        self.observe("query-status", json!({}))
            .and_then(|v| v["status"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// Every disk of a VM with `extra` extra disks: running (seen on the
    /// observer socket: the original is never left paused), each disk on its
    /// own one image without a backing file, and the writer advancing on each.
    pub fn assert_all_disks_unharmed(&self, extra: u32) {
        assert_eq!(
            self.observed_status(),
            "running",
            "the original is not running (observer QMP)"
        );
        self.assert_unharmed();
        let blocks = self.qmp("query-block", json!({}));
        for i in 1..=extra {
            let dev = format!("d{i}");
            let b = blocks
                .as_array()
                .into_iter()
                .flatten()
                .find(|b| b["device"] == dev.as_str())
                .unwrap_or_else(|| panic!("the original has no disk {dev}: {blocks}"));
            let file = b["inserted"]["file"].as_str().unwrap_or("");
            let p = PathBuf::from(file);
            let p = if p.is_absolute() { p } else { self.dir.join(p) };
            assert_eq!(
                p,
                self.dir.join(format!("vm{i}.qcow2")),
                "{dev} is not back on its own image"
            );
            assert!(
                b["inserted"]["image"]["backing-filename"].is_null(),
                "{dev} has a backing file now: {b}"
            );
            let before = self.disk_counter(i);
            wait_until(
                &format!("the original's counter on {dev} to advance"),
                Duration::from_secs(30),
                || self.disk_counter(i) > before + 5,
            );
        }
    }
}

/// What a restored disk holds.
pub struct RestoredDisk {
    pub counter: u64,
    /// The guest's id.txt (its device name), on extra disks.
    pub id: String,
}

/// Restores `disk` of VM t1 (latest, or `snapshot`) and checks it as
/// `assert_restored_disk_is_clean` does: e2fsck clean, unmounted cleanly, the
/// two counters equal.
pub fn restore_disk_checked(setup: &Setup, disk: &str, snapshot: Option<&str>) -> RestoredDisk {
    let img = setup.dir.join(format!("restored-{disk}.raw"));
    let _ = std::fs::remove_file(&img);
    let img_s = img.display().to_string();
    let mut args = vec!["restore", "t1", "--disk", disk, "--to", &img_s];
    if let Some(s) = snapshot {
        args.push("--snapshot");
        args.push(s);
    }
    let out = setup.coldclone(None, &args);
    assert!(
        out.status.success(),
        "restore {disk}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&img)
        .output()
        .expect("e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck found errors on {disk}: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let dump = Command::new("dumpe2fs")
        .arg("-h")
        .arg(&img)
        .output()
        .expect("dumpe2fs");
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(
        dump.lines()
            .any(|l| l.starts_with("Filesystem state:") && l.trim_end().ends_with("clean")),
        "{disk}: the file system was not unmounted cleanly"
    );
    assert!(
        !dump
            .lines()
            .any(|l| l.starts_with("Filesystem features:") && l.contains("needs_recovery")),
        "{disk}: the journal needs recovery: it was not unmounted"
    );
    let cat = |f: &str| {
        let o = Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat /{f}"))
            .arg(&img)
            .output()
            .expect("debugfs");
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let (a, b, id) = (cat("a.txt"), cat("b.txt"), cat("id.txt"));
    assert!(!a.is_empty(), "{disk}: a.txt is empty in the backup");
    assert_eq!(a, b, "{disk}: the two counters differ: a torn copy");
    let _ = std::fs::remove_file(&img);
    RestoredDisk {
        counter: a.parse().unwrap_or(0),
        id,
    }
}

/// `coldclone check`: the repository is sound (exit 0 and `ok` in its report).
pub fn assert_repository_clean(setup: &Setup, after: &str) {
    let out = setup.coldclone(None, &["--json", "check"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(
        out.status.success() && report["ok"] == true,
        "check after {after}: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `recover --json` succeeds with nothing it could not undo; returns its report.
pub fn recover_ok(setup: &Setup, net: &TestNet, after: &str) -> Value {
    let out = setup.coldclone(Some(&net.ns), &["--json", "recover"]);
    assert!(
        out.status.success(),
        "recover after {after} failed: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rec: Value = serde_json::from_slice(&out.stdout).expect("recover json");
    for r in rec.as_array().into_iter().flatten() {
        assert!(
            r["failed"].as_array().is_none_or(Vec::is_empty),
            "recover after {after} could not undo: {r}"
        );
    }
    rec
}

/// No memory image of any run under the state folder.
pub fn assert_no_memory_image(setup: &Setup) {
    let out = sh(&format!("find {} -name 'memory*'", setup.state.display()));
    let left = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(left.is_empty(), "memory images left: {left}");
}

/// Waits for the live journal of the run to record the milestone `name`.
pub fn wait_for_milestone(setup: &Setup, name: &str, timeout: Duration) {
    let journal_dir = setup.state.join("journal");
    wait_until(&format!("coldclone to reach {name}"), timeout, || {
        std::fs::read_dir(&journal_dir)
            .map(|d| {
                d.flatten().any(|e| {
                    std::fs::read_to_string(e.path())
                        .unwrap_or_default()
                        .contains(&format!("\"name\":\"{name}\""))
                })
            })
            .unwrap_or(false)
    });
}
