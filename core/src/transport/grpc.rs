//! The HTTP/2 transport (`grpc://`, `grpcs://`): a session's frames carried in one long-lived
//! HTTP/2 request/response stream shaped as a gRPC bidirectional-streaming call, so that proxies
//! and load balancers that pass only gRPC (nginx `grpc_pass`, Envoy routes, Google's and Cloud
//! Run's front ends) pass a session. The service is published in `proto/libtunnel/v1/tunnel.proto`
//! (`libtunnel.v1.Tunnel/Session`, `stream Frame` both ways) and documented in
//! `docs/design/protocol.md`: a Go or Java program generated from it speaks to a relay without our
//! bindings.
//!
//! On the wire, each session frame (the same `libtunnel.v1` frames a WebSocket message carries,
//! the relay's preamble and the hello included) is one gRPC message: the 5-byte gRPC prefix
//! (uncompressed flag, big-endian length), then the protobuf encoding of `Frame { bytes data = 1; }`
//! (tag `0x0a`, varint length, the frame). The request is `POST /libtunnel.v1.Tunnel/Session` with
//! `content-type: application/grpc` and `te: trailers`; the relay answers 200 at once and ends its
//! response with `grpc-status` trailers. The client ends its request stream when its session
//! closes (half-close); either side resetting the HTTP/2 stream ends the session.
//!
//! This module holds the codec, the frame source and sink over an `h2` stream (both ends), and the
//! client's connect; the relay's HTTP/2 accept loop is `relay/grpc_endpoint.rs`. `h2` does the
//! HTTP/2 framing, HPACK and flow control; windows are set large enough for long links, and data
//! is handed to `h2` only as its stream's send capacity allows, so nothing queues without bound.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{Sink, Stream};
use http::{HeaderMap, HeaderValue, Request, StatusCode};

use super::{ClientTls, RelayUrl, Scheme, MUX_MAX_MESSAGE};
use crate::error::{Error, ErrorCode, Result};
use crate::mux::{FrameSink, FrameSource};

/// The gRPC method a session is: service `libtunnel.v1.Tunnel`, method `Session`.
pub const SESSION_PATH: &str = "/libtunnel.v1.Tunnel/Session";
/// The content type of gRPC requests and responses.
pub const CONTENT_TYPE: &str = "application/grpc";

/// HTTP/2 receive window of a session's stream (both ends): a 100 ms, 1 Gbit/s path in flight.
/// It is credit, not a buffer: each end reads its call without pause, and the session's own
/// per-stream windows bound what waits in memory. At 4 MiB a 50 ms, 1 Gbit/s link moved 0.44x of
/// direct (the window, not the link, was the limit).
pub const STREAM_WINDOW: u32 = 16 << 20;
/// HTTP/2 receive window of a connection (both ends): room for a few sessions' calls behind one
/// proxy connection.
pub const CONNECTION_WINDOW: u32 = 32 << 20;
/// Largest HTTP/2 DATA frame we accept: a whole session frame in one, mostly.
pub const MAX_FRAME: u32 = 256 << 10;
/// Most session data handed to `h2` and not yet written to the socket, per stream: the queue an
/// interactive stream's frames wait behind. A ping under bulk on a 50 ms, 1 Gbit/s link took
/// 1.62x of idle with 1 MiB here (and 256 KiB below), 1.46x with 256 KiB (128 KiB), 1.41x with
/// 128 KiB (64 KiB), against 1.17-1.24x over a WebSocket; throughput the same (0.97x of direct on
/// that link, 0.23x on loopback).
const SEND_BUFFER: usize = 128 << 10;
/// The sink asks the session for no more frames while this much waits for send capacity.
const SINK_HIGH_WATER: usize = 64 << 10;
/// gRPC prefix + protobuf tag + the longest varint length of a frame.
const PREFIX_MAX: usize = 5 + 1 + 3;
/// Largest gRPC message accepted: a session frame, its protobuf tag and length.
const MAX_MESSAGE: usize = MUX_MAX_MESSAGE + PREFIX_MAX;
/// gRPC status codes used here (grpc/doc/statuscodes.md).
pub const GRPC_OK: u32 = 0;
/// The method is not served.
pub const GRPC_UNIMPLEMENTED: u32 = 12;

