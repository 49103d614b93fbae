//! The simulator's model against the xen-api behaviours issue 13 names
//! (each from xapi's source; see the comments in src/lib.rs). These are the
//! behaviours the landed simulator got wrong, so that the client built on
//! them failed on a real host.

use serde_json::{json, Value};
use xapi_sim::{Power, Sim, VmSpec, NULL};

struct Gone(std::path::PathBuf);
impl Drop for Gone {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sim(tag: &str) -> (Sim, Gone, Value, String) {
    let d = std::env::temp_dir().join(format!("xapi-sim-sem-{tag}-{}", std::process::id()));
    let sim = Sim::start(&d).expect("sim");
    sim.add_user("root", "pw");
    let (vm, _) = sim.add_vm(&VmSpec::new("a", &[65536, 65536])).expect("vm");
    let s = sim
        .call(
            "session.login_with_password",
            &[json!("root"), json!("pw"), json!("1.0"), json!("t")],
        )
        .expect("login");
    (sim, Gone(d), s, vm)
}

fn call(sim: &Sim, s: &Value, m: &str, args: &[Value]) -> Result<Value, Vec<String>> {
    let mut p = vec![s.clone()];
    p.extend_from_slice(args);
    sim.call(m, &p)
}

#[test]
fn a_clone_of_a_checkpoint_is_halted_and_has_no_memory() {
    // xapi/xapi_vm.ml `clone`: is_a_snapshot && power_state <> Halted → hard_shutdown.
    let (sim, _g, s, vm) = sim("clone");
    let ck = call(&sim, &s, "VM.checkpoint", &[json!(vm), json!("ck")]).expect("checkpoint");
    let c = call(&sim, &s, "VM.clone", &[ck.clone(), json!("c")]).expect("clone");
    let st = sim.state();
    let cv = &st.vms[c.as_str().expect("ref")];
    assert_eq!(cv.power_state, Power::Halted);
    assert_eq!(
        cv.suspend_vdi, NULL,
        "hard_shutdown destroyed the suspend VDI"
    );
    let ckv = &st.vms[ck.as_str().expect("ref")];
    assert_eq!(
        ckv.power_state,
        Power::Suspended,
        "the checkpoint keeps its memory"
    );
    drop(st);
    let e = call(&sim, &s, "VM.resume", &[c, json!(true), json!(false)]).unwrap_err();
    assert_eq!(e[0], "VM_BAD_POWER_STATE", "{e:?}");
}

#[test]
fn checkpoint_disks_are_attached_until_the_checkpoint_is_hard_shut() {
    // xapi/xapi_vdi.ml: VM.checkpoint leaves the snapshot's VBDs currently_attached;
    // `destroy_and_data_destroy_common` answers VDI_IN_USE for them.
    let (sim, _g, s, vm) = sim("attached");
    let ck = call(&sim, &s, "VM.checkpoint", &[json!(vm), json!("ck")]).expect("checkpoint");
    let rec = call(&sim, &s, "VM.get_record", std::slice::from_ref(&ck)).expect("record");
    let vbd = rec["VBDs"][0].clone();
    let b = call(&sim, &s, "VBD.get_record", &[vbd]).expect("vbd");
    assert_eq!(b["currently_attached"], true, "{b}");
    let e = call(&sim, &s, "VDI.destroy", &[b["VDI"].clone()]).unwrap_err();
    assert_eq!(e[0], "VDI_IN_USE");
    // xe's order (xapi-cli-server/cli_operations.ml): hard_shutdown, VM.destroy, VDIs.
    let suspend = rec["suspend_VDI"].clone();
    call(&sim, &s, "VM.hard_shutdown", std::slice::from_ref(&ck)).expect("hard shutdown");
    assert!(
        call(&sim, &s, "VDI.get_record", &[suspend]).is_err(),
        "xapi/xapi_vm.ml `hard_shutdown` destroyed the suspend VDI"
    );
    call(&sim, &s, "VM.destroy", &[ck]).expect("destroy");
    call(&sim, &s, "VDI.destroy", &[b["VDI"].clone()]).expect("now the VDI goes");
}

#[test]
fn vm_create_suspended_needs_its_memory_and_boot_record() {
    // xapi/xapi_vm.ml `create`.
    let (sim, _g, s, vm) = sim("create");
    let ck = call(&sim, &s, "VM.checkpoint", &[json!(vm), json!("ck")]).expect("checkpoint");
    let rec = call(&sim, &s, "VM.get_record", &[ck]).expect("record");
    let mem = call(
        &sim,
        &s,
        "VDI.clone",
        &[rec["suspend_VDI"].clone(), json!({})],
    )
    .expect("clone");
    let base = json!({
        "name_label": "x", "power_state": "Suspended", "suspend_VDI": mem,
        "memory_static_min": rec["memory_static_min"], "memory_static_max": rec["memory_static_max"],
        "memory_dynamic_min": rec["memory_dynamic_min"], "memory_dynamic_max": rec["memory_dynamic_max"],
        "last_booted_record": rec["last_booted_record"], "last_boot_CPU_flags": rec["last_boot_CPU_flags"],
    });
    for missing in ["suspend_VDI", "last_booted_record", "last_boot_CPU_flags"] {
        let mut r = base.clone();
        r.as_object_mut().expect("obj").remove(missing);
        let e = call(&sim, &s, "VM.create", &[r]).unwrap_err();
        assert_eq!(e[0], "VM_BAD_POWER_STATE", "without {missing}: {e:?}");
    }
    let mut strings = base.clone();
    strings["memory_static_max"] = json!("8388608");
    assert_eq!(
        call(&sim, &s, "VM.create", &[strings]).unwrap_err()[0],
        "FIELD_TYPE_ERROR",
        "Int fields are JSON numbers"
    );
    let c = call(&sim, &s, "VM.create", &[base]).expect("created");
    let r = call(&sim, &s, "VM.get_record", std::slice::from_ref(&c)).expect("record");
    assert_eq!(r["power_state"], "Suspended");
    call(
        &sim,
        &s,
        "VM.resume",
        &[c.clone(), json!(true), json!(false)],
    )
    .expect("resumes");
    assert_eq!(
        call(&sim, &s, "VM.get_power_state", &[c]).expect("ps"),
        "Paused"
    );
    let res = sim.state().resumed.clone();
    assert_eq!(
        res[0].cloned_from_checkpoint.as_deref(),
        Some("ck"),
        "{res:?}"
    );
}

#[test]
fn domids_are_numbers_and_per_host() {
    let (sim, _g, s, vm) = sim("domid");
    sim.add_host("host1", "24.19");
    let d = call(&sim, &s, "VM.get_domid", &[json!(vm)]).expect("domid");
    assert!(d.is_i64(), "{d}");
    let mut spec = VmSpec::new("b", &[65536]);
    spec.host = Some("host1".into());
    let (other, _) = sim.add_vm(&spec).expect("vm on host1");
    assert_eq!(
        call(&sim, &s, "VM.get_domid", &[json!(other)]).expect("domid"),
        d,
        "each host counts its own domain ids"
    );
    assert_ne!(
        call(&sim, &s, "VM.get_resident_on", &[json!(vm)]).expect("host"),
        call(&sim, &s, "VM.get_resident_on", &[json!(other)]).expect("host")
    );
}

#[test]
fn busy_refusals_carry_four_parameters_and_bad_tokens_fail() {
    let (sim, _g, s, vm) = sim("busy");
    sim.set_faults(xapi_sim::Faults {
        busy_at: Some(xapi_sim::At::new("VM.unpause", 1)),
        ..Default::default()
    });
    let e = call(&sim, &s, "VM.unpause", &[json!(vm)]).unwrap_err();
    assert_eq!(e[0], "OTHER_OPERATION_IN_PROGRESS");
    assert_eq!(
        e.len(),
        5,
        "code + 4 parameters (xapi_vm_lifecycle.ml): {e:?}"
    );
    let e = call(
        &sim,
        &s,
        "event.from",
        &[json!(["vm"]), json!("12"), json!(0.0)],
    )
    .unwrap_err();
    assert_eq!(e, vec!["EVENT_FROM_TOKEN_PARSE_FAILURE", "12"]);
    let b = call(
        &sim,
        &s,
        "event.from",
        &[json!(["vm"]), json!(""), json!(0.0)],
    )
    .expect("from");
    let t = b["token"].as_str().expect("token").to_string();
    assert!(
        t.len() == 41 && t.as_bytes()[20] == b',',
        "%020Ld,%020Ld: {t}"
    );
    call(
        &sim,
        &s,
        "event.from",
        &[json!(["vm"]), json!(t), json!(0.0)],
    )
    .expect("its own token parses");
}

/// The blocks a base64 CBT bitmap marks (block i: byte i/8, bit 0x80 >> i%8).
fn blocks_of(b64: &Value) -> Vec<u64> {
    use base64::Engine;
    let bits = base64::engine::general_purpose::STANDARD
        .decode(b64.as_str().expect("a string"))
        .expect("base64");
    (0..bits.len() as u64 * 8)
        .filter(|i| bits[(*i / 8) as usize] & (0x80 >> (i % 8)) != 0)
        .collect()
}

#[test]
fn cbt_follows_xapi_and_sm_through_snapshots_data_destroy_and_destroy() {
    // sm libs/sm/VDI.py `_cbt_snapshot`, `list_changed_blocks`, `delete`;
    // xapi/xapi_vdi.ml `check_operation_error`, `_data_destroy`.
    let d = std::env::temp_dir().join(format!("xapi-sim-sem-cbt-{}", std::process::id()));
    let sim = Sim::start(&d).expect("sim");
    let _g = Gone(d);
    sim.add_user("root", "pw");
    let (vm, _) = sim.add_vm(&VmSpec::new("a", &[16 * 65536])).expect("vm");
    let s = sim
        .call(
            "session.login_with_password",
            &[json!("root"), json!("pw"), json!("1.0"), json!("t")],
        )
        .expect("login");
    let disk = {
        let st = sim.state();
        let vbd = st.vms[&vm].vbds.first().cloned().expect("a disk");
        json!(st.vbds[&vbd].vdi.clone())
    };
    call(&sim, &s, "VDI.enable_cbt", std::slice::from_ref(&disk)).expect("enable");
    call(&sim, &s, "VDI.enable_cbt", std::slice::from_ref(&disk)).expect("idempotent");
    let snap = |name: &str| {
        let ck = call(&sim, &s, "VM.checkpoint", &[json!(vm), json!(name)]).expect("checkpoint");
        let rec = call(&sim, &s, "VM.get_record", std::slice::from_ref(&ck)).expect("record");
        let b = call(&sim, &s, "VBD.get_record", &[rec["VBDs"][0].clone()]).expect("vbd");
        (ck, b["VDI"].clone())
    };
    // The checkpoint writes block 0 after its snapshot (4096).
    let (ck1, s1) = snap("one");
    let r = call(&sim, &s, "VDI.get_record", std::slice::from_ref(&s1)).expect("s1");
    assert_eq!(r["cbt_enabled"], true, "a snapshot of a CBT VDI tracks too");
    let e = call(&sim, &s, "VDI.enable_cbt", std::slice::from_ref(&s1)).unwrap_err();
    assert_eq!(e[0], "OPERATION_NOT_ALLOWED", "{e:?}");
    let e = call(&sim, &s, "VDI.data_destroy", std::slice::from_ref(&disk)).unwrap_err();
    assert_eq!(e[0], "OPERATION_NOT_ALLOWED", "not a snapshot: {e:?}");
    let e = call(&sim, &s, "VDI.data_destroy", std::slice::from_ref(&s1)).unwrap_err();
    assert_eq!(e[0], "VDI_IN_USE", "the checkpoint's VBD is there: {e:?}");
    sim.guest_write(&vm, "0", 5 * 65536 + 100, &[1; 70000])
        .expect("write");
    // The leaf is attached to the running original: VDI_IN_USE.
    let e = call(
        &sim,
        &s,
        "VDI.list_changed_blocks",
        &[s1.clone(), disk.clone()],
    )
    .unwrap_err();
    assert_eq!(e[0], "VDI_IN_USE", "{e:?}");
    call(&sim, &s, "VM.hard_shutdown", std::slice::from_ref(&ck1)).expect("shut");
    call(&sim, &s, "VM.destroy", &[ck1]).expect("destroy");
    call(&sim, &s, "VDI.data_destroy", std::slice::from_ref(&s1)).expect("data_destroy");
    call(&sim, &s, "VDI.data_destroy", std::slice::from_ref(&s1)).expect("idempotent");
    let r = call(&sim, &s, "VDI.get_record", std::slice::from_ref(&s1)).expect("s1");
    assert_eq!(r["type"], "cbt_metadata");
    let e = call(&sim, &s, "VDI.clone", &[s1.clone(), json!({})]).unwrap_err();
    assert_eq!(e[0], "VDI_INCOMPATIBLE_TYPE", "{e:?}");
    let (_ck2, s2) = snap("two");
    let got = call(
        &sim,
        &s,
        "VDI.list_changed_blocks",
        &[s1.clone(), s2.clone()],
    )
    .expect("list");
    // Block 0 (the first checkpoint's own write after it), blocks 5-6 (the guest).
    assert_eq!(blocks_of(&got), vec![0, 5, 6]);
    let e = call(
        &sim,
        &s,
        "VDI.list_changed_blocks",
        &[s2.clone(), s1.clone()],
    )
    .unwrap_err();
    assert_eq!(e[0], "SR_BACKEND_FAILURE_460", "backwards: {e:?}");
    // A clone is not tracked; the snapshot's record names its source.
    let c = call(&sim, &s, "VDI.clone", &[s2.clone(), json!({})]).expect("clone");
    let r = call(&sim, &s, "VDI.get_record", &[c]).expect("clone record");
    assert_eq!(r["cbt_enabled"], false);
    let r = call(&sim, &s, "VDI.get_record", std::slice::from_ref(&disk)).expect("disk");
    assert_eq!(r["snapshots"].as_array().map(Vec::len), Some(2), "{r}");
    // Destroying a snapshot merges its bitmap into its child's: s1 → s3 still
    // holds everything since s1.
    let (_ck3, s3) = snap("three");
    sim.guest_write(&vm, "0", 9 * 65536, b"x").expect("write");
    let (_ck4, s4) = snap("four");
    let before = blocks_of(
        &call(
            &sim,
            &s,
            "VDI.list_changed_blocks",
            &[s1.clone(), s4.clone()],
        )
        .expect("list"),
    );
    assert!(before.contains(&9) && before.contains(&5), "{before:?}");
    let _ = s3;
    // Disabling CBT on the disk breaks the chain: every later list fails.
    call(&sim, &s, "VDI.disable_cbt", std::slice::from_ref(&disk)).expect("disable");
    call(&sim, &s, "VDI.enable_cbt", std::slice::from_ref(&disk)).expect("enable again");
    let (_ck5, s5) = snap("five");
    let e = call(&sim, &s, "VDI.list_changed_blocks", &[s4, s5]).unwrap_err();
    assert_eq!(e[0], "SR_BACKEND_FAILURE_460", "{e:?}");
}
