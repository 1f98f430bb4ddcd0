//! `smolvm._native`: the Python SDK's native half, thin over the `smolvm`
//! library (no second implementation, no CLI underneath).
//!
//! Every operation is a future of the library run on one tokio runtime per
//! process. Each method takes an optional `done` callback:
//! - without it the call blocks, with the GIL released, and comes back
//!   early with `KeyboardInterrupt` (the operation cancelled: the library's
//!   futures are cancel-safe) when the main thread gets a signal;
//! - with it the call returns a [`Task`] at once and calls
//!   `done(ok, value)` from a runtime thread when the operation ends: the
//!   Python side turns that into an asyncio future (`smolvm._aio`), and
//!   cancelling that future cancels the task.
//!
//! Errors cross as instances of `smolvm.exceptions` classes, chosen by the
//! library's error kind (docs/errors.md).

mod convert;
mod net;
mod runtime;

use convert::{raise, Out};
use pyo3::prelude::*;
use runtime::{run_op, run_op_with, OpOpts, Task};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Seconds from Python as a `Duration`, refusing what is not one.
fn seconds(op: &str, what: &str, s: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s).map_err(|_| {
        raise(
            "invalid_input",
            &format!("{what} must be a non-negative number of seconds, not {s}"),
            None,
            None,
            op,
        )
    })
}

/// A warning on stderr (the library logs through `tracing`, which the
/// SDK does not set up).
fn warn(msg: &str) {
    eprintln!("smolvm: warning: {}", smolvm::text::escape_line(msg));
}

fn progress_fn(cb: Option<Py<PyAny>>) -> Option<smolvm::sandbox::ProgressFn> {
    let cb = cb?;
    Some(Arc::new(move |p: &smolvm::sandbox::Progress| {
        let (kind, text) = convert::progress_text(p);
        Python::attach(|py| {
            // A failing progress callback must not fail the operation.
            if let Err(e) = cb.call1(py, (kind, text)) {
                e.print(py);
            }
        });
    }))
}

/// A handle on one VM. Thread-safe: share it between threads freely.
#[pyclass(frozen, module = "smolvm._native")]
pub(crate) struct Sandbox {
    inner: Arc<smolvm::Sandbox>,
    /// The process that made the handle: its runtime's connections do not
    /// survive a fork.
    pid: u32,
    /// SSH access for `ssh_exec`, set up on first use.
    ssh: net::SshCache,
}

impl Sandbox {
    pub(crate) fn new(inner: smolvm::Sandbox) -> Sandbox {
        Sandbox {
            inner: Arc::new(inner),
            pid: std::process::id(),
            ssh: net::SshCache::default(),
        }
    }

    fn handle(&self) -> PyResult<Arc<smolvm::Sandbox>> {
        if self.pid != std::process::id() {
            return Err(raise(
                "invalid_state",
                &format!(
                    "this handle on VM '{}' was made in process {} before a fork; \
                     in this process use SmolVM.from_id({:?})",
                    self.inner.id(),
                    self.pid,
                    self.inner.id()
                ),
                Some(self.inner.id()),
                None,
                "handle",
            ));
        }
        Ok(self.inner.clone())
    }

    fn id_owned(&self) -> Option<String> {
        Some(self.inner.id().to_string())
    }
}

#[pymethods]
impl Sandbox {
    /// Creates a VM from a `SandboxConfig` as JSON (building its image
    /// when missing; `progress(kind, text)` hears about it).
    #[staticmethod]
    #[pyo3(signature = (config_json, progress=None, done=None))]
    fn create(
        py: Python<'_>,
        config_json: &str,
        progress: Option<Py<PyAny>>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let config: smolvm::SandboxConfig = serde_json::from_str(config_json).map_err(|e| {
            raise(
                "invalid_input",
                &format!("invalid VM config: {e}"),
                None,
                None,
                "create",
            )
        })?;
        let progress = progress_fn(progress);
        let name = config.name.clone();
        let opts = OpOpts {
            owns_result: true,
            ..OpOpts::default()
        };
        run_op_with(py, "create", name, done, opts, async move {
            let sb = smolvm::Sandbox::create_with_progress(config, progress).await?;
            Ok(Out::Sandbox(Box::new(sb)))
        })
    }

