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
    /// The run's port forwards (the supervisor writes them as they change;
    /// a snapshot records them).
    ports => PORTS,
    qmp_socket => QMP_SOCKET,
    supervisor_socket => SUPERVISOR_SOCKET,
    /// Guest RAM (a memory-backend file).
    memory => MEMORY_FILE,
    /// The writable root disk.
    disk => DISK,
    /// The pinned image root filesystem backing the disk.
    base_disk => BASE_DISK,
    /// Names the disk layer on top while a VMM that was snapshotted runs
    /// (see [`VmDir::settle_disk`]).
    disk_top => DISK_TOP,
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

    /// The root disk's top layer as the running VMM knows it: the layer a
    /// snapshot switched it to, else the disk.
    pub fn current_disk(&self) -> PathBuf {
        match std::fs::read_to_string(self.disk_top()) {
            Ok(name) if is_layer_name(name.trim()) && self.0.join(name.trim()).exists() => {
                self.0.join(name.trim())
            }
            _ => self.disk(),
        }
    }

    /// With no VMM running: puts the top layer a snapshot left under the
    /// disk's name, and removes layers that never became the top (a
    /// snapshot that failed or was interrupted).
    pub fn settle_disk(&self) -> std::io::Result<()> {
        let top = self.current_disk();
        if top != self.disk() {
            match std::fs::rename(&top, self.disk()) {
                Ok(()) => {}
                // Renamed already (a crash before the marker went).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let _ = std::fs::remove_file(self.disk_top());
        for e in std::fs::read_dir(&self.0)?.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if is_layer_name(&n) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        if let Ok(d) = std::fs::File::open(&self.0) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// A name for a new disk layer.
    pub fn new_layer(&self) -> PathBuf {
        let mut rnd = [0u8; 6];
        let _ = getrandom::fill(&mut rnd);
        let hex: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
        self.0.join(format!("{}{hex}.qcow2", files::LAYER_PREFIX))
    }
}

/// `disk.layer-<hex>.qcow2`.
fn is_layer_name(n: &str) -> bool {
    n.strip_prefix(files::LAYER_PREFIX)
        .and_then(|r| r.strip_suffix(".qcow2"))
        .is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
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
    pub const PORTS: &str = "ports.json";
    pub const DISK: &str = "disk.qcow2";
    /// Hard link to the image's root filesystem that backs `DISK`.
    pub const BASE_DISK: &str = "base.ext4";
    pub const DISK_TOP: &str = "disk.top";
    /// Disk layers a snapshot adds while the VMM runs.
    pub const LAYER_PREFIX: &str = "disk.layer-";

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
        PORTS,
    ];

    /// Removes the runtime files of the VM in `vm_dir` (best effort).
    pub fn remove_runtime(vm_dir: &std::path::Path) {
        for f in VMM_RUNTIME.iter().chain([&SUPERVISOR_SOCKET]) {
            let _ = std::fs::remove_file(vm_dir.join(f));
        }
    }
}
