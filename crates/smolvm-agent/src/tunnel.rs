//! Tunnels: a `Connect` stream is one TCP connection from the agent to a
//! service on the guest's loopback (`127.0.0.1:port`), the guest end of a
//! host port forward or of SSH. See docs/protocol.md "Tunnels".
//!
//! Two workers per tunnel: the reader sends the service's bytes as
//! `Data` within the host's credit (a host that does not drain stalls only
//! this connection: the service blocks on its socket) and `Eof` when the
//! service ends its side; the writer passes the host's `Data` on (credited
//! back as the socket takes it) and half-closes on the host's `Eof`. Each
//! direction ends on its own; whichever worker finishes last sends `Done`.
//! A `Cancel` resets the connection and nothing more is sent.

use crate::streams::{Credit, InMsg, InputRx, Slot, Streams};
use crate::writer::Outbox;
use smolvm_proto::{Bytes, ErrorInfo, ErrorKind, GuestMsg, MAX_CHUNK_LEN};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a connect to the guest service may take (loopback: refused or
/// accepted at once, unless its backlog is full).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the two workers share: bytes moved, and who finished.
struct End {
    state: Mutex<EndState>,
}

struct EndState {
    /// Halves still running (2, then 1, then 0: the last sends `Done`).
    running: u8,
    bytes: u64,
    /// The first failure: sent instead of `Done`.
    error: Option<ErrorInfo>,
    /// Cancelled by the host: nothing more is sent.
    cancelled: bool,
}

impl End {
    /// One half finished; the last one ends the stream.
    fn finish(&self, streams: &Streams, slot: Slot, out: &Outbox, bytes: u64) {
        let msg = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.bytes += bytes;
            s.running -= 1;
            if s.running > 0 {
                return;
            }
            if s.cancelled {
                None
            } else {
                Some(match s.error.take() {
                    Some(e) => GuestMsg::Error(e),
                    None => GuestMsg::Done { bytes: s.bytes },
                })
            }
        };
        streams.close(slot);
        if let Some(m) = msg {
            out.send(slot.stream, m);
        }
    }

    fn fail(&self, e: ErrorInfo) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.error.get_or_insert(e);
    }

    fn failed(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .error
            .is_some()
    }

    fn cancel(&self) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cancelled = true;
    }
}

fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> io::Result<()> {
    std::thread::Builder::new()
        .name(name)
        .stack_size(128 * 1024)
        .spawn(f)
        .map(drop)
}

/// Starts a `Connect` on `stream`: the connect runs on its own thread (the
/// reader loop never waits for it), then the two workers.
pub fn connect(
    streams: &Arc<Streams>,
    stream: u32,
    port: u16,
    out: &Outbox,
) -> Result<(), ErrorInfo> {
    if port == 0 {
        return Err(ErrorInfo::new(
            ErrorKind::InvalidRequest,
            "port 0 is not a service port",
        ));
    }
    let (slot, credit, input) = streams.open(stream, true, true, out)?;
    let (Some(credit), Some(input)) = (credit, input) else {
        streams.close(slot);
        return Err(ErrorInfo::new(
            ErrorKind::Other,
            "no flow control for the stream",
        ));
    };
    let (st, out) = (Arc::clone(streams), out.clone());
    let r = spawn(format!("tunnel-{stream}"), move || {
        run(&st, slot, port, &credit, input, &out);
    });
    r.map_err(|e| {
        streams.close(slot);
        ErrorInfo::new(ErrorKind::Busy, format!("cannot start a thread: {e}"))
    })
}

fn connect_error(port: u16, e: &io::Error) -> ErrorInfo {
    let (kind, why) = match e.kind() {
        io::ErrorKind::ConnectionRefused => (
            ErrorKind::Unavailable,
            "connection refused: nothing listens there".to_string(),
        ),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => (
            ErrorKind::Unavailable,
            format!(
                "no answer within {}s (its backlog is full?)",
                CONNECT_TIMEOUT.as_secs()
            ),
        ),
        _ => (ErrorKind::Other, e.to_string()),
    };
    ErrorInfo::new(kind, format!("guest 127.0.0.1:{port}: {why}"))
}

