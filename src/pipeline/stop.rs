//! Step 4: ask the clone to power off (ACPI button or PV shutdown) and wait,
//! bounded. Its own shutdown flushes and unmounts: that is the consistency.

use super::{PipelineError, Run};
use crate::config::OnCloneFailure;
use crate::report::{Consistency, VmReport};
use coldclone_backends::{CloneOutcome, Journal, VmInfo};
use std::time::{Duration, Instant};

/// Returns the consistency the archived disk will have.
pub fn run(
    run: &mut Run,
    vm: &VmInfo,
    report: &mut VmReport,
) -> Result<Consistency, PipelineError> {
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
        (CloneOutcome::StoppedByGuest, _) => Ok(Consistency::CleanShutdown),
        (CloneOutcome::Killed, OnCloneFailure::Crash) => {
            let w = format!(
                "the clone did not power off within {} s and was killed; archiving its disk as crash-consistent (on_clone_failure = \"crash\")",
                run.vm.policy.stop_timeout_secs
            );
            tracing::warn!("{w}");
            report.warnings.push(w);
            Ok(Consistency::Crash)
        }
        (CloneOutcome::Killed, OnCloneFailure::Fail) => Err(PipelineError::CloneDidNotStop(
            run.vm.policy.stop_timeout_secs,
        )),
    }
}
