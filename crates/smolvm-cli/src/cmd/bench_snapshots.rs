//! `smolvm bench`, snapshot section: warm vs cold starts, restore vs cold
//! create, snapshot cost by guest size, fork fan-out and its memory, and
//! how many forks stay alive at once.

use serde::Serialize;
use smolvm::sandbox::{RestoreOptions, SnapshotOptions};
use smolvm::{Sandbox, SandboxConfig};
use std::time::{Duration, Instant};

#[derive(Serialize, Default, Clone)]
pub struct SnapBench {
    /// `smolvm run -- true`, whole process, from the warm boot snapshot.
    pub run_true_warm_ms: Vec<f64>,
    /// `smolvm run --cold -- true`, same run, interleaved.
    pub run_true_cold_ms: Vec<f64>,
    /// Restore into a new VM -> first output of `true`.
    pub restore_to_first_output_ms: Vec<f64>,
    /// Cold create -> start -> first output of `true`, interleaved.
    pub cold_create_to_first_output_ms: Vec<f64>,
    /// Snapshot of a fresh running VM, by guest memory (MiB).
    pub snapshot: Vec<SnapCost>,
    /// Wall time of `fork --count 10` from a snapshot.
    pub fork10_ms: f64,
    /// One restore into a new VM (ready), same snapshot, median.
    pub one_restore_ms: f64,
    /// Each child's private guest memory (MiB) after running `true`: the
    /// pages of its RAM mapping it has written (Private_Dirty), median.
    pub fork_child_private_ram_mib: f64,
    /// A cold-booted VM's resident guest RAM (MiB) after running `true`.
    pub cold_vm_ram_mib: f64,
    /// Forked sandboxes alive at once, each answering a ping within 1 s.
    pub density_alive: Option<usize>,
    pub density_tried: Option<usize>,
    pub density_note: Option<String>,
}

#[derive(Serialize, Default, Clone)]
pub struct SnapCost {
    pub memory_mib: u32,
    pub total_ms: f64,
    /// State + RAM + disk layer bytes written.
    pub bytes: u64,
}

use super::bench::{median, ms};

async fn wall(args: &[&str]) -> anyhow::Result<f64> {
    let exe = std::env::current_exe()?;
    let t = Instant::now();
    let out = tokio::process::Command::new(exe)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "`smolvm {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(ms(t.elapsed()))
}

