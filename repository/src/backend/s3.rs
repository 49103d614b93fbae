//! S3-compatible object storage over `ureq`, its requests signed by `rusty-s3`
//! (sans-IO AWS Signature V4, query-string "presigned" form; see docs/repository.md,
//! "S3 signing"). Path-style requests (`endpoint/bucket/key`), which every
//! S3-compatible server accepts.
//!
//! Bodies are covered by `Content-MD5` (a signed header): a presigned request signs
//! `UNSIGNED-PAYLOAD`, so without it a body damaged on the way would be stored as sent.
//! Objects larger than the multipart threshold go up as a multipart upload, each part
//! retried on its own; the object appears whole or not at all (S3 makes it visible only
//! on CompleteMultipartUpload).

use super::{Backend, ObjectInfo};
use crate::error::{RepoError, Result};
use crate::Location;
use base64::Engine as _;
use md5::{Digest, Md5};
use rusty_s3::actions::{CompleteMultipartUpload, CreateMultipartUpload};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Attempts per request: a 5xx, 429, 408 or transport error (reset, timeout, refused) is
/// retried with backoff 0.4, 0.8, 1.6 s, each stretched by up to a quarter at random so
/// that a fleet of hosts does not retry in step (bounded: at most 3.5 s of waiting plus
/// the timeouts).
const RETRIES: u32 = 4;

/// How long a signed URL is valid. A request is checked when it arrives, so this only
/// has to cover the time from signing to sending (plus clock skew), not the transfer.
const SIGNATURE_VALID: Duration = Duration::from_secs(15 * 60);

/// The most pages one listing may take (10 million keys at 1,000 per page): a server that
/// keeps answering "truncated" cannot keep the client busy for ever.
const MAX_LIST_PAGES: usize = 10_000;

/// S3's smallest part (all but the last part of a multipart upload).
const MIN_PART: u64 = 5 << 20;
/// S3's largest number of parts.
const MAX_PARTS: u64 = 10_000;

static READ_TIMEOUT_SECS: AtomicU64 = AtomicU64::new(120);

/// Objects larger than this go up as multipart uploads in parts of this size. 0: not set
/// here (then `COLDCLONE_S3_MULTIPART_THRESHOLD`, else [`DEFAULT_MULTIPART_THRESHOLD`]).
static MULTIPART_THRESHOLD: AtomicU64 = AtomicU64::new(0);

/// The default multipart threshold and part size: 64 MiB. Packs are 16 MiB by default, so
/// they go up in one PUT unless a repository has larger packs or the threshold is lowered
/// (for a store or proxy that limits the size of one request).
pub const DEFAULT_MULTIPART_THRESHOLD: u64 = 64 << 20;

/// Shorten the S3 read/write timeout (seconds): for tests of stalled servers only.
#[doc(hidden)]
pub fn set_s3_timeout_for_tests(secs: u64) {
    READ_TIMEOUT_SECS.store(secs.max(1), Ordering::Relaxed);
}

/// Set the multipart threshold (bytes; also the part size) for the S3 backends this
/// process opens afterwards; at least 5 MiB (S3's smallest part). The environment variable
/// `COLDCLONE_S3_MULTIPART_THRESHOLD` (bytes) does the same for a whole program.
pub fn set_s3_multipart_threshold(bytes: u64) {
    MULTIPART_THRESHOLD.store(bytes.max(MIN_PART), Ordering::Relaxed);
}

fn multipart_threshold() -> Result<u64> {
    let set = MULTIPART_THRESHOLD.load(Ordering::Relaxed);
    if set > 0 {
        return Ok(set);
    }
    match std::env::var("COLDCLONE_S3_MULTIPART_THRESHOLD") {
        Err(_) => Ok(DEFAULT_MULTIPART_THRESHOLD),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(n) if n >= MIN_PART => Ok(n),
            _ => Err(RepoError::InvalidArgument(format!(
                "COLDCLONE_S3_MULTIPART_THRESHOLD={v:?}: give a number of bytes, at least {MIN_PART} (5 MiB)"
            ))),
        },
    }
}

pub(crate) struct S3Backend {
    agent: ureq::Agent,
    /// `http://host:port` without a trailing slash, for messages.
    endpoint: String,
    bucket: Bucket,
    prefix: String,
    credentials: Credentials,
    multipart_threshold: u64,
}

