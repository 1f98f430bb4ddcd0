//! Snapshots of sandboxes: take one, restore it (into its source or a new
//! VM), fork it; and the warm boot snapshot fresh sandboxes start from.
//! The on-disk format is `crate::snapshot`'s (docs/snapshots.md).

use super::lifecycle::{ProgressFn, Sandbox};
use super::lock::VmLock;
use super::record::store;
use crate::backend::{LaunchSpec, RestoreSpec};
use crate::error::{chain, Error, Result};
use crate::snapshot::{self as snap, files, Manifest, SnapshotInfo, SnapshotKind, Stored};
use crate::state::VmState;
use smolvm_proto::supervisor::{ControlRequest, ControlResponse, SnapshotReport, SnapshotRequest};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What to snapshot.
#[derive(Debug, Clone, Default)]
pub struct SnapshotOptions {
    /// The snapshot's id (the VM naming rule); generated when absent.
    pub name: Option<String>,
    /// Continue the VM afterwards (else a running VM is left paused).
    pub resume: bool,
    /// Only the disk, of a stopped VM.
    pub disk_only: bool,
}

/// How to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The VM to restore into: a new id. `None`: the snapshot's source id
    /// (its current run is replaced; it is re-created if it was deleted).
    pub into: Option<String>,
    /// Leave the restored VM running (else paused, once it is ready).
    pub resume: bool,
    pub boot_timeout: Duration,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            into: None,
            resume: true,
            boot_timeout: super::DEFAULT_BOOT_TIMEOUT,
        }
    }
}

/// Every snapshot (not the internal warm ones).
pub fn list_snapshots() -> Vec<SnapshotInfo> {
    snap::list().iter().map(Stored::info).collect()
}

/// One snapshot.
pub fn snapshot_info(id: &str) -> Result<SnapshotInfo> {
    Ok(snap::find(id)?.info())
}

/// Removes a snapshot. Its files stay while VMs are layered on it (they
/// go with the last of them); returns those VMs.
pub async fn delete_snapshot(id: &str) -> Result<Vec<String>> {
    let lock = snap::lock().await?;
    let s = snap::find(id)?;
    snap::retire(&lock, &s)
}

/// Removes the warm boot snapshots of `image` (all images: `None`); the
/// next fresh sandbox of each shape boots cold and leaves a new one.
/// Returns how many were removed.
pub async fn forget_warm(image: Option<&str>) -> Result<usize> {
    if !crate::paths::snapshots_dir().exists() {
        return Ok(0);
    }
    let lock = snap::lock().await?;
    let mut n = 0;
    for w in snap::warm() {
        if image.is_none_or(|i| w.manifest.config.image == i) {
            snap::retire(&lock, &w)?;
            n += 1;
        }
    }
    Ok(n)
}

/// Removes what retired snapshots left once nothing uses it (after a VM
/// is deleted).
pub(super) async fn collect_snapshots() {
    if !crate::paths::snapshots_dir().exists() {
        return;
    }
    if let Ok(lock) = snap::lock().await {
        snap::collect(&lock);
    }
}

fn new_name(prefix: &str) -> String {
    let mut rnd = [0u8; 4];
    let _ = getrandom::fill(&mut rnd);
    let hex: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-{hex}")
}

/// Removes a snapshot directory that did not become a snapshot, unless
/// disarmed (its disk is in use by the VM already).
struct DirGuard(Option<PathBuf>);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl Sandbox {
    /// Snapshots the VM: memory, device state and disk of a running or
    /// paused VM (it stays paused unless `resume`), or the disk of a
    /// stopped one (`disk_only`).
    pub async fn snapshot(&self, opts: &SnapshotOptions) -> Result<SnapshotInfo> {
        let _lock = VmLock::acquire(&self.id).await?;
        let rec = self.record().await?;
        let kind = if opts.disk_only {
            SnapshotKind::Disk
        } else {
            SnapshotKind::Full
        };
        let hint = match (kind, rec.state) {
            (SnapshotKind::Full, VmState::Running | VmState::Paused) => None,
            (SnapshotKind::Disk, VmState::Stopped | VmState::Created) => None,
            (SnapshotKind::Full, _) => Some(format!(
                "a memory snapshot needs a running or paused VM; `smolvm start {}` first, or take a disk-only snapshot",
                self.id
            )),
            (_, _) => Some(format!(
                "a disk-only snapshot needs a stopped VM; `smolvm stop {}` first, or take a full snapshot",
                self.id
            )),
        };
        if let Some(hint) = hint {
            return Err(Error::InvalidState {
                id: self.id.clone(),
                state: rec.state,
                hint,
            });
        }
        if let Some(n) = &opts.name {
            crate::config::validate_name(n)?;
        }
        let name = opts.name.clone().unwrap_or_else(|| new_name("snap"));
        self.step(format!("snapshotting into {name}"));
        let s = self.take(kind, &name, opts.resume, None).await?;
        if kind == SnapshotKind::Full {
            let state = if opts.resume {
                VmState::Running
            } else {
                VmState::Paused
            };
            store()?.set_state(&self.id, state, None)?;
        }
        Ok(s.info())
    }

