//! The options of a dialer and a listener as plain values, for every face: the CLI's flags, the
//! C setters, Python's keyword arguments and Node's options objects each fill one
//! [`ListenerOptions`] or [`DialerOptions`] field by field (renaming only), and the core checks
//! the rules between fields once, here, and returns the builder. Where a face reaches the relay
//! from (`relay`, `key`, `ca`, `timeout`, `mode`, the `TUNNEL_*` variables) is the embedded
//! [`ClientOptions`].
//!
//! Adding a listener option: a field here and its line in [`ListenerOptions::builder`], then one
//! line per face (a flag, a setter, a keyword, an option) naming the field.

use super::config::{ClientOptions, ClientRole};
use super::keys::load_identity_text;
use crate::dialer::DialerBuilder;
use crate::e2e::{DialerE2e, ListenerE2e};
use crate::egress::Allowlist;
use crate::error::{Error, Result};
use crate::listener::ListenerBuilder;
pub use crate::listener::DEFAULT_BACKLOG;

/// Everything a listener can be asked for. `Default` is a plain listener under its key-derived
/// name, configured from the environment.
#[derive(Debug, Clone, Default)]
pub struct ListenerOptions {
    /// Relay, key, trust and timeout (and where unset ones come from).
    pub client: ClientOptions,
    /// Register this name instead of the key-derived one (the relay must grant it to the key).
    pub name: Option<String>,
    /// Ask the relay for a public TCP port.
    pub tcp_port: bool,
    /// Join the name's pool of replicas.
    pub pool: bool,
    /// The local service speaks h2c: public requests reach it as HTTP/2.
    pub h2c: bool,
    /// The relay's HTTPS port passes connections whose SNI names this listener through.
    pub tls_passthrough: bool,
    /// Streams waiting for `accept()` before more are refused (`None`: [`DEFAULT_BACKLOG`]).
    pub backlog: Option<usize>,
    /// Be an exit listener with these allow rules (JSON, the relay's `allow` syntax).
    pub exit: Option<String>,
    /// With `exit`: expose no service, so streams dialed to the name are refused (`NOT_ALLOWED`).
    pub exit_only: bool,
    /// End-to-end encryption: terminate TLS on every stream, refuse plaintext ones.
    pub e2e: bool,
    /// With `e2e`: require dialers' keys and admit these (base64 public keys or key-derived names).
    pub allow_peers: Vec<String>,
}

/// An exit listener's allow rules from their JSON, refused when empty (the check the C setter
/// runs at once and [`ListenerOptions::builder`] runs again).
pub fn exit_rules(json: &str) -> Result<Allowlist> {
    let rules = Allowlist::from_json(json, "exit allow rules")?;
    if rules.is_empty() {
        return Err(Error::argument("an exit listener needs at least one allow rule, like [{\"host\": \"db.internal\", \"port\": 5432}]"));
    }
    Ok(rules)
}

impl ListenerOptions {
    /// Check the options against each other and the environment, and return the builder (bind
    /// it to register).
    pub fn builder(self) -> Result<ListenerBuilder> {
        if !self.e2e && !self.allow_peers.is_empty() {
            return Err(Error::argument("allow_peers (--allow-peer) only applies to an end-to-end encrypted listener: turn e2e on"));
        }
        if self.exit_only && self.exit.is_none() {
            return Err(Error::argument("exit_only applies to an exit listener: give its allow rules (exit, --exit --allow)"));
        }
        if self.h2c && self.tls_passthrough {
            return Err(Error::argument(
                "h2c and tls_passthrough exclude each other: a passed-through connection is the client's own TLS, not HTTP the relay forwards",
            ));
        }
        if self.backlog == Some(0) {
            return Err(Error::argument("backlog must be at least 1"));
        }
        let mut b = self
            .client
            .resolve(ClientRole::Listener)?
            .listener_builder()?
            .tcp_port(self.tcp_port)
            .pool(self.pool)
            .h2c(self.h2c)
            .tls_passthrough(self.tls_passthrough)
            .backlog(self.backlog.unwrap_or(DEFAULT_BACKLOG));
        if let Some(rules) = &self.exit {
            b = b.exit(exit_rules(rules)?).exit_only(self.exit_only);
        }
        if let Some(n) = self.name {
            b = b.name(n);
        }
        if self.e2e {
            let mut e2e = ListenerE2e::new();
            for k in &self.allow_peers {
                e2e = e2e.allow_peer(k)?;
            }
            b = b.e2e(e2e);
        }
        Ok(b)
    }
}

