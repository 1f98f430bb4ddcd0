//! A running QEMU process and its QMP connection.

use super::super::{files, BoxFuture, LaunchSpec, SnapshotOutcome, Vmm, VmmError, VmmExit};
use super::{
    check_paths, confine_child, launch_args, GuestNet, NetError, Qmp, QmpError, QEMU_BINARY,
};
use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// Most of QEMU's own output kept in `vmm.log`.
const MAX_VMM_LOG: u64 = 1024 * 1024;

/// How long QEMU gets to open its QMP socket.
const QMP_DEADLINE: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error(transparent)]
    Missing(#[from] crate::hosttools::MissingTool),
    #[error("invalid launch: {0}")]
    Invalid(String),
    #[error("cannot start the guest network")]
    Net(#[from] NetError),
    #[error("cannot start {binary}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create {path}")]
    Log {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QEMU exited during start-up ({exit}): {stderr}")]
    EarlyExit { exit: String, stderr: String },
    #[error("QEMU did not open its control socket within {0:?}")]
    QmpTimeout(Duration),
    #[error("QEMU stopped answering its control socket (hung or stopped)")]
    Unresponsive,
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("{0}")]
    Migration(String),
}

pub struct QemuVm {
    child: Child,
    /// The guest's network stack, when it has one; ends with the VM.
    _net: Option<GuestNet>,
    pid: u32,
    qmp: Option<Qmp>,
    /// Where to reconnect after a QMP timeout.
    qmp_path: std::path::PathBuf,
    /// Whether the vCPUs should be running, as of the last command that
    /// succeeded (the VMM starts stopped: `-S`).
    want_running: bool,
    exit: Option<VmmExit>,
    dir: crate::backend::VmDir,
    /// The root disk's path (a snapshot renames the new overlay onto it).
    disk: std::path::PathBuf,
    /// Guest RAM is a private mapping of a snapshot's file: a snapshot
    /// carries it in the device state.
    private_memory: bool,
}

/// The descriptor name a migration stream is handed to QEMU under.
const MIGRATION_FD: &str = "smolvm-migration";
/// The longest a snapshot's migration may take (RAM in the stream: GiBs).
const MIGRATION_DEADLINE: Duration = Duration::from_secs(300);
/// File names a snapshot directory holds for the backend.
pub const SNAPSHOT_STATE: &str = "state";
pub const SNAPSHOT_MEMORY: &str = "memory";

fn ignore_shared_caps(on: bool) -> serde_json::Value {
    serde_json::json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": on }] })
}

fn to_exit(st: std::process::ExitStatus) -> VmmExit {
    VmmExit {
        code: st.code(),
        signal: st.signal(),
    }
}

impl QemuVm {
    /// Starts QEMU for `spec` and connects to its QMP socket. Must be called
    /// from a thread that lives as long as the VM (the VMM gets SIGKILL when
    /// the thread that spawned it exits: `PR_SET_PDEATHSIG`).
    pub async fn launch(spec: &LaunchSpec) -> Result<QemuVm, QemuError> {
        let dir = &spec.dir();
        check_paths(spec).map_err(QemuError::Invalid)?;
        // Nothing of an earlier run is reused: not its sockets, and above
        // all not a RAM file an interrupted start left (QEMU would map the
        // old guest memory).
        for f in files::VMM_RUNTIME {
            let _ = std::fs::remove_file(dir.join(f));
        }
        if let Some(r) = spec.restore.as_ref().filter(|r| !r.private) {
            // The VM's own copy of the snapshot's RAM becomes its RAM file.
            if let Some(m) = &r.memory {
                std::fs::rename(m, dir.memory()).map_err(|source| QemuError::Log {
                    path: m.display().to_string(),
                    source,
                })?;
            }
        }
        // Blocking for at most a few seconds, on purpose on this thread:
        // the helpers' parent-death signal follows the thread that spawns
        // them (a blocking-pool thread would end and take them along). No
        // client is served before the launch anyway.
        let net = if spec.network {
            Some(GuestNet::start(dir, &spec.egress)?)
        } else {
            None
        };
        let log_path = dir.vmm_log();
        let log_err = |source| QemuError::Log {
            path: log_path.display().to_string(),
            source,
        };
        let mut log = crate::private::CappedLog::create(&log_path, MAX_VMM_LOG).map_err(log_err)?;
        let mut cmd = crate::hosttools::command(QEMU_BINARY)?;
        cmd.args(launch_args(spec))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.stdio().map_err(log_err)?)
            .stderr(log.stdio().map_err(log_err)?);
        confine_child(&mut cmd);
        // The VMM never outlives its supervisor.
        crate::sys::die_with_parent(&mut cmd);
        let mut child = Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| QemuError::Spawn {
                binary: QEMU_BINARY.into(),
                source,
            })?;
        // `cmd` (holding write ends) is consumed: only QEMU writes now.
        log.close_writer();
        let pid = child.id().unwrap_or(0);
        let start = Instant::now();
        let qmp_path = dir.qmp_socket();
        let qmp = loop {
            if let Some(st) = child.try_wait().map_err(|source| QemuError::Spawn {
                binary: QEMU_BINARY.into(),
                source,
            })? {
                log.finish();
                return Err(QemuError::EarlyExit {
                    exit: to_exit(st).to_string(),
                    stderr: crate::text::tail_file(&log_path, 2000),
                });
            }
            if qmp_path.exists() {
                // The greeting may take the rest of the start-up deadline
                // (a loaded TCG host initialises slowly).
                let left = QMP_DEADLINE
                    .saturating_sub(start.elapsed())
                    .max(Duration::from_secs(1));
                match Qmp::connect_within(&qmp_path, left).await {
                    Ok(q) => break q,
                    Err(QmpError::Io(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if start.elapsed() > QMP_DEADLINE {
                let _ = child.start_kill();
                return Err(QemuError::QmpTimeout(QMP_DEADLINE));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let mut vm = QemuVm {
            child,
            _net: net,
            pid,
            qmp: Some(qmp),
            qmp_path: dir.qmp_socket(),
            want_running: false,
            exit: None,
            dir: dir.clone(),
            disk: spec.disk.clone(),
            private_memory: spec
                .restore
                .as_ref()
                .is_some_and(|r| r.private && r.memory.is_some()),
        };
        if let Some(r) = &spec.restore {
            if let Err(e) = vm.incoming(&r.state, r.memory.is_some()).await {
                let _ = vm.child.start_kill();
                return Err(e);
            }
        }
        Ok(vm)
    }

    /// Loads a snapshot's device state into this (`-incoming defer`) VMM;
    /// the vCPUs stay stopped.
    /// `ignore_shared`: the RAM is not in the stream (the source's RAM
    /// file was left out with x-ignore-shared; the capability must match).
    async fn incoming(&mut self, state: &Path, ignore_shared: bool) -> Result<(), QemuError> {
        let file = std::fs::File::open(state).map_err(|source| QemuError::Log {
            path: state.display().to_string(),
            source,
        })?;
        let qmp = self.qmp().await?;
        qmp.execute(
            "migrate-set-capabilities",
            Some(ignore_shared_caps(ignore_shared)),
        )
        .await?;
        use std::os::fd::AsFd as _;
        qmp.send_fd(MIGRATION_FD, file.as_fd()).await?;
        drop(file);
        qmp.execute(
            "migrate-incoming",
            Some(serde_json::json!({ "uri": format!("fd:{MIGRATION_FD}") })),
        )
        .await?;
        self.wait_migration("restore").await
    }

    /// Polls `query-migrate` until the migration in progress ends.
    async fn wait_migration(&mut self, what: &str) -> Result<(), QemuError> {
        let start = Instant::now();
        loop {
            if !self.is_alive() {
                return Err(QemuError::EarlyExit {
                    exit: self.exit.clone().map(|e| e.to_string()).unwrap_or_default(),
                    stderr: crate::text::tail_file(&self.dir.vmm_log(), 2000),
                });
            }
            let st = self.qmp().await?.execute("query-migrate", None).await?;
            match st.get("status").and_then(serde_json::Value::as_str) {
                Some("completed") => return Ok(()),
                Some("failed" | "cancelled") => {
                    let why = st
                        .get("error-desc")
                        .and_then(serde_json::Value::as_str)
                        .unwrap_or("no reason given");
                    return Err(QemuError::Migration(format!("{what} failed: {why}")));
                }
                _ => {}
            }
            if start.elapsed() > MIGRATION_DEADLINE {
                return Err(QemuError::Migration(format!(
                    "{what} did not finish within {MIGRATION_DEADLINE:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// See [`Vmm::snapshot`]: fills `out` as it goes.
    async fn snapshot_into(
        &mut self,
        dir: &Path,
        next_disk: &Path,
        resume: bool,
        out: &mut SnapshotOutcome,
    ) -> Result<(), QemuError> {
        let start = Instant::now();
        let was_running = self.want_running;
        out.was_running = was_running;
        self.command("stop").await?;
        let stopped = Instant::now();
        let r = self.snapshot_stopped(dir, next_disk, out).await;
        if was_running && (resume || r.is_err()) {
            // A failed snapshot leaves the VM running as it was.
            let c = self.command("cont").await;
            if r.is_ok() {
                c?;
            }
        }
        out.downtime = stopped.elapsed();
        out.total = start.elapsed();
        r
    }

    async fn snapshot_stopped(
        &mut self,
        dir: &Path,
        next_disk: &Path,
        out: &mut SnapshotOutcome,
    ) -> Result<(), QemuError> {
        let ignore = !self.private_memory;
        let qmp = self.qmp().await?;
        // RAM in a file of its own stays out of the stream. A private
        // mapping (a restored VM) goes into it, with the capability off, so
        // that its restore loads it into a RAM file of its own (shared, and
        // so cheap to snapshot again).
        qmp.execute("migrate-set-capabilities", Some(ignore_shared_caps(ignore)))
            .await?;
        // Stopped: no downtime limit applies, only the bandwidth cap
        // (128 MiB/s by default) would slow a stream that carries RAM.
        qmp.execute(
            "migrate-set-parameters",
            Some(serde_json::json!({ "max-bandwidth": 64u64 << 30 })),
        )
        .await?;
        // Freeze the disk: the VM writes to `next_disk` from now on, over
        // the current file (already linked into the snapshot).
        let next = next_disk
            .to_str()
            .ok_or_else(|| QemuError::Invalid("the new disk path is not UTF-8".into()))?;
        // QEMU reopens its images by name when their permissions change
        // (at migration and `cont`): the new layer keeps its name while this
        // VMM runs, and is renamed onto the disk's before the next boot.
        // `disk.top` names it, written *before* the switch: an empty layer
        // over a link of the live disk shows the same data, so the marker
        // is right whether or not the switch happens (a crash in between
        // loses nothing), and it is put back when the switch fails.
        let marker = self.dir.disk_top();
        let before = std::fs::read(&marker).ok();
        let top = next_disk
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        crate::private::write_atomic(&marker, top.as_bytes()).map_err(|source| QemuError::Log {
            path: marker.display().to_string(),
            source,
        })?;
        let switched = self
            .qmp()
            .await?
            .execute(
                "blockdev-snapshot-sync",
                Some(serde_json::json!({
                    "device": "root",
                    "snapshot-file": next,
                    "format": "qcow2",
                    "mode": "existing",
                })),
            )
            .await;
        if let Err(e) = switched {
            let _ = match before {
                Some(b) => crate::private::write_atomic(&marker, &b),
                None => std::fs::remove_file(&marker),
            };
            return Err(e.into());
        }
        out.disk_switched = true;
        self.disk = next_disk.to_path_buf();
        let state_path = dir.join(SNAPSHOT_STATE);
        let state = crate::private::create_new(&state_path).map_err(|source| QemuError::Log {
            path: state_path.display().to_string(),
            source,
        })?;
        use std::os::fd::AsFd as _;
        let qmp = self.qmp().await?;
        qmp.send_fd(MIGRATION_FD, state.as_fd()).await?;
        qmp.execute(
            "migrate",
            Some(serde_json::json!({ "uri": format!("fd:{MIGRATION_FD}") })),
        )
        .await?;
        self.wait_migration("the snapshot").await?;
        out.state_bytes = state.metadata().map(|m| m.len()).unwrap_or(0);
        drop(state);
        out.memory_in_state = self.private_memory;
        if !self.private_memory {
            // Before `cont`: the guest writes its RAM file as soon as it runs.
            let dst = dir.join(SNAPSHOT_MEMORY);
            let src = self.dir.memory();
            let d = dst.clone();
            // Off the event loop: GiBs of RAM take a while.
            let copied = tokio::task::spawn_blocking(move || crate::sys::sparse_copy(&src, &d))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
            out.memory_bytes = copied.map_err(|source| QemuError::Log {
                path: dst.display().to_string(),
                source,
            })?;
        }
        Ok(())
    }

    /// The QMP connection, reconnecting when an earlier command timed out
    /// (a VMM that was stopped for a while answers again once continued).
    async fn qmp(&mut self) -> Result<&mut Qmp, QemuError> {
        if self.qmp.is_none() {
            if !self.is_alive() {
                return Err(QemuError::Qmp(QmpError::Closed));
            }
            let mut q = match Qmp::connect(&self.qmp_path).await {
                Ok(q) => q,
                Err(QmpError::Timeout(_)) => return Err(QemuError::Unresponsive),
                Err(e) => return Err(e.into()),
            };
            // The command that timed out may have run late (QEMU reads it
            // once continued): put the vCPUs back as they were meant to be.
            let status = q.execute("query-status", None).await?;
            let running = status.get("running").and_then(serde_json::Value::as_bool);
            if running.is_some_and(|r| r != self.want_running) {
                q.execute(if self.want_running { "cont" } else { "stop" }, None)
                    .await?;
            }
            self.qmp = Some(q);
        }
        self.qmp.as_mut().ok_or(QemuError::Unresponsive)
    }

    /// Runs a QMP command. After a command timed out the connection is
    /// out of step (a late reply would answer the next command), so it is
    /// dropped and the next command reconnects.
    async fn command(&mut self, cmd: &str) -> Result<(), QemuError> {
        match self.qmp().await?.execute(cmd, None).await {
            Ok(_) => {
                match cmd {
                    "cont" => self.want_running = true,
                    "stop" => self.want_running = false,
                    _ => {}
                }
                Ok(())
            }
            Err(QmpError::Timeout(_)) => {
                self.qmp = None;
                Err(QemuError::Unresponsive)
            }
            Err(e) => Err(e.into()),
        }
    }
}

impl QemuVm {
    async fn wait_exit(&mut self) -> VmmExit {
        if let Some(e) = &self.exit {
            return e.clone();
        }
        let e = match self.child.wait().await {
            Ok(st) => to_exit(st),
            Err(_) => VmmExit {
                code: None,
                signal: None,
            },
        };
        self.exit = Some(e.clone());
        e
    }
}

/// A VM created without a NIC: `off` holds already; nothing can add one.
fn no_nic_egress(policy: &crate::config::EgressPolicy) -> Result<(), VmmError> {
    if *policy == crate::config::EgressPolicy::Off {
        return Ok(());
    }
    Err(VmmError {
        kind: smolvm_proto::supervisor::ControlErrorKind::InvalidState,
        message: "the VM was created without a network; the egress policy cannot add one \
                  (recreate it with the network on)"
            .into(),
        missing_tool: None,
    })
}

fn boundary(what: &'static str) -> impl Fn(QemuError) -> VmmError {
    move |e| e.into_vmm_error(what)
}

impl Vmm for QemuVm {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn pause(&mut self) -> BoxFuture<'_, Result<(), VmmError>> {
        Box::pin(async move { self.command("stop").await.map_err(boundary("cannot pause")) })
    }

    fn resume(&mut self) -> BoxFuture<'_, Result<(), VmmError>> {
        Box::pin(async move {
            self.command("cont")
                .await
                .map_err(boundary("cannot resume"))
        })
    }

    fn set_egress(
        &mut self,
        policy: &crate::config::EgressPolicy,
    ) -> BoxFuture<'_, Result<(), VmmError>> {
        let policy = policy.clone();
        let handle = self._net.as_ref().map(GuestNet::policy_handle);
        Box::pin(async move {
            let Some(handle) = handle else {
                return no_nic_egress(&policy);
            };
            let r = tokio::task::spawn_blocking(move || handle.set_policy(&policy)).await;
            match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(NetError::Missing(m))) => Err(QemuError::Net(NetError::Missing(m))
                    .into_vmm_error("cannot change the egress policy")),
                // Not a host defect (as at start): the network failed.
                Ok(Err(e)) => Err(VmmError {
                    kind: smolvm_proto::supervisor::ControlErrorKind::Other,
                    message: format!("cannot change the egress policy: {e}"),
                    missing_tool: None,
                }),
                Err(e) => Err(VmmError {
                    kind: smolvm_proto::supervisor::ControlErrorKind::Other,
                    message: format!("cannot change the egress policy: {e}"),
                    missing_tool: None,
                }),
            }
        })
    }

    fn reconcile(&mut self) -> BoxFuture<'_, Result<(), VmmError>> {
        Box::pin(async move {
            self.qmp()
                .await
                .map(|_| ())
                .map_err(boundary("the VMM is still not answering"))
        })
    }

    fn quit(&mut self) -> BoxFuture<'_, Result<(), VmmError>> {
        Box::pin(async move {
            let r = self.command("quit").await;
            self.qmp = None;
            match r {
                Ok(()) | Err(QemuError::Qmp(QmpError::Closed)) => Ok(()),
                Err(e) => Err(e.into_vmm_error("cannot quit")),
            }
        })
    }

    fn kill(&mut self) {
        let _ = self.child.start_kill();
    }

    fn wait(&mut self) -> BoxFuture<'_, VmmExit> {
        Box::pin(self.wait_exit())
    }

    fn snapshot<'a>(
        &'a mut self,
        dir: &'a Path,
        next_disk: &'a Path,
        resume: bool,
    ) -> BoxFuture<'a, Result<SnapshotOutcome, (VmmError, SnapshotOutcome)>> {
        Box::pin(async move {
            let mut out = SnapshotOutcome::default();
            match self.snapshot_into(dir, next_disk, resume, &mut out).await {
                Ok(()) => Ok(out),
                Err(e) => Err((e.into_vmm_error("the snapshot failed"), out)),
            }
        })
    }

    fn is_alive(&mut self) -> bool {
        if self.exit.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(st)) => {
                self.exit = Some(to_exit(st));
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }
}

/// Creates the VM's root disk: a qcow2 overlay backed by the image's ext4
/// (the base is shared and never written). `size` grows the virtual disk.
pub async fn create_overlay(base: &Path, disk: &Path, size: Option<u64>) -> Result<(), QemuError> {
    let mut std_cmd = crate::hosttools::command("qemu-img")?;
    confine_child(&mut std_cmd);
    // A base beside the disk is named relatively, so the layer stays valid
    // when linked into a snapshot directory next to its own base link.
    let base = match (base.parent(), disk.parent(), base.file_name()) {
        (Some(b), Some(d), Some(name)) if b == d => Path::new(name),
        _ => base,
    };
    // The backing file name after `-b` is a plain value (not an option
    // list), so commas in it need no escaping.
    std_cmd
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(disk);
    if let Some(s) = size {
        std_cmd.arg(s.to_string());
    }
    run_qemu_img(std_cmd, disk).await
}

/// Creates a qcow2 layer over the qcow2 image `backing` without opening it
/// (`-u`: it may not exist yet at that name).
pub async fn create_layer(backing: &str, disk: &Path, size: u64) -> Result<(), QemuError> {
    let mut std_cmd = crate::hosttools::command("qemu-img")?;
    confine_child(&mut std_cmd);
    std_cmd
        .args([
            "create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b", backing,
        ])
        .arg(disk)
        .arg(size.to_string());
    run_qemu_img(std_cmd, disk).await
}

async fn run_qemu_img(std_cmd: std::process::Command, disk: &Path) -> Result<(), QemuError> {
    let mut cmd = tokio::process::Command::from(std_cmd);
    let out = cmd
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| QemuError::Spawn {
            binary: "qemu-img".into(),
            source,
        })?;
    if !out.status.success() {
        let _ = std::fs::remove_file(disk);
        return Err(QemuError::EarlyExit {
            exit: format!("qemu-img {}", out.status),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

impl QemuError {
    /// The kind a client sees for this failure.
    pub fn control_kind(&self) -> smolvm_proto::supervisor::ControlErrorKind {
        use smolvm_proto::supervisor::ControlErrorKind as K;
        match self {
            QemuError::Missing(_) | QemuError::Net(NetError::Missing(_)) => K::HostToolMissing,
            // The helpers fail at start for what the host lacks (tun, user
            // namespaces, AppArmor, a route): `smolvm doctor` names it.
            QemuError::Net(_) => K::HostUnsupported,
            QemuError::EarlyExit { .. } | QemuError::Qmp(QmpError::Closed) => K::VmmExited,
            QemuError::Unresponsive
            | QemuError::QmpTimeout(_)
            | QemuError::Qmp(QmpError::Timeout(_)) => K::VmmUnresponsive,
            _ => K::Other,
        }
    }
}
