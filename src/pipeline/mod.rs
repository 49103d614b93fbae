//! The backup of one VM, in the six steps of the design:
//! checkpoint → isolate → restore the clone → clean stop → archive → clean up.

pub mod archive;
pub mod balloon;
pub mod changes;
pub mod checkpoint;
pub mod cleanup;
pub mod isolate;
pub mod restore;
pub mod stop;
#[cfg(test)]
mod tests;

use crate::config::{Config, Vm};
use crate::journal::{JournalError, RunJournal};
use crate::report::{RunStatus, VmReport};
use coldclone_backends::shared::SharedResource;
use coldclone_backends::{BackendError, Hypervisor, Journal, PausedClone, VmLocator};
use coldclone_repository::{RepoError, Repository};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Isolation(#[from] network_isolation::IsolationError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("repository: {0}")]
    Repository(#[from] RepoError),
    #[error("the clone did not power off within {0} s after the request; it was destroyed and no backup was stored (set on_clone_failure = \"crash\" to keep a crash-consistent copy instead)")]
    CloneDidNotStop(u64),
    /// A step that needs the clone found none (a bug in the step order).
    #[error("{0}")]
    NoClone(&'static str),
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Balloon(String),
    #[error("isolation.bridge {bridge} does not exist in {namespace}; create it or remove the setting so coldclone makes one per run")]
    NoSuchBridge { bridge: String, namespace: String },
    #[error("clean-up left {count} resource(s), kept in journal {} for `coldclone recover`: {what}", .journal.display())]
    CleanupLeft {
        count: usize,
        journal: PathBuf,
        what: String,
    },
    #[error("{step}; and clean-up failed too: {cleanup}")]
    CleanupFailedToo {
        step: Box<PipelineError>,
        cleanup: Box<PipelineError>,
    },
    #[error("disk {disk}: the backup read by the {map:?} changed-block map differs from a whole read in {chunks} chunk(s), the first at byte {first}; the backup was withdrawn. Report this: the map missed a change")]
    IncrementalMismatch {
        disk: String,
        map: crate::report::ChangedBlockMap,
        chunks: u64,
        first: u64,
    },
    /// Debug builds only: COLDCLONE_TEST_ARCHIVE_FAULT.
    #[error("COLDCLONE_TEST_ARCHIVE_FAULT: injected failure after disk {0} was stored")]
    InjectedFault(String),
}

/// What every VM's backup in one invocation shares.
pub struct RunContext<'a> {
    pub config: &'a Config,
    pub repo: &'a Repository,
    pub host: String,
    pub show_progress: bool,
    /// `audit --compare`: also write each disk as it was at the checkpoint
    /// (crash-consistent) into this folder.
    pub crash_copy_dir: Option<PathBuf>,
}

/// One VM's run: its journal, work folder and the clone while it exists.
pub struct Run<'a> {
    pub id: String,
    pub vm: &'a Vm,
    pub backend: Box<dyn Hypervisor>,
    pub journal: RunJournal,
    pub work_dir: PathBuf,
    pub clone: Option<PausedClone>,
}

pub fn new_run_id() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{t:x}{}", coldclone_backends::util::random_hex(3))
}

/// Backs up one VM. Never panics on bad input: every failure ends in the report.
pub fn backup_vm(ctx: &RunContext, vm: &Vm) -> VmReport {
    backup_vm_with(ctx, vm, &coldclone_backends::backend_for)
}

/// Picks the backend for a VM's locator (the real one: `backend_for`).
pub type ChooseBackend<'a> = &'a dyn Fn(&VmLocator) -> Box<dyn Hypervisor>;

/// [`backup_vm`] over the backend `choose` gives (tests hand it a fake one).
pub fn backup_vm_with(ctx: &RunContext, vm: &Vm, choose: ChooseBackend) -> VmReport {
    let run_id = new_run_id();
    let mut report = VmReport::new(&vm.name, &run_id);
    let start = Instant::now();
    report.started_at = crate::journal::now();
    let span = tracing::info_span!("backup", vm = %vm.name, run = %run_id);
    let _enter = span.enter();
    match run_steps(ctx, vm, choose, &run_id, &mut report) {
        Ok(()) => report.status = RunStatus::Ok,
        Err(e) => {
            tracing::error!("backup failed: {e}");
            report.status = RunStatus::Failed;
            report.consistency = None;
            report.snapshot_id = None;
            report.error = Some(e.to_string());
        }
    }
    report.durations_ms.total = start.elapsed().as_millis() as u64;
    report.finished_at = crate::journal::now();
    report
}

