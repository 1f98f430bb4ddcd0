//! One tokio runtime per process, and running the library's futures on it
//! for Python: blocking (GIL released, interruptible) or with a callback.

use crate::convert::{error_value, raise, Out};
use pyo3::prelude::*;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::runtime::Runtime;

/// How often a blocked call looks for a pending signal (Ctrl-C).
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

thread_local! {
    /// True on the runtime's own threads.
    static OURS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The runtime and the process it was made in: after a `fork` the child
/// has none of its threads, so it gets a runtime of its own.
static RUNTIME: Mutex<Option<(u32, Arc<Runtime>)>> = Mutex::new(None);

/// Runs `f` inside this process's runtime (for calls that may spawn a
/// task), or without one when it cannot start.
pub fn enter<R>(f: impl FnOnce() -> R) -> R {
    match runtime() {
        Ok(rt) => {
            let _g = rt.enter();
            f()
        }
        Err(_) => f(),
    }
}

fn runtime() -> PyResult<Arc<Runtime>> {
    let mut g = RUNTIME.lock().unwrap_or_else(|p| p.into_inner());
    let pid = std::process::id();
    if let Some((p, rt)) = g.as_ref() {
        if *p == pid {
            return Ok(rt.clone());
        }
    }
    if let Some((_, parents)) = g.take() {
        // Its worker threads exist only in the parent: dropping it here
        // would wait for them forever.
        std::mem::forget(parents);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("smolvm-rt")
        .on_thread_start(|| OURS.with(|o| o.set(true)))
        .enable_all()
        .build()
        .map_err(|e| {
            raise(
                "io",
                &format!("cannot start smolvm's async runtime: {e}"),
                None,
                None,
                "runtime",
            )
        })?;
    let rt = Arc::new(rt);
    *g = Some((pid, rt.clone()));
    Ok(rt)
}

/// Work that undoes a cancelled operation (a boot still under way).
pub type Cleanup = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How an operation behaves when it is interrupted.
#[derive(Default)]
pub struct OpOpts {
    /// For this long Ctrl-C waits for it to finish (a delete half done
    /// would leave a VM behind); the signal is handled right after.
    pub uninterruptible_for: Duration,
    /// Run after the operation was cancelled (it decides itself whether
    /// there is anything to undo).
    pub on_cancel: Option<Cleanup>,
    /// Ctrl-C lets the operation finish rather than drop it halfway (a
    /// snapshot, restore or fork cut short can leave a VM damaged or a
    /// half-made one behind); the interrupt is raised once it is done.
    pub finish_on_interrupt: bool,
    /// The VMs the operation returns are new ones nobody else knows of (a
    /// create, a restore into a new id, a fork): those that come back
    /// after an interrupt are deleted. Otherwise (`from_id`, a restore
    /// into its source) they are left alone.
    pub owns_result: bool,
}

/// How long a cancelled operation's undoing may take.
const CLEANUP_WAIT: Duration = Duration::from_secs(30);

/// How long an interrupted `finish_on_interrupt` operation is waited for.
const FINISH_WAIT: Duration = Duration::from_secs(600);

/// Deletes the VMs of a result nobody will get.
async fn discard(out: Out) {
    let vms = match out {
        Out::Sandbox(sb) => vec![*sb],
        Out::Sandboxes(v) => v,
        _ => return,
    };
    for sb in vms {
        let why = match tokio::time::timeout(CLEANUP_WAIT, sb.delete()).await {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer in {}s", CLEANUP_WAIT.as_secs()),
        };
        crate::warn(&format!(
            "removing VM {} (made by an interrupted call): {why}",
            sb.id()
        ));
    }
}

/// A running operation started with a `done` callback.
#[pyclass(frozen, module = "smolvm._native")]
pub struct Task {
    abort: tokio::task::AbortHandle,
    rt: Arc<Runtime>,
    on_cancel: Mutex<Option<Cleanup>>,
}

#[pymethods]
impl Task {
    /// Cancels the operation (its `done` is then never called). What it
    /// had started is undone as when a blocking call is interrupted.
    fn cancel(&self) {
        if self.abort.is_finished() {
            return;
        }
        self.abort.abort();
        let cleanup = self
            .on_cancel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(c) = cleanup {
            let abort = self.abort.clone();
            self.rt.spawn(async move {
                // Only once the operation is gone: it may be mid-step.
                while !abort.is_finished() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let _ = tokio::time::timeout(CLEANUP_WAIT, c).await;
            });
        }
    }

    /// True once the operation has ended (or was cancelled).
    fn done(&self) -> bool {
        self.abort.is_finished()
    }
}

/// Runs `fut` for operation `op` on VM `vm_id`: blocking when `done` is
/// None, else in the background, calling `done(ok, value)` at the end.
pub fn run_op<F>(
    py: Python<'_>,
    op: &'static str,
    vm_id: Option<String>,
    done: Option<Py<PyAny>>,
    fut: F,
) -> PyResult<Py<PyAny>>
where
    F: Future<Output = smolvm::Result<Out>> + Send + 'static,
{
    run_op_with(py, op, vm_id, done, OpOpts::default(), fut)
}

/// [`run_op`] with a say in how interruption is handled.
pub fn run_op_with<F>(
    py: Python<'_>,
    op: &'static str,
    vm_id: Option<String>,
    done: Option<Py<PyAny>>,
    opts: OpOpts,
    fut: F,
) -> PyResult<Py<PyAny>>
where
    F: Future<Output = smolvm::Result<Out>> + Send + 'static,
{
    if done.is_none() && OURS.with(|o| o.get()) {
        return Err(raise(
            "invalid_state",
            "a smolvm call was made from inside a smolvm callback (progress or an async \
             completion); call it from your own thread or task instead",
            vm_id.as_deref(),
            None,
            op,
        ));
    }
    let rt = runtime()?;
    match done {
        None => {
            // The result comes back over a channel, so the waiting thread
            // needs no runtime of its own (it may belong to another
            // program's tokio runtime).
            let (tx, mut rx) = std::sync::mpsc::sync_channel(1);
            let task = rt.spawn(async move {
                let _ = tx.send(fut.await);
            });
            let started = std::time::Instant::now();
            loop {
                // `&mut`: a `Receiver` is `Send` but not `Sync`.
                let r = &mut rx;
                let waited = py.detach(move || r.recv_timeout(SIGNAL_CHECK));
                match waited {
                    Ok(Ok(out)) => return out.into_py(py),
                    Ok(Err(e)) => {
                        return Err(PyErr::from_value(error_value(
                            py,
                            &e,
                            op,
                            vm_id.as_deref(),
                        )?))
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        return Err(panicked(op));
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                        if started.elapsed() < opts.uninterruptible_for => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        if let Err(interrupted) = py.check_signals() {
                            // Dropping the operation undoes what it began
                            // (a create's row and directory, a command),
                            // and `on_cancel` the rest (a boot under way).
                            let wait = if opts.finish_on_interrupt {
                                FINISH_WAIT
                            } else {
                                task.abort();
                                CLEANUP_WAIT
                            };
                            let rt2 = rt.clone();
                            let cleanup = opts.on_cancel;
                            let owns = opts.owns_result;
                            py.detach(move || {
                                let late = rx.recv_timeout(wait);
                                rt2.block_on(async {
                                    // It finished (just before the abort, or
                                    // as it was let to): VMs it made are
                                    // nobody's now.
                                    if let (true, Ok(Ok(out))) = (owns, late) {
                                        discard(out).await;
                                    }
                                    if let Some(c) = cleanup {
                                        let _ = tokio::time::timeout(CLEANUP_WAIT, c).await;
                                    }
                                })
                            });
                            return Err(interrupted);
                        }
                    }
                }
            }
        }
        Some(done) => {
            let handle = rt.spawn(async move {
                let r = fut.await;
                Python::attach(|py| {
                    let (ok, value) = match r.map(|out| out.into_py(py)) {
                        Ok(Ok(v)) => (true, v),
                        Ok(Err(e)) => (false, e.value(py).clone().into_any().unbind()),
                        Err(e) => match error_value(py, &e, op, vm_id.as_deref()) {
                            Ok(v) => (false, v.unbind()),
                            Err(e) => (false, e.value(py).clone().into_any().unbind()),
                        },
                    };
                    // The loop may be closed by now: nobody is waiting.
                    if let Err(e) = done.call1(py, (ok, value)) {
                        e.print(py);
                    }
                });
            });
            let task = Task {
                abort: handle.abort_handle(),
                rt: rt.clone(),
                on_cancel: Mutex::new(opts.on_cancel),
            };
            Ok(Py::new(py, task)?.into_any())
        }
    }
}

fn panicked(op: &str) -> PyErr {
    raise(
        "io",
        &format!(
            "smolvm {op} failed inside the library (it panicked); this is a bug, please report it"
        ),
        None,
        None,
        op,
    )
}
