//! Transports: how bytes reach the relay. A WebSocket over TCP or TLS (`ws://`, `wss://`), raw
//! TCP (`tcp://`, same bytes without WebSocket), or a gRPC call over HTTP/2 (`grpc://`,
//! `grpcs://`, in [`grpc`]). TLS, WebSocket and HTTP/2 details live only here.
//!
//! Two views of a connected transport are offered: a byte stream ([`WsByteStream`], for
//! Emissary's classic mode where message boundaries mean nothing) and a frame source/sink (for the
//! multiplexed session, one frame per WebSocket message or per length-prefixed TCP record).

pub mod grpc;
pub mod proxy;
pub mod quic;

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
    /// A gRPC call over HTTP/2 over TCP (prior knowledge).
    Grpc,
    /// A gRPC call over HTTP/2 over TLS (ALPN `h2`).
    Grpcs,
    /// QUIC (always TLS 1.3), each tunnel stream a QUIC stream.
    Quic,
}

impl Scheme {
    /// Whether the transport runs over TLS to the relay.
    pub fn is_tls(self) -> bool {
        matches!(self, Scheme::Wss | Scheme::Grpcs | Scheme::Quic)
    }

    /// Whether the transport is a gRPC call.
    pub fn is_grpc(self) -> bool {
        matches!(self, Scheme::Grpc | Scheme::Grpcs)
    }
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
    /// The upstream proxy to reach it through ([`proxy`]; chosen by `client::proxy`), if any.
    pub proxy: Option<Arc<proxy::ProxyUrl>>,
}

