//! The relay's public HTTP port: requests whose `Host` is `NAME.<domain>` are forwarded to the
//! listener registered as `NAME`, one tunnel stream per request, over HTTP/1.1 (hyper on both
//! sides). Bodies stream in both directions with bounded buffers (the mux window), WebSocket and
//! other upgrades pass through, and the client's address goes along in `X-Forwarded-For` and
//! `Forwarded`. Errors: 404 for a host outside the domain, 502 for an unknown or offline name,
//! 503 when the listener refuses, 504 when it does not answer within `http_timeout`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::listen::{open_to_listener, RouteError};
use super::metrics::Refusal;
use super::RelayState;
use crate::protocol::{StreamHeader, Via};

type Body = Either<Incoming, Full<Bytes>>;

/// Serve one public HTTP connection (keep-alive: many requests).
pub(super) async fn serve(state: Arc<RelayState>, sock: TcpStream, peer: SocketAddr) {
    let st = state.clone();
    let svc = hyper::service::service_fn(move |req| {
        let st = st.clone();
        async move { Ok::<_, std::convert::Infallible>(route(st, req, peer).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(state.cfg.limits.handshake_timeout)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(sock), svc)
        .with_upgrades();
    tokio::select! {
        r = conn => if let Err(e) = r { tracing::debug!(%peer, error = %e, "public HTTP connection ended with an error") },
        _ = state.kill.cancelled() => {}
    }
}

fn text(status: StatusCode, msg: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Either::Right(Full::new(Bytes::from(msg + "\n"))))
        .expect("static response parts are valid")
}

/// The host a request names, without port, lower-case.
fn request_host(req: &Request<Incoming>) -> Option<String> {
    let raw = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string).or_else(|| req.uri().host().map(str::to_string))?;
    let host = match raw.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(']') || raw.starts_with('[') => h.to_string(),
        _ => raw,
    };
    Some(host.trim_end_matches('.').to_ascii_lowercase())
}

async fn route(state: Arc<RelayState>, mut req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    state.metrics.http_requests.fetch_add(1, Relaxed);
    let domain = &state.cfg.domain;
    let Some(host) = request_host(&req) else {
        return text(StatusCode::BAD_REQUEST, "no Host header; send Host: NAME.".to_string() + domain);
    };
    let Some(name) = host.strip_suffix(domain.as_str()).and_then(|p| p.strip_suffix('.')).filter(|n| crate::identity::valid_name(n)) else {
        return text(StatusCode::NOT_FOUND, format!("{host} is not served here; this relay routes NAME.{domain} to the listener registered as NAME"));
    };
    let header = StreamHeader { via: Via::Http, port: 0, client: peer.to_string() };
    let stream = match open_to_listener(&state, name, header, state.cfg.limits.http_timeout).await {
        Ok(s) => s,
        Err(e) => {
            state.metrics.refused(e.refusal());
            return match e {
                RouteError::Offline => text(StatusCode::BAD_GATEWAY, format!("no listener named {name:?} is online; start it with `tunnel listen`")),
                RouteError::Busy => text(StatusCode::SERVICE_UNAVAILABLE, format!("the listener {name:?} is not accepting connections right now")),
                RouteError::Timeout => text(StatusCode::GATEWAY_TIMEOUT, format!("the listener {name:?} did not accept the connection within {:?} (TUNNEL_HTTP_TIMEOUT)", state.cfg.limits.http_timeout)),
            };
        }
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
        Ok(x) => x,
        Err(e) => return text(StatusCode::BAD_GATEWAY, format!("could not speak HTTP to the listener {name:?}: {e}")),
    };
    state.tasks.spawn(async move {
        let _ = conn.with_upgrades().await;
    });

    // Forwarding headers: append to any X-Forwarded-For chain, and say which host and scheme the
    // client used.
    let client_ip = peer.ip().to_string();
    let headers = req.headers_mut();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {client_ip}"),
        None => client_ip.clone(),
    };
    let for_value = if peer.is_ipv6() { format!("\"[{client_ip}]\"") } else { client_ip.clone() };
    let host_header = headers.get(header::HOST).cloned();
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    if let Some(h) = host_header {
        headers.insert("x-forwarded-host", h.clone());
        if let Ok(v) = HeaderValue::from_str(&format!("for={for_value};host={};proto=http", h.to_str().unwrap_or_default())) {
            headers.append(header::FORWARDED, v);
        }
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));

    let upgrade_requested = req.headers().contains_key(header::UPGRADE);
    let client_upgrade = upgrade_requested.then(|| hyper::upgrade::on(&mut req));
    let answer = tokio::time::timeout(state.cfg.limits.http_timeout, sender.send_request(req)).await;
    let mut resp = match answer {
        Err(_) => {
            state.metrics.refused(Refusal::Timeout);
            return text(
                StatusCode::GATEWAY_TIMEOUT,
                format!("the listener {name:?} did not answer within {:?} (TUNNEL_HTTP_TIMEOUT)", state.cfg.limits.http_timeout),
            );
        }
        Ok(Err(e)) => return text(StatusCode::BAD_GATEWAY, format!("the listener {name:?} failed to answer: {e}")),
        Ok(Ok(r)) => r,
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let listener_upgrade = hyper::upgrade::on(&mut resp);
            let st = state.clone();
            state.tasks.spawn(async move {
                let (Ok(c), Ok(l)) = (client_upgrade.await, listener_upgrade.await) else { return };
                let (mut c, mut l) = (TokioIo::new(c), TokioIo::new(l));
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut c, &mut l) => {}
                    _ = st.kill.cancelled() => {}
                }
            });
        }
    }
    resp.map(Either::Left)
}
