//! Nightly operations on real QEMU guests: many VMs within a memory budget,
//! ballooning, the run lock, reports and metrics. Needs root and QEMU.

mod common;

use common::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn vm_section(name: &str, vm: &Vm) -> String {
    format!(
        "[[vm]]\nname = \"{name}\"\nqmp = \"{}\"\n",
        vm.qmp.display()
    )
}

/// (start, end) of every clone's life, from the finished runs' journals.
fn clone_lifetimes(setup: &Setup) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    let dir = setup.state.join("journal/done");
    for e in std::fs::read_dir(&dir).expect("journal history").flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        let entries: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let created = entries
            .iter()
            .find(|x| x["op"] == "create" && x["resource"]["kind"] == "clone_process");
        if let Some(c) = created {
            let id = c["id"].clone();
            let end = entries
                .iter()
                .find(|x| x["op"] == "removed" && x["id"] == id)
                .and_then(|x| x["at"].as_f64())
                .expect("a clone in a finished run was removed");
            out.push((c["at"].as_f64().expect("a clone's creation time"), end));
        }
    }
    out
}

fn max_overlap(spans: &[(f64, f64)]) -> usize {
    let mut events: Vec<(f64, i32)> = spans
        .iter()
        .flat_map(|(s, e)| [(*s, 1), (*e, -1)])
        .collect();
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut cur, mut max) = (0i32, 0i32);
    for (_, d) in events {
        cur += d;
        max = max.max(cur);
    }
    max as usize
}

