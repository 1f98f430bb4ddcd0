//! QEMU `microvm` backend.

mod args;
mod backend;
mod net;
mod probe;
mod qmp;
mod vm;

pub use args::{
    check_paths, host_tsc_khz, launch_args, opt_value, probe_args, QEMU_BINARY, SANDBOX,
};
pub use backend::{confine_child, seccomp_check, QemuBackend};
pub use net::{GuestNet, NetError};
pub use probe::{forget_cached_verdict, resolve_accel};
pub use qmp::{Qmp, QmpError};
pub use vm::{create_overlay, QemuError, QemuVm};
