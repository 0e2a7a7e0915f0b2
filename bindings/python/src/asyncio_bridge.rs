//! Core futures as asyncio awaitables, delivered only through the interpreter gate.
//!
//! [`awaitable`] creates an `asyncio.Future` on the running loop, runs the core's future on our
//! runtime, and hands the outcome to the loop with `call_soon_threadsafe`, from a blocking-pool
//! thread attached through [`interpreter::attach`]: the gate's pass is held for the whole time
//! that thread is attached (conversion, the call into the loop, the release of the thread state),
//! so the `atexit` hook waits for it and nothing here touches Python once the interpreter
//! finalises (the awaitable then never completes; its outcome is dropped without Python).
//! pyo3-async-runtimes, used before, attached outside any such pass after converting the result
//! and when a task was cancelled, which crashed CPython at exit now and then ("PyGILState_Release:
//! thread state must be current when releasing").
//!
//! Cancelling the awaitable aborts the task, which drops the core's future (cancelling the dial,
//! bind or accept it stood for).

use std::future::Future;

use pyo3::prelude::*;
use pyo3::IntoPyObjectExt;

use crate::{error, interpreter, runtime};

/// Turn a core future into an asyncio awaitable (see the module doc).
pub(crate) fn awaitable<'py, T>(py: Python<'py>, fut: impl Future<Output = libtunnel::Result<T>> + Send + 'static) -> PyResult<Bound<'py, PyAny>>
where
    T: for<'a> IntoPyObject<'a> + Send + 'static,
{
    let event_loop = py.import("asyncio")?.call_method0("get_running_loop")?;
    let py_fut = event_loop.call_method0("create_future")?;
    let (loop_ref, fut_ref) = (event_loop.unbind(), py_fut.clone().unbind());
    let task = runtime().spawn(async move {
        let outcome = fut.await;
        // Never hold the interpreter on a worker thread: deliver from the blocking pool.
        let _ = tokio::task::spawn_blocking(move || deliver(loop_ref, fut_ref, outcome)).await;
    });
    py_fut.call_method1("add_done_callback", (AbortOnCancel(Some(task.abort_handle())),))?;
    Ok(py_fut)
}

/// Hand `outcome` to the loop that owns `fut`, through the gate.
fn deliver<T>(event_loop: Py<PyAny>, fut: Py<PyAny>, outcome: libtunnel::Result<T>)
where
    T: for<'a> IntoPyObject<'a>,
{
    interpreter::attach(move |py| {
        let sent = (|| -> PyResult<()> {
            let (ok, value) = match outcome.map_err(error::to_py).and_then(|v| v.into_py_any(py)) {
                Ok(v) => (true, v),
                Err(e) => (false, e.into_value(py).into_any()),
            };
            let settle = wrap_pyfunction!(settle, py)?;
            event_loop.bind(py).call_method1("call_soon_threadsafe", (settle, fut.bind(py), ok, value))?;
            Ok(())
        })();
        // A loop already closed (its program moved on without awaiting us): nothing to deliver to.
        drop(sent);
    });
}

/// On the loop's thread: set the awaitable's result or exception, unless it was cancelled (or
/// otherwise settled) meanwhile.
#[pyfunction]
fn settle(fut: &Bound<'_, PyAny>, ok: bool, value: Bound<'_, PyAny>) -> PyResult<()> {
    if fut.call_method0("done")?.extract::<bool>()? {
        return Ok(());
    }
    fut.call_method1(if ok { "set_result" } else { "set_exception" }, (value,))?;
    Ok(())
}

/// The awaitable's done callback: a cancelled awaitable aborts its task.
#[pyclass]
struct AbortOnCancel(Option<tokio::task::AbortHandle>);

#[pymethods]
impl AbortOnCancel {
    fn __call__(&mut self, fut: &Bound<'_, PyAny>) -> PyResult<()> {
        if fut.call_method0("cancelled")?.extract::<bool>()? {
            if let Some(task) = self.0.take() {
                task.abort();
            }
        }
        Ok(())
    }
}
