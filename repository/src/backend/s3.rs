//! S3: placeholder.
use super::{Backend, ObjectInfo};
use crate::error::{RepoError, Result};
use crate::Location;
pub(crate) struct S3Backend;
impl S3Backend {
    pub(crate) fn new(l: &Location) -> Result<S3Backend> {
        Err(RepoError::Unsupported {
            location: l.to_string(),
            detail: "S3 not yet".into(),
        })
    }
}
impl Backend for S3Backend {
    fn describe(&self) -> String {
        String::new()
    }
    fn create(&self) -> Result<()> {
        Ok(())
    }
    fn put(&self, _: &str, _: &[u8]) -> Result<()> {
        Ok(())
    }
    fn get(&self, _: &str) -> Result<Vec<u8>> {
        Ok(vec![])
    }
    fn get_range(&self, _: &str, _: u64, _: u64) -> Result<Vec<u8>> {
        Ok(vec![])
    }
    fn list(&self, _: &str) -> Result<Vec<ObjectInfo>> {
        Ok(vec![])
    }
    fn delete(&self, _: &str) -> Result<()> {
        Ok(())
    }
    fn exists(&self, _: &str) -> Result<bool> {
        Ok(false)
    }
}
