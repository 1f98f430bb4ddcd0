//! Quiesce, thaw and reinit (docs/protocol.md, "Snapshots"), end to end
//! on the host against `smolvm-agent --stdio`.
//!
//! As root the agent runs in its own UTS namespace (its `sethostname`
//! stays there) and without CAP_SYS_TIME: there is no namespace for
//! CLOCK_REALTIME, so a clock it could set would be the test machine's.
//! Its clock step therefore fails, as every privileged step does when the
//! suite runs unprivileged, and the tests check that it says so and
//! answers all the same.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

mod common;

use common::{argv, process_gone, shell, Conn, WAIT};
use smolvm_proto::{
    Bytes, ErrorKind, GuestMsg, HostHello, HostMsg, Identity, OpReply, OpRequest, PROTOCOL_VERSION,
};
use std::io;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// `CAP_SYS_TIME` from `<linux/capability.h>`.
const CAP_SYS_TIME: libc::c_ulong = 25;

/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(400);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Starts the agent (see the module comment for what changes as root).
fn agent() -> Conn {
    let mut cmd = std::process::Command::new(common::agent_bin());
    cmd.arg("--stdio")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if is_root() {
        // SAFETY: runs in the child between fork and exec and makes only
        // async-signal-safe syscalls (unshare, prctl), allocating nothing.
        unsafe {
            cmd.pre_exec(|| {
                if libc::unshare(libc::CLONE_NEWUTS) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_CAPBSET_DROP, CAP_SYS_TIME, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            })
        };
    }
    let mut child = cmd
        .spawn()
        .expect("spawn the agent (as root: in a new UTS namespace, without CAP_SYS_TIME)");
    let out = child.stdout.take().unwrap();
    let inp = child.stdin.take().unwrap();
    let mut a = Conn::new(child, out, inp);
    hello(&mut a, 1);
    a
}

/// Sends a hello and waits for the `n`-th hello answer on stream 0.
fn hello(a: &mut Conn, n: usize) {
    a.send(
        0,
        HostMsg::Hello(HostHello {
            version: PROTOCOL_VERSION,
        }),
    );
    a.wait_until(0, WAIT, |m| hellos(m) >= n);
}

fn hellos(m: &[GuestMsg]) -> usize {
    m.iter().filter(|m| matches!(m, GuestMsg::Hello(_))).count()
}

fn quiesce(a: &mut Conn) {
    a.send(0, HostMsg::Quiesce { nonce: 9 });
    a.wait_until(0, WAIT, |m| {
        m.last() == Some(&GuestMsg::Quiesced { nonce: 9 })
    });
    // Quiesced was the last frame of all.
    assert_eq!(
        a.log().last(),
        Some(&(0, GuestMsg::Quiesced { nonce: 9 })),
        "{:?}",
        a.log()
    );
}

/// Nothing at all arrives for `QUIET`.
fn nothing_arrives(a: &Conn) {
    let n = a.log().len();
    std::thread::sleep(QUIET);
    let log = a.log();
    assert_eq!(log.len(), n, "frames after Quiesced: {:?}", &log[n..]);
}

fn identity(hostname: &str) -> Identity {
    let mut entropy = vec![0u8; 64];
    getrandom(&mut entropy);
    Identity {
        hostname: hostname.into(),
        entropy: Bytes(entropy),
        unix_time_ns: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    }
}

fn getrandom(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(buf)
        .unwrap();
}

fn hostname(a: &mut Conn, stream: u32) -> String {
    let o = a.exec(stream, argv(&["cat", "/proc/sys/kernel/hostname"]));
    o.stdout_str().trim_end().to_string()
}

