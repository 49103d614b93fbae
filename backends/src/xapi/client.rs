//! A small XAPI client: JSON-RPC 2.0 over HTTP(S) (`POST /jsonrpc`),
//! `Async.*` calls with task polling, `event.from`, and the raw VDI export
//! (`GET /export_raw_vdi`). XAPI's error descriptions become [`XapiError`]s.
//!
//! Credentials come from a file or the environment, never from argv. TLS
//! certificates are verified against the web PKI roots; a host with a
//! self-signed certificate (XAPI's default) is trusted only by pinning the
//! SHA-256 fingerprint of its certificate.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// XAPI's null reference.
pub const NULL_REF: &str = "OpaqueRef:NULL";
/// Environment variables read when no credentials file is given.
pub const ENV_USER: &str = "COLDCLONE_XAPI_USERNAME";
pub const ENV_PASSWORD: &str = "COLDCLONE_XAPI_PASSWORD";

#[derive(Debug, thiserror::Error)]
pub enum XapiError {
    #[error("XAPI at {url} refused the login of {user}: {detail} (check xapi_credentials_file or ${ENV_USER}/${ENV_PASSWORD})")]
    AuthenticationFailed {
        url: String,
        user: String,
        detail: String,
    },
    #[error("{method}: the XAPI session is no longer valid (SESSION_INVALID), even after logging in again")]
    SessionInvalid { method: String },
    #[error("{method}: XAPI has no {class} {reference} (HANDLE_INVALID)")]
    HandleInvalid {
        method: String,
        class: String,
        reference: String,
    },
    #[error("{method}: the VM is {actual}, the call needs it {expected} (VM_BAD_POWER_STATE)")]
    BadPowerState {
        method: String,
        expected: String,
        actual: String,
    },
    #[error("{method}: the VM lacks a feature this needs (VM_LACKS_FEATURE): a clean shutdown needs PV drivers (guest tools), a checkpoint needs a VM that can suspend")]
    LacksFeature { method: String },
    #[error("{method} failed: {code} {params:?}")]
    Api {
        method: String,
        code: String,
        params: Vec<String>,
    },
    #[error("HTTP to XAPI at {url} failed: {detail}")]
    Transport { url: String, detail: String },
    #[error("XAPI sent an unexpected reply to {method}: {detail}")]
    Protocol { method: String, detail: String },
    #[error("XAPI credentials: {0}")]
    Credentials(String),
    #[error("TLS settings for {url}: {detail}")]
    Tls { url: String, detail: String },
    #[error("exporting VDI {vdi} failed after {attempts} attempts: {detail}")]
    Export {
        vdi: String,
        attempts: u32,
        detail: String,
    },
    #[error("timed out after {seconds}s waiting for {what}")]
    Timeout { what: String, seconds: u64 },
}

impl XapiError {
    /// The XAPI error code, for errors that carry one.
    pub fn code(&self) -> Option<&str> {
        match self {
            XapiError::SessionInvalid { .. } => Some("SESSION_INVALID"),
            XapiError::HandleInvalid { .. } => Some("HANDLE_INVALID"),
            XapiError::BadPowerState { .. } => Some("VM_BAD_POWER_STATE"),
            XapiError::LacksFeature { .. } => Some("VM_LACKS_FEATURE"),
            XapiError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// XAPI's error description as it came (code first, then parameters),
    /// for the errors that keep it whole.
    pub fn description(&self) -> Option<Vec<String>> {
        let mut d = match self {
            XapiError::SessionInvalid { .. } => vec!["SESSION_INVALID".to_string()],
            XapiError::HandleInvalid {
                class, reference, ..
            } => vec!["HANDLE_INVALID".into(), class.clone(), reference.clone()],
            XapiError::LacksFeature { .. } => vec!["VM_LACKS_FEATURE".into()],
            XapiError::Api { code, params, .. } => std::iter::once(code.clone())
                .chain(params.iter().cloned())
                .collect(),
            _ => return None,
        };
        while d.len() > 1 && d.last().is_some_and(String::is_empty) {
            d.pop();
        }
        Some(d)
    }

    /// Maps XAPI's error description (code first, then parameters).
    pub fn from_description(method: &str, desc: &[String]) -> XapiError {
        let code = desc.first().cloned().unwrap_or_else(|| "UNKNOWN".into());
        let p = |i: usize| desc.get(i).cloned().unwrap_or_default();
        let method = method.to_string();
        match code.as_str() {
            "SESSION_INVALID" => XapiError::SessionInvalid { method },
            "HANDLE_INVALID" => XapiError::HandleInvalid {
                method,
                class: p(1),
                reference: p(2),
            },
            "VM_BAD_POWER_STATE" => XapiError::BadPowerState {
                method,
                expected: p(2),
                actual: p(3),
            },
            "VM_LACKS_FEATURE" => XapiError::LacksFeature { method },
            _ => XapiError::Api {
                method,
                code,
                params: desc.get(1..).unwrap_or(&[]).to_vec(),
            },
        }
    }
}

pub type Result<T> = std::result::Result<T, XapiError>;

/// Where a pool master is and how to log in; stored in run journals (no secrets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct XapiTarget {
    /// `https://host` (or `http://` for the simulator).
    pub url: String,
    /// A file with `username = ...` and `password = ...` lines; else the environment.
    pub credentials_file: Option<PathBuf>,
    /// SHA-256 of the host's certificate (hex, colons allowed): trust it even if
    /// self-signed. Several, separated by commas: the pool's hosts (an export may be
    /// redirected to the member that sees the VDI's storage).
    #[serde(default)]
    pub tls_fingerprint_sha256: Option<String>,
    /// `http://` allowed (`xapi_insecure_http`); journals written before it read as false,
    /// and it is left out when false so that journal lines keep their landed shape.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure_http: bool,
}

#[derive(Clone)]
struct Credentials {
    user: String,
    password: String,
}

fn read_credentials(t: &XapiTarget) -> Result<Credentials> {
    if let Some(path) = &t.credentials_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| XapiError::Credentials(format!("cannot read {}: {e}", path.display())))?;
        let mut user = None;
        let mut password = None;
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"').to_string();
            match k.trim() {
                "username" | "user" => user = Some(v),
                "password" => password = Some(v),
                _ => {}
            }
        }
        return match (user, password) {
            (Some(user), Some(password)) => Ok(Credentials { user, password }),
            _ => Err(XapiError::Credentials(format!(
                "{} needs two lines: username = \"...\" and password = \"...\"",
                path.display()
            ))),
        };
    }
    match (std::env::var(ENV_USER), crate::secrets::var(ENV_PASSWORD)) {
        (Ok(user), Some(password)) => Ok(Credentials { user, password }),
        _ => Err(XapiError::Credentials(format!(
            "no xapi_credentials_file is configured and ${ENV_USER} / ${ENV_PASSWORD} are not set"
        ))),
    }
}

