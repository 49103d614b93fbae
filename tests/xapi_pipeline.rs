//! The real `coldclone` binary against the XAPI simulator (`xapi-sim`): no
//! root, no real XAPI. What the simulator models is in docs/xapi.md.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use xapi_sim::{At, Faults, Sim, VmSpec};

const BIN: &str = env!("CARGO_BIN_EXE_coldclone");

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Rig {
    dir: Dir,
    sim: Sim,
    cfg: PathBuf,
    /// Put first on coldclone's PATH (a stand-in `xl`).
    path_prefix: Option<PathBuf>,
}

fn rig(tag: &str, spec: VmSpec) -> Rig {
    rig_with(tag, spec, "")
}

fn rig_with(tag: &str, spec: VmSpec, extra_vm_config: &str) -> Rig {
    rig_with_hosts(tag, spec, extra_vm_config, &[])
}

/// A pool of host0 (the master, where the VM runs) and `hosts`.
fn rig_with_hosts(tag: &str, spec: VmSpec, extra_vm_config: &str, hosts: &[&str]) -> Rig {
    let d = std::env::temp_dir().join(format!("coldclone-xapi-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    let sim = Sim::start(&d.join("sr")).expect("simulator");
    for h in hosts {
        sim.add_host(h, xapi_sim::DEFAULT_XAPI_VERSION);
    }
    sim.add_user("root", "pool secret");
    sim.add_vm(&spec).expect("vm");
    std::fs::write(d.join("pw"), "pw\n").expect("pw");
    std::fs::write(
        d.join("xapi.cred"),
        "username = \"root\"\npassword = \"pool secret\"\n",
    )
    .expect("cred");
    let cfg = d.join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{0}/state\"\n[repository]\npath = \"{0}/repo\"\npassword_file = \"{0}/pw\"\n\
             [[vm]]\nname = \"web1\"\nxapi_url = \"{1}\"\nxapi_vm = \"{2}\"\n\
             xapi_credentials_file = \"{0}/xapi.cred\"\nxapi_insecure_http = true\nstop_timeout_secs = 20\n{3}",
            d.display(),
            sim.url,
            spec.name,
            extra_vm_config
        ),
    )
    .expect("config");
    let r = Rig {
        dir: Dir(d),
        sim,
        cfg,
        path_prefix: None,
    };
    let o = r.run(&["init"]);
    assert!(
        o.status.success(),
        "init: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    r
}

impl Rig {
    fn run(&self, args: &[&str]) -> Output {
        let mut c = Command::new(BIN);
        if let Some(p) = &self.path_prefix {
            let path = std::env::var("PATH").unwrap_or_default();
            c.env("PATH", format!("{}:{path}", p.display()));
        }
        c.arg("--config")
            .arg(&self.cfg)
            .args(args)
            .env_remove("COLDCLONE_PASSWORD")
            .env_remove("COLDCLONE_XAPI_USERNAME")
            .env_remove("COLDCLONE_XAPI_PASSWORD")
            .output()
            .expect("run coldclone")
    }

    fn backup(&self) -> (bool, Value, String) {
        self.backup_env(&[])
    }

    /// A backup with these environment variables set.
    fn backup_env(&self, env: &[(&str, &str)]) -> (bool, Value, String) {
        let mut c = Command::new(BIN);
        if let Some(p) = &self.path_prefix {
            let path = std::env::var("PATH").unwrap_or_default();
            c.env("PATH", format!("{}:{path}", p.display()));
        }
        c.arg("--config")
            .arg(&self.cfg)
            .args(["--json", "backup"])
            .env_remove("COLDCLONE_PASSWORD")
            .env_remove("COLDCLONE_XAPI_USERNAME")
            .env_remove("COLDCLONE_XAPI_PASSWORD");
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().expect("run coldclone");
        let report = String::from_utf8_lossy(&o.stdout)
            .lines()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
            .unwrap_or(Value::Null);
        (
            o.status.success(),
            report,
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    /// Only the original is left, running; no network, VDI or task of a run.
    fn assert_clean(&self) {
        let st = self.sim.state();
        assert_eq!(
            st.vms.len(),
            1,
            "VMs left: {:?}",
            st.vms.values().map(|v| &v.name_label).collect::<Vec<_>>()
        );
        assert!(st.vms.values().all(|v| v.power_state == "Running"));
        assert_eq!(st.networks.len(), 1, "networks left");
        assert!(
            st.tasks.is_empty(),
            "tasks left: {:?}",
            st.tasks.values().map(|t| &t.name_label).collect::<Vec<_>>()
        );
        let own: Vec<&String> = st
            .vms
            .values()
            .flat_map(|v| v.vbds.iter())
            .filter_map(|b| st.vbds.get(b))
            .map(|b| &b.vdi)
            .collect();
        // What may remain of a successful run: its changed-block maps, at most one per
        // disk, each a metadata-only snapshot of one of the original's VDIs.
        let maps: Vec<&String> = st
            .vdis
            .values()
            .filter(|v| {
                v.kind == xapi_sim::VdiType::CbtMetadata
                    && v.is_a_snapshot
                    && own.contains(&&v.snapshot_of)
                    && v.name_label.starts_with("coldclone-cbt-")
            })
            .map(|v| &v.snapshot_of)
            .collect();
        let distinct: std::collections::BTreeSet<&&String> = maps.iter().collect();
        assert_eq!(distinct.len(), maps.len(), "at most one kept map per disk");
        assert_eq!(
            st.vdis.len(),
            own.len() + maps.len(),
            "VDIs left: {:?}",
            st.vdis.values().map(|v| &v.name_label).collect::<Vec<_>>()
        );
        assert!(
            st.sessions.is_empty(),
            "{} sessions left",
            st.sessions.len()
        );
        let journals = std::fs::read_dir(self.dir.0.join("state/journal"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().is_file())
                    .count()
            })
            .unwrap_or(0);
        assert_eq!(journals, 0, "open journals left");
        let work_dirs: Vec<PathBuf> = std::fs::read_dir(self.dir.0.join("state/runs"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(work_dirs.is_empty(), "run work dirs left: {work_dirs:?}");
    }

    /// web1's backups as `coldclone snapshots` lists them; the command must work.
    /// The kept changed-block maps (metadata-only VDIs).
    fn kept_maps(&self) -> usize {
        self.sim
            .state()
            .vdis
            .values()
            .filter(|v| v.kind == xapi_sim::VdiType::CbtMetadata)
            .count()
    }

    fn snapshots(&self) -> Vec<Value> {
        let o = self.run(&["--json", "snapshots"]);
        assert!(
            o.status.success(),
            "snapshots failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let all: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!(
                "snapshots prints JSON ({e}): {}",
                String::from_utf8_lossy(&o.stdout)
            )
        });
        all.as_array()
            .expect("snapshots lists an array")
            .iter()
            .filter(|s| s["vm"] == "web1")
            .cloned()
            .collect()
    }

    /// `coldclone check --read-data` passes, with no error and no warning.
    fn assert_repository_sound(&self, ctx: &str) {
        let o = self.run(&["--json", "check", "--read-data"]);
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{ctx}: check: {text} {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: Value = serde_json::from_str(&text).expect("check prints JSON");
        assert_eq!(v["ok"], Value::Bool(true), "{ctx}: {v}");
        assert_eq!(v["errors"], serde_json::json!([]), "{ctx}: {v}");
    }

    /// The finished runs' journals (state/journal/done), oldest first: each
    /// names web1 and has every resource it created removed again.
    fn finished_runs(&self) -> Vec<Vec<Value>> {
        let mut files: Vec<(std::time::SystemTime, PathBuf)> =
            std::fs::read_dir(self.dir.0.join("state/journal/done"))
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
                        .collect()
                })
                .unwrap_or_default();
        files.sort();
        files
            .iter()
            .map(|(_, p)| {
                let entries: Vec<Value> = std::fs::read_to_string(p)
                    .expect("a finished journal")
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect();
                assert!(
                    entries
                        .iter()
                        .any(|e| e["op"] == "start" && e["vm"] == "web1"),
                    "{}: a run of web1",
                    p.display()
                );
                let removed: Vec<&Value> = entries
                    .iter()
                    .filter(|e| e["op"] == "removed")
                    .map(|e| &e["id"])
                    .collect();
                let open: Vec<&Value> = entries
                    .iter()
                    .filter(|e| e["op"] == "create" && !removed.contains(&&e["id"]))
                    .map(|e| &e["resource"])
                    .collect();
                assert!(open.is_empty(), "{}: never removed: {open:?}", p.display());
                entries
            })
            .collect()
    }
}

/// How often a run's journal records `name`.
fn milestones(run: &[Value], name: &str) -> usize {
    run.iter()
        .filter(|e| e["op"] == "milestone" && e["name"] == name)
        .count()
}

fn find<'a>(report: &'a Value, key: &str) -> Option<&'a Value> {
    match report {
        Value::Object(m) => m.get(key).or_else(|| m.values().find_map(|v| find(v, key))),
        Value::Array(a) => a.iter().find_map(|v| find(v, key)),
        _ => None,
    }
}

