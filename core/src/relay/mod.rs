//! The relay server. It has three endpoints, each an accept loop of its own (`Endpoint`):
//! - the **tunnel endpoint** (`listen`, WebSocket over TCP or TLS; `tunnel_endpoint`): the health
//!   path, `/metrics`, and WebSocket upgrades that become Emissary classic connections or
//!   multiplexed sessions;
//! - the **raw-TCP tunnel endpoint** (`tcp_listen`): the same sessions without HTTP;
//! - the **public HTTP endpoint** (`http_listen`; `public_endpoint`): requests whose `Host` names a
//!   listener, forwarded to it;
//! - and, off by default, the **admin endpoint** (`admin_listen`; `admin`): listeners, sessions and
//!   the config in force as JSON, behind a bearer token.
//!
//! After admission (`guard`: per-source and global limits, auth rate limiting), `session`
//! authenticates a client and serves its streams: a SOCKS5 CONNECT is either a real target
//! (`crate::egress`: allowlist, resolver, connect), a listener name (`route`), or `HOST@EXIT`, a
//! target behind an exit listener (`route`: the relay checks the key's `exits` grant and passes
//! the CONNECT to the exit, whose own allowlist decides); a session whose hello registers a
//! listener is handed to `listen`, which holds the name in `registry` (alone, or as one replica
//! of a pool).
//! Public HTTP requests and public TCP ports reach listeners through the same `route`.
//!
//! Entry points: [`Server::bind`] then [`Server::run`] with a shutdown future (embeddable, tests
//! bind port 0), or [`Server::spawn`] for a handle. Shutdown drains: accept loops stop, sessions
//! get `GoAway`, streams have `drain_timeout` to finish, then everything still open is closed.

mod admin;
mod classic_ws;
mod cluster;
mod guard;
mod listen;
mod listener_limits;
mod memory;
pub mod metrics;
mod mux_server;
mod proxy_header;
mod public_body;
mod public_endpoint;
mod public_h2_window;
mod public_listeners;
mod public_tls;
mod registry;
mod route;
mod session;
mod tunnel_endpoint;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::RelayConfig;
use crate::egress::{allowlist, resolve};
use crate::error::{Error, ErrorCode, Result};
use metrics::{Metrics, Refusal};

/// State shared by every connection task of one relay.
pub(crate) struct RelayState {
    pub(crate) cfg: RelayConfig,
    pub(crate) metrics: Arc<Metrics>,
    /// TLS for the WebSocket endpoint, when a certificate is configured.
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Bounds open transport connections (`max_connections`).
    conn_limit: Arc<Semaphore>,
    /// Cancelled when shutdown begins: stop accepting, send `GoAway`.
    pub(crate) draining: CancellationToken,
    /// Cancelled when the drain deadline passes: close everything.
    pub(crate) kill: CancellationToken,
    /// Every connection and stream task, so shutdown can wait for them.
    pub(crate) tasks: TaskTracker,
    /// Resolves target names (custom DNS servers or the system resolver).
    pub(crate) resolver: resolve::TargetResolver,
    /// Listener names and their sessions.
    pub(crate) registry: registry::Registry,
    /// Who may do what (keys, allowlist, listener grants): replaced whole by a reload.
    access: std::sync::RwLock<Arc<Access>>,
    /// The public HTTP port, when enabled.
    http_port: Option<u16>,
    /// The public HTTPS port, when enabled.
    https_port: Option<u16>,
    /// Failed authentications per source address (`auth_failures_per_minute`).
    pub(crate) auth_limiter: guard::AuthLimiter,
    /// Open multiplexed sessions per key id (`max_sessions_per_key`).
    pub(crate) key_sessions: guard::KeySessions,
    /// The nonces of the early hellos taken recently (each is taken once).
    pub(crate) early_nonces: session::EarlyNonces,
    /// Open connections and handshakes per source, and handshakes in all.
    admissions: Arc<guard::Admissions>,
    /// Public HTTP requests in progress per source (`http_max_requests_per_source`).
    pub(crate) http_per_source: Arc<guard::InFlight<std::net::IpAddr>>,
    /// Public HTTP requests in progress per listener name (`http_max_requests_per_listener`).
    pub(crate) http_per_listener: Arc<guard::InFlight<String>>,
    /// Each source's share of a listener's public request slots.
    pub(crate) http_source_shares: Arc<guard::SourceShares>,
    /// The public endpoints' listener modes, h2 connections, rate windows and TLS.
    pub(crate) public: public_endpoint::Public,
    /// The cluster this relay is a node of (`cluster_redis`), if any.
    pub(crate) cluster: Option<Arc<cluster::Cluster>>,
}

