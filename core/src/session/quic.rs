//! A session over QUIC ([`crate::transport::quic`]): each tunnel stream is a QUIC stream of its
//! own (its header first, then bytes; FIN is half-close; a reset is `RESET_STREAM` plus
//! `STOP_SENDING` carrying our error code), and the control stream carries `GoAway` notices after
//! the handshake. Flow control, keepalive, loss recovery and congestion are QUIC's; the windows
//! and limits come from the same settings as a multiplexed session's
//! ([`crate::transport::quic::transport_config`]).
//!
//! Data flow. A writer's bytes go to quinn's send buffer (bounded by the connection's send window
//! and the stream's credit); what quinn cannot take yet waits in the stream's one pending chunk
//! until the next poll, which is where the caller waits. Received bytes are taken from quinn as
//! the chunks it holds, without a copy.
//!
//! The session's end: a close (ours or the peer's) is a QUIC `CONNECTION_CLOSE` carrying our
//! [`ErrorCode`] and the reason, so the peer's `close_reason` names it; silence beyond the
//! keepalive timeout is QUIC's idle timeout.

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, ErrorCode};
use crate::mux::frame::{Frame, FrameKind};
use crate::mux::{FrameSink, FrameSource, Role, SessionStats, MAX_DATA};
use crate::protocol::FRAME_HEADER;

/// How long a closing session waits for its `CONNECTION_CLOSE` to leave (a client's own endpoint).
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// Longest reason a `CONNECTION_CLOSE` carries (it must fit one packet).
const MAX_REASON: usize = 512;

/// A session over one QUIC connection. Cloning shares it.
#[derive(Clone)]
pub struct QuicSession {
    shared: Arc<Shared>,
}

struct Shared {
    conn: quinn::Connection,
    /// The client's own endpoint (its UDP socket), closed with the session.
    endpoint: Option<quinn::Endpoint>,
    role: Role,
    max_streams: usize,
    /// How many streams the peer may have open at once now (raised as they are used, up to
    /// `max_streams`: quinn keeps a record per stream it allows, so it is not granted all at once).
    grant: std::sync::atomic::AtomicUsize,
    /// Open streams (either direction).
    streams: watch::Sender<usize>,
    /// The peer sent `GoAway`: open no new streams.
    go_away: AtomicBool,
    /// Why we closed, when we did.
    local_close: Mutex<Option<Error>>,
    /// A notice the peer sent before closing (the code and reason of its `GoAway`).
    notice: Mutex<Option<(ErrorCode, String)>>,
    /// Control frames to send (`GoAway`).
    control: mpsc::UnboundedSender<Bytes>,
    closed: CancellationToken,
    finished: CancellationToken,
}

impl std::fmt::Debug for QuicSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicSession").field("remote", &self.shared.conn.remote_address()).field("closed", &self.is_closed()).finish()
    }
}

/// Whoever decides how long a relay's session lives holds this: dropping it ends the session.
pub struct QuicOwner {
    session: QuicSession,
}

impl QuicOwner {
    /// Wait until the session's close went out (bounded).
    pub async fn finished(&mut self) {
        self.session.finished().await;
    }
}

impl Drop for QuicOwner {
    fn drop(&mut self) {
        self.session.close(ErrorCode::RelayUnavailable, "the session ended with the task that owned it");
    }
}

