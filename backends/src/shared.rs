//! Resources any backend may create (files, folders, clone processes and
//! the isolated network's links), and their undo. A backend's own kinds live
//! in its module ([`crate::qemu::QemuResource`], ...); [`crate::Resource`]
//! wraps them all.

use crate::{util, BackendError, RecoverScope, Result};
use serde::{Deserialize, Serialize};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SharedResource {
    /// A file coldclone made (memory image, clone overlay, exported disk).
    File { path: PathBuf },
    /// The run's own working folder.
    Dir { path: PathBuf },
    /// A clone process, found by the marker in its command line.
    CloneProcess { marker: String, qmp: PathBuf },
    /// A tap device (QEMU deletes its own taps when it exits; this is the net).
    Tap {
        namespace: Option<String>,
        name: String,
    },
    /// A bridge made for the run.
    Bridge {
        namespace: Option<String>,
        name: String,
    },
    /// A network namespace made for the run.
    Namespace { name: String },
    /// A read-only qemu-storage-daemon FUSE export of a disk image
    /// ([`crate::image_export`]), at a mount point in the run folder.
    ImageExport {
        mountpoint: PathBuf,
        pidfile: PathBuf,
    },
}

impl SharedResource {
    /// Removes the resource; one already gone is not an error. The journal it comes from
    /// is read back from disk: each kind is acted on only if what is there still is what
    /// coldclone made (a path in the run folders, a QEMU with the run's QMP socket, a link
    /// of the right kind with coldclone's name); anything else is refused, left alone.
    pub fn undo(&self, scope: &RecoverScope) -> Result<()> {
        match self {
            SharedResource::File { path } => {
                scope.check_run_path(path)?;
                util::remove_file_if_exists(path)
            }
            SharedResource::Dir { path } => {
                scope.check_run_path(path)?;
                match std::fs::remove_dir_all(path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(BackendError::Io {
                        path: path.clone(),
                        source: e,
                    }),
                    _ => Ok(()),
                }
            }
            SharedResource::CloneProcess { marker, qmp } => {
                if !marker.starts_with("coldclone-") {
                    return Err(refused(format!(
                        "clone marker {marker:?} is not coldclone's"
                    )));
                }
                scope.check_run_path(qmp)?;
                for pid in util::find_processes_with_marker(marker) {
                    if let Err(why) = is_the_clone(pid, qmp) {
                        return Err(refused(format!(
                            "process {pid} carries the marker {marker:?} but {why}; left running"
                        )));
                    }
                    if !util::kill_and_wait(pid, Duration::from_secs(10)) {
                        return Err(BackendError::Clone(format!(
                            "clone process {pid} does not die"
                        )));
                    }
                }
                Ok(())
            }
            SharedResource::Tap { namespace, name } => undo_link(namespace, name, "tun"),
            SharedResource::Bridge { namespace, name } => undo_link(namespace, name, "bridge"),
            SharedResource::Namespace { name } => {
                if !network_isolation::namespace_exists(name) {
                    return Ok(());
                }
                let ns = network_isolation::Namespace::named(name);
                let foreign: Vec<String> = network_isolation::link_kinds(&ns)?
                    .into_iter()
                    .map(|(n, _)| n)
                    .filter(|n| n != "lo" && !is_coldclone_link_name(n))
                    .collect();
                if !foreign.is_empty() {
                    return Err(refused(format!(
                        "network namespace {name} holds links coldclone did not make ({}); left alone",
                        foreign.join(", ")
                    )));
                }
                network_isolation::delete_namespace(name).map_err(Into::into)
            }
            SharedResource::ImageExport {
                mountpoint,
                pidfile,
            } => {
                scope.check_run_path(mountpoint)?;
                scope.check_run_path(pidfile)?;
                crate::image_export::take_down(mountpoint, pidfile)
            }
        }
    }
}

fn refused(detail: String) -> BackendError {
    BackendError::Unsupported(format!("recover refuses: {detail}"))
}

impl RecoverScope {
    /// `path` must be absolute, plain (no `.` or `..`), strictly inside
    /// `STATE_DIR/runs`, and stay there once symbolic links are resolved.
    pub fn check_run_path(&self, path: &Path) -> Result<()> {
        let runs = self.state_dir.join("runs");
        let plain = path.is_absolute()
            && path
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if !plain || !path.starts_with(&runs) || path == runs {
            return Err(refused(format!(
                "{} is not inside {}",
                path.display(),
                runs.display()
            )));
        }
        // A link planted in the folder must not lead the removal elsewhere.
        let (Some(parent), Ok(runs_real)) = (path.parent(), runs.canonicalize()) else {
            return Ok(()); // no runs folder: nothing of ours can be there
        };
        match parent.canonicalize() {
            Ok(real) if real.starts_with(&runs_real) => Ok(()),
            Ok(real) => Err(refused(format!(
                "{} leads to {}, outside {}",
                path.display(),
                real.display(),
                runs.display()
            ))),
            Err(_) => Ok(()), // the parent is gone, and so is the path
        }
    }
}

/// Whether `pid` is the QEMU coldclone started with the QMP socket `qmp`: its binary
/// is a qemu-system emulator and its argv holds the QMP chardev coldclone writes.
fn is_the_clone(pid: u32, qmp: &Path) -> std::result::Result<(), String> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .map_err(|e| format!("its executable cannot be read ({e})"))?;
    // A clone whose binary a package upgrade replaced still is our clone.
    let exe = PathBuf::from(exe.to_string_lossy().trim_end_matches(" (deleted)"));
    if !util::is_qemu_binary(&exe) {
        return Err(format!("runs {}, not QEMU", exe.display()));
    }
    let args = util::process_cmdline(pid).unwrap_or_default();
    // QemuOpts doubles a comma inside a value (backends/src/qemu/cmdline.rs writes it so).
    let want = format!("path={},", qmp.to_string_lossy().replace(',', ",,"));
    if !args
        .iter()
        .any(|a| a.contains("id=coldclone-qmp") && a.contains(&want))
    {
        return Err(format!("has no QMP socket at {}", qmp.display()));
    }
    Ok(())
}

/// coldclone's link names: `ccbr<run>` bridges, `cc<run>t<n>` taps, `vif` ports it made
/// with that prefix on Xen.
fn is_coldclone_link_name(name: &str) -> bool {
    name.starts_with("cc")
}

/// Deletes the link `name` if it is there, has coldclone's name and is of `kind`.
fn undo_link(namespace: &Option<String>, name: &str, kind: &str) -> Result<()> {
    let ns = network_isolation::Namespace(namespace.clone());
    // A gone namespace lists no links: the link went with it.
    let Some((_, found)) = network_isolation::link_kinds(&ns)?
        .into_iter()
        .find(|(n, _)| n == name)
    else {
        return Ok(());
    };
    if !is_coldclone_link_name(name) || found.as_deref() != Some(kind) {
        return Err(refused(format!(
            "link {name} in {} is a {} link{}, not the {kind} coldclone made; left alone",
            ns.describe(),
            found.as_deref().unwrap_or("plain"),
            if is_coldclone_link_name(name) {
                ""
            } else {
                " without coldclone's name"
            }
        )));
    }
    network_isolation::delete_link(&ns, name).map_err(Into::into)
}
