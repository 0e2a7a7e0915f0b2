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
    /// A listener had received `http_listener_rate` requests in the current window (429).
    HttpListenerRate = 18,
    /// A request on a TLS connection named another host than the connection's SNI (421).
    Misdirected = 19,
    /// A name held by no local listener could not be looked up: the cluster registry (Redis)
    /// is unreachable.
    ClusterUnavailable = 20,
    /// The listener refused the stream for good (a public request to an e2e listener, a stream
    /// to an exit listener that exposes no service).
    ListenerRefused = 21,
}

const REFUSALS: usize = 22;

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
    "http_listener_rate",
    "misdirected",
    "cluster_unavailable",
    "listener_refused",
];

/// The relay's counters.
#[derive(Debug, Default)]
pub struct Metrics {
    pub(crate) sessions_classic: AtomicU64,
    pub(crate) sessions_mux: AtomicU64,
    /// Dialer sessions over QUIC (each tunnel stream a QUIC stream).
    pub(crate) sessions_quic: AtomicU64,
    /// QUIC connections sent a Retry (address validation under a flood of Initials).
    pub(crate) quic_retries: AtomicU64,
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
    /// Most of [`Metrics::load`] at once since memory was last handed back (see `memory`).
    pub(crate) connections_peak: AtomicI64,
    /// Connection attempts turned away before they were admitted as connections (QUIC Initials
    /// answered with a Retry or refused): `memory` hands memory back after a flood of them.
    pub(crate) turned_away: AtomicU64,
    /// Connections open now on the admin endpoint (not in `connections_open`: they have a cap of
    /// their own).
    pub(crate) admin_connections_open: AtomicI64,
    /// Admin connections closed at once because the admin endpoint had its most open.
    pub(crate) admin_refused: AtomicU64,
    /// Public HTTP requests in progress now (each holds its buffers until its response ends).
    pub(crate) http_requests_open: AtomicI64,
    /// Public responses reset because their client took none of their body for `http_timeout`.
    pub(crate) http_stalled_responses: AtomicU64,
    /// HTTP/2 connections open now to h2c listeners (shared by every public client).
    pub(crate) h2c_upstreams_open: AtomicI64,
    /// Connection-level receive window the relay has not yet given back on those connections
    /// (bytes the listeners sent that the relay has not granted again), summed.
    pub(crate) h2c_window_held: AtomicI64,
    /// Receive window held by the open streams of those connections (bytes a listener sent on a
    /// stream not yet ended or reset that the relay has not granted back), summed.
    pub(crate) h2c_stream_window_held: AtomicI64,
    pub(crate) listeners_active: AtomicI64,
    pub(crate) listener_streams: AtomicU64,
    pub(crate) http_requests: AtomicU64,
    /// Public HTTP requests per listener name (status, bytes, latency).
    pub(crate) per_listener: PerListener,
    /// The cluster's counters (rendered only on a node of a cluster).
    pub(crate) cluster: ClusterMetrics,
}

/// What one node of a cluster counts.
#[derive(Debug, Default)]
pub(crate) struct ClusterMetrics {
    /// This relay is a node of a cluster.
    pub(crate) on: std::sync::atomic::AtomicBool,
    /// Streams this node forwarded to the node holding their listener.
    pub(crate) forwarded_out: AtomicU64,
    /// Streams other nodes forwarded here for a local listener.
    pub(crate) forwarded_in: AtomicU64,
    /// Listener names this node holds in the cluster registry now.
    pub(crate) claims: AtomicI64,
    /// Round trip of the last Redis command that measured one, microseconds.
    pub(crate) redis_rtt_micros: AtomicI64,
    /// Redis commands that failed (unreachable, timed out).
    pub(crate) redis_errors: AtomicU64,
    /// Node-to-node handshakes where the other side did not prove the cluster key (either
    /// direction).
    pub(crate) node_auth_failures: AtomicU64,
    /// Claims in Redis that no authenticated node confirmed, removed by this node.
    pub(crate) claims_disproved: AtomicU64,
}

/// Upper bounds (seconds) of the public request latency histogram (time to the response head).
const LATENCY_BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Most listener names with their own public HTTP series; requests for names past it are counted
/// in the totals only (a relay with open registration cannot be made to grow this without bound).
const MAX_LISTENER_SERIES: usize = 4096;

/// One listener's public HTTP counters.
#[derive(Debug, Default)]
pub(crate) struct ListenerHttp {
    /// Responses by status code (100..=599).
    statuses: std::sync::Mutex<std::collections::BTreeMap<u16, u64>>,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_sum_micros: AtomicU64,
}

impl ListenerHttp {
    /// Count one response: its status and the time its head took.
    pub(crate) fn answered(&self, status: u16, latency: std::time::Duration) {
        *self.statuses.lock().unwrap_or_else(|p| p.into_inner()).entry(status.clamp(100, 599)).or_default() += 1;
        let secs = latency.as_secs_f64();
        let bucket = LATENCY_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(LATENCY_BUCKETS.len());
        self.latency[bucket].fetch_add(1, Relaxed);
        self.latency_sum_micros.fetch_add(latency.as_micros() as u64, Relaxed);
    }
}

