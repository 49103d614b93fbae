//! `coldclone doctor`: can this host run backups? Tools, rights, memory, VMs.

use crate::config::Config;
use crate::journal::RunLock;
use coldclone_backends::backend_for;
use serde::Serialize;
use std::process::Command;

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

fn tool(name: &str, args: &[&str]) -> Check {
    match Command::new(name).args(args).output() {
        Ok(o) if o.status.success() => Check {
            name: format!("tool {name}"),
            ok: true,
            detail: String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string(),
        },
        Ok(o) => Check {
            name: format!("tool {name}"),
            ok: false,
            detail: String::from_utf8_lossy(&o.stderr).trim().to_string(),
        },
        Err(e) => Check {
            name: format!("tool {name}"),
            ok: false,
            detail: format!("not found ({e}); install it (Debian: see README)"),
        },
    }
}

fn mem_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn checks(cfg: Option<&Config>) -> Vec<Check> {
    let mut out = host_checks();
    // Clones of XAPI VMs run on their pool: this host then needs no QEMU,
    // bridges or root, so failing those checks is only a note.
    let local_clones = cfg.is_none_or(|c| {
        c.vms
            .iter()
            .any(|vm| backend_for(&vm.locator).clone_uses_local_memory())
    });
    if !local_clones {
        for c in out.iter_mut().filter(|c| !c.ok) {
            c.ok = true;
            c.detail = format!(
                "{} (not needed: no VM here is cloned on this host)",
                c.detail
            );
        }
    }
    checks_with_config(cfg, out)
}

fn host_checks() -> Vec<Check> {
    let mut out = vec![
        tool("qemu-system-x86_64", &["--version"]),
        tool("qemu-img", &["--version"]),
        // The archive reads QEMU clones' disks through its read-only FUSE export.
        tool("qemu-storage-daemon", &["--version"]),
        tool("ip", &["-V"]),
    ];
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    out.push(Check {
        name: "root".into(),
        ok: euid == 0,
        detail: if euid == 0 {
            "running as root".into()
        } else {
            format!("euid {euid}: bridges, taps and other users' VMs need root")
        },
    });
    out.push(Check {
        name: "/dev/net/tun".into(),
        ok: std::path::Path::new("/dev/net/tun").exists(),
        detail: "clones' NICs are taps".into(),
    });
    out.push(Check {
        name: "/dev/fuse".into(),
        ok: std::path::Path::new("/dev/fuse").exists(),
        detail: "the archive reads a QEMU clone's disk in place through a FUSE export".into(),
    });
    out
}

fn checks_with_config(cfg: Option<&Config>, mut out: Vec<Check>) -> Vec<Check> {
    let avail = mem_available_bytes();
    out.push(Check {
        name: "free memory".into(),
        ok: avail.is_some_and(|a| a > 512 << 20),
        detail: format!("{} MiB available", avail.unwrap_or(0) >> 20),
    });
    if let Some(cfg) = cfg {
        let sd = &cfg.state_dir;
        let writable = std::fs::create_dir_all(sd).is_ok() && super::probe_writable(sd).is_ok();
        out.push(Check {
            name: "state folder".into(),
            ok: writable,
            detail: format!(
                "{} {}",
                sd.display(),
                if writable { "writable" } else { "NOT writable" }
            ),
        });
        let repo = super::open_repository(cfg);
        out.push(Check {
            name: "repository".into(),
            ok: repo.is_ok(),
            detail: match &repo {
                Ok(r) => format!("{} opened", r.location()),
                Err(e) => format!("{e:#}"),
            },
        });
        let lock_holder = RunLock::holder(&cfg.state_dir);
        let lock_free = RunLock::take(&cfg.state_dir, false)
            .ok()
            .flatten()
            .is_some();
        out.push(Check {
            name: "run lock".into(),
            ok: true,
            detail: if lock_free {
                "free".into()
            } else {
                format!("held by a running backup (pid {lock_holder})")
            },
        });
        let limits = crate::schedule::Limits::from_config(cfg);
        out.push(Check {
            name: "memory budget".into(),
            ok: limits.budget_bytes > 0,
            detail: format!(
                "{} MiB for clones, {} at a time, {} MiB kept for the host",
                limits.budget_bytes >> 20,
                limits.max_parallel,
                limits.reserve_bytes >> 20
            ),
        });
        if let Some(m) = &cfg.run.metrics_file {
            let dir = m.parent().unwrap_or(std::path::Path::new("."));
            let ok = super::probe_writable(dir).is_ok();
            out.push(Check {
                name: "metrics file".into(),
                ok,
                detail: format!(
                    "{} ({})",
                    m.display(),
                    if ok {
                        "folder writable"
                    } else {
                        "folder NOT writable"
                    }
                ),
            });
        }
        for vm in &cfg.vms {
            let backend = backend_for(&vm.locator);
            let r = backend.inspect(&vm.locator);
            let policy = &vm.policy;
            let needed = crate::schedule::clone_need_bytes(vm);
            if let (Ok(info), Some(_)) = (&r, &policy.balloon) {
                let balloon_ok = backend.balloon_supported(info);
                out.push(Check {
                    name: format!("vm {} balloon", vm.name),
                    ok: balloon_ok,
                    detail: if balloon_ok {
                        "the balloon answers".into()
                    } else {
                        "a balloon policy is set but the VM has no working balloon device".into()
                    },
                });
            }
            out.push(Check {
                name: format!("vm {}", vm.name),
                ok: r.is_ok() && avail.is_some_and(|a| a > needed) && needed <= limits.budget_bytes,
                detail: match r {
                    Ok(i) => format!(
                        "{} running={} {} MiB RAM, {} disk(s), {} NIC(s); its clone needs {} MiB",
                        i.name,
                        i.running,
                        i.memory_bytes >> 20,
                        i.disks.len(),
                        i.nics,
                        needed >> 20
                    ),
                    Err(e) => e.to_string(),
                },
            });
        }
    }
    out
}

pub fn run(cfg: Option<&Config>, json: bool) -> anyhow::Result<bool> {
    let checks = checks(cfg);
    let ok = checks.iter().all(|c| c.ok);
    if json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            println!(
                "[{}] {:<24} {}",
                if c.ok { " ok " } else { "FAIL" },
                c.name,
                c.detail
            );
        }
    }
    Ok(ok)
}
