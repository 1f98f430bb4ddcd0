//! The per-VM supervisor: a detached process that is the parent of the VMM,
//! owns its control socket and the agent channel, and serves many clients on
//! a unix socket in the VM directory. Also the client side used by the
//! library to talk to it.

/// Timestamped line on the supervisor's log (its stderr).
macro_rules! log {
    ($($t:tt)*) => {{
        let now = crate::state::now_ms();
        eprintln!("{}.{:03} {}", now / 1000, now % 1000, format!($($t)*));
    }};
}

mod agent_link;
mod client;
mod clients;
mod console;
mod daemon;
mod outbox;
pub mod ports;
mod routes;
mod server;
mod sock;
pub mod tunnel;

pub use client::{
    AgentStream, ClientError, ExecEvent, ExecStream, StreamWriter, SupervisorClient, GUEST_GRACE,
};
pub use daemon::{main_entry, spawn, SpawnError};
pub use sock::{bind_in_dir, connect_in_dir};
