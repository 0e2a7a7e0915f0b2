#![no_main]
//! Fuzz target `http_host`: see `libtunnel_fuzz::entries::http_host` for what it feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| libtunnel_fuzz::entries::http_host(data));
