//! The egress policy's rules, as pure functions: validation and
//! normalisation of what a user gives (names and CIDRs), and the checks the
//! DNS relay makes on each query and answer. See `docs/network.md`.
//!
//! - Names: ASCII LDH labels of 1-63 characters, at most 253 in all,
//!   lowercased, one trailing dot dropped. `*.example.com` matches names
//!   *below* `example.com` (any depth), not `example.com` itself: list both
//!   when both are meant. Internationalised names are given as punycode
//!   (`xn--...`).
//! - CIDRs: IPv4 `a.b.c.d/n` with the host bits zero; a bare address means
//!   `/32`. IPv6 is refused while guests are IPv4-only.

use crate::config::{ConfigError, EgressPolicy};
use std::net::Ipv4Addr;

/// Most names, and most CIDRs, in one allowlist.
pub const MAX_ENTRIES: usize = 256;
/// Longest name (RFC 1035: 253 characters in text form).
const MAX_NAME: usize = 253;

/// The policy checked and in its normal form (lowercase names without the
/// trailing dot, sorted and deduplicated; CIDRs as `a.b.c.d/n`). The same
/// input always gives the same output, so a normalised policy compares
/// equal to itself normalised again.
pub fn normalize(p: &EgressPolicy) -> Result<EgressPolicy, ConfigError> {
    let EgressPolicy::Allowlist { domains, cidrs } = p else {
        return Ok(p.clone());
    };
    if domains.is_empty() && cidrs.is_empty() {
        return Err(ConfigError::BadEgress(
            "an allowlist with no entries admits nothing; give at least one name or CIDR \
             (`--allow example.com`), or use egress `off`"
                .into(),
        ));
    }
    if domains.len() > MAX_ENTRIES || cidrs.len() > MAX_ENTRIES {
        return Err(ConfigError::BadEgress(format!(
            "{} names and {} CIDRs are too many; an allowlist takes at most {MAX_ENTRIES} of each",
            domains.len(),
            cidrs.len()
        )));
    }
    let mut d = domains
        .iter()
        .map(|n| normalize_domain(n))
        .collect::<Result<Vec<_>, _>>()?;
    d.sort();
    d.dedup();
    let mut c = cidrs
        .iter()
        .map(|c| Cidr4::parse(c).map(|c| c.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    c.sort();
    c.dedup();
    Ok(EgressPolicy::Allowlist {
        domains: d,
        cidrs: c,
    })
}

/// One allowlist name in its normal form, or an error that names it and
/// says what to give instead.
pub fn normalize_domain(raw: &str) -> Result<String, ConfigError> {
    let bad = |why: &str| ConfigError::BadEgress(format!("invalid domain {raw:?}: {why}"));
    let s = raw.trim();
    if s.is_empty() {
        return Err(bad("empty"));
    }
    if s.contains("://") {
        return Err(bad(&format!(
            "a URL; give the host name only (e.g. {:?})",
            host_of_url(s).unwrap_or("example.com")
        )));
    }
    if s.contains('@') {
        return Err(bad(
            "credentials are not part of a name; give the host name only",
        ));
    }
    if s.contains('/') {
        return Err(bad(
            "a path is not part of a name; give the host name only (CIDRs are a.b.c.d/n)",
        ));
    }
    if s.contains(':') {
        return Err(bad(
            "ports are not part of an allowlist (every port of a listed name is allowed); \
             give the host name only",
        ));
    }
    if s.parse::<Ipv4Addr>().is_ok() {
        return Err(bad(
            "an address, not a name; list it as a CIDR (a.b.c.d/32)",
        ));
    }
    if s == "*" || s == "*." {
        return Err(bad(
            "a bare `*` would admit every name; use egress `open`, or `*.example.com`",
        ));
    }
    if !s.is_ascii() {
        return Err(bad(
            "not ASCII; give an internationalised name as punycode (xn--...)",
        ));
    }
    let lower = s.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    let (wild, rest) = match name.strip_prefix("*.") {
        Some(r) => (true, r),
        None => (false, name),
    };
    if rest.len() > MAX_NAME || name.len() > MAX_NAME {
        return Err(bad("longer than 253 characters"));
    }
    for label in rest.split('.') {
        if label.is_empty() {
            return Err(bad("an empty label (two dots in a row, or a leading dot)"));
        }
        if label.len() > 63 {
            return Err(bad("a label longer than 63 characters"));
        }
        if label.contains('*') {
            return Err(bad(
                "`*` is allowed only as the whole first label (`*.example.com`)",
            ));
        }
        let ldh = label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ldh {
            return Err(bad("labels hold only letters, digits and '-'"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("a label cannot start or end with '-'"));
        }
    }
    if wild && !rest.contains('.') {
        return Err(bad(
            "a wildcard over a top-level domain admits too much; name a registered domain \
             (`*.example.com`)",
        ));
    }
    if rest
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad(
            "the last label is all digits (an address?); list addresses as CIDRs",
        ));
    }
    Ok(if wild {
        format!("*.{rest}")
    } else {
        rest.to_string()
    })
}

fn host_of_url(s: &str) -> Option<&str> {
    let after = s.split_once("://")?.1;
    let host = after.split(['/', '?', '#']).next()?;
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let host = host.split(':').next()?;
    (!host.is_empty()).then_some(host)
}

/// An IPv4 network: address and prefix length, host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr4 {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr4 {
    /// Parses `a.b.c.d/n` (host bits must be zero) or a bare `a.b.c.d`
    /// (= /32).
    pub fn parse(raw: &str) -> Result<Cidr4, ConfigError> {
        let s = raw.trim();
        let bad = |why: String| ConfigError::BadEgress(format!("invalid CIDR {s:?}: {why}"));
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        if a.contains(':') {
            return Err(bad(
                "IPv6 is not supported yet (guests are IPv4-only); give an IPv4 a.b.c.d/n".into(),
            ));
        }
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| bad("expected an IPv4 address a.b.c.d or a network a.b.c.d/n".into()))?;
        let prefix = match p {
            None => 32,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= 32 && !p.starts_with('+') => n,
                _ => return Err(bad("the prefix length must be 0-32".into())),
            },
        };
        let net = u32::from(addr) & mask(prefix);
        if net != u32::from(addr) {
            return Err(bad(format!(
                "host bits set; did you mean {}/{prefix}?",
                Ipv4Addr::from(net)
            )));
        }
        Ok(Cidr4 { addr, prefix })
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.prefix) == u32::from(self.addr)
    }
}

