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
    std::fs::write(&hook, ROOTFS_HOOK_SH)
        .map_err(ImageError::io(format!("cannot write {}", hook.display())))?;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))
        .map_err(ImageError::io(format!("cannot chmod {}", hook.display())))?;
    // Everything the hook writes goes to `out`. In unshare mode the hook
    // runs as a subordinate uid, so `out` is handed to that uid for the run
    // and taken back afterwards.
    let out = work.join("rootfs-out");
    std::fs::create_dir_all(&out)
        .map_err(ImageError::io(format!("cannot create {}", out.display())))?;
    let mode = mmdebstrap_mode();
    let owner = match mode {
        "root" => None,
        _ => {
            hosttools::require("newuidmap")?;
            Some(SubIds::of_current_user()?)
        }
    };
    if let Some(ids) = &owner {
        ids.chown_to_subordinate_root(&unshare, &out)?;
    }

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
    let ext4 = out.join("rootfs.ext4");
    let status = out.join("dpkg-status");
    cmd.arg(format!("--customize-hook={}", hook.display()))
        .arg(recipe.suite)
        .arg("/dev/null")
        .current_dir(work)
        .env("SMOLVM_EXT4", &ext4)
        .env("SMOLVM_DPKG_STATUS", &status)
        .env("SMOLVM_VIEW", out.join("view"))
        .env("SMOLVM_MKFS", &mkfs)
        .env("SMOLVM_UNSHARE", &unshare)
        .env("SMOLVM_LABEL", recipe.fs_label);
    let result = run::run_streaming(
        &mut cmd,
        "mmdebstrap",
        &work.join("rootfs-mmdebstrap.log"),
        on_line,
    );
    if let Some(ids) = &owner {
        ids.take_back(&unshare, &out)?;
    }
    if let Err(e) = result {
        return Err(match owner {
            None => e,
            Some(_) => ImageError::Unprivileged {
                source: Box::new(e),
            },
        });
    }
    if !ext4.is_file() {
        return Err(ImageError::Command {
            tool: "mmdebstrap".into(),
            status: format!("succeeded but the hook made no {}", ext4.display()),
            tail: String::new(),
        });
    }
    std::fs::rename(&ext4, dest)
        .map_err(ImageError::io(format!("cannot move {}", ext4.display())))?;
    let status = std::fs::read_to_string(&status)
        .map_err(ImageError::io(format!("cannot read {}", status.display())))?;
    Ok(BuiltRootfs {
        installed: installed_packages(&status),
    })
}

/// The current user's first subordinate uid and gid, for handing files to
/// the root of mmdebstrap's user namespace and taking them back.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SubIds {
    subuid: u64,
    subgid: u64,
}

/// The start of `user`'s first range in an /etc/subuid-style file
/// (`name-or-id:start:count`).
fn first_subid(contents: &str, user: &str, id: u32) -> Option<u64> {
    contents.lines().find_map(|line| {
        let mut f = line.trim().split(':');
        let (who, start, count) = (f.next()?, f.next()?, f.next()?);
        let matches = who == user || who.parse::<u32>().ok() == Some(id);
        let count: u64 = count.trim().parse().ok()?;
        (matches && count > 0)
            .then(|| start.trim().parse().ok())
            .flatten()
    })
}

/// The login name of `uid`, from the passwd database.
fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: all-zero is a valid `passwd` (null pointers, zero ids).
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer refers to live storage of the stated size;
    // getpwuid_r writes strings into `buf` and points `pwd` fields at them.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() || pwd.pw_name.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points at a NUL-terminated string in `buf`,
    // which is still alive here.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

impl SubIds {
    fn of_current_user() -> Result<SubIds, ImageError> {
        // SAFETY: geteuid/getegid have no preconditions and cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let user = user_name(uid).unwrap_or_else(|| uid.to_string());
        let lookup = |file: &str, id: u32| {
            std::fs::read_to_string(file)
                .ok()
                .and_then(|c| first_subid(&c, &user, id))
                .ok_or_else(|| ImageError::NoSubIds {
                    user: user.clone(),
                    file: file.into(),
                })
        };
        Ok(SubIds {
            subuid: lookup("/etc/subuid", uid)?,
            subgid: lookup("/etc/subgid", gid)?,
        })
    }

    /// Runs `chown args… dir` in a user namespace where 0 is this user and
    /// 1 is the namespace root of mmdebstrap's unshare mode.
    fn chown(&self, unshare: &Path, args: &[&str], dir: &Path) -> Result<(), ImageError> {
        let mut cmd = Command::new(unshare);
        cmd.arg("--map-user=0")
            .arg("--map-group=0")
            .arg(format!("--map-users={},1,1", self.subuid))
            .arg(format!("--map-groups={},1,1", self.subgid))
            .arg("--")
            .arg("chown")
            .args(args)
            .arg(dir);
        let log = dir.with_extension("chown.log");
        run::run_streaming(&mut cmd, "unshare", &log, &mut |l| {
            tracing::debug!("unshare: {l}")
        })
    }

    fn chown_to_subordinate_root(&self, unshare: &Path, dir: &Path) -> Result<(), ImageError> {
        self.chown(unshare, &["1:1"], dir)
    }

    fn take_back(&self, unshare: &Path, dir: &Path) -> Result<(), ImageError> {
        self.chown(unshare, &["-R", "0:0"], dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_is_valid_sh_and_reports_its_step() {
        assert!(ROOTFS_HOOK_SH.contains(&format!("echo \"{STEP_PREFIX}$*\"")));
        let st = Command::new("sh")
            .args(["-n", "-c", ROOTFS_HOOK_SH])
            .status()
            .unwrap();
        assert!(st.success(), "rootfs-hook.sh has a syntax error");
    }

    #[test]
    fn parses_subordinate_ids() {
        let file = "alice:100000:65536\n1001:200000:65536\nbob:300000:0\nbob:400000:10\n";
        assert_eq!(first_subid(file, "alice", 1000), Some(100_000));
        assert_eq!(first_subid(file, "carol", 1001), Some(200_000));
        assert_eq!(first_subid(file, "bob", 5), Some(400_000));
        assert_eq!(first_subid(file, "dave", 7), None);
        assert_eq!(user_name(0).as_deref(), Some("root"));
    }
}
