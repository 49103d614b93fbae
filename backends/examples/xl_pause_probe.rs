//! The original's pause as the hypervisor sees it, for benches/xl_pause.sh (run in
//! the Xen lab's dom0): polls domain DOMID's XEN_DOMINF_* flags through libxenctrl
//! (`xc_domain_getinfolist`, one hypercall per sample, a 0.5 ms sleep between two)
//! until the file STOPFILE exists, then prints key=value lines:
//! pause_ms (first sample seen stopped -> first seen running, summed), resolution_ms
//! (the largest gap between two samples), samples, windows, open_at_end.
//!
//!     xl_pause_probe DOMID STOPFILE

use coldclone_backends::xl::live::PauseMonitor;
use std::path::Path;
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(domid), Some(stop)) = (args.get(1).and_then(|d| d.parse::<u32>().ok()), args.get(2))
    else {
        eprintln!("usage: xl_pause_probe DOMID STOPFILE");
        std::process::exit(2);
    };
    let m = match PauseMonitor::start(domid) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("xl_pause_probe: {e}");
            std::process::exit(1);
        }
    };
    // Ready: the caller waits for this line before it starts what it measures.
    println!("ready=1");
    while !Path::new(stop).exists() {
        std::thread::sleep(Duration::from_millis(50));
    }
    match m.finish() {
        Ok(r) => {
            println!("pause_ms={:.1}", r.pause_ms);
            println!("resolution_ms={:.2}", r.resolution_ms);
            println!("samples={}", r.samples);
            println!("windows={}", r.windows);
            println!("open_at_end={}", u8::from(r.open_at_end));
        }
        Err(e) => {
            eprintln!("xl_pause_probe: {e}");
            std::process::exit(1);
        }
    }
}
