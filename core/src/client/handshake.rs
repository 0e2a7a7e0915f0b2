//! The first steps of every client session, dialer's or listener's: connect the transport,
//! read the relay's preamble, send the hello built from its nonce, and return the frames with
//! the relay's answer. Errors say when the relay is an Emissary (classic-only) server.
//!
//! Over a multiplexed WebSocket or a gRPC call a dialer does not wait for the relay's nonce either
//! ([`send_early_hello`]): its hello, signed over a nonce of its own, rides in the upgrade request
//! (or the call's headers)
//! (see [`crate::protocol::EARLY_HELLO_HEADER`]), so the session's first frames follow the request
//! and the relay's 101, its answer, the CONNECT's reply and the first echoed bytes come back in the
//! next flight. A relay that predates this (no header in its 101), or declines, costs one new
//! connection that signs its nonce; a relay found without it is remembered for the process.
//!
//! A dialer does not wait for the answer before using the session ([`send_hello`] +
//! [`answer_first`]): its first stream's `Open`, CONNECT and early data follow the hello in the
//! same flight, and the relay's answer, the CONNECT's reply and the first echoed bytes come back
//! in one. Any `libtunnel.v1` relay serves this unchanged: it reads the hello, answers, then
//! reads the frames already queued behind it (they wait in its transport buffer). A refused
//! hello ends the connection, and the frames behind it are dropped unread.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use futures_util::{SinkExt, Stream, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

use crate::error::{Error, ErrorCode, Result};
use crate::mux::{FrameSink, FrameSource, MuxConfig};
use crate::protocol::{self, ServerConnect};
use crate::session::{Link, QuicLink};
use crate::transport::{self, ClientTls, Connected, EarlyAnswer, RelayUrl, Scheme, USE_CLASSIC};

/// Open a multiplexed transport: connect, read the relay's preamble, send the hello that
/// `make_hello` builds from the relay's nonce, and return the frames plus the relay's answer
/// (shared by dialer and listener sessions).
pub(crate) async fn connect_mux(
    url: &RelayUrl,
    tls: Option<&ClientTls>,
    session: &MuxConfig,
    make_hello: impl FnOnce(&[u8]) -> Bytes,
) -> Result<(Link, Bytes)> {
    let mut link = send_hello(url, tls, session, make_hello).await?;
    let answer = match link.source.next().await {
        Some(Ok(b)) => Ok(b),
        Some(Err(e)) => Err(e),
        None => Err(std::io::ErrorKind::UnexpectedEof.into()),
    };
    let answer = answer.map_err(|e| answer_lost(url, e))?;
    Ok((link, answer))
}

/// Connect, read the relay's preamble and send the hello `make_hello` builds from its nonce,
/// without waiting for the answer: it is the next message the link's `source` yields. Over QUIC
/// there is no preamble: the hello is signed over the connection's exported nonce
/// (`transport::quic`) and leaves in the flight after the QUIC handshake. `session` sizes a QUIC
/// connection's windows and keepalive.
pub(crate) async fn send_hello(
    url: &RelayUrl,
    tls: Option<&ClientTls>,
    session: &MuxConfig,
    make_hello: impl FnOnce(&[u8]) -> Bytes,
) -> Result<Link> {
    let lost = |e: std::io::Error| {
        Error::new(ErrorCode::RelayUnavailable, format!("the relay at {} dropped the connection during the handshake: {e}", url.url))
    };
    if url.scheme == Scheme::Quic {
        let mut c = transport::quic::connect(url, tls, session).await?;
        c.sink.send(make_hello(&c.nonce)).await.map_err(lost)?;
        return Ok(Link { source: c.source, sink: c.sink, quic: Some(QuicLink { conn: c.conn, endpoint: Some(c.endpoint) }) });
    }
    if url.scheme != Scheme::Tcp {
        let framed = if url.scheme.is_grpc() { Some(transport::grpc::connect(url, tls).await?) } else { transport::connect_ws_mux(url, tls).await? };
        let Some((mut source, mut sink)) = framed else {
            return Err(Error::protocol(format!(
                "the relay at {} did not accept the {} subprotocol: it is an Emissary server (or another classic-only relay); {USE_CLASSIC}",
                url.url,
                protocol::MUX_SUBPROTOCOL
            )));
        };
        let pre = match source.next().await {
            Some(Ok(b)) => b,
            Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                return Err(Error::protocol(format!("the relay sent an unexpected message instead of its preamble ({e})")))
            }
            Some(Err(e)) => return Err(lost(e)),
            None => return Err(lost(std::io::ErrorKind::UnexpectedEof.into())),
        };
        let nonce = ServerConnect::decode_checked(&pre)?;
        sink.send(make_hello(&nonce)).await.map_err(lost)?;
        return Ok(Link::frames(source, sink));
    }
    match transport::connect(url, true, tls).await? {
        Connected::Ws(..) => Err(Error::protocol(format!("the relay at {} answered a tcp:// connection with a WebSocket", url.url))),
        Connected::Tcp(mut io) => {
            let nonce = protocol::read_server_connect(&mut io).await?;
            io.write_all(protocol::MUX_TCP_MAGIC).await.map_err(|e| classic_only(url, e))?;
            let (source, mut sink) = transport::tcp_frames(io);
            sink.send(make_hello(&nonce)).await.map_err(|e| classic_only(url, e))?;
            Ok(Link::frames(source, sink))
        }
    }
}

