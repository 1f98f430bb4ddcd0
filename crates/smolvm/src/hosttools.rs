//! The host programs smolvm runs, the Debian package each comes from, and
//! how to find them.
//!
//! Every call site that spawns a host tool resolves it through [`require`]
//! first, so a missing tool is reported as one actionable line ("install it
//! with `sudo apt-get install …`") before any work starts.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// One host program smolvm depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostTool {
    /// Executable name, looked up on `PATH`.
    pub name: &'static str,
    /// Debian package that ships it.
    pub package: &'static str,
    /// What smolvm uses it for (shown by `smolvm doctor`).
    pub purpose: &'static str,
}

/// Every host tool smolvm may run.
pub const TOOLS: &[HostTool] = &[
    HostTool {
        name: "qemu-system-x86_64",
        package: "qemu-system-x86",
        purpose: "runs the microVMs",
    },
    HostTool {
        name: "qemu-img",
        package: "qemu-utils",
        purpose: "creates per-VM copy-on-write disk overlays",
    },
    HostTool {
        name: "passt",
        package: "passt",
        purpose: "the guest's network (user-mode, no access to the host's loopback)",
    },
    HostTool {
        name: "pasta",
        package: "passt",
        purpose: "links the guest network's private namespace to the host",
    },
    HostTool {
        name: "ip",
        package: "iproute2",
        purpose: "closes the guest's own subnet inside its network namespace",
    },
    HostTool {
        name: "nft",
        package: "nftables",
        purpose: "enforces egress policies (off, allowlists) in the guest network's namespace",
    },
    HostTool {
        name: "mmdebstrap",
        package: "mmdebstrap",
        purpose: "builds the Debian root filesystem and fetches the kernel",
    },
    HostTool {
        name: "busybox",
        package: "busybox-static",
        purpose: "the initramfs userland (must be the static build)",
    },
    HostTool {
        name: "lz4",
        package: "lz4",
        purpose: "decompresses the kernel payload",
    },
    HostTool {
        name: "mkfs.ext4",
        package: "e2fsprogs",
        purpose: "turns the root filesystem tree into an ext4 image",
    },
    HostTool {
        name: "unshare",
        package: "util-linux",
        purpose: "private mount namespace while making the ext4 image",
    },
    HostTool {
        name: "newuidmap",
        package: "uidmap",
        purpose: "image builds as a non-root user (mmdebstrap unshare mode)",
    },
    HostTool {
        name: "ssh",
        package: "openssh-client",
        purpose: "`smolvm ssh` into a sandbox",
    },
    HostTool {
        name: "ssh-keygen",
        package: "openssh-client",
        purpose: "makes smolvm's SSH client key",
    },
];

/// Tools needed only in unusual cases (kernels whose payload is not lz4);
/// known here so a missing one is reported with its package, but not part
/// of the checklist in [`TOOLS`].
pub const OPTIONAL_TOOLS: &[HostTool] = &[
    HostTool {
        name: "gzip",
        package: "gzip",
        purpose: "decompresses gzip kernel payloads",
    },
    HostTool {
        name: "xz",
        package: "xz-utils",
        purpose: "decompresses xz kernel payloads",
    },
    HostTool {
        name: "zstd",
        package: "zstd",
        purpose: "decompresses zstd kernel payloads",
    },
];

/// Directories searched after `PATH`: sbin is often missing from a
/// non-root user's `PATH`, yet `mkfs.ext4` lives there.
const EXTRA_DIRS: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// A required host tool is not installed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{name}` not found; install it with `sudo apt-get install {package}`")]
pub struct MissingTool {
    pub name: String,
    pub package: String,
}

/// The table entry for `tool`, if smolvm knows it.
pub fn info(tool: &str) -> Option<&'static HostTool> {
    TOOLS.iter().chain(OPTIONAL_TOOLS).find(|t| t.name == tool)
}

/// The Debian package that ships `tool` (the tool's own name when unknown).
pub fn package_of(tool: &str) -> &str {
    info(tool).map_or(tool, |t| t.package)
}

fn is_executable_file(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds `tool` on `PATH`, then in the sbin directories. A `tool` containing
/// a `/` is taken as a path and only checked.
pub fn find(tool: &str) -> Option<PathBuf> {
    if tool.contains('/') {
        let p = PathBuf::from(tool);
        return is_executable_file(&p).then_some(p);
    }
    let path_dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .filter(|d| d.is_absolute())
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| is_executable_file(p))
}

/// Like [`find`], but a missing tool is an error naming the package to
/// install.
pub fn require(tool: &str) -> Result<PathBuf, MissingTool> {
    find(tool).ok_or_else(|| MissingTool {
        name: tool.to_string(),
        package: package_of(tool).to_string(),
    })
}

/// A command for `tool`, resolved to its full path: the one way smolvm
/// spawns host programs, so a missing one is "install package X", never a
/// bare "No such file or directory".
pub fn command(tool: &str) -> Result<std::process::Command, MissingTool> {
    Ok(std::process::Command::new(require(tool)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_tool_everyone_has() {
        let sh = find("sh").expect("sh on every Debian host");
        assert!(sh.is_absolute());
        assert!(find("/bin/sh").is_some());
    }

    #[test]
    fn missing_tool_names_the_package() {
        let err = require("smolvm-definitely-not-a-tool").unwrap_err();
        assert_eq!(
            err.to_string(),
            "`smolvm-definitely-not-a-tool` not found; install it with \
             `sudo apt-get install smolvm-definitely-not-a-tool`"
        );
        assert_eq!(package_of("mkfs.ext4"), "e2fsprogs");
        assert_eq!(package_of("qemu-img"), "qemu-utils");
        assert_eq!(package_of("busybox"), "busybox-static");
        assert_eq!(package_of("xz"), "xz-utils");
    }

    #[test]
    fn table_has_unique_names() {
        let mut names: Vec<_> = TOOLS.iter().chain(OPTIONAL_TOOLS).map(|t| t.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), TOOLS.len() + OPTIONAL_TOOLS.len());
    }
}