impl QuicSession {
    /// Start a session on an authenticated connection whose control stream is `source`/`sink`
    /// (the handshake's frames are already taken). `endpoint` is the client's own, if it owns one.
    pub(crate) fn new(
        role: Role,
        conn: quinn::Connection,
        endpoint: Option<quinn::Endpoint>,
        source: FrameSource,
        sink: FrameSink,
        max_streams: usize,
    ) -> QuicSession {
        let (control, outbox) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            conn,
            endpoint,
            role,
            max_streams,
            grant: std::sync::atomic::AtomicUsize::new(crate::transport::quic::INITIAL_STREAMS),
            streams: watch::channel(0).0,
            go_away: AtomicBool::new(false),
            local_close: Mutex::new(None),
            notice: Mutex::new(None),
            control,
            closed: CancellationToken::new(),
            finished: CancellationToken::new(),
        });
        tokio::spawn(drive_control(shared.clone(), source, sink, outbox));
        QuicSession { shared }
    }

    /// [`QuicSession::new`] whose lifetime is the returned owner's.
    pub(crate) fn owned(role: Role, conn: quinn::Connection, source: FrameSource, sink: FrameSink, max_streams: usize) -> (QuicSession, QuicOwner) {
        let s = QuicSession::new(role, conn, None, source, sink, max_streams);
        (s.clone(), QuicOwner { session: s })
    }

    /// Open a stream to the peer: no round trip (the peer learns of it with its first bytes).
    pub fn open(&self) -> Result<QuicStream, Error> {
        if let Some(e) = self.close_reason() {
            return Err(e);
        }
        if self.shared.go_away.load(Ordering::Acquire) {
            return Err(Error::new(
                ErrorCode::RelayUnavailable,
                "the relay is shutting down and takes no new streams; retry to reach another relay session",
            ));
        }
        use futures_util::FutureExt;
        if self.stream_count() >= self.shared.max_streams {
            return Err(Error::new(
                ErrorCode::General,
                format!("this session already has {} open streams (the limit); close some first", self.shared.max_streams),
            ));
        }
        match self.shared.conn.open_bi().now_or_never() {
            Some(Ok((send, recv))) => Ok(QuicStream::new(self.shared.clone(), Some((send, recv)))),
            Some(Err(e)) => Err(self.connection_error(e)),
            // The peer's stream limit is reached for now: the stream opens once it grants more
            // (its first bytes wait until then).
            None => Ok(QuicStream::new(self.shared.clone(), None)),
        }
    }

    /// Wait for the next stream the peer opens; `None` once the session has ended.
    pub async fn accept(&self) -> Option<QuicStream> {
        match self.shared.conn.accept_bi().await {
            Ok((send, recv)) => Some(QuicStream::new(self.shared.clone(), Some((send, recv)))),
            Err(_) => None,
        }
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.is_cancelled() || self.shared.conn.close_reason().is_some()
    }

    /// Why the session ended, if it has.
    pub fn close_reason(&self) -> Option<Error> {
        let e = self.shared.conn.close_reason()?;
        Some(self.connection_error(e))
    }

    fn connection_error(&self, e: quinn::ConnectionError) -> Error {
        connection_error(&self.shared, e)
    }

    /// Resolves when the session has ended.
    pub async fn closed(&self) {
        tokio::select! {
            _ = self.shared.conn.closed() => {}
            _ = self.shared.closed.cancelled() => {}
        }
    }

    /// Resolves once the session's close has gone out (bounded).
    pub async fn finished(&self) {
        self.closed().await;
        let _ = tokio::time::timeout(CLOSE_FLUSH * 2, self.shared.finished.cancelled()).await;
    }

    /// Streams open now.
    pub fn stream_count(&self) -> usize {
        *self.shared.streams.borrow()
    }

    /// The session's figures now. Buffers are quinn's: only the stream count and the RTT are ours.
    pub fn stats(&self) -> SessionStats {
        SessionStats { streams: self.stream_count(), rtt: Some(self.shared.conn.rtt()), ..SessionStats::default() }
    }

    /// Wait until every stream has finished or `limit` passes, then close; whether it drained.
    pub async fn drain(&self, limit: Duration, why: &str) -> bool {
        let mut count = self.shared.streams.subscribe();
        let drained = tokio::time::timeout(limit, async {
            tokio::select! {
                _ = count.wait_for(|n| *n == 0) => {}
                _ = self.closed() => {}
            }
        })
        .await
        .is_ok();
        self.close(ErrorCode::Closed, why);
        drained
    }

    /// Tell the peer we accept no new streams; existing streams continue.
    pub fn go_away(&self) {
        let _ = self.shared.control.send(Frame::encode(FrameKind::GoAway, 0, &[]));
    }

    /// End the session now; every open stream fails with `code`. The peer learns `code` and `why`.
    pub fn close(&self, code: ErrorCode, why: impl Into<String>) {
        close_now(&self.shared, code, &why.into());
    }

    /// End the session and tell the peer why: over QUIC every close says so.
    pub fn close_with_notice(&self, code: ErrorCode, why: impl Into<String>) {
        self.close(code, why);
    }
}

