//! The supervisor's event loop: one VMM, one agent connection, many clients.

use super::outbox::{Lane, Outbox};
use super::routes::{Routes, SUPERVISOR_CLIENT};
use crate::backend::{files, LaunchSpec, VmDir, Vmm, VmmError, VmmExit};
use crate::state::{ProcessId, Store, VmState};
use smolvm_proto::supervisor::{
    ControlError, ControlErrorKind, ReadyInfo, SupervisorMsg, VmRunState,
};
use smolvm_proto::{encode_frame, ErrorInfo, ErrorKind, Frame, GuestHello, GuestMsg, HostMsg};
use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch};

/// How often a VMM that stopped answering is tried again.
const RECONCILE_EVERY: Duration = Duration::from_secs(2);

/// Frames queued towards the agent, per lane.
const AGENT_QUEUE: usize = 256;

/// The queue towards the agent: two lanes; the writer always takes the
/// control lane (credit, cancel, pings, one-shot requests) first, so they
/// never wait behind stdin or file data.
#[derive(Clone)]
pub(super) struct AgentTx {
    control: mpsc::Sender<Vec<u8>>,
    data: mpsc::Sender<Vec<u8>>,
    hold: mpsc::Sender<Hold>,
}

/// Stops or restarts the agent writer (snapshots: the channel is cut
/// between frames).
enum Hold {
    /// Write this frame (the `Quiesce`) as the last one, then nothing more.
    After(Vec<u8>, oneshot::Sender<()>),
    /// Write these frames first, then go on with the queues.
    Release(Vec<Vec<u8>>),
}

impl AgentTx {
    /// Queues a frame, waiting while its lane is full; `Err` once the
    /// channel is closed.
    pub(super) async fn send(&self, buf: Vec<u8>, lane: Lane) -> Result<(), ()> {
        let tx = match lane {
            Lane::Control => &self.control,
            Lane::Data => &self.data,
        };
        tx.send(buf).await.map_err(drop)
    }

    /// Writes `last` and then holds the writer: nothing queued reaches the
    /// agent until [`AgentTx::release`]. Returns once `last` is written.
    pub(super) async fn hold_after(&self, last: Vec<u8>) -> Result<(), ()> {
        let (t, r) = oneshot::channel();
        self.hold.send(Hold::After(last, t)).await.map_err(drop)?;
        r.await.map_err(drop)
    }

    /// Writes `first`, then lets the queues flow again. Never waits: the
    /// writer may be stuck on a guest that stopped reading (it takes the
    /// release, in order, once it moves).
    pub(super) fn release(&self, first: Vec<Vec<u8>>) {
        if self.hold.try_send(Hold::Release(first)).is_err() {
            log!("the agent writer is not taking requests; the release waits in its queue");
        }
    }
}

/// The agent writer: control lane first.
fn agent_writer(mut w: tokio::net::unix::OwnedWriteHalf) -> AgentTx {
    let (ctx, mut crx) = mpsc::channel::<Vec<u8>>(AGENT_QUEUE);
    let (dtx, mut drx) = mpsc::channel::<Vec<u8>>(AGENT_QUEUE);
    let (htx, mut hrx) = mpsc::channel::<Hold>(64);
    tokio::spawn(async move {
        let mut held = false;
        loop {
            let buf = tokio::select! {
                biased;
                Some(h) = hrx.recv() => {
                    match h {
                        Hold::After(last, done) => {
                            if w.write_all(&last).await.is_err() {
                                return;
                            }
                            held = true;
                            let _ = done.send(());
                        }
                        Hold::Release(first) => {
                            for b in first {
                                if w.write_all(&b).await.is_err() {
                                    return;
                                }
                            }
                            held = false;
                        }
                    }
                    continue;
                }
                Some(b) = crx.recv(), if !held => b,
                Some(b) = drx.recv(), if !held => b,
                else => return,
            };
            if w.write_all(&buf).await.is_err() {
                return;
            }
        }
    });
    AgentTx {
        control: ctx,
        data: dtx,
        hold: htx,
    }
}

pub(super) type Reply = oneshot::Sender<Result<(), ControlError>>;

