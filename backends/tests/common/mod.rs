//! What several backend test binaries share.

use coldclone_backends::{self as cb, Journal, Resource};

/// A journal in memory: the resources announced and not yet removed, in order, and the
/// milestones reached.
#[derive(Debug, Default)]
pub struct TestJournal {
    pub open: Vec<(u64, Resource)>,
    pub next: u64,
    pub milestones: Vec<String>,
}

impl Journal for TestJournal {
    fn will_create(&mut self, r: &Resource) -> cb::Result<u64> {
        self.next += 1;
        self.open.push((self.next, r.clone()));
        Ok(self.next)
    }
    fn removed(&mut self, id: u64) -> cb::Result<()> {
        self.open.retain(|(i, _)| *i != id);
        Ok(())
    }
    fn milestone(&mut self, name: &str) -> cb::Result<()> {
        self.milestones.push(name.into());
        Ok(())
    }
}
