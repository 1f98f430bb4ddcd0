//! QEMU command lines. The flags here are the ones measured to work (see
//! DESIGN.md, "Platform facts").

use super::super::{files, LaunchSpec, ResolvedAccel};
use std::path::Path;

pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// Version of the machine these arguments make (devices, their order and
/// options). Device state only loads into the same machine: bump it with any
/// change to the device set, and older snapshots are refused with a clear
/// error (warm ones are made anew).
pub const MACHINE_ABI: u32 = 1;

/// QEMU's seccomp sandbox: no obsolete syscalls, no privilege changes, no
/// fork/exec, no scheduler or affinity changes. (`spawn=deny` rules out
/// `migrate exec:`; snapshots hand QEMU a file descriptor instead.)
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// A value inside a QEMU `-drive`/`-object` option list: commas are
/// doubled so a path cannot add options of its own.
pub fn opt_value(s: &str) -> String {
    s.replace(',', ",,")
}

/// The host TSC frequency in kHz, for `tsc_early_khz=` (TCG guests hang in
/// TSC calibration about 2 boots in 3 without it).
pub fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k.trim() == "cpu MHz" {
            v.trim()
                .parse::<f64>()
                .ok()
                .filter(|mhz| mhz.is_finite() && *mhz > 0.0 && *mhz < 1.0e6)
                // In range (checked above): the cast cannot wrap or lose a sign.
                .map(|mhz| {
                    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                    let khz = (mhz * 1000.0).round() as u64;
                    khz
                })
        } else {
            None
        }
    })
}

fn machine(accel: ResolvedAccel) -> [String; 4] {
    let (accel, cpu) = match accel {
        ResolvedAccel::Kvm => ("kvm", "host"),
        ResolvedAccel::Tcg => ("tcg", "max"),
    };
    [
        "-M".into(),
        format!("microvm,accel={accel},pit=on,pic=on,rtc=on,memory-backend=mem"),
        "-cpu".into(),
        cpu.into(),
    ]
}

fn kernel_cmdline(accel: ResolvedAccel, extra: &str) -> String {
    let mut c = String::from("console=ttyS0 reboot=t panic=-1 quiet");
    if accel == ResolvedAccel::Tcg {
        if let Some(khz) = host_tsc_khz() {
            c.push_str(&format!(" tsc_early_khz={khz}"));
        }
        // Under TCG the guest TSC follows the host clock. Without this, a
        // guest booted under load has its clocksource watchdog demote the
        // TSC to jiffies: a tick that never stops (~8 % of a host core per
        // idle VM) and 4 ms clock resolution.
        c.push_str(" tsc=reliable");
    }
    if !extra.is_empty() {
        c.push(' ');
        c.push_str(extra);
    }
    c
}

