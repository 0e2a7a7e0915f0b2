//! No secret reaches the logs at any level: every event of a relay, dialers (multiplexed and
//! classic, right and wrong keys) and a listener is captured at TRACE, then searched for the
//! shared secret (raw and base64) and the listener's private key. Its own test binary, because it
//! installs the process-wide tracing subscriber.

use std::io::Write;
use std::sync::{Arc, Mutex};

use base64::Engine;
use libtunnel::{Dialer, Identity, Key, Listener, Mode};
use testkit::*;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_logs_at_any_level() {
    let logs = Captured::default();
    let sink = logs.clone();
    tracing_subscriber::fmt().with_max_level(tracing::Level::TRACE).with_ansi(false).with_writer(move || sink.clone()).init();

    let echo = echo_server().await;
    let mut cfg = relay_config(allow_ports(&[echo.port()]));
    cfg.listeners_open = true;
    let relay = start_relay(cfg).await;
    for mode in [Mode::Multiplexed, Mode::Classic] {
        let d = Dialer::builder(relay.url()).key(key()).mode(mode).timeout(STEP).build().expect("dialer");
        let s = within(STEP, "dial", d.dial(&echo.to_string())).await.expect("dial");
        let data = payload(64 * 1024, 1);
        assert_eq!(within(STEP, "echo", echo_roundtrip(s, &data, mode == Mode::Multiplexed)).await.expect("echo"), sha256(&data));
        let wrong = Key::new(KID, b"a wrong secret that must not be logged either".to_vec()).expect("key");
        let bad = Dialer::builder(relay.url()).key(wrong).mode(mode).timeout(STEP).build().expect("dialer");
        assert!(within(STEP, "a wrong-key dial", bad.dial(&echo.to_string())).await.is_err());
    }
    let id = Identity::generate();
    let pem = id.to_pem();
    let listener = within(STEP, "bind", Listener::bind(relay.url(), id)).await.expect("bind");
    listener.close();
    relay.shutdown().await.expect("shutdown");

    let text = String::from_utf8_lossy(&logs.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    assert!(text.contains("authentication failed"), "the capture holds the relay's events (got {} bytes)", text.len());
    let b64 = base64::engine::general_purpose::STANDARD;
    let nopad = base64::engine::general_purpose::STANDARD_NO_PAD;
    let pem_body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let secrets = [
        ("the shared secret", String::from_utf8_lossy(SECRET).into_owned()),
        ("the shared secret in base64", b64.encode(SECRET)),
        ("the shared secret in unpadded base64", nopad.encode(SECRET)),
        ("the wrong secret", "a wrong secret that must not be logged either".to_string()),
        ("the listener's private key", pem_body),
    ];
    for (what, s) in secrets {
        assert!(!text.contains(&s), "{what} appears in the logs");
    }
}
