//! The live checkpoint's safe parts: the xl save-file header written before libxl's
//! stream, and a monitor that measures the original's pause from the hypervisor's
//! side (its XEN_DOMINF_* flags polled through libxenctrl).

use super::libxl::Xc;
use serde_json::Value;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// tools/xl/xl.h `savefileheader_magic` (32 bytes, no terminating NUL).
const XL_MAGIC: &[u8; 32] = b"Xen saved domain, xl format\n \0 \r";
/// tools/xl/xl.h: SAVEFILE_BYTEORDER_VALUE, XL_MANDATORY_FLAG_JSON, _STREAMv2.
const BYTEORDER: u32 = 0x0102_0304;
const FLAG_JSON: u32 = 1;
const FLAG_STREAM_V2: u32 = 2;

/// The header `xl save` writes before libxl's stream (tools/xl/xl_saverestore.c,
/// `save_domain_core_writeconfig`), so that `xl restore` reads our image as its own
/// (tools/xl/xl_vmcontrol.c, `create_domain`: magic, byte order, mandatory flags,
/// then optional data = u32 config length + the config). The config is the domain's
/// libxl JSON (`xl list -l`'s "config", which `printf_info_one_json` generates with
/// the same `libxl_domain_config_gen_json` that `save_domain_core_begin` uses), with
/// c_info.domid 0 as `xl save` without -D writes it, NUL-terminated.
pub fn xl_header(listed: &Value) -> Result<Vec<u8>, String> {
    let mut config = listed
        .get("config")
        .cloned()
        .ok_or("`xl list -l` gave no \"config\" for the domain")?;
    if let Some(d) = config.pointer_mut("/c_info/domid") {
        *d = Value::from(0);
    }
    let mut json = serde_json::to_vec(&config).map_err(|e| e.to_string())?;
    json.push(0);
    let len = u32::try_from(json.len()).map_err(|_| "the domain's config is over 4 GiB")?;
    let mut h = Vec::with_capacity(48 + json.len());
    h.extend_from_slice(XL_MAGIC);
    h.extend_from_slice(&BYTEORDER.to_ne_bytes());
    h.extend_from_slice(&(FLAG_STREAM_V2 | FLAG_JSON).to_ne_bytes());
    h.extend_from_slice(&0u32.to_ne_bytes());
    h.extend_from_slice(&(4 + len).to_ne_bytes());
    h.extend_from_slice(&len.to_ne_bytes());
    h.extend_from_slice(&json);
    Ok(h)
}

/// Writes [`xl_header`] to a new image file and returns it open for libxl.
pub fn create_image(path: &std::path::Path, listed: &Value) -> Result<std::fs::File, String> {
    let header = xl_header(listed)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(&header)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(f)
}

/// The original's pause as the hypervisor showed it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PauseMeasure {
    /// From the first sample that saw it stopped (paused, shut down or dying) to the
    /// first that saw it running again, summed over every such stretch.
    pub pause_ms: f64,
    /// The largest gap between two samples while monitoring: each end of the pause is
    /// known to within it.
    pub resolution_ms: f64,
    pub samples: u64,
    /// Stretches of stopped seen (1 for one pause).
    pub windows: u32,
    /// The domain was still stopped at the last sample.
    pub open_at_end: bool,
}

/// Polls a domain's flags in its own thread until [`PauseMonitor::finish`].
pub struct PauseMonitor {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<PauseMeasure, String>>,
}

/// How often the monitor asks the hypervisor (sleep between two reads).
pub const POLL_INTERVAL: Duration = Duration::from_micros(500);

impl PauseMonitor {
    /// Starts polling `domid`; fails when libxenctrl cannot be loaded or opened.
    pub fn start(domid: u32) -> Result<PauseMonitor, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("xl-pause-monitor".into())
            .spawn(move || {
                // The xc handle is made and used in this thread only.
                let xc = match Xc::open() {
                    Ok(x) => {
                        let _ = ready_tx.send(Ok(()));
                        x
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.clone()));
                        return Err(e);
                    }
                };
                monitor(&xc, domid, &flag)
            })
            .map_err(|e| format!("start the pause monitor: {e}"))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(PauseMonitor { stop, handle }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the pause monitor thread ended at once".into()),
        }
    }

    pub fn finish(self) -> Result<PauseMeasure, String> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .join()
            .map_err(|_| "the pause monitor thread panicked".to_string())?
    }
}

fn monitor(xc: &Xc, domid: u32, stop: &AtomicBool) -> Result<PauseMeasure, String> {
    let mut m = PauseMeasure::default();
    let mut last: Option<Instant> = None;
    let mut stopped_since: Option<Instant> = None;
    let mut total = Duration::ZERO;
    loop {
        let done = stop.load(Ordering::SeqCst);
        let now = Instant::now();
        // A domain that is gone counts as stopped: it runs no guest code either.
        let stopped = xc.flags(domid)?.is_none_or(|f| f.stopped());
        if let Some(l) = last {
            m.resolution_ms = m
                .resolution_ms
                .max(now.duration_since(l).as_secs_f64() * 1e3);
        }
        last = Some(now);
        m.samples += 1;
        match (stopped, stopped_since) {
            (true, None) => {
                stopped_since = Some(now);
                m.windows += 1;
            }
            (false, Some(s)) => {
                total += now.duration_since(s);
                stopped_since = None;
            }
            _ => {}
        }
        if done {
            break;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
    if let (Some(s), Some(l)) = (stopped_since, last) {
        total += l.duration_since(s);
        m.open_at_end = true;
    }
    m.pause_ms = total.as_secs_f64() * 1e3;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_what_xl_restore_reads() {
        let listed =
            serde_json::json!({"domid": 7, "config": {"c_info": {"name": "g1", "domid": 7}}});
        let h = xl_header(&listed).unwrap();
        assert_eq!(&h[..32], XL_MAGIC);
        let u = |o: usize| u32::from_ne_bytes(h[o..o + 4].try_into().unwrap());
        assert_eq!(u(32), BYTEORDER);
        assert_eq!(u(36), 3);
        assert_eq!(u(40), 0);
        let optlen = u(44) as usize;
        assert_eq!(h.len(), 48 + optlen);
        let cfglen = u(48) as usize;
        assert_eq!(optlen, 4 + cfglen);
        assert_eq!(h.last(), Some(&0));
        let cfg: Value = serde_json::from_slice(&h[52..h.len() - 1]).unwrap();
        assert_eq!(cfg["c_info"]["domid"], 0);
        assert_eq!(cfg["c_info"]["name"], "g1");
    }

    #[test]
    fn a_listing_without_config_is_refused() {
        assert!(xl_header(&serde_json::json!({"domid": 1})).is_err());
    }
}
