//! Node bindings of libtunnel: the raw native layer (napi-rs) under `index.js`.
//!
//! # Layout
//! - `lib.rs`: the process-wide Tokio runtime, the Promise helper every async export goes through,
//!   and the error mapping (`err.code` is the core's Node-style code, e.g. `ENOTALLOWED`).
//! - `keys`: shared-secret keys (`KID:BASE64`) and Ed25519 listener keys (parsing and the printed
//!   lines are the core's `libtunnel::client::keys`).
//!
//! Configuration is the core's (`libtunnel::client::ClientOptions`): what a constructor is not
//! given comes from the same `TUNNEL_*` variables every face reads.
//! - `dialer`: `NativeDialer` (dial → a socket fd, port forwards, a local SOCKS5 proxy).
//! - `listener`: `NativeListener` (register a name, accept streams as socket fds).
//! - `server`: `NativeServer`, an embedded relay.
//! - `logging`: routes `tracing` events to a JS callback.
//! - `events`: connection-state events (`libtunnel::client::events`) to a JS callback, and
//!   `NativeDial`, a dial that `cancel()` (an `AbortSignal` in `index.js`) drops.
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
mod events;
mod keys;
mod listener;
mod logging;
mod server;

/// Install the core's runtime (`libtunnel::runtime`: `TUNNEL_WORKER_THREADS` workers, default
/// one per core) as napi's before any export runs; napi drops it when the Node environment exits.
/// A bad `TUNNEL_WORKER_THREADS` is reported on stderr and the default used, as a module init
/// cannot throw.
#[napi::module_init]
fn init() {
    let rt = libtunnel::runtime::build(libtunnel::runtime::Workers::PerCore).or_else(|e| {
        eprintln!("libtunnel: {e}; using one worker per core");
        tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("libtunnel-rt").build()
    });
    napi::bindgen_prelude::create_custom_tokio_runtime(rt.expect("a Tokio runtime builds with default settings"));
}

/// Build the JS `Error` for a libtunnel error: `message` is the core's message, `code` its
/// Node-style code (`ENOTALLOWED`), `tunnelCode` its SCREAMING name (`NOT_ALLOWED`), as in the
/// C and Python faces.
pub(crate) fn js_error(env: &Env, e: &libtunnel::Error) -> napi::Error {
    match js_error_object(env, e) {
        Ok(obj) => napi::Error::from(obj.into_unknown()),
        Err(err) => err,
    }
}

/// The JS `Error` object of [`js_error`], as a value (an event's argument).
pub(crate) fn js_error_object(env: &Env, e: &libtunnel::Error) -> napi::Result<JsObject> {
    let mut obj = env.create_error(napi::Error::new(Status::GenericFailure, e.message().to_string()))?;
    obj.set_named_property("code", env.create_string(e.code().errno_name())?)?;
    obj.set_named_property("tunnelCode", env.create_string(e.code().name())?)?;
    Ok(obj)
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
    /// Whether retrying cannot help until something changes (a refusal): the core's
    /// `ErrorCode::is_final`, the one rule every face uses.
    #[napi(js_name = "final")]
    pub is_final: bool,
}

/// The core's error table, in numeric order.
#[napi(catch_unwind)]
pub fn error_codes() -> Vec<ErrorCodeInfo> {
    libtunnel::ErrorCode::ALL
        .iter()
        .map(|c| ErrorCodeInfo { number: c.number(), name: c.name().to_string(), code: c.errno_name().to_string(), is_final: c.is_final() })
        .collect()
}

/// Run the core's narrated demo (`tunnel demo`): relay, demo service and dials on loopback.
#[napi(ts_return_type = "Promise<void>")]
pub fn demo(env: Env) -> napi::Result<JsObject> {
    promise(&env, libtunnel::demo::run())
}

/// Milliseconds from JS as a `Duration`, checked by the core: NaN, negative, zero, `Infinity`
/// and absurd values are `EINVAL` errors, not panics.
pub(crate) fn millis(what: &str, ms: f64) -> libtunnel::Result<std::time::Duration> {
    libtunnel::client::checked_millis(what, ms)
}
