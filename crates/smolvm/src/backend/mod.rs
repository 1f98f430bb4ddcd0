//! The boundary that hides the hypervisor. Nothing outside `backend/` knows
//! a VMM flag or API.

pub mod qemu;

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;

/// The accelerator actually used for a VM (after `auto` was resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResolvedAccel {
    Kvm,
    Tcg,
}

impl fmt::Display for ResolvedAccel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResolvedAccel::Kvm => "kvm",
            ResolvedAccel::Tcg => "tcg",
        })
    }
}

/// Everything a backend needs to boot one VM. Written by the library as
/// `launch.json` in the VM's directory and read by its supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchSpec {
    pub id: String,
    pub vm_dir: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The VM's writable root disk (qcow2 overlay over the image's ext4).
    pub disk: PathBuf,
    pub memory_mib: u32,
    pub cpus: u32,
    pub accel: ResolvedAccel,
    pub network: bool,
    /// Grow the guest's root filesystem to fill `disk` at boot (the disk
    /// was made larger than the image).
    #[serde(default)]
    pub grow_root: bool,
}

/// Files a backend keeps in the VM directory (relative names: the VMM runs
/// with the VM directory as its working directory, which keeps unix socket
/// paths short whatever the data dir is).
pub mod files {
    pub const LAUNCH_SPEC: &str = "launch.json";
    pub const CONSOLE_LOG: &str = "console.log";
    /// The previous console log after a rotation.
    pub const CONSOLE_LOG_OLD: &str = "console.log.1";
    pub const CONSOLE_SOCKET: &str = "console.sock";
    pub const VMM_LOG: &str = "vmm.log";
    pub const SUPERVISOR_LOG: &str = "supervisor.log";
    pub const QMP_SOCKET: &str = "qmp.sock";
    pub const AGENT_SOCKET: &str = "agent.sock";
    pub const SUPERVISOR_SOCKET: &str = "sup.sock";
    pub const MEMORY_FILE: &str = "memory";
    /// passt's socket (the guest's network) and its log.
    pub const NET_SOCKET: &str = "net.sock";
    pub const NET_LOG: &str = "net.log";
    pub const NET_PASTA_PID: &str = "pasta.pid";
    pub const DISK: &str = "disk.qcow2";
    /// Hard link to the image's root filesystem that backs `DISK`.
    pub const BASE_DISK: &str = "base.ext4";

    /// What only exists while the VM runs: sockets and the guest RAM file
    /// (as large as the guest's memory). The disk and logs stay.
    pub const RUNTIME: &[&str] = &[
        SUPERVISOR_SOCKET,
        QMP_SOCKET,
        AGENT_SOCKET,
        CONSOLE_SOCKET,
        NET_SOCKET,
        NET_PASTA_PID,
        MEMORY_FILE,
    ];

    /// The runtime files the VMM and its network create (all of
    /// [`RUNTIME`] but the supervisor's own socket).
    pub const VMM_RUNTIME: &[&str] = &[
        QMP_SOCKET,
        AGENT_SOCKET,
        CONSOLE_SOCKET,
        NET_SOCKET,
        NET_PASTA_PID,
        MEMORY_FILE,
    ];

    /// Removes the runtime files of the VM in `vm_dir` (best effort).
    pub fn remove_runtime(vm_dir: &std::path::Path) {
        for f in RUNTIME {
            let _ = std::fs::remove_file(vm_dir.join(f));
        }
    }
}

/// How the VMM process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl fmt::Display for VmmExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (_, Some(s)) => write!(f, "VMM exited with signal {s}"),
            (Some(c), None) => write!(f, "VMM exited with status {c}"),
            (None, None) => write!(f, "VMM exited"),
        }
    }
}

/// The operations every backend offers, on a launched VMM.
#[allow(async_fn_in_trait)]
pub trait Vmm {
    type Error: std::error::Error + Send + Sync + 'static;
    /// OS pid of the VMM.
    fn pid(&self) -> u32;
    /// Stops the vCPUs; the VMM stays alive.
    async fn pause(&mut self) -> Result<(), Self::Error>;
    /// Continues the vCPUs.
    async fn resume(&mut self) -> Result<(), Self::Error>;
    /// Asks the VMM to exit now (no guest cooperation).
    async fn quit(&mut self) -> Result<(), Self::Error>;
    /// Kills the VMM process.
    fn kill(&mut self);
    /// Waits for the VMM process to exit.
    async fn wait(&mut self) -> VmmExit;
    /// True while the VMM process exists.
    fn is_alive(&mut self) -> bool;
}
