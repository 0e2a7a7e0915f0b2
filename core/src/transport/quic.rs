//! The QUIC transport (`quic://host:port`): one QUIC connection per session, on quinn and the
//! same rustls (ring) as `wss://`. Its first bidirectional stream, opened by the client, is the
//! session's control stream: length-prefixed frames exactly as on raw TCP ([`super::tcp_frames`]),
//! carrying the hello and its answer, then `GoAway` notices. Every tunnel stream is a QUIC stream
//! of its own ([`crate::session::quic`]), so a lost packet or a bulk stream's queue delays only
//! its own stream.
//!
//! No preamble: the hello is signed over a value both ends derive from the connection's TLS
//! session ([`hello_nonce`], an RFC 5705 exporter), which is fresh per connection and cannot be
//! replayed into another, so the client sends its hello and its first stream in the flight after
//! the QUIC handshake (two round trips to the first echoed byte, against three over `wss://` with
//! its early hello).
//!
//! This module builds the endpoints' configurations (windows from the session settings, the
//! congestion controller, ALPN) and connects a client; the relay's accept loop is
//! `relay::quic_endpoint`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, ErrorCode, Result};
use crate::mux::{FrameSink, FrameSource, MuxConfig};

use super::{ClientTls, RelayUrl};

/// The ALPN protocol of a libtunnel session over QUIC (the relay refuses any other).
pub const ALPN: &[u8] = b"libtunnel.v1";

/// Streams the peer may open at once before the session is authenticated; a session raises it as
/// streams are used (`session::quic`), up to `max_streams_per_session`. quinn keeps a record for
/// every stream it allows (about 100 bytes each), so granting 4,096 at the handshake cost an
/// unauthenticated connection 414 KiB.
pub const INITIAL_STREAMS: usize = 64;

/// The exporter label both ends derive the hello's nonce with.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-libtunnel-v1-hello";

/// How a QUIC session's congestion is controlled (the `quic_congestion` setting).
///
/// The default is CUBIC, on both ends. On the lossy link of `bench/lossy.sh` (100 Mbit/s, 50 ms
/// RTT, a one-RTT drop-tail queue; figures in bench/README.md, "QUIC") BBR measures better at 1 %
/// random loss: CUBIC moves 0.3-0.5 MiB/s there (0.03-0.04x of direct TCP, a loss-based
/// controller's rate falls as 1/sqrt(loss), as the kernel's CUBIC does: 0.4 MiB/s), BBR
/// 10.0-10.3 MiB/s (0.93-0.94x); at 0 % both move 0.86-0.93x, and CUBIC delays a second stream
/// less (p99 under bulk ~300 ms against BBR's ~600 ms). BBR stays opt-in (`bbr`) because quinn
/// calls its BBR experimental and 2 of the 10 BBR bulk transfers of those runs failed mid-transfer
/// (a stream reset with the session up; none of the CUBIC ones), which is not explained yet.
/// A client's value comes from `TUNNEL_QUIC_CONGESTION`, a relay's from its settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Congestion {
    /// CUBIC (RFC 9438), quinn's own default and the kernel's usual one.
    #[default]
    Cubic,
    /// BBR (v1 as quinn implements it): paced at the measured bottleneck rate, it does not take
    /// random loss for congestion. quinn's BBR fills a drop-tail queue of one RTT (its window is
    /// twice the BDP plus the ACK aggregation it measures), so a second stream waits behind it.
    Bbr,
    /// NewReno (RFC 9002's reference controller).
    NewReno,
}

impl Congestion {
    /// Parse a setting value: `cubic`, `bbr` or `newreno`.
    pub fn parse(s: &str) -> std::result::Result<Congestion, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cubic" => Ok(Congestion::Cubic),
            "bbr" => Ok(Congestion::Bbr),
            "newreno" | "reno" => Ok(Congestion::NewReno),
            other => Err(format!("{other:?} is not a congestion controller; use cubic, bbr or newreno")),
        }
    }

    /// The setting's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Congestion::Cubic => "cubic",
            Congestion::Bbr => "bbr",
            Congestion::NewReno => "newreno",
        }
    }
}

/// The controller a process uses for its QUIC sessions unless told otherwise:
/// `TUNNEL_QUIC_CONGESTION` in the environment, else [`Congestion::default`] (CUBIC).
pub fn default_congestion() -> Congestion {
    std::env::var("TUNNEL_QUIC_CONGESTION").ok().and_then(|v| Congestion::parse(&v).ok()).unwrap_or_default()
}

