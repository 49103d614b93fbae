//! A fault-injecting HTTP proxy in front of a real S3 server, for the client's retry and
//! listing code. One request per connection: the request goes upstream as HTTP/1.0 (so
//! the server answers with a plain body and closes), the answer comes back with
//! `Connection: close`. The Host header is passed unchanged, so signatures still verify.
//! Every fault it injects is counted, so a test can assert that its faults really fired.
// `is_multiple_of` needs Rust 1.87; the workspace supports 1.80.
#![allow(clippy::manual_is_multiple_of)]
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `503 SlowDown`, as S3 answers when throttling; the request never reaches the server.
    SlowDown,
    /// `500 InternalError` after the server carried the request out (its answer is lost).
    InternalAfterDone,
    /// The connection is closed without an answer, before the server saw the request.
    ResetBefore,
    /// The server carries the request out; the connection is closed before the answer.
    ResetAfterDone,
    /// No answer for this long (longer than the client's timeout), then close.
    Stall(Duration),
    /// One byte of the request's body is flipped on the way (a request without a body
    /// goes through unchanged, uncounted); the server's answer is passed back.
    CorruptBody,
}

/// Which requests fail: every `every`-th request (counting from the plan's start) gets
/// the next fault of `cycle`; `always` fails every request with `cycle[0]`.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub every: u64,
    pub cycle: Vec<Fault>,
    pub always: bool,
    /// Rewrite ListObjectsV2 answers: (find, replace) on the body.
    pub rewrite_listing: Option<(String, String)>,
    /// When not empty, only requests whose request line contains all of these strings
    /// count for `every` and get faults (e.g. `["POST ", "uploadId="]`: completions of
    /// multipart uploads).
    pub only_matching: Vec<String>,
}

#[derive(Default, Debug)]
pub struct Stats {
    pub requests: AtomicU64,
    pub slowdowns: AtomicU64,
    pub internal_after_done: AtomicU64,
    pub resets_before: AtomicU64,
    pub resets_after_done: AtomicU64,
    pub stalls: AtomicU64,
    /// List requests that carried a continuation token (pages after the first).
    pub list_continuations: AtomicU64,
    pub listings_rewritten: AtomicU64,
    pub bodies_corrupted: AtomicU64,
    /// Multipart uploads: CreateMultipartUpload, UploadPart, CompleteMultipartUpload and
    /// AbortMultipartUpload requests seen (faulted or not).
    pub uploads_created: AtomicU64,
    pub parts_uploaded: AtomicU64,
    pub uploads_completed: AtomicU64,
    pub uploads_aborted: AtomicU64,
}

pub struct FaultProxy {
    pub port: u16,
    pub stats: Arc<Stats>,
    plan: Arc<Mutex<(Plan, u64)>>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    pub fn start(upstream_port: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stats = Arc::new(Stats::default());
        let plan = Arc::new(Mutex::new((Plan::default(), 0)));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, pl, sp) = (stats.clone(), plan.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (st, pl) = (st.clone(), pl.clone());
                std::thread::spawn(move || serve(conn, upstream_port, &st, &pl));
            }
        });
        FaultProxy {
            port,
            stats,
            plan,
            stop,
        }
    }

    /// Install a plan; its request count starts at 0.
    pub fn set_plan(&self, plan: Plan) {
        *self.plan.lock().unwrap() = (plan, 0);
    }

    pub fn count(field: &AtomicU64) -> u64 {
        field.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Read one HTTP request: head (up to the blank line) and a Content-Length body.
fn read_request(c: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = c.read(&mut byte).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&byte[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = c.read(&mut byte).ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&byte[..n]);
    }
    Some((head, body))
}

/// The head with its request line turned to HTTP/1.0 and `Connection: close`.
fn upstream_head(head: &str) -> String {
    let mut lines = head.split("\r\n");
    let first = lines
        .next()
        .unwrap_or("")
        .replacen("HTTP/1.1", "HTTP/1.0", 1);
    let mut out = first + "\r\n";
    for l in lines.filter(|l| !l.is_empty()) {
        if !l.to_ascii_lowercase().starts_with("connection:") {
            out += l;
            out += "\r\n";
        }
    }
    out + "Connection: close\r\n\r\n"
}

fn forward(head: &str, body: &[u8], upstream_port: u16) -> Option<Vec<u8>> {
    let mut up = TcpStream::connect(("127.0.0.1", upstream_port)).ok()?;
    up.write_all(upstream_head(head).as_bytes()).ok()?;
    up.write_all(body).ok()?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer).ok()?;
    Some(answer)
}

