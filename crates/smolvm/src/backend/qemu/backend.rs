//! [`QemuBackend`]: the QEMU `microvm` implementation of the backend
//! boundary, and the confinement of the processes it starts.

use super::super::{AccelVerdict, Backend, BackendKind, BoxFuture, LaunchSpec, Vmm, VmmError};
use super::{QemuError, QemuVm, QEMU_BINARY, SANDBOX};
use crate::config::Accel;
use std::path::Path;

/// QEMU `microvm` with a qcow2 overlay per VM, KVM when a probe boot
/// proves it works, else TCG.
pub struct QemuBackend;

impl Backend for QemuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    fn create_disk<'a>(
        &'a self,
        base: &'a Path,
        disk: &'a Path,
        size: Option<u64>,
    ) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move {
            super::create_overlay(base, disk, size)
                .await
                .map_err(|e| e.into_vmm_error("cannot create the disk"))
        })
    }

    fn create_layer<'a>(
        &'a self,
        backing: &'a str,
        disk: &'a Path,
        size: u64,
    ) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(async move {
            super::create_layer(backing, disk, size)
                .await
                .map_err(|e| e.into_vmm_error("cannot create the disk layer"))
        })
    }

    fn resolve_accel(&self, requested: Accel, kernel: &Path, initramfs: &Path) -> AccelVerdict {
        super::resolve_accel(requested, kernel, initramfs)
    }

    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> BoxFuture<'a, Result<Box<dyn Vmm>, VmmError>> {
        Box::pin(async move {
            QemuVm::launch(spec)
                .await
                .map(|vm| Box::new(vm) as Box<dyn Vmm>)
                .map_err(|e| e.into_vmm_error("the VMM failed to start"))
        })
    }

    fn vmm_binary(&self) -> Option<std::path::PathBuf> {
        crate::hosttools::find(QEMU_BINARY)
    }

    fn host_checks(&self) -> Vec<(&'static str, Result<String, String>)> {
        if crate::hosttools::find(QEMU_BINARY).is_none() {
            return Vec::new(); // reported as a missing tool
        }
        vec![(
            "QEMU seccomp",
            seccomp_check()
                .map(|()| "the VMM runs under `-sandbox on` (seccomp) with no_new_privs".into()),
        )]
    }
}

impl QemuError {
    /// This failure at the boundary: its kind and its whole chain.
    pub fn into_vmm_error(self, what: &str) -> VmmError {
        let missing_tool = match &self {
            QemuError::Missing(m) | QemuError::Net(super::NetError::Missing(m)) => Some(m.clone()),
            _ => None,
        };
        VmmError {
            kind: self.control_kind(),
            message: format!("{what}: {}", crate::error::chain(&self)),
            missing_tool,
        }
    }
}

/// Confines a child process smolvm starts for a VM (QEMU, passt, qemu-img):
/// `no_new_privs` (no setuid binary or file capability can raise its
/// privileges) and a private umask (what it creates is the owner's alone).
pub fn confine_child(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: umask and prctl are async-signal-safe and touch no memory of
    // the parent; they only change this child's own attributes.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(crate::private::CHILD_UMASK);
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Whether this QEMU can run under its seccomp sandbox (`-sandbox on`);
/// `Err` says why not. Runs an empty machine for an instant.
pub fn seccomp_check() -> Result<(), String> {
    let mut cmd = crate::hosttools::command(QEMU_BINARY).map_err(|e| e.to_string())?;
    cmd.args([
        "-M",
        "none",
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-sandbox",
        SANDBOX,
    ])
    .args(["-qmp", "stdio"])
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {QEMU_BINARY}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write as _;
        let _ = stdin.write_all(br#"{"execute":"qmp_capabilities"}{"execute":"quit"}"#);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{QEMU_BINARY} failed: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(format!(
            "{QEMU_BINARY} cannot run with `-sandbox on` ({}): {}",
            out.status,
            err.lines().next().unwrap_or("").trim()
        ))
    }
}
