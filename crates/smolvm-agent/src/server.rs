//! Serving the protocol: the reader loop (this thread) decodes host frames
//! and dispatches them; the writer thread (`writer`) sends every reply.

use crate::log::RateLimit;
use crate::procs::Procs;
use crate::streams::Streams;
use crate::sys::boottime_ms;
use crate::writer::{self, OnWriteError, Outbox};
use smolvm_proto::{
    decode_payload, Decoder, ErrorInfo, ErrorKind, Frame, GuestHello, GuestMsg, HostMsg, Identity,
    OpRequest, CONTROL_STREAM, MAX_CHUNK_LEN, PROTOCOL_VERSION,
};
use std::fs::File;
use std::io::{self, Read};
use std::sync::Arc;
use std::time::Duration;

/// Where the agent runs, which decides what a lost host and `Shutdown` mean.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 in the guest, on the virtio-serial port: the host may come and
    /// go; `Shutdown` ends the machine.
    Guest,
    /// A host-side test process on stdin/stdout: EOF or `Shutdown` exits.
    Stdio,
}

/// While no host is connected a virtio port reads 0 bytes at once, forever.
const DISCONNECTED_BACKOFF: Duration = Duration::from_millis(25);

struct Server {
    mode: Mode,
    out: Outbox,
    streams: Arc<Streams>,
    procs: Arc<Procs>,
    start_ms: u64,
    ready_ms: u64,
}

/// Serves the protocol on `input`/`output` until the end. Never returns.
pub fn serve(input: File, output: File, mode: Mode, start_ms: u64) -> ! {
    let on_error = match mode {
        Mode::Guest => OnWriteError::Drop,
        Mode::Stdio => OnWriteError::Exit,
    };
    let out = match writer::start(output, on_error) {
        Ok(out) => out,
        Err(e) => fatal(mode, &format!("cannot start the writer thread: {e}")),
    };
    let server = Server {
        mode,
        out,
        streams: Arc::new(Streams::default()),
        procs: Arc::new(Procs::default()),
        start_ms,
        ready_ms: boottime_ms(),
    };
    info!(
        "serving protocol v{PROTOCOL_VERSION} (ready at {} ms)",
        server.ready_ms
    );
    server.read_loop(input)
}

/// Gives up: as PID 1 that means ending the machine, never exiting.
pub fn fatal(mode: Mode, msg: &str) -> ! {
    error!("fatal: {msg}");
    match mode {
        Mode::Guest => crate::shutdown::power_off(msg),
        Mode::Stdio => std::process::exit(1),
    }
}

