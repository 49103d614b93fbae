//! The coldclone command line.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use coldclone::commands;
use coldclone::config::{Config, DEFAULT_CONFIG};
use coldclone::exit;
use coldclone::journal::RunLock;
use coldclone::report::RunStatus;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "coldclone",
    version,
    about = "Clean-shutdown-consistent backups of running VMs",
    long_about = "coldclone backs up running virtual machines without stopping them: it checkpoints the VM \
(memory + disk snapshot, paused for milliseconds), restores a clone on a network with no uplink, \
asks the clone to shut down cleanly, and archives the clone's stopped disk into a deduplicated, \
compressed, encrypted repository.\n\nExit codes: 0 ok; 1 a backup failed; 2 bad input \
(arguments, config, VM, repository, password); 3 another run holds the lock; 4 recover/check \
found something it could not fix."
)]
struct Cli {
    /// Config file (TOML).
    #[arg(long, short, global = true, env = "COLDCLONE_CONFIG", default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Back up VMs (those named, or all in the config).
    Backup {
        /// VM names from the config; none means all.
        vms: Vec<String>,
        /// Back up every VM in the config.
        #[arg(long)]
        all: bool,
        /// If another run holds the lock, wait for it instead of exiting.
        #[arg(long)]
        wait: bool,
    },
    /// Create the repository named in the config.
    Init,
    /// List the backups in the repository.
    Snapshots {
        /// Only this VM's backups.
        #[arg(long)]
        vm: Option<String>,
    },
    /// Write one disk of a backup to a file or block device.
    Restore {
        /// The VM's name.
        vm: String,
        /// The disk's name (as listed by `snapshots`); without it, `--as` restores the whole VM.
        #[arg(long, required_unless_present = "as_name")]
        disk: Option<String>,
        /// Make a new VM of this name from the backup, with new UUID and MACs and no network
        /// unless asked: QEMU: every disk as qcow2 in `--to` (a folder) and a start script;
        /// XAPI (`--sr`): VDIs and a halted VM on its pool; xl (`--vg`): LVs and a config.
        #[arg(long = "as", conflicts_with = "disk")]
        as_name: Option<String>,
        /// Target file (written sparse) or block device; with `--as`, a folder (with
        /// `--vg`, where the xl config goes; default /etc/xen).
        #[arg(long, required_unless_present_any = ["sr", "vg"])]
        to: Option<PathBuf>,
        /// With `--as`: make the VM on its XAPI pool, its disks as VDIs on this SR
        /// (name label or uuid), halted.
        #[arg(long, requires = "as_name", conflicts_with_all = ["to", "vg"])]
        sr: Option<String>,
        /// With `--as`: make the xl domain's disks as LVs in this volume group, and its
        /// config (not started).
        #[arg(long, requires = "as_name")]
        vg: Option<String>,
        /// With `--sr`: the XAPI network for its NICs (name label or uuid); with `--vg`:
        /// the bridge for its vifs. Without it the new VM has no network.
        #[arg(long, requires = "as_name")]
        network: Option<String>,
        /// A backup (run) id or disk snapshot id; default: the latest.
        #[arg(long)]
        snapshot: Option<String>,
        /// Replace an existing file, or overwrite a block device (opened exclusively: not
        /// while it is mounted or in use). Without it an existing target is refused.
        #[arg(long)]
        force: bool,
        /// With `--disk`: the image format written (qcow2 only to a file).
        #[arg(long, value_enum, default_value_t = commands::restore::Format::Raw, conflicts_with = "as_name")]
        format: commands::restore::Format,
        /// With `--as`: start the new VM at once on qcow2 overlays over the backup served
        /// from the repository, and copy the rest in while it runs (QEMU block-stream);
        /// the command stays until the copy is done.
        #[arg(long, requires = "as_name")]
        instant: bool,
        /// With `--instant`: limit the background copy to this many KiB/s (block-stream's
        /// speed); 0 = unlimited (the default).
        #[arg(long, requires = "instant", default_value_t = 0)]
        stream_rate: u64,
    },
    /// Serve one disk of a backup as a read-only NBD export on a unix socket, read straight
    /// from the repository (nbd+unix:///DISK?socket=PATH).
    Serve {
        /// The VM's name.
        vm: String,
        /// The disk's name (as listed by `snapshots`).
        #[arg(long)]
        disk: String,
        /// The unix socket to listen on (must not exist; made 0600).
        #[arg(long)]
        socket: PathBuf,
        /// A backup (run) id or disk snapshot id; default: the latest.
        #[arg(long)]
        snapshot: Option<String>,
        /// Exit when the first client disconnects.
        #[arg(long)]
        once: bool,
    },
    /// Single files and folders out of a backup, read by libguestfs's own appliance VM
    /// over a private read-only export of the backup (nothing is mounted on the host).
    /// Files are named FS:/PATH, FS as `ls` without a path lists them: DISK, DISK:N
    /// (partition N), VG/LV, or the appliance's device (/dev/sda1).
    Files {
        /// The VM's name.
        vm: String,
        /// A backup (run) id or disk snapshot id; default: the latest.
        #[arg(long)]
        snapshot: Option<String>,
        #[command(subcommand)]
        action: FilesCmd,
    },
    /// Prove a backup good: restore it, fsck every file system, boot it isolated, run a probe.
    Audit {
        /// The VM's name.
        vm: String,
        /// A backup (run id) or snapshot id; default: the latest.
        #[arg(long)]
        snapshot: Option<String>,
        /// A program run over the restored disks (COLDCLONE_AUDIT_DISK_<name>=path); non-zero fails the audit.
        #[arg(long)]
        probe: Option<PathBuf>,
        /// Seconds the booted backup gets to show its heartbeat (`audit_heartbeat`).
        #[arg(long, default_value_t = 300)]
        boot_timeout: u64,
        /// Make a crash-consistent copy and a clean-shutdown backup of the running VM
        /// from one checkpoint, and report how they differ.
        #[arg(long)]
        compare: bool,
    },
    /// Verify the repository: structure, or every chunk with --read-data.
    Check {
        /// Read and verify every stored chunk (slow), and name the backups a damaged chunk hurts.
        #[arg(long)]
        read_data: bool,
    },
    /// Remove backups from the repository's list (by snapshot id, or run id for all its disks).
    Forget {
        #[arg(required = true)]
        snapshots: Vec<String>,
    },
    /// Apply the retention policy (`keep` in the config) and free unreferenced data.
    Prune {
        /// Say what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove one repository lock on purpose: one left by a process known to be gone, or
    /// an unreadable one (the error that named it gives its KEY).
    Unlock {
        /// The lock's name, as `locks/KEY` or `KEY`.
        key: String,
    },
    /// Rebuild the repository's index from the headers of its packs (after a damaged
    /// index file was reported).
    RepairIndex,
    /// Remove what crashed runs left behind (clones, overlays, taps, bridges, files).
    Recover,
    /// Check that this host can run backups: tools, rights, memory, repository, VMs.
    Doctor,
}

#[derive(Subcommand)]
enum FilesCmd {
    /// Without PATH: the backup's file systems. With FS or FS:/PATH: that folder's
    /// entries (a symlink's target shown, not followed).
    Ls {
        /// FS or FS:/PATH, e.g. disk0:1:/etc or vg0/root:/var/log.
        path: Option<String>,
    },
    /// Copy files, folders (recursively) or symlinks (as links) into a local folder,
    /// keeping owner (as root), permissions (less setuid/setgid) and times.
    Get {
        /// FS:/PATH, one or more, e.g. disk0:1:/etc/hostname.
        #[arg(required = true)]
        paths: Vec<String>,
        /// The folder to write into (made if missing); each path lands as DIR/NAME.
        #[arg(long)]
        to: PathBuf,
        /// Replace a DIR/NAME that exists (only once the new copy is complete).
        #[arg(long)]
        force: bool,
    },
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn load_config(path: &Path) -> Result<Config> {
    Config::load(path).with_context(|| "the configuration could not be used".to_string())
}

fn main() -> ExitCode {
    // Before anything else, while this process has one thread: nothing coldclone creates
    // (memory images, exports, overlays, restores, journals) is readable by other users,
    // and no child inherits a secret from our environment.
    // SAFETY: umask only sets this process's file mode mask.
    unsafe { libc::umask(0o077) };
    coldclone_backends::secrets::take_from_environment();
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        // The reader of our output went away (`coldclone snapshots | head -1`): not an error.
        Err(e) if is_broken_pipe(&e) => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("coldclone: error: {e:#}");
            ExitCode::from(exit::BAD_INPUT)
        }
    }
}