    /// A handle on an existing VM by id (name), from any process.
    #[staticmethod]
    #[pyo3(signature = (vm_id, progress=None, done=None))]
    fn from_id(
        py: Python<'_>,
        vm_id: String,
        progress: Option<Py<PyAny>>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let progress = progress_fn(progress);
        let id = Some(vm_id.clone());
        run_op(py, "from_id", id, done, async move {
            let mut sb = smolvm::Sandbox::from_id(&vm_id).await?;
            sb.set_progress(progress);
            Ok(Out::Sandbox(Box::new(sb)))
        })
    }

    /// Every VM in the inventory, as dicts.
    #[staticmethod]
    #[pyo3(signature = (done=None))]
    fn list(py: Python<'_>, done: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        run_op(py, "list", None, done, async move {
            Ok(Out::List(smolvm::Sandbox::list().await?))
        })
    }

    /// Restores snapshot `snapshot_id` into VM `into` (a new id), or back
    /// into its source when None (replacing its run; re-creating it if it
    /// was deleted). The VM is left paused unless `resume`. Ctrl-C lets
    /// the restore finish (it takes well under a second for a memory
    /// snapshot), then removes a VM it made and raises.
    #[staticmethod]
    #[pyo3(signature = (snapshot_id, into=None, resume=false, boot_timeout=30.0, progress=None, done=None))]
    fn restore_snapshot(
        py: Python<'_>,
        snapshot_id: String,
        into: Option<String>,
        resume: bool,
        boot_timeout: f64,
        progress: Option<Py<PyAny>>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let boot_timeout = seconds("from_snapshot", "boot_timeout", boot_timeout)?;
        let progress = progress_fn(progress);
        // The VM the errors are about: the target, else the source.
        let vm_id = into.clone().or_else(|| {
            smolvm::sandbox::snapshot_info(&snapshot_id)
                .ok()
                .map(|i| i.source_vm)
        });
        let new_vm = into.is_some();
        let ops = OpOpts {
            finish_on_interrupt: true,
            owns_result: new_vm,
            ..OpOpts::default()
        };
        let opts = smolvm::sandbox::RestoreOptions {
            into,
            resume,
            boot_timeout,
        };
        run_op_with(py, "from_snapshot", vm_id, done, ops, async move {
            let sb = smolvm::Sandbox::restore_snapshot(&snapshot_id, &opts, progress).await?;
            if !resume && sb.status().await? == smolvm::VmState::Running {
                // A disk snapshot's restore boots the VM and leaves it
                // running: paused, as asked.
                if let Err(e) = sb.pause().await {
                    if new_vm {
                        let _ = sb.delete().await;
                    }
                    return Err(e);
                }
            }
            Ok(Out::Sandbox(Box::new(sb)))
        })
    }

    /// Every snapshot, as dicts (the fields of `smolvm snapshot ls --json`).
    #[staticmethod]
    #[pyo3(signature = (done=None))]
    fn list_snapshots(py: Python<'_>, done: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        run_op(py, "list_snapshots", None, done, async move {
            let list = tokio::task::spawn_blocking(smolvm::sandbox::list_snapshots)
                .await
                .map_err(|e| smolvm::Error::Invalid(format!("listing snapshots failed: {e}")))?;
            Ok(Out::Json(json(&list)))
        })
    }

    /// Removes a snapshot; returns the VMs that keep its files (they go
    /// with the last of them). Not interrupted by Ctrl-C.
    #[staticmethod]
    #[pyo3(signature = (snapshot_id, done=None))]
    fn delete_snapshot(
        py: Python<'_>,
        snapshot_id: String,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let opts = OpOpts {
            finish_on_interrupt: true,
            ..OpOpts::default()
        };
        run_op_with(py, "delete_snapshot", None, done, opts, async move {
            Ok(Out::Json(json(
                &smolvm::sandbox::delete_snapshot(&snapshot_id).await?,
            )))
        })
    }

    #[getter]
    fn vm_id(&self) -> &str {
        self.inner.id()
    }

    /// The VM's config as JSON.
    fn config_json(&self) -> PyResult<String> {
        serde_json::to_string(self.inner.config()).map_err(|e| {
            raise(
                "io",
                &format!("cannot encode the config: {e}"),
                self.id_owned().as_deref(),
                None,
                "config",
            )
        })
    }

    #[pyo3(signature = (done=None))]
    fn info(&self, py: Python<'_>, done: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        let sb = self.handle()?;
        run_op(py, "info", self.id_owned(), done, async move {
            // With what the inventory's info leaves out: the forwards
            // opened at each start. The egress policy is the stored one
            // (another handle or process may have changed it since).
            let info = sb.info().await?;
            let extra = serde_json::json!({
                "egress": json(&info.egress),
                "ports": json(&sb.config().ports),
            });
            Ok(Out::Info(Box::new(info), Some(extra)))
        })
    }

    /// Boots (or resumes) the VM. Cancelled (Ctrl-C, `Task.cancel`)
    /// before the guest is ready, the boot is ended: the VM is left as it
    /// was, not booting on behind the caller's back.
    #[pyo3(signature = (boot_timeout, done=None))]
    fn start(
        &self,
        py: Python<'_>,
        boot_timeout: f64,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let t = seconds("start", "boot_timeout", boot_timeout)?;
        let sb = self.handle()?;
        let finished = Arc::new(AtomicBool::new(false));
        let (sb2, finished2) = (sb.clone(), finished.clone());
        let on_cancel: runtime::Cleanup = Box::pin(async move {
            if !finished2.load(Ordering::SeqCst) {
                // A stop of a VM whose boot is under way ends that boot.
                if let Err(e) = sb2.stop(Duration::ZERO).await {
                    warn(&format!("ending the cancelled boot of {}: {e}", sb2.id()));
                }
            }
        });
        let opts = OpOpts {
            on_cancel: Some(on_cancel),
            ..OpOpts::default()
        };
        run_op_with(py, "start", self.id_owned(), done, opts, async move {
            sb.start(t).await?;
            finished.store(true, Ordering::SeqCst);
            Ok(Out::None)
        })
    }

    #[pyo3(signature = (timeout, done=None))]
    fn stop(&self, py: Python<'_>, timeout: f64, done: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        let t = seconds("stop", "timeout", timeout)?;
        let sb = self.handle()?;
        run_op(py, "stop", self.id_owned(), done, async move {
            sb.stop(t).await?;
            Ok(Out::None)
        })
    }

    #[pyo3(signature = (done=None))]
    fn pause(&self, py: Python<'_>, done: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        let sb = self.handle()?;
        run_op(py, "pause", self.id_owned(), done, async move {
            sb.pause().await?;
            Ok(Out::None)
        })
    }

    #[pyo3(signature = (done=None))]
    fn resume(&self, py: Python<'_>, done: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        let sb = self.handle()?;
        run_op(py, "resume", self.id_owned(), done, async move {
            sb.resume().await?;
            Ok(Out::None)
        })
    }

    /// Removes the VM. Not interrupted by Ctrl-C (a delete half done
    /// would leave a VM behind): the signal is raised once it is done.
    #[pyo3(signature = (done=None))]
    fn delete(&self, py: Python<'_>, done: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        let sb = self.handle()?;
        let opts = OpOpts {
            uninterruptible_for: Duration::from_secs(10),
            ..OpOpts::default()
        };
        run_op_with(py, "delete", self.id_owned(), done, opts, async move {
            sb.delete().await?;
            Ok(Out::None)
        })
    }

    /// Snapshots the VM (memory, device state and disk; or only the disk
    /// of a stopped VM with `disk_only`); a running VM is left paused
    /// unless `resume`. Returns the snapshot as a dict. Ctrl-C lets it
    /// finish (cut short, the VM's disk could be left half switched).
    #[pyo3(signature = (name=None, resume=false, disk_only=false, done=None))]
    fn snapshot(
        &self,
        py: Python<'_>,
        name: Option<String>,
        resume: bool,
        disk_only: bool,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let sb = self.handle()?;
        let opts = smolvm::sandbox::SnapshotOptions {
            name,
            resume,
            disk_only,
        };
        let ops = OpOpts {
            finish_on_interrupt: true,
            ..OpOpts::default()
        };
        run_op_with(py, "snapshot", self.id_owned(), done, ops, async move {
            Ok(Out::Json(json(&sb.snapshot(&opts).await?)))
        })
    }

    /// `count` new VMs, each continuing from this one's state now (the
    /// source goes on as it was). All or nothing; Ctrl-C lets it finish,
    /// then removes the children and raises.
    #[pyo3(signature = (count, done=None))]
    fn fork(&self, py: Python<'_>, count: u32, done: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        let sb = self.handle()?;
        let ops = OpOpts {
            finish_on_interrupt: true,
            owns_result: true,
            ..OpOpts::default()
        };
        run_op_with(py, "fork", self.id_owned(), done, ops, async move {
            Ok(Out::Sandboxes(sb.fork(count).await?))
        })
    }

    #[pyo3(signature = (timeout, done=None))]
    fn wait_until_ready(
        &self,
        py: Python<'_>,
        timeout: f64,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let t = seconds("wait_for_ready", "timeout", timeout)?;
        let sb = self.handle()?;
        run_op(py, "wait_for_ready", self.id_owned(), done, async move {
            sb.wait_until_ready(t).await?;
            Ok(Out::None)
        })
    }

    /// One agent round trip; seconds.
    #[pyo3(signature = (done=None))]
    fn ping(&self, py: Python<'_>, done: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        let sb = self.handle()?;
        run_op(py, "ping", self.id_owned(), done, async move {
            Ok(Out::Seconds(sb.ping().await?.as_secs_f64()))
        })
    }

    /// Runs `argv` (or `/bin/sh -c shell`) to completion. Returns
    /// `(exit_code, signal, timed_out, stdout, stderr, truncated,
    /// duration_ms)`; a guest-side timeout is `timed_out`, not an error.
    #[pyo3(signature = (argv, env, cwd=None, timeout=None, stdin=None, max_output=None, done=None))]
    #[allow(clippy::too_many_arguments)]
    fn exec(
        &self,
        py: Python<'_>,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        timeout: Option<f64>,
        stdin: Option<Vec<u8>>,
        max_output: Option<usize>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        if argv.is_empty() {
            return Err(raise(
                "invalid_input",
                "the command is empty",
                self.id_owned().as_deref(),
                None,
                "run",
            ));
        }
        for (k, v) in &env {
            smolvm::config::parse_env(&format!("{k}={v}"))
                .ok()
                .filter(|_| !k.contains('='))
                .ok_or_else(|| {
                    raise(
                        "invalid_input",
                        &format!("invalid environment variable {k:?}: keys are non-empty without '=' or NUL, values without NUL"),
                        self.id_owned().as_deref(),
                        None,
                        "run",
                    )
                })?;
        }
        let timeout = timeout.map(|t| seconds("run", "timeout", t)).transpose()?;
        let opts = smolvm::ExecOptions {
            env,
            workdir: cwd,
            timeout,
            stdin,
            max_output,
            ..Default::default()
        };
        let sb = self.handle()?;
        run_op(py, "run", self.id_owned(), done, async move {
            let out = sb.exec(smolvm::Command::Argv(argv), &opts).await?;
            Ok(Out::Exec(out))
        })
    }

    /// Starts `argv` and returns a `Process` to read its events from (and
    /// write its stdin when `stdin_open`).
    #[pyo3(signature = (argv, env, cwd=None, timeout=None, stdin_open=false, pty=None, done=None))]
    #[allow(clippy::too_many_arguments)]
    fn exec_stream(
        &self,
        py: Python<'_>,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        timeout: Option<f64>,
        stdin_open: bool,
        pty: Option<(u16, u16)>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        if argv.is_empty() {
            return Err(raise(
                "invalid_input",
                "empty command",
                self.id_owned().as_deref(),
                None,
                "run",
            ));
        }
        let timeout = timeout.map(|t| seconds("run", "timeout", t)).transpose()?;
        let opts = smolvm::ExecOptions {
            env,
            workdir: cwd,
            timeout,
            open_stdin: stdin_open,
            pty,
            ..Default::default()
        };
        let sb = self.handle()?;
        run_op(py, "run", self.id_owned(), done, async move {
            let s = sb.exec_stream(smolvm::Command::Argv(argv), &opts).await?;
            Ok(Out::Stream(Box::new(s), sb.id().to_string()))
        })
    }

    #[pyo3(signature = (local, guest_path, make_dirs, done=None))]
    fn upload_file(
        &self,
        py: Python<'_>,
        local: std::path::PathBuf,
        guest_path: String,
        make_dirs: bool,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let sb = self.handle()?;
        run_op(py, "upload_file", self.id_owned(), done, async move {
            Ok(Out::Json(
                sb.upload_file(&local, &guest_path, make_dirs).await?.into(),
            ))
        })
    }

    #[pyo3(signature = (guest_path, local, make_dirs, max_bytes=None, done=None))]
    fn download_file(
        &self,
        py: Python<'_>,
        guest_path: String,
        local: std::path::PathBuf,
        make_dirs: bool,
        max_bytes: Option<u64>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let sb = self.handle()?;
        run_op(py, "download_file", self.id_owned(), done, async move {
            Ok(Out::Json(
                sb.download_file(&guest_path, &local, make_dirs, max_bytes)
                    .await?
                    .into(),
            ))
        })
    }

    #[pyo3(signature = (local, guest_dir, done=None))]
    fn upload_dir(
        &self,
        py: Python<'_>,
        local: std::path::PathBuf,
        guest_dir: String,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let sb = self.handle()?;
        run_op(py, "upload_dir", self.id_owned(), done, async move {
            Ok(Out::Json(tree_json(
                &sb.upload_dir(&local, &guest_dir).await?,
            )))
        })
    }

    #[pyo3(signature = (guest_dir, local, max_bytes=None, done=None))]
    fn download_dir(
        &self,
        py: Python<'_>,
        guest_dir: String,
        local: std::path::PathBuf,
        max_bytes: Option<u64>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let sb = self.handle()?;
        run_op(py, "download_dir", self.id_owned(), done, async move {
            Ok(Out::Json(tree_json(
                &sb.download_dir_limited(&guest_dir, &local, max_bytes)
                    .await?,
            )))
        })
    }

    /// `op` is one of stat, lstat, list, mkdir, remove, rename, exists,
    /// sync; `a`/`b` are its paths, `flag` its boolean (parents, recursive).
    #[pyo3(signature = (op, a, b=None, flag=false, done=None))]
    fn fs(
        &self,
        py: Python<'_>,
        op: String,
        a: String,
        b: Option<String>,
        flag: bool,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let sb = self.handle()?;
        let name = format!("files.{op}");
        run_op(py, "files", self.id_owned(), done, async move {
            let v = match op.as_str() {
                "stat" => json(&sb.stat(&a, true).await?),
                "lstat" => json(&sb.stat(&a, false).await?),
                "list" => json(&sb.list_dir(&a).await?),
                "exists" => sb.exists(&a).await?.into(),
                "mkdir" => {
                    sb.mkdir(&a, flag).await?;
                    serde_json::Value::Null
                }
                "remove" => {
                    sb.remove(&a, flag).await?;
                    serde_json::Value::Null
                }
                "rename" => {
                    sb.rename(&a, b.as_deref().unwrap_or_default()).await?;
                    serde_json::Value::Null
                }
                "sync" => {
                    sb.sync().await?;
                    serde_json::Value::Null
                }
                other => {
                    return Err(smolvm::Error::Invalid(format!(
                        "{name}: unknown request {other:?}"
                    )))
                }
            };
            Ok(Out::Json(v))
        })
    }

    #[pyo3(signature = (port, timeout, done=None))]
    fn wait_for_port(
        &self,
        py: Python<'_>,
        port: u16,
        timeout: f64,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let t = seconds("wait_for_port", "timeout", timeout)?;
        let sb = self.handle()?;
        run_op(py, "wait_for_port", self.id_owned(), done, async move {
            sb.wait_for_port(port, t).await?;
            Ok(Out::None)
        })
    }

    /// `set` (with `merge`), `unset` (the keys of `vars`) or `list`;
    /// returns the environment after.
    #[pyo3(signature = (op, vars, merge=true, done=None))]
    fn env(
        &self,
        py: Python<'_>,
        op: String,
        vars: std::collections::BTreeMap<String, String>,
        merge: bool,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let sb = self.handle()?;
        run_op(py, "env", self.id_owned(), done, async move {
            let env = match op.as_str() {
                "set" => sb.set_env(vars, merge).await?,
                "unset" => sb.unset_env(vars.into_keys().collect()).await?,
                _ => sb.env().await?,
            };
            Ok(Out::Json(serde_json::to_value(env).unwrap_or_default()))
        })
    }

    /// Starts `argv` in the background; returns `(handle, pid)`. Its
    /// stdin is a pipe (for `procs("stdin", ...)`) only with `stdin`.
    #[pyo3(signature = (argv, env, cwd=None, timeout=None, stdin=false, done=None))]
    #[allow(clippy::too_many_arguments)]
    fn spawn(
        &self,
        py: Python<'_>,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        timeout: Option<f64>,
        stdin: bool,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        if argv.is_empty() {
            return Err(raise(
                "invalid_input",
                "empty command",
                self.id_owned().as_deref(),
                None,
                "spawn",
            ));
        }
        let timeout = timeout
            .map(|t| seconds("spawn", "timeout", t))
            .transpose()?;
        let opts = smolvm::ExecOptions {
            env,
            workdir: cwd,
            timeout,
            open_stdin: stdin,
            ..Default::default()
        };
        let sb = self.handle()?;
        run_op(py, "spawn", self.id_owned(), done, async move {
            let sp = sb.spawn(smolvm::Command::Argv(argv), &opts).await?;
            Ok(Out::Json(serde_json::json!([sp.handle, sp.pid])))
        })
    }

    /// Follows a background process's output from `from` (None: new only).
    #[pyo3(signature = (handle, from=None, done=None))]
    fn attach(
        &self,
        py: Python<'_>,
        handle: u64,
        from: Option<u64>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let sb = self.handle()?;
        run_op(py, "attach", self.id_owned(), done, async move {
            Ok(Out::Stream(
                Box::new(sb.attach(handle, from).await?),
                sb.id().to_string(),
            ))
        })
    }

    /// `list`, `signal` (arg: the signal), `stdin` (data, eof), `forget`.
    #[pyo3(signature = (op, handle=0, signal=0, data=None, eof=false, done=None))]
    #[allow(clippy::too_many_arguments)]
    fn procs(
        &self,
        py: Python<'_>,
        op: String,
        handle: u64,
        signal: i32,
        data: Option<Vec<u8>>,
        eof: bool,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let sb = self.handle()?;
        run_op(py, "processes", self.id_owned(), done, async move {
            let v = match op.as_str() {
                "list" => json(&sb.processes().await?),
                "signal" => {
                    sb.signal_process(handle, signal).await?;
                    serde_json::Value::Null
                }
                "stdin" => {
                    sb.write_process_stdin(handle, &data.unwrap_or_default(), eof)
                        .await?;
                    serde_json::Value::Null
                }
                "forget" => {
                    sb.forget_process(handle).await?;
                    serde_json::Value::Null
                }
                other => {
                    return Err(smolvm::Error::Invalid(format!(
                        "unknown process request {other:?}"
                    )))
                }
            };
            Ok(Out::Json(v))
        })
    }

    /// Forwards `host_addr:host_port` (0: a free port) to `guest_port` on
    /// the guest's loopback for this run; returns the forward as a dict.
    #[pyo3(signature = (guest_port, host_port=0, host_addr=None, done=None))]
    fn expose(
        &self,
        py: Python<'_>,
        guest_port: u16,
        host_port: u16,
        host_addr: Option<String>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let host_addr = match host_addr {
            None => std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            Some(a) => a.parse().map_err(|_| {
                raise(
                    "invalid_input",
                    &format!("host address {a:?} is not an IP address"),
                    self.id_owned().as_deref(),
                    None,
                    "expose_local",
                )
            })?,
        };
        let fwd = smolvm::config::PortForward {
            host_addr,
            host_port,
            guest_port,
        };
        let sb = self.handle()?;
        run_op(py, "expose_local", self.id_owned(), done, async move {
            Ok(Out::Json(net::forward_json(&sb.expose(fwd).await?)))
        })
    }

    /// Closes the forward on `host_port`; returns it as a dict.
    #[pyo3(signature = (host_port, done=None))]
    fn unexpose(
        &self,
        py: Python<'_>,
        host_port: u16,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let sb = self.handle()?;
        run_op(py, "unexpose_local", self.id_owned(), done, async move {
            Ok(Out::Json(net::forward_json(&sb.unexpose(host_port).await?)))
        })
    }

    /// Replaces the egress policy (JSON: `"open"`, `"off"`,
    /// `{"allowlist": {...}}`), at once on a running VM; returns it in its
    /// normal form.
    #[pyo3(signature = (policy_json, done=None))]
    fn set_egress(
        &self,
        py: Python<'_>,
        policy_json: &str,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let policy: smolvm::config::EgressPolicy =
            serde_json::from_str(policy_json).map_err(|e| {
                raise(
                    "invalid_input",
                    &format!("not an egress policy: {e}"),
                    self.id_owned().as_deref(),
                    None,
                    "set_internet_settings",
                )
            })?;
        let sb = self.handle()?;
        run_op(
            py,
            "set_internet_settings",
            self.id_owned(),
            done,
            async move {
                let p = sb.set_egress(policy).await?;
                Ok(Out::Json(serde_json::to_value(&p).unwrap_or_default()))
            },
        )
    }

    /// The VM's open forwards, as dicts (none unless it runs).
    #[pyo3(signature = (done=None))]
    fn ports(&self, py: Python<'_>, done: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        let sb = self.handle()?;
        run_op(py, "list_ports", self.id_owned(), done, async move {
            let list = sb.ports().await?;
            Ok(Out::Json(list.iter().map(net::forward_json).collect()))
        })
    }

    /// Sets SSH up (sshd in the guest, its host key pinned, a forward to
    /// it); returns the access as a dict (`argv`, `command_line`, ...).
    #[pyo3(signature = (done=None))]
    fn ensure_ssh(&self, py: Python<'_>, done: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        let (sb, cache) = (self.handle()?, self.ssh.clone());
        run_op(py, "ssh_commands", self.id_owned(), done, async move {
            Ok(Out::Json(net::access_json(
                &net::access(&sb, &cache).await?,
            )))
        })
    }

    /// Waits until an SSH login runs a command; returns the access.
    #[pyo3(signature = (timeout, done=None))]
    fn wait_for_ssh(
        &self,
        py: Python<'_>,
        timeout: f64,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let t = seconds("wait_for_ssh", "timeout", timeout)?;
        let (sb, cache) = (self.handle()?, self.ssh.clone());
        run_op(py, "wait_for_ssh", self.id_owned(), done, async move {
            net::check_running(&sb).await?;
            let a = sb.wait_for_ssh(t).await?;
            *cache.lock().unwrap_or_else(|p| p.into_inner()) = Some(a.clone());
            Ok(Out::Json(net::access_json(&a)))
        })
    }

    /// Runs `argv` through SSH (one connection per VM, kept open); the
    /// result has `exec`'s shape.
    #[pyo3(signature = (argv, env, cwd=None, timeout=None, max_output=None, done=None))]
    #[allow(clippy::too_many_arguments)]
    fn ssh_exec(
        &self,
        py: Python<'_>,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        timeout: Option<f64>,
        max_output: Option<usize>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        if argv.is_empty() {
            return Err(raise(
                "invalid_input",
                "the command is empty",
                self.id_owned().as_deref(),
                None,
                "run",
            ));
        }
        for (k, v) in &env {
            if smolvm::config::parse_env(&format!("{k}={v}")).is_err() || k.contains('=') {
                return Err(raise(
                    "invalid_input",
                    &format!(
                        "invalid environment variable {k:?}: over SSH keys match \
                         ^[A-Za-z_][A-Za-z0-9_]*$ and values hold no NUL"
                    ),
                    self.id_owned().as_deref(),
                    None,
                    "run",
                ));
            }
        }
        let timeout = timeout.map(|t| seconds("run", "timeout", t)).transpose()?;
        let cmd = net::SshCommand {
            argv,
            env,
            cwd,
            timeout,
            max_output,
        };
        let (sb, cache) = (self.handle()?, self.ssh.clone());
        run_op(py, "run", self.id_owned(), done, async move {
            Ok(Out::Exec(net::ssh_exec(&sb, &cache, cmd).await?))
        })
    }

    fn __repr__(&self) -> String {
        format!("<smolvm._native.Sandbox {:?}>", self.inner.id())
    }
}

fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}

fn tree_json(t: &smolvm::sandbox::TreeSummary) -> serde_json::Value {
    serde_json::json!({
        "files": t.files, "dirs": t.dirs, "symlinks": t.symlinks,
        "bytes": t.bytes, "skipped": t.skipped,
    })
}

/// A command running in the guest, its events read one at a time.
#[pyclass(module = "smolvm._native")]
pub struct Process {
    stream: Arc<tokio::sync::Mutex<Option<smolvm::sandbox::ExecStream>>>,
    stdin: smolvm::sandbox::StreamWriter,
    id: String,
}

impl Process {
    pub fn new(s: smolvm::sandbox::ExecStream, id: String) -> Process {
        let stdin = s.stdin();
        Process {
            stream: Arc::new(tokio::sync::Mutex::new(Some(s))),
            stdin,
            id,
        }
    }

    fn err(&self) -> impl Fn(smolvm::sandbox::ClientError) -> smolvm::Error + Send + 'static {
        let id = self.id.clone();
        move |source| smolvm::Error::Client {
            id: id.clone(),
            source,
        }
    }
}

#[pymethods]
impl Process {
    /// The next event (see `convert::event_tuple`); None after the end.
    #[pyo3(signature = (done=None))]
    fn next(&self, py: Python<'_>, done: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        let (s, err) = (self.stream.clone(), self.err());
        run_op(py, "run", Some(self.id.clone()), done, async move {
            let mut g = s.lock().await;
            let Some(st) = g.as_mut() else {
                return Ok(Out::Event(None));
            };
            st.next().await.map(Out::Event).map_err(err)
        })
    }

