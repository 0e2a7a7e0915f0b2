//! The relay's front door under floods, measured on a separate `tunnel server` process so that
//! `/proc/PID/status` (VmRSS) counts only the relay: what an unauthenticated connection costs
//! (idle TCP, a slowloris request head, an upgraded WebSocket that never authenticates), that
//! the memory of 2,000 such WebSockets comes back once they close, and that stalled public HTTP
//! uploads to a listener that never reads cost a bounded amount while the relay keeps answering.
//! Every figure is printed (`--nocapture`) for bench/README.md.

use testkit::h2raw;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libtunnel::{Identity, Listener};
use testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KIB: u64 = 1024;
/// The admin token of the relays that have an admin endpoint.
const ADMIN_TOKEN: &str = "admin-token-for-the-flood-0123456789";

/// A `tunnel server` child process, killed when dropped.
struct RelayProcess(procs::RelayProcess);

impl std::ops::Deref for RelayProcess {
    type Target = procs::RelayProcess;
    fn deref(&self) -> &procs::RelayProcess {
        &self.0
    }
}

impl RelayProcess {
    async fn start(extra: &[(&str, String)]) -> RelayProcess {
        raise_fd_limit();
        let mut env: Vec<(&str, &str)> = vec![("TUNNEL_ALLOW", r#"[{"host":"127.0.0.1","port":9}]"#), ("RUST_LOG", "warn")];
        env.extend(extra.iter().map(|(k, v)| (*k, v.as_str())));
        RelayProcess(procs::RelayProcess::start(&env).await)
    }

    /// The relay's `/metrics` value of `series` (the request for it not counted).
    async fn metric_now(&self, series: &str) -> i64 {
        let text = self.metrics_text().await;
        metric(&text, series) - i64::from(self.counts_itself(series))
    }

    /// Whether `series` counts the connection asking for `/metrics`.
    fn counts_itself(&self, series: &str) -> bool {
        match self.admin {
            Some(_) => series == "libtunnel_admin_connections_open",
            None => series == "libtunnel_connections_open" || series == "libtunnel_handshakes_open",
        }
    }

    fn rss(&self) -> u64 {
        self.rss_kib() * KIB
    }

    /// The relay's `/metrics` text: on the tunnel port, or on the admin endpoint when it is on.
    async fn metrics_text(&self) -> String {
        let (status, text) = match self.admin {
            Some(admin) => {
                http_exchange(
                    admin,
                    &format!("GET /metrics HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"),
                )
                .await
            }
            None => http_get(self.ws, "/metrics").await,
        };
        assert_eq!(status, 200, "{text}");
        text
    }

    /// Wait until the relay's `/metrics` shows `series` at `want` (or past it, with `at_least`).
    /// A request the relay refuses meanwhile (a flood's connections still hold its places, so it
    /// closes ours at once) is one more try, not a failure.
    async fn await_metric(&self, series: &str, want: i64, at_least: bool) {
        eventually_within(BULK, &format!("{series} to reach {want}"), || async {
            let text = self.try_metrics_text().await?;
            // The /metrics request is itself an open connection (in its handshake).
            let v = metric(&text, series) - i64::from(self.counts_itself(series));
            holds(v, |v| *v == want || (at_least && *v > want)).map_err(|v| format!("{series} = {v}"))
        })
        .await;
    }

    /// The `/metrics` body, or why there is none (refused, closed, another status).
    async fn try_metrics_text(&self) -> Result<String, String> {
        let (addr, auth) = match self.admin {
            Some(admin) => (admin, format!("Authorization: Bearer {ADMIN_TOKEN}\r\n")),
            None => (self.ws, String::new()),
        };
        let request = format!("GET /metrics HTTP/1.1\r\nHost: relay\r\n{auth}Connection: close\r\n\r\n");
        let mut s = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        s.write_all(request.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
        let mut raw = Vec::new();
        match tokio::time::timeout(STEP, s.read_to_end(&mut raw)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("read: {e}")),
            Err(_) => return Err("no answer within STEP".into()),
        }
        let text = String::from_utf8_lossy(&raw).into_owned();
        match text.split_once("\r\n\r\n") {
            Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
            _ => Err(format!("answer {:?}", text.chars().take(120).collect::<String>())),
        }
    }
}

/// The soft open-files limit raised to the hard one (thousands of sockets in one process).
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// Open `n` connections with `open`, 100 at a time.
async fn open_many<F, Fut>(n: usize, open: F) -> Vec<TcpStream>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = TcpStream>,
{
    let mut all = Vec::with_capacity(n);
    while all.len() < n {
        let batch: Vec<_> = (0..(n - all.len()).min(100)).map(|_| open()).collect();
        all.extend(within(BULK, "opening connections", futures_util::future::join_all(batch)).await);
    }
    all
}

/// A WebSocket upgraded for the multiplexed mode that reads the relay's preamble, then is silent.
async fn silent_websocket(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: libtunnel.v1\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("upgrade request");
    // The 101 head, then the relay's preamble frame: the relay serves this WebSocket now.
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = within(STEP, "the upgrade and preamble", s.read(&mut buf)).await.expect("read");
        assert!(n > 0, "the relay closed an upgrade: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            assert!(got.starts_with(b"HTTP/1.1 101"), "{:?}", String::from_utf8_lossy(&got));
            let frame = &got[i + 4..];
            if frame.len() >= 2 && frame.len() >= 2 + usize::from(frame[1] & 0x7f) {
                return s;
            }
        }
    }
}

async fn idle_tcp(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.expect("connect")
}

/// Half a request head, then silence.
async fn slowloris(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x.localhost\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa").await.expect("write");
    s
}

/// Limits wide enough for thousands of connections from 127.0.0.1, and deadlines long enough
/// that nothing times out while it is measured.
fn flood_settings() -> Vec<(&'static str, String)> {
    vec![
        ("TUNNEL_MAX_CONNECTIONS", "20000".into()),
        ("TUNNEL_MAX_CONNECTIONS_PER_SOURCE", "10000".into()),
        ("TUNNEL_MAX_HANDSHAKES_PER_SOURCE", "10000".into()),
        ("TUNNEL_MAX_HANDSHAKES", "10000".into()),
        ("TUNNEL_HANDSHAKE_TIMEOUT", "120".into()),
        ("TUNNEL_HTTP_HEADER_TIMEOUT", "120".into()),
    ]
}

/// Warm the relay up (its threads and allocator arenas exist after a few connections), then
/// the baseline, with `open` connections of the test's own open.
async fn baseline(relay: &RelayProcess, open: i64) -> u64 {
    let warm = open_many(50, || silent_websocket(relay.ws)).await;
    drop(warm);
    relay.await_metric("libtunnel_connections_open", open, false).await;
    relay.rss()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_connection_costs_under_16_kib() {
    init_tracing();
    let mut settings = flood_settings();
    settings.push(("TUNNEL_HTTP_LISTEN", "127.0.0.1:0".into()));
    settings.push(("TUNNEL_TCP_LISTEN", "127.0.0.1:0".into()));
    const N: usize = 1000;
    let mut report = Vec::new();
    for kind in ["idle TCP (tunnel port)", "idle TCP (raw-TCP port)", "slowloris (tunnel port)", "slowloris (public port)", "silent WebSocket"] {
        // A fresh relay for each kind: memory freed by one would serve the next.
        let relay = RelayProcess::start(&settings).await;
        let http = relay.http.expect("public port");
        let base = baseline(&relay, 0).await;
        let conns = match kind {
            "idle TCP (tunnel port)" => open_many(N, || idle_tcp(relay.ws)).await,
            "idle TCP (raw-TCP port)" => open_many(N, || idle_tcp(relay.tcp.expect("raw TCP port"))).await,
            "slowloris (tunnel port)" => open_many(N, || slowloris(relay.ws)).await,
            "slowloris (public port)" => open_many(N, || slowloris(http)).await,
            _ => open_many(N, || silent_websocket(relay.ws)).await,
        };
        relay.await_metric("libtunnel_handshakes_open", N as i64, false).await;
        // Give the relay a moment to read what was sent (it is in the socket buffers).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let per = relay.rss().saturating_sub(base) / N as u64;
        eprintln!("{kind}: {:.1} KiB per connection ({N} open; baseline {} KiB)", per as f64 / 1024.0, base / KIB);
        report.push((kind, per));
        drop(conns);
    }
    for (kind, per) in report {
        assert!(per < 16 * KIB, "{kind}: {per} bytes per unauthenticated connection, want under 16 KiB");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_returns_after_a_flood_of_silent_websockets() {
    init_tracing();
    let relay = RelayProcess::start(&flood_settings()).await;
    const N: usize = 2000;
    let base = baseline(&relay, 0).await;
    let conns = open_many(N, || silent_websocket(relay.ws)).await;
    relay.await_metric("libtunnel_handshakes_open", N as i64, false).await;
    let peak = relay.rss();
    eprintln!("{N} silent WebSockets: baseline {} KiB, with them {} KiB (+{} KiB each)", base / KIB, peak / KIB, (peak - base) / N as u64 / KIB);
    assert!(peak - base < N as u64 * 16 * KIB, "{N} silent WebSockets took {} KiB", (peak - base) / KIB);
    drop(conns);
    let closed = Instant::now();
    relay.await_metric("libtunnel_connections_open", 0, false).await;
    // Back within 20% of the baseline within 10 s of the close.
    let after = eventually_within(Duration::from_secs(10), "RSS back within 20% of the baseline", || async {
        holds(relay.rss(), |r| *r <= base + base / 5).map_err(|r| format!("{} KiB, baseline {} KiB", r / KIB, base / KIB))
    })
    .await;
    eprintln!("{:.1} s after closing them: {} KiB (baseline {} KiB)", closed.elapsed().as_secs_f64(), after / KIB, base / KIB);
    assert!(after <= base + base / 5, "RSS {} KiB 10 s after the flood, baseline {} KiB", after / KIB, base / KIB);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_public_uploads_cost_a_bounded_amount() {
    init_tracing();
    let mut settings = flood_settings();
    settings.extend([
        ("TUNNEL_HTTP_LISTEN", "127.0.0.1:0".to_string()),
        ("TUNNEL_LISTENERS_OPEN", "true".to_string()),
        ("TUNNEL_HTTP_TIMEOUT", "6".to_string()),
        ("TUNNEL_HTTP_MAX_REQUESTS_PER_SOURCE", "1000".to_string()),
    ]);
    let relay = RelayProcess::start(&settings).await;
    let http = relay.http.expect("public port");
    // A listener whose service accepts each request's stream and never reads it.
    let listener =
        within(STEP, "listener", Listener::builder(&format!("ws://{}", relay.ws), Identity::generate()).backlog(1024).bind()).await.expect("bind");
    let name = listener.name();
    let _held = hold_streams(listener);
    // The listener's session is the one connection open.
    let base = baseline(&relay, 1).await;
    const N: usize = 200;
    const BODY: usize = 2 * MIB;
    let chunk = vec![b'u'; 64 * 1024];
    let uploads = (0..N).map(|_| {
        let (name, chunk) = (name.clone(), chunk.clone());
        async move {
            let mut s = TcpStream::connect(http).await.expect("connect");
            let head = format!("POST /upload HTTP/1.1\r\nHost: {name}.localhost\r\nContent-Length: {BODY}\r\n\r\n");
            s.write_all(head.as_bytes()).await.expect("head");
            // Write until the relay stops taking the body (the listener never reads it).
            let mut sent = 0;
            while sent < BODY {
                match tokio::time::timeout(Duration::from_millis(500), s.write_all(&chunk)).await {
                    Ok(Ok(())) => sent += chunk.len(),
                    Ok(Err(_)) => break,
                    Err(_) => break,
                }
            }
            (s, sent)
        }
    });
    let mut uploads = within(BULK, "the uploads to stall", futures_util::future::join_all(uploads)).await;
    let stalled = uploads.iter().filter(|(_, sent)| *sent < BODY).count();
    let rss = relay.rss();
    let bound = N as u64 * (u64::from(libtunnel::mux::WINDOW) + 64 * KIB);
    eprintln!(
        "{N} stalled uploads ({stalled} blocked before their end): baseline {} KiB, with them {} KiB (+{} KiB each; bound {} KiB each)",
        base / KIB,
        rss / KIB,
        rss.saturating_sub(base) / N as u64 / KIB,
        bound / N as u64 / KIB
    );
    assert!(rss.saturating_sub(base) <= bound, "{N} stalled uploads took {} KiB", (rss - base) / KIB);
    // The relay still answers.
    let t0 = Instant::now();
    let (status, _) = http_get(relay.ws, "/healthz").await;
    assert_eq!(status, 200);
    eprintln!("health answered in {:?} with the uploads stalled", t0.elapsed());
    // Each upload ends with 504 (the listener never answers) or stays stalled; none succeeds.
    let answers = uploads.iter_mut().map(|(s, _)| async move {
        let mut buf = vec![0u8; 512];
        match tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => String::from_utf8_lossy(&buf[..n]).split_whitespace().nth(1).unwrap_or("").to_string(),
            Ok(_) => "closed".to_string(),
            Err(_) => "stalled".to_string(),
        }
    });
    let answers = futures_util::future::join_all(answers).await;
    let mut counts = std::collections::BTreeMap::new();
    for a in &answers {
        *counts.entry(a.as_str()).or_insert(0) += 1;
    }
    eprintln!("upload outcomes: {counts:?}");
    assert!(answers.iter().all(|a| a == "504" || a == "stalled"), "{counts:?}");
}

/// A local HTTP/1.1 service that answers `GET` at once ("ok") and holds every `POST` until its
/// body ends (which, for the flood below, it never does).
async fn holding_service() -> SocketAddr {
    use http_body_util::BodyExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    if req.method() == hyper::Method::POST {
                        let _ = req.into_body().collect().await;
                    }
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(sock), svc).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nine_sources_holding_requests_leave_room_for_a_tenth_and_their_memory_comes_back() {
    init_tracing();
    let mut settings = flood_settings();
    settings.extend([
        ("TUNNEL_HTTP_LISTEN", "127.0.0.1:0".to_string()),
        ("TUNNEL_LISTENERS_OPEN", "true".to_string()),
        ("TUNNEL_HTTP_TIMEOUT", "120".to_string()),
    ]);
    let relay = RelayProcess::start(&settings).await;
    let http = relay.http.expect("public port");
    let listener =
        within(STEP, "listener", Listener::builder(&format!("ws://{}", relay.ws), Identity::generate()).backlog(2048).bind()).await.expect("bind");
    let name = listener.name();
    let svc = holding_service().await;
    tokio::spawn(libtunnel::forward::expose(listener, svc.to_string(), false, std::future::pending()));
    let host = format!("{name}.localhost");
    // The listener's session is the one connection open.
    let base = baseline(&relay, 1).await;
    let base_fds = relay.fds();

    // 9 sources, each at its limit of 128 requests in progress (http_max_requests_per_source):
    // 2 connections of 64 POSTs whose bodies never come, never reading the answers.
    let mut attack = Vec::new();
    for src in 1..=9 {
        for c in 0..2 {
            let frames: Vec<Vec<u8>> = (0..64u32).map(|i| h2raw::headers(2 * i + 1, "POST", &format!("/hold/{src}/{c}/{i}"), &host, false)).collect();
            attack.push(h2raw::send(http, Some(&format!("127.0.1.{src}")), 65_535, &frames).await.expect("attacker connects"));
        }
    }
    // Every one of the 1,152 requests is either held or refused (503: over its source's share).
    let (held, refused) = eventually_within(BULK, "every request to be held or refused", || async {
        let held = relay.metric_now("libtunnel_http_requests_open").await;
        let refused = relay.metric_now("libtunnel_refusals_total{reason=\"http_listener_requests\"}").await;
        holds((held, refused), |(h, r)| h + r == 9 * 128)
    })
    .await;
    let (rss, fds) = (relay.rss(), relay.fds());
    eprintln!("9 sources x 128 held POSTs: {held} held, {refused} refused (503); RSS {} -> {} KiB, fds {base_fds} -> {fds}", base / KIB, rss / KIB);
    assert!((768..1024).contains(&held), "{held} held: the last quarter stays free for others");

    // A tenth source is served at once.
    let t0 = Instant::now();
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind("127.0.1.10:0".parse().expect("addr")).expect("bind");
    let mut s = within(STEP, "connect", sock.connect(http)).await.expect("connect");
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).await.expect("request");
    let (status, body) = within(STEP, "the tenth source's answer", read_http_response(&mut s)).await;
    assert_eq!((status, body.trim_end()), (200, "ok"), "{body}");
    eprintln!("a tenth source was answered in {:?}", t0.elapsed());

    // The attackers leave: every held request ends, and the memory comes back.
    drop(attack);
    let closed = Instant::now();
    relay.await_metric("libtunnel_http_requests_open", 0, false).await;
    let after = eventually_within(Duration::from_secs(10), "RSS back within 20% of the baseline", || async {
        holds(relay.rss(), |r| *r <= base + base / 5).map_err(|r| format!("{} KiB, baseline {} KiB", r / KIB, base / KIB))
    })
    .await;
    eprintln!("{:.1} s after they left: RSS {} KiB (baseline {} KiB), fds {}", closed.elapsed().as_secs_f64(), after / KIB, base / KIB, relay.fds());
    assert!(after <= base + base / 5, "RSS {} KiB 10 s after the flood, baseline {} KiB", after / KIB, base / KIB);
}

/// Whether the other end closed `s` (what it sent, if anything, is left unread).
fn closed_by_peer(s: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    match s.try_read(&mut probe) {
        Ok(n) => n == 0,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_idle_admin_connections_cost_a_bounded_amount() {
    init_tracing();
    let mut settings = flood_settings();
    settings.extend([
        ("TUNNEL_HTTP_LISTEN", "127.0.0.1:0".to_string()),
        ("TUNNEL_LISTENERS_OPEN", "true".to_string()),
        ("TUNNEL_ADMIN_LISTEN", "127.0.0.1:0".to_string()),
        ("TUNNEL_ADMIN_TOKEN", ADMIN_TOKEN.to_string()),
    ]);
    let relay = RelayProcess::start(&settings).await;
    let (http, admin) = (relay.http.expect("public port"), relay.admin.expect("admin port"));
    let listener = within(STEP, "listener", Listener::bind(&format!("ws://{}", relay.ws), Identity::generate())).await.expect("bind");
    let name = listener.name();
    let svc = holding_service().await;
    tokio::spawn(libtunnel::forward::expose(listener, svc.to_string(), false, std::future::pending()));
    let get = format!("GET / HTTP/1.1\r\nHost: {name}.localhost\r\nConnection: close\r\n\r\n");
    let base = baseline(&relay, 1).await;
    let base_fds = relay.fds();

    // 20,000 idle connections from 100 source addresses, 500 at a time; the ones the relay
    // closed at once are let go (this process has at most 20,000 descriptors itself).
    const N: usize = 20_000;
    let t0 = Instant::now();
    let mut idle: Vec<TcpStream> = Vec::new();
    let mut opened = 0;
    while opened < N {
        let batch = (0..500).map(|i| {
            let src = format!("127.0.2.{}", 1 + (opened + i) % 100);
            async move {
                let s = tokio::net::TcpSocket::new_v4().expect("socket");
                s.bind(format!("{src}:0").parse().expect("addr")).expect("bind");
                s.connect(admin).await
            }
        });
        idle.extend(within(BULK, "opening admin connections", futures_util::future::join_all(batch)).await.into_iter().flatten());
        opened += 500;
        idle.retain(|s| !closed_by_peer(s));
    }
    let (rss, fds) = (relay.rss(), relay.fds());
    eprintln!(
        "{N} admin connections in {:?}, {} still open here; relay RSS {} -> {} KiB, fds {base_fds} -> {fds}",
        t0.elapsed(),
        idle.len(),
        base / KIB,
        rss / KIB
    );
    assert!(fds <= base_fds + 64 + 8, "{fds} descriptors open, {base_fds} before");
    assert!(rss.saturating_sub(base) < 16 * 1024 * KIB, "RSS grew by {} KiB", (rss - base) / KIB);

    // Public traffic goes on meanwhile.
    let t0 = Instant::now();
    let (status, body) = http_exchange(http, &get).await;
    assert_eq!((status, body.trim_end()), (200, "ok"));
    eprintln!("a public request answered in {:?} during the admin flood", t0.elapsed());

    // The idle ones the relay holds are closed by its head deadline (5 s) while they stay open
    // here: the operator gets in again.
    let t0 = Instant::now();
    eventually("the admin endpoint to answer /healthz again", || async {
        let mut s = TcpStream::connect(admin).await.expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").await.expect("request");
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer).await;
        holds(String::from_utf8_lossy(&answer).into_owned(), |a| a.starts_with("HTTP/1.1 200"))
    })
    .await;
    eprintln!("the operator got in {:?} after the flood stopped", t0.elapsed());
    drop(idle);
    relay.await_metric("libtunnel_admin_connections_open", 0, false).await;
    let refused = relay.metric_now("libtunnel_admin_connections_refused_total").await;
    eprintln!("after: {refused} admin connections were closed at once; RSS {} KiB, fds {}", relay.rss() / KIB, relay.fds());
    // Each admitted one was held at most 5 s, 64 at a time: most of the 20,000 were refused.
    assert!(refused >= (N * 9 / 10) as i64, "{refused} refused");
    assert!(relay.fds() <= base_fds + 8);
}
