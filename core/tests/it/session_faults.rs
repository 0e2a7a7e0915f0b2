//! Sessions that never hang and leave nothing behind, against real `tunnel server` processes on
//! loopback: a frozen relay under 200 uploads, a dialer whose reader and writer are separate
//! tasks, aborted sessions whose targets stopped reading, and floods of tiny and junk frames.
//! Every wait is bounded; figures (time to fail, RSS, fds) are printed for the issue notes.

use testkit::procs;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::{SinkExt, StreamExt};
use libtunnel::mux::{FrameSink, FrameSource, MuxConfig, Role, Session};
use libtunnel::protocol::{Frame, FrameKind, Hello, HelloAck, ServerConnect};
use libtunnel::transport::{self, Connected, RelayUrl};
use libtunnel::{Dialer, ErrorCode};
use testkit::procs::RelayProcess;
use testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A `tunnel server` process allowing `ports` on 127.0.0.1, with a 0.3 s / 1 s keepalive.
struct RelayProc(RelayProcess);

impl std::ops::Deref for RelayProc {
    type Target = RelayProcess;
    fn deref(&self) -> &RelayProcess {
        &self.0
    }
}

impl RelayProc {
    async fn start(ports: &[u16]) -> RelayProc {
        RelayProc::start_with(ports, &[]).await
    }

    async fn start_with(ports: &[u16], env: &[(&str, &str)]) -> RelayProc {
        let allow = allow_json(ports);
        let mut all = vec![("TUNNEL_ALLOW", allow.as_str()), ("TUNNEL_KEEPALIVE_INTERVAL", "0.3"), ("TUNNEL_KEEPALIVE_TIMEOUT", "1")];
        all.extend_from_slice(env);
        RelayProc(RelayProcess::start(&all).await)
    }

    async fn metric(&self, series: &str) -> i64 {
        let (_, body) = http_get(self.ws, "/metrics").await;
        metric(&body, series)
    }

    /// Wait until the relay holds no stream and at most `fds` descriptors.
    async fn settles_to(&self, fds: usize, what: &str) -> Duration {
        let t0 = Instant::now();
        eventually(what, || async {
            let (streams, open) = (self.metric("libtunnel_streams_active").await, self.fds());
            holds((streams, open), |(s, o)| *s == 0 && *o <= fds).map_err(|(s, o)| format!("{s} streams, {o} descriptors (want 0 and at most {fds})"))
        })
        .await;
        t0.elapsed()
    }
}

/// A target that accepts and never reads (its connections are kept open until the relay closes
/// them, which the task notices as an error or end when it finally looks).
async fn stalled_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    addr
}

fn short_keepalive() -> MuxConfig {
    MuxConfig { keepalive_interval: Duration::from_millis(300), keepalive_timeout: Duration::from_secs(1), ..MuxConfig::default() }
}

