//! Connection-state events of a [`Listener`](crate::Listener) or a [`Dialer`](crate::Dialer):
//! the session to the relay came up ([`Event::Connected`]), went down with a cause
//! ([`Event::Disconnected`]), or a listener is about to retry ([`Event::Reconnecting`]). Every
//! face exposes the same events in its own idiom (Node `'connected'`/`'disconnected'`, Python
//! `on_connected=`/`on_disconnected=`), all fed from here.
//!
//! Each observed object owns one [`EventHub`]; [`Events`] is a subscription to it. Events are
//! delivered in order to every subscriber from the moment it subscribed; a subscriber that falls
//! more than [`CAPACITY`] events behind skips the oldest. `Connected` and `Disconnected` always
//! alternate (a hub remembers whether it is connected), so a `Disconnected` always follows the
//! `Connected` it ends, including the one a deliberate `close()` causes (code `CLOSED`).

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, ErrorCode};

/// Events a slow subscriber may fall behind before it skips the oldest.
pub const CAPACITY: usize = 64;

/// A change in the state of a client's session to its relay.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A session to the relay is up: a dialer authenticated one (on `connect()` or on the first
    /// dial after a loss), or a listener (re-)registered. `relay` names the URL, and so the
    /// transport, in use; a `Connected` that follows another without a `Disconnected` between
    /// them says a dialer moved its session to that URL (back to its preferred transport).
    Connected {
        /// The relay URL.
        relay: String,
        /// The name the relay registered (listeners only).
        name: Option<String>,
    },
    /// The session ended. A listener reconnects in the background (see
    /// [`Event::Reconnecting`]) unless the code is `CLOSED` (closed by us), `NAME_TAKEN` or
    /// `NOT_ALLOWED` (the relay ended the registration for good); a dialer opens a new session on
    /// its next dial.
    Disconnected {
        /// Why: `RELAY_UNAVAILABLE` when the relay went away, `CLOSED` after `close()`, ...
        code: ErrorCode,
        /// The cause in words.
        message: String,
    },
    /// A listener waits `delay` before its `attempt`-th try to re-register (1, 2, ...).
    Reconnecting {
        /// Which attempt comes next, from 1.
        attempt: u32,
        /// The jittered wait before it.
        delay: Duration,
    },
}

impl Event {
    /// The cause of a [`Event::Disconnected`] as an [`Error`].
    pub fn error(&self) -> Option<Error> {
        match self {
            Event::Disconnected { code, message } => Some(Error::new(*code, message.clone())),
            _ => None,
        }
    }

    /// `"connected"`, `"disconnected"` or `"reconnecting"`: the event's name in every face.
    pub fn name(&self) -> &'static str {
        match self {
            Event::Connected { .. } => "connected",
            Event::Disconnected { .. } => "disconnected",
            Event::Reconnecting { .. } => "reconnecting",
        }
    }
}

/// The sending side, owned by the listener or dialer it reports on.
#[derive(Debug)]
pub(crate) struct EventHub {
    tx: broadcast::Sender<Event>,
    /// Whether the last state event was `Connected` (keeps the two alternating), and how many
    /// `Connected` were sent (a session's number, so a late report about an old one is ignored).
    /// Held while sending, so every subscriber sees the transitions in one order.
    state: Mutex<(bool, u64)>,
    /// Fired when the observed object is closed for good: subscriptions then end.
    ended: CancellationToken,
}

impl EventHub {
    pub(crate) fn new() -> EventHub {
        EventHub { tx: broadcast::channel(CAPACITY).0, state: Mutex::new((false, 0)), ended: CancellationToken::new() }
    }

    pub(crate) fn subscribe(&self) -> Events {
        Events { rx: self.tx.subscribe(), ended: self.ended.clone() }
    }

    /// Report a session that is up; returns its number (for [`EventHub::disconnected_if`]).
    pub(crate) fn connected(&self, relay: &str, name: Option<&str>) -> u64 {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !st.0 {
            *st = (true, st.1 + 1);
            let _ = self.tx.send(Event::Connected { relay: relay.to_string(), name: name.map(str::to_string) });
        }
        st.1
    }

