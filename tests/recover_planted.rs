//! Issue 12, finding 10: `recover` runs as root on journals read back from disk. It acts on
//! a journaled resource only if what is there still is what coldclone made, and it reads
//! journals only from a state folder that nobody but root can change. Each test plants a
//! journal, runs the real binary, and checks what survived.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_coldclone");

struct Rig {
    dir: PathBuf,
    cfg: PathBuf,
    state: PathBuf,
    links: Vec<String>,
    bystander: Option<Child>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(c) = self.bystander.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for l in &self.links {
            let _ = Command::new("ip").args(["link", "del", l]).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rig(tag: &str) -> Rig {
    let dir = std::env::temp_dir().join(format!("coldclone-planted-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let state = dir.join("state");
    std::fs::create_dir_all(state.join("journal")).unwrap();
    std::fs::create_dir_all(state.join("runs")).unwrap();
    std::fs::write(dir.join("pw"), "pw\n").unwrap();
    let cfg = dir.join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{0}/state\"\n[repository]\npath = \"{0}/repo\"\npassword_file = \"{0}/pw\"\n",
            dir.display()
        ),
    )
    .unwrap();
    Rig {
        dir,
        cfg,
        state,
        links: Vec::new(),
        bystander: None,
    }
}

impl Rig {
    fn plant(&self, resources: &[String]) {
        let mut lines =
            vec![r#"{"op":"start","run_id":"r1","vm":"vm1","pid":1,"at":1.0}"#.to_string()];
        for (i, r) in resources.iter().enumerate() {
            lines.push(format!(
                r#"{{"op":"create","id":{},"resource":{r},"at":1.0}}"#,
                i + 1
            ));
        }
        std::fs::write(self.state.join("journal/r1.jsonl"), lines.join("\n") + "\n").unwrap();
    }

    fn recover(&self) -> Output {
        Command::new(BIN)
            .arg("--config")
            .arg(&self.cfg)
            .args(["--json", "recover"])
            .output()
            .unwrap()
    }

    fn ip(&mut self, args: &[&str], created: &str) {
        let o = Command::new("ip").args(args).output().unwrap();
        assert!(
            o.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        self.links.push(created.to_string());
    }
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn alive(c: &mut Child) -> bool {
    matches!(c.try_wait(), Ok(None))
}

#[test]
fn needs_root_recover_acts_only_on_what_coldclone_made() {
    if !coldclone_testkit::require_root_and_tools(
        "makes links and plants journals",
        &["ip", "python3"],
    ) {
        return;
    }
    let mut r = rig("acts");
    let tag = format!("{:04x}", std::process::id() % 0xffff);
    // A process that merely carries a clone marker in its argv (not QEMU).
    let marker = format!("coldclone-clone-planted{tag}");
    let mut bystander = Command::new("python3")
        .args(["-c", "import time; time.sleep(600)", &marker])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(alive(&mut bystander));
    r.bystander = Some(bystander);
    // A veth named like one of coldclone's taps; a bridge without coldclone's name;
    // a real coldclone-named bridge (this one recover must remove).
    let (veth, peer, foreign_br, our_br) = (
        format!("cc{tag}t0"),
        format!("cc{tag}p0"),
        format!("plant{tag}"),
        format!("ccbr{tag}"),
    );
    r.ip(
        &["link", "add", &veth, "type", "veth", "peer", "name", &peer],
        &veth,
    );
    r.ip(&["link", "add", &foreign_br, "type", "bridge"], &foreign_br);
    r.ip(&["link", "add", &our_br, "type", "bridge"], &our_br);
    // Folders and files outside the run folders, and one reached through a planted link.
    let outside = r.dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("keep"), b"precious").unwrap();
    std::os::unix::fs::symlink(&outside, r.state.join("runs/link")).unwrap();
    let ours = r.state.join("runs/r1");
    std::fs::create_dir_all(&ours).unwrap();
    std::fs::write(ours.join("memory.bin"), b"x").unwrap();
    let j = |p: &Path| serde_json::to_string(&p.display().to_string()).unwrap();
    r.plant(&[
        format!(
            r#"{{"kind":"clone_process","marker":"{marker}","qmp":{}}}"#,
            j(&ours.join("clone.qmp"))
        ),
        format!(r#"{{"kind":"tap","namespace":null,"name":"{veth}"}}"#),
        format!(r#"{{"kind":"bridge","namespace":null,"name":"{foreign_br}"}}"#),
        format!(r#"{{"kind":"dir","path":{}}}"#, j(&outside)),
        format!(
            r#"{{"kind":"file","path":{}}}"#,
            j(&r.state.join("runs/link/keep"))
        ),
        format!(
            r#"{{"kind":"dir","path":{}}}"#,
            j(&r.state.join("runs/r1/../../.."))
        ),
        format!(
            r#"{{"kind":"file","path":{}}}"#,
            j(&ours.join("memory.bin"))
        ),
        format!(r#"{{"kind":"bridge","namespace":null,"name":"{our_br}"}}"#),
    ]);
    let o = r.recover();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(
        o.status.code(),
        Some(4),
        "recover reports what it refused\n{out}\n{err}"
    );
    assert_eq!(
        out.matches("recover refuses").count(),
        6,
        "six refusals\n{out}"
    );
    assert!(
        alive(r.bystander.as_mut().unwrap()),
        "the bystander process was killed"
    );
    assert!(link_exists(&veth), "the veth was deleted");
    assert!(link_exists(&foreign_br), "the foreign bridge was deleted");
    assert!(
        outside.join("keep").exists(),
        "a file outside the state folder was deleted"
    );
    assert!(
        r.dir.exists() && r.state.exists(),
        "a `..` path was followed"
    );
    // What coldclone did make goes.
    assert!(
        !ours.join("memory.bin").exists(),
        "the run's own file stays"
    );
    assert!(!link_exists(&our_br), "coldclone's bridge stays");
}

#[test]
fn needs_root_recover_refuses_a_state_folder_others_can_change() {
    if !coldclone_testkit::require_root_and_tools("chowns journals to another uid", &[]) {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let r = rig("trust");
    let victim = r.state.join("runs/r1/memory.bin");
    std::fs::create_dir_all(victim.parent().unwrap()).unwrap();
    std::fs::write(&victim, b"x").unwrap();
    r.plant(&[format!(
        r#"{{"kind":"file","path":{}}}"#,
        serde_json::to_string(&victim.display().to_string()).unwrap()
    )]);
    let journal = r.state.join("journal");
    type Step<'a> = Box<dyn Fn() + 'a>;
    let cases: [(&str, Step, Step); 3] = [
        (
            "writable by group or others",
            Box::new(|| {
                std::fs::set_permissions(&journal, std::fs::Permissions::from_mode(0o777)).unwrap()
            }),
            Box::new(|| {
                std::fs::set_permissions(&journal, std::fs::Permissions::from_mode(0o700)).unwrap()
            }),
        ),
        (
            "owned by uid 65534",
            Box::new(|| {
                std::os::unix::fs::chown(journal.join("r1.jsonl"), Some(65534), None).unwrap()
            }),
            Box::new(|| std::os::unix::fs::chown(journal.join("r1.jsonl"), Some(0), None).unwrap()),
        ),
        (
            "writable by group or others",
            Box::new(|| {
                std::fs::set_permissions(&r.state, std::fs::Permissions::from_mode(0o757)).unwrap()
            }),
            Box::new(|| {
                std::fs::set_permissions(&r.state, std::fs::Permissions::from_mode(0o700)).unwrap()
            }),
        ),
    ];
    for (expect, spoil, mend) in &cases {
        spoil();
        let o = r.recover();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{expect}: {err}");
        assert!(
            err.contains(expect) && err.contains("chown root"),
            "{expect}: {err}"
        );
        assert!(
            victim.exists(),
            "{expect}: recover acted on an untrusted journal"
        );
        mend();
    }
    // Trusted again: the journal is acted on.
    let o = r.recover();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!victim.exists());
}
