//! Everything smolvm writes is its owner's alone: directories `0700`, files
//! `0600`. The library does not change the process umask (it may be
//! embedded in a bigger program, e.g. Python); it creates with explicit
//! modes instead, and tightens roots that an older smolvm created wider.
//! Child processes that create files of ours (QEMU, qemu-img, passt) run
//! with umask `077` (see `backend`).

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

pub const DIR_MODE: u32 = 0o700;
pub const FILE_MODE: u32 = 0o600;

/// Creates `path` and any missing parents with mode `0700`, and makes
/// `path` itself `0700` when it already existed with a wider mode.
pub fn dir_all(path: &Path) -> std::io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)?;
    tighten(path, DIR_MODE)
}

/// Makes `path` no more permissive than `mode` (owner bits kept). A
/// symlink (say, a data dir the user moved to another disk) is judged and
/// changed as its target, and only when the target is ours.
pub fn tighten(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    if meta.uid() != crate::sys::euid() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{} belongs to another user", path.display()),
        ));
    }
    let cur = meta.permissions().mode() & 0o7777;
    if cur & !mode != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(cur & mode))?;
    }
    Ok(())
}

/// Removes group and other access from `root` and everything under it
/// (symlinks are not followed).
pub fn tighten_tree(root: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(root)?;
    if meta.file_type().is_symlink() || meta.uid() != crate::sys::euid() {
        return Ok(());
    }
    tighten(root, 0o7700)?;
    if meta.is_dir() {
        for e in std::fs::read_dir(root)? {
            tighten_tree(&e?.path())?;
        }
    }
    Ok(())
}

/// Opens `path` for writing (created `0600`, truncated).
pub fn create(path: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?;
    // An existing file keeps its mode on open: tighten it.
    f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

/// Creates `path` (`0600`) for writing; fails when it exists.
pub fn create_new(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
}

/// Opens `path` for appending (created `0600`).
pub fn append(path: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(FILE_MODE)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

/// Writes `bytes` to `path` atomically: a private temporary file in the
/// same directory, synced, then renamed over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_file_name(format!(
        ".{}.tmp.{}.{seq}",
        name.unwrap_or_default(),
        std::process::id()
    ));
    let r = (|| {
        let mut f = create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// A log a child process writes through a pipe, kept by a thread of ours
/// and capped: past `cap` bytes the rest is read and dropped (so the child
/// never blocks on a full pipe) and one line says so. A guest that makes
/// its VMM print forever cannot fill the host's disk.
pub struct CappedLog {
    writer: Option<std::io::PipeWriter>,
    /// Says when the copying thread has seen the end of the pipe.
    done: Option<std::sync::mpsc::Receiver<()>>,
}

/// How long [`CappedLog::finish`] waits for the log to be complete.
const FINISH_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl CappedLog {
    /// Creates `path` (private) and the thread that fills it.
    pub fn create(path: &Path, cap: u64) -> std::io::Result<CappedLog> {
        let mut file = create(path)?;
        let (mut r, w) = std::io::pipe()?;
        let (done_tx, done) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("capped-log".into())
            .spawn(move || {
                // Sent when this thread ends, however it ends.
                let _done = DropSignal(done_tx);
                use std::io::Read as _;
                let mut buf = vec![0u8; 16 * 1024];
                let mut written = 0u64;
                let mut capped = false;
                loop {
                    let n = match r.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => return,
                    };
                    if capped {
                        continue;
                    }
                    let room = usize::try_from(cap.saturating_sub(written)).unwrap_or(usize::MAX);
                    let take = n.min(room);
                    if file.write_all(&buf[..take]).is_err() {
                        // Disk full, say: keep draining, so the child's
                        // own output never fails because of our log.
                        capped = true;
                        continue;
                    }
                    written += take as u64;
                    if take < n {
                        capped = true;
                        let _ = writeln!(
                            file,
                            "\n[smolvm: this log is capped at {cap} bytes; the rest was dropped]"
                        );
                    }
                }
            })?;
        Ok(CappedLog {
            writer: Some(w),
            done: Some(done),
        })
    }

    /// A write end for a child's stdout or stderr.
    pub fn stdio(&self) -> std::io::Result<std::process::Stdio> {
        match &self.writer {
            Some(w) => Ok(w.try_clone()?.into()),
            None => Err(std::io::Error::other("log already closed")),
        }
    }

    /// Drops our write end (once every child holding one is spawned), so
    /// the thread ends when the children do.
    pub fn close_writer(&mut self) {
        self.writer = None;
    }

    /// Waits (a bounded while) until the children closed the pipe and the
    /// log is complete. Bounded: a grandchild still holding the pipe must
    /// not keep the caller waiting.
    pub fn finish(&mut self) {
        self.writer = None;
        if let Some(d) = self.done.take() {
            let _ = d.recv_timeout(FINISH_WAIT);
        }
    }
}

struct DropSignal(std::sync::mpsc::Sender<()>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// The umask for child processes that create files of ours.
pub const CHILD_UMASK: libc::mode_t = 0o077;

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn creates_private_dirs_and_files() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b/c");
        dir_all(&d).unwrap();
        assert_eq!(mode(&t.path().join("a")), 0o700);
        assert_eq!(mode(&d), 0o700);
        let f = d.join("f");
        create(&f).unwrap();
        assert_eq!(mode(&f), 0o600);
        write_atomic(&d.join("g"), b"x").unwrap();
        assert_eq!(mode(&d.join("g")), 0o600);
        assert_eq!(std::fs::read(d.join("g")).unwrap(), b"x");
    }

    #[test]
    fn tightens_what_exists() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("wide");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir_all(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        let f = d.join("f");
        std::fs::write(&f, b"old").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        append(&f).unwrap();
        assert_eq!(mode(&f), 0o600);
    }
}
