//! Admission guards in front of authentication: per-source limits on open connections and on
//! handshakes in progress plus a global cap on handshakes ([`Admissions`], checked in the accept
//! loop before a connection costs anything), a per-source-address count of failed
//! authentications (past the limit, that address's failures are answered slowly and logged once
//! per minute rather than once per try; its valid proofs still pass), a count of open multiplexed
//! sessions per shared key (`max_sessions_per_key`), per-source / per-listener counts of
//! public HTTP requests in progress, and each source's share of a listener's ([`SourceShares`]).
//! [`Guards`] holds the tunnel connections' guards for the relay's shared state.
//!
//! A "source" is an IPv4 address or an IPv6 /64 (one subscriber's network: an attacker with a
//! /64 has 2^64 addresses). A connection is "in its handshake" from accept until it
//! authenticates (tunnel endpoints) or sends its first request head (public HTTP port); the code
//! that sees that moment calls [`handshake_finished`], which finds the connection's [`Ticket`]
//! through a task-local set by the accept loop, so the session code needs no extra parameter.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::metrics::{Metrics, Refusal};
use super::RelayState;

/// The guards every tunnel connection passes (one part of the relay's shared state).
pub(crate) struct Guards {
    /// Open connections and handshakes per source, and handshakes in all.
    pub(crate) admissions: Arc<Admissions>,
    /// Open transport connections (`max_connections`).
    pub(crate) connections: Arc<tokio::sync::Semaphore>,
    /// Failed authentications per source address (`auth_failures_per_minute`).
    pub(crate) auth_failures: AuthLimiter,
    /// Open multiplexed sessions per key id (`max_sessions_per_key`).
    pub(crate) key_sessions: KeySessions,
}

impl Guards {
    pub(crate) fn new(l: &crate::config::Limits, metrics: Arc<Metrics>) -> Guards {
        let limits = AdmissionLimits {
            per_source_connections: l.max_connections_per_source,
            per_source_handshakes: l.max_handshakes_per_source,
            handshakes: l.max_handshakes,
        };
        Guards {
            admissions: Admissions::new(limits, metrics),
            connections: Arc::new(tokio::sync::Semaphore::new(l.max_connections)),
            auth_failures: AuthLimiter::new(l.auth_failures_per_minute),
            key_sessions: KeySessions::default(),
        }
    }
}

/// The window failures are counted in.
const WINDOW: Duration = Duration::from_secs(60);
/// Most addresses tracked at once; past this, expired entries are dropped, then the oldest.
const MAX_TRACKED: usize = 16_384;

struct Failures {
    since: Instant,
    count: usize,
    /// Whether the "rate limited" warning was logged in this window.
    warned: bool,
}

/// What the limiter says about an address that is about to authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Check its credentials.
    Check,
    /// Too many failures in this window (which ends in this long): answer failures slowly.
    Refuse(Duration),
}

/// Failed authentications per source address in the current minute.
pub(crate) struct AuthLimiter {
    per_minute: usize,
    table: Mutex<HashMap<IpAddr, Failures>>,
}

impl AuthLimiter {
    pub(crate) fn new(per_minute: usize) -> AuthLimiter {
        AuthLimiter { per_minute, table: Mutex::new(HashMap::new()) }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Failures>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// May `ip` try to authenticate now?
    pub(crate) fn admit(&self, ip: IpAddr) -> Admission {
        let now = Instant::now();
        let t = self.table();
        match t.get(&ip) {
            Some(f) if f.count >= self.per_minute && now.duration_since(f.since) < WINDOW => Admission::Refuse(WINDOW - now.duration_since(f.since)),
            _ => Admission::Check,
        }
    }

    /// Count a failure (or a refused attempt); returns whether this is the first time in the
    /// window that `ip` went over the limit (log a warning then, and only then).
    pub(crate) fn failed(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let mut t = self.table();
        if t.len() >= MAX_TRACKED && !t.contains_key(&ip) {
            t.retain(|_, f| now.duration_since(f.since) < WINDOW);
            if t.len() >= MAX_TRACKED {
                if let Some(oldest) = t.iter().min_by_key(|(_, f)| f.since).map(|(k, _)| *k) {
                    t.remove(&oldest);
                }
            }
        }
        let f = t.entry(ip).or_insert(Failures { since: now, count: 0, warned: false });
        if now.duration_since(f.since) >= WINDOW {
            *f = Failures { since: now, count: 0, warned: false };
        }
        f.count += 1;
        if f.count > self.per_minute && !f.warned {
            f.warned = true;
            return true;
        }
        false
    }

    /// Clear the address's record. The relay does not call it on success: a valid key from a
    /// shared address must not reset a guesser's count (failures expire with their minute).
    #[cfg(test)]
    pub(crate) fn succeeded(&self, ip: IpAddr) {
        self.table().remove(&ip);
    }
}

/// Open multiplexed sessions per key id.
#[derive(Default)]
pub(crate) struct KeySessions {
    open: Mutex<HashMap<u32, usize>>,
}

/// One counted session; uncounted when dropped.
pub(crate) struct KeySession<'a> {
    owner: &'a KeySessions,
    kid: u32,
}