impl RelayUrl {
    /// Parse `ws://`, `wss://`, `tcp://`, `grpc://`, `grpcs://` or `quic://` URLs.
    pub fn parse(s: &str) -> Result<RelayUrl> {
        let url = url::Url::parse(s.trim())
            .map_err(|e| Error::argument(format!("relay URL {s:?} is not a URL ({e}); write it like ws://relay.example:7835")))?;
        let scheme = match url.scheme() {
            "ws" | "http" => Scheme::Ws,
            "wss" | "https" => Scheme::Wss,
            "tcp" => Scheme::Tcp,
            "grpc" => Scheme::Grpc,
            "grpcs" => Scheme::Grpcs,
            "quic" => Scheme::Quic,
            other => {
                return Err(Error::argument(format!(
                    "relay URL scheme {other:?} is not supported; use ws://, wss://, tcp://, grpc://, grpcs:// or quic://"
                )))
            }
        };
        let host = url
            .host_str()
            .ok_or_else(|| Error::argument(format!("relay URL {s:?} has no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = url.port_or_known_default().or(match scheme {
            Scheme::Ws | Scheme::Grpc => Some(80),
            Scheme::Wss | Scheme::Grpcs | Scheme::Quic => Some(443),
            Scheme::Tcp => None,
        });
        let port = port.ok_or_else(|| Error::argument(format!("relay URL {s:?} needs a port (tcp://host:port)")))?;
        let mut url = url;
        if url.scheme() == "http" {
            let _ = url.set_scheme("ws");
        } else if url.scheme() == "https" {
            let _ = url.set_scheme("wss");
        }
        Ok(RelayUrl { scheme, host, port, url, proxy: None })
    }
}

/// TLS trust for `wss://` relays.
#[derive(Clone)]
pub struct ClientTls {
    pub(crate) config: Arc<rustls::ClientConfig>,
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
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| Error::config(format!("TLS certificate and key do not fit together: {e}")))?;
    // HTTP/2 for `grpcs://` clients; WebSocket clients offer no ALPN or `http/1.1`.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
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

pub(crate) fn unavailable(url: &RelayUrl, e: impl std::fmt::Display) -> Error {
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
    if url.scheme.is_grpc() {
        // The multiplexed session goes through `grpc::connect`; classic mode is Emissary's
        // WebSocket protocol.
        return Err(Error::argument(format!(
            "{} is a gRPC relay URL, which carries multiplexed sessions only; classic mode (Emissary's protocol) needs ws:// or wss://",
            url.url
        )));
    }
    if url.scheme == Scheme::Quic {
        return Err(Error::argument(format!(
            "{} is a QUIC relay URL, which carries multiplexed sessions only; classic mode (Emissary's protocol) needs ws:// or wss://",
            url.url
        )));
    }
    let io = open(url, tls).await?;
    if url.scheme == Scheme::Tcp {
        return Ok(Connected::Tcp(io));
    }
    let (ws, chosen) = upgrade(url, io, mux).await?;
    Ok(Connected::Ws(ws, chosen))
}

/// The TCP (and TLS, for `wss://` and `grpcs://`) connection to a relay, directly or through its
/// upstream proxy. TLS for `grpcs://` offers ALPN `h2` only.
async fn open(url: &RelayUrl, tls: Option<&ClientTls>) -> Result<BoxIo> {
    let tcp = proxy::open(url, tls).await?;
    if !url.scheme.is_tls() {
        return Ok(Box::new(tcp));
    }
    let mut config = tls.cloned().unwrap_or_else(ClientTls::webpki).config;
    if url.scheme == Scheme::Grpcs {
        let mut h2 = (*config).clone();
        h2.alpn_protocols = vec![b"h2".to_vec()];
        config = Arc::new(h2);
    }
    let name = ServerName::try_from(url.host.clone()).map_err(|_| Error::argument(format!("{:?} is not a valid TLS server name", url.host)))?;
    let conn = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(|e| tls_failure(url, e))?;
    if url.scheme == Scheme::Grpcs && conn.get_ref().1.alpn_protocol() != Some(b"h2") {
        return Err(unavailable(url, "the TLS server there did not agree to HTTP/2 (ALPN h2); a grpcs:// relay URL needs a relay or proxy that serves gRPC, otherwise use wss://"));
    }
    Ok(Box::new(conn))
}

/// The WebSocket upgrade on `io` (`mux` offers the multiplexed subprotocol): the WebSocket and
/// whether the relay chose that subprotocol.
async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(url: &RelayUrl, io: S, mux: bool) -> Result<(WebSocketStream<S>, bool)> {
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
            Ok((ws, chosen))
        }
        Err(tungstenite::Error::Protocol(tungstenite::error::ProtocolError::SecWebSocketSubProtocolError(_))) => Err(Error::protocol(format!(
            "the relay at {} does not speak libtunnel's multiplexed mode (it may be an Emissary server); {}",
            url.url, USE_CLASSIC
        ))),
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
            let code = if resp.status() == http::StatusCode::BAD_REQUEST { ErrorCode::Protocol } else { ErrorCode::RelayUnavailable };
            Err(Error::new(code, format!("the relay at {} refused the WebSocket upgrade with HTTP {}: {}", url.url, resp.status(), body.trim())))
        }
        // An answer that is not HTTP/1.x at all: most often an HTTP/2-only port (nginx with
        // `listen ... http2` and `grpc_pass` answers a SETTINGS and a GOAWAY frame).
        Err(e @ tungstenite::Error::Protocol(tungstenite::error::ProtocolError::HttparseError(_))) => Err(Error::new(
            ErrorCode::RelayUnavailable,
            format!(
                "WebSocket handshake with the relay at {} failed ({e}): the server there does not answer in HTTP/1.1; \
                 if it is an HTTP/2-only port (a gRPC proxy such as nginx with grpc_pass, or a relay's gRPC endpoint), use grpc:// (grpcs:// with TLS)",
                url.url
            ),
        )),
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

// ---------------------------------------------------------------------------------------------
// The client's multiplexed WebSocket after the upgrade
// ---------------------------------------------------------------------------------------------

/// A client transport during tungstenite's upgrade handshake that hands tungstenite the bytes of
/// the relay's response head and nothing after it: what follows (the preamble, maybe more) stays
/// here, for [`ws_client_frames`] to read once the handshake is done.
struct UntilHead {
    io: Option<BoxIo>,
    /// Bytes read so far, and where the response head ends once that is known.
    read: Vec<u8>,
    head_end: Option<usize>,
    /// Bytes of the head handed to tungstenite.
    served: usize,
}

impl UntilHead {
    fn new(io: BoxIo) -> UntilHead {
        UntilHead { io: Some(io), read: Vec::new(), head_end: None, served: 0 }
    }

