//! The xl backend on a real Xen host: Xen 4.17 with a Debian 12 PV dom0, booted
//! under QEMU software emulation (tests/xen-lab). One boot serves every test:
//! the first test to ask builds the lab image if it is not cached
//! (target/xen-lab/<hash of the recipe>; needs Debian's package registry for
//! debootstrap, a few minutes once), boots it with the coldclone binary on a
//! 9p share, and dom0 runs every scenario of tests/xen-lab/run/lab.sh; each
//! test then asserts on its scenario's results. The run's files stay in
//! target/xen-lab/last-run/ (out/<scenario>/, serial.log) for a look after.
//!
//! Tests are named `needs_xen_lab_*`: they need root and qemu-system-x86_64,
//! and skip (saying why) without them. `COLDCLONE_XEN_LAB_SCENARIOS="backup thin"`
//! runs only some scenarios (the others' tests then skip).

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

const ALL_SCENARIOS: &str = "backup thin kill-after-save kill-after-restore overflow hvm";

struct Scenario {
    checks: BTreeMap<String, String>,
    /// The first JSON line coldclone printed (`--json backup`).
    report: Value,
    stderr: String,
}

impl Scenario {
    fn get(&self, key: &str) -> &str {
        self.checks.get(key).map(String::as_str).unwrap_or("")
    }
    fn num(&self, key: &str) -> u64 {
        self.get(key).trim().parse().unwrap_or(0)
    }
    fn context(&self) -> String {
        format!(
            "checks: {:#?}\nreport: {}\nstderr (tail): {}",
            self.checks,
            self.report,
            tail(&self.stderr, 3000)
        )
    }
    /// No LV, domain, bridge, vif, journal, work folder or xl process of coldclone's is left.
    fn assert_nothing_left(&self) {
        for k in ["lvs", "domains", "bridges", "vifs", "journal", "runs"] {
            assert!(
                self.get(k).trim().is_empty(),
                "{k} left behind: {:?}\n{}",
                self.get(k),
                self.context()
            );
        }
        assert_eq!(self.get("xl_processes"), "0", "{}", self.context());
    }
    /// The original runs unpaused and its counter moves on.
    fn assert_original_runs(&self) {
        let st = self.get("original_state");
        assert!(
            !st.is_empty() && !st.contains('p') && !st.contains('s'),
            "the original's state is {st:?}\n{}",
            self.context()
        );
        assert!(
            self.num("original_counter_after") > self.num("original_counter_before"),
            "the original's counter does not advance\n{}",
            self.context()
        );
    }
    /// The restored archive: e2fsck clean, unmounted cleanly, both counters equal.
    fn assert_archive_clean(&self) {
        assert_eq!(
            self.get("restored"),
            "1",
            "restore failed\n{}",
            self.context()
        );
        assert_eq!(
            self.get("e2fsck_rc"),
            "0",
            "e2fsck found errors\n{}",
            self.context()
        );
        assert_eq!(self.get("fs_state"), "clean", "{}", self.context());
        let (a, b) = (self.get("counter_a"), self.get("counter_b"));
        assert!(
            !a.is_empty(),
            "no counter in the backup\n{}",
            self.context()
        );
        assert_eq!(
            a,
            b,
            "the two counters differ: a torn copy\n{}",
            self.context()
        );
    }
}

fn tail(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let start = (start..s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    &s[start..]
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn available() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: the Xen lab needs root (debootstrap, loop-free image build)");
        return false;
    }
    for t in ["qemu-system-x86_64", "qemu-img", "mke2fs", "cpio"] {
        if !have(t) {
            eprintln!("SKIPPED: {t} is not installed");
            return false;
        }
    }
    true
}

/// FNV-1a over the files that make the image: a change to any rebuilds it.
fn recipe_hash(dir: &Path) -> String {
    let mut files = vec![dir.join("build.sh")];
    let mut img: Vec<PathBuf> = std::fs::read_dir(dir.join("image"))
        .expect("tests/xen-lab/image")
        .flatten()
        .map(|e| e.path())
        .collect();
    img.sort();
    files.extend(img);
    let mut h: u64 = 0xcbf29ce484222325;
    for f in files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for b in name.bytes().chain(std::fs::read(&f).expect("recipe file")) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    format!("{h:016x}")
}

/// The lab image, built when it is not cached.
fn image() -> PathBuf {
    let lab = workspace_root().join("tests/xen-lab");
    // Outside the checkout, so that a fresh clone (CI) reuses the image
    // built for the same recipe; COLDCLONE_LAB_CACHE moves it.
    let cache = std::env::var_os("COLDCLONE_LAB_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/coldclone/xen-lab"));
    let dir = cache.join(recipe_hash(&lab));
    if !dir.join(".done").exists() {
        let t = Instant::now();
        eprintln!("building the Xen lab image into {} (once)", dir.display());
        let st = Command::new("bash")
            .arg(lab.join("build.sh"))
            .arg(&dir)
            .status()
            .expect("run build.sh");
        assert!(st.success(), "building the Xen lab image failed");
        eprintln!("Xen lab image built in {:.0} s", t.elapsed().as_secs_f64());
    }
    dir
}

