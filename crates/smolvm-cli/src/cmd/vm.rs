//! Lifecycle subcommands: create, start, stop, pause, resume, rm, ls, info,
//! exec, logs, prune.

use super::{guest_command, stream_to_stdio, ExecFlags, VmFlags};
use crate::progress::Reporter;
use anyhow::Context;
use smolvm::sandbox::VmInfo;
use smolvm::{Sandbox, SandboxConfig};
use std::io::{Read, Seek, Write};
use std::time::Duration;

// `create`'s help for the VM flags: the ranges, and no `SMOLVM_ACCEL` (only
// `run` reads it).
#[derive(clap::Args)]
pub struct CreateArgs {
    /// Name (the VM's id): 1-63 of a-z 0-9 _ -; generated when absent.
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    vm: VmFlags,
    /// Root disk size in MiB (at least the image's size).
    // Listed right after --cpus: the 4th flag here (name, image, memory,
    // cpus), and "cpus" sorts before "disk-size" at the same place.
    #[arg(long, value_name = "MIB", display_order = 3)]
    disk_size: Option<u64>,
    /// Environment variable for every command run in the VM (repeatable; a
    /// command's own `-e` wins).
    #[arg(short, long = "env", value_name = "KEY=VALUE", value_parser = super::parse_env)]
    env: Vec<(String, String)>,
    /// Print the VM as JSON.
    #[arg(long)]
    json: bool,
    /// No progress output.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(clap::Args)]
pub struct StartArgs {
    #[arg(required = true)]
    ids: Vec<String>,
    /// Seconds to wait for the guest to boot.
    #[arg(long, default_value_t = 30.0)]
    boot_timeout: f64,
    /// No progress output.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(clap::Args)]
pub struct StopArgs {
    #[arg(required = true)]
    ids: Vec<String>,
    /// Seconds to wait for a graceful shutdown before killing the VMM.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
}

#[derive(clap::Args)]
pub struct IdsArgs {
    #[arg(required = true)]
    ids: Vec<String>,
}

#[derive(clap::Args)]
pub struct RmArgs {
    #[arg(required = true)]
    ids: Vec<String>,
    /// Also remove running or paused VMs (they are killed).
    #[arg(short, long)]
    force: bool,
}

#[derive(clap::Args)]
pub struct LsArgs {
    /// Include stopped, created and failed VMs.
    #[arg(short, long)]
    all: bool,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct InfoArgs {
    id: String,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct ExecArgs {
    id: String,
    /// Run CMD through `/bin/sh -c`.
    #[arg(long)]
    shell: bool,
    /// Pass our stdin to the command (until EOF).
    #[arg(short, long)]
    interactive: bool,
    /// Run the command on a terminal of our terminal's size (with -i: an
    /// interactive session; keys, Ctrl-C included, go to the guest).
    #[arg(short, long)]
    tty: bool,
    /// Start it in the background and print its handle (`smolvm attach`,
    /// `smolvm ps`, `smolvm kill` take it); it outlives this command.
    #[arg(short, long, conflicts_with_all = ["tty", "interactive"])]
    detach: bool,
    #[command(flatten)]
    exec: ExecFlags,
    #[arg(last = true, required = true, value_name = "CMD")]
    argv: Vec<String>,
}

#[derive(clap::Args)]
pub struct LogsArgs {
    id: String,
    /// Keep printing as the console grows, until the VM stops.
    #[arg(short, long)]
    follow: bool,
    /// Print the guest's bytes as they are. By default control characters
    /// (escape sequences that could drive your terminal) are shown escaped,
    /// e.g. `\x1b[2J`.
    #[arg(long)]
    raw: bool,
}

#[derive(clap::Args)]
pub struct PruneArgs {
    /// Only list what would be removed.
    #[arg(long)]
    dry_run: bool,
    /// Also remove VMs in state `error`.
    #[arg(long)]
    errors: bool,
    #[arg(long)]
    json: bool,
}

pub async fn create(a: CreateArgs) -> anyhow::Result<u8> {
    let config = SandboxConfig {
        name: a.name,
        disk_size_mib: a.disk_size,
        env: a.env.into_iter().collect(),
        ..a.vm.config(|| Ok(smolvm::Accel::default()))?
    };
    let reporter = Reporter::new(a.quiet || a.json);
    let sbx = Sandbox::create_with_progress(config, Some(reporter.callback())).await?;
    reporter.clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&sbx.info().await?)?);
    } else {
        println!("{}", sbx.id());
    }
    Ok(0)
}

pub async fn start(a: StartArgs) -> anyhow::Result<u8> {
    let t = super::seconds(a.boot_timeout, "--boot-timeout")?;
    for id in &a.ids {
        let mut sbx = Sandbox::from_id(id).await?;
        let reporter = Reporter::new(a.quiet);
        sbx.set_progress(Some(reporter.callback()));
        sbx.start(t).await?;
        reporter.clear();
        println!("{id}");
    }
    Ok(0)
}

pub async fn stop(a: StopArgs) -> anyhow::Result<u8> {
    let t = super::seconds(a.timeout, "--timeout")?;
    for id in &a.ids {
        Sandbox::from_id(id).await?.stop(t).await?;
        println!("{id}");
    }
    Ok(0)
}

pub async fn pause(a: IdsArgs) -> anyhow::Result<u8> {
    for id in &a.ids {
        Sandbox::from_id(id).await?.pause().await?;
        println!("{id}");
    }
    Ok(0)
}

pub async fn resume(a: IdsArgs) -> anyhow::Result<u8> {
    for id in &a.ids {
        Sandbox::from_id(id).await?.resume().await?;
        println!("{id}");
    }
    Ok(0)
}

pub async fn rm(a: RmArgs) -> anyhow::Result<u8> {
    let mut failed = None;
    for id in &a.ids {
        let r = async {
            let sbx = Sandbox::from_id(id).await?;
            let state = sbx.status().await?;
            if state.is_live() && !a.force {
                anyhow::bail!("VM '{id}' is {state}; stop it first (`smolvm stop {id}`) or use `smolvm rm -f {id}`");
            }
            sbx.delete().await?;
            Ok(())
        }
        .await;
        match r {
            Ok(()) => println!("{id}"),
            Err(e) => {
                crate::print_error(&e);
                failed = Some(e);
            }
        }
    }
    match failed {
        Some(_) => Ok(crate::EXIT_SMOLVM_ERROR),
        None => Ok(0),
    }
}

/// At most `max` characters of `s` on one line (the full text is in
/// `smolvm info` and `--json`).
fn clip(s: &str, max: usize) -> String {
    let line = s.lines().next().unwrap_or_default();
    if line.chars().count() <= max && !s.contains('\n') {
        return line.to_string();
    }
    let mut out: String = line.chars().take(max.saturating_sub(3)).collect();
    out.push_str("...");
    out
}

pub(super) fn age(ms: i64) -> String {
    let secs = (smolvm::state::now_ms() - ms).max(0) / 1000;
    match secs {
        s if s < 60 => format!("{s}s ago"),
        s if s < 3600 => format!("{}m ago", s / 60),
        s if s < 86400 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86400),
    }
}

