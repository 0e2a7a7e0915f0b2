//! Node bindings of libtunnel: the raw native layer (napi-rs) under `index.js`.
//!
//! # Layout
//! - `lib.rs`: the process-wide Tokio runtime, the Promise helper every async export goes through,
//!   and the error mapping (`err.code` is the core's Node-style code, e.g. `ENOTALLOWED`).
//! - `keys`: shared-secret keys (`KID:BASE64`) and Ed25519 listener keys.
//! - `dialer`: `NativeDialer` (dial → a socket fd, port forwards, a local SOCKS5 proxy).
//! - `listener`: `NativeListener` (register a name, accept streams as socket fds).
//! - `server`: `NativeServer`, an embedded relay.
//! - `logging`: routes `tracing` events to a JS callback.
//!
//! Streams reach JS as plain loopback TCP socket fds (`libtunnel::fd::into_socket`), which
//! `index.js` wraps in real `net.Socket`s; no protocol logic lives here.
//!
//! Event-loop liveness: a pending Promise keeps Node's loop alive (napi's deferred is a referenced
//! threadsafe function) and nothing else here does. So an open listener, whose `index.js` loop
//! always has an `accept()` pending, keeps the process alive; an idle dialer or a closed
//! listener does not. The log callback is unreferenced.

#![deny(clippy::all)]

use std::future::Future;

use napi::bindgen_prelude::ToNapiValue;
use napi::{Env, JsObject, Status};
use napi_derive::napi;

mod dialer;
mod keys;
mod listener;
mod logging;
mod server;

/// Environment variable that sets the runtime's worker thread count (default: Tokio's, one per
/// core).
const WORKERS_VAR: &str = "LIBTUNNEL_WORKER_THREADS";

/// Install our named, multi-thread runtime as napi's before any export runs; napi drops it when
/// the Node environment exits.
#[napi::module_init]
fn init() {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.enable_all().thread_name("libtunnel-rt");
    if let Some(n) = std::env::var(WORKERS_VAR).ok().and_then(|v| v.parse::<usize>().ok()).filter(|n| *n > 0) {
        b.worker_threads(n);
    }
    napi::bindgen_prelude::create_custom_tokio_runtime(b.build().expect("a Tokio runtime builds with default settings"));
}

/// Build the JS `Error` for a libtunnel error: `message` is the core's message, `code` its
/// Node-style code (`ENOTALLOWED`), `tunnelCode` its SCREAMING name (`NOT_ALLOWED`), as in the
/// C and Python faces.
pub(crate) fn js_error(env: &Env, e: &libtunnel::Error) -> napi::Error {
    let build = || -> napi::Result<JsObject> {
        let mut obj = env.create_error(napi::Error::new(Status::GenericFailure, e.message().to_string()))?;
        obj.set_named_property("code", env.create_string(e.code().errno_name())?)?;
        obj.set_named_property("tunnelCode", env.create_string(e.code().name())?)?;
        Ok(obj)
    };
    match build() {
        Ok(obj) => napi::Error::from(obj.into_unknown()),
        Err(err) => err,
    }
}

/// Map a core result for a synchronous export.
pub(crate) fn sync<T>(env: &Env, r: libtunnel::Result<T>) -> napi::Result<T> {
    r.map_err(|e| js_error(env, &e))
}

type Settle<T> = Box<dyn FnOnce(Env) -> napi::Result<T> + Send>;

/// Run `fut` on the runtime and return a Promise settled with its outcome. A panic inside `fut`
/// rejects with `EGENERAL` instead of leaving the Promise (and so the event loop) pending.
pub(crate) fn promise<T, F>(env: &Env, fut: F) -> napi::Result<JsObject>
where
    T: ToNapiValue + Send + 'static,
    F: Future<Output = libtunnel::Result<T>> + Send + 'static,
{
    let (deferred, promise) = env.create_deferred::<T, Settle<T>>()?;
    napi::bindgen_prelude::spawn(async move {
        let outcome = match tokio::spawn(fut).await {
            Ok(r) => r,
            Err(e) => Err(libtunnel::Error::new(libtunnel::ErrorCode::General, format!("libtunnel task failed: {e}"))),
        };
        let settle: Settle<T> = match outcome {
            Ok(v) => Box::new(move |_| Ok(v)),
            Err(e) => Box::new(move |env| Err(js_error(&env, &e))),
        };
        deferred.resolve(settle);
    });
    Ok(promise)
}

/// One row of the stable error table.
#[napi(object)]
pub struct ErrorCodeInfo {
    /// Stable number (1..).
    pub number: u32,
    /// SCREAMING name (`NOT_ALLOWED`), as in the C and Python faces.
    pub name: String,
    /// Node-style code (`ENOTALLOWED`): what `err.code` holds.
    pub code: String,
}

/// The core's error table, in numeric order.
#[napi(catch_unwind)]
pub fn error_codes() -> Vec<ErrorCodeInfo> {
    libtunnel::ErrorCode::ALL
        .iter()
        .map(|c| ErrorCodeInfo { number: c.number(), name: c.name().to_string(), code: c.errno_name().to_string() })
        .collect()
}

/// Run the core's narrated demo (`tunnel demo`): relay, demo service and dials on loopback.
#[napi(ts_return_type = "Promise<void>")]
pub fn demo(env: Env) -> napi::Result<JsObject> {
    promise(&env, libtunnel::demo::run())
}

/// Milliseconds from JS to a `Duration` (negative or NaN means zero).
pub(crate) fn millis(ms: f64) -> std::time::Duration {
    std::time::Duration::from_secs_f64((ms / 1000.0).max(0.001))
}
