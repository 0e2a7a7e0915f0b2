//! The relay's HTTP front on the tunnel endpoint: the health path, `/metrics` (only while no
//! admin endpoint is configured: then it is served there, behind the token), and WebSocket
//! upgrades, which choose the mode (`libtunnel.v1` subprotocol → multiplexed, none → Emissary
//! classic) and hand the upgraded connection to `session`. A connection that opens with HTTP/2's
//! preface goes to `grpc_endpoint` (the gRPC transport).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

use super::metrics::Refusal;
use super::{session, RelayState};
use crate::protocol::{EARLY_DECLINED, EARLY_HELLO_HEADER, EARLY_TAKEN, MUX_SUBPROTOCOL};
use crate::transport::{ws_server_config, BoxIo, GrowingReads, CLASSIC_READ_AHEAD, MUX_MAX_MESSAGE, MUX_READ_AHEAD};

type Body = Full<Bytes>;

/// How an HTTP/2 connection with prior knowledge opens (RFC 9113 §3.4), up to its first blank line.
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\n";

/// Largest request head on the tunnel endpoint.
const HEAD_MAX: usize = 64 * 1024;

struct Upgrade {
    on_upgrade: hyper::upgrade::OnUpgrade,
    mux: bool,
    /// The judged early hello of the request, if it carried one (multiplexed only).
    early: Option<session::Early>,
}

/// Serve HTTP/1.1 on one connection; if it upgrades to a WebSocket, run the tunnel session on it.
/// The HTTP phase and the session each have their own boxed state, so an upgraded connection
/// no longer holds the HTTP server's.
pub(super) async fn serve(state: Arc<RelayState>, io: BoxIo, peer: SocketAddr) {
    // Each boxed in a statement of its own (a temporary would keep its room in this state).
    let http = Box::pin(serve_http(state.clone(), io, peer));
    let Some((upgraded, mux, early)) = http.await else { return };
    let session = Box::pin(serve_upgraded(state, upgraded, mux, early, peer));
    session.await;
}

