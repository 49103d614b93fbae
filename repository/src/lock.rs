//! Repository locks: small objects under `locks/`.
//!
//! Backups, restores and checks take *shared* locks; prune takes an *exclusive* one. A
//! taker writes its lock first, then lists `locks/`: a shared taker gives up when it sees a
//! live exclusive lock, an exclusive taker when it sees any other live lock. Two takers
//! racing both see each other (storage lists what was written before), so at worst both
//! give up; never do both proceed.
//!
//! A lock is live while it was refreshed in the last 30 minutes, and, when it was taken on
//! this host, while its process exists. "This host" is the lock's `host_id` (machine-id,
//! boot id and pid namespace), never its host name: two hypervisors cloned from one image,
//! or two containers, share a host name, and a live backup on the other one must not be
//! taken for stale because its pid does not exist here. A lock object that cannot be parsed
//! is held (it blocks everybody) until `coldclone unlock KEY` removes it on purpose.
//!
//! Holders refresh every 5 minutes; a holder that could not refresh for too long fails
//! instead of committing (its lock may have been taken for stale, so a prune may have run).
//!
//! Clocks: "refreshed in the last 30 minutes" is measured on the storage's clock, never by
//! comparing one host's wall clock with another's: a lock's age is the modification time
//! of the judge's own lock object, just written, minus the lock's modification time, both
//! set by the storage (the S3 server, the file system). A holder whose clock is behind, or
//! moved back, is not taken for stale; a judge whose clock moved back does not keep a dead
//! lock alive. Only when the storage gives no times is the lock's `time_unix` compared with
//! the judge's clock, and then a lock from the future is live. A holder measures how long it
//! went without refreshing on CLOCK_BOOTTIME, which the wall clock does not move.

use crate::backend::Backend;
use crate::crypto::random_id;
use crate::error::{RepoError, Result};
use crate::host::HostIdentity;
use crate::util::{boottime_secs, host_id, now_unix, rfc3339};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use std::sync::atomic::AtomicU64;

static STALE: AtomicU64 = AtomicU64::new(1800);
static REFRESH: AtomicU64 = AtomicU64::new(300);

fn stale_secs() -> i64 {
    STALE.load(Ordering::Relaxed) as i64
}

/// Shorten the lock timings (seconds): for tests of lock expiry and refresh only.
#[doc(hidden)]
pub fn set_lock_timings_for_tests(refresh_secs: u64, stale_secs: u64) {
    REFRESH.store(refresh_secs.max(1), Ordering::Relaxed);
    STALE.store(stale_secs.max(2), Ordering::Relaxed);
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct LockInfo {
    pub host: String,
    /// The holder's `HostIdentity::uuid` (empty: none, or an older version), shown only:
    /// whether a pid can be checked is `host_id`'s business.
    #[serde(default)]
    pub host_uuid: String,
    /// Who can judge `pid`: see `util::host_id`. Empty in locks of older versions: their
    /// pid is then never checked, only their age.
    #[serde(default)]
    pub host_id: String,
    pub pid: u32,
    pub time_unix: i64,
    pub exclusive: bool,
    pub purpose: String,
}

/// What a judge knows of "now" when it decides whether a lock is stale.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Now {
    /// The judge's wall clock.
    pub wall: i64,
    /// The storage's clock: the modification time of an object the judge just wrote.
    pub storage: Option<i64>,
}

impl LockInfo {
    /// `mtime`: the lock object's modification time in the storage (0 = unknown).
    /// `my_host`: this process's `util::host_id` (empty: unknown, no pid is checked).
    pub(crate) fn is_stale(&self, now: Now, mtime: i64, my_host: &str) -> bool {
        let age = match now.storage {
            Some(t) if mtime > 0 => t - mtime,
            // No storage times: the lock's own clock against ours; a lock from the future
            // (our clock moved back, or its holder's is ahead) is not judged by its age.
            _ => now.wall - self.time_unix,
        };
        if age > stale_secs() {
            return true;
        }
        if !my_host.is_empty() && self.host_id == my_host {
            // SAFETY: kill with signal 0 only checks that the process exists.
            let r = unsafe { libc::kill(self.pid as libc::pid_t, 0) };
            if r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
                return true;
            }
        }
        false
    }

    fn describe(&self) -> String {
        format!(
            "{} lock for {} by pid {} on host {} since {}",
            if self.exclusive {
                "an exclusive"
            } else {
                "a shared"
            },
            self.purpose,
            self.pid,
            HostIdentity {
                name: self.host.clone(),
                uuid: self.host_uuid.clone()
            }
            .describe(),
            rfc3339(self.time_unix)
        )
    }
}

