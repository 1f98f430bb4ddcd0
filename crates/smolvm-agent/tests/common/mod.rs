//! A protocol client for the agent's tests: frames go out through any
//! writer; a thread decodes what comes back and files it by stream.

#![allow(dead_code)] // each test crate uses a different part

use smolvm_proto::{
    encode_frame, Bytes, Command, Decoder, ErrorInfo, ExecRequest, ExitStatus, Frame, GuestMsg,
    HostMsg, MAX_CHUNK_LEN, STREAM_WINDOW,
};
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Child;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const WAIT: Duration = Duration::from_secs(30);

/// The agent binary under test: `SMOLVM_AGENT_BIN` (e.g. the static
/// release-agent build) or the one cargo built for this test run.
pub fn agent_bin() -> String {
    std::env::var("SMOLVM_AGENT_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_smolvm-agent").to_string())
}

#[derive(Default)]
struct Inbox {
    by_stream: HashMap<u32, Vec<GuestMsg>>,
    /// Input credit the agent granted us, per stream (`GuestMsg::Credit`
    /// frames are counted here, not filed with the stream's messages).
    credit_in: HashMap<u32, u64>,
    /// Streams whose output we do not credit back automatically.
    held: HashSet<u32>,
    /// Every frame in arrival order, `Credit` included.
    log: Vec<(u32, GuestMsg)>,
    closed: bool,
}

type Writer = Arc<Mutex<Option<Box<dyn Write + Send>>>>;

/// A connection to an agent (and the process behind it, waited on drop).
/// Like a consumer that takes everything at once, it hands back credit for
/// each data frame as it arrives, except on streams it was told to `hold`.
pub struct Conn {
    pub child: Child,
    writer: Writer,
    inbox: Arc<(Mutex<Inbox>, Condvar)>,
    /// Input bytes sent per stream.
    sent: HashMap<u32, u64>,
}

fn write_frame(w: &Writer, stream: u32, msg: HostMsg) {
    let bytes = encode_frame(&Frame::new(stream, msg)).unwrap();
    let mut g = w.lock().unwrap();
    if let Some(w) = g.as_mut() {
        // The agent may be gone in a test that ends it.
        let _ = w.write_all(&bytes).and_then(|()| w.flush());
    }
}

/// Everything one exec stream carried.
#[derive(Debug, Default)]
pub struct Outcome {
    pub msgs: Vec<GuestMsg>,
    pub pid: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit: Option<ExitStatus>,
    pub error: Option<ErrorInfo>,
}

impl Outcome {
    pub fn exit(&self) -> &ExitStatus {
        self.exit
            .as_ref()
            .unwrap_or_else(|| panic!("no exit: {:?}", self.msgs))
    }
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

pub fn is_terminal(m: &GuestMsg) -> bool {
    matches!(m, GuestMsg::Exited(_) | GuestMsg::Error(_))
}

impl Conn {
    pub fn new(
        child: Child,
        mut reader: impl Read + Send + 'static,
        writer: impl Write + Send + 'static,
    ) -> Conn {
        let inbox: Arc<(Mutex<Inbox>, Condvar)> = Arc::default();
        let ib = Arc::clone(&inbox);
        let writer: Writer = Arc::new(Mutex::new(Some(Box::new(writer))));
        let w = Arc::clone(&writer);
        std::thread::spawn(move || {
            let mut dec = Decoder::new();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                // EOF, or EIO from a pty master whose slave side is gone.
                let n = reader.read(&mut buf).unwrap_or(0);
                let (lock, cond) = &*ib;
                let mut g = lock.lock().unwrap();
                if n == 0 {
                    g.closed = true;
                    cond.notify_all();
                    return;
                }
                dec.push(&buf[..n]);
                let mut grants = Vec::new();
                while let Some(f) = dec
                    .next_frame::<GuestMsg>()
                    .expect("agent sent a bad frame")
                {
                    g.log.push((f.stream, f.msg.clone()));
                    if let GuestMsg::Credit { bytes } = f.msg {
                        *g.credit_in.entry(f.stream).or_default() += u64::from(bytes);
                        continue;
                    }
                    let cost = f.msg.credit_cost();
                    if cost > 0 && !g.held.contains(&f.stream) {
                        grants.push((f.stream, cost));
                    }
                    g.by_stream.entry(f.stream).or_default().push(f.msg);
                }
                cond.notify_all();
                drop(g);
                for (stream, cost) in grants {
                    let bytes = u32::try_from(cost).unwrap();
                    write_frame(&w, stream, HostMsg::Credit { bytes });
                }
            }
        });
        Conn {
            child,
            writer,
            inbox,
            sent: HashMap::new(),
        }
    }