/// One request the backend makes.
enum Op<'a> {
    HeadBucket,
    CreateBucket,
    Put(&'a str),
    Get(&'a str),
    Head(&'a str),
    Delete(&'a str),
    List {
        prefix: &'a str,
        token: Option<&'a str>,
        max_keys: Option<usize>,
    },
    CreateMultipart(&'a str),
    UploadPart {
        key: &'a str,
        part: u16,
        upload_id: &'a str,
    },
    CompleteMultipart {
        key: &'a str,
        upload_id: &'a str,
    },
    AbortMultipart {
        key: &'a str,
        upload_id: &'a str,
    },
}

impl Op<'_> {
    /// The object key, for messages ('' = the bucket).
    fn key(&self) -> &str {
        match self {
            Op::HeadBucket | Op::CreateBucket | Op::List { .. } => "",
            Op::Put(k) | Op::Get(k) | Op::Head(k) | Op::Delete(k) | Op::CreateMultipart(k) => k,
            Op::UploadPart { key, .. }
            | Op::CompleteMultipart { key, .. }
            | Op::AbortMultipart { key, .. } => key,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Op::HeadBucket | Op::Head(_) => "HEAD",
            Op::CreateBucket | Op::Put(_) => "PUT",
            Op::Get(_) => "GET",
            Op::Delete(_) => "DELETE",
            Op::List { .. } => "LIST",
            Op::CreateMultipart(_) => "CreateMultipartUpload",
            Op::UploadPart { .. } => "UploadPart",
            Op::CompleteMultipart { .. } => "CompleteMultipartUpload",
            Op::AbortMultipart { .. } => "AbortMultipartUpload",
        }
    }
}

/// `Content-MD5` of a body: base64 of its MD5.
fn content_md5(body: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Md5::digest(body))
}

/// Whether the server's ETag for an object or part it just stored says that it received
/// something else than `body`: S3 and the servers coldclone is tested with (moto, s3s-fs,
/// Garage) answer the hex MD5 of what they stored, and not all of them check Content-MD5
/// (moto and s3s-fs store a part damaged on the way; the multipart tests showed it). An
/// ETag that is not 32 hex digits (encryption with KMS keys on AWS, some other stores)
/// cannot be judged and passes; `COLDCLONE_S3_VERIFY_ETAG=0` turns the check off for a
/// store whose plain ETags are not MD5s.
fn etag_mismatch(etag: Option<&str>, body: &[u8]) -> Option<String> {
    let etag = etag?.trim().trim_matches('"');
    if etag.len() != 32 || !etag.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    if std::env::var("COLDCLONE_S3_VERIFY_ETAG").is_ok_and(|v| v == "0") {
        return None;
    }
    let mine = crate::util::to_hex(&Md5::digest(body));
    (!etag.eq_ignore_ascii_case(&mine)).then(|| {
        format!(
            "the server stored something else than was sent (its ETag {etag} is not the MD5 {mine} of the body): damaged on the way; if this store's ETags are not MD5s, set COLDCLONE_S3_VERIFY_ETAG=0"
        )
    })
}

/// Milliseconds to wait before attempt `attempt` (1-based): 200 << attempt, plus up to a
/// quarter of it at random.
fn backoff_ms(attempt: u32) -> u64 {
    let base = 200u64 << attempt.min(8);
    let r = u16::from_le_bytes(crate::crypto::random_bytes::<2>()) as u64;
    base + base * r / (4 * 65_536)
}

/// Unix seconds of an ISO 8601 UTC time like `2026-11-23T10:00:00.000Z` (0 if unparsable).
fn parse_iso(s: &str) -> i64 {
    let p = |a: usize, b: usize| s.get(a..b).and_then(|x| x.parse::<i64>().ok());
    let (Some(y), Some(mo), Some(d), Some(h), Some(mi), Some(se)) =
        (p(0, 4), p(5, 7), p(8, 10), p(11, 13), p(14, 16), p(17, 19))
    else {
        return 0;
    };
    // days_from_civil (H. Hinnant)
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = if y2 >= 0 { y2 } else { y2 - 399 } / 400;
    let yoe = y2 - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + h * 3600 + mi * 60 + se
}

fn xml_unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// All `<tag>…</tag>` texts in `xml`, in order.
fn xml_all<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(a) = rest.find(&open) {
        let after = &rest[a + open.len()..];
        let Some(b) = after.find(&close) else { break };
        out.push(&after[..b]);
        rest = &after[b + close.len()..];
    }
    out
}

static LIST_PAGE_SIZE: AtomicU64 = AtomicU64::new(0);

/// Ask for listings in pages of `n` keys (`max-keys`; 0 = the server's default, 1,000 on
/// AWS): for tests that walk many pages with few objects.
#[doc(hidden)]
pub fn set_s3_list_page_size_for_tests(n: u64) {
    LIST_PAGE_SIZE.store(n, Ordering::Relaxed);
}

fn list_page_size() -> Option<u64> {
    Some(LIST_PAGE_SIZE.load(Ordering::Relaxed)).filter(|n| *n > 0)
}

/// One page of a ListObjectsV2 answer, checked.
#[derive(Debug)]
struct ListPage {
    objects: Vec<ObjectInfo>,
    truncated: bool,
    next_token: Option<String>,
}

/// A key of a listing answered with `encoding-type=url`: `%XX` is a byte, `+` a space (as
/// AWS encodes; coldclone's keys have neither), and the result must be UTF-8. Anything
/// else is refused, never guessed at.
fn url_decode(s: &str) -> std::result::Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("the key {s:?} has a bad %-escape"))?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("the key {s:?} does not decode to UTF-8"))
}