impl KeySessions {
    /// Count a new session for `kid`, unless `limit` are already open.
    pub(crate) fn enter(&self, kid: u32, limit: usize) -> Option<KeySession<'_>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(kid).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(KeySession { owner: self, kid })
    }
}

impl Drop for KeySession<'_> {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.kid) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.kid);
            }
        }
    }
}

/// The unit per-source limits count: the IPv4 address (IPv4-mapped IPv6 included), or the
/// IPv6 address's /64.
pub(crate) fn source_of(ip: IpAddr) -> IpAddr {
    match crate::egress::allowlist::canonical_ip(ip) {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::from([s[0], s[1], s[2], s[3], 0, 0, 0, 0])
        }
        v4 => v4,
    }
}

/// Open connections and handshakes in progress of one source.
#[derive(Default, Clone, Copy)]
struct SourceCount {
    open: usize,
    handshakes: usize,
}

/// The admission limits (from [`crate::config::Limits`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdmissionLimits {
    pub(crate) per_source_connections: usize,
    pub(crate) per_source_handshakes: usize,
    pub(crate) handshakes: usize,
}

/// Open connections and handshakes per source, and handshakes in all.
pub(crate) struct Admissions {
    limits: AdmissionLimits,
    metrics: Arc<Metrics>,
    /// Sources with at least one open connection (entries leave at zero, so the table is as
    /// large as the number of sources connected now).
    table: Mutex<(HashMap<IpAddr, SourceCount>, usize)>,
}

/// One admitted connection: counted until dropped, and as a handshake until
/// [`Ticket::handshake_finished`].
pub(crate) struct Ticket {
    owner: Arc<Admissions>,
    source: IpAddr,
    handshaking: AtomicBool,
    /// Set once the handshake is over: transports grow their read buffers then.
    finished: Arc<AtomicBool>,
}

impl Admissions {
    pub(crate) fn new(limits: AdmissionLimits, metrics: Arc<Metrics>) -> Arc<Admissions> {
        Arc::new(Admissions { limits, metrics, table: Mutex::new((HashMap::new(), 0)) })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, (HashMap<IpAddr, SourceCount>, usize)> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admit a new connection from `ip`, or say which limit refuses it.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refusal> {
        let source = source_of(ip);
        let mut guard = self.table();
        let (table, handshakes) = &mut *guard;
        let c = table.get(&source).copied().unwrap_or_default();
        if c.open >= self.limits.per_source_connections {
            return Err(Refusal::SourceConnections);
        }
        if c.handshakes >= self.limits.per_source_handshakes {
            return Err(Refusal::SourceHandshakes);
        }
        if *handshakes >= self.limits.handshakes {
            return Err(Refusal::Handshakes);
        }
        let e = table.entry(source).or_default();
        e.open += 1;
        e.handshakes += 1;
        *handshakes += 1;
        self.metrics.connections_open.fetch_add(1, Relaxed);
        self.metrics.note_load();
        self.metrics.handshakes_open.fetch_add(1, Relaxed);
        Ok(Ticket { owner: self.clone(), source, handshaking: AtomicBool::new(true), finished: Arc::default() })
    }

    /// Sources with an open connection now.
    #[cfg(test)]
    fn sources(&self) -> usize {
        self.table().0.len()
    }
}

impl Ticket {
    /// The handshake is over (authenticated, or a first public request head): the connection
    /// no longer counts against the handshake limits.
    pub(crate) fn handshake_finished(&self) {
        if !self.handshaking.swap(false, Relaxed) {
            return;
        }
        self.finished.store(true, Relaxed);
        let mut guard = self.owner.table();
        let (table, handshakes) = &mut *guard;
        *handshakes -= 1;
        if let Some(c) = table.get_mut(&self.source) {
            c.handshakes -= 1;
        }
        self.owner.metrics.handshakes_open.fetch_sub(1, Relaxed);
    }

