//! End-to-end tests of the `smolvm` binary against real VMs (TCG here):
//! exit codes and streams of `run`, smolvm's own failures (125 +
//! `error: ...`), `--json` outputs, handles on one VM from several processes
//! (one of them killed), an interrupted `start`, and 8 CLI processes working
//! at once.
//!
//! Every case removes the VMs it made, even when it fails (a sweep runs after
//! each case); the last case checks that no file and no process is left.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

#[path = "../../smolvm/tests/common/mod.rs"]
mod common;

use common::*;
use smolvm::{Error, Sandbox, VmState};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};

const SMOLVM: &str = env!("CARGO_BIN_EXE_smolvm");
/// Most time one CLI command may take (8 parallel TCG boots on 2 cores are slow).
const CMD_LIMIT: Duration = Duration::from_secs(600);
const CASE_LIMIT: Duration = Duration::from_secs(900);

#[derive(Debug)]
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(self) -> Result<Self, String> {
        if self.code != Some(0) {
            return Err(format!("exit {:?}; stderr: {}", self.code, self.stderr));
        }
        Ok(self)
    }

    fn json(&self) -> Result<serde_json::Value, String> {
        serde_json::from_str(&self.stdout).map_err(|e| format!("not JSON ({e}): {:?}", self.stdout))
    }
}

fn command(args: &[&str], data_dir: Option<&Path>) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(SMOLVM);
    c.args(args).stdin(Stdio::null()).kill_on_drop(true);
    if let Some(d) = data_dir {
        c.env("SMOLVM_DATA_DIR", d);
    }
    c
}

/// How many supervisors and VMMs run for the VM in `dir` (one of each
/// when it was booted once; the network helpers are not counted).
fn supervisor_and_vmm(dir: &std::path::Path) -> usize {
    processes_in(dir)
        .iter()
        .filter(|(_, cmd)| cmd.contains(" --vm-dir ") || cmd.contains("qemu-system"))
        .count()
}

async fn cli_in(args: &[&str], data_dir: Option<&Path>) -> Result<Out, String> {
    let run = command(args, data_dir).output();
    let o = match tokio::time::timeout(CMD_LIMIT, run).await {
        Err(_) => {
            return Err(format!(
                "`smolvm {}` did not finish within {CMD_LIMIT:?}",
                args.join(" ")
            ))
        }
        Ok(r) => r.map_err(|e| format!("cannot run {SMOLVM}: {e}"))?,
    };
    Ok(Out {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).to_string(),
        stderr: String::from_utf8_lossy(&o.stderr).to_string(),
    })
}

async fn cli(args: &[&str]) -> Result<Out, String> {
    cli_in(args, None).await
}

/// smolvm's own failure: exit 125, `error: ...` on stderr naming `want`.
async fn fails(args: &[&str], want: &[&str]) -> Result<Out, String> {
    let o = cli(args).await?;
    let line = format!("`smolvm {}`", args.join(" "));
    check_eq!(o.code, Some(125));
    check!(
        o.stderr.starts_with("error: "),
        "{line}: stderr does not start with `error: `: {:?}",
        o.stderr
    );
    for w in want {
        check!(
            o.stderr.contains(w),
            "{line}: {w:?} not in stderr: {:?}",
            o.stderr
        );
    }
    check!(o.stdout.is_empty(), "{line}: stdout: {:?}", o.stdout);
    Ok(o)
}

fn e2s(e: Error) -> String {
    smolvm::error::chain(&e)
}

fn data_dir() -> PathBuf {
    smolvm::paths::data_dir()
}

