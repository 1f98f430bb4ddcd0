//! What a backend is told to boot, and what it reports back.

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
    /// Which backend boots it.
    #[serde(default)]
    pub backend: BackendKind,
    pub network: bool,
    /// What the guest may reach at first (changed live through the
    /// supervisor). Only meaningful with `network`.
    #[serde(default)]
    pub egress: crate::config::EgressPolicy,
    /// Grow the guest's root filesystem to fill `disk` at boot (the disk
    /// was made larger than the image).
    #[serde(default)]
    pub grow_root: bool,
    /// Continue a snapshot instead of booting (see [`RestoreSpec`]).
    #[serde(default)]
    pub restore: Option<RestoreSpec>,
    /// Host ports forwarded to the guest for this run (bound before the
    /// VMM starts: a port in use fails the start).
    #[serde(default)]
    pub ports: Vec<smolvm_proto::supervisor::PortForward>,
}

/// Where a restored VM's machine comes from. The rest of the launch spec
/// (memory, vCPUs, devices, kernel) must be the snapshot's own: the device
/// state only loads into the same machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreSpec {
    /// The device state (a migration stream).
    pub state: PathBuf,
    /// Guest RAM. `None`: the RAM is inside `state` (a snapshot of a VM
    /// whose RAM was a private mapping) and is loaded into a fresh RAM file.
    pub memory: Option<PathBuf>,
    /// Map `memory` privately: copy-on-write and lazy, the file is never
    /// written (forks share its clean pages through the page cache). When
    /// false, `memory` is the VM's own copy and is moved into the VM
    /// directory as its RAM file.
    pub private: bool,
}

impl LaunchSpec {
    /// The VM's directory.
    pub fn dir(&self) -> super::VmDir {
        super::VmDir::at(&self.vm_dir)
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

/// The VMM implementations smolvm has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// QEMU `microvm` (the default on Linux).
    #[default]
    Qemu,
}

impl BackendKind {
    /// A backend by name: `auto` (the best one this host has) and `qemu`.
    /// VMMs smolvm knows of but that cannot run here are a `HostUnsupported`
    /// error saying so; other names are invalid input.
    pub fn parse(name: &str) -> crate::Result<BackendKind> {
        match name {
            "auto" | "qemu" => Ok(BackendKind::Qemu),
            "firecracker" | "cloud-hypervisor" | "libkrun" => {
                Err(crate::Error::HostUnsupported(format!(
                    "the {name} backend is not available in this smolvm build on this host; \
                     use backend \"qemu\" (or \"auto\")"
                )))
            }
            other => Err(crate::Error::Config(
                crate::config::ConfigError::BadBackend(other.to_string()),
            )),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Qemu => "qemu",
        })
    }
}
