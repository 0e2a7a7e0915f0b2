//! One authenticated tunnel on the relay, per transport and mode: send the `ServerConnect`
//! preamble, authenticate (RFC 1929 per connection in classic mode, the session hello once in
//! multiplexed mode), then serve each stream: SOCKS5 CONNECT → allowlist → target → bridge.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::SystemTime;

use futures_util::{SinkExt, StreamExt};
use socks5_proto::{Address, Reply};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::classic_ws::{Activity, ClassicIo, ClassicWs, Watched};
use super::connect::connect_target;
use super::guard::Admission;
use super::metrics::Refusal;
use super::RelayState;
use crate::auth::{fresh_nonce, AuthRejection};
use crate::error::ErrorCode;
use crate::mux::{FrameSink, FrameSource, MuxConfig, MuxStream, Role, Session};
use crate::protocol::{Hello, HelloAck, ServerConnect, MUX_TCP_MAGIC};
use crate::socks::{self, ServerAuth, ServerHandshakeError, Target};
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

/// Start the relay's side of a multiplexed session (dialer or listener) with the configured
/// keepalive and stream limits; the guard closes it when the serving task ends.
pub(super) fn server_session(state: &RelayState, source: FrameSource, sink: FrameSink) -> (Session, CloseOnDrop) {
    let l = &state.cfg.limits;
    let cfg = MuxConfig {
        keepalive_interval: l.keepalive_interval,
        keepalive_timeout: l.keepalive_timeout,
        max_streams: l.max_streams_per_session,
        max_stream_window: u32::try_from(l.max_stream_window).unwrap_or(u32::MAX),
        receive_budget: l.session_receive_budget,
        ..MuxConfig::default()
    };
    let session = Session::new(Role::Server, source, sink, cfg);
    (session.clone(), CloseOnDrop(session))
}

/// Closes a relay-side session when the task serving it ends or is dropped. The session's reader
/// and writer run as their own tasks, so without this a connection task dropped on `kill` (or by
/// `ServerHandle::abort`) would leave the transport open, answering pings but refusing streams.
pub(super) struct CloseOnDrop(pub(super) Session);
impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close(ErrorCode::RelayUnavailable, "the relay closed the session");
    }
}

fn rejection_message(r: &AuthRejection, state: &RelayState) -> String {
    match r {
        AuthRejection::Malformed => "malformed credentials; use a libtunnel or Emissary client".into(),
        AuthRejection::UnknownKey(kid) => format!(
            "key id {kid} is not configured on this relay (it has key ids {:?}); use one of those or add yours to TUNNEL_AUTH_KEYS",
            state.access().auth_keys.kids()
        ),
        AuthRejection::ClockSkew(d) => format!(
            "your clock is {}s away from the relay's (at most 900s allowed); synchronise the clocks (NTP)",
            d.as_secs()
        ),
        AuthRejection::BadSignature(kid) => format!(
            "the proof for key id {kid} does not match: the secret is wrong (or the proof was replayed); check TUNNEL_KEY against the relay's TUNNEL_AUTH_KEYS"
        ),
    }
}

/// Count a failed authentication against its source address and log it: a warning for each of
/// the first `auth_failures_per_minute`, one more when the address goes over, then debug only.
pub(super) fn log_auth_failure(state: &RelayState, peer: SocketAddr, r: &dyn std::fmt::Display) {
    state.metrics.auth_failures.fetch_add(1, Relaxed);
    if state.auth_limiter.failed(peer.ip()) {
        tracing::warn!(%peer, reason = %r, limit = state.cfg.limits.auth_failures_per_minute,
            "too many failed authentications from this address; refusing its attempts unchecked for the rest of the minute");
    } else if state.auth_limiter.admit(peer.ip()) == Admission::Check {
        tracing::warn!(%peer, reason = %r, "authentication failed");
    } else {
        tracing::debug!(%peer, reason = %r, "authentication failed (address rate limited)");
    }
}

/// How long a failed proof from `peer` waits for its answer: nothing normally, [`FAILURE_DELAY`]
/// once the address is over `auth_failures_per_minute` (counted as a rate-limited refusal). Proofs
/// are checked either way, so a valid key is never refused for what others did from its address;
/// a guesser only gets slower answers, and its failures are no longer logged one by one.
pub(super) fn failure_delay(state: &RelayState, peer: SocketAddr) -> std::time::Duration {
    match state.auth_limiter.admit(peer.ip()) {
        Admission::Check => std::time::Duration::ZERO,
        Admission::Refuse(_) => FAILURE_DELAY,
    }
}

