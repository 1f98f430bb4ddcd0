//! `smolvm ps`, `attach`, `kill`: background processes.

use super::stream_to_stdio;
use smolvm::Sandbox;

#[derive(clap::Args)]
pub struct PsArgs {
    id: String,
    /// Print them as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct AttachArgs {
    id: String,
    /// The handle `smolvm exec -d` printed.
    handle: u64,
    /// Only output from now on (by default: all that is still buffered).
    #[arg(long)]
    new: bool,
}

#[derive(clap::Args)]
pub struct KillArgs {
    id: String,
    handle: u64,
    /// Signal number or name (TERM, KILL, INT, HUP...).
    #[arg(short, long, default_value = "TERM")]
    signal: String,
}

fn signal_number(s: &str) -> anyhow::Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.trim_start_matches("SIG");
    Ok(match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        _ => anyhow::bail!("unknown signal {s:?}; use a number (1-64) or TERM, KILL, INT, HUP, QUIT, USR1, USR2, STOP, CONT"),
    })
}

pub async fn ps(a: PsArgs) -> anyhow::Result<u8> {
    let sbx = Sandbox::from_id(&a.id).await?;
    let procs = sbx.processes().await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&procs)?);
        return Ok(0);
    }
    println!(
        "{:<8} {:<8} {:<12} {:>10}  COMMAND",
        "HANDLE", "PID", "STATE", "OUTPUT"
    );
    for p in procs {
        let state = match &p.exit {
            None => "running".to_string(),
            Some(e) => match (e.code, e.signal) {
                (Some(c), _) => format!("exited {c}"),
                (None, Some(s)) => format!("signal {s}"),
                _ => "ended".into(),
            },
        };
        println!(
            "{:<8} {:<8} {:<12} {:>10}  {}",
            p.handle,
            p.pid,
            state,
            p.output_bytes,
            smolvm::text::escape_line(&p.command)
        );
    }
    Ok(0)
}

pub async fn attach(a: AttachArgs) -> anyhow::Result<u8> {
    let sbx = Sandbox::from_id(&a.id).await?;
    let stream = sbx
        .attach(a.handle, if a.new { None } else { Some(0) })
        .await?;
    stream_to_stdio(&sbx, stream).await
}

pub async fn kill(a: KillArgs) -> anyhow::Result<u8> {
    let sig = signal_number(&a.signal)?;
    let sbx = Sandbox::from_id(&a.id).await?;
    sbx.signal_process(a.handle, sig).await?;
    Ok(0)
}
