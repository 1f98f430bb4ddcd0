//! End-to-end tests of running commands, against real VMs booted from the
//! real image (TCG here). One VM is shared by the exec cases; cases that
//! need their own VM boot one.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use common::*;
use sha2::{Digest, Sha256};
use smolvm::sandbox::ExecEvent;
use smolvm::Command;
use smolvm::{Error, ExecOptions, Sandbox, SandboxConfig, VmState};
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(120);

fn sh(s: &str) -> Command {
    Command::Shell(s.to_string())
}

async fn run(vm: &Sandbox, s: &str) -> Result<smolvm::ExecOutput, String> {
    vm.exec(sh(s), &ExecOptions::default())
        .await
        .map_err(|e| smolvm::error::chain(&e))
}

async fn stdout_stderr_apart(vm: &Sandbox) -> Result<(), String> {
    let o = run(vm, "echo out; echo err >&2; echo out2").await?;
    check_eq!(o.stdout, b"out\nout2\n".to_vec());
    check_eq!(o.stderr, b"err\n".to_vec());
    check_eq!(o.exit_code, Some(0));
    Ok(())
}

async fn exit_codes(vm: &Sandbox) -> Result<(), String> {
    for code in [0, 7, 255] {
        let o = run(vm, &format!("exit {code}")).await?;
        check_eq!(o.exit_code, Some(code));
        check_eq!(o.signal, None);
        check!(!o.timed_out);
    }
    Ok(())
}

async fn death_by_signal(vm: &Sandbox) -> Result<(), String> {
    let o = run(vm, "kill -9 $$").await?;
    check_eq!(o.exit_code, None);
    check_eq!(o.signal, Some(9));
    let o = run(vm, "kill -TERM $$").await?;
    check_eq!(o.signal, Some(15));
    Ok(())
}

async fn env_and_workdir(vm: &Sandbox) -> Result<(), String> {
    let opts = ExecOptions {
        env: vec![
            ("GREETING".into(), "hello world".into()),
            ("EMPTY".into(), "".into()),
        ],
        workdir: Some("/usr/share".into()),
        ..Default::default()
    };
    let o = vm
        .exec(
            sh("echo \"$GREETING\"; pwd; echo \"[${EMPTY-unset}]\""),
            &opts,
        )
        .await
        .map_err(|e| e.to_string())?;
    check_eq!(
        String::from_utf8_lossy(&o.stdout),
        "hello world\n/usr/share\n[]\n"
    );
    let bad = ExecOptions {
        workdir: Some("/does/not/exist".into()),
        ..Default::default()
    };
    match vm.exec(sh("true"), &bad).await {
        Err(Error::Exec { message, .. }) => {
            check!(message.contains("/does/not/exist"), "message: {message}")
        }
        other => return Err(format!("bad workdir gave {other:?}")),
    }
    Ok(())
}

