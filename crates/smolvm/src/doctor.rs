//! Host diagnosis (`smolvm doctor`): every requirement, whether it holds,
//! and how to fix it. The CLI only renders this.

use serde::Serialize;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Missing,
    Warn,
    Info,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Missing => "missing",
            Status::Warn => "warn",
            Status::Info => "info",
        }
    }
}

/// One host requirement.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    /// False when smolvm cannot work until it is fixed.
    pub ok: bool,
    pub status: Status,
    pub detail: String,
    pub fix: Option<String>,
}

fn free_bytes(path: &std::path::Path) -> Option<u64> {
    let mut p = path.to_path_buf();
    while !p.exists() {
        p = p.parent()?.to_path_buf();
    }
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs writes into a zeroed struct we own; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// The guest network needs a user namespace (passt's private namespace),
/// `/dev/net/tun` (pasta's link into it), a default route (what pasta
/// links to), and — where AppArmor confines passt — a data dir its profile
/// allows.
fn network_checks(checks: &mut Vec<Check>) {
    let route = crate::backend::has_default_route();
    checks.push(Check {
        name: "default route".into(),
        ok: true,
        status: if route { Status::Ok } else { Status::Warn },
        detail: if route {
            "the host has an IPv4 default route (the guest network links to it)".into()
        } else {
            "no IPv4 default route: VMs with a network cannot start".into()
        },
        fix: (!route).then(|| "connect the host, or create VMs with `--no-network`".into()),
    });
    if let Some(c) = apparmor_check() {
        checks.push(c);
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun");
    checks.push(match tun {
        Ok(_) => Check {
            name: "/dev/net/tun".into(),
            ok: true,
            status: Status::Ok,
            detail: "opens (the guest network's link)".into(),
            fix: None,
        },
        Err(e) => Check {
            name: "/dev/net/tun".into(),
            ok: false,
            status: Status::Missing,
            detail: format!(
                "cannot be opened ({e}); VMs with a network cannot start (`--no-network` works)"
            ),
            fix: Some(
                "sudo modprobe tun && sudo chmod 0666 /dev/net/tun (the Debian default; keep it with a udev rule: KERNEL==\"tun\", MODE=\"0666\")"
                    .into(),
            ),
        },
    });
    let userns = crate::hosttools::command("unshare")
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|mut c| {
            c.args(["--user", "--net", "--map-root-user", "true"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
        })
        .map(|s| s.success())
        .unwrap_or(false);
    checks.push(Check {
        name: "user namespaces".into(),
        ok: userns,
        status: if userns { Status::Ok } else { Status::Missing },
        detail: if userns {
            "a private user+network namespace can be made (the guest network lives in one)".into()
        } else {
            "cannot create a user+network namespace; VMs with a network cannot start".into()
        },
        fix: (!userns).then(|| {
            "sudo sysctl -w user.max_user_namespaces=15000 (Debian/Ubuntu also: kernel.unprivileged_userns_clone=1; Ubuntu 24.04: kernel.apparmor_restrict_unprivileged_userns=0)".into()
        }),
    });
}

/// What the default backend needs of the host (QEMU: its seccomp sandbox).
/// Debian's passt package ships an AppArmor profile that lets passt and
/// pasta write only under `/tmp` and the user's home: a data dir elsewhere
/// breaks the guest network where AppArmor is on.
fn apparmor_check() -> Option<Check> {
    let enabled = std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .is_ok_and(|s| s.trim() == "Y");
    let profile = [
        "/etc/apparmor.d/usr.bin.passt",
        "/etc/apparmor.d/usr.bin.pasta",
    ]
    .iter()
    .any(|p| std::path::Path::new(p).exists());
    if !(enabled && profile) {
        return None;
    }
    // The profile's `owner /tmp/**` and `owner @{HOME}/**`, where @{HOME}
    // is /home/*/ and /root/; judged on the real path.
    let data = crate::paths::data_dir();
    let real = std::fs::canonicalize(&data).unwrap_or_else(|_| data.clone());
    let mut parts = real.components().skip(1);
    let allowed = match parts.next().and_then(|c| c.as_os_str().to_str()) {
        Some("tmp") | Some("root") => true,
        Some("home") => parts.next().is_some(),
        _ => false,
    };
    Some(Check {
        name: "AppArmor (passt)".into(),
        ok: allowed,
        status: if allowed { Status::Ok } else { Status::Missing },
        detail: if allowed {
            format!("passt's profile allows the data dir {}", data.display())
        } else {
            format!(
                "passt's AppArmor profile only allows /tmp and your home; the data dir {} is outside both, so the guest network cannot start",
                data.display()
            )
        },
        fix: (!allowed).then(|| {
            "set SMOLVM_DATA_DIR under your home, or allow the path in /etc/apparmor.d/local/usr.bin.passt".into()
        }),
    })
}

fn backend_checks(checks: &mut Vec<Check>) {
    let backend = crate::backend::get(crate::backend::BackendKind::default());
    for (name, r) in backend.host_checks() {
        checks.push(match r {
            Ok(detail) => Check {
                name: name.into(),
                ok: true,
                status: Status::Ok,
                detail,
                fix: None,
            },
            Err(detail) => Check {
                name: name.into(),
                ok: false,
                status: Status::Missing,
                detail,
                fix: Some(format!(
                    "install a {} built with seccomp support: `sudo apt-get install qemu-system-x86`",
                    backend.kind()
                )),
            },
        });
    }
}

/// Checks every host requirement. Blocking (it may run QEMU and the KVM
/// probe): call it off an async runtime's workers.
pub fn diagnose() -> Vec<Check> {
    let mut checks = Vec::new();
    for t in crate::hosttools::TOOLS {
        match crate::hosttools::find(t.name) {
            Some(p) => checks.push(Check {
                name: t.name.to_string(),
                ok: true,
                status: Status::Ok,
                detail: p.display().to_string(),
                fix: None,
            }),
            None => checks.push(Check {
                name: t.name.to_string(),
                ok: false,
                status: Status::Missing,
                detail: t.purpose.to_string(),
                fix: Some(format!("sudo apt-get install {}", t.package)),
            }),
        }
    }
    if let Some(bb) = crate::hosttools::find("busybox") {
        if !crate::locate::is_static_elf(&bb) {
            checks.push(Check {
                name: "busybox (static)".into(),
                ok: false,
                status: Status::Missing,
                detail: format!(
                    "{} is dynamically linked; the initramfs needs a static busybox",
                    bb.display()
                ),
                fix: Some("sudo apt-get install busybox-static".into()),
            });
        }
    }
    for (name, r) in [
        (
            "guest agent",
            crate::locate::agent_binary().map_err(|e| e.to_string()),
        ),
        (
            "supervisor",
            crate::locate::supervisor_binary().map_err(|e| e.to_string()),
        ),
    ] {
        checks.push(match r {
            Ok(p) => Check {
                name: name.into(),
                ok: true,
                status: Status::Ok,
                detail: p.display().to_string(),
                fix: None,
            },
            Err(e) => Check {
                name: name.into(),
                ok: false,
                status: Status::Missing,
                detail: e,
                fix: None,
            },
        });
    }
    // KVM.
    let kvm = match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => Check { name: "/dev/kvm".into(), ok: true, status: Status::Ok, detail: "opens read-write (a probe boot decides whether it works)".into(), fix: None },
        Err(e) => Check {
            name: "/dev/kvm".into(),
            ok: true,
            status: Status::Warn,
            detail: format!("unusable ({e}); guests run under TCG emulation (slower)"),
            fix: Some("on bare metal or a VM with nested virtualization: `sudo modprobe kvm_intel` or `kvm_amd`, and add yourself to group kvm".into()),
        },
    };
    checks.push(kvm);
    let images = crate::image::list().unwrap_or_default();
    match images
        .iter()
        .find(|i| i.name == crate::config::DEFAULT_IMAGE)
    {
        Some(_) => {
            let img = crate::image::ensure(crate::config::DEFAULT_IMAGE, &mut |_| {});
            match img {
                Ok(img) => {
                    let requested = crate::Accel::from_env().unwrap_or(crate::Accel::Auto);
                    let v = crate::backend::get(crate::backend::BackendKind::default())
                        .resolve_accel(requested, &img.kernel, &img.initramfs);
                    checks.push(Check {
                        name: "accelerator".into(),
                        ok: true,
                        status: Status::Info,
                        detail: format!(
                            "{} ({}{})",
                            v.accel,
                            v.reason,
                            if v.cached { ", cached verdict" } else { "" }
                        ),
                        fix: None,
                    });
                }
                Err(e) => checks.push(Check {
                    name: "image".into(),
                    ok: true,
                    status: Status::Warn,
                    detail: e.to_string(),
                    fix: Some(format!(
                        "smolvm image build --force {}",
                        crate::config::DEFAULT_IMAGE
                    )),
                }),
            }
        }
        None => checks.push(Check {
            name: "image".into(),
            ok: true,
            status: Status::Warn,
            detail: format!(
                "{} is not built yet (the first run builds it, ~1-2 min)",
                crate::config::DEFAULT_IMAGE
            ),
            fix: Some(format!(
                "smolvm image build {}",
                crate::config::DEFAULT_IMAGE
            )),
        }),
    }
    for (name, dir) in [
        ("data dir", crate::paths::data_dir()),
        ("cache dir", crate::paths::cache_dir()),
    ] {
        let free = free_bytes(&dir);
        let gib = free.map(|b| b as f64 / (1u64 << 30) as f64);
        let low = gib.map(|g| g < 2.0).unwrap_or(false);
        checks.push(Check {
            name: name.into(),
            ok: true,
            status: if low { Status::Warn } else { Status::Ok },
            detail: format!(
                "{} ({} free)",
                dir.display(),
                gib.map(|g| format!("{g:.1} GiB"))
                    .unwrap_or_else(|| "unknown".into())
            ),
            fix: low.then(|| {
                "free some disk space (images need ~1 GiB, each VM its writes)".to_string()
            }),
        });
    }
    backend_checks(&mut checks);
    network_checks(&mut checks);
    checks
}
