//! The guest's SSH server, on demand (`OpRequest::SshStart`).
//!
//! There is no init system, so the agent does what the sshd unit would:
//! the privilege-separation directory, an Ed25519 host key when there is
//! none (the image ships none: one per machine, made on first use; RSA
//! would cost seconds under TCG), then `sshd -D` as a background process
//! (listed by `smolvm ps`, its log in its output buffer), listening on the
//! guest's loopback only: the host reaches it through a tunnel, never
//! through the guest's network. Keys only, root only by key.

use crate::procs::Procs;
use smolvm_proto::{Command, ErrorInfo, ErrorKind, ExecRequest, OpReply};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const HOST_KEY: &str = "/etc/ssh/ssh_host_ed25519_key";
const SSHD: &str = "/usr/sbin/sshd";
const KEYGEN: &str = "/usr/bin/ssh-keygen";
const AUTHORIZED: &str = "/root/.ssh/authorized_keys";
/// Longest public key line taken from the host.
const MAX_KEY_LINE: usize = 8 * 1024;
/// How long sshd gets to listen.
const LISTEN_WAIT: Duration = Duration::from_secs(10);

/// The background process running sshd, when one was started.
static SSHD_HANDLE: Mutex<Option<u64>> = Mutex::new(None);
/// One `SshStart` at a time.
static STARTING: Mutex<()> = Mutex::new(());

fn err(kind: ErrorKind, msg: impl Into<String>) -> ErrorInfo {
    ErrorInfo::new(kind, msg)
}

/// An OpenSSH public key line: `TYPE BASE64 [COMMENT]`, one line, printable.
fn check_key(k: &str) -> Result<&str, ErrorInfo> {
    let k = k.trim_end_matches('\n');
    let mut f = k.split(' ');
    let (ty, blob) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
    let ok = k.len() <= MAX_KEY_LINE
        && k.bytes().all(|b| (0x20..0x7f).contains(&b))
        && matches!(
            ty,
            "ssh-ed25519" | "ssh-rsa" | "ecdsa-sha2-nistp256" | "ecdsa-sha2-nistp384"
        )
        && !blob.is_empty()
        && blob
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=');
    if ok {
        Ok(k)
    } else {
        Err(err(
            ErrorKind::InvalidRequest,
            "the authorized key is not one OpenSSH public key line",
        ))
    }
}

