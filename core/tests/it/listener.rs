//! End-to-end tests of reverse listeners over real loopback sockets: public HTTP/1.1 and
//! WebSocket traffic routed by `Host` to an HTTP server behind a listener (hyper on both ends,
//! tokio-tungstenite as the WebSocket client), dial by name through the core `Dialer`, the public
//! TCP port, registration rules (names, keys, signatures, stale sessions), relay restarts,
//! backpressure and many concurrent streams. Every wait is bounded.

use testkit::raw;
use testkit::*;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use libtunnel::auth::KeySet;
use libtunnel::config::ListenerGrant;
use libtunnel::egress::allowlist::Allowlist;
use libtunnel::protocol::ListenHello;
use libtunnel::{Dialer, ErrorCode, Identity, Listener, PeerInfo, RelayConfig, Server, ServerHandle, TunnelStream, Via};
use raw::{hello, next_binary, raw_register};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// A relay config with a public HTTP port, open listener registration, and the test key.
fn listener_relay_config() -> RelayConfig {
    let mut cfg = relay_config(allow_ports(&[9]));
    cfg.http_listen = Some("127.0.0.1:0".parse().expect("addr"));
    cfg.listeners_open = true;
    cfg
}

fn dialer(relay: &ServerHandle) -> Dialer {
    Dialer::builder(relay.url()).key(key()).timeout(STEP).build().expect("dialer")
}

async fn bind_listener(relay_url: &str, id: Identity) -> Listener {
    within(STEP, "binding a listener", Listener::builder(relay_url, id).max_backoff(Duration::from_millis(500)).bind())
        .await
        .expect("listener registers")
}

/// Accept streams forever, handling each in its own task.
fn serve<F, Fut>(listener: Arc<Listener>, handler: F)
where
    F: Fn(TunnelStream, PeerInfo) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        while let Ok((s, peer)) = listener.accept().await {
            tokio::spawn(handler(s, peer));
        }
    });
}

/// Copy everything back, then half-close.
async fn echo(s: TunnelStream) {
    let (mut r, mut w) = tokio::io::split(s);
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

/// Read to EOF; returns (sha256, length).
async fn hash_to_eof<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<([u8; 32], usize)> {
    let mut h = Sha256::new();
    let mut n = 0;
    let mut buf = vec![0u8; 128 * 1024];
    loop {
        let k = r.read(&mut buf).await?;
        if k == 0 {
            return Ok((h.finalize().into(), n));
        }
        h.update(&buf[..k]);
        n += k;
    }
}

async fn write_all_then_shutdown<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) -> io::Result<()> {
    for c in data.chunks(256 * 1024) {
        w.write_all(c).await?;
    }
    w.shutdown().await
}

/// Write `data` (then half-close) while hashing what comes back until EOF.
async fn exchange(s: TunnelStream, data: &[u8]) -> io::Result<([u8; 32], usize)> {
    let (mut r, mut w) = tokio::io::split(s);
    let (wr, rd) = tokio::join!(write_all_then_shutdown(&mut w, data), hash_to_eof(&mut r));
    wr?;
    rd
}

fn assert_loopback_client(peer: &PeerInfo) -> SocketAddr {
    let a: SocketAddr = peer.client.parse().unwrap_or_else(|_| panic!("client {:?} is not ip:port", peer.client));
    assert_eq!(a.ip().to_string(), "127.0.0.1", "{peer:?}");
    assert_ne!(a.port(), 0, "{peer:?}");
    a
}

// ---------------------------------------------------------------------------------------------
// an HTTP application behind a listener (hyper server on the accepted tunnel streams)
// ---------------------------------------------------------------------------------------------

type Body = BoxBody<Bytes, io::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// Chunks of `data` as a streamed body (no Content-Length: chunked on the wire).
fn streamed(data: Bytes, chunk: usize) -> Body {
    let frames = (0..data.len()).step_by(chunk).map(move |o| Ok::<_, io::Error>(Frame::data(data.slice(o..(o + chunk).min(data.len())))));
    BodyExt::boxed(StreamBody::new(futures_util::stream::iter(frames.collect::<Vec<_>>())))
}

fn query(req: &Request<Incoming>, k: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(k)?.strip_prefix('=')?.parse().ok())
}

/// Routes: `GET /download?len=N&seed=S` (streamed body, its hash in `x-body-sha256`),
/// `POST /upload` (answers the hash and length of the streamed request body), `GET /ws`
/// (WebSocket echo), `GET /hang` (never answers). Every answer reflects what the server saw in
/// `x-seen-*` headers.
async fn app(mut req: Request<Incoming>, peer: PeerInfo) -> Result<Response<Body>, Infallible> {
    let h = req.headers();
    let seen = |name: &str| h.get(name).map(|v| v.to_str().unwrap_or("<non-ascii>").to_string()).unwrap_or_else(|| "<absent>".into());
    let reflect = [
        ("x-seen-host", seen("host")),
        ("x-seen-xff", seen("x-forwarded-for")),
        ("x-seen-forwarded", seen("forwarded")),
        ("x-seen-forwarded-host", seen("x-forwarded-host")),
        ("x-seen-forwarded-proto", seen("x-forwarded-proto")),
        ("x-peer-client", peer.client.clone()),
        ("x-peer-via", format!("{:?}", peer.via)),
    ];
    let mut resp = match (req.method().as_str(), req.uri().path()) {
        ("GET", "/download") => {
            let len = query(&req, "len").unwrap_or(0) as usize;
            let data = Bytes::from(payload(len, query(&req, "seed").unwrap_or(0)));
            let mut r = Response::new(streamed(data.clone(), 64 * 1024));
            r.headers_mut().insert("x-body-sha256", HeaderValue::from_str(&hex::encode(sha256(&data))).expect("hex"));
            r
        }
        ("POST", "/upload") => {
            let mut body = req.into_body();
            let (mut h, mut n, mut frames) = (Sha256::new(), 0usize, 0usize);
            while let Some(f) = body.frame().await {
                let Ok(f) = f else {
                    return Ok(Response::builder().status(400).body(full("body failed")).expect("response"));
                };
                if let Ok(d) = f.into_data() {
                    frames += 1;
                    n += d.len();
                    h.update(&d);
                }
            }
            let d: [u8; 32] = h.finalize().into();
            Response::new(full(format!("{} {n} {frames}", hex::encode(d))))
        }
        ("GET", "/ws") => {
            let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
                return Ok(Response::builder().status(400).body(full("no key")).expect("response"));
            };
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(up) = on_upgrade.await else { return };
                let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(up),
                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                    None,
                )
                .await;
                while let Some(Ok(m)) = ws.next().await {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                    if matches!(m, Message::Text(_) | Message::Binary(_)) && ws.send(m).await.is_err() {
                        return;
                    }
                }
                let _ = ws.close(None).await;
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(header::CONNECTION, "Upgrade")
                .header(header::UPGRADE, "websocket")
                .header(header::SEC_WEBSOCKET_ACCEPT, tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes()))
                .body(full(Bytes::new()))
                .expect("response")
        }
        ("GET", "/hang") => std::future::pending().await,
        _ => Response::builder().status(404).body(full("no such route")).expect("response"),
    };
    for (k, v) in reflect {
        resp.headers_mut().insert(k, HeaderValue::from_str(&v).expect("header value"));
    }
    Ok(resp)
}

