//! The relay's public HTTP port: requests whose `Host` is `NAME.<domain>` are forwarded to the
//! listener registered as `NAME` over HTTP/1.1 (hyper on both sides). A client connection keeps
//! its tunnel stream to a listener for its next requests to the same name (keep-alive costs no new
//! stream or local connection), and opens a new one when the name changes or the old one closed. Bodies stream in both directions with bounded buffers (the mux window), WebSocket and
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

/// A client connection's open HTTP connection to a listener, reused while the name stays the same.
struct Upstream {
    name: String,
    sender: Sender,
}

type Sender = hyper::client::conn::http1::SendRequest<Incoming>;

type UpstreamSlot = Arc<tokio::sync::Mutex<Option<Upstream>>>;

/// Serve one public HTTP connection (keep-alive: many requests).
pub(super) async fn serve(state: Arc<RelayState>, sock: TcpStream, peer: SocketAddr) {
    let st = state.clone();
    let slot: UpstreamSlot = Arc::default();
    let svc = hyper::service::service_fn(move |req| {
        let (st, slot) = (st.clone(), slot.clone());
        async move { Ok::<_, std::convert::Infallible>(route(st, req, peer, &slot).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(state.cfg.limits.http_header_timeout)
        .max_buf_size(state.cfg.limits.http_max_header_bytes)
        .serve_connection(TokioIo::new(sock), svc)
        .with_upgrades();
    tokio::select! {
        r = conn => if let Err(e) = r { tracing::debug!(%peer, error = %e, "public HTTP connection ended with an error") },
        _ = state.kill.cancelled() => {}
    }
}

/// Open a tunnel stream to the listener `name` and start an HTTP/1.1 client connection on it; the
/// error is the response the client gets (502/503/504).
async fn connect_upstream(state: &Arc<RelayState>, name: &str, peer: SocketAddr) -> Result<Sender, Response<Body>> {
    let header = StreamHeader { via: Via::Http, port: 0, client: peer.to_string() };
    let limit = state.cfg.limits.http_timeout;
    let stream = open_to_listener(state, name, header, limit).await.map_err(|e| {
        state.metrics.refused(e.refusal());
        match e {
            RouteError::Offline => text(StatusCode::BAD_GATEWAY, format!("no listener named {name:?} is online; start it with `tunnel listen`")),
            RouteError::Busy => text(StatusCode::SERVICE_UNAVAILABLE, format!("the listener {name:?} is not accepting connections right now")),
            RouteError::Timeout => text(
                StatusCode::GATEWAY_TIMEOUT,
                format!("the listener {name:?} did not accept the connection within {limit:?} (TUNNEL_HTTP_TIMEOUT)"),
            ),
        }
    })?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| text(StatusCode::BAD_GATEWAY, format!("could not speak HTTP to the listener {name:?}: {e}")))?;
    state.tasks.spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

/// Remove the hop-by-hop headers (RFC 9110 section 7.6.1): they describe one connection, and the
/// relay holds two (client and listener) whose keep-alive is its own business: a listener closing
/// its connection must not close the client's. An upgrade keeps `Connection: upgrade` and
/// `Upgrade`, which it needs end to end.
fn strip_hop_by_hop(headers: &mut http::HeaderMap, upgrade: bool) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .filter(|t| !t.is_empty() && !(upgrade && t == "upgrade"))
        .collect();
    for n in named {
        headers.remove(n.as_str());
    }
    for h in ["keep-alive", "proxy-connection", "te", "trailer"] {
        headers.remove(h);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

fn bad_gateway(name: &str, e: hyper::Error) -> Response<Body> {
    text(StatusCode::BAD_GATEWAY, format!("the listener {name:?} failed to answer: {e}"))
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
        // A port follows a name, an IPv4 address or a bracketed IPv6 address (never a bare one).
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && (!h.contains(':') || h.ends_with(']')) => h.to_string(),
        _ => raw,
    };
    Some(host.trim_end_matches('.').to_ascii_lowercase())
}

async fn route(state: Arc<RelayState>, mut req: Request<Incoming>, peer: SocketAddr, slot: &UpstreamSlot) -> Response<Body> {
    state.metrics.http_requests.fetch_add(1, Relaxed);
    let domain = &state.cfg.domain;
    let Some(host) = request_host(&req) else {
        return text(StatusCode::BAD_REQUEST, "no Host header; send Host: NAME.".to_string() + domain);
    };
    let Some(name) = host.strip_suffix(domain.as_str()).and_then(|p| p.strip_suffix('.')).filter(|n| crate::identity::valid_name(n)) else {
        return text(StatusCode::NOT_FOUND, format!("{host} is not served here; this relay routes NAME.{domain} to the listener registered as NAME"));
    };
    // The previous request's connection to this listener, if it is still usable.
    let reused = match slot.lock().await.take() {
        Some(mut up) if up.name == name => {
            let ready = tokio::time::timeout(state.cfg.limits.http_timeout, up.sender.ready()).await;
            matches!(ready, Ok(Ok(()))).then_some(up.sender)
        }
        _ => None,
    };
    let reused_one = reused.is_some();
    let mut sender = match reused {
        Some(s) => s,
        None => match connect_upstream(&state, name, peer).await {
            Ok(s) => s,
            Err(refusal) => return refusal,
        },
    };

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
    strip_hop_by_hop(req.headers_mut(), upgrade_requested);
    let client_upgrade = upgrade_requested.then(|| hyper::upgrade::on(&mut req));
    let exchange = async {
        match sender.try_send_request(req).await {
            // The kept connection closed before the request went out: once more on a new one.
            Err(mut e) if reused_one && e.message().is_some() => {
                let req = e.take_message().expect("checked above");
                sender = connect_upstream(&state, name, peer).await?;
                sender.send_request(req).await.map_err(|e| bad_gateway(name, e))
            }
            r => r.map_err(|e| bad_gateway(name, e.into_error())),
        }
    };
    let answer = tokio::time::timeout(state.cfg.limits.http_timeout, exchange).await;
    let mut resp = match answer {
        Err(_) => {
            state.metrics.refused(Refusal::Timeout);
            return text(
                StatusCode::GATEWAY_TIMEOUT,
                format!("the listener {name:?} did not answer within {:?} (TUNNEL_HTTP_TIMEOUT)", state.cfg.limits.http_timeout),
            );
        }
        Ok(Err(refusal)) => return refusal,
        Ok(Ok(r)) => r,
    };
    let upgrading = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(resp.headers_mut(), upgrading);
    if !upgrade_requested && !upgrading {
        // Keep it for this client connection's next request (hyper makes it wait for this
        // response's body before sending another).
        *slot.lock().await = Some(Upstream { name: name.to_string(), sender });
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let listener_upgrade = hyper::upgrade::on(&mut resp);
            let st = state.clone();
            state.tasks.spawn(async move {
                let (Ok(c), Ok(l)) = (client_upgrade.await, listener_upgrade.await) else {
                    return;
                };
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
