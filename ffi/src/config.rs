//! `tunnel_config`: what a dialer or listener needs to reach a relay (URL, shared key, TLS
//! roots, timeout, mode, upstream proxy, listener identity and name), the C face of the core's
//! `libtunnel::client::ClientOptions`: what a setter does not give is read, when the dialer or
//! listener is made, from the same `TUNNEL_*` variables every face reads (`TUNNEL_RELAY`,
//! `TUNNEL_KEY`, `TUNNEL_LISTENER_KEY`, `TUNNEL_CA`, `TUNNEL_TIMEOUT`, `TUNNEL_MODE`, `TUNNEL_PROXY`; the process
//! environment, then `./.env`). Setters check their input at once, so a bad key or CA file fails
//! where it was given. Dialers and listeners copy what they need, so a config can be freed (or
//! reused) right after `tunnel_dialer_new` / `tunnel_listener_bind`.
//!
//! Setter names: `tunnel_config_set_NAME` for a value both roles read (key, CA, timeout, e2e),
//! `tunnel_config_set_listener_NAME` / `tunnel_config_add_listener_NAME` for a listener's own
//! options, each one field of the core's `client::ListenerOptions`. The older
//! `tunnel_config_set_pool`, `tunnel_config_set_exit` and `tunnel_config_add_allow_peer` stay as
//! deprecated wrappers, so programs linked against them keep working.

use std::ffi::c_char;
use std::path::Path;

use libtunnel::client::keys::parse_key_text;
use libtunnel::client::{checked_seconds, ClientOptions, DialerOptions, ListenerOptions, Proxy};
use libtunnel::ClientTls;
use libtunnel::{Identity, Mode};

use crate::boundary::fallible;
use crate::error::{tunnel_result, Fail};
use crate::handle::{free_box, into_raw, out_ptr, str_arg, try_mut, Castable};

/// A client configuration (opaque). Made by `tunnel_config_new`, ended by `tunnel_config_free`.
/// Not thread-safe while being changed; reading it from several threads at once is fine.
pub struct tunnel_config {
    _private: [u8; 0],
}

/// The Rust side of a `tunnel_config`: the core's listener options (whose `client` part, the
/// relay, key, trust, timeout and mode, dialers share) plus a dialer's e2e pins. Setters rename
/// fields; the core checks the rules between them (`ListenerOptions::builder`,
/// `DialerOptions::builder`) when the dialer or listener is made.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Every listener option; `listener.client` and `listener.e2e` serve dialers too.
    pub listener: ListenerOptions,
    /// Dialer, e2e: `NAME=KEY` pins for chosen names.
    pub e2e_pins: Vec<String>,
}

/// How a C program gives a key, for the core's error when none is given.
const GIVE_KEY: (&str, &str) = ("call tunnel_config_set_key", "call tunnel_config_set_identity_file");

impl Config {
    fn with_options(options: ClientOptions) -> Config {
        Config { listener: ListenerOptions { client: options, ..ListenerOptions::default() }, e2e_pins: Vec::new() }
    }

    /// The dialer's options: the shared client part, e2e, pins, and (mutual mode) the config's
    /// identity. A missing key names the C setter that gives it.
    pub fn dialer(&self) -> DialerOptions {
        let mut client = self.listener.client.clone();
        client.give_key = Some(GIVE_KEY);
        DialerOptions { client, via: None, e2e: self.listener.e2e, e2e_pins: self.e2e_pins.clone(), e2e_identity: None }
    }

    /// The listener's options. A missing key names the C setter that gives it.
    pub fn listener(&self) -> ListenerOptions {
        let mut o = self.listener.clone();
        o.client.give_key = Some(GIVE_KEY);
        o
    }
}

impl Castable for tunnel_config {
    type Rust = Config;
}

/// Start a config for the relay at `relay_url` (`ws://`, `wss://` or `tcp://`).
/// (`tunnel_config_new_env` takes the URL from `TUNNEL_RELAY` instead.)
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
        libtunnel::client::check_relay_urls(relay)?;
        let cfg = Config::with_options(ClientOptions { relay: Some(relay.to_string()), ..ClientOptions::default() });
        // SAFETY: `out` is non-NULL and writable (caller's guarantee).
        unsafe { *out = into_raw::<tunnel_config>(cfg) };
        Ok(())
    })
}

