//! The listener side of reverse tunnels: hold a session to the relay, register a name with an
//! Ed25519 identity, and accept the streams the relay opens to that name (dialed by name, public
//! HTTP routed by `Host`, or a public TCP port). The session is re-established with jittered,
//! capped exponential backoff and the name re-registered whenever it dies; `accept()` keeps
//! working across reconnects. Streams in flight when a session dies fail on both ends.
//!
//! Backpressure: accepted streams wait in a bounded queue (`backlog`); when it is full, new
//! streams are refused at once (the relay answers 503 / connection refused, or offers the stream
//! to another replica of a pool), never buffered.
//!
//! Pools: with [`ListenerBuilder::pool`] several listeners serve one name as replicas (the relay
//! spreads streams over them); [`Listener::retire`] takes one out of the rotation at once while
//! the streams it already has finish, which is how a rolling restart loses nothing.
//!
//! Exit listeners: with [`ListenerBuilder::exit`] the listener also connects dialers' streams
//! (`dial(target, via=NAME)`) to targets in its own network, with its own allowlist checked by the
//! relay's allowlist code (`crate::egress`: the same rules, and the same checks after DNS), and
//! answers with the same SOCKS5 reply codes. Those streams never reach `accept()`; each is logged
//! (dialer key id, client address, target, outcome) and counted in [`Listener::exit_stats`].
//!
//! With end-to-end encryption on ([`ListenerBuilder::e2e`]) each stream's TLS is terminated here
//! before it is queued (`crate::e2e`): `accept()` hands out plaintext, and a stream that is not a
//! verified E2E dial (plaintext dial, public request, unlisted dialer key) is refused.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::SinkExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::client::events::{EventHub, Events};
use crate::client::handshake::connect_mux;
use crate::client::proxy::{Proxy, ProxyRules};
use crate::client::relays::RelayList;
use crate::e2e::handshake::Accepting;
use crate::e2e::ListenerE2e;
use crate::egress::allowlist::Allowlist;
use crate::egress::connect::{connect_target, Cause};
use crate::egress::resolve::TargetResolver;
use crate::env::ClientEnv;
use crate::error::{Error, ErrorCode, Result};
use crate::identity::Identity;
use crate::mux::{MuxConfig, Role};
use crate::protocol::{ExitHeader, Incoming, ListenAck, ListenHello, Via, STREAM_ACCEPTED};
use crate::session::{Session, SessionStream};
use crate::socks::Target;
use crate::stream::{Inner, TunnelStream};
use crate::transport::{ClientTls, RelayUrl};

/// Longest an accepted stream may take to complete its E2E handshake.
const E2E_HANDSHAKE: Duration = Duration::from_secs(10);

/// Longest an accepted e2e stream may stay silent before it is refused as plaintext
/// (`E2E_REFUSED`): the dialer's ClientHello travels with its CONNECT, so it arrives one
/// listener-relay round trip after the accept; 2 s leaves room for a slow link.
const E2E_FIRST_BYTES: Duration = Duration::from_secs(2);

/// Streams waiting for `accept()` before more are refused, unless a face or
/// [`ListenerBuilder::backlog`] says otherwise: the one default of every face.
pub const DEFAULT_BACKLOG: usize = 128;

/// Who is on the other end of an accepted stream, and how they arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The original client's address as the relay saw it (`ip:port`).
    pub client: String,
    /// How the stream reached the relay.
    pub via: Via,
    /// The port label a dialer asked for (0 = default), or the public TCP port.
    pub port: u16,
    /// Whether the stream is end-to-end encrypted (the listener has e2e on).
    pub e2e: bool,
    /// The dialer's verified Ed25519 public key (e2e in mutual mode).
    pub dialer_key: Option<[u8; 32]>,
    /// The key-derived name of `dialer_key`.
    pub dialer_name: Option<String>,
}

/// What the relay granted this listener.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registration {
    /// The registered name (dial it as `NAME:0`).
    pub name: String,
    /// Public HTTP URL routed to this listener, when the relay has an HTTP port.
    pub http_url: Option<String>,
    /// Public HTTPS URL routed to this listener, when the relay has an HTTPS port.
    pub https_url: Option<String>,
    /// Public TCP address, when asked for and granted.
    pub tcp_addr: Option<String>,
}

