//! prune: placeholder.
use crate::{error::Result, Repository};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Keep {
    pub last: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
}
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RetentionPolicy {
    pub default: Keep,
    pub per_vm: BTreeMap<String, Keep>,
}
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PruneReport {
    pub dry_run: bool,
}
pub(crate) fn prune(
    _repo: &Repository,
    _p: &RetentionPolicy,
    dry_run: bool,
) -> Result<PruneReport> {
    Ok(PruneReport { dry_run })
}
