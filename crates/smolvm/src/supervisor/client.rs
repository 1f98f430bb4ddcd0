//! The library's connection to a VM's supervisor.

use crate::backend::files;
use smolvm_proto::supervisor::{
    ClientMsg, ControlRequest, ControlResponse, SupervisorMsg, SUPERVISOR_PROTOCOL_VERSION,
};
use smolvm_proto::{
    encode_frame, Bytes, Decoder, ExecRequest, Frame, GuestMsg, HostMsg, STREAM_WINDOW,
};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames queued towards the supervisor, per lane.
const SEND_QUEUE: usize = 64;
/// Consumed output is credited back in batches of this much (docs/protocol.md).
const GRANT_BATCH: u64 = STREAM_WINDOW as u64 / 4;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the VM's supervisor")]
    Connect(#[source] std::io::Error),
    #[error("the supervisor closed the connection")]
    Closed,
    #[error("the supervisor did not answer the hello")]
    NoHello,
    #[error("the supervisor answered with an unexpected message")]
    Unexpected,
    #[error("the guest agent failed the request: {0}")]
    Agent(String),
    #[error("the supervisor did not answer within {0:?}")]
    Timeout(Duration),
    /// A command with a timeout had not ended when its host-side deadline
    /// (the timeout plus a grace period) passed: the guest stopped
    /// answering (frozen, hung, or its VMM stopped).
    #[error("the guest did not end the command within {:.1}s (its timeout plus {}s, and more while output still came); the guest is not answering", .0.as_secs_f64(), GUEST_GRACE.as_secs())]
    GuestTimeout(Duration),
}

/// How long past a command's own timeout the host waits for the guest to
/// report it ended before giving up on the guest.
pub const GUEST_GRACE: Duration = Duration::from_secs(5);

/// How long a lifecycle request may take before the supervisor is deemed
/// wedged (its own deadlines plus a margin).
fn control_deadline(req: &ControlRequest) -> Duration {
    let margin = Duration::from_secs(15);
    match req {
        ControlRequest::WaitReady { timeout_ms } | ControlRequest::Stop { timeout_ms } => {
            Duration::from_millis(*timeout_ms).saturating_add(margin)
        }
        // Quiesce, the migration (RAM in the stream: GiBs) and the RAM
        // copy: the supervisor's own deadlines bound each.
        ControlRequest::Snapshot(_) => Duration::from_secs(20 * 60),
        _ => margin,
    }
}

/// One open stream, as the reader task sees it.
struct Slot {
    /// Everything for the stream's consumer. Unbounded, yet bounded by flow
    /// control: at most one window of data plus a few small frames, so the
    /// reader never waits on one consumer and no stream stalls another.
    tx: mpsc::UnboundedSender<SupervisorMsg>,
    /// Input credit the agent granted (`GuestMsg::Credit`), applied here at
    /// once: a writer must not wait on a consumer to read it.
    input: Arc<Semaphore>,
}

type Routes = Arc<Mutex<HashMap<u32, Slot>>>;

/// The two lanes towards the supervisor: control (credit, cancel, pings,
/// lifecycle and one-shot requests) is written first.
#[derive(Clone)]
struct Lanes {
    control: mpsc::Sender<Vec<u8>>,
    data: mpsc::Sender<Vec<u8>>,
}

/// True for the control lane. `Cancel` is not: it must never overtake the
/// request it cancels (which travels in the data lane).
fn lane_of(msg: &ClientMsg) -> bool {
    matches!(
        msg,
        ClientMsg::Control(_)
            | ClientMsg::Agent(
                HostMsg::Credit { .. } | HostMsg::Ping { .. } | HostMsg::Op(_) | HostMsg::Resize(_)
            )
    )
}

