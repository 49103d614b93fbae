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

/// What a VM's clone needs on a pool of hosts (XAPI: the clone runs there):
/// the pool, the clone's memory (its balloon target, else the VM's memory),
/// and what the pool has free for one clone now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolNeed {
    pub pool: String,
    pub need: u64,
    pub free: u64,
}

pub fn pool_need(vm: &Vm) -> Option<PoolNeed> {
    let backend = coldclone_backends::backend_for(&vm.locator);
    if backend.clone_uses_local_memory() {
        return None;
    }
    let info = backend.inspect(&vm.locator).ok()?;
    let room = backend.clone_memory_pool(&info).ok()??;
    let need = match &vm.policy.balloon {
        Some(b) => b
            .target_bytes(info.memory_bytes)
            .unwrap_or(info.memory_bytes),
        None => info.memory_bytes,
    };
    Some(PoolNeed {
        pool: room.pool,
        need,
        free: room.free_bytes,
    })
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
    // Clones that run on a pool count against the pool's free memory, as
    // it was before this run's clones (each pool asked once).
    let mut pools: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    let pool_needs: std::collections::BTreeMap<usize, PoolNeed> = pending
        .iter()
        .filter_map(|(i, vm, _)| pool_need(vm).map(|p| (*i, p)))
        .collect();
    for p in pool_needs.values() {
        pools.entry(p.pool.clone()).or_insert((p.free, 0));
    }
    // Higher priority first; the config's order among equals.
    pending.sort_by_key(|(i, vm, _)| (-vm.policy.priority, *i));
    let mut reports = Vec::new();
    let start = Instant::now();
    std::thread::scope(|scope| {
        let (done_tx, done_rx) = mpsc::channel::<(u64, Option<PoolNeed>, VmReport)>();
        let mut running = 0usize;
        let mut used = 0u64;
        while !pending.is_empty() || running > 0 {
            let mut i = 0;
            while i < pending.len() {
                let (idx, vm, need) = pending[i];
                let pool = pool_needs.get(&idx).cloned();
                if let Some(p) = pool.as_ref().filter(|p| p.need > p.free) {
                    let r = skipped(
                        vm,
                        format!(
                            "its clone needs {} MiB on the pool at {}, whose hosts have at most {} MiB free (set a balloon policy, or free memory on the pool)",
                            p.need >> 20,
                            p.pool,
                            p.free >> 20
                        ),
                    );
                    on_report(&r);
                    reports.push(r);
                    pending.remove(i);
                    continue;
                }
                let pool_room = pool.as_ref().is_none_or(|p| {
                    pools
                        .get(&p.pool)
                        .is_some_and(|(free, used)| used + p.need <= *free)
                });
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
                if running < limits.max_parallel
                    && used + need <= limits.budget_bytes
                    && host_room
                    && pool_room
                {
                    pending.remove(i);
                    running += 1;
                    used += need;
                    if let Some(p) = &pool {
                        if let Some(e) = pools.get_mut(&p.pool) {
                            e.1 += p.need;
                        }
                    }
                    tracing::info!(vm = %vm.name, need_mib = need >> 20, used_mib = used >> 20, "starting");
                    let tx = done_tx.clone();
                    scope.spawn(move || {
                        let mut r = backup_vm(ctx, vm);
                        r.clone_memory_mib = Some(pool.as_ref().map_or(need, |p| p.need) >> 20);
                        let _ = tx.send((need, pool, r));
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
            if let Ok((need, pool, r)) = done_rx.recv_timeout(Duration::from_secs(1)) {
                running -= 1;
                used -= need;
                if let Some(p) = pool {
                    if let Some(e) = pools.get_mut(&p.pool) {
                        e.1 = e.1.saturating_sub(p.need);
                    }
                }
                on_report(&r);
                reports.push(r);
            }
        }
    });
    reports
}