pub(super) enum VmCmd {
    Pause(Reply),
    Resume(Reply),
    Stop(u64, Reply),
    Kill(Reply),
    SetEgress(crate::config::EgressPolicy, Reply),
    Snapshot(
        smolvm_proto::supervisor::SnapshotRequest,
        oneshot::Sender<Result<smolvm_proto::supervisor::SnapshotReport, ControlError>>,
    ),
}

fn vmm_failure(e: VmmError) -> ControlError {
    ControlError::new(e.kind, e.message)
}

/// Tells the process that spawned us why the start failed (the first byte
/// `E`, then the error as JSON; see `daemon::spawn`).
fn fail_start(ready: &mut std::fs::File, e: ControlError) {
    let json = serde_json::to_string(&e).unwrap_or_else(|_| "{}".into());
    let _ = write!(ready, "E{json}");
}

pub(super) struct Shared {
    pub(super) id: String,
    pub(super) routes: Routes,
    pub(super) clients: HashMap<u64, Outbox>,
    pub(super) next_client: u64,
    pub(super) hello: Option<GuestHello>,
    pub(super) ready: Option<ReadyInfo>,
    /// Set when the VM can never become ready (VMM gone, bad agent).
    pub(super) fatal: Option<ControlError>,
    /// Set when the guest broke the protocol; the VM is killed and recorded
    /// as `error` with this reason.
    pub(super) violation: Option<String>,
    /// Whether to record state changes in the store (off in unit tests).
    pub(super) record_state: bool,
    pub(super) run_state: VmRunState,
    pub(super) vmm_pid: u32,
    pub(super) launched: Instant,
    pub(super) vmm_start_ms: u64,
    /// Told when the agent answers the `Quiesce` with this nonce.
    pub(super) quiesce_waiter: Option<(u64, oneshot::Sender<()>)>,
    /// A restored machine: the identity sent before the hello.
    pub(super) restored: bool,
    /// What the restored agent said of its `Reinit`.
    pub(super) reinited: Option<(bool, bool)>,
    /// The run's port forwards (set once the run is up).
    pub(super) ports: Option<Arc<super::ports::Ports>>,
}

impl Shared {
    /// The state of a VM whose VMM (`vmm_pid`) was launched at `launched`
    /// and came up in `vmm_start_ms`: booting, no clients, no guest yet.
    pub(super) fn new(id: String, vmm_pid: u32, launched: Instant, vmm_start_ms: u64) -> Shared {
        Shared {
            id,
            routes: Routes::default(),
            clients: HashMap::new(),
            next_client: 1,
            hello: None,
            ready: None,
            fatal: None,
            violation: None,
            record_state: true,
            run_state: VmRunState::Booting,
            vmm_pid,
            launched,
            vmm_start_ms,
            quiesce_waiter: None,
            restored: false,
            reinited: None,
            ports: None,
        }
    }
}

pub(super) type SharedRef = Arc<Mutex<Shared>>;

pub(super) fn lock(s: &SharedRef) -> std::sync::MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

pub(super) fn frame<M: serde::Serialize>(stream: u32, msg: M) -> Option<Vec<u8>> {
    encode_frame(&Frame::new(stream, msg)).ok()
}

