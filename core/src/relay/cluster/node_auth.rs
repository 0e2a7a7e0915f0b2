//! Mutual authentication of a node-to-node session. Both nodes prove they hold the cluster key,
//! each over a nonce the *other* side chose, and both proofs cover the whole transcript: the two
//! nonces, the dialing node's id, the dialed node's id and the URL it was dialed at.
//!
//! 1. The dialed node (S) sends its usual preamble with a fresh nonce `n_s`.
//! 2. The dialing node (D) sends [`DialHello`]: its own fresh nonce `n_d`, its node id, the id it
//!    expects S to have (from Redis), the URL it dialed, and `HMAC(key, "dial" ‖ transcript)`.
//! 3. S checks that the id and URL are its own and the proof holds, and only then answers
//!    [`answer`]: an accepting [`HelloAck`] followed by `HMAC(key, "answer" ‖ transcript)`.
//! 4. D checks that proof before it sends anything on the session.
//!
//! What this stops: a node without the key (listed in Redis by anyone who can write there) is
//! refused by D at step 4, so it never gets a stream; a proof passed from one connection to
//! another (reflection) names the wrong node id or URL, or the wrong direction, and is refused;
//! a proof replayed later covers a nonce no live connection has. Nothing here encrypts: a
//! cluster whose nodes talk over an untrusted network advertises `wss://` URLs.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::auth::{Key, NONCE_LEN};
use crate::error::ErrorCode;
use crate::protocol::HelloAck;

/// Version byte after [`super::peers::CLUSTER_HELLO_TAG`] (1 was a one-way, dialer-only proof).
pub(crate) const NODE_AUTH_VERSION: u8 = 2;

const DIAL_LABEL: &[u8] = b"libtunnel cluster v2 dial\0";
const ANSWER_LABEL: &[u8] = b"libtunnel cluster v2 answer\0";
const MAC_LEN: usize = 32;
/// Longest node id accepted (ids are 16 hex digits).
const MAX_ID: usize = 64;
/// Longest advertised URL accepted.
const MAX_URL: usize = 1024;

/// Why a node-to-node handshake failed. Never contains a secret or a proof.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NodeAuthError {
    #[error("malformed node-to-node hello or answer ({0}); every node of a cluster must run the same libtunnel version")]
    Malformed(&'static str),
    #[error("the proof is made with cluster key id {0}, this node has another; give every node the same TUNNEL_CLUSTER_KEY")]
    UnknownKey(u32),
    #[error("the proof does not match this node's cluster key; give every node the same TUNNEL_CLUSTER_KEY")]
    BadProof,
    #[error("the dialing node expected node {expected:?} at this address, this is node {actual:?} (a stale or forged entry in Redis)")]
    WrongNode { expected: String, actual: String },
    #[error("the dialing node reached this node at {dialed:?}, but it advertises {advertised:?} (a proof passed on from another connection, or a forged URL in Redis)")]
    WrongUrl { dialed: String, advertised: String },
}

impl NodeAuthError {
    /// The code the refusal carries.
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            NodeAuthError::Malformed(_) => ErrorCode::Protocol,
            NodeAuthError::UnknownKey(_) => ErrorCode::AuthUnknownKey,
            _ => ErrorCode::AuthFailed,
        }
    }
}

/// What both proofs cover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Transcript {
    /// The dialed node's nonce (its preamble).
    pub(crate) n_s: [u8; NONCE_LEN],
    /// The dialing node's nonce (its hello).
    pub(crate) n_d: [u8; NONCE_LEN],
    pub(crate) dialer_id: String,
    pub(crate) dialed_id: String,
    /// The URL the dialing node connected to.
    pub(crate) url: String,
}

impl Transcript {
    fn proof(&self, key: &Key, label: &[u8]) -> [u8; MAC_LEN] {
        let mut m = Hmac::<Sha256>::new_from_slice(key.secret()).expect("HMAC accepts keys of any length");
        m.update(label);
        m.update(&self.n_s);
        m.update(&self.n_d);
        for part in [self.dialer_id.as_bytes(), self.dialed_id.as_bytes(), self.url.as_bytes()] {
            m.update(&(part.len() as u32).to_be_bytes());
            m.update(part);
        }
        m.finalize().into_bytes().into()
    }

    fn check(&self, key: &Key, label: &[u8], kid: u32, mac: &[u8]) -> Result<(), NodeAuthError> {
        if kid != key.kid {
            return Err(NodeAuthError::UnknownKey(kid));
        }
        if bool::from(self.proof(key, label).ct_eq(mac)) {
            Ok(())
        } else {
            Err(NodeAuthError::BadProof)
        }
    }
}

