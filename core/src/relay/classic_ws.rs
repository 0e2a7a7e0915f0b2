//! The relay's side of a classic (Emissary) WebSocket as a byte stream, read frame by frame.
//!
//! Emissary's Go dialer sends each application `Write` as one WebSocket message, so one message
//! can be any size (a single 64 MiB `Write` is a 64 MiB message, which gorilla/websocket sends as
//! many continuation frames). tungstenite only hands over whole messages, so a relay built on it
//! must either cap the message size or buffer whole messages. This stream never assembles a
//! message: payload bytes are unmasked and handed to the reader as they arrive, so a connection
//! holds at most [`READ_BUF`] received bytes and about [`WRITE_HIGH`] + [`CLASSIC_CHUNK`] bytes
//! waiting to be sent, whatever the message sizes. Backpressure is TCP's: bytes are read from the
//! socket only as fast as the target takes them.
//!
//! Server role only (client frames must be masked, ours are not). Pings are answered, pongs
//! ignored; a Close from the client ends the read side and is answered. [`AsyncWrite::poll_shutdown`]
//! sends Close 1000 (Normal), as Emissary does when its target closes, so Emissary's client reads a
//! clean end of stream; [`ClassicWs::going_away`] makes it 1001 (the relay shuts down). After our
//! Close the client has [`CLOSE_WAIT`] to answer before the read side ends anyway.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Received bytes buffered per connection (one socket read).
pub(crate) const READ_BUF: usize = 32 * 1024;
/// Largest data frame we send (Emissary's io.Copy chunk).
pub(crate) const CLASSIC_CHUNK: usize = 32 * 1024;
/// Past this many queued outgoing bytes, writes wait for the socket.
pub(crate) const WRITE_HIGH: usize = 64 * 1024;
/// How long the client has to answer our Close before the connection is dropped.
pub(crate) const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// WebSocket close codes we send.
const NORMAL: u16 = 1000;
const GOING_AWAY: u16 = 1001;
const PROTOCOL_ERROR: u16 = 1002;

const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// A parsed frame header: opcode, FIN, payload length, mask.
type Header = (u8, bool, u64, [u8; 4]);

enum Frame {
    /// Between frames: the next bytes are a frame header.
    Header,
    /// Inside a data frame's payload.
    Data { remaining: u64, mask: [u8; 4], offset: usize },
    /// A control frame whose whole payload (at most 125 bytes) is awaited.
    Control { opcode: u8, len: usize, mask: [u8; 4] },
}