/// The part of the config a running relay can reload (SIGHUP, [`ServerHandle::reload`]): every
/// new session, registration and stream is checked against the current one.
pub(crate) struct Access {
    pub(crate) auth_keys: crate::auth::KeySet,
    pub(crate) allow: allowlist::Allowlist,
    /// Listener public keys, with the chosen names each may register.
    pub(crate) listener_grants: std::collections::HashMap<[u8; 32], Vec<String>>,
    pub(crate) listeners_open: bool,
    /// Exit listener names, with the dialer key ids that may use each.
    pub(crate) exits: std::collections::HashMap<String, Vec<u32>>,
}

impl Access {
    fn from_config(cfg: &RelayConfig) -> Result<Access> {
        cfg.check_serves_someone("TUNNEL_AUTH_KEYS", "TUNNEL_ALLOW")?;
        let mut listener_grants = std::collections::HashMap::new();
        for g in &cfg.listener_keys {
            let pk = crate::identity::parse_public_key(&g.public_key)?;
            listener_grants.entry(pk).or_insert_with(Vec::new).extend(g.names.iter().cloned());
        }
        let mut exits = std::collections::HashMap::new();
        for g in &cfg.exits {
            exits.entry(g.name.clone()).or_insert_with(Vec::new).extend(g.key_ids.iter().copied());
        }
        Ok(Access { auth_keys: cfg.auth_keys.clone(), allow: cfg.allow.clone(), listener_grants, listeners_open: cfg.listeners_open, exits })
    }
}

impl Access {
    /// Whether sessions of key id `kid` may reach targets through the exit listener `exit`.
    pub(crate) fn exit_permits(&self, exit: &str, kid: u32) -> bool {
        self.exits.get(exit).is_some_and(|kids| kids.contains(&kid))
    }

    /// Decide whether `public_key` may register `name`.
    pub(crate) fn authorize(&self, public_key: &[u8; 32], name: &str) -> Result<()> {
        if !crate::identity::valid_name(name) {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!("{name:?} is not a valid listener name: use 1-63 lowercase letters, digits and '-'"),
            ));
        }
        let granted = self.listener_grants.get(public_key);
        if name == crate::identity::derived_name(public_key) {
            if granted.is_some() || self.listeners_open {
                return Ok(());
            }
            return Err(Error::new(
                ErrorCode::NotAllowed,
                "this listener key is not listed on the relay; add its public key to TUNNEL_LISTENER_KEYS (or set TUNNEL_LISTENERS_OPEN=true)",
            ));
        }
        if granted.is_some_and(|names| names.iter().any(|n| n == name)) {
            return Ok(());
        }
        let owned_by_other = self
            .listener_grants
            .iter()
            .any(|(k, names)| k != public_key && (crate::identity::derived_name(k) == name || names.iter().any(|n| n == name)));
        if owned_by_other || name.len() == crate::identity::DERIVED_NAME_LEN {
            return Err(Error::new(
                ErrorCode::NameTaken,
                format!("the name {name:?} belongs to another key; register your key's own name or one the relay grants you"),
            ));
        }
        Err(Error::new(
            ErrorCode::NotAllowed,
            format!("the relay does not grant the name {name:?} to this key; list it under this key in TUNNEL_LISTENER_KEYS"),
        ))
    }
}