    /// Takes a snapshot of this VM (the VM lock is held by the caller).
    async fn take(
        &self,
        kind: SnapshotKind,
        name: &str,
        resume: bool,
        warm_key: Option<&str>,
    ) -> Result<Stored> {
        let lock = snap::lock().await?;
        if kind != SnapshotKind::Warm && snap::list().iter().any(|s| s.manifest.id == name) {
            return Err(Error::SnapshotExists(name.to_string()));
        }
        if let Some(key) = warm_key.filter(|k| snap::find_warm(k).is_some()) {
            // Another first boot of this shape left it meanwhile.
            return Err(Error::SnapshotExists(format!("warm-{key}")));
        }
        let dir = snap::new_dir(&lock)?;
        let mut guard = DirGuard(Some(dir.clone()));
        if kind == SnapshotKind::Disk {
            self.vm_dir
                .settle_disk()
                .map_err(|e| Error::io("cannot settle the VM's disk layers", e))?;
        }
        // The layer the VM writes now becomes the frozen disk.
        let vm_disk = self.vm_dir.current_disk();
        let frozen = dir.join(files::DISK);
        std::fs::hard_link(&vm_disk, &frozen).map_err(|e| {
            Error::io(
                format!(
                    "cannot link {} into the snapshot (the data dir must be one filesystem)",
                    vm_disk.display()
                ),
                e,
            )
        })?;
        let header = snap::qcow2::header(&vm_disk)
            .map_err(|e| Error::io(format!("cannot read {}", vm_disk.display()), e))?;
        if header.backing.as_deref() == Some(crate::backend::files::BASE_DISK) {
            snap::link_or_copy(&self.vm_dir.base_disk(), &dir.join(files::BASE))?;
        }
        let launched: Option<LaunchSpec> = std::fs::read(self.vm_dir.launch_spec())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let mut manifest = Manifest {
            format: snap::FORMAT,
            id: name.to_string(),
            kind,
            created_at_ms: crate::state::now_ms(),
            source_vm: self.id.clone(),
            source_created_at: self.created_at,
            config: self.config.clone(),
            image: self.config.image.clone(),
            machine: None,
            state: None,
            memory_in_state: false,
            memory_len: None,
            memory_bytes: 0,
            disk_virtual_size: header.virtual_size,
            disk_bytes: 0,
            kernel: None,
            initramfs: None,
            warm_key: warm_key.map(str::to_string),
            forwards: if kind == SnapshotKind::Full {
                crate::supervisor::ports::saved(&self.vm_dir)
            } else {
                Vec::new()
            },
        };
        if kind == SnapshotKind::Full || kind == SnapshotKind::Warm {
            let spec = launched.ok_or_else(|| {
                Error::io(
                    "the VM's launch spec is unreadable",
                    std::io::Error::other(self.vm_dir.launch_spec().display().to_string()),
                )
            })?;
            if kind == SnapshotKind::Full {
                // A restore must not depend on the image staying as it is.
                snap::link_or_copy(&spec.kernel, &dir.join(files::KERNEL))?;
                snap::link_or_copy(&spec.initramfs, &dir.join(files::INITRAMFS))?;
                manifest.kernel = Some(size_only(&dir.join(files::KERNEL)));
                manifest.initramfs = Some(size_only(&dir.join(files::INITRAMFS)));
            }
            let backend = crate::backend::get(spec.backend);
            let vmm_path = backend.vmm_binary().ok_or_else(|| {
                Error::HostUnsupported("the VMM binary is not on this host".into())
            })?;
            manifest.machine = Some(snap::Machine {
                backend: spec.backend,
                accel: spec.accel,
                memory_mib: spec.memory_mib,
                cpus: spec.cpus,
                network: spec.network,
                vmm: snap::FileId::of(&vmm_path)
                    .map_err(|e| Error::io(format!("cannot read {}", vmm_path.display()), e))?,
                vmm_path,
                machine_abi: crate::backend::MACHINE_ABI,
            });
        }
        // The VM's next layer, over the frozen disk's final name.
        let next = self.vm_dir.new_layer();
        layer_over(self.config.backend, &dir, &next, header.virtual_size).await?;
        if kind == SnapshotKind::Disk {
            // Stopped: no VMM holds the disk; switch it ourselves.
            std::fs::rename(&next, &vm_disk)
                .map_err(|e| Error::io(format!("cannot replace {}", vm_disk.display()), e))?;
            guard.0 = None;
        } else {
            // From here the VM may be layered on the frozen disk at any
            // moment: nothing is removed on a guess (a dropped future, a
            // lost supervisor). Uncommitted, the directory is collected
            // once nothing uses it.
            guard.0 = None;
            let rep = self.snapshot_request(&dir, &next, resume).await;
            match rep {
                Ok(rep) => {
                    manifest.memory_in_state = rep.memory_in_state;
                    manifest.memory_bytes = rep.memory_bytes;
                    if !rep.memory_in_state {
                        manifest.memory_len = std::fs::metadata(dir.join(files::MEMORY))
                            .ok()
                            .map(|m| m.len());
                    }
                    tracing::info!(vm = %self.id, snapshot = name, downtime_ms = rep.downtime_ms, total_ms = rep.total_ms, state = rep.state_bytes, memory = rep.memory_bytes, "snapshot taken");
                }
                Err((e, maybe_switched)) => {
                    if !maybe_switched {
                        // The supervisor says the disk was not switched.
                        let _ = std::fs::remove_file(&next);
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                    return Err(e);
                }
            }
            let st = dir.join(files::STATE);
            let checked = tokio::task::spawn_blocking(move || snap::checked(&st))
                .await
                .map_err(|e| {
                    Error::io("checksum task failed", std::io::Error::other(e.to_string()))
                })??;
            manifest.state = Some(checked);
        }
        manifest.disk_bytes = snap::allocated(&frozen);
        let d = dir.clone();
        let m = manifest.clone();
        tokio::task::spawn_blocking(move || snap::commit(&d, &m))
            .await
            .map_err(|e| Error::io("commit task failed", std::io::Error::other(e.to_string())))??;
        Ok(Stored { dir, manifest })
    }

    /// Asks the supervisor for the snapshot. `Err` says whether the disk
    /// may have been switched (true unless the supervisor answered that it
    /// was not: it puts the top-layer marker back when the switch fails).
    async fn snapshot_request(
        &self,
        dir: &Path,
        next: &Path,
        resume: bool,
    ) -> std::result::Result<SnapshotReport, (Error, bool)> {
        let c = self.open_connection().await.map_err(|e| (e, false))?;
        let r = c
            .control(ControlRequest::Snapshot(SnapshotRequest {
                dir: dir.to_path_buf(),
                next_disk: next.to_path_buf(),
                resume,
            }))
            .await;
        match r {
            Ok(ControlResponse::Snapshot(rep)) => Ok(rep),
            Ok(ControlResponse::Error(e)) => {
                let maybe = self.vm_dir.current_disk() == next;
                Err((Error::from_control(&self.id, e), maybe))
            }
            Ok(o) => Err((
                Error::Control {
                    id: self.id.clone(),
                    kind: crate::ErrorKind::Io,
                    message: format!("unexpected answer {o:?}"),
                },
                true,
            )),
            Err(source) => {
                self.forget_client();
                Err((
                    Error::Client {
                        id: self.id.clone(),
                        source,
                    },
                    true,
                ))
            }
        }
    }

    /// Snapshots this VM and restores the snapshot `count` times into new
    /// VMs (the source continues as it was). The snapshot is internal: it
    /// goes once the last child is deleted.
    pub async fn fork(&self, count: u32) -> Result<Vec<Sandbox>> {
        check_count(count)?;
        let name = {
            let _lock = VmLock::acquire(&self.id).await?;
            let rec = self.record().await?;
            if !matches!(rec.state, VmState::Running | VmState::Paused) {
                return Err(Error::InvalidState {
                    id: self.id.clone(),
                    state: rec.state,
                    hint: format!(
                        "forking needs a running or paused VM; `smolvm start {}` first",
                        self.id
                    ),
                });
            }
            let name = new_name(&format!("fork-{}", truncate(&self.id, 40)));
            self.step("snapshotting the source");
            let resume = rec.state == VmState::Running;
            self.take(SnapshotKind::Full, &name, resume, None).await?;
            name
        };
        let r = Sandbox::fork_snapshot(&name, count, self.progress.clone()).await;
        if let Ok(lock) = snap::lock().await {
            if let Ok(s) = snap::find(&name) {
                let _ = snap::retire(&lock, &s);
            }
        }
        r
    }

    /// `count` new VMs from snapshot `id`, restored side by side.
    pub async fn fork_snapshot(
        id: &str,
        count: u32,
        progress: Option<ProgressFn>,
    ) -> Result<Vec<Sandbox>> {
        check_count(count)?;
        {
            let _lock = snap::lock_shared().await?;
            verify(&snap::find(id)?).await?;
        }
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..count {
            let (id, progress) = (id.to_string(), progress.clone());
            set.spawn(async move {
                let opts = RestoreOptions::default();
                Sandbox::restore_to(&id, Target::Generated, &opts, progress).await
            });
        }
        let mut made = Vec::new();
        let mut first_err = None;
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(vm)) => made.push(vm),
                Ok(Err(e)) => {
                    first_err.get_or_insert(e);
                }
                Err(e) => {
                    first_err.get_or_insert(Error::io(
                        "a restore task failed",
                        std::io::Error::other(e.to_string()),
                    ));
                }
            }
        }
        if let Some(e) = first_err {
            // All or nothing.
            for vm in &made {
                let _ = vm.delete().await;
            }
            return Err(e);
        }
        Ok(made)
    }

    /// Restores snapshot `id` (see [`RestoreOptions`]). The snapshot is
    /// checked whole before anything changes: a damaged one is an error
    /// and leaves the target as it was.
    pub async fn restore_snapshot(
        id: &str,
        opts: &RestoreOptions,
        progress: Option<ProgressFn>,
    ) -> Result<Sandbox> {
        let target = match &opts.into {
            Some(t) => Target::Named(t.clone()),
            None => Target::Source,
        };
        Self::restore_to(id, target, opts, progress).await
    }

    async fn restore_to(
        id: &str,
        target: Target,
        opts: &RestoreOptions,
        progress: Option<ProgressFn>,
    ) -> Result<Sandbox> {
        // Shared: restores run side by side (a fork); nothing is retired
        // or collected until the new VM is layered on the snapshot.
        let lock = snap::lock_shared().await?;
        let stored = snap::find(id)?;
        // A fork checks its snapshot once, before its restores; a restore
        // back into its source checks it under the locks it takes there.
        let check = !matches!(target, Target::Generated);
        let m = &stored.manifest;
        let mut config = m.config.clone();
        config.cold = true; // its disk is the snapshot's, not a fresh one
        let into_source = matches!(target, Target::Source);
        let target = match target {
            Target::Generated => None,
            Target::Named(t) => {
                crate::config::validate_name(&t)?;
                Some(t)
            }
            Target::Source => Some(m.source_vm.clone()),
        };
        if let Some(t) = &target {
            if let Some(rec) = store()?.get(t)? {
                let replace_source = into_source && rec.created_at == m.source_created_at;
                if !replace_source {
                    if check {
                        verify(&stored).await?;
                    }
                    return Err(Error::Store(crate::state::StoreError::AlreadyExists(
                        t.clone(),
                    )));
                }
                // Back into its source: replace the source's run and disk.
                // Locks in the order everyone takes them: the VM's, then
                // the snapshots'.
                drop(lock);
                let mut vm = Sandbox::from_id(t).await?;
                vm.set_progress(progress);
                let vm_lock = VmLock::acquire(t).await?;
                let lock = snap::lock_shared().await?;
                let stored = snap::find(id)?;
                verify(&stored).await?;
                let m = &stored.manifest;
                if vm.record().await?.created_at != m.source_created_at {
                    return Err(Error::Store(crate::state::StoreError::AlreadyExists(
                        t.clone(),
                    )));
                }
                vm.end_run().await?;
                let layer = vm.vm_dir.new_layer();
                layer_over(vm.config.backend, &stored.dir, &layer, m.disk_virtual_size).await?;
                let _ = std::fs::remove_file(vm.vm_dir.disk_top());
                std::fs::rename(&layer, vm.vm_dir.disk())
                    .map_err(|e| Error::io("cannot replace the VM's disk", e))?;
                let _ = vm.vm_dir.settle_disk();
                let r = vm.boot_from(&stored, VmState::Stopped, opts).await;
                drop(lock);
                drop(vm_lock);
                r?;
                return Ok(vm);
            }
        }
        if check {
            verify(&stored).await?;
        }
        config.name = target;
        // The new VM's lock stays held from its creation to its start
        // (nobody can act on it half made), and the snapshots lock until
        // its VMM maps the snapshot's files.
        let (mut vm, vm_lock) = Sandbox::create_inner(config, progress, Some(&stored.dir)).await?;
        let r = vm.boot_from(&stored, VmState::Created, opts).await;
        drop(lock);
        drop(vm_lock);
        if let Err(e) = r {
            let _ = vm.delete().await;
            return Err(e);
        }
        vm.set_progress(None);
        Ok(vm)
    }

    /// Ends whatever runs of this VM (for a restore into it); it is
    /// recorded `stopped`.
    async fn end_run(&self) -> Result<()> {
        let rec = self.record().await?;
        if rec.state.is_live() || rec.supervisor.is_some_and(|p| p.is_alive()) {
            if let Ok(c) = self.open_connection().await {
                let _ = c.control(ControlRequest::Kill).await;
            }
            self.forget_client();
            super::record::wait_supervisor_gone(rec.supervisor).await;
            for p in [rec.vmm, rec.supervisor].into_iter().flatten() {
                if p.is_alive() {
                    crate::sys::kill(p, libc::SIGKILL);
                }
            }
        }
        self.vm_dir.remove_runtime();
        let s = store()?;
        s.set_state(&self.id, VmState::Stopped, None)?;
        let _ = s.set_processes(&self.id, None, None, None);
        Ok(())
    }

    /// Starts this VM from `stored` (its disk is already layered on it):
    /// continues the machine of a full snapshot, boots a disk-only one.
    async fn boot_from(
        &self,
        stored: &Stored,
        prior: VmState,
        opts: &RestoreOptions,
    ) -> Result<()> {
        let m = &stored.manifest;
        let Some(machine) = m.machine.as_ref().filter(|_| m.kind != SnapshotKind::Disk) else {
            self.boot(prior, opts.boot_timeout).await?;
            return self.pause_unless(opts.resume).await;
        };
        // A new machine: the old run's SSH pin and connection are of
        // another machine (a restore into a new VM has neither).
        self.forget_host_key().await?;
        // The source's forwards again: the same host ports for the source
        // itself, free ones for any other VM (the source may still hold
        // its ports).
        let mut ports = if m.forwards.is_empty() {
            self.config.ports.clone()
        } else {
            m.forwards.clone()
        };
        if m.source_vm != self.id {
            for p in &mut ports {
                p.host_port = 0;
            }
        }
        let spec = LaunchSpec {
            ports,
            id: self.id.clone(),
            vm_dir: self.vm_dir.path().to_path_buf(),
            kernel: stored.path(files::KERNEL),
            initramfs: stored.path(files::INITRAMFS),
            disk: self.vm_dir.disk(),
            memory_mib: machine.memory_mib,
            cpus: machine.cpus,
            accel: machine.accel,
            backend: machine.backend,
            network: machine.network,
            egress: self.launch_egress().await,
            grow_root: false,
            restore: Some(RestoreSpec {
                state: stored.path(files::STATE),
                memory: (!m.memory_in_state).then(|| stored.path(files::MEMORY)),
                private: !m.memory_in_state,
            }),
        };
        self.launch_and_wait(
            &spec,
            prior,
            opts.boot_timeout,
            format!("restoring snapshot {}", m.id),
        )
        .await?;
        self.pause_unless(opts.resume).await
    }

    /// Pauses the just-started VM unless it is to run (the VM lock is held).
    async fn pause_unless(&self, resume: bool) -> Result<()> {
        if !resume {
            self.control_ok(ControlRequest::Pause).await?;
            store()?.set_state(&self.id, VmState::Paused, None)?;
        }
        Ok(())
    }

    /// Starts a never-run sandbox from its shape's warm boot snapshot.
    /// `Ok(false)`: there is none (boot cold). `Err`: it could not be used
    /// (the VM's fresh disk is back; boot cold).
    pub(super) async fn warm_start(
        &self,
        key: &str,
        spec: &mut LaunchSpec,
        prior: VmState,
        boot_timeout: Duration,
    ) -> Result<bool> {
        let Some(warm) = snap::find_warm(key) else {
            return Ok(false);
        };
        verify(&warm).await?;
        let disk = self.vm_dir.disk();
        let fresh = self.vm_dir.path().join("disk.fresh.qcow2");
        let staged = self.vm_dir.path().join("disk.warm.qcow2");
        let memory = self.vm_dir.path().join("memory.restore");
        let _ = std::fs::remove_file(&staged);
        let _ = std::fs::remove_file(&memory);
        let (wd, wm, st, mm) = (
            warm.path(files::DISK),
            warm.path(files::MEMORY),
            staged.clone(),
            memory.clone(),
        );
        let copied = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            // The boot's few disk writes (its layer over the same base) and
            // its RAM: this VM's own copies, so it depends on nothing.
            std::fs::copy(&wd, &st)?;
            crate::private::tighten(&st, crate::private::FILE_MODE)?;
            crate::sys::sparse_copy(&wm, &mm)?;
            Ok(())
        })
        .await
        .map_err(|e| Error::io("copy task failed", std::io::Error::other(e.to_string())))?;
        if let Err(e) = copied {
            let _ = std::fs::remove_file(&staged);
            let _ = std::fs::remove_file(&memory);
            return Err(Error::io("cannot copy the warm snapshot", e));
        }
        // Never without a disk: the fresh one is linked aside, then the
        // warm copy renamed over it.
        let _ = std::fs::remove_file(&fresh);
        std::fs::hard_link(&disk, &fresh).map_err(|e| Error::io("cannot set the disk aside", e))?;
        std::fs::rename(&staged, &disk).map_err(|e| Error::io("cannot place the disk", e))?;
        spec.restore = Some(RestoreSpec {
            state: warm.path(files::STATE),
            memory: Some(memory.clone()),
            private: false,
        });
        match self
            .launch_and_wait(
                spec,
                prior,
                boot_timeout,
                "starting from the warm boot snapshot".into(),
            )
            .await
        {
            Ok(()) => {
                let _ = std::fs::remove_file(&fresh);
                Ok(true)
            }
            Err(e) => {
                let _ = std::fs::rename(&fresh, &disk);
                let _ = std::fs::remove_file(&memory);
                // A warm snapshot that does not start is not offered again.
                if let Ok(lock) = snap::lock().await {
                    let _ = snap::retire(&lock, &warm);
                }
                Err(e)
            }
        }
    }

    /// Whether the VM's disk is still the empty layer `create` made over
    /// the image (nothing written to it).
    pub(super) fn disk_is_fresh(&self) -> bool {
        let disk = self.vm_dir.disk();
        let small = std::fs::metadata(&disk).is_ok_and(|m| m.len() <= FRESH_LAYER_MAX);
        small
            && snap::qcow2::header(&disk)
                .is_ok_and(|h| h.backing.as_deref() == Some(crate::backend::files::BASE_DISK))
    }

    /// After a cold first boot: leaves the boot snapshot for its shape when
    /// there is none (later sandboxes of the shape start from it). Stale
    /// warm snapshots of the same image and shape are retired.
    pub(super) async fn leave_warm_snapshot(&self, key: &str) {
        if snap::find_warm(key).is_some() {
            return;
        }
        if let Ok(lock) = snap::lock().await {
            for w in snap::warm() {
                let c = &w.manifest.config;
                let same_shape = c.image == self.config.image
                    && c.memory_mib == self.config.memory_mib
                    && c.cpus == self.config.cpus
                    && c.network == self.config.network
                    && c.disk_size_mib == self.config.disk_size_mib;
                if same_shape && w.manifest.warm_key.as_deref() != Some(key) {
                    let _ = snap::retire(&lock, &w);
                }
            }
        }
        self.step("leaving a warm boot snapshot for this shape");
        let name = format!("warm-{}", &key[..key.len().min(16)]);
        match self.take(SnapshotKind::Warm, &name, true, Some(key)).await {
            Ok(_) => tracing::info!(vm = %self.id, "warm boot snapshot {name} taken"),
            Err(e) => tracing::warn!(vm = %self.id, "no warm boot snapshot: {}", chain(&e)),
        }
    }
}

