//! Booting: the accelerator, the launch spec, the supervisor, waiting for
//! the agent; and taking over (or ending) a boot an interrupted start left.

use super::lifecycle::{ProgressFn, Sandbox};
use super::record::{current_supervisor, store, wait_supervisor_gone};
use super::Progress;
use crate::backend::{LaunchSpec, ResolvedAccel};
use crate::error::{chain, Error, Result};
use crate::image::ImageEvent;
use crate::state::{VmRecord, VmState};
use crate::supervisor::SupervisorClient;
use smolvm_proto::supervisor::{
    ControlError, ControlErrorKind, ControlRequest, ControlResponse, VmRunState,
};
use std::time::Duration;

impl Sandbox {
    /// A live supervisor recorded for a VM that is not live, seen under the
    /// VM lock, was left by a start whose process died before the guest was
    /// ready (no other start can be running). Its boot goes on: wait for it
    /// as that start would have, and return true. When it cannot be reached
    /// or is on its way out, end it (so that a second VMM never opens the
    /// same disk) and return false: a fresh boot follows.
    pub(super) async fn adopt_interrupted_boot(
        &self,
        rec: &VmRecord,
        boot_timeout: Duration,
    ) -> Result<bool> {
        if !rec.supervisor.is_some_and(|p| p.is_alive()) {
            return Ok(false);
        }
        tracing::info!(vm = %self.id, "a start was interrupted; waiting for its boot");
        if let Ok(client) = self.open_connection().await {
            if let Ok(ControlResponse::Status(st)) = client.control(ControlRequest::Status).await {
                if matches!(st.state, VmRunState::Booting | VmRunState::Running) {
                    self.step("waiting for the boot of an interrupted start");
                    self.wait_ready(rec.state, &client, boot_timeout).await?;
                    return Ok(true);
                }
            }
        }
        self.end_interrupted_boot(rec).await?;
        Ok(false)
    }

    /// Kills what an interrupted start left running (see
    /// `adopt_interrupted_boot`); the VM keeps its recorded state.
    pub(super) async fn end_interrupted_boot(&self, rec: &VmRecord) -> Result<()> {
        if !rec.supervisor.is_some_and(|p| p.is_alive()) {
            return Ok(());
        }
        if let Ok(c) = self.open_connection().await {
            let _ = c.control(ControlRequest::Kill).await;
        }
        self.forget_client();
        wait_supervisor_gone(rec.supervisor).await;
        if let Some(v) = rec.vmm.filter(|v| v.is_alive()) {
            crate::sys::kill(v, libc::SIGKILL);
        }
        let s = store()?;
        s.set_state(&self.id, rec.state, None)?;
        s.set_processes(&self.id, None, None, None)?;
        Ok(())
    }