/// Runs the supervisor until the VMM exits. Returns the process exit code.
pub async fn serve(spec: LaunchSpec, vm_dir: VmDir, mut ready: std::fs::File) -> i32 {
    let id = spec.id.clone();
    log!("supervisor for {id} starting (pid {})", std::process::id());
    let listener = match super::bind_in_dir(&vm_dir, files::SUPERVISOR_SOCKET) {
        Ok(l) => l,
        Err(e) => {
            let msg = format!(
                "cannot listen on {}: {e}",
                vm_dir.supervisor_socket().display()
            );
            fail_start(&mut ready, ControlError::new(ControlErrorKind::Other, msg));
            return 1;
        }
    };
    // The run's forwards are bound first: a host port in use fails the
    // start before anything else is spent on it.
    let mut listeners = Vec::new();
    for f in &spec.ports {
        match super::ports::bind(f) {
            Ok(l) => listeners.push((f.clone(), l)),
            Err(e) => {
                fail_start(&mut ready, ControlError::new(ControlErrorKind::Other, e));
                return 1;
            }
        }
    }
    let launched = Instant::now();
    let backend = crate::backend::get(spec.backend);
    let mut vm = match backend.launch(&spec).await {
        Ok(vm) => vm,
        Err(e) => {
            log!("launch failed: {e}");
            fail_start(&mut ready, vmm_failure(e));
            cleanup(&vm_dir);
            return 1;
        }
    };
    let vmm_start_ms = crate::sys::millis(launched.elapsed());
    log!("VMM pid {} up in {vmm_start_ms} ms", vm.pid());
    // SQLite may wait on a lock (busy timeout): never on the event loop.
    let (rid, vmm_pid, accel) = (id.clone(), vm.pid(), spec.accel.to_string());
    let _ = tokio::task::spawn_blocking(move || {
        if let Ok(store) = Store::open() {
            let _ = store.set_processes(
                &rid,
                ProcessId::of(std::process::id()),
                ProcessId::of(vmm_pid),
                Some(&accel),
            );
        }
    })
    .await;
    let agent = match super::connect_in_dir(&vm_dir, files::AGENT_SOCKET).await {
        Ok(s) => s,
        Err(e) => {
            vm.kill();
            fail_start(
                &mut ready,
                ControlError::new(
                    ControlErrorKind::BootFailed,
                    format!("cannot connect to the agent channel: {e}"),
                ),
            );
            cleanup(&vm_dir);
            return 1;
        }
    };
    let console = match super::connect_in_dir(&vm_dir, files::CONSOLE_SOCKET).await {
        Ok(c) => {
            // A restored machine never boots: say so where its boot
            // messages would be.
            let preamble = spec.restore.as_ref().map(|_| {
                format!(
                    "[smolvm] {id} continues a snapshot's running machine (it did not boot here; \
                     its kernel's boot messages are in the console of the VM the snapshot was taken from)\n"
                )
            });
            Some(tokio::spawn(super::console::pump(
                c,
                vm_dir.clone(),
                preamble,
            )))
        }
        Err(e) => {
            log!("cannot connect to the console: {e}; the console will not be logged");
            None
        }
    };
    // The VMM starts with its vCPUs stopped: go, now that every channel is
    // connected.
    if let Err(e) = vm.resume().await {
        vm.kill();
        fail_start(&mut ready, vmm_failure(e));
        cleanup(&vm_dir);
        return 1;
    }
    if !super::daemon::detach_from_launcher() {
        // The start was cancelled as we got ready: end the VM.
        log!("the start was cancelled; ending the VM");
        vm.kill();
        cleanup(&vm_dir);
        return 1;
    }
    let _ = ready.write_all(b"R");
    drop(ready);

    let shared: SharedRef = Arc::new(Mutex::new(Shared::new(
        id.clone(),
        vm.pid(),
        launched,
        vmm_start_ms,
    )));
    lock(&shared).restored = spec.restore.is_some();
    // Signals "something changed about readiness" to waiters.
    let (ready_tx, ready_rx) = watch::channel(());
    let ports = super::ports::Ports::new(vm_dir.clone(), shared.clone(), ready_rx.clone());
    for (f, l) in listeners {
        if let Err(e) = ports.add_bound(&f, l) {
            log!("port forward {f:?}: {e}");
        }
    }
    lock(&shared).ports = Some(ports);

    let (agent_r, agent_w) = agent.into_split();
    let agent_tx = agent_writer(agent_w);
    let (vm_tx, vm_rx) = mpsc::channel::<VmCmd>(16);
    tokio::spawn(super::agent_link::agent_reader(
        agent_r,
        shared.clone(),
        ready_tx.clone(),
        vm_tx.clone(),
    ));
    tokio::spawn(super::agent_link::hello_sender(
        agent_tx.clone(),
        shared.clone(),
    ));

    tokio::spawn(super::clients::accept_loop(
        listener,
        shared.clone(),
        agent_tx.clone(),
        vm_tx,
        ready_rx,
        vm_dir.clone(),
    ));

    let (exit, stop_requested) = vm_loop(&mut vm, vm_rx, &shared, &agent_tx).await;
    finish(&shared, &vm_dir, &exit, stop_requested, &ready_tx, console).await;
    0
}