impl RelayState {
    /// The current keys, allowlist and listener grants.
    pub(crate) fn access(&self) -> Arc<Access> {
        self.access.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn reload(&self, cfg: &RelayConfig) -> Result<()> {
        let access = Access::from_config(cfg)?;
        note_allow_rules(&cfg.allow, "the relay")?;
        if let Some(tls) = &self.public.tls {
            tls.reload(cfg)?;
        }
        tracing::info!(
            key_ids = ?access.auth_keys.kids(),
            listener_keys = access.listener_grants.len(),
            "reloaded keys, allowlist and listener grants; new sessions, registrations and streams use them"
        );
        *self.access.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(access);
        // Listeners whose key lost its name are told why and closed.
        for (name, owner, session) in self.registry.live() {
            if let Err(e) = self.access().authorize(&owner, &name) {
                tracing::info!(%name, reason = %e, "closing a listener whose key no longer holds its name");
                session.close_with_notice(
                    ErrorCode::NotAllowed,
                    format!("the relay's configuration no longer grants {name:?} to this key: {}", e.message()),
                );
            }
        }
        Ok(())
    }

    /// The public URL routed to a listener name, when the relay has an HTTP port.
    pub(crate) fn public_http_url(&self, name: &str) -> Option<String> {
        let port = self.http_port?;
        Some(if port == 80 { format!("http://{name}.{}", self.cfg.domain) } else { format!("http://{name}.{}:{port}", self.cfg.domain) })
    }

    /// The Prometheus text of `/metrics`: the counters, and the listener sessions from the
    /// registry (what `/sessions` reports as `listener_sessions`).
    pub(crate) fn metrics_text(&self) -> String {
        let mut s = self.metrics.render();
        s.push_str(&format!(
            "# HELP libtunnel_listener_sessions_active Listener sessions registered now (a pool counts each replica).\n# TYPE libtunnel_listener_sessions_active gauge\nlibtunnel_listener_sessions_active {}\n",
            self.registry.live().len()
        ));
        s
    }

    /// The public HTTPS URL of listener `name`, if the relay has an HTTPS port.
    pub(crate) fn public_https_url(&self, name: &str) -> Option<String> {
        let port = self.https_port?;
        Some(if port == 443 { format!("https://{name}.{}", self.cfg.domain) } else { format!("https://{name}.{}:{port}", self.cfg.domain) })
    }
}

/// A bound, not yet running relay.
pub struct Server {
    state: Arc<RelayState>,
    ws: Option<TcpListener>,
    tcp: Option<TcpListener>,
    http: Option<TcpListener>,
    https: Option<TcpListener>,
    admin: Option<TcpListener>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("listen", &self.local_addr()).field("tcp_listen", &self.tcp_addr()).finish()
    }
}

/// The URL other nodes reach this one at: `cluster_advertise`, else the raw-TCP endpoint, else
/// the WebSocket one (bound to a specific IP: 0.0.0.0 says nothing about where to dial).
fn cluster_advertise(c: &crate::config::ClusterConfig, tcp: Option<&TcpListener>, ws: Option<&TcpListener>, tls: bool) -> Result<String> {
    if let Some(a) = &c.advertise {
        return Ok(a.clone());
    }
    let addr = |l: Option<&TcpListener>| l.and_then(|l| l.local_addr().ok()).filter(|a| !a.ip().is_unspecified());
    if let Some(a) = addr(tcp) {
        return Ok(format!("tcp://{a}"));
    }
    if let Some(a) = addr(ws) {
        return Ok(format!("{}://{a}", if tls { "wss" } else { "ws" }));
    }
    Err(Error::config(
        "this cluster node listens on every address (0.0.0.0), so other nodes cannot tell where to reach it: set TUNNEL_CLUSTER_ADVERTISE to the URL they should dial, e.g. tcp://10.0.0.5:7836",
    ))
}

async fn bind(addr: SocketAddr, var: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::new(ErrorCode::Io, format!("cannot listen on {addr} ({var}): {e}; pick a free address or stop what uses it")))
}

/// At start-up: refuse to run when the host's own addresses cannot be listed and a rule could
/// reach one, and log what each broad rule (`0.0.0.0/0`, `*`) leaves out. `who` names the
/// allowlist's owner (the relay, an exit listener).
pub(crate) fn note_allow_rules(allow: &allowlist::Allowlist, who: &str) -> Result<()> {
    let listed = resolve::interface_addresses();
    let host = listed.as_ref().map(|v| v.clone()).unwrap_or_default();
    resolve::check_host_addresses(allow, listed, who)?;
    for note in allow.broad_rule_notes(&host) {
        tracing::info!(owner = who, "{note}");
    }
    Ok(())
}

