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

use super::dns_msg;
use crate::config::EgressPolicy;
use crate::egress::Cidr4;
use std::collections::HashMap;
use std::io::{BufRead as _, Read as _};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
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

/// A query waiting for its answer.
struct Asked {
    from: SocketAddr,
    /// The guest's id.
    orig: u16,
    when: Instant,
    /// The policy generation it was judged under.
    generation: u32,
    /// The question's name (lowercase, dotted).
    name: String,
    /// The sanitised query (for an answer made here).
    query: Vec<u8>,
}

/// Queries waiting for their answer, by our id.
type Pending = Mutex<HashMap<u16, Asked>>;

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

/// The holder's entry: `--net-holder RULES IP NFT PASST [PASST ARGS...]`
/// (`NFT` is `-` where nft is not installed: then only `open` works).
///
/// Standard input is the supervisor's line protocol: the first line opens
/// the gate and carries the initial egress policy (JSON), each later line
/// a new policy. Every line is answered on standard output with `ok` or
/// `err MESSAGE` (the log is standard error).
pub fn holder_main(args: &[String]) -> ! {
    let die = |m: String| -> ! {
        eprintln!("smolvm net holder: {m}");
        println!("err {}", one_line(&m));
        std::process::exit(1)
    };
    let [rules, ip, nft, passt, passt_args @ ..] = args else {
        die("usage: --net-holder RULES IP NFT PASST [ARGS...]".into())
    };
    let nft = (nft != "-").then(|| std::path::PathBuf::from(nft));
    // 1. The gate: pasta has configured the namespace when a line comes.
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line).unwrap_or(0) == 0 {
        die("the gate closed".into());
    }
    let policy = match parse_policy(&line) {
        Ok(p) => p,
        Err(e) => die(e),
    };
    // 2. The rules (the host's addresses, the guest's subnet, the
    //    upstream DNS address for marked packets only).
    match std::process::Command::new(ip)
        .arg("-batch")
        .arg(rules)
        .stdout(std::process::Stdio::null())
        .status()
    {
        Ok(s) if s.success() => {}
        other => die(format!("`ip -batch {rules}` failed: {other:?}")),
    }
    // 3. The egress policy, before the guest can send anything.
    let relay = Arc::new(Relay::new(nft));
    if let Err(e) = relay.set_policy(policy) {
        die(e);
    }
    // 4. The guest's resolver address, then passt.
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
    // passt's output goes to the log, never into the answers.
    if let Ok(fd) = std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned() {
        cmd.stdout(fd);
    }
    crate::sys::die_with_parent(&mut cmd);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => die(format!("cannot start passt: {e}")),
    };
    // 5. Relay until passt ends (the VM is gone): then end too.
    let pending: Arc<Pending> = Arc::default();
    let (l2, u2, p2, r2) = match (listen.try_clone(), upstream.try_clone()) {
        (Ok(l), Ok(u)) => (l, u, pending.clone(), relay.clone()),
        _ => die("cannot share the relay sockets".into()),
    };
    std::thread::spawn(move || answers(&u2, &l2, &p2, &r2));
    let r3 = relay.clone();
    std::thread::spawn(move || queries(&listen, &upstream, &pending, &r3));
    ack(Ok(()));
    // 6. Policy changes, one line each, until the supervisor goes.
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut line = String::new();
        loop {
            line.clear();
            // Bounded: a line longer than any policy is an error.
            match (&mut stdin).take(MAX_POLICY_LINE).read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if !line.ends_with('\n') => {
                    ack(Err("policy line too long".into()));
                    return;
                }
                Ok(_) => ack(parse_policy(&line).and_then(|p| relay.set_policy(p))),
            }
        }
    });
    let code = child.wait().ok().and_then(|s| s.code()).unwrap_or(1);
    std::process::exit(code)
}

/// Longest policy line the holder reads (256 names of 253 characters and
/// 256 CIDRs fit well inside).
const MAX_POLICY_LINE: u64 = 256 * 1024;

