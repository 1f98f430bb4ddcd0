//! Host port forwards of a running sandbox (docs/network.md "Port
//! forwards"): the supervisor listens, each connection is a tunnel over
//! the agent channel to the guest's loopback.

use super::Sandbox;
use crate::config::PortForward;
use crate::error::{Error, Result};
use crate::state::VmState;
use smolvm_proto::supervisor::{ControlRequest, ControlResponse};
use std::net::{IpAddr, Ipv4Addr};

/// Parses `[[ADDR:]HOST:]GUEST` (`8080`, `8080:80`, `0.0.0.0:8080:80`):
/// without a host port a free one is picked; without an address the
/// forward listens on 127.0.0.1 only.
pub fn parse_forward(s: &str) -> Result<PortForward> {
    let bad = |why: &str| {
        Error::Invalid(format!(
            "invalid port forward {s:?}: {why}; use GUEST, HOST:GUEST or ADDRESS:HOST:GUEST (e.g. 8080:80)"
        ))
    };
    let port = |p: &str, what: &str, zero_ok: bool| -> Result<u16> {
        match p.parse::<u16>() {
            Ok(0) if !zero_ok => Err(bad(&format!("{what} 0 is not a port"))),
            Ok(n) => Ok(n),
            Err(_) => Err(bad(&format!("{what} {p:?} is not a port number (1-65535)"))),
        }
    };
    let parts: Vec<&str> = s.rsplitn(3, ':').collect();
    let (addr, host, guest) = match parts.as_slice() {
        [g] => (None, None, *g),
        [g, h] => (None, Some(*h), *g),
        [g, h, a] => (Some(*a), Some(*h), *g),
        _ => return Err(bad("empty")),
    };
    let guest_port = port(guest, "guest port", false)?;
    let host_port = match host {
        Some(h) => port(h, "host port", true)?,
        None => 0,
    };
    let host_addr = match addr {
        None => IpAddr::V4(Ipv4Addr::LOCALHOST),
        Some(a) => a
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| bad(&format!("{a:?} is not an IP address")))?,
    };
    Ok(PortForward {
        host_addr,
        host_port,
        guest_port,
    })
}

impl Sandbox {
    fn network_error(&self, message: impl Into<String>) -> Error {
        Error::Network {
            id: self.id.clone(),
            message: message.into(),
        }
    }

    async fn ports_request(&self, req: ControlRequest) -> Result<ControlResponse> {
        let state = self.status().await?;
        if !matches!(state, VmState::Running | VmState::Paused) {
            return Err(Error::InvalidState {
                id: self.id.clone(),
                state,
                hint: format!(
                    "port forwards exist while it runs; start it first: smolvm start {}",
                    self.id
                ),
            });
        }
        let c = self.open_connection().await?;
        match c.control(req).await {
            Ok(ControlResponse::Error(e))
                if e.kind == smolvm_proto::supervisor::ControlErrorKind::InvalidState =>
            {
                Err(Error::Control {
                    id: self.id.clone(),
                    kind: crate::error::ErrorKind::InvalidState,
                    message: e.message,
                })
            }
            Ok(ControlResponse::Error(e)) => Err(self.network_error(e.message)),
            Ok(r) => Ok(r),
            Err(source) => Err(Error::Client {
                id: self.id.clone(),
                source,
            }),
        }
    }

    /// Forwards a host port to `guest_port` on the guest's loopback for
    /// this run (until the VM stops; kept across pause/resume and
    /// snapshot/restore). `host_port` 0 picks a free one. Returns the
    /// forward with the host port bound.
    pub async fn expose(&self, fwd: PortForward) -> Result<PortForward> {
        if fwd.guest_port == 0 {
            return Err(Error::Invalid("guest port 0 is not a port".into()));
        }
        match self.ports_request(ControlRequest::PortAdd(fwd)).await? {
            ControlResponse::Port(p) => Ok(p),
            o => Err(self.network_error(format!("unexpected answer {o:?}"))),
        }
    }

    /// Closes the forward on `host_port` (its open connections end).
    pub async fn unexpose(&self, host_port: u16) -> Result<PortForward> {
        match self
            .ports_request(ControlRequest::PortRemove { host_port })
            .await?
        {
            ControlResponse::Port(p) => Ok(p),
            o => Err(self.network_error(format!("unexpected answer {o:?}"))),
        }
    }

    /// The forwards of the running VM (none when it is not running).
    pub async fn ports(&self) -> Result<Vec<PortForward>> {
        if !matches!(self.status().await?, VmState::Running | VmState::Paused) {
            return Ok(Vec::new());
        }
        match self.ports_request(ControlRequest::PortList).await? {
            ControlResponse::Ports(p) => Ok(p),
            o => Err(self.network_error(format!("unexpected answer {o:?}"))),
        }
    }

    /// A tunnel to `guest_port` on the guest's loopback, as a byte stream
    /// (what `smolvm tunnel` and SSH's ProxyCommand use).
    pub async fn tunnel(&self, guest_port: u16) -> Result<crate::supervisor::AgentStream> {
        let c = self.connect().await?;
        crate::supervisor::tunnel::connect(&c, guest_port)
            .await
            .map_err(|e| self.network_error(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_parse() {
        let f = parse_forward("80").unwrap();
        assert_eq!((f.host_port, f.guest_port), (0, 80));
        assert_eq!(f.host_addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        let f = parse_forward("8080:80").unwrap();
        assert_eq!((f.host_port, f.guest_port), (8080, 80));
        let f = parse_forward("0.0.0.0:8080:80").unwrap();
        assert_eq!(f.host_addr, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!(parse_forward("0:22").unwrap().host_port, 0);
        for bad in [
            "", "0", "x", "80:", ":80", "70000", "8080:0", "a.b:1:2", "1:2:3:4",
        ] {
            assert!(parse_forward(bad).is_err(), "{bad}");
        }
    }
}