impl Server {
    /// Validate the config, load TLS, and bind every endpoint.
    pub async fn bind(mut cfg: RelayConfig) -> Result<Server> {
        cfg.limits = cfg.limits.clamped();
        if cfg.listen.is_none() && cfg.tcp_listen.is_none() {
            return Err(Error::config("the relay has no tunnel endpoint: set TUNNEL_LISTEN (WebSocket) or TUNNEL_TCP_LISTEN (raw TCP), or both"));
        }
        cfg.check_admin()?;
        let access = Access::from_config(&cfg)?;
        note_allow_rules(&cfg.allow, "the relay")?;
        let tls = match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(c), Some(k)) => Some(crate::transport::server_tls(c, k)?),
            _ => None,
        };
        let ws = match cfg.listen {
            Some(a) => Some(bind(a, "TUNNEL_LISTEN").await?),
            None => None,
        };
        let tcp = match cfg.tcp_listen {
            Some(a) => Some(bind(a, "TUNNEL_TCP_LISTEN").await?),
            None => None,
        };
        let cfg_dns = cfg.dns_servers.clone();
        let http = match cfg.http_listen {
            Some(a) => Some(bind(a, "TUNNEL_HTTP_LISTEN").await?),
            None => None,
        };
        let public_tls = public_tls::PublicTls::from_config(&cfg)?;
        let https = match (cfg.https_listen, &public_tls) {
            (Some(a), Some(_)) => Some(bind(a, "TUNNEL_HTTPS_LISTEN").await?),
            (Some(_), None) => {
                return Err(Error::config("TUNNEL_HTTPS_LISTEN is set but no certificate: set TUNNEL_PUBLIC_TLS_CERT and TUNNEL_PUBLIC_TLS_KEY"))
            }
            (None, _) => None,
        };
        let admin = match cfg.admin_listen {
            Some(a) => Some(bind(a, "TUNNEL_ADMIN_LISTEN").await?),
            None => None,
        };
        let http_port = http.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.port());
        let https_port = https.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.port());
        let cluster = match &cfg.cluster {
            Some(c) => {
                let advertise = cluster_advertise(c, tcp.as_ref(), ws.as_ref(), tls.is_some())?;
                Some(Arc::new(cluster::Cluster::new(c.clone(), advertise)?))
            }
            None => None,
        };
        let metrics = Arc::new(Metrics::default());
        metrics.cluster.on.store(cluster.is_some(), std::sync::atomic::Ordering::Relaxed);
        let l = &cfg.limits;
        let admissions = guard::Admissions::new(
            guard::AdmissionLimits {
                per_source_connections: l.max_connections_per_source,
                per_source_handshakes: l.max_handshakes_per_source,
                handshakes: l.max_handshakes,
            },
            metrics.clone(),
        );
        let (http_per_source, http_per_listener) =
            (guard::InFlight::new(l.http_max_requests_per_source), guard::InFlight::new(l.http_max_requests_per_listener));
        let state = Arc::new(RelayState {
            admissions,
            http_per_source,
            http_per_listener,
            http_source_shares: guard::SourceShares::new(l.http_max_requests_per_listener),
            public: public_endpoint::Public { listeners: Default::default(), tls: public_tls },
            auth_limiter: guard::AuthLimiter::new(cfg.limits.auth_failures_per_minute),
            key_sessions: guard::KeySessions::default(),
            early_nonces: Default::default(),
            conn_limit: Arc::new(Semaphore::new(cfg.limits.max_connections)),
            cfg,
            metrics,
            tls,
            draining: CancellationToken::new(),
            kill: CancellationToken::new(),
            tasks: TaskTracker::new(),
            resolver: resolve::TargetResolver::new(&cfg_dns)?,
            registry: registry::Registry::default(),
            access: std::sync::RwLock::new(Arc::new(access)),
            http_port,
            https_port,
            cluster,
        });
        Ok(Server { state, ws, tcp, http, https, admin })
    }

    /// Address of the WebSocket endpoint.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.ws.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Address of the raw-TCP endpoint.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Address of the public HTTP port (Host routing to listeners).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Address of the public HTTPS port (TLS, h2, TLS passthrough by SNI).
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Address of the admin endpoint, when `admin_listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The URL dialers use (`ws://` or `wss://` on the WebSocket endpoint, else `tcp://`).
    pub fn url(&self) -> String {
        match (self.local_addr(), self.tcp_addr()) {
            (Some(a), _) => format!("{}://{a}", if self.state.tls.is_some() { "wss" } else { "ws" }),
            (None, Some(a)) => format!("tcp://{a}"),
            // `bind` refuses a config without either endpoint, so a bound server has one.
            (None, None) => String::new(),
        }
    }

    /// Counters (also served on `/metrics`).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.state.metrics.clone()
    }

    /// The lines every face prints when a relay is up (machine-readable, so scripts can find the
    /// ports chosen for `:0`): `relay listening: URL`, then `raw tcp listening: tcp://…` and
    /// `public http listening: http://…` for the endpoints that are on.
    pub fn ready_lines(&self) -> String {
        let mut s = format!("relay listening: {}\n", self.url());
        if let Some(t) = self.tcp_addr() {
            s.push_str(&format!("raw tcp listening: tcp://{t}\n"));
        }
        if let Some(h) = self.http_addr() {
            s.push_str(&format!("public http listening: http://{h}\n"));
        }
        if let Some(h) = self.https_addr() {
            s.push_str(&format!("public https listening: https://{h}\n"));
        }
        if let Some(a) = self.admin_addr() {
            s.push_str(&format!("admin listening: http://{a}\n"));
        }
        s
    }

    /// Serve until `shutdown` resolves, then drain.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let Server { state, ws, tcp, http, https, admin } = self;
        if let Some(l) = https {
            tracing::info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), domain = %state.cfg.domain, "public HTTPS port listening");
            state.tasks.spawn(accept_loop(state.clone(), l, Endpoint::PublicHttps));
        }
        if let Some(l) = admin {
            tracing::info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin endpoint listening (bearer token required)");
            state.tasks.spawn(admin::serve(state.clone(), l));
        }
        if let Some(l) = http {
            tracing::info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), domain = %state.cfg.domain, "public HTTP port listening");
            state.tasks.spawn(accept_loop(state.clone(), l, Endpoint::PublicHttp));
        }
        if let Some(l) = ws {
            tracing::info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), tls = state.tls.is_some(), "tunnel endpoint listening");
            state.tasks.spawn(accept_loop(state.clone(), l, Endpoint::Tunnel));
        }
        if let Some(l) = tcp {
            tracing::info!(addr = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "raw-TCP tunnel endpoint listening");
            state.tasks.spawn(accept_loop(state.clone(), l, Endpoint::RawTcp));
        }
        state.tasks.spawn(memory::return_after_floods(state.metrics.clone(), state.draining.clone()));
        if let Some(c) = &state.cluster {
            tracing::info!(node = %c.node_id, advertise = %c.advertise, redis = %c.cfg.redacted_redis(), "node of a relay cluster");
            c.start(&state);
        }
        shutdown.await;
        tracing::info!(drain_secs = state.cfg.limits.drain_timeout.as_secs_f64(), "relay shutting down; draining open streams");
        state.draining.cancel();
        state.tasks.close();
        if tokio::time::timeout(state.cfg.limits.drain_timeout, state.tasks.wait()).await.is_err() {
            tracing::warn!("drain deadline passed; closing the remaining streams");
            state.kill.cancel();
            state.tasks.wait().await;
        }
        Ok(())
    }

    /// Run in the background; the handle stops it.
    pub fn spawn(self) -> ServerHandle {
        let token = CancellationToken::new();
        let (addr, tcp_addr, http_addr, url, metrics) = (self.local_addr(), self.tcp_addr(), self.http_addr(), self.url(), self.metrics());
        let https_addr = self.https_addr();
        let admin_addr = self.admin_addr();
        let (draining, kill) = (self.state.draining.clone(), self.state.kill.clone());
        let t = token.clone();
        let reloader = self.reloader();
        let join = tokio::spawn(self.run(async move { t.cancelled().await }));
        ServerHandle { addr, tcp_addr, http_addr, https_addr, admin_addr, url, metrics, token, draining, kill, join, reloader }
    }

    /// A handle that reloads this relay's keys, allowlist and listener grants while it runs.
    pub fn reloader(&self) -> Reloader {
        Reloader(self.state.clone())
    }
}

