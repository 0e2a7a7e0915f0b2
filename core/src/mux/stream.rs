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

use super::connection::{Recv, Reserve};
use super::session::Shared;
use crate::error::ErrorCode;
use crate::protocol::FRAME_HEADER;

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
        self.shared.lock().conn.window(self.id)
    }

    /// Abort the stream: the peer's reads and writes fail with `code`. Unsent data is dropped; a
    /// stream whose `Open` never left is forgotten without a word to the peer.
    pub fn reset(&mut self, code: ErrorCode) {
        self.shared.lock().conn.reset(self.id, code);
    }

    /// Wait until up to `want` bytes may be sent (window credit, room in the stream's queue and
    /// in the session's write budget). Returns how many; the reservation is spent by
    /// [`MuxStream::send_frame`] or returned by [`MuxStream::release_reservation`].
    pub fn poll_reserve(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        let mut st = self.shared.lock();
        match st.conn.reserve(self.id, want) {
            Err(e) => Poll::Ready(Err(e)),
            Ok(Reserve::Ready(n)) => Poll::Ready(Ok(n)),
            Ok(Reserve::WaitStream) => {
                st.wait_write(self.id, cx);
                Poll::Pending
            }
            Ok(Reserve::WaitBudget) => {
                st.wait_budget(cx);
                Poll::Pending
            }
        }
    }

    /// Send a `Data` frame built in place: `frame` holds [`FRAME_HEADER`] bytes of room followed by
    /// at most the reserved number of payload bytes. Zero-copy path used by the bridge.
    pub fn send_frame(&mut self, frame: BytesMut) -> io::Result<()> {
        self.shared.lock().conn.send_data(self.id, frame)
    }

    /// Give back budget reserved but not used.
    pub fn release_reservation(&mut self) {
        self.shared.lock().conn.release_reservation(self.id);
    }

    /// The next received chunk, without copying; `None` at end of stream.
    pub fn poll_recv_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.partial.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.partial))));
        }
        let mut st = self.shared.lock();
        match st.conn.recv(self.id, Instant::now()) {
            Err(e) => Poll::Ready(Err(e)),
            Ok(Recv::Chunk(c)) => Poll::Ready(Ok(Some(c))),
            Ok(Recv::End) => Poll::Ready(Ok(None)),
            Ok(Recv::Blocked) => {
                st.wait_read(self.id, cx);
                Poll::Pending
            }
        }
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
        let mut st = self.shared.lock();
        match st.conn.cut_off(self.id) {
            Some(e) => Poll::Ready(e),
            None => {
                st.wait_cut(self.id, cx);
                Poll::Pending
            }
        }
    }

    /// Half-close: tell the peer we will write no more.
    pub fn finish(&mut self) {
        self.shared.lock().conn.finish(self.id);
    }
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
        let mut st = self.shared.lock();
        st.forget(self.id);
        st.conn.stream_dropped(self.id);
    }
}
