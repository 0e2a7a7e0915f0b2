//! Node-to-node forwarding. A stream that arrives at node B for a listener node A holds travels
//! over one multiplexed session B→A (the relay protocol itself; the hello is tagged
//! [`CLUSTER_HELLO_TAG`] and signed with the cluster key). Each forwarded stream starts with a
//! [`Forward`] request; A delivers it to its *local* listener only (one hop at most, so a stale
//! route can never loop), answers one byte, then the stream carries the bytes unchanged: an
//! end-to-end encrypted stream stays encrypted, and the listener sees the original client.
//!
//! B keeps one session per peer node, made on first use and remade when it dies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::super::route::{open_local, RouteError};
use super::super::{mux_server, RelayState};
use crate::auth::{Key, KeySet};
use crate::error::{Error, ErrorCode, Result};
use crate::mux::{FrameSink, FrameSource, Role};
use crate::protocol::{Hello, HelloAck};
use crate::session::{Session, SessionStream};
use crate::transport::RelayUrl;

/// First byte of a node-to-node session's hello (a dialer's is `HELLO_VERSION`, a listener's
/// `LISTEN_HELLO_TAG`), followed by a dialer [`Hello`] signed with the cluster key.
pub(crate) const CLUSTER_HELLO_TAG: u8 = b'C';

/// The request that starts a forwarded stream:
/// `version u8 (1) | name_len u8 | name | header_len u16 | header | wait_ms u32`, where `header`
/// is the encoded [`crate::protocol::StreamHeader`] or [`crate::protocol::ExitHeader`] the
/// listener gets, and `wait_ms` how long it may take to accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Forward {
    pub(crate) name: String,
    pub(crate) header: Vec<u8>,
    pub(crate) wait: Duration,
}

/// The holding node's one-byte answer: accepted, or why not.
const ACCEPTED: u8 = 0;

fn answer_of(e: RouteError) -> u8 {
    match e {
        RouteError::Offline | RouteError::ClusterUnavailable => 1,
        RouteError::Busy => 2,
        RouteError::Timeout => 3,
    }
}

fn error_of(b: u8) -> RouteError {
    match b {
        1 => RouteError::Offline,
        3 => RouteError::Timeout,
        _ => RouteError::Busy,
    }
}

impl Forward {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + self.name.len() + self.header.len());
        b.push(1);
        b.push(self.name.len() as u8);
        b.extend_from_slice(self.name.as_bytes());
        b.extend_from_slice(&(self.header.len() as u16).to_be_bytes());
        b.extend_from_slice(&self.header);
        b.extend_from_slice(&(self.wait.as_millis().min(u32::MAX as u128) as u32).to_be_bytes());
        b
    }

    pub(crate) async fn read_from(s: &mut SessionStream) -> std::io::Result<Forward> {
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed forward request");
        let mut h = [0u8; 2];
        s.read_exact(&mut h).await?;
        if h[0] != 1 || h[1] == 0 || h[1] > 63 {
            return Err(bad());
        }
        let mut name = vec![0u8; h[1] as usize];
        s.read_exact(&mut name).await?;
        let name = String::from_utf8(name).map_err(|_| bad())?;
        let n = s.read_u16().await? as usize;
        if n > 1024 {
            return Err(bad());
        }
        let mut header = vec![0u8; n];
        s.read_exact(&mut header).await?;
        let wait = Duration::from_millis(u64::from(s.read_u32().await?));
        Ok(Forward { name, header, wait })
    }
}

/// B's sessions to the other nodes, by node id.
#[derive(Default)]
pub(crate) struct Peers {
    sessions: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Session>>>>>,
}

impl Peers {
    /// The live session to node `id` at `url`, made now if there is none.
    async fn session(&self, state: &RelayState, key: &Key, id: &str, url: &str) -> Result<Session> {
        let slot = self.sessions.lock().unwrap_or_else(|p| p.into_inner()).entry(id.to_string()).or_default().clone();
        let mut slot = slot.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        let url = RelayUrl::parse(url)?;
        let connect = crate::client::handshake::connect_mux(&url, None, |nonce| {
            let (date, sig) = key.sign(nonce, SystemTime::now());
            let hello = Hello { date, sig }.encode();
            let mut b = Vec::with_capacity(1 + hello.len());
            b.push(CLUSTER_HELLO_TAG);
            b.extend_from_slice(&hello);
            b.into()
        });
        let (source, mut sink, answer) = tokio::time::timeout(state.cfg.limits.handshake_timeout, connect)
            .await
            .map_err(|_| Error::new(ErrorCode::Timeout, format!("the cluster node at {} did not answer in time", url.url)))??;
        if let Some((code, msg)) = HelloAck::decode(&answer)?.refusal {
            let _ = sink.close().await;
            return Err(Error::new(code, format!("the cluster node at {} refused this node: {msg}", url.url)));
        }
        let s = Session::mux(Role::Client, source, sink, mux_server::relay_mux_config(state));
        tracing::info!(node = %id, url = %url.url, "node-to-node session open");
        *slot = Some(s.clone());
        Ok(s)
    }

    /// Forget the session to node `id` (it failed).
    pub(crate) fn forget(&self, id: &str) {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }

    /// Close every session (shutdown).
    pub(crate) fn close_all(&self) {
        let all: Vec<_> = self.sessions.lock().unwrap_or_else(|p| p.into_inner()).drain().map(|(_, s)| s).collect();
        for s in all {
            if let Ok(g) = s.try_lock() {
                if let Some(s) = g.as_ref() {
                    s.close(ErrorCode::RelayUnavailable, "the relay shut down");
                }
            }
        }
    }