    #[pyo3(signature = (data, done=None))]
    fn write_stdin(
        &self,
        py: Python<'_>,
        data: Vec<u8>,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let (w, err) = (self.stdin.clone(), self.err());
        run_op(py, "write_stdin", Some(self.id.clone()), done, async move {
            w.write(&data).await.map_err(err)?;
            Ok(Out::None)
        })
    }

    #[pyo3(signature = (done=None))]
    fn close_stdin(&self, py: Python<'_>, done: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        let (w, err) = (self.stdin.clone(), self.err());
        run_op(py, "close_stdin", Some(self.id.clone()), done, async move {
            w.close().await.map_err(err)?;
            Ok(Out::None)
        })
    }

    #[pyo3(signature = (signal, done=None))]
    fn signal(&self, py: Python<'_>, signal: i32, done: Option<Py<PyAny>>) -> PyResult<Py<PyAny>> {
        let (w, err) = (self.stdin.clone(), self.err());
        run_op(py, "signal", Some(self.id.clone()), done, async move {
            w.signal(signal).await.map_err(err)?;
            Ok(Out::None)
        })
    }

    #[pyo3(signature = (rows, cols, done=None))]
    fn resize(
        &self,
        py: Python<'_>,
        rows: u16,
        cols: u16,
        done: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let (w, err) = (self.stdin.clone(), self.err());
        run_op(py, "resize", Some(self.id.clone()), done, async move {
            w.resize(rows, cols).await.map_err(err)?;
            Ok(Out::None)
        })
    }

