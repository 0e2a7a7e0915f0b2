//! SOCKS5 (RFC 1928, with RFC 1929 auth in classic mode) as spoken at the start of every tunnel
//! stream, both ends, on top of `socks5-proto`'s codec. The reply code is the error contract:
//! [`reply_error`] turns it into a typed [`Error`] on the dialing side.

use std::net::{IpAddr, SocketAddr};
use std::time::SystemTime;

use bytes::BytesMut;
use socks5_proto::handshake::{self, password, Method};
use socks5_proto::{Address, Command, Reply, Request, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::auth::{AuthRejection, Key, KeySet};
use crate::error::{Error, ErrorCode, Result};

/// A dial target: host (name or IP) and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// Port, or 0 for a listener's default port label.
    pub port: u16,
}

impl Target {
    /// Parse `host:port` (`[v6]:port` for IPv6).
    pub fn parse(s: &str) -> Result<Target> {
        let s = s.trim();
        let bad = || Error::argument(format!("target {s:?} must be host:port, like db.internal:5432 or [::1]:80"));
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(Target { host: sa.ip().to_string(), port: sa.port() });
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || host.contains(':') || host.len() > 255 {
            return Err(bad());
        }
        let port = port.parse::<u16>().map_err(|_| bad())?;
        Ok(Target { host: host.to_string(), port })
    }

    /// This target reached through the exit listener `exit` (the `via` dial option): the
    /// relay routes the CONNECT to that exit, which connects it inside its own network. On the
    /// wire the host becomes `HOST@EXIT` ([`split_exit_route`]).
    pub fn through_exit(&self, exit: &str) -> Result<Target> {
        let raw = exit.trim();
        let exit = raw.to_ascii_lowercase();
        if !crate::identity::valid_name(&exit) {
            return Err(Error::argument(format!("via {raw:?} is not a listener name: use 1-63 lowercase letters, digits and '-'")));
        }
        if self.exit_route().is_some() {
            return Err(Error::argument(format!("{self} already names an exit listener; give one via")));
        }
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        let host = format!("{host}{}{exit}", EXIT_ROUTE_SEPARATOR);
        if host.len() > 255 {
            return Err(Error::argument(format!("{self} via {exit}: host and exit name together must fit 255 bytes")));
        }
        Ok(Target { host, port: self.port })
    }

    /// The (target, exit) of a target made by [`Target::through_exit`].
    pub fn exit_route(&self) -> Option<(Target, String)> {
        split_exit_route(&Address::DomainAddress(self.host.as_bytes().to_vec(), self.port))
    }

    /// As a SOCKS5 address (IP literals use the IP address types).
    pub fn to_address(&self) -> Address {
        match self.host.parse::<IpAddr>() {
            Ok(ip) => Address::SocketAddress(SocketAddr::new(ip, self.port)),
            Err(_) => Address::DomainAddress(self.host.as_bytes().to_vec(), self.port),
        }
    }