impl std::fmt::Display for Cidr4 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

/// Whether the (normalised) allowlist `domains` admits the name `qname`
/// (as the guest asked it: any case, with or without the trailing dot).
pub fn name_allowed(domains: &[String], qname: &str) -> bool {
    let q = qname.to_ascii_lowercase();
    let q = q.strip_suffix('.').unwrap_or(&q);
    domains.iter().any(|d| match d.strip_prefix("*.") {
        Some(suffix) => {
            q.len() > suffix.len() + 1
                && q.ends_with(suffix)
                && q.as_bytes()[q.len() - suffix.len() - 1] == b'.'
        }
        None => q == d,
    })
}

/// Addresses a DNS answer may not open unless a CIDR entry covers them
/// (DNS rebinding: a public name answering with an address of the local
/// network or the cloud's metadata service).
pub fn rebinding_guarded(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || o[0] == 0
        || o[0] >= 240
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
        // IETF protocol assignments; benchmarking (fake-IP proxies on
        // hosts answer names with these).
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(d: &[&str], c: &[&str]) -> EgressPolicy {
        EgressPolicy::Allowlist {
            domains: d.iter().map(|s| s.to_string()).collect(),
            cidrs: c.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn err(d: &[&str], c: &[&str]) -> String {
        normalize(&allow(d, c)).unwrap_err().to_string()
    }

    #[test]
    fn names_are_normalised() {
        let p = normalize(&allow(
            &[
                "Example.COM.",
                "*.Api.example.com",
                "example.com",
                "xn--bcher-kva.de",
            ],
            &["10.0.0.0/8", "192.0.2.1", "10.0.0.0/8"],
        ))
        .unwrap();
        assert_eq!(
            p,
            allow(
                &["*.api.example.com", "example.com", "xn--bcher-kva.de"],
                &["10.0.0.0/8", "192.0.2.1/32"]
            )
        );
        assert_eq!(normalize(&p).unwrap(), p, "normal form is stable");
        assert_eq!(normalize(&EgressPolicy::Off).unwrap(), EgressPolicy::Off);
        assert_eq!(normalize(&EgressPolicy::Open).unwrap(), EgressPolicy::Open);
    }

    #[test]
    fn bad_names_say_what_to_give() {
        let e = err(&["https://example.com/path"], &[]);
        assert!(e.contains("a URL") && e.contains("\"example.com\""), "{e}");
        assert!(err(&["example.com/path"], &[]).contains("path"));
        assert!(err(&["user:pass@example.com"], &[]).contains("credentials"));
        assert!(err(&["example.com:443"], &[]).contains("ports"));
        assert!(err(&["192.0.2.1"], &[]).contains("CIDR"));
        assert!(err(&["*"], &[]).contains("bare `*`"));
        assert!(err(&["*.com"], &[]).contains("top-level"));
        assert!(err(&["a.*.example.com"], &[]).contains("first label"));
        assert!(err(&["foo*.example.com"], &[]).contains("first label"));
        assert!(err(&["bücher.de"], &[]).contains("punycode"));
        assert!(err(&["a..b"], &[]).contains("empty label"));
        assert!(err(&[".a.b"], &[]).contains("empty label"));
        assert!(err(&["a_b.com"], &[]).contains("letters, digits"));
        assert!(err(&["-a.com"], &[]).contains("'-'"));
        assert!(err(&[&format!("{}.com", "a".repeat(64))], &[]).contains("63"));
        let long = vec!["a".repeat(60); 5].join(".");
        assert!(err(&[&long], &[]).contains("253"));
        assert!(err(&[""], &[]).contains("empty"));
        assert!(err(&["1.2.3.4.5"], &[]).contains("digits"));
    }

    #[test]
    fn bad_cidrs_say_what_to_give() {
        assert_eq!(
            err(&[], &["10.0.0.1/8"]),
            "invalid CIDR \"10.0.0.1/8\": host bits set; did you mean 10.0.0.0/8?"
        );
        assert!(err(&[], &["2001:db8::/32"]).contains("IPv6"));
        assert!(err(&[], &["10.0.0.0/33"]).contains("0-32"));
        assert!(err(&[], &["10.0.0.0/"]).contains("0-32"));
        assert!(err(&[], &["10.0.0.0/+8"]).contains("0-32"));
        assert!(err(&[], &["example.com"]).contains("IPv4"));
        assert!(err(&[], &["300.0.0.0/8"]).contains("IPv4"));
        assert_eq!(Cidr4::parse("0.0.0.0/0").unwrap().to_string(), "0.0.0.0/0");
    }

    #[test]
    fn empty_and_oversized_allowlists_are_refused() {
        assert!(err(&[], &[]).contains("no entries"));
        let many: Vec<String> = (0..=MAX_ENTRIES)
            .map(|i| format!("h{i}.example.com"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(err(&many, &[]).contains("too many"));
    }

    #[test]
    fn names_match_exactly_or_below_a_wildcard() {
        let d: Vec<String> = ["example.com", "*.svc.example.org"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(name_allowed(&d, "example.com"));
        assert!(name_allowed(&d, "EXAMPLE.com."));
        assert!(!name_allowed(&d, "www.example.com"));
        assert!(!name_allowed(&d, "notexample.com"));
        assert!(name_allowed(&d, "a.svc.example.org"));
        assert!(name_allowed(&d, "a.b.svc.example.org"));
        assert!(!name_allowed(&d, "svc.example.org"), "the suffix itself");
        assert!(!name_allowed(&d, "xsvc.example.org"));
        assert!(!name_allowed(&d, ".svc.example.org"));
        assert!(!name_allowed(&[], "example.com"));
    }

    #[test]
    fn cidrs_contain() {
        let c = Cidr4::parse("198.51.100.0/24").unwrap();
        assert!(c.contains("198.51.100.20".parse().unwrap()));
        assert!(!c.contains("198.51.101.1".parse().unwrap()));
        assert!(Cidr4::parse("0.0.0.0/0")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
    }

    #[test]
    fn rebinding_guard() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "224.0.0.1",
            "240.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
        ] {
            assert!(rebinding_guarded(a.parse().unwrap()), "{a}");
        }
        for a in ["192.0.2.10", "8.8.8.8", "100.128.0.1", "172.32.0.1"] {
            assert!(!rebinding_guarded(a.parse().unwrap()), "{a}");
        }
    }
}
