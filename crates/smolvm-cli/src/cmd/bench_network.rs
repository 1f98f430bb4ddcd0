//! `smolvm bench`, network section, all on one VM (network off: forwards
//! and SSH ride the agent channel): exec of `true` through the agent vs
//! through SSH over one persistent connection (OpenSSH ControlMaster),
//! interleaved; 100 MiB through a forwarded port vs the agent's file copy;
//! connection set-up time through a forward.

use super::bench::{stats, Stats};
use serde::Serialize;
use smolvm::{Command, ExecOptions, Sandbox, SandboxConfig};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Serialize, Default, Clone)]
pub struct NetBench {
    /// Exec of `true` through the agent channel (ms).
    pub agent_exec_true_ms: Stats,
    /// Exec of `true` over SSH, one persistent connection (ms).
    pub ssh_exec_true_ms: Stats,
    /// The guest's own cost of fork+exec of `/bin/true` (ms, measured in
    /// the guest on the same VM): what both paths pay before their own
    /// overhead.
    pub guest_fork_exec_true_ms: f64,
    /// Bytes moved in each transfer.
    pub transfer_bytes: u64,
    /// 100 MiB read through a forwarded port (MiB/s, median of runs).
    pub forward_mib_s: f64,
    /// The same file downloaded by the agent's file copy (MiB/s).
    pub file_copy_mib_s: f64,
    /// connect() to the first byte of a guest service's greeting through a
    /// forward (ms).
    pub forward_connect_ms: Stats,
}

/// Guest services: port 9100 sends /dev/shm/big and closes; 9101 greets.
const SERVERS: &str = r#"
import os, socket, threading
def serve(port, handle):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); s.listen(64)
    while True:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()
def big(c):
    with open("/dev/shm/big", "rb") as f:
        c.sendfile(f)
    c.close()
def hello(c):
    c.sendall(b"hi\n"); c.close()
threading.Thread(target=serve, args=(9100, big), daemon=True).start()
serve(9101, hello)
"#;

const BIG: u64 = 100 * 1024 * 1024;

#[allow(clippy::cast_precision_loss)]
fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64().max(1e-9)
}

async fn read_all(port: u16) -> anyhow::Result<u64> {
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        let k = c.read(&mut buf).await?;
        if k == 0 {
            return Ok(n);
        }
        n += k as u64;
    }
}

pub async fn run(iterations: usize) -> anyhow::Result<NetBench> {
    let mut b = NetBench {
        transfer_bytes: BIG,
        ..NetBench::default()
    };
    let vm = Sandbox::create(SandboxConfig {
        network: false,
        cold: true,
        ..SandboxConfig::default()
    })
    .await?;
    let r = measure(&vm, iterations, &mut b).await;
    let _ = vm.delete().await;
    r.map(|()| b)
}