/// Builds a [`Listener`].
#[derive(Debug, Clone)]
pub struct ListenerBuilder {
    relay: String,
    identity: Identity,
    name: Option<String>,
    tcp_port: bool,
    h2c: bool,
    tls_passthrough: bool,
    tls: Option<ClientTls>,
    timeout: Duration,
    backlog: usize,
    mux: MuxConfig,
    max_backoff: Duration,
    e2e: Option<ListenerE2e>,
    pool: bool,
    exit: Option<ExitConfig>,
    proxy: Proxy,
    proxy_rules: Option<ProxyRules>,
}

/// An exit listener's rules: the targets it connects to and how it resolves their names.
#[derive(Debug, Clone)]
struct ExitConfig {
    allow: Allowlist,
    dns_servers: Vec<std::net::SocketAddr>,
    connect_timeout: Duration,
    /// Exposes no service: streams dialed to the name (and public requests) are refused.
    only: bool,
}

impl ListenerBuilder {
    /// Join the name's pool of replicas (same key, or keys the relay grants the same name) instead
    /// of taking the name over. Every replica must opt in; without it a second registration gets
    /// today's rules (`NAME_TAKEN` for another key, replacement for the same key).
    pub fn pool(mut self, on: bool) -> Self {
        self.pool = on;
        self
    }
    /// Make this an exit listener: dialers the relay permits (its `exits` setting) reach the
    /// targets `allow` admits through it, `dial("db.internal:5432", via=NAME)`. The rules are the
    /// relay's (`TUNNEL_ALLOW` syntax) and are enforced here, in this network; the relay's own
    /// allowlist does not apply to them.
    pub fn exit(mut self, allow: Allowlist) -> Self {
        self.exit = Some(ExitConfig { allow, dns_servers: Vec::new(), connect_timeout: Duration::from_secs(10), only: false });
        self
    }
    /// With [`ListenerBuilder::exit`]: this exit exposes no service of its own (`tunnel listen
    /// --exit` without `--to`), so a stream dialed to its name or a public request is refused
    /// before it is accepted, and the dialer gets `NOT_ALLOWED` (an HTTP client a 403) naming why.
    pub fn exit_only(mut self, on: bool) -> Self {
        if let Some(e) = &mut self.exit {
            e.only = on;
        }
        self
    }
    /// DNS servers the exit resolves target names with (default: the system resolver), as the
    /// relay's `dns_servers`. Only meaningful with [`ListenerBuilder::exit`].
    pub fn exit_dns_servers(mut self, servers: Vec<std::net::SocketAddr>) -> Self {
        if let Some(e) = &mut self.exit {
            e.dns_servers = servers;
        }
        self
    }

    /// Register this name instead of the key-derived one (the relay must grant it to the key).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
    /// Ask the relay for a public TCP port from its configured range.
    pub fn tcp_port(mut self, on: bool) -> Self {
        self.tcp_port = on;
        self
    }
    /// The local service speaks HTTP/2 with prior knowledge (h2c; a gRPC server): the relay
    /// forwards public HTTP/1.1 and HTTP/2 requests to it as HTTP/2 (default: HTTP/1.1).
    pub fn h2c(mut self, on: bool) -> Self {
        self.h2c = on;
        self
    }
    /// Receive public TLS connections undecrypted: the relay's public TLS port routes a
    /// connection whose ClientHello names this listener (SNI `NAME.<domain>`) here as raw bytes,
    /// and the local service terminates TLS with its own certificate.
    pub fn tls_passthrough(mut self, on: bool) -> Self {
        self.tls_passthrough = on;
        self
    }
    /// Trust for `wss://` relays (default: the public Web PKI).
    pub fn tls(mut self, tls: ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }
    /// The upstream proxy to reach the relay through: [`Proxy::Url`] (HTTP CONNECT, HTTPS or
    /// SOCKS5, credentials in the URL), [`Proxy::Off`], or (the default) [`Proxy::Environment`]:
    /// `TUNNEL_PROXY`, else `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY` with `NO_PROXY`, as curl does.
    pub fn proxy(mut self, proxy: Proxy) -> Self {
        self.proxy = proxy;
        self.proxy_rules = None;
        self
    }