/// Parse one ListObjectsV2 page for a listing of `full` (`prefix/dir/`). The answer comes
/// from a server coldclone does not control: every key must lie under `full` (else the
/// page is refused: a key elsewhere would be taken for one of the repository's objects),
/// and keys are cut only after `root` (`prefix/`, or nothing), which they are known to start
/// with, so a key of any UTF-8 shape cannot split a character. Objects whose last
/// component starts with '.' are a writer's temporary objects and are left out.
fn parse_list_page(text: &str, full: &str, root: &str) -> std::result::Result<ListPage, String> {
    debug_assert!(full.starts_with(root));
    let mut objects = Vec::new();
    // rusty-s3 asks for `encoding-type=url`. moto and s3s-fs ignore it; Garage (and AWS)
    // answer with `<EncodingType>url</EncodingType>` and URL-encoded keys, which must be
    // decoded before they are compared with the prefix (found by tests/fleet_garage.rs).
    let url_encoded = match xml_all(text, "EncodingType").first().map(|s| s.trim()) {
        None => false,
        Some("url") => true,
        Some(other) => return Err(format!("the listing's EncodingType {other:?} is unknown")),
    };
    for c in xml_all(text, "Contents") {
        let key = match xml_all(c, "Key").first() {
            Some(k) if url_encoded => url_decode(&xml_unescape(k))?,
            Some(k) => xml_unescape(k),
            None => return Err("an entry without a Key".into()),
        };
        if !key.starts_with(full) {
            return Err(format!("the key {key:?} lies outside the listed prefix"));
        }
        // `full` starts with `root`, so both cuts fall on the boundaries of known strings.
        let relative = &key[root.len()..];
        if key.len() == full.len() || relative.rsplit('/').next().unwrap_or("").starts_with('.') {
            continue;
        }
        let size = match xml_all(c, "Size").first() {
            None => 0,
            Some(s) => s
                .trim()
                .parse()
                .map_err(|_| format!("the size {s:?} of {key:?} is not a number"))?,
        };
        let mtime = xml_all(c, "LastModified")
            .first()
            .map(|s| parse_iso(s))
            .unwrap_or(0);
        objects.push(ObjectInfo {
            key: relative.to_string(),
            size,
            mtime,
        });
    }
    let truncated = match xml_all(text, "IsTruncated").first().map(|s| s.trim()) {
        Some("true") => true,
        Some("false") | None => false,
        Some(other) => return Err(format!("IsTruncated is {other:?}")),
    };
    let next_token = xml_all(text, "NextContinuationToken")
        .first()
        .map(|t| xml_unescape(t))
        .filter(|t| !t.is_empty());
    Ok(ListPage {
        objects,
        truncated,
        next_token,
    })
}

