//! Session-level tests: hostile and stuck transports, flow control through an emulated link,
//! fairness, and memory bounds.

use super::*;
use futures_util::stream;

/// A transport whose reader we feed and whose writer never drains (a peer that stops reading).
fn stuck_peer(cfg: MuxConfig) -> (mpsc::UnboundedSender<io::Result<Bytes>>, Session) {
    let (tx, rx) = mpsc::unbounded_channel();
    let source: FrameSource = Box::pin(stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) }));
    let sink: FrameSink = Box::pin(futures_util::sink::unfold((), |(), _f: Bytes| std::future::pending::<io::Result<()>>()));
    (tx, Session::new(Role::Server, source, sink, cfg))
}

#[tokio::test]
async fn a_peer_that_pings_without_reading_is_cut_off() {
    let (tx, session) = stuck_peer(MuxConfig::default());
    for _ in 0..MAX_OWED_REPLIES + 16 {
        if tx.send(Ok(Frame::encode(FrameKind::Ping, 0, &[0; 8]))).is_err() {
            break;
        }
    }
    tokio::time::timeout(Duration::from_secs(10), session.closed()).await.expect("the session ends instead of queueing pongs forever");
    let e = session.close_reason().expect("a reason");
    assert_eq!(e.code(), ErrorCode::Protocol, "{e}");
    assert!(e.message().contains("faster than it reads"), "{e}");
}

#[tokio::test]
async fn an_oversized_ping_is_a_protocol_error() {
    let (tx, session) = stuck_peer(MuxConfig::default());
    tx.send(Ok(Frame::encode(FrameKind::Ping, 0, &[0; MAX_PING + 1]))).expect("send");
    tokio::time::timeout(Duration::from_secs(10), session.closed()).await.expect("closed");
    assert_eq!(session.close_reason().expect("a reason").code(), ErrorCode::Protocol);
}

fn short_keepalive() -> MuxConfig {
    MuxConfig { keepalive_interval: Duration::from_millis(100), keepalive_timeout: Duration::from_millis(400), ..MuxConfig::default() }
}

#[tokio::test]
async fn a_transport_that_never_drains_ends_the_session_at_the_deadline_with_writers_woken() {
    let (tx, session) = stuck_peer(short_keepalive());
    // The peer keeps talking (so it is not silent) but never reads what we send.
    let feeder = tokio::spawn(async move {
        loop {
            if tx.send(Ok(Frame::encode(FrameKind::Ping, 0, &[1; 8]))).is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    tx_open_and_write(&session).await;
    let t0 = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), session.closed()).await.expect("the stalled session ends");
    let e = session.close_reason().expect("a reason");
    assert_eq!(e.code(), ErrorCode::RelayUnavailable, "{e}");
    assert!(e.message().contains("write stall"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(2), "ended after {:?}", t0.elapsed());
    feeder.abort();
}

/// Open a stream and write until the write blocks, in a task that must end with an error once the
/// session dies.
async fn tx_open_and_write(session: &Session) {
    use tokio::io::AsyncWriteExt;
    let mut s = session.open().expect("open");
    let writer = tokio::spawn(async move {
        let buf = vec![7u8; 64 * 1024];
        loop {
            if let Err(e) = s.write_all(&buf).await {
                return e;
            }
        }
    });
    let session = session.clone();
    tokio::spawn(async move {
        let e = tokio::time::timeout(Duration::from_secs(5), writer).await.expect("the blocked writer wakes").expect("join");
        assert!(session.is_closed(), "the writer only fails once the session has ended: {e}");
    });
}

#[tokio::test]
async fn a_transport_that_never_delivers_ends_the_session_at_the_keepalive_timeout() {
    let source: FrameSource = Box::pin(stream::pending());
    let sink: FrameSink = Box::pin(futures_util::sink::drain().sink_map_err(|e: std::convert::Infallible| match e {}));
    let session = Session::new(Role::Client, source, sink, short_keepalive());
    let mut s = session.open().expect("open");
    let reader = tokio::spawn(async move { s.recv_chunk().await });
    let t0 = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), session.closed()).await.expect("the silent session ends");
    assert!(t0.elapsed() < Duration::from_secs(2));
    let e = session.close_reason().expect("a reason");
    assert_eq!(e.code(), ErrorCode::RelayUnavailable);
    assert!(e.message().contains("keepalive"), "{e}");
    let r = tokio::time::timeout(Duration::from_secs(1), reader).await.expect("the reader wakes").expect("join");
    assert!(r.is_err(), "a stream of a dead session fails, never a clean end: {r:?}");
}

#[tokio::test]
async fn data_on_a_stream_never_opened_is_a_protocol_error() {
    let (tx, session) = stuck_peer(MuxConfig::default());
    tx.send(Ok(Frame::encode(FrameKind::Data, 9, &[0; 1000]))).expect("send");
    tokio::time::timeout(Duration::from_secs(5), session.closed()).await.expect("closed");
    let e = session.close_reason().expect("a reason");
    assert_eq!(e.code(), ErrorCode::Protocol);
    assert!(e.message().contains("never opened"), "{e}");
}

