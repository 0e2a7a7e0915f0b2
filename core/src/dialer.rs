//! The client side: open streams to `host:port` through a relay. In multiplexed mode one
//! authenticated session is shared by every dial and re-established when it dies; in classic mode
//! each dial is its own Emissary connection. With end-to-end encryption on
//! ([`DialerBuilder::e2e`]), dials to listener names run TLS inside the stream (`crate::e2e`).

use std::sync::Arc;
use std::time::Duration;

use crate::auth::Key;
use crate::client::events::{EventHub, Events};
use crate::client::handshake::{self, EarlyGate};
use crate::client::proxy::{Proxy, ProxyRules};
use crate::client::relays::RelayList;
use crate::e2e::handshake::Dialing;
use crate::e2e::DialerE2e;
use crate::env::ClientEnv;
use crate::error::{Error, ErrorCode, Result};
use crate::mux::{MuxConfig, Role};
use crate::protocol::{self, Hello, HelloAck, ServerConnect};
use crate::session::{Link, Session, SessionStream};
use crate::socks::{self, Target};
use crate::stream::{Inner, LocalSocket, Mode, TunnelStream};
use crate::transport::{self, ClientTls, Connected, WsByteStream};
use futures_util::future::Either;

/// Emissary's client keepalive period in classic mode.
pub const CLASSIC_PING: Duration = Duration::from_secs(30);

/// Builds a [`Dialer`].
#[derive(Debug, Clone)]
pub struct DialerBuilder {
    relay: String,
    key: Option<Key>,
    mode: Mode,
    tls: Option<ClientTls>,
    timeout: Duration,
    mux: MuxConfig,
    via: Option<String>,
    e2e: Option<DialerE2e>,
    proxy: Proxy,
    proxy_rules: Option<ProxyRules>,
    relay_timing: Option<(Duration, Duration)>,
}

impl DialerBuilder {
    /// With several relay URLs: try the first again after `again` on a later one (default
    /// [`crate::client::relays::PREFERRED_AGAIN_AFTER`]) and give up an attempt after `attempt`
    /// ([`crate::client::relays::ATTEMPT_BOUND`]). For tests.
    #[doc(hidden)]
    pub fn relay_timing(mut self, again: Duration, attempt: Duration) -> Self {
        self.relay_timing = Some((again, attempt));
        self
    }

    /// Reach every target through the exit listener `name` (the `via` option; `tunnel socks
    /// --via NAME`): the relay routes each dial to that exit, which connects inside its network.
    pub fn via(mut self, name: impl Into<String>) -> Self {
        self.via = Some(name.into());
        self
    }

    /// The shared secret (required).
    pub fn key(mut self, key: Key) -> Self {
        self.key = Some(key);
        self
    }

    /// Multiplexed (default) or classic Emissary mode.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
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