/// Parses one or more fingerprints separated by commas.
pub fn parse_fingerprints(s: &str) -> std::result::Result<Vec<[u8; 32]>, String> {
    s.split(',')
        .filter(|f| !f.trim().is_empty())
        .map(parse_fingerprint)
        .collect::<std::result::Result<Vec<_>, _>>()
        .and_then(|v| {
            if v.is_empty() {
                Err("no fingerprint given".into())
            } else {
                Ok(v)
            }
        })
}

/// Parses "AB:CD:..." or "abcd..." into 32 bytes.
pub fn parse_fingerprint(s: &str) -> std::result::Result<[u8; 32], String> {
    let hex: String = s
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect();
    if !hex.is_ascii() {
        return Err(format!("{s:?} is not hexadecimal"));
    }
    if hex.len() != 64 {
        return Err(format!(
            "a SHA-256 fingerprint has 64 hex digits, {s:?} has {}",
            hex.len()
        ));
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("{s:?} is not hexadecimal"))?;
    }
    Ok(out)
}

mod pin {
    //! A certificate verifier that trusts exactly one certificate, by its SHA-256.
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, Error, SignatureScheme};
    use sha2::Digest;

    #[derive(Debug)]
    pub struct Pinned {
        pub sha256: Vec<[u8; 32]>,
        pub provider: std::sync::Arc<rustls::crypto::CryptoProvider>,
    }

    impl ServerCertVerifier for Pinned {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            let got: [u8; 32] = sha2::Sha256::digest(end_entity.as_ref()).into();
            if self.sha256.contains(&got) {
                Ok(ServerCertVerified::assertion())
            } else {
                Err(Error::General(format!(
                    "the host's certificate has SHA-256 {}, not the pinned fingerprint",
                    got.iter()
                        .map(|b| format!("{b:02X}"))
                        .collect::<Vec<_>>()
                        .join(":")
                )))
            }
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
}

fn agent_for(t: &XapiTarget) -> Result<ureq::Agent> {
    let mut b = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(20))
        // event.from waits up to 30 s; an export may pause while the host works.
        .timeout_read(Duration::from_secs(120))
        .timeout_write(Duration::from_secs(120));
    if let Some(fp) = &t.tls_fingerprint_sha256 {
        let sha256 = parse_fingerprints(fp).map_err(|detail| XapiError::Tls {
            url: t.url.clone(),
            detail,
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| XapiError::Tls {
                url: t.url.clone(),
                detail: e.to_string(),
            })?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(pin::Pinned { sha256, provider }))
            .with_no_client_auth();
        b = b.tls_config(Arc::new(config));
    }
    Ok(b.build())
}

