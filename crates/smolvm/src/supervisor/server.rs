//! The supervisor's event loop: one VMM, one agent connection, many clients.

use super::routes::{Routes, SUPERVISOR_CLIENT};
use crate::backend::qemu::{tail_console, QemuVm};
use crate::backend::{files, LaunchSpec, Vmm, VmmExit};
use crate::state::{ProcessId, Store, VmState};
use smolvm_proto::supervisor::{
    ClientMsg, ControlRequest, ControlResponse, ReadyInfo, SupervisorMsg, SupervisorStatus,
    VmRunState, SUPERVISOR_PROTOCOL_VERSION,
};
use smolvm_proto::{
    encode_frame, Decoder, ErrorInfo, ErrorKind, Frame, GuestHello, GuestMsg, HostHello, HostMsg,
    PROTOCOL_VERSION,
};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};

/// Frames queued towards one client before the agent reader waits for it.
const CLIENT_QUEUE: usize = 1024;
/// Frames queued towards the agent.
const AGENT_QUEUE: usize = 256;
const HELLO_RESEND: Duration = Duration::from_millis(200);
const READ_BUF: usize = 64 * 1024;

macro_rules! log {
    ($($t:tt)*) => {{
        let now = crate::state::now_ms();
        eprintln!("{}.{:03} {}", now / 1000, now % 1000, format!($($t)*));
    }};
}

enum VmCmd {
    Pause(oneshot::Sender<Result<(), String>>),
    Resume(oneshot::Sender<Result<(), String>>),
    Stop(u64, oneshot::Sender<Result<(), String>>),
    Kill(oneshot::Sender<Result<(), String>>),
}

struct Shared {
    id: String,
    routes: Routes,
    clients: HashMap<u64, mpsc::Sender<Vec<u8>>>,
    next_client: u64,
    hello: Option<GuestHello>,
    ready: Option<ReadyInfo>,
    /// Set when the VM can never become ready (VMM gone, bad agent).
    fatal: Option<String>,
    run_state: VmRunState,
    vmm_pid: u32,
    launched: Instant,
    vmm_start_ms: u64,
}

type SharedRef = Arc<Mutex<Shared>>;

fn lock(s: &SharedRef) -> std::sync::MutexGuard<'_, Shared> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

fn frame<M: serde::Serialize>(stream: u32, msg: M) -> Option<Vec<u8>> {
    encode_frame(&Frame::new(stream, msg)).ok()
}

