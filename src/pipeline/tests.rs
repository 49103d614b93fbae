//! The pipeline over a fake `Hypervisor` that fails at each step: what is
//! cleaned up and in which order, what the journal says, what the report
//! says. No root, no hypervisor: files stand in for every resource.

use super::*;
use crate::journal::{history, stale_runs, Entry, RunResource};
use crate::report::{Consistency, RunStatus, VmReport};
use coldclone_backends::shared::SharedResource;
use coldclone_backends::{
    Checkpoint, CloneDisk, CloneNetwork, CloneOutcome, DiskInfo, FrozenDisk, Opaque, OpaqueMut,
    PauseTimes, StopMethod, VmInfo,
};
use coldclone_repository::{InitOptions, KdfParams, Location};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const DISK_BYTES: u64 = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd)]
enum Step {
    Inspect,
    Checkpoint,
    Network,
    Restore,
    Verify,
    Resume,
    RequestStop,
    WaitStopped,
    Export,
}

const STEPS: [Step; 9] = [
    Step::Inspect,
    Step::Checkpoint,
    Step::Network,
    Step::Restore,
    Step::Verify,
    Step::Resume,
    Step::RequestStop,
    Step::WaitStopped,
    Step::Export,
];

/// A backend whose resources are files in the run's folder, journaled like
/// real ones; it fails at `fail_at` and logs every call.
struct FakeBackend {
    fail_at: Option<Step>,
    outcome: CloneOutcome,
    calls: Arc<Mutex<Vec<String>>>,
}

/// The fake clone: a marker file stands for its process.
struct FakeClone {
    marker: PathBuf,
    journal_id: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackendError + '_ {
    move |source| BackendError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl FakeBackend {
    fn step(&self, s: Step) -> coldclone_backends::Result<()> {
        self.log(&format!("{s:?}"));
        if self.fail_at == Some(s) {
            return Err(BackendError::Clone(format!("injected failure at {s:?}")));
        }
        Ok(())
    }
    fn log(&self, what: &str) {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(what.to_string());
    }
    /// Journals a file, then makes it.
    fn make_file(
        path: &Path,
        bytes: &[u8],
        journal: &mut dyn Journal,
    ) -> coldclone_backends::Result<u64> {
        let id = journal.will_create(
            &SharedResource::File {
                path: path.to_path_buf(),
            }
            .into(),
        )?;
        std::fs::write(path, bytes).map_err(io(path))?;
        Ok(id)
    }
}

impl Hypervisor for FakeBackend {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn inspect(&self, _vm: &VmLocator) -> coldclone_backends::Result<VmInfo> {
        self.step(Step::Inspect)?;
        Ok(VmInfo {
            name: "fake1".into(),
            backend: "fake",
            running: true,
            memory_bytes: 1 << 30,
            disks: vec![DiskInfo {
                name: "vda".into(),
                file: "/fake/vda.img".into(),
                format: "raw".into(),
                read_only: false,
                bytes: DISK_BYTES,
            }],
            nics: 1,
            detail: Opaque::new(()),
        })
    }

    fn checkpoint(
        &self,
        _vm: &VmInfo,
        work_dir: &Path,
        journal: &mut dyn Journal,
    ) -> coldclone_backends::Result<Checkpoint> {
        let memory_image = work_dir.join("memory.bin");
        Self::make_file(&memory_image, b"memory", journal)?;
        self.step(Step::Checkpoint)?;
        Ok(Checkpoint {
            method: "fake-checkpoint",
            memory_image,
            memory_image_bytes: 6,
            pause: PauseTimes {
                total_ms: 2.0,
                disk_snapshot_ms: 0.5,
                memory_ms: 1.5,
            },
            disks: vec![FrozenDisk {
                name: "vda".into(),
                frozen_file: "/fake/vda.img".into(),
                format: "raw".into(),
                bytes: DISK_BYTES,
            }],
            ..Default::default()
        })
    }

    fn isolated_network(
        &self,
        _vm: &VmInfo,
        run_id: &str,
        _journal: &mut dyn Journal,
    ) -> coldclone_backends::Result<Option<CloneNetwork>> {
        self.step(Step::Network)?;
        Ok(Some(CloneNetwork {
            namespace: network_isolation::Namespace::current(),
            bridge: "fakebr0".into(),
            tap_prefix: "fk".into(),
            handle: Some(format!("net-{run_id}")),
        }))
    }