#[test]
fn quiesce_holds_every_frame_until_thaw() {
    let mut a = agent();
    // An exec that writes while the agent is quiesced.
    a.send(
        1,
        HostMsg::Exec(shell("sleep 0.1; echo during; echo err >&2")),
    );
    a.wait_until(1, WAIT, |m| !m.is_empty());
    quiesce(&mut a);
    // The reader still takes requests; their answers wait.
    a.send(2, HostMsg::Exec(argv(&["echo", "queued"])));
    a.send(3, HostMsg::Ping { nonce: 3 });
    a.send(0, HostMsg::Ping { nonce: 4 });
    let t = Instant::now();
    nothing_arrives(&a);
    assert!(t.elapsed() >= QUIET);

    a.send(0, HostMsg::Thaw);
    let o = a.finish(1);
    assert_eq!(o.stdout, b"during\n");
    assert_eq!(o.stderr, b"err\n");
    assert_eq!(o.exit().code, Some(0));
    assert_eq!(a.finish(2).stdout, b"queued\n");
    a.wait_until(3, WAIT, |m| m == [GuestMsg::Pong { nonce: 3 }]);
    a.wait_until(0, WAIT, |m| m.last() == Some(&GuestMsg::Pong { nonce: 4 }));
    // The same machine carries on: a second round works the same.
    quiesce(&mut a);
    a.send(4, HostMsg::Ping { nonce: 5 });
    nothing_arrives(&a);
    a.send(0, HostMsg::Thaw);
    a.wait_until(4, WAIT, |m| m == [GuestMsg::Pong { nonce: 5 }]);
    // A thaw with nothing to thaw is harmless.
    a.send(0, HostMsg::Thaw);
    a.ping(5, 6);
}

#[test]
fn a_hello_ends_a_quiesce() {
    let mut a = agent();
    quiesce(&mut a);
    a.send(1, HostMsg::Ping { nonce: 1 });
    nothing_arrives(&a);
    hello(&mut a, 2);
    a.wait_until(1, WAIT, |m| m == [GuestMsg::Pong { nonce: 1 }]);
}

#[test]
fn snapshot_requests_belong_on_stream_0() {
    let mut a = agent();
    for (stream, msg) in [
        (5, HostMsg::Quiesce { nonce: 9 }),
        (6, HostMsg::Thaw),
        (7, HostMsg::Reinit(identity("elsewhere"))),
    ] {
        a.send(stream, msg);
        let m = a.wait_until(stream, WAIT, |m| !m.is_empty());
        assert!(
            matches!(&m[..], [GuestMsg::Error(e)] if e.kind == ErrorKind::InvalidRequest),
            "{m:?}"
        );
    }
    // Nothing was quiesced or reinitialised.
    a.ping(8, 1);
    assert_eq!(hellos(&a.wait_until(0, WAIT, |_| true)), 1);
}

