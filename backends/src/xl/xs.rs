//! xenstore access: plain reads through `xenstore-rs`'s blocking client, and
//! `@releaseDomain` waits through its tokio client (the only one with watches),
//! driven by a small current-thread runtime.

use super::XlError;
use crate::{BackendError, Result};
use futures::StreamExt;
use std::time::{Duration, Instant};
use xenstore_rs::tokio::XsTokio;
use xenstore_rs::unix::XsUnix;
use xenstore_rs::{AsyncWatch, Xs};

fn xs_err(what: &str, e: std::io::Error) -> BackendError {
    BackendError::Xl(XlError::Xenstore(format!("{what}: {e}")))
}

/// Reads a node; `None` when it does not exist.
pub fn read(path: &str) -> Result<Option<String>> {
    let xs = XsUnix::new().map_err(|e| xs_err("cannot connect to xenstored", e))?;
    match xs.read(path) {
        Ok(v) => Ok(Some(v.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(xs_err(&format!("read {path}"), e)),
    }
}

/// Reads a numeric node.
pub fn read_u64(path: &str) -> Result<Option<u64>> {
    Ok(read(path)?.and_then(|v| v.trim().parse().ok()))
}

/// Waits until `done()` says yes, re-checking it once when the watch is set
/// and after every `@releaseDomain` event (it fires on any domain's shutdown,
/// crash or destruction and carries no domain id). Returns false on timeout.
pub fn wait_release_domain(
    timeout: Duration,
    mut done: impl FnMut() -> Result<bool>,
) -> Result<bool> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .enable_io()
        .build()
        .map_err(|e| xs_err("cannot start the watch runtime", e))?;
    let start = Instant::now();
    rt.block_on(async {
        let xs = XsTokio::new()
            .await
            .map_err(|e| xs_err("cannot connect to xenstored", e))?;
        let mut watch = xs
            .watch("@releaseDomain")
            .await
            .map_err(|e| xs_err("cannot watch @releaseDomain", e))?;
        loop {
            if done()? {
                return Ok(true);
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Ok(false);
            }
            match tokio::time::timeout(left, watch.next()).await {
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(BackendError::Xl(XlError::Xenstore(
                        "the @releaseDomain watch ended (xenstored went away?)".into(),
                    )))
                }
                Err(_) => return done(),
            }
        }
    })
}
