//! `tunnel_listener`: a reverse-tunnel listener for C. An accept pump (a runtime task) takes
//! each stream from the core `Listener`, turns it into a plain socket and puts it in a bounded
//! queue; an eventfd is readable exactly while the queue holds a stream (or the listener is
//! closed), so C can `poll` it next to its own fds. `tunnel_listener_accept` pops the queue,
//! waiting up to a timeout. The queue is the only state here; registration, reconnects and
//! backpressure towards the relay are the core's.

use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_void};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use libtunnel::{Listener, PeerInfo, Via};
use tokio::sync::Semaphore;

use crate::boundary::{fallible, infallible};
use crate::config::tunnel_config;
use crate::error::{tunnel_result, Fail};
use crate::events::{tunnel_state_callback, StateSlot};
use crate::handle::{free_box, into_raw, out_ptr, try_ref, write_str, Castable};
use crate::runtime::{block_on, runtime};

/// Streams converted to sockets and waiting for `tunnel_listener_accept`; more wait in the
/// core's own backlog, and beyond that the relay refuses them.
const QUEUE: usize = 16;

/// A reverse-tunnel listener (opaque). Made by `tunnel_listener_bind`, ended by
/// `tunnel_listener_free`. Thread-safe: accept, fd, name and close may be called from any thread.
pub struct tunnel_listener {
    _private: [u8; 0],
}

/// How an accepted stream reached the relay.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum tunnel_via {
    /// A dialer connected to the listener's name (`NAME:0`).
    Dial = 1,
    /// A public HTTP request routed by `Host`.
    Http = 2,
    /// The listener's public TCP port.
    Tcp = 3,
}

/// Who is on the other end of an accepted stream. Filled by `tunnel_listener_accept`; plain
/// data, owned by the caller.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct tunnel_peer {
    /// The original client's address as the relay saw it (`ip:port`), NUL-terminated
    /// (truncated if longer than 63 bytes).
    pub client: [c_char; 64],
    /// How the stream arrived.
    pub via: tunnel_via,
    /// The port label a dialer asked for (0 = default), or the public TCP port.
    pub port: u16,
    /// Whether the stream is end-to-end encrypted (the listener has e2e on).
    pub e2e: bool,
    /// The dialer's verified key-derived name (e2e in mutual mode), NUL-terminated; empty
    /// otherwise.
    pub dialer_name: [c_char; 32],
}

/// The queue between the accept pump and `accept`, with the eventfd that mirrors it.
struct Handoff {
    /// Waiting streams, and why the listener stopped once it has.
    queue: Mutex<Queue>,
    /// Signalled whenever `queue` changes.
    changed: Condvar,
    /// Readable while `queue` holds a stream or is closed; owned here, closed on free.
    ready: OwnedFd,
    /// Free slots in `queue`; the pump takes one before each core accept.
    space: Semaphore,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<(TcpStream, PeerInfo)>,
    /// Set once: the code and message every later accept fails with.
    closed: Option<(tunnel_result, String)>,
}

/// The Rust side of a `tunnel_listener`.
pub struct ListenerHandle {
    listener: Arc<Listener>,
    handoff: Arc<Handoff>,
    pump: tokio::task::JoinHandle<()>,
    /// The connection-state callback (`tunnel_listener_set_state_callback`).
    state: StateSlot,
}

impl Castable for tunnel_listener {
    type Rust = ListenerHandle;
}

impl Handoff {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Make `ready` readable (called with the queue locked, after a push or close).
    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: `ready` is a live eventfd and `one` is 8 readable bytes; a full counter
        // (EAGAIN) only means it is readable already.
        unsafe { libc::write(self.ready.as_raw_fd(), (&one as *const u64).cast(), 8) };
        self.changed.notify_all();
    }

    /// Make `ready` unreadable (called with the queue locked, once it is empty and open).
    fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: `ready` is a live non-blocking eventfd and `v` is 8 writable bytes.
        unsafe { libc::read(self.ready.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }

    fn close(&self, code: tunnel_result, message: String) {
        let mut q = self.lock();
        q.items.clear();
        if q.closed.is_none() {
            q.closed = Some((code, message));
        }
        self.space.close();
        self.signal();
    }
}

/// Move accepted streams from the core listener into the queue until it closes.
async fn pump(listener: Arc<Listener>, shared: Arc<Handoff>) {
    loop {
        let Ok(slot) = shared.space.acquire().await else { return };
        slot.forget();
        let item = match listener.accept().await {
            Ok((stream, peer)) => libtunnel::fd::into_socket(stream).await.map(|s| (s, peer)),
            Err(e) => {
                shared.close(tunnel_result::from_code(e.code()), e.message().to_string());
                return;
            }
        };
        match item {
            Ok(item) => {
                let mut q = shared.lock();
                if q.closed.is_some() {
                    return;
                }
                q.items.push_back(item);
                shared.signal();
            }
            Err(e) => {
                tracing::warn!(error = %e, "an accepted stream could not be turned into a socket; dropped it");
                shared.space.add_permits(1);
            }
        }
    }
}

