//! Node-to-node requests. A stream that arrives at node B for a listener node A holds travels
//! over one multiplexed session B→A (the relay protocol itself; the hello is tagged
//! [`CLUSTER_HELLO_TAG`], and both nodes prove the cluster key to each other: `node_auth`).
//! Each stream B opens on it starts with one [`PeerRequest`]:
//! - [`Forward`]: A delivers the stream to its *local* listener only (one hop at most, so a stale
//!   route can never loop), answers one byte, then the stream carries the bytes unchanged: an
//!   end-to-end encrypted stream stays encrypted, and the listener sees the original client. A
//!   stream for an exit is checked against A's own `exits` grants, not B's word;
//! - `Admit`: count one public HTTP request against the listener's `http_listener_rate` and
//!   `http_max_requests_per_listener` where the listener is held; the request stays counted
//!   until B closes the stream;
//! - `Holds`: whether a local listener holds the name, and for which key (what a node asks before
//!   it believes Redis that its listener was replaced).
//!
//! B keeps one session per peer node, made on first use and remade when it dies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::super::route::{open_local, RouteError};
use super::super::{mux_server, RelayState};
use super::node_auth::{self, DialHello, NodeAuthError};
use crate::auth::Key;
use crate::error::{Error, ErrorCode, Result};
use crate::mux::Role;
use crate::protocol::{HelloAck, EXIT_HEADER_VERSION};
use crate::session::Link;
use crate::session::{Session, SessionStream};
use crate::transport::RelayUrl;

/// First byte of a node-to-node session's hello (a dialer's is `HELLO_VERSION`, a listener's
/// `LISTEN_HELLO_TAG`), followed by a [`DialHello`].
pub(crate) const CLUSTER_HELLO_TAG: u8 = b'C';

/// The request that starts a forwarded stream:
/// `kind u8 (1) | name_len u8 | name | header_len u16 | header | wait_ms u32`, where `header`
/// is the encoded [`crate::protocol::StreamHeader`] or [`crate::protocol::ExitHeader`] the
/// listener gets, and `wait_ms` how long it may take to accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Forward {
    pub(crate) name: String,
    pub(crate) header: Vec<u8>,
    pub(crate) wait: Duration,
}

const KIND_FORWARD: u8 = 1;
/// `kind u8 (2) | name_len u8 | name`; answered by one [`Admission`] byte (and, for
/// [`Admission::Rate`], `retry_after_ms u32`).
const KIND_ADMIT: u8 = 2;
/// `kind u8 (3) | name_len u8 | name`; answered `0` (not held here) or `1 | owner [32]`.
const KIND_HOLDS: u8 = 3;

/// What a stream on a node-to-node session asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PeerRequest {
    Forward(Forward),
    Admit(String),
    Holds(String),
}

/// The holding node's one-byte answer to a [`Forward`]: accepted, or why not.
const ACCEPTED: u8 = 0;

fn answer_of(e: RouteError) -> u8 {
    match e {
        RouteError::Offline | RouteError::ClusterUnavailable => 1,
        RouteError::Busy => 2,
        RouteError::Timeout => 3,
        RouteError::NotAllowed => 4,
        // The listener's own refusal: its code, flagged, so the entry node hands it on.
        RouteError::Refused(code) => 0x80 | code.number() as u8,
    }
}

fn error_of(b: u8) -> RouteError {
    match b {
        1 => RouteError::Offline,
        3 => RouteError::Timeout,
        4 => RouteError::NotAllowed,
        b if b & 0x80 != 0 => RouteError::Refused(ErrorCode::from_number(u32::from(b & 0x7f)).unwrap_or(ErrorCode::Refused)),
        _ => RouteError::Busy,
    }
}

/// The holding node's answer to an `Admit` request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Counted; it stays counted until the stream ends.
    Admitted,
    /// Over `http_listener_rate`: the window ends after this long.
    Rate(Duration),
    /// At `http_max_requests_per_listener` (the holder's limit).
    Busy(u32),
    /// The listener is not held there (any more): count where the request entered.
    NotHeld,
}

impl Forward {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + self.name.len() + self.header.len());
        b.push(KIND_FORWARD);
        b.push(self.name.len() as u8);
        b.extend_from_slice(self.name.as_bytes());
        b.extend_from_slice(&(self.header.len() as u16).to_be_bytes());
        b.extend_from_slice(&self.header);
        b.extend_from_slice(&(self.wait.as_millis().min(u32::MAX as u128) as u32).to_be_bytes());
        b
    }
}

fn named(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind, name.len() as u8];
    b.extend_from_slice(name.as_bytes());
    b
}

