//! [`MuxStream`], the handle to one stream of a session: `AsyncRead + AsyncWrite` with half-close,
//! plus the zero-copy calls the bridge uses (reserve credit, send a frame built in place, take a
//! received chunk) and [`MuxStream::poll_cut_off`], which wakes a task blocked on something else
//! when the stream dies with its session.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{Inner, Shared, StreamState, MAX_DATA, STREAM_QUEUE};
use crate::error::{Error, ErrorCode};
use crate::protocol::{Frame, FrameKind, FRAME_HEADER};

/// One stream of a [`super::Session`]: `AsyncRead + AsyncWrite` with half-close via `shutdown`.
///
/// Dropping it finishes the write side (data already written is delivered) and, if the peer was
/// still sending, resets the stream so the peer stops.
pub struct MuxStream {
    shared: Arc<Shared>,
    id: u32,
    /// Part of a received chunk not yet handed to `poll_read`.
    partial: Bytes,
}

impl std::fmt::Debug for MuxStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxStream").field("id", &self.id).finish()
    }
}

fn closed_io(inner: &Inner) -> io::Error {
    match &inner.closed {
        Some((code, why)) => Error::new(*code, why.clone()).into_io(),
        None => io::Error::new(io::ErrorKind::ConnectionReset, "the stream is closed"),
    }
}

fn reset_io(st: &StreamState) -> Option<io::Error> {
    st.reset.as_ref().map(|(code, why)| Error::new(*code, why.clone()).into_io())
}

impl MuxStream {
    pub(super) fn new(shared: Arc<Shared>, id: u32) -> MuxStream {
        MuxStream { shared, id, partial: Bytes::new() }
    }

    /// The stream id on its session.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The stream's current receive window (grows while its reader keeps up; see `flow`).
    pub fn window(&self) -> u32 {
        self.shared.lock().streams.get(&self.id).map_or(0, |st| st.flow.window())
    }

    /// Abort the stream: the peer's reads and writes fail with `code`. Unsent data is dropped; a
    /// stream whose `Open` never left is forgotten without a word to the peer.
    pub fn reset(&mut self, code: ErrorCode) {
        let mut inner = self.shared.lock();
        let inner = &mut *inner;
        let Some(st) = inner.streams.get_mut(&self.id) else { return };
        if st.reset.is_some() {
            return;
        }
        st.reset = Some((ErrorCode::Closed, "the stream was reset locally".into()));
        st.sent_fin = true;
        st.wake_all();
        let announce = st.open_sent;
        inner.discard_queue(self.id);
        inner.discard_received(self.id);
        if announce {
            inner.push_control(Frame::rst(self.id, code));
        }
        inner.forget_if_done(self.id);
    }