    /// Proxy rules already read (a [`crate::client::ClientConfig`]'s).
    pub(crate) fn proxy_rules(mut self, rules: ProxyRules) -> Self {
        self.proxy_rules = Some(rules);
        self
    }

    /// How long connecting and registering may take (default 20 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
    /// Most accepted streams waiting for `accept()` (default [`DEFAULT_BACKLOG`]); more are refused.
    pub fn backlog(mut self, backlog: usize) -> Self {
        self.backlog = backlog.max(1);
        self
    }
    /// Session tunables (keepalive: ping after 10 s idle, drop after 20 s of silence).
    pub fn mux_config(mut self, cfg: MuxConfig) -> Self {
        self.mux = cfg;
        self
    }
    /// Longest wait between reconnect attempts (default 10 s).
    pub fn max_backoff(mut self, d: Duration) -> Self {
        self.max_backoff = d;
        self
    }

    /// End-to-end encryption: terminate TLS 1.3 (with this listener's key, which its key-derived
    /// name proves) on every stream and refuse plaintext ones; with allowed peers, also require
    /// each dialer's key and admit listed ones only.
    pub fn e2e(mut self, e2e: ListenerE2e) -> Self {
        self.e2e = Some(e2e);
        self
    }

    /// Connect and register. Fails (without retrying) when the first registration is refused or
    /// the relay cannot be reached; after that, lost sessions are re-established in the background.
    pub async fn bind(self) -> Result<Listener> {
        let rules = match &self.proxy_rules {
            Some(r) => r.clone(),
            None => ProxyRules::resolve(&self.proxy, &ClientEnv::Process)?,
        };
        let relays = RelayList::parse(&self.relay)?.with_proxy(&rules);
        let name = self.name.clone().unwrap_or_else(|| self.identity.name());
        if !crate::identity::valid_name(&name) {
            return Err(Error::argument(format!(
                "listener name {name:?} is not valid: use 1-63 lowercase letters, digits and '-', not starting or ending with '-'"
            )));
        }
        if self.exit.as_ref().is_some_and(|e| e.allow.is_empty()) {
            return Err(Error::argument("an exit listener needs at least one allow rule, like [{\"host\": \"db.internal\", \"port\": 5432}]"));
        }
        if let Some(e) = &self.exit {
            crate::egress::resolve::note_allow_rules(&e.allow, "this exit listener")?;
        }
        let exit = match &self.exit {
            Some(e) => Some(Arc::new(ExitState { resolver: TargetResolver::new(&e.dns_servers)?, cfg: e.clone(), stats: ExitCounters::default() })),
            None => None,
        };
        let e2e = self.e2e.clone().map(|e| Accepting::new(&self.identity, e)).transpose()?;
        let (queue_tx, queue_rx) = mpsc::channel(self.backlog);
        let cfg = Arc::new(Config {
            relays,
            name,
            builder: self,
            exit,
            e2e,
            instance: rand::random(),
            events: Arc::new(EventHub::new()),
            retiring: CancellationToken::new(),
            draining: CancellationToken::new(),
        });
        let (session, reg) = register(&cfg).await?;
        cfg.events.connected(cfg.relays.current().url.as_str(), Some(&reg.name));
        let (reg_tx, reg_rx) = watch::channel(reg);
        let cancel = CancellationToken::new();
        let current = Arc::new(Mutex::new(Some(session.clone())));
        let ended = Arc::new(Mutex::new(None));
        tokio::spawn(supervise(cfg.clone(), session, queue_tx, reg_tx, cancel.clone(), current.clone(), ended.clone()));
        Ok(Listener {
            registration: reg_rx,
            queue: tokio::sync::Mutex::new(queue_rx),
            cancel,
            current,
            ended,
            draining: cfg.draining.clone(),
            retiring: cfg.retiring.clone(),
            exit: cfg.exit.clone(),
            events: cfg.events.clone(),
        })
    }
}