/// The tunnel's first worker: connects, answers, then reads the service
/// while a second worker writes to it.
fn run(
    streams: &Arc<Streams>,
    slot: Slot,
    port: u16,
    credit: &Arc<Credit>,
    input: InputRx,
    out: &Outbox,
) {
    let stream = slot.stream;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let sock = match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Ok(s) => s,
        Err(e) => {
            streams.close(slot);
            if !credit.is_cancelled() {
                out.send(stream, GuestMsg::Error(connect_error(port, &e)));
            }
            return;
        }
    };
    let _ = sock.set_nodelay(true);
    if !credit.send(out, stream, GuestMsg::Connected) {
        streams.close(slot);
        return; // cancelled while connecting: the drop closes the socket
    }
    let end = Arc::new(End {
        state: Mutex::new(EndState {
            running: 2,
            bytes: 0,
            error: None,
            cancelled: false,
        }),
    });
    let wsock = match sock.try_clone() {
        Ok(s) => s,
        Err(e) => {
            streams.close(slot);
            out.send(
                stream,
                GuestMsg::Error(ErrorInfo::new(ErrorKind::Other, format!("socket: {e}"))),
            );
            return;
        }
    };
    let (st2, out2, end2, credit2) = (
        Arc::clone(streams),
        out.clone(),
        Arc::clone(&end),
        Arc::clone(credit),
    );
    let r = spawn(format!("tunnel-w-{stream}"), move || {
        let n = write_half(wsock, input, &end2, &credit2);
        end2.finish(&st2, slot, &out2, n);
    });
    if let Err(e) = r {
        let _ = sock.shutdown(Shutdown::Both);
        end.fail(ErrorInfo::new(
            ErrorKind::Busy,
            format!("cannot start a thread: {e}"),
        ));
        // The writer never ran: its half ends here.
        end.finish(streams, slot, out, 0);
    }
    let n = read_half(&sock, credit, stream, out, &end);
    if end.failed() {
        // Wake the writer, which may wait for input that never comes.
        streams.drop_input(slot);
    }
    end.finish(streams, slot, out, n);
}

/// Service → host: `Data` within credit, then `Eof`. Returns the bytes.
fn read_half(sock: &TcpStream, credit: &Credit, stream: u32, out: &Outbox, end: &End) -> u64 {
    let mut buf = vec![0u8; MAX_CHUNK_LEN];
    let mut total = 0u64;
    loop {
        // Credit first: a host that does not drain leaves the service
        // blocked on its socket, not us buffering.
        if !credit.wait() {
            end.cancel();
            let _ = sock.shutdown(Shutdown::Both);
            return total;
        }
        let want = credit.take(buf.len());
        let mut r = sock;
        match r.read(&mut buf[..want]) {
            Ok(0) => {
                credit.untake(want);
                // The service ended its side; the host may still send.
                if !credit.send(out, stream, GuestMsg::Eof) {
                    end.cancel();
                }
                return total;
            }
            Ok(n) => {
                credit.untake(want - n);
                total += n as u64;
                out.send(stream, GuestMsg::Data(Bytes(buf[..n].to_vec())));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => credit.untake(want),
            Err(e) => {
                credit.untake(want);
                if credit.is_cancelled() {
                    end.cancel();
                } else {
                    end.fail(ErrorInfo::new(
                        ErrorKind::Other,
                        format!("the guest service's connection failed: {e}"),
                    ));
                }
                let _ = sock.shutdown(Shutdown::Both);
                return total;
            }
        }
    }
}

/// Host → service: writes the host's `Data`, half-closes at `Eof`, resets
/// at `Cancel`. Returns the bytes written.
fn write_half(mut sock: TcpStream, mut input: InputRx, end: &End, credit: &Credit) -> u64 {
    let mut total = 0u64;
    loop {
        match input.recv() {
            Some(InMsg::Data(Bytes(b))) => {
                if let Err(e) = sock.write_all(&b) {
                    end.fail(ErrorInfo::new(
                        ErrorKind::Other,
                        format!("writing to the guest service failed: {e}"),
                    ));
                    let _ = sock.shutdown(Shutdown::Both);
                    // The reader sees the shutdown and ends too.
                    return total;
                }
                total += b.len() as u64;
                input.consumed(b.len());
            }
            Some(InMsg::Eof) => {
                let _ = sock.shutdown(Shutdown::Write);
                return total;
            }
            Some(InMsg::Cancel) => {
                // Reset, so the service sees the connection end at once.
                end.cancel();
                credit.cancel();
                reset(&sock);
                return total;
            }
            None => {
                // The reader failed and dropped the input (its error ends
                // the stream).
                reset(&sock);
                return total;
            }
            Some(InMsg::Violation) => {
                end.fail(ErrorInfo::new(
                    ErrorKind::FlowControl,
                    "the host sent past its credit",
                ));
                reset(&sock);
                return total;
            }
        }
    }
}

/// Closes with an RST (SO_LINGER 0) rather than a FIN.
fn reset(sock: &TcpStream) {
    use std::os::fd::AsRawFd as _;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a valid fd and a linger struct of its size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const l).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::linger>()).unwrap_or(8),
        );
    }
    let _ = sock.shutdown(Shutdown::Both);
}
