//! Step 4: ask the clone to power off (ACPI button or PV shutdown) and wait,
//! bounded. Its own shutdown flushes and unmounts: that is the consistency.

use super::{isolate, PipelineError, Run};
use crate::config::OnCloneFailure;
use crate::report::QuiesceReport;
use crate::report::{Consistency, VmReport};
use coldclone_backends::{
    Checkpoint, CloneNetwork, CloneOutcome, Journal, QuiescedSnapshot, VmInfo,
};
use std::time::{Duration, Instant};

/// Verifies the clone's network again, from the kernel's state now: a host
/// network manager may have enslaved a port to the bridge, or moved the
/// clone's tap, since the check before resume. If it fails, the clone is
/// killed at once and the backup fails (its disk may hold what the clone
/// did while it could reach a network).
pub fn reverify(run: &mut Run, net: &CloneNetwork, when: &str) -> Result<(), PipelineError> {
    // A network the hypervisor made (XAPI's, with a handle) is checked by
    // the backend for a paused clone (verify_isolation); what is re-checked
    // here is a Linux bridge on this host.
    if net.handle.is_some() {
        return Ok(());
    }
    let Some(clone) = run.clone.as_mut() else {
        return Ok(());
    };
    let checked = isolate::verify(net, &clone.taps).map(|_| ());
    if let Err(e) = checked {
        tracing::error!("isolation no longer holds {when}: {e}; killing the clone");
        match run.backend.destroy_clone(clone, &mut run.journal) {
            Ok(()) => run.clone = None,
            Err(d) => tracing::error!("destroying the clone: {d}; the clean-up retries"),
        }
        return Err(e);
    }
    run.journal
        .milestone(&format!("isolation:reverified-{when}"))?;
    Ok(())
}

/// How the clone ended, for the archive.
#[derive(Debug)]
pub struct Stopped {
    /// The consistency the archived disks will have.
    pub consistency: Consistency,
    /// `quiesced`: the original's snapshot, archived instead of the clone's disks.
    pub quiesced: Option<QuiescedSnapshot>,
}

impl Stopped {
    fn clone_disks(consistency: Consistency) -> Stopped {
        Stopped {
            consistency,
            quiesced: None,
        }
    }
}

/// Returns how the clone ended and what to archive.
pub fn run(
    run: &mut Run,
    vm: &VmInfo,
    net: &CloneNetwork,
    checkpoint: &Checkpoint,
    report: &mut VmReport,
) -> Result<Stopped, PipelineError> {
    reverify(run, net, "before-stop")?;
    let clone = run
        .clone
        .as_mut()
        .ok_or(PipelineError::NoClone("no clone to stop"))?;
    let method = run.backend.stop_methods(vm);
    report.clone_stop = Some(method);
    let timeout = Duration::from_secs(run.vm.policy.stop_timeout_secs);
    let t = Instant::now();
    run.backend.request_stop(clone, method)?;
    run.journal.milestone("stop:requested")?;
    let outcome = run.backend.wait_stopped(clone, timeout)?;
    report.clone_stop_seconds = Some(t.elapsed().as_secs_f64());
    run.journal.milestone("stop:stopped")?;
    match (outcome, run.vm.policy.on_clone_failure) {
        (CloneOutcome::StoppedByGuest, _) => Ok(Stopped::clone_disks(Consistency::CleanShutdown)),
        (CloneOutcome::StoppedByGuestAgent, _) => {
            let w = format!(
                "the clone did not power off within {} s of the {method:?} request; it was shut down through its guest agent (guest-shutdown)",
                run.vm.policy.stop_timeout_secs
            );
            tracing::warn!("{w}");
            report.warnings.push(w);
            Ok(Stopped::clone_disks(Consistency::CleanShutdown))
        }
        (CloneOutcome::Killed, OnCloneFailure::Crash) => {
            let w = format!(
                "the clone did not power off within {} s and was killed; archiving its disk as crash-consistent (on_clone_failure = \"crash\")",
                run.vm.policy.stop_timeout_secs
            );
            tracing::warn!("{w}");
            report.warnings.push(w);
            Ok(Stopped::clone_disks(Consistency::Crash))
        }
        (CloneOutcome::Killed, OnCloneFailure::Quiesced) => {
            let w = format!(
                "the clone did not power off within {} s and was killed; archiving a snapshot of the original taken with its file systems frozen through its guest agent (on_clone_failure = \"quiesced\")",
                run.vm.policy.stop_timeout_secs
            );
            tracing::warn!("{w}");
            report.warnings.push(w);
            let q = run.backend.quiesced_snapshot(
                vm,
                checkpoint,
                &run.work_dir,
                Duration::from_secs(run.vm.policy.freeze_timeout_secs),
                &mut run.journal,
            )?;
            report.quiesce = Some(QuiesceReport {
                frozen_filesystems: q.frozen_filesystems,
                frozen_ms: q.frozen_ms,
            });
            if q.frozen_filesystems == 0 {
                let w = "the guest agent froze no file system: the quiesced copy is as consistent as a crash-consistent one".to_string();
                tracing::warn!("{w}");
                report.warnings.push(w);
            }
            Ok(Stopped {
                consistency: Consistency::Quiesced,
                quiesced: Some(q),
            })
        }
        (CloneOutcome::Killed, OnCloneFailure::Fail) => Err(PipelineError::CloneDidNotStop(
            run.vm.policy.stop_timeout_secs,
        )),
    }
}