/// A connection to one supervisor. Cheap to share (`Clone`); requests from
/// many tasks run concurrently on it.
#[derive(Clone)]
pub struct SupervisorClient {
    tx: Lanes,
    routes: Routes,
    next: Arc<AtomicU32>,
    /// Set (under the routes lock) once the connection is gone: no request
    /// may wait for an answer that cannot come.
    closed: Arc<AtomicBool>,
    pub vm_id: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SupervisorClient {
    /// Connects to the supervisor of the VM in `vm_dir`.
    pub async fn connect(vm_dir: &Path) -> Result<SupervisorClient, ClientError> {
        let stream = super::connect_in_dir(vm_dir, files::SUPERVISOR_SOCKET)
            .await
            .map_err(ClientError::Connect)?;
        let (mut r, mut w) = stream.into_split();
        let hello = encode_frame(&Frame::new(
            0,
            ClientMsg::Hello {
                version: SUPERVISOR_PROTOCOL_VERSION,
            },
        ))
        .map_err(|_| ClientError::Unexpected)?;
        w.write_all(&hello).await.map_err(ClientError::Connect)?;
        let mut dec = Decoder::new();
        let mut buf = vec![0u8; 64 * 1024];
        let vm_id = tokio::time::timeout(HELLO_TIMEOUT, async {
            loop {
                if let Some(f) = dec
                    .next_frame::<SupervisorMsg>()
                    .map_err(|_| ClientError::Unexpected)?
                {
                    return match f.msg {
                        SupervisorMsg::Hello { vm_id, .. } => Ok(vm_id),
                        _ => Err(ClientError::Unexpected),
                    };
                }
                let n = r.read(&mut buf).await.map_err(ClientError::Connect)?;
                if n == 0 {
                    return Err(ClientError::Closed);
                }
                dec.push(&buf[..n]);
            }
        })
        .await
        .map_err(|_| ClientError::NoHello)??;

        let routes: Routes = Arc::new(Mutex::new(HashMap::new()));
        let (ctx, mut crx) = mpsc::channel::<Vec<u8>>(SEND_QUEUE);
        let (dtx, mut drx) = mpsc::channel::<Vec<u8>>(SEND_QUEUE);
        tokio::spawn(async move {
            loop {
                let b = tokio::select! {
                    biased;
                    Some(b) = crx.recv() => b,
                    Some(b) = drx.recv() => b,
                    else => return,
                };
                if w.write_all(&b).await.is_err() {
                    return;
                }
            }
        });
        let tx = Lanes {
            control: ctx,
            data: dtx,
        };
        let rroutes = routes.clone();
        let closed = Arc::new(AtomicBool::new(false));
        let rclosed = closed.clone();
        let shut = move || {
            // Dropping the senders ends every pending request; `closed`
            // (set under the same lock) keeps new ones from waiting.
            let mut routes = lock(&rroutes);
            rclosed.store(true, Ordering::SeqCst);
            for (_, slot) in routes.drain() {
                slot.input.close();
            }
        };
        let rroutes = routes.clone();
        tokio::spawn(async move {
            loop {
                loop {
                    let f = match dec.next_frame::<SupervisorMsg>() {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(_) => {
                            shut();
                            return;
                        }
                    };
                    let routes = lock(&rroutes);
                    if let Some(slot) = routes.get(&f.stream) {
                        match f.msg {
                            SupervisorMsg::Agent(GuestMsg::Credit { bytes }) => {
                                // Bounded by the semaphore's own limit.
                                let n = usize::try_from(bytes).unwrap_or(0);
                                if slot.input.available_permits() + n <= Semaphore::MAX_PERMITS {
                                    slot.input.add_permits(n);
                                }
                            }
                            msg => {
                                let _ = slot.tx.send(msg);
                            }
                        }
                    }
                }
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        shut();
                        return;
                    }
                    Ok(n) => dec.push(&buf[..n]),
                }
            }
        });
        Ok(SupervisorClient {
            tx,
            routes,
            next: Arc::new(AtomicU32::new(1)),
            closed,
            vm_id,
        })
    }

    /// True once the connection to the supervisor is gone (it exited, e.g.
    /// the VM was stopped): a new connection is needed.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn open(&self) -> (u32, mpsc::UnboundedReceiver<SupervisorMsg>, Arc<Semaphore>) {
        let (t, r) = mpsc::unbounded_channel();
        let input = Arc::new(Semaphore::new(STREAM_WINDOW as usize));
        let mut routes = lock(&self.routes);
        if self.closed.load(Ordering::SeqCst) {
            // Nobody will ever answer: the receiver sees the end at once.
            return (0, r, input);
        }
        let id = loop {
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            if id != 0 && !routes.contains_key(&id) {
                break id;
            }
        };
        routes.insert(
            id,
            Slot {
                tx: t,
                input: input.clone(),
            },
        );
        (id, r, input)
    }

    fn close(&self, stream: u32) {
        if let Some(slot) = lock(&self.routes).remove(&stream) {
            // A writer waiting for input credit learns the stream is over.
            slot.input.close();
        }
    }

    async fn send(&self, stream: u32, msg: ClientMsg) -> Result<(), ClientError> {
        if self.is_closed() {
            return Err(ClientError::Closed);
        }
        let control = lane_of(&msg);
        let b = encode_frame(&Frame::new(stream, msg))
            .map_err(|e| ClientError::Agent(e.to_string()))?;
        let tx = if control {
            &self.tx.control
        } else {
            &self.tx.data
        };
        tx.send(b).await.map_err(|_| ClientError::Closed)
    }

    /// Queues a frame without waiting (from `Drop`): when the lane is full,
    /// a task sends it as soon as there is room (a lost `Cancel` would leak
    /// the guest process).
    fn send_now(&self, stream: u32, msg: ClientMsg) {
        let control = lane_of(&msg);
        if let Ok(b) = encode_frame(&Frame::new(stream, msg)) {
            let tx = if control {
                self.tx.control.clone()
            } else {
                self.tx.data.clone()
            };
            if let Err(mpsc::error::TrySendError::Full(b)) = tx.try_send(b) {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        let _ = tx.send(b).await;
                    });
                }
            }
        }
    }

    /// Sends a lifecycle request and waits for its answer.
    pub async fn control(&self, req: ControlRequest) -> Result<ControlResponse, ClientError> {
        let (id, mut rx, _) = self.open();
        let deadline = control_deadline(&req);
        let r = tokio::time::timeout(deadline, async {
            self.send(id, ClientMsg::Control(req)).await?;
            match rx.recv().await {
                Some(SupervisorMsg::Control(c)) => Ok(c),
                Some(_) => Err(ClientError::Unexpected),
                None => Err(ClientError::Closed),
            }
        })
        .await
        .unwrap_or(Err(ClientError::Timeout(deadline)));
        self.close(id);
        r
    }

    /// Round trip to the guest agent.
    pub async fn ping(&self, nonce: u64) -> Result<(), ClientError> {
        let (id, mut rx, _) = self.open();
        let r = async {
            self.send(id, ClientMsg::Agent(HostMsg::Ping { nonce }))
                .await?;
            match rx.recv().await {
                Some(SupervisorMsg::Agent(GuestMsg::Pong { nonce: n })) if n == nonce => Ok(()),
                Some(SupervisorMsg::Agent(GuestMsg::Error(e))) => {
                    Err(ClientError::Agent(e.message))
                }
                Some(_) => Err(ClientError::Unexpected),
                None => Err(ClientError::Closed),
            }
        }
        .await;
        self.close(id);
        r
    }

    /// Opens a stream with `first` as its request.
    pub async fn open_stream(&self, first: HostMsg) -> Result<AgentStream, ClientError> {
        let (id, rx, input) = self.open();
        if let Err(e) = self.send(id, ClientMsg::Agent(first)).await {
            self.close(id);
            return Err(e);
        }
        Ok(AgentStream {
            client: self.clone(),
            stream: id,
            rx,
            input,
            done: false,
            ungranted: 0,
        })
    }

    /// Starts a process in the guest; its output and exit arrive on the
    /// returned stream.
    pub async fn exec(&self, req: ExecRequest) -> Result<ExecStream, ClientError> {
        self.exec_like(HostMsg::Exec(req)).await
    }

    /// A stream of exec events opened by `first` (an `Exec` or `Attach`).
    pub async fn exec_like(&self, first: HostMsg) -> Result<ExecStream, ClientError> {
        let inner = self.open_stream(first).await?;
        Ok(ExecStream {
            inner,
            deadline: None,
            last_frame: tokio::time::Instant::now(),
        })
    }
}