/// A server-side WebSocket seen as a byte stream, streaming messages of any size.
pub(crate) struct ClassicWs<S> {
    io: S,
    /// Received, not yet consumed bytes: `rbuf[rpos..rend]`.
    rbuf: Box<[u8]>,
    rpos: usize,
    rend: usize,
    frame: Frame,
    /// Inside a fragmented data message (continuation frames expected).
    fragmented: bool,
    /// The client sent Close (or went away, or the close wait ran out): reads return EOF.
    read_closed: bool,
    /// Frames waiting for the socket, whole frames only (so a pong never splits a data frame).
    wbuf: BytesMut,
    /// We queued our Close; no data frames after it.
    close_sent: bool,
    /// Set by [`ClassicWs::going_away`]: the Close we send says 1001, not 1000.
    close_code: u16,
    /// Runs once our Close is queued: the client's answer is awaited only this long.
    close_deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The socket's write half was shut down.
    io_shut: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ClassicWs<S> {
    pub(crate) fn new(io: S) -> Self {
        ClassicWs {
            io,
            rbuf: vec![0u8; READ_BUF].into_boxed_slice(),
            rpos: 0,
            rend: 0,
            frame: Frame::Header,
            fragmented: false,
            read_closed: false,
            wbuf: BytesMut::with_capacity(WRITE_HIGH + CLASSIC_CHUNK + 16),
            close_sent: false,
            close_code: NORMAL,
            close_deadline: None,
            io_shut: false,
        }
    }

    /// Send one whole binary message now (the preamble).
    pub(crate) async fn write_message(&mut self, payload: &[u8]) -> io::Result<()> {
        push_frame(&mut self.wbuf, OP_BINARY, payload);
        std::future::poll_fn(|cx| self.poll_drain(cx)).await
    }

    /// The tunnel ends because the relay shuts down: the coming Close says 1001 (Going Away), so
    /// the client reads an error, not a clean end of its data.
    pub(crate) fn going_away(&mut self) {
        self.close_code = GOING_AWAY;
    }

    /// Queue our Close (once) and start the wait for the client's answer.
    fn queue_close(&mut self, code: u16) {
        if self.close_sent {
            return;
        }
        self.close_sent = true;
        push_frame(&mut self.wbuf, OP_CLOSE, &code.to_be_bytes());
        self.close_deadline = Some(Box::pin(tokio::time::sleep(CLOSE_WAIT)));
    }

    /// A protocol violation: answer with Close 1002 and fail the read.
    fn violation(&mut self, cx: &mut Context<'_>, why: &str) -> Poll<io::Result<()>> {
        self.queue_close(PROTOCOL_ERROR);
        self.read_closed = true;
        let _ = self.poll_drain(cx);
        Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, format!("WebSocket protocol violation by the client: {why}"))))
    }

    /// Write queued frames until none is left (Pending while the socket is full).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.wbuf.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.wbuf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wbuf.advance(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Read more bytes from the socket into `rbuf`; `Ok(false)` at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.rpos == self.rend {
            self.rpos = 0;
            self.rend = 0;
        } else if self.rend == self.rbuf.len() {
            self.rbuf.copy_within(self.rpos..self.rend, 0);
            self.rend -= self.rpos;
            self.rpos = 0;
        }
        let mut rb = ReadBuf::new(&mut self.rbuf[self.rend..]);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        self.rend += n;
        Poll::Ready(Ok(n > 0))
    }

    /// Parse a frame header from `rbuf`, if a whole one is there.
    fn parse_header(&mut self) -> Result<Option<Header>, &'static str> {
        let b = &self.rbuf[self.rpos..self.rend];
        if b.len() < 2 {
            return Ok(None);
        }
        let (first, second) = (b[0], b[1]);
        if first & 0x70 != 0 {
            return Err("reserved bits set (no extension was negotiated)");
        }
        if second & 0x80 == 0 {
            return Err("unmasked client frame");
        }
        let (len, at) = match second & 0x7F {
            126 if b.len() >= 4 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")), 10),
            126 | 127 => return Ok(None),
            n => (u64::from(n), 2),
        };
        if b.len() < at + 4 {
            return Ok(None);
        }
        let mask: [u8; 4] = b[at..at + 4].try_into().expect("4 bytes");
        self.rpos += at + 4;
        Ok(Some((first & 0x0F, first & 0x80 != 0, len, mask)))
    }
}

