//! Storage backends: a local folder and S3-compatible object storage.
//!
//! A backend stores whole objects under '/'-separated keys. `put` is atomic (readers see
//! the old object, no object, or the whole new one, never a part) and durable when it
//! returns. Objects are never modified in place: coldclone writes new names only (packs,
//! indexes and snapshots are named by random or content ids), so several writers never
//! share a mutable object.

pub(crate) mod local;
pub(crate) mod s3;

use crate::error::Result;

/// One object in a listing.
#[derive(Debug, Clone)]
pub(crate) struct ObjectInfo {
    /// Key relative to the repository root, e.g. `data/ab/abcdef…`.
    pub key: String,
    pub size: u64,
    /// Last modification, Unix seconds (0 if unknown).
    pub mtime: i64,
}

pub(crate) trait Backend: Send + Sync {
    /// Human-readable location, for messages.
    fn describe(&self) -> String;
    /// Prepare an empty repository location (create the folder / check the bucket).
    fn create(&self) -> Result<()>;
    fn put(&self, key: &str, data: &[u8]) -> Result<()>;
    fn get(&self, key: &str) -> Result<Vec<u8>>;
    fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>>;
    /// All objects whose key starts with `dir` + '/', recursively.
    fn list(&self, dir: &str) -> Result<Vec<ObjectInfo>>;
    fn delete(&self, key: &str) -> Result<()>;
    fn exists(&self, key: &str) -> Result<bool>;
    /// Whether a few parallel requests help (object storage) or not (local disk).
    fn parallel_requests(&self) -> usize {
        1
    }
    /// Remove temporary objects of killed writers older than `min_age_secs`.
    fn cleanup_tmp(&self, _min_age_secs: i64) {}
}