    fn restore_clone(
        &self,
        _vm: &VmInfo,
        _checkpoint: &Checkpoint,
        _net: &CloneNetwork,
        clone_name: &str,
        work_dir: &Path,
        journal: &mut dyn Journal,
    ) -> coldclone_backends::Result<PausedClone> {
        let marker = work_dir.join("clone.running");
        let journal_id = Self::make_file(&marker, b"", journal)?;
        let overlay = work_dir.join("clone-vda.img");
        Self::make_file(&overlay, &vec![7u8; DISK_BYTES as usize], journal)?;
        self.step(Step::Restore)?;
        Ok(PausedClone {
            name: clone_name.to_string(),
            taps: vec!["fk0".into()],
            disks: vec![CloneDisk {
                name: "vda".into(),
                overlay,
                bytes: DISK_BYTES,
            }],
            console_log: work_dir.join("console.log"),
            detail: OpaqueMut::new(FakeClone { marker, journal_id }),
        })
    }

    fn verify_isolation(
        &self,
        clone: &mut PausedClone,
    ) -> coldclone_backends::Result<Option<network_isolation::Verified>> {
        self.step(Step::Verify)?;
        Ok(Some(network_isolation::Verified {
            bridge: "fakebr0".into(),
            namespace: None,
            ports: clone.taps.clone(),
        }))
    }

    fn resume_clone(
        &self,
        _clone: &mut PausedClone,
        _verified: &network_isolation::Verified,
    ) -> coldclone_backends::Result<()> {
        self.step(Step::Resume)
    }

    fn request_stop(
        &self,
        _clone: &mut PausedClone,
        _method: StopMethod,
    ) -> coldclone_backends::Result<()> {
        self.step(Step::RequestStop)
    }

    fn wait_stopped(
        &self,
        _clone: &mut PausedClone,
        _timeout: Duration,
    ) -> coldclone_backends::Result<CloneOutcome> {
        self.step(Step::WaitStopped)?;
        Ok(self.outcome)
    }

    fn destroy_clone(
        &self,
        clone: &mut PausedClone,
        journal: &mut dyn Journal,
    ) -> coldclone_backends::Result<()> {
        self.log("destroy_clone");
        let c: &mut FakeClone = clone
            .detail
            .get_mut()
            .ok_or_else(|| BackendError::Unsupported("not a fake clone".into()))?;
        coldclone_backends::util::remove_file_if_exists(&c.marker)?;
        journal.removed(c.journal_id)
    }

    fn export_disk(
        &self,
        _clone: &PausedClone,
        disk: &CloneDisk,
        dest: &Path,
    ) -> coldclone_backends::Result<()> {
        self.step(Step::Export)?;
        std::fs::copy(&disk.overlay, dest)
            .map(|_| ())
            .map_err(io(dest))
    }

    fn release_checkpoint(
        &self,
        _vm: &VmInfo,
        _checkpoint: &Checkpoint,
        _journal: &mut dyn Journal,
    ) -> coldclone_backends::Result<()> {
        Ok(())
    }

