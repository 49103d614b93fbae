//! The real `coldclone` binary against the XAPI simulator (`xapi-sim`): no
//! root, no real XAPI. What the simulator models is in docs/xapi.md.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use xapi_sim::{Faults, Sim, VmSpec};

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
    let d = std::env::temp_dir().join(format!("coldclone-xapi-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("dir");
    let sim = Sim::start(&d.join("sr")).expect("simulator");
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
             xapi_credentials_file = \"{0}/xapi.cred\"\nstop_timeout_secs = 20\n{3}",
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
        let o = self.run(&["--json", "backup"]);
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
        let own: usize = st.vms.values().map(|v| v.vbds.len()).sum();
        assert_eq!(st.vdis.len(), own, "VDIs left");
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
    }
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
    let o = r.run(&["--json", "snapshots"]);
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("web1"),
        "no backup stored"
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
}

#[test]
fn xapi_kill_9_at_every_step_then_recover_leaves_nothing() {
    let r = rig("kill", VmSpec::new("web01", &[512 << 10]));
    let steps = [
        "checkpoint:disks-snapshotted",
        "isolate:bridge-ready",
        "restore:clone-created",
        "restore:memory-loaded",
        "restore:isolation-verified",
        "restore:clone-running",
        "stop:requested",
        "stop:stopped",
        "archive:disk-stored",
    ];
    let journal_dir = r.dir.0.join("state/journal");
    for step in steps {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&r.cfg)
            .args(["--json", "backup"])
            .env("COLDCLONE_TEST_HALT_AT", step)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn coldclone");
        let t = std::time::Instant::now();
        let reached = || {
            std::fs::read_dir(&journal_dir)
                .map(|d| {
                    d.flatten().any(|e| {
                        std::fs::read_to_string(e.path())
                            .unwrap_or_default()
                            .contains(&format!("\"name\":\"{step}\""))
                    })
                })
                .unwrap_or(false)
        };
        while !reached() {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(60),
                "coldclone never reached {step}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        child.kill().expect("kill -9");
        let _ = child.wait();
        let o = r.run(&["--json", "recover"]);
        assert!(
            o.status.success(),
            "recover after a kill at {step}: {} {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        // A killed process cannot log out, nor destroy a task it was waiting on
        // (at most one: its clean-shutdown request); xapi's GC removes both
        // (completed tasks after 65 minutes). Everything journaled is gone already.
        let tasks = r.sim.state().tasks.len();
        assert!(tasks <= 1, "killed at {step}: {tasks} tasks left");
        assert!(
            r.sim.state().tasks.values().all(|t| t.status != "pending"),
            "killed at {step}: a pending task"
        );
        r.sim.gc_completed_tasks_and_idle_sessions();
        r.assert_clean();
        let o = r.run(&["--json", "snapshots"]);
        assert!(
            !String::from_utf8_lossy(&o.stdout).contains("\"web1\""),
            "a killed run left a backup visible (killed at {step})"
        );
    }
    let (ok, report, stderr) = r.backup();
    assert!(ok, "a normal backup still works: {stderr} {report}");
    r.assert_clean();
}

#[test]
fn xapi_hvm_guest_on_dom0_gets_the_acpi_button_through_xl_trigger() {
    let mut spec = VmSpec::new("win01", &[512 << 10]);
    spec.pv_drivers = false;
    let mut r = rig_with("dom0", spec, "xapi_dom0_acpi = true\n");
    // A stand-in for dom0's `xl`: it presses the simulated guest's power button.
    let bin = r.dir.0.join("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    let xl = bin.join("xl");
    std::fs::write(
        &xl,
        format!(
            "#!/bin/sh\necho \"$@\" >> {0}/xl.log\n[ \"$1\" = trigger ] && [ \"$3\" = power ] || exit 1\n\
             exec curl -sf -X POST \"{1}/sim/acpi_power_button?domid=$2\"\n",
            r.dir.0.display(),
            r.sim.url
        ),
    )
    .expect("xl");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&xl, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
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
        log.starts_with("trigger ") && log.trim_end().ends_with(" power"),
        "{log}"
    );
    let halted = halted_images(&r.sim);
    let got = restore(&r, "xvda", &r.dir.0.join("xvda.raw"));
    assert!(
        halted.contains(&got),
        "the backup equals the clone's disk after its ACPI shutdown"
    );
    r.assert_clean();
}
