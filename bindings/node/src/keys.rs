//! Keys: the dialer's shared secret (`KID:BASE64`, as `tunnel keygen` prints) and the listener's
//! Ed25519 identity (PKCS#8 PEM). Both accept the key itself or a path to a file holding it, as
//! the CLI's `--key` does.

use base64::Engine;
use libtunnel::{Error, ErrorCode, Identity, Key};
use napi::Env;
use napi_derive::napi;

use crate::sync;

/// A shared-secret key for dialers, and the relay's matching `auth_keys` entry.
#[napi(object)]
pub struct SharedKey {
    /// `KID:BASE64`: what `Dialer.connect({ key })` and `TUNNEL_KEY` take. Keep it secret.
    pub key: String,
    /// JSON list for the relay's `auth_keys` setting (`TUNNEL_AUTH_KEYS`).
    pub auth_keys: String,
}

/// A listener identity as JS sees it.
#[napi(object)]
pub struct ListenerKey {
    /// The private key, PKCS#8 PEM. Keep it secret.
    pub pem: String,
    /// The key-derived listener name.
    pub name: String,
    /// The public key, base64 (for the relay's `listener_keys`).
    pub public_key: String,
}

/// Parse a dialer key given as `KID:BASE64` or as a path to a file holding it.
pub(crate) fn parse_shared_key(text: &str) -> libtunnel::Result<Key> {
    match std::fs::read_to_string(text) {
        Ok(s) => Key::parse(s.trim()),
        Err(_) if text.contains(':') => Key::parse(text),
        Err(e) => Err(Error::new(ErrorCode::InvalidArgument, format!("key is neither KID:BASE64 nor a readable file ({e})"))),
    }
}

/// Parse a listener identity given as PEM text or as a path to a PEM file.
pub(crate) fn parse_identity(text: &str) -> libtunnel::Result<Identity> {
    if text.contains("-----BEGIN") {
        Identity::from_pem(text)
    } else {
        Identity::load(text.as_ref())
    }
}

fn listener_key(id: &Identity) -> ListenerKey {
    ListenerKey { pem: id.to_pem(), name: id.name(), public_key: id.public_key_base64() }
}

/// Make a random 32-byte shared secret with key id `kid` (default 1).
#[napi(catch_unwind)]
pub fn generate_key(env: Env, kid: Option<u32>) -> napi::Result<SharedKey> {
    let kid = kid.unwrap_or(1);
    let secret: [u8; 32] = rand::random();
    sync(&env, Key::new(kid, secret.to_vec()))?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(secret);
    Ok(SharedKey { key: format!("{kid}:{b64}"), auth_keys: format!(r#"[{{"kid":{kid},"data":"{b64}"}}]"#) })
}

/// Make a new Ed25519 listener identity; with `out`, also write it there (mode 0600, must not
/// exist).
#[napi(catch_unwind)]
pub fn generate_listener_key(env: Env, out: Option<String>) -> napi::Result<ListenerKey> {
    let id = Identity::generate();
    if let Some(path) = out {
        sync(&env, id.save(path.as_ref()))?;
    }
    Ok(listener_key(&id))
}

/// Describe a listener identity given as PEM text or a PEM file path.
#[napi(catch_unwind)]
pub fn load_listener_key(env: Env, key: String) -> napi::Result<ListenerKey> {
    Ok(listener_key(&sync(&env, parse_identity(&key))?))
}
