//! The boundary that hides the hypervisor. Nothing outside `backend/` knows
//! a VMM flag or API: callers get a [`Backend`] from [`get`] and drive a
//! `Box<dyn Vmm>`.

mod layout;
pub mod qemu;
mod spec;
mod vmm;

pub use layout::{files, VmDir};
pub use spec::{BackendKind, LaunchSpec, ResolvedAccel, VmmExit};
pub use vmm::{get, AccelVerdict, Backend, BoxFuture, Vmm, VmmError};
