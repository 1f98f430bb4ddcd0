//! The root filesystem: Debian built by mmdebstrap and turned into ext4 by
//! `mkfs.ext4 -d` — no root mounts, loop devices or containers.
//!
//! The ext4 is made from inside an mmdebstrap customize hook
//! (`rootfs-hook.sh`): there the tree has the guest's ownership both as root
//! and in mmdebstrap's unprivileged `unshare` mode.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use super::manifest::installed_packages;
use super::recipe::{Recipe, ROOTFS_HOOK_SH};
use super::run::{self, mmdebstrap_mode};
use super::ImageError;
use crate::hosttools;

/// Prefix of the hook's progress lines (turned into step events).
pub(crate) const STEP_PREFIX: &str = "smolvm-step: ";

/// What a rootfs build reports back.
#[derive(Debug)]
pub(crate) struct BuiltRootfs {
    /// Installed packages as `name version`.
    pub installed: Vec<String>,
}

/// Builds `dest` (an ext4 image) for `recipe`, using `work` for scratch
/// files. `on_line` gets every line mmdebstrap and the hook print.
pub(crate) fn build(
    recipe: &Recipe,
    dest: &Path,
    work: &Path,
    on_line: &mut dyn FnMut(&str),
) -> Result<BuiltRootfs, ImageError> {
    let mmdebstrap = hosttools::require("mmdebstrap")?;
    let mkfs = hosttools::require("mkfs.ext4")?;
    let unshare = hosttools::require("unshare")?;

    let hook = work.join("rootfs-hook.sh");
    std::fs::write(&hook, ROOTFS_HOOK_SH).map_err(ImageError::io(format!("cannot write {}", hook.display())))?;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))
        .map_err(ImageError::io(format!("cannot chmod {}", hook.display())))?;
    let view = work.join("rootfs-view");
    std::fs::create_dir_all(&view).map_err(ImageError::io(format!("cannot create {}", view.display())))?;
    let status = work.join("dpkg-status");

    let mode = mmdebstrap_mode();
    let mut cmd = Command::new(mmdebstrap);
    cmd.arg(format!("--mode={mode}"))
        .arg("--variant=minbase")
        .arg("--verbose")
        .arg(format!("--include={}", recipe.packages.join(",")));
    for p in recipe.dpkg_excludes {
        cmd.arg(format!("--dpkgopt=path-exclude={p}"));
    }
    for p in recipe.dpkg_includes {
        cmd.arg(format!("--dpkgopt=path-include={p}"));
    }
    cmd.arg(format!("--customize-hook={}", hook.display()))
        .arg(recipe.suite)
        .arg("/dev/null")
        .current_dir(work)
        .env("SMOLVM_EXT4", dest)
        .env("SMOLVM_DPKG_STATUS", &status)
        .env("SMOLVM_VIEW", &view)
        .env("SMOLVM_MKFS", &mkfs)
        .env("SMOLVM_UNSHARE", &unshare)
        .env("SMOLVM_LABEL", recipe.fs_label);
    let result = run::run_streaming(&mut cmd, "mmdebstrap", on_line);
    if let Err(e) = result {
        return Err(if mode == "root" {
            e
        } else {
            ImageError::Unprivileged { source: Box::new(e) }
        });
    }
    if !dest.is_file() {
        return Err(ImageError::Command {
            tool: "mmdebstrap".into(),
            status: format!("succeeded but the hook made no {}", dest.display()),
            tail: String::new(),
        });
    }
    let status = std::fs::read_to_string(&status).map_err(ImageError::io(format!("cannot read {}", status.display())))?;
    Ok(BuiltRootfs {
        installed: installed_packages(&status),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_is_valid_sh_and_reports_its_step() {
        assert!(ROOTFS_HOOK_SH.contains(&format!("echo \"{STEP_PREFIX}$*\"")));
        let st = Command::new("sh").args(["-n", "-c", ROOTFS_HOOK_SH]).status().unwrap();
        assert!(st.success(), "rootfs-hook.sh has a syntax error");
    }
}
