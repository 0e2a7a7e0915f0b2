#![no_main]
//! Fuzz target `socks5`: see `libtunnel_fuzz::entries::socks5` for what it feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| libtunnel_fuzz::entries::socks5(data));