/// An answer: its body and the headers coldclone reads.
struct Answer {
    body: Vec<u8>,
    etag: Option<String>,
    content_length: Option<u64>,
}

enum Outcome {
    Ok(Answer),
    NotFound,
}

impl S3Backend {
    pub(crate) fn new(loc: &Location) -> Result<S3Backend> {
        let Location::S3 {
            endpoint,
            bucket,
            prefix,
            region,
            access_key,
            secret_key,
        } = loc
        else {
            return Err(RepoError::InvalidArgument("not an S3 location".into()));
        };
        let endpoint = endpoint.trim_end_matches('/').to_string();
        if !(endpoint.starts_with("https://") || endpoint.starts_with("http://")) {
            return Err(RepoError::InvalidArgument(format!(
                "S3 endpoint {endpoint:?} must start with http:// or https://"
            )));
        }
        if bucket.is_empty() || bucket.contains('/') {
            return Err(RepoError::InvalidArgument(format!(
                "S3 bucket name {bucket:?} is not valid"
            )));
        }
        let url = url::Url::parse(&endpoint).map_err(|e| {
            RepoError::InvalidArgument(format!("S3 endpoint {endpoint:?} is not a URL: {e}"))
        })?;
        let region = if region.is_empty() {
            "us-east-1".to_string()
        } else {
            region.clone()
        };
        let bucket = Bucket::new(url, UrlStyle::Path, bucket.clone(), region).map_err(|e| {
            RepoError::InvalidArgument(format!(
                "S3 endpoint {endpoint:?} or bucket {bucket:?}: {e}"
            ))
        })?;
        let io_timeout = Duration::from_secs(READ_TIMEOUT_SECS.load(Ordering::Relaxed));
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(io_timeout)
            .timeout_write(io_timeout)
            .build();
        Ok(S3Backend {
            agent,
            endpoint,
            bucket,
            prefix: prefix.trim_matches('/').to_string(),
            credentials: Credentials::new(access_key.clone(), secret_key.clone()),
            multipart_threshold: multipart_threshold()?,
        })
    }

