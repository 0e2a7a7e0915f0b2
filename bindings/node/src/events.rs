//! Connection-state events (`libtunnel::client::events`) to a JS callback, and a dial that can be
//! aborted. `index.js` turns the callback's calls into `'connected'` / `'disconnected'` /
//! `'reconnecting'` events and an `AbortSignal` into [`NativeDial::cancel`].

use std::os::fd::IntoRawFd;
use std::sync::Mutex;

use libtunnel::client::events::{Event, Events};
use libtunnel::{Error, ErrorCode};
use napi::threadsafe_function::{ErrorStrategy, ThreadSafeCallContext, ThreadsafeFunction, ThreadsafeFunctionCallMode};
use napi::{Env, JsFunction, JsObject, JsUnknown};
use napi_derive::napi;
use tokio::sync::oneshot;

use crate::promise;

type EventFn = ThreadsafeFunction<Event, ErrorStrategy::Fatal>;

/// A running subscription; `stop()` (or garbage collection) ends it.
#[napi]
pub struct NativeWatch {
    /// Dropping or firing it stops the forwarding task.
    stop: Mutex<Option<oneshot::Sender<()>>>,
}

#[napi]
impl NativeWatch {
    /// Stop calling the callback.
    #[napi]
    pub fn stop(&self) {
        drop(self.stop.lock().unwrap_or_else(|p| p.into_inner()).take());
    }
}

/// The JS arguments of one event: `(name, detail)`, where `detail` is `{ relay, name }` for
/// `connected`, an `Error` with `code` and `tunnelCode` for `disconnected`, and
/// `{ attempt, delay }` (whole milliseconds) for `reconnecting`.
fn event_args(env: &Env, ev: &Event) -> napi::Result<Vec<JsUnknown>> {
    let detail = match ev {
        Event::Connected { relay, name } => {
            let mut o = env.create_object()?;
            o.set_named_property("relay", env.create_string(relay)?)?;
            match name {
                Some(n) => o.set_named_property("name", env.create_string(n)?)?,
                None => o.set_named_property("name", env.get_null()?)?,
            }
            o.into_unknown()
        }
        Event::Reconnecting { attempt, delay } => {
            let mut o = env.create_object()?;
            o.set_named_property("attempt", env.create_uint32(*attempt)?)?;
            // Whole milliseconds, as setTimeout takes them (the backoff's jitter has no meaning
            // below that).
            o.set_named_property("delay", env.create_uint32(u32::try_from(delay.as_millis()).unwrap_or(u32::MAX))?)?;
            o.into_unknown()
        }
        other => {
            let e = other.error().unwrap_or_else(|| Error::new(ErrorCode::General, "unknown connection event"));
            crate::js_error_object(env, &e)?.into_unknown()
        }
    };
    Ok(vec![env.create_string(ev.name())?.into_unknown(), detail])
}

/// Call `callback(name, detail)` for every event of `events` until the subscription ends or
/// the returned watch is stopped. The callback never keeps the process alive.
pub(crate) fn watch(env: &Env, mut events: Events, callback: JsFunction) -> napi::Result<NativeWatch> {
    let mut tsfn: EventFn = callback.create_threadsafe_function(0, |ctx: ThreadSafeCallContext<Event>| event_args(&ctx.env, &ctx.value))?;
    tsfn.unref(env)?;
    let (tx, mut rx) = oneshot::channel::<()>();
    napi::bindgen_prelude::spawn(async move {
        loop {
            tokio::select! {
                biased;
                ev = events.next() => match ev {
                    Some(ev) => {
                        tsfn.call(ev, ThreadsafeFunctionCallMode::NonBlocking);
                    }
                    None => break,
                },
                _ = &mut rx => break,
            }
        }
    });
    Ok(NativeWatch { stop: Mutex::new(Some(tx)) })
}

/// A dial in progress: `result()` settles with the socket fd, `cancel()` drops the dial (its
/// stream or half-made session is closed) and makes `result()` reject.
#[napi]
pub struct NativeDial {
    cancel: Mutex<Option<oneshot::Sender<()>>>,
    outcome: Mutex<Option<oneshot::Receiver<libtunnel::Result<std::net::TcpStream>>>>,
}

impl NativeDial {
    /// Start `work` on the runtime at once.
    pub(crate) fn start<F>(work: F) -> NativeDial
    where
        F: std::future::Future<Output = libtunnel::Result<libtunnel::TunnelStream>> + Send + 'static,
    {
        let (cancel_tx, mut cancel_rx) = oneshot::channel::<()>();
        let (out_tx, out_rx) = oneshot::channel();
        napi::bindgen_prelude::spawn(async move {
            let work = async move {
                let stream = work.await?;
                let sock = libtunnel::fd::into_socket(stream).await?;
                Ok(sock)
            };
            let r = tokio::select! {
                biased;
                _ = &mut cancel_rx => Err(Error::new(ErrorCode::Closed, "the dial was aborted")),
                r = work => r,
            };
            // A socket nobody will receive is dropped (closed) here, never leaked.
            let _ = out_tx.send(r);
        });
        NativeDial { cancel: Mutex::new(Some(cancel_tx)), outcome: Mutex::new(Some(out_rx)) }
    }
}

#[napi]
impl NativeDial {
    /// Abort the dial; `result()` rejects (unless it already settled).
    #[napi]
    pub fn cancel(&self) {
        if let Some(tx) = self.cancel.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(());
        }
    }

    /// The connected socket's fd (the caller owns it). Call once.
    #[napi(ts_return_type = "Promise<number>")]
    pub fn result(&self, env: Env) -> napi::Result<JsObject> {
        let rx = self.outcome.lock().unwrap_or_else(|p| p.into_inner()).take();
        promise(&env, async move {
            match rx {
                Some(rx) => rx
                    .await
                    .unwrap_or_else(|_| Err(Error::new(ErrorCode::General, "the dial task ended without a result")))
                    .map(IntoRawFd::into_raw_fd),
                None => Err(Error::new(ErrorCode::InvalidArgument, "result() was already called for this dial")),
            }
        })
    }
}
