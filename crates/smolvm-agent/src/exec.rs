//! Exec requests: spawning a process in its own session, feeding its stdin,
//! streaming its stdout/stderr, enforcing its timeout and reporting its exit.
//!
//! Per exec: one I/O thread (polls stdout, stderr and the reaper's status
//! pipe; sends every output frame and then `Exited`, so `Exited` is always
//! the stream's last frame) and, when stdin is wanted, one stdin thread (a
//! child that does not read must not stall the reader of the channel).

use crate::reaper::{self, STATUS_LEN};
use crate::sys::{boottime_ms, kill, os_message, poll_timeout, readable_now};
use crate::writer::Outbox;
use smolvm_proto::{
    Bytes, Command, ErrorInfo, ErrorKind, ExecRequest, ExitStatus, GuestMsg, MAX_CHUNK_LEN,
};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{ChildStdin, Stdio};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Most execs running at once; more get `Error(Busy)`.
pub const MAX_EXECS: usize = 256;

/// How long output pipes may stay open after the main process exited (a
/// background child holding them) before the exec is finished anyway.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(200);

/// Most bytes read from one pipe in the final drain (the largest pipe a
/// non-root process can ask for).
const MAX_DRAIN: usize = 1024 * 1024;

const BASE_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("USER", "root"),
    ("LOGNAME", "root"),
    ("LANG", "C.UTF-8"),
    ("TERM", "dumb"),
];

pub enum StdinMsg {
    Data(Bytes),
    Close,
}

struct Entry {
    /// Process group (= pid of the session leader); 0 while spawning.
    pgid: libc::pid_t,
    stdin: Option<Sender<StdinMsg>>,
}

/// The running execs, by stream id.
#[derive(Default)]
pub struct Execs {
    table: Mutex<HashMap<u32, Entry>>,
}

impl Execs {
    fn lock(&self) -> MutexGuard<'_, HashMap<u32, Entry>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts `req` on `stream`. `Started` and everything after it are sent
    /// by this exec; an `Err` is for the caller to send as the stream's
    /// `Error`.
    pub fn start(
        self: &Arc<Self>,
        stream: u32,
        req: ExecRequest,
        out: &Outbox,
    ) -> Result<(), ErrorInfo> {
        {
            let mut t = self.lock();
            if t.contains_key(&stream) {
                return Err(ErrorInfo::new(
                    ErrorKind::InvalidRequest,
                    format!("stream {stream} is already in use"),
                ));
            }
            if t.len() >= MAX_EXECS {
                return Err(ErrorInfo::new(
                    ErrorKind::Busy,
                    format!("{MAX_EXECS} processes are running already"),
                ));
            }
            t.insert(
                stream,
                Entry {
                    pgid: 0,
                    stdin: None,
                },
            );
        }
        let r = self.launch(stream, &req, out);
        if r.is_err() {
            self.lock().remove(&stream);
        }
        r
    }

    fn launch(
        self: &Arc<Self>,
        stream: u32,
        req: &ExecRequest,
        out: &Outbox,
    ) -> Result<(), ErrorInfo> {
        let (mut cmd, program) = build_command(req)?;
        let started = Instant::now();
        let started_ms = boottime_ms();
        let (mut child, status) =
            reaper::spawn(|| cmd.spawn()).map_err(|e| spawn_error(&program, &e))?;
        // Linux pids are positive and fit in pid_t.
        let pid = child.id().cast_signed();
        let (stdin, stdout, stderr) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take());
        drop(child); // never wait on it: the reaper owns that
        out.send(
            stream,
            GuestMsg::Started {
                pid: pid.cast_unsigned(),
            },
        );

        let stdin = stdin.and_then(|pipe| match start_stdin(stream, pipe) {
            Ok(tx) => Some(tx),
            Err(e) => {
                error!("stream {stream}: no stdin thread ({e}); stdin is closed");
                None
            }
        });
        if let Some(entry) = self.lock().get_mut(&stream) {
            entry.pgid = pid;
            entry.stdin = stdin;
        }
        let io = Io {
            stream,
            pid,
            out: out.clone(),
            pipes: [
                stdout.map(|p| File::from(OwnedFd::from(p))),
                stderr.map(|p| File::from(OwnedFd::from(p))),
            ],
            status: Some(File::from(status)),
            started,
            started_ms,
            timeout: req.timeout_ms.map(Duration::from_millis),
        };
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name(format!("exec-{stream}"))
            .stack_size(128 * 1024)
            .spawn(move || io.run(&me))
            .map(drop)
            .map_err(|e| {
                kill_group(pid);
                ErrorInfo::new(
                    ErrorKind::Other,
                    format!("cannot start a thread for the process: {e}"),
                )
            })
    }

    /// Passes stdin data or close to the stream's process; ignored when the
    /// stream has no process or did not ask for stdin.
    pub fn stdin(&self, stream: u32, msg: StdinMsg) {
        let mut t = self.lock();
        let Some(entry) = t.get_mut(&stream) else {
            return;
        };
        if matches!(msg, StdinMsg::Close) {
            // Dropping the sender ends the stdin thread after it closes the pipe.
            if let Some(tx) = entry.stdin.take() {
                let _ = tx.send(StdinMsg::Close);
            }
        } else if let Some(tx) = &entry.stdin {
            let _ = tx.send(msg);
        }
    }

    /// Sends `signal` to the stream's process group; ignored when the stream
    /// has no process.
    pub fn signal(&self, stream: u32, signal: i32) {
        let pgid = match self.lock().get(&stream) {
            Some(e) if e.pgid > 0 => e.pgid,
            _ => return,
        };
        match kill(-pgid, signal) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => error!("stream {stream}: signal {signal}: {}", os_message(&e)),
        }
    }

    /// SIGKILLs every running exec's process group.
    pub fn kill_all(&self) {
        for e in self.lock().values() {
            if e.pgid > 0 {
                kill_group(e.pgid);
            }
        }
    }
}