    /// A flag that turns true when the handshake is over.
    pub(crate) fn finished_flag(&self) -> Arc<AtomicBool> {
        self.finished.clone()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.handshake_finished();
        let mut guard = self.owner.table();
        let (table, _) = &mut *guard;
        if let Some(c) = table.get_mut(&self.source) {
            c.open -= 1;
            if c.open == 0 {
                table.remove(&self.source);
                // A flood from many sources leaves a large table behind; give the memory back.
                if table.capacity() > 64 && table.len() < table.capacity() / 4 {
                    table.shrink_to(table.len() * 2);
                }
            }
        }
        self.owner.metrics.connections_open.fetch_sub(1, Relaxed);
    }
}

tokio::task_local! {
    /// The admission ticket of the connection this task serves.
    static TICKET: Ticket;
}

/// Serve a connection with its ticket reachable through [`handshake_finished`].
pub(crate) async fn with_ticket<F: std::future::Future>(ticket: Ticket, f: F) -> F::Output {
    TICKET.scope(ticket, f).await
}

/// The connection served by the current task has finished its handshake (it authenticated, or
/// sent a public request head). Does nothing outside a connection task.
pub(crate) fn handshake_finished() {
    let _ = TICKET.try_with(|t| t.handshake_finished());
}

/// The current connection's "handshake finished" flag (a fresh, never-set flag outside one).
pub(crate) fn finished_flag() -> Arc<AtomicBool> {
    TICKET.try_with(|t| t.finished_flag()).unwrap_or_default()
}

/// Requests in progress per key (a public source, a listener name), each below a limit.
pub(crate) struct InFlight<K: std::hash::Hash + Eq + Clone> {
    limit: usize,
    open: Mutex<HashMap<K, usize>>,
}

/// One counted request; uncounted when dropped.
pub(crate) struct InFlightPermit<K: std::hash::Hash + Eq + Clone + Send + Sync + 'static> {
    owner: Arc<InFlight<K>>,
    key: K,
}

impl<K: std::hash::Hash + Eq + Clone + Send + Sync + 'static> InFlight<K> {
    pub(crate) fn new(limit: usize) -> Arc<InFlight<K>> {
        Arc::new(InFlight { limit, open: Mutex::new(HashMap::new()) })
    }

    /// Count one more request for `key`, unless `limit` are in progress.
    pub(crate) fn enter(self: &Arc<Self>, key: K) -> Option<InFlightPermit<K>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key.clone()).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(InFlightPermit { owner: self.clone(), key })
    }

    /// The limit.
    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    /// Requests in progress for `key`.
    pub(crate) fn count(&self, key: &K) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).get(key).copied().unwrap_or(0)
    }
}

/// Each source's share of a listener's request slots (`http_max_requests_per_listener`), so a
/// handful of sources cannot take them all: a source holding at least a sixteenth of a listener's
/// slots takes another only while more than a quarter of them are free. One busy source can still
/// use three quarters of a listener; the last quarter serves sources that hold less than their
/// share, and taking all of it needs at least four more sources.
pub(crate) struct SourceShares {
    /// `http_max_requests_per_listener`.
    listener_limit: usize,
    open: Mutex<HashMap<(String, IpAddr), usize>>,
}

/// One request counted in its source's share of a listener; uncounted when dropped.
pub(crate) struct SharePermit {
    owner: Arc<SourceShares>,
    key: (String, IpAddr),
}