/// The gRPC prefix and protobuf header of one frame of `len` bytes: `Frame { bytes data = 1 }`.
fn message_prefix(len: usize) -> Bytes {
    let mut pb = [0u8; 4];
    pb[0] = 0x0a;
    let mut n = 1;
    let mut v = len;
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            pb[n] = byte;
            n += 1;
            break;
        }
        pb[n] = byte | 0x80;
        n += 1;
    }
    let mut out = BytesMut::with_capacity(5 + n);
    out.put_u8(0);
    out.put_u32((n + len) as u32);
    out.put_slice(&pb[..n]);
    out.freeze()
}

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// Read a protobuf varint from the front of `b`.
fn varint(b: &mut Bytes) -> io::Result<u64> {
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        if !b.has_remaining() {
            return Err(invalid("a gRPC message ends inside a protobuf varint"));
        }
        let byte = b.get_u8();
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(invalid("a protobuf varint is longer than 10 bytes"))
}

/// The session frame inside one gRPC message (a protobuf `Frame`): field 1's bytes, other fields
/// skipped as protobuf says (a later version may add some).
fn frame_of(mut msg: Bytes) -> io::Result<Bytes> {
    let mut data = None;
    while msg.has_remaining() {
        let key = varint(&mut msg)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                varint(&mut msg)?;
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                if msg.remaining() < n {
                    return Err(invalid("a gRPC message ends inside a fixed-size protobuf field"));
                }
                msg.advance(n);
            }
            2 => {
                let n = varint(&mut msg)? as usize;
                if msg.remaining() < n {
                    return Err(invalid("a gRPC message ends inside a protobuf bytes field"));
                }
                let value = msg.split_to(n);
                if field == 1 {
                    data = Some(value);
                }
            }
            other => return Err(invalid(format!("protobuf wire type {other} is not used by libtunnel.v1.Frame"))),
        }
    }
    data.ok_or_else(|| invalid("a gRPC message holds no Frame.data"))
}

/// Session frames from an HTTP/2 stream's DATA: gRPC messages cut out of what arrives (one copy
/// into a buffer, as DATA frames need not align with messages), `Frame.data` of each. Received
/// bytes are given back to the peer's window at once: the session reads its source without
/// pause and bounds what it keeps by its own windows. At the end, the peer's `grpc-status`
/// trailers (if any) decide between a clean end and an error.
pub struct GrpcSource {
    /// The call's response body, once its headers arrived.
    body: Option<h2::RecvStream>,
    /// The relay's answer to an early-hello call, still to come (the client's side).
    pending: Option<Pending>,
    /// Where a malformed message is reported for the sink's closing status (the relay's side).
    fault: Option<Fault>,
    buf: BytesMut,
    /// Data ended; trailers next.
    data_done: bool,
    done: bool,
}

impl GrpcSource {
    /// Read frames from `body`.
    pub fn new(body: h2::RecvStream) -> GrpcSource {
        GrpcSource { body: Some(body), pending: None, fault: None, buf: BytesMut::new(), data_done: false, done: false }
    }

    fn new_pending() -> GrpcSource {
        GrpcSource { body: None, pending: None, fault: None, buf: BytesMut::new(), data_done: false, done: false }
    }

