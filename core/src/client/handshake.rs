//! The first steps of every client session, dialer's or listener's: connect the transport,
//! read the relay's preamble, send the hello built from its nonce, and return the frames with
//! the relay's answer. Errors say when the relay is an Emissary (classic-only) server.

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

use crate::error::{Error, ErrorCode, Result};
use crate::protocol::{self, ServerConnect};
use crate::transport::{self, ClientTls, Connected, RelayUrl};

/// How to switch a dialer to classic mode, in every face (the fix named by errors from a
/// classic-only relay).
pub(crate) const USE_CLASSIC: &str =
    "dial it in classic mode: `--classic` (CLI), `Mode::Classic` (Rust), `classic=True` (Python), `{classic: true}` (Node)";

/// Open a multiplexed transport: connect, read the relay's preamble, send the hello that
/// `make_hello` builds from the relay's nonce, and return the frames plus the relay's answer
/// (shared by dialer and listener sessions).
pub(crate) async fn connect_mux(
    url: &RelayUrl,
    tls: Option<&ClientTls>,
    make_hello: impl FnOnce(&[u8]) -> bytes::Bytes,
) -> Result<(crate::mux::FrameSource, crate::mux::FrameSink, bytes::Bytes)> {
    let lost = |e: std::io::Error| {
        Error::new(ErrorCode::RelayUnavailable, format!("the relay at {} dropped the connection during the handshake: {e}", url.url))
    };
    let (mut source, sink) = match transport::connect(url, true, tls).await? {
        Connected::Ws(mut ws, chosen) => {
            if !chosen {
                return Err(Error::protocol(format!(
                    "the relay at {} did not accept the {} subprotocol: it is an Emissary server (or another classic-only relay); {USE_CLASSIC}",
                    url.url,
                    protocol::MUX_SUBPROTOCOL
                )));
            }
            let pre = loop {
                match ws.next().await {
                    Some(Ok(Message::Binary(b))) => break b,
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(_)) => return Err(Error::protocol("the relay sent an unexpected message instead of its preamble")),
                    Some(Err(e)) => return Err(lost(std::io::Error::other(e))),
                    None => return Err(lost(std::io::ErrorKind::UnexpectedEof.into())),
                }
            };
            let nonce = ServerConnect::decode_checked(&pre)?;
            ws.send(Message::Binary(make_hello(&nonce))).await.map_err(|e| lost(std::io::Error::other(e)))?;
            transport::ws_frames(ws)
        }
        Connected::Tcp(mut io) => {
            let nonce = protocol::read_server_connect(&mut io).await?;
            // A libtunnel relay answers the magic and hello (if only with a refusal); an Emissary
            // server takes the magic for a bad SOCKS5 version and hangs up.
            let classic_only = |e: std::io::Error| {
                Error::protocol(format!(
                    "the relay at {} sent Emissary's preamble, then closed the connection at libtunnel's multiplexed hello ({e}): it is an Emissary server (or another classic-only relay); {USE_CLASSIC}",
                    url.url
                ))
            };
            io.write_all(protocol::MUX_TCP_MAGIC).await.map_err(classic_only)?;
            let (mut source, mut sink) = transport::tcp_frames(io);
            sink.send(make_hello(&nonce)).await.map_err(classic_only)?;
            let answer = match source.next().await {
                Some(Ok(b)) => b,
                Some(Err(e)) => return Err(classic_only(e)),
                None => return Err(classic_only(std::io::ErrorKind::UnexpectedEof.into())),
            };
            return Ok((source, sink, answer));
        }
    };
    let answer = match source.next().await {
        Some(Ok(b)) => b,
        Some(Err(e)) => return Err(lost(e)),
        None => return Err(lost(std::io::ErrorKind::UnexpectedEof.into())),
    };
    Ok((source, sink, answer))
}
