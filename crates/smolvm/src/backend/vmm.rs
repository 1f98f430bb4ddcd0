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

    /// Creates a qcow2 layer at `disk` over the qcow2 image named
    /// `backing` (stored as given: relative names resolve against `disk`'s
    /// directory; it need not exist yet), of `size` bytes.
    fn create_layer<'a>(
        &'a self,
        backing: &'a str,
        disk: &'a Path,
        size: u64,
    ) -> BoxFuture<'a, Result<(), VmmError>>;

    /// Resolves `requested` to the accelerator to use (probing `auto`;
    /// blocking: it may boot a probe VM).
    fn resolve_accel(&self, requested: Accel, kernel: &Path, initramfs: &Path) -> AccelVerdict;

    /// Starts the VMM for `spec` with its vCPUs stopped. Must be called
    /// from the thread that lives as long as the VM (child processes die
    /// with it: parent-death signal).
    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> BoxFuture<'a, Result<Box<dyn Vmm>, VmmError>>;

    /// The VMM program this host runs (its identity is part of what a
    /// snapshot needs to load).
    fn vmm_binary(&self) -> Option<std::path::PathBuf>;

    /// Host checks this backend needs (`smolvm doctor`), as (name, result).
    fn host_checks(&self) -> Vec<(&'static str, Result<String, String>)>;
}

/// What a snapshot did (see [`Vmm::snapshot`]).
#[derive(Debug, Default, Clone)]
pub struct SnapshotOutcome {
    /// The VM writes to the new overlay now: the frozen disk is in use.
    pub disk_switched: bool,
    pub state_bytes: u64,
    /// Allocated bytes of the RAM copy.
    pub memory_bytes: u64,
    /// RAM went into the device state (the VM's RAM was a private mapping).
    pub memory_in_state: bool,
    /// How long the vCPUs were stopped.
    pub downtime: std::time::Duration,
    pub total: std::time::Duration,
    pub was_running: bool,
}

/// The operations on a launched VMM.
pub trait Vmm: Send {
    /// OS pid of the VMM.
    fn pid(&self) -> u32;
    /// Stops the vCPUs; the VMM stays alive.
    fn pause(&mut self) -> BoxFuture<'_, Result<(), VmmError>>;
    /// Continues the vCPUs.
    fn resume(&mut self) -> BoxFuture<'_, Result<(), VmmError>>;
    /// Changes what the guest may reach (a normalised policy), at once:
    /// connections the new policy does not admit are cut. A VM without a
    /// NIC takes only `Off`.
    fn set_egress(
        &mut self,
        policy: &crate::config::EgressPolicy,
    ) -> BoxFuture<'_, Result<(), VmmError>> {
        let _ = policy;
        Box::pin(async {
            Err(VmmError {
                kind: ControlErrorKind::Other,
                message: "this backend cannot change the egress policy".into(),
                missing_tool: None,
            })
        })
    }
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
    /// Snapshots the stopped machine into `dir` (device state, RAM) and
    /// switches the root disk to `next_disk` (an overlay over the current
    /// disk's frozen file, renamed onto the disk's path). The vCPUs
    /// continue afterwards when they ran before and `resume` is set. On
    /// failure the outcome says what had happened (the disk switch
    /// cannot be undone).
    fn snapshot<'a>(
        &'a mut self,
        dir: &'a Path,
        next_disk: &'a Path,
        resume: bool,
    ) -> BoxFuture<'a, Result<SnapshotOutcome, (VmmError, SnapshotOutcome)>>;
}

/// The backend of `kind`.
pub fn get(kind: BackendKind) -> &'static dyn Backend {
    match kind {
        BackendKind::Qemu => &super::qemu::QemuBackend,
    }
}
