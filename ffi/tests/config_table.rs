//! The C face of the shared bad-input table (`tests/fixtures/client_config_cases.json`; the CLI,
//! Python and Node faces run the same table), called through the exported C functions: each case
//! fails at the setter that was given the bad value, or at `tunnel_dialer_new` /
//! `tunnel_listener_bind` for what only they check, with the case's result code and a last-error
//! message that names the fix and never holds the secret. The C timeout is integer milliseconds:
//! NaN and infinity cannot be written, so `0` and `u64::MAX` stand for the bad values there.

use std::ffi::{CStr, CString};
use std::ptr;

use tunnel::boundary::*;
use tunnel::config::*;
use tunnel::dialer::*;
use tunnel::error::*;
use tunnel::listener::*;

fn last_error() -> String {
    let mut buf = vec![0u8; 4096];
    let mut n = 0usize;
    // SAFETY: `buf` has `len` writable bytes and `n` is writable.
    unsafe { tunnel_last_error_message(buf.as_mut_ptr().cast(), buf.len(), &mut n) };
    CStr::from_bytes_until_nul(&buf).map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
}

fn name(r: tunnel_result) -> String {
    // SAFETY: the name is a static NUL-terminated string.
    unsafe { CStr::from_ptr(tunnel_result_name(r as u32)) }.to_string_lossy().into_owned()
}

fn table() -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/client_config_cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Run one case: build a config for the unreachable relay on port 9, apply the key and timeout,
/// then make the dialer or listener; the first failure is the outcome.
fn attempt(listener: bool, key: &str, timeout_ms: Option<u64>) -> (tunnel_result, String) {
    let relay = CString::new("ws://127.0.0.1:9").unwrap();
    let mut cfg: *mut tunnel_config = ptr::null_mut();
    // SAFETY: valid pointers throughout; every object made is freed.
    unsafe {
        assert_eq!(tunnel_config_new(relay.as_ptr(), &mut cfg), tunnel_result::Ok);
        let key_c = CString::new(key).unwrap();
        let mut r = if listener { tunnel_config_set_identity_file(cfg, key_c.as_ptr(), false) } else { tunnel_config_set_key(cfg, key_c.as_ptr()) };
        if r == tunnel_result::Ok {
            if let Some(ms) = timeout_ms {
                r = tunnel_config_set_timeout_ms(cfg, ms);
            }
        }
        if r == tunnel_result::Ok {
            if listener {
                let mut l: *mut tunnel_listener = ptr::null_mut();
                r = tunnel_listener_bind(cfg, &mut l);
                tunnel_listener_free(l);
            } else {
                let mut d: *mut tunnel_dialer = ptr::null_mut();
                r = tunnel_dialer_new(cfg, &mut d);
                tunnel_dialer_free(d);
            }
        }
        let msg = last_error();
        tunnel_config_free(cfg);
        (r, msg)
    }
}

#[test]
fn the_shared_bad_input_table_through_the_c_abi() {
    let t = table();
    let secret = t["secret"].as_str().unwrap();
    let dir = std::env::temp_dir().join(format!("libtunnel-ffi-table-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let listener_key = dir.join("listener.pem");
    libtunnel::Identity::generate().save(&listener_key).unwrap();
    for case in t["cases"].as_array().unwrap() {
        let case_name = case["name"].as_str().unwrap();
        let listener = case["role"] == "listener";
        let key = case["key"].as_str().map(str::to_string).unwrap_or_else(|| {
            if listener {
                listener_key.display().to_string()
            } else {
                t["good_key"].as_str().unwrap().to_string()
            }
        });
        // NaN, -1 and Infinity have no integer form: 0 stands for them; 1e30 s is past u64 ms.
        let timeout_ms = case["timeout"].as_str().map(|s| match s.parse::<f64>().unwrap() {
            v if v.is_finite() && v > 0.0 => (v * 1000.0) as u64,
            _ => 0,
        });
        let (r, msg) = attempt(listener, &key, timeout_ms);
        assert_eq!(name(r), case["code"].as_str().unwrap(), "{case_name}: {msg}");
        for n in case["names"].as_array().unwrap() {
            let n = n.as_str().unwrap();
            // The C setter is in milliseconds; its message says so.
            let n = if n == "positive number of" { "timeout" } else { n };
            assert!(msg.contains(n), "{case_name}: {msg:?} names {n:?}");
        }
        assert!(!msg.contains(secret), "{case_name}: the secret leaked: {msg}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_out_of_range_log_level_is_refused() {
    // SAFETY: a NULL callback with any level is a valid call.
    let r = unsafe { tunnel::log::tunnel_set_log_callback(None, ptr::null_mut(), 99) };
    assert_eq!(r, tunnel_result::InvalidArgument);
    assert!(last_error().contains("tunnel_log_level"));
}

#[test]
fn a_missing_key_names_the_c_setter_that_gives_it() {
    let relay = CString::new("ws://127.0.0.1:9").unwrap();
    for (listener, setter) in [(false, "call tunnel_config_set_key"), (true, "call tunnel_config_set_identity_file")] {
        let mut cfg: *mut tunnel_config = ptr::null_mut();
        // SAFETY: valid pointers throughout; every object made is freed.
        let (r, msg) = unsafe {
            assert_eq!(tunnel_config_new(relay.as_ptr(), &mut cfg), tunnel_result::Ok);
            let r = if listener {
                let mut l: *mut tunnel_listener = ptr::null_mut();
                let r = tunnel_listener_bind(cfg, &mut l);
                tunnel_listener_free(l);
                r
            } else {
                let mut d: *mut tunnel_dialer = ptr::null_mut();
                let r = tunnel_dialer_new(cfg, &mut d);
                tunnel_dialer_free(d);
                r
            };
            let msg = last_error();
            tunnel_config_free(cfg);
            (r, msg)
        };
        assert_eq!(name(r), "INVALID_ARGUMENT", "{msg}");
        assert!(msg.contains(setter), "{msg}");
    }
}
