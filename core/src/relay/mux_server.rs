//! The relay's end of a multiplexed session (a dialer's or a listener's): its settings from the
//! relay's limits, and its driver owned by the task serving it.

use super::RelayState;
use crate::mux::{self, FrameSink, FrameSource, MuxConfig, Role, SessionTask};
use crate::session::Session;

/// Start the relay's side of a multiplexed session (dialer or listener) with the configured
/// keepalive and stream limits. The session lives as long as the returned driver handle: the task
/// serving the connection holds it, so a task that ends or is dropped (on `kill`, or by
/// `ServerHandle::abort`) ends the session and frees its transport.
pub(crate) fn server_session(state: &RelayState, source: FrameSource, sink: FrameSink) -> (Session, SessionTask) {
    let (session, task) = mux::Session::owned(Role::Server, source, sink, relay_mux_config(state));
    (Session::Mux(session), task)
}

/// The relay's session settings from its limits (its own sessions, and its sessions to the other
/// nodes of a cluster).
pub(crate) fn relay_mux_config(state: &RelayState) -> MuxConfig {
    MuxConfig::from(&state.cfg.limits)
}
