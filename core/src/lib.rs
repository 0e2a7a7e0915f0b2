//! libtunnel: reach private TCP services through a relay, over one authenticated WebSocket.
pub mod auth;
pub mod client;
pub mod config;
pub mod demo;
pub mod dialer;
pub mod egress;
pub mod error;
#[cfg(unix)]
pub mod fd;
pub mod forward;
pub mod identity;
pub mod listener;
pub mod mux;
pub mod protocol;
pub mod relay;
pub mod socks;
pub mod stream;
pub mod transport;

pub use auth::Key;
pub use config::RelayConfig;
pub use dialer::{Dialer, DialerBuilder};
pub use error::{Error, ErrorCode, Result};
pub use identity::Identity;
pub use listener::{ExitStats, Listener, ListenerBuilder, PeerInfo, Registration};
pub use protocol::Via;
pub use relay::{Reloader, Server, ServerHandle};
pub use stream::{Mode, TunnelStream};
