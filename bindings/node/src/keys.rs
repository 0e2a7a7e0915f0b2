//! Keys: the dialer's shared secret (`KID:BASE64`, as `tunnel keygen` prints) and the listener's
//! Ed25519 identity (PKCS#8 PEM). Parsing, generation and the printed lines are the core's
//! (`libtunnel::client::keys`), so `npx libtunnel keygen` prints what `tunnel keygen` prints.

use libtunnel::client::keys::{load_identity_text, ListenerKeyText, SharedKeyText};
use libtunnel::Identity;
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

fn listener_key(id: &Identity) -> ListenerKey {
    ListenerKey { pem: id.to_pem(), name: id.name(), public_key: id.public_key_base64() }
}

/// Make a random 32-byte shared secret with key id `kid` (default 1).
#[napi(catch_unwind)]
pub fn generate_key(env: Env, kid: Option<u32>) -> napi::Result<SharedKey> {
    let _ = env;
    let k = SharedKeyText::generate(kid.unwrap_or(1));
    Ok(SharedKey { key: k.key, auth_keys: k.auth_keys })
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
    Ok(listener_key(&sync(&env, load_identity_text(&key))?))
}

/// What `keygen` prints for a new shared key with id `kid` (the lines of `tunnel keygen`).
#[napi(catch_unwind)]
pub fn keygen_text(kid: Option<u32>) -> String {
    SharedKeyText::generate(kid.unwrap_or(1)).lines()
}

/// Write a new listener identity to `out` (mode 0600, must not exist) and return what
/// `keygen --listener` prints (the lines of `tunnel keygen --listener`).
#[napi(catch_unwind)]
pub fn listener_keygen_text(env: Env, out: String) -> napi::Result<String> {
    let id = Identity::generate();
    sync(&env, id.save(out.as_ref()))?;
    Ok(ListenerKeyText::of(&id).lines(Some(out.as_ref())))
}
