//! Relay counters, rendered in the Prometheus text format on `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Why a stream or session was refused (a label of `libtunnel_refusals_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Target not in the allowlist.
    NotAllowed = 0,
    /// DNS failed or host unreachable.
    Unreachable = 1,
    /// Target refused the connection.
    Refused = 2,
    /// Target connect timed out.
    Timeout = 3,
    /// Malformed SOCKS5 or protocol bytes.
    Malformed = 4,
    /// Handshake took too long.
    HandshakeTimeout = 5,
    /// Relay at its connection or stream limit.
    Overloaded = 6,
    /// Anything else.
    General = 7,
    /// No listener is online under the requested name.
    ListenerOffline = 8,
    /// The listener refused the stream (its accept queue is full) or did not answer in time.
    ListenerBusy = 9,
    /// A listener registration was refused (bad signature, name taken, key not listed).
    Registration = 10,
    /// A source address over `auth_failures_per_minute` was refused without a check.
    RateLimited = 11,
    /// A key already had `max_sessions_per_key` sessions open.
    KeySessions = 12,
    /// A source already had `max_connections_per_source` connections open.
    SourceConnections = 13,
    /// A source already had `max_handshakes_per_source` connections in their handshake.
    SourceHandshakes = 14,
    /// The relay already had `max_handshakes` connections in their handshake.
    Handshakes = 15,
    /// A public HTTP client already had `http_max_requests_per_source` requests in progress.
    HttpSourceRequests = 16,
    /// A listener already had `http_max_requests_per_listener` public requests in progress.
    HttpListenerRequests = 17,
}

const REFUSALS: usize = 18;

const REFUSAL_NAMES: [&str; REFUSALS] = [
    "not_allowed",
    "unreachable",
    "refused",
    "timeout",
    "malformed",
    "handshake_timeout",
    "overloaded",
    "general",
    "listener_offline",
    "listener_busy",
    "registration",
    "rate_limited",
    "key_sessions",
    "source_connections",
    "source_handshakes",
    "handshakes",
    "http_source_requests",
    "http_listener_requests",
];

/// The relay's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    pub(crate) sessions_classic: AtomicU64,
    pub(crate) sessions_mux: AtomicU64,
    pub(crate) sessions_active: AtomicI64,
    pub(crate) streams_total: AtomicU64,
    pub(crate) streams_active: AtomicI64,
    pub(crate) bytes_to_targets: AtomicU64,
    pub(crate) bytes_from_targets: AtomicU64,
    pub(crate) auth_failures: AtomicU64,
    refusals: [AtomicU64; REFUSALS],
    /// Transport and public HTTP connections open now (admitted by the accept loops).
    pub(crate) connections_open: AtomicI64,
    /// Of those, the ones still in their handshake (not yet authenticated, or no request yet).
    pub(crate) handshakes_open: AtomicI64,
    /// Most connections open at once since memory was last handed back (see `memory`).
    pub(crate) connections_peak: AtomicI64,
    pub(crate) listeners_active: AtomicI64,
    pub(crate) listener_streams: AtomicU64,
    pub(crate) http_requests: AtomicU64,
}

impl Metrics {
    pub(crate) fn refused(&self, why: Refusal) {
        self.refusals[why as usize].fetch_add(1, Relaxed);
    }

    /// Refusals counted for a reason.
    pub fn refusals(&self, why: Refusal) -> u64 {
        self.refusals[why as usize].load(Relaxed)
    }

    /// Authentication failures so far.
    pub fn auth_failures(&self) -> u64 {
        self.auth_failures.load(Relaxed)
    }

    /// Listener names registered now.
    pub fn listeners_active(&self) -> i64 {
        self.listeners_active.load(Relaxed)
    }

    /// Streams currently open.
    pub fn streams_active(&self) -> i64 {
        self.streams_active.load(Relaxed)
    }

    /// Connections open now (every endpoint).
    pub fn connections_open(&self) -> i64 {
        self.connections_open.load(Relaxed)
    }

    /// Connections in their handshake now (not yet authenticated; public: no request head yet).
    pub fn handshakes_open(&self) -> i64 {
        self.handshakes_open.load(Relaxed)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut counter = |name: &str, help: &str, kind: &str, rows: &[(&str, i64)]| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, v) in rows {
                let _ = writeln!(s, "{name}{labels} {v}");
            }
        };
        counter(
            "libtunnel_sessions_total",
            "Tunnel sessions authenticated, by mode.",
            "counter",
            &[("{mode=\"classic\"}", self.sessions_classic.load(Relaxed) as i64), ("{mode=\"multiplexed\"}", self.sessions_mux.load(Relaxed) as i64)],
        );
        counter("libtunnel_sessions_active", "Tunnel sessions open now.", "gauge", &[("", self.sessions_active.load(Relaxed))]);
        counter("libtunnel_streams_total", "Streams connected to a target.", "counter", &[("", self.streams_total.load(Relaxed) as i64)]);
        counter("libtunnel_streams_active", "Streams open now.", "gauge", &[("", self.streams_active.load(Relaxed))]);
        counter(
            "libtunnel_bytes_total",
            "Bytes relayed on finished streams, by direction.",
            "counter",
            &[
                ("{direction=\"to_target\"}", self.bytes_to_targets.load(Relaxed) as i64),
                ("{direction=\"from_target\"}", self.bytes_from_targets.load(Relaxed) as i64),
            ],
        );
        counter("libtunnel_listeners_active", "Listener names registered now.", "gauge", &[("", self.listeners_active.load(Relaxed))]);
        counter(
            "libtunnel_listener_streams_total",
            "Streams delivered to listeners.",
            "counter",
            &[("", self.listener_streams.load(Relaxed) as i64)],
        );
        counter(
            "libtunnel_http_requests_total",
            "Public HTTP requests routed to listeners.",
            "counter",
            &[("", self.http_requests.load(Relaxed) as i64)],
        );
        counter("libtunnel_connections_open", "Connections open now, on every endpoint.", "gauge", &[("", self.connections_open.load(Relaxed))]);
        counter(
            "libtunnel_handshakes_open",
            "Connections open now that have not authenticated (public port: sent no request head) yet.",
            "gauge",
            &[("", self.handshakes_open.load(Relaxed))],
        );
        counter("libtunnel_auth_failures_total", "Rejected credentials.", "counter", &[("", self.auth_failures.load(Relaxed) as i64)]);
        let labels: Vec<String> = REFUSAL_NAMES.iter().map(|n| format!("{{reason=\"{n}\"}}")).collect();
        let rows: Vec<(&str, i64)> = labels.iter().zip(&self.refusals).map(|(l, v)| (l.as_str(), v.load(Relaxed) as i64)).collect();
        counter("libtunnel_refusals_total", "Streams or sessions refused, by reason.", "counter", &rows);
        s
    }
}

impl From<crate::egress::connect::Cause> for Refusal {
    fn from(c: crate::egress::connect::Cause) -> Refusal {
        use crate::egress::connect::Cause;
        match c {
            Cause::NotAllowed => Refusal::NotAllowed,
            Cause::Unreachable => Refusal::Unreachable,
            Cause::Refused => Refusal::Refused,
            Cause::Timeout => Refusal::Timeout,
            Cause::Malformed => Refusal::Malformed,
        }
    }
}
