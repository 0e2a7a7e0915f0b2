//! One authenticated tunnel on the relay, per transport and mode: send the `ServerConnect`
//! preamble, authenticate (RFC 1929 per connection in classic mode, the session hello once in
//! multiplexed mode), then serve each stream: SOCKS5 CONNECT → allowlist → target → bridge.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::SystemTime;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::classic_ws::{Activity, ClassicIo, ClassicWs, Watched};
use super::metrics::Refusal;
use super::route::{self, Connected};
use super::RelayState;
use super::{guard, mux_server};
use crate::auth::{fresh_nonce, AuthRejection, EARLY_MAX_SKEW};
use crate::error::ErrorCode;
use crate::mux::{FrameSink, FrameSource};
use crate::protocol::{Hello, HelloAck, ServerConnect, MUX_TCP_MAGIC};
use crate::session::Link;
use crate::session::{Session, SessionStream};
use crate::socks::{self, ServerAuth, ServerHandshakeError};
use crate::transport::{tcp_frames, ws_frames, BoxIo};

struct ActiveGuard<'a>(&'a std::sync::atomic::AtomicI64);
impl<'a> ActiveGuard<'a> {
    fn new(c: &'a std::sync::atomic::AtomicI64) -> Self {
        c.fetch_add(1, Relaxed);
        ActiveGuard(c)
    }
}
impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

fn rejection_message(r: &AuthRejection, state: &RelayState) -> String {
    match r {
        AuthRejection::Malformed => "malformed credentials; use a libtunnel or Emissary client".into(),
        AuthRejection::UnknownKey(kid) => {
            let kids = state.access().auth_keys.kids();
            if kids.is_empty() {
                format!("this relay has no dialer keys (it serves listeners only), so key id {kid} is unknown; add it to the relay's TUNNEL_AUTH_KEYS to dial through it")
            } else {
                // The relay's own key ids are not told to an unauthenticated peer (they are in its
                // log and on the admin endpoint).
                tracing::debug!(kid, configured = ?kids, "unknown key id");
                format!("key id {kid} is not configured on this relay; use the key id of a key in its TUNNEL_AUTH_KEYS, or add yours there")
            }
        }
        AuthRejection::ClockSkew(d) => format!(
            "your clock is {}s away from the relay's (at most 900s allowed); synchronise the clocks (NTP)",
            d.as_secs()
        ),
        AuthRejection::Replayed(kid) => format!(
            "this early hello for key id {kid} was already used: a replay; a libtunnel client signs a fresh nonce for every connection"
        ),
        AuthRejection::BadSignature(kid) => format!(
            "the proof for key id {kid} does not match: the secret is wrong (or the proof was replayed); check TUNNEL_KEY against the relay's TUNNEL_AUTH_KEYS"
        ),
    }
}

/// Classic (Emissary) mode over a WebSocket, read frame by frame so messages of any size stream
/// through (see `classic_ws`).
pub(super) async fn serve_ws_classic(state: Arc<RelayState>, io: BoxIo, peer: SocketAddr) {
    let mut io = ClassicWs::new(io);
    let nonce = fresh_nonce();
    if io.write_message(&ServerConnect::new(&nonce).encode_bytes()).await.is_err() {
        return;
    }
    serve_classic(state, io, peer, nonce).await;
}

/// The raw-TCP endpoint: preamble, then classic SOCKS5 (first byte 0x05) or the multiplexed magic.
pub(super) async fn serve_raw_tcp(state: Arc<RelayState>, mut sock: TcpStream, peer: SocketAddr) {
    let nonce = fresh_nonce();
    if sock.write_all(&ServerConnect::new(&nonce).encode_bytes()).await.is_err() {
        return;
    }
    let mut first = [0u8; 1];
    match tokio::time::timeout(state.cfg.limits.handshake_timeout, sock.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        Ok(_) => return,
        Err(_) => {
            state.metrics.refused(Refusal::HandshakeTimeout);
            return;
        }
    }
    if first[0] == MUX_TCP_MAGIC[0] {
        let mut magic = [0u8; 4];
        if sock.read_exact(&mut magic).await.is_err() || &magic != MUX_TCP_MAGIC {
            state.metrics.refused(Refusal::Malformed);
            return;
        }
        let (source, sink) = tcp_frames(Box::new(sock));
        serve_mux(state, Link::frames(source, sink), peer, nonce).await;
    } else {
        serve_classic(state, sock, peer, nonce).await;
    }
}

