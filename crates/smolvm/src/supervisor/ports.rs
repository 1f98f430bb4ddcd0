//! Host port forwards, owned by the supervisor for the VM's run: a TCP
//! listener per forward; each accepted connection becomes one tunnel to
//! the guest's loopback over the agent channel (no guest NIC involved, so
//! forwards work with the network off and reach services bound to the
//! guest's 127.0.0.1). They live as long as this run: pause/resume keeps
//! them, a stop ends them; a snapshot records them and a restore opens
//! them again (docs/network.md "Port forwards").

use super::client::SupervisorClient;
use super::server::{lock as lock_shared, SharedRef};
use crate::backend::VmDir;
use smolvm_proto::supervisor::PortForward;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Semaphore};

/// Most forwards per VM.
pub const MAX_FORWARDS: usize = 64;
/// Most tunnel connections open at once per VM (the agent holds at most
/// 256 streams for everything), and per forward: a forward on 127.0.0.1
/// takes connections from every local user, and one of them holding all of
/// a forward's slots must leave the VM's other forwards (SSH) working.
const MAX_CONNECTIONS: usize = 128;
const MAX_PER_FORWARD: usize = 32;
/// Failed connections logged per forward, then one in this many.
const LOG_FIRST: u64 = 10;
const LOG_EVERY: u64 = 1000;
/// How long a connection accepted before the guest is ready waits for it.
const READY_WAIT: Duration = Duration::from_secs(120);

struct Entry {
    fwd: PortForward,
    task: tokio::task::JoinHandle<()>,
}

/// The VM's forwards.
pub struct Ports {
    vm_dir: VmDir,
    entries: Mutex<Vec<Entry>>,
    /// One connection to our own socket, shared by every tunnel.
    client: tokio::sync::Mutex<Option<SupervisorClient>>,
    conns: Arc<Semaphore>,
    shared: SharedRef,
    ready: watch::Receiver<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Binds `fwd`'s host address and port (0: a free one); the listener is
/// non-blocking for tokio.
pub fn bind(fwd: &PortForward) -> Result<std::net::TcpListener, String> {
    let addr = SocketAddr::new(fwd.host_addr, fwd.host_port);
    let l = std::net::TcpListener::bind(addr).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::AddrInUse => format!(
                "host port {} is in use; pick another (or leave the host port out for a free one)",
                fwd.host_port
            ),
            std::io::ErrorKind::AddrNotAvailable => {
                format!("{} is not an address of this host", fwd.host_addr)
            }
            std::io::ErrorKind::PermissionDenied => format!(
                "host port {} is privileged (below 1024); use a port of 1024 or more",
                fwd.host_port
            ),
            _ => format!("cannot listen on {addr}: {e}"),
        };
        why
    })?;
    l.set_nonblocking(true)
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    Ok(l)
}

impl Ports {
    /// `ready` changes as the guest's readiness does (`shared.ready`).
    pub(super) fn new(vm_dir: VmDir, shared: SharedRef, ready: watch::Receiver<()>) -> Arc<Ports> {
        Arc::new(Ports {
            vm_dir,
            entries: Mutex::new(Vec::new()),
            client: tokio::sync::Mutex::new(None),
            conns: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            shared,
            ready,
        })
    }

    /// Waits until the guest agent is ready (connections accepted during
    /// the boot wait for it).
    async fn wait_ready(&self) -> Result<(), String> {
        let mut rx = self.ready.clone();
        let deadline = tokio::time::Instant::now() + READY_WAIT;
        loop {
            {
                let s = lock_shared(&self.shared);
                if s.ready.is_some() {
                    return Ok(());
                }
                if let Some(f) = &s.fatal {
                    return Err(f.message.clone());
                }
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err("the guest did not get ready".into()),
            }
        }
    }

    pub fn list(&self) -> Vec<PortForward> {
        lock(&self.entries).iter().map(|e| e.fwd.clone()).collect()
    }

    /// Opens a forward; returns it with the host port actually bound.
    pub fn add(self: &Arc<Self>, fwd: PortForward) -> Result<PortForward, String> {
        if fwd.guest_port == 0 {
            return Err("guest port 0 is not a service port".into());
        }
        {
            let e = lock(&self.entries);
            if e.len() >= MAX_FORWARDS {
                return Err(format!("a VM has at most {MAX_FORWARDS} port forwards"));
            }
            if fwd.host_port != 0 && e.iter().any(|x| x.fwd.host_port == fwd.host_port) {
                return Err(format!(
                    "host port {} is forwarded already (to guest port {}); remove it first",
                    fwd.host_port,
                    e.iter()
                        .find(|x| x.fwd.host_port == fwd.host_port)
                        .map_or(0, |x| x.fwd.guest_port)
                ));
            }
        }
        let std_l = bind(&fwd)?;
        self.add_bound(&fwd, std_l)
    }