#[tokio::test]
async fn late_data_on_a_closed_stream_is_bounded_by_the_credit_the_peer_had() {
    let (tx, session) = stuck_peer(MuxConfig::default());
    tx.send(Ok(Frame::encode(FrameKind::Open, 1, &[]))).expect("send");
    let mut s = session.accept().await.expect("a stream");
    s.reset(ErrorCode::Closed);
    drop(s);
    // The peer had a whole window of credit: that much late data is dropped quietly (and answered).
    let chunk = vec![0u8; MAX_DATA];
    for _ in 0..(WINDOW as usize / MAX_DATA) {
        tx.send(Ok(Frame::encode(FrameKind::Data, 1, &chunk))).expect("send");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!session.is_closed(), "late data within the peer's credit is legitimate");
    tx.send(Ok(Frame::encode(FrameKind::Data, 1, &chunk))).expect("send");
    tokio::time::timeout(Duration::from_secs(5), session.closed()).await.expect("closed");
    assert!(session.close_reason().unwrap().message().contains("beyond the credit"));
}

#[tokio::test]
async fn tiny_frames_do_not_pin_the_transport_buffers_they_came_in() {
    let (tx, session) = stuck_peer(MuxConfig::default());
    tx.send(Ok(Frame::encode(FrameKind::Open, 1, &[]))).expect("send");
    let mut s = session.accept().await.expect("a stream");
    // Each 1-byte frame is cut from its own 1 MiB "read buffer", as a transport would deliver it.
    let mut buffers = Vec::new();
    for i in 0..64u8 {
        let mut big = BytesMut::zeroed(1024 * 1024);
        big[..FRAME_HEADER].copy_from_slice(&Frame::encode(FrameKind::Data, 1, &[])[..]);
        big[FRAME_HEADER] = i;
        let big = big.freeze();
        buffers.push(big.as_ptr_range());
        tx.send(Ok(big.slice(..FRAME_HEADER + 1))).expect("send");
    }
    let mut got = Vec::new();
    while got.len() < 64 {
        let c = s.recv_chunk().await.expect("read").expect("data");
        let p = c.as_ptr();
        assert!(buffers.iter().all(|r| !r.contains(&p)), "a 1-byte chunk still points into the 1 MiB buffer it arrived in");
        got.extend_from_slice(&c);
    }
    assert_eq!(got, (0..64u8).collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------------
// Two sessions over an emulated link (delay and rate), in memory.
// ---------------------------------------------------------------------------------------------

/// One direction of a link: frames are serialised at `rate` bytes/s, then arrive `delay` later.
/// The queue in front of it holds a few frames, so a full link pushes back on the sender.
fn link(delay: Duration, rate: f64) -> (FrameSink, FrameSource) {
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    let (dtx, mut drx) = mpsc::unbounded_channel::<(tokio::time::Instant, Bytes)>();
    let (otx, orx) = mpsc::unbounded_channel::<io::Result<Bytes>>();
    tokio::spawn(async move {
        let mut free = tokio::time::Instant::now();
        while let Some(f) = rx.recv().await {
            let now = tokio::time::Instant::now();
            free = free.max(now) + Duration::from_secs_f64(f.len() as f64 / rate);
            tokio::time::sleep_until(free).await;
            if dtx.send((free + delay, f)).is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        while let Some((at, f)) = drx.recv().await {
            tokio::time::sleep_until(at).await;
            if otx.send(Ok(f)).is_err() {
                return;
            }
        }
    });
    let sink: FrameSink = Box::pin(tokio_util::sync::PollSender::new(tx).sink_map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe)));
    let source: FrameSource = Box::pin(stream::unfold(orx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) }));
    (sink, source)
}

/// A client and a server session joined by a link with `delay` each way and `rate` bytes/s.
fn pair(delay: Duration, rate: f64, cfg: MuxConfig) -> (Session, Session) {
    let (c_sink, s_source) = link(delay, rate);
    let (s_sink, c_source) = link(delay, rate);
    (Session::new(Role::Client, c_source, c_sink, cfg.clone()), Session::new(Role::Server, s_source, s_sink, cfg))
}

async fn wait_for_rtt(s: &Session) {
    for _ in 0..200 {
        if s.stats().rtt.is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("no RTT measured");
}

#[tokio::test]
async fn a_fast_reader_grows_its_window_while_an_idle_stream_keeps_the_initial_one() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (client, server) = pair(Duration::from_millis(10), 200e6, MuxConfig::default());
    wait_for_rtt(&server).await;
    let mut bulk = client.open().unwrap();
    let mut idle = client.open().unwrap();
    idle.write_all(b"x").await.unwrap();
    let mut bulk_in = server.accept().await.unwrap();
    let idle_in = server.accept().await.unwrap();
    let total = 24 * 1024 * 1024;
    let w = tokio::spawn(async move {
        let buf = vec![1u8; 64 * 1024];
        for _ in 0..total / buf.len() {
            bulk.write_all(&buf).await.unwrap();
        }
        bulk.shutdown().await.unwrap();
        bulk
    });
    let mut got = 0;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = bulk_in.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    assert_eq!(got, total);
    let _bulk = w.await.unwrap();
    assert!(bulk_in.window() >= 4 * WINDOW, "the bulk stream's window grew to {} only", bulk_in.window());
    assert_eq!(idle_in.window(), WINDOW, "an idle stream keeps the initial window");
}

