//! The whole pipeline on a real libvirtd: the busybox test guest as a
//! transient libvirt domain of type `qemu` (TCG), backed up through the
//! binary. Every test needs root, QEMU and libvirt (`needs_root_libvirt_`);
//! they start `virtlogd -d` and `libvirtd -d` themselves when no service
//! manager did.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const URI: &str = "qemu:///system";
static N: AtomicU32 = AtomicU32::new(0);
/// The test domain's VNC password: libvirt holds it; no backup may.
const VNC_SECRET: &str = "cc7f3a9q";

fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh")
        .args(["-q", "-c", URI])
        .args(args)
        .output()
        .expect("virsh")
}

fn virsh_ok(args: &[&str]) -> String {
    let out = virsh(args);
    assert!(
        out.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Root, QEMU, libvirt's daemons and tools, and a libvirtd that answers
/// (started here when it is not running).
fn libvirt_available() -> bool {
    if !rig_available()
        || !coldclone_testkit::require_tools(&["virsh", "libvirtd", "virtlogd", "qemu-img"])
    {
        return false;
    }
    if virsh(&["version"]).status.success() {
        return true;
    }
    if sh("pgrep -x virtlogd").stdout.is_empty() {
        let _ = sh("virtlogd -d");
    }
    if sh("pgrep -x libvirtd").stdout.is_empty() {
        let _ = sh("libvirtd -d");
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if virsh(&["version"]).status.success() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    coldclone_testkit::require(false, "a libvirtd that answers on qemu:///system")
}

/// The original's network on the host (libvirtd starts its QEMU in the host's
/// namespace): a bridge with an address, the peer the guest pings; no uplink.
struct HostNet {
    bridge: String,
    subnet: u32,
}

impl HostNet {
    fn new() -> HostNet {
        let n = N.fetch_add(1, Ordering::SeqCst);
        let subnet = (std::process::id() + n * 7) % 200 + 20;
        // Not `cc...`: assert_nothing_left looks for coldclone's own links by that prefix.
        let bridge = format!("lvo{}x{n}", std::process::id() % 100_000);
        let _ = sh(&format!("ip link del {bridge} 2>/dev/null"));
        let out = sh(&format!(
            "set -e; ip link add {bridge} type bridge; ip addr add 10.79.{subnet}.1/24 dev {bridge}; ip link set {bridge} up"
        ));
        assert!(
            out.status.success(),
            "the original's bridge: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        HostNet { bridge, subnet }
    }

    fn guest_ip(&self) -> String {
        format!("10.79.{}.2", self.subnet)
    }
}

impl Drop for HostNet {
    fn drop(&mut self) {
        let _ = sh(&format!("ip link del {}", self.bridge));
    }
}

/// The test guest as a transient libvirt domain; destroyed on drop.
struct LvVm {
    name: String,
    image: PathBuf,
    log: PathBuf,
}

#[derive(Default)]
struct LvOptions {
    ignore_power_button: bool,
    /// A virtio NIC on this bridge, the guest pinging the peer there.
    nic_on: Option<(String, String, u32)>,
    /// A guest agent channel, the guest running the stand-in agent.
    agent: bool,
    /// More kernel command line knobs (`cc_agent_freeze=hang`, ...).
    knobs: String,
}

impl LvVm {
    fn start(dir: &Path, opts: LvOptions) -> LvVm {
        let g = guest();
        let name = format!(
            "cctest{}x{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let image = dir.join("vm.qcow2");
        let st = Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(g.join("data.raw"))
            .arg(&image)
            .status()
            .expect("qemu-img");
        assert!(st.success());
        let log = dir.join("console.log");
        let mut cmdline = "console=ttyS0 quiet panic=-1".to_string();
        if opts.ignore_power_button {
            cmdline.push_str(" cc_ignore_powerbutton=1");
        }
        if !opts.knobs.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&opts.knobs);
        }
        let mut nic = String::new();
        if opts.agent {
            cmdline.push_str(" cc_agent=1");
            nic.push_str("<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>");
        }
        if let Some((bridge, ip, subnet)) = &opts.nic_on {
            cmdline.push_str(&format!(" cc_ip={ip}/24 cc_peer=10.79.{subnet}.1"));
            nic += &format!(
                "<interface type='bridge'><mac address='52:54:00:79:00:02'/><source bridge='{bridge}'/><model type='virtio'/></interface>"
            );
        }
        let xml = format!(
            "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{k}</kernel><initrd>{i}</initrd><cmdline>{cmdline}</cmdline></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{img}'/><target dev='vda' bus='virtio'/></disk>
    {nic}
    <serial type='file'><source path='{log}'/><target port='0'/></serial>
    <console type='file'><source path='{log}'/><target type='serial' port='0'/></console>
    <graphics type='vnc' port='-1' listen='127.0.0.1' passwd='{VNC_SECRET}'/>
    <memballoon model='virtio'/>
  </devices>
</domain>",
            k = g.join("vmlinuz").display(),
            i = g.join("guest.cpio.gz").display(),
            img = image.display(),
            log = log.display(),
        );
        let xml_path = dir.join("domain.xml");
        std::fs::write(&xml_path, xml).expect("domain xml");
        virsh_ok(&["create", &xml_path.display().to_string()]);
        let vm = LvVm { name, image, log };
        wait_until("the guest to boot", Duration::from_secs(180), || {
            vm.console().contains("GUEST UP")
        });
        if opts.nic_on.is_some() {
            assert!(
                vm.console().contains("NET UP"),
                "the guest's NIC: {}",
                vm.console()
            );
        }
        if opts.agent {
            wait_until("the stand-in agent", Duration::from_secs(60), || {
                let c = vm.console();
                assert!(!c.contains("AGENT NO PORT"), "no agent port: {c}");
                c.contains("AGENT UP")
            });
        }
        wait_until("the writer to run", Duration::from_secs(60), || {
            vm.counter() > 100
        });
        vm
    }

    fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    fn counter(&self) -> u64 {
        self.console()
            .rsplit("HB a=")
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .next()
            .unwrap_or(0)
    }

    fn blklist(&self) -> Vec<(String, String)> {
        virsh_ok(&["domblklist", &self.name])
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 2).then(|| (f[0].to_string(), f[1].to_string()))
            })
            .collect()
    }

    /// Running (not paused), writing, on its one image again, no overlay left
    /// beside it, and the image without a backing file.
    fn assert_unharmed(&self) {
        let state = virsh_ok(&["domstate", &self.name]);
        assert_eq!(state.trim(), "running", "the original is not running");
        let before = self.counter();
        wait_until(
            "the original's counter to advance",
            Duration::from_secs(120),
            || self.counter() > before,
        );
        assert_eq!(
            self.blklist(),
            vec![("vda".to_string(), self.image.display().to_string())],
            "virsh domblklist: the original's disk is not back on its one image"
        );
        let dir = self.image.parent().expect("image dir");
        let left: Vec<String> = std::fs::read_dir(dir)
            .expect("vm dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".coldclone-"))
            .collect();
        assert!(left.is_empty(), "overlays left beside the image: {left:?}");
        let info = Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(&self.image)
            .output()
            .expect("qemu-img info");
        let info: Value = serde_json::from_slice(&info.stdout).expect("qemu-img json");
        assert!(
            info["backing-filename"].is_null(),
            "the original's image has a backing file now: {info}"
        );
    }
}

impl Drop for LvVm {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
    }
}

