//! The web dashboard on the admin endpoint (`GET /dashboard`): one page an operator opens in a
//! browser to see the fleet — nodes, listeners (pools, exits), sessions, this node's traffic and
//! refusals over the last hour as charts, and refusals by code.
//!
//! - The page, its script and its style are compiled into the binary (`include_str!`): it loads
//!   nothing from anywhere else, so it works from a closed network, and every answer carries the
//!   Content-Security-Policy `default-src 'self'` (no inline script, no other origin).
//! - `/dashboard` is behind the admin token like every data path: `Authorization: Bearer` or, for
//!   a browser, `?token=` in the address (the page then drops it from the address bar and sends
//!   it as a bearer token on its data requests). `/dashboard/app.js` and `/dashboard/app.css`
//!   carry no data and are served without it (a `<script src>` cannot send a header).
//! - `/dashboard/data` is what the page draws, refreshed every few seconds: the fleet from Redis
//!   (`cluster::fleet`) on a node of a cluster, this relay's listeners and sessions (at most
//!   [`ROWS`] listener rows each, with whole counts), and the [`History`] ring.
//! - [`History`]: a sample of this relay's counters every minute, the last hour kept in memory
//!   (61 samples); each chart bar is the difference between two samples, the last one up to now.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::super::metrics::Metrics;
use super::super::RelayState;

/// The page (markup only: its script and style are separate assets, as the CSP requires).
pub(super) const PAGE: &str = include_str!("dashboard.html");
/// What draws the page: fetches `/dashboard/data` and renders tables and SVG charts.
pub(super) const SCRIPT: &str = include_str!("dashboard.js");
pub(super) const STYLE: &str = include_str!("dashboard.css");

/// What every dashboard answer carries: nothing but this origin may be loaded or contacted.
pub(super) const CSP: &str = "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// How often [`History`] samples the counters.
pub(super) const SAMPLE_EVERY: Duration = Duration::from_secs(60);
/// Samples kept: an hour of minutes, plus the one each difference starts from.
const SAMPLES: usize = 61;
/// Most listener rows one refresh of the page carries (cluster-wide, and this relay's): the
/// page refreshes every 5 s, and 1,000 names were 650 kB each time; the counts stay whole, and
/// `/cluster/listeners` (or `/listeners`) lists every one.
const ROWS: usize = 100;

/// The counters one sample records.
#[derive(Debug, Clone, Default)]
struct Sample {
    /// Unix time, seconds.
    at: u64,
    bytes: u64,
    streams: u64,
    http_requests: u64,
    refusals: Vec<(&'static str, u64)>,
    listeners: i64,
    dialer_sessions: i64,
    streams_open: i64,
}

impl Sample {
    fn take(m: &Metrics) -> Sample {
        Sample {
            at: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            // Dialed streams count when they end; public HTTP bodies as they pass.
            bytes: m.bytes_to_targets.load(Relaxed) + m.bytes_from_targets.load(Relaxed) + m.per_listener.bytes_total(),
            streams: m.streams_total.load(Relaxed) + m.listener_streams.load(Relaxed),
            http_requests: m.http_requests.load(Relaxed),
            refusals: m.refusal_counts(),
            listeners: m.listeners_active.load(Relaxed),
            dialer_sessions: m.sessions_active.load(Relaxed),
            streams_open: m.streams_active.load(Relaxed),
        }
    }

    fn refused(&self) -> u64 {
        self.refusals.iter().map(|(_, n)| n).sum()
    }
}

/// The last hour of per-minute samples of this relay's counters (in memory; a restart starts it
/// again).
#[derive(Debug, Default)]
pub(super) struct History(Mutex<VecDeque<Sample>>);

impl History {
    /// Record one sample now.
    pub(super) fn sample(&self, m: &Metrics) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() == SAMPLES {
            q.pop_front();
        }
        q.push_back(Sample::take(m));
    }

    /// Per-minute series (oldest first; the last entry runs from the last sample to now) and the
    /// refusals by reason over the whole span.
    fn series(&self, m: &Metrics) -> (Vec<Value>, Vec<Value>) {
        let mut samples: Vec<Sample> = self.0.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
        samples.push(Sample::take(m));
        let points = samples
            .windows(2)
            .map(|w| {
                let (a, b) = (&w[0], &w[1]);
                json!({
                    "at": b.at,
                    "secs": b.at.saturating_sub(a.at),
                    "bytes": b.bytes.saturating_sub(a.bytes),
                    "streams": b.streams.saturating_sub(a.streams),
                    "http_requests": b.http_requests.saturating_sub(a.http_requests),
                    "refusals": b.refused().saturating_sub(a.refused()),
                    "listeners": b.listeners,
                    "dialer_sessions": b.dialer_sessions,
                    "streams_open": b.streams_open,
                })
            })
            .collect();
        let (first, last) = (&samples[0], &samples[samples.len() - 1]);
        let errors = last
            .refusals
            .iter()
            .zip(&first.refusals)
            .filter(|((_, now), (_, then))| now > then)
            .map(|((reason, now), (_, then))| json!({"reason": reason, "count": now - then}))
            .collect();
        (points, errors)
    }
}

/// Sample the counters every [`SAMPLE_EVERY`] until the relay drains (the first sample is taken
/// before the endpoint serves, so the first minute already has a bar).
pub(super) async fn sample_loop(state: Arc<RelayState>, history: Arc<History>) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + SAMPLE_EVERY, SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => history.sample(&state.metrics),
            _ = state.draining.cancelled() => return,
        }
    }
}

/// What the page draws: `/dashboard/data`.
pub(super) async fn data(state: &RelayState, history: &History) -> Value {
    let (points, errors) = history.series(&state.metrics);
    let cluster = match &state.cluster {
        None => json!(null),
        Some(c) => match c.fleet(ROWS).await {
            Ok(f) => json!({"node_id": c.node_id, "nodes": f.nodes, "listeners": f.listeners, "listener_count": f.names, "truncated": f.truncated}),
            Err(e) => json!({"node_id": c.node_id, "error": format!("cannot read the cluster registry (Redis at {}): {e}", c.cfg.redacted_redis())}),
        },
    };
    let mut local = super::listeners(state);
    let local_names = local.as_array().map_or(0, |l| l.iter().filter_map(|r| r["name"].as_str()).collect::<std::collections::HashSet<_>>().len());
    if let Some(rows) = local.as_array_mut() {
        rows.truncate(ROWS);
    }
    json!({
        "cluster": cluster,
        "listeners": local,
        "listener_names": local_names,
        "sessions": super::sessions(state),
        "sample_secs": SAMPLE_EVERY.as_secs(),
        "history": points,
        "errors": errors,
    })
}
