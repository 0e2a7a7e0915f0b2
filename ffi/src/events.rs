//! Connection-state callbacks for C: `tunnel_listener_set_state_callback` and
//! `tunnel_dialer_set_state_callback` deliver the core's events (`libtunnel::client::events`)
//! to one C function per object, the way Node emits `'connected'` / `'disconnected'` and Python
//! calls `on_connected` / `on_disconnected`. [`StateSlot`] is the per-object plumbing: a
//! runtime task reads the subscription and calls the current sink.

use std::ffi::{c_char, c_void, CString};
use std::sync::{Arc, Mutex, RwLock};

use libtunnel::client::events::{Event, Events};

use crate::error::{tunnel_result, Fail};

/// What happened to the session to the relay.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum tunnel_state {
    /// A session is up: a listener (re-)registered, or a dialer authenticated one.
    Connected = 1,
    /// The session ended; `cause` and `message` say why.
    Disconnected = 2,
    /// A listener waits `delay_ms` before its `attempt`-th try to re-register.
    Reconnecting = 3,
}

/// One connection-state event, valid only during the callback (copy what you keep).
#[repr(C)]
#[derive(Debug)]
pub struct tunnel_state_event {
    /// Which event this is.
    pub state: tunnel_state,
    /// `TUNNEL_STATE_DISCONNECTED`: why (`TUNNEL_RESULT_RELAY_UNAVAILABLE` when the relay went
    /// away, `TUNNEL_RESULT_CLOSED` after a close, `TUNNEL_RESULT_NAME_TAKEN` ...); otherwise
    /// `TUNNEL_RESULT_OK`.
    pub cause: tunnel_result,
    /// `TUNNEL_STATE_CONNECTED`: the relay URL; otherwise NULL.
    pub relay: *const c_char,
    /// `TUNNEL_STATE_CONNECTED` of a listener: the registered name; otherwise NULL.
    pub name: *const c_char,
    /// `TUNNEL_STATE_DISCONNECTED`: the cause in words; otherwise NULL.
    pub message: *const c_char,
    /// `TUNNEL_STATE_RECONNECTING`: which attempt comes next (from 1); otherwise 0.
    pub attempt: u32,
    /// `TUNNEL_STATE_RECONNECTING`: milliseconds until it; otherwise 0.
    pub delay_ms: u32,
}

/// Receives one connection-state event. `userdata` is what was given with the callback;
/// `event` and its strings are valid only during the call. Called on a libtunnel runtime thread,
/// one event at a time and in order. It must not block, must not call blocking libtunnel
/// functions (they return `TUNNEL_RESULT_WRONG_THREAD`), and must not set a state callback or
/// free the dialer or listener (those wait for the call in progress).
pub type tunnel_state_callback = Option<unsafe extern "C" fn(userdata: *mut c_void, event: *const tunnel_state_event)>;

#[derive(Clone, Copy)]
struct Sink {
    callback: unsafe extern "C" fn(*mut c_void, *const tunnel_state_event),
    /// The caller's pointer, passed back untouched (an integer, to be shareable).
    userdata: usize,
}

/// One object's state callback: the current sink, and the task feeding it.
#[derive(Default)]
pub(crate) struct StateSlot {
    /// Read-locked for each call, so replacing or clearing it waits for a call in progress.
    sink: Arc<RwLock<Option<Sink>>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl StateSlot {
    /// Replace the callback (NULL clears it); the first one starts the task on `subscribe()`.
    pub(crate) fn set(&self, callback: tunnel_state_callback, userdata: *mut c_void, subscribe: impl FnOnce() -> Events) -> Result<(), Fail> {
        *self.sink.write().unwrap_or_else(|p| p.into_inner()) = callback.map(|callback| Sink { callback, userdata: userdata as usize });
        let mut task = self.task.lock().unwrap_or_else(|p| p.into_inner());
        if callback.is_some() && task.is_none() {
            let rt = crate::runtime::runtime()?;
            *task = Some(rt.spawn(deliver(subscribe(), self.sink.clone())));
        }
        Ok(())
    }

    /// No call is in progress or will follow once this returns (the object is being freed).
    pub(crate) fn clear(&self) {
        *self.sink.write().unwrap_or_else(|p| p.into_inner()) = None;
        if let Some(t) = self.task.lock().unwrap_or_else(|p| p.into_inner()).take() {
            t.abort();
        }
    }
}

fn c_string(s: &str) -> CString {
    CString::new(s.replace('\0', "\\0")).expect("NULs were escaped")
}

async fn deliver(mut events: Events, sink: Arc<RwLock<Option<Sink>>>) {
    while let Some(ev) = events.next().await {
        let guard = sink.read().unwrap_or_else(|p| p.into_inner());
        let Some(s) = *guard else { continue };
        let (mut relay, mut name, mut message) = (None, None, None);
        let mut out = tunnel_state_event {
            state: tunnel_state::Connected,
            cause: tunnel_result::Ok,
            relay: std::ptr::null(),
            name: std::ptr::null(),
            message: std::ptr::null(),
            attempt: 0,
            delay_ms: 0,
        };
        match &ev {
            Event::Connected { relay: r, name: n } => {
                out.relay = relay.insert(c_string(r)).as_ptr();
                if let Some(n) = n {
                    out.name = name.insert(c_string(n)).as_ptr();
                }
            }
            Event::Reconnecting { attempt, delay } => {
                out.state = tunnel_state::Reconnecting;
                out.attempt = *attempt;
                out.delay_ms = u32::try_from(delay.as_millis()).unwrap_or(u32::MAX);
            }
            other => {
                let Some(e) = other.error() else { continue };
                out.state = tunnel_state::Disconnected;
                out.cause = tunnel_result::from_code(e.code());
                out.message = message.insert(c_string(e.message())).as_ptr();
            }
        }
        // SAFETY: the C caller registered this function with this userdata and promised it is
        // callable from a runtime thread; `out` and the strings it points to outlive the call.
        unsafe { (s.callback)(s.userdata as *mut c_void, &out) };
        drop((relay, name, message));
    }
}