/// After the relay starts draining, a classic tunnel that has moved no byte for this long is closed
/// (Close 1001) instead of holding shutdown until `drain_timeout`; busier ones keep the full drain.
/// Emissary itself closes every tunnel at once on SIGTERM.
const DRAIN_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Resolves once the relay is draining and `activity` has been quiet for [`DRAIN_IDLE`].
async fn drained_and_idle(state: &RelayState, activity: &Activity) {
    state.draining.cancelled().await;
    loop {
        let idle = activity.idle_for();
        if idle >= DRAIN_IDLE {
            return;
        }
        tokio::time::sleep(DRAIN_IDLE - idle).await;
    }
}

async fn serve_classic<S: ClassicIo>(state: Arc<RelayState>, mut io: S, peer: SocketAddr, nonce: [u8; 32]) {
    // Proofs are always checked: a valid key is never refused because others failed from the same
    // address. An address over `auth_failures_per_minute` only gets its failures answered slowly.
    let fail_delay = guard::failure_delay(&state, peer);
    let access = state.access();
    let auth = ServerAuth::Proof { keys: &access.auth_keys, nonce: &nonce, fail_delay };
    let addr = match tokio::time::timeout(state.cfg.limits.handshake_timeout, socks::server_handshake(&mut io, auth)).await {
        Err(_) => {
            state.metrics.refused(Refusal::HandshakeTimeout);
            tracing::debug!(%peer, "classic handshake timed out");
            return;
        }
        Ok(Err(e)) => {
            note_handshake_error(&state, peer, &e);
            if matches!(e, ServerHandshakeError::Auth(_)) && !fail_delay.is_zero() {
                state.metrics.refused(Refusal::RateLimited);
            }
            let _ = tokio::time::timeout(state.cfg.limits.handshake_timeout, io.shutdown()).await;
            return;
        }
        Ok(Ok(a)) => a,
    };
    super::guard::handshake_finished();
    state.metrics.sessions_classic.fetch_add(1, Relaxed);
    let _s = ActiveGuard::new(&state.metrics.sessions_active);
    let Some(upstream) = route::connect_and_reply(&state, &mut io, &addr, peer, None).await else {
        let _ = tokio::time::timeout(state.cfg.limits.handshake_timeout, io.shutdown()).await;
        return;
    };
    let _a = ActiveGuard::new(&state.metrics.streams_active);
    let started = std::time::Instant::now();
    let activity = Activity::new();
    let mut io = Watched::new(io, activity.clone());
    let copied = {
        let copy = async {
            match upstream {
                Connected::Tcp(mut t) => tokio::io::copy_bidirectional_with_sizes(&mut io, &mut t, 32 * 1024, 32 * 1024).await,
                Connected::Listener(mut l) => tokio::io::copy_bidirectional_with_sizes(&mut io, &mut l, 32 * 1024, 32 * 1024).await,
            }
        };
        tokio::select! {
            r = copy => Some(r),
            _ = drained_and_idle(&state, &activity) => None,
        }
    };
    if let Some(r) = &copied {
        let to = crate::socks::Target::from_address(&addr).map(|t| t.to_string()).unwrap_or_default();
        let logged = r.as_ref().map(|x| *x).map_err(|e| std::io::Error::new(e.kind(), e.to_string()));
        crate::conn_log::closed("relayed classic connection", &peer, &to, started, &logged);
    }
    let clean = match copied {
        None => {
            tracing::debug!(%peer, "idle classic tunnel closed: the relay is shutting down");
            io.inner.going_away();
            true
        }
        Some(Ok((up, down))) => {
            count_bytes(&state, up, down);
            true
        }
        // The client closed the tunnel while the target was still sending: Emissary's protocol
        // has no half-close, so that is its normal end.
        Some(Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => true,
        Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
            tracing::warn!(%peer, error = %e, "classic stream dropped");
            false
        }
        Some(Err(e)) => {
            tracing::debug!(%peer, error = %e, "classic stream ended with an error");
            false
        }
    };
    if clean {
        // Finish the WebSocket closing handshake (Close 1000 when the target closed, as Emissary
        // sends), so the client reads a clean end; bounded, as the client may be gone. A stream
        // cut off by an error is dropped without one, so the client reads an error instead.
        let _ = tokio::time::timeout(state.cfg.limits.handshake_timeout, io.shutdown()).await;
    }
}

