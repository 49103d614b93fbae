//! `coldclone init`: create the repository named in the config.

use super::{location, password};
use crate::config::Config;
use anyhow::{Context, Result};
use coldclone_repository::Repository;

pub fn run(cfg: &Config, json: bool) -> Result<()> {
    let loc = location(cfg)?;
    let pw = password(cfg)?;
    let repo = Repository::init(&loc, &pw)
        .with_context(|| format!("cannot create a repository at {loc}"))?;
    if json {
        println!(
            "{}",
            serde_json::json!({"repository": loc.to_string(), "id": repo.config().id})
        );
    } else {
        println!("created repository {} at {loc}", repo.config().id);
    }
    Ok(())
}