/// Reloads a running relay's keys, allowlist and listener grants, and the public HTTPS port's
/// certificates (`tunnel server` does it on SIGHUP). Other settings (addresses, limits, the
/// tunnel endpoint's TLS) keep their values until a restart. Open
/// sessions stay up; every new session, registration and stream is checked against the new
/// values, so a removed key can open nothing new and a removed allow rule refuses the next stream.
#[derive(Clone)]
pub struct Reloader(Arc<RelayState>);

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reloader")
    }
}

impl Reloader {
    /// Take the reloadable parts of `cfg`; on error the old values stay.
    pub fn reload(&self, cfg: &RelayConfig) -> Result<()> {
        self.0.reload(cfg)
    }
}

/// A relay running in the background.
#[derive(Debug)]
pub struct ServerHandle {
    addr: Option<SocketAddr>,
    tcp_addr: Option<SocketAddr>,
    http_addr: Option<SocketAddr>,
    https_addr: Option<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    url: String,
    metrics: Arc<Metrics>,
    token: CancellationToken,
    /// The relay's own tokens, so `abort` reaches the accept loops and connection tasks (they
    /// are separate tasks, untouched by aborting `run`).
    draining: CancellationToken,
    kill: CancellationToken,
    join: tokio::task::JoinHandle<Result<()>>,
    reloader: Reloader,
}

