//! The relay's end of a session (a dialer's or a listener's, multiplexed or QUIC): its settings
//! from the relay's limits, and its owner held by the task serving it.

use super::RelayState;
use crate::mux::{MuxConfig, Role};
use crate::session::{Link, Session, SessionOwner};

/// Start the relay's side of a session (dialer or listener) with the configured keepalive and
/// stream limits. The session lives as long as the returned owner: the task serving the
/// connection holds it, so a task that ends or is dropped (on `kill`, or by
/// `ServerHandle::abort`) ends the session and frees its transport.
pub(crate) fn server_session(state: &RelayState, link: Link) -> (Session, SessionOwner) {
    Session::owned(Role::Server, link, relay_mux_config(state))
}

/// The relay's session settings from its limits (its own sessions, and its sessions to the other
/// nodes of a cluster).
pub(crate) fn relay_mux_config(state: &RelayState) -> MuxConfig {
    MuxConfig::from(&state.cfg.limits)
}
