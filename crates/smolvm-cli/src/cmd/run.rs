//! `smolvm run`: an ephemeral sandbox for one command.

use super::{guest_command, stream_to_stdio, ExecFlags, VmFlags};
use crate::progress::Reporter;
use anyhow::Context;
use smolvm::Sandbox;

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    vm: VmFlags,
    /// Seconds to wait for the guest to boot.
    #[arg(long, default_value_t = 30.0)]
    boot_timeout: f64,
    /// Run CMD through `/bin/sh -c` (ARGs joined by spaces).
    #[arg(long)]
    shell: bool,
    /// No progress output.
    #[arg(short, long)]
    quiet: bool,
    #[command(flatten)]
    exec: ExecFlags,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    argv: Vec<String>,
}

pub async fn run(a: RunArgs) -> anyhow::Result<u8> {
    let command = guest_command(a.argv.clone(), a.shell)?;
    let opts = a.exec.options()?;
    let config = a.vm.config(|| Ok(smolvm::Accel::from_env()?))?;
    let boot_timeout = super::seconds(a.boot_timeout, "--boot-timeout")?;
    let reporter = Reporter::new(a.quiet);
    let sbx = Sandbox::create_with_progress(config, Some(reporter.callback())).await?;
    let result = async {
        sbx.start(boot_timeout).await?;
        reporter.clear();
        let stream = sbx.exec_stream(command, &opts).await?;
        tokio::select! {
            r = stream_to_stdio(stream) => r,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("smolvm: interrupted; removing sandbox {}", sbx.id());
                Ok(130)
            }
        }
    }
    .await;
    reporter.clear();
    let id = sbx.id().to_string();
    let cleanup = sbx
        .delete()
        .await
        .with_context(|| format!("cannot remove sandbox {id}"));
    let code = result?;
    cleanup?;
    Ok(code)
}
