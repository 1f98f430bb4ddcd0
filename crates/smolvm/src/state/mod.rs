//! The state store: SQLite inventory of VMs (the only module that writes SQL)
//! and process identity checks.

mod process;
mod store;

pub use process::{proc_start_time, ProcessId};
pub use store::{now_ms, random_id, Store, StoreError, VmRecord, VmState};
