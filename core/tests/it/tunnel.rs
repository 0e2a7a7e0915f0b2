//! End-to-end tests of the core, library level: a relay ([`Server`]) and [`Dialer`]s on loopback,
//! talking to small local targets. Bulk transfers are checked by SHA-256 of what came back; every
//! refusal by its exact [`ErrorCode`]; every bad-input case is followed by a good dial on the same
//! relay. Protocol misbehaviour (stale dates, replayed proofs, malformed SOCKS5, oversized frames)
//! is produced by speaking the wire protocol by hand through the crate's public codec types.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use libtunnel::mux::{FrameSink, FrameSource, MuxConfig, Role, Session};
use libtunnel::protocol::{self, Hello, HelloAck, ServerConnect, MUX_SUBPROTOCOL, MUX_TCP_MAGIC};
use libtunnel::relay::metrics::Refusal;
use libtunnel::socks::{self, Target};
use libtunnel::transport::{self, ClientTls, Connected, RelayUrl, WsByteStream};
use libtunnel::{Dialer, Error, ErrorCode, Key, Mode, RelayConfig, Server, ServerHandle};
use testkit::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const BOTH_MODES: [Mode; 2] = [Mode::Multiplexed, Mode::Classic];

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

fn dialer(url: &str, mode: Mode) -> Dialer {
    Dialer::builder(url).key(key()).mode(mode).timeout(STEP).build().expect("valid dialer settings")
}

fn dialer_with_key(url: &str, mode: Mode, k: Key) -> Dialer {
    Dialer::builder(url).key(k).mode(mode).timeout(STEP).build().expect("valid dialer settings")
}

fn tcp_url(relay: &ServerHandle) -> String {
    format!("tcp://{}", relay.tcp_addr().expect("relay has a raw-TCP endpoint"))
}

/// A relay config that also listens on a raw-TCP endpoint.
fn relay_config_with_tcp(allow: libtunnel::egress::allowlist::Allowlist) -> RelayConfig {
    let mut cfg = relay_config(allow);
    cfg.tcp_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    cfg
}

/// Dial and push `len` bytes through an echo target and back; the hash must match.
async fn echo_through(d: &Dialer, echo: SocketAddr, len: usize, seed: u64) {
    let data = payload(len, seed);
    let s = within(STEP, "dialing the echo target", d.dial(&echo.to_string()))
        .await
        .unwrap_or_else(|e| panic!("dial {echo} via {} ({:?}) failed: [{}] {e}", d.relay(), d.mode(), e.code()));
    let got = within(BULK, "echo round trip", echo_roundtrip(s, &data, d.mode() == Mode::Multiplexed))
        .await
        .unwrap_or_else(|e| panic!("echo of {len} bytes via {} ({:?}) failed: {e}", d.relay(), d.mode()));
    assert_eq!(got, sha256(&data), "echoed bytes differ from the sent ones ({len} bytes via {}, {:?})", d.relay(), d.mode());
}

/// A small round trip that proves the relay still serves this dialer.
async fn still_serves(d: &Dialer, echo: SocketAddr) {
    echo_through(d, echo, 64 * 1024, 99).await;
}

/// Dial `target` and require a failure with exactly `want`.
async fn expect_dial_error(d: &Dialer, target: &str, want: ErrorCode) -> Error {
    match within(STEP + Duration::from_secs(2), "a refused dial", d.dial(target)).await {
        Ok(_) => panic!("dialing {target} via {} ({:?}) succeeded; expected {want}", d.relay(), d.mode()),
        Err(e) => {
            assert_eq!(e.code(), want, "dialing {target} via {} ({:?}): {e}", d.relay(), d.mode());
            e
        }
    }
}

/// Read until EOF or an error (bounded): the connection must end. Returns what was read first.
async fn expect_closed<R: AsyncRead + Unpin>(r: &mut R, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    within(STEP, what, async {
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    got
}

/// Connect a multiplexed transport by hand (either `ws://` or `tcp://`): returns the relay's
/// nonce and the frame halves, before any hello is sent.
async fn mux_transport(url: &str) -> (Vec<u8>, FrameSource, FrameSink) {
    let u = RelayUrl::parse(url).expect("relay URL");
    match within(STEP, "connecting the transport", transport::connect(&u, true, None)).await.expect("transport connects") {
        Connected::Ws(ws, chosen) => {
            assert!(chosen, "the relay must accept the {MUX_SUBPROTOCOL} subprotocol");
            let (mut source, sink) = transport::ws_frames(ws);
            let pre = within(STEP, "the preamble", source.next()).await.expect("a preamble").expect("preamble readable");
            (ServerConnect::decode_checked(&pre).expect("a valid preamble"), source, sink)
        }
        Connected::Tcp(mut io) => {
            let nonce = within(STEP, "the preamble", protocol::read_server_connect(&mut io)).await.expect("a valid preamble");
            io.write_all(MUX_TCP_MAGIC).await.expect("send magic");
            let (source, sink) = transport::tcp_frames(io);
            (nonce, source, sink)
        }
    }
}

async fn send_hello(source: &mut FrameSource, sink: &mut FrameSink, date: String, sig: String) -> HelloAck {
    sink.send(Hello { date, sig }.encode()).await.expect("send the hello");
    let b = within(STEP, "the hello answer", source.next()).await.expect("an answer").expect("answer readable");
    HelloAck::decode(&b).expect("a well-formed answer")
}

/// A multiplexed WebSocket opened with an early hello (its proof over the client's own `nonce`,
/// dated `when`): what the 101 says of it, and the relay's first message (its answer), if any.
async fn early_hello(url: &str, nonce: [u8; 32], when: SystemTime) -> (Option<String>, Option<HelloAck>) {
    use base64::Engine;
    let (date, sig) = key().sign(&nonce, when);
    let mut raw = nonce.to_vec();
    raw.extend_from_slice(&Hello { date, sig }.encode());
    let mut req = url.into_client_request().expect("request");
    req.headers_mut().insert("sec-websocket-protocol", MUX_SUBPROTOCOL.parse().expect("header"));
    let value = base64::engine::general_purpose::STANDARD_NO_PAD.encode(raw);
    req.headers_mut().insert(protocol::EARLY_HELLO_HEADER, value.parse().expect("header"));
    let (mut ws, resp) = within(STEP, "the upgrade", tokio_tungstenite::connect_async(req)).await.expect("the upgrade");
    let said = resp.headers().get(protocol::EARLY_HELLO_HEADER).map(|v| v.to_str().expect("text").to_string());
    let ack = match within(STEP, "the relay's first message", ws.next()).await {
        Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(b))) => Some(HelloAck::decode(&b).expect("a well-formed answer")),
        _ => None,
    };
    (said, ack)
}

fn refusal_code(ack: &HelloAck) -> Option<ErrorCode> {
    ack.refusal.as_ref().map(|(c, _)| *c)
}

