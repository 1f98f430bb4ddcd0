//! The library's error type. Outer messages stay short and never repeat
//! their `#[source]`; callers print the chain (see [`chain`]).

use crate::state::VmState;

pub type Result<T, E = Error> = std::result::Result<T, E>;

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
    #[error("VM '{id}' failed to boot: {reason}")]
    Boot { id: String, reason: String },
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
    #[error("VM '{id}': {message}")]
    Vm { id: String, message: String },
    #[error("VM '{id}': the guest refused the command: {message}")]
    Exec { id: String, message: String },
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
