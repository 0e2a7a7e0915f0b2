//! Ed25519 identities as TLS raw public keys (RFC 7250): the `SubjectPublicKeyInfo` a side
//! presents, the rustls signing key behind it, reading a peer's key back out of the handshake,
//! and parsing the keys users write in pins and allow lists (base64 key or key-derived name).

use std::sync::{Arc, OnceLock};

use ed25519_dalek::pkcs8::{DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::VerifyingKey;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::{Error, ErrorCode, Result};
use crate::identity::{derived_name, parse_public_key, valid_name, Identity, DERIVED_NAME_LEN};

/// The crypto both ends use: rustls's ring provider with AES-128-GCM first (hardware AES makes it
/// the cheapest per byte; ChaCha20-Poly1305 stays for machines without it), TLS 1.3 only.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| {
        use rustls::crypto::ring::cipher_suite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256};
        let mut p = rustls::crypto::ring::default_provider();
        p.cipher_suites = vec![TLS13_AES_128_GCM_SHA256, TLS13_CHACHA20_POLY1305_SHA256, TLS13_AES_256_GCM_SHA384];
        Arc::new(p)
    })
    .clone()
}

/// The DER `SubjectPublicKeyInfo` of an Ed25519 public key.
pub fn spki(public_key: &[u8; 32]) -> Vec<u8> {
    VerifyingKey::from_bytes(public_key).ok().and_then(|vk| vk.to_public_key_der().ok()).map(|d| d.as_bytes().to_vec()).unwrap_or_default()
}

/// The Ed25519 public key inside a peer's raw-public-key "certificate", if it is one.
pub fn key_of(cert: &CertificateDer<'_>) -> Option<[u8; 32]> {
    VerifyingKey::from_public_key_der(cert.as_ref()).ok().map(|vk| vk.to_bytes())
}

/// The raw-public-key credential a side presents: its SPKI plus the signing key behind it.
pub(crate) fn certified(identity: &Identity) -> Result<Arc<CertifiedKey>> {
    let der =
        identity.signing_key().to_pkcs8_der().map_err(|e| Error::new(ErrorCode::General, format!("encoding the Ed25519 key for TLS failed: {e}")))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der.as_bytes().to_vec()));
    let signer =
        provider().key_provider.load_private_key(key).map_err(|e| Error::new(ErrorCode::General, format!("rustls refused the Ed25519 key: {e}")))?;
    Ok(Arc::new(CertifiedKey::new(vec![CertificateDer::from(spki(&identity.public_key()))], signer)))
}

/// Whether `name` has the shape of a key-derived name (26 characters of lowercase base32), so a
/// dial to it can be checked against the listener's key with nothing pinned.
pub fn looks_derived(name: &str) -> bool {
    name.len() == DERIVED_NAME_LEN && name.bytes().all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
}

/// The key-derived name a user-written key stands for: a base64 Ed25519 public key (as
/// `tunnel keygen --listener` prints it), or a key-derived name itself.
pub fn peer_name(text: &str) -> Result<String> {
    let t = text.trim();
    if looks_derived(&t.to_ascii_lowercase()) && valid_name(&t.to_ascii_lowercase()) {
        return Ok(t.to_ascii_lowercase());
    }
    parse_public_key(t).map(|k| derived_name(&k)).map_err(|e| {
        Error::argument(format!(
            "{t:?} is neither an Ed25519 public key in base64 nor a key-derived name ({}); `tunnel keygen --listener` prints both",
            e.message()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spki_round_trips_and_names_parse() {
        let id = Identity::generate();
        let cert = CertificateDer::from(spki(&id.public_key()));
        assert_eq!(cert.len(), 44, "Ed25519 SPKI is 12 bytes of header and the 32-byte key");
        assert_eq!(key_of(&cert), Some(id.public_key()));
        assert_eq!(key_of(&CertificateDer::from(vec![0u8; 44])), None);
        assert!(certified(&id).is_ok());
        assert!(looks_derived(&id.name()));
        assert!(!looks_derived("api"));
        assert_eq!(peer_name(&id.public_key_base64()).unwrap(), id.name());
        assert_eq!(peer_name(&id.name()).unwrap(), id.name());
        assert_eq!(peer_name(&id.name().to_ascii_uppercase()).unwrap(), id.name());
        let e = peer_name("api").unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidArgument);
        assert!(e.message().contains("keygen"), "{e}");
    }
}
