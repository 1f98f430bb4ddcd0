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
                let mut f = |ev: smolvm::image::ImageEvent| cb(&smolvm::sandbox::Progress::Image(ev));
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
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<12} {:>10}  {:<24} {}", "NAME", "SIZE", "KERNEL", "CREATED");
                for i in &list {
                    println!(
                        "{:<12} {:>9.0}M  {:<24} {}",
                        i.name,
                        i.size_bytes as f64 / (1024.0 * 1024.0),
                        i.kernel_version,
                        i.created_at
                    );
                }
            }
            Ok(0)
        }
        ImageCommand::Rm { name } => {
            smolvm::image::remove(&name)?;
            println!("{name}");
            Ok(0)
        }
    }
}
