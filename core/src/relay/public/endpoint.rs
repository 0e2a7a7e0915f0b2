//! The relay's public HTTP port: requests whose `Host` is `NAME.<domain>` are forwarded to the
//! listener registered as `NAME` over HTTP/1.1 (hyper on both sides). A client connection keeps
//! its tunnel stream to a listener for its next requests to the same name (keep-alive costs no new
//! stream or local connection), and opens a new one when the name changes or the old one closed. Bodies stream in both directions with bounded buffers (the mux window), WebSocket and
//! other upgrades pass through, and the client's address goes along in `X-Forwarded-For` and
//! `Forwarded`. Errors: 404 for a host outside the domain, 502 for an unknown or offline name,
//! 503 when the listener refuses, 504 when it does not answer within `http_timeout`, 403 naming
//! the code when it refuses public requests for good (e2e listener, exit without a service).
//!
//! Bounded per request: a client at `http_max_requests_per_source` requests in progress gets 429,
//! a listener at `http_max_requests_per_listener` 503 (both with `Retry-After`), and so does a
//! source over its share of a listener's requests while the last quarter of them is left
//! ([`guard::SourceShares`]); a request is in progress until its response body ends, and a
//! response whose client takes none of it for `http_timeout` is reset ([`Counted`]). A body the
//! listener does not read waits in the mux stream's window; the relay itself holds at most its
//! read buffer (`http_max_header_bytes`) and [`UPSTREAM_BUFFER`] of it.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::body::{Chunks, Pieces};
use super::h2_window::WindowMeter;
use super::listeners::{H2Sender, H2Slot, Shared, H2_CONNECTION_WINDOW, H2_STREAMS, H2_STREAM_WINDOW};
use super::tls::read_client_hello;
use crate::error::ErrorCode;
use crate::protocol::{StreamHeader, Via};
use crate::relay::guard;
use crate::relay::listener_limits::{ListenerSlot, Refused};
use crate::relay::metrics::{ListenerHttp, Refusal};
use crate::relay::names::{self, Speaks};
use crate::relay::route::{open_to_listener, RouteError};
use crate::relay::RelayState;

type Body = Either<Counted, Full<Bytes>>;

/// Most request bytes the relay's HTTP client to a listener queues before the stream takes them
/// (also the largest response head a listener may send, as nginx's proxy buffers bound it). hyper's
/// default (~400 KiB) made each stalled upload cost that much relay memory on top of the stream
/// window.
const UPSTREAM_BUFFER: usize = 16 * 1024;

/// The request's places in the per-source and per-listener counts and in its source's share of
/// the listener; counted in `http_requests_open` until dropped.
struct Permits {
    _by_source: guard::InFlightPermit<IpAddr>,
    _by_listener: ListenerSlot,
    _share: guard::SharePermit,
    metrics: Arc<crate::relay::metrics::Metrics>,
}

impl Drop for Permits {
    fn drop(&mut self) {
        self.metrics.http_requests_open.fetch_sub(1, Relaxed);
    }
}

/// A listener's response body that keeps its request counted (and its slot on a shared h2c
/// connection held) until the body ends, and is cut when its client stops taking it: a body
/// that has a frame ready and is not asked for the next one within `http_timeout` is dropped
/// with its places ([`stall_watch`]), which resets the stream to the listener (its window goes
/// back to the connection it shares), frees its request slots, and fails the response to the
/// client.
pub(super) struct Counted {
    body: Arc<Watched>,
    /// Ends the body's [`stall_watch`] when the body is dropped.
    _watch: tokio_util::sync::DropGuard,
    stats: Option<Arc<ListenerHttp>>,
}

/// What a response body holds until it ends or is cut.
struct Held {
    body: Chunks,
    _permits: Permits,
    _slot: Option<H2Slot>,
}

/// The body a [`Counted`] and its [`stall_watch`] share.
struct Watched {
    /// `None` once cut.
    inner: std::sync::Mutex<Option<Held>>,
    /// When the body last handed on a frame (ms since `epoch`), or `WAITING` while it waits for
    /// the listener (then the client is not the one holding it up).
    last: std::sync::atomic::AtomicU64,
    epoch: tokio::time::Instant,
    /// `http_timeout`.
    limit: std::time::Duration,
}

/// [`Watched::last`] while the body waits for the listener.
const WAITING: u64 = u64::MAX;