    /// Opens a forward on a listener bound already (by [`bind`]).
    pub fn add_bound(
        self: &Arc<Self>,
        fwd: &PortForward,
        std_l: std::net::TcpListener,
    ) -> Result<PortForward, String> {
        let local = std_l.local_addr().map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::from_std(std_l).map_err(|e| e.to_string())?;
        let bound = PortForward {
            host_addr: fwd.host_addr,
            host_port: local.port(),
            guest_port: fwd.guest_port,
        };
        let me = self.clone();
        let guest_port = bound.guest_port;
        let task = tokio::spawn(async move { me.accept_loop(listener, guest_port).await });
        lock(&self.entries).push(Entry {
            fwd: bound.clone(),
            task,
        });
        self.save();
        log!(
            "port forward {} -> guest 127.0.0.1:{}",
            SocketAddr::new(bound.host_addr, bound.host_port),
            bound.guest_port
        );
        Ok(bound)
    }

    /// Closes the forward on `host_port` (and its open connections).
    pub fn remove(&self, host_port: u16) -> Result<PortForward, String> {
        let e = {
            let mut es = lock(&self.entries);
            let i = es
                .iter()
                .position(|e| e.fwd.host_port == host_port)
                .ok_or_else(|| format!("no port forward on host port {host_port}"))?;
            es.remove(i)
        };
        e.task.abort();
        self.save();
        log!("port forward on host port {host_port} removed");
        Ok(e.fwd)
    }

    /// Writes the forwards where a snapshot of this run finds them.
    fn save(&self) {
        let list = self.list();
        if let Ok(j) = serde_json::to_vec(&list) {
            let _ = crate::private::write_atomic(&self.vm_dir.ports(), &j);
        }
    }

    async fn accept_loop(self: Arc<Self>, listener: tokio::net::TcpListener, guest_port: u16) {
        // Connections die with the forward: a removed forward aborts this
        // task, and the set of connection tasks with it.
        let mut conns = tokio::task::JoinSet::new();
        let mine = Arc::new(Semaphore::new(MAX_PER_FORWARD));
        let failures = Arc::new(std::sync::atomic::AtomicU64::new(0));
        loop {
            let (tcp, peer) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        log!("port forward to guest {guest_port}: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            };
            // Over either limit: refused at once (the drop closes it).
            let Ok(own) = mine.clone().try_acquire_owned() else {
                continue;
            };
            let Ok(permit) = self.conns.clone().try_acquire_owned() else {
                continue;
            };
            let (me, failures) = (self.clone(), failures.clone());
            conns.spawn(async move {
                let _permits = (own, permit);
                let _ = tcp.set_nodelay(true);
                if let Err(e) = me.tunnel(tcp, guest_port).await {
                    // Bounded and escaped: the peer and the guest choose
                    // how often this happens and part of what it says.
                    let n = failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if n < LOG_FIRST || n.is_multiple_of(LOG_EVERY) {
                        log!(
                            "port forward {peer} -> guest {guest_port}: {} ({} failures so far)",
                            crate::text::escape_line(&e),
                            n + 1
                        );
                    }
                }
            });
        }
    }

    async fn client(&self) -> Result<SupervisorClient, String> {
        let mut c = self.client.lock().await;
        if let Some(c) = c.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        let n = SupervisorClient::connect(self.vm_dir.path())
            .await
            .map_err(|e| e.to_string())?;
        *c = Some(n.clone());
        Ok(n)
    }

    async fn tunnel(&self, tcp: tokio::net::TcpStream, guest_port: u16) -> Result<(), String> {
        self.wait_ready().await?;
        let client = self.client().await?;
        let s = match super::tunnel::connect(&client, guest_port).await {
            Ok(s) => s,
            Err(e) => {
                // Reset, so the peer sees a refusal rather than an EOF.
                reset_on_close(&tcp);
                return Err(e.to_string());
            }
        };
        let (r, w) = tcp.into_split();
        super::tunnel::splice(s, r, w)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

/// The forwards a snapshot's run had (`ports.json` in its VM directory).
pub fn saved(vm_dir: &VmDir) -> Vec<PortForward> {
    std::fs::read(vm_dir.ports())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Makes the socket's close an RST (SO_LINGER 0: the close does not
/// block).
fn reset_on_close(tcp: &tokio::net::TcpStream) {
    use std::os::fd::AsRawFd as _;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a linger struct of its size.
    unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::linger>()).unwrap_or(8),
        );
    }
}
