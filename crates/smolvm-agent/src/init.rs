//! PID-1 system setup: pseudo filesystems, `/dev` links, a writable root and
//! the hostname.

use crate::sys::{cstr, cvt, os_message};
use std::collections::HashSet;
use std::io;
use std::os::unix::fs::{symlink, DirBuilderExt};
use std::path::Path;

struct MountSpec {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: libc::c_ulong,
    data: &'static str,
}

const NOSUID: libc::c_ulong = libc::MS_NOSUID;
const NODEV: libc::c_ulong = libc::MS_NODEV;
const NOEXEC: libc::c_ulong = libc::MS_NOEXEC;

/// In mount order: a parent before anything mounted below it.
const MOUNTS: &[MountSpec] = &[
    MountSpec {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID | NODEV | NOEXEC,
        data: "",
    },
    MountSpec {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: NOSUID,
        data: "mode=0755",
    },
    MountSpec {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: NOSUID | NOEXEC,
        data: "ptmxmode=0666,mode=0620,gid=5",
    },
    MountSpec {
        source: "tmpfs",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID | NODEV,
        data: "mode=1777",
    },
    MountSpec {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: NOSUID | NODEV,
        data: "mode=1777",
    },
    MountSpec {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: NOSUID | NODEV,
        data: "mode=0755",
    },
];

/// Mounts what a Linux userland expects. Every failure is logged and skipped.
pub fn setup() {
    // SAFETY: umask and chdir take plain values / a valid C string.
    unsafe {
        libc::umask(0o022);
        libc::chdir(c"/".as_ptr());
    }
    if !is_proc_mounted() {
        if let Err(e) = mount("proc", "/proc", "proc", NOSUID | NODEV | NOEXEC, "") {
            error!("mount /proc: {}", os_message(&e));
        }
    }
    remount_root_rw();
    let mounted = mount_points();
    let mut devpts_ok = mounted.contains("/dev/pts");
    for m in MOUNTS {
        if mounted.contains(m.target) {
            continue;
        }
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(m.target);
        match mount(m.source, m.target, m.fstype, m.flags, m.data) {
            Ok(()) => devpts_ok |= m.target == "/dev/pts",
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => devpts_ok |= m.target == "/dev/pts",
            Err(e) => error!("mount {} on {}: {}", m.fstype, m.target, os_message(&e)),
        }
    }
    dev_links(devpts_ok);
}

/// Sets the hostname at boot (the VM id), logging a failure.
pub fn boot_hostname(name: &str) {
    if name.is_empty() || name.len() > 64 {
        error!("hostname {name:?}: must be 1 to 64 bytes");
        return;
    }
    if let Err(e) = set_hostname(name) {
        error!("sethostname {name}: {}", os_message(&e));
    }
}

/// `sethostname(2)`: the kernel's hostname only (the boot path writes no
/// /etc/hostname or /etc/hosts either; `Reinit` does the same).
pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, which live for
    // the duration of the call.
    cvt(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(drop)
}

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let (s, t, f, d) = (cstr(source)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
    // SAFETY: all four are valid NUL-terminated strings living across the call.
    cvt(unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) })
        .map(drop)
}

fn is_proc_mounted() -> bool {
    // SAFETY: an all-zero statfs is a valid value for statfs(2) to overwrite.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid C string and `st` is writable.
    let r = unsafe { libc::statfs(c"/proc".as_ptr(), &mut st) };
    r == 0 && st.f_type == libc::PROC_SUPER_MAGIC
}

fn remount_root_rw() {
    // SAFETY: an all-zero statvfs is a valid value for statvfs(3) to overwrite.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid C string and `st` is writable.
    if unsafe { libc::statvfs(c"/".as_ptr(), &mut st) } != 0 || st.f_flag & libc::ST_RDONLY == 0 {
        return;
    }
    // SAFETY: valid C strings; a NULL source/fstype/data is allowed for a remount.
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT,
            std::ptr::null(),
        )
    };
    match cvt(r) {
        Ok(_) => info!("remounted / read-write"),
        Err(e) => error!("remount / read-write: {}", os_message(&e)),
    }
}

/// Mount points currently mounted, from /proc/self/mountinfo.
fn mount_points() -> HashSet<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(str::to_string)
        .collect()
}

fn dev_links(devpts_ok: bool) {
    for (target, link) in [
        ("/proc/self/fd", "/dev/fd"),
        ("/proc/self/fd/0", "/dev/stdin"),
        ("/proc/self/fd/1", "/dev/stdout"),
        ("/proc/self/fd/2", "/dev/stderr"),
    ] {
        if let Err(e) = symlink(target, link) {
            if e.kind() != io::ErrorKind::AlreadyExists {
                error!("symlink {link}: {}", os_message(&e));
            }
        }
    }
    // The devtmpfs node also works with a devpts at /dev/pts; the link makes
    // /dev/ptmx follow that instance's permissions (ptmxmode=0666).
    let ptmx = Path::new("/dev/ptmx");
    if !devpts_ok
        || ptmx
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
    {
        return;
    }
    let _ = std::fs::remove_file(ptmx);
    if let Err(e) = symlink("pts/ptmx", ptmx) {
        error!("symlink /dev/ptmx: {}", os_message(&e));
    }
}

/// Grows the root filesystem (ext4, mounted) to fill its block device, for
/// VMs created with a disk larger than the image. Failures are logged: the
/// VM still works at the image's size.
pub fn grow_root() {
    let Some(dev) = root_device() else {
        error!("grow root: cannot find the root device in /proc/mounts");
        return;
    };
    match std::process::Command::new("/usr/sbin/resize2fs")
        .arg(&dev)
        .stdin(std::process::Stdio::null())
        .output()
    {
        Ok(o) if o.status.success() => info!("grow root: {dev} resized"),
        Ok(o) => error!(
            "grow root: resize2fs {dev} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => error!("grow root: cannot run resize2fs: {e}"),
    }
}

/// The block device mounted at `/`.
fn root_device() -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (dev, at) = (f.next()?, f.next()?);
        (at == "/" && dev.starts_with("/dev/")).then(|| dev.to_string())
    })
}
