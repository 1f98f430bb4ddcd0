//! `smolvm bench`: the benchmark harness. Prints a table and writes JSON.
//! Numbers are compared side by side in one run (ratios), never asserted.

use serde::Serialize;
use smolvm::{ExecOptions, Sandbox, SandboxConfig};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Also measure a cold image build (rebuilds the image: ~1-2 minutes).
    #[arg(long)]
    cold: bool,
    /// Exec round trips to time.
    #[arg(long, default_value_t = 200)]
    iterations: usize,
    /// Create+start+first-command repetitions.
    #[arg(long, default_value_t = 3)]
    boots: usize,
    /// VM counts for the parallel create+start+first-command runs.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    parallel: Vec<usize>,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench/results.json")]
    out: std::path::PathBuf,
    /// The floor script (bare QEMU boot, raw virtio-serial echo), run in
    /// the same run so ratios compare like with like. Default:
    /// `$SMOLVM_FLOOR`, else `shared/tools/floor/floor.sh` beside the
    /// repository this binary was built in (found from its own path, never
    /// from the current directory).
    #[arg(long)]
    floor: Option<std::path::PathBuf>,
    /// A Python with the SDK installed, for the binding's figures. Default:
    /// `$SMOLVM_PYTHON`, else `python3` (skipped, with the reason, when it
    /// cannot import smolvm).
    #[arg(long)]
    python: Option<std::path::PathBuf>,
    /// Forked sandboxes to keep alive at once for the density figure
    /// (0: not measured; ~60 MiB of host memory each).
    #[arg(long, default_value_t = 0)]
    density: usize,
    /// Only the snapshot section (warm/cold starts, restore, fork).
    #[arg(long)]
    snapshots_only: bool,
    /// Only the network section (agent vs SSH exec, forward throughput,
    /// connection set-up).
    #[arg(long)]
    network_only: bool,
}

/// The Python SDK next to the library, measured in the same run.
#[derive(Serialize, Default, Clone)]
struct PyBench {
    /// `vm.run(["true"], timeout=None)` round trip through the SDK, on the
    /// VM the library's `exec_true_rtt_ms` was measured on.
    run_true_rtt_ms: Stats,
    /// The library's own round trip in blocks interleaved with the SDK's
    /// (same VM, same moments).
    library_rtt_after_ms: Stats,
    /// `python -c 'with SmolVM() as vm: vm.run("true")'`, whole process.
    with_run_true_ms: Vec<f64>,
    /// `smolvm run -- true`, whole process.
    cli_run_true_ms: Vec<f64>,
    note: Option<String>,
}

/// Reads block sizes from stdin, runs that many round trips and prints
/// their times (ms) as one JSON line: the harness interleaves these blocks
/// with the library's own, so drift on a shared host hits both alike.
const PY_RTT: &str = r#"
import json, sys, time
from smolvm import SmolVM
vm = SmolVM.from_id(sys.argv[1])
for _ in range(10):
    vm.run(["true"], timeout=None)
print("ready", flush=True)
for line in sys.stdin:
    out = []
    for _ in range(int(line)):
        t = time.perf_counter()
        r = vm.run(["true"], timeout=None)
        out.append((time.perf_counter() - t) * 1000)
        assert r.ok
    print(json.dumps(out), flush=True)
vm.close()
"#;

/// Round trips per interleaved block.
const PY_BLOCK: usize = 20;

const PY_WITH: &str = r#"
from smolvm import SmolVM
with SmolVM() as vm:
    assert vm.run("true").ok
"#;

fn python_for(arg: Option<std::path::PathBuf>) -> std::path::PathBuf {
    arg.or_else(|| std::env::var_os("SMOLVM_PYTHON").map(Into::into))
        .unwrap_or_else(|| "python3".into())
}

async fn wall_of(cmd: &mut tokio::process::Command) -> anyhow::Result<f64> {
    let t = Instant::now();
    let out = cmd
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .output()
        .await?;
    let took = ms(t.elapsed());
    anyhow::ensure!(
        out.status.success(),
        "{:?} failed: {}",
        cmd.as_std().get_program(),
        smolvm::text::escape_multiline(String::from_utf8_lossy(&out.stderr).trim())
    );
    Ok(took)
}

async fn next_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) -> anyhow::Result<String> {
    lines
        .next_line()
        .await?
        .ok_or_else(|| anyhow::anyhow!("the Python round-trip script ended early"))
}

