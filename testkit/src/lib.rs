//! Prerequisites of coldclone's tests.
//!
//! A test that cannot run here (no root, a tool missing) must never count as
//! passed. [`require`] decides: in CI (`CI=true`, or `COLDCLONE_REQUIRE_ALL=1`)
//! a missing prerequisite fails the test loudly; elsewhere the test is recorded
//! as skipped, printed on stderr and appended to the file named by
//! `COLDCLONE_SKIP_LOG` (scripts/test.sh sets it and counts its lines in the
//! closing line, so a skip is never hidden among the passes).

use std::io::Write;
use std::process::Command;

/// True when a missing prerequisite must fail the test instead of skipping it.
pub fn strict() -> bool {
    let ci = std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false);
    let forced = std::env::var("COLDCLONE_REQUIRE_ALL")
        .map(|v| v == "1")
        .unwrap_or(false);
    ci || forced
}

/// `true` when `available`; otherwise fails the test (CI) or records a skip and
/// returns `false`, so that the caller returns at once:
/// `if !require(is_root(), "root (network namespaces)") { return; }`
#[track_caller]
pub fn require(available: bool, what: &str) -> bool {
    if available {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string();
    if strict() {
        panic!("prerequisite missing in CI: {what} (test {test}); CI must provide it, see scripts/setup.sh");
    }
    eprintln!("SKIPPED: {test}: needs {what}");
    record_skip(&test, what);
    false
}

/// An opt-in test (documented, too costly for every CI run): runs when the environment
/// variable `var` is `1`; otherwise it is recorded as skipped, in CI too (never counted
/// as passed), and `false` is returned so that the caller returns at once.
#[track_caller]
pub fn opt_in(var: &str, what: &str) -> bool {
    if std::env::var(var).as_deref() == Ok("1") {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string();
    let why = format!("{var}=1 (opt-in: {what})");
    eprintln!("SKIPPED: {test}: needs {why}");
    record_skip(&test, &why);
    false
}

/// Like [`require`] for a list of programs on PATH.
#[track_caller]
pub fn require_tools(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have_tool(t)).collect();
    if missing.is_empty() {
        return true;
    }
    require(
        false,
        &format!(
            "{} installed (the README's test command installs it)",
            missing.join(", ")
        ),
    )
}

/// `require(is_root(), ..)` and `require_tools(..)` in one call.
#[track_caller]
pub fn require_root_and_tools(why_root: &str, tools: &[&str]) -> bool {
    require(is_root(), &format!("root ({why_root})")) && require_tools(tools)
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub fn have_tool(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v '{tool}'"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn record_skip(test: &str, what: &str) {
    let Ok(path) = std::env::var("COLDCLONE_SKIP_LOG") else {
        return;
    };
    // One line per skip; O_APPEND keeps lines whole across test threads and processes.
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{test}\t{}", what.replace('\n', " "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_available_prerequisite_passes_through() {
        assert!(require(true, "nothing"));
    }

    #[test]
    fn a_missing_tool_is_detected() {
        assert!(!have_tool("coldclone-no-such-tool-xyz"));
        assert!(have_tool("sh"));
    }
}