/// KiB of a field summed over the mappings of `pid` whose path contains
/// `path_part` (the guest RAM mapping).
fn mapping_kib(pid: u32, path_part: &str, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut inside = false;
    let mut total = 0;
    for l in s.lines() {
        let first = l.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            inside = l.contains(path_part);
            continue;
        }
        if inside && l.starts_with(field) {
            total += l
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

fn cfg(memory_mib: u32, cold: bool) -> SandboxConfig {
    SandboxConfig {
        memory_mib,
        cold,
        network: false,
        ..SandboxConfig::default()
    }
}

pub async fn run(boots: usize, density: usize) -> anyhow::Result<SnapBench> {
    let mut b = SnapBench::default();
    let boot = Duration::from_secs(120);
    // The warm snapshot of the default shape exists after the first run.
    wall(&["run", "--", "true"]).await?;
    for _ in 0..boots {
        b.run_true_warm_ms.push(wall(&["run", "--", "true"]).await?);
        b.run_true_cold_ms
            .push(wall(&["run", "--cold", "--", "true"]).await?);
    }

    eprintln!("bench: restore -> first command vs cold create -> first command ...");
    let src = Sandbox::create(cfg(512, true)).await?;
    src.start(boot).await?;
    let name = format!("bench-{}", src.id());
    let snap = src
        .snapshot(&SnapshotOptions {
            name: Some(name.clone()),
            resume: true,
            disk_only: false,
        })
        .await?;
    b.snapshot.push(SnapCost {
        memory_mib: 512,
        total_ms: 0.0,
        bytes: snap.size_bytes,
    });
    let mut restores = Vec::new();
    for _ in 0..boots {
        let t = Instant::now();
        let vm = Sandbox::restore_snapshot(
            &name,
            &RestoreOptions {
                into: Some(format!("bench-r-{}", std::process::id())),
                ..RestoreOptions::default()
            },
            None,
        )
        .await?;
        let ready = ms(t.elapsed());
        anyhow::ensure!(vm.run("true").await?.ok(), "`true` failed after a restore");
        b.restore_to_first_output_ms.push(ms(t.elapsed()));
        restores.push(ready);
        vm.delete().await?;
        let t = Instant::now();
        let vm = Sandbox::create(cfg(512, true)).await?;
        vm.start(boot).await?;
        anyhow::ensure!(vm.run("true").await?.ok(), "`true` failed");
        b.cold_create_to_first_output_ms.push(ms(t.elapsed()));
        if b.cold_vm_ram_mib == 0.0 {
            if let Some(pid) = vm.info().await?.vmm_pid {
                let dir = vm.vm_dir().display().to_string();
                #[allow(clippy::cast_precision_loss)]
                let mib = mapping_kib(pid, &format!("{dir}/memory"), "Rss:") as f64 / 1024.0;
                b.cold_vm_ram_mib = mib;
            }
        }
        vm.delete().await?;
    }
    b.one_restore_ms = median(&restores);

    eprintln!("bench: fork of 10 ...");
    let t = Instant::now();
    let kids = Sandbox::fork_snapshot(&name, 10, None).await?;
    b.fork10_ms = ms(t.elapsed());
    let mut private = Vec::new();
    for k in &kids {
        anyhow::ensure!(k.run("true").await?.ok(), "`true` failed in a fork");
    }
    for k in &kids {
        if let Some(pid) = k.info().await?.vmm_pid {
            #[allow(clippy::cast_precision_loss)]
            private.push(
                mapping_kib(pid, &snap.dir.display().to_string(), "Private_Dirty:") as f64 / 1024.0,
            );
        }
    }
    b.fork_child_private_ram_mib = median(&private);
    for k in kids {
        k.delete().await?;
    }

    if density > 0 {
        eprintln!("bench: up to {density} forks alive at once ...");
        let mut alive = Vec::new();
        let mut note = None;
        'outer: while alive.len() < density {
            let n = (density - alive.len()).min(10);
            let n = u32::try_from(n).unwrap_or(10);
            match Sandbox::fork_snapshot(&name, n, None).await {
                Ok(v) => alive.extend(v),
                Err(e) => {
                    note = Some(format!("fork failed at {}: {e}", alive.len()));
                    break 'outer;
                }
            }
        }
        let mut answering = 0;
        for vm in &alive {
            if matches!(
                tokio::time::timeout(Duration::from_secs(1), vm.ping()).await,
                Ok(Ok(_))
            ) {
                answering += 1;
            }
        }
        b.density_alive = Some(answering);
        b.density_tried = Some(alive.len());
        b.density_note = note;
        for vm in alive {
            let _ = vm.delete().await;
        }
    }
    src.delete().await?;
    let _ = smolvm::sandbox::delete_snapshot(&name).await;

    eprintln!("bench: snapshot time and size for 512 MiB and 2 GiB guests ...");
    b.snapshot.clear();
    for mem in [512u32, 2048] {
        let vm = Sandbox::create(cfg(mem, true)).await?;
        vm.start(boot).await?;
        // Touch some memory so the snapshot has RAM to write.
        vm.run("head -c 64M /dev/urandom > /dev/shm/fill").await?;
        let t = Instant::now();
        let s = vm
            .snapshot(&SnapshotOptions {
                name: None,
                resume: true,
                disk_only: false,
            })
            .await?;
        b.snapshot.push(SnapCost {
            memory_mib: mem,
            total_ms: ms(t.elapsed()),
            bytes: s.size_bytes,
        });
        vm.delete().await?;
        smolvm::sandbox::delete_snapshot(&s.id).await?;
    }
    Ok(b)
}

pub fn print(b: &SnapBench, row: &dyn Fn(&str, String)) {
    let (w, c) = (median(&b.run_true_warm_ms), median(&b.run_true_cold_ms));
    row("`smolvm run -- true`, warm (ms, median)", format!("{w:.0}"));
    row(
        "`smolvm run --cold -- true` (ms, median)",
        format!("{c:.0}"),
    );
    row("  cold / warm", format!("{:.1}x", c / w.max(1e-6)));
    let (r, cc) = (
        median(&b.restore_to_first_output_ms),
        median(&b.cold_create_to_first_output_ms),
    );
    row("restore -> first output (ms, median)", format!("{r:.0}"));
    row(
        "cold create -> first output (ms, median)",
        format!("{cc:.0}"),
    );
    row("  cold / restore", format!("{:.1}x", cc / r.max(1e-6)));
    for s in &b.snapshot {
        #[allow(clippy::cast_precision_loss)]
        let mib = s.bytes as f64 / (1024.0 * 1024.0);
        row(
            &format!("snapshot, {} MiB guest (ms)", s.memory_mib),
            format!("{:.0}", s.total_ms),
        );
        row(
            &format!("snapshot, {} MiB guest (MiB written)", s.memory_mib),
            format!("{mib:.1}"),
        );
    }
    row("fork of 10 (ms)", format!("{:.0}", b.fork10_ms));
    row(
        "  one restore (ms, median)",
        format!("{:.0}", b.one_restore_ms),
    );
    row(
        "  fork of 10 / one restore",
        format!("{:.1}x", b.fork10_ms / b.one_restore_ms.max(1e-6)),
    );
    row(
        "fork child private guest RAM (MiB)",
        format!("{:.1}", b.fork_child_private_ram_mib),
    );
    row(
        "cold VM resident guest RAM (MiB)",
        format!("{:.1}", b.cold_vm_ram_mib),
    );
    if let (Some(a), Some(t)) = (b.density_alive, b.density_tried) {
        row("forks alive, answering ping < 1 s", format!("{a}/{t}"));
    }
}
