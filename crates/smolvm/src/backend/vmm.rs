//! The backend boundary: a [`Backend`] (one per VMM kind) prepares disks,
//! chooses the accelerator and launches a [`Vmm`] — a trait object, so the
//! supervisor and the sandbox layer never name a VMM type. A second VMM
//! (Firecracker) is a new implementation of these two traits, not an edit
//! of their callers.

use super::{BackendKind, LaunchSpec, ResolvedAccel, VmmExit};
use crate::config::Accel;
use smolvm_proto::supervisor::ControlErrorKind;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;

/// A boxed future, for object-safe async methods.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a backend operation failed: a kind (the same kinds clients see)
/// and the whole cause chain as text.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct VmmError {
    pub kind: ControlErrorKind,
    pub message: String,
    /// Set when the failure is a missing host program.
    pub missing_tool: Option<crate::hosttools::MissingTool>,
}

/// The accelerator chosen for a VM, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccelVerdict {
    pub accel: ResolvedAccel,
    /// Why, in one line (shown by `smolvm doctor` and in logs).
    pub reason: String,
    /// True when this verdict came from the cache.
    #[serde(default)]
    pub cached: bool,
}

/// One VMM implementation.
pub trait Backend: Send + Sync {
    fn kind(&self) -> BackendKind;

    /// Creates the VM's writable root disk at `disk`, backed by the image's
    /// root filesystem `base` (never written), of `size` bytes when given.
    fn create_disk<'a>(
        &'a self,
        base: &'a Path,
        disk: &'a Path,
        size: Option<u64>,
    ) -> BoxFuture<'a, Result<(), VmmError>>;

    /// Resolves `requested` to the accelerator to use (probing `auto`;
    /// blocking: it may boot a probe VM).
    fn resolve_accel(&self, requested: Accel, kernel: &Path, initramfs: &Path) -> AccelVerdict;

    /// Starts the VMM for `spec` with its vCPUs stopped. Must be called
    /// from the thread that lives as long as the VM (child processes die
    /// with it: parent-death signal).
    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> BoxFuture<'a, Result<Box<dyn Vmm>, VmmError>>;

    /// Host checks this backend needs (`smolvm doctor`), as (name, result).
    fn host_checks(&self) -> Vec<(&'static str, Result<String, String>)>;
}

/// The operations on a launched VMM.
pub trait Vmm: Send {
    /// OS pid of the VMM.
    fn pid(&self) -> u32;
    /// Stops the vCPUs; the VMM stays alive.
    fn pause(&mut self) -> BoxFuture<'_, Result<(), VmmError>>;
    /// Continues the vCPUs.
    fn resume(&mut self) -> BoxFuture<'_, Result<(), VmmError>>;
    /// After a control request timed out (a VMM stopped or hung for a
    /// while): reconnects when it answers again and puts the vCPUs back as
    /// the last successful request left them (a timed-out request may have
    /// run late). `Ok` once done.
    fn reconcile(&mut self) -> BoxFuture<'_, Result<(), VmmError>>;
    /// Asks the VMM to exit now (no guest cooperation).
    fn quit(&mut self) -> BoxFuture<'_, Result<(), VmmError>>;
    /// Kills the VMM process.
    fn kill(&mut self);
    /// Waits for the VMM process to exit.
    fn wait(&mut self) -> BoxFuture<'_, VmmExit>;
    /// True while the VMM process exists.
    fn is_alive(&mut self) -> bool;
}

/// The backend of `kind`.
pub fn get(kind: BackendKind) -> &'static dyn Backend {
    match kind {
        BackendKind::Qemu => &super::qemu::QemuBackend,
    }
}
