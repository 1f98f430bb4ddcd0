//! `smolvm doctor`: checks every host requirement and says how to fix each.

use serde::Serialize;
use smolvm::hosttools;

#[derive(clap::Args)]
pub struct DoctorArgs {
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Check {
    name: String,
    ok: bool,
    /// "ok", "missing", "warn", "info".
    status: &'static str,
    detail: String,
    fix: Option<String>,
}

fn free_bytes(path: &std::path::Path) -> Option<u64> {
    let mut p = path.to_path_buf();
    while !p.exists() {
        p = p.parent()?.to_path_buf();
    }
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs writes into a zeroed struct we own; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

pub async fn doctor(a: DoctorArgs) -> anyhow::Result<u8> {
    let mut checks = Vec::new();
    for t in hosttools::TOOLS {
        match hosttools::find(t.name) {
            Some(p) => checks.push(Check {
                name: t.name.to_string(),
                ok: true,
                status: "ok",
                detail: p.display().to_string(),
                fix: None,
            }),
            None => checks.push(Check {
                name: t.name.to_string(),
                ok: false,
                status: "missing",
                detail: t.purpose.to_string(),
                fix: Some(format!("sudo apt-get install {}", t.package)),
            }),
        }
    }
    if let Some(bb) = hosttools::find("busybox") {
        if !smolvm::locate::is_static_elf(&bb) {
            checks.push(Check {
                name: "busybox (static)".into(),
                ok: false,
                status: "missing",
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
            smolvm::locate::agent_binary().map_err(|e| e.to_string()),
        ),
        (
            "supervisor",
            smolvm::locate::supervisor_binary().map_err(|e| e.to_string()),
        ),
    ] {
        checks.push(match r {
            Ok(p) => Check {
                name: name.into(),
                ok: true,
                status: "ok",
                detail: p.display().to_string(),
                fix: None,
            },
            Err(e) => Check {
                name: name.into(),
                ok: false,
                status: "missing",
                detail: e,
                fix: None,
            },
        });
    }
    // KVM.
    let kvm = match std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => Check { name: "/dev/kvm".into(), ok: true, status: "ok", detail: "opens read-write (a probe boot decides whether it works)".into(), fix: None },
        Err(e) => Check {
            name: "/dev/kvm".into(),
            ok: true,
            status: "warn",
            detail: format!("unusable ({e}); guests run under TCG emulation (slower)"),
            fix: Some("on bare metal or a VM with nested virtualization: `sudo modprobe kvm_intel` or `kvm_amd`, and add yourself to group kvm".into()),
        },
    };
    checks.push(kvm);
    let images = smolvm::image::list().unwrap_or_default();
    match images
        .iter()
        .find(|i| i.name == smolvm::config::DEFAULT_IMAGE)
    {
        Some(_) => {
            let img = tokio::task::spawn_blocking(|| {
                smolvm::image::ensure(smolvm::config::DEFAULT_IMAGE, &mut |_| {})
            })
            .await?;
            match img {
                Ok(img) => {
                    let requested = smolvm::Accel::from_env()?;
                    let v = tokio::task::spawn_blocking(move || {
                        smolvm::backend::qemu::resolve_accel(requested, &img.kernel, &img.initramfs)
                    })
                    .await?;
                    checks.push(Check {
                        name: "accelerator".into(),
                        ok: true,
                        status: "info",
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
                    ok: false,
                    status: "warn",
                    detail: e.to_string(),
                    fix: Some(format!(
                        "smolvm image build --force {}",
                        smolvm::config::DEFAULT_IMAGE
                    )),
                }),
            }
        }
        None => checks.push(Check {
            name: "image".into(),
            ok: true,
            status: "warn",
            detail: format!(
                "{} is not built yet (the first run builds it, ~1-2 min)",
                smolvm::config::DEFAULT_IMAGE
            ),
            fix: Some(format!(
                "smolvm image build {}",
                smolvm::config::DEFAULT_IMAGE
            )),
        }),
    }
    for (name, dir) in [
        ("data dir", smolvm::paths::data_dir()),
        ("cache dir", smolvm::paths::cache_dir()),
    ] {
        let free = free_bytes(&dir);
        let gib = free.map(|b| b as f64 / (1u64 << 30) as f64);
        let low = gib.map(|g| g < 2.0).unwrap_or(false);
        checks.push(Check {
            name: name.into(),
            ok: !low,
            status: if low { "warn" } else { "ok" },
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
    let all_ok = checks.iter().all(|c| c.ok);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        for c in &checks {
            println!("{:<8} {:<20} {}", c.status, c.name, c.detail);
            if let Some(f) = &c.fix {
                println!("{:<8} {:<20} fix: {f}", "", "");
            }
        }
        println!(
            "{}",
            if all_ok {
                "\nall required host tools are present"
            } else {
                "\nsome requirements are missing (see fix lines)"
            }
        );
    }
    Ok(if all_ok { 0 } else { 1 })
}
