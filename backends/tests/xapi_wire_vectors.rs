//! coldclone's wire test vectors (xapi-sim/tests/vectors/xapi-24.json, written
//! from xen-api's own JSON-RPC fixtures) against the client's decoding: each
//! vector's raw body is what a host answers over HTTP, and the client must
//! read from it the types, values and error descriptions the vector expects.
//! The same vectors are run against the simulator's answers in
//! xapi-sim/tests/wire_vectors.rs.

use coldclone_backends::xapi::client::{u64_field, value_u64, Client, XapiTarget};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;

fn vectors() -> Vec<Value> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../xapi-sim/tests/vectors/xapi-24.json");
    let text = std::fs::read_to_string(&p).expect("vectors");
    let v: Value = serde_json::from_str(&text).expect("vectors are JSON");
    v["vectors"].as_array().expect("a list").clone()
}

/// A host that answers a login, a logout, and everything else with `body`.
fn host(login: String, body: String) -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", l.local_addr().expect("addr"));
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let (login, body) = (login.clone(), body.clone());
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().expect("clone"));
                let mut w = conn;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut len = 0;
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 {
                            return;
                        }
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            if k.eq_ignore_ascii_case("content-length") {
                                len = v.trim().parse().unwrap_or(0);
                            }
                        }
                    }
                    let mut req = vec![0u8; len];
                    if r.read_exact(&mut req).is_err() {
                        return;
                    }
                    let req: Value = serde_json::from_slice(&req).unwrap_or(Value::Null);
                    let out = match req["method"].as_str() {
                        Some("session.login_with_password") => login.clone(),
                        Some("session.logout") => {
                            json!({"jsonrpc": "2.0", "result": "", "id": req["id"]}).to_string()
                        }
                        _ => body.clone(),
                    };
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        out.len()
                    );
                    if w.write_all(head.as_bytes())
                        .and_then(|_| w.write_all(out.as_bytes()))
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    url
}

/// A JSON value's wire type as the vectors name it.
pub fn wire_type(v: &Value) -> &'static str {
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
fn the_client_decodes_every_wire_vector_as_it_expects() {
    let vs = vectors();
    let login = vs
        .iter()
        .find(|v| v["name"] == "session_login")
        .and_then(|v| v["response"].as_str())
        .expect("a login vector")
        .to_string();
    let dir = std::env::temp_dir().join(format!("cc-wire-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let creds = dir.join("cred");
    std::fs::write(&creds, "username = \"root\"\npassword = \"x\"\n").expect("creds");
    let mut checked = 0;
    for v in &vs {
        let name = v["name"].as_str().unwrap_or("?");
        let body = v["response"].as_str().expect("raw body").to_string();
        let url = host(login.clone(), body);
        let c = Client::login(&XapiTarget {
            url,
            credentials_file: Some(creds.clone()),
            tls_fingerprint_sha256: None,
            insecure_http: true,
        })
        .unwrap_or_else(|e| panic!("{name}: login: {e}"));
        let method = v["method"].as_str().expect("method");
        let got = if method == "session.login_with_password" {
            Ok(json!("OpaqueRef:12345678-4d8a-e4a9-a241-1ea05c1d6707"))
        } else {
            c.call(method, vec![json!("OpaqueRef:x")])
        };
        let want = &v["expect"];
        if let Some(err) = want.get("error") {
            let e = got.expect_err(&format!("{name}: an error"));
            let want: Vec<String> = serde_json::from_value(err.clone()).expect("strings");
            assert_eq!(e.description(), Some(want), "{name}: {e}");
        } else {
            let got = got.unwrap_or_else(|e| panic!("{name}: {e}"));
            for (ptr, ty) in want["types"].as_object().into_iter().flatten() {
                let at = got
                    .pointer(ptr)
                    .unwrap_or_else(|| panic!("{name}: no {ptr} in {got}"));
                assert_eq!(
                    wire_type(at),
                    ty.as_str().unwrap_or(""),
                    "{name}: {ptr} = {at}"
                );
            }
            for (ptr, n) in want["u64"].as_object().into_iter().flatten() {
                let at = got.pointer(ptr).expect("field");
                assert_eq!(value_u64(at), n.as_u64(), "{name}: {ptr}");
                if let Some((parent, key)) = ptr.rsplit_once('/') {
                    let p = if parent.is_empty() {
                        &got
                    } else {
                        got.pointer(parent).expect("parent")
                    };
                    assert_eq!(
                        Some(u64_field(p, key)),
                        n.as_u64(),
                        "{name}: u64_field {ptr}"
                    );
                }
            }
            for (ptr, s) in want["str"].as_object().into_iter().flatten() {
                assert_eq!(got.pointer(ptr), Some(s), "{name}: {ptr}");
            }
        }
        checked += 1;
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(checked, vs.len());
    assert!(checked >= 15, "{checked} vectors");
}
