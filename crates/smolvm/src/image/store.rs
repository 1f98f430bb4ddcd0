//! The image cache on disk: per-image locks, build directories that vanish
//! when a build fails or dies, and the atomic swap of a finished build into
//! place.
//!
//! Layout under `paths::images_dir()`:
//! - `<name>/` — a complete image (only ever appears whole).
//! - `.<name>.lock` — flock held while building or removing `<name>`.
//! - `.tmp-<pid>-<name>` — a build in progress (or left by a dead one).

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::ImageError;

/// An exclusive lock on one image name, released on drop.
#[derive(Debug)]
pub(crate) struct ImageLock {
    _file: File,
}

fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    loop {
        // SAFETY: the fd is owned by `file` and stays open for the call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

impl ImageLock {
    /// Takes `images/.<name>.lock`, waiting (and saying so through `waiting`)
    /// while another process holds it.
    pub(crate) fn acquire(
        images: &Path,
        name: &str,
        waiting: &mut dyn FnMut(),
    ) -> Result<Self, ImageError> {
        let path = images.join(format!(".{name}.lock"));
        use std::os::unix::fs::OpenOptionsExt as _;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(crate::private::FILE_MODE)
            .open(&path)
            .map_err(ImageError::io(format!("cannot open {}", path.display())))?;
        // One an older smolvm created wider.
        let _ = crate::private::tighten(&path, crate::private::FILE_MODE);
        match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                waiting();
                flock(&file, libc::LOCK_EX)
                    .map_err(ImageError::io(format!("cannot lock {}", path.display())))?;
            }
            Err(e) => return Err(ImageError::io(format!("cannot lock {}", path.display()))(e)),
        }
        Ok(ImageLock { _file: file })
    }
}

/// A scratch directory removed (with everything in it) on drop.
#[derive(Debug)]
pub(crate) struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `images/.tmp-<pid>-<name>` afresh.
    pub(crate) fn create(images: &Path, name: &str) -> Result<Self, ImageError> {
        let path = images.join(format!(".tmp-{}-{name}", std::process::id()));
        remove_tree(&path);
        std::fs::create_dir_all(&path)
            .map_err(ImageError::io(format!("cannot create {}", path.display())))?;
        Ok(ScratchDir { path })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        remove_tree(&self.path);
    }
}

/// Mount points at or below `dir` (from `/proc/self/mountinfo`).
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| {
            PathBuf::from(
                m.replace("\\040", " ")
                    .replace("\\011", "\t")
                    .replace("\\134", "\\"),
            )
        })
        .filter(|m| m.starts_with(dir))
        .collect()
}