    /// Report a session that replaced the live one (the client moved to another relay URL): a
    /// `Connected` naming the new URL, without a `Disconnected` before it.
    pub(crate) fn moved(&self, relay: &str) -> u64 {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        *st = (true, st.1 + 1);
        let _ = self.tx.send(Event::Connected { relay: relay.to_string(), name: None });
        st.1
    }

    /// Report the end of the current session, unless it was already reported.
    pub(crate) fn disconnected(&self, error: Option<&Error>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.send_disconnected(&mut st, error);
    }

    /// Report the end of session number `session`, if it is still the current one.
    pub(crate) fn disconnected_if(&self, session: u64, error: Option<&Error>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.1 == session {
            self.send_disconnected(&mut st, error);
        }
    }

    fn send_disconnected(&self, st: &mut (bool, u64), error: Option<&Error>) {
        if st.0 {
            st.0 = false;
            let (code, message) = match error {
                Some(e) => (e.code(), e.message().to_string()),
                None => (ErrorCode::RelayUnavailable, "the session to the relay ended".to_string()),
            };
            let _ = self.tx.send(Event::Disconnected { code, message });
        }
    }

    pub(crate) fn reconnecting(&self, attempt: u32, delay: Duration) {
        let _ = self.tx.send(Event::Reconnecting { attempt, delay });
    }

    /// No event follows: subscriptions end once they have read what was sent.
    pub(crate) fn end(&self) {
        self.ended.cancel();
    }
}

/// A subscription to a listener's or dialer's events ([`crate::Listener::events`],
/// [`crate::Dialer::events`]).
#[derive(Debug)]
pub struct Events {
    rx: broadcast::Receiver<Event>,
    ended: CancellationToken,
}

impl Events {
    /// The next event; `None` once the listener is closed (after its last `Disconnected`) or the
    /// dialer is dropped.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            // What was sent before the end is still delivered.
            match self.rx.try_recv() {
                Ok(ev) => return Some(ev),
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    tracing::debug!(skipped = n, "a connection-state subscriber fell behind; skipped the oldest events");
                    continue;
                }
                Err(broadcast::error::TryRecvError::Closed) => return None,
                Err(broadcast::error::TryRecvError::Empty) => {}
            }
            if self.ended.is_cancelled() {
                return None;
            }
            tokio::select! {
                r = self.rx.recv() => match r {
                    Ok(ev) => return Some(ev),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = self.ended.cancelled() => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn states_alternate_a_late_report_is_ignored_and_the_end_comes_after_what_was_sent() {
        let hub = EventHub::new();
        let mut ev = hub.subscribe();
        let first = hub.connected("ws://r/", None);
        hub.connected("ws://r/", None); // already connected: nothing
        hub.disconnected(Some(&Error::new(ErrorCode::RelayUnavailable, "gone")));
        hub.disconnected(None); // already reported
        hub.reconnecting(1, Duration::from_millis(100));
        let second = hub.connected("ws://r/", Some("n"));
        hub.disconnected_if(first, None); // about the first session: ignored
        hub.disconnected_if(second, Some(&Error::new(ErrorCode::Closed, "closed")));
        hub.end();
        let mut got = Vec::new();
        while let Some(e) = ev.next().await {
            got.push(e);
        }
        assert_eq!(
            got,
            vec![
                Event::Connected { relay: "ws://r/".into(), name: None },
                Event::Disconnected { code: ErrorCode::RelayUnavailable, message: "gone".into() },
                Event::Reconnecting { attempt: 1, delay: Duration::from_millis(100) },
                Event::Connected { relay: "ws://r/".into(), name: Some("n".into()) },
                Event::Disconnected { code: ErrorCode::Closed, message: "closed".into() },
            ]
        );
        assert_eq!(got[1].error().map(|e| e.code()), Some(ErrorCode::RelayUnavailable));
        assert_eq!(got.iter().map(Event::name).collect::<Vec<_>>(), ["connected", "disconnected", "reconnecting", "connected", "disconnected"]);
    }

    #[tokio::test]
    async fn a_subscription_ends_when_the_hub_is_dropped() {
        let hub = EventHub::new();
        let mut ev = hub.subscribe();
        drop(hub);
        assert_eq!(ev.next().await, None);
    }
}
