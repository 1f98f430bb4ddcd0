//! A running QEMU process and its QMP connection.

use super::super::{files, BoxFuture, LaunchSpec, Vmm, VmmError, VmmExit};
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
        // Blocking for at most a few seconds, on purpose on this thread:
        // the helpers' parent-death signal follows the thread that spawns
        // them (a blocking-pool thread would end and take them along). No
        // client is served before the launch anyway.
        let net = if spec.network {
            Some(GuestNet::start(dir)?)
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
        Ok(QemuVm {
            child,
            _net: net,
            pid,
            qmp: Some(qmp),
            qmp_path: dir.qmp_socket(),
            want_running: false,
            exit: None,
        })
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
    // The backing file name after `-b` is a plain value (not an option
    // list), so commas in it need no escaping.
    std_cmd
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(base)
        .arg(disk);
    if let Some(s) = size {
        std_cmd.arg(s.to_string());
    }
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
