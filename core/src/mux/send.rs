//! The send half of one stream: the credit the peer granted, the frames waiting for the
//! transport, the budget reserved by a writer, and whether we finished. Pure state; the
//! [`super::Connection`] schedules the queued frames round-robin across streams and keeps the
//! session-wide totals.

use std::collections::VecDeque;

use bytes::Bytes;

use super::flow::WINDOW;

/// Most data bytes one stream may have waiting for the transport: enough to keep the transport
/// busy, small enough that round-robin sending keeps other streams' latency low.
pub(super) const STREAM_QUEUE: usize = 256 * 1024;

/// What one stream is sending.
#[derive(Debug)]
pub(super) struct SendState {
    /// Bytes we may still send.
    pub(super) credit: u32,
    /// We half-closed (our `Fin` is queued or sent), or the stream was reset.
    pub(super) fin: bool,
    /// Frames waiting for the transport, in order (`Open`, `Data`, `Fin`, drop-time `Rst`).
    pub(super) queue: VecDeque<Bytes>,
    /// Data bytes in `queue` plus `reserved`.
    pub(super) queued: usize,
    /// Budget reserved by a writer and not yet spent.
    pub(super) reserved: usize,
    /// In the connection's round-robin ring.
    pub(super) scheduled: bool,
    /// Our `Open` has been handed to the transport (always true for peer-opened streams).
    pub(super) open_sent: bool,
}

impl SendState {
    pub(super) fn new(open_sent: bool) -> SendState {
        SendState { credit: WINDOW, fin: false, queue: VecDeque::new(), queued: 0, reserved: 0, scheduled: false, open_sent }
    }

    /// Whether a writer may queue more data now (room in the stream's own queue).
    pub(super) fn has_room(&self) -> bool {
        self.queued - self.reserved < STREAM_QUEUE
    }

    /// Drop the queued frames (the stream was reset); returns the data bytes they held.
    pub(super) fn discard(&mut self) -> usize {
        let dropped = self.queued - self.reserved;
        self.queue.clear();
        self.queued = self.reserved;
        dropped
    }
}
