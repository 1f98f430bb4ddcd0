//! Mapping of client stream ids onto the single agent connection.

use std::collections::HashMap;

/// Client id the supervisor uses for its own requests (shutdown).
pub const SUPERVISOR_CLIENT: u64 = 0;
/// Most open streams per client: bounds what one client can make us hold.
pub const MAX_STREAMS_PER_CLIENT: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub client: u64,
    pub stream: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    Duplicate(u32),
    ReservedStream,
    TooMany,
}

impl std::fmt::Display for RouteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteError::Duplicate(s) => write!(f, "stream {s} is already in use"),
            RouteError::ReservedStream => write!(f, "stream 0 is reserved for the connection"),
            RouteError::TooMany => write!(f, "too many open streams on this connection"),
        }
    }
}

#[derive(Debug, Default)]
pub struct Routes {
    next: u32,
    by_global: HashMap<u32, Route>,
    by_client: HashMap<(u64, u32), u32>,
    per_client: HashMap<u64, usize>,
    /// Data bytes the guest may still send on each open route (its credit,
    /// as granted through us; docs/protocol.md).
    credit: HashMap<u32, u64>,
}

/// The guest sent data past its credit on a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverCredit {
    pub sent: u64,
    pub credit: u64,
}

impl Routes {
    /// Opens a route for `(client, stream)` and returns its agent stream id.
    pub fn open(&mut self, client: u64, stream: u32) -> Result<u32, RouteError> {
        if stream == smolvm_proto::CONTROL_STREAM {
            return Err(RouteError::ReservedStream);
        }
        if self.by_client.contains_key(&(client, stream)) {
            return Err(RouteError::Duplicate(stream));
        }
        let n = self.per_client.entry(client).or_default();
        if *n >= MAX_STREAMS_PER_CLIENT {
            return Err(RouteError::TooMany);
        }
        *n += 1;
        let global = loop {
            self.next = self.next.wrapping_add(1);
            if self.next != 0 && !self.by_global.contains_key(&self.next) {
                break self.next;
            }
        };
        self.by_global.insert(global, Route { client, stream });
        self.by_client.insert((client, stream), global);
        self.credit
            .insert(global, u64::from(smolvm_proto::STREAM_WINDOW));
        Ok(global)
    }

    /// A client grants `bytes` on route `global`: returns what to pass on
    /// to the guest, clipped so the outstanding credit never exceeds the
    /// window (what we may have to buffer for the client).
    pub fn grant(&mut self, global: u32, bytes: u32) -> u32 {
        let Some(c) = self.credit.get_mut(&global) else {
            return 0;
        };
        let room = u64::from(smolvm_proto::STREAM_WINDOW).saturating_sub(*c);
        let pass = u64::from(bytes).min(room);
        *c += pass;
        u32::try_from(pass).unwrap_or(0)
    }

    /// The guest sent `cost` data bytes on route `global`.
    pub fn spend(&mut self, global: u32, cost: u64) -> Result<(), OverCredit> {
        let Some(c) = self.credit.get_mut(&global) else {
            return Ok(()); // not ours to count (closed meanwhile)
        };
        match c.checked_sub(cost) {
            Some(left) => {
                *c = left;
                Ok(())
            }
            None => Err(OverCredit {
                sent: cost,
                credit: *c,
            }),
        }
    }

    pub fn global(&self, client: u64, stream: u32) -> Option<u32> {
        self.by_client.get(&(client, stream)).copied()
    }

    pub fn lookup(&self, global: u32) -> Option<Route> {
        self.by_global.get(&global).copied()
    }

    pub fn close(&mut self, global: u32) -> Option<Route> {
        let r = self.by_global.remove(&global)?;
        self.credit.remove(&global);
        self.by_client.remove(&(r.client, r.stream));
        if let Some(n) = self.per_client.get_mut(&r.client) {
            *n = n.saturating_sub(1);
        }
        Some(r)
    }

    /// Removes every route of `client`; returns their agent stream ids.
    pub fn drain_client(&mut self, client: u64) -> Vec<u32> {
        let globals: Vec<u32> = self
            .by_global
            .iter()
            .filter(|(_, r)| r.client == client)
            .map(|(g, _)| *g)
            .collect();
        for g in &globals {
            self.close(*g);
        }
        self.per_client.remove(&client);
        globals
    }

    /// Removes every route.
    pub fn drain_all(&mut self) -> Vec<(u32, Route)> {
        let all: Vec<(u32, Route)> = self.by_global.drain().collect();
        self.credit.clear();
        self.by_client.clear();
        self.per_client.clear();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_get_distinct_agent_streams() {
        let mut r = Routes::default();
        let a = r.open(1, 5).unwrap();
        let b = r.open(2, 5).unwrap();
        assert_ne!(a, b);
        assert_eq!(
            r.lookup(a),
            Some(Route {
                client: 1,
                stream: 5
            })
        );
        assert_eq!(r.global(2, 5), Some(b));
        assert_eq!(r.open(1, 5), Err(RouteError::Duplicate(5)));
        assert_eq!(r.open(1, 0), Err(RouteError::ReservedStream));
        assert_eq!(
            r.close(a),
            Some(Route {
                client: 1,
                stream: 5
            })
        );
        assert!(r.open(1, 5).is_ok());
        assert_eq!(r.drain_client(1).len(), 1);
        assert_eq!(r.by_global.len(), 1);
    }

    #[test]
    fn credit_is_counted_and_clipped_to_the_window() {
        let w = u64::from(smolvm_proto::STREAM_WINDOW);
        let mut r = Routes::default();
        let g = r.open(1, 1).unwrap();
        assert_eq!(r.grant(g, 10), 0, "a full window takes no more");
        assert_eq!(r.spend(g, w - 100), Ok(()));
        assert_eq!(r.grant(g, u32::MAX), u32::try_from(w - 100).unwrap());
        assert_eq!(r.spend(g, w), Ok(()));
        assert_eq!(r.spend(g, 1), Err(OverCredit { sent: 1, credit: 0 }));
        r.close(g);
        assert_eq!(r.spend(g, 1 << 40), Ok(()), "closed routes are not counted");
        assert_eq!(r.grant(g, 5), 0);
    }

    #[test]
    fn per_client_limit_and_wraparound() {
        let mut r = Routes::default();
        for s in 1..=MAX_STREAMS_PER_CLIENT as u32 {
            r.open(7, s).unwrap();
        }
        assert_eq!(r.open(7, 99_999), Err(RouteError::TooMany));
        assert!(r.open(8, 1).is_ok());
        r.drain_all();
        r.next = u32::MAX - 1;
        let x = r.open(1, 1).unwrap();
        let y = r.open(1, 2).unwrap();
        assert_eq!(x, u32::MAX);
        assert_eq!(y, 1, "id 0 is skipped on wrap");
    }
}
