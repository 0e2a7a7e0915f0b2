//! `tunnel_dialer`: opens streams through a relay. Each dial runs the core `Dialer::dial` on the
//! runtime and hands the stream to C as a plain connected socket (`libtunnel::fd::into_socket`:
//! one end of a loopback TCP pair that a runtime task bridges to the tunnel), so C uses `read`,
//! `write`, `poll` and `shutdown(SHUT_WR)` on it, and a tunnel cut off mid-transfer reads as
//! `ECONNRESET`.

use std::ffi::{c_char, c_int, c_void};
use std::os::fd::IntoRawFd;

use crate::boundary::{fallible, infallible};
use crate::config::tunnel_config;
use crate::error::tunnel_result;
use crate::events::{tunnel_state_callback, StateSlot};
use crate::handle::{free_box, into_raw, out_ptr, str_arg, try_ref, Castable};
use crate::runtime::{block_on, usable};

/// A dialer (opaque). Made by `tunnel_dialer_new`, ended by `tunnel_dialer_free`. Thread-safe:
/// several threads may dial at once; they share one session to the relay.
pub struct tunnel_dialer {
    _private: [u8; 0],
}

/// The Rust side of a `tunnel_dialer`: the core dialer and its state callback.
pub struct DialerHandle {
    dialer: libtunnel::Dialer,
    /// The connection-state callback (`tunnel_dialer_set_state_callback`).
    state: StateSlot,
}

impl std::ops::Deref for DialerHandle {
    type Target = libtunnel::Dialer;
    fn deref(&self) -> &libtunnel::Dialer {
        &self.dialer
    }
}

impl Castable for tunnel_dialer {
    type Rust = DialerHandle;
}

/// Make a dialer from `cfg` (relay URL and key required; TLS roots and timeout optional). No
/// network I/O happens until the first dial. `cfg` is copied and may be freed afterwards.
///
/// On success `*out` receives a dialer owned by the caller; end it with `tunnel_dialer_free`.
/// Fails with `TUNNEL_RESULT_INVALID_ARGUMENT` when no key is set.
///
/// # Safety
/// `cfg` must be NULL or a live config; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tunnel_dialer_new(cfg: *const tunnel_config, out: *mut *mut tunnel_dialer) -> tunnel_result {
    fallible(|| {
        let out = out_ptr(out, "out")?;
        // SAFETY: the caller passes NULL or a live config.
        let cfg = unsafe { try_ref(cfg, "cfg") }?;
        let dialer = cfg.dialer().dialer()?;
        // SAFETY: `out` is non-NULL and writable (caller's guarantee).
        unsafe { *out = into_raw::<tunnel_dialer>(DialerHandle { dialer, state: StateSlot::default() }) };
        Ok(())
    })
}

/// Open a stream to `target` (`host:port`, or `NAME:0` for a listener) through the relay and
/// block until it is connected or fails (bounded by the config's timeout).
///
/// On success `*out_fd` receives a connected, blocking stream socket owned by the caller: use
/// `read`, `write`, `poll`, `shutdown(fd, SHUT_WR)` for half-close, and end it with `close`.
/// The relay's refusal comes back as its code: `TUNNEL_RESULT_NOT_ALLOWED`,
/// `TUNNEL_RESULT_AUTH_FAILED`, `TUNNEL_RESULT_REFUSED`, `TUNNEL_RESULT_RELAY_UNAVAILABLE`, ...
/// Must not be called from a libtunnel callback (`TUNNEL_RESULT_WRONG_THREAD`).
///
/// # Safety
/// `dialer` must be NULL or a live dialer; `target` NULL or NUL-terminated; `out_fd` NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn tunnel_dialer_dial(dialer: *const tunnel_dialer, target: *const c_char, out_fd: *mut c_int) -> tunnel_result {
    fallible(|| {
        let out_fd = out_ptr(out_fd, "out_fd")?;
        // SAFETY: the caller passes NULL or a live dialer.
        let dialer = unsafe { try_ref(dialer, "dialer") }?;
        // SAFETY: the caller passes NULL or a NUL-terminated string.
        let target = unsafe { str_arg(target, "target") }?;
        let socket = block_on(async {
            let stream = dialer.dial(target).await?;
            libtunnel::fd::into_socket(stream).await
        })??;
        // SAFETY: `out_fd` is non-NULL and writable (caller's guarantee).
        unsafe { *out_fd = socket.into_raw_fd() };
        Ok(())
    })
}