/// Most bytes a QUIC connection keeps sent but unacknowledged, or queued (quinn's send buffer):
/// twice the multiplexed session's write budget, which stands for that budget plus the kernel's
/// send buffer of a TCP session (8 MiB by default: a 50 ms, 1 Gbit/s path's 6.25 MB in flight).
fn send_window(cfg: &MuxConfig) -> u64 {
    2 * cfg.write_budget as u64
}

/// Bytes of kernel buffer asked for each way on a QUIC endpoint's UDP socket. quinn leaves the
/// kernel's default (net.core.rmem_default, 208 KiB), which holds 17 ms of datagrams at 100 Mbit/s:
/// a process not scheduled for longer (a busy machine) loses the rest at its socket, and QUIC's
/// congestion control takes that for network loss. On the lossy link of `bench/lossy.sh` (100
/// Mbit/s, 50 ms, a loaded 2-core machine) the relay's socket dropped 47,990 datagrams in one run
/// and CUBIC moved 0.39x of direct TCP at 0 % loss; with this buffer on both ends: no drop, 0.86x
/// (bench/README.md, "QUIC"). TCP has no such loss: the kernel acknowledges and buffers for it.
/// The kernel caps the request at net.core.rmem_max / wmem_max (4 MiB on the bench machine; many
/// distributions ship 208 KiB: raise them on a relay, as quinn's documentation advises).
pub(crate) const UDP_BUFFER: usize = 4 << 20;

/// A UDP socket bound to `addr` for a QUIC endpoint, with [`UDP_BUFFER`] asked for each way (the
/// kernel grants up to its maximum; a refusal is not an error) and dual-stack on IPv6 as quinn's
/// own constructors make it.
pub(crate) fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A QUIC endpoint on [`udp_socket`]`(addr)`: a client's (`server` None) or a relay's.
pub(crate) fn endpoint(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> std::io::Result<quinn::Endpoint> {
    let runtime = quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, udp_socket(addr)?, runtime)
}

/// QUIC's transport parameters from the session settings, so a QUIC session is bounded as a
/// multiplexed one is: each stream may have `max_stream_window` bytes unread, all streams together
/// `receive_budget` (at least one stream's window); at most [`INITIAL_STREAMS`] streams the peer opens until
/// the session raises it (up to `max_streams`); keepalive
/// and idle timeout as the session's. No unidirectional streams.
pub(crate) fn transport_config(cfg: &MuxConfig, congestion: Congestion) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    let streams = quinn::VarInt::from_u64(INITIAL_STREAMS.min(cfg.max_streams) as u64).unwrap_or(quinn::VarInt::MAX);
    t.max_concurrent_bidi_streams(streams)
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(quinn::VarInt::from_u32(cfg.max_stream_window))
        .receive_window(
            quinn::VarInt::from_u64((cfg.max_stream_window as u64).saturating_add(cfg.receive_budget as u64)).unwrap_or(quinn::VarInt::MAX),
        )
        .send_window(send_window(cfg))
        .keep_alive_interval(Some(cfg.keepalive_interval))
        .max_idle_timeout(quinn::IdleTimeout::try_from(cfg.keepalive_timeout).ok())
        .datagram_receive_buffer_size(None);
    match congestion {
        Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()));
        }
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
        Congestion::NewReno => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()));
        }
    }
    t
}

/// The relay's QUIC server configuration: its certificate (the one `wss://` uses, TLS 1.3 only),
/// ALPN [`ALPN`], the session settings, and address validation by Retry left to the accept loop.
pub(crate) fn server_config(tls: &rustls::ServerConfig, cfg: &MuxConfig, congestion: Congestion, max_incoming: usize) -> Result<quinn::ServerConfig> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| Error::config(format!("the relay's TLS certificate cannot serve QUIC: {e}")))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport_config(cfg, congestion)));
    // Connections not yet accepted (each holds its first datagrams): bounded like the TCP
    // endpoints' handshakes, with at most 64 KiB buffered each.
    server.max_incoming(max_incoming.max(1));
    server.incoming_buffer_size(64 * 1024);
    server.incoming_buffer_size_total((max_incoming.max(1) as u64) * 16 * 1024);
    server.migration(true);
    Ok(server)
}

/// The value a session's hello is signed over on this connection (both ends derive the same).
pub(crate) fn hello_nonce(conn: &quinn::Connection) -> Result<[u8; 32]> {
    let mut nonce = [0u8; 32];
    conn.export_keying_material(&mut nonce, EXPORTER_LABEL, b"")
        .map_err(|_| Error::new(ErrorCode::Protocol, "the QUIC connection's TLS session exports no keying material"))?;
    Ok(nonce)
}