    /// From a SOCKS5 address.
    pub fn from_address(a: &Address) -> Result<Target> {
        match a {
            Address::SocketAddress(sa) => Ok(Target { host: sa.ip().to_string(), port: sa.port() }),
            Address::DomainAddress(d, port) => {
                let host = std::str::from_utf8(d).map_err(|_| Error::protocol("SOCKS5 domain is not UTF-8"))?;
                Ok(Target { host: host.to_string(), port: *port })
            }
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

fn io_err(what: &str) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::from_io(e, what)
}

fn socks_err(e: socks5_proto::Error) -> Error {
    match e {
        socks5_proto::Error::Io(e) => Error::from_io(e, "reading the relay's SOCKS5 answer"),
        e => Error::protocol(format!("the relay sent a malformed SOCKS5 answer ({e})")),
    }
}

/// What a relay of a cluster puts in a failure reply's address (which RFC 1928 leaves unused on a
/// failure, so other clients ignore it) when it cannot look up a listener name because its
/// cluster registry (Redis) is unreachable: the dialer then reports `RELAY_UNAVAILABLE`.
pub const CLUSTER_UNAVAILABLE_HINT: &str = "cluster-registry-unreachable";

fn cluster_unavailable_error(target: &Target) -> Error {
    Error::new(
        ErrorCode::RelayUnavailable,
        format!(
            "the relay could not look up the listener {}: its cluster registry (Redis) is unreachable, so it can reach only the listeners connected to it; retry shortly, and check the relays' TUNNEL_CLUSTER_REDIS",
            target.host
        ),
    )
}

/// Answer a CONNECT for a listener name with [`CLUSTER_UNAVAILABLE_HINT`] (general failure).
pub async fn write_cluster_unavailable<S: AsyncWrite + Unpin>(io: &mut S) -> std::io::Result<()> {
    let addr = Address::DomainAddress(CLUSTER_UNAVAILABLE_HINT.as_bytes().to_vec(), 0);
    let mut buf = BytesMut::new();
    Response::new(Reply::GeneralFailure, addr).write_to_buf(&mut buf);
    io.write_all(&buf).await?;
    io.flush().await
}

/// What a relay puts in a failure reply's address when the listener a CONNECT named refused the
/// stream for good, followed by the refusal's code name (`listener-refused:E2E_REFUSED`): the
/// dialer then fails with that code. The reply itself is "not allowed" for other SOCKS clients.
pub const LISTENER_REFUSED_HINT: &str = "listener-refused:";

/// Answer a CONNECT for a listener name that refused the stream with `code`.
pub async fn write_listener_refused<S: AsyncWrite + Unpin>(io: &mut S, code: ErrorCode) -> std::io::Result<()> {
    let addr = Address::DomainAddress(format!("{LISTENER_REFUSED_HINT}{}", code.name()).into_bytes(), 0);
    let mut buf = BytesMut::new();
    Response::new(Reply::ConnectionNotAllowed, addr).write_to_buf(&mut buf);
    io.write_all(&buf).await?;
    io.flush().await
}

/// The error for a listener's refusal of a stream (`code` from [`LISTENER_REFUSED_HINT`]).
pub fn listener_refused_error(code: ErrorCode, target: &Target) -> Error {
    let name = &target.host;
    let why = match code {
        ErrorCode::E2eRefused => format!("the listener {name} refused this stream: it is end-to-end encrypted and takes only e2e dials; dial it with --e2e (e2e option in the bindings)"),
        ErrorCode::NotAllowed => format!("the listener {name} refused this stream: it is an exit listener that exposes no service; reach targets through it with --via {name}"),
        _ => format!("the listener {name} refused this stream"),
    };
    Error::new(code, why)
}

/// The typed error for a non-zero SOCKS5 reply to a CONNECT of `target`.
pub fn reply_error(reply: Reply, target: &Target) -> Error {
    if let Some((inner, exit)) = target.exit_route() {
        return exit_reply_error(reply, &inner, &exit);
    }
    match reply {
        Reply::ConnectionNotAllowed => Error::new(
            ErrorCode::NotAllowed,
            format!("the relay refused {target}: it is not in the relay's allowlist; add it to TUNNEL_ALLOW (or EMISSARY_ALLOWED_PROXY_TARGETS) on the relay"),
        ),
        Reply::HostUnreachable | Reply::NetworkUnreachable if target.port == 0 => Error::new(
            ErrorCode::Unreachable,
            format!(
                "no listener named {} is online on this relay; check the name (`tunnel listen` prints it) and that the listener is running",
                target.host
            ),
        ),
        Reply::HostUnreachable | Reply::NetworkUnreachable => Error::new(
            ErrorCode::Unreachable,
            format!(
                "the relay could not resolve or reach {target}; check the name and that the relay's network can reach it (for a listener's name: that the listener is online)"
            ),
        ),
        Reply::ConnectionRefused => Error::new(
            ErrorCode::Refused,
            format!("{target} refused the relay's connection; is the service listening on that port?"),
        ),
        Reply::TtlExpired => Error::new(
            ErrorCode::Timeout,
            format!("the relay timed out connecting to {target}; is a firewall dropping packets?"),
        ),
        Reply::CommandNotSupported | Reply::AddressTypeNotSupported => {
            Error::protocol(format!("the relay does not support this request for {target} ({reply:?})"))
        }
        Reply::GeneralFailure | Reply::Succeeded => {
            Error::new(ErrorCode::General, format!("the relay failed to connect to {target} (SOCKS5 general failure); see the relay's log"))
        }
    }
}

/// [`reply_error`] for a target reached through the exit listener `exit`: same codes, messages
/// naming the exit.
fn exit_reply_error(reply: Reply, target: &Target, exit: &str) -> Error {
    match reply {
        Reply::ConnectionNotAllowed => Error::new(
            ErrorCode::NotAllowed,
            format!("{target} via the exit listener {exit:?} was refused: it is not in {exit}'s allowlist (its --allow rules), or the relay does not let this key use {exit} (TUNNEL_EXITS on the relay)"),
        ),
        Reply::HostUnreachable | Reply::NetworkUnreachable => Error::new(
            ErrorCode::Unreachable,
            format!("{target} via the exit listener {exit:?} could not be reached: {exit} is offline or unknown to the relay (TUNNEL_EXITS), or it could not resolve or reach {target}"),
        ),
        Reply::ConnectionRefused => Error::new(
            ErrorCode::Refused,
            format!("{target} refused the connection from the exit listener {exit:?} (or {exit} is not accepting streams); is the service listening?"),
        ),
        Reply::TtlExpired => Error::new(ErrorCode::Timeout, format!("the exit listener {exit:?} timed out connecting to {target}")),
        Reply::CommandNotSupported | Reply::AddressTypeNotSupported => {
            Error::protocol(format!("the relay or the exit listener {exit:?} does not support this request for {target} ({reply:?})"))
        }
        Reply::GeneralFailure | Reply::Succeeded => {
            Error::new(ErrorCode::General, format!("the exit listener {exit:?} failed to connect to {target}; see its log"))
        }
    }
}

/// Classic mode, client side: greeting (offer 0x00 and 0x02, as Emissary's Go client does) and
/// RFC 1929 with the Emissary proof.
pub async fn client_auth<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S, key: &Key, nonce: &[u8]) -> Result<()> {
    let (date, sig) = key.sign(nonce, SystemTime::now());
    let mut buf = BytesMut::new();
    handshake::Request::new(vec![Method::NONE, Method::PASSWORD]).write_to_buf(&mut buf);
    io.write_all(&buf).await.map_err(io_err("sending the SOCKS5 greeting"))?;
    io.flush().await.map_err(io_err("sending the SOCKS5 greeting"))?;
    let chosen = handshake::Response::read_from(io).await.map_err(socks_err)?.method;
    if chosen == Method::NONE {
        return Ok(()); // a relay that wants no auth (not Emissary); nothing to prove
    }
    if chosen != Method::PASSWORD {
        return Err(Error::protocol(format!("the relay chose SOCKS5 method {:#04x}; expected username/password (0x02)", chosen.0)));
    }
    let mut buf = BytesMut::new();
    password::Request::new(date.into_bytes(), sig.into_bytes()).write_to_buf(&mut buf);
    io.write_all(&buf).await.map_err(io_err("sending credentials"))?;
    io.flush().await.map_err(io_err("sending credentials"))?;
    // RFC 1929 answer: version 0x01, then status (0x00 = success, anything else = failure).
    // Read by hand: Emissary answers failure with 0x01, which socks5-proto's parser rejects.
    let mut answer = [0u8; 2];
    io.read_exact(&mut answer).await.map_err(io_err("reading the relay's auth answer"))?;
    if answer[0] != 0x01 {
        return Err(Error::protocol(format!("the relay sent a malformed auth answer (version {:#04x}, expected 0x01)", answer[0])));
    }
    let ok = answer[1] == 0x00;
    if !ok {
        return Err(Error::new(
            ErrorCode::AuthFailed,
            format!(
                "the relay rejected key id {}: the secret is wrong, the key id is unknown there, or the clocks differ by more than 15 minutes; check TUNNEL_KEY against the relay's TUNNEL_AUTH_KEYS",
                key.kid
            ),
        ));
    }
    Ok(())
}

/// Send a CONNECT (after the greeting in classic mode); `pipelined_greeting` prepends a no-auth
/// greeting so a multiplexed stream opens in one round trip.
pub async fn client_connect<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S, target: &Target, pipelined_greeting: bool) -> Result<SocketAddr> {
    let address = target.to_address();
    // SOCKS5 carries a name's length in one byte, and socks5-proto truncates it silently: a longer
    // name (a `Target` built by hand rather than by `Target::parse`) would send the relay a
    // different, shorter name followed by bytes of the name as further protocol data.
    if let Address::DomainAddress(name, _) = &address {
        if name.is_empty() || name.len() > 255 {
            return Err(Error::argument(format!("target host must be 1-255 bytes long, got {} bytes", name.len())));
        }
    }
    let mut buf = BytesMut::new();
    if pipelined_greeting {
        handshake::Request::new(vec![Method::NONE]).write_to_buf(&mut buf);
    }
    Request::new(Command::Connect, address).write_to_buf(&mut buf);
    io.write_all(&buf).await.map_err(io_err("sending the CONNECT request"))?;
    io.flush().await.map_err(io_err("sending the CONNECT request"))?;
    if pipelined_greeting {
        let m = handshake::Response::read_from(io).await.map_err(socks_err)?.method;
        if m != Method::NONE {
            return Err(Error::protocol(format!("the relay chose SOCKS5 method {:#04x} on an authenticated session", m.0)));
        }
    }
    let resp = Response::read_from(io).await.map_err(socks_err)?;
    if resp.reply != Reply::Succeeded {
        if let Address::DomainAddress(hint, _) = &resp.address {
            if hint.as_slice() == CLUSTER_UNAVAILABLE_HINT.as_bytes() {
                return Err(cluster_unavailable_error(target));
            }
            if let Some(code) =
                hint.strip_prefix(LISTENER_REFUSED_HINT.as_bytes()).and_then(|c| std::str::from_utf8(c).ok()).and_then(ErrorCode::from_name)
            {
                return Err(listener_refused_error(code, target));
            }
        }
        return Err(reply_error(resp.reply, target));
    }
    Ok(match resp.address {
        Address::SocketAddress(sa) => sa,
        Address::DomainAddress(..) => SocketAddr::from(([0, 0, 0, 0], 0)),
    })
}

