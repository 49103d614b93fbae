//! The XAPI backend against the XAPI simulator (`xapi-sim`), through the
//! `Hypervisor` trait in the pipeline's order, with a real repository and a
//! journal whose clean-up is `recover_resource`, as `coldclone` does it.
//! No root, no real XAPI: what the simulator models is in docs/xapi.md.

use coldclone_backends::{
    self as cb, BackendError, CloneOutcome, PausedClone, Resource, VmLocator,
};
use coldclone_repository::{
    BackupOptions, FileSource, InitOptions, KdfParams, Location, NoProgress, Repository,
    SnapshotMeta,
};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use xapi_sim::{At, Faults, Fired, Sim, VmSpec};

mod common;
use common::TestJournal;

/// The backend's milestones in a good run, in order.
const MILESTONES: [&str; 6] = [
    "checkpoint:disks-snapshotted",
    "isolate:xapi-network-ready",
    "restore:vdis-cloned",
    "restore:clone-created",
    "restore:memory-loaded",
    "archive:maps-kept",
];

/// The state folder a run's file lies in (`STATE/runs/RUN/...`): these tests keep each
/// run's files in its rig's own folder, which plays the state folder.
fn scope_of(r: &Resource) -> cb::RecoverScope {
    let path = match r {
        Resource::Shared(cb::shared::SharedResource::File { path })
        | Resource::Shared(cb::shared::SharedResource::Dir { path }) => Some(path.as_path()),
        _ => None,
    };
    let state_dir = path
        .and_then(|p| {
            p.ancestors()
                .find(|a| a.file_name().is_some_and(|n| n == "runs"))
        })
        .and_then(|runs| runs.parent())
        .unwrap_or(std::path::Path::new("/"));
    cb::RecoverScope {
        state_dir: state_dir.to_path_buf(),
    }
}

impl TestJournal {
    /// Newest first, as `coldclone`'s clean-up and `recover` do.
    /// What fails stays in the journal for `coldclone recover`.
    fn undo_all(&mut self) -> Vec<String> {
        let mut failed = vec![];
        let mut kept = vec![];
        while let Some((id, r)) = self.open.pop() {
            if let Err(e) = cb::recover_resource(&r, &scope_of(&r)) {
                failed.push(format!("{r:?}: {e}"));
                kept.push((id, r));
            }
        }
        kept.reverse();
        self.open = kept;
        failed
    }
}

