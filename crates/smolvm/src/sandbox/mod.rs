//! The `Sandbox` lifecycle API.

mod boot;
mod env;
mod exec;
mod files;
mod lifecycle;
pub(crate) mod lock;
mod network;
mod ports;
mod procs;
mod prune;
mod record;
mod snapshot;
mod ssh;
pub mod transitions;
mod types;

pub use crate::state::VmState;
pub use crate::supervisor::tunnel::{splice as splice_tunnel, Moved as TunnelMoved};
pub use crate::supervisor::AgentStream;
pub use crate::supervisor::{ClientError, ExecEvent, ExecStream, StreamWriter, GUEST_GRACE};
pub use exec::{ExecOptions, ExecOutput};
pub use files::{GuestStat, TreeSummary, MAX_TREE_ENTRIES};
pub use lifecycle::{Progress, ProgressFn, Sandbox, DEFAULT_BOOT_TIMEOUT, DEFAULT_STOP_TIMEOUT};
pub use lock::VmLock;
pub use ports::parse_forward;
pub use procs::{ProcInfo, Spawned};
pub use prune::{prune, PruneItem};
pub use record::VmInfo;
pub use smolvm_proto::{DirEntry, FileKind};
pub use snapshot::{
    delete_snapshot, forget_warm, list_snapshots, snapshot_info, RestoreOptions, SnapshotOptions,
    MAX_FORK,
};
pub use ssh::{shell_quote, SshAccess, GUEST_SSH_PORT};
pub use types::{BootTimings, Command, ExitStatus, GuestError};
