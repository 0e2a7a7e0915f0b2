//! `tunnel_server`: an embedded relay. Settings use the names of the `tunnel server` CLI and
//! its TOML file (`listen`, `auth_keys`, `allow`, ...; see `libtunnel::config::SETTINGS`) and
//! are the only source: unlike the CLI, the process environment and `.env` are not read, so a
//! host program's variables never change its embedded relay.

use std::ffi::c_char;
use std::sync::Mutex;

use libtunnel::{RelayConfig, Server, ServerHandle};

use crate::boundary::{fallible, infallible};
use crate::error::{tunnel_result, Fail};
use crate::handle::{free_box, into_raw, out_ptr, str_arg, try_mut, try_ref, write_str, Castable};
use crate::runtime::{block_on, runtime};

/// Settings for an embedded relay (opaque). Made by `tunnel_server_config_new`, ended by
/// `tunnel_server_config_free`.
pub struct tunnel_server_config {
    _private: [u8; 0],
}

/// A running embedded relay (opaque). Made by `tunnel_server_start`, stopped by
/// `tunnel_server_stop`, ended by `tunnel_server_free`. Thread-safe.
pub struct tunnel_server {
    _private: [u8; 0],
}

impl Castable for tunnel_server_config {
    type Rust = Vec<(String, String)>;
}

/// The Rust side of a `tunnel_server`.
pub struct ServerState {
    /// The running relay; taken by `stop`.
    handle: Mutex<Option<ServerHandle>>,
    /// The tunnel endpoint's address (`ip:port`).
    addr: String,
    /// The URL dialers use.
    url: String,
}

impl Castable for tunnel_server {
    type Rust = ServerState;
}

/// Start an empty relay configuration. `listen` defaults to `127.0.0.1:7835`; `auth_keys` and
/// `allow` are required by `tunnel_server_start`.
///
/// On success `*out` receives a config owned by the caller; end it with
/// `tunnel_server_config_free`.
///
/// # Safety
/// `out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tunnel_server_config_new(out: *mut *mut tunnel_server_config) -> tunnel_result {
    fallible(|| {
        let out = out_ptr(out, "out")?;
        // SAFETY: `out` is non-NULL and writable (caller's guarantee).
        unsafe { *out = into_raw::<tunnel_server_config>(Vec::new()) };
        Ok(())
    })
}

/// Set one relay setting by its CLI/TOML name, for example `("listen", "127.0.0.1:0")`,
/// `("auth_keys", "[{\"kid\":1,\"data\":\"...\"}]")`, `("allow", "[{\"host\":\"db\",\"port\":5432}]")`.
/// An unknown name is `TUNNEL_RESULT_INVALID_CONFIG` at once; values are checked by
/// `tunnel_server_start`. Both strings are copied.
///
/// # Safety
/// `cfg` must be NULL or live; `name` and `value` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn tunnel_server_config_set(cfg: *mut tunnel_server_config, name: *const c_char, value: *const c_char) -> tunnel_result {
    fallible(|| {
        // SAFETY: the caller passes NULL or a live config that nobody else is using.
        let cfg = unsafe { try_mut(cfg, "cfg") }?;
        // SAFETY: the caller passes NULL or NUL-terminated strings.
        let (name, value) = unsafe { (str_arg(name, "name")?, str_arg(value, "value")?) };
        if !libtunnel::config::SETTINGS.iter().any(|s| s.name == name) {
            let names: Vec<&str> = libtunnel::config::SETTINGS.iter().map(|s| s.name).collect();
            return Err(Fail::new(tunnel_result::InvalidConfig, format!("unknown relay setting {name:?}; the settings are: {}", names.join(", "))));
        }
        cfg.retain(|(k, _)| k != name);
        cfg.push((name.to_string(), value.to_string()));
        Ok(())
    })
}

/// Free a relay configuration. NULL is a no-op. Relays started from it are unaffected.
///
/// # Safety
/// `cfg` must be NULL or live, not used again afterwards.
#[no_mangle]
pub unsafe extern "C" fn tunnel_server_config_free(cfg: *mut tunnel_server_config) {
    // SAFETY: the caller passes NULL or a config from `tunnel_server_config_new`, freed once.
    infallible((), || unsafe { free_box(cfg) })
}