fn one_line(m: &str) -> String {
    m.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn ack(r: Result<(), String>) {
    use std::io::Write as _;
    let mut o = std::io::stdout().lock();
    let _ = match r {
        Ok(()) => writeln!(o, "ok"),
        Err(e) => writeln!(o, "err {}", one_line(&e)),
    };
    let _ = o.flush();
}

/// A policy line: JSON, checked again here (the holder trusts no input).
fn parse_policy(line: &str) -> Result<EgressPolicy, String> {
    let p: EgressPolicy =
        serde_json::from_str(line.trim()).map_err(|e| format!("bad policy line: {e}"))?;
    crate::egress::normalize(&p).map_err(|e| e.to_string())
}

/// The relay's view of the egress policy, shared by its threads: what is
/// admitted now, and which addresses it put into the `dns4` set until when.
struct Relay {
    nft: Option<std::path::PathBuf>,
    state: Mutex<RelayState>,
}

struct RelayState {
    policy: EgressPolicy,
    cidrs: Vec<Cidr4>,
    /// Marks the connections the current policy admitted (see
    /// `egress_nft::ruleset`); a change bumps it.
    generation: u32,
    /// What is in `dns4` and until when (the kernel's own timeouts expire
    /// the elements; this is our record of them, to replace a timeout).
    admitted: HashMap<Ipv4Addr, Instant>,
}

/// How long a learned address stays open: its TTL, within these bounds.
pub const TTL_FLOOR: u32 = 30;
pub const TTL_CAP: u32 = 3600;

/// What to do with a guest's query under the current policy.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Forward,
    Answer(u8),
}