/// The commands that make or remove run resources hold the run lock:
/// `Some(wait)` for those, `wait` saying whether to wait for another run.
fn lock_need(cmd: &Cmd) -> Option<bool> {
    match cmd {
        Cmd::Backup { wait, .. } => Some(*wait),
        Cmd::Audit { compare: true, .. } | Cmd::Recover => Some(false),
        _ => None,
    }
}

/// What to say when another run holds the lock.
fn lock_busy(cmd: &Cmd, cfg: &Config) -> String {
    match cmd {
        Cmd::Audit { .. } => {
            "a backup is running; audit --compare makes one too: try again after it".into()
        }
        Cmd::Recover => "a backup is running; recover after it has finished".into(),
        _ => format!(
            "another coldclone backup is running (pid {}, lock {}); try again when it has finished, or use --wait",
            RunLock::holder(&cfg.state_dir),
            RunLock::path(&cfg.state_dir).display()
        ),
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run(cli: Cli) -> Result<u8> {
    let json = cli.json;
    if let Cmd::Doctor = cli.command {
        // doctor also runs without a config, to check the host alone.
        let cfg = if cli.config.exists() {
            Some(load_config(&cli.config)?)
        } else {
            None
        };
        return doctor(cfg.as_ref(), json);
    }
    let cfg = load_config(&cli.config)?;
    // Taken here, once, for the life of the command.
    let _lock = match lock_need(&cli.command) {
        Some(wait) => match RunLock::take(&cfg.state_dir, wait)? {
            Some(lock) => Some(lock),
            None => {
                eprintln!("coldclone: {}", lock_busy(&cli.command, &cfg));
                return Ok(exit::LOCKED);
            }
        },
        None => None,
    };
    match cli.command {
        Cmd::Backup { vms, all, .. } => {
            let reports = commands::backup::run(&cfg, &vms, all, json)?;
            // Skipped VMs count as failures: they have no new backup.
            Ok(if reports.iter().all(|r| r.status == RunStatus::Ok) {
                exit::OK
            } else {
                exit::BACKUP_FAILED
            })
        }
        Cmd::Init => {
            commands::init::run(&cfg, json)?;
            Ok(exit::OK)
        }
        Cmd::Snapshots { vm } => {
            commands::snapshots::run(&cfg, vm.as_deref(), json)?;
            Ok(exit::OK)
        }
        Cmd::Restore {
            vm,
            disk,
            as_name,
            to,
            sr,
            vg,
            network,
            snapshot,
            force,
            format,
            instant,
            stream_rate,
        } => {
            let need_to = |to: Option<PathBuf>| {
                to.ok_or_else(|| anyhow::anyhow!("give --to (a file, or with --as a folder)"))
            };
            match (disk, as_name) {
                (Some(disk), _) => commands::restore::run(
                    &cfg,
                    &vm,
                    &disk,
                    snapshot.as_deref(),
                    &need_to(to)?,
                    format,
                    force,
                    json,
                )?,
                (None, Some(new_name)) if sr.is_some() => commands::restore_xapi::run(
                    &cfg,
                    &commands::restore_xapi::Request {
                        vm: &vm,
                        new_name: &new_name,
                        snapshot: snapshot.as_deref(),
                        sr: sr.as_deref().unwrap_or_default(),
                        network: network.as_deref(),
                        json,
                    },
                )?,
                (None, Some(new_name)) if vg.is_some() => commands::restore_xl::run(
                    &cfg,
                    &commands::restore_xl::Request {
                        vm: &vm,
                        new_name: &new_name,
                        snapshot: snapshot.as_deref(),
                        vg: vg.as_deref().unwrap_or_default(),
                        bridge: network.as_deref(),
                        cfg_dir: to.as_deref(),
                        force,
                        json,
                    },
                )?,
                (None, Some(_)) if network.is_some() => anyhow::bail!(
                    "--network goes with --sr or --vg; a QEMU VM restored with --to has no network"
                ),
                (None, Some(new_name)) => commands::restore_vm::run(
                    &cfg,
                    &commands::restore_vm::Request {
                        vm: &vm,
                        new_name: &new_name,
                        snapshot: snapshot.as_deref(),
                        to: &need_to(to)?,
                        force,
                        json,
                        instant: instant.then_some(commands::restore_vm::Instant {
                            config_path: &cli.config,
                            stream_rate_kib: stream_rate,
                        }),
                    },
                )?,
                (None, None) => anyhow::bail!("give --disk NAME, or --as NEW for the whole VM"),
            }
            Ok(exit::OK)
        }
        Cmd::Serve {
            vm,
            disk,
            socket,
            snapshot,
            once,
        } => {
            commands::serve::run(&cfg, &vm, &disk, snapshot.as_deref(), &socket, once)?;
            Ok(exit::OK)
        }
        Cmd::Files {
            vm,
            snapshot,
            action,
        } => {
            let action = match action {
                FilesCmd::Ls { path } => commands::files::Action::Ls { path },
                FilesCmd::Get { paths, to, force } => {
                    commands::files::Action::Get { paths, to, force }
                }
            };
            commands::files::run(&cfg, &vm, snapshot.as_deref(), &action, json)?;
            Ok(exit::OK)
        }
        Cmd::Audit {
            vm,
            snapshot,
            probe,
            boot_timeout,
            compare,
        } => {
            let ok = if compare {
                commands::audit::compare(&cfg, &vm, probe.as_deref(), json)?
            } else {
                commands::audit::run(
                    &cfg,
                    &vm,
                    snapshot.as_deref(),
                    probe.as_deref(),
                    boot_timeout,
                    json,
                )?
            };
            Ok(if ok { exit::OK } else { exit::NOT_CLEAN })
        }
        Cmd::Check { read_data } => Ok(if commands::check::run(&cfg, read_data, json)? {
            exit::OK
        } else {
            exit::NOT_CLEAN
        }),
        Cmd::Forget { snapshots } => {
            commands::forget::run(&cfg, &snapshots, json)?;
            Ok(exit::OK)
        }
        Cmd::Prune { dry_run } => {
            commands::prune::run(&cfg, dry_run, json)?;
            Ok(exit::OK)
        }
        Cmd::Unlock { key } => {
            commands::check::unlock(&cfg, &key, json)?;
            Ok(exit::OK)
        }
        Cmd::RepairIndex => {
            commands::check::repair_index(&cfg, json)?;
            Ok(exit::OK)
        }
        Cmd::Recover => Ok(if commands::recover::run(&cfg, json)? {
            exit::OK
        } else {
            exit::NOT_CLEAN
        }),
        // Handled above, before a config is required.
        Cmd::Doctor => doctor(Some(&cfg), json),
    }
}

fn doctor(cfg: Option<&Config>, json: bool) -> Result<u8> {
    Ok(if commands::doctor::run(cfg, json)? {
        exit::OK
    } else {
        exit::NOT_CLEAN
    })
}