impl PeerRequest {
    pub(crate) async fn read_from(s: &mut SessionStream) -> std::io::Result<PeerRequest> {
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed node-to-node request");
        let mut h = [0u8; 2];
        s.read_exact(&mut h).await?;
        if !(KIND_FORWARD..=KIND_HOLDS).contains(&h[0]) || h[1] == 0 || h[1] > 63 {
            return Err(bad());
        }
        let mut name = vec![0u8; h[1] as usize];
        s.read_exact(&mut name).await?;
        let name = String::from_utf8(name).map_err(|_| bad())?;
        match h[0] {
            KIND_ADMIT => return Ok(PeerRequest::Admit(name)),
            KIND_HOLDS => return Ok(PeerRequest::Holds(name)),
            _ => {}
        }
        let n = s.read_u16().await? as usize;
        if n > 1024 {
            return Err(bad());
        }
        let mut header = vec![0u8; n];
        s.read_exact(&mut header).await?;
        let wait = Duration::from_millis(u64::from(s.read_u32().await?));
        Ok(PeerRequest::Forward(Forward { name, header, wait }))
    }
}

/// B's sessions to the other nodes, by node id.
pub(crate) struct Peers {
    /// The cluster key both sides prove.
    key: Key,
    /// This node's id, which its hellos name.
    me: String,
    sessions: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Session>>>>>,
    /// Nodes whose last handshake failed, and how: not dialed again for [`FAILED_FOR`] (a node
    /// that hangs or fails the key, listed in Redis, costs one attempt per period, not one per
    /// request).
    failed: std::sync::Mutex<HashMap<String, (std::time::Instant, ErrorCode, String)>>,
}

/// How long a node whose handshake failed is not dialed again.
const FAILED_FOR: Duration = Duration::from_secs(1);
/// Most failed nodes remembered (then the list starts over).
const FAILED_MAX: usize = 1024;

impl Peers {
    pub(crate) fn new(key: Key, me: String) -> Peers {
        Peers { key, me, sessions: std::sync::Mutex::default(), failed: std::sync::Mutex::default() }
    }

