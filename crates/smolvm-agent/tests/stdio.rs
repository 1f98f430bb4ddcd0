//! The agent's protocol handling, end to end on the host: spawn the agent
//! binary with `--stdio` and speak the real protocol to it.

use smolvm_proto::{
    encode_frame, Bytes, Command, Decoder, ErrorInfo, ErrorKind, ExecRequest, ExitStatus, Frame, GuestMsg, HostHello,
    HostMsg, MAX_CHUNK_LEN, MAX_FRAME_LEN, PROTOCOL_VERSION,
};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Inbox {
    by_stream: HashMap<u32, Vec<GuestMsg>>,
    closed: bool,
}

struct Agent {
    child: Child,
    stdin: Option<ChildStdin>,
    inbox: Arc<(Mutex<Inbox>, Condvar)>,
}

/// Everything one exec stream carried.
#[derive(Debug, Default)]
struct Outcome {
    msgs: Vec<GuestMsg>,
    pid: Option<u32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<ExitStatus>,
    error: Option<ErrorInfo>,
}

impl Outcome {
    fn exit(&self) -> &ExitStatus {
        self.exit.as_ref().unwrap_or_else(|| panic!("no exit: {:?}", self.msgs))
    }
    fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

fn is_terminal(m: &GuestMsg) -> bool {
    matches!(m, GuestMsg::Exited(_) | GuestMsg::Error(_))
}

impl Agent {
    fn start() -> Agent {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_smolvm-agent"))
            .arg("--stdio")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn agent");
        let mut out = child.stdout.take().unwrap();
        let inbox: Arc<(Mutex<Inbox>, Condvar)> = Arc::default();
        let ib = Arc::clone(&inbox);
        std::thread::spawn(move || {
            let mut dec = Decoder::new();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = out.read(&mut buf).unwrap_or(0);
                let (lock, cond) = &*ib;
                let mut g = lock.lock().unwrap();
                if n == 0 {
                    g.closed = true;
                    cond.notify_all();
                    return;
                }
                dec.push(&buf[..n]);
                while let Some(f) = dec.next_frame::<GuestMsg>().expect("agent sent a bad frame") {
                    g.by_stream.entry(f.stream).or_default().push(f.msg);
                }
                cond.notify_all();
            }
        });
        let stdin = child.stdin.take();
        Agent { child, stdin, inbox }
    }

    fn send(&mut self, stream: u32, msg: HostMsg) {
        let bytes = encode_frame(&Frame::new(stream, msg)).unwrap();
        self.send_raw(&bytes);
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        let w = self.stdin.as_mut().expect("stdin open");
        w.write_all(bytes).unwrap();
        w.flush().unwrap();
    }

