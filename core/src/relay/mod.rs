//! The relay server: this file is its API ([`Server`], [`ServerHandle`], [`Reloader`]); each
//! job has a room of its own.
//!
//! Endpoints, each an accept loop (`accept`: admission by `guard`, the handshake deadline, a
//! trusted load balancer's PROXY header in `proxy_header`):
//! - the **tunnel endpoint** (`listen`, WebSocket over TCP or TLS; `tunnel_endpoint`): the health
//!   path, `/metrics`, and WebSocket upgrades that become Emissary classic connections
//!   (`classic_ws`) or multiplexed sessions;
//! - the **raw-TCP tunnel endpoint** (`tcp_listen`): the same sessions without HTTP;
//! - the **public HTTP and HTTPS ports** (`http_listen`, `https_listen`; `public`): requests whose
//!   `Host` names a listener, h2c, TLS passthrough by SNI, and listeners' public TCP ports;
//! - and, off by default, the **admin endpoint** (`admin_listen`; `admin`): listeners, sessions and
//!   the config in force as JSON, behind a bearer token.
//!
//! After admission, `session` authenticates a client (the keys and grants in force: `access`) and
//! serves its streams: a SOCKS5 CONNECT is either a real target (`crate::egress`: allowlist,
//! resolver, connect), a listener name (`route`), or `HOST@EXIT`, a target behind an exit
//! listener (`route`: the relay checks the key's `exits` grant and passes the CONNECT to the
//! exit, whose own allowlist decides); a session whose hello registers a listener is handed to
//! `listen`, which holds the name in `registry` (alone, or as one replica of a pool). Where a
//! name is held (here, on another node of the `cluster`, nowhere) is asked one way: `names`.
//! Public HTTP requests and public TCP ports reach listeners through the same `route`. Every
//! room shares one `state::RelayState`; `metrics` counts, `memory` returns freed memory.
//!
//! Entry points: [`Server::bind`] then [`Server::run`] with a shutdown future (embeddable, tests
//! bind port 0), or [`Server::spawn`] for a handle. Shutdown drains: accept loops stop, sessions
//! get `GoAway` (listeners a notice naming the drain), streams have `drain_timeout` to finish,
//! each session's last frames are flushed before its task ends, then everything still open is
//! closed.

mod accept;
mod access;
mod admin;
mod classic_ws;
mod cluster;
mod grpc_endpoint;
mod guard;
mod listen;
mod listener_limits;
mod memory;
pub mod metrics;
mod mux_server;
mod names;
mod proxy_header;
mod public;
mod quic_endpoint;
mod registry;
mod route;
mod session;
mod state;
mod tunnel_endpoint;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::RelayConfig;
use crate::egress::resolve;
use crate::error::{Error, ErrorCode, Result};
use accept::{accept_loop, Endpoint};
use access::Access;
use metrics::Metrics;
pub(crate) use state::RelayState;

/// A bound, not yet running relay.
pub struct Server {
    state: Arc<RelayState>,
    ws: Option<TcpListener>,
    tcp: Option<TcpListener>,
    http: Option<TcpListener>,
    https: Option<TcpListener>,
    admin: Option<TcpListener>,
    /// The QUIC tunnel endpoint (`quic_listen`).
    quic: Option<quinn::Endpoint>,
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

impl Server {
    /// Validate the config, load TLS, and bind every endpoint.
    pub async fn bind(mut cfg: RelayConfig) -> Result<Server> {
        cfg.limits = cfg.limits.clamped();
        if cfg.listen.is_none() && cfg.tcp_listen.is_none() {
            return Err(Error::config("the relay has no tunnel endpoint: set TUNNEL_LISTEN (WebSocket) or TUNNEL_TCP_LISTEN (raw TCP), or both"));
        }
        cfg.check_admin()?;
        let access = Access::from_config(&cfg)?;
        resolve::note_allow_rules(&cfg.allow, "the relay")?;
        let tls = match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(c), Some(k)) => Some(crate::transport::server_tls(c, k)?),
            _ => None,
        };
        let quic = match cfg.quic_listen {
            Some(a) => Some(quic_endpoint::bind(&cfg, tls.as_ref(), a)?),
            None => None,
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
        let public_tls = public::tls::PublicTls::from_config(&cfg)?;
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
        let state = Arc::new(RelayState {
            guards: guard::Guards::new(&cfg.limits, metrics.clone()),
            public: public::Public::new(&cfg.limits, public_tls),
            early_nonces: Default::default(),
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
        Ok(Server { state, ws, tcp, http, https, admin, quic })
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

    /// Address of the QUIC tunnel endpoint (UDP), when `quic_listen` is set.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic.as_ref().and_then(|e| e.local_addr().ok())
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
        if let Some(q) = self.quic_addr() {
            s.push_str(&format!("quic listening: quic://{q}\n"));
        }
        s
    }

    /// Serve until `shutdown` resolves, then drain.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let Server { state, ws, tcp, http, https, admin, quic } = self;
        if let Some(e) = &quic {
            tracing::info!(addr = %e.local_addr().map(|a| a.to_string()).unwrap_or_default(), congestion = state.cfg.quic_congestion.name(), "QUIC tunnel endpoint listening");
            state.tasks.spawn(quic_endpoint::accept_loop(state.clone(), e.clone()));
        }
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
        if let Some(e) = quic {
            // The sessions' CONNECTION_CLOSE frames leave before the socket goes (bounded).
            e.close(quinn::VarInt::from_u32(ErrorCode::RelayUnavailable.number()), b"the relay shut down");
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), e.wait_idle()).await;
        }
        Ok(())
    }

    /// Run in the background; the handle stops it.
    pub fn spawn(self) -> ServerHandle {
        let token = CancellationToken::new();
        let (addr, tcp_addr, http_addr, url, metrics) = (self.local_addr(), self.tcp_addr(), self.http_addr(), self.url(), self.metrics());
        let https_addr = self.https_addr();
        let admin_addr = self.admin_addr();
        let quic_addr = self.quic_addr();
        let (draining, kill) = (self.state.draining.clone(), self.state.kill.clone());
        let t = token.clone();
        let reloader = self.reloader();
        let join = tokio::spawn(self.run(async move { t.cancelled().await }));
        ServerHandle { addr, tcp_addr, http_addr, https_addr, admin_addr, quic_addr, url, metrics, token, draining, kill, join, reloader }
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
    quic_addr: Option<SocketAddr>,
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
    /// Address of the QUIC tunnel endpoint (UDP), when `quic_listen` is set.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.quic_addr
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
