//! The relay's HTTP/2 front on the tunnel endpoint: the gRPC session transport
//! (`transport::grpc`). A connection arrives here when TLS chose ALPN `h2`, or when a plain
//! connection opened with HTTP/2's preface (prior knowledge, as nginx `grpc_pass` and Envoy
//! connect upstream). Each `POST /libtunnel.v1.Tunnel/Session` call on it is one multiplexed
//! session (a dialer's call may carry its hello in its headers, as a WebSocket upgrade does), served by `session` exactly as one over a WebSocket; a proxy in front may carry
//! several clients' calls on one connection, so the calls run side by side in this connection's
//! task (which keeps the accept loop's per-connection guards in scope). Anything else is answered
//! with gRPC's UNIMPLEMENTED.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use http::{Method, Request, Response, StatusCode};

use super::metrics::Refusal;
use super::{session, RelayState};
use crate::protocol::{EARLY_DECLINED, EARLY_HELLO_HEADER, EARLY_TAKEN};
use crate::transport::grpc::{self, End, Fault, GrpcSink, GrpcSource};
use crate::transport::BoxIo;

/// Most sessions at once on one HTTP/2 connection (a proxy's connection may carry many clients').
const MAX_SESSIONS_PER_CONNECTION: u32 = 256;

type SessionFuture = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Serve HTTP/2 on `io` until the peer closes it: every session call on it, side by side.
pub(super) async fn serve(state: Arc<RelayState>, io: BoxIo, peer: SocketAddr) {
    let handshake = grpc::server_builder(MAX_SESSIONS_PER_CONNECTION).handshake::<_, Bytes>(io);
    let mut conn = match tokio::time::timeout(state.cfg.limits.handshake_timeout, handshake).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "HTTP/2 handshake failed"),
        Err(_) => {
            state.metrics.refused(Refusal::HandshakeTimeout);
            return tracing::debug!(%peer, "HTTP/2 handshake timed out");
        }
    };
    let mut sessions: FuturesUnordered<SessionFuture> = FuturesUnordered::new();
    // A connection that carries no session is closed after the handshake deadline.
    let idle = tokio::time::sleep(state.cfg.limits.handshake_timeout);
    tokio::pin!(idle);
    let mut closing = false;
    loop {
        tokio::select! {
            call = conn.accept() => match call {
                Some(Ok((req, respond))) => {
                    if let Some(s) = start(&state, req, respond, peer) {
                        sessions.push(s);
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "HTTP/2 connection ended with an error");
                    break;
                }
                None => break,
            },
            Some(()) = sessions.next(), if !sessions.is_empty() => {
                if sessions.is_empty() {
                    idle.as_mut().reset(tokio::time::Instant::now() + state.cfg.limits.handshake_timeout);
                }
            }
            () = &mut idle, if sessions.is_empty() && !closing => {
                // A GOAWAY; `accept` ends once the peer has closed.
                conn.graceful_shutdown();
                closing = true;
            }
        }
    }
    // The connection is gone: its sessions' streams fail, and they end.
    while sessions.next().await.is_some() {}
}

/// One call: a session when it is the session method, else UNIMPLEMENTED.
fn start(
    state: &Arc<RelayState>,
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    peer: SocketAddr,
) -> Option<SessionFuture> {
    let grpc_call =
        req.method() == Method::POST && req.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(is_grpc_proto);
    if !grpc_call || req.uri().path() != grpc::SESSION_PATH {
        state.metrics.refused(Refusal::Malformed);
        let why = if grpc_call {
            format!("unknown method {}: this is a libtunnel relay, which serves {}", req.uri().path(), grpc::SESSION_PATH)
        } else {
            format!("this is a libtunnel relay's HTTP/2 port: it serves the gRPC call {} (content-type application/grpc)", grpc::SESSION_PATH)
        };
        let mut answer = Response::builder()
            .status(StatusCode::OK)
            .header(http::header::CONTENT_TYPE, grpc::CONTENT_TYPE)
            .body(())
            .expect("static response parts are valid");
        answer.headers_mut().extend(grpc::status_headers(grpc::GRPC_UNIMPLEMENTED, Some(&why)));
        let _ = respond.send_response(answer, true);
        return None;
    }
    // An early hello in the call's headers (dialers; see `protocol::EARLY_HELLO_HEADER`): judged
    // now, the answer says so, and the session starts at the hello's answer, without a preamble.
    let early = req.headers().get(EARLY_HELLO_HEADER).map(|v| session::judge_early(state, v.as_bytes(), std::time::SystemTime::now()));
    let mut answer =
        Response::builder().status(StatusCode::OK).header(http::header::CONTENT_TYPE, grpc::CONTENT_TYPE).header("grpc-encoding", "identity");
    match &early {
        Some(session::Early::Taken(_)) => answer = answer.header(EARLY_HELLO_HEADER, EARLY_TAKEN),
        Some(session::Early::Declined) => {
            // The client calls again and signs this relay's nonce; this call ends here.
            let mut declined = Response::builder()
                .status(StatusCode::OK)
                .header(http::header::CONTENT_TYPE, grpc::CONTENT_TYPE)
                .header(EARLY_HELLO_HEADER, EARLY_DECLINED)
                .body(())
                .expect("static response parts are valid");
            declined.headers_mut().extend(grpc::status_headers(grpc::GRPC_OK, None));
            let _ = respond.send_response(declined, true);
            return None;
        }
        None => {}
    }
    let answer = answer.body(()).expect("static response parts are valid");
    let send = match respond.send_response(answer, false) {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "could not answer a gRPC session call");
            return None;
        }
    };
    let fault = Fault::default();
    let source = Box::pin(GrpcSource::new(req.into_body()).reporting_to(fault.clone()));
    let sink = Box::pin(GrpcSink::new(send, End::Trailers).reporting_from(fault));
    match early {
        Some(session::Early::Taken(verdict)) => {
            Some(Box::pin(session::serve_dialer(state.clone(), crate::session::Link::frames(source, sink), peer, verdict)))
        }
        _ => Some(Box::pin(session::serve_framed_mux(state.clone(), source, sink, peer))),
    }
}

/// Whether a content type is gRPC with protobuf messages (`application/grpc`, `application/grpc+proto`,
/// with parameters); gRPC-Web (`application/grpc-web…`) frames messages otherwise and is not served.
fn is_grpc_proto(v: &str) -> bool {
    let t = v.split(';').next().unwrap_or("").trim();
    t.eq_ignore_ascii_case(grpc::CONTENT_TYPE) || t.eq_ignore_ascii_case("application/grpc+proto")
}

#[cfg(test)]
mod tests {
    #[test]
    fn grpc_content_types() {
        for ok in ["application/grpc", "application/grpc+proto", "application/grpc; charset=utf-8"] {
            assert!(super::is_grpc_proto(ok), "{ok}");
        }
        for no in ["application/grpc-web", "application/grpc-web+proto", "application/grpc+json", "text/plain", ""] {
            assert!(!super::is_grpc_proto(no), "{no}");
        }
    }
}