/// The dialing node's hello (after the tag byte):
/// `version u8 (2) | n_d [32] | id_len u8 | dialer id | id_len u8 | dialed id | url_len u16 | url |
/// kid u32 | mac [32]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DialHello {
    pub(crate) n_d: [u8; NONCE_LEN],
    pub(crate) dialer_id: String,
    pub(crate) dialed_id: String,
    pub(crate) url: String,
    kid: u32,
    mac: [u8; MAC_LEN],
}

impl DialHello {
    /// The hello node `dialer_id` sends to node `dialed_id`, which it reached at `url` and which
    /// sent `n_s`; returns it with the transcript to check the answer against.
    pub(crate) fn new(key: &Key, n_s: &[u8], dialer_id: &str, dialed_id: &str, url: &str) -> Result<(DialHello, Transcript), NodeAuthError> {
        let n_s: [u8; NONCE_LEN] = n_s.try_into().map_err(|_| NodeAuthError::Malformed("the dialed node's nonce is not 32 bytes"))?;
        let t = Transcript {
            n_s,
            n_d: crate::auth::fresh_nonce(),
            dialer_id: dialer_id.to_string(),
            dialed_id: dialed_id.to_string(),
            url: url.to_string(),
        };
        let mac = t.proof(key, DIAL_LABEL);
        let h = DialHello { n_d: t.n_d, dialer_id: t.dialer_id.clone(), dialed_id: t.dialed_id.clone(), url: t.url.clone(), kid: key.kid, mac };
        Ok((h, t))
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(1 + NONCE_LEN + 2 + self.dialer_id.len() + self.dialed_id.len() + 2 + self.url.len() + 4 + MAC_LEN);
        b.push(NODE_AUTH_VERSION);
        b.extend_from_slice(&self.n_d);
        b.push(self.dialer_id.len() as u8);
        b.extend_from_slice(self.dialer_id.as_bytes());
        b.push(self.dialed_id.len() as u8);
        b.extend_from_slice(self.dialed_id.as_bytes());
        b.extend_from_slice(&(self.url.len() as u16).to_be_bytes());
        b.extend_from_slice(self.url.as_bytes());
        b.extend_from_slice(&self.kid.to_be_bytes());
        b.extend_from_slice(&self.mac);
        b
    }

    pub(crate) fn decode(b: &[u8]) -> Result<DialHello, NodeAuthError> {
        let mut r = Reader(b);
        if r.take(1)?[0] != NODE_AUTH_VERSION {
            return Err(NodeAuthError::Malformed("unknown node-to-node hello version"));
        }
        let n_d: [u8; NONCE_LEN] = r.take(NONCE_LEN)?.try_into().expect("length taken");
        let dialer_id = r.text_u8()?;
        let dialed_id = r.text_u8()?;
        let n = u16::from_be_bytes(r.take(2)?.try_into().expect("length taken")) as usize;
        if n > MAX_URL {
            return Err(NodeAuthError::Malformed("URL too long"));
        }
        let url = String::from_utf8(r.take(n)?.to_vec()).map_err(|_| NodeAuthError::Malformed("URL is not text"))?;
        let kid = u32::from_be_bytes(r.take(4)?.try_into().expect("length taken"));
        let mac: [u8; MAC_LEN] = r.take(MAC_LEN)?.try_into().expect("length taken");
        if !r.0.is_empty() {
            return Err(NodeAuthError::Malformed("trailing bytes"));
        }
        Ok(DialHello { n_d, dialer_id, dialed_id, url, kid, mac })
    }

    /// The dialed node's check: the hello names this node (`my_id`, reached at `my_url`), and its
    /// proof covers this connection's nonce `n_s`. Returns the transcript to answer with.
    pub(crate) fn verify(&self, key: &Key, n_s: &[u8; NONCE_LEN], my_id: &str, my_url: &str) -> Result<Transcript, NodeAuthError> {
        let t = Transcript { n_s: *n_s, n_d: self.n_d, dialer_id: self.dialer_id.clone(), dialed_id: self.dialed_id.clone(), url: self.url.clone() };
        // The proof first: an unauthenticated peer learns nothing about this node's id or URL.
        t.check(key, DIAL_LABEL, self.kid, &self.mac)?;
        if self.dialed_id != my_id {
            return Err(NodeAuthError::WrongNode { expected: self.dialed_id.clone(), actual: my_id.to_string() });
        }
        if self.url != my_url {
            return Err(NodeAuthError::WrongUrl { dialed: self.url.clone(), advertised: my_url.to_string() });
        }
        Ok(t)
    }
}