/// The control stream's frames: the same length-prefixed framing as a raw-TCP session.
pub(crate) fn control_frames(send: quinn::SendStream, recv: quinn::RecvStream) -> (FrameSource, FrameSink) {
    super::tcp_frames(Box::new(tokio::io::join(recv, send)))
}

/// A QUIC connection to the relay, the endpoint (UDP socket) it owns, and its control stream.
pub(crate) struct Connected {
    pub(crate) conn: quinn::Connection,
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) nonce: [u8; 32],
    pub(crate) source: FrameSource,
    pub(crate) sink: FrameSink,
}

/// Connect to a `quic://` relay: resolve, bind a UDP socket of the address's family, handshake
/// (trusting `tls`, else the Web PKI), open the control stream.
pub(crate) async fn connect(url: &RelayUrl, tls: Option<&ClientTls>, cfg: &MuxConfig) -> Result<Connected> {
    if url.proxy.is_some() {
        return Err(Error::argument(format!(
            "{} is a QUIC (UDP) relay URL and cannot go through an HTTP or SOCKS5 proxy; use wss:// through the proxy, or set proxy to \"none\"",
            url.url
        )));
    }
    let addr = resolve(url).await?;
    let bind: SocketAddr = if addr.is_ipv4() { (std::net::Ipv4Addr::UNSPECIFIED, 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let mut endpoint = endpoint(bind, None).map_err(|e| Error::new(ErrorCode::Io, format!("cannot open a UDP socket for QUIC ({bind}): {e}")))?;
    let tls = match tls {
        Some(t) => t.clone(),
        None => ClientTls::webpki(),
    };
    let mut rustls_config = (*tls.config).clone();
    rustls_config.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(rustls_config)
        .map_err(|e| Error::config(format!("the client's TLS settings cannot serve QUIC: {e}")))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport_config(cfg, default_congestion())));
    endpoint.set_default_client_config(client);
    let connecting = endpoint.connect(addr, &url.host).map_err(|e| Error::argument(format!("cannot connect to {} over QUIC: {e}", url.url)))?;
    let conn = connecting.await.map_err(|e| connect_error(url, cfg.keepalive_timeout, e))?;
    let nonce = hello_nonce(&conn)?;
    let (send, recv) = conn.open_bi().await.map_err(|e| connect_error(url, cfg.keepalive_timeout, e))?;
    let (source, sink) = control_frames(send, recv);
    Ok(Connected { conn, endpoint, nonce, source, sink })
}

async fn resolve(url: &RelayUrl) -> Result<SocketAddr> {
    let mut addrs = tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map_err(|e| super::unavailable(url, format!("cannot resolve {}: {e}", url.host)))?;
    addrs.next().ok_or_else(|| super::unavailable(url, format!("{} resolves to no address", url.host)))
}

/// A failed QUIC handshake, with what usually causes it.
fn connect_error(url: &RelayUrl, idle: Duration, e: quinn::ConnectionError) -> Error {
    use quinn::ConnectionError as C;
    match e {
        C::TimedOut => Error::new(
            ErrorCode::RelayUnavailable,
            format!(
                "no QUIC answer from the relay at {} within {}s: UDP to that port is blocked on this network, or the relay has no quic_listen there; \
                 list a wss:// URL after it to fall back (quic://…,wss://…)",
                url.url,
                idle.as_secs()
            ),
        ),
        C::ConnectionClosed(c) if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED => Error::new(
            ErrorCode::RelayUnavailable,
            format!("the relay at {} refused the QUIC connection (it is at its connection limit); retry later", url.url),
        ),
        C::TransportError(t) if u64::from(t.code) & !0xff == 0x100 => Error::new(
            ErrorCode::RelayUnavailable,
            format!(
                "the TLS handshake with the relay at {} failed ({t}); if the relay's certificate comes from a private CA or is self-signed, pass it as the CA (--ca)",
                url.url
            ),
        ),
        C::ConnectionClosed(c) if u64::from(c.error_code) & !0xff == 0x100 => Error::new(
            ErrorCode::RelayUnavailable,
            format!("the relay at {} ended the TLS handshake ({c}): it is not a libtunnel relay's QUIC port, or refuses our TLS settings", url.url),
        ),
        other => super::unavailable(url, format!("QUIC: {other}")),
    }
}