fn run_steps(
    ctx: &RunContext,
    vm: &Vm,
    choose: ChooseBackend,
    run_id: &str,
    report: &mut VmReport,
) -> Result<(), PipelineError> {
    let locator = &vm.locator;
    let backend = choose(locator);
    report.backend = backend.name().to_string();
    // Learn the VM before creating anything: a wrong handle fails here, cleanly.
    let info = backend.inspect(locator)?;
    // A fallback the VM cannot have refuses it now, before anything is paused.
    if vm.policy.on_clone_failure == crate::config::OnCloneFailure::Quiesced {
        backend.check_quiesce(&info)?;
    }
    let mut journal = RunJournal::create(&ctx.config.state_dir, run_id, &vm.name)?;
    let work_dir = ctx.config.state_dir.join("runs").join(run_id);
    journal.will_create(
        &SharedResource::Dir {
            path: work_dir.clone(),
        }
        .into(),
    )?;
    std::fs::create_dir_all(&work_dir).map_err(|source| BackendError::Io {
        path: work_dir.clone(),
        source,
    })?;
    let mut run = Run {
        id: run_id.to_string(),
        vm,
        backend,
        journal,
        work_dir,
        clone: None,
    };
    let result = (|| {
        if let Some(policy) = run.vm.policy.balloon.clone() {
            balloon::shrink(&mut run, &info, &policy, report)?;
        }
        let t = Instant::now();
        let checkpoint = checkpoint::run(&mut run, &info, report)?;
        report.durations_ms.checkpoint = t.elapsed().as_millis() as u64;
        report.note_scratch(&run.work_dir);
        if let Some(dir) = &ctx.crash_copy_dir {
            for d in &checkpoint.disks {
                let dest = dir.join(format!("crash-{}.raw", d.name.replace('/', "_")));
                run.backend.export_frozen_disk(d, &dest)?;
            }
        }

        let net = isolate::prepare(&mut run, &info, &ctx.config.isolation)?;

        let t = Instant::now();
        restore::run(&mut run, &info, &checkpoint, &net, report)?;
        report.durations_ms.restore = t.elapsed().as_millis() as u64;

        let t = Instant::now();
        let stopped = stop::run(&mut run, &info, &net, &checkpoint, report)?;
        report.durations_ms.stop = t.elapsed().as_millis() as u64;
        report.note_scratch(&run.work_dir);

        let t = Instant::now();
        archive::run(&mut run, ctx, &info, &net, &checkpoint, &stopped, report)?;
        // The maps this checkpoint started serve the next run now; should this fail,
        // the clean-up removes them and the next run reads whole disks. Not after a
        // quiesced copy: it is of a later instant than the maps' start.
        if let Err(e) = run.backend.settle_change_maps(
            &info,
            &checkpoint,
            stopped.quiesced.is_none(),
            &mut run.journal,
        ) {
            tracing::warn!("changed-block maps: {e}; the next backup reads whole disks");
        }
        report.durations_ms.archive = t.elapsed().as_millis() as u64;
        report.consistency = Some(stopped.consistency);
        Ok::<(), PipelineError>(())
    })();
    report.note_scratch(&run.work_dir);
    let t = Instant::now();
    let cleaned = cleanup::run(run, ctx);
    report.durations_ms.cleanup = t.elapsed().as_millis() as u64;
    match (result, cleaned) {
        (Err(e), Err(c)) => Err(PipelineError::CleanupFailedToo {
            step: Box::new(e),
            cleanup: Box::new(c),
        }),
        (Err(e), Ok(())) => Err(e),
        (Ok(()), Err(c)) => Err(c),
        (Ok(()), Ok(())) => Ok(()),
    }
}
