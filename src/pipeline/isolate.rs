//! Step 2: a network with no uplink for the clone: a bridge with no physical
//! port, no address and no forwarding, in the current or a named namespace.

use super::{PipelineError, Run};
use crate::config::IsolationConfig;
use coldclone_backends::shared::SharedResource;
use coldclone_backends::{CloneNetwork, Journal, VmInfo};
use network_isolation::{self as iso, Namespace};

pub fn prepare(
    run: &mut Run,
    vm: &VmInfo,
    cfg: &IsolationConfig,
) -> Result<CloneNetwork, PipelineError> {
    // A hypervisor that owns its networks (XAPI: a network with no PIF) makes its own.
    if let Some(net) = run
        .backend
        .isolated_network(vm, &run.id, &mut run.journal)?
    {
        run.journal.milestone("isolate:bridge-ready")?;
        return Ok(net);
    }
    let net = linux_bridge(&mut run.journal, &run.id, cfg)?;
    run.journal.milestone("isolate:bridge-ready")?;
    Ok(net)
}

/// The Linux bridge of `cfg` (`isolation.bridge`, reused) or one made for
/// the run, in `isolation.netns` (made if missing); all it makes journaled.
/// The audit's boot test uses it too.
pub fn linux_bridge(
    journal: &mut dyn Journal,
    run_id: &str,
    cfg: &IsolationConfig,
) -> Result<CloneNetwork, PipelineError> {
    let short = &run_id[run_id.len().saturating_sub(6)..];
    let namespace = match &cfg.netns {
        Some(ns) => {
            if !iso::namespace_exists(ns) {
                journal.will_create(&SharedResource::Namespace { name: ns.clone() }.into())?;
                iso::create_namespace(ns)?;
            }
            Namespace::named(ns)
        }
        None => Namespace::current(),
    };
    let bridge = match &cfg.bridge {
        // A bridge the operator made is reused, never removed; it is verified like ours.
        Some(b) => {
            if !iso::link_exists(&namespace, b)? {
                return Err(PipelineError::Other(format!(
                    "isolation.bridge {b} does not exist in {}; create it or remove the setting so coldclone makes one per run",
                    namespace.describe()
                )));
            }
            b.clone()
        }
        None => {
            let b = format!("ccbr{short}");
            journal.will_create(
                &SharedResource::Bridge {
                    namespace: namespace.0.clone(),
                    name: b.clone(),
                }
                .into(),
            )?;
            iso::create_bridge(&namespace, &b)?;
            b
        }
    };
    Ok(CloneNetwork {
        namespace,
        bridge,
        tap_prefix: format!("cc{short}t"),
        handle: None,
    })
}

/// The check that must pass before the clone may run.
pub fn verify(net: &CloneNetwork, clone_ports: &[String]) -> Result<iso::Verified, PipelineError> {
    Ok(iso::verify(&net.namespace, &net.bridge, clone_ports)?)
}
