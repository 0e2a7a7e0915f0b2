//! Receive-side flow control of one stream, and the session's round-trip estimate that drives it.
//! Pure state, no I/O (unit tested here); the session calls it as frames arrive and as the
//! application reads.
//!
//! A stream's window starts at [`WINDOW`] (the credit both ends assume for a new stream, a
//! constant of `libtunnel.v1`) and doubles whenever its reader consumed a whole window within
//! [`GROWTH_RTTS`] round trips (rust-yamux's rule, with the fastest round trip seen, see
//! [`Rtt::for_growth`]): a reader that keeps up with a long link pulls the window up to about 3x
//! the bandwidth-delay product, up to the session's per-stream maximum and within what the
//! session's receive budget has left. A stream that is not being read never grows.

use std::time::{Duration, Instant};

/// Credit every new stream starts with, both ways (a protocol constant of `libtunnel.v1`).
pub const WINDOW: u32 = 256 * 1024;
/// A grant goes out once the reader consumed this share of the window (but at most
/// [`MAX_GRANT_STEP`] bytes), so the sender always has most of its window to send with.
const GRANT_DIVISOR: u32 = 4;
/// A window is doubled when the reader consumed all of it within this many of the fastest round
/// trips. rust-yamux uses 1.5, which settles the window near 1.5x the bandwidth-delay product of
/// the path without queues; a link that queues or loses packets stretches the real round trip
/// beyond that (a drop-tail queue of one RTT doubles it, a lost segment holds every byte behind
/// it at the receiver for one more), and the stream then waits for credit. On the lossy link of
/// `bench/lossy.sh` (100 Mbit/s, 50 ms, one-RTT queue, 1 % loss; with 1.5 the window stops at
/// 1 MiB) one stream moved a median 0.83x direct over 5 runs (0.66-0.94) with 1.5 and 0.965x over
/// 4 (0.95-0.98) with 3 (`bench/results/lossy-issue29-2026-12-07-window-growth-ab.txt`). A reader
/// that does not keep up still never grows its window, so what waits at the receiver is bounded
/// as before (`max_stream_window`, the session's receive budget).
const GROWTH_RTTS: u32 = 3;
/// Upper bound on the bytes consumed between two grants on a large window.
const MAX_GRANT_STEP: u32 = 1024 * 1024;

/// What the reader's side of one stream has granted and consumed.
#[derive(Debug, Clone)]
pub struct RecvFlow {
    /// Bytes the peer may have sent and we not yet consumed (the stream's window).
    window: u32,
    /// Consumed since the last grant.
    unacked: u32,
    /// How much the peer may still send (our view of its credit).
    credit: u32,
    /// Start of the current measuring epoch, and bytes consumed since.
    epoch: Instant,
    epoch_bytes: u32,
}

/// A `Window` frame to send: `grant` more bytes, of which `growth` enlarge the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Credit to give the peer.
    pub grant: u32,
    /// By how much the stream's window grew (counted against the session budget).
    pub growth: u32,
}

impl RecvFlow {
    /// A new stream's receive state.
    pub fn new(now: Instant) -> RecvFlow {
        RecvFlow { window: WINDOW, unacked: 0, credit: WINDOW, epoch: now, epoch_bytes: 0 }
    }

    /// The stream's current window.
    pub fn window(&self) -> u32 {
        self.window
    }

    /// What the peer may still send.
    pub fn credit(&self) -> u32 {
        self.credit
    }

    /// The peer sent `n` bytes; `Err` (with the credit it had) when that exceeds its credit.
    pub fn on_data(&mut self, n: u32) -> Result<(), u32> {
        if n > self.credit {
            return Err(self.credit);
        }
        self.credit -= n;
        Ok(())
    }

    /// The reader consumed `n` bytes. `max` is the per-stream window limit and `budget_left` what
    /// the session may still grant; returns the `Window` frame to send, if one is due.
    pub fn on_consumed(&mut self, n: u32, now: Instant, rtt: Option<Duration>, max: u32, budget_left: usize) -> Option<Grant> {
        self.unacked = self.unacked.saturating_add(n);
        self.epoch_bytes = self.epoch_bytes.saturating_add(n);
        let mut growth = 0;
        if self.epoch_bytes >= self.window {
            let fast = rtt.is_some_and(|rtt| now.duration_since(self.epoch) < rtt * GROWTH_RTTS);
            if fast && self.window < max {
                let room = u32::try_from(budget_left).unwrap_or(u32::MAX);
                growth = self.window.min(max - self.window).min(room);
            }
            self.epoch = now;
            self.epoch_bytes = 0;
        }
        self.window += growth;
        let step = (self.window / GRANT_DIVISOR).min(MAX_GRANT_STEP);
        if self.unacked < step && growth == 0 {
            return None;
        }
        let grant = self.unacked + growth;
        self.unacked = 0;
        self.credit = self.credit.saturating_add(grant);
        Some(Grant { grant, growth })
    }
}

/// Round-trip time of a session, from its pings: smoothed (RFC 6298's 1/8 gain) and the
/// minimum seen (the path without queues).
#[derive(Debug, Clone, Default)]
pub struct Rtt {
    srtt: Option<Duration>,
    min: Option<Duration>,
}

