#![no_main]
//! Fuzz target `auth_proof`: see `libtunnel_fuzz::entries::auth_proof` for what it feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| libtunnel_fuzz::entries::auth_proof(data));