/// A logged-in XAPI session. Logs out when dropped.
pub struct Client {
    target: XapiTarget,
    url: String,
    agent: ureq::Agent,
    creds: Credentials,
    session: Mutex<String>,
    next_id: AtomicU64,
    /// Poll interval ceiling for tasks (short for the simulator, fine for real hosts).
    pub poll_max: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("url", &self.url).finish()
    }
}

const BUSY_RETRIES: u32 = 5;

fn busy_backoff(try_no: u32) -> Duration {
    Duration::from_millis(100 << try_no.min(6))
}

/// XAPI refused the call because the object is busy; nothing was done.
pub(crate) fn is_busy(e: &XapiError) -> bool {
    matches!(e.code(), Some("OTHER_OPERATION_IN_PROGRESS"))
}

/// `text` with the session reference and any `session_id=` query value taken out: a
/// session id is a bearer token, and errors end up in logs, reports and `--json`.
pub fn without_session(text: &str, session: &str) -> String {
    let mut out = if session.is_empty() {
        text.to_string()
    } else {
        text.replace(session, "<session>")
    };
    let key = "session_id=";
    let mut from = 0;
    while let Some(i) = out[from..].find(key) {
        let start = from + i + key.len();
        let end = out[start..]
            .find(|c: char| c == '&' || c == '"' || c == '\'' || c.is_whitespace() || c == ')')
            .map_or(out.len(), |j| start + j);
        out.replace_range(start..end, "<session>");
        from = start + "<session>".len();
    }
    out
}

fn is_read_only(method: &str) -> bool {
    let m = method.rsplit('.').next().unwrap_or("");
    m.starts_with("get_") || method == "event.from" || method == "VDI.list_changed_blocks"
}

impl Client {
    pub fn login(target: &XapiTarget) -> Result<Client> {
        let creds = read_credentials(target)?;
        let url = target.url.trim_end_matches('/').to_string();
        let plain = url.starts_with("http://");
        if !(url.starts_with("https://") || plain && target.insecure_http) {
            return Err(XapiError::Tls {
                url,
                detail: if plain {
                    "an http:// XAPI URL sends the password and session in the clear: use https://, \
                     or set xapi_insecure_http = true for a test host"
                        .into()
                } else {
                    "the XAPI URL must start with https://".into()
                },
            });
        }
        let c = Client {
            target: target.clone(),
            agent: agent_for(target)?,
            url,
            creds,
            session: Mutex::new(String::new()),
            next_id: AtomicU64::new(1),
            poll_max: Duration::from_millis(500),
        };
        c.relogin()?;
        Ok(c)
    }

    pub fn target(&self) -> &XapiTarget {
        &self.target
    }

    fn session(&self) -> String {
        self.session
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    fn relogin(&self) -> Result<()> {
        let r = self.rpc(
            "session.login_with_password",
            vec![
                json!(self.creds.user),
                json!(self.creds.password),
                json!("2.21"),
                json!("coldclone"),
            ],
        );
        let s = match r {
            Ok(v) => v
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| XapiError::Protocol {
                    method: "session.login_with_password".into(),
                    detail: format!("the session is not a string: {v}"),
                })?,
            Err(XapiError::Api { code, params, .. }) if code == "SESSION_AUTHENTICATION_FAILED" => {
                return Err(XapiError::AuthenticationFailed {
                    url: self.url.clone(),
                    user: self.creds.user.clone(),
                    detail: params.join(" "),
                })
            }
            Err(XapiError::Api { code, params, .. }) if code == "HOST_IS_SLAVE" => {
                return Err(XapiError::Api {
                    method: "session.login_with_password".into(),
                    code: "HOST_IS_SLAVE".into(),
                    params: vec![format!(
                        "this host is a pool member; give the pool master's address ({})",
                        params.join(" ")
                    )],
                })
            }
            Err(e) => return Err(e),
        };
        match self.session.lock() {
            Ok(mut g) => *g = s,
            Err(p) => *p.into_inner() = s,
        }
        Ok(())
    }

