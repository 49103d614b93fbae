//! The one error type of the repository crate. Every message says what went wrong, where,
//! and (where there is one) what to do about it.

use std::io;

/// Errors of the repository library.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("no repository at {location}: {detail}; create one with `coldclone init` or check the location")]
    NotFound { location: String, detail: String },

    #[error("a repository already exists at {0}; open it instead, or choose an empty location")]
    AlreadyExists(String),

    #[error("wrong password for the repository at {0}: no key in keys/ opens with it; check the password file or environment variable")]
    WrongPassword(String),

    #[error("storage full while writing {path}: {source}; free space (for example with `coldclone prune`) and retry; the repository is not damaged and the interrupted backup is not listed")]
    StorageFull { path: String, source: io::Error },

    #[error("I/O error on {path}: {source}")]
    Io { path: String, source: io::Error },

    #[error("cannot read the source disk at offset {offset}: {source}")]
    Source { offset: u64, source: io::Error },

    #[error("cannot write the restore target {path}: {source}")]
    Target { path: String, source: io::Error },

    #[error("S3 {op} of {key} failed: {detail}")]
    S3 {
        op: String,
        key: String,
        detail: String,
    },

    #[error("damaged repository data in {path}: {detail}; run `coldclone check --read-data` to see which snapshots are affected")]
    Corrupt { path: String, detail: String },

    #[error("no snapshot matches {0:?}; list them with `coldclone snapshots`")]
    SnapshotNotFound(String),

    #[error("snapshot id prefix {prefix:?} is ambiguous ({matches} snapshots match); give more characters")]
    AmbiguousSnapshot { prefix: String, matches: usize },

    #[error("repository is locked: {0}")]
    Locked(String),

    #[error("unsupported repository at {location}: {detail}")]
    Unsupported { location: String, detail: String },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("backup aborted: {0}")]
    Aborted(String),
}

impl RepoError {
    /// Map an I/O error on `path` to `StorageFull` when the device is full, `Io` otherwise.
    pub(crate) fn io(path: impl Into<String>, source: io::Error) -> RepoError {
        let path = path.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => RepoError::StorageFull { path, source },
            _ => RepoError::Io { path, source },
        }
    }

    pub(crate) fn corrupt(path: impl Into<String>, detail: impl Into<String>) -> RepoError {
        RepoError::Corrupt {
            path: path.into(),
            detail: detail.into(),
        }
    }

    /// True when the error means "the object does not exist".
    pub(crate) fn is_not_found(&self) -> bool {
        match self {
            RepoError::Io { source, .. } => source.kind() == io::ErrorKind::NotFound,
            RepoError::NotFound { .. } => true,
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, RepoError>;
