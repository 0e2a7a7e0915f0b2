//! Many streams over one transport: per-stream credit flow control with auto-tuned windows, fair
//! sending, half-close, reset and keepalive. Owned by a dialer or a listener (client side, odd
//! stream ids) or by the relay (server side, even ids); frames arrive and leave through
//! [`FrameSource`]/[`FrameSink`] supplied by `transport`.
//!
//! The layers, inside out:
//! - [`frame`]: the `libtunnel.v1` frame and `GoAway` notice codecs.
//! - [`flow`]: one stream's receive window and the session's round-trip estimate.
//! - `recv` / `send`: one stream's receive and send halves.
//! - [`Connection`]: the whole protocol as a sans-IO state machine (bytes in, frames out,
//!   deadlines and events polled, time passed in), testable on a virtual clock.
//! - [`Session`]: one driver task per session that owns the transport and polls reads, batched
//!   writes, the deadline and the end together; [`MuxStream`] handles share its connection.
//!
//! Data flow. A writer (`MuxStream::poll_write`, or the bridge's zero-copy
//! [`MuxStream::send_frame`]) waits for window credit, for room in its own send queue and for room
//! in the session's write budget, then queues a `Data` frame on its stream. The driver takes every
//! ready frame round-robin across streams (control frames first), so a bulk stream never holds an
//! interactive one behind its backlog, and writes them as one batch. Received frames are filed
//! under their stream without blocking, because a peer may only send what we granted (a peer that
//! exceeds its credit, or sends on a stream it never opened, breaks the protocol and the session
//! ends).
//!
//! Liveness does not depend on the transport: the session ends when the peer has been silent for
//! `keepalive_timeout`, or when the transport has refused our writes for that long (a peer that
//! stopped reading). When a session ends every stream fails with the reason, every waiting reader
//! and writer wakes, and the driver and the transport are freed.
//!
//! Memory per session is bounded by the settings (see [`MuxConfig`]): received data waits in at
//! most `max(receive_budget, open streams × WINDOW)` bytes of windows, small frames are copied out
//! of the transport's read buffer (so a stream of 1-byte frames cannot pin whole buffers), and at
//! most `write_budget` bytes wait to be sent.

mod connection;
mod flow;
pub mod frame;
mod recv;
mod send;
mod session;
mod stream;

use std::time::Duration;

pub use connection::{Connection, Event, Recv, Reserve};
pub use flow::WINDOW;
pub use session::{FrameSink, FrameSource, Session, SessionTask};
pub use stream::MuxStream;

/// Largest payload of one `Data` frame.
pub const MAX_DATA: usize = 128 * 1024;

/// Which end of the session we are (decides stream id parity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Opened the transport (dialer, listener): odd stream ids.
    Client,
    /// Accepted the transport (relay): even stream ids.
    Server,
}

/// Tunables of a session. Its defaults are the relay settings' defaults (`impl Default` and
/// `From<&Limits>` are in `config/settings.rs`, the one table of them, so that `mux` needs no
/// `config`).
#[derive(Debug, Clone)]
pub struct MuxConfig {
    /// Send a ping after this long without hearing from the peer.
    pub keepalive_interval: Duration,
    /// Drop the session after this long without hearing from the peer, or after the transport
    /// refused our writes for this long.
    pub keepalive_timeout: Duration,
    /// Most streams open at once on this session (either direction).
    pub max_streams: usize,
    /// Most peer-opened streams waiting for `accept`.
    pub accept_backlog: usize,
    /// Most bytes of data queued for the transport across all streams.
    pub write_budget: usize,
    /// Largest receive window one stream may grow to (bytes).
    pub max_stream_window: u32,
    /// Most window all streams of the session may have granted together beyond their initial
    /// [`WINDOW`] each (bytes): the bound on received data waiting for readers.
    pub receive_budget: usize,
}

/// Figures of one session, for tests, metrics and the benchmark.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Streams open (not yet finished both ways or reset).
    pub streams: usize,
    /// Received bytes waiting for readers, all streams.
    pub buffered: usize,
    /// Sum of the open streams' receive windows.
    pub granted: usize,
    /// Data bytes queued (or reserved) for the transport.
    pub queued: usize,
    /// Smoothed round-trip time, once measured.
    pub rtt: Option<Duration>,
}

#[cfg(test)]
mod harness;
#[cfg(test)]
mod tests;