    /// Wait for the response headers of an early-hello call; tell the gate what the relay made of
    /// the hello.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(p) = self.pending.as_mut() else { return Poll::Ready(Ok(())) };
        let result = ready!(Pin::new(&mut p.answer).poll(cx));
        let p = self.pending.take().expect("pending");
        let answer = match result {
            Ok(r) => r,
            Err(e) => {
                p.early.send_replace(Some(super::EarlyAnswer::Failed));
                return Poll::Ready(Err(h2_io(e)));
            }
        };
        let (head, body) = answer.into_parts();
        if let Err(why) = check_answer(&p.url, &head) {
            p.early.send_replace(Some(super::EarlyAnswer::Failed));
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionRefused, why)));
        }
        let early = match head.headers.get(crate::protocol::EARLY_HELLO_HEADER).map(|v| v.as_bytes()) {
            Some(v) if v == crate::protocol::EARLY_TAKEN.as_bytes() => super::EarlyAnswer::Taken,
            Some(_) => super::EarlyAnswer::Declined,
            None => super::EarlyAnswer::Absent,
        };
        p.early.send_replace(Some(early));
        self.body = Some(body);
        Poll::Ready(Ok(()))
    }

    /// Report what was wrong with the peer's messages to `fault` too, for the call's end status.
    pub fn reporting_to(mut self, fault: Fault) -> GrpcSource {
        self.fault = Some(fault);
        self
    }

    fn failed(&mut self, e: io::Error) -> Poll<Option<io::Result<Bytes>>> {
        self.done = true;
        if let Some(f) = &self.fault {
            f.set(&e);
        }
        Poll::Ready(Some(Err(e)))
    }

    /// A whole message at the front of the buffer, if there is one.
    fn next_message(&mut self) -> io::Result<Option<Bytes>> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        if self.buf[0] != 0 {
            return Err(invalid("a compressed gRPC message: libtunnel sessions send them uncompressed (grpc-encoding identity)"));
        }
        let len = u32::from_be_bytes(self.buf[1..5].try_into().expect("4 bytes")) as usize;
        if len > MAX_MESSAGE {
            return Err(invalid(format!("a gRPC message of {len} bytes; a session frame is at most {MAX_MESSAGE}")));
        }
        if self.buf.len() < 5 + len {
            self.buf.reserve(5 + len - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(5);
        frame_of(self.buf.split_to(len).freeze()).map(Some)
    }
}

/// The relay's response to an early-hello call, still to come.
struct Pending {
    answer: h2::client::ResponseFuture,
    /// The relay's URL, for errors.
    url: String,
    /// What the relay made of the early hello, for the dialer's gate.
    early: tokio::sync::watch::Sender<Option<super::EarlyAnswer>>,
}

/// What `grpc-status` trailers (or a trailers-only answer's headers) say, as an error when not OK.
pub fn status_error(headers: &HeaderMap) -> Option<io::Error> {
    let status = headers.get("grpc-status")?.to_str().ok()?.trim().parse::<u32>().ok()?;
    if status == GRPC_OK {
        return None;
    }
    let message = headers.get("grpc-message").and_then(|m| m.to_str().ok()).map(percent_decode).unwrap_or_default();
    Some(io::Error::new(io::ErrorKind::ConnectionAborted, format!("the peer ended the gRPC stream with status {status}: {message}")))
}

/// gRPC percent-decodes `grpc-message`.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    if e.is_reset() && e.is_remote() {
        // Our relay ends calls with trailers; a reset from the other side is a proxy's doing.
        return io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!(
                "HTTP/2: the call was reset by the other side ({e}); a proxy in between may limit request bodies or idle time \
                 (nginx: client_max_body_size 0, timeouts longer than keepalive_interval; see docs/guide/grpc-nginx.md)"
            ),
        );
    }
    io::Error::new(io::ErrorKind::ConnectionReset, format!("HTTP/2: {e}"))
}

impl Stream for GrpcSource {
    type Item = io::Result<Bytes>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        let this = &mut *self;
        if this.pending.is_some() && !this.done {
            if let Err(e) = ready!(this.poll_answer(cx)) {
                this.done = true;
                return Poll::Ready(Some(Err(e)));
            }
        }
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.next_message() {
                Ok(Some(m)) => return Poll::Ready(Some(Ok(m))),
                Ok(None) => {}
                Err(e) => return this.failed(e),
            }
            if !this.data_done {
                let body = this.body.as_mut().expect("the answer has come");
                match ready!(body.poll_data(cx)) {
                    Some(Ok(chunk)) => {
                        let _ = body.flow_control().release_capacity(chunk.len());
                        if this.buf.len() + chunk.len() > 2 * MAX_MESSAGE + 5 {
                            return this.failed(invalid("a gRPC message larger than a session frame"));
                        }
                        this.buf.extend_from_slice(&chunk);
                        continue;
                    }
                    Some(Err(e)) => {
                        this.done = true;
                        return Poll::Ready(Some(Err(h2_io(e))));
                    }
                    None => this.data_done = true,
                }
            }
            this.done = true;
            let trailers = ready!(this.body.as_mut().expect("the answer has come").poll_trailers(cx));
            if !this.buf.is_empty() {
                return this.failed(invalid("the gRPC stream ended inside a message"));
            }
            return Poll::Ready(match trailers {
                Ok(Some(t)) => status_error(&t).map(Err),
                Ok(None) => None,
                Err(e) => Some(Err(h2_io(e))),
            });
        }
    }
}