    /// The transport and the bytes read after the response head.
    fn take(&mut self) -> Option<(BoxIo, Vec<u8>)> {
        let end = self.head_end?;
        Some((self.io.take()?, self.read.split_off(end)))
    }

    fn io(&mut self) -> io::Result<&mut BoxIo> {
        self.io.as_mut().ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "the transport was taken"))
    }
}

impl AsyncRead for UntilHead {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.head_end.is_none() {
            let mut chunk = [0u8; 2048];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(this.io()?).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                // The relay closed: let tungstenite see the end (and say so).
                let n = (this.read.len() - this.served).min(out.remaining());
                out.put_slice(&this.read[this.served..this.served + n]);
                this.served += n;
                return Poll::Ready(Ok(()));
            }
            let from = this.read.len().saturating_sub(3);
            this.read.extend_from_slice(rb.filled());
            this.head_end = this.read[from..].windows(4).position(|w| w == b"\r\n\r\n").map(|p| from + p + 4);
        }
        let end = this.head_end.expect("found");
        if this.served == end {
            // tungstenite stops reading once the head is complete; a read past it would take
            // frames meant for `ws_client_frames`.
            return Poll::Pending;
        }
        let n = (end - this.served).min(out.remaining());
        out.put_slice(&this.read[this.served..this.served + n]);
        this.served += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for UntilHead {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(self.io()?).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.io()?).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.io()?).poll_shutdown(cx)
    }
}

/// Upgrade `io` to the multiplexed WebSocket (tungstenite checks the handshake) and return its
/// frames, read and written by [`ws_client_frames`]; `None` when the relay did not choose the
/// multiplexed subprotocol.
pub(crate) async fn connect_ws_mux(url: &RelayUrl, tls: Option<&ClientTls>) -> Result<Option<(FrameSource, FrameSink)>> {
    let io = open(url, tls).await?;
    let (mut ws, chosen) = upgrade(url, UntilHead::new(io), true).await?;
    if !chosen {
        return Ok(None);
    }
    let (io, rest) = ws.get_mut().take().ok_or_else(|| unavailable(url, "the WebSocket handshake ended early"))?;
    Ok(Some(ws_client_frames(io, rest)))
}

/// Frames of the client's multiplexed WebSocket, without tungstenite's codec: messages are read
/// into one growing buffer (no zero-fill before each read) and cut out of it without a copy;
/// frames are written as header + payload with vectored writes, masked in place (a copy only if
/// the payload is shared). `rest` holds bytes already read after the upgrade's answer.
fn ws_client_frames(io: BoxIo, rest: Vec<u8>) -> (FrameSource, FrameSink) {
    let (r, w) = tokio::io::split(io);
    let reader = WsReader { io: r, buf: bytes::BytesMut::from(&rest[..]), done: false, head: None };
    let writer = WsWriter { io: w, queue: std::collections::VecDeque::new(), queued: 0, close_sent: false };
    (Box::pin(reader), Box::pin(writer))
}

/// Socket reads of the client's WebSocket: one transport carries every stream (few, large reads).
const WS_CLIENT_READ: usize = 128 * 1024;

struct WsReader {
    io: tokio::io::ReadHalf<BoxIo>,
    buf: bytes::BytesMut,
    done: bool,
    /// The upgrade's answer, still to be read and checked before the first frame (early hello).
    head: Option<AnswerCheck>,
}

/// What a relay made of an early hello ([`crate::protocol::EARLY_HELLO_HEADER`]), read off its
/// answer to the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EarlyAnswer {
    /// It judged the hello; its answer is the session's first message.
    Taken,
    /// It declined to judge it (it then closes): sign its nonce on a new connection.
    Declined,
    /// A multiplexed 101 without the header: the relay predates early hellos.
    Absent,
    /// No multiplexed 101 at all (an HTTP error, another subprotocol, a closed connection).
    Failed,
}

struct AnswerCheck {
    /// The `Sec-WebSocket-Accept` the relay must send.
    accept: String,
    answer: tokio::sync::watch::Sender<Option<EarlyAnswer>>,
}

/// The largest upgrade answer the client reads.
const ANSWER_HEAD_MAX: usize = 16 * 1024;

