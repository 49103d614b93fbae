//! Resources any backend may create (files, folders, clone processes and
//! the isolated network's links), and their undo. A backend's own kinds live
//! in its module ([`crate::qemu::QemuResource`], ...); [`crate::Resource`]
//! wraps them all.

use crate::{util, BackendError, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
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
}

impl SharedResource {
    /// Removes the resource; one already gone is not an error.
    pub fn undo(&self) -> Result<()> {
        match self {
            SharedResource::File { path } => util::remove_file_if_exists(path),
            SharedResource::Dir { path } => match std::fs::remove_dir_all(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(BackendError::Io {
                    path: path.clone(),
                    source: e,
                }),
                _ => Ok(()),
            },
            SharedResource::CloneProcess { marker, .. } => {
                for pid in util::find_processes_with_marker(marker) {
                    if !util::kill_and_wait(pid, Duration::from_secs(10)) {
                        return Err(BackendError::Clone(format!(
                            "clone process {pid} does not die"
                        )));
                    }
                }
                Ok(())
            }
            SharedResource::Tap { namespace, name }
            | SharedResource::Bridge { namespace, name } => network_isolation::delete_link(
                &network_isolation::Namespace(namespace.clone()),
                name,
            )
            .map_err(Into::into),
            SharedResource::Namespace { name } => {
                network_isolation::delete_namespace(name).map_err(Into::into)
            }
        }
    }
}
