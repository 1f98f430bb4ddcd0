//! The host end of a tunnel (`HostMsg::Connect`): a byte stream to a
//! service on the guest's loopback, carried over the agent channel with
//! its flow control, each direction closed on its own. See
//! docs/protocol.md "Tunnels".

use super::client::{AgentStream, ClientError, SupervisorClient};
use smolvm_proto::{Bytes, GuestMsg, HostMsg, MAX_CHUNK_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a tunnel could not be opened or ended badly.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The guest could not connect (nothing listens on the port, ...).
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the local side of the tunnel failed: {0}")]
    Local(#[source] std::io::Error),
    #[error("the guest ended the tunnel: {0}")]
    Guest(String),
}

/// Opens a tunnel to the guest's `127.0.0.1:port`; it is connected when
/// this returns.
pub async fn connect(client: &SupervisorClient, port: u16) -> Result<AgentStream, TunnelError> {
    let mut s = client.open_stream(HostMsg::Connect { port }).await?;
    match s.recv().await? {
        GuestMsg::Connected => Ok(s),
        GuestMsg::Error(e) => Err(TunnelError::Refused(e.bounded().message)),
        _ => Err(ClientError::Unexpected.into()),
    }
}

/// Bytes moved by a finished tunnel.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved {
    pub to_guest: u64,
    pub from_guest: u64,
}

/// Moves bytes between a connected tunnel and a local reader/writer until
/// both directions ended. Half-close both ways: the local reader's EOF
/// ends the guest's input; the guest's `Eof` shuts the local writer down.
/// A local failure drops the tunnel (the guest resets its connection).
pub async fn splice<R, W>(mut s: AgentStream, mut r: R, mut w: W) -> Result<Moved, TunnelError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let writer = s.writer();
    let mut moved = Moved::default();
    let mut buf = vec![0u8; MAX_CHUNK_LEN];
    let mut up_open = true;
    loop {
        tokio::select! {
            n = r.read(&mut buf), if up_open => {
                let n = n.map_err(TunnelError::Local)?;
                if n == 0 {
                    up_open = false;
                    writer.close().await?;
                } else {
                    writer.write(&buf[..n]).await?;
                    moved.to_guest += n as u64;
                }
            }
            m = s.recv() => match m? {
                GuestMsg::Data(Bytes(b)) => {
                    w.write_all(&b).await.map_err(TunnelError::Local)?;
                    // Buffered writers (stdout) must pass each chunk on:
                    // the peer may wait for it before it sends more.
                    w.flush().await.map_err(TunnelError::Local)?;
                    moved.from_guest += b.len() as u64;
                }
                GuestMsg::Eof => {
                    w.flush().await.map_err(TunnelError::Local)?;
                    let _ = w.shutdown().await;
                }
                GuestMsg::Done { .. } => {
                    let _ = w.shutdown().await;
                    return Ok(moved);
                }
                GuestMsg::Error(e) => return Err(TunnelError::Guest(e.bounded().message)),
                _ => return Err(ClientError::Unexpected.into()),
            }
        }
    }
}
