//! Background processes: started detached, they outlive the caller and its
//! connection; any process can list them, re-attach to their output (from
//! a bounded buffer in the guest that says what it dropped), feed their
//! stdin and signal them.

use super::{Command, ExecOptions, Sandbox};
use crate::error::{Error, Result};
use crate::supervisor::{ClientError, ExecStream};
use smolvm_proto::{AttachRequest, Bytes, GuestMsg, HostMsg, OpReply, OpRequest, MAX_CHUNK_LEN};

pub use smolvm_proto::ProcInfo;

/// A background process just started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spawned {
    /// Its handle in this boot of the VM (for `attach`, `signal_process`...).
    pub handle: u64,
    pub pid: u32,
}

impl Sandbox {
    /// Starts `command` in the background (`opts.timeout` still kills it;
    /// `opts.stdin` is written to it). It runs on when this handle, its
    /// process or its connection go away.
    pub async fn spawn(&self, command: Command, opts: &ExecOptions) -> Result<Spawned> {
        let (client, rec) = self.require_running_rec().await?;
        let req = self.exec_request(command, opts, &rec)?;
        let mut s = client
            .open_stream(HostMsg::Spawn(req))
            .await
            .map_err(|e| self.client_error(e))?;
        let sp = match s.recv().await.map_err(|e| self.client_error(e))? {
            GuestMsg::Spawned { handle, pid } => Spawned { handle, pid },
            GuestMsg::Error(e) => {
                let e: super::GuestError = e.into();
                return Err(Error::Exec {
                    id: self.id.clone(),
                    kind: e.kind,
                    message: e.message,
                });
            }
            _ => return Err(self.client_error(ClientError::Unexpected)),
        };
        if let Some(data) = &opts.stdin {
            self.write_process_stdin(sp.handle, data, true).await?;
        }
        Ok(sp)
    }

    /// Streams a background process's output: from `from` (an output
    /// offset; 0 for all that is still buffered) or, with `None`, only what
    /// comes next; then its `Exited`. Dropping the stream detaches.
    pub async fn attach(&self, handle: u64, from: Option<u64>) -> Result<ExecStream> {
        let client = self.require_running().await?;
        client
            .exec_like(HostMsg::Attach(AttachRequest { handle, from }))
            .await
            .map_err(|e| self.client_error(e))
    }

    async fn proc_op(&self, req: OpRequest) -> Result<OpReply> {
        let client = self.require_running().await?;
        let mut s = client
            .open_stream(HostMsg::Op(req))
            .await
            .map_err(|e| self.client_error(e))?;
        match s.recv().await.map_err(|e| self.client_error(e))? {
            GuestMsg::Op(r) => Ok(r),
            GuestMsg::Error(e) => {
                let e: super::GuestError = e.into();
                Err(Error::Exec {
                    id: self.id.clone(),
                    // The agent's NotFound for a process request is
                    // always the handle.
                    kind: if e.message.starts_with("no background process") {
                        crate::ErrorKind::ProcessNotFound
                    } else {
                        e.kind
                    },
                    message: crate::text::escape_line(&e.message),
                })
            }
            _ => Err(self.client_error(ClientError::Unexpected)),
        }
    }

    /// The background processes of this boot (running, and the last
    /// finished ones).
    pub async fn processes(&self) -> Result<Vec<ProcInfo>> {
        match self.proc_op(OpRequest::Procs).await? {
            OpReply::Procs(p) => Ok(p),
            _ => Err(self.client_error(ClientError::Unexpected)),
        }
    }

    /// Signals a background process's process group.
    pub async fn signal_process(&self, handle: u64, signal: i32) -> Result<()> {
        self.proc_op(OpRequest::ProcSignal { handle, signal })
            .await
            .map(drop)
    }

    /// Writes to a background process's stdin (paced by the process: each
    /// chunk is answered once written), then closes it when `eof`. A
    /// process that stops reading for 10 s is an error naming what it took.
    pub async fn write_process_stdin(&self, handle: u64, data: &[u8], eof: bool) -> Result<()> {
        let mut chunks: Vec<&[u8]> = data.chunks(MAX_CHUNK_LEN).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let last = chunks.len() - 1;
        let mut sent = 0usize;
        for (i, c) in chunks.into_iter().enumerate() {
            let r = self
                .proc_op(OpRequest::ProcStdin {
                    handle,
                    data: Bytes(c.to_vec()),
                    eof: eof && i == last,
                })
                .await?;
            let n = match r {
                OpReply::Written(n) => usize::try_from(n).unwrap_or(0),
                _ => return Err(self.client_error(ClientError::Unexpected)),
            };
            sent += n;
            if n < c.len() {
                return Err(Error::Busy {
                    id: self.id.clone(),
                    message: format!(
                        "background process {handle} stopped reading its stdin ({sent} of {} bytes taken)",
                        data.len()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Forgets a finished background process (and its buffered output).
    pub async fn forget_process(&self, handle: u64) -> Result<()> {
        self.proc_op(OpRequest::ProcForget { handle })
            .await
            .map(drop)
    }
}