async fn python_bench(
    py: &std::path::Path,
    vm: &Sandbox,
    iterations: usize,
    boots: usize,
) -> anyhow::Result<PyBench> {
    let mut b = PyBench::default();
    let probe = tokio::process::Command::new(py)
        .args(["-c", "import smolvm._native"])
        .output()
        .await;
    match probe {
        Ok(o) if o.status.success() => {}
        Ok(_) | Err(_) => {
            b.note = Some(format!(
                "{} cannot import smolvm (scripts/python-sdk.sh installs it into .venv; pass --python .venv/bin/python)",
                py.display()
            ));
            return Ok(b);
        }
    }
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut child = tokio::process::Command::new(py)
        .kill_on_drop(true)
        .args(["-c", PY_RTT, vm.id()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()?;
    let mut to_py = child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?;
    let mut from_py = tokio::io::BufReader::new(
        child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?,
    )
    .lines();
    anyhow::ensure!(
        next_line(&mut from_py).await? == "ready",
        "the Python round-trip script did not start"
    );
    let argv = smolvm::Command::Argv(vec!["true".into()]);
    let (mut lib, mut python) = (Vec::new(), Vec::new());
    while python.len() < iterations {
        let n = PY_BLOCK.min(iterations - python.len());
        for _ in 0..n {
            let t = Instant::now();
            vm.exec(argv.clone(), &ExecOptions::default()).await?;
            lib.push(ms(t.elapsed()));
        }
        to_py.write_all(format!("{n}\n").as_bytes()).await?;
        let block: Vec<f64> = serde_json::from_str(&next_line(&mut from_py).await?)?;
        python.extend(block);
    }
    drop(to_py);
    let _ = child.wait().await;
    b.run_true_rtt_ms = stats(python);
    b.library_rtt_after_ms = stats(lib);
    let cli = std::env::current_exe()?;
    for _ in 0..boots.max(1) {
        b.with_run_true_ms
            .push(wall_of(tokio::process::Command::new(py).args(["-c", PY_WITH])).await?);
        b.cli_run_true_ms
            .push(wall_of(tokio::process::Command::new(&cli).args(["run", "--", "true"])).await?);
    }
    Ok(b)
}

/// The floors smolvm's figures are judged against, measured on this host
/// in this run.
#[derive(Serialize, Default, Clone)]
struct Floors {
    /// Bare QEMU (same machine type, TCG) booting our kernel to an init
    /// that powers off at once, median ms.
    boot_ms: Option<f64>,
    /// Round trip of 24 bytes through a raw virtio-serial port to a static
    /// C echo server in the guest, median / p99 ms.
    channel_median_ms: Option<f64>,
    channel_p99_ms: Option<f64>,
    /// Why they are missing, when they are.
    note: Option<String>,
}

fn floor_script(arg: Option<std::path::PathBuf>) -> Option<std::path::PathBuf> {
    arg.or_else(|| std::env::var_os("SMOLVM_FLOOR").map(Into::into))
        .or_else(|| {
            // <repo>/target/<profile>/smolvm -> <repo>/../shared/...
            let exe = std::env::current_exe().ok()?;
            let repo = exe.parent()?.parent()?.parent()?;
            let p = repo.parent()?.join("shared/tools/floor/floor.sh");
            use std::os::unix::fs::MetadataExt;
            // Only a script of ours or root's that nobody else can change.
            let m = std::fs::symlink_metadata(&p).ok()?;
            let me = std::fs::metadata(&exe).ok()?.uid();
            let trusted = m.is_file() && (m.uid() == me || m.uid() == 0) && m.mode() & 0o022 == 0;
            trusted.then_some(p)
        })
}

/// The number after `word` in `line` (`median 12.3 ms` -> 12.3).
fn number_after(line: &str, word: &str) -> Option<f64> {
    let mut it = line.split_whitespace();
    it.find(|w| *w == word)?;
    it.next()?.parse().ok()
}

async fn measure_floors(script: Option<std::path::PathBuf>) -> Floors {
    let Some(script) = script else {
        return Floors {
            note: Some("floor script not found (pass --floor PATH)".into()),
            ..Floors::default()
        };
    };
    let out = tokio::process::Command::new("bash")
        .arg(&script)
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    let out = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => {
            return Floors {
                note: Some(format!(
                    "{} failed ({}): {}",
                    script.display(),
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                )),
                ..Floors::default()
            }
        }
        Err(e) => {
            return Floors {
                note: Some(format!("cannot run {}: {e}", script.display())),
                ..Floors::default()
            }
        }
    };
    let mut f = Floors::default();
    for line in out.lines() {
        if line.starts_with("boot floor") {
            f.boot_ms = number_after(line, "median");
        } else if line.starts_with("channel floor") {
            f.channel_median_ms = number_after(line, "median");
            f.channel_p99_ms = number_after(line, "p99");
        }
    }
    f
}

#[derive(Serialize, Default)]
struct Results {
    accel: String,
    host_cpus: usize,
    image_build_cold_s: Option<f64>,
    image_build_cached_s: f64,
    create_to_first_output_ms: Vec<f64>,
    boot_vmm_start_ms: Vec<f64>,
    boot_kernel_to_agent_ms: Vec<f64>,
    boot_agent_ready_ms: Vec<f64>,
    exec_true_rtt_ms: Stats,
    ping_rtt_ms: Stats,
    pause_ms: Stats,
    resume_ms: Stats,
    stop_ms: Stats,
    start_stopped_ms: Stats,
    parallel: Vec<Parallel>,
    surface: Surface,
    floors: Floors,
    load: Option<Load>,
    python: Option<PyBench>,
    snapshots: Option<super::bench_snapshots::SnapBench>,
    network: Option<super::bench_network::NetBench>,
}

/// The agent surface, on the exec VM.
#[derive(Serialize, Default, Clone)]
struct Surface {
    /// The guest's own fork+exec+wait of `/bin/true` (bash loop, in the
    /// guest, same run), ms per iteration.
    guest_fork_exec_true_ms: f64,
    /// exec `true` median minus that: the agent's and the host's share.
    agent_overhead_ms: f64,
    /// 10 execs of `true` started at once: wall from the first request to
    /// the last exit.
    concurrent10_wall_ms: f64,
    /// Upload / download of 100 MiB (random bytes), MiB/s.
    upload_mib_s: f64,
    download_mib_s: f64,
    /// `cat > /dev/null` of 100 MiB through exec stdin, and `cat` of it out
    /// through stdout, MiB/s: the channel with a process at the end.
    stdin_mib_s: f64,
    stdout_mib_s: f64,
    /// A key typed on a PTY running `cat` until its echo comes back.
    pty_echo_ms: Stats,
}

/// Starts under load: `idle` VMs running, then as many more started at
/// once with the default boot timeout.
#[derive(Serialize, Default, Clone)]
struct Load {
    idle: usize,
    /// CPU of one idle VM (VMM + network helpers), % of one core.
    idle_cpu_pct_per_vm: f64,
    /// Wall time for the second batch to be created, started and answer.
    wall_ms: f64,
    /// How many of the second batch failed (missed the boot timeout).
    failed: usize,
}

#[derive(Serialize, Default, Clone)]
struct Parallel {
    vms: usize,
    /// Wall time for all VMs to be created, started and answer a command.
    wall_ms: f64,
    /// Per-VM host memory of supervisor + VMM + network helpers (mean), in MiB.
    rss_mib: f64,
    pss_mib: f64,
}

/// (RSS, PSS) of a process in KiB, from /proc/<pid>/smaps_rollup.
fn mem_kib(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("Rss:"), field("Pss:"))
}