/// Removes `dir` recursively — unless something is mounted inside it (a
/// killed mmdebstrap can leave /proc or /dev mounts behind), which is left
/// alone with a warning rather than followed.
pub(crate) fn remove_tree(dir: &Path) {
    if std::fs::symlink_metadata(dir).is_err() {
        return;
    }
    let mounts = mounts_under(dir);
    if !mounts.is_empty() {
        tracing::warn!(dir = %dir.display(), ?mounts, "not removing a directory with mounts inside");
        return;
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove");
    }
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence/permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes build directories left by dead processes, and every build
/// directory of `name` (the caller holds its lock, so none is live).
pub(crate) fn clean_stale(images: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(images) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(".tmp-")) else {
            continue;
        };
        let Some((pid, owner)) = rest.split_once('-') else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        if owner == name || !pid_alive(pid) {
            tracing::info!(dir = %entry.path().display(), "removing stale build directory");
            remove_tree(&entry.path());
        }
    }
    // Leftover temp files of interrupted initramfs refreshes.
    if let Ok(entries) = std::fs::read_dir(images.join(name)) {
        for entry in entries.filter_map(Result::ok) {
            if entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.contains(".tmp-"))
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

fn cstring(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

/// Atomically exchanges two existing paths (`renameat2(RENAME_EXCHANGE)`).
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    let (ca, cb) = (cstring(a)?, cstring(b)?);
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the
    // call; AT_FDCWD makes relative paths resolve against the cwd.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Moves the finished build `staged` to `dest`, replacing any previous
/// image there in one step; the previous image is deleted afterwards.
/// Readers see either the old image or the new one, never a mix.
pub(crate) fn install(staged: &Path, dest: &Path) -> Result<(), ImageError> {
    let err = || ImageError::io(format!("cannot move the new image into {}", dest.display()));
    crate::private::tighten_tree(staged).map_err(err())?;
    if std::fs::symlink_metadata(dest).is_err() {
        return std::fs::rename(staged, dest).map_err(err());
    }
    match exchange(staged, dest) {
        // `staged` now holds the old image; its owner removes it.
        Ok(()) => Ok(()),
        Err(_) => {
            // No RENAME_EXCHANGE on this filesystem: move the old image
            // aside first (a brief window with no image; readers then wait
            // on the lock and find the new one).
            let aside = staged.with_extension("old");
            std::fs::rename(dest, &aside).map_err(err())?;
            let r = std::fs::rename(staged, dest).map_err(err());
            if r.is_err() {
                let _ = std::fs::rename(&aside, dest);
            } else {
                let _ = std::fs::rename(&aside, staged);
            }
            r
        }
    }
}

/// Hard-links `src` to `dst`, copying when links are not possible.
pub(crate) fn link_or_copy(src: &Path, dst: &Path) -> Result<(), ImageError> {
    if std::fs::hard_link(src, dst).is_ok() {
        return Ok(());
    }
    std::fs::copy(src, dst)
        .map(|_| ())
        .map_err(ImageError::io(format!(
            "cannot copy {} to {}",
            src.display(),
            dst.display()
        )))
}

/// Disk space used by `dir` and everything below it (allocated blocks, so
/// sparse files count what they really use; hard links count once).
pub(crate) fn disk_usage(dir: &Path) -> u64 {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.filter_map(Result::ok) {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if meta.is_dir() {
                stack.push(entry.path());
            }
            if seen.insert((meta.dev(), meta.ino())) {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_replaces_atomically() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("img");
        let a = root.path().join(".tmp-1-img");
        std::fs::create_dir(&a).unwrap();
        std::fs::write(a.join("f"), "one").unwrap();
        install(&a, &dest).unwrap();
        assert_eq!(std::fs::read_to_string(dest.join("f")).unwrap(), "one");
        assert!(!a.exists());

        std::fs::create_dir(&a).unwrap();
        std::fs::write(a.join("f"), "two").unwrap();
        install(&a, &dest).unwrap();
        assert_eq!(std::fs::read_to_string(dest.join("f")).unwrap(), "two");
        // The old image is left at `a` for the caller to remove.
        assert_eq!(std::fs::read_to_string(a.join("f")).unwrap(), "one");
    }

    #[test]
    fn cleans_only_dead_or_own_build_dirs() {
        let root = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let own = root.path().join(format!(".tmp-{me}-debian-12"));
        let other_live = root.path().join(format!(".tmp-{me}-other"));
        // pid_max is at most 2^22, so this pid cannot exist.
        let dead = root.path().join(".tmp-99999999-other");
        let image = root.path().join("debian-12");
        for d in [&own, &other_live, &dead, &image] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(image.join("initramfs.cpio.tmp-1"), "x").unwrap();
        std::fs::write(image.join("vmlinux"), "x").unwrap();
        clean_stale(root.path(), "debian-12");
        assert!(!own.exists());
        assert!(other_live.exists());
        assert!(!dead.exists());
        assert!(image.join("vmlinux").exists());
        assert!(!image.join("initramfs.cpio.tmp-1").exists());
    }

    #[test]
    fn scratch_dir_is_removed_on_drop() {
        let root = tempfile::tempdir().unwrap();
        let path = {
            let s = ScratchDir::create(root.path(), "x").unwrap();
            std::fs::write(s.path().join("f"), "x").unwrap();
            s.path().to_path_buf()
        };
        assert!(!path.exists());
    }

    #[test]
    fn lock_excludes_other_holders() {
        let root = tempfile::tempdir().unwrap();
        let held =
            ImageLock::acquire(root.path(), "img", &mut || panic!("should not wait")).unwrap();
        let path = root.path().to_path_buf();
        let waited = std::thread::spawn(move || {
            let mut waited = false;
            let _l = ImageLock::acquire(&path, "img", &mut || waited = true).unwrap();
            waited
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        drop(held);
        assert!(waited.join().unwrap());
    }

    #[test]
    fn disk_usage_counts_allocated_blocks() {
        let root = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(root.path().join("sparse")).unwrap();
        f.set_len(1 << 30).unwrap();
        std::fs::write(root.path().join("data"), vec![1u8; 8192]).unwrap();
        let used = disk_usage(root.path());
        assert!((8192..1 << 20).contains(&used), "{used}");
    }
}
