//! Routes the core's `tracing` events to a JS callback `(level, target, message)`.
//!
//! A global subscriber is installed on the first `setLogger` call: a reloadable `EnvFilter`
//! (`RUST_LOG` syntax) in front of a layer that formats each event and queues it to the callback
//! through an unreferenced, non-blocking ThreadsafeFunction, so logging never keeps the process
//! alive and never blocks a runtime thread.

use std::sync::Mutex;

use napi::threadsafe_function::{ErrorStrategy, ThreadSafeCallContext, ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::{Env, JsFunction};
use napi_derive::napi;
use once_cell::sync::OnceCell;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// One formatted event on its way to JS.
struct Record {
    level: &'static str,
    target: String,
    message: String,
}

type LogFn = ThreadsafeFunction<Record, ErrorStrategy::Fatal>;

/// The current callback; `None` after `setLogger(null)`. Replaced, never called while held longer
/// than one queue push.
static CALLBACK: Mutex<Option<LogFn>> = Mutex::new(None);

/// Changes the filter of the installed subscriber; set once, on the first `setLogger`.
static FILTER: OnceCell<reload::Handle<EnvFilter, Registry>> = OnceCell::new();

struct JsLayer;

impl<S: tracing::Subscriber> Layer<S> for JsLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let guard = CALLBACK.lock().unwrap_or_else(|p| p.into_inner());
        let Some(cb) = guard.as_ref() else { return };
        let message = libtunnel::log_line::event_line(event);
        let meta = event.metadata();
        let level = match *meta.level() {
            tracing::Level::ERROR => "error",
            tracing::Level::WARN => "warn",
            tracing::Level::INFO => "info",
            tracing::Level::DEBUG => "debug",
            tracing::Level::TRACE => "trace",
        };
        cb.call(Record { level, target: meta.target().to_string(), message }, ThreadsafeFunctionCallMode::NonBlocking);
    }
}

/// Send the core's log events to `callback(level, target, message)`, filtered by `filter`
/// (`RUST_LOG` syntax, default `info`). `null` stops forwarding.
#[napi(catch_unwind, ts_args_type = "callback: ((level: string, target: string, message: string) => void) | null, filter?: string")]
pub fn set_logger(env: Env, callback: Option<JsFunction>, filter: Option<String>) -> napi::Result<()> {
    let filter = if callback.is_some() { filter.unwrap_or_else(|| "info".into()) } else { "off".into() };
    let parsed = EnvFilter::try_new(&filter).map_err(|e| napi::Error::new(napi::Status::InvalidArg, format!("bad log filter {filter:?}: {e}")))?;
    let tsfn = match callback {
        Some(f) => {
            let mut t: LogFn = f.create_threadsafe_function(0, |ctx: ThreadSafeCallContext<Record>| {
                Ok(vec![
                    ctx.env.create_string(ctx.value.level)?,
                    ctx.env.create_string(&ctx.value.target)?,
                    ctx.env.create_string(&ctx.value.message)?,
                ])
            })?;
            t.unref(&env)?;
            Some(t)
        }
        None => None,
    };
    *CALLBACK.lock().unwrap_or_else(|p| p.into_inner()) = tsfn;
    match FILTER.get() {
        Some(h) => h.reload(parsed).map_err(|e| napi::Error::from_reason(format!("cannot change the log filter: {e}")))?,
        None => {
            let (layer, handle) = reload::Layer::new(parsed);
            // Another subscriber may already be global (an embedding app's); then ours stays off.
            if tracing_subscriber::registry().with(layer).with(JsLayer).try_init().is_ok() {
                let _ = FILTER.set(handle);
            }
        }
    }
    Ok(())
}
