//! The guest console: read from the VMM's serial socket into `console.log`,
//! rotated at a cap so a hostile or chatty guest cannot fill the host disk.

use crate::backend::VmDir;
use std::io::Write;
use std::path::Path;
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

/// Largest `console.log` before it is rotated to `console.log.1` (so at most
/// twice this is kept on disk).
pub const MAX_CONSOLE_LOG: u64 = 4 * 1024 * 1024;

/// Copies console output to the log until the VMM closes the socket. The
/// file writes happen on a thread of their own (a slow disk must not stall
/// the supervisor's event loop); the socket is read only as fast as they
/// complete, so nothing is buffered without bound.
pub async fn pump(mut stream: UnixStream, vm_dir: VmDir, preamble: Option<String>) {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
    if let Some(p) = preamble {
        let _ = tx.try_send(p.into_bytes());
    }
    let writer = std::thread::spawn(move || write_log(&vm_dir, rx));
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = buf[..n].to_vec();
        match tx.try_send(chunk) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(chunk)) => {
                // The disk is behind: wait for it off the event loop.
                let tx2 = tx.clone();
                let sent = tokio::task::spawn_blocking(move || tx2.send(chunk).is_ok()).await;
                if !matches!(sent, Ok(true)) {
                    break;
                }
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => break,
        }
    }
    drop(tx);
    let _ = tokio::task::spawn_blocking(move || writer.join()).await;
}

fn write_log(vm_dir: &VmDir, rx: std::sync::mpsc::Receiver<Vec<u8>>) {
    let path = vm_dir.console_log();
    let _ = std::fs::remove_file(vm_dir.console_log_old());
    let Ok(mut log) = crate::private::create(&path) else {
        return;
    };
    let mut written = 0u64;
    for chunk in rx {
        let n = chunk.len() as u64;
        if written + n > MAX_CONSOLE_LOG {
            match rotate(vm_dir, &path) {
                Some(f) => {
                    log = f;
                    written = 0;
                }
                None => return,
            }
        }
        if log.write_all(&chunk).is_err() {
            return;
        }
        written += n;
    }
}

fn rotate(vm_dir: &VmDir, path: &Path) -> Option<std::fs::File> {
    std::fs::rename(path, vm_dir.console_log_old()).ok()?;
    crate::private::create(path).ok()
}