/// The answer re-framed for the client: Content-Length of the (maybe rewritten) body,
/// `Connection: close`. A HEAD answer keeps its headers (its length is the object's).
fn reframe(answer: &[u8], is_head: bool, rewrite: Option<&(String, String)>) -> (Vec<u8>, bool) {
    let Some(p) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (answer.to_vec(), false);
    };
    let head = String::from_utf8_lossy(&answer[..p]).to_string();
    let mut body = answer[p + 4..].to_vec();
    let mut rewritten = false;
    if let Some((find, replace)) = rewrite {
        let text = String::from_utf8_lossy(&body).to_string();
        if text.contains(find.as_str()) {
            body = text.replacen(find.as_str(), replace, 1).into_bytes();
            rewritten = true;
        }
    }
    let mut out = String::new();
    for (i, l) in head.split("\r\n").enumerate() {
        let lower = l.to_ascii_lowercase();
        if i == 0 {
            out += &l.replacen("HTTP/1.0", "HTTP/1.1", 1);
        } else if lower.starts_with("connection:")
            || lower.starts_with("transfer-encoding:")
            || (!is_head && lower.starts_with("content-length:"))
        {
            continue;
        } else {
            out += l;
        }
        out += "\r\n";
    }
    if !is_head {
        out += &format!("Content-Length: {}\r\n", body.len());
    }
    out += "Connection: close\r\n\r\n";
    let mut v = out.into_bytes();
    if !is_head {
        v.extend_from_slice(&body);
    }
    (v, rewritten)
}

fn status(code: u16, name: &str, s3_code: &str) -> Vec<u8> {
    let body = format!("<?xml version=\"1.0\"?><Error><Code>{s3_code}</Code><Message>injected by the test proxy</Message></Error>");
    format!(
        "HTTP/1.1 {code} {name}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn serve(mut c: TcpStream, upstream_port: u16, st: &Stats, plan: &Mutex<(Plan, u64)>) {
    let Some((head, body)) = read_request(&mut c) else {
        return;
    };
    st.requests.fetch_add(1, Ordering::SeqCst);
    let first = head.lines().next().unwrap_or("").to_string();
    let is_head = first.starts_with("HEAD ");
    let is_list = first.starts_with("GET ") && first.contains("list-type=2");
    if is_list && first.contains("continuation-token=") {
        st.list_continuations.fetch_add(1, Ordering::SeqCst);
    }
    let counter = if first.starts_with("POST ") && first.contains("uploads") {
        Some(&st.uploads_created)
    } else if first.starts_with("PUT ") && first.contains("partNumber=") {
        Some(&st.parts_uploaded)
    } else if first.starts_with("POST ") && first.contains("uploadId=") {
        Some(&st.uploads_completed)
    } else if first.starts_with("DELETE ") && first.contains("uploadId=") {
        Some(&st.uploads_aborted)
    } else {
        None
    };
    if let Some(c) = counter {
        c.fetch_add(1, Ordering::SeqCst);
    }
    let (fault, rewrite) = {
        let mut g = plan.lock().unwrap();
        let eligible = g.0.only_matching.iter().all(|m| first.contains(m.as_str()));
        if eligible {
            g.1 += 1;
        }
        let n = g.1;
        let p = &g.0;
        let fault = if p.cycle.is_empty() || !eligible {
            None
        } else if p.always {
            Some(p.cycle[0])
        } else if p.every > 0 && n.is_multiple_of(p.every) {
            Some(p.cycle[((n / p.every - 1) % p.cycle.len() as u64) as usize])
        } else {
            None
        };
        (fault, p.rewrite_listing.clone().filter(|_| is_list))
    };
    match fault {
        Some(Fault::SlowDown) => {
            st.slowdowns.fetch_add(1, Ordering::SeqCst);
            let _ = c.write_all(&status(503, "Slow Down", "SlowDown"));
        }
        Some(Fault::ResetBefore) => {
            st.resets_before.fetch_add(1, Ordering::SeqCst);
        }
        Some(Fault::Stall(d)) => {
            st.stalls.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(d);
        }
        Some(Fault::InternalAfterDone) => {
            if forward(&head, &body, upstream_port).is_some() {
                st.internal_after_done.fetch_add(1, Ordering::SeqCst);
            }
            let _ = c.write_all(&status(500, "Internal Server Error", "InternalError"));
        }
        Some(Fault::CorruptBody) => {
            let mut body = body;
            let mid = body.len() / 2;
            if let Some(b) = body.get_mut(mid) {
                *b ^= 0x20;
                st.bodies_corrupted.fetch_add(1, Ordering::SeqCst);
            }
            if let Some(answer) = forward(&head, &body, upstream_port) {
                let _ = c.write_all(&reframe(&answer, is_head, None).0);
            }
        }
        Some(Fault::ResetAfterDone) => {
            if forward(&head, &body, upstream_port).is_some() {
                st.resets_after_done.fetch_add(1, Ordering::SeqCst);
            }
        }
        None => {
            if let Some(answer) = forward(&head, &body, upstream_port) {
                let (out, rewritten) = reframe(&answer, is_head, rewrite.as_ref());
                if rewritten {
                    st.listings_rewritten.fetch_add(1, Ordering::SeqCst);
                }
                let _ = c.write_all(&out);
            }
        }
    }
    let _ = c.shutdown(Shutdown::Both);
}