/// Like `tunnel_dialer_dial`, but through the exit listener `via` (a listener registered with
/// `tunnel_config_set_listener_exit`): the relay routes the stream to it and it connects `target` inside
/// its own network, checked against its own allowlist. Refusals keep their codes:
/// `TUNNEL_RESULT_NOT_ALLOWED` (outside the exit's rules, or the relay does not let this key use
/// that exit), `TUNNEL_RESULT_UNREACHABLE` (the exit is offline), ...
///
/// # Safety
/// `dialer` must be NULL or a live dialer; `target` and `via` NULL or NUL-terminated; `out_fd`
/// NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tunnel_dialer_dial_via(
    dialer: *const tunnel_dialer,
    target: *const c_char,
    via: *const c_char,
    out_fd: *mut c_int,
) -> tunnel_result {
    fallible(|| {
        let out_fd = out_ptr(out_fd, "out_fd")?;
        // SAFETY: the caller passes NULL or a live dialer.
        let dialer = unsafe { try_ref(dialer, "dialer") }?;
        // SAFETY: the caller passes NULL or NUL-terminated strings.
        let (target, via) = unsafe { (str_arg(target, "target")?, str_arg(via, "via")?) };
        let socket = block_on(async {
            let stream = dialer.dial_via(target, via).await?;
            libtunnel::fd::into_socket(stream).await
        })??;
        // SAFETY: `out_fd` is non-NULL and writable (caller's guarantee).
        unsafe { *out_fd = socket.into_raw_fd() };
        Ok(())
    })
}

/// Call `callback` with `userdata` on every change of the dialer's session to the relay from now
/// on (see `tunnel_state_callback` for the thread rules): `TUNNEL_STATE_CONNECTED` when a session
/// is authenticated (a dialer reconnects on its next dial after a loss, not in the background),
/// `TUNNEL_STATE_DISCONNECTED` when it drops. Replaces the previous callback; NULL removes it.
/// After this returns the previous callback is not running and is not called again;
/// `tunnel_dialer_free` removes it the same way. Fails with `TUNNEL_RESULT_WRONG_THREAD` when
/// called from a libtunnel callback.
///
/// # Safety
/// `dialer` must be NULL or live; `callback` NULL or a function that stays callable, with
/// `userdata`, until it is replaced or the dialer freed.
#[no_mangle]
pub unsafe extern "C" fn tunnel_dialer_set_state_callback(
    dialer: *const tunnel_dialer,
    callback: tunnel_state_callback,
    userdata: *mut c_void,
) -> tunnel_result {
    fallible(|| {
        // SAFETY: the caller passes NULL or a live dialer.
        let d = unsafe { try_ref(dialer, "dialer") }?;
        crate::runtime::runtime()?;
        d.state.set(callback, userdata, || d.dialer.events())
    })
}

/// Free the dialer. NULL is a no-op. It does not wait: streams dialed from it keep working until
/// they finish (both sides closed) or `crate::DRAIN` (10 s) passes, then the runtime closes the
/// session to the relay; a stream still open then reads `ECONNRESET`.
///
/// # Safety
/// `dialer` must be NULL or a live dialer, not used again afterwards.
#[no_mangle]
pub unsafe extern "C" fn tunnel_dialer_free(dialer: *mut tunnel_dialer) {
    infallible((), || {
        // SAFETY: the caller passes NULL or a live dialer.
        if let Ok(d) = unsafe { try_ref(dialer, "dialer") } {
            d.state.clear();
            if let (true, Ok(rt)) = (usable(), crate::runtime::runtime()) {
                let d = d.dialer.clone();
                rt.spawn(async move {
                    let drained = d.shutdown(crate::DRAIN).await;
                    tracing::debug!(relay = d.relay(), drained, "dialer closed");
                });
            }
        }
        // SAFETY: the caller passes NULL or a dialer from `tunnel_dialer_new`, freed once.
        unsafe { free_box(dialer) }
    })
}
