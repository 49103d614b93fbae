//! S3-compatible object storage: a small AWS Signature V4 client over `ureq`.
//! Path-style requests (`endpoint/bucket/key`), which every S3-compatible server accepts.

use super::{Backend, ObjectInfo};
use crate::error::{RepoError, Result};
use crate::util::{civil_from_days, now_unix, to_hex};
use crate::Location;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

type HmacSha256 = Hmac<Sha256>;

/// Attempts per request: a 5xx, 429, 408 or transport error (reset, timeout) is retried
/// with backoff 0.4, 0.8, 1.6 s (bounded: at most ~3 s of waiting plus the timeouts).
const RETRIES: u32 = 4;

/// The most pages one listing may take (10 million keys at 1,000 per page): a server that
/// keeps answering "truncated" cannot keep the client busy for ever.
const MAX_LIST_PAGES: usize = 10_000;

static READ_TIMEOUT_SECS: AtomicU64 = AtomicU64::new(120);

/// Shorten the S3 read/write timeout (seconds): for tests of stalled servers only.
#[doc(hidden)]
pub fn set_s3_timeout_for_tests(secs: u64) {
    READ_TIMEOUT_SECS.store(secs.max(1), Ordering::Relaxed);
}

pub(crate) struct S3Backend {
    agent: ureq::Agent,
    /// `http://host:port` without a trailing slash.
    endpoint: String,
    host: String,
    bucket: String,
    prefix: String,
    region: String,
    access_key: String,
    secret_key: String,
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length.
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

fn sha256_hex(data: &[u8]) -> String {
    to_hex(&Sha256::digest(data))
}

/// RFC 3986 encoding as SigV4 wants it; '/' kept when `keep_slash`.
fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                o.push(b as char)
            }
            b'/' if keep_slash => o.push('/'),
            _ => o.push_str(&format!("%{b:02X}")),
        }
    }
    o
}

fn amz_date(t: i64) -> (String, String) {
    let (y, m, d) = civil_from_days(t.div_euclid(86_400));
    let s = t.rem_euclid(86_400);
    let date = format!("{y:04}{m:02}{d:02}");
    (
        format!("{date}T{:02}{:02}{:02}Z", s / 3600, s / 60 % 60, s % 60),
        date,
    )
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

/// Parse one ListObjectsV2 page for a listing of `full` (`prefix/dir/`). The answer comes
/// from a server coldclone does not control: every key must lie under `full` (else the
/// page is refused: a key elsewhere would be taken for one of the repository's objects),
/// and keys are cut only after `root` (`prefix/`, or nothing), which they are known to start
/// with, so a key of any UTF-8 shape cannot split a character. Objects whose last
/// component starts with '.' are a writer's temporary objects and are left out.
fn parse_list_page(text: &str, full: &str, root: &str) -> std::result::Result<ListPage, String> {
    debug_assert!(full.starts_with(root));
    let mut objects = Vec::new();
    for c in xml_all(text, "Contents") {
        let key = match xml_all(c, "Key").first() {
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

enum Outcome {
    Ok(Vec<u8>),
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
        let host = endpoint
            .strip_prefix("https://")
            .or_else(|| endpoint.strip_prefix("http://"))
            .ok_or_else(|| {
                RepoError::InvalidArgument(format!(
                    "S3 endpoint {endpoint:?} must start with http:// or https://"
                ))
            })?
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        if bucket.is_empty() || bucket.contains('/') {
            return Err(RepoError::InvalidArgument(format!(
                "S3 bucket name {bucket:?} is not valid"
            )));
        }
        let io_timeout = Duration::from_secs(READ_TIMEOUT_SECS.load(Ordering::Relaxed));
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout_read(io_timeout)
            .timeout_write(io_timeout)
            .build();
        Ok(S3Backend {
            agent,
            endpoint,
            host,
            bucket: bucket.clone(),
            prefix: prefix.trim_matches('/').to_string(),
            region: if region.is_empty() {
                "us-east-1".into()
            } else {
                region.clone()
            },
            access_key: access_key.clone(),
            secret_key: secret_key.clone(),
        })
    }

    fn object(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }

    /// One signed request with retries. `path` is the object key ('' = the bucket).
    fn request(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, String)],
        body: &[u8],
        range: Option<(u64, u64)>,
    ) -> Result<Outcome> {
        let mut last = String::new();
        for attempt in 0..RETRIES {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200 << attempt));
            }
            match self.request_once(method, path, query, body, range) {
                Ok(o) => return Ok(o),
                Err((retry, msg)) => {
                    last = msg;
                    if !retry {
                        break;
                    }
                }
            }
        }
        Err(RepoError::S3 {
            op: method.into(),
            key: format!("{}/{}", self.bucket, path),
            detail: last,
        })
    }

    fn request_once(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, String)],
        body: &[u8],
        range: Option<(u64, u64)>,
    ) -> std::result::Result<Outcome, (bool, String)> {
        let (amz, date) = amz_date(now_unix());
        let uri = if path.is_empty() {
            format!("/{}", uri_encode(&self.bucket, false))
        } else {
            format!(
                "/{}/{}",
                uri_encode(&self.bucket, false),
                uri_encode(path, true)
            )
        };
        let mut q: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
            .collect();
        q.sort();
        let qs = q
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&");
        let payload = sha256_hex(body);
        let canonical = format!(
            "{method}\n{uri}\n{qs}\nhost:{}\nx-amz-content-sha256:{payload}\nx-amz-date:{amz}\n\nhost;x-amz-content-sha256;x-amz-date\n{payload}",
            self.host
        );
        let scope = format!("{date}/{}/s3/aws4_request", self.region);
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n{amz}\n{scope}\n{}",
            sha256_hex(canonical.as_bytes())
        );
        let k = hmac(
            format!("AWS4{}", self.secret_key).as_bytes(),
            date.as_bytes(),
        );
        let k = hmac(&k, self.region.as_bytes());
        let k = hmac(&k, b"s3");
        let k = hmac(&k, b"aws4_request");
        let sig = to_hex(&hmac(&k, to_sign.as_bytes()));
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={sig}",
            self.access_key
        );
        let url = if qs.is_empty() {
            format!("{}{uri}", self.endpoint)
        } else {
            format!("{}{uri}?{qs}", self.endpoint)
        };
        let mut req = self
            .agent
            .request(method, &url)
            .set("x-amz-date", &amz)
            .set("x-amz-content-sha256", &payload)
            .set("Authorization", &auth);
        if let Some((a, b)) = range {
            req = req.set("Range", &format!("bytes={a}-{b}"));
        }
        let resp = if method == "PUT" {
            req.send_bytes(body)
        } else {
            req.call()
        };
        match resp {
            Ok(r) => {
                let mut v = Vec::new();
                r.into_reader()
                    .take(2 << 30)
                    .read_to_end(&mut v)
                    .map_err(|e| (true, format!("reading the response: {e}")))?;
                Ok(Outcome::Ok(v))
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
                let retry = code >= 500 || code == 429 || code == 408;
                Err((retry, format!("HTTP {code} {code_s} {msg}")))
            }
            Err(e) => Err((true, format!("{e}"))),
        }
    }

    fn list_error(&self, full: &str, detail: String) -> RepoError {
        RepoError::S3 {
            op: "LIST".into(),
            key: format!("{}/{full}", self.bucket),
            detail: format!("refused the server's listing: {detail}"),
        }
    }

    fn not_found(&self, key: &str) -> RepoError {
        RepoError::Io {
            path: format!("s3://{}/{}", self.bucket, self.object(key)),
            source: io::Error::new(io::ErrorKind::NotFound, "no such object"),
        }
    }
}