    /// The live session to node `id`, or its handshake's failure (remembered for [`FAILED_FOR`]).
    async fn session(&self, state: &RelayState, id: &str, url: &str) -> Result<Session> {
        if let Some((at, code, msg)) = self.failed.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            if at.elapsed() < FAILED_FOR {
                return Err(Error::new(*code, msg.clone()));
            }
        }
        let r = self.handshake(state, id, url).await;
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        match &r {
            Ok(_) => {
                failed.remove(id);
            }
            Err(e) => {
                if failed.len() >= FAILED_MAX {
                    failed.clear();
                }
                failed.insert(id.to_string(), (std::time::Instant::now(), e.code(), e.message().to_string()));
            }
        }
        r
    }

    /// The live session to node `id` at `url`, made now if there is none. A session is used only
    /// once the node has proved the cluster key over this node's nonce, as the node `id` at `url`.
    async fn handshake(&self, state: &RelayState, id: &str, url: &str) -> Result<Session> {
        let slot = self.sessions.lock().unwrap_or_else(|p| p.into_inner()).entry(id.to_string()).or_default().clone();
        let mut slot = slot.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        let relay_url = RelayUrl::parse(url)?;
        let mut made = None;
        let session_cfg = mux_server::relay_mux_config(state);
        let connect = crate::client::handshake::connect_mux(&relay_url, None, &session_cfg, |nonce| {
            let mut b = vec![CLUSTER_HELLO_TAG];
            if let Ok((hello, t)) = DialHello::new(&self.key, nonce, &self.me, id, url) {
                b.extend_from_slice(&hello.encode());
                made = Some(t);
            }
            b.into()
        });
        let (mut link, answer) = tokio::time::timeout(state.cfg.limits.handshake_timeout, connect)
            .await
            .map_err(|_| Error::new(ErrorCode::Timeout, format!("the cluster node at {url} did not answer in time")))??;
        if let Some((code, msg)) = HelloAck::decode(&answer)?.refusal {
            let _ = link.sink.close().await;
            return Err(Error::new(code, format!("the cluster node at {url} refused this node: {msg}")));
        }
        let proved = match &made {
            Some(t) => node_auth::check_answer(&self.key, t, &answer[node_auth::ACK_LEN.min(answer.len())..]),
            None => Err(NodeAuthError::Malformed("the dialed node's nonce is not 32 bytes")),
        };
        if let Err(e) = proved {
            let _ = link.sink.close().await;
            state.metrics.cluster.node_auth_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(node = %id, %url, error = %e, "a node listed in the cluster registry did not prove the cluster key; nothing is routed to it");
            return Err(Error::new(e.code(), format!("the cluster node {id} at {url} did not prove the cluster key: {e}")));
        }
        let s = Session::start(Role::Client, link, session_cfg);
        tracing::info!(node = %id, %url, "node-to-node session open (both nodes proved the cluster key)");
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
        (id, url): (&str, &str),
        name: &str,
        header: &[u8],
        deadline: tokio::time::Instant,
    ) -> std::result::Result<SessionStream, PeerError> {
        let session = match tokio::time::timeout_at(deadline, self.session(state, id, url)).await {
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

impl Peers {
    /// Open a stream to node `id` and send it `request` (within `deadline`).
    async fn ask(&self, state: &RelayState, (id, url): (&str, &str), request: &[u8], deadline: tokio::time::Instant) -> Result<SessionStream> {
        let timeout = || Error::new(ErrorCode::Timeout, format!("the cluster node {id} at {url} did not answer in time"));
        let session = tokio::time::timeout_at(deadline, self.session(state, id, url)).await.map_err(|_| timeout())??;
        let mut stream = session.open()?;
        tokio::time::timeout_at(deadline, stream.write_all(request))
            .await
            .map_err(|_| timeout())?
            .map_err(|e| Error::new(ErrorCode::RelayUnavailable, format!("the node-to-node session to {url} failed: {e}")))?;
        Ok(stream)
    }

    /// Count one public HTTP request to `name` on node `id`, which holds it. `Admitted` comes
    /// with the stream that keeps the request counted until it is dropped.
    pub(crate) async fn admit(
        &self,
        state: &RelayState,
        node: (&str, &str),
        name: &str,
        deadline: tokio::time::Instant,
    ) -> Result<(Admission, Option<SessionStream>)> {
        let mut stream = self.ask(state, node, &named(KIND_ADMIT, name), deadline).await?;
        let answer = async {
            let a = match stream.read_u8().await? {
                0 => Admission::Admitted,
                1 => Admission::Rate(Duration::from_millis(u64::from(stream.read_u32().await?))),
                2 => Admission::Busy(stream.read_u32().await?),
                _ => Admission::NotHeld,
            };
            Ok::<_, std::io::Error>(a)
        };
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(Admission::Admitted)) => Ok((Admission::Admitted, Some(stream))),
            Ok(Ok(a)) => Ok((a, None)),
            Ok(Err(e)) => Err(Error::new(ErrorCode::RelayUnavailable, format!("the cluster node {} failed to answer an admission: {e}", node.0))),
            Err(_) => Err(Error::new(ErrorCode::Timeout, format!("the cluster node {} did not answer an admission in time", node.0))),
        }
    }

    /// The key (public key) of the local listener node `id` holds `name` with, if it holds it.
    pub(crate) async fn holds(&self, state: &RelayState, node: (&str, &str), name: &str, deadline: tokio::time::Instant) -> Result<Option<[u8; 32]>> {
        let mut stream = self.ask(state, node, &named(KIND_HOLDS, name), deadline).await?;
        let answer = async {
            if stream.read_u8().await? == 0 {
                return Ok(None);
            }
            let mut owner = [0u8; 32];
            stream.read_exact(&mut owner).await?;
            Ok::<_, std::io::Error>(Some(owner))
        };
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(o)) => Ok(o),
            Ok(Err(e)) => Err(Error::new(ErrorCode::RelayUnavailable, format!("the cluster node {} failed to answer: {e}", node.0))),
            Err(_) => Err(Error::new(ErrorCode::Timeout, format!("the cluster node {} did not answer in time", node.0))),
        }
    }
}

/// Whether a failure to reach a node says it is *not* a node of this cluster (it refused or
/// failed the cluster key, or is another node than Redis says), rather than that it could not be
/// reached right now.
pub(crate) fn disproved(e: &Error) -> bool {
    matches!(e.code(), ErrorCode::AuthFailed | ErrorCode::AuthUnknownKey | ErrorCode::AuthClockSkew | ErrorCode::Protocol | ErrorCode::NotAllowed)
}

/// Why a forward failed: the route's answer, or the node could not be reached at all.
#[derive(Debug)]
pub(crate) enum PeerError {
    Route(RouteError),
    Node(Error),
}

