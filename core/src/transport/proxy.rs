//! The byte stream to the relay's host, directly or through an upstream proxy: [`open`] gives
//! `transport::connect` a TCP (or TLS-to-the-proxy) stream that already reaches the relay's host
//! and port — through an HTTP CONNECT proxy, an HTTPS proxy (TLS to the proxy, then CONNECT) or
//! a SOCKS5 proxy — and TLS and WebSocket run over it as on a direct connection.
//!
//! Which proxy a relay URL uses is decided above, in `client::proxy` (curl's rules, `NO_PROXY`,
//! `TUNNEL_PROXY`), and stored in [`RelayUrl::proxy`](super::RelayUrl). SOCKS5 always sends the
//! relay's host name to the proxy (remote DNS, `socks5h` in curl's terms), since a network that
//! only lets the proxy out often cannot resolve outside names either; its messages are
//! `socks5-proto`'s. HTTP CONNECT is a dozen lines of HTTP/1.1 written here. Proxy passwords
//! never appear in logs or errors: a [`ProxyUrl`] prints itself without it.

use std::fmt;
use std::net::IpAddr;

use base64::Engine;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{BoxIo, ClientTls, Io, RelayUrl};
use crate::env::PROXY_VAR;
use crate::error::{Error, ErrorCode, Result};

/// Longest answer head an HTTP proxy may send to a CONNECT.
const MAX_HEAD: usize = 16 * 1024;

/// How a client talks to its proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    /// HTTP CONNECT over plain TCP (`http://`).
    Http,
    /// HTTP CONNECT over TLS to the proxy (`https://`).
    Https,
    /// SOCKS5 with remote DNS (`socks5://`, `socks5h://`).
    Socks5,
}

/// A proxy URL: kind, address, and credentials. Display and Debug never show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    kind: ProxyKind,
    host: String,
    port: u16,
    user: Option<String>,
    password: Option<String>,
}

impl ProxyUrl {
    /// Parse `http://[user:pass@]host[:port]`, `https://…`, `socks5://…` or `socks5h://…`; a URL
    /// without a scheme is HTTP, as in curl; so is curl's default port, 1080 (443 for `https://`).
    pub fn parse(text: &str) -> Result<ProxyUrl> {
        let t = text.trim();
        let with_scheme = if t.contains("://") { t.to_string() } else { format!("http://{t}") };
        // Never echo the text itself: it may hold a password.
        let url = url::Url::parse(&with_scheme).map_err(|e| {
            Error::argument(format!(
                "the proxy URL is not a URL ({e}); write it like http://user:pass@proxy.example:3128 or socks5://proxy.example:1080"
            ))
        })?;
        // curl's default ports: 1080, except 443 for an HTTPS proxy.
        let (kind, default_port) = match url.scheme() {
            "http" => (ProxyKind::Http, 1080),
            "https" => (ProxyKind::Https, 443),
            "socks5" | "socks5h" => (ProxyKind::Socks5, 1080),
            other => {
                return Err(Error::argument(format!("proxy URL scheme {other:?} is not supported; use http://, https://, socks5:// or socks5h://")))
            }
        };
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| Error::argument("the proxy URL has no host"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
        let user = Some(decode(url.username())).filter(|u| !u.is_empty());
        let password = url.password().map(decode);
        Ok(ProxyUrl { kind, host, port: url.port().unwrap_or(default_port), user, password })
    }

    /// How the client talks to this proxy.
    pub fn kind(&self) -> ProxyKind {
        self.kind
    }

    /// The proxy's host and port, as `host:port`.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = match self.kind {
            ProxyKind::Http => "http",
            ProxyKind::Https => "https",
            ProxyKind::Socks5 => "socks5",
        };
        match (&self.user, &self.password) {
            (Some(u), Some(_)) => write!(f, "{scheme}://{u}:***@{}", self.address()),
            (Some(u), None) => write!(f, "{scheme}://{u}@{}", self.address()),
            _ => write!(f, "{scheme}://{}", self.address()),
        }
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProxyUrl({self})")
    }
}

