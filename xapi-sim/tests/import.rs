//! The simulator's `PUT /import_raw_vdi` and the restore calls against what
//! xen-api's source says (xapi/import_raw_vdi.ml `localhost_handler`, xapi_vdi.ml
//! `create`, xapi_vif_helpers.ml `create`, xapi_vbd.ml `create`, xapi_vm.ml `create`),
//! spoken over raw TCP so that each part of the HTTP exchange can be chosen.

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use xapi_sim::{Sim, VmSpec, NULL};

struct Gone(std::path::PathBuf);
impl Drop for Gone {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sim(tag: &str) -> (Sim, Gone, Value) {
    let d = std::env::temp_dir().join(format!("xapi-sim-imp-{tag}-{}", std::process::id()));
    let sim = Sim::start(&d).expect("sim");
    sim.add_user("root", "pw");
    sim.add_vm(&VmSpec::new("a", &[65536])).expect("vm");
    let s = sim
        .call(
            "session.login_with_password",
            &[json!("root"), json!("pw"), json!("1.0"), json!("t")],
        )
        .expect("login");
    (sim, Gone(d), s)
}

fn call(sim: &Sim, s: &Value, m: &str, args: &[Value]) -> Result<Value, Vec<String>> {
    let mut p = vec![s.clone()];
    p.extend_from_slice(args);
    sim.call(m, &p)
}

fn new_vdi(sim: &Sim, s: &Value, size: u64) -> String {
    let sr = sim.state().sr.clone();
    let r = call(
        sim,
        s,
        "VDI.create",
        &[
            json!({"name_label": "n", "SR": sr, "virtual_size": size, "type": "user",
                 "sharable": false, "read_only": false, "other_config": {}}),
        ],
    )
    .expect("VDI.create");
    r.as_str().expect("ref").to_string()
}

/// One PUT with these headers and body; the answer's status line, and the task's
/// status and error after the exchange.
fn put(
    sim: &Sim,
    s: &Value,
    vdi: &str,
    headers: &str,
    body: &[u8],
) -> (String, String, Vec<String>) {
    let task = call(sim, s, "task.create", &[json!("t"), json!("d")]).expect("task");
    let task = task.as_str().expect("ref").to_string();
    let mut c = TcpStream::connect(sim.addr).expect("connect");
    let head = format!(
        "PUT /import_raw_vdi?session_id={}&task_id={task}&vdi={vdi}&format=raw HTTP/1.1\r\nhost: x\r\n{headers}\r\n",
        s.as_str().unwrap_or_default()
    );
    c.write_all(head.as_bytes()).expect("head");
    let _ = c.write_all(body);
    let _ = c.shutdown(std::net::Shutdown::Write);
    let mut answer = String::new();
    let _ = c.read_to_string(&mut answer);
    let status = answer.lines().next().unwrap_or_default().to_string();
    let rec = call(sim, s, "task.get_record", &[json!(task)]).expect("task record");
    let info = rec["error_info"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    (
        status,
        rec["status"].as_str().unwrap_or_default().to_string(),
        info,
    )
}

#[test]
fn an_import_writes_content_length_bytes_and_only_the_task_says_it_landed() {
    let (sim, _g, s) = sim("ok");
    let vdi = new_vdi(&sim, &s, 128 << 10);
    let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let (status, task, _) = put(
        &sim,
        &s,
        &vdi,
        &format!("content-length: {}\r\n", body.len()),
        &body,
    );
    assert!(status.contains("200"), "{status}");
    assert_eq!(task, "success");
    let file = sim.state().vdis[&vdi].file.clone();
    let data = std::fs::read(file).expect("the VDI's data");
    assert_eq!(&data[..body.len()], &body[..]);
    assert!(data[body.len()..].iter().all(|b| *b == 0));

    // A short body: the 200 came first, the task fails (vhd-tool copies content-length).
    let vdi2 = new_vdi(&sim, &s, 128 << 10);
    let (status, task, info) = put(&sim, &s, &vdi2, "content-length: 100000\r\n", &body[..5000]);
    assert!(
        status.contains("200"),
        "the answer precedes the body: {status}"
    );
    assert_eq!(task, "failure");
    assert_eq!(info[0], "VDI_IO_ERROR", "{info:?}");
    // More than the VDI holds: fails on a write.
    let big = vec![1u8; 200 << 10];
    let (_, task, _) = put(
        &sim,
        &s,
        &vdi2,
        &format!("content-length: {}\r\n", big.len()),
        &big,
    );
    assert_eq!(task, "failure");
    // HTTP chunked encoding is refused (the `chunked` query parameter is xapi's own
    // format, not this).
    let (status, task, info) = put(
        &sim,
        &s,
        &vdi2,
        "transfer-encoding: chunked\r\n",
        b"5\r\nhello\r\n0\r\n\r\n",
    );
    assert!(status.contains("404"), "{status}");
    assert_eq!(task, "failure");
    assert!(
        info.iter().any(|i| i.contains("Cannot handle encoding")),
        "{info:?}"
    );
    // No session: 401.
    let mut c = TcpStream::connect(sim.addr).expect("connect");
    c.write_all(
        format!("PUT /import_raw_vdi?vdi={vdi} HTTP/1.1\r\ncontent-length: 0\r\n\r\n").as_bytes(),
    )
    .expect("write");
    let mut a = String::new();
    let _ = c.read_to_string(&mut a);
    assert!(a.starts_with("HTTP/1.1 401"), "{a}");
    // A VDI a running domain holds: VDI_IN_USE.
    let held = sim
        .state()
        .vbds
        .values()
        .next()
        .map(|b| b.vdi.clone())
        .expect("a disk");
    let (_, task, info) = put(&sim, &s, &held, "content-length: 4\r\n", b"abcd");
    assert_eq!((task.as_str(), info[0].as_str()), ("failure", "VDI_IN_USE"));
}

#[test]
fn restore_calls_follow_xapi_macs_cds_and_vdi_types() {
    let (sim, _g, s) = sim("calls");
    let sr = sim.state().sr.clone();
    // xapi_vdi.ml `create`: no cbt_metadata VDIs.
    let e = call(
        &sim,
        &s,
        "VDI.create",
        &[json!({"name_label": "x", "SR": sr, "virtual_size": 4096, "type": "cbt_metadata"})],
    )
    .unwrap_err();
    assert_eq!(e[0], "VDI_INCOMPATIBLE_TYPE");
    let rec = json!({"name_label": "n", "memory_static_min": 1, "memory_static_max": 2,
                     "memory_dynamic_min": 2, "memory_dynamic_max": 2, "other_config": {}});
    let vm = call(&sim, &s, "VM.create", std::slice::from_ref(&rec)).expect("VM.create");
    let vm2 = call(&sim, &s, "VM.create", &[rec]).expect("VM.create");
    // xapi_vm.ml `create`: a mac_seed of its own for each VM.
    let seeds: Vec<String> = [&vm, &vm2]
        .iter()
        .map(|v| sim.state().vms[v.as_str().unwrap_or_default()].other_config["mac_seed"].clone())
        .collect();
    assert_ne!(seeds[0], seeds[1]);
    let net = sim
        .state()
        .networks
        .keys()
        .next()
        .cloned()
        .expect("a network");
    let vif = |vm: &Value, dev: &str, mac: &str| {
        call(
            &sim,
            &s,
            "VIF.create",
            &[json!({"device": dev, "network": net, "VM": vm, "MAC": mac, "MTU": 1500})],
        )
    };
    // xapi_vif_helpers.ml `create`: an empty MAC from the seed and the device.
    let a0 = vif(&vm, "0", "").expect("vif");
    let a1 = vif(&vm, "1", "").expect("vif");
    let b0 = vif(&vm2, "0", "").expect("vif");
    let mac = |r: &Value| sim.state().vifs[r.as_str().unwrap_or_default()].mac.clone();
    let (m0, m1, n0) = (mac(&a0), mac(&a1), mac(&b0));
    assert!(m0 != m1 && m0 != n0, "{m0} {m1} {n0}");
    let first = u8::from_str_radix(&m0[..2], 16).expect("hex");
    assert_eq!(first & 3, 2, "locally administered, unicast: {m0}");
    assert_eq!(vif(&vm, "x", "").unwrap_err()[0], "INVALID_DEVICE");
    assert_eq!(vif(&vm, "2", "zz:00").unwrap_err()[0], "MAC_INVALID");
    // xapi_vbd.ml `create`: an empty CD is RO; only a CD may be empty.
    let vbd = |kind: &str, mode: &str, empty: bool| {
        call(
            &sim,
            &s,
            "VBD.create",
            &[
                json!({"VM": vm, "VDI": NULL, "userdevice": "3", "type": kind,
                                                "mode": mode, "empty": empty, "bootable": false}),
            ],
        )
    };
    assert_eq!(
        vbd("CD", "RW", true).unwrap_err()[0],
        "VBD_CDS_MUST_BE_READONLY"
    );
    assert_eq!(
        vbd("Disk", "RW", true).unwrap_err()[0],
        "VBD_NOT_REMOVABLE_MEDIA"
    );
    let cd = vbd("CD", "RO", true).expect("an empty CD");
    let r = call(&sim, &s, "VBD.get_record", &[cd]).expect("record");
    assert_eq!(
        (r["type"].as_str(), r["empty"].as_bool()),
        (Some("CD"), Some(true))
    );
    call(
        &sim,
        &s,
        "VM.set_name_label",
        &[vm.clone(), json!("renamed")],
    )
    .expect("rename");
    assert_eq!(
        sim.state().vms[vm.as_str().unwrap_or_default()].name_label,
        "renamed"
    );
}
