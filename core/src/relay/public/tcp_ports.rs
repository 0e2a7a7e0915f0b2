//! Public TCP ports: a listener that asks for one (`tcp_port` in its registration) gets the first
//! free port of `tcp_ports` ([`bind`]; in a cluster, free on every node, since every node mirrors
//! it: `cluster::mirrors`), and each connection on it becomes a stream to that listener
//! ([`forward`], through `route`) until its session ends ([`serve`]).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::error::{Error, ErrorCode};
use crate::protocol::{StreamHeader, Via};
use crate::relay::route::open_to_listener;
use crate::relay::RelayState;
use crate::session::Session;

/// Bind the first free port of the configured range (on a node of a cluster: free on every
/// node, since the port is mirrored by all of them).
pub(crate) async fn bind(state: &RelayState, name: &str) -> Result<Option<TcpListener>, Error> {
    let Some((lo, hi)) = state.cfg.tcp_ports else {
        return Err(Error::new(
            ErrorCode::NotAllowed,
            "this relay assigns no public TCP ports; set TUNNEL_TCP_PORTS on the relay (e.g. 20000-20099)",
        ));
    };
    for port in lo..=hi {
        if let Ok(l) = TcpListener::bind(SocketAddr::new(state.cfg.tcp_ports_bind, port)).await {
            match &state.cluster {
                Some(c) if !c.take_port(state, port, name).await => continue,
                _ => return Ok(Some(l)),
            }
        }
    }
    Err(Error::new(ErrorCode::General, format!("every public TCP port in {lo}-{hi} is in use; widen TUNNEL_TCP_PORTS on the relay")))
}

/// Forward connections on a listener's public TCP port until its session ends.
pub(crate) async fn serve(state: Arc<RelayState>, listener: TcpListener, name: String, session: Session) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    loop {
        let (sock, peer) = tokio::select! {
            _ = session.closed() => return,
            _ = state.draining.cancelled() => return,
            x = crate::transport::accept_backoff(&listener) => x,
        };
        state.tasks.spawn(forward(state.clone(), sock, peer, name.clone(), port));
    }
}

/// Deliver one connection on public TCP `port` to the listener `name` (here, or on the node of
/// the cluster that holds it).
pub(crate) async fn forward(state: Arc<RelayState>, sock: tokio::net::TcpStream, peer: SocketAddr, name: String, port: u16) {
    let _ = sock.set_nodelay(true);
    let header = StreamHeader { via: Via::Tcp, port, client: peer.to_string() };
    match open_to_listener(&state, &name, header, state.cfg.limits.connect_timeout).await {
        Ok(stream) => {
            let _ = crate::stream::bridge(stream, sock).await;
        }
        Err(e) => {
            state.metrics.refused(e.refusal());
            tracing::debug!(%peer, %name, error = ?e, "public TCP connection not delivered");
        }
    }
}
