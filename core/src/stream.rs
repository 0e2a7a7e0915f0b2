//! [`TunnelStream`], what a dial returns, and [`bridge`], which joins a tunnel stream to a local
//! socket. The bridge's multiplexed path copies nothing in user space beyond the socket read: bytes
//! are read from the socket straight into a frame buffer, and received frames are written from the
//! buffer the transport delivered.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::ErrorCode;
use crate::mux::MAX_DATA;
use crate::protocol::FRAME_HEADER;
use crate::session::SessionStream;
use crate::socks::Target;
use crate::transport::{BoxIo, WsByteStream};

/// Which protocol a stream runs over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// libtunnel's own: many streams share one authenticated session, with half-close.
    Multiplexed,
    /// Emissary's: one WebSocket (or TCP connection) per stream; no half-close.
    Classic,
}

pub(crate) enum Inner {
    Mux(SessionStream),
    Ws(Box<WsByteStream>),
    Raw(BoxIo),
    /// End-to-end encrypted (TLS inside a mux stream, `crate::e2e`).
    E2e(Box<crate::e2e::E2eStream>),
}

/// A connection through the relay: `AsyncRead + AsyncWrite`. `shutdown()` half-closes in
/// multiplexed mode (the peer reads EOF and can keep writing); in classic mode it closes the
/// tunnel, as Emissary does.
pub struct TunnelStream {
    pub(crate) inner: Inner,
    target: Target,
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream").field("target", &self.target).field("mode", &self.mode()).finish()
    }
}

impl TunnelStream {
    pub(crate) fn new(inner: Inner, target: Target) -> TunnelStream {
        TunnelStream { inner, target }
    }

    /// Where this stream leads.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The protocol it runs over.
    pub fn mode(&self) -> Mode {
        match self.inner {
            Inner::Mux(_) | Inner::E2e(_) => Mode::Multiplexed,
            _ => Mode::Classic,
        }
    }

    /// Whether the bytes are end-to-end encrypted between dialer and listener (`crate::e2e`).
    pub fn is_e2e(&self) -> bool {
        matches!(self.inner, Inner::E2e(_))
    }

