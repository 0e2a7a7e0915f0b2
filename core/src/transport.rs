//! Transports: how bytes reach the relay. A WebSocket over TCP or TLS (`ws://`, `wss://`), or raw
//! TCP (`tcp://`, same bytes without WebSocket). TLS and WebSocket details live only here.
//!
//! Two views of a connected transport are offered: a byte stream ([`WsByteStream`], for
//! Emissary's classic mode where message boundaries mean nothing) and a frame source/sink (for the
//! multiplexed session, one frame per WebSocket message or per length-prefixed TCP record).

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::error::{Error, ErrorCode, Result};
use crate::mux::{FrameSink, FrameSource};

/// Anything the transports can run over.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}
/// A boxed transport byte stream (TCP or TLS).
pub type BoxIo = Box<dyn Io>;

/// How to switch a dialer to classic mode, in every face (the fix named by errors from a
/// classic-only relay).
pub(crate) const USE_CLASSIC: &str =
    "dial it in classic mode: `--classic` (CLI), `Mode::Classic` (Rust), `classic=True` (Python), `{classic: true}` (Node)";

/// Largest WebSocket message a classic-mode client accepts.
pub const MAX_MESSAGE: usize = 1024 * 1024;
/// Largest WebSocket message or TCP record of a multiplexed session: a mux frame is at most
/// 64 KiB + 5, a listener's registration a few KiB; the bound keeps a peer from making the
/// transport buffer a megabyte per message.
pub const MUX_MAX_MESSAGE: usize = 256 * 1024;
/// Classic mode writes at most this much per WebSocket message (Emissary's io.Copy chunk).
const CLASSIC_CHUNK: usize = 32 * 1024;

/// Largest WebSocket frame header (2 + 8 length + 4 mask bytes).
const WS_HEADER_MAX: usize = 14;

/// WebSocket limits for a multiplexed session (both ends). One WebSocket serves every stream, so
/// it keeps tungstenite's 128 KiB read buffer (fewer, larger reads).
pub fn ws_config() -> WebSocketConfig {
    limits(MUX_MAX_MESSAGE)
}

/// WebSocket limits with a chosen largest message (the relay's classic mode).
pub fn ws_config_with_limit(max_message: usize) -> WebSocketConfig {
    limits(max_message).read_buffer_size(CLASSIC_READ_BUFFER)
}

/// Classic mode runs one WebSocket per connection, and tungstenite allocates and touches its whole
/// read buffer up front: at the 128 KiB default an idle classic connection held ~150 KiB in each
/// process. Reading one classic message (32 KiB) at a time keeps throughput and cuts that to ~56 KiB.
const CLASSIC_READ_BUFFER: usize = CLASSIC_CHUNK + WS_HEADER_MAX;

/// Read buffer of the relay's WebSocket codec (both modes). tungstenite allocates it up front and
/// zero-fills it before every read, so it is kept small: 4 KiB holds any hello, and an
/// unauthenticated connection costs that, not the 128 KiB default. A larger frame still arrives
/// whole (the codec reserves room for each frame it has a header for); after authentication,
/// [`GrowingReads`] below it reads the socket in large chunks, so throughput does not suffer.
pub const SERVER_WS_READ_BUFFER: usize = 4 * 1024;

/// Socket reads of an authenticated multiplexed session on the relay (one transport serves every
/// stream: few, large reads).
pub const MUX_READ_AHEAD: usize = 128 * 1024;

/// Socket reads of an authenticated classic-mode connection on the relay: one classic message.
pub const CLASSIC_READ_AHEAD: usize = CLASSIC_READ_BUFFER;

/// WebSocket limits for the relay's side of a connection: a small codec read buffer (see
/// [`SERVER_WS_READ_BUFFER`]); wrap the transport in [`GrowingReads`] to keep large reads.
pub fn ws_server_config(max_message: usize) -> WebSocketConfig {
    limits(max_message).read_buffer_size(SERVER_WS_READ_BUFFER)
}

