//! The gRPC transport through a real gRPC-only proxy: nginx (`testkit::nginx`, Debian's
//! `nginx-light`) with `grpc_pass` in front of the relay's tunnel port, HTTP/2 only, no WebSocket
//! upgrade configured. A dialer moves bytes hashed both ways and half-closes, a listener registers
//! and serves public HTTP requests and a dial by name, nginx terminates TLS for `grpcs://`, and a
//! `ws://` client at the same proxy gets a clear error. What nginx does without the settings of
//! `testkit::nginx::LOCATION` (the docs' snippet): a silent call is reset after its timeouts
//! (keepalive pings prevent it), a session is reset after 1 MiB without `client_max_body_size 0`.
//! Skipped (with a line in the skip log) where nginx is not installed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use libtunnel::transport::ClientTls;
use libtunnel::{Dialer, ErrorCode, Identity, Listener, MuxConfig};
use sha2::{Digest, Sha256};
use testkit::nginx::{nginx_program, Nginx, LOCATION};
use testkit::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

fn dialer(url: &str) -> Dialer {
    Dialer::builder(url).key(key()).timeout(STEP).build().expect("dialer")
}

fn mib_per_s(len: usize, t: Duration) -> f64 {
    len as f64 / MIB as f64 / t.as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialer_through_nginx_moves_64_mib_both_ways_and_half_closes() {
    if !nginx_program() {
        return;
    }
    init_tracing();
    let echo = echo_server().await;
    let hasher = hash_after_eof_server().await;
    let relay = start_relay(relay_config(allow_ports(&[echo.port(), hasher.port()]))).await;
    let nginx = Nginx::start(relay.local_addr().expect("relay address")).await;

    let direct = echo_through(&dialer(&format!("grpc://{}", relay.local_addr().expect("addr"))), echo, 64 * MIB, 1).await;
    let d = dialer(&nginx.grpc_url());
    let proxied = echo_through(&d, echo, 64 * MIB, 2).await;
    eprintln!(
        "64 MiB each way: direct grpc:// {direct:.2?} ({:.0} MiB/s), through nginx {proxied:.2?} ({:.0} MiB/s)",
        mib_per_s(64 * MIB, direct),
        mib_per_s(64 * MIB, proxied)
    );
    half_close_through(&d, hasher, 3 * MIB + 17, 5).await;
    // Many streams share the one call through nginx.
    let runs: Vec<_> = (0..8).map(|i| echo_through(&d, echo, 256 * 1024, 10 + i)).collect();
    futures_util::future::join_all(runs).await;
    let m = relay.metrics().render();
    assert_eq!(metric(&m, "libtunnel_sessions_total{mode=\"multiplexed\"}"), 2, "one session direct, one through nginx: {m}");
}

/// nginx passes only gRPC: a WebSocket client at its HTTP/2-only port fails, fast, with an error
/// that names the way out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_dialer_at_nginx_fails_clearly() {
    if !nginx_program() {
        return;
    }
    init_tracing();
    let echo = echo_server().await;
    let relay = start_relay(relay_config(allow_ports(&[echo.port()]))).await;
    let nginx = Nginx::start(relay.local_addr().expect("relay address")).await;
    let url = format!("ws://{}", nginx.plain);
    let e = within(STEP, "a WebSocket dial at nginx", dialer(&url).dial(&echo.to_string())).await.expect_err("nginx passes no WebSocket");
    eprintln!("ws:// at nginx: [{}] {e}", e.code());
    assert_eq!(e.code(), ErrorCode::RelayUnavailable, "{e}");
    assert!(e.message().contains(&nginx.plain.to_string()), "the error names the address: {e}");
    assert!(e.message().contains("HTTP/1.1") && e.message().contains("use grpc://"), "the error names grpc:// as the fix: {e}");
    // The same proxy carries the session over gRPC.
    echo_through(&dialer(&nginx.grpc_url()), echo, 64 * 1024, 3).await;
}

