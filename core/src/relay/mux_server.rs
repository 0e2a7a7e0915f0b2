//! The relay's end of a multiplexed session (a dialer's or a listener's): its settings from the
//! relay's limits, and the guard that closes it with the task serving it.

use super::RelayState;
use crate::error::ErrorCode;
use crate::mux::{FrameSink, FrameSource, MuxConfig, Role};
use crate::session::Session;

/// Start the relay's side of a multiplexed session (dialer or listener) with the configured
/// keepalive and stream limits; the guard closes it when the serving task ends.
pub(crate) fn server_session(state: &RelayState, source: FrameSource, sink: FrameSink) -> (Session, CloseOnDrop) {
    let session = Session::mux(Role::Server, source, sink, relay_mux_config(state));
    (session.clone(), CloseOnDrop(session))
}

/// The relay's session settings from its limits (its own sessions, and its sessions to the other
/// nodes of a cluster).
pub(crate) fn relay_mux_config(state: &RelayState) -> MuxConfig {
    let l = &state.cfg.limits;
    MuxConfig {
        keepalive_interval: l.keepalive_interval,
        keepalive_timeout: l.keepalive_timeout,
        max_streams: l.max_streams_per_session,
        max_stream_window: u32::try_from(l.max_stream_window).unwrap_or(u32::MAX),
        receive_budget: l.session_receive_budget,
        ..MuxConfig::default()
    }
}

/// Closes a relay-side session when the task serving it ends or is dropped. The session's reader
/// and writer run as their own tasks, so without this a connection task dropped on `kill` (or by
/// `ServerHandle::abort`) would leave the transport open, answering pings but refusing streams.
pub(crate) struct CloseOnDrop(pub(crate) Session);
impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close(ErrorCode::RelayUnavailable, "the relay closed the session");
    }
}