/// Why a response body was cut.
#[derive(Debug, thiserror::Error)]
#[error("the client took none of the response body for {0:?} (http_timeout); the response was reset")]
struct Stalled(std::time::Duration);

impl Counted {
    fn new(state: &Arc<RelayState>, inner: Incoming, permits: Permits, slot: Option<H2Slot>, stats: Option<Arc<ListenerHttp>>) -> Counted {
        // Not asked for its first frame yet: the clock runs from now.
        let body = Arc::new(Watched {
            inner: std::sync::Mutex::new(Some(Held { body: Chunks::new(inner, RESPONSE_CHUNK), _permits: permits, _slot: slot })),
            last: std::sync::atomic::AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
            limit: state.cfg.limits.http_timeout,
        });
        let watch = tokio_util::sync::CancellationToken::new();
        let (w, metrics) = (Arc::downgrade(&body), state.metrics.clone());
        let dropped = watch.clone();
        state.tasks.spawn(async move {
            tokio::select! {
                _ = stall_watch(w, metrics) => {}
                _ = dropped.cancelled() => {}
            }
        });
        Counted { body, _watch: watch.drop_guard(), stats }
    }
}

/// Cut the body when it has had a frame ready for `http_timeout` that nobody asked for.
async fn stall_watch(body: std::sync::Weak<Watched>, metrics: Arc<crate::relay::metrics::Metrics>) {
    let Some(limit) = body.upgrade().map(|b| b.limit) else { return };
    let mut wake = tokio::time::Instant::now() + limit;
    loop {
        tokio::time::sleep_until(wake).await;
        let Some(b) = body.upgrade() else { return };
        let last = b.last.load(Relaxed);
        if last == WAITING {
            wake = tokio::time::Instant::now() + limit;
            continue;
        }
        let since = b.epoch + std::time::Duration::from_millis(last);
        if since + limit > tokio::time::Instant::now() {
            wake = since + limit;
            continue;
        }
        let cut = b.inner.lock().unwrap_or_else(|p| p.into_inner()).take();
        if cut.is_some_and(|c| !c.body.is_end_stream()) {
            metrics.http_stalled_responses.fetch_add(1, Relaxed);
            tracing::debug!(?limit, "a public client took none of a response body for http_timeout; reset it");
        }
        return;
    }
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        let mut inner = self.body.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(Held { body, .. }) = inner.as_mut() else {
            return Poll::Ready(Some(Err(Stalled(self.body.limit).into())));
        };
        let r = body.poll_next(cx);
        let last = match &r {
            Poll::Pending => WAITING,
            _ => self.body.epoch.elapsed().as_millis() as u64,
        };
        self.body.last.store(last, Relaxed);
        if let (Poll::Ready(Some(Ok(f))), Some(s)) = (&r, &self.stats) {
            if let Some(d) = f.data_ref() {
                s.bytes_out.fetch_add(d.len() as u64, Relaxed);
            }
        }
        r.map(|f| f.map(|f| f.map_err(Into::into)))
    }
    fn is_end_stream(&self) -> bool {
        self.body.inner.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|h| h.body.is_end_stream())
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.inner.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|h| h.body.size_hint()).unwrap_or_default()
    }
}

/// Most bytes of small response frames joined into one (see [`Chunks`]).
const RESPONSE_CHUNK: usize = 64 * 1024;

/// A client connection's open HTTP connection to a listener, reused while the name stays the same.
struct Upstream {
    name: String,
    sender: Sender,
}

type Sender = hyper::client::conn::http1::SendRequest<Pieces>;

/// A client connection's idle HTTP/1.1 connections to listeners, for its next requests: one for
/// an HTTP/1.1 client (keep-alive), up to [`IDLE_UPSTREAMS`] for an HTTP/2 client whose
/// concurrent requests each need one.
type UpstreamSlot = Arc<std::sync::Mutex<Vec<Upstream>>>;

/// Most idle listener connections one client connection keeps.
const IDLE_UPSTREAMS: usize = 16;

/// How a client connection reached the relay.
struct Conn {
    peer: SocketAddr,
    /// Over TLS (the HTTPS port).
    https: bool,
    /// The name the TLS ClientHello asked for: requests must name the same host (else 421).
    sni: Option<String>,
}

/// Runs hyper's per-stream and per-connection tasks on the relay's task tracker, so shutdown
/// waits for them like for every other task of the relay.
#[derive(Clone)]
struct Exec(tokio_util::task::TaskTracker);