/// A config naming the domain, with the embedded driver's capability cache
/// shared between the tests' state folders (probing QEMU costs a minute).
fn setup(dir: &Path, vm: &LvVm, extra_vm: &str, top: &str) -> Setup {
    let s = Setup::with_body(
        dir,
        top,
        &format!(
            "[[vm]]\nname = \"t1\"\nlibvirt_domain = \"{}\"\n{extra_vm}\n",
            vm.name
        ),
    );
    copy_xml(&caps_cache(), &s.state.join("libvirt-embed-cache"));
    s
}

fn caps_cache() -> PathBuf {
    workspace_root().join("target/libvirt-embed-cache")
}

fn copy_xml(from: &Path, to: &Path) {
    let _ = std::fs::create_dir_all(to);
    for e in std::fs::read_dir(from).into_iter().flatten().flatten() {
        if e.path().extension().is_some_and(|x| x == "xml") {
            let _ = std::fs::copy(e.path(), to.join(e.file_name()));
        }
    }
}

fn keep_caps(s: &Setup) {
    copy_xml(&s.state.join("libvirt-embed-cache"), &caps_cache());
}

/// Nothing of any run is left: no journal, run folder, embedded root, clone
/// QEMU, coldclone link on the host, memory image.
fn assert_nothing_left(s: &Setup) {
    assert!(
        s.state.join("journal/done").is_dir(),
        "no finished run's journal: nothing to check"
    );
    for sub in ["journal", "runs"] {
        let d = s.state.join(sub);
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
    let roots: Vec<_> = std::fs::read_dir("/run/coldclone")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("/embed-"))
        .collect();
    assert!(roots.is_empty(), "embedded driver roots left: {roots:?}");
    let procs = sh("pgrep -af /run/coldclone/embed- || true");
    let ours: Vec<String> = String::from_utf8_lossy(&procs.stdout)
        .lines()
        .filter(|l| !l.contains("pgrep"))
        .map(str::to_string)
        .collect();
    assert!(ours.is_empty(), "embedded clones left running: {ours:?}");
    let links = sh("ip -o link show | awk -F': ' '{print $2}'");
    let cc: Vec<String> = String::from_utf8_lossy(&links.stdout)
        .lines()
        .map(|l| l.split('@').next().unwrap_or("").to_string())
        .filter(|l| l.starts_with("ccbr") || (l.starts_with("cc") && l.contains('t')))
        .filter(|l| !l.starts_with("cct"))
        .collect();
    assert!(cc.is_empty(), "coldclone links left on the host: {cc:?}");
    let nets = virsh_ok(&["net-list", "--all", "--name"]);
    assert!(
        !nets.contains("coldclone"),
        "libvirt networks of coldclone left: {nets}"
    );
    assert_no_memory_image(s);
}

