//! The PID-1 path without a VM: the agent runs as PID 1 of fresh PID, mount,
//! UTS and network namespaces, chrooted into a tmpfs root laid out like the
//! guest's after our initramfs (/dev, /run, /proc already mounted), with
//! a fake /sys that names a "virtio port" which is really a raw pty whose
//! master this test holds. It exercises the mounts, hostname, loopback,
//! resolv.conf, reaping of orphans as PID 1, port discovery and shutdown
//! (reboot(2) in a PID namespace ends the namespace's init with SIGHUP).
//!
//! Everything it changes lives in those namespaces and that tmpfs. It needs
//! root and unshare(1), and fails without them (the suite runs as root).

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use common::{argv, shell, Conn, WAIT};
use smolvm_proto::{Bytes, GuestMsg, HostHello, HostMsg, Identity, PROTOCOL_VERSION};
use std::ffi::CStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SETUP: &str = r#"
set -eu
R="$ROOT"
mount -t tmpfs -o mode=755 smolvm-test-root "$R"
mkdir -p "$R/usr" "$R/etc" "$R/proc" "$R/sys" "$R/dev" "$R/run" "$R/root"
mount --bind /usr "$R/usr"
mount -o remount,bind,ro "$R/usr"
for l in bin sbin lib lib32 lib64 libx32; do
  if [ -L "/$l" ]; then ln -s "$(readlink "/$l")" "$R/$l"; fi
done
cp /etc/passwd /etc/group "$R/etc/"
mount -t proc proc "$R/proc"
printf '%s\n' "$CMDLINE" > "$R/cmdline"
mount --bind "$R/cmdline" "$R/proc/cmdline"
mount -t tmpfs tmpfs "$R/sys"
mkdir -p "$R/sys/class/virtio-ports/vport3p1"
echo smolvm.agent > "$R/sys/class/virtio-ports/vport3p1/name"
mount -t tmpfs -o mode=755 tmpfs "$R/dev"
for n in null zero full random urandom; do
  touch "$R/dev/$n"; mount --bind "/dev/$n" "$R/dev/$n"
done
touch "$R/dev/vport3p1"
mount --bind "$PORT" "$R/dev/vport3p1"
mount -t tmpfs -o mode=755 tmpfs "$R/run"
mkdir "$R/run/smolvm"
cp "$AGENT" "$R/run/smolvm/smolvm-agent"
exec chroot "$R" /run/smolvm/smolvm-agent
"#;

const NS_FLAGS: &[&str] = &[
    "--pid",
    "--fork",
    "--mount",
    "--uts",
    "--net",
    "--propagation",
    "private",
];

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    let probe = std::process::Command::new("unshare")
        .args(NS_FLAGS)
        .arg("true")
        .output();
    match probe {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "unshare failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("no unshare: {e}")),
    }
}

/// A pty pair in raw mode: (master, slave path, slave fd kept open).
fn raw_pty() -> (File, String, OwnedFd) {
    // SAFETY: plain libc calls; every return value is checked, the name
    // buffer is large enough and NUL-terminated by ptsname_r.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        assert!(m >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
        let master = File::from_raw_fd(m);
        assert_eq!(libc::grantpt(m), 0);
        assert_eq!(libc::unlockpt(m), 0);
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(libc::ptsname_r(m, name.as_mut_ptr(), name.len()), 0);
        let path = CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned();
        let s = libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        assert!(s >= 0, "open {path}: {}", std::io::Error::last_os_error());
        let slave = OwnedFd::from_raw_fd(s);
        let mut t: libc::termios = std::mem::zeroed();
        assert_eq!(libc::tcgetattr(slave.as_raw_fd(), &mut t), 0);
        libc::cfmakeraw(&mut t);
        assert_eq!(libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t), 0);
        (master, path, slave)
    }
}