impl<F> hyper::rt::Executor<F> for Exec
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(fut);
    }
}

/// Serve one public plain-HTTP connection: HTTP/1.1 (keep-alive, upgrades) or h2c with prior
/// knowledge.
pub(in crate::relay) async fn serve(state: Arc<RelayState>, mut sock: TcpStream, peer: SocketAddr) {
    // The first request head before hyper's buffers (see `read_request_head`; an h2c preface
    // `PRI * HTTP/2.0` is one too): a slow client holds what it sent, no more.
    let Some(head) = crate::transport::read_request_head(&mut sock, state.cfg.limits.http_max_header_bytes).await else { return };
    let sock = crate::transport::Prefixed::new(head, sock);
    serve_http(state, sock, Conn { peer, https: false, sni: None }).await
}

/// Serve one connection on the public HTTPS port: a ClientHello naming a TLS-passthrough
/// listener is routed to it undecrypted; any other is answered with the relay's certificate for
/// its SNI, then HTTP/2 or HTTP/1.1 as ALPN chose.
pub(in crate::relay) async fn serve_tls(state: Arc<RelayState>, mut sock: TcpStream, peer: SocketAddr) {
    let Some(tls) = state.public.tls.as_ref() else { return };
    let acceptor = tls.acceptor().clone();
    let Some((hello, sni)) = read_client_hello(&mut sock, state.cfg.limits.http_max_header_bytes).await else {
        return tracing::debug!(%peer, "no TLS ClientHello on the public HTTPS port");
    };
    if let Some(name) = sni.as_deref().and_then(|s| name_in_domain(s, &state.cfg.domain)) {
        if listener_mode(&state, name).await == Speaks::TlsPassthrough {
            let name = name.to_string();
            return passthrough(state, hello, sock, peer, name).await;
        }
    }
    let stream = match acceptor.accept(crate::transport::Prefixed::new(hello, sock)).await {
        Ok(s) => s,
        Err(e) => return tracing::debug!(%peer, error = %e, "public TLS handshake failed"),
    };
    serve_http(state, stream, Conn { peer, https: true, sni }).await
}

/// Route a raw TLS connection to a passthrough listener: the ClientHello goes first, then the
/// bytes both ways; nothing is decrypted or logged.
async fn passthrough(state: Arc<RelayState>, hello: Vec<u8>, sock: TcpStream, peer: SocketAddr, name: String) {
    use tokio::io::AsyncWriteExt;
    guard::handshake_finished();
    // Counted against the listener's rate where it is held (a connection, not a request in
    // progress: its place is given back at once).
    if let Err(Refused::Rate(_)) = crate::relay::listener_limits::count(&state, &name).await {
        state.metrics.refused(Refusal::HttpListenerRate);
        return tracing::debug!(%peer, listener = %name, "TLS passthrough connection over the listener's rate; closed");
    }
    let header = StreamHeader { via: Via::Http, port: 0, client: peer.to_string() };
    let mut stream = match open_to_listener(&state, &name, header, state.cfg.limits.http_timeout).await {
        Ok(s) => s,
        Err(e) => {
            state.metrics.refused(e.refusal());
            return tracing::debug!(%peer, listener = %name, error = ?e, "TLS passthrough connection not delivered");
        }
    };
    tracing::debug!(%peer, listener = %name, "TLS connection passed through by SNI");
    if stream.write_all(&hello).await.is_err() {
        return;
    }
    tokio::select! {
        _ = crate::stream::bridge(stream, sock) => {}
        _ = state.kill.cancelled() => {}
    }
}

