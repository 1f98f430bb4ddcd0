//! The few DNS message parts the relay reads and writes for the egress
//! policy: the question of a (sanitised) query, locally made answers, and
//! the A records of an upstream answer that belong to the question's name.
//! Everything here reads untrusted bytes: bounded, no panics, no
//! allocation beyond the message's size.

use std::net::Ipv4Addr;

pub const TYPE_A: u16 = 1;
pub const TYPE_CNAME: u16 = 5;
const CLASS_IN: u16 = 1;
pub const NOERROR: u8 = 0;
pub const SERVFAIL: u8 = 2;
pub const NXDOMAIN: u8 = 3;
pub const REFUSED: u8 = 5;

/// Compression pointers followed in one name at most.
const MAX_HOPS: usize = 16;
/// Answer records looked at at most.
const MAX_RECORDS: usize = 64;
/// CNAME links followed from the question's name at most.
const MAX_CHAIN: usize = 8;

/// The question of a query made by `dns::sanitize_query` (one question
/// right after the header, no compression): its name in lowercase dotted
/// form (`None` when a label holds anything but letters, digits, '-' and
/// '_': such a name matches no allowlist entry) and its type.
pub fn question(q: &[u8]) -> Option<(Option<String>, u16)> {
    let mut i = 12;
    let mut labels: Vec<String> = Vec::new();
    let mut clean = true;
    loop {
        let len = usize::from(*q.get(i)?);
        if len == 0 {
            i += 1;
            break;
        }
        if len > 63 {
            return None;
        }
        let l = q.get(i + 1..i + 1 + len)?;
        clean &= l
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_');
        labels.push(String::from_utf8_lossy(l).to_ascii_lowercase());
        i += 1 + len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    Some((clean.then(|| labels.join(".")), qtype))
}

/// An answer made here for the query `q` (as sanitised): the question
/// echoed, no records, `rcode`.
pub fn reply(q: &[u8], rcode: u8) -> Option<Vec<u8>> {
    let mut i = 12;
    loop {
        let len = usize::from(*q.get(i)?);
        i += 1 + len;
        if len == 0 {
            break;
        }
    }
    let end = i + 4;
    let question = q.get(12..end)?;
    let mut r = Vec::with_capacity(end);
    r.extend_from_slice(q.get(..2)?);
    // QR, the query's RD; RA; the code.
    r.push(0x80 | (q[2] & 0x01));
    r.push(0x80 | (rcode & 0x0f));
    r.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    r.extend_from_slice(question);
    Some(r)
}

/// What an upstream answer holds for the egress policy.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Answer {
    /// The response code.
    pub rcode: u8,
    /// A records owned by the question's name or a name it is a CNAME of
    /// (bounded chain), with their TTLs.
    pub addrs: Vec<(Ipv4Addr, u32)>,
    /// Where each answer record's TTL is (to cap them).
    pub ttl_at: Vec<usize>,
}

/// Reads the answer `a` to the question (`qname`, `qtype`). `None` when it
/// is malformed or answers another question.
pub fn parse_answer(a: &[u8], qname: &str, qtype: u16) -> Option<Answer> {
    let h = a.get(..12)?;
    let count = |i: usize| usize::from(u16::from_be_bytes([h[i], h[i + 1]]));
    if h[2] & 0x80 == 0 || count(4) != 1 {
        return None;
    }
    let (name, mut i) = read_name(a, 12)?;
    let t = u16::from_be_bytes([*a.get(i)?, *a.get(i + 1)?]);
    i += 4;
    if name != qname || t != qtype {
        return None;
    }
    let mut out = Answer {
        rcode: h[3] & 0x0f,
        ..Answer::default()
    };
    let mut cnames: Vec<(String, String)> = Vec::new();
    let mut addrs: Vec<(String, Ipv4Addr, u32)> = Vec::new();
    for _ in 0..count(6).min(MAX_RECORDS) {
        let (owner, j) = read_name(a, i)?;
        let fixed = a.get(j..j + 10)?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let class = u16::from_be_bytes([fixed[2], fixed[3]]);
        let ttl = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
        let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let rdata_at = j + 10;
        let rdata = a.get(rdata_at..rdata_at + rdlen)?;
        out.ttl_at.push(j + 4);
        if class == CLASS_IN {
            if rtype == TYPE_A && rdlen == 4 {
                let ip = Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]);
                addrs.push((owner, ip, ttl));
            } else if rtype == TYPE_CNAME {
                let (target, end) = read_name(a, rdata_at)?;
                if end != rdata_at + rdlen {
                    return None;
                }
                cnames.push((owner, target));
            }
        }
        i = rdata_at + rdlen;
    }
    // The names that stand for the question's: itself and its CNAME chain.
    let mut chain = vec![qname.to_string()];
    for _ in 0..MAX_CHAIN {
        let Some(next) = cnames
            .iter()
            .find(|(o, t)| chain.contains(o) && !chain.contains(t))
            .map(|(_, t)| t.clone())
        else {
            break;
        };
        chain.push(next);
    }
    out.addrs = addrs
        .into_iter()
        .filter(|(o, _, _)| chain.contains(o))
        .map(|(_, ip, ttl)| (ip, ttl))
        .collect();
    Some(out)
}

/// Caps the answer records' TTLs at `cap` seconds (so that a guest's cache
/// never outlives the address's stay in the set).
pub fn cap_ttls(a: &mut [u8], ttl_at: &[usize], cap: u32) {
    for &at in ttl_at {
        if let Some(b) = a.get_mut(at..at + 4) {
            let ttl = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            b.copy_from_slice(&ttl.min(cap).to_be_bytes());
        }
    }
}