    /// Forward a stream for `name` to node `id`, and wait until `deadline` for its listener to
    /// accept it.
    pub(crate) async fn forward(
        &self,
        state: &RelayState,
        key: &Key,
        (id, url): (&str, &str),
        name: &str,
        header: &[u8],
        deadline: tokio::time::Instant,
    ) -> std::result::Result<SessionStream, PeerError> {
        let session = match tokio::time::timeout_at(deadline, self.session(state, key, id, url)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(PeerError::Node(e)),
            Err(_) => return Err(PeerError::Route(RouteError::Timeout)),
        };
        let mut stream = session.open().map_err(PeerError::Node)?;
        let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
        let req = Forward { name: name.to_string(), header: header.to_vec(), wait }.encode();
        let asked = async {
            stream.write_all(&req).await?;
            let mut a = [0u8; 1];
            stream.read_exact(&mut a).await?;
            Ok::<u8, std::io::Error>(a[0])
        };
        // A little past the deadline: the holding node's own timeout answer comes first.
        match tokio::time::timeout_at(deadline + Duration::from_millis(500), asked).await {
            Ok(Ok(ACCEPTED)) => Ok(stream),
            Ok(Ok(b)) => {
                stream.reset(ErrorCode::Refused);
                Err(PeerError::Route(error_of(b)))
            }
            Ok(Err(e)) => {
                stream.reset(ErrorCode::Closed);
                Err(PeerError::Node(Error::new(ErrorCode::RelayUnavailable, format!("the node-to-node session to {url} failed: {e}"))))
            }
            Err(_) => {
                stream.reset(ErrorCode::Timeout);
                Err(PeerError::Route(RouteError::Timeout))
            }
        }
    }
}

/// Why a forward failed: the route's answer, or the node could not be reached at all.
#[derive(Debug)]
pub(crate) enum PeerError {
    Route(RouteError),
    Node(Error),
}

/// A's side: authenticate a node-to-node session (the hello after the tag is a dialer hello
/// signed with the cluster key), then deliver each forwarded stream to a local listener.
pub(crate) async fn serve_peer(state: Arc<RelayState>, source: FrameSource, mut sink: FrameSink, peer: SocketAddr, nonce: [u8; 32], frame: &[u8]) {
    let Some(cluster) = state.cluster.as_ref() else {
        let ack =
            HelloAck { refusal: Some((ErrorCode::NotAllowed, "this relay is not a node of a cluster (TUNNEL_CLUSTER_REDIS is not set)".into())) };
        let _ = sink.send(ack.encode()).await;
        return;
    };
    let keys = KeySet::new([cluster.cfg.key.clone()]).expect("one key is a valid key set");
    let verdict = match Hello::decode(&frame[1..]) {
        Ok(h) => keys.verify(&nonce, &h.date, &h.sig, SystemTime::now()).map_err(|r| r.code()),
        Err(_) => Err(ErrorCode::Protocol),
    };
    if let Err(code) = verdict {
        super::super::guard::log_auth_failure(&state, peer, &"a node-to-node session with a wrong cluster key");
        let ack =
            HelloAck { refusal: Some((code, "the cluster key does not match this node's; give every node the same TUNNEL_CLUSTER_KEY".into())) };
        let _ = sink.send(ack.encode()).await;
        return;
    }
    super::super::guard::handshake_finished();
    if sink.send(HelloAck { refusal: None }.encode()).await.is_err() {
        return;
    }
    let (session, _close) = mux_server::server_session(&state, source, sink);
    tracing::info!(%peer, "node-to-node session from another node of the cluster");
    loop {
        tokio::select! {
            s = session.accept() => match s {
                Some(stream) => { state.tasks.spawn(serve_forward(state.clone(), stream)); }
                None => break,
            },
            _ = state.kill.cancelled() => {
                session.close(ErrorCode::RelayUnavailable, "the relay shut down");
                break;
            }
        }
    }
}

async fn serve_forward(state: Arc<RelayState>, mut stream: SessionStream) {
    let req = match tokio::time::timeout(state.cfg.limits.handshake_timeout, Forward::read_from(&mut stream)).await {
        Ok(Ok(r)) => r,
        _ => {
            stream.reset(ErrorCode::Protocol);
            return;
        }
    };
    let wait = req.wait.min(state.cfg.limits.http_timeout.max(state.cfg.limits.connect_timeout));
    let mut local = match open_local(&state, &req.name, &req.header, wait).await {
        Ok(s) => s,
        Err(e) => {
            let _ = stream.write_all(&[answer_of(e)]).await;
            stream.finish();
            return;
        }
    };
    if stream.write_all(&[ACCEPTED]).await.is_err() {
        local.reset(ErrorCode::Closed);
        return;
    }
    state.metrics.cluster.forwarded_in.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let killed = state.kill.cancelled();
    let r = tokio::select! {
        r = crate::stream::splice(&mut stream, &mut local) => r,
        _ = killed => Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "the relay shut down")),
    };
    if r.is_err() {
        stream.reset(ErrorCode::Closed);
        local.reset(ErrorCode::Closed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_request_encodes_its_fields() {
        let f = Forward { name: "api".into(), header: vec![1, 2, 3], wait: Duration::from_millis(2500) };
        let b = f.encode();
        assert_eq!(&b[..7], &[1, 3, b'a', b'p', b'i', 0, 3]);
        assert_eq!(&b[7..10], &[1, 2, 3]);
        assert_eq!(&b[10..], &2500u32.to_be_bytes());
    }
}
