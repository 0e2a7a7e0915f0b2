//! Keys for the two kinds of client: a shared secret `KID:BASE64` for dialers, an Ed25519
//! identity (PKCS#8 PEM) for listeners. Parsing, generation and the printed lines are the core's
//! (`libtunnel::client::keys`), so the Python CLI's `keygen` prints exactly what `tunnel keygen`
//! prints.

use libtunnel::client::keys::{ListenerKeyText, SharedKeyText};
use libtunnel::Identity;
use pyo3::prelude::*;

use crate::error::to_py;

/// A new random 32-byte shared secret for key id `kid`, as `KID:BASE64`.
#[pyfunction]
#[pyo3(signature = (kid = 1))]
pub(crate) fn keygen(kid: u32) -> PyResult<String> {
    Ok(SharedKeyText::generate(kid).key)
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
    let id = libtunnel::client::keys::load_identity_text(key).map_err(to_py)?;
    Ok((id.name(), id.public_key_base64()))
}

/// What `keygen` prints for a new shared key with id `kid` (the same lines as `tunnel keygen`).
#[pyfunction]
#[pyo3(signature = (kid = 1))]
pub(crate) fn keygen_text(kid: u32) -> String {
    SharedKeyText::generate(kid).lines()
}

/// Write a new listener identity to `path` (mode 0600, must not exist) and return what
/// `keygen --listener` prints (the same lines as `tunnel keygen --listener`).
#[pyfunction]
pub(crate) fn listener_keygen_text(path: std::path::PathBuf) -> PyResult<String> {
    let id = Identity::generate();
    id.save(&path).map_err(to_py)?;
    Ok(ListenerKeyText::of(&id).lines(Some(&path)))
}
