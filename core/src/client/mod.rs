//! What every client (dialer or listener, in every face) shares: how its session to the relay
//! begins ([`handshake`]).

pub(crate) mod handshake;
