//! What every client (dialer or listener, in every face) shares: how it is configured
//! ([`config`]: explicit values, then one set of `TUNNEL_*` variables), how users give and get
//! keys ([`keys`]), which relays it uses (`relays`: one URL or several, tried in turn), through
//! which upstream proxy, if any ([`proxy`]), how its session to the relay begins (`handshake`),
//! how it reports that session's state ([`events`]), and every option of a dialer or listener
//! as plain values ([`options`]), which each face fills and the core checks.

pub mod config;
pub mod events;
pub(crate) mod handshake;
pub mod keys;
pub mod options;
pub mod proxy;
pub mod relays;

pub use config::{checked_millis, checked_seconds, ClientConfig, ClientEnv, ClientOptions, ClientRole};
pub use options::{DialerOptions, ListenerOptions, DEFAULT_BACKLOG};
pub use proxy::{Proxy, ProxyRules, ProxyUrl};
pub use relays::check_relay_urls;
