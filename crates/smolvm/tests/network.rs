//! Port forwards and SSH against real VMs (TCG here): forwards carried
//! over the agent channel reach guest services bound to 127.0.0.1 and to
//! 0.0.0.0 with the guest network off, carry half-closes both ways, refuse
//! at once when nothing listens, survive pause/resume and snapshot/restore
//! and are gone after stop/delete; two VMs get distinct host ports; the
//! system OpenSSH client logs in with `StrictHostKeyChecking=yes` against
//! the pinned host key and a changed key is refused; a fork gets a host key
//! of its own.
//!
//! The cases share "fw" (network off, booted cold) and run in order; every
//! other VM is deleted after its case. Nothing here uses the guest network
//! (no packet leaves the VMs), so nothing can reach off this machine.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use common::*;
use smolvm::error::chain;
use smolvm::sandbox::{parse_forward, RestoreOptions, SnapshotOptions};
use smolvm::{Error, ErrorKind, Sandbox, SandboxConfig};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BOOT: Duration = Duration::from_secs(180);
const CASE_LIMIT: Duration = Duration::from_secs(300);
const FW: &str = "fw";
const KEEP: &[&str] = &[FW];

/// Guest services: an HTTP server on the guest's loopback only, one on
/// every address, and a line server that answers after its input ends.
const LO_PORT: u16 = 8001;
const ANY_PORT: u16 = 8002;
const HALF_PORT: u16 = 8003;
const ECHO_PORT: u16 = 8004;
/// Echoes as it reads (both directions busy at once, the way `ssh cat`,
/// rsync or any echo service are).
const ECHO_SERVER: &str = r#"
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8004)); s.listen(8)
def echo(c):
    while True:
        b = c.recv(65536)
        if not b: break
        c.sendall(b)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"#;
const HALF_SERVER: &str = r#"
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 8003)); s.listen(8)
while True:
    c, _ = s.accept()
    data = b""
    while True:
        b = c.recv(65536)
        if not b: break
        data += b
    c.sendall(b"got %d bytes, then EOF" % len(data)); c.close()
"#;

fn e2s(e: Error) -> String {
    chain(&e)
}

fn config(name: &str) -> SandboxConfig {
    SandboxConfig {
        name: Some(name.to_string()),
        memory_mib: 256,
        network: false,
        cold: true,
        ..Default::default()
    }
}

async fn handle(id: &str) -> Result<Sandbox, String> {
    Sandbox::from_id(id).await.map_err(e2s)
}

