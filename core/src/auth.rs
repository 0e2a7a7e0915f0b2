//! Shared-secret authentication, exactly as Encore's Emissary does it.
//!
//! The relay sends a fresh 32-byte nonce in its `ServerConnect` preamble; the client proves that it
//! holds key `kid` by sending `date` (an HTTP date) and `sig = base64_nopad(kid_be32 ‖
//! HMAC-SHA256(secret, date ‖ 0x00 ‖ base64_nopad(nonce)))`. Classic mode carries the pair as the
//! RFC 1929 username/password; multiplexed mode carries it in the session hello. Nothing else in the
//! crate sees a secret, and [`Key`]'s `Debug` never prints it.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::error::{Error, ErrorCode, Result};

/// How far the client's date may be from the relay's clock (Emissary's window).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(15 * 60);

/// How far an early hello's date (signed over the client's own nonce) may be from the relay's
/// clock: the relay remembers each one's nonce this long either side, so a replay is refused. A
/// client further off is declined and signs the relay's nonce (with [`MAX_CLOCK_SKEW`]).
pub const EARLY_MAX_SKEW: Duration = Duration::from_secs(60);

/// Length of the relay's per-connection nonce.
pub const NONCE_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// A shared secret with its key id. `Debug` redacts the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    /// The key id, sent in clear so the relay can pick the secret (Emissary's `kid`).
    pub kid: u32,
    secret: Vec<u8>,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key").field("kid", &self.kid).field("secret", &"<redacted>").finish()
    }
}

/// A key as written in `TUNNEL_AUTH_KEYS` / `EMISSARY_AUTH_KEYS`: `{"kid": 1, "data": "<base64>"}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KeyJson {
    pub kid: u32,
    pub data: String,
}

impl Key {
    /// A key from its id and raw secret bytes.
    pub fn new(kid: u32, secret: impl Into<Vec<u8>>) -> Result<Key> {
        let secret = secret.into();
        if secret.is_empty() {
            return Err(Error::argument(format!("key {kid} has an empty secret; generate one with `tunnel keygen`")));
        }
        Ok(Key { kid, secret })
    }

    /// Parse `KID:BASE64` (the `TUNNEL_KEY` / `--key` form).
    pub fn parse(s: &str) -> Result<Key> {
        let s = s.trim();
        let (kid, data) = s
            .split_once(':')
            .ok_or_else(|| Error::argument("a shared key is written KID:BASE64 (for example 1:c2VjcmV0...); `tunnel keygen` prints one"))?;
        let kid: u32 =
            kid.trim().parse().map_err(|_| Error::argument(format!("key id {kid:?} is not a number; a shared key is written KID:BASE64")))?;
        Key::new(kid, decode_base64(data, "the shared key")?)
    }

    pub(crate) fn from_json(k: &KeyJson) -> Result<Key> {
        Key::new(k.kid, decode_base64(&k.data, &format!("key {}", k.kid))?)
    }

    /// The raw secret (for building configs; never log it).
    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    /// `KID:BASE64`, the form `parse` reads.
    pub fn to_key_string(&self) -> String {
        format!("{}:{}", self.kid, STANDARD.encode(&self.secret))
    }

    /// Sign a nonce at time `now`: returns `(date, sig)`.
    pub fn sign(&self, nonce: &[u8], now: SystemTime) -> (String, String) {
        let date = httpdate::fmt_http_date(now);
        let sig = self.sign_with_date(nonce, &date);
        (date, sig)
    }

    /// Sign a nonce with a given date string.
    pub fn sign_with_date(&self, nonce: &[u8], date: &str) -> String {
        let mac = mac(&self.secret, nonce, date);
        let mut out = Vec::with_capacity(4 + 32);
        out.extend_from_slice(&self.kid.to_be_bytes());
        out.extend_from_slice(&mac);
        STANDARD_NO_PAD.encode(out)
    }
}

fn mac(secret: &[u8], nonce: &[u8], date: &str) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    m.update(date.as_bytes());
    m.update(&[0]);
    m.update(STANDARD_NO_PAD.encode(nonce).as_bytes());
    m.finalize().into_bytes().into()
}

pub(crate) fn decode_base64(s: &str, what: &str) -> Result<Vec<u8>> {
    let s = s.trim();
    let trimmed = s.trim_end_matches('=');
    STANDARD_NO_PAD.decode(trimmed).map_err(|e| Error::argument(format!("{what} is not valid standard base64 ({e})")))
}

/// The relay's set of accepted keys, looked up by id.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: HashMap<u32, Key>,
    /// Key ids in the order the config lists them (the health path shows them so, as Emissary).
    order: Vec<u32>,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySet").field("kids", &self.kids()).finish()
    }
}

impl KeySet {
    /// A key set from keys; a duplicate key id is an error.
    pub fn new(keys: impl IntoIterator<Item = Key>) -> Result<KeySet> {
        let (mut map, mut order) = (HashMap::new(), Vec::new());
        for k in keys {
            let kid = k.kid;
            if map.insert(kid, k).is_some() {
                return Err(Error::config(format!("key id {kid} is listed twice in the auth keys; give each key its own kid")));
            }
            order.push(kid);
        }
        Ok(KeySet { keys: map, order })
    }

    /// Key ids in config order (the health path's `key_ids`, as Emissary lists them).
    pub fn kids_in_config_order(&self) -> Vec<u32> {
        self.order.clone()
    }