    /// One JSON-RPC exchange.
    fn rpc(&self, method: &str, params: Vec<Value>) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": id});
        // The session is read only when an error must be cleaned of it, not on every call.
        let transport = |detail: String| XapiError::Transport {
            url: self.url.clone(),
            detail: format!("{method}: {}", without_session(&detail, &self.session())),
        };
        let resp = self
            .agent
            .post(&format!("{}/jsonrpc", self.url))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string());
        let text = match resp {
            Ok(r) => r.into_string().map_err(|e| transport(e.to_string()))?,
            Err(ureq::Error::Status(code, r)) => {
                let t = r.into_string().unwrap_or_default();
                return Err(transport(format!(
                    "HTTP {code}: {}",
                    t.chars().take(300).collect::<String>()
                )));
            }
            Err(e) => return Err(transport(e.to_string())),
        };
        // A non-finite float is written bare (`Infinity`), which is not JSON
        // (xen-api's fixture sdk-gen/component-test/spec/xapi-24/vm_special_value.json):
        // read it as a string rather than lose the whole answer.
        let v: Value = serde_json::from_str(&text)
            .or_else(|e| serde_json::from_str(&quote_non_finite(&text)).map_err(|_| e))
            .map_err(|e| XapiError::Protocol {
                method: method.into(),
                detail: format!("not JSON ({e})"),
            })?;
        if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
            // JSON-RPC 2.0: {code, message, data}; 1.0: an array of strings.
            let desc: Vec<String> = match e {
                Value::Array(a) => a.iter().map(value_string).collect(),
                _ => std::iter::once(e.get("message").map(value_string).unwrap_or_default())
                    // `data` is the parameter list; xen-api's own fixture
                    // (sdk-gen/component-test/spec/xapi-24/xapi_error.json) has a lone string.
                    .chain(match e.get("data") {
                        Some(Value::Array(a)) => a.iter().map(value_string).collect(),
                        Some(Value::Null) | None => vec![],
                        Some(other) => vec![value_string(other)],
                    })
                    .collect(),
            };
            // SESSION_INVALID and friends name the session: it is a bearer token.
            let session = self.session();
            let desc: Vec<String> = desc.iter().map(|d| without_session(d, &session)).collect();
            return Err(XapiError::from_description(method, &desc));
        }
        v.get("result").cloned().ok_or_else(|| XapiError::Protocol {
            method: method.into(),
            detail: "neither result nor error".into(),
        })
    }

    /// Calls `method(session, args..)`. A SESSION_INVALID (expired session, a
    /// toolstack restart) logs in again and repeats the call once; read-only
    /// calls are repeated after a transport error.
    pub fn call(&self, method: &str, args: Vec<Value>) -> Result<Value> {
        let mut relogged = false;
        let mut transport_tries = 0;
        let mut busy_tries = 0;
        loop {
            let mut params = vec![json!(self.session())];
            params.extend(args.iter().cloned());
            match self.rpc(method, params) {
                Err(XapiError::SessionInvalid { .. }) if !relogged => {
                    tracing::warn!(method, "XAPI session expired; logging in again");
                    relogged = true;
                    self.relogin()?;
                }
                Err(XapiError::Transport { .. }) if is_read_only(method) && transport_tries < 3 => {
                    transport_tries += 1;
                    std::thread::sleep(Duration::from_millis(200 * transport_tries));
                }
                // Refused, not done: the object is busy (an SR scan, another
                // client's operation). Any call may be asked again.
                Err(e) if is_busy(&e) && busy_tries < BUSY_RETRIES => {
                    busy_tries += 1;
                    tracing::info!(method, "{e}; asking again");
                    std::thread::sleep(busy_backoff(busy_tries));
                }
                r => return r,
            }
        }
    }

    pub fn call_str(&self, method: &str, args: Vec<Value>) -> Result<String> {
        let v = self.call(method, args)?;
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| XapiError::Protocol {
                method: method.into(),
                detail: format!("expected a string, got {v}"),
            })
    }

    pub fn record(&self, class: &str, reference: &str) -> Result<Value> {
        self.call(&format!("{class}.get_record"), vec![json!(reference)])
    }

    /// `Async.<method>`, then waits for its task; returns the task's result.
    pub fn call_async(&self, method: &str, args: Vec<Value>, timeout: Duration) -> Result<String> {
        let mut busy_tries = 0;
        loop {
            let task = self.call_str(&format!("Async.{method}"), args.clone())?;
            match self.wait_task(&task, method, timeout) {
                Err(e) if is_busy(&e) && busy_tries < BUSY_RETRIES => {
                    busy_tries += 1;
                    tracing::info!(method, "{e}; asking again");
                    std::thread::sleep(busy_backoff(busy_tries));
                }
                r => return r,
            }
        }
    }

    /// Waits for a task to finish, destroys it, and returns its result.
    pub fn wait_task(&self, task: &str, what: &str, timeout: Duration) -> Result<String> {
        let r = self.poll_task(task, what, timeout);
        if r.is_err() {
            // Let a task we stopped watching finish before it is dropped, so
            // whatever it creates exists when the journal's clean-up looks.
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                match self.record("task", task) {
                    Ok(rec) if str_field(&rec, "status") == "pending" => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => break,
                }
            }
        }
        self.destroy_task(task);
        r
    }

    fn poll_task(&self, task: &str, what: &str, timeout: Duration) -> Result<String> {
        let start = Instant::now();
        let mut wait = Duration::from_millis(5);
        loop {
            let rec = self.record("task", task)?;
            match str_field(&rec, "status").as_str() {
                "pending" | "cancelling" => {}
                "success" => return Ok(task_result(&str_field(&rec, "result"))),
                _ => {
                    let info: Vec<String> = rec
                        .get("error_info")
                        .and_then(Value::as_array)
                        .map(|a| a.iter().map(value_string).collect())
                        .unwrap_or_default();
                    return Err(XapiError::from_description(what, &info));
                }
            }
            if start.elapsed() > timeout {
                let _ = self.call("task.cancel", vec![json!(task)]);
                return Err(XapiError::Timeout {
                    what: what.into(),
                    seconds: timeout.as_secs(),
                });
            }
            std::thread::sleep(wait);
            wait = (wait * 2).min(self.poll_max);
        }
    }

    /// Best effort, tried twice: a task left behind is clutter on the host.
    pub fn destroy_task(&self, task: &str) {
        for _ in 0..2 {
            match self.call("task.destroy", vec![json!(task)]) {
                Ok(_) | Err(XapiError::HandleInvalid { .. }) => return,
                Err(e) => tracing::warn!(task, "task.destroy: {e}"),
            }
        }
    }

    /// Streams a VDI's raw contents into `dest` (sparse: zero 4 KiB blocks are
    /// holes). XAPI sends no length, so a connection that drops looks like the
    /// end of the data: the size is checked against the VDI's, and a short or
    /// failed transfer is tried again, up to `attempts` times.
    pub fn export_raw_vdi(
        &self,
        vdi_ref: &str,
        vdi_uuid: &str,
        expected: u64,
        dest: &Path,
        attempts: u32,
    ) -> Result<()> {
        let mut last = String::new();
        for attempt in 1..=attempts {
            match self.export_once(vdi_ref, vdi_uuid, expected, dest) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(vdi = vdi_uuid, attempt, "export failed: {e}");
                    last = e.to_string();
                    std::thread::sleep(Duration::from_millis(200 * attempt as u64));
                }
            }
        }
        Err(XapiError::Export {
            vdi: vdi_uuid.into(),
            attempts,
            detail: last,
        })
    }

    fn export_once(&self, vdi_ref: &str, vdi_uuid: &str, expected: u64, dest: &Path) -> Result<()> {
        let task = self.call_str(
            "task.create",
            vec![
                json!("coldclone export"),
                json!(format!("raw export of VDI {vdi_uuid}")),
            ],
        )?;
        let r = self.stream_export(vdi_ref, &task, expected, dest);
        // The host finishes the task when its side of the transfer ends.
        let t = self.poll_task(&task, "export_raw_vdi", Duration::from_secs(30));
        self.destroy_task(&task);
        r?;
        t.map(|_| ())
    }

    /// `GET /export_raw_vdi` of a VDI under `task` (logging in again on a 401).
    fn get_export(&self, vdi_ref: &str, task: &str) -> Result<ureq::Response> {
        let url = format!("{}/export_raw_vdi", self.url);
        // (HTTP status if any, message): ureq's own error is too big to pass around.
        let get = |session: &str| -> std::result::Result<ureq::Response, (Option<u16>, String)> {
            self.agent
                .get(&url)
                .query("session_id", session)
                .query("task_id", task)
                .query("vdi", vdi_ref)
                .query("format", "raw")
                .call()
                .map_err(|e| match e {
                    ureq::Error::Status(code, r) => {
                        (Some(code), format!("HTTP {code} {}", r.status_text()))
                    }
                    other => (None, other.to_string()),
                })
        };
        let resp = match get(&self.session()) {
            // The session expired (or the host restarted its toolstack).
            Err((Some(401), _)) => {
                self.relogin()?;
                get(&self.session())
            }
            r => r,
        };
        resp.map_err(|(_, detail)| XapiError::Transport {
            url: url.clone(),
            // ureq's message quotes the whole URL, `session_id=` included.
            detail: without_session(&detail, &self.session()),
        })
    }

    fn stream_export(&self, vdi_ref: &str, task: &str, expected: u64, dest: &Path) -> Result<()> {
        let url = format!("{}/export_raw_vdi", self.url);
        let resp = self.get_export(vdi_ref, task)?;
        let io = |e: std::io::Error| XapiError::Transport {
            url: url.clone(),
            detail: format!("{}: {e}", dest.display()),
        };
        let mut out = std::fs::File::create(dest).map_err(io)?;
        let mut body = resp.into_reader();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let mut n = 0;
            // Fill the buffer: block-aligned holes need whole blocks.
            while n < buf.len() {
                match body.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) => return Err(io(e)),
                }
            }
            if n == 0 {
                break;
            }
            for block in buf[..n].chunks(4096) {
                if block.iter().all(|b| *b == 0) {
                    out.seek(SeekFrom::Current(block.len() as i64))
                        .map_err(io)?;
                } else {
                    out.write_all(block).map_err(io)?;
                }
            }
            total += n as u64;
            if n < buf.len() {
                break;
            }
        }
        out.set_len(total).map_err(io)?;
        out.sync_all().map_err(io)?;
        if total != expected {
            return Err(XapiError::Transport {
                url,
                detail: format!("the export ended after {total} of {expected} bytes"),
            });
        }
        Ok(())
    }

    /// Writes `len` bytes from `body` into the VDI `vdi_ref` from its first byte: `PUT
    /// /import_raw_vdi?session_id=&task_id=&vdi=&format=raw` with a Content-Length.
    /// xapi/import_raw_vdi.ml `localhost_handler` refuses a Transfer-Encoding (HTTP
    /// chunked) and hands the body to vhd-tool for exactly content-length bytes; it
    /// answers 200 *before* it reads the body, so the answer proves nothing: the task
    /// (`TaskHelper.complete` with the VDI, or `failed`) says whether the data landed.
    /// Not retried: `body` is read once.
    pub fn import_raw_vdi(
        &self,
        vdi_ref: &str,
        vdi_uuid: &str,
        len: u64,
        body: &mut dyn Read,
        timeout: Duration,
    ) -> Result<()> {
        let task = self.call_str(
            "task.create",
            vec![
                json!("coldclone import"),
                json!(format!("raw import into VDI {vdi_uuid}")),
            ],
        )?;
        let url = format!("{}/import_raw_vdi", self.url);
        let sent = self
            .agent
            .put(&url)
            .query("session_id", &self.session())
            .query("task_id", &task)
            .query("vdi", vdi_ref)
            .query("format", "raw")
            .set("Content-Length", &len.to_string())
            .set("Content-Type", "application/octet-stream")
            .send(body.take(len))
            .map(|r| {
                // Read the (empty) answer to its end so the connection closes cleanly.
                let _ = r.into_string();
            })
            .map_err(|e| match e {
                ureq::Error::Status(code, r) => format!("HTTP {code} {}", r.status_text()),
                // Its kind and cause, not ureq's message: that quotes the whole URL.
                ureq::Error::Transport(t) => {
                    let cause = std::error::Error::source(&t)
                        .map(|c| c.to_string())
                        .or_else(|| t.message().map(str::to_string))
                        .unwrap_or_default();
                    format!("{}: {cause}", t.kind())
                }
            });
        let t = self.poll_task(&task, "import_raw_vdi", timeout);
        self.destroy_task(&task);
        let clean = |d: &str| without_session(d, &self.session());
        match (sent, t) {
            (Ok(()), Ok(_)) => Ok(()),
            (Ok(()), Err(e)) => Err(e),
            // Both sides' words: ours says why the body stopped (a damaged chunk of the
            // repository), the host's task what it made of that.
            (Err(detail), Err(e)) => Err(XapiError::Transport {
                url,
                detail: format!(
                    "import into VDI {vdi_uuid}: {}; the host's task: {}",
                    clean(&detail),
                    clean(&e.to_string())
                ),
            }),
            (Err(detail), Ok(_)) => Err(XapiError::Transport {
                url,
                detail: format!("import into VDI {vdi_uuid}: {}", clean(&detail)),
            }),
        }
    }

    /// A VDI's raw contents as a stream, read as they arrive (nothing is written
    /// locally): see [`RawVdiStream`].
    pub fn stream_raw_vdi(
        self: &Arc<Self>,
        vdi_ref: &str,
        vdi_uuid: &str,
        expected: u64,
        attempts: u32,
    ) -> Result<RawVdiStream> {
        let mut s = RawVdiStream {
            client: self.clone(),
            vdi_ref: vdi_ref.into(),
            vdi_uuid: vdi_uuid.into(),
            expected,
            attempts: attempts.max(1),
            tried: 0,
            task: None,
            body: None,
            pos: 0,
            done: false,
        };
        s.connect(String::new())?;
        Ok(s)
    }

    /// `VDI.list_changed_blocks(from, to)` as byte ranges of the disk.
    pub fn changed_ranges(
        &self,
        from: &str,
        to: &str,
        size: u64,
    ) -> Result<Vec<std::ops::Range<u64>>> {
        let b64 = self.call_str("VDI.list_changed_blocks", vec![json!(from), json!(to)])?;
        cbt_ranges(&b64, size).map_err(|detail| XapiError::Protocol {
            method: "VDI.list_changed_blocks".into(),
            detail,
        })
    }

    pub fn logout(&self) {
        let s = self.session();
        if s.is_empty() {
            return;
        }
        // Tried twice: each session left behind counts against the host's limit.
        for _ in 0..2 {
            match self.rpc("session.logout", vec![json!(s)]) {
                Ok(_) | Err(XapiError::SessionInvalid { .. }) => return,
                Err(e) => tracing::warn!("session.logout: {e}"),
            }
        }
    }
}

