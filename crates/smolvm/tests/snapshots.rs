//! Snapshots against real VMs (TCG here): a guest's running state goes on
//! from the snapshot after a restore, restores and forks are machines of
//! their own (disk, hostname, entropy, clock), paused and stopped VMs can
//! be snapshotted, damaged snapshots are refused without touching the
//! target, a snapshot in use outlives its deletion until its last VM goes,
//! and fresh sandboxes start from their shape's warm boot snapshot.
//!
//! The cases run in order and share VMs: "src" (booted cold, a counter
//! loop running in it) is the source of the snapshot "s-count" that most
//! cases restore, and is paused and snapshotted later on; "r-count" (a
//! restore of it) is stopped for a disk-only snapshot whose restore
//! "r-disk" is the source of the snapshot deletion case; "r-clock"
//! (another restore) is snapshotted in turn. Every other VM is deleted
//! after its case. All
//! VMs but the warm-start case's are `cold` (they neither use nor leave
//! warm snapshots), so that case sees only its own. The last case deletes
//! everything and checks that no VM, snapshot directory or process is left.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use common::*;
use smolvm::error::chain;
use smolvm::sandbox::{
    delete_snapshot, list_snapshots, snapshot_info, RestoreOptions, SnapshotOptions, MAX_FORK,
};
use smolvm::snapshot::SnapshotKind;
use smolvm::{Command, Error, ErrorKind, ExecOptions, Sandbox, SandboxConfig, VmState};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BOOT: Duration = Duration::from_secs(180);
const STOP: Duration = Duration::from_secs(60);
/// A case that runs longer than this is failed (a hang must not stall the run).
const CASE_LIMIT: Duration = Duration::from_secs(300);

/// The source VM, its counter snapshot, and the restores kept across cases.
const SRC: &str = "src";
const SNAP: &str = "s-count";
const R_COUNT: &str = "r-count";
const R_CLOCK: &str = "r-clock";
const R_DISK: &str = "r-disk";
/// VMs the cleanup after each case leaves alone.
const KEEP: &[&str] = &[SRC, R_COUNT, R_CLOCK, R_DISK];

/// The guest's counter: one more every `COUNTER_PERIOD_S` seconds at most.
const COUNTER: &str = "/root/counter";
const COUNTER_PERIOD_S: f64 = 0.1;
const COUNTER_LOOP: &str = "i=0; while :; do i=$((i+1)); echo $i > /root/counter; sleep 0.1; done";

/// The counter's bounds at the snapshot `s-count` (read just before and
/// just after it), for the cases after the first.
static SNAP_COUNT: std::sync::Mutex<Option<(u64, u64)>> = std::sync::Mutex::new(None);

fn e2s(e: Error) -> String {
    chain(&e)
}

fn config(name: &str) -> SandboxConfig {
    SandboxConfig {
        name: Some(name.to_string()),
        memory_mib: 256,
        cold: true,
        ..Default::default()
    }
}

fn restore_into(into: Option<&str>) -> RestoreOptions {
    RestoreOptions {
        into: into.map(str::to_string),
        resume: true,
        boot_timeout: BOOT,
    }
}

