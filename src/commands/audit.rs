//! `coldclone audit VM [--snapshot ID] [--probe SCRIPT]` and `audit --compare VM`.

use super::{host_name, open_repository};
use crate::audit::{self, AuditReport, BootResult, Examination};
use crate::config::{Config, Vm, DEFAULT_HEARTBEAT};
use crate::journal::{RunJournal, Undo};
use crate::pipeline::{backup_vm, isolate, new_run_id, RunContext};
use crate::report::RunStatus;
use anyhow::{bail, Context, Result};
use coldclone_backends::shared::SharedResource;
use coldclone_backends::{backend_for, BootSpec, Journal};
use coldclone_repository::{NoProgress, Repository};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A scratch folder and journal for one audit; removed (through the journal) at the end.
struct Scratch {
    dir: PathBuf,
    journal: RunJournal,
    id: String,
    /// What its clean-up may touch: the run folders of this state folder.
    scope: coldclone_backends::RecoverScope,
}

impl Scratch {
    fn new(cfg: &Config, vm: &str) -> Result<Scratch> {
        let id = format!("audit-{}", new_run_id());
        let mut journal = RunJournal::create(&cfg.state_dir, &id, vm)?;
        let dir = cfg.state_dir.join("runs").join(&id);
        journal.will_create(&SharedResource::Dir { path: dir.clone() }.into())?;
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let scope = coldclone_backends::RecoverScope {
            state_dir: cfg.state_dir.clone(),
        };
        Ok(Scratch {
            dir,
            journal,
            id,
            scope,
        })
    }

    fn finish(mut self, repo: &Repository) -> Result<()> {
        let forget = |r: &str| crate::journal::forget_run(repo, r);
        let failed = self.journal.undo_all(&Undo {
            forget_run: &forget,
            scope: self.scope.clone(),
        });
        if !failed.is_empty() {
            bail!(
                "audit clean-up left {} resource(s); run `coldclone recover`",
                failed.len()
            );
        }
        self.journal.finish()?;
        Ok(())
    }
}

/// Restores every disk of one backup (run id) into `dir`.
fn restore_backup(
    repo: &Repository,
    vm: &str,
    run: &str,
    dir: &Path,
    prefix: &str,
) -> Result<(BTreeMap<String, PathBuf>, Vec<String>, String)> {
    let snaps: Vec<_> = repo
        .snapshots()?
        .into_iter()
        .filter(|s| s.vm == vm && s.tags.get("run").map(String::as_str) == Some(run))
        .collect();
    if snaps.is_empty() {
        bail!("backup {run} of vm {vm:?} is not in the repository (see `coldclone snapshots --vm {vm}`)");
    }
    let mut images = BTreeMap::new();
    let mut ids = Vec::new();
    for s in &snaps {
        let dest = dir.join(format!("{prefix}{}.raw", s.disk.replace('/', "_")));
        repo.restore(&s.id, &dest, &NoProgress)?;
        images.insert(s.disk.clone(), dest);
        ids.push(s.id.clone());
    }
    Ok((images, ids, snaps[0].time.clone()))
}

/// The latest backup (run id) of a VM, or the one named by a run id or snapshot id prefix.
fn pick_backup(repo: &Repository, vm: &str, wanted: Option<&str>) -> Result<String> {
    let mut snaps: Vec<_> = repo
        .snapshots()?
        .into_iter()
        .filter(|s| s.vm == vm)
        .collect();
    snaps.sort_by_key(|s| s.time_unix);
    let found = match wanted.map(str::trim) {
        Some("") => bail!("--snapshot is empty: name a backup (run) id or a snapshot id"),
        // A run id, else a snapshot id or unique prefix (long enough: see find_snapshot).
        Some(w) => match snaps
            .iter()
            .rfind(|s| s.tags.get("run").map(String::as_str) == Some(w))
        {
            Some(s) => Some(s),
            None => {
                let id = repo.find_snapshot(w)?.id;
                snaps.iter().find(|s| s.id == id)
            }
        },
        None => snaps.last(),
    };
    match found.and_then(|s| s.tags.get("run").cloned()) {
        Some(run) => Ok(run),
        None => bail!(
            "no {} backup of vm {vm:?} in the repository (see `coldclone snapshots --vm {vm}`)",
            if wanted.is_some() { "such" } else { "" }
        ),
    }
}

