//! End-to-end check of the image pipeline: a real build and a probe boot.
//! Ignored by default (network, mmdebstrap, a static agent, minutes).

use std::time::Instant;

use super::recipe;
use super::{build, ensure, list, BuildOptions, ImageEvent};
use crate::hosttools;

/// The host's TSC frequency for `tsc_early_khz` (TCG guests hang in
/// calibration without it).
fn tsc_khz() -> u64 {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            let line = c.lines().find(|l| l.starts_with("cpu MHz"))?;
            let mhz: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
            Some((mhz * 1000.0) as u64)
        })
        .unwrap_or(2_000_000)
}

/// Builds the default image for real, checks caching, and boots the
/// result in the accelerator-probe mode under TCG.
///
/// `SMOLVM_AGENT_BIN=/path/to/static/agent SMOLVM_CACHE_DIR=/tmp/c \
///  cargo test -p smolvm builds_and_probes_debian_12 -- --ignored --nocapture`
#[test]
#[ignore = "builds the debian-12 image for real: needs mmdebstrap, network and a static agent; ~1-2 min"]
fn builds_and_probes_debian_12() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    let img = build(recipe::DEFAULT_IMAGE, &BuildOptions::default(), &mut |e| {
        if let ImageEvent::Step { label, .. } = &e {
            eprintln!("step: {label}");
        }
    })
    .expect("image build");
    assert!(std::fs::read(&img.kernel).unwrap().starts_with(b"\x7fELF"));
    assert!(img.initramfs.is_file() && img.rootfs.is_file());
    let modules = &img.manifest.kernel.modules;
    let pos = |m: &str| {
        modules
            .iter()
            .position(|x| x == m)
            .unwrap_or_else(|| panic!("{m} missing"))
    };
    assert!(pos("virtio_ring") < pos("virtio_mmio") && pos("virtio") < pos("virtio_blk"));
    assert!(pos("failover") < pos("net_failover") && pos("net_failover") < pos("virtio_net"));
    assert!(pos("vsock") < pos("vmw_vsock_virtio_transport"));
    assert!(pos("fuse") < pos("virtiofs"));
    // The workbench tools agents reach for first (entries are `name version`).
    for pkg in [
        "python3",
        "python3-pip",
        "python3-venv",
        "python3.11-venv",
        "git",
        "jq",
        "unzip",
        "xz-utils",
        "file",
        "less",
        "nano",
    ] {
        assert!(
            img.manifest
                .rootfs
                .installed
                .iter()
                .any(|p| p.split(' ').next() == Some(pkg)),
            "{pkg} is not installed"
        );
    }

    // Cached: ensure() returns the same image without any event.
    let again = ensure(recipe::DEFAULT_IMAGE, &mut |e| {
        panic!("unexpected event {e:?}")
    })
    .unwrap();
    assert_eq!(again, img);
    assert!(list()
        .unwrap()
        .iter()
        .any(|i| i.name == img.name && i.problem.is_none()));

    let qemu =
        hosttools::require("qemu-system-x86_64").expect("scripts/setup-host.sh installs QEMU");
    let mut child = Command::new(qemu)
        .args([
            "-M",
            "microvm,accel=tcg,pit=on,pic=on,rtc=on",
            "-cpu",
            "max",
            "-m",
            "256",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&img.kernel)
        .arg("-initrd")
        .arg(&img.initramfs)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 reboot=t panic=-1 quiet tsc_early_khz={} smolvm.id=t smolvm.probe=1",
            tsc_khz()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qemu");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.wait();
    let console = reader.join().unwrap();
    assert!(console.contains("SMOLVM-PROBE-OK"), "console:\n{console}");
}