/// One request's stream through the supervisor, with its flow control:
/// output is credited back as the caller takes it, input waits for the
/// agent's credit. Dropped before its end, it cancels the request.
pub struct AgentStream {
    client: SupervisorClient,
    stream: u32,
    rx: mpsc::UnboundedReceiver<SupervisorMsg>,
    input: Arc<Semaphore>,
    done: bool,
    /// Data taken by the caller and not yet credited back.
    ungranted: u64,
}

impl AgentStream {
    /// The next message; `Err(Closed)` when the connection ended first.
    /// Taking a data message credits it back (in batches).
    pub async fn recv(&mut self) -> Result<GuestMsg, ClientError> {
        if self.done {
            return Err(ClientError::Closed);
        }
        let msg = match self.rx.recv().await {
            None => {
                self.done = true;
                return Err(ClientError::Closed);
            }
            Some(SupervisorMsg::Agent(m)) => m,
            Some(_) => return Err(ClientError::Unexpected),
        };
        if msg.is_terminal() {
            self.done = true;
            self.client.close(self.stream);
            return Ok(msg);
        }
        let cost = msg.credit_cost();
        if cost > 0 {
            self.ungranted += cost;
            // A batch, or all of it once nothing more is queued: the agent
            // is then waiting on us, or about to.
            if self.ungranted >= GRANT_BATCH || self.rx.is_empty() {
                let bytes = u32::try_from(self.ungranted).unwrap_or(u32::MAX);
                self.ungranted -= u64::from(bytes);
                // Queued without waiting: `recv` stays cancel-safe (a
                // caller's `select!` that drops it loses neither the
                // message taken nor its credit).
                self.client
                    .send_now(self.stream, ClientMsg::Agent(HostMsg::Credit { bytes }));
            }
        }
        Ok(msg)
    }

