//! Small helpers: hex, UTC calendar arithmetic, host name, a hasher for random ids.

use std::hash::{BuildHasher, Hasher};

pub(crate) fn to_hex(b: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(H[(x >> 4) as usize] as char);
        s.push(H[(x & 15) as usize] as char);
    }
    s
}

pub(crate) fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    let v = |c: u8| -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    };
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(v(p[0])? << 4 | v(p[1])?))
        .collect()
}

pub(crate) fn id_from_hex(s: &str) -> Option<[u8; 32]> {
    let v = from_hex(s)?;
    v.try_into().ok()
}

static CLOCK_OFFSET: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// Move this process's wall clock by `secs` (negative: back), as an NTP step or a wrong RTC
/// would: for tests of clock jumps only. The monotonic clocks are not moved.
#[doc(hidden)]
pub fn set_clock_offset_for_tests(secs: i64) {
    CLOCK_OFFSET.store(secs, std::sync::atomic::Ordering::SeqCst);
}

/// The wall clock, Unix seconds. It may jump, backwards too: nothing that decides what to
/// keep or whether a lock is live relies on it alone (see lock.rs and prune.rs).
pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
        + CLOCK_OFFSET.load(std::sync::atomic::Ordering::SeqCst)
}

/// Seconds since boot, suspend included (CLOCK_BOOTTIME): never jumps with the wall clock.
pub(crate) fn boottime_secs() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if r != 0 {
        // Not on this kernel: the monotonic clock (without suspend) is the next best.
        return std::time::Instant::now().duration_since(*START).as_secs() as i64;
    }
    // time_t is i64 here but i32 on some 32-bit targets.
    #[allow(clippy::unnecessary_cast)]
    let secs = ts.tv_sec as i64;
    secs
}

static START: std::sync::LazyLock<std::time::Instant> =
    std::sync::LazyLock::new(std::time::Instant::now);

/// (year, month 1..=12, day 1..=31) of a day count since 1970-01-01 (H. Hinnant's algorithm).
pub(crate) fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

pub(crate) fn rfc3339(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

pub(crate) fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for buf.len() bytes; gethostname NUL-terminates on success.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if r != 0 {
        return "unknown".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Who this process is, for judging whether a lock's pid can be checked here: the
/// machine-id (differs between installations), the boot id (differs between two hosts
/// cloned from one image, which share a machine-id, and after every reboot) and the pid
/// namespace (differs between containers of one kernel). Empty when none can be read: no
/// lock is then judged by its pid.
pub(crate) fn host_id() -> String {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        };
        let machine = read("/etc/machine-id").or_else(|| read("/var/lib/dbus/machine-id"));
        let boot = read("/proc/sys/kernel/random/boot_id");
        let pidns = std::fs::read_link("/proc/self/ns/pid")
            .ok()
            .map(|p| p.to_string_lossy().into_owned());
        match (machine, boot, pidns) {
            // The boot id alone tells hosts apart; the machine-id is extra.
            (m, Some(b), Some(ns)) => format!("{}/{b}/{ns}", m.unwrap_or_default()),
            _ => String::new(),
        }
    })
    .clone()
}

/// Chunk ids are uniformly random (keyed BLAKE3): their first 8 bytes are a perfect hash.
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 ^= (*b as u64) << (i * 8);
        }
        if bytes.len() < 8 {
            self.0 = self.0.rotate_left(17) ^ bytes.len() as u64;
        }
    }
}

#[derive(Default, Clone, Copy)]
pub(crate) struct IdHashBuilder;

impl BuildHasher for IdHashBuilder {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(0)
    }
}

pub(crate) type IdMap<V> = std::collections::HashMap<[u8; 32], V, IdHashBuilder>;
pub(crate) type IdSet = std::collections::HashSet<[u8; 32], IdHashBuilder>;

/// True when every byte is zero (fast path over u64 words).
pub(crate) fn is_zero(b: &[u8]) -> bool {
    let (pre, mid, post) = unsafe { b.align_to::<u64>() };
    pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_roundtrip() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(to_hex(&b), "0001abff");
        assert_eq!(from_hex("0001abff").unwrap(), b);
        assert!(from_hex("0g").is_none());
        assert!(from_hex("abc").is_none());
    }

    #[test]
    fn calendar() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        v[4098] = 1;
        assert!(!is_zero(&v));
        assert!(!is_zero(&v[1..]));
        assert!(is_zero(&v[..4098]));
    }
}