struct Config {
    relays: RelayList,
    /// This listener object's random id, sent in every registration (`ListenHello::instance`).
    instance: [u8; 16],
    /// Cancelled by [`Listener::retire`]: from then on a stream the relay offers is refused before
    /// it is accepted, so the relay moves it to another replica of the pool.
    retiring: CancellationToken,
    /// Cancelled by [`Listener::shutdown`]: the session it drains ends by our own wish, so the
    /// supervisor neither reports a lost session nor reconnects.
    draining: CancellationToken,
    name: String,
    builder: ListenerBuilder,
    e2e: Option<Accepting>,
    exit: Option<Arc<ExitState>>,
    /// Connection-state events ([`Listener::events`]).
    events: Arc<EventHub>,
}

struct ExitState {
    cfg: ExitConfig,
    resolver: TargetResolver,
    stats: ExitCounters,
}

impl std::fmt::Debug for ExitState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExitState").field("allow", &self.cfg.allow.describe()).field("stats", &self.stats).finish()
    }
}

#[derive(Debug, Default)]
struct ExitCounters {
    connected: std::sync::atomic::AtomicU64,
    not_allowed: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
    bytes_in: std::sync::atomic::AtomicU64,
    bytes_out: std::sync::atomic::AtomicU64,
}

/// An exit listener's counters since it was bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitStats {
    /// Streams connected to their target.
    pub connected: u64,
    /// Streams refused by the exit's allowlist (before or after DNS).
    pub not_allowed: u64,
    /// Streams whose target could not be resolved, reached or connected in time.
    pub failed: u64,
    /// Bytes from dialers to targets.
    pub bytes_to_targets: u64,
    /// Bytes from targets to dialers.
    pub bytes_from_targets: u64,
}

/// A registered listener. Dropping it (or [`Listener::close`]) unregisters the name.
#[derive(Debug)]
pub struct Listener {
    registration: watch::Receiver<Registration>,
    queue: tokio::sync::Mutex<mpsc::Receiver<(TunnelStream, PeerInfo)>>,
    cancel: CancellationToken,
    current: Arc<Mutex<Option<Session>>>,
    /// Why the listener stopped on its own (its name was taken over), for `accept()` to report.
    ended: Arc<Mutex<Option<(ErrorCode, String)>>>,
    /// Set by [`Listener::shutdown`]: `accept()` hands out nothing more.
    draining: CancellationToken,
    /// Set by [`Listener::retire`]: nothing new is queued; `accept()` hands out what was.
    retiring: CancellationToken,
    exit: Option<Arc<ExitState>>,
    events: Arc<EventHub>,
}

impl Listener {
    /// Register `identity` with the relay at `relay` under its key-derived name.
    pub async fn bind(relay: &str, identity: Identity) -> Result<Listener> {
        Listener::builder(relay, identity).bind().await
    }

    /// A builder for the other options.
    pub fn builder(relay: &str, identity: Identity) -> ListenerBuilder {
        ListenerBuilder {
            relay: relay.to_string(),
            identity,
            name: None,
            tcp_port: false,
            h2c: false,
            tls_passthrough: false,
            tls: None,
            timeout: Duration::from_secs(20),
            backlog: DEFAULT_BACKLOG,
            mux: MuxConfig::default(),
            max_backoff: Duration::from_secs(10),
            pool: false,
            exit: None,
            proxy: Proxy::Environment,
            proxy_rules: None,
            e2e: None,
        }
    }

    /// The registered name.
    pub fn name(&self) -> String {
        self.registration.borrow().name.clone()
    }

    /// Everything the relay granted (name, public HTTP URL, public TCP address).
    pub fn registration(&self) -> Registration {
        self.registration.borrow().clone()
    }

    /// Wait for the next stream. Fails with `CLOSED` once the listener is closed, with
    /// `NAME_TAKEN` once another session of the same key took its name over, or with `NOT_ALLOWED`
    /// once a config reload withdrew the name (then it stops rather than reconnecting).
    pub async fn accept(&self) -> Result<(TunnelStream, PeerInfo)> {
        let mut q = self.queue.lock().await;
        let next = loop {
            if self.retiring.is_cancelled() && !self.draining.is_cancelled() {
                // Retiring: no new stream can be queued, the ones already there are handed out.
                q.close();
                break tokio::select! {
                    next = q.recv() => next,
                    _ = self.cancel.cancelled() => None,
                };
            }
            tokio::select! {
                next = q.recv() => break next,
                _ = self.cancel.cancelled() => break None,
                _ = self.draining.cancelled() => break None,
                _ = self.retiring.cancelled() => continue,
            }
        };
        next.ok_or_else(|| {
            let ended = self.ended.lock().unwrap_or_else(|p| p.into_inner()).clone();
            ended.map_or_else(|| Error::new(ErrorCode::Closed, "the listener is closed"), |(code, why)| Error::new(code, why))
        })
    }