/// Runs a short command to its end as a background process (the reaper
/// owns every child), then forgets it. Returns its output on failure.
fn run(procs: &Arc<Procs>, argv: &[&str], limit: Duration) -> Result<(), ErrorInfo> {
    let (handle, _) = procs.spawn(&ExecRequest {
        command: Command::Argv(argv.iter().map(|s| s.to_string()).collect()),
        env: vec![],
        workdir: None,
        timeout_ms: Some(u64::try_from(limit.as_millis()).unwrap_or(u64::MAX)),
        stdin: false,
        pty: None,
    })?;
    loop {
        let Some((info, tail)) = procs.status(handle, 2048) else {
            return Err(err(ErrorKind::Other, format!("{} vanished", argv[0])));
        };
        if let Some(exit) = info.exit {
            let _ = procs.op(smolvm_proto::OpRequest::ProcForget { handle });
            return if exit.code == Some(0) {
                Ok(())
            } else {
                Err(err(
                    ErrorKind::Other,
                    format!("{} failed ({exit:?}): {}", argv[0], tail.trim()),
                ))
            };
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn io_err(what: &str, e: &std::io::Error) -> ErrorInfo {
    err(ErrorKind::Other, format!("{what}: {e}"))
}

/// Adds `key` to root's authorized keys unless it is there already.
fn authorize(key: &str) -> Result<(), ErrorInfo> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create("/root/.ssh")
        .map_err(|e| io_err("/root/.ssh", &e))?;
    let have = std::fs::read_to_string(AUTHORIZED).unwrap_or_default();
    if have.lines().any(|l| l.trim() == key) {
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(AUTHORIZED)
        .map_err(|e| io_err(AUTHORIZED, &e))?;
    let sep = if have.is_empty() || have.ends_with('\n') {
        ""
    } else {
        "\n"
    };
    f.write_all(format!("{sep}{key}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| io_err(AUTHORIZED, &e))
}

fn running(procs: &Procs, handle: Option<u64>) -> Option<u64> {
    let h = handle?;
    let (info, _) = procs.status(h, 0)?;
    info.exit.is_none().then_some(h)
}

fn listening() -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], 22)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// `SshStart`: the server runs with a host key and lets `key` in; answers
/// the host public key.
pub fn start(procs: &Arc<Procs>, key: &str, new_host_key: bool) -> Result<OpReply, ErrorInfo> {
    let key = check_key(key)?;
    let _one = STARTING.lock().unwrap_or_else(|e| e.into_inner());
    let mut handle = running(
        procs,
        *SSHD_HANDLE.lock().unwrap_or_else(|e| e.into_inner()),
    );
    std::fs::DirBuilder::new()
        .mode(0o755)
        .recursive(true)
        .create("/run/sshd")
        .map_err(|e| io_err("/run/sshd", &e))?;
    let missing = !std::path::Path::new(HOST_KEY).exists();
    if new_host_key || missing {
        if let Some(h) = handle.take() {
            // A server holding the old key: replaced below.
            let _ = procs.op(smolvm_proto::OpRequest::ProcSignal {
                handle: h,
                signal: libc::SIGTERM,
            });
            let until = Instant::now() + Duration::from_secs(5);
            while running(procs, Some(h)).is_some() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        for f in [HOST_KEY.to_string(), format!("{HOST_KEY}.pub")] {
            let _ = std::fs::remove_file(f);
        }
        run(
            procs,
            &[
                KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", HOST_KEY,
            ],
            Duration::from_secs(30),
        )?;
    }
    authorize(key)?;
    let host_key = std::fs::read_to_string(format!("{HOST_KEY}.pub"))
        .map_err(|e| io_err(&format!("{HOST_KEY}.pub"), &e))?;
    let host_key = host_key
        .split(' ')
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
        .trim()
        .to_string();
    if handle.is_none() {
        let (h, _) = procs.spawn(&ExecRequest {
            command: Command::Argv(
                [
                    SSHD,
                    "-D",
                    "-e",
                    // No config file: the image's (ListenAddress, Match
                    // blocks, Include) would add to what we pass.
                    "-f",
                    "/dev/null",
                    "-h",
                    HOST_KEY,
                    "-o",
                    "Subsystem=sftp internal-sftp",
                    "-o",
                    "ListenAddress=127.0.0.1",
                    "-o",
                    "Port=22",
                    "-o",
                    "PasswordAuthentication=no",
                    "-o",
                    "KbdInteractiveAuthentication=no",
                    "-o",
                    "PermitRootLogin=prohibit-password",
                    "-o",
                    "UsePAM=no",
                    "-o",
                    "AuthorizedKeysFile=.ssh/authorized_keys",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            ),
            env: vec![],
            workdir: Some("/".into()),
            timeout_ms: None,
            stdin: false,
            pty: None,
        })?;
        *SSHD_HANDLE.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
        let until = Instant::now() + LISTEN_WAIT;
        while !listening() {
            if let Some((info, tail)) = procs.status(h, 2048) {
                if info.exit.is_some() {
                    return Err(err(
                        ErrorKind::Other,
                        format!("sshd exited at start: {}", tail.trim()),
                    ));
                }
            }
            if Instant::now() > until {
                return Err(err(
                    ErrorKind::Unavailable,
                    format!("sshd did not listen within {}s", LISTEN_WAIT.as_secs()),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        info!("sshd started (background process {h})");
    }
    Ok(OpReply::Ssh { host_key })
}
