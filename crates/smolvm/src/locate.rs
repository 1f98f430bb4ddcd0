//! Finding smolvm's companion binaries: the static guest agent and the
//! per-VM supervisor.
//!
//! Search order for each: an environment override, then the directory an
//! embedding program named (the Python SDK names the one its wheel ships),
//! then next to the running executable, then the cargo target layout around
//! it (so `cargo run`, `cargo test` and installed copies all work), then
//! `PATH`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

static COMPANION_DIR: OnceLock<PathBuf> = OnceLock::new();

/// Names the directory that holds this program's own companion binaries
/// (`smolvm-supervisor`, `smolvm-agent`), searched before anything but the
/// environment overrides. For programs that embed the library without being
/// installed beside those binaries (the Python SDK's extension module: its
/// executable is the Python interpreter). Only the first call counts. Once
/// named, it is the only place looked in (environment overrides aside), and
/// its binaries are still only run when trustworthy (see [`trustworthy`]).
pub fn set_companion_dir(dir: impl Into<PathBuf>) {
    let _ = COMPANION_DIR.set(dir.into());
}

/// The named companion directory's copy of `name`, when one was named:
/// then it is the only place looked in (falling back to another build
/// elsewhere would run a binary of another version), and a copy that is not
/// trustworthy is an error saying why.
fn companion(name: &str) -> Option<Result<PathBuf, String>> {
    let dir = COMPANION_DIR.get()?;
    let p = dir.join(name);
    Some(if trustworthy(&p) {
        Ok(p)
    } else {
        Err(format!(
            "{} (it must exist, be owned by you or root and be writable by nobody else, in a \
             directory of the same kind; `chmod go-w` it, or reinstall the package with umask 022)",
            p.display()
        ))
    })
}

/// Target triple the guest agent is built for.
pub const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";

#[derive(Debug, thiserror::Error)]
pub enum LocateError {
    #[error(
        "guest agent binary not found (looked in: {searched}); build it with \
         `RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --profile release-agent \
         --target {AGENT_TARGET} -p smolvm-agent` or set SMOLVM_AGENT_BIN"
    )]
    AgentNotFound { searched: String },
    #[error("{path} is not a statically linked binary; the guest agent must be static (set SMOLVM_AGENT_BIN to a static build)")]
    AgentNotStatic { path: PathBuf },
    #[error("supervisor binary `smolvm-supervisor` not found (looked in: {searched}); build it with `cargo build -p smolvm` or set SMOLVM_SUPERVISOR_BIN")]
    SupervisorNotFound { searched: String },
}

/// Where companion binaries may be: the running executable's own
/// directory, and — only inside a cargo target directory — the profile
/// directory above `deps/` (tests run from `target/<profile>/deps`) and the
/// target directory (where `<triple>/<profile>/` holds the agent). Never
/// arbitrary parents: from `/tmp/x/smolvm` that would run a planted
/// `/tmp/smolvm-supervisor`.
fn exe_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    else {
        return dirs;
    };
    dirs.push(exe_dir.clone());
    let mut profile = Some(exe_dir.as_path());
    if exe_dir.file_name().is_some_and(|n| n == "deps") {
        profile = exe_dir.parent();
        if let Some(p) = profile {
            dirs.push(p.to_path_buf());
        }
    }
    if let Some(target) = profile.and_then(Path::parent) {
        // A cargo target dir is ours: a `CACHEDIR.TAG` in a directory
        // anyone can write (`/tmp`) proves nothing.
        if target.join("CACHEDIR.TAG").is_file() && owned_and_closed(target) {
            dirs.push(target.to_path_buf());
        }
    }
    dirs.retain(|d| owned_and_closed(d));
    dirs
}

/// Owned by us or root and writable by nobody else (no symlink followed).
fn owned_and_closed(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::symlink_metadata(p) else {
        return false;
    };
    let owner_ok = m.uid() == crate::sys::euid() || m.uid() == 0;
    !m.file_type().is_symlink() && owner_ok && m.mode() & 0o022 == 0
}

