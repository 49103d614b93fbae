//! Repository locks: small objects under `locks/`.
//!
//! Backups, restores and checks take *shared* locks; prune takes an *exclusive* one. A
//! taker writes its lock first, then lists `locks/`: a shared taker gives up when it sees a
//! live exclusive lock, an exclusive taker when it sees any other live lock. Two takers
//! racing both see each other (storage lists what was written before), so at worst both
//! give up; never do both proceed.
//!
//! A lock is live while it was refreshed in the last 30 minutes, and, when it was taken on
//! this host, while its process exists. Holders refresh every 5 minutes; a holder that
//! could not refresh for too long fails instead of committing (its lock may have been taken
//! for stale, so a prune may have run).

use crate::backend::Backend;
use crate::crypto::random_id;
use crate::error::{RepoError, Result};
use crate::util::{hostname, now_unix, rfc3339};
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
    pub pid: u32,
    pub time_unix: i64,
    pub exclusive: bool,
    pub purpose: String,
}

impl LockInfo {
    pub(crate) fn is_stale(&self, now: i64, my_host: &str) -> bool {
        if now - self.time_unix > stale_secs() {
            return true;
        }
        if self.host == my_host {
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
            self.host,
            rfc3339(self.time_unix)
        )
    }
}

pub(crate) struct LockGuard {
    backend: Arc<dyn Backend>,
    key: String,
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    last_refresh: Arc<AtomicI64>,
}

pub(crate) fn list_locks(backend: &dyn Backend) -> Result<Vec<(String, Option<LockInfo>)>> {
    let mut out = Vec::new();
    for o in backend.list("locks")? {
        let info = match backend.get(&o.key) {
            Ok(b) => serde_json::from_slice::<LockInfo>(&b).ok(),
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(e),
        };
        out.push((o.key, info));
    }
    Ok(out)
}

pub(crate) fn acquire(
    backend: Arc<dyn Backend>,
    exclusive: bool,
    purpose: &str,
) -> Result<LockGuard> {
    let host = hostname();
    let info = LockInfo {
        host: host.clone(),
        pid: std::process::id(),
        time_unix: now_unix(),
        exclusive,
        purpose: purpose.into(),
    };
    let key = format!("locks/{}", random_id());
    let body = serde_json::to_vec(&info).map_err(|e| RepoError::InvalidArgument(e.to_string()))?;
    backend.put(&key, &body)?;
    let now = now_unix();
    let conflicts: Vec<String> = match list_locks(backend.as_ref()) {
        Ok(l) => l
            .into_iter()
            .filter(|(k, _)| *k != key)
            .filter_map(|(k, i)| match i {
                Some(i) if !i.is_stale(now, &host) && (exclusive || i.exclusive) => {
                    Some(format!("{} ({k})", i.describe()))
                }
                _ => None,
            })
            .collect(),
        Err(e) => {
            let _ = backend.delete(&key);
            return Err(e);
        }
    };
    if !conflicts.is_empty() {
        let _ = backend.delete(&key);
        return Err(RepoError::Locked(format!(
            "{}; wait for it to finish, or if its process is gone for good, remove that lock object from the repository",
            conflicts.join("; ")
        )));
    }
    let last_refresh = Arc::new(AtomicI64::new(now));
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
                            Ok(()) => lr.store(i.time_unix, Ordering::SeqCst),
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
    })
}

impl LockGuard {
    /// Fail when the lock was not refreshed for so long that others may take it for stale.
    pub(crate) fn check_fresh(&self) -> Result<()> {
        let age = now_unix() - self.last_refresh.load(Ordering::SeqCst);
        if age > stale_secs() - (stale_secs() / 30).max(1) {
            return Err(RepoError::Locked(format!(
                "this process's lock {} was not refreshed for {age} s, so a prune may have run meanwhile; the backup was not committed: run it again",
                self.key
            )));
        }
        Ok(())
    }
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