/// `/export_raw_vdi` read as it arrives. XAPI sends no length, so a connection that
/// drops looks like the end of the data: the bytes are counted, the end must come at
/// the VDI's size and the export's task must succeed, else the read fails. A transfer
/// that breaks is asked for again from the start (the stream has no ranges:
/// xapi/export_raw_vdi.ml) and read past what was already delivered, up to `attempts`
/// transfers in all.
pub struct RawVdiStream {
    client: Arc<Client>,
    vdi_ref: String,
    vdi_uuid: String,
    expected: u64,
    attempts: u32,
    tried: u32,
    task: Option<String>,
    body: Option<Box<dyn Read + Send + Sync>>,
    /// Bytes delivered to the reader.
    pos: u64,
    done: bool,
}

impl RawVdiStream {
    pub fn len(&self) -> u64 {
        self.expected
    }

    pub fn is_empty(&self) -> bool {
        self.expected == 0
    }

    /// Ends the current transfer: the body is dropped, its task waited on (the host
    /// finishes it when its side ends) and destroyed; returns the task's failure.
    fn end_transfer(&mut self) -> Result<()> {
        self.body = None;
        let Some(task) = self.task.take() else {
            return Ok(());
        };
        let r = self
            .client
            .poll_task(&task, "export_raw_vdi", Duration::from_secs(30));
        self.client.destroy_task(&task);
        r.map(|_| ())
    }

