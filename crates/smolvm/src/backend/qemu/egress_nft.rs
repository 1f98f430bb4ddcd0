//! The egress policy as nftables rules in the guest network's namespace
//! (see `docs/network.md`). passt turns every guest flow into a socket of
//! its own in that namespace, so every guest packet is locally generated
//! there and passes the OUTPUT hook, where the table below decides. passt
//! has no capability in the namespace's owning user namespace and cannot
//! change the rules; the namespace holder (root of it) can.
//!
//! Programmed by running `nft -f` (one file = one atomic transaction).
//! Only addresses we formatted ourselves ever go into a file: nft would
//! resolve a host name it met.

use crate::config::EgressPolicy;
use crate::egress::Cidr4;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;

/// The table's name (family `inet`).
pub const TABLE: &str = "smolvm";
/// Most addresses the DNS relay may hold open at once; a full set fails
/// closed (the answer becomes SERVFAIL).
pub const MAX_DNS4: usize = 65536;

/// The nft file that replaces the whole table with `policy`'s, in one
/// transaction (`table` first so that `delete` always has something to
/// delete). `generation` marks the connections this policy admits: those
/// of an earlier policy no longer match the `established` rule and are
/// cut (TCP with a reset). `Open` leaves no table at all.
pub fn ruleset(policy: &EgressPolicy, generation: u32) -> String {
    let mut r = format!("table inet {TABLE}\ndelete table inet {TABLE}\n");
    let cidrs: Vec<Cidr4> = match policy {
        EgressPolicy::Open => return r,
        EgressPolicy::Off => Vec::new(),
        EgressPolicy::Allowlist { cidrs, .. } => {
            cidrs.iter().filter_map(|c| Cidr4::parse(c).ok()).collect()
        }
    };
    let allow = matches!(policy, EgressPolicy::Allowlist { .. });
    let g = generation;
    let _ = writeln!(r, "table inet {TABLE} {{");
    if allow {
        let _ = write!(r, "  set cidr4 {{ type ipv4_addr; flags interval; ");
        if !cidrs.is_empty() {
            let list: Vec<String> = cidrs.iter().map(Cidr4::to_string).collect();
            let _ = write!(r, "elements = {{ {} }}; ", list.join(", "));
        }
        let _ = writeln!(r, "}}");
        let _ = writeln!(
            r,
            "  set dns4 {{ type ipv4_addr; flags timeout; size {MAX_DNS4}; }}"
        );
    }
    let _ = writeln!(
        r,
        "  chain output {{ type filter hook output priority 0; policy drop;"
    );
    // The relay at the resolver address is local to the namespace.
    let _ = writeln!(r, "    oifname \"lo\" accept");
    let _ = writeln!(r, "    meta nfproto ipv6 drop");
    let _ = writeln!(r, "    ct state established,related ct mark {g} accept");
    if allow {
        use super::dns::{UPSTREAM, UPSTREAM_MARK};
        let _ = writeln!(
            r,
            "    meta mark {UPSTREAM_MARK:#x} ip daddr {UPSTREAM} udp dport 53 ct mark set {g} accept"
        );
        let _ = writeln!(r, "    ct state new ip daddr @cidr4 ct mark set {g} accept");
        let _ = writeln!(r, "    ct state new ip daddr @dns4 ct mark set {g} accept");
    }
    let _ = writeln!(r, "    meta l4proto tcp reject with tcp reset");
    let _ = writeln!(r, "    reject with icmpx admin-prohibited");
    let _ = writeln!(r, "  }}\n}}");
    r
}

/// One change of the relay's address set: `delete` the elements whose
/// timeout is to be replaced (they must be there: a missing one fails the
/// whole batch), then `add` each with its timeout in seconds.
pub fn dns4_update(delete: &[Ipv4Addr], add: &[(Ipv4Addr, u32)]) -> String {
    let mut r = String::new();
    if !delete.is_empty() {
        let list: Vec<String> = delete.iter().map(Ipv4Addr::to_string).collect();
        let _ = writeln!(
            r,
            "delete element inet {TABLE} dns4 {{ {} }}",
            list.join(", ")
        );
    }
    if !add.is_empty() {
        let list: Vec<String> = add
            .iter()
            .map(|(a, t)| format!("{a} timeout {t}s"))
            .collect();
        let _ = writeln!(r, "add element inet {TABLE} dns4 {{ {} }}", list.join(", "));
    }
    r
}

/// Runs `nft -f` with `script` on its standard input: one transaction,
/// all or nothing. The error is nft's own message.
pub fn apply(nft: &Path, script: &str) -> Result<(), String> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let mut child = Command::new(nft)
        .args(["-f", "/dev/stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", nft.display()))?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(script.as_bytes())
            .map_err(|e| format!("cannot write to nft: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let err: String = err.split_whitespace().collect::<Vec<_>>().join(" ");
        Err(format!(
            "nft failed ({}): {}",
            out.status,
            err.chars().take(400).collect::<String>()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_only_removes_the_table() {
        assert_eq!(
            ruleset(&EgressPolicy::Open, 3),
            "table inet smolvm\ndelete table inet smolvm\n"
        );
    }

    #[test]
    fn off_admits_nothing_but_loopback() {
        let r = ruleset(&EgressPolicy::Off, 2);
        assert!(r.contains("policy drop"));
        assert!(r.contains("ct mark 2 accept"));
        assert!(!r.contains("@dns4") && !r.contains("@cidr4") && !r.contains("0x5353"));
    }

    #[test]
    fn allowlist_has_the_sets_and_the_generation() {
        let p = EgressPolicy::Allowlist {
            domains: vec!["example.com".into()],
            cidrs: vec!["198.51.100.0/24".into(), "192.0.2.1/32".into()],
        };
        let r = ruleset(&p, 7);
        assert!(
            r.contains("elements = { 198.51.100.0/24, 192.0.2.1/32 }"),
            "{r}"
        );
        assert!(r.contains("ct state new ip daddr @dns4 ct mark set 7 accept"));
        assert!(r.contains("meta mark 0x5353 ip daddr 10.0.3.53 udp dport 53 ct mark set 7"));
        assert!(!r.contains("example.com"), "names never reach nft");
        let empty = EgressPolicy::Allowlist {
            domains: vec!["example.com".into()],
            cidrs: vec![],
        };
        assert!(!ruleset(&empty, 1).contains("elements"));
    }

    #[test]
    fn set_updates() {
        let a: Ipv4Addr = "192.0.2.10".parse().unwrap();
        assert_eq!(
            dns4_update(&[a], &[(a, 30)]),
            "delete element inet smolvm dns4 { 192.0.2.10 }\n\
             add element inet smolvm dns4 { 192.0.2.10 timeout 30s }\n"
        );
        assert_eq!(dns4_update(&[], &[]), "");
    }
}
