//! `coldclone forget SNAPSHOT...`: remove backups from the list (prune frees the space).

use super::open_repository;
use crate::config::Config;
use anyhow::Result;
use std::io::Write;

pub fn run(cfg: &Config, ids: &[String], json: bool) -> Result<()> {
    let repo = open_repository(cfg)?;
    // Write errors (a closed pipe: `| head`) end the command; see main.rs.
    let mut out = std::io::stdout().lock();
    let mut forgotten = Vec::new();
    for id in ids {
        // A run id forgets every disk of that backup; else it is a snapshot id (prefix).
        let by_run = repo.forget_run(id)?;
        if by_run.is_empty() {
            repo.forget(id)?;
            forgotten.push(id.clone());
        } else {
            forgotten.extend(by_run);
        }
    }
    if json {
        writeln!(out, "{}", serde_json::json!({ "forgotten": forgotten }))?;
    } else {
        for f in &forgotten {
            writeln!(out, "forgot {}", f.get(..8).unwrap_or(f))?;
        }
        writeln!(out, "run `coldclone prune` to free their space")?;
    }
    Ok(())
}
