//! `tunnel_config`: what a dialer or listener needs to reach a relay (URL, shared key, TLS
//! roots, timeout, listener identity and name). Setters check their input at once, so a bad
//! key or CA file fails where it was given. Dialers and listeners copy what they need, so a
//! config can be freed (or reused) right after `tunnel_dialer_new` / `tunnel_listener_bind`.

use std::ffi::c_char;
use std::path::Path;
use std::time::Duration;

use libtunnel::transport::{ClientTls, RelayUrl};
use libtunnel::{Identity, Key};

use crate::error::{fallible, tunnel_result, Fail};
use crate::handle::{free_box, into_raw, out_ptr, str_arg, try_mut, Castable};

/// A client configuration (opaque). Made by `tunnel_config_new`, ended by `tunnel_config_free`.
/// Not thread-safe while being changed; reading it from several threads at once is fine.
pub struct tunnel_config {
    _private: [u8; 0],
}

/// The Rust side of a `tunnel_config`.
#[derive(Debug, Clone)]
pub struct Config {
    /// Relay URL, already checked.
    pub relay: String,
    /// Shared key for dialing.
    pub key: Option<Key>,
    /// Trust for `wss://` (default: the public Web PKI).
    pub tls: Option<ClientTls>,
    /// Dial / registration deadline.
    pub timeout: Option<Duration>,
    /// A listener's identity.
    pub identity: Option<Identity>,
    /// A listener's chosen name (default: derived from the identity).
    pub name: Option<String>,
    /// A listener joins its name's pool of replicas.
    pub pool: bool,
    /// A listener is an exit listener with these allow rules.
    pub exit: Option<libtunnel::egress::Allowlist>,
}

impl Castable for tunnel_config {
    type Rust = Config;
}

/// Start a config for the relay at `relay_url` (`ws://`, `wss://` or `tcp://`).
///
/// On success `*out` receives a new config owned by the caller; end it with `tunnel_config_free`.
/// Fails with `TUNNEL_RESULT_INVALID_ARGUMENT` for a malformed URL.
///
/// # Safety
/// `relay_url` must be NULL or a NUL-terminated string; `out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tunnel_config_new(relay_url: *const c_char, out: *mut *mut tunnel_config) -> tunnel_result {
    fallible(|| {
        let out = out_ptr(out, "out")?;
        // SAFETY: the caller passes NULL or a NUL-terminated string.
        let relay = unsafe { str_arg(relay_url, "relay_url") }?;
        RelayUrl::parse(relay)?;
        let cfg = Config { relay: relay.to_string(), key: None, tls: None, timeout: None, identity: None, name: None, pool: false, exit: None };
        // SAFETY: `out` is non-NULL and writable (caller's guarantee).
        unsafe { *out = into_raw::<tunnel_config>(cfg) };
        Ok(())
    })
}

/// Run a setter on a config.
///
/// # Safety
/// `cfg` must be NULL or a live config; `value` NULL or NUL-terminated.
unsafe fn set(cfg: *mut tunnel_config, value: *const c_char, what: &str, apply: impl FnOnce(&mut Config, &str) -> Result<(), Fail>) -> tunnel_result {
    fallible(|| {
        // SAFETY: the caller passes NULL or a live config that nobody else is using.
        let cfg = unsafe { try_mut(cfg, "cfg") }?;
        // SAFETY: the caller passes NULL or a NUL-terminated string.
        let value = unsafe { str_arg(value, what) }?;
        apply(cfg, value)
    })
}

/// Set the shared key a dialer authenticates with, written `KID:BASE64` (what `tunnel keygen`
/// prints as `TUNNEL_KEY`). Copied; the caller keeps `key`.
///
/// # Safety
/// `cfg` must be NULL or a live config; `key` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn tunnel_config_set_key(cfg: *mut tunnel_config, key: *const c_char) -> tunnel_result {
    // SAFETY: forwarded caller guarantees.
    unsafe {
        set(cfg, key, "key", |c, v| {
            c.key = Some(Key::parse(v)?);
            Ok(())
        })
    }
}

/// Trust only the PEM certificates in the file at `path` for `wss://` relays (a private CA or a
/// self-signed relay certificate). The file is read now. Default: the public Web PKI.
///
/// # Safety
/// `cfg` must be NULL or a live config; `path` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn tunnel_config_set_ca_file(cfg: *mut tunnel_config, path: *const c_char) -> tunnel_result {
    // SAFETY: forwarded caller guarantees.
    unsafe {
        set(cfg, path, "path", |c, v| {
            c.tls = Some(ClientTls::from_pem_file(Path::new(v))?);
            Ok(())
        })
    }
}

