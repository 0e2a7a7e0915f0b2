//! Where a stream leaves the tunnel for a real TCP target: the allowlist ([`allowlist`]), the
//! resolver of target names ([`resolve`]) and the connect that applies the allowlist before DNS
//! and again to every address DNS returned ([`connect`]). The relay uses it for every SOCKS5
//! CONNECT it serves; nothing here knows about sessions or the relay's state.

pub mod allowlist;
pub mod connect;
pub mod resolve;

pub use allowlist::Allowlist;
