//! `coldclone prune [--dry-run]`: apply retention, free unreferenced data.

use super::open_repository;
use crate::config::{Config, Keep};
use anyhow::Result;
use coldclone_repository::{self as repo, RetentionPolicy};
use std::io::Write;

fn to_repo(k: Keep) -> repo::Keep {
    repo::Keep {
        last: k.last,
        daily: k.daily,
        weekly: k.weekly,
        monthly: k.monthly,
        yearly: k.yearly,
    }
}

pub fn policy(cfg: &Config) -> RetentionPolicy {
    let default = cfg.defaults.keep.unwrap_or(crate::config::DEFAULT_KEEP);
    RetentionPolicy {
        default: to_repo(default),
        per_vm: cfg
            .vms
            .iter()
            .map(|vm| (vm.name.clone(), to_repo(cfg.policy(vm).keep)))
            .collect(),
    }
}

pub fn run(cfg: &Config, dry_run: bool, json: bool) -> Result<()> {
    let repo = open_repository(cfg)?;
    // Write errors (a closed pipe: `| head`) end the command; see main.rs.
    let mut out = std::io::stdout().lock();
    let report = repo.prune(&policy(cfg), dry_run)?;
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{}keep {} snapshot(s), remove {}; packs deleted {}, repacked {}, written {}; {} bytes freed",
        if dry_run { "(dry run) " } else { "" },
        report.kept.len(),
        report.removed.len(),
        report.packs_deleted,
        report.packs_repacked,
        report.packs_written,
        report.bytes_freed
    )?;
    Ok(())
}
