//! The integration tests of `libtunnel`, one binary (linked once): a module per area, each
//! driving real relays, listeners, dialers and `tunnel` processes on loopback. Helpers shared
//! with the C tests live in the `testkit` crate. Run one area with `cargo test -p libtunnel --features cli
//! --test it AREA::`.

mod admin;
mod allowlist_table;
mod cli;
mod client_config;
mod cluster;
mod deploy_files;
mod e2e;
mod e2e_cli;
mod emissary_interop;
mod events;
mod exit;
mod faults;
mod first_hour;
mod front_door;
mod fuzz_regressions;
mod grpc;
mod grpc_go;
mod grpc_nginx;
mod limits;
mod listener;
mod listener_cli;
mod pools;
mod public_https;
mod quic;
mod quic_cli;
mod session_faults;
mod socket;
mod tunnel;