impl Relay {
    fn new(nft: Option<std::path::PathBuf>) -> Relay {
        Relay {
            nft,
            state: Mutex::new(RelayState {
                policy: EgressPolicy::Open,
                cidrs: Vec::new(),
                generation: 0,
                admitted: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RelayState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the policy: one nft transaction (a new table, or none for
    /// `open`) with the next generation; the relay's name list changes
    /// under the same lock, so no query sees the one without the other.
    fn set_policy(&self, policy: EgressPolicy) -> Result<(), String> {
        let mut s = self.lock();
        let generation = s.generation.wrapping_add(1).max(1);
        let script = super::egress_nft::ruleset(&policy, generation);
        match &self.nft {
            Some(nft) => super::egress_nft::apply(nft, &script)?,
            None if policy == EgressPolicy::Open => {}
            None => {
                return Err("nft is not installed (Debian package nftables): \
                            only egress `open` works without it"
                    .into())
            }
        }
        s.cidrs = match &policy {
            EgressPolicy::Allowlist { cidrs, .. } => {
                cidrs.iter().filter_map(|c| Cidr4::parse(c).ok()).collect()
            }
            _ => Vec::new(),
        };
        s.policy = policy;
        s.generation = generation;
        s.admitted.clear();
        Ok(())
    }

    /// The verdict on a question, and the generation it was made under.
    fn judge(&self, name: Option<&str>, qtype: u16) -> (Verdict, u32) {
        let s = self.lock();
        let v = match &s.policy {
            EgressPolicy::Open => Verdict::Forward,
            EgressPolicy::Off => Verdict::Answer(dns_msg::REFUSED),
            EgressPolicy::Allowlist { domains, .. } => match name {
                Some(n) if crate::egress::name_allowed(domains, n) => {
                    if qtype == dns_msg::TYPE_A {
                        Verdict::Forward
                    } else {
                        // IPv4 only: no other record types (no AAAA, and
                        // no TXT to carry data out).
                        Verdict::Answer(dns_msg::NOERROR)
                    }
                }
                _ => Verdict::Answer(dns_msg::NXDOMAIN),
            },
        };
        (v, s.generation)
    }

    /// Admits the answer `a` to (`qname`, A) asked under `generation`:
    /// opens its addresses in `dns4` and caps its TTLs. `Err` = the guest
    /// gets SERVFAIL (fail closed: nothing was opened for it).
    fn admit(&self, a: &mut [u8], qname: &str, generation: u32) -> Result<(), String> {
        let mut s = self.lock();
        if s.generation != generation {
            return Err("the policy changed while the query was out".into());
        }
        if !matches!(s.policy, EgressPolicy::Allowlist { .. }) {
            return Ok(());
        }
        let ans = dns_msg::parse_answer(a, qname, dns_msg::TYPE_A)
            .ok_or_else(|| "a malformed answer".to_string())?;
        let now = Instant::now();
        let (mut delete, mut add) = (Vec::new(), Vec::new());
        // The answer's TTLs never outlast an address left as it is: a
        // guest cache must not keep one past its element's expiry.
        let mut ttl_cap = TTL_CAP;
        for (ip, ttl) in ans.addrs {
            if s.cidrs.iter().any(|c| c.contains(ip)) || add.iter().any(|(a, _)| *a == ip) {
                continue; // open already
            }
            if crate::egress::rebinding_guarded(ip) {
                continue; // never opened by a name
            }
            let secs = ttl.clamp(TTL_FLOOR, TTL_CAP);
            let until = now + Duration::from_secs(u64::from(secs));
            match s.admitted.get(&ip) {
                // Open for at least half its new time still: not worth an
                // nft run (a guest looping lookups costs no host CPU).
                Some(&old)
                    if old >= now + Duration::from_secs(u64::from(secs) / 2) || old >= until =>
                {
                    let left = old.saturating_duration_since(now).as_secs();
                    ttl_cap = ttl_cap.min(u32::try_from(left).unwrap_or(TTL_CAP));
                    continue;
                }
                // Still in the set (maybe): deleted first, then added with
                // the new timeout, since `add` of an existing element does
                // not refresh its timeout on every kernel.
                Some(&old) if old > now => delete.push(ip),
                _ => {}
            }
            add.push((ip, secs));
        }
        if !add.is_empty() {
            s.admitted.retain(|_, t| *t > now);
            let fresh = add
                .iter()
                .filter(|(ip, _)| !s.admitted.contains_key(ip))
                .count();
            if s.admitted.len() + fresh > super::egress_nft::MAX_DNS4 {
                return Err("the set of learned addresses is full".into());
            }
            let nft = self.nft.as_deref().ok_or("nft is not installed")?;
            // One transaction when it can be (no moment without the
            // address). When an element to replace expired meanwhile that
            // fails: then each delete goes on its own (gone is what it
            // wanted), then the adds.
            let whole = super::egress_nft::dns4_update(&delete, &add);
            if delete.is_empty() || super::egress_nft::apply(nft, &whole).is_err() {
                for ip in &delete {
                    let one = super::egress_nft::dns4_update(&[*ip], &[]);
                    let _ = super::egress_nft::apply(nft, &one);
                }
                super::egress_nft::apply(nft, &super::egress_nft::dns4_update(&[], &add))?;
            }
            for (ip, secs) in add {
                s.admitted
                    .insert(ip, now + Duration::from_secs(u64::from(secs)));
            }
        }
        dns_msg::cap_ttls(a, &ans.ttl_at, ttl_cap);
        Ok(())
    }
}

/// Guest queries in, sanitized queries out (with an id of ours); queries
/// the policy does not forward are answered here.
fn queries(listen: &UdpSocket, upstream: &UdpSocket, pending: &Pending, relay: &Relay) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut next: u16 = 1;
    loop {
        let Ok((n, from)) = listen.recv_from(&mut buf) else {
            continue;
        };
        let Some(mut q) = buf.get(..n).and_then(sanitize_query) else {
            continue; // not a plain query: dropped
        };
        let Some((name, qtype)) = dns_msg::question(&q) else {
            continue;
        };
        let (verdict, generation) = relay.judge(name.as_deref(), qtype);
        if let Verdict::Answer(rcode) = verdict {
            if let Some(r) = dns_msg::reply(&q, rcode) {
                let _ = listen.send_to(&r, from);
            }
            continue;
        }
        let orig = u16::from_be_bytes([q[0], q[1]]);
        let id = {
            let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
            p.retain(|_, v| v.when.elapsed() < ANSWER_WAIT);
            if p.len() >= MAX_PENDING {
                continue;
            }
            while p.contains_key(&next) {
                next = next.wrapping_add(1);
            }
            let id = next;
            next = next.wrapping_add(1);
            p.insert(
                id,
                Asked {
                    from,
                    orig,
                    when: Instant::now(),
                    generation,
                    name: name.unwrap_or_default(),
                    query: q.clone(),
                },
            );
            id
        };
        q[..2].copy_from_slice(&id.to_be_bytes());
        let _ = upstream.send(&q);
    }
}

/// Answers from the host's resolver back to whoever asked (under an
/// allowlist, only once their addresses are open).
fn answers(upstream: &UdpSocket, listen: &UdpSocket, pending: &Pending, relay: &Relay) {
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
        let Some(asked) = pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id)
        else {
            continue;
        };
        if let Err(e) = relay.admit(a, &asked.name, asked.generation) {
            eprintln!(
                "smolvm net holder: {:?}: {e}; answered SERVFAIL",
                asked.name
            );
            let mut q = asked.query;
            q[..2].copy_from_slice(&asked.orig.to_be_bytes());
            if let Some(r) = dns_msg::reply(&q, dns_msg::SERVFAIL) {
                let _ = listen.send_to(&r, asked.from);
            }
            continue;
        }
        a[..2].copy_from_slice(&asked.orig.to_be_bytes());
        let _ = listen.send_to(a, asked.from);
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
