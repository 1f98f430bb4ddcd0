//! The guest's DNS: a relay inside the guest network's namespace, so that
//! nothing but well-formed queries reach the host's resolver (which may be
//! a loopback service, systemd-resolved at 127.0.0.53). See
//! `docs/network.md`.
//!
//! The namespace holder runs this (`smolvm-supervisor --net-holder`): it
//! waits at the gate until pasta has configured the namespace, applies the
//! gate's rules, binds the guest's resolver address (10.0.2.3:53, local in
//! the namespace), starts passt as its child and relays: each query is
//! parsed and rebuilt (one question, no other sections, no EDNS options)
//! and sent, from a socket marked [`UPSTREAM_MARK`], to [`UPSTREAM`], which
//! pasta forwards to the host's resolver. The gate lets only marked
//! packets reach that address, so a guest cannot talk to the resolver
//! past the relay.

use std::collections::HashMap;
use std::io::BufRead as _;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the relay sends queries: pasta answers this address with the
/// host's resolver (`--dns-forward`). Outside the guest's subnet.
pub const UPSTREAM: &str = "10.0.3.53";
/// The firewall mark of the relay's upstream socket (the gate's rules admit
/// only marked packets to [`UPSTREAM`]).
pub const UPSTREAM_MARK: u32 = 0x5353;

/// Longest DNS message relayed either way.
const MAX_MESSAGE: usize = 4096;
/// Queries waiting for an answer at once; more are dropped.
const MAX_PENDING: usize = 256;
/// How long an answer may take.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// Queries waiting for their answer: our id -> (who asked, their id, when).
type Pending = Mutex<HashMap<u16, (SocketAddr, u16, Instant)>>;

/// The query in `q`, rebuilt from what was parsed: the header (id, the
/// recursion-desired bit) and one question. `None` for anything that is
/// not a plain standard query.
pub fn sanitize_query(q: &[u8]) -> Option<Vec<u8>> {
    let h = q.get(..12)?;
    let flags = h[2];
    let count = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
    let is_query = flags & 0x80 == 0;
    let standard = (flags >> 3) & 0x0f == 0;
    if !is_query || !standard || count(4) != 1 || count(6) != 0 || count(8) != 0 || count(10) > 1 {
        return None;
    }
    // The name: labels of 1-63 bytes, no compression, at most 255 bytes.
    let mut i = 12;
    loop {
        let len = usize::from(*q.get(i)?);
        if len == 0 {
            i += 1;
            break;
        }
        if len > 63 || i - 12 + len + 1 > 255 {
            return None;
        }
        i += 1 + len;
    }
    let end = i + 4; // qtype, qclass
    q.get(i..end)?;
    let mut out = Vec::with_capacity(end);
    out.extend_from_slice(&h[..2]);
    out.push(flags & 0x01); // RD only
    out.push(0);
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&q[12..end]);
    Some(out)
}

/// The holder's entry: `--net-holder RULES IP PASST [PASST ARGS...]`.
pub fn holder_main(args: &[String]) -> ! {
    let die = |m: String| -> ! {
        eprintln!("smolvm net holder: {m}");
        std::process::exit(1)
    };
    let [rules, ip, passt, passt_args @ ..] = args else {
        die("usage: --net-holder RULES IP PASST [ARGS...]".into())
    };
    // 1. The gate: pasta has configured the namespace when a line comes.
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line).unwrap_or(0) == 0 {
        die("the gate closed".into());
    }
    // 2. The rules (the host's addresses, the guest's subnet, the
    //    upstream DNS address for marked packets only).
    match std::process::Command::new(ip)
        .arg("-batch")
        .arg(rules)
        .status()
    {
        Ok(s) if s.success() => {}
        other => die(format!("`ip -batch {rules}` failed: {other:?}")),
    }
    // 3. The guest's resolver address, then passt.
    let listen = match UdpSocket::bind((super::net::DNS, 53)) {
        Ok(s) => s,
        Err(e) => die(format!("cannot bind {}:53: {e}", super::net::DNS)),
    };
    let upstream = match UdpSocket::bind(("0.0.0.0", 0)) {
        Ok(s) => s,
        Err(e) => die(format!("cannot open the upstream socket: {e}")),
    };
    if let Err(e) = crate::sys::set_mark(&upstream, UPSTREAM_MARK) {
        die(format!("cannot mark the upstream socket: {e}"));
    }
    if let Err(e) = upstream.connect((UPSTREAM, 53)) {
        die(format!("cannot address {UPSTREAM}:53: {e}"));
    }
    let mut cmd = std::process::Command::new(passt);
    cmd.args(passt_args).stdin(std::process::Stdio::null());
    crate::sys::die_with_parent(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => die(format!("cannot start passt: {e}")),
    };
    // 4. Relay until passt ends (the VM is gone): then end too.
    let pending: Arc<Pending> = Arc::default();
    let (l2, u2, p2) = match (listen.try_clone(), upstream.try_clone()) {
        (Ok(l), Ok(u)) => (l, u, pending.clone()),
        _ => die("cannot share the relay sockets".into()),
    };
    std::thread::spawn(move || answers(&u2, &l2, &p2));
    std::thread::spawn(move || queries(&listen, &upstream, &pending));
    let code = child.wait().ok().and_then(|s| s.code()).unwrap_or(1);
    std::process::exit(code)
}

