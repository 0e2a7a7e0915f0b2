//! End-to-end encryption of dial-by-name streams through an untrusted relay.
//!
//! Where it sits in the data flow: a dialer with [`DialerE2e`] opens its tunnel stream to a
//! listener name as usual, and then runs TLS 1.3 (rustls) *inside* that stream; a listener with
//! [`ListenerE2e`] terminates the TLS on every stream it accepts and hands its local service
//! plaintext. The relay splices ciphertext and holds no key.
//!
//! Identity without a CA: both ends present RFC 7250 raw public keys (the listener's and, in
//! mutual mode, the dialer's Ed25519 identity key as a `SubjectPublicKeyInfo`). The dialer accepts
//! the listener only if `derived_name(public key)` equals the name it dialed, or, for a
//! relay-granted chosen name (`api`), the key or key-derived name pinned for it. Raw public keys
//! rather than self-signed X.509 certificates because both ends are ours: nothing in a
//! certificate (issuer, validity dates, extensions) would be checked, rcgen would become a runtime
//! dependency for a wrapper that is thrown away, and the handshake carries 44 bytes of key
//! instead of a few hundred bytes of certificate.
//!
//! Wire shape of an E2E stream, after the relay's SOCKS5 reply: a TLS 1.3 handshake (the
//! ClientHello travels with the CONNECT, so it costs no round trip of its own), then, only when the
//! listener asked for the dialer's key (mutual mode), one admission byte (`0`) from the listener
//! inside TLS, so a refused key fails the dial with `E2E_REFUSED` instead of the first read.
//! Then application bytes; half-close is TLS `close_notify` followed by the stream's FIN.
//!
//! Modules: [`keys`] (Ed25519 ⇄ rustls raw keys, pins), `verify` (the two verifiers and the
//! dialer's key resolver), `handshake` (the dial and accept sides and the stream type).

pub(crate) mod handshake;
pub mod keys;
mod verify;

use std::collections::{BTreeMap, BTreeSet};

pub use handshake::E2eStream;

use crate::error::Result;
use crate::identity::Identity;

/// End-to-end settings of a dialer: which listener keys to expect for chosen names, and the
/// dialer's own identity for listeners that require one (mutual mode).
#[derive(Debug, Clone, Default)]
pub struct DialerE2e {
    identity: Option<Identity>,
    /// Listener name → the key-derived name its key must have.
    pins: BTreeMap<String, String>,
}

impl DialerE2e {
    /// E2E with no identity of our own and no pins: key-derived names are checked against the
    /// listener's key; chosen names are refused until pinned.
    pub fn new() -> DialerE2e {
        DialerE2e::default()
    }

    /// Present this Ed25519 identity to listeners that require one (mutual mode).
    pub fn identity(mut self, identity: Identity) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Expect the listener registered as `name` (a relay-granted chosen name) to hold `key`: its
    /// Ed25519 public key in base64, or its key-derived name.
    pub fn pin(mut self, name: &str, key: &str) -> Result<Self> {
        let name = name.trim().to_ascii_lowercase();
        if !crate::identity::valid_name(&name) {
            return Err(crate::error::Error::argument(format!(
                "cannot pin {name:?}: it is not a listener name (1-63 lowercase letters, digits and '-')"
            )));
        }
        self.pins.insert(name, keys::peer_name(key)?);
        Ok(self)
    }

    /// Parse `NAME=KEY` (the CLI's and the bindings' pin syntax) and pin it.
    pub fn pin_spec(self, spec: &str) -> Result<Self> {
        let (name, key) = spec.split_once('=').ok_or_else(|| {
            crate::error::Error::argument(format!("pin {spec:?} must be NAME=KEY (KEY: the listener's base64 public key or its key-derived name)"))
        })?;
        self.pin(name, key)
    }

    /// The identity presented in mutual mode, if any.
    pub fn identity_ref(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    /// The key-derived name the listener `name` must prove: the pin if one is set, else `name`
    /// itself when it has the shape of a key-derived name, else `None` (nothing to check against).
    pub fn expected_name(&self, name: &str) -> Option<String> {
        if let Some(p) = self.pins.get(name) {
            return Some(p.clone());
        }
        keys::looks_derived(name).then(|| name.to_string())
    }
}

/// End-to-end settings of a listener: it terminates TLS on every stream and refuses plaintext
/// ones; with allowed peers it also requires each dialer's Ed25519 key and admits listed ones only.
#[derive(Debug, Clone, Default)]
pub struct ListenerE2e {
    /// Key-derived names of the admitted dialer keys; empty = no client keys asked for.
    allowed: BTreeSet<String>,
}

impl ListenerE2e {
    /// E2E without client keys: any dialer that can verify this listener gets through.
    pub fn new() -> ListenerE2e {
        ListenerE2e::default()
    }

    /// Require dialers to present their identity and admit this one (base64 public key or
    /// key-derived name). Once any peer is allowed the listener is in mutual mode.
    pub fn allow_peer(mut self, key: &str) -> Result<Self> {
        self.allowed.insert(keys::peer_name(key)?);
        Ok(self)
    }

    /// Whether dialers must present a listed key.
    pub fn is_mutual(&self) -> bool {
        !self.allowed.is_empty()
    }

    pub(crate) fn admits(&self, derived: &str) -> bool {
        self.allowed.contains(derived)
    }
}
