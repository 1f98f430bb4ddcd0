//! The small safe layer over the raw syscalls the host side needs (as
//! crosvm's `base`): killing a process by its identity through a pidfd,
//! namespaces for child processes. Everything
//! `unsafe` about processes lives here.

use crate::state::ProcessId;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt as _;

/// Opens a pidfd for `p`, verifying it is still the same process (pid and
/// start time) *after* the pidfd pins it, so a recycled pid is never
/// signalled. `None` when it is gone.
pub fn pidfd_of(p: ProcessId) -> Option<OwnedFd> {
    let pid = libc::pid_t::try_from(p.pid).ok()?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    let fd = i32::try_from(fd).ok()?;
    // SAFETY: the kernel just returned this fd; we own it alone.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // The pidfd refers to whatever process had `pid` when it was opened:
    // check that this is still the one we mean.
    p.is_alive().then_some(fd)
}

/// `d` in whole milliseconds (saturating: no silent truncation).
pub fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Sends `signal` to the process `p` (pid + start time). Returns false when
/// it no longer exists (nothing was signalled).
pub fn kill(p: ProcessId, signal: i32) -> bool {
    let Some(fd) = pidfd_of(p) else {
        return false;
    };
    // SAFETY: pidfd_send_signal on a pidfd we own, with no siginfo.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    r == 0
}

/// Waits until the process `p` has exited, at most `limit`; true when it
/// is gone. Event-driven: a pidfd becomes readable when its process exits
/// (no polling of /proc).
pub async fn wait_exit(p: ProcessId, limit: std::time::Duration) -> bool {
    let Some(fd) = pidfd_of(p) else {
        return true;
    };
    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd, so it stays open
    // and the same for the AsyncFd's whole life.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    };
    let Ok(afd) = registered else {
        return !p.is_alive();
    };
    match tokio::time::timeout(limit, afd.readable()).await {
        Ok(Ok(_)) => true,
        Ok(Err(_)) => !p.is_alive(),
        Err(_) => !p.is_alive(),
    }
}

/// Sets the firewall mark of `sock` (`SO_MARK`; needs CAP_NET_ADMIN in the
/// socket's network namespace's user namespace).
pub fn set_mark(sock: &impl AsRawFd, mark: u32) -> std::io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<u32>()).unwrap_or(4);
    // SAFETY: setsockopt reads `len` bytes from `mark`, which lives across the call.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const u32).cast(),
            len,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The child started by `cmd` gets SIGKILL when the thread that starts it
/// ends (`PR_SET_PDEATHSIG`): it never outlives its parent.
pub fn die_with_parent(cmd: &mut std::process::Command) {
    // SAFETY: prctl is async-signal-safe; it only sets this child's
    // parent-death signal.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// This process's effective uid.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// Makes the child started by `cmd` enter a new user namespace (mapping
/// only `uid`/`gid`, as its root) and a new network namespace, before it
/// runs its program. No root needed; as root it is the same (and the child
/// still holds no capability outside its namespace).
pub fn enter_private_netns(cmd: &mut std::process::Command, uid: u32, gid: u32) {
    let uid_map = format!("0 {uid} 1");
    let gid_map = format!("0 {gid} 1");
    // SAFETY: after fork the child is single-threaded (unshare of a user
    // namespace requires that); the hook only makes syscalls (unshare,
    // open, write, close) on buffers formatted before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            write_proc(c"/proc/self/setgroups", b"deny")?;
            write_proc(c"/proc/self/uid_map", uid_map.as_bytes())?;
            write_proc(c"/proc/self/gid_map", gid_map.as_bytes())?;
            Ok(())
        });
    }
}

/// open + write + close, for the pre-exec hook (no allocation).
fn write_proc(path: &std::ffi::CStr, data: &[u8]) -> std::io::Result<()> {
    // SAFETY: `path` is a valid C string; the fd is closed below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `data` is valid for `data.len()` bytes; `fd` is open.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    if usize::try_from(n).ok() == Some(data.len()) {
        Ok(())
    } else {
        Err(err)
    }
}

/// Copies `src` to a new file `dst` (`0600`), keeping it sparse: only the
/// ranges `src` has allocated are copied (found with SEEK_DATA/SEEK_HOLE),
/// and blocks of zeros inside them are left as holes. Returns the bytes
/// written. `dst` has `src`'s length.
pub fn sparse_copy(src: &std::path::Path, dst: &std::path::Path) -> std::io::Result<u64> {
    use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
    const BLOCK: usize = 64 * 1024;
    let mut inp = std::fs::File::open(src)?;
    let len = inp.metadata()?.len();
    let mut out = crate::private::create_new(dst)?;
    out.set_len(len)?;
    let fd = inp.as_raw_fd();
    let mut buf = vec![0u8; BLOCK];
    let mut written = 0u64;
    let mut pos: i64 = 0;
    let end = i64::try_from(len).map_err(std::io::Error::other)?;
    while pos < end {
        // SAFETY: lseek on an fd we own; no memory is involved.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after `pos`
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut at = data;
        inp.seek(SeekFrom::Start(at.cast_unsigned()))?;
        while at < hole {
            let n = usize::try_from(hole - at).map_or(BLOCK, |left| left.min(BLOCK));
            inp.read_exact(&mut buf[..n])?;
            if buf[..n].iter().any(|&b| b != 0) {
                out.seek(SeekFrom::Start(at.cast_unsigned()))?;
                out.write_all(&buf[..n])?;
                written += n as u64;
            }
            at += i64::try_from(n).unwrap_or(i64::MAX);
        }
        pos = hole;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_by_identity_spares_a_changed_start_time() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let me = ProcessId::of(child.id()).unwrap();
        let wrong = ProcessId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(
            !kill(wrong, libc::SIGKILL),
            "a different process is never signalled"
        );
        assert!(child.try_wait().unwrap().is_none());
        assert!(kill(me, libc::SIGKILL));
        let st = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGKILL));
        assert!(!kill(me, libc::SIGKILL), "gone");
    }
}
