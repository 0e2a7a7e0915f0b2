//! Replays the committed fuzz corpus on stable, without cargo-fuzz: every file under
//! `fuzz/corpus/<target>/` (minimized seeds) and `fuzz/regressions/<target>/` (inputs that once
//! crashed, or that pin a fixed bug) goes through the same entry function the fuzz target calls
//! (`fuzz/src/entries.rs`, included here). Each entry asserts that nothing panics, answers stay
//! bounded, and garbage is refused rather than accepted.

#[path = "../../../fuzz/src/entries.rs"]
#[allow(dead_code)]
mod entries;

use std::path::{Path, PathBuf};

type Entry = fn(&[u8]);

const TARGETS: &[(&str, Entry)] = &[
    ("socks5", entries::socks5),
    ("mux_frames", entries::mux_frames),
    ("server_connect", entries::server_connect),
    ("auth_proof", entries::auth_proof),
    ("listen_hello", entries::listen_hello),
    ("http_host", entries::http_host),
    ("dial_route", entries::dial_route),
    ("config", entries::config),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Every input of one target, sorted so failures are reproducible.
fn inputs(target: &str) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for kind in ["corpus", "regressions"] {
        if let Ok(rd) = std::fs::read_dir(fuzz_dir().join(kind).join(target)) {
            files.extend(rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()));
        }
    }
    files.sort();
    files
}

fn replay(target: &str) {
    let entry = TARGETS.iter().find(|(n, _)| *n == target).expect("a known target").1;
    let files = inputs(target);
    assert!(!files.is_empty(), "no corpus for {target} under {}", fuzz_dir().display());
    for f in &files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("reading {}: {e}", f.display()));
        let r = std::panic::catch_unwind(|| entry(&data));
        if let Err(p) = r {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
            panic!("{target}: {} failed: {msg}", f.display());
        }
    }
}

#[test]
fn every_target_has_a_corpus() {
    for (t, _) in TARGETS {
        assert!(!inputs(t).is_empty(), "fuzz/corpus/{t} is empty");
    }
}

#[test]
fn socks5() {
    replay("socks5");
}

#[test]
fn mux_frames() {
    replay("mux_frames");
}

#[test]
fn server_connect() {
    replay("server_connect");
}

#[test]
fn auth_proof() {
    replay("auth_proof");
}

#[test]
fn listen_hello() {
    replay("listen_hello");
}

#[test]
fn http_host() {
    replay("http_host");
}

#[test]
fn dial_route() {
    replay("dial_route");
}

#[test]
fn config() {
    replay("config");
}

/// Bugs found while writing the targets, pinned as explicit inputs as well as corpus files.
#[test]
fn known_bugs_stay_fixed() {
    // Timeouts past Duration::MAX panicked in the loader; ones that round to zero loaded.
    let keys = r#"TUNNEL_AUTH_KEYS=[{"kid":1,"data":"c2VjcmV0"}]"#;
    let allow = r#"TUNNEL_ALLOW=[{"host":"db","port":1}]"#;
    for bad in ["TUNNEL_CONNECT_TIMEOUT=1e30", "TUNNEL_DRAIN_TIMEOUT=1e-300", "TUNNEL_MAX_CONNECTIONS=18446744073709551615"] {
        entries::config(format!("\0\0{keys}\n{allow}\n{bad}\0").as_bytes());
    }
    // A dial whose host is longer than SOCKS5 can carry must fail on the client, not be truncated.
    let mut long = 80u16.to_be_bytes().to_vec();
    long.extend_from_slice("é".repeat(200).as_bytes());
    entries::dial_route(&long);
}