#[test]
fn agent_as_pid1_in_namespaces() {
    // Runs for real or fails: the test suite (scripts/test.sh) runs as root.
    if let Some(why) = skip_reason() {
        panic!(
            "this test needs root and unshare(1) ({why}); run the suite as root (scripts/test.sh)"
        );
    }
    let root = common::scratch("pid1-root");
    let (master, port, _slave) = raw_pty();
    let mut child = std::process::Command::new("unshare")
        .args(NS_FLAGS)
        .args(["sh", "-c", SETUP])
        .env("ROOT", &root)
        .env("PORT", &port)
        .env("AGENT", common::agent_bin())
        .env(
            "CMDLINE",
            "console=ttyS0 reboot=t smolvm.id=ns-test-1 smolvm.ip=10.0.2.15/24 smolvm.gw=10.0.2.2 smolvm.dns=10.0.2.3",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn unshare");
    let log = Arc::new(Mutex::new(String::new()));
    let mut err = child.stderr.take().unwrap();
    let log2 = Arc::clone(&log);
    let log_thread = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            eprint!("{text}");
            log2.lock().unwrap().push_str(&text);
        }
    });
    let writer = master.try_clone().unwrap();
    let mut a = Conn::new(child, master, writer);

    a.send(
        0,
        HostMsg::Hello(HostHello {
            version: PROTOCOL_VERSION,
        }),
    );
    let m = a.wait_until(0, WAIT, |m| !m.is_empty());
    assert!(
        matches!(&m[0], GuestMsg::Hello(h) if h.version == PROTOCOL_VERSION),
        "{m:?}"
    );

    let o = a.exec(
        1,
        argv(&[
            "cat",
            "/proc/1/comm",
            "/proc/sys/kernel/hostname",
            "/etc/resolv.conf",
        ]),
    );
    assert_eq!(
        o.stdout_str(),
        "smolvm-agent\nns-test-1\nnameserver 10.0.2.3\n"
    );

    let o = a.exec(2, argv(&["cat", "/proc/self/mountinfo"]));
    let points: Vec<String> = o
        .stdout_str()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(str::to_string)
        .collect();
    for p in [
        "/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/tmp", "/run",
    ] {
        assert!(points.iter().any(|x| x == p), "{p} not mounted: {points:?}");
    }
    // Already-mounted ones were not mounted twice.
    assert_eq!(
        points.iter().filter(|x| *x == "/run").count(),
        1,
        "{points:?}"
    );
    assert_eq!(
        points.iter().filter(|x| *x == "/dev").count(),
        1,
        "{points:?}"
    );

    let o = a.exec(
        3,
        shell("readlink /dev/ptmx /dev/fd /dev/stdin; stat -c %a /tmp /dev/shm"),
    );
    assert_eq!(
        o.stdout_str(),
        "pts/ptmx\n/proc/self/fd\n/proc/self/fd/0\n1777\n1777\n"
    );

    if std::path::Path::new("/usr/sbin/ip").exists() || std::path::Path::new("/usr/bin/ip").exists()
    {
        let o = a.exec(
            4,
            shell("ip -4 -o addr show dev lo; ip -o link show dev lo"),
        );
        let out = o.stdout_str();
        assert!(out.contains("inet 127.0.0.1/8"), "{out}");
        assert!(out.contains("UP"), "{out}");
    }

    // Orphans are reparented to PID 1, the agent, which must reap them.
    let o = a.exec(
        5,
        shell("for i in 1 2 3 4 5 6 7 8; do (sleep 0.1 &); done; echo spawned"),
    );
    assert_eq!(o.stdout_str(), "spawned\n");
    // A zombie may flicker for an instant while being reaped; one that
    // stays means nobody reaps.
    let mut zombies = String::new();
    for attempt in 0..20 {
        std::thread::sleep(Duration::from_millis(300));
        let o = a.exec(100 + attempt, shell("cat /proc/[0-9]*/stat 2>/dev/null"));
        zombies = o
            .stdout_str()
            .lines()
            .filter(|l| {
                l.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .map(|l| format!("{l}\n"))
            .collect();
        if zombies.is_empty() {
            break;
        }
    }
    assert!(zombies.is_empty(), "zombies left: {zombies}");

    // A restored machine's Reinit: the hostname changes (in the UTS
    // namespace), the entropy goes into the kernel's pool. No time: this
    // agent holds CAP_SYS_TIME and CLOCK_REALTIME has no namespace, so a
    // time would set the test machine's clock.
    let mut entropy = vec![0u8; 64];
    File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut entropy)
        .unwrap();
    a.send(
        0,
        HostMsg::Reinit(Identity {
            hostname: "ns-test-2".into(),
            entropy: Bytes(entropy),
            unix_time_ns: 0,
        }),
    );
    let m = a.wait_until(0, WAIT, |m| m.len() == 2);
    assert_eq!(
        m[1],
        GuestMsg::Reinited {
            clock_set: false,
            reseeded: true
        }
    );
    let o = a.exec(6, argv(&["cat", "/proc/sys/kernel/hostname"]));
    assert_eq!(o.stdout_str(), "ns-test-2\n");

    // Shutdown with a process still running: the agent ends it and the
    // machine (here: the namespace) goes away.
    a.send(7, HostMsg::Exec(shell("sleep 300")));
    a.wait_until(7, WAIT, |m| !m.is_empty());
    a.send(8, HostMsg::Shutdown);
    let m = a.wait_until(8, WAIT, |m| !m.is_empty());
    assert_eq!(m, vec![GuestMsg::ShutdownAck]);

    let status = a.child.wait().unwrap();
    log_thread.join().unwrap();
    let log = log.lock().unwrap().clone();
    // reboot(2) in a PID namespace ends its init with SIGHUP; unshare
    // passes that on.
    assert_eq!(status.signal(), Some(libc::SIGHUP), "{status:?}\n{log}");
    assert!(log.contains("smolvm-agent: starting"), "{log}");
    assert!(log.contains("no eth0"), "{log}");
    assert!(log.contains("smolvm-agent: shutting down"), "{log}");
    drop(a);
    let _ = std::fs::remove_dir(&root);
}