/// Open the byte stream to the relay's host and port: directly, or through `relay.proxy`.
/// `tls` is the trust for an `https://` proxy (the relay's `--ca`, else the public Web PKI).
pub(crate) async fn open(relay: &RelayUrl, tls: Option<&ClientTls>) -> Result<BoxIo> {
    let Some(proxy) = relay.proxy.as_deref() else {
        let tcp = TcpStream::connect((relay.host.as_str(), relay.port)).await.map_err(|e| crate::transport::unavailable(relay, e))?;
        crate::transport::tune_session_socket(&tcp);
        return Ok(Box::new(tcp));
    };
    let tcp = TcpStream::connect((proxy.host.as_str(), proxy.port)).await.map_err(|e| {
        Error::new(
            ErrorCode::RelayUnavailable,
            format!("cannot reach the proxy {proxy}: {e}; check the proxy URL (--proxy, {PROXY_VAR}, HTTPS_PROXY, ...) or bypass it with --proxy none / NO_PROXY"),
        )
    })?;
    crate::transport::tune_session_socket(&tcp);
    tracing::debug!(proxy = %proxy, relay = %relay.url, "connecting through the proxy");
    match proxy.kind {
        ProxyKind::Http => http_connect(Box::new(tcp), proxy, relay).await,
        ProxyKind::Https => {
            let config = tls.cloned().unwrap_or_else(ClientTls::webpki).config;
            let name = ServerName::try_from(proxy.host.clone())
                .map_err(|_| Error::argument(format!("the proxy host {:?} is not a valid TLS server name", proxy.host)))?;
            let conn = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(|e| {
                Error::new(
                    ErrorCode::RelayUnavailable,
                    format!("TLS handshake with the proxy {proxy} failed ({e}); if it is a plain HTTP proxy, write http:// in its URL; if its certificate comes from a private CA, pass that CA with --ca / TUNNEL_CA"),
                )
            })?;
            http_connect(Box::new(conn), proxy, relay).await
        }
        ProxyKind::Socks5 => socks5_connect(tcp, proxy, relay).await,
    }
}

/// `host:port` as a CONNECT target (IPv6 in brackets).
fn authority(relay: &RelayUrl) -> String {
    if relay.host.contains(':') {
        format!("[{}]:{}", relay.host, relay.port)
    } else {
        format!("{}:{}", relay.host, relay.port)
    }
}

fn lost(proxy: &ProxyUrl, e: std::io::Error) -> Error {
    Error::new(ErrorCode::RelayUnavailable, format!("the proxy {proxy} closed the connection before it connected to the relay: {e}"))
}

async fn http_connect(mut io: BoxIo, proxy: &ProxyUrl, relay: &RelayUrl) -> Result<BoxIo> {
    let target = authority(relay);
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(user) = &proxy.user {
        let pair = format!("{user}:{}", proxy.password.as_deref().unwrap_or(""));
        req.push_str(&format!("Proxy-Authorization: Basic {}\r\n", base64::engine::general_purpose::STANDARD.encode(pair)));
    }
    req.push_str("\r\n");
    io.write_all(req.as_bytes()).await.map_err(|e| lost(proxy, e))?;
    io.flush().await.map_err(|e| lost(proxy, e))?;
    // Byte by byte up to the blank line: what follows belongs to the relay.
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            return Err(Error::protocol(format!("the proxy {proxy} answered CONNECT with a head over {MAX_HEAD} bytes; is it an HTTP proxy?")));
        }
        let b = io.read_u8().await.map_err(|e| lost(proxy, e))?;
        head.push(b);
    }
    let head = String::from_utf8_lossy(&head);
    let status_line = head.lines().next().unwrap_or("").trim().to_string();
    let code = status_line.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok());
    match code {
        Some(200..=299) => Ok(io),
        Some(407) => Err(Error::new(
            ErrorCode::AuthFailed,
            if proxy.user.is_some() {
                format!("the proxy {proxy} refused the credentials in its URL: check the user name and password (http://user:pass@host:port); it answered {status_line}")
            } else {
                format!("the proxy {proxy} wants credentials: put them in the proxy URL (http://user:pass@host:port); it answered {status_line}")
            },
        )),
        Some(_) => {
            Err(Error::new(ErrorCode::RelayUnavailable, format!("the proxy {proxy} refused to connect to the relay at {target}: {status_line}")))
        }
        None => Err(Error::protocol(format!(
            "the proxy {proxy} did not answer CONNECT with HTTP ({status_line:?}); is it an HTTP proxy? (socks5:// for a SOCKS5 one)"
        ))),
    }
}

fn socks_reply_name(code: u8) -> &'static str {
    match code {
        1 => "general SOCKS server failure",
        2 => "connection not allowed by ruleset",
        3 => "network unreachable",
        4 => "host unreachable",
        5 => "connection refused",
        6 => "TTL expired",
        7 => "command not supported",
        8 => "address type not supported",
        _ => "unassigned reply code",
    }
}

