//! The run journal: a write-ahead list of everything a run creates.
//!
//! One JSON-lines file per run under `STATE/journal/`, appended and fsynced
//! *before* each resource is created, and again when it is removed. The run
//! holds an exclusive lock on its file, so `recover` (or the next run) can
//! tell a crashed run's journal from a live one: it undoes, newest first,
//! what a crashed run created and never removed, and touches nothing else.

#[cfg(test)]
use coldclone_backends::shared::SharedResource;
use coldclone_backends::{BackendError, Journal, Resource};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("run journal {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path}: {source}")]
    Lock {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {detail}; coldclone acts on its journals as root, so it trusts only a state folder and journals that only root can change (chown root and chmod go-w them, after checking what they hold)")]
    Untrusted { path: PathBuf, detail: String },
}

/// `path` must be owned by us (root) and writable by no one else, and, unless
/// `follow` (the configured state folder may be a link), not a symbolic link.
fn check_trusted(path: &Path, follow: bool) -> Result<(), JournalError> {
    use std::os::unix::fs::MetadataExt;
    let meta = if follow {
        std::fs::metadata(path)
    } else {
        std::fs::symlink_metadata(path)
    };
    let meta = meta.map_err(|source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let untrusted = |detail: String| JournalError::Untrusted {
        path: path.to_path_buf(),
        detail,
    };
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.file_type().is_symlink() {
        return Err(untrusted("is a symbolic link".into()));
    }
    if meta.uid() != me {
        return Err(untrusted(format!(
            "is owned by uid {}, not {me}",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(untrusted(format!(
            "is writable by group or others (mode {:o})",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// One coldclone run at a time per state folder (backup, `audit --compare`,
/// recover): two would fight over host memory and could both try to clean
/// each other's resources. Held for as long as it lives.
pub struct RunLock {
    _file: File,
}

impl RunLock {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("coldclone.lock")
    }

    /// Takes the lock; `None` when another run holds it and `wait` is false.
    pub fn take(state_dir: &Path, wait: bool) -> Result<Option<RunLock>, JournalError> {
        let err = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| JournalError::Lock { what, path, source }
        };
        std::fs::create_dir_all(state_dir)
            .map_err(err("cannot create the state folder", state_dir))?;
        let path = Self::path(state_dir);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(err("cannot open the run lock", &path))?;
        if file.try_lock().is_err() {
            if !wait {
                return Ok(None);
            }
            tracing::warn!(
                "another coldclone run holds the lock; waiting for it to finish (--wait)"
            );
            file.lock()
                .map_err(err("waiting for the run lock", &path))?;
        }
        let io = err("cannot write the run lock", &path);
        file.set_len(0)
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(io)?;
        Ok(Some(RunLock { _file: file }))
    }

    /// The pid written by the run that holds (or last held) the lock.
    pub fn holder(state_dir: &Path) -> String {
        std::fs::read_to_string(Self::path(state_dir))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }
}

/// Withdraws every disk snapshot a run stored (a backup that did not finish):
/// the undo of [`RepositoryResource::RepositoryBackup`].
pub fn forget_run(repo: &coldclone_repository::Repository, run: &str) -> Result<(), String> {
    repo.forget_run(run).map(|_| ()).map_err(|e| e.to_string())
}

/// What a run's journal records: a backend's resource, or one the run
/// itself owns. Untagged: each side carries its `kind`, so the lines are
/// those of the landed code, where both were one enum.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RunResource {
    Backend(Resource),
    Repository(RepositoryResource),
    Restore(RestoreResource),
}

/// Printed as the inner kind, as when all kinds were one enum.
impl std::fmt::Debug for RunResource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunResource::Backend(r) => r.fmt(f),
            RunResource::Repository(r) => r.fmt(f),
            RunResource::Restore(r) => r.fmt(f),
        }
    }
}

/// Resources of the repository's, undone by the run (no backend knows them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RepositoryResource {
    /// Disk snapshots of this run stored in the repository so far: a run that
    /// does not finish archiving every disk has them withdrawn.
    RepositoryBackup { run: String },
}

/// What a restore makes outside coldclone's own folders (in the user's `--to`), undone by
/// `recover` when the restore was killed before it finished; a finished restore marks
/// them [`Entry::Kept`], so that nothing of it is ever removed. Undone by
/// [`crate::commands::restore_journal`], which acts only on what is still what the
/// restore made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RestoreResource {
    /// The restore's private folder beside its target (`.coldclone-restore-XXXXXXXXXXXX`,
    /// made with mkdir, so it was not there before): partial images, sockets.
    RestoreWorkDir { path: PathBuf },
    /// A file the restore put in place (a disk image, an overlay, the start script, its
    /// definition, the instant log): made in the work folder, or created exclusively, and
    /// journaled with its device and inode before it took `path`. Removed only while
    /// `path` is still that file, so never a file of the user's, nor one replaced since.
    /// With `instant_vm`: an overlay of that instant restore's VM (its restore monitor's
    /// path): kept once it has no backing file (a whole disk: the copy ended), left open
    /// (and reported) while that VM runs and copies into it, removed otherwise.
    RestoredFile {
        path: PathBuf,
        dev: u64,
        ino: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        instant_vm: Option<PathBuf>,
    },
    /// An instant restore's exporter, `coldclone serve ... --socket SOCKET --once`, found by
    /// that socket in its command line; stopped (and its socket removed) unless it still
    /// serves the running VM of `instant_vm` (then left open, and reported).
    RestoreExporter {
        socket: PathBuf,
        instant_vm: PathBuf,
    },
    /// An instant restore's VM, found by its restore monitor's path (`monitor`, a chardev
    /// made for the restore) in its command line. A VM that runs is never stopped by
    /// `recover`: whole (no backing file left) it is a finished restore and is left alone;
    /// still copying, it is left running and reported, for `recover` to look at again.
    RestoredVm { monitor: PathBuf, name: String },
}

impl From<RestoreResource> for RunResource {
    fn from(r: RestoreResource) -> Self {
        RunResource::Restore(r)
    }
}

impl From<Resource> for RunResource {
    fn from(r: Resource) -> Self {
        RunResource::Backend(r)
    }
}

impl From<RepositoryResource> for RunResource {
    fn from(r: RepositoryResource) -> Self {
        RunResource::Repository(r)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Entry {
    Start {
        run_id: String,
        vm: String,
        pid: u32,
        at: f64,
    },
    Create {
        id: u64,
        resource: RunResource,
        at: f64,
    },
    Removed {
        id: u64,
        at: f64,
    },
    /// Created and left on purpose: part of what a finished restore made.
    Kept {
        id: u64,
        at: f64,
    },
    Milestone {
        name: String,
        at: f64,
    },
}

pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub fn journal_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("journal")
}

/// Finished runs' journals: the record of when each clone lived (the
/// scheduler's tests read it); the newest `HISTORY_KEEP` are kept.
pub fn history_dir(state_dir: &Path) -> PathBuf {
    journal_dir(state_dir).join("done")
}

const HISTORY_KEEP: usize = 200;

/// Moves a journal with nothing open into the history, trimming the oldest.
fn archive_journal(path: &Path) -> Result<(), JournalError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| JournalError::Io { path: p, source }
    };
    let dir = path
        .parent()
        .map(|p| p.join("done"))
        .unwrap_or_else(|| PathBuf::from("done"));
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    std::fs::rename(path, dir.join(name)).map_err(io(path))?;
    if let Ok(rd) = std::fs::read_dir(&dir) {
        let mut old: Vec<(std::time::SystemTime, PathBuf)> = rd
            .flatten()
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        if old.len() > HISTORY_KEEP {
            old.sort();
            for (_, p) in &old[..old.len() - HISTORY_KEEP] {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    Ok(())
}

/// Every entry of the finished runs in the history, per run.
pub fn history(state_dir: &Path) -> Vec<Vec<Entry>> {
    let Ok(rd) = std::fs::read_dir(history_dir(state_dir)) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .map(|text| {
            text.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .collect()
}

pub struct RunJournal {
    path: PathBuf,
    file: File,
    next_id: u64,
    open: Vec<(u64, RunResource)>,
    /// Test hook: stop dead after this milestone so a test can kill -9 the run there.
    halt_at: Option<String>,
}

impl RunJournal {
    /// Starts a journal for a new run and locks it for the life of the run.
    pub fn create(state_dir: &Path, run_id: &str, vm: &str) -> Result<RunJournal, JournalError> {
        let dir = journal_dir(state_dir);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JournalError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let path = dir.join(format!("{run_id}.jsonl"));
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        file.try_lock().map_err(|e| JournalError::Io {
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let mut j = RunJournal {
            path,
            file,
            next_id: 1,
            open: Vec::new(),
            halt_at: test_halt_at(),
        };
        j.append(&Entry::Start {
            run_id: run_id.to_string(),
            vm: vm.to_string(),
            pid: std::process::id(),
            at: now(),
        })?;
        // The folder entry must be durable too, or a crash could lose the file.
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(j)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn append(&mut self, e: &Entry) -> Result<(), JournalError> {
        let io = |source| JournalError::Io {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_string(e).map_err(|e| io(std::io::Error::other(e)))?;
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(io)?;
        self.file.sync_data().map_err(io)
    }

    /// Resources created and not yet removed, oldest first.
    pub fn open_resources(&self) -> &[(u64, RunResource)] {
        &self.open
    }

    /// Undoes every open resource, newest first. Returns what could not be undone.
    pub fn undo_all(&mut self, undo: &Undo) -> Vec<(RunResource, String)> {
        let mut failed = Vec::new();
        while let Some((id, r)) = self.open.pop() {
            match undo.undo(&r) {
                Ok(Undone::Removed) => {
                    let _ = self.append(&Entry::Removed { id, at: now() });
                }
                Ok(Undone::Kept(why)) => {
                    tracing::warn!(?r, "left: {why}");
                    let _ = self.append(&Entry::Kept { id, at: now() });
                }
                Err(e) => {
                    tracing::error!(?r, "could not remove: {e}");
                    failed.push((r, e));
                }
            }
        }
        failed
    }

    /// Records that `resource` is about to be created; durable when it returns.
    pub fn record(&mut self, resource: RunResource) -> Result<u64, JournalError> {
        let id = self.next_id;
        self.next_id += 1;
        self.append(&Entry::Create {
            id,
            resource: resource.clone(),
            at: now(),
        })?;
        self.open.push((id, resource));
        Ok(id)
    }

    /// Marks every open resource as kept (a finished restore's results): `recover` will
    /// not touch them.
    pub fn keep_all(&mut self) -> Result<(), JournalError> {
        while let Some((id, _)) = self.open.first().cloned() {
            self.append(&Entry::Kept { id, at: now() })?;
            self.open.remove(0);
        }
        Ok(())
    }

    /// Marks one resource as kept for good (recover will not look at it).
    pub fn kept_id(&mut self, id: u64) -> Result<(), JournalError> {
        self.append(&Entry::Kept { id, at: now() })?;
        self.open.retain(|(i, _)| *i != id);
        Ok(())
    }

    /// Marks one resource as gone (removed by the run itself).
    pub fn removed_id(&mut self, id: u64) -> Result<(), JournalError> {
        self.append(&Entry::Removed { id, at: now() })?;
        self.open.retain(|(i, _)| *i != id);
        Ok(())
    }

    /// Ends a run whose resources are all gone: the journal moves to the history.
    pub fn finish(self) -> Result<(), JournalError> {
        if !self.open.is_empty() {
            return Ok(());
        }
        archive_journal(&self.path)
    }
}

fn to_backend(e: JournalError) -> BackendError {
    BackendError::Journal(e.to_string())
}

impl Journal for RunJournal {
    fn will_create(&mut self, resource: &Resource) -> coldclone_backends::Result<u64> {
        self.record(resource.clone().into()).map_err(to_backend)
    }

    fn removed(&mut self, id: u64) -> coldclone_backends::Result<()> {
        self.append(&Entry::Removed { id, at: now() })
            .map_err(to_backend)?;
        self.open.retain(|(i, _)| *i != id);
        Ok(())
    }

    fn milestone(&mut self, name: &str) -> coldclone_backends::Result<()> {
        self.append(&Entry::Milestone {
            name: name.to_string(),
            at: now(),
        })
        .map_err(to_backend)?;
        if self.halt_at.as_deref() == Some(name) {
            tracing::warn!("COLDCLONE_TEST_HALT_AT={name}: halting here for a fault test");
            loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            }
        }
        Ok(())
    }
}

/// What an undo did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Undone {
    /// Removed (or already gone).
    Removed,
    /// Left on purpose for good, and why: part of a restore that is whole.
    Kept(String),
}

/// Knows how to undo every kind of resource: the backend's own, and the
/// repository's partial backups.
pub struct Undo<'a> {
    /// Withdraws the disk snapshots tagged with a run id.
    pub forget_run: &'a dyn Fn(&str) -> Result<(), String>,
    /// What the journals may name.
    pub scope: coldclone_backends::RecoverScope,
}

impl Undo<'_> {
    pub fn undo(&self, r: &RunResource) -> Result<Undone, String> {
        match r {
            RunResource::Repository(RepositoryResource::RepositoryBackup { run }) => {
                (self.forget_run)(run).map(|()| Undone::Removed)
            }
            RunResource::Backend(r) => coldclone_backends::recover_resource(r, &self.scope)
                .map(|()| Undone::Removed)
                .map_err(|e: BackendError| e.to_string()),
            RunResource::Restore(r) => crate::commands::restore_journal::undo(r),
        }
    }
}

/// A crashed run's journal, read back.
#[derive(Debug)]
pub struct StaleRun {
    pub path: PathBuf,
    pub run_id: String,
    pub vm: String,
    pub entries: Vec<Entry>,
}

impl StaleRun {
    /// Resources created and never removed, oldest first.
    pub fn open_resources(&self) -> Vec<(u64, RunResource)> {
        let mut open: Vec<(u64, RunResource)> = Vec::new();
        for e in &self.entries {
            match e {
                Entry::Create { id, resource, .. } => open.push((*id, resource.clone())),
                Entry::Removed { id, .. } | Entry::Kept { id, .. } => open.retain(|(i, _)| i != id),
                _ => {}
            }
        }
        open
    }
}

/// Journals of runs that are not alive (their lock is free).
pub fn stale_runs(state_dir: &Path) -> Result<Vec<StaleRun>, JournalError> {
    let dir = journal_dir(state_dir);
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(source) => return Err(JournalError::Io { path: dir, source }),
    };
    check_trusted(state_dir, true)?;
    check_trusted(&dir, false)?;
    let runs = state_dir.join("runs");
    if runs.exists() {
        check_trusted(&runs, false)?;
    }
    let mut paths: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    paths.sort();
    for path in paths {
        check_trusted(&path, false)?;
        let io = |source| JournalError::Io {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        if file.try_lock().is_err() {
            continue; // a live run owns it
        }
        let mut entries = Vec::new();
        for line in BufReader::new(&file).lines() {
            let line = line.map_err(io)?;
            // A torn last line (crash mid-write) is ignored: its resource was not created yet.
            if let Ok(e) = serde_json::from_str::<Entry>(&line) {
                entries.push(e);
            }
        }
        let (run_id, vm) = match entries.first() {
            Some(Entry::Start { run_id, vm, .. }) => (run_id.clone(), vm.clone()),
            _ => (String::new(), String::new()),
        };
        out.push(StaleRun {
            path: path.clone(),
            run_id,
            vm,
            entries,
        });
    }
    Ok(out)
}

/// What `recover` did with one crashed run.
#[derive(Debug, Serialize)]
pub struct Recovered {
    pub run_id: String,
    pub vm: String,
    pub removed: Vec<RunResource>,
    /// Left on purpose (a restore's results that are whole), and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kept: Vec<(RunResource, String)>,
    pub failed: Vec<(RunResource, String)>,
}

/// Undoes a crashed run's open resources, newest first; deletes its journal when all are gone.
pub fn recover_run(run: &StaleRun, undo: &Undo) -> Result<Recovered, JournalError> {
    let mut file = OpenOptions::new()
        .append(true)
        .open(&run.path)
        .map_err(|source| JournalError::Io {
            path: run.path.clone(),
            source,
        })?;
    let mut rec = Recovered {
        run_id: run.run_id.clone(),
        vm: run.vm.clone(),
        removed: Vec::new(),
        kept: Vec::new(),
        failed: Vec::new(),
    };
    for (id, r) in run.open_resources().into_iter().rev() {
        match undo.undo(&r) {
            Ok(done) => {
                test_halt_recover(&r);
                let entry = match &done {
                    Undone::Removed => Entry::Removed { id, at: now() },
                    Undone::Kept(_) => Entry::Kept { id, at: now() },
                };
                let line = serde_json::to_string(&entry).unwrap_or_default();
                let _ = writeln!(file, "{line}").and_then(|_| file.sync_data());
                match done {
                    Undone::Removed => rec.removed.push(r),
                    Undone::Kept(why) => rec.kept.push((r, why)),
                }
            }
            Err(e) => rec.failed.push((r, e)),
        }
    }
    if rec.failed.is_empty() {
        archive_journal(&run.path)?;
    }
    Ok(rec)
}

/// Fault hook for tests, debug builds only: `COLDCLONE_TEST_RECOVER_HALT_AFTER=KIND`
/// stops `recover` right after it undid the first resource of that kind and
/// before the journal records it: the worst moment for a kill -9.
#[cfg(debug_assertions)]
fn test_halt_recover(r: &RunResource) {
    let Ok(kind) = std::env::var("COLDCLONE_TEST_RECOVER_HALT_AFTER") else {
        return;
    };
    let this = serde_json::to_value(r).unwrap_or_default();
    if this["kind"].as_str() == Some(kind.as_str()) {
        tracing::warn!("COLDCLONE_TEST_RECOVER_HALT_AFTER={kind}: halting for a fault test");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

#[cfg(not(debug_assertions))]
fn test_halt_recover(_r: &RunResource) {}

/// The fault tests' hook: stop dead after a given milestone, to be killed there. It exists
/// only in debug builds and in builds with the `test-hooks` feature (the Xen lab's), so
/// that an environment variable cannot hang a production backup with the VM paused.
#[cfg(any(debug_assertions, feature = "test-hooks"))]
fn test_halt_at() -> Option<String> {
    std::env::var("COLDCLONE_TEST_HALT_AT").ok()
}

#[cfg(not(any(debug_assertions, feature = "test-hooks")))]
fn test_halt_at() -> Option<String> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_resources_survive_a_torn_line_and_removals() {
        let dir = std::env::temp_dir().join(format!("cc-journal-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let mut j = RunJournal::create(&dir, "r1", "vm1").unwrap();
            let a = j
                .will_create(
                    &SharedResource::File {
                        path: "/tmp/a".into(),
                    }
                    .into(),
                )
                .unwrap();
            j.will_create(
                &SharedResource::File {
                    path: "/tmp/b".into(),
                }
                .into(),
            )
            .unwrap();
            j.removed(a).unwrap();
            // While the run lives, its journal is not stale.
            assert!(stale_runs(&dir).unwrap().is_empty());
        }
        let p = journal_dir(&dir).join("r1.jsonl");
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"op\":\"create\",\"id\":9,\"reso").unwrap();
        // Another test's child (mkfs, a probe) forked while the journal was
        // open holds a copy of its locked descriptor until it execs: retry.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut runs = stale_runs(&dir).unwrap();
        while runs.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            runs = stale_runs(&dir).unwrap();
        }
        assert_eq!(runs.len(), 1);
        let open = runs[0].open_resources();
        assert_eq!(open.len(), 1);
        assert_eq!(
            open[0].1,
            RunResource::Backend(
                SharedResource::File {
                    path: "/tmp/b".into()
                }
                .into()
            )
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// One journal line of each resource kind the landed code writes, by
    /// hand from its serde shapes: a journal left by an older coldclone must
    /// still be read (and written back) exactly as it was.
    const TODAY_LINES: &[&str] = &[
        r#"{"op":"create","id":1,"resource":{"kind":"original_paused","qmp":"/run/vm.qmp"},"at":1.5}"#,
        r#"{"op":"create","id":2,"resource":{"kind":"original_migration","qmp":"/run/vm.qmp","capabilities":[["x-ignore-shared",false],["auto-converge",true]],"max_bandwidth":1000,"downtime_limit":300},"at":1.5}"#,
        r#"{"op":"create","id":3,"resource":{"kind":"original_overlay","qmp":"/run/vm.qmp","original_pid":42,"device":"drive0","base_node":"n0","base_file":"/vm/a.qcow2","overlay_file":"/vm/a.cc.qcow2","overlay_node":"cc-n0"},"at":1.5}"#,
        r#"{"op":"create","id":4,"resource":{"kind":"file","path":"/tmp/mem.img"},"at":1.5}"#,
        r#"{"op":"create","id":5,"resource":{"kind":"dir","path":"/tmp/run1"},"at":1.5}"#,
        r#"{"op":"create","id":6,"resource":{"kind":"clone_process","marker":"cc-abc","qmp":"/tmp/run1/clone.qmp"},"at":1.5}"#,
        r#"{"op":"create","id":7,"resource":{"kind":"tap","namespace":"ccns","name":"cctap0"},"at":1.5}"#,
        r#"{"op":"create","id":8,"resource":{"kind":"bridge","namespace":null,"name":"ccbr0"},"at":1.5}"#,
        r#"{"op":"create","id":9,"resource":{"kind":"namespace","name":"ccns"},"at":1.5}"#,
        r#"{"op":"create","id":10,"resource":{"kind":"repository_backup","run":"r1"},"at":1.5}"#,
        r#"{"op":"create","id":11,"resource":{"kind":"xl_original_paused","domain":"db1","uuid":"u-1","image":"/tmp/run1/mem"},"at":1.5}"#,
        r#"{"op":"create","id":12,"resource":{"kind":"xl_balloon","domain":"db1","uuid":"u-1","target_kib":524288},"at":1.5}"#,
        r#"{"op":"create","id":13,"resource":{"kind":"lvm_snapshot","vg":"vg0","lv":"db1-cc","origin":"db1"},"at":1.5}"#,
        r#"{"op":"create","id":14,"resource":{"kind":"xl_domain","name":"db1-clone"},"at":1.5}"#,
        r#"{"op":"create","id":15,"resource":{"kind":"balloon","qmp":"/run/vm.qmp","restore_bytes":1073741824},"at":1.5}"#,
        r#"{"op":"create","id":16,"resource":{"kind":"xapi_vm","target":{"url":"https://pool","credentials_file":null,"tls_fingerprint_sha256":"ab:cd"},"name_label":"coldclone-ckpt-r1"},"at":1.5}"#,
        r#"{"op":"create","id":17,"resource":{"kind":"xapi_network","target":{"url":"https://pool","credentials_file":"/etc/cc/cred","tls_fingerprint_sha256":null},"name_label":"coldclone-net-r1"},"at":1.5}"#,
    ];

    #[test]
    fn journal_lines_of_every_landed_resource_kind_still_parse_unchanged() {
        for line in TODAY_LINES {
            let entry: Entry = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("landed journal line no longer parses: {line}: {e}"));
            assert!(matches!(entry, Entry::Create { .. }), "{line}");
            let back = serde_json::to_value(&entry).unwrap();
            let orig: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(back, orig, "a resource's journal shape changed");
        }
        // The optional fields the landed code defaulted still default.
        let old = r#"{"op":"create","id":1,"resource":{"kind":"xl_original_paused","domain":"d","uuid":"u"},"at":1.0}"#;
        assert!(serde_json::from_str::<Entry>(old).is_ok());
    }

    #[test]
    fn a_landed_journal_is_recovered_by_kind() {
        // Files, folders and the repository's partial backup can be undone
        // here for real; each goes to its own undo.
        let dir = std::env::temp_dir().join(format!("cc-journal-compat-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let jdir = journal_dir(&dir);
        std::fs::create_dir_all(&jdir).unwrap();
        let file = dir.join("runs").join("mem.img");
        let folder = dir.join("runs").join("run1");
        std::fs::create_dir_all(dir.join("runs")).unwrap();
        std::fs::write(&file, b"x").unwrap();
        std::fs::create_dir_all(folder.join("sub")).unwrap();
        let lines = [
            r#"{"op":"start","run_id":"r1","vm":"vm1","pid":1,"at":1.0}"#.to_string(),
            format!(
                r#"{{"op":"create","id":1,"resource":{{"kind":"dir","path":"{}"}},"at":1.0}}"#,
                folder.display()
            ),
            format!(
                r#"{{"op":"create","id":2,"resource":{{"kind":"file","path":"{}"}},"at":1.0}}"#,
                file.display()
            ),
            r#"{"op":"create","id":3,"resource":{"kind":"repository_backup","run":"r1"},"at":1.0}"#
                .to_string(),
        ];
        std::fs::write(jdir.join("r1.jsonl"), lines.join("\n") + "\n").unwrap();
        let runs = stale_runs(&dir).unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].open_resources().len(), 3);
        let forgotten = std::cell::RefCell::new(Vec::new());
        let forget = |r: &str| {
            forgotten.borrow_mut().push(r.to_string());
            Ok(())
        };
        let rec = recover_run(
            &runs[0],
            &Undo {
                forget_run: &forget,
                scope: coldclone_backends::RecoverScope {
                    state_dir: dir.clone(),
                },
            },
        )
        .unwrap();
        assert!(rec.failed.is_empty(), "{:?}", rec.failed);
        assert_eq!(rec.removed.len(), 3);
        assert_eq!(*forgotten.borrow(), vec!["r1".to_string()]);
        assert!(!file.exists() && !folder.exists());
        assert!(stale_runs(&dir).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