/// Everything a dialer can be asked for. `Default` is a plain dialer configured from the
/// environment.
#[derive(Debug, Clone, Default)]
pub struct DialerOptions {
    /// Relay, key, trust, timeout and mode (and where unset ones come from).
    pub client: ClientOptions,
    /// Reach every target through this exit listener.
    pub via: Option<String>,
    /// End-to-end encrypt dials to listener names.
    pub e2e: bool,
    /// With `e2e`: chosen names pinned to their listener's key, each `NAME=KEY`.
    pub e2e_pins: Vec<String>,
    /// With `e2e`: this dialer's Ed25519 key (PEM text or a file), presented to listeners that
    /// admit listed keys; default: `client.identity` when one was loaded.
    pub e2e_identity: Option<String>,
}

impl DialerOptions {
    /// Check the options against each other and the environment, and return the builder.
    pub fn builder(self) -> Result<DialerBuilder> {
        if !self.e2e && (!self.e2e_pins.is_empty() || self.e2e_identity.is_some()) {
            return Err(Error::argument(
                "e2e pins and an e2e identity (--e2e-pin, --e2e-identity) only apply to an end-to-end encrypted dialer: turn e2e on",
            ));
        }
        let loaded = self.client.identity.clone();
        let mut b = self.client.resolve(ClientRole::Dialer)?.dialer_builder()?;
        if let Some(v) = self.via {
            b = b.via(v);
        }
        if self.e2e {
            let mut e2e = DialerE2e::new();
            for pin in &self.e2e_pins {
                e2e = e2e.pin_spec(pin)?;
            }
            let identity = match &self.e2e_identity {
                Some(text) => Some(load_identity_text(text)?),
                None => loaded,
            };
            if let Some(id) = identity {
                e2e = e2e.identity(id);
            }
            b = b.e2e(e2e);
        }
        Ok(b)
    }

    /// The dialer these options describe (no network I/O yet).
    pub fn dialer(self) -> Result<crate::Dialer> {
        self.builder()?.build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ClientEnv;
    use crate::error::ErrorCode;

    fn client() -> ClientOptions {
        ClientOptions {
            relay: Some("ws://127.0.0.1:1".into()),
            key: Some("1:c2VjcmV0LXNlY3JldC1zZWNyZXQ=".into()),
            env: ClientEnv::None,
            ..Default::default()
        }
    }

    #[test]
    fn cross_field_rules_are_checked_once_for_every_face() {
        let l = |o: ListenerOptions| o.builder().map(|_| ()).unwrap_err();
        let e = l(ListenerOptions { allow_peers: vec!["x".into()], ..Default::default() });
        assert_eq!(e.code(), ErrorCode::InvalidArgument);
        assert!(e.message().contains("e2e"), "{e}");
        assert!(l(ListenerOptions { exit_only: true, ..Default::default() }).message().contains("exit"));
        assert!(l(ListenerOptions { h2c: true, tls_passthrough: true, ..Default::default() }).message().contains("exclude"));
        assert!(l(ListenerOptions { backlog: Some(0), ..Default::default() }).message().contains("backlog"));
        let e = DialerOptions { client: client(), e2e_pins: vec!["api=x".into()], ..Default::default() }.builder().unwrap_err();
        assert!(e.message().contains("turn e2e on"), "{e}");
        assert!(DialerOptions { client: client(), ..Default::default() }.dialer().is_ok());
        assert_eq!(exit_rules("[]").unwrap_err().code(), ErrorCode::InvalidArgument);
    }
}
