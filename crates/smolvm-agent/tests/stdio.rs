//! The agent's protocol handling, end to end on the host: spawn the agent
//! binary with `--stdio` and speak the real protocol to it.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use common::{argv, is_terminal, noise, process_gone, scratch, shell, Conn, WAIT};
use smolvm_proto::{
    encode_frame, Bytes, ErrorKind, Frame, GuestMsg, HostHello, HostMsg, MAX_FRAME_LEN,
    PROTOCOL_VERSION,
};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Starts `smolvm-agent --stdio` and connects to it.
fn agent() -> Conn {
    let mut child = std::process::Command::new(common::agent_bin())
        .arg("--stdio")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn agent");
    let out = child.stdout.take().unwrap();
    let inp = child.stdin.take().unwrap();
    Conn::new(child, out, inp)
}

#[test]
fn hello_reports_version_and_times() {
    let mut a = agent();
    a.send(
        0,
        HostMsg::Hello(HostHello {
            version: PROTOCOL_VERSION,
        }),
    );
    let msgs = a.wait_until(0, WAIT, |m| !m.is_empty());
    let GuestMsg::Hello(h) = &msgs[0] else {
        panic!("expected hello, got {msgs:?}")
    };
    assert_eq!(h.version, PROTOCOL_VERSION);
    assert_eq!(h.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(h.agent_start_ms > 0);
    assert!(
        h.agent_start_ms <= h.ready_ms && h.ready_ms <= h.now_ms,
        "{h:?}"
    );

    // A host of another version still gets an answer: the host decides.
    a.send(0, HostMsg::Hello(HostHello { version: 999 }));
    let msgs = a.wait_until(0, WAIT, |m| m.len() == 2);
    assert!(matches!(&msgs[1], GuestMsg::Hello(h) if h.version == PROTOCOL_VERSION));
}

#[test]
fn ping_pong_on_any_stream() {
    let mut a = agent();
    a.ping(0, 1);
    a.ping(5, u64::MAX);
    a.ping(1 << 31, 42);
}

#[test]
fn exec_argv_and_shell_keep_stdout_and_stderr_apart() {
    let mut a = agent();
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
    let mut a = agent();
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
    let mut a = agent();
    a.send(1, HostMsg::Exec(shell("sleep 300")));
    a.wait_until(1, WAIT, |m| !m.is_empty());
    a.send(1, HostMsg::Signal { signal: 15 });
    let o = a.finish(1);
    assert_eq!(o.exit().signal, Some(15));
    // A signal for a stream with no process is ignored.
    a.send(77, HostMsg::Signal { signal: 15 });
    a.ping(77, 1);
    assert_eq!(
        a.wait_until(77, WAIT, |_| true),
        vec![GuestMsg::Pong { nonce: 1 }]
    );
}

#[test]
fn env_and_workdir() {
    let mut a = agent();
    let mut req = shell("echo \"$FOO|$LANG|$TERM|$HOME|$PATH\"; pwd");
    req.env = vec![
        ("FOO".into(), "bar baz".into()),
        ("TERM".into(), "xterm".into()),
    ];
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
    assert!(
        env.contains("USER=root\n") && env.contains("LOGNAME=root\n"),
        "{env}"
    );
    // Default workdir is /.
    assert_eq!(a.exec(3, argv(&["pwd"])).stdout, b"/\n");
}

#[test]
fn bad_requests_get_errors() {
    let mut a = agent();
    let mut req = shell("true");
    req.workdir = Some("/nonexistent-dir-xyz".into());
    let o = a.exec(1, req);
    let e = o.error.expect("error");
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert_eq!(
        e.message,
        "working directory /nonexistent-dir-xyz: No such file or directory"
    );
    assert_eq!(o.msgs.len(), 1);

    let e = a
        .exec(2, argv(&["/nonexistent-program-xyz", "a"]))
        .error
        .expect("error");
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(
        e.message.starts_with("/nonexistent-program-xyz: "),
        "{}",
        e.message
    );

    let e = a
        .exec(3, argv(&["no-such-program-xyz"]))
        .error
        .expect("error");
    assert_eq!(e.kind, ErrorKind::NotFound);

    let dir = scratch("bad-requests");
    let not_exec = dir.join("not-executable");
    std::fs::write(&not_exec, "#!/bin/sh\n").unwrap();
    let e = a
        .exec(4, argv(&[not_exec.to_str().unwrap()]))
        .error
        .expect("error");
    assert_eq!(e.kind, ErrorKind::PermissionDenied, "{e:?}");
    std::fs::remove_dir_all(dir).unwrap();

    let e = a.exec(5, argv(&[])).error.expect("error");
    assert_eq!(e.kind, ErrorKind::InvalidRequest);

    a.send(0, HostMsg::Exec(shell("true")));
    let m = a.wait_until(0, WAIT, |m| !m.is_empty());
    assert!(matches!(&m[0], GuestMsg::Error(e) if e.kind == ErrorKind::InvalidRequest));

    let mut req = shell("true");
    req.env = vec![("A=B".into(), "c".into())];
    assert_eq!(
        a.exec(7, req).error.map(|e| e.kind),
        Some(ErrorKind::InvalidRequest)
    );

    // The stream ids of failed requests are free again.
    assert_eq!(a.exec(6, argv(&["true"])).exit().code, Some(0));
    assert_eq!(a.exec(8, argv(&["true"])).exit().code, Some(0));
}

#[test]
fn timeout_kills_the_whole_group() {
    let mut a = agent();
    let dir = scratch("timeout");
    let pidfile = dir.join("bg.pid");
    let mut req = shell(&format!(
        "sleep 300 & echo $! > {}; sleep 300",
        pidfile.display()
    ));
    req.timeout_ms = Some(500);
    let t0 = Instant::now();
    let o = a.exec(1, req);
    let e = o.exit();
    assert!(e.timed_out, "{e:?}");
    assert_eq!(e.signal, Some(9));
    assert_eq!(e.code, None);
    assert!(e.duration_ms >= 500, "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(10));

    let bg: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Gone (reaped by the agent, a subreaper here as PID 1 is in the guest).
    assert!(
        process_gone(bg, Duration::from_secs(5)),
        "background sleep survived the timeout"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_timeout_too_large_to_represent_is_no_timeout() {
    let mut a = agent();
    let mut req = argv(&["echo", "hi"]);
    req.timeout_ms = Some(u64::MAX);
    let o = a.exec(1, req);
    assert_eq!(o.stdout, b"hi\n");
    assert!(!o.exit().timed_out);
}

#[test]
fn exit_does_not_wait_for_background_holders_of_the_pipes() {
    let mut a = agent();
    let t0 = Instant::now();
    let o = a.exec(1, shell("sleep 30 & echo done"));
    assert_eq!(o.stdout, b"done\n");
    assert_eq!(o.exit().code, Some(0));
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "waited for the background child"
    );
}

#[test]
fn ten_mib_of_output_is_byte_exact() {
    let mut a = agent();
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
    let mut a = agent();
    let o = a.exec(
        1,
        shell(r"printf '\377\376\000\200abc\n'; printf '\300\001' >&2"),
    );
    assert_eq!(o.stdout, [0xff, 0xfe, 0x00, 0x80, b'a', b'b', b'c', b'\n']);
    assert_eq!(o.stderr, [0xc0, 0x01]);
}

#[test]
fn twenty_concurrent_execs() {
    let mut a = agent();
    for i in 0..20u32 {
        a.send(
            100 + i,
            HostMsg::Exec(shell(&format!(
                "sleep 0.2; echo out-{i}; echo err-{i} >&2; exit {i}"
            ))),
        );
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
    let mut a = agent();
    let mut req = argv(&["cat"]);
    req.stdin = true;
    a.send(1, HostMsg::Exec(req));
    let data = noise(3 * 1024 * 1024, 7);
    a.send_input(1, &data);
    a.send(1, HostMsg::Eof);
    // Late stdin after close is ignored.
    a.send(1, HostMsg::Data(Bytes(b"late".to_vec())));
    let o = a.finish(1);
    assert_eq!(o.exit().code, Some(0));
    assert!(
        o.stdout == data,
        "cat echoed {} bytes, sent {}",
        o.stdout.len(),
        data.len()
    );

    // Without stdin: true, stdin is /dev/null and Stdin frames are ignored.
    a.send(2, HostMsg::Exec(argv(&["cat"])));
    a.send(2, HostMsg::Data(Bytes(b"ignored".to_vec())));
    let o = a.finish(2);
    assert!(o.stdout.is_empty());
    assert_eq!(o.exit().code, Some(0));

    // Stdin for a stream nobody uses is ignored.
    a.send(3, HostMsg::Data(Bytes(b"x".to_vec())));
    a.send(3, HostMsg::Eof);
    a.ping(3, 9);
}

#[test]
fn duplicate_stream_id_is_refused() {
    let mut a = agent();
    let mut req = argv(&["cat"]);
    req.stdin = true;
    a.send(7, HostMsg::Exec(req));
    a.wait_until(7, WAIT, |m| {
        matches!(m.first(), Some(GuestMsg::Started { .. }))
    });
    a.send(7, HostMsg::Exec(argv(&["true"])));
    let msgs = a.wait_until(7, WAIT, |m| m.len() >= 2);
    assert!(
        matches!(&msgs[1], GuestMsg::Error(e) if e.kind == ErrorKind::InvalidRequest),
        "{msgs:?}"
    );
    // The first exec is untouched.
    a.send(7, HostMsg::Data(Bytes(b"still here".to_vec())));
    a.send(7, HostMsg::Eof);
    let msgs = a.wait_until(7, WAIT, |m| {
        m.iter().any(|m| matches!(m, GuestMsg::Exited(_)))
    });
    let out: Vec<u8> = msgs
        .iter()
        .filter_map(|m| {
            if let GuestMsg::Stdout(b) = m {
                Some(b.0.clone())
            } else {
                None
            }
        })
        .flatten()
        .collect();
    assert_eq!(out, b"still here");
    // After Exited the id can be used again.
    let msgs_before = msgs.len();
    a.send(7, HostMsg::Exec(argv(&["echo", "again"])));
    let msgs = a.wait_until(7, WAIT, |m| {
        m.len() > msgs_before && is_terminal(m.last().unwrap())
    });
    assert!(
        matches!(msgs.last(), Some(GuestMsg::Exited(e)) if e.code == Some(0)),
        "{msgs:?}"
    );
}

#[test]
fn broken_frames_do_not_kill_the_agent() {
    let mut a = agent();
    // A header announcing a frame over the limit.
    a.send_raw(&((MAX_FRAME_LEN as u32) + 1).to_le_bytes());
    // The agent drops what it buffered; ping until it is back in sync.
    let mut back = false;
    for nonce in 1..50 {
        a.send(1, HostMsg::Ping { nonce });
        if a.try_wait_until(1, Duration::from_millis(200), |m| {
            m.contains(&GuestMsg::Pong { nonce })
        })
        .is_ok()
        {
            back = true;
            break;
        }
    }
    assert!(back, "agent never answered again");
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
    let mut a = agent();
    a.send(
        4,
        HostMsg::Hello(HostHello {
            version: PROTOCOL_VERSION,
        }),
    );
    let m = a.wait_until(4, WAIT, |m| !m.is_empty());
    assert!(matches!(&m[0], GuestMsg::Error(e) if e.kind == ErrorKind::InvalidRequest));
}

#[test]
fn shutdown_acks_and_exits_killing_execs() {
    let mut a = agent();
    let dir = scratch("shutdown");
    let pidfile = dir.join("pid");
    a.send(
        1,
        HostMsg::Exec(shell(&format!(
            "echo $$ > {}; exec sleep 300",
            pidfile.display()
        ))),
    );
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
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        process_gone(pid, Duration::from_secs(5)),
        "exec survived shutdown"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn usage_without_stdio_flag() {
    let o = std::process::Command::new(common::agent_bin())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("usage"));
}

#[test]
fn more_than_256_execs_is_busy() {
    let mut a = agent();
    let mut req = argv(&["cat"]);
    req.stdin = true;
    for s in 1..=256u32 {
        a.send(s, HostMsg::Exec(req.clone()));
    }
    for s in 1..=256u32 {
        let m = a.wait_until(s, WAIT, |m| !m.is_empty());
        assert!(
            matches!(m[0], GuestMsg::Started { .. }),
            "stream {s}: {m:?}"
        );
    }
    let o = a.exec(1000, argv(&["true"]));
    assert_eq!(o.error.map(|e| e.kind), Some(ErrorKind::Busy));
    for s in 1..=256u32 {
        a.send(s, HostMsg::Eof);
    }
    for s in 1..=256u32 {
        assert_eq!(a.finish(s).exit().code, Some(0));
    }
    assert_eq!(a.exec(1001, argv(&["true"])).exit().code, Some(0));
}

#[test]
fn failing_and_quick_spawns_race_the_reaper() {
    // std's spawn waits for a child whose exec failed; the reaper must never
    // steal that child (the agent would abort), nor lose a quick exit.
    let mut a = agent();
    for i in 0..100u32 {
        a.send(2 * i + 1, HostMsg::Exec(argv(&["/nonexistent-xyz"])));
        a.send(2 * i + 2, HostMsg::Exec(argv(&["true"])));
    }
    for i in 0..100u32 {
        assert_eq!(
            a.finish(2 * i + 1).error.map(|e| e.kind),
            Some(ErrorKind::NotFound)
        );
        assert_eq!(a.finish(2 * i + 2).exit().code, Some(0));
    }
}