/// The control stream after the handshake: sends what `go_away` queues, reads the peer's
/// `GoAway` (and the notice it may carry); ends with the connection, then lets its close leave.
async fn drive_control(shared: Arc<Shared>, mut source: FrameSource, mut sink: FrameSink, mut outbox: mpsc::UnboundedReceiver<Bytes>) {
    let mut reading = true;
    loop {
        tokio::select! {
            _ = shared.conn.closed() => break,
            _ = shared.closed.cancelled() => break,
            frame = source.next(), if reading => match frame {
                Some(Ok(bytes)) => match Frame::decode(bytes) {
                    Ok(f) if f.kind == FrameKind::GoAway => {
                        shared.go_away.store(true, Ordering::Release);
                        if let Some(notice) = crate::mux::frame::decode_notice(&f.payload) {
                            *shared.notice.lock().unwrap_or_else(|p| p.into_inner()) = Some(notice);
                        }
                    }
                    // Pings and the rest have no use here (QUIC keeps the session alive).
                    Ok(_) => {}
                    Err(e) => {
                        let why = format!("the peer sent a malformed control frame: {}", e.message());
                        close_now(&shared, ErrorCode::Protocol, &why);
                        break;
                    }
                },
                // The peer finished or reset its control stream: it is closing the connection.
                _ => reading = false,
            },
            Some(out) = outbox.recv() => {
                if sink.send(out).await.is_err() {
                    reading = false;
                }
            }
        }
    }
    shared.closed.cancel();
    if let Some(endpoint) = &shared.endpoint {
        // The client's own socket: wait for the CONNECTION_CLOSE to leave (bounded).
        let _ = tokio::time::timeout(CLOSE_FLUSH, endpoint.wait_idle()).await;
    }
    shared.finished.cancel();
}

/// Close the connection with `code` and `why` (the reason the peer reads, cut to [`MAX_REASON`]
/// bytes), remembered as our reason unless the session had already ended.
fn close_now(shared: &Shared, code: ErrorCode, why: &str) {
    {
        let mut local = shared.local_close.lock().unwrap_or_else(|p| p.into_inner());
        if local.is_none() && shared.conn.close_reason().is_none() {
            *local = Some(Error::new(code, why.to_string()));
        }
    }
    let mut end = why.len().min(MAX_REASON);
    while !why.is_char_boundary(end) {
        end -= 1;
    }
    shared.conn.close(quinn::VarInt::from_u32(code.number()), &why.as_bytes()[..end]);
    shared.closed.cancel();
}

/// What a closed connection means to the session's users.
fn connection_error(shared: &Shared, e: quinn::ConnectionError) -> Error {
    use quinn::ConnectionError as C;
    let peer = if shared.role == Role::Client { "the relay" } else { "the peer" };
    match e {
        C::LocallyClosed => shared
            .local_close
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|e| Error::new(e.code(), e.message().to_string()))
            .unwrap_or_else(|| Error::new(ErrorCode::Closed, "the session was closed")),
        C::ApplicationClosed(c) => {
            let code = u32::try_from(c.error_code.into_inner()).ok().and_then(ErrorCode::from_number).unwrap_or(ErrorCode::RelayUnavailable);
            let why = String::from_utf8_lossy(&c.reason).into_owned();
            let notice = shared.notice.lock().unwrap_or_else(|p| p.into_inner()).clone();
            match notice {
                Some((c, w)) => Error::new(c, w),
                None if why.is_empty() => Error::new(code, format!("{peer} closed the session")),
                None => Error::new(code, why),
            }
        }
        C::TimedOut => Error::new(
            ErrorCode::RelayUnavailable,
            format!("{peer} went silent: no packet from it within the keepalive timeout, so the session was dropped"),
        ),
        C::Reset => Error::new(ErrorCode::RelayUnavailable, format!("{peer} no longer knows this session (it restarted): a stateless reset")),
        C::ConnectionClosed(c) => Error::new(ErrorCode::Protocol, format!("{peer} closed the QUIC connection with a transport error: {c}")),
        C::TransportError(t) => Error::new(ErrorCode::Protocol, format!("the QUIC connection broke: {t}")),
        C::VersionMismatch => Error::new(ErrorCode::Protocol, format!("{peer} speaks no QUIC version we do")),
        C::CidsExhausted => Error::new(ErrorCode::General, "the QUIC connection ran out of connection ids"),
    }
}

