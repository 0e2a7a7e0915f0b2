//! The gRPC transport (`grpc://`, `grpcs://`) against a real relay on loopback: a dialer's and a
//! listener's sessions carried in one HTTP/2 call each, bytes hashed both ways, half-close, TLS by
//! ALPN beside WebSocket on the same port, and every refusal with its code and fix. The relay's
//! HTTP/2 side is also spoken by hand (the `h2` crate as a bare gRPC client) for what our own
//! client never sends.

use std::time::SystemTime;

use bytes::Bytes;
use libtunnel::{Dialer, ErrorCode, Identity, Listener, Mode};
use testkit::*;
use tokio::io::AsyncWriteExt;

fn grpc_url(relay: &libtunnel::ServerHandle, scheme: &str, host: &str) -> String {
    format!("{scheme}://{host}:{}", relay.local_addr().expect("relay address").port())
}

fn dialer(url: &str) -> Dialer {
    Dialer::builder(url).key(key()).timeout(STEP).build().expect("dialer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialer_over_grpc_moves_64_mib_both_ways_and_half_closes() {
    init_tracing();
    let echo = echo_server().await;
    let hasher = hash_after_eof_server().await;
    let relay = start_relay(relay_config(allow_ports(&[echo.port(), hasher.port()]))).await;
    let d = dialer(&grpc_url(&relay, "grpc", "127.0.0.1"));
    let t0 = std::time::Instant::now();
    echo_through(&d, echo, 64 * MIB, 1).await;
    eprintln!("64 MiB each way over grpc://: {:?}", t0.elapsed());
    // Half-close: the target reads to EOF, then answers with the hash of what it read.
    half_close_through(&d, hasher, 3 * MIB + 17, 5).await;
    // Many streams share the one call.
    let runs: Vec<_> = (0..8).map(|i| echo_through(&d, echo, 256 * 1024, 10 + i)).collect();
    futures_util::future::join_all(runs).await;
    let m = relay.metrics().render();
    assert_eq!(metric(&m, "libtunnel_sessions_total{mode=\"multiplexed\"}"), 1, "one session carried every stream: {m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_over_grpc_is_dialed_by_name() {
    init_tracing();
    let echo = echo_server().await;
    let mut cfg = relay_config(allow_ports(&[9]));
    cfg.listeners_open = true;
    let relay = start_relay(cfg).await;
    let url = grpc_url(&relay, "grpc", "127.0.0.1");
    let listener = within(STEP, "listener binds over grpc://", Listener::builder(&url, Identity::generate()).bind()).await.expect("bind");
    let name = listener.name();
    tokio::spawn(libtunnel::forward::expose(listener, echo.to_string(), false, std::future::pending()));
    // The dialer over WebSocket, the listener over gRPC: both are sessions of one relay.
    let d = dialer(relay.url());
    let data = payload(16 * MIB, 7);
    let s = within(STEP, "dial by name", d.dial(&format!("{name}:80"))).await.expect("dial the listener by name");
    let got = within(BULK, "echo through the listener", echo_roundtrip(s, &data, true)).await.expect("echo");
    assert_eq!(got, sha256(&data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcs_and_wss_share_the_tls_port_by_alpn() {
    init_tracing();
    let echo = echo_server().await;
    let (cert, tls_key, pem) = self_signed_cert();
    let mut cfg = relay_config(allow_ports(&[echo.port()]));
    cfg.tls_cert = Some(cert);
    cfg.tls_key = Some(tls_key);
    let relay = start_relay(cfg).await;
    let trust = libtunnel::transport::ClientTls::from_pem(pem.as_bytes()).expect("CA bundle");
    for scheme in ["grpcs", "wss"] {
        let url = grpc_url(&relay, scheme, "localhost");
        let d = Dialer::builder(&url).key(key()).tls(trust.clone()).timeout(STEP).build().expect("dialer");
        echo_through(&d, echo, 8 * MIB, 20).await;
    }
    // grpc:// (no TLS) at the TLS port: a clear refusal, not a hang.
    let e = within(STEP, "a refused dial", dialer(&grpc_url(&relay, "grpc", "127.0.0.1")).dial(&echo.to_string()))
        .await
        .expect_err("plain HTTP/2 at a TLS port");
    assert_eq!(e.code(), ErrorCode::RelayUnavailable, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_over_grpc_carry_their_code_and_fix() {
    init_tracing();
    let echo = echo_server().await;
    let relay = start_relay(relay_config(allow_ports(&[echo.port()]))).await;
    let url = grpc_url(&relay, "grpc", "127.0.0.1");
    // A wrong key: refused by the hello, as over a WebSocket.
    let wrong =
        Dialer::builder(&url).key(libtunnel::Key::new(KID, b"not the relay's secret".to_vec()).expect("key")).timeout(STEP).build().expect("dialer");
    let e = within(STEP, "wrong key", wrong.dial(&echo.to_string())).await.expect_err("a wrong key is refused");
    assert_eq!(e.code(), ErrorCode::AuthFailed, "{e}");
    // A target outside the allowlist.
    let d = dialer(&url);
    let e = within(STEP, "not allowed", d.dial("127.0.0.1:1")).await.expect_err("outside the allowlist");
    assert_eq!(e.code(), ErrorCode::NotAllowed, "{e}");
    // Classic mode is Emissary's WebSocket protocol: a gRPC URL says so.
    let classic = Dialer::builder(&url).key(key()).mode(Mode::Classic).timeout(STEP).build().expect("dialer");
    let e = within(STEP, "classic over grpc", classic.dial(&echo.to_string())).await.expect_err("classic mode needs a WebSocket");
    assert!(e.message().contains("ws://"), "{e}");
    // A plain HTTP/1.1 server where the relay should be: the error names the fix.
    let http1 = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = http1.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = http1.accept().await {
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await;
        }
    });
    let e = within(STEP, "an HTTP/1.1 server", dialer(&format!("grpc://{addr}")).dial(&echo.to_string())).await.expect_err("no HTTP/2 there");
    assert_eq!(e.code(), ErrorCode::RelayUnavailable, "{e}");
    assert!(e.message().contains("HTTP/2"), "{e}");
    // Still serving.
    echo_through(&d, echo, 64 * 1024, 3).await;
}

/// A bare HTTP/2 client: another method on the relay's port is answered UNIMPLEMENTED (12) with a
/// message naming the service; a session call whose messages are garbage ends the call, and the
/// relay serves the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_answers_other_methods_unimplemented_and_survives_garbage() {
    init_tracing();
    let echo = echo_server().await;
    let relay = start_relay(relay_config(allow_ports(&[echo.port()]))).await;
    let tcp = tokio::net::TcpStream::connect(relay.local_addr().expect("addr")).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("HTTP/2 with prior knowledge");
    tokio::spawn(conn);
    let mut client = client.ready().await.expect("ready");
    let call = |path: &str| {
        http::Request::post(format!("http://127.0.0.1{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .expect("request")
    };
    let (answer, _send) = client.send_request(call("/grpc.health.v1.Health/Check"), true).expect("send");
    let answer = within(STEP, "the answer", answer).await.expect("an answer");
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers().get("grpc-status").map(|v| v.as_bytes()), Some(&b"12"[..]), "{:?}", answer.headers());
    let message = answer.headers().get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert!(message.contains("libtunnel.v1.Tunnel/Session"), "{message}");

    // Garbage on the session call: a compressed-flag message.
    let mut client = client.ready().await.expect("ready");
    let (answer, mut send) = client.send_request(call("/libtunnel.v1.Tunnel/Session"), false).expect("send");
    let answer = within(STEP, "the answer", answer).await.expect("an answer");
    let mut body = answer.into_body();
    let preamble = within(STEP, "the preamble", body.data()).await.expect("a message").expect("data");
    assert!(preamble.len() > 5, "the relay speaks first: {preamble:?}");
    send.send_data(Bytes::from_static(&[1, 0, 0, 0, 2, 0x0a, 0]), true).expect("send garbage");
    // The call ends with INVALID_ARGUMENT naming what was wrong, not with a reset.
    let trailers = within(STEP, "the call to end", async {
        while let Some(d) = body.data().await {
            d.expect("no reset: the relay ends the call with trailers");
        }
        body.trailers().await.expect("trailers").expect("grpc-status trailers")
    })
    .await;
    assert_eq!(trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"3"[..]), "{trailers:?}");
    let message = trailers.get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert!(message.contains("compressed"), "{message}");

    // A session call whose first message is not a hello: the relay's refusal (a HelloAck) comes
    // back as a message, then the call ends cleanly.
    let mut client = client.ready().await.expect("ready");
    let (answer, mut send) = client.send_request(call("/libtunnel.v1.Tunnel/Session"), false).expect("send");
    let mut body = within(STEP, "the answer", answer).await.expect("an answer").into_body();
    let _preamble = within(STEP, "the preamble", body.data()).await.expect("a message").expect("data");
    // A Frame of 3 bytes that no hello decodes to.
    send.send_data(Bytes::from_static(&[0, 0, 0, 0, 5, 0x0a, 3, 0xee, 0xee, 0xee]), false).expect("send");
    let (refusal, trailers) = within(STEP, "the refusal and the end", async {
        let mut got = Vec::new();
        while let Some(d) = body.data().await {
            got.extend_from_slice(&d.expect("no reset"));
        }
        (got, body.trailers().await.expect("trailers").expect("grpc-status trailers"))
    })
    .await;
    assert!(String::from_utf8_lossy(&refusal).to_lowercase().contains("hello"), "the refusal names the hello: {refusal:?}");
    assert_eq!(trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]), "{trailers:?}");
    // A message larger than a session frame: INVALID_ARGUMENT too.
    let mut client = client.ready().await.expect("ready");
    let (answer, mut send) = client.send_request(call("/libtunnel.v1.Tunnel/Session"), false).expect("send");
    let mut body = within(STEP, "the answer", answer).await.expect("an answer").into_body();
    let _preamble = within(STEP, "the preamble", body.data()).await.expect("a message").expect("data");
    let len: u32 = 300 * 1024;
    let mut big = vec![0u8];
    big.extend_from_slice(&len.to_be_bytes());
    big.resize(5 + len as usize, 7);
    send.send_data(Bytes::from(big), false).expect("send");
    let trailers = within(STEP, "the call to end", async {
        while let Some(d) = body.data().await {
            d.expect("no reset");
        }
        body.trailers().await.expect("trailers").expect("grpc-status trailers")
    })
    .await;
    assert_eq!(trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"3"[..]), "{trailers:?}");
    echo_through(&dialer(&grpc_url(&relay, "grpc", "127.0.0.1")), echo, 64 * 1024, 4).await;
}

/// What [`gate`] does with each new connection.
const OPEN: u8 = 0;
const REFUSE: u8 = 1;
const SILENT: u8 = 2;

/// A forwarder to `to` standing for a network path: `OPEN` forwards, `REFUSE` closes each new
/// connection at once (a firewall's reset, a middlebox that refuses HTTP/2), `SILENT` holds it and
/// says nothing (packets dropped).
async fn gate(to: std::net::SocketAddr) -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicU8>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let state = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(OPEN));
    let st = state.clone();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            match st.load(std::sync::atomic::Ordering::SeqCst) {
                REFUSE => drop(c),
                SILENT => {
                    tokio::spawn(async move {
                        let mut sink = Vec::new();
                        let _ = tokio::io::AsyncReadExt::read_to_end(&mut c, &mut sink).await;
                    });
                }
                _ => {
                    tokio::spawn(async move {
                        if let Ok(mut up) = tokio::net::TcpStream::connect(to).await {
                            let _ = tokio::io::copy_bidirectional(&mut c, &mut up).await;
                        }
                    });
                }
            }
        }
    });
    (addr, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialer_falls_back_to_websocket_and_returns_to_grpc_once_it_passes_again() {
    use std::sync::atomic::Ordering::SeqCst;
    init_tracing();
    let echo = echo_server().await;
    let relay = start_relay(relay_config(allow_ports(&[echo.port()]))).await;
    let (path, state) = gate(relay.local_addr().expect("addr")).await;
    // The preferred transport first, WebSocket second; gRPC's path refuses for now.
    let urls = format!("grpc://{path},{}", relay.url());
    let again = std::time::Duration::from_millis(500);
    let bound = std::time::Duration::from_secs(1);
    let d = Dialer::builder(&urls).key(key()).timeout(STEP).relay_timing(again, bound).build().expect("dialer");
    let mut events = d.events();
    state.store(REFUSE, SeqCst);
    let t0 = std::time::Instant::now();
    echo_through(&d, echo, MIB, 1).await;
    let fell_back = t0.elapsed();
    assert!(next_connected(&mut events).await.starts_with("ws://"), "the event names the transport in use");
    eprintln!("gRPC refused: a dial over WebSocket in {fell_back:?}");
    assert!(fell_back < bound, "a refused transport is skipped at once, not after the attempt bound: {fell_back:?}");

    // A stream that is open on the WebSocket session across the move.
    let data = payload(4 * MIB, 2);
    let mut long = within(STEP, "dial", d.dial(&echo.to_string())).await.expect("dial");
    within(STEP, "first half", long.write_all(&data[..data.len() / 2])).await.expect("write");

    // gRPC passes again: once the wait is over, a dial moves the dialer back to it.
    state.store(OPEN, SeqCst);
    let t1 = std::time::Instant::now();
    eventually("the dialer to move back to grpc://", || async {
        echo_through(&d, echo, 1024, 3).await;
        holds(d.relay().to_string(), |r| r.starts_with("grpc://"))
    })
    .await;
    assert!(next_connected(&mut events).await.starts_with("grpc://"), "a Connected names the preferred transport again");
    eprintln!("gRPC open again: moved back {:?} later (wait {again:?})", t1.elapsed());
    echo_through(&d, echo, MIB, 4).await;
    // The stream opened before the move finishes on the old session, intact.
    within(STEP, "second half", long.write_all(&data[data.len() / 2..])).await.expect("write");
    within(STEP, "half-close", long.shutdown()).await.expect("shutdown");
    let back = within(STEP, "the echo", read_to_end(&mut long)).await.expect("read");
    assert_eq!(sha256(&back), sha256(&data), "the stream across the move lost or changed bytes");

    // A path that drops packets (nothing answers): a new dialer gives up on it after the bound.
    state.store(SILENT, SeqCst);
    let d2 = Dialer::builder(&urls).key(key()).timeout(STEP).relay_timing(std::time::Duration::from_secs(60), bound).build().expect("dialer");
    let t2 = std::time::Instant::now();
    echo_through(&d2, echo, 64 * 1024, 5).await;
    let took = t2.elapsed();
    eprintln!("gRPC silent: a dial over WebSocket in {took:?} (attempt bound {bound:?})");
    assert!(took >= bound && took < bound * 3, "{took:?}");
}

/// The early hello in a call's headers, spoken by hand: a hello dated an hour ago is declined
/// (the relay would keep its nonce that long); the call ends at once with `libtunnel-hello:
/// declined` and status 0, and the client signs the relay's nonce on a new call, as a Dialer does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_hello_the_relay_cannot_judge_is_declined_in_the_calls_answer() {
    use base64::Engine;
    init_tracing();
    let relay = start_relay(relay_config(allow_ports(&[9]))).await;
    let tcp = tokio::net::TcpStream::connect(relay.local_addr().expect("addr")).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("HTTP/2 with prior knowledge");
    tokio::spawn(conn);
    let nonce = [7u8; 32];
    let date = httpdate::fmt_http_date(SystemTime::now() - std::time::Duration::from_secs(3600));
    let sig = key().sign_with_date(&nonce, &date);
    let mut raw = nonce.to_vec();
    raw.extend_from_slice(&libtunnel::protocol::Hello { date, sig }.encode());
    let value = base64::engine::general_purpose::STANDARD_NO_PAD.encode(raw);
    let req = http::Request::post("http://127.0.0.1/libtunnel.v1.Tunnel/Session")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header(libtunnel::protocol::EARLY_HELLO_HEADER, value)
        .body(())
        .expect("request");
    let mut client = client.ready().await.expect("ready");
    let (answer, _send) = client.send_request(req, false).expect("send");
    let answer = within(STEP, "the answer", answer).await.expect("an answer");
    let h = answer.headers();
    assert_eq!(h.get(libtunnel::protocol::EARLY_HELLO_HEADER).map(|v| v.as_bytes()), Some(libtunnel::protocol::EARLY_DECLINED.as_bytes()), "{h:?}");
    assert_eq!(h.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]), "{h:?}");
    assert!(answer.into_body().is_end_stream(), "a declined call carries nothing");
}
