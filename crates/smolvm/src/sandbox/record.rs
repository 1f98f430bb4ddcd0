//! A VM's row as the truth: crash detection (a live state whose processes
//! died becomes `error`), info, and the messages that say what to run.

use crate::config::SandboxConfig;
use crate::error::{Error, Result};
use crate::state::{ProcessId, Store, VmRecord, VmState};
use serde::Serialize;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long to wait for a supervisor to record a VMM exit it noticed.
const SETTLE: Duration = Duration::from_secs(3);

/// What `info` / `list` report.
#[derive(Debug, Clone, Serialize)]
pub struct VmInfo {
    pub id: String,
    pub state: VmState,
    pub image: String,
    pub memory_mib: u32,
    pub cpus: u32,
    pub network: bool,
    /// What the guest may reach (docs/network.md).
    pub egress: crate::config::EgressPolicy,
    /// Root disk size asked for at create (the image's size when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_size_mib: Option<u64>,
    /// Environment for every command in this VM.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub env: std::collections::BTreeMap<String, String>,
    pub accel: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub supervisor_pid: Option<u32>,
    pub vmm_pid: Option<u32>,
    pub last_error: Option<String>,
    pub boot_count: i64,
    pub vm_dir: PathBuf,
}

pub(super) fn store() -> Result<Store> {
    Ok(Store::open()?)
}

pub(super) fn config_of(rec: &VmRecord) -> Result<SandboxConfig> {
    serde_json::from_str(&rec.config).map_err(|e| {
        Error::Store(crate::state::StoreError::Corrupt {
            id: rec.id.clone(),
            reason: e.to_string(),
        })
    })
}

pub(super) fn info_of(rec: &VmRecord) -> VmInfo {
    let cfg = config_of(rec).unwrap_or_default();
    VmInfo {
        id: rec.id.clone(),
        state: rec.state,
        image: cfg.image,
        memory_mib: cfg.memory_mib,
        cpus: cfg.cpus,
        network: cfg.network,
        egress: cfg.egress,
        disk_size_mib: cfg.disk_size_mib,
        env: cfg.env,
        accel: rec.accel.clone(),
        created_at: rec.created_at,
        updated_at: rec.updated_at,
        supervisor_pid: rec.supervisor.map(|p| p.pid),
        vmm_pid: rec.vmm.map(|p| p.pid),
        last_error: rec.last_error.clone(),
        boot_count: rec.boot_count,
        vm_dir: crate::paths::vm_dir(&rec.id),
    }
}

/// Reads a VM's row and corrects it when its processes died without saying
/// so: a `running`/`paused` VM whose supervisor is gone is `error`.
pub(super) fn refreshed(id: &str) -> Result<VmRecord> {
    let s = store()?;
    let rec = s.get(id)?.ok_or_else(|| Error::NotFound(id.to_string()))?;
    if !rec.state.is_live() {
        return Ok(rec);
    }
    let sup_alive = rec.supervisor.map(|p| p.is_alive()).unwrap_or(false);
    let vmm_alive = rec.vmm.map(|p| p.is_alive()).unwrap_or(false);
    if sup_alive && vmm_alive {
        return Ok(rec);
    }
    if sup_alive {
        // The supervisor saw its VMM die and is recording why: give it a moment.
        let start = Instant::now();
        while start.elapsed() < SETTLE {
            std::thread::sleep(Duration::from_millis(20));
            let r = s.get(id)?.ok_or_else(|| Error::NotFound(id.to_string()))?;
            if !r.state.is_live() {
                return Ok(r);
            }
        }
    }
    let why = match (rec.supervisor, sup_alive) {
        (Some(p), false) => format!("supervisor (pid {}) died unexpectedly", p.pid),
        (None, _) => "no supervisor recorded for a live VM".to_string(),
        _ => format!(
            "VMM (pid {}) died and its supervisor did not record it",
            rec.vmm.map(|p| p.pid).unwrap_or(0)
        ),
    };
    let moved = s.transition(
        id,
        &[VmState::Running, VmState::Paused],
        VmState::Error,
        Some(&why),
    )?;
    if !moved {
        // Someone else changed it meanwhile; their view wins.
        return s.get(id)?.ok_or_else(|| Error::NotFound(id.to_string()));
    }
    // Nothing may outlive a dead supervisor: the VMM dies with it (pdeathsig),
    // but make sure.
    if let Some(v) = rec.vmm.filter(|v| v.is_alive()) {
        crate::sys::kill(v, libc::SIGKILL);
    }
    // What a dead supervisor could not clean up.
    crate::backend::VmDir::of(id).remove_runtime();
    let _ = s.set_processes(id, None, None, None);
    s.get(id)?.ok_or_else(|| Error::NotFound(id.to_string()))
}

pub(super) async fn refresh(id: &str) -> Result<VmRecord> {
    let id = id.to_string();
    tokio::task::spawn_blocking(move || refreshed(&id))
        .await
        .map_err(|e| Error::io("state task failed", std::io::Error::other(e.to_string())))?
}

pub(super) fn invalid(id: &str, state: VmState, hint: impl Into<String>) -> Error {
    Error::InvalidState {
        id: id.to_string(),
        state,
        hint: hint.into(),
    }
}

/// The supervisor recorded for `id` right now.
pub(super) fn current_supervisor(id: &str) -> Option<ProcessId> {
    store()
        .ok()
        .and_then(|s| s.get(id).ok().flatten())
        .and_then(|r| r.supervisor)
}

/// Waits until `sup` (captured before asking it to end: it clears its own
/// record on the way out) is gone, killing it after 15 s.
pub(super) async fn wait_supervisor_gone(sup: Option<ProcessId>) {
    let Some(sup) = sup else { return };
    if !crate::sys::wait_exit(sup, Duration::from_secs(15)).await {
        crate::sys::kill(sup, libc::SIGKILL);
    }
}
