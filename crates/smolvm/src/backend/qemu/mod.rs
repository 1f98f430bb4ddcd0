//! QEMU `microvm` backend.

mod args;
mod net;
mod probe;
mod qmp;
mod vm;

pub use args::{
    check_paths, host_tsc_khz, launch_args, opt_value, probe_args, QEMU_BINARY, SANDBOX,
};
pub use net::{GuestNet, NetError};
pub use probe::{forget_cached_verdict, resolve_accel, AccelVerdict};
pub use qmp::{Qmp, QmpError};
pub use vm::{create_overlay, tail_console, tail_file, QemuError, QemuVm};

/// Confines a child process smolvm starts for a VM (QEMU, passt, qemu-img):
/// `no_new_privs` (no setuid binary or file capability can raise its
/// privileges) and a private umask (what it creates is the owner's alone).
pub(crate) fn confine_child(cmd: &mut std::process::Command) {
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
