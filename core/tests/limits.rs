//! The relay's admission limits, each driven over real loopback sockets: failed authentications
//! slowed per source address (valid keys never refused), sessions per key, streams waiting on a listener that never
//! accepts, and the public HTTP port's request-head deadline (slowloris) and size.

mod common;

use std::time::{Duration, Instant};

use common::*;
use libtunnel::relay::metrics::Refusal;
use libtunnel::{Dialer, ErrorCode, Identity, Key, Listener, Mode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const STEP: Duration = Duration::from_secs(10);

fn dialer(url: &str, k: Key) -> Dialer {
    Dialer::builder(url).key(k).timeout(STEP).build().expect("valid dialer settings")
}

fn wrong_key() -> Key {
    Key::new(KID, b"not the relay's secret, just a guess".to_vec()).expect("key")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_are_rate_limited_per_address() {
    init_tracing();
    let echo = echo_server().await;
    let mut cfg = relay_config(allow_ports(&[echo.port()]));
    cfg.limits.auth_failures_per_minute = 3;
    cfg.listeners_open = true;
    let relay = start_relay(cfg).await;
    for i in 0..3 {
        let e = within(STEP, "a wrong-key dial", dialer(relay.url(), wrong_key()).dial(&echo.to_string())).await.expect_err("wrong key");
        assert_eq!(e.code(), ErrorCode::AuthFailed, "attempt {i}: {e}");
        assert!(!e.message().contains("too many"), "attempt {i} is checked, not rate limited: {e}");
    }
    // Over the limit, proofs are still checked: the right key from the same address works at once
    // in both modes (behind a shared egress IP one stale client must not lock out everyone)...
    for mode in [Mode::Multiplexed, Mode::Classic] {
        let d = Dialer::builder(relay.url()).key(key()).mode(mode).timeout(STEP).build().expect("dialer");
        let started = Instant::now();
        let s = within(STEP, "a good-key dial over the failure limit", d.dial(&echo.to_string())).await;
        s.unwrap_or_else(|e| panic!("{mode:?}: a valid key was refused after others failed from its address: {e}"));
        assert!(started.elapsed() < Duration::from_millis(900), "{mode:?}: a valid key is not slowed down");
        d.close().await;
    }
    // ...while wrong keys keep failing with AUTH_FAILED (RFC 1929 `01 01` in classic mode), each
    // answered only after a delay, and counted as rate limited.
    for mode in [Mode::Multiplexed, Mode::Classic] {
        let d = Dialer::builder(relay.url()).key(wrong_key()).mode(mode).timeout(STEP).build().expect("dialer");
        let started = Instant::now();
        let e = within(STEP, "a wrong-key dial over the limit", d.dial(&echo.to_string())).await.expect_err("wrong key");
        assert_eq!(e.code(), ErrorCode::AuthFailed, "{mode:?}: {e}");
        assert!(started.elapsed() >= Duration::from_millis(900), "{mode:?}: failures over the limit are answered slowly");
    }
    let m = relay.metrics();
    assert!(m.refusals(Refusal::RateLimited) >= 2, "rate-limited failures are counted");
    // A listener with a valid identity registers from that address too.
    let l = within(STEP, "a listener over the failure limit", Listener::bind(relay.url(), Identity::generate())).await;
    l.unwrap_or_else(|e| panic!("a valid listener registration was refused after failures from its address: {e}"));
    relay.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_per_key_are_bounded() {
    init_tracing();
    let echo = echo_server().await;
    let mut cfg = relay_config(allow_ports(&[echo.port()]));
    cfg.limits.max_sessions_per_key = 2;
    let relay = start_relay(cfg).await;
    let (a, b, c) = (dialer(relay.url(), key()), dialer(relay.url(), key()), dialer(relay.url(), key()));
    let _sa = within(STEP, "first session", a.dial(&echo.to_string())).await.expect("first session");
    let _sb = within(STEP, "second session", b.dial(&echo.to_string())).await.expect("second session");
    let e = within(STEP, "third session", c.dial(&echo.to_string())).await.expect_err("over max_sessions_per_key");
    assert_eq!(e.code(), ErrorCode::Refused, "{e}");
    assert!(e.message().contains("max_sessions_per_key"), "the message names the setting: {e}");
    // Streams on an admitted session are not limited by it, and a closed session frees its place.
    let _more = within(STEP, "a second stream on the first session", a.dial(&echo.to_string())).await.expect("same session");
    a.close().await;
    within(STEP, "a place to free up", async {
        loop {
            match c.dial(&echo.to_string()).await {
                Ok(_) => return,
                Err(e) if e.code() == ErrorCode::Refused => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => panic!("unexpected error {e}"),
            }
        }
    })
    .await;
    relay.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_http_closes_slow_and_oversized_request_heads() {
    init_tracing();
    let mut cfg = relay_config(allow_ports(&[9]));
    cfg.http_listen = Some("127.0.0.1:0".parse().expect("addr"));
    cfg.listeners_open = true;
    cfg.limits.http_header_timeout = Duration::from_millis(300);
    cfg.limits.http_max_header_bytes = 16 * 1024;
    let relay = start_relay(cfg).await;
    let http = relay.http_addr().expect("http port");

    // Slowloris: half a request head, then silence. The relay hangs up after the deadline.
    let mut s = TcpStream::connect(http).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x.localhost\r\nX-Slow: ").await.expect("write");
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    let ended = within(STEP, "the relay to hang up on a slow client", async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // a 408 answer is fine; the connection must still end
            }
        }
    })
    .await;
    let () = ended;
    assert!(started.elapsed() < Duration::from_secs(3), "hung up after {:?}", started.elapsed());

    // A request head past the limit is refused (431) or cut, never buffered.
    let mut s = TcpStream::connect(http).await.expect("connect");
    let mut head = b"GET / HTTP/1.1\r\nHost: x.localhost\r\n".to_vec();
    for i in 0..400 {
        head.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "a".repeat(100)).as_bytes());
    }
    head.extend_from_slice(b"\r\n");
    let _ = s.write_all(&head).await; // the relay may close while we write
    let mut answer = Vec::new();
    let _ = within(STEP, "the answer to an oversized head", s.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(answer.is_empty() || text.starts_with("HTTP/1.1 431"), "an oversized head must be refused, got {text:?}");
    relay.abort();
}

