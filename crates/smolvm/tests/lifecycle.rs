//! End-to-end tests of the VM lifecycle against real VMs (TCG here): every
//! cell of the operation × state table, crash truth after `kill -9` of the
//! VMM and of the supervisor, persistence across stop/start, and deletion
//! that leaves nothing behind.
//!
//! The `walk_*` cases share one VM ("walk") and run in order: it goes
//! created → running → paused → running → stopped → running → paused →
//! stopped → running → error → deleted, testing every operation in every
//! state on the way. Other cases own their VMs. After every case all VMs but
//! "walk" are deleted (so a failing case leaves nothing behind), and the last
//! case checks that no file and no process outlived them.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use common::*;
use smolvm::error::chain;
use smolvm::state::Store;
use smolvm::{Error, Sandbox, SandboxConfig, VmState};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const BOOT: Duration = Duration::from_secs(180);
const STOP: Duration = Duration::from_secs(30);
/// A case that runs longer than this is failed (a hang must not stall the run).
const CASE_LIMIT: Duration = Duration::from_secs(600);
const WALK: &str = "walk";

fn e2s(e: Error) -> String {
    chain(&e)
}

fn config(name: &str) -> SandboxConfig {
    SandboxConfig {
        name: Some(name.to_string()),
        memory_mib: 256,
        ..Default::default()
    }
}

async fn handle(id: &str) -> Result<Sandbox, String> {
    Sandbox::from_id(id).await.map_err(e2s)
}

async fn state_of(id: &str) -> Result<VmState, String> {
    handle(id).await?.status().await.map_err(e2s)
}