/// Owns the VMM: serves lifecycle commands until it exits.
async fn vm_loop(
    vm: &mut Box<dyn Vmm>,
    mut rx: mpsc::Receiver<VmCmd>,
    shared: &SharedRef,
    agent_tx: &AgentTx,
) -> (VmmExit, bool) {
    let mut stop_requested = false;
    let mut stop_replies: Vec<Reply> = Vec::new();
    // The agent is quiesced and our writer to it held (a snapshot that
    // left the VM paused): the next resume or stop thaws it first.
    let mut agent_held = false;
    // Set when a control request timed out: the VMM's vCPUs may not be as
    // recorded until it answers again and is reconciled.
    let mut reconcile = false;
    let unresponsive = |r: &Result<(), ControlError>| matches!(r, Err(e) if e.kind == ControlErrorKind::VmmUnresponsive);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(RECONCILE_EVERY), if reconcile => {
                if vm.reconcile().await.is_ok() {
                    log!("the VMM answers again; vCPUs put back as recorded");
                    reconcile = false;
                }
            }
            exit = vm.wait() => {
                for r in stop_replies.drain(..) {
                    let _ = r.send(Ok(()));
                }
                return (exit, stop_requested);
            }
            Some(cmd) = rx.recv() => match cmd {
                VmCmd::Pause(reply) => {
                    let r = vm.pause().await.map_err(vmm_failure);
                    reconcile |= unresponsive(&r);
                    if r.is_ok() {
                        lock(shared).run_state = VmRunState::Paused;
                    }
                    let _ = reply.send(r);
                }
                VmCmd::SetEgress(policy, reply) => {
                    let r = vm.set_egress(&policy).await.map_err(vmm_failure);
                    let _ = reply.send(r);
                }
                VmCmd::Snapshot(req, reply) => {
                    let r = snapshot(vm, shared, agent_tx, &req, &mut agent_held).await;
                    if let Err(e) = &r {
                        reconcile |= e.kind == ControlErrorKind::VmmUnresponsive;
                    }
                    let _ = reply.send(r);
                }
                VmCmd::Resume(reply) => {
                    let r = vm.resume().await.map_err(vmm_failure);
                    if r.is_ok() && agent_held {
                        thaw(agent_tx);
                        agent_held = false;
                    }
                    reconcile |= unresponsive(&r);
                    if r.is_ok() {
                        let mut s = lock(shared);
                        s.run_state = if s.hello.is_some() { VmRunState::Running } else { VmRunState::Booting };
                    }
                    let _ = reply.send(r);
                }
                VmCmd::Kill(reply) => {
                    stop_requested = true;
                    vm.kill();
                    let exit = vm.wait().await;
                    let _ = reply.send(Ok(()));
                    return (exit, stop_requested);
                }
                VmCmd::Stop(timeout_ms, reply) => {
                    stop_requested = true;
                    // One deadline for the whole stop: resume, ask, wait.
                    let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
                    let (paused, agent_up) = {
                        let mut s = lock(shared);
                        let paused = s.run_state == VmRunState::Paused;
                        s.run_state = VmRunState::Stopping;
                        (paused, s.hello.is_some())
                    };
                    stop_replies.push(reply);
                    // Each step is bounded by the one deadline: a hung or
                    // stopped VMM (SIGSTOP) must not keep us from the kill.
                    if paused {
                        // A clean shutdown needs running vCPUs (the guest
                        // flushes its caches to the disk).
                        let _ = tokio::time::timeout_at(deadline, vm.resume()).await;
                    }
                    if agent_held {
                        thaw(agent_tx);
                    }
                    if !agent_up {
                        // Nothing in the guest can act on a shutdown request.
                        let _ = tokio::time::timeout_at(deadline, vm.quit()).await;
                    } else {
                        let global = lock(shared).routes.open(SUPERVISOR_CLIENT, 1).ok();
                        if let Some(buf) = global.and_then(|g| frame(g, HostMsg::Shutdown)) {
                            // Bounded: a wedged agent channel must not keep
                            // us from killing the VMM below.
                            let _ = tokio::time::timeout_at(deadline, agent_tx.send(buf, Lane::Control)).await;
                        }
                    }
                    match tokio::time::timeout_at(deadline, vm.wait()).await {
                        Ok(exit) => {
                            for r in stop_replies.drain(..) {
                                let _ = r.send(Ok(()));
                            }
                            return (exit, stop_requested);
                        }
                        Err(_) => {
                            log!("guest did not shut down within {timeout_ms} ms; killing the VMM");
                            vm.kill();
                            let exit = vm.wait().await;
                            for r in stop_replies.drain(..) {
                                let _ = r.send(Ok(()));
                            }
                            return (exit, stop_requested);
                        }
                    }
                }
            }
        }
    }
}

