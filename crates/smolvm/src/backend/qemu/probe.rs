//! Accelerator choice. `auto` must *probe*: a `/dev/kvm` that opens is no
//! proof that KVM runs a guest (nested KVM on these hosts aborts or crawls).
//! The probe boots the image's kernel + initramfs under KVM with a short
//! deadline and looks for the init's marker on the console. The verdict is
//! cached per (QEMU version, host kernel, kernel image).

use super::super::{AccelVerdict, ResolvedAccel};
use super::{probe_args, QEMU_BINARY};
use crate::config::Accel;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// A real KVM boots kernel → init in well under a second; a broken nested
/// KVM either aborts at once or crawls far past this.
const PROBE_DEADLINE: Duration = Duration::from_secs(8);
const PROBE_MARKER: &str = "SMOLVM-PROBE-OK";
const VERDICT_FILE: &str = "accel.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CachedVerdict {
    key: String,
    verdict: AccelVerdict,
}

fn kvm_usable_device() -> Result<(), String> {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err("/dev/kvm does not exist".into()),
        Err(e) => Err(format!("/dev/kvm cannot be opened: {e}")),
    }
}

fn cache_key(kernel: &Path) -> String {
    let qemu = crate::hosttools::command(QEMU_BINARY)
        .map_err(|e| std::io::Error::other(e.to_string()))
        .and_then(|mut c| c.arg("--version").output())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let kmeta = std::fs::metadata(kernel).map(|m| m.len()).unwrap_or(0);
    format!(
        "{}|{}|{}|{}",
        qemu.trim(),
        host.trim(),
        kernel.display(),
        kmeta
    )
}

/// Boots the probe under KVM. `Ok(elapsed)` when the marker appeared.
fn run_probe(kernel: &Path, initramfs: &Path) -> Result<Duration, String> {
    let dir = tempfile_dir().map_err(|e| format!("cannot create a probe directory: {e}"))?;
    let console = dir.path().join("console.log");
    let start = Instant::now();
    let mut cmd = crate::hosttools::command(QEMU_BINARY).map_err(|e| e.to_string())?;
    cmd.args(probe_args(ResolvedAccel::Kvm, kernel, initramfs, &console))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    super::confine_child(&mut cmd);
    // The probe ends with this thread's caller: never a QEMU left behind
    // (a KVM internal error pauses QEMU instead of ending it).
    crate::sys::die_with_parent(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {QEMU_BINARY}: {e}"))?;
    let result = loop {
        let seen = std::fs::read_to_string(&console)
            .map(|c| c.contains(PROBE_MARKER))
            .unwrap_or(false);
        if seen {
            break Ok(start.elapsed());
        }
        match child.try_wait() {
            Ok(Some(st)) => {
                // Read the console once more: the marker may have landed just before exit.
                if std::fs::read_to_string(&console)
                    .map(|c| c.contains(PROBE_MARKER))
                    .unwrap_or(false)
                {
                    break Ok(start.elapsed());
                }
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = (&mut e).take(4096).read_to_string(&mut err);
                }
                let first = err
                    .lines()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("")
                    .trim()
                    .to_string();
                break Err(format!("KVM probe boot failed ({st}): {first}"));
            }
            Ok(None) => {}
            Err(e) => break Err(format!("KVM probe wait failed: {e}")),
        }
        if start.elapsed() > PROBE_DEADLINE {
            let _ = child.kill();
            break Err(format!(
                "KVM probe boot did not reach init within {}s (nested KVM too slow or broken)",
                PROBE_DEADLINE.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    drop(dir);
    result
}

/// A fresh directory with an unpredictable name, created `0700` by us
/// (never one that already existed: another user could have planted it).
fn tempfile_dir() -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new().prefix("smolvm-probe-").tempdir()
}

/// Resolves `requested` to the accelerator to use. `Kvm` and `Tcg` are
/// honoured as asked; `Auto` probes once and caches the verdict.
pub fn resolve_accel(requested: Accel, kernel: &Path, initramfs: &Path) -> AccelVerdict {
    match requested {
        Accel::Tcg => {
            return AccelVerdict {
                accel: ResolvedAccel::Tcg,
                reason: "TCG requested".into(),
                cached: false,
            }
        }
        Accel::Kvm => {
            return AccelVerdict {
                accel: ResolvedAccel::Kvm,
                reason: "KVM requested".into(),
                cached: false,
            }
        }
        Accel::Auto => {}
    }
    if let Err(why) = kvm_usable_device() {
        return AccelVerdict {
            accel: ResolvedAccel::Tcg,
            reason: format!("{why}; using TCG"),
            cached: false,
        };
    }
    let cache = crate::paths::cache_dir().join(VERDICT_FILE);
    let key = cache_key(kernel);
    if let Some(c) = std::fs::read(&cache)
        .ok()
        .and_then(|b| serde_json::from_slice::<CachedVerdict>(&b).ok())
        .filter(|c| c.key == key)
    {
        return AccelVerdict {
            cached: true,
            ..c.verdict
        };
    }
    let verdict = match run_probe(kernel, initramfs) {
        Ok(t) => AccelVerdict {
            accel: ResolvedAccel::Kvm,
            reason: format!("KVM probe boot reached init in {} ms", t.as_millis()),
            cached: false,
        },
        Err(why) => AccelVerdict {
            accel: ResolvedAccel::Tcg,
            reason: format!("{why}; using TCG"),
            cached: false,
        },
    };
    let record = CachedVerdict {
        key,
        verdict: verdict.clone(),
    };
    if let Ok(bytes) = serde_json::to_vec_pretty(&record) {
        let _ = crate::private::dir_all(&crate::paths::cache_dir());
        let _ = crate::private::write_atomic(&cache, &bytes);
    }
    verdict
}

/// Forgets the cached verdict (the next `auto` start probes again).
pub fn forget_cached_verdict() {
    let _ = std::fs::remove_file(crate::paths::cache_dir().join(VERDICT_FILE));
}