    fn stop_methods(&self, _vm: &VmInfo) -> StopMethod {
        StopMethod::Acpi
    }
}

struct Outcome {
    dir: PathBuf,
    report: VmReport,
    calls: Vec<String>,
    /// The run's journal, read back from the history.
    entries: Vec<Entry>,
    snapshots: usize,
}

fn run_fake(
    name: &str,
    fail_at: Option<Step>,
    outcome: CloneOutcome,
    on_clone_failure: &str,
) -> Outcome {
    let dir = std::env::temp_dir().join(format!("cc-pipeline-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("test folder");
    let config = Config::parse(
        &format!(
            "state_dir = {:?}\n[[vm]]\nname = \"fake1\"\nqmp = \"/fake/fake1.qmp\"\non_clone_failure = \"{on_clone_failure}\"\n",
            dir.display().to_string()
        ),
        Path::new("fake.toml"),
    )
    .expect("config");
    // A cheap key derivation: the repository's cost is not under test.
    let repo = Repository::init_with(
        &Location::Local(dir.join("repo")),
        "pw",
        &InitOptions {
            kdf: KdfParams {
                m_cost_kib: 64,
                t_cost: 1,
                p_cost: 1,
            },
            ..Default::default()
        },
    )
    .expect("repository");
    let ctx = RunContext {
        config: &config,
        repo: &repo,
        host: "testhost".into(),
        show_progress: false,
        crash_copy_dir: None,
    };
    let calls = Arc::new(Mutex::new(Vec::new()));
    let c2 = calls.clone();
    let choose = move |_: &VmLocator| -> Box<dyn Hypervisor> {
        Box::new(FakeBackend {
            fail_at,
            outcome,
            calls: c2.clone(),
        })
    };
    let vm = config.vm("fake1").expect("vm");
    let report = backup_vm_with(&ctx, vm, &choose);
    assert!(
        stale_runs(&config.state_dir).expect("journals").is_empty(),
        "{name}: a journal was left open"
    );
    let mut runs = history(&config.state_dir);
    let entries = runs.pop().unwrap_or_default();
    assert!(runs.is_empty(), "{name}: one run, one journal");
    let snapshots = repo.snapshots().expect("snapshots").len();
    let calls = calls.lock().map(|c| c.clone()).unwrap_or_default();
    Outcome {
        dir,
        report,
        calls,
        entries,
        snapshots,
    }
}

/// (id, path of the file or folder) of every resource the journal created.
fn created(entries: &[Entry]) -> Vec<(u64, PathBuf)> {
    entries
        .iter()
        .filter_map(|e| match e {
            Entry::Create {
                id,
                resource:
                    RunResource::Backend(coldclone_backends::Resource::Shared(
                        SharedResource::File { path } | SharedResource::Dir { path },
                    )),
                ..
            } => Some((*id, path.clone())),
            Entry::Create { id, .. } => Some((*id, PathBuf::from("repository-backup"))),
            _ => None,
        })
        .collect()
}

fn removed(entries: &[Entry]) -> Vec<u64> {
    entries
        .iter()
        .filter_map(|e| match e {
            Entry::Removed { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

/// Every resource removed exactly once, and what the clean-up undid (after
/// the clone is destroyed) newest first, the run's folder last.
fn assert_cleaned_up(o: &Outcome, what: &str, clone_made: bool) {
    let made = created(&o.entries);
    let mut gone = removed(&o.entries);
    let mut sorted = gone.clone();
    sorted.sort_unstable();
    let mut ids: Vec<u64> = made.iter().map(|(id, _)| *id).collect();
    ids.sort_unstable();
    assert_eq!(sorted, ids, "{what}: each resource removed once");
    let marker = made.iter().find(|(_, p)| p.ends_with("clone.running"));
    if let (true, Some((marker, _))) = (clone_made, marker) {
        let at = gone.iter().position(|id| id == marker);
        let destroyed = o.calls.iter().any(|c| c == "destroy_clone");
        assert!(destroyed, "{what}: a clone that exists is destroyed");
        assert_eq!(
            o.calls.last().map(String::as_str),
            Some("destroy_clone"),
            "{what}: the clone is destroyed after the last step"
        );
        gone = gone.split_off(at.expect("the clone's removal is journaled") + 1);
    } else {
        assert!(
            !o.calls.iter().any(|c| c == "destroy_clone"),
            "{what}: no clone, nothing to destroy"
        );
        // Archive removes its own as it goes: only what came after its removals.
        let first_undone = gone
            .windows(2)
            .rposition(|w| w[0] < w[1])
            .map_or(0, |i| i + 1);
        gone = gone.split_off(first_undone);
    }
    assert!(
        gone.windows(2).all(|w| w[0] > w[1]),
        "{what}: the clean-up undoes newest first: {gone:?}"
    );
    if !made.is_empty() {
        assert_eq!(gone.last(), Some(&1), "{what}: the run folder goes last");
    }
    for (_, p) in &made {
        assert!(!p.exists(), "{what}: {} is left", p.display());
    }
}

#[test]
fn a_backup_over_the_fake_backend_stores_every_disk_and_cleans_up() {
    let o = run_fake("ok", None, CloneOutcome::StoppedByGuest, "fail");
    let r = &o.report;
    assert_eq!(r.status, RunStatus::Ok, "{:?}", r.error);
    assert_eq!(r.backend, "fake");
    assert_eq!(r.snapshot_id.as_deref(), Some(r.run_id.as_str()));
    assert_eq!(r.consistency, Some(Consistency::CleanShutdown));
    assert_eq!(r.checkpoint_method, Some("fake-checkpoint"));
    assert_eq!(r.original_pause_ms, Some(2.0));
    assert_eq!(r.memory_image_bytes, Some(6));
    assert_eq!(r.clone_stop, Some(StopMethod::Acpi));
    let net = r.isolated_network.as_ref().expect("isolated network");
    assert_eq!(
        (net.bridge.as_str(), net.ports.clone()),
        ("fakebr0", vec!["fk0".to_string()])
    );
    assert_eq!(r.disks.len(), 1);
    assert_eq!(
        (r.disks[0].name.as_str(), r.disks[0].bytes),
        ("vda", DISK_BYTES)
    );
    assert!(r.error.is_none());
    assert_eq!(o.snapshots, 1);
    let steps: Vec<String> = STEPS.iter().map(|s| format!("{s:?}")).collect();
    assert_eq!(o.calls[..steps.len()], steps[..], "the six steps in order");
    assert_cleaned_up(&o, "ok", true);
    // The journal's milestones, in the pipeline's order.
    let milestones: Vec<&str> = o
        .entries
        .iter()
        .filter_map(|e| match e {
            Entry::Milestone { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    for pair in [
        ["isolate:bridge-ready", "restore:isolation-verified"],
        ["restore:isolation-verified", "restore:clone-running"],
        ["restore:clone-running", "stop:requested"],
        ["stop:stopped", "archive:disk-stored"],
    ] {
        let at = |m: &str| milestones.iter().position(|x| *x == m);
        assert!(
            at(pair[0]) < at(pair[1]) && at(pair[0]).is_some(),
            "{pair:?} in {milestones:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&o.dir);
}

#[test]
fn a_failure_at_each_step_stores_nothing_and_cleans_up_newest_first() {
    for step in STEPS {
        let what = format!("fail at {step:?}");
        let o = run_fake(
            &format!("fail-{step:?}"),
            Some(step),
            CloneOutcome::StoppedByGuest,
            "fail",
        );
        let r = &o.report;
        assert_eq!(r.status, RunStatus::Failed, "{what}");
        let err = r.error.clone().unwrap_or_default();
        assert!(
            err.contains(&format!("injected failure at {step:?}")),
            "{what}: {err}"
        );
        assert!(r.snapshot_id.is_none() && r.consistency.is_none(), "{what}");
        assert!(r.disks.is_empty(), "{what}: no disk reported");
        assert_eq!(r.backend, "fake", "{what}");
        assert_eq!(o.snapshots, 0, "{what}: nothing stays in the repository");
        assert_eq!(
            o.calls.iter().rfind(|c| !c.starts_with("destroy")),
            Some(&format!("{step:?}")),
            "{what}: no step after the failed one"
        );
        if step == Step::Inspect {
            // Nothing was created: no journal at all.
            assert!(o.entries.is_empty(), "{what}");
        } else {
            assert!(
                matches!(o.entries.first(), Some(Entry::Start { .. })),
                "{what}"
            );
            assert_cleaned_up(&o, &what, step > Step::Restore);
        }
        let _ = std::fs::remove_dir_all(&o.dir);
    }
}

#[test]
fn a_clone_that_does_not_stop_fails_or_is_archived_as_crash_by_policy() {
    let o = run_fake("killed-fail", None, CloneOutcome::Killed, "fail");
    assert_eq!(o.report.status, RunStatus::Failed);
    assert!(o
        .report
        .error
        .as_deref()
        .is_some_and(|e| e.contains("did not power off")));
    assert_eq!(o.snapshots, 0);
    assert!(
        !o.calls.iter().any(|c| c == "Export"),
        "no export of a killed clone"
    );
    assert_cleaned_up(&o, "killed, fail", true);
    let _ = std::fs::remove_dir_all(&o.dir);

    let o = run_fake("killed-crash", None, CloneOutcome::Killed, "crash");
    assert_eq!(o.report.status, RunStatus::Ok, "{:?}", o.report.error);
    assert_eq!(o.report.consistency, Some(Consistency::Crash));
    assert_eq!(o.report.warnings.len(), 1);
    assert_eq!(o.snapshots, 1);
    assert_cleaned_up(&o, "killed, crash", true);
    let _ = std::fs::remove_dir_all(&o.dir);
}

#[test]
fn a_clone_stopped_by_its_guest_agent_is_clean_and_says_so() {
    // Under on_clone_failure = "fail" too: the agent's shutdown is a clean one.
    let o = run_fake("agent", None, CloneOutcome::StoppedByGuestAgent, "fail");
    assert_eq!(o.report.status, RunStatus::Ok, "{:?}", o.report.error);
    assert_eq!(o.report.consistency, Some(Consistency::CleanShutdown));
    assert!(
        o.report.warnings.iter().any(|w| w.contains("guest agent")),
        "{:?}",
        o.report.warnings
    );
    assert_eq!(o.snapshots, 1);
    assert_cleaned_up(&o, "agent", true);
    let _ = std::fs::remove_dir_all(&o.dir);
}

#[test]
fn quiesced_without_an_agent_is_refused_before_anything_is_paused() {
    // The fake backend has no guest agent (the trait's default check_quiesce).
    let o = run_fake("quiesced", None, CloneOutcome::Killed, "quiesced");
    assert_eq!(o.report.status, RunStatus::Failed);
    assert!(
        o.report
            .error
            .as_deref()
            .is_some_and(|e| e.contains("\"quiesced\" is not available")),
        "{:?}",
        o.report.error
    );
    assert!(
        !o.calls.iter().any(|c| c == "Checkpoint"),
        "a checkpoint was taken: {:?}",
        o.calls
    );
    assert_eq!(o.snapshots, 0);
    let _ = std::fs::remove_dir_all(&o.dir);
}
