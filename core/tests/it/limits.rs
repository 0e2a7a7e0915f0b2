//! The relay's admission limits, each driven over real loopback sockets: connections and
//! handshakes per source address and in all (one source cannot lock others out), failed
//! authentications slowed per source address (valid keys never refused), sessions per key, streams waiting on a
//! listener that never accepts, the public HTTP port's request-head deadline (slowloris) and
//! size, and public requests in progress per source.

use std::time::{Duration, Instant};

use libtunnel::relay::metrics::Refusal;
use libtunnel::{Dialer, ErrorCode, Identity, Key, Listener, Mode};
use testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const STEP: Duration = Duration::from_secs(10);

fn dialer(url: &str, k: Key) -> Dialer {
    Dialer::builder(url).key(k).timeout(STEP).build().expect("valid dialer settings")
}

fn wrong_key() -> Key {
    Key::new(KID, b"not the relay's secret, just a guess".to_vec()).expect("key")
}

/// A TCP connection to `to` from the loopback address `from` (127.0.0.0/8 is all ours).
async fn connect_from(from: &str, to: std::net::SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{from}:0").parse().expect("addr")).expect("bind a loopback source address");
    within(STEP, "connect", sock.connect(to)).await.expect("connect")
}

/// Wait until the relay counts `want` connections in their handshake.
async fn handshakes_reach(relay: &libtunnel::ServerHandle, want: i64) {
    eventually("the relay to count the handshakes", || async { holds(relay.metrics().handshakes_open(), |n| *n == want) }).await;
}