    pub(super) async fn boot(&self, prior: VmState, boot_timeout: Duration) -> Result<()> {
        let image = ensure_image(&self.config.image, self.progress.clone()).await?;
        let requested = if self.config.accel == crate::Accel::Auto {
            crate::Accel::from_env()?
        } else {
            self.config.accel
        };
        let (kernel, initrd) = (image.kernel.clone(), image.initramfs.clone());
        let backend = self.config.backend;
        self.step("choosing the accelerator");
        let verdict = tokio::task::spawn_blocking(move || {
            crate::backend::get(backend).resolve_accel(requested, &kernel, &initrd)
        })
        .await
        .map_err(|e| {
            Error::io(
                "accelerator probe failed",
                std::io::Error::other(e.to_string()),
            )
        })?;
        tracing::info!(vm = %self.id, accel = %verdict.accel, reason = %verdict.reason, "accelerator");
        let mut spec = LaunchSpec {
            id: self.id.clone(),
            vm_dir: self.vm_dir.path().to_path_buf(),
            kernel: image.kernel.clone(),
            initramfs: image.initramfs.clone(),
            disk: self.vm_dir.disk(),
            memory_mib: self.config.memory_mib,
            cpus: self.config.cpus,
            accel: verdict.accel,
            backend,
            network: self.config.network,
            egress: self.launch_egress().await,
            grow_root: self.config.disk_size_mib.is_some(),
            restore: None,
            ports: self.config.ports.clone(),
        };
        self.relative_base();
        // A sandbox that never ran starts from its shape's boot snapshot
        // when there is one (and takes it when there is not).
        // Only over the untouched disk `create` made: a disk someone wrote
        // to is booted as it is, and leaves no warm snapshot.
        let warm = if prior == VmState::Created && !self.config.cold && self.disk_is_fresh() {
            super::snapshot::warm_key(&self.config, &image, &spec, &self.vm_dir).ok()
        } else {
            None
        };
        if let Some(key) = &warm {
            match self.warm_start(key, &mut spec, prior, boot_timeout).await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(vm = %self.id, "warm start failed ({}); booting cold", chain(&e));
                    spec.restore = None;
                }
            }
        }
        self.launch_and_wait(
            &spec,
            prior,
            boot_timeout,
            format!("booting ({} accelerator)", verdict.accel),
        )
        .await?;
        if let Some(key) = &warm {
            self.leave_warm_snapshot(key).await;
        }
        if verdict.accel == ResolvedAccel::Tcg {
            tracing::debug!(vm = %self.id, "running under TCG: {}", verdict.reason);
        }
        Ok(())
    }

    /// A disk made by an older smolvm names its base by absolute path:
    /// name it relatively (the VMM is not running), as new disks do.
    fn relative_base(&self) {
        if let Err(e) = self.vm_dir.settle_disk() {
            tracing::warn!(vm = %self.id, "cannot settle the disk layers: {e}");
        }
        let disk = self.vm_dir.disk();
        let base = self.vm_dir.base_disk();
        if let Ok(h) = crate::snapshot::qcow2::header(&disk) {
            if h.backing.as_deref().map(std::path::Path::new) == Some(base.as_path()) {
                let _ = crate::snapshot::qcow2::set_backing_in_place(
                    &disk,
                    crate::backend::files::BASE_DISK,
                );
            }
        }
    }

    /// Writes `spec`, starts the supervisor and waits for the guest.
    pub(super) async fn launch_and_wait(
        &self,
        spec: &LaunchSpec,
        prior: VmState,
        boot_timeout: Duration,
        step: String,
    ) -> Result<()> {
        let spec_path = self.vm_dir.launch_spec();
        let bytes = serde_json::to_vec_pretty(&spec)
            .map_err(|e| Error::io("cannot encode the launch spec", e.into()))?;
        write_atomic(&spec_path, &bytes)?;
        let s = store()?;
        s.begin_boot(&self.id)?;
        self.step(step);
        let dir = self.vm_dir.path().to_path_buf();
        let spawned = crate::supervisor::spawn(&dir).await;
        if let Err(source) = spawned {
            let e = match source {
                // The supervisor ran and says why the VM did not start
                // (its VMM died, a host tool is missing): that, typed.
                crate::supervisor::SpawnError::Failed(c) => Error::from_control(&self.id, c),
                source => Error::Supervisor {
                    id: self.id.clone(),
                    source,
                },
            };
            s.set_state(&self.id, prior, Some(&chain(&e)))?;
            return Err(e);
        }
        let client = self.connect().await?;
        self.wait_ready(prior, &client, boot_timeout).await
    }

    /// Waits for the booting guest's agent; records `running`, or ends the
    /// boot and records `prior` with the reason.
    async fn wait_ready(
        &self,
        prior: VmState,
        client: &SupervisorClient,
        boot_timeout: Duration,
    ) -> Result<()> {
        let s = store()?;
        let resp = match client
            .control(ControlRequest::WaitReady {
                timeout_ms: crate::sys::millis(boot_timeout),
            })
            .await
        {
            Ok(r) => r,
            Err(source) => {
                // The supervisor is wedged or gone: end this boot so it cannot
                // come up later behind the error we return.
                if let Some(sup) = current_supervisor(&self.id).filter(|p| p.is_alive()) {
                    crate::sys::kill(sup, libc::SIGKILL);
                    wait_supervisor_gone(Some(sup)).await;
                }
                self.forget_client();
                let e = Error::Client {
                    id: self.id.clone(),
                    source,
                };
                s.set_state(&self.id, prior, Some(&chain(&e)))?;
                let _ = s.set_processes(&self.id, None, None, None);
                return Err(e);
            }
        };
        match resp {
            ControlResponse::Ready(info) => {
                s.set_state(&self.id, VmState::Running, None)?;
                if let Ok(mut g) = self.last_boot.lock() {
                    *g = Some(info.into());
                }
                Ok(())
            }
            other => {
                let err = match other {
                    ControlResponse::Error(e) => e,
                    o => ControlError::new(
                        ControlErrorKind::BootFailed,
                        format!("unexpected answer {o:?}"),
                    ),
                };
                let sup = current_supervisor(&self.id);
                let _ = client.control(ControlRequest::Kill).await;
                self.forget_client();
                wait_supervisor_gone(sup).await;
                s.set_state(&self.id, prior, Some(&err.message))?;
                let _ = s.set_processes(&self.id, None, None, None);
                // Whatever the supervisor said, this start failed to boot.
                Err(match err.kind {
                    ControlErrorKind::AgentIncompatible => Error::from_control(&self.id, err),
                    _ => Error::Boot {
                        id: self.id.clone(),
                        timed_out: err.kind == ControlErrorKind::BootTimeout,
                        reason: err.message,
                        console: err.console_tail,
                    },
                })
            }
        }
    }
}

fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    crate::private::write_atomic(path, bytes)
        .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
}

pub(super) async fn ensure_image(
    name: &str,
    progress: Option<ProgressFn>,
) -> Result<crate::image::Image> {
    let name = name.to_string();
    tokio::task::spawn_blocking(move || {
        let mut cb = |ev: ImageEvent| {
            if let Some(p) = &progress {
                p(&Progress::Image(ev));
            }
        };
        crate::image::ensure(&name, &mut cb)
    })
    .await
    .map_err(|e| Error::io("image task failed", std::io::Error::other(e.to_string())))?
    .map_err(Error::from)
}
