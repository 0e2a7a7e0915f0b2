//! Relay side of reverse listeners: verify a listener's registration (Ed25519 signature over this
//! connection's nonce, name rules, key grants), hold its name in the registry while the session
//! lives (alone, or as one replica of a pool; as a plain or an exit listener), optionally serve a
//! public TCP port for it, and open streams to it for the three ways in (dial by name, public
//! HTTP, public TCP) plus dials routed `via` an exit.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use tokio::net::TcpListener;

use super::guard;
use super::metrics::Refusal;
use super::route::open_to_listener;
use super::RelayState;
use crate::error::{Error, ErrorCode};
use crate::identity::verify_registration;
use crate::mux::{FrameSink, FrameSource};
use crate::protocol::{ListenAck, ListenHello, StreamHeader, Via};
use crate::session::Session;

/// Serve a listener session from its registration to its end.
pub(super) async fn serve_listener(
    state: Arc<RelayState>,
    source: FrameSource,
    mut sink: FrameSink,
    peer: SocketAddr,
    nonce: [u8; 32],
    frame: &[u8],
) {
    let refuse = |code: ErrorCode, msg: String| ListenAck::refused(code, msg).encode_frame();
    let hello = match ListenHello::decode_frame(frame) {
        Ok(h) => h,
        Err(e) => {
            state.metrics.refused(Refusal::Malformed);
            let _ = sink.send(refuse(ErrorCode::Protocol, e.message().to_string())).await;
            return;
        }
    };
    let public_key: [u8; 32] = hello.public_key.as_slice().try_into().expect("decode_frame checked the length");
    let fail_delay = guard::failure_delay(&state, peer);
    if !verify_registration(&public_key, &hello.signature, &nonce, &hello.name) {
        state.metrics.refused(Refusal::Registration);
        guard::log_auth_failure(&state, peer, &format!("bad listener registration signature for the name {:?}", hello.name));
        guard::slow_failure(&state, fail_delay).await;
        let _ = sink.send(refuse(ErrorCode::AuthFailed, "the registration signature does not verify; use the listener's own key file".into())).await;
        return;
    }
    super::guard::handshake_finished();
    let name = hello.name.clone();
    let joining = super::registry::Joining { pool: hello.pool, exit: hello.exit };
    let reserved = state
        .access()
        .authorize(&public_key, &name)
        .and_then(|()| state.registry.reserve(&name, public_key, &hello.instance, joining, state.cfg.limits.max_pending_accepts));
    let id = match reserved {
        Ok(id) => id,
        Err(e) => {
            state.metrics.refused(Refusal::Registration);
            tracing::info!(%peer, %name, reason = %e, "listener registration refused");
            let _ = sink.send(refuse(e.code(), e.message().to_string())).await;
            return;
        }
    };
    // From here the name is ours until the session ends.
    let mut release = ReleaseOnDrop { state: state.clone(), name: name.clone(), id, tcp_port: None };
    if let Some(cluster) = &state.cluster {
        let mode = super::cluster::mode_of(joining, hello.h2c, hello.tls_passthrough);
        if let Err(e) = cluster.claim(&state, &name, &public_key, &hello.instance, mode).await {
            state.metrics.refused(Refusal::Registration);
            tracing::info!(%peer, %name, reason = %e, "listener registration refused by the cluster");
            let _ = sink.send(refuse(e.code(), e.message().to_string())).await;
            return;
        }
    }
    let tcp = if hello.tcp_port { bind_public_port(&state, &name).await } else { Ok(None) };
    let tcp = match tcp {
        Ok(t) => {
            release.tcp_port = t.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.port());
            t
        }
        Err(e) => {
            let _ = sink.send(refuse(e.code(), e.message().to_string())).await;
            return;
        }
    };
    let ack = ListenAck {
        status: 0,
        message: String::new(),
        name: name.clone(),
        http_url: state.public_http_url(&name).unwrap_or_default(),
        https_url: state.public_https_url(&name).unwrap_or_default(),
        tcp_addr: tcp.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.to_string()).unwrap_or_default(),
        pool: joining.pool,
        exit: joining.exit,
    };
    if sink.send(ack.encode_frame()).await.is_err() {
        return;
    }
    let (session, _close) = super::mux_server::server_session(&state, source, sink);
    state.registry.attach(&name, id, session.clone());
    let mode = match (hello.h2c, hello.tls_passthrough) {
        (_, true) => super::public::listeners::Mode::TlsPassthrough,
        (true, false) => super::public::listeners::Mode::H2c,
        _ => super::public::listeners::Mode::Http1,
    };
    state.public.listeners.registered(&name, id, mode);
    state.metrics.listeners_active.fetch_add(1, Relaxed);
    tracing::info!(%peer, %name, tcp = %ack.tcp_addr, pool = joining.pool, exit = joining.exit, "listener registered");
    if let Some(l) = tcp {
        state.tasks.spawn(serve_public_port(state.clone(), l, name.clone(), session.clone()));
    }
    let mut draining = false;
    let mut drain_tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            s = session.accept() => match s {
                // Listeners take streams; they do not open them.
                Some(mut stream) => stream.reset(ErrorCode::Protocol),
                None => break,
            },
            _ = state.kill.cancelled() => {
                session.close(ErrorCode::RelayUnavailable, "the relay shut down");
                break;
            }
            _ = state.draining.cancelled(), if !draining => draining = true,
            _ = drain_tick.tick(), if draining => {
                if session.stream_count() == 0 {
                    session.close(ErrorCode::RelayUnavailable, "the relay shut down (drained)");
                    break;
                }
            }
        }
    }
    state.metrics.listeners_active.fetch_sub(1, Relaxed);
    tracing::info!(%peer, %name, reason = %session.close_reason().map(|e| e.to_string()).unwrap_or_default(), "listener session ended");
}

struct ReleaseOnDrop {
    state: Arc<RelayState>,
    name: String,
    id: u64,
    /// The public TCP port the session holds (freed in the cluster's port table too).
    tcp_port: Option<u16>,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.state.registry.release(&self.name, self.id);
        self.state.public.listeners.released(&self.name, self.id);
        if let Some(cluster) = &self.state.cluster {
            if !self.state.registry.contains(&self.name) {
                cluster.released(&self.state, &self.name);
            }
            if let Some(port) = self.tcp_port {
                cluster.port_released(&self.state, port, &self.name);
            }
        }
    }
}

/// Bind the first free port of the configured range (on a node of a cluster: free on every
/// node, since the port is mirrored by all of them).
async fn bind_public_port(state: &RelayState, name: &str) -> Result<Option<TcpListener>, Error> {
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
async fn serve_public_port(state: Arc<RelayState>, listener: TcpListener, name: String, session: Session) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    loop {
        let (sock, peer) = tokio::select! {
            _ = session.closed() => return,
            _ = state.draining.cancelled() => return,
            x = crate::transport::accept_backoff(&listener) => x,
        };
        state.tasks.spawn(forward_public_tcp(state.clone(), sock, peer, name.clone(), port));
    }
}

/// Deliver one connection on public TCP `port` to the listener `name` (here, or on the node of
/// the cluster that holds it).
pub(super) async fn forward_public_tcp(state: Arc<RelayState>, sock: tokio::net::TcpStream, peer: SocketAddr, name: String, port: u16) {
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
