//! The supervisor's clients: each connection's frames are routed to the
//! guest agent (with stream ids remapped) or served as lifecycle requests.

use super::outbox::{outbox, Lane};
use super::server::{frame, lock, AgentTx, SharedRef, VmCmd};
use crate::backend::VmDir;
use crate::text::tail_lines;
use smolvm_proto::supervisor::{
    ClientMsg, ControlError, ControlErrorKind, ControlRequest, ControlResponse, SupervisorMsg,
    SupervisorStatus, SUPERVISOR_PROTOCOL_VERSION,
};
use smolvm_proto::{encode_frame, Decoder, ErrorInfo, ErrorKind, Frame, GuestMsg, HostMsg};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};

/// Most simultaneous client connections; more are refused (closed at once)
/// so that local clients cannot exhaust the supervisor.
const MAX_CLIENTS: usize = 256;
/// How long a new connection has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Read buffer per client connection (requests are small).
const CLIENT_READ_BUF: usize = 16 * 1024;

pub(super) async fn accept_loop(
    listener: tokio::net::UnixListener,
    shared: SharedRef,
    agent_tx: AgentTx,
    vm_tx: mpsc::Sender<VmCmd>,
    ready_rx: watch::Receiver<()>,
    vm_dir: VmDir,
) {
    let mut refused = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                log!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Only our own user may drive the VM. The socket sits in a private
        // directory already; this holds even if its mode is loosened.
        match stream.peer_cred().map(|c| c.uid()) {
            Ok(uid) if uid == crate::sys::euid() => {}
            other => {
                refused += 1;
                if refused <= 10 || refused.is_multiple_of(1000) {
                    log!("refusing a client of another user ({other:?})");
                }
                drop(stream);
                continue;
            }
        }
        // Check and register under one lock: a burst cannot overshoot.
        let (tx, rx) = outbox();
        let client = {
            let mut s = lock(&shared);
            if s.clients.len() >= MAX_CLIENTS {
                None
            } else {
                let c = s.next_client;
                s.next_client += 1;
                s.clients.insert(c, tx.clone());
                Some(c)
            }
        };
        let Some(client) = client else {
            refused += 1;
            if refused <= 10 || refused.is_multiple_of(1000) {
                log!("refusing a client: {MAX_CLIENTS} connections are open");
            }
            drop(stream);
            continue;
        };
        tokio::spawn(client_conn(
            stream,
            client,
            tx,
            rx,
            shared.clone(),
            agent_tx.clone(),
            vm_tx.clone(),
            ready_rx.clone(),
            vm_dir.clone(),
        ));
    }
}