    fn object(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    /// The HTTP method and signed URL of `op`; `md5` (a body's `Content-MD5`) is signed
    /// with it and must be sent.
    fn sign(&self, op: &Op, md5: Option<&str>) -> (&'static str, url::Url) {
        fn signed<'a, A: S3Action<'a>>(mut a: A, md5: Option<&'a str>) -> url::Url {
            if let Some(m) = md5 {
                a.headers_mut().insert("content-md5", m);
            }
            a.sign(SIGNATURE_VALID)
        }
        let (b, c) = (&self.bucket, Some(&self.credentials));
        match *op {
            Op::HeadBucket => ("HEAD", signed(b.head_bucket(c), md5)),
            Op::CreateBucket => ("PUT", signed(b.create_bucket(&self.credentials), md5)),
            Op::Put(k) => ("PUT", signed(b.put_object(c, k), md5)),
            Op::Get(k) => ("GET", signed(b.get_object(c, k), md5)),
            Op::Head(k) => ("HEAD", signed(b.head_object(c, k), md5)),
            Op::Delete(k) => ("DELETE", signed(b.delete_object(c, k), md5)),
            Op::List {
                prefix,
                token,
                max_keys,
            } => {
                let mut a = b.list_objects_v2(c);
                a.with_prefix(prefix);
                if let Some(t) = token {
                    a.with_continuation_token(t);
                }
                if let Some(n) = max_keys {
                    a.with_max_keys(n);
                }
                ("GET", signed(a, md5))
            }
            Op::CreateMultipart(k) => ("POST", signed(b.create_multipart_upload(c, k), md5)),
            Op::UploadPart {
                key,
                part,
                upload_id,
            } => ("PUT", signed(b.upload_part(c, key, part, upload_id), md5)),
            Op::CompleteMultipart { key, upload_id } => (
                "POST",
                signed(
                    b.complete_multipart_upload(c, key, upload_id, std::iter::empty()),
                    md5,
                ),
            ),
            Op::AbortMultipart { key, upload_id } => (
                "DELETE",
                signed(b.abort_multipart_upload(c, key, upload_id), md5),
            ),
        }
    }

    /// One signed request with retries (signed afresh for each attempt).
    fn request(&self, op: &Op, body: &[u8], range: Option<(u64, u64)>) -> Result<Outcome> {
        let md5 = (!body.is_empty()).then(|| content_md5(body));
        let mut last = String::new();
        for attempt in 0..RETRIES {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(backoff_ms(attempt)));
            }
            match self.request_once(op, md5.as_deref(), body, range) {
                Ok(Outcome::Ok(a)) if matches!(op, Op::Put(_) | Op::UploadPart { .. }) => {
                    match etag_mismatch(a.etag.as_deref(), body) {
                        None => return Ok(Outcome::Ok(a)),
                        Some(msg) => last = msg,
                    }
                }
                Ok(o) => return Ok(o),
                Err((retry, msg)) => {
                    last = msg;
                    if !retry {
                        break;
                    }
                }
            }
        }
        Err(self.error(op, last))
    }

    fn error(&self, op: &Op, detail: String) -> RepoError {
        RepoError::S3 {
            op: op.name().into(),
            key: format!("{}/{}", self.bucket.name(), op.key()),
            detail,
        }
    }

    fn request_once(
        &self,
        op: &Op,
        md5: Option<&str>,
        body: &[u8],
        range: Option<(u64, u64)>,
    ) -> std::result::Result<Outcome, (bool, String)> {
        let (method, url) = self.sign(op, md5);
        let mut req = self.agent.request_url(method, &url);
        if let Some(m) = md5 {
            req = req.set("Content-MD5", m);
        }
        if let Some((a, b)) = range {
            req = req.set("Range", &format!("bytes={a}-{b}"));
        }
        let resp = if method == "PUT" || method == "POST" {
            req.send_bytes(body)
        } else {
            req.call()
        };
        match resp {
            Ok(r) => {
                let etag = r.header("ETag").map(|s| s.to_string());
                let content_length = r.header("Content-Length").and_then(|s| s.parse().ok());
                let mut v = Vec::new();
                r.into_reader()
                    .take(2 << 30)
                    .read_to_end(&mut v)
                    .map_err(|e| (true, format!("reading the response: {e}")))?;
                Ok(Outcome::Ok(Answer {
                    body: v,
                    etag,
                    content_length,
                }))
            }
            Err(ureq::Error::Status(404, _)) => Ok(Outcome::NotFound),
            Err(ureq::Error::Status(code, r)) => {
                let text = r.into_string().unwrap_or_default();
                let code_s = xml_all(&text, "Code")
                    .first()
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                let msg = xml_all(&text, "Message")
                    .first()
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                // BadDigest: the body arrived damaged (its Content-MD5 did not match), so
                // sending it again is the cure.
                let retry = code >= 500 || code == 429 || code == 408 || code_s == "BadDigest";
                Err((retry, format!("HTTP {code} {code_s} {msg}")))
            }
            Err(e) => Err((true, format!("{e}"))),
        }
    }

    /// Upload `data` as `key` in parts of the multipart threshold. On failure the upload
    /// is aborted (its parts freed); the object never appears in part.
    fn put_multipart(&self, key: &str, data: &[u8]) -> Result<()> {
        let part_size = self
            .multipart_threshold
            .max(data.len() as u64 / MAX_PARTS + 1)
            .max(MIN_PART) as usize;
        let create = Op::CreateMultipart(key);
        let upload_id = match self.request(&create, &[], None)? {
            Outcome::Ok(a) => {
                let text = String::from_utf8_lossy(&a.body);
                CreateMultipartUpload::parse_response(&text)
                    .map(|r| r.upload_id().to_string())
                    .ok()
                    .or_else(|| xml_all(&text, "UploadId").first().map(|s| xml_unescape(s)))
                    .filter(|id| !id.is_empty())
                    .ok_or_else(|| self.error(&create, "the answer has no UploadId".into()))?
            }
            Outcome::NotFound => {
                return Err(self.error(&create, "the bucket does not exist".into()))
            }
        };
        let res = self.upload_parts(key, &upload_id, data, part_size);
        if res.is_err() {
            let abort = Op::AbortMultipart {
                key,
                upload_id: &upload_id,
            };
            if let Err(e) = self.request(&abort, &[], None) {
                tracing::warn!("cannot abort the failed multipart upload of {key}: {e}");
            }
        }
        res
    }

    fn upload_parts(
        &self,
        key: &str,
        upload_id: &str,
        data: &[u8],
        part_size: usize,
    ) -> Result<()> {
        let mut etags = Vec::new();
        for (i, part) in data.chunks(part_size).enumerate() {
            let op = Op::UploadPart {
                key,
                part: u16::try_from(i + 1).map_err(|_| {
                    RepoError::InvalidArgument(format!("{key}: more than 65535 parts"))
                })?,
                upload_id,
            };
            match self.request(&op, part, None)? {
                Outcome::Ok(a) => match a.etag.filter(|e| !e.is_empty()) {
                    Some(e) => etags.push(e),
                    None => return Err(self.error(&op, "the answer has no ETag".into())),
                },
                Outcome::NotFound => {
                    return Err(self.error(&op, "the upload is gone (NoSuchUpload)".into()))
                }
            }
        }
        let body = CompleteMultipartUpload::new(
            &self.bucket,
            Some(&self.credentials),
            key,
            upload_id,
            etags.iter().map(|s| s.as_str()),
        )
        .body();
        let op = Op::CompleteMultipart { key, upload_id };
        let mut last = String::new();
        // Complete is retried here, not in `request`: S3 may answer 200 with an error in
        // the body, and a retry after a completion whose answer was lost finds no upload.
        for attempt in 0..RETRIES {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(backoff_ms(attempt)));
            }
            match self.request_once(
                &op,
                Some(&content_md5(body.as_bytes())),
                body.as_bytes(),
                None,
            ) {
                Ok(Outcome::Ok(a)) => {
                    let text = String::from_utf8_lossy(&a.body);
                    // AWS answers CompleteMultipartUploadResult; moto names it ...Response.
                    if text.contains("<CompleteMultipartUpload") && !text.contains("<Error>") {
                        return Ok(());
                    }
                    last = format!(
                        "answered 200 with {} {}",
                        xml_all(&text, "Code").first().unwrap_or(&"no result"),
                        xml_all(&text, "Message").first().unwrap_or(&"")
                    );
                }
                Ok(Outcome::NotFound) => {
                    last = "the upload is gone (NoSuchUpload)".into();
                    break;
                }
                Err((retry, msg)) => {
                    last = msg;
                    if !retry {
                        break;
                    }
                }
            }
        }
        // An earlier attempt may have completed the upload and lost its answer: then the
        // upload is gone (NoSuchUpload; s3s-fs says AccessDenied) and the object is there.
        // Objects are named by random or content ids, so one of that key and size is this.
        if let Ok(Some(n)) = self.size_of(key) {
            if n == data.len() as u64 {
                tracing::info!("{key}: multipart upload found complete after its answer was lost");
                return Ok(());
            }
        }
        Err(self.error(&op, last))
    }

    /// The size of an object, None when there is none.
    fn size_of(&self, key: &str) -> Result<Option<u64>> {
        match self.request(&Op::Head(key), &[], None)? {
            Outcome::Ok(a) => Ok(a.content_length),
            Outcome::NotFound => Ok(None),
        }
    }

    fn list_error(&self, full: &str, detail: String) -> RepoError {
        RepoError::S3 {
            op: "LIST".into(),
            key: format!("{}/{full}", self.bucket.name()),
            detail: format!("refused the server's listing: {detail}"),
        }
    }

    fn not_found(&self, key: &str) -> RepoError {
        RepoError::Io {
            path: format!("s3://{}/{}", self.bucket.name(), self.object(key)),
            source: io::Error::new(io::ErrorKind::NotFound, "no such object"),
        }
    }
}

