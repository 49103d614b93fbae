//! `coldclone restore VM --as NEW --sr SR [--network NET]` through the real binary
//! against the XAPI simulator (`xapi-sim`): a backup of a simulated VM, then the VM
//! made again from it. No root, no real XAPI (docs/xapi.md says what is simulated).

use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};
use xapi_sim::{At, Faults, Sim, VmSpec};

const BIN: &str = env!("CARGO_BIN_EXE_coldclone");
const SR: &str = "Local storage";
const NET: &str = "Pool-wide network associated with eth0";

struct Rig {
    dir: PathBuf,
    sim: Sim,
    cfg: PathBuf,
    /// The original's ref.
    vm: String,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A pool with web01 (two disks, two NICs) carrying secrets in its record, and one
/// clean-shutdown backup of it.
fn backed_up(tag: &str) -> Rig {
    let dir = std::env::temp_dir().join(format!("coldclone-xrestore-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let sim = Sim::start(&dir.join("sr")).expect("simulator");
    sim.add_user("root", "pool secret");
    let (vm, _) = sim
        .add_vm(&VmSpec::new("web01", &[1 << 20, 512 << 10]))
        .expect("vm");
    sim.with_state(|st| {
        let v = st.vms.get_mut(&vm).expect("the VM");
        v.other_config
            .insert("install-password".into(), "hunter2".into());
        v.other_config.insert("folder".into(), "/prod".into());
        v.other_config
            .insert("mac_seed".into(), "seed-of-the-original".into());
        v.statics.insert(
            "xenstore_data".into(),
            json!({"vm-data/root_pw": "hunter2", "vm-data/hostname": "web01"}),
        );
        v.statics
            .insert("PV_args".into(), json!("console=hvc0 rootpw=hunter2 quiet"));
        v.statics.insert("VCPUs_max".into(), json!(3));
        v.statics.insert("VCPUs_at_startup".into(), json!(2));
        v.statics.insert("generation_id".into(), json!("11:22"));
    });
    if tag == "whole" {
        // An empty CD drive at userdevice 3 (as xe vm-cd-add makes one).
        sim.with_state(|st| {
            let (r, u) = (format!("OpaqueRef:cd-{tag}"), format!("cd-{tag}-uuid"));
            st.vbds.insert(
                r.clone(),
                xapi_sim::Vbd {
                    uuid: u,
                    vm: vm.clone(),
                    vdi: xapi_sim::NULL.into(),
                    userdevice: "3".into(),
                    device: "xvdd".into(),
                    currently_attached: true,
                    mode: "RO".into(),
                    bootable: false,
                    kind: "CD".into(),
                    empty: true,
                },
            );
            if let Some(v) = st.vms.get_mut(&vm) {
                v.vbds.push(r);
            }
        });
    }
    std::fs::write(dir.join("pw"), "pw\n").expect("pw");
    std::fs::write(
        dir.join("xapi.cred"),
        "username = \"root\"\npassword = \"pool secret\"\n",
    )
    .expect("cred");
    let cfg = dir.join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{0}/state\"\n[repository]\npath = \"{0}/repo\"\npassword_file = \"{0}/pw\"\n\
             [[vm]]\nname = \"web1\"\nxapi_url = \"{1}\"\nxapi_vm = \"web01\"\n\
             xapi_credentials_file = \"{0}/xapi.cred\"\nxapi_insecure_http = true\nstop_timeout_secs = 20\n",
            dir.display(),
            sim.url
        ),
    )
    .expect("config");
    let r = Rig { dir, sim, cfg, vm };
    let o = r.run(&["init"]);
    assert!(
        o.status.success(),
        "init: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = r.run(&["--json", "backup"]);
    assert!(
        o.status.success(),
        "backup: {} {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    r
}

impl Rig {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--config")
            .arg(&self.cfg)
            .args(args)
            .env_remove("COLDCLONE_PASSWORD")
            .env_remove("COLDCLONE_XAPI_USERNAME")
            .env_remove("COLDCLONE_XAPI_PASSWORD")
            .output()
            .expect("run coldclone")
    }

    fn restore_as(&self, name: &str, network: Option<&str>) -> Output {
        let mut args = vec!["--json", "restore", "web1", "--as", name, "--sr", SR];
        if let Some(n) = network {
            args.extend(["--network", n]);
        }
        self.run(&args)
    }

    /// The archived bytes of a disk, through the disk-only restore.
    fn archived(&self, disk: &str) -> Vec<u8> {
        let to = self.dir.join(format!("{disk}.raw"));
        let _ = std::fs::remove_file(&to);
        let o = self.run(&[
            "restore",
            "web1",
            "--disk",
            disk,
            "--to",
            &to.display().to_string(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read(&to).expect("restored file")
    }

    fn vms_named(&self, name: &str) -> Vec<String> {
        self.sim
            .state()
            .vms
            .iter()
            .filter(|(_, v)| v.name_label == name)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// No half-made VM: every VM is the original or a whole restored VM named in
    /// `complete`; no VDI is outside a VM (the original's and the restored ones'), none
    /// carries a working name; no task is left; no session is left.
    fn assert_no_half_vm(&self, complete: &BTreeSet<String>, ctx: &str) {
        let st = self.sim.state();
        for (r, v) in &st.vms {
            if *r == self.vm {
                continue;
            }
            assert!(
                complete.contains(&v.name_label),
                "{ctx}: a VM {:?} that is no finished restore",
                v.name_label
            );
            assert_eq!(v.power_state, "Halted", "{ctx}");
            let disks = v
                .vbds
                .iter()
                .filter(|b| st.vbds.get(*b).is_some_and(|b| b.kind == "Disk"))
                .count();
            assert_eq!(disks, 2, "{ctx}: {} has all its disks", v.name_label);
        }
        let attached: BTreeSet<&String> = st.vbds.values().map(|b| &b.vdi).collect();
        for (r, d) in &st.vdis {
            // The backup's kept changed-block maps (metadata only, by design in no VM).
            if d.kind == xapi_sim::VdiType::CbtMetadata {
                continue;
            }
            assert!(
                attached.contains(r),
                "{ctx}: VDI {:?} is in no VM",
                d.name_label
            );
            assert!(
                !d.name_label.contains("coldclone-restoring"),
                "{ctx}: {:?}",
                d.name_label
            );
        }
        assert!(
            st.tasks.is_empty(),
            "{ctx}: tasks left: {:?}",
            st.tasks.values().map(|t| &t.name_label).collect::<Vec<_>>()
        );
        assert!(st.sessions.is_empty(), "{ctx}: sessions left");
    }
}

fn report(o: &Output) -> Value {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or(Value::Null)
}

#[test]
fn xapi_restore_makes_the_vm_again_with_the_archived_bytes_new_macs_and_no_secrets() {
    let r = backed_up("whole");
    // The kept definition: a XAPI VM record, shown by snapshots --json, no secret in it.
    let o = r.run(&["--json", "snapshots"]);
    assert!(o.status.success());
    let snaps: Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let kept = &snaps[0]["vm_config"];
    assert_eq!(kept["kind"], "xapi-vm-record", "{snaps}");
    let text = kept["text"].as_str().expect("its text");
    assert!(
        !text.contains("hunter2") && !text.contains("seed-of-the-original"),
        "{text}"
    );
    assert!(text.contains("/prod"), "harmless settings are kept: {text}");
    let def: Value = serde_json::from_str(text).expect("the definition is JSON");
    assert_eq!(
        def["vbds"].as_array().map(Vec::len),
        Some(3),
        "two disks, a CD: {def}"
    );
    assert_eq!(def["vifs"].as_array().map(Vec::len), Some(2), "{def}");
    assert_eq!(def["vifs"][0]["network_name_label"], NET, "{def}");

    let o = r.restore_as("web1-restored", Some(NET));
    assert!(
        o.status.success(),
        "restore: {} {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let rep = report(&o);
    assert_eq!(rep["power_state"], "Halted", "{rep}");
    let made = r.vms_named("web1-restored");
    assert_eq!(made.len(), 1, "one new VM");
    let (xvda, xvdb) = (r.archived("xvda"), r.archived("xvdb"));
    {
        let st = r.sim.state();
        let orig = &st.vms[&r.vm];
        let new = &st.vms[&made[0]];
        assert_eq!(new.power_state, "Halted");
        assert_ne!(new.uuid, orig.uuid);
        assert_eq!(rep["uuid"], new.uuid.as_str(), "{rep}");
        for (a, b) in [
            (new.memory_static_max, orig.memory_static_max),
            (new.memory_static_min, orig.memory_static_min),
            (new.memory_dynamic_max, orig.memory_dynamic_max),
            (new.memory_dynamic_min, orig.memory_dynamic_min),
        ] {
            assert_eq!(a, b, "memory as the original's");
        }
        assert_eq!(new.statics["VCPUs_max"], json!(3));
        assert_eq!(new.statics["VCPUs_at_startup"], json!(2));
        assert_eq!(
            new.statics["PV_args"],
            json!("console=hvc0 rootpw=removed-by-coldclone quiet")
        );
        assert_eq!(new.statics["xenstore_data"], json!({}));
        let genid = new.statics["generation_id"].as_str().unwrap_or("");
        assert!(
            genid != "11:22" && genid.contains(':'),
            "a fresh generation id: {genid}"
        );
        assert_eq!(
            new.other_config.get("folder").map(String::as_str),
            Some("/prod")
        );
        assert!(!new.other_config.contains_key("install-password"));
        assert_ne!(
            new.other_config.get("mac_seed").map(String::as_str),
            Some("seed-of-the-original")
        );
        // Its disks: the archived bytes, on the devices the original had them.
        let mut by_dev = std::collections::BTreeMap::new();
        let cds: Vec<&xapi_sim::Vbd> = new
            .vbds
            .iter()
            .map(|b| &st.vbds[b])
            .filter(|b| b.kind == "CD")
            .collect();
        assert_eq!(cds.len(), 1, "the CD drive is back");
        assert!(cds[0].empty && cds[0].mode == "RO" && cds[0].userdevice == "3");
        for b in new.vbds.iter().filter(|b| st.vbds[*b].kind == "Disk") {
            let vbd = &st.vbds[b];
            let vdi = &st.vdis[&vbd.vdi];
            assert!(
                vdi.name_label.starts_with("web1-restored "),
                "{}",
                vdi.name_label
            );
            by_dev.insert(
                vbd.userdevice.clone(),
                (std::fs::read(&vdi.file).expect("VDI file"), vbd.bootable),
            );
        }
        assert!(by_dev["0"].0 == xvda, "xvda holds the archived bytes");
        assert!(by_dev["1"].0 == xvdb, "xvdb holds the archived bytes");
        assert!(
            by_dev["0"].1 && !by_dev["1"].1,
            "bootable as the original's"
        );
        // Its NICs: on the named network, new MACs.
        let old: BTreeSet<&String> = orig.vifs.iter().map(|v| &st.vifs[v].mac).collect();
        let new_macs: BTreeSet<&String> = new.vifs.iter().map(|v| &st.vifs[v].mac).collect();
        assert_eq!(new_macs.len(), 2, "two NICs, two MACs");
        assert!(old.is_disjoint(&new_macs), "new MACs: {old:?} {new_macs:?}");
        let net = st
            .networks
            .iter()
            .find(|(_, n)| n.name_label == NET)
            .map(|(k, _)| k.clone());
        assert!(new
            .vifs
            .iter()
            .all(|v| Some(&st.vifs[v].network) == net.as_ref()));
    }
    assert_eq!(rep["nics"].as_array().map(Vec::len), Some(2), "{rep}");
    // Without --network: no NIC, and the report says so.
    let o = r.restore_as("web1-isolated", None);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rep = report(&o);
    let iso = r.vms_named("web1-isolated");
    assert_eq!(iso.len(), 1);
    assert!(
        r.sim.state().vms[&iso[0]].vifs.is_empty(),
        "no NIC without --network"
    );
    assert!(rep["notes"].to_string().contains("no network"), "{rep}");
    // The name is taken now: refused, nothing made.
    let before = r.sim.state().vdis.len();
    let o = r.restore_as("web1-restored", None);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already has a VM named"));
    assert_eq!(r.sim.state().vdis.len(), before);
    // A SR or network that is not there: refused before anything is made.
    let o = r.run(&["restore", "web1", "--as", "x1", "--sr", "no such SR"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no SR \"no such SR\""));
    let o = r.restore_as("x2", Some("no such net"));
    assert!(!o.status.success());
    assert_eq!(r.sim.state().vdis.len(), before);
    let complete: BTreeSet<String> = ["web1-restored", "web1-isolated"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    r.assert_no_half_vm(&complete, "after the restores");
}

#[test]
fn xapi_restore_failing_at_any_call_or_mid_import_leaves_no_half_vm() {
    let r = backed_up("faults");
    let mut complete = BTreeSet::new();
    // The calls a good restore makes.
    let from = r.sim.calls() as usize;
    let o = r.restore_as("good", Some(NET));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    complete.insert("good".to_string());
    let calls: Vec<At> = r.sim.call_sequence()[from..].to_vec();
    assert!(calls.iter().any(|a| a.method == "import_raw_vdi"));
    assert!(calls.iter().any(|a| a.method == "VM.create"));
    // Each call of it failing in turn, numbered as in a run of its own.
    let mut fired = 0;
    for (i, call) in calls.iter().enumerate() {
        let seen = r.sim.call_sequence();
        let base = seen.iter().filter(|a| a.method == call.method).count() as u64;
        let nth = calls[..=i]
            .iter()
            .filter(|a| a.method == call.method)
            .count() as u64;
        let at = At::new(&call.method, base + nth);
        r.sim.set_faults(Faults {
            fail_at: Some(at.clone()),
            ..Faults::default()
        });
        let name = format!("r{i}");
        let o = r.restore_as(&name, Some(NET));
        let hit = r.sim.fired().iter().any(|f| f.at == at);
        r.sim.set_faults(Faults::default());
        r.sim.with_state(|st| st.fired.clear());
        let ctx = format!("fault at {at}");
        // Best-effort calls after the VM is whole: the restore stands.
        let harmless = ["session.logout", "task.destroy"].contains(&call.method.as_str());
        if hit && !harmless {
            fired += 1;
            assert!(!o.status.success(), "{ctx}: the restore must fail");
            assert!(r.vms_named(&name).is_empty(), "{ctx}: no VM of the name");
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                err.contains("error:") && !err.contains("panicked"),
                "{ctx}: {err}"
            );
        } else if o.status.success() {
            complete.insert(name.clone());
        }
        r.assert_no_half_vm(&complete, &ctx);
    }
    assert!(fired > 15, "the sweep hit the restore's calls ({fired})");
    // The host loses its storage in the middle of a disk's bytes.
    r.sim.set_faults(Faults {
        fail_import_after: Some(256 << 10),
        ..Faults::default()
    });
    let o = r.restore_as("cut", Some(NET));
    r.sim.set_faults(Faults::default());
    assert!(!o.status.success(), "a cut import fails the restore");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("VDI_IO_ERROR") || err.contains("import"),
        "{err}"
    );
    assert!(r.vms_named("cut").is_empty());
    r.assert_no_half_vm(&complete, "after a cut import");
    // A damaged repository: a byte flipped in the middle of every pack. The chunk read
    // fails in the middle of the upload; the restore fails, saying so, and leaves nothing.
    let mut stack = vec![r.dir.join("repo/data")];
    let mut flipped = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let mut bytes = std::fs::read(&p).expect("pack");
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0x55;
                std::fs::write(&p, &bytes).expect("pack");
                flipped += 1;
            }
        }
    }
    assert!(flipped > 0, "no packs");
    let o = r.restore_as("damaged", Some(NET));
    assert!(
        !o.status.success(),
        "a damaged backup is not restored as good"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("repository") || err.contains("chunk"), "{err}");
    assert!(r.vms_named("damaged").is_empty());
    r.assert_no_half_vm(&complete, "after a damaged chunk");
}

#[test]
fn xapi_restore_killed_mid_import_leaves_only_clearly_named_objects() {
    let r = backed_up("kill");
    let before: BTreeSet<String> = r.sim.state().vdis.keys().cloned().collect();
    r.sim.set_faults(Faults {
        hold_imports: true,
        ..Faults::default()
    });
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&r.cfg)
        .args([
            "restore",
            "web1",
            "--as",
            "killed",
            "--sr",
            SR,
            "--network",
            NET,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let t = std::time::Instant::now();
    while r.sim.state().imports_held == 0 {
        assert!(
            child.try_wait().ok().flatten().is_none(),
            "the restore ended before its import"
        );
        assert!(t.elapsed().as_secs() < 120, "no import within 120 s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().expect("kill -9");
    let _ = child.wait();
    r.sim.set_faults(Faults::default());
    // Nothing under the new name; what was made carries the working name.
    assert!(r.vms_named("killed").is_empty());
    let st = r.sim.state();
    let left: Vec<&String> = st
        .vdis
        .iter()
        .filter(|(k, _)| !before.contains(*k))
        .map(|(_, v)| &v.name_label)
        .collect();
    assert!(!left.is_empty(), "the VDI being imported is there");
    assert!(
        left.iter()
            .all(|n| n.starts_with("coldclone-restoring-") && n.ends_with("-killed-xvda")),
        "{left:?}"
    );
    assert_eq!(st.vms.len(), 1, "no VM was made before the disks");
}