async fn serve_http<I: crate::transport::Io>(state: Arc<RelayState>, io: I, conn: Conn) {
    let peer = conn.peer;
    let st = state.clone();
    let slot: UpstreamSlot = Arc::default();
    let conn = Arc::new(conn);
    let svc = hyper::service::service_fn(move |req| {
        // Called on the connection's own task (HTTP/2 runs the future on another one): a request
        // head arrived, so this connection is past its handshake (see `guard`).
        guard::handshake_finished();
        let (st, slot, conn) = (st.clone(), slot.clone(), conn.clone());
        async move { Ok::<_, std::convert::Infallible>(route(st, req, &conn, &slot).await) }
    });
    let l = &state.cfg.limits;
    let mut builder = hyper_util::server::conn::auto::Builder::new(Exec(state.tasks.clone()));
    builder.http1().timer(TokioTimer::new()).header_read_timeout(l.http_header_timeout).max_buf_size(l.http_max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(l.http_max_header_bytes.min(u32::MAX as usize) as u32)
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_send_buf_size(H2_SEND_BUFFER)
        .initial_stream_window_size(H2_PUBLIC_STREAM_WINDOW)
        .initial_connection_window_size(H2_PUBLIC_CONNECTION_WINDOW);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::select! {
        r = conn => if let Err(e) = r { tracing::debug!(%peer, error = %e, "public HTTP connection ended with an error") },
        _ = state.kill.cancelled() => {}
    }
}

/// Most concurrent requests (streams) on one public HTTP/2 connection (the default
/// `http_max_requests_per_source` bounds them across a source's connections too).
const H2_MAX_STREAMS: u32 = 128;
/// The receive window of a public HTTP/2 request body (hyper's default): what a client may send
/// ahead of the listener's pace.
const H2_PUBLIC_STREAM_WINDOW: u32 = 1 << 20;
/// The receive window of a public HTTP/2 connection. h2 closes a connection whose peer keeps more
/// small DATA frames buffered than half this window can pay the overhead of (`ENHANCE_YOUR_CALM`,
/// "too_many_data_frames", ~240 bytes counted per frame of a few bytes): at hyper's default 1 MiB
/// that was ~2,100 gRPC messages of a few bytes waiting for a listener that reads slower than its
/// client sends (a bidi stream of 10,000 chat messages was cut in 1 run of 6). At 8 MiB, ~17,000;
/// each stream still buffers at most [`H2_PUBLIC_STREAM_WINDOW`] of body.
const H2_PUBLIC_CONNECTION_WINDOW: u32 = 8 << 20;
/// Most body bytes the relay queues per HTTP/2 stream (responses to a public client, requests to
/// an h2c listener) beyond what the peer's flow-control window takes: with [`H2_MAX_STREAMS`], a
/// client that stops reading holds at most 8 MiB per connection, and its source at most
/// `http_max_requests_per_source` times this across connections.
const H2_SEND_BUFFER: usize = 64 * 1024;

/// How the listener `name` speaks: from its registration here, else from its claim in the
/// cluster (a listener on another node), else HTTP/1.1.
async fn listener_mode(state: &RelayState, name: &str) -> Speaks {
    names::lookup(state, name).await.registration().map(|r| r.speaks).unwrap_or_default()
}

/// The listener name a host names: `NAME.<domain>` only.
fn name_in_domain<'a>(host: &'a str, domain: &str) -> Option<&'a str> {
    host.strip_suffix(domain).and_then(|p| p.strip_suffix('.')).filter(|n| crate::identity::valid_name(n))
}

/// Open a tunnel stream to the listener `name`; the error is the response the client gets
/// (502/503/504).
async fn open_stream(state: &Arc<RelayState>, name: &str, peer: SocketAddr) -> Result<crate::session::SessionStream, Response<Body>> {
    let header = StreamHeader { via: Via::Http, port: 0, client: peer.to_string() };
    let limit = state.cfg.limits.http_timeout;
    open_to_listener(state, name, header, limit).await.map_err(|e| {
        state.metrics.refused(e.refusal());
        match e {
            RouteError::Offline => text(StatusCode::BAD_GATEWAY, format!("no listener named {name:?} is online; start it with `tunnel listen`")),
            RouteError::Busy | RouteError::NotAllowed => {
                text(StatusCode::SERVICE_UNAVAILABLE, format!("the listener {name:?} is not accepting connections right now"))
            }
            RouteError::ClusterUnavailable => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no listener named {name:?} is connected to this relay, and its cluster registry (Redis) is unreachable, so the relay cannot tell which node has it; retry shortly"),
            ),
            RouteError::Timeout => text(
                StatusCode::GATEWAY_TIMEOUT,
                format!("the listener {name:?} did not accept the connection within {limit:?} (TUNNEL_HTTP_TIMEOUT)"),
            ),
            RouteError::Refused(code) => text(
                StatusCode::FORBIDDEN,
                match code {
                    ErrorCode::E2eRefused => format!(
                        "the listener {name:?} refused the request ({}): it is end-to-end encrypted, so only e2e dials reach it, never public HTTP",
                        code.name()
                    ),
                    ErrorCode::NotAllowed => format!(
                        "the listener {name:?} refused the request ({}): it is an exit listener that exposes no service",
                        code.name()
                    ),
                    _ => format!("the listener {name:?} refused the request ({})", code.name()),
                },
            ),
        }
    })
}