/// Public HTTP counters by listener name.
#[derive(Debug, Default)]
pub(crate) struct PerListener(std::sync::Mutex<std::collections::BTreeMap<String, std::sync::Arc<ListenerHttp>>>);

impl PerListener {
    /// The counters of `name` (created on first use), `None` once [`MAX_LISTENER_SERIES`] names
    /// have series.
    pub(crate) fn of(&self, name: &str) -> Option<std::sync::Arc<ListenerHttp>> {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = t.get(name) {
            return Some(s.clone());
        }
        if t.len() >= MAX_LISTENER_SERIES {
            return None;
        }
        Some(t.entry(name.to_string()).or_default().clone())
    }

    /// Public HTTP body bytes of every listener with a series, both directions.
    pub(crate) fn bytes_total(&self) -> u64 {
        let t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        t.values().map(|l| l.bytes_in.load(Relaxed) + l.bytes_out.load(Relaxed)).sum()
    }

    fn render(&self, s: &mut String) {
        let t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(s, "# HELP libtunnel_http_listener_responses_total Public HTTP responses per listener, by status code.");
        let _ = writeln!(s, "# TYPE libtunnel_http_listener_responses_total counter");
        for (name, l) in t.iter() {
            for (code, n) in l.statuses.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                let _ = writeln!(s, "libtunnel_http_listener_responses_total{{listener=\"{name}\",code=\"{code}\"}} {n}");
            }
        }
        let _ = writeln!(s, "# HELP libtunnel_http_listener_bytes_total Public HTTP body bytes per listener, by direction.");
        let _ = writeln!(s, "# TYPE libtunnel_http_listener_bytes_total counter");
        for (name, l) in t.iter() {
            let _ = writeln!(s, "libtunnel_http_listener_bytes_total{{listener=\"{name}\",direction=\"in\"}} {}", l.bytes_in.load(Relaxed));
            let _ = writeln!(s, "libtunnel_http_listener_bytes_total{{listener=\"{name}\",direction=\"out\"}} {}", l.bytes_out.load(Relaxed));
        }
        let _ = writeln!(s, "# HELP libtunnel_http_listener_latency_seconds Time from a public request to its response head, per listener.");
        let _ = writeln!(s, "# TYPE libtunnel_http_listener_latency_seconds histogram");
        for (name, l) in t.iter() {
            let mut cumulative = 0;
            for (i, b) in l.latency.iter().enumerate() {
                cumulative += b.load(Relaxed);
                let le = LATENCY_BUCKETS.get(i).map_or("+Inf".to_string(), |v| v.to_string());
                let _ = writeln!(s, "libtunnel_http_listener_latency_seconds_bucket{{listener=\"{name}\",le=\"{le}\"}} {cumulative}");
            }
            let sum = l.latency_sum_micros.load(Relaxed) as f64 / 1e6;
            let _ = writeln!(s, "libtunnel_http_listener_latency_seconds_sum{{listener=\"{name}\"}} {sum}");
            let _ = writeln!(s, "libtunnel_http_listener_latency_seconds_count{{listener=\"{name}\"}} {cumulative}");
        }
    }
}

impl Metrics {
    pub(crate) fn refused(&self, why: Refusal) {
        self.refusals[why as usize].fetch_add(1, Relaxed);
    }

    /// Refusals counted for a reason.
    pub fn refusals(&self, why: Refusal) -> u64 {
        self.refusals[why as usize].load(Relaxed)
    }