/// Guest RAM: the VM's own file, mapped shared (so a snapshot copies the
/// file and leaves RAM out of the device state), or a snapshot's file
/// mapped privately (copy-on-write: the file is never written).
fn memory_backend(spec: &LaunchSpec, size: &str) -> String {
    let (path, share) = match &spec.restore {
        Some(r) if r.private => match &r.memory {
            Some(m) => (opt_value(&s(m)), "off"),
            None => (files::MEMORY_FILE.to_string(), "on"),
        },
        _ => (files::MEMORY_FILE.to_string(), "on"),
    };
    format!("memory-backend-file,id=mem,size={size},mem-path={path},share={share}")
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Launch paths must be UTF-8: QEMU takes them as text, and a lossy
/// rendering would name another file.
pub fn check_paths(spec: &LaunchSpec) -> Result<(), String> {
    let restore = spec
        .restore
        .iter()
        .flat_map(|r| [Some(&r.state), r.memory.as_ref()]);
    for p in [&spec.vm_dir, &spec.kernel, &spec.initramfs, &spec.disk]
        .into_iter()
        .chain(restore.flatten())
    {
        if p.to_str().is_none() {
            return Err(format!(
                "path {} is not valid UTF-8; QEMU cannot be given it",
                p.display()
            ));
        }
    }
    Ok(())
}

/// Arguments for booting `spec`. The VMM must run with `spec.vm_dir` as its
/// working directory (sockets and logs are relative to it).
pub fn launch_args(spec: &LaunchSpec) -> Vec<String> {
    let mem = format!("{}M", spec.memory_mib);
    use smolvm_proto::cmdline as key;
    let mut extra = format!("{}={}", key::ID, spec.id);
    if spec.network {
        extra.push(' ');
        extra.push_str(&super::net::guest_cmdline());
    }
    if spec.grow_root {
        extra.push_str(&format!(" {}=1", key::RESIZE));
    }
    let mut a: Vec<String> = Vec::new();
    a.extend(machine(spec.accel));
    a.extend([
        "-m".into(),
        mem.clone(),
        "-smp".into(),
        spec.cpus.to_string(),
        "-object".into(),
        memory_backend(spec, &mem),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-no-reboot".into(),
        "-sandbox".into(),
        SANDBOX.into(),
        "-kernel".into(),
        s(&spec.kernel),
        "-initrd".into(),
        s(&spec.initramfs),
        "-append".into(),
        kernel_cmdline(spec.accel, &extra),
        // The console goes through the supervisor, which caps the log: a
        // guest printing forever cannot fill the host's disk.
        "-chardev".into(),
        format!(
            "socket,id=con,path={},server=on,wait=off",
            files::CONSOLE_SOCKET
        ),
        "-serial".into(),
        "chardev:con".into(),
        // Start with vCPUs stopped; the supervisor connects the console and
        // agent channels first, then continues (no early output is lost).
        "-S".into(),
        "-drive".into(),
        format!(
            "id=root,file={},format=qcow2,if=none,discard=unmap",
            opt_value(&s(&spec.disk))
        ),
        "-device".into(),
        "virtio-blk-device,drive=root".into(),
        "-device".into(),
        "virtio-serial-device".into(),
        "-chardev".into(),
        format!(
            "socket,id=agent,path={},server=on,wait=off",
            files::AGENT_SOCKET
        ),
        "-device".into(),
        format!(
            "virtserialport,chardev=agent,name={}",
            smolvm_proto::AGENT_PORT_NAME
        ),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", files::QMP_SOCKET),
    ]);
    if spec.restore.is_some() {
        // The device state arrives over a descriptor once QMP is up.
        a.extend(["-incoming".into(), "defer".into()]);
    }
    if spec.network {
        a.extend([
            "-netdev".into(),
            format!(
                "stream,id=net0,server=off,addr.type=unix,addr.path={}",
                files::NET_SOCKET
            ),
            "-device".into(),
            "virtio-net-device,netdev=net0".into(),
        ]);
    }
    a
}

/// Arguments for the accelerator probe: boot the image's kernel and
/// initramfs with `smolvm.probe=1`; the init prints a marker to the console
/// (written to `console`) and reboots, which ends QEMU.
pub fn probe_args(
    accel: ResolvedAccel,
    kernel: &Path,
    initramfs: &Path,
    console: &Path,
) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "-M".into(),
        format!(
            "microvm,accel={},pit=on,pic=on,rtc=on",
            if accel == ResolvedAccel::Kvm {
                "kvm"
            } else {
                "tcg"
            }
        ),
        "-cpu".into(),
        if accel == ResolvedAccel::Kvm {
            "host"
        } else {
            "max"
        }
        .into(),
    ];
    a.extend([
        "-m".into(),
        "256M".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        s(kernel),
        "-initrd".into(),
        s(initramfs),
        "-append".into(),
        kernel_cmdline(accel, &format!("{}=1", smolvm_proto::cmdline::PROBE)),
        "-chardev".into(),
        format!("file,id=con,path={}", opt_value(&s(console))),
        "-serial".into(),
        "chardev:con".into(),
    ]);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn spec(accel: ResolvedAccel, network: bool) -> LaunchSpec {
        LaunchSpec {
            id: "sbx-1".into(),
            vm_dir: PathBuf::from("/d"),
            kernel: PathBuf::from("/k/vmlinux"),
            initramfs: PathBuf::from("/k/initramfs.cpio"),
            disk: PathBuf::from("/d/disk.qcow2"),
            memory_mib: 512,
            cpus: 2,
            accel,
            backend: crate::backend::BackendKind::Qemu,
            network,
            egress: Default::default(),
            grow_root: false,
            restore: None,
            ports: vec![],
        }
    }

    #[test]
    fn tcg_launch_has_the_flags_that_work() {
        let a = launch_args(&spec(ResolvedAccel::Tcg, true)).join(" ");
        assert!(a.contains("-M microvm,accel=tcg,pit=on,pic=on,rtc=on,memory-backend=mem -cpu max"));
        assert!(a.contains("memory-backend-file,id=mem,size=512M,mem-path=memory,share=on"));
        assert!(a.contains("-smp 2"));
        assert!(a.contains("smolvm.id=sbx-1"));
        assert!(a.contains("name=smolvm.agent"));
        assert!(a.contains("virtio-net-device"));
        assert!(a.contains("-netdev stream,id=net0,server=off,addr.type=unix,addr.path=net.sock"));
        assert!(
            !a.contains("user,id="),
            "never QEMU user networking (gateway = host loopback)"
        );
        assert!(a.contains(&format!("-sandbox {SANDBOX}")));
        assert!(a.contains("tsc=reliable"));
        assert!(a.contains("-no-reboot"));
        assert!(a.contains(" -S "), "starts paused");
        assert!(a.contains("socket,id=con,path=console.sock"));
        if host_tsc_khz().is_some() {
            assert!(a.contains("tsc_early_khz="));
        }
    }

    #[test]
    fn commas_in_paths_cannot_add_options() {
        let mut sp = spec(ResolvedAccel::Tcg, false);
        sp.disk = PathBuf::from("/d/x,file.locking=off,snapshot=on/disk.qcow2");
        let a = launch_args(&sp);
        let drive = a.iter().find(|x| x.starts_with("id=root,")).unwrap();
        assert_eq!(
            drive,
            "id=root,file=/d/x,,file.locking=off,,snapshot=on/disk.qcow2,format=qcow2,if=none,discard=unmap"
        );
        use std::os::unix::ffi::OsStrExt;
        sp.disk = PathBuf::from(std::ffi::OsStr::from_bytes(b"/d/\xff/disk"));
        assert!(check_paths(&sp).is_err());
    }

    #[test]
    fn a_restore_maps_the_snapshot_privately_and_waits_for_its_state() {
        let mut sp = spec(ResolvedAccel::Tcg, false);
        sp.restore = Some(crate::backend::RestoreSpec {
            state: PathBuf::from("/s/state"),
            memory: Some(PathBuf::from("/s,x/memory")),
            private: true,
        });
        let a = launch_args(&sp).join(" ");
        assert!(a.contains("mem-path=/s,,x/memory,share=off"), "{a}");
        assert!(a.ends_with("-incoming defer") || a.contains("-incoming defer "));
        // A warm start's own copy is the VM's RAM file, shared.
        sp.restore = Some(crate::backend::RestoreSpec {
            state: PathBuf::from("/s/state"),
            memory: Some(PathBuf::from("/d/memory.restore")),
            private: false,
        });
        let a = launch_args(&sp).join(" ");
        assert!(a.contains("mem-path=memory,share=on"), "{a}");
        assert!(a.contains("-incoming defer"));
    }

    #[test]
    fn kvm_and_no_network() {
        let a = launch_args(&spec(ResolvedAccel::Kvm, false)).join(" ");
        assert!(a.contains("accel=kvm") && a.contains("-cpu host"));
        assert!(!a.contains("tsc_early_khz"));
        assert!(!a.contains("netdev") && !a.contains("smolvm.ip"));
    }
}