impl ServerHandle {
    /// Address of the WebSocket endpoint.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.addr
    }
    /// Address of the raw-TCP endpoint.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }
    /// Address of the public HTTP port.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }
    /// Address of the public HTTPS port.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https_addr
    }
    /// Address of the admin endpoint, when `admin_listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The URL dialers use.
    pub fn url(&self) -> &str {
        &self.url
    }
    /// Counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
    /// Reload keys, allowlist and listener grants (see [`Reloader`]).
    pub fn reload(&self, cfg: &RelayConfig) -> Result<()> {
        self.reloader.reload(cfg)
    }
    /// Stop gracefully and wait until drained.
    pub async fn shutdown(self) -> Result<()> {
        self.token.cancel();
        self.join.await.map_err(|e| Error::new(ErrorCode::General, format!("relay task failed: {e}")))?
    }
    /// Stop at once: every connection is dropped (like a crash, for tests of clients).
    pub fn abort(&self) {
        self.draining.cancel();
        self.kill.cancel();
        self.join.abort();
    }
}

/// Which of the relay's three ports a connection arrived on.
#[derive(Clone, Copy)]
enum Endpoint {
    /// `listen`: WebSocket (over TLS when configured), health and metrics.
    Tunnel,
    /// `tcp_listen`: sessions on raw TCP.
    RawTcp,
    /// `http_listen`: public HTTP requests routed to listeners by `Host`.
    PublicHttp,
    /// `https_listen`: the same over TLS (h2 by ALPN), and TLS passthrough by SNI.
    PublicHttps,
}

async fn accept_loop(state: Arc<RelayState>, listener: TcpListener, endpoint: Endpoint) {
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
    let ticket = match state.admissions.admit(peer.ip()) {
        Ok(t) => t,
        Err(why) => {
            state.metrics.refused(why);
            tracing::debug!(%peer, reason = ?why, "connection refused at admission");
            refuse_at_once(sock, speaks_plain_http(state, endpoint), why, &state.cfg.limits);
            return;
        }
    };
    let Ok(permit) = state.conn_limit.clone().try_acquire_owned() else {
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
        Endpoint::PublicHttp => Box::pin(public_endpoint::serve(state, sock, peer)),
        Endpoint::PublicHttps => Box::pin(public_endpoint::serve_tls(state, sock, peer)),
    };
    serve.await
}

/// The tunnel endpoint: TLS when configured, then HTTP (health, metrics, WebSocket upgrades).
async fn serve_tunnel_endpoint(state: Arc<RelayState>, sock: TcpStream, peer: SocketAddr) {
    let io: crate::transport::BoxIo = match state.tls.clone() {
        Some(tls) => {
            let accept = Box::pin(tls.accept(sock));
            match tokio::time::timeout(state.cfg.limits.handshake_timeout, accept).await {
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
