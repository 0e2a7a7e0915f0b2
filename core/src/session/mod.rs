//! The transport-independent session: what the dialer, the listener, the relay's session serving
//! and the cluster's node-to-node hop see of a session to a peer. [`Session`] opens and accepts
//! streams (each then carries its header, a SOCKS5 CONNECT or a [`crate::protocol::StreamHeader`],
//! as its first bytes), closes, drains, announces `GoAway`, reports its end and its figures.
//! [`SessionStream`] is one stream: `AsyncRead + AsyncWrite` with half-close, plus the zero-copy
//! calls the bridge uses.
//!
//! Each transport is one variant: the multiplexer over WebSocket, raw TCP or a gRPC call
//! ([`crate::mux`]), and a QUIC connection whose tunnel streams are QUIC streams ([`quic`]). The
//! callers name only these types, and [`Link`], what a handshake hands over to start one.
//! Unreliable datagrams (UDP flows) get their own calls beside `open`/`accept` when a transport
//! carries them (mux: a frame kind that never waits behind stream data; QUIC: DATAGRAM frames).

pub mod quic;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::{Error, ErrorCode};
use crate::mux::{self, FrameSink, FrameSource, MuxConfig, MuxStream, Role, SessionStats};
use quic::{QuicOwner, QuicSession, QuicStream};

/// A session to a peer over one transport. Cloning shares it.
#[derive(Clone, Debug)]
pub enum Session {
    /// The multiplexer (`libtunnel.v1`) over WebSocket, raw TCP or a gRPC call.
    Mux(mux::Session),
    /// A QUIC connection: each stream a QUIC stream.
    Quic(QuicSession),
}

/// One stream of a [`Session`].
#[derive(Debug)]
pub enum SessionStream {
    /// A stream of the multiplexer.
    Mux(MuxStream),
    /// A QUIC stream.
    Quic(QuicStream),
}

/// A connected transport once its handshake frames are exchanged (or on their way): the frames
/// (a mux session's, or a QUIC connection's control stream), and the QUIC connection whose
/// streams carry the tunnel streams, when it is one.
pub struct Link {
    /// Frames from the peer.
    pub source: FrameSource,
    /// Frames to the peer.
    pub sink: FrameSink,
    /// The QUIC connection (and, for a client, the endpoint it owns).
    pub quic: Option<QuicLink>,
}

/// The QUIC half of a [`Link`].
pub struct QuicLink {
    pub(crate) conn: quinn::Connection,
    pub(crate) endpoint: Option<quinn::Endpoint>,
}

impl Link {
    /// Frames only: a multiplexed session's transport.
    pub fn frames(source: FrameSource, sink: FrameSink) -> Link {
        Link { source, sink, quic: None }
    }
}

/// The owner of a relay-side session: dropping it ends the session.
pub enum SessionOwner {
    /// A multiplexed session's driver.
    Mux(mux::SessionTask),
    /// A QUIC session.
    Quic(QuicOwner),
}

impl SessionOwner {
    /// Wait until the session's last words went out (bounded).
    pub async fn finished(&mut self) {
        match self {
            SessionOwner::Mux(t) => t.finished().await,
            SessionOwner::Quic(q) => q.finished().await,
        }
    }
}

impl From<mux::Session> for Session {
    fn from(s: mux::Session) -> Session {
        Session::Mux(s)
    }
}

impl From<MuxStream> for SessionStream {
    fn from(s: MuxStream) -> SessionStream {
        SessionStream::Mux(s)
    }
}

impl Session {
    /// A multiplexed session over an authenticated frame transport (starts its driver task).
    pub fn mux(role: Role, source: FrameSource, sink: FrameSink, config: MuxConfig) -> Session {
        Session::Mux(mux::Session::new(role, source, sink, config))
    }

    /// A session over `link`: QUIC when it is a QUIC connection, else multiplexed over its frames.
    pub fn start(role: Role, link: Link, config: MuxConfig) -> Session {
        match link.quic {
            Some(q) => Session::Quic(QuicSession::new(role, q.conn, q.endpoint, link.source, link.sink, config.max_streams)),
            None => Session::mux(role, link.source, link.sink, config),
        }
    }

    /// [`Session::start`] whose lifetime is the returned owner's.
    pub fn owned(role: Role, link: Link, config: MuxConfig) -> (Session, SessionOwner) {
        match link.quic {
            Some(q) => {
                let (s, o) = QuicSession::owned(role, q.conn, link.source, link.sink, config.max_streams);
                (Session::Quic(s), SessionOwner::Quic(o))
            }
            None => {
                let (s, t) = mux::Session::owned(role, link.source, link.sink, config);
                (Session::Mux(s), SessionOwner::Mux(t))
            }
        }
    }

    /// Open a stream to the peer (no round trip: the open travels with the first bytes).
    pub fn open(&self) -> Result<SessionStream, Error> {
        match self {
            Session::Mux(s) => s.open().map(SessionStream::Mux),
            Session::Quic(s) => s.open().map(SessionStream::Quic),
        }
    }

    /// Wait for the next stream the peer opens; `None` once the session has ended.
    pub async fn accept(&self) -> Option<SessionStream> {
        match self {
            Session::Mux(s) => s.accept().await.map(SessionStream::Mux),
            Session::Quic(s) => s.accept().await.map(SessionStream::Quic),
        }
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        match self {
            Session::Mux(s) => s.is_closed(),
            Session::Quic(s) => s.is_closed(),
        }
    }

    /// Why the session ended, if it has.
    pub fn close_reason(&self) -> Option<Error> {
        match self {
            Session::Mux(s) => s.close_reason(),
            Session::Quic(s) => s.close_reason(),
        }
    }