/// Creates a qcow2 layer at `disk` over the frozen disk of the snapshot
/// directory `snap_dir` (named relatively; it may not be committed yet).
pub(super) async fn layer_over(
    backend: crate::backend::BackendKind,
    snap_dir: &Path,
    disk: &Path,
    size: u64,
) -> Result<()> {
    crate::backend::get(backend)
        .create_layer(&snap::backing_name(snap_dir), disk, size)
        .await
        .map_err(|e| match e.missing_tool {
            Some(m) => Error::Tool(m),
            None => Error::io(
                "cannot create the disk layer",
                std::io::Error::other(e.message),
            ),
        })
}

/// Which VM a restore makes or replaces.
enum Target {
    /// The snapshot's source id.
    Source,
    Named(String),
    Generated,
}

/// [`snap::verify`] off the event loop (it reads and hashes the state).
async fn verify(s: &Stored) -> Result<()> {
    let s = s.clone();
    tokio::task::spawn_blocking(move || snap::verify(&s))
        .await
        .map_err(|e| Error::io("verify task failed", std::io::Error::other(e.to_string())))?
}

fn size_only(p: &Path) -> snap::Checked {
    snap::Checked {
        bytes: std::fs::metadata(p).map_or(0, |m| m.len()),
        sha256: String::new(),
    }
}

