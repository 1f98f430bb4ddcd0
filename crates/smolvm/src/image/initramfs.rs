//! The initramfs: a newc cpio archive written here (no `cpio` tool needed)
//! holding static busybox, the virtio modules, our `/init` and the agent.
//!
//! Left uncompressed: it is ~5 MB, and under TCG decompressing costs more
//! boot time than reading the extra bytes.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::recipe::INIT_SH;
use super::ImageError;
use crate::locate;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Busybox applets `/init` runs, linked in `/bin`.
pub(crate) const APPLETS: &[&str] = &[
    "sh",
    "mount",
    "umount",
    "mkdir",
    "cat",
    "cp",
    "chmod",
    "insmod",
    "usleep",
    "sleep",
    "reboot",
    "switch_root",
    "ls",
    "dmesg",
    "echo",
];

/// Streams a newc ("070701") cpio archive. Entries get fixed ownership
/// (root), mtime 0 and sequential inode numbers, so the same inputs give
/// the same bytes.
pub(crate) struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    pub(crate) fn new(out: W) -> Self {
        CpioWriter {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    fn check_path(path: &str) -> Result<(), ImageError> {
        let bad = |reason: &str| ImageError::Cpio {
            path: path.to_string(),
            reason: reason.to_string(),
        };
        if path.is_empty() || path.starts_with('/') {
            return Err(bad("paths must be relative and non-empty"));
        }
        if path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(bad("paths may not contain empty, `.` or `..` components"));
        }
        if path.contains('\0') {
            return Err(bad("paths may not contain NUL"));
        }
        Ok(())
    }

    fn io(&mut self, bytes: &[u8]) -> Result<(), ImageError> {
        self.out
            .write_all(bytes)
            .map_err(ImageError::io("cannot write the initramfs"))?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<(), ImageError> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.io(&[0u8; 3][..n])
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<(), ImageError> {
        let size = u32::try_from(data.len()).map_err(|_| ImageError::Cpio {
            path: path.to_string(),
            reason: "larger than 4 GiB".into(),
        })?;
        let ino = if path == "TRAILER!!!" {
            0
        } else {
            self.next_ino
        };
        self.next_ino += 1;
        let namesize = path.len() + 1;
        let fields = [
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            u32::try_from(namesize).unwrap_or(u32::MAX),
            0,
        ];
        let mut header = String::with_capacity(110);
        header.push_str("070701");
        for f in fields {
            header.push_str(&format!("{f:08X}"));
        }
        self.io(header.as_bytes())?;
        self.io(path.as_bytes())?;
        self.io(&[0])?;
        self.pad()?;
        self.io(data)?;
        self.pad()
    }

    /// A directory. Parents must have been added first.
    pub(crate) fn dir(&mut self, path: &str, perm: u32) -> Result<(), ImageError> {
        Self::check_path(path)?;
        self.entry(path, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    /// A regular file with `data`.
    pub(crate) fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<(), ImageError> {
        Self::check_path(path)?;
        self.entry(path, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// A symbolic link to `target`.
    pub(crate) fn symlink(&mut self, path: &str, target: &str) -> Result<(), ImageError> {
        Self::check_path(path)?;
        self.entry(path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// A character device node.
    pub(crate) fn char_dev(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), ImageError> {
        Self::check_path(path)?;
        self.entry(path, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the writer.
    pub(crate) fn finish(mut self) -> Result<W, ImageError> {
        self.entry("TRAILER!!!", 0, 1, (0, 0), &[])?;
        self.out
            .flush()
            .map_err(ImageError::io("cannot write the initramfs"))?;
        Ok(self.out)
    }
}

/// What goes into an initramfs.
#[derive(Debug, Clone)]
pub(crate) struct InitramfsInputs {
    pub busybox: PathBuf,
    pub agent: PathBuf,
    /// Module files in load order (named `<module>.ko` in the image dir).
    pub modules: Vec<(String, PathBuf)>,
}

impl InitramfsInputs {
    /// Locates static busybox and the agent; `modules` come from the image.
    pub(crate) fn locate(modules: Vec<(String, PathBuf)>) -> Result<Self, ImageError> {
        let busybox = crate::hosttools::require("busybox")?;
        if !locate::is_static_elf(&busybox) {
            return Err(ImageError::BusyboxNotStatic { path: busybox });
        }
        let agent = locate::agent_binary()?;
        Ok(InitramfsInputs {
            busybox,
            agent,
            modules,
        })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ImageError> {
    std::fs::read(path).map_err(ImageError::io(format!("cannot read {}", path.display())))
}

/// Writes the initramfs for `inputs` to `dest`.
pub(crate) fn write(dest: &Path, inputs: &InitramfsInputs) -> Result<(), ImageError> {
    let file = std::fs::File::create(dest)
        .map_err(ImageError::io(format!("cannot create {}", dest.display())))?;
    let mut w = CpioWriter::new(std::io::BufWriter::new(file));
    for d in [
        "bin",
        "dev",
        "etc",
        "lib",
        "lib/modules",
        "newroot",
        "proc",
        "sbin",
        "sys",
        "tmp",
    ] {
        w.dir(d, if d == "tmp" { 0o1777 } else { 0o755 })?;
    }
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.file("bin/busybox", 0o755, &read(&inputs.busybox)?)?;
    for applet in APPLETS {
        w.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    let mut order = String::new();
    for (name, path) in &inputs.modules {
        w.file(&format!("lib/modules/{name}.ko"), 0o644, &read(path)?)?;
        order.push_str(name);
        order.push('\n');
    }
    w.file("modules.order", 0o644, order.as_bytes())?;
    w.file("init", 0o755, INIT_SH.as_bytes())?;
    w.file("smolvm-agent", 0o755, &read(&inputs.agent)?)?;
    let out = w.finish()?;
    let file = out
        .into_inner()
        .map_err(|e| ImageError::io(format!("cannot write {}", dest.display()))(e.into_error()))?;
    file.sync_all()
        .map_err(ImageError::io(format!("cannot write {}", dest.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file("bin/hello", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        w.symlink("bin/sh", "hello").unwrap();
        w.file("odd", 0o644, b"abcde").unwrap();
        w.file("empty", 0o600, b"").unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn layout_is_newc() {
        let a = sample();
        assert_eq!(a.len() % 4, 0);
        assert!(a.starts_with(b"070701"));
        assert_eq!(&a[6..14], b"00000001"); // first inode
        assert_eq!(&a[14..22], b"000041ED"); // dir 0755
        assert_eq!(&a[110..114], b"bin\0");
        assert!(a.windows(11).any(|w| w == b"TRAILER!!!\0"));
        assert_eq!(a, sample(), "output is deterministic");
    }

    #[test]
    fn rejects_bad_paths() {
        let mut w = CpioWriter::new(Vec::new());
        for p in ["", "/abs", "a/../b", "a//b", "./a"] {
            assert!(w.file(p, 0o644, b"").is_err(), "{p:?}");
        }
    }

    #[test]
    fn round_trips_through_the_cpio_tool() {
        let cpio = crate::hosttools::require("cpio").expect("scripts/setup-host.sh installs cpio");
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file("bin/hello", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        w.symlink("bin/sh", "hello").unwrap();
        w.file("odd", 0o640, b"abcde").unwrap();
        w.char_dev("console", 0o600, 5, 1).unwrap();
        let archive = w.finish().unwrap();

        let listing = pipe(Command::new(&cpio).args(["-t", "-v", "--quiet"]), &archive);
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 5, "{listing}");
        assert!(
            lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" bin"),
            "{listing}"
        );
        assert!(
            lines[2].starts_with("lrwxrwxrwx") && lines[2].ends_with("bin/sh -> hello"),
            "{listing}"
        );
        assert!(
            lines[4].starts_with("crw-------") && lines[4].contains("5,"),
            "{listing}"
        );

        // Extract everything but the device node (that needs root).
        let dir = tempfile::tempdir().unwrap();
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file("bin/hello", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        w.symlink("bin/sh", "hello").unwrap();
        w.file("odd", 0o640, b"abcde").unwrap();
        let archive = w.finish().unwrap();
        pipe(
            Command::new(&cpio)
                .args(["-i", "-d", "--quiet", "--no-absolute-filenames"])
                .current_dir(dir.path()),
            &archive,
        );
        let root = dir.path();
        assert_eq!(
            std::fs::read(root.join("bin/hello")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(std::fs::read(root.join("odd")).unwrap(), b"abcde");
        assert_eq!(
            std::fs::read_link(root.join("bin/sh")).unwrap(),
            Path::new("hello")
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(root.join("odd"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
    }

    fn pipe(cmd: &mut Command, input: &[u8]) -> String {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn cpio");
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "cpio failed");
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn init_script_is_busybox_sh() {
        assert!(INIT_SH.starts_with("#!/bin/busybox sh\n"));
        assert!(INIT_SH.contains("SMOLVM-PROBE-OK"));
        assert!(INIT_SH.contains("exec switch_root /newroot /run/smolvm/smolvm-agent"));
        // Every external command init.sh runs has an applet link.
        for cmd in [
            "mount",
            "insmod",
            "usleep",
            "reboot",
            "cp",
            "chmod",
            "mkdir",
            "umount",
            "switch_root",
        ] {
            assert!(APPLETS.contains(&cmd), "{cmd}");
        }
        // Syntax check with the host's busybox when present.
        if let Some(bb) = crate::hosttools::find("busybox") {
            let st = Command::new(bb)
                .args(["sh", "-n", "-c", INIT_SH])
                .status()
                .unwrap();
            assert!(st.success(), "init.sh has a syntax error");
        }
    }
}
