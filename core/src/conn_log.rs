//! One log line per finished connection, at the default (info) level, for every place bytes are
//! bridged: `tunnel forward` and `tunnel socks` (a local client to a target), `tunnel listen`
//! (a routed stream to the local service) and the relay (a dialer's stream to its target or
//! listener). Who, where, bytes each way, duration, outcome; under the target `libtunnel::conn`,
//! so `RUST_LOG=info,libtunnel::conn=warn` silences them alone.

use std::io;
use std::time::Instant;

/// Log that a bridged connection from `from` to `to` ended. `bytes` is (from → to, to → from):
/// `sent` is what the side that opened the connection sent (a local client in `tunnel forward`,
/// the public or dialing client in `tunnel listen`, the dialer at the relay).
pub(crate) fn closed(what: &str, from: &dyn std::fmt::Display, to: &dyn std::fmt::Display, started: Instant, result: &io::Result<(u64, u64)>) {
    let ms = started.elapsed().as_millis() as u64;
    match result {
        Ok((sent, received)) => {
            tracing::info!(target: "libtunnel::conn", %from, %to, sent, received, ms, outcome = "closed", "{what} ended")
        }
        Err(e) => tracing::info!(target: "libtunnel::conn", %from, %to, ms, outcome = %e, "{what} ended with an error"),
    }
}

/// Log that a bridged connection ended the way its peer normally ends it (`how`), which the
/// transport reports as an error (a reset), without calling it one.
pub(crate) fn ended_by_peer(what: &str, from: &dyn std::fmt::Display, to: &dyn std::fmt::Display, started: Instant, how: &str) {
    let ms = started.elapsed().as_millis() as u64;
    tracing::info!(target: "libtunnel::conn", %from, %to, ms, outcome = how, "{what} ended");
}