/// An authenticated multiplexed session built by hand from the crate's parts.
async fn raw_session(url: &str) -> Session {
    let (nonce, mut source, mut sink) = mux_transport(url).await;
    let (date, sig) = key().sign(&nonce, SystemTime::now());
    let ack = send_hello(&mut source, &mut sink, date, sig).await;
    assert_eq!(ack.refusal, None, "a good proof must be accepted");
    Session::new(Role::Client, source, sink, MuxConfig::default())
}

/// A classic connection over raw TCP, after the preamble: (socket, nonce).
async fn classic_tcp(relay: &ServerHandle) -> (TcpStream, Vec<u8>) {
    let mut s = within(STEP, "connecting", TcpStream::connect(relay.tcp_addr().expect("tcp endpoint"))).await.expect("connect");
    let nonce = within(STEP, "the preamble", protocol::read_server_connect(&mut s)).await.expect("a valid preamble");
    (s, nonce)
}

/// A classic connection over a WebSocket, after the preamble: (byte stream, nonce).
async fn classic_ws(relay: &ServerHandle) -> (WsByteStream, Vec<u8>) {
    let u = RelayUrl::parse(relay.url()).expect("relay URL");
    let Connected::Ws(ws, chosen) = within(STEP, "connecting", transport::connect(&u, false, None)).await.expect("connect") else {
        panic!("a ws:// URL gives a WebSocket")
    };
    assert!(!chosen, "no subprotocol was offered");
    let mut io = WsByteStream::new(ws, None);
    let pre = within(STEP, "the preamble", io.read_message()).await.expect("a preamble");
    (io, ServerConnect::decode_checked(&pre).expect("a valid preamble"))
}

/// Classic SOCKS5 greeting + RFC 1929 with the given username (date) and password (proof);
/// returns the RFC 1929 status byte.
async fn classic_auth<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S, date: &str, sig: &str) -> u8 {
    io.write_all(&[5, 2, 0x00, 0x02]).await.expect("greeting");
    io.flush().await.expect("flush");
    let mut m = [0u8; 2];
    within(STEP, "the method choice", io.read_exact(&mut m)).await.expect("method choice");
    assert_eq!(m, [5, 2], "the relay must pick username/password when offered 0x00 and 0x02");
    let mut req = vec![1, date.len() as u8];
    req.extend_from_slice(date.as_bytes());
    req.push(sig.len() as u8);
    req.extend_from_slice(sig.as_bytes());
    io.write_all(&req).await.expect("credentials");
    io.flush().await.expect("flush");
    let mut a = [0u8; 2];
    within(STEP, "the auth answer", io.read_exact(&mut a)).await.expect("auth answer");
    assert_eq!(a[0], 1, "RFC 1929 answer version");
    a[1]
}

fn connect_request(target: SocketAddr, command: u8) -> Vec<u8> {
    let SocketAddr::V4(v4) = target else { panic!("IPv4 target expected") };
    let mut r = vec![5, command, 0, 1];
    r.extend_from_slice(&v4.ip().octets());
    r.extend_from_slice(&v4.port().to_be_bytes());
    r
}

fn metrics_text(relay: &ServerHandle) -> String {
    relay.metrics().render()
}