/// Keeps the session's open-stream count while a stream lives.
struct Counted(Arc<Shared>);

impl Counted {
    fn new(shared: Arc<Shared>) -> Counted {
        let mut open = 0;
        shared.streams.send_modify(|n| {
            *n += 1;
            open = *n;
        });
        // Half the grant in use: double it (up to the session's limit), so a burst of streams
        // from the peer waits at most a round trip for each doubling.
        let grant = shared.grant.load(Ordering::Relaxed);
        if open * 2 >= grant && grant < shared.max_streams {
            let more = (grant * 2).min(shared.max_streams);
            if shared.grant.compare_exchange(grant, more, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
                shared.conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u64(more as u64).unwrap_or(quinn::VarInt::MAX));
            }
        }
        Counted(shared)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.streams.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A stream being opened (the peer's stream limit was reached when it was asked for).
type Opening = Pin<Box<dyn Future<Output = Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>> + Send>>;

/// One stream of a [`QuicSession`]: a QUIC bidirectional stream.
pub struct QuicStream {
    /// Set while the stream waits for the peer to allow another one.
    opening: Option<Opening>,
    send: Option<quinn::SendStream>,
    recv: Option<quinn::RecvStream>,
    /// Bytes accepted by `send_frame`/`poll_write` that quinn has not taken yet.
    pending: Bytes,
    /// `finish` was asked while bytes were pending: finish once they are taken.
    finish_asked: bool,
    finished: bool,
    /// Bytes put back in front of what the stream yields next.
    unread: Option<Bytes>,
    /// The peer finished sending and we read it all.
    recv_done: bool,
    /// The receive side can no longer be cut off (finished, or stopped by us).
    recv_settled: bool,
    /// The session's end, watched by `poll_cut_off` while a read-ahead chunk waits.
    session_end: Option<Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
    session: Counted,
}

impl std::fmt::Debug for QuicStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicStream").field("id", &self.send.as_ref().map(|s| s.id())).finish()
    }
}

fn code_of(v: quinn::VarInt) -> ErrorCode {
    u32::try_from(v.into_inner()).ok().and_then(ErrorCode::from_number).unwrap_or(ErrorCode::Closed)
}

impl QuicStream {
    fn new(shared: Arc<Shared>, opened: Option<(quinn::SendStream, quinn::RecvStream)>) -> QuicStream {
        let opening: Option<Opening> = match opened {
            Some(_) => None,
            None => {
                let conn = shared.conn.clone();
                Some(Box::pin(async move { conn.open_bi().await }))
            }
        };
        let (send, recv) = opened.map_or((None, None), |(s, r)| (Some(s), Some(r)));
        QuicStream {
            opening,
            send,
            recv,
            pending: Bytes::new(),
            finish_asked: false,
            finished: false,
            unread: None,
            recv_done: false,
            recv_settled: false,
            session_end: None,
            session: Counted::new(shared),
        }
    }

    fn lost(&self, e: quinn::ConnectionError) -> io::Error {
        connection_error(&self.session.0, e).into_io()
    }

    fn write_error(&self, e: quinn::WriteError) -> io::Error {
        match e {
            quinn::WriteError::Stopped(code) => Error::new(code_of(code), "the peer stopped reading the stream").into_io(),
            quinn::WriteError::ConnectionLost(c) => self.lost(c),
            quinn::WriteError::ClosedStream => Error::new(ErrorCode::Closed, "the stream was already closed").into_io(),
            quinn::WriteError::ZeroRttRejected => Error::new(ErrorCode::RelayUnavailable, "the relay refused early data").into_io(),
        }
    }

