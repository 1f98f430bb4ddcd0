//! Background processes: started by `Spawn`, they outlive the stream and
//! the host's connection. Their output goes to a bounded buffer per process
//! (the oldest bytes are dropped first, and the offsets say so); any number
//! of `Attach` streams replay it from an offset and follow it live, each
//! within its own credit, so a slow attacher only ever slows itself.

use crate::exec::{build_command, kill_group, spawn_error};
use crate::reaper::{self, STATUS_LEN};
use crate::streams::{Credit, Streams};
use crate::sys::{boottime_ms, cvt, kill, os_message, poll_timeout};
use crate::writer::Outbox;
use smolvm_proto::{
    AttachRequest, Bytes, Command, ErrorInfo, ErrorKind, ExecRequest, ExitStatus, GuestMsg,
    OpReply, ProcInfo, MAX_CHUNK_LEN,
};
use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Output kept per background process.
pub const PROC_BUFFER: usize = 1024 * 1024;
/// Background processes running at once at most.
pub const MAX_RUNNING: usize = 64;
/// Finished processes kept (their exit and output) for a later look.
const MAX_FINISHED: usize = 32;
/// How long a `ProcStdin` waits for a process that does not read.
const STDIN_WAIT: Duration = Duration::from_secs(10);
/// How long the pipes may stay open after the process exited.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(200);
/// The longest command text kept for `Procs`.
const MAX_COMMAND_TEXT: usize = 256;

struct Output {
    /// (is stderr, offset of its first byte, bytes).
    chunks: VecDeque<(bool, u64, Vec<u8>)>,
    /// Offset of the oldest byte still held.
    start: u64,
    /// Offset after the newest byte (= all output produced).
    end: u64,
    exit: Option<ExitStatus>,
}

struct Proc {
    handle: u64,
    pid: libc::pid_t,
    /// Set once reaped: its pid may be reused, no signal goes to it.
    reaped: std::sync::atomic::AtomicBool,
    command: String,
    started_ms: u64,
    out: Mutex<Output>,
    changed: Condvar,
    stdin: Mutex<Option<File>>,
}

impl Proc {
    fn lock(&self) -> MutexGuard<'_, Output> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, stderr: bool, data: &[u8]) {
        let mut o = self.lock();
        let off = o.end;
        o.end += data.len() as u64;
        // Small writes go into the last chunk (a process writing a byte at
        // a time must not cost a chunk per byte).
        match o.chunks.back_mut() {
            Some((e, _, b)) if *e == stderr && b.len() + data.len() <= MAX_CHUNK_LEN => {
                b.extend_from_slice(data);
            }
            _ => o.chunks.push_back((stderr, off, data.to_vec())),
        }
        while o.end - o.start > PROC_BUFFER as u64 {
            match o.chunks.pop_front() {
                Some((_, off, b)) => o.start = off + b.len() as u64,
                None => break,
            }
        }
        drop(o);
        self.changed.notify_all();
    }

    fn info(&self) -> ProcInfo {
        let o = self.lock();
        ProcInfo {
            handle: self.handle,
            pid: self.pid.cast_unsigned(),
            command: self.command.clone(),
            exit: o.exit.clone(),
            output_bytes: o.end,
            buffered_from: o.start,
            started_ms: self.started_ms,
        }
    }
}

/// The background processes, by handle.
#[derive(Default)]
pub struct Procs {
    table: Mutex<(u64, BTreeMap<u64, Arc<Proc>>)>,
}

fn err(kind: ErrorKind, msg: impl Into<String>) -> ErrorInfo {
    ErrorInfo::new(kind, msg)
}