/// A connection the relay must refuse at once: it ends within a second, with nothing or an
/// HTTP answer of `status` naming `setting`.
async fn refused_at_once(mut s: TcpStream, status: &str, setting: &str) {
    let t0 = Instant::now();
    let mut answer = Vec::new();
    let _ = within(Duration::from_secs(1), "an immediate refusal", s.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(answer.is_empty() || (text.starts_with(&format!("HTTP/1.1 {status}")) && text.contains(setting)), "{text:?}");
    assert!(t0.elapsed() < Duration::from_secs(1), "refused after {:?}", t0.elapsed());
}

/// A dial through `d` to the echo target that moves 1 MiB each way and checks its hash.
async fn moves_a_mib(d: &Dialer, echo: std::net::SocketAddr, seed: u64) {
    let data = payload(MIB, seed);
    let s = within(STEP, "a dial", d.dial(&echo.to_string())).await.expect("dial");
    let got = within(BULK, "1 MiB echoed", echo_roundtrip(s, &data, true)).await.expect("echo");
    assert_eq!(got, sha256(&data), "the echo differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_at_its_limits_cannot_lock_others_out() {
    init_tracing();
    let echo = echo_server().await;
    let mut cfg = relay_config(allow_ports(&[echo.port()]));
    cfg.limits.max_connections = 64;
    cfg.limits.max_connections_per_source = 16;
    cfg.limits.max_handshakes_per_source = 8;
    cfg.limits.max_handshakes = 12;
    cfg.limits.handshake_timeout = Duration::from_secs(60);
    let relay = start_relay(cfg).await;
    let addr = relay.local_addr().expect("ws endpoint");
    // A session authenticated before the flood (from 127.0.0.1).
    let early = dialer(relay.url(), key());
    moves_a_mib(&early, echo, 1).await;

    // 127.0.0.2 opens silent connections up to its handshake limit: the relay holds them all.
    let mut flood = Vec::new();
    for _ in 0..8 {
        flood.push(connect_from("127.0.0.2", addr).await);
    }
    handshakes_reach(&relay, 8).await;
    // Its extra connections are refused at once, and counted.
    for _ in 0..5 {
        refused_at_once(connect_from("127.0.0.2", addr).await, "429", "max_handshakes_per_source").await;
    }
    assert_eq!(relay.metrics().refusals(Refusal::SourceHandshakes), 5);
    // Another source authenticates and moves 1 MiB, hashed.
    let late = dialer(relay.url(), key());
    moves_a_mib(&late, echo, 2).await;

    // 127.0.0.3 takes the rest of the global handshake places; then new connections from
    // anyone are refused (503) until handshakes finish or time out...
    for _ in 0..4 {
        flood.push(connect_from("127.0.0.3", addr).await);
    }
    handshakes_reach(&relay, 12).await;
    refused_at_once(connect_from("127.0.0.4", addr).await, "503", "max_handshakes").await;
    assert_eq!(relay.metrics().refusals(Refusal::Handshakes), 1);
    // ...but authenticated sessions are never shed: both still open streams and move 1 MiB.
    moves_a_mib(&early, echo, 3).await;
    moves_a_mib(&late, echo, 4).await;

    // The floods close: every place comes back.
    drop(flood);
    handshakes_reach(&relay, 0).await;
    let fresh = dialer(relay.url(), key());
    moves_a_mib(&fresh, echo, 5).await;
    let m = relay.metrics();
    assert_eq!(m.connections_open(), 3, "three authenticated sessions remain");
    let text = {
        let (status, body) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200);
        body
    };
    assert_eq!(metric(&text, "libtunnel_refusals_total{reason=\"source_handshakes\"}"), 5, "{text}");
    assert_eq!(metric(&text, "libtunnel_refusals_total{reason=\"handshakes\"}"), 1, "{text}");
    relay.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_source_are_bounded_authenticated_or_not() {
    init_tracing();
    let echo = echo_server().await;
    let mut cfg = relay_config(allow_ports(&[echo.port()]));
    cfg.tcp_listen = Some("127.0.0.1:0".parse().expect("addr"));
    cfg.limits.max_connections_per_source = 3;
    let relay = start_relay(cfg).await;
    let tcp = relay.tcp_addr().expect("raw TCP endpoint");
    // Three sessions from 127.0.0.1 (each authenticated): the fourth connection is refused at
    // once, whatever it is, while other sources are served.
    let sessions: Vec<Dialer> = (0..3).map(|_| dialer(relay.url(), key())).collect();
    for (i, d) in sessions.iter().enumerate() {
        moves_a_mib(d, echo, 10 + i as u64).await;
    }
    refused_at_once(connect_from("127.0.0.1", tcp).await, "", "").await;
    assert_eq!(relay.metrics().refusals(Refusal::SourceConnections), 1);
    let other = connect_from("127.0.0.2", tcp).await;
    let mut preamble = [0u8; 8];
    let mut other = other;
    within(STEP, "the relay's preamble to another source", other.read_exact(&mut preamble)).await.expect("served");
    relay.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_requests_in_progress_are_bounded_per_source_and_per_listener() {
    init_tracing();
    let mut cfg = relay_config(allow_ports(&[9]));
    cfg.http_listen = Some("127.0.0.1:0".parse().expect("addr"));
    cfg.listeners_open = true;
    cfg.limits.http_max_requests_per_source = 2;
    cfg.limits.http_max_requests_per_listener = 3;
    cfg.limits.http_timeout = Duration::from_secs(2);
    let relay = start_relay(cfg).await;
    let http = relay.http_addr().expect("http port");
    // A listener that takes every stream and never answers: each request stays in progress.
    let listener = within(STEP, "listener", Listener::bind(relay.url(), Identity::generate())).await.expect("bind");
    let name = listener.name();
    let held = hold_streams(listener);
    let request = format!("GET / HTTP/1.1\r\nHost: {name}.localhost\r\n\r\n");
    let send_from = |from: &'static str| {
        let request = request.clone();
        async move {
            let mut s = connect_from(from, http).await;
            s.write_all(request.as_bytes()).await.expect("request");
            s
        }
    };
    let held_reach = |n: usize| {
        let held = held.clone();
        async move { eventually("the listener to hold the requests", || async { holds(held.lock().expect("held").len(), |h| *h >= n) }).await }
    };
    // Two requests from 127.0.0.1 in progress; its third is refused at once.
    let mut a = send_from("127.0.0.1").await;
    let _b = send_from("127.0.0.1").await;
    held_reach(2).await;
    let mut c = send_from("127.0.0.1").await;
    let (status, body) = within(STEP, "429", read_http_response(&mut c)).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("http_max_requests_per_source"), "{body}");
    // Another source takes the listener's third place; a fourth request, from anyone, gets 503.
    let _d = send_from("127.0.0.2").await;
    held_reach(3).await;
    let mut e = send_from("127.0.0.3").await;
    let (status, body) = within(STEP, "503", read_http_response(&mut e)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("http_max_requests_per_listener"), "{body}");
    let m = relay.metrics();
    assert_eq!((m.refusals(Refusal::HttpSourceRequests), m.refusals(Refusal::HttpListenerRequests)), (1, 1));
    // A request that ends (here with 504: the listener never answers) frees its places.
    let (status, _) = within(STEP, "504", read_http_response(&mut a)).await;
    assert_eq!(status, 504);
    let _f = send_from("127.0.0.1").await;
    held_reach(4).await;
    relay.abort();
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
    eventually("a place to free up", || async {
        match c.dial(&echo.to_string()).await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == ErrorCode::Refused => Err(e),
            Err(e) => panic!("unexpected error {e}"),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ambiguous_host_is_a_bad_request() {
    init_tracing();
    let mut cfg = relay_config(allow_ports(&[9]));
    cfg.http_listen = Some("127.0.0.1:0".parse().expect("addr"));
    cfg.listeners_open = true;
    let relay = start_relay(cfg).await;
    let http = relay.http_addr().expect("http port");
    // A listener that counts the streams it is given and never answers.
    let listener = within(STEP, "listener", Listener::bind(relay.url(), Identity::generate())).await.expect("bind");
    let name = listener.name();
    let (other, _other_listener) = {
        let l = within(STEP, "second listener", Listener::bind(relay.url(), Identity::generate())).await.expect("bind");
        (l.name(), l)
    };
    let delivered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let d = delivered.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            d.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(s);
        }
    });
    for (request, why) in [
        (format!("GET / HTTP/1.1\r\nHost: {name}.localhost\r\nHost: {other}.localhost\r\n\r\n"), "more than one Host"),
        (format!("GET / HTTP/1.1\r\nHost: {name}.localhost\r\nhost: {name}.localhost\r\n\r\n"), "more than one Host"),
        (format!("GET http://{other}.localhost/ HTTP/1.1\r\nHost: {name}.localhost\r\n\r\n"), "another host than the request target"),
        (format!("GET http://{name}.localhost:8080/ HTTP/1.1\r\nHost: {name}.localhost\r\n\r\n"), "another host than the request target"),
    ] {
        let (status, body) = http_exchange(http, &request).await;
        assert_eq!(status, 400, "{request:?}: {body}");
        assert!(body.contains(why), "{request:?}: {body}");
    }
    assert_eq!(delivered.load(std::sync::atomic::Ordering::SeqCst), 0, "an ambiguous request reached a listener");
    // The same host in both (the default port spelt out or not) is routed as usual.
    let mut s = TcpStream::connect(http).await.expect("connect");
    s.write_all(format!("GET http://{name}.localhost/ HTTP/1.1\r\nHost: {name}.LOCALHOST:80\r\n\r\n").as_bytes()).await.expect("request");
    eventually("the listener to get the request", || async { holds(delivered.load(std::sync::atomic::Ordering::SeqCst), |n| *n > 0) }).await;
    assert_eq!(relay.metrics().refusals(Refusal::Malformed), 4);
    relay.abort();
}
