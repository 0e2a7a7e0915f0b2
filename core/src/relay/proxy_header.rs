//! The PROXY protocol (v1 text or v2 binary, HAProxy's) from trusted load balancers
//! (`proxy_protocol_from`): a connection from one of them starts with a header naming the real
//! client, which then counts for the per-source limits, logs, `X-Forwarded-For` and the client
//! address listeners see. Connections from other addresses are served as they are (a header from
//! an untrusted address is not believed: it would let anyone choose their source).

use std::net::SocketAddr;
use std::time::Duration;

use ppp::{v1, v2, HeaderResult, PartialResult};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Why no client address could be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    /// The balancer closed without a header (a TCP health check does).
    #[error("the connection closed before its PROXY header")]
    Closed,
    #[error("no PROXY header in time")]
    Timeout,
    #[error("{0}")]
    Invalid(String),
}

/// Longest header accepted (v2 with TLVs).
const MAX_HEADER: usize = 4096;

/// Read the PROXY header a trusted load balancer sends first; the client it names (`None` for a
/// `LOCAL` / `UNKNOWN` header: the balancer's own connection, e.g. a health check). Bytes after
/// the header stay unread.
pub(crate) async fn read(sock: &mut TcpStream, limit: Duration) -> Result<Option<SocketAddr>, ProxyError> {
    let work = async {
        let mut buf = vec![0u8; MAX_HEADER];
        loop {
            let n = sock.peek(&mut buf).await.map_err(|_| ProxyError::Closed)?;
            if n == 0 {
                return Err(ProxyError::Closed);
            }
            let parsed = HeaderResult::parse(&buf[..n]);
            if parsed.is_incomplete() {
                if n == MAX_HEADER {
                    return Err(ProxyError::Invalid(format!("PROXY header longer than {MAX_HEADER} bytes")));
                }
                // The rest of the header has not arrived yet (it almost always comes in one segment).
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            }
            let (len, addr) = match parsed {
                HeaderResult::V2(Ok(h)) => (
                    h.len(),
                    match h.addresses {
                        v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                        v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                        _ => None,
                    },
                ),
                HeaderResult::V1(Ok(h)) => (
                    h.header.len(),
                    match h.addresses {
                        v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                        v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                        v1::Addresses::Unknown => None,
                    },
                ),
                _ => return Err(ProxyError::Invalid("no valid PROXY header (v1 or v2) from a load balancer listed in proxy_protocol_from".into())),
            };
            let mut skip = vec![0u8; len];
            sock.read_exact(&mut skip).await.map_err(|_| ProxyError::Closed)?;
            return Ok(addr);
        }
    };
    tokio::time::timeout(limit, work).await.map_err(|_| ProxyError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn through(header: &[u8], after: &[u8]) -> (Result<Option<SocketAddr>, ProxyError>, Vec<u8>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let mut all = header.to_vec();
        all.extend_from_slice(after);
        c.write_all(&all).await.unwrap();
        c.shutdown().await.unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        let r = read(&mut s, Duration::from_secs(2)).await;
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        (r, rest)
    }

    #[tokio::test]
    async fn v1_and_v2_name_the_client_and_leave_the_rest() {
        let (r, rest) = through(b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 7835\r\n", b"GET / HTTP/1.1\r\n").await;
        assert_eq!(r.unwrap(), Some("203.0.113.7:51000".parse().unwrap()));
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
        let v2 = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            ("[2001:db8::5]:4242".parse::<SocketAddr>().unwrap(), "[2001:db8::1]:7835".parse::<SocketAddr>().unwrap()),
        )
        .build()
        .unwrap();
        let (r, rest) = through(&v2, b"\x05\x01").await;
        assert_eq!(r.unwrap(), Some("[2001:db8::5]:4242".parse().unwrap()));
        assert_eq!(rest, b"\x05\x01");
        let (r, _) = through(b"PROXY UNKNOWN\r\n", b"").await;
        assert_eq!(r.unwrap(), None);
        let (r, _) = through(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"").await;
        assert!(r.unwrap_err().to_string().contains("proxy_protocol_from"));
        let (r, _) = through(b"", b"").await;
        assert!(matches!(r, Err(ProxyError::Closed)), "{r:?}");
    }
}
