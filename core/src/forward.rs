//! Local entry points that feed a [`Dialer`]: a port forward (`ssh -L` style, for drivers such as
//! psql) and a local SOCKS5 proxy (for curl, browsers, proxychains). Used by the CLI and the
//! bindings; each accepted connection becomes one tunnel stream.

use std::future::Future;
use std::net::SocketAddr;

use socks5_proto::Reply;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;

use crate::dialer::Dialer;
use crate::error::{Error, ErrorCode, Result};
use crate::socks::{self, ServerAuth, Target};

/// Bind a local address for a forward or proxy, with an error that names the address.
pub async fn bind_local(addr: &str) -> Result<TcpListener> {
    let addr = if addr.parse::<u16>().is_ok() { format!("127.0.0.1:{addr}") } else { addr.to_string() };
    TcpListener::bind(&addr).await.map_err(|e| Error::new(ErrorCode::Io, format!("cannot listen on {addr}: {e}; pick a free port (0 picks one)")))
}

/// Forward every connection accepted on `listener` to `target` through the relay, until
/// `shutdown` resolves. Connections in flight are allowed to finish.
pub async fn forward(listener: TcpListener, dialer: Dialer, target: Target, shutdown: impl Future<Output = ()>) -> Result<()> {
    serve_local(listener, shutdown, move |sock, peer| {
        let (dialer, target) = (dialer.clone(), target.clone());
        async move {
            let started = std::time::Instant::now();
            match dialer.dial_for(&target, &sock).await {
                Ok((stream, early)) => {
                    // The first bytes left with the CONNECT: count them with the rest.
                    let r = stream.bridge(sock).await.map(|(sent, received)| (sent + early, received));
                    crate::conn_log::closed("forwarded connection", &peer, &target, started, &r);
                }
                // The local connection is closed (as before early data): clients see the end at once.
                Err(e) => tracing::warn!(%peer, code = %e.code(), "{e}"),
            }
        }
    })
    .await
}

/// Accept local connections until `shutdown` resolves, each served by its own `serve` task;
/// then wait for the tasks in flight to finish.
async fn serve_local<F, Fut>(listener: TcpListener, shutdown: impl Future<Output = ()>, serve: F) -> Result<()>
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let tasks = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let (sock, peer) = tokio::select! {
            _ = &mut shutdown => break,
            x = crate::transport::accept_backoff(&listener) => x,
        };
        let _ = sock.set_nodelay(true);
        tasks.spawn(serve(sock, peer));
    }
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// The SOCKS5 reply that tells a local SOCKS client why a dial failed.
pub fn reply_for(code: ErrorCode) -> Reply {
    match code {
        ErrorCode::NotAllowed => Reply::ConnectionNotAllowed,
        ErrorCode::Unreachable => Reply::HostUnreachable,
        ErrorCode::Refused => Reply::ConnectionRefused,
        ErrorCode::Timeout => Reply::TtlExpired,
        _ => Reply::GeneralFailure,
    }
}

async fn serve_socks_client(mut sock: TcpStream, peer: SocketAddr, dialer: Dialer) {
    let addr = match socks::server_handshake(&mut sock, ServerAuth::Session).await {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "local SOCKS5 client sent a bad request");
            return;
        }
    };
    let target = match Target::from_address(&addr) {
        Ok(t) => t,
        Err(_) => {
            let _ = socks::write_reply(&mut sock, Reply::GeneralFailure, None).await;
            return;
        }
    };
    let started = std::time::Instant::now();
    match dialer.dial_target(&target).await {
        Ok(stream) => {
            let bound = sock.local_addr().ok();
            if socks::write_reply(&mut sock, Reply::Succeeded, bound).await.is_ok() {
                let r = stream.bridge(sock).await;
                crate::conn_log::closed("proxied connection", &peer, &target, started, &r);
            }
        }
        Err(e) => {
            tracing::warn!(%peer, code = %e.code(), "{e}");
            let _ = socks::write_reply(&mut sock, reply_for(e.code()), None).await;
        }
    }
}

/// A local SOCKS5 proxy (no auth; bind it to loopback) that tunnels every CONNECT through the
/// relay, until `shutdown` resolves.
pub async fn socks_proxy(listener: TcpListener, dialer: Dialer, shutdown: impl Future<Output = ()>) -> Result<()> {
    serve_local(listener, shutdown, move |sock, peer| serve_socks_client(sock, peer, dialer.clone())).await
}