fn note_handshake_error(state: &RelayState, peer: SocketAddr, e: &ServerHandshakeError) {
    match e {
        ServerHandshakeError::Auth(r) => guard::log_auth_failure(state, peer, r),
        ServerHandshakeError::Malformed(why) => {
            state.metrics.refused(Refusal::Malformed);
            tracing::info!(%peer, %why, "malformed SOCKS5 request refused");
        }
        ServerHandshakeError::Io(err) => {
            tracing::debug!(%peer, error = %err, "connection lost during SOCKS5 handshake")
        }
    }
}

fn count_bytes(state: &RelayState, up: u64, down: u64) {
    state.metrics.bytes_to_targets.fetch_add(up, Relaxed);
    state.metrics.bytes_from_targets.fetch_add(down, Relaxed);
}

/// Multiplexed mode over a WebSocket. `early` is the judgement of the early hello its upgrade
/// request carried (then no preamble is sent and the answer to it is the first message).
pub(super) async fn serve_ws_mux(state: Arc<RelayState>, mut ws: WebSocketStream<BoxIo>, peer: SocketAddr, early: Option<Verdict>) {
    if let Some(verdict) = early {
        let (source, sink) = ws_frames(ws);
        serve_dialer(state, Link::frames(source, sink), peer, verdict).await;
        return;
    }
    let nonce = fresh_nonce();
    if ws.send(Message::Binary(ServerConnect::new(&nonce).encode_bytes().into())).await.is_err() {
        return;
    }
    let (source, sink) = ws_frames(ws);
    serve_mux(state, Link::frames(source, sink), peer, nonce).await;
}

/// A multiplexed session over a frame transport that has no handshake of its own (a gRPC call):
/// the preamble as its first frame, then the hello.
pub(super) async fn serve_framed_mux(state: Arc<RelayState>, source: FrameSource, mut sink: FrameSink, peer: SocketAddr) {
    let nonce = fresh_nonce();
    if sink.send(ServerConnect::new(&nonce).encode_bytes().into()).await.is_err() {
        return;
    }
    serve_mux(state, Link::frames(source, sink), peer, nonce).await;
}

/// A dialer's hello, judged: the key id, a refused proof, or a malformed hello (its message).
pub(super) type Verdict = Result<Result<u32, AuthRejection>, String>;

/// What the relay makes of an early hello ([`crate::protocol::EARLY_HELLO_HEADER`]).
pub(super) enum Early {
    /// Judged: the answer is the session's first message.
    Taken(Verdict),
    /// Not judged: the client signs the relay's nonce on a new connection.
    Declined,
}

/// The nonces of the early hellos this relay accepted, each kept until its date is
/// [`EARLY_MAX_SKEW`] past (after that its date is refused anyway), so each is taken once. At most
/// [`EARLY_NONCES`] are kept; beyond that early hellos are declined. Only a valid proof adds one.
#[derive(Default)]
pub(crate) struct EarlyNonces(std::sync::Mutex<NonceStore>);