/// Open a tunnel stream to the listener `name` and start an HTTP/1.1 client connection on it.
async fn connect_upstream(state: &Arc<RelayState>, name: &str, peer: SocketAddr) -> Result<Sender, Response<Body>> {
    let stream = open_stream(state, name, peer).await?;
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

/// An HTTP/2 connection to the h2c listener `name` and a request slot on it: one kept open with a
/// free slot, or a new one (kept if there is room, else this request's own).
async fn h2_upstream(state: &Arc<RelayState>, name: &str, peer: SocketAddr, fresh: bool) -> Result<(H2Sender, H2Slot), Response<Body>> {
    if !fresh {
        if let Some(s) = state.public.listeners.h2(name) {
            return Ok(s);
        }
    }
    let stream = open_stream(state, name, peer).await?;
    let stream = WindowMeter::new(stream, state.metrics.clone());
    let (sender, conn) = hyper::client::conn::http2::Builder::new(Exec(state.tasks.clone()))
        .timer(TokioTimer::new())
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_concurrent_reset_streams(H2_STREAMS)
        .max_send_buf_size(H2_SEND_BUFFER)
        .max_header_list_size(state.cfg.limits.http_max_header_bytes.min(u32::MAX as usize) as u32)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| text(StatusCode::BAD_GATEWAY, format!("could not speak HTTP/2 to the listener {name:?} (is its service h2c?): {e}")))?;
    let (st, n) = (state.clone(), name.to_string());
    state.tasks.spawn(async move {
        tokio::pin!(conn);
        tokio::select! {
            _ = &mut conn => return,
            _ = st.kill.cancelled() => return,
            _ = st.draining.cancelled() => {}
        }
        // Draining: no new request takes this connection; the ones in flight finish on it.
        st.public.listeners.forget_h2(&n);
        tokio::select! {
            _ = conn => {}
            _ = st.kill.cancelled() => {}
        }
    });
    let shared = Shared::new(sender.clone());
    let slot =
        shared.slot().ok_or_else(|| text(StatusCode::BAD_GATEWAY, format!("the HTTP/2 connection to the listener {name:?} closed at once")))?;
    state.public.listeners.set_h2(name, shared);
    Ok((sender, slot))
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

/// The host a request names (`Host`, or the HTTP/2 `:authority`), without port, lower-case.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string).or_else(|| req.uri().host().map(str::to_string))?;
    let host = match raw.rsplit_once(':') {
        // A port follows a name, an IPv4 address or a bracketed IPv6 address (never a bare one).
        Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && (!h.contains(':') || h.ends_with(']')) => h.to_string(),
        _ => raw,
    };
    Some(host.trim_end_matches('.').to_ascii_lowercase())
}

/// Why the request names its host ambiguously (RFC 9112 3.2, RFC 9113 8.3.1), or `None`: more
/// than one `Host` header, or a `Host` that names another host or port than the absolute request
/// target (or the HTTP/2 `:authority`). The relay routes on one of them and the service would
/// see the other, so a service routing by `Host` could be steered where the relay did not route.
fn host_conflict<B>(req: &Request<B>) -> Option<String> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next()?;
    if hosts.next().is_some() {
        return Some("more than one Host header; send exactly one".to_string());
    }
    let target = req.uri().authority()?;
    let default_port = if req.uri().scheme_str() == Some("https") { 443 } else { 80 };
    let split = |raw: &str| -> (String, Option<u16>) {
        let (h, p) = match raw.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || h.ends_with(']') => (h, p.parse().ok()),
            _ => (raw, None),
        };
        (h.trim_end_matches('.').to_ascii_lowercase(), p)
    };
    let (th, tp) = split(target.as_str());
    let given = first.to_str().unwrap_or_default();
    let (hh, hp) = split(given);
    if th != hh || tp.unwrap_or(default_port) != hp.unwrap_or(default_port) {
        return Some(format!(
            "the Host header {given:?} names another host than the request target {:?}; send the same host in both",
            target.as_str()
        ));
    }
    None
}

