//! Python bindings of libtunnel: the private native module `libtunnel._native`, wrapped by the
//! typed pure-Python package `libtunnel` (under `python/`), which is the public API.
//!
//! Data flow: Python calls a method here; blocking methods run the core's future on the
//! process-wide Tokio runtime through [`wait`] with the GIL released, async methods hand the same
//! future to asyncio through `asyncio_bridge`. Every tunnel stream leaves Rust as a plain
//! socket file descriptor (`libtunnel::fd::into_socket`), so Python gets a real `socket.socket`.
//!
//! # Layout
//! - `lib.rs`: the runtime, the blocking-wait helper and the module definition.
//! - `error`: core errors to the `libtunnel` exception hierarchy (by the core's stable code names).
//! - `handles`: an owned socket handed to Python, and a background task (forward, expose).
//! - `dialer`: `Dialer` (dial, forward). `listener`: `Listener` (bind, accept, expose).
//! - `relay`: the embedded relay. `keys`: key generation and the text `keygen` prints.
//! - `events`: connection-state events to a Python callable (`Watch`).
//! - `asyncio_bridge`: core futures as asyncio awaitables, delivered through the gate.
//! - `interpreter`: the gate every libtunnel thread passes before touching Python, shut by an
//!   `atexit` hook so nothing reaches the interpreter while it finalises.
//!
//! Configuration is the core's (`libtunnel::client::ClientOptions`): what a constructor is not
//! given comes from the same `TUNNEL_*` variables every face reads.

mod asyncio_bridge;
mod dialer;
mod error;
mod events;
mod handles;
mod interpreter;
mod keys;
mod listener;
mod relay;

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use pyo3::prelude::*;
use tokio::runtime::Runtime;

pub(crate) use asyncio_bridge::awaitable;

/// The one runtime of the process (ARCHITECTURE section 3), built by the core's
/// `libtunnel::runtime` when the module is imported (`TUNNEL_WORKER_THREADS` workers, default one
/// per core; a bad value fails the import with a `ConfigError`). Never shut down: its tasks bridge
/// the sockets handed to Python, which may outlive any object here.
static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// The runtime (set before any class of this module can be used).
pub(crate) fn runtime() -> &'static Runtime {
    RUNTIME.get().expect("the module init builds the runtime before anything can use it")
}

/// How often a blocking wait wakes to run Python's signal handlers (Ctrl-C cancels the wait).
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Run `fut` to completion on the runtime with the GIL released, polling Python's signal handlers
/// every [`SIGNAL_POLL`]: an exception raised by a handler (`KeyboardInterrupt`) drops the future,
/// which cancels the operation, and is raised to the caller.
pub(crate) fn wait<T: Send>(py: Python<'_>, fut: impl Future<Output = libtunnel::Result<T>> + Send) -> PyResult<T> {
    let outcome: PyResult<libtunnel::Result<T>> = py.detach(|| {
        runtime().block_on(async {
            tokio::pin!(fut);
            let mut tick = tokio::time::interval(SIGNAL_POLL);
            tick.tick().await; // the first tick is immediate
            loop {
                tokio::select! {
                    r = &mut fut => return Ok(r),
                    // A daemon thread can still wait here while the interpreter finalises:
                    // then there are no signal handlers to run.
                    _ = tick.tick() => interpreter::attach(|py| py.check_signals()).unwrap_or(Ok(()))?,
                }
            }
        })
    });
    outcome?.map_err(error::to_py)
}

/// Seconds from Python (`None` = no limit) as a `Duration`, checked by the core (NaN, negative,
/// zero, infinite and absurd values raise `ConfigError` with code `INVALID_ARGUMENT`).
pub(crate) fn seconds(what: &str, secs: Option<f64>) -> PyResult<Option<Duration>> {
    secs.map(|s| libtunnel::client::checked_seconds(what, s)).transpose().map_err(error::to_py)
}

/// Drop Python-side logger levels cached by the log bridge (call after changing `logging` config).
#[pyfunction]
fn reset_logging() {
    if let Some(h) = LOG_RESET.get() {
        h.reset();
    }
}

static LOG_RESET: std::sync::OnceLock<pyo3_log::ResetHandle> = std::sync::OnceLock::new();

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    // The core's events (targets `libtunnel::…`) reach the Python logger `libtunnel.…`; other
    // crates only from warnings up, so their debug chatter never takes the GIL.
    // The bridge sits behind the interpreter gate: the runtime's threads log at any time.
    let logger = pyo3_log::Logger::new(py, pyo3_log::Caching::LoggersAndLevels)?
        .filter(log::LevelFilter::Warn)
        .filter_target("libtunnel".to_owned(), log::LevelFilter::Trace);
    let reset = logger.reset_handle();
    if log::set_boxed_logger(Box::new(interpreter::GatedLogger(logger))).is_ok() {
        log::set_max_level(log::LevelFilter::Trace);
        let _ = LOG_RESET.set(reset);
    }
    // Registered at import, so it runs before the interpreter finalises (and after the `atexit`
    // hooks registered later, which may still use libtunnel).
    py.import("atexit")?.call_method1("register", (wrap_pyfunction!(interpreter::close, m)?,))?;
    if RUNTIME.get().is_none() {
        let rt = libtunnel::runtime::build(libtunnel::runtime::Workers::PerCore).map_err(error::to_py)?;
        let _ = RUNTIME.set(rt);
    }
    m.add("ERROR_CODES", libtunnel::ErrorCode::ALL.iter().map(|c| c.name()).collect::<Vec<_>>())?;
    m.add_function(wrap_pyfunction!(reset_logging, m)?)?;
    m.add_function(wrap_pyfunction!(keys::keygen, m)?)?;
    m.add_function(wrap_pyfunction!(keys::listener_keygen, m)?)?;
    m.add_function(wrap_pyfunction!(keys::identity_name, m)?)?;
    m.add_function(wrap_pyfunction!(keys::keygen_text, m)?)?;
    m.add_function(wrap_pyfunction!(keys::listener_keygen_text, m)?)?;
    m.add_class::<handles::Socket>()?;
    m.add_class::<handles::Background>()?;
    m.add_class::<events::Watch>()?;
    m.add_class::<dialer::Dialer>()?;
    m.add_class::<listener::Listener>()?;
    m.add_class::<relay::Relay>()?;
    Ok(())
}