/// What the peer did wrong on a call, shared by the relay's source (which finds it) and sink
/// (which ends the call with it as `grpc-status: 3`, INVALID_ARGUMENT, and its `grpc-message`).
#[derive(Clone, Default)]
pub struct Fault(std::sync::Arc<std::sync::Mutex<Option<String>>>);

impl Fault {
    fn set(&self, e: &io::Error) {
        let mut f = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert_with(|| e.to_string());
    }

    fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// gRPC's INVALID_ARGUMENT: the client sent what the session cannot read.
pub const GRPC_INVALID_ARGUMENT: u32 = 3;
/// gRPC's UNAVAILABLE: the session ended without closing (the relay dropped it).
pub const GRPC_UNAVAILABLE: u32 = 14;

/// gRPC's percent-encoding of `grpc-message`: printable ASCII but `%` as is, the rest as `%XX`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Trailers (or a trailers-only answer's headers) carrying `status` and `message`.
pub fn status_headers(status: u32, message: Option<&str>) -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from(status));
    if let Some(m) = message {
        if let Ok(v) = HeaderValue::from_str(&percent_encode(m)) {
            t.insert("grpc-message", v);
        }
    }
    t
}

/// How a sink ends its side of the stream.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client: an empty DATA frame with END_STREAM (half-close).
    Data,
    /// The relay: `grpc-status: 0` trailers.
    Trailers,
}

/// Session frames onto an HTTP/2 stream as gRPC messages: each frame's prefix and payload are
/// queued (no copy) and handed to `h2` as the stream's send capacity allows, so at most
/// [`SEND_BUFFER`] waits inside `h2`; the session is told to wait while [`SINK_HIGH_WATER`]
/// bytes wait here.
pub struct GrpcSink {
    stream: h2::SendStream<Bytes>,
    /// The source's findings, for the end status (the relay's side).
    fault: Option<Fault>,
    queue: VecDeque<Bytes>,
    queued: usize,
    end: End,
    ended: bool,
}

impl GrpcSink {
    /// Write frames to `stream`, ending it as `end` says.
    pub fn new(stream: h2::SendStream<Bytes>, end: End) -> GrpcSink {
        GrpcSink { stream, fault: None, queue: VecDeque::new(), queued: 0, end, ended: false }
    }

    /// End the call with what `fault` holds, if anything, instead of `grpc-status: 0`.
    pub fn reporting_from(mut self, fault: Fault) -> GrpcSink {
        self.fault = Some(fault);
        self
    }

    /// The relay's trailers: OK, or INVALID_ARGUMENT naming what the client sent wrong.
    fn trailers(&self, otherwise: (u32, Option<&str>)) -> HeaderMap {
        match self.fault.as_ref().and_then(Fault::take) {
            Some(why) => status_headers(GRPC_INVALID_ARGUMENT, Some(&why)),
            None => status_headers(otherwise.0, otherwise.1),
        }
    }