/// Check the settings, bind every endpoint and start serving in the background (on libtunnel's
/// runtime threads). `TUNNEL_RESULT_INVALID_CONFIG` names a missing or malformed setting;
/// `TUNNEL_RESULT_IO` an address that cannot be bound.
///
/// On success `*out` receives a running relay owned by the caller; stop it with
/// `tunnel_server_stop` and end it with `tunnel_server_free`. `cfg` may be freed afterwards.
///
/// # Safety
/// `cfg` must be NULL or live; `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tunnel_server_start(cfg: *const tunnel_server_config, out: *mut *mut tunnel_server) -> tunnel_result {
    fallible(|| {
        let out = out_ptr(out, "out")?;
        // SAFETY: the caller passes NULL or a live config.
        let settings = unsafe { try_ref(cfg, "cfg") }?;
        let relay = RelayConfig::from_sources(None, &[], &[], settings)?;
        let handle = block_on(async { Server::bind(relay).await.map(Server::spawn) })??;
        let addr = handle.local_addr().or(handle.tcp_addr()).map(|a| a.to_string()).unwrap_or_default();
        let url = handle.url().to_string();
        let state = ServerState { handle: Mutex::new(Some(handle)), addr, url };
        // SAFETY: `out` is non-NULL and writable (caller's guarantee).
        unsafe { *out = into_raw::<tunnel_server>(state) };
        Ok(())
    })
}

/// Copy the relay's tunnel endpoint address (`127.0.0.1:40123`, the real port when `listen`
/// used port 0) into `buf`, snprintf-style; `*out_n` (may be NULL) gets the full length.
///
/// # Safety
/// `server` must be NULL or live; `buf` must have `len` writable bytes; `out_n` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tunnel_server_addr(server: *const tunnel_server, buf: *mut c_char, len: usize, out_n: *mut usize) -> tunnel_result {
    // SAFETY: forwarded caller guarantees.
    unsafe { copy_field(server, buf, len, out_n, |s| &s.addr) }
}

/// Copy the URL dialers and listeners use for this relay (`ws://127.0.0.1:40123`) into `buf`,
/// snprintf-style; `*out_n` (may be NULL) gets the full length.
///
/// # Safety
/// `server` must be NULL or live; `buf` must have `len` writable bytes; `out_n` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tunnel_server_url(server: *const tunnel_server, buf: *mut c_char, len: usize, out_n: *mut usize) -> tunnel_result {
    // SAFETY: forwarded caller guarantees.
    unsafe { copy_field(server, buf, len, out_n, |s| &s.url) }
}

/// Copy one string of a server into a caller's buffer, snprintf-style.
///
/// # Safety
/// As for `tunnel_server_addr`.
unsafe fn copy_field(server: *const tunnel_server, buf: *mut c_char, len: usize, out_n: *mut usize, pick: fn(&ServerState) -> &str) -> tunnel_result {
    fallible(|| {
        // SAFETY: the caller passes NULL or a live server.
        let s = unsafe { try_ref(server, "server") }?;
        // SAFETY: the caller guarantees the buffer and out_n.
        unsafe { write_str(pick(s), buf, len, out_n) }
    })
}

/// Stop the relay gracefully: stop accepting, give open streams the `drain_timeout` setting to
/// finish, and return once every socket of the relay is closed. Idempotent: stopping a stopped
/// relay is `TUNNEL_RESULT_OK`. The relay still needs `tunnel_server_free`.
///
/// # Safety
/// `server` must be NULL or live.
#[no_mangle]
pub unsafe extern "C" fn tunnel_server_stop(server: *const tunnel_server) -> tunnel_result {
    fallible(|| {
        // SAFETY: the caller passes NULL or a live server.
        let s = unsafe { try_ref(server, "server") }?;
        runtime()?;
        let handle = s.handle.lock().unwrap_or_else(|p| p.into_inner()).take();
        match handle {
            Some(h) => Ok(block_on(h.shutdown())??),
            None => Ok(()),
        }
    })
}

/// Free a relay. NULL is a no-op. A relay that was not stopped is aborted: every connection is
/// dropped at once, without draining.
///
/// # Safety
/// `server` must be NULL or live, not used again afterwards.
#[no_mangle]
pub unsafe extern "C" fn tunnel_server_free(server: *mut tunnel_server) {
    infallible((), || {
        // SAFETY: the caller passes NULL or a live server.
        if let Ok(s) = unsafe { try_ref(server, "server") } {
            if let Some(h) = s.handle.lock().unwrap_or_else(|p| p.into_inner()).take() {
                h.abort();
            }
        }
        // SAFETY: the caller passes NULL or a server from `tunnel_server_start`, freed once.
        unsafe { free_box(server) }
    })
}
