//! libxenlight (libxl) and libxenctrl, loaded at run time: the xl backend's only
//! `unsafe`. Loaded with dlopen (the `libloading` crate, ISC) rather than linked, so
//! that one coldclone binary still builds without Xen's headers and runs on hosts
//! without libxenlight (the live checkpoint is then refused with the loader's reason
//! and `xl save -p` is used). The bindings are written by hand for the few calls used,
//! from Xen 4.17's public headers (RELEASE-4.17.x):
//!
//! - tools/include/libxl.h: `libxl_ctx_alloc(libxl_ctx **, int version /* LIBXL_VERSION
//!   = 0 */, unsigned flags, xentoollog_logger *)`, `libxl_ctx_free`,
//!   `libxl_domain_suspend(ctx, uint32_t domid, int fd, int flags /* LIBXL_SUSPEND_LIVE
//!   = 2 */, const libxl_asyncop_how *)`, `libxl_domain_resume(ctx, uint32_t domid, int
//!   suspend_cancel, const libxl_asyncop_how *)`. A NULL `ao_how` makes an
//!   asynchronous operation synchronous (libxl_internal.h, AO_CREATE / `libxl__ao_inprogress`
//!   waits for completion): the call returns when the operation is done.
//! - tools/include/libxl_event.h: `libxl_childproc_setmode(ctx, const
//!   libxl_childproc_hooks *, void *user)`; `libxl_childproc_hooks` is `{ enum
//!   libxl_sigchld_owner chldowner; pid_t (*fork_replacement)(void *); int
//!   (*reaped_callback)(pid_t, int, void *); }`. We use
//!   `libxl_sigchld_owner_libxl_always_selective_reap` (3): libxl reaps only its own
//!   children (the save helper), coldclone keeps reaping its own with waitpid. The
//!   default mode would reap *every* child of the process while libxl works.
//! - tools/include/xentoollog.h: `xtl_createlogger_stdiostream(FILE *, xentoollog_level,
//!   unsigned flags)`, `xtl_logger_destroy`; levels XTL_NONE=0 … XTL_WARN=7.
//! - tools/include/xenctrl.h: `xc_interface_open(logger, dombuild_logger, flags)`,
//!   `xc_interface_close`, `xc_domain_getinfolist(xch, first_domain, max_domains,
//!   xc_domaininfo_t *)`; xen/include/public/domctl.h: `struct xen_domctl_getdomaininfo`
//!   starts `domid_t domain; uint16_t pad1; uint32_t flags;` (XEN_DOMINF_* bits,
//!   shutdown code in bits 16..24), ~120 bytes in all.
//!
//! Invariants kept here: every function pointer is used only while the `Library` it
//! came from is alive (both live in the same struct, and `Drop` frees the handles
//! before the libraries unload); a libxl ctx and an xc handle are used from the thread
//! that made them only (the raw pointers make the structs neither `Send` nor `Sync`);
//! the fd handed to libxl stays open for the whole synchronous call (borrowed).

use libloading::Library;
use std::ffi::{c_int, c_uint, c_void, CString};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

/// The libxenlight sonames whose signatures were checked against the headers above.
const LIBXL_SONAMES: &[&str] = &["libxenlight.so.4.17"];
const LIBXTL_SONAMES: &[&str] = &["libxentoollog.so.1"];
const LIBXC_SONAMES: &[&str] = &["libxenctrl.so.4.17"];

const LIBXL_VERSION: c_int = 0;
pub const LIBXL_SUSPEND_LIVE: c_int = 2;
const XTL_WARN: c_int = 7;
const XTL_STDIOSTREAM_HIDE_PROGRESS: c_uint = 0o004;
const SIGCHLD_OWNER_LIBXL_ALWAYS_SELECTIVE_REAP: c_int = 3;

