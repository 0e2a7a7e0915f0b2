//! The relay's public HTTP port: requests whose `Host` is `NAME.<domain>` are forwarded to the
//! listener registered as `NAME` over HTTP/1.1 (hyper on both sides). A client connection keeps
//! its tunnel stream to a listener for its next requests to the same name (keep-alive costs no new
//! stream or local connection), and opens a new one when the name changes or the old one closed. Bodies stream in both directions with bounded buffers (the mux window), WebSocket and
//! other upgrades pass through, and the client's address goes along in `X-Forwarded-For` and
//! `Forwarded`. Errors: 404 for a host outside the domain, 502 for an unknown or offline name,
//! 503 when the listener refuses, 504 when it does not answer within `http_timeout`.
//!
//! Bounded per request: a client at `http_max_requests_per_source` requests in progress gets 429,
//! a listener at `http_max_requests_per_listener` 503 (both with `Retry-After`); a request is in
//! progress until its response body ends. A body the listener does not read waits in the mux
//! stream's window; the relay itself holds at most its read buffer (`http_max_header_bytes`)
//! and [`UPSTREAM_BUFFER`] of it.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::guard;
use super::metrics::Refusal;
use super::route::{open_to_listener, RouteError};
use super::RelayState;
use crate::protocol::{StreamHeader, Via};

type Body = Either<Counted, Full<Bytes>>;

/// Most request bytes the relay's HTTP client to a listener queues before the stream takes them
/// (also the largest response head a listener may send, as nginx's proxy buffers bound it). hyper's
/// default (~400 KiB) made each stalled upload cost that much relay memory on top of the stream
/// window.
const UPSTREAM_BUFFER: usize = 16 * 1024;

/// The request's places in the per-source and per-listener counts.
type Permits = (guard::InFlightPermit<IpAddr>, guard::InFlightPermit<String>);

/// A listener's response body that keeps its request counted until the body ends.
pub(super) struct Counted {
    inner: Incoming,
    _permits: Permits,
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A client connection's open HTTP connection to a listener, reused while the name stays the same.
struct Upstream {
    name: String,
    sender: Sender,
}

type Sender = hyper::client::conn::http1::SendRequest<Pieces>;

/// Largest piece of a request body handed to the listener connection at once. hyper's client
/// copies each piece into its write buffer whole (the mux stream takes no vectored writes), and
/// the pieces came as large as the public connection's read buffer (64 KiB): bounding them
/// bounds that buffer to [`UPSTREAM_BUFFER`] plus one piece.
const PIECE: usize = 16 * 1024;

/// A client's request body cut into pieces of at most [`PIECE`] bytes (slices of the same
/// buffers: nothing is copied).
pub(super) struct Pieces {
    inner: Incoming,
    rest: Bytes,
}

impl hyper::body::Body for Pieces {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        if this.rest.is_empty() {
            match std::task::ready!(std::pin::Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.rest = data,
                    Err(other) => return Poll::Ready(Some(Ok(other))),
                },
                other => return Poll::Ready(other),
            }
        }
        let n = this.rest.len().min(PIECE);
        Poll::Ready(Some(Ok(hyper::body::Frame::data(this.rest.split_to(n)))))
    }
    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut h = hyper::body::SizeHint::new();
        h.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            h.set_upper(upper + rest);
        }
        h
    }
}

type UpstreamSlot = Arc<tokio::sync::Mutex<Option<Upstream>>>;

/// Serve one public HTTP connection (keep-alive: many requests).
pub(super) async fn serve(state: Arc<RelayState>, mut sock: TcpStream, peer: SocketAddr) {
    // The first request head before hyper's buffers (see `read_request_head`): a slow client
    // holds what it sent, no more.
    let Some(head) = crate::transport::read_request_head(&mut sock, state.cfg.limits.http_max_header_bytes).await else { return };
    let sock = crate::transport::Prefixed::new(head, sock);
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
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(UPSTREAM_BUFFER)
        .handshake(TokioIo::new(stream))
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
        .filter(|t| !(t.is_empty() || upgrade && t == "upgrade"))
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

/// Count the request against its source's and its listener's limits, or answer 429 / 503.
fn admit_request(state: &RelayState, peer: SocketAddr, name: &str) -> Result<Permits, Box<Response<Body>>> {
    let busy = |status: StatusCode, msg: String| {
        let mut r = text(status, msg);
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        Box::new(r)
    };
    let Some(by_source) = state.http_per_source.enter(guard::source_of(peer.ip())) else {
        state.metrics.refused(Refusal::HttpSourceRequests);
        return Err(busy(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many requests in progress from your address (http_max_requests_per_source = {}); retry later",
                state.http_per_source.limit()
            ),
        ));
    };
    let Some(by_listener) = state.http_per_listener.enter(name.to_string()) else {
        state.metrics.refused(Refusal::HttpListenerRequests);
        return Err(busy(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the listener {name:?} has too many requests in progress (http_max_requests_per_listener = {}); retry later",
                state.http_per_listener.limit()
            ),
        ));
    };
    Ok((by_source, by_listener))
}

async fn route(state: Arc<RelayState>, mut req: Request<Incoming>, peer: SocketAddr, slot: &UpstreamSlot) -> Response<Body> {
    // A request head arrived: this connection is past its handshake (see `guard`).
    guard::handshake_finished();
    state.metrics.http_requests.fetch_add(1, Relaxed);
    let domain = &state.cfg.domain;
    let Some(host) = request_host(&req) else {
        return text(StatusCode::BAD_REQUEST, "no Host header; send Host: NAME.".to_string() + domain);
    };
    let Some(name) = host.strip_suffix(domain.as_str()).and_then(|p| p.strip_suffix('.')).filter(|n| crate::identity::valid_name(n)) else {
        return text(StatusCode::NOT_FOUND, format!("{host} is not served here; this relay routes NAME.{domain} to the listener registered as NAME"));
    };
    let permits = match admit_request(&state, peer, name) {
        Ok(p) => p,
        Err(busy) => return *busy,
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
    let req = req.map(|inner| Pieces { inner, rest: Bytes::new() });
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
    resp.map(|inner| Either::Left(Counted { inner, _permits: permits }))
}