    /// Resolves when the session has ended.
    pub async fn closed(&self) {
        match self {
            Session::Mux(s) => s.closed().await,
            Session::Quic(s) => s.closed().await,
        }
    }

    /// Resolves once the session's driver has ended (bounded): its close went out and the
    /// transport closed.
    pub async fn finished(&self) {
        match self {
            Session::Mux(s) => s.finished().await,
            Session::Quic(s) => s.finished().await,
        }
    }

    /// Streams open now.
    pub fn stream_count(&self) -> usize {
        match self {
            Session::Mux(s) => s.stream_count(),
            Session::Quic(s) => s.stream_count(),
        }
    }

    /// The session's figures now.
    pub fn stats(&self) -> SessionStats {
        match self {
            Session::Mux(s) => s.stats(),
            Session::Quic(s) => s.stats(),
        }
    }

    /// Wait until every stream has finished or `limit` passes, then close; whether it drained.
    pub async fn drain(&self, limit: Duration, why: &str) -> bool {
        match self {
            Session::Mux(s) => s.drain(limit, why).await,
            Session::Quic(s) => s.drain(limit, why).await,
        }
    }

    /// Tell the peer we accept no new streams; existing streams continue.
    pub fn go_away(&self) {
        match self {
            Session::Mux(s) => s.go_away(),
            Session::Quic(s) => s.go_away(),
        }
    }

    /// End the session now; every open stream fails with `code`.
    pub fn close(&self, code: ErrorCode, why: impl Into<String>) {
        match self {
            Session::Mux(s) => s.close(code, why),
            Session::Quic(s) => s.close(code, why),
        }
    }

    /// End the session and tell the peer why (its `close_reason` reports `code` and `why`).
    pub fn close_with_notice(&self, code: ErrorCode, why: impl Into<String>) {
        match self {
            Session::Mux(s) => s.close_with_notice(code, why),
            Session::Quic(s) => s.close_with_notice(code, why),
        }
    }
}

impl SessionStream {
    /// Abort the stream: the peer's reads and writes fail with `code`.
    pub fn reset(&mut self, code: ErrorCode) {
        match self {
            SessionStream::Mux(s) => s.reset(code),
            SessionStream::Quic(s) => s.reset(code),
        }
    }

    /// Wait until up to `want` bytes may be sent; the reservation is spent by
    /// [`SessionStream::send_frame`] or returned by [`SessionStream::release_reservation`].
    pub fn poll_reserve(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        match self {
            SessionStream::Mux(s) => s.poll_reserve(cx, want),
            SessionStream::Quic(s) => s.poll_reserve(cx, want),
        }
    }

    /// Send reserved bytes built in place: `frame` starts with [`crate::protocol::FRAME_HEADER`]
    /// bytes of headroom (the transport's header goes there, or it is skipped).
    pub fn send_frame(&mut self, frame: BytesMut) -> io::Result<()> {
        match self {
            SessionStream::Mux(s) => s.send_frame(frame),
            SessionStream::Quic(s) => s.send_frame(frame),
        }
    }

    /// Ready once the bytes sent so far have left this handle (QUIC: taken by quinn, whose
    /// buffer may have been full when [`SessionStream::send_frame`] gave them). A caller that
    /// sends and then waits for something else polls this too, so its bytes do not wait for it.
    pub fn poll_send_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            SessionStream::Mux(_) => Poll::Ready(Ok(())),
            SessionStream::Quic(s) => s.poll_send_ready(cx),
        }
    }

    /// Give back budget reserved but not used.
    pub fn release_reservation(&mut self) {
        match self {
            SessionStream::Mux(s) => s.release_reservation(),
            SessionStream::Quic(s) => s.release_reservation(),
        }
    }

    /// The next received chunk, without copying; `None` at end of stream.
    pub fn poll_recv_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        match self {
            SessionStream::Mux(s) => s.poll_recv_chunk(cx),
            SessionStream::Quic(s) => s.poll_recv_chunk(cx),
        }
    }

    /// Await the next received chunk.
    pub async fn recv_chunk(&mut self) -> io::Result<Option<Bytes>> {
        match self {
            SessionStream::Mux(s) => s.recv_chunk().await,
            SessionStream::Quic(s) => s.recv_chunk().await,
        }
    }

    /// Put bytes back in front of what the stream yields next.
    pub fn unread(&mut self, chunk: Bytes) {
        match self {
            SessionStream::Mux(s) => s.unread(chunk),
            SessionStream::Quic(s) => s.unread(chunk),
        }
    }

    /// Ready with the error once the stream was cut off (reset, or its session ended) before the
    /// peer finished sending.
    pub fn poll_cut_off(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        match self {
            SessionStream::Mux(s) => s.poll_cut_off(cx),
            SessionStream::Quic(s) => s.poll_cut_off(cx),
        }
    }

    /// Half-close: tell the peer we will write no more.
    pub fn finish(&mut self) {
        match self {
            SessionStream::Mux(s) => s.finish(),
            SessionStream::Quic(s) => s.finish(),
        }
    }
}

impl AsyncRead for SessionStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SessionStream::Mux(s) => Pin::new(s).poll_read(cx, buf),
            SessionStream::Quic(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for SessionStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SessionStream::Mux(s) => Pin::new(s).poll_write(cx, buf),
            SessionStream::Quic(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SessionStream::Mux(s) => Pin::new(s).poll_flush(cx),
            SessionStream::Quic(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SessionStream::Mux(s) => Pin::new(s).poll_shutdown(cx),
            SessionStream::Quic(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