    /// Starts a transfer (another one after `why`, if it is not the first) and reads
    /// up to where the reader is; gives up after `attempts` transfers.
    fn connect(&mut self, mut why: String) -> Result<()> {
        loop {
            if self.tried >= self.attempts {
                return Err(XapiError::Export {
                    vdi: self.vdi_uuid.clone(),
                    attempts: self.attempts,
                    detail: why,
                });
            }
            if self.tried > 0 {
                tracing::warn!(
                    vdi = self.vdi_uuid,
                    attempt = self.tried,
                    "export failed: {why}"
                );
                std::thread::sleep(Duration::from_millis(200 * self.tried as u64));
            }
            self.tried += 1;
            match self.open_and_skip() {
                Ok(()) => return Ok(()),
                Err(e) => {
                    why = e.to_string();
                    let _ = self.end_transfer();
                }
            }
        }
    }

    fn open_and_skip(&mut self) -> Result<()> {
        let task = self.client.call_str(
            "task.create",
            vec![
                json!("coldclone export"),
                json!(format!("raw export of VDI {}", self.vdi_uuid)),
            ],
        )?;
        self.task = Some(task.clone());
        let resp = self.client.get_export(&self.vdi_ref, &task)?;
        let mut body: Box<dyn Read + Send + Sync> = resp.into_reader();
        // What the reader has had already.
        let mut left = self.pos;
        let mut buf = vec![0u8; 1 << 16];
        while left > 0 {
            let want = buf.len().min(left as usize);
            match body.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(self.short(self.pos - left));
                }
                Ok(n) => left -= n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.transport(e.to_string())),
            }
        }
        self.body = Some(body);
        Ok(())
    }

    fn short(&self, total: u64) -> XapiError {
        self.transport(format!(
            "the export ended after {total} of {} bytes",
            self.expected
        ))
    }

    fn transport(&self, detail: String) -> XapiError {
        XapiError::Transport {
            url: format!("{}/export_raw_vdi", self.client.url),
            detail,
        }
    }

    fn read_once(&mut self, buf: &mut [u8]) -> Result<usize> {
        let Some(body) = self.body.as_mut() else {
            return Err(self.transport("no transfer".into()));
        };
        let n = loop {
            match body.read(buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.transport(e.to_string())),
            }
        };
        if n == 0 {
            if self.pos != self.expected {
                return Err(self.short(self.pos));
            }
            // The end, at the VDI's size: the export's task must agree.
            self.end_transfer()?;
            self.done = true;
            return Ok(0);
        }
        if self.pos + n as u64 > self.expected {
            return Err(self.transport(format!(
                "the export sent more than the VDI's {} bytes",
                self.expected
            )));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

impl Read for RawVdiStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.read_once(buf) {
                Ok(n) => return Ok(n),
                Err(e) => {
                    let why = e.to_string();
                    let _ = self.end_transfer();
                    self.connect(why).map_err(std::io::Error::other)?;
                }
            }
        }
    }
}

