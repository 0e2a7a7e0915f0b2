//! Connecting a stream to its target: normalise the requested address, apply the allowlist
//! (before DNS for names no rule could admit, and after DNS against every address actually
//! connected), then connect with a deadline. Failures come back as the SOCKS5 reply to send.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socks5_proto::{Address, Reply};
use tokio::net::TcpStream;

use super::allowlist::{canonical_ip, name_rule_reaches, Allowlist, NameDecision, TargetHost};
use super::resolve::TargetResolver;
use crate::socks::Target;

/// The kind of a failed connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// No allow rule admits the target (or an address it resolved to).
    NotAllowed,
    /// The name did not resolve, or the host is unreachable.
    Unreachable,
    /// The target refused the connection.
    Refused,
    /// Resolving or connecting took longer than the deadline.
    Timeout,
    /// The requested address is not a valid target.
    Malformed,
}

/// Why a target could not be connected: the SOCKS5 reply and a log line.
#[derive(Debug)]
pub struct ConnectFailure {
    /// Reply code sent to the client.
    pub reply: Reply,
    /// What kind of failure (the relay's metrics label, the exit listener's log).
    pub reason: Cause,
    /// For the relay's log (never sent to the client).
    pub detail: String,
}

fn fail(reply: Reply, reason: Cause, detail: String) -> ConnectFailure {
    ConnectFailure { reply, reason, detail }
}

/// Connect to the target of a CONNECT request, if the allowlist admits it.
pub async fn connect_target(addr: &Address, allow: &Allowlist, resolver: &TargetResolver, timeout: Duration) -> Result<TcpStream, ConnectFailure> {
    let target = Target::from_address(addr).map_err(|e| fail(Reply::GeneralFailure, Cause::Malformed, e.to_string()))?;
    let port = target.port;
    let not_allowed = |what: String| fail(Reply::ConnectionNotAllowed, Cause::NotAllowed, what);
    if port == 0 {
        return Err(not_allowed(format!("{target}: port 0 is never allowed")));
    }
    let host = TargetHost::parse(&target.host).map_err(|e| fail(Reply::HostUnreachable, Cause::Unreachable, e.to_string()))?;
    let deadline = tokio::time::Instant::now() + timeout;
    let host_addrs = super::resolve::host_addresses();
    let candidates: Vec<SocketAddr> = match host {
        TargetHost::Ip(ip) => {
            if !allow.ip_allowed_on(ip, port, &host_addrs) {
                return Err(not_allowed(format!("{target} (address {ip}) matches no allow rule")));
            }
            vec![SocketAddr::new(ip, port)]
        }
        TargetHost::Name(name) => {
            let decision = allow.check_name(&name, port);
            if decision == NameDecision::Denied {
                return Err(not_allowed(format!("{target} matches no allow rule (no DNS lookup made)")));
            }
            let resolved = tokio::time::timeout_at(deadline, resolver.lookup(&name, port))
                .await
                .map_err(|_| fail(Reply::TtlExpired, Cause::Timeout, format!("resolving {name} timed out")))?
                .map_err(|e| fail(Reply::HostUnreachable, Cause::Unreachable, format!("resolving {name}: {e}")))?;
            let all: Vec<SocketAddr> = resolved.into_iter().map(|sa| SocketAddr::new(canonical_ip(sa.ip()), sa.port())).collect();
            let admitted: Vec<SocketAddr> = match decision {
                // A name rule admits the name, but not every address DNS may return for it (see
                // `name_rule_reaches`): the relay's own host, metadata services and, for a
                // wildcard, loopback and link-local stay out of reach of a hostile DNS answer
                // (rebinding) unless an IP rule admits them. A mixed answer connects only to
                // the admitted addresses.
                NameDecision::Allowed => {
                    let exact = allow.names_exactly(&name, port);
                    all.iter()
                        .copied()
                        .filter(|sa| name_rule_reaches(sa.ip(), exact, &host_addrs) || allow.ip_allowed_on(sa.ip(), port, &host_addrs))
                        .collect()
                }
                _ => all.iter().copied().filter(|sa| allow.ip_allowed_on(sa.ip(), port, &host_addrs)).collect(),
            };
            if admitted.is_empty() {
                if all.is_empty() {
                    return Err(fail(Reply::HostUnreachable, Cause::Unreachable, format!("{name} resolved to no address")));
                }
                return Err(not_allowed(format!("{target} resolves to {all:?}, none of which an allow rule admits")));
            }
            admitted
        }
    };
    let mut last: Option<io::Error> = None;
    for sa in &candidates {
        match tokio::time::timeout_at(deadline, TcpStream::connect(sa)).await {
            Err(_) => return Err(fail(Reply::TtlExpired, Cause::Timeout, format!("connecting to {sa} timed out"))),
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Ok(Err(e)) => last = Some(e),
        }
    }
    let e = last.expect("at least one candidate was tried");
    let (reply, reason) = match e.kind() {
        io::ErrorKind::ConnectionRefused => (Reply::ConnectionRefused, Cause::Refused),
        io::ErrorKind::TimedOut => (Reply::TtlExpired, Cause::Timeout),
        _ if e.raw_os_error() == Some(101) => (Reply::NetworkUnreachable, Cause::Unreachable),
        _ => (Reply::HostUnreachable, Cause::Unreachable),
    };
    Err(fail(reply, reason, format!("connecting to {target} ({candidates:?}): {e}")))
}