/// The coldclone binary for dom0: an optimized build, because a debug build's
/// Argon2id key derivation and chunking take minutes under TCG.
/// `COLDCLONE_XEN_LAB_BIN` names one; else `cargo build --release` makes it.
fn lab_binary() -> PathBuf {
    if let Ok(p) = std::env::var("COLDCLONE_XEN_LAB_BIN") {
        return PathBuf::from(p);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let t = Instant::now();
    let out = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--bin",
            "coldclone",
            "--message-format=json",
        ])
        .current_dir(workspace_root())
        .output()
        .expect("cargo build --release");
    assert!(
        out.status.success(),
        "cargo build --release failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exe = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "coldclone")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo named no coldclone executable");
    eprintln!(
        "release coldclone for the lab: {} ({:.0} s)",
        exe.display(),
        t.elapsed().as_secs_f64()
    );
    exe
}

fn scenarios() -> String {
    std::env::var("COLDCLONE_XEN_LAB_SCENARIOS").unwrap_or_else(|_| ALL_SCENARIOS.to_string())
}

/// Boots the lab once and reads every scenario's results.
fn lab() -> Option<&'static BTreeMap<String, Scenario>> {
    static LAB: OnceLock<Option<BTreeMap<String, Scenario>>> = OnceLock::new();
    LAB.get_or_init(|| {
        if !available() {
            return None;
        }
        let img = image();
        let run = workspace_root().join("target/xen-lab/last-run");
        let _ = std::fs::remove_dir_all(&run);
        let share = run.join("share");
        std::fs::create_dir_all(&share).expect("share dir");
        let bin = lab_binary();
        std::fs::copy(&bin, share.join("coldclone")).expect("copy coldclone");
        let sha = Command::new("sha256sum")
            .arg(&bin)
            .output()
            .expect("sha256sum");
        let sha = String::from_utf8_lossy(&sha.stdout);
        std::fs::write(
            share.join("coldclone.sha256"),
            sha.split_whitespace().next().unwrap_or(""),
        )
        .expect("write the hash");
        std::fs::copy(
            workspace_root().join("tests/xen-lab/run/lab.sh"),
            share.join("run.sh"),
        )
        .expect("copy lab.sh");
        std::fs::write(share.join("scenarios"), scenarios()).expect("scenarios");
        let t = Instant::now();
        let st = Command::new("bash")
            .arg(workspace_root().join("tests/xen-lab/boot.sh"))
            .arg(&img)
            .arg(&share)
            .arg(run.join("work"))
            .status()
            .expect("boot.sh");
        eprintln!(
            "Xen lab run: {:.0} s (boot.sh exit {:?}); dom0 log: {}",
            t.elapsed().as_secs_f64(),
            st.code(),
            share.join("out/dom0.log").display()
        );
        // Keep the logs, drop the big disks.
        let _ = std::fs::rename(run.join("work/serial.log"), run.join("serial.log"));
        let _ = std::fs::remove_dir_all(run.join("work"));
        let _ = std::fs::remove_file(share.join("coldclone"));
        let mut out = BTreeMap::new();
        for s in scenarios().split_whitespace() {
            let d = share.join("out").join(s);
            let Ok(text) = std::fs::read_to_string(d.join("checks")) else {
                continue;
            };
            let checks = text
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .collect();
            let report = std::fs::read_to_string(d.join("report.json"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| serde_json::from_str::<Value>(l).ok())
                .unwrap_or(Value::Null);
            let stderr = std::fs::read_to_string(d.join("stderr.txt")).unwrap_or_default();
            eprintln!("scenario {s}: {text}");
            out.insert(
                s.to_string(),
                Scenario {
                    checks,
                    report,
                    stderr,
                },
            );
        }
        Some(out)
    })
    .as_ref()
}

/// The results of one scenario; `None` (test skipped) when the lab cannot run here
/// or the scenario was not selected.
fn scenario(name: &str) -> Option<&'static Scenario> {
    if !scenarios().split_whitespace().any(|s| s == name) {
        eprintln!("SKIPPED: scenario {name} not selected (COLDCLONE_XEN_LAB_SCENARIOS)");
        return None;
    }
    let lab = lab()?;
    let s = lab.get(name);
    assert!(
        s.is_some(),
        "scenario {name} left no results: see target/xen-lab/last-run/share/out/dom0.log and serial.log"
    );
    s
}

