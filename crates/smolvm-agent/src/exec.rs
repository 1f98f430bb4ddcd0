//! Exec requests: spawning a process in its own session, feeding its stdin,
//! streaming its stdout/stderr, enforcing its timeout and reporting its exit.
//!
//! Per exec: one I/O thread (polls stdout, stderr, the reaper's status pipe
//! and the stream's credit; sends every output frame and then `Exited`, so
//! `Exited` is always the stream's last frame) and, when stdin is wanted,
//! one stdin thread (a child that does not read must not stall the reader of
//! the channel). Output is read only against the host's credit: a stream
//! the host does not drain leaves its pipes full and its process blocked.

use crate::reaper::{self, STATUS_LEN};
use crate::streams::{Credit, InMsg, InputRx, Slot, Streams};
use crate::sys::{boottime_ms, cvt, kill, os_message, poll_timeout, readable_now};
use crate::writer::Outbox;
use smolvm_proto::{
    Bytes, Command, ErrorInfo, ErrorKind, ExecRequest, ExitStatus, GuestMsg, PtySize, MAX_CHUNK_LEN,
};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// Starts `req` on `stream`. `Started` and everything after it are sent by
/// the exec; an `Err` is for the caller to send as the stream's `Error`.
pub fn start(
    streams: &Arc<Streams>,
    stream: u32,
    req: &ExecRequest,
    out: &Outbox,
) -> Result<(), ErrorInfo> {
    let (slot, credit, input) = streams.open(stream, true, req.stdin || req.pty.is_some(), out)?;
    let r = match credit {
        Some(credit) => launch(streams, slot, req, out, credit, input),
        None => Err(ErrorInfo::new(ErrorKind::Other, "no credit for the stream")),
    };
    if r.is_err() {
        streams.close(slot);
    }
    r
}

fn launch(
    streams: &Arc<Streams>,
    slot: Slot,
    req: &ExecRequest,
    out: &Outbox,
    credit: Arc<Credit>,
    input: Option<InputRx>,
) -> Result<(), ErrorInfo> {
    let stream = slot.stream;
    let (mut cmd, program, master) = build_command(req)?;
    let started = Instant::now();
    let started_ms = boottime_ms();
    let (mut child, status) =
        reaper::spawn(|| cmd.spawn()).map_err(|e| spawn_error(&program, &e))?;
    // Linux pids are positive and fit in pid_t.
    let pid = child.id().cast_signed();
    let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    drop(child); // never wait on it: the reaper owns that
                 // (`cmd` still holds the slave's dups: dropped with it below.)
    drop(cmd);
    streams.set_pgid(slot, pid);
    // A new stream has its whole window: this never waits.
    credit.send(
        out,
        stream,
        GuestMsg::Started {
            pid: pid.cast_unsigned(),
        },
    );
    let (input_fd, pipes): (Option<File>, [Option<File>; 2]) = match master {
        None => (
            stdin.map(|p| File::from(OwnedFd::from(p))),
            [
                stdout.map(|p| File::from(OwnedFd::from(p))),
                stderr.map(|p| File::from(OwnedFd::from(p))),
            ],
        ),
        Some(m) => {
            // Input and output both go through the master.
            let dup = |m: &OwnedFd| m.try_clone().ok().map(File::from);
            if let Ok(r) = m.try_clone() {
                streams.set_pty(slot, r);
            }
            (dup(&m), [Some(File::from(m)), None])
        }
    };
    let is_pty = req.pty.is_some();
    if let (Some(pipe), Some(input)) = (input_fd, input) {
        if let Err(e) = start_stdin(stream, pipe, input, is_pty) {
            error!("stream {stream}: no stdin thread ({e}); stdin is closed");
            streams.drop_input(slot);
        }
    }
    let io = Io {
        slot,
        stream,
        pid,
        out: out.clone(),
        credit,
        pipes,
        status: Some(File::from(status)),
        started,
        started_ms,
        timeout: req.timeout_ms.map(Duration::from_millis),
    };
    let me = Arc::clone(streams);
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

/// Sends `signal` to the stream's process group; ignored when the stream
/// has no process.
pub fn signal(streams: &Streams, stream: u32, signal: i32) {
    let Some(pgid) = streams.pgid(stream) else {
        return;
    };
    match kill(-pgid, signal) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
        Err(e) => error!("stream {stream}: signal {signal}: {}", os_message(&e)),
    }
}

pub fn kill_group(pid: libc::pid_t) {
    let _ = kill(-pid, libc::SIGKILL);
    // The leader may have left its group (setsid/setpgid).
    let _ = kill(pid, libc::SIGKILL);
}

fn invalid(msg: impl Into<String>) -> ErrorInfo {
    ErrorInfo::new(ErrorKind::InvalidRequest, msg)
}