#[tokio::test]
async fn the_session_budget_bounds_what_stalled_readers_hold_and_other_streams_keep_moving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let budget = 40 * 1024 * 1024;
    let cfg = MuxConfig { receive_budget: budget, ..MuxConfig::default() };
    let (client, server) = pair(Duration::from_millis(5), 400e6, cfg);
    wait_for_rtt(&server).await;
    // 100 streams whose readers read fast for a while (so windows grow), then stop for good.
    let mut stalled = Vec::new();
    for _ in 0..100 {
        let mut out = client.open().unwrap();
        tokio::spawn(async move {
            let buf = vec![2u8; 64 * 1024];
            while out.write_all(&buf).await.is_ok() {}
        });
        let mut inp = server.accept().await.unwrap();
        stalled.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let mut n = 0;
            while n < 2 * 1024 * 1024 {
                n += inp.read(&mut buf).await.unwrap();
            }
            inp // keep it open, never read again
        }));
    }
    let mut held = Vec::new();
    for h in stalled {
        held.push(h.await.unwrap());
    }
    // Let every stalled stream fill whatever window it has.
    let mut peak = 0;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(25)).await;
        let st = server.stats();
        peak = peak.max(st.buffered);
        assert!(st.granted <= budget.max(100 * WINDOW as usize), "granted {} with a budget of {budget}", st.granted);
    }
    assert!(peak <= budget, "stalled readers hold {peak} bytes with a budget of {budget}");
    assert!(peak >= 100 * WINDOW as usize / 2, "the streams did fill their windows ({peak})");
    // Another stream still moves 8 MiB both ways, hashed.
    let mut a = client.open().unwrap();
    let mut b = server.accept().await.unwrap();
    let data: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let expect = data.clone();
    let t0 = Instant::now();
    let w = tokio::spawn(async move {
        a.write_all(&data).await.unwrap();
        a.shutdown().await.unwrap();
        a
    });
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), b.read_to_end(&mut got)).await.expect("the fresh stream is not starved").unwrap();
    assert!(got == expect, "bytes differ");
    let _ = w.await;
    eprintln!("8 MiB beside 100 stalled streams in {:?} (peak buffered {peak} bytes, budget {budget})", t0.elapsed());
    drop(held);
}

#[tokio::test]
async fn an_interactive_stream_is_not_held_behind_a_bulk_stream() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let delay = Duration::from_millis(2);
    let rate = 50e6;
    let cfg = MuxConfig::default();
    let (client, server) = pair(delay, rate, cfg.clone());
    wait_for_rtt(&server).await;
    // Bulk: the client pushes without end; the server reads and discards.
    let mut bulk = client.open().unwrap();
    bulk.write_all(b"b").await.unwrap();
    let mut bulk_in = server.accept().await.unwrap();
    let pusher = tokio::spawn(async move {
        let buf = vec![3u8; 64 * 1024];
        while bulk.write_all(&buf).await.is_ok() {}
    });
    let sinker = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while bulk_in.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    });
    tokio::time::sleep(Duration::from_millis(300)).await; // the bulk queue is full by now
    let mut ping = client.open().unwrap();
    ping.write_all(b"p").await.unwrap();
    let mut pong = server.accept().await.unwrap();
    let echo = tokio::spawn(async move {
        let mut b = [0u8; 1];
        while pong.read_exact(&mut b).await.is_ok() {
            if pong.write_all(&b).await.is_err() {
                return;
            }
        }
    });
    let mut one = [0u8; 1];
    ping.read_exact(&mut one).await.unwrap();
    // Without fair sending a round trip waits behind the whole write budget: write_budget / rate.
    let behind_budget = Duration::from_secs_f64(cfg.write_budget as f64 / rate);
    // Twice the link's round trip plus half the budget's drain: fair sending stays far below it,
    // and a loaded CI machine's scheduling jitter (a few ms per wake-up) stays inside it too.
    let bound = delay * 2 + behind_budget / 2 + Duration::from_millis(15);
    let mut worst = Duration::ZERO;
    let mut times = Vec::new();
    for i in 0..100u8 {
        let t = Instant::now();
        ping.write_all(&[i]).await.unwrap();
        ping.read_exact(&mut one).await.unwrap();
        assert_eq!(one[0], i);
        let rt = t.elapsed();
        worst = worst.max(rt);
        times.push(rt);
    }
    times.sort();
    eprintln!("round trips beside a bulk stream: p50 {:?}, max {worst:?} (bound {bound:?}, queue-behind-budget {behind_budget:?})", times[50]);
    assert!(worst < bound, "a round trip took {worst:?}, more than {bound:?}");
    pusher.abort();
    sinker.abort();
    echo.abort();
}