    /// Connection-state events from now on: `Disconnected` when the session to the relay ends
    /// (with the cause), `Reconnecting` before each retry, `Connected` once re-registered; the
    /// subscription ends after [`Listener::close`] (whose `Disconnected` has code `CLOSED`).
    pub fn events(&self) -> Events {
        self.events.subscribe()
    }

    /// Whether a session to the relay is up right now (it is re-established in the background).
    pub fn is_connected(&self) -> bool {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|s| !s.is_closed())
    }

    /// Stop gracefully: the relay is told to send nothing new, streams queued but not accepted
    /// are refused, `accept()` fails with `CLOSED`, and the session (and the name) is released
    /// once every accepted stream has finished, or when `drain` passes (then they fail). Returns
    /// whether every stream finished in time. Use it instead of [`Listener::close`] when
    /// accepted streams may still be carrying data (e.g. sockets handed to other code).
    pub async fn shutdown(&self, drain: Duration) -> bool {
        self.draining.cancel();
        let session = self.current.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(s) = &session {
            s.go_away();
        }
        {
            let mut q = self.queue.lock().await;
            q.close();
            while q.try_recv().is_ok() {} // dropping a queued stream resets it
        }
        let drained = match session {
            Some(s) => s.drain(drain, "the listener was shut down").await,
            None => true,
        };
        self.close();
        drained
    }

    /// Leave the rotation (a rolling restart): the relay is told at once to send nothing new
    /// (a pool's other replicas take the new streams), streams already queued are still handed
    /// out by `accept()`, which then fails with `CLOSED`; streams already accepted keep running.
    /// Call [`Listener::shutdown`] (or `close`) once they have finished.
    pub fn retire(&self) {
        self.retiring.cancel();
        if let Some(s) = self.current.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            s.go_away();
        }
    }

    /// Whether this is an exit listener.
    pub fn is_exit(&self) -> bool {
        self.exit.is_some()
    }

    /// An exit listener's counters (who connected where is in its log); `None` for other listeners.
    pub fn exit_stats(&self) -> Option<ExitStats> {
        use std::sync::atomic::Ordering::Relaxed;
        self.exit.as_ref().map(|e| ExitStats {
            connected: e.stats.connected.load(Relaxed),
            not_allowed: e.stats.not_allowed.load(Relaxed),
            failed: e.stats.failed.load(Relaxed),
            bytes_to_targets: e.stats.bytes_in.load(Relaxed),
            bytes_from_targets: e.stats.bytes_out.load(Relaxed),
        })
    }

    /// Unregister and stop; pending and future `accept()` calls fail with `CLOSED`.
    pub fn close(&self) {
        self.cancel.cancel();
        // Kept (closed) for `finished`.
        if let Some(s) = self.current.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            s.close(ErrorCode::Closed, "the listener was closed");
        }
        self.events.disconnected(Some(&Error::new(ErrorCode::Closed, "the listener was closed")));
        self.events.end();
    }
}