fn serve_http_app(listener: Arc<Listener>) {
    serve(listener, |stream, peer| async move {
        let svc = hyper::service::service_fn(move |req| app(req, peer.clone()));
        let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).with_upgrades().await;
    });
}

/// One request on a fresh connection to the relay's public HTTP port; returns the response and
/// the client's own address (what the relay should report as the client).
async fn http_request(relay_http: SocketAddr, req: Request<Body>) -> (Response<Incoming>, SocketAddr) {
    let tcp = within(STEP, "connecting to the public HTTP port", TcpStream::connect(relay_http)).await.expect("connect");
    let local = tcp.local_addr().expect("local addr");
    let (mut sender, conn) = within(STEP, "HTTP handshake", hyper::client::conn::http1::handshake(TokioIo::new(tcp))).await.expect("handshake");
    tokio::spawn(conn);
    let resp = within(STEP, "HTTP response head", sender.send_request(req)).await.expect("HTTP response");
    (resp, local)
}

fn get(host: &str, path: &str) -> Request<Body> {
    Request::get(path).header(header::HOST, host).body(full(Bytes::new())).expect("request")
}

async fn status_of(relay_http: SocketAddr, host: &str, path: &str) -> StatusCode {
    http_request(relay_http, get(host, path)).await.0.status()
}

fn hdr(r: &Response<Incoming>, k: &str) -> String {
    r.headers().get(k).map(|v| v.to_str().expect("ascii").to_string()).unwrap_or_else(|| panic!("no {k} header in {:?}", r.headers()))
}

async fn hash_body(mut body: Incoming) -> ([u8; 32], usize) {
    let mut h = Sha256::new();
    let mut n = 0;
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.expect("body frame").into_data() {
            n += d.len();
            h.update(&d);
        }
    }
    (h.finalize().into(), n)
}