fn dialer(url: &str) -> Dialer {
    Dialer::builder(url).key(key()).timeout(Duration::from_secs(3)).mux_config(short_keepalive()).build().expect("dialer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_relay_fails_every_upload_in_flight_and_new_dials_work_once_it_is_back() {
    init_tracing();
    let sink = sink_server().await;
    let echo = echo_server().await;
    let relay = RelayProc::start(&[sink.port(), echo.port()]).await;
    let d = dialer(&relay.url);
    // 200 uploads on one session, each writing without end.
    let mut uploads = tokio::task::JoinSet::new();
    // Every upload meets here once its first chunk is written: data in flight on all 200.
    let in_flight = Arc::new(tokio::sync::Barrier::new(201));
    for _ in 0..200 {
        let mut s = within(STEP, "dial", d.dial(&sink.to_string())).await.expect("dial");
        let in_flight = in_flight.clone();
        uploads.spawn(async move {
            let chunk = vec![5u8; 64 * 1024];
            let mut first = true;
            loop {
                if let Err(e) = s.write_all(&chunk).await {
                    return (Instant::now(), e);
                }
                if std::mem::take(&mut first) {
                    in_flight.wait().await;
                }
            }
        });
    }
    within(STEP, "every upload to have data in flight", in_flight.wait()).await;
    relay.signal("-STOP");
    let t0 = Instant::now();
    let mut worst = Duration::ZERO;
    let mut failed = 0;
    while let Some(r) = within(Duration::from_secs(15), "every upload to fail", uploads.join_next()).await {
        let (at, e) = r.expect("upload task");
        let e = libtunnel::Error::from_io(e, "upload");
        assert_eq!(e.code(), ErrorCode::RelayUnavailable, "{e}");
        worst = worst.max(at.duration_since(t0));
        failed += 1;
    }
    assert_eq!(failed, 200);
    assert!(worst < Duration::from_secs(4), "the last upload failed {worst:?} after the freeze (keepalive timeout 1 s)");
    eprintln!("200 uploads over a frozen relay all failed within {worst:?} (keepalive timeout 1 s)");
    // While frozen a new dial fails in bounded time; once the relay is back, dials work again.
    let r = tokio::time::timeout(Duration::from_secs(10), d.dial(&echo.to_string())).await.expect("a dial to a frozen relay is bounded");
    assert!(r.is_err(), "a dial through a frozen relay cannot succeed");
    relay.signal("-CONT");
    let s = within(STEP, "dial after the relay is back", d.dial(&echo.to_string())).await.expect("dial after resume");
    let data = payload(MIB, 4);
    let got = within(STEP, "1 MiB round trip", echo_roundtrip(s, &data, true)).await.expect("round trip");
    assert_eq!(got, sha256(&data));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_split_into_reader_and_writer_tasks_fails_in_both_when_the_relay_dies() {
    init_tracing();
    let echo = echo_server().await;
    let relay = start_relay(relay_config(allow_ports(&[echo.port()]))).await;
    let d = dialer(relay.url());
    let s = within(STEP, "dial", d.dial(&echo.to_string())).await.expect("dial");
    let (mut r, mut w) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        let chunk = vec![1u8; 64 * 1024];
        loop {
            if let Err(e) = w.write_all(&chunk).await {
                return e;
            }
        }
    });
    let (flowing, echoed) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut flowing = Some(flowing);
        loop {
            match r.read(&mut buf).await {
                Ok(0) => panic!("a stream cut off by a dying relay read as a clean end"),
                Ok(_) => {
                    if let Some(f) = flowing.take() {
                        let _ = f.send(());
                    }
                }
                Err(e) => return e,
            }
        }
    });
    within(STEP, "the echo to flow back", echoed).await.expect("the reader got bytes");
    relay.abort();
    let we = within(STEP, "the writer task to fail", writer).await.expect("writer");
    let re = within(STEP, "the reader task to fail", reader).await.expect("reader");
    for e in [we, re] {
        assert_eq!(libtunnel::Error::from_io(e, "io").code(), ErrorCode::RelayUnavailable);
    }
}