/// How long the agent gets to answer `Quiesce`.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(5);

/// Lets the agent write again (after a snapshot of this same machine).
fn thaw(agent_tx: &AgentTx) {
    let bufs = frame(smolvm_proto::CONTROL_STREAM, HostMsg::Thaw)
        .into_iter()
        .collect();
    agent_tx.release(bufs);
}

/// Quiesces the agent (unless it already is), then has the backend
/// snapshot the machine into `req.dir`.
async fn snapshot(
    vm: &mut Box<dyn Vmm>,
    shared: &SharedRef,
    agent_tx: &AgentTx,
    req: &smolvm_proto::supervisor::SnapshotRequest,
    agent_held: &mut bool,
) -> Result<smolvm_proto::supervisor::SnapshotReport, ControlError> {
    let (state, agent_up) = {
        let s = lock(shared);
        (s.run_state, s.hello.is_some())
    };
    if !agent_up || !matches!(state, VmRunState::Running | VmRunState::Paused) {
        return Err(ControlError::new(
            ControlErrorKind::InvalidState,
            format!("a snapshot needs a booted VM; this one is {state:?}"),
        ));
    }
    let started = Instant::now();
    let was_paused = state == VmRunState::Paused;
    if was_paused {
        // Run it for the moment this takes: the agent answers only on
        // running vCPUs (it may have been paused mid-frame), and QEMU
        // migrates a VM left stopped by an earlier snapshot only once it
        // ran again ("paused due to previous migration").
        vm.resume().await.map_err(vmm_failure)?;
    }
    if !*agent_held {
        let (t, r) = oneshot::channel();
        let mut nonce = [0u8; 8];
        let _ = getrandom::fill(&mut nonce);
        let nonce = u64::from_le_bytes(nonce);
        lock(shared).quiesce_waiter = Some((nonce, t));
        let buf = frame(smolvm_proto::CONTROL_STREAM, HostMsg::Quiesce { nonce })
            .ok_or_else(|| ControlError::new(ControlErrorKind::Other, "cannot encode Quiesce"))?;
        // One deadline for both: the writer taking the hold (it may be
        // stuck on a guest that stopped reading) and the agent's answer.
        let quiesced = tokio::time::timeout(QUIESCE_TIMEOUT, async {
            agent_tx.hold_after(buf).await?;
            r.await.map_err(drop)
        })
        .await;
        if !matches!(quiesced, Ok(Ok(()))) {
            lock(shared).quiesce_waiter = None;
            thaw(agent_tx);
            if was_paused {
                let _ = vm.pause().await;
            }
            return Err(ControlError::new(
                ControlErrorKind::Other,
                format!(
                    "the guest agent did not get ready for the snapshot within {} s (busy or stuck); nothing was changed",
                    QUIESCE_TIMEOUT.as_secs()
                ),
            ));
        }
        *agent_held = true;
    }
    let r = vm.snapshot(&req.dir, &req.next_disk, req.resume).await;
    let running = match &r {
        Ok(_) => req.resume,
        Err(_) => {
            // The backend left the vCPUs as they were before the call.
            if was_paused {
                let _ = vm.pause().await;
            }
            !was_paused
        }
    };
    if running {
        thaw(agent_tx);
        *agent_held = false;
    }
    lock(shared).run_state = if running {
        VmRunState::Running
    } else {
        VmRunState::Paused
    };
    match r {
        Ok(o) => Ok(smolvm_proto::supervisor::SnapshotReport {
            disk_switched: o.disk_switched,
            state_bytes: o.state_bytes,
            memory_bytes: o.memory_bytes,
            memory_in_state: o.memory_in_state,
            downtime_ms: crate::sys::millis(o.downtime),
            total_ms: crate::sys::millis(started.elapsed()),
            was_running: !was_paused,
        }),
        Err((e, o)) => {
            let mut err = vmm_failure(e);
            if o.disk_switched {
                err.message.push_str(
                    " (the VM's disk was already switched to a new layer over the frozen one)",
                );
            }
            Err(err)
        }
    }
}