/// Upgrade to the multiplexed WebSocket with an early hello: the request (with `early_hello` as
/// [`crate::protocol::EARLY_HELLO_HEADER`]) is written and the frames are returned at once, so the
/// session's first frames follow the request without waiting for its answer. The returned
/// receiver tells what the relay made of the early hello once its answer is read (checked as
/// tungstenite would: 101, `Sec-WebSocket-Accept`, the subprotocol); the frames start after it.
pub(crate) async fn connect_ws_mux_early(
    url: &RelayUrl,
    tls: Option<&ClientTls>,
    early_hello: &str,
) -> Result<(FrameSource, FrameSink, tokio::sync::watch::Receiver<Option<EarlyAnswer>>)> {
    use tokio::io::AsyncWriteExt;
    let mut io = open(url, tls).await?;
    let key = tungstenite::handshake::client::generate_key();
    let u = &url.url;
    let target = match &u[url::Position::BeforePath..url::Position::AfterQuery] {
        "" => "/",
        t => t,
    };
    let host = &u[url::Position::BeforeHost..url::Position::AfterPort];
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: {}\r\n{}: {early_hello}\r\n\r\n",
        crate::protocol::MUX_SUBPROTOCOL,
        crate::protocol::EARLY_HELLO_HEADER,
    );
    io.write_all(request.as_bytes()).await.map_err(|e| unavailable(url, e))?;
    io.flush().await.map_err(|e| unavailable(url, e))?;
    let (tx, rx) = tokio::sync::watch::channel(None);
    let (r, w) = tokio::io::split(io);
    let check = AnswerCheck { accept: tungstenite::handshake::derive_accept_key(key.as_bytes()), answer: tx };
    let reader = WsReader { io: r, buf: bytes::BytesMut::with_capacity(4096), done: false, head: Some(check) };
    let writer = WsWriter { io: w, queue: std::collections::VecDeque::new(), queued: 0, close_sent: false };
    Ok((Box::pin(reader), Box::pin(writer), rx))
}

impl AnswerCheck {
    /// Check the upgrade's answer `head` (through its blank line).
    fn check(&self, head: &[u8]) -> std::result::Result<(), (EarlyAnswer, String)> {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let failed = |why: String| (EarlyAnswer::Failed, why);
        match resp.parse(head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => return Err(failed("a truncated answer to the WebSocket upgrade".into())),
            Err(e) => return Err(failed(format!("a malformed answer to the WebSocket upgrade ({e})"))),
        }
        if resp.code != Some(101) {
            return Err(failed(format!("HTTP {} instead of the WebSocket upgrade", resp.code.unwrap_or(0))));
        }
        let header = |name: &str| resp.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value);
        if header("sec-websocket-accept") != Some(self.accept.as_bytes()) {
            return Err(failed("a WebSocket upgrade answer with a wrong Sec-WebSocket-Accept".into()));
        }
        if header("sec-websocket-protocol") != Some(crate::protocol::MUX_SUBPROTOCOL.as_bytes()) {
            return Err(failed(format!("a WebSocket upgrade without the {} subprotocol", crate::protocol::MUX_SUBPROTOCOL)));
        }
        match header(crate::protocol::EARLY_HELLO_HEADER) {
            Some(v) if v == crate::protocol::EARLY_TAKEN.as_bytes() => Ok(()),
            Some(v) if v == crate::protocol::EARLY_DECLINED.as_bytes() => Err((EarlyAnswer::Declined, "the relay declined the early hello".into())),
            _ => Err((EarlyAnswer::Absent, "the relay does not take early hellos".into())),
        }
    }

    /// Read and check the answer at the front of `buf`: `Ok(true)` once it is taken off, `Ok(false)`
    /// while it is incomplete.
    fn take_answer(&self, buf: &mut bytes::BytesMut) -> io::Result<bool> {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4) else {
            if buf.len() > ANSWER_HEAD_MAX {
                self.answer.send_replace(Some(EarlyAnswer::Failed));
                return Err(invalid(format!("the relay's answer to the WebSocket upgrade is over {ANSWER_HEAD_MAX} bytes")));
            }
            return Ok(false);
        };
        let verdict = self.check(&buf[..end]);
        buf.advance(end);
        match verdict {
            Ok(()) => {
                self.answer.send_replace(Some(EarlyAnswer::Taken));
                Ok(true)
            }
            Err((answer, why)) => {
                self.answer.send_replace(Some(answer));
                Err(io::Error::new(io::ErrorKind::ConnectionRefused, why))
            }
        }
    }
}

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

