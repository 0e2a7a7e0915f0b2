//! Connection-state events (`libtunnel::client::events`) to a Python callable, which
//! `libtunnel._events` dispatches to the `on_connected=` / `on_disconnected=` /
//! `on_reconnecting=` callbacks (through the event loop for the asyncio classes).

use std::sync::Mutex;

use libtunnel::client::events::{Event, Events};
use pyo3::prelude::*;
use tokio::sync::oneshot;

use crate::error::to_py;

/// A running subscription; `stop()` (or dropping it) ends it.
#[pyclass(module = "libtunnel._native", frozen)]
pub(crate) struct Watch {
    /// Firing or dropping it stops the forwarding task.
    stop: Mutex<Option<oneshot::Sender<()>>>,
}

#[pymethods]
impl Watch {
    /// Stop calling the callback (an event being delivered still arrives).
    fn stop(&self) {
        drop(self.stop.lock().unwrap_or_else(|p| p.into_inner()).take());
    }
}

/// Call `callback(name, detail)` once per event: `("connected", (relay, name or None))`,
/// `("disconnected", TunnelError)` or `("reconnecting", (attempt, delay_seconds))`. Calls are
/// made one at a time, in order, on a thread of the runtime's blocking pool (so a slow callback
/// holds no runtime worker); an exception a callback raises is printed and ignored, as in
/// `sys.unraisablehook`. Calls pass the interpreter gate: once the interpreter finalises, the
/// subscription ends and the callable is released without Python (pyo3 defers its decref).
pub(crate) fn watch(mut events: Events, callback: Py<PyAny>) -> Watch {
    let (tx, mut rx) = oneshot::channel::<()>();
    crate::runtime().spawn(async move {
        let callback = std::sync::Arc::new(callback);
        loop {
            let ev = tokio::select! {
                biased;
                ev = events.next() => match ev {
                    Some(ev) => ev,
                    None => break,
                },
                _ = &mut rx => break,
            };
            let cb = callback.clone();
            let delivered = tokio::task::spawn_blocking(move || {
                crate::interpreter::attach(|py| {
                    let called = match &ev {
                        Event::Connected { relay, name } => cb.call1(py, (ev.name(), (relay.as_str(), name.as_deref()))),
                        Event::Reconnecting { attempt, delay } => cb.call1(py, (ev.name(), (*attempt, delay.as_secs_f64()))),
                        other => match other.error() {
                            Some(e) => cb.call1(py, (ev.name(), to_py(e).into_value(py))),
                            None => return,
                        },
                    };
                    if let Err(e) = called {
                        e.write_unraisable(py, Some(cb.bind(py)));
                    }
                })
            })
            .await;
            if !matches!(delivered, Ok(Some(()))) {
                break;
            }
        }
    });
    Watch { stop: Mutex::new(Some(tx)) }
}