/// The bytes of a pipelined no-auth greeting followed by a CONNECT for `target` (what a
/// multiplexed stream sends first).
pub(crate) fn pipelined_connect_request(target: &Target) -> Result<BytesMut> {
    let address = target.to_address();
    if let Address::DomainAddress(name, _) = &address {
        if name.is_empty() || name.len() > 255 {
            return Err(Error::argument(format!("target host must be 1-255 bytes long, got {} bytes", name.len())));
        }
    }
    let mut buf = BytesMut::new();
    handshake::Request::new(vec![Method::NONE]).write_to_buf(&mut buf);
    Request::new(Command::Connect, address).write_to_buf(&mut buf);
    Ok(buf)
}

/// Parse the relay's answers to [`pipelined_connect_request`] from the first bytes of the stream:
/// `None` while incomplete, else how many bytes they took, or the refusal as an error.
pub(crate) fn parse_pipelined_reply(b: &[u8], target: &Target) -> Option<Result<usize>> {
    if b.len() < 2 {
        return None;
    }
    if b[0] != 0x05 || b[1] != 0x00 {
        return Some(Err(Error::protocol(format!("the relay chose SOCKS5 method {:#04x} on an authenticated session", b[1]))));
    }
    let r = &b[2..];
    if r.len() < 4 {
        return None;
    }
    let addr_len = match r[3] {
        0x01 => 4,
        0x04 => 16,
        0x03 => 1 + usize::from(*r.get(4)?),
        t => return Some(Err(Error::protocol(format!("the relay's SOCKS5 reply has address type {t:#04x}")))),
    };
    let len = 2 + 4 + addr_len + 2;
    if b.len() < len {
        return None;
    }
    if r[0] != 0x05 {
        return Some(Err(Error::protocol("the relay's SOCKS5 reply is malformed")));
    }
    Some(match Reply::try_from(r[1]) {
        Ok(Reply::Succeeded) => Ok(len),
        Ok(reply) => Err(reply_error(reply, target)),
        Err(_) => Err(Error::protocol(format!("the relay answered with unknown SOCKS5 reply {:#04x}", r[1]))),
    })
}