/// The `Host` value as the client sent it (`Host`, else the `:authority`, port included).
fn authority_of<B>(req: &Request<B>) -> Option<String> {
    req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string).or_else(|| req.uri().authority().map(|a| a.to_string()))
}

/// Path routing: `<prefix>/NAME/rest` names the listener `NAME`, and the request continues as
/// `/rest` (query kept).
fn path_route<B>(prefix: &str, req: &mut Request<B>) -> Option<String> {
    let rest = req.uri().path().strip_prefix(prefix)?.strip_prefix('/')?;
    let (name, tail) = match rest.split_once('/') {
        Some((n, t)) => (n.to_string(), format!("/{t}")),
        None => (rest.to_string(), "/".to_string()),
    };
    if !crate::identity::valid_name(&name) {
        return None;
    }
    let pq = match req.uri().query() {
        Some(q) => format!("{tail}?{q}"),
        None => tail,
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(pq.parse().ok()?);
    *req.uri_mut() = http::Uri::from_parts(parts).ok()?;
    Some(name)
}

/// Count the request against its source's and its listener's limits, or answer 429 / 503. The
/// listener's are counted where it is held (`listener_limits`), whichever node the request
/// entered.
async fn admit_request(state: &Arc<RelayState>, peer: SocketAddr, name: &str) -> Result<Permits, Box<Response<Body>>> {
    let busy = |status: StatusCode, msg: String| {
        let mut r = text(status, msg);
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        Box::new(r)
    };
    let Some(by_source) = state.public.per_source.enter(guard::source_of(peer.ip())) else {
        state.metrics.refused(Refusal::HttpSourceRequests);
        return Err(busy(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many requests in progress from your address (http_max_requests_per_source = {}); retry later",
                state.public.per_source.limit()
            ),
        ));
    };
    let by_listener = match crate::relay::listener_limits::count(state, name).await {
        Ok(slot) => slot,
        Err(Refused::Rate(wait)) => {
            state.metrics.refused(Refusal::HttpListenerRate);
            let (limit, window) = state.cfg.http_listener_rate.unwrap_or_default();
            let mut r = text(
                StatusCode::TOO_MANY_REQUESTS,
                format!("the listener {name:?} has had its {limit} requests for this {window:?} window (http_listener_rate); retry after the Retry-After seconds"),
            );
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            return Err(Box::new(r));
        }
        Err(Refused::Busy(limit)) => {
            state.metrics.refused(Refusal::HttpListenerRequests);
            return Err(busy(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the listener {name:?} has too many requests in progress (http_max_requests_per_listener = {limit}); retry later"),
            ));
        }
    };
    let share = take_source_share(state, peer, name)?;
    state.metrics.http_requests_open.fetch_add(1, Relaxed);
    state.metrics.note_load();
    Ok(Permits { _by_source: by_source, _by_listener: by_listener, _share: share, metrics: state.metrics.clone() })
}

/// Count the request in its source's share of the listener's slots (see [`guard::SourceShares`]),
/// or answer 503: a few sources holding most of a listener's requests leave the rest to others.
fn take_source_share(state: &RelayState, peer: SocketAddr, name: &str) -> Result<guard::SharePermit, Box<Response<Body>>> {
    let in_use = state.public.per_listener.count(&name.to_string());
    let shares = &state.public.source_shares;
    shares.enter(name, guard::source_of(peer.ip()), in_use).ok_or_else(|| {
        state.metrics.refused(Refusal::HttpListenerRequests);
        let mut r = text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "your address holds {} or more of the listener {name:?}'s requests in progress and its last {} places are kept for others (http_max_requests_per_listener = {}); retry later",
                shares.share(),
                shares.reserve(),
                state.public.per_listener.limit()
            ),
        );
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        Box::new(r)
    })
}