    /// Every refusal reason (its `libtunnel_refusals_total` label) and its count so far.
    pub(crate) fn refusal_counts(&self) -> Vec<(&'static str, u64)> {
        REFUSAL_NAMES.iter().zip(&self.refusals).map(|(n, v)| (*n, v.load(Relaxed))).collect()
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

    /// What memory is held for: connections on every endpoint (admin included) and public HTTP
    /// requests in progress. `memory` hands memory back when this falls well below its peak.
    pub(crate) fn load(&self) -> i64 {
        self.connections_open.load(Relaxed) + self.admin_connections_open.load(Relaxed) + self.http_requests_open.load(Relaxed)
    }

    /// Record the current [`Metrics::load`] in the peak (after it grew).
    pub(crate) fn note_load(&self) {
        self.connections_peak.fetch_max(self.load(), Relaxed);
    }

    /// Connections open now on the admin endpoint.
    pub fn admin_connections_open(&self) -> i64 {
        self.admin_connections_open.load(Relaxed)
    }

    /// Public HTTP requests in progress now.
    pub fn http_requests_open(&self) -> i64 {
        self.http_requests_open.load(Relaxed)
    }

    /// Public responses reset because their client stopped reading them.
    pub fn http_stalled_responses(&self) -> u64 {
        self.http_stalled_responses.load(Relaxed)
    }

    /// HTTP/2 connections open now to h2c listeners.
    pub fn h2c_upstreams_open(&self) -> i64 {
        self.h2c_upstreams_open.load(Relaxed)
    }

    /// Receive window held (not granted back) on the HTTP/2 connections to h2c listeners, bytes.
    pub fn h2c_window_held(&self) -> i64 {
        self.h2c_window_held.load(Relaxed)
    }

    /// Receive window held by the open streams of the HTTP/2 connections to h2c listeners, bytes.
    pub fn h2c_stream_window_held(&self) -> i64 {
        self.h2c_stream_window_held.load(Relaxed)
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
            &[
                ("{mode=\"classic\"}", self.sessions_classic.load(Relaxed) as i64),
                ("{mode=\"multiplexed\"}", self.sessions_mux.load(Relaxed) as i64),
                ("{mode=\"quic\"}", self.sessions_quic.load(Relaxed) as i64),
            ],
        );
        counter(
            "libtunnel_quic_retries_total",
            "QUIC connections asked to validate their address (Retry) while many handshakes were in flight.",
            "counter",
            &[("", self.quic_retries.load(Relaxed) as i64)],
        );
        counter(
            "libtunnel_sessions_active",
            "Dialer sessions open now (listener sessions: libtunnel_listener_sessions_active).",
            "gauge",
            &[("", self.sessions_active.load(Relaxed))],
        );
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
        counter(
            "libtunnel_admin_connections_open",
            "Connections open now on the admin endpoint.",
            "gauge",
            &[("", self.admin_connections_open.load(Relaxed))],
        );
        counter(
            "libtunnel_admin_connections_refused_total",
            "Admin connections closed at once because the admin endpoint had its most open.",
            "counter",
            &[("", self.admin_refused.load(Relaxed) as i64)],
        );
        counter("libtunnel_http_requests_open", "Public HTTP requests in progress now.", "gauge", &[("", self.http_requests_open.load(Relaxed))]);
        counter(
            "libtunnel_http_stalled_responses_total",
            "Public responses reset because their client took none of their body for http_timeout.",
            "counter",
            &[("", self.http_stalled_responses.load(Relaxed) as i64)],
        );
        counter(
            "libtunnel_h2c_upstreams_open",
            "HTTP/2 connections open now to h2c listeners.",
            "gauge",
            &[("", self.h2c_upstreams_open.load(Relaxed))],
        );
        counter(
            "libtunnel_h2c_window_held_bytes",
            "Receive window not yet granted back on the HTTP/2 connections to h2c listeners.",
            "gauge",
            &[("", self.h2c_window_held.load(Relaxed))],
        );
        counter(
            "libtunnel_h2c_stream_window_held_bytes",
            "Receive window held by open streams on the HTTP/2 connections to h2c listeners.",
            "gauge",
            &[("", self.h2c_stream_window_held.load(Relaxed))],
        );
        counter("libtunnel_auth_failures_total", "Rejected credentials.", "counter", &[("", self.auth_failures.load(Relaxed) as i64)]);
        let labels: Vec<String> = REFUSAL_NAMES.iter().map(|n| format!("{{reason=\"{n}\"}}")).collect();
        let rows: Vec<(&str, i64)> = labels.iter().zip(&self.refusals).map(|(l, v)| (l.as_str(), v.load(Relaxed) as i64)).collect();
        counter("libtunnel_refusals_total", "Streams or sessions refused, by reason.", "counter", &rows);
        let c = &self.cluster;
        if c.on.load(Relaxed) {
            counter(
                "libtunnel_cluster_forwarded_streams_total",
                "Streams forwarded between nodes of the cluster, by direction.",
                "counter",
                &[("{direction=\"out\"}", c.forwarded_out.load(Relaxed) as i64), ("{direction=\"in\"}", c.forwarded_in.load(Relaxed) as i64)],
            );
            counter("libtunnel_cluster_claims", "Listener names this node holds in the cluster registry.", "gauge", &[("", c.claims.load(Relaxed))]);
            counter(
                "libtunnel_cluster_node_auth_failures_total",
                "Node-to-node handshakes where the other side did not prove the cluster key.",
                "counter",
                &[("", c.node_auth_failures.load(Relaxed) as i64)],
            );
            counter(
                "libtunnel_cluster_claims_disproved_total",
                "Claims in Redis that no node proving the cluster key confirmed (removed).",
                "counter",
                &[("", c.claims_disproved.load(Relaxed) as i64)],
            );
            let rtt = c.redis_rtt_micros.load(Relaxed) as f64 / 1e6;
            let _ = writeln!(
                s,
                "# HELP libtunnel_cluster_redis_rtt_seconds Round trip of the last Redis command.\n# TYPE libtunnel_cluster_redis_rtt_seconds gauge\nlibtunnel_cluster_redis_rtt_seconds {rtt}"
            );
            let _ = writeln!(
                s,
                "# HELP libtunnel_cluster_redis_errors_total Redis commands that failed.\n# TYPE libtunnel_cluster_redis_errors_total counter\nlibtunnel_cluster_redis_errors_total {}",
                c.redis_errors.load(Relaxed)
            );
        }
        self.per_listener.render(&mut s);
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