/// Set how long one dial (or a listener's registration) may take, in milliseconds (default
/// 20000). 0 is `TUNNEL_RESULT_INVALID_ARGUMENT`.
///
/// # Safety
/// `cfg` must be NULL or a live config.
#[no_mangle]
pub unsafe extern "C" fn tunnel_config_set_timeout_ms(cfg: *mut tunnel_config, timeout_ms: u64) -> tunnel_result {
    fallible(|| {
        // SAFETY: the caller passes NULL or a live config that nobody else is using.
        let cfg = unsafe { try_mut(cfg, "cfg") }?;
        if timeout_ms == 0 {
            return Err(Fail::new(tunnel_result::InvalidArgument, "timeout_ms must be at least 1"));
        }
        cfg.timeout = Some(Duration::from_millis(timeout_ms));
        Ok(())
    })
}

/// Set a listener's Ed25519 identity from a PKCS#8 PEM file (`tunnel keygen --listener --out
/// FILE` makes one). When the file does not exist and `create` is true, a new identity is
/// generated and written there (mode 0600) first. The file is read now.
///
/// # Safety
/// `cfg` must be NULL or a live config; `path` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn tunnel_config_set_identity_file(cfg: *mut tunnel_config, path: *const c_char, create: bool) -> tunnel_result {
    // SAFETY: forwarded caller guarantees.
    unsafe {
        set(cfg, path, "path", |c, v| {
            let path = Path::new(v);
            if create && !path.exists() {
                Identity::generate().save(path)?;
            }
            c.identity = Some(Identity::load(path)?);
            Ok(())
        })
    }
}

/// Register a listener under `name` instead of the identity's derived name (the relay must
/// grant it to the key in `listener_keys`). Checked when the listener binds.
///
/// # Safety
/// `cfg` must be NULL or a live config; `name` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn tunnel_config_set_listener_name(cfg: *mut tunnel_config, name: *const c_char) -> tunnel_result {
    // SAFETY: forwarded caller guarantees.
    unsafe {
        set(cfg, name, "name", |c, v| {
            c.name = Some(v.to_string());
            Ok(())
        })
    }
}

/// Make a listener bound from this config join its name's pool of replicas (`tunnel listen
/// --pool`): every replica opts in (same key, or keys the relay grants the name), and the relay
/// spreads streams over them. Off by default (a second registration then gets today's rules).
///
/// # Safety
/// `cfg` must be NULL or a live config.
#[no_mangle]
pub unsafe extern "C" fn tunnel_config_set_pool(cfg: *mut tunnel_config, pool: bool) -> tunnel_result {
    fallible(|| {
        // SAFETY: the caller passes NULL or a live config that nobody else is using.
        let cfg = unsafe { try_mut(cfg, "cfg") }?;
        cfg.pool = pool;
        Ok(())
    })
}

/// Make a listener bound from this config an exit listener (`tunnel listen --exit --allow`):
/// dialers the relay permits reach the targets `allow_json` admits (a JSON list of
/// `{"host", "port"}` rules, the relay's `allow` syntax) with `tunnel_dialer_dial_via`. The
/// rules are checked now (`TUNNEL_RESULT_INVALID_CONFIG` names the bad rule).
///
/// # Safety
/// `cfg` must be NULL or a live config; `allow_json` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn tunnel_config_set_exit(cfg: *mut tunnel_config, allow_json: *const c_char) -> tunnel_result {
    // SAFETY: forwarded caller guarantees.
    unsafe {
        set(cfg, allow_json, "allow_json", |c, v| {
            let rules = libtunnel::egress::Allowlist::from_json(v, "exit allow")?;
            if rules.is_empty() {
                return Err(Fail::new(tunnel_result::InvalidArgument, "an exit listener needs at least one allow rule"));
            }
            c.exit = Some(rules);
            Ok(())
        })
    }
}

/// Free a config made by `tunnel_config_new`. NULL is a no-op. Dialers and listeners made from
/// it are unaffected.
///
/// # Safety
/// `cfg` must be NULL or a live config, not used again afterwards.
#[no_mangle]
pub unsafe extern "C" fn tunnel_config_free(cfg: *mut tunnel_config) {
    // SAFETY: the caller passes NULL or a config from `tunnel_config_new`, freed once.
    crate::error::infallible((), || unsafe { free_box(cfg) })
}