struct Rig {
    dir: PathBuf,
    sim: Sim,
    vm_ref: String,
    vm_uuid: String,
    creds: PathBuf,
    repo: Repository,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rig(test: &str, spec: VmSpec) -> Rig {
    let dir = std::env::temp_dir().join(format!(
        "cc-xapi-{test}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).expect("test dir");
    let sim = Sim::start(&dir.join("sr")).expect("simulator");
    sim.add_user("root", "s3cret pass");
    let (vm_ref, vm_uuid) = sim.add_vm(&spec).expect("vm");
    let creds = dir.join("xapi.credentials");
    std::fs::write(&creds, "username = \"root\"\npassword = \"s3cret pass\"\n").expect("creds");
    let repo = Repository::init_with(
        &Location::Local(dir.join("repo")),
        "pw",
        &InitOptions {
            kdf: KdfParams::insecure_for_tests(),
            ..InitOptions::default()
        },
    )
    .expect("repository");
    Rig {
        dir,
        sim,
        vm_ref,
        vm_uuid,
        creds,
        repo,
    }
}

fn locator(r: &Rig, vm: &str) -> VmLocator {
    VmLocator::Xapi {
        url: r.sim.url.clone(),
        vm: vm.into(),
        credentials_file: Some(r.creds.clone()),
        // The simulator speaks plain http.
        options: cb::xapi::XapiOptions {
            insecure_http: true,
            ..Default::default()
        },
    }
}

/// One archived disk: its name, the clone VDI it came from, the repository snapshot.
#[derive(Debug)]
struct Archived {
    disk: String,
    vdi_uuid: String,
    snapshot: String,
    /// Chunks the repository had to store (not found already).
    new_chunks: u64,
    stored_bytes: u64,
    bytes_read: u64,
    /// The ranges read, when a changed-block map drove the backup.
    read_by_map: Option<Vec<cb::ChangedRange>>,
    /// What the next run needs: this run's map and the clone's writes.
    next: Option<DiskMap>,
}

/// A disk's map as a snapshot records it for the next run (the pipeline keeps it in
/// the snapshot's tags).
#[derive(Debug, Clone)]
struct DiskMap {
    started: String,
    clone_writes: Vec<cb::ChangedRange>,
    snapshot: String,
}

/// The ranges to read from the previous run's record and this run's maps, as the
/// pipeline's src/pipeline/changes.rs joins them; `None`: read the whole disk.
fn plan(
    prev: Option<&DiskMap>,
    maps: Option<&cb::DiskChangeMaps>,
    mine: Option<&[cb::ChangedRange]>,
) -> Option<Vec<cb::ChangedRange>> {
    let (prev, maps, mine) = (prev?, maps?, mine?);
    let since = maps.since.get(&prev.started)?;
    let mut all: Vec<cb::ChangedRange> = since
        .iter()
        .chain(&prev.clone_writes)
        .chain(mine)
        .cloned()
        .collect();
    all.sort_by_key(|r| r.start);
    Some(all)
}

#[derive(Debug)]
struct RunResult {
    archived: Result<Vec<Archived>, String>,
    /// What the clean-up (destroy_clone + journal undo) could not remove.
    leftovers: Vec<String>,
    /// The run's journal afterwards (what `coldclone recover` would get).
    journal: TestJournal,
    network_bridge: Option<String>,
}

/// The pipeline's steps against the XAPI backend, then its clean-up.
fn backup(r: &Rig, run_id: &str, stop_timeout: Duration) -> RunResult {
    backup_with(r, run_id, stop_timeout, None)
}

/// The same, ballooning the original to `balloon` bytes first (as the pipeline's balloon step).
fn backup_with(r: &Rig, run_id: &str, stop_timeout: Duration, balloon: Option<u64>) -> RunResult {
    backup_inc(r, run_id, stop_timeout, balloon, &BTreeMap::new())
}

/// The same, incremental against `prev` (disk → the previous run's record) where the
/// maps allow, each map-driven backup checked against a whole read (the verify mode).
fn backup_inc(
    r: &Rig,
    run_id: &str,
    stop_timeout: Duration,
    balloon: Option<u64>,
    prev: &BTreeMap<String, DiskMap>,
) -> RunResult {
    let loc = locator(r, &r.vm_uuid);
    let backend = cb::backend_for(&loc);
    let mut j = TestJournal::default();
    let work = r.dir.join("runs").join(run_id);
    std::fs::create_dir_all(&work).expect("work dir");
    let mut clone: Option<PausedClone> = None;
    let mut bridge = None;
    let archived = (|| -> Result<Vec<Archived>, BackendError> {
        let info = backend.inspect(&loc)?;
        if let Some(target) = balloon {
            backend.balloon(&info, target, &mut j)?;
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10)
                && backend.memory_actual(&info)?.is_none_or(|m| m > target)
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let ckpt = backend.checkpoint(&info, &work, &mut j)?;
        let net = backend
            .isolated_network(&info, run_id, &mut j)?
            .ok_or_else(|| BackendError::Unsupported("XAPI makes its own network".into()))?;
        bridge = Some(net.bridge.clone());
        let c = clone.insert(backend.restore_clone(
            &info,
            &ckpt,
            &net,
            &format!("coldclone-clone-{run_id}"),
            &work,
            &mut j,
        )?);
        let verified = backend
            .verify_isolation(c)?
            .ok_or_else(|| BackendError::Unsupported("XAPI verifies its own network".into()))?;
        backend.resume_clone(c, &verified)?;
        let method = backend.stop_methods(&info);
        backend.request_stop(c, method)?;
        if backend.wait_stopped(c, stop_timeout)? != CloneOutcome::StoppedByGuest {
            return Err(BackendError::Clone(
                "the clone did not power off in time".into(),
            ));
        }
        let mut out = vec![];
        for d in c.disks.clone() {
            let writes = match backend.clone_writes(c, &d, &mut j) {
                Ok(w) => w,
                Err(e) => {
                    eprintln!("clone writes of {}: {e}; read whole", d.name);
                    None
                }
            };
            let maps = ckpt.change_maps.get(&d.name);
            let p = prev.get(&d.name);
            let ranges = plan(p, maps, writes.as_deref());
            let raw = work.join(format!("export-{}.raw", d.name));
            backend.export_disk(c, &d, &raw)?;
            let src = FileSource::open(&raw).map_err(|e| BackendError::Clone(e.to_string()))?;
            let s = r
                .repo
                .backup_disk(
                    &src,
                    SnapshotMeta {
                        vm: info.name.clone(),
                        disk: d.name.clone(),
                        backend: "xapi".into(),
                        host: "test".into(),
                        host_uuid: String::new(),
                        consistency: "clean-shutdown".into(),
                        tags: BTreeMap::new(),
                        vm_config: None,
                    },
                    &BackupOptions {
                        parent: ranges.as_ref().and(p).map(|p| p.snapshot.clone()),
                        changed_ranges: ranges.clone(),
                    },
                    &NoProgress,
                )
                .map_err(|e| BackendError::Clone(e.to_string()))?;
            if ranges.is_some() {
                // The verify mode: the map-driven backup equals a whole read.
                let cmp = r
                    .repo
                    .compare_disk(&s.snapshot_id, &src)
                    .map_err(|e| BackendError::Clone(e.to_string()))?;
                assert!(
                    cmp.is_equal(),
                    "disk {}: the map missed a change: {cmp:?}",
                    d.name
                );
            }
            let _ = std::fs::remove_file(&raw);
            let next = match (maps, writes) {
                (Some(m), Some(w)) => Some(DiskMap {
                    started: m.started.clone(),
                    clone_writes: w,
                    snapshot: s.snapshot_id.clone(),
                }),
                _ => None,
            };
            out.push(Archived {
                disk: d.name.clone(),
                vdi_uuid: d
                    .overlay
                    .to_string_lossy()
                    .trim_start_matches("xapi:vdi/")
                    .to_string(),
                snapshot: s.snapshot_id,
                new_chunks: s.new_chunks,
                stored_bytes: s.stored_bytes,
                bytes_read: s.bytes_read,
                read_by_map: ranges,
                next,
            });
        }
        // As the pipeline: once every disk is stored, the maps are the next run's.
        if let Err(e) = backend.settle_change_maps(&info, &ckpt, true, &mut j) {
            eprintln!("changed-block maps: {e}; the next backup reads whole disks");
        }
        Ok(out)
    })()
    .map_err(|e| e.to_string());
    let mut leftovers = vec![];
    if let Some(c) = clone.as_mut() {
        if let Err(e) = backend.destroy_clone(c, &mut j) {
            eprintln!("destroy_clone: {e} (the journal clean-up retries)");
        }
    }
    leftovers.extend(j.undo_all());
    drop(backend);
    RunResult {
        archived,
        leftovers,
        journal: j,
        network_bridge: bridge,
    }
}

/// Nothing of any run is left on the host, and the original runs.
/// A successful run's kept changed-block maps may remain.
fn assert_clean(r: &Rig, context: &str) {
    assert_clean_but_maps(r, context, true)
}

/// Nothing at all is left (no run succeeded).
fn assert_nothing_left(r: &Rig, context: &str) {
    assert_clean_but_maps(r, context, false)
}

/// The same, but for at most one kept changed-block map per disk when `maps_may_remain`
/// (after a successful run): a metadata-only snapshot of one of the original's VDIs.
fn assert_clean_but_maps(r: &Rig, context: &str, maps_may_remain: bool) {
    // Tasks a failed call abandoned finish in the simulator's own time (its
    // threads) and are dropped: wait for that, however loaded the machine;
    // the bound only ends the wait for a task left behind, which fails below.
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(120) && !r.sim.state().tasks.is_empty() {
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = r.sim.state();
    let vms: Vec<&String> = st.vms.values().map(|v| &v.name_label).collect();
    assert_eq!(st.vms.len(), 1, "{context}: VMs left: {vms:?}");
    let orig = st.vms.get(&r.vm_ref).expect("the original exists");
    assert_eq!(
        orig.power_state, "Running",
        "{context}: the original must run"
    );
    let own: Vec<&String> = orig
        .vbds
        .iter()
        .filter_map(|b| st.vbds.get(b))
        .map(|b| &b.vdi)
        .collect();
    let is_map = |v: &xapi_sim::Vdi| {
        v.kind == xapi_sim::VdiType::CbtMetadata
            && v.is_a_snapshot
            && own.contains(&&v.snapshot_of)
            && v.name_label.starts_with("coldclone-cbt-")
    };
    let maps: Vec<&String> = st
        .vdis
        .values()
        .filter(|v| is_map(v))
        .map(|v| &v.snapshot_of)
        .collect();
    let extra: Vec<&String> = st
        .vdis
        .iter()
        .filter(|(k, v)| !(own.contains(k) || maps_may_remain && is_map(v)))
        .map(|(_, v)| &v.name_label)
        .collect();
    assert!(extra.is_empty(), "{context}: VDIs left: {extra:?}");
    let per_disk: std::collections::BTreeSet<&String> = maps.iter().copied().collect();
    assert_eq!(
        per_disk.len(),
        maps.len(),
        "{context}: at most one kept map per disk"
    );
    assert_eq!(
        st.networks.len(),
        1,
        "{context}: networks left: {:?}",
        st.networks
            .values()
            .map(|n| &n.name_label)
            .collect::<Vec<_>>()
    );
    assert!(
        st.tasks.is_empty(),
        "{context}: tasks left: {:?}",
        st.tasks
            .values()
            .map(|t| (&t.name_label, &t.status))
            .collect::<Vec<_>>()
    );
    assert!(
        st.sessions.is_empty(),
        "{context}: {} sessions not logged out",
        st.sessions.len()
    );
    let files = std::fs::read_dir(r.dir.join("sr"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| !e.file_name().to_string_lossy().starts_with("halted-"))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(files, own.len(), "{context}: VDI files left in the SR");
}

/// Each archived disk, restored, equals the clone's disk as its guest left it.
fn assert_archive_matches(r: &Rig, archived: &[Archived], ctx: &str) {
    let disks = r.sim.state().vms[&r.vm_ref].vbds.len();
    assert_eq!(
        archived.len(),
        disks,
        "{ctx}: every disk of the VM is archived"
    );
    for a in archived {
        let halted = r
            .sim
            .state()
            .halted_images
            .get(&a.vdi_uuid)
            .cloned()
            .unwrap_or_else(|| panic!("{ctx}: disk {} was not shut down cleanly", a.disk));
        let restored = r.dir.join(format!("restored-{}-{}", a.disk, a.snapshot));
        r.repo
            .restore(&a.snapshot, &restored, &NoProgress)
            .expect("restore");
        assert!(
            std::fs::read(&restored).ok() == std::fs::read(&halted).ok(),
            "{ctx}: disk {}: the archive differs from the clone's stopped VDI",
            a.disk
        );
        let _ = std::fs::remove_file(&restored);
    }
}

const DISKS: [u64; 2] = [1 << 20, 512 << 10];
/// Small disks for the many runs of the fault sweep.
const SMALL: [u64; 2] = [256 << 10, 128 << 10];

#[test]
fn xapi_happy_path_archives_the_stopped_clone_disk_and_stays_isolated() {
    let r = rig("happy", VmSpec::new("web1", &DISKS));
    let out = backup(&r, "run1", Duration::from_secs(30));
    assert!(out.leftovers.is_empty(), "{:?}", out.leftovers);
    assert_eq!(
        out.journal.milestones, MILESTONES,
        "the backend's milestones, in order"
    );
    let archived = out.archived.expect("the backup succeeds");
    assert_eq!(archived.len(), 2);
    assert_eq!(
        archived.iter().map(|a| a.disk.as_str()).collect::<Vec<_>>(),
        ["xvda", "xvdb"],
        "disks keep their userdevice names"
    );
    for a in &archived {
        let halted = r
            .sim
            .state()
            .halted_images
            .get(&a.vdi_uuid)
            .cloned()
            .unwrap_or_else(|| panic!("the clone's disk {} was shut down cleanly", a.disk));
        let restored = r.dir.join(format!("restored-{}", a.disk));
        r.repo
            .restore(&a.snapshot, &restored, &NoProgress)
            .expect("restore");
        let (got, want) = (
            std::fs::read(&restored).expect("restored"),
            std::fs::read(&halted).expect("halted image"),
        );
        assert!(
            got == want,
            "disk {}: the archive differs from the clone's stopped VDI",
            a.disk
        );
        let marker = b"clean shutdown of coldclone-clone-run1";
        assert_eq!(
            &got[8192..8192 + marker.len()],
            marker,
            "the guest's own shutdown is in the archive"
        );
        assert!(
            !got.windows(12).any(|w| w == b"the original"),
            "writes the original made after the checkpoint are not in the backup"
        );
    }
    // The clone's VIFs were only ever on the run's network, which has no PIF.
    let st = r.sim.state();
    let clone_att: Vec<_> = st
        .attachments
        .iter()
        .filter(|a| a.vm_name == "coldclone-clone-run1")
        .collect();
    assert!(!clone_att.is_empty(), "the clone ran");
    assert!(
        clone_att.iter().all(|a| !a.network_has_pif),
        "{clone_att:?}"
    );
    let nets: std::collections::BTreeSet<_> = clone_att.iter().map(|a| &a.network).collect();
    assert_eq!(nets.len(), 1, "one isolated network: {nets:?}");
    assert!(out.network_bridge.is_some_and(|b| b.starts_with("xapi")));
    // The clone resumed from the checkpoint's memory: the suspend VDI it ran
    // from is a clone of the checkpoint's suspend VDI.
    let resumed: Vec<_> = st
        .resumed
        .iter()
        .filter(|x| x.vm_name == "coldclone-clone-run1")
        .collect();
    assert_eq!(resumed.len(), 1, "{:?}", st.resumed);
    assert_eq!(
        resumed[0].cloned_from_checkpoint.as_deref(),
        Some("coldclone-checkpoint-run1"),
        "{resumed:?}"
    );
    // It was never made with VM.clone (which drops a checkpoint clone's memory).
    assert!(!st.call_log.iter().any(|c| c.ends_with("VM.clone")));
    drop(st);
    assert_clean(&r, "after a good run");
}

/// The calls every run makes, however fast or slow the host answers: a task
/// is polled until it is done (at least once each), the wait for the clone's
/// shutdown looks at least once (one `event.from`, one power state). The
/// further polls depend on timing and are left out, so that every call listed
/// here, as its method's occurrence, happens in every run.
fn certain_calls(seq: &[At]) -> Vec<At> {
    let mut kept: Vec<&str> = vec![];
    let (mut in_wait, mut wait_power_seen, mut prev) = (false, false, "");
    let mut metrics_kept = false;
    for c in seq {
        let m = c.method.as_str();
        let keep = match m {
            "event.from" if in_wait => false,
            "event.from" => {
                in_wait = true;
                wait_power_seen = false;
                true
            }
            "VM.get_power_state" if in_wait => !std::mem::replace(&mut wait_power_seen, true),
            "task.get_record" => !in_wait && prev != "task.get_record",
            // The balloon's wait polls memory_actual as long as the guest takes.
            "VM.get_metrics" => {
                metrics_kept = prev != "VM_metrics.get_memory_actual";
                metrics_kept
            }
            "VM_metrics.get_memory_actual" => metrics_kept,
            _ => {
                in_wait = false;
                true
            }
        };
        if keep {
            kept.push(m);
        }
        prev = m;
    }
    let mut seen: BTreeMap<&str, u64> = BTreeMap::new();
    kept.into_iter()
        .map(|m| {
            let n = seen.entry(m).or_insert(0);
            *n += 1;
            At::new(m, *n)
        })
        .collect()
}

/// The certain calls of a fault-free run (two runs agree on them).
fn baseline_calls(disks: &[u64]) -> Vec<At> {
    let run = |tag: &str| {
        let r = rig(tag, VmSpec::new("db1", disks));
        let out = backup(&r, "count", Duration::from_secs(30));
        out.archived.expect("the baseline run succeeds");
        assert_eq!(out.journal.milestones, MILESTONES);
        assert!(r.sim.fired().is_empty(), "no fault in a baseline");
        certain_calls(&r.sim.call_sequence())
    };
    let (a, b) = (run("count-a"), run("count-b"));
    assert_eq!(a, b, "two fault-free runs make the same certain calls");
    a
}

/// The injected fault fired exactly once, where it was put.
fn assert_fired(r: &Rig, fault: &str, at: &At, ctx: &str) -> Fired {
    let fired = r.sim.fired();
    assert!(
        fired.len() == 1 && fired[0].fault == fault && fired[0].at == *at,
        "{ctx}: the fault must fire once, at {at}; fired: {fired:?}"
    );
    fired[0].clone()
}

#[test]
fn xapi_fault_at_every_call_fails_cleanly_and_leaves_nothing() {
    // Every call of a good run, as its method's occurrence, fails in turn on a fresh host.
    let calls = baseline_calls(&SMALL);
    let (mut failed, mut absorbed, mut recovered) = (0, vec![], 0);
    for at in &calls {
        let r = rig("fault", VmSpec::new("db1", &SMALL));
        r.sim.set_faults(Faults {
            fail_at: Some(at.clone()),
            ..Faults::default()
        });
        let out = backup(&r, "f", Duration::from_secs(10));
        let fired = assert_fired(&r, "fail_at", at, &format!("fault at {at}"));
        let ctx = format!("fault at {at} (call {} of the run)", fired.call);
        assert!(
            MILESTONES.starts_with(
                &out.journal
                    .milestones
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
            ),
            "{ctx}: milestones in order: {:?}",
            out.journal.milestones
        );
        match &out.archived {
            Err(e) => {
                failed += 1;
                assert!(
                    e.contains("INTERNAL_ERROR") || e.contains("injected"),
                    "{ctx}: the error names XAPI's failure: {e}"
                );
            }
            // A failure the backend absorbs (task.destroy is tried twice, a
            // failed logout, a retried export, a check after the fact does
            // not spoil the data): then the backup must be exactly right.
            // A fault while the maps are kept only costs the next run a whole read.
            Ok(archived) => {
                absorbed.push(at.to_string());
                let m = &out.journal.milestones;
                assert!(
                    m == &MILESTONES || m[..] == MILESTONES[..MILESTONES.len() - 1],
                    "{ctx}: {m:?}"
                );
                assert_archive_matches(&r, archived, &ctx);
            }
        }
        let succeeded = out.archived.is_ok();
        let mut out = out;
        if !out.leftovers.is_empty() {
            // The pipeline reports the run failed and keeps the journal;
            // `coldclone recover` then removes the rest.
            recovered += 1;
            assert!(
                out.leftovers.iter().all(|l| l.contains("injected")),
                "{ctx}: {:?}",
                out.leftovers
            );
            let again = out.journal.undo_all();
            assert!(again.is_empty(), "{ctx}: recover failed: {again:?}");
        }
        assert!(out.journal.open.is_empty(), "{ctx}: journal entries left");
        // Only a successful run's kept map (one per disk) may remain.
        assert_clean_but_maps(&r, &ctx, succeeded);
    }
    eprintln!(
        "{} calls, each fault fired: {failed} failed the run cleanly, {} were absorbed: {absorbed:?}, {recovered} needed `recover` after a failed clean-up call",
        calls.len(),
        absorbed.len()
    );
    assert!(failed > calls.len() / 2, "most faults fail the run");
}

#[test]
fn xapi_busy_object_at_every_call_is_asked_again() {
    // OTHER_OPERATION_IN_PROGRESS means "refused, nothing done": every call may be repeated.
    // Only calls that act on an object (reads are not refused as busy).
    let acting: Vec<At> = baseline_calls(&SMALL)
        .into_iter()
        .filter(|c| {
            let m = c.method.as_str();
            !m.contains(".get_")
                && !m.starts_with("session.")
                && m != "event.from"
                && m != "export_raw_vdi"
        })
        .collect();
    assert!(!acting.is_empty());
    for at in acting {
        let r = rig("busy", VmSpec::new("db1", &SMALL));
        r.sim.set_faults(Faults {
            busy_at: Some(at.clone()),
            ..Faults::default()
        });
        let out = backup(&r, "b", Duration::from_secs(10));
        let ctx = format!("busy at {at}");
        assert_fired(&r, "busy_at", &at, &ctx);
        let archived = out.archived.unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert_eq!(out.journal.milestones, MILESTONES, "{ctx}");
        assert_archive_matches(&r, &archived, &ctx);
        assert!(out.leftovers.is_empty(), "{ctx}: {:?}", out.leftovers);
        assert_clean(&r, &ctx);
    }
}

#[test]
fn xapi_export_fault_fails_cleanly() {
    let r = rig("exportfault", VmSpec::new("db1", &DISKS));
    r.sim.set_faults(Faults {
        fail_method: Some("export_raw_vdi".into()),
        ..Faults::default()
    });
    let out = backup(&r, "e1", Duration::from_secs(30));
    let e = out.archived.expect_err("every export fails");
    assert!(e.contains("failed after 3 attempts"), "{e}");
    assert!(out.leftovers.is_empty(), "{:?}", out.leftovers);
    assert_nothing_left(&r, "export fault");
}

#[test]
fn xapi_session_expiry_mid_run_logs_in_again() {
    let calls = baseline_calls(&DISKS);
    let n = calls.len();
    let export = calls
        .iter()
        .position(|c| c.method == "export_raw_vdi")
        .expect("an export");
    for i in [1, n / 4, n / 2, export, n * 3 / 4, n - 2] {
        let at = calls[i].clone();
        let r = rig("expiry", VmSpec::new("db1", &DISKS));
        r.sim.set_faults(Faults {
            expire_sessions_at: Some(at.clone()),
            ..Faults::default()
        });
        let out = backup(&r, "x", Duration::from_secs(30));
        let ctx = format!("sessions expired at {at}");
        assert_fired(&r, "expire_sessions_at", &at, &ctx);
        let archived = out
            .archived
            .unwrap_or_else(|e| panic!("{ctx}: the run must survive: {e}"));
        assert_archive_matches(&r, &archived, &ctx);
        assert!(out.leftovers.is_empty(), "{:?}", out.leftovers);
        assert_clean(&r, &ctx);
    }
}

#[test]
fn xapi_session_expiry_at_the_export_logs_in_and_asks_again() {
    let r = rig("expiry-export", VmSpec::new("db1", &DISKS));
    r.sim.set_faults(Faults {
        expire_sessions_at_first_export: true,
        ..Faults::default()
    });
    let out = backup(&r, "x", Duration::from_secs(30));
    let fired = r.sim.fired();
    assert!(
        fired.len() == 1 && fired[0].at == At::new("export_raw_vdi", 1),
        "the sessions expired at the first export: {fired:?}"
    );
    let archived = out.archived.expect("the run survives");
    assert_archive_matches(&r, &archived, "session expired at the export");
    let log = r.sim.state().call_log.clone();
    let at = log
        .iter()
        .position(|c| c == "export_raw_vdi")
        .expect("an export");
    assert_eq!(
        log.get(at + 1..at + 3),
        Some(
            &[
                "session.login_with_password".to_string(),
                "export_raw_vdi".to_string()
            ][..]
        ),
        "the refused export (HTTP 401) logs in again and asks again"
    );
    assert_clean(&r, "session expired at the export");
}

#[test]
fn xapi_slow_export_and_a_dropped_connection_are_retried() {
    let r = rig("drop", VmSpec::new("db1", &DISKS));
    r.sim.set_faults(Faults {
        export_delay_per_block: Duration::from_millis(5),
        drop_export_after: Some(200_000),
        drop_export_count: 1,
        ..Faults::default()
    });
    let out = backup(&r, "d1", Duration::from_secs(30));
    let archived = out.archived.expect("a dropped export is tried again");
    assert!(out.leftovers.is_empty(), "{:?}", out.leftovers);
    for a in &archived {
        let halted = r.sim.state().halted_images[&a.vdi_uuid].clone();
        let restored = r.dir.join(format!("restored-{}", a.disk));
        r.repo
            .restore(&a.snapshot, &restored, &NoProgress)
            .expect("restore");
        assert!(
            std::fs::read(&restored).ok() == std::fs::read(&halted).ok(),
            "disk {}",
            a.disk
        );
    }
    assert_clean(&r, "dropped export");

    // A connection that always drops: a clear failure, nothing stored, nothing left.
    let r = rig("drop2", VmSpec::new("db1", &DISKS));
    r.sim.set_faults(Faults {
        drop_export_after: Some(100_000),
        drop_export_count: 100,
        ..Faults::default()
    });
    let out = backup(&r, "d2", Duration::from_secs(30));
    let e = out.archived.expect_err("fails");
    assert!(e.contains("ended after 100000 of"), "{e}");
    assert!(out.leftovers.is_empty(), "{:?}", out.leftovers);
    assert_clean(&r, "always-dropped export");
}

#[test]
fn xapi_hvm_guest_without_pv_drivers_fails_with_the_reason() {
    let mut spec = VmSpec::new("win1", &DISKS);
    spec.pv_drivers = false;
    let r = rig("hvm", spec);
    let out = backup(&r, "h1", Duration::from_secs(30));
    let e = out.archived.expect_err("no way to press the power button");
    assert!(e.contains("no ACPI power-button call"), "{e}");
    assert!(out.leftovers.is_empty(), "{:?}", out.leftovers);
    assert_nothing_left(&r, "HVM without PV drivers");
}

#[test]
fn xapi_guest_ignoring_the_shutdown_is_killed_and_cleaned_up() {
    let r = rig("ignore", VmSpec::new("db1", &DISKS));
    r.sim.set_faults(Faults {
        guest_ignores_shutdown: true,
        ..Faults::default()
    });
    let out = backup(&r, "i1", Duration::from_secs(1));
    let e = out.archived.expect_err("no clean shutdown");
    assert!(e.contains("did not power off"), "{e}");
    // The wait ended by itself: the backend gave up and powered the clone off.
    let log = r.sim.state().call_log.clone();
    let asked = log.iter().position(|c| c == "Async.VM.clean_shutdown");
    let killed = log.iter().position(|c| c == "VM.hard_shutdown");
    assert!(
        matches!((asked, killed), (Some(a), Some(k)) if a < k),
        "a clean shutdown was asked for, then the clone was powered off: {log:?}"
    );
    assert!(
        r.sim.state().halted_images.is_empty(),
        "the guest never shut down cleanly"
    );
    assert!(out.leftovers.is_empty(), "{:?}", out.leftovers);
    assert_nothing_left(&r, "guest ignoring the shutdown");
}

#[test]
fn xapi_unsuspendable_vm_fails_at_the_checkpoint() {
    let mut spec = VmSpec::new("gpu1", &DISKS);
    spec.can_suspend = false;
    let r = rig("nosuspend", spec);
    let out = backup(&r, "n1", Duration::from_secs(30));
    let e = out.archived.expect_err("cannot checkpoint");
    assert!(e.contains("VM_LACKS_FEATURE"), "{e}");
    assert_nothing_left(&r, "unsuspendable");
}

#[test]
fn xapi_bad_credentials_and_unknown_vm_are_named() {
    let r = rig("creds", VmSpec::new("db1", &DISKS));
    let b = cb::backend_for(&locator(&r, "no-such-vm"));
    let e = b
        .inspect(&locator(&r, "no-such-vm"))
        .expect_err("unknown")
        .to_string();
    assert!(e.contains("no VM named \"no-such-vm\""), "{e}");
    let e = b
        .inspect(&locator(&r, "db1"))
        .map(|i| i.name)
        .expect("by name label");
    assert_eq!(e, "db1");
    drop(b);
    std::fs::write(&r.creds, "username = \"root\"\npassword = \"wrong\"\n").expect("creds");
    let b = cb::backend_for(&locator(&r, "db1"));
    let e = b
        .inspect(&locator(&r, "db1"))
        .expect_err("wrong password")
        .to_string();
    assert!(
        e.contains("refused the login of root") && e.contains("Authentication failure"),
        "{e}"
    );
    assert!(!e.contains("wrong"), "the password is not echoed: {e}");
    std::fs::write(&r.creds, "password = \"x\"\n").expect("creds");
    let e = b
        .inspect(&locator(&r, "db1"))
        .expect_err("no user")
        .to_string();
    assert!(e.contains("username"), "{e}");
}

#[test]
fn xapi_recover_removes_what_a_crashed_run_left() {
    // A run that "crashed" after the clone was created: only its journal remains.
    let r = rig("crash", VmSpec::new("db1", &DISKS));
    let loc = locator(&r, "db1");
    let backend = cb::backend_for(&loc);
    let info = backend.inspect(&loc).expect("inspect");
    let mut j = TestJournal::default();
    let work = r.dir.join("runs/c1");
    std::fs::create_dir_all(&work).expect("dir");
    let ckpt = backend
        .checkpoint(&info, &work, &mut j)
        .expect("checkpoint");
    let net = backend
        .isolated_network(&info, "c1", &mut j)
        .expect("network")
        .expect("some");
    let mut c = backend
        .restore_clone(&info, &ckpt, &net, "coldclone-clone-c1", &work, &mut j)
        .expect("clone");
    let v = backend
        .verify_isolation(&mut c)
        .expect("verify")
        .expect("some");
    backend.resume_clone(&mut c, &v).expect("resume");
    // The run's XAPI session lives in its values (VM, checkpoint, clone):
    // dropping them without the clean-up is the crash, as dropping the
    // backend was when the backend held the session.
    drop((c, ckpt, info, net));
    drop(backend);
    assert_eq!(
        r.sim.state().vms.len(),
        3,
        "original, checkpoint, running clone"
    );
    // Journal entries survive as JSON; recover works from them alone.
    let saved =
        serde_json::to_string(&j.open.iter().map(|(_, r)| r).collect::<Vec<_>>()).expect("json");
    assert!(
        !saved.contains("s3cret"),
        "no secret in the journal: {saved}"
    );
    let back: Vec<Resource> = serde_json::from_str(&saved).expect("parse");
    for res in back.iter().rev() {
        cb::recover_resource(res, &scope_of(res))
            .unwrap_or_else(|e| panic!("recover {res:?}: {e}"));
    }
    assert_clean(&r, "after recover");
}

#[test]
fn xapi_export_redirected_to_another_host_is_followed() {
    let r = rig("redirect", VmSpec::new("db1", &DISKS));
    r.sim.set_faults(Faults {
        redirect_exports: true,
        ..Faults::default()
    });
    let out = backup(&r, "r1", Duration::from_secs(30));
    let archived = out.archived.expect("a redirected export works");
    assert_archive_matches(&r, &archived, "redirected export");
    let asked = r
        .sim
        .state()
        .call_log
        .iter()
        .filter(|c| *c == "export_raw_vdi")
        .count();
    assert_eq!(
        asked,
        2 * DISKS.len(),
        "each export went to the master, then where it pointed"
    );
    assert_clean(&r, "redirected export");
}

#[test]
fn xapi_clone_left_on_the_uplink_is_never_unpaused() {
    let r = rig("noisolation", VmSpec::new("db1", &DISKS));
    r.sim.set_faults(Faults {
        // The landed test had VIF.move do nothing; the clone path now makes
        // its VIFs with VIF.create on the run's network, so the broken host
        // puts them on the uplink instead.
        vif_create_on_uplink: true,
        ..Faults::default()
    });
    let out = backup(&r, "v1", Duration::from_secs(30));
    let e = out.archived.expect_err("the isolation check fails");
    assert!(e.contains("which has a PIF"), "{e}");
    let st = r.sim.state();
    let ran: Vec<_> = st
        .attachments
        .iter()
        .filter(|a| a.vm_name == "coldclone-clone-v1" && a.power_state == "Running")
        .collect();
    assert!(ran.is_empty(), "the clone never ran: {ran:?}");
    drop(st);
    assert!(out.leftovers.is_empty(), "{:?}", out.leftovers);
    assert_clean(&r, "failed isolation");
}

#[test]
fn xapi_second_backup_dedups_against_the_first() {
    let r = rig("twice", VmSpec::new("db1", &DISKS));
    let a = backup(&r, "t1", Duration::from_secs(30))
        .archived
        .expect("first");
    assert_archive_matches(&r, &a, "first run");
    let b = backup(&r, "t2", Duration::from_secs(30))
        .archived
        .expect("second");
    // Each archive is its own clone's stopped disk (the shutdown markers differ).
    assert_archive_matches(&r, &b, "second run");
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.disk, y.disk);
        assert_ne!(x.snapshot, y.snapshot);
        assert_ne!(x.vdi_uuid, y.vdi_uuid, "each run exports its own clone");
        // Between the two runs only the block the original wrote after the
        // first checkpoint and the guest's shutdown marker changed.
        assert!(
            x.new_chunks > 2,
            "{}: the first run stores the disk",
            x.disk
        );
        assert!(
            (1..=2).contains(&y.new_chunks),
            "{}: the second run stores only the changed chunks, not {} of them (first: {})",
            y.disk,
            y.new_chunks,
            x.new_chunks
        );
        assert!(
            y.stored_bytes * 4 < x.stored_bytes,
            "{}: the second run adds {} bytes, the first {}",
            y.disk,
            y.stored_bytes,
            x.stored_bytes
        );
    }
    assert_clean(&r, "two runs");
}

#[test]
fn xapi_disks_past_userdevice_25_are_each_archived_under_their_own_name() {
    // Old code named every userdevice >= 25 "xvdz" and kept one of them.
    let mut spec = VmSpec::new("big1", &[256 << 10, 128 << 10, 192 << 10, 64 << 10]);
    spec.userdevices = ["0", "25", "26", "27"].map(String::from).to_vec();
    let r = rig("userdevice", spec);
    let out = backup(&r, "u1", Duration::from_secs(30));
    assert!(out.leftovers.is_empty(), "{:?}", out.leftovers);
    let archived = out.archived.expect("the backup succeeds");
    assert_eq!(
        archived.iter().map(|a| a.disk.as_str()).collect::<Vec<_>>(),
        ["xvda", "xvdaa", "xvdab", "xvdz"],
        "one archive per disk, each under its own name"
    );
    assert_archive_matches(&r, &archived, "userdevices 0, 25, 26, 27");
    // Each archive is a different disk (the sizes differ).
    let sizes: std::collections::BTreeSet<u64> = archived
        .iter()
        .map(|a| {
            r.repo
                .snapshots()
                .expect("snapshots")
                .into_iter()
                .find(|s| s.id == a.snapshot)
                .map(|s| s.size)
                .expect("the snapshot is listed")
        })
        .collect();
    assert_eq!(sizes.len(), 4, "four different disks: {sizes:?}");
    assert_clean(&r, "userdevices past 25");
}

#[test]
fn xapi_vm_with_a_disk_that_cannot_be_named_is_refused_before_anything_is_made() {
    for (devs, named) in [
        (["0", "autodetect"], "\"autodetect\""),
        (["1", "01"], "\"01\""),
    ] {
        let mut spec = VmSpec::new("odd1", &[128 << 10, 64 << 10]);
        spec.userdevices = devs.map(String::from).to_vec();
        let r = rig("unnamed", spec);
        let vbd = {
            let st = r.sim.state();
            st.vms[&r.vm_ref]
                .vbds
                .iter()
                .map(|b| st.vbds[b].clone())
                .find(|b| b.userdevice == devs[1])
                .map(|b| b.uuid)
                .expect("the VBD")
        };
        let loc = locator(&r, "odd1");
        let e = cb::backend_for(&loc)
            .inspect(&loc)
            .map(|i| i.disks.len())
            .expect_err("a disk that cannot be named is refused")
            .to_string();
        assert!(
            e.contains(&vbd) && e.contains(named),
            "{devs:?}: the error names the VBD and its userdevice: {e}"
        );
        // The whole run refuses too, and nothing was made on the host.
        let out = backup(&r, "n1", Duration::from_secs(30));
        assert!(out.archived.is_err(), "{devs:?}");
        assert!(
            out.journal.milestones.is_empty(),
            "{devs:?}: nothing was started"
        );
        let made: Vec<String> = r
            .sim
            .state()
            .call_log
            .iter()
            .filter(|c| !c.contains(".get_") && !c.starts_with("session."))
            .cloned()
            .collect();
        assert!(made.is_empty(), "{devs:?}: only reads were made: {made:?}");
        assert_clean(&r, &format!("refused {devs:?}"));
    }
}

#[test]
fn xapi_guest_that_never_acknowledges_the_shutdown_is_hard_shut_at_xenopsd_timeout() {
    // xenopsd fails the request with VM_FAILED_SHUTDOWN_ACKNOWLEDGMENT after its
    // acknowledgement timeout (scaled to 0.3 s); the backend powers the clone off
    // then, not at the end of its own, much longer, stop timeout.
    let r = rig("noack", VmSpec::new("db1", &DISKS));
    r.sim.set_faults(Faults {
        guest_ignores_shutdown: true,
        ..Faults::default()
    });
    let t = Instant::now();
    let out = backup(&r, "a1", Duration::from_secs(60));
    let e = out.archived.expect_err("no clean shutdown: no backup");
    assert!(e.contains("did not power off"), "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "ended on xenopsd's answer, not the 60 s stop timeout: {:?}",
        t.elapsed()
    );
    let log = r.sim.state().call_log.clone();
    let asked = log.iter().position(|c| c == "Async.VM.clean_shutdown");
    let killed = log.iter().position(|c| c == "VM.hard_shutdown");
    assert!(
        matches!((asked, killed), (Some(a), Some(k)) if a < k),
        "{log:?}"
    );
    assert!(r.sim.state().halted_images.is_empty());
    assert!(out.leftovers.is_empty(), "{:?}", out.leftovers);
    assert_nothing_left(&r, "no acknowledgement");
}

#[test]
fn xapi_guest_that_acknowledges_and_never_halts_is_hard_shut_at_vm_shutdown_timeout() {
    let r = rig("nohalt", VmSpec::new("db1", &DISKS));
    r.sim.set_faults(Faults {
        guest_acks_but_never_halts: true,
        ..Faults::default()
    });
    let t = Instant::now();
    let out = backup(&r, "h1", Duration::from_secs(60));
    let e = out.archived.expect_err("no clean shutdown: no backup");
    assert!(e.contains("did not power off"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert!(r
        .sim
        .state()
        .call_log
        .iter()
        .any(|c| c == "VM.hard_shutdown"));
    assert!(r.sim.state().halted_images.is_empty());
    assert!(out.leftovers.is_empty(), "{:?}", out.leftovers);
    assert_nothing_left(&r, "acknowledged, never halted");
}

#[test]
fn xapi_host_older_than_1_257_is_refused_before_anything_is_made() {
    let r = rig("old", VmSpec::new("db1", &DISKS));
    r.sim.set_xapi_version("1.249");
    let out = backup(&r, "o1", Duration::from_secs(30));
    let e = out.archived.expect_err("refused");
    assert!(
        e.contains("xapi \"1.249\"") && e.contains("1.257"),
        "the error names both versions: {e}"
    );
    let log = r.sim.state().call_log.clone();
    assert!(
        log.iter()
            .all(|c| c.starts_with("session.") || c.contains(".get_") || c == "host.get_all"),
        "only reads: {log:?}"
    );
    assert!(
        out.journal.open.is_empty() && out.journal.next == 0,
        "nothing journaled"
    );
    assert_nothing_left(&r, "old host");
}

#[test]
fn xapi_vdi_in_use_right_after_an_export_is_asked_again() {
    let r = rig("inuse", VmSpec::new("db1", &DISKS));
    r.sim.set_faults(Faults {
        vdi_in_use_after_export: 2,
        ..Faults::default()
    });
    let out = backup(&r, "u1", Duration::from_secs(30));
    let archived = out.archived.expect("the backup succeeds");
    assert_archive_matches(&r, &archived, "VDI_IN_USE after export");
    let destroys = r
        .sim
        .state()
        .call_log
        .iter()
        .filter(|c| *c == "VDI.destroy")
        .count();
    assert!(destroys >= 2 * DISKS.len() + 2, "retried: {destroys}");
    assert!(out.leftovers.is_empty(), "{:?}", out.leftovers);
    assert_clean(&r, "VDI_IN_USE after export");
}

#[test]
fn xapi_recover_after_a_crash_between_vm_destroy_and_vdi_destroy_leaves_nothing() {
    // xe's order destroys the VM before its VDIs: a crash in between orphans
    // the checkpoint's disks and memory unless each VDI is journaled itself.
    let r = rig("orphans", VmSpec::new("db1", &DISKS));
    let loc = locator(&r, "db1");
    let backend = cb::backend_for(&loc);
    let info = backend.inspect(&loc).expect("inspect");
    let mut j = TestJournal::default();
    let work = r.dir.join("runs/o1");
    std::fs::create_dir_all(&work).expect("dir");
    let ckpt = backend
        .checkpoint(&info, &work, &mut j)
        .expect("checkpoint");
    drop((ckpt, info));
    drop(backend);
    // The "crash": the checkpoint's VM is gone, its VDIs are not.
    let sim_call = |m: &str, args: Vec<serde_json::Value>| {
        let s = r
            .sim
            .call(
                "session.login_with_password",
                &[json!("root"), json!("s3cret pass")],
            )
            .expect("login");
        let mut p = vec![s.clone()];
        p.extend(args);
        let out = r.sim.call(m, &p);
        let _ = r.sim.call("session.logout", &[s]);
        out
    };
    let ck = sim_call(
        "VM.get_by_name_label",
        vec![json!("coldclone-checkpoint-o1")],
    )
    .expect("found")[0]
        .clone();
    sim_call("VM.hard_shutdown", vec![ck.clone()]).expect("hard shutdown");
    sim_call("VM.destroy", vec![ck]).expect("destroy");
    let orphans = r.sim.state().vdis.len() - DISKS.len();
    assert_eq!(orphans, DISKS.len(), "the checkpoint's disks are orphaned");
    let saved =
        serde_json::to_string(&j.open.iter().map(|(_, r)| r).collect::<Vec<_>>()).expect("json");
    let back: Vec<Resource> = serde_json::from_str(&saved).expect("parse");
    for res in back.iter().rev() {
        cb::recover_resource(res, &scope_of(res))
            .unwrap_or_else(|e| panic!("recover {res:?}: {e}"));
    }
    assert_clean(&r, "orphaned checkpoint VDIs");
}

use serde_json::json;

/// The original's dynamic range as the simulator holds it.
fn range(r: &Rig) -> (u64, u64) {
    let st = r.sim.state();
    let v = &st.vms[&r.vm_ref];
    (v.memory_dynamic_min, v.memory_dynamic_max)
}

const MEM: u64 = 8 << 20;
const TARGET: u64 = 5 << 20;

#[test]
fn xapi_balloon_lowers_the_range_before_the_checkpoint_and_restores_it() {
    let r = rig("balloon", VmSpec::new("db1", &DISKS));
    let before = range(&r);
    let out = backup_with(&r, "b1", Duration::from_secs(30), Some(TARGET));
    let archived = out.archived.expect("the backup succeeds");
    assert_archive_matches(&r, &archived, "ballooned");
    let st = r.sim.state();
    assert_eq!(
        st.ranges_set,
        vec![
            ("db1".to_string(), TARGET, TARGET),
            ("db1".to_string(), before.0, before.1)
        ],
        "lowered to the target, then put back"
    );
    // Lowered before the checkpoint, put back after it.
    let log = &st.call_log;
    let pos = |m: &str| log.iter().position(|c| c == m);
    let last_set = log.iter().rposition(|c| c == "VM.set_memory_dynamic_range");
    assert!(pos("VM.set_memory_dynamic_range") < pos("Async.VM.checkpoint"));
    assert!(last_set > pos("Async.VM.checkpoint"));
    // The memory image and so the clone are the ballooned size.
    let clone_mem: Vec<_> = st
        .resumed
        .iter()
        .filter(|x| x.vm_name == "coldclone-clone-b1")
        .collect();
    assert_eq!(clone_mem.len(), 1);
    assert_eq!(
        clone_mem[0].memory_bytes, TARGET,
        "the clone holds the ballooned memory, not {MEM}"
    );
    drop(st);
    assert_eq!(range(&r), before, "the original's range is back");
    assert!(out.leftovers.is_empty(), "{:?}", out.leftovers);
    assert_clean(&r, "balloon");
}

#[test]
fn xapi_balloon_is_undone_after_a_fault_at_every_call_and_after_a_crash() {
    let base = |tag: &str| {
        let r = rig(tag, VmSpec::new("db1", &SMALL));
        let out = backup_with(&r, "count", Duration::from_secs(30), Some(TARGET));
        out.archived.expect("the baseline run succeeds");
        certain_calls(&r.sim.call_sequence())
    };
    let calls = base("bcount-a");
    assert_eq!(calls, base("bcount-b"), "two runs agree");
    // Every call while the range is lowered: up to the one that puts it back, and the next.
    let upto = calls
        .iter()
        .position(|c| *c == At::new("VM.set_memory_dynamic_range", 2))
        .expect("the range is put back in a good run")
        + 2;
    let mut n = 0;
    for at in calls.iter().take(upto) {
        let r = rig("bfault", VmSpec::new("db1", &SMALL));
        let before = range(&r);
        r.sim.set_faults(Faults {
            fail_at: Some(at.clone()),
            ..Faults::default()
        });
        let mut out = backup_with(&r, "f", Duration::from_secs(10), Some(TARGET));
        assert_fired(&r, "fail_at", at, &format!("balloon fault at {at}"));
        if !out.leftovers.is_empty() {
            let again = out.journal.undo_all();
            assert!(again.is_empty(), "{at}: recover failed: {again:?}");
        }
        assert_eq!(range(&r), before, "{at}: the range is back");
        assert_clean(&r, &format!("balloon fault at {at}"));
        n += 1;
    }
    assert!(n > 5, "{n} faults");
    // A crash after the balloon, before the checkpoint: recover puts it back.
    let r = rig("bcrash", VmSpec::new("db1", &SMALL));
    let before = range(&r);
    let loc = locator(&r, "db1");
    let backend = cb::backend_for(&loc);
    let info = backend.inspect(&loc).expect("inspect");
    let mut j = TestJournal::default();
    backend.balloon(&info, TARGET, &mut j).expect("balloon");
    drop(info);
    drop(backend);
    assert_eq!(range(&r), (TARGET, TARGET));
    for (_, res) in j.open.iter().rev() {
        cb::recover_resource(res, &scope_of(res)).expect("recover");
    }
    assert_eq!(range(&r), before, "recover put the range back");
    assert_clean(&r, "balloon crash");
}

/// One XAPI call as an administrator would make it by hand (a session of its own).
fn by_hand(r: &Rig, method: &str, args: &[serde_json::Value]) -> serde_json::Value {
    use serde_json::json;
    let s = r
        .sim
        .call(
            "session.login_with_password",
            &[
                json!("root"),
                json!("s3cret pass"),
                json!("1.0"),
                json!("t"),
            ],
        )
        .expect("login");
    let mut p = vec![s.clone()];
    p.extend_from_slice(args);
    let out = r.sim.call(method, &p);
    r.sim.call("session.logout", &[s]).expect("logout");
    out.unwrap_or_else(|e| panic!("{method}: {e:?}"))
}

/// `count` writes of 4 KiB of pseudo-random data at pseudo-random 4 KiB-aligned offsets
/// of the original's disk `userdevice`, by its guest; returns the bytes written.
fn scribble(r: &Rig, userdevice: &str, size: u64, seed: u64, count: u64) -> u64 {
    let mut x = seed.wrapping_mul(6364136223846793005) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..count {
        let off = next() % (size / 4096) * 4096;
        let data: Vec<u8> = (0..4096).map(|_| next() as u8).collect();
        r.sim
            .guest_write(&r.vm_ref, userdevice, off, &data)
            .expect("guest write");
    }
    count * 4096
}

/// The kept maps: (name, the original VDI it is a snapshot of).
fn kept_maps(r: &Rig) -> Vec<(String, String)> {
    let st = r.sim.state();
    st.vdis
        .values()
        .filter(|v| v.kind == xapi_sim::VdiType::CbtMetadata)
        .map(|v| (v.name_label.clone(), v.snapshot_of.clone()))
        .collect()
}

fn nexts(archived: &[Archived]) -> BTreeMap<String, DiskMap> {
    archived
        .iter()
        .filter_map(|a| a.next.clone().map(|n| (a.disk.clone(), n)))
        .collect()
}

const CBT_DISKS: [u64; 2] = [8 << 20, 4 << 20];

#[test]
fn xapi_cbt_incremental_reads_what_changed_and_falls_back_when_a_map_is_lost() {
    let r = rig("cbt", VmSpec::new("db1", &CBT_DISKS));
    let ok = |out: RunResult, ctx: &str| -> Vec<Archived> {
        assert!(out.leftovers.is_empty(), "{ctx}: {:?}", out.leftovers);
        assert_eq!(out.journal.milestones, MILESTONES, "{ctx}");
        let a = out.archived.unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert_archive_matches(&r, &a, ctx);
        a
    };
    // 1. The first backup reads everything; CBT is on and each disk's map is kept.
    let t = Instant::now();
    let a1 = ok(backup(&r, "run1", Duration::from_secs(30)), "first");
    let full_ms = t.elapsed().as_millis();
    assert!(a1.iter().all(|a| a.read_by_map.is_none()));
    let full: Vec<u64> = a1.iter().map(|a| a.bytes_read).collect();
    assert!(
        r.sim
            .state()
            .vdis
            .values()
            .filter(|v| v.cbt_enabled)
            .count()
            >= 2,
        "CBT is enabled on the original's disks"
    );
    let maps = kept_maps(&r);
    assert_eq!(maps.len(), 2, "one map per disk: {maps:?}");
    assert!(maps
        .iter()
        .all(|(n, _)| n.starts_with("coldclone-cbt-run1-")));

    // 2. Random writes, then an incremental per disk: only the changes are read, and
    // the whole read of the verify mode agrees (backup_inc checks it).
    let w0 = scribble(&r, "0", CBT_DISKS[0], 1, 40);
    let w1 = scribble(&r, "1", CBT_DISKS[1], 2, 10);
    let t = Instant::now();
    let a2 = ok(
        backup_inc(&r, "run2", Duration::from_secs(30), None, &nexts(&a1)),
        "incremental",
    );
    let inc_ms = t.elapsed().as_millis();
    for (a, (w, f)) in a2.iter().zip([(w0, full[0]), (w1, full[1])]) {
        let ranges = a
            .read_by_map
            .as_ref()
            .unwrap_or_else(|| panic!("disk {}: the second backup is driven by CBT", a.disk));
        // 64 KiB CBT blocks: each 4 KiB write may cost 64 KiB, plus the marks of the
        // checkpoint and of the two clones' shutdowns.
        assert!(
            a.bytes_read <= w * 16 + (256 << 10) && a.bytes_read < f / 2,
            "disk {}: read {} bytes for {w} written (full read {f}); ranges {ranges:?}",
            a.disk,
            a.bytes_read
        );
        eprintln!(
            "disk {}: full read {f} bytes, incremental read {} bytes for {w} bytes written",
            a.disk, a.bytes_read
        );
    }
    eprintln!("run times: full {full_ms} ms, incremental {inc_ms} ms");
    let maps = kept_maps(&r);
    assert_eq!(maps.len(), 2, "the earlier maps are gone: {maps:?}");
    assert!(maps
        .iter()
        .all(|(n, _)| n.starts_with("coldclone-cbt-run2-")));

    // 3. A lost map: disk 0's kept map destroyed by hand, CBT disabled on disk 1.
    // Both are read whole, and the backup is still exact.
    let (xvda_map, xvdb) = {
        let st = r.sim.state();
        let orig = &st.vms[&r.vm_ref];
        let vdi_of = |dev: &str| {
            orig.vbds
                .iter()
                .map(|b| &st.vbds[b])
                .find(|b| b.userdevice == dev)
                .map(|b| b.vdi.clone())
                .expect("disk")
        };
        let (a, b) = (vdi_of("0"), vdi_of("1"));
        let map = st
            .vdis
            .iter()
            .find(|(_, v)| v.kind == xapi_sim::VdiType::CbtMetadata && v.snapshot_of == a)
            .map(|(k, _)| k.clone())
            .expect("disk 0's map");
        (map, b)
    };
    by_hand(&r, "VDI.destroy", &[serde_json::json!(xvda_map)]);
    by_hand(&r, "VDI.disable_cbt", &[serde_json::json!(xvdb)]);
    scribble(&r, "0", CBT_DISKS[0], 3, 10);
    scribble(&r, "1", CBT_DISKS[1], 4, 10);
    let a3 = ok(
        backup_inc(&r, "run3", Duration::from_secs(30), None, &nexts(&a2)),
        "lost maps",
    );
    for a in &a3 {
        assert!(
            a.read_by_map.is_none(),
            "disk {}: a lost map means a whole read",
            a.disk
        );
    }
    // 4. ... and the run after is incremental again on both.
    scribble(&r, "0", CBT_DISKS[0], 5, 10);
    scribble(&r, "1", CBT_DISKS[1], 6, 10);
    let a4 = ok(
        backup_inc(&r, "run4", Duration::from_secs(30), None, &nexts(&a3)),
        "after the loss",
    );
    assert!(a4.iter().all(|a| a.read_by_map.is_some()), "{a4:?}");
    assert_eq!(kept_maps(&r).len(), 2);
    assert_clean(&r, "incremental runs");
}
