//! The library's error type. Outer messages stay short and never repeat
//! their `#[source]`; callers print the chain (see [`chain`]).
//!
//! Every error has a [`kind`](Error::kind): the stable, matchable category
//! that crosses process and language boundaries (the Python SDK maps each
//! kind to one exception class; a server to one status). Text is for
//! people, kinds are for code. See `docs/errors.md`.

use crate::state::VmState;
use serde::Serialize;
use smolvm_proto::supervisor::{ControlError, ControlErrorKind};
use std::time::Duration;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, as a category code can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// No VM (or image) with that id.
    NotFound,
    /// A VM with that name exists already.
    AlreadyExists,
    /// The caller's input is invalid (config, name, argument).
    InvalidInput,
    /// The operation is not possible in the VM's current state.
    InvalidState,
    /// A host-side deadline passed (the guest or VMM stopped answering).
    Timeout,
    /// The VM did not boot; the console tail is attached.
    BootFailed,
    /// The VMM process died or could not start.
    VmmDied,
    /// The guest agent speaks a protocol this host does not.
    AgentIncompatible,
    /// The guest agent cannot take commands now (not ready, VM going
    /// away, contact with the supervisor lost).
    AgentUnavailable,
    /// The guest refused more work for now.
    Busy,
    /// A host program or companion binary is missing.
    HostToolMissing,
    /// The host lacks something else smolvm needs (a default route for
    /// the guest network, user namespaces, /dev/net/tun, a seccomp QEMU).
    HostUnsupported,
    /// The guest agent failed a request for a reason of its own.
    Guest,
    /// An image could not be built or used.
    Image,
    /// A host I/O or state store failure.
    Io,
    /// A guest path (file, directory) does not exist.
    PathNotFound,
    /// A guest path exists already (or a directory is not empty).
    PathExists,
    /// The guest (or host, on download) refused access to a path.
    PermissionDenied,
    /// A filesystem is full.
    NoSpace,
    /// No background process with that handle (never started in this
    /// boot of the VM, or forgotten).
    ProcessNotFound,
    /// No snapshot with that id.
    SnapshotNotFound,
    /// A snapshot with that id exists already.
    SnapshotAlreadyExists,
    /// A snapshot cannot be used: files missing, truncated or corrupt, or
    /// made by another VMM or for another machine.
    SnapshotInvalid,
    /// The guest network failed: an egress policy could not be applied
    /// (nft failed, the network helper died).
    Network,
}

