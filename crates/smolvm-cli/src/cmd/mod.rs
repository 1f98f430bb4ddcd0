//! Subcommands.

mod bench;
mod bench_network;
mod bench_snapshots;
mod doctor;
mod env;
mod files;
mod image;
mod network;
mod ports;
mod procs;
mod run;
mod snapshot;
mod tty;
mod vm;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum Command {
    /// Run a command in a fresh sandbox, then remove the sandbox.
    Run(run::RunArgs),
    /// Create a sandbox (state `created`).
    Create(vm::CreateArgs),
    /// Boot (or resume) sandboxes.
    Start(vm::StartArgs),
    /// Shut sandboxes down gracefully (killed after --timeout).
    Stop(vm::StopArgs),
    /// Pause sandboxes (vCPUs stop; memory stays).
    Pause(vm::IdsArgs),
    /// Resume paused sandboxes.
    Resume(vm::IdsArgs),
    /// Remove sandboxes and everything they have on disk.
    #[command(alias = "delete")]
    Rm(vm::RmArgs),
    /// List sandboxes.
    #[command(alias = "list")]
    Ls(vm::LsArgs),
    /// Show one sandbox.
    Info(vm::InfoArgs),
    /// Run a command in a running sandbox.
    Exec(vm::ExecArgs),
    /// Copy files and directories between the host and a sandbox
    /// (`smolvm cp LOCAL ID:/path`, `smolvm cp ID:/path LOCAL`).
    Cp(files::CpArgs),
    /// A sandbox's persistent environment: variables every later command sees.
    #[command(subcommand)]
    Env(env::EnvCommand),
    /// An interactive login shell in a running sandbox (on a terminal).
    Shell(vm::ShellArgs),
    /// List a sandbox's background processes (`smolvm exec -d` starts them).
    Ps(procs::PsArgs),
    /// Follow a background process's output (from the start of what is
    /// buffered) until it ends; Ctrl-C detaches, the process runs on.
    Attach(procs::AttachArgs),
    /// Signal a background process (SIGTERM by default).
    Kill(procs::KillArgs),
    /// Show a sandbox's guest console.
    Logs(vm::LogsArgs),
    /// Remove leftovers of sandboxes that no longer exist.
    Prune(vm::PruneArgs),
    /// Check the host: tools, KVM, disk, image.
    Doctor(doctor::DoctorArgs),
    /// Measure boot, exec and image build times (table + JSON).
    Bench(bench::BenchArgs),
    /// Build, list and remove guest images.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Memory and disk snapshots: create, list, inspect, restore, remove.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// New sandboxes from a running sandbox or a snapshot (prints their ids).
    Fork(snapshot::ForkArgs),
    /// A sandbox's egress policy: show it, or `set` it (live).
    Network(network::NetworkArgs),
    /// Host ports forwarded to a running sandbox's loopback (over the agent
    /// channel: work with the network off).
    #[command(subcommand)]
    Port(ports::PortCommand),
    /// SSH into a running sandbox with the system ssh client (sshd starts
    /// on demand; the host key is pinned per sandbox).
    Ssh(ports::SshArgs),
    /// Connect stdin/stdout to a port on a sandbox's loopback.
    Tunnel(ports::TunnelArgs),
}