fn truncate(s: &str, n: usize) -> &str {
    &s[..s.len().min(n)]
}

/// An empty qcow2 layer is a few clusters (header, tables): ~200 KiB.
const FRESH_LAYER_MAX: u64 = 512 * 1024;

/// Most children one fork makes.
pub const MAX_FORK: u32 = 256;

fn check_count(count: u32) -> Result<()> {
    if count == 0 || count > MAX_FORK {
        return Err(Error::Invalid(format!(
            "a fork makes 1 to {MAX_FORK} VMs, not {count}"
        )));
    }
    Ok(())
}

/// The key of a warm boot snapshot: everything the boot's outcome depends
/// on (image files, agent, VMM, machine shape). Any change is a new key.
pub(super) fn warm_key(
    config: &crate::SandboxConfig,
    image: &crate::image::Image,
    spec: &LaunchSpec,
    vm_dir: &crate::backend::VmDir,
) -> std::io::Result<String> {
    // The root filesystem this VM's disk is layered on (pinned at create:
    // an image rebuilt since has another), else the image's.
    let rootfs =
        snap::FileId::of(&vm_dir.base_disk()).or_else(|_| snap::FileId::of(&image.rootfs))?;
    use sha2::Digest as _;
    let vmm = crate::backend::get(spec.backend)
        .vmm_binary()
        .ok_or_else(|| std::io::Error::other("no VMM binary"))?;
    let key = serde_json::json!({
        "format": snap::FORMAT,
        "image": config.image,
        "kernel": snap::FileId::of(&image.kernel)?,
        "initramfs": snap::FileId::of(&image.initramfs)?,
        "rootfs": rootfs,
        "vmm": snap::FileId::of(&vmm)?,
        "backend": spec.backend,
        "accel": spec.accel,
        "memory": spec.memory_mib,
        "cpus": spec.cpus,
        "network": spec.network,
        "disk": config.disk_size_mib,
        "protocol": smolvm_proto::PROTOCOL_VERSION,
        "machine": crate::backend::MACHINE_ABI,
    });
    let h = sha2::Sha256::digest(key.to_string().as_bytes());
    Ok(h.iter().map(|b| format!("{b:02x}")).collect())
}
