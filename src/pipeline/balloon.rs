//! Optional step before the checkpoint: balloon the original down to its
//! policy's target, so its memory image and its clone are smaller. The journal
//! entry made before the request puts the memory back at clean-up, or in
//! `recover` after a crash: on every path.

use super::{PipelineError, Run};
use crate::config::BalloonPolicy;
use crate::report::{BalloonReport, VmReport};
use coldclone_backends::{Journal, VmInfo};
use std::time::{Duration, Instant};

/// Close enough to the target: guests free memory in steps.
const SLACK_BYTES: u64 = 8 << 20;

pub fn shrink(
    run: &mut Run,
    vm: &VmInfo,
    policy: &BalloonPolicy,
    report: &mut VmReport,
) -> Result<(), PipelineError> {
    let target = policy
        .target_bytes(vm.memory_bytes)
        .map_err(PipelineError::Balloon)?;
    let before = run.backend.balloon(vm, target, &mut run.journal)?;
    run.journal.milestone("balloon:requested")?;
    let timeout = Duration::from_secs(policy.timeout_secs.unwrap_or(60));
    let start = Instant::now();
    let mut actual = before;
    while start.elapsed() < timeout {
        actual = run.backend.memory_actual(vm)?.unwrap_or(actual);
        if actual <= target + SLACK_BYTES {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let reached = actual <= target + SLACK_BYTES;
    if !reached {
        let w = format!(
            "the balloon reached {} MiB, not the target {} MiB, within {} s; backing up anyway",
            actual >> 20,
            target >> 20,
            timeout.as_secs()
        );
        tracing::warn!("{w}");
        report.warnings.push(w);
    }
    tracing::info!(
        before_mib = before >> 20,
        target_mib = target >> 20,
        actual_mib = actual >> 20,
        "ballooned"
    );
    report.balloon = Some(BalloonReport {
        original_bytes: before,
        target_bytes: target,
        reached_bytes: actual,
        seconds: start.elapsed().as_secs_f64(),
    });
    Ok(())
}
