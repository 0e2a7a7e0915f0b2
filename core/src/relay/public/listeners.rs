//! What the public endpoints keep for each registered listener: the HTTP/2 connections the relay keeps to an h2c listener (every public request to it, from every
//! client, is a stream of one of a few such connections, each one tunnel stream and one local
//! connection), and its
//! request-rate window (`http_listener_rate`: 429 with `Retry-After` past the limit).
//!
//! Bounded: entries exist only for registered names (added at registration, removed when it
//! ends), and rate windows only for names that are registered; kept connections to h2c
//! listeners on other nodes of a cluster for at most [`REMOTE_H2_NAMES`] names.
//!
//! Isolation on a shared connection: each carries at most [`H2_STREAMS`] requests at once (a
//! [`Shared`] connection's slots), and its connection window is that many stream windows
//! ([`H2_STREAM_WINDOW`], [`H2_CONNECTION_WINDOW`]). A response a client stops reading holds at
//! most its own stream's window of the connection's, so however many a client leaves unread,
//! every other stream on the connection still has its full window: no client can take another's
//! share. A request finding every kept connection full gets a connection of its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::body::Pieces;

pub(crate) type H2Sender = hyper::client::conn::http2::SendRequest<Pieces>;

/// Most requests one HTTP/2 connection to an h2c listener carries at once.
pub(crate) const H2_STREAMS: usize = 64;
/// The relay's receive window for each stream of such a connection (what one unread response
/// holds of the connection's window, and of relay memory).
pub(crate) const H2_STREAM_WINDOW: u32 = 256 * 1024;
/// The relay's receive window for such a connection: every stream's window at once, so streams
/// never wait on each other's unread data.
pub(crate) const H2_CONNECTION_WINDOW: u32 = H2_STREAM_WINDOW * H2_STREAMS as u32;

/// An HTTP/2 connection to an h2c listener and its request slots.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) sender: H2Sender,
    slots: Arc<Semaphore>,
}

/// A request's place on a [`Shared`] connection: held until its response body is dropped.
pub(crate) type H2Slot = OwnedSemaphorePermit;

impl Shared {
    pub(crate) fn new(sender: H2Sender) -> Shared {
        Shared { sender, slots: Arc::new(Semaphore::new(H2_STREAMS)) }
    }

    /// A free slot on this connection, if it is open and has one.
    pub(crate) fn slot(&self) -> Option<H2Slot> {
        if self.sender.is_closed() {
            return None;
        }
        self.slots.clone().try_acquire_owned().ok()
    }
}

/// The first of `kept` with a free slot, starting at `from`.
fn with_room(kept: &[Shared], from: usize) -> Option<(H2Sender, H2Slot)> {
    (0..kept.len()).map(|i| &kept[(from + i) % kept.len()]).find_map(|c| Some((c.sender.clone(), c.slot()?)))
}

struct Entry {
    id: u64,
    h2: Vec<Shared>,
    /// Round-robin position in `h2`.
    next: usize,
}

/// HTTP/2 connections the relay opens to one h2c listener (each is one tunnel stream and one
/// connection to the local service): requests are spread over them, so neither the relay, the
/// listener nor the service handles all of a busy listener's traffic on one task.
pub(crate) const H2_UPSTREAMS: usize = 4;

/// Fixed request-rate windows per listener name.
struct Window {
    start: Instant,
    count: u64,
}

#[derive(Default)]
pub(crate) struct PublicListeners {
    table: Mutex<HashMap<String, Entry>>,
    windows: Mutex<HashMap<String, Window>>,
    /// HTTP/2 connections to h2c listeners another node of the cluster holds (each one tunnel
    /// stream across the node-to-node hop); a connection leaves when it closes, which it does when
    /// that listener goes away or moves.
    remote_h2: Mutex<HashMap<String, Vec<Shared>>>,
}

/// Most remote h2c listener names with kept connections.
const REMOTE_H2_NAMES: usize = 1024;

impl PublicListeners {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A registration (`id` from the registry) of `name`.
    pub(crate) fn registered(&self, name: &str, id: u64) {
        self.table().insert(name.to_string(), Entry { id, h2: Vec::new(), next: 0 });
    }

    /// The registration `id` ended (a newer one of the same name stays).
    pub(crate) fn released(&self, name: &str, id: u64) {
        let mut t = self.table();
        if t.get(name).is_some_and(|e| e.id == id) {
            t.remove(name);
            self.windows.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
        }
    }

    /// An open HTTP/2 connection to `name` (the next in turn with a free slot) and a slot on it,
    /// or `None` when fewer than [`H2_UPSTREAMS`] are open or every one is full (the caller
    /// opens one).
    pub(crate) fn h2(&self, name: &str) -> Option<(H2Sender, H2Slot)> {
        let mut t = self.table();
        let Some(e) = t.get_mut(name) else {
            drop(t);
            let mut r = self.remote_h2.lock().unwrap_or_else(|p| p.into_inner());
            let kept = r.get_mut(name)?;
            kept.retain(|s| !s.sender.is_closed());
            if kept.len() < H2_UPSTREAMS {
                return None;
            }
            return with_room(kept, rand::random::<u32>() as usize);
        };
        e.h2.retain(|s| !s.sender.is_closed());
        if e.h2.len() < H2_UPSTREAMS {
            return None;
        }
        e.next = e.next.wrapping_add(1);
        with_room(&e.h2, e.next)
    }

    /// Keep `sender` as a connection to `name` (while that registration lives), if there is room.
    pub(crate) fn set_h2(&self, name: &str, sender: Shared) {
        if let Some(e) = self.table().get_mut(name) {
            if e.h2.len() < H2_UPSTREAMS {
                e.h2.push(sender);
            }
            return;
        }
        // A listener on another node of the cluster.
        let mut r = self.remote_h2.lock().unwrap_or_else(|p| p.into_inner());
        if r.len() >= REMOTE_H2_NAMES && !r.contains_key(name) {
            r.retain(|_, kept| {
                kept.retain(|s| !s.sender.is_closed());
                !kept.is_empty()
            });
            if r.len() >= REMOTE_H2_NAMES {
                return;
            }
        }
        let kept = r.entry(name.to_string()).or_default();
        kept.retain(|s| !s.sender.is_closed());
        if kept.len() < H2_UPSTREAMS {
            kept.push(sender);
        }
    }

    /// Stop handing out the kept HTTP/2 connections to `name` (the relay is draining).
    pub(crate) fn forget_h2(&self, name: &str) {
        if let Some(e) = self.table().get_mut(name) {
            e.h2.clear();
        }
        self.remote_h2.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
    }

    /// Count a request to `name` against `rate` (`(count, window)`): `Err(wait)` when the
    /// window is full, with the time until it ends.
    pub(crate) fn admit_rate(&self, name: &str, rate: Option<(u64, Duration)>) -> Result<(), Duration> {
        let Some((limit, window)) = rate else { return Ok(()) };
        if !self.table().contains_key(name) {
            return Ok(()); // not registered: the request gets 502, and costs no window
        }
        let now = Instant::now();
        let mut w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        let e = w.entry(name.to_string()).or_insert(Window { start: now, count: 0 });
        if now.duration_since(e.start) >= window {
            *e = Window { start: now, count: 0 };
        }
        if e.count >= limit {
            return Err(window.saturating_sub(now.duration_since(e.start)));
        }
        e.count += 1;
        Ok(())
    }
}