/// Append one unmasked frame (server to client) to `out`.
fn push_frame(out: &mut BytesMut, opcode: u8, payload: &[u8]) {
    out.put_u8(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.put_u8(n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.put_u8(126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(127);
            out.put_u64(n as u64);
        }
    }
    out.extend_from_slice(payload);
}

/// XOR `buf` with the frame mask, `offset` bytes into the payload.
fn unmask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    // The mask as it lines up with this slice, twice over: XOR eight bytes at a time.
    let r: [u8; 4] = std::array::from_fn(|i| mask[(offset + i) % 4]);
    let wide = u64::from_ne_bytes([r[0], r[1], r[2], r[3], r[0], r[1], r[2], r[3]]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes((&*c).try_into().expect("8 bytes")) ^ wide;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= r[i % 4];
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ClassicWs<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // Pongs and close answers queued earlier go out whenever the stream is polled.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        loop {
            if this.read_closed || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if let Some(d) = this.close_deadline.as_mut() {
                if d.as_mut().poll(cx).is_ready() {
                    this.read_closed = true;
                    continue;
                }
            }
            match this.frame {
                Frame::Data { remaining: 0, .. } => this.frame = Frame::Header,
                Frame::Data { remaining, mask, offset } if this.rpos < this.rend => {
                    let n = (this.rend - this.rpos).min(buf.remaining()).min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    let chunk = &mut this.rbuf[this.rpos..this.rpos + n];
                    unmask(chunk, mask, offset);
                    buf.put_slice(chunk);
                    this.rpos += n;
                    this.frame = Frame::Data { remaining: remaining - n as u64, mask, offset: offset + n };
                    return Poll::Ready(Ok(()));
                }
                Frame::Control { opcode, len, mask } if this.rend - this.rpos >= len => {
                    let mut payload = this.rbuf[this.rpos..this.rpos + len].to_vec();
                    this.rpos += len;
                    unmask(&mut payload, mask, 0);
                    this.frame = Frame::Header;
                    match opcode {
                        OP_PING if !this.close_sent => push_frame(&mut this.wbuf, OP_PONG, &payload),
                        OP_CLOSE => {
                            // Echo a valid code (RFC 6455 5.5.1), else answer Normal.
                            let code = (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])).filter(|c| *c >= 1000);
                            this.queue_close(code.unwrap_or(NORMAL));
                            this.read_closed = true;
                        }
                        _ => {}
                    }
                    if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
                        return Poll::Ready(Err(e));
                    }
                }
                Frame::Header => match this.parse_header() {
                    Err(why) => return this.violation(cx, why),
                    Ok(Some((opcode, fin, len, mask))) => match opcode {
                        OP_CONT | OP_TEXT | OP_BINARY => {
                            if (opcode == OP_CONT) != this.fragmented {
                                return this.violation(cx, "bad message fragmentation");
                            }
                            this.fragmented = !fin;
                            this.frame = Frame::Data { remaining: len, mask, offset: 0 };
                        }
                        OP_CLOSE | OP_PING | OP_PONG => {
                            if !fin || len > 125 {
                                return this.violation(cx, "fragmented or oversized control frame");
                            }
                            this.frame = Frame::Control { opcode, len: len as usize, mask };
                        }
                        _ => return this.violation(cx, "reserved opcode"),
                    },
                    Ok(None) => {
                        if !ready!(this.poll_fill(cx))? {
                            return Poll::Ready(Err(gone()));
                        }
                    }
                },
                // A data frame or a control frame whose bytes have not all arrived.
                _ => {
                    if !ready!(this.poll_fill(cx))? {
                        return Poll::Ready(Err(gone()));
                    }
                }
            }
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "the client closed the WebSocket without a closing handshake")
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ClassicWs<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.close_sent || this.read_closed {
            // The client closed the tunnel (no half-close in classic mode): nobody will read this.
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "the classic-mode tunnel is closed")));
        }
        if this.wbuf.len() >= WRITE_HIGH {
            match this.poll_drain(cx) {
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if this.wbuf.len() >= WRITE_HIGH => return Poll::Pending,
                _ => {}
            }
        }
        let n = buf.len().min(CLASSIC_CHUNK);
        push_frame(&mut this.wbuf, OP_BINARY, &buf[..n]);
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Send Close (1000, or 1001 after [`ClassicWs::going_away`]). Once the client has answered
    /// (or the wait ran out), the socket's write half is shut down too.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let code = self.close_code;
        self.queue_close(code);
        ready!(self.as_mut().poll_flush(cx))?;
        if self.read_closed && !self.io_shut {
            ready!(Pin::new(&mut self.io).poll_shutdown(cx))?;
            self.io_shut = true;
        }
        Poll::Ready(Ok(()))
    }
}