async fn route(state: Arc<RelayState>, mut req: Request<Incoming>, conn: &Conn, slot: &UpstreamSlot) -> Response<Body> {
    state.metrics.http_requests.fetch_add(1, Relaxed);
    let domain = &state.cfg.domain;
    if let Some(why) = host_conflict(&req) {
        state.metrics.refused(Refusal::Malformed);
        return text(StatusCode::BAD_REQUEST, why);
    }
    let Some(host) = request_host(&req) else {
        return text(StatusCode::BAD_REQUEST, "no Host header; send Host: NAME.".to_string() + domain);
    };
    if let Some(sni) = conn.sni.as_deref().filter(|sni| *sni != host) {
        // RFC 9113 9.1.1 (and RFC 9110 15.5.20): this connection was set up for another name
        // (a client coalescing connections); the client retries on a connection of its own.
        state.metrics.refused(Refusal::Misdirected);
        return text(
            StatusCode::MISDIRECTED_REQUEST,
            format!("this TLS connection was opened for {sni}; open a new connection (with SNI {host}) for requests to {host}"),
        );
    }
    let name = match name_in_domain(&host, domain) {
        Some(n) => n.to_string(),
        None => match state.cfg.http_path_prefix.as_deref().filter(|_| host == *domain).and_then(|p| path_route(p, &mut req)) {
            Some(n) => n,
            None => {
                let paths = state.cfg.http_path_prefix.as_deref().map(|p| format!(" (or {domain}{p}/NAME/...)")).unwrap_or_default();
                return text(
                    StatusCode::NOT_FOUND,
                    format!("{host} is not served here; this relay routes NAME.{domain}{paths} to the listener registered as NAME"),
                );
            }
        },
    };
    let stats = if state.registry.contains(&name) { state.metrics.per_listener.of(&name) } else { None };
    let started = std::time::Instant::now();
    let resp = forward(&state, req, conn, slot, &name, stats.clone()).await;
    if let Some(s) = &stats {
        s.answered(resp.status().as_u16(), started.elapsed());
    }
    resp
}

