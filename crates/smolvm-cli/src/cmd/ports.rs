//! `smolvm port`, `smolvm ssh`, `smolvm tunnel`.

use clap::Subcommand;
use smolvm::Sandbox;

#[derive(Subcommand)]
pub enum PortCommand {
    /// Forward a host port to a port on the sandbox's loopback for this run
    /// (`[[ADDRESS:]HOST:]GUEST`; no HOST: a free port; no ADDRESS:
    /// 127.0.0.1). Prints the host port.
    Add(AddArgs),
    /// List the running sandbox's forwards.
    #[command(alias = "list")]
    Ls(LsArgs),
    /// Close the forward on a host port.
    #[command(alias = "remove")]
    Rm(RmArgs),
}

#[derive(clap::Args)]
pub struct AddArgs {
    id: String,
    /// `GUEST`, `HOST:GUEST` or `ADDRESS:HOST:GUEST`.
    #[arg(value_name = "[HOST:]GUEST")]
    spec: String,
}

#[derive(clap::Args)]
pub struct LsArgs {
    id: String,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct RmArgs {
    id: String,
    /// The host port of the forward.
    host_port: u16,
}

pub async fn port(c: PortCommand) -> anyhow::Result<u8> {
    match c {
        PortCommand::Add(a) => {
            let fwd = smolvm::sandbox::parse_forward(&a.spec)?;
            let sbx = Sandbox::from_id(&a.id).await?;
            let f = sbx.expose(fwd).await?;
            println!("{}", f.host_port);
            eprintln!(
                "smolvm: {}:{} -> {} 127.0.0.1:{}",
                f.host_addr, f.host_port, a.id, f.guest_port
            );
            Ok(0)
        }
        PortCommand::Ls(a) => {
            let sbx = Sandbox::from_id(&a.id).await?;
            let ports = sbx.ports().await?;
            let state = sbx.status().await?;
            if !matches!(state, smolvm::VmState::Running | smolvm::VmState::Paused) && !a.json {
                let fixed = &sbx.config().ports;
                eprintln!(
                    "smolvm: {} is {state}: forwards exist while it runs{}",
                    a.id,
                    if fixed.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "; it opens {} at its next start ({})",
                            if fixed.len() == 1 { "one" } else { "these" },
                            fixed
                                .iter()
                                .map(|p| format!(
                                    "{}:{} -> {}",
                                    p.host_addr, p.host_port, p.guest_port
                                ))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    }
                );
                return Ok(0);
            }
            if a.json {
                println!("{}", serde_json::to_string_pretty(&ports)?);
                return Ok(0);
            }
            let rows: Vec<[String; 3]> = ports
                .iter()
                .map(|p| {
                    [
                        p.host_addr.to_string(),
                        p.host_port.to_string(),
                        format!("127.0.0.1:{}", p.guest_port),
                    ]
                })
                .collect();
            super::print_columns(["HOST ADDRESS", "HOST PORT", "GUEST"], &rows);
            Ok(0)
        }
        PortCommand::Rm(a) => {
            let sbx = Sandbox::from_id(&a.id).await?;
            let f = sbx.unexpose(a.host_port).await?;
            if sbx
                .config()
                .ports
                .iter()
                .any(|p| p.guest_port == f.guest_port && p.host_port == f.host_port)
            {
                eprintln!(
                    "smolvm: closed for this run; it was fixed at creation (-p), so the next start opens it again"
                );
            }
            Ok(0)
        }
    }
}

#[derive(clap::Args)]
pub struct SshArgs {
    id: String,
    /// Print the ssh command (and the host key fingerprint's source) instead
    /// of running it.
    #[arg(long)]
    print: bool,
    /// Forget the pinned host key first: the guest gets a new host key,
    /// pinned anew (after its key was replaced or lost).
    #[arg(long)]
    forget_host_key: bool,
    /// A command to run instead of a login shell.
    #[arg(last = true, value_name = "CMD")]
    argv: Vec<String>,
}

/// Runs the system OpenSSH client against the sandbox's sshd (started on
/// demand), with smolvm's key and the VM's pinned host key.
pub async fn ssh(a: SshArgs) -> anyhow::Result<u8> {
    let sbx = Sandbox::from_id(&a.id).await?;
    if a.forget_host_key {
        sbx.forget_host_key().await?;
    }
    let access = sbx.ensure_ssh().await?;
    if a.print {
        println!("{}", access.command_line());
        println!("# host key ({}): {}", access.alias, access.host_key);
        return Ok(0);
    }
    let mut argv = access.argv();
    if !a.argv.is_empty() {
        argv.push("--".into());
        argv.extend(a.argv);
    }
    let ssh = smolvm::hosttools::require("ssh")?;
    use std::os::unix::process::CommandExt as _;
    let e = std::process::Command::new(ssh).args(&argv[1..]).exec();
    anyhow::bail!("cannot run ssh: {e}")
}

#[derive(clap::Args)]
pub struct TunnelArgs {
    id: String,
    /// The port on the sandbox's loopback.
    port: u16,
}

/// Connects stdin/stdout to a port on the sandbox's loopback (for
/// `ssh -o ProxyCommand='smolvm tunnel ID 22'`, or any byte stream).
pub async fn tunnel(a: TunnelArgs) -> anyhow::Result<u8> {
    let sbx = Sandbox::from_id(&a.id).await?;
    let s = sbx.tunnel(a.port).await?;
    smolvm::sandbox::splice_tunnel(s, tokio::io::stdin(), tokio::io::stdout()).await?;
    Ok(0)
}