fn halted_images(sim: &Sim) -> Vec<Vec<u8>> {
    sim.state()
        .halted_images
        .values()
        .map(|p| std::fs::read(p).expect("halted image"))
        .collect()
}

fn restore(r: &Rig, disk: &str, to: &Path) -> Vec<u8> {
    let o = r.run(&[
        "restore",
        "web1",
        "--disk",
        disk,
        "--to",
        &to.display().to_string(),
    ]);
    assert!(
        o.status.success(),
        "restore {disk}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::read(to).expect("restored")
}

#[test]
fn xapi_backup_through_the_binary_archives_the_clean_clone() {
    let r = rig("e2e", VmSpec::new("web01", &[1 << 20, 512 << 10]));
    let (ok, report, stderr) = r.backup();
    assert!(ok, "backup failed: {stderr}\n{report}");
    assert_eq!(
        find(&report, "consistency").and_then(Value::as_str),
        Some("clean-shutdown"),
        "{report}"
    );
    assert_eq!(
        find(&report, "backend").and_then(Value::as_str),
        Some("xapi"),
        "{report}"
    );
    let halted = halted_images(&r.sim);
    assert_eq!(halted.len(), 2);
    let snaps = r.snapshots();
    let listed: Vec<&str> = snaps.iter().filter_map(|s| s["disk"].as_str()).collect();
    assert_eq!(listed, ["xvda", "xvdb"], "both disks are listed");
    let runs = r.finished_runs();
    assert_eq!(runs.len(), 1, "the run's journal is kept in the history");
    assert_eq!(milestones(&runs[0], "archive:disk-stored"), 2);
    r.assert_repository_sound("after a good run");
    for disk in ["xvda", "xvdb"] {
        let got = restore(&r, disk, &r.dir.0.join(format!("{disk}.raw")));
        assert!(
            halted.contains(&got),
            "{disk}: the backup equals the clone's stopped disk"
        );
    }
    // The clone only ever ran on a network with no PIF.
    let st = r.sim.state();
    let clone: Vec<_> = st
        .attachments
        .iter()
        .filter(|a| a.vm_name.starts_with("coldclone-clone-"))
        .collect();
    assert!(
        !clone.is_empty() && clone.iter().all(|a| !a.network_has_pif),
        "{clone:?}"
    );
    drop(st);
    r.assert_clean();
}

#[test]
fn xapi_failed_run_through_the_binary_leaves_nothing() {
    let r = rig("fail", VmSpec::new("web01", &[512 << 10]));
    r.sim.set_faults(Faults {
        fail_method: Some("VM.unpause".into()),
        ..Faults::default()
    });
    let (ok, report, stderr) = r.backup();
    assert!(!ok, "the run must fail: {report}");
    let text = format!("{report}{stderr}");
    assert!(
        text.contains("VM.unpause") && text.contains("INTERNAL_ERROR"),
        "a clear message: {text}"
    );
    r.assert_clean();
    assert_eq!(r.snapshots(), Vec::<Value>::new(), "no backup stored");
    let runs = r.finished_runs();
    assert_eq!(runs.len(), 1, "the failed run's journal is in the history");
    assert_eq!(milestones(&runs[0], "archive:disk-stored"), 0);
    assert!(
        r.sim.fired().iter().all(|f| f.fault == "fail_method")
            && r.sim.fired().iter().any(|f| f.at.method == "VM.unpause"),
        "the fault fired: {:?}",
        r.sim.fired()
    );
}

#[test]
fn xapi_hvm_guest_without_tools_is_refused_with_the_reason() {
    let mut spec = VmSpec::new("win01", &[512 << 10]);
    spec.pv_drivers = false;
    let r = rig("hvm", spec);
    let (ok, report, stderr) = r.backup();
    assert!(!ok);
    let text = format!("{report}{stderr}");
    assert!(text.contains("no ACPI power-button call"), "{text}");
    r.assert_clean();
    assert_eq!(r.snapshots(), Vec::<Value>::new(), "no backup stored");
    assert_eq!(r.finished_runs().len(), 1);
}

/// A journal under `dir` records `name` at least `times` times.
fn journal_reached(dir: &Path, name: &str, times: usize) -> bool {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten().any(|e| {
                std::fs::read_to_string(e.path())
                    .unwrap_or_default()
                    .matches(&format!("\"name\":\"{name}\""))
                    .count()
                    >= times
            })
        })
        .unwrap_or(false)
}

