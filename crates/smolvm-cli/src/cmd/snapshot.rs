//! `smolvm snapshot ...` and `smolvm fork`.

use crate::progress::Reporter;
use smolvm::sandbox::{RestoreOptions, SnapshotOptions};
use smolvm::snapshot::SnapshotInfo;
use smolvm::Sandbox;

#[derive(clap::Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot a sandbox: memory, device state and disk of a running or
    /// paused one (left paused unless --resume), or the disk of a stopped
    /// one (--disk-only). Prints the snapshot id.
    Create {
        id: String,
        /// The snapshot's id (lowercase letters, digits, '-', '_'); generated when absent.
        #[arg(long)]
        name: Option<String>,
        /// Let the sandbox run on afterwards.
        #[arg(long)]
        resume: bool,
        /// Only the disk, of a stopped sandbox.
        #[arg(long)]
        disk_only: bool,
        /// No progress output.
        #[arg(short, long)]
        quiet: bool,
    },
    /// List snapshots.
    Ls {
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one snapshot (JSON).
    Info {
        /// The snapshot's id.
        snapshot: String,
    },
    /// Restore a snapshot into its source sandbox (replacing its current
    /// run; re-created if it was removed) or, with --as, into a new one.
    Restore {
        /// The snapshot's id (`smolvm snapshot ls`).
        snapshot: String,
        /// The new sandbox's id.
        #[arg(long = "as", value_name = "NEW_ID")]
        into: Option<String>,
        /// Leave the restored sandbox paused.
        #[arg(long)]
        paused: bool,
        /// Seconds to wait for the restored guest.
        #[arg(long, default_value_t = 30.0)]
        boot_timeout: f64,
        /// No progress output.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Remove snapshots (the disk layer of one stays while sandboxes are
    /// layered on it, the source included, and goes with the last of them).
    Rm {
        #[arg(required = true, value_name = "SNAPSHOT")]
        snapshots: Vec<String>,
    },
}

/// `smolvm fork ID|SNAPSHOT --count N`.
#[derive(clap::Args)]
pub struct ForkArgs {
    /// A running or paused sandbox (snapshotted first; it runs on), or a
    /// snapshot id.
    pub source: String,
    /// How many sandboxes to make.
    #[arg(short = 'n', long, default_value_t = 1)]
    pub count: u32,
    /// No progress output.
    #[arg(short, long)]
    pub quiet: bool,
}

fn human(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let b = bytes as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1}G", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1}M", b / (1024.0 * 1024.0))
    } else {
        format!("{:.0}K", (b / 1024.0).ceil())
    }
}

fn print_table(list: &[SnapshotInfo]) {
    let rows: Vec<[String; 7]> = list
        .iter()
        .map(|s| {
            [
                s.id.clone(),
                s.kind.to_string(),
                s.source_vm.clone(),
                format!("{}M", s.memory_mib),
                human(s.size_bytes),
                super::vm::age(s.created_at_ms),
                if s.used_by.is_empty() {
                    "-".into()
                } else {
                    s.used_by.join(",")
                },
            ]
        })
        .collect();
    super::print_columns(
        [
            "ID", "KIND", "SOURCE", "MEMORY", "SIZE", "CREATED", "USED BY",
        ],
        &rows,
    );
}

pub async fn snapshot(c: SnapshotCommand) -> anyhow::Result<u8> {
    match c {
        SnapshotCommand::Create {
            id,
            name,
            resume,
            disk_only,
            quiet,
        } => {
            let mut sbx = Sandbox::from_id(&id).await?;
            let reporter = Reporter::new(quiet);
            sbx.set_progress(Some(reporter.callback()));
            let info = sbx
                .snapshot(&SnapshotOptions {
                    name,
                    resume,
                    disk_only,
                })
                .await?;
            reporter.clear();
            println!("{}", info.id);
            if !resume && !disk_only {
                eprintln!(
                    "note: {id} is paused; `smolvm resume {id}` continues it (--resume next time)"
                );
            }
        }
        SnapshotCommand::Ls { json } => {
            let list = smolvm::sandbox::list_snapshots();
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_table(&list);
            }
        }
        SnapshotCommand::Info { snapshot } => {
            let info = smolvm::sandbox::snapshot_info(&snapshot)?;
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        SnapshotCommand::Restore {
            snapshot,
            into,
            paused,
            boot_timeout,
            quiet,
        } => {
            let reporter = Reporter::new(quiet);
            let opts = RestoreOptions {
                into,
                resume: !paused,
                boot_timeout: super::seconds(boot_timeout, "--boot-timeout")?,
            };
            let vm = Sandbox::restore_snapshot(&snapshot, &opts, Some(reporter.callback())).await?;
            reporter.clear();
            println!("{}", vm.id());
        }
        SnapshotCommand::Rm { snapshots } => {
            let mut failed = 0u8;
            for s in snapshots {
                match smolvm::sandbox::delete_snapshot(&s).await {
                    Ok(kept) => {
                        if !kept.is_empty() {
                            eprintln!(
                                "note: {s}'s disk stays until the sandboxes layered on it are removed: {}",
                                kept.join(", ")
                            );
                        }
                        println!("{s}");
                    }
                    Err(e) => {
                        crate::print_error(&anyhow::Error::new(e));
                        failed = crate::EXIT_SMOLVM_ERROR;
                    }
                }
            }
            return Ok(failed);
        }
    }
    Ok(0)
}

pub async fn fork(a: ForkArgs) -> anyhow::Result<u8> {
    let reporter = Reporter::new(a.quiet);
    // A sandbox by that id first; else a snapshot.
    let vms = match Sandbox::from_id(&a.source).await {
        Ok(mut sbx) => {
            sbx.set_progress(Some(reporter.callback()));
            sbx.fork(a.count).await?
        }
        Err(e) if e.kind() == smolvm::ErrorKind::NotFound => {
            Sandbox::fork_snapshot(&a.source, a.count, Some(reporter.callback())).await?
        }
        Err(e) => return Err(e.into()),
    };
    reporter.clear();
    for v in vms {
        println!("{}", v.id());
    }
    Ok(0)
}
