//! Which listeners hold which name. A name belongs to the key that registered it for as long as
//! that key's session lives: another key can never take it, and the same key registering again
//! replaces its stale session (the old one is closed and told why: `NAME_TAKEN`).
//!
//! **Pools**: listeners that opt in (`pool` in their registration) join a name as *replicas*
//! when every live replica also opted in (same key, or keys the relay grants the same name; the
//! grant is checked before [`Registry::reserve`]). [`Registry::candidates`] hands route.rs the
//! live replicas of a name in the order to try them: **round-robin** (each new stream starts one
//! replica further along; the others follow as fallbacks), so the spread does not depend on how
//! fast each replica's host happens to be scheduled. (Least-outstanding-streams was tried first:
//! on a loaded 2-core host it starved the replica whose process got the least CPU, 22% of 3,000
//! requests against 40% and 38%.) A replica leaves the pool the moment its session ends ([`Registry::release`] from the session's
//! task; a closed session is also skipped by every lookup before that runs). A replica that
//! drains (it sent `GoAway`) refuses new streams at once, and route.rs moves on to the next.
//!
//! **Replaced listeners stay replaced**: each registration carries its listener object's random
//! instance id (the same in its re-registrations). When the same key's newer registration
//! replaces a holder, the holder's instance is remembered for [`RETIRED_FOR`]; if it comes back
//! (it reconnected before the replacement notice reached it), it is refused with `NAME_TAKEN`
//! instead of taking the name back from the newer one.
//!
//! Entries are reserved before the session starts (so the answer to the listener and the claim
//! cannot race) and attached after; a lookup that finds only reservations still being answered
//! waits for one to attach, so a listener is reachable as soon as its `bind()` returns.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::names::Registration;
use crate::error::{Error, ErrorCode};
use crate::session::Session;
use tokio::sync::Semaphore;

/// Replaced listener instances of one name, oldest first, with when each was replaced.
type Retired = VecDeque<(Vec<u8>, Instant)>;

/// How long a replaced listener instance is refused.
pub(crate) const RETIRED_FOR: Duration = Duration::from_secs(600);
/// Most replaced instances remembered per name, and names with any.
const RETIRED_PER_NAME: usize = 8;
const RETIRED_NAMES: usize = 4096;

struct Replica {
    owner: [u8; 32],
    id: u64,
    /// The listener object's instance id (empty from listeners that predate it).
    instance: Vec<u8>,
    session: Option<Session>,
    /// Streams offered to this replica and not yet accepted (`max_pending_accepts`).
    pending: Arc<Semaphore>,
}

impl Replica {
    fn live(&self) -> bool {
        self.session.as_ref().map_or(true, |s| !s.is_closed())
    }
}

struct Entry {
    /// How the name is held (the latest replica's registration).
    registration: Registration,
    replicas: Vec<Replica>,
}

/// One replica a stream may be offered to.
pub(crate) struct Candidate {
    pub(crate) session: Session,
    pub(crate) pending: Arc<Semaphore>,
    pub(crate) owner: [u8; 32],
}

/// The relay's name table.
#[derive(Default)]
pub(crate) struct Registry {
    names: Mutex<HashMap<String, Entry>>,
    next_id: AtomicU64,
    /// Round-robin cursor over a name's replicas.
    turn: AtomicU64,
    /// Woken when a reservation is attached or released (for lookups waiting on one).
    changed: tokio::sync::Notify,
    /// Listener instances replaced by a newer registration of their key, per name.
    retired: Mutex<HashMap<String, Retired>>,
}

impl Registry {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether listener `instance` was replaced as a holder of `name` (and may not come back).
    pub(crate) fn is_retired(&self, name: &str, instance: &[u8]) -> bool {
        !instance.is_empty()
            && self
                .retired
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(name)
                .is_some_and(|v| v.iter().any(|(i, at)| i == instance && at.elapsed() < RETIRED_FOR))
    }

