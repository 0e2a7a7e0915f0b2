//! The interpreter's lifetime as libtunnel's own threads see it: one gate that every path running
//! outside a Python thread (the runtime's workers and blocking pool, the log bridge, event
//! callbacks, asyncio results) passes before it touches Python.
//!
//! CPython runs `atexit` hooks, then marks itself uninitialised and tears down; a thread that
//! tries to attach after that makes pyo3 panic ("The Python interpreter is not initialized") and
//! could crash CPython itself. The module registers [`close`] with `atexit` at import: it shuts
//! the gate, then waits (with the GIL released, so they can finish) for the paths already inside
//! it. From then on [`attach`] returns `None` without calling into Python, so nothing on a
//! libtunnel thread can reach the interpreter while it finalises. Objects that the paths would
//! have delivered are dropped without Python (pyo3 queues their reference counts, it never
//! attaches for that).

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pyo3::prelude::*;

/// How long [`close`] waits for paths already inside the gate (a Python callback that blocks
/// longer is not waited for: the exit must not hang on it).
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

struct State {
    /// False once `atexit` ran [`close`].
    open: bool,
    /// Paths holding a [`Pass`].
    inside: usize,
}

static STATE: Mutex<State> = Mutex::new(State { open: true, inside: 0 });
static LEFT: Condvar = Condvar::new();

fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Permission to touch Python, held while a path does so; [`close`] waits for every pass to be
/// dropped. `Send`, so a result can carry it to the thread that delivers it.
pub(crate) struct Pass(());

impl Drop for Pass {
    fn drop(&mut self) {
        let mut s = state();
        s.inside -= 1;
        if s.inside == 0 {
            LEFT.notify_all();
        }
    }
}

/// A pass, or `None` once the interpreter is finalising.
pub(crate) fn enter() -> Option<Pass> {
    let mut s = state();
    if !s.open {
        return None;
    }
    s.inside += 1;
    Some(Pass(()))
}

/// Run `f` attached to the interpreter, unless it is finalising (then `None`, and `f` is dropped
/// without running). Use it instead of `Python::attach` on every thread Python does not own.
pub(crate) fn attach<R>(f: impl for<'py> FnOnce(Python<'py>) -> R) -> Option<R> {
    let _pass = enter()?;
    Python::try_attach(f)
}

/// The `atexit` hook: shut the gate and let the paths inside it finish (`_native._interpreter_exit`,
/// private: only `atexit` calls it).
#[pyfunction(name = "_interpreter_exit")]
pub(crate) fn close(py: Python<'_>) {
    py.detach(|| {
        let deadline = Instant::now() + DRAIN_LIMIT;
        let mut s = state();
        s.open = false;
        while s.inside > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = LEFT.wait_timeout(s, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    });
}

/// A `log::Log` that forwards to pyo3-log's bridge only through the gate: the core logs from
/// every runtime thread, at any time, including while the interpreter finalises.
pub(crate) struct GatedLogger(pub(crate) pyo3_log::Logger);

impl log::Log for GatedLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        // The bridge's `enabled` may attach (an uncached logger level).
        enter().is_some_and(|_pass| self.0.enabled(metadata))
    }

    fn log(&self, record: &log::Record<'_>) {
        if let Some(_pass) = enter() {
            self.0.log(record);
        }
    }

    fn flush(&self) {
        if let Some(_pass) = enter() {
            self.0.flush();
        }
    }
}
