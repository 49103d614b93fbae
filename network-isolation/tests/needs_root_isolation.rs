//! Real bridges, taps and veths in a namespace made by the test. Needs root.

use network_isolation::*;
use std::process::Command;

fn sh(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

struct Ns(String);
impl Drop for Ns {
    fn drop(&mut self) {
        let _ = delete_namespace(&self.0);
    }
}

/// Root and iproute2, through coldclone-testkit: in CI a missing one fails the
/// test; elsewhere it is recorded as skipped, never passed.
fn root() -> bool {
    coldclone_testkit::require_root_and_tools("network namespaces", &["ip"])
}

fn problems(e: IsolationError) -> Vec<String> {
    match e {
        IsolationError::NotIsolated { problems, .. } => problems,
        other => panic!("expected a failed verification, got {other}"),
    }
}

#[test]
fn needs_root_a_new_bridge_verifies_and_every_kind_of_leak_is_caught() {
    if !root() {
        return;
    }
    let name = format!("nit{}", std::process::id());
    let _ns = Ns(name.clone());
    assert!(create_namespace(&name).unwrap());
    assert!(
        !create_namespace(&name).unwrap(),
        "a second create reports that it existed"
    );
    let ns = Namespace::named(&name);
    create_bridge(&ns, "isobr").unwrap();
    assert!(sh(&format!("ip -n {name} tuntap add mode tap name t0")));
    attach_port(&ns, "isobr", "t0").unwrap();
    let v =
        verify(&ns, "isobr", &["t0".to_string()]).expect("a fresh bridge with our tap verifies");
    assert_eq!(v.ports, vec!["t0".to_string()]);
    // No IPv6 link-local address can appear later either: the kernel was told
    // not to make one (addrgenmode none), and the bridge has no address now.
    let details = Command::new("ip")
        .args(["-n", &name, "-d", "-j", "link", "show", "dev", "isobr"])
        .output()
        .expect("ip link show");
    let details = String::from_utf8_lossy(&details.stdout);
    assert!(
        details.contains("\"inet6_addr_gen_mode\":\"none\""),
        "the bridge would get an IPv6 link-local address: {details}"
    );
    let addrs = Command::new("ip")
        .args(["-n", &name, "-o", "addr", "show", "dev", "isobr"])
        .output()
        .expect("ip addr show");
    assert!(
        addrs.status.success() && addrs.stdout.is_empty(),
        "the new bridge has an address: {}",
        String::from_utf8_lossy(&addrs.stdout)
    );

    // A tap we did not expect.
    assert!(sh(&format!("ip -n {name} tuntap add mode tap name stranger && ip -n {name} link set stranger master isobr")));
    let p = problems(verify(&ns, "isobr", &["t0".to_string()]).unwrap_err());
    assert!(
        p.iter().any(|x| x.contains("unexpected port stranger")),
        "{p:?}"
    );
    assert!(sh(&format!("ip -n {name} link del stranger")));

    // An uplink disguised as an allowed name: a veth is not a tap.
    assert!(sh(&format!("ip -n {name} link add up0 type veth peer name up1 && ip -n {name} link set up0 master isobr")));
    let p = problems(verify(&ns, "isobr", &["t0".to_string(), "up0".to_string()]).unwrap_err());
    assert!(p.iter().any(|x| x.contains("up0 is not a tap")), "{p:?}");
    assert!(sh(&format!("ip -n {name} link del up0")));

    // An address on the bridge.
    assert!(sh(&format!("ip -n {name} addr add 10.99.0.1/24 dev isobr")));
    let p = problems(verify(&ns, "isobr", &["t0".to_string()]).unwrap_err());
    assert!(p.iter().any(|x| x.contains("IP address")), "{p:?}");
    assert!(sh(&format!("ip -n {name} addr flush dev isobr")));

    // A macvlan stacked on the bridge (a VLAN would be the same; this kernel may lack 8021q).
    assert!(sh(&format!(
        "ip -n {name} link add mv5 link isobr type macvlan mode bridge"
    )));
    let p = problems(verify(&ns, "isobr", &["t0".to_string()]).unwrap_err());
    assert!(p.iter().any(|x| x.contains("stacked on isobr")), "{p:?}");
    assert!(sh(&format!("ip -n {name} link del mv5")));

    // Forwarding switched on.
    assert!(sh(&format!(
        "ip netns exec {name} sh -c 'echo 1 > /proc/sys/net/ipv4/conf/isobr/forwarding'"
    )));
    let p = problems(verify(&ns, "isobr", &["t0".to_string()]).unwrap_err());
    assert!(p.iter().any(|x| x.contains("forwarding")), "{p:?}");
    assert!(sh(&format!(
        "ip netns exec {name} sh -c 'echo 0 > /proc/sys/net/ipv4/conf/isobr/forwarding'"
    )));

    // Not a bridge at all, or missing.
    let p = problems(verify(&ns, "t0", &[]).unwrap_err());
    assert!(p.iter().any(|x| x.contains("not a bridge")), "{p:?}");
    delete_link(&ns, "isobr").unwrap();
    assert!(!link_exists(&ns, "isobr").unwrap());
    let p = problems(verify(&ns, "isobr", &[]).unwrap_err());
    assert!(p.iter().any(|x| x.contains("does not exist")), "{p:?}");
    delete_link(&ns, "isobr").expect("deleting what is gone is fine");
}

#[test]
fn needs_root_a_missing_namespace_is_named() {
    if !root() {
        return;
    }
    let ns = Namespace::named("coldclone-no-such-ns");
    match verify(&ns, "x", &[]) {
        Err(IsolationError::NoSuchNamespace(n)) => assert_eq!(n, "coldclone-no-such-ns"),
        other => panic!("{other:?}"),
    }
    assert!(create_bridge(&ns, "x").is_err());
}
