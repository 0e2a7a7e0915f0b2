//! One authenticated tunnel on the relay, per transport and mode: send the `ServerConnect`
//! preamble, authenticate (RFC 1929 per connection in classic mode, the session hello once in
//! multiplexed mode), then serve each stream: SOCKS5 CONNECT → allowlist → target → bridge.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::SystemTime;

use futures_util::{SinkExt, StreamExt};
use socks5_proto::{Address, Reply};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::connect::connect_target;
use super::guard::Admission;
use super::metrics::Refusal;
use super::RelayState;
use crate::auth::{fresh_nonce, AuthRejection};
use crate::error::ErrorCode;
use crate::mux::{FrameSink, FrameSource, MuxConfig, MuxStream, Role, Session};
use crate::protocol::{Hello, HelloAck, ServerConnect, MUX_TCP_MAGIC};
use crate::socks::{self, ServerAuth, ServerHandshakeError, Target};
use crate::transport::{tcp_frames, ws_frames, BoxIo, WsByteStream};

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

/// Whether `peer` may authenticate now; when not, the refusal is counted and its message says
/// when to retry.
pub(super) fn rate_limited(state: &RelayState, peer: SocketAddr) -> Option<String> {
    let Admission::Refuse(wait) = state.auth_limiter.admit(peer.ip()) else {
        return None;
    };
    state.metrics.refused(Refusal::RateLimited);
    let _ = state.auth_limiter.failed(peer.ip());
    tracing::debug!(%peer, "authentication refused unchecked (rate limited)");
    Some(format!(
        "too many failed authentications from {} in the last minute (auth_failures_per_minute = {}); fix the key, then retry in {}s",
        peer.ip(),
        state.cfg.limits.auth_failures_per_minute,
        wait.as_secs() + 1
    ))
}

/// Classic (Emissary) mode over a WebSocket.
pub(super) async fn serve_ws_classic(state: Arc<RelayState>, ws: WebSocketStream<BoxIo>, peer: SocketAddr) {
    let mut io = WsByteStream::new(ws, None);
    let nonce = fresh_nonce();
    if io.write_message(ServerConnect::new(&nonce).encode_bytes().into()).await.is_err() {
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

async fn serve_classic<S: AsyncRead + AsyncWrite + Unpin + Send>(state: Arc<RelayState>, mut io: S, peer: SocketAddr, nonce: [u8; 32]) {
    if rate_limited(&state, peer).is_some() {
        // Emissary's protocol has no way to say why; the connection is closed before its proof
        // is read, and the relay's log says why.
        return;
    }
    let access = state.access();
    let auth = ServerAuth::Proof { keys: &access.auth_keys, nonce: &nonce };
    let addr = match tokio::time::timeout(state.cfg.limits.handshake_timeout, socks::server_handshake(&mut io, auth)).await {
        Err(_) => {
            state.metrics.refused(Refusal::HandshakeTimeout);
            tracing::debug!(%peer, "classic handshake timed out");
            return;
        }
        Ok(Err(e)) => {
            note_handshake_error(&state, peer, &e);
            let _ = io.shutdown().await;
            return;
        }
        Ok(Ok(a)) => a,
    };
    state.auth_limiter.succeeded(peer.ip());
    super::guard::handshake_finished();
    state.metrics.sessions_classic.fetch_add(1, Relaxed);
    let _s = ActiveGuard::new(&state.metrics.sessions_active);
    let Some(upstream) = connect_and_reply(&state, &mut io, &addr, peer).await else {
        let _ = io.shutdown().await;
        return;
    };
    let _a = ActiveGuard::new(&state.metrics.streams_active);
    let copied = match upstream {
        Upstream::Tcp(mut t) => tokio::io::copy_bidirectional_with_sizes(&mut io, &mut t, 32 * 1024, 32 * 1024).await,
        Upstream::Listener(mut l) => tokio::io::copy_bidirectional_with_sizes(&mut io, &mut l, 32 * 1024, 32 * 1024).await,
    };
    let clean = match copied {
        Ok((up, down)) => {
            count_bytes(&state, up, down);
            true
        }
        // The client closed the tunnel while the target was still sending: Emissary's protocol
        // has no half-close, so that is its normal end.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => true,
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            tracing::warn!(%peer, error = %e, "classic stream dropped");
            false
        }
        Err(e) => {
            tracing::debug!(%peer, error = %e, "classic stream ended with an error");
            false
        }
    };
    if clean {
        // Finish the WebSocket closing handshake (the client may have started it), so it reads a
        // clean close; bounded, as the client may be gone. A stream cut off by an error is dropped
        // without one, so the client reads an error instead of a clean end.
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
    if let Some(why) = rate_limited(&state, peer) {
        let ack = HelloAck { refusal: Some((ErrorCode::AuthFailed, why)) };
        let _ = sink.send(ack.encode()).await;
        let _ = sink.close().await;
        return;
    }
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
            let ack = HelloAck { refusal: Some((r.code(), rejection_message(&r, &state))) };
            let _ = sink.send(ack.encode()).await;
            let _ = sink.close().await;
            return;
        }
    };
    state.auth_limiter.succeeded(peer.ip());
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
            // copy_bidirectional counts (to listener, from listener); bridge counts (down, up).
            let r = tokio::select! {
                r = tokio::io::copy_bidirectional_with_sizes(&mut stream, &mut l, 64 * 1024, 64 * 1024) => r.map(|(up, down)| (down, up)),
                _ = killed() => Err(std::io::Error::new(std::io::ErrorKind::ConnectionAborted, "the relay shut down")),
            };
            if r.is_err() {
                // One side failed (its session died, it was reset, or the relay is shutting down):
                // reset both, so neither end takes the cut-off stream for a finished one (dropping
                // them would send FIN).
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