/// Nothing of any VM is left in `dir` (or the default data dir): no VM,
/// empty vms/ and locks/, prune has nothing to do, no processes.
async fn empty_data_dir(dir: Option<&Path>) -> Result<(), String> {
    let d = dir.map(Path::to_path_buf).unwrap_or_else(data_dir);
    let ls = cli_in(&["ls", "--all", "--json"], dir).await?.ok()?;
    check_eq!(ls.json()?, serde_json::json!([]));
    for sub in ["vms", "locks"] {
        let e = dir_entries(&d.join(sub));
        check!(e.is_empty(), "{sub}/ holds {e:?}");
    }
    let p = cli_in(&["prune", "--dry-run"], dir).await?.ok()?;
    check_eq!(p.stdout.trim(), "nothing to prune");
    no_processes_in(&d).await
}

// ------------------------------------------------------------------ cases

async fn own_errors_exit_125() -> Result<(), String> {
    fails(
        &["exec", "no-such-vm", "--", "true"],
        &["VM 'no-such-vm' not found", "smolvm ls"],
    )
    .await?;
    for verb in ["start", "stop", "pause", "resume", "info", "logs"] {
        fails(&[verb, "no-such-vm"], &["VM 'no-such-vm' not found"]).await?;
    }
    fails(&["rm", "no-such-vm"], &["VM 'no-such-vm' not found"]).await?;
    fails(
        &["create", "--cpus", "0"],
        &["0 vCPUs is out of range; use 1-32"],
    )
    .await?;
    fails(&["create", "--cpus", "33"], &["33 vCPUs is out of range"]).await?;
    fails(
        &["create", "--memory", "127"],
        &["memory 127 MiB is out of range; use 128-16384 MiB"],
    )
    .await?;
    fails(
        &["create", "--memory", "16385"],
        &["memory 16385 MiB is out of range"],
    )
    .await?;
    fails(
        &["create", "--disk-size", "1"],
        &["disk size 1 MiB is smaller than the image 'debian-12'"],
    )
    .await?;
    fails(&["create", "--image", "no-such-image"], &["no-such-image"]).await?;
    let long = format!("--name={}", "a".repeat(64));
    for arg in [
        "--name=Upper",
        "--name=..",
        "--name=a/b",
        "--name=/",
        "--name=",
        "--name=-lead",
        long.as_str(),
    ] {
        fails(&["create", arg], &["invalid VM name", "a-z"]).await?;
    }
    fails(
        &["run", "--cpus", "0", "--", "true"],
        &["0 vCPUs is out of range"],
    )
    .await?;
    // Nothing was created by any of them.
    empty_data_dir(None).await?;
    // A duplicate name.
    cli(&["create", "-q", "--name", "dup"]).await?.ok()?;
    fails(
        &["create", "--name", "dup"],
        &["VM 'dup' already exists", "smolvm rm dup"],
    )
    .await?;
    let info = cli(&["info", "--json", "dup"]).await?;
    check_eq!(info.ok()?.json()?["state"], "created");
    cli(&["rm", "dup"]).await?.ok()?;
    empty_data_dir(None).await
}

async fn json_outputs() -> Result<(), String> {
    let c = cli(&[
        "create", "--json", "--name", "js", "--cpus", "2", "--memory", "256",
    ])
    .await?;
    let v = c.ok()?.json()?;
    check_eq!(v["id"], "js");
    check_eq!(v["state"], "created");
    check_eq!(v["cpus"], 2);
    check_eq!(v["memory_mib"], 256);
    check_eq!(v["boot_count"], 0);
    check!(
        v["vm_dir"].as_str().is_some_and(|d| d.ends_with("/vms/js")),
        "vm_dir: {}",
        v["vm_dir"]
    );
    let i = cli(&["info", "--json", "js"]).await?.ok()?.json()?;
    check_eq!(i, v);
    // ls shows live VMs; --all shows every VM.
    check_eq!(
        cli(&["ls", "--json"]).await?.ok()?.json()?,
        serde_json::json!([])
    );
    let all = cli(&["ls", "--all", "--json"]).await?.ok()?.json()?;
    check_eq!(all.as_array().map(|a| a.len()), Some(1));
    check_eq!(all[0], v);
    // Unnamed: a generated id.
    let u = cli(&["create", "--json"]).await?.ok()?.json()?;
    let id = u["id"].as_str().ok_or("no id")?.to_string();
    check!(
        id.starts_with("sbx-") && id.len() == 12,
        "generated id {id:?}"
    );
    let pr = cli(&["prune", "--dry-run", "--json"]).await?.ok()?.json()?;
    check_eq!(pr, serde_json::json!([]));
    cli(&["rm", "js", &id]).await?.ok()?;
    empty_data_dir(None).await
}

