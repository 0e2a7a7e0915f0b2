//! libtunnel: reach private TCP services through a relay, over one authenticated WebSocket.
pub mod auth;
pub mod error;
pub mod mux;
pub mod protocol;
pub mod transport;
pub mod relay { pub mod allowlist; }
pub use error::{Error, ErrorCode, Result};
