//! The audit's boot test: restored disks booted fresh (not from a memory
//! image) with the original's devices, on an isolated network, until the
//! guest shows a heartbeat on its console.

use super::{cmdline, qemu_vm, QemuBackend, Qmp};
use crate::shared::SharedResource;
use crate::util::{self, run_tool};
use crate::{CloneNetwork, Journal, Result, VmInfo};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, serde::Serialize)]
pub struct BootTest {
    pub booted: bool,
    pub seconds: f64,
    pub heartbeat: String,
    pub console_tail: String,
    pub reason: Option<String>,
}

fn tail(path: &Path, lines: usize) -> String {
    let text = String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).replace('\r', "");
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl QemuBackend {
    /// Boots `images` (disk name → raw image, left unmodified: the VM writes
    /// into throwaway overlays) with `vm`'s command line on `net`, and waits
    /// for `heartbeat` on the serial console. The VM is destroyed after.
    #[allow(clippy::too_many_arguments)]
    pub fn boot_test(
        &self,
        vm: &VmInfo,
        images: &BTreeMap<String, PathBuf>,
        net: &CloneNetwork,
        name: &str,
        work_dir: &Path,
        heartbeat: &str,
        timeout: Duration,
        journal: &mut dyn Journal,
    ) -> Result<BootTest> {
        let qv = qemu_vm(vm)?;
        let mut overlays = BTreeMap::new();
        for (disk, image) in images {
            let overlay = work_dir.join(format!("boot-{}.qcow2", disk.replace('/', "_")));
            journal.will_create(
                &SharedResource::File {
                    path: overlay.clone(),
                }
                .into(),
            )?;
            let mut c = Command::new("qemu-img");
            c.args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(image)
                .arg(&overlay);
            run_tool(c)?;
            overlays.insert(disk.clone(), overlay.display().to_string());
        }
        let qmp_path = work_dir.join("boot.qmp");
        let console = work_dir.join("boot-console.log");
        let cmd = cmdline::clone_command(
            &qv.options,
            &cmdline::CloneSpec {
                name,
                uuid: &util::random_uuid(),
                qmp_socket: &qmp_path.display().to_string(),
                pidfile: &work_dir.join("boot.pid").display().to_string(),
                console_log: &console.display().to_string(),
                disk_overlays: &overlays,
                tap_prefix: &net.tap_prefix,
                incoming: false,
                agent_socket: None,
            },
        )?;
        let log = work_dir.join("boot-qemu.log");
        let (mut child, _, _) =
            super::spawn_journaled(qv, &cmd, net, name, &qmp_path, &log, journal)?;
        let result = (|| {
            let mut q = Qmp::connect_retry(&qmp_path, self.clone_start_timeout, &mut || {
                matches!(child.try_wait(), Ok(None))
            })?;
            for t in &cmd.taps {
                network_isolation::attach_port(&net.namespace, &net.bridge, t)?;
            }
            // Same rule as for clones: it runs only on a verified network.
            network_isolation::verify(&net.namespace, &net.bridge, &cmd.taps)?;
            let start = Instant::now();
            super::cont(&mut q)?;
            loop {
                let text = String::from_utf8_lossy(&std::fs::read(&console).unwrap_or_default())
                    .into_owned();
                if text.contains(heartbeat) {
                    return Ok(BootTest {
                        booted: true,
                        seconds: start.elapsed().as_secs_f64(),
                        heartbeat: heartbeat.to_string(),
                        console_tail: tail(&console, 15),
                        reason: None,
                    });
                }
                let why = if start.elapsed() > timeout {
                    Some(format!(
                        "no heartbeat {heartbeat:?} on the console within {} s",
                        timeout.as_secs()
                    ))
                } else if !matches!(child.try_wait(), Ok(None)) {
                    Some("the VM stopped before its heartbeat".to_string())
                } else {
                    None
                };
                if let Some(reason) = why {
                    return Ok(BootTest {
                        booted: false,
                        seconds: start.elapsed().as_secs_f64(),
                        heartbeat: heartbeat.to_string(),
                        console_tail: tail(&console, 15),
                        reason: Some(reason),
                    });
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })();
        let _ = child.kill();
        let _ = child.wait();
        if let Ok(mut q) = Qmp::connect(&qmp_path) {
            let _ = q.execute("quit", json!({}));
        }
        result
    }
}
