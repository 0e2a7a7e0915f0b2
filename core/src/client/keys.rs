//! Key text as users give it, and key generation as every face prints it.
//!
//! A dialer's shared key is `KID:BASE64` or the path of a file holding it; a listener's identity is
//! PKCS#8 PEM text or the path of a PEM file. Errors never contain the text itself when it could be
//! a secret: only a value that looks like a path is echoed. [`SharedKeyText`] and
//! [`ListenerKeyText`] are what `tunnel keygen` prints; the Python and Node CLIs print the same
//! lines from the same code.

use std::path::Path;

use base64::Engine;

use crate::auth::Key;
use crate::error::{Error, Result};
use crate::identity::Identity;

/// Whether `text` could be shown in an error without leaking a secret: it looks like a path
/// (has a slash, or starts with `.` or `~`) and has no colon (so it is not `KID:BASE64`).
fn shows_as_path(text: &str) -> bool {
    !text.contains(':') && (text.contains('/') || text.starts_with('.') || text.starts_with('~'))
}

fn looks_like_shared_key(text: &str) -> bool {
    text.trim().split_once(':').is_some_and(|(kid, data)| kid.trim().parse::<u32>().is_ok() && !data.trim().is_empty())
}

/// A dialer key from `KID:BASE64`, or from the file at that path.
pub fn parse_key_text(text: &str) -> Result<Key> {
    let trimmed = text.trim();
    if looks_like_shared_key(trimmed) {
        return Key::parse(trimmed);
    }
    if trimmed.starts_with("-----BEGIN") {
        return Err(Error::argument(
            "this is a listener's Ed25519 key (PEM), but a dialer needs a shared key KID:BASE64 (`tunnel keygen` prints one as TUNNEL_KEY)",
        ));
    }
    match std::fs::read_to_string(trimmed) {
        Ok(s) => Key::parse(s.trim()).map_err(|e| Error::new(e.code(), format!("key file {trimmed}: {}", e.message()))),
        Err(e) if shows_as_path(trimmed) => Err(Error::argument(format!(
            "cannot read the key file {trimmed}: {e}; pass KID:BASE64 or a readable file (`tunnel keygen` makes a key)"
        ))),
        Err(_) => Err(Error::argument(
            "the key is neither KID:BASE64 nor the path of a readable file (not shown, as it may be a secret); `tunnel keygen` prints one as TUNNEL_KEY",
        )),
    }
}

/// A listener identity from PEM text, or from the PEM file at that path.
pub fn load_identity_text(text: &str) -> Result<Identity> {
    let trimmed = text.trim();
    if trimmed.starts_with("-----BEGIN") {
        return Identity::from_pem(trimmed);
    }
    if looks_like_shared_key(trimmed) {
        return Err(Error::argument(
            "this looks like a dialer's shared key (KID:BASE64), but a listener needs an Ed25519 key file: make one with `tunnel keygen --listener --out FILE`",
        ));
    }
    if shows_as_path(trimmed) || Path::new(trimmed).exists() {
        return Identity::load(Path::new(trimmed));
    }
    Err(Error::argument(
        "the listener key is neither PEM text nor the path of a readable file (not shown, as it may be a secret); make one with `tunnel keygen --listener --out FILE`",
    ))
}

/// A new shared key and the relay's matching entry, as `tunnel keygen` prints them.
pub struct SharedKeyText {
    /// `KID:BASE64` (what `TUNNEL_KEY` holds).
    pub key: String,
    /// The JSON list for the relay's `auth_keys` (`TUNNEL_AUTH_KEYS`).
    pub auth_keys: String,
}

