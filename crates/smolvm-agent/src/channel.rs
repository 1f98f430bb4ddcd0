//! Finding and opening the agent's virtio-serial port.

use smolvm_proto::AGENT_PORT_NAME;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Waits up to `timeout` for the port named `smolvm.agent` and opens it,
/// once, read-write (a second open of a virtio port gets EBUSY).
pub fn open_agent_port(timeout: Duration) -> io::Result<(File, PathBuf)> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(dev) = find_port() {
            if dev.exists() {
                // std opens with O_CLOEXEC.
                let f = OpenOptions::new().read(true).write(true).open(&dev)?;
                return Ok((f, dev));
            }
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no virtio port named {AGENT_PORT_NAME} after {} s",
                    timeout.as_secs()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `/dev/<port>` of the port whose `name` is `smolvm.agent`.
fn find_port() -> Option<PathBuf> {
    let dir = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for entry in dir.flatten() {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim_end() == AGENT_PORT_NAME {
            return Some(PathBuf::from("/dev").join(entry.file_name()));
        }
    }
    None
}