fn kill_group(pid: libc::pid_t) {
    let _ = kill(-pid, libc::SIGKILL);
    // The leader may have left its group (setsid/setpgid).
    let _ = kill(pid, libc::SIGKILL);
}

fn invalid(msg: impl Into<String>) -> ErrorInfo {
    ErrorInfo::new(ErrorKind::InvalidRequest, msg)
}

/// Builds the command; returns it with the program name for error messages.
fn build_command(req: &ExecRequest) -> Result<(std::process::Command, String), ErrorInfo> {
    let (program, args): (&str, Vec<&str>) = match &req.command {
        Command::Argv(v) => match v.split_first() {
            Some((p, rest)) => (p, rest.iter().map(String::as_str).collect()),
            None => return Err(invalid("empty argv")),
        },
        Command::Shell(s) => ("/bin/sh", vec!["-c", s]),
    };
    if program.contains('\0') || args.iter().any(|a| a.contains('\0')) {
        return Err(invalid("the command contains a NUL byte"));
    }
    for (k, v) in &req.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(invalid(format!(
                "invalid environment variable name or value: {k:?}"
            )));
        }
    }
    let workdir = req.workdir.as_deref().unwrap_or("/");
    match std::fs::metadata(workdir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(ErrorInfo::new(
                ErrorKind::NotFound,
                format!("working directory {workdir}: Not a directory"),
            ))
        }
        Err(e) => {
            let kind = match e.raw_os_error() {
                Some(libc::EACCES) | Some(libc::EPERM) => ErrorKind::PermissionDenied,
                _ => ErrorKind::NotFound,
            };
            return Err(ErrorInfo::new(
                kind,
                format!("working directory {workdir}: {}", os_message(&e)),
            ));
        }
    }

    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(BASE_ENV.iter().copied())
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .current_dir(workdir)
        .stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: `child_setup` runs between fork and exec and only makes
    // async-signal-safe calls (setsid, sigemptyset, sigprocmask, signal); it
    // allocates nothing and touches no lock.
    unsafe { cmd.pre_exec(child_setup) };
    Ok((cmd, program.to_string()))
}