async fn argv_without_shell(vm: &Sandbox) -> Result<(), String> {
    let argv = ["printf", "%s|", "a b", "$HOME", "c;d"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let o = vm
        .exec(Command::Argv(argv), &ExecOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    check_eq!(String::from_utf8_lossy(&o.stdout), "a b|$HOME|c;d|");
    match vm
        .exec(
            Command::Argv(vec!["/no/such/program".into()]),
            &ExecOptions::default(),
        )
        .await
    {
        Err(Error::Exec { message, .. }) => {
            check!(message.contains("/no/such/program"), "message: {message}")
        }
        other => return Err(format!("missing program gave {other:?}")),
    }
    Ok(())
}

async fn timeout_kills_process_group(vm: &Sandbox) -> Result<(), String> {
    let opts = ExecOptions {
        timeout: Some(Duration::from_millis(1500)),
        ..Default::default()
    };
    let t = Instant::now();
    let o = vm
        .exec(
            sh("sleep 300 & echo $! > /tmp/bg.pid; echo started; sleep 300"),
            &opts,
        )
        .await
        .map_err(|e| e.to_string())?;
    check!(o.timed_out, "not reported as timed out: {o:?}");
    check_eq!(o.signal, Some(9));
    check!(
        t.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t.elapsed()
    );
    check_eq!(o.stdout, b"started\n".to_vec());
    // The background sleep of the timed-out shell is gone too.
    let o = run(
        vm,
        "pid=$(cat /tmp/bg.pid); if [ -d /proc/$pid ]; then cat /proc/$pid/stat; exit 1; fi",
    )
    .await?;
    check!(
        o.ok(),
        "background child survived the timeout: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    Ok(())
}

async fn ten_mib_byte_exact(vm: &Sandbox) -> Result<(), String> {
    let o = run(
        vm,
        "head -c 10485760 /dev/urandom > /tmp/big && sha256sum /tmp/big | cut -d' ' -f1",
    )
    .await?;
    check!(o.ok(), "prep failed: {o:?}");
    let want = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let o = run(vm, "cat /tmp/big").await?;
    check_eq!(o.stdout.len(), 10 * 1024 * 1024);
    let got: String = Sha256::digest(&o.stdout)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    check_eq!(got, want);
    // Same on stderr.
    let o = run(vm, "cat /tmp/big >&2").await?;
    check_eq!(o.stderr.len(), 10 * 1024 * 1024);
    check!(o.stdout.is_empty());
    Ok(())
}

async fn non_utf8_bytes(vm: &Sandbox) -> Result<(), String> {
    let o = run(vm, r"printf '\377\376\000\200abc\n\303('").await?;
    check_eq!(
        o.stdout,
        vec![0xff, 0xfe, 0x00, 0x80, b'a', b'b', b'c', b'\n', 0xc3, b'(']
    );
    let data: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let opts = ExecOptions {
        stdin: Some(data.clone()),
        ..Default::default()
    };
    let o = vm.exec(sh("cat"), &opts).await.map_err(|e| e.to_string())?;
    check!(
        o.stdout == data,
        "stdin round trip differs ({} bytes back)",
        o.stdout.len()
    );
    Ok(())
}

async fn twenty_concurrent_execs(vm: &Sandbox) -> Result<(), String> {
    let futs = (0..20).map(|i| async move {
        let o = run(
            vm,
            &format!("sleep 0.$((RANDOM % 5)); echo job-{i}; echo e-{i} >&2; exit {i}"),
        )
        .await?;
        Ok::<_, String>((i, o))
    });
    let results = futures_join_all(futs).await;
    for r in results {
        let (i, o) = r?;
        check_eq!(String::from_utf8_lossy(&o.stdout), format!("job-{i}\n"));
        check_eq!(String::from_utf8_lossy(&o.stderr), format!("e-{i}\n"));
        check_eq!(o.exit_code, Some(i));
    }
    Ok(())
}

async fn futures_join_all<F: std::future::Future>(
    futs: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    let mut out = Vec::with_capacity(set.len());
    // Poll all concurrently by joining pairwise through tokio::join! is not
    // variadic; use a simple select loop over pinned futures.
    let mut pending: Vec<(usize, std::pin::Pin<Box<F>>)> = set.into_iter().enumerate().collect();
    let mut results: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        pending.retain_mut(|(i, f)| match f.as_mut().poll(cx) {
            std::task::Poll::Ready(v) => {
                results[*i] = Some(v);
                false
            }
            std::task::Poll::Pending => true,
        });
        if pending.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.extend(results.into_iter().flatten());
    out
}

async fn pid1_is_the_agent(vm: &Sandbox) -> Result<(), String> {
    let o = run(
        vm,
        "cat /proc/1/comm; hostname; cat /proc/1/cmdline | tr '\\0' ' '",
    )
    .await?;
    let s = String::from_utf8_lossy(&o.stdout).to_string();
    let mut lines = s.lines();
    check_eq!(lines.next(), Some("smolvm-agent"));
    check_eq!(lines.next(), Some(vm.id()));
    Ok(())
}

async fn accelerator_probe_decides(vm: &Sandbox) -> Result<(), String> {
    let img = smolvm::image::ensure("debian-12", &mut |_| {}).map_err(|e| e.to_string())?;
    smolvm::backend::forget_cached_verdict();
    let t = Instant::now();
    let v = smolvm::backend::resolve_accel(
        smolvm::backend::BackendKind::Qemu,
        smolvm::Accel::Auto,
        &img.kernel,
        &img.initramfs,
    );
    check!(
        t.elapsed() < Duration::from_secs(30),
        "probe took {:?}",
        t.elapsed()
    );
    check!(!v.cached);
    let info = vm.info().await.map_err(|e| e.to_string())?;
    let want = v.accel.to_string();
    check_eq!(info.accel.as_deref(), Some(want.as_str()));
    if std::env::var("SMOLVM_EXPECT_ACCEL").ok().as_deref() == Some("tcg") {
        // These hosts: /dev/kvm exists but nested KVM cannot run the guest.
        check_eq!(v.accel, smolvm::backend::ResolvedAccel::Tcg);
        check!(
            v.reason.contains("KVM") || v.reason.contains("/dev/kvm"),
            "reason: {}",
            v.reason
        );
    }
    let again = smolvm::backend::resolve_accel(
        smolvm::backend::BackendKind::Qemu,
        smolvm::Accel::Auto,
        &img.kernel,
        &img.initramfs,
    );
    check!(again.cached || !std::path::Path::new("/dev/kvm").exists());
    check_eq!(again.accel, v.accel);
    Ok(())
}

async fn boot_timeout_shows_console(_: &Sandbox) -> Result<(), String> {
    let vm = Sandbox::create(SandboxConfig {
        name: Some("boot-timeout".into()),
        // A real boot: a warm start is ready well within the timeout.
        cold: true,
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let r = vm.start(Duration::from_millis(300)).await;
    let state = vm.status().await.map_err(|e| e.to_string())?;
    let dir = vm.vm_dir().to_path_buf();
    let console =
        std::fs::read_to_string(dir.join(smolvm::backend::files::CONSOLE_LOG)).unwrap_or_default();
    vm.delete().await.map_err(|e| e.to_string())?;
    match &r {
        Err(
            e @ Error::Boot {
                reason,
                timed_out,
                console: tail,
                ..
            },
        ) => {
            check!(reason.contains("did not answer within"), "reason: {reason}");
            check!(*timed_out, "a timeout is reported as one");
            check_eq!(e.kind(), smolvm::error::ErrorKind::BootFailed);
            // The console's last lines travel apart from the message.
            check!(!reason.contains("console"), "reason: {reason}");
            match tail {
                Some(t) => check!(
                    t.lines().all(|l| console.contains(l.trim())),
                    "tail {t:?} is not from the console"
                ),
                None => check!(
                    console.trim().is_empty(),
                    "console not attached: {console:?}"
                ),
            }
        }
        other => return Err(format!("expected a boot timeout, got {other:?}")),
    }
    check!(!state.is_live(), "state after a failed boot: {state}");
    check!(!dir.exists(), "{} left behind", dir.display());
    Ok(())
}

async fn vmm_death_is_reported(_: &Sandbox) -> Result<(), String> {
    let vm = Sandbox::create(SandboxConfig {
        name: Some("vmm-death".into()),
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    vm.start(BOOT).await.map_err(|e| smolvm::error::chain(&e))?;
    let info = vm.info().await.map_err(|e| e.to_string())?;
    let vmm = info.vmm_pid.ok_or("no vmm pid")?;
    let sup = info.supervisor_pid.ok_or("no supervisor pid")?;
    // SAFETY: signalling a pid we just read for our own VMM.
    unsafe { libc::kill(vmm as i32, libc::SIGKILL) };
    let t = Instant::now();
    while std::path::Path::new(&format!("/proc/{sup}")).exists()
        && t.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let info = vm.info().await.map_err(|e| e.to_string())?;
    check_eq!(info.state, VmState::Error);
    let err = info.last_error.clone().unwrap_or_default();
    check!(err.contains("signal 9"), "last_error: {err}");
    for f in ["sup.sock", "qmp.sock", "agent.sock", "memory"] {
        check!(!vm.vm_dir().join(f).exists(), "{f} left behind");
    }
    match vm.run("true").await {
        Err(Error::InvalidState { hint, .. }) => check!(hint.contains("smolvm rm"), "hint: {hint}"),
        other => return Err(format!("exec on a dead VM gave {other:?}")),
    }
    vm.delete().await.map_err(|e| e.to_string())?;
    Ok(())
}

async fn stalled_client_does_not_block_others(vm: &Sandbox) -> Result<(), String> {
    // A client that starts a firehose and does not read its output, on a
    // handle of its own and on the shared one: its stream stalls at its
    // credit window; nobody else notices and nothing is cut off.
    let stalled = Sandbox::from_id(vm.id()).await.map_err(|e| e.to_string())?;
    let mut firehose = stalled
        .exec_stream(sh("exec yes smolvm-firehose"), &ExecOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut same_handle = vm
        .exec_stream(sh("exec yes smolvm-firehose"), &ExecOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t = Instant::now();
    for _ in 0..20 {
        let o = tokio::time::timeout(Duration::from_secs(30), run(vm, "echo still-here"))
            .await
            .map_err(|_| "a stalled stream blocked another for 30 s".to_string())??;
        check_eq!(o.stdout, b"still-here\n".to_vec());
    }
    check!(
        t.elapsed() < Duration::from_secs(20),
        "20 commands beside two stalled streams took {:?}",
        t.elapsed()
    );
    // The stalled ones were only paused: both firehoses still run, and
    // reading them again gets their output.
    let o = run(vm, "pgrep -cx yes || true").await?;
    check_eq!(String::from_utf8_lossy(&o.stdout).trim(), "2");
    for s in [&mut firehose, &mut same_handle] {
        let mut got = Vec::new();
        while got.len() < 4 * 1024 * 1024 {
            match s.next().await.map_err(|e| e.to_string())? {
                Some(ExecEvent::Stdout(b)) => got.extend_from_slice(&b),
                Some(ExecEvent::Started { .. }) => {}
                other => return Err(format!("unexpected {other:?}")),
            }
        }
        // Nothing lost or reordered: line after whole line from the start.
        let whole = got.len() - got.len() % 16;
        check!(
            got[..whole].chunks(16).all(|l| l == b"smolvm-firehose\n"),
            "the firehose's output was not intact after the stall"
        );
    }
    // Dropping a stream cancels its process.
    drop(firehose);
    drop(same_handle);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = run(vm, "pgrep -x yes || true").await?;
        if o.stdout.is_empty() {
            break;
        }
        check!(
            Instant::now() < deadline,
            "the firehose of a dropped stream still runs"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

async fn guest_panic_is_an_error(_: &Sandbox) -> Result<(), String> {
    let vm = Sandbox::create(SandboxConfig {
        name: Some("panics".into()),
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let r = async {
        vm.start(BOOT).await.map_err(|e| smolvm::error::chain(&e))?;
        let _ = tokio::time::timeout(
            Duration::from_secs(20),
            run(
                &vm,
                "echo 1 > /proc/sys/kernel/sysrq; echo c > /proc/sysrq-trigger",
            ),
        )
        .await;
        let t = Instant::now();
        loop {
            let info = vm.info().await.map_err(|e| e.to_string())?;
            if !info.state.is_live() {
                check_eq!(info.state, VmState::Error);
                let why = info.last_error.unwrap_or_default();
                check!(why.contains("stopped by itself"), "last_error: {why}");
                check!(why.contains("smolvm logs panics"), "last_error: {why}");
                return Ok(());
            }
            check!(
                t.elapsed() < Duration::from_secs(60),
                "still {} after a kernel panic",
                info.state
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    .await;
    vm.delete().await.map_err(|e| e.to_string())?;
    r
}

async fn disk_size_grows_the_root_fs(_: &Sandbox) -> Result<(), String> {
    let img = smolvm::image::ensure("debian-12", &mut |_| {}).map_err(|e| e.to_string())?;
    let image_mib = std::fs::metadata(&img.rootfs)
        .map_err(|e| e.to_string())?
        .len()
        >> 20;
    let vm = Sandbox::create(SandboxConfig {
        name: Some("bigdisk".into()),
        disk_size_mib: Some(image_mib + 1024),
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let r = async {
        vm.start(BOOT).await.map_err(|e| smolvm::error::chain(&e))?;
        let o = run(&vm, "df -m --output=size / | tail -1").await?;
        let size: u64 = String::from_utf8_lossy(&o.stdout)
            .trim()
            .parse()
            .map_err(|e| format!("df said {:?}: {e}", String::from_utf8_lossy(&o.stdout)))?;
        check!(
            size > image_mib + 512,
            "root fs is {size} MiB; the disk is {} MiB",
            image_mib + 1024
        );
        Ok(())
    }
    .await;
    vm.delete().await.map_err(|e| e.to_string())?;
    r
}

async fn guest_poweroff_is_a_restartable_stop(_: &Sandbox) -> Result<(), String> {
    let vm = Sandbox::create(SandboxConfig {
        name: Some("poweroff".into()),
        ..Default::default()
    })
    .await
    .map_err(|e| e.to_string())?;
    let r = async {
        vm.start(BOOT).await.map_err(|e| smolvm::error::chain(&e))?;
        run(&vm, "echo kept > /root/f; sync").await?;
        let _ = tokio::time::timeout(
            Duration::from_secs(20),
            run(
                &vm,
                "echo 1 > /proc/sys/kernel/sysrq; echo o > /proc/sysrq-trigger; sleep 30",
            ),
        )
        .await;
        let t = Instant::now();
        loop {
            let info = vm.info().await.map_err(|e| e.to_string())?;
            if !info.state.is_live() {
                check_eq!(info.state, VmState::Stopped);
                let why = info.last_error.unwrap_or_default();
                check!(why.contains("shut itself down"), "last_error: {why}");
                break;
            }
            check!(
                t.elapsed() < Duration::from_secs(60),
                "still {} after a poweroff",
                info.state
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        vm.start(BOOT).await.map_err(|e| smolvm::error::chain(&e))?;
        let o = run(&vm, "cat /root/f").await?;
        check_eq!(o.stdout, b"kept\n".to_vec());
        Ok(())
    }
    .await;
    vm.delete().await.map_err(|e| e.to_string())?;
    r
}

fn main() {
    let filters = filter();
    let cases = cases![Sandbox:
        stdout_stderr_apart,
        exit_codes,
        death_by_signal,
        env_and_workdir,
        argv_without_shell,
        timeout_kills_process_group,
        ten_mib_byte_exact,
        non_utf8_bytes,
        twenty_concurrent_execs,
        pid1_is_the_agent,
        accelerator_probe_decides,
        boot_timeout_shows_console,
        vmm_death_is_reported,
        stalled_client_does_not_block_others,
        guest_panic_is_an_error,
        guest_poweroff_is_a_restartable_stop,
        disk_size_grows_the_root_fs,
    ];
    list_if_asked(&case_names(&cases));
    let data = isolated_data_dir("smolvm-test-");
    let rt = runtime();
    let code = rt.block_on(async {
        let vm = match Sandbox::create(SandboxConfig::default()).await {
            Ok(vm) => vm,
            Err(e) => {
                eprintln!("cannot create the shared VM: {}", smolvm::error::chain(&e));
                return summary(0, &["setup".to_string()]);
            }
        };
        if let Err(e) = vm.start(BOOT).await {
            eprintln!("cannot boot the shared VM: {}", smolvm::error::chain(&e));
            let _ = vm.delete().await;
            return summary(0, &["setup".to_string()]);
        }
        let (passed, mut failed) = run_cases(&cases, &vm, &filters, None, || async {}).await;
        if let Err(e) = vm.delete().await {
            eprintln!("cannot delete the shared VM: {e}");
            failed.push("teardown".into());
        }
        summary(passed, &failed)
    });
    drop(rt);
    drop(data);
    std::process::exit(code);
}
