//! The smolvm wire protocol, shared by the host and the guest agent so the
//! two can never drift.
//!
//! Every connection carries length-prefixed frames (`codec`). Each frame is
//! a postcard-encoded [`Frame`]: a stream id plus one message. Stream 0 is
//! the connection itself (hello); every request opens its own non-zero
//! stream chosen by the requester, so many requests can be in flight at
//! once and their replies (streamed stdout/stderr, exit) interleave freely.
//!
//! Two links use this framing:
//! - host ↔ guest agent (`HostMsg` / `GuestMsg`), over virtio-serial or vsock;
//! - client ↔ per-VM supervisor (`supervisor::ClientMsg` /
//!   `supervisor::SupervisorMsg`), over a unix socket on the host.
//!
//! No I/O lives here.

// Tests may cast freely (small, known values); the code itself may not.
#![cfg_attr(
    test,
    allow(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        clippy::cast_sign_loss
    )
)]

pub mod bytes;
pub mod cmdline;
pub mod codec;
pub mod messages;
pub mod supervisor;

pub use bytes::Bytes;
pub use codec::{decode_payload, encode_frame, CodecError, Decoder};
pub use messages::*;

/// Version of the host↔agent protocol. Bump on any incompatible change to
/// `HostMsg`/`GuestMsg`. The `Hello` variants and their structs are frozen
/// forever so that any two versions can at least tell each other apart.
/// 2: per-stream credit windows, file transfer, filesystem requests.
/// 3: `Quiesce`/`Thaw`/`Reinit` (snapshots, restored machines).
/// 4: `Connect` tunnels (port forwards), `SshStart`.
pub const PROTOCOL_VERSION: u32 = 4;

/// Credit each stream starts with in each direction, in data bytes: what a
/// peer may send on a new stream before the receiver hands credit back, and
/// the most a receiver ever has outstanding (it never grants past it). So
/// it bounds what one stream can make either side buffer.
pub const STREAM_WINDOW: u32 = 1024 * 1024;

/// Largest payload of a single frame, in bytes. A peer announcing more is
/// broken or hostile; the connection is dropped.
pub const MAX_FRAME_LEN: usize = 1024 * 1024;

/// Largest data chunk (stdout/stderr/stdin) carried in one frame.
pub const MAX_CHUNK_LEN: usize = 64 * 1024;

/// Length of the frame header: a little-endian `u32` payload length.
pub const HEADER_LEN: usize = 4;

/// The stream id of connection-level messages (hello).
pub const CONTROL_STREAM: u32 = 0;

/// The name of the agent's virtio-serial port.
pub const AGENT_PORT_NAME: &str = "smolvm.agent";

/// A stream id plus one message: the unit on the wire.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Frame<M> {
    pub stream: u32,
    pub msg: M,
}

impl<M> Frame<M> {
    pub fn new(stream: u32, msg: M) -> Self {
        Self { stream, msg }
    }
}