impl Rtt {
    /// Fold in one measurement.
    pub fn sample(&mut self, rtt: Duration) {
        self.srtt = Some(match self.srtt {
            None => rtt,
            Some(s) => (s * 7 + rtt) / 8,
        });
        self.min = Some(self.min.map_or(rtt, |m| m.min(rtt)));
    }

    /// The round trip window growth is judged against: the fastest seen (queues excluded, so a
    /// queue that growth itself built cannot justify more growth), at least 1 ms (timer and
    /// scheduling noise on loopback).
    pub fn for_growth(&self) -> Option<Duration> {
        self.min.map(|m| m.max(Duration::from_millis(1)))
    }

    /// The estimate, once there is one.
    pub fn get(&self) -> Option<Duration> {
        self.srtt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u32 = 16 * 1024 * 1024;
    const BUDGET: usize = 64 * 1024 * 1024;

    /// Deliver and consume `total` bytes in 64 KiB chunks, `per_chunk` apart; returns the grants.
    fn run(flow: &mut RecvFlow, start: Instant, total: u32, per_chunk: Duration, rtt: Duration, budget: usize) -> Vec<Grant> {
        let mut now = start;
        let mut grants = Vec::new();
        let mut left = total;
        let mut budget = budget;
        while left > 0 {
            let n = left.min(64 * 1024);
            flow.on_data(n).expect("the sender stays within its credit");
            now += per_chunk;
            if let Some(g) = flow.on_consumed(n, now, Some(rtt), MAX, budget) {
                budget -= g.growth as usize;
                grants.push(g);
            }
            left -= n;
        }
        grants
    }

    #[test]
    fn a_fast_reader_grows_the_window_to_the_maximum() {
        let t0 = Instant::now();
        let mut flow = RecvFlow::new(t0);
        // 64 KiB every 100 µs is 655 MB/s; the RTT is 50 ms, so every window is consumed well
        // within GROWTH_RTTS round trips and the window doubles until it reaches the maximum.
        run(&mut flow, t0, 64 * 1024 * 1024, Duration::from_micros(100), Duration::from_millis(50), BUDGET);
        assert_eq!(flow.window(), MAX);
    }

    #[test]
    fn a_slow_reader_keeps_the_initial_window() {
        let t0 = Instant::now();
        let mut flow = RecvFlow::new(t0);
        // 64 KiB every 50 ms: a window takes 200 ms to consume, more than GROWTH_RTTS RTTs of 1 ms.
        let grants = run(&mut flow, t0, 4 * 1024 * 1024, Duration::from_millis(50), Duration::from_millis(1), BUDGET);
        assert_eq!(flow.window(), WINDOW);
        assert!(grants.iter().all(|g| g.growth == 0));
        assert!(!grants.is_empty(), "the consumed bytes are still granted back");
    }

    #[test]
    fn an_idle_stream_never_grows_and_owes_no_grant() {
        let t0 = Instant::now();
        let mut flow = RecvFlow::new(t0);
        assert_eq!(flow.on_consumed(0, t0 + Duration::from_secs(5), Some(Duration::from_millis(1)), MAX, BUDGET), None);
        assert_eq!(flow.window(), WINDOW);
        assert_eq!(flow.credit(), WINDOW);
    }

    #[test]
    fn growth_stops_at_the_session_budget() {
        let t0 = Instant::now();
        let mut flow = RecvFlow::new(t0);
        let grants = run(&mut flow, t0, 32 * 1024 * 1024, Duration::from_micros(100), Duration::from_millis(50), 300 * 1024);
        let grown: u32 = grants.iter().map(|g| g.growth).sum();
        assert!(grown <= 300 * 1024, "grew {grown} with a 300 KiB budget");
        assert_eq!(flow.window(), WINDOW + grown);
    }

    #[test]
    fn no_growth_before_the_first_rtt_sample() {
        let t0 = Instant::now();
        let mut flow = RecvFlow::new(t0);
        for i in 1..=64 {
            flow.on_data(64 * 1024).unwrap();
            let _ = flow.on_consumed(64 * 1024, t0 + Duration::from_micros(i), None, MAX, BUDGET);
        }
        assert_eq!(flow.window(), WINDOW);
    }

    #[test]
    fn credit_is_enforced_and_returned_by_grants() {
        let t0 = Instant::now();
        let mut flow = RecvFlow::new(t0);
        assert_eq!(flow.on_data(WINDOW + 1), Err(WINDOW));
        flow.on_data(WINDOW).unwrap();
        assert_eq!(flow.credit(), 0);
        let g = flow.on_consumed(WINDOW, t0 + Duration::from_secs(1), Some(Duration::from_millis(1)), MAX, BUDGET).expect("a grant");
        assert_eq!(g, Grant { grant: WINDOW, growth: 0 });
        assert_eq!(flow.credit(), WINDOW);
    }

    #[test]
    fn rtt_is_smoothed() {
        let mut rtt = Rtt::default();
        assert_eq!(rtt.get(), None);
        rtt.sample(Duration::from_millis(80));
        assert_eq!(rtt.get(), Some(Duration::from_millis(80)));
        rtt.sample(Duration::from_millis(0));
        assert_eq!(rtt.get(), Some(Duration::from_millis(70)));
    }
}