/// Waits until `reached`, failing should the run end first.
fn wait_for(child: &mut std::process::Child, what: &str, reached: impl Fn() -> bool) {
    while !reached() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("coldclone ended ({status}) before {what}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

impl Rig {
    fn spawn_backup(&self, halt_at: Option<&str>) -> std::process::Child {
        let mut c = Command::new(BIN);
        c.arg("--config")
            .arg(&self.cfg)
            .args(["--json", "backup"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(step) = halt_at {
            c.env("COLDCLONE_TEST_HALT_AT", step);
        }
        c.spawn().expect("spawn coldclone")
    }

    /// After a kill -9: `recover` succeeds and logs out of every session it
    /// opens, the killed run's own session being all that is left (xapi's GC
    /// removes it after 24 hours). Returns what `recover` removed.
    fn recover_after_kill(&self, ctx: &str) -> Value {
        let before: Vec<String> = self.sim.state().sessions.keys().cloned().collect();
        assert_eq!(
            before.len(),
            1,
            "{ctx}: the killed run held one session: {before:?}"
        );
        let o = self.run(&["--json", "recover"]);
        assert!(
            o.status.success(),
            "{ctx}: recover: {} {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let after: Vec<String> = self.sim.state().sessions.keys().cloned().collect();
        assert_eq!(
            after, before,
            "{ctx}: recover logged out of its own sessions"
        );
        serde_json::from_slice(&o.stdout).expect("recover prints JSON")
    }

    /// A killed process cannot destroy a task it was waiting on (at most one:
    /// its clean-shutdown request or the export it was reading); xapi's GC
    /// removes completed tasks after 65 minutes. Everything journaled is gone already.
    fn gc_after_kill(&self, ctx: &str) {
        let tasks = self.sim.state().tasks.len();
        assert!(tasks <= 1, "{ctx}: {tasks} tasks left");
        assert!(
            self.sim
                .state()
                .tasks
                .values()
                .all(|t| t.status != "pending"),
            "{ctx}: a pending task"
        );
        self.sim.gc_completed_tasks_and_idle_sessions();
    }
}

#[test]
fn xapi_kill_9_at_every_step_then_recover_leaves_nothing() {
    let r = rig("kill", VmSpec::new("web01", &[512 << 10]));
    let steps = [
        "checkpoint:disks-snapshotted",
        "isolate:bridge-ready",
        // The disk and memory VDIs cloned, the clone VM not made yet.
        "restore:vdis-cloned",
        "restore:clone-created",
        "restore:memory-loaded",
        "restore:isolation-verified",
        "restore:clone-running",
        "stop:requested",
        "stop:stopped",
        "archive:disk-stored",
        // The backup is stored and its changed-block map kept: both stay.
        "archive:maps-kept",
    ];
    let journal_dir = r.dir.0.join("state/journal");
    for (i, step) in steps.iter().enumerate() {
        let stored = *step == "archive:maps-kept";
        let ctx = format!("killed at {step}");
        let mut child = r.spawn_backup(Some(step));
        wait_for(&mut child, step, || journal_reached(&journal_dir, step, 1));
        child.kill().expect("kill -9");
        let _ = child.wait();
        r.recover_after_kill(&ctx);
        r.gc_after_kill(&ctx);
        r.assert_clean();
        if stored {
            assert_eq!(r.snapshots().len(), 1, "{ctx}: the stored backup stays");
            assert_eq!(r.kept_maps(), 1, "{ctx}: its map stays");
        } else {
            assert_eq!(
                r.snapshots(),
                Vec::<Value>::new(),
                "a killed run left a backup visible ({ctx})"
            );
            assert_eq!(
                r.kept_maps(),
                0,
                "{ctx}: no map of a run that did not store"
            );
        }
        assert_eq!(
            r.finished_runs().len(),
            i + 1,
            "{ctx}: the recovered run's journal is in the history"
        );
        r.assert_repository_sound(&ctx);
    }
    // The map kept by the run killed right after keeping it serves the next run.
    let (ok, report, stderr) = r.backup_env(&[("COLDCLONE_VERIFY_INCREMENTAL", "1")]);
    assert!(ok, "a normal backup still works: {stderr} {report}");
    assert_eq!(
        find(&report, "changed_block_map").and_then(Value::as_str),
        Some("xapi-cbt"),
        "{report}"
    );
    r.assert_clean();
    assert_eq!(r.snapshots().len(), 2);
    assert_eq!(r.kept_maps(), 1);
}

fn disks(n: usize) -> Vec<u64> {
    [512 << 10, 256 << 10, 320 << 10][..n].to_vec()
}

#[test]
fn xapi_multi_disk_vm_failing_at_a_later_disk_withdraws_the_whole_backup() {
    for (n, k) in [(2, 2), (3, 2), (3, 3)] {
        let ctx = format!("{n} disks, disk {k}'s export failing");
        let r = rig(&format!("multifail{n}{k}"), VmSpec::new("web01", &disks(n)));
        // Disk k's export fails on every attempt; the disks before it were stored.
        r.sim.set_faults(Faults {
            fail_from: Some(At::new("export_raw_vdi", k as u64)),
            ..Faults::default()
        });
        let (ok, report, stderr) = r.backup();
        assert!(!ok, "{ctx}: the run must fail: {report}");
        let e = report["error"].as_str().unwrap_or_default();
        assert!(
            e.contains("exporting VDI") && e.contains("failed after 3 attempts"),
            "{ctx}: the export's failure is named: {report} {stderr}"
        );
        let fired = r.sim.fired();
        assert!(
            !fired.is_empty()
                && fired
                    .iter()
                    .all(|f| f.fault == "fail_from" && f.at.occurrence >= k as u64),
            "{ctx}: the fault fired at disk {k}'s export: {fired:?}"
        );
        let runs = r.finished_runs();
        assert_eq!(runs.len(), 1, "{ctx}");
        assert_eq!(
            milestones(&runs[0], "archive:disk-stored"),
            k - 1,
            "{ctx}: the disks before it were stored, then withdrawn"
        );
        assert_eq!(
            r.snapshots(),
            Vec::<Value>::new(),
            "{ctx}: no backup listed"
        );
        r.assert_repository_sound(&ctx);
        r.assert_clean();
        // The host is fine: the next run stores every disk.
        r.sim.set_faults(Faults::default());
        let (ok, report, stderr) = r.backup();
        assert!(ok, "{ctx}: the next backup works: {stderr} {report}");
        assert_eq!(r.snapshots().len(), n, "{ctx}: all {n} disks listed");
        r.assert_repository_sound(&ctx);
        r.assert_clean();
    }
}

#[test]
fn xapi_multi_disk_vm_killed_between_its_disks_is_withdrawn_by_recover() {
    for (n, k) in [(2, 1), (3, 1), (3, 2)] {
        let ctx = format!("{n} disks, killed after disk {k} was stored");
        let r = rig(&format!("multikill{n}{k}"), VmSpec::new("web01", &disks(n)));
        let journal_dir = r.dir.0.join("state/journal");
        // Disk k+1's export waits: the run is between its disks' archive steps.
        r.sim.set_faults(Faults {
            hold_exports_from: Some(k as u64 + 1),
            ..Faults::default()
        });
        let mut child = r.spawn_backup(None);
        wait_for(
            &mut child,
            &format!("disk {k} stored, the next export held"),
            || {
                journal_reached(&journal_dir, "archive:disk-stored", k)
                    && r.sim.state().exports_held == 1
            },
        );
        assert!(
            !journal_reached(&journal_dir, "archive:disk-stored", k + 1),
            "{ctx}: disk {} was not stored",
            k + 1
        );
        child.kill().expect("kill -9");
        let _ = child.wait();
        // The held export goes on to a dead connection and fails.
        r.sim.set_faults(Faults::default());
        while r.sim.state().exports_held > 0
            || r.sim.state().tasks.values().any(|t| t.status == "pending")
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let recovered = r.recover_after_kill(&ctx);
        let removed = recovered.to_string();
        assert!(
            removed.contains("\"repository_backup\""),
            "{ctx}: recover withdrew the partial backup: {recovered}"
        );
        r.gc_after_kill(&ctx);
        r.assert_clean();
        assert_eq!(
            r.snapshots(),
            Vec::<Value>::new(),
            "{ctx}: no backup listed"
        );
        r.assert_repository_sound(&ctx);
        let runs = r.finished_runs();
        assert_eq!(runs.len(), 1, "{ctx}");
        assert_eq!(milestones(&runs[0], "archive:disk-stored"), k, "{ctx}");
        let (ok, report, stderr) = r.backup();
        assert!(ok, "{ctx}: the next backup works: {stderr} {report}");
        assert_eq!(r.snapshots().len(), n, "{ctx}: all {n} disks listed");
        r.assert_clean();
    }
}

/// A stand-in for the `xl` of the dom0 of host `host` (a uuid) in the rig's
/// `bin/`: runs `first` (a shell line), then answers `xl list -l DOMID` with the
/// domain that has that id on that host and presses its power button for
/// `xl trigger DOMID power` (what each does in a real dom0: one host's domains).
fn stand_in_xl(r: &Rig, first: &str, host: &str) -> PathBuf {
    let bin = r.dir.0.join("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    let xl = bin.join("xl");
    let url = &r.sim.url;
    std::fs::write(
        &xl,
        format!(
            "#!/bin/sh\n{first}\ncase \"$1\" in\n\
             list) [ \"$2\" = -l ] || exit 1; exec curl -sf \"{url}/sim/domain?host={host}&domid=$3\" ;;\n\
             trigger) [ \"$3\" = power ] || exit 1; exec curl -sf -X POST \"{url}/sim/acpi_power_button?host={host}&domid=$2\" ;;\n\
             esac\nexit 1\n"
        ),
    )
    .expect("xl");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&xl, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    bin
}

/// The dom0 inventory of the host `host` (a uuid), as /etc/xensource-inventory has it.
fn inventory(r: &Rig, host: &str) -> PathBuf {
    let p = r.dir.0.join("xensource-inventory");
    std::fs::write(
        &p,
        format!("PRODUCT_BRAND='XCP-ng'\nINSTALLATION_UUID='{host}'\n"),
    )
    .expect("inventory");
    p
}

fn dom0_rig(tag: &str, hosts: &[&str]) -> Rig {
    let mut spec = VmSpec::new("win01", &[512 << 10]);
    spec.pv_drivers = false;
    let inv = std::env::temp_dir()
        .join(format!("coldclone-xapi-{tag}-{}", std::process::id()))
        .join("xensource-inventory");
    rig_with_hosts(
        tag,
        spec,
        &format!(
            "xapi_dom0_acpi = true\nxapi_dom0_inventory = \"{}\"\n",
            inv.display()
        ),
        hosts,
    )
}

#[test]
fn xapi_hvm_guest_on_dom0_gets_the_acpi_button_through_xl_trigger() {
    let mut r = dom0_rig("dom0", &[]);
    let here = r.sim.host_uuid("host0").expect("host0");
    inventory(&r, &here);
    let first = format!("echo \"$@\" >> {}/xl.log", r.dir.0.display());
    let bin = stand_in_xl(&r, &first, &here);
    r.path_prefix = Some(bin);
    let (ok, report, stderr) = r.backup();
    assert!(ok, "backup failed: {stderr}\n{report}");
    assert_eq!(
        find(&report, "consistency").and_then(Value::as_str),
        Some("clean-shutdown"),
        "{report}"
    );
    assert_eq!(
        find(&report, "clone_stop").and_then(Value::as_str),
        Some("acpi"),
        "{report}"
    );
    let log = std::fs::read_to_string(r.dir.0.join("xl.log")).expect("xl was run");
    assert!(
        log.starts_with("list -l ")
            && log
                .lines()
                .nth(1)
                .is_some_and(|l| l.starts_with("trigger ") && l.ends_with(" power")),
        "the domain is checked, then its button pressed: {log}"
    );
    let presses = r.sim.state().presses.clone();
    assert_eq!(presses.len(), 1, "{presses:?}");
    assert!(
        presses[0]
            .vm_name
            .as_deref()
            .is_some_and(|n| n.starts_with("coldclone-clone-")),
        "the clone's own domain was pressed: {presses:?}"
    );
    let halted = halted_images(&r.sim);
    let got = restore(&r, "xvda", &r.dir.0.join("xvda.raw"));
    assert!(
        halted.contains(&got),
        "the backup equals the clone's disk after its ACPI shutdown"
    );
    r.assert_clean();
}

#[test]
fn xapi_two_host_pool_clone_on_the_other_host_never_gets_the_local_domid_pressed() {
    // The original runs on host0 (this dom0) as domid 1; VM.resume places the
    // clone on host1, where it is domid 1 too. `xl trigger 1 power` here would
    // power off the original: the path is refused and nothing is pressed.
    let mut r = dom0_rig("pool", &["host1"]);
    let here = r.sim.host_uuid("host0").expect("host0");
    inventory(&r, &here);
    r.sim
        .with_state(|st| st.faults.resume_on_host = Some("host1".into()));
    let bin = stand_in_xl(&r, "", &here);
    r.path_prefix = Some(bin);
    let (ok, report, stderr) = r.backup();
    assert!(!ok, "refused: {report}");
    let text = format!("{report}{stderr}");
    assert!(text.contains("not on this dom0's host"), "{text}");
    assert!(
        r.sim.state().presses.is_empty(),
        "no button pressed: {:?}",
        r.sim.state().presses
    );
    assert!(r
        .sim
        .state()
        .vms
        .values()
        .any(|v| v.name_label == "win01" && v.power_state == "Running"));
    r.assert_clean();

    // coldclone in host1's dom0, the clone on host1: its own domain is pressed.
    let mut r = dom0_rig("pool-b", &["host1"]);
    let there = r.sim.host_uuid("host1").expect("host1");
    inventory(&r, &there);
    r.sim
        .with_state(|st| st.faults.resume_on_host = Some("host1".into()));
    let bin = stand_in_xl(&r, "", &there);
    r.path_prefix = Some(bin);
    let (ok, report, stderr) = r.backup();
    assert!(ok, "backup failed: {stderr}\n{report}");
    let presses = r.sim.state().presses.clone();
    assert_eq!(presses.len(), 1, "{presses:?}");
    assert_eq!(presses[0].host, there);
    assert!(
        presses[0]
            .vm_name
            .as_deref()
            .is_some_and(|n| n.starts_with("coldclone-clone-")),
        "{presses:?}"
    );
    r.assert_clean();
}

#[test]
fn xapi_vm_whose_disk_cannot_be_named_is_refused_before_a_run_starts() {
    let mut spec = VmSpec::new("web01", &[256 << 10, 128 << 10]);
    spec.userdevices = vec!["0".into(), "autodetect".into()];
    let r = rig("unnamed", spec);
    let vbd = {
        let st = r.sim.state();
        st.vbds
            .values()
            .find(|b| b.userdevice == "autodetect")
            .map(|b| b.uuid.clone())
            .expect("the VBD")
    };
    let (ok, report, stderr) = r.backup();
    assert!(!ok, "the run must fail: {report}");
    let text = format!("{report}{stderr}");
    assert!(
        text.contains(&vbd) && text.contains("\"autodetect\""),
        "the error names the VBD and its userdevice: {text}"
    );
    // Refused at inspect: no run journal, no work dir, nothing on the host.
    assert!(
        r.finished_runs().is_empty(),
        "no run was started: {:?}",
        r.finished_runs()
    );
    r.assert_clean();
    assert_eq!(r.snapshots(), Vec::<Value>::new());
    assert!(
        r.sim
            .state()
            .call_log
            .iter()
            .all(|c| c.contains(".get_") || c.starts_with("session.")),
        "only reads were made on the host"
    );
}

/// Every file and folder below `dir` (not `dir` itself) whose mode lets the group or
/// others in.
fn open_to_others(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut bad = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if m.file_type().is_symlink() {
                continue;
            }
            if m.permissions().mode() & 0o077 != 0 {
                bad.push(format!(
                    "{:o} {}",
                    m.permissions().mode(),
                    e.path().display()
                ));
            }
            if m.is_dir() {
                todo.push(e.path());
            }
        }
    }
    bad
}

/// Issue 12, findings 11 and 12: secrets given in the environment reach no child (the
/// stand-in `xl` that coldclone runs for the ACPI button writes out its environment), no
/// output (text, `--json`, `-vv` logs), no journal; what coldclone creates in its state
/// folder and repository is closed to other users (umask 077). A wrong XAPI password
/// fails without echoing it.
#[test]
fn xapi_secrets_reach_no_child_no_output_and_files_are_private() {
    const REPO_PW: &str = "repo-Secret-51d9";
    const XAPI_PW: &str = "xapi-Secret-7c2e";
    const AWS_KEY: &str = "aws-Secret-0b7f";
    let mut spec = VmSpec::new("win02", &[512 << 10]);
    spec.pv_drivers = false;
    let inv = std::env::temp_dir()
        .join(format!("coldclone-xapi-secrets-{}", std::process::id()))
        .join("xensource-inventory");
    let mut r = rig_with(
        "secrets",
        spec,
        &format!(
            "xapi_dom0_acpi = true\nxapi_dom0_inventory = \"{}\"\n",
            inv.display()
        ),
    );
    let here = r.sim.host_uuid("host0").expect("host0");
    inventory(&r, &here);
    r.sim.add_user("probe", XAPI_PW);
    // Secrets from the environment only: no password file, no credentials file.
    let text = std::fs::read_to_string(&r.cfg).expect("config");
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("password_file") && !l.starts_with("xapi_credentials_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&r.cfg, text).expect("config");
    std::fs::remove_dir_all(r.dir.0.join("repo")).expect("old repository");
    let bin = stand_in_xl(
        &r,
        &format!("env > {}/xl-env.txt", r.dir.0.display()),
        &here,
    );
    r.path_prefix = Some(bin.clone());
    let run = |xapi_pw: &str, args: &[&str]| -> Output {
        let path = std::env::var("PATH").unwrap_or_default();
        Command::new(BIN)
            .arg("--config")
            .arg(&r.cfg)
            .args(args)
            .env("PATH", format!("{}:{path}", bin.display()))
            .env("COLDCLONE_PASSWORD", REPO_PW)
            .env("COLDCLONE_XAPI_USERNAME", "probe")
            .env("COLDCLONE_XAPI_PASSWORD", xapi_pw)
            .env("AWS_SECRET_ACCESS_KEY", AWS_KEY)
            .env("RUST_LOG", "debug")
            .output()
            .expect("run coldclone")
    };
    let no_secret = |what: &str, text: &str| {
        for s in [REPO_PW, XAPI_PW, AWS_KEY, "wrong-Secret-93aa"] {
            assert!(!text.contains(s), "{what} shows the secret {s}:\n{text}");
        }
    };
    let o = run(XAPI_PW, &["init"]);
    assert!(
        o.status.success(),
        "init: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = run(XAPI_PW, &["--json", "-vv", "backup"]);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "backup: {out}");
    no_secret("the backup's output", &out);
    let env = std::fs::read_to_string(r.dir.0.join("xl-env.txt")).expect("xl was run");
    no_secret("xl's environment", &env);
    for name in [
        "COLDCLONE_PASSWORD",
        "COLDCLONE_XAPI_PASSWORD",
        "AWS_SECRET_ACCESS_KEY",
    ] {
        assert!(!env.contains(name), "xl inherited {name}:\n{env}");
    }
    // The journals and reports in the state folder.
    let mut todo = vec![r.dir.0.join("state")];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("state").flatten() {
            if e.path().is_dir() {
                todo.push(e.path());
            } else if let Ok(t) = std::fs::read_to_string(e.path()) {
                no_secret(&e.path().display().to_string(), &t);
            }
        }
    }
    for d in ["state", "repo"] {
        let bad = open_to_others(&r.dir.0.join(d));
        assert!(bad.is_empty(), "open to other users under {d}: {bad:#?}");
    }
    let o = run("wrong-Secret-93aa", &["--json", "-vv", "backup"]);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !o.status.success(),
        "a wrong XAPI password must fail: {out}"
    );
    no_secret("the failed backup's output", &out);
    r.assert_clean();
}

/// The original's dynamic memory range on the simulated pool.
fn range_of(sim: &Sim, name: &str) -> (u64, u64) {
    let st = sim.state();
    let v = st
        .vms
        .values()
        .find(|v| v.name_label == name)
        .expect("the original");
    (v.memory_dynamic_min, v.memory_dynamic_max)
}

#[test]
fn xapi_ballooning_through_the_binary_is_undone_on_success_and_after_kill_9() {
    // Larger than the pipeline's 8 MiB slack (the image is a sparse file).
    let mut spec = VmSpec::new("web01", &[512 << 10]);
    spec.memory = 256 << 20;
    let r = rig_with(
        "balloon",
        spec,
        "balloon = { target = \"62%\", floor_mib = 1 }\n",
    );
    let before = range_of(&r.sim, "web01");
    let (ok, report, stderr) = r.backup();
    assert!(ok, "backup failed: {stderr}\n{report}");
    let b = find(&report, "balloon").expect("a balloon report");
    let target = b["target_bytes"].as_u64().expect("target");
    assert!(target < before.1, "{report}");
    assert!(
        b["reached_bytes"].as_u64().is_some_and(|x| x <= target),
        "reached before the checkpoint: {report}"
    );
    let sets = r.sim.state().ranges_set.clone();
    assert_eq!(sets.first().map(|s| s.2), Some(target), "{sets:?}");
    assert_eq!(range_of(&r.sim, "web01"), before, "put back: {sets:?}");
    assert_eq!(
        find(&report, "memory_image_bytes").and_then(Value::as_u64),
        Some(target),
        "the memory image (and the clone) is the ballooned size: {report}"
    );
    r.assert_clean();
    let journal_dir = r.dir.0.join("state/journal");
    for step in ["balloon:requested", "checkpoint:disks-snapshotted"] {
        let ctx = format!("killed at {step}");
        let mut child = r.spawn_backup(Some(step));
        wait_for(&mut child, step, || journal_reached(&journal_dir, step, 1));
        child.kill().expect("kill -9");
        let _ = child.wait();
        r.recover_after_kill(&ctx);
        r.gc_after_kill(&ctx);
        assert_eq!(
            range_of(&r.sim, "web01"),
            before,
            "{ctx}: the range is back"
        );
        r.assert_clean();
    }
}

#[test]
fn xapi_clones_count_against_the_pools_free_memory() {
    // Two 256 MiB VMs on a host with room for one clone beside them: with
    // max_parallel = 2 the scheduler still runs one clone at a time (xapi
    // would refuse the second resume, HOST_NOT_ENOUGH_FREE_MEMORY); a third
    // VM whose clone cannot fit at all is skipped with the reason.
    let mut a = VmSpec::new("web01", &[256 << 10]);
    a.memory = 256 << 20;
    let r = rig("pool-budget", a);
    let mut b = VmSpec::new("web02", &[256 << 10]);
    b.memory = 256 << 20;
    r.sim.add_vm(&b).expect("web02");
    r.sim.set_host_memory("host0", (2 * 256 + 300) << 20);
    let text = std::fs::read_to_string(&r.cfg).expect("config");
    let web1 = text
        .split("[[vm]]")
        .nth(1)
        .expect("the vm table")
        .to_string();
    let text = format!(
        "{}[[vm]]{}",
        text.replacen("[[vm]]", "[run]\nmax_parallel = 2\n[[vm]]", 1),
        web1.replace("name = \"web1\"", "name = \"web2\"")
            .replace("xapi_vm = \"web01\"", "xapi_vm = \"web02\"")
    );
    std::fs::write(&r.cfg, text).expect("config");
    let o = r.run(&["--json", "backup"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let reports: Vec<Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    let ok = reports
        .iter()
        .filter(|v| find(v, "status").and_then(Value::as_str) == Some("ok"))
        .count();
    assert_eq!(ok, 2, "both backed up: {out}");
    assert_eq!(
        r.sim.state().peak_domains,
        3,
        "never two clones at once beside the two originals"
    );
    assert!(out.contains("\"clone_memory_mib\":256"), "{out}");
    r.sim.set_host_memory("host0", (2 * 256 + 100) << 20);
    let o = r.run(&["--json", "backup"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.contains("on the pool at") && out.contains("at most 100 MiB free"),
        "skipped with the reason: {out}"
    );
    let st = r.sim.state();
    assert!(st
        .vms
        .values()
        .all(|v| !v.name_label.starts_with("coldclone-")));
}

/// `count` guest writes of 4 KiB of pseudo-random data at pseudo-random 4 KiB-aligned
/// offsets of web01's disk `userdevice`; returns the bytes written.
fn scribble(r: &Rig, userdevice: &str, size: u64, seed: u64, count: u64) -> u64 {
    let vm = {
        let st = r.sim.state();
        st.vms
            .iter()
            .find(|(_, v)| v.name_label == "web01")
            .map(|(k, _)| k.clone())
            .expect("web01")
    };
    let mut x = seed.wrapping_mul(6364136223846793005) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..count {
        let off = next() % (size / 4096) * 4096;
        let data: Vec<u8> = (0..4096).map(|_| next() as u8).collect();
        r.sim
            .guest_write(&vm, userdevice, off, &data)
            .expect("guest write");
    }
    count * 4096
}

fn disk_report<'a>(report: &'a Value, name: &str) -> &'a Value {
    find(report, "disks")
        .and_then(Value::as_array)
        .and_then(|d| d.iter().find(|d| d["name"] == name))
        .unwrap_or_else(|| panic!("no disk {name} in {report}"))
}

/// One XAPI call as an administrator would make it by hand.
fn by_hand(r: &Rig, method: &str, args: &[Value]) {
    use serde_json::json;
    let s = r
        .sim
        .call(
            "session.login_with_password",
            &[
                json!("root"),
                json!("pool secret"),
                json!("1.0"),
                json!("t"),
            ],
        )
        .expect("login");
    let mut p = vec![s.clone()];
    p.extend_from_slice(args);
    let out = r.sim.call(method, &p);
    r.sim.call("session.logout", &[s]).expect("logout");
    out.unwrap_or_else(|e| panic!("{method}: {e:?}"));
}

#[test]
fn xapi_cbt_incremental_through_the_binary_reads_what_changed_verified() {
    const SIZES: [u64; 2] = [8 << 20, 4 << 20];
    let r = rig("cbt", VmSpec::new("web01", &SIZES));
    let verify = [("COLDCLONE_VERIFY_INCREMENTAL", "1")];
    let run = |ctx: &str| {
        let t = std::time::Instant::now();
        let (ok, report, stderr) = r.backup_env(&verify);
        assert!(ok, "{ctx}: {stderr} {report}");
        let halted = halted_images(&r.sim);
        for (i, disk) in ["xvda", "xvdb"].iter().enumerate() {
            let got = restore(&r, disk, &r.dir.0.join(format!("{disk}-{ctx}-{i}.raw")));
            assert!(
                halted.contains(&got),
                "{ctx}: {disk} restores to its clone's stopped disk"
            );
        }
        r.assert_clean();
        (report, t.elapsed().as_millis())
    };
    // 1. A full read, labelled none; CBT is on and a map kept per disk.
    let (r1, full_ms) = run("first");
    let full: Vec<u64> = ["xvda", "xvdb"]
        .iter()
        .map(|d| {
            let x = disk_report(&r1, d);
            assert_eq!(x["changed_block_map"], "none", "{r1}");
            x["bytes_read"].as_u64().expect("bytes_read")
        })
        .collect();
    assert_eq!(r.kept_maps(), 2);
    // 2. Random writes: the incremental reads the changed blocks only, labelled
    // xapi-cbt, and the verify mode's whole read agreed (else the run fails).
    let w = [
        scribble(&r, "0", SIZES[0], 11, 40),
        scribble(&r, "1", SIZES[1], 12, 10),
    ];
    let (r2, inc_ms) = run("incremental");
    for (i, d) in ["xvda", "xvdb"].iter().enumerate() {
        let x = disk_report(&r2, d);
        assert_eq!(x["changed_block_map"], "xapi-cbt", "{r2}");
        let read = x["bytes_read"].as_u64().expect("bytes_read");
        assert!(
            read < full[i] / 2 && read <= w[i] * 16 + (256 << 10),
            "{d}: read {read} of a full {} for {} written",
            full[i],
            w[i]
        );
        assert!(
            x["verify_bytes_read"]
                .as_u64()
                .is_some_and(|v| v >= full[i]),
            "{d}: verified by a whole read: {x}"
        );
        eprintln!(
            "{d}: full read {} bytes, incremental read {read} bytes for {} bytes written",
            full[i], w[i]
        );
    }
    eprintln!("runs: full {full_ms} ms, incremental {inc_ms} ms (verify on)");
    // /export_raw_vdi goes straight into the repository: nothing under the state folder.
    for rep in [&r1, &r2] {
        assert_eq!(
            find(rep, "scratch_bytes").and_then(Value::as_u64),
            Some(0),
            "{rep}"
        );
    }
    assert_eq!(r.kept_maps(), 2, "the earlier maps are gone");
    // 3. Lost maps: xvda's destroyed by hand, CBT disabled on xvdb: whole reads,
    // labelled none.
    let (map0, vdi1) = {
        let st = r.sim.state();
        let orig = st
            .vms
            .values()
            .find(|v| v.name_label == "web01")
            .expect("web01");
        let vdi_of = |dev: &str| {
            orig.vbds
                .iter()
                .map(|b| &st.vbds[b])
                .find(|b| b.userdevice == dev)
                .map(|b| b.vdi.clone())
                .expect("disk")
        };
        let v0 = vdi_of("0");
        let map0 = st
            .vdis
            .iter()
            .find(|(_, v)| v.kind == xapi_sim::VdiType::CbtMetadata && v.snapshot_of == v0)
            .map(|(k, _)| k.clone())
            .expect("xvda's map");
        (map0, vdi_of("1"))
    };
    by_hand(&r, "VDI.destroy", &[serde_json::json!(map0)]);
    by_hand(&r, "VDI.disable_cbt", &[serde_json::json!(vdi1)]);
    scribble(&r, "0", SIZES[0], 13, 10);
    scribble(&r, "1", SIZES[1], 14, 10);
    let (r3, _) = run("lost");
    for d in ["xvda", "xvdb"] {
        assert_eq!(disk_report(&r3, d)["changed_block_map"], "none", "{r3}");
    }
    // 4. And incremental again after that.
    scribble(&r, "0", SIZES[0], 15, 10);
    let (r4, _) = run("again");
    for d in ["xvda", "xvdb"] {
        assert_eq!(disk_report(&r4, d)["changed_block_map"], "xapi-cbt", "{r4}");
    }
    r.assert_repository_sound("incremental backups");
}

#[test]
fn xapi_streamed_export_cut_mid_transfer_is_asked_again_and_exact() {
    // The first export closes its connection after 300 KiB: the stream asks again from
    // the start and reads on past what the repository already had.
    let r = rig("cut", VmSpec::new("web01", &[1 << 20]));
    r.sim.set_faults(Faults {
        drop_export_after: Some(300 << 10),
        drop_export_count: 1,
        ..Faults::default()
    });
    let (ok, report, stderr) = r.backup();
    assert!(ok, "{stderr} {report}");
    assert!(
        r.sim
            .state()
            .call_log
            .iter()
            .filter(|c| *c == "export_raw_vdi")
            .count()
            >= 2,
        "the export was asked for again"
    );
    let halted = halted_images(&r.sim);
    let got = restore(&r, "xvda", &r.dir.0.join("xvda.raw"));
    assert!(halted.contains(&got), "the backup is exact");
    assert_eq!(
        find(&report, "scratch_bytes").and_then(Value::as_u64),
        Some(0)
    );
    r.assert_clean();
}