    /// A handle that writes this stream's input (usable while another task
    /// reads the stream).
    pub fn writer(&self) -> StreamWriter {
        StreamWriter {
            client: self.client.clone(),
            stream: self.stream,
            input: self.input.clone(),
        }
    }

    /// True once the stream's last message was taken.
    pub fn is_done(&self) -> bool {
        self.done
    }
}

impl Drop for AgentStream {
    fn drop(&mut self) {
        if !self.done {
            // Abandoned mid-request: the agent ends it (kills the process,
            // drops the transfer) rather than leak it.
            self.client
                .send_now(self.stream, ClientMsg::Agent(HostMsg::Cancel));
            self.client.close(self.stream);
        }
    }
}

/// Writes a stream's input within the agent's credit. Cheap to clone.
#[derive(Clone)]
pub struct StreamWriter {
    client: SupervisorClient,
    stream: u32,
    input: Arc<Semaphore>,
}

impl StreamWriter {
    /// Sends `data`, waiting for credit as the guest takes it.
    pub async fn write(&self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(smolvm_proto::MAX_CHUNK_LEN) {
            let n = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
            // The semaphore is only closed with the connection.
            self.input
                .acquire_many(n)
                .await
                .map_err(|_| ClientError::Closed)?
                .forget();
            self.client
                .send(
                    self.stream,
                    ClientMsg::Agent(HostMsg::Data(Bytes(chunk.to_vec()))),
                )
                .await?;
        }
        Ok(())
    }

    /// Ends the input (closes a process's stdin, commits a file).
    pub async fn close(&self) -> Result<(), ClientError> {
        self.client
            .send(self.stream, ClientMsg::Agent(HostMsg::Eof))
            .await
    }

    /// Signals the stream's process group.
    pub async fn signal(&self, signal: i32) -> Result<(), ClientError> {
        self.client
            .send(self.stream, ClientMsg::Agent(HostMsg::Signal { signal }))
            .await
    }