    /// Remember that `instance` no longer holds `name` because a newer registration replaced it.
    pub(crate) fn retire(&self, name: &str, instance: &[u8]) {
        if instance.is_empty() {
            return;
        }
        let mut r = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        if r.len() >= RETIRED_NAMES && !r.contains_key(name) {
            r.retain(|_, v| v.back().is_some_and(|(_, at)| at.elapsed() < RETIRED_FOR));
            if r.len() >= RETIRED_NAMES {
                return;
            }
        }
        let v = r.entry(name.to_string()).or_default();
        v.retain(|(_, at)| at.elapsed() < RETIRED_FOR);
        if v.len() >= RETIRED_PER_NAME {
            v.pop_front();
        }
        v.push_back((instance.to_vec(), Instant::now()));
    }

    /// Reserve `name` for `owner` (listener object `instance`), with room for `max_pending`
    /// streams waiting to be accepted; returns the registration id.
    pub(crate) fn reserve(&self, name: &str, owner: [u8; 32], instance: &[u8], joining: Registration, max_pending: usize) -> Result<u64, Error> {
        if self.is_retired(name, instance) {
            return Err(retired_error(name));
        }
        let mut t = self.table();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let replica = Replica { owner, id, instance: instance.to_vec(), session: None, pending: Arc::new(Semaphore::new(max_pending)) };
        if let Some(e) = t.get_mut(name) {
            e.replicas.retain(Replica::live);
            if !e.replicas.is_empty() {
                if joining.joins(e.registration) {
                    e.registration = joining;
                    e.replicas.push(replica);
                    return Ok(id);
                }
                if e.replicas.iter().any(|r| r.owner != owner) {
                    let why = if e.registration.pool && !joining.pool {
                        format!("the name {name:?} is served by a pool of listeners; start this one with --pool (pool=True) to join it")
                    } else if e.registration.pool && joining.pool {
                        format!("the name {name:?} is served by a pool of {} listeners; replicas must all be exits or all not", kind(e.registration))
                    } else {
                        format!("the name {name:?} is registered by another key; pick another name, use that key, or start every replica with --pool")
                    };
                    return Err(Error::new(ErrorCode::NameTaken, why));
                }
                // Same key, no pool to join: today's rule, the new session replaces the old.
                for old in &e.replicas {
                    // (Not the listener re-registering itself: its own old session.)
                    if old.instance != instance {
                        self.retire(name, &old.instance);
                    }
                    if let Some(s) = &old.session {
                        // Tell the old session why, so a listener still running there stops
                        // reconnecting instead of taking the name back in a loop.
                        s.close_with_notice(ErrorCode::NameTaken, replaced_notice(name));
                    }
                }
            }
        }
        t.insert(name.to_string(), Entry { registration: joining, replicas: vec![replica] });
        Ok(id)
    }

    /// Attach the live session to a reservation. `false` when a newer registration of the same
    /// key replaced the reservation in between (its session was not there to be told): the
    /// caller closes the session with [`replaced_notice`].
    pub(crate) fn attach(&self, name: &str, id: u64, session: Session) -> bool {
        let attached = match self.table().get_mut(name).and_then(|e| e.replicas.iter_mut().find(|r| r.id == id)) {
            Some(r) => {
                r.session = Some(session);
                true
            }
            None => false,
        };
        self.changed.notify_waiters();
        attached
    }

    /// Whether `name` is registered or being registered.
    pub(crate) fn contains(&self, name: &str) -> bool {
        self.table().contains_key(name)
    }

    /// The key a live (or registering) listener holds `name` with, if any.
    pub(crate) fn owner(&self, name: &str) -> Option<[u8; 32]> {
        self.table().get(name).and_then(|e| e.replicas.iter().find(|r| r.live()).map(|r| r.owner))
    }

    /// How `name` is held (pool, exit, how it speaks), if it is.
    pub(crate) fn registration(&self, name: &str) -> Option<Registration> {
        self.table().get(name).map(|e| e.registration)
    }