/// Forward a routed request to the listener `name` and hand back its response (or the relay's
/// refusal).
async fn forward(
    state: &Arc<RelayState>,
    mut req: Request<Incoming>,
    conn: &Conn,
    slot: &UpstreamSlot,
    name: &str,
    stats: Option<Arc<ListenerHttp>>,
) -> Response<Body> {
    let peer = conn.peer;
    let permits = match admit_request(state, peer, name).await {
        Ok(p) => p,
        Err(busy) => return *busy,
    };
    let mode = listener_mode(state, name).await;
    let client_version = req.version();
    let Some(authority) = authority_of(&req) else {
        return text(StatusCode::BAD_REQUEST, format!("no Host header; send Host: {name}.{}", state.cfg.domain));
    };

    // Forwarding headers: append to any X-Forwarded-For chain, and say which host and scheme the
    // client used.
    let proto = if conn.https { "https" } else { "http" };
    let client_ip = peer.ip().to_string();
    let headers = req.headers_mut();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {client_ip}"),
        None => client_ip.clone(),
    };
    let for_value = if peer.is_ipv6() { format!("\"[{client_ip}]\"") } else { client_ip.clone() };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    if let Ok(h) = HeaderValue::from_str(&authority) {
        headers.insert("x-forwarded-host", h);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("for={for_value};host={authority};proto={proto}")) {
        headers.append(header::FORWARDED, v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));

    // `TE: trailers` is the one TE an HTTP/2 peer may get (RFC 9113 8.2.2), and gRPC servers want it.
    let te_trailers = req
        .headers()
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")));
    // `Upgrade: h2c` asks this hop to switch (RFC 7540 3.2, which RFC 9113 dropped): the relay
    // answers over HTTP/1.1 and the header goes no further, like the others of its hop.
    let h2c_upgrade = req.headers().get(header::UPGRADE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.trim().eq_ignore_ascii_case("h2c"));
    let upgrade_requested = req.version() <= http::Version::HTTP_11 && req.headers().contains_key(header::UPGRADE) && !h2c_upgrade;
    strip_hop_by_hop(req.headers_mut(), upgrade_requested);
    let client_upgrade = upgrade_requested.then(|| hyper::upgrade::on(&mut req));
    let req = req.map(|inner| Pieces::new(inner, stats.clone()));
    let limit = state.cfg.limits.http_timeout;
    let timeout_response = || {
        state.metrics.refused(Refusal::Timeout);
        text(StatusCode::GATEWAY_TIMEOUT, format!("the listener {name:?} did not answer within {limit:?} (TUNNEL_HTTP_TIMEOUT)"))
    };

    if mode == Speaks::H2c {
        if upgrade_requested {
            return text(StatusCode::NOT_IMPLEMENTED, format!("the listener {name:?} speaks HTTP/2 (h2c); upgrades need an HTTP/1.1 listener"));
        }
        let mut req = req;
        let pq = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
        let Ok(uri) = format!("http://{authority}{pq}").parse::<http::Uri>() else {
            return text(StatusCode::BAD_REQUEST, format!("{authority:?} is not a valid authority"));
        };
        *req.uri_mut() = uri;
        *req.version_mut() = http::Version::HTTP_2;
        req.headers_mut().remove(header::HOST);
        if te_trailers {
            req.headers_mut().insert(header::TE, HeaderValue::from_static("trailers"));
        }
        let exchange = async {
            let (mut sender, slot) = h2_upstream(state, name, peer, false).await?;
            match sender.try_send_request(req).await {
                // The kept connection closed before the request went out: once more on a new one.
                Err(mut e) if e.message().is_some() => {
                    let req = e.take_message().expect("checked above");
                    let (mut sender, slot) = h2_upstream(state, name, peer, true).await?;
                    sender.send_request(req).await.map(|r| (r, slot)).map_err(|e| bad_gateway(name, e))
                }
                r => r.map(|r| (r, slot)).map_err(|e| bad_gateway(name, e.into_error())),
            }
        };
        let (mut resp, slot) = match tokio::time::timeout(limit, exchange).await {
            Err(_) => return timeout_response(),
            Ok(Err(refusal)) => return refusal,
            Ok(Ok(r)) => r,
        };
        // hyper writes an HTTP/1.1 client's status line from the response's version.
        *resp.version_mut() = if client_version == http::Version::HTTP_2 { client_version } else { http::Version::HTTP_11 };
        strip_hop_by_hop(resp.headers_mut(), false);
        return resp.map(|inner| Either::Left(Counted::new(state, inner, permits, Some(slot), stats)));
    }

    // An HTTP/1.1 listener: an HTTP/2 request goes out in origin form with a Host header.
    let mut req = req;
    if req.version() == http::Version::HTTP_2 {
        let pq = req.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
        let Ok(uri) = pq.parse::<http::Uri>() else {
            return text(StatusCode::BAD_REQUEST, format!("{pq:?} is not a valid path"));
        };
        *req.uri_mut() = uri;
        *req.version_mut() = http::Version::HTTP_11;
        if let Ok(h) = HeaderValue::from_str(&authority) {
            req.headers_mut().insert(header::HOST, h);
        }
    }
    // A previous request's connection to this listener, if one is free: for an HTTP/1.1
    // client the one its last request used (waiting for it to finish that response); for an
    // HTTP/2 client any that is ready now (else a new one: its other requests may hold them).
    let idle = {
        let mut pool = slot.lock().unwrap_or_else(|p| p.into_inner());
        pool.retain(|u| u.name == name && !u.sender.is_closed());
        let at = if client_version == http::Version::HTTP_2 { pool.iter().position(|u| u.sender.is_ready()) } else { pool.len().checked_sub(1) };
        at.map(|i| pool.swap_remove(i))
    };
    let reused = match idle {
        Some(mut up) => {
            let ready = tokio::time::timeout(limit, up.sender.ready()).await;
            matches!(ready, Ok(Ok(()))).then_some(up.sender)
        }
        None => None,
    };
    let reused_one = reused.is_some();
    let mut sender = match reused {
        Some(s) => s,
        None => match connect_upstream(state, name, peer).await {
            Ok(s) => s,
            Err(refusal) => return refusal,
        },
    };
    let exchange = async {
        match sender.try_send_request(req).await {
            // The kept connection closed before the request went out: once more on a new one.
            Err(mut e) if reused_one && e.message().is_some() => {
                let req = e.take_message().expect("checked above");
                sender = connect_upstream(state, name, peer).await?;
                sender.send_request(req).await.map_err(|e| bad_gateway(name, e))
            }
            r => r.map_err(|e| bad_gateway(name, e.into_error())),
        }
    };
    let mut resp = match tokio::time::timeout(limit, exchange).await {
        Err(_) => return timeout_response(),
        Ok(Err(refusal)) => return refusal,
        Ok(Ok(r)) => r,
    };
    let upgrading = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(resp.headers_mut(), upgrading);
    if !upgrade_requested && !upgrading {
        // Keep it for this client connection's next request (hyper makes it wait for this
        // response's body before sending another).
        let mut pool = slot.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < IDLE_UPSTREAMS {
            pool.push(Upstream { name: name.to_string(), sender });
        }
    }
    if upgrading {
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
    resp.map(|inner| Either::Left(Counted::new(state, inner, permits, None, stats)))
}