/// `GET /hello` answers `hello METHOD PATH`; `POST /sum` answers the SHA-256 and length of the
/// request body.
async fn app(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (head, body) = req.into_parts();
    let text = match (head.method.as_str(), head.uri.path()) {
        ("POST", "/sum") => match body.collect().await {
            Ok(b) => {
                let b = b.to_bytes();
                format!("{} {}", hex::encode(sha256(&b)), b.len())
            }
            Err(e) => return Ok(Response::builder().status(400).body(Full::new(Bytes::from(format!("body: {e}")))).expect("response")),
        },
        (m, p) if p.starts_with("/hello") => format!("hello {m} {p}"),
        _ => return Ok(Response::builder().status(404).body(Full::new(Bytes::from_static(b"no such page"))).expect("response")),
    };
    Ok(Response::new(Full::new(Bytes::from(text))))
}

/// An HTTP/1.1 server (hyper) on loopback answering [`app`].
async fn http_app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), hyper::service::service_fn(app)));
        }
    });
    addr
}

/// One HTTP/1.1 request (head, then `body`) on `s`; (status, body).
async fn request_on<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, method: &str, host: &str, path: &str, body: &[u8]) -> (u16, String) {
    let head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    within(STEP, "sending the request", async {
        s.write_all(head.as_bytes()).await?;
        s.write_all(body).await?;
        s.flush().await
    })
    .await
    .expect("send the request");
    within(BULK, "reading the response", read_http_response(s)).await
}

async fn public_request(http: SocketAddr, method: &str, host: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = within(STEP, "connecting to the public port", tokio::net::TcpStream::connect(http)).await.expect("connect");
    request_on(&mut s, method, host, path, body).await
}