/// The dialed node's answer once the hello checked out: an accepting [`HelloAck`], then
/// `kid u32 | mac [32]` over the transcript.
pub(crate) fn answer(key: &Key, t: &Transcript) -> Vec<u8> {
    let mut b = HelloAck { refusal: None }.encode().to_vec();
    b.extend_from_slice(&key.kid.to_be_bytes());
    b.extend_from_slice(&t.proof(key, ANSWER_LABEL));
    b
}

/// The dialing node's check of the answer (after a refusal was ruled out: `proof` is what
/// follows the accepting [`HelloAck`]).
pub(crate) fn check_answer(key: &Key, t: &Transcript, proof: &[u8]) -> Result<(), NodeAuthError> {
    if proof.len() != 4 + MAC_LEN {
        return Err(NodeAuthError::Malformed("the answer carries no proof of the cluster key"));
    }
    let kid = u32::from_be_bytes(proof[..4].try_into().expect("length checked"));
    t.check(key, ANSWER_LABEL, kid, &proof[4..])
}

/// Length of an accepting [`HelloAck`] (what precedes the answer's proof).
pub(crate) const ACK_LEN: usize = 6;

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], NodeAuthError> {
        if self.0.len() < n {
            return Err(NodeAuthError::Malformed("truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn text_u8(&mut self) -> Result<String, NodeAuthError> {
        let n = self.take(1)?[0] as usize;
        if n == 0 || n > MAX_ID {
            return Err(NodeAuthError::Malformed("node id length"));
        }
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| NodeAuthError::Malformed("node id is not text"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key::parse("9:Y2x1c3Rlci10ZXN0LWtleS0wMTIzNDU2Nzg5YWJjZGVm").unwrap()
    }

    const URL_A: &str = "ws://10.0.0.1:8080";
    const URL_F: &str = "ws://10.0.0.66:8080";

    #[test]
    fn both_sides_prove_the_key_over_the_other_sides_nonce() {
        let n_s = [7u8; 32];
        let (h, t_d) = DialHello::new(&key(), &n_s, "b", "a", URL_A).unwrap();
        let got = DialHello::decode(&h.encode()).unwrap();
        assert_eq!(got, h);
        let t_s = got.verify(&key(), &n_s, "a", URL_A).unwrap();
        assert_eq!(t_s, t_d);
        let ans = answer(&key(), &t_s);
        assert_eq!(HelloAck::decode(&ans).unwrap().refusal, None);
        check_answer(&key(), &t_d, &ans[ACK_LEN..]).unwrap();
    }

    #[test]
    fn a_proof_passed_to_another_node_or_connection_is_refused() {
        // Node B dials the fake node F (listed in Redis) and signs the nonce F took from node A.
        let n_a = [1u8; 32];
        let (h, _) = DialHello::new(&key(), &n_a, "b", "f", URL_F).unwrap();
        assert_eq!(h.verify(&key(), &n_a, "a", URL_A), Err(NodeAuthError::WrongNode { expected: "f".into(), actual: "a".into() }));
        // F listed under A's own id, at its own URL.
        let (h, _) = DialHello::new(&key(), &n_a, "b", "a", URL_F).unwrap();
        assert!(matches!(h.verify(&key(), &n_a, "a", URL_A), Err(NodeAuthError::WrongUrl { .. })));
        // A genuine hello replayed on another connection (another nonce).
        let (h, _) = DialHello::new(&key(), &n_a, "b", "a", URL_A).unwrap();
        assert_eq!(h.verify(&key(), &[2u8; 32], "a", URL_A), Err(NodeAuthError::BadProof));
        // A dial proof is not an answer, nor the other way round.
        let (h, t) = DialHello::new(&key(), &n_a, "b", "a", URL_A).unwrap();
        let mut as_answer = key().kid.to_be_bytes().to_vec();
        as_answer.extend_from_slice(&h.mac);
        assert_eq!(check_answer(&key(), &t, &as_answer), Err(NodeAuthError::BadProof));
        // Another key, and a bare accepting answer with no proof.
        let other = Key::parse("9:b3RoZXIta2V5").unwrap();
        let (h, t) = DialHello::new(&other, &n_a, "b", "a", URL_A).unwrap();
        assert_eq!(h.verify(&key(), &n_a, "a", URL_A), Err(NodeAuthError::BadProof));
        assert!(matches!(check_answer(&key(), &t, &[]), Err(NodeAuthError::Malformed(_))));
    }

    #[test]
    fn malformed_hellos_are_refused_not_panicked_on() {
        let (h, _) = DialHello::new(&key(), &[3u8; 32], "b", "a", URL_A).unwrap();
        let b = h.encode();
        for n in 0..b.len() {
            assert!(DialHello::decode(&b[..n]).is_err(), "truncated at {n}");
        }
        let mut v1 = b.clone();
        v1[0] = 1;
        assert!(DialHello::decode(&v1).is_err());
    }
}
