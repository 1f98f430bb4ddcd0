//! The VM directory: the one place that names its files. Code gets a
//! file's path from [`VmDir`]'s methods, never by joining names itself.

use std::path::{Path, PathBuf};

/// One VM's directory (`<data_dir>/vms/<id>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmDir(PathBuf);

macro_rules! vm_files {
    ($($(#[$doc:meta])* $method:ident => $name:ident),* $(,)?) => {
        impl VmDir {
            $(
                $(#[$doc])*
                pub fn $method(&self) -> PathBuf {
                    self.0.join(files::$name)
                }
            )*
        }
    };
}

vm_files! {
    /// `launch.json`: what the supervisor boots.
    launch_spec => LAUNCH_SPEC,
    /// The guest console (capped, rotated once).
    console_log => CONSOLE_LOG,
    console_log_old => CONSOLE_LOG_OLD,
    vmm_log => VMM_LOG,
    supervisor_log => SUPERVISOR_LOG,
    net_log => NET_LOG,
    net_socket => NET_SOCKET,
    pasta_pid => NET_PASTA_PID,
    /// The network gate's `ip -batch` rules.
    net_rules => NET_RULES,
    qmp_socket => QMP_SOCKET,
    supervisor_socket => SUPERVISOR_SOCKET,
    /// Guest RAM (a memory-backend file).
    memory => MEMORY_FILE,
    /// The writable root disk.
    disk => DISK,
    /// The pinned image root filesystem backing the disk.
    base_disk => BASE_DISK,
}

impl VmDir {
    /// The directory of VM `id` under the data dir.
    pub fn of(id: &str) -> VmDir {
        VmDir(crate::paths::vm_dir(id))
    }

    /// A VM directory at `path`.
    pub fn at(path: impl Into<PathBuf>) -> VmDir {
        VmDir(path.into())
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Removes what only exists while the VM runs (best effort).
    pub fn remove_runtime(&self) {
        files::remove_runtime(&self.0);
    }
}

impl std::ops::Deref for VmDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for VmDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
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
    pub const NET_RULES: &str = "net.rules";
    pub const DISK: &str = "disk.qcow2";
    /// Hard link to the image's root filesystem that backs `DISK`.
    pub const BASE_DISK: &str = "base.ext4";

    /// What the VMM and its network create while the VM runs: sockets and
    /// the guest RAM file (as large as the guest's memory). Together with
    /// the supervisor's socket, all that exists only while the VM runs; the
    /// disk and logs stay.
    pub const VMM_RUNTIME: &[&str] = &[
        QMP_SOCKET,
        AGENT_SOCKET,
        CONSOLE_SOCKET,
        NET_SOCKET,
        NET_PASTA_PID,
        NET_RULES,
        MEMORY_FILE,
    ];

    /// Removes the runtime files of the VM in `vm_dir` (best effort).
    pub fn remove_runtime(vm_dir: &std::path::Path) {
        for f in VMM_RUNTIME.iter().chain([&SUPERVISOR_SOCKET]) {
            let _ = std::fs::remove_file(vm_dir.join(f));
        }
    }
}