/// Start a config whose relay URL comes from `TUNNEL_RELAY` (the environment, then `./.env`),
/// read when the dialer or listener is made, like every value no setter gives.
///
/// On success `*out` receives a new config owned by the caller; end it with `tunnel_config_free`.
///
/// # Safety
/// `out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tunnel_config_new_env(out: *mut *mut tunnel_config) -> tunnel_result {
    fallible(|| {
        let out = out_ptr(out, "out")?;
        let cfg = Config::with_options(ClientOptions::default());
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

/// Run a setter that takes a flag or a number on a config.
///
/// # Safety
/// `cfg` must be NULL or a live config.
unsafe fn set_value(cfg: *mut tunnel_config, apply: impl FnOnce(&mut Config) -> Result<(), Fail>) -> tunnel_result {
    fallible(|| {
        // SAFETY: the caller passes NULL or a live config that nobody else is using.
        let cfg = unsafe { try_mut(cfg, "cfg") }?;
        apply(cfg)
    })
}

/// Set the shared key a dialer authenticates with, written `KID:BASE64` (what `tunnel keygen`
/// prints as `TUNNEL_KEY`) or the path of a file holding it. Copied; the caller keeps `key`.
/// Default: `TUNNEL_KEY`.
///
/// # Safety
/// `cfg` must be NULL or a live config; `key` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn tunnel_config_set_key(cfg: *mut tunnel_config, key: *const c_char) -> tunnel_result {
    // SAFETY: forwarded caller guarantees.
    unsafe {
        set(cfg, key, "key", |c, v| {
            c.listener.client.parsed_key = Some(parse_key_text(v)?);
            Ok(())
        })
    }
}

/// Trust only the PEM certificates in the file at `path` for `wss://`, `grpcs://` and `quic://`
/// relays (a private CA or a self-signed relay certificate). The file is read now. Default:
/// `TUNNEL_CA`, else the public Web PKI.
///
/// # Safety
/// `cfg` must be NULL or a live config; `path` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn tunnel_config_set_ca_file(cfg: *mut tunnel_config, path: *const c_char) -> tunnel_result {
    // SAFETY: forwarded caller guarantees.
    unsafe {
        set(cfg, path, "path", |c, v| {
            ClientTls::from_pem_file(Path::new(v))?;
            c.listener.client.ca = Some(v.into());
            Ok(())
        })
    }
}

/// Reach the relay through the upstream proxy at `proxy_url`: `http://user:pass@host:port` (HTTP
/// CONNECT with Basic credentials), `https://...` (TLS to the proxy, trusting the config's CA
/// file, else the public Web PKI), `socks5://user:pass@host:port` (SOCKS5, the relay's name
/// resolved by the proxy), or `none` for a direct connection whatever the environment says.
/// Default: `TUNNEL_PROXY`, else `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` with `NO_PROXY`, as
/// curl reads them. A malformed URL is `TUNNEL_RESULT_INVALID_ARGUMENT`; the password never
/// appears in an error message or a log line.
///
/// # Safety
/// `cfg` must be NULL or a live config; `proxy_url` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn tunnel_config_set_proxy(cfg: *mut tunnel_config, proxy_url: *const c_char) -> tunnel_result {
    // SAFETY: forwarded caller guarantees.
    unsafe {
        set(cfg, proxy_url, "proxy_url", |c, v| {
            c.listener.client.proxy = Some(Proxy::parse(v)?);
            Ok(())
        })
    }
}

/// Set how long one dial (or a listener's registration) may take, in milliseconds (default
/// `TUNNEL_TIMEOUT` seconds, else 20000). 0 and more than 30 days are
/// `TUNNEL_RESULT_INVALID_ARGUMENT`.
///
/// # Safety
/// `cfg` must be NULL or a live config.
#[no_mangle]
pub unsafe extern "C" fn tunnel_config_set_timeout_ms(cfg: *mut tunnel_config, timeout_ms: u64) -> tunnel_result {
    fallible(|| {
        // SAFETY: the caller passes NULL or a live config that nobody else is using.
        let cfg = unsafe { try_mut(cfg, "cfg") }?;
        checked_seconds("timeout_ms / 1000", timeout_ms as f64 / 1000.0)?;
        cfg.listener.client.timeout = Some(timeout_ms as f64 / 1000.0);
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
            // The core's rule for key text, so a shared key passed here by mistake is named as
            // such (and never echoed).
            c.listener.client.identity = Some(libtunnel::client::keys::load_identity_text(v)?);
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
            c.listener.name = Some(v.to_string());
            Ok(())
        })
    }
}

/// Say that a listener's local service speaks HTTP/2 with prior knowledge (h2c; a gRPC server):
/// the relay forwards public HTTP/1.1 and HTTP/2 requests to it as HTTP/2 (`tunnel listen
/// --h2c`). Default false (HTTP/1.1).
///
/// # Safety
/// `cfg` must be NULL or a live config.
#[no_mangle]
pub unsafe extern "C" fn tunnel_config_set_listener_h2c(cfg: *mut tunnel_config, h2c: bool) -> tunnel_result {
    // SAFETY: forwarded caller guarantees.
    unsafe {
        set_value(cfg, |c| {
            c.listener.h2c = h2c;
            Ok(())
        })
    }
}