/// CPU ticks (user + system) used so far by `pid`.
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest: Vec<&str> = s[s.rfind(')')? + 1..].split_whitespace().collect();
            // rest[0] is field 3 (state): utime is field 14, stime 15.
            Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

async fn under_load(n: usize) -> anyhow::Result<Load> {
    let config = || SandboxConfig {
        memory_mib: 256,
        ..SandboxConfig::default()
    };
    let mut idle = Vec::new();
    let r = async {
        let mut starts = tokio::task::JoinSet::new();
        for _ in 0..n {
            let vm = Sandbox::create(config()).await?;
            starts.spawn(async move {
                let r = vm.start(Duration::from_secs(600)).await;
                (vm, r)
            });
        }
        // Every VM is kept for the delete below, whatever failed.
        let mut first_err = None;
        while let Some(j) = starts.join_next().await {
            match j {
                Ok((vm, r)) => {
                    idle.push(vm);
                    if let Err(e) = r {
                        first_err.get_or_insert(anyhow::Error::from(e));
                    }
                }
                Err(e) => {
                    first_err.get_or_insert(e.into());
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        // Settle, then measure what idle VMs cost.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let mut pids = Vec::new();
        for vm in &idle {
            let info = vm.info().await?;
            if let Some(sup) = info.supervisor_pid {
                pids.extend(children_of(sup));
            }
        }
        let before: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
        let t = Instant::now();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let used: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum::<u64>() - before;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let idle_cpu_pct_per_vm = used as f64 / hz / t.elapsed().as_secs_f64() * 100.0 / n as f64;
        // The second batch, with the default boot timeout.
        let t = Instant::now();
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..n {
            batch.spawn(async move {
                let vm = Sandbox::create(config()).await?;
                let ok = async {
                    vm.start(smolvm::sandbox::DEFAULT_BOOT_TIMEOUT).await?;
                    Ok::<_, smolvm::Error>(vm.run("true").await?.ok())
                }
                .await;
                vm.delete().await?;
                Ok::<_, smolvm::Error>(ok.unwrap_or(false))
            });
        }
        // Each task deletes its own VM; a task that fails counts as a miss.
        let mut failed = 0;
        while let Some(j) = batch.join_next().await {
            if !matches!(j, Ok(Ok(true))) {
                failed += 1;
            }
        }
        Ok::<_, anyhow::Error>(Load {
            idle: n,
            idle_cpu_pct_per_vm,
            wall_ms: ms(t.elapsed()),
            failed,
        })
    }
    .await;
    let mut del_err = None;
    for vm in idle {
        if let Err(e) = vm.delete().await {
            del_err.get_or_insert(e);
        }
    }
    let load = r?;
    match del_err {
        Some(e) => Err(e.into()),
        None => Ok(load),
    }
}

/// The pids whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = &s[s.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

async fn parallel_boot(n: usize) -> anyhow::Result<Parallel> {
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        tasks.spawn(async move {
            let vm = Sandbox::create(SandboxConfig {
                memory_mib: 256,
                ..SandboxConfig::default()
            })
            .await?;
            let r = async {
                vm.start(Duration::from_secs(600)).await?;
                anyhow::ensure!(vm.run("true").await?.ok(), "`true` failed");
                Ok(())
            }
            .await;
            Ok::<_, anyhow::Error>((vm, r))
        });
    }
    let mut vms = Vec::new();
    let mut first_err = None;
    while let Some(j) = tasks.join_next().await {
        let (vm, r) = j??;
        if let Err(e) = r {
            first_err.get_or_insert(e);
        }
        vms.push(vm);
    }
    let wall_ms = ms(t.elapsed());
    let (mut rss, mut pss) = (0u64, 0u64);
    for vm in &vms {
        let info = vm.info().await?;
        // The supervisor, the VMM and the network helpers (the
        // supervisor's other children: passt, pasta).
        let mut pids: Vec<u32> = [info.vmm_pid, info.supervisor_pid]
            .into_iter()
            .flatten()
            .collect();
        if let Some(sup) = info.supervisor_pid {
            pids.extend(
                children_of(sup)
                    .into_iter()
                    .filter(|p| Some(*p) != info.vmm_pid),
            );
        }
        for pid in pids {
            let (r, p) = mem_kib(pid);
            rss += r;
            pss += p;
        }
    }
    for vm in vms {
        vm.delete().await?;
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    Ok(Parallel {
        vms: n,
        wall_ms,
        rss_mib: rss as f64 / 1024.0 / n as f64,
        pss_mib: pss as f64 / 1024.0 / n as f64,
    })
}

#[derive(Serialize, Default, Clone)]
pub(super) struct Stats {
    pub n: usize,
    pub median: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

pub(super) fn stats(mut v: Vec<f64>) -> Stats {
    if v.is_empty() {
        return Stats::default();
    }
    v.sort_by(|a, b| a.total_cmp(b));
    // The index of quantile q (0..=1) among n sorted samples.
    let pick = |q: f64| {
        let last = v.len() - 1;
        let i = (0..=last)
            .min_by(|a, b| {
                let da = (*a as f64 - last as f64 * q).abs();
                let db = (*b as f64 - last as f64 * q).abs();
                da.total_cmp(&db)
            })
            .unwrap_or(last);
        v[i]
    };
    Stats {
        n: v.len(),
        median: pick(0.5),
        p99: pick(0.99),
        min: v[0],
        max: v[v.len() - 1],
    }
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub(super) fn median(v: &[f64]) -> f64 {
    stats(v.to_vec()).median
}

async fn surface(vm: &Sandbox, exec_median_ms: f64) -> anyhow::Result<Surface> {
    use smolvm::sandbox::ExecEvent;
    let mut s = Surface::default();
    // The guest's own cost of running `true`, measured in the guest.
    let out = vm
        .exec(
            smolvm::Command::Argv(vec![
                "bash".into(),
                "-c".into(),
                "TIMEFORMAT=%R; time (for i in $(seq 200); do /bin/true; done)".into(),
            ]),
            &ExecOptions::default(),
        )
        .await?;
    let secs: f64 = String::from_utf8_lossy(&out.stderr)
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("the guest's timing: {e}"))?;
    s.guest_fork_exec_true_ms = secs * 1000.0 / 200.0;
    s.agent_overhead_ms = exec_median_ms - s.guest_fork_exec_true_ms;

    let t = Instant::now();
    let mut streams = Vec::new();
    for _ in 0..10 {
        streams.push(
            vm.exec_stream(
                smolvm::Command::Argv(vec!["true".into()]),
                &ExecOptions::default(),
            )
            .await?,
        );
    }
    for mut st in streams {
        while let Some(ev) = st.next().await? {
            if matches!(ev, ExecEvent::Exited(_) | ExecEvent::Failed(_)) {
                break;
            }
        }
    }
    s.concurrent10_wall_ms = ms(t.elapsed());

    const MIB: usize = 1024 * 1024;
    let size = 100 * MIB;
    let path = std::env::temp_dir().join(format!("smolvm-bench-{}.bin", std::process::id()));
    let back = path.with_extension("back");
    let mut data = vec![0u8; size];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for c in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    std::fs::write(&path, &data)?;
    #[allow(clippy::cast_precision_loss)] // a rate
    let rate = |d: Duration| (size / MIB) as f64 / d.as_secs_f64().max(1e-9);
    let t = Instant::now();
    vm.upload_file(&path, "/root/bench.bin", false).await?;
    s.upload_mib_s = rate(t.elapsed());
    let t = Instant::now();
    vm.download_file("/root/bench.bin", &back, false, None)
        .await?;
    s.download_mib_s = rate(t.elapsed());
    anyhow::ensure!(std::fs::read(&back)? == data, "the downloaded file differs");
    let _ = std::fs::remove_file(&back);
    let _ = std::fs::remove_file(&path);
    let t = Instant::now();
    let o = vm
        .exec(
            smolvm::Command::Shell("cat > /dev/null".into()),
            &ExecOptions {
                stdin: Some(data),
                ..Default::default()
            },
        )
        .await?;
    anyhow::ensure!(o.ok(), "cat of stdin failed");
    s.stdin_mib_s = rate(t.elapsed());
    let t = Instant::now();
    let mut st = vm
        .exec_stream(
            smolvm::Command::Argv(vec!["cat".into(), "/root/bench.bin".into()]),
            &ExecOptions::default(),
        )
        .await?;
    let mut got = 0usize;
    while let Some(ev) = st.next().await? {
        match ev {
            ExecEvent::Stdout(b) => got += b.len(),
            ExecEvent::Exited(_) | ExecEvent::Failed(_) => break,
            _ => {}
        }
    }
    anyhow::ensure!(got == size, "cat gave {got} of {size} bytes");
    s.stdout_mib_s = rate(t.elapsed());
    vm.remove("/root/bench.bin", false).await?;

    // A keystroke on a terminal and its echo.
    let mut st = vm
        .exec_stream(
            smolvm::Command::Argv(vec!["cat".into()]),
            &ExecOptions {
                pty: Some((24, 80)),
                ..Default::default()
            },
        )
        .await?;
    let mut echo = Vec::new();
    for i in 0..60u8 {
        let key = [b'a' + i % 26];
        let t = Instant::now();
        st.write_stdin(&key).await?;
        loop {
            match st.next().await? {
                Some(ExecEvent::Stdout(b)) if b.contains(&key[0]) => break,
                Some(ExecEvent::Stdout(_) | ExecEvent::Started { .. }) => {}
                other => anyhow::bail!("the PTY ended: {other:?}"),
            }
        }
        if i >= 10 {
            echo.push(ms(t.elapsed()));
        }
    }
    drop(st);
    s.pty_echo_ms = stats(echo);
    Ok(s)
}

pub async fn bench(a: BenchArgs) -> anyhow::Result<u8> {
    let mut r = Results {
        host_cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        ..Default::default()
    };
    let name = smolvm::config::DEFAULT_IMAGE.to_string();
    let floor = floor_script(a.floor.clone());
    if a.cold {
        eprintln!("bench: cold image build ...");
        let n = name.clone();
        let t = Instant::now();
        tokio::task::spawn_blocking(move || {
            smolvm::image::build(
                &n,
                &smolvm::image::BuildOptions { force: true },
                &mut |_| {},
            )
        })
        .await??;
        r.image_build_cold_s = Some(t.elapsed().as_secs_f64());
    }
    let n = name.clone();
    let t = Instant::now();
    tokio::task::spawn_blocking(move || {
        smolvm::image::build(
            &n,
            &smolvm::image::BuildOptions { force: false },
            &mut |_| {},
        )
    })
    .await??;
    r.image_build_cached_s = t.elapsed().as_secs_f64();
    if a.network_only {
        let b = super::bench_network::run(a.iterations).await?;
        println!("{:<44} {:>12}", "metric", "value");
        super::bench_network::print(&b, &|k: &str, v: String| println!("{k:<44} {v:>12}"));
        r.network = Some(b);
        if let Some(d) = a.out.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(&a.out, serde_json::to_vec_pretty(&r)?)?;
        eprintln!("bench: wrote {}", a.out.display());
        return Ok(0);
    }
    if a.snapshots_only {
        eprintln!("bench: snapshots: warm vs cold `smolvm run` ...");
        let b = super::bench_snapshots::run(a.boots, a.density).await?;
        println!("{:<44} {:>12}", "metric", "value");
        super::bench_snapshots::print(&b, &|k: &str, v: String| println!("{k:<44} {v:>12}"));
        r.snapshots = Some(b);
        if let Some(d) = a.out.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(&a.out, serde_json::to_vec_pretty(&r)?)?;
        return Ok(0);
    }
    eprintln!("bench: floors (bare QEMU boot, raw virtio-serial echo) ...");
    r.floors = measure_floors(floor).await;

    eprintln!(
        "bench: {} x create -> start -> first output of `true` ...",
        a.boots
    );
    for _ in 0..a.boots {
        let t = Instant::now();
        // A real boot: the floors are boots (warm starts are measured in
        // the snapshot section).
        let vm = Sandbox::create(SandboxConfig {
            cold: true,
            ..SandboxConfig::default()
        })
        .await?;
        vm.start(Duration::from_secs(120)).await?;
        let out = vm.run("true").await?;
        let total = ms(t.elapsed());
        anyhow::ensure!(out.ok(), "`true` failed in the guest");
        if let Some(b) = vm.last_boot() {
            r.boot_vmm_start_ms.push(b.vmm_start_ms as f64);
            r.boot_kernel_to_agent_ms
                .push(b.guest_agent_start_ms as f64);
            r.boot_agent_ready_ms.push(b.ready_ms as f64);
        }
        r.accel = vm.info().await?.accel.unwrap_or_default();
        r.create_to_first_output_ms.push(total);
        vm.delete().await?;
    }

    eprintln!("bench: {} exec round trips ...", a.iterations);
    let vm = Sandbox::create(SandboxConfig::default()).await?;
    vm.start(Duration::from_secs(120)).await?;
    let mut rtt = Vec::with_capacity(a.iterations);
    let mut ping = Vec::with_capacity(a.iterations);
    let argv = smolvm::Command::Argv(vec!["true".into()]);
    for _ in 0..a.iterations.min(10) {
        vm.exec(argv.clone(), &ExecOptions::default()).await?;
    }
    for _ in 0..a.iterations {
        let t = Instant::now();
        vm.exec(argv.clone(), &ExecOptions::default()).await?;
        rtt.push(ms(t.elapsed()));
        ping.push(ms(vm.ping().await?));
    }
    r.exec_true_rtt_ms = stats(rtt);
    r.ping_rtt_ms = stats(ping);
    eprintln!("bench: the agent surface (guest fork+exec, 10 at once, files, PTY) ...");
    r.surface = surface(&vm, r.exec_true_rtt_ms.median).await?;

    let py = python_for(a.python.clone());
    eprintln!(
        "bench: the Python SDK ({}) on the same VM, and `with SmolVM()` vs `smolvm run` ...",
        py.display()
    );
    r.python = Some(
        match tokio::time::timeout(
            Duration::from_secs(600),
            python_bench(&py, &vm, a.iterations, a.boots),
        )
        .await
        {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => PyBench {
                note: Some(format!("failed: {e:#}")),
                ..Default::default()
            },
            Err(_) => PyBench {
                note: Some("did not finish within 10 minutes".into()),
                ..Default::default()
            },
        },
    );

    eprintln!("bench: pause/resume and stop/start ...");
    let (mut pause, mut resume, mut stop, mut start) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..a.boots.max(1) {
        let t = Instant::now();
        vm.pause().await?;
        pause.push(ms(t.elapsed()));
        let t = Instant::now();
        vm.resume().await?;
        resume.push(ms(t.elapsed()));
        let t = Instant::now();
        vm.stop(Duration::from_secs(30)).await?;
        stop.push(ms(t.elapsed()));
        let t = Instant::now();
        vm.start(Duration::from_secs(120)).await?;
        start.push(ms(t.elapsed()));
    }
    vm.delete().await?;
    r.pause_ms = stats(pause);
    r.resume_ms = stats(resume);
    r.stop_ms = stats(stop);
    r.start_stopped_ms = stats(start);

    for n in a.parallel.iter().copied() {
        eprintln!("bench: {n} VM(s) in parallel ...");
        r.parallel.push(parallel_boot(n).await?);
    }
    if let Some(n) = a.parallel.iter().copied().max().filter(|n| *n > 1) {
        eprintln!("bench: {n} idle VMs, then {n} more at once ...");
        r.load = Some(under_load(n).await?);
    }

    eprintln!("bench: snapshots: warm vs cold starts, restore, fork ...");
    r.snapshots = Some(super::bench_snapshots::run(a.boots, a.density).await?);
    r.network = Some(super::bench_network::run(a.iterations).await?);

    println!(
        "smolvm benchmark (accelerator: {}, host cpus: {})",
        r.accel, r.host_cpus
    );
    println!("{:<44} {:>12}", "metric", "value");
    let row = |k: &str, v: String| println!("{k:<44} {v:>12}");
    if let Some(c) = r.image_build_cold_s {
        row("image build, cold (s)", format!("{c:.1}"));
        row(
            "image build, cold / cached",
            format!("{:.0}x", c / r.image_build_cached_s.max(1e-6)),
        );
    }
    row(
        "image build, cached (s)",
        format!("{:.2}", r.image_build_cached_s),
    );
    row(
        "create -> first output of `true` (ms, median)",
        format!("{:.0}", median(&r.create_to_first_output_ms)),
    );
    row(
        "  boot: VMM start (ms, median)",
        format!("{:.0}", median(&r.boot_vmm_start_ms)),
    );
    row(
        "  boot: kernel -> agent PID 1 (guest ms)",
        format!("{:.0}", median(&r.boot_kernel_to_agent_ms)),
    );
    row(
        "  boot: launch -> agent ready (ms, median)",
        format!("{:.0}", median(&r.boot_agent_ready_ms)),
    );
    row(
        "exec `true` round trip (ms, median)",
        format!("{:.2}", r.exec_true_rtt_ms.median),
    );
    row(
        "exec `true` round trip (ms, p99)",
        format!("{:.2}", r.exec_true_rtt_ms.p99),
    );
    row(
        "agent ping round trip (ms, median)",
        format!("{:.2}", r.ping_rtt_ms.median),
    );
    row(
        "agent ping round trip (ms, p99)",
        format!("{:.2}", r.ping_rtt_ms.p99),
    );
    row("pause (ms, median)", format!("{:.1}", r.pause_ms.median));
    row("resume (ms, median)", format!("{:.1}", r.resume_ms.median));
    row(
        "stop, graceful (ms, median)",
        format!("{:.0}", r.stop_ms.median),
    );
    row(
        "start of a stopped VM (ms, median)",
        format!("{:.0}", r.start_stopped_ms.median),
    );
    for p in &r.parallel {
        row(
            &format!("{} VM(s) create+start+`true`, wall (ms)", p.vms),
            format!("{:.0}", p.wall_ms),
        );
        row(
            &format!("{} VM(s): per-VM RSS / PSS (MiB)", p.vms),
            format!("{:.0} / {:.0}", p.rss_mib, p.pss_mib),
        );
    }
    if let (Some(one), Some(last)) = (r.parallel.first(), r.parallel.last()) {
        if last.vms > one.vms {
            row(
                &format!("{} VMs vs 1 VM wall (ratio)", last.vms),
                format!("{:.1}x", last.wall_ms / one.wall_ms.max(1e-6)),
            );
        }
    }
    let sf = &r.surface;
    row(
        "guest's own fork+exec of /bin/true (ms)",
        format!("{:.2}", sf.guest_fork_exec_true_ms),
    );
    row(
        "  exec `true` minus that: agent+host (ms)",
        format!("{:.2}", sf.agent_overhead_ms),
    );
    row(
        "10 concurrent execs of `true` (wall ms)",
        format!("{:.1}", sf.concurrent10_wall_ms),
    );
    row(
        "file upload / download, 100 MiB (MiB/s)",
        format!("{:.0} / {:.0}", sf.upload_mib_s, sf.download_mib_s),
    );
    row(
        "exec stdin / stdout, 100 MiB (MiB/s)",
        format!("{:.0} / {:.0}", sf.stdin_mib_s, sf.stdout_mib_s),
    );
    row(
        "PTY keystroke echo (ms, median / p99)",
        format!("{:.2} / {:.2}", sf.pty_echo_ms.median, sf.pty_echo_ms.p99),
    );
    row(
        "exec / ping (ratio of medians)",
        format!(
            "{:.1}x",
            r.exec_true_rtt_ms.median / r.ping_rtt_ms.median.max(1e-6)
        ),
    );
    if let Some(l) = &r.load {
        row(
            &format!("{} more VMs at once with {} idle (wall ms)", l.idle, l.idle),
            format!("{:.0}", l.wall_ms),
        );
        row(
            "  of them missed the default boot timeout",
            format!("{} of {}", l.failed, l.idle),
        );
        row(
            "idle VM CPU (VMM + network, % of a core)",
            format!("{:.2}", l.idle_cpu_pct_per_vm),
        );
    }
    match &r.python {
        Some(p) if p.note.is_none() => {
            let lib = p.library_rtt_after_ms.median;
            row(
                "python vm.run(['true']) round trip (ms, median)",
                format!("{:.2}", p.run_true_rtt_ms.median),
            );
            row(
                "  library exec, interleaved with it (ms, median)",
                format!("{:.2}", p.library_rtt_after_ms.median),
            );
            row(
                "  python / library (ratio of medians)",
                format!("{:.3}x", p.run_true_rtt_ms.median / lib.max(1e-6)),
            );
            row(
                "python `with SmolVM(): run(\"true\")` (ms, median)",
                format!("{:.0}", median(&p.with_run_true_ms)),
            );
            row(
                "`smolvm run -- true` (ms, median)",
                format!("{:.0}", median(&p.cli_run_true_ms)),
            );
            row(
                "  python with-block / CLI run (ratio)",
                format!(
                    "{:.2}x",
                    median(&p.with_run_true_ms) / median(&p.cli_run_true_ms).max(1e-6)
                ),
            );
        }
        Some(p) => row("python", p.note.clone().unwrap_or_default()),
        None => {}
    }
    match (r.floors.boot_ms, r.floors.channel_median_ms) {
        (Some(boot), Some(chan)) => {
            row(
                "floor: bare QEMU boot to init (ms, median)",
                format!("{boot:.0}"),
            );
            row(
                "floor: raw virtio-serial echo (ms, median / p99)",
                format!(
                    "{chan:.2} / {:.2}",
                    r.floors.channel_p99_ms.unwrap_or(f64::NAN)
                ),
            );
            row(
                "create -> first output / boot floor",
                format!(
                    "{:.2}x",
                    median(&r.create_to_first_output_ms) / boot.max(1e-6)
                ),
            );
            row(
                "agent ping / channel floor (medians)",
                format!("{:.2}x", r.ping_rtt_ms.median / chan.max(1e-6)),
            );
            row(
                "exec `true` / channel floor (medians)",
                format!("{:.1}x", r.exec_true_rtt_ms.median / chan.max(1e-6)),
            );
        }
        _ => row(
            "floors",
            r.floors
                .note
                .clone()
                .unwrap_or_else(|| "not measured".into()),
        ),
    }
    if let Some(b) = &r.snapshots {
        super::bench_snapshots::print(b, &row);
    }
    if let Some(b) = &r.network {
        super::bench_network::print(b, &row);
    }
    if let Some(d) = a.out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&a.out, serde_json::to_vec_pretty(&r)?)?;
    eprintln!("bench: wrote {}", a.out.display());
    Ok(0)
}