impl Listener {
    /// Resolves once the listener is closed and its session's close has gone out to the relay
    /// (bounded): what a process awaits before it exits, so the relay sees a clean close.
    pub fn finished(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (cancel, current) = (self.cancel.clone(), self.current.clone());
        async move {
            cancel.cancelled().await;
            let session = current.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(s) = session {
                s.finished().await;
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.close();
    }
}

/// Connect, register, and return the session and what the relay granted.
async fn register(cfg: &Config) -> Result<(Session, Registration)> {
    cfg.relays.try_each(|url| async move { register_at(cfg, &url).await }).await
}

/// [`register`] with one relay.
async fn register_at(cfg: &Config, url: &RelayUrl) -> Result<(Session, Registration)> {
    let b = &cfg.builder;
    let attempt = async {
        let (mut link, answer) = connect_mux(url, b.tls.as_ref(), &b.mux, |nonce| {
            ListenHello {
                public_key: b.identity.public_key().to_vec(),
                signature: b.identity.sign_registration(nonce, &cfg.name).to_vec(),
                name: cfg.name.clone(),
                tcp_port: b.tcp_port,
                pool: b.pool,
                exit: b.exit.is_some(),
                h2c: b.h2c,
                tls_passthrough: b.tls_passthrough,
                instance: cfg.instance.to_vec(),
            }
            .encode_frame()
        })
        .await?;
        let ack = match ListenAck::decode_frame(&answer) {
            Ok(a) => a,
            Err(e) => {
                let _ = link.sink.close().await;
                return Err(Error::new(e.code(), format!("the relay at {} refused to register {:?}: {}", url.url, cfg.name, e.message())));
            }
        };
        // A relay that predates pools or exits ignores the request; say so instead of running as
        // something else than asked.
        for (asked, granted, what) in [(b.pool, ack.pool, "pools (--pool)"), (b.exit.is_some(), ack.exit, "exit listeners (--exit)")] {
            if asked && !granted {
                let _ = link.sink.close().await;
                return Err(Error::new(ErrorCode::Protocol, format!("the relay at {} does not support {what}; upgrade the relay", url.url)));
            }
        }
        let reg = Registration {
            name: ack.name,
            http_url: Some(ack.http_url).filter(|s| !s.is_empty()),
            https_url: Some(ack.https_url).filter(|s| !s.is_empty()),
            tcp_addr: Some(ack.tcp_addr).filter(|s| !s.is_empty()),
        };
        Ok((Session::start(Role::Client, link, b.mux.clone()), reg))
    };
    tokio::time::timeout(b.timeout, attempt)
        .await
        .map_err(|_| Error::new(ErrorCode::Timeout, format!("registering with the relay at {} timed out after {:?}", url.url, b.timeout)))?
}

/// Serve the current session; when it dies, reconnect with backoff and re-register.
async fn supervise(
    cfg: Arc<Config>,
    mut session: Session,
    queue: mpsc::Sender<(TunnelStream, PeerInfo)>,
    reg_tx: watch::Sender<Registration>,
    cancel: CancellationToken,
    current: Arc<Mutex<Option<Session>>>,
    ended: Arc<Mutex<Option<(ErrorCode, String)>>>,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                session.close(ErrorCode::Closed, "the listener was closed");
                return;
            }
            _ = serve_session(&session, &queue, cfg.exit.as_ref(), cfg.e2e.as_ref(), &cfg.retiring) => {}
        }
        // `close()` cancels, then closes the session: either branch may have been taken.
        if cancel.is_cancelled() {
            session.close(ErrorCode::Closed, "the listener was closed");
            return;
        }
        if cfg.draining.is_cancelled() {
            return; // Listener::shutdown drained this session and closes the listener next
        }
        let reason = session.close_reason();
        if let Some(e) = reason.as_ref().filter(|e| e.code().is_final()) {
            // Another live session of our key holds the name now (reconnecting would take it back
            // and start a tug of war), or the relay no longer grants it. Stop; accept() says why.
            return end_for_good(&cfg, &ended, &cancel, e);
        }
        if !cancel.is_cancelled() {
            cfg.events.disconnected(reason.as_ref());
        }
        let why = reason.map(|e| e.to_string()).unwrap_or_else(|| "session ended".into());
        tracing::warn!(name = %cfg.name, reason = %why, "lost the relay session; reconnecting");
        let mut delay = Duration::from_millis(100);
        let mut attempt = 0;
        session = loop {
            let jittered = delay.mul_f64(rand::random::<f64>() * 0.5 + 0.75);
            attempt += 1;
            cfg.events.reconnecting(attempt, jittered);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(jittered) => {}
            }
            match register(&cfg).await {
                Ok((s, reg)) => {
                    tracing::info!(name = %reg.name, "re-registered with the relay");
                    cfg.events.connected(cfg.relays.current().url.as_str(), Some(&reg.name));
                    let _ = reg_tx.send(reg);
                    break s;
                }
                // A refusal (the name is someone else's now, or a newer registration of our key
                // replaced us; the key or the name is no longer granted): retrying would not
                // change that, or would start a tug of war.
                Err(e) if e.code().is_final() => return end_for_good(&cfg, &ended, &cancel, &e),
                Err(e) => {
                    tracing::warn!(name = %cfg.name, error = %e, retry_in = ?delay, "re-registering failed");
                    delay = (delay * 2).min(cfg.builder.max_backoff);
                }
            }
        };
        *current.lock().unwrap_or_else(|p| p.into_inner()) = Some(session.clone());
        if cancel.is_cancelled() {
            session.close(ErrorCode::Closed, "the listener was closed");
            return;
        }
    }
}