// ---------------------------------------------------------------------------------------------
// Reload: rotated keys cut new sessions, a removed allow rule refuses the next stream of an open
// session, and a listener whose grant is withdrawn is closed and unreachable.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_rotates_keys_and_rechecks_rules_on_every_stream() {
    use libtunnel::auth::KeySet;
    use libtunnel::config::ListenerGrant;
    init_tracing();
    let (echo, echo2) = (echo_server().await, echo_server().await);
    let new_key = Key::new(KID + 1, b"the rotated-in secret, 0123456789".to_vec()).expect("key");
    let listener_id = Identity::generate();
    let grant = ListenerGrant { public_key: listener_id.public_key_base64(), names: vec!["api".into()] };
    let mut cfg = relay_config(allow_ports(&[echo.port(), echo2.port()]));
    cfg.auth_keys = KeySet::new([key(), new_key.clone()]).expect("keys");
    cfg.listener_keys = vec![grant];
    let relay = start_relay(cfg.clone()).await;
    let old = dialer(relay.url(), key());
    let _open = within(STEP, "a session with the old key", old.dial(&echo.to_string())).await.expect("old key works before the rotation");
    let listener = within(STEP, "bind api", Listener::builder(relay.url(), listener_id).name("api").bind()).await.expect("bind api");
    let _before = within(STEP, "dial api", dialer(relay.url(), new_key.clone()).dial("api:0")).await.expect("api before the reload");
    within(STEP, "accept", listener.accept()).await.expect("the listener accepts before the reload");

    let mut rotated = cfg.clone();
    rotated.auth_keys = KeySet::new([new_key.clone()]).expect("keys");
    rotated.allow = allow_ports(&[echo.port()]);
    rotated.listener_keys = vec![];
    relay.reload(&rotated).expect("reload");

    // The old key opens no new session.
    let e = within(STEP, "a new session with the old key", dialer(relay.url(), key()).dial(&echo.to_string())).await.expect_err("old key");
    assert_eq!(e.code(), ErrorCode::AuthUnknownKey, "{e}");
    // The open session stays, but each new stream meets the new allowlist.
    within(STEP, "a stream on the open session", old.dial(&echo.to_string())).await.expect("still allowed target");
    let e = within(STEP, "a removed target", old.dial(&echo2.to_string())).await.expect_err("removed rule");
    assert_eq!(e.code(), ErrorCode::NotAllowed, "{e}");
    // The new key works; the listener lost its grant: it is told why and is unreachable.
    within(STEP, "the new key", dialer(relay.url(), new_key.clone()).dial(&echo.to_string())).await.expect("new key");
    let e = within(STEP, "the listener to stop", listener.accept()).await.expect_err("closed by the reload");
    assert_eq!(e.code(), ErrorCode::NotAllowed, "{e}");
    assert!(e.message().contains("no longer grants"), "{e}");
    let r = within(STEP, "dial api after the reload", dialer(relay.url(), new_key.clone()).dial("api:0")).await;
    assert!(r.is_err(), "a withdrawn name must not be reachable");
    // A reload that would leave the relay without keys is refused, and changes nothing.
    let mut broken = rotated.clone();
    broken.auth_keys = KeySet::default();
    let e = relay.reload(&broken).expect_err("no keys");
    assert_eq!(e.code(), ErrorCode::InvalidConfig, "{e}");
    within(STEP, "the new key after a failed reload", dialer(relay.url(), new_key).dial(&echo.to_string())).await.expect("unchanged");
    relay.abort();
}