/// Runs a subcommand; returns the process exit status.
pub async fn dispatch(cmd: Command) -> anyhow::Result<u8> {
    match cmd {
        Command::Run(a) => run::run(a).await,
        Command::Create(a) => vm::create(a).await,
        Command::Start(a) => vm::start(a).await,
        Command::Stop(a) => vm::stop(a).await,
        Command::Pause(a) => vm::pause(a).await,
        Command::Resume(a) => vm::resume(a).await,
        Command::Rm(a) => vm::rm(a).await,
        Command::Ls(a) => vm::ls(a).await,
        Command::Info(a) => vm::info(a).await,
        Command::Exec(a) => vm::exec(a).await,
        Command::Cp(a) => files::cp(a).await,
        Command::Env(c) => env::env(c).await,
        Command::Shell(a) => vm::shell(a).await,
        Command::Ps(a) => procs::ps(a).await,
        Command::Attach(a) => procs::attach(a).await,
        Command::Kill(a) => procs::kill(a).await,
        Command::Logs(a) => vm::logs(a).await,
        Command::Prune(a) => vm::prune(a).await,
        Command::Doctor(a) => doctor::doctor(a).await,
        Command::Bench(a) => bench::bench(a).await,
        Command::Image(c) => image::image(c).await,
        Command::Snapshot(c) => snapshot::snapshot(c).await,
        Command::Fork(a) => snapshot::fork(a).await,
        Command::Network(a) => network::network(a).await,
        Command::Port(c) => ports::port(c).await,
        Command::Ssh(a) => ports::ssh(a).await,
        Command::Tunnel(a) => ports::tunnel(a).await,
    }
}

/// Parses `KEY=VALUE` for clap.
pub fn parse_env(s: &str) -> Result<(String, String), String> {
    smolvm::config::parse_env(s).map_err(|e| e.to_string())
}

/// Shared exec options.
#[derive(clap::Args, Clone)]
pub struct ExecFlags {
    /// Environment variable for the command (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory in the guest.
    #[arg(short = 'w', long)]
    pub workdir: Option<String>,
    /// Kill the command (and its process group) after this many seconds.
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
}

impl ExecFlags {
    pub fn options(&self) -> anyhow::Result<smolvm::ExecOptions> {
        let timeout = match self.timeout {
            Some(t) => Some(seconds(t, "--timeout")?),
            None => None,
        };
        Ok(smolvm::ExecOptions {
            env: self.env.clone(),
            workdir: self.workdir.clone(),
            timeout,
            stdin: None,
            open_stdin: false,
            pty: None,
            max_output: None,
        })
    }
}

/// Shared VM flags of `run` and `create` (`create` overrides some help).
#[derive(clap::Args)]
pub struct VmFlags {
    /// Guest image.
    #[arg(long, default_value = smolvm::config::DEFAULT_IMAGE)]
    pub image: String,
    /// Guest memory in MiB (128-16384).
    #[arg(long, default_value_t = smolvm::config::DEFAULT_MEMORY_MIB)]
    pub memory: u32,
    /// vCPUs (1-32).
    #[arg(long, default_value_t = smolvm::config::DEFAULT_CPUS)]
    pub cpus: u32,
    /// Accelerator: auto, kvm or tcg (auto: SMOLVM_ACCEL when set, else a
    /// KVM probe boot decides).
    #[arg(long)]
    pub accel: Option<smolvm::Accel>,
    /// No guest network.
    #[arg(long)]
    pub no_network: bool,
    /// Always boot the kernel (never start from the warm boot snapshot of
    /// this image and shape, and leave none).
    #[arg(long)]
    pub cold: bool,
    #[command(flatten)]
    pub egress: network::EgressFlags,
    /// Forward a host port to the guest's loopback whenever it runs
    /// (`[[ADDRESS:]HOST:]GUEST`; repeatable).
    #[arg(short = 'p', long = "publish", value_name = "[HOST:]GUEST")]
    pub publish: Vec<String>,
    /// Start the guest's SSH server at every boot (else `smolvm ssh` starts
    /// it on first use).
    #[arg(long)]
    pub ssh: bool,
}

impl VmFlags {
    /// The sandbox these flags describe (no name, the image's disk size);
    /// `default_accel` is asked only when `--accel` is absent.
    pub fn config(
        &self,
        default_accel: impl FnOnce() -> anyhow::Result<smolvm::Accel>,
    ) -> anyhow::Result<smolvm::SandboxConfig> {
        Ok(smolvm::SandboxConfig {
            image: self.image.clone(),
            memory_mib: self.memory,
            cpus: self.cpus,
            accel: match self.accel {
                Some(x) => x,
                None => default_accel()?,
            },
            network: !self.no_network,
            cold: self.cold,
            egress: self.egress.policy()?,
            ports: self
                .publish
                .iter()
                .map(|p| smolvm::sandbox::parse_forward(p))
                .collect::<Result<_, _>>()?,
            ssh: self.ssh,
            ..smolvm::SandboxConfig::default()
        })
    }
}

