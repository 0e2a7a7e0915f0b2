//! Everything the relay serves to the public: the HTTP port and the HTTPS port (HTTP/1.1, h2,
//! TLS passthrough by SNI; `endpoint`, with `tls` for the certificates and the ClientHello), the
//! bodies it forwards (`body`, `h2_window`), and what it knows about each listener it serves
//! publicly and the HTTP/2 connections it keeps to h2c listeners (`listeners`), and the
//! listeners' public TCP ports (`tcp_ports`).

pub(crate) mod body;
pub(crate) mod endpoint;
pub(crate) mod h2_window;
pub(crate) mod listeners;
pub(crate) mod tcp_ports;
pub(crate) mod tls;

use std::net::IpAddr;
use std::sync::Arc;

use crate::config::Limits;
use crate::relay::guard::{InFlight, SourceShares};

/// The public endpoints' own state (one part of the relay's shared state).
pub(crate) struct Public {
    /// Requests in progress per source (`http_max_requests_per_source`).
    pub(crate) per_source: Arc<InFlight<IpAddr>>,
    /// Requests in progress per listener name (`http_max_requests_per_listener`).
    pub(crate) per_listener: Arc<InFlight<String>>,
    /// Each source's share of a listener's request slots.
    pub(crate) source_shares: Arc<SourceShares>,
    /// Registered listeners' h2 connections and rate windows.
    pub(crate) listeners: listeners::PublicListeners,
    /// The HTTPS port's certificates, when it is on.
    pub(crate) tls: Option<tls::PublicTls>,
}

impl Public {
    pub(crate) fn new(l: &Limits, tls: Option<tls::PublicTls>) -> Public {
        Public {
            per_source: InFlight::new(l.http_max_requests_per_source),
            per_listener: InFlight::new(l.http_max_requests_per_listener),
            source_shares: SourceShares::new(l.http_max_requests_per_listener),
            listeners: Default::default(),
            tls,
        }
    }
}