    pub fn send(&mut self, stream: u32, msg: HostMsg) {
        let bytes = encode_frame(&Frame::new(stream, msg)).unwrap();
        self.send_raw(&bytes);
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        let mut g = self.writer.lock().unwrap();
        let w = g.as_mut().expect("writer open");
        w.write_all(bytes).unwrap();
        w.flush().unwrap();
    }

    /// Stops crediting the stream's output back (a consumer that pauses).
    pub fn hold(&self, stream: u32) {
        self.inbox.0.lock().unwrap().held.insert(stream);
    }

    /// Credits `bytes` of the stream's output by hand.
    pub fn grant(&mut self, stream: u32, bytes: u32) {
        self.send(stream, HostMsg::Credit { bytes });
    }

    /// Sends input within the agent's credit, waiting for more as needed.
    pub fn send_input(&mut self, stream: u32, data: &[u8]) {
        for chunk in data.chunks(MAX_CHUNK_LEN) {
            let sent = self.sent.get(&stream).copied().unwrap_or(0);
            let need = sent + chunk.len() as u64;
            let (lock, cond) = &*self.inbox;
            let g = lock.lock().unwrap();
            let (g, t) = cond
                .wait_timeout_while(g, WAIT, |g| {
                    u64::from(STREAM_WINDOW) + g.credit_in.get(&stream).copied().unwrap_or(0) < need
                })
                .unwrap();
            assert!(
                !t.timed_out(),
                "no input credit on stream {stream} for {WAIT:?}"
            );
            drop(g);
            self.sent.insert(stream, need);
            self.send(stream, HostMsg::Data(Bytes(chunk.to_vec())));
        }
    }

    /// Every frame received so far, in arrival order (`Credit` included).
    pub fn log(&self) -> Vec<(u32, GuestMsg)> {
        self.inbox.0.lock().unwrap().log.clone()
    }

    /// Forgets what the stream carried (as a new host connection would
    /// before it reuses the id).
    pub fn forget(&mut self, stream: u32) {
        let mut g = self.inbox.0.lock().unwrap();
        g.by_stream.remove(&stream);
        g.credit_in.remove(&stream);
        drop(g);
        self.sent.remove(&stream);
    }

    /// Input credit the agent granted so far on `stream`.
    pub fn credit_in(&self, stream: u32) -> u64 {
        let g = self.inbox.0.lock().unwrap();
        g.credit_in.get(&stream).copied().unwrap_or(0)
    }

    /// Waits until `pred` holds for the stream's messages; returns them.
    pub fn wait_until(
        &self,
        stream: u32,
        timeout: Duration,
        pred: impl Fn(&[GuestMsg]) -> bool,
    ) -> Vec<GuestMsg> {
        match self.try_wait_until(stream, timeout, pred) {
            Ok(msgs) => msgs,
            Err(msgs) => panic!("timed out on stream {stream}; got {msgs:?}"),
        }
    }

    /// Like `wait_until`, but a timeout returns what came as `Err`.
    pub fn try_wait_until(
        &self,
        stream: u32,
        timeout: Duration,
        pred: impl Fn(&[GuestMsg]) -> bool,
    ) -> Result<Vec<GuestMsg>, Vec<GuestMsg>> {
        let (lock, cond) = &*self.inbox;
        let deadline = Instant::now() + timeout;
        let mut g = lock.lock().unwrap();
        loop {
            let msgs = g.by_stream.get(&stream).map(Vec::as_slice).unwrap_or(&[]);
            if pred(msgs) {
                return Ok(msgs.to_vec());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(msgs.to_vec());
            }
            assert!(
                !g.closed,
                "agent closed its output; stream {stream} got {msgs:?}"
            );
            g = cond.wait_timeout(g, left).unwrap().0;
        }
    }

