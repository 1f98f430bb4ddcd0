//! The one error type of the image pipeline.

use std::path::PathBuf;

use crate::hosttools::MissingTool;
use crate::locate::LocateError;

/// Why an image could not be built, loaded or removed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("unknown image `{name}`; known images: {known}")]
    UnknownImage { name: String, known: String },

    #[error("image `{name}` is not built; run `smolvm image build {name}`")]
    NotBuilt { name: String },

    #[error("invalid image name `{0}`")]
    InvalidName(String),

    #[error(transparent)]
    MissingTool(#[from] MissingTool),

    #[error(transparent)]
    Agent(#[from] LocateError),

    #[error("{path} is not a statically linked busybox; install it with `sudo apt-get install busybox-static`")]
    BusyboxNotStatic { path: PathBuf },

    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    #[error("`{tool}` failed ({status}){tail}")]
    Command {
        tool: String,
        status: String,
        /// The last lines the tool printed, preformatted (may be empty).
        tail: String,
    },

    #[error("building the root filesystem without root failed (mmdebstrap's unshare mode needs unprivileged user namespaces, newuidmap and /etc/subuid and /etc/subgid entries); building as root avoids all three")]
    Unprivileged {
        #[source]
        source: Box<ImageError>,
    },

    #[error("user `{user}` has no entry in {file}; add one with `sudo usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}`, or build as root")]
    NoSubIds { user: String, file: PathBuf },

    #[error("kernel {path}: {reason}")]
    BadKernel { path: PathBuf, reason: String },

    #[error(
        "kernel payload is {format}-compressed; only lz4, gzip, xz and zstd payloads are supported"
    )]
    UnsupportedCompression { format: String },

    #[error("kernel module `{name}` not found under {dir}")]
    MissingModule { name: String, dir: PathBuf },

    #[error("kernel module {path}: {reason}")]
    BadModule { path: PathBuf, reason: String },

    #[error("kernel modules depend on each other in a cycle through `{0}`")]
    ModuleCycle(String),

    #[error("initramfs entry `{path}`: {reason}")]
    Cpio { path: String, reason: String },

    #[error("manifest {path} is unreadable")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl ImageError {
    /// True when the image does not exist (unknown name, or not built).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            ImageError::UnknownImage { .. } | ImageError::NotBuilt { .. }
        )
    }

    /// Wraps an I/O error with a short description of what was attempted.
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
        let context = context.into();
        move |source| ImageError::Io { context, source }
    }
}