impl Backend for S3Backend {
    fn describe(&self) -> String {
        format!(
            "s3:{}/{}/{}",
            self.endpoint,
            self.bucket.name(),
            self.prefix
        )
    }

    fn create(&self) -> Result<()> {
        match self.request(&Op::HeadBucket, &[], None)? {
            Outcome::Ok(_) => Ok(()),
            Outcome::NotFound => self.request(&Op::CreateBucket, &[], None).map(|_| ()),
        }
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        // A PUT is atomic in S3: readers see the old object or the whole new one; so is a
        // multipart upload, which appears only when it is completed.
        let key = self.object(key);
        if data.len() as u64 > self.multipart_threshold {
            return self.put_multipart(&key, data);
        }
        self.request(&Op::Put(&key), data, None).map(|_| ())
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        match self.request(&Op::Get(&self.object(key)), &[], None)? {
            Outcome::Ok(a) => Ok(a.body),
            Outcome::NotFound => Err(self.not_found(key)),
        }
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let full = self.object(key);
        match self.request(&Op::Get(&full), &[], Some((offset, offset + len - 1)))? {
            Outcome::Ok(a) if a.body.len() as u64 == len => Ok(a.body),
            Outcome::Ok(a) => Err(RepoError::corrupt(
                full,
                format!("asked for {len} bytes at {offset}, got {}", a.body.len()),
            )),
            Outcome::NotFound => Err(self.not_found(key)),
        }
    }