/// In the child before exec: own session and process group (so signals and
/// timeouts reach everything it starts), no blocked signals, default SIGPIPE.
fn child_setup() -> io::Result<()> {
    // SAFETY: plain syscalls on a local, zero-initialised sigset_t.
    unsafe {
        if libc::setsid() == -1 {
            return Err(io::Error::last_os_error());
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    Ok(())
}

fn spawn_error(program: &str, e: &io::Error) -> ErrorInfo {
    let kind = match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => ErrorKind::NotFound,
        Some(libc::EACCES) | Some(libc::EPERM) => ErrorKind::PermissionDenied,
        None if e.kind() == io::ErrorKind::InvalidInput => ErrorKind::InvalidRequest,
        _ => ErrorKind::Other,
    };
    ErrorInfo::new(kind, format!("{program}: {}", os_message(e)))
}

fn start_stdin(stream: u32, mut pipe: ChildStdin) -> io::Result<Sender<StdinMsg>> {
    let (tx, rx) = channel();
    std::thread::Builder::new()
        .name(format!("stdin-{stream}"))
        .stack_size(64 * 1024)
        .spawn(move || {
            let mut open = true;
            for msg in rx {
                match msg {
                    // EPIPE (the process stopped reading for good): drop the rest.
                    StdinMsg::Data(b) if open => open = pipe.write_all(&b).is_ok(),
                    StdinMsg::Data(_) => {}
                    StdinMsg::Close => break,
                }
            }
        })?;
    Ok(tx)
}

/// The I/O side of one running exec.
struct Io {
    stream: u32,
    pid: libc::pid_t,
    out: Outbox,
    /// stdout, stderr; `None` once at EOF.
    pipes: [Option<File>; 2],
    /// The reaper's status pipe; `None` once the status arrived.
    status: Option<File>,
    started: Instant,
    started_ms: u64,
    timeout: Option<Duration>,
}

impl Io {
    fn run(mut self, execs: &Execs) {
        let mut buf = vec![0u8; MAX_CHUNK_LEN];
        // A timeout too large to represent is no timeout.
        let kill_at = self.timeout.and_then(|t| self.started.checked_add(t));
        let mut timed_out = false;
        // (raw wait status, reap time) once known; when we learned it.
        let mut exit: Option<(Option<libc::c_int>, u64)> = None;
        let mut exit_seen: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if exit.is_none() && !timed_out && kill_at.is_some_and(|k| now >= k) {
                kill_group(self.pid);
                timed_out = true;
            }
            let deadline = match exit_seen {
                Some(seen) => {
                    if self.pipes.iter().all(Option::is_none) {
                        break;
                    }
                    if now >= seen + DRAIN_AFTER_EXIT {
                        self.drain(&mut buf);
                        break;
                    }
                    Some(seen + DRAIN_AFTER_EXIT)
                }
                None if !timed_out => kill_at,
                None => None,
            };
            let timeout = poll_timeout(deadline.map(|d| d.saturating_duration_since(now)));

            let mut fds = [libc::pollfd {
                fd: -1,
                events: libc::POLLIN,
                revents: 0,
            }; 3];
            for (slot, f) in fds
                .iter_mut()
                .zip(self.pipes.iter().chain(std::iter::once(&self.status)))
            {
                if let Some(f) = f {
                    slot.fd = f.as_raw_fd();
                }
            }
            // SAFETY: `fds` is a valid array of 3 pollfds; negative fds are ignored.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                // Cannot happen with valid fds; never spin if it does.
                std::thread::sleep(Duration::from_millis(10));
            }
            if n <= 0 {
                continue; // timeout or EINTR: re-check the deadlines
            }
            for (i, p) in fds.iter().enumerate().take(2) {
                if p.fd >= 0 && p.revents != 0 {
                    self.read_chunk(i, &mut buf);
                }
            }
            if fds[2].fd >= 0 && fds[2].revents != 0 {
                exit = Some(self.read_status());
                exit_seen = Some(Instant::now());
            }
        }

        execs.lock().remove(&self.stream);
        let (raw, reaped_ms) = exit.unwrap_or((None, boottime_ms()));
        let (code, signal) = match raw {
            Some(st) if libc::WIFEXITED(st) => (Some(libc::WEXITSTATUS(st)), None),
            Some(st) if libc::WIFSIGNALED(st) => (None, Some(libc::WTERMSIG(st))),
            _ => (None, None),
        };
        let duration_ms = match raw {
            Some(_) => reaped_ms.saturating_sub(self.started_ms),
            None => u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
        };
        self.out.send(
            self.stream,
            GuestMsg::Exited(ExitStatus {
                code,
                signal,
                timed_out,
                duration_ms,
            }),
        );
    }

    /// Reads one chunk from pipe `i` and sends it; closes the pipe at EOF.
    /// Returns the bytes read.
    fn read_chunk(&mut self, i: usize, buf: &mut [u8]) -> usize {
        let Some(pipe) = self.pipes[i].as_mut() else {
            return 0;
        };
        match pipe.read(buf) {
            Ok(0) => {
                self.pipes[i] = None;
                0
            }
            Ok(n) => {
                let data = Bytes(buf[..n].to_vec());
                let msg = if i == 0 {
                    GuestMsg::Stdout(data)
                } else {
                    GuestMsg::Stderr(data)
                };
                self.out.send(self.stream, msg);
                n
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => {
                error!("stream {}: read output: {e}", self.stream);
                self.pipes[i] = None;
                0
            }
        }
    }

    /// The drain period ran out: send what the pipes already hold (all that
    /// the main process wrote before it exited) without waiting for more.
    fn drain(&mut self, buf: &mut [u8]) {
        for i in 0..2 {
            let mut budget = MAX_DRAIN;
            while budget > 0 {
                match &self.pipes[i] {
                    Some(p) if readable_now(p.as_fd()) => {}
                    _ => break,
                }
                let n = self.read_chunk(i, buf);
                if n == 0 && self.pipes[i].is_some() {
                    break; // EINTR or similar: give up rather than spin
                }
                budget = budget.saturating_sub(n);
            }
            self.pipes[i] = None;
        }
    }

    fn read_status(&mut self) -> (Option<libc::c_int>, u64) {
        let mut rec = [0u8; STATUS_LEN];
        let r = self.status.take().map(|mut f| f.read_exact(&mut rec));
        match r {
            Some(Ok(())) => {
                let (st, t) = reaper::decode(&rec);
                (Some(st), t)
            }
            _ => {
                error!(
                    "stream {}: lost the exit status of pid {}",
                    self.stream, self.pid
                );
                (None, boottime_ms())
            }
        }
    }
}
