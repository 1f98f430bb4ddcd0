//! smolvm host library: disposable, hardware-isolated Linux sandboxes.
//!
//! The entry point is [`Sandbox`]. Module roots stay thin; logic lives in
//! files named after what they do.

// Tests may cast freely (small, known values); the code itself may not.
#![cfg_attr(
    test,
    allow(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        clippy::cast_sign_loss
    )
)]

pub mod backend;
pub mod config;
pub mod doctor;
pub mod egress;
pub mod error;
pub mod hosttools;
pub mod image;
pub mod locate;
pub mod paths;
pub(crate) mod private;
pub mod sandbox;
pub mod snapshot;
pub mod state;
pub(crate) mod supervisor;
pub(crate) mod sys;
pub mod text;

pub use config::{Accel, SandboxConfig};
pub use error::ErrorKind;
pub use error::{Error, Result};
pub use sandbox::{Command, ExecOptions, ExecOutput, Sandbox, VmState};

/// Entry point of the `smolvm-supervisor` binary (started by the library;
/// not for direct use).
#[doc(hidden)]
pub use supervisor::main_entry as supervisor_main;