/// The HTTP phase: health, metrics, or an upgrade (returned with its mode).
async fn serve_http(state: Arc<RelayState>, mut io: BoxIo, peer: SocketAddr) -> Option<(hyper::upgrade::Upgraded, bool, Option<session::Early>)> {
    // The request head first, into a buffer as large as what arrived: hyper's buffers (24 KiB)
    // exist only once there is a whole request to parse (see `read_request_head`).
    let head = crate::transport::read_request_head(&mut io, HEAD_MAX).await?;
    let h2 = head.starts_with(HTTP2_PREFACE);
    let io: BoxIo = Box::new(crate::transport::Prefixed::new(head, io));
    if h2 {
        // HTTP/2 with prior knowledge: the gRPC transport (as nginx's grpc_pass connects).
        Box::pin(super::grpc_endpoint::serve(state, io, peer)).await;
        return None;
    }
    let (tx, rx) = oneshot::channel::<Upgrade>();
    let tx = Arc::new(Mutex::new(Some(tx)));
    let st = state.clone();
    let svc = hyper::service::service_fn(move |req| {
        let (st, tx) = (st.clone(), tx.clone());
        async move { Ok::<_, Infallible>(route(&st, req, &tx)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(state.cfg.limits.handshake_timeout)
        .max_buf_size(HEAD_MAX)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
        if e.is_timeout() {
            state.metrics.refused(Refusal::HandshakeTimeout);
        }
        return None;
    }
    let up = rx.await.ok()?;
    match up.on_upgrade.await {
        Ok(u) => Some((u, up.mux, up.early)),
        Err(e) => {
            tracing::debug!(%peer, error = %e, "WebSocket upgrade failed");
            None
        }
    }
}

/// The session on an upgraded connection.
async fn serve_upgraded(state: Arc<RelayState>, upgraded: hyper::upgrade::Upgraded, mux: bool, early: Option<session::Early>, peer: SocketAddr) {
    let early = match early {
        // The client reconnects and signs this relay's nonce; the frames it sent behind the
        // request are dropped unread.
        Some(session::Early::Declined) => return,
        Some(session::Early::Taken(verdict)) => Some(verdict),
        None => None,
    };
    // Small reads until the peer authenticates, large ones after (see `GrowingReads`).
    let read_ahead = if mux { MUX_READ_AHEAD } else { CLASSIC_READ_AHEAD };
    let io: BoxIo = Box::new(GrowingReads::new(Box::new(TokioIo::new(upgraded)), read_ahead, super::guard::finished_flag()));
    if mux {
        let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(ws_server_config(MUX_MAX_MESSAGE))).await;
        session::serve_ws_mux(state, ws, peer, early).await;
    } else {
        // Classic WebSockets are read frame by frame (`classic_ws`), not by tungstenite.
        session::serve_ws_classic(state, io, peer).await;
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts are valid")
}

fn refuse(status: StatusCode, reason: String) -> Response<Body> {
    json(status, serde_json::json!({ "ok": false, "reason": reason }))
}

fn route(state: &RelayState, mut req: Request<Incoming>, tx: &Mutex<Option<oneshot::Sender<Upgrade>>>) -> Response<Body> {
    let path = req.uri().path();
    if req.method() != Method::GET {
        return refuse(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here (WebSocket upgrades, the health path and /metrics)".into());
    }
    // As Emissary's router: the health route matches by prefix (`/health` also answers
    // `/healthz`), with the body Go writes: `{"key_ids":[...],"ok":true}`, ids in config order,
    // under the content type Go's sniffing gives it.
    let hp = state.cfg.health_path.as_str();
    if path.starts_with(hp) {
        let body = serde_json::json!({ "ok": true, "key_ids": state.access().auth_keys.kids_in_config_order() });
        return Response::builder()
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("static response parts are valid");
    }
    if path == "/metrics" {
        if state.cfg.admin_listen.is_some() {
            // With an admin endpoint, the counters (listener names among them) are its, behind
            // the token; this port is open to anyone.
            return refuse(StatusCode::NOT_FOUND, "/metrics is served on this relay's admin endpoint (admin_listen), with the admin token".into());
        }
        return Response::builder()
            .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(state.metrics_text())))
            .expect("static response parts are valid");
    }
    let is_upgrade = req.headers().get(header::UPGRADE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !is_upgrade {
        // 400 as Emissary (gorilla/websocket's upgrader) answers.
        return refuse(StatusCode::BAD_REQUEST, format!("this is a libtunnel relay: connect with a WebSocket, or GET {hp} for health"));
    }
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return refuse(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key".into());
    };
    if req.headers().get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return refuse(StatusCode::BAD_REQUEST, "only WebSocket version 13 is supported".into());
    }
    let offered: Vec<String> = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    let mux = offered.iter().any(|p| p == MUX_SUBPROTOCOL);
    if !offered.is_empty() && !mux {
        state.metrics.refused(Refusal::Malformed);
        return refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "unsupported WebSocket subprotocol {offered:?}: this relay speaks {MUX_SUBPROTOCOL:?}, or no subprotocol for Emissary classic mode"
            ),
        );
    }
    let Some(tx) = tx.lock().unwrap_or_else(|p| p.into_inner()).take() else {
        return refuse(StatusCode::BAD_REQUEST, "this connection was already upgraded".into());
    };
    // An early hello (multiplexed only; classic mode ignores the header, as Emissary would).
    let early = match req.headers().get(EARLY_HELLO_HEADER) {
        Some(v) if mux => Some(session::judge_early(state, v.as_bytes(), std::time::SystemTime::now())),
        _ => None,
    };
    let early_header = match &early {
        Some(session::Early::Taken(_)) => Some(EARLY_TAKEN),
        Some(session::Early::Declined) => Some(EARLY_DECLINED),
        None => None,
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let _ = tx.send(Upgrade { on_upgrade, mux, early });
    let mut resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, derive_accept_key(key.as_bytes()));
    if mux {
        resp = resp.header(header::SEC_WEBSOCKET_PROTOCOL, MUX_SUBPROTOCOL);
    }
    if let Some(v) = early_header {
        resp = resp.header(EARLY_HELLO_HEADER, v);
    }
    resp.body(Full::new(Bytes::new())).expect("static response parts are valid")
}
