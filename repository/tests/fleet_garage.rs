//! A fleet of hosts on one repository held by a real distributed object store: a
//! three-node Garage cluster (replication factor 3) started here on 127.0.0.1 (see
//! common/garage.rs). Every "host" is a separate process of this test binary with its own
//! state folder, hence its own host uuid; all of them have this machine's host name, as
//! hosts cloned from one image do.
//!
//! Opt-in: `COLDCLONE_GARAGE=1 bash scripts/setup.sh` builds Garage once (docs/testing.md
//! gives the time), then `COLDCLONE_GARAGE=1 cargo test -p coldclone-repository --test
//! fleet_garage -- --test-threads=1`.
mod common;
use coldclone_repository::*;
use common::garage::{start_cluster, Cluster};
use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const ROLE: &str = "COLDCLONE_FLEET_ROLE";
const MIB: usize = 1 << 20;

// ---- the child processes ----

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"))
}

fn open_child_repo() -> Repository {
    let loc = Location::parse(&env("FLEET_REPO")).unwrap();
    let t = Instant::now();
    // The first request may meet a node still rejoining: bounded retries.
    loop {
        match Repository::open(&loc, "pw") {
            Ok(r) => return r,
            Err(e) if t.elapsed() > Duration::from_secs(60) => panic!("open: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// A disk image file read in 4 MiB batches, each `FLEET_SLOW_MS` late: backups that last
/// long enough to overlap.
struct Slow {
    src: FileSource,
    ms: u64,
}
impl DiskSource for Slow {
    fn len(&self) -> u64 {
        self.src.len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        std::thread::sleep(Duration::from_millis(self.ms));
        self.src.read_at(buf, offset)
    }
    fn data_ranges(&self) -> std::io::Result<Option<Vec<std::ops::Range<u64>>>> {
        Ok(None)
    }
}

/// Bytes read so far, written to `STATE/progress` for the test to wait on.
struct FileProgress {
    path: PathBuf,
    done: AtomicU64,
    base: u64,
}
impl Progress for FileProgress {
    fn set_total(&self, _: u64) {}
    fn advance(&self, bytes: u64) {
        let n = self.done.fetch_add(bytes, Ordering::SeqCst) + bytes;
        let _ = std::fs::write(&self.path, (self.base + n).to_string());
    }
}

/// A host: backs up `FLEET_JOBS` (`vm:disk:image;...`) one after the other, each with its
/// latest own snapshot of that disk as parent. With `FLEET_WAIT_FOR=vm`, first waits until
/// another host has a snapshot of that VM.
#[test]
fn fleet_host_process() {
    if std::env::var(ROLE).as_deref() != Ok("host") {
        return;
    }
    let state = PathBuf::from(env("FLEET_STATE"));
    let me = HostIdentity::load_or_create(&state).unwrap();
    let mut repo = open_child_repo();
    repo.set_host(me.clone());
    if let Ok(vm) = std::env::var("FLEET_WAIT_FOR") {
        let t = Instant::now();
        while !repo
            .snapshots()
            .unwrap()
            .iter()
            .any(|s| s.vm == vm && s.host_uuid != me.uuid)
        {
            assert!(t.elapsed() < Duration::from_secs(600), "no {vm} came");
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let ms: u64 = env("FLEET_SLOW_MS").parse().unwrap();
    let mut base = 0;
    for job in env("FLEET_JOBS").split(';') {
        let f: Vec<&str> = job.split(':').collect();
        let (vm, disk, img) = (f[0], f[1], f[2]);
        let src = Slow {
            src: FileSource::open(Path::new(img)).unwrap(),
            ms,
        };
        let parent = repo.find_latest_of(&me, vm, disk).unwrap().map(|s| s.id);
        let meta = SnapshotMeta {
            vm: vm.into(),
            disk: disk.into(),
            backend: "file".into(),
            host: me.name.clone(),
            host_uuid: me.uuid.clone(),
            consistency: "crash".into(),
            tags: Default::default(),
            vm_config: None,
        };
        let progress = FileProgress {
            path: state.join("progress"),
            done: AtomicU64::new(0),
            base,
        };
        let opts = BackupOptions {
            parent,
            changed_ranges: None,
        };
        match repo.backup_disk(&src, meta, &opts, &progress) {
            Ok(s) => println!(
                "SNAPSHOT {vm} {disk} {} {} {} {}",
                s.snapshot_id, s.new_chunks, s.stored_bytes, s.bytes
            ),
            Err(e) => {
                println!("FAILED {vm} {disk}: {e}");
                eprintln!("backup of {vm}/{disk} failed: {e}");
                std::process::exit(3);
            }
        }
        base += src.len();
        let _ = std::io::stdout().flush();
    }
}

/// Prunes (keeping every snapshot: only unused data goes) in a loop until the file
/// `FLEET_STOP` appears, then once more.
#[test]
fn fleet_prune_loop_process() {
    if std::env::var(ROLE).as_deref() != Ok("prune-loop") {
        return;
    }
    // The data here is seconds old: the locks, not the grace for young packs, keep the
    // running backups' data.
    set_prune_grace_for_tests(0);
    let state = PathBuf::from(env("FLEET_STATE"));
    let stop = PathBuf::from(env("FLEET_STOP"));
    let mut repo = open_child_repo();
    repo.set_host(HostIdentity::load_or_create(&state).unwrap());
    let t = Instant::now();
    loop {
        let last = stop.exists();
        match repo.prune(&RetentionPolicy::default(), false) {
            Ok(p) => println!(
                "PRUNE OK {} {}",
                p.packs_deleted + p.packs_repacked + p.unindexed_packs_deleted,
                p.bytes_freed
            ),
            Err(RepoError::Locked(m)) => println!("PRUNE LOCKED {m}"),
            Err(e) => panic!("prune failed: {e}"),
        }
        let _ = std::io::stdout().flush();
        if last || t.elapsed() > Duration::from_secs(900) {
            return;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Retention on this host: keep the last `FLEET_KEEP_LAST` of every disk of every host,
/// forget the rest and prune; a prune refused by another's lock is tried again.
#[test]
fn fleet_retention_process() {
    if std::env::var(ROLE).as_deref() != Ok("retention") {
        return;
    }
    set_prune_grace_for_tests(0);
    let state = PathBuf::from(env("FLEET_STATE"));
    let mut repo = open_child_repo();
    repo.set_host(HostIdentity::load_or_create(&state).unwrap());
    let policy = RetentionPolicy {
        default: Keep {
            last: env("FLEET_KEEP_LAST").parse().unwrap(),
            ..Default::default()
        },
        per_vm: Default::default(),
    };
    let t = Instant::now();
    loop {
        match repo.prune(&policy, false) {
            Ok(p) => {
                let removed: Vec<&str> = p.removed.iter().map(|s| s.id.as_str()).collect();
                println!("RETENTION OK {}", removed.join(","));
                return;
            }
            Err(RepoError::Locked(m)) => {
                println!("RETENTION LOCKED {m}");
                assert!(t.elapsed() < Duration::from_secs(300), "never got the lock");
                std::thread::sleep(Duration::from_millis(
                    200 + (std::process::id() % 7) as u64 * 60,
                ));
            }
            Err(e) => panic!("retention failed: {e}"),
        }
    }
}

/// Forgets the snapshots in `FLEET_FORGET` (comma-separated ids).
#[test]
fn fleet_forget_process() {
    if std::env::var(ROLE).as_deref() != Ok("forget") {
        return;
    }
    let repo = open_child_repo();
    for id in env("FLEET_FORGET").split(',') {
        match repo.forget(id) {
            Ok(()) => println!("FORGOT {id}"),
            Err(RepoError::SnapshotNotFound(_)) => println!("GONE {id}"),
            Err(e) => panic!("forget {id}: {e}"),
        }
    }
}

// ---- the test side ----

struct Proc {
    name: String,
    child: Child,
}

fn spawn(name: &str, test: &str, vars: &[(&str, String)], c: &Cluster) -> Proc {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("AWS_ACCESS_KEY_ID", &c.key_id)
        .env("AWS_SECRET_ACCESS_KEY", &c.secret)
        .env("AWS_REGION", common::garage::REGION)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in vars {
        cmd.env(k, v);
    }
    Proc {
        name: name.into(),
        child: cmd.spawn().unwrap(),
    }
}

struct Done {
    ok: bool,
    out: String,
    err: String,
}

fn finish(p: Proc) -> Done {
    let o = p.child.wait_with_output().unwrap();
    let d = Done {
        ok: o.status.success(),
        out: String::from_utf8_lossy(&o.stdout).into_owned(),
        err: String::from_utf8_lossy(&o.stderr).into_owned(),
    };
    eprintln!("--- {} ({}) ---\n{}", p.name, o.status, d.out.trim());
    d
}

/// (vm, disk, id, new_chunks, stored_bytes, bytes) of each `SNAPSHOT` line.
fn snapshots_of(out: &str) -> Vec<(String, String, String, u64, u64, u64)> {
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let i = f.iter().position(|x| *x == "SNAPSHOT")?;
            let f = &f[i + 1..];
            Some((
                f[0].into(),
                f[1].into(),
                f[2].into(),
                f[3].parse().ok()?,
                f[4].parse().ok()?,
                f[5].parse().ok()?,
            ))
        })
        .collect()
}

fn host_env(
    state: &Path,
    c: &Cluster,
    node: usize,
    jobs: &str,
    slow_ms: u64,
) -> Vec<(&'static str, String)> {
    vec![
        (ROLE, "host".into()),
        ("FLEET_STATE", state.display().to_string()),
        ("FLEET_REPO", c.url(node, "fleet")),
        ("FLEET_JOBS", jobs.into()),
        ("FLEET_SLOW_MS", slow_ms.to_string()),
    ]
}

fn progress(state: &Path) -> u64 {
    std::fs::read_to_string(state.join("progress"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn uuid_of(state: &Path) -> String {
    std::fs::read_to_string(state.join(HOST_UUID_FILE))
        .unwrap()
        .trim()
        .to_string()
}

fn write_image(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn restored(repo: &Repository, id: &str, dir: &Path) -> Vec<u8> {
    let out = dir.join("restored.img");
    repo.restore_with(id, &out, &FORCE, &NoProgress).unwrap();
    std::fs::read(&out).unwrap()
}

fn new_repo(c: &Cluster) -> Repository {
    let mut o = opts(16384);
    o.pack_size = 1 << 20;
    Repository::init_with(&c.location(0, "fleet"), "pw", &o).unwrap()
}

#[test]
fn needs_garage_three_hosts_one_repository_prune_and_retention_beside_them() {
    let Some(c) = start_cluster("fleet") else {
        return;
    };
    let dir = TempDir::new("fleet");
    let repo = new_repo(&c);
    // An old backup, forgotten: its data is what the running prune may free.
    let seed_state = dir.path().join("state-seed");
    let mut seed = Repository::open(&c.location(1, "fleet"), "pw").unwrap();
    seed.set_host(HostIdentity::load_or_create(&seed_state).unwrap());
    let old = seed
        .backup_disk(
            &MemSource(random_bytes(900, 6 * MIB)),
            meta("old", "vda"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap();
    seed.forget(&old.snapshot_id).unwrap();

    // The template image two VMs of the same name on two hosts were made from; host A's
    // VM then changes 1 MiB of it. Host C: a database disk. A and C: a scratch disk each.
    let template = disk_image(1, 16 * MIB);
    let mut changed = template.clone();
    changed[5 * MIB..6 * MIB].copy_from_slice(&random_bytes(2, MIB));
    let db = disk_image(3, 16 * MIB);
    let (scratch_a, scratch_c) = (random_bytes(4, 2 * MIB), random_bytes(5, 2 * MIB));
    let img = |n: &str, b: &[u8]| write_image(dir.path(), n, b).display().to_string();
    let (t, t2, d) = (
        img("t.img", &template),
        img("t2.img", &changed),
        img("db.img", &db),
    );
    let (sa, sc) = (img("sa.img", &scratch_a), img("sc.img", &scratch_c));
    let expect: BTreeMap<&str, &[u8]> = [
        ("t", &template[..]),
        ("t2", &changed[..]),
        ("db", &db[..]),
        ("sa", &scratch_a[..]),
        ("sc", &scratch_c[..]),
    ]
    .into_iter()
    .collect();

    let st = |n: &str| dir.path().join(format!("state-{n}"));
    let (sta, stb, stc, stp) = (st("a"), st("b"), st("c"), st("p"));
    // Host A backs up web twice (the template, then changed); host B backs up its own VM
    // web (same name) from the same template once A's is stored; host C its db. Each
    // talks to another Garage node.
    let a = spawn(
        "host A",
        "fleet_host_process",
        &host_env(
            &sta,
            &c,
            0,
            &format!("scratch:vda:{sa};web:vda:{t};web:vda:{t2}"),
            300,
        ),
        &c,
    );
    let mut benv = host_env(&stb, &c, 1, &format!("web:vda:{t}"), 300);
    benv.push(("FLEET_WAIT_FOR", "web".into()));
    let b = spawn("host B", "fleet_host_process", &benv, &c);
    let cc = spawn(
        "host C",
        "fleet_host_process",
        &host_env(&stc, &c, 2, &format!("scratch:vda:{sc};db:vda:{d}"), 300),
        &c,
    );
    // A fourth host prunes while they run, from the moment host A is reading.
    let wait = Instant::now();
    while progress(&sta) == 0 {
        assert!(
            wait.elapsed() < Duration::from_secs(300),
            "host A never read"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let stop = dir.path().join("stop");
    let p = spawn(
        "prune host",
        "fleet_prune_loop_process",
        &[
            (ROLE, "prune-loop".into()),
            ("FLEET_STATE", stp.display().to_string()),
            ("FLEET_STOP", stop.display().to_string()),
            ("FLEET_REPO", c.url(0, "fleet")),
        ],
        &c,
    );
    let (a, b, cc) = (finish(a), finish(b), finish(cc));
    std::fs::write(&stop, b"").unwrap();
    let p = finish(p);
    for (n, r) in [("A", &a), ("B", &b), ("C", &cc), ("prune", &p)] {
        assert!(r.ok, "host {n} failed:\n{}\n{}", r.out, r.err);
    }

    // Three hosts of one name, three uuids, each its state folder's.
    let uuids = [uuid_of(&sta), uuid_of(&stb), uuid_of(&stc)];
    assert!(uuids.iter().all(|u| is_uuid(u)));
    assert_eq!(uuids.iter().collect::<BTreeSet<_>>().len(), 3, "{uuids:?}");
    let sa_ = snapshots_of(&a.out);
    let sb_ = snapshots_of(&b.out);
    let sc_ = snapshots_of(&cc.out);
    assert_eq!((sa_.len(), sb_.len(), sc_.len()), (3, 1, 2));
    let all = repo.snapshots().unwrap();
    let by_id = |id: &str| all.iter().find(|s| s.id == id).unwrap().clone();
    let (a_scratch, a_web1, a_web2) = (by_id(&sa_[0].2), by_id(&sa_[1].2), by_id(&sa_[2].2));
    let b_web = by_id(&sb_[0].2);
    let (c_scratch, c_db) = (by_id(&sc_[0].2), by_id(&sc_[1].2));
    let names: BTreeSet<&str> = all.iter().map(|s| s.host.as_str()).collect();
    assert_eq!(names.len(), 1, "one host name: {names:?}");
    for (s, u) in [
        (&a_web1, &uuids[0]),
        (&a_web2, &uuids[0]),
        (&b_web, &uuids[1]),
        (&c_db, &uuids[2]),
    ] {
        assert_eq!(&s.host_uuid, u, "{s:?}");
    }
    // Chains by uuid: A's second web backup follows A's first, though B's web (same host
    // name, same VM name) may be newer; B's first backup has no parent.
    assert_eq!(a_web2.parent.as_deref(), Some(a_web1.id.as_str()));
    assert_eq!(
        b_web.parent, None,
        "B's backup took another host's as parent"
    );
    assert!(b_web.time_unix >= a_web1.time_unix);
    // Dedup across hosts: B's copy of the template stored no chunk of its own.
    let (_, _, _, a_new, a_stored, size) = sa_[1].clone();
    let (_, _, _, b_new, b_stored, _) = sb_[0].clone();
    eprintln!("template {size} B: host A stored {a_new} chunks, {a_stored} B; host B {b_new} chunks, {b_stored} B");
    assert!(a_new > 0);
    assert_eq!(b_new, 0, "the shared template was stored twice");
    assert!(
        b_stored * 50 < size,
        "host B added {b_stored} bytes for a {size}-byte disk"
    );

    // The prune ran beside them: met their locks (named with the holder's uuid), ran
    // between them, freed the forgotten backup's data.
    let locked: Vec<&str> = p
        .out
        .lines()
        .filter(|l| l.contains("PRUNE LOCKED"))
        .collect();
    let oks: Vec<&str> = p.out.lines().filter(|l| l.contains("PRUNE OK")).collect();
    assert!(
        !locked.is_empty(),
        "prune never met a running backup:\n{}",
        p.out
    );
    assert!(!oks.is_empty(), "prune never ran:\n{}", p.out);
    assert!(
        locked
            .iter()
            .any(|l| uuids.iter().any(|u| l.contains(&u[..8]))),
        "no lock named its holder's uuid:\n{}",
        p.out
    );
    let freed: u64 = oks
        .iter()
        .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
        .sum();
    assert!(
        freed > 0,
        "the forgotten backup's data was not freed:\n{}",
        p.out
    );

    // Two hosts forget at once (their own scratch disks, and both the same old one), then
    // two hosts apply retention at once: "last 1" of every disk of every host.
    let forget = |n: &str, ids: String, node: usize| {
        spawn(
            n,
            "fleet_forget_process",
            &[
                (ROLE, "forget".into()),
                ("FLEET_FORGET", ids),
                ("FLEET_REPO", c.url(node, "fleet")),
            ],
            &c,
        )
    };
    let shared_old = seed
        .backup_disk(
            &MemSource(random_bytes(901, MIB)),
            meta("old2", "vda"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap()
        .snapshot_id;
    let fa = forget("forget on A", format!("{},{shared_old}", a_scratch.id), 0);
    let fc = forget("forget on C", format!("{},{shared_old}", c_scratch.id), 2);
    let (fa, fc) = (finish(fa), finish(fc));
    assert!(
        fa.ok && fc.ok,
        "{}\n{}\n{}\n{}",
        fa.out,
        fa.err,
        fc.out,
        fc.err
    );
    assert!(fa.out.contains(&format!("FORGOT {}", a_scratch.id)));
    assert!(fc.out.contains(&format!("FORGOT {}", c_scratch.id)));
    let retention = |n: &str, state: &Path, node: usize| {
        spawn(
            n,
            "fleet_retention_process",
            &[
                (ROLE, "retention".into()),
                ("FLEET_STATE", state.display().to_string()),
                ("FLEET_KEEP_LAST", "1".into()),
                ("FLEET_REPO", c.url(node, "fleet")),
            ],
            &c,
        )
    };
    let ra = retention("retention on A", &sta, 0);
    let rb = retention("retention on B", &stb, 1);
    let (ra, rb) = (finish(ra), finish(rb));
    assert!(
        ra.ok && rb.ok,
        "{}\n{}\n{}\n{}",
        ra.out,
        ra.err,
        rb.out,
        rb.err
    );

    // What is left: per uuid, the newest of each disk. By host name alone, A's and B's web
    // would be one group and "last 1" would have dropped one host's only backup.
    let left: BTreeSet<String> = repo
        .snapshots()
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    let want: BTreeSet<String> = [&a_web2.id, &b_web.id, &c_db.id]
        .into_iter()
        .cloned()
        .collect();
    assert_eq!(left, want);
    let check = repo.check(true).unwrap();
    assert!(check.ok, "{check:?}");
    assert_eq!(check.unindexed_packs, 0, "{check:?}");
    for (id, want) in [
        (&a_web2.id, expect["t2"]),
        (&b_web.id, expect["t"]),
        (&c_db.id, expect["db"]),
    ] {
        assert!(
            restored(&repo, id, dir.path()) == want,
            "snapshot {id} restores different bytes"
        );
    }
    let _ = (expect["sa"], expect["sc"]);
    // Through another node too: every node serves the whole repository.
    let via2 = Repository::open(&c.location(2, "fleet"), "pw").unwrap();
    assert!(restored(&via2, &b_web.id, dir.path()) == template);
}

#[test]
fn needs_garage_a_node_killed_during_backups_loses_nothing() {
    let Some(mut c) = start_cluster("nodekill") else {
        return;
    };
    let dir = TempDir::new("nodekill");
    let repo = new_repo(&c);
    // Committed before the failure: must survive it.
    let before_img = disk_image(10, 8 * MIB);
    let mut seed = Repository::open(&c.location(0, "fleet"), "pw").unwrap();
    seed.set_host(HostIdentity::load_or_create(&dir.path().join("state-seed")).unwrap());
    let before = seed
        .backup_disk(
            &MemSource(before_img.clone()),
            meta("before", "vda"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .unwrap()
        .snapshot_id;

    let imgs: Vec<Vec<u8>> = (0..3).map(|i| disk_image(20 + i, 24 * MIB)).collect();
    let st: Vec<PathBuf> = (0..3)
        .map(|i| dir.path().join(format!("state-{i}")))
        .collect();
    // Host i talks to node i; node 2 is the one killed.
    let procs: Vec<Proc> = (0..3)
        .map(|i| {
            let f = write_image(dir.path(), &format!("vm{i}.img"), &imgs[i]);
            spawn(
                &format!("host {i}"),
                "fleet_host_process",
                &host_env(&st[i], &c, i, &format!("vm{i}:vda:{}", f.display()), 700),
                &c,
            )
        })
        .collect();
    let wait_all = |min: u64, what: &str| {
        let t = Instant::now();
        while (0..2).any(|i| progress(&st[i]) < min) {
            assert!(t.elapsed() < Duration::from_secs(600), "{what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_all(4 * MIB as u64, "the backups did not start reading");
    c.kill_node(2);
    eprintln!(
        "killed node 2 at {:?}",
        (0..3).map(|i| progress(&st[i])).collect::<Vec<_>>()
    );
    // The hosts on the other nodes go on while node 2 is down.
    wait_all(
        12 * MIB as u64,
        "the backups did not go on with node 2 down",
    );
    c.start_node(2);
    c.wait_healthy();
    eprintln!(
        "node 2 back at {:?}",
        (0..3).map(|i| progress(&st[i])).collect::<Vec<_>>()
    );
    let done: Vec<Done> = procs.into_iter().map(finish).collect();

    let snaps = repo.snapshots().unwrap();
    for (i, d) in done.iter().enumerate() {
        let uuid = uuid_of(&st[i]);
        let mine: Vec<&Snapshot> = snaps.iter().filter(|s| s.host_uuid == uuid).collect();
        if d.ok {
            let s = snapshots_of(&d.out);
            assert_eq!(s.len(), 1, "{}", d.out);
            assert_eq!(mine.len(), 1);
            assert_eq!(mine[0].id, s[0].2);
            assert!(
                restored(&repo, &mine[0].id, dir.path()) == imgs[i],
                "host {i}'s backup restores different bytes"
            );
        } else {
            // Failed clearly: said why, nothing of it visible.
            assert!(
                d.out.contains("FAILED") && d.err.contains("failed"),
                "host {i} failed without saying why:\n{}\n{}",
                d.out,
                d.err
            );
            assert!(
                mine.is_empty(),
                "host {i} failed but its snapshot is listed"
            );
        }
    }
    // The hosts whose nodes stayed up finished.
    assert!(
        done[0].ok && done[1].ok,
        "a backup through a live node failed"
    );
    assert!(restored(&repo, &before, dir.path()) == before_img);
    let check = repo.check(true).unwrap();
    assert!(check.ok, "{check:?}");
    // What a failed backup left is unused data: prune removes it, and all is still whole,
    // read through the node that was down.
    set_prune_grace_for_tests(0);
    repo.prune(&RetentionPolicy::default(), false).unwrap();
    let via2 = Repository::open(&c.location(2, "fleet"), "pw").unwrap();
    let check = via2.check(true).unwrap();
    assert!(check.ok && check.unindexed_packs == 0, "{check:?}");
    assert!(restored(&via2, &before, dir.path()) == before_img);
}