/// What the classic tunnel loop needs of its transport (a WebSocket or raw TCP).
pub(crate) trait ClassicIo: AsyncRead + AsyncWrite + Unpin + Send {
    /// The coming shutdown is the relay going away, not the end of the target's data.
    fn going_away(&mut self) {}
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> ClassicIo for ClassicWs<S> {
    fn going_away(&mut self) {
        ClassicWs::going_away(self)
    }
}

impl ClassicIo for tokio::net::TcpStream {}

/// When bytes last moved through a [`Watched`] stream, readable while the stream is borrowed by
/// the copy loop.
#[derive(Clone)]
pub(crate) struct Activity {
    base: tokio::time::Instant,
    last_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Activity {
    pub(crate) fn new() -> Activity {
        Activity { base: tokio::time::Instant::now(), last_ms: Default::default() }
    }

    fn touch(&self) {
        let ms = self.base.elapsed().as_millis() as u64;
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// How long no byte has moved.
    pub(crate) fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(std::sync::atomic::Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last)
    }
}

/// A stream that records in an [`Activity`] each time bytes move through it.
pub(crate) struct Watched<S> {
    pub(crate) inner: S,
    activity: Activity,
}

impl<S> Watched<S> {
    pub(crate) fn new(inner: S, activity: Activity) -> Self {
        activity.touch();
        Watched { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = ready!(Pin::new(&mut self.inner).poll_read(cx, buf));
        if buf.filled().len() > before {
            self.activity.touch();
        }
        Poll::Ready(r)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = ready!(Pin::new(&mut self.inner).poll_write(cx, buf));
        if matches!(r, Ok(n) if n > 0) {
            self.activity.touch();
        }
        Poll::Ready(r)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn client_frame(opcode: u8, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 65535 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn unmask_matches_the_byte_loop_at_every_offset() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        for offset in 0..8 {
            for len in [0, 1, 3, 7, 8, 9, 31, 100] {
                let mut fast = data[..len].to_vec();
                unmask(&mut fast, mask, offset);
                let slow: Vec<u8> = data[..len].iter().enumerate().map(|(i, b)| b ^ mask[(offset + i) % 4]).collect();
                assert_eq!(fast, slow, "offset {offset} len {len}");
            }
        }
    }

    #[tokio::test]
    async fn streams_fragmented_messages_answers_pings_and_closes_with_1000() {
        let (client, server) = tokio::io::duplex(1024);
        let mut ws = ClassicWs::new(server);
        let (mut cr, mut cw) = tokio::io::split(client);
        let mask = [9, 8, 7, 6];
        let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let expect = big.clone();
        let writer = tokio::spawn(async move {
            // One message in three frames, with a ping between fragments, then a second message.
            cw.write_all(&client_frame(OP_BINARY, false, &big[..70_000], mask)).await.unwrap();
            cw.write_all(&client_frame(OP_PING, true, b"hi", mask)).await.unwrap();
            cw.write_all(&client_frame(OP_CONT, false, &big[70_000..70_001], mask)).await.unwrap();
            cw.write_all(&client_frame(OP_CONT, true, &big[70_001..], mask)).await.unwrap();
            cw.write_all(&client_frame(OP_TEXT, true, b"!", mask)).await.unwrap();
            cw
        });
        let mut got = vec![0u8; expect.len() + 1];
        ws.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..expect.len()], &expect[..]);
        assert_eq!(got[expect.len()], b'!');
        let mut cw = writer.await.unwrap();
        ws.write_all(b"reply").await.unwrap();
        ws.shutdown().await.unwrap();
        // The client sees: pong "hi", binary "reply", Close 1000.
        let mut seen = vec![0u8; 4 + 7 + 4];
        cr.read_exact(&mut seen).await.unwrap();
        assert_eq!(&seen[..4], &[0x80 | OP_PONG, 2, b'h', b'i']);
        assert_eq!(&seen[4..11], &[0x80 | OP_BINARY, 5, b'r', b'e', b'p', b'l', b'y']);
        assert_eq!(&seen[11..], &[0x80 | OP_CLOSE, 2, 0x03, 0xE8]);
        // The client answers the Close; the server's read side ends cleanly.
        cw.write_all(&client_frame(OP_CLOSE, true, &1000u16.to_be_bytes(), mask)).await.unwrap();
        let mut rest = Vec::new();
        ws.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn unmasked_frames_are_a_protocol_error() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut ws = ClassicWs::new(server);
        client.write_all(&[0x82, 0x01, b'x']).await.unwrap();
        let e = ws.read(&mut [0u8; 8]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        let mut close = [0u8; 4];
        client.read_exact(&mut close).await.unwrap();
        assert_eq!(close, [0x88, 2, 0x03, 0xEA], "Close 1002");
    }
}