pub async fn ls(a: LsArgs) -> anyhow::Result<u8> {
    let vms: Vec<VmInfo> = Sandbox::list()
        .await?
        .into_iter()
        .filter(|v| a.all || v.state.is_live())
        .collect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&vms)?);
        return Ok(0);
    }
    let rows: Vec<[String; 7]> = vms
        .iter()
        .map(|v| {
            [
                v.id.clone(),
                v.state.to_string(),
                v.image.clone(),
                v.cpus.to_string(),
                format!("{}M", v.memory_mib),
                age(v.created_at),
                clip(
                    &smolvm::text::escape_line(v.last_error.as_deref().unwrap_or_default()),
                    80,
                ),
            ]
        })
        .collect();
    super::print_columns(
        ["ID", "STATE", "IMAGE", "CPUS", "MEMORY", "CREATED", "ERROR"],
        &rows,
    );
    Ok(0)
}

pub async fn info(a: InfoArgs) -> anyhow::Result<u8> {
    let info = Sandbox::from_id(&a.id).await?.info().await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        println!("id:          {}", info.id);
        println!("state:       {}", info.state);
        println!("image:       {}", info.image);
        println!("cpus:        {}", info.cpus);
        println!("memory:      {} MiB", info.memory_mib);
        println!("network:     {}", if info.network { "on" } else { "off" });
        println!("egress:      {}", super::network::describe(&info.egress));
        println!("accelerator: {}", info.accel.as_deref().unwrap_or("-"));
        println!("created:     {}", age(info.created_at));
        println!("boots:       {}", info.boot_count);
        if let Some(p) = info.vmm_pid {
            println!("vmm pid:     {p}");
        }
        if let Some(p) = info.supervisor_pid {
            println!("supervisor:  {p}");
        }
        if let Some(e) = &info.last_error {
            println!("last error:  {}", smolvm::text::escape_line(e));
        }
        println!("directory:   {}", info.vm_dir.display());
        let sbx = Sandbox::from_id(&a.id).await?;
        for p in sbx.ports().await.unwrap_or_default() {
            println!(
                "port:        {}:{} -> guest 127.0.0.1:{}",
                p.host_addr, p.host_port, p.guest_port
            );
        }
        match sbx.ssh_access_if_set_up().await {
            Some(a) => println!("ssh:         {}", a.command_line()),
            None if info.state == smolvm::VmState::Running => {
                println!(
                    "ssh:         smolvm ssh {}   (starts sshd on first use)",
                    info.id
                )
            }
            None => {}
        }
    }
    Ok(0)
}

