//! The admin endpoint (`admin_listen`, off by default): what an operator asks a running relay,
//! on a port of its own and behind a bearer token (`admin_token`), never on the tunnel port.
//!
//! - `GET /healthz`: `{"ok":true}` without the token (for probes).
//! - `GET /listeners`: the registered listeners (name, public key, open streams, queued bytes,
//!   round-trip time).
//! - `GET /sessions`: session and stream counts.
//! - `GET /config`: the settings in force, secrets redacted (key ids, never secrets).
//! - `GET /metrics`: the Prometheus text of the tunnel endpoint's `/metrics`.
//! - `GET /cluster/nodes`, `GET /cluster/listeners` (a node of a cluster): the whole cluster as
//!   Redis holds it, whichever node is asked (`cluster::fleet`): nodes with their liveness, names
//!   with their key, mode (pool, exit) and the nodes holding them.
//! - `GET /dashboard`: the web dashboard (`dashboard`), compiled in, under a CSP that keeps it on
//!   this origin.
//!
//! Everything but `/healthz` answers 401 without `Authorization: Bearer <admin_token>`; the token
//! is compared in constant time. `tunnel status --admin URL` prints these as tables.
//!
//! Bounded: at most [`MAX_CONNECTIONS`] connections at once and [`MAX_PER_SOURCE`] from one
//! source (an IPv4 address or IPv6 /64; more are closed as soon as they are accepted, so a flood
//! from one address leaves room for the operator's), each must send its request head within [`HEAD_TIMEOUT`] and is closed after
//! [`CONNECTION_TIMEOUT`] whatever it does (one request per connection; answers are small). Open
//! admin connections count in the load that hands memory back after a flood (`memory`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::RelayState;

mod dashboard;

type Body = Full<Bytes>;

fn respond(status: StatusCode, body: Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{body:#}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    r
}

fn authorized(state: &RelayState, req: &Request<Incoming>) -> bool {
    let Some(token) = state.cfg.admin_token.as_deref() else { return false };
    let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    // A browser opening the dashboard cannot send a header: `/dashboard?token=` (that page only).
    let given = given.map(str::to_string).or_else(|| {
        (req.uri().path() == "/dashboard")
            .then(|| req.uri().query())
            .flatten()
            .and_then(|q| url::form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "token").map(|(_, v)| v.into_owned()))
    });
    given.is_some_and(|g| bool::from(g.trim().as_bytes().ct_eq(token.as_bytes())))
}

/// A dashboard answer: `body` as `content_type`, kept on this origin by its CSP.
fn page(body: &'static str, content_type: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_SECURITY_POLICY, header::HeaderValue::from_static(dashboard::CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, header::HeaderValue::from_static("nosniff"));
    // The page's address may carry the token: never send it on as a referrer.
    h.insert(header::REFERRER_POLICY, header::HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    r
}

/// The answer for a `/cluster/...` path on a relay that is no node of a cluster.
fn not_clustered() -> Response<Body> {
    respond(StatusCode::NOT_FOUND, json!({"error": "this relay is not a node of a cluster (cluster_redis is unset): /listeners lists its listeners"}))
}

/// `/cluster/nodes` or `/cluster/listeners`: the whole cluster, from Redis.
async fn cluster(state: &RelayState, nodes: bool) -> Response<Body> {
    let Some(c) = &state.cluster else { return not_clustered() };
    // The nodes need no name's row: only the count of names each holds.
    match c.fleet(if nodes { 0 } else { super::cluster::fleet::MAX_NAMES }).await {
        Ok(f) if nodes => respond(StatusCode::OK, Value::Array(f.nodes)),
        Ok(f) => {
            let mut r = respond(StatusCode::OK, Value::Array(f.listeners));
            if f.truncated {
                let n = header::HeaderValue::from(super::cluster::fleet::MAX_NAMES);
                r.headers_mut().insert("x-truncated-at", n);
            }
            r
        }
        Err(e) => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": format!("cannot read the cluster registry (Redis at {}): {e}; this node's own listeners: /listeners", c.cfg.redacted_redis())}),
        ),
    }
}

fn listeners(state: &RelayState) -> Value {
    let mut rows: Vec<Value> = state
        .registry
        .live()
        .into_iter()
        .map(|(name, owner, session)| {
            let stats = session.stats();
            let joining = state.registry.registration(&name);
            json!({
                "pool": joining.as_ref().is_some_and(|j| j.pool),
                "exit": joining.as_ref().is_some_and(|j| j.exit),
                "name": name,
                "public_key": base64::engine::general_purpose::STANDARD.encode(owner),
                "streams": stats.streams,
                "queued_bytes": stats.queued,
                "buffered_bytes": stats.buffered,
                "rtt_ms": stats.rtt.map(|d| d.as_secs_f64() * 1e3),
            })
        })
        .collect();
    rows.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Value::Array(rows)
}

fn sessions(state: &RelayState) -> Value {
    let m = &state.metrics;
    json!({
        "dialer_sessions": m.sessions_active.load(Relaxed),
        "streams_active": m.streams_active.load(Relaxed),
        "listener_sessions": state.registry.live().len(),
    })
}

/// The settings in force as typed JSON ([`RelayConfig::settings_json`](crate::RelayConfig::settings_json):
/// every setting under its name, secrets left out), with the reloadable access rules as they are
/// now and the cluster node this relay is.
fn config(state: &RelayState) -> Value {
    let access = state.access();
    let mut exits: Vec<Value> = access.exits.iter().map(|(name, kids)| json!({"name": name, "key_ids": kids})).collect();
    exits.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    let mut v = state.cfg.settings_json();
    v["auth_key_ids"] = json!(access.auth_keys.kids());
    v["allow"] = json!(access.allow.len());
    v["listeners_open"] = json!(access.listeners_open);
    v["exits"] = json!(exits);
    v["cluster"] = json!(state.cluster.as_ref().map(|c| json!({
        "node_id": c.node_id,
        "advertise": c.advertise,
        "redis": c.cfg.redacted_redis(),
        "cluster_key_id": c.cfg.key.kid,
        "claim_ttl_secs": c.cfg.claim_ttl.as_secs_f64(),
        "namespace": c.cfg.namespace,
    })));
    v
}