pub(crate) struct LockGuard {
    backend: Arc<dyn Backend>,
    key: String,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    /// CLOCK_BOOTTIME seconds of the last successful write of the lock.
    last_refresh: Arc<AtomicI64>,
    /// The storage's clock when the lock was taken, and CLOCK_BOOTTIME then.
    storage_at_start: Option<(i64, i64)>,
}

/// One lock object: its key, its modification time in the storage, its content (None when
/// unreadable).
pub(crate) struct ListedLock {
    pub key: String,
    pub mtime: i64,
    pub info: Option<LockInfo>,
}

pub(crate) fn list_locks(backend: &dyn Backend) -> Result<Vec<ListedLock>> {
    let mut out = Vec::new();
    for o in backend.list("locks")? {
        let info = match backend.get(&o.key) {
            Ok(b) => serde_json::from_slice::<LockInfo>(&b).ok(),
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        };
        out.push(ListedLock {
            key: o.key,
            mtime: o.mtime,
            info,
        });
    }
    Ok(out)
}

/// "Now" for judging the locks in `locks`, given the key of the object the judge has just
/// written.
pub(crate) fn now_for(locks: &[ListedLock], own_key: &str) -> Now {
    Now {
        wall: now_unix(),
        storage: locks
            .iter()
            .find(|l| l.key == own_key && l.mtime > 0)
            .map(|l| l.mtime),
    }
}

/// Remove the locks whose holder is gone; returns how many. Writes a probe object to
/// read the storage's clock (see the module's notes), and removes it.
pub(crate) fn remove_stale(backend: &dyn Backend, me: &HostIdentity) -> Result<usize> {
    let (probe, _) = put_lock(backend, me, false, "stale lock removal (probe)")?;
    let res = (|| {
        let locks = list_locks(backend)?;
        let now = now_for(&locks, &probe);
        let host = host_id();
        let mut n = 0;
        for l in locks.iter().filter(|l| l.key != probe) {
            let stale = match &l.info {
                Some(i) => i.is_stale(now, l.mtime, &host),
                // Unreadable: held until removed on purpose (`unlock`).
                None => false,
            };
            if stale {
                backend.delete(&l.key)?;
                n += 1;
            }
        }
        Ok(n)
    })();
    let _ = backend.delete(&probe);
    res
}

/// Writes a new lock object of this process; its key and content.
fn put_lock(
    backend: &dyn Backend,
    me: &HostIdentity,
    exclusive: bool,
    purpose: &str,
) -> Result<(String, LockInfo)> {
    let info = LockInfo {
        host: me.name.clone(),
        host_uuid: me.uuid.clone(),
        host_id: host_id(),
        pid: std::process::id(),
        time_unix: now_unix(),
        exclusive,
        purpose: purpose.into(),
    };
    let key = format!("locks/{}", random_id());
    let body = serde_json::to_vec(&info).map_err(|e| RepoError::InvalidArgument(e.to_string()))?;
    backend.put(&key, &body)?;
    Ok((key, info))
}