#[derive(Default)]
pub(crate) struct NonceStore {
    /// The nonce's first 16 bytes (a collision needs 2^64 hellos) → until when (Unix seconds).
    until: std::collections::HashMap<[u8; 16], u64>,
    /// When expired nonces were last dropped (Unix seconds): at most once a second while full.
    pruned: u64,
}

/// The most early-hello nonces a relay remembers (at most ~13 MiB): 2,000 new sessions a second
/// for two minutes (a nonce is kept at most that long: its date may be a minute ahead).
const EARLY_NONCES: usize = 256 * 1024;

impl EarlyNonces {
    /// Record `nonce` (its hello dated `date`); `None` when the store is full, `Some(false)`
    /// when it was already taken.
    fn take(&self, nonce: [u8; 32], date: SystemTime, now: SystemTime) -> Option<bool> {
        let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let key: [u8; 16] = nonce[..16].try_into().expect("16 bytes");
        let mut store = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if store.until.contains_key(&key) {
            return Some(false);
        }
        if store.until.len() >= EARLY_NONCES {
            let now = secs(now);
            if store.pruned < now {
                store.pruned = now;
                store.until.retain(|_, until| *until >= now);
            }
            if store.until.len() >= EARLY_NONCES {
                return None;
            }
        }
        // Rounded up, so a nonce is never dropped before its date is refused.
        store.until.insert(key, secs(date + EARLY_MAX_SKEW) + 1);
        Some(true)
    }
}

/// Judge the early hello `value` of an upgrade request (see [`crate::protocol::EARLY_HELLO_HEADER`]).
pub(super) fn judge_early(state: &RelayState, value: &[u8], now: SystemTime) -> Early {
    use base64::Engine;
    let malformed = |why: &str| Early::Taken(Err(format!("malformed early hello ({why})")));
    let Ok(raw) = base64::engine::general_purpose::STANDARD_NO_PAD.decode(value) else {
        return malformed("not unpadded base64");
    };
    if raw.len() <= 32 {
        return malformed("shorter than its nonce");
    }
    let nonce: [u8; 32] = raw[..32].try_into().expect("length checked");
    let hello = match Hello::decode(&raw[32..]) {
        Ok(h) => h,
        Err(e) => return Early::Taken(Err(e.message().to_string())),
    };
    let Ok(date) = httpdate::parse_http_date(&hello.date) else {
        return Early::Taken(Ok(Err(AuthRejection::Malformed)));
    };
    let skew = now.duration_since(date).unwrap_or_else(|e| e.duration());
    // A cluster's nodes share their keys but not their taken nonces: a hello taken by one could
    // be replayed to another, so a node declines early hellos.
    if skew > EARLY_MAX_SKEW || state.cfg.cluster.is_some() {
        return Early::Declined;
    }
    match state.access().auth_keys.verify(&nonce, &hello.date, &hello.sig, now) {
        Ok(kid) => match state.early_nonces.take(nonce, date, now) {
            Some(true) => Early::Taken(Ok(Ok(kid))),
            Some(false) => Early::Taken(Ok(Err(AuthRejection::Replayed(kid)))),
            None => Early::Declined,
        },
        Err(r) => Early::Taken(Ok(Err(r))),
    }
}

