//! One client configuration for every face. A dialer or listener is configured from explicit
//! values (CLI flags, C setters, Python keyword arguments, Node options) and then from one set of
//! environment variables, [`CLIENT_VARS`], read from the process environment and `./.env` (which
//! never overrides the real environment, as for the relay). The relay derives the client names it
//! tolerates in a shared environment from the same list, so one `.env` serves both sides.
//!
//! [`ClientOptions::resolve`] turns the values into a checked [`ClientConfig`]; every error is
//! `INVALID_ARGUMENT` (or `INVALID_CONFIG` for a bad variable), names the option or variable to
//! fix, and never contains a secret.

use std::path::PathBuf;
use std::time::Duration;

use super::keys::{load_identity_text, parse_key_text};
use super::proxy::{Proxy, ProxyRules};
use crate::auth::Key;
use crate::dialer::{Dialer, DialerBuilder};
use crate::error::{Error, ErrorCode, Result};
use crate::identity::Identity;
use crate::listener::ListenerBuilder;
use crate::stream::Mode;
use crate::transport::ClientTls;

pub use crate::env::{
    checked_millis, checked_seconds, is_client_var, ClientEnv, ClientVar, CA_VAR, CLIENT_VARS, KEY_VAR, LISTENER_KEY_VAR, MAX_SECONDS, MODE_VAR,
    PROXY_VAR, RELAY_VAR, TIMEOUT_VAR, WORKER_THREADS_VAR,
};

/// The default time one dial (or a listener's registration) may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);

/// Which kind of client is being configured (it decides which key variable applies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientRole {
    /// Dials targets with a shared key.
    Dialer,
    /// Registers a name with an Ed25519 identity.
    Listener,
}

fn client_var(name: &str) -> &'static ClientVar {
    CLIENT_VARS.iter().find(|v| v.name == name).expect("the name is one of CLIENT_VARS")
}

/// Explicit values for a client, each optional: what is not given is read from the environment.
#[derive(Clone, Default)]
pub struct ClientOptions {
    /// Relay URL (`ws://`, `wss://` or `tcp://`).
    pub relay: Option<String>,
    /// Dialer: `KID:BASE64` or a file holding it. Listener: PEM text or a PEM file.
    pub key: Option<String>,
    /// An identity already loaded (the C face's setter, tests); wins over `key` for listeners.
    pub identity: Option<Identity>,
    /// A shared key already parsed; wins over `key` for dialers.
    pub parsed_key: Option<Key>,
    /// PEM file of CA certificates to trust for `wss://`.
    pub ca: Option<PathBuf>,
    /// Seconds one dial or registration may take.
    pub timeout: Option<f64>,
    /// Emissary classic mode (dialers).
    pub mode: Option<Mode>,
    /// The upstream proxy (`--proxy URL|none`); unset: `TUNNEL_PROXY`, then the conventional
    /// `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY` with `NO_PROXY` (see [`super::proxy`]).
    pub proxy: Option<Proxy>,
    /// Where unset values come from.
    pub env: ClientEnv,
    /// How this face gives a key, for the error when none is given (default "pass the key";
    /// the C face says which setter to call).
    pub give_key: Option<(&'static str, &'static str)>,
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("relay", &self.relay)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .field("ca", &self.ca)
            .field("timeout", &self.timeout)
            .field("mode", &self.mode)
            .field("proxy", &self.proxy)
            .finish_non_exhaustive()
    }
}

/// A checked client configuration: everything a dialer or listener needs to reach its relay.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The relay URL, already checked.
    pub relay: String,
    /// The dialer's shared key (dialers).
    pub key: Option<Key>,
    /// The listener's identity (listeners).
    pub identity: Option<Identity>,
    /// Trust for `wss://` (default: the public Web PKI).
    pub tls: Option<ClientTls>,
    /// How long one dial or registration may take.
    pub timeout: Duration,
    /// Multiplexed or Emissary classic.
    pub mode: Mode,
    /// Which upstream proxy each relay URL is reached through.
    pub proxy: ProxyRules,
}

impl ClientOptions {
    /// Options read from the process environment and `./.env` only.
    pub fn from_env() -> ClientOptions {
        ClientOptions::default()
    }