pub(crate) fn acquire(
    backend: Arc<dyn Backend>,
    me: &HostIdentity,
    exclusive: bool,
    purpose: &str,
) -> Result<LockGuard> {
    let (key, info) = put_lock(backend.as_ref(), me, exclusive, purpose)?;
    let host = info.host_id.clone();
    let locks = match list_locks(backend.as_ref()) {
        Ok(l) => l,
        Err(e) => {
            let _ = backend.delete(&key);
            return Err(e);
        }
    };
    let now = now_for(&locks, &key);
    let conflicts: Vec<String> = locks
        .iter()
        .filter(|l| l.key != key)
        .filter_map(|l| match &l.info {
            Some(i) if !i.is_stale(now, l.mtime, &host) && (exclusive || i.exclusive) => {
                Some(format!("{} ({})", i.describe(), l.key))
            }
            Some(_) => None,
            // A lock nobody can read may be an exclusive one: held, for everybody.
            None => Some(format!(
                "an unreadable lock object {} (damaged or not written by coldclone); if no backup or prune is running anywhere, remove it with `coldclone unlock {}`",
                l.key,
                l.key.trim_start_matches("locks/")
            )),
        })
        .collect();
    if !conflicts.is_empty() {
        let _ = backend.delete(&key);
        return Err(RepoError::Locked(format!(
            "{}; wait for it to finish, or if its process is gone for good, remove that lock with `coldclone unlock KEY`",
            conflicts.join("; ")
        )));
    }
    let last_refresh = Arc::new(AtomicI64::new(boottime_secs()));
    let storage_at_start = now.storage.map(|t| (t, boottime_secs()));
    let (tx, rx) = mpsc::channel::<()>();
    let (b2, k2, lr) = (backend.clone(), key.clone(), last_refresh.clone());
    let thread = std::thread::Builder::new()
        .name("coldclone-lock".into())
        .spawn(move || loop {
            match rx.recv_timeout(Duration::from_secs(REFRESH.load(Ordering::Relaxed))) {
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let mut i = info.clone();
                    i.time_unix = now_unix();
                    if let Ok(body) = serde_json::to_vec(&i) {
                        match b2.put(&k2, &body) {
                            Ok(()) => lr.store(boottime_secs(), Ordering::SeqCst),
                            Err(e) => tracing::warn!("cannot refresh repository lock {k2}: {e}"),
                        }
                    }
                }
                _ => return,
            }
        })
        .map_err(|e| RepoError::io("lock refresh thread", e))?;
    Ok(LockGuard {
        backend,
        key,
        stop: Some(tx),
        thread: Some(thread),
        last_refresh,
        storage_at_start,
    })
}

impl LockGuard {
    /// Fail when the lock was not refreshed for so long that others may take it for stale.
    pub(crate) fn check_fresh(&self) -> Result<()> {
        // CLOCK_BOOTTIME: a wall clock moved back must not hide a long silence.
        let age = boottime_secs() - self.last_refresh.load(Ordering::SeqCst);
        if age > stale_secs() - (stale_secs() / 30).max(1) {
            return Err(RepoError::Locked(format!(
                "this process's lock {} was not refreshed for {age} s, so a prune may have run meanwhile; the backup was not committed: run it again",
                self.key
            )));
        }
        Ok(())
    }
}

impl LockGuard {
    /// The storage's clock now (from the lock's own modification time and the time since
    /// on CLOCK_BOOTTIME), or the wall clock when the storage gives no times.
    pub(crate) fn storage_now(&self) -> i64 {
        match self.storage_at_start {
            Some((t, boot)) => t + (boottime_secs() - boot),
            None => now_unix(),
        }
    }
}

/// Remove one lock object on purpose (`coldclone unlock KEY`): `name` is its key with or
/// without `locks/`. Fails when there is no such lock.
pub(crate) fn unlock(backend: &dyn Backend, name: &str) -> Result<String> {
    let name = name.trim().trim_start_matches("locks/");
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(RepoError::InvalidArgument(format!(
            "{name:?} is not a lock name (see the `locks/...` key in the error that named it)"
        )));
    }
    let key = format!("locks/{name}");
    if !backend.list("locks")?.iter().any(|o| o.key == key) {
        return Err(RepoError::InvalidArgument(format!(
            "there is no lock {key} in the repository"
        )));
    }
    backend.delete(&key)?;
    Ok(key)
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = self.backend.delete(&self.key);
    }
}
