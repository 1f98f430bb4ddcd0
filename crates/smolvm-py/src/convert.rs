//! Library values and errors as Python objects.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use smolvm::image::ImageEvent;
use smolvm::sandbox::Progress;

/// What an operation gives back, before it is turned into Python.
pub enum Out {
    None,
    Sandbox(Box<smolvm::Sandbox>),
    /// New VMs (a fork's children).
    Sandboxes(Vec<smolvm::Sandbox>),
    /// A VM's info, with fields added to it (what the config holds).
    Info(Box<smolvm::sandbox::VmInfo>, Option<serde_json::Value>),
    List(Vec<smolvm::sandbox::VmInfo>),
    Exec(smolvm::ExecOutput),
    Seconds(f64),
    /// Plain data (stats, listings, env, counts), through JSON.
    Json(serde_json::Value),
    /// One event of a streamed command; `None` after its end.
    Event(Option<smolvm::sandbox::ExecEvent>),
    /// A streamed command, started (and the id of its VM).
    Stream(Box<smolvm::sandbox::ExecStream>, String),
}

impl Out {
    pub fn into_py(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(match self {
            Out::None => py.None(),
            Out::Sandbox(sb) => Py::new(py, crate::Sandbox::new(*sb))?.into_any(),
            Out::Sandboxes(v) => {
                let items = v
                    .into_iter()
                    .map(|sb| Py::new(py, crate::Sandbox::new(sb)))
                    .collect::<PyResult<Vec<_>>>()?;
                pyo3::types::PyList::new(py, items)?.into_any().unbind()
            }
            Out::Info(info, extra) => info_dict(py, &info, extra)?.unbind(),
            Out::List(infos) => {
                let items = infos
                    .iter()
                    .map(|i| info_dict(py, i, None))
                    .collect::<PyResult<Vec<_>>>()?;
                pyo3::types::PyList::new(py, items)?.into_any().unbind()
            }
            Out::Exec(o) => {
                let fields: Vec<Bound<'_, PyAny>> = vec![
                    o.exit_code.into_pyobject(py)?.into_any(),
                    o.signal.into_pyobject(py)?.into_any(),
                    pyo3::types::PyBool::new(py, o.timed_out)
                        .to_owned()
                        .into_any(),
                    PyBytes::new(py, &o.stdout).into_any(),
                    PyBytes::new(py, &o.stderr).into_any(),
                    pyo3::types::PyBool::new(py, o.truncated)
                        .to_owned()
                        .into_any(),
                    o.duration_ms.into_pyobject(py)?.into_any(),
                ];
                PyTuple::new(py, fields)?.into_any().unbind()
            }
            Out::Seconds(s) => s.into_pyobject(py)?.into_any().unbind(),
            Out::Json(v) => py
                .import("json")?
                .call_method1("loads", (v.to_string(),))?
                .unbind(),
            Out::Event(ev) => event_tuple(py, ev)?,
            Out::Stream(s, id) => Py::new(py, crate::Process::new(*s, id))?.into_any(),
        })
    }
}

/// A VM's info as a dict, through its JSON form (the same fields as
/// `smolvm info --json`).
fn info_dict<'py>(
    py: Python<'py>,
    info: &smolvm::sandbox::VmInfo,
    extra: Option<serde_json::Value>,
) -> PyResult<Bound<'py, PyAny>> {
    let mut v = serde_json::to_value(info).map_err(|e| {
        raise(
            "io",
            &format!("cannot encode VM info: {e}"),
            Some(&info.id),
            None,
            "info",
        )
    })?;
    // The recorded reason may quote the guest (a panic line): escaped.
    if let Some(serde_json::Value::String(s)) = v.get_mut("last_error") {
        *s = smolvm::text::escape_line(s);
    }
    if let (Some(serde_json::Value::Object(add)), Some(obj)) = (extra, v.as_object_mut()) {
        obj.extend(add);
    }
    let text = v.to_string();
    py.import("json")?.call_method1("loads", (text,))
}

/// `(kind, text)` of a progress event, for the Python callback. Tool
/// output is escaped: it may be shown on a terminal.
pub fn progress_text(p: &Progress) -> (&'static str, String) {
    match p {
        Progress::Image(ImageEvent::Step {
            index,
            total,
            label,
        }) => ("image", format!("image step {index}/{total}: {label}")),
        Progress::Image(ImageEvent::Log(line)) => ("log", smolvm::text::escape_line(line)),
        Progress::Image(ImageEvent::Done { elapsed, .. }) => (
            "image",
            format!("image ready in {:.1}s", elapsed.as_secs_f64()),
        ),
        Progress::Step(s) => ("step", smolvm::text::escape_line(s)),
    }
}