impl SourceShares {
    pub(crate) fn new(listener_limit: usize) -> Arc<SourceShares> {
        Arc::new(SourceShares { listener_limit, open: Mutex::new(HashMap::new()) })
    }

    /// The slots a source holds freely: a sixteenth of the listener's (at least one).
    pub(crate) fn share(&self) -> usize {
        (self.listener_limit / 16).max(1)
    }

    /// The slots kept for sources under their share: a quarter of the listener's.
    pub(crate) fn reserve(&self) -> usize {
        self.listener_limit / 4
    }

    /// Count a request from `source` to `listener`, which has `in_use` requests in progress
    /// (this one included), unless the source is over its share and the listener's free slots
    /// are down to the reserve.
    pub(crate) fn enter(self: &Arc<Self>, listener: &str, source: IpAddr, in_use: usize) -> Option<SharePermit> {
        let key = (listener.to_string(), source);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let held = open.get(&key).copied().unwrap_or(0);
        if held >= self.share() && in_use + self.reserve() > self.listener_limit {
            return None;
        }
        *open.entry(key.clone()).or_insert(0) += 1;
        Some(SharePermit { owner: self.clone(), key })
    }
}

impl Drop for SharePermit {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
                if open.capacity() > 64 && open.len() < open.capacity() / 4 {
                    let len = open.len();
                    open.shrink_to(len * 2);
                }
            }
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone + Send + Sync + 'static> Drop for InFlightPermit<K> {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
                if open.capacity() > 64 && open.len() < open.capacity() / 4 {
                    let len = open.len();
                    open.shrink_to(len * 2);
                }
            }
        }
    }
}

/// Count a failed authentication against its source address and log it: a warning for each of
/// the first `auth_failures_per_minute`, one more when the address goes over, then debug only.
pub(crate) fn log_auth_failure(state: &RelayState, peer: SocketAddr, r: &dyn std::fmt::Display) {
    state.metrics.auth_failures.fetch_add(1, Relaxed);
    if state.guards.auth_failures.failed(peer.ip()) {
        tracing::warn!(%peer, reason = %r, limit = state.cfg.limits.auth_failures_per_minute,
            "too many failed authentications from this address; refusing its attempts unchecked for the rest of the minute");
    } else if state.guards.auth_failures.admit(peer.ip()) == Admission::Check {
        tracing::warn!(%peer, reason = %r, "authentication failed");
    } else {
        tracing::debug!(%peer, reason = %r, "authentication failed (address rate limited)");
    }
}

/// How long a failed proof from `peer` waits for its answer: nothing normally, [`FAILURE_DELAY`]
/// once the address is over `auth_failures_per_minute` (counted as a rate-limited refusal). Proofs
/// are checked either way, so a valid key is never refused for what others did from its address;
/// a guesser only gets slower answers, and its failures are no longer logged one by one.
pub(crate) fn failure_delay(state: &RelayState, peer: SocketAddr) -> std::time::Duration {
    match state.guards.auth_failures.admit(peer.ip()) {
        Admission::Check => std::time::Duration::ZERO,
        Admission::Refuse(_) => FAILURE_DELAY,
    }
}

