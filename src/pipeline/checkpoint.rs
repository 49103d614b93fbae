//! Step 1: memory image + point-in-time snapshot of every disk, taken while
//! the original is paused as briefly as the hypervisor allows.

use super::{PipelineError, Run};
use crate::report::{PauseSplit, VmReport};
use coldclone_backends::{Checkpoint, VmInfo};

pub fn run(run: &mut Run, vm: &VmInfo, report: &mut VmReport) -> Result<Checkpoint, PipelineError> {
    let ckpt = run
        .backend
        .checkpoint(vm, &run.work_dir, &mut run.journal)?;
    tracing::info!(
        method = ckpt.method,
        pause_ms = ckpt.pause.total_ms,
        memory_image_bytes = ckpt.memory_image_bytes,
        "checkpoint taken; the original runs on"
    );
    report.checkpoint_method = Some(ckpt.method);
    report.original_pause_ms = Some(ckpt.pause.total_ms);
    report.original_pause = Some(PauseSplit {
        disk_snapshot_ms: ckpt.pause.disk_snapshot_ms,
        memory_ms: ckpt.pause.memory_ms,
    });
    report.memory_image_bytes = Some(ckpt.memory_image_bytes);
    // What the backend wants the user to know (xl: its monitor process ended).
    report.warnings.extend(ckpt.warnings.iter().cloned());
    Ok(ckpt)
}