/// How the relay side authenticates a stream's SOCKS5 greeting.
pub enum ServerAuth<'a> {
    /// Classic mode: insist on method 0x02 and check the proof against this connection's nonce;
    /// a failure is answered (`01 01`) only after `fail_delay`.
    Proof { keys: &'a KeySet, nonce: &'a [u8], fail_delay: std::time::Duration },
    /// The session is already authenticated: accept method 0x00.
    Session,
}

/// Why the relay side refused a stream before CONNECT.
#[derive(Debug, thiserror::Error)]
pub enum ServerHandshakeError {
    /// Credentials were refused (the client was told).
    #[error("authentication failed: {0}")]
    Auth(AuthRejection),
    /// Bytes that are not the SOCKS5 we expect (the client was told where possible).
    #[error("malformed SOCKS5: {0}")]
    Malformed(String),
    /// The transport failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

fn malformed(e: impl std::fmt::Display) -> ServerHandshakeError {
    ServerHandshakeError::Malformed(e.to_string())
}

/// Relay side: greeting, auth (classic), and the CONNECT request. Unsupported commands get
/// reply 0x07 here; the caller answers the CONNECT.
pub async fn server_handshake<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S, auth: ServerAuth<'_>) -> Result<Address, ServerHandshakeError> {
    let greeting = handshake::Request::read_from(io).await.map_err(|e| match e {
        socks5_proto::Error::Io(e) => ServerHandshakeError::Io(e),
        e => malformed(e),
    })?;
    let wanted = match auth {
        ServerAuth::Proof { .. } => Method::PASSWORD,
        ServerAuth::Session => Method::NONE,
    };
    if !greeting.methods.contains(&wanted) {
        handshake::Response::new(Method::UNACCEPTABLE).write_to(io).await?;
        io.flush().await?;
        return Err(malformed(format!("client did not offer method {:#04x}", wanted.0)));
    }
    handshake::Response::new(wanted).write_to(io).await?;
    io.flush().await?;
    if let ServerAuth::Proof { keys, nonce, fail_delay } = auth {
        let creds = password::Request::read_from(io).await.map_err(malformed)?;
        let date = String::from_utf8_lossy(&creds.username);
        let sig = String::from_utf8_lossy(&creds.password);
        let verdict = keys.verify(nonce, &date, &sig, SystemTime::now());
        if verdict.is_err() && !fail_delay.is_zero() {
            tokio::time::sleep(fail_delay).await;
        }
        // Status byte as Emissary (and most SOCKS5 servers) send it: 0x00 success, 0x01 failure.
        io.write_all(&[0x01, if verdict.is_ok() { 0x00 } else { 0x01 }]).await?;
        io.flush().await?;
        if let Err(r) = verdict {
            return Err(ServerHandshakeError::Auth(r));
        }
    }
    let req = match Request::read_from(io).await {
        Ok(r) => r,
        Err(socks5_proto::Error::Io(e)) => return Err(ServerHandshakeError::Io(e)),
        Err(e) => {
            let reply = match &e {
                socks5_proto::Error::Protocol(socks5_proto::ProtocolError::InvalidCommand { .. }) => Reply::CommandNotSupported,
                socks5_proto::Error::Protocol(socks5_proto::ProtocolError::InvalidAddressTypeInRequest { .. }) => Reply::AddressTypeNotSupported,
                _ => Reply::GeneralFailure,
            };
            let _ = write_reply(io, reply, None).await;
            return Err(malformed(e));
        }
    };
    if req.command != Command::Connect {
        write_reply(io, Reply::CommandNotSupported, None).await?;
        return Err(malformed(format!("command {:?} is not supported (only CONNECT)", req.command)));
    }
    Ok(req.address)
}

