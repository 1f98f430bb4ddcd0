//! The `smolvm.*` parameters of the kernel command line.

use smolvm_proto::cmdline as key;
use std::net::Ipv4Addr;

/// What the host told the guest through `/proc/cmdline`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct BootConfig {
    /// `smolvm.id=<id>`: the VM id, used as hostname.
    pub id: Option<String>,
    /// `smolvm.ip=<addr>/<prefix>`: eth0's address.
    pub ip: Option<(Ipv4Addr, u8)>,
    /// `smolvm.gw=<addr>`: default gateway.
    pub gw: Option<Ipv4Addr>,
    /// `smolvm.dns=<addr>`: resolver.
    pub dns: Option<Ipv4Addr>,
    /// `smolvm.resize=1`: grow the root filesystem to fill its disk.
    pub grow_root: bool,
    /// Values that did not parse, as `key=value`, for the log.
    pub invalid: Vec<String>,
}

impl BootConfig {
    pub fn parse(cmdline: &str) -> Self {
        let mut cfg = BootConfig::default();
        for word in cmdline.split_ascii_whitespace() {
            let Some((name, value)) = word.split_once('=') else {
                continue;
            };
            let ok = match name {
                k if k == key::ID => {
                    cfg.id = Some(value.to_string());
                    true
                }
                k if k == key::IP => {
                    cfg.ip = parse_cidr(value);
                    cfg.ip.is_some()
                }
                k if k == key::GATEWAY => {
                    cfg.gw = value.parse().ok();
                    cfg.gw.is_some()
                }
                k if k == key::RESIZE => {
                    cfg.grow_root = value == "1";
                    value == "1" || value == "0"
                }
                k if k == key::DNS => {
                    cfg.dns = value.parse().ok();
                    cfg.dns.is_some()
                }
                _ => true,
            };
            if !ok {
                cfg.invalid.push(word.to_string());
            }
        }
        cfg
    }
}

fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (addr, prefix) = s.split_once('/')?;
    let prefix: u8 = prefix.parse().ok()?;
    (prefix <= 32).then_some((addr.parse().ok()?, prefix))
}

/// The netmask of a prefix length: 24 → 255.255.255.0.
pub fn netmask(prefix: u8) -> Ipv4Addr {
    let bits = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    Ipv4Addr::from(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_smolvm_keys() {
        let c = BootConfig::parse(
            "console=ttyS0 reboot=t smolvm.id=sbx-1 smolvm.ip=10.0.2.15/24 smolvm.gw=10.0.2.2 \
             smolvm.dns=10.0.2.3 quiet\n",
        );
        assert_eq!(c.id.as_deref(), Some("sbx-1"));
        assert_eq!(c.ip, Some((Ipv4Addr::new(10, 0, 2, 15), 24)));
        assert_eq!(c.gw, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(c.dns, Some(Ipv4Addr::new(10, 0, 2, 3)));
        assert!(!c.grow_root);
        assert!(c.invalid.is_empty());
        assert!(BootConfig::parse("smolvm.resize=1").grow_root);
        let bad = BootConfig::parse("smolvm.resize=yes");
        assert!(!bad.grow_root);
        assert_eq!(bad.invalid, vec!["smolvm.resize=yes".to_string()]);
    }

    #[test]
    fn bad_values_are_reported_not_fatal() {
        let c = BootConfig::parse(
            "smolvm.ip=10.0.2.15 smolvm.gw=nope smolvm.ip6=x smolvm.dns=1.2.3.4/33",
        );
        assert_eq!(c.ip, None);
        assert_eq!(c.gw, None);
        assert_eq!(c.dns, None);
        assert_eq!(c.invalid.len(), 3);
        assert_eq!(BootConfig::parse(""), BootConfig::default());
        assert_eq!(BootConfig::parse("smolvm.ip=1.2.3.4/40").ip, None);
    }

    #[test]
    fn netmasks() {
        assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(netmask(8), Ipv4Addr::new(255, 0, 0, 0));
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
    }
}