fn sum_of(data: &[u8]) -> String {
    format!("{} {}", hex::encode(Sha256::digest(data)), data.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_through_nginx_serves_public_requests_and_a_dial_by_name() {
    if !nginx_program() {
        return;
    }
    init_tracing();
    let app = http_app().await;
    let mut cfg = relay_config(allow_ports(&[9]));
    cfg.listeners_open = true;
    cfg.http_listen = Some("127.0.0.1:0".parse().expect("addr"));
    let relay = start_relay(cfg).await;
    let http = relay.http_addr().expect("public HTTP port");
    let nginx = Nginx::start(relay.local_addr().expect("relay address")).await;

    let listener = within(STEP, "a listener binds through nginx", Listener::builder(&nginx.grpc_url(), Identity::generate()).bind())
        .await
        .unwrap_or_else(|e| panic!("bind via {}: [{}] {e}\nnginx: {}", nginx.grpc_url(), e.code(), nginx.error_log()));
    let name = listener.name();
    assert_eq!(listener.registration().http_url.as_deref(), Some(format!("http://{name}.localhost:{}", http.port()).as_str()));
    tokio::spawn(libtunnel::forward::expose(listener, app.to_string(), false, std::future::pending()));
    let host = format!("{name}.localhost:{}", http.port());

    // Public HTTP requests, routed by Host to the listener's session through nginx.
    for i in 0..3 {
        let path = format!("/hello/{i}");
        assert_eq!(public_request(http, "GET", &host, &path, b"").await, (200, format!("hello GET {path}")));
    }
    let up = payload(MIB + 5, 30);
    assert_eq!(public_request(http, "POST", &host, "/sum", &up).await, (200, sum_of(&up)));
    assert_eq!(public_request(http, "GET", &host, "/nowhere", b"").await.0, 404, "the service's own 404 comes back");
    // A few at once, over the one session.
    let posts: Vec<_> = (0..4u64)
        .map(|i| {
            let host = host.clone();
            async move {
                let body = payload(256 * 1024 + i as usize, 40 + i);
                assert_eq!(public_request(http, "POST", &host, "/sum", &body).await, (200, sum_of(&body)));
            }
        })
        .collect();
    futures_util::future::join_all(posts).await;

    // A dialer by name, itself through nginx: 8 MiB up to the service, hashed there.
    let d = dialer(&nginx.grpc_url());
    let mut s =
        within(STEP, "dial by name", d.dial(&format!("{name}:80"))).await.unwrap_or_else(|e| panic!("dial {name} via nginx: [{}] {e}", e.code()));
    let up = payload(8 * MIB, 31);
    assert_eq!(request_on(&mut s, "POST", "by-name", "/sum", &up).await, (200, sum_of(&up)));
    let m = relay.metrics().render();
    assert_eq!(metric(&m, "libtunnel_sessions_total{mode=\"multiplexed\"}"), 1, "the dialer's session (the listener's is counted apart): {m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcs_through_nginx_terminating_tls() {
    if !nginx_program() {
        return;
    }
    init_tracing();
    let echo = echo_server().await;
    let hasher = hash_after_eof_server().await;
    let relay = start_relay(relay_config(allow_ports(&[echo.port(), hasher.port()]))).await;
    let nginx = Nginx::start_with(relay.local_addr().expect("relay address"), true).await;
    let trust = ClientTls::from_pem(nginx.cert_pem.as_deref().expect("nginx's certificate").as_bytes()).expect("CA bundle");
    let d = Dialer::builder(&nginx.grpcs_url()).key(key()).tls(trust).timeout(STEP).build().expect("dialer");
    let took = echo_through(&d, echo, 32 * MIB, 50).await;
    eprintln!("32 MiB each way through nginx terminating TLS: {took:.2?} ({:.0} MiB/s)", mib_per_s(32 * MIB, took));
    half_close_through(&d, hasher, MIB + 3, 51).await;
    // Without the certificate trusted: a TLS refusal, not a hang.
    let untrusted = dialer(&nginx.grpcs_url());
    let e = within(STEP, "an untrusted certificate", untrusted.dial(&echo.to_string()))
        .await
        .expect_err("a self-signed certificate is not trusted by default");
    eprintln!("grpcs:// with nginx's certificate untrusted: [{}] {e}", e.code());
    assert_eq!(e.code(), ErrorCode::RelayUnavailable, "{e}");
    assert!(e.message().contains("--ca"), "the error names the fix: {e}");
    // wss:// at the same port: TLS with HTTP/1.1, but nginx routes no WebSocket to the relay.
    let trust = ClientTls::from_pem(nginx.cert_pem.as_deref().expect("nginx's certificate").as_bytes()).expect("CA bundle");
    let wss = Dialer::builder(&format!("wss://localhost:{}", nginx.tls.expect("TLS port").port()))
        .key(key())
        .tls(trust)
        .timeout(STEP)
        .build()
        .expect("dialer");
    let e = within(STEP, "a WebSocket dial at nginx's TLS port", wss.dial(&echo.to_string())).await.expect_err("nginx passes no WebSocket");
    eprintln!("wss:// at nginx: [{}] {e}", e.code());
    assert_eq!(e.code(), ErrorCode::RelayUnavailable, "{e}");
    assert!(e.message().contains("HTTP 404"), "nginx's answer is in the error: {e}");
}

/// Four bytes echoed on `s`.
async fn word(s: &mut libtunnel::TunnelStream, w: &[u8; 4]) -> std::io::Result<()> {
    s.write_all(w).await?;
    let mut got = [0u8; 4];
    s.read_exact(&mut got).await?;
    assert_eq!(&got, w);
    Ok(())
}

/// nginx ends a call that stays silent longer than its timeouts (`client_body_timeout` from the
/// client, `grpc_read_timeout` from the relay, 60 s by default; here 1 s). The tunnel's keepalive
/// pings (after `keepalive_interval` of silence, 10 s by default) keep an idle session alive as
/// long as they come more often than those timeouts; a session without them is cut, and the
/// dialer notices and opens a new one on its next dial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_timeouts_end_a_silent_call_and_keepalive_pings_prevent_it() {
    if !nginx_program() {
        return;
    }
    init_tracing();
    let echo = echo_server().await;
    let relay = start_relay(relay_config(allow_ports(&[echo.port()]))).await;
    let short = LOCATION.replace(" 1h;", " 1s;");
    assert_eq!(short.matches(" 1s;").count(), 4, "every timeout of the block shortened: {short}");
    let nginx = Nginx::start_with_location(relay.local_addr().expect("relay address"), false, &short).await;
    let pinging = Dialer::builder(&nginx.grpc_url())
        .key(key())
        .timeout(STEP)
        .mux_config(MuxConfig { keepalive_interval: Duration::from_millis(200), ..MuxConfig::default() })
        .build()
        .expect("dialer");
    let quiet = dialer(&nginx.grpc_url());
    let mut kept = within(STEP, "dial", pinging.dial(&echo.to_string())).await.expect("dial with pings");
    let mut cut = within(STEP, "dial", quiet.dial(&echo.to_string())).await.expect("dial without pings");
    within(STEP, "a word", word(&mut kept, b"ping")).await.expect("echo");
    // nginx's timers for this call start after this exchange (they may fire up to 300 ms early:
    // nginx keeps a timer that is re-armed less than that later).
    let t0 = Instant::now();
    within(STEP, "a word", word(&mut cut, b"none")).await.expect("echo");

    // The quiet session: nginx ends its call after 1 s of silence, the stream with it.
    let mut rest = Vec::new();
    let end = within(STEP, "nginx to end the silent call", cut.read_to_end(&mut rest)).await;
    let after = t0.elapsed();
    eprintln!("a silent call through nginx with 1 s timeouts ended after {after:.2?}: {end:?}");
    assert!(after >= Duration::from_millis(650), "ended by nginx's timeout, not before it: {after:?} {end:?}");
    assert!(end.is_err(), "a reset, not a clean end: {end:?}");
    assert!(rest.is_empty(), "{rest:?}");
    // The pinging session outlives it: idle for 3 s, three times nginx's timeouts.
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(t0.elapsed())).await;
    within(STEP, "a word after 3 s idle", word(&mut kept, b"live")).await.expect("the pinging session still carries the stream");
    // The quiet dialer's next dial opens a new session.
    echo_through(&quiet, echo, 64 * 1024, 60).await;
    let m = relay.metrics().render();
    assert_eq!(metric(&m, "libtunnel_sessions_total{mode=\"multiplexed\"}"), 3, "the pinging one, the cut one, and its successor: {m}");
}

/// nginx counts a call's request body against `client_max_body_size` (1 MiB by default), and a
/// session's call carries everything the client sends: without `client_max_body_size 0` nginx
/// resets the call once the session has sent about 1 MiB, and every stream on it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_client_max_body_size_0_nginx_resets_a_session_after_1_mib() {
    if !nginx_program() {
        return;
    }
    init_tracing();
    let echo = echo_server().await;
    let relay = start_relay(relay_config(allow_ports(&[echo.port()]))).await;
    let default_limit: String = LOCATION.lines().filter(|l| !l.contains("client_max_body_size")).map(|l| format!("{l}\n")).collect();
    let nginx = Nginx::start_with_location(relay.local_addr().expect("relay address"), false, &default_limit).await;
    let d = dialer(&nginx.grpc_url());
    echo_through(&d, echo, 512 * 1024, 70).await;
    let s = within(STEP, "dial", d.dial(&echo.to_string())).await.expect("the session still carries streams");
    let data = payload(MIB, 71);
    let e = within(BULK, "an echo past nginx's body limit", echo_roundtrip(s, &data, true)).await.expect_err("nginx resets the call at 1 MiB");
    let code = e.get_ref().and_then(|inner| inner.downcast_ref::<libtunnel::Error>()).map(|e| e.code());
    eprintln!("past 1 MiB through nginx without client_max_body_size 0: [{code:?}] {e}");
    assert_eq!(code, Some(ErrorCode::RelayUnavailable), "{e}");
    // The dialer's next dial opens a new session (which nginx will cut at 1 MiB again).
    echo_through(&d, echo, 64 * 1024, 72).await;
}

/// The nginx snippet of the docs is the `location` block these tests run nginx with.
#[test]
fn the_docs_snippet_is_the_tested_location_block() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/guide/grpc-nginx.md");
    let doc = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let block: String = LOCATION.replace("RELAY", "127.0.0.1:7835").lines().map(|l| format!("    {l}\n")).collect();
    assert!(doc.contains(&block), "{} lacks the tested block:\n{block}", path.display());
}