/// A relay-side transport whose reads go straight to the socket (no buffer of its own) until
/// `grown` turns true, the moment the peer authenticates; from then on it reads the socket
/// `size` bytes at a time into a buffer allocated then, and serves the codec's small reads from
/// it. So an unauthenticated connection holds no read-ahead buffer, and an authenticated one
/// makes as few read calls as with a large codec buffer.
pub struct GrowingReads {
    io: BoxIo,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    size: usize,
    grown: Arc<std::sync::atomic::AtomicBool>,
}

impl GrowingReads {
    /// Wrap `io`; reads grow to `size` bytes once `grown` is set.
    pub fn new(io: BoxIo, size: usize, grown: Arc<std::sync::atomic::AtomicBool>) -> GrowingReads {
        GrowingReads { io, buf: Vec::new(), start: 0, end: 0, size, grown }
    }
}

impl AsyncRead for GrowingReads {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.start == this.end {
            if out.remaining() >= this.size || !this.grown.load(std::sync::atomic::Ordering::Relaxed) {
                return Pin::new(&mut this.io).poll_read(cx, out);
            }
            if this.buf.is_empty() {
                this.buf = vec![0; this.size];
            }
            let mut rb = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
            (this.start, this.end) = (0, rb.filled().len());
        }
        let n = (this.end - this.start).min(out.remaining());
        out.put_slice(&this.buf[this.start..this.start + n]);
        this.start += n;
        Poll::Ready(Ok(()))
    }
}

/// `AsyncWrite` for a read-side wrapper: every write call goes straight to its `io` field.
macro_rules! write_through_to_io {
    ($ty:ty $(, $g:ident: $($b:tt)+)?) => {
        impl$(<$g: $($b)+>)? AsyncWrite for $ty {
            fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.io).poll_write(cx, buf)
            }
            fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
                Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
            }
            fn is_write_vectored(&self) -> bool {
                self.io.is_write_vectored()
            }
            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.io).poll_flush(cx)
            }
            fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut self.io).poll_shutdown(cx)
            }
        }
    };
}

write_through_to_io!(GrowingReads);

/// Read an HTTP/1.1 request head (through its blank line) into a buffer that grows with what
/// arrives, at most `max` bytes (then what came so far: the HTTP server answers an oversized
/// head). A client that sends its head slowly holds only the bytes it sent, not an HTTP server's
/// buffers; `None` when the client closed or failed first.
pub async fn read_request_head<R: AsyncRead + Unpin>(io: &mut R, max: usize) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut head: Vec<u8> = Vec::new();
    let mut scanned: usize = 0;
    loop {
        if head.len() == head.capacity() {
            head.reserve((head.capacity().max(512)).min(max.saturating_sub(head.len())).max(1));
        }
        let n = io.read_buf(&mut head).await.ok()?;
        if n == 0 {
            return None;
        }
        // Only the new bytes (and the three before them) can complete the blank line.
        let from = scanned.saturating_sub(3);
        if head[from..].windows(4).any(|w| w == b"\r\n\r\n") || head.len() >= max {
            return Some(head);
        }
        scanned = head.len();
    }
}

/// A byte stream whose first reads return `prefix` (bytes already read from it).
pub struct Prefixed<T> {
    prefix: Vec<u8>,
    pos: usize,
    io: T,
}

impl<T> Prefixed<T> {
    /// Replay `prefix`, then read `io`.
    pub fn new(prefix: Vec<u8>, io: T) -> Prefixed<T> {
        Prefixed { prefix, pos: 0, io }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(out.remaining());
            out.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, out)
    }
}

write_through_to_io!(Prefixed<T>, T: AsyncWrite + Unpin);

fn limits(max_message: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
        .write_buffer_size(128 * 1024)
        .max_write_buffer_size(4 * MAX_MESSAGE)
}

/// Unsent bytes a session's TCP socket may hold. Without a cap the kernel queues megabytes (its
/// send buffer grows to the link's bandwidth-delay product), and every frame of every stream waits
/// behind them, whatever the session's round-robin sender decides; with it, data waits in the
/// session's per-stream queues, where an interactive stream overtakes a bulk one. 128 KiB is about
/// 1 ms at 1 Gbit/s, plenty to keep the link busy.
const NOTSENT_LOWAT: u32 = 128 * 1024;