    /// Trust for `wss://` relays (default: the public Web PKI).
    pub fn tls(mut self, tls: ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// How long one dial may take, session setup included (default 20 s, Emissary's handshake timeout).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Session tunables (keepalive, limits).
    pub fn mux_config(mut self, cfg: MuxConfig) -> Self {
        self.mux = cfg;
        self
    }

    /// End-to-end encryption for dials to listener names: TLS 1.3 inside the stream, the
    /// listener's key checked against the name dialed (or its pin). Other targets are refused.
    pub fn e2e(mut self, e2e: DialerE2e) -> Self {
        self.e2e = Some(e2e);
        self
    }

    /// Check the settings; no network I/O happens until the first dial.
    pub fn build(self) -> Result<Dialer> {
        let rules = match &self.proxy_rules {
            Some(r) => r.clone(),
            None => ProxyRules::resolve(&self.proxy, &ClientEnv::Process)?,
        };
        let mut relays = RelayList::parse(&self.relay)?.with_proxy(&rules);
        if let Some((again, attempt)) = self.relay_timing {
            relays = relays.with_timing(again, attempt);
        }
        let key = self.key.ok_or_else(|| Error::argument("the dialer needs a shared key (KID:BASE64); set TUNNEL_KEY or pass --key"))?;
        if let Some(v) = &self.via {
            Target { host: "x".into(), port: 1 }.through_exit(v)?;
        }
        if self.e2e.is_some() && self.mode == Mode::Classic {
            return Err(Error::argument(
                "end-to-end encryption needs multiplexed mode (classic Emissary streams cannot reach listeners); drop --classic or e2e",
            ));
        }
        let e2e = self.e2e.map(Dialing::new).transpose()?;
        Ok(Dialer {
            inner: Arc::new(DialerInner {
                relays,
                key,
                mode: self.mode,
                tls: self.tls,
                timeout: self.timeout,
                mux: self.mux,
                via: self.via,
                e2e,
                session: tokio::sync::Mutex::new(None),
                moving: std::sync::atomic::AtomicBool::new(false),
                events: Arc::new(EventHub::new()),
            }),
        })
    }
}

/// How long the streams of a session the dialer moved away from may take to finish.
const DRAIN_AFTER_MOVE: Duration = Duration::from_secs(600);

struct DialerInner {
    relays: RelayList,
    key: Key,
    mode: Mode,
    tls: Option<ClientTls>,
    timeout: Duration,
    mux: MuxConfig,
    /// The exit listener every dial goes through, if any.
    via: Option<String>,
    e2e: Option<Dialing>,
    /// The shared session (multiplexed mode); replaced when it dies. The lock is held while a new
    /// session is being set up, so concurrent dials wait for one handshake instead of racing.
    session: tokio::sync::Mutex<Option<Session>>,
    /// A move to the preferred relay URL is under way ([`Dialer::move_to_preferred`]).
    moving: std::sync::atomic::AtomicBool,
    /// Connection-state events ([`Dialer::events`]); a session's watcher holds it weakly.
    events: Arc<EventHub>,
}

/// Opens streams through a relay. Cheap to clone; clones share the session.
#[derive(Clone)]
pub struct Dialer {
    inner: Arc<DialerInner>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer").field("relay", &self.inner.relays.current().url.as_str()).field("mode", &self.inner.mode).finish()
    }
}

impl Dialer {
    /// A multiplexed dialer for `relay` (`ws://`, `wss://` or `tcp://`) with a shared key.
    pub fn new(relay: &str, key: Key) -> Result<Dialer> {
        Dialer::builder(relay).key(key).build()
    }

    /// Start building a dialer.
    pub fn builder(relay: &str) -> DialerBuilder {
        DialerBuilder {
            relay: relay.to_string(),
            key: None,
            mode: Mode::Multiplexed,
            tls: None,
            timeout: Duration::from_secs(20),
            mux: MuxConfig::default(),
            via: None,
            proxy: Proxy::Environment,
            proxy_rules: None,
            e2e: None,
            relay_timing: None,
        }
    }

    /// The relay URL.
    pub fn relay(&self) -> &str {
        self.inner.relays.current().url.as_str()
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.inner.mode
    }

    /// Connection-state events from now on (multiplexed mode): `Connected` whenever a session is
    /// authenticated (on [`Dialer::connect`], or on the first dial after a loss: a dialer
    /// reconnects on demand, not in the background), `Disconnected` with the cause when it ends
    /// (`CLOSED` after [`Dialer::close`]). The subscription ends when the dialer is dropped.
    pub fn events(&self) -> Events {
        self.inner.events.subscribe()
    }

    /// Whether dials are end-to-end encrypted.
    pub fn is_e2e(&self) -> bool {
        self.inner.e2e.is_some()
    }

    /// Open a stream to `target` (`host:port`) through the relay. Dropping the future cancels
    /// the dial: a session still in its handshake is closed, and the next dial starts afresh.
    pub async fn dial(&self, target: &str) -> Result<TunnelStream> {
        let target = Target::parse(target)?;
        self.dial_target(&target).await
    }

