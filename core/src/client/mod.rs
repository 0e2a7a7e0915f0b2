//! What every client (dialer or listener, in every face) shares: how it is configured
//! ([`config`]: explicit values, then one set of `TUNNEL_*` variables), how users give and get
//! keys ([`keys`]), how its session to the relay begins (`handshake`), and how it reports that
//! session's state ([`events`]).

pub mod config;
pub mod events;
pub(crate) mod handshake;
pub mod keys;

pub use config::{checked_millis, checked_seconds, ClientConfig, ClientEnv, ClientOptions, ClientRole};