/// Relay side: answer the CONNECT.
pub async fn write_reply<S: AsyncWrite + Unpin>(io: &mut S, reply: Reply, bound: Option<SocketAddr>) -> std::io::Result<()> {
    let addr = bound.map(Address::SocketAddress).unwrap_or_else(Address::unspecified);
    let mut buf = BytesMut::new();
    Response::new(reply, addr).write_to_buf(&mut buf);
    io.write_all(&buf).await?;
    io.flush().await
}

/// Separates a target from the exit listener named in a dial: a dialer reaches `HOST:PORT`
/// through the exit `EXIT` with a SOCKS5 CONNECT to the domain `HOST@EXIT`, port `PORT`. `@`
/// never occurs in a host name or a listener name, so the form cannot be taken for a real target
/// (a relay that predates exits refuses it as an invalid host name).
pub const EXIT_ROUTE_SEPARATOR: char = '@';

/// The target and exit name of a `HOST@EXIT` CONNECT, if it is one.
pub fn split_exit_route(addr: &socks5_proto::Address) -> Option<(Target, String)> {
    let socks5_proto::Address::DomainAddress(d, port) = addr else { return None };
    let text = std::str::from_utf8(d).ok()?;
    let (host, exit) = text.rsplit_once(EXIT_ROUTE_SEPARATOR)?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    Some((Target { host: host.to_string(), port: *port }, exit.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(Target::parse("db.internal:5432").unwrap(), Target { host: "db.internal".into(), port: 5432 });
        assert_eq!(Target::parse("[::1]:80").unwrap(), Target { host: "::1".into(), port: 80 });
        assert_eq!(Target::parse("[::1]:80").unwrap().to_string(), "[::1]:80");
        for bad in ["db", "db:", ":5", "db:99999", "::1:80"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn over_long_names_are_refused_not_truncated() {
        // 265 bytes: socks5-proto would write length 9 and the relay would read "aaaaaaaaa".
        let t = Target { host: "a".repeat(265), port: 80 };
        let mut sink = tokio::io::sink();
        let mut io = tokio::io::join(tokio::io::empty(), &mut sink);
        let e = client_connect(&mut io, &t, true).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidArgument, "{e}");
    }

    #[test]
    fn reply_codes_map_to_stable_codes() {
        let t = Target::parse("x:1").unwrap();
        assert_eq!(reply_error(Reply::ConnectionNotAllowed, &t).code(), ErrorCode::NotAllowed);
        assert_eq!(reply_error(Reply::HostUnreachable, &t).code(), ErrorCode::Unreachable);
        assert_eq!(reply_error(Reply::ConnectionRefused, &t).code(), ErrorCode::Refused);
        assert_eq!(reply_error(Reply::TtlExpired, &t).code(), ErrorCode::Timeout);
        assert_eq!(reply_error(Reply::GeneralFailure, &t).code(), ErrorCode::General);
        assert!(reply_error(Reply::ConnectionNotAllowed, &t).message().contains("TUNNEL_ALLOW"));
    }

    #[test]
    fn exit_routes() {
        let a = Address::DomainAddress(b"db.internal@Corp".to_vec(), 5432);
        let (t, exit) = split_exit_route(&a).unwrap();
        assert_eq!((t.host.as_str(), t.port, exit.as_str()), ("db.internal", 5432, "corp"));
        let a = Address::DomainAddress(b"[::1]@corp".to_vec(), 80);
        assert_eq!(split_exit_route(&a).unwrap().0.host, "::1");
        assert!(split_exit_route(&Address::DomainAddress(b"db.internal".to_vec(), 1)).is_none());
    }
}
