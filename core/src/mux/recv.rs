//! The receive half of one stream: data the peer sent and the reader has not taken yet, the
//! stream's flow-control window ([`RecvFlow`]) and whether the peer finished. Pure state; the
//! [`super::Connection`] files frames into it and hands chunks out of it.
//!
//! Memory: received chunks of at least [`COPY_BELOW`] bytes are kept without copying (they share
//! the transport's read buffer) while the stream holds fewer than [`MAX_PINNED`] of them; smaller
//! chunks, and chunks that arrive while it holds that many, are copied into one coalescing tail,
//! so a stream of 1-byte frames, or a stalled reader, keeps at most [`MAX_PINNED`] transport
//! buffers alive.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::{Bytes, BytesMut};

use super::flow::RecvFlow;
use super::MAX_DATA;

/// Received chunks smaller than this are copied out of the transport's read buffer instead of
/// keeping the whole buffer alive (a stream of 1-byte frames would pin one buffer per byte).
pub(super) const COPY_BELOW: usize = 8 * 1024;
/// Larger chunks are kept without copying while a stream holds fewer than this many such chunks;
/// later ones are copied, so a stalled stream pins at most this many transport buffers. The chunks
/// already pinned stay as they are: the driver files a whole batch of frames before the reader
/// runs, and copying the older chunks as soon as two waited (as this did with a bound of 2) copied
/// nearly every frame of a bulk stream on the relay (`Bytes::copy_from_slice`, 5 % of its CPU
/// in a loopback upload).
pub(super) const MAX_PINNED: usize = 4;

/// What one stream has received.
#[derive(Debug)]
pub(super) struct RecvState {
    pub(super) flow: RecvFlow,
    /// Received data not yet read, in order, then `tail`; `true` marks a zero-copy chunk that
    /// keeps the transport's read buffer alive.
    chunks: VecDeque<(Bytes, bool)>,
    /// Zero-copy chunks in `chunks` (at most [`MAX_PINNED`]).
    pinned: usize,
    /// Small or late chunks, copied and coalesced.
    tail: BytesMut,
    /// Bytes in `chunks` and `tail`.
    pub(super) bytes: usize,
    /// The peer half-closed (sent `Fin`).
    pub(super) fin: bool,
}

impl RecvState {
    pub(super) fn new(now: Instant) -> RecvState {
        RecvState { flow: RecvFlow::new(now), chunks: VecDeque::new(), pinned: 0, tail: BytesMut::new(), bytes: 0, fin: false }
    }

    /// File `payload` (already checked against the window) behind what is buffered.
    pub(super) fn push(&mut self, payload: Bytes) {
        let n = payload.len();
        if n >= COPY_BELOW && self.pinned < MAX_PINNED {
            if !self.tail.is_empty() {
                let copied = self.tail.split().freeze();
                self.chunks.push_back((copied, false));
            }
            self.chunks.push_back((payload, true));
            self.pinned += 1;
        } else {
            self.tail.extend_from_slice(&payload);
            if self.tail.len() >= MAX_DATA {
                let copied = self.tail.split().freeze();
                self.chunks.push_back((copied, false));
            }
        }
        self.bytes += n;
    }

    /// The next buffered chunk, if any.
    pub(super) fn pop(&mut self) -> Option<Bytes> {
        let chunk = match self.chunks.pop_front() {
            Some((c, pinned)) => {
                self.pinned -= usize::from(pinned);
                c
            }
            None if !self.tail.is_empty() => self.tail.split().freeze(),
            None => return None,
        };
        self.bytes -= chunk.len();
        Some(chunk)
    }

    /// Drop everything buffered (the stream was reset locally); returns how many bytes.
    pub(super) fn discard(&mut self) -> usize {
        self.chunks.clear();
        self.pinned = 0;
        self.tail = BytesMut::new();
        std::mem::take(&mut self.bytes)
    }
}