/// Socket options for a TCP connection that carries a session (either end): no Nagle delay, and
/// a small unsent queue in the kernel (`NOTSENT_LOWAT`).
pub fn tune_session_socket(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = socket2::SockRef::from(tcp).set_tcp_notsent_lowat(NOTSENT_LOWAT);
}

/// Which transport a relay URL asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// WebSocket over TCP.
    Ws,
    /// WebSocket over TLS.
    Wss,
    /// Raw TCP.
    Tcp,
}

/// A parsed relay URL.
#[derive(Debug, Clone)]
pub struct RelayUrl {
    /// Transport.
    pub scheme: Scheme,
    /// Host to connect to (and TLS server name).
    pub host: String,
    /// Port.
    pub port: u16,
    /// The URL as given (the WebSocket request target).
    pub url: url::Url,
}

impl RelayUrl {
    /// Parse `ws://`, `wss://` or `tcp://` URLs.
    pub fn parse(s: &str) -> Result<RelayUrl> {
        let url = url::Url::parse(s.trim())
            .map_err(|e| Error::argument(format!("relay URL {s:?} is not a URL ({e}); write it like ws://relay.example:7835")))?;
        let scheme = match url.scheme() {
            "ws" | "http" => Scheme::Ws,
            "wss" | "https" => Scheme::Wss,
            "tcp" => Scheme::Tcp,
            other => return Err(Error::argument(format!("relay URL scheme {other:?} is not supported; use ws://, wss:// or tcp://"))),
        };
        let host = url
            .host_str()
            .ok_or_else(|| Error::argument(format!("relay URL {s:?} has no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = url.port_or_known_default().or(match scheme {
            Scheme::Ws => Some(80),
            Scheme::Wss => Some(443),
            Scheme::Tcp => None,
        });
        let port = port.ok_or_else(|| Error::argument(format!("relay URL {s:?} needs a port (tcp://host:port)")))?;
        let mut url = url;
        if url.scheme() == "http" {
            let _ = url.set_scheme("ws");
        } else if url.scheme() == "https" {
            let _ = url.set_scheme("wss");
        }
        Ok(RelayUrl { scheme, host, port, url })
    }
}

/// TLS trust for `wss://` relays.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ClientTls {
    /// Trust the public Web PKI (Mozilla's roots).
    pub fn webpki() -> ClientTls {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        ClientTls::from_roots(roots)
    }

    /// Trust only the certificates in a PEM bundle: a private CA, or the relay's own (self-signed)
    /// certificate, which is then matched exactly (see `tls_pin`).
    pub fn from_pem(pem: &[u8]) -> Result<ClientTls> {
        let mut roots = rustls::RootCertStore::empty();
        let mut pinned = Vec::new();
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| Error::config(format!("CA bundle is not valid PEM: {e}")))?;
            roots.add(cert.clone()).map_err(|e| Error::config(format!("CA certificate rejected: {e}")))?;
            pinned.push(cert);
        }
        if roots.is_empty() {
            return Err(Error::config("the CA bundle holds no certificate"));
        }
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| Error::config(format!("the CA bundle cannot be used: {e}")))?;
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(crate::tls_pin::BundleVerifier::new(webpki, pinned)))
            .with_no_client_auth();
        Ok(ClientTls { config: Arc::new(config) })
    }

    /// [`ClientTls::from_pem`] from a file.
    pub fn from_pem_file(path: &Path) -> Result<ClientTls> {
        let pem = std::fs::read(path).map_err(|e| Error::config(format!("cannot read CA file {}: {e}", path.display())))?;
        ClientTls::from_pem(&pem)
    }

    fn from_roots(roots: rustls::RootCertStore) -> ClientTls {
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        ClientTls { config: Arc::new(config) }
    }
}

