//! What every client (dialer or listener, in every face) shares: how it is configured
//! ([`config`]: explicit values, then one set of `TUNNEL_*` variables), how users give and get
//! keys ([`keys`]), which relays it uses (`relays`: one URL or several, tried in turn), through which upstream
//! proxy, if any ([`proxy`]), how its
//! session to the relay begins (`handshake`), and how it reports that session's state
//! ([`events`]).

pub mod config;
pub mod events;
pub(crate) mod handshake;
pub mod keys;
pub mod proxy;
pub mod relays;

pub use config::{checked_millis, checked_seconds, ClientConfig, ClientEnv, ClientOptions, ClientRole};
pub use proxy::{Proxy, ProxyRules, ProxyUrl};
pub use relays::check_relay_urls;