/// The wait before answering a failed proof from an address over its failure limit. Checking a
/// proof costs one HMAC (or one Ed25519 verification), far less than the handshakes before it; the
/// delay caps how fast one connection can guess.
pub(super) const FAILURE_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// Count a rate-limited failure and wait [`FAILURE_DELAY`] when `delay` says so.
pub(super) async fn slow_failure(state: &RelayState, delay: std::time::Duration) {
    if !delay.is_zero() {
        state.metrics.refused(Refusal::RateLimited);
        tokio::time::sleep(delay).await;
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
        serve_mux(state, source, sink, peer, nonce).await;
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
    let fail_delay = failure_delay(&state, peer);
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
    let Some(upstream) = connect_and_reply(&state, &mut io, &addr, peer).await else {
        let _ = tokio::time::timeout(state.cfg.limits.handshake_timeout, io.shutdown()).await;
        return;
    };
    let _a = ActiveGuard::new(&state.metrics.streams_active);
    let activity = Activity::new();
    let mut io = Watched::new(io, activity.clone());
    let copied = {
        let copy = async {
            match upstream {
                Upstream::Tcp(mut t) => tokio::io::copy_bidirectional_with_sizes(&mut io, &mut t, 32 * 1024, 32 * 1024).await,
                Upstream::Listener(mut l) => tokio::io::copy_bidirectional_with_sizes(&mut io, &mut l, 32 * 1024, 32 * 1024).await,
            }
        };
        tokio::select! {
            r = copy => Some(r),
            _ = drained_and_idle(&state, &activity) => None,
        }
    };
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
        ServerHandshakeError::Auth(r) => log_auth_failure(state, peer, r),
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

/// Where an admitted stream goes: a TCP target, or a listener's stream.
enum Upstream {
    Tcp(TcpStream),
    Listener(MuxStream),
}

/// The listener a CONNECT names, if it should be routed to one: a registered name, `NAME.<domain>`,
/// or a bare key-derived name (offline listeners get "host unreachable", not an allowlist refusal).
fn listener_route(state: &RelayState, addr: &Address) -> Option<String> {
    let Address::DomainAddress(d, _) = addr else {
        return None;
    };
    let host = std::str::from_utf8(d).ok()?;
    let name = super::listen::listener_name(host, &state.cfg.domain)?;
    let explicit = host.trim_end_matches('.').len() > name.len();
    let looks_derived = name.len() == crate::identity::DERIVED_NAME_LEN && name.bytes().all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b));
    (explicit || looks_derived || state.registry.contains(&name)).then_some(name)
}

/// Connect to the requested target (or listener) and answer the CONNECT; `None` if refused
/// (already answered).
async fn connect_and_reply<S: AsyncWrite + Unpin>(state: &RelayState, io: &mut S, addr: &Address, peer: SocketAddr) -> Option<Upstream> {
    if let Some(name) = listener_route(state, addr) {
        let port = match addr {
            Address::DomainAddress(_, p) => *p,
            Address::SocketAddress(sa) => sa.port(),
        };
        let header = crate::protocol::StreamHeader { via: crate::protocol::Via::Dial, port, client: peer.to_string() };
        return match super::listen::open_to_listener(state, &name, header, state.cfg.limits.connect_timeout).await {
            Ok(stream) => {
                if socks::write_reply(io, Reply::Succeeded, None).await.is_err() {
                    return None;
                }
                state.metrics.streams_total.fetch_add(1, Relaxed);
                tracing::debug!(%peer, listener = %name, "stream connected to a listener");
                Some(Upstream::Listener(stream))
            }
            Err(e) => {
                state.metrics.refused(e.refusal());
                tracing::debug!(%peer, listener = %name, error = ?e, "listener not reached");
                let reply = match e {
                    super::listen::RouteError::Offline => Reply::HostUnreachable,
                    super::listen::RouteError::Busy => Reply::ConnectionRefused,
                    super::listen::RouteError::Timeout => Reply::TtlExpired,
                };
                let _ = socks::write_reply(io, reply, None).await;
                None
            }
        };
    }
    match connect_target(addr, &state.access().allow, &state.resolver, state.cfg.limits.connect_timeout).await {
        Ok(tcp) => {
            let bound = tcp.local_addr().ok();
            if socks::write_reply(io, Reply::Succeeded, bound).await.is_err() {
                return None;
            }
            state.metrics.streams_total.fetch_add(1, Relaxed);
            tracing::debug!(%peer, target = %Target::from_address(addr).map(|t| t.to_string()).unwrap_or_default(), "stream connected");
            Some(Upstream::Tcp(tcp))
        }
        Err(f) => {
            state.metrics.refused(f.reason);
            if f.reason == Refusal::NotAllowed {
                tracing::info!(%peer, detail = %f.detail, "target refused by the allowlist");
            } else {
                tracing::debug!(%peer, detail = %f.detail, "target connect failed");
            }
            let _ = socks::write_reply(io, f.reply, None).await;
            None
        }
    }
}