    /// Waits until `pred` holds for the stream's messages; returns them.
    fn wait_until(&self, stream: u32, timeout: Duration, pred: impl Fn(&[GuestMsg]) -> bool) -> Vec<GuestMsg> {
        let (lock, cond) = &*self.inbox;
        let deadline = Instant::now() + timeout;
        let mut g = lock.lock().unwrap();
        loop {
            let msgs = g.by_stream.get(&stream).map(Vec::as_slice).unwrap_or(&[]);
            if pred(msgs) {
                return msgs.to_vec();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out on stream {stream}; got {msgs:?}");
            assert!(!g.closed, "agent closed its output; stream {stream} got {msgs:?}");
            g = cond.wait_timeout(g, left).unwrap().0;
        }
    }

    /// Waits for the stream's Exited or Error and sorts out what came.
    fn finish(&self, stream: u32) -> Outcome {
        let msgs = self.wait_until(stream, WAIT, |m| m.iter().any(is_terminal));
        let mut o = Outcome { msgs: msgs.clone(), ..Outcome::default() };
        let last = msgs.iter().position(is_terminal).unwrap();
        assert_eq!(last, msgs.len() - 1, "frames after the terminal one: {msgs:?}");
        for (i, m) in msgs.into_iter().enumerate() {
            match m {
                GuestMsg::Started { pid } => {
                    assert_eq!(i, 0, "Started must come first");
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

    fn exec(&mut self, stream: u32, req: ExecRequest) -> Outcome {
        self.send(stream, HostMsg::Exec(req));
        self.finish(stream)
    }

    fn ping(&mut self, stream: u32, nonce: u64) {
        self.send(stream, HostMsg::Ping { nonce });
        let msgs = self.wait_until(stream, WAIT, |m| m.contains(&GuestMsg::Pong { nonce }));
        assert!(msgs.contains(&GuestMsg::Pong { nonce }));
    }

    fn closed(&self, timeout: Duration) -> bool {
        let (lock, cond) = &*self.inbox;
        let g = lock.lock().unwrap();
        let (g, _) = cond.wait_timeout_while(g, timeout, |g| !g.closed).unwrap();
        g.closed
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stdin.take();
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

fn shell(s: &str) -> ExecRequest {
    ExecRequest { command: Command::Shell(s.into()), env: vec![], workdir: None, timeout_ms: None, stdin: false }
}

fn argv(v: &[&str]) -> ExecRequest {
    ExecRequest {
        command: Command::Argv(v.iter().map(|s| s.to_string()).collect()),
        env: vec![],
        workdir: None,
        timeout_ms: None,
        stdin: false,
    }
}

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("smolvm-agent-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Deterministic pseudo-random bytes (xorshift64).
fn noise(len: usize, seed: u64) -> Vec<u8> {
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

#[test]
fn hello_reports_version_and_times() {
    let mut a = Agent::start();
    a.send(0, HostMsg::Hello(HostHello { version: PROTOCOL_VERSION }));
    let msgs = a.wait_until(0, WAIT, |m| !m.is_empty());
    let GuestMsg::Hello(h) = &msgs[0] else { panic!("expected hello, got {msgs:?}") };
    assert_eq!(h.version, PROTOCOL_VERSION);
    assert_eq!(h.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(h.agent_start_ms > 0);
    assert!(h.agent_start_ms <= h.ready_ms && h.ready_ms <= h.now_ms, "{h:?}");

    // A host of another version still gets an answer: the host decides.
    a.send(0, HostMsg::Hello(HostHello { version: 999 }));
    let msgs = a.wait_until(0, WAIT, |m| m.len() == 2);
    assert!(matches!(&msgs[1], GuestMsg::Hello(h) if h.version == PROTOCOL_VERSION));
}

#[test]
fn ping_pong_on_any_stream() {
    let mut a = Agent::start();
    a.ping(0, 1);
    a.ping(5, u64::MAX);
    a.ping(1 << 31, 42);
}

#[test]
fn exec_argv_and_shell_keep_stdout_and_stderr_apart() {
    let mut a = Agent::start();
    let o = a.exec(1, argv(&["echo", "hello", "world"]));
    assert!(o.pid.is_some());
    assert_eq!(o.stdout, b"hello world\n");
    assert!(o.stderr.is_empty());
    assert_eq!(o.exit().code, Some(0));

    let o = a.exec(2, shell("echo out; echo err >&2; echo out2"));
    assert_eq!(o.stdout, b"out\nout2\n");
    assert_eq!(o.stderr, b"err\n");
    let e = o.exit();
    assert_eq!((e.code, e.signal, e.timed_out), (Some(0), None, false));
}

#[test]
fn exit_codes_and_signals() {
    let mut a = Agent::start();
    for (stream, code) in [(1, 0), (2, 7), (3, 255)] {
        let o = a.exec(stream, shell(&format!("exit {code}")));
        assert_eq!(o.exit().code, Some(code));
        assert_eq!(o.exit().signal, None);
    }
    let o = a.exec(4, shell("kill -9 $$"));
    assert_eq!(o.exit().code, None);
    assert_eq!(o.exit().signal, Some(9));
    assert!(!o.exit().timed_out);
}

#[test]
fn signal_reaches_the_process_group() {
    let mut a = Agent::start();
    a.send(1, HostMsg::Exec(shell("sleep 300")));
    a.wait_until(1, WAIT, |m| !m.is_empty());
    a.send(1, HostMsg::Signal { signal: 15 });
    let o = a.finish(1);
    assert_eq!(o.exit().signal, Some(15));
    // A signal for a stream with no process is ignored.
    a.send(77, HostMsg::Signal { signal: 15 });
    a.ping(77, 1);
    assert_eq!(a.wait_until(77, WAIT, |_| true), vec![GuestMsg::Pong { nonce: 1 }]);
}

#[test]
fn env_and_workdir() {
    let mut a = Agent::start();
    let mut req = shell("echo \"$FOO|$LANG|$TERM|$HOME|$PATH\"; pwd");
    req.env = vec![("FOO".into(), "bar baz".into()), ("TERM".into(), "xterm".into())];
    req.workdir = Some("/usr".into());
    let o = a.exec(1, req);
    assert_eq!(
        o.stdout_str(),
        "bar baz|C.UTF-8|xterm|/root|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n/usr\n"
    );
    // The agent's own environment does not leak.
    std::env::set_var("SMOLVM_AGENT_TEST_LEAK", "1");
    let o = a.exec(2, argv(&["env"]));
    let env = o.stdout_str();
    assert!(!env.contains("CARGO"), "{env}");
    assert!(env.contains("USER=root\n") && env.contains("LOGNAME=root\n"), "{env}");
    // Default workdir is /.
    assert_eq!(a.exec(3, argv(&["pwd"])).stdout, b"/\n");
}

#[test]
fn bad_requests_get_errors() {
    let mut a = Agent::start();
    let mut req = shell("true");
    req.workdir = Some("/nonexistent-dir-xyz".into());
    let o = a.exec(1, req);
    let e = o.error.expect("error");
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert_eq!(e.message, "working directory /nonexistent-dir-xyz: No such file or directory");
    assert_eq!(o.msgs.len(), 1);

    let e = a.exec(2, argv(&["/nonexistent-program-xyz", "a"])).error.expect("error");
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(e.message.starts_with("/nonexistent-program-xyz: "), "{}", e.message);

    let e = a.exec(3, argv(&["no-such-program-xyz"])).error.expect("error");
    assert_eq!(e.kind, ErrorKind::NotFound);

    let dir = scratch("bad-requests");
    let not_exec = dir.join("not-executable");
    std::fs::write(&not_exec, "#!/bin/sh\n").unwrap();
    let e = a.exec(4, argv(&[not_exec.to_str().unwrap()])).error.expect("error");
    assert_eq!(e.kind, ErrorKind::PermissionDenied, "{e:?}");
    std::fs::remove_dir_all(dir).unwrap();

    let e = a.exec(5, argv(&[])).error.expect("error");
    assert_eq!(e.kind, ErrorKind::InvalidRequest);

    a.send(0, HostMsg::Exec(shell("true")));
    let m = a.wait_until(0, WAIT, |m| !m.is_empty());
    assert!(matches!(&m[0], GuestMsg::Error(e) if e.kind == ErrorKind::InvalidRequest));

    // The stream ids of failed requests are free again.
    assert_eq!(a.exec(6, argv(&["true"])).exit().code, Some(0));
}

#[test]
fn timeout_kills_the_whole_group() {
    let mut a = Agent::start();
    let dir = scratch("timeout");
    let pidfile = dir.join("bg.pid");
    let mut req = shell(&format!("sleep 300 & echo $! > {}; sleep 300", pidfile.display()));
    req.timeout_ms = Some(500);
    let t0 = Instant::now();
    let o = a.exec(1, req);
    let e = o.exit();
    assert!(e.timed_out, "{e:?}");
    assert_eq!(e.signal, Some(9));
    assert_eq!(e.code, None);
    assert!(e.duration_ms >= 500, "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(10));

    let bg: u32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // Gone (reaped by the agent, a subreaper) or at least a zombie.
        match std::fs::read_to_string(format!("/proc/{bg}/stat")) {
            Err(_) => break,
            Ok(s) if s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z') => break,
            Ok(s) => assert!(Instant::now() < deadline, "background sleep survived: {s}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn exit_does_not_wait_for_background_holders_of_the_pipes() {
    let mut a = Agent::start();
    let t0 = Instant::now();
    let o = a.exec(1, shell("sleep 30 & echo done"));
    assert_eq!(o.stdout, b"done\n");
    assert_eq!(o.exit().code, Some(0));
    assert!(t0.elapsed() < Duration::from_secs(5), "waited for the background child");
}

#[test]
fn ten_mib_of_output_is_byte_exact() {
    let mut a = Agent::start();
    let dir = scratch("big");
    let path = dir.join("blob");
    let data = noise(10 * 1024 * 1024, 0x5eed);
    std::fs::write(&path, &data).unwrap();
    let o = a.exec(1, argv(&["cat", path.to_str().unwrap()]));
    assert_eq!(o.exit().code, Some(0));
    assert_eq!(o.stdout.len(), data.len());
    assert!(o.stdout == data, "stdout differs from the file");
    // Through a pipeline in a shell, on stderr this time.
    let o = a.exec(2, shell(&format!("cat {} | cat >&2", path.display())));
    assert!(o.stderr == data, "stderr differs from the file");
    assert!(o.stdout.is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn non_utf8_bytes_pass_through() {
    let mut a = Agent::start();
    let o = a.exec(1, shell(r"printf '\377\376\000\200abc\n'; printf '\300\001' >&2"));
    assert_eq!(o.stdout, [0xff, 0xfe, 0x00, 0x80, b'a', b'b', b'c', b'\n']);
    assert_eq!(o.stderr, [0xc0, 0x01]);
}

#[test]
fn twenty_concurrent_execs() {
    let mut a = Agent::start();
    for i in 0..20u32 {
        a.send(100 + i, HostMsg::Exec(shell(&format!("sleep 0.2; echo out-{i}; echo err-{i} >&2; exit {i}"))));
    }
    for i in 0..20u32 {
        let o = a.finish(100 + i);
        assert_eq!(o.stdout_str(), format!("out-{i}\n"));
        assert_eq!(o.stderr, format!("err-{i}\n").into_bytes());
        assert_eq!(o.exit().code, Some(i as i32));
    }
}

#[test]
fn stdin_round_trip() {
    let mut a = Agent::start();
    let mut req = argv(&["cat"]);
    req.stdin = true;
    a.send(1, HostMsg::Exec(req));
    let data = noise(300 * 1024, 7);
    for chunk in data.chunks(MAX_CHUNK_LEN) {
        a.send(1, HostMsg::Stdin(Bytes(chunk.to_vec())));
    }
    a.send(1, HostMsg::StdinClose);
    // Late stdin after close is ignored.
    a.send(1, HostMsg::Stdin(Bytes(b"late".to_vec())));
    let o = a.finish(1);
    assert_eq!(o.exit().code, Some(0));
    assert!(o.stdout == data, "cat echoed {} bytes, sent {}", o.stdout.len(), data.len());

    // Without stdin: true, stdin is /dev/null and Stdin frames are ignored.
    a.send(2, HostMsg::Exec(argv(&["cat"])));
    a.send(2, HostMsg::Stdin(Bytes(b"ignored".to_vec())));
    let o = a.finish(2);
    assert!(o.stdout.is_empty());
    assert_eq!(o.exit().code, Some(0));

    // Stdin for a stream nobody uses is ignored.
    a.send(3, HostMsg::Stdin(Bytes(b"x".to_vec())));
    a.send(3, HostMsg::StdinClose);
    a.ping(3, 9);
}

#[test]
fn duplicate_stream_id_is_refused() {
    let mut a = Agent::start();
    let mut req = argv(&["cat"]);
    req.stdin = true;
    a.send(7, HostMsg::Exec(req));
    a.wait_until(7, WAIT, |m| matches!(m.first(), Some(GuestMsg::Started { .. })));
    a.send(7, HostMsg::Exec(argv(&["true"])));
    let msgs = a.wait_until(7, WAIT, |m| m.len() >= 2);
    assert!(matches!(&msgs[1], GuestMsg::Error(e) if e.kind == ErrorKind::InvalidRequest), "{msgs:?}");
    // The first exec is untouched.
    a.send(7, HostMsg::Stdin(Bytes(b"still here".to_vec())));
    a.send(7, HostMsg::StdinClose);
    let msgs = a.wait_until(7, WAIT, |m| m.iter().any(|m| matches!(m, GuestMsg::Exited(_))));
    let out: Vec<u8> =
        msgs.iter().filter_map(|m| if let GuestMsg::Stdout(b) = m { Some(b.0.clone()) } else { None }).flatten().collect();
    assert_eq!(out, b"still here");
    // After Exited the id can be used again.
    let msgs_before = msgs.len();
    a.send(7, HostMsg::Exec(argv(&["echo", "again"])));
    let msgs = a.wait_until(7, WAIT, |m| m.len() > msgs_before && is_terminal(m.last().unwrap()));
    assert!(matches!(msgs.last(), Some(GuestMsg::Exited(e)) if e.code == Some(0)), "{msgs:?}");
}

#[test]
fn broken_frames_do_not_kill_the_agent() {
    let mut a = Agent::start();
    // A header announcing a frame over the limit.
    a.send_raw(&((MAX_FRAME_LEN as u32) + 1).to_le_bytes());
    // The agent drops what it buffered; retry until it is back in sync.
    let mut nonce = 0;
    loop {
        nonce += 1;
        assert!(nonce < 100, "agent never answered again");
        a.send(1, HostMsg::Ping { nonce });
        let got = a.wait_until(1, Duration::from_millis(200).max(Duration::ZERO), |_| true);
        let _ = got;
        std::thread::sleep(Duration::from_millis(50));
        let (lock, _) = &*a.inbox;
        if lock.lock().unwrap().by_stream.get(&1).is_some_and(|m| m.contains(&GuestMsg::Pong { nonce })) {
            break;
        }
    }
    // A well-framed payload that is not a message: skipped, framing kept.
    let mut bad = 3u32.to_le_bytes().to_vec();
    bad.extend_from_slice(&[0xff, 0xff, 0xff]);
    let ping = encode_frame(&Frame::new(2, HostMsg::Ping { nonce: 5 })).unwrap();
    bad.extend_from_slice(&ping);
    a.send_raw(&bad);
    a.ping(2, 5);
    assert_eq!(a.exec(3, argv(&["echo", "ok"])).stdout, b"ok\n");
}

#[test]
fn hello_on_another_stream_is_an_error() {
    let mut a = Agent::start();
    a.send(4, HostMsg::Hello(HostHello { version: PROTOCOL_VERSION }));
    let m = a.wait_until(4, WAIT, |m| !m.is_empty());
    assert!(matches!(&m[0], GuestMsg::Error(e) if e.kind == ErrorKind::InvalidRequest));
}

#[test]
fn shutdown_acks_and_exits_killing_execs() {
    let mut a = Agent::start();
    let dir = scratch("shutdown");
    let pidfile = dir.join("pid");
    a.send(1, HostMsg::Exec(shell(&format!("echo $$ > {}; exec sleep 300", pidfile.display()))));
    a.wait_until(1, WAIT, |m| !m.is_empty());
    let deadline = Instant::now() + WAIT;
    while !pidfile.exists() || std::fs::read_to_string(&pidfile).unwrap().trim().is_empty() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    a.send(9, HostMsg::Shutdown);
    let m = a.wait_until(9, WAIT, |m| !m.is_empty());
    assert_eq!(m, vec![GuestMsg::ShutdownAck]);
    assert!(a.closed(Duration::from_secs(10)), "agent did not exit");
    let status = a.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let pid: u32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => break,
            Ok(s) if s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z') => break,
            Ok(s) => assert!(Instant::now() < deadline, "exec survived shutdown: {s}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn usage_without_stdio_flag() {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_smolvm-agent")).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("usage"));
}
