//! `smolvm`: the command-line interface, thin over the library.

mod cmd;
mod progress;

use clap::Parser;
use std::process::ExitCode;

/// Exit status for smolvm's own failures (as `docker run` does).
pub const EXIT_SMOLVM_ERROR: u8 = 125;

#[derive(Parser)]
#[command(
    name = "smolvm",
    version,
    about = "Disposable, hardware-isolated Linux sandboxes (microVMs) for AI agents"
)]
struct Cli {
    /// Log verbosity for smolvm itself (e.g. `debug`); also SMOLVM_LOG.
    #[arg(long, global = true, env = "SMOLVM_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: cmd::Command,
}

fn main() -> ExitCode {
    // Usage errors are smolvm's own failures: exit 125, never a code that
    // could be mistaken for the guest command's.
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EXIT_SMOLVM_ERROR),
            };
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_SMOLVM_ERROR);
        }
    };
    let result = rt.block_on(cmd::dispatch(cli.command));
    // A read of our stdin may still block in the runtime's blocking pool
    // (`exec -i` when the command ended first): do not wait for it.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            print_error(&e);
            ExitCode::from(EXIT_SMOLVM_ERROR)
        }
    }
}

/// `error: outer` then one `caused by: ...` line per source. Errors may
/// quote the guest (console tails, agent messages): control characters are
/// escaped so they never reach the terminal raw.
pub fn print_error(e: &anyhow::Error) {
    let show = smolvm::text::escape_multiline;
    eprintln!("error: {}", show(&e.to_string()));
    let mut last = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if last.contains(&c) {
            continue;
        }
        eprintln!("caused by: {}", show(&c));
        last = c;
    }
    let tail = e
        .chain()
        .find_map(|c| c.downcast_ref::<smolvm::Error>())
        .and_then(|e| e.console_tail());
    if let Some(t) = tail {
        eprintln!("last guest console lines:");
        for l in show(t).lines() {
            eprintln!("  {l}");
        }
    }
}
