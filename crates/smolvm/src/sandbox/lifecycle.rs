//! Create, start, stop, pause, resume, delete; reconnect by id; crash truth.

use super::boot::ensure_image;
use super::lock::VmLock;
use super::record::{config_of, info_of, refresh, store, wait_supervisor_gone, VmInfo};
use super::transitions::{plan, Action, Op};
use crate::backend::VmDir;
use crate::config::SandboxConfig;
use crate::error::{Error, Result};
use crate::image::ImageEvent;
use crate::state::VmState;
use crate::supervisor::SupervisorClient;
use smolvm_proto::supervisor::{ControlError, ControlErrorKind, ControlRequest, ControlResponse};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Progress of long operations (image build, boot), for bars and logs.
#[derive(Debug, Clone)]
pub enum Progress {
    Image(ImageEvent),
    Step(String),
}

pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// A handle on one VM. Dropping or `close`-ing it leaves the VM as it is.
pub struct Sandbox {
    pub(super) id: String,
    pub(super) vm_dir: VmDir,
    pub(super) config: SandboxConfig,
    client: Mutex<Option<SupervisorClient>>,
    pub(super) progress: Option<ProgressFn>,
    pub(super) last_boot: Mutex<Option<super::BootTimings>>,
    /// When the VM this handle is on was made: a VM made later under the
    /// same name (after this one was removed) is another VM, which this
    /// handle must never act on.
    pub(super) created_at: i64,
}

impl Sandbox {
    /// Validates `config`, makes sure its image exists (building it when
    /// missing, with progress), and creates the VM (state `created`).
    pub async fn create(config: SandboxConfig) -> Result<Sandbox> {
        Self::create_with_progress(config, None).await
    }

    pub async fn create_with_progress(
        config: SandboxConfig,
        progress: Option<ProgressFn>,
    ) -> Result<Sandbox> {
        Ok(Self::create_inner(config, progress, None).await?.0)
    }

    /// Creates a VM whose disk is a new layer over the image (`from`
    /// `None`) or over the frozen disk of the snapshot directory `from`.
    /// Returns the VM's lock, still held.
    pub(super) async fn create_inner(
        mut config: SandboxConfig,
        progress: Option<ProgressFn>,
        from: Option<&std::path::Path>,
    ) -> Result<(Sandbox, VmLock)> {
        config.validate()?;
        config.egress = crate::egress::normalize(&config.egress)?;
        // A new VM with egress `off` gets no NIC at all (a restore keeps
        // the snapshot's device set).
        if from.is_none() && config.egress == crate::config::EgressPolicy::Off {
            config.network = false;
        }
        let image = match from {
            Some(_) => None,
            None => Some(ensure_image(&config.image, progress.clone()).await?),
        };
        if let Some(image) = &image {
            let image_mib = std::fs::metadata(&image.rootfs)
                .map_err(|e| Error::io(format!("cannot read {}", image.rootfs.display()), e))?
                .len()
                .div_ceil(1024 * 1024);
            if let Some(size) = config.disk_size_mib {
                if size < image_mib {
                    return Err(crate::config::ConfigError::DiskTooSmall {
                        size,
                        min: image_mib,
                        image: config.image.clone(),
                    }
                    .into());
                }
            }
        }
        let json = serde_json::to_string(&config)
            .map_err(|e| Error::io("cannot encode the config", e.into()))?;
        // Lock the id before its row exists, so no other process can start
        // or delete the VM before its disk is made.
        let (id, lock) = loop {
            let candidate = config.name.clone().unwrap_or_else(crate::state::random_id);
            let lock = VmLock::acquire(&candidate).await?;
            match store().and_then(|s| Ok(s.insert_new(Some(&candidate), &json)?)) {
                Ok(id) => break (id, lock),
                // The lock file is the existing VM's: it stays.
                Err(Error::Store(crate::state::StoreError::AlreadyExists(_)))
                    if config.name.is_none() =>
                {
                    continue
                }
                Err(e @ Error::Store(crate::state::StoreError::AlreadyExists(_))) => return Err(e),
                Err(e) => {
                    // No VM of that id exists: no lock file may stay either
                    // (unlinked while held, as `delete` does).
                    let _ = std::fs::remove_file(crate::paths::lock_path(&candidate));
                    return Err(e);
                }
            }
        };
        let vm_dir = VmDir::of(&id);
        // Undoes the row and directory if this future fails or is dropped
        // (a caller's timeout, Ctrl-C) before the VM is complete.
        let mut undo = UndoCreate {
            id: Some(id.clone()),
            dir: vm_dir.path().to_path_buf(),
        };
        let backend = crate::backend::get(config.backend);
        let made = async {
            crate::private::dir_all(&vm_dir)
                .map_err(|e| Error::io(format!("cannot create {}", vm_dir.display()), e))?;
            let disk = vm_dir.disk();
            let Some(image) = &image else {
                // Over a snapshot's frozen disk, at its size.
                let snap = from.unwrap_or(std::path::Path::new(""));
                let frozen = snap.join(crate::snapshot::files::DISK);
                let size = crate::snapshot::qcow2::header(&frozen)
                    .map_err(|e| Error::io(format!("cannot read {}", frozen.display()), e))?
                    .virtual_size;
                return super::snapshot::layer_over(config.backend, snap, &disk, size).await;
            };
            // Bounded by `validate` (MAX_DISK_MIB): cannot overflow.
            let size = config.disk_size_mib.map(|m| m.saturating_mul(1024 * 1024));
            // Pin the base: a hard link survives an image rebuild swapping a
            // new rootfs into the cache (files there are never edited in place).
            let base = vm_dir.base_disk();
            let base = match std::fs::hard_link(&image.rootfs, &base) {
                Ok(()) => {
                    // Caches made before images were private: tighten the
                    // (shared) inode.
                    let _ = crate::private::tighten(&base, crate::private::FILE_MODE);
                    base
                }
                Err(e) => {
                    tracing::debug!(vm = %id, "cannot hard-link the image rootfs ({e}); backing the disk by the cache path");
                    image.rootfs.clone()
                }
            };
            backend
                .create_disk(&base, &disk, size)
                .await
                .map_err(|e| match e.missing_tool {
                    Some(m) => Error::Tool(m),
                    None => Error::io(
                        format!("VM '{id}'"),
                        std::io::Error::other(e.message),
                    ),
                })
        }
        .await;
        made?;
        let created_at = store()?
            .get(&id)?
            .map(|r| r.created_at)
            .ok_or_else(|| Error::NotFound(id.clone()))?;
        undo.id = None;
        let sbx = Sandbox {
            id,
            vm_dir,
            config,
            client: Mutex::new(None),
            progress,
            last_boot: Mutex::new(None),
            created_at,
        };
        Ok((sbx, lock))
    }

