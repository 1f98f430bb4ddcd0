//! The library's connection to a VM's supervisor.

use crate::backend::files;
use smolvm_proto::supervisor::{
    ClientMsg, ControlRequest, ControlResponse, SupervisorMsg, SUPERVISOR_PROTOCOL_VERSION,
};
use smolvm_proto::{encode_frame, Bytes, Decoder, ExecRequest, Frame, GuestMsg, HostMsg};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Messages buffered per stream before the reader waits for the consumer.
const STREAM_QUEUE: usize = 256;
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

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
        _ => margin,
    }
}

type Routes = Arc<Mutex<HashMap<u32, mpsc::Sender<SupervisorMsg>>>>;

/// A connection to one supervisor. Cheap to share (`Clone`); requests from
/// many tasks run concurrently on it.
#[derive(Clone)]
pub struct SupervisorClient {
    tx: mpsc::Sender<Vec<u8>>,
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
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
        tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                if w.write_all(&b).await.is_err() {
                    break;
                }
            }
        });
        let rroutes = routes.clone();
        let closed = Arc::new(AtomicBool::new(false));
        let rclosed = closed.clone();
        let shut = move || {
            // Dropping the senders ends every pending request; `closed`
            // (set under the same lock) keeps new ones from waiting.
            let mut routes = lock(&rroutes);
            rclosed.store(true, Ordering::SeqCst);
            routes.clear();
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
                    let target = lock(&rroutes).get(&f.stream).cloned();
                    if let Some(t) = target {
                        let _ = t.send(f.msg).await;
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

    fn open(&self) -> (u32, mpsc::Receiver<SupervisorMsg>) {
        let (t, r) = mpsc::channel(STREAM_QUEUE);
        let mut routes = lock(&self.routes);
        if self.closed.load(Ordering::SeqCst) {
            // Nobody will ever answer: the receiver sees the end at once.
            return (0, r);
        }
        let id = loop {
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            if id != 0 && !routes.contains_key(&id) {
                break id;
            }
        };
        routes.insert(id, t);
        (id, r)
    }

    fn close(&self, stream: u32) {
        lock(&self.routes).remove(&stream);
    }

    async fn send(&self, stream: u32, msg: ClientMsg) -> Result<(), ClientError> {
        if self.is_closed() {
            return Err(ClientError::Closed);
        }
        let b = encode_frame(&Frame::new(stream, msg))
            .map_err(|e| ClientError::Agent(e.to_string()))?;
        self.tx.send(b).await.map_err(|_| ClientError::Closed)
    }

    /// Sends a lifecycle request and waits for its answer.
    pub async fn control(&self, req: ControlRequest) -> Result<ControlResponse, ClientError> {
        let (id, mut rx) = self.open();
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
        let (id, mut rx) = self.open();
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

    /// Starts a process in the guest; its output and exit arrive on the
    /// returned stream.
    pub async fn exec(&self, req: ExecRequest) -> Result<ExecStream, ClientError> {
        let (id, rx) = self.open();
        if let Err(e) = self.send(id, ClientMsg::Agent(HostMsg::Exec(req))).await {
            self.close(id);
            return Err(e);
        }
        Ok(ExecStream {
            client: self.clone(),
            stream: id,
            rx,
            done: false,
            deadline: None,
            last_frame: tokio::time::Instant::now(),
        })
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
}

/// A process running in the guest.
pub struct ExecStream {
    client: SupervisorClient,
    stream: u32,
    rx: mpsc::Receiver<SupervisorMsg>,
    done: bool,
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
    /// process is sent SIGKILL) when it has not ended `after` from now:
    /// the guest enforces a command's timeout, this holds when the guest
    /// cannot.
    pub fn set_host_deadline(&mut self, after: Duration) {
        self.deadline = Some((tokio::time::Instant::now() + after, after));
    }

    /// The next event; `None` after `Exited`/`Failed`.
    pub async fn next(&mut self) -> Result<Option<ExecEvent>, ClientError> {
        if self.done {
            return Ok(None);
        }
        let next = match self.deadline {
            None => self.rx.recv().await,
            Some((at, after)) => {
                // Past the deadline, output still arriving keeps the stream
                // alive for a grace period after each frame (up to a limit):
                // only a guest that went quiet is given up on.
                let idle = (self.last_frame + GUEST_GRACE).min(at + DRAIN_LIMIT);
                match tokio::time::timeout_at(at.max(idle), self.rx.recv()).await {
                    Ok(m) => m,
                    Err(_) => {
                        // Leaves `done` false: the drop sends SIGKILL, in
                        // case the guest wakes up.
                        return Err(ClientError::GuestTimeout(after));
                    }
                }
            }
        };
        self.last_frame = tokio::time::Instant::now();
        let ev = match next {
            None => {
                self.done = true;
                return Err(ClientError::Closed);
            }
            Some(SupervisorMsg::Agent(m)) => match m {
                GuestMsg::Started { pid } => ExecEvent::Started { pid },
                GuestMsg::Stdout(Bytes(b)) => ExecEvent::Stdout(b),
                GuestMsg::Stderr(Bytes(b)) => ExecEvent::Stderr(b),
                GuestMsg::Exited(s) => ExecEvent::Exited(s.into()),
                // Received errors skipped `ErrorInfo::new`: the conversion
                // bounds them.
                GuestMsg::Error(e) => ExecEvent::Failed(e.into()),
                _ => return Err(ClientError::Unexpected),
            },
            Some(_) => return Err(ClientError::Unexpected),
        };
        if matches!(ev, ExecEvent::Exited(_) | ExecEvent::Failed(_)) {
            self.done = true;
            self.client.close(self.stream);
        }
        Ok(Some(ev))
    }

    /// Sends bytes to the process's stdin (the request must have `stdin: true`).
    pub async fn write_stdin(&self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(smolvm_proto::MAX_CHUNK_LEN) {
            self.client
                .send(
                    self.stream,
                    ClientMsg::Agent(HostMsg::Stdin(Bytes(chunk.to_vec()))),
                )
                .await?;
        }
        Ok(())
    }

    pub async fn close_stdin(&self) -> Result<(), ClientError> {
        self.client
            .send(self.stream, ClientMsg::Agent(HostMsg::StdinClose))
            .await
    }

    /// Signals the process group.
    pub async fn signal(&self, signal: i32) -> Result<(), ClientError> {
        self.client
            .send(self.stream, ClientMsg::Agent(HostMsg::Signal { signal }))
            .await
    }
}

impl Drop for ExecStream {
    fn drop(&mut self) {
        if !self.done {
            // Abandoned mid-run: end the process rather than leak it.
            let b = encode_frame(&Frame::new(
                self.stream,
                ClientMsg::Agent(HostMsg::Signal {
                    signal: libc::SIGKILL,
                }),
            ));
            if let Ok(b) = b {
                let _ = self.client.tx.try_send(b);
            }
            self.client.close(self.stream);
        }
    }
}