async fn sh(vm: &Sandbox, cmd: &str) -> Result<String, String> {
    let o = vm.run(cmd).await.map_err(e2s)?;
    if !o.ok() {
        return Err(format!(
            "{}: `{cmd}` failed ({:?}): {}",
            vm.id(),
            o.exit_code,
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// `GET path` on 127.0.0.1:port; the body.
async fn http_get(port: u16, path: &str) -> Result<String, String> {
    let mut c = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .map_err(|_| format!("connect to {port} timed out"))?
    .map_err(|e| format!("connect to {port}: {e}"))?;
    c.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), c.read_to_end(&mut out))
        .await
        .map_err(|_| format!("reading from {port} timed out"))?
        .map_err(|e| format!("read from {port}: {e}"))?;
    let t = String::from_utf8_lossy(&out).to_string();
    check!(
        t.starts_with("HTTP/1.0 200"),
        "answer from {port}: {t:.200}"
    );
    Ok(t.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

/// Waits until `port` answers `path` (a server just started).
async fn http_wait(port: u16, path: &str) -> Result<String, String> {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        match http_get(port, path).await {
            Ok(b) => return Ok(b),
            Err(e) if Instant::now() > until => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn expect_kind(r: Result<impl std::fmt::Debug, Error>, kind: ErrorKind) -> Result<String, String> {
    match r {
        Err(e) if e.kind() == kind => Ok(chain(&e)),
        other => Err(format!("expected {kind}, got {other:?}")),
    }
}

async fn start_servers(vm: &Sandbox) -> Result<(), String> {
    sh(vm, "mkdir -p /srv/lo /srv/any && echo loopback-only > /srv/lo/index.html && echo any-address > /srv/any/index.html").await?;
    let opts = smolvm::ExecOptions::default();
    for (dir, bind, port) in [
        ("/srv/lo", "127.0.0.1", LO_PORT),
        ("/srv/any", "0.0.0.0", ANY_PORT),
    ] {
        vm.spawn(
            smolvm::Command::Shell(format!(
                "cd {dir} && exec python3 -m http.server -b {bind} {port}"
            )),
            &opts,
        )
        .await
        .map_err(e2s)?;
    }
    for server in [HALF_SERVER, ECHO_SERVER] {
        vm.spawn(
            smolvm::Command::Argv(vec!["python3".into(), "-c".into(), server.into()]),
            &opts,
        )
        .await
        .map_err(e2s)?;
    }
    Ok(())
}

async fn forward(vm: &Sandbox, spec: &str) -> Result<u16, String> {
    let f = vm
        .expose(parse_forward(spec).map_err(e2s)?)
        .await
        .map_err(e2s)?;
    Ok(f.host_port)
}

/// The VM the cases share: network off, servers on its loopback and on
/// every address, a forward fixed at creation (`-p`).
async fn forwards_reach_guest_loopback_with_the_network_off() -> Result<(), String> {
    let host_port = free_port()?;
    let mut c = config(FW);
    c.ports = vec![parse_forward(&format!("{host_port}:{LO_PORT}")).map_err(e2s)?];
    let vm = Sandbox::create(c).await.map_err(e2s)?;
    vm.start(BOOT).await.map_err(e2s)?;
    check_eq!(
        sh(&vm, "ip -o link | grep -c -v ' lo:' || true").await?,
        "0"
    );
    start_servers(&vm).await?;
    // The creation's forward, to a server only the guest's loopback sees.
    check_eq!(http_wait(host_port, "/").await?.trim(), "loopback-only");
    // One added at run time, on a free port, to a server on 0.0.0.0.
    let any = forward(&vm, &ANY_PORT.to_string()).await?;
    check!(any != host_port && any != 0);
    check_eq!(http_wait(any, "/").await?.trim(), "any-address");
    let mut ports: Vec<(u16, u16)> = vm
        .ports()
        .await
        .map_err(e2s)?
        .iter()
        .map(|p| (p.host_port, p.guest_port))
        .collect();
    ports.sort_unstable();
    let mut want = vec![(host_port, LO_PORT), (any, ANY_PORT)];
    want.sort_unstable();
    check_eq!(ports, want);
    // Every forward listens on the host's loopback only by default.
    for p in vm.ports().await.map_err(e2s)? {
        check!(p.host_addr.is_loopback(), "{p:?}");
    }
    Ok(())
}

/// The host port forwarded to `guest_port` in the VM's run.
async fn host_port_of(vm: &Sandbox, guest_port: u16) -> Result<u16, String> {
    vm.ports()
        .await
        .map_err(e2s)?
        .into_iter()
        .find(|p| p.guest_port == guest_port)
        .map(|p| p.host_port)
        .ok_or_else(|| format!("{}: no forward to guest port {guest_port}", vm.id()))
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

async fn half_close_and_big_transfers() -> Result<(), String> {
    let vm = handle(FW).await?;
    let port = forward(&vm, &HALF_PORT.to_string()).await?;
    // The server answers only once our side ended: our EOF must reach it,
    // and its answer and EOF must reach us after that.
    let until = Instant::now() + Duration::from_secs(60);
    let payload = vec![7u8; 3 * 1024 * 1024 + 5];
    let answer = loop {
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let r = async {
            c.write_all(&payload).await?;
            c.shutdown().await?;
            let mut out = String::new();
            c.read_to_string(&mut out).await?;
            Ok::<_, std::io::Error>(out)
        };
        match tokio::time::timeout(Duration::from_secs(60), r).await {
            Ok(Ok(out)) if !out.is_empty() => break out,
            other if Instant::now() > until => return Err(format!("no answer: {other:?}")),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    check_eq!(answer, format!("got {} bytes, then EOF", payload.len()));
    // 20 MiB from the guest, checked byte for byte by its digest.
    sh(&vm, "head -c 20971520 /dev/urandom > /srv/any/big && sha256sum /srv/any/big | cut -c1-64 > /srv/any/big.sum").await?;
    let any = host_port_of(&vm, ANY_PORT).await?;
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", any))
        .await
        .map_err(|e| e.to_string())?;
    c.write_all(b"GET /big HTTP/1.0\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    c.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
    let body_at = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no HTTP header end")?
        + 4;
    let body = &out[body_at..];
    check_eq!(body.len(), 20 * 1024 * 1024);
    use sha2::Digest as _;
    let got = hex(&sha2::Sha256::digest(body));
    check_eq!(got, http_get(any, "/big.sum").await?.trim());
    // Both ways at once: 64 MiB written while the echo comes back.
    let echo = forward(&vm, &ECHO_PORT.to_string()).await?;
    let payload: Vec<u8> = (0..64 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let want = hex(&sha2::Sha256::digest(&payload));
    let c = loop {
        match tokio::net::TcpStream::connect(("127.0.0.1", echo)).await {
            Ok(c) => break c,
            Err(e) if Instant::now() > until => return Err(e.to_string()),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let (mut rd, mut wr) = c.into_split();
    let writer = tokio::spawn(async move {
        wr.write_all(&payload).await?;
        wr.shutdown().await
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), rd.read_to_end(&mut back))
        .await
        .map_err(|_| "the echo stalled: both directions busy at once hang the tunnel")?
        .map_err(|e| e.to_string())?;
    writer
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    check_eq!(back.len(), 64 * 1024 * 1024);
    check_eq!(hex(&sha2::Sha256::digest(&back)), want);
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

async fn nothing_listening_is_refused_and_bad_forwards_are_errors() -> Result<(), String> {
    let vm = handle(FW).await?;
    let port = forward(&vm, "9999").await?;
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(30), c.read(&mut buf))
        .await
        .map_err(|_| "a forward to a closed guest port hung")?;
    // Reset (or closed) at once, no bytes.
    check!(matches!(r, Err(_) | Ok(0)), "{r:?}");
    vm.unexpose(port).await.map_err(e2s)?;
    check!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "a removed forward still listens"
    );
    // A host port in use: a network error that names it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let tp = taken.local_addr().map_err(|e| e.to_string())?.port();
    let msg = expect_kind(
        vm.expose(parse_forward(&format!("{tp}:80")).map_err(e2s)?)
            .await,
        ErrorKind::Network,
    )?;
    check!(
        msg.contains(&tp.to_string()) && msg.contains("in use"),
        "{msg}"
    );
    let msg = expect_kind(vm.unexpose(1).await, ErrorKind::InvalidState)?;
    check!(msg.contains("no port forward on host port 1"), "{msg}");
    for bad in ["0", "x:80", "80:0", "70000", "1.2.3:80:80"] {
        check!(parse_forward(bad).is_err(), "{bad} parsed");
    }
    // A creation whose fixed host port is taken fails its start, clearly.
    let mut c = config("fw-taken");
    c.ports = vec![parse_forward(&format!("{tp}:80")).map_err(e2s)?];
    let v2 = Sandbox::create(c).await.map_err(e2s)?;
    let e = v2
        .start(BOOT)
        .await
        .err()
        .ok_or("start with a taken port succeeded")?;
    check!(chain(&e).contains("in use"), "{}", chain(&e));
    drop(taken);
    Ok(())
}

async fn forwards_survive_pause_and_two_vms_get_distinct_ports() -> Result<(), String> {
    let vm = handle(FW).await?;
    let lo = host_port_of(&vm, LO_PORT).await?;
    vm.pause().await.map_err(e2s)?;
    // A connection made while paused waits and is served after resume.
    let pending = tokio::spawn(async move { http_get(lo, "/").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    check!(!pending.is_finished(), "a paused guest answered");
    vm.resume().await.map_err(e2s)?;
    check_eq!(
        pending.await.map_err(|e| e.to_string())??.trim(),
        "loopback-only"
    );
    let other = Sandbox::create(config("fw-b")).await.map_err(e2s)?;
    other.start(BOOT).await.map_err(e2s)?;
    sh(&other, "mkdir -p /srv && echo second-vm > /srv/index.html").await?;
    other
        .spawn(
            smolvm::Command::Shell(format!(
                "cd /srv && exec python3 -m http.server -b 127.0.0.1 {LO_PORT}"
            )),
            &smolvm::ExecOptions::default(),
        )
        .await
        .map_err(e2s)?;
    let p2 = forward(&other, &LO_PORT.to_string()).await?;
    check!(p2 != lo);
    check_eq!(http_wait(p2, "/").await?.trim(), "second-vm");
    check_eq!(http_get(lo, "/").await?.trim(), "loopback-only");
    // Gone with the VM.
    other.delete().await.map_err(e2s)?;
    check!(
        tokio::net::TcpStream::connect(("127.0.0.1", p2))
            .await
            .is_err(),
        "a deleted VM's forward still listens"
    );
    Ok(())
}

async fn ssh_logs_in_against_the_pinned_host_key() -> Result<(), String> {
    let vm = handle(FW).await?;
    let a = vm
        .wait_for_ssh(Duration::from_secs(120))
        .await
        .map_err(e2s)?;
    check!(a.known_hosts.exists());
    check!(a.host_key.starts_with("ssh-ed25519 "));
    // The system client, strict host key checking, against the pin.
    let run = |kh: &std::path::Path| {
        let mut argv = a.argv();
        argv.iter_mut()
            .filter(|x| x.starts_with("UserKnownHostsFile="))
            .for_each(|x| *x = format!("UserKnownHostsFile={}", kh.display()));
        std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .args(["-o", "BatchMode=yes", "--", "hostname; id -u"])
            .stdin(std::process::Stdio::null())
            .output()
    };
    let o = run(&a.known_hosts).map_err(|e| e.to_string())?;
    check!(
        o.status.success(),
        "ssh: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    check_eq!(String::from_utf8_lossy(&o.stdout).trim(), "fw\n0");
    // scp (OpenSSH 9 speaks sftp for it: the server has the subsystem).
    let local = a.known_hosts.with_file_name("scp-probe");
    std::fs::write(&local, b"over scp\n").map_err(|e| e.to_string())?;
    let mut opts = a.options();
    opts.truncate(opts.len() - 2); // `-p PORT` is `-P PORT` for scp
    let o = std::process::Command::new("scp")
        .args(&opts)
        .args(["-o", "BatchMode=yes", "-P", &a.port.to_string()])
        .arg(&local)
        .arg("root@127.0.0.1:/tmp/scp-probe")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    check!(
        o.status.success(),
        "scp: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    check_eq!(sh(&vm, "cat /tmp/scp-probe").await?, "over scp");
    // Another key under the same alias: refused.
    let fake = a.known_hosts.with_file_name("known_hosts.fake");
    std::fs::write(
        &fake,
        format!(
            "{} ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB9d2yCkbqYpm2E9tD3wFQYQbDjVEA0r6rR5UiAcmPqS\n",
            a.alias
        ),
    )
    .map_err(|e| e.to_string())?;
    let o = run(&fake).map_err(|e| e.to_string())?;
    check!(!o.status.success());
    check!(
        String::from_utf8_lossy(&o.stderr).contains("Host key verification failed"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Commands over one persistent connection.
    let again = a.clone();
    for i in 0..3 {
        let (code, out, _) = vm
            .ssh_output(
                &again,
                &[format!("echo run{i}")],
                Duration::from_secs(30),
                true,
            )
            .await
            .map_err(e2s)?;
        check_eq!(
            (code, String::from_utf8_lossy(&out).trim().to_string()),
            (0, format!("run{i}"))
        );
    }
    let (code, _, _) = vm
        .ssh_output(&again, &["exit 3".into()], Duration::from_secs(30), true)
        .await
        .map_err(e2s)?;
    check_eq!(code, 3);
    // The guest's key changing under the pin is refused too.
    sh(
        &vm,
        "rm -f /etc/ssh/ssh_host_ed25519_key /etc/ssh/ssh_host_ed25519_key.pub",
    )
    .await?;
    let msg = expect_kind(vm.ensure_ssh().await, ErrorKind::Network)?;
    check!(msg.contains("changed"), "{msg}");
    Ok(())
}

async fn snapshot_restore_and_fork_keep_forwards_and_get_own_host_keys() -> Result<(), String> {
    let vm = handle(FW).await?;
    let lo = host_port_of(&vm, LO_PORT).await?;
    // The key the guest has now (the SSH case made it a new one).
    let parent_key = sh(&vm, "cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub").await?;
    vm.snapshot(&SnapshotOptions {
        name: Some("fw-snap".into()),
        resume: true,
        disk_only: false,
    })
    .await
    .map_err(e2s)?;
    // Into a new VM: the same guest ports, on free host ports, serving.
    let r = Sandbox::restore_snapshot(
        "fw-snap",
        &RestoreOptions {
            into: Some("fw-r".into()),
            resume: true,
            boot_timeout: BOOT,
        },
        None,
    )
    .await
    .map_err(e2s)?;
    let rp = host_port_of(&r, LO_PORT).await?;
    check!(rp != lo);
    check_eq!(http_wait(rp, "/").await?.trim(), "loopback-only");
    // A machine of its own: SSH makes it a host key of its own.
    let ra = r
        .wait_for_ssh(Duration::from_secs(120))
        .await
        .map_err(e2s)?;
    check!(
        ra.host_key != parent_key,
        "a restore shares its source's host key"
    );
    r.delete().await.map_err(e2s)?;
    // Back into the source: its own host ports again.
    Sandbox::restore_snapshot(
        "fw-snap",
        &RestoreOptions {
            into: None,
            resume: true,
            boot_timeout: BOOT,
        },
        None,
    )
    .await
    .map_err(e2s)?;
    check_eq!(http_wait(lo, "/").await?.trim(), "loopback-only");
    smolvm::sandbox::delete_snapshot("fw-snap")
        .await
        .map_err(e2s)?;
    // Stopped: every forward is gone.
    let vm = handle(FW).await?;
    vm.stop(Duration::from_secs(60)).await.map_err(e2s)?;
    check!(
        tokio::net::TcpStream::connect(("127.0.0.1", lo))
            .await
            .is_err(),
        "a stopped VM's forward still listens"
    );
    expect_kind(
        vm.expose(parse_forward("80").map_err(e2s)?).await,
        ErrorKind::InvalidState,
    )?;
    check!(vm.ports().await.map_err(e2s)?.is_empty());
    vm.delete().await.map_err(e2s)?;
    Ok(())
}

async fn ssh_at_boot_by_config() -> Result<(), String> {
    let mut c = config("fw-ssh");
    c.ssh = true;
    let vm = Sandbox::create(c).await.map_err(e2s)?;
    vm.start(BOOT).await.map_err(e2s)?;
    // Up before the start returned: pinned, forwarded, logging in.
    check!(vm.pinned_host_key().is_some());
    let fwd = vm.ports().await.map_err(e2s)?;
    check!(fwd.iter().any(|p| p.guest_port == 22), "{fwd:?}");
    let a = vm.ensure_ssh().await.map_err(e2s)?;
    let (code, out, _) = vm
        .ssh_output(&a, &["hostname".into()], Duration::from_secs(30), false)
        .await
        .map_err(e2s)?;
    check_eq!((code, String::from_utf8_lossy(&out).trim()), (0, "fw-ssh"));
    // A paused VM is refused at once, with the state.
    vm.pause().await.map_err(e2s)?;
    expect_kind(vm.ensure_ssh().await, ErrorKind::InvalidState)?;
    vm.delete().await.map_err(e2s)?;
    Ok(())
}

async fn sweep(keep: &[&str]) {
    let Ok(list) = Sandbox::list().await else {
        return;
    };
    for v in list.into_iter().filter(|v| !keep.contains(&v.id.as_str())) {
        if let Ok(vm) = Sandbox::from_id(&v.id).await {
            if let Err(e) = vm.delete().await {
                eprintln!("cleanup: cannot delete {}: {}", v.id, chain(&e));
            }
        }
    }
}

fn main() {
    let filters = filter();
    let cases = cases![
        forwards_reach_guest_loopback_with_the_network_off,
        half_close_and_big_transfers,
        nothing_listening_is_refused_and_bad_forwards_are_errors,
        forwards_survive_pause_and_two_vms_get_distinct_ports,
        ssh_logs_in_against_the_pinned_host_key,
        ssh_at_boot_by_config,
        snapshot_restore_and_fork_keep_forwards_and_get_own_host_keys,
    ];
    list_if_asked(&case_names(&cases));
    let data = isolated_data_dir("smolvm-network-");
    let rt = runtime();
    let started = Instant::now();
    let code = rt.block_on(async {
        let (passed, failed) =
            run_cases(&cases, &(), &filters, Some(CASE_LIMIT), || sweep(KEEP)).await;
        sweep(&[]).await;
        for s in smolvm::sandbox::list_snapshots() {
            let _ = smolvm::sandbox::delete_snapshot(&s.id).await;
        }
        kill_processes_in(data.path());
        summary(passed, &failed)
    });
    println!("network: {:.1}s", started.elapsed().as_secs_f64());
    kill_processes_in(data.path());
    drop(rt);
    drop(data);
    std::process::exit(code);
}