    /// Join this stream to a local socket until both directions finish; returns bytes
    /// (local → tunnel, tunnel → local).
    pub async fn bridge<S: LocalSocket>(self, local: S) -> io::Result<(u64, u64)> {
        match self.inner {
            Inner::Mux(m) => bridge(m, local).await,
            Inner::Ws(ws) => classic_bridge(*ws, local).await,
            Inner::Raw(mut raw) => {
                let mut local = local;
                let r = tokio::io::copy_bidirectional_with_sizes(&mut local, &mut raw, 32 * 1024, 32 * 1024).await;
                if r.is_err() {
                    local.abort();
                }
                r
            }
            // TLS records are at most 16 KiB of plaintext; 64 KiB buffers let one read fill four.
            Inner::E2e(mut tls) => {
                let mut local = local;
                let r = tokio::io::copy_bidirectional_with_sizes(&mut local, &mut *tls, 64 * 1024, 64 * 1024).await;
                if r.is_err() {
                    local.abort();
                }
                r
            }
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.get_mut().inner {
            Inner::Mux($s) => {
                let $s = Pin::new($s);
                $e
            }
            Inner::Ws($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
            Inner::Raw($s) => {
                let $s = Pin::new($s);
                $e
            }
            Inner::E2e($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl AsyncRead for TunnelStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

/// Join a classic WebSocket tunnel to a local socket. Classic mode has no half-close on the wire,
/// so when the local side finishes sending, the tunnel is not closed: its reply is still read until
/// the target closes (as Emissary's own CLI does), then the local socket is shut down and the
/// WebSocket closed.
async fn classic_bridge<S: LocalSocket>(ws: WsByteStream, local: S) -> io::Result<(u64, u64)> {
    use tokio::io::{AsyncWriteExt, BufReader};
    let (lr, mut lw) = tokio::io::split(local);
    let (tr, mut tw) = tokio::io::split(ws);
    let (mut lr, mut tr) = (BufReader::with_capacity(32 * 1024, lr), BufReader::with_capacity(32 * 1024, tr));
    // Counted as it goes: when the far side ends first, what went up so far is still logged.
    let sent = std::sync::atomic::AtomicU64::new(0);
    let result = {
        let up = async {
            use tokio::io::AsyncBufReadExt;
            loop {
                let chunk = lr.fill_buf().await?;
                if chunk.is_empty() {
                    break;
                }
                let n = chunk.len();
                tw.write_all(chunk).await?;
                lr.consume(n);
                sent.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
            tw.flush().await?;
            Ok::<_, io::Error>(sent.load(std::sync::atomic::Ordering::Relaxed))
        };
        let down = async {
            let n = tokio::io::copy_buf(&mut tr, &mut lw).await?;
            let _ = lw.shutdown().await; // a local peer that already left is fine
            Ok::<_, io::Error>(n)
        };
        tokio::pin!(up, down);
        tokio::select! {
            // The target closed the tunnel: done, whatever the local side still sends.
            d = &mut down => d.map(|d| (sent.load(std::sync::atomic::Ordering::Relaxed), d)),
            u = &mut up => match u {
                Ok(u) => down.await.map(|d| (u, d)),
                Err(e) => Err(e),
            },
        }
    };
    let mut ws = tr.into_inner().unsplit(tw);
    let local = lr.into_inner().unsplit(lw);
    match result {
        Ok(r) => {
            // Answer (or send) the closing handshake; bounded, the relay may be gone.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), ws.shutdown()).await;
            Ok(r)
        }
        Err(e) => {
            local.abort();
            Err(e)
        }
    }
}

/// A local socket the bridge can read by readiness (TCP and Unix sockets).
pub trait LocalSocket: AsyncRead + AsyncWrite + Unpin + Send {
    /// Wait for readability.
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Read without blocking into `buf`'s spare room.
    fn try_read_into(&self, buf: &mut BytesMut, limit: usize) -> io::Result<usize>;
    /// Make the coming close a reset where the socket type has one, so the local peer reads an
    /// error (ECONNRESET) instead of a clean end of stream when the tunnel was cut off.
    fn abort(&self) {}
}

impl LocalSocket for tokio::net::TcpStream {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }
    fn try_read_into(&self, buf: &mut BytesMut, limit: usize) -> io::Result<usize> {
        self.try_read_buf(&mut buf.limit(limit))
    }
    fn abort(&self) {
        let _ = self.set_zero_linger();
    }
}

#[cfg(unix)]
impl LocalSocket for tokio::net::UnixStream {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }
    fn try_read_into(&self, buf: &mut BytesMut, limit: usize) -> io::Result<usize> {
        self.try_read_buf(&mut buf.limit(limit))
    }
}

/// How many frames one direction moves per poll before yielding to the other.
const TURN: usize = 16;
/// The bridge reads local bytes into one reused buffer of this size, cutting each frame from it.
const READ_ARENA: usize = 2 * (FRAME_HEADER + MAX_DATA);

/// Frames cut from one reused allocation: the transport copies a frame into its own buffer when it
/// takes it, so once the frames of a round are gone the next `reserve` reuses the same memory
/// instead of allocating 64 KiB per socket read.
struct FrameArena(BytesMut);

impl FrameArena {
    fn new() -> FrameArena {
        FrameArena(BytesMut::new())
    }

    /// An empty frame with header room and space for `n` payload bytes.
    fn frame(&mut self, n: usize) -> BytesMut {
        let need = FRAME_HEADER + n;
        if self.0.capacity() < need {
            // Reclaims the whole allocation when every frame cut from it is gone.
            self.0.reserve(READ_ARENA.max(need));
        }
        let rest = self.0.split_off(need);
        let mut frame = std::mem::replace(&mut self.0, rest);
        frame.put_bytes(0, FRAME_HEADER);
        frame
    }

    /// Let go of the buffer (the socket went quiet): an idle connection holds no read memory.
    fn release(&mut self) {
        self.0 = BytesMut::new();
    }
}

/// What one step of [`poll_local_to_tunnel`] did.
enum Step {
    /// This many local bytes went out as one frame.
    Moved(usize),
    /// The local socket reached its end of stream.
    Eof,
    /// The socket looked readable but had nothing (its readiness is now cleared).
    Spurious,
}

/// Which side a [`poll_local_to_tunnel`] step failed on.
enum StepError {
    Local(io::Error),
    Tunnel(io::Error),
}

/// One step of local → tunnel, shared by the bridge and the early-data connect: wait until the
/// socket is readable and the stream has credit, then read what the socket holds straight into a
/// frame cut from `arena` and send it. While it waits it holds no read memory.
fn poll_local_to_tunnel<S: LocalSocket>(
    cx: &mut Context<'_>,
    local: &S,
    mux: &mut SessionStream,
    arena: &mut FrameArena,
) -> Poll<Result<Step, StepError>> {
    // What was sent last must be on its way before waiting for the socket (QUIC keeps what its
    // buffer could not take at once until a poll gives it a task to wake).
    match mux.poll_send_ready(cx) {
        Poll::Pending => {
            arena.release();
            return Poll::Pending;
        }
        Poll::Ready(Err(e)) => return Poll::Ready(Err(StepError::Tunnel(e))),
        Poll::Ready(Ok(())) => {}
    }
    match local.poll_readable(cx) {
        Poll::Pending => {
            arena.release();
            return Poll::Pending;
        }
        Poll::Ready(Err(e)) => return Poll::Ready(Err(StepError::Local(e))),
        Poll::Ready(Ok(())) => {}
    }
    let n = match mux.poll_reserve(cx, MAX_DATA) {
        Poll::Pending => {
            // Waiting for credit (a slow or stalled peer): hold no read memory meanwhile.
            arena.release();
            return Poll::Pending;
        }
        Poll::Ready(Err(e)) => return Poll::Ready(Err(StepError::Tunnel(e))),
        Poll::Ready(Ok(n)) => n,
    };
    let mut frame = arena.frame(n);
    Poll::Ready(match local.try_read_into(&mut frame, n) {
        Ok(0) => {
            mux.release_reservation();
            Ok(Step::Eof)
        }
        Ok(m) => mux.send_frame(frame).map(|()| Step::Moved(m)).map_err(StepError::Tunnel),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            mux.release_reservation();
            Ok(Step::Spurious)
        }
        Err(e) => {
            mux.release_reservation();
            Err(StepError::Local(e))
        }
    })
}

/// Join a mux stream and a local socket, honouring half-close both ways. On error (or when the
/// stream dies with its session, whatever the bridge was waiting for) the stream is reset and the
/// local socket aborted, so neither end takes a cut-off transfer for a finished one.
pub async fn bridge<S: LocalSocket>(mut mux: SessionStream, mut local: S) -> io::Result<(u64, u64)> {
    let (mut up, mut down) = (0u64, 0u64);
    let (mut up_done, mut down_done, mut shutting) = (false, false, false);
    let mut out = Bytes::new();
    let mut arena = FrameArena::new();
    let result = poll_fn(|cx| {
        if let Poll::Ready(e) = mux.poll_cut_off(cx) {
            return Poll::Ready(Err(e));
        }
        // local → tunnel
        let mut busy = false;
        let mut turns = 0;
        while !up_done && turns < TURN {
            turns += 1;
            match poll_local_to_tunnel(cx, &local, &mut mux, &mut arena) {
                Poll::Pending => break,
                Poll::Ready(Err(StepError::Local(e) | StepError::Tunnel(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(Step::Moved(m))) => up += m as u64,
                Poll::Ready(Ok(Step::Eof)) => {
                    mux.finish();
                    up_done = true;
                }
                Poll::Ready(Ok(Step::Spurious)) => {}
            }
        }
        busy |= turns >= TURN;
        // tunnel → local
        let mut turns = 0;
        while !down_done && turns < TURN {
            turns += 1;
            if out.is_empty() && !shutting {
                match mux.poll_recv_chunk(cx) {
                    Poll::Pending => break,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(None)) => shutting = true,
                    Poll::Ready(Ok(Some(c))) => out = c,
                }
            }
            if shutting {
                match Pin::new(&mut local).poll_shutdown(cx) {
                    Poll::Pending => break,
                    Poll::Ready(_) => down_done = true, // a peer that already closed is fine
                }
                continue;
            }
            match Pin::new(&mut local).poll_write(cx, &out) {
                Poll::Pending => break,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(n)) => {
                    down += n as u64;
                    out.advance(n);
                }
            }
        }
        if up_done && down_done {
            return Poll::Ready(Ok(()));
        }
        if busy || turns >= TURN {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    })
    .await;
    if result.is_err() {
        mux.reset(ErrorCode::Closed);
        local.abort();
    }
    result.map(|()| (up, down))
}

/// Open a multiplexed stream to `target` without waiting a round trip before the local client's
/// first bytes: the pipelined greeting and CONNECT go out, and while the relay's answer is on its
/// way whatever `local` sends is already sent behind them (the relay keeps it in the stream until
/// the target is connected). Saves one round trip to the relay per connection for protocols whose
/// client speaks first (HTTP, PostgreSQL, TLS). `early` counts the local bytes already taken (and
/// sent); on a refusal they are dropped with the stream.
///
/// With a `gate` (the stream rides with a new session's early hello) the local bytes wait until
/// the relay took that hello: a relay that did not would drop them, and they cannot be read again.
pub(crate) async fn connect_early<S: LocalSocket>(
    mux: &mut SessionStream,
    local: &S,
    target: &Target,
    early: &mut u64,
    gate: Option<crate::client::handshake::EarlyGate>,
) -> crate::error::Result<()> {
    use crate::error::Error;
    let request = crate::socks::pipelined_connect_request(target)?;
    let lost = |e: io::Error| Error::from_io(e, "sending the CONNECT request");
    let mut frame = BytesMut::with_capacity(FRAME_HEADER + request.len());
    frame.put_bytes(0, FRAME_HEADER);
    frame.extend_from_slice(&request);
    let n = poll_fn(|cx| mux.poll_reserve(cx, request.len())).await.map_err(lost)?;
    debug_assert!(n >= request.len(), "a fresh stream has a whole window of credit");
    mux.send_frame(frame).map_err(lost)?;
    if let Some(mut gate) = gate {
        if !gate.taken().await {
            return Err(Error::new(crate::error::ErrorCode::RelayUnavailable, "the relay did not take the session's early hello"));
        }
    }
    let mut reply = BytesMut::new();
    let mut local_quiet = false;
    let mut arena = FrameArena::new();
    poll_fn(|cx| loop {
        // The relay's answer first: it decides what happens to everything else.
        match mux.poll_recv_chunk(cx) {
            Poll::Ready(Err(e)) => return Poll::Ready(Err(Error::from_io(e, "reading the relay's answer to CONNECT"))),
            Poll::Ready(Ok(None)) => return Poll::Ready(Err(Error::protocol("the relay ended the stream before answering the CONNECT"))),
            Poll::Ready(Ok(Some(c))) => {
                reply.extend_from_slice(&c);
                match crate::socks::parse_pipelined_reply(&reply, target) {
                    None => continue,
                    Some(Err(e)) => return Poll::Ready(Err(e)),
                    Some(Ok(used)) => {
                        let rest = reply.split_off(used).freeze();
                        if !rest.is_empty() {
                            mux.unread(rest);
                        }
                        return Poll::Ready(Ok(()));
                    }
                }
            }
            Poll::Pending => {}
        }
        // Meanwhile, early bytes from the local client, within the stream's credit. Its end of
        // stream is left for the bridge, which will read it again.
        if local_quiet {
            return Poll::Pending;
        }
        match poll_local_to_tunnel(cx, local, mux, &mut arena) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(StepError::Tunnel(e))) => return Poll::Ready(Err(Error::from_io(e, "sending early data"))),
            Poll::Ready(Err(StepError::Local(_)) | Ok(Step::Eof)) => local_quiet = true,
            Poll::Ready(Ok(Step::Moved(m))) => *early += m as u64,
            Poll::Ready(Ok(Step::Spurious)) => {}
        }
    })
    .await
}

/// One direction of a [`splice`]: chunks taken from `from` and sent as frames on `to`.
struct Leg {
    pending: Bytes,
    done: bool,
    moved: u64,
}

impl Leg {
    /// Move what can be moved now; `Ok(true)` when it did a full turn and should run again.
    fn poll_move(&mut self, cx: &mut Context<'_>, from: &mut SessionStream, to: &mut SessionStream) -> Poll<io::Result<bool>> {
        for _ in 0..TURN {
            if let Poll::Ready(Err(e)) = to.poll_send_ready(cx) {
                return Poll::Ready(Err(e));
            }
            if self.done {
                return Poll::Ready(Ok(false));
            }
            if self.pending.is_empty() {
                match from.poll_recv_chunk(cx) {
                    Poll::Pending => return Poll::Ready(Ok(false)),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(None)) => {
                        to.finish();
                        self.done = true;
                        continue;
                    }
                    Poll::Ready(Ok(Some(c))) => self.pending = c,
                }
            }
            let n = match to.poll_reserve(cx, self.pending.len()) {
                Poll::Pending => return Poll::Ready(Ok(false)),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(n)) => n.min(self.pending.len()),
            };
            let mut frame = BytesMut::with_capacity(FRAME_HEADER + n);
            frame.put_bytes(0, FRAME_HEADER);
            frame.put_slice(&self.pending[..n]);
            self.pending.advance(n);
            self.moved += n as u64;
            to.send_frame(frame)?;
        }
        Poll::Ready(Ok(true))
    }
}

/// Join two mux streams (the relay between a dialer's session and a listener's, dial by name):
/// each chunk received on one is sent on the other, so each side's flow control (and its
/// auto-tuned window) reaches through the relay and the splice adds no fixed-window hop. Returns
/// bytes (a → b, b → a). When either stream is cut off, both are reset.
pub async fn splice(a: &mut SessionStream, b: &mut SessionStream) -> io::Result<(u64, u64)> {
    let mut ab = Leg { pending: Bytes::new(), done: false, moved: 0 };
    let mut ba = Leg { pending: Bytes::new(), done: false, moved: 0 };
    let result = poll_fn(|cx| {
        if let Poll::Ready(e) = a.poll_cut_off(cx) {
            return Poll::Ready(Err(e));
        }
        if let Poll::Ready(e) = b.poll_cut_off(cx) {
            return Poll::Ready(Err(e));
        }
        let again_ab = match ab.poll_move(cx, a, b) {
            Poll::Ready(Ok(again)) => again,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => false,
        };
        let again_ba = match ba.poll_move(cx, b, a) {
            Poll::Ready(Ok(again)) => again,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => false,
        };
        if ab.done && ba.done {
            return Poll::Ready(Ok(()));
        }
        if again_ab || again_ba {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    })
    .await;
    if let Err(e) = &result {
        // A side reset with a code (a listener's E2E_REFUSED) passes it on to the other side.
        let code = e.get_ref().and_then(|i| i.downcast_ref::<crate::error::Error>()).map_or(ErrorCode::Closed, |e| e.code());
        a.reset(code);
        b.reset(code);
    }
    result.map(|()| (ab.moved, ba.moved))
}