    /// Check the values (explicit first, then the environment) for a client of `role`.
    pub fn resolve(self, role: ClientRole) -> Result<ClientConfig> {
        let env = &self.env;
        let relay = match self.relay {
            Some(r) => r,
            None => env.var(client_var(RELAY_VAR))?.ok_or_else(|| {
                Error::argument(format!("no relay URL: pass the relay (ws://, wss://, tcp://, grpc://, grpcs:// or quic://) or set {RELAY_VAR}"))
            })?,
        };
        super::relays::check_relay_urls(&relay)?;
        let (key, identity) = match role {
            ClientRole::Dialer => {
                let key = match (self.parsed_key, self.key) {
                    (Some(k), _) => k,
                    (None, Some(text)) => parse_key_text(&text)?,
                    (None, None) => match env.var(client_var(KEY_VAR))? {
                        Some(text) => parse_key_text(&text).map_err(|e| Error::new(e.code(), format!("{KEY_VAR}: {}", e.message())))?,
                        None => {
                            let give = self.give_key.map_or("pass the key", |(dialer, _)| dialer);
                            return Err(Error::argument(format!(
                                "no shared key: {give} (KID:BASE64, or a file holding it) or set {KEY_VAR}; `tunnel keygen` makes one"
                            )));
                        }
                    },
                };
                (Some(key), None)
            }
            ClientRole::Listener => {
                let id = match (self.identity, self.key) {
                    (Some(id), _) => id,
                    (None, Some(text)) => load_identity_text(&text)?,
                    (None, None) => match env.var(client_var(LISTENER_KEY_VAR))? {
                        Some(text) => load_identity_text(&text).map_err(|e| Error::new(e.code(), format!("{LISTENER_KEY_VAR}: {}", e.message())))?,
                        None => {
                            let give = self.give_key.map_or("pass the key", |(_, listener)| listener);
                            return Err(Error::argument(format!(
                                "no listener key: {give} (a PEM file or its text) or set {LISTENER_KEY_VAR}; `tunnel keygen --listener --out FILE` makes one"
                            )));
                        }
                    },
                };
                (None, Some(id))
            }
        };
        let ca = match self.ca {
            Some(p) => Some(p),
            None => env.var(client_var(CA_VAR))?.filter(|s| !s.trim().is_empty()).map(PathBuf::from),
        };
        let tls = ca.as_deref().map(ClientTls::from_pem_file).transpose()?;
        let timeout = match self.timeout {
            Some(s) => checked_seconds("timeout", s)?,
            None => match env.var(client_var(TIMEOUT_VAR))? {
                Some(v) => {
                    let secs = v.trim().parse::<f64>().map_err(|_| bad_var(TIMEOUT_VAR, &v, "a number of seconds"))?;
                    checked_seconds(TIMEOUT_VAR, secs).map_err(|e| Error::new(ErrorCode::InvalidConfig, e.message().to_string()))?
                }
                None => DEFAULT_TIMEOUT,
            },
        };
        let mode = match self.mode {
            Some(m) => m,
            None => match env.var(client_var(MODE_VAR))? {
                Some(v) => parse_mode(&v)?,
                None => Mode::Multiplexed,
            },
        };
        let proxy = ProxyRules::resolve(&self.proxy.unwrap_or_default(), env)?;
        Ok(ClientConfig { relay, key, identity, tls, timeout, mode, proxy })
    }
}

fn bad_var(var: &str, value: &str, want: &str) -> Error {
    Error::new(ErrorCode::InvalidConfig, format!("{var} must be {want}, got {value:?}"))
}

/// `multiplexed` or `classic` (any case).
pub fn parse_mode(text: &str) -> Result<Mode> {
    match text.trim().to_ascii_lowercase().as_str() {
        "multiplexed" | "mux" | "" => Ok(Mode::Multiplexed),
        "classic" | "emissary" => Ok(Mode::Classic),
        _ => Err(bad_var(MODE_VAR, text, "multiplexed or classic")),
    }
}