/// The relay ended this listener's registration for good: stop, and let `accept()` say why.
fn end_for_good(cfg: &Config, ended: &Mutex<Option<(ErrorCode, String)>>, cancel: &CancellationToken, e: &Error) {
    tracing::error!(name = %cfg.name, reason = %e, "the relay ended this listener's registration for good; stopping");
    *ended.lock().unwrap_or_else(|p| p.into_inner()) = Some((e.code(), e.message().to_string()));
    cancel.cancel();
    cfg.events.disconnected(Some(e));
    cfg.events.end();
}

/// Accept the relay's streams on one session until it ends.
async fn serve_session(
    session: &Session,
    queue: &mpsc::Sender<(TunnelStream, PeerInfo)>,
    exit: Option<&Arc<ExitState>>,
    e2e: Option<&Accepting>,
    retiring: &CancellationToken,
) {
    while let Some(stream) = session.accept().await {
        let (queue, exit, retiring) = (queue.clone(), exit.cloned(), retiring.clone());
        let e2e = e2e.cloned();
        tokio::spawn(async move {
            if let Err(e) = admit(stream, &queue, exit, e2e.as_ref(), &retiring).await {
                tracing::debug!(error = %e, "incoming stream dropped");
            }
        });
    }
}

/// Read the stream header, queue the stream for `accept()` (or refuse it when the queue is
/// full), then tell the relay it was accepted. With e2e, the TLS handshake runs between the two
/// (holding the queue slot, so at most `backlog` handshakes are in progress). Exit streams are
/// served here (`serve_exit`) and never queued.
async fn admit(
    mut stream: SessionStream,
    queue: &mpsc::Sender<(TunnelStream, PeerInfo)>,
    exit: Option<Arc<ExitState>>,
    e2e: Option<&Accepting>,
    retiring: &CancellationToken,
) -> Result<()> {
    let header = match tokio::time::timeout(Duration::from_secs(10), Incoming::read_from(&mut stream)).await {
        Ok(Ok(Incoming::Stream(h))) => h,
        Ok(Ok(Incoming::Exit(h))) => {
            let Some(exit) = exit else {
                stream.reset(ErrorCode::Protocol);
                return Err(Error::protocol("the relay sent an exit stream to a listener that is not an exit"));
            };
            return serve_exit(stream, h, &exit).await;
        }
        Ok(Err(e)) => {
            stream.reset(ErrorCode::Protocol);
            return Err(e);
        }
        Err(_) => {
            stream.reset(ErrorCode::Timeout);
            return Err(Error::new(ErrorCode::Timeout, "the relay sent no stream header"));
        }
    };
    // Refusals known before accepting go back to the relay as their code, which it hands on.
    let refusal = if exit.as_ref().is_some_and(|x| x.cfg.only) {
        Some((ErrorCode::NotAllowed, "refused a stream to this exit listener's name: it exposes no service (dial through it with --via)"))
    } else if e2e.is_some() && header.via == Via::Http {
        Some((ErrorCode::E2eRefused, "refused a public HTTP request: this listener is end-to-end encrypted (only e2e dials reach it)"))
    } else {
        None
    };
    if let Some((code, why)) = refusal {
        tracing::info!(client = %header.client, via = header.via.as_str(), code = %code, "{why}");
        let _ = stream.write_all(&[code.number() as u8]).await;
        stream.finish();
        return Err(Error::new(code, why));
    }
    // A retired replica takes nothing new, even a stream the relay offered before it heard the
    // retirement: refused before accepting, it moves to another replica.
    if retiring.is_cancelled() {
        stream.reset(ErrorCode::Refused);
        return Err(Error::new(ErrorCode::Refused, "refused a stream: this replica retired from its pool"));
    }
    let permit = match queue.try_reserve() {
        Ok(p) => p,
        Err(_) => {
            stream.reset(ErrorCode::Refused);
            return Err(Error::new(ErrorCode::Refused, "the accept queue is full; refused a stream (call accept() faster or raise the backlog)"));
        }
    };
    stream.write_all(&[STREAM_ACCEPTED]).await.map_err(|e| Error::from_io(e, "accepting a stream"))?;
    let target = Target { host: header.client.clone(), port: header.port };
    let mut peer = PeerInfo { client: header.client, via: header.via, port: header.port, e2e: false, dialer_key: None, dialer_name: None };
    let inner = match e2e {
        None => Inner::Mux(stream),
        Some(e2e) => {
            let tls = match tokio::time::timeout(E2E_HANDSHAKE, e2e.accept(stream, E2E_FIRST_BYTES)).await {
                Ok(r) => r?,
                Err(_) => return Err(Error::new(ErrorCode::E2eRefused, "dropped a stream whose end-to-end handshake did not finish within 10 s")),
            };
            peer.e2e = true;
            peer.dialer_key = tls.peer_key();
            peer.dialer_name = peer.dialer_key.as_ref().map(crate::identity::derived_name);
            Inner::E2e(Box::new(tls))
        }
    };
    permit.send((TunnelStream::new(inner, target), peer));
    Ok(())
}