async fn measure(vm: &Sandbox, iterations: usize, b: &mut NetBench) -> anyhow::Result<()> {
    vm.start(Duration::from_secs(120)).await?;
    eprintln!("bench: network: agent exec vs SSH (ControlMaster) ...");
    let access = vm.wait_for_ssh(Duration::from_secs(120)).await?;
    let t = ["true".to_string()];
    let opts = ExecOptions::default();
    // Warm both paths (the first SSH call opens the master connection).
    for _ in 0..5 {
        vm.exec(Command::Argv(vec!["true".into()]), &opts).await?;
        vm.ssh_output(&access, &t, Duration::from_secs(30), true)
            .await?;
    }
    let (mut agent, mut ssh) = (Vec::new(), Vec::new());
    // Interleaved blocks: drift on a shared host hits both alike.
    let n = iterations.max(10);
    for _ in 0..n.div_ceil(10) {
        for _ in 0..10 {
            let s = Instant::now();
            let o = vm.exec(Command::Argv(vec!["true".into()]), &opts).await?;
            agent.push(super::bench::ms(s.elapsed()));
            anyhow::ensure!(o.ok(), "`true` failed through the agent");
        }
        for _ in 0..10 {
            let s = Instant::now();
            let (code, _, _) = vm
                .ssh_output(&access, &t, Duration::from_secs(30), true)
                .await?;
            ssh.push(super::bench::ms(s.elapsed()));
            anyhow::ensure!(code == 0, "`true` failed over SSH");
        }
    }
    b.agent_exec_true_ms = stats(agent);
    b.ssh_exec_true_ms = stats(ssh);
    let o = vm
        .exec(
            Command::Argv(vec![
                "bash".into(),
                "-c".into(),
                "TIMEFORMAT=%R; time (for i in $(seq 100); do /bin/true; done)".into(),
            ]),
            &opts,
        )
        .await?;
    b.guest_fork_exec_true_ms = String::from_utf8_lossy(&o.stderr)
        .trim()
        .parse::<f64>()
        .map_or(0.0, |s| s * 1000.0 / 100.0);
    vm.close_ssh_master().await;

    eprintln!("bench: network: 100 MiB through a forward vs the agent's file copy ...");
    vm.run(&format!("head -c {BIG} /dev/zero > /dev/shm/big"))
        .await?;
    vm.spawn(
        Command::Argv(vec!["python3".into(), "-c".into(), SERVERS.into()]),
        &opts,
    )
    .await?;
    let big = vm
        .expose(smolvm::sandbox::parse_forward("9100")?)
        .await?
        .host_port;
    let hello = vm
        .expose(smolvm::sandbox::parse_forward("9101")?)
        .await?
        .host_port;
    // Until the guest's servers listen.
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", hello)).await?;
        let mut one = [0u8; 1];
        if matches!(c.read(&mut one).await, Ok(1)) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < until,
            "the guest's bench servers did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut fwd, mut copy) = (Vec::new(), Vec::new());
    let local = smolvm::paths::data_dir().join(format!(".bench-copy-{}", std::process::id()));
    for _ in 0..3 {
        let s = Instant::now();
        let n = read_all(big).await?;
        anyhow::ensure!(n == BIG, "the forward moved {n} bytes, not {BIG}");
        fwd.push(mib_s(n, s.elapsed()));
        let s = Instant::now();
        let n = vm
            .download_file("/dev/shm/big", &local, false, None)
            .await?;
        anyhow::ensure!(n == BIG, "the file copy moved {n} bytes, not {BIG}");
        copy.push(mib_s(n, s.elapsed()));
        let _ = std::fs::remove_file(&local);
    }
    b.forward_mib_s = super::bench::median(&fwd);
    b.file_copy_mib_s = super::bench::median(&copy);

    eprintln!("bench: network: connection set-up through a forward ...");
    let mut setup = Vec::new();
    for _ in 0..50 {
        let s = Instant::now();
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", hello)).await?;
        let mut one = [0u8; 1];
        anyhow::ensure!(c.read(&mut one).await? == 1, "no greeting");
        setup.push(super::bench::ms(s.elapsed()));
        let _ = c.shutdown().await;
    }
    b.forward_connect_ms = stats(setup);
    Ok(())
}

pub fn print(b: &NetBench, row: &dyn Fn(&str, String)) {
    let (a, s) = (&b.agent_exec_true_ms, &b.ssh_exec_true_ms);
    row(
        "exec `true`, agent (ms, median / p99)",
        format!("{:.1} / {:.1}", a.median, a.p99),
    );
    row(
        "exec `true`, SSH ControlMaster (median / p99)",
        format!("{:.1} / {:.1}", s.median, s.p99),
    );
    row(
        "  SSH / agent (medians)",
        format!("{:.1}x", s.median / a.median.max(1e-6)),
    );
    let g = b.guest_fork_exec_true_ms;
    row("  guest's own fork+exec of `true` (ms)", format!("{g:.1}"));
    row(
        "  SSH / agent overhead above it",
        format!("{:.1}x", (s.median - g).max(0.0) / (a.median - g).max(1e-3)),
    );
    row(
        "100 MiB through a forward (MiB/s)",
        format!("{:.0}", b.forward_mib_s),
    );
    row(
        "100 MiB agent file copy (MiB/s)",
        format!("{:.0}", b.file_copy_mib_s),
    );
    let c = &b.forward_connect_ms;
    row(
        "connect through a forward (ms, median / p99)",
        format!("{:.1} / {:.1}", c.median, c.p99),
    );
}