impl Backend for S3Backend {
    fn describe(&self) -> String {
        format!("s3:{}/{}/{}", self.endpoint, self.bucket, self.prefix)
    }

    fn create(&self) -> Result<()> {
        match self.request("HEAD", "", &[], &[], None)? {
            Outcome::Ok(_) => Ok(()),
            Outcome::NotFound => self.request("PUT", "", &[], &[], None).map(|_| ()),
        }
    }

    fn put(&self, key: &str, data: &[u8]) -> Result<()> {
        // A PUT is atomic in S3: readers see the old object or the whole new one.
        self.request("PUT", &self.object(key), &[], data, None)
            .map(|_| ())
    }

    fn get(&self, key: &str) -> Result<Vec<u8>> {
        match self.request("GET", &self.object(key), &[], &[], None)? {
            Outcome::Ok(v) => Ok(v),
            Outcome::NotFound => Err(self.not_found(key)),
        }
    }

    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        match self.request(
            "GET",
            &self.object(key),
            &[],
            &[],
            Some((offset, offset + len - 1)),
        )? {
            Outcome::Ok(v) if v.len() as u64 == len => Ok(v),
            Outcome::Ok(v) => Err(RepoError::corrupt(
                self.object(key),
                format!("asked for {len} bytes at {offset}, got {}", v.len()),
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
            let mut q = vec![("list-type", "2".to_string()), ("prefix", full.clone())];
            if let Some(t) = &token {
                q.push(("continuation-token", t.clone()));
            }
            if let Some(n) = list_page_size() {
                q.push(("max-keys", n.to_string()));
            }
            let body = match self.request("GET", "", &q, &[], None)? {
                Outcome::Ok(b) => b,
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
        self.request("DELETE", &self.object(key), &[], &[], None)
            .map(|_| ())
    }

    fn exists(&self, key: &str) -> Result<bool> {
        Ok(matches!(
            self.request("HEAD", &self.object(key), &[], &[], None)?,
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
        assert_eq!(amz_date(1_795_000_000).0, "20261118T110640Z");
    }

    #[test]
    fn encoding_and_xml() {
        assert_eq!(uri_encode("a b/c~", true), "a%20b/c~");
        assert_eq!(uri_encode("a/b", false), "a%2Fb");
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