#[test]
fn needs_root_qemu_three_vms_a_budget_for_two_clones_and_balloons() {
    let _s = serial();
    if !rig_available() {
        return;
    }
    let dir = TempDir::new("budget");
    let net = TestNet::new();
    let opts = VmOptions {
        balloon: true,
        ..Default::default()
    };
    let vms: Vec<Vm> = (0..3)
        .map(|i| {
            let d = dir.path().join(format!("vm{i}"));
            std::fs::create_dir_all(&d).unwrap();
            Vm::start(&net, &d, opts.clone())
        })
        .collect();
    let full = 256u64 << 20;
    for vm in &vms {
        let b = vm
            .observe("query-balloon", json!({}))
            .expect("query-balloon");
        assert_eq!(b["actual"].as_u64(), Some(full), "balloon before");
    }
    // Each clone needs 128 MiB (50 % balloon) + 64 MiB QEMU overhead = 192 MiB:
    // a 430 MiB budget fits two at once, never three.
    let body: String = vms
        .iter()
        .enumerate()
        .map(|(i, vm)| vm_section(&format!("v{i}"), vm))
        .collect();
    let setup = Setup::with_body(
        dir.path(),
        "[run]\nmax_parallel = 3\nmemory_budget_mib = 430\nmemory_reserve_mib = 256\n\n[defaults]\nstop_timeout_secs = 120\nballoon = { target = \"50%\", floor_mib = 64, timeout_secs = 60 }\n",
        &body,
    );
    // Watch the balloons while the run goes on, through the observer sockets.
    let stop = Arc::new(AtomicBool::new(false));
    let lowest = Arc::new(Mutex::new(vec![u64::MAX; 3]));
    let watcher = {
        let (stop, lowest) = (stop.clone(), lowest.clone());
        let socks: Vec<_> = vms.iter().map(|v| v.observe_qmp.clone()).collect();
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                for (i, s) in socks.iter().enumerate() {
                    if let Ok(mut q) = coldclone_backends::qemu::qmp::Qmp::connect(s) {
                        if let Ok(b) = q.execute("query-balloon", json!({})) {
                            let a = b["actual"].as_u64().unwrap_or(u64::MAX);
                            let mut l = lowest.lock().unwrap();
                            l[i] = l[i].min(a);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let out = setup.coldclone(Some(&net.ns), &["--json", "backup", "--all"]);
    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let reports: Vec<&Value> = lines.iter().filter(|l| l.get("vm").is_some()).collect();
    assert_eq!(reports.len(), 3);
    for r in &reports {
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["clone_memory_mib"], 192, "{r}");
        let b = &r["balloon"];
        assert_eq!(b["original_bytes"].as_u64(), Some(full), "{r}");
        assert_eq!(b["target_bytes"].as_u64(), Some(full / 2), "{r}");
        assert!(
            b["reached_bytes"].as_u64().unwrap_or(u64::MAX) <= full / 2 + (8 << 20),
            "{r}"
        );
    }
    let summary = lines
        .iter()
        .find_map(|l| l.get("summary"))
        .expect("a summary line");
    assert_eq!(summary["ok"], 3);
    // The budget fits two clones: never three alive at once (journal timestamps).
    let spans = clone_lifetimes(&setup);
    assert_eq!(spans.len(), 3, "{spans:?}");
    let clones = max_overlap(&spans);
    assert!(
        (1..=2).contains(&clones),
        "{clones} clones alive at once, the budget fits 2: {spans:?}"
    );
    // Two backups ran side by side and the third waited for one of them to
    // end: an order of events the scheduler makes, not a matter of speed.
    let mut runs: Vec<(f64, f64)> = reports
        .iter()
        .map(|r| {
            (
                r["started_at"].as_f64().expect("started_at"),
                r["finished_at"].as_f64().expect("finished_at"),
            )
        })
        .collect();
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!(max_overlap(&runs), 2, "backup runs {runs:?}");
    assert!(
        runs[1].0 < runs[0].1,
        "the second backup did not start before the first ended: {runs:?}"
    );
    assert!(
        runs[2].0 >= runs[0].1.min(runs[1].1),
        "the third backup started before either of the first two ended: {runs:?}"
    );
    // Balloons: down during the run, back after.
    let low = lowest.lock().unwrap().clone();
    for (i, l) in low.iter().enumerate() {
        assert!(
            *l <= full / 2 + (8 << 20),
            "vm{i}'s balloon never went down: lowest {l}"
        );
    }
    for vm in &vms {
        wait_until(
            "the balloon to be given back",
            Duration::from_secs(30),
            || {
                vm.observe("query-balloon", json!({}))
                    .and_then(|b| b["actual"].as_u64())
                    == Some(full)
            },
        );
        vm.assert_unharmed();
    }
    setup.assert_nothing_left(&net);
}

#[test]
fn needs_root_qemu_a_second_run_meets_the_lock_or_waits_for_it() {
    let _s = serial();
    let Some(()) = rig_available().then_some(()) else {
        return;
    };
    let dir = TempDir::new("lock");
    let net = TestNet::new();
    let vm = Vm::start(&net, dir.path(), VmOptions::default());
    let setup = Setup::new(dir.path(), &vm.qmp, "", "");
    // The first run halts after its checkpoint, holding the lock.
    let mut first = setup
        .command(Some(&net.ns), &["--json", "backup", "--all"])
        .env("COLDCLONE_TEST_HALT_AT", "checkpoint:memory-saved")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        "the first run to hold the lock",
        Duration::from_secs(60),
        || {
            std::fs::read_dir(setup.state.join("journal"))
                .map(|d| {
                    d.flatten().any(|e| {
                        std::fs::read_to_string(e.path())
                            .unwrap_or_default()
                            .contains("checkpoint:memory-saved")
                    })
                })
                .unwrap_or(false)
        },
    );
    let second = setup.coldclone(Some(&net.ns), &["backup", "--all"]);
    assert_eq!(second.status.code(), Some(3));
    let e = String::from_utf8_lossy(&second.stderr);
    assert!(
        e.contains("another coldclone backup is running") && e.contains("--wait"),
        "{e}"
    );
    // --wait blocks while the lock is held: it says it waits, and then neither
    // exits nor starts a run of its own as long as the holder lives.
    let holder = first.id();
    // The pid of the run holding the lock, as take_run_lock writes it.
    let lock_pid = || {
        std::fs::read_to_string(setup.state.join("coldclone.lock"))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    let waiting_log = dir.path().join("waiting.stderr");
    let mut waiting = setup
        .command(Some(&net.ns), &["--json", "backup", "--all", "--wait"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&waiting_log).expect("waiting.stderr"))
        .spawn()
        .unwrap();
    // `ip netns exec` execs coldclone in place: this is coldclone's pid.
    let waiter = waiting.id();
    wait_until(
        "the --wait run to find the lock held",
        Duration::from_secs(60),
        || {
            std::fs::read_to_string(&waiting_log)
                .unwrap_or_default()
                .contains("waiting for it to finish")
        },
    );
    let journals = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(setup.state.join("journal"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_file())
                    .collect()
            })
            .unwrap_or_default()
    };
    let held = journals();
    assert_eq!(held.len(), 1, "the holder's run journal: {held:?}");
    // Give a --wait that did not block every chance to show it: it would exit,
    // or take the lock and start a run (a second journal) within this time.
    // A slow host can only make this check weaker, never make it fail.
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        waiting.try_wait().expect("try_wait").is_none(),
        "--wait returned while the lock was held: {}",
        std::fs::read_to_string(&waiting_log).unwrap_or_default()
    );
    assert_eq!(
        journals(),
        held,
        "--wait started a run while the lock was held"
    );
    assert_eq!(
        lock_pid(),
        holder.to_string(),
        "the lock changed hands while the holder lived"
    );
    let released_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64();
    first.kill().unwrap();
    let _ = first.wait();
    // Released, it takes the lock, recovers the first run's leftovers and backs up.
    let out = waiting.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        std::fs::read_to_string(&waiting_log).unwrap_or_default()
    );
    let report = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(|v| v.get("vm").is_some())
        })
        .expect("the --wait run's report");
    assert_eq!(report["status"], "ok", "{report}");
    let started = report["started_at"].as_f64().expect("started_at");
    assert!(
        started >= released_at,
        "the --wait run's backup started at {started}, before the lock was released at {released_at}"
    );
    assert_eq!(
        lock_pid(),
        waiter.to_string(),
        "the --wait run never took the lock"
    );
    assert_eq!(setup.snapshots().len(), 1);
    assert_restored_disk_is_clean(&setup, None);
    vm.assert_unharmed();
    setup.assert_nothing_left(&net);
}

