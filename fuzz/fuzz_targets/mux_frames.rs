#![no_main]
//! Fuzz target `mux_frames`: see `libtunnel_fuzz::entries::mux_frames` for what it feeds and checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| libtunnel_fuzz::entries::mux_frames(data));