impl WsReader {
    /// The next whole frame in `buf`: `Ok(None)` until it has arrived.
    fn parse(&mut self) -> io::Result<Option<(u8, Bytes)>> {
        let b = &self.buf[..];
        if b.len() < 2 {
            return Ok(None);
        }
        let (fin, rsv, opcode) = (b[0] & 0x80 != 0, b[0] & 0x70, b[0] & 0x0f);
        if b[1] & 0x80 != 0 {
            return Err(invalid("the relay sent a masked WebSocket frame".into()));
        }
        let (len, head) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")), 10),
            126 | 127 => return Ok(None),
            n => (u64::from(n), 2),
        };
        if !fin || rsv != 0 {
            return Err(invalid("the relay sent a fragmented or extended WebSocket frame in a multiplexed session".into()));
        }
        if len > MUX_MAX_MESSAGE as u64 {
            return Err(invalid(format!(
                "oversized WebSocket message ({len} bytes, at most {MUX_MAX_MESSAGE}); libtunnel peers send at most 1 MiB per message (the relay streams classic messages of any size)"
            )));
        }
        let total = head + len as usize;
        if self.buf.len() < total {
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(head);
        Ok(Some((opcode, self.buf.split_to(len as usize).freeze())))
    }
}

impl Stream for WsReader {
    type Item = io::Result<Bytes>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let parsed = match &this.head {
                None => this.parse(),
                Some(check) => match check.take_answer(&mut this.buf) {
                    Ok(true) => {
                        this.head = None;
                        continue;
                    }
                    Ok(false) => Ok(None),
                    Err(e) => Err(e),
                },
            };
            match parsed {
                Err(e) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Ok(Some((0x2, payload))) => return Poll::Ready(Some(Ok(payload))),
                Ok(Some((0x8, _))) => this.done = true,
                // Pings and pongs: the relay sends none on a multiplexed session (the session
                // has its own keepalive); nothing to answer.
                Ok(Some((0x9 | 0xa, _))) => {}
                Ok(Some((op, _))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(invalid(format!("WebSocket opcode {op} in a multiplexed session")))));
                }
                Ok(None) => {
                    if this.buf.capacity() - this.buf.len() < WS_HEADER_MAX {
                        this.buf.reserve(WS_CLIENT_READ);
                    }
                    let n = ready!(tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.buf))?;
                    if n == 0 {
                        this.done = true;
                        if let Some(check) = this.head.take() {
                            check.answer.send_replace(Some(EarlyAnswer::Failed));
                            return Poll::Ready(Some(Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the relay closed the connection before answering the WebSocket upgrade",
                            ))));
                        }
                        if !this.buf.is_empty() {
                            return Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the relay closed the WebSocket in a frame"))));
                        }
                    }
                }
            }
        }
    }
}

/// Bytes the writer gathers before it asks for a flush (one vectored write per batch).
const WS_CLIENT_WRITE: usize = 128 * 1024;

struct WsWriter {
    io: tokio::io::WriteHalf<BoxIo>,
    /// Headers and payloads not yet written, in order (the front one maybe partly).
    queue: std::collections::VecDeque<Bytes>,
    queued: usize,
    close_sent: bool,
}

/// XOR `data` with the 4-byte `key` repeated (RFC 6455 masking), eight bytes at a time.
fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    let wide = u64::from_ne_bytes([key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3]]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes(c.try_into().expect("8 bytes")) ^ wide;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