impl Drop for RawVdiStream {
    fn drop(&mut self) {
        let _ = self.end_transfer();
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.logout();
    }
}

/// A CBT bitmap (base64, one bit per 64 KiB, most significant bit first) as
/// merged byte ranges, clipped to `size`.
pub fn cbt_ranges(b64: &str, size: u64) -> std::result::Result<Vec<std::ops::Range<u64>>, String> {
    use base64::Engine;
    const BLOCK: u64 = 64 << 10;
    let bits = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| format!("the changed-block bitmap is not base64: {e}"))?;
    let mut out: Vec<std::ops::Range<u64>> = Vec::new();
    for (i, byte) in bits.iter().enumerate() {
        for bit in 0..8u64 {
            if byte & (0x80 >> bit) == 0 {
                continue;
            }
            let start = (i as u64 * 8 + bit) * BLOCK;
            if start >= size {
                break;
            }
            let end = (start + BLOCK).min(size);
            match out.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => out.push(start..end),
            }
        }
    }
    Ok(out)
}

/// `text` with the bare `Infinity`, `-Infinity`, `+Infinity` and `NaN` outside
/// strings quoted ("Infinity", ...), so that it parses as JSON.
pub fn quote_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let (mut in_str, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_str {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_str = true;
        }
        let word = ["-Infinity", "+Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|w| rest.starts_with(w));
        match word {
            Some(w) => {
                out.push('"');
                out.push_str(w);
                out.push('"');
                rest = &rest[w.len()..];
            }
            None => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    out
}

/// A task's result is an XML-RPC value even over JSON-RPC: `<value>OpaqueRef:..</value>`.
pub fn task_result(s: &str) -> String {
    let t = s.trim();
    let t = t.strip_prefix("<value>").unwrap_or(t);
    let t = t.strip_suffix("</value>").unwrap_or(t);
    let t = t.strip_prefix("<string>").unwrap_or(t);
    t.strip_suffix("</string>").unwrap_or(t).to_string()
}

/// A field as text (a number is written out in decimal).
pub fn str_field(v: &Value, key: &str) -> String {
    v.get(key).map(value_string).unwrap_or_default()
}

pub fn value_string(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// An Int field: xapi's JSON-RPC sends Int as a JSON number (ocaml-rpc's
/// jsonrpc encoder); a decimal string (XML-RPC habits, other servers) is read too.
pub fn u64_field(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(value_u64).unwrap_or(0)
}

pub fn value_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

pub fn refs(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| a.iter().map(value_string).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn errors_lose_the_session_id() {
        let s = "OpaqueRef:5f1c0d4e-aaaa-bbbb-cccc-0123456789ab";
        let e = format!(
            "http://h/export_raw_vdi?session_id={s}&task_id=t&vdi=v: Connection reset; SESSION_INVALID [{s}]"
        );
        let got = super::without_session(&e, s);
        assert!(!got.contains("5f1c0d4e"), "{got}");
        assert!(
            got.contains("task_id=t") && got.contains("SESSION_INVALID"),
            "{got}"
        );
        let other = super::without_session("x?session_id=OpaqueRef:zzz&a=1", s);
        assert_eq!(other, "x?session_id=<session>&a=1");
    }

    use super::*;

    #[test]
    fn cbt_bitmaps_become_merged_ranges() {
        // 0b1100_0001, 0b1000_0000: blocks 0,1,7,8.
        let b64 = "wYA=";
        let r = cbt_ranges(b64, 1 << 30).unwrap();
        assert_eq!(r, vec![0..(128 << 10), (7 * 65536)..(9 * 65536)]);
        // Clipped to the disk.
        assert_eq!(cbt_ranges("gA==", 1000).unwrap(), vec![0..1000]);
        assert!(cbt_ranges("not base64!", 10).is_err());
    }

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let hex = "AB".repeat(32);
        assert_eq!(parse_fingerprint(&hex).unwrap(), [0xab; 32]);
        let colons = vec!["ab"; 32].join(":");
        assert_eq!(parse_fingerprint(&colons).unwrap(), [0xab; 32]);
        assert!(parse_fingerprint("abcd").is_err());
        let two = format!("{hex}, {colons}");
        assert_eq!(parse_fingerprints(&two).unwrap().len(), 2);
        assert!(parse_fingerprints(" , ").is_err());
        assert!(
            parse_fingerprint(&"é".repeat(32)).is_err(),
            "no panic on non-ASCII"
        );
    }

    #[test]
    fn non_finite_floats_are_quoted_outside_strings_only() {
        assert_eq!(
            quote_non_finite(r#"{"a": Infinity, "b": "Infinity \" NaN", "c": [-Infinity, NaN]}"#),
            r#"{"a": "Infinity", "b": "Infinity \" NaN", "c": ["-Infinity", "NaN"]}"#
        );
    }

    #[test]
    fn task_results_are_xml_values() {
        assert_eq!(task_result("<value>OpaqueRef:1</value>"), "OpaqueRef:1");
        assert_eq!(task_result(""), "");
    }

    #[test]
    fn error_descriptions_map_to_types() {
        let d = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let e = XapiError::from_description(
            "VM.resume",
            &d(&["VM_BAD_POWER_STATE", "OpaqueRef:a", "suspended", "halted"]),
        );
        assert!(
            matches!(e, XapiError::BadPowerState { ref expected, ref actual, .. } if expected == "suspended" && actual == "halted")
        );
        assert_eq!(
            XapiError::from_description("x", &d(&["SESSION_INVALID", "r"])).code(),
            Some("SESSION_INVALID")
        );
        let e = XapiError::from_description("VM.clone", &d(&["SR_FULL", "a"]));
        assert!(e.to_string().contains("SR_FULL"), "{e}");
    }
}
