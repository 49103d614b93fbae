//! Step 3: the clone, restored paused from the checkpoint, its disks writable
//! overlays over the frozen snapshot, its NICs on the isolated bridge; resumed
//! only after the isolation is verified.

use super::{isolate, PipelineError, Run};
use crate::report::{IsolatedNetwork, VmReport};
use coldclone_backends::{Checkpoint, CloneNetwork, Journal, VmInfo};

pub fn run(
    run: &mut Run,
    vm: &VmInfo,
    checkpoint: &Checkpoint,
    net: &CloneNetwork,
    report: &mut VmReport,
) -> Result<(), PipelineError> {
    let clone_name = format!("coldclone-clone-{}", run.id);
    let clone = run.backend.restore_clone(
        vm,
        checkpoint,
        net,
        &clone_name,
        &run.work_dir,
        &mut run.journal,
    )?;
    let clone = run.clone.insert(clone);
    // Remove the checkpoint's memory image as soon as the clone has it? No:
    // it is small next to the disks and `recover` removes it with the run.
    let verified = match run.backend.verify_isolation(clone)? {
        Some(v) => v,
        None => isolate::verify(net, &clone.taps)?,
    };
    tracing::info!(bridge = %verified.bridge, ports = ?verified.ports, "isolation verified");
    report.isolated_network = Some(IsolatedNetwork {
        bridge: verified.bridge.clone(),
        namespace: verified.namespace.clone(),
        ports: verified.ports.clone(),
    });
    run.journal.milestone("restore:isolation-verified")?;
    run.backend.resume_clone(clone, &verified)?;
    run.journal.milestone("restore:clone-running")?;
    Ok(())
}
