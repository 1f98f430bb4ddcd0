//! The one reaper of the agent. As PID 1 every orphan in the guest becomes
//! our child, so nobody else may call `wait*`: not `std::process::Child::wait`
//! nor `waitpid(pid)` for a single child.
//!
//! A dedicated thread blocks in `waitid(P_ALL, WEXITED | WNOWAIT)` until some
//! child is waitable *without reaping it*, then takes the lock and reaps with
//! `waitpid(-1, WNOHANG)` (both with `__WALL`, so children with an unusual
//! exit signal are reaped too). Each status goes to the exec that registered the
//! pid, through a pipe (12 bytes: raw wait status, reap time in ms).
//!
//! Spawning happens under the same lock ([`spawn`]), and the pid is
//! registered before the lock is released. That closes both races:
//! - a child that exits at once cannot be reaped before its owner is
//!   registered (the reaper needs the lock to reap), so no status is ever
//!   "unclaimed";
//! - std's `Command::spawn` itself calls `waitpid(pid)` when `exec` fails in
//!   the child, and asserts that it succeeds; the reaper cannot steal that
//!   child because it does not reap while a spawn holds the lock.
//!
//! With no children at all `waitid` fails with ECHILD; the thread then
//! sleeps on a condvar until the next spawn. No polling, no busy loop.

use crate::sys::boottime_ms;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::process::Child;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Bytes of one status record on an exec's status pipe.
pub const STATUS_LEN: usize = 12;

struct State {
    /// pid → write end of that exec's status pipe.
    waiters: BTreeMap<libc::pid_t, OwnedFd>,
    /// True while the reaper found no child at all.
    idle: bool,
}

static STATE: Mutex<State> = Mutex::new(State {
    waiters: BTreeMap::new(),
    idle: false,
});
static COND: Condvar = Condvar::new();

fn lock() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts the reaper thread.
pub fn start() -> io::Result<()> {
    std::thread::Builder::new()
        .name("reaper".into())
        .stack_size(64 * 1024)
        .spawn(run)
        .map(drop)
}

/// Runs `spawn` (which forks) under the reaper lock and registers the child.
/// Returns the child and the read end of its status pipe.
pub fn spawn(spawn: impl FnOnce() -> io::Result<Child>) -> io::Result<(Child, OwnedFd)> {
    let (rx, tx) = crate::sys::pipe()?;
    let mut st = lock();
    let child = spawn()?;
    // Pids are positive and fit in pid_t on Linux.
    st.waiters.insert(child.id().cast_signed(), tx);
    st.idle = false;
    COND.notify_all();
    Ok((child, rx))
}

/// Waits until the guest has no child processes left, up to `timeout`.
/// Returns true when it got there.
pub fn wait_idle(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut st = lock();
    while !st.idle {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        st = COND
            .wait_timeout(st, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    true
}

/// Whether any child exists (zombie or not), without blocking or reaping.
fn has_children() -> bool {
    // SAFETY: an all-zero siginfo_t is valid for waitid to overwrite.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is writable; WNOHANG|WNOWAIT neither blocks nor reaps.
    let r = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT | libc::__WALL,
        )
    };
    r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ECHILD)
}

fn run() {
    loop {
        // SAFETY: an all-zero siginfo_t is valid for waitid to overwrite.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is writable; WNOWAIT leaves the child waitable, so
        // the actual reaping happens below, under the lock.
        let r = unsafe {
            libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOWAIT | libc::__WALL,
            )
        };
        if r == -1 {
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::ECHILD) => sleep_until_spawn(),
                _ => {
                    error!("waitid: {}", io::Error::last_os_error());
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            continue;
        }
        let mut st = lock();
        reap_all(&mut st);
    }
}

fn sleep_until_spawn() {
    let mut st = lock();
    // Spawns fork under this lock, so "no child" cannot go stale while we hold it.
    while !has_children() {
        st.idle = true;
        COND.notify_all();
        st = COND.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    st.idle = false;
}

fn reap_all(st: &mut State) {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is writable; WNOHANG never blocks.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG | libc::__WALL) };
        if pid > 0 {
            // A pid nobody registered is an orphan reparented to us: reaped, done.
            if let Some(tx) = st.waiters.remove(&pid) {
                let mut rec = [0u8; STATUS_LEN];
                rec[..4].copy_from_slice(&status.to_le_bytes());
                rec[4..].copy_from_slice(&boottime_ms().to_le_bytes());
                // 12 bytes into an empty pipe never block. A failure means
                // the exec is gone already: nothing to tell.
                let _ = File::from(tx).write_all(&rec);
            }
            continue;
        }
        if pid == -1 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        return;
    }
}

/// Decodes a status record: (raw wait status, reap time in boottime ms).
pub fn decode(rec: &[u8; STATUS_LEN]) -> (libc::c_int, u64) {
    let mut s = [0u8; 4];
    s.copy_from_slice(&rec[..4]);
    let mut t = [0u8; 8];
    t.copy_from_slice(&rec[4..]);
    (libc::c_int::from_le_bytes(s), u64::from_le_bytes(t))
}