/// Have the relay's public HTTPS port pass connections whose SNI names this listener through
/// undecrypted; the local service terminates TLS itself (`tunnel listen --tls-passthrough`).
/// Default false.
///
/// # Safety
/// `cfg` must be NULL or a live config.
#[no_mangle]
pub unsafe extern "C" fn tunnel_config_set_listener_tls_passthrough(cfg: *mut tunnel_config, on: bool) -> tunnel_result {
    // SAFETY: forwarded caller guarantees.
    unsafe {
        set_value(cfg, |c| {
            c.listener.tls_passthrough = on;
            Ok(())
        })
    }
}

/// Make dialers speak Emissary's classic protocol (one connection per stream, no half-close)
/// when `classic` is true, libtunnel's multiplexed one when false. Default: `TUNNEL_MODE`, else
/// multiplexed.
///
/// # Safety
/// `cfg` must be NULL or a live config.
#[no_mangle]
pub unsafe extern "C" fn tunnel_config_set_classic(cfg: *mut tunnel_config, classic: bool) -> tunnel_result {
    // SAFETY: forwarded caller guarantees.
    unsafe {
        set_value(cfg, |c| {
            c.listener.client.mode = Some(if classic { Mode::Classic } else { Mode::Multiplexed });
            Ok(())
        })
    }
}

/// Turn end-to-end encryption on or off (default off). A dialer then runs TLS 1.3 inside every
/// stream to a listener name and checks the listener's key against the name (or its pin); other
/// targets fail with `TUNNEL_RESULT_INVALID_ARGUMENT`. In mutual mode it presents the config's
/// identity (`tunnel_config_set_identity_file`). A listener terminates the TLS on every stream
/// (its service reads plaintext) and refuses plaintext streams.
///
/// # Safety
/// `cfg` must be NULL or a live config.
#[no_mangle]
pub unsafe extern "C" fn tunnel_config_set_e2e(cfg: *mut tunnel_config, on: bool) -> tunnel_result {
    // SAFETY: forwarded caller guarantees.
    unsafe {
        set_value(cfg, |c| {
            c.listener.e2e = on;
            Ok(())
        })
    }
}

/// Dialer, e2e: pin a chosen (relay-granted) listener name to its key, written `NAME=KEY` (KEY:
/// base64 public key or key-derived name). Without a pin a chosen name cannot be dialed end to
/// end (`TUNNEL_RESULT_E2E_IDENTITY`). Checked now; may be called several times.
///
/// # Safety
/// `cfg` must be NULL or a live config; `pin` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn tunnel_config_add_e2e_pin(cfg: *mut tunnel_config, pin: *const c_char) -> tunnel_result {
    // SAFETY: forwarded caller guarantees.
    unsafe {
        set(cfg, pin, "pin", |c, v| {
            libtunnel::e2e::DialerE2e::new().pin_spec(v)?;
            c.e2e_pins.push(v.to_string());
            Ok(())
        })
    }
}