/// Boots the restored disks with the VM's own QEMU command line, when the VM is a
/// reachable QEMU VM (its devices are known); otherwise says why not.
fn boot(
    cfg: &Config,
    vm: &Vm,
    images: &BTreeMap<String, PathBuf>,
    scratch: &mut Scratch,
    timeout: Duration,
) -> BootResult {
    let not = |reason: String| BootResult {
        attempted: false,
        booted: false,
        seconds: 0.0,
        console_tail: String::new(),
        reason: Some(reason),
    };
    let not_qemu = "boot tests run the VM's own QEMU command line; this VM is not a QEMU VM";
    let loc = &vm.locator;
    let backend = backend_for(loc);
    if !backend.can_boot_test() {
        return not(not_qemu.into());
    }
    let info = match backend.inspect(loc) {
        Ok(i) => i,
        Err(e) => {
            return not(format!(
                "the VM's command line is not available ({e}); boot test skipped"
            ))
        }
    };
    let net = match isolate::linux_bridge(&mut scratch.journal, &scratch.id, &cfg.isolation) {
        Ok(net) => net,
        Err(e) => return not(format!("could not make an isolated bridge: {e}")),
    };
    let heartbeat = vm
        .audit
        .heartbeat
        .clone()
        .unwrap_or_else(|| DEFAULT_HEARTBEAT.to_string());
    let name = format!("coldclone-audit-{}", scratch.id);
    let spec = BootSpec {
        images,
        net: &net,
        name: &name,
        work_dir: &scratch.dir,
        heartbeat: &heartbeat,
        timeout,
    };
    match backend.boot_test(&info, &spec, &mut scratch.journal) {
        Ok(b) => BootResult {
            attempted: true,
            booted: b.booted,
            seconds: b.seconds,
            console_tail: b.console_tail,
            reason: b.reason,
        },
        Err(e) => BootResult {
            attempted: true,
            booted: false,
            seconds: 0.0,
            console_tail: String::new(),
            reason: Some(e.to_string()),
        },
    }
}