    /// Waits for the stream's Exited or Error and sorts out what came,
    /// checking the order: Started first, the terminal frame last.
    pub fn finish(&self, stream: u32) -> Outcome {
        let msgs = self.wait_until(stream, WAIT, |m| m.iter().any(is_terminal));
        let mut o = Outcome {
            msgs: msgs.clone(),
            ..Outcome::default()
        };
        let last = msgs.iter().position(is_terminal).unwrap();
        assert_eq!(
            last,
            msgs.len() - 1,
            "frames after the terminal one: {msgs:?}"
        );
        for (i, m) in msgs.into_iter().enumerate() {
            match m {
                GuestMsg::Started { pid } => {
                    assert_eq!(i, 0, "Started must come first: {:?}", o.msgs);
                    o.pid = Some(pid);
                }
                GuestMsg::Stdout(b) => {
                    assert!(b.len() <= MAX_CHUNK_LEN);
                    o.stdout.extend_from_slice(&b)
                }
                GuestMsg::Stderr(b) => {
                    assert!(b.len() <= MAX_CHUNK_LEN);
                    o.stderr.extend_from_slice(&b)
                }
                GuestMsg::Exited(e) => o.exit = Some(e),
                GuestMsg::Error(e) => o.error = Some(e),
                other => panic!("unexpected {other:?} on an exec stream"),
            }
        }
        o
    }

    pub fn exec(&mut self, stream: u32, req: ExecRequest) -> Outcome {
        self.send(stream, HostMsg::Exec(req));
        self.finish(stream)
    }

    pub fn ping(&mut self, stream: u32, nonce: u64) {
        self.send(stream, HostMsg::Ping { nonce });
        self.wait_until(stream, WAIT, |m| m.contains(&GuestMsg::Pong { nonce }));
    }

    /// Waits until the agent's side of the channel closes.
    pub fn closed(&self, timeout: Duration) -> bool {
        let (lock, cond) = &*self.inbox;
        let g = lock.lock().unwrap();
        let (g, _) = cond.wait_timeout_while(g, timeout, |g| !g.closed).unwrap();
        g.closed
    }

    /// Closes our sending side.
    pub fn close_writer(&mut self) {
        self.writer.lock().unwrap().take();
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.writer.lock().unwrap().take();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn shell(s: &str) -> ExecRequest {
    ExecRequest {
        command: Command::Shell(s.into()),
        env: vec![],
        workdir: None,
        timeout_ms: None,
        stdin: false,
        pty: None,
    }
}

pub fn argv(v: &[&str]) -> ExecRequest {
    ExecRequest {
        command: Command::Argv(v.iter().map(|s| s.to_string()).collect()),
        env: vec![],
        workdir: None,
        timeout_ms: None,
        stdin: false,
        pty: None,
    }
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("smolvm-agent-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Deterministic pseudo-random bytes (xorshift64).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// True once `pid` is gone or a zombie, polling up to `timeout`.
pub fn process_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(s)
                if s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z') =>
            {
                return true
            }
            Ok(_) if Instant::now() >= deadline => return false,
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Starts `smolvm-agent --stdio` and connects to it.
pub fn stdio_agent() -> Conn {
    let mut child = std::process::Command::new(agent_bin())
        .arg("--stdio")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("spawn agent");
    let out = child.stdout.take().unwrap();
    let inp = child.stdin.take().unwrap();
    Conn::new(child, out, inp)
}

/// Data bytes (stdout + stderr + file data) the stream carried so far.
pub fn data_bytes(msgs: &[GuestMsg]) -> u64 {
    msgs.iter().map(GuestMsg::credit_cost).sum()
}