#[test]
fn reinit_forgets_the_old_connection_and_answers_before_the_hello() {
    let mut a = agent();
    let before = hostname(&mut a, 90);
    a.forget(90);
    // The previous connection's streams: a running exec, an attached
    // background process, and an exec whose output and exit are queued
    // while the machine is quiesced.
    a.send(1, HostMsg::Exec(argv(&["sleep", "300"])));
    let m = a.wait_until(1, WAIT, |m| !m.is_empty());
    let Some(GuestMsg::Started { pid: sleeper }) = m.first().cloned() else {
        panic!("{m:?}")
    };
    a.send(2, HostMsg::Spawn(argv(&["sleep", "300"])));
    let m = a.wait_until(2, WAIT, |m| !m.is_empty());
    let Some(GuestMsg::Spawned { handle, pid: bg }) = m.first().cloned() else {
        panic!("{m:?}")
    };
    a.send(
        3,
        HostMsg::Attach(smolvm_proto::AttachRequest { handle, from: None }),
    );
    a.wait_until(3, WAIT, |m| !m.is_empty());
    a.send(4, HostMsg::Exec(shell("sleep 0.1; echo stale")));
    a.wait_until(4, WAIT, |m| !m.is_empty());
    quiesce(&mut a);
    a.send(0, HostMsg::Ping { nonce: 7 }); // stream 0's answer survives
    a.send(5, HostMsg::Ping { nonce: 8 }); // a stream's answer does not
    std::thread::sleep(Duration::from_millis(300)); // stream 4 finishes

    // The restored machine: Reinit, then at once a hello.
    let id = identity("reinit-test-1");
    a.send(0, HostMsg::Reinit(id));
    a.send(
        0,
        HostMsg::Hello(HostHello {
            version: PROTOCOL_VERSION,
        }),
    );
    let m = a.wait_until(0, WAIT, |m| hellos(m) == 2);
    let [GuestMsg::Hello(_), GuestMsg::Quiesced { nonce: 9 }, GuestMsg::Pong { nonce: 7 }, GuestMsg::Reinited {
        clock_set,
        reseeded,
    }, GuestMsg::Hello(_)] = m[..]
    else {
        panic!("stream 0: {m:?}")
    };
    // No CAP_SYS_TIME (or no root at all): the clock step fails, politely.
    assert!(!clock_set);
    assert_eq!(reseeded, is_root(), "RNDADDENTROPY needs CAP_SYS_ADMIN");

    // The old exec's process group is gone, and it sent nothing more.
    assert!(process_gone(sleeper, WAIT), "pid {sleeper} still runs");
    // The background process runs on; its attach stream ended silently.
    assert!(!process_gone(bg, Duration::ZERO), "background {bg} ended");
    std::thread::sleep(Duration::from_millis(200));
    let log = a.log();
    for s in 1..=5u32 {
        let after: Vec<_> = log
            .iter()
            .skip_while(|(_, m)| *m != GuestMsg::Quiesced { nonce: 9 })
            .filter(|(st, _)| *st == s)
            .collect();
        assert!(after.is_empty(), "stream {s} after the quiesce: {after:?}");
    }
    let m = a.wait_until(1, WAIT, |_| true);
    assert!(matches!(m[..], [GuestMsg::Started { .. }]), "{m:?}");

    // The new connection reuses the ids at once.
    for s in 1..=5 {
        a.forget(s);
    }
    let o = a.exec(1, argv(&["echo", "again"]));
    assert_eq!(o.stdout, b"again\n");
    a.send(3, HostMsg::Op(OpRequest::Procs));
    let m = a.wait_until(3, WAIT, |m| !m.is_empty());
    let [GuestMsg::Op(OpReply::Procs(ref procs))] = m[..] else {
        panic!("{m:?}")
    };
    assert!(
        procs.iter().any(|p| p.handle == handle && p.exit.is_none()),
        "{procs:?}"
    );
    let now = hostname(&mut a, 4);
    if is_root() {
        assert_eq!(now, "reinit-test-1");
    } else {
        assert_eq!(now, before, "sethostname cannot work unprivileged");
    }

    // A hostname that is no hostname is skipped; the rest still happens.
    a.forget(0);
    a.send(0, HostMsg::Reinit(identity("not_a/hostname")));
    let m = a.wait_until(0, WAIT, |m| !m.is_empty());
    assert!(
        matches!(m[..], [GuestMsg::Reinited { clock_set: false, reseeded }] if reseeded == is_root()),
        "{m:?}"
    );
    a.forget(4);
    assert_eq!(hostname(&mut a, 4), now);

    // Too much entropy is cut, not refused; no time leaves the clock be.
    let mut id = identity("reinit-test-2");
    let mut entropy = vec![0u8; 4096];
    getrandom(&mut entropy);
    id.entropy = Bytes(entropy);
    id.unix_time_ns = 0;
    a.forget(0);
    a.send(0, HostMsg::Reinit(id));
    let m = a.wait_until(0, WAIT, |m| !m.is_empty());
    assert!(
        matches!(
            m[..],
            [GuestMsg::Reinited {
                clock_set: false,
                ..
            }]
        ),
        "{m:?}"
    );
    a.send(2, HostMsg::Op(OpRequest::ProcSignal { handle, signal: 9 }));
    a.wait_until(2, WAIT, |m| m == [GuestMsg::Op(OpReply::Ok)]);
    assert!(process_gone(bg, WAIT));
}