async fn route(state: &RelayState, history: &dashboard::History, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET {
        return respond(StatusCode::METHOD_NOT_ALLOWED, json!({"error": "the admin endpoint serves GET only"}));
    }
    match req.uri().path() {
        "/healthz" => return respond(StatusCode::OK, json!({"ok": true})),
        // The dashboard's code and style: no data, so no token (a `<script src>` sends none).
        "/dashboard/app.js" => return page(dashboard::SCRIPT, "text/javascript; charset=utf-8"),
        "/dashboard/app.css" => return page(dashboard::STYLE, "text/css; charset=utf-8"),
        _ => {}
    }
    if !authorized(state, &req) {
        let mut r = respond(StatusCode::UNAUTHORIZED, json!({"error": "send Authorization: Bearer <admin_token> (the relay's admin_token setting)"}));
        r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        return r;
    }
    match req.uri().path() {
        "/listeners" => respond(StatusCode::OK, listeners(state)),
        "/sessions" => respond(StatusCode::OK, sessions(state)),
        "/config" => respond(StatusCode::OK, config(state)),
        "/cluster/nodes" => cluster(state, true).await,
        "/cluster/listeners" => cluster(state, false).await,
        "/dashboard" => page(dashboard::PAGE, "text/html; charset=utf-8"),
        "/dashboard/data" => respond(StatusCode::OK, dashboard::data(state, history).await),
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from(state.metrics_text())));
            r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; version=0.0.4"));
            r
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            json!({"error": "admin paths: /listeners, /sessions, /config, /metrics, /cluster/nodes, /cluster/listeners, /dashboard, /healthz"}),
        ),
    }
}

/// Most admin connections open at once (monitoring and an operator's `tunnel status` need a few).
pub(super) const MAX_CONNECTIONS: usize = 64;
/// An admin connection must send its request head within this time.
pub(super) const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// An admin connection is closed this long after it was accepted, whatever it is doing.
pub(super) const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest admin request head (a GET with a bearer token).
const MAX_HEAD: usize = 16 * 1024;

/// Most admin connections open at once from one source.
pub(super) const MAX_PER_SOURCE: usize = 8;

/// Open admin connections per source.
type PerSource = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// One open admin connection: its places in the caps, and in the metrics, until dropped.
struct Counted {
    metrics: Arc<super::metrics::Metrics>,
    per_source: PerSource,
    source: IpAddr,
    _slot: OwnedSemaphorePermit,
}

impl Counted {
    /// Count a connection from `peer`, or say which cap refuses it.
    fn admit(state: &RelayState, slots: &Arc<Semaphore>, per_source: &PerSource, peer: SocketAddr) -> Result<Counted, &'static str> {
        let source = super::guard::source_of(peer.ip());
        let mut open = per_source.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.get(&source).copied().unwrap_or(0);
        if n >= MAX_PER_SOURCE {
            return Err("its source's most admin connections");
        }
        let slot = slots.clone().try_acquire_owned().map_err(|_| "the admin endpoint's most connections")?;
        open.insert(source, n + 1);
        state.metrics.admin_connections_open.fetch_add(1, Relaxed);
        state.metrics.note_load();
        Ok(Counted { metrics: state.metrics.clone(), per_source: per_source.clone(), source, _slot: slot })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.metrics.admin_connections_open.fetch_sub(1, Relaxed);
        let mut open = self.per_source.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.source);
            }
        }
    }
}

/// Serve the admin endpoint until the relay drains.
pub(super) async fn serve(state: Arc<RelayState>, listener: TcpListener) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_source = PerSource::default();
    let history = Arc::new(dashboard::History::default());
    // The first sample before the first request: every answer has a bar up to now.
    history.sample(&state.metrics);
    state.tasks.spawn(dashboard::sample_loop(state.clone(), history.clone()));
    loop {
        let (sock, peer) = tokio::select! {
            _ = state.draining.cancelled() => return,
            x = crate::transport::accept_backoff(&listener) => x,
        };
        let counted = match Counted::admit(&state, &slots, &per_source, peer) {
            Ok(c) => c,
            Err(cap) => {
                state.metrics.admin_refused.fetch_add(1, Relaxed);
                tracing::debug!(%peer, "admin connection closed at once: {cap} are open");
                continue;
            }
        };
        let (st, h) = (state.clone(), history.clone());
        state.tasks.spawn(async move {
            let _counted = counted;
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, serve_one(st, h, sock)).await;
        });
    }
}

/// One admin connection: its request head within [`HEAD_TIMEOUT`], then one exchange.
async fn serve_one(st: Arc<RelayState>, history: Arc<dashboard::History>, mut sock: tokio::net::TcpStream) {
    let Ok(Some(head)) = tokio::time::timeout(HEAD_TIMEOUT, crate::transport::read_request_head(&mut sock, MAX_HEAD)).await else {
        return;
    };
    let svc = hyper::service::service_fn(move |req| {
        let (st, history) = (st.clone(), history.clone());
        async move { Ok::<_, Infallible>(route(&st, &history, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD.max(8192))
        .keep_alive(false)
        .serve_connection(TokioIo::new(crate::transport::Prefixed::new(head, sock)), svc);
    let _ = conn.await;
}