async fn sh(vm: &Sandbox, cmd: &str) -> Result<String, String> {
    let o = vm.run(cmd).await.map_err(e2s)?;
    if !o.ok() {
        return Err(format!(
            "`{cmd}` failed ({:?}): {}",
            o.exit_code,
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

async fn boot_id(vm: &Sandbox) -> Result<String, String> {
    sh(vm, "cat /proc/sys/kernel/random/boot_id").await
}

/// An operation refused for the VM's state: the message names the VM, its
/// state and what to run instead (`smolvm <run>`).
fn refused<T>(
    what: &str,
    r: smolvm::Result<T>,
    id: &str,
    state: VmState,
    run: &str,
) -> Result<String, String> {
    let e = match r {
        Ok(_) => {
            return Err(format!(
                "{what} on a {state} VM succeeded; it must be refused"
            ))
        }
        Err(e) => e,
    };
    let m = chain(&e);
    check!(
        matches!(e, Error::InvalidState { .. }),
        "{what} on {state}: not InvalidState: {m}"
    );
    check!(
        m.contains(&format!("'{id}'")),
        "{what} on {state}: the message does not name the VM: {m}"
    );
    check!(
        m.contains(&format!(" {state}")),
        "{what} on {state}: the message does not name the state: {m}"
    );
    check!(
        m.contains(&format!("smolvm {run}")),
        "{what} on {state}: the message does not say `smolvm {run}`: {m}"
    );
    Ok(m)
}

fn data_dir() -> PathBuf {
    smolvm::paths::data_dir()
}

/// Nothing of VM `id` is left: no row, no directory (overlay, logs, sockets),
/// no lock file, and prune finds no leftovers.
async fn nothing_left(id: &str) -> Result<(), String> {
    let row = Store::open()
        .map_err(|e| e.to_string())?
        .get(id)
        .map_err(|e| e.to_string())?;
    check!(row.is_none(), "the row of {id} is still there: {row:?}");
    let dir = smolvm::paths::vm_dir(id);
    check!(
        !dir.exists(),
        "{} is still there: {:?}",
        dir.display(),
        dir_entries(&dir)
    );
    let lock = smolvm::paths::lock_path(id);
    check!(!lock.exists(), "{} is still there", lock.display());
    match Sandbox::from_id(id).await {
        Err(Error::NotFound(_)) => {}
        other => {
            return Err(format!(
                "from_id of a deleted VM gave {:?}",
                other.map(|s| s.id().to_string())
            ))
        }
    }
    let items = smolvm::sandbox::prune(true, true).await.map_err(e2s)?;
    check!(
        items.is_empty(),
        "prune --dry-run finds leftovers: {items:?}"
    );
    Ok(())
}

/// Deletes `vm` and checks that it took everything with it, processes too.
async fn delete_and_check(vm: Sandbox) -> Result<(), String> {
    let id = vm.id().to_string();
    let info = vm.info().await.map_err(e2s)?;
    vm.delete().await.map_err(e2s)?;
    for pid in [info.vmm_pid, info.supervisor_pid].into_iter().flatten() {
        check!(
            wait_pid_gone(pid, Duration::from_secs(5)).await,
            "pid {pid} of {id} outlived its delete"
        );
    }
    nothing_left(&id).await
}

// ---------------------------------------------------------------- refusals

async fn bad_names_refused() -> Result<(), String> {
    let long = "a".repeat(64);
    for name in [
        "Upper",
        "ABC",
        "..",
        ".",
        "../x",
        "a/b",
        "/",
        "",
        long.as_str(),
        "-lead",
        "_lead",
        "a.b",
        "a b",
        "é",
    ] {
        let r = Sandbox::create(config(name)).await;
        let m = match r {
            Ok(vm) => {
                let _ = vm.delete().await;
                return Err(format!("name {name:?} was accepted"));
            }
            Err(e) => chain(&e),
        };
        check!(m.contains("invalid VM name"), "name {name:?}: {m}");
        check!(
            m.contains(&format!("{name:?}")),
            "the message does not quote the name {name:?}: {m}"
        );
        check!(
            m.contains("a-z"),
            "the message does not say what is allowed: {m}"
        );
        nothing_created(name)?;
    }
    // 63 characters is the longest accepted name.
    let ok = "a".repeat(63);
    let vm = Sandbox::create(config(&ok)).await.map_err(e2s)?;
    delete_and_check(vm).await
}

/// No row, no VM directory, no lock file, nothing at all under vms/ and
/// locks/ (the name may be a path: check the directories are empty).
fn nothing_created(name: &str) -> Result<(), String> {
    let rows = Store::open()
        .map_err(|e| e.to_string())?
        .list()
        .map_err(|e| e.to_string())?;
    check!(
        rows.is_empty(),
        "{name:?}: rows were created: {:?}",
        rows.iter().map(|r| &r.id).collect::<Vec<_>>()
    );
    let data = data_dir();
    for d in ["vms", "locks"] {
        let e = dir_entries(&data.join(d));
        check!(e.is_empty(), "{name:?}: {d}/ holds {e:?}");
    }
    let top: Vec<String> = dir_entries(&data)
        .into_iter()
        // `snapshots/` holds the warm boot snapshots earlier cases left.
        .filter(|n| {
            !matches!(n.as_str(), "vms" | "locks" | "snapshots") && !n.starts_with("smolvm.db")
        })
        .collect();
    check!(
        top.is_empty(),
        "{name:?}: unexpected files in the data dir: {top:?}"
    );
    Ok(())
}

async fn bad_config_refused() -> Result<(), String> {
    let base = || SandboxConfig {
        name: Some("badcfg".into()),
        ..Default::default()
    };
    let cases: Vec<(SandboxConfig, &str)> = vec![
        (
            SandboxConfig { cpus: 0, ..base() },
            "0 vCPUs is out of range; use 1-32",
        ),
        (
            SandboxConfig { cpus: 33, ..base() },
            "33 vCPUs is out of range; use 1-32",
        ),
        (
            SandboxConfig {
                memory_mib: 127,
                ..base()
            },
            "memory 127 MiB is out of range; use 128-16384 MiB",
        ),
        (
            SandboxConfig {
                memory_mib: 16385,
                ..base()
            },
            "memory 16385 MiB is out of range; use 128-16384 MiB",
        ),
        (
            SandboxConfig {
                disk_size_mib: Some(1),
                ..base()
            },
            "disk size 1 MiB is smaller than the image 'debian-12'",
        ),
        (
            SandboxConfig {
                image: "no-such-image".into(),
                ..base()
            },
            "no-such-image",
        ),
    ];
    for (cfg, want) in cases {
        let what = format!("{cfg:?}");
        match Sandbox::create(cfg).await {
            Ok(vm) => {
                let _ = vm.delete().await;
                return Err(format!("{what} was accepted"));
            }
            Err(e) => {
                let m = chain(&e);
                check!(m.contains(want), "{what}: expected {want:?} in: {m}");
            }
        }
        nothing_created("badcfg")?;
    }
    // The limits themselves are accepted.
    for cfg in [
        SandboxConfig {
            cpus: 32,
            memory_mib: 16384,
            ..base()
        },
        SandboxConfig {
            cpus: 1,
            memory_mib: 128,
            ..base()
        },
    ] {
        let vm = Sandbox::create(cfg).await.map_err(e2s)?;
        delete_and_check(vm).await?;
    }
    Ok(())
}

async fn duplicate_name_refused() -> Result<(), String> {
    let vm = Sandbox::create(config("dup")).await.map_err(e2s)?;
    let created_at = vm.info().await.map_err(e2s)?.created_at;
    let m = match Sandbox::create(SandboxConfig {
        cpus: 2,
        ..config("dup")
    })
    .await
    {
        Ok(_) => return Err("a second VM named dup was created".into()),
        Err(e) => chain(&e),
    };
    check!(m.contains("'dup' already exists"), "{m}");
    check!(m.contains("smolvm rm dup"), "{m}");
    // The first VM is untouched.
    let info = handle("dup").await?.info().await.map_err(e2s)?;
    check_eq!(info.state, VmState::Created);
    check_eq!(info.cpus, 1);
    check_eq!(info.created_at, created_at);
    check!(
        vm.vm_dir().join("disk.qcow2").exists(),
        "the first VM's disk is gone"
    );
    check_eq!(Sandbox::list().await.map_err(e2s)?.len(), 1);
    delete_and_check(vm).await
}

// ------------------------------------------------------------- the walk

async fn walk_created_cells() -> Result<(), String> {
    let vm = Sandbox::create(config(WALK)).await.map_err(e2s)?;
    check_eq!(vm.status().await.map_err(e2s)?, VmState::Created);
    let s = VmState::Created;
    refused("pause", vm.pause().await, WALK, s, "start walk")?;
    refused("resume", vm.resume().await, WALK, s, "start walk")?;
    refused("exec", vm.run("true").await, WALK, s, "start walk")?;
    refused("ping", vm.ping().await, WALK, s, "start walk")?;
    // stop: no-op.
    vm.stop(STOP).await.map_err(e2s)?;
    let info = vm.info().await.map_err(e2s)?;
    check_eq!(info.state, VmState::Created);
    check_eq!(info.boot_count, 0);
    check_eq!(info.supervisor_pid, None);
    // close: releases the handle only.
    vm.close();
    let vm = handle(WALK).await?;
    check_eq!(vm.status().await.map_err(e2s)?, VmState::Created);
    check!(
        vm.vm_dir().join("disk.qcow2").exists(),
        "no disk overlay after create"
    );
    Ok(())
}

async fn walk_start_boots_created() -> Result<(), String> {
    let vm = handle(WALK).await?;
    vm.start(BOOT).await.map_err(e2s)?;
    let info = vm.info().await.map_err(e2s)?;
    check_eq!(info.state, VmState::Running);
    check_eq!(info.boot_count, 1);
    check!(info.vmm_pid.is_some_and(pid_alive), "no live VMM: {info:?}");
    check!(
        info.supervisor_pid.is_some_and(pid_alive),
        "no live supervisor: {info:?}"
    );
    check!(vm.last_boot().is_some(), "no boot timings recorded");
    check_eq!(sh(&vm, "hostname").await?, WALK);
    Ok(())
}

async fn walk_running_cells() -> Result<(), String> {
    let vm = handle(WALK).await?;
    let before = vm.info().await.map_err(e2s)?;
    let boot = boot_id(&vm).await?;
    // start: no-op (no second boot, same VMM).
    vm.start(BOOT).await.map_err(e2s)?;
    let after = vm.info().await.map_err(e2s)?;
    check_eq!(after.state, VmState::Running);
    check_eq!(after.boot_count, before.boot_count);
    check_eq!(after.vmm_pid, before.vmm_pid);
    check_eq!(boot_id(&vm).await?, boot);
    // resume: refused.
    refused(
        "resume",
        vm.resume().await,
        WALK,
        VmState::Running,
        "pause walk",
    )?;
    // exec works; a second handle in the same process works beside the first.
    let other = handle(WALK).await?;
    check_eq!(sh(&other, "echo two").await?, "two");
    check_eq!(sh(&vm, "echo one").await?, "one");
    vm.ping().await.map_err(e2s)?;
    // close: the VM keeps running, the other handle keeps working.
    vm.close();
    check_eq!(other.status().await.map_err(e2s)?, VmState::Running);
    check_eq!(boot_id(&other).await?, boot);
    let info = other.info().await.map_err(e2s)?;
    check!(
        info.vmm_pid.is_some_and(pid_alive),
        "the VMM died with a closed handle"
    );
    // A file for the stop/start case.
    sh(
        &other,
        "echo persisted-$(cat /proc/sys/kernel/random/boot_id) > /root/keep.txt && sync",
    )
    .await?;
    Ok(())
}

async fn walk_paused_cells() -> Result<(), String> {
    let vm = handle(WALK).await?;
    let boot = boot_id(&vm).await?;
    let pid = vm.info().await.map_err(e2s)?.vmm_pid;
    // running -> paused
    vm.pause().await.map_err(e2s)?;
    check_eq!(vm.status().await.map_err(e2s)?, VmState::Paused);
    let s = VmState::Paused;
    refused("pause", vm.pause().await, WALK, s, "resume walk")?;
    refused("exec", vm.run("true").await, WALK, s, "resume walk")?;
    // A handle opened while paused sees paused.
    check_eq!(state_of(WALK).await?, VmState::Paused);
    // paused -> resume -> running, the same guest (no reboot).
    vm.resume().await.map_err(e2s)?;
    check_eq!(vm.status().await.map_err(e2s)?, VmState::Running);
    check_eq!(boot_id(&vm).await?, boot);
    // paused -> start resumes.
    vm.pause().await.map_err(e2s)?;
    vm.start(BOOT).await.map_err(e2s)?;
    let info = vm.info().await.map_err(e2s)?;
    check_eq!(info.state, VmState::Running);
    check_eq!(info.boot_count, 1);
    check_eq!(info.vmm_pid, pid);
    check_eq!(boot_id(&vm).await?, boot);
    // close on a paused VM leaves it paused.
    vm.pause().await.map_err(e2s)?;
    vm.close();
    check_eq!(state_of(WALK).await?, VmState::Paused);
    handle(WALK).await?.resume().await.map_err(e2s)?;
    Ok(())
}

async fn walk_stop_running_is_graceful() -> Result<(), String> {
    let vm = handle(WALK).await?;
    let info = vm.info().await.map_err(e2s)?;
    check_eq!(info.state, VmState::Running);
    let t = Instant::now();
    vm.stop(STOP).await.map_err(e2s)?;
    let took = t.elapsed();
    let after = vm.info().await.map_err(e2s)?;
    check_eq!(after.state, VmState::Stopped);
    check_eq!(after.last_error, None);
    check_eq!(after.vmm_pid, None);
    check_eq!(after.supervisor_pid, None);
    // Graceful: well before the kill timeout, and the guest shut itself down.
    check!(
        took < STOP,
        "stop took {took:?}: the VMM was killed, not shut down"
    );
    let sup_log = std::fs::read_to_string(vm.vm_dir().join("supervisor.log")).unwrap_or_default();
    check!(
        !sup_log.contains("killing the VMM"),
        "the guest did not shut down: {sup_log}"
    );
    check!(
        sup_log.contains("VMM exited with status 0"),
        "the VMM did not exit cleanly: {sup_log}"
    );
    let console = std::fs::read_to_string(vm.vm_dir().join("console.log")).unwrap_or_default();
    check!(
        console.contains("reboot:"),
        "the guest kernel did not shut down: {console}"
    );
    for pid in [info.vmm_pid, info.supervisor_pid].into_iter().flatten() {
        check!(
            wait_pid_gone(pid, Duration::from_secs(5)).await,
            "pid {pid} outlived stop"
        );
    }
    for f in ["sup.sock", "qmp.sock", "agent.sock", "memory"] {
        check!(!vm.vm_dir().join(f).exists(), "{f} left behind by stop");
    }
    check!(
        vm.vm_dir().join("disk.qcow2").exists(),
        "stop removed the disk"
    );
    Ok(())
}

async fn walk_stopped_cells() -> Result<(), String> {
    let vm = handle(WALK).await?;
    let s = VmState::Stopped;
    check_eq!(vm.status().await.map_err(e2s)?, s);
    vm.stop(STOP).await.map_err(e2s)?;
    check_eq!(vm.status().await.map_err(e2s)?, s);
    refused("pause", vm.pause().await, WALK, s, "start walk")?;
    refused("resume", vm.resume().await, WALK, s, "start walk")?;
    refused("exec", vm.run("true").await, WALK, s, "start walk")?;
    vm.close();
    check_eq!(state_of(WALK).await?, s);
    Ok(())
}

async fn walk_start_stopped_keeps_disk() -> Result<(), String> {
    let vm = handle(WALK).await?;
    vm.start(BOOT).await.map_err(e2s)?;
    let info = vm.info().await.map_err(e2s)?;
    check_eq!(info.state, VmState::Running);
    check_eq!(info.boot_count, 2);
    let kept = sh(&vm, "cat /root/keep.txt").await?;
    let boot = boot_id(&vm).await?;
    check!(kept.starts_with("persisted-"), "keep.txt: {kept:?}");
    check!(
        !kept.ends_with(&boot),
        "not a new boot: boot_id {boot} is the one that wrote the file"
    );
    Ok(())
}

/// A handle that talked to the VM keeps working after another handle stopped
/// and restarted it (its connection went to the old supervisor).
async fn walk_old_handle_survives_restart() -> Result<(), String> {
    let old = handle(WALK).await?;
    let boot = boot_id(&old).await?;
    let other = handle(WALK).await?;
    other.stop(STOP).await.map_err(e2s)?;
    other.start(BOOT).await.map_err(e2s)?;
    let r = tokio::time::timeout(Duration::from_secs(30), boot_id(&old)).await;
    let new_boot = match r {
        Err(_) => return Err("exec through a handle from before the restart hung".into()),
        Ok(r) => r?,
    };
    check!(new_boot != boot, "no new boot after stop/start");
    check_eq!(old.status().await.map_err(e2s)?, VmState::Running);
    Ok(())
}

async fn walk_stop_paused() -> Result<(), String> {
    let vm = handle(WALK).await?;
    let info = vm.info().await.map_err(e2s)?;
    vm.pause().await.map_err(e2s)?;
    vm.stop(STOP).await.map_err(e2s)?;
    let after = vm.info().await.map_err(e2s)?;
    check_eq!(after.state, VmState::Stopped);
    check_eq!(after.last_error, None);
    for pid in [info.vmm_pid, info.supervisor_pid].into_iter().flatten() {
        check!(
            wait_pid_gone(pid, Duration::from_secs(5)).await,
            "pid {pid} outlived stop"
        );
    }
    Ok(())
}

async fn walk_vmm_kill_is_error() -> Result<(), String> {
    let vm = handle(WALK).await?;
    vm.start(BOOT).await.map_err(e2s)?;
    let info = vm.info().await.map_err(e2s)?;
    // created, stopped, the restart by another handle, and this start.
    check_eq!(info.boot_count, 4);
    let vmm = info.vmm_pid.ok_or("no VMM pid")?;
    let sup = info.supervisor_pid.ok_or("no supervisor pid")?;
    // SAFETY: kill(2) of the VMM pid we just read for our own VM.
    unsafe { libc::kill(vmm as i32, libc::SIGKILL) };
    // The supervisor notices, records why, and exits.
    check!(
        wait_pid_gone(sup, Duration::from_secs(10)).await,
        "the supervisor outlived its VMM"
    );
    let info = vm.info().await.map_err(e2s)?;
    check_eq!(info.state, VmState::Error);
    let why = info.last_error.clone().unwrap_or_default();
    check!(
        why.contains("VMM exited with signal 9"),
        "last_error: {why:?}"
    );
    check!(!pid_alive(vmm), "the VMM is alive");
    Ok(())
}

async fn walk_error_cells() -> Result<(), String> {
    let vm = handle(WALK).await?;
    let s = VmState::Error;
    check_eq!(vm.status().await.map_err(e2s)?, s);
    let m = refused("start", vm.start(BOOT).await, WALK, s, "rm walk")?;
    check!(
        m.contains("VMM exited with signal 9"),
        "start on error does not say why: {m}"
    );
    check_eq!(vm.info().await.map_err(e2s)?.boot_count, 4);
    // stop: no-op, still error.
    vm.stop(STOP).await.map_err(e2s)?;
    check_eq!(vm.status().await.map_err(e2s)?, s);
    refused("pause", vm.pause().await, WALK, s, "rm walk")?;
    refused("resume", vm.resume().await, WALK, s, "rm walk")?;
    let m = refused("exec", vm.run("true").await, WALK, s, "rm walk")?;
    check!(
        m.contains("signal 9"),
        "exec on error does not say why: {m}"
    );
    vm.close();
    check_eq!(state_of(WALK).await?, s);
    // delete removes an error VM and everything it had.
    delete_and_check(handle(WALK).await?).await
}

// ------------------------------------------------------- crash and delete

async fn supervisor_kill_is_error() -> Result<(), String> {
    let vm = Sandbox::create(config("supkill")).await.map_err(e2s)?;
    vm.start(BOOT).await.map_err(e2s)?;
    sh(&vm, "true").await?;
    let info = vm.info().await.map_err(e2s)?;
    let vmm = info.vmm_pid.ok_or("no VMM pid")?;
    let sup = info.supervisor_pid.ok_or("no supervisor pid")?;
    // Its other children: the guest network's passt and pasta.
    // (the namespace holder and pasta, and passt under the holder).
    let mut helpers: Vec<u32> = children_of(sup)
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| *p != vmm)
        .collect();
    let grandchildren: Vec<u32> = helpers
        .iter()
        .flat_map(|h| children_of(*h).into_iter().map(|(p, _)| p))
        .collect();
    helpers.extend(grandchildren);
    check!(
        helpers.len() >= 3,
        "network helpers missing under the supervisor: {helpers:?}"
    );
    // SAFETY: kill(2) of the supervisor pid we just read for our own VM.
    unsafe { libc::kill(sup as i32, libc::SIGKILL) };
    // The VMM and the network helpers die with their supervisor
    // (parent-death signal), before any smolvm call could clean them up.
    check!(
        wait_pid_gone(vmm, Duration::from_secs(5)).await,
        "VMM pid {vmm} outlived its supervisor"
    );
    for h in &helpers {
        check!(
            wait_pid_gone(*h, Duration::from_secs(5)).await,
            "network helper pid {h} outlived its supervisor"
        );
    }
    let info = vm.info().await.map_err(e2s)?;
    check_eq!(info.state, VmState::Error);
    let why = info.last_error.clone().unwrap_or_default();
    check!(
        why.contains(&format!("supervisor (pid {sup}) died unexpectedly")),
        "last_error: {why:?}"
    );
    // Another handle, and the list, tell the same truth.
    check_eq!(state_of("supkill").await?, VmState::Error);
    let listed = Sandbox::list().await.map_err(e2s)?;
    check!(
        listed
            .iter()
            .any(|v| v.id == "supkill" && v.state == VmState::Error),
        "list: {listed:?}"
    );
    let m = refused(
        "exec",
        vm.run("true").await,
        "supkill",
        VmState::Error,
        "rm supkill",
    )?;
    check!(m.contains("died unexpectedly"), "{m}");
    refused(
        "start",
        vm.start(BOOT).await,
        "supkill",
        VmState::Error,
        "rm supkill",
    )?;
    // Its sockets are still in the directory; delete takes them.
    delete_and_check(vm).await
}

async fn delete_in_every_state() -> Result<(), String> {
    // created: no boot needed.
    let created = Sandbox::create(config("del-created")).await.map_err(e2s)?;
    delete_and_check(created).await?;
    // Boot three at once (different VMs proceed in parallel).
    let mk = |name: &'static str| async move {
        let vm = Sandbox::create(config(name)).await.map_err(e2s)?;
        vm.start(BOOT).await.map_err(e2s)?;
        Ok::<_, String>(vm)
    };
    let (running, paused, stopped) =
        tokio::join!(mk("del-running"), mk("del-paused"), mk("del-stopped"));
    let (running, paused, stopped) = (running?, paused?, stopped?);
    paused.pause().await.map_err(e2s)?;
    stopped.run("echo x > /root/f && sync").await.map_err(e2s)?;
    stopped.stop(STOP).await.map_err(e2s)?;
    check_eq!(running.status().await.map_err(e2s)?, VmState::Running);
    check_eq!(paused.status().await.map_err(e2s)?, VmState::Paused);
    check_eq!(stopped.status().await.map_err(e2s)?, VmState::Stopped);
    delete_and_check(running).await?;
    delete_and_check(paused).await?;
    delete_and_check(stopped).await?;
    let left: Vec<String> = Sandbox::list()
        .await
        .map_err(e2s)?
        .into_iter()
        .map(|v| v.id)
        .filter(|id| id.starts_with("del-"))
        .collect();
    check!(left.is_empty(), "VMs left after deleting them: {left:?}");
    Ok(())
}

async fn nothing_leaked() -> Result<(), String> {
    sweep(&[]).await;
    check!(Sandbox::list().await.map_err(e2s)?.is_empty(), "VMs left");
    let data = data_dir();
    for d in ["vms", "locks"] {
        let e = dir_entries(&data.join(d));
        check!(e.is_empty(), "{d}/ holds {e:?}");
    }
    let items = smolvm::sandbox::prune(true, true).await.map_err(e2s)?;
    check!(items.is_empty(), "prune finds {items:?}");
    no_processes_in(&data).await
}

/// Deletes every VM not in `keep` (best effort, reporting what fails).
async fn sweep(keep: &[&str]) {
    let Ok(list) = Sandbox::list().await else {
        return;
    };
    for v in list.into_iter().filter(|v| !keep.contains(&v.id.as_str())) {
        match Sandbox::from_id(&v.id).await {
            Ok(vm) => {
                if let Err(e) = vm.delete().await {
                    eprintln!("cleanup: cannot delete {}: {}", v.id, chain(&e));
                }
            }
            Err(e) => eprintln!("cleanup: cannot open {}: {}", v.id, chain(&e)),
        }
    }
}

/// A VM whose `create` died before its disk was made is found by
/// `prune --errors` (not by a plain prune) and removed completely.
async fn prune_finds_a_vm_without_disk() -> Result<(), String> {
    let vm = Sandbox::create(SandboxConfig {
        name: Some("nodisk".into()),
        ..Default::default()
    })
    .await
    .map_err(|e| chain(&e))?;
    let dir = vm.vm_dir().to_path_buf();
    vm.close();
    std::fs::remove_file(dir.join("disk.qcow2")).map_err(|e| e.to_string())?;
    let plain = smolvm::sandbox::prune(true, false)
        .await
        .map_err(|e| chain(&e))?;
    check!(plain.is_empty(), "plain prune lists {plain:?}");
    let found = smolvm::sandbox::prune(true, true)
        .await
        .map_err(|e| chain(&e))?;
    check_eq!(found.len(), 1);
    check_eq!(found[0].id, "nodisk");
    smolvm::sandbox::prune(false, true)
        .await
        .map_err(|e| chain(&e))?;
    check!(!dir.exists(), "{} left behind", dir.display());
    check!(
        matches!(Sandbox::from_id("nodisk").await, Err(Error::NotFound(_))),
        "the row is still there"
    );
    Ok(())
}

fn main() {
    let filters = filter();
    let cases = cases![
        bad_names_refused,
        bad_config_refused,
        duplicate_name_refused,
        walk_created_cells,
        walk_start_boots_created,
        walk_running_cells,
        walk_paused_cells,
        walk_stop_running_is_graceful,
        walk_stopped_cells,
        walk_start_stopped_keeps_disk,
        walk_old_handle_survives_restart,
        walk_stop_paused,
        walk_vmm_kill_is_error,
        walk_error_cells,
        supervisor_kill_is_error,
        delete_in_every_state,
        prune_finds_a_vm_without_disk,
        nothing_leaked,
    ];
    list_if_asked(&case_names(&cases));
    let data = isolated_data_dir("smolvm-test-");
    let rt = runtime();
    let started = Instant::now();
    let code = rt.block_on(async {
        let (passed, failed) =
            run_cases(&cases, &(), &filters, Some(CASE_LIMIT), || sweep(&[WALK])).await;
        sweep(&[]).await;
        summary(passed, &failed)
    });
    println!("lifecycle: {:.1}s", started.elapsed().as_secs_f64());
    // Last resort: nothing of ours may outlive the run.
    kill_processes_in(&data_dir());
    drop(rt);
    drop(data);
    std::process::exit(code);
}
