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
/// The two directions run as two futures polled side by side: one waiting
/// for the guest's input credit never stops the other from draining (and
/// crediting) the guest's output, or both could wait on each other. A
/// local failure drops the tunnel (the guest resets its connection).
pub async fn splice<R, W>(mut s: AgentStream, mut r: R, mut w: W) -> Result<Moved, TunnelError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let writer = s.writer();
    let up = async {
        let mut buf = vec![0u8; MAX_CHUNK_LEN];
        let mut n_up = 0u64;
        loop {
            let n = r.read(&mut buf).await.map_err(TunnelError::Local)?;
            if n == 0 {
                writer.close().await?;
                return Ok::<u64, TunnelError>(n_up);
            }
            writer.write(&buf[..n]).await?;
            n_up += n as u64;
        }
    };
    let down = async {
        let mut n_down = 0u64;
        loop {
            match s.recv().await? {
                GuestMsg::Data(Bytes(b)) => {
                    w.write_all(&b).await.map_err(TunnelError::Local)?;
                    // Buffered writers (stdout) must pass each chunk on:
                    // the peer may wait for it before it sends more.
                    w.flush().await.map_err(TunnelError::Local)?;
                    n_down += b.len() as u64;
                }
                GuestMsg::Eof => {
                    w.flush().await.map_err(TunnelError::Local)?;
                    let _ = w.shutdown().await;
                }
                GuestMsg::Done { .. } => {
                    let _ = w.shutdown().await;
                    return Ok::<u64, TunnelError>(n_down);
                }
                GuestMsg::Error(e) => return Err(TunnelError::Guest(e.bounded().message)),
                _ => return Err(ClientError::Unexpected.into()),
            }
        }
    };
    tokio::pin!(up);
    tokio::pin!(down);
    let mut moved = Moved::default();
    let mut up_done = false;
    loop {
        tokio::select! {
            r = &mut up, if !up_done => {
                moved.to_guest = r?;
                up_done = true;
            }
            r = &mut down => {
                // The guest's end closes the tunnel, whatever the local
                // reader still does.
                moved.from_guest = r?;
                return Ok(moved);
            }
        }
    }
}