impl SharedKeyText {
    /// A random 32-byte secret under key id `kid`.
    pub fn generate(kid: u32) -> SharedKeyText {
        let secret: [u8; 32] = rand::random();
        let b64 = base64::engine::general_purpose::STANDARD.encode(secret);
        SharedKeyText { key: format!("{kid}:{b64}"), auth_keys: format!(r#"[{{"kid":{kid},"data":"{b64}"}}]"#) }
    }

    /// The lines `keygen` prints (comments say which side each line is for).
    pub fn lines(&self) -> String {
        format!(
            "# For dialers (tunnel forward/socks/dial, the bindings): keep it secret\nTUNNEL_KEY={}\n# For the relay that admits them (add to the list to rotate keys)\nTUNNEL_AUTH_KEYS='{}'\n",
            self.key, self.auth_keys
        )
    }

    /// The lines `keygen --cluster` prints: the same secret as a cluster's node key.
    pub fn cluster_lines(&self) -> String {
        format!(
            "# For every node of one relay cluster, the same on each (nodes prove it to each other; not a dialer key): keep it secret\nTUNNEL_CLUSTER_KEY={}\n",
            self.key
        )
    }
}

/// A listener identity's public facts, as `tunnel keygen --listener` prints them.
pub struct ListenerKeyText {
    /// The key-derived name.
    pub name: String,
    /// The public key, standard base64.
    pub public_key: String,
}

impl ListenerKeyText {
    /// The public facts of `id`.
    pub fn of(id: &Identity) -> ListenerKeyText {
        ListenerKeyText { name: id.name(), public_key: id.public_key_base64() }
    }

    /// The relay's `listener_keys` entry for this key (no granted names).
    pub fn listener_keys(&self) -> String {
        format!(r#"[{{"public_key":"{}","names":[]}}]"#, self.public_key)
    }

    /// The lines `keygen --listener` prints, after the private key was written to `written_to`.
    pub fn lines(&self, written_to: Option<&Path>) -> String {
        let mut s = String::new();
        if let Some(p) = written_to {
            s.push_str(&format!("# Wrote the listener's private key to {} (mode 0600)\n", p.display()));
        }
        s.push_str(&format!("name: {}\npublic key: {}\n", self.name, self.public_key));
        s.push_str("# As a listener's key (tunnel listen --key FILE): the relay allows it with (grant chosen names in \"names\")\n");
        s.push_str(&format!("TUNNEL_LISTENER_KEYS='{}'\n", self.listener_keys()));
        s.push_str("# As an e2e dialer identity (--e2e --e2e-identity FILE): a listener admits it with\n");
        s.push_str(&format!("--allow-peer {}\n", self.public_key));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    const SECRET: &str = "c2VjcmV0LXNlY3JldC1zZWNyZXQ=";

    #[test]
    fn key_errors_never_show_the_secret() {
        let id_pem = Identity::generate().to_pem();
        for bad in [format!("1:{SECRET}"), format!("x{SECRET}"), SECRET.to_string(), format!("nokid:{SECRET}")] {
            if let Err(e) = load_identity_text(&bad) {
                assert!(!e.message().contains(SECRET), "listener error leaks: {e}");
                assert_eq!(e.code(), ErrorCode::InvalidArgument);
            }
            if let Err(e) = parse_key_text(&bad) {
                assert!(!e.message().contains(SECRET), "dialer error leaks: {e}");
            }
        }
        let e = load_identity_text(&format!("1:{SECRET}")).unwrap_err();
        assert!(e.message().contains("tunnel keygen --listener"), "{e}");
        let e = parse_key_text(&id_pem).unwrap_err();
        assert!(e.message().contains("KID:BASE64") && !e.message().contains("PRIVATE KEY-----\n"), "{e}");
    }

    #[test]
    fn keys_read_from_text_and_files() {
        let dir = std::env::temp_dir().join(format!("libtunnel-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kf = dir.join("key");
        std::fs::write(&kf, format!("7:{SECRET}\n")).unwrap();
        assert_eq!(parse_key_text(kf.to_str().unwrap()).unwrap().to_key_string(), format!("7:{SECRET}"));
        assert_eq!(parse_key_text(&format!(" 7:{SECRET} ")).unwrap().to_key_string(), format!("7:{SECRET}"));
        let id = Identity::generate();
        let pf = dir.join("id.pem");
        id.save(&pf).unwrap();
        assert_eq!(load_identity_text(pf.to_str().unwrap()).unwrap().name(), id.name());
        assert_eq!(load_identity_text(&id.to_pem()).unwrap().name(), id.name());
        let missing = dir.join("missing.pem");
        let e = load_identity_text(missing.to_str().unwrap()).unwrap_err();
        assert!(e.message().contains("missing.pem"), "names the path: {e}");
        let e = parse_key_text(dir.join("nokey").to_str().unwrap()).unwrap_err();
        assert!(e.message().contains("nokey"), "names the path: {e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn keygen_lines_parse_back() {
        let k = SharedKeyText::generate(3);
        assert!(k.lines().contains(&format!("TUNNEL_KEY={}", k.key)));
        assert!(k.cluster_lines().contains(&format!("TUNNEL_CLUSTER_KEY={}", k.key)));
        assert_eq!(Key::parse(&k.key).unwrap().to_key_string(), k.key);
        let l = ListenerKeyText::of(&Identity::generate());
        assert!(l.lines(None).contains(&l.public_key));
    }
}