/// The name at `at` (lowercase, dotted; a '.' inside a label is escaped,
/// so that no two names read alike) and where the bytes after it start.
/// Compression pointers are followed at most [`MAX_HOPS`] times.
fn read_name(m: &[u8], at: usize) -> Option<(String, usize)> {
    let mut name = String::new();
    let mut i = at;
    let mut end = None;
    let mut hops = 0;
    loop {
        let len = *m.get(i)?;
        match len & 0xc0 {
            0x00 if len == 0 => {
                return Some((name, end.unwrap_or(i + 1)));
            }
            0x00 => {
                let l = m.get(i + 1..i + 1 + usize::from(len))?;
                if !name.is_empty() {
                    name.push('.');
                }
                for &b in l {
                    match b {
                        b'.' => name.push_str("\\."),
                        b'\\' => name.push_str("\\\\"),
                        _ => name.push(char::from(b.to_ascii_lowercase())),
                    }
                }
                if name.len() > 1024 {
                    return None;
                }
                i += 1 + usize::from(len);
            }
            0xc0 => {
                hops += 1;
                if hops > MAX_HOPS {
                    return None;
                }
                let ptr = usize::from(u16::from_be_bytes([len, *m.get(i + 1)?]) & 0x3fff);
                end.get_or_insert(i + 2);
                i = ptr;
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str) -> Vec<u8> {
        let mut v = Vec::new();
        for l in n.split('.') {
            v.push(l.len() as u8);
            v.extend_from_slice(l.as_bytes());
        }
        v.push(0);
        v
    }

    fn query(n: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend(name(n));
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&[0, 1]);
        q
    }

    /// An answer to `query(n, 1)` with records (owner as bytes, type, rdata).
    fn answer(n: &str, recs: &[(Vec<u8>, u16, Vec<u8>)]) -> Vec<u8> {
        let mut a = query(n, TYPE_A);
        a[2] = 0x81;
        a[3] = 0x80;
        a[7] = recs.len() as u8;
        for (owner, t, rdata) in recs {
            a.extend(owner);
            a.extend_from_slice(&t.to_be_bytes());
            a.extend_from_slice(&[0, 1, 0, 0, 0x0e, 0x10]); // IN, TTL 3600
            a.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            a.extend(rdata);
        }
        a
    }

    #[test]
    fn questions() {
        let q = query("WWW.Example.com", 1);
        assert_eq!(question(&q), Some((Some("www.example.com".into()), 1)));
        let mut odd = query("a.b", 28);
        odd[13] = b'.';
        assert_eq!(question(&odd), Some((None, 28)), "a dot inside a label");
        assert_eq!(question(&q[..q.len() - 3]), None);
    }

    #[test]
    fn replies_echo_the_question() {
        let q = query("x.example", 1);
        let r = reply(&q, NXDOMAIN).unwrap();
        assert_eq!(&r[..4], &[0xab, 0xcd, 0x81, 0x83]);
        assert_eq!(&r[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&r[12..], &q[12..]);
    }

    #[test]
    fn a_records_of_the_name_and_its_cname_chain() {
        let ptr_q = vec![0xc0, 12];
        let a = answer(
            "api.example.com",
            &[
                (ptr_q.clone(), TYPE_CNAME, name("edge.cdn.net")),
                (name("edge.cdn.net"), TYPE_A, vec![192, 0, 2, 10]),
                (ptr_q, TYPE_A, vec![192, 0, 2, 11]),
                (name("other.net"), TYPE_A, vec![203, 0, 113, 30]),
            ],
        );
        let p = parse_answer(&a, "api.example.com", TYPE_A).unwrap();
        assert_eq!(
            p.addrs,
            vec![
                ("192.0.2.10".parse().unwrap(), 3600),
                ("192.0.2.11".parse().unwrap(), 3600)
            ]
        );
        assert_eq!(p.ttl_at.len(), 4);
        let mut b = a.clone();
        cap_ttls(&mut b, &p.ttl_at, 60);
        let q = parse_answer(&b, "api.example.com", TYPE_A).unwrap();
        assert!(q.addrs.iter().all(|(_, t)| *t == 60));
        // Another question's answer is not taken.
        assert!(parse_answer(&a, "www.example.com", TYPE_A).is_none());
        assert!(parse_answer(&a, "api.example.com", 28).is_none());
    }

    #[test]
    fn pointer_loops_and_garbage_end() {
        let mut a = answer("a.b", &[(vec![0xc0, 0x00], TYPE_A, vec![1, 2, 3, 4])]);
        let at = a.len() - 16;
        a[at] = 0xc0;
        a[at + 1] = at as u8; // points at itself
        assert!(parse_answer(&a, "a.b", TYPE_A).is_none());
        for n in 0..a.len() {
            let _ = parse_answer(&a[..n], "a.b", TYPE_A);
        }
        // Every single-byte corruption of a good answer parses or fails, never panics.
        let good = answer(
            "a.b",
            &[
                (vec![0xc0, 12], TYPE_CNAME, vec![0xc0, 12]),
                (vec![0xc0, 12], TYPE_A, vec![1, 2, 3, 4]),
            ],
        );
        for i in 0..good.len() {
            for v in [0u8, 1, 0x3f, 0x40, 0xc0, 0xff] {
                let mut g = good.clone();
                g[i] = v;
                let _ = parse_answer(&g, "a.b", TYPE_A);
                let _ = question(&g);
                let _ = reply(&g, SERVFAIL);
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20000 {
            let mut m = Vec::new();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 200) as usize;
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                m.push((x >> 24) as u8);
            }
            if m.len() > 7 {
                m[2] |= 0x80;
                m[4] = 0;
                m[5] = 1;
            }
            let _ = parse_answer(&m, "a.b", TYPE_A);
            let _ = question(&m);
            let _ = reply(&m, SERVFAIL);
        }
    }
}