/// Load a relay's TLS certificate chain and key (PEM files).
pub fn server_tls(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| Error::config(format!("cannot read TUNNEL_TLS_CERT {}: {e}", cert.display())))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::config(format!("TUNNEL_TLS_CERT {} is not valid PEM: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(Error::config(format!("TUNNEL_TLS_CERT {} holds no certificate", cert.display())));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| Error::config(format!("TUNNEL_TLS_KEY {} holds no usable private key: {e}", key.display())))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::config(format!("TLS certificate and key do not fit together: {e}")))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// A transport connected to the relay, before any libtunnel bytes.
// Built once per connection and unpacked at once: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Connected {
    /// A WebSocket; `bool` says whether the relay accepted the multiplexed subprotocol.
    Ws(WebSocketStream<BoxIo>, bool),
    /// Raw TCP (or TLS over TCP).
    Tcp(BoxIo),
}

fn unavailable(url: &RelayUrl, e: impl std::fmt::Display) -> Error {
    Error::new(ErrorCode::RelayUnavailable, format!("cannot reach the relay at {}: {e}; check that it runs and that the URL is right", url.url))
}

/// A failed TLS handshake with the relay, with the fix for the usual causes: a certificate the
/// client does not trust (`--ca`), one for another name, or a relay that does not speak TLS there.
fn tls_failure(url: &RelayUrl, e: io::Error) -> Error {
    let why = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let hint = match why {
        Some(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. },
        )) => {
            format!("the relay's certificate is not valid for {}; use the name it was issued for in the URL", url.host)
        }
        Some(rustls::Error::InvalidCertificate(_)) => "the relay's certificate is not trusted; if it comes from a private CA or is \
             self-signed, pass that CA or certificate (PEM) with --ca FILE / TUNNEL_CA (the `ca` option of the bindings)"
            .to_string(),
        Some(rustls::Error::InvalidMessage(_)) | Some(rustls::Error::InappropriateMessage { .. }) => {
            "the relay does not speak TLS on that port; if it is a plain relay, use ws:// (or tcp://) instead of wss://".to_string()
        }
        _ if matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset) => {
            "the relay closed the connection in the TLS handshake; if it is a plain relay, use ws:// (or tcp://) instead of wss://".to_string()
        }
        _ => "check that it runs and that the URL is right".to_string(),
    };
    Error::new(ErrorCode::RelayUnavailable, format!("TLS handshake with the relay at {} failed ({e}): {hint}", url.url))
}

/// Open the transport to a relay; `mux` asks for the multiplexed subprotocol.
pub async fn connect(url: &RelayUrl, mux: bool, tls: Option<&ClientTls>) -> Result<Connected> {
    let tcp = TcpStream::connect((url.host.as_str(), url.port)).await.map_err(|e| unavailable(url, e))?;
    tune_session_socket(&tcp);
    let io: BoxIo = match url.scheme {
        Scheme::Wss => {
            let tls = tls.cloned().unwrap_or_else(ClientTls::webpki);
            let name =
                ServerName::try_from(url.host.clone()).map_err(|_| Error::argument(format!("{:?} is not a valid TLS server name", url.host)))?;
            let conn = tokio_rustls::TlsConnector::from(tls.config).connect(name, tcp).await.map_err(|e| tls_failure(url, e))?;
            Box::new(conn)
        }
        _ => Box::new(tcp),
    };
    if url.scheme == Scheme::Tcp {
        return Ok(Connected::Tcp(io));
    }
    use tungstenite::client::IntoClientRequest;
    let mut req = url.url.as_str().into_client_request().map_err(|e| Error::argument(format!("bad relay URL: {e}")))?;
    if mux {
        req.headers_mut().insert(http::header::SEC_WEBSOCKET_PROTOCOL, http::HeaderValue::from_static(crate::protocol::MUX_SUBPROTOCOL));
    }
    let config = if mux { ws_config() } else { ws_config_with_limit(MAX_MESSAGE) };
    match tokio_tungstenite::client_async_with_config(req, io, Some(config)).await {
        Ok((ws, resp)) => {
            let chosen = resp
                .headers()
                .get(http::header::SEC_WEBSOCKET_PROTOCOL)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v == crate::protocol::MUX_SUBPROTOCOL);
            Ok(Connected::Ws(ws, chosen))
        }
        Err(tungstenite::Error::Protocol(tungstenite::error::ProtocolError::SecWebSocketSubProtocolError(_))) => Err(Error::protocol(format!(
            "the relay at {} does not speak libtunnel's multiplexed mode (it may be an Emissary server); {}",
            url.url,
            USE_CLASSIC
        ))),
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
            let code = if resp.status() == http::StatusCode::BAD_REQUEST { ErrorCode::Protocol } else { ErrorCode::RelayUnavailable };
            Err(Error::new(code, format!("the relay at {} refused the WebSocket upgrade with HTTP {}: {}", url.url, resp.status(), body.trim())))
        }
        Err(e) => Err(unavailable(url, format!("WebSocket handshake failed ({e})"))),
    }
}