/// An exit stream: accept it, read the dialer's CONNECT, check it against the exit's allowlist
/// (the relay's code: rules before DNS and again on every resolved address), connect, answer with
/// the SOCKS5 reply, and carry the bytes.
async fn serve_exit(mut stream: SessionStream, h: ExitHeader, exit: &ExitState) -> Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    stream.write_all(&[STREAM_ACCEPTED]).await.map_err(|e| Error::from_io(e, "accepting an exit stream"))?;
    let req = match tokio::time::timeout(Duration::from_secs(10), socks5_proto::Request::read_from(&mut stream)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let _ = crate::socks::write_reply(&mut stream, socks5_proto::Reply::GeneralFailure, None).await;
            return Err(Error::protocol(format!("malformed CONNECT on an exit stream ({e})")));
        }
        Err(_) => {
            stream.reset(ErrorCode::Timeout);
            return Err(Error::new(ErrorCode::Timeout, "the relay sent no CONNECT on an exit stream"));
        }
    };
    let target = Target::from_address(&req.address).map(|t| t.to_string()).unwrap_or_default();
    let (kid, client) = (h.kid, h.client);
    match connect_target(&req.address, &exit.cfg.allow, &exit.resolver, exit.cfg.connect_timeout).await {
        Ok(tcp) => {
            let bound = tcp.local_addr().ok();
            crate::socks::write_reply(&mut stream, socks5_proto::Reply::Succeeded, bound)
                .await
                .map_err(|e| Error::from_io(e, "answering an exit stream"))?;
            exit.stats.connected.fetch_add(1, Relaxed);
            tracing::info!(kid, %client, %target, "exit: dialer connected to target");
            let moved = crate::stream::bridge(stream, tcp).await;
            if let Ok((up, down)) = &moved {
                // bridge counts (target → dialer, dialer → target).
                exit.stats.bytes_out.fetch_add(*up, Relaxed);
                exit.stats.bytes_in.fetch_add(*down, Relaxed);
            }
            match moved {
                Ok((up, down)) => tracing::debug!(kid, %client, %target, up, down, "exit: connection finished"),
                Err(e) => tracing::debug!(kid, %client, %target, error = %e, "exit: connection ended with an error"),
            }
            Ok(())
        }
        Err(f) => {
            if f.reason == Cause::NotAllowed {
                exit.stats.not_allowed.fetch_add(1, Relaxed);
                tracing::info!(kid, %client, %target, detail = %f.detail, "exit: target refused by the exit's allowlist");
            } else {
                exit.stats.failed.fetch_add(1, Relaxed);
                tracing::info!(kid, %client, %target, detail = %f.detail, "exit: target not reached");
            }
            let _ = crate::socks::write_reply(&mut stream, f.reply, None).await;
            stream.finish();
            Ok(())
        }
    }
}
