//! A small rig for tests that drive the `coldclone` binary over a repository written
//! straight by the repository crate (no VM): a temporary folder, a config for one QEMU
//! VM `web1` whose QMP socket is never there, and the binary's runs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const BIN: &str = env!("CARGO_BIN_EXE_coldclone");

/// A folder removed with everything in it when dropped.
pub struct Dir(pub PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A config in `d`: state folder, a repository at `d/repo` (password "pw"), and the VM
/// `web1`, whose QMP socket does not exist.
pub fn config(d: &Path) -> PathBuf {
    std::fs::write(d.join("pw"), "pw\n").unwrap();
    let cfg = d.join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{0}/state\"\n[repository]\npath = \"{0}/repo\"\npassword_file = \"{0}/pw\"\n[[vm]]\nname = \"web1\"\nqmp = \"{0}/none.qmp\"\n",
            d.display()
        ),
    )
    .unwrap();
    cfg
}

/// `coldclone --config CFG ARGS`, its password only from the config.
pub fn coldclone(cfg: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("--config")
        .arg(cfg)
        .args(args)
        .env_remove("COLDCLONE_PASSWORD")
        .output()
        .expect("run coldclone")
}

pub fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every pack file of the repository at `dir` (at least one).
pub fn packs(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.join("data")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    assert!(!out.is_empty(), "no packs under {}", dir.display());
    out
}