fn ws_err(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "the WebSocket is closed")
        }
        tungstenite::Error::Capacity(c) => io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "oversized WebSocket message ({c}); libtunnel peers send at most 1 MiB per message (the relay streams classic messages of any size)"
            ),
        ),
        // The peer went away without the closing handshake: a reset, not a protocol violation.
        tungstenite::Error::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake) => {
            io::Error::new(io::ErrorKind::ConnectionReset, "the peer closed the WebSocket without a closing handshake")
        }
        e => io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
    }
}

/// A WebSocket seen as a byte stream (Emissary's classic data phase): every write becomes one
/// binary message, incoming messages of any type are concatenated. Optionally pings the peer
/// while it is being read (Emissary's client pings every 30 s).
pub struct WsByteStream {
    ws: WebSocketStream<BoxIo>,
    pending: Bytes,
    eof: bool,
    ping: Option<tokio::time::Interval>,
    /// Our Close frame was queued.
    close_sent: bool,
}

impl WsByteStream {
    /// Wrap a WebSocket; `ping_every` enables client keepalive pings.
    pub fn new(ws: WebSocketStream<BoxIo>, ping_every: Option<Duration>) -> WsByteStream {
        let ping = ping_every.map(|d| {
            let mut i = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        WsByteStream { ws, pending: Bytes::new(), eof: false, ping, close_sent: false }
    }

    /// Read one whole message (used for the preamble).
    pub async fn read_message(&mut self) -> io::Result<Bytes> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Binary(b))) => return Ok(b),
                Some(Ok(Message::Text(t))) => return Ok(Bytes::from(t)),
                Some(Ok(Message::Close(_))) | None => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the relay closed the WebSocket")),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(ws_err(e)),
            }
        }
    }

    /// Send one whole message.
    pub async fn write_message(&mut self, b: Bytes) -> io::Result<()> {
        self.ws.send(Message::Binary(b)).await.map_err(ws_err)
    }

    fn poll_keepalive(&mut self, cx: &mut Context<'_>) {
        let Some(ping) = self.ping.as_mut() else {
            return;
        };
        if ping.poll_tick(cx).is_ready() {
            let ws = Pin::new(&mut self.ws);
            if let Poll::Ready(Ok(())) = Sink::<Message>::poll_ready(ws, cx) {
                let _ = Pin::new(&mut self.ws).start_send(Message::Ping(Bytes::new()));
                let _ = Sink::<Message>::poll_flush(Pin::new(&mut self.ws), cx);
            }
        }
    }
}

impl AsyncRead for WsByteStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.poll_keepalive(cx);
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.ws.poll_next_unpin(cx)) {
                Some(Ok(Message::Binary(b))) => this.pending = b,
                Some(Ok(Message::Text(t))) => this.pending = Bytes::from(t),
                Some(Ok(Message::Close(_))) | None => this.eof = true,
                Some(Ok(_)) => {}
                Some(Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed)) => this.eof = true,
                Some(Err(e)) => return Poll::Ready(Err(ws_err(e))),
            }
        }
    }
}