    /// Open a stream to `target` through the exit listener `via` (the `via=NAME` option): the
    /// relay routes it to that exit, which checks its own allowlist and connects in its network.
    pub async fn dial_via(&self, target: &str, via: &str) -> Result<TunnelStream> {
        self.dial_target(&route(target, Some(via))?).await
    }

    /// A dialer with the same settings whose dials all go through the exit listener `name`
    /// ([`DialerBuilder::via`]); it opens its own session.
    pub fn with_via(&self, name: &str) -> Result<Dialer> {
        Target { host: "x".into(), port: 1 }.through_exit(name)?;
        let i = &self.inner;
        Ok(Dialer {
            inner: Arc::new(DialerInner {
                relays: i.relays.clone(),
                key: i.key.clone(),
                mode: i.mode,
                tls: i.tls.clone(),
                timeout: i.timeout,
                mux: i.mux.clone(),
                via: Some(name.to_string()),
                e2e: i.e2e.clone(),
                session: tokio::sync::Mutex::new(None),
                moving: std::sync::atomic::AtomicBool::new(false),
                events: Arc::new(EventHub::new()),
            }),
        })
    }

    /// The exit listener every dial goes through ([`DialerBuilder::via`]).
    pub fn via(&self) -> Option<&str> {
        self.inner.via.as_deref()
    }

    /// `target` as this dialer sends it: through its default exit, unless it names one already.
    pub fn route(&self, target: &Target) -> Result<Target> {
        match &self.inner.via {
            Some(v) if target.exit_route().is_none() => target.through_exit(v),
            _ => Ok(target.clone()),
        }
    }

