//! The `Sandbox` lifecycle API.

mod boot;
mod exec;
mod lifecycle;
mod lock;
mod prune;
mod record;
pub mod transitions;
mod types;

pub use crate::state::VmState;
pub use crate::supervisor::{ClientError, ExecEvent, ExecStream, GUEST_GRACE};
pub use exec::{ExecOptions, ExecOutput};
pub use lifecycle::{Progress, ProgressFn, Sandbox, DEFAULT_BOOT_TIMEOUT, DEFAULT_STOP_TIMEOUT};
pub use lock::VmLock;
pub use prune::{prune, PruneItem};
pub use record::VmInfo;
pub use types::{BootTimings, Command, ExitStatus, GuestError};
