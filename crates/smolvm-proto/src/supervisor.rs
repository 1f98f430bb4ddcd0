//! Client ↔ per-VM supervisor messages (host-local unix socket).
//!
//! A client's agent requests travel as `ClientMsg::Agent` on client-chosen
//! stream ids; the supervisor maps them onto the single agent connection and
//! maps the replies back, so clients never see each other's streams.
//! Lifecycle requests travel as `ClientMsg::Control`, one per stream.

use crate::{GuestHello, GuestMsg, HostMsg};
use serde::{Deserialize, Serialize};

/// Version of the client↔supervisor protocol. 2: failures carry a kind
/// ([`ControlError`]). 3: agent protocol v2 inside (credit, files).
/// 4: `Snapshot`. 5: port forwards, egress policy.
pub const SUPERVISOR_PROTOCOL_VERSION: u32 = 5;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMsg {
    /// First message, on stream 0. FROZEN: keep variant 0.
    Hello { version: u32 },
    /// A message for the guest agent on this stream.
    Agent(HostMsg),
    /// A lifecycle request; answered by one `SupervisorMsg::Control`.
    Control(ControlRequest),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SupervisorMsg {
    /// Answer to `ClientMsg::Hello`, on stream 0. FROZEN: keep variant 0.
    Hello { version: u32, vm_id: String },
    /// A message from the guest agent for this stream.
    Agent(GuestMsg),
    /// The answer to a `ControlRequest`.
    Control(ControlResponse),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    /// Current view of the VM.
    Status,
    /// Answers once the agent has said hello, or with an error when the boot
    /// fails or `timeout_ms` passes.
    WaitReady { timeout_ms: u64 },
    /// Graceful shutdown through the agent; the VMM is killed when it has not
    /// exited after `timeout_ms`. Answers once the VMM is gone.
    Stop { timeout_ms: u64 },
    /// Kills the VMM at once.
    Kill,
    /// Stops the vCPUs (the VMM stays alive).
    Pause,
    /// Continues the vCPUs.
    Resume,
    /// Writes a memory snapshot into `dir` and freezes the root disk
    /// (see [`SnapshotRequest`]); answered by `Snapshot`.
    Snapshot(SnapshotRequest),
    /// Opens a host port forward to the guest (see [`PortForward`]);
    /// answered by `Port` with the host port actually bound.
    PortAdd(PortForward),
    /// Closes the forward on `host_port` (its open connections end).
    PortRemove { host_port: u16 },
    /// Answered by `Ports`.
    PortList,
    /// Applies an egress policy to the running guest's network (atomic:
    /// the old policy holds until the new one is in force; to allowlist or
    /// off, every open connection is cut and learned addresses are
    /// forgotten).
    /// Answered by `Ok`.
    SetEgress(EgressPolicy),
}

/// A host TCP port forwarded to a port on the guest's loopback, carried
/// over the agent channel (one stream per connection): no guest NIC
/// needed, and services bound to the guest's 127.0.0.1 are reachable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortForward {
    /// Host address to listen on (127.0.0.1 unless asked otherwise).
    pub host_addr: std::net::IpAddr,
    /// Host port; 0 in a request picks a free one.
    pub host_port: u16,
    pub guest_port: u16,
}

/// What the guest may reach on the network (docs/network.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum EgressPolicy {
    /// Anything but the host's own services.
    #[default]
    Open,
    /// Nothing: no NIC when set at creation; on a VM that has one, every
    /// packet is dropped.
    Off,
    /// Only these destinations: names (exact, or `*.suffix` for names
    /// below the suffix) resolve and connect to the addresses their
    /// answers carry each time; CIDRs connect. Validated, normalised
    /// entries (lowercase names without a trailing dot, `a.b.c.d/n`).
    Allowlist {
        #[serde(default)]
        domains: Vec<String>,
        #[serde(default)]
        cidrs: Vec<String>,
    },
}

/// What a snapshot writes, prepared by the library: `dir` exists, holds a
/// hard link to the VM's current disk (the file that becomes the frozen
/// disk), and `next_disk` is the new writable overlay (in the VM's
/// directory, backed by the frozen disk's final path) that the VM
/// switches to and that is renamed over its disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRequest {
    /// Where `state` (device state) and `memory` (guest RAM) are written.
    pub dir: std::path::PathBuf,
    pub next_disk: std::path::PathBuf,
    /// Continue the vCPUs afterwards (else the VM stays paused).
    pub resume: bool,
}

