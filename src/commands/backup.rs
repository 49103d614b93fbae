//! `coldclone backup [VM...] [--all]`: back up VMs, one after the other.

use super::{host_identity, host_name, open_repository, probe_writable};
use crate::config::Config;
use crate::pipeline::RunContext;
use crate::progress::stderr_is_terminal;
use crate::report::VmReport;
use crate::report::{table, Summary};
use crate::schedule::{run_all, Limits};
use anyhow::{bail, Result};
use coldclone_repository::Location;

pub fn run(cfg: &Config, names: &[String], all: bool, json: bool) -> Result<Vec<VmReport>> {
    let vms: Vec<_> = if all || names.is_empty() {
        cfg.vms.iter().collect()
    } else {
        let mut v = Vec::new();
        for n in names {
            match cfg.vm(n) {
                Some(vm) => v.push(vm),
                None => {
                    let known: Vec<&str> = cfg.vms.iter().map(|v| v.name.as_str()).collect();
                    bail!("unknown VM {n:?}: the config names {known:?}");
                }
            }
        }
        v
    };
    if vms.is_empty() {
        bail!("the config names no VM: add a [[vm]] section with name and qmp");
    }
    let mut repo = open_repository(cfg)?;
    // Chains of backups are kept per host uuid: no backup without one.
    repo.set_host(host_identity(cfg)?);
    if let Location::Local(p) = repo.location() {
        probe_writable(p)?;
    }
    // Whatever a crashed run left is removed before new work starts.
    for r in super::recover::recover_all(cfg)? {
        tracing::warn!(
            run = r.run_id,
            vm = r.vm,
            removed = r.removed.len(),
            "cleaned up after a crashed run"
        );
    }
    let ctx = RunContext {
        config: cfg,
        repo: &repo,
        host: host_name(),
        show_progress: stderr_is_terminal() && !json,
        crash_copy_dir: None,
    };
    let limits = Limits::from_config(cfg);
    tracing::info!(?limits, "scheduling {} VM(s)", vms.len());
    let start = std::time::Instant::now();
    let reports = run_all(&ctx, vms, limits, &mut |r| {
        // Each VM's report as soon as it is done: a long night shows progress.
        if json {
            if let Ok(line) = serde_json::to_string(r) {
                println!("{line}");
            }
        } else {
            println!("{}", r.summary_line());
        }
    });
    let summary = Summary::of(&reports, start.elapsed().as_millis() as u64);
    if json {
        println!("{}", serde_json::json!({ "summary": summary }));
    } else {
        print!("\n{}", table(&reports, &summary));
    }
    if let Some(file) = &cfg.run.metrics_file {
        if let Err(e) = crate::metrics::write(&cfg.state_dir, file, &reports) {
            tracing::error!("could not write the metrics file {}: {e}", file.display());
            eprintln!(
                "coldclone: could not write the metrics file {}: {e}",
                file.display()
            );
        }
    }
    Ok(reports)
}
