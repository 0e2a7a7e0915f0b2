//! The accept path: each endpoint's accept loop, admission (per-source and global limits, a
//! trusted load balancer's PROXY header), the handshake deadline, and the hand-off of each
//! connection to the room that serves it (`tunnel_endpoint`, `session` for raw TCP,
//! `public::endpoint`).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use super::metrics::Refusal;
use super::{guard, proxy_header, public, session, tunnel_endpoint, RelayState};

/// Which of the relay's three ports a connection arrived on.
#[derive(Clone, Copy)]
pub(super) enum Endpoint {
    /// `listen`: WebSocket (over TLS when configured), health and metrics.
    Tunnel,
    /// `tcp_listen`: sessions on raw TCP.
    RawTcp,
    /// `http_listen`: public HTTP requests routed to listeners by `Host`.
    PublicHttp,
    /// `https_listen`: the same over TLS (h2 by ALPN), and TLS passthrough by SNI.
    PublicHttps,
}

pub(super) async fn accept_loop(state: Arc<RelayState>, listener: TcpListener, endpoint: Endpoint) {
    loop {
        let (mut sock, peer) = tokio::select! {
            _ = state.draining.cancelled() => return,
            x = crate::transport::accept_backoff(&listener) => x,
        };
        if state.cfg.proxy_protocol_from.iter().any(|n| n.contains(&peer.ip())) {
            // A trusted load balancer: the client it names is the source, so admission waits
            // for its PROXY header (bounded by the handshake deadline).
            let st = state.clone();
            state.tasks.spawn(async move {
                match proxy_header::read(&mut sock, st.cfg.limits.handshake_timeout).await {
                    Ok(client) => admit(&st, sock, client.unwrap_or(peer), endpoint),
                    // A TCP health check: connect, close.
                    Err(proxy_header::ProxyError::Closed) => {}
                    Err(why) => {
                        st.metrics.refused(Refusal::Malformed);
                        tracing::info!(%peer, %why, "connection from a load balancer without a valid PROXY header closed");
                    }
                }
            });
            continue;
        }
        admit(&state, sock, peer, endpoint);
    }
}

