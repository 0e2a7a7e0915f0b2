//! Keys for the two kinds of client: a shared secret `KID:BASE64` for dialers, an Ed25519
//! identity (PKCS#8 PEM) for listeners. Generation happens here, in Rust, so the Python CLI's
//! `keygen` prints exactly what `tunnel keygen` prints.

use std::path::Path;

use libtunnel::{Error, ErrorCode, Identity, Key};
use pyo3::prelude::*;

use crate::error::to_py;

/// A dialer key from `KID:BASE64` text, or from a file holding it (the CLI's `--key` rule).
pub(crate) fn parse_key(text: &str) -> libtunnel::Result<Key> {
    match std::fs::read_to_string(text) {
        Ok(s) => Key::parse(&s),
        Err(_) if text.contains(':') => Key::parse(text),
        Err(e) => Err(Error::new(ErrorCode::InvalidArgument, format!("key {text:?} is neither KID:BASE64 nor a readable file ({e})"))),
    }
}

/// A listener identity from PEM text, or from a file holding it.
pub(crate) fn load_identity(text: &str) -> libtunnel::Result<Identity> {
    if text.trim_start().starts_with("-----BEGIN") {
        Identity::from_pem(text)
    } else {
        Identity::load(Path::new(text))
    }
}

/// A new random 32-byte shared secret for key id `kid`, as `KID:BASE64`.
#[pyfunction]
#[pyo3(signature = (kid = 1))]
pub(crate) fn keygen(kid: u32) -> PyResult<String> {
    let secret: [u8; 32] = rand::random();
    Ok(Key::new(kid, secret.to_vec()).map_err(to_py)?.to_key_string())
}

/// Write a new listener identity to `path` (mode 0600, must not exist); returns its
/// `(name, public_key_base64)`.
#[pyfunction]
pub(crate) fn listener_keygen(path: std::path::PathBuf) -> PyResult<(String, String)> {
    let id = Identity::generate();
    id.save(&path).map_err(to_py)?;
    Ok((id.name(), id.public_key_base64()))
}

/// `(name, public_key_base64)` of a listener identity given as PEM text or a file path.
#[pyfunction]
pub(crate) fn identity_name(key: &str) -> PyResult<(String, String)> {
    let id = load_identity(key).map_err(to_py)?;
    Ok((id.name(), id.public_key_base64()))
}
