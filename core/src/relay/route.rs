//! Routing a stream to where it goes: a listener by name (dial by name, public HTTP, public TCP
//! ports all come here) or a real target through `crate::egress`. [`connect_and_reply`] is the
//! SOCKS5 side (answer the CONNECT with the outcome); [`open_to_listener`] opens a stream on a
//! listener's session and waits for it to accept.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

use socks5_proto::{Address, Reply};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::metrics::Refusal;
use super::RelayState;
use crate::egress::connect::{connect_target, Cause};
use crate::error::ErrorCode;
use crate::identity::valid_name;
use crate::mux::MuxStream;
use crate::protocol::{StreamHeader, STREAM_ACCEPTED};
use crate::socks::{self, Target};

/// Why a stream could not be delivered to a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RouteError {
    /// No live listener has that name.
    Offline,
    /// The listener refused the stream (queue full) or its session died.
    Busy,
    /// The listener did not accept within the deadline.
    Timeout,
}

impl RouteError {
    pub(crate) fn refusal(self) -> Refusal {
        match self {
            RouteError::Offline => Refusal::ListenerOffline,
            RouteError::Busy | RouteError::Timeout => Refusal::ListenerBusy,
        }
    }
}

/// The listener name a dial target or `Host` names, if it is one: `NAME` (a single label) or
/// `NAME.<domain>`, case-insensitive, trailing dot ignored.
pub(crate) fn listener_name(host: &str, domain: &str) -> Option<String> {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    let label = match h.strip_suffix(domain).and_then(|p| p.strip_suffix('.')) {
        Some(l) if !domain.is_empty() => l.to_string(),
        _ => h,
    };
    valid_name(&label).then_some(label)
}

/// Open a stream to the listener registered as `name` and wait (at most `wait`) for it to accept:
/// dials and public TCP ports wait `connect_timeout`, public HTTP waits `http_timeout`.
pub(crate) async fn open_to_listener(
    state: &RelayState,
    name: &str,
    header: StreamHeader,
    wait: std::time::Duration,
) -> Result<MuxStream, RouteError> {
    let (session, pending, owner) = state.registry.lookup(name, state.cfg.limits.handshake_timeout).await.ok_or(RouteError::Offline)?;
    // Re-checked on every stream: a reload may have withdrawn the key's right to this name.
    if state.access().authorize(&owner, name).is_err() {
        return Err(RouteError::Offline);
    }
    // Held until the listener answers: a listener that stops accepting costs the relay at most
    // `max_pending_accepts` waiting streams.
    let _waiting = pending.try_acquire_owned().map_err(|_| RouteError::Busy)?;
    let mut stream = session.open().map_err(|_| RouteError::Busy)?;
    let accept = async {
        stream.write_all(&header.encode()).await.map_err(|_| RouteError::Busy)?;
        let mut answer = [0u8; 1];
        stream.read_exact(&mut answer).await.map_err(|_| RouteError::Busy)?;
        if answer[0] == STREAM_ACCEPTED {
            Ok(())
        } else {
            Err(RouteError::Busy)
        }
    };
    match tokio::time::timeout(wait, accept).await {
        Ok(Ok(())) => {
            state.metrics.listener_streams.fetch_add(1, Relaxed);
            Ok(stream)
        }
        Ok(Err(e)) => {
            stream.reset(ErrorCode::Refused);
            Err(e)
        }
        Err(_) => {
            stream.reset(ErrorCode::Timeout);
            Err(RouteError::Timeout)
        }
    }
}

/// Where an admitted stream goes: a TCP target, or a listener's stream.
pub(crate) enum Connected {
    Tcp(TcpStream),
    Listener(MuxStream),
}

/// The listener a CONNECT names, if it should be routed to one: a registered name, `NAME.<domain>`,
/// a bare key-derived name, or any name with port 0 (offline listeners get "host unreachable",
/// not an allowlist refusal).
pub(crate) fn listener_route(state: &RelayState, addr: &Address) -> Option<String> {
    let Address::DomainAddress(d, port) = addr else {
        return None;
    };
    let host = std::str::from_utf8(d).ok()?;
    let name = listener_name(host, &state.cfg.domain)?;
    let explicit = host.trim_end_matches('.').len() > name.len();
    let looks_derived = name.len() == crate::identity::DERIVED_NAME_LEN && name.bytes().all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b));
    // Port 0 is never a real target: `NAME:0` is how dialers name a listener (`localhost` excepted:
    // it names the relay's own host, which the allowlist refuses as such).
    let by_port = *port == 0 && name != "localhost";
    (explicit || looks_derived || by_port || state.registry.contains(&name)).then_some(name)
}

/// Connect to the requested target (or listener) and answer the CONNECT; `None` if refused
/// (already answered).
pub(crate) async fn connect_and_reply<S: AsyncWrite + Unpin>(state: &RelayState, io: &mut S, addr: &Address, peer: SocketAddr) -> Option<Connected> {
    if let Some(name) = listener_route(state, addr) {
        let port = match addr {
            Address::DomainAddress(_, p) => *p,
            Address::SocketAddress(sa) => sa.port(),
        };
        let header = crate::protocol::StreamHeader { via: crate::protocol::Via::Dial, port, client: peer.to_string() };
        return match open_to_listener(state, &name, header, state.cfg.limits.connect_timeout).await {
            Ok(stream) => {
                if socks::write_reply(io, Reply::Succeeded, None).await.is_err() {
                    return None;
                }
                state.metrics.streams_total.fetch_add(1, Relaxed);
                tracing::debug!(%peer, listener = %name, "stream connected to a listener");
                Some(Connected::Listener(stream))
            }
            Err(e) => {
                state.metrics.refused(e.refusal());
                tracing::debug!(%peer, listener = %name, error = ?e, "listener not reached");
                let reply = match e {
                    RouteError::Offline => Reply::HostUnreachable,
                    RouteError::Busy => Reply::ConnectionRefused,
                    RouteError::Timeout => Reply::TtlExpired,
                };
                let _ = socks::write_reply(io, reply, None).await;
                None
            }
        };
    }
    match connect_target(addr, &state.access().allow, &state.resolver, state.cfg.limits.connect_timeout).await {
        Ok(tcp) => {
            let bound = tcp.local_addr().ok();
            if socks::write_reply(io, Reply::Succeeded, bound).await.is_err() {
                return None;
            }
            state.metrics.streams_total.fetch_add(1, Relaxed);
            tracing::debug!(%peer, target = %Target::from_address(addr).map(|t| t.to_string()).unwrap_or_default(), "stream connected");
            Some(Connected::Tcp(tcp))
        }
        Err(f) => {
            state.metrics.refused(f.reason.into());
            if f.reason == Cause::NotAllowed {
                tracing::info!(%peer, detail = %f.detail, "target refused by the allowlist");
            } else {
                tracing::debug!(%peer, detail = %f.detail, "target connect failed");
            }
            let _ = socks::write_reply(io, f.reply, None).await;
            None
        }
    }
}
