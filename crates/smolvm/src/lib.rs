//! smolvm host library: disposable, hardware-isolated Linux sandboxes.
//!
//! The entry point is [`Sandbox`]. Module roots stay thin; logic lives in
//! files named after what they do.

pub mod backend;
pub mod config;
pub mod doctor;
pub mod error;
pub mod hosttools;
pub mod image;
pub mod locate;
pub mod paths;
pub mod private;
pub mod sandbox;
pub mod state;
pub mod supervisor;
pub mod sys;
pub mod text;

pub use config::{Accel, SandboxConfig};
pub use error::{Error, Result};
pub use sandbox::{ExecOptions, ExecOutput, Sandbox, VmState};