#[allow(clippy::too_many_arguments)]
async fn client_conn(
    stream: UnixStream,
    client: u64,
    tx: super::outbox::Outbox,
    mut rx: super::outbox::OutboxRx,
    shared: SharedRef,
    agent_tx: AgentTx,
    vm_tx: mpsc::Sender<VmCmd>,
    ready_rx: watch::Receiver<()>,
    vm_dir: VmDir,
) {
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        while let Some(buf) = rx.recv().await {
            if w.write_all(&buf).await.is_err() {
                break;
            }
            rx.done(buf.len());
        }
    });
    let watchdog = {
        let tx = tx.clone();
        tokio::spawn(async move {
            if tx.watch_stall().await {
                log!("client {client} stopped reading with a full queue; disconnected");
            }
        })
    };
    let mut dec = Decoder::new();
    let mut buf = vec![0u8; CLIENT_READ_BUF];
    let mut greeted = false;
    // A connection that never says hello does not get to hold a slot.
    let hello_deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    'conn: loop {
        let n = tokio::select! {
            r = r.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
            _ = tx.kicked() => break,
            _ = tokio::time::sleep_until(hello_deadline), if !greeted => {
                log!("client {client} sent no hello within {HELLO_TIMEOUT:?}; closing");
                break;
            }
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
                        tx.send(b, Lane::Control);
                    }
                }
                _ if !greeted => break 'conn,
                ClientMsg::Agent(msg) => {
                    if let Err(e) =
                        forward_to_agent(client, f.stream, msg, &shared, &agent_tx).await
                    {
                        if let Some(b) = frame(f.stream, SupervisorMsg::Agent(GuestMsg::Error(e))) {
                            tx.send(b, Lane::Data);
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
                            tx.send(b, Lane::Control);
                        }
                    });
                }
            }
        }
    }
    // The client went away (or was cut off): its running processes and
    // transfers go with it, and nothing waits on its queue any more.
    tx.kick();
    watchdog.abort();
    let orphans = {
        let mut s = lock(&shared);
        s.clients.remove(&client);
        s.routes.drain_client(client)
    };
    drop(tx);
    // Bounded: a guest that stops reading its channel must not keep this
    // task (and its socket) alive forever.
    let cancels = async {
        for g in orphans {
            if let Some(b) = frame(g, HostMsg::Cancel) {
                if agent_tx.send(b, Lane::Data).await.is_err() {
                    return;
                }
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(5), cancels)
        .await
        .is_err()
    {
        log!("client {client}: the guest does not take the cancels of its streams");
    }
    // Let the writer flush what is queued, but never wait forever on a
    // client that holds its socket open without reading.
    let mut writer = writer;
    if tokio::time::timeout(Duration::from_secs(5), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

async fn forward_to_agent(
    client: u64,
    stream: u32,
    msg: HostMsg,
    shared: &SharedRef,
    agent_tx: &AgentTx,
) -> Result<(), ErrorInfo> {
    let no_stream = || {
        ErrorInfo::new(
            ErrorKind::InvalidRequest,
            format!("no open stream {stream}"),
        )
    };
    let (global, msg, lane) = {
        let mut s = lock(shared);
        if let Some(f) = &s.fatal {
            return Err(ErrorInfo::new(ErrorKind::Unavailable, f.message.clone()));
        }
        if s.hello.is_none() {
            return Err(ErrorInfo::new(
                ErrorKind::Unavailable,
                "the guest agent is not ready yet",
            ));
        }
        match msg {
            HostMsg::Hello(_) | HostMsg::Quiesce { .. } | HostMsg::Thaw | HostMsg::Reinit(_) => {
                return Err(ErrorInfo::new(
                    ErrorKind::InvalidRequest,
                    "the supervisor owns the agent's hello, quiesce and identity",
                ))
            }
            // Requests open a stream.
            HostMsg::Exec(_)
            | HostMsg::Ping { .. }
            | HostMsg::Shutdown
            | HostMsg::ReadFile(_)
            | HostMsg::WriteFile(_)
            | HostMsg::Spawn(_)
            | HostMsg::Attach(_)
            | HostMsg::Connect { .. }
            | HostMsg::Op(_) => {
                let lane = match msg {
                    HostMsg::Ping { .. } | HostMsg::Op(_) => Lane::Control,
                    _ => Lane::Data,
                };
                let g = s
                    .routes
                    .open(client, stream)
                    .map_err(|e| ErrorInfo::new(ErrorKind::InvalidRequest, e.to_string()))?;
                (g, msg, lane)
            }
            HostMsg::Credit { bytes } => {
                let g = s.routes.global(client, stream).ok_or_else(no_stream)?;
                // Never more outstanding than one window: what we may have
                // to hold for this client.
                let pass = s.routes.grant(g, bytes);
                if pass == 0 {
                    return Ok(());
                }
                (g, HostMsg::Credit { bytes: pass }, Lane::Control)
            }
            HostMsg::Cancel => {
                // Nothing more comes back on a cancelled stream: close it
                // here, so late frames from the guest are dropped. In the
                // data lane: it must not overtake its own request.
                let g = s.routes.global(client, stream).ok_or_else(no_stream)?;
                s.routes.close(g);
                (g, msg, Lane::Data)
            }
            HostMsg::Resize(_) => {
                let g = s.routes.global(client, stream).ok_or_else(no_stream)?;
                (g, msg, Lane::Control)
            }
            HostMsg::Data(_) | HostMsg::Eof | HostMsg::Signal { .. } => {
                let g = s.routes.global(client, stream).ok_or_else(no_stream)?;
                (g, msg, Lane::Data)
            }
        }
    };
    let buf = encode_frame(&Frame::new(global, msg))
        .map_err(|e| ErrorInfo::new(ErrorKind::InvalidRequest, e.to_string()))?;
    agent_tx
        .send(buf, lane)
        .await
        .map_err(|()| ErrorInfo::new(ErrorKind::Other, "the agent channel is closed"))
}

async fn control(
    req: ControlRequest,
    shared: &SharedRef,
    vm_tx: &mpsc::Sender<VmCmd>,
    mut ready_rx: watch::Receiver<()>,
    vm_dir: &VmDir,
) -> ControlResponse {
    let exited = || {
        ControlResponse::Error(ControlError::new(
            ControlErrorKind::VmmExited,
            "the VMM has exited",
        ))
    };
    let vm_cmd = |make: fn(super::server::Reply) -> VmCmd| async move {
        let (t, r) = oneshot::channel();
        if vm_tx.send(make(t)).await.is_err() {
            return exited();
        }
        match r.await {
            Ok(Ok(())) => ControlResponse::Ok,
            Ok(Err(e)) => ControlResponse::Error(e),
            Err(_) => exited(),
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
                        let kind = match f.kind {
                            // The VMM dying during the boot is a failed boot.
                            ControlErrorKind::VmmExited => ControlErrorKind::BootFailed,
                            k => k,
                        };
                        return ControlResponse::Error(
                            ControlError::new(kind, f.message.clone())
                                .with_console(console_tail(vm_dir)),
                        );
                    }
                }
                match tokio::time::timeout_at(deadline, ready_rx.changed()).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) => {
                        return ControlResponse::Error(ControlError::new(
                            ControlErrorKind::ShuttingDown,
                            "the supervisor is shutting down",
                        ))
                    }
                    Err(_) => {
                        return ControlResponse::Error(
                            ControlError::new(
                                ControlErrorKind::BootTimeout,
                                format!(
                                    "the guest agent did not answer within {:.1}s",
                                    timeout_ms as f64 / 1000.0
                                ),
                            )
                            .with_console(console_tail(vm_dir)),
                        )
                    }
                }
            }
        }
        ControlRequest::Snapshot(req) => {
            // Only into the data dir's snapshots, and only this VM's disk.
            let in_snapshots = req.dir.parent() == Some(crate::paths::snapshots_dir().as_path())
                && std::fs::symlink_metadata(&req.dir).is_ok_and(|m| m.is_dir());
            let own_disk = req.next_disk.parent() == Some(vm_dir.path())
                && req
                    .next_disk
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(crate::backend::files::LAYER_PREFIX))
                && std::fs::symlink_metadata(&req.next_disk).is_ok_and(|m| m.is_file());
            if !in_snapshots || !own_disk {
                return ControlResponse::Error(ControlError::new(
                    ControlErrorKind::Other,
                    "a snapshot goes into the data dir's snapshots, from this VM's own disk",
                ));
            }
            let (t, r) = oneshot::channel();
            if vm_tx.send(VmCmd::Snapshot(req, t)).await.is_err() {
                return ControlResponse::Error(ControlError::new(
                    ControlErrorKind::ShuttingDown,
                    "the VM is stopping",
                ));
            }
            match r.await {
                Ok(Ok(rep)) => ControlResponse::Snapshot(rep),
                Ok(Err(e)) => ControlResponse::Error(e),
                Err(_) => ControlResponse::Error(ControlError::new(
                    ControlErrorKind::ShuttingDown,
                    "the VM stopped during the snapshot",
                )),
            }
        }
        ControlRequest::PortAdd(_)
        | ControlRequest::PortRemove { .. }
        | ControlRequest::PortList => {
            let Some(ports) = lock(shared).ports.clone() else {
                return ControlResponse::Error(ControlError::new(
                    ControlErrorKind::InvalidState,
                    "the VM is not up yet",
                ));
            };
            let failed =
                |e: String| ControlResponse::Error(ControlError::new(ControlErrorKind::Other, e));
            match req {
                ControlRequest::PortAdd(f) => {
                    ports.add(f).map_or_else(failed, ControlResponse::Port)
                }
                // No such forward: the request does not fit the run.
                ControlRequest::PortRemove { host_port } => ports.remove(host_port).map_or_else(
                    |e| {
                        ControlResponse::Error(ControlError::new(ControlErrorKind::InvalidState, e))
                    },
                    ControlResponse::Port,
                ),
                _ => ControlResponse::Ports(ports.list()),
            }
        }
        ControlRequest::SetEgress(policy) => match crate::egress::normalize(&policy) {
            Err(e) => {
                ControlResponse::Error(ControlError::new(ControlErrorKind::Other, e.to_string()))
            }
            Ok(policy) => {
                let (t, r) = oneshot::channel();
                if vm_tx.send(VmCmd::SetEgress(policy, t)).await.is_err() {
                    return exited();
                }
                match r.await {
                    Ok(Ok(())) => ControlResponse::Ok,
                    Ok(Err(e)) => ControlResponse::Error(e),
                    Err(_) => exited(),
                }
            }
        },
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

/// The guest console's last lines (raw guest text: whoever shows it
/// escapes it), `None` when the console is empty.
fn console_tail(vm_dir: &VmDir) -> Option<String> {
    let t = tail_lines(&vm_dir.console_log(), 15);
    (!t.is_empty()).then_some(t)
}