/// Multiplexed mode over a WebSocket.
pub(super) async fn serve_ws_mux(state: Arc<RelayState>, mut ws: WebSocketStream<BoxIo>, peer: SocketAddr) {
    let nonce = fresh_nonce();
    if ws.send(Message::Binary(ServerConnect::new(&nonce).encode_bytes().into())).await.is_err() {
        return;
    }
    let (source, sink) = ws_frames(ws);
    serve_mux(state, source, sink, peer, nonce).await;
}

async fn serve_mux(state: Arc<RelayState>, mut source: FrameSource, mut sink: FrameSink, peer: SocketAddr, nonce: [u8; 32]) {
    let hello = match tokio::time::timeout(state.cfg.limits.handshake_timeout, source.next()).await {
        Err(_) => {
            state.metrics.refused(Refusal::HandshakeTimeout);
            tracing::debug!(%peer, "session hello timed out");
            return;
        }
        Ok(Some(Ok(b))) => b,
        Ok(_) => return,
    };
    if hello.first() == Some(&crate::protocol::LISTEN_HELLO_TAG) {
        super::listen::serve_listener(state, source, sink, peer, nonce, &hello).await;
        return;
    }
    let fail_delay = failure_delay(&state, peer);
    let verdict = match Hello::decode(&hello) {
        Ok(h) => state.access().auth_keys.verify(&nonce, &h.date, &h.sig, SystemTime::now()),
        Err(e) => {
            state.metrics.refused(Refusal::Malformed);
            let ack = HelloAck { refusal: Some((ErrorCode::Protocol, e.message().to_string())) };
            let _ = sink.send(ack.encode()).await;
            return;
        }
    };
    let kid = match verdict {
        Ok(kid) => kid,
        Err(r) => {
            log_auth_failure(&state, peer, &r);
            slow_failure(&state, fail_delay).await;
            let ack = HelloAck { refusal: Some((r.code(), rejection_message(&r, &state))) };
            let _ = sink.send(ack.encode()).await;
            let _ = sink.close().await;
            return;
        }
    };
    super::guard::handshake_finished();
    let limit = state.cfg.limits.max_sessions_per_key;
    let Some(_counted) = state.key_sessions.enter(kid, limit) else {
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
    state.metrics.sessions_mux.fetch_add(1, Relaxed);
    let _s = ActiveGuard::new(&state.metrics.sessions_active);
    let (session, _close) = server_session(&state, source, sink);
    tracing::debug!(%peer, "multiplexed session authenticated");
    let mut draining = false;
    // While draining, check now and then whether the last stream has ended so the session can close
    // before the drain deadline (idle sessions close at once).
    let mut drain_tick = tokio::time::interval(std::time::Duration::from_millis(50));
    loop {
        tokio::select! {
            s = session.accept() => match s {
                Some(stream) => { state.tasks.spawn(serve_mux_stream(state.clone(), stream, peer, session.clone())); }
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
}

async fn serve_mux_stream(state: Arc<RelayState>, mut stream: MuxStream, peer: SocketAddr, session: Session) {
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
    let Some(upstream) = connect_and_reply(&state, &mut stream, &addr, peer).await else {
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
        Upstream::Tcp(t) => tokio::select! {
            r = crate::stream::bridge(stream, t) => r,
            _ = killed() => return,
        },
        Upstream::Listener(mut l) => {
            // splice counts (dialer → listener, listener → dialer); bridge counts (to the dialer,
            // from the dialer). A cut-off side resets both inside splice; a relay shutdown resets
            // both here, so neither end takes the cut-off stream for a finished one (dropping them
            // would send FIN).
            let r = tokio::select! {
                r = crate::stream::splice(&mut stream, &mut l) => r.map(|(to_listener, to_dialer)| (to_dialer, to_listener)),
                _ = killed() => Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "the relay shut down")),
            };
            if r.is_err() {
                stream.reset(ErrorCode::Closed);
                l.reset(ErrorCode::Closed);
            }
            r
        }
    };
    match bridged {
        Ok((down, up)) => count_bytes(&state, up, down),
        Err(e) => tracing::debug!(%peer, error = %e, "stream ended with an error"),
    }
}