/// Connect to the relay in `cfg` and register (blocks until registered, bounded by the
/// config's timeout). Needs an identity (`tunnel_config_set_identity_file`); the name is the
/// identity's derived one unless `tunnel_config_set_listener_name` chose another. After a
/// successful bind, lost sessions are re-established in the background.
///
/// On success `*out` receives a listener owned by the caller; end it with
/// `tunnel_listener_free` (which also closes it). `cfg` may be freed afterwards.
///
/// # Safety
/// `cfg` must be NULL or a live config; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tunnel_listener_bind(cfg: *const tunnel_config, out: *mut *mut tunnel_listener) -> tunnel_result {
    fallible(|| {
        let out = out_ptr(out, "out")?;
        // SAFETY: the caller passes NULL or a live config.
        let cfg = unsafe { try_ref(cfg, "cfg") }?;
        let b = cfg.listener().builder()?;
        let listener = Arc::new(block_on(b.bind())??);
        // SAFETY: plain syscall; the result is checked before use.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(Fail::new(tunnel_result::Io, format!("cannot create the listener's eventfd: {}", std::io::Error::last_os_error())));
        }
        let shared = Arc::new(Handoff {
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
            // SAFETY: `efd` is a fresh fd that nothing else owns.
            ready: unsafe { OwnedFd::from_raw_fd(efd) },
            space: Semaphore::new(QUEUE),
        });
        let pump = runtime()?.spawn(pump(listener.clone(), shared.clone()));
        // SAFETY: `out` is non-NULL and writable (caller's guarantee).
        unsafe { *out = into_raw::<tunnel_listener>(ListenerHandle { listener, handoff: shared, pump, state: StateSlot::default() }) };
        Ok(())
    })
}

/// Copy the registered name (dial it as `NAME:0`) into `buf`, snprintf-style: at most
/// `len - 1` bytes plus a NUL; `*out_n` (may be NULL) gets the full length.
///
/// # Safety
/// `listener` must be NULL or live; `buf` must have `len` writable bytes; `out_n` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tunnel_listener_name(listener: *const tunnel_listener, buf: *mut c_char, len: usize, out_n: *mut usize) -> tunnel_result {
    fallible(|| {
        // SAFETY: the caller passes NULL or a live listener.
        let l = unsafe { try_ref(listener, "listener") }?;
        // SAFETY: the caller guarantees the buffer and out_n.
        unsafe { write_str(&l.listener.name(), buf, len, out_n) }
    })
}

/// Wait up to `timeout_ms` milliseconds (-1: forever, 0: don't wait) for the next stream.
///
/// On success `*out_fd` receives a connected, blocking stream socket owned by the caller (end it
/// with `close`), and `*out_peer` (may be NULL) who sent it. `TUNNEL_RESULT_TIMEOUT` when nothing
/// arrived in time; `TUNNEL_RESULT_CLOSED` once the listener is closed.
///
/// # Safety
/// `listener` must be NULL or live; `out_fd` NULL or writable; `out_peer` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tunnel_listener_accept(
    listener: *const tunnel_listener,
    timeout_ms: c_int,
    out_fd: *mut c_int,
    out_peer: *mut tunnel_peer,
) -> tunnel_result {
    fallible(|| {
        let out_fd = out_ptr(out_fd, "out_fd")?;
        // SAFETY: the caller passes NULL or a live listener.
        let l = unsafe { try_ref(listener, "listener") }?;
        runtime()?; // refuse runtime threads and forked children: the pump is not theirs.
        let deadline = u64::try_from(timeout_ms).ok().map(|ms| Instant::now() + Duration::from_millis(ms));
        let sh = &l.handoff;
        let mut q = sh.lock();
        let (socket, peer) = loop {
            if let Some((code, msg)) = &q.closed {
                return Err(Fail::new(*code, msg.clone()));
            }
            if let Some(item) = q.items.pop_front() {
                if q.items.is_empty() {
                    sh.drain();
                }
                sh.space.add_permits(1);
                break item;
            }
            q = match deadline {
                None => sh.changed.wait(q).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Fail::new(tunnel_result::Timeout, format!("no stream arrived within {timeout_ms} ms")));
                    }
                    sh.changed.wait_timeout(q, left).unwrap_or_else(|p| p.into_inner()).0
                }
            };
        };
        drop(q);
        if !out_peer.is_null() {
            let mut p = tunnel_peer { client: [0; 64], via: via(peer.via), port: peer.port, e2e: peer.e2e, dialer_name: [0; 32] };
            // SAFETY: `p.client` has 64 writable bytes.
            unsafe { write_str(&peer.client, p.client.as_mut_ptr(), p.client.len(), std::ptr::null_mut()) }?;
            if let Some(n) = &peer.dialer_name {
                // SAFETY: `p.dialer_name` has 32 writable bytes (a derived name is 26).
                unsafe { write_str(n, p.dialer_name.as_mut_ptr(), p.dialer_name.len(), std::ptr::null_mut()) }?;
            }
            // SAFETY: non-NULL and writable (caller's guarantee).
            unsafe { *out_peer = p };
        }
        // SAFETY: `out_fd` is non-NULL and writable (caller's guarantee).
        unsafe { *out_fd = socket.into_raw_fd() };
        Ok(())
    })
}

