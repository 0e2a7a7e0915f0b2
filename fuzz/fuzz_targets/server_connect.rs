#![no_main]
//! Fuzz target `server_connect`: see `libtunnel_fuzz::entries::server_connect` for what it feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| libtunnel_fuzz::entries::server_connect(data));