/// A's side: authenticate a node-to-node session (the dialing node proves the cluster key over
/// this connection's nonce, naming this node; this node then proves it back over the dialing
/// node's nonce), then serve each stream's request.
pub(crate) async fn serve_peer(state: Arc<RelayState>, link: Link, peer: SocketAddr, nonce: [u8; 32], frame: &[u8]) {
    let Link { source, mut sink, quic } = link;
    let Some(cluster) = state.cluster.as_ref() else {
        let ack =
            HelloAck { refusal: Some((ErrorCode::NotAllowed, "this relay is not a node of a cluster (TUNNEL_CLUSTER_REDIS is not set)".into())) };
        let _ = sink.send(ack.encode()).await;
        return;
    };
    let verdict = DialHello::decode(&frame[1..]).and_then(|h| {
        let t = h.verify(&cluster.cfg.key, &nonce, &cluster.node_id, &cluster.advertise)?;
        Ok((h, t))
    });
    let (hello, transcript) = match verdict {
        Ok(x) => x,
        Err(e) => {
            state.metrics.cluster.node_auth_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            super::super::guard::log_auth_failure(&state, peer, &format!("a node-to-node session that did not prove itself: {e}"));
            let _ = sink.send(HelloAck { refusal: Some((e.code(), e.to_string())) }.encode()).await;
            return;
        }
    };
    super::super::guard::handshake_finished();
    if sink.send(node_auth::answer(&cluster.cfg.key, &transcript).into()).await.is_err() {
        return;
    }
    let (session, _close) = mux_server::server_session(&state, Link { source, sink, quic });
    tracing::info!(%peer, node = %hello.dialer_id, "node-to-node session from another node of the cluster (both proved the cluster key)");
    loop {
        tokio::select! {
            s = session.accept() => match s {
                Some(stream) => { state.tasks.spawn(serve_request(state.clone(), stream)); }
                None => break,
            },
            _ = state.kill.cancelled() => {
                session.close(ErrorCode::RelayUnavailable, "the relay shut down");
                break;
            }
        }
    }
}

async fn serve_request(state: Arc<RelayState>, mut stream: SessionStream) {
    let req = match tokio::time::timeout(state.cfg.limits.handshake_timeout, PeerRequest::read_from(&mut stream)).await {
        Ok(Ok(r)) => r,
        _ => {
            stream.reset(ErrorCode::Protocol);
            return;
        }
    };
    match req {
        PeerRequest::Forward(f) => serve_forward(state, stream, f).await,
        PeerRequest::Admit(name) => serve_admit(state, stream, &name).await,
        PeerRequest::Holds(name) => {
            let answer = match state.registry.owner(&name) {
                Some(owner) => [&[1u8][..], &owner[..]].concat(),
                None => vec![0],
            };
            let _ = stream.write_all(&answer).await;
            stream.finish();
        }
    }
}

/// Count a request entering another node against this node's listener limits; keep it counted
/// until that node closes the stream (the response ended, or the session died).
async fn serve_admit(state: Arc<RelayState>, mut stream: SessionStream, name: &str) {
    use super::super::listener_limits::{count_here, Refused};
    if !state.registry.contains(name) {
        let _ = stream.write_all(&[3]).await;
        return stream.finish();
    }
    let permit = match count_here(&state, name) {
        Ok(p) => p,
        Err(Refused::Rate(wait)) => {
            let ms = wait.as_millis().min(u128::from(u32::MAX)) as u32;
            let _ = stream.write_all(&[&[1u8][..], &ms.to_be_bytes()[..]].concat()).await;
            return stream.finish();
        }
        Err(Refused::Busy(limit)) => {
            let _ = stream.write_all(&[&[2u8][..], &limit.to_be_bytes()[..]].concat()).await;
            return stream.finish();
        }
    };
    if stream.write_all(&[0]).await.is_err() {
        return;
    }
    // The other node sends nothing more: its end (or the session's) ends the count.
    let mut sink = [0u8; 64];
    loop {
        tokio::select! {
            r = stream.read(&mut sink) => if !matches!(r, Ok(n) if n > 0) { break },
            _ = state.kill.cancelled() => break,
        }
    }
    drop(permit);
}

async fn serve_forward(state: Arc<RelayState>, mut stream: SessionStream, req: Forward) {
    // An exit stream: this node checks the grant itself, as it would for a dialer of its own.
    if req.header.first() == Some(&EXIT_HEADER_VERSION) {
        let kid = req.header.get(1..5).map(|k| u32::from_be_bytes(k.try_into().expect("four bytes")));
        let is_exit = state.registry.registration(&req.name).is_some_and(|j| j.exit);
        if !(is_exit && kid.is_some_and(|kid| state.access().exit_permits(&req.name, kid))) {
            tracing::info!(listener = %req.name, ?kid, is_exit, "exit stream from another node refused: this node's exits setting does not grant it");
            state.metrics.refused(super::super::metrics::Refusal::NotAllowed);
            let _ = stream.write_all(&[answer_of(RouteError::NotAllowed)]).await;
            return stream.finish();
        }
    }
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
        assert_eq!(named(KIND_HOLDS, "api"), vec![3, 3, b'a', b'p', b'i']);
    }
}