/// What a snapshot did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotReport {
    /// The disk was switched to `next_disk`: the frozen disk is in use as
    /// its backing from now on, whether or not the rest succeeded.
    pub disk_switched: bool,
    /// Bytes of device state written.
    pub state_bytes: u64,
    /// Bytes of guest RAM written (allocated, not the file's length).
    pub memory_bytes: u64,
    /// Whether guest RAM went into `state` (a VM whose RAM is a private
    /// mapping) rather than into `memory`.
    pub memory_in_state: bool,
    /// How long the vCPUs were stopped, ms.
    pub downtime_ms: u64,
    /// The whole operation, ms.
    pub total_ms: u64,
    /// Whether the VM was running before (it is running afterwards when
    /// this and `resume` hold).
    pub was_running: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlResponse {
    Ok,
    Ready(ReadyInfo),
    Status(SupervisorStatus),
    Error(ControlError),
    Snapshot(SnapshotReport),
    Port(PortForward),
    Ports(Vec<PortForward>),
}

/// Why a lifecycle request (or the supervisor's start) failed: a kind for
/// code, a message for people, and the guest console's last lines apart
/// from both (guest text: shown escaped, attached to boot errors).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlError {
    pub kind: ControlErrorKind,
    pub message: String,
    pub console_tail: Option<String>,
}

impl ControlError {
    pub fn new(kind: ControlErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            console_tail: None,
        }
    }

    pub fn with_console(mut self, tail: Option<String>) -> Self {
        self.console_tail = tail.filter(|t| !t.is_empty());
        self
    }
}

impl std::fmt::Display for ControlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The kinds of [`ControlError`]. New kinds are added at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlErrorKind {
    /// The guest agent did not answer within the boot timeout.
    BootTimeout,
    /// The VM can never become ready (the guest broke the protocol, its
    /// channel failed).
    BootFailed,
    /// The VMM process exited or failed to start.
    VmmExited,
    /// The VMM did not answer its control socket in time (hung, or stopped
    /// with SIGSTOP).
    VmmUnresponsive,
    /// The guest agent speaks another protocol version.
    AgentIncompatible,
    /// A host program the VM needs is missing.
    HostToolMissing,
    /// The request makes no sense in the VM's current run state.
    InvalidState,
    /// The supervisor is shutting down.
    ShuttingDown,
    Other,
    /// The host lacks something the VM needs that is not a program (a
    /// default route for the guest network, user namespaces, /dev/net/tun).
    HostUnsupported,
}

/// Boot timings, host and guest side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyInfo {
    pub hello: GuestHello,
    /// Host wall ms from launching the VMM to the VMM's control socket answering.
    pub vmm_start_ms: u64,
    /// Host wall ms from launching the VMM to the agent's hello.
    pub ready_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmRunState {
    Booting,
    Running,
    Paused,
    Stopping,
    Exited,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisorStatus {
    pub state: VmRunState,
    pub vmm_pid: u32,
    pub agent_connected: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encode_frame, Decoder, Frame};

    #[test]
    fn control_round_trip() {
        let msgs = [
            ClientMsg::Hello {
                version: SUPERVISOR_PROTOCOL_VERSION,
            },
            ClientMsg::Agent(HostMsg::Ping { nonce: 1 }),
            ClientMsg::Control(ControlRequest::Stop { timeout_ms: 5000 }),
            ClientMsg::Control(ControlRequest::WaitReady { timeout_ms: 1 }),
        ];
        let mut d = Decoder::new();
        for (i, m) in msgs.iter().enumerate() {
            d.push(&encode_frame(&Frame::new(i as u32, m.clone())).unwrap());
        }
        for (i, m) in msgs.iter().enumerate() {
            let f: Frame<ClientMsg> = d.next_frame().unwrap().unwrap();
            assert_eq!(f, Frame::new(i as u32, m.clone()));
        }
        let e = SupervisorMsg::Control(ControlResponse::Error(
            ControlError::new(ControlErrorKind::BootTimeout, "late")
                .with_console(Some("tail".into())),
        ));
        let mut d = Decoder::new();
        d.push(&encode_frame(&Frame::new(3, e.clone())).unwrap());
        assert_eq!(d.next_frame::<SupervisorMsg>().unwrap().unwrap().msg, e);
        let s = SupervisorMsg::Control(ControlResponse::Status(SupervisorStatus {
            state: VmRunState::Paused,
            vmm_pid: 42,
            agent_connected: true,
        }));
        let mut d = Decoder::new();
        d.push(&encode_frame(&Frame::new(9, s.clone())).unwrap());
        assert_eq!(d.next_frame::<SupervisorMsg>().unwrap().unwrap().msg, s);
    }
}
