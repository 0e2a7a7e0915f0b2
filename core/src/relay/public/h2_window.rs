//! The receive windows of the relay's HTTP/2 connections to h2c listeners, as the wire shows them:
//! [`WindowMeter`] wraps a connection's byte stream, reads the 9-byte frame headers going each
//! way (and a `WINDOW_UPDATE`'s 4-byte increment), and keeps two figures, summed over every such
//! connection in the relay's gauges:
//!
//! - `h2c_stream_window_held`: what the open streams hold: for each stream the listener has sent
//!   data on and that has not ended (`END_STREAM`) or been reset, the bytes it sent minus the
//!   stream window the relay granted back. A response its client stops reading holds at most its
//!   stream window here; once reset (the client left, or [`crate::relay`]'s stall deadline cut
//!   it) it holds nothing, so after a flood of unread responses this is back to zero.
//! - `h2c_window_held`: what the connection-level window lacks of its target
//!   ([`H2_CONNECTION_WINDOW`]): the initial 65,535 bytes plus every connection `WINDOW_UPDATE`
//!   the relay sent, minus every `DATA` payload. h2 grants freed credit back lazily (once the
//!   free part reaches half the window), so an idle connection reads as full within a third of it.
//!
//! The bytes pass through untouched.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::listeners::H2_CONNECTION_WINDOW;
use crate::relay::metrics::Metrics;

/// The window every HTTP/2 connection starts with (RFC 9113 6.9.2).
const INITIAL_WINDOW: i64 = 65_535;
/// The client connection preface, which precedes the relay's first frame.
const PREFACE_LEN: usize = 24;
const DATA: u8 = 0;
const WINDOW_UPDATE: u8 = 8;

const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const END_STREAM: u8 = 0x1;

/// Walks HTTP/2 frames in one direction, fed the bytes in any pieces.
#[derive(Default)]
struct FrameScan {
    /// Bytes still to pass before frames start (the client preface, on the relay's side).
    preface: usize,
    head: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    skip: usize,
    /// Collecting a WINDOW_UPDATE's increment: its stream, and the bytes gathered so far.
    update: Option<(u32, [u8; 4], usize)>,
}

/// What a [`FrameScan`] reports.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// A DATA frame: stream, flow-controlled bytes, whether it ends the stream.
    Data(u32, u32, bool),
    /// A HEADERS frame: stream, whether it ends the stream.
    Headers(u32, bool),
    /// RST_STREAM for a stream.
    Reset(u32),
    /// A WINDOW_UPDATE: stream (0 for the connection) and increment.
    Update(u32, u32),
}

impl FrameScan {
    fn feed(&mut self, mut b: &[u8], mut seen: impl FnMut(Seen)) {
        while !b.is_empty() {
            if self.preface > 0 {
                let n = self.preface.min(b.len());
                self.preface -= n;
                b = &b[n..];
            } else if let Some((stream, mut inc, mut got)) = self.update.take() {
                let n = (4 - got).min(b.len());
                inc[got..got + n].copy_from_slice(&b[..n]);
                got += n;
                self.skip -= n;
                b = &b[n..];
                if got == 4 {
                    seen(Seen::Update(stream, u32::from_be_bytes(inc) & 0x7fff_ffff));
                } else {
                    self.update = Some((stream, inc, got));
                }
            } else if self.skip > 0 {
                let n = self.skip.min(b.len());
                self.skip -= n;
                b = &b[n..];
            } else {
                let n = (9 - self.have).min(b.len());
                self.head[self.have..self.have + n].copy_from_slice(&b[..n]);
                self.have += n;
                b = &b[n..];
                if self.have < 9 {
                    continue;
                }
                self.have = 0;
                let h = self.head;
                let len = u32::from_be_bytes([0, h[0], h[1], h[2]]);
                let (kind, flags) = (h[3], h[4]);
                let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                self.skip = len as usize;
                match kind {
                    DATA => seen(Seen::Data(stream, len, flags & END_STREAM != 0)),
                    HEADERS => seen(Seen::Headers(stream, flags & END_STREAM != 0)),
                    RST_STREAM => seen(Seen::Reset(stream)),
                    WINDOW_UPDATE if len == 4 => self.update = Some((stream, [0; 4], 0)),
                    _ => {}
                }
            }
        }
    }
}

/// One connection's figures (see the module doc), mirrored into the relay's gauges.
struct Windows {
    /// The connection's receive window now.
    connection: i64,
    /// Per open stream (opened by the relay's HEADERS, until the listener ends it or either side
    /// resets it): bytes held (sent minus granted back). Data that arrives for a stream after its
    /// reset is not counted here: h2 gives it back at once.
    streams: HashMap<u32, i64>,
    metrics: Arc<Metrics>,
}

impl Windows {
    fn connection_moved(&mut self, by: i64) {
        self.connection += by;
        self.metrics.h2c_window_held.fetch_sub(by, Relaxed);
    }

    fn stream_moved(&mut self, stream: u32, by: i64) {
        if let Some(held) = self.streams.get_mut(&stream) {
            *held += by;
            self.metrics.h2c_stream_window_held.fetch_add(by, Relaxed);
        }
    }

    fn stream_ended(&mut self, stream: u32) {
        if let Some(held) = self.streams.remove(&stream) {
            self.metrics.h2c_stream_window_held.fetch_sub(held, Relaxed);
        }
    }

