//! libtunnel: reach private TCP services through a relay, over one authenticated WebSocket.
//!
//! Three roles share one protocol: a [`Dialer`] opens streams to `host:port` targets (or to a
//! listener's name) through a relay; a [`Listener`] registers a name with a relay and accepts the
//! streams and public HTTP requests routed to it; the relay ([`Server`]) authenticates both and
//! routes between them. The C, Python and Node faces are thin layers over these types, configured
//! through [`client`] exactly like the `tunnel` CLI.
//!
//! # Layout
//!
//! Follow one **dial** (`tunnel forward 5432 db.internal:5432`, or `Dialer.dial` in any face):
//! - [`client::config`] turns flags / arguments / `TUNNEL_*` variables into a checked
//!   [`client::ClientConfig`]; [`client::keys`] reads the shared [`Key`].
//! - [`dialer`] keeps one multiplexed session per relay: [`transport`] connects (WebSocket over TCP
//!   or TLS, or raw TCP), `client::handshake` reads the relay's nonce and sends the signed hello
//!   ([`auth`], [`protocol`]), and [`mux`] carries every stream over that session with flow control.
//!   Everything above the transport sees the session through [`session`] (one variant per
//!   transport: the mux today, QUIC next).
//! - Each dial is a SOCKS5 CONNECT inside a new mux stream ([`socks`]); the result is a
//!   [`TunnelStream`] ([`stream`]), which [`forward`] bridges to a local socket and [`fd`] hands to
//!   the faces as a plain socket descriptor.
//! - On the relay ([`relay`]): `relay::accept` takes the connection and admits it
//!   (`relay::guard`: per-source and global limits), the tunnel endpoint (`relay::tunnel_endpoint`)
//!   upgrades it, and `relay::session` checks the hello (keys in `relay::access`) and serves each
//!   stream's CONNECT through `relay::route`: a real target goes through [`egress`] (allowlist
//!   before and after DNS, resolver, connect); a listener's name goes to that listener's session
//!   (where the name is held: `relay::names`). Bytes then move frame to frame.
//!
//! Follow one **listener request** (`tunnel listen --to 127.0.0.1:3000`, `Listener.bind`):
//! - [`listener`] connects like a dialer, but its hello registers a name signed by its Ed25519
//!   [`Identity`] ([`identity`]: names are base32 of the key's SHA-256); `relay::listen` verifies it
//!   and holds the name in `relay::registry` while the session lives (one
//!   `relay::names::Registration`: pool, exit, how its service speaks).
//! - Everything public is in `relay::public`: a request on the relay's public HTTP or HTTPS port
//!   (`relay::public::endpoint`), a public TCP port (`relay::public::tcp_ports`) or a dial by name
//!   is routed by `relay::route::open_to_listener` (the local registry, else the node of the
//!   cluster, `relay::cluster`, that holds the name): a new mux stream to the listener, headed by
//!   a [`protocol::StreamHeader`] (who, how: [`Via`]). The listener's [`Listener::accept`] yields
//!   it with a [`PeerInfo`]; [`forward::expose`] connects it to the local service.
//!
//! `docs/design/walkthrough.md` follows both paths step by step, naming each function.
//!
//! Around them: [`config`] (the relay's settings from TOML, `.env`, environment, flags; one row
//! each in [`config::settings`]; [`dotenv`] reads `.env` as Emissary's godotenv does; [`env`] is
//! what relay and clients share: `.env` reading, client variables, numeric checks), [`error`]
//! (one [`ErrorCode`] table every face maps), [`runtime`] (the one way to build the Tokio runtime),
//! [`log_line`] (log events as text for the faces), [`demo`] (the narrated loopback demo).
//!
//! `mux`, `protocol`, `session` and `transport` are public for the fuzz targets, the benchmarks and the
//! tests, not as an API: they are hidden from the docs and may change in any release. The types
//! users need from them are re-exported here.
pub mod auth;
pub mod client;
pub mod config;
mod conn_log;
pub mod demo;
pub mod dialer;
pub mod dotenv;
pub mod e2e;
pub mod egress;
pub mod env;
pub mod error;
#[cfg(unix)]
pub mod fd;
pub mod forward;
pub mod identity;
pub mod listener;
pub mod log_line;
#[doc(hidden)]
pub mod mux;
#[doc(hidden)]
pub mod protocol;
pub mod relay;
pub mod runtime;
#[doc(hidden)]
pub mod session;
pub mod socks;
pub mod stream;
mod tls_pin;
#[doc(hidden)]
pub mod transport;

pub use auth::Key;
pub use client::{ClientConfig, ClientOptions};
pub use config::RelayConfig;
pub use dialer::{Dialer, DialerBuilder};
pub use egress::Allowlist;
pub use error::{Error, ErrorCode, Result};
pub use identity::Identity;
pub use listener::{ExitStats, Listener, ListenerBuilder, PeerInfo, Registration};
pub use mux::MuxConfig;
pub use protocol::Via;
pub use relay::{Reloader, Server, ServerHandle};
pub use stream::{Mode, TunnelStream};
pub use transport::{ClientTls, RelayUrl};

/// The Rust blocks of the README and of the docs pages that have some, compiled as doctests by
/// `cargo test -p libtunnel` (as pasted; the `# ` lines are the hidden async wrapper), so the API
/// they show cannot drift from the code. `scripts/readme_blocks.py check` reads this list: a page
/// with a Rust block that is not here fails it.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

#[cfg(doctest)]
#[doc = include_str!("../../docs/guide/client.md")]
pub struct ClientGuideDoctests;

#[cfg(doctest)]
#[doc = include_str!("../../docs/guide/listeners.md")]
pub struct ListenersGuideDoctests;

#[cfg(doctest)]
#[doc = include_str!("../../docs/guide/relay.md")]
pub struct RelayGuideDoctests;