    /// [`Dialer::dial`] with a parsed target.
    pub async fn dial_target(&self, target: &Target) -> Result<TunnelStream> {
        let routed = self.route(target)?;
        let target = &routed;
        let t = self.inner.timeout;
        let work = async {
            match self.inner.mode {
                Mode::Classic => self.dial_classic(target).await,
                Mode::Multiplexed => self.dial_mux(target).await,
            }
        };
        match tokio::time::timeout(t, work).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                ErrorCode::Timeout,
                format!(
                    "dialing {target} through {} took longer than {:.1}s; is the relay reachable?",
                    self.inner.relays.current().url,
                    t.as_secs_f64()
                ),
            )),
        }
    }

    /// Establish the shared session now (multiplexed mode), so the first dial is fast and a wrong
    /// key fails early.
    pub async fn connect(&self) -> Result<()> {
        if self.inner.mode == Mode::Multiplexed {
            tokio::time::timeout(self.inner.timeout, self.session())
                .await
                .map_err(|_| Error::new(ErrorCode::Timeout, format!("connecting to {} timed out", self.inner.relays.current().url)))??;
        }
        Ok(())
    }

    /// Close gracefully: new dials open a new session, and the current one closes once its open
    /// streams have finished (or `drain` passes, then they fail). Returns whether every stream
    /// finished in time.
    pub async fn shutdown(&self, drain: Duration) -> bool {
        let session = self.inner.session.lock().await.take();
        match session {
            Some(s) => s.drain(drain, "the dialer was shut down").await,
            None => true,
        }
    }

    /// Close the shared session (streams on it fail).
    pub async fn close(&self) {
        if let Some(s) = self.inner.session.lock().await.take() {
            s.close(ErrorCode::Closed, "the dialer was closed");
            self.inner.events.disconnected(Some(&Error::new(ErrorCode::Closed, "the dialer was closed")));
        }
    }

    async fn session(&self) -> Result<Session> {
        Ok(self.session_then(|_, _| std::future::ready(Ok(()))).await?.0)
    }

    /// The live session, or a new one; a new one also runs `first` on it at once, while the
    /// relay's answer to the hello is on its way (so the first stream's frames leave in the
    /// hello's flight), and returns its result once the relay accepted the session. Over a
    /// multiplexed WebSocket the hello is an early one (see `handshake`), and `first` is given its
    /// [`EarlyGate`] (to hold back what it could not send again); if the relay did not take it,
    /// `first` runs again on a session that signs the relay's nonce.
    async fn session_then<T, F, Fut>(&self, first: F) -> Result<(Session, Option<Result<T>>)>
    where
        F: FnMut(Session, Option<EarlyGate>) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut slot = self.inner.session.lock().await;
        if let Some(s) = slot.as_ref() {
            if !s.is_closed() {
                if self.inner.relays.preferred_due() {
                    self.move_to_preferred();
                }
                return Ok((s.clone(), None));
            }
            // Reported here too, so its `Disconnected` comes before the next `Connected` even if
            // its watcher has not run yet.
            self.inner.events.disconnected(s.close_reason().as_ref());
        }
        let (s, first) = self.establish(first).await?;
        *slot = Some(s.clone());
        self.watch(&s, false);
        drop(slot);
        let first = match first {
            Either::Left(r) => r,
            Either::Right(run) => run.await,
        };
        Ok((s, Some(first)))
    }

    /// Report `s` as the session in use (`moved`: it replaces a live one) and its end when it ends.
    fn watch(&self, s: &Session, moved: bool) {
        let hub = &self.inner.events;
        let number = if moved { hub.moved(self.relay()) } else { hub.connected(self.relay(), None) };
        let (watched, hub) = (s.clone(), Arc::downgrade(&self.inner.events));
        tokio::spawn(async move {
            watched.closed().await;
            if let Some(hub) = hub.upgrade() {
                hub.disconnected_if(number, watched.close_reason().as_ref());
            }
        });
    }

    /// The dialer runs on a later relay URL than its first, and the first is due for another try
    /// (see `client::relays`): open a session there in the background; if it works, new dials use
    /// it and the old session closes once its streams have finished. At most one move at a time.
    fn move_to_preferred(&self) {
        let this = self.clone();
        if this.inner.moving.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        tokio::spawn(async move {
            let before = this.relay().to_string();
            match this.establish(|_, _| std::future::ready(Ok(()))).await {
                Ok((s, _)) if this.relay() != before => {
                    let old = this.inner.session.lock().await.replace(s.clone());
                    this.watch(&s, true);
                    tracing::info!(relay = %this.relay(), from = %before, "moved the session to the preferred relay URL");
                    if let Some(old) = old {
                        old.drain(DRAIN_AFTER_MOVE, "the dialer moved to its preferred relay URL").await;
                    }
                }
                // Still on the same URL (the preferred one did not answer): the spare goes.
                Ok((s, _)) => s.close(ErrorCode::Closed, "a spare session: the preferred relay URL did not answer"),
                Err(e) => tracing::debug!(error = %e, "the preferred relay URL is still unusable"),
            }
            this.inner.moving.store(false, std::sync::atomic::Ordering::Release);
        });
    }

    /// Open a new session (the relay list decides which URL) and run `first` on it while the
    /// relay's answer to the hello is on its way (so the first stream's frames leave in the
    /// hello's flight). Over a multiplexed WebSocket the hello is an early one (see `handshake`),
    /// and `first` is given its [`EarlyGate`] (to hold back what it could not send again); if the
    /// relay did not take it, `first` runs again on a session that signs the relay's nonce.
    /// Returns the session once the relay accepted it, with `first`'s result, or `first` itself
    /// when it has not finished by then.
    async fn establish<T, F, Fut>(&self, mut first: F) -> Result<(Session, Either<Result<T>, std::pin::Pin<Box<Fut>>>)>
    where
        F: FnMut(Session, Option<EarlyGate>) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let i = &self.inner;
        let mut with_nonce = false;
        loop {
            let (url, link, gate) = i
                .relays
                .try_each(|url| async move {
                    let hello = |nonce: &[u8]| {
                        let (date, sig) = i.key.sign(nonce, std::time::SystemTime::now());
                        Hello { date, sig }.encode()
                    };
                    // With other URLs to fall back to, the relay's nonce is awaited instead: an early
                    // hello's call returns before the relay answers, so a path that accepts and
                    // stays silent would not be cut at the attempt bound (`client::relays`).
                    if !with_nonce && handshake::early_hello_for(&url) && !i.relays.has_alternatives() {
                        let (source, sink, gate) = handshake::send_early_hello(&url, i.tls.as_ref(), hello).await?;
                        return Ok((url, Link::frames(source, sink), Some(gate)));
                    }
                    let link = handshake::send_hello(&url, i.tls.as_ref(), &i.mux, hello).await?;
                    Ok((url, link, None))
                })
                .await?;
            let (source, answer) = handshake::answer_first(link.source);
            let s = Session::start(Role::Client, Link { source, ..link }, i.mux.clone());
            // A dial dropped before the relay's answer (cancelled) closes the session: its driver
            // would otherwise hold the connection until the keepalive gives up.
            let mut unanswered = CloseOnDrop(Some(s.clone()));
            let verdict = async {
                let answer = answer.get(&url).await?;
                if let Some((code, msg)) = HelloAck::decode(&answer)?.refusal {
                    return Err(Error::new(code, format!("the relay at {} refused the session: {msg}", url.url)));
                }
                Ok(())
            };
            // The first stream runs while the answer is awaited; the session is shared (and the
            // lock released) once the relay accepted it, so other dials need not wait for this one.
            let mut run = Box::pin(first(s.clone(), gate.clone()));
            tokio::pin!(verdict);
            let mut first_done = None;
            let verdict = loop {
                tokio::select! {
                    v = &mut verdict => break v,
                    r = &mut run, if first_done.is_none() => first_done = Some(r),
                }
            };
            if let Err(e) = verdict {
                s.close(e.code(), e.message());
                if gate.is_some_and(|g| g.retry_with_nonce(&url)) {
                    tracing::debug!(relay = %url.url, error = %e, "the relay did not take the early hello; signing its nonce");
                    with_nonce = true;
                    continue;
                }
                return Err(e);
            }
            unanswered.0 = None;
            return Ok((
                s,
                match first_done {
                    Some(r) => Either::Left(r),
                    None => Either::Right(run),
                },
            ));
        }
    }

    async fn dial_mux(&self, target: &Target) -> Result<TunnelStream> {
        // E2E: refuse a target that cannot be verified before anything is sent.
        let expect = self.inner.e2e.as_ref().map(|e| e.expected(target)).transpose()?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            // A new session runs the CONNECT with its hello (one flight, see `handshake`).
            let (session, first) = self.session_then(|s, _| self.connect_on(s, target, expect.as_deref())).await?;
            let result = match first {
                Some(r) => r,
                None => self.connect_on(session.clone(), target, expect.as_deref()).await,
            };
            match result {
                Ok(inner) => return Ok(TunnelStream::new(inner, target.clone())),
                // The session died under us (relay restarted, idle LB cut it): one fresh try.
                Err(e) if attempt == 1 && session.is_closed() => {
                    tracing::debug!(error = %e, "session lost while dialing; reconnecting");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Open a stream on `session` and connect it to `target` (through the E2E handshake when
    /// `expect` names the listener's identity).
    async fn connect_on(&self, session: Session, target: &Target, expect: Option<&str>) -> Result<Inner> {
        let mut stream = session.open()?;
        if let (Some(e2e), Some(expect)) = (&self.inner.e2e, expect) {
            return Ok(Inner::E2e(Box::new(e2e.dial(stream, target, expect.to_string()).await?)));
        }
        socks::client_connect(&mut stream, target, true).await?;
        Ok(Inner::Mux(stream))
    }

    /// Dial `target` for a local connection that is about to be bridged: in multiplexed mode its
    /// first bytes travel with the CONNECT instead of a round trip later
    /// ([`crate::stream::connect_early`]). Returns the stream and the bytes already sent.
    pub(crate) async fn dial_for<S: LocalSocket>(&self, target: &Target, local: &S) -> Result<(TunnelStream, u64)> {
        let routed = self.route(target)?;
        let target = &routed;
        if self.inner.mode == Mode::Classic || self.inner.e2e.is_some() {
            // E2E: local bytes can only follow the handshake, so nothing rides with the CONNECT.
            return Ok((self.dial_target(target).await?, 0));
        }
        let t = self.inner.timeout;
        let work = async {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let early = std::sync::atomic::AtomicU64::new(0);
                // A new session runs the CONNECT with its hello (one flight, see `handshake`).
                let (session, first) = self.session_then(|s, gate| open_early(s, local, target, &early, gate)).await?;
                let result = match first {
                    Some(r) => r,
                    None => open_early(session.clone(), local, target, &early, None).await,
                };
                let early = early.into_inner();
                match result {
                    Ok(stream) => return Ok((TunnelStream::new(Inner::Mux(stream), target.clone()), early)),
                    // The session died before any local byte was taken: one fresh try.
                    Err(e) if attempt == 1 && early == 0 && session.is_closed() => {
                        tracing::debug!(error = %e, "session lost while dialing; reconnecting");
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        match tokio::time::timeout(t, work).await {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                ErrorCode::Timeout,
                format!(
                    "dialing {target} through {} took longer than {:.1}s; is the relay reachable?",
                    self.inner.relays.current().url,
                    t.as_secs_f64()
                ),
            )),
        }
    }

    async fn dial_classic(&self, target: &Target) -> Result<TunnelStream> {
        let tls = self.inner.tls.as_ref();
        match self.inner.relays.try_each(|url| async move { transport::connect(&url, false, tls).await }).await? {
            Connected::Ws(ws, _) => {
                let mut io = WsByteStream::new(ws, Some(CLASSIC_PING));
                let pre = io.read_message().await.map_err(|e| Error::from_io(e, "reading the relay's preamble"))?;
                let nonce = ServerConnect::decode_checked(&pre)?;
                socks::client_auth(&mut io, &self.inner.key, &nonce).await?;
                socks::client_connect(&mut io, target, false).await?;
                Ok(TunnelStream::new(Inner::Ws(Box::new(io)), target.clone()))
            }
            Connected::Tcp(mut io) => {
                let nonce = protocol::read_server_connect(&mut io).await?;
                socks::client_auth(&mut io, &self.inner.key, &nonce).await?;
                socks::client_connect(&mut io, target, false).await?;
                Ok(TunnelStream::new(Inner::Raw(io), target.clone()))
            }
        }
    }
}

/// `target` (`host:port`) as every face dials or forwards to it: through the exit listener `via`
/// when one is given (`--via NAME`, `via=NAME`, `{ via }`, `tunnel_dialer_dial_via`).
pub fn route(target: &str, via: Option<&str>) -> Result<Target> {
    let t = Target::parse(target)?;
    match via {
        Some(v) => t.through_exit(v),
        None => Ok(t),
    }
}

/// Closes a session that is dropped while still held (a dial cancelled in its handshake).
struct CloseOnDrop(Option<Session>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.close(ErrorCode::Closed, "the dial was cancelled before the relay answered the session's hello");
        }
    }
}

/// Open a stream on `session` and send its CONNECT with the local client's first bytes
/// ([`crate::stream::connect_early`]); `early` counts the bytes sent. With a `gate` (a new
/// session's early hello) no local byte is taken before the relay took the hello.
async fn open_early<S: LocalSocket>(
    session: Session,
    local: &S,
    target: &Target,
    early: &std::sync::atomic::AtomicU64,
    gate: Option<EarlyGate>,
) -> Result<SessionStream> {
    let mut stream = session.open()?;
    let mut sent = early.load(std::sync::atomic::Ordering::Relaxed);
    let r = crate::stream::connect_early(&mut stream, local, target, &mut sent, gate).await;
    early.store(sent, std::sync::atomic::Ordering::Relaxed);
    r?;
    Ok(stream)
}