/// The PROXY protocol v2 header announcing `client` (as the relay saw it) connecting to `local`.
pub fn proxy_v2_header(client: &str, local: SocketAddr) -> Vec<u8> {
    use ppp::v2::{Builder, Command, Protocol, Version};
    let built = match client.parse::<SocketAddr>() {
        Ok(src) => {
            // Both addresses must be of one family; map the local side if they differ.
            let dst = match (src, local) {
                (SocketAddr::V4(_), SocketAddr::V6(d)) => d.ip().to_ipv4_mapped().map(|ip| SocketAddr::from((ip, d.port()))).unwrap_or(local),
                (SocketAddr::V6(_), SocketAddr::V4(d)) => SocketAddr::from((d.ip().to_ipv6_mapped(), d.port())),
                _ => local,
            };
            Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (src, dst)).build()
        }
        // Unknown source: a LOCAL header tells the service to use the connection's own address.
        Err(_) => Builder::with_addresses(Version::Two | Command::Local, Protocol::Unspecified, ppp::v2::Addresses::Unspecified).build(),
    };
    built.expect("a PROXY v2 header with socket addresses always encodes")
}

/// How long `expose` and `exit_only` give open streams to finish after shutdown begins.
pub const DRAIN: std::time::Duration = std::time::Duration::from_secs(30);

/// Serve a local service through a listener (`tunnel listen`): every accepted stream is connected
/// to `to`, optionally preceded by a PROXY protocol v2 header carrying the original client
/// address. Runs until `shutdown` resolves or the listener is closed.
///
/// Shutdown drains (a rolling restart of a pool loses nothing): the listener retires at once
/// (the relay sends new streams to the pool's other replicas), the streams already queued are
/// still served, and open ones get [`DRAIN`] to finish before the session closes.
pub async fn expose(listener: crate::listener::Listener, to: String, proxy_protocol: bool, shutdown: impl Future<Output = ()>) -> Result<()> {
    let tasks = TaskTracker::new();
    tokio::pin!(shutdown);
    let mut retired = false;
    let result = loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown, if !retired => {
                listener.retire();
                retired = true;
                continue;
            }
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) if retired => break Ok(()),
                Err(e) => break Err(e),
            },
        };
        tasks.spawn(serve_exposed(stream, peer, to.clone(), proxy_protocol));
    };
    tasks.close();
    let deadline = tokio::time::Instant::now() + DRAIN;
    if tokio::time::timeout_at(deadline, tasks.wait()).await.is_err() {
        tracing::warn!("drain deadline passed; closing the streams still open");
    }
    // Exit streams (an exit listener that also exposes a service) are the session's to finish.
    listener.shutdown(deadline.saturating_duration_since(tokio::time::Instant::now())).await;
    tasks.wait().await;
    result
}

async fn serve_exposed(stream: crate::stream::TunnelStream, peer: crate::listener::PeerInfo, to: String, proxy_protocol: bool) {
    use tokio::io::AsyncWriteExt;
    let started = std::time::Instant::now();
    let mut local = match TcpStream::connect(&to).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(client = %peer.client, "cannot reach the local service at {to}: {e}; is it running?");
            return;
        }
    };
    let _ = local.set_nodelay(true);
    if proxy_protocol {
        let here = local.peer_addr().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        if local.write_all(&proxy_v2_header(&peer.client, here)).await.is_err() {
            return;
        }
    }
    // bridge counts (local → tunnel, tunnel → local); the log's are (client → service, back).
    let r = stream.bridge(local).await.map(|(back, forth)| (forth, back));
    let what = format!("exposed {} connection", peer.via.as_str());
    match r {
        // The relay ends a public HTTP exchange by resetting the stream once the response is
        // through (its connection to the client may stay open): the normal end, not an error.
        Err(e) if peer.via == crate::protocol::Via::Http && e.kind() == std::io::ErrorKind::ConnectionReset => {
            crate::conn_log::ended_by_peer(&what, &peer.client, &to, started, "closed by the relay")
        }
        r => crate::conn_log::closed(&what, &peer.client, &to, started, &r),
    }
}

/// Run an exit listener that exposes no service (`tunnel listen --exit` without `--to`): its exit
/// streams are served inside the listener; a stream dialed to its name is refused. On `shutdown`
/// it retires and gives open exit streams [`DRAIN`] to finish.
pub async fn exit_only(listener: crate::listener::Listener, shutdown: impl Future<Output = ()>) -> Result<()> {
    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            r = listener.accept() => match r {
                // Dropping an accepted stream resets it: this listener serves exit streams only.
                Ok((_, peer)) => tracing::info!(client = %peer.client, "a stream dialed this exit listener's name; it exposes no service (--to), refused"),
                Err(e) => break Err(e),
            },
        }
    };
    listener.retire();
    listener.shutdown(DRAIN).await;
    result
}