impl ErrorKind {
    /// The kind's name as in `docs/errors.md` (`"not_found"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::InvalidState => "invalid_state",
            ErrorKind::Timeout => "timeout",
            ErrorKind::BootFailed => "boot_failed",
            ErrorKind::VmmDied => "vmm_died",
            ErrorKind::AgentIncompatible => "agent_incompatible",
            ErrorKind::AgentUnavailable => "agent_unavailable",
            ErrorKind::Busy => "busy",
            ErrorKind::HostToolMissing => "host_tool_missing",
            ErrorKind::HostUnsupported => "host_unsupported",
            ErrorKind::Guest => "guest",
            ErrorKind::Image => "image",
            ErrorKind::Io => "io",
            ErrorKind::PathNotFound => "path_not_found",
            ErrorKind::PathExists => "path_exists",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::NoSpace => "no_space",
            ErrorKind::ProcessNotFound => "process_not_found",
            ErrorKind::SnapshotNotFound => "snapshot_not_found",
            ErrorKind::SnapshotAlreadyExists => "snapshot_already_exists",
            ErrorKind::SnapshotInvalid => "snapshot_invalid",
            ErrorKind::Network => "network_error",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Store(#[from] crate::state::StoreError),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    #[error(transparent)]
    Locate(#[from] crate::locate::LocateError),
    #[error(transparent)]
    Tool(#[from] crate::hosttools::MissingTool),
    #[error("VM '{0}' not found; `smolvm ls --all` lists VMs")]
    NotFound(String),
    #[error("VM '{id}' is {state}; {hint}")]
    InvalidState {
        id: String,
        state: VmState,
        hint: String,
    },
    /// A host-side deadline passed.
    #[error("VM '{id}': {what} (no answer within {:.1}s); {hint}", after.as_secs_f64())]
    Timeout {
        id: String,
        what: String,
        after: Duration,
        hint: String,
    },
    /// The boot failed; `console` holds the guest console's last lines
    /// (guest text: escape it before showing it, see [`crate::text`]).
    #[error("VM '{id}' failed to boot: {reason}")]
    Boot {
        id: String,
        reason: String,
        console: Option<String>,
        /// Whether the boot ran out of time (else it failed outright).
        timed_out: bool,
    },
    #[error("VM '{id}': its VMM died: {reason}")]
    VmmDied { id: String, reason: String },
    #[error("VM '{id}': {message}")]
    AgentIncompatible { id: String, message: String },
    #[error("VM '{id}': the guest agent is unavailable: {message}")]
    AgentUnavailable { id: String, message: String },
    /// Another operation holds the VM (its lock), or the guest is full.
    #[error("VM '{id}' is busy: {message}")]
    Busy { id: String, message: String },
    #[error("VM '{id}': cannot start its supervisor")]
    Supervisor {
        id: String,
        #[source]
        source: crate::supervisor::SpawnError,
    },
    #[error("VM '{id}': lost contact with its supervisor")]
    Client {
        id: String,
        #[source]
        source: crate::supervisor::ClientError,
    },
    /// The supervisor refused a lifecycle request.
    #[error("VM '{id}': {message}")]
    Control {
        id: String,
        kind: ErrorKind,
        message: String,
    },
    /// The guest agent refused a request.
    #[error("VM '{id}': the guest refused the command: {message}")]
    Exec {
        id: String,
        kind: ErrorKind,
        message: String,
    },
    /// The host cannot do what was asked (a backend not available here).
    #[error("{0}")]
    HostUnsupported(String),
    /// The caller's argument is unusable (a relative guest path, a file
    /// where a directory is needed); the message says what to give.
    #[error("{0}")]
    Invalid(String),
    /// The guest refused a filesystem request (a missing path, a full disk);
    /// the message is the guest's (escape it before showing it).
    #[error("VM '{id}': {message}")]
    GuestPath {
        id: String,
        kind: ErrorKind,
        message: String,
    },
    #[error("snapshot '{0}' not found; `smolvm snapshot ls` lists snapshots")]
    SnapshotNotFound(String),
    #[error("a snapshot named '{0}' exists already; choose another name or remove it with `smolvm snapshot rm {0}`")]
    SnapshotExists(String),
    /// A snapshot that cannot be restored; nothing was changed.
    #[error("snapshot '{id}' cannot be used: {reason}")]
    SnapshotInvalid { id: String, reason: String },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The category of this error (stable across versions and processes).
    pub fn kind(&self) -> ErrorKind {
        use crate::state::StoreError;
        match self {
            Error::Config(_) => ErrorKind::InvalidInput,
            Error::Store(StoreError::AlreadyExists(_)) => ErrorKind::AlreadyExists,
            Error::Store(_) => ErrorKind::Io,
            Error::Image(crate::image::ImageError::MissingTool(_)) => ErrorKind::HostToolMissing,
            Error::Image(e) if e.is_not_found() => ErrorKind::NotFound,
            Error::Image(_) => ErrorKind::Image,
            Error::Locate(_) | Error::Tool(_) => ErrorKind::HostToolMissing,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::InvalidState { .. } => ErrorKind::InvalidState,
            Error::Timeout { .. } => ErrorKind::Timeout,
            Error::Boot { .. } => ErrorKind::BootFailed,
            Error::VmmDied { .. } => ErrorKind::VmmDied,
            Error::AgentIncompatible { .. } => ErrorKind::AgentIncompatible,
            Error::AgentUnavailable { .. } => ErrorKind::AgentUnavailable,
            Error::Busy { .. } => ErrorKind::Busy,
            Error::Supervisor { source, .. } => match source {
                crate::supervisor::SpawnError::Locate(_) => ErrorKind::HostToolMissing,
                crate::supervisor::SpawnError::Failed(e) => control_kind(e.kind),
                crate::supervisor::SpawnError::Exec { .. } => ErrorKind::Io,
            },
            Error::Client { source, .. } => match source {
                crate::supervisor::ClientError::Timeout(_) => ErrorKind::Timeout,
                _ => ErrorKind::AgentUnavailable,
            },
            Error::Control { kind, .. } => *kind,
            Error::Exec { kind, .. } => *kind,
            Error::HostUnsupported(_) => ErrorKind::HostUnsupported,
            Error::Invalid(_) => ErrorKind::InvalidInput,
            Error::GuestPath { kind, .. } => *kind,
            Error::SnapshotNotFound(_) => ErrorKind::SnapshotNotFound,
            Error::SnapshotExists(_) => ErrorKind::SnapshotAlreadyExists,
            Error::SnapshotInvalid { .. } => ErrorKind::SnapshotInvalid,
            Error::Io { .. } => ErrorKind::Io,
        }
    }

    /// The guest console's last lines, for boot failures (raw guest text).
    pub fn console_tail(&self) -> Option<&str> {
        match self {
            Error::Boot { console, .. } => console.as_deref(),
            Error::Supervisor {
                source: crate::supervisor::SpawnError::Failed(e),
                ..
            } => e.console_tail.as_deref(),
            _ => None,
        }
    }

    /// The library error for a supervisor's refusal of a request on `id`.
    pub(crate) fn from_control(id: &str, e: ControlError) -> Error {
        let id = id.to_string();
        match e.kind {
            ControlErrorKind::BootTimeout | ControlErrorKind::BootFailed => Error::Boot {
                id,
                timed_out: e.kind == ControlErrorKind::BootTimeout,
                reason: e.message,
                console: e.console_tail,
            },
            ControlErrorKind::VmmExited => Error::VmmDied {
                id,
                reason: e.message,
            },
            ControlErrorKind::AgentIncompatible => Error::AgentIncompatible {
                id,
                message: e.message,
            },
            // A VMM that stopped answering: say what ends it.
            ControlErrorKind::VmmUnresponsive => Error::Timeout {
                hint: format!(
                    "the VMM is not answering (hung, or stopped); `smolvm stop {id}` ends it"
                ),
                id,
                what: e.message,
                after: crate::backend::QMP_REPLY_TIMEOUT,
            },
            k => Error::Control {
                id,
                kind: control_kind(k),
                message: e.message,
            },
        }
    }
}

fn control_kind(k: ControlErrorKind) -> ErrorKind {
    match k {
        ControlErrorKind::BootTimeout | ControlErrorKind::BootFailed => ErrorKind::BootFailed,
        ControlErrorKind::VmmExited => ErrorKind::VmmDied,
        ControlErrorKind::VmmUnresponsive => ErrorKind::Timeout,
        ControlErrorKind::AgentIncompatible => ErrorKind::AgentIncompatible,
        ControlErrorKind::HostToolMissing => ErrorKind::HostToolMissing,
        ControlErrorKind::InvalidState => ErrorKind::InvalidState,
        ControlErrorKind::ShuttingDown => ErrorKind::AgentUnavailable,
        ControlErrorKind::HostUnsupported => ErrorKind::HostUnsupported,
        ControlErrorKind::Other => ErrorKind::Io,
    }
}

/// An error and its causes on one line: `outer: cause: root cause`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_errors_become_their_own_variants() {
        let boot = Error::from_control(
            "v",
            ControlError::new(ControlErrorKind::BootTimeout, "slow")
                .with_console(Some("tail".into())),
        );
        assert!(matches!(
            boot,
            Error::Boot {
                timed_out: true,
                ..
            }
        ));
        assert_eq!(boot.kind(), ErrorKind::BootFailed);
        assert_eq!(boot.console_tail(), Some("tail"));
        let died = Error::from_control("v", ControlError::new(ControlErrorKind::VmmExited, "x"));
        assert!(matches!(died, Error::VmmDied { .. }));
        let old = Error::from_control(
            "v",
            ControlError::new(ControlErrorKind::AgentIncompatible, "v9"),
        );
        assert_eq!(old.kind(), ErrorKind::AgentIncompatible);
        let hung = Error::from_control(
            "v",
            ControlError::new(ControlErrorKind::VmmUnresponsive, "hung"),
        );
        assert_eq!(hung.kind(), ErrorKind::Timeout);
        assert_eq!(ErrorKind::HostToolMissing.to_string(), "host_tool_missing");
    }
}
