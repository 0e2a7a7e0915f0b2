//! The relay's QUIC tunnel endpoint (`quic_listen`, UDP): the front door for `quic://` clients,
//! then the same session serving as every other transport (`session::serve_mux`).
//!
//! The front door's rules are the TCP endpoints': a source over `max_connections_per_source` or
//! `max_handshakes_per_source`, or a relay over `max_connections` or `max_handshakes`, is refused
//! (`CONNECTION_REFUSED`) before the connection costs more than quinn's record of its first
//! datagram; one deadline (`handshake_timeout`) covers the TLS handshake, the control stream and
//! the hello. Under a flood of Initials, a source whose address is not yet validated is sent a
//! Retry first ([`RETRY_ABOVE`] handshakes in flight): a spoofed address never answers it, so it
//! never reaches admission, and a real client pays one round trip. quinn keeps at most
//! `max_handshakes` connections waiting to be accepted, each with at most 64 KiB of datagrams.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::metrics::Refusal;
use super::{guard, session, RelayState};
use crate::session::{Link, QuicLink};
use crate::transport::quic;

/// Handshakes in flight above which a source with an unvalidated address is sent a Retry first.
pub(super) const RETRY_ABOVE: usize = 32;

/// Counts the QUIC handshakes in flight (admitted, not yet authenticated or failed).
#[derive(Default)]
pub(super) struct InFlight(AtomicUsize);

/// One handshake counted in [`InFlight`] until it is dropped.
struct Entered(Arc<InFlight>);

impl InFlight {
    fn enter(self: &Arc<Self>) -> Entered {
        self.0.fetch_add(1, Ordering::Relaxed);
        Entered(self.clone())
    }
    fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Bind the QUIC endpoint on `addr` with the tunnel endpoint's certificate.
pub(super) fn bind(
    state_cfg: &crate::config::RelayConfig,
    tls: Option<&tokio_rustls::TlsAcceptor>,
    addr: SocketAddr,
) -> crate::error::Result<quinn::Endpoint> {
    use crate::error::{Error, ErrorCode};
    let Some(tls) = tls else {
        return Err(Error::config(
            "TUNNEL_QUIC_LISTEN is set but the tunnel endpoint has no certificate: QUIC always runs TLS 1.3, so set TUNNEL_TLS_CERT and TUNNEL_TLS_KEY",
        ));
    };
    let limits = &state_cfg.limits;
    let server = quic::server_config(tls.config(), &crate::mux::MuxConfig::from(limits), state_cfg.quic_congestion, limits.max_handshakes)?;
    quic::endpoint(addr, Some(server)).map_err(|e| {
        Error::new(ErrorCode::Io, format!("cannot listen on UDP {addr} (TUNNEL_QUIC_LISTEN): {e}; pick a free address or stop what uses it"))
    })
}

/// Accept QUIC connections until the relay drains.
pub(super) async fn accept_loop(state: Arc<RelayState>, endpoint: quinn::Endpoint) {
    let in_flight = Arc::new(InFlight::default());
    loop {
        let incoming = tokio::select! {
            _ = state.draining.cancelled() => break,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let peer = incoming.remote_address();
        if !incoming.remote_address_validated() && incoming.may_retry() && in_flight.count() >= RETRY_ABOVE {
            state.metrics.quic_retries.fetch_add(1, Ordering::Relaxed);
            state.metrics.turned_away.fetch_add(1, Ordering::Relaxed);
            let _ = incoming.retry();
            continue;
        }
        let ticket = match state.guards.admissions.admit(peer.ip()) {
            Ok(t) => t,
            Err(why) => {
                state.metrics.refused(why);
                tracing::debug!(%peer, reason = ?why, "QUIC connection refused at admission");
                state.metrics.turned_away.fetch_add(1, Ordering::Relaxed);
                incoming.refuse();
                continue;
            }
        };
        let Ok(permit) = state.guards.connections.clone().try_acquire_owned() else {
            state.metrics.refused(Refusal::Overloaded);
            tracing::warn!(%peer, limit = state.cfg.limits.max_connections, "connection limit reached; refusing a QUIC connection");
            state.metrics.turned_away.fetch_add(1, Ordering::Relaxed);
            incoming.refuse();
            continue;
        };
        let st = state.clone();
        let finished = ticket.finished_flag();
        // Counted here, not in the task: a burst of Initials is taken in one go, before any task runs.
        let counted = in_flight.enter();
        state.tasks.spawn(guard::with_ticket(ticket, async move {
            let _permit = permit;
            let deadline = async {
                tokio::time::sleep(st.cfg.limits.handshake_timeout).await;
                if finished.load(Ordering::Relaxed) {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = st.kill.cancelled() => {}
                _ = serve(st.clone(), incoming, peer, counted) => {}
                _ = deadline => {
                    st.metrics.refused(Refusal::HandshakeTimeout);
                    tracing::debug!(%peer, "QUIC handshake deadline passed; connection closed");
                }
            }
        }));
    }
    // New connections are refused from here; the sessions drain on their own tasks.
    endpoint.set_server_config(None);
}

/// One connection: the QUIC handshake, its control stream, then the session.
async fn serve(state: Arc<RelayState>, incoming: quinn::Incoming, peer: SocketAddr, counted: Entered) {
    let handshake = async move {
        let _counted = counted;
        let conn = incoming.accept().map_err(|e| e.to_string())?.await.map_err(|e| e.to_string())?;
        let nonce = quic::hello_nonce(&conn).map_err(|e| e.to_string())?;
        let (send, recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((conn, nonce, send, recv))
    };
    let (conn, nonce, send, recv) = match handshake.await {
        Ok(x) => x,
        Err(why) => return tracing::debug!(%peer, %why, "QUIC handshake failed"),
    };
    let (source, sink) = quic::control_frames(send, recv);
    let link = Link { source, sink, quic: Some(QuicLink { conn: conn.clone(), endpoint: None }) };
    let limit = state.cfg.limits.handshake_timeout;
    session::serve_mux(state, link, peer, nonce).await;
    // A refused hello ends here with the connection still open. The client closes it once it has
    // read the refusal (closing first could discard the refusal unread at the client, which would
    // then report a lost connection instead of the refusal's code); one that does not is closed
    // at the handshake deadline.
    if conn.close_reason().is_none() {
        let _ = tokio::time::timeout(limit, conn.closed()).await;
        conn.close(quinn::VarInt::from_u32(crate::error::ErrorCode::Closed.number()), b"");
    }
}
