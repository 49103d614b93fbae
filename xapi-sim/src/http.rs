//! A minimal HTTP/1.1 server: one thread per connection, one request per
//! connection (`Connection: close`), enough for XAPI's `POST /jsonrpc`,
//! `GET /export_raw_vdi` and `PUT /import_raw_vdi` (whose body is left in the
//! reader, to be streamed). Hand-written so tests can cut a response short.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

pub struct Request {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub body: Vec<u8>,
    pub content_length: Option<u64>,
    pub transfer_encoding: Option<String>,
}

/// Reads one request; `None` when the peer sent nothing usable. A PUT's body is not
/// read: it is what the returned reader gives next.
pub fn read_request(stream: &TcpStream) -> Option<(Request, BufReader<TcpStream>)> {
    let mut r = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let target = parts.next()?.to_string();
    let mut len: Option<u64> = None;
    let mut transfer_encoding = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).ok()? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                len = Some(v.trim().parse().ok()?);
            }
            if k.trim().eq_ignore_ascii_case("transfer-encoding") {
                transfer_encoding = Some(v.trim().to_string());
            }
        }
    }
    let mut body = vec![];
    if method != "PUT" {
        body = vec![0u8; len.unwrap_or(0).min(64 << 20) as usize];
        r.read_exact(&mut body).ok()?;
    }
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (unescape(k), unescape(v)))
        .collect();
    Some((
        Request {
            method,
            path: path.to_string(),
            query,
            body,
            content_length: len,
            transfer_encoding,
        },
        r,
    ))
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A complete response with a body and a length.
pub fn respond(mut stream: &TcpStream, status: &str, content_type: &str, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\ncontent-type: {content_type}\r\nconnection: close\r\ncache-control: no-cache, no-store\r\n\r\n",
        body.len()
    );
    // One write: head and body in separate segments would meet Nagle + delayed ACK.
    let mut all = head.into_bytes();
    all.extend_from_slice(body);
    let _ = stream.write_all(&all);
    let _ = stream.flush();
}

/// XAPI's own shape for a request it cannot parse (from the wire-protocol docs).
pub fn internal_error(stream: &TcpStream, info: &str) {
    let body = format!(
        "<html><body><h1>HTTP 500 internal server error</h1>An unexpected error occurred; please wait a while and try again. If the problem persists, please contact your support representative.<h1> Additional information </h1>{}</body></html>",
        info.replace('&', "&amp;").replace('<', "&lt;").replace('"', "&quot;")
    );
    respond(stream, "500 Internal Error", "text/html", body.as_bytes());
}