/// An authenticated multiplexed transport built by hand: (frame source, frame sink).
async fn raw_mux(url: &str) -> (FrameSource, FrameSink) {
    let u = RelayUrl::parse(url).expect("relay URL");
    let Connected::Ws(ws, true) = within(STEP, "connect", transport::connect(&u, true, None)).await.expect("transport") else {
        panic!("the relay must accept the multiplexed subprotocol")
    };
    let (mut source, mut sink) = transport::ws_frames(ws);
    let pre = within(STEP, "the preamble", source.next()).await.expect("a preamble").expect("readable");
    let nonce = ServerConnect::decode_checked(&pre).expect("preamble");
    let (date, sig) = key().sign(&nonce, SystemTime::now());
    sink.send(Hello { date, sig }.encode()).await.expect("hello");
    let ack = within(STEP, "the hello answer", source.next()).await.expect("answer").expect("readable");
    assert_eq!(HelloAck::decode(&ack).expect("answer").refusal, None);
    (source, sink)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_sessions_whose_targets_stopped_reading_leave_no_stream_fd_or_target_behind() {
    init_tracing();
    let target = stalled_server().await;
    let relay = RelayProc::start(&[target.port()]).await;
    let baseline = relay.fds();
    let mut sessions = Vec::new();
    for _ in 0..20 {
        let (source, sink) = raw_mux(&relay.url).await;
        let session = Session::new(Role::Client, source, sink, MuxConfig::default());
        let mut s = session.open().expect("open");
        // SOCKS5 as a multiplexed stream speaks it: no auth, then CONNECT 127.0.0.1:port.
        s.write_all(&[5, 1, 0]).await.expect("greeting");
        let mut m = [0u8; 2];
        within(STEP, "method", s.read_exact(&mut m)).await.expect("method");
        let p = target.port().to_be_bytes();
        s.write_all(&[5, 1, 0, 1, 127, 0, 0, 1, p[0], p[1]]).await.expect("connect");
        let mut rep = [0u8; 10];
        within(STEP, "reply", s.read_exact(&mut rep)).await.expect("reply");
        assert_eq!(rep[1], 0, "connected");
        // Write until the target's buffers and the window are full.
        let chunk = vec![9u8; 64 * 1024];
        while tokio::time::timeout(Duration::from_millis(200), s.write_all(&chunk)).await.is_ok() {}
        sessions.push((session, s));
    }
    let loaded = relay.fds();
    assert!(loaded >= baseline + 40, "20 transports and 20 targets are open ({baseline} -> {loaded} fds)");
    assert_eq!(relay.metric("libtunnel_streams_active").await, 20);
    for (session, _) in &sessions {
        session.close(ErrorCode::Closed, "aborted by the test");
    }
    let t = relay.settles_to(baseline, "the relay to free every stream, fd and target").await;
    assert!(t < Duration::from_secs(1), "freed after {t:?}");
    eprintln!("20 aborted sessions with stalled targets: fds {baseline} -> {loaded} -> {} in {t:?}", relay.fds());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_tiny_frames_and_junk_frames_stay_bounded_and_leave_nothing_behind() {
    init_tracing();
    let target = stalled_server().await;
    let relay = RelayProc::start(&[target.port()]).await;
    let (base_fds, base_rss) = (relay.fds(), relay.rss_kib());
    let (mut source, mut sink) = raw_mux(&relay.url).await;
    // One stream to a target that never reads, by raw frames.
    let p = target.port().to_be_bytes();
    sink.send(Frame::encode(FrameKind::Open, 1, &[])).await.expect("open");
    sink.send(Frame::encode(FrameKind::Data, 1, &[5, 1, 0])).await.expect("greeting");
    sink.send(Frame::encode(FrameKind::Data, 1, &[5, 1, 0, 1, 127, 0, 0, 1, p[0], p[1]])).await.expect("connect");
    let mut reply = Vec::new();
    while reply.len() < 12 {
        let f = within(STEP, "the SOCKS answers", source.next()).await.expect("a frame").expect("readable");
        let f = Frame::decode(f).expect("frame");
        if f.kind == FrameKind::Data {
            reply.extend_from_slice(&f.payload);
        }
    }
    assert_eq!(reply[3], 0, "connected: {reply:?}");
    // 1-byte frames up to (almost) the whole initial window: the target never reads, so all of it
    // waits in the relay, copied out of the transport's buffers.
    let frames = 250 * 1024 - 13;
    for _ in 0..frames {
        sink.feed(Frame::encode(FrameKind::Data, 1, &[7])).await.expect("tiny frame");
    }
    sink.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tiny_rss = relay.rss_kib();
    eprintln!("{frames} one-byte frames to a stalled target: relay RSS {base_rss} -> {tiny_rss} KiB");
    assert!(tiny_rss < base_rss + 16 * 1024, "one stream of 1-byte frames grew the relay by {} KiB", tiny_rss - base_rss);
    // Then a 1-byte frame followed by a 64 KiB frame for a stream that was never opened: the
    // relay cuts the session at once.
    let junk = vec![0u8; 64 * 1024];
    let mut sent = 0;
    let cut = loop {
        if sink.send(Frame::encode(FrameKind::Data, 1, &[7])).await.is_err() || sink.send(Frame::encode(FrameKind::Data, 99, &junk)).await.is_err() {
            break true;
        }
        sent += 1;
        match tokio::time::timeout(Duration::from_millis(1), source.next()).await {
            Ok(None | Some(Err(_))) => break true,
            _ if sent >= 8000 => break false,
            _ => {}
        }
    };
    let closed = cut
        || within(STEP, "the relay to close the session", async {
            loop {
                match source.next().await {
                    None | Some(Err(_)) => return true,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
    assert!(closed, "the relay kept a session that sent data on a stream it never opened");
    let junk_rss = relay.rss_kib();
    eprintln!("junk frames for an unopened stream: cut after {sent} pairs; relay RSS {junk_rss} KiB");
    assert!(junk_rss < base_rss + 32 * 1024, "the junk flood grew the relay by {} KiB", junk_rss.saturating_sub(base_rss));
    drop((source, sink));
    let t = relay.settles_to(base_fds, "the relay to free the flooding session").await;
    eprintln!("flooding session freed in {t:?}; fds {} (baseline {base_fds}), RSS {} KiB", relay.fds(), relay.rss_kib());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_listener_under_public_uploads_is_dropped_and_the_relay_returns_to_its_baseline() {
    init_tracing();
    let (service, accepted) = counting_sink_server().await;
    let relay = RelayProc::start_with(
        &[9],
        &[
            ("TUNNEL_HTTP_LISTEN", "127.0.0.1:0"),
            ("TUNNEL_LISTENERS_OPEN", "true"),
            ("TUNNEL_HTTP_MAX_REQUESTS_PER_SOURCE", "1000"),
            // The 200 connections come from one address faster than a loaded relay may read their
            // heads; until it has, each counts as a handshake (default 128 per source).
            ("TUNNEL_MAX_HANDSHAKES_PER_SOURCE", "1000"),
        ],
    )
    .await;
    let http = relay.http.expect("public http port");
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("session-faults-{}", std::process::id()));
    let (mut listener, name) = procs::listen_process(&relay.url, &service.to_string(), &dir).await;
    // The relay answers the registration just before it routes the name.
    eventually("the listener to count as active", || async { holds(relay.metric("libtunnel_listeners_active").await, |n| *n == 1) }).await;
    let (base_fds, base_rss) = (relay.fds(), relay.rss_kib());
    // 200 uploads through the public port, each with a body that never ends.
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let mut c = tokio::net::TcpStream::connect(http).await.expect("connect to the public port");
        let head = format!("POST /upload HTTP/1.1\r\nHost: {name}.localhost\r\nContent-Length: 100000000000\r\n\r\n");
        c.write_all(head.as_bytes()).await.expect("request head");
        clients.spawn(async move {
            let (mut r, mut w) = c.into_split();
            let writer = async move {
                let chunk = vec![6u8; 64 * 1024];
                while w.write_all(&chunk).await.is_ok() {}
                std::future::pending::<()>().await
            };
            let mut answer = Vec::new();
            let reader = async { r.read_to_end(&mut answer).await.map(|_| String::from_utf8_lossy(&answer).into_owned()) };
            let outcome = tokio::select! { o = reader => o, () = writer => unreachable!() };
            (Instant::now(), outcome)
        });
    }
    // Every upload has reached the service behind the listener, and bytes are flowing.
    eventually("200 uploads to reach the listener's service", || async { holds(accepted.load(std::sync::atomic::Ordering::Relaxed), |n| *n >= 200) })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let loaded_rss = relay.rss_kib();
    let pid = listener.id().expect("running").to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().expect("kill").success());
    let t0 = Instant::now();
    let (mut worst, mut answered) = (Duration::ZERO, 0);
    while let Some(r) = within(Duration::from_secs(20), "every upload to end", clients.join_next()).await {
        let (at, outcome) = r.expect("client task");
        worst = worst.max(at.duration_since(t0));
        if let Ok(text) = outcome {
            assert!(text.is_empty() || text.starts_with("HTTP/1.1 502") || text.starts_with("HTTP/1.1 504"), "unexpected answer: {text}");
            answered += usize::from(!text.is_empty());
        }
    }
    let _ = std::process::Command::new("kill").args(["-CONT", &pid]).status();
    assert!(worst < Duration::from_secs(5), "the last upload ended {worst:?} after the listener froze (keepalive timeout 1 s)");
    let _ = listener.kill().await;
    let t = relay.settles_to(base_fds.saturating_sub(1), "the relay to free the frozen listener's session and its uploads").await;
    // The relay hands freed memory back to the system within a second or so of a burst of
    // closes (relay/memory.rs); wait for that, bounded.
    let after_rss = eventually_within(Duration::from_secs(5), "the relay's RSS back near its baseline", || async {
        holds(relay.rss_kib(), |r| *r <= base_rss + 8 * 1024).map_err(|r| format!("{r} KiB, baseline {base_rss} KiB"))
    })
    .await;
    eprintln!(
        "frozen listener under 200 public uploads: all ended within {worst:?} ({answered} with a 502/504 answer, the rest reset); \
         relay RSS {base_rss} -> {loaded_rss} (loaded) -> {after_rss} KiB, fds {base_fds} -> {} after {t:?}",
        relay.fds()
    );
    assert!(
        after_rss <= base_rss + 8 * 1024,
        "the relay kept {after_rss} KiB after the uploads ended (baseline {base_rss}, loaded {loaded_rss} KiB)"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
