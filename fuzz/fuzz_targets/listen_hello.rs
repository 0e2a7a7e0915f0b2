#![no_main]
//! Fuzz target `listen_hello`: see `libtunnel_fuzz::entries::listen_hello` for what it feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| libtunnel_fuzz::entries::listen_hello(data));
