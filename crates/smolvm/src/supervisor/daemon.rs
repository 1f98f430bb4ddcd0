//! Starting the supervisor detached from its creator.
//!
//! `spawn` runs `smolvm-supervisor --vm-dir DIR`. That process forks: the
//! child starts a new session and serves; the parent waits on a pipe until
//! the child has launched the VMM and listens on its socket (or failed), then
//! exits with the outcome. So `spawn` returns only when the supervisor is
//! reachable, and no zombie is left with the creator.

use crate::backend::{LaunchSpec, VmDir};
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error(transparent)]
    Locate(#[from] crate::locate::LocateError),
    #[error("cannot run the supervisor {path}")]
    Exec {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The supervisor started but could not launch the VM.
    #[error("{0}")]
    Failed(smolvm_proto::supervisor::ControlError),
}

/// Starts the supervisor for the VM whose `launch.json` is in `vm_dir`.
/// Returns once it serves, with the VMM launched. Cancel-safe: dropping
/// the future kills the launcher (the daemon it forked then finds its VM
/// gone, or is ended by whoever dropped us).
pub async fn spawn(vm_dir: &Path) -> Result<(), SpawnError> {
    let bin = crate::locate::supervisor_binary()?;
    let out = tokio::process::Command::new(&bin)
        .kill_on_drop(true)
        .arg("--vm-dir")
        .arg(vm_dir)
        // Absolute roots: the supervisor works in the VM directory.
        .env("SMOLVM_DATA_DIR", crate::paths::data_dir())
        .env("SMOLVM_CACHE_DIR", crate::paths::cache_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(|source| SpawnError::Exec {
            path: bin.clone(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    use smolvm_proto::supervisor::{ControlError, ControlErrorKind};
    // The launcher prints the child's error as JSON (see `main_entry`);
    // anything else is the launcher's own message.
    let text = String::from_utf8_lossy(&out.stderr).trim().to_string();
    let err = match serde_json::from_str::<ControlError>(&text) {
        Ok(e) => e,
        Err(_) if text.is_empty() => ControlError::new(
            ControlErrorKind::Other,
            format!("the supervisor exited with {}", out.status),
        ),
        Err(_) => ControlError::new(ControlErrorKind::Other, text),
    };
    Err(SpawnError::Failed(err))
}

fn die(msg: &str) -> ! {
    let _ = writeln!(std::io::stderr(), "{msg}");
    std::process::exit(1)
}

/// Entry point of the `smolvm-supervisor` binary.
pub fn main_entry() -> ! {
    // Everything this process and its children (the VMM) create — sockets,
    // the guest RAM file, logs — is private to the owner.
    // SAFETY: umask only sets this process's file-creation mask.
    unsafe { libc::umask(crate::private::CHILD_UMASK) };
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--net-holder") {
        crate::backend::qemu::dns::holder_main(&args[2..]);
    }
    let vm_dir = match args.as_slice() {
        [_, flag, dir] if flag == "--vm-dir" => VmDir::at(dir),
        _ => die("usage: smolvm-supervisor --vm-dir DIR (started by smolvm; not for direct use)"),
    };
    let spec: LaunchSpec = match std::fs::read(vm_dir.launch_spec())
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => die(&format!(
            "cannot read {}: {e}",
            vm_dir.launch_spec().display()
        )),
    };

    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        die(&format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by us alone.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process is single-threaded here (no runtime started yet),
    // so fork is safe; the child only continues in plain Rust code.
    match unsafe { libc::fork() } {
        -1 => die(&format!("fork: {}", std::io::Error::last_os_error())),
        0 => {
            drop(rd);
            child(spec, vm_dir, wr)
        }
        _ => {
            drop(wr);
            let mut r = std::fs::File::from(rd);
            let mut buf = Vec::new();
            let _ = Read::by_ref(&mut r).take(64 * 1024).read_to_end(&mut buf);
            if buf.first() == Some(&b'R') {
                std::process::exit(0);
            }
            // `E` + the error as JSON: passed through to `spawn`.
            let msg = String::from_utf8_lossy(buf.get(1..).unwrap_or_default())
                .trim()
                .to_string();
            die(if msg.is_empty() {
                "the supervisor died while starting the VM"
            } else {
                &msg
            })
        }
    }
}

/// The launcher's pid, seen by the forked supervisor.
static LAUNCHER: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// Until it is ready, the supervisor lives only as long as the launcher
/// that waits for it: a start that was cancelled (the launcher killed)
/// takes the half-started VM with it (QEMU and the network helpers die
/// with the supervisor in turn).
fn tie_to_launcher() {
    let launcher = std::os::unix::process::parent_id();
    let _ = LAUNCHER.set(launcher);
    // SAFETY: prctl only sets this process's parent-death signal.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    if std::os::unix::process::parent_id() != launcher {
        std::process::exit(1); // it died before the signal was armed
    }
}

/// Once ready: from now on the supervisor outlives the launcher (which
/// exits as soon as it reads the readiness byte). False when the launcher
/// is already gone: nobody will ever be told this VM started.
pub(super) fn detach_from_launcher() -> bool {
    // SAFETY: prctl only clears this process's parent-death signal.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0, 0, 0, 0) };
    LAUNCHER
        .get()
        .is_none_or(|l| std::os::unix::process::parent_id() == *l)
}

fn child(spec: LaunchSpec, vm_dir: VmDir, ready: OwnedFd) -> ! {
    tie_to_launcher();
    // SAFETY: setsid has no memory-safety preconditions.
    unsafe { libc::setsid() };
    redirect_stdio(&vm_dir.supervisor_log());
    if let Err(e) = std::env::set_current_dir(&vm_dir) {
        let mut f = std::fs::File::from(ready);
        let _ = write!(
            f,
            "E{}",
            start_error(format!("cannot enter {}: {e}", vm_dir.display()))
        );
        std::process::exit(1);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let mut f = std::fs::File::from(ready);
            let _ = write!(
                f,
                "E{}",
                start_error(format!("cannot start the async runtime: {e}"))
            );
            std::process::exit(1);
        }
    };
    let code = rt.block_on(super::server::serve(
        spec,
        vm_dir,
        std::fs::File::from(ready),
    ));
    std::process::exit(code)
}

fn redirect_stdio(log: &Path) {
    let devnull = std::fs::File::open("/dev/null");
    let logf = crate::private::append(log);
    use std::os::fd::AsRawFd;
    // SAFETY: dup2 onto the standard fds with valid open fds; the Files stay
    // alive until after the calls.
    unsafe {
        if let Ok(n) = &devnull {
            libc::dup2(n.as_raw_fd(), 0);
        }
        if let Ok(l) = &logf {
            libc::dup2(l.as_raw_fd(), 1);
            libc::dup2(l.as_raw_fd(), 2);
        }
    }
}

fn start_error(msg: String) -> String {
    use smolvm_proto::supervisor::{ControlError, ControlErrorKind};
    serde_json::to_string(&ControlError::new(ControlErrorKind::Other, msg)).unwrap_or_default()
}
