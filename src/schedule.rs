//! Runs many VMs' backups within the host's limits: at most `max_parallel` at
//! once, and a clone starts only when the memory budget and the host's
//! available memory both have room for it. Higher priority first; a VM that
//! cannot fit waits (bounded), then is skipped with the reason. The host is
//! never pushed into OOM by coldclone's clones.

use crate::config::{Config, Vm};
use crate::pipeline::{backup_vm, RunContext};
use crate::report::{RunStatus, VmReport};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// QEMU's own memory beside the guest's RAM, per clone.
pub const CLONE_OVERHEAD_BYTES: u64 = 64 << 20;

pub fn mem_available_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The limits of one run, resolved.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_parallel: usize,
    pub budget_bytes: u64,
    pub reserve_bytes: u64,
    pub wait: Duration,
}

impl Limits {
    pub fn from_config(cfg: &Config) -> Limits {
        let reserve_bytes = cfg.run.memory_reserve_mib.unwrap_or(1024) << 20;
        let budget_bytes = match cfg.run.memory_budget_mib {
            Some(m) => m << 20,
            None => mem_available_bytes()
                .unwrap_or(0)
                .saturating_sub(reserve_bytes),
        };
        Limits {
            max_parallel: cfg.run.max_parallel.unwrap_or(1).max(1),
            budget_bytes,
            reserve_bytes,
            wait: Duration::from_secs(cfg.run.wait_for_memory_secs.unwrap_or(3600)),
        }
    }
}

/// What a VM's clone will need: its memory (or its balloon target), plus QEMU's overhead.
pub fn clone_need_bytes(vm: &Vm) -> u64 {
    let loc = &vm.locator;
    let backend = coldclone_backends::backend_for(loc);
    // XAPI clones run on the pool's host, not in this machine's memory.
    if !backend.clone_uses_local_memory() {
        return 0;
    }
    // An unreachable VM fails fast in the pipeline; it needs no room.
    let Ok(info) = backend.inspect(loc) else {
        return 0;
    };
    let guest = match &vm.policy.balloon {
        Some(b) => b
            .target_bytes(info.memory_bytes)
            .unwrap_or(info.memory_bytes),
        None => info.memory_bytes,
    };
    guest + CLONE_OVERHEAD_BYTES
}

fn skipped(vm: &Vm, reason: String) -> VmReport {
    let mut r = VmReport::new(&vm.name, "-");
    r.status = RunStatus::Skipped;
    r.error = Some(reason);
    let now = crate::journal::now();
    r.started_at = now;
    r.finished_at = now;
    r
}

/// Backs up `vms`; `on_report` sees each report as it is made.
pub fn run_all(
    ctx: &RunContext,
    vms: Vec<&Vm>,
    limits: Limits,
    on_report: &mut dyn FnMut(&VmReport),
) -> Vec<VmReport> {
    let mut pending: Vec<(usize, &Vm, u64)> = vms
        .into_iter()
        .enumerate()
        .map(|(i, vm)| (i, vm, clone_need_bytes(vm)))
        .collect();
    // Higher priority first; the config's order among equals.
    pending.sort_by_key(|(i, vm, _)| (-vm.policy.priority, *i));
    let mut reports = Vec::new();
    let start = Instant::now();
    std::thread::scope(|scope| {
        let (done_tx, done_rx) = mpsc::channel::<(u64, VmReport)>();
        let mut running = 0usize;
        let mut used = 0u64;
        while !pending.is_empty() || running > 0 {
            let mut i = 0;
            while i < pending.len() {
                let (_, vm, need) = pending[i];
                if need > limits.budget_bytes {
                    let r = skipped(
                        vm,
                        format!(
                            "its clone needs {} MiB, more than the whole memory budget of {} MiB (raise run.memory_budget_mib, or set a balloon policy)",
                            need >> 20,
                            limits.budget_bytes >> 20
                        ),
                    );
                    on_report(&r);
                    reports.push(r);
                    pending.remove(i);
                    continue;
                }
                let host_room = mem_available_bytes()
                    .map(|a| a.saturating_sub(limits.reserve_bytes) >= need)
                    .unwrap_or(true);
                if running < limits.max_parallel && used + need <= limits.budget_bytes && host_room
                {
                    pending.remove(i);
                    running += 1;
                    used += need;
                    tracing::info!(vm = %vm.name, need_mib = need >> 20, used_mib = used >> 20, "starting");
                    let tx = done_tx.clone();
                    scope.spawn(move || {
                        let mut r = backup_vm(ctx, vm);
                        r.clone_memory_mib = Some(need >> 20);
                        let _ = tx.send((need, r));
                    });
                    continue;
                }
                i += 1;
            }
            if running == 0 && !pending.is_empty() && start.elapsed() > limits.wait {
                for (_, vm, need) in pending.drain(..) {
                    let r = skipped(
                        vm,
                        format!(
                            "the host had no room for its clone ({} MiB) within {} s",
                            need >> 20,
                            limits.wait.as_secs()
                        ),
                    );
                    on_report(&r);
                    reports.push(r);
                }
                break;
            }
            // Wait for a backup to end, or re-check the host's memory each second.
            if let Ok((need, r)) = done_rx.recv_timeout(Duration::from_secs(1)) {
                running -= 1;
                used -= need;
                on_report(&r);
                reports.push(r);
            }
        }
    });
    reports
}
