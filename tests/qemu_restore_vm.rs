//! `coldclone restore VM --as NEW --to DIR [--instant]` on real QEMU guests (TCG): a
//! backup of the writing test guest becomes a new VM that boots in a network namespace of
//! its own (no uplink) to the guest's heartbeat with the backup's counters, under a new
//! name, UUID and MAC; the instant variant boots at once over the repository's NBD export
//! and streams the rest in. Every test here needs root and QEMU (`needs_root_qemu_`).

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A network namespace with nothing in it but `lo`: where a restored VM runs, so that its
/// taps exist but reach nothing.
struct Isolated {
    ns: String,
}

impl Isolated {
    fn new(tag: &str) -> Isolated {
        let ns = format!("ccr{tag}{}", std::process::id());
        let _ = sh(&format!("ip netns del {ns} 2>/dev/null"));
        let out = sh(&format!("ip netns add {ns} && ip -n {ns} link set lo up"));
        assert!(
            out.status.success(),
            "netns {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Isolated { ns }
    }

    /// (name, master) of every link in the namespace.
    fn links(&self) -> Vec<(String, Option<String>)> {
        let out = sh(&format!("ip -n {} -j link show", self.ns));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v.as_array()
            .into_iter()
            .flatten()
            .map(|l| {
                (
                    l["ifname"].as_str().unwrap_or("").to_string(),
                    l["master"].as_str().map(str::to_string),
                )
            })
            .collect()
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        let _ = sh(&format!(
            "ip netns pids {0} | xargs -r kill -9; sleep 0.2; ip netns del {0}",
            self.ns
        ));
    }
}

/// A process the test started, killed (and waited for) when the test ends.
struct Proc(Option<Child>);

impl Proc {
    fn pid(&self) -> u32 {
        self.0.as_ref().map(Child::id).unwrap_or(0)
    }
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The heartbeats `HB a=N b=M` a console log holds, in order.
fn heartbeats(log: &Path) -> Vec<(u64, u64)> {
    let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
    text.lines()
        .filter_map(|l| {
            let rest = l.split("HB a=").nth(1)?;
            let mut it = rest.split_whitespace();
            let a = it.next()?.parse().ok()?;
            let b = it.next()?.strip_prefix("b=")?.parse().ok()?;
            Some((a, b))
        })
        .collect()
}

/// What a console shows: how many heartbeats, how many with a == b, its last lines.
fn console_summary(log: &Path) -> String {
    let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
    let hbs = heartbeats(log);
    let lines: Vec<&str> = text.lines().collect();
    format!(
        "{} heartbeats, {} with a == b (first {:?}); the console's last lines:\n{}",
        hbs.len(),
        hbs.iter().filter(|(a, b)| a == b).count(),
        hbs.iter().find(|(a, b)| a == b),
        lines[lines.len().saturating_sub(15)..].join("\n")
    )
}

/// Waits for a heartbeat with both counters equal and at least `floor` (the guest's
/// writer goes on from the counter its disk holds); returns it.
fn wait_heartbeat(
    log: &Path,
    floor: u64,
    timeout: Duration,
    alive: &mut dyn FnMut() -> bool,
) -> u64 {
    let start = Instant::now();
    loop {
        if let Some((a, _)) = heartbeats(log)
            .into_iter()
            .find(|(a, b)| a == b && *a >= floor)
        {
            return a;
        }
        assert!(
            alive(),
            "the restored VM exited before its heartbeat; console:\n{}",
            String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default())
        );
        assert!(
            start.elapsed() < timeout,
            "no heartbeat with a == b >= {floor} within {timeout:?}; console:\n{}",
            String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn qmp(socket: &Path, cmd: &str, args: Value) -> Value {
    let mut q = coldclone_backends::qemu::qmp::Qmp::connect(socket)
        .unwrap_or_else(|e| panic!("QMP {}: {e}", socket.display()));
    q.execute(cmd, args)
        .unwrap_or_else(|e| panic!("QMP {cmd}: {e}"))
}

/// QMP `quit`: QEMU may close the connection before it answers.
fn quit(socket: &Path) {
    if let Ok(mut q) = coldclone_backends::qemu::qmp::Qmp::connect(socket) {
        let _ = q.execute("quit", json!({}));
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The NICs' MACs as QEMU reports them.
fn macs(socket: &Path) -> Vec<String> {
    qmp(socket, "query-rx-filter", json!({}))
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["main-mac"].as_str().map(str::to_string))
        .collect()
}

/// Asks the VM to power off through its QMP socket; the guest unmounts and QEMU exits.
fn power_off(socket: &Path, vm: &mut Proc) {
    qmp(socket, "system_powerdown", json!({}));
    wait_until(
        "the restored VM to power off",
        Duration::from_secs(180),
        || vm.exited().is_some(),
    );
}

/// A qcow2 image's file system: clean, unmounted, both counters equal; returns the counter.
fn qcow2_counter(img: &Path, scratch: &Path) -> u64 {
    let raw = scratch.join("check.raw");
    let _ = std::fs::remove_file(&raw);
    let st = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(img)
        .arg(&raw)
        .status()
        .expect("qemu-img");
    assert!(st.success(), "qemu-img convert {}", img.display());
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&raw)
        .output()
        .expect("e2fsck");
    assert!(
        fsck.status.success(),
        "e2fsck of the restored VM's disk: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let cat = |f: &str| {
        let o = Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat /{f}"))
            .arg(&raw)
            .output()
            .expect("debugfs");
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let (a, b) = (cat("a.txt"), cat("b.txt"));
    assert_eq!(a, b, "the restored VM's disk has a torn counter pair");
    let _ = std::fs::remove_file(&raw);
    a.parse()
        .unwrap_or_else(|_| panic!("a.txt is not a counter: {a:?}"))
}

fn image_info(img: &Path) -> Value {
    let o = Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(img)
        .output()
        .expect("qemu-img info");
    assert!(
        o.status.success(),
        "qemu-img info {}: {}",
        img.display(),
        stderr(&o)
    );
    serde_json::from_slice(&o.stdout).expect("qemu-img info json")
}

/// A networked original backed up once through the binary; the original is stopped
/// afterwards (the restores read only the repository). Returns the setup, the backup's
/// counter, the original's UUID and MACs.
fn backed_up(dir: &Path) -> (Setup, u64, String, Vec<String>) {
    let net = TestNet::new();
    let vm = Vm::start(
        &net,
        dir,
        VmOptions {
            with_nic: true,
            ..Default::default()
        },
    );
    let setup = Setup::new(dir, &vm.qmp, "", "");
    let (code, report, err) = setup.backup(&net.ns);
    assert_eq!(code, 0, "backup failed: {report} {err}");
    assert_eq!(report["consistency"], "clean-shutdown", "{report}");
    let uuid = vm.qmp("query-uuid", json!({}))["UUID"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let orig_macs = macs(&vm.qmp);
    assert_eq!(orig_macs, ["52:54:00:77:00:02"], "the original's NIC");
    let counter = restore_disk_checked(&setup, "d0", None).counter;
    drop(vm);
    drop(net);
    (setup, counter, uuid, orig_macs)
}

fn restore_json(setup: &Setup, ns: Option<&str>, args: &[&str]) -> (Output, Value) {
    let mut full = vec!["--json", "restore"];
    full.extend_from_slice(args);
    let out = setup.coldclone(ns, &full);
    let v = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or(Value::Null);
    (out, v)
}

#[test]
fn needs_root_qemu_restore_vm_boots_the_backup_as_a_new_isolated_vm() {
    let _s = serial();
    if !rig_available() {
        return;
    }
    let dir = TempDir::new("restore-vm");
    let (setup, counter, orig_uuid, orig_macs) = backed_up(dir.path());
    let to = dir.path().join("restored");
    let to_s = to.display().to_string();

    // Bad input first: clear errors, non-zero exits, nothing written.
    let o = setup.coldclone(None, &["restore", "nosuch", "--as", "x1", "--to", &to_s]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no backup of vm \"nosuch\""),
        "{}",
        stderr(&o)
    );
    let o = setup.coldclone(
        None,
        &[
            "restore",
            "t1",
            "--as",
            "x1",
            "--to",
            &to_s,
            "--snapshot",
            "ffffffff",
        ],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("ffffffff"),
        "unknown snapshot not named: {}",
        stderr(&o)
    );
    let o = setup.coldclone(None, &["restore", "t1", "--as", "../x", "--to", &to_s]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--as"), "{}", stderr(&o));
    assert!(!to.exists(), "a refused restore made {}", to.display());
    // An existing target is never overwritten without --force.
    std::fs::create_dir_all(&to).unwrap();
    let precious = to.join("t1new-d0.qcow2");
    std::fs::write(&precious, "precious").unwrap();
    let o = setup.coldclone(None, &["restore", "t1", "--as", "t1new", "--to", &to_s]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&precious.display().to_string()) && stderr(&o).contains("--force"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(&precious).unwrap(), b"precious");
    let left: Vec<_> = std::fs::read_dir(&to)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 1, "a refused restore left {left:?}");
    std::fs::remove_file(&precious).unwrap();

    // The whole VM.
    let t = Instant::now();
    let (o, r) = restore_json(&setup, None, &["t1", "--as", "t1new", "--to", &to_s]);
    let restore_time = t.elapsed();
    assert!(o.status.success(), "restore --as: {}", stderr(&o));
    assert_eq!(r["name"], "t1new", "{r}");
    assert_eq!(r["from_vm"], "t1");
    let disk = PathBuf::from(r["disks"]["d0"].as_str().expect("disk d0"));
    let script = PathBuf::from(r["start_script"].as_str().expect("start script"));
    let qmp_sock = PathBuf::from(r["qmp_socket"].as_str().expect("qmp socket"));
    let console = PathBuf::from(r["console_log"].as_str().expect("console log"));
    let info = image_info(&disk);
    assert_eq!(info["format"], "qcow2", "{info}");
    assert!(info["backing-filename"].is_null(), "{info}");
    assert_eq!(info["virtual-size"], 64 << 20);
    let new_uuid = r["uuid"].as_str().expect("uuid").to_string();
    let new_macs: Vec<String> = r["macs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m.as_str().map(str::to_string))
        .collect();
    assert_eq!(new_macs.len(), 1, "{r}");
    let taps: Vec<String> = r["taps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m.as_str().map(str::to_string))
        .collect();
    assert_eq!(taps.len(), 1, "{r}");

    // Booted in a namespace of its own, from the start script as a user would.
    let iso = Isolated::new("a");
    let boot = Instant::now();
    let mut vm = Proc(Some(
        Command::new("ip")
            .args(["netns", "exec", &iso.ns, "sh"])
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start script"),
    ));
    let hb = wait_heartbeat(&console, counter, Duration::from_secs(240), &mut || {
        vm.exited().is_none()
    });
    let boot_time = boot.elapsed();
    eprintln!(
        "FIGURES whole-VM restore {:.1} s, boot to first heartbeat {:.1} s, restore+boot {:.1} s (backup counter {counter}, first heartbeat a=b={hb})",
        restore_time.as_secs_f64(),
        boot_time.as_secs_f64(),
        (restore_time + boot_time).as_secs_f64()
    );
    assert_eq!(qmp(&qmp_sock, "query-name", json!({}))["name"], "t1new");
    let uuid = qmp(&qmp_sock, "query-uuid", json!({}))["UUID"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert_eq!(uuid, new_uuid);
    assert_ne!(uuid, orig_uuid, "the new VM kept the original's UUID");
    let running_macs = macs(&qmp_sock);
    assert_eq!(running_macs, new_macs);
    assert!(
        running_macs.iter().all(|m| !orig_macs.contains(m)),
        "the new VM has the original's MAC: {running_macs:?}"
    );
    // Its NIC is a tap attached to nothing; nothing else in its namespace.
    let links = iso.links();
    let tap = links
        .iter()
        .find(|(n, _)| n == &taps[0])
        .unwrap_or_else(|| panic!("tap {} not in the namespace: {links:?}", taps[0]));
    assert_eq!(tap.1, None, "the tap is attached to {:?}", tap.1);
    assert_eq!(links.len(), 2, "more than lo and the tap: {links:?}");

    // Stopped through its QMP socket: a clean power-off, the new data on its disk.
    let last = heartbeats(&console).last().map(|h| h.0).unwrap_or(0);
    power_off(&qmp_sock, &mut vm);
    let stored = qcow2_counter(&disk, dir.path());
    assert!(
        stored >= last,
        "the restored VM's disk holds {stored}, older than its heartbeat {last}"
    );

    // --force replaces a restore that is there (and only with it).
    let o = setup.coldclone(None, &["restore", "t1", "--as", "t1new", "--to", &to_s]);
    assert!(
        !o.status.success(),
        "a second restore replaced the first without --force"
    );
    let (o, r2) = restore_json(
        &setup,
        None,
        &["t1", "--as", "t1new", "--to", &to_s, "--force"],
    );
    assert!(o.status.success(), "restore --force: {}", stderr(&o));
    assert_ne!(r2["uuid"], r["uuid"]);
    assert_eq!(
        qcow2_counter(&disk, dir.path()),
        counter,
        "--force did not restore the backup"
    );
}

fn job(socket: &Path, id: &str) -> Option<Value> {
    qmp(socket, "query-jobs", json!({}))
        .as_array()
        .into_iter()
        .flatten()
        .find(|j| j["id"] == id)
        .cloned()
}

/// The exporter serving `socket`: a `coldclone serve` whose arguments name it.
fn exporter_running(socket: &Path) -> bool {
    let want = socket.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            let argv = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = argv.split(|b| *b == 0).collect();
            args.contains(&&b"serve"[..]) && args.contains(&want)
        })
}

/// d0's backing image in the running VM (null: none).
fn backing(socket: &Path) -> Value {
    let blocks = qmp(socket, "query-block", json!({}));
    blocks
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| b["device"] == "d0")
        .map(|b| b["inserted"]["image"]["backing-image"].clone())
        .unwrap_or_else(|| panic!("no disk d0: {blocks}"))
}

/// `coldclone --json restore t1 --as NAME --to DIR --instant --stream-rate KIB`, in `ns`.
fn spawn_instant(setup: &Setup, ns: &str, name: &str, to: &Path, kib: &str) -> Proc {
    let to_s = to.display().to_string();
    Proc(Some(
        setup
            .command(
                Some(ns),
                &[
                    "--json",
                    "restore",
                    "t1",
                    "--as",
                    name,
                    "--to",
                    &to_s,
                    "--instant",
                    "--stream-rate",
                    kib,
                ],
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn restore --instant"),
    ))
}

/// Waits for `p` to exit; its status, stdout and stderr.
fn finish(p: &mut Proc, timeout: Duration) -> (std::process::ExitStatus, String, String) {
    use std::io::Read;
    wait_until("the restore to finish", timeout, || p.exited().is_some());
    let c = p.0.as_mut().expect("child");
    let (mut out, mut err) = (String::new(), String::new());
    if let Some(mut o) = c.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = c.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (p.exited().expect("exited"), out, err)
}

fn hmp(socket: &Path, line: &str) -> String {
    qmp(
        socket,
        "human-monitor-command",
        json!({"command-line": line}),
    )
    .as_str()
    .unwrap_or("")
    .to_string()
}

/// The VM reads its whole disk through its block layer (HMP qemu-io on d0). QEMU 7.2
/// prints qemu-io's result on its stdout (`log`, where the instant restore sends it) and
/// returns only errors to the monitor.
fn read_whole_disk(socket: &Path, log: &Path) {
    let done = "read 67108864/67108864 bytes";
    let count = || {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches(done)
            .count()
    };
    let before = count();
    let out = hmp(socket, "qemu-io d0 \"read 0 64M\"");
    assert!(
        out.trim().is_empty(),
        "the VM could not read its whole disk: {out}"
    );
    wait_until(
        "qemu-io's result in the VM's log",
        Duration::from_secs(30),
        || count() > before,
    );
}

#[test]
fn needs_root_qemu_instant_restore_answers_while_streaming_then_drops_the_export() {
    let _s = serial();
    if !rig_available() {
        return;
    }
    let dir = TempDir::new("restore-instant");
    let (setup, counter, orig_uuid, orig_macs) = backed_up(dir.path());

    // Slowed to 256 KiB/s (block-stream's own speed limit): a 64 MiB disk takes over
    // 4 minutes, so the guest's heartbeat comes while the copy still runs. The test lifts
    // the limit once it has seen that.
    let iso = Isolated::new("i");
    let to = dir.path().join("instant");
    let (qmp_sock, console, disk) = (
        to.join("t2.qmp"),
        to.join("t2.console.log"),
        to.join("t2-d0.qcow2"),
    );
    let export_sock = to.join(".t2-d0.nbd");
    let t = Instant::now();
    let mut restore = spawn_instant(&setup, &iso.ns, "t2", &to, "256");
    let hb = wait_heartbeat(&console, counter, Duration::from_secs(240), &mut || {
        if restore.exited().is_some() {
            let (st, o, e) = finish(&mut restore, Duration::from_secs(5));
            panic!(
                "the restore ended ({st}) before the heartbeat: {o} {e}\nconsole: {}\ninstant log:\n{}",
                console_summary(&console),
                std::fs::read_to_string(to.join("t2.instant.log")).unwrap_or_default()
            );
        }
        true
    });
    let first_hb = t.elapsed();
    eprintln!(
        "FIGURES instant restore console: {}",
        console_summary(&console).lines().next().unwrap_or("")
    );
    let j = job(&qmp_sock, "coldclone-restore-d0").expect("the copy job");
    let (cur, total) = (
        j["current-progress"].as_u64().unwrap_or(0),
        j["total-progress"].as_u64().unwrap_or(0),
    );
    assert_eq!(j["status"], "running", "{j}");
    assert!(
        cur < total,
        "the copy had finished before the heartbeat: {j}"
    );
    assert!(
        !backing(&qmp_sock).is_null(),
        "d0 has no backing while its copy runs"
    );
    assert!(
        exporter_running(&export_sock),
        "no exporter while the copy runs"
    );
    assert!(
        !to.join("t2.sh").exists(),
        "the start script exists before the copy ended"
    );
    eprintln!(
        "FIGURES instant restore: first heartbeat (a=b={hb}) after {:.1} s, the copy at {cur}/{total} bytes",
        first_hb.as_secs_f64()
    );
    qmp(
        &qmp_sock,
        "block-job-set-speed",
        json!({"device": "coldclone-restore-d0", "speed": 0}),
    );

    let (st, out, err) = finish(&mut restore, Duration::from_secs(600));
    assert!(st.success(), "restore --instant failed: {out} {err}");
    let r: Value = out
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON report: {out} {err}"));
    assert_eq!(r["instant"]["exports_ended_by_themselves"], true, "{r}");
    assert!(
        r["instant"]["streamed_bytes"].as_u64() >= Some(64 << 20),
        "{r}"
    );
    eprintln!(
        "FIGURES instant restore: VM started after {} ms, disks whole after {} ms",
        r["instant"]["vm_started_after_ms"], r["instant"]["streamed_after_ms"]
    );
    assert!(
        to.join("t2.sh").exists(),
        "no start script after a finished copy"
    );
    // The VM no longer depends on the export: no backing, no exporter, no socket; it
    // reads its whole disk and goes on writing.
    assert!(
        backing(&qmp_sock).is_null(),
        "d0 still has a backing after the copy"
    );
    assert!(image_info(&disk)["backing-filename"].is_null());
    assert!(!exporter_running(&export_sock), "the exporter still runs");
    assert!(!export_sock.exists(), "the export's socket is left");
    read_whole_disk(&qmp_sock, &to.join("t2.instant.log"));
    let last = heartbeats(&console).last().map(|h| h.0).unwrap_or(0);
    wait_until(
        "a heartbeat after the export stopped",
        Duration::from_secs(120),
        || {
            heartbeats(&console)
                .iter()
                .any(|(a, b)| a == b && *a > last)
        },
    );
    assert_ne!(
        qmp(&qmp_sock, "query-uuid", json!({}))["UUID"],
        orig_uuid.as_str()
    );
    assert!(macs(&qmp_sock).iter().all(|m| !orig_macs.contains(m)));
    let pid = r["instant"]["pid"].as_u64().expect("pid") as u32;
    qmp(&qmp_sock, "system_powerdown", json!({}));
    wait_until(
        "the instant VM to power off",
        Duration::from_secs(180),
        || {
            // SAFETY: kill(pid, 0) only asks whether the process exists.
            unsafe { libc::kill(pid as i32, 0) != 0 }
        },
    );
    let stored = qcow2_counter(&disk, dir.path());
    assert!(
        stored >= last.max(counter),
        "the disk holds {stored}, older than {last}"
    );

    // kill -9 of the restore mid-copy: the VM keeps running on the export, QEMU's job
    // goes on, no start script is written; once the job ends, the exporter goes by itself.
    let iso2 = Isolated::new("k");
    let to = dir.path().join("killed");
    let (qmp_sock, console) = (to.join("t3.qmp"), to.join("t3.console.log"));
    let export_sock = to.join(".t3-d0.nbd");
    let mut restore = spawn_instant(&setup, &iso2.ns, "t3", &to, "256");
    wait_until("the copy job to run", Duration::from_secs(240), || {
        assert!(restore.exited().is_none(), "the restore ended early");
        qmp_sock.exists()
            && coldclone_backends::qemu::qmp::Qmp::connect(&qmp_sock)
                .ok()
                .and_then(|mut q| q.execute("query-jobs", json!({})).ok())
                .is_some_and(|j| j.as_array().is_some_and(|a| !a.is_empty()))
    });
    // SAFETY: SIGKILL to our own child.
    unsafe {
        libc::kill(restore.pid() as i32, libc::SIGKILL);
    }
    let (st, out, _) = finish(&mut restore, Duration::from_secs(30));
    assert!(!st.success());
    assert!(out.trim().is_empty(), "a killed restore reported: {out}");
    wait_heartbeat(&console, counter, Duration::from_secs(240), &mut || true);
    let j = job(&qmp_sock, "coldclone-restore-d0").expect("the copy job after the kill");
    assert_eq!(j["status"], "running", "{j}");
    assert!(
        exporter_running(&export_sock),
        "the exporter died with the restore"
    );
    assert!(
        !to.join("t3.sh").exists(),
        "a killed restore wrote a start script"
    );
    qmp(
        &qmp_sock,
        "block-job-set-speed",
        json!({"device": "coldclone-restore-d0", "speed": 0}),
    );
    // The job ends by itself (QEMU's auto-dismiss); only a successful one drops the backing.
    wait_until(
        "the copy to end after the kill",
        Duration::from_secs(300),
        || job(&qmp_sock, "coldclone-restore-d0").is_none(),
    );
    assert!(
        backing(&qmp_sock).is_null(),
        "the copy failed after the kill"
    );
    wait_until(
        "the exporter to go by itself",
        Duration::from_secs(60),
        || !exporter_running(&export_sock),
    );
    read_whole_disk(&qmp_sock, &to.join("t3.instant.log"));
    let last = heartbeats(&console).last().map(|h| h.0).unwrap_or(0);
    wait_until(
        "a heartbeat after the exporter went",
        Duration::from_secs(120),
        || {
            heartbeats(&console)
                .iter()
                .any(|(a, b)| a == b && *a > last)
        },
    );
    assert!(!to.join("t3.sh").exists());
    // A VM restored under that name still runs there: even --force leaves its disk alone.
    let disk3 = to.join("t3-d0.qcow2");
    // (Its guest writes on: the file's identity is what must stay.)
    use std::os::unix::fs::MetadataExt;
    let before = std::fs::metadata(&disk3).expect("t3's disk").ino();
    let to_s = to.display().to_string();
    let o = setup.coldclone(
        None,
        &["restore", "t1", "--as", "t3", "--to", &to_s, "--force"],
    );
    assert!(
        !o.status.success(),
        "a restore replaced a running VM's disk"
    );
    assert!(stderr(&o).contains("answers"), "{}", stderr(&o));
    assert_eq!(std::fs::metadata(&disk3).unwrap().ino(), before);
    assert!(to.join("t3.qmp").exists());
    quit(&qmp_sock);
    drop(iso2);

    // The VM stops before its disks are whole: the restore fails, stops its exporter and
    // removes the overlays (they depend on the export); no start script.
    let iso3 = Isolated::new("q");
    let to = dir.path().join("quit");
    let (qmp_sock, export_sock) = (to.join("t4.qmp"), to.join(".t4-d0.nbd"));
    let mut restore = spawn_instant(&setup, &iso3.ns, "t4", &to, "256");
    wait_until("the copy job to run", Duration::from_secs(240), || {
        assert!(restore.exited().is_none(), "the restore ended early");
        qmp_sock.exists()
            && coldclone_backends::qemu::qmp::Qmp::connect(&qmp_sock)
                .ok()
                .and_then(|mut q| q.execute("query-jobs", json!({})).ok())
                .is_some_and(|j| j.as_array().is_some_and(|a| !a.is_empty()))
    });
    quit(&qmp_sock);
    let (st, out, err) = finish(&mut restore, Duration::from_secs(120));
    assert!(!st.success(), "the restore succeeded without its VM: {out}");
    assert!(
        err.contains("depend on the export") && err.contains("removed"),
        "{err}"
    );
    assert!(
        !to.join("t4-d0.qcow2").exists(),
        "an incomplete overlay is left"
    );
    assert!(!to.join("t4.sh").exists());
    assert!(
        !exporter_running(&export_sock),
        "the exporter outlived a failed restore"
    );
    drop(iso3);
    drop(iso);
}

/// The entries of `dir` (names), sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Journals of runs not yet finished (crashed or live) in the state folder.
fn open_journals(setup: &Setup) -> Vec<String> {
    entries(&setup.state.join("journal"))
        .into_iter()
        .filter(|n| n.ends_with(".jsonl"))
        .collect()
}

/// `coldclone restore t1 --as NAME --to DIR EXTRA...`, in `ns`, halted at `milestone`
/// (COLDCLONE_TEST_HALT_AT, debug builds), then killed -9 there.
fn restore_killed_at(
    setup: &Setup,
    ns: &str,
    name: &str,
    to: &Path,
    extra: &[&str],
    milestone: &str,
) {
    let to_s = to.display().to_string();
    let mut args = vec!["restore", "t1", "--as", name, "--to", &to_s];
    args.extend_from_slice(extra);
    let mut p = Proc(Some(
        setup
            .command(Some(ns), &args)
            .env("COLDCLONE_TEST_HALT_AT", milestone)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn restore"),
    ));
    wait_for_milestone(setup, milestone, Duration::from_secs(300));
    assert!(p.exited().is_none(), "the restore ended at {milestone}");
    // SAFETY: SIGKILL to our own child.
    unsafe {
        libc::kill(p.pid() as i32, libc::SIGKILL);
    }
    wait_until(
        "the killed restore to exit",
        Duration::from_secs(30),
        || p.exited().is_some(),
    );
}

/// `coldclone --json recover`: exit status and the report.
fn recover(setup: &Setup) -> (Output, Value) {
    let o = setup.coldclone(None, &["--json", "recover"]);
    let v = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    (o, v)
}

fn process_alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .is_some_and(|(_, r)| !r.trim_start().starts_with(['Z', 'X']))
}

#[test]
fn needs_root_qemu_restore_killed_at_each_milestone_is_removed_by_recover() {
    let _s = serial();
    if !rig_available() {
        return;
    }
    let dir = TempDir::new("restore-kill");
    let (setup, counter, _, _) = backed_up(dir.path());
    let iso = Isolated::new("x");
    let to = dir.path().join("target");
    std::fs::create_dir_all(&to).unwrap();
    // The user's files in the target folder: never touched by a restore's recovery.
    std::fs::write(to.join("notes.txt"), "the user's").unwrap();
    let users = to.join("k1-d0.qcow2");
    std::fs::write(&users, "the user's image").unwrap();

    // 1. Killed while the disk is being converted (over the user's k1-d0.qcow2, --force):
    //    the work folder goes, the user's image stays as it was (not yet replaced).
    restore_killed_at(
        &setup,
        &iso.ns,
        "k1",
        &to,
        &["--force"],
        "restore:converting",
    );
    assert!(
        entries(&to)
            .iter()
            .any(|n| n.starts_with(".coldclone-restore-")),
        "no work folder at restore:converting: {:?}",
        entries(&to)
    );
    let (o, r) = recover(&setup);
    assert!(o.status.success(), "recover: {} {r}", stderr(&o));
    assert_eq!(r.as_array().map(Vec::len), Some(1), "{r}");
    assert_eq!(entries(&to), ["k1-d0.qcow2", "notes.txt"]);
    assert_eq!(std::fs::read(&users).unwrap(), b"the user's image");
    assert!(
        open_journals(&setup).is_empty(),
        "{:?}",
        open_journals(&setup)
    );

    // 2. Killed with its disk whole but no start script: a half-made VM, removed.
    restore_killed_at(&setup, &iso.ns, "k2", &to, &[], "restore:disk-written");
    assert!(to.join("k2-d0.qcow2").exists());
    assert!(!to.join("k2.sh").exists());
    let (o, r) = recover(&setup);
    assert!(o.status.success(), "recover: {} {r}", stderr(&o));
    assert_eq!(entries(&to), ["k1-d0.qcow2", "notes.txt"]);

    // 3. A finished restore is never touched by recover.
    let to_s = to.display().to_string();
    let o = setup.coldclone(None, &["restore", "t1", "--as", "k3", "--to", &to_s]);
    assert!(o.status.success(), "restore: {}", stderr(&o));
    let finished = entries(&to);
    assert!(finished.contains(&"k3.sh".to_string()), "{finished:?}");
    let (o, r) = recover(&setup);
    assert!(o.status.success());
    assert_eq!(r, json!([]), "recover acted after a finished restore");
    assert_eq!(entries(&to), finished);
    assert_eq!(qcow2_counter(&to.join("k3-d0.qcow2"), dir.path()), counter);
    for f in ["k3-d0.qcow2", "k3.sh", "k3.definition.json"] {
        std::fs::remove_file(to.join(f)).unwrap();
    }

    // 4. Instant, killed once the exporters listen (no VM yet): recover stops them and
    //    removes their sockets and the log.
    restore_killed_at(
        &setup,
        &iso.ns,
        "k4",
        &to,
        &["--instant"],
        "restore:exporters-started",
    );
    let sock4 = to.join(".k4-d0.nbd");
    assert!(exporter_running(&sock4), "no exporter after the kill");
    let (o, r) = recover(&setup);
    assert!(o.status.success(), "recover: {} {r}", stderr(&o));
    assert!(!exporter_running(&sock4), "recover left the exporter");
    assert_eq!(entries(&to), ["k1-d0.qcow2", "notes.txt"]);

    // 5. Instant, killed with the VM running on its overlay before the copy starts:
    //    recover never stops a running VM; it says so and fails. Once the VM is stopped,
    //    the next recover removes the overlay, the exporter and what the VM left.
    restore_killed_at(
        &setup,
        &iso.ns,
        "k5",
        &to,
        &["--instant"],
        "restore:vm-started",
    );
    let qmp5 = to.join("k5.qmp");
    assert!(
        !backing(&qmp5).is_null(),
        "k5 has no backing before its copy"
    );
    let (o, r) = recover(&setup);
    assert!(
        !o.status.success(),
        "recover succeeded with a VM still copying: {r}"
    );
    let failed = r.to_string();
    assert!(failed.contains("still being copied"), "{failed}");
    assert!(
        to.join("k5-d0.qcow2").exists(),
        "recover removed a running VM's disk"
    );
    assert_eq!(qmp(&qmp5, "query-status", json!({}))["status"], "running");
    let pidfile = std::fs::read_to_string(to.join("k5.pid")).unwrap_or_default();
    let pid5: u32 = pidfile.trim().parse().expect("k5's pid");
    quit(&qmp5);
    wait_until("k5 to quit", Duration::from_secs(60), || {
        !process_alive(pid5)
    });
    let (o, r) = recover(&setup);
    assert!(
        o.status.success(),
        "recover after the VM quit: {} {r}",
        stderr(&o)
    );
    assert!(!exporter_running(&to.join(".k5-d0.nbd")));
    let left: Vec<String> = entries(&to)
        .into_iter()
        .filter(|n| !["k1-d0.qcow2", "notes.txt"].contains(&n.as_str()))
        .collect();
    // QEMU's own leftovers of a VM that was stopped: its console log and pidfile, the
    // user's QMP socket. No image, overlay, socket of the restore's or log of it.
    assert!(
        left.iter()
            .all(|n| ["k5.console.log", "k5.pid", "k5.qmp"].contains(&n.as_str())),
        "left after recover: {left:?}"
    );
    assert!(
        open_journals(&setup).is_empty(),
        "{:?}",
        open_journals(&setup)
    );
    for n in &left {
        let _ = std::fs::remove_file(to.join(n));
    }

    // 6. Instant, killed once the copy runs; the copy ends by itself (QEMU's job): the
    //    VM on whole disks is a finished restore, left running with its disk by recover.
    restore_killed_at(
        &setup,
        &iso.ns,
        "k6",
        &to,
        &["--instant"],
        "restore:copying",
    );
    let qmp6 = to.join("k6.qmp");
    wait_until("k6's copy to end", Duration::from_secs(300), || {
        backing(&qmp6).is_null()
    });
    let (o, r) = recover(&setup);
    assert!(o.status.success(), "recover: {} {r}", stderr(&o));
    assert!(r.to_string().contains("whole"), "{r}");
    assert_eq!(qmp(&qmp6, "query-status", json!({}))["status"], "running");
    assert!(
        to.join("k6-d0.qcow2").exists(),
        "recover removed a whole restore's disk"
    );
    assert!(image_info(&to.join("k6-d0.qcow2"))["backing-filename"].is_null());
    assert!(
        open_journals(&setup).is_empty(),
        "{:?}",
        open_journals(&setup)
    );
    let pid6: u32 = std::fs::read_to_string(to.join("k6.pid"))
        .unwrap_or_default()
        .trim()
        .parse()
        .expect("k6's pid");
    // It goes on, on its own disk: a heartbeat (which also means its power button is
    // handled by now), then a clean power-off with the data on the disk.
    wait_heartbeat(
        &to.join("k6.console.log"),
        counter,
        Duration::from_secs(240),
        &mut || process_alive(pid6),
    );
    qmp(&qmp6, "system_powerdown", json!({}));
    wait_until("k6 to power off", Duration::from_secs(180), || {
        !process_alive(pid6)
    });
    let stored = qcow2_counter(&to.join("k6-d0.qcow2"), dir.path());
    assert!(stored >= counter, "k6's disk holds {stored} < {counter}");
    drop(iso);
}