// ---------------------------------------------------------------------------------------------
// public HTTP and WebSocket routed by Host
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn public_http_streams_10_mib_each_way_with_forwarding_headers() {
    init_tracing();
    let relay = start_relay(listener_relay_config()).await;
    let http = relay.http_addr().expect("http port");
    let listener = Arc::new(bind_listener(relay.url(), Identity::generate()).await);
    let name = listener.name();
    assert_eq!(listener.registration().http_url.as_deref(), Some(format!("http://{name}.localhost:{}", http.port()).as_str()));
    serve_http_app(listener.clone());
    let host = format!("{name}.localhost:{}", http.port());

    // Download: 10 MiB streamed from the service, hashed here.
    let (resp, local) = http_request(http, get(&host, &format!("/download?len={}&seed=21", 10 * MIB))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(hdr(&resp, "x-seen-host"), host, "the service sees the Host the client sent");
    assert_eq!(hdr(&resp, "x-seen-xff"), "127.0.0.1");
    let fwd = hdr(&resp, "x-seen-forwarded");
    assert!(fwd.contains("for=127.0.0.1") && fwd.contains(&format!("host={host}")) && fwd.contains("proto=http"), "Forwarded: {fwd}");
    assert_eq!(hdr(&resp, "x-seen-forwarded-host"), host);
    assert_eq!(hdr(&resp, "x-seen-forwarded-proto"), "http");
    assert_eq!(hdr(&resp, "x-peer-via"), "Http");
    assert_eq!(hdr(&resp, "x-peer-client"), local.to_string(), "PeerInfo.client is this HTTP client's address");
    let expect = sha256(&payload(10 * MIB, 21));
    assert_eq!(hdr(&resp, "x-body-sha256"), hex::encode(expect));
    let got = within(BULK, "downloading 10 MiB", hash_body(resp.into_body())).await;
    assert_eq!(got, (expect, 10 * MIB), "the downloaded body arrived intact");

    // An X-Forwarded-For chain from the client is extended, not replaced.
    let req = Request::get("/download?len=0")
        .header(header::HOST, &host)
        .header("x-forwarded-for", "203.0.113.7")
        .body(full(Bytes::new()))
        .expect("request");
    let (resp, _) = http_request(http, req).await;
    assert_eq!(hdr(&resp, "x-seen-xff"), "203.0.113.7, 127.0.0.1");

    // Upload: a 10 MiB request body streamed in 64 KiB chunks (chunked encoding), hashed there.
    let up = Bytes::from(payload(10 * MIB, 22));
    let req = Request::post("/upload").header(header::HOST, &host).body(streamed(up.clone(), 64 * 1024)).expect("request");
    let (resp, _) = http_request(http, req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = within(BULK, "uploading 10 MiB", resp.into_body().collect()).await.expect("body").to_bytes();
    let text = String::from_utf8(body.to_vec()).expect("utf8");
    let parts: Vec<&str> = text.split(' ').collect();
    assert_eq!(parts[0], hex::encode(sha256(&up)), "the service hashed the uploaded body: {text}");
    assert_eq!(parts[1], (10 * MIB).to_string());
    assert!(parts[2].parse::<usize>().expect("frame count") > 1, "the upload reached the service as a stream, not one buffer: {text}");

    // Keep-alive: several requests on one client connection all reach the listener.
    let tcp = TcpStream::connect(http).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(tcp)).await.expect("handshake");
    tokio::spawn(conn);
    for i in 0..3u64 {
        within(STEP, "the connection to be ready for another request", sender.ready()).await.expect("the relay keeps the connection alive");
        let resp =
            within(STEP, "keep-alive request", sender.send_request(get(&host, &format!("/download?len=1000&seed={i}")))).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(within(STEP, "small body", hash_body(resp.into_body())).await, (sha256(&payload(1000, i)), 1000));
    }
    listener.close();
    relay.abort();
}

async fn next_msg(ws: &mut tokio_tungstenite::WebSocketStream<TcpStream>) -> Message {
    loop {
        match within(STEP, "a WebSocket echo", ws.next()).await.expect("socket open").expect("message") {
            Message::Ping(_) | Message::Pong(_) => continue,
            m => return m,
        }
    }
}

/// A listener whose HTTP service answers its own name and the request count on that stream, and
/// closes its connection (`Connection: close`) on `/close`; counts the streams it accepted.
fn serve_named(listener: Arc<Listener>, streams: Arc<std::sync::atomic::AtomicUsize>) {
    let name = listener.name();
    serve(listener, move |stream, _| {
        streams.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = name.clone();
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let n = served.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                let mut resp = Response::new(full(format!("{name} #{n}")));
                if req.uri().path() == "/close" {
                    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keep_alive_requests_reuse_one_stream_per_listener() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    init_tracing();
    let relay = start_relay(listener_relay_config()).await;
    let http = relay.http_addr().expect("http port");
    let (a, b) = (Arc::new(bind_listener(relay.url(), Identity::generate()).await), Arc::new(bind_listener(relay.url(), Identity::generate()).await));
    let (a_streams, b_streams) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    serve_named(a.clone(), a_streams.clone());
    serve_named(b.clone(), b_streams.clone());
    let (an, bn) = (a.name(), b.name());

    // One client connection, many requests.
    let tcp = within(STEP, "connect", TcpStream::connect(http)).await.expect("connect");
    let (mut sender, conn) = within(STEP, "handshake", hyper::client::conn::http1::handshake(TokioIo::new(tcp))).await.expect("handshake");
    tokio::spawn(conn);
    let mut ask = async |host: String, path: &'static str| {
        within(STEP, "the client connection to be ready", sender.ready()).await.expect("ready");
        let resp = within(STEP, "response", sender.send_request(get(&format!("{host}.localhost"), path))).await.expect("response");
        assert_eq!(resp.status(), StatusCode::OK);
        String::from_utf8(within(STEP, "body", resp.into_body().collect()).await.expect("body").to_bytes().to_vec()).expect("utf8")
    };
    // Three requests to A share one stream (the count goes on), B gets its own, back to A opens a
    // new one, and a listener that closes its connection gets a fresh stream for the next request.
    assert_eq!(ask(an.clone(), "/").await, format!("{an} #1"));
    assert_eq!(ask(an.clone(), "/").await, format!("{an} #2"));
    assert_eq!(ask(an.clone(), "/").await, format!("{an} #3"));
    assert_eq!(ask(bn.clone(), "/").await, format!("{bn} #1"));
    assert_eq!(ask(an.clone(), "/close").await, format!("{an} #1"));
    assert_eq!(ask(an.clone(), "/").await, format!("{an} #1"));
    assert_eq!(a_streams.load(SeqCst), 3, "A: one stream for the first three requests, one after B, one after the close");
    assert_eq!(b_streams.load(SeqCst), 1);
    relay.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websocket_echo_through_the_public_http_port() {
    init_tracing();
    let relay = start_relay(listener_relay_config()).await;
    let http = relay.http_addr().expect("http port");
    let listener = Arc::new(bind_listener(relay.url(), Identity::generate()).await);
    let name = listener.name();
    serve_http_app(listener.clone());

    let tcp = TcpStream::connect(http).await.expect("connect");
    let req = format!("ws://{name}.localhost:{}/ws", http.port()).into_client_request().expect("request");
    let (mut ws, resp) = within(STEP, "WebSocket upgrade through the relay", tokio_tungstenite::client_async(req, tcp)).await.expect("upgrade");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(resp.headers().get("x-peer-via").map(|v| v.as_bytes()), Some(&b"Http"[..]));

    let text = "héllo wörld ✓ — text frame";
    ws.send(Message::text(text)).await.expect("send text");
    let big = payload(3 * MIB, 31);
    ws.send(Message::binary(big.clone())).await.expect("send binary");
    for i in 0..50u64 {
        ws.send(Message::binary(payload(1 + (i as usize * 977) % 70_000, 100 + i))).await.expect("send small binary");
    }
    match next_msg(&mut ws).await {
        Message::Text(t) => assert_eq!(t.as_str(), text),
        m => panic!("expected the text echo, got {m:?}"),
    }
    match next_msg(&mut ws).await {
        Message::Binary(b) => assert_eq!(sha256(&b), sha256(&big), "the 3 MiB binary message came back intact"),
        m => panic!("expected the binary echo, got {m:?}"),
    }
    for i in 0..50u64 {
        match next_msg(&mut ws).await {
            Message::Binary(b) => assert_eq!(&b[..], &payload(1 + (i as usize * 977) % 70_000, 100 + i)[..], "message {i}"),
            m => panic!("expected binary echo {i}, got {m:?}"),
        }
    }
    within(STEP, "closing the WebSocket", ws.close(None)).await.expect("close");
    listener.close();
    relay.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn public_http_errors_502_504_404() {
    init_tracing();
    let mut cfg = listener_relay_config();
    cfg.limits.http_timeout = Duration::from_secs(1);
    let relay = start_relay(cfg).await;
    let http = relay.http_addr().expect("http port");
    let port = http.port();

    // Unknown names (a chosen-looking one and a key-derived-looking one) → 502.
    assert_eq!(status_of(http, &format!("nosuch.localhost:{port}"), "/").await, StatusCode::BAD_GATEWAY);
    assert_eq!(status_of(http, &format!("{}.localhost", Identity::generate().name()), "/").await, StatusCode::BAD_GATEWAY);
    // A host outside the domain → 404.
    assert_eq!(status_of(http, "example.com", "/").await, StatusCode::NOT_FOUND);

    // A service that accepts the request but never answers → 504 after http_timeout.
    let answering = Arc::new(bind_listener(relay.url(), Identity::generate()).await);
    serve_http_app(answering.clone());
    // A listener that never calls accept(): the stream is queued, nobody reads it → 504 too.
    let idle = bind_listener(relay.url(), Identity::generate()).await;
    let t0 = Instant::now();
    let (hang_host, idle_host) = (format!("{}.localhost:{port}", answering.name()), format!("{}.localhost:{port}", idle.name()));
    let (hang, queued) = tokio::join!(status_of(http, &hang_host, "/hang"), status_of(http, &idle_host, "/"));
    let took = t0.elapsed();
    assert_eq!(hang, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(queued, StatusCode::GATEWAY_TIMEOUT);
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(5), "504 should come after the 1 s http_timeout, took {took:?}");

    // The same service still answers normal requests.
    let (resp, _) = http_request(http, get(&format!("{}.localhost:{port}", answering.name()), "/download?len=10")).await;
    assert_eq!(resp.status(), StatusCode::OK);

    // Once a listener is gone, its name answers 502 again.
    let gone = answering.name();
    answering.close();
    eventually_within(Duration::from_secs(5), "a closed listener's name to answer 502", || async {
        holds(status_of(http, &format!("{gone}.localhost:{port}"), "/").await, |s| *s == StatusCode::BAD_GATEWAY)
    })
    .await;
    relay.abort();
}

// ---------------------------------------------------------------------------------------------
// dial by name
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dial_by_name_64_mib_both_ways_and_half_close() {
    init_tracing();
    let relay = start_relay(listener_relay_config()).await;
    let listener = Arc::new(bind_listener(relay.url(), Identity::generate()).await);
    let name = listener.name();
    let from_listener = Arc::new(payload(64 * MIB, 42));
    let tail = Arc::new(payload(MIB, 43));
    let (report_tx, mut report) = mpsc::unbounded_channel::<(PeerInfo, io::Result<([u8; 32], usize)>)>();
    {
        let (from_listener, tail) = (from_listener.clone(), tail.clone());
        serve(listener.clone(), move |s, peer| {
            let (from_listener, tail, report_tx) = (from_listener.clone(), tail.clone(), report_tx.clone());
            async move {
                match peer.port {
                    // Bulk: read (hashing) and write 64 MiB at the same time.
                    1 => {
                        let (mut r, mut w) = tokio::io::split(s);
                        let (wr, rd) = tokio::join!(write_all_then_shutdown(&mut w, &from_listener), hash_to_eof(&mut r));
                        let _ = report_tx.send((peer, wr.and(rd)));
                    }
                    // Half-close: read to EOF, then answer with the hash and a tail.
                    2 => {
                        let (mut r, mut w) = tokio::io::split(s);
                        let got = hash_to_eof(&mut r).await;
                        if let Ok((d, _)) = &got {
                            let _ = w.write_all(d).await;
                            let _ = write_all_then_shutdown(&mut w, &tail).await;
                        }
                        let _ = report_tx.send((peer, got));
                    }
                    _ => {
                        let _ = report_tx.send((peer.clone(), Ok(([0; 32], 0))));
                        echo(s).await;
                    }
                }
            }
        });
    }
    let d = dialer(&relay);

    // 64 MiB each way, concurrently.
    let to_listener = payload(64 * MIB, 41);
    let s = within(STEP, "dialing the listener by name", d.dial(&format!("{name}:1"))).await.expect("dial by name");
    let t0 = Instant::now();
    let got = within(BULK, "64 MiB both ways", exchange(s, &to_listener)).await.expect("exchange");
    let took = t0.elapsed();
    assert_eq!(got, (sha256(&from_listener), 64 * MIB), "the dialer received the listener's 64 MiB intact");
    let (peer, there) = within(STEP, "the listener's report", report.recv()).await.expect("report");
    assert_eq!(there.expect("listener side"), (sha256(&to_listener), 64 * MIB), "the listener received the dialer's 64 MiB intact");
    assert_eq!((peer.via, peer.port), (Via::Dial, 1));
    assert_loopback_client(&peer);
    eprintln!("64 MiB each way through the relay by name: {took:?}");

    // Half-close: the listener reads EOF and still replies on the same stream.
    let data = payload(3 * MIB, 44);
    let s = within(STEP, "dial", d.dial(&format!("{name}:2"))).await.expect("dial");
    let (mut r, mut w) = tokio::io::split(s);
    within(STEP, "write then shutdown", write_all_then_shutdown(&mut w, &data)).await.expect("write");
    let mut digest = [0u8; 32];
    within(STEP, "the reply after EOF", r.read_exact(&mut digest)).await.expect("hash reply");
    assert_eq!(digest, sha256(&data), "the listener saw exactly our bytes, then EOF");
    assert_eq!(
        within(STEP, "the tail and EOF", hash_to_eof(&mut r)).await.expect("tail"),
        (sha256(&tail), MIB),
        "writes after our shutdown arrive, then EOF"
    );
    let (peer, _) = within(STEP, "report", report.recv()).await.expect("report");
    assert_eq!((peer.via, peer.port), (Via::Dial, 2));

    // Port label 0 (the default) is passed through as 0.
    let s = within(STEP, "dial", d.dial(&format!("{name}:0"))).await.expect("dial");
    let echoed = within(STEP, "small echo", exchange(s, b"ping")).await.expect("echo");
    assert_eq!(echoed, (sha256(b"ping"), 4));
    let (peer, _) = within(STEP, "report", report.recv()).await.expect("report");
    assert_eq!((peer.via, peer.port), (Via::Dial, 0));

    // An offline key-derived name is unreachable, not "not allowed".
    let offline = Identity::generate().name();
    let e = within(STEP, "dial offline", d.dial(&format!("{offline}:0"))).await.expect_err("offline name");
    assert_eq!(e.code(), ErrorCode::Unreachable, "{e}");
    listener.close();
    relay.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_concurrent_streams_to_one_listener() {
    init_tracing();
    let relay = start_relay(listener_relay_config()).await;
    let listener = within(STEP, "bind", Listener::builder(relay.url(), Identity::generate()).backlog(2048).bind()).await.expect("bind");
    let listener = Arc::new(listener);
    let name = listener.name();
    serve(listener.clone(), |s, _| echo(s));
    let d = dialer(&relay);
    d.connect().await.expect("session");
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..1000u64 {
        let (d, name) = (d.clone(), name.clone());
        set.spawn(async move {
            let data = payload(16 * 1024 + (i as usize * 37) % 16_384, 1000 + i);
            let s = d.dial(&format!("{name}:7")).await.map_err(|e| format!("dial {i}: {e}"))?;
            let got = exchange(s, &data).await.map_err(|e| format!("stream {i}: {e}"))?;
            if got != (sha256(&data), data.len()) {
                return Err(format!("stream {i}: echo differs ({} of {} bytes)", got.1, data.len()));
            }
            Ok::<_, String>(())
        });
    }
    let results = within(BULK, "1000 concurrent streams", async {
        let mut v = Vec::new();
        while let Some(r) = set.join_next().await {
            v.push(r.expect("task"));
        }
        v
    })
    .await;
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failures.is_empty(), "{} of 1000 streams failed, e.g. {:?}", failures.len(), &failures[..failures.len().min(5)]);
    eprintln!("1000 concurrent hashed streams: {:?}", t0.elapsed());
    listener.close();
    relay.abort();
}

// ---------------------------------------------------------------------------------------------
// backpressure
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_backlog_refuses_fast_with_refused_and_503() {
    init_tracing();
    let relay = start_relay(listener_relay_config()).await;
    let http = relay.http_addr().expect("http port");
    let listener = within(STEP, "bind", Listener::builder(relay.url(), Identity::generate()).backlog(2).bind()).await.expect("bind");
    let name = listener.name();
    let d = dialer(&relay);
    // Two streams fill the queue (nobody calls accept()).
    let _a = within(STEP, "first dial", d.dial(&format!("{name}:0"))).await.expect("queued");
    let _b = within(STEP, "second dial", d.dial(&format!("{name}:0"))).await.expect("queued");
    for _ in 0..3 {
        let t0 = Instant::now();
        let e = within(STEP, "dial to a full listener", d.dial(&format!("{name}:0"))).await.expect_err("refused");
        assert_eq!(e.code(), ErrorCode::Refused, "{e}");
        assert!(t0.elapsed() < Duration::from_secs(2), "refusal took {:?}", t0.elapsed());
    }
    let t0 = Instant::now();
    assert_eq!(status_of(http, &format!("{name}.localhost"), "/").await, StatusCode::SERVICE_UNAVAILABLE);
    assert!(t0.elapsed() < Duration::from_secs(2), "503 took {:?}", t0.elapsed());

    // Taking one stream frees one place.
    let (mut first, peer) = within(STEP, "accept", listener.accept()).await.expect("accept");
    assert_eq!(peer.via, Via::Dial);
    let mut c = within(STEP, "dial after accept", d.dial(&format!("{name}:0"))).await.expect("room again");
    // The accepted stream and the new one both work.
    first.write_all(b"hi").await.expect("write");
    let mut a = _a;
    let mut buf = [0u8; 2];
    within(STEP, "read", a.read_exact(&mut buf)).await.expect("read");
    assert_eq!(&buf, b"hi");
    c.write_all(b"x").await.expect("write on the newly queued stream");
    listener.close();
    relay.abort();
}

// ---------------------------------------------------------------------------------------------
// public TCP port
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn public_tcp_port_round_trip() {
    init_tracing();
    let free = TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr").port();
    let mut cfg = listener_relay_config();
    cfg.tcp_ports = Some((free, free.saturating_add(50)));
    let relay = start_relay(cfg).await;
    let listener = Arc::new(
        within(STEP, "bind", Listener::builder(relay.url(), Identity::generate()).tcp_port(true).bind()).await.expect("bind with a TCP port"),
    );
    let tcp_addr: SocketAddr = listener.registration().tcp_addr.expect("a public TCP address").parse().expect("ip:port");
    assert!((free..=free.saturating_add(50)).contains(&tcp_addr.port()), "{tcp_addr} outside the range");
    let (peers_tx, mut peers) = mpsc::unbounded_channel();
    serve(listener.clone(), move |s, peer| {
        let _ = peers_tx.send(peer);
        echo(s)
    });

    let sock = within(STEP, "connect to the public port", TcpStream::connect(tcp_addr)).await.expect("connect");
    let local = sock.local_addr().expect("local");
    let data = payload(8 * MIB, 51);
    let (mut r, mut w) = sock.into_split();
    let (wr, rd) = within(BULK, "8 MiB through the public TCP port", async {
        tokio::join!(async { write_all_then_shutdown(&mut w, &data).await }, hash_to_eof(&mut r))
    })
    .await;
    wr.expect("write");
    assert_eq!(rd.expect("read"), (sha256(&data), data.len()));
    let peer = within(STEP, "peer info", peers.recv()).await.expect("peer");
    assert_eq!(peer.via, Via::Tcp);
    assert_eq!(peer.client, local.to_string(), "PeerInfo.client is the TCP client's address");
    assert_eq!(peer.port, tcp_addr.port());

    // Asking for a TCP port on a relay without a range is refused.
    let plain = start_relay(listener_relay_config()).await;
    let e = within(STEP, "bind", Listener::builder(plain.url(), Identity::generate()).tcp_port(true).bind()).await.expect_err("no range");
    assert_eq!(e.code(), ErrorCode::NotAllowed, "{e}");
    listener.close();
    relay.abort();
    plain.abort();
}

// ---------------------------------------------------------------------------------------------
// registration rules
// ---------------------------------------------------------------------------------------------

async fn bind_err(relay_url: &str, id: &Identity, name: Option<&str>) -> libtunnel::Error {
    let mut b = Listener::builder(relay_url, id.clone());
    if let Some(n) = name {
        b = b.name(n);
    }
    within(STEP, "a refused registration", b.bind()).await.expect_err("registration must be refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn registration_rules_name_taken_not_allowed_auth_failed() {
    init_tracing();
    let (a, b, c) = (Identity::generate(), Identity::generate(), Identity::generate());
    let mut cfg = listener_relay_config();
    cfg.listeners_open = false;
    cfg.listener_keys = vec![
        ListenerGrant { public_key: a.public_key_base64(), names: vec!["api".into(), "shared".into()] },
        ListenerGrant { public_key: b.public_key_base64(), names: vec!["shared".into()] },
    ];
    let relay = start_relay(cfg).await;
    let http = relay.http_addr().expect("http");
    let url = relay.url().to_string();

    let api = within(STEP, "bind api", Listener::builder(&url, a.clone()).name("api").bind()).await.expect("a granted name");
    assert_eq!(api.name(), "api");
    assert_eq!(api.registration().http_url, Some(format!("http://api.localhost:{}", http.port())));
    let own = within(STEP, "bind derived", Listener::bind(&url, b.clone())).await.expect("a listed key's own name");
    assert_eq!(own.name(), b.name());

    // Another key asking for a name granted to A.
    assert_eq!(bind_err(&url, &b, Some("api")).await.code(), ErrorCode::NameTaken);
    assert_eq!(bind_err(&url, &c, Some("api")).await.code(), ErrorCode::NameTaken);
    // Another key asking for A's key-derived name.
    assert_eq!(bind_err(&url, &b, Some(&a.name())).await.code(), ErrorCode::NameTaken);
    // A name granted to both: first come holds it while its session lives.
    let shared = within(STEP, "bind shared", Listener::builder(&url, a.clone()).name("shared").bind()).await.expect("granted");
    let e = bind_err(&url, &b, Some("shared")).await;
    assert_eq!(e.code(), ErrorCode::NameTaken, "{e}");
    // An unlisted key (listeners_open = false), and a name nobody granted.
    let e = bind_err(&url, &c, None).await;
    assert_eq!(e.code(), ErrorCode::NotAllowed, "{e}");
    assert_eq!(bind_err(&url, &b, Some("other")).await.code(), ErrorCode::NotAllowed);
    // Not a DNS label: refused before connecting.
    assert_eq!(bind_err(&url, &a, Some("Not_Valid")).await.code(), ErrorCode::InvalidArgument);

    // Signatures: tampered, over another name, by another key, over another nonce.
    let (_ws, ack) = raw_register(&url, |n| {
        let mut h = hello(&a, n, "api2");
        h.name = "api".into();
        h
    })
    .await;
    assert_eq!(ack.expect_err("signature over another name").code(), ErrorCode::AuthFailed);
    let (_ws, ack) = raw_register(&url, |n| {
        let mut h = hello(&a, n, &a.name());
        h.signature[10] ^= 0x40;
        h
    })
    .await;
    assert_eq!(ack.expect_err("tampered signature").code(), ErrorCode::AuthFailed);
    let (_ws, ack) = raw_register(&url, |n| {
        let mut h = hello(&c, n, &a.name());
        h.public_key = a.public_key().to_vec();
        h
    })
    .await;
    assert_eq!(ack.expect_err("signed by another key").code(), ErrorCode::AuthFailed);
    let (_ws, ack) = raw_register(&url, |_| hello(&a, &[9u8; 32], &a.name())).await;
    assert_eq!(ack.expect_err("signed over another nonce").code(), ErrorCode::AuthFailed);
    // The untampered hello works on the same path (so the refusals above are about the signature).
    let (_ws, ack) = raw_register(&url, |n| hello(&a, n, &a.name())).await;
    assert_eq!(ack.expect("a valid hello registers").name, a.name());

    // Released when the holder goes: B may take "shared" then.
    shared.close();
    let taken = eventually_within(Duration::from_secs(5), "B to take the released name", || async {
        match Listener::builder(&url, b.clone()).name("shared").bind().await {
            Ok(l) => Ok(l),
            Err(e) if e.code() == ErrorCode::NameTaken => Err(e),
            Err(e) => panic!("B could not take the released name: {e}"),
        }
    })
    .await;
    assert_eq!(taken.name(), "shared");
    drop((api, own, taken));
    relay.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_listener_whose_name_was_taken_while_it_was_away_stops() {
    init_tracing();
    let (a, b) = (Identity::generate(), Identity::generate());
    let mut cfg = listener_relay_config();
    cfg.listeners_open = false;
    cfg.listener_keys = vec![
        ListenerGrant { public_key: a.public_key_base64(), names: vec!["shared".into()] },
        ListenerGrant { public_key: b.public_key_base64(), names: vec!["shared".into()] },
    ];
    let relay = start_relay(cfg.clone()).await;
    let addr = relay.local_addr().expect("addr");
    let url = relay.url().to_string();
    let first = within(STEP, "bind a", Listener::builder(&url, a).name("shared").bind()).await.expect("a registers");
    let mut events = first.events();
    // The relay restarts; before `first` is back, another key granted the name takes it: the
    // relay comes back while `first` waits out a retry of 300 ms or more.
    relay.abort();
    within(STEP, "a long retry wait", async {
        while let Some(ev) = events.next().await {
            if matches!(ev, libtunnel::client::events::Event::Reconnecting { delay, .. } if delay >= Duration::from_millis(300)) {
                return;
            }
        }
        panic!("the listener's events ended before a long retry");
    })
    .await;
    cfg.listen = Some(addr);
    let relay = start_relay(cfg).await;
    let second = within(STEP, "bind b", Listener::builder(&url, b).name("shared").bind()).await.expect("b takes the free name");
    // `first` comes back to a taken name: it stops with NAME_TAKEN instead of retrying forever.
    let e = within(STEP, "the first listener stops", first.accept()).await.expect_err("it must stop");
    assert_eq!(e.code(), ErrorCode::NameTaken, "{e}");
    assert!(!first.is_connected());
    assert!(second.is_connected());
    second.close();
    relay.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replaced_listener_that_missed_the_notice_cannot_take_its_name_back() {
    init_tracing();
    let relay = start_relay(listener_relay_config()).await;
    let id = Identity::generate();
    let old = |n: &[u8]| ListenHello { instance: vec![7; 16], ..hello(&id, n, &id.name()) };
    // The old process: registered, then replaced by a newer one of the same key.
    let (_first, ack) = raw_register(relay.url(), old).await;
    assert_eq!(ack.expect("registered").name, id.name());
    let newer = Arc::new(bind_listener(relay.url(), id.clone()).await);
    serve(newer.clone(), |s, _| echo(s));
    // The old one reconnects as if the notice had never reached it (same instance): refused.
    let (_again, ack) = raw_register(relay.url(), old).await;
    let e = ack.expect_err("a replaced instance may not come back");
    assert_eq!(e.code(), ErrorCode::NameTaken, "{e}");
    assert!(e.message().contains("replaced") && e.message().contains("newer registration"), "{e}");
    // The newer listener keeps the name.
    assert!(newer.is_connected());
    let d = dialer(&relay);
    let s = within(STEP, "dial", d.dial(&format!("{}:0", id.name()))).await.expect("dial the newer listener");
    assert_eq!(within(STEP, "echo", exchange(s, b"newer")).await.expect("echo"), (sha256(b"newer"), 5));
    // A listener reconnecting by itself is not replaced by its own registration: the relay
    // drops its session (a restart of the relay would too) and it re-registers.
    let (_own, ack) = raw_register(relay.url(), |n| ListenHello { instance: vec![8; 16], ..hello(&id, n, &id.name()) }).await;
    assert!(ack.is_ok(), "a new instance replaces the holder, as today");
    let (_own_again, ack) = raw_register(relay.url(), |n| ListenHello { instance: vec![8; 16], ..hello(&id, n, &id.name()) }).await;
    assert!(ack.is_ok(), "the same instance registering again (a reconnect) is not refused: {ack:?}");
    newer.close();
    relay.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_key_replaces_its_stale_session() {
    init_tracing();
    let relay = start_relay(listener_relay_config()).await;
    let id = Identity::generate();
    // A stale registration that will never serve anything.
    let (mut stale, ack) = raw_register(relay.url(), |n| hello(&id, n, &id.name())).await;
    assert_eq!(ack.expect("registered").name, id.name());

    let listener = Arc::new(bind_listener(relay.url(), id.clone()).await);
    assert_eq!(listener.name(), id.name());
    // The relay closes the stale session.
    let ended = within(Duration::from_secs(5), "the stale session to be closed", async {
        loop {
            match stale.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    let () = ended;
    // The name reaches the new listener.
    serve(listener.clone(), |s, _| echo(s));
    let d = dialer(&relay);
    let s = within(STEP, "dial", d.dial(&format!("{}:0", id.name()))).await.expect("dial the new session");
    assert_eq!(within(STEP, "echo", exchange(s, b"fresh")).await.expect("echo"), (sha256(b"fresh"), 5));
    listener.close();

    // Two real listeners with one key: the second bind succeeds and closes the first one's
    // session, so a stream the first one holds fails.
    let other = Identity::generate();
    let first = bind_listener(relay.url(), other.clone()).await;
    let mut held_dialer_side = within(STEP, "dial", d.dial(&format!("{}:0", other.name()))).await.expect("dial the first");
    let (mut held, _) = within(STEP, "accept", first.accept()).await.expect("accept on the first");
    let second = bind_listener(relay.url(), other.clone()).await;
    assert_eq!(second.name(), other.name());
    let mut buf = [0u8; 16];
    let r = within(STEP, "the first listener's stream to fail", held.read(&mut buf)).await;
    assert!(r.is_err(), "the replaced session's stream must fail, got {r:?}");
    let r = within(STEP, "the dialer's stream to fail", held_dialer_side.read(&mut buf)).await;
    assert!(r.is_err(), "the dialer's stream to the replaced session must fail, got {r:?}");
    // The relay told the first listener why: it stops (accept fails with NAME_TAKEN) instead of
    // reconnecting and taking the name back in a loop.
    let err = within(STEP, "the first listener to stop", first.accept()).await.expect_err("the replaced listener must stop");
    assert_eq!(err.code(), ErrorCode::NameTaken, "{err}");
    assert!(err.message().contains("registered again by the same key"), "{err}");
    assert!(!first.is_connected());
    // The second keeps the name: a few of the first one's backoff periods later it still serves.
    let second = Arc::new(second);
    serve(second.clone(), |s, _| echo(s));
    for i in 0..5u8 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(second.is_connected(), "the second listener lost its session (round {i})");
        let s = within(STEP, "dial", d.dial(&format!("{}:0", other.name()))).await.expect("dial the second");
        assert_eq!(within(STEP, "echo", exchange(s, &[i; 3])).await.expect("echo"), (sha256(&[i; 3]), 3));
    }
    relay.abort();
}

// ---------------------------------------------------------------------------------------------
// relay restarts
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_killed_mid_transfer_listener_returns_on_the_same_port() {
    init_tracing();
    let relay = start_relay(listener_relay_config()).await;
    let ws_addr = relay.local_addr().expect("ws addr");
    let http_addr = relay.http_addr().expect("http addr");
    let listener = Arc::new(bind_listener(relay.url(), Identity::generate()).await);
    let name = listener.name();
    let d = dialer(&relay);

    let s = within(STEP, "dial", d.dial(&format!("{name}:0"))).await.expect("dial");
    let (mut there, _) = within(STEP, "accept", listener.accept()).await.expect("accept");
    // Listener side: read until something ends the stream; report how.
    let (progress_tx, mut progress) = tokio::sync::watch::channel(0usize);
    let listener_side = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0usize;
        loop {
            match there.read(&mut buf).await {
                Ok(0) => return Ok(total),
                Ok(n) => {
                    total += n;
                    let _ = progress_tx.send(total);
                }
                Err(e) => return Err(e),
            }
        }
    });
    // Dialer side: write without end, and read (the listener never writes).
    let (mut r, mut w) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        let chunk = payload(64 * 1024, 61);
        loop {
            w.write_all(&chunk).await?;
        }
        #[allow(unreachable_code)]
        Ok::<(), io::Error>(())
    });
    let reader = tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        r.read(&mut buf).await
    });
    within(STEP, "data flowing", progress.wait_for(|n| *n >= 2 * MIB)).await.expect("progress");

    relay.abort();
    let t0 = Instant::now();
    let w_err = within(Duration::from_secs(5), "the dialer's write to fail", writer).await.expect("task");
    assert!(w_err.is_err(), "the dialer's writes fail once the relay is gone");
    let r_res = within(Duration::from_secs(5), "the dialer's read to fail", reader).await.expect("task");
    assert!(r_res.is_err(), "the dialer's read must fail, not end cleanly: {r_res:?}");
    let l_res = within(Duration::from_secs(5), "the listener's read to fail", listener_side).await.expect("task");
    assert!(l_res.is_err(), "the listener's read must fail, not end cleanly: {l_res:?}");

    // A new relay on the same ports.
    let mut cfg = listener_relay_config();
    cfg.listen = Some(ws_addr);
    cfg.http_listen = Some(http_addr);
    let server = eventually_within(Duration::from_secs(5), "re-binding the relay's ports", || Server::bind(cfg.clone())).await;
    let relay2 = server.spawn();
    assert_eq!(relay2.url(), relay.url());
    // The listener is back under the same name within 5 s of the crash.
    eventually_within(Duration::from_secs(5).saturating_sub(t0.elapsed()), "the listener to come back under its name", || async {
        holds((listener.is_connected(), listener.name()), |(up, n)| *up && *n == name)
    })
    .await;
    serve_http_app(listener.clone());
    let by_name = format!("{name}:0");
    let s = eventually_within(Duration::from_secs(5).saturating_sub(t0.elapsed()), "a dial by name after the restart", || d.dial(&by_name)).await;
    eprintln!("listener reachable again {:?} after the relay was killed", t0.elapsed());
    // New requests succeed: raw HTTP over the dialed stream, and through the public HTTP port.
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(s)).await.expect("handshake");
    tokio::spawn(conn);
    let resp = within(STEP, "request over a dialed stream", sender.send_request(get(&name, "/download?len=100000&seed=62"))).await.expect("response");
    assert_eq!(hdr(&resp, "x-peer-via"), "Dial");
    assert_eq!(within(STEP, "body", hash_body(resp.into_body())).await, (sha256(&payload(100_000, 62)), 100_000));
    let (resp, _) = http_request(http_addr, get(&format!("{name}.localhost"), "/download?len=1000&seed=63")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(within(STEP, "body", hash_body(resp.into_body())).await, (sha256(&payload(1000, 63)), 1000));
    listener.close();
    relay2.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bound_listener_is_reachable_at_once() {
    init_tracing();
    let chosen = Identity::generate();
    let mut cfg = listener_relay_config();
    cfg.listener_keys = vec![ListenerGrant { public_key: chosen.public_key_base64(), names: vec!["quick".into()] }];
    let relay = start_relay(cfg).await;
    let http = relay.http_addr().expect("http");
    let d = dialer(&relay);
    d.connect().await.expect("session");
    for i in 0..100 {
        let listener = Arc::new(bind_listener(relay.url(), Identity::generate()).await);
        let name = listener.name();
        serve(listener.clone(), |s, _| echo(s));
        // No wait between bind() returning and the first dial: the name must already route.
        let s = within(STEP, "dial right after bind", d.dial(&format!("{name}:0"))).await.unwrap_or_else(|e| panic!("round {i}: {e}"));
        assert_eq!(within(STEP, "echo", exchange(s, b"now")).await.expect("echo"), (sha256(b"now"), 3));
        listener.close();
        let other = Arc::new(bind_listener(relay.url(), Identity::generate()).await);
        serve_http_app(other.clone());
        assert_eq!(status_of(http, &format!("{}.localhost", other.name()), "/download?len=1").await, StatusCode::OK, "round {i}");
        other.close();
        // A chosen name (routed only because it is registered), re-registered by the same key.
        let named = Arc::new(
            within(STEP, "bind a chosen name", Listener::builder(relay.url(), chosen.clone()).name("quick").bind()).await.expect("granted name"),
        );
        serve(named.clone(), |s, _| echo(s));
        let s = within(STEP, "dial a chosen name", d.dial("quick:0")).await.unwrap_or_else(|e| panic!("round {i}: {e}"));
        assert_eq!(within(STEP, "echo", exchange(s, b"named")).await.expect("echo"), (sha256(b"named"), 5));
        named.close();
    }
    relay.abort();
}

/// When one end's session dies mid-stream, the other end's stream fails; it must not look like a
/// clean EOF (a cut-off transfer taken for a complete one).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_session_fails_the_stream_at_the_other_end() {
    init_tracing();
    let relay = start_relay(listener_relay_config()).await;

    // The dialer goes away: the listener's read fails.
    let listener = Arc::new(bind_listener(relay.url(), Identity::generate()).await);
    let d = dialer(&relay);
    let mut s = within(STEP, "dial", d.dial(&format!("{}:0", listener.name()))).await.expect("dial");
    let (mut there, _) = within(STEP, "accept", listener.accept()).await.expect("accept");
    let mut got = vec![0u8; MIB];
    let data = payload(MIB, 71);
    let (w, r) = within(STEP, "the first MiB", async { tokio::join!(s.write_all(&data), there.read_exact(&mut got)) }).await;
    w.expect("write");
    r.expect("read");
    d.close().await;
    let r = within(STEP, "the listener's read to end", there.read(&mut got)).await;
    assert!(r.is_err(), "the listener's read must fail when the dialer's session dies, got {r:?}");

    // The listener goes away: the dialer's read fails.
    let d = dialer(&relay);
    let mut s = within(STEP, "dial", d.dial(&format!("{}:0", listener.name()))).await.expect("dial");
    let (mut there, _) = within(STEP, "accept", listener.accept()).await.expect("accept");
    let data = payload(MIB, 72);
    let (w, r) = within(STEP, "the first MiB", async { tokio::join!(there.write_all(&data), s.read_exact(&mut got)) }).await;
    w.expect("write");
    r.expect("read");
    listener.close();
    let r = within(STEP, "the dialer's read to end", s.read(&mut got)).await;
    assert!(r.is_err(), "the dialer's read must fail when the listener's session dies, got {r:?}");

    // The same through a classic-mode (Emissary) dialer: the cut-off is an error, not a clean end.
    let listener = bind_listener(relay.url(), Identity::generate()).await;
    let d = Dialer::builder(relay.url()).key(key()).mode(libtunnel::Mode::Classic).timeout(STEP).build().expect("dialer");
    let mut s = within(STEP, "classic dial", d.dial(&format!("{}:0", listener.name()))).await.expect("dial");
    let (mut there, _) = within(STEP, "accept", listener.accept()).await.expect("accept");
    let (w, r) = within(STEP, "the first MiB", async { tokio::join!(there.write_all(&data), s.read_exact(&mut got)) }).await;
    w.expect("write");
    r.expect("read");
    listener.close();
    let r = within(STEP, "the classic dialer's read to end", s.read(&mut got)).await;
    assert!(r.is_err(), "a classic dialer's read must fail when the listener's session dies, got {r:?}");
    relay.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_listener_resets_its_public_tcp_connections() {
    init_tracing();
    let free = TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr").port();
    let mut cfg = listener_relay_config();
    cfg.tcp_ports = Some((free, free.saturating_add(50)));
    let relay = start_relay(cfg).await;
    let listener = within(STEP, "bind", Listener::builder(relay.url(), Identity::generate()).tcp_port(true).bind()).await.expect("bind");
    let tcp_addr: SocketAddr = listener.registration().tcp_addr.expect("a public TCP address").parse().expect("ip:port");
    let mut sock = within(STEP, "connect to the public port", TcpStream::connect(tcp_addr)).await.expect("connect");
    let (mut there, _) = within(STEP, "accept", listener.accept()).await.expect("accept");
    let data = payload(MIB, 73);
    let mut got = vec![0u8; MIB];
    let (w, r) = within(STEP, "the first MiB", async { tokio::join!(there.write_all(&data), sock.read_exact(&mut got)) }).await;
    w.expect("write");
    r.expect("read");
    listener.close();
    let r = within(STEP, "the public client's read to end", sock.read(&mut got)).await;
    match r {
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "expected a reset, got {e}"),
        Ok(n) => panic!("a public TCP client must see a reset when the listener dies, not {n} bytes / a clean EOF"),
    }
    relay.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_waiting_on_a_silent_listener_are_bounded() {
    init_tracing();
    let mut cfg = listener_relay_config();
    cfg.limits.max_pending_accepts = 2;
    cfg.limits.connect_timeout = Duration::from_secs(3);
    let relay = start_relay(cfg).await;
    // A registered session that never answers the streams offered to it.
    let id = Identity::generate();
    let (mut silent, ack) = raw_register(relay.url(), |n| hello(&id, n, &id.name())).await;
    ack.expect("registered");
    let d = dialer(&relay);
    let target = format!("{}:0", id.name());
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn({
                let (d, t) = (d.clone(), target.clone());
                async move { d.dial(&t).await.map(|_| ()) }
            })
        })
        .collect();
    // Once both wait, a third is refused at once instead of queueing.
    within(STEP, "two streams to be offered to the silent listener", async {
        let mut opened = std::collections::HashSet::new();
        while opened.len() < 2 {
            let b = next_binary(&mut silent).await.expect("the relay offers streams");
            let f = libtunnel::protocol::Frame::decode(b).expect("a frame");
            if f.kind == libtunnel::protocol::FrameKind::Open {
                opened.insert(f.stream);
            }
        }
    })
    .await;
    let started = Instant::now();
    let e = within(STEP, "the third dial", d.dial(&target)).await.expect_err("over max_pending_accepts");
    assert!(started.elapsed() < Duration::from_secs(1), "refused after {:?}, not at once", started.elapsed());
    assert_eq!(e.code(), ErrorCode::Refused, "{e}");
    for w in waiting {
        let r = within(STEP, "a waiting dial", w).await.expect("task");
        assert!(r.is_err(), "a stream the listener never accepted must fail");
    }
    relay.abort();
}

// ---------------------------------------------------------------------------------------------
// a relay for listeners only
// ---------------------------------------------------------------------------------------------

/// An ngrok-style relay: public HTTP and open registration, with no shared key and no allowlist.
/// It starts, serves a listener's requests, and refuses dialers with a message naming the key.
#[tokio::test]
async fn a_listeners_only_relay_needs_no_keys_and_no_allowlist() {
    init_tracing();
    let mut cfg = RelayConfig::new(KeySet::default(), Allowlist::default());
    cfg.http_listen = Some("127.0.0.1:0".parse().expect("addr"));
    cfg.listeners_open = true;
    let relay = start_relay(cfg).await;
    let http = relay.http_addr().expect("http port");
    let listener = Arc::new(bind_listener(relay.url(), Identity::generate()).await);
    serve_http_app(listener.clone());
    let (resp, _) = http_request(http, get(&format!("{}.localhost:{}", listener.name(), http.port()), "/download?len=1000")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let err = within(STEP, "a dialer against a relay without keys", dialer(&relay).connect()).await.expect_err("no key is configured");
    assert_eq!(err.code(), ErrorCode::AuthUnknownKey, "{err}");
    assert!(err.message().contains("serves listeners only") && err.message().contains("TUNNEL_AUTH_KEYS"), "{err}");
    // Nobody to serve at all is still a clear startup error.
    let e = Server::bind(RelayConfig::new(KeySet::default(), Allowlist::default())).await.expect_err("serves nobody");
    assert!(e.message().contains("no auth keys") && e.message().contains("TUNNEL_LISTENER_KEYS"), "{e}");
}

/// Dial by name to a name nobody holds, or to a key-derived name whose listener is offline: the
/// error says no listener of that name is online (not an allowlist refusal).
#[tokio::test]
async fn dialing_an_unknown_or_offline_name_says_no_listener_is_online() {
    init_tracing();
    let relay = start_relay(listener_relay_config()).await;
    let d = dialer(&relay);
    let offline = Identity::generate().name();
    for name in ["nosuch", offline.as_str()] {
        let Err(e) = within(STEP, "a dial to an absent name", d.dial(&format!("{name}:0"))).await else {
            panic!("{name}: nobody holds the name, yet the dial succeeded");
        };
        assert_eq!(e.code(), ErrorCode::Unreachable, "{name}: {e}");
        assert!(e.message().contains(&format!("no listener named {name} is online")), "{name}: {e}");
        assert!(!e.message().contains("TUNNEL_ALLOW"), "{name}: {e}");
    }
}
