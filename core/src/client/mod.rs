//! What every client (dialer or listener, in every face) shares: how it is configured
//! ([`config`]: explicit values, then one set of `TUNNEL_*` variables), how users give and get
//! keys ([`keys`]), and how its session to the relay begins (`handshake`).

pub mod config;
pub(crate) mod handshake;
pub mod keys;

pub use config::{checked_millis, checked_seconds, ClientConfig, ClientEnv, ClientOptions, ClientRole};