fn command_text(c: &Command) -> String {
    let mut s = match c {
        Command::Argv(v) => v.join(" "),
        Command::Shell(s) => s.clone(),
    };
    if s.len() > MAX_COMMAND_TEXT {
        let mut cut = MAX_COMMAND_TEXT;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

impl Procs {
    fn lock(&self) -> MutexGuard<'_, (u64, BTreeMap<u64, Arc<Proc>>)> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, handle: u64) -> Result<Arc<Proc>, ErrorInfo> {
        self.lock().1.get(&handle).cloned().ok_or_else(|| {
            err(
                ErrorKind::NotFound,
                format!("no background process {handle} (it was never started in this boot, or was forgotten)"),
            )
        })
    }

    /// Starts a background process; returns (handle, pid).
    pub fn spawn(self: &Arc<Self>, req: &ExecRequest) -> Result<(u64, u32), ErrorInfo> {
        if req.pty.is_some() {
            return Err(err(
                ErrorKind::Unsupported,
                "a background process cannot have a terminal",
            ));
        }
        let running = self
            .lock()
            .1
            .values()
            .filter(|p| p.lock().exit.is_none())
            .count();
        if running >= MAX_RUNNING {
            return Err(err(
                ErrorKind::Busy,
                format!("{MAX_RUNNING} background processes are running already"),
            ));
        }
        // stdin is a pipe for ProcStdin only when asked (`req.stdin`), else
        // /dev/null: a reader of stdin must not wait forever.
        let (mut cmd, program, _) = build_command(req)?;
        let (mut child, status) =
            reaper::spawn(|| cmd.spawn()).map_err(|e| spawn_error(&program, &e))?;
        let pid = child.id().cast_signed();
        let stdin = child.stdin.take().map(|p| File::from(OwnedFd::from(p)));
        if let Some(f) = &stdin {
            // Writes must never block the op thread forever.
            // SAFETY: F_GETFL/F_SETFL on an fd we own.
            let _ = unsafe {
                let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
                libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK)
            };
        }
        let pipes = [
            child.stdout.take().map(|p| File::from(OwnedFd::from(p))),
            child.stderr.take().map(|p| File::from(OwnedFd::from(p))),
        ];
        drop(child);
        let proc = {
            let mut t = self.lock();
            t.0 += 1;
            let handle = t.0;
            let p = Arc::new(Proc {
                handle,
                pid,
                reaped: std::sync::atomic::AtomicBool::new(false),
                command: command_text(&req.command),
                started_ms: boottime_ms(),
                out: Mutex::new(Output {
                    chunks: VecDeque::new(),
                    start: 0,
                    end: 0,
                    exit: None,
                }),
                changed: Condvar::new(),
                stdin: Mutex::new(stdin),
            });
            t.1.insert(handle, p.clone());
            // Keep the last finished ones only.
            let finished: Vec<u64> =
                t.1.values()
                    .filter(|p| p.lock().exit.is_some())
                    .map(|p| p.handle)
                    .collect();
            for h in finished
                .iter()
                .take(finished.len().saturating_sub(MAX_FINISHED))
            {
                t.1.remove(h);
            }
            p
        };
        let timeout = req.timeout_ms.map(Duration::from_millis);
        let p = proc.clone();
        std::thread::Builder::new()
            .name(format!("proc-{}", proc.handle))
            .stack_size(128 * 1024)
            .spawn(move || collect(&p, pipes, File::from(status), timeout))
            .map_err(|e| {
                kill_group(pid);
                err(ErrorKind::Other, format!("cannot start a thread: {e}"))
            })?;
        Ok((proc.handle, pid.cast_unsigned()))
    }

    /// Starts an `Attach` stream.
    pub fn attach(
        self: &Arc<Self>,
        streams: &Arc<Streams>,
        stream: u32,
        req: &AttachRequest,
        out: &Outbox,
    ) -> Result<(), ErrorInfo> {
        let proc = self.get(req.handle)?;
        let (slot, credit, _) = streams.open(stream, true, false, out)?;
        let Some(credit) = credit else {
            streams.close(slot);
            return Err(err(ErrorKind::Other, "no credit for the stream"));
        };
        let (out, st, from) = (out.clone(), Arc::clone(streams), req.from);
        std::thread::Builder::new()
            .name(format!("attach-{stream}"))
            .stack_size(128 * 1024)
            .spawn(move || {
                let exit = follow(&proc, from, &credit, stream, &out);
                st.close(slot);
                if let Some(e) = exit {
                    out.send(stream, GuestMsg::Exited(e));
                }
            })
            .map(drop)
            .map_err(|e| {
                streams.close(slot);
                err(ErrorKind::Other, format!("cannot start a thread: {e}"))
            })
    }

    /// The `Op`s about background processes.
    pub fn op(&self, req: smolvm_proto::OpRequest) -> Result<OpReply, ErrorInfo> {
        use smolvm_proto::OpRequest as R;
        match req {
            R::Procs => Ok(OpReply::Procs(
                self.lock().1.values().map(|p| p.info()).collect(),
            )),
            R::ProcSignal { handle, signal } => {
                let p = self.get(handle)?;
                if p.reaped.load(std::sync::atomic::Ordering::Acquire) {
                    return Err(err(
                        ErrorKind::InvalidRequest,
                        format!("background process {handle} has ended"),
                    ));
                }
                match kill(-p.pid, signal) {
                    Ok(()) => Ok(OpReply::Ok),
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(OpReply::Ok),
                    Err(e) => Err(err(
                        ErrorKind::InvalidRequest,
                        format!("signal {signal}: {}", os_message(&e)),
                    )),
                }
            }
            R::ProcStdin { handle, data, eof } => {
                let p = self.get(handle)?;
                let mut g = p.stdin.lock().unwrap_or_else(|e| e.into_inner());
                let Some(f) = g.as_mut() else {
                    return Err(err(
                        ErrorKind::InvalidRequest,
                        format!("the stdin of background process {handle} is closed"),
                    ));
                };
                let n = write_within(f, &data, STDIN_WAIT);
                if eof {
                    *g = None;
                }
                Ok(OpReply::Written(n as u64))
            }
            R::ProcForget { handle } => {
                let p = self.get(handle)?;
                if p.lock().exit.is_none() {
                    return Err(err(
                        ErrorKind::InvalidRequest,
                        format!("background process {handle} is still running; signal it first"),
                    ));
                }
                self.lock().1.remove(&handle);
                Ok(OpReply::Ok)
            }
            _ => Err(err(ErrorKind::InvalidRequest, "not a process request")),
        }
    }

    /// A background process's state and the last `max` bytes of its
    /// output (lossy UTF-8); `None` once forgotten.
    pub fn status(&self, handle: u64, max: usize) -> Option<(ProcInfo, String)> {
        let p = self.lock().1.get(&handle).cloned()?;
        let info = p.info();
        let o = p.lock();
        let mut tail: Vec<u8> = Vec::new();
        for (_, _, b) in o.chunks.iter().rev() {
            if tail.len() >= max {
                break;
            }
            let mut next = b.clone();
            next.extend_from_slice(&tail);
            tail = next;
        }
        let cut = tail.len().saturating_sub(max);
        Some((info, String::from_utf8_lossy(&tail[cut..]).into_owned()))
    }

    /// SIGKILLs every running background process.
    pub fn kill_all(&self) {
        for p in self.lock().1.values() {
            if !p.reaped.load(std::sync::atomic::Ordering::Acquire) {
                kill_group(p.pid);
            }
        }
    }
}

