//! A listener's public HTTP limits (`http_listener_rate`, `http_max_requests_per_listener`),
//! counted where the listener is held. A request for a listener of this relay is counted here; in
//! a cluster, a request for a listener another node holds is counted on that node (over the
//! authenticated node-to-node session: `cluster::peers`' `Admit`), so the limits hold for the
//! listener whichever node each request entered. When the holding node cannot be asked (Redis
//! or the node unreachable), the request is counted here, as on a relay of its own; its route
//! fails anyway in that case. A TLS passthrough connection counts against the rate only.

use std::sync::Arc;
use std::time::Duration;

use super::guard::InFlightPermit;
use super::RelayState;
use crate::session::SessionStream;

/// Why a listener cannot take one more request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Over `http_listener_rate`; the window ends after this long.
    Rate(Duration),
    /// At `http_max_requests_per_listener` (this many, where the listener is held).
    Busy(u32),
}

/// A request's place in its listener's count, held until the response ends.
pub(crate) enum ListenerSlot {
    /// Counted on this relay.
    Here { _permit: InFlightPermit<String> },
    /// Counted on the node that holds the listener, until this stream closes.
    Held { _stream: SessionStream },
}

/// Count one request to `name` on this relay.
pub(crate) fn count_here(state: &RelayState, name: &str) -> Result<InFlightPermit<String>, Refused> {
    state.public.listeners.admit_rate(name, state.cfg.http_listener_rate).map_err(Refused::Rate)?;
    state.public.per_listener.enter(name.to_string()).ok_or(Refused::Busy(state.public.per_listener.limit().min(u32::MAX as usize) as u32))
}

/// Count one request to `name` where its listener is held (this relay, or the node of the
/// cluster that holds it).
pub(crate) async fn count(state: &Arc<RelayState>, name: &str) -> Result<ListenerSlot, Refused> {
    let remote = match &state.cluster {
        Some(cluster) if !state.registry.contains(name) => cluster.admit_remote(state, name).await,
        _ => None,
    };
    match remote {
        Some(r) => r.map(|s| ListenerSlot::Held { _stream: s }),
        None => count_here(state, name).map(|p| ListenerSlot::Here { _permit: p }),
    }
}
