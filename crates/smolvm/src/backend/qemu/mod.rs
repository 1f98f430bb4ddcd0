//! QEMU `microvm` backend.

mod args;
mod backend;
pub(crate) mod dns;
mod dns_msg;
mod egress_nft;
mod net;
mod probe;
mod qmp;
mod vm;

pub use args::{check_paths, launch_args, probe_args, MACHINE_ABI, QEMU_BINARY, SANDBOX};
pub use backend::{confine_child, QemuBackend};
pub use net::{has_default_route, GuestNet, NetError};
pub use probe::{forget_cached_verdict, resolve_accel};
pub use qmp::{Qmp, QmpError, REPLY_TIMEOUT as QMP_REPLY_TIMEOUT};
pub use vm::{create_layer, create_overlay, QemuError, QemuVm, SNAPSHOT_MEMORY, SNAPSHOT_STATE};