#[test]
fn needs_xen_lab_pv_backup_is_clean_and_the_original_unharmed() {
    let Some(s) = scenario("backup") else { return };
    let r = &s.report;
    assert_eq!(s.get("rc"), "0", "backup failed\n{}", s.context());
    assert_eq!(r["status"], "ok", "{}", s.context());
    assert_eq!(r["backend"], "xl");
    assert_eq!(r["consistency"], "clean-shutdown", "{}", s.context());
    assert_eq!(r["clone_stop"], "pv");
    assert_eq!(r["checkpoint_method"], "xl-save-pause");
    let memory = r["original_pause"]["memory_ms"].as_f64().unwrap_or(0.0);
    let disks = r["original_pause"]["disk_snapshot_ms"]
        .as_f64()
        .unwrap_or(0.0);
    let total = r["original_pause_ms"].as_f64().unwrap_or(0.0);
    eprintln!("pause: total {total:.0} ms = memory save {memory:.0} ms + disk snapshots {disks:.0} ms (+ unpause)");
    assert!(
        memory > 0.0 && disks > 0.0 && total >= memory + disks,
        "{}",
        s.context()
    );
    assert_eq!(r["disks"][0]["name"], "xvda");
    assert_eq!(r["disks"][0]["bytes"], 32 << 20);
    assert!(r["isolated_network"]["bridge"]
        .as_str()
        .is_some_and(|b| b.starts_with("ccbr")));
    s.assert_archive_clean();
    assert!(
        s.num("counter_a") >= s.num("counter_before"),
        "the backup is older than the run\n{}",
        s.context()
    );
    s.assert_original_runs();
    s.assert_nothing_left();
    assert_eq!(s.get("snapshots"), "1", "{}", s.context());
}

#[test]
fn needs_xen_lab_ballooning_is_applied_and_undone() {
    let Some(s) = scenario("backup") else { return };
    assert_eq!(s.get("rc"), "0", "backup failed\n{}", s.context());
    // 128 MiB guest, balloon policy target 96 MiB: the target went down, and is back.
    assert_eq!(s.get("balloon_min_target_kib"), "98304", "{}", s.context());
    // Read back after the run (the sampler may stop before the clean-up sets it back).
    assert_eq!(s.get("original_target_kib"), "131072", "{}", s.context());
    // The memory image holds the ballooned guest.
    let image = s.report["memory_image_bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(
        image < 110 << 20,
        "memory image {image} bytes\n{}",
        s.context()
    );
}

#[test]
fn needs_xen_lab_thin_snapshot_backup_is_clean() {
    let Some(s) = scenario("thin") else { return };
    assert_eq!(s.get("rc"), "0", "backup failed\n{}", s.context());
    assert_eq!(s.report["consistency"], "clean-shutdown", "{}", s.context());
    s.assert_archive_clean();
    s.assert_original_runs();
    s.assert_nothing_left();
}

fn assert_recovered(s: &Scenario) {
    assert_eq!(
        s.get("reached"),
        "1",
        "the run never reached the milestone\n{}",
        s.context()
    );
    assert_eq!(s.get("recover_rc"), "0", "recover failed\n{}", s.context());
    s.assert_original_runs();
    s.assert_nothing_left();
}

#[test]
fn needs_xen_lab_kill_after_save_then_recover() {
    let Some(s) = scenario("kill-after-save") else {
        return;
    };
    // Killed while the original was paused by xl save -p: recover unpauses it.
    assert!(
        s.get("after_kill_original_state").contains('p'),
        "{}",
        s.context()
    );
    assert_recovered(s);
}

#[test]
fn needs_xen_lab_kill_after_restore_then_recover() {
    let Some(s) = scenario("kill-after-restore") else {
        return;
    };
    assert_eq!(
        s.get("after_kill_domains"),
        "1",
        "no clone to recover\n{}",
        s.context()
    );
    assert!(s.num("after_kill_lvs") >= 1, "{}", s.context());
    assert_recovered(s);
}

#[test]
fn needs_xen_lab_overflowed_classic_snapshot_fails_and_archives_nothing() {
    let Some(s) = scenario("overflow") else {
        return;
    };
    assert_ne!(s.get("rc"), "0", "the backup succeeded\n{}", s.context());
    assert_eq!(s.report["status"], "failed", "{}", s.context());
    let err = s.report["error"].as_str().unwrap_or("");
    assert!(
        err.contains("overflowed"),
        "unclear error: {err}\n{}",
        s.context()
    );
    assert_eq!(
        s.get("snapshots"),
        "0",
        "something was archived\n{}",
        s.context()
    );
    s.assert_original_runs();
    s.assert_nothing_left();
}

/// HVM under nested TCG: reported, not required (see docs/xl.md for what was seen).
/// An HVM guest takes minutes to boot in the lab and its ACPI path was never seen to
/// finish here, so CI leaves it out; run it with `cargo test --test xl_lab -- --ignored`.
#[test]
#[ignore = "HVM under nested TCG is too slow for CI; see docs/xl.md"]
fn needs_xen_lab_hvm_guest_with_acpi_power_button() {
    let Some(s) = scenario("hvm") else { return };
    eprintln!("HVM try-out: {}", s.context());
    if s.get("up") == "0" {
        eprintln!(
            "the HVM guest did not boot under TCG within the time allowed; nothing more to check"
        );
    } else if s.get("rc") == "0" {
        // PV shutdown when the guest's kernel speaks xenbus (it does here), else ACPI.
        let stop = s.report["clone_stop"].as_str().unwrap_or("");
        assert!(stop == "pv" || stop == "acpi", "{}", s.context());
        assert_eq!(s.report["consistency"], "clean-shutdown", "{}", s.context());
        s.assert_archive_clean();
    }
    s.assert_nothing_left();
}