    fn list(&self, dir: &str) -> Result<Vec<ObjectInfo>> {
        let full = format!("{}/", self.object(dir.trim_end_matches('/')));
        let root = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        for _page in 0..MAX_LIST_PAGES {
            let op = Op::List {
                prefix: &full,
                token: token.as_deref(),
                max_keys: list_page_size().map(|n| n as usize),
            };
            let body = match self.request(&op, &[], None)? {
                Outcome::Ok(a) => a.body,
                Outcome::NotFound => {
                    return Err(RepoError::NotFound {
                        location: self.describe(),
                        detail: "the bucket does not exist".into(),
                    })
                }
            };
            let page = parse_list_page(&String::from_utf8_lossy(&body), &full, &root)
                .map_err(|detail| self.list_error(&full, detail))?;
            out.extend(page.objects);
            match (page.truncated, page.next_token) {
                (false, _) => {
                    out.sort_by(|a, b| a.key.cmp(&b.key));
                    return Ok(out);
                }
                (true, Some(next)) if token.as_deref() != Some(next.as_str()) => token = Some(next),
                // Stopping here would return a short listing as if it were whole, and a
                // prune that misses snapshots deletes the data they hold.
                (true, Some(_)) => {
                    return Err(
                        self.list_error(&full, "the server repeated its continuation token".into())
                    )
                }
                (true, None) => {
                    return Err(self.list_error(
                        &full,
                        "the listing is truncated but has no NextContinuationToken".into(),
                    ))
                }
            }
        }
        Err(self.list_error(&full, format!("more than {MAX_LIST_PAGES} pages")))
    }

    fn delete(&self, key: &str) -> Result<()> {
        self.request(&Op::Delete(&self.object(key)), &[], None)
            .map(|_| ())
    }

    fn exists(&self, key: &str) -> Result<bool> {
        Ok(matches!(
            self.request(&Op::Head(&self.object(key)), &[], None)?,
            Outcome::Ok(_)
        ))
    }

