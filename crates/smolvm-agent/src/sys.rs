//! Thin safe wrappers over the few raw syscalls the agent needs.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// Guest monotonic time including suspend (CLOCK_BOOTTIME), in ms.
pub fn boottime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_BOOTTIME exists on
    // every kernel we boot (2.6.39+).
    let r = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if r != 0 {
        return 0;
    }
    // CLOCK_BOOTTIME is never negative.
    let (sec, nsec) = (
        ts.tv_sec.max(0).cast_unsigned(),
        ts.tv_nsec.max(0).cast_unsigned(),
    );
    sec.saturating_mul(1000) + nsec / 1_000_000
}

/// Maps a `-1` return to the current `errno`.
pub fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The OS message of an error without std's " (os error N)" suffix, e.g.
/// "No such file or directory".
pub fn os_message(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) if e.raw_os_error().is_some() => s[..i].to_string(),
        _ => s,
    }
}

/// A C string; a string with a NUL byte is `InvalidInput`.
pub fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "contains a NUL byte"))
}

/// A close-on-exec pipe: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `kill(2)`; `pid` may be negative (a process group) or -1 (everyone).
pub fn kill(pid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    cvt(unsafe { libc::kill(pid, sig) }).map(drop)
}

/// Polls one fd for input; true when a read would not block (data, EOF or
/// error pending).
pub fn readable_now(fd: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd; a zero timeout never blocks.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r > 0 && p.revents != 0
}

/// Milliseconds for poll(2), rounded up so a wait never ends early.
pub fn poll_timeout(d: Option<Duration>) -> libc::c_int {
    match d {
        None => -1,
        Some(d) => libc::c_int::try_from(d.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX),
    }
}

/// Duplicates `fd` onto a new close-on-exec descriptor.
pub fn dup_cloexec(fd: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) on any int is memory-safe; on success
    // the new fd is ours alone.
    let new = cvt(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) })?;
    // SAFETY: `new` was just returned by a successful dup.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

pub fn sync() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_message_strips_code() {
        let e = io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(os_message(&e), "No such file or directory");
        let e = io::Error::other("plain");
        assert_eq!(os_message(&e), "plain");
    }

    #[test]
    fn poll_timeout_rounds_up() {
        assert_eq!(poll_timeout(None), -1);
        assert_eq!(poll_timeout(Some(Duration::ZERO)), 0);
        assert_eq!(poll_timeout(Some(Duration::from_micros(1))), 1);
        assert_eq!(poll_timeout(Some(Duration::from_millis(200))), 200);
    }

    #[test]
    fn boottime_moves() {
        let a = boottime_ms();
        assert!(a > 0);
        assert!(boottime_ms() >= a);
    }
}
