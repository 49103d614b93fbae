//! Step 6: destroy the clone and remove everything the run created, newest
//! first, from the run journal: the same code path `coldclone recover` uses.
//! The original's disk chain goes back to one image here (its overlay is
//! committed back into the image it froze).

use super::{PipelineError, Run, RunContext};
use crate::journal::Undo;

pub fn run(mut run: Run, ctx: &RunContext) -> Result<(), PipelineError> {
    if let Some(clone) = run.clone.as_mut() {
        if let Err(e) = run.backend.destroy_clone(clone, &mut run.journal) {
            tracing::warn!("destroying the clone: {e}; the journal clean-up retries");
        }
    }
    let forget = |r: &str| crate::journal::forget_run(ctx.repo, r);
    let undo = Undo {
        forget_run: &forget,
        scope: coldclone_backends::RecoverScope {
            state_dir: ctx.config.state_dir.clone(),
        },
    };
    let failed = run.journal.undo_all(&undo);
    if failed.is_empty() {
        run.journal.finish()?;
        Ok(())
    } else {
        let what: Vec<String> = failed.iter().map(|(r, e)| format!("{r:?}: {e}")).collect();
        Err(PipelineError::Other(format!(
            "clean-up left {} resource(s), kept in journal {} for `coldclone recover`: {}",
            what.len(),
            run.journal.path().display(),
            what.join("; ")
        )))
    }
}