#[derive(clap::Args)]
pub struct ShellArgs {
    id: String,
}

pub async fn shell(a: ShellArgs) -> anyhow::Result<u8> {
    if !super::tty::is_tty(0) {
        anyhow::bail!(
            "smolvm shell needs a terminal on stdin; without one use `smolvm exec -i {} -- bash -l`",
            a.id
        );
    }
    let opts = smolvm::ExecOptions::default();
    let command = smolvm::Command::Argv(vec!["bash".into(), "-l".into()]);
    exec_with(&a.id, command, opts, true, true).await
}

pub async fn exec(a: ExecArgs) -> anyhow::Result<u8> {
    let command = guest_command(a.argv, a.shell)?;
    let opts = a.exec.options()?;
    if a.detach {
        let sbx = Sandbox::from_id(&a.id).await?;
        let sp = sbx.spawn(command, &opts).await?;
        println!("{}", sp.handle);
        return Ok(0);
    }
    exec_with(&a.id, command, opts, a.interactive, a.tty).await
}

async fn exec_with(
    id: &str,
    command: smolvm::Command,
    mut opts: smolvm::ExecOptions,
    interactive: bool,
    tty: bool,
) -> anyhow::Result<u8> {
    opts.open_stdin = interactive;
    if tty {
        opts.pty = Some(
            super::tty::size(1)
                .or_else(|| super::tty::size(0))
                .unwrap_or((24, 80)),
        );
    }
    let sbx = Sandbox::from_id(id).await?;
    let stream = sbx.exec_stream(command, &opts).await?;
    // Raw mode only for an interactive session on a real terminal; restored
    // when this returns (the guard drops).
    let _raw = if tty && interactive && super::tty::is_tty(0) {
        Some(super::tty::RawMode::enter().context("cannot put the terminal in raw mode")?)
    } else {
        None
    };
    let w = stream.stdin();
    if tty {
        // Our terminal's size follows us.
        let w = w.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut winch) = signal(SignalKind::window_change()) else {
                return;
            };
            while winch.recv().await.is_some() {
                if let Some((r, c)) = super::tty::size(1).or_else(|| super::tty::size(0)) {
                    if w.resize(r, c).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    if interactive {
        // Our stdin, as it comes, within the guest's credit; EOF closes the
        // command's stdin. Ends with the stream.
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut input = tokio::io::stdin();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match input.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if w.write(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = w.close().await;
        });
    }
    stream_to_stdio(&sbx, stream).await
}

pub async fn logs(a: LogsArgs) -> anyhow::Result<u8> {
    let sbx = Sandbox::from_id(&a.id).await?;
    let path = sbx.vm_dir().console_log();
    let mut f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "smolvm: VM '{}' has no console output yet (it has never booted)",
                a.id
            );
            return Ok(0);
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut out = std::io::stdout();
    let mut buf = vec![0u8; 64 * 1024];
    let mut pos = 0u64;
    let mut esc = smolvm::text::StreamEscaper::default();
    loop {
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            pos += n as u64;
            if a.raw {
                out.write_all(&buf[..n])?;
            } else {
                out.write_all(esc.push(&buf[..n]).as_bytes())?;
            }
        }
        if !a.follow || !sbx.status().await?.is_live() {
            out.write_all(esc.finish().as_bytes())?;
            out.flush()?;
            return Ok(0);
        }
        out.flush()?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The console is recreated on each boot.
        if std::fs::metadata(&path)
            .map(|m| m.len() < pos)
            .unwrap_or(false)
        {
            f = std::fs::File::open(&path)?;
            pos = 0;
        }
        f.seek(std::io::SeekFrom::Start(pos))?;
    }
}

pub async fn prune(a: PruneArgs) -> anyhow::Result<u8> {
    let items = smolvm::sandbox::prune(a.dry_run, a.errors).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&items)?);
        return Ok(0);
    }
    let verb = if a.dry_run { "would remove" } else { "removed" };
    for it in &items {
        match &it.path {
            Some(p) => println!("{verb} {} {} ({})", it.kind, it.id, p.display()),
            None => println!("{verb} {} {}", it.kind, it.id),
        }
    }
    if items.is_empty() {
        println!("nothing to prune");
    }
    Ok(0)
}
