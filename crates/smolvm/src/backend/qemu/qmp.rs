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
        let fut = async {
            self.writer.write_all(&bytes).await?;
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