    /// Hand queued bytes to `h2` while it has capacity; ready once the queue is empty.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.queued > 0 {
            let mut cap = self.stream.capacity();
            if cap == 0 {
                self.stream.reserve_capacity(self.queued);
                match ready!(self.stream.poll_capacity(cx)) {
                    Some(Ok(n)) => cap = n,
                    Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                    None => return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "the HTTP/2 stream is closed"))),
                }
                if cap == 0 {
                    continue;
                }
            }
            while cap > 0 {
                let Some(front) = self.queue.front_mut() else { break };
                let chunk = if front.len() <= cap { self.queue.pop_front().expect("front") } else { front.split_to(cap) };
                cap -= chunk.len();
                self.queued -= chunk.len();
                self.stream.send_data(chunk, false).map_err(h2_io)?;
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl Sink<Bytes> for GrpcSink {
    type Error = io::Error;
    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.queued >= SINK_HIGH_WATER {
            // Progress if it can; the session may queue more once below the mark.
            let _ = self.poll_drain(cx)?;
            if self.queued >= SINK_HIGH_WATER {
                return Poll::Pending;
            }
        }
        Poll::Ready(Ok(()))
    }
    fn start_send(mut self: Pin<&mut Self>, frame: Bytes) -> io::Result<()> {
        if self.ended {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the gRPC stream is closed"));
        }
        let prefix = message_prefix(frame.len());
        self.queued += prefix.len() + frame.len();
        self.queue.push_back(prefix);
        if !frame.is_empty() {
            self.queue.push_back(frame);
        }
        Ok(())
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_drain(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        if !self.ended {
            self.ended = true;
            match self.end {
                End::Data => self.stream.send_data(Bytes::new(), true).map_err(h2_io)?,
                End::Trailers => {
                    let t = self.trailers((GRPC_OK, None));
                    self.stream.send_trailers(t).map_err(h2_io)?;
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for GrpcSink {
    /// A sink dropped without `close` (the session ended on an error, or before its hello): the
    /// relay still ends the call with a status a gRPC client can read, instead of a reset.
    fn drop(&mut self) {
        if !self.ended && self.end == End::Trailers {
            let t = self.trailers((GRPC_UNAVAILABLE, Some("the relay ended the session")));
            let _ = self.stream.send_trailers(t);
        }
    }
}

/// `h2` settings both ends use: large windows and frames, a bounded send buffer.
pub fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER);
    b
}

/// The relay's `h2` settings (see [`client_builder`]), with at most `max_streams` sessions at once
/// on one connection.
pub fn server_builder(max_streams: u32) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(SEND_BUFFER)
        .max_concurrent_streams(max_streams)
        .max_header_list_size(16 << 10);
    b
}

/// Send a session call to the relay at `url` (`grpc://` or `grpcs://`, through its proxy if
/// any): HTTP/2 over TCP (prior knowledge) or TLS (ALPN `h2`), the request sent, with an early
/// hello header if given; the answer still to come, and the request stream.
async fn start_call(
    url: &RelayUrl,
    tls: Option<&ClientTls>,
    early_hello: Option<&str>,
) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>)> {
    let io = super::open(url, tls).await?;
    let (client, conn) = client_builder().handshake::<_, Bytes>(io).await.map_err(|e| refused_h2(url, e))?;
    // The connection's driver; it ends when the stream below and its handles are gone.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "HTTP/2 connection to the relay ended");
        }
    });
    let scheme = if url.scheme == Scheme::Grpcs { "https" } else { "http" };
    let host = if url.host.contains(':') { format!("[{}]", url.host) } else { url.host.clone() };
    let mut req = Request::post(format!("{scheme}://{host}:{}{SESSION_PATH}", url.port))
        .header(http::header::CONTENT_TYPE, CONTENT_TYPE)
        .header(http::header::TE, "trailers")
        .header("grpc-accept-encoding", "identity")
        .header(http::header::USER_AGENT, concat!("libtunnel/", env!("CARGO_PKG_VERSION")));
    if let Some(v) = early_hello {
        req = req.header(crate::protocol::EARLY_HELLO_HEADER, v);
    }
    let req = req.body(()).map_err(|e| Error::argument(format!("the session call to {} cannot be built: {e}", url.url)))?;
    let mut client = client.ready().await.map_err(|e| refused_h2(url, e))?;
    let (answer, send) = client.send_request(req, false).map_err(|e| refused_h2(url, e))?;
    Ok((answer, send))
}

/// Whether the relay's answer to the call opens a session: a gRPC 200 that is not a refusal.
fn check_answer(url: &str, head: &http::response::Parts) -> std::result::Result<(), String> {
    let content_type = head.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if head.status != StatusCode::OK || !content_type.starts_with(CONTENT_TYPE) {
        return Err(format!(
            "the relay at {url} answered the gRPC session call with HTTP {} ({}): something in between does not route gRPC to a libtunnel relay; \
             check that the proxy passes {SESSION_PATH} (nginx: grpc_pass) or use wss://",
            head.status,
            if content_type.is_empty() { "no content type" } else { content_type }
        ));
    }
    match status_error(&head.headers) {
        Some(e) => Err(format!("the relay at {url} refused the gRPC session call: {e}")),
        None => Ok(()),
    }
}

