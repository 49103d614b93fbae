//! TLS to XAPI: a host with a self-signed certificate (XAPI's default) is
//! refused unless its SHA-256 fingerprint is pinned, and then only that
//! certificate is accepted. The simulator sits behind a small TLS-terminating
//! proxy with a certificate made by `openssl` for the test.

use coldclone_backends::{self as cb, VmLocator};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use xapi_sim::{Sim, VmSpec};

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `openssl` (installed: the caller has required it); a failure fails the test.
fn openssl(args: &[&str]) -> String {
    let o = Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("openssl {args:?}: {e}"));
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// One request per connection (the simulator closes after each): read it
/// from TLS, hand it to the simulator, send back all it answers. A connection
/// that fails here (a refused handshake) is dropped: the client sees the
/// failure, and the test checks what the client says.
fn proxy(tls: Arc<rustls::ServerConfig>, backend: std::net::SocketAddr) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { continue };
            let tls = tls.clone();
            std::thread::spawn(move || {
                let Ok(sc) = rustls::ServerConnection::new(tls) else {
                    return;
                };
                let mut s = rustls::StreamOwned::new(sc, conn);
                let mut req = Vec::new();
                let mut r = BufReader::new(&mut s);
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    match r.read_line(&mut line) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    req.extend_from_slice(line.as_bytes());
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0u8; len];
                if r.read_exact(&mut body).is_err() {
                    return;
                }
                req.extend_from_slice(&body);
                let Ok(mut up) = TcpStream::connect(backend) else {
                    return;
                };
                let mut resp = Vec::new();
                if up.write_all(&req).is_err() || up.read_to_end(&mut resp).is_err() {
                    return;
                }
                let _ = s.write_all(&resp);
                s.conn.send_close_notify();
                let _ = s.flush();
            });
        }
    });
    port
}

struct Tls {
    _dir: Dir,
    sim: Sim,
    url: String,
    creds: PathBuf,
    /// As `openssl x509 -fingerprint -sha256` prints it (the command docs/xapi.md gives).
    fingerprint: String,
}

fn setup() -> Tls {
    let d = std::env::temp_dir().join(format!("cc-xapi-tls-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("test dir");
    let dir = Dir(d.clone());
    let (cert, key) = (d.join("cert.pem"), d.join("key.pem"));
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &key.display().to_string(),
        "-out",
        &cert.display().to_string(),
        "-days",
        "2",
        "-subj",
        "/CN=xapi-sim",
    ]);
    let fp = openssl(&[
        "x509",
        "-in",
        &cert.display().to_string(),
        "-noout",
        "-fingerprint",
        "-sha256",
    ]);
    let fingerprint = fp
        .trim()
        .split_once('=')
        .expect("fingerprint =")
        .1
        .to_string();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
        .expect("tls setup")
        .collect::<Result<_, _>>()
        .expect("tls setup");
    let key = PrivateKeyDer::from_pem_file(&key).expect("tls setup");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("tls setup")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("tls setup");
    let sim = Sim::start(&d.join("sr")).expect("tls setup");
    sim.add_user("root", "pw");
    sim.add_vm(&VmSpec::new("web01", &[65536]))
        .expect("tls setup");
    let port = proxy(Arc::new(cfg), sim.addr);
    let creds = d.join("cred");
    std::fs::write(&creds, "username = root\npassword = pw\n").expect("tls setup");
    Tls {
        _dir: dir,
        sim,
        url: format!("https://127.0.0.1:{port}"),
        creds,
        fingerprint,
    }
}

fn inspect(t: &Tls, pin: Option<&str>) -> Result<String, String> {
    let loc = VmLocator::Xapi {
        url: t.url.clone(),
        vm: "web01".into(),
        credentials_file: Some(t.creds.clone()),
        options: cb::xapi::XapiOptions {
            tls_fingerprint_sha256: pin.map(str::to_string),
            dom0_acpi: false,
            dom0_inventory: None,
            insecure_http: false,
        },
    };
    cb::backend_for(&loc)
        .inspect(&loc)
        .map(|i| i.name)
        .map_err(|e| e.to_string())
}

#[test]
fn xapi_tls_self_signed_host_needs_its_pinned_fingerprint() {
    if !coldclone_testkit::require_tools(&["openssl"]) {
        return;
    }
    let t = setup();
    let e = inspect(&t, None).expect_err("an unpinned self-signed certificate is refused");
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    assert_eq!(inspect(&t, Some(&t.fingerprint)), Ok("web01".to_string()));
    let lower = t.fingerprint.replace(':', "").to_lowercase();
    assert_eq!(
        inspect(&t, Some(&lower)),
        Ok("web01".to_string()),
        "any hex spelling"
    );
    let wrong = format!("00{}", &lower[2..]);
    let e = inspect(&t, Some(&wrong)).expect_err("another certificate's pin is refused");
    assert!(e.contains("not the pinned fingerprint"), "{e}");
    let e = inspect(&t, Some("12:34")).expect_err("a malformed pin");
    assert!(e.contains("64 hex digits"), "{e}");
    assert!(t.sim.state().sessions.is_empty(), "sessions logged out");
}