/// The wait before answering a failed proof from an address over its failure limit. Checking a
/// proof costs one HMAC (or one Ed25519 verification), far less than the handshakes before it; the
/// delay caps how fast one connection can guess.
pub(crate) const FAILURE_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// Count a rate-limited failure and wait [`FAILURE_DELAY`] when `delay` says so.
pub(crate) async fn slow_failure(state: &RelayState, delay: std::time::Duration) {
    if !delay.is_zero() {
        state.metrics.refused(Refusal::RateLimited);
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admissions(c: usize, h: usize, all: usize) -> Arc<Admissions> {
        Admissions::new(AdmissionLimits { per_source_connections: c, per_source_handshakes: h, handshakes: all }, Arc::default())
    }

    #[test]
    fn per_source_and_global_limits() {
        let a = admissions(3, 2, 4);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let t1 = a.admit(ip("192.0.2.1")).expect("first");
        let t2 = a.admit(ip("::ffff:192.0.2.1")).expect("second (same source, mapped spelling)");
        assert_eq!(a.admit(ip("192.0.2.1")).err(), Some(Refusal::SourceHandshakes), "two handshakes per source");
        t1.handshake_finished();
        let t3 = a.admit(ip("192.0.2.1")).expect("an authenticated connection frees its handshake place");
        assert_eq!(a.admit(ip("192.0.2.1")).err(), Some(Refusal::SourceConnections), "three connections per source");
        // One IPv6 /64 is one source.
        let _v6 = a.admit(ip("2001:db8:1:2::1")).expect("v6");
        let other = a.admit(ip("198.51.100.1")).expect("another source");
        assert_eq!(a.admit(ip("2001:db8:1:2:ffff::9")).err(), Some(Refusal::Handshakes), "global cap: 4 handshakes");
        drop(t2);
        let _v6b = a.admit(ip("2001:db8:1:2:ffff::9")).expect("a closed connection frees its places");
        assert_eq!(a.admit(ip("2001:db8:1:2::7")).err(), Some(Refusal::SourceHandshakes), "same /64");
        drop(other);
        drop((t1, t3, _v6, _v6b));
        assert_eq!(a.sources(), 0, "entries leave the table at zero");
        assert_eq!(a.metrics.connections_open.load(Relaxed), 0);
        assert_eq!(a.metrics.handshakes_open.load(Relaxed), 0);
    }

    #[test]
    fn in_flight_is_bounded_per_key() {
        let f = InFlight::<String>::new(2);
        let a = f.enter("a".into()).expect("1");
        let _b = f.enter("a".into()).expect("2");
        assert!(f.enter("a".into()).is_none());
        assert!(f.enter("b".into()).is_some());
        drop(a);
        assert!(f.enter("a".into()).is_some());
    }

    #[test]
    fn a_source_over_its_share_leaves_the_last_quarter_to_others() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let listener = InFlight::<String>::new(64);
        let shares = SourceShares::new(64);
        assert_eq!((shares.share(), shares.reserve()), (4, 16));
        let take = |from: &str| {
            let l = listener.enter("l".into())?;
            shares.enter("l", ip(from), listener.count(&"l".to_string())).map(|s| (l, s))
        };
        // One source alone takes three quarters of the slots, then stops.
        let mut held: Vec<_> = std::iter::from_fn(|| take("192.0.2.1")).take(100).collect();
        assert_eq!(held.len(), 48);
        // Others, under their share, take the last quarter: four each.
        for i in 2..=5 {
            let got: Vec<_> = std::iter::from_fn(|| take(&format!("192.0.2.{i}"))).take(100).collect();
            assert_eq!(got.len(), 4, "source {i}");
            held.extend(got);
        }
        assert!(take("192.0.2.6").is_none(), "all 64 taken");
        drop(held);
        assert_eq!(listener.count(&"l".to_string()), 0);
        assert!(shares.open.lock().unwrap().is_empty(), "entries leave at zero");
    }

    #[test]
    fn refuses_after_the_limit_and_warns_once() {
        let l = AuthLimiter::new(3);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(l.admit(ip), Admission::Check);
            assert!(!l.failed(ip));
        }
        assert!(matches!(l.admit(ip), Admission::Refuse(d) if d <= WINDOW));
        assert!(l.failed(ip), "the first attempt over the limit is logged");
        assert!(!l.failed(ip), "later ones in the same minute are not");
        assert_eq!(l.admit(other), Admission::Check, "other addresses are not affected");
        l.succeeded(ip);
        assert_eq!(l.admit(ip), Admission::Check);
    }

    #[test]
    fn key_sessions_are_bounded_and_released() {
        let k = KeySessions::default();
        let a = k.enter(1, 2).expect("first");
        let _b = k.enter(1, 2).expect("second");
        assert!(k.enter(1, 2).is_none(), "third over the limit");
        assert!(k.enter(2, 2).is_some(), "other keys have their own count");
        drop(a);
        assert!(k.enter(1, 2).is_some(), "a closed session frees its place");
    }
}
