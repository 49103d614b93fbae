//! check: placeholder, filled in below.
use crate::{error::Result, Repository};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DamagedSnapshot {
    pub snapshot_id: String,
    pub vm: String,
    pub disk: String,
    pub time: String,
    pub damaged_chunks: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CheckReport {
    pub ok: bool,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    pub damaged_snapshots: Vec<DamagedSnapshot>,
}

pub(crate) fn check(_repo: &Repository, _read_data: bool) -> Result<CheckReport> {
    Ok(CheckReport::default())
}
