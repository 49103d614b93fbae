//! `coldclone forget SNAPSHOT...`: remove backups from the list (prune frees the space).

use super::open_repository;
use crate::config::Config;
use anyhow::Result;
use std::io::Write;

pub fn run(cfg: &Config, ids: &[String], json: bool) -> Result<()> {
    let repo = open_repository(cfg)?;
    // Write errors (a closed pipe: `| head`) end the command; see main.rs.
    let mut out = std::io::stdout().lock();
    let snaps = repo.snapshots()?;
    let mut forgotten = Vec::new();
    for id in ids {
        // A run id forgets every disk of that backup.
        let by_run: Vec<String> = snaps
            .iter()
            .filter(|s| s.tags.get("run") == Some(id))
            .map(|s| s.id.clone())
            .collect();
        let targets = if by_run.is_empty() {
            vec![id.clone()]
        } else {
            by_run
        };
        for t in targets {
            repo.forget(&t)?;
            forgotten.push(t);
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