/// Streams a running command's output to ours; returns the shell-style
/// exit status (code, or 128+signal; 124 on timeout like `timeout(1)`).
///
/// When the guest stops answering past the command's timeout (plus a
/// grace period) this gives up on it host-side: the error says so, the VM
/// is marked, and the status is 124 as for a timeout.
pub async fn stream_to_stdio(
    sbx: &smolvm::Sandbox,
    mut s: smolvm::sandbox::ExecStream,
) -> anyhow::Result<u8> {
    use smolvm::sandbox::{ClientError, ExecEvent};
    use tokio::io::AsyncWriteExt;
    let mut out = tokio::io::stdout();
    let mut err = tokio::io::stderr();
    loop {
        let ev = match s.next().await {
            Ok(ev) => ev,
            Err(ClientError::GuestTimeout(after)) => {
                let e = sbx.guest_unresponsive(after).await;
                crate::print_error(&anyhow::Error::new(e));
                return Ok(124);
            }
            Err(e) => return Err(e.into()),
        };
        match ev {
            None => anyhow::bail!("the command stream ended without an exit status"),
            Some(ExecEvent::Started { .. }) => {}
            Some(ExecEvent::Attached { dropped, .. }) => {
                if dropped > 0 {
                    eprintln!(
                        "smolvm: {dropped} bytes of earlier output were no longer buffered (the guest keeps the last 1 MiB)"
                    );
                }
            }
            Some(ExecEvent::Stdout(b)) => {
                out.write_all(&b).await?;
                out.flush().await?;
            }
            Some(ExecEvent::Stderr(b)) => {
                err.write_all(&b).await?;
                err.flush().await?;
            }
            Some(ExecEvent::Exited(st)) => {
                if st.timed_out {
                    eprintln!(
                        "smolvm: command timed out after {} ms and was killed",
                        st.duration_ms
                    );
                    return Ok(124);
                }
                return Ok(match (st.code, st.signal) {
                    (Some(c), _) => c.to_le_bytes()[0],
                    (None, Some(sig)) => u8::try_from(sig.saturating_add(128)).unwrap_or(255),
                    _ => 255,
                });
            }
            Some(ExecEvent::Failed(e)) => {
                anyhow::bail!("the guest could not run the command: {}", e.message)
            }
        }
    }
}

/// The command to run: one argument is still argv (no shell) unless
/// `--shell` is given.
pub fn guest_command(argv: Vec<String>, shell: bool) -> anyhow::Result<smolvm::Command> {
    if argv.is_empty() {
        anyhow::bail!("no command given; usage: smolvm run [OPTIONS] -- CMD [ARG...]");
    }
    Ok(if shell {
        smolvm::Command::Shell(argv.join(" "))
    } else {
        smolvm::Command::Argv(argv)
    })
}

/// Longest duration a flag may ask for (a year).
const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

/// A positive, finite number of seconds up to a year.
pub fn seconds(v: f64, what: &str) -> anyhow::Result<std::time::Duration> {
    if !(v > 0.0 && v <= MAX_SECONDS) {
        anyhow::bail!("{what} must be a number of seconds between 0 and {MAX_SECONDS:.0}");
    }
    Ok(std::time::Duration::from_secs_f64(v))
}

/// Prints `rows` under `header` in left-aligned columns two spaces apart.
pub fn print_columns<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut w = [0usize; N];
    for (i, h) in header.iter().enumerate() {
        w[i] = rows
            .iter()
            .map(|r| r[i].len())
            .max()
            .unwrap_or(0)
            .max(h.len());
    }
    let line = |cells: [&str; N]| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            s.push_str(&format!("{:<width$}  ", c, width = w[i]));
        }
        println!("{}", s.trim_end());
    };
    line(header);
    for r in rows {
        line(std::array::from_fn(|i| r[i].as_str()));
    }
}
