//! Secrets that arrive in the environment (the repository password, XAPI and S3 keys).
//!
//! coldclone runs many children (the clone's QEMU, qemu-img, xl, e2fsck, the audit probe);
//! none of them needs a secret, and each would inherit every variable of ours. So the
//! binary takes the secrets out of its own environment before it starts anything, and the
//! code that needs one asks here.

use std::collections::HashMap;
use std::sync::OnceLock;

/// Every variable coldclone treats as a secret.
pub const SECRET_VARIABLES: &[&str] = &[
    "COLDCLONE_PASSWORD",
    "COLDCLONE_XAPI_PASSWORD",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
];

static TAKEN: OnceLock<HashMap<&'static str, String>> = OnceLock::new();

/// Moves the secret variables out of the process environment into memory. Call it first
/// thing in `main`, while the process has one thread (changing the environment while
/// another thread reads it is undefined behaviour in glibc).
pub fn take_from_environment() {
    let mut taken = HashMap::new();
    for &name in SECRET_VARIABLES {
        if let Some(v) = std::env::var_os(name) {
            if let Ok(s) = v.into_string() {
                taken.insert(name, s);
            }
            std::env::remove_var(name);
        }
    }
    let _ = TAKEN.set(taken);
}

/// A variable's value: from what `take_from_environment` took, else (a library user that
/// never called it) from the environment.
pub fn var(name: &str) -> Option<String> {
    match TAKEN.get() {
        Some(taken) if SECRET_VARIABLES.contains(&name) => taken.get(name).cloned(),
        _ => std::env::var(name).ok(),
    }
}