    /// Resizes the terminal of a `pty` process.
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.client
            .send(
                self.stream,
                ClientMsg::Agent(HostMsg::Resize(smolvm_proto::PtySize { rows, cols })),
            )
            .await
    }

    /// Ends the stream from any task: the guest kills the process (or
    /// drops the transfer, or detaches an attach), and the reader of the
    /// stream sees it closed at once.
    pub fn cancel(&self) {
        self.client
            .send_now(self.stream, ClientMsg::Agent(HostMsg::Cancel));
        self.client.close(self.stream);
    }
}

/// One event of a running process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Started {
        pid: u32,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exited(crate::sandbox::ExitStatus),
    /// The request failed; no `Exited` follows.
    Failed(crate::sandbox::GuestError),
    /// (Re-)attached to a background process: its output from `offset`
    /// follows; `dropped` bytes before it were no longer buffered. Also
    /// mid-stream, when this reader fell behind the buffer.
    Attached {
        offset: u64,
        dropped: u64,
    },
}

/// A process running in the guest.
pub struct ExecStream {
    inner: AgentStream,
    /// Host-side deadline: (when, how long after the start).
    deadline: Option<(tokio::time::Instant, Duration)>,
    /// When the last frame arrived (output past the deadline extends it a
    /// little: a command killed at its timeout may still be draining).
    last_frame: tokio::time::Instant,
}

/// The most a command's output may extend its host deadline.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

impl ExecStream {
    /// Gives up on the guest (`ClientError::GuestTimeout`, and the
    /// process is cancelled) when it has not ended `after` from now:
    /// the guest enforces a command's timeout, this holds when the guest
    /// cannot.
    pub fn set_host_deadline(&mut self, after: Duration) {
        self.deadline = Some((tokio::time::Instant::now() + after, after));
    }

    /// The next event; `None` after `Exited`/`Failed`.
    pub async fn next(&mut self) -> Result<Option<ExecEvent>, ClientError> {
        if self.inner.is_done() {
            return Ok(None);
        }
        let next = match self.deadline {
            None => self.inner.recv().await,
            Some((at, after)) => {
                // Past the deadline, output still arriving keeps the stream
                // alive for a grace period after each frame (up to a limit):
                // only a guest that went quiet is given up on.
                let idle = (self.last_frame + GUEST_GRACE).min(at + DRAIN_LIMIT);
                match tokio::time::timeout_at(at.max(idle), self.inner.recv()).await {
                    Ok(m) => m,
                    // The drop cancels the process, in case the guest wakes up.
                    Err(_) => return Err(ClientError::GuestTimeout(after)),
                }
            }
        };
        self.last_frame = tokio::time::Instant::now();
        let ev = match next? {
            GuestMsg::Started { pid } => ExecEvent::Started { pid },
            GuestMsg::Stdout(Bytes(b)) => ExecEvent::Stdout(b),
            GuestMsg::Stderr(Bytes(b)) => ExecEvent::Stderr(b),
            GuestMsg::Exited(s) => ExecEvent::Exited(s.into()),
            // Received errors skipped `ErrorInfo::new`: the conversion
            // bounds them.
            GuestMsg::Error(e) => ExecEvent::Failed(e.into()),
            GuestMsg::Attached { offset, dropped } => ExecEvent::Attached { offset, dropped },
            _ => return Err(ClientError::Unexpected),
        };
        Ok(Some(ev))
    }

    /// A handle for the process's stdin and signals (the request must have
    /// `stdin: true` for its input to be read).
    pub fn stdin(&self) -> StreamWriter {
        self.inner.writer()
    }

    /// Sends bytes to the process's stdin, within the guest's credit.
    pub async fn write_stdin(&self, data: &[u8]) -> Result<(), ClientError> {
        self.inner.writer().write(data).await
    }

    pub async fn close_stdin(&self) -> Result<(), ClientError> {
        self.inner.writer().close().await
    }

    /// Signals the process group.
    pub async fn signal(&self, signal: i32) -> Result<(), ClientError> {
        self.inner.writer().signal(signal).await
    }

    /// Resizes the process's terminal (a `pty` exec).
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.inner.writer().resize(rows, cols).await
    }
}