/// Details an exception carries besides its message.
fn details<'py>(py: Python<'py>, e: &smolvm::Error) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    if matches!(e, smolvm::Error::Image(_)) {
        d.set_item("subject", "image")?;
    }
    match e {
        smolvm::Error::InvalidState { state, .. } => d.set_item("state", state.as_str())?,
        smolvm::Error::Timeout { after, what, .. } => {
            d.set_item("timeout_seconds", after.as_secs_f64())?;
            d.set_item("what", smolvm::text::escape_line(what))?;
        }
        smolvm::Error::Boot { timed_out, .. } => d.set_item("timed_out", *timed_out)?,
        smolvm::Error::SnapshotNotFound(id)
        | smolvm::Error::SnapshotExists(id)
        | smolvm::Error::SnapshotInvalid { id, .. } => d.set_item("snapshot_id", id)?,
        _ => {}
    }
    Ok(d)
}

/// The `smolvm.exceptions` instance for a library error.
pub fn error_value<'py>(
    py: Python<'py>,
    e: &smolvm::Error,
    op: &str,
    vm_id: Option<&str>,
) -> PyResult<Bound<'py, PyAny>> {
    let message = smolvm::text::escape_line(&smolvm::error::chain(e));
    build(
        py,
        e.kind().as_str(),
        &message,
        vm_id,
        e.console_tail(),
        op,
        details(py, e)?,
    )
}

fn build<'py>(
    py: Python<'py>,
    kind: &str,
    message: &str,
    vm_id: Option<&str>,
    console_tail: Option<&str>,
    op: &str,
    details: Bound<'py, PyDict>,
) -> PyResult<Bound<'py, PyAny>> {
    let make = py.import("smolvm.exceptions")?.getattr("_from_native")?;
    make.call1((kind, message, vm_id, console_tail, op, details))
}

/// A `smolvm.exceptions` error of `kind` made here (bad arguments and the
/// like), as a `PyErr`.
pub fn raise(
    kind: &str,
    message: &str,
    vm_id: Option<&str>,
    console_tail: Option<&str>,
    op: &str,
) -> PyErr {
    Python::attach(|py| {
        let value = PyDict::new(py);
        match build(py, kind, message, vm_id, console_tail, op, value) {
            Ok(v) => PyErr::from_value(v),
            // Without the Python package (the module loaded on its own).
            Err(_) => pyo3::exceptions::PyRuntimeError::new_err(format!("{kind}: {message}")),
        }
    })
}

/// `(kind, payload)` of an exec event: `("started", pid)`, `("stdout",
/// bytes)`, `("stderr", bytes)`, `("exit", (code, signal, timed_out,
/// duration_ms))`, `("error", (kind, message))`; `None` after the end.
fn event_tuple(py: Python<'_>, ev: Option<smolvm::sandbox::ExecEvent>) -> PyResult<Py<PyAny>> {
    use smolvm::sandbox::ExecEvent as E;
    let Some(ev) = ev else {
        return Ok(py.None());
    };
    let (kind, payload): (&str, Bound<'_, PyAny>) = match ev {
        E::Started { pid } => ("started", pid.into_pyobject(py)?.into_any()),
        E::Stdout(b) => ("stdout", PyBytes::new(py, &b).into_any()),
        E::Stderr(b) => ("stderr", PyBytes::new(py, &b).into_any()),
        E::Exited(st) => (
            "exit",
            (st.code, st.signal, st.timed_out, st.duration_ms)
                .into_pyobject(py)?
                .into_any(),
        ),
        E::Attached { offset, dropped } => {
            ("attached", (offset, dropped).into_pyobject(py)?.into_any())
        }
        E::Failed(e) => (
            "error",
            (e.kind.as_str(), smolvm::text::escape_line(&e.message))
                .into_pyobject(py)?
                .into_any(),
        ),
    };
    Ok(
        PyTuple::new(py, [kind.into_pyobject(py)?.into_any(), payload])?
            .into_any()
            .unbind(),
    )
}
