//! Port forwards and SSH for Python: forwards and SSH access as plain
//! data, and commands run through SSH (`comm_channel="ssh"`).

use smolvm::sandbox::{shell_quote, SshAccess, GUEST_SSH_PORT};
use smolvm::{Error, ErrorKind, ExecOutput, Result, VmState};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A handle's SSH access, set up on first use and reused while it holds.
pub(crate) type SshCache = Arc<Mutex<Option<SshAccess>>>;

/// How long past a command's own timeout the host waits for SSH to
/// report it (the guest kills the command at its timeout).
const SSH_GRACE: Duration = Duration::from_secs(5);
/// "No limit": far enough that nobody waits for it.
const NO_LIMIT: Duration = Duration::from_secs(365 * 24 * 3600);
/// The exit status of `timeout -s KILL` when it killed the command.
const KILLED: i32 = 128 + 9;

/// A forward as `{"host_address", "host_port", "guest_port"}`.
pub(crate) fn forward_json(f: &smolvm::config::PortForward) -> serde_json::Value {
    serde_json::json!({
        "host_address": f.host_addr.to_string(),
        "host_port": f.host_port,
        "guest_port": f.guest_port,
    })
}

/// What a client needs to log in, with the whole command line.
pub(crate) fn access_json(a: &SshAccess) -> serde_json::Value {
    serde_json::json!({
        "host": a.host.to_string(),
        "port": a.port,
        "user": a.user,
        "key": a.key,
        "known_hosts": a.known_hosts,
        "alias": a.alias,
        "host_key": a.host_key,
        "argv": a.argv(),
        "command_line": a.command_line(),
    })
}

/// Refuses SSH to a VM that is not running: its agent cannot start sshd
/// (and a paused guest would answer nobody).
pub(crate) async fn check_running(sb: &smolvm::Sandbox) -> Result<()> {
    let state = sb.status().await?;
    if state == VmState::Running {
        return Ok(());
    }
    Err(Error::InvalidState {
        id: sb.id().to_string(),
        state,
        hint: format!(
            "SSH works while it runs; run `smolvm {} {}` first",
            if state == VmState::Paused {
                "resume"
            } else {
                "start"
            },
            sb.id()
        ),
    })
}

/// The cached access while it still works for this VM (its host key is
/// the pinned one and its forward is open), else a new one.
pub(crate) async fn access(sb: &smolvm::Sandbox, cache: &SshCache) -> Result<SshAccess> {
    check_running(sb).await?;
    let cached = cache.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(a) = cached {
        // A restore drops the pinned key; a stop closes the forward.
        if sb.pinned_host_key().as_deref() == Some(a.host_key.as_str()) {
            let open = sb.ports().await?.into_iter().any(|p| {
                p.guest_port == GUEST_SSH_PORT && p.host_port == a.port && p.host_addr == a.host
            });
            if open {
                return Ok(a);
            }
        }
    }
    let a = sb.ensure_ssh().await?;
    *cache.lock().unwrap_or_else(|p| p.into_inner()) = Some(a.clone());
    Ok(a)
}

/// One command for SSH's `exec`.
pub(crate) struct SshCommand {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub timeout: Option<Duration>,
    pub max_output: Option<usize>,
}

/// The remote shell line: the VM's environment and the command's own,
/// the working directory, the guest-side timeout (`timeout` kills the
/// command's process group), then the argv, each word quoted.
fn remote_line(cmd: &SshCommand, vm_env: BTreeMap<String, String>) -> String {
    let mut env = vm_env;
    env.extend(cmd.env.iter().cloned());
    let mut words: Vec<String> = Vec::new();
    if let Some(cwd) = &cmd.cwd {
        words.push(format!("cd {} &&", shell_quote(cwd)));
    }
    words.push("exec env".into());
    words.extend(env.iter().map(|(k, v)| shell_quote(&format!("{k}={v}"))));
    if let Some(t) = cmd.timeout {
        words.push(format!("timeout -s KILL {:.3}", t.as_secs_f64()));
    }
    words.extend(cmd.argv.iter().map(|a| shell_quote(a)));
    words.join(" ")
}

fn cap(mut v: Vec<u8>, max: Option<usize>) -> (Vec<u8>, bool) {
    match max {
        Some(m) if v.len() > m => {
            v.truncate(m);
            (v, true)
        }
        _ => (v, false),
    }
}

/// Runs `cmd` over the VM's persistent SSH connection; the result has the
/// shape of an agent exec (a timeout is `timed_out`, not an error).
pub(crate) async fn ssh_exec(
    sb: &smolvm::Sandbox,
    cache: &SshCache,
    cmd: SshCommand,
) -> Result<ExecOutput> {
    let a = access(sb, cache).await?;
    let line = remote_line(&cmd, sb.env().await?);
    let wait = cmd.timeout.map_or(NO_LIMIT, |t| t + SSH_GRACE);
    let started = Instant::now();
    let r = sb.ssh_output(&a, &[line], wait, true).await;
    let elapsed = started.elapsed();
    let duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
    let past_timeout = cmd.timeout.is_some_and(|t| elapsed >= t);
    let (code, stdout, stderr) = match r {
        Ok(out) => out,
        // `timeout -s KILL` kills its whole process group, itself too:
        // sshd then reports a signal, which ssh turns into its own
        // failure (255). The host's wait ran out: the guest's did first.
        Err(e)
            if e.kind() == ErrorKind::Timeout
                || (e.kind() == ErrorKind::Network && past_timeout) =>
        {
            return Ok(ExecOutput {
                timed_out: true,
                duration_ms,
                ..ExecOutput::default()
            })
        }
        Err(e) => return Err(e),
    };
    let timed_out = code == KILLED && past_timeout;
    let (stdout, t1) = cap(stdout, cmd.max_output);
    let (stderr, t2) = cap(stderr, cmd.max_output);
    Ok(ExecOutput {
        exit_code: Some(code),
        signal: None,
        timed_out,
        stdout,
        stderr,
        truncated: t1 || t2,
        duration_ms,
    })
}
