//! Tunnels (`Connect`, docs/protocol.md "Tunnels") end to end on the host
//! against `smolvm-agent --stdio`: the agent's "guest loopback" is this
//! machine's 127.0.0.1, where each test runs its own small server.

#![allow(clippy::cast_possible_truncation)]

mod common;

use common::{noise, stdio_agent, WAIT};
use smolvm_proto::{ErrorKind, GuestMsg, HostMsg, STREAM_WINDOW};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn terminal(m: &[GuestMsg]) -> bool {
    m.iter().any(|m| m.is_terminal())
}

fn data_of(msgs: &[GuestMsg]) -> Vec<u8> {
    let mut v = Vec::new();
    for m in msgs {
        if let GuestMsg::Data(b) = m {
            v.extend_from_slice(&b.0);
        }
    }
    v
}

#[test]
fn half_close_both_ways_and_bytes_intact() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    // Reads to EOF, then answers with a digest of what it got and closes.
    let server = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        let sum: u64 = got.iter().map(|b| u64::from(*b)).sum();
        c.write_all(format!("{} {sum}", got.len()).as_bytes())
            .unwrap();
    });
    let mut a = stdio_agent();
    a.send(1, HostMsg::Connect { port });
    a.wait_until(1, WAIT, |m| m.contains(&GuestMsg::Connected));
    let payload = noise(3 * 1024 * 1024 + 17, 7);
    a.send_input(1, &payload);
    a.send(1, HostMsg::Eof);
    let msgs = a.wait_until(1, WAIT, terminal);
    server.join().unwrap();
    let sum: u64 = payload.iter().map(|b| u64::from(*b)).sum();
    assert_eq!(
        String::from_utf8(data_of(&msgs)).unwrap(),
        format!("{} {sum}", payload.len())
    );
    // Connected first, the service's Eof before the end, Done last.
    assert_eq!(msgs.first(), Some(&GuestMsg::Connected));
    let eof = msgs.iter().position(|m| *m == GuestMsg::Eof).unwrap();
    assert!(
        matches!(msgs.last(), Some(GuestMsg::Done { .. })),
        "{msgs:?}"
    );
    assert_eq!(eof, msgs.len() - 2, "{msgs:?}");
}

#[test]
fn a_service_that_closes_first_still_takes_input() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    // Greets, ends its side, then reads what the host still sends.
    let server = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        c.write_all(b"hello").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        got
    });
    let mut a = stdio_agent();
    a.send(1, HostMsg::Connect { port });
    a.wait_until(1, WAIT, |m| m.contains(&GuestMsg::Eof));
    a.send_input(1, b"late words");
    a.send(1, HostMsg::Eof);
    let msgs = a.wait_until(1, WAIT, terminal);
    assert_eq!(data_of(&msgs), b"hello");
    assert!(
        matches!(msgs.last(), Some(GuestMsg::Done { .. })),
        "{msgs:?}"
    );
    assert_eq!(server.join().unwrap(), b"late words");
}

#[test]
fn nothing_listening_and_port_zero_are_errors() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut a = stdio_agent();
    a.send(1, HostMsg::Connect { port });
    let msgs = a.wait_until(1, WAIT, terminal);
    match msgs.as_slice() {
        [GuestMsg::Error(e)] => {
            assert_eq!(e.kind, ErrorKind::Unavailable);
            assert!(e.message.contains("nothing listens"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    a.send(2, HostMsg::Connect { port: 0 });
    let msgs = a.wait_until(2, WAIT, terminal);
    assert!(
        matches!(msgs.as_slice(), [GuestMsg::Error(e)] if e.kind == ErrorKind::InvalidRequest),
        "{msgs:?}"
    );
}

#[test]
fn an_undrained_tunnel_stops_at_its_window_and_cancel_resets() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let written = Arc::new(AtomicU64::new(0));
    let w = written.clone();
    // Writes 64 MiB as fast as the tunnel takes it.
    let server = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let chunk = vec![1u8; 64 * 1024];
        for _ in 0..1024 {
            if c.write_all(&chunk).is_err() {
                return true; // reset by the cancel
            }
            w.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
        false
    });
    let mut a = stdio_agent();
    a.hold(1);
    a.send(1, HostMsg::Connect { port });
    a.wait_until(1, WAIT, |m| m.contains(&GuestMsg::Connected));
    std::thread::sleep(Duration::from_millis(800));
    let msgs = a.wait_until(1, WAIT, |_| true);
    let sent: u64 = msgs.iter().map(GuestMsg::credit_cost).sum();
    assert!(
        sent <= u64::from(STREAM_WINDOW),
        "{sent} bytes of credit spent past the window"
    );
    // The service is blocked on its socket: it got far less than 64 MiB out
    // (one window plus the kernel's socket buffers).
    let w1 = written.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        written.load(Ordering::SeqCst),
        w1,
        "the service kept writing"
    );
    assert!(w1 < 32 * 1024 * 1024, "{w1}");
    a.send(1, HostMsg::Cancel);
    assert!(server.join().unwrap(), "the service never saw the reset");
    // Nothing follows a cancel, not even Done.
    std::thread::sleep(Duration::from_millis(300));
    let after = a.wait_until(1, WAIT, |_| true);
    assert!(!after.iter().any(GuestMsg::is_terminal), "{after:?}");
}
