//! Where smolvm keeps things on the host.
//!
//! - data dir (state DB, per-VM dirs): `SMOLVM_DATA_DIR`, else
//!   `$XDG_STATE_HOME/smolvm`, else `~/.local/state/smolvm`.
//! - cache dir (images, accelerator verdict): `SMOLVM_CACHE_DIR`, else
//!   `$XDG_CACHE_HOME/smolvm`, else `~/.cache/smolvm`.
//!
//! Both are made absolute (against the current directory) when given
//! relative: the supervisor runs in the VM's directory, so a relative root
//! would mean another place there.

use std::path::PathBuf;

fn env_dir(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(|v| absolute(PathBuf::from(v)))
}

fn absolute(p: PathBuf) -> PathBuf {
    if p.is_absolute() {
        p
    } else {
        std::path::absolute(&p).unwrap_or(p)
    }
}

fn home() -> PathBuf {
    env_dir("HOME").unwrap_or_else(|| PathBuf::from("/root"))
}

/// Root of smolvm's persistent state.
pub fn data_dir() -> PathBuf {
    if let Some(d) = env_dir("SMOLVM_DATA_DIR") {
        return d;
    }
    if let Some(d) = env_dir("XDG_STATE_HOME") {
        return d.join("smolvm");
    }
    home().join(".local/state/smolvm")
}

/// Root of smolvm's rebuildable cache.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = env_dir("SMOLVM_CACHE_DIR") {
        return d;
    }
    if let Some(d) = env_dir("XDG_CACHE_HOME") {
        return d.join("smolvm");
    }
    home().join(".cache/smolvm")
}

/// Directory holding all built images.
pub fn images_dir() -> PathBuf {
    cache_dir().join("images")
}

/// Directory of one VM's files (overlay, memory, logs, sockets).
pub fn vm_dir(id: &str) -> PathBuf {
    data_dir().join("vms").join(id)
}

/// Path of the SQLite state store.
pub fn db_path() -> PathBuf {
    data_dir().join("smolvm.db")
}

/// Per-VM lock files live outside the VM dir so `delete` can remove the dir
/// while holding the lock.
pub fn lock_path(id: &str) -> PathBuf {
    locks_dir().join(format!("{id}.lock"))
}

/// Per-VM lock files' directory.
pub fn locks_dir() -> PathBuf {
    data_dir().join("locks")
}

/// Snapshots, one directory each (`<data_dir>/snapshots/<uid>`).
pub fn snapshots_dir() -> PathBuf {
    data_dir().join("snapshots")
}

/// smolvm's SSH client key pair (`id_ed25519`, `id_ed25519.pub`).
pub fn ssh_dir() -> PathBuf {
    data_dir().join("ssh")
}

#[cfg(test)]
mod tests {
    #[test]
    fn relative_roots_become_absolute() {
        let p = super::absolute(std::path::PathBuf::from("rel/dir"));
        assert!(p.is_absolute());
        assert!(p.ends_with("rel/dir"));
    }
}
