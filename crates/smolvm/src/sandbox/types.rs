//! The library's own public types for commands and boots. The wire types
//! (`smolvm-proto`) stay behind them: the protocol can change without the
//! API (and the Python SDK built on it) changing.

use serde::Serialize;

/// What to run in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Executed directly; `argv[0]` is looked up in the guest's `PATH`.
    Argv(Vec<String>),
    /// Run as `/bin/sh -c <string>`.
    Shell(String),
}

impl Command {
    /// `/bin/sh -c <s>`.
    pub fn shell(s: impl Into<String>) -> Command {
        Command::Shell(s.into())
    }

    /// A program and its arguments, no shell.
    pub fn argv<I, S>(args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Command::Argv(args.into_iter().map(Into::into).collect())
    }
}

impl From<Command> for smolvm_proto::Command {
    fn from(c: Command) -> Self {
        match c {
            Command::Argv(a) => smolvm_proto::Command::Argv(a),
            Command::Shell(s) => smolvm_proto::Command::Shell(s),
        }
    }
}

/// How a guest process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ExitStatus {
    /// Exit code when it exited normally.
    pub code: Option<i32>,
    /// Signal number when it was killed by a signal.
    pub signal: Option<i32>,
    /// True when its timeout ran out and the guest killed it.
    pub timed_out: bool,
    /// Wall time from start to exit, measured in the guest.
    pub duration_ms: u64,
}

impl From<smolvm_proto::ExitStatus> for ExitStatus {
    fn from(s: smolvm_proto::ExitStatus) -> Self {
        ExitStatus {
            code: s.code,
            signal: s.signal,
            timed_out: s.timed_out,
            duration_ms: s.duration_ms,
        }
    }
}

/// Why the guest refused or failed a request (a process that could not
/// start, a full agent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestError {
    pub kind: crate::error::ErrorKind,
    /// The guest's text, bounded (escape it before showing it).
    pub message: String,
}

impl From<smolvm_proto::ErrorInfo> for GuestError {
    fn from(e: smolvm_proto::ErrorInfo) -> Self {
        use crate::error::ErrorKind as K;
        use smolvm_proto::ErrorKind as P;
        let e = e.bounded();
        let kind = match e.kind {
            P::NotFound
            | P::PermissionDenied
            | P::InvalidRequest
            | P::Unsupported
            | P::AlreadyExists
            | P::NotEmpty => K::InvalidInput,
            P::Busy => K::Busy,
            P::Unavailable => K::AgentUnavailable,
            P::NoSpace => K::NoSpace,
            P::Other | P::FlowControl => K::Guest,
        };
        GuestError {
            kind,
            // Guest text: on one line, escaped (it ends up on terminals).
            message: crate::text::escape_line(&e.message),
        }
    }
}

/// Timings of one boot, host and guest side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootTimings {
    /// The guest agent's version string.
    pub agent_version: String,
    /// Host wall ms from launching the VMM to its control socket answering.
    pub vmm_start_ms: u64,
    /// Host wall ms from launching the VMM to the agent's hello.
    pub ready_ms: u64,
    /// Guest boot-clock ms when the agent started as PID 1.
    pub guest_agent_start_ms: u64,
    /// Guest boot-clock ms when the agent was ready to serve.
    pub guest_ready_ms: u64,
}

impl From<smolvm_proto::supervisor::ReadyInfo> for BootTimings {
    fn from(r: smolvm_proto::supervisor::ReadyInfo) -> Self {
        BootTimings {
            agent_version: r.hello.agent_version,
            vmm_start_ms: r.vmm_start_ms,
            ready_ms: r.ready_ms,
            guest_agent_start_ms: r.hello.agent_start_ms,
            guest_ready_ms: r.hello.ready_ms,
        }
    }
}
