//! `coldclone recover`: undo what crashed runs left behind, from their journals.

use crate::config::Config;
use crate::journal::{forget_run, recover_run, stale_runs, Recovered, Undo};
use anyhow::Result;

/// Recovers every crashed run; returns what was done.
pub fn recover_all(cfg: &Config) -> Result<Vec<Recovered>> {
    let repo = std::cell::OnceCell::new();
    let forget = |run: &str| {
        let repo = match repo.get() {
            Some(r) => r,
            None => {
                let r = super::open_repository(cfg).map_err(|e| format!("{e:#}"))?;
                repo.get_or_init(|| r)
            }
        };
        forget_run(repo, run)
    };
    let undo = Undo {
        forget_run: &forget,
        scope: coldclone_backends::RecoverScope {
            state_dir: cfg.state_dir.clone(),
        },
    };
    let mut out = Vec::new();
    for run in stale_runs(&cfg.state_dir)? {
        tracing::info!(run = run.run_id, vm = run.vm, "recovering a crashed run");
        out.push(recover_run(&run, &undo)?);
    }
    Ok(out)
}

pub fn run(cfg: &Config, json: bool) -> Result<bool> {
    let done = recover_all(cfg)?;
    let clean = done.iter().all(|r| r.failed.is_empty());
    if json {
        println!("{}", serde_json::to_string_pretty(&done)?);
    } else if done.is_empty() {
        println!("nothing to recover");
    } else {
        for r in &done {
            println!(
                "run {} (vm {}): removed {} resource(s)",
                r.run_id,
                r.vm,
                r.removed.len()
            );
            for res in &r.removed {
                println!("  removed {res:?}");
            }
            for (res, why) in &r.kept {
                println!("  left {res:?}: {why}");
            }
            for (res, e) in &r.failed {
                println!("  COULD NOT REMOVE {res:?}: {e}");
            }
        }
    }
    Ok(clean)
}