/// Writes what the (non-blocking) pipe takes within `wait`; returns the
/// bytes written.
fn write_within(f: &mut File, data: &Bytes, wait: Duration) -> usize {
    let deadline = Instant::now() + wait;
    let mut done = 0;
    while done < data.len() {
        match f.write(&data[done..]) {
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let mut p = libc::pollfd {
                    fd: f.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut p, 1, poll_timeout(Some(left))) };
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break, // EPIPE: it closed its stdin
        }
    }
    done
}

/// The background process's output collector: reads both pipes into the
/// buffer until they close (or a drain period after the exit), records the
/// exit, enforces the timeout.
fn collect(p: &Proc, mut pipes: [Option<File>; 2], mut status: File, timeout: Option<Duration>) {
    let started = Instant::now();
    let kill_at = timeout.and_then(|t| started.checked_add(t));
    let mut timed_out = false;
    let mut raw: Option<(libc::c_int, u64)> = None;
    let mut exit_seen: Option<Instant> = None;
    let mut buf = vec![0u8; MAX_CHUNK_LEN];
    loop {
        let now = Instant::now();
        if raw.is_none() && !timed_out && kill_at.is_some_and(|k| now >= k) {
            kill_group(p.pid);
            timed_out = true;
        }
        if let Some(seen) = exit_seen {
            if pipes.iter().all(Option::is_none) || now >= seen + DRAIN_AFTER_EXIT {
                break;
            }
        }
        let deadline = match exit_seen {
            Some(seen) => Some(seen + DRAIN_AFTER_EXIT),
            None if !timed_out => kill_at,
            None => None,
        };
        let mut fds = [libc::pollfd {
            fd: -1,
            events: libc::POLLIN,
            revents: 0,
        }; 3];
        for (slot, f) in fds.iter_mut().zip(pipes.iter()) {
            if let Some(f) = f {
                slot.fd = f.as_raw_fd();
            }
        }
        if raw.is_none() {
            fds[2].fd = status.as_raw_fd();
        }
        let t = poll_timeout(deadline.map(|d| d.saturating_duration_since(now)));
        // SAFETY: a valid array of 3 pollfds; negative fds are ignored.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, t) };
        if n <= 0 {
            if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                std::thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        for i in 0..2 {
            if fds[i].fd >= 0 && fds[i].revents != 0 {
                let r = pipes[i].as_mut().map(|f| f.read(&mut buf));
                match r {
                    Some(Err(ref e)) if e.kind() == io::ErrorKind::Interrupted => {}
                    Some(Ok(0)) | Some(Err(_)) => pipes[i] = None,
                    Some(Ok(n)) => p.push(i == 1, &buf[..n]),
                    None => {}
                }
            }
        }
        if fds[2].fd >= 0 && fds[2].revents != 0 {
            let mut rec = [0u8; STATUS_LEN];
            raw = Some(match status.read_exact(&mut rec) {
                Ok(()) => reaper::decode(&rec),
                Err(_) => (-1, boottime_ms()),
            });
            p.reaped.store(true, std::sync::atomic::Ordering::Release);
            exit_seen = Some(Instant::now());
        }
    }
    let (code, signal, duration_ms) = match raw {
        Some((st, _)) if st != -1 && libc::WIFEXITED(st) => (
            Some(libc::WEXITSTATUS(st)),
            None,
            u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        ),
        Some((st, _)) if st != -1 && libc::WIFSIGNALED(st) => (
            None,
            Some(libc::WTERMSIG(st)),
            u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        ),
        _ => (
            None,
            None,
            u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        ),
    };
    p.lock().exit = Some(ExitStatus {
        code,
        signal,
        timed_out,
        duration_ms,
    });
    *p.stdin.lock().unwrap_or_else(|e| e.into_inner()) = None;
    p.changed.notify_all();
}

/// One attacher: replays from `from` and follows, within `credit`.
/// Returns the exit to send, or `None` when the attach was cancelled.
fn follow(
    p: &Proc,
    from: Option<u64>,
    credit: &Credit,
    stream: u32,
    out: &Outbox,
) -> Option<ExitStatus> {
    let mut cursor = {
        let o = p.lock();
        let want = from.unwrap_or(o.end);
        let at = want.clamp(o.start, o.end);
        // A new stream has its whole window: this never waits.
        credit.send(
            out,
            stream,
            GuestMsg::Attached {
                offset: at,
                dropped: at.saturating_sub(want),
            },
        );
        at
    };
    loop {
        if credit.is_cancelled() {
            return None;
        }
        let o = p.lock();
        if cursor < o.start {
            // This attacher fell behind the buffer: say what it lost (once
            // the credit allows: never holding the buffer's lock).
            let (start, lost) = (o.start, o.start - cursor);
            drop(o);
            if !credit.send(
                out,
                stream,
                GuestMsg::Attached {
                    offset: start,
                    dropped: lost,
                },
            ) {
                return None;
            }
            cursor = start;
            continue;
        }
        // The chunk holding `cursor` (chunks are in offset order).
        let at = o
            .chunks
            .partition_point(|(_, off, b)| off + b.len() as u64 <= cursor);
        let next = o.chunks.get(at).map(|(e, off, b)| (*e, *off, b.len()));
        match next {
            Some((stderr, off, len)) => {
                let want = credit.take(MAX_CHUNK_LEN);
                if want == 0 {
                    drop(o);
                    wait_fd(credit.fd(), Duration::from_millis(100));
                    credit.clear();
                    continue;
                }
                let skip = usize::try_from(cursor - off).unwrap_or(0);
                let n = (len - skip).min(want);
                let data = o
                    .chunks
                    .get(at)
                    .map(|(_, _, b)| b[skip..skip + n].to_vec())
                    .unwrap_or_default();
                drop(o);
                credit.untake(want - n);
                cursor += n as u64;
                let data = Bytes(data);
                out.send(
                    stream,
                    if stderr {
                        GuestMsg::Stderr(data)
                    } else {
                        GuestMsg::Stdout(data)
                    },
                );
            }
            None => {
                if let Some(e) = &o.exit {
                    return Some(e.clone());
                }
                let _ = p
                    .changed
                    .wait_timeout(o, Duration::from_millis(100))
                    .unwrap_or_else(|e| e.into_inner());
            }
        }
    }
}

fn wait_fd(fd: libc::c_int, d: Duration) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let _ = cvt(unsafe { libc::poll(&mut pfd, 1, poll_timeout(Some(d))) });
}