    /// The live replicas of `name`, in the order to offer them a stream (round-robin: each call
    /// starts one replica further along). The relay answers a registration before its session is
    /// attached, so the listener may already be dialed in between: when no replica is attached
    /// yet, wait (at most `limit`) for one to attach, or for the registrations to fail. Empty when
    /// the name is offline.
    pub(crate) async fn candidates(&self, name: &str, limit: Duration) -> Vec<Candidate> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let (mut found, reserving) = {
                let t = self.table();
                let Some(e) = t.get(name) else { return Vec::new() };
                let found: Vec<Candidate> = e
                    .replicas
                    .iter()
                    .filter_map(|r| {
                        let s = r.session.as_ref().filter(|s| !s.is_closed())?;
                        Some(Candidate { session: s.clone(), pending: r.pending.clone(), owner: r.owner })
                    })
                    .collect();
                (found, e.replicas.iter().any(|r| r.session.is_none()))
            };
            if !found.is_empty() {
                let n = found.len();
                let turn = (self.turn.fetch_add(1, Ordering::Relaxed) % n as u64) as usize;
                found.rotate_left(turn);
                return found;
            }
            if !reserving || tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Vec::new();
            }
        }
    }

    /// Every live registration: (name, owner key, session), one per replica.
    pub(crate) fn live(&self) -> Vec<(String, [u8; 32], Session)> {
        let t = self.table();
        t.iter().flat_map(|(n, e)| e.replicas.iter().filter_map(move |r| r.session.clone().map(|s| (n.clone(), r.owner, s)))).collect()
    }

    /// Remove a replica when its session ends (no-op if it was replaced); the name goes when its
    /// last replica does.
    pub(crate) fn release(&self, name: &str, id: u64) {
        let mut t = self.table();
        if let Some(e) = t.get_mut(name) {
            e.replicas.retain(|r| r.id != id);
            if e.replicas.is_empty() {
                t.remove(name);
            }
        }
        drop(t);
        self.changed.notify_waiters();
    }
}

/// What a listener session replaced by a newer registration of its key is told as it is closed.
pub(crate) fn replaced_notice(name: &str) -> String {
    format!("the name {name:?} was registered again by the same key from another session; this listener stops (run one listener per key and name, or start every replica with --pool)")
}

/// The refusal of a listener that a newer registration of its key replaced.
pub(crate) fn retired_error(name: &str) -> Error {
    Error::new(
        ErrorCode::NameTaken,
        format!("this listener was replaced as {name:?} by a newer registration of the same key (another process or session holds the name now); it stops instead of taking the name back"),
    )
}

fn kind(j: Registration) -> &'static str {
    if j.exit {
        "exit"
    } else {
        "(non-exit)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reservation_replaced_before_its_session_attaches_is_not_attached() {
        let r = Registry::default();
        let key = [7u8; 32];
        let old = r.reserve("api", key, b"old", Registration::default(), 4).expect("reserved");
        // The same key registers again before the first session is attached: it replaces the
        // reservation, and the first session has nothing to attach to.
        let new = r.reserve("api", key, b"new", Registration::default(), 4).expect("replaced");
        assert_ne!(old, new);
        let (session, _task) = idle_session();
        assert!(!r.attach("api", old, session.clone()), "a replaced reservation must not take the session");
        assert!(r.attach("api", new, session), "the newer reservation takes its session");
    }

    /// A live session over a transport that never delivers anything.
    fn idle_session() -> (Session, crate::mux::SessionTask) {
        use futures_util::SinkExt;
        let source: crate::mux::FrameSource = Box::pin(futures_util::stream::pending());
        let sink: crate::mux::FrameSink = Box::pin(futures_util::sink::drain().sink_map_err(|e: std::convert::Infallible| match e {}));
        let (s, t) = crate::mux::Session::owned(crate::mux::Role::Server, source, sink, Default::default());
        (Session::Mux(s), t)
    }
}
