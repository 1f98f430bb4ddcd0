//! Unix sockets inside a directory whatever the directory's length (socket
//! paths are limited to 107 bytes): long paths go through
//! `/proc/self/fd/<dirfd>/<name>`.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

const MAX_SUN_PATH: usize = 100;

fn short_path(dir: &Path, name: &str) -> std::io::Result<(PathBuf, Option<std::fs::File>)> {
    let full = dir.join(name);
    if full.as_os_str().len() < MAX_SUN_PATH {
        return Ok((full, None));
    }
    let d = std::fs::File::open(dir)?;
    let p = PathBuf::from(format!("/proc/self/fd/{}/{}", d.as_raw_fd(), name));
    Ok((p, Some(d)))
}

/// Connects to socket `name` in `dir`.
pub async fn connect_in_dir(dir: &Path, name: &str) -> std::io::Result<tokio::net::UnixStream> {
    let (p, _keep) = short_path(dir, name)?;
    tokio::net::UnixStream::connect(&p).await
}

/// Binds socket `name` in `dir` (removing a stale one first).
pub fn bind_in_dir(dir: &Path, name: &str) -> std::io::Result<tokio::net::UnixListener> {
    let _ = std::fs::remove_file(dir.join(name));
    let (p, _keep) = short_path(dir, name)?;
    tokio::net::UnixListener::bind(&p)
}
