//! Where a listener name is held, asked one way by every path that needs to know (a dial by
//! name, `HOST@EXIT`, the public HTTPS port choosing passthrough or h2c, the cluster's public TCP
//! port mirrors): this relay's registry first, then the cluster's registry (Redis). The answer is
//! a [`Found`]; what a listener asked for when it registered is one [`Registration`], the same in
//! the registry, in the public endpoints and in a cluster claim.
//!
//! Nothing here names the registry's or the cluster's modules: both speak this module's types,
//! and the lookup reaches them through the relay's state.

use super::RelayState;

/// How a listener's local service speaks (what the public endpoints must send it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Speaks {
    /// HTTP/1.1 (the default): one tunnel stream per client connection.
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (gRPC): requests are streams of a few shared connections.
    H2c,
    /// Raw TLS: the HTTPS port routes a connection by SNI without decrypting it.
    TlsPassthrough,
}

/// How a listener holds its name, from its registration (`ListenHello`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Registration {
    /// Joins other replicas of the name instead of replacing them.
    pub(crate) pool: bool,
    /// An exit listener: it connects dialers' `via` streams to targets in its own network.
    pub(crate) exit: bool,
    pub(crate) speaks: Speaks,
}

impl Registration {
    /// What a listener's hello asks for (passthrough wins over h2c when both are set).
    pub(crate) fn of_hello(h: &crate::protocol::ListenHello) -> Registration {
        let speaks = match (h.h2c, h.tls_passthrough) {
            (_, true) => Speaks::TlsPassthrough,
            (true, false) => Speaks::H2c,
            _ => Speaks::Http1,
        };
        Registration { pool: h.pool, exit: h.exit, speaks }
    }

    /// Whether a listener registered as `self` may join the replicas of a name held as `held`:
    /// both pools, both exits or both not (how their services speak is not compared).
    pub(crate) fn joins(self, held: Registration) -> bool {
        self.pool && held.pool && self.exit == held.exit
    }
}

/// A name's live holders in the cluster, as the cluster registry names them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Holders {
    /// The owner key (hex), as Redis has it (never trusted for who may carry traffic).
    pub(crate) owner: String,
    pub(crate) registration: Registration,
    /// (node id, URL) of each live node holding the name.
    pub(crate) nodes: Vec<(String, String)>,
}

/// Where a listener name is held.
#[derive(Debug, Clone)]
pub(crate) enum Found {
    /// By a listener of this relay (registered, or registering now).
    Local(Registration),
    /// By a listener on other nodes of the cluster.
    Remote(Holders),
    /// Nowhere: no listener here has it, and the cluster (if any) knows of none.
    Offline,
    /// Not here, and the cluster registry cannot be asked (Redis unreachable).
    Unknown,
}

impl Found {
    /// How the holder registered, when a listener holds the name.
    pub(crate) fn registration(&self) -> Option<Registration> {
        match self {
            Found::Local(r) => Some(*r),
            Found::Remote(h) => Some(h.registration),
            Found::Offline | Found::Unknown => None,
        }
    }
}

/// Where `name` is held: this relay's registry, else the cluster's (cached there).
pub(crate) async fn lookup(state: &RelayState, name: &str) -> Found {
    if let Some(r) = state.registry.registration(name) {
        return Found::Local(r);
    }
    let Some(cluster) = &state.cluster else { return Found::Offline };
    match cluster.lookup(state, name).await {
        Ok(h) if h.nodes.is_empty() => Found::Offline,
        Ok(h) => Found::Remote(h),
        Err(_) => Found::Unknown,
    }
}