    fn read_error(&self, e: quinn::ReadError) -> io::Error {
        match e {
            quinn::ReadError::Reset(code) => Error::new(code_of(code), "the peer reset the stream").into_io(),
            quinn::ReadError::ConnectionLost(c) => self.lost(c),
            quinn::ReadError::ClosedStream => Error::new(ErrorCode::Closed, "the stream was already closed").into_io(),
            quinn::ReadError::IllegalOrderedRead => Error::new(ErrorCode::General, "an unordered read was mixed with ordered ones").into_io(),
            quinn::ReadError::ZeroRttRejected => Error::new(ErrorCode::RelayUnavailable, "the relay refused early data").into_io(),
        }
    }

    /// Ready once the stream exists (at once, unless the peer's stream limit was reached).
    fn poll_open(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(opening) = self.opening.as_mut() else { return Poll::Ready(Ok(())) };
        match opening.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok((send, recv))) => {
                self.opening = None;
                self.send = Some(send);
                self.recv = Some(recv);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                self.opening = None;
                self.recv_settled = true;
                Poll::Ready(Err(self.lost(e)))
            }
        }
    }

    /// The stream's halves once open; an error once it cannot be (its session ended first).
    fn halves(&mut self) -> io::Result<(&mut quinn::SendStream, &mut quinn::RecvStream)> {
        match (self.send.as_mut(), self.recv.as_mut()) {
            (Some(s), Some(r)) => Ok((s, r)),
            _ => Err(Error::new(ErrorCode::Closed, "the stream was never opened: its session ended first").into_io()),
        }
    }

    /// Hand the pending bytes to quinn; ready once none remain (and a finish asked for is done).
    fn poll_flush_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.poll_open(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        while !self.pending.is_empty() {
            let mut chunks = [std::mem::take(&mut self.pending)];
            let send = match self.halves() {
                Ok((s, _)) => s,
                Err(e) => return Poll::Ready(Err(e)),
            };
            let polled = pin!(send.write_chunks(&mut chunks)).poll(cx);
            self.pending = std::mem::take(&mut chunks[0]);
            match polled {
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    self.pending = Bytes::new();
                    return Poll::Ready(Err(self.write_error(e)));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.finish_asked && !self.finished {
            self.finished = true;
            if let Some(send) = self.send.as_mut() {
                let _ = send.finish();
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Try to hand pending bytes over without a task to wake (the next poll registers one).
    fn flush_now(&mut self) -> io::Result<()> {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        match self.poll_flush_pending(&mut cx) {
            Poll::Ready(r) => r,
            Poll::Pending => Ok(()),
        }
    }

    /// Ready when the bytes sent so far are in quinn's hands (see [`crate::session::SessionStream::poll_send_ready`]).
    pub fn poll_send_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush_pending(cx)
    }

    /// Abort the stream both ways with `code`.
    pub fn reset(&mut self, code: ErrorCode) {
        self.pending = Bytes::new();
        let v = quinn::VarInt::from_u32(code.number());
        // A stream still waiting to be opened is given up (the peer never learns of it).
        self.opening = None;
        if let Some(send) = self.send.as_mut() {
            let _ = send.reset(v);
        }
        if let Some(recv) = self.recv.as_mut() {
            let _ = recv.stop(v);
        }
        self.recv_settled = true;
    }

    /// Wait until up to `want` bytes may be sent.
    pub fn poll_reserve(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        match self.poll_flush_pending(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(want.min(MAX_DATA))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Send a frame built in place (its first [`FRAME_HEADER`] bytes are headroom, skipped).
    pub fn send_frame(&mut self, frame: BytesMut) -> io::Result<()> {
        let data = frame.freeze().slice(FRAME_HEADER..);
        if self.pending.is_empty() {
            self.pending = data;
        } else {
            let mut joined = BytesMut::with_capacity(self.pending.len() + data.len());
            joined.extend_from_slice(&self.pending);
            joined.extend_from_slice(&data);
            self.pending = joined.freeze();
        }
        self.flush_now()
    }

    /// The next received chunk, without copying; `None` at end of stream.
    pub fn poll_recv_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        // A caller that waits here registers for the send side too.
        if let Poll::Ready(Err(e)) = self.poll_flush_pending(cx) {
            return Poll::Ready(Err(e));
        }
        if let Some(u) = self.unread.take() {
            return Poll::Ready(Ok(Some(u)));
        }
        if self.recv_done {
            return Poll::Ready(Ok(None));
        }
        let recv = match self.halves() {
            Ok((_, r)) => r,
            Err(e) => return Poll::Ready(Err(e)),
        };
        let polled = pin!(recv.read_chunk(MAX_DATA, true)).poll(cx);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(chunk))) => Poll::Ready(Ok(Some(chunk.bytes))),
            Poll::Ready(Ok(None)) => {
                self.recv_done = true;
                self.recv_settled = true;
                Poll::Ready(Ok(None))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.read_error(e))),
        }
    }

    /// Await the next received chunk.
    pub async fn recv_chunk(&mut self) -> io::Result<Option<Bytes>> {
        std::future::poll_fn(|cx| self.poll_recv_chunk(cx)).await
    }

    /// Nothing is reserved ahead on QUIC (quinn's send buffer is the bound).
    pub fn release_reservation(&mut self) {}

    /// Put bytes back in front of what the stream yields next.
    pub fn unread(&mut self, chunk: Bytes) {
        self.unread = Some(match self.unread.take() {
            None => chunk,
            Some(rest) => {
                let mut joined = BytesMut::with_capacity(chunk.len() + rest.len());
                joined.extend_from_slice(&chunk);
                joined.extend_from_slice(&rest);
                joined.freeze()
            }
        });
    }

    /// Ready with the error once the stream was cut off (reset, or the session ended) before the
    /// peer finished sending. It reads ahead (one chunk, kept for the next read) to learn of a
    /// reset: quinn's own reset check would leave a reader registered on a stream read to its end.
    /// While that chunk waits, the session's end is watched instead.
    pub fn poll_cut_off(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if let Poll::Ready(Err(e)) = self.poll_flush_pending(cx) {
            return Poll::Ready(e);
        }
        if self.recv_settled || self.recv_done {
            return Poll::Pending;
        }
        if self.unread.is_some() {
            let ended = self.session_end.get_or_insert_with(|| Box::pin(self.session.0.closed.clone().cancelled_owned()));
            if ended.as_mut().poll(cx).is_ready() {
                if let Some(e) = self.session.0.conn.close_reason() {
                    return Poll::Ready(self.lost(e));
                }
            }
            return Poll::Pending;
        }
        let Ok((_, recv)) = self.halves() else { return Poll::Pending };
        let polled = pin!(recv.read_chunk(MAX_DATA, true)).poll(cx);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(chunk))) => {
                self.unread = Some(chunk.bytes);
                Poll::Pending
            }
            Poll::Ready(Ok(None)) => {
                self.recv_done = true;
                self.recv_settled = true;
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(self.read_error(e)),
        }
    }

    /// Half-close: tell the peer we will write no more (once the pending bytes are sent).
    pub fn finish(&mut self) {
        self.finish_asked = true;
        let _ = self.flush_now();
    }
}

impl AsyncRead for QuicStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(mut u) = this.unread.take() {
            let n = u.len().min(buf.remaining());
            buf.put_slice(&u.split_to(n));
            if !u.is_empty() {
                this.unread = Some(u);
            }
            return Poll::Ready(Ok(()));
        }
        if this.recv_done {
            return Poll::Ready(Ok(()));
        }
        match this.poll_open(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        let recv = match this.halves() {
            Ok((_, r)) => r,
            Err(e) => return Poll::Ready(Err(e)),
        };
        let before = buf.filled().len();
        match recv.poll_read_buf(cx, buf) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(())) => {
                if buf.filled().len() == before && buf.remaining() > 0 {
                    this.recv_done = true;
                    this.recv_settled = true;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.read_error(e))),
        }
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.poll_flush_pending(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        let send = match this.halves() {
            Ok((s, _)) => s,
            Err(e) => return Poll::Ready(Err(e)),
        };
        let polled = pin!(send.write(buf)).poll(cx);
        match polled {
            Poll::Ready(Ok(n)) => Poll::Ready(Ok(n)),
            Poll::Ready(Err(e)) => Poll::Ready(Err(this.write_error(e))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_flush_pending(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.finish_asked = true;
        this.poll_flush_pending(cx)
    }
}
