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
    // Handle SIGINT/SIGTERM/SIGHUP from here on: an ephemeral sandbox must
    // not outlive an interrupted `run`.
    let mut signals = Signals::new()?;
    let reporter = Reporter::new(a.quiet);
    let sbx = tokio::select! {
        r = Sandbox::create_with_progress(config, Some(reporter.callback())) => r?,
        code = signals.recv() => {
            reporter.clear();
            eprintln!("smolvm: interrupted before the sandbox was created");
            return Ok(code);
        }
    };
    let result = async {
        tokio::select! {
            r = async {
                sbx.start(boot_timeout).await?;
                reporter.clear();
                let stream = sbx.exec_stream(command, &opts).await?;
                stream_to_stdio(&sbx, stream).await
            } => r,
            code = signals.recv() => {
                reporter.clear();
                eprintln!("smolvm: interrupted; removing sandbox {}", sbx.id());
                Ok(code)
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

/// The termination signals `run` turns into a clean removal.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Waits for one; returns the shell-style exit status (128 + signal).
    async fn recv(&mut self) -> u8 {
        tokio::select! {
            _ = self.int.recv() => 128 + 2,   // SIGINT
            _ = self.term.recv() => 128 + 15, // SIGTERM
            _ = self.hup.recv() => 128 + 1,   // SIGHUP
        }
    }
}
