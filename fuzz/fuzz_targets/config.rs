#![no_main]
//! Fuzz target `config`: see `libtunnel_fuzz::entries::config` for what it feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| libtunnel_fuzz::entries::config(data));