/// A session whose transport is up and whose hello is due on `link`, signed over `nonce` (the
/// preamble's, or a QUIC connection's exported one): a listener's, another node's or a dialer's.
pub(super) async fn serve_mux(state: Arc<RelayState>, mut link: Link, peer: SocketAddr, nonce: [u8; 32]) {
    let hello = match tokio::time::timeout(state.cfg.limits.handshake_timeout, link.source.next()).await {
        Err(_) => {
            state.metrics.refused(Refusal::HandshakeTimeout);
            tracing::debug!(%peer, "session hello timed out");
            return;
        }
        Ok(Some(Ok(b))) => b,
        Ok(_) => return,
    };
    if hello.first() == Some(&crate::protocol::LISTEN_HELLO_TAG) {
        super::listen::serve_listener(state, link, peer, nonce, &hello).await;
        return;
    }
    if hello.first() == Some(&super::cluster::peers::CLUSTER_HELLO_TAG) {
        super::cluster::peers::serve_peer(state, link, peer, nonce, &hello).await;
        return;
    }
    let verdict = match Hello::decode(&hello) {
        Ok(h) => Ok(state.access().auth_keys.verify(&nonce, &h.date, &h.sig, SystemTime::now())),
        Err(e) => Err(e.message().to_string()),
    };
    serve_dialer(state, link, peer, verdict).await;
}

/// A dialer's session once its hello is judged: the answer, then its streams.
pub(super) async fn serve_dialer(state: Arc<RelayState>, link: Link, peer: SocketAddr, verdict: Verdict) {
    let Link { source, mut sink, quic } = link;
    let fail_delay = guard::failure_delay(&state, peer);
    let verdict = match verdict {
        Ok(v) => v,
        Err(why) => {
            state.metrics.refused(Refusal::Malformed);
            let ack = HelloAck { refusal: Some((ErrorCode::Protocol, why)) };
            let _ = sink.send(ack.encode()).await;
            let _ = sink.close().await;
            return;
        }
    };
    let kid = match verdict {
        Ok(kid) => kid,
        Err(r) => {
            guard::log_auth_failure(&state, peer, &r);
            guard::slow_failure(&state, fail_delay).await;
            let ack = HelloAck { refusal: Some((r.code(), rejection_message(&r, &state))) };
            let _ = sink.send(ack.encode()).await;
            let _ = sink.close().await;
            return;
        }
    };
    super::guard::handshake_finished();
    let limit = state.cfg.limits.max_sessions_per_key;
    let Some(_counted) = state.guards.key_sessions.enter(kid, limit) else {
        state.metrics.refused(Refusal::KeySessions);
        tracing::warn!(%peer, kid, limit, "session refused: its key already has the most sessions allowed");
        let why = format!("key id {kid} already has {limit} open sessions on this relay (max_sessions_per_key); close some, or raise the limit");
        let ack = HelloAck { refusal: Some((ErrorCode::Refused, why)) };
        let _ = sink.send(ack.encode()).await;
        let _ = sink.close().await;
        return;
    };
    if sink.send(HelloAck { refusal: None }.encode()).await.is_err() {
        return;
    }
    let transport = if quic.is_some() { "quic" } else { "mux" };
    let counter = if quic.is_some() { &state.metrics.sessions_quic } else { &state.metrics.sessions_mux };
    counter.fetch_add(1, Relaxed);
    let _s = ActiveGuard::new(&state.metrics.sessions_active);
    let (session, mut driver) = mux_server::server_session(&state, Link { source, sink, quic });
    tracing::debug!(%peer, transport, "session authenticated");
    let mut draining = false;
    // While draining, check now and then whether the last stream has ended so the session can close
    // before the drain deadline (idle sessions close at once).
    let mut drain_tick = tokio::time::interval(std::time::Duration::from_millis(50));
    loop {
        tokio::select! {
            s = session.accept() => match s {
                Some(stream) => { state.tasks.spawn(serve_mux_stream(state.clone(), stream, peer, session.clone(), kid)); }
                None => break,
            },
            _ = state.draining.cancelled(), if !draining => {
                draining = true;
                session.go_away();
            }
            _ = drain_tick.tick(), if draining => {
                if session.stream_count() == 0 {
                    session.close(ErrorCode::RelayUnavailable, "the relay shut down (drained)");
                    break;
                }
            }
            _ = state.kill.cancelled() => {
                session.close(ErrorCode::RelayUnavailable, "the relay shut down");
                break;
            }
        }
    }
    // Its last frames go out on the driver's task: wait for them (bounded) before this task,
    // which a shutting-down relay waits for, ends.
    driver.finished().await;
}

