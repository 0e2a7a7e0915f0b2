//! Fuzz entry points for libtunnel's peer-facing parsers. The targets in `fuzz_targets/` call
//! them, and so does `core/tests/it/fuzz_regressions.rs` (on stable, by `#[path]`), which replays
//! the committed corpus in `corpus/` and `regressions/`.
pub mod entries;
