//! Per-VM lock across processes (`flock` on `<data_dir>/locks/<id>.lock`):
//! lifecycle operations on one VM are serialized; different VMs proceed in
//! parallel.

use crate::error::{Error, Result};
use std::os::fd::AsRawFd;

pub struct VmLock {
    _file: std::fs::File,
}

impl VmLock {
    /// True when someone holds the lock of `id` right now (an operation on
    /// that VM is in progress).
    pub fn is_held(id: &str) -> bool {
        let Ok(file) = std::fs::File::open(crate::paths::lock_path(id)) else {
            return false;
        };
        // SAFETY: flock on an fd we own; no memory is involved.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
        r != 0
    }

    /// Waits until the lock of `id` is held, at most [`LOCK_WAIT`]: a
    /// lifecycle operation of another process that hangs (or was stopped)
    /// is reported as `Busy`, naming it.
    ///
    /// `flock` has no way to wait with a deadline or to be woken by an
    /// event, and a thread blocked in it cannot be abandoned (a runtime
    /// waits for its blocking threads on shutdown): so this tries without
    /// blocking and sleeps between tries.
    pub async fn acquire(id: &str) -> Result<VmLock> {
        Self::acquire_at(&crate::paths::lock_path(id), id).await
    }

    /// The lock at `path`, named `id` in errors.
    pub async fn acquire_at(path: &std::path::Path, id: &str) -> Result<VmLock> {
        Self::acquire_mode(path, id, libc::LOCK_EX).await
    }

    /// The lock at `path` shared with other shared holders (readers).
    pub async fn acquire_shared_at(path: &std::path::Path, id: &str) -> Result<VmLock> {
        Self::acquire_mode(path, id, libc::LOCK_SH).await
    }

    async fn acquire_mode(path: &std::path::Path, id: &str, mode: libc::c_int) -> Result<VmLock> {
        let path = path.to_path_buf();
        if let Some(d) = path.parent() {
            crate::private::dir_all(d)
                .map_err(|e| Error::io(format!("cannot create {}", d.display()), e))?;
        }
        let open = || {
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(crate::private::FILE_MODE)
                .open(&path)
                .map_err(|e| Error::io(format!("cannot open {}", path.display()), e))
        };
        let deadline = tokio::time::Instant::now() + LOCK_WAIT;
        let mut file = open()?;
        loop {
            // SAFETY: flock on an fd we own; no memory is involved.
            let r = unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) };
            if r == 0 {
                // `delete` unlinks the lock file while holding it: if ours
                // was unlinked meanwhile, lock the new one instead (two
                // holders of two files would not exclude each other).
                use std::os::unix::fs::MetadataExt;
                let same = match (file.metadata(), std::fs::metadata(&path)) {
                    (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                    _ => false,
                };
                if same {
                    return Ok(VmLock { _file: file });
                }
                file = open()?;
                continue;
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => {}
                _ => return Err(Error::io(format!("cannot lock {}", path.display()), e)),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Busy {
                    id: id.to_string(),
                    message: format!(
                        "another smolvm operation on it still holds its lock after {}s of waiting{}; \
                         wait for it, or end that process",
                        LOCK_WAIT.as_secs(),
                        holder_of(&path)
                            .map(|(pid, cmd)| format!(" (pid {pid}: {cmd})"))
                            .unwrap_or_default()
                    ),
                });
            }
            tokio::time::sleep(LOCK_RETRY).await;
        }
    }
}

/// How often a waiting operation tries the lock again.
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(25);

/// How long a lifecycle operation waits for another one on the same VM.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// The process holding the flock on `path`, from `/proc/locks`, with its
/// command line (for the error message; escaped, it is another process's).
fn holder_of(path: &std::path::Path) -> Option<(u32, String)> {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(path).ok()?.ino();
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let pid = locks.lines().find_map(|l| {
        // "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF"
        let f: Vec<&str> = l.split_whitespace().collect();
        let node = f.get(5)?;
        (f.get(1) == Some(&"FLOCK") && node.rsplit(':').next()?.parse::<u64>().ok()? == ino)
            .then(|| f.get(4)?.parse::<u32>().ok())
            .flatten()
    })?;
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .replace('\0', " ")
                .trim()
                .to_string()
        })
        .unwrap_or_default();
    Some((
        pid,
        crate::text::escape_line(&cmd.chars().take(120).collect::<String>()),
    ))
}