async fn socks5_connect(mut tcp: TcpStream, proxy: &ProxyUrl, relay: &RelayUrl) -> Result<BoxIo> {
    use socks5_proto::handshake::{self, password, Method};
    use socks5_proto::{Address, Command, Request};
    let not_socks = |e: socks5_proto::Error| match e {
        socks5_proto::Error::Io(e) => lost(proxy, e),
        e => Error::protocol(format!("the proxy {proxy} does not speak SOCKS5 ({e}); is it an HTTP proxy? (http:// in its URL)")),
    };
    let methods = if proxy.user.is_some() { vec![Method::PASSWORD, Method::NONE] } else { vec![Method::NONE] };
    handshake::Request::new(methods).write_to(&mut tcp).await.map_err(|e| lost(proxy, e))?;
    let chosen = handshake::Response::read_from(&mut tcp).await.map_err(not_socks)?.method;
    if chosen == Method::PASSWORD {
        let (Some(user), pass) = (&proxy.user, proxy.password.as_deref().unwrap_or("")) else {
            return Err(Error::new(
                ErrorCode::AuthFailed,
                format!("the SOCKS5 proxy {proxy} wants credentials: put them in the proxy URL (socks5://user:pass@host:port)"),
            ));
        };
        password::Request::new(user.as_bytes().to_vec(), pass.as_bytes().to_vec()).write_to(&mut tcp).await.map_err(|e| lost(proxy, e))?;
        // RFC 1929: any status but 0 is a refusal (socks5-proto's reader only accepts 0 and 1).
        let mut answer = [0u8; 2];
        tcp.read_exact(&mut answer).await.map_err(|e| lost(proxy, e))?;
        if answer[1] != 0 {
            return Err(Error::new(
                ErrorCode::AuthFailed,
                format!(
                    "the SOCKS5 proxy {proxy} refused the credentials in its URL: check the user name and password (socks5://user:pass@host:port)"
                ),
            ));
        }
    } else if chosen != Method::NONE {
        let why = if proxy.user.is_some() { "" } else { ": put credentials in the proxy URL (socks5://user:pass@host:port)" };
        return Err(Error::new(ErrorCode::AuthFailed, format!("the SOCKS5 proxy {proxy} accepts none of our authentication methods{why}")));
    }
    let address = match relay.host.parse::<IpAddr>() {
        Ok(ip) => Address::SocketAddress((ip, relay.port).into()),
        // Remote DNS: the proxy resolves the relay's name.
        Err(_) => Address::DomainAddress(relay.host.as_bytes().to_vec(), relay.port),
    };
    Request::new(Command::Connect, address).write_to(&mut tcp).await.map_err(|e| lost(proxy, e))?;
    // Read the reply by hand: socks5-proto's reader refuses unassigned reply codes, whose number
    // the error should still name.
    let mut head = [0u8; 4];
    tcp.read_exact(&mut head).await.map_err(|e| lost(proxy, e))?;
    if head[0] != 5 {
        return Err(Error::protocol(format!("the proxy {proxy} does not speak SOCKS5 (version {} in its reply)", head[0])));
    }
    if head[1] != 0 {
        return Err(Error::new(
            ErrorCode::RelayUnavailable,
            format!(
                "the SOCKS5 proxy {proxy} could not connect to the relay at {}: {} (reply {})",
                authority(relay),
                socks_reply_name(head[1]),
                head[1]
            ),
        ));
    }
    let rest = match head[3] {
        1 => 4 + 2,
        4 => 16 + 2,
        3 => tcp.read_u8().await.map_err(|e| lost(proxy, e))? as usize + 2,
        t => return Err(Error::protocol(format!("the SOCKS5 proxy {proxy} sent an unknown address type {t} in its reply"))),
    };
    let mut skip = vec![0u8; rest];
    tcp.read_exact(&mut skip).await.map_err(|e| lost(proxy, e))?;
    let io: Box<dyn Io> = Box::new(tcp);
    Ok(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::proxy::Proxy;

    #[test]
    fn urls_parse_and_never_print_the_password() {
        let p = ProxyUrl::parse("http://alice:s%40cret@proxy.example:3128").unwrap();
        assert_eq!((p.kind(), p.address().as_str()), (ProxyKind::Http, "proxy.example:3128"));
        assert_eq!(p.password.as_deref(), Some("s@cret"));
        assert_eq!(p.to_string(), "http://alice:***@proxy.example:3128");
        assert!(!format!("{p:?}").contains("cret"));
        assert_eq!(ProxyUrl::parse("socks5h://[::1]").unwrap().address(), "[::1]:1080");
        assert_eq!(ProxyUrl::parse("proxy.example").unwrap().address(), "proxy.example:1080");
        assert_eq!(ProxyUrl::parse("https://p").unwrap().address(), "p:443");
        assert_eq!(ProxyUrl::parse("http://p").unwrap().address(), "p:1080");
        let e = ProxyUrl::parse("ftp://bob:hunter2@p").unwrap_err();
        assert!(e.message().contains("ftp") && !e.message().contains("hunter2"), "{e}");
        assert_eq!(Proxy::parse(" None ").unwrap(), Proxy::Off);
    }
}
