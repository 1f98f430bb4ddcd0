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

    /// Blocks (on a blocking thread) until the lock of `id` is held.
    pub async fn acquire(id: &str) -> Result<VmLock> {
        let path = crate::paths::lock_path(id);
        tokio::task::spawn_blocking(move || {
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
            let mut file = open()?;
            loop {
                // SAFETY: flock on an fd we own; no memory is involved.
                let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
                if r == 0 {
                    // `delete` unlinks the lock file while holding it: if
                    // ours was unlinked meanwhile, lock the new one instead
                    // (two holders of two files would not exclude each other).
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
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(Error::io(format!("cannot lock {}", path.display()), e));
                }
            }
        })
        .await
        .map_err(|e| Error::io("lock task failed", std::io::Error::other(e.to_string())))?
    }
}
