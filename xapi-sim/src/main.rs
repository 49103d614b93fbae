//! `xapi-sim`: runs the XAPI simulator with one or more running VMs, for
//! trying coldclone's XAPI backend by hand.
//!
//! xapi-sim [--listen 127.0.0.1:8080] [--data DIR] [--user root:password]
//!          [--vm NAME:DISK_MIB[,DISK_MIB..][:hvm]]...

use std::path::PathBuf;

fn main() {
    let mut listen = "127.0.0.1:8080".to_string();
    let mut data = std::env::temp_dir().join("xapi-sim");
    let mut user = ("root".to_string(), "password".to_string());
    let mut vms = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--listen" => listen = val(),
            "--data" => data = PathBuf::from(val()),
            "--user" => {
                let v = val();
                let (u, p) = v
                    .split_once(':')
                    .unwrap_or_else(|| usage("--user USER:PASSWORD"));
                user = (u.into(), p.into());
            }
            "--vm" => vms.push(val()),
            _ => usage(&format!("unknown argument {a}")),
        }
    }
    if vms.is_empty() {
        vms.push("vm1:16".into());
    }
    let sim = xapi_sim::Sim::start_on(&listen, &data)
        .unwrap_or_else(|e| usage(&format!("cannot listen on {listen}: {e}")));
    sim.add_user(&user.0, &user.1);
    for v in &vms {
        let mut parts = v.split(':');
        let name = parts.next().unwrap_or("vm");
        let disks: Vec<u64> = parts
            .next()
            .unwrap_or("16")
            .split(',')
            .map(|d| {
                d.parse::<u64>()
                    .unwrap_or_else(|_| usage("disk sizes are MiB"))
                    << 20
            })
            .collect();
        let mut spec = xapi_sim::VmSpec::new(name, &disks);
        if parts.next() == Some("hvm") {
            spec.pv_drivers = false;
        }
        match sim.add_vm(&spec) {
            Ok((_, uuid)) => println!("VM {name} uuid {uuid}"),
            Err(e) => usage(&format!("cannot create VM {name}: {e}")),
        }
    }
    println!(
        "XAPI simulator listening on {} (JSON-RPC at /jsonrpc)",
        sim.url
    );
    loop {
        std::thread::park();
    }
}

fn usage(msg: &str) -> ! {
    eprintln!("xapi-sim: {msg}\nusage: xapi-sim [--listen ADDR] [--data DIR] [--user USER:PASSWORD] [--vm NAME:MIB[,MIB..][:hvm]]...");
    std::process::exit(2)
}