/// Guest queries in, sanitized queries out (with an id of ours).
fn queries(listen: &UdpSocket, upstream: &UdpSocket, pending: &Pending) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut next: u16 = 1;
    loop {
        let Ok((n, from)) = listen.recv_from(&mut buf) else {
            continue;
        };
        let Some(mut q) = buf.get(..n).and_then(sanitize_query) else {
            continue; // not a plain query: dropped
        };
        let orig = u16::from_be_bytes([q[0], q[1]]);
        let id = {
            let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
            p.retain(|_, v| v.2.elapsed() < ANSWER_WAIT);
            if p.len() >= MAX_PENDING {
                continue;
            }
            while p.contains_key(&next) {
                next = next.wrapping_add(1);
            }
            let id = next;
            next = next.wrapping_add(1);
            p.insert(id, (from, orig, Instant::now()));
            id
        };
        q[..2].copy_from_slice(&id.to_be_bytes());
        let _ = upstream.send(&q);
    }
}

/// Answers from the host's resolver back to whoever asked.
fn answers(upstream: &UdpSocket, listen: &UdpSocket, pending: &Pending) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let Ok(n) = upstream.recv(&mut buf) else {
            continue;
        };
        let Some(a) = buf
            .get_mut(..n)
            .filter(|a| a.len() >= 12 && a[2] & 0x80 != 0)
        else {
            continue;
        };
        let id = u16::from_be_bytes([a[0], a[1]]);
        let Some((to, orig, _)) = pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id)
        else {
            continue;
        };
        a[..2].copy_from_slice(&orig.to_be_bytes());
        let _ = listen.send_to(a, to);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &[&str], extra: &[u8], ar: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x20, 0, 1, 0, 0, 0, 0];
        q.extend_from_slice(&ar.to_be_bytes());
        for l in name {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q.extend_from_slice(extra);
        q
    }

    #[test]
    fn plain_queries_are_rebuilt() {
        let q = query(&["deb", "debian", "org"], &[], 0);
        let s = sanitize_query(&q).unwrap();
        assert_eq!(&s[..4], &[0x12, 0x34, 0x01, 0x00], "id kept, only RD");
        assert_eq!(&s[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&s[12..], &q[12..]);
        // An EDNS OPT record (and anything after the question) is cut.
        let opt = [0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 4, b'X', b'X', b'X', b'X'];
        let s = sanitize_query(&query(&["a", "b"], &opt, 1)).unwrap();
        assert_eq!(s.len(), 12 + 5 + 4);
    }

    #[test]
    fn anything_else_is_dropped() {
        assert!(sanitize_query(b"ARBITRARY-UDP-PAYLOAD").is_none());
        assert!(sanitize_query(&[0; 11]).is_none());
        let mut answer = query(&["a"], &[], 0);
        answer[2] |= 0x80;
        assert!(sanitize_query(&answer).is_none(), "a response");
        let mut update = query(&["a"], &[], 0);
        update[2] |= 5 << 3;
        assert!(sanitize_query(&update).is_none(), "an UPDATE");
        let mut two = query(&["a"], &[], 0);
        two[5] = 2;
        assert!(sanitize_query(&two).is_none(), "two questions");
        let mut ptr = query(&["a"], &[], 0);
        ptr[12] = 0xc0;
        assert!(sanitize_query(&ptr).is_none(), "a compression pointer");
        let long = "x".repeat(64);
        assert!(
            sanitize_query(&query(&[&long], &[], 0)).is_none(),
            "a 64-byte label"
        );
        let q = query(&["deb", "debian", "org"], &[], 0);
        assert!(sanitize_query(&q[..q.len() - 1]).is_none(), "cut short");
    }
}
