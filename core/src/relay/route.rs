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
use super::names::{self, Found};
use super::RelayState;
use crate::egress::connect::{connect_target, Cause};
use crate::error::ErrorCode;
use crate::identity::valid_name;
use crate::protocol::{ExitHeader, StreamHeader, STREAM_ACCEPTED};
use crate::session::SessionStream;
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
    /// The listener refused the stream for good, with this code (`E2E_REFUSED`: a public request
    /// to an e2e listener; `NOT_ALLOWED`: an exit listener that exposes no service).
    Refused(ErrorCode),
    /// No local listener has the name, and the cluster registry (Redis) cannot be asked where
    /// it is.
    ClusterUnavailable,
    /// The node holding an exit listener does not grant it to the dialer's key (its own `exits`
    /// setting).
    NotAllowed,
}

impl RouteError {
    pub(crate) fn refusal(self) -> Refusal {
        match self {
            RouteError::Offline => Refusal::ListenerOffline,
            RouteError::Busy | RouteError::Timeout => Refusal::ListenerBusy,
            RouteError::Refused(_) => Refusal::ListenerRefused,
            RouteError::ClusterUnavailable => Refusal::ClusterUnavailable,
            RouteError::NotAllowed => Refusal::NotAllowed,
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
///
/// A pool's replicas are offered the stream in the registry's order (round-robin). A replica whose accept queue is full, that drains (`GoAway`), or whose
/// session dies before it accepts is skipped for the next one: nothing of the client's has been
/// sent to it yet, so moving on loses nothing. The deadline covers every attempt.
pub(crate) async fn open_to_listener(
    state: &RelayState,
    name: &str,
    header: StreamHeader,
    wait: std::time::Duration,
) -> Result<SessionStream, RouteError> {
    open_encoded(state, name, &header.encode(), wait).await
}

/// [`open_to_listener`] with the stream's first bytes already encoded (a [`StreamHeader`] or an
/// [`crate::protocol::ExitHeader`]). A name no local listener holds goes to the node of the
/// cluster that holds it, if this relay is a node of one.
pub(crate) async fn open_encoded(state: &RelayState, name: &str, header: &[u8], wait: std::time::Duration) -> Result<SessionStream, RouteError> {
    match (open_local(state, name, header, wait).await, &state.cluster) {
        (Err(RouteError::Offline), Some(cluster)) => cluster.open_remote(state, name, header, wait).await,
        (r, _) => r,
    }
}

/// [`open_encoded`] to this relay's own listeners only (what a node does for a stream another
/// node forwarded: one hop at most).
pub(crate) async fn open_local(state: &RelayState, name: &str, header: &[u8], wait: std::time::Duration) -> Result<SessionStream, RouteError> {
    let candidates = state.registry.candidates(name, state.cfg.limits.handshake_timeout).await;
    if candidates.is_empty() {
        return Err(RouteError::Offline);
    }
    let deadline = tokio::time::Instant::now() + wait;
    let access = state.access();
    let mut last = RouteError::Offline;
    for c in candidates {
        // Re-checked on every stream: a reload may have withdrawn the key's right to this name.
        if access.authorize(&c.owner, name).is_err() {
            continue;
        }
        match offer(&c, header, deadline).await {
            Ok(stream) => {
                state.metrics.listener_streams.fetch_add(1, Relaxed);
                return Ok(stream);
            }
            Err(RouteError::Timeout) => return Err(RouteError::Timeout),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Offer a stream to one replica and wait until `deadline` for it to accept.
async fn offer(c: &super::registry::Candidate, header: &[u8], deadline: tokio::time::Instant) -> Result<SessionStream, RouteError> {
    // Held until the listener answers: a listener that stops accepting costs the relay at most
    // `max_pending_accepts` waiting streams.
    let _waiting = c.pending.clone().try_acquire_owned().map_err(|_| RouteError::Busy)?;
    let mut stream = c.session.open().map_err(|_| RouteError::Busy)?;
    let accept = async {
        stream.write_all(header).await.map_err(|_| RouteError::Busy)?;
        let mut answer = [0u8; 1];
        stream.read_exact(&mut answer).await.map_err(|_| RouteError::Busy)?;
        match answer[0] {
            STREAM_ACCEPTED => Ok(()),
            code => Err(ErrorCode::from_number(u32::from(code)).map_or(RouteError::Busy, RouteError::Refused)),
        }
    };
    match tokio::time::timeout_at(deadline, accept).await {
        Ok(Ok(())) => Ok(stream),
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

/// Answer a CONNECT for a listener that could not be reached.
async fn write_route_error<S: AsyncWrite + Unpin>(io: &mut S, e: RouteError) -> std::io::Result<()> {
    let reply = match e {
        RouteError::Offline => Reply::HostUnreachable,
        RouteError::Busy => Reply::ConnectionRefused,
        RouteError::Timeout => Reply::TtlExpired,
        RouteError::NotAllowed => Reply::ConnectionNotAllowed,
        RouteError::ClusterUnavailable => return socks::write_cluster_unavailable(io).await,
        RouteError::Refused(code) => return socks::write_listener_refused(io, code).await,
    };
    socks::write_reply(io, reply, None).await
}

/// Where an admitted stream goes: a TCP target, or a listener's stream.
pub(crate) enum Connected {
    Tcp(TcpStream),
    Listener(SessionStream),
}

/// The listener a CONNECT names, if it should be routed to one: a registered name, `NAME.<domain>`,
/// a bare key-derived name, or any name with port 0 (offline listeners get "host unreachable",
/// not an allowlist refusal).
pub(crate) async fn listener_route(state: &RelayState, addr: &Address) -> Option<String> {
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
    if explicit || looks_derived || by_port {
        return Some(name);
    }
    // A chosen name a listener holds, here or on another node (when Redis cannot be asked, the
    // name is taken for a target: the allowlist decides, as on a relay of its own).
    names::lookup(state, &name).await.registration().map(|_| name)
}

/// Connect to the requested target (or listener, or exit listener) and answer the CONNECT; `None`
/// if refused (already answered). `dialer` is the key id of the dialer's session (multiplexed
/// mode), which decides the exit listeners it may use.
pub(crate) async fn connect_and_reply<S: AsyncWrite + Unpin>(
    state: &RelayState,
    io: &mut S,
    addr: &Address,
    peer: SocketAddr,
    dialer: Option<u32>,
) -> Option<Connected> {
    if let Some((target, exit)) = socks::split_exit_route(addr) {
        return via_exit(state, io, &target, &exit, peer, dialer).await;
    }
    if let Some(name) = listener_route(state, addr).await {
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
                let _ = write_route_error(io, e).await;
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

/// Whether the listener `name` is an exit listener (`None`: offline), here or on another node;
/// `Err` when only the cluster registry could tell and it is unreachable.
async fn exit_mode(state: &RelayState, name: &str) -> Result<Option<bool>, ()> {
    match names::lookup(state, name).await {
        Found::Unknown => Err(()),
        found => Ok(found.registration().map(|r| r.exit)),
    }
}

/// A CONNECT routed through an exit listener (`HOST@EXIT`): the relay checks that the dialer's
/// key may use `exit` (`exits` setting) and that `exit` is an exit listener, opens a stream to it
/// (a pool of exits is spread like any pool), passes the CONNECT on and relays the exit's SOCKS5
/// reply unchanged, so the dialer gets the exit's own verdict (not allowed, unreachable, refused,
/// timeout). The relay's own allowlist does not apply to targets behind an exit: the exit's does.
async fn via_exit<S: AsyncWrite + Unpin>(
    state: &RelayState,
    io: &mut S,
    target: &Target,
    exit: &str,
    peer: SocketAddr,
    dialer: Option<u32>,
) -> Option<Connected> {
    let refuse = |reply: Reply, refusal: Refusal, why: &str| {
        state.metrics.refused(refusal);
        tracing::info!(%peer, kid = ?dialer, %exit, %target, reason = why, "stream through an exit listener refused by the relay");
        reply
    };
    let access = state.access();
    let verdict = match dialer {
        // An exit the relay's `exits` setting does not name is unknown here, as an offline
        // listener name is (host unreachable); one it names for other keys is refused.
        _ if !access.exits.contains_key(exit) => {
            Err(refuse(Reply::HostUnreachable, Refusal::ListenerOffline, "no exit of that name is configured (exits setting)"))
        }
        None => Err(refuse(
            Reply::ConnectionNotAllowed,
            Refusal::NotAllowed,
            "exit routing needs a multiplexed session (classic mode has no key per stream)",
        )),
        Some(kid) if !access.exit_permits(exit, kid) => {
            Err(refuse(Reply::ConnectionNotAllowed, Refusal::NotAllowed, "the dialer's key may not use this exit (exits setting)"))
        }
        Some(_) => match exit_mode(state, exit).await {
            Err(()) => {
                state.metrics.refused(Refusal::ClusterUnavailable);
                let _ = socks::write_cluster_unavailable(io).await;
                return None;
            }
            Ok(None) => Err(refuse(Reply::HostUnreachable, Refusal::ListenerOffline, "no exit listener of that name is online")),
            Ok(Some(false)) => Err(refuse(Reply::ConnectionNotAllowed, Refusal::NotAllowed, "that listener is not an exit listener")),
            Ok(Some(true)) => Ok(()),
        },
    };
    if let Err(reply) = verdict {
        let _ = socks::write_reply(io, reply, None).await;
        return None;
    }
    let header = ExitHeader { kid: dialer.unwrap_or_default(), client: peer.to_string() }.encode();
    let limit = state.cfg.limits.connect_timeout;
    let mut stream = match open_encoded(state, exit, &header, limit).await {
        Ok(s) => s,
        Err(e) => {
            state.metrics.refused(e.refusal());
            tracing::debug!(%peer, %exit, error = ?e, "exit listener not reached");
            let _ = write_route_error(io, e).await;
            return None;
        }
    };
    // The exit connects with its own deadline (the same default); a little more here, so its
    // own answer (a timeout reply) arrives first.
    let asked = async {
        let mut buf = bytes::BytesMut::new();
        socks5_proto::Request::new(socks5_proto::Command::Connect, target.to_address()).write_to_buf(&mut buf);
        stream.write_all(&buf).await?;
        socks5_proto::Response::read_from(&mut stream).await.map_err(|e| match e {
            socks5_proto::Error::Io(e) => e,
            e => std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
        })
    };
    let reply = match tokio::time::timeout(limit + std::time::Duration::from_secs(1), asked).await {
        Ok(Ok(r)) => r.reply,
        Ok(Err(e)) => {
            tracing::debug!(%peer, %exit, error = %e, "exit listener lost before it answered");
            stream.reset(ErrorCode::Unreachable);
            Reply::HostUnreachable
        }
        Err(_) => {
            stream.reset(ErrorCode::Timeout);
            Reply::TtlExpired
        }
    };
    if socks::write_reply(io, reply, None).await.is_err() || reply != Reply::Succeeded {
        if reply != Reply::Succeeded {
            tracing::debug!(%peer, %exit, %target, ?reply, "exit listener refused the target");
        }
        stream.reset(ErrorCode::Closed);
        return None;
    }
    state.metrics.streams_total.fetch_add(1, Relaxed);
    tracing::debug!(%peer, %exit, %target, "stream connected through an exit listener");
    Some(Connected::Listener(stream))
}