/// libxl_event.h's `libxl_childproc_hooks`.
#[repr(C)]
struct ChildprocHooks {
    chldowner: c_int,
    fork_replacement: Option<unsafe extern "C" fn(*mut c_void) -> libc::pid_t>,
    reaped_callback: Option<unsafe extern "C" fn(libc::pid_t, c_int, *mut c_void) -> c_int>,
}

/// "The value *hooks is not copied and must outlast the libxl_ctx": a static does.
static HOOKS: ChildprocHooks = ChildprocHooks {
    chldowner: SIGCHLD_OWNER_LIBXL_ALWAYS_SELECTIVE_REAP,
    fork_replacement: None,
    reaped_callback: None,
};

type CtxAllocFn = unsafe extern "C" fn(*mut *mut c_void, c_int, c_uint, *mut c_void) -> c_int;
type CtxFreeFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type SetmodeFn = unsafe extern "C" fn(*mut c_void, *const ChildprocHooks, *mut c_void);
type SuspendFn = unsafe extern "C" fn(*mut c_void, u32, c_int, c_int, *const c_void) -> c_int;
type ResumeFn = unsafe extern "C" fn(*mut c_void, u32, c_int, *const c_void) -> c_int;
type LoggerNewFn = unsafe extern "C" fn(*mut libc::FILE, c_int, c_uint) -> *mut c_void;
type LoggerDestroyFn = unsafe extern "C" fn(*mut c_void);
type XcOpenFn = unsafe extern "C" fn(*mut c_void, *mut c_void, c_uint) -> *mut c_void;
type XcCloseFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type XcGetinfolistFn = unsafe extern "C" fn(*mut c_void, u32, c_uint, *mut c_void) -> c_int;

fn load(sonames: &[&str]) -> Result<Library, String> {
    let mut errs = Vec::new();
    for name in sonames {
        // SAFETY: loading runs the library's initialisers; these are Xen's own
        // toolstack libraries, which xl itself loads the same way.
        match unsafe { Library::new(*name) } {
            Ok(l) => return Ok(l),
            Err(e) => errs.push(e.to_string()),
        }
    }
    Err(errs.join("; "))
}

/// Copies a function pointer out of `lib`. SAFETY (caller): `T` is the C signature of
/// `name` as the headers above declare it, and the pointer is not used after `lib` is
/// dropped.
unsafe fn sym<T: Copy>(lib: &Library, name: &str) -> Result<T, String> {
    let s = unsafe { lib.get::<T>(name.as_bytes()) }.map_err(|e| format!("{name}: {e}"))?;
    Ok(*s)
}

/// One libxl context, with a logger writing to a file (read back for error messages).
pub struct Libxl {
    ctx: *mut c_void,
    logger: *mut c_void,
    log_file: *mut libc::FILE,
    /// None: the log goes to a dup of stderr.
    log_path: Option<PathBuf>,
    ctx_free: CtxFreeFn,
    suspend: SuspendFn,
    resume: ResumeFn,
    logger_destroy: LoggerDestroyFn,
    // Dropped after `Drop::drop` freed ctx and logger (fields drop after it).
    _xl: Library,
    _xtl: Library,
}