/// A companion binary is only run when it is ours: a regular file (not a
/// symlink another user could re-point) owned by us or root, writable by
/// nobody else, in a directory nobody else can write (where no one can swap
/// it between the check and the exec).
pub(crate) fn trustworthy(p: &Path) -> bool {
    let file_ok = std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file()) && owned_and_closed(p);
    file_ok && p.parent().is_some_and(owned_and_closed)
}

fn path_dirs() -> Vec<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default()
}

/// True when `path` is an ELF file without a `PT_INTERP` program header,
/// i.e. statically linked.
pub fn is_static_elf(path: &Path) -> bool {
    let Ok(data) = std::fs::read(path) else {
        return false;
    };
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]) as usize;
    let Some(phoff) = data.get(32..40).map(|b| {
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        usize::try_from(u64::from_le_bytes(a)).unwrap_or(usize::MAX)
    }) else {
        return false;
    };
    let phentsize = u16_at(54);
    let phnum = u16_at(56);
    for i in 0..phnum {
        let o = phoff.saturating_add(i.saturating_mul(phentsize));
        let Some(p_type) = data.get(o..o + 4) else {
            return false;
        };
        if u32::from_le_bytes([p_type[0], p_type[1], p_type[2], p_type[3]]) == 3 {
            return false; // PT_INTERP
        }
    }
    true
}

/// The static guest agent binary.
pub fn agent_binary() -> Result<PathBuf, LocateError> {
    if let Some(p) = std::env::var_os("SMOLVM_AGENT_BIN").filter(|v| !v.is_empty()) {
        let p = PathBuf::from(p);
        if !is_static_elf(&p) {
            return Err(LocateError::AgentNotStatic { path: p });
        }
        return Ok(p);
    }
    match companion("smolvm-agent") {
        Some(Ok(p)) if is_static_elf(&p) => return Ok(p),
        Some(Ok(p)) => return Err(LocateError::AgentNotStatic { path: p }),
        Some(Err(searched)) => return Err(LocateError::AgentNotFound { searched }),
        None => {}
    }
    let mut candidates = Vec::new();
    for dir in exe_dirs() {
        candidates.push(dir.join("smolvm-agent"));
        for profile in ["release-agent", "release"] {
            candidates.push(dir.join(AGENT_TARGET).join(profile).join("smolvm-agent"));
        }
    }
    for dir in path_dirs() {
        candidates.push(dir.join("smolvm-agent"));
    }
    for c in &candidates {
        if trustworthy(c) && is_static_elf(c) {
            return Ok(c.clone());
        }
    }
    Err(LocateError::AgentNotFound {
        searched: join(&candidates),
    })
}

/// The `smolvm-supervisor` binary.
pub fn supervisor_binary() -> Result<PathBuf, LocateError> {
    if let Some(p) = std::env::var_os("SMOLVM_SUPERVISOR_BIN").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    match companion("smolvm-supervisor") {
        Some(Ok(p)) => return Ok(p),
        Some(Err(searched)) => return Err(LocateError::SupervisorNotFound { searched }),
        None => {}
    }
    let mut candidates: Vec<PathBuf> = exe_dirs()
        .into_iter()
        .map(|d| d.join("smolvm-supervisor"))
        .collect();
    candidates.extend(path_dirs().into_iter().map(|d| d.join("smolvm-supervisor")));
    candidates
        .iter()
        .find(|c| trustworthy(c))
        .cloned()
        .ok_or_else(|| LocateError::SupervisorNotFound {
            searched: join(&candidates),
        })
}

fn join(paths: &[PathBuf]) -> String {
    let mut v: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    v.dedup();
    if v.len() > 8 {
        let n = v.len() - 8;
        v.truncate(8);
        v.push(format!("... {n} more"));
    }
    v.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_dynamic_binaries() {
        // /bin/sh on any Debian host is dynamically linked.
        assert!(!is_static_elf(Path::new("/bin/sh")));
        assert!(!is_static_elf(Path::new("/etc/passwd")));
        assert!(!is_static_elf(Path::new("/nonexistent")));
    }
}