fn via(v: Via) -> tunnel_via {
    match v {
        Via::Dial => tunnel_via::Dial,
        Via::Http => tunnel_via::Http,
        Via::Tcp => tunnel_via::Tcp,
    }
}

/// Give the listener's readiness fd: it polls readable (`POLLIN`) while a stream waits for
/// `tunnel_listener_accept`, or once the listener is closed. The fd belongs to the listener:
/// do not read, write or close it; it stays valid until `tunnel_listener_free`.
///
/// # Safety
/// `listener` must be NULL or live; `out_fd` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tunnel_listener_fd(listener: *const tunnel_listener, out_fd: *mut c_int) -> tunnel_result {
    fallible(|| {
        let out_fd = out_ptr(out_fd, "out_fd")?;
        // SAFETY: the caller passes NULL or a live listener.
        let l = unsafe { try_ref(listener, "listener") }?;
        // SAFETY: `out_fd` is non-NULL and writable (caller's guarantee).
        unsafe { *out_fd = l.handoff.ready.as_raw_fd() };
        Ok(())
    })
}

/// Stop accepting and unregister: waiting and later `tunnel_listener_accept` calls fail with
/// `TUNNEL_RESULT_CLOSED`, streams not yet accepted are dropped, and the readiness fd turns
/// readable. It does not wait: streams accepted earlier keep working until they finish (both
/// sides closed; bytes written are delivered) or 10 s pass, then the session to the relay is
/// closed in the background and a stream still open reads `ECONNRESET`. Idempotent; the
/// listener still needs `tunnel_listener_free`.
///
/// # Safety
/// `listener` must be NULL or live.
#[no_mangle]
pub unsafe extern "C" fn tunnel_listener_close(listener: *const tunnel_listener) -> tunnel_result {
    fallible(|| {
        // SAFETY: the caller passes NULL or a live listener.
        let l = unsafe { try_ref(listener, "listener") }?;
        close(l);
        Ok(())
    })
}

/// Stop accepting at once; streams already handed out keep working until they finish or
/// `crate::DRAIN` passes, then the session (and the name) is released, in the background.
fn close(l: &ListenerHandle) {
    l.handoff.close(tunnel_result::Closed, "the listener is closed".into());
    l.pump.abort();
    match (crate::runtime::usable(), runtime()) {
        (true, Ok(rt)) => {
            let listener = l.listener.clone();
            rt.spawn(async move {
                let drained = listener.shutdown(crate::DRAIN).await;
                tracing::debug!(name = %listener.name(), drained, "listener closed");
            });
        }
        _ => l.listener.close(),
    }
}

/// Call `callback` with `userdata` on every change of the listener's session to the relay from
/// now on (see `tunnel_state_callback` for the thread rules): `TUNNEL_STATE_DISCONNECTED` when
/// it drops, `TUNNEL_STATE_RECONNECTING` before each retry, `TUNNEL_STATE_CONNECTED` once
/// registered again. Replaces the previous callback; NULL removes it. After this returns the
/// previous callback is not running and is not called again; `tunnel_listener_free` removes it
/// the same way. Fails with `TUNNEL_RESULT_WRONG_THREAD` when called from a libtunnel callback.
///
/// # Safety
/// `listener` must be NULL or live; `callback` NULL or a function that stays callable, with
/// `userdata`, until it is replaced or the listener freed.
#[no_mangle]
pub unsafe extern "C" fn tunnel_listener_set_state_callback(
    listener: *const tunnel_listener,
    callback: tunnel_state_callback,
    userdata: *mut c_void,
) -> tunnel_result {
    fallible(|| {
        // SAFETY: the caller passes NULL or a live listener.
        let l = unsafe { try_ref(listener, "listener") }?;
        crate::runtime::runtime()?;
        l.state.set(callback, userdata, || l.listener.events())
    })
}

/// Close the listener (as `tunnel_listener_close`) and free it, closing its readiness fd. NULL
/// is a no-op.
///
/// # Safety
/// `listener` must be NULL or live, not used again afterwards (no accept may be running on it).
#[no_mangle]
pub unsafe extern "C" fn tunnel_listener_free(listener: *mut tunnel_listener) {
    infallible((), || {
        // SAFETY: the caller passes NULL or a live listener.
        if let Ok(l) = unsafe { try_ref(listener, "listener") } {
            l.state.clear();
            close(l);
        }
        // SAFETY: the caller passes NULL or a listener from `tunnel_listener_bind`, freed once.
        unsafe { free_box(listener) }
    })
}