#[test]
fn needs_root_qemu_reports_table_and_metrics_when_one_vm_fails() {
    let _s = serial();
    let Some(()) = rig_available().then_some(()) else {
        return;
    };
    let dir = TempDir::new("reports");
    let net = TestNet::new();
    let vm = Vm::start(&net, dir.path(), VmOptions::default());
    let metrics = dir.path().join("coldclone.prom");
    let body = format!(
        "{}\n[[vm]]\nname = \"broken\"\nqmp = \"{}\"\n",
        vm_section("good", &vm),
        dir.path().join("no-such.qmp").display()
    );
    let setup = Setup::with_body(
        dir.path(),
        &format!("[run]\nmetrics_file = \"{}\"\n", metrics.display()),
        &body,
    );
    let out = setup.coldclone(Some(&net.ns), &["--json", "backup"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "one VM failed: the exit status says so"
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let good = lines
        .iter()
        .find(|l| l["vm"] == "good")
        .expect("good's report");
    let broken = lines
        .iter()
        .find(|l| l["vm"] == "broken")
        .expect("broken's report");
    assert_eq!(good["status"], "ok");
    assert_eq!(broken["status"], "failed");
    assert!(broken["error"]
        .as_str()
        .unwrap_or("")
        .contains("no-such.qmp"));
    let summary = lines
        .iter()
        .find_map(|l| l.get("summary"))
        .expect("summary");
    assert_eq!(
        (summary["ok"].as_u64(), summary["failed"].as_u64()),
        (Some(1), Some(1))
    );

    let prom = std::fs::read_to_string(&metrics).expect("metrics file");
    let finished = good["finished_at"].as_f64().unwrap();
    let line = prom
        .lines()
        .find(|l| l.starts_with("coldclone_last_success_timestamp_seconds{vm=\"good\"}"))
        .expect("good's last success");
    let t: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((t - finished).abs() < 0.01, "{line} vs {finished}");
    assert!(
        prom.contains("coldclone_last_run_success{vm=\"good\"} 1"),
        "{prom}"
    );
    assert!(
        prom.contains("coldclone_last_run_success{vm=\"broken\"} 0"),
        "{prom}"
    );
    assert!(
        !prom.contains("coldclone_last_success_timestamp_seconds{vm=\"broken\"}"),
        "{prom}"
    );
    assert!(prom.contains(
        "coldclone_last_success_consistency{vm=\"good\",consistency=\"clean-shutdown\"} 1"
    ));
    let pause = good["original_pause_ms"].as_f64().unwrap();
    assert!(
        prom.contains(&format!(
            "coldclone_last_pause_milliseconds{{vm=\"good\"}} {pause}"
        )),
        "{prom}"
    );

    // For people: the table at the end.
    let out = setup.coldclone(Some(&net.ns), &["backup"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("VM") && text.contains("STATUS") && text.contains("CONSISTENCY"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("good") && l.contains("ok") && l.contains("clean-shutdown")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("broken") && l.contains("failed")),
        "{text}"
    );
    assert!(
        text.contains("2 VM(s): 1 ok, 1 failed, 0 skipped"),
        "{text}"
    );
    // The second run: good's last success time moves forward to its new
    // backup; broken's stays absent, its run still failed.
    let prom2 = std::fs::read_to_string(&metrics).unwrap();
    let t2: f64 = prom2
        .lines()
        .find(|l| l.starts_with("coldclone_last_success_timestamp_seconds{vm=\"good\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("good's last success after the second run: {prom2}"));
    assert!(
        t2 > t,
        "good's last success did not move forward: {t} then {t2}"
    );
    // It is the second backup's time: not before the newest of good's two snapshots.
    let good_times: Vec<i64> = setup
        .snapshots()
        .iter()
        .filter(|s| s["vm"] == "good")
        .filter_map(|s| s["time_unix"].as_i64())
        .collect();
    assert_eq!(good_times.len(), 2, "good's snapshots: {good_times:?}");
    let newest = good_times.iter().copied().max().unwrap_or(i64::MAX) as f64;
    assert!(
        t2 >= newest && newest >= t.floor(),
        "good's last success ({t2}) is not the newest backup's ({newest}; the first ended at {t})"
    );
    assert!(
        prom2.contains("coldclone_last_run_success{vm=\"good\"} 1"),
        "{prom2}"
    );
    assert!(
        prom2.contains("coldclone_last_run_success{vm=\"broken\"} 0"),
        "{prom2}"
    );
    assert!(
        !prom2.contains("coldclone_last_success_timestamp_seconds{vm=\"broken\"}"),
        "{prom2}"
    );
    vm.assert_unharmed();
    setup.assert_nothing_left(&net);
}
