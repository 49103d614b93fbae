//! coldclone's wire test vectors (tests/vectors/xapi-24.json, written from
//! xen-api's own JSON-RPC fixtures) against the simulator: for each vector
//! with a `sim` call, the simulator's answer over HTTP must have the types the
//! vector expects at each field (and the same error description).

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use xapi_sim::{Sim, VmSpec};

fn post(sim: &Sim, body: &str) -> Value {
    let mut s = TcpStream::connect(sim.addr).expect("connect");
    write!(
        s,
        "POST /jsonrpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let body = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
    serde_json::from_str(body).expect("the simulator answers JSON")
}

fn wire_type(v: &Value) -> &'static str {
    match v {
        Value::String(s) if s.starts_with("OpaqueRef:") => "ref",
        Value::String(s)
            if s.len() == 41
                && s.split(',')
                    .all(|p| p.len() == 20 && p.bytes().all(|b| b.is_ascii_digit())) =>
        {
            "token"
        }
        Value::String(_) => "string",
        Value::Number(n) if n.is_i64() || n.is_u64() => "int",
        Value::Number(_) => "float",
        Value::Bool(_) => "bool",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
        Value::Null => "null",
    }
}

#[test]
fn the_simulator_answers_with_the_vectors_types() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/xapi-24.json"),
    )
    .expect("vectors");
    let vs: Value = serde_json::from_str(&text).expect("json");
    let d = std::env::temp_dir().join(format!("xapi-sim-vectors-{}", std::process::id()));
    let sim = Sim::start(&d).expect("sim");
    sim.add_user("root", "pw");
    let (vm, _) = sim.add_vm(&VmSpec::new("v", &[65536])).expect("vm");
    let session = post(
        &sim,
        r#"{"jsonrpc":"2.0","method":"session.login_with_password","params":["root","pw","1.0","t"],"id":1}"#,
    )["result"]
        .clone();
    let (pool, host) = {
        let st = sim.state();
        (st.pool.clone(), st.master.clone())
    };
    let mut run = 0;
    for v in vs["vectors"].as_array().expect("list") {
        let Some(call) = v.get("sim") else { continue };
        let name = v["name"].as_str().unwrap_or("?");
        let args: Vec<Value> = call["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(|a| match a.as_str() {
                Some("$session") => session.clone(),
                Some("$vm") => json!(vm),
                Some("$pool") => json!(pool),
                Some("$host") => json!(host),
                _ => a.clone(),
            })
            .collect();
        let req = json!({"jsonrpc": "2.0", "method": call["method"], "params": args, "id": 7});
        let got = post(&sim, &req.to_string());
        let want = &v["expect"];
        if let Some(err) = want.get("error") {
            let e = &got["error"];
            let mut desc = vec![e["message"].clone()];
            desc.extend(e["data"].as_array().cloned().unwrap_or_default());
            assert_eq!(&Value::Array(desc), err, "{name}: {got}");
        } else {
            let r = &got["result"];
            assert!(!r.is_null(), "{name}: {got}");
            for (ptr, ty) in want["types"].as_object().into_iter().flatten() {
                let at = r
                    .pointer(ptr)
                    .unwrap_or_else(|| panic!("{name}: the simulator has no {ptr}: {r}"));
                assert_eq!(
                    wire_type(at),
                    ty.as_str().unwrap_or(""),
                    "{name}: {ptr} = {at}"
                );
            }
        }
        run += 1;
    }
    drop(sim);
    let _ = std::fs::remove_dir_all(&d);
    let with_sim = vs["vectors"]
        .as_array()
        .map(|a| a.iter().filter(|v| v.get("sim").is_some()).count())
        .unwrap_or(0);
    assert!(
        run == with_sim && run >= 9,
        "{run} vectors run against the simulator"
    );
}