/// Connect over a multiplexed WebSocket and send the hello `make_hello` builds from a nonce of
/// the client's own in the upgrade request, without waiting for anything: the relay's answer to
/// the hello is the next message `source` yields once the relay took it ([`EarlyGate`]).
pub(crate) async fn send_early_hello(
    url: &RelayUrl,
    tls: Option<&ClientTls>,
    make_hello: impl FnOnce(&[u8]) -> Bytes,
) -> Result<(FrameSource, FrameSink, EarlyGate)> {
    use base64::Engine;
    let nonce = crate::auth::fresh_nonce();
    let mut raw = nonce.to_vec();
    raw.extend_from_slice(&make_hello(&nonce));
    let value = base64::engine::general_purpose::STANDARD_NO_PAD.encode(raw);
    let (source, sink, answer) = if url.scheme.is_grpc() {
        transport::grpc::connect_early(url, tls, &value).await?
    } else {
        transport::connect_ws_mux_early(url, tls, &value).await?
    };
    Ok((source, sink, EarlyGate(answer)))
}

/// Whether `url` may be sent an early hello: in a WebSocket upgrade or a gRPC call's headers (not
/// over raw TCP: its relay speaks first), and not to a relay found in this process to predate them.
pub(crate) fn early_hello_for(url: &RelayUrl) -> bool {
    // QUIC needs none: its hello never waits for a nonce.
    !matches!(url.scheme, Scheme::Tcp | Scheme::Quic) && !NO_EARLY_HELLO.lock().unwrap_or_else(|p| p.into_inner()).contains(url.url.as_str())
}

/// Relays (URLs) that answered an early hello's upgrade without the header: they predate it.
static NO_EARLY_HELLO: std::sync::Mutex<std::collections::BTreeSet<String>> = std::sync::Mutex::new(std::collections::BTreeSet::new());

/// What the relay made of an early hello, once its answer to the upgrade has been read.
#[derive(Clone)]
pub(crate) struct EarlyGate(tokio::sync::watch::Receiver<Option<EarlyAnswer>>);

impl EarlyGate {
    /// Wait for the relay's answer to the upgrade: whether it took the early hello. Until then a
    /// caller sends nothing it could not send again on another connection (a local client's bytes).
    pub(crate) async fn taken(&mut self) -> bool {
        matches!(self.0.wait_for(|a| a.is_some()).await.map(|a| *a), Ok(Some(EarlyAnswer::Taken)))
    }

    /// After a failed session: whether to try again with the relay's nonce (it did not take the
    /// early hello), remembering a relay that predates it.
    pub(crate) fn retry_with_nonce(&self, url: &RelayUrl) -> bool {
        let answer = *self.0.borrow();
        if answer == Some(EarlyAnswer::Absent) {
            NO_EARLY_HELLO.lock().unwrap_or_else(|p| p.into_inner()).insert(url.url.as_str().to_string());
        }
        !matches!(answer, Some(EarlyAnswer::Taken))
    }
}

/// A libtunnel relay answers the magic and hello (if only with a refusal); an Emissary server
/// takes the magic for a bad SOCKS5 version and hangs up.
fn classic_only(url: &RelayUrl, e: std::io::Error) -> Error {
    Error::protocol(format!(
        "the relay at {} sent Emissary's preamble, then closed the connection at libtunnel's multiplexed hello ({e}): it is an Emissary server (or another classic-only relay); {USE_CLASSIC}",
        url.url
    ))
}

/// The connection ended (or failed) where the relay's answer to the hello was due.
fn answer_lost(url: &RelayUrl, e: std::io::Error) -> Error {
    if url.scheme == Scheme::Tcp {
        return classic_only(url, e);
    }
    Error::new(ErrorCode::RelayUnavailable, format!("the relay at {} dropped the connection during the handshake: {e}", url.url))
}

/// The relay's answer to a hello sent by [`send_hello`], taken off the front of the session's
/// frames by [`answer_first`].
pub(crate) struct Answer(oneshot::Receiver<std::io::Result<Bytes>>);

impl Answer {
    /// Wait for the answer; errors name the relay (and Emissary, on the raw-TCP transport).
    pub(crate) async fn get(self, url: &RelayUrl) -> Result<Bytes> {
        let r = self.0.await.unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the session ended")));
        r.map_err(|e| answer_lost(url, e))
    }
}

/// Split the relay's answer off the front of `source`: the returned source yields the frames
/// after it (the session's), the [`Answer`] the answer itself, or how the transport ended first.
pub(crate) fn answer_first(source: FrameSource) -> (FrameSource, Answer) {
    let (tx, rx) = oneshot::channel();
    (Box::pin(AnswerFirst { inner: source, answer: Some(tx) }), Answer(rx))
}

struct AnswerFirst {
    inner: FrameSource,
    answer: Option<oneshot::Sender<std::io::Result<Bytes>>>,
}

impl Stream for AnswerFirst {
    type Item = std::io::Result<Bytes>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = ready!(self.inner.as_mut().poll_next(cx));
        let Some(tx) = self.answer.take() else { return Poll::Ready(item) };
        match item {
            Some(Ok(answer)) => {
                let _ = tx.send(Ok(answer));
                self.poll_next(cx)
            }
            Some(Err(e)) => {
                let _ = tx.send(Err(std::io::Error::new(e.kind(), e.to_string())));
                Poll::Ready(Some(Err(e)))
            }
            None => {
                let _ = tx.send(Err(std::io::ErrorKind::UnexpectedEof.into()));
                Poll::Ready(None)
            }
        }
    }
}
