//! Public TCP ports across the cluster. A listener's public TCP port is assigned in Redis
//! (`claims`: the `NS:tcp` table), so no two listeners of the cluster get the same one; every
//! node that has `tcp_ports` and does not hold the listener binds the port as well (a *mirror*)
//! and forwards its connections to the node that does. A load balancer may then send the port's
//! connections to any node. Mirrors follow the table: on each `:tcp` notice, on subscribing, and
//! on every refresh tick.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Cluster;
use crate::relay::names::{self, Found};
use crate::relay::public::tcp_ports;
use crate::relay::RelayState;

/// The mirrors a node serves: port → (listener name, stop).
#[derive(Default)]
pub(crate) struct Mirrors {
    open: std::sync::Mutex<HashMap<u16, (String, CancellationToken)>>,
    /// One reconcile at a time.
    running: tokio::sync::Mutex<()>,
}

impl Mirrors {
    /// Make the open mirrors match the port table: bind the ports of listeners other nodes hold,
    /// close those whose assignment is gone, moved, or now local.
    pub(crate) async fn reconcile(&self, cluster: &Cluster, state: &Arc<RelayState>) {
        let Some((lo, hi)) = state.cfg.tcp_ports else { return };
        let _one = self.running.lock().await;
        let table = match cluster.claims.ports().await {
            Ok(t) => t,
            Err(e) => return cluster.redis_failed(state, "reading the public TCP port table", &e),
        };
        let mut wanted: HashMap<u16, String> = HashMap::new();
        for (port, name) in table {
            if (lo..=hi).contains(&port) && matches!(names::lookup(state, &name).await, Found::Remote(_)) {
                wanted.insert(port, name);
            }
        }
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|port, (name, stop)| {
            let keep = wanted.get(port) == Some(name);
            if !keep {
                stop.cancel();
                tracing::info!(port, %name, "public TCP port mirror closed");
            }
            keep
        });
        for (port, name) in wanted {
            if open.contains_key(&port) {
                continue;
            }
            let addr = SocketAddr::new(state.cfg.tcp_ports_bind, port);
            // Bound synchronously (std), so the table lock is never held across an await.
            let l = std::net::TcpListener::bind(addr).and_then(|l| l.set_nonblocking(true).map(|()| l)).and_then(TcpListener::from_std);
            match l {
                Ok(l) => {
                    let stop = CancellationToken::new();
                    tracing::info!(port, %name, "public TCP port mirrored for a listener on another node");
                    state.tasks.spawn(serve(state.clone(), l, name.clone(), port, stop.clone()));
                    open.insert(port, (name, stop));
                }
                Err(e) => tracing::warn!(port, %name, error = %e, "cannot mirror a public TCP port of the cluster (is something else using it?)"),
            }
        }
    }

    /// Close every mirror (shutdown).
    pub(crate) fn close_all(&self) {
        for (_, (_, stop)) in self.open.lock().unwrap_or_else(|p| p.into_inner()).drain() {
            stop.cancel();
        }
    }
}

async fn serve(state: Arc<RelayState>, listener: TcpListener, name: String, port: u16, stop: CancellationToken) {
    loop {
        let (sock, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            _ = state.draining.cancelled() => return,
            x = crate::transport::accept_backoff(&listener) => x,
        };
        state.tasks.spawn(tcp_ports::forward(state.clone(), sock, peer, name.clone(), port));
    }
}
