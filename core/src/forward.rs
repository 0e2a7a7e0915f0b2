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
    TcpListener::bind(&addr)
        .await
        .map_err(|e| Error::new(ErrorCode::Io, format!("cannot listen on {addr}: {e}; pick a free port (0 picks one)")))
}

/// Forward every connection accepted on `listener` to `target` through the relay, until
/// `shutdown` resolves. Connections in flight are allowed to finish.
pub async fn forward(listener: TcpListener, dialer: Dialer, target: Target, shutdown: impl Future<Output = ()>) -> Result<()> {
    let tasks = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let (sock, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = sock.set_nodelay(true);
        let (dialer, target) = (dialer.clone(), target.clone());
        tasks.spawn(async move {
            match dialer.dial_target(&target).await {
                Ok(stream) => {
                    if let Err(e) = stream.bridge(sock).await {
                        tracing::debug!(%peer, error = %e, "forwarded connection ended with an error");
                    }
                }
                Err(e) => tracing::warn!(%peer, code = %e.code(), "{e}"),
            }
        });
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
    match dialer.dial_target(&target).await {
        Ok(stream) => {
            let bound = sock.local_addr().ok();
            if socks::write_reply(&mut sock, Reply::Succeeded, bound).await.is_ok() {
                if let Err(e) = stream.bridge(sock).await {
                    tracing::debug!(%peer, error = %e, "proxied connection ended with an error");
                }
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
    let tasks = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        let (sock, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = sock.set_nodelay(true);
        tasks.spawn(serve_socks_client(sock, peer, dialer.clone()));
    }
    tasks.close();
    tasks.wait().await;
    Ok(())
}