/// Admit a connection from `peer` (per-source and global limits) and serve it on its own task,
/// or refuse it at once.
fn admit(state: &Arc<RelayState>, sock: TcpStream, peer: SocketAddr, endpoint: Endpoint) {
    // Per-source limits first: a source at its limit is refused here, before the connection
    // costs a task or a buffer, and cannot take the global places others need.
    let ticket = match state.guards.admissions.admit(peer.ip()) {
        Ok(t) => t,
        Err(why) => {
            state.metrics.refused(why);
            tracing::debug!(%peer, reason = ?why, "connection refused at admission");
            refuse_at_once(sock, speaks_plain_http(state, endpoint), why, &state.cfg.limits);
            return;
        }
    };
    let Ok(permit) = state.guards.connections.clone().try_acquire_owned() else {
        state.metrics.refused(Refusal::Overloaded);
        tracing::warn!(%peer, limit = state.cfg.limits.max_connections, "connection limit reached; dropping connection");
        refuse_at_once(sock, speaks_plain_http(state, endpoint), Refusal::Overloaded, &state.cfg.limits);
        return;
    };
    crate::transport::tune_session_socket(&sock);
    let st = state.clone();
    let finished = ticket.finished_flag();
    let fut = guard::with_ticket(ticket, async move {
        let _permit = permit;
        // One deadline for the whole handshake (TLS, upgrade, hello; on the public port the
        // first request head), whichever steps it takes.
        let limit = if matches!(endpoint, Endpoint::PublicHttp | Endpoint::PublicHttps) {
            st.cfg.limits.http_header_timeout
        } else {
            st.cfg.limits.handshake_timeout
        };
        let deadline = async {
            tokio::time::sleep(limit).await;
            if finished.load(std::sync::atomic::Ordering::Relaxed) {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            _ = st.kill.cancelled() => {}
            _ = serve_connection(st.clone(), sock, peer, endpoint) => {}
            _ = deadline => {
                st.metrics.refused(Refusal::HandshakeTimeout);
                tracing::debug!(%peer, "handshake deadline passed; connection closed");
            }
        }
    });
    state.tasks.spawn(fut);
}

/// Whether an endpoint's clients speak plain HTTP first (not raw TCP, not TLS).
fn speaks_plain_http(state: &RelayState, endpoint: Endpoint) -> bool {
    match endpoint {
        Endpoint::Tunnel => state.tls.is_none(),
        Endpoint::PublicHttp => true,
        Endpoint::RawTcp | Endpoint::PublicHttps => false,
    }
}

/// Refuse a just-accepted connection without reading it: plain HTTP endpoints get a one-packet
/// 429 (a per-source limit) or 503 (a global one) naming the setting, raw TCP and TLS a close.
/// Nothing waits: the answer goes out only if the socket takes it at once (a new socket does).
fn refuse_at_once(sock: TcpStream, plain_http: bool, why: Refusal, l: &crate::config::Limits) {
    if plain_http {
        let (status, msg) = match why {
            Refusal::SourceConnections => (
                "429 Too Many Requests",
                format!("too many connections from your address (max_connections_per_source = {})", l.max_connections_per_source),
            ),
            Refusal::SourceHandshakes => (
                "429 Too Many Requests",
                format!("too many unauthenticated connections from your address (max_handshakes_per_source = {})", l.max_handshakes_per_source),
            ),
            Refusal::Handshakes => {
                ("503 Service Unavailable", format!("the relay has too many unauthenticated connections (max_handshakes = {})", l.max_handshakes))
            }
            _ => ("503 Service Unavailable", format!("the relay is at its connection limit (max_connections = {})", l.max_connections)),
        };
        let body = format!("{msg}; retry later\n");
        let answer = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nRetry-After: 10\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        // Take what the client already sent (one small read, never waiting), so closing does not
        // turn into a reset that could destroy the answer before the client reads it.
        let mut scratch = [0u8; 2048];
        let _ = sock.try_read(&mut scratch);
        let _ = sock.try_write(answer.as_bytes());
    }
    drop(sock);
}

async fn serve_connection(state: Arc<RelayState>, sock: TcpStream, peer: SocketAddr, endpoint: Endpoint) {
    // Clients speak first on the HTTP endpoints (TLS included): until their first byte arrives,
    // a connection costs this small task and its socket, not hyper's or rustls's buffers. Each
    // endpoint's state is boxed when it is reached, so the task stays small until then.
    // (The handshake deadline is the caller's.) `peek`, not `readable`: readiness may be
    // reported before any byte is there.
    let mut first = [0u8; 1];
    if !matches!(endpoint, Endpoint::RawTcp) && !matches!(sock.peek(&mut first).await, Ok(1)) {
        return;
    }
    // A TLS ClientHello (record type 0x16, never the first byte of an HTTP request) on a plain
    // tunnel endpoint: a `wss://` client of a `ws://` relay. Closing at once lets it say so now,
    // instead of after the handshake deadline.
    if matches!(endpoint, Endpoint::Tunnel) && state.tls.is_none() && first[0] == 0x16 {
        state.metrics.refused(Refusal::Malformed);
        // Take the ClientHello first, so the close is a FIN (the client sees the end of the
        // handshake), not a reset.
        let _ = sock.try_read(&mut vec![0u8; 16 * 1024]);
        return tracing::info!(%peer, "a TLS handshake on the plain (ws://) tunnel endpoint: the client must use ws://, not wss://");
    }
    // Boxed in a statement of its own: a temporary in the awaiting statement would keep its
    // room in this task's state (debug builds lay out every temporary).
    let serve: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = match endpoint {
        Endpoint::Tunnel => Box::pin(serve_tunnel_endpoint(state, sock, peer)),
        Endpoint::RawTcp => Box::pin(session::serve_raw_tcp(state, sock, peer)),
        Endpoint::PublicHttp => Box::pin(public::endpoint::serve(state, sock, peer)),
        Endpoint::PublicHttps => Box::pin(public::endpoint::serve_tls(state, sock, peer)),
    };
    serve.await
}

/// The tunnel endpoint: TLS when configured, then HTTP (health, metrics, WebSocket upgrades), or
/// HTTP/2 for the gRPC transport when ALPN chose `h2`.
async fn serve_tunnel_endpoint(state: Arc<RelayState>, sock: TcpStream, peer: SocketAddr) {
    let io: crate::transport::BoxIo = match state.tls.clone() {
        Some(tls) => {
            let accept = Box::pin(tls.accept(sock));
            match tokio::time::timeout(state.cfg.limits.handshake_timeout, accept).await {
                // ALPN chose HTTP/2: the gRPC transport.
                Ok(Ok(s)) if s.get_ref().1.alpn_protocol() == Some(b"h2") => {
                    return Box::pin(super::grpc_endpoint::serve(state, Box::new(s), peer)).await;
                }
                Ok(Ok(s)) => Box::new(s),
                Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => {
                    state.metrics.refused(Refusal::HandshakeTimeout);
                    return tracing::debug!(%peer, "TLS handshake timed out");
                }
            }
        }
        None => Box::new(sock),
    };
    tunnel_endpoint::serve(state, io, peer).await
}
