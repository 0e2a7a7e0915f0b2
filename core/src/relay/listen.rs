//! Relay side of reverse listeners: verify a listener's registration (Ed25519 signature over this
//! connection's nonce, name rules, key grants), hold its name in the registry while the session
//! lives (alone, or as one replica of a pool; as a plain or an exit listener), and optionally
//! give it a public TCP port (`public::tcp_ports`). Streams reach it through `route`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;

use super::guard;
use super::metrics::Refusal;
use super::names::Registration;
use super::public::tcp_ports;
use super::RelayState;
use crate::error::ErrorCode;
use crate::identity::verify_registration;
use crate::protocol::{ListenAck, ListenHello};
use crate::session::Link;

/// Serve a listener session from its registration to its end.
pub(super) async fn serve_listener(state: Arc<RelayState>, link: Link, peer: SocketAddr, nonce: [u8; 32], frame: &[u8]) {
    let Link { source, mut sink, quic } = link;
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
    let registration = Registration::of_hello(&hello);
    let reserved = state
        .access()
        .authorize(&public_key, &name)
        .and_then(|()| state.registry.reserve(&name, public_key, &hello.instance, registration, state.cfg.limits.max_pending_accepts));
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
        if let Err(e) = cluster.claim(&state, &name, &public_key, &hello.instance, registration).await {
            state.metrics.refused(Refusal::Registration);
            tracing::info!(%peer, %name, reason = %e, "listener registration refused by the cluster");
            let _ = sink.send(refuse(e.code(), e.message().to_string())).await;
            return;
        }
    }
    let tcp = if hello.tcp_port { tcp_ports::bind(&state, &name).await } else { Ok(None) };
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
        pool: registration.pool,
        exit: registration.exit,
    };
    if sink.send(ack.encode_frame()).await.is_err() {
        return;
    }
    let (session, mut driver) = super::mux_server::server_session(&state, Link { source, sink, quic });
    if !state.registry.attach(&name, id, session.clone()) {
        // Replaced by a newer registration of the same key while this one was being answered.
        session.close_with_notice(ErrorCode::NameTaken, super::registry::replaced_notice(&name));
    }
    state.public.listeners.registered(&name, id);
    state.metrics.listeners_active.fetch_add(1, Relaxed);
    tracing::info!(%peer, %name, tcp = %ack.tcp_addr, pool = registration.pool, exit = registration.exit, "listener registered");
    if let Some(l) = tcp {
        state.tasks.spawn(tcp_ports::serve(state.clone(), l, name.clone(), session.clone()));
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
                session.close_with_notice(ErrorCode::RelayUnavailable, "the relay shut down before its streams finished");
                break;
            }
            _ = state.draining.cancelled(), if !draining => draining = true,
            _ = drain_tick.tick(), if draining => {
                if session.stream_count() == 0 {
                    // Said in a notice, so the listener reports the drain, not a bare end.
                    session.close_with_notice(ErrorCode::RelayUnavailable, "the relay shut down (drained)");
                    break;
                }
            }
        }
    }
    // The notice goes out on the driver's task: wait for it (bounded), or a relay that exits
    // next would cut it.
    driver.finished().await;
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