    /// Wait until up to `want` bytes may be sent (window credit, room in the stream's queue and
    /// in the session's write budget). Returns how many; the reservation is spent by
    /// [`MuxStream::send_frame`] or returned by [`MuxStream::release_reservation`].
    pub fn poll_reserve(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        let want = want.clamp(1, MAX_DATA);
        let budget = self.shared.cfg.write_budget;
        let mut inner = self.shared.lock();
        let inner = &mut *inner;
        let Some(st) = inner.streams.get_mut(&self.id) else { return Poll::Ready(Err(closed_io(inner))) };
        if let Some(e) = write_error(st) {
            return Poll::Ready(Err(e));
        }
        if st.send_credit == 0 {
            // The reader task raises the credit under this same lock, then wakes us.
            st.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = want.min(st.send_credit as usize);
        if st.reserved >= n {
            return Poll::Ready(Ok(n));
        }
        if st.queued - st.reserved >= STREAM_QUEUE {
            st.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let extra = n - st.reserved;
        if inner.queued_total + extra > budget && inner.queued_total > 0 {
            inner.budget_waiters.push(cx.waker().clone());
            return Poll::Pending;
        }
        st.reserved += extra;
        st.queued += extra;
        inner.queued_total += extra;
        Poll::Ready(Ok(n))
    }

    /// Send a `Data` frame built in place: `frame` holds [`FRAME_HEADER`] bytes of room followed by
    /// at most the reserved number of payload bytes. Zero-copy path used by the bridge.
    pub fn send_frame(&mut self, mut frame: BytesMut) -> io::Result<()> {
        let n = frame.len() - FRAME_HEADER;
        frame[0] = FrameKind::Data as u8;
        frame[1..FRAME_HEADER].copy_from_slice(&self.id.to_be_bytes());
        let mut inner = self.shared.lock();
        let Some(st) = inner.streams.get_mut(&self.id) else { return Err(closed_io(&inner)) };
        if let Some(e) = write_error(st) {
            return Err(e);
        }
        assert!(n <= st.send_credit as usize && n <= st.reserved, "send_frame beyond reservation");
        st.send_credit -= n as u32;
        st.reserved -= n;
        inner.enqueue(self.id, frame.freeze());
        Ok(())
    }

    /// Give back budget reserved but not used.
    pub fn release_reservation(&mut self) {
        let mut inner = self.shared.lock();
        let Some(st) = inner.streams.get_mut(&self.id) else { return };
        let r = std::mem::take(&mut st.reserved);
        if r > 0 {
            st.queued -= r;
            inner.queued_total -= r;
            inner.wake_budget_waiters();
        }
    }

    /// The next received chunk, without copying; `None` at end of stream.
    pub fn poll_recv_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.partial.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.partial))));
        }
        let (max, budget) = (self.shared.cfg.max_stream_window, self.shared.cfg.receive_budget);
        let mut inner = self.shared.lock();
        let inner = &mut *inner;
        let Some(st) = inner.streams.get_mut(&self.id) else { return Poll::Ready(Err(closed_io(inner))) };
        let chunk = match st.recv.pop_front() {
            Some((c, pinned)) => {
                st.pinned -= usize::from(pinned);
                Some(c)
            }
            None if !st.tail.is_empty() => Some(st.tail.split().freeze()),
            None => None,
        };
        if let Some(chunk) = chunk {
            let n = chunk.len();
            st.recv_bytes -= n;
            inner.buffered -= n;
            if st.reset.is_none() {
                let budget_left = budget.saturating_sub(inner.granted);
                if let Some(g) = st.flow.on_consumed(n as u32, Instant::now(), inner.rtt.for_growth(), max, budget_left) {
                    inner.granted += g.growth as usize;
                    inner.push_control(Frame::window(self.id, g.grant));
                }
            }
            return Poll::Ready(Ok(Some(chunk)));
        }
        if st.recv_fin {
            return Poll::Ready(Ok(None));
        }
        if let Some(e) = reset_io(st) {
            return Poll::Ready(Err(e));
        }
        st.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Put bytes back in front of what the stream yields next (the rest of a chunk a caller
    /// parsed a header from).
    pub fn unread(&mut self, chunk: Bytes) {
        debug_assert!(self.partial.is_empty(), "unread twice");
        self.partial = chunk;
    }

    /// Await the next received chunk.
    pub async fn recv_chunk(&mut self) -> io::Result<Option<Bytes>> {
        poll_fn(|cx| self.poll_recv_chunk(cx)).await
    }

    /// Ready with the error once the stream has been cut off (reset, or its session ended) before
    /// the peer finished sending. A task blocked on something else (a local socket that does not
    /// drain) polls this to learn that the stream is gone, and tears down.
    pub fn poll_cut_off(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let mut inner = self.shared.lock();
        let Some(st) = inner.streams.get_mut(&self.id) else { return Poll::Ready(closed_io(&inner)) };
        match reset_io(st) {
            Some(e) if !st.recv_fin => Poll::Ready(e),
            _ => {
                st.cut_waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// Half-close: tell the peer we will write no more.
    pub fn finish(&mut self) {
        self.release_reservation();
        let mut inner = self.shared.lock();
        let Some(st) = inner.streams.get_mut(&self.id) else { return };
        if st.sent_fin || st.reset.is_some() {
            return;
        }
        st.sent_fin = true;
        inner.enqueue(self.id, Frame::encode(FrameKind::Fin, self.id, &[]));
        inner.forget_if_done(self.id);
    }
}

fn write_error(st: &StreamState) -> Option<io::Error> {
    if let Some(e) = reset_io(st) {
        return Some(e);
    }
    if st.sent_fin {
        return Some(io::Error::new(io::ErrorKind::BrokenPipe, "write after shutdown on a tunnel stream"));
    }
    None
}

impl AsyncRead for MuxStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let mut chunk = match this.poll_recv_chunk(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(None)) => return Poll::Ready(Ok(())),
            Poll::Ready(Ok(Some(c))) => c,
        };
        let n = chunk.len().min(buf.remaining());
        buf.put_slice(&chunk[..n]);
        chunk.advance(n);
        this.partial = chunk;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        let n = match this.poll_reserve(cx, buf.len()) {
            Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        let mut frame = BytesMut::with_capacity(FRAME_HEADER + n);
        frame.put_bytes(0, FRAME_HEADER);
        frame.put_slice(&buf[..n]);
        this.send_frame(frame)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.finish();
        Poll::Ready(Ok(()))
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        let inner = &mut *inner;
        let Some(st) = inner.streams.get_mut(&self.id) else { return };
        st.handle = false;
        let r = std::mem::take(&mut st.reserved);
        st.queued -= r;
        inner.queued_total -= r;
        let st = inner.streams.get_mut(&self.id).expect("present");
        if st.reset.is_none() {
            let recv_done = st.recv_fin;
            if !st.sent_fin {
                st.sent_fin = true;
                inner.enqueue(self.id, Frame::encode(FrameKind::Fin, self.id, &[]));
            }
            if !recv_done {
                // The peer is still sending and nobody will read: tell it to stop, after the data
                // and `Fin` already queued.
                inner.enqueue(self.id, Frame::rst(self.id, ErrorCode::Closed));
                inner.discard_received(self.id);
                let st = inner.streams.get_mut(&self.id).expect("present");
                st.reset = Some((ErrorCode::Closed, "the stream was dropped".into()));
            }
        }
        inner.forget_if_done(self.id);
        if r > 0 {
            inner.wake_budget_waiters();
        }
    }
}
