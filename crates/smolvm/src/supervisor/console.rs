//! The guest console: read from the VMM's serial socket into `console.log`,
//! rotated at a cap so a hostile or chatty guest cannot fill the host disk.

use crate::backend::files;
use std::io::Write;
use std::path::{Path, PathBuf};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

/// Largest `console.log` before it is rotated to `console.log.1` (so at most
/// twice this is kept on disk).
pub const MAX_CONSOLE_LOG: u64 = 4 * 1024 * 1024;

/// Copies console output to the log until the VMM closes the socket.
pub async fn pump(mut stream: UnixStream, vm_dir: PathBuf) {
    let path = vm_dir.join(files::CONSOLE_LOG);
    let _ = std::fs::remove_file(vm_dir.join(files::CONSOLE_LOG_OLD));
    let Ok(mut log) = crate::private::create(&path) else {
        return;
    };
    let mut written = 0u64;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if written + n as u64 > MAX_CONSOLE_LOG {
            match rotate(&vm_dir, &path) {
                Some(f) => {
                    log = f;
                    written = 0;
                }
                None => return,
            }
        }
        if log.write_all(&buf[..n]).is_err() {
            return;
        }
        written += n as u64;
    }
}

fn rotate(vm_dir: &Path, path: &Path) -> Option<std::fs::File> {
    std::fs::rename(path, vm_dir.join(files::CONSOLE_LOG_OLD)).ok()?;
    crate::private::create(path).ok()
}
