//! The one Tokio runtime of the process, started on first use. Its worker threads are named
//! `libtunnel-rt` (built by the core's `libtunnel::runtime`: `TUNNEL_WORKER_THREADS` sets how
//! many, default one per core). Blocking exports run their
//! future with `block_on` on the caller's thread, after two checks: a caller that is already on
//! a runtime thread (say, inside a log callback) gets `TUNNEL_RESULT_WRONG_THREAD` rather than a
//! Tokio panic, and a child forked after the runtime started (whose copy has no threads) gets
//! `TUNNEL_RESULT_FORKED_CHILD` rather than a hang.

use std::future::Future;

use once_cell::sync::Lazy;
use tokio::runtime::{Handle, Runtime};

use crate::error::{tunnel_result, Fail};

/// The runtime and the PID of the process that started it.
struct ProcessRuntime {
    rt: Runtime,
    pid: u32,
}

static RUNTIME: Lazy<Result<ProcessRuntime, String>> = Lazy::new(|| {
    libtunnel::runtime::build(libtunnel::runtime::Workers::PerCore)
        .map(|rt| ProcessRuntime { rt, pid: std::process::id() })
        .map_err(|e| e.to_string())
});

/// The runtime, if this thread may block on it.
pub fn runtime() -> Result<&'static Runtime, Fail> {
    let shared = RUNTIME.as_ref().map_err(|e| Fail::new(tunnel_result::RuntimeFailed, e.clone()))?;
    if shared.pid != std::process::id() {
        return Err(Fail::new(
            tunnel_result::ForkedChild,
            "libtunnel was started in the parent of this forked process and cannot run here; use it in the parent, or exec before using it",
        ));
    }
    if Handle::try_current().is_ok() {
        return Err(Fail::new(
            tunnel_result::WrongThread,
            "a blocking libtunnel call was made from a runtime thread (inside a libtunnel callback?); call it from your own thread",
        ));
    }
    Ok(&shared.rt)
}

/// Run `work` to completion on the runtime, blocking the calling thread.
pub fn block_on<F: Future>(work: F) -> Result<F::Output, Fail> {
    Ok(runtime()?.block_on(work))
}

/// Whether this thread could block on the runtime now (used by `_free` functions, which must not
/// fail and fall back to a non-blocking teardown).
pub fn usable() -> bool {
    RUNTIME.as_ref().is_ok_and(|s| s.pid == std::process::id()) && Handle::try_current().is_err()
}