impl Libxl {
    /// Loads libxenlight and allocates a context logging warnings and errors to
    /// `log_path` (None: stderr). Fails with a reason when the library is absent or
    /// refuses.
    pub fn open(log_path: Option<&Path>) -> Result<Libxl, String> {
        let xtl = load(LIBXTL_SONAMES)?;
        let xl = load(LIBXL_SONAMES)?;
        // SAFETY: the types are the headers' signatures (module doc); the libraries
        // are moved into the returned struct, which outlives every use.
        let (ctx_alloc, ctx_free, setmode, suspend, resume, logger_new, logger_destroy) = unsafe {
            (
                sym::<CtxAllocFn>(&xl, "libxl_ctx_alloc")?,
                sym::<CtxFreeFn>(&xl, "libxl_ctx_free")?,
                sym::<SetmodeFn>(&xl, "libxl_childproc_setmode")?,
                sym::<SuspendFn>(&xl, "libxl_domain_suspend")?,
                sym::<ResumeFn>(&xl, "libxl_domain_resume")?,
                sym::<LoggerNewFn>(&xtl, "xtl_createlogger_stdiostream")?,
                sym::<LoggerDestroyFn>(&xtl, "xtl_logger_destroy")?,
            )
        };
        let log_file = match log_path {
            Some(p) => {
                let path = CString::new(p.as_os_str().as_encoded_bytes())
                    .map_err(|_| format!("{}: a NUL in the path", p.display()))?;
                // SAFETY: both strings are NUL-terminated; NULL is checked below.
                unsafe { libc::fopen(path.as_ptr(), c"w".as_ptr()) }
            }
            None => {
                // SAFETY: dup of our own stderr; fdopen takes the new fd (closed by
                // fclose in Drop); NULL is checked below.
                unsafe {
                    let fd = libc::dup(2);
                    if fd < 0 {
                        std::ptr::null_mut()
                    } else {
                        libc::fdopen(fd, c"w".as_ptr())
                    }
                }
            }
        };
        if log_file.is_null() {
            return Err(format!(
                "open libxl's log {}: {}",
                log_path.map_or("(stderr)".into(), |p| p.display().to_string()),
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: log_file is an open FILE; the logger does not close it (xentoollog.h).
        let logger = unsafe { logger_new(log_file, XTL_WARN, XTL_STDIOSTREAM_HIDE_PROGRESS) };
        if logger.is_null() {
            // SAFETY: opened above, not used after.
            unsafe { libc::fclose(log_file) };
            return Err("xtl_createlogger_stdiostream failed".into());
        }
        let mut ctx: *mut c_void = std::ptr::null_mut();
        // SAFETY: ctx is an out-pointer; logger is valid and outlives ctx (Drop order).
        let rc = unsafe { ctx_alloc(&mut ctx, LIBXL_VERSION, 0, logger) };
        let me = Libxl {
            ctx,
            logger,
            log_file,
            log_path: log_path.map(Path::to_path_buf),
            ctx_free,
            suspend,
            resume,
            logger_destroy,
            _xl: xl,
            _xtl: xtl,
        };
        if rc != 0 || me.ctx.is_null() {
            return Err(format!(
                "libxl_ctx_alloc failed (error {rc}){}",
                me.log_tail()
            ));
        }
        // SAFETY: called right after allocation, before libxl has any child; HOOKS is
        // static, so it outlasts the ctx as libxl_event.h requires.
        unsafe { setmode(me.ctx, &HOOKS, std::ptr::null_mut()) };
        Ok(me)
    }

    /// What libxl logged (warnings and errors), for an error message.
    pub fn log_tail(&self) -> String {
        self.flush();
        let Some(path) = &self.log_path else {
            return String::new();
        };
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let text = text.trim();
        if text.is_empty() {
            return String::new();
        }
        let start = text.len().saturating_sub(1500);
        let start = (start..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        format!("; libxl said: {}", text[start..].replace('\n', " | "))
    }

    /// `libxl_domain_suspend(ctx, domid, fd, LIBXL_SUSPEND_LIVE, NULL)`: pre-copy rounds
    /// while the domain runs, then it is suspended for the last round. On success the
    /// domain is left suspended (shut down, reason suspend) until [`Self::resume_cancel`].
    pub fn suspend_live(&mut self, domid: u32, fd: BorrowedFd<'_>) -> Result<(), c_int> {
        // SAFETY: ctx is valid; fd is open for the whole (synchronous) call.
        let rc = unsafe {
            (self.suspend)(
                self.ctx,
                domid,
                fd.as_raw_fd(),
                LIBXL_SUSPEND_LIVE,
                std::ptr::null(),
            )
        };
        self.flush();
        if rc == 0 {
            Ok(())
        } else {
            Err(rc)
        }
    }

    /// `libxl_domain_resume(ctx, domid, 1 /* suspend_cancel */, NULL)`: the guest
    /// returns from its suspend hypercall as if the suspend was cancelled and goes on
    /// in the same domain (what `xl save -c` does).
    pub fn resume_cancel(&mut self, domid: u32) -> Result<(), c_int> {
        // SAFETY: ctx is valid.
        let rc = unsafe { (self.resume)(self.ctx, domid, 1, std::ptr::null()) };
        self.flush();
        if rc == 0 {
            Ok(())
        } else {
            Err(rc)
        }
    }

    fn flush(&self) {
        // SAFETY: log_file is open until Drop.
        unsafe { libc::fflush(self.log_file) };
    }
}

impl Drop for Libxl {
    fn drop(&mut self) {
        // SAFETY: each handle was made by these libraries, is freed once, and the
        // libraries unload only after this (field drop order).
        unsafe {
            if !self.ctx.is_null() {
                (self.ctx_free)(self.ctx);
            }
            (self.logger_destroy)(self.logger);
            libc::fclose(self.log_file);
        }
    }
}

/// A domain's state as the hypervisor has it (XEN_DOMINF_* flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainFlags(pub u32);

impl DomainFlags {
    pub fn dying(self) -> bool {
        self.0 & 1 != 0
    }
    pub fn shutdown(self) -> bool {
        self.0 & (1 << 2) != 0
    }
    pub fn paused(self) -> bool {
        self.0 & (1 << 3) != 0
    }
    /// Not running guest code: paused, shut down or dying.
    pub fn stopped(self) -> bool {
        self.dying() || self.shutdown() || self.paused()
    }
}

/// A libxenctrl handle, for reading domain state straight from the hypervisor.
pub struct Xc {
    xch: *mut c_void,
    close: XcCloseFn,
    getinfolist: XcGetinfolistFn,
    _lib: Library,
}

impl Xc {
    pub fn open() -> Result<Xc, String> {
        let lib = load(LIBXC_SONAMES)?;
        // SAFETY: the headers' signatures; lib moves into the struct with them.
        let (open, close, getinfolist) = unsafe {
            (
                sym::<XcOpenFn>(&lib, "xc_interface_open")?,
                sym::<XcCloseFn>(&lib, "xc_interface_close")?,
                sym::<XcGetinfolistFn>(&lib, "xc_domain_getinfolist")?,
            )
        };
        // SAFETY: NULL loggers are allowed (xenctrl.h: a default stderr logger).
        let xch = unsafe { open(std::ptr::null_mut(), std::ptr::null_mut(), 0) };
        if xch.is_null() {
            return Err(format!(
                "xc_interface_open failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Xc {
            xch,
            close,
            getinfolist,
            _lib: lib,
        })
    }

    /// The flags of domain `domid`, or None when there is no such domain.
    pub fn flags(&self, domid: u32) -> Result<Option<DomainFlags>, String> {
        // Room for one xc_domaininfo_t (~120 bytes in 4.17), 8-byte aligned.
        let mut buf = [0u64; 64];
        // SAFETY: xch is valid; at most one entry is written into buf, which is larger
        // than sizeof(xc_domaininfo_t).
        let n = unsafe { (self.getinfolist)(self.xch, domid, 1, buf.as_mut_ptr().cast()) };
        if n < 0 {
            return Err(format!(
                "xc_domain_getinfolist: {}",
                std::io::Error::last_os_error()
            ));
        }
        // The first entry is the first domain with an id >= domid. Little-endian (x86,
        // the only architecture the xl backend is built for there): domid in bytes
        // 0-1, flags in bytes 4-7.
        let id = (buf[0] & 0xffff) as u32;
        let flags = (buf[0] >> 32) as u32;
        Ok((n == 1 && id == domid).then_some(DomainFlags(flags)))
    }
}

impl Drop for Xc {
    fn drop(&mut self) {
        // SAFETY: opened by this library, closed once, before it unloads.
        unsafe { (self.close)(self.xch) };
    }
}
