//! Which listener holds which name. A name belongs to the key that registered it for as long as
//! that key's session lives: another key can never take it, and the same key registering again
//! replaces its stale session (the old one is closed). Entries are reserved before the session
//! starts (so the answer to the listener and the claim cannot race) and attached after; a
//! lookup that finds a reservation still being answered waits for it to attach, so a listener is
//! reachable as soon as its `bind()` returns.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{Error, ErrorCode};
use crate::mux::Session;
use tokio::sync::Semaphore;

struct Entry {
    owner: [u8; 32],
    id: u64,
    session: Option<Session>,
    /// Streams offered to this listener and not yet accepted (`max_pending_accepts`).
    pending: Arc<Semaphore>,
}

/// The relay's name table.
#[derive(Default)]
pub(crate) struct Registry {
    names: Mutex<HashMap<String, Entry>>,
    next_id: AtomicU64,
    /// Woken when a reservation is attached or released (for lookups waiting on one).
    changed: tokio::sync::Notify,
}

impl Registry {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserve `name` for `owner`, with room for `max_pending` streams waiting to be accepted;
    /// returns the registration id.
    pub(crate) fn reserve(&self, name: &str, owner: [u8; 32], max_pending: usize) -> Result<u64, Error> {
        let mut t = self.table();
        if let Some(e) = t.get(name) {
            let live = e.session.as_ref().map_or(true, |s| !s.is_closed());
            if e.owner != owner && live {
                return Err(Error::new(
                    ErrorCode::NameTaken,
                    format!("the name {name:?} is registered by another key; pick another name or use that key"),
                ));
            }
            if let Some(old) = &e.session {
                // Tell the old session why, so a listener still running there stops reconnecting
                // instead of taking the name back in a loop.
                old.close_with_notice(
                    ErrorCode::NameTaken,
                    format!("the name {name:?} was registered again by the same key from another session; this listener stops (run only one listener per key and name)"),
                );
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        t.insert(name.to_string(), Entry { owner, id, session: None, pending: Arc::new(Semaphore::new(max_pending)) });
        Ok(id)
    }

    /// Attach the live session to a reservation (no-op if it was replaced meanwhile).
    pub(crate) fn attach(&self, name: &str, id: u64, session: Session) {
        if let Some(e) = self.table().get_mut(name) {
            if e.id == id {
                e.session = Some(session);
            }
        }
        self.changed.notify_waiters();
    }

    /// Whether `name` is registered or being registered.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.table().contains_key(name)
    }

    /// The live session registered under `name`. The relay answers a registration before its
    /// session is attached, so the listener may already be dialed in between: then wait (at most
    /// `limit`) for the attach, or for the registration to fail.
    pub(crate) async fn lookup(&self, name: &str, limit: Duration) -> Option<(Session, Arc<Semaphore>, [u8; 32])> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let found = {
                let t = self.table();
                match t.get(name) {
                    None => return None,
                    Some(e) => e.session.clone().map(|s| (s, e.pending.clone(), e.owner)),
                }
            };
            if let Some((s, pending, owner)) = found {
                return (!s.is_closed()).then_some((s, pending, owner));
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return None;
            }
        }
    }

    /// Every live registration: (name, owner key, session).
    pub(crate) fn live(&self) -> Vec<(String, [u8; 32], Session)> {
        self.table().iter().filter_map(|(n, e)| e.session.clone().map(|s| (n.clone(), e.owner, s))).collect()
    }

    /// Remove a registration when its session ends (no-op if it was replaced).
    pub(crate) fn release(&self, name: &str, id: u64) {
        let mut t = self.table();
        if t.get(name).is_some_and(|e| e.id == id) {
            t.remove(name);
        }
        drop(t);
        self.changed.notify_waiters();
    }
}