/// `smolvm run -q` in a small VM with a generous boot timeout, then `args`.
async fn run_cli(args: &[&str]) -> Result<Out, String> {
    let mut all = vec!["run", "-q", "--memory", "256", "--boot-timeout", "300"];
    all.extend_from_slice(args);
    cli(&all).await
}

async fn run_exit_codes_and_streams() -> Result<(), String> {
    let o = run_cli(&["--", "sh", "-c", "echo out; echo err >&2; echo out2"]).await?;
    check_eq!(o.code, Some(0));
    check_eq!(o.stdout, "out\nout2\n");
    check_eq!(o.stderr, "err\n");
    let o = run_cli(&["--shell", "--", "echo seven; exit 7"]).await?;
    check_eq!(o.code, Some(7));
    check_eq!(o.stdout, "seven\n");
    check_eq!(o.stderr, "");
    let o = run_cli(&["--", "sh", "-c", "echo e >&2; exit 255"]).await?;
    check_eq!(o.code, Some(255));
    check_eq!(o.stdout, "");
    check_eq!(o.stderr, "e\n");
    // `run` removes its sandbox.
    empty_data_dir(None).await
}

/// One VM, several processes: the CLI processes that created and started
/// it are gone; this process holds a handle while other CLI processes use
/// the VM, one of them is killed mid-command, another restarts the VM,
/// pauses it, and finally the supervisor is killed.
async fn cross_process_handles() -> Result<(), String> {
    cli(&["create", "-q", "--name", "xp", "--memory", "256"])
        .await?
        .ok()?;
    let s = cli(&["start", "-q", "--boot-timeout", "300", "xp"]).await?;
    check_eq!(s.ok()?.stdout, "xp\n");
    // Reconnect from this process: the creator and starter have exited.
    let h = Sandbox::from_id("xp").await.map_err(e2s)?;
    check_eq!(h.status().await.map_err(e2s)?, VmState::Running);
    let boot = out(&h, "cat /proc/sys/kernel/random/boot_id").await?;
    // Another process while this one holds its handle.
    let e = cli(&["exec", "xp", "--", "cat", "/proc/sys/kernel/random/boot_id"]).await?;
    check_eq!(e.ok()?.stdout.trim(), boot);
    let info = cli(&["info", "--json", "xp"]).await?.ok()?.json()?;
    check_eq!(info["state"], "running");
    let mine = h.info().await.map_err(e2s)?;
    check_eq!(info["vmm_pid"].as_u64(), mine.vmm_pid.map(u64::from));
    check_eq!(
        info["supervisor_pid"].as_u64(),
        mine.supervisor_pid.map(u64::from)
    );
    // Exit codes through `exec`, streams apart.
    let o = cli(&["exec", "xp", "--", "sh", "-c", "echo o; echo e >&2; exit 7"]).await?;
    check_eq!(
        (o.code, o.stdout.as_str(), o.stderr.as_str()),
        (Some(7), "o\n", "e\n")
    );
    let o = cli(&["exec", "xp", "--shell", "--", "kill -9 $$"]).await?;
    check_eq!(o.code, Some(137));

    // A client process killed mid-command: the VM and this handle carry on,
    // and the command it left behind is ended.
    let mut child = command(
        &[
            "exec",
            "xp",
            "--",
            "sh",
            "-c",
            "echo $$ > /tmp/victim; echo started; exec sleep 1000",
        ],
        None,
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    let first = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await;
    check!(
        matches!(&first, Ok(Ok(Some(l))) if l == "started"),
        "the exec child said {first:?}"
    );
    let victim = out(&h, "cat /tmp/victim").await?;
    check!(
        !out(&h, &format!("cat /proc/{victim}/comm"))
            .await?
            .is_empty(),
        "no victim"
    );
    child.start_kill().map_err(|e| e.to_string())?;
    let _ = child.wait().await;
    let gone = out(
        &h,
        &format!(
            "for i in $(seq 100); do [ -d /proc/{victim} ] || exit 0; sleep 0.1; done; echo alive"
        ),
    )
    .await?;
    check_eq!(gone, "");
    check_eq!(h.status().await.map_err(e2s)?, VmState::Running);
    check_eq!(
        cli(&["exec", "xp", "--", "echo", "still"])
            .await?
            .ok()?
            .stdout,
        "still\n"
    );

    // Another process stops and starts the VM: this handle follows.
    check_eq!(cli(&["stop", "xp"]).await?.ok()?.stdout, "xp\n");
    check_eq!(h.status().await.map_err(e2s)?, VmState::Stopped);
    cli(&["start", "-q", "--boot-timeout", "300", "xp"])
        .await?
        .ok()?;
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        out(&h, "cat /proc/sys/kernel/random/boot_id"),
    )
    .await;
    let new_boot =
        r.map_err(|_| "exec through the old handle hung after a restart".to_string())??;
    check!(new_boot != boot, "no new boot");

    // Paused by another process.
    cli(&["pause", "xp"]).await?.ok()?;
    check_eq!(h.status().await.map_err(e2s)?, VmState::Paused);
    match h.run("true").await {
        Err(e @ Error::InvalidState { .. }) => {
            let m = e2s(e);
            check!(
                m.contains("'xp' is paused") && m.contains("smolvm resume xp"),
                "{m}"
            );
        }
        other => return Err(format!("exec on a paused VM gave {other:?}")),
    }
    fails(
        &["exec", "xp", "--", "true"],
        &["VM 'xp' is paused", "smolvm resume xp"],
    )
    .await?;
    fails(&["pause", "xp"], &["VM 'xp' is paused", "smolvm resume xp"]).await?;
    cli(&["resume", "xp"]).await?.ok()?;
    fails(
        &["resume", "xp"],
        &["VM 'xp' is running", "smolvm pause xp"],
    )
    .await?;
    check_eq!(out(&h, "echo back").await?, "back");
    // rm refuses a live VM without -f.
    fails(
        &["rm", "xp"],
        &["VM 'xp' is running", "smolvm stop xp", "smolvm rm -f xp"],
    )
    .await?;
    check_eq!(h.status().await.map_err(e2s)?, VmState::Running);

    // The supervisor is killed: every process sees `error`, with the reason.
    let info = h.info().await.map_err(e2s)?;
    let (sup, vmm) = (
        info.supervisor_pid.ok_or("no supervisor")?,
        info.vmm_pid.ok_or("no VMM")?,
    );
    // SAFETY: kill(2) of the supervisor pid just read for our own VM.
    unsafe { libc::kill(sup as i32, libc::SIGKILL) };
    check!(
        wait_pid_gone(vmm, Duration::from_secs(5)).await,
        "the VMM outlived its supervisor"
    );
    let i = cli(&["info", "--json", "xp"]).await?.ok()?.json()?;
    check_eq!(i["state"], "error");
    let why = i["last_error"].as_str().unwrap_or_default().to_string();
    check!(
        why.contains(&format!("supervisor (pid {sup}) died unexpectedly")),
        "last_error: {why}"
    );
    let ls = cli(&["ls"]).await?.ok()?.stdout;
    check!(!ls.contains("xp"), "ls (live only) lists an error VM: {ls}");
    let ls = cli(&["ls", "--all"]).await?.ok()?.stdout;
    check!(
        ls.lines()
            .any(|l| l.starts_with("xp ") && l.contains(" error ")),
        "ls --all: {ls}"
    );
    fails(
        &["exec", "xp", "--", "true"],
        &["VM 'xp' is error", "died unexpectedly", "smolvm rm xp"],
    )
    .await?;
    fails(&["start", "xp"], &["VM 'xp' is error", "smolvm rm xp"]).await?;
    check_eq!(h.status().await.map_err(e2s)?, VmState::Error);
    cli(&["stop", "xp"]).await?.ok()?;
    check_eq!(cli(&["rm", "xp"]).await?.ok()?.stdout, "xp\n");
    match h.status().await {
        Err(Error::NotFound(_)) => {}
        other => return Err(format!("status of a removed VM: {other:?}")),
    }
    h.close();
    empty_data_dir(None).await
}

