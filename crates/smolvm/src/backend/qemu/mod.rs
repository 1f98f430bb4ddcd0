//! QEMU `microvm` backend.

mod args;
mod probe;
mod qmp;
mod vm;

pub use args::{host_tsc_khz, launch_args, probe_args, QEMU_BINARY};
pub use probe::{forget_cached_verdict, resolve_accel, AccelVerdict};
pub use qmp::{Qmp, QmpError};
pub use vm::{create_overlay, tail_console, tail_file, QemuError, QemuVm};