    fn parallel_requests(&self) -> usize {
        8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_dates() {
        assert_eq!(parse_iso("1970-01-01T00:00:00.000Z"), 0);
        assert_eq!(parse_iso("2026-11-18T11:06:40Z"), 1_795_000_000);
        assert_eq!(parse_iso("garbage"), 0);
    }

    #[test]
    fn md5_backoff_and_xml() {
        // RFC 1321's test vector for "abc", base64 as Content-MD5 wants it.
        assert_eq!(content_md5(b"abc"), "kAFQmDzST7DWlj99KOF/cg==");
        let abc = "\"900150983cd24fb0d6963f7d28e17f72\"";
        assert_eq!(etag_mismatch(Some(abc), b"abc"), None);
        assert!(etag_mismatch(Some(abc), b"abd").is_some());
        assert_eq!(etag_mismatch(Some("\"x-2\""), b"abd"), None);
        assert_eq!(etag_mismatch(None, b"abd"), None);
        for attempt in 1..RETRIES {
            let ms = backoff_ms(attempt);
            let base = 200u64 << attempt;
            assert!((base..=base + base / 4).contains(&ms), "{attempt}: {ms}");
        }
        let x = "<L><Contents><Key>a&amp;b</Key><Size>3</Size></Contents><Contents><Key>c</Key></Contents></L>";
        let c = xml_all(x, "Contents");
        assert_eq!(c.len(), 2);
        assert_eq!(xml_unescape(xml_all(c[0], "Key")[0]), "a&b");
    }

    fn page(keys: &[&str], truncated: &str, token: Option<&str>) -> String {
        let mut x = String::from("<ListBucketResult>");
        for k in keys {
            x += &format!("<Contents><Key>{k}</Key><Size>7</Size></Contents>");
        }
        x += &format!("<IsTruncated>{truncated}</IsTruncated>");
        if let Some(t) = token {
            x += &format!("<NextContinuationToken>{t}</NextContinuationToken>");
        }
        x + "</ListBucketResult>"
    }

    #[test]
    fn list_pages_are_checked() {
        let ok = parse_list_page(
            &page(
                &["p/data/a", "p/data/.tmp-x", "p/data/", "p/data/b"],
                "true",
                Some("t"),
            ),
            "p/data/",
            "p/",
        )
        .unwrap();
        let keys: Vec<_> = ok.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, ["data/a", "data/b"]);
        assert!(ok.truncated);
        assert_eq!(ok.next_token.as_deref(), Some("t"));
        // A key outside the prefix, e.g. another repository's in the same bucket.
        let e = parse_list_page(&page(&["q/data/a"], "false", None), "p/data/", "p/").unwrap_err();
        assert!(e.contains("outside"), "{e}");
        // A key that would split a multi-byte character where the old code cut it.
        let e = parse_list_page(&page(&["p\u{e9}data/x"], "false", None), "p/data/", "p/");
        assert!(e.is_err());
        let e = parse_list_page(&page(&["p/data/a"], "maybe", None), "p/data/", "p/").unwrap_err();
        assert!(e.contains("IsTruncated"), "{e}");
        let e = parse_list_page(
            "<Contents><Key>data/a</Key><Size>x</Size></Contents>",
            "data/",
            "",
        )
        .unwrap_err();
        assert!(e.contains("size"), "{e}");
        // Garage's answer to encoding-type=url: keys URL-encoded, decoded before the check.
        let garage = page(&["p%2Fdata%2Fa", "p%2Fdata%2F.tmp-x"], "false", None).replace(
            "<IsTruncated>",
            "<EncodingType>url</EncodingType><IsTruncated>",
        );
        let ok = parse_list_page(&garage, "p/data/", "p/").unwrap();
        let keys: Vec<_> = ok.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, ["data/a"]);
        for bad in ["p%2Fdata%2", "p%2Fdata%2Fa%zz", "p%2Fdata%2F%ff"] {
            let x = page(&[bad], "false", None).replace(
                "<IsTruncated>",
                "<EncodingType>url</EncodingType><IsTruncated>",
            );
            assert!(parse_list_page(&x, "p/data/", "p/").is_err(), "{bad}");
        }
        // Encoded, it still must lie under the prefix.
        let x = page(&["q%2Fdata%2Fa"], "false", None).replace(
            "<IsTruncated>",
            "<EncodingType>url</EncodingType><IsTruncated>",
        );
        assert!(parse_list_page(&x, "p/data/", "p/")
            .unwrap_err()
            .contains("outside"));
        let x = page(&["p/data/a"], "false", None).replace(
            "<IsTruncated>",
            "<EncodingType>base64</EncodingType><IsTruncated>",
        );
        assert!(parse_list_page(&x, "p/data/", "p/").is_err());
    }

    proptest::proptest! {
        /// Whatever a server sends, parsing never panics, and every key it yields lies
        /// under the listed folder.
        #[test]
        fn list_parsing_never_panics_and_stays_under_the_prefix(
            keys in proptest::collection::vec("[a-zé/.\\u{1F600}&;<>]{0,12}", 0..6),
            junk in ".{0,40}",
            truncated in "(true|false|)",
        ) {
            let body = page(&keys.iter().map(|k| k.as_str()).collect::<Vec<_>>(), &truncated, None) + &junk;
            for (full, root) in [("p/data/", "p/"), ("data/", ""), ("é/data/", "é/")] {
                if let Ok(p) = parse_list_page(&body, full, root) {
                    for o in p.objects {
                        let whole = format!("{root}{}", o.key);
                        proptest::prop_assert!(whole.starts_with(full), "{} not under {}", whole, full);
                    }
                }
                let _ = parse_list_page(&junk, full, root);
            }
        }
    }
}
