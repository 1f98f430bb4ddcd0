//! The boundary that hides the hypervisor. Nothing outside `backend/` knows
//! a VMM flag or API: the library gets a `Backend` from `get` and drives a
//! `Box<dyn Vmm>`; both traits are the crate's own (a new VMM is a new
//! implementation inside it). Public here: the VM directory's layout, the
//! backend and accelerator names, and the accelerator choice.

mod layout;
pub(crate) mod qemu;
mod spec;
mod vmm;

pub use layout::{files, VmDir};
pub(crate) use qemu::has_default_route;
pub use qemu::{MACHINE_ABI, SNAPSHOT_MEMORY, SNAPSHOT_STATE};
pub use spec::{BackendKind, LaunchSpec, ResolvedAccel, RestoreSpec, VmmExit};
pub use vmm::AccelVerdict;
pub(crate) use vmm::{get, Backend, BoxFuture, SnapshotOutcome, Vmm, VmmError};

/// The accelerator `requested` resolves to for `kind` on this host
/// (probing `auto` once; blocking).
pub fn resolve_accel(
    kind: BackendKind,
    requested: crate::Accel,
    kernel: &std::path::Path,
    initramfs: &std::path::Path,
) -> AccelVerdict {
    get(kind).resolve_accel(requested, kernel, initramfs)
}

/// Forgets the cached accelerator verdict: the next `auto` probes again.
pub fn forget_cached_verdict() {
    qemu::forget_cached_verdict();
}

/// How long a VMM control command may take before the VMM counts as
/// unresponsive.
pub const QMP_REPLY_TIMEOUT: std::time::Duration = qemu::QMP_REPLY_TIMEOUT;