/// Builds the command; returns it with the program name for error messages.
/// A new pseudo-terminal of `size`: (master, slave), both close-on-exec
/// (the child gets dups of the slave as its stdio).
fn open_pty(size: PtySize) -> io::Result<(OwnedFd, OwnedFd)> {
    let (mut master, mut slave): (libc::c_int, libc::c_int) = (-1, -1);
    let ws = winsize(size);
    // SAFETY: valid out-pointers for the two fds; no name buffer; a valid
    // winsize; default termios.
    cvt(unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    })?;
    // SAFETY: openpty succeeded: both fds are open and ours alone.
    let (m, sl) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&m, &sl] {
        // SAFETY: F_SETFD on an fd we own.
        cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) })?;
    }
    Ok((m, sl))
}

fn winsize(size: PtySize) -> libc::winsize {
    libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Sets a terminal's size (the kernel sends SIGWINCH to its foreground
/// process group).
pub fn resize(master: &OwnedFd, size: PtySize) {
    let ws = winsize(size);
    // SAFETY: TIOCSWINSZ reads one valid winsize.
    let _ = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

pub type Built = (std::process::Command, String, Option<OwnedFd>);

pub fn build_command(req: &ExecRequest) -> Result<Built, ErrorInfo> {
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
        .current_dir(workdir);
    let master = match req.pty {
        None => {
            cmd.envs(req.env.iter().map(|(k, v)| (k, v)))
                .stdin(if req.stdin {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            // SAFETY: `child_setup` runs between fork and exec and only
            // makes async-signal-safe calls (setsid, sigemptyset,
            // sigprocmask, signal); it allocates nothing and touches no lock.
            unsafe { cmd.pre_exec(child_setup) };
            None
        }
        Some(size) => {
            let pty_err = |e: io::Error| {
                ErrorInfo::new(
                    ErrorKind::Other,
                    format!("cannot open a terminal: {}", os_message(&e)),
                )
            };
            let (master, slave) = open_pty(size).map_err(pty_err)?;
            let dup = || slave.try_clone().map(Stdio::from).map_err(pty_err);
            cmd.env("TERM", "xterm-256color")
                .envs(req.env.iter().map(|(k, v)| (k, v)))
                .stdin(dup()?)
                .stdout(dup()?)
                .stderr(dup()?);
            // SAFETY: as above, plus ioctl(TIOCSCTTY) on fd 0 (the slave):
            // async-signal-safe, no allocation.
            unsafe { cmd.pre_exec(child_setup_pty) };
            Some(master)
        }
    };
    Ok((cmd, program.to_string(), master))
}

/// `child_setup`, then the terminal on stdin becomes the session's
/// controlling terminal (so Ctrl-C there signals its foreground group).
fn child_setup_pty() -> io::Result<()> {
    child_setup()?;
    // SAFETY: TIOCSCTTY takes an int argument; fd 0 is the pty slave.
    cvt(unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) }).map(drop)
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

pub fn spawn_error(program: &str, e: &io::Error) -> ErrorInfo {
    let kind = match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => ErrorKind::NotFound,
        Some(libc::EACCES) | Some(libc::EPERM) => ErrorKind::PermissionDenied,
        None if e.kind() == io::ErrorKind::InvalidInput => ErrorKind::InvalidRequest,
        _ => ErrorKind::Other,
    };
    ErrorInfo::new(kind, format!("{program}: {}", os_message(e)))
}

/// Feeds the process's input. On a terminal, the end of input is ^D (the
/// terminal stays open: closing it would hang up the session).
fn start_stdin(stream: u32, mut pipe: File, mut input: InputRx, pty: bool) -> io::Result<()> {
    std::thread::Builder::new()
        .name(format!("stdin-{stream}"))
        .stack_size(64 * 1024)
        .spawn(move || {
            let mut open = true;
            let mut last = b'\n';
            while let Some(msg) = input.recv() {
                if let InMsg::Data(b) = &msg {
                    last = b.last().copied().unwrap_or(last);
                }
                match msg {
                    InMsg::Data(b) if open => {
                        // EPIPE (the process stopped reading for good): the
                        // rest is dropped, but still credited, so the host
                        // never waits on a stdin nobody reads any more.
                        open = pipe.write_all(&b).is_ok();
                        input.consumed(b.len());
                    }
                    InMsg::Data(b) => input.consumed(b.len()),
                    InMsg::Eof if pty && open => {
                        // ^D ends input at the start of a line; mid-line it
                        // only flushes the line, so a second one ends it.
                        let eot: &[u8] = if matches!(last, b'\n' | b'\r') {
                            &[4]
                        } else {
                            &[4, 4]
                        };
                        let _ = pipe.write_all(eot);
                        break;
                    }
                    InMsg::Eof | InMsg::Cancel | InMsg::Violation => break,
                }
            }
            input.grant();
        })
        .map(drop)
}

/// The I/O side of one running exec.
struct Io {
    slot: Slot,
    stream: u32,
    pid: libc::pid_t,
    out: Outbox,
    credit: Arc<Credit>,
    /// stdout, stderr; `None` once at EOF.
    pipes: [Option<File>; 2],
    /// The reaper's status pipe; `None` once the status arrived.
    status: Option<File>,
    started: Instant,
    started_ms: u64,
    timeout: Option<Duration>,
}

impl Io {
    fn run(mut self, streams: &Streams) {
        let finished = self.serve(streams);
        streams.close(self.slot);
        if let Some(status) = finished {
            self.out.send(self.stream, GuestMsg::Exited(status));
        }
    }

    /// Runs the exec to its end; `None` when the host cancelled the stream
    /// (then nothing more is sent on it).
    fn serve(&mut self, streams: &Streams) -> Option<ExitStatus> {
        let mut buf = vec![0u8; MAX_CHUNK_LEN];
        // A timeout too large to represent is no timeout.
        let kill_at = self.timeout.and_then(|t| self.started.checked_add(t));
        let mut timed_out = false;
        // (raw wait status, reap time) once known; when we learned it.
        let mut exit: Option<(Option<libc::c_int>, u64)> = None;
        let mut exit_seen: Option<Instant> = None;
        loop {
            if self.credit.is_cancelled() {
                // Once reaped, its pid may be another process's already.
                if exit.is_none() {
                    kill_group(self.pid);
                }
                return None;
            }
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
                        if !self.drain(&mut buf) {
                            return None;
                        }
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
            }; 4];
            // Output is read only while the host lets us send it.
            if self.credit.available() > 0 {
                for (slot, f) in fds.iter_mut().zip(self.pipes.iter()) {
                    if let Some(f) = f {
                        slot.fd = f.as_raw_fd();
                    }
                }
            }
            if let Some(f) = &self.status {
                fds[2].fd = f.as_raw_fd();
            }
            fds[3].fd = self.credit.fd();
            // SAFETY: `fds` is a valid array of 4 pollfds; negative fds are ignored.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                // Cannot happen with valid fds; never spin if it does.
                std::thread::sleep(Duration::from_millis(10));
            }
            if n <= 0 {
                continue; // timeout or EINTR: re-check the deadlines
            }
            if fds[3].revents != 0 {
                self.credit.clear();
            }
            for (i, p) in fds.iter().enumerate().take(2) {
                if p.fd >= 0 && p.revents != 0 {
                    self.read_chunk(i, &mut buf);
                }
            }
            if fds[2].fd >= 0 && fds[2].revents != 0 {
                exit = Some(self.read_status());
                exit_seen = Some(Instant::now());
                // Reaped: its pid is free for reuse, so no signal may go to
                // it any more.
                streams.set_pgid(self.slot, 0);
            }
        }

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
        Some(ExitStatus {
            code,
            signal,
            timed_out,
            duration_ms,
        })
    }

    /// Reads one chunk (at most what the credit allows) from pipe `i` and
    /// sends it; closes the pipe at EOF. Returns the bytes read.
    fn read_chunk(&mut self, i: usize, buf: &mut [u8]) -> usize {
        let Some(pipe) = self.pipes[i].as_mut() else {
            return 0;
        };
        let want = self.credit.take(buf.len());
        if want == 0 {
            return 0;
        }
        let r = pipe.read(&mut buf[..want]);
        let got = match &r {
            Ok(n) => *n,
            Err(_) => 0,
        };
        self.credit.untake(want - got);
        match r {
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
            // A terminal's master reads EIO once no process holds its slave.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                self.pipes[i] = None;
                0
            }
            Err(e) => {
                error!("stream {}: read output: {e}", self.stream);
                self.pipes[i] = None;
                0
            }
        }
    }

    /// The drain period ran out: send what the pipes already hold (all that
    /// the main process wrote before it exited) without waiting for more
    /// output, but waiting for credit: a paused reader loses nothing.
    /// False when the stream was cancelled meanwhile.
    fn drain(&mut self, buf: &mut [u8]) -> bool {
        for i in 0..2 {
            let mut budget = MAX_DRAIN;
            while budget > 0 {
                match &self.pipes[i] {
                    Some(p) if readable_now(p.as_fd()) => {}
                    _ => break,
                }
                if !self.credit.wait() {
                    return false;
                }
                let n = self.read_chunk(i, buf);
                if n == 0 && self.pipes[i].is_some() {
                    break; // EINTR or similar: give up rather than spin
                }
                budget = budget.saturating_sub(n);
            }
            self.pipes[i] = None;
        }
        true
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
