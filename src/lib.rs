//! coldclone: clean-shutdown-consistent backups of running VMs through an
//! isolated clone. The binary (`main.rs`) is a thin CLI over this library.

pub mod audit;
pub mod commands;
pub mod config;
pub mod journal;
pub mod metrics;
pub mod nbd;
pub mod pipeline;
pub mod progress;
pub mod report;
pub mod schedule;

/// Exit codes (documented in docs/cli.md).
pub mod exit {
    /// Every VM backed up / the command did what it was asked.
    pub const OK: u8 = 0;
    /// At least one VM's backup failed (the others may have succeeded).
    pub const BACKUP_FAILED: u8 = 1;
    /// Bad input: command line, config file, VM name, repository, password.
    pub const BAD_INPUT: u8 = 2;
    /// Another coldclone run holds the lock.
    pub const LOCKED: u8 = 3;
    /// `recover` or `check` found something it could not fix or that is damaged.
    pub const NOT_CLEAN: u8 = 4;
}
