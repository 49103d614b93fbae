//! `coldclone serve VM --disk NAME --socket PATH [--snapshot ID] [--once]`: one disk of a
//! backup as a read-only NBD export on a unix socket, read straight from the repository
//! (chunks fetched on demand and verified; see `coldclone_repository::SnapshotReader`).
//! Any NBD client reads it: `qemu-img convert nbd+unix:///DISK?socket=PATH out.qcow2`,
//! `qemu-nbd`, QEMU's `nbd` block driver, libguestfs.

use super::open_repository;
use super::restore::choose_snapshot;
use crate::config::Config;
use crate::nbd::{self, Export};
use anyhow::{bail, Context, Result};
use coldclone_repository::SnapshotReader;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub(crate) struct SnapshotExport<'r> {
    name: String,
    reader: SnapshotReader<'r>,
}

impl Export for SnapshotExport<'_> {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.reader.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let n = self
            .reader
            .read_at(buf, offset)
            .map_err(std::io::Error::other)?;
        if n != buf.len() {
            return Err(std::io::Error::other("read past the end of the snapshot"));
        }
        Ok(())
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

pub fn run(
    cfg: &Config,
    vm: &str,
    disk: &str,
    snapshot: Option<&str>,
    socket: &Path,
    once: bool,
) -> Result<()> {
    let repo = open_repository(cfg)?;
    let snap = choose_snapshot(&repo, vm, disk, snapshot)?;
    let reader = repo.open_snapshot(&snap.id)?;
    // Never take over or delete a path that is there: it may be anything.
    if std::fs::symlink_metadata(socket).is_ok() {
        bail!(
            "{} exists; give a path that does not (coldclone never removes what it did not make)",
            socket.display()
        );
    }
    let listener = UnixListener::bind(socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    // Only root reads the guest's data.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", socket.display()))?;
    listener.set_nonblocking(true)?;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let export = SnapshotExport {
        name: disk.to_string(),
        reader,
    };
    tracing::info!(
        snapshot = snap.short_id(),
        socket = %socket.display(),
        "serving {vm}/{disk} ({} bytes) read-only: nbd+unix:///{disk}?socket={}",
        snap.size,
        socket.display()
    );
    eprintln!(
        "serving {} of {vm}/{disk} read-only at nbd+unix:///{disk}?socket={} (Ctrl-C ends)",
        snap.short_id(),
        socket.display()
    );
    let served = accept_loop(&listener, &export, &STOP, once);
    // The socket is ours: made above.
    let _ = std::fs::remove_file(socket);
    served
}

/// Serves `export` to each client on `listener` (non-blocking) until `stop` is set, or
/// after the first client with `once`; waits for the clients to end.
pub(crate) fn accept_loop(
    listener: &UnixListener,
    export: &dyn Export,
    stop: &AtomicBool,
    once: bool,
) -> Result<()> {
    std::thread::scope(|scope| -> Result<()> {
        let mut clients = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((mut conn, _)) => {
                    conn.set_nonblocking(false)?;
                    clients.push(
                        scope.spawn(move || match nbd::serve_client(&mut conn, export) {
                            Ok(end) => tracing::debug!("client ended: {end:?}"),
                            Err(e) => tracing::warn!("client dropped: {e}"),
                        }),
                    );
                    if once {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e.into()),
            }
        }
        for c in clients {
            let _ = c.join();
        }
        Ok(())
    })
}

/// Runs `f` with a snapshot served on a private socket under `dir` (a folder of ours,
/// 0700), handing it the NBD URL; the export ends when `f` returns.
pub(crate) fn with_private_export<T>(
    repo: &coldclone_repository::Repository,
    snapshot_id: &str,
    name: &str,
    dir: &Path,
    f: impl FnOnce(&str) -> Result<T>,
) -> Result<T> {
    let reader = repo.open_snapshot(snapshot_id)?;
    let export = SnapshotExport {
        name: name.to_string(),
        reader,
    };
    let socket = dir.join("export.sock");
    let listener = UnixListener::bind(&socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    listener.set_nonblocking(true)?;
    let url = format!("nbd+unix:///{name}?socket={}", socket.display());
    let stop = AtomicBool::new(false);
    let out = std::thread::scope(|scope| {
        let server = scope.spawn(|| accept_loop(&listener, &export, &stop, false));
        let out = f(&url);
        stop.store(true, Ordering::SeqCst);
        let served = server
            .join()
            .map_err(|_| anyhow::anyhow!("the export's thread panicked"))?;
        served.and(out)
    });
    let _ = std::fs::remove_file(&socket);
    out
}