impl WsWriter {
    /// Queue one masked frame.
    fn push(&mut self, opcode: u8, payload: Bytes) {
        let key: [u8; 4] = rand::random();
        let mut payload = payload.try_into_mut().unwrap_or_else(|shared| bytes::BytesMut::from(&shared[..]));
        apply_mask(&mut payload, key);
        let mut head = bytes::BytesMut::with_capacity(WS_HEADER_MAX);
        head.extend_from_slice(&[0x80 | opcode]);
        match payload.len() {
            n if n < 126 => head.extend_from_slice(&[0x80 | n as u8]),
            n if n <= 0xffff => {
                head.extend_from_slice(&[0x80 | 126]);
                head.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                head.extend_from_slice(&[0x80 | 127]);
                head.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        head.extend_from_slice(&key);
        self.queued += head.len() + payload.len();
        self.queue.push_back(head.freeze());
        if !payload.is_empty() {
            self.queue.push_back(payload.freeze());
        }
    }

    fn poll_write_all(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.queue.is_empty() {
            let slices: Vec<io::IoSlice<'_>> = self.queue.iter().take(64).map(|b| io::IoSlice::new(b)).collect();
            let mut n = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.queued -= n;
            while n > 0 {
                let front = self.queue.front_mut().expect("written bytes were queued");
                if n >= front.len() {
                    n -= front.len();
                    self.queue.pop_front();
                } else {
                    front.advance(n);
                    n = 0;
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl Sink<Bytes> for WsWriter {
    type Error = io::Error;
    fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.queued >= WS_CLIENT_WRITE {
            ready!(self.poll_write_all(cx))?;
        }
        Poll::Ready(Ok(()))
    }
    fn start_send(mut self: Pin<&mut Self>, item: Bytes) -> io::Result<()> {
        if self.close_sent {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "the WebSocket is closed"));
        }
        self.push(0x2, item);
        Ok(())
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_all(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.close_sent {
            // Close 1000, as tungstenite sent it.
            self.push(0x8, Bytes::from_static(&[0x03, 0xe8]));
            self.close_sent = true;
        }
        ready!(self.poll_write_all(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
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

    /// The client's own WebSocket frames against tungstenite's server side (the relay's codec):
    /// every length encoding both ways, masked from the client, bytes already read after the
    /// upgrade served first, and the limits enforced.
    #[tokio::test]
    async fn client_frames_interoperate_with_the_relays_codec() {
        use tokio_tungstenite::tungstenite::protocol::Role;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        let mut relay = WebSocketStream::from_raw_socket(server, Role::Server, Some(ws_server_config(MUX_MAX_MESSAGE))).await;
        // A frame the relay sent right behind the upgrade's answer, read along with it.
        let rest = vec![0x82, 3, b'p', b'r', b'e'];
        let (mut source, mut sink) = ws_client_frames(Box::new(client), rest);
        assert_eq!(&source.next().await.unwrap().unwrap()[..], b"pre");
        let sizes = [0usize, 1, 125, 126, 127, 65535, 65536, 64 * 1024 + 5, MUX_MAX_MESSAGE];
        let msg = |n: usize| Bytes::from((0..n).map(|i| (i * 7 + n) as u8).collect::<Vec<u8>>());
        for &n in &sizes {
            sink.feed(msg(n)).await.unwrap();
        }
        sink.flush().await.unwrap();
        for &n in &sizes {
            match relay.next().await.unwrap().unwrap() {
                Message::Binary(b) => assert_eq!(b, msg(n), "client -> relay, {n} bytes"),
                m => panic!("unexpected {m:?}"),
            }
        }
        for &n in &sizes {
            relay.feed(Message::Binary(msg(n))).await.unwrap();
        }
        relay.flush().await.unwrap();
        for &n in &sizes {
            assert_eq!(source.next().await.unwrap().unwrap(), msg(n), "relay -> client, {n} bytes");
        }
        // Over the limit: an error that names it, and the end.
        relay.send(Message::Binary(msg(MUX_MAX_MESSAGE + 1))).await.unwrap();
        let e = source.next().await.unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("oversized WebSocket message"), "{e}");
        assert!(source.next().await.is_none());
        // Closing sends Close 1000, as tungstenite did.
        sink.close().await.unwrap();
        match relay.next().await.unwrap().unwrap() {
            Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1000),
            m => panic!("expected Close 1000, got {m:?}"),
        }
    }

    #[test]
    fn masking_matches_the_byte_by_byte_rule() {
        let key = [0x12, 0x34, 0x56, 0x78];
        for n in [0, 1, 7, 8, 9, 63, 64, 1000] {
            let data: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let mut masked = data.clone();
            apply_mask(&mut masked, key);
            let want: Vec<u8> = data.iter().enumerate().map(|(i, b)| b ^ key[i % 4]).collect();
            assert_eq!(masked, want, "{n} bytes");
        }
    }

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