impl ClientConfig {
    /// A dialer builder with this relay, key, trust, timeout and mode (add options, then build).
    pub fn dialer_builder(&self) -> Result<DialerBuilder> {
        let key = self.key.clone().ok_or_else(|| Error::argument("this client configuration has no shared key; a dialer needs one"))?;
        let mut b = Dialer::builder(&self.relay).key(key).mode(self.mode).timeout(self.timeout).proxy_rules(self.proxy.clone());
        if let Some(tls) = &self.tls {
            b = b.tls(tls.clone());
        }
        Ok(b)
    }

    /// The dialer this configuration describes.
    pub fn dialer(&self) -> Result<Dialer> {
        self.dialer_builder()?.build()
    }

    /// A listener builder with this relay, identity, trust and timeout (add options, then bind).
    pub fn listener_builder(&self) -> Result<ListenerBuilder> {
        let id = self.identity.clone().ok_or_else(|| Error::argument("this client configuration has no listener key; a listener needs one"))?;
        let mut b = crate::listener::Listener::builder(&self.relay, id).timeout(self.timeout).proxy_rules(self.proxy.clone());
        if let Some(tls) = &self.tls {
            b = b.tls(tls.clone());
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "1:c2VjcmV0LXNlY3JldC1zZWNyZXQ=";

    fn fixed(pairs: &[(&str, &str)]) -> ClientEnv {
        ClientEnv::Fixed(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn explicit_values_win_over_the_environment() {
        let o = ClientOptions {
            relay: Some("ws://127.0.0.1:1".into()),
            timeout: Some(3.0),
            env: fixed(&[(RELAY_VAR, "ws://127.0.0.1:2"), (KEY_VAR, KEY), (TIMEOUT_VAR, "9"), (MODE_VAR, "classic")]),
            ..Default::default()
        };
        let c = o.resolve(ClientRole::Dialer).unwrap();
        assert_eq!(c.relay, "ws://127.0.0.1:1");
        assert_eq!(c.timeout, Duration::from_secs(3));
        assert_eq!(c.mode, Mode::Classic);
        assert_eq!(c.key.unwrap().to_key_string(), KEY);
    }

    #[test]
    fn old_worker_variable_still_read() {
        let env = fixed(&[("LIBTUNNEL_WORKER_THREADS", "3")]);
        assert_eq!(env.var(client_var(WORKER_THREADS_VAR)).unwrap().as_deref(), Some("3"));
        assert!(is_client_var("LIBTUNNEL_WORKER_THREADS") && is_client_var("TUNNEL_LISTENER_KEY") && !is_client_var("TUNNEL_ALLOW"));
    }

    #[test]
    fn bad_seconds_are_refused_not_panics() {
        for s in [f64::NAN, -1.0, 0.0, 1e30, f64::INFINITY, f64::NEG_INFINITY] {
            let e = checked_seconds("timeout", s).unwrap_err();
            assert_eq!(e.code(), ErrorCode::InvalidArgument, "{s}");
            assert!(e.message().contains("positive number of seconds"), "{e}");
        }
        assert!(checked_seconds("t", 0.0000001).is_err());
        assert_eq!(checked_seconds("t", 0.001).unwrap(), Duration::from_millis(1));
        let env = fixed(&[(RELAY_VAR, "ws://127.0.0.1:1"), (KEY_VAR, KEY), (TIMEOUT_VAR, "inf")]);
        let e = ClientOptions { env, ..Default::default() }.resolve(ClientRole::Dialer).unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidConfig);
        assert!(e.message().contains(TIMEOUT_VAR), "{e}");
    }

    #[test]
    fn missing_values_name_the_variable() {
        let e = ClientOptions { env: ClientEnv::None, ..Default::default() }.resolve(ClientRole::Dialer).unwrap_err();
        assert!(e.message().contains(RELAY_VAR), "{e}");
        let o = ClientOptions { relay: Some("ws://127.0.0.1:1".into()), env: ClientEnv::None, ..Default::default() };
        let e = o.clone().resolve(ClientRole::Dialer).unwrap_err();
        assert!(e.message().contains(KEY_VAR) && e.message().contains("tunnel keygen"), "{e}");
        let e = o.resolve(ClientRole::Listener).unwrap_err();
        assert!(e.message().contains(LISTENER_KEY_VAR) && e.message().contains("--listener"), "{e}");
    }
}