/// Listener, e2e: require dialers' own keys and admit this one (base64 public key or key-derived
/// name); others fail with `TUNNEL_RESULT_E2E_REFUSED` at their end. Checked now; may be called
/// several times. Binding fails with `TUNNEL_RESULT_INVALID_ARGUMENT` unless e2e is on
/// (`tunnel_config_set_e2e`).
///
/// # Safety
/// `cfg` must be NULL or a live config; `key` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn tunnel_config_add_listener_allow_peer(cfg: *mut tunnel_config, key: *const c_char) -> tunnel_result {
    // SAFETY: forwarded caller guarantees.
    unsafe {
        set(cfg, key, "key", |c, v| {
            libtunnel::e2e::keys::peer_name(v)?;
            c.listener.allow_peers.push(v.to_string());
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
pub unsafe extern "C" fn tunnel_config_set_listener_pool(cfg: *mut tunnel_config, pool: bool) -> tunnel_result {
    // SAFETY: forwarded caller guarantees.
    unsafe {
        set_value(cfg, |c| {
            c.listener.pool = pool;
            Ok(())
        })
    }
}

/// Make a listener bound from this config an exit listener (`tunnel listen --exit --allow`):
/// dialers the relay permits reach the targets `allow_json` admits (a JSON list of
/// `{"host", "port"}` rules, the relay's `allow` syntax) with `tunnel_dialer_dial_via`. The
/// rules are checked now (`TUNNEL_RESULT_INVALID_CONFIG` names the bad rule).
///
/// # Safety
/// `cfg` must be NULL or a live config; `allow_json` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn tunnel_config_set_listener_exit(cfg: *mut tunnel_config, allow_json: *const c_char) -> tunnel_result {
    // SAFETY: forwarded caller guarantees.
    unsafe {
        set(cfg, allow_json, "allow_json", |c, v| {
            libtunnel::client::options::exit_rules(v)?;
            c.listener.exit = Some(v.to_string());
            Ok(())
        })
    }
}

/// With `tunnel_config_set_listener_exit`: this exit listener exposes no service of its own (it
/// never calls `tunnel_listener_accept`), so a stream dialed to its name is refused before it is
/// accepted and the dialer gets `TUNNEL_RESULT_NOT_ALLOWED` naming why (`tunnel listen --exit`
/// without `--to`). Default false. Binding fails with `TUNNEL_RESULT_INVALID_ARGUMENT` without
/// exit rules.
///
/// # Safety
/// `cfg` must be NULL or a live config.
#[no_mangle]
pub unsafe extern "C" fn tunnel_config_set_listener_exit_only(cfg: *mut tunnel_config, on: bool) -> tunnel_result {
    // SAFETY: forwarded caller guarantees.
    unsafe {
        set_value(cfg, |c| {
            c.listener.exit_only = on;
            Ok(())
        })
    }
}

/// Ask the relay for a public TCP port from its `tcp_ports` range for a listener bound from this
/// config (`tunnel listen --tcp-port`). Default false.
///
/// # Safety
/// `cfg` must be NULL or a live config.
#[no_mangle]
pub unsafe extern "C" fn tunnel_config_set_listener_tcp_port(cfg: *mut tunnel_config, on: bool) -> tunnel_result {
    // SAFETY: forwarded caller guarantees.
    unsafe {
        set_value(cfg, |c| {
            c.listener.tcp_port = on;
            Ok(())
        })
    }
}

/// Set how many accepted streams may wait for `tunnel_listener_accept` (beyond the listener's
/// own small queue of ready sockets) before the relay refuses more (default 128, the core's
/// `DEFAULT_BACKLOG`; `tunnel listen --backlog`). 0 is `TUNNEL_RESULT_INVALID_ARGUMENT`.
///
/// # Safety
/// `cfg` must be NULL or a live config.
#[no_mangle]
pub unsafe extern "C" fn tunnel_config_set_listener_backlog(cfg: *mut tunnel_config, backlog: usize) -> tunnel_result {
    // SAFETY: forwarded caller guarantees.
    unsafe {
        set_value(cfg, |c| {
            if backlog == 0 {
                return Err(Fail::new(tunnel_result::InvalidArgument, "backlog must be at least 1"));
            }
            c.listener.backlog = Some(backlog);
            Ok(())
        })
    }
}

/// Deprecated name of `tunnel_config_add_listener_allow_peer` (kept so the ABI stays; removed in
/// a later release).
///
/// # Safety
/// As `tunnel_config_add_listener_allow_peer`.
#[no_mangle]
#[deprecated(note = "use tunnel_config_add_listener_allow_peer")]
pub unsafe extern "C" fn tunnel_config_add_allow_peer(cfg: *mut tunnel_config, key: *const c_char) -> tunnel_result {
    // SAFETY: forwarded caller guarantees.
    unsafe { tunnel_config_add_listener_allow_peer(cfg, key) }
}

/// Deprecated name of `tunnel_config_set_listener_pool` (kept so the ABI stays; removed in a
/// later release).
///
/// # Safety
/// As `tunnel_config_set_listener_pool`.
#[no_mangle]
#[deprecated(note = "use tunnel_config_set_listener_pool")]
pub unsafe extern "C" fn tunnel_config_set_pool(cfg: *mut tunnel_config, pool: bool) -> tunnel_result {
    // SAFETY: forwarded caller guarantees.
    unsafe { tunnel_config_set_listener_pool(cfg, pool) }
}

/// Deprecated name of `tunnel_config_set_listener_exit` (kept so the ABI stays; removed in a
/// later release).
///
/// # Safety
/// As `tunnel_config_set_listener_exit`.
#[no_mangle]
#[deprecated(note = "use tunnel_config_set_listener_exit")]
pub unsafe extern "C" fn tunnel_config_set_exit(cfg: *mut tunnel_config, allow_json: *const c_char) -> tunnel_result {
    // SAFETY: forwarded caller guarantees.
    unsafe { tunnel_config_set_listener_exit(cfg, allow_json) }
}

/// Free a config made by `tunnel_config_new`. NULL is a no-op. Dialers and listeners made from
/// it are unaffected.
///
/// # Safety
/// `cfg` must be NULL or a live config, not used again afterwards.
#[no_mangle]
pub unsafe extern "C" fn tunnel_config_free(cfg: *mut tunnel_config) {
    // SAFETY: the caller passes NULL or a config from `tunnel_config_new`, freed once.
    crate::boundary::infallible((), || unsafe { free_box(cfg) })
}