pub fn run(
    cfg: &Config,
    vm_name: &str,
    snapshot: Option<&str>,
    probe: Option<&Path>,
    boot_timeout: u64,
    json: bool,
) -> Result<bool> {
    let vm = cfg.vm(vm_name).with_context(|| {
        format!(
            "unknown VM {vm_name:?}: the config names {:?}",
            cfg.vms.iter().map(|v| &v.name).collect::<Vec<_>>()
        )
    })?;
    let probe = probe
        .map(Path::to_path_buf)
        .or_else(|| vm.audit.probe.clone());
    let repo = open_repository(cfg)?;
    let backup = pick_backup(&repo, vm_name, snapshot)?;
    let mut scratch = Scratch::new(cfg, vm_name)?;
    let result = (|| {
        let (images, ids, time) = restore_backup(&repo, vm_name, &backup, &scratch.dir, "")?;
        let examination = audit::examine(&images, &scratch.dir, probe.as_deref());
        let boot = boot(
            cfg,
            vm,
            &images,
            &mut scratch,
            Duration::from_secs(boot_timeout),
        );
        let mut reasons = examination.problems();
        if boot.attempted && !boot.booted {
            reasons.push(format!(
                "boot test failed: {}",
                boot.reason.as_deref().unwrap_or("no heartbeat")
            ));
        }
        Ok::<_, anyhow::Error>(AuditReport {
            vm: vm_name.to_string(),
            backup: backup.clone(),
            snapshot_ids: ids,
            backup_time: time,
            audited_at: crate::journal::now(),
            pass: reasons.is_empty(),
            reasons,
            examination,
            boot,
        })
    })();
    let cleaned = scratch.finish(&repo);
    let report = result?;
    cleaned?;
    let stored = audit::store(&cfg.state_dir, &report)?;
    if let Some(file) = &cfg.run.metrics_file {
        if let Err(e) = crate::metrics::record_audit(&cfg.state_dir, file, &report) {
            eprintln!(
                "coldclone: could not write the metrics file {}: {e}",
                file.display()
            );
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
        println!("(kept in {})", stored.display());
    }
    Ok(report.pass)
}

fn print_report(r: &AuditReport) {
    println!(
        "audit of {} backup {} (taken {}): {}",
        r.vm,
        r.backup,
        r.backup_time,
        if r.pass { "PASS" } else { "FAIL" }
    );
    for f in &r.examination.filesystems {
        println!(
            "  {}: {} {}{}{}",
            f.location,
            f.fs_type.as_deref().unwrap_or("no file system"),
            if !f.checked {
                "not checked"
            } else if f.clean {
                "fsck clean"
            } else {
                "fsck FOUND ERRORS"
            },
            f.state
                .as_deref()
                .map(|s| format!(", state {s}"))
                .unwrap_or_default(),
            if f.needs_recovery {
                ", journal needs replay"
            } else {
                ""
            }
        );
    }
    match (&r.boot.attempted, &r.boot.booted) {
        (true, true) => println!("  boot: up in {:.1} s", r.boot.seconds),
        (true, false) => println!(
            "  boot: FAILED: {}",
            r.boot.reason.as_deref().unwrap_or("?")
        ),
        _ => println!(
            "  boot: skipped: {}",
            r.boot.reason.as_deref().unwrap_or("")
        ),
    }
    if let Some(p) = &r.examination.probe {
        println!("  probe {}: exit {}", p.script.display(), p.exit_code);
    }
    for reason in &r.reasons {
        println!("  reason: {reason}");
    }
}

#[derive(Debug, Serialize)]
pub struct CompareReport {
    pub vm: String,
    pub backup: Option<String>,
    pub clean_shutdown: Examination,
    pub crash_consistent: Examination,
    pub clean_consistent: bool,
    pub crash_consistent_ok: bool,
    pub differences: Vec<String>,
}

/// One checkpoint, two copies: the disk as it was at the checkpoint (crash
/// consistent) and the clean-shutdown backup made from the same checkpoint.
pub fn compare(cfg: &Config, vm_name: &str, probe: Option<&Path>, json: bool) -> Result<bool> {
    let vm = cfg
        .vm(vm_name)
        .with_context(|| format!("unknown VM {vm_name:?}"))?;
    let probe = probe
        .map(Path::to_path_buf)
        .or_else(|| vm.audit.probe.clone());
    let repo = open_repository(cfg)?;
    let mut scratch = Scratch::new(cfg, vm_name)?;
    let result =
        (|| {
            let crash_dir = scratch.dir.join("crash");
            std::fs::create_dir_all(&crash_dir)?;
            scratch.journal.will_create(
                &SharedResource::Dir {
                    path: crash_dir.clone(),
                }
                .into(),
            )?;
            let ctx = RunContext {
                config: cfg,
                repo: &repo,
                host: host_name(),
                show_progress: false,
                crash_copy_dir: Some(crash_dir.clone()),
            };
            let report = backup_vm(&ctx, vm);
            if report.status != RunStatus::Ok {
                bail!("the backup failed: {}", report.error.unwrap_or_default());
            }
            let run = report.snapshot_id.clone().unwrap_or_default();
            let (clean_images, _, _) =
                restore_backup(&repo, vm_name, &run, &scratch.dir, "clean-")?;
            let mut crash_images = BTreeMap::new();
            for disk in clean_images.keys() {
                crash_images.insert(
                    disk.clone(),
                    crash_dir.join(format!("crash-{}.raw", disk.replace('/', "_"))),
                );
            }
            let clean = audit::examine(&clean_images, &scratch.dir, probe.as_deref());
            let crash = audit::examine(&crash_images, &scratch.dir, probe.as_deref());
            let mut differences = Vec::new();
            for (c, k) in clean.filesystems.iter().zip(crash.filesystems.iter()) {
                if c.needs_recovery != k.needs_recovery {
                    differences.push(format!(
                    "{}: the crash copy's journal needs replaying ({}), the clean copy's does not",
                    k.location,
                    if k.needs_recovery { "needs_recovery set" } else { "?" }
                ));
                }
                if c.state != k.state {
                    differences.push(format!(
                        "{}: file system state {:?} in the clean copy, {:?} in the crash copy",
                        k.location, c.state, k.state
                    ));
                }
                if c.clean != k.clean {
                    differences.push(format!(
                    "{}: fsck clean={} in the clean copy, clean={} (exit {:?}) in the crash copy",
                    k.location, c.clean, k.clean, k.fsck_exit
                ));
                }
            }
            if let (Some(pc), Some(pk)) = (&clean.probe, &crash.probe) {
                if pc.exit_code != pk.exit_code {
                    differences.push(format!(
                        "probe: exit {} on the clean copy, exit {} on the crash copy ({})",
                        pc.exit_code,
                        pk.exit_code,
                        pk.output.trim()
                    ));
                }
            }
            Ok::<_, anyhow::Error>(CompareReport {
                vm: vm_name.to_string(),
                backup: Some(run),
                clean_consistent: clean.problems().is_empty(),
                crash_consistent_ok: crash.problems().is_empty(),
                clean_shutdown: clean,
                crash_consistent: crash,
                differences,
            })
        })();
    let cleaned = scratch.finish(&repo);
    let report = result?;
    cleaned?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "compare {}: clean-shutdown copy {}, crash-consistent copy {}",
            report.vm,
            if report.clean_consistent {
                "CONSISTENT"
            } else {
                "INCONSISTENT"
            },
            if report.crash_consistent_ok {
                "consistent"
            } else {
                "INCONSISTENT"
            }
        );
        for p in report.crash_consistent.problems() {
            println!("  crash copy: {p}");
        }
        for p in report.clean_shutdown.problems() {
            println!("  clean copy: {p}");
        }
        for d in &report.differences {
            println!("  difference: {d}");
        }
    }
    Ok(report.clean_consistent)
}
