#![no_main]
//! Fuzz target `dial_route`: see `libtunnel_fuzz::entries::dial_route` for what it feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| libtunnel_fuzz::entries::dial_route(data));