// ---------------------------------------------------------------------------------------------
// bulk data, many streams, half-close
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_64mib_each_way_multiplexed() {
    init_tracing();
    let echo = echo_server().await;
    let relay = start_relay(relay_config(allow_ports(&[echo.port()]))).await;
    let d = Dialer::new(relay.url(), key()).expect("dialer");
    assert_eq!(d.mode(), Mode::Multiplexed, "multiplexed is the default");
    echo_through(&d, echo, 64 * MIB, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_64mib_each_way_classic() {
    init_tracing();
    let echo = echo_server().await;
    let relay = start_relay(relay_config(allow_ports(&[echo.port()]))).await;
    echo_through(&dialer(relay.url(), Mode::Classic), echo, 64 * MIB, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_tcp_transport_in_both_modes() {
    init_tracing();
    let echo = echo_server().await;
    let hasher = hash_after_eof_server().await;
    let replier = reply_then_close_server(4, b"classic reply".to_vec()).await;
    let relay = start_relay(relay_config_with_tcp(allow_ports(&[echo.port(), hasher.port(), replier.port()]))).await;
    let url = tcp_url(&relay);
    for (i, mode) in BOTH_MODES.into_iter().enumerate() {
        echo_through(&dialer(&url, mode), echo, 16 * MIB, 10 + i as u64).await;
    }
    // Each mode keeps its end-of-stream semantics on this transport too.
    half_close_round_trip(&dialer(&url, Mode::Multiplexed), hasher).await;
    target_eof_closes_classic_tunnel(&dialer(&url, Mode::Classic), replier, b"classic reply").await;
    let m = metrics_text(&relay);
    assert_eq!(metric(&m, "libtunnel_sessions_total{mode=\"multiplexed\"}"), 2, "{m}");
    assert_eq!(metric(&m, "libtunnel_sessions_total{mode=\"classic\"}"), 2, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_wss_with_a_self_signed_cert_in_both_modes() {
    init_tracing();
    let echo = echo_server().await;
    let (cert, tls_key, pem) = self_signed_cert();
    let mut cfg = relay_config(allow_ports(&[echo.port()]));
    cfg.tls_cert = Some(cert);
    cfg.tls_key = Some(tls_key);
    let relay = start_relay(cfg).await;
    assert!(relay.url().starts_with("wss://"), "a relay with a certificate serves wss://, got {}", relay.url());
    let port = relay.local_addr().expect("addr").port();
    let trust = ClientTls::from_pem(pem.as_bytes()).expect("the cert parses as a CA bundle");
    for host in ["localhost", "127.0.0.1"] {
        let url = format!("wss://{host}:{port}");
        for (i, mode) in BOTH_MODES.into_iter().enumerate() {
            let d = Dialer::builder(&url).key(key()).mode(mode).tls(trust.clone()).timeout(STEP).build().expect("dialer");
            echo_through(&d, echo, 8 * MIB, 20 + i as u64).await;
        }
    }
    // Without trusting the cert (default: Web PKI roots) the handshake fails, with a clear code.
    let untrusting = Dialer::builder(&format!("wss://localhost:{port}")).key(key()).timeout(STEP).build().expect("dialer");
    let e = expect_dial_error(&untrusting, &echo.to_string(), ErrorCode::RelayUnavailable).await;
    assert!(e.message().contains("TLS"), "the error should say the TLS handshake failed: {e}");
    // Plain ws:// against the TLS port fails too (and does not hang).
    let plain = dialer(&format!("ws://127.0.0.1:{port}"), Mode::Multiplexed);
    expect_dial_error(&plain, &echo.to_string(), ErrorCode::RelayUnavailable).await;
    let d = Dialer::builder(relay.url()).key(key()).tls(trust).timeout(STEP).build().expect("dialer");
    still_serves(&d, echo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_streams_share_one_session() {
    init_tracing();
    const STREAMS: usize = 200;
    let echo = echo_server().await;
    let relay = start_relay(relay_config(allow_ports(&[echo.port()]))).await;
    let d = dialer(relay.url(), Mode::Multiplexed);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..STREAMS {
        let d = d.clone();
        tasks.spawn(async move {
            // Distinct content and length per stream, so crossed streams cannot go unnoticed.
            let data = payload(96 * 1024 + i * 1021, 1000 + i as u64);
            let s = d.dial(&echo.to_string()).await.unwrap_or_else(|e| panic!("stream {i}: dial failed: [{}] {e}", e.code()));
            let got = echo_roundtrip(s, &data, true).await.unwrap_or_else(|e| panic!("stream {i}: {e}"));
            assert_eq!(got, sha256(&data), "stream {i} got back other bytes than it sent");
            i
        });
    }
    let mut done = [false; STREAMS];
    within(BULK, "200 concurrent echo streams", async {
        while let Some(r) = tasks.join_next().await {
            done[r.expect("stream task panicked")] = true;
        }
    })
    .await;
    assert!(done.iter().all(|d| *d));
    let m = metrics_text(&relay);
    assert_eq!(metric(&m, "libtunnel_sessions_total{mode=\"multiplexed\"}"), 1, "all streams share one session:\n{m}");
    assert_eq!(metric(&m, "libtunnel_streams_total"), STREAMS as i64, "{m}");
}

/// Write, half-close, then read the target's answer (it only answers after our EOF).
async fn half_close_round_trip(d: &Dialer, hasher: SocketAddr) {
    let data = payload(3 * MIB + 17, 5);
    let mut s = within(STEP, "dial", d.dial(&hasher.to_string())).await.expect("dial the hashing target");
    within(BULK, "writing", s.write_all(&data)).await.expect("write");
    within(STEP, "half-close", s.shutdown()).await.expect("shutdown of the write side");
    let reply = within(STEP, "the reply after our EOF", read_to_end(&mut s)).await.expect("the read side stays open after shutdown");
    assert_eq!(reply, sha256(&data), "the target saw other bytes than we sent (or the reply was cut)");
    assert!(s.write_all(b"late").await.is_err(), "writing after shutdown must fail");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_in_multiplexed_mode_keeps_the_read_side() {
    init_tracing();
    let hasher = hash_after_eof_server().await;
    let relay = start_relay(relay_config(allow_ports(&[hasher.port()]))).await;
    let d = dialer(relay.url(), Mode::Multiplexed);
    half_close_round_trip(&d, hasher).await;
    // Several at once on the same session.
    let runs: Vec<_> = (0..4).map(|_| half_close_round_trip(&d, hasher)).collect();
    futures_util::future::join_all(runs).await;
}

/// Classic mode follows Emissary: when the target finishes, the tunnel closes (the client never
/// shut down its side).
async fn target_eof_closes_classic_tunnel(d: &Dialer, replier: SocketAddr, reply: &[u8]) {
    let mut s = within(STEP, "dial", d.dial(&replier.to_string())).await.expect("dial the replying target");
    s.write_all(b"ping").await.expect("write");
    s.flush().await.expect("flush");
    let got = within(STEP, "reply then EOF", read_to_end(&mut s)).await.expect("a clean end of stream");
    assert_eq!(got, reply);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_mode_target_eof_closes_the_tunnel() {
    init_tracing();
    let replier = reply_then_close_server(4, b"reply from the target".to_vec()).await;
    let relay = start_relay(relay_config(allow_ports(&[replier.port()]))).await;
    target_eof_closes_classic_tunnel(&dialer(relay.url(), Mode::Classic), replier, b"reply from the target").await;
    // The same target through a multiplexed stream: the reply then EOF as well.
    target_eof_closes_classic_tunnel(&dialer(relay.url(), Mode::Multiplexed), replier, b"reply from the target").await;
}

// ---------------------------------------------------------------------------------------------
// authentication
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_and_unknown_keys_are_refused_with_exact_codes() {
    init_tracing();
    let echo = echo_server().await;
    let relay = start_relay(relay_config_with_tcp(allow_ports(&[echo.port()]))).await;
    let target = echo.to_string();
    let mut failures = 0;
    for url in [relay.url().to_string(), tcp_url(&relay)] {
        for mode in BOTH_MODES {
            let good = dialer(&url, mode);
            let wrong = dialer_with_key(&url, mode, Key::new(KID, b"not the relay's secret".to_vec()).expect("key"));
            let e = expect_dial_error(&wrong, &target, ErrorCode::AuthFailed).await;
            assert!(e.message().contains("TUNNEL_KEY"), "the message should say what to check: {e}");
            still_serves(&good, echo).await;
            // Classic mode carries auth in RFC 1929, whose answer is only yes/no: AuthFailed.
            let unknown = dialer_with_key(&url, mode, Key::new(KID + 1, SECRET.to_vec()).expect("key"));
            let want = if mode == Mode::Multiplexed { ErrorCode::AuthUnknownKey } else { ErrorCode::AuthFailed };
            expect_dial_error(&unknown, &target, want).await;
            still_serves(&good, echo).await;
            failures += 2;
        }
    }
    assert_eq!(relay.metrics().auth_failures(), failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_dates_and_replayed_proofs_are_refused() {
    init_tracing();
    let echo = echo_server().await;
    let relay = start_relay(relay_config_with_tcp(allow_ports(&[echo.port()]))).await;
    let twenty_min = Duration::from_secs(20 * 60);
    let mut failures = 0;
    let classic_good = dialer(relay.url(), Mode::Classic);
    let good_ws = dialer(relay.url(), Mode::Multiplexed);
    for url in [relay.url().to_string(), tcp_url(&relay)] {
        let good = dialer(&url, Mode::Multiplexed);
        // Multiplexed: dates 20 minutes off either way → AuthClockSkew, and the transport is closed.
        for when in [SystemTime::now() - twenty_min, SystemTime::now() + twenty_min] {
            let (nonce, mut source, mut sink) = mux_transport(&url).await;
            let (date, sig) = key().sign(&nonce, when);
            let ack = send_hello(&mut source, &mut sink, date, sig).await;
            assert_eq!(refusal_code(&ack), Some(ErrorCode::AuthClockSkew), "{url}: {ack:?}");
            assert!(ack.refusal.as_ref().is_some_and(|(_, m)| m.contains("clock")), "{ack:?}");
            let after = within(STEP, "the relay closing a refused session", source.next()).await;
            assert!(!matches!(after, Some(Ok(_))), "no frames after a refusal: {after:?}");
            failures += 1;
            still_serves(&good, echo).await;
        }
        // A proof accepted on one connection, replayed on another (a new nonce) → AuthFailed.
        let (nonce1, mut source1, mut sink1) = mux_transport(&url).await;
        let (date, sig) = key().sign(&nonce1, SystemTime::now());
        assert_eq!(send_hello(&mut source1, &mut sink1, date.clone(), sig.clone()).await.refusal, None);
        let (nonce2, mut source2, mut sink2) = mux_transport(&url).await;
        assert_ne!(nonce1, nonce2, "every connection gets a fresh nonce");
        let ack = send_hello(&mut source2, &mut sink2, date, sig).await;
        assert_eq!(refusal_code(&ack), Some(ErrorCode::AuthFailed), "{url}: replayed proof: {ack:?}");
        failures += 1;
        drop((source1, sink1));
        still_serves(&good, echo).await;
    }
    // An early hello (the proof over the client's own nonce, in the upgrade request) is taken
    // once: the same hello again is refused as a replay. One dated more than a minute away is
    // declined (the client then signs the relay's nonce, within the usual 15 minutes).
    let nonce: [u8; 32] = std::array::from_fn(|i| i as u8 + 1);
    let (said, ack) = early_hello(relay.url(), nonce, SystemTime::now()).await;
    assert_eq!((said.as_deref(), ack.map(|a| a.refusal)), (Some(protocol::EARLY_TAKEN), Some(None)), "a fresh early hello");
    let (said, ack) = early_hello(relay.url(), nonce, SystemTime::now()).await;
    assert_eq!(said.as_deref(), Some(protocol::EARLY_TAKEN));
    let ack = ack.expect("an answer to the replayed early hello");
    assert_eq!(refusal_code(&ack), Some(ErrorCode::AuthFailed), "replayed early hello: {ack:?}");
    assert!(ack.refusal.as_ref().is_some_and(|(_, m)| m.contains("replay")), "{ack:?}");
    failures += 1;
    let (said, ack) = early_hello(relay.url(), [7; 32], SystemTime::now() - Duration::from_secs(5 * 60)).await;
    assert_eq!((said.as_deref(), ack.is_none()), (Some(protocol::EARLY_DECLINED), true), "an early hello 5 minutes old");
    still_serves(&good_ws, echo).await;
    // Classic (RFC 1929 answers yes/no): stale and future dates and a replayed proof get 0x01,
    // on both transports; a fresh proof gets 0x00.
    let (mut first, nonce) = classic_tcp(&relay).await;
    let (date, sig) = key().sign(&nonce, SystemTime::now());
    assert_eq!(classic_auth(&mut first, &date, &sig).await, 0, "a fresh proof is accepted");
    let (mut s, _) = classic_tcp(&relay).await;
    assert_eq!(classic_auth(&mut s, &date, &sig).await, 1, "a replayed proof is refused");
    expect_closed(&mut s, "the relay closing after a refused proof").await;
    still_serves(&classic_good, echo).await;
    let (mut w, _) = classic_ws(&relay).await;
    assert_eq!(classic_auth(&mut w, &date, &sig).await, 1, "a replayed proof is refused (WebSocket)");
    expect_closed(&mut w, "the relay closing after a refused proof").await;
    still_serves(&classic_good, echo).await;
    failures += 2;
    for when in [SystemTime::now() - twenty_min, SystemTime::now() + twenty_min] {
        let (mut s, nonce) = classic_tcp(&relay).await;
        let (date, sig) = key().sign(&nonce, when);
        assert_eq!(classic_auth(&mut s, &date, &sig).await, 1, "date {date} is refused");
        let (mut w, nonce) = classic_ws(&relay).await;
        let (date, sig) = key().sign(&nonce, when);
        assert_eq!(classic_auth(&mut w, &date, &sig).await, 1, "date {date} is refused (WebSocket)");
        failures += 2;
        still_serves(&classic_good, echo).await;
    }
    assert_eq!(relay.metrics().auth_failures(), failures);
}

// ---------------------------------------------------------------------------------------------
// allowlist and targets
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_outside_the_allowlist_are_refused_in_every_spelling() {
    init_tracing();
    let allowed = echo_server().await;
    let (forbidden, forbidden_hits) = counting_echo_server().await;
    let (pa, pb) = (allowed.port(), forbidden.port());
    // Only 127.0.0.1:PORT_A; PORT_B has a live server that must never be reached.
    let relay = start_relay(relay_config(allow_ports(&[pa]))).await;
    let mux = dialer(relay.url(), Mode::Multiplexed);
    let classic = dialer(relay.url(), Mode::Classic);
    let spellings = [
        format!("127.0.0.1:{pb}"),
        format!("127.1:{pb}"),
        format!("0x7f000001:{pb}"),
        format!("2130706433:{pb}"),
        format!("0177.0.0.1:{pb}"),
        format!("[::ffff:127.0.0.1]:{pb}"),
        format!("[::ffff:7f00:1]:{pb}"),
        // A name that resolves to a forbidden address.
        format!("localhost:{pb}"),
        // Other hosts on the allowed port.
        format!("127.0.0.2:{pa}"),
        format!("[::1]:{pa}"),
    ];
    let mut refused = 0;
    for t in &spellings {
        let e = expect_dial_error(&mux, t, ErrorCode::NotAllowed).await;
        assert!(e.message().contains("TUNNEL_ALLOW"), "the message names the setting: {e}");
        still_serves(&mux, allowed).await;
        refused += 1;
    }
    for t in [format!("127.1:{pb}"), format!("localhost:{pb}"), format!("[::ffff:127.0.0.1]:{pb}")] {
        expect_dial_error(&classic, &t, ErrorCode::NotAllowed).await;
        still_serves(&classic, allowed).await;
        refused += 1;
    }
    // Other spellings of the allowed address, and a name resolving to it, are admitted.
    for t in [format!("127.1:{pa}"), format!("0x7f000001:{pa}"), format!("[::ffff:127.0.0.1]:{pa}"), format!("localhost:{pa}")] {
        let mut s = within(STEP, "dial", mux.dial(&t)).await.unwrap_or_else(|e| panic!("{t} is the allowed address: [{}] {e}", e.code()));
        s.write_all(b"hi").await.expect("write");
        let mut b = [0u8; 2];
        within(STEP, "echo", s.read_exact(&mut b)).await.expect("echo");
        assert_eq!(&b, b"hi");
    }
    assert_eq!(forbidden_hits.load(Ordering::SeqCst), 0, "the relay connected to a forbidden target");
    assert_eq!(relay.metrics().refusals(Refusal::NotAllowed), refused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_and_refusing_targets_have_their_own_codes() {
    init_tracing();
    let echo = echo_server().await;
    let closed = closed_port().await;
    let rules = format!(r#"[{{"host":"127.0.0.1","port":{}}},{{"host":"127.0.0.1","port":{closed}}},{{"host":"*.invalid","port":80}}]"#, echo.port());
    let relay = start_relay(relay_config(allow(&rules))).await;
    for mode in BOTH_MODES {
        let d = dialer(relay.url(), mode);
        // Allowed, but nothing listens there.
        expect_dial_error(&d, &format!("127.0.0.1:{closed}"), ErrorCode::Refused).await;
        still_serves(&d, echo).await;
        // Allowed by a wildcard, but the name does not resolve.
        expect_dial_error(&d, "nonexistent.invalid:80", ErrorCode::Unreachable).await;
        still_serves(&d, echo).await;
    }
    assert_eq!(relay.metrics().refusals(Refusal::Refused), 2);
    assert_eq!(relay.metrics().refusals(Refusal::Unreachable), 2);
}

// ---------------------------------------------------------------------------------------------
// malformed input, limits, HTTP front
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_socks5_is_answered_per_spec_counted_and_isolated() {
    init_tracing();
    let echo = echo_server().await;
    let relay = start_relay(relay_config_with_tcp(allow_ports(&[echo.port()]))).await;
    let malformed = || relay.metrics().refusals(Refusal::Malformed);
    let (good_tcp, good_ws) = (dialer(&tcp_url(&relay), Mode::Classic), dialer(relay.url(), Mode::Multiplexed));

    // 1. Not SOCKS5 at all (version 4): nothing sensible to answer; the relay closes.
    let (mut s, _) = classic_tcp(&relay).await;
    s.write_all(&[4, 1, 0x50, 0, 0, 0, 1]).await.expect("write");
    let got = expect_closed(&mut s, "the relay closing after a SOCKS4 greeting").await;
    assert!(got.is_empty(), "no answer to a non-SOCKS5 greeting, got {got:?}");
    assert_eq!(malformed(), 1);
    still_serves(&good_tcp, echo).await;

    // 2. A greeting without username/password: "no acceptable methods" (0xFF), then close.
    let (mut s, _) = classic_tcp(&relay).await;
    s.write_all(&[5, 1, 0x00]).await.expect("write");
    let got = expect_closed(&mut s, "the relay closing after refusing every method").await;
    assert_eq!(got, [5, 0xff], "RFC 1928: no acceptable methods");
    assert_eq!(malformed(), 2);
    still_serves(&good_tcp, echo).await;

    // 3. Authenticated, then BIND: reply 0x07 (command not supported), then close.
    let (mut s, nonce) = classic_tcp(&relay).await;
    let (date, sig) = key().sign(&nonce, SystemTime::now());
    assert_eq!(classic_auth(&mut s, &date, &sig).await, 0);
    s.write_all(&connect_request(echo, 0x02)).await.expect("write");
    let got = expect_closed(&mut s, "the relay closing after an unsupported command").await;
    assert!(got.len() >= 2 && got[0] == 5 && got[1] == 0x07, "RFC 1928 reply 0x07 expected, got {got:?}");
    assert_eq!(malformed(), 3);
    still_serves(&good_tcp, echo).await;

    // 4. Garbage over a classic WebSocket.
    let (mut w, _) = classic_ws(&relay).await;
    w.write_all(&[0xde, 0xad, 0xbe, 0xef]).await.expect("write");
    w.flush().await.expect("flush");
    let got = expect_closed(&mut w, "the relay closing after garbage").await;
    assert!(got.is_empty(), "no answer to garbage, got {got:?}");
    assert_eq!(malformed(), 4);
    still_serves(&good_ws, echo).await;

    // 5. On a multiplexed session: a bad request resets that stream (PROTOCOL), and the session
    //    keeps serving other streams.
    let session = raw_session(relay.url()).await;
    let mut bad = session.open().expect("open a stream");
    let mut req = vec![5, 1, 0x00];
    req.extend_from_slice(&connect_request(echo, 0x09)); // command 9 does not exist
    bad.write_all(&req).await.expect("write");
    let code = within(STEP, "the reset of the bad stream", async {
        let mut buf = [0u8; 64];
        loop {
            match bad.read(&mut buf).await {
                Ok(0) => panic!("the bad stream ended cleanly; expected a reset"),
                Ok(_) => continue, // the 0x07 reply may arrive before the reset
                Err(e) => break Error::from_io(e, "bad stream").code(),
            }
        }
    })
    .await;
    assert_eq!(code, ErrorCode::Protocol);
    assert_eq!(malformed(), 5);
    let mut good = session.open().expect("the session is still open");
    within(STEP, "a good CONNECT on the same session", socks::client_connect(&mut good, &Target::parse(&echo.to_string()).expect("target"), true))
        .await
        .expect("the relay still serves the session");
    let data = payload(MIB, 77);
    let got = within(BULK, "echo on the same session", echo_roundtrip(good, &data, true)).await.expect("echo");
    assert_eq!(got, sha256(&data));
    still_serves(&good_ws, echo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_drops_only_that_session() {
    init_tracing();
    let echo = echo_server().await;
    let relay = start_relay(relay_config_with_tcp(allow_ports(&[echo.port()]))).await;
    let d = dialer(relay.url(), Mode::Multiplexed);
    // A stream in flight on another session while the bad session is dropped.
    let data = payload(4 * MIB, 31);
    let mut inflight = within(STEP, "dial", d.dial(&echo.to_string())).await.expect("dial");
    inflight.write_all(&data[..MIB]).await.expect("write");

    // WebSocket: one binary message just over the 1 MiB limit.
    let (nonce, mut source, mut sink) = mux_transport(relay.url()).await;
    let (date, sig) = key().sign(&nonce, SystemTime::now());
    assert_eq!(send_hello(&mut source, &mut sink, date, sig).await.refusal, None);
    let _ = sink.send(Bytes::from(vec![0u8; MIB + 1])).await;
    let end = within(STEP, "the relay dropping the session", async {
        loop {
            match source.next().await {
                Some(Ok(_)) => continue, // a ping or a close frame may come first
                other => break other.map(|r| r.map(|_| ())),
            }
        }
    })
    .await;
    assert!(!matches!(end, Some(Ok(()))), "the session must end: {end:?}");

    // Raw TCP: a record whose length prefix is over the limit.
    let mut s = within(STEP, "connect", TcpStream::connect(relay.tcp_addr().expect("tcp"))).await.expect("connect");
    let nonce = protocol::read_server_connect(&mut s).await.expect("preamble");
    s.write_all(MUX_TCP_MAGIC).await.expect("magic");
    let (date, sig) = key().sign(&nonce, SystemTime::now());
    let hello = Hello { date, sig }.encode();
    s.write_all(&(hello.len() as u32).to_be_bytes()).await.expect("write");
    s.write_all(&hello).await.expect("write");
    let mut len = [0u8; 4];
    within(STEP, "hello answer", s.read_exact(&mut len)).await.expect("answer length");
    let mut ack = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut ack).await.expect("answer");
    assert_eq!(HelloAck::decode(&ack).expect("answer").refusal, None);
    s.write_all(&((MIB + 1) as u32).to_be_bytes()).await.expect("write");
    let _ = s.write_all(&vec![0u8; 64 * 1024]).await;
    expect_closed(&mut s, "the relay dropping the raw-TCP session").await;

    // The other session never noticed.
    inflight.write_all(&data[MIB..]).await.expect("the other session still takes data");
    inflight.shutdown().await.expect("shutdown");
    let back = within(BULK, "the rest of the echo", read_to_end(&mut inflight)).await.expect("echo");
    assert_eq!(sha256(&back), sha256(&data));
    still_serves(&d, echo).await;
    let m = metrics_text(&relay);
    assert_eq!(metric(&m, "libtunnel_sessions_total{mode=\"multiplexed\"}"), 3, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_are_dropped_after_the_handshake_timeout() {
    init_tracing();
    let echo = echo_server().await;
    let mut cfg = relay_config_with_tcp(allow_ports(&[echo.port()]));
    let limit = Duration::from_millis(400);
    cfg.limits.handshake_timeout = limit;
    let relay = start_relay(cfg).await;
    let ws_addr = relay.local_addr().expect("ws addr");
    let timeouts = || relay.metrics().refusals(Refusal::HandshakeTimeout);
    let good = dialer(relay.url(), Mode::Multiplexed);

    // Each case must end the connection after about `limit` (not at once, not never).
    let check = |started: Instant, what: &str| {
        let took = started.elapsed();
        assert!(took >= limit - Duration::from_millis(50), "{what}: closed after {took:?}, before the handshake timeout");
    };

    // 1. TCP to the WebSocket endpoint, not a byte sent.
    let t = Instant::now();
    let mut s = TcpStream::connect(ws_addr).await.expect("connect");
    expect_closed(&mut s, "a silent HTTP connection").await;
    check(t, "silent HTTP connection");
    still_serves(&good, echo).await;

    // 2. Half an HTTP request.
    let t = Instant::now();
    let mut s = TcpStream::connect(ws_addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.expect("write");
    expect_closed(&mut s, "an unfinished HTTP request").await;
    check(t, "unfinished HTTP request");
    still_serves(&good, echo).await;

    // 3. Raw TCP endpoint: preamble read, then silence.
    let t = Instant::now();
    let (mut s, _) = classic_tcp(&relay).await;
    expect_closed(&mut s, "a silent raw-TCP client").await;
    check(t, "silent raw-TCP client");
    still_serves(&good, echo).await;

    // 4. Raw TCP, a partial SOCKS5 greeting.
    let t = Instant::now();
    let (mut s, _) = classic_tcp(&relay).await;
    s.write_all(&[5]).await.expect("write");
    expect_closed(&mut s, "a stalled SOCKS5 greeting").await;
    check(t, "stalled SOCKS5 greeting");
    still_serves(&good, echo).await;

    // 5. A multiplexed WebSocket that never sends its hello.
    let t = Instant::now();
    let (_nonce, mut source, _sink) = mux_transport(relay.url()).await;
    let end = within(STEP, "a session without hello", source.next()).await;
    assert!(!matches!(end, Some(Ok(_))), "{end:?}");
    check(t, "session without hello");
    still_serves(&good, echo).await;

    // 6. A classic WebSocket that never authenticates.
    let t = Instant::now();
    let (mut w, _) = classic_ws(&relay).await;
    expect_closed(&mut w, "a classic WebSocket without SOCKS5").await;
    check(t, "classic WebSocket without SOCKS5");
    still_serves(&good, echo).await;

    assert_eq!(timeouts(), 6, "every case is counted as a handshake timeout");
    for mode in BOTH_MODES {
        still_serves(&dialer(relay.url(), mode), echo).await;
        still_serves(&dialer(&tcp_url(&relay), mode), echo).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_front_health_metrics_and_wrong_subprotocol() {
    init_tracing();
    let echo = echo_server().await;
    let relay = start_relay(relay_config(allow_ports(&[echo.port()]))).await;
    let addr = relay.local_addr().expect("addr");

    let (status, body) = http_get(addr, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("health answers JSON");
    assert_eq!(v, serde_json::json!({ "ok": true, "key_ids": [KID] }));

    // A WebSocket upgrade with a subprotocol we do not speak: 400, and the body names the fix.
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat.v2\r\n\r\n"
    );
    let (status, body) = http_exchange(addr, &req).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains(MUX_SUBPROTOCOL) && body.contains("no subprotocol"), "the body should name what to send instead: {body}");
    // The same through a WebSocket client library.
    let mut r = relay.url().into_client_request().expect("request");
    r.headers_mut().insert("sec-websocket-protocol", "chat.v2".parse().expect("header"));
    match within(STEP, "a refused upgrade", tokio_tungstenite::connect_async(r)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 400),
        other => panic!("expected HTTP 400, got {other:?}"),
    }

    // Some traffic, then the counters.
    still_serves(&dialer(relay.url(), Mode::Multiplexed), echo).await;
    still_serves(&dialer(relay.url(), Mode::Classic), echo).await;
    let (status, text) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(metric(&text, "libtunnel_sessions_total{mode=\"multiplexed\"}"), 1, "{text}");
    assert_eq!(metric(&text, "libtunnel_sessions_total{mode=\"classic\"}"), 1, "{text}");
    assert_eq!(metric(&text, "libtunnel_streams_total"), 2, "{text}");
    assert_eq!(metric(&text, "libtunnel_refusals_total{reason=\"malformed\"}"), 2, "both wrong-subprotocol upgrades are counted: {text}");
    assert_eq!(metric(&text, "libtunnel_auth_failures_total"), 0, "{text}");
    assert!(text.contains("# TYPE libtunnel_streams_active gauge"), "{text}");

    // A plain GET elsewhere: 400, as Emissary answers, and the body says how to use the endpoint.
    let (status, body) = http_get(addr, "/").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("connect with a WebSocket"), "{body}");
}

// ---------------------------------------------------------------------------------------------
// relay death
// ---------------------------------------------------------------------------------------------

/// Start a 64 MiB echo transfer, kill the relay once data flows, and require both directions to
/// fail promptly (an error, or an early end of the echo), never hang.
async fn abort_mid_transfer(relay: &ServerHandle, d: &Dialer, echo: SocketAddr) {
    let data = payload(64 * MIB, 41);
    let s = within(STEP, "dial", d.dial(&echo.to_string())).await.expect("dial");
    let (mut rd, mut wr) = tokio::io::split(s);
    let (flowing_tx, flowing_rx) = tokio::sync::oneshot::channel::<()>();
    let write = async {
        for chunk in data.chunks(64 * 1024) {
            wr.write_all(chunk).await?;
        }
        wr.flush().await
    };
    let read = async {
        let mut flowing = Some(flowing_tx);
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0usize;
        loop {
            match rd.read(&mut buf).await {
                Ok(0) => break (got, Ok(())),
                Ok(n) => got += n,
                Err(e) => break (got, Err(e)),
            }
            if got >= 4 * MIB {
                if let Some(tx) = flowing.take() {
                    let _ = tx.send(());
                }
            }
            if got == data.len() {
                break (got, Ok(()));
            }
        }
    };
    let kill = async {
        flowing_rx.await.expect("data started flowing");
        relay.abort();
    };
    let (w, (got, r), ()) = within(STEP, "the transfer failing after the relay died", async { tokio::join!(write, read, kill) }).await;
    assert!(got < data.len(), "all {got} bytes came back although the relay was killed");
    assert!(r.is_err(), "{:?}: reading from a killed relay must fail, not end cleanly (after {got} bytes)", d.mode());
    assert!(w.is_err(), "{:?}: writing 64 MiB into a dead relay must fail, got {w:?}", d.mode());
}

/// Bind a relay on a given address, retrying while the previous relay's socket is still closing.
async fn rebind(cfg: RelayConfig) -> ServerHandle {
    eventually("re-binding the relay's port", || async {
        match Server::bind(cfg.clone()).await {
            Ok(s) => Ok(s.spawn()),
            Err(e) if e.code() == ErrorCode::Io => Err(e),
            Err(e) => panic!("bind: {e}"),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_death_mid_transfer_multiplexed_then_reconnect_on_the_same_port() {
    init_tracing();
    let echo = echo_server().await;
    let cfg = relay_config(allow_ports(&[echo.port()]));
    let relay = start_relay(cfg.clone()).await;
    let d = dialer(relay.url(), Mode::Multiplexed);
    abort_mid_transfer(&relay, &d, echo).await;
    // The same dialer, with the relay back on the same port: the session is re-established.
    let mut cfg2 = cfg;
    cfg2.listen = relay.local_addr();
    let relay2 = rebind(cfg2).await;
    assert_eq!(relay2.url(), relay.url());
    echo_through(&d, echo, 4 * MIB, 42).await;
    assert_eq!(metric(&metrics_text(&relay2), "libtunnel_sessions_total{mode=\"multiplexed\"}"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_death_mid_transfer_classic_then_a_new_relay() {
    init_tracing();
    let echo = echo_server().await;
    let cfg = relay_config(allow_ports(&[echo.port()]));
    let relay = start_relay(cfg.clone()).await;
    abort_mid_transfer(&relay, &dialer(relay.url(), Mode::Classic), echo).await;
    let relay2 = start_relay(cfg).await;
    assert_ne!(relay2.url(), relay.url());
    for mode in BOTH_MODES {
        echo_through(&dialer(relay2.url(), mode), echo, 4 * MIB, 43).await;
    }
}

/// A self-signed certificate marked as a CA (what `openssl req -x509` makes), written as in
/// [`self_signed_cert`].
fn ca_flagged_self_signed_cert() -> (PathBuf, PathBuf, String) {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("self-signed");
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).expect("clock after 1970").as_nanos();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("tls-ca-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the cert dir");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    (cert_path, key_path, cert.pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_errors_name_the_fix_and_an_openssl_style_self_signed_cert_works() {
    init_tracing();
    let echo = echo_server().await;
    let (cert, tls_key, pem) = ca_flagged_self_signed_cert();
    let mut cfg = relay_config(allow_ports(&[echo.port()]));
    cfg.tls_cert = Some(cert);
    cfg.tls_key = Some(tls_key);
    let relay = start_relay(cfg).await;
    let port = relay.local_addr().expect("addr").port();
    // Passed with --ca, the very certificate is trusted although the Web PKI rules refuse a CA
    // certificate as a server's (CaUsedAsEndEntity).
    let trust = ClientTls::from_pem(pem.as_bytes()).expect("the cert parses");
    let d = Dialer::builder(&format!("wss://localhost:{port}")).key(key()).tls(trust.clone()).timeout(STEP).build().expect("dialer");
    echo_through(&d, echo, MIB, 40).await;
    // Not trusted: the message names --ca / TUNNEL_CA.
    let untrusting = Dialer::builder(&format!("wss://localhost:{port}")).key(key()).timeout(STEP).build().expect("dialer");
    let e = expect_dial_error(&untrusting, &echo.to_string(), ErrorCode::RelayUnavailable).await;
    assert!(e.message().contains("--ca") && e.message().contains("TUNNEL_CA"), "{e}");
    // Trusted, but dialed under a name the certificate does not hold.
    let wrong_name = Dialer::builder(&format!("wss://127.0.0.1:{port}")).key(key()).tls(trust).timeout(STEP).build().expect("dialer");
    let e = expect_dial_error(&wrong_name, &echo.to_string(), ErrorCode::RelayUnavailable).await;
    assert!(e.message().contains("not valid for 127.0.0.1"), "{e}");
    // wss:// to a plain relay: the message says to use ws://.
    let plain = start_relay(relay_config(allow_ports(&[echo.port()]))).await;
    let plain_port = plain.local_addr().expect("addr").port();
    let d = Dialer::builder(&format!("wss://localhost:{plain_port}")).key(key()).timeout(STEP).build().expect("dialer");
    let e = expect_dial_error(&d, &echo.to_string(), ErrorCode::RelayUnavailable).await;
    assert!(e.message().contains("use ws://"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// round trips to the first byte
// ---------------------------------------------------------------------------------------------

/// Flights through a [`delayed_link`], by causal depth: bytes read in one direction are one
/// flight deeper than the deepest bytes already delivered the other way (anything delivered
/// before may have caused them), the first bytes are flight 1. The depth of the bytes a client
/// waits for is the number of one-way trips on its critical path, whatever the machine's load.
#[derive(Default)]
struct Flights(std::sync::Mutex<[u32; 2]>);

impl Flights {
    /// The depth of bytes read now, going towards the relay or not.
    fn read(&self, towards_relay: bool) -> u32 {
        self.0.lock().unwrap()[usize::from(!towards_relay)] + 1
    }
    fn delivered(&self, towards_relay: bool, depth: u32) {
        let mut d = self.0.lock().unwrap();
        d[usize::from(towards_relay)] = d[usize::from(towards_relay)].max(depth);
    }
    /// The deepest flight delivered to the client so far.
    fn to_client(&self) -> u32 {
        self.0.lock().unwrap()[0]
    }
}

/// A forwarder in front of `to` that delivers every byte `one_way` after it was read, each way
/// (a long link; order kept), and counts [`Flights`] (one link per connection counted). Its own TCP handshake is loopback-fast, so what it counts comes after
/// the TCP connect. With `strip_early` it drops the early-hello header from each request, so the
/// relay answers as one that predates it would.
async fn delayed_link(to: SocketAddr, one_way: Duration, strip_early: bool) -> (SocketAddr, std::sync::Arc<Flights>) {
    async fn pump(
        mut r: tokio::net::tcp::OwnedReadHalf,
        mut w: tokio::net::tcp::OwnedWriteHalf,
        one_way: Duration,
        flights: std::sync::Arc<Flights>,
        towards_relay: bool,
        mut strip_early: bool,
    ) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>, u32)>();
        let counted = flights.clone();
        let writer = tokio::spawn(async move {
            while let Some((due, b, depth)) = rx.recv().await {
                tokio::time::sleep_until(due).await;
                // Marked before the write: the other end may answer before it returns.
                counted.delivered(towards_relay, depth);
                if w.write_all(&b).await.is_err() {
                    return;
                }
            }
            let _ = w.shutdown().await;
        });
        let mut buf = vec![0u8; 64 * 1024];
        let mut head = Vec::new();
        while let Ok(n @ 1..) = r.read(&mut buf).await {
            let depth = flights.read(towards_relay);
            let mut bytes = buf[..n].to_vec();
            if strip_early {
                head.extend_from_slice(&bytes);
                let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
                let text = String::from_utf8(head[..end + 4].to_vec()).expect("a text head");
                let kept: Vec<&str> = text.split("\r\n").filter(|l| !l.to_ascii_lowercase().starts_with(protocol::EARLY_HELLO_HEADER)).collect();
                bytes = kept.join("\r\n").into_bytes();
                bytes.extend_from_slice(&head[end + 4..]);
                strip_early = false;
            }
            let _ = tx.send((tokio::time::Instant::now() + one_way, bytes, depth));
        }
        drop(tx);
        let _ = writer.await;
    }
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the link");
    let addr = l.local_addr().expect("addr");
    let flights = std::sync::Arc::new(Flights::default());
    let counted = flights.clone();
    tokio::spawn(async move {
        while let Ok((a, _)) = l.accept().await {
            let Ok(b) = TcpStream::connect(to).await else { continue };
            let _ = (a.set_nodelay(true), b.set_nodelay(true));
            let ((ar, aw), (br, bw)) = (a.into_split(), b.into_split());
            tokio::spawn(pump(ar, bw, one_way, counted.clone(), true, strip_early));
            tokio::spawn(pump(br, aw, one_way, counted.clone(), false, false));
        }
    });
    (addr, flights)
}

/// Flights (one-way trips) from a local client's connect to its first echoed byte through
/// `tunnel forward`'s code, counted by a link with a 50 ms one-way delay between the dialer and
/// the relay (after the TCP connect, which the link does not delay).
///
/// Over WebSocket the hello is an early one: the upgrade request carries it, and the first
/// stream's CONNECT follows the request at once, so the 101, the relay's answer and the CONNECT's
/// reply come back in flight 2. `Dialer::dial` on a new session (`tunnel dial`, SOCKS) then sends
/// its bytes: 4 flights (was 6 with the relay's nonce, 8 before the pipelining). The forward
/// holds its local client's bytes until the relay took the early hello (a relay that predates it
/// would drop them): 4 (was 4). Over raw TCP the relay speaks first (its nonce): the forward's
/// hello, CONNECT and bytes leave in one flight, 3; `dial` 5. A connection on the live session
/// takes 2. A relay that predates early hellos (here: a link that strips the request header, so
/// the relay answers as an old one) costs one more connection: 4 + 4 flights for `dial`, and
/// the next session of the process signs the relay's nonce at once (6). The times are printed
/// (they include the machine's load); the assertions are on the counted flights.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_byte_comes_back_one_flight_after_the_hello() {
    init_tracing();
    let echo = echo_server().await;
    let relay = start_relay(relay_config_with_tcp(allow_ports(&[echo.port()]))).await;
    let one_way = Duration::from_millis(50);
    let target = Target::parse(&echo.to_string()).expect("target");
    for (scheme, addr) in [("ws", relay.local_addr()), ("grpc", relay.local_addr()), ("tcp", relay.tcp_addr())] {
        let addr = addr.expect("endpoint");
        let (link, flights) = delayed_link(addr, one_way, false).await;
        let d = dialer(&format!("{scheme}://{link}"), Mode::Multiplexed);
        // The forward's connections share one session (one link connection): the second one's
        // flights are counted from the deepest delivered before it.
        let listener = libtunnel::forward::bind_local("127.0.0.1:0").await.expect("bind");
        let local = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let fwd = tokio::spawn(libtunnel::forward::forward(listener, d, target.clone(), async move {
            let _ = stopped.await;
        }));
        let mut counted = Vec::new();
        for i in 0..2u8 {
            let (start, before) = (Instant::now(), flights.to_client());
            let mut c = TcpStream::connect(local).await.expect("connect to the forward");
            c.write_all(&[i; 5]).await.expect("write");
            let mut back = [0u8; 5];
            within(STEP, "the first echoed bytes", c.read_exact(&mut back)).await.expect("read");
            assert_eq!(back, [i; 5]);
            counted.push(flights.to_client() - before);
            eprintln!(
                "{scheme}: forward, connection {i}: first byte after {:.1} ms, {} flights",
                start.elapsed().as_secs_f64() * 1e3,
                counted[i as usize]
            );
        }
        // `Dialer::dial` (as `tunnel dial` and the SOCKS proxy) returns once the CONNECT is
        // answered, and its bytes follow: one round trip more.
        let (link, flights) = delayed_link(addr, one_way, false).await;
        let start = Instant::now();
        let mut s = dialer(&format!("{scheme}://{link}"), Mode::Multiplexed).dial(&echo.to_string()).await.expect("dial");
        s.write_all(b"dial!").await.expect("write");
        let mut back = [0u8; 5];
        within(STEP, "the first echoed bytes", s.read_exact(&mut back)).await.expect("read");
        assert_eq!(&back, b"dial!");
        counted.push(flights.to_client());
        eprintln!("{scheme}: Dialer::dial on a new session: first byte after {:.1} ms, {} flights", start.elapsed().as_secs_f64() * 1e3, counted[2]);
        // Over WebSocket: the upgrade with the early hello and the CONNECT; the 101, the answer
        // and the reply; the bytes; the echo. Over raw TCP the relay's preamble comes first.
        // The gRPC call carries the early hello in its headers, as the upgrade does.
        let want = if scheme == "tcp" { [3, 2, 5] } else { [4, 2, 4] };
        assert_eq!(counted, want, "{scheme}: flights to the first byte (forward: new session, then on it; dial: new session)");
        if scheme == "ws" {
            // A relay that predates early hellos: one connection more (the 101 without the
            // header, then the relay's nonce), and the process remembers it.
            let (old, flights) = delayed_link(addr, one_way, true).await;
            let mut fallback = Vec::new();
            for _ in 0..2 {
                let before = flights.to_client();
                let mut s = dialer(&format!("ws://{old}"), Mode::Multiplexed).dial(&echo.to_string()).await.expect("dial an old relay");
                s.write_all(b"old!!").await.expect("write");
                let mut back = [0u8; 5];
                within(STEP, "the first echoed bytes", s.read_exact(&mut back)).await.expect("read");
                assert_eq!(&back, b"old!!");
                fallback.push(flights.to_client() - before);
            }
            assert_eq!(fallback, [2 + 6, 6], "flights through a relay that predates early hellos (first and next session)");
        }
        let _ = stop.send(());
        within(STEP, "the forward to stop", fwd).await.expect("forward task").expect("forward");
    }
}
