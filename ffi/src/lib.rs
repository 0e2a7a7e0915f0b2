//! The C ABI of libtunnel: `libtunnel.so` / `libtunnel.a` and the generated `include/tunnel.h`.
//!
//! C programs dial through a relay, accept as a listener, or embed a relay. This crate holds no
//! protocol logic: every export checks its arguments, runs the matching `libtunnel` call on the
//! one process-wide runtime, and turns the result into a `tunnel_result` plus out-pointers.
//!
//! # Layout
//! - [`error`]: the `tunnel_result` codes (mapped from the core's one `ErrorCode` table), the
//!   thread-local last-error message and the panic boundary every export runs inside.
//! - [`handle`]: opaque handle casts (`Castable`), NULL / UTF-8 argument checks and the
//!   snprintf-shaped string getters.
//! - [`runtime`]: the process-wide Tokio runtime (named threads, fork- and re-entry-aware).
//! - [`config`]: the client config builder shared by dialers and listeners.
//! - [`dialer`]: `tunnel_dialer_*`; each dial hands C a plain socket fd.
//! - [`listener`]: `tunnel_listener_*`; an accept pump feeds a bounded queue and an eventfd.
//! - [`server`]: `tunnel_server_*`, an embedded relay.
//! - [`log`]: `tunnel_set_log_callback`, forwarding `tracing` events to C.
//! - [`events`]: `tunnel_listener_set_state_callback` / `tunnel_dialer_set_state_callback`,
//!   the core's connection-state events to a C function.
//!
//! # Ownership, in one paragraph
//! Every `*_new` / `_bind` / `_start` writes a handle through its last argument only on success;
//! the caller owns it and ends it with the matching `*_free`, which accepts NULL. File
//! descriptors returned by `tunnel_dialer_dial` and `tunnel_listener_accept` belong to the caller
//! (`close` them); the fd from `tunnel_listener_fd` belongs to the listener.
#![allow(non_camel_case_types)]
#![deny(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod boundary;
pub mod config;
pub mod dialer;
pub mod error;
pub mod events;
pub mod handle;
pub mod listener;
pub mod log;
pub mod runtime;
pub mod server;

use std::ffi::c_char;

/// The library version as a static NUL-terminated string ("0.1.0"); compare it with the
/// `TUNNEL_VERSION_*` macros of the header you compiled against. Never free it.
#[no_mangle]
pub extern "C" fn tunnel_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// How long streams already handed out get to finish after their dialer is freed or their
/// listener closed, before the session under them is closed.
pub(crate) const DRAIN: std::time::Duration = std::time::Duration::from_secs(10);