/// Records the outcome, fails everything still open, removes sockets.
async fn finish(
    shared: &SharedRef,
    vm_dir: &VmDir,
    exit: &VmmExit,
    stop_requested: bool,
    ready_tx: &watch::Sender<()>,
    console: Option<tokio::task::JoinHandle<()>>,
) {
    // The console's last lines (a panic message) must be on disk before
    // they are read for the reason.
    if let Some(c) = console {
        let _ = tokio::time::timeout(Duration::from_secs(1), c).await;
    }
    let (id, routes, clients, outcome) = {
        let mut s = lock(shared);
        s.run_state = VmRunState::Exited;
        let outcome = if let Some(v) = &s.violation {
            (VmState::Error, Some(v.clone()))
        } else if stop_requested {
            (VmState::Stopped, None)
        } else if exit.code == Some(0) {
            guest_stopped(&s.id, vm_dir)
        } else {
            let stderr = tail_file_lines(&vm_dir.vmm_log(), 5);
            let why = if stderr.is_empty() {
                exit.to_string()
            } else {
                format!("{exit}: {stderr}")
            };
            (VmState::Error, Some(why))
        };
        if s.fatal.is_none() {
            s.fatal = Some(ControlError::new(
                ControlErrorKind::VmmExited,
                outcome.1.clone().unwrap_or_else(|| "the VM stopped".into()),
            ));
        }
        (
            s.id.clone(),
            s.routes.drain_all(),
            s.clients.clone(),
            outcome,
        )
    };
    let _ = ready_tx.send(());
    log!("VMM exited: {exit} (stop requested: {stop_requested})");
    for (_, route) in routes {
        if let Some(tx) = clients.get(&route.client) {
            if let Some(buf) = frame(
                route.stream,
                SupervisorMsg::Agent(GuestMsg::Error(ErrorInfo::new(
                    ErrorKind::Unavailable,
                    format!("the VM stopped: {exit}"),
                ))),
            ) {
                let _ = tx.send(buf, Lane::Data);
            }
        }
    }
    // Give client writers a moment to flush the final errors.
    tokio::time::sleep(Duration::from_millis(50)).await;
    cleanup(vm_dir);
    // Record last, with the sockets gone: a new start may bind them as soon
    // as the state is no longer live.
    let _ = tokio::task::spawn_blocking(move || record_exit(&id, outcome)).await;
}

/// Records how the VM ended (blocking: SQLite).
fn record_exit(id: &str, outcome: (VmState, Option<String>)) {
    if let Ok(store) = Store::open() {
        let (state, err) = outcome;
        // A VM being deleted has no row any more; a stop/start in another
        // process owns the state while it holds the VM lock, so only move
        // from the states this supervisor was responsible for.
        let _ = store.transition(
            id,
            &[
                VmState::Running,
                VmState::Paused,
                VmState::Created,
                VmState::Stopped,
            ],
            state,
            err.as_deref(),
        );
        let _ = store.set_processes(id, None, None, None);
    }
}

fn cleanup(vm_dir: &VmDir) {
    vm_dir.remove_runtime();
}

/// The last `n` non-empty lines of a log, on one line.
fn tail_file_lines(path: &std::path::Path, n: usize) -> String {
    crate::text::tail_lines(path, n)
        .lines()
        .collect::<Vec<_>>()
        .join(" | ")
}

/// What it means when a VMM that nobody asked to stop exits with status 0:
/// the guest reset itself (the VMM runs -no-reboot). After a kernel panic
/// (our kernel reboots on panic) the VM is `error`; after a clean shutdown
/// from inside the guest it is `stopped`, with a note.
fn guest_stopped(id: &str, vm_dir: &VmDir) -> (VmState, Option<String>) {
    // The panic line comes before its stack trace: look well back.
    let console = crate::text::tail_file(&vm_dir.console_log(), 64 * 1024);
    let panic = console
        .lines()
        .rev()
        .find(|l| l.contains("Kernel panic") || l.contains("panicked"))
        .map(|l| super::agent_link::sanitize(l.trim(), 200));
    match panic {
        Some(p) => (
            VmState::Error,
            Some(format!(
                "the guest stopped by itself (kernel panic: {p}); see `smolvm logs {id}`"
            )),
        ),
        None => (
            VmState::Stopped,
            Some(format!(
                "the guest shut itself down or reset; see `smolvm logs {id}`"
            )),
        ),
    }
}