/// Open a session's gRPC call to the relay at `url` and read the relay's 200; the frames of the
/// call (the relay's preamble first).
pub(crate) async fn connect(url: &RelayUrl, tls: Option<&ClientTls>) -> Result<(FrameSource, FrameSink)> {
    let (answer, send) = start_call(url, tls, None).await?;
    let answer = answer.await.map_err(|e| refused_h2(url, e))?;
    let (head, body) = answer.into_parts();
    check_answer(url.url.as_str(), &head).map_err(|why| Error::new(ErrorCode::RelayUnavailable, why))?;
    Ok((Box::pin(GrpcSource::new(body)), Box::pin(GrpcSink::new(send, End::Data))))
}

/// Open a session's gRPC call with an early hello in its request headers (see
/// [`crate::protocol::EARLY_HELLO_HEADER`]) and return at once, before any answer: the session's
/// first frames follow the request in its flight. `answer` says what the relay made of the hello
/// once its response headers arrive (read by the source, which the session polls from the
/// start); if it took it, its answer to the hello is the first frame.
pub(crate) async fn connect_early(
    url: &RelayUrl,
    tls: Option<&ClientTls>,
    early_hello: &str,
) -> Result<(FrameSource, FrameSink, tokio::sync::watch::Receiver<Option<super::EarlyAnswer>>)> {
    let (answer, send) = start_call(url, tls, Some(early_hello)).await?;
    let (tx, rx) = tokio::sync::watch::channel(None);
    let mut source = GrpcSource::new_pending();
    source.pending = Some(Pending { answer, url: url.url.to_string(), early: tx });
    Ok((Box::pin(source), Box::pin(GrpcSink::new(send, End::Data)), rx))
}

/// An HTTP/2 failure before the call was answered, with the fix for the usual cause.
fn refused_h2(url: &RelayUrl, e: h2::Error) -> Error {
    let hint = if e.is_go_away() || e.is_io() {
        "if the relay or a proxy in front of it does not speak HTTP/2 there, use ws:// or wss://"
    } else {
        "check that the relay (or the proxy in front of it) serves gRPC on that port"
    };
    Error::new(ErrorCode::RelayUnavailable, format!("HTTP/2 with the relay at {} failed ({e}): {hint}", url.url))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_and_frame_round_trip() {
        for len in [0usize, 1, 127, 128, 16_383, 16_384, MUX_MAX_MESSAGE] {
            let payload = Bytes::from(vec![7u8; len]);
            let mut msg = BytesMut::from(&message_prefix(len)[..]);
            msg.extend_from_slice(&payload);
            assert_eq!(msg[0], 0);
            let n = u32::from_be_bytes(msg[1..5].try_into().unwrap()) as usize;
            assert_eq!(n, msg.len() - 5, "length of {len}");
            let frame = frame_of(msg.freeze().slice(5..)).unwrap();
            assert_eq!(frame, payload);
        }
    }

    #[test]
    fn unknown_fields_are_skipped_and_garbage_refused() {
        // field 2 varint 5, field 1 bytes "ab", field 3 fixed32.
        let msg = Bytes::from_static(&[0x10, 0x05, 0x0a, 0x02, b'a', b'b', 0x1d, 1, 2, 3, 4]);
        assert_eq!(frame_of(msg).unwrap(), Bytes::from_static(b"ab"));
        assert!(frame_of(Bytes::from_static(&[0x0a, 0x05, b'a'])).is_err());
        assert!(frame_of(Bytes::from_static(&[0x10, 0x01])).is_err(), "no data field");
        assert!(frame_of(Bytes::from_static(&[0x0b])).is_err(), "wire type 3");
    }

    #[test]
    fn status_trailers() {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("0"));
        assert!(status_error(&h).is_none());
        h.insert("grpc-status", HeaderValue::from_static("12"));
        h.insert("grpc-message", HeaderValue::from_static("no%20such%20method"));
        assert!(status_error(&h).unwrap().to_string().contains("status 12: no such method"));
    }
}