async fn out(h: &Sandbox, cmd: &str) -> Result<String, String> {
    let o = h.run(cmd).await.map_err(e2s)?;
    if !o.ok() {
        return Err(format!(
            "`{cmd}`: {:?} {}",
            o.exit_code,
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Kills `smolvm start` once the supervisor is up but before the guest is
/// ready. The next `start` must finish that boot (not start a second VMM on
/// the same disk), and `stop` must end an interrupted boot.
async fn interrupted_start_recovers() -> Result<(), String> {
    // Cold: a warm start is ready in ~0.3 s, before the kill can land
    // between the supervisor's start and the guest's readiness.
    cli(&["create", "-q", "--cold", "--name", "ks", "--memory", "256"])
        .await?
        .ok()?;
    let vm_dir = data_dir().join("vms/ks");
    for round in 0..2 {
        let mut child = command(&["start", "-q", "--boot-timeout", "300", "ks"], None)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        // Wait for the supervisor to record its processes, then kill the CLI.
        let t = Instant::now();
        let sup = loop {
            let i = cli(&["info", "--json", "ks"]).await?.ok()?.json()?;
            if let Some(p) = i["supervisor_pid"].as_u64() {
                break p as u32;
            }
            check!(
                t.elapsed() < Duration::from_secs(120),
                "no supervisor appeared"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        child.start_kill().map_err(|e| e.to_string())?;
        let _ = child.wait().await;
        let i = cli(&["info", "--json", "ks"]).await?.ok()?.json()?;
        check!(
            i["state"] != "running",
            "round {round}: running before anyone saw it ready: {i}"
        );
        check!(
            pid_alive(sup),
            "round {round}: the supervisor died with its creator"
        );
        if round == 0 {
            // start again: it waits for that boot instead of booting twice.
            cli(&["start", "-q", "--boot-timeout", "300", "ks"])
                .await?
                .ok()?;
            let i = cli(&["info", "--json", "ks"]).await?.ok()?.json()?;
            check_eq!(i["state"], "running");
            check_eq!(i["supervisor_pid"].as_u64(), Some(u64::from(sup)));
            check_eq!(i["boot_count"], 1);
            check_eq!(supervisor_and_vmm(&vm_dir), 2);
            check_eq!(
                cli(&["exec", "ks", "--", "hostname"]).await?.ok()?.stdout,
                "ks\n"
            );
            cli(&["stop", "ks"]).await?.ok()?;
        } else {
            // stop ends the interrupted boot; the VM keeps its state.
            cli(&["stop", "ks"]).await?.ok()?;
            check!(
                wait_pid_gone(sup, Duration::from_secs(5)).await,
                "the supervisor outlived stop"
            );
            no_processes_in(&vm_dir).await?;
            let i = cli(&["info", "--json", "ks"]).await?.ok()?.json()?;
            check_eq!(i["state"], "stopped");
            check_eq!(i["supervisor_pid"], serde_json::Value::Null);
            // ... and a start after that boots normally.
            cli(&["start", "-q", "--boot-timeout", "300", "ks"])
                .await?
                .ok()?;
            check_eq!(
                cli(&["exec", "ks", "--", "hostname"]).await?.ok()?.stdout,
                "ks\n"
            );
        }
    }
    cli(&["rm", "-f", "ks"]).await?.ok()?;
    empty_data_dir(None).await
}

/// Lifecycle operations on one VM from several processes at once are
/// serialized: three `start`s boot it once, two `stop`s stop it once.
async fn concurrent_ops_on_one_vm() -> Result<(), String> {
    cli(&["create", "-q", "--name", "cc", "--memory", "256"])
        .await?
        .ok()?;
    let starts = (0..3)
        .map(|_| cli(&["start", "-q", "--boot-timeout", "300", "cc"]))
        .collect();
    for (i, o) in join_all(starts).await.into_iter().enumerate() {
        let o = o?;
        check!(o.code == Some(0), "start {i}: {o:?}");
    }
    let i = cli(&["info", "--json", "cc"]).await?.ok()?.json()?;
    check_eq!(i["state"], "running");
    check_eq!(i["boot_count"], 1);
    check_eq!(supervisor_and_vmm(&data_dir().join("vms/cc")), 2);
    let stops = (0..2).map(|_| cli(&["stop", "cc"])).collect();
    for (i, o) in join_all(stops).await.into_iter().enumerate() {
        let o = o?;
        check!(o.code == Some(0), "stop {i}: {o:?}");
    }
    let i = cli(&["info", "--json", "cc"]).await?.ok()?.json()?;
    check_eq!(i["state"], "stopped");
    check_eq!(i["last_error"], serde_json::Value::Null);
    cli(&["rm", "cc"]).await?.ok()?;
    empty_data_dir(None).await
}

/// 8 CLI processes at once, each creating (4 named, 4 generated ids),
/// starting, running a command in and removing its own VM, in a data dir
/// that does not exist yet (they also race to create the state store).
async fn eight_processes_at_once() -> Result<(), String> {
    let parent = tempfile::Builder::new()
        .prefix("smolvm-par-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let dir = parent.path().join("data");
    let script = r#"
set -e
if [ -n "$NAME" ]; then id=$("$S" create -q --memory 256 --name "$NAME"); else id=$("$S" create -q --memory 256); fi
echo "id=$id"
"$S" start -q --boot-timeout 300 "$id" >/dev/null
echo "hostname=$("$S" exec "$id" -- cat /proc/sys/kernel/hostname)"
"$S" exec "$id" -- sh -c 'echo x > /root/x && sync'
"$S" rm -f "$id" >/dev/null
echo done
"#;
    let t = Instant::now();
    let mut children = Vec::new();
    for i in 0..8 {
        let mut c = tokio::process::Command::new("sh");
        c.arg("-c")
            .arg(script)
            .env("S", SMOLVM)
            .env("SMOLVM_DATA_DIR", &dir)
            .env(
                "NAME",
                if i % 2 == 0 {
                    format!("par-{i}")
                } else {
                    String::new()
                },
            )
            .stdin(Stdio::null())
            .kill_on_drop(true);
        children.push(c.output());
    }
    let joined = tokio::time::timeout(CMD_LIMIT, join_all(children)).await;
    let result = async {
        let outs =
            joined.map_err(|_| format!("the 8 processes did not finish within {CMD_LIMIT:?}"))?;
        let mut ids = Vec::new();
        for (i, o) in outs.into_iter().enumerate() {
            let o = o.map_err(|e| e.to_string())?;
            let (so, se) = (
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr),
            );
            check!(
                !se.contains("database is locked") && !so.contains("database is locked"),
                "process {i}: {se}"
            );
            check!(
                o.status.success(),
                "process {i} failed ({:?}): stdout {so:?} stderr {se:?}",
                o.status
            );
            let id = so
                .lines()
                .find_map(|l| l.strip_prefix("id="))
                .ok_or(format!("process {i}: {so}"))?
                .to_string();
            if i % 2 == 0 {
                check_eq!(id, format!("par-{i}"));
            } else {
                check!(id.starts_with("sbx-"), "process {i}: id {id}");
            }
            check!(
                so.contains(&format!("hostname={id}\n")),
                "process {i}: {so}"
            );
            check!(so.ends_with("done\n"), "process {i}: {so}");
            ids.push(id);
        }
        let mut uniq = ids.clone();
        uniq.sort();
        uniq.dedup();
        check_eq!(uniq.len(), 8);
        empty_data_dir(Some(&dir)).await
    }
    .await;
    println!("    (8 processes: {:.1}s)", t.elapsed().as_secs_f64());
    if result.is_err() {
        sweep_in(Some(&dir)).await;
        kill_processes_in(&dir);
    }
    result
}

async fn join_all<F: Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut handles: Vec<Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut results: Vec<Option<F::Output>> = (0..handles.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, h) in handles.iter_mut().enumerate() {
            if results[i].is_none() {
                match h.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => results[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    results.into_iter().flatten().collect()
}

/// A `run` killed by SIGTERM or SIGINT, during boot or during the command,
/// removes its sandbox and exits 128+signal.
async fn run_interrupted_cleans_up() -> Result<(), String> {
    for (signal, code, wait_for_running) in [(libc::SIGTERM, 143, false), (libc::SIGINT, 130, true)]
    {
        let child = command(
            &[
                "run",
                "-q",
                "--memory",
                "256",
                "--boot-timeout",
                "300",
                "--",
                "sleep",
                "300",
            ],
            None,
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
        let t = Instant::now();
        loop {
            let ls = cli(&["ls", "--all", "--json"]).await?.json()?;
            let states: Vec<String> = ls
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v["state"].as_str().map(str::to_string))
                .collect();
            let ready = if wait_for_running {
                states.iter().any(|s| s == "running")
            } else {
                !states.is_empty()
            };
            if ready {
                break;
            }
            check!(
                t.elapsed() < Duration::from_secs(120),
                "the sandbox never appeared"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let pid = child.id().ok_or("no pid")? as i32;
        // SAFETY: signalling the child process we spawned.
        unsafe { libc::kill(pid, signal) };
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .map_err(|_| "`smolvm run` did not exit after the signal".to_string())?
            .map_err(|e| e.to_string())?;
        check_eq!(out.status.code(), Some(code));
        let err = String::from_utf8_lossy(&out.stderr);
        check!(
            err.contains("interrupted; removing sandbox"),
            "stderr: {err}"
        );
        empty_data_dir(None).await?;
    }
    Ok(())
}

async fn nothing_leaked() -> Result<(), String> {
    sweep_in(None).await;
    empty_data_dir(None).await
}

/// Removes every VM in `dir` (best effort).
async fn sweep_in(dir: Option<&Path>) {
    let Ok(ls) = cli_in(&["ls", "--all", "--json"], dir).await else {
        return;
    };
    let Ok(v) = ls.json() else { return };
    for id in v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x["id"].as_str())
    {
        match cli_in(&["rm", "-f", id], dir).await {
            Ok(o) if o.code == Some(0) => {}
            other => eprintln!("cleanup: cannot remove {id}: {other:?}"),
        }
    }
}

fn main() {
    let filters = filter();
    let cases = cases![
        own_errors_exit_125,
        json_outputs,
        run_exit_codes_and_streams,
        cross_process_handles,
        interrupted_start_recovers,
        concurrent_ops_on_one_vm,
        eight_processes_at_once,
        run_interrupted_cleans_up,
        nothing_leaked,
    ];
    list_if_asked(&case_names(&cases));
    let data = isolated_data_dir("smolvm-cli-test-");
    let rt = runtime();
    let started = Instant::now();
    let code = rt.block_on(async {
        let (passed, failed) =
            run_cases(&cases, &(), &filters, Some(CASE_LIMIT), || sweep_in(None)).await;
        summary(passed, &failed)
    });
    println!("cli: {:.1}s", started.elapsed().as_secs_f64());
    kill_processes_in(data.path());
    drop(rt);
    drop(data);
    std::process::exit(code);
}