/// Runs the supervisor until the VMM exits. Returns the process exit code.
pub async fn serve(spec: LaunchSpec, vm_dir: PathBuf, mut ready: std::fs::File) -> i32 {
    let id = spec.id.clone();
    log!("supervisor for {id} starting (pid {})", std::process::id());
    let listener = match super::bind_in_dir(&vm_dir, files::SUPERVISOR_SOCKET) {
        Ok(l) => l,
        Err(e) => {
            let _ = write!(
                ready,
                "E cannot listen on {}: {e}",
                vm_dir.join(files::SUPERVISOR_SOCKET).display()
            );
            return 1;
        }
    };
    let launched = Instant::now();
    let mut vm = match QemuVm::launch(&spec).await {
        Ok(vm) => vm,
        Err(e) => {
            log!("launch failed: {e}");
            let _ = write!(ready, "E {}", crate::error::chain(&e));
            cleanup(&vm_dir);
            return 1;
        }
    };
    let vmm_start_ms = launched.elapsed().as_millis() as u64;
    log!("VMM pid {} up in {vmm_start_ms} ms", vm.pid());
    if let Ok(store) = Store::open() {
        let _ = store.set_processes(
            &id,
            ProcessId::of(std::process::id()),
            ProcessId::of(vm.pid()),
            Some(&spec.accel.to_string()),
        );
    }
    let agent = match super::connect_in_dir(&vm_dir, files::AGENT_SOCKET).await {
        Ok(s) => s,
        Err(e) => {
            vm.kill();
            let _ = write!(ready, "E cannot connect to the agent channel: {e}");
            cleanup(&vm_dir);
            return 1;
        }
    };
    let _ = ready.write_all(b"R");
    drop(ready);

    let shared: SharedRef = Arc::new(Mutex::new(Shared {
        id: id.clone(),
        routes: Routes::default(),
        clients: HashMap::new(),
        next_client: 1,
        hello: None,
        ready: None,
        fatal: None,
        run_state: VmRunState::Booting,
        vmm_pid: vm.pid(),
        launched,
        vmm_start_ms,
    }));
    // Signals "something changed about readiness" to waiters.
    let (ready_tx, ready_rx) = watch::channel(());

    let (agent_r, mut agent_w) = agent.into_split();
    let (agent_tx, mut agent_rx) = mpsc::channel::<Vec<u8>>(AGENT_QUEUE);
    tokio::spawn(async move {
        while let Some(buf) = agent_rx.recv().await {
            if agent_w.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    tokio::spawn(agent_reader(agent_r, shared.clone(), ready_tx.clone()));
    tokio::spawn(hello_sender(agent_tx.clone(), shared.clone()));

    let (vm_tx, vm_rx) = mpsc::channel::<VmCmd>(16);
    tokio::spawn(accept_loop(
        listener,
        shared.clone(),
        agent_tx.clone(),
        vm_tx,
        ready_rx,
        vm_dir.clone(),
    ));

    let (exit, stop_requested) = vm_loop(&mut vm, vm_rx, &shared, &agent_tx).await;
    finish(&shared, &vm_dir, &exit, stop_requested, &ready_tx).await;
    0
}

/// Owns the VMM: serves lifecycle commands until it exits.
async fn vm_loop(
    vm: &mut QemuVm,
    mut rx: mpsc::Receiver<VmCmd>,
    shared: &SharedRef,
    agent_tx: &mpsc::Sender<Vec<u8>>,
) -> (VmmExit, bool) {
    let mut stop_requested = false;
    let mut stop_replies: Vec<oneshot::Sender<Result<(), String>>> = Vec::new();
    loop {
        tokio::select! {
            exit = vm.wait() => {
                for r in stop_replies.drain(..) {
                    let _ = r.send(Ok(()));
                }
                return (exit, stop_requested);
            }
            Some(cmd) = rx.recv() => match cmd {
                VmCmd::Pause(reply) => {
                    let r = vm.pause().await.map_err(|e| crate::error::chain(&e));
                    if r.is_ok() {
                        lock(shared).run_state = VmRunState::Paused;
                    }
                    let _ = reply.send(r);
                }
                VmCmd::Resume(reply) => {
                    let r = vm.resume().await.map_err(|e| crate::error::chain(&e));
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
                    let (paused, agent_up) = {
                        let mut s = lock(shared);
                        let paused = s.run_state == VmRunState::Paused;
                        s.run_state = VmRunState::Stopping;
                        (paused, s.hello.is_some())
                    };
                    stop_replies.push(reply);
                    if paused || !agent_up {
                        // Nothing in the guest can act on a shutdown request.
                        let _ = vm.quit().await;
                    } else {
                        let global = lock(shared).routes.open(SUPERVISOR_CLIENT, 1).ok();
                        if let Some(buf) = global.and_then(|g| frame(g, HostMsg::Shutdown)) {
                            let _ = agent_tx.send(buf).await;
                        }
                    }
                    match tokio::time::timeout(Duration::from_millis(timeout_ms), vm.wait()).await {
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

/// Records the outcome, fails everything still open, removes sockets.
async fn finish(
    shared: &SharedRef,
    vm_dir: &std::path::Path,
    exit: &VmmExit,
    stop_requested: bool,
    ready_tx: &watch::Sender<()>,
) {
    let (id, routes, clients) = {
        let mut s = lock(shared);
        s.run_state = VmRunState::Exited;
        let reason = if stop_requested || exit.code == Some(0) {
            "VM stopped".to_string()
        } else {
            let stderr = tail_file_lines(&vm_dir.join(files::VMM_LOG), 5);
            if stderr.is_empty() {
                exit.to_string()
            } else {
                format!("{exit}: {stderr}")
            }
        };
        if s.fatal.is_none() {
            s.fatal = Some(reason);
        }
        (s.id.clone(), s.routes.drain_all(), s.clients.clone())
    };
    let _ = ready_tx.send(());
    let clean = stop_requested || exit.code == Some(0);
    log!("VMM exited: {exit} (stop requested: {stop_requested})");
    if let Ok(store) = Store::open() {
        let (state, err) = if clean {
            (VmState::Stopped, None)
        } else {
            (VmState::Error, Some(exit.to_string()))
        };
        // A VM being deleted has no row any more; a stop/start in another
        // process owns the state while it holds the VM lock, so only move
        // from the states this supervisor was responsible for.
        let _ = store.transition(
            &id,
            &[
                VmState::Running,
                VmState::Paused,
                VmState::Created,
                VmState::Stopped,
            ],
            state,
            err.as_deref(),
        );
        let _ = store.set_processes(&id, None, None, None);
    }
    for (_, route) in routes {
        if let Some(tx) = clients.get(&route.client) {
            if let Some(buf) = frame(
                route.stream,
                SupervisorMsg::Agent(GuestMsg::Error(ErrorInfo::new(
                    ErrorKind::Other,
                    format!("VM stopped: {exit}"),
                ))),
            ) {
                let _ = tx.try_send(buf);
            }
        }
    }
    // Give client writers a moment to flush the final errors.
    tokio::time::sleep(Duration::from_millis(50)).await;
    cleanup(vm_dir);
}

fn cleanup(vm_dir: &std::path::Path) {
    for f in [
        files::SUPERVISOR_SOCKET,
        files::QMP_SOCKET,
        files::AGENT_SOCKET,
        files::MEMORY_FILE,
    ] {
        let _ = std::fs::remove_file(vm_dir.join(f));
    }
}

fn tail_file_lines(path: &std::path::Path, n: usize) -> String {
    let t = crate::backend::qemu::tail_file(path, 4096);
    let lines: Vec<&str> = t.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Sends the host hello until the agent answers (the guest opens its port
/// only once booted; earlier bytes may be lost).
async fn hello_sender(agent_tx: mpsc::Sender<Vec<u8>>, shared: SharedRef) {
    let Some(buf) = frame(
        smolvm_proto::CONTROL_STREAM,
        HostMsg::Hello(HostHello {
            version: PROTOCOL_VERSION,
        }),
    ) else {
        return;
    };
    loop {
        {
            let s = lock(&shared);
            if s.hello.is_some() || s.fatal.is_some() {
                return;
            }
        }
        if agent_tx.send(buf.clone()).await.is_err() {
            return;
        }
        tokio::time::sleep(HELLO_RESEND).await;
    }
}

async fn agent_reader(
    mut r: tokio::net::unix::OwnedReadHalf,
    shared: SharedRef,
    ready_tx: watch::Sender<()>,
) {
    let mut dec = Decoder::new();
    let mut buf = vec![0u8; READ_BUF];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        dec.push(&buf[..n]);
        loop {
            let f = match dec.next_frame::<GuestMsg>() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    // The guest is untrusted: drop what we have and resync.
                    log!("bad frame from the guest agent: {e}; resetting the decoder");
                    dec.reset();
                    break;
                }
            };
            handle_guest_frame(f, &shared, &ready_tx).await;
        }
    }
}

async fn handle_guest_frame(f: Frame<GuestMsg>, shared: &SharedRef, ready_tx: &watch::Sender<()>) {
    if f.stream == smolvm_proto::CONTROL_STREAM {
        if let GuestMsg::Hello(h) = f.msg {
            let mut s = lock(shared);
            if s.hello.is_some() {
                return;
            }
            if h.version != PROTOCOL_VERSION {
                let msg = format!(
                    "the guest agent speaks protocol v{} but this host speaks v{PROTOCOL_VERSION}; \
                     rebuild the image's initramfs with `smolvm image build` (agent {})",
                    h.version, h.agent_version
                );
                log!("{msg}");
                s.fatal = Some(msg);
            } else {
                let ready_ms = s.launched.elapsed().as_millis() as u64;
                log!("agent {} ready after {ready_ms} ms", h.agent_version);
                s.ready = Some(ReadyInfo {
                    hello: h.clone(),
                    vmm_start_ms: s.vmm_start_ms,
                    ready_ms,
                });
                s.hello = Some(h);
                if s.run_state == VmRunState::Booting {
                    s.run_state = VmRunState::Running;
                }
            }
            drop(s);
            let _ = ready_tx.send(());
        }
        return;
    }
    let terminal = matches!(
        f.msg,
        GuestMsg::Exited(_) | GuestMsg::Error(_) | GuestMsg::Pong { .. } | GuestMsg::ShutdownAck
    );
    let target = {
        let mut s = lock(shared);
        let route = if terminal {
            s.routes.close(f.stream)
        } else {
            s.routes.lookup(f.stream)
        };
        route.and_then(|r| s.clients.get(&r.client).cloned().map(|tx| (r, tx)))
    };
    if let Some((route, tx)) = target {
        if let Some(buf) = frame(route.stream, SupervisorMsg::Agent(f.msg)) {
            // Back-pressure: a slow client slows the guest's output.
            let _ = tx.send(buf).await;
        }
    }
}

async fn accept_loop(
    listener: tokio::net::UnixListener,
    shared: SharedRef,
    agent_tx: mpsc::Sender<Vec<u8>>,
    vm_tx: mpsc::Sender<VmCmd>,
    ready_rx: watch::Receiver<()>,
    vm_dir: PathBuf,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(client_conn(
            stream,
            shared.clone(),
            agent_tx.clone(),
            vm_tx.clone(),
            ready_rx.clone(),
            vm_dir.clone(),
        ));
    }
}

async fn client_conn(
    stream: UnixStream,
    shared: SharedRef,
    agent_tx: mpsc::Sender<Vec<u8>>,
    vm_tx: mpsc::Sender<VmCmd>,
    ready_rx: watch::Receiver<()>,
    vm_dir: PathBuf,
) {
    let (mut r, mut w) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(CLIENT_QUEUE);
    let client = {
        let mut s = lock(&shared);
        let c = s.next_client;
        s.next_client += 1;
        s.clients.insert(c, tx.clone());
        c
    };
    let writer = tokio::spawn(async move {
        while let Some(buf) = rx.recv().await {
            if w.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    let mut dec = Decoder::new();
    let mut buf = vec![0u8; READ_BUF];
    let mut greeted = false;
    'conn: loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        dec.push(&buf[..n]);
        loop {
            let f = match dec.next_frame::<ClientMsg>() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    log!("client {client}: {e}; closing");
                    break 'conn;
                }
            };
            match f.msg {
                ClientMsg::Hello { version } => {
                    if version != SUPERVISOR_PROTOCOL_VERSION {
                        log!("client {client} speaks supervisor protocol v{version}; closing");
                        break 'conn;
                    }
                    greeted = true;
                    let id = lock(&shared).id.clone();
                    if let Some(b) = frame(
                        0,
                        SupervisorMsg::Hello {
                            version: SUPERVISOR_PROTOCOL_VERSION,
                            vm_id: id,
                        },
                    ) {
                        let _ = tx.send(b).await;
                    }
                }
                _ if !greeted => break 'conn,
                ClientMsg::Agent(msg) => {
                    if let Err(e) =
                        forward_to_agent(client, f.stream, msg, &shared, &agent_tx).await
                    {
                        if let Some(b) = frame(f.stream, SupervisorMsg::Agent(GuestMsg::Error(e))) {
                            let _ = tx.send(b).await;
                        }
                    }
                }
                ClientMsg::Control(req) => {
                    let (shared, vm_tx, tx, ready_rx, vm_dir) = (
                        shared.clone(),
                        vm_tx.clone(),
                        tx.clone(),
                        ready_rx.clone(),
                        vm_dir.clone(),
                    );
                    tokio::spawn(async move {
                        let resp = control(req, &shared, &vm_tx, ready_rx, &vm_dir).await;
                        if let Some(b) = frame(f.stream, SupervisorMsg::Control(resp)) {
                            let _ = tx.send(b).await;
                        }
                    });
                }
            }
        }
    }
    // The client went away: its running processes go with it.
    let orphans = {
        let mut s = lock(&shared);
        s.clients.remove(&client);
        s.routes.drain_client(client)
    };
    for g in orphans {
        if let Some(b) = frame(
            g,
            HostMsg::Signal {
                signal: libc::SIGKILL,
            },
        ) {
            let _ = agent_tx.send(b).await;
        }
    }
    drop(tx);
    let _ = writer.await;
}

async fn forward_to_agent(
    client: u64,
    stream: u32,
    msg: HostMsg,
    shared: &SharedRef,
    agent_tx: &mpsc::Sender<Vec<u8>>,
) -> Result<(), ErrorInfo> {
    let global = {
        let mut s = lock(shared);
        if let Some(f) = &s.fatal {
            return Err(ErrorInfo::new(ErrorKind::Other, f.clone()));
        }
        if s.hello.is_none() {
            return Err(ErrorInfo::new(
                ErrorKind::Other,
                "the guest agent is not ready yet",
            ));
        }
        match &msg {
            HostMsg::Hello(_) => {
                return Err(ErrorInfo::new(
                    ErrorKind::InvalidRequest,
                    "the supervisor owns the agent hello",
                ))
            }
            HostMsg::Exec(_) | HostMsg::Ping { .. } | HostMsg::Shutdown => s
                .routes
                .open(client, stream)
                .map_err(|e| ErrorInfo::new(ErrorKind::InvalidRequest, e.to_string()))?,
            HostMsg::Stdin(_) | HostMsg::StdinClose | HostMsg::Signal { .. } => {
                s.routes.global(client, stream).ok_or_else(|| {
                    ErrorInfo::new(
                        ErrorKind::InvalidRequest,
                        format!("no open stream {stream}"),
                    )
                })?
            }
        }
    };
    let buf = encode_frame(&Frame::new(global, msg))
        .map_err(|e| ErrorInfo::new(ErrorKind::InvalidRequest, e.to_string()))?;
    agent_tx
        .send(buf)
        .await
        .map_err(|_| ErrorInfo::new(ErrorKind::Other, "the agent channel is closed"))
}

async fn control(
    req: ControlRequest,
    shared: &SharedRef,
    vm_tx: &mpsc::Sender<VmCmd>,
    mut ready_rx: watch::Receiver<()>,
    vm_dir: &std::path::Path,
) -> ControlResponse {
    let vm_cmd = |make: fn(oneshot::Sender<Result<(), String>>) -> VmCmd| async move {
        let (t, r) = oneshot::channel();
        if vm_tx.send(make(t)).await.is_err() {
            return ControlResponse::Error("the VMM has exited".into());
        }
        match r.await {
            Ok(Ok(())) => ControlResponse::Ok,
            Ok(Err(e)) => ControlResponse::Error(e),
            Err(_) => ControlResponse::Error("the VMM has exited".into()),
        }
    };
    match req {
        ControlRequest::Status => {
            let s = lock(shared);
            ControlResponse::Status(SupervisorStatus {
                state: s.run_state,
                vmm_pid: s.vmm_pid,
                agent_connected: s.hello.is_some(),
            })
        }
        ControlRequest::WaitReady { timeout_ms } => {
            let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout_ms);
            loop {
                {
                    let s = lock(shared);
                    if let Some(r) = &s.ready {
                        return ControlResponse::Ready(r.clone());
                    }
                    if let Some(f) = &s.fatal {
                        return ControlResponse::Error(format!("{f}\n{}", console_tail(vm_dir)));
                    }
                }
                match tokio::time::timeout_at(deadline, ready_rx.changed()).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) => {
                        return ControlResponse::Error("the supervisor is shutting down".into())
                    }
                    Err(_) => {
                        return ControlResponse::Error(format!(
                            "the guest agent did not answer within {:.1}s\n{}",
                            timeout_ms as f64 / 1000.0,
                            console_tail(vm_dir)
                        ))
                    }
                }
            }
        }
        ControlRequest::Pause => vm_cmd(VmCmd::Pause).await,
        ControlRequest::Resume => vm_cmd(VmCmd::Resume).await,
        ControlRequest::Kill => vm_cmd(VmCmd::Kill).await,
        ControlRequest::Stop { timeout_ms } => {
            let (t, r) = oneshot::channel();
            if vm_tx.send(VmCmd::Stop(timeout_ms, t)).await.is_err() {
                return ControlResponse::Ok; // already exiting
            }
            match r.await {
                Ok(Err(e)) => ControlResponse::Error(e),
                _ => ControlResponse::Ok,
            }
        }
    }
}

fn console_tail(vm_dir: &std::path::Path) -> String {
    let t = tail_console(&vm_dir.join(files::CONSOLE_LOG), 15);
    if t.is_empty() {
        "the guest console is empty".to_string()
    } else {
        format!("last guest console lines:\n{t}")
    }
}