impl Server {
    fn read_loop(&self, mut input: File) -> ! {
        let mut dec = Decoder::new();
        let mut buf = vec![0u8; 2 * MAX_CHUNK_LEN];
        let mut read_errors = RateLimit::new(Duration::from_secs(5));
        loop {
            match input.read(&mut buf) {
                Ok(0) => {
                    if self.mode == Mode::Stdio {
                        info!("host closed the channel; exiting");
                        self.exit_stdio();
                    }
                    // No host: what we hold of a frame is from a host that left.
                    dec.reset();
                    std::thread::sleep(DISCONNECTED_BACKOFF);
                }
                Ok(n) => {
                    dec.push(&buf[..n]);
                    self.drain_frames(&mut dec);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if self.mode == Mode::Stdio {
                        fatal(self.mode, &format!("read from host: {e}"));
                    }
                    if let Some(n) = read_errors.allow() {
                        error!("read from host: {e} ({n} more failures not shown)");
                    }
                    dec.reset();
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn drain_frames(&self, dec: &mut Decoder) {
        loop {
            match dec.next_payload() {
                Ok(Some(payload)) => match decode_payload::<HostMsg>(&payload) {
                    Ok(frame) => self.dispatch(frame),
                    // The framing is intact: skip just this frame.
                    Err(e) => error!("ignoring a frame from the host: {e}"),
                },
                Ok(None) => return,
                Err(e) => {
                    // A header announcing an oversized frame: we lost sync
                    // with the host's framing. Drop what we hold and start
                    // over with the next bytes that arrive.
                    error!("{e}; discarding buffered input");
                    dec.reset();
                    return;
                }
            }
        }
    }

    fn dispatch(&self, frame: Frame<HostMsg>) {
        let stream = frame.stream;
        match frame.msg {
            HostMsg::Hello(h) => {
                if !self.on_control_stream(stream, "Hello") {
                    return;
                }
                // A host that skipped `Reinit` (or an older one).
                if self.out.thaw() {
                    info!("a hello ended the quiesce");
                }
                if h.version != PROTOCOL_VERSION {
                    error!(
                        "host speaks protocol v{}, agent v{PROTOCOL_VERSION}",
                        h.version
                    );
                } else {
                    info!("host hello (protocol v{})", h.version);
                }
                self.out.send_control(
                    CONTROL_STREAM,
                    GuestMsg::Hello(GuestHello {
                        version: PROTOCOL_VERSION,
                        agent_version: env!("CARGO_PKG_VERSION").to_string(),
                        agent_start_ms: self.start_ms,
                        ready_ms: self.ready_ms,
                        now_ms: boottime_ms(),
                    }),
                );
            }
            HostMsg::Ping { nonce } => self.out.send_control(stream, GuestMsg::Pong { nonce }),
            HostMsg::Exec(req) => {
                if self.opens_stream(stream) {
                    if let Err(e) = crate::exec::start(&self.streams, stream, &req, &self.out) {
                        self.out.send(stream, GuestMsg::Error(e));
                    }
                }
            }
            HostMsg::ReadFile(req) => {
                if self.opens_stream(stream) {
                    if let Err(e) = crate::files::read_file(&self.streams, stream, req, &self.out) {
                        self.out.send(stream, GuestMsg::Error(e));
                    }
                }
            }
            HostMsg::WriteFile(req) => {
                if self.opens_stream(stream) {
                    if let Err(e) = crate::files::write_file(&self.streams, stream, req, &self.out)
                    {
                        self.out.send(stream, GuestMsg::Error(e));
                    }
                }
            }
            HostMsg::Op(
                req @ (OpRequest::Procs
                | OpRequest::ProcSignal { .. }
                | OpRequest::ProcStdin { .. }
                | OpRequest::ProcForget { .. }
                | OpRequest::SshStart { .. }),
            ) => {
                if self.opens_stream(stream) {
                    // A stream slot (bounded like every request) and its own
                    // thread: a stdin write may wait for the process.
                    let slot = match self.streams.open(stream, false, false, &self.out) {
                        Ok((slot, _, _)) => slot,
                        Err(e) => return self.out.send_control(stream, GuestMsg::Error(e)),
                    };
                    let (procs, out, st) =
                        (self.procs.clone(), self.out.clone(), self.streams.clone());
                    let r = std::thread::Builder::new()
                        .name(format!("procop-{stream}"))
                        .stack_size(128 * 1024)
                        .spawn(move || {
                            let r = match req {
                                OpRequest::SshStart {
                                    authorized_key,
                                    new_host_key,
                                } => crate::ssh::start(&procs, &authorized_key, new_host_key),
                                req => procs.op(req),
                            };
                            let msg = match r {
                                Ok(r) => GuestMsg::Op(r),
                                Err(e) => GuestMsg::Error(e),
                            };
                            st.close(slot);
                            out.send_control(stream, msg);
                        });
                    if let Err(e) = r {
                        self.streams.close(slot);
                        self.error(
                            stream,
                            ErrorKind::Busy,
                            &format!("cannot start a thread: {e}"),
                        );
                    }
                }
            }
            HostMsg::Spawn(req) => {
                if self.opens_stream(stream) {
                    let msg = match self.procs.spawn(&req) {
                        Ok((handle, pid)) => GuestMsg::Spawned { handle, pid },
                        Err(e) => GuestMsg::Error(e),
                    };
                    self.out.send_control(stream, msg);
                }
            }
            HostMsg::Attach(req) => {
                if self.opens_stream(stream) {
                    if let Err(e) = self.procs.attach(&self.streams, stream, &req, &self.out) {
                        self.out.send(stream, GuestMsg::Error(e));
                    }
                }
            }
            HostMsg::Op(req) => {
                if self.opens_stream(stream) {
                    if let Err(e) = crate::files::op(&self.streams, stream, req, &self.out) {
                        self.out.send_control(stream, GuestMsg::Error(e));
                    }
                }
            }
            HostMsg::Connect { port } => {
                if self.opens_stream(stream) {
                    if let Err(e) = crate::tunnel::connect(&self.streams, stream, port, &self.out) {
                        self.out.send(stream, GuestMsg::Error(e));
                    }
                }
            }
            HostMsg::Data(data) => self.streams.data(stream, data),
            HostMsg::Eof => self.streams.eof(stream),
            HostMsg::Credit { bytes } => self.streams.credit(stream, bytes),
            HostMsg::Cancel => self.streams.cancel(stream),
            HostMsg::Resize(size) => self.streams.resize(stream, size),
            HostMsg::Signal { signal } => crate::exec::signal(&self.streams, stream, signal),
            HostMsg::Shutdown => self.shutdown(stream),
            HostMsg::Quiesce { nonce } => {
                if self.on_control_stream(stream, "Quiesce") {
                    info!("quiesce: the writer stops after Quiesced");
                    self.out.quiesce(nonce);
                }
            }
            HostMsg::Thaw => {
                if self.on_control_stream(stream, "Thaw") && self.out.thaw() {
                    info!("thawed");
                }
            }
            HostMsg::Reinit(id) => {
                if self.on_control_stream(stream, "Reinit") {
                    self.reinit(&id);
                }
            }
        }
    }

    /// Messages about the connection itself belong on stream 0; elsewhere
    /// they get an error on their stream.
    fn on_control_stream(&self, stream: u32, what: &str) -> bool {
        if stream != CONTROL_STREAM {
            self.error(
                stream,
                ErrorKind::InvalidRequest,
                &format!("{what} belongs on stream 0"),
            );
            return false;
        }
        true
    }

    /// `Reinit`, synchronously (a `Hello` right after it is answered only
    /// once it took effect): forget the previous connection's streams and
    /// their queued frames, become `id`, answer `Reinited`, end a quiesce.
    fn reinit(&self, id: &Identity) {
        let streams = self.streams.cancel_all();
        let frames = self.out.new_connection();
        info!(
            "reinit as {:?}: cancelled {streams} streams of the previous connection, dropped {frames} of their queued frames",
            id.hostname
        );
        let done = crate::identity::apply(id);
        info!(
            "reinit: hostname {}, entropy {}, clock {}",
            if done.hostname_set { "set" } else { "NOT set" },
            if done.reseeded {
                "mixed in"
            } else {
                "NOT mixed in"
            },
            if done.clock_set { "set" } else { "NOT set" },
        );
        self.out.send_control(
            CONTROL_STREAM,
            GuestMsg::Reinited {
                clock_set: done.clock_set,
                reseeded: done.reseeded,
            },
        );
        if self.out.thaw() {
            info!("the reinit ended the quiesce");
        }
    }

    /// Requests open their own non-zero stream.
    fn opens_stream(&self, stream: u32) -> bool {
        if stream == CONTROL_STREAM {
            self.error(
                stream,
                ErrorKind::InvalidRequest,
                "requests need a non-zero stream id",
            );
            return false;
        }
        true
    }

    fn error(&self, stream: u32, kind: ErrorKind, msg: &str) {
        self.out
            .send_control(stream, GuestMsg::Error(ErrorInfo::new(kind, msg)));
    }

    fn shutdown(&self, stream: u32) -> ! {
        self.out.send_control(stream, GuestMsg::ShutdownAck);
        if !self.out.flush(Duration::from_secs(2)) {
            error!("could not flush the shutdown acknowledgement");
        }
        match self.mode {
            Mode::Guest => crate::shutdown::power_off("the host asked"),
            Mode::Stdio => self.exit_stdio(),
        }
    }

    /// Stdio mode ends: leave no process of ours behind.
    fn exit_stdio(&self) -> ! {
        self.streams.kill_all();
        self.procs.kill_all();
        std::process::exit(0)
    }
}