    /// A handle on an existing VM, from any process.
    pub async fn from_id(id: &str) -> Result<Sandbox> {
        // Not a name any VM can have: say so, rather than "not found".
        crate::config::validate_name(id)?;
        let rec = refresh(id).await?;
        let config = config_of(&rec)?;
        Ok(Sandbox {
            id: rec.id.clone(),
            vm_dir: VmDir::of(&rec.id),
            config,
            client: Mutex::new(None),
            progress: None,
            last_boot: Mutex::new(None),
            created_at: rec.created_at,
        })
    }

    /// The VM's record, crash truth applied; `NotFound` once this VM is
    /// gone, even when another VM has taken its name since.
    pub(super) async fn record(&self) -> Result<crate::state::VmRecord> {
        let rec = refresh(&self.id).await?;
        if rec.created_at != self.created_at {
            return Err(Error::NotFound(self.id.clone()));
        }
        Ok(rec)
    }

    /// Every VM in the store (with crash truth applied).
    pub async fn list() -> Result<Vec<VmInfo>> {
        let recs = store()?.list()?;
        let mut out = Vec::with_capacity(recs.len());
        for r in recs {
            match refresh(&r.id).await {
                Ok(r) => out.push(info_of(&r)),
                Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    pub fn set_progress(&mut self, progress: Option<ProgressFn>) {
        self.progress = progress;
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    pub fn vm_dir(&self) -> &VmDir {
        &self.vm_dir
    }

    /// Timings of the last boot done through this handle.
    pub fn last_boot(&self) -> Option<super::BootTimings> {
        self.last_boot.lock().ok().and_then(|g| g.clone())
    }

    pub async fn status(&self) -> Result<VmState> {
        Ok(self.record().await?.state)
    }

    /// Re-reads the VM from the store, applying crash truth (a VM whose
    /// supervisor or VMM died is reported as `error`, never `running`).
    pub async fn refresh(&self) -> Result<VmInfo> {
        Ok(info_of(&self.record().await?))
    }

    pub async fn info(&self) -> Result<VmInfo> {
        Ok(info_of(&self.record().await?))
    }

    pub(super) fn step(&self, s: impl Into<String>) {
        if let Some(p) = &self.progress {
            p(&Progress::Step(s.into()));
        }
    }

    /// Boots the VM (created or stopped), resumes it (paused), or does
    /// nothing (running). Waits until the guest agent answers.
    pub async fn start(&self, boot_timeout: Duration) -> Result<()> {
        let _lock = VmLock::acquire(&self.id).await?;
        let rec = self.record().await?;
        match plan(Op::Start, &self.id, rec.state, rec.last_error.as_deref())? {
            Action::Nothing | Action::Proceed => Ok(()),
            Action::Resume => self.resume_locked().await,
            Action::Boot => {
                if self.adopt_interrupted_boot(&rec, boot_timeout).await? {
                    return Ok(());
                }
                self.boot(rec.state, boot_timeout).await?;
                if self.config.ssh {
                    // sshd at boot, by config: up (and its host key
                    // pinned) before the start returns.
                    self.step("starting sshd");
                    self.ensure_ssh().await?;
                }
                Ok(())
            }
        }
    }

    /// Graceful shutdown through the agent; the VMM is killed after
    /// `timeout`. No-op for created, stopped and error VMs.
    pub async fn stop(&self, timeout: Duration) -> Result<()> {
        let _lock = VmLock::acquire(&self.id).await?;
        let rec = self.record().await?;
        if plan(Op::Stop, &self.id, rec.state, rec.last_error.as_deref())? == Action::Nothing {
            // Nothing runs, unless a start was interrupted mid-boot.
            return self.end_interrupted_boot(&rec).await;
        }
        self.step("stopping");
        self.close_ssh_master().await;
        let r = match self.open_connection().await {
            Ok(client) => {
                client
                    .control(ControlRequest::Stop {
                        timeout_ms: crate::sys::millis(timeout),
                    })
                    .await
            }
            Err(Error::Client { source, .. }) => Err(source),
            Err(e) => return Err(e),
        };
        self.forget_client();
        let mut note = None;
        match r {
            Ok(ControlResponse::Ok) | Err(crate::supervisor::ClientError::Closed) => {}
            Ok(ControlResponse::Error(e)) => return Err(Error::from_control(&self.id, e)),
            Ok(_) => {}
            Err(source) => {
                // The supervisor does not answer (hung, or stopped with
                // SIGSTOP): a stop must still stop. Kill it and its VMM by
                // identity; the disk keeps what the guest had flushed.
                tracing::warn!(vm = %self.id, "supervisor not answering ({source}); killing it");
                for p in [rec.supervisor, rec.vmm].into_iter().flatten() {
                    crate::sys::kill(p, libc::SIGKILL);
                }
                note = Some(format!(
                    "stopped by force: its supervisor did not answer ({source})"
                ));
            }
        }
        wait_supervisor_gone(rec.supervisor).await;
        if let Some(v) = rec.vmm {
            crate::sys::wait_exit(v, Duration::from_secs(5)).await;
        }
        self.vm_dir.remove_runtime();
        let s = store()?;
        s.transition(
            &self.id,
            &[VmState::Running, VmState::Paused],
            VmState::Stopped,
            note.as_deref(),
        )?;
        let _ = s.set_processes(&self.id, None, None, None);
        Ok(())
    }

    /// Stops the vCPUs; the VMM and all guest state stay.
    pub async fn pause(&self) -> Result<()> {
        let _lock = VmLock::acquire(&self.id).await?;
        let rec = self.record().await?;
        plan(Op::Pause, &self.id, rec.state, rec.last_error.as_deref())?;
        self.control_ok(ControlRequest::Pause).await?;
        store()?.set_state(&self.id, VmState::Paused, None)?;
        Ok(())
    }

    /// Continues a paused VM exactly where it was.
    pub async fn resume(&self) -> Result<()> {
        let _lock = VmLock::acquire(&self.id).await?;
        self.resume_locked().await
    }

    pub(super) async fn resume_locked(&self) -> Result<()> {
        let rec = self.record().await?;
        plan(Op::Resume, &self.id, rec.state, rec.last_error.as_deref())?;
        self.control_ok(ControlRequest::Resume).await?;
        store()?.set_state(&self.id, VmState::Running, None)?;
        Ok(())
    }

    /// Removes the VM and everything it has on disk (stopping it first).
    /// The handle stays, but every later operation on it is `NotFound`.
    pub async fn delete(&self) -> Result<()> {
        self.delete_locked().await?;
        // Retired snapshots only this VM was layered on go with it (after
        // its lock is released: locks are taken VM first, then snapshots).
        super::snapshot::collect_snapshots().await;
        Ok(())
    }

    async fn delete_locked(&self) -> Result<()> {
        let _lock = VmLock::acquire(&self.id).await?;
        let rec = match refresh(&self.id).await {
            Ok(r) if r.created_at == self.created_at => Some(r),
            // Another VM has this name now: ours is gone, theirs stays.
            Ok(_) => return Ok(()),
            Err(Error::NotFound(_)) => None,
            Err(e) => return Err(e),
        };
        if let Some(rec) = &rec {
            if rec.state.is_live() {
                if let Ok(c) = self.open_connection().await {
                    let _ = c.control(ControlRequest::Kill).await;
                }
                self.forget_client();
                wait_supervisor_gone(rec.supervisor).await;
            }
            // Whatever is left of its processes goes too.
            for p in [rec.vmm, rec.supervisor].into_iter().flatten() {
                if p.is_alive() {
                    crate::sys::kill(p, libc::SIGKILL);
                }
            }
        }
        if self.vm_dir.exists() {
            std::fs::remove_dir_all(&self.vm_dir)
                .map_err(|e| Error::io(format!("cannot remove {}", self.vm_dir.display()), e))?;
        }
        store()?.delete(&self.id)?;
        let _ = std::fs::remove_file(crate::paths::lock_path(&self.id));
        Ok(())
    }

    /// Releases this handle; the VM keeps its state.
    pub fn close(self) {}

    /// The handle's shared connection (commands, pings): cached.
    pub(super) async fn connect(&self) -> Result<SupervisorClient> {
        // A connection to a supervisor that has since exited (the VM was
        // stopped and started again, maybe by another process) is useless.
        if let Some(c) = self.client.lock().ok().and_then(|g| g.clone()) {
            if !c.is_closed() {
                return Ok(c);
            }
        }
        let c = self.open_connection().await?;
        if let Ok(mut g) = self.client.lock() {
            *g = Some(c.clone());
        }
        Ok(c)
    }

    /// A connection of its own, for lifecycle requests: an `ExecStream`
    /// of this handle that nobody drains must not hold up a stop.
    pub(super) async fn open_connection(&self) -> Result<SupervisorClient> {
        let c = SupervisorClient::connect(&self.vm_dir)
            .await
            .map_err(|source| Error::Client {
                id: self.id.clone(),
                source,
            })?;
        if c.vm_id != self.id {
            // A socket in our VM's directory served by another VM's
            // supervisor: never talk to it.
            return Err(Error::Client {
                id: self.id.clone(),
                source: crate::supervisor::ClientError::Unexpected,
            });
        }
        Ok(c)
    }

    pub(super) fn forget_client(&self) {
        if let Ok(mut g) = self.client.lock() {
            *g = None;
        }
    }

    pub(super) async fn control_ok(&self, req: ControlRequest) -> Result<()> {
        let c = self.open_connection().await?;
        match c.control(req).await {
            Ok(ControlResponse::Ok) => Ok(()),
            Ok(ControlResponse::Error(e)) => Err(Error::from_control(&self.id, e)),
            Ok(o) => Err(Error::from_control(
                &self.id,
                ControlError::new(ControlErrorKind::Other, format!("unexpected answer {o:?}")),
            )),
            Err(source) => {
                self.forget_client();
                Err(Error::Client {
                    id: self.id.clone(),
                    source,
                })
            }
        }
    }
}

/// Removes a half-created VM (its directory and row) unless disarmed.
pub(super) struct UndoCreate {
    pub(super) id: Option<String>,
    pub(super) dir: PathBuf,
}

impl Drop for UndoCreate {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let _ = std::fs::remove_dir_all(&self.dir);
            if let Ok(s) = store() {
                let _ = s.delete(&id);
            }
            // Still held by the failed create (dropped after this): unlink
            // it as `delete` does, so no lock file outlives the VM.
            let _ = std::fs::remove_file(crate::paths::lock_path(&id));
        }
    }
}
