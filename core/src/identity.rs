//! Listener identity: an Ed25519 key pair. The public key names the listener (its default name is
//! derived from the key, so a name proves its owner) and signs the relay's nonce at registration.
//!
//! Key files are PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`, what `openssl genpkey -algorithm
//! ed25519` writes), created with mode 0600.

use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::error::{Error, ErrorCode, Result};

/// Length of a key-derived listener name: lowercase base32 (RFC 4648, no padding) of the
/// SHA-256 of the public key, truncated to 26 characters (130 bits).
pub const DERIVED_NAME_LEN: usize = 26;

/// Domain separation for the registration signature.
const REGISTRATION_CONTEXT: &[u8] = b"libtunnel listener registration v1\0";

/// The default name of a public key.
pub fn derived_name(public_key: &[u8; 32]) -> String {
    let digest = Sha256::digest(public_key);
    let mut s = data_encoding::BASE32_NOPAD.encode(&digest).to_ascii_lowercase();
    s.truncate(DERIVED_NAME_LEN);
    s
}

/// The bytes a listener signs to register: context ‖ relay nonce ‖ requested name.
pub fn registration_message(nonce: &[u8], name: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(REGISTRATION_CONTEXT.len() + nonce.len() + name.len());
    m.extend_from_slice(REGISTRATION_CONTEXT);
    m.extend_from_slice(nonce);
    m.extend_from_slice(name.as_bytes());
    m
}

/// Check a registration signature (relay side).
pub fn verify_registration(public_key: &[u8; 32], signature: &[u8], nonce: &[u8], name: &str) -> bool {
    let Ok(vk) = VerifyingKey::from_bytes(public_key) else {
        return false;
    };
    let Ok(sig) = Signature::from_slice(signature) else {
        return false;
    };
    vk.verify(&registration_message(nonce, name), &sig).is_ok()
}

/// Whether `name` is a valid listener name: a DNS label (lowercase letters, digits, `-`; 1–63
/// characters; no leading or trailing `-`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A listener's Ed25519 key pair.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("name", &self.name()).finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh random identity.
    pub fn generate() -> Identity {
        Identity { key: SigningKey::generate(&mut rand::rngs::OsRng) }
    }

    /// From a PKCS#8 PEM string.
    pub fn from_pem(pem: &str) -> Result<Identity> {
        SigningKey::from_pkcs8_pem(pem.trim()).map(|key| Identity { key }).map_err(|e| {
            Error::new(
                ErrorCode::InvalidArgument,
                format!("not an Ed25519 private key in PKCS#8 PEM ({e}); make one with `tunnel keygen --listener`"),
            )
        })
    }

    /// Load a key file.
    pub fn load(path: &Path) -> Result<Identity> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::new(
                ErrorCode::InvalidArgument,
                format!("cannot read listener key {}: {e}; make one with `tunnel keygen --listener --out FILE`", path.display()),
            )
        })?;
        Identity::from_pem(&text).map_err(|e| Error::new(e.code(), format!("{}: {}", path.display(), e.message())))
    }

    /// The PKCS#8 PEM text of the private key.
    pub fn to_pem(&self) -> String {
        self.key.to_pkcs8_pem(Default::default()).expect("an Ed25519 key always encodes").to_string()
    }

    /// Write the key to a new file readable only by its owner (0600), creating its folder
    /// (0700) when missing. Refuses to overwrite.
    pub fn save(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            let mut b = std::fs::DirBuilder::new();
            b.recursive(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::DirBuilderExt;
                b.mode(0o700);
            }
            b.create(dir).map_err(|e| Error::from_io(e, &format!("creating the folder {} for the key", dir.display())))?;
        }
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(path).map_err(|e| Error::from_io(e, &format!("creating {} (it must not exist yet)", path.display())))?;
        f.write_all(self.to_pem().as_bytes()).map_err(|e| Error::from_io(e, &format!("writing {}", path.display())))
    }

    /// The signing key (for the end-to-end TLS credential, `crate::e2e`).
    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// The 32-byte public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// The public key in standard base64 (how relay config lists it).
    pub fn public_key_base64(&self) -> String {
        STANDARD.encode(self.public_key())
    }

    /// The key-derived default name.
    pub fn name(&self) -> String {
        derived_name(&self.public_key())
    }

    /// Sign a registration for `name` against the relay's nonce.
    pub fn sign_registration(&self, nonce: &[u8], name: &str) -> [u8; 64] {
        self.key.sign(&registration_message(nonce, name)).to_bytes()
    }
}

/// Parse a base64 public key from relay config.
pub fn parse_public_key(text: &str) -> Result<[u8; 32]> {
    let bytes = STANDARD.decode(text.trim()).map_err(|e| Error::config(format!("public key {text:?} is not base64 ({e})")))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| Error::config(format!("public key {text:?} must be 32 bytes (an Ed25519 public key), got {}", bytes.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_signatures_and_pem_round_trip() {
        let id = Identity::generate();
        let name = id.name();
        assert_eq!(name.len(), DERIVED_NAME_LEN);
        assert!(valid_name(&name), "{name}");
        let nonce = [7u8; 32];
        let sig = id.sign_registration(&nonce, &name);
        assert!(verify_registration(&id.public_key(), &sig, &nonce, &name));
        assert!(!verify_registration(&id.public_key(), &sig, &[8u8; 32], &name), "another nonce");
        assert!(!verify_registration(&id.public_key(), &sig, &nonce, "api"), "another name");
        let mut bad = sig;
        bad[0] ^= 1;
        assert!(!verify_registration(&id.public_key(), &bad, &nonce, &name), "tampered");
        let back = Identity::from_pem(&id.to_pem()).unwrap();
        assert_eq!(back.public_key(), id.public_key());
        assert_eq!(parse_public_key(&id.public_key_base64()).unwrap(), id.public_key());
        assert!(Identity::from_pem("nonsense").is_err());
    }

    #[test]
    fn key_files_are_private_and_never_overwritten() {
        let dir = std::env::temp_dir().join(format!("libtunnel-id-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("listener.pem");
        let _ = std::fs::remove_file(&path);
        let id = Identity::generate();
        id.save(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert!(Identity::generate().save(&path).is_err());
        assert_eq!(Identity::load(&path).unwrap().name(), id.name());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn name_rules() {
        for ok in ["api", "a", "my-service-2"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "API", "a.b", "a_b", &"x".repeat(64)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