    /// A frame the listener sent.
    fn received(&mut self, seen: Seen) {
        match seen {
            Seen::Data(stream, n, end) => {
                self.connection_moved(-i64::from(n));
                self.stream_moved(stream, i64::from(n));
                if end {
                    self.stream_ended(stream);
                }
            }
            Seen::Headers(stream, true) | Seen::Reset(stream) => self.stream_ended(stream),
            Seen::Headers(_, false) | Seen::Update(..) => {}
        }
    }

    /// A frame the relay sent.
    fn sent(&mut self, seen: Seen) {
        match seen {
            Seen::Update(0, inc) => self.connection_moved(i64::from(inc)),
            Seen::Update(stream, inc) => self.stream_moved(stream, -i64::from(inc)),
            Seen::Reset(stream) => self.stream_ended(stream),
            // A request's head opens its stream (a trailers block finds it open already).
            Seen::Headers(stream, _) => {
                self.streams.entry(stream).or_insert(0);
            }
            Seen::Data(..) => {}
        }
    }
}

/// A connection to an h2c listener whose receive windows are counted (see the module doc).
pub(crate) struct WindowMeter<T> {
    io: T,
    reads: FrameScan,
    writes: FrameScan,
    windows: Windows,
}

impl<T> WindowMeter<T> {
    pub(crate) fn new(io: T, metrics: Arc<Metrics>) -> WindowMeter<T> {
        metrics.h2c_upstreams_open.fetch_add(1, Relaxed);
        metrics.h2c_window_held.fetch_add(i64::from(H2_CONNECTION_WINDOW) - INITIAL_WINDOW, Relaxed);
        WindowMeter {
            io,
            reads: FrameScan::default(),
            writes: FrameScan { preface: PREFACE_LEN, ..FrameScan::default() },
            windows: Windows { connection: INITIAL_WINDOW, streams: HashMap::new(), metrics },
        }
    }
}

impl<T> Drop for WindowMeter<T> {
    fn drop(&mut self) {
        let w = &self.windows;
        w.metrics.h2c_upstreams_open.fetch_sub(1, Relaxed);
        w.metrics.h2c_window_held.fetch_sub(i64::from(H2_CONNECTION_WINDOW) - w.connection, Relaxed);
        w.metrics.h2c_stream_window_held.fetch_sub(w.streams.values().sum::<i64>(), Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WindowMeter<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        let windows = &mut this.windows;
        this.reads.feed(&buf.filled()[before..], |seen| windows.received(seen));
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WindowMeter<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            let windows = &mut this.windows;
            this.writes.feed(&buf[..*n], |seen| windows.sent(seen));
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let mut f = vec![len[1], len[2], len[3], kind, 0];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn frames_are_seen_in_any_pieces() {
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        wire.extend(frame(4, 0, &[0; 6])); // SETTINGS: not reported
        wire.extend(frame(WINDOW_UPDATE, 0, &1000u32.to_be_bytes()));
        wire.extend(frame(WINDOW_UPDATE, 3, &(0x8000_0000u32 | 7).to_be_bytes())); // reserved bit ignored
        wire.extend(frame(DATA, 1, &[9; 300]));
        wire.extend(frame(RST_STREAM, 5, &8u32.to_be_bytes()));
        wire.extend(frame(HEADERS, 7, &[0x82]).into_iter().enumerate().map(|(i, b)| if i == 4 { 0x5 } else { b }));
        let want = vec![Seen::Update(0, 1000), Seen::Update(3, 7), Seen::Data(1, 300, false), Seen::Reset(5), Seen::Headers(7, true)];
        for piece in [1, 2, 5, 9, 13, wire.len()] {
            let mut scan = FrameScan { preface: PREFACE_LEN, ..FrameScan::default() };
            let mut got = Vec::new();
            for chunk in wire.chunks(piece) {
                scan.feed(chunk, |s| got.push(s));
            }
            assert_eq!(got, want, "pieces of {piece}");
        }
    }

    #[test]
    fn streams_hold_until_granted_back_ended_or_reset() {
        let metrics = Arc::new(Metrics::default());
        let mut w = Windows { connection: INITIAL_WINDOW, streams: HashMap::new(), metrics: metrics.clone() };
        w.sent(Seen::Headers(1, true));
        w.sent(Seen::Headers(3, false));
        w.received(Seen::Data(1, 1000, false));
        w.received(Seen::Data(3, 500, false));
        w.sent(Seen::Update(1, 400));
        w.sent(Seen::Update(0, 1500));
        assert_eq!(metrics.h2c_stream_window_held.load(Relaxed), 1100);
        assert_eq!(w.connection, INITIAL_WINDOW);
        w.sent(Seen::Reset(3));
        w.received(Seen::Data(1, 10, true));
        assert_eq!(metrics.h2c_stream_window_held.load(Relaxed), 0);
        assert!(w.streams.is_empty());
        w.sent(Seen::Update(1, 50)); // after the end: nothing to grant
        w.received(Seen::Data(3, 700, false)); // in flight when the reset went out: h2 gives it back
        assert_eq!(metrics.h2c_stream_window_held.load(Relaxed), 0);
        assert!(w.streams.is_empty());
    }
}