fn start(tag: &str, opts: LvOptions) -> Option<(TempDir, LvVm)> {
    if !libvirt_available() {
        return None;
    }
    let dir = TempDir::new(tag);
    let vm = LvVm::start(dir.path(), opts);
    Some((dir, vm))
}

/// A guest with a NIC on the original's network (a host bridge), pinging the peer there.
fn start_networked(tag: &str, mut opts: LvOptions) -> Option<(TempDir, HostNet, LvVm)> {
    if !libvirt_available() || !coldclone_testkit::require_tools(&["tcpdump", "ip"]) {
        return None;
    }
    let dir = TempDir::new(tag);
    let net = HostNet::new();
    opts.nic_on = Some((net.bridge.clone(), net.guest_ip(), net.subnet));
    let vm = LvVm::start(dir.path(), opts);
    Some((dir, net, vm))
}

/// The guest pings 5 times a second; a capture over a whole backup holds many
/// more probes than this. Fewer means the capture did not watch the network.
const MIN_PROBES: usize = 10;

#[test]
fn needs_root_libvirt_backup_of_a_writing_guest_is_clean_and_the_original_unharmed() {
    let _s = serial();
    let Some((dir, vm)) = start("lvbackup", LvOptions::default()) else {
        return;
    };
    let setup = setup(dir.path(), &vm, "stop_timeout_secs = 60", "");
    let before = vm.counter();
    let t = Instant::now();
    let out = setup.coldclone(None, &["--json", "backup"]);
    let observed = t.elapsed();
    keep_caps(&setup);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let report = stdout
        .lines()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or(Value::Null);
    assert!(
        out.status.success(),
        "backup failed: {report} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report["status"], "ok");
    assert_eq!(report["backend"], "libvirt");
    assert_eq!(report["consistency"], "clean-shutdown");
    assert_eq!(report["clone_stop"], "acpi");
    assert_eq!(report["checkpoint_method"], "libvirt-external-snapshot");
    assert_eq!(report["disks"][0]["name"], "vda");
    assert_eq!(report["disks"][0]["bytes"], 64 << 20);
    assert_eq!(report["disks"][0]["read_in_place"], true, "{report}");
    // The pause as QEMU saw it (STOP → RESUME), inside the checkpoint step, in its parts.
    let pause = report["original_pause_ms"].as_f64().expect("pause");
    let ckpt = report["durations_ms"]["checkpoint"]
        .as_f64()
        .expect("checkpoint");
    assert!(
        pause > 0.0 && pause <= ckpt + 1.0,
        "pause {pause} ms, checkpoint {ckpt} ms"
    );
    let disk = report["original_pause"]["disk_snapshot_ms"]
        .as_f64()
        .expect("disk");
    let mem = report["original_pause"]["memory_ms"].as_f64().expect("mem");
    assert!(disk > 0.0 && disk <= pause, "{report}");
    assert!((disk + mem - pause).abs() < 0.01, "{report}");
    assert!(
        report["warnings"].as_array().is_some_and(Vec::is_empty),
        "{report}"
    );
    assert!(
        report["durations_ms"]["total"].as_u64().unwrap_or(u64::MAX) as u128
            <= observed.as_millis()
    );
    eprintln!(
        "libvirt backup: pause {pause:.1} ms (disk {disk:.1} ms), total {} ms",
        report["durations_ms"]["total"]
    );
    let restored = restore_disk_checked(&setup, "vda", None);
    assert!(
        restored.counter >= before,
        "the backup's counter {} is older than before the backup {before}",
        restored.counter
    );
    vm.assert_unharmed();
    assert_nothing_left(&setup);
    let snaps = setup.snapshots();
    assert_eq!(snaps.len(), 1);
    // The domain's definition is kept with the backup, its VNC password not.
    let def = &snaps[0]["vm_config"];
    assert_eq!(def["kind"], "libvirt-xml", "{def}");
    let text = def["text"].as_str().unwrap_or("");
    assert!(
        virsh_ok(&["dumpxml", "--security-info", &vm.name]).contains(VNC_SECRET),
        "libvirt does not hold the test's VNC password: nothing to prove"
    );
    assert!(
        !text.contains(VNC_SECRET) && !text.contains("passwd"),
        "{text}"
    );
    let kept = domain_name(text);
    assert_eq!(kept.as_deref(), Some(vm.name.as_str()), "{text}");
    assert!(
        text.contains(&format!("<source file='{}'", vm.image.display())),
        "the kept definition does not name the original's image: {text}"
    );
}

/// `<name>` of a domain XML (the test crate has no XML parser).
fn domain_name(xml: &str) -> Option<String> {
    let rest = xml.split_once("<name>")?.1;
    Some(rest.split_once("</name>")?.0.to_string())
}

#[test]
fn needs_root_libvirt_kill_9_at_every_milestone_then_recover_leaves_nothing() {
    let _s = serial();
    // With a NIC: the sweep covers the clone's taps and bridge too.
    let Some((dir, _net, vm)) = start_networked("lvfaults", LvOptions::default()) else {
        return;
    };
    let setup = setup(dir.path(), &vm, "stop_timeout_secs = 60", "");
    let steps = [
        "checkpoint:snapshot-started",
        "checkpoint:memory-saved",
        "isolate:bridge-ready",
        "restore:clone-started",
        "restore:memory-loaded",
        "restore:isolation-verified",
        "restore:clone-running",
        "stop:requested",
        "stop:stopped",
        "archive:disk-stored",
    ];
    for step in steps {
        let mut child = setup
            .command(None, &["--json", "backup"])
            .env("COLDCLONE_TEST_HALT_AT", step)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn coldclone");
        wait_for_milestone(&setup, step, Duration::from_secs(180));
        child.kill().expect("kill -9");
        let _ = child.wait();
        keep_caps(&setup);
        let out = setup.coldclone(None, &["--json", "recover"]);
        assert!(
            out.status.success(),
            "recover after a kill at {step} failed: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let rec: Value = serde_json::from_slice(&out.stdout).expect("recover json");
        assert_eq!(rec.as_array().map(Vec::len), Some(1), "after {step}: {rec}");
        for r in rec.as_array().into_iter().flatten() {
            assert!(
                r["failed"].as_array().is_none_or(Vec::is_empty),
                "recover after {step} could not undo: {r}"
            );
        }
        vm.assert_unharmed();
        assert_nothing_left(&setup);
        assert!(
            setup.snapshots().is_empty(),
            "a killed run left a backup visible (killed at {step})"
        );
        eprintln!("kill -9 at {step}: recovered");
    }
    let out = setup.coldclone(None, &["--json", "backup"]);
    assert!(
        out.status.success(),
        "a backup after the sweep: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    restore_disk_checked(&setup, "vda", None);
    vm.assert_unharmed();
}

#[test]
fn needs_root_libvirt_the_clone_never_reaches_the_original_network() {
    let _s = serial();
    let Some((dir, net, vm)) = start_networked("lvisol", LvOptions::default()) else {
        return;
    };
    let setup = setup(dir.path(), &vm, "stop_timeout_secs = 60", "");
    let cap = Capture::start_on(None, &net.bridge, dir.path(), &net.guest_ip());
    let out = setup.coldclone(None, &["--json", "backup"]);
    // Let the original ping on for a while after the backup.
    std::thread::sleep(Duration::from_secs(2));
    let seqs = cap.stop();
    keep_caps(&setup);
    let report = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or(Value::Null);
    assert!(
        out.status.success(),
        "backup failed: {report} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The clone ran (resumed with the original's memory, so its pinger repeats
    // the original's sequence numbers) until it powered off.
    assert_eq!(report["consistency"], "clean-shutdown", "{report}");
    assert!(
        seqs.len() >= MIN_PROBES,
        "the capture saw {} of the original's pings (at least {MIN_PROBES} expected): it did not watch the network",
        seqs.len()
    );
    let dup = duplicates(&seqs);
    assert!(
        dup.is_empty(),
        "the clone's pings reached the original's network: {dup:?}"
    );
    restore_disk_checked(&setup, "vda", None);
    vm.assert_unharmed();
    assert_nothing_left(&setup);
}

#[test]
fn needs_root_libvirt_a_clone_that_ignores_the_power_button() {
    let _s = serial();
    let opts = LvOptions {
        ignore_power_button: true,
        ..Default::default()
    };
    let Some((dir, vm)) = start("lvignore", opts) else {
        return;
    };
    let setup = setup(dir.path(), &vm, "stop_timeout_secs = 5", "");
    let t = Instant::now();
    let out = setup.coldclone(None, &["--json", "backup"]);
    keep_caps(&setup);
    let report = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or(Value::Null);
    assert_eq!(out.status.code(), Some(1), "{report}");
    let err = report["error"].as_str().unwrap_or("");
    assert!(
        err.contains("did not power off within 5 s"),
        "unclear error: {err}"
    );
    assert!(report["snapshot_id"].is_null());
    assert!(setup.snapshots().is_empty(), "no backup may be recorded");
    let stop = report["clone_stop_seconds"].as_f64().unwrap_or(0.0);
    assert!(
        (5.0..60.0).contains(&stop),
        "the wait was not bounded by stop_timeout_secs: {stop} s ({:?} in all)",
        t.elapsed()
    );
    vm.assert_unharmed();
    assert_nothing_left(&setup);

    // on_clone_failure = "crash": the killed clone's disk is kept, labelled crash.
    let cfg = std::fs::read_to_string(&setup.config).expect("config");
    std::fs::write(
        &setup.config,
        cfg.replace(
            "stop_timeout_secs = 5\n",
            "stop_timeout_secs = 5\non_clone_failure = \"crash\"\n",
        ),
    )
    .expect("config");
    let out = setup.coldclone(None, &["--json", "backup"]);
    keep_caps(&setup);
    let report = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or(Value::Null);
    assert!(
        out.status.success(),
        "{report} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report["consistency"], "crash", "{report}");
    let stop = report["clone_stop_seconds"].as_f64().unwrap_or(0.0);
    assert!((5.0..60.0).contains(&stop), "unbounded wait: {stop} s");
    assert!(
        report["warnings"][0]
            .as_str()
            .unwrap_or("")
            .contains("crash-consistent"),
        "{report}"
    );
    let snaps = setup.snapshots();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0]["consistency"], "crash");
    vm.assert_unharmed();
    assert_nothing_left(&setup);
}

#[test]
fn needs_root_libvirt_a_clone_that_ignores_the_button_is_stopped_by_its_guest_agent() {
    let _s = serial();
    let opts = LvOptions {
        ignore_power_button: true,
        agent: true,
        ..Default::default()
    };
    let Some((dir, vm)) = start("lvagent", opts) else {
        return;
    };
    let setup = setup(dir.path(), &vm, "stop_timeout_secs = 5", "");
    let before = vm.counter();
    let out = setup.coldclone(None, &["--json", "backup"]);
    keep_caps(&setup);
    let report = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or(Value::Null);
    assert!(
        out.status.success(),
        "{report} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The button was ignored for the whole bounded wait; the agent's shutdown
    // was then as clean as the button's.
    assert_eq!(report["consistency"], "clean-shutdown", "{report}");
    let stop = report["clone_stop_seconds"].as_f64().unwrap_or(0.0);
    assert!(
        stop >= 5.0,
        "the agent was asked before the wait ended: {stop} s"
    );
    assert!(
        report["warnings"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|w| w.as_str().unwrap_or("").contains("guest agent")),
        "{report}"
    );
    let restored = restore_disk_checked(&setup, "vda", None);
    assert!(restored.counter >= before);
    vm.assert_unharmed();
    assert_nothing_left(&setup);
}

/// The original's agent through libvirt (the test's own look): its freeze state.
fn lv_freeze_status(vm: &LvVm) -> String {
    let out = virsh_ok(&[
        "qemu-agent-command",
        &vm.name,
        r#"{"execute":"guest-fsfreeze-status"}"#,
        "--timeout",
        "20",
    ]);
    let v: Value = serde_json::from_str(out.trim()).expect("agent reply");
    v["return"].as_str().unwrap_or("").to_string()
}

#[test]
fn needs_root_libvirt_quiesced_when_button_and_agent_shutdown_are_ignored() {
    let _s = serial();
    let opts = LvOptions {
        ignore_power_button: true,
        agent: true,
        knobs: "cc_agent_shutdown=ignore".into(),
        ..Default::default()
    };
    let Some((dir, vm)) = start("lvquiesce", opts) else {
        return;
    };
    let setup = setup(
        dir.path(),
        &vm,
        "stop_timeout_secs = 5\non_clone_failure = \"quiesced\"\nfreeze_timeout_secs = 20",
        "",
    );
    let out = setup.coldclone(None, &["--json", "backup"]);
    keep_caps(&setup);
    let report = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or(Value::Null);
    assert!(
        out.status.success(),
        "{report} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report["consistency"], "quiesced", "{report}");
    assert_eq!(report["quiesce"]["frozen_filesystems"], 1, "{report}");
    assert!(vm.console().contains("AGENT FROZE 1"), "{}", vm.console());
    assert!(vm.console().contains("AGENT THAW 1"), "{}", vm.console());
    assert_eq!(lv_freeze_status(&vm), "thawed");
    // Frozen by FIFREEZE (busybox fsfreeze in the stand-in).
    assert_restored_fs_frozen_clean(&setup, "vda");
    // Both overlays (the checkpoint's, the quiesced snapshot's) are committed back.
    vm.assert_unharmed();
    assert_nothing_left(&setup);
}

#[test]
fn needs_root_libvirt_a_freeze_that_never_returns_fails_within_the_timeout_and_thaws() {
    let _s = serial();
    let opts = LvOptions {
        ignore_power_button: true,
        agent: true,
        knobs: "cc_agent_shutdown=ignore cc_agent_freeze=hang".into(),
        ..Default::default()
    };
    let Some((dir, vm)) = start("lvhang", opts) else {
        return;
    };
    let setup = setup(
        dir.path(),
        &vm,
        "stop_timeout_secs = 5\non_clone_failure = \"quiesced\"\nfreeze_timeout_secs = 5",
        "",
    );
    let out = setup.coldclone(None, &["--json", "backup"]);
    keep_caps(&setup);
    let report = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or(Value::Null);
    assert!(!out.status.success(), "{report}");
    let err = report["error"].as_str().unwrap_or("");
    assert!(
        err.contains("could not be frozen") && err.contains("thawed again"),
        "unclear error: {err}"
    );
    assert!(
        vm.console().contains("AGENT FREEZE HANGS"),
        "{}",
        vm.console()
    );
    assert!(vm.console().contains("AGENT THAW 1"), "{}", vm.console());
    assert_eq!(lv_freeze_status(&vm), "thawed");
    vm.assert_unharmed();
    assert_nothing_left(&setup);
}

#[test]
fn needs_root_libvirt_kill_9_while_frozen_then_recover_thaws() {
    let _s = serial();
    let opts = LvOptions {
        ignore_power_button: true,
        agent: true,
        knobs: "cc_agent_shutdown=ignore cc_agent_freeze=hang".into(),
        ..Default::default()
    };
    let Some((dir, vm)) = start("lvfrozen", opts) else {
        return;
    };
    let setup = setup(
        dir.path(),
        &vm,
        "stop_timeout_secs = 5\non_clone_failure = \"quiesced\"\nfreeze_timeout_secs = 30",
        "",
    );
    let mut child = setup
        .command(None, &["--json", "backup"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn coldclone");
    wait_for_milestone(&setup, "quiesce:freezing", Duration::from_secs(240));
    wait_until("the guest to freeze", Duration::from_secs(60), || {
        vm.console().contains("AGENT FREEZE HANGS")
    });
    child.kill().expect("kill -9");
    let _ = child.wait();
    keep_caps(&setup);
    // The guest is frozen for real: its writer stands still. (libvirtd cannot be asked:
    // the killed run's freeze call holds the domain's agent job until its 30 s timeout,
    // which `recover` waits out.)
    // (The heartbeat may still print the last value written before the freeze.)
    std::thread::sleep(Duration::from_secs(2));
    let c = vm.counter();
    std::thread::sleep(Duration::from_secs(3));
    let console = vm.console();
    let tail: String = console
        .lines()
        .rev()
        .take(12)
        .collect::<Vec<_>>()
        .join(" | ");
    assert_eq!(
        vm.counter(),
        c,
        "the writer ran on a frozen file system: {tail}"
    );
    let out = setup.coldclone(None, &["--json", "recover"]);
    assert!(
        out.status.success(),
        "recover: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rec: Value = serde_json::from_slice(&out.stdout).expect("recover json");
    for r in rec.as_array().into_iter().flatten() {
        assert!(
            r["failed"].as_array().is_none_or(Vec::is_empty),
            "recover could not undo: {r}"
        );
    }
    assert!(vm.console().contains("AGENT THAW 1"), "{}", vm.console());
    assert_eq!(lv_freeze_status(&vm), "thawed");
    vm.assert_unharmed();
    assert_nothing_left(&setup);
}
