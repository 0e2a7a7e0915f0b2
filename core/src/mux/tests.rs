//! Tests of the driver ([`Session`] over real in-memory transports, on Tokio): hostile and stuck
//! transports, wake-ups of blocked readers and writers, buffers, drain. The protocol itself
//! (flow control, fairness, deadlines, resets) is tested on the virtual clock in `harness`.

use std::io;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::{stream, SinkExt};
use tokio::sync::mpsc;

use super::connection::{MAX_OWED_REPLIES, MAX_PING};
use super::frame::{Frame, FrameKind, FRAME_HEADER};
use super::*;
use crate::error::ErrorCode;

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
    // The driver holds at most one write batch besides what the connection queues.
    for _ in 0..MAX_OWED_REPLIES + session::WRITE_BATCH + 16 {
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
async fn tiny_frames_do_not_pin_the_transport_buffers_they_came_in() {
    let (tx, session) = stuck_peer(MuxConfig::default());
    tx.send(Ok(Frame::encode(FrameKind::Open, 1, &[]))).expect("send");
    let mut s = session.accept().await.expect("a stream");
    // Each 1-byte frame is cut from its own 1 MiB "read buffer", as a transport would deliver it.
    // The test keeps every buffer alive, so its memory cannot be reused for a copy.
    let (mut buffers, mut alive) = (Vec::new(), Vec::new());
    for i in 0..64u8 {
        let mut big = BytesMut::zeroed(1024 * 1024);
        big[..FRAME_HEADER].copy_from_slice(&Frame::encode(FrameKind::Data, 1, &[])[..]);
        big[FRAME_HEADER] = i;
        let big = big.freeze();
        buffers.push(big.as_ptr_range());
        alive.push(big.clone());
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

#[tokio::test]
async fn drain_ends_when_the_last_stream_ends_without_polling() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (c2s_tx, c2s_rx) = mpsc::channel::<Bytes>(64);
    let (s2c_tx, s2c_rx) = mpsc::channel::<Bytes>(64);
    let pipe =
        |rx: mpsc::Receiver<Bytes>| -> FrameSource { Box::pin(stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (Ok(x), rx)) })) };
    let sink = |tx: mpsc::Sender<Bytes>| -> FrameSink {
        Box::pin(tokio_util::sync::PollSender::new(tx).sink_map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe)))
    };
    let client = Session::new(Role::Client, pipe(s2c_rx), sink(c2s_tx), MuxConfig::default());
    let server = Session::new(Role::Server, pipe(c2s_rx), sink(s2c_tx), MuxConfig::default());
    let mut a = client.open().unwrap();
    a.write_all(b"ping").await.unwrap();
    let mut b = server.accept().await.unwrap();
    let mut buf = [0u8; 4];
    b.read_exact(&mut buf).await.unwrap();
    server.go_away();
    let drain = tokio::spawn({
        let server = server.clone();
        async move {
            let t = Instant::now();
            (server.drain(Duration::from_secs(10), "draining").await, t.elapsed())
        }
    });
    tokio::task::yield_now().await;
    assert!(!drain.is_finished(), "a stream is still open");
    b.write_all(b"pong").await.unwrap();
    b.shutdown().await.unwrap();
    let mut got = Vec::new();
    a.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"pong");
    a.shutdown().await.unwrap();
    let (drained, took) = tokio::time::timeout(Duration::from_secs(5), drain).await.expect("drain ends").unwrap();
    assert!(drained, "drained in time");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(server.is_closed());
    assert_eq!(server.close_reason().unwrap().code(), ErrorCode::Closed);
    tokio::time::timeout(Duration::from_secs(5), client.closed()).await.expect("the client sees the end");
}