async fn serve_mux_stream(state: Arc<RelayState>, mut stream: SessionStream, peer: SocketAddr, session: Session, kid: u32) {
    let addr = match tokio::time::timeout(state.cfg.limits.handshake_timeout, socks::server_handshake(&mut stream, ServerAuth::Session)).await {
        Err(_) => {
            state.metrics.refused(Refusal::HandshakeTimeout);
            stream.reset(ErrorCode::Timeout);
            return;
        }
        Ok(Err(e)) => {
            note_handshake_error(&state, peer, &e);
            stream.reset(ErrorCode::Protocol);
            return;
        }
        Ok(Ok(a)) => a,
    };
    let started = std::time::Instant::now();
    let Some(upstream) = route::connect_and_reply(&state, &mut stream, &addr, peer, Some(kid)).await else {
        stream.finish();
        return;
    };
    let _a = ActiveGuard::new(&state.metrics.streams_active);
    // Close the session before the bridge (and its stream) is dropped: a dropped stream would
    // send FIN, and the client would take the cut-off transfer for a complete one.
    let killed = || async {
        state.kill.cancelled().await;
        session.close(ErrorCode::RelayUnavailable, "the relay shut down");
    };
    let bridged = match upstream {
        Connected::Tcp(t) => tokio::select! {
            r = crate::stream::bridge(stream, t) => r,
            _ = killed() => return,
        },
        Connected::Listener(mut l) => {
            // splice counts (dialer → listener, listener → dialer); bridge counts (to the dialer,
            // from the dialer). A cut-off side resets both inside splice; a relay shutdown resets
            // both here, so neither end takes the cut-off stream for a finished one (dropping them
            // would send FIN).
            let r = tokio::select! {
                r = crate::stream::splice(&mut stream, &mut l) => r.map(|(to_listener, to_dialer)| (to_dialer, to_listener)),
                _ = killed() => Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "the relay shut down")),
            };
            if let Err(e) = &r {
                // A side that reset with a code (the listener's E2E_REFUSED for a plaintext dial)
                // passes it on to the other, so the dialer learns why.
                let code = e.get_ref().and_then(|i| i.downcast_ref::<crate::error::Error>()).map_or(ErrorCode::Closed, |e| e.code());
                stream.reset(code);
                l.reset(code);
            }
            r
        }
    };
    let to = crate::socks::Target::from_address(&addr).map(|t| t.to_string()).unwrap_or_default();
    // (dialer → target, target → dialer) for the connection log.
    let logged = bridged.as_ref().map(|(down, up)| (*up, *down)).map_err(|e| std::io::Error::new(e.kind(), e.to_string()));
    crate::conn_log::closed("relayed stream", &peer, &to, started, &logged);
    if let Ok((down, up)) = bridged {
        count_bytes(&state, up, down);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn early_nonces_are_taken_once_kept_until_their_date_is_refused_and_bounded() {
        let store = EarlyNonces::default();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let nonce = |i: u32| {
            let mut n = [0u8; 32];
            n[..4].copy_from_slice(&i.to_be_bytes());
            n
        };
        assert_eq!(store.take(nonce(0), now, now), Some(true));
        assert_eq!(store.take(nonce(0), now, now), Some(false), "a replay");
        // Full: declined, until the oldest dates are refused anyway (then they are dropped).
        for i in 1..EARLY_NONCES as u32 {
            assert_eq!(store.take(nonce(i), now, now), Some(true));
        }
        assert_eq!(store.take(nonce(u32::MAX), now, now), None, "full");
        assert_eq!(store.take(nonce(0), now, now), Some(false), "still a replay while full");
        let later = now + EARLY_MAX_SKEW + Duration::from_secs(2);
        assert_eq!(store.take(nonce(u32::MAX), later, later), Some(true), "expired nonces made room");
        assert_eq!(store.0.lock().unwrap().until.len(), 1);
    }
}