impl AsyncWrite for WsByteStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.eof {
            // The peer closed the tunnel (no half-close in classic mode): nobody will read this.
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "the peer closed the classic-mode tunnel")));
        }
        ready!(Sink::<Message>::poll_ready(Pin::new(&mut this.ws), cx)).map_err(ws_err)?;
        let n = buf.len().min(CLASSIC_CHUNK);
        Pin::new(&mut this.ws).start_send(Message::Binary(Bytes::copy_from_slice(&buf[..n]))).map_err(ws_err)?;
        // Push it out now if the socket takes it; callers that never flush still make progress.
        if let Poll::Ready(Err(e)) = Sink::<Message>::poll_flush(Pin::new(&mut this.ws), cx) {
            return Poll::Ready(Err(ws_err(e)));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Sink::<Message>::poll_flush(Pin::new(&mut self.ws), cx).map_err(ws_err)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // WebSocket has no half-close: finishing our side closes the tunnel (Emissary does the
        // same), with Close 1000 as Emissary sends it (a Close without a code reads as an error
        // on Emissary's side).
        if !self.close_sent {
            match ready!(Sink::<Message>::poll_ready(Pin::new(&mut self.ws), cx)) {
                Ok(()) => {
                    let normal =
                        tungstenite::protocol::CloseFrame { code: tungstenite::protocol::frame::coding::CloseCode::Normal, reason: "".into() };
                    let _ = Pin::new(&mut self.ws).start_send(Message::Close(Some(normal)));
                }
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {}
                Err(e) => return Poll::Ready(Err(ws_err(e))),
            }
            self.close_sent = true;
        }
        match ready!(Sink::<Message>::poll_close(Pin::new(&mut self.ws), cx)) {
            Ok(()) | Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(ws_err(e))),
        }
    }
}

struct WsSource(SplitStream<WebSocketStream<BoxIo>>);

impl Stream for WsSource {
    type Item = io::Result<Bytes>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            return Poll::Ready(match ready!(self.0.poll_next_unpin(cx)) {
                Some(Ok(Message::Binary(b))) => Some(Ok(b)),
                Some(Ok(Message::Text(_))) => Some(Err(io::Error::new(io::ErrorKind::InvalidData, "text message in a multiplexed session"))),
                Some(Ok(Message::Close(_))) | None => None,
                Some(Ok(_)) => continue,
                Some(Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed)) => None,
                Some(Err(e)) => Some(Err(ws_err(e))),
            });
        }
    }
}

struct WsSink(SplitSink<WebSocketStream<BoxIo>, Message>);

impl Sink<Bytes> for WsSink {
    type Error = io::Error;
    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_ready_unpin(cx).map_err(ws_err)
    }
    fn start_send(mut self: Pin<&mut Self>, item: Bytes) -> io::Result<()> {
        self.0.start_send_unpin(Message::Binary(item)).map_err(ws_err)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.poll_flush_unpin(cx).map_err(ws_err)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(self.0.poll_close_unpin(cx)) {
            Ok(()) | Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(ws_err(e))),
        }
    }
}

/// Frames over a WebSocket: one frame per binary message.
pub fn ws_frames(ws: WebSocketStream<BoxIo>) -> (FrameSource, FrameSink) {
    let (sink, stream) = ws.split();
    (Box::pin(WsSource(stream)), Box::pin(WsSink(sink)))
}

/// Frames over raw TCP: each frame is prefixed with its `u32` big-endian length.
pub fn tcp_frames(io: BoxIo) -> (FrameSource, FrameSink) {
    let codec = LengthDelimitedCodec::builder().max_frame_length(MUX_MAX_MESSAGE).new_codec();
    let (sink, stream) = Framed::new(io, codec).split();
    let source = stream.map(|r| r.map(|b| b.freeze()));
    (Box::pin(source), Box::pin(sink))
}

/// Accept the next connection; on errors (EMFILE and friends) log, back off 50 ms and retry
/// instead of spinning. Shared by every accept loop (forwards, the SOCKS proxy, the relay).
pub(crate) async fn accept_backoff(listener: &tokio::net::TcpListener) -> (tokio::net::TcpStream, std::net::SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(x) => return x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; retrying in 50 ms");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_urls() {
        let u = RelayUrl::parse("ws://127.0.0.1:7835/tunnel").unwrap();
        assert_eq!((u.scheme, u.host.as_str(), u.port), (Scheme::Ws, "127.0.0.1", 7835));
        let u = RelayUrl::parse("wss://relay.example").unwrap();
        assert_eq!((u.scheme, u.port), (Scheme::Wss, 443));
        let u = RelayUrl::parse("tcp://[::1]:9000").unwrap();
        assert_eq!((u.scheme, u.host.as_str(), u.port), (Scheme::Tcp, "::1", 9000));
        assert!(RelayUrl::parse("tcp://host").unwrap_err().message().contains("port"));
        assert!(RelayUrl::parse("ftp://x:1").unwrap_err().message().contains("ws://"));
        assert!(RelayUrl::parse("not a url").is_err());
    }
}
