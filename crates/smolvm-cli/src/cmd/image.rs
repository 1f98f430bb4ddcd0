//! `smolvm image build|ls|rm`.

use crate::progress::Reporter;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Build an image (default debian-12); cached builds take seconds.
    Build {
        #[arg(default_value = smolvm::config::DEFAULT_IMAGE)]
        name: String,
        /// Rebuild everything even when cached.
        #[arg(long)]
        force: bool,
        /// No progress output.
        #[arg(short, long)]
        quiet: bool,
    },
    /// List built images.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove a built image.
    Rm { name: String },
}

pub async fn image(c: ImageCommand) -> anyhow::Result<u8> {
    match c {
        ImageCommand::Build { name, force, quiet } => {
            let reporter = Reporter::new(quiet);
            let cb = reporter.callback();
            let img = tokio::task::spawn_blocking(move || {
                let mut f =
                    |ev: smolvm::image::ImageEvent| cb(&smolvm::sandbox::Progress::Image(ev));
                smolvm::image::build(&name, &smolvm::image::BuildOptions { force }, &mut f)
            })
            .await??;
            reporter.clear();
            println!("{} ({})", img.name, img.dir.display());
            Ok(0)
        }
        ImageCommand::Ls { json } => {
            let list = smolvm::image::list()?;
            if json {
                let v: Vec<serde_json::Value> = list
                    .iter()
                    .map(|i| {
                        serde_json::json!({
                            "name": i.name,
                            "dir": i.dir,
                            "size_on_disk": i.size_on_disk,
                            "created_at": i.created_at,
                            "kernel_version": i.kernel_version,
                            "agent_sha256_short": i.agent_sha256_short,
                            "problem": i.problem,
                            "warm_snapshots": warm_json(&i.name),
                        })
                    })
                    .collect();

                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("NAME         SIZE       KERNEL                   AGENT          PROBLEM");
                for i in &list {
                    println!(
                        "{:<12} {:>8.0}M  {:<24} {:<14} {}",
                        i.name,
                        i.size_on_disk as f64 / (1024.0 * 1024.0),
                        i.kernel_version,
                        i.agent_sha256_short,
                        i.problem.as_deref().unwrap_or("-")
                    );
                }
                let warm = smolvm::snapshot::warm();
                if !warm.is_empty() {
                    println!();
                    println!("WARM BOOT SNAPSHOTS (fresh sandboxes of this shape start from them; `--cold` boots)");
                    println!("IMAGE        MEMORY  CPUS  NETWORK  DISK       SIZE");
                    for w in &warm {
                        let c = &w.manifest.config;
                        let size = w.manifest.state.as_ref().map_or(0, |s| s.bytes)
                            + w.manifest.memory_bytes
                            + w.manifest.disk_bytes;
                        println!(
                            "{:<12} {:>5}M  {:>4}  {:<7}  {:<9}  {:>6.1}M",
                            c.image,
                            c.memory_mib,
                            c.cpus,
                            if c.network { "yes" } else { "no" },
                            c.disk_size_mib
                                .map_or("image".to_string(), |d| format!("{d}M")),
                            size as f64 / (1024.0 * 1024.0)
                        );
                    }
                }
            }
            Ok(0)
        }
        ImageCommand::Rm { name } => {
            smolvm::image::remove(&name)?;
            // Its warm boot snapshots go with it.
            smolvm::sandbox::forget_warm(Some(&name)).await?;
            println!("{name}");
            Ok(0)
        }
    }
}

/// The warm boot snapshots of image `name`, as JSON.
fn warm_json(name: &str) -> Vec<serde_json::Value> {
    smolvm::snapshot::warm()
        .iter()
        .filter(|w| w.manifest.config.image == name)
        .map(|w| {
            let c = &w.manifest.config;
            serde_json::json!({
                "memory_mib": c.memory_mib,
                "cpus": c.cpus,
                "network": c.network,
                "disk_size_mib": c.disk_size_mib,
                "size_bytes": w.manifest.state.as_ref().map_or(0, |s| s.bytes)
                    + w.manifest.memory_bytes
                    + w.manifest.disk_bytes,
                "created_at_ms": w.manifest.created_at_ms,
            })
        })
        .collect()
}