    /// Key ids, sorted.
    pub fn kids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.keys.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Whether no key is configured.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Check a proof against the nonce this connection was given. Returns the key id on success.
    pub fn verify(&self, nonce: &[u8], date: &str, sig: &str, now: SystemTime) -> Result<u32, AuthRejection> {
        let raw = STANDARD_NO_PAD.decode(sig.as_bytes()).map_err(|_| AuthRejection::Malformed)?;
        if raw.len() != 4 + 32 {
            return Err(AuthRejection::Malformed);
        }
        let kid = u32::from_be_bytes(raw[..4].try_into().expect("length checked"));
        let key = self.keys.get(&kid).ok_or(AuthRejection::UnknownKey(kid))?;
        let when = httpdate::parse_http_date(date).map_err(|_| AuthRejection::Malformed)?;
        let skew = match now.duration_since(when) {
            Ok(d) => d,
            Err(e) => e.duration(),
        };
        if skew > MAX_CLOCK_SKEW {
            return Err(AuthRejection::ClockSkew(skew));
        }
        let expected = mac(&key.secret, nonce, date);
        if bool::from(expected.ct_eq(&raw[4..])) {
            Ok(kid)
        } else {
            Err(AuthRejection::BadSignature(kid))
        }
    }
}

/// Why the relay refused a proof. Never contains the secret or the proof.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthRejection {
    /// The proof is not `base64_nopad(kid ‖ mac)` or the date is not an HTTP date.
    #[error("malformed credentials (expected an HTTP date and an unpadded base64 proof)")]
    Malformed,
    /// No key with this id.
    #[error("no key with id {0} on the relay")]
    UnknownKey(u32),
    /// The date is too far from the relay's clock.
    #[error("the client's date is {}s away from the relay's clock (allowed: 900s)", .0.as_secs())]
    ClockSkew(Duration),
    /// The HMAC does not match.
    #[error("signature for key {0} does not match")]
    BadSignature(u32),
    /// An early hello (signed over the client's own nonce) whose nonce this relay already took.
    #[error("early hello for key {0} replayed (its nonce was already used)")]
    Replayed(u32),
}

impl AuthRejection {
    /// The stable code the client reports.
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthRejection::UnknownKey(_) => ErrorCode::AuthUnknownKey,
            AuthRejection::ClockSkew(_) => ErrorCode::AuthClockSkew,
            AuthRejection::Malformed | AuthRejection::BadSignature(_) | AuthRejection::Replayed(_) => ErrorCode::AuthFailed,
        }
    }
}

/// A fresh random nonce that is never all zeros.
pub fn fresh_nonce() -> [u8; NONCE_LEN] {
    loop {
        let n: [u8; NONCE_LEN] = rand::random();
        if n.iter().any(|b| *b != 0) {
            return n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector_key() -> Key {
        Key::parse("7:ZW1pc3NhcnktdGVzdC1rZXktMDEyMzQ1Njc4OWFiY2Q=").unwrap()
    }

    fn vector_nonce() -> Vec<u8> {
        (1u8..=32).collect()
    }

    #[test]
    fn matches_the_emissary_test_vector() {
        let key = vector_key();
        assert_eq!(key.secret(), b"emissary-test-key-0123456789abcd");
        let sig = key.sign_with_date(&vector_nonce(), "Tue, 30 Jan 2024 10:00:00 GMT");
        assert_eq!(sig, "AAAABw2s4eJLOs+fbxqIxkU89y2DI0kK3uMbOe2SAPxe5YIz");
    }

    #[test]
    fn verify_accepts_good_and_names_each_failure() {
        let set = KeySet::new([vector_key()]).unwrap();
        let nonce = vector_nonce();
        let now = httpdate::parse_http_date("Tue, 30 Jan 2024 10:05:00 GMT").unwrap();
        let date = "Tue, 30 Jan 2024 10:00:00 GMT";
        let sig = vector_key().sign_with_date(&nonce, date);
        assert_eq!(set.verify(&nonce, date, &sig, now), Ok(7));
        // replayed on another nonce
        let other: Vec<u8> = (2u8..=33).collect();
        assert_eq!(set.verify(&other, date, &sig, now), Err(AuthRejection::BadSignature(7)));
        // wrong secret, same kid
        let wrong = Key::new(7, b"another secret".to_vec()).unwrap().sign_with_date(&nonce, date);
        assert_eq!(set.verify(&nonce, date, &wrong, now).unwrap_err().code(), ErrorCode::AuthFailed);
        // unknown kid
        let unknown = Key::new(8, b"x".to_vec()).unwrap().sign_with_date(&nonce, date);
        assert_eq!(set.verify(&nonce, date, &unknown, now), Err(AuthRejection::UnknownKey(8)));
        // stale
        let later = now + Duration::from_secs(3600);
        assert_eq!(set.verify(&nonce, date, &sig, later).unwrap_err().code(), ErrorCode::AuthClockSkew);
        // padded base64 is rejected, as Emissary does
        assert_eq!(set.verify(&nonce, date, &format!("{sig}="), now), Err(AuthRejection::Malformed));
    }

    #[test]
    fn debug_redacts_secret() {
        let s = format!("{:?}", vector_key());
        assert!(!s.contains("emissary-test"), "{s}");
        assert!(s.contains("redacted"));
    }

    #[test]
    fn key_parse_errors_say_the_format() {
        let e = Key::parse("nocolon").unwrap_err();
        assert!(e.message().contains("KID:BASE64"), "{e}");
        assert!(Key::parse("x:AAAA").is_err());
        assert!(Key::parse("1:!!!").is_err());
    }
}
