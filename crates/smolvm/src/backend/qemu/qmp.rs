//! A small QMP client (JSON lines over a unix socket), hand-rolled so it is
//! not tied to one QEMU schema.

use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Longest QMP line we accept.
const MAX_LINE: usize = 1024 * 1024;
/// Lifecycle commands (stop, cont, quit, query-status) answer at once; a VMM
/// that takes longer is hung or stopped (SIGSTOP).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP I/O failed")]
    Io(#[from] std::io::Error),
    #[error("QMP connection closed")]
    Closed,
    #[error("QMP sent an invalid reply: {0}")]
    Protocol(String),
    #[error("QMP command `{command}` failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP command `{0}` got no reply in time")]
    Timeout(String),
}

pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    events: Vec<Value>,
}

impl Qmp {
    /// Connects to a QMP socket (relative paths are fine), reads the greeting
    /// and negotiates capabilities.
    /// Bounded: a VMM that accepts but never greets (stopped with SIGSTOP:
    /// its listening socket still accepts) is a timeout, not a hang.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        Self::connect_within(path, REPLY_TIMEOUT).await
    }

    /// [`Qmp::connect`] with the greeting given `greeting` to arrive (a
    /// QEMU still initialising greets only once its main loop runs).
    pub async fn connect_within(path: &Path, greeting: Duration) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path).await?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
            events: Vec::new(),
        };
        let greeting = tokio::time::timeout(greeting, qmp.read_message())
            .await
            .map_err(|_| QmpError::Timeout("greeting".into()))??;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "unexpected greeting: {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = (&mut self.reader)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line)
                .await?;
            if n == 0 {
                return Err(QmpError::Closed);
            }
            if line.len() > MAX_LINE {
                return Err(QmpError::Protocol("line too long".into()));
            }
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            return serde_json::from_slice(&line).map_err(|e| QmpError::Protocol(e.to_string()));
        }
    }

    /// `getfd`: hands QEMU the descriptor `fd` under `name` (sent as
    /// SCM_RIGHTS with the command; QEMU keeps its own copy).
    pub async fn send_fd(
        &mut self,
        name: &str,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), QmpError> {
        let mut bytes = serde_json::to_vec(&json!({
            "execute": "getfd",
            "arguments": { "fdname": name },
        }))
        .map_err(|e| QmpError::Protocol(e.to_string()))?;
        bytes.push(b'\n');
        use std::os::fd::AsRawFd as _;
        let sock = self.writer.as_ref();
        let raw = sock.as_raw_fd();
        let fd = fd.as_raw_fd();
        let sent = tokio::time::timeout(REPLY_TIMEOUT, async {
            loop {
                sock.writable().await?;
                match sock.try_io(tokio::io::Interest::WRITABLE, || {
                    send_with_fd(raw, &bytes, fd)
                }) {
                    Ok(n) => return Ok::<usize, std::io::Error>(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
        })
        .await
        .map_err(|_| QmpError::Timeout("getfd".into()))??;
        if sent != bytes.len() {
            // The descriptor went with the first byte; the rest of the line
            // follows as plain bytes.
            self.writer.write_all(&bytes[sent..]).await?;
        }
        self.read_reply("getfd").await.map(drop)
    }

    /// Runs one command and returns its `return` value. Events that arrive
    /// meanwhile are kept (see [`Qmp::take_events`]).
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| QmpError::Protocol(e.to_string()))?;
        bytes.push(b'\n');
        tokio::time::timeout(REPLY_TIMEOUT, self.writer.write_all(&bytes))
            .await
            .map_err(|_| QmpError::Timeout(command.to_string()))??;
        self.read_reply(command).await
    }

    /// Reads the reply to the command just sent.
    async fn read_reply(&mut self, command: &str) -> Result<Value, QmpError> {
        let fut = async {
            loop {
                let m = self.read_message().await?;
                if m.get("event").is_some() {
                    if self.events.len() < 256 {
                        self.events.push(m);
                    }
                    continue;
                }
                if let Some(r) = m.get("return") {
                    return Ok(r.clone());
                }
                if let Some(e) = m.get("error") {
                    return Err(QmpError::Command {
                        command: command.to_string(),
                        class: e
                            .get("class")
                            .and_then(Value::as_str)
                            .unwrap_or("?")
                            .to_string(),
                        desc: e
                            .get("desc")
                            .and_then(Value::as_str)
                            .unwrap_or("?")
                            .to_string(),
                    });
                }
                return Err(QmpError::Protocol(format!("unexpected message: {m}")));
            }
        };
        tokio::time::timeout(REPLY_TIMEOUT, fut)
            .await
            .map_err(|_| QmpError::Timeout(command.to_string()))?
    }
}

/// One `sendmsg` of `bytes` carrying `fd` as SCM_RIGHTS.
fn send_with_fd(
    sock: std::os::fd::RawFd,
    bytes: &[u8],
    fd: std::os::fd::RawFd,
) -> std::io::Result<usize> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // Room for one descriptor, aligned for cmsghdr.
    let mut cbuf = [0u64; 4];
    // The size of one descriptor (4: fits any integer type).
    #[allow(clippy::cast_possible_truncation)]
    const INT: u32 = std::mem::size_of::<libc::c_int>() as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(INT) } as usize;
    debug_assert!(space <= std::mem::size_of_val(&cbuf));
    // SAFETY: an all-zero msghdr is valid; the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `cbuf`, large enough for one cmsghdr
    // with one int (checked above); CMSG_FIRSTHDR/CMSG_DATA stay inside it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(INT) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>(), fd);
    }
    // SAFETY: `msg` and everything it points at live across the call.
    let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n.cast_unsigned())
    }
}