    /// Stops reading: the guest process is killed (an attach detaches).
    /// Works while another thread waits in `next` (which then ends).
    fn cancel(&self) {
        runtime::enter(|| self.stdin.cancel());
        if let Ok(mut g) = self.stream.try_lock() {
            g.take();
        }
    }
}

/// Where the wheel's companion binaries (supervisor, guest agent) are.
#[pyfunction]
fn set_companion_dir(dir: std::path::PathBuf) {
    smolvm::locate::set_companion_dir(dir);
}

/// Raises unless `name` is a backend that can run here (`auto`, `qemu`).
#[pyfunction]
fn check_backend(name: &str) -> PyResult<()> {
    smolvm::backend::BackendKind::parse(name)
        .map(|_| ())
        .map_err(|e| {
            Python::attach(|py| match convert::error_value(py, &e, "create", None) {
                Ok(v) => PyErr::from_value(v),
                Err(e) => e,
            })
        })
}

/// `[[ADDR:]HOST:]GUEST` as a forward dict (the CLI's `-p` rule).
#[pyfunction]
fn parse_forward(spec: &str) -> PyResult<Py<PyAny>> {
    match smolvm::sandbox::parse_forward(spec) {
        Ok(f) => Python::attach(|py| Out::Json(net::forward_json(&f)).into_py(py)),
        Err(e) => Err(raise(
            e.kind().as_str(),
            &e.to_string(),
            None,
            None,
            "create",
        )),
    }
}

/// Where VMs and the inventory live (`SMOLVM_DATA_DIR`, as for the CLI).
#[pyfunction]
fn data_dir() -> std::path::PathBuf {
    smolvm::paths::data_dir()
}

/// Guest text made safe to show on a terminal (control characters escaped).
#[pyfunction]
fn escape_text(s: &str) -> String {
    smolvm::text::escape_multiline(s)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Sandbox>()?;
    m.add_class::<Task>()?;
    m.add_class::<Process>()?;
    m.add_function(wrap_pyfunction!(set_companion_dir, m)?)?;
    m.add_function(wrap_pyfunction!(data_dir, m)?)?;
    m.add_function(wrap_pyfunction!(check_backend, m)?)?;
    m.add_function(wrap_pyfunction!(escape_text, m)?)?;
    m.add_function(wrap_pyfunction!(parse_forward, m)?)?;
    Ok(())
}
