//! Handing memory back after a flood. Every per-connection buffer is freed when its connection
//! closes, and the relay's tables shrink when they empty, but glibc's allocator keeps freed
//! memory in its per-thread arenas: after 2,000 connections came and went, the process kept its
//! high-water RSS. Once a second this task compares the load now ([`Metrics::load`]: connections
//! on every endpoint, the admin endpoint's included, and public HTTP requests in progress, which
//! a few connections can hold by the thousand) with its peak since it last acted; when it fell by
//! at least [`TRIM_AFTER`], it asks the allocator to return its free pages (`malloc_trim`, on a
//! blocking thread). A flood that never becomes connections counts too: QUIC Initials turned away
//! (a Retry, a refusal) cost the endpoint's crypto and buffers without raising the load, so
//! [`TRIM_AFTER`] of them since the last trim, with the load back down, also hand memory back.
//! Other allocators: nothing to do.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::metrics::Metrics;

/// How far the load must have fallen since the peak before memory is handed back.
const TRIM_AFTER: i64 = 128;

/// Run until `stop`: hand memory back once a burst of connections has closed.
pub(super) async fn return_after_floods(metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_turned_away = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let open = metrics.load();
        let peak = metrics.connections_peak.load(Relaxed);
        let turned_away = metrics.turned_away.load(Relaxed);
        let flood = turned_away - std::mem::replace(&mut last_turned_away, turned_away) >= TRIM_AFTER as u64;
        if peak - open >= TRIM_AFTER || (flood && open < TRIM_AFTER) {
            metrics.connections_peak.store(open, Relaxed);
            let t0 = std::time::Instant::now();
            // Off the runtime's workers: on a large heap it walks a lot of memory.
            let released = tokio::task::spawn_blocking(trim).await.unwrap_or(false);
            tracing::debug!(peak, open, released, took = ?t0.elapsed(), "connections or requests ended since the peak; returned free memory to the system");
        }
    }
}

/// Return the allocator's free pages to the system; whether it released any.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() -> bool {
    // SAFETY: malloc_trim only walks the allocator's own free lists; it has no preconditions.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() -> bool {
    false
}