fn snap_opts(name: &str, resume: bool) -> SnapshotOptions {
    SnapshotOptions {
        name: Some(name.to_string()),
        resume,
        disk_only: false,
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

/// Whether `path` exists in the guest.
async fn exists(vm: &Sandbox, path: &str) -> Result<bool, String> {
    Ok(sh(vm, &format!("test -e {path} && echo yes || echo no")).await? == "yes")
}

async fn boot_id(vm: &Sandbox) -> Result<String, String> {
    sh(vm, "cat /proc/sys/kernel/random/boot_id").await
}

/// 32 bytes of the guest's `/dev/urandom`, hex.
async fn urandom(vm: &Sandbox) -> Result<String, String> {
    let r = sh(vm, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'").await?;
    check_eq!(r.len(), 64);
    Ok(r)
}

/// The guest's counter (a read can meet the file just truncated: retry).
async fn counter(vm: &Sandbox) -> Result<u64, String> {
    for _ in 0..20 {
        let s = sh(vm, &format!("cat {COUNTER} 2>/dev/null || true")).await?;
        if let Ok(n) = s.parse::<u64>() {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    Err(format!("{}: {COUNTER} holds no number", vm.id()))
}

/// Waits until the guest's counter is at least `n` (returns it).
async fn counter_at_least(vm: &Sandbox, n: u64) -> Result<u64, String> {
    let t = Instant::now();
    loop {
        let c = counter(vm).await?;
        if c >= n {
            return Ok(c);
        }
        check!(
            t.elapsed() < Duration::from_secs(60),
            "{}: the counter is at {c}, not reaching {n}",
            vm.id()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The counter advances (it is read twice, a second apart).
async fn counter_advances(vm: &Sandbox) -> Result<u64, String> {
    let a = counter(vm).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = counter(vm).await?;
    check!(b > a, "{}: the counter stands at {a} -> {b}", vm.id());
    Ok(b)
}

/// The most the counter can have advanced in `t`.
fn max_advance(t: Duration) -> u64 {
    (t.as_secs_f64() / COUNTER_PERIOD_S).ceil() as u64 + 1
}

fn snap_count() -> Result<(u64, u64), String> {
    SNAP_COUNT
        .lock()
        .ok()
        .and_then(|g| *g)
        .ok_or_else(|| "the counter snapshot was not taken (its case failed)".to_string())
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn err_of<T>(what: &str, r: smolvm::Result<T>) -> Result<Error, String> {
    match r {
        Ok(_) => Err(format!("{what} succeeded; it must fail")),
        Err(e) => Ok(e),
    }
}

fn listed(id: &str) -> bool {
    list_snapshots().iter().any(|s| s.id == id)
}

fn snapshots_dir() -> PathBuf {
    smolvm::paths::snapshots_dir()
}

/// The snapshot directories (not the lock file).
fn snapshot_dirs() -> Vec<String> {
    let mut v: Vec<String> = dir_entries(&snapshots_dir())
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .collect();
    v.sort();
    v
}

async fn not_found(id: &str) -> Result<(), String> {
    match Sandbox::from_id(id).await {
        Err(Error::NotFound(_)) => Ok(()),
        Ok(_) => Err(format!("VM {id} exists")),
        Err(e) => Err(format!("from_id({id}): {}", chain(&e))),
    }
}

// ---------------------------------------------------------------- cases

/// "src": booted, a counter loop running in it, a file written before the
/// snapshot.
async fn source_boots() -> Result<(), String> {
    let vm = Sandbox::create(config(SRC)).await.map_err(e2s)?;
    vm.start(BOOT).await.map_err(e2s)?;
    vm.spawn(Command::Shell(COUNTER_LOOP.into()), &ExecOptions::default())
        .await
        .map_err(e2s)?;
    sh(&vm, "echo before > /root/before.txt").await?;
    counter_at_least(&vm, 20).await?;
    Ok(())
}

/// 1 and 2: the restore's counter goes on from the snapshot's value (not
/// zero, not where the source is by then); a file the source wrote after
/// the snapshot is only in the source.
async fn counter_continues_from_the_snapshot() -> Result<(), String> {
    let src = handle(SRC).await?;
    let lo = counter(&src).await?;
    let info = src.snapshot(&snap_opts(SNAP, true)).await.map_err(e2s)?;
    let hi = counter(&src).await?;
    check_eq!(info.kind, SnapshotKind::Full);
    check_eq!(info.source_vm, SRC);
    check!(
        info.dir.join("manifest.json").is_file(),
        "no manifest in {}",
        info.dir.display()
    );
    check_eq!(src.status().await.map_err(e2s)?, VmState::Running);
    *SNAP_COUNT.lock().map_err(|e| e.to_string())? = Some((lo, hi));
    // The source runs on, and writes a file the snapshot does not have.
    sh(&src, "echo after > /root/after.txt && sync").await?;
    let ahead = counter_at_least(&src, hi + 30).await?;
    let t = Instant::now();
    let r = Sandbox::restore_snapshot(SNAP, &restore_into(Some(R_COUNT)), None)
        .await
        .map_err(e2s)?;
    let c = counter(&r).await?;
    let took = t.elapsed();
    let src_now = counter(&src).await?;
    check_eq!(r.id(), R_COUNT);
    check!(c > 0, "the restored counter starts from zero");
    check!(
        c >= lo,
        "the restored counter ({c}) is below the snapshot's ({lo}..{hi})"
    );
    check!(
        c <= hi + max_advance(took),
        "the restored counter ({c}) is past the snapshot's ({lo}..{hi}) plus \
         {took:?} of counting; the source was at {ahead} (now {src_now})"
    );
    check!(
        c < ahead,
        "the restored counter ({c}) is the source's ({ahead})"
    );
    counter_advances(&r).await?;
    check_eq!(r.status().await.map_err(e2s)?, VmState::Running);
    check_eq!(sh(&r, "hostname").await?, R_COUNT);
    Ok(())
}

async fn file_after_the_snapshot_only_in_the_source() -> Result<(), String> {
    let (src, r) = (handle(SRC).await?, handle(R_COUNT).await?);
    check!(
        !exists(&r, "/root/after.txt").await?,
        "the restore has the file written after the snapshot"
    );
    check_eq!(sh(&r, "cat /root/before.txt").await?, "before");
    check_eq!(sh(&src, "cat /root/after.txt").await?, "after");
    check_eq!(sh(&src, "cat /root/before.txt").await?, "before");
    // The restore's writes stay its own too.
    sh(&r, "echo restored > /root/restored.txt && sync").await?;
    check!(
        !exists(&src, "/root/restored.txt").await?,
        "the source sees the restore's file"
    );
    Ok(())
}

/// 3: two forks of one snapshot are two machines: own disks, own
/// hostnames, own entropy.
async fn forks_are_machines_of_their_own() -> Result<(), String> {
    let forks = Sandbox::fork_snapshot(SNAP, 2, None).await.map_err(e2s)?;
    check_eq!(forks.len(), 2);
    let (a, b) = (&forks[0], &forks[1]);
    // Right after the restore, before anything else runs in them.
    let (ra, rb) = (urandom(a).await?, urandom(b).await?);
    check!(ra != rb, "both forks read the same urandom bytes {ra}");
    check!(a.id() != b.id(), "both forks are {}", a.id());
    for vm in [a, b] {
        check!(
            !KEEP.contains(&vm.id()) && vm.id() != SNAP,
            "a fork took the name {}",
            vm.id()
        );
        check_eq!(vm.status().await.map_err(e2s)?, VmState::Running);
        check_eq!(sh(vm, "hostname").await?, vm.id());
        check_eq!(sh(vm, "cat /root/before.txt").await?, "before");
        sh(vm, &format!("echo {0} > /root/mine-{0} && sync", vm.id())).await?;
    }
    for vm in [a, b] {
        let mine = sh(vm, "ls /root | grep '^mine-' | tr '\\n' ' '").await?;
        check_eq!(mine, format!("mine-{}", vm.id()));
    }
    let used = snapshot_info(SNAP).map_err(e2s)?.used_by;
    for vm in [a, b] {
        check!(
            used.iter().any(|u| u == vm.id()),
            "{SNAP} is not used by {}: {used:?}",
            vm.id()
        );
    }
    for vm in forks {
        vm.delete().await.map_err(e2s)?;
    }
    Ok(())
}

/// 4: a restore's clock is the host's, not the snapshot's plus its run.
async fn restored_clock_is_the_hosts() -> Result<(), String> {
    let created = snapshot_info(SNAP).map_err(e2s)?.created_at_ms;
    let age = now_ms() - created;
    if age < 20_000 {
        tokio::time::sleep(Duration::from_millis((20_000 - age) as u64)).await;
    }
    let r = Sandbox::restore_snapshot(SNAP, &restore_into(Some(R_CLOCK)), None)
        .await
        .map_err(e2s)?;
    let before = now_s();
    let guest: i64 = sh(&r, "date +%s")
        .await?
        .parse()
        .map_err(|e| format!("date +%s: {e}"))?;
    let after = now_s();
    check!(
        guest >= before - 3 && guest <= after + 3,
        "the restored guest's clock says {guest}, the host {before}..{after} \
         (the snapshot is {}s old)",
        (now_ms() - created) / 1000
    );
    Ok(())
}

/// 8: a snapshot with a truncated memory file is refused (naming the file)
/// and the source it would replace runs on untouched; without its manifest
/// it is no snapshot.
async fn damaged_snapshot_leaves_the_target_alone() -> Result<(), String> {
    const BAD: &str = "s-bad";
    let src = handle(SRC).await?;
    let info = src.snapshot(&snap_opts(BAD, true)).await.map_err(e2s)?;
    let memory = info.dir.join("memory");
    let len = std::fs::metadata(&memory)
        .map_err(|e| format!("{}: {e} (is the RAM in the state file?)", memory.display()))?
        .len();
    check_eq!(len, 256u64 << 20);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .and_then(|f| f.set_len(len / 2))
        .map_err(|e| format!("truncating {}: {e}", memory.display()))?;
    let before = src.info().await.map_err(e2s)?;
    let boot = boot_id(&src).await?;
    for into in [None, Some("r-bad")] {
        let e = err_of(
            "restoring a truncated snapshot",
            Sandbox::restore_snapshot(BAD, &restore_into(into), None).await,
        )?;
        let m = chain(&e);
        check_eq!(e.kind(), ErrorKind::SnapshotInvalid);
        check!(
            m.contains("memory file"),
            "the message names no memory file: {m}"
        );
        check!(m.contains(BAD), "the message names no snapshot: {m}");
    }
    not_found("r-bad").await?;
    let src = handle(SRC).await?;
    let after = src.info().await.map_err(e2s)?;
    check_eq!(after.state, VmState::Running);
    check_eq!(after.vmm_pid, before.vmm_pid);
    check_eq!(after.boot_count, before.boot_count);
    check_eq!(boot_id(&src).await?, boot);
    counter_advances(&src).await?;
    check_eq!(sh(&src, "cat /root/after.txt").await?, "after");
    // No manifest: not a snapshot.
    std::fs::remove_file(info.dir.join("manifest.json")).map_err(|e| e.to_string())?;
    let e = err_of(
        "restoring a snapshot without manifest",
        Sandbox::restore_snapshot(BAD, &restore_into(None), None).await,
    )?;
    check_eq!(e.kind(), ErrorKind::SnapshotNotFound);
    let e = err_of("snapshot_info without manifest", snapshot_info(BAD))?;
    check_eq!(e.kind(), ErrorKind::SnapshotNotFound);
    check!(!listed(BAD), "{BAD} is listed without its manifest");
    check_eq!(
        handle(SRC).await?.status().await.map_err(e2s)?,
        VmState::Running
    );
    Ok(())
}

/// 11: a duplicate name and a fork of no VMs are refused (the VM runs on);
/// a fork of one is a VM of its own and its internal snapshot is not listed.
async fn refusals_and_a_fork_of_one() -> Result<(), String> {
    let src = handle(SRC).await?;
    let e = err_of(
        "a second snapshot named s-count",
        src.snapshot(&snap_opts(SNAP, true)).await,
    )?;
    check_eq!(e.kind(), ErrorKind::SnapshotAlreadyExists);
    check!(chain(&e).contains(SNAP), "{}", chain(&e));
    check_eq!(src.status().await.map_err(e2s)?, VmState::Running);
    check_eq!(sh(&src, "echo ok").await?, "ok");
    for (what, r) in [
        ("fork(0)", src.fork(0).await),
        ("fork(MAX_FORK + 1)", src.fork(MAX_FORK + 1).await),
        (
            "fork_snapshot(0)",
            Sandbox::fork_snapshot(SNAP, 0, None).await,
        ),
    ] {
        let e = err_of(what, r)?;
        check_eq!(e.kind(), ErrorKind::InvalidInput);
    }
    let e = err_of(
        "a disk-only snapshot of a running VM",
        src.snapshot(&SnapshotOptions {
            name: Some("s-nope".into()),
            resume: true,
            disk_only: true,
        })
        .await,
    )?;
    check_eq!(e.kind(), ErrorKind::InvalidState);
    check!(!listed("s-nope"), "a refused snapshot is listed");
    let before = list_snapshots().len();
    let kids = src.fork(1).await.map_err(e2s)?;
    check_eq!(kids.len(), 1);
    let kid = &kids[0];
    check_eq!(sh(kid, "hostname").await?, kid.id());
    counter_advances(kid).await?;
    check_eq!(sh(kid, "cat /root/after.txt").await?, "after");
    check_eq!(list_snapshots().len(), before);
    check_eq!(src.status().await.map_err(e2s)?, VmState::Running);
    counter_advances(&src).await?;
    kid.delete().await.map_err(e2s)?;
    Ok(())
}

/// 10: a snapshot deleted while a VM is layered on it leaves the list at
/// once and its files when that VM goes.
async fn deleted_snapshot_outlives_its_last_user() -> Result<(), String> {
    const DEL: &str = "s-del";
    const R_DEL: &str = "r-del";
    // A snapshot of r-disk (booted, not restored from memory), which then
    // goes: r-del is its only user.
    let source = handle(R_DISK).await?;
    sh(&source, "echo del > /root/del.txt && sync").await?;
    let info = source.snapshot(&snap_opts(DEL, true)).await.map_err(e2s)?;
    source.delete().await.map_err(e2s)?;
    let r = Sandbox::restore_snapshot(DEL, &restore_into(Some(R_DEL)), None)
        .await
        .map_err(e2s)?;
    check_eq!(sh(&r, "cat /root/del.txt").await?, "del");
    check_eq!(
        snapshot_info(DEL).map_err(e2s)?.used_by,
        vec![R_DEL.to_string()]
    );
    let users = delete_snapshot(DEL).await.map_err(e2s)?;
    check_eq!(users, vec![R_DEL.to_string()]);
    check!(!listed(DEL), "{DEL} is still listed");
    let e = err_of("snapshot_info of a deleted snapshot", snapshot_info(DEL))?;
    check_eq!(e.kind(), ErrorKind::SnapshotNotFound);
    check!(
        info.dir.join("disk.qcow2").exists(),
        "{} went while {R_DEL} uses it",
        info.dir.display()
    );
    check_eq!(sh(&r, "cat /root/del.txt").await?, "del");
    r.delete().await.map_err(e2s)?;
    check!(
        !info.dir.exists(),
        "{} outlived its last user: {:?}",
        info.dir.display(),
        dir_entries(&info.dir)
    );
    Ok(())
}

/// A snapshot of a VM that was itself restored from a memory snapshot
/// (its RAM then travels in the device state) restores.
async fn snapshot_of_a_restored_vm_restores() -> Result<(), String> {
    const AGAIN: &str = "s-again";
    let clock = handle(R_CLOCK).await?;
    sh(&clock, "echo again > /root/again.txt && sync").await?;
    clock.snapshot(&snap_opts(AGAIN, true)).await.map_err(e2s)?;
    check_eq!(clock.status().await.map_err(e2s)?, VmState::Running);
    let r = Sandbox::restore_snapshot(AGAIN, &restore_into(Some("r-again")), None)
        .await
        .map_err(e2s)?;
    check_eq!(sh(&r, "hostname").await?, "r-again");
    check_eq!(sh(&r, "cat /root/again.txt").await?, "again");
    counter_advances(&r).await?;
    r.delete().await.map_err(e2s)?;
    delete_snapshot(AGAIN).await.map_err(e2s)?;
    Ok(())
}

/// 5: a restore into the source id after the source was deleted creates it
/// again, as it was at the snapshot.
async fn restore_recreates_a_deleted_source() -> Result<(), String> {
    let (lo, hi) = snap_count()?;
    handle(SRC).await?.delete().await.map_err(e2s)?;
    not_found(SRC).await?;
    let t = Instant::now();
    let vm = Sandbox::restore_snapshot(SNAP, &restore_into(None), None)
        .await
        .map_err(e2s)?;
    let c = counter(&vm).await?;
    let took = t.elapsed();
    check_eq!(vm.id(), SRC);
    check!(
        c >= lo && c <= hi + max_advance(took),
        "the re-created source's counter is {c}, the snapshot's {lo}..{hi}"
    );
    let vm = handle(SRC).await?;
    check_eq!(vm.status().await.map_err(e2s)?, VmState::Running);
    check_eq!(sh(&vm, "hostname").await?, SRC);
    check_eq!(sh(&vm, "cat /root/before.txt").await?, "before");
    check!(
        !exists(&vm, "/root/after.txt").await?,
        "the re-created source has a file written after the snapshot"
    );
    counter_advances(&vm).await?;
    Ok(())
}

/// 6: a paused VM's snapshot leaves it paused; it resumes and runs; a
/// restore asked not to resume is paused too.
async fn snapshot_of_a_paused_vm() -> Result<(), String> {
    const PAUSED: &str = "s-paused";
    let vm = handle(SRC).await?;
    sh(&vm, "echo paused > /root/paused.txt && sync").await?;
    vm.pause().await.map_err(e2s)?;
    let info = vm.snapshot(&snap_opts(PAUSED, false)).await.map_err(e2s)?;
    check_eq!(info.kind, SnapshotKind::Full);
    check_eq!(vm.status().await.map_err(e2s)?, VmState::Paused);
    check_eq!(
        handle(SRC).await?.status().await.map_err(e2s)?,
        VmState::Paused
    );
    // A second snapshot of the VM the first left stopped (QEMU refuses to
    // migrate a VM "paused due to previous migration" until it ran again).
    let again = format!("{PAUSED}-2");
    vm.snapshot(&snap_opts(&again, false)).await.map_err(e2s)?;
    check_eq!(vm.status().await.map_err(e2s)?, VmState::Paused);
    delete_snapshot(&again).await.map_err(e2s)?;
    vm.resume().await.map_err(e2s)?;
    check_eq!(vm.status().await.map_err(e2s)?, VmState::Running);
    check_eq!(sh(&vm, "echo ok").await?, "ok");
    counter_advances(&vm).await?;
    let r = Sandbox::restore_snapshot(
        PAUSED,
        &RestoreOptions {
            resume: false,
            ..restore_into(Some("r-paused"))
        },
        None,
    )
    .await
    .map_err(e2s)?;
    check_eq!(r.status().await.map_err(e2s)?, VmState::Paused);
    r.resume().await.map_err(e2s)?;
    check_eq!(sh(&r, "hostname").await?, "r-paused");
    check_eq!(sh(&r, "cat /root/paused.txt").await?, "paused");
    counter_advances(&r).await?;
    r.delete().await.map_err(e2s)?;
    delete_snapshot(PAUSED).await.map_err(e2s)?;
    Ok(())
}

/// 7: a disk-only snapshot of a stopped VM; its restore boots and has the
/// VM's files.
async fn disk_only_snapshot_of_a_stopped_vm() -> Result<(), String> {
    const DISK: &str = "s-disk";
    let vm = handle(R_COUNT).await?;
    sh(&vm, "echo disk > /root/disk.txt && sync").await?;
    vm.stop(STOP).await.map_err(e2s)?;
    check_eq!(vm.status().await.map_err(e2s)?, VmState::Stopped);
    let e = err_of(
        "a full snapshot of a stopped VM",
        vm.snapshot(&snap_opts("s-nope", false)).await,
    )?;
    check_eq!(e.kind(), ErrorKind::InvalidState);
    let info = vm
        .snapshot(&SnapshotOptions {
            name: Some(DISK.into()),
            resume: false,
            disk_only: true,
        })
        .await
        .map_err(e2s)?;
    check_eq!(info.kind, SnapshotKind::Disk);
    check_eq!(vm.status().await.map_err(e2s)?, VmState::Stopped);
    let r = Sandbox::restore_snapshot(DISK, &restore_into(Some(R_DISK)), None)
        .await
        .map_err(e2s)?;
    check_eq!(r.status().await.map_err(e2s)?, VmState::Running);
    check_eq!(sh(&r, "hostname").await?, R_DISK);
    check_eq!(sh(&r, "cat /root/disk.txt").await?, "disk");
    check_eq!(sh(&r, "cat /root/restored.txt").await?, "restored");
    check_eq!(sh(&r, "cat /root/before.txt").await?, "before");
    // A fresh boot: no counter loop runs (its file is from the disk).
    check!(exists(&r, COUNTER).await?, "the counter file is gone");
    // The stopped VM still starts from its own disk.
    vm.start(BOOT).await.map_err(e2s)?;
    check_eq!(sh(&vm, "cat /root/disk.txt").await?, "disk");
    // r-disk stays (the next case's source): the snapshot's files too.
    check_eq!(
        delete_snapshot(DISK).await.map_err(e2s)?,
        vec![R_COUNT.to_string(), R_DISK.to_string()]
    );
    Ok(())
}

/// 9: the first never-started VM of a shape boots and leaves a warm boot
/// snapshot; the next starts from it and is a machine of its own; another
/// shape does not use it.
async fn warm_start_from_the_shape_snapshot() -> Result<(), String> {
    let r = warm_start_checks().await;
    // Clean up whatever happened: the VMs, then the warm snapshots.
    for id in ["w-first", "w-second", "w-other"] {
        if let Ok(vm) = Sandbox::from_id(id).await {
            let _ = vm.delete().await;
        }
    }
    let lock = smolvm::snapshot::lock().await.map_err(e2s)?;
    for w in smolvm::snapshot::warm() {
        smolvm::snapshot::retire(&lock, &w).map_err(e2s)?;
    }
    drop(lock);
    r?;
    check!(
        smolvm::snapshot::warm().is_empty(),
        "warm snapshots are left"
    );
    Ok(())
}

async fn warm_start_checks() -> Result<(), String> {
    let warm_cfg = |name: &str, memory_mib: u32| SandboxConfig {
        cold: false,
        memory_mib,
        ..config(name)
    };
    let keys = || -> Vec<String> {
        smolvm::snapshot::warm()
            .into_iter()
            .filter_map(|w| w.manifest.warm_key)
            .collect()
    };
    check!(
        keys().is_empty(),
        "warm snapshots before any warm VM: {:?}",
        keys()
    );
    let first = Sandbox::create(warm_cfg("w-first", 256))
        .await
        .map_err(e2s)?;
    first.start(BOOT).await.map_err(e2s)?;
    let k = keys();
    check_eq!(k.len(), 1);
    let first_rnd = urandom(&first).await?;
    let first_t = first.last_boot().ok_or("no boot timings for w-first")?;
    let second = Sandbox::create(warm_cfg("w-second", 256))
        .await
        .map_err(e2s)?;
    second.start(BOOT).await.map_err(e2s)?;
    let second_rnd = urandom(&second).await?;
    let second_t = second.last_boot().ok_or("no boot timings for w-second")?;
    // The guest agent's start and ready times (guest boot clock) are in the
    // snapshot's memory: the first VM's are a start from its boot
    // snapshot, not a boot of its own.
    check_eq!(
        (second_t.guest_agent_start_ms, second_t.guest_ready_ms),
        (first_t.guest_agent_start_ms, first_t.guest_ready_ms)
    );
    check_eq!(sh(&second, "hostname").await?, "w-second");
    check!(
        first_rnd != second_rnd,
        "the warm-started VM reads the first's urandom bytes"
    );
    check_eq!(sh(&second, "echo ok").await?, "ok");
    check_eq!(keys(), k);
    println!(
        "    warm: a cold boot ready in {} ms, a warm start in {} ms",
        first_t.ready_ms, second_t.ready_ms
    );
    // Another shape: a boot of its own, and a warm snapshot of its own.
    let other = Sandbox::create(warm_cfg("w-other", 384))
        .await
        .map_err(e2s)?;
    other.start(BOOT).await.map_err(e2s)?;
    let other_t = other.last_boot().ok_or("no boot timings for w-other")?;
    check!(
        (other_t.guest_agent_start_ms, other_t.guest_ready_ms)
            != (first_t.guest_agent_start_ms, first_t.guest_ready_ms),
        "a 384 MiB VM started from the 256 MiB warm snapshot: {other_t:?}"
    );
    check_eq!(sh(&other, "hostname").await?, "w-other");
    let k2 = keys();
    check_eq!(k2.len(), 2);
    check!(k2.contains(&k[0]), "the first warm snapshot went: {k2:?}");
    Ok(())
}

/// Deletes every VM and snapshot; checks nothing is left: no VM, no
/// snapshot directory, no process.
async fn nothing_left() -> Result<(), String> {
    sweep(&[]).await;
    for s in list_snapshots() {
        delete_snapshot(&s.id).await.map_err(e2s)?;
    }
    check!(
        Sandbox::list().await.map_err(e2s)?.is_empty(),
        "VMs are left"
    );
    check!(list_snapshots().is_empty(), "snapshots are left");
    let dirs = snapshot_dirs();
    check!(dirs.is_empty(), "snapshot directories are left: {dirs:?}");
    let data = smolvm::paths::data_dir();
    let vms = dir_entries(&data.join("vms"));
    check!(vms.is_empty(), "vms/ holds {vms:?}");
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

/// Last resort after the run: every VM and snapshot goes.
async fn cleanup_all(dir: &Path) {
    sweep(&[]).await;
    for s in list_snapshots() {
        if let Err(e) = delete_snapshot(&s.id).await {
            eprintln!("cleanup: cannot delete snapshot {}: {}", s.id, chain(&e));
        }
    }
    if let Ok(lock) = smolvm::snapshot::lock().await {
        for w in smolvm::snapshot::warm() {
            let _ = smolvm::snapshot::retire(&lock, &w);
        }
    }
    kill_processes_in(dir);
}

fn main() {
    let filters = filter();
    let cases = cases![
        source_boots,
        counter_continues_from_the_snapshot,
        file_after_the_snapshot_only_in_the_source,
        forks_are_machines_of_their_own,
        restored_clock_is_the_hosts,
        damaged_snapshot_leaves_the_target_alone,
        refusals_and_a_fork_of_one,
        snapshot_of_a_paused_vm,
        snapshot_of_a_restored_vm_restores,
        restore_recreates_a_deleted_source,
        disk_only_snapshot_of_a_stopped_vm,
        deleted_snapshot_outlives_its_last_user,
        warm_start_from_the_shape_snapshot,
        nothing_left,
    ];
    list_if_asked(&case_names(&cases));
    let data = isolated_data_dir("smolvm-snapshots-");
    let rt = runtime();
    let started = Instant::now();
    let code = rt.block_on(async {
        let (passed, failed) =
            run_cases(&cases, &(), &filters, Some(CASE_LIMIT), || sweep(KEEP)).await;
        cleanup_all(data.path()).await;
        summary(passed, &failed)
    });
    println!("snapshots: {:.1}s", started.elapsed().as_secs_f64());
    kill_processes_in(data.path());
    drop(rt);
    drop(data);
    std::process::exit(code);
}
