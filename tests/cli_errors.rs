//! Bad input: a clear error naming the problem, a non-zero exit, nothing created.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_coldclone");

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.join("repo")).output();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir(tag: &str) -> Dir {
    let p = std::env::temp_dir().join(format!("coldclone-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    Dir(p)
}

fn config(d: &Path, qmp: &str) -> PathBuf {
    std::fs::write(d.join("pw"), "pw\n").unwrap();
    let cfg = d.join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{0}/state\"\n[repository]\npath = \"{0}/repo\"\npassword_file = \"{0}/pw\"\n[[vm]]\nname = \"web1\"\nqmp = \"{qmp}\"\n",
            d.display()
        ),
    )
    .unwrap();
    cfg
}

fn run(cfg: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--config")
        .arg(cfg)
        .args(args)
        .env_remove("COLDCLONE_PASSWORD")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// No journal, no work folder, no snapshot: the run created nothing.
fn assert_nothing_created(d: &Path, cfg: &Path) {
    for sub in ["state/journal", "state/runs"] {
        let n = std::fs::read_dir(d.join(sub))
            .map(|r| r.count())
            .unwrap_or(0);
        assert_eq!(n, 0, "{sub} is not empty");
    }
    // Every caller made the repository first: a `snapshots` that fails would
    // hide a recorded backup, so it must succeed.
    let o = run(cfg, &["--json", "snapshots"]);
    assert!(
        o.status.success(),
        "snapshots failed, so nothing could be checked: {}",
        stderr(&o)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("snapshots JSON");
    assert_eq!(
        v.as_array().map(Vec::len),
        Some(0),
        "a snapshot was recorded"
    );
}

#[test]
fn every_verb_has_help() {
    for verb in [
        "backup",
        "init",
        "snapshots",
        "restore",
        "recover",
        "doctor",
        "unlock",
        "repair-index",
    ] {
        let o = Command::new(BIN).args([verb, "--help"]).output().unwrap();
        assert!(o.status.success(), "{verb} --help failed");
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("Usage"),
            "{verb} --help"
        );
    }
}

#[test]
fn a_malformed_config_is_named_with_its_line() {
    let d = dir("malformed");
    let cfg = d.0.join("bad.toml");
    std::fs::write(&cfg, "state_dir = \"/tmp/x\"\n[[vm]\nname = 1\n").unwrap();
    let o = run(&cfg, &["backup"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("bad.toml") && e.contains("line 2"), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    // And a missing one.
    let o = run(&d.0.join("nope.toml"), &["backup"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cannot read config file") && stderr(&o).contains("nope.toml"));
}

#[test]
fn an_unknown_vm_is_refused_before_anything_happens() {
    let d = dir("unknown");
    let cfg = config(&d.0, "/nonexistent/web1.qmp");
    assert!(run(&cfg, &["init"]).status.success());
    let o = run(&cfg, &["backup", "db9"]);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("unknown VM \"db9\"") && e.contains("web1"),
        "{e}"
    );
    assert_nothing_created(&d.0, &cfg);
}

#[test]
fn an_unreachable_qmp_socket_fails_the_vm_and_creates_nothing() {
    let d = dir("noqmp");
    let sock = d.0.join("gone.qmp");
    let cfg = config(&d.0, &sock.display().to_string());
    assert!(run(&cfg, &["init"]).status.success());
    let o = run(&cfg, &["--json", "backup"]);
    assert_eq!(o.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .as_bytes(),
    )
    .expect("one JSON report");
    assert_eq!(report["status"], "failed");
    let e = report["error"].as_str().unwrap_or("");
    assert!(
        e.contains("cannot reach the VM's QMP socket") && e.contains("gone.qmp"),
        "{e}"
    );
    assert_nothing_created(&d.0, &cfg);
}

#[test]
fn a_missing_password_or_repository_is_explained() {
    let d = dir("nopw");
    let cfg = config(&d.0, "/x.qmp");
    let o = run(&cfg, &["backup"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("cannot open the repository"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_file(d.0.join("pw")).unwrap();
    let o = run(&cfg, &["init"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("password file"), "{}", stderr(&o));
}

#[test]
fn needs_root_an_unwritable_repository_is_refused_before_the_vm_is_touched() {
    if !coldclone_testkit::require_root_and_tools("a read-only bind mount", &["mount", "umount"]) {
        return;
    }
    let d = dir("rorepo");
    let cfg = config(&d.0, "/nonexistent.qmp");
    assert!(run(&cfg, &["init"]).status.success());
    let repo = d.0.join("repo");
    let m = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "mount --bind {0} {0} && mount -o remount,ro,bind {0}",
            repo.display()
        ))
        .status()
        .unwrap();
    assert!(m.success(), "could not make a read-only bind mount");
    let o = run(&cfg, &["backup"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("not writable") && e.contains("repo"), "{e}");
    assert_nothing_created(&d.0, &cfg);
}

#[test]
fn a_closed_output_pipe_ends_the_listing_quietly() {
    // `coldclone snapshots | head -1` used to panic on the broken pipe.
    let d = dir("pipe");
    let cfg = config(&d.0, "/nonexistent/web1.qmp");
    assert!(run(&cfg, &["init"]).status.success());
    for args in [&["snapshots"][..], &["--json", "snapshots"], &["check"]] {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .env_remove("COLDCLONE_PASSWORD")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before coldclone writes its first line.
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        let e = stderr(&o);
        assert!(!e.contains("panicked"), "{args:?}: {e}");
        assert_eq!(o.status.code(), Some(0), "{args:?}: {e}");
    }
}

#[test]
fn snapshot_names_and_vm_names_are_checked() {
    let d = dir("names");
    let cfg = config(&d.0, "/nonexistent/web1.qmp");
    assert!(run(&cfg, &["init"]).status.success());
    let to = d.0.join("out.img");
    let to = to.to_str().unwrap();
    // An empty snapshot id named no snapshot, and so any.
    let o = run(
        &cfg,
        &[
            "restore",
            "web1",
            "--disk",
            "xvda",
            "--to",
            to,
            "--snapshot",
            "",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--snapshot is empty"), "{}", stderr(&o));
    // A one-character prefix is too short.
    let o = run(&cfg, &["forget", "a"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("too short"), "{}", stderr(&o));
    assert!(!Path::new(to).exists());
    // VM names that would be paths, options or QEMU option separators.
    for bad in ["..", "-rf", "a,b=c", "x\u{1b}[2J"] {
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("name = \"web1\"", &format!("name = {}", toml_string(bad)));
        let c2 = d.0.join("bad-name.toml");
        std::fs::write(&c2, text).unwrap();
        let o = run(&c2, &["snapshots"]);
        assert_eq!(o.status.code(), Some(2), "{bad:?}");
        assert!(stderr(&o).contains("vm name"), "{bad:?}: {}", stderr(&o));
    }
}

fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        if c.is_control() {
            out.push_str(&format!("\\u{:04X}", c as u32));
        } else {
            out.push(c);
        }
    }
    out.push('"');
    out
}
