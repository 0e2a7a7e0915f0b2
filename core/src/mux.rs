//! Many streams over one transport: the stream table, per-stream credit flow control, half-close,
//! reset and keepalive. Owned by a dialer (client side, odd stream ids) or by the relay (server
//! side, even ids); frames arrive and leave through [`FrameSource`]/[`FrameSink`] supplied by
//! `transport`.
//!
//! Data flow: a writer (`MuxStream::poll_write` or the zero-copy [`MuxStream::send_frame`]) waits
//! for window credit and for room in the session's write budget, then queues a `Data` frame; one
//! writer task per session feeds queued frames to the sink and flushes when the queue is empty. One
//! reader task per session decodes frames and files each under its stream; it never blocks, because
//! a peer may only send what we granted (a peer that exceeds its credit kills the session).
//!
//! Memory is bounded by construction: per stream, at most [`WINDOW`] bytes are buffered for the
//! reader; per session, at most `write_budget` bytes of data wait for the transport.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::{CancellationToken, PollSemaphore};

use crate::error::{Error, ErrorCode};
use crate::protocol::{Frame, FrameKind, FRAME_HEADER};

/// Frames from the peer, one per WebSocket message.
pub type FrameSource = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;
/// Frames to the peer.
pub type FrameSink = Pin<Box<dyn Sink<Bytes, Error = io::Error> + Send>>;

/// Receive window per stream, in bytes: the most a peer may send before we grant more. Both sides
/// start every stream with this much credit (a protocol constant of `libtunnel.v1`).
pub const WINDOW: u32 = 256 * 1024;
/// Largest payload of one `Data` frame.
pub const MAX_DATA: usize = 64 * 1024;
/// Send a `Window` grant once this much has been read.
const WINDOW_UPDATE_AT: u32 = WINDOW / 4;

/// Which end of the session we are (decides stream id parity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Opened the transport (dialer, listener): odd stream ids.
    Client,
    /// Accepted the transport (relay): even stream ids.
    Server,
}

/// Tunables of a session.
#[derive(Debug, Clone)]
pub struct MuxConfig {
    /// Send a ping after this long without hearing from the peer.
    pub keepalive_interval: Duration,
    /// Drop the session after this long without hearing from the peer.
    pub keepalive_timeout: Duration,
    /// Most streams open at once on this session (either direction).
    pub max_streams: usize,
    /// Most peer-opened streams waiting for `accept`.
    pub accept_backlog: usize,
    /// Most bytes of data queued for the transport across all streams.
    pub write_budget: usize,
}

impl Default for MuxConfig {
    fn default() -> Self {
        MuxConfig {
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            max_streams: 4096,
            accept_backlog: 1024,
            write_budget: 4 * 1024 * 1024,
        }
    }
}

/// Per-stream state shared between the stream handle and the session's reader task.
#[derive(Default)]
struct StreamState {
    /// Received data not yet read by the application (bounded by `WINDOW`).
    recv: VecDeque<Bytes>,
    /// How much more the peer may send before we grant more credit.
    recv_window: u32,
    /// Read by the app since the last `Window` grant.
    consumed: u32,
    /// The peer half-closed (sent `Fin`).
    recv_fin: bool,
    /// The stream was reset (by the peer, or because the session died).
    reset: Option<Error>,
    /// Bytes we may still send.
    send_credit: u32,
    /// We half-closed (sent `Fin`).
    sent_fin: bool,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
}

struct StreamShared {
    id: u32,
    st: Mutex<StreamState>,
}

impl StreamShared {
    fn new(id: u32) -> Arc<StreamShared> {
        Arc::new(StreamShared { id, st: Mutex::new(StreamState { recv_window: WINDOW, send_credit: WINDOW, ..Default::default() }) })
    }

    fn lock(&self) -> MutexGuard<'_, StreamState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, err: Error) {
        let mut st = self.lock();
        if st.reset.is_none() {
            st.reset = Some(err);
        }
        wake_all(&mut st);
    }
}

fn wake_all(st: &mut StreamState) {
    if let Some(w) = st.read_waker.take() {
        w.wake();
    }
    if let Some(w) = st.write_waker.take() {
        w.wake();
    }
}

struct Table {
    streams: HashMap<u32, Arc<StreamShared>>,
    next_id: u32,
    /// Highest id the peer has opened (peer ids must increase).
    peer_last: u32,
    /// Where peer-opened streams go; `None` once the session is closed.
    accept_tx: Option<mpsc::Sender<MuxStream>>,
    /// The peer sent `GoAway`: open no new streams.
    go_away: bool,
    /// The code and reason a peer's `GoAway` carried: why the session is about to end.
    notice: Option<(ErrorCode, String)>,
    /// Why the session ended, once it has.
    closed: Option<(ErrorCode, String)>,
}

struct Shared {
    role: Role,
    table: Mutex<Table>,
    /// `Open`, `Data`, `Fin` and drop-time `Rst`: kept in order per stream.
    ordered_tx: mpsc::UnboundedSender<Bytes>,
    /// `Window`, `Ping`, `Pong`, `GoAway`, protocol `Rst`: may overtake data.
    control_tx: mpsc::UnboundedSender<Bytes>,
    /// Bytes of data queued for the transport; the writer task returns permits after sending.
    budget: Arc<Semaphore>,
    /// Cancels the reader and writer tasks.
    cancel: CancellationToken,
    /// Control frames queued and not yet written. Replies the peer asks for (`Pong`, `Rst` for
    /// refused opens) are refused past [`MAX_OWED_REPLIES`], so a peer that keeps asking without
    /// reading cannot grow the queue without bound.
    owed_replies: std::sync::atomic::AtomicUsize,
    max_streams: usize,
}

impl Shared {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn closed_error(&self) -> Option<Error> {
        self.table().closed.as_ref().map(|(c, m)| Error::new(*c, m.clone()))
    }

    /// Queue a control frame (counted until the writer takes it).
    fn send_control(&self, frame: Bytes) {
        self.owed_replies.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.control_tx.send(frame).is_err() {
            self.owed_replies.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Queue a reply the peer asked for; refuses (a protocol error) when the peer asks faster
    /// than it reads the answers.
    fn owe_reply(&self, frame: Bytes) -> Result<(), String> {
        let owed = self.owed_replies.load(std::sync::atomic::Ordering::Relaxed);
        if owed >= MAX_OWED_REPLIES {
            return Err(format!("the peer has {owed} pings or refused opens unanswered: it asks faster than it reads"));
        }
        self.send_control(frame);
        Ok(())
    }

    /// End the session: fail every stream, stop accepting, stop the tasks.
    fn close(&self, code: ErrorCode, why: String) {
        let streams: Vec<Arc<StreamShared>> = {
            let mut t = self.table();
            if t.closed.is_some() {
                return;
            }
            t.closed = Some((code, why.clone()));
            t.accept_tx = None;
            t.streams.drain().map(|(_, s)| s).collect()
        };
        for s in streams {
            s.fail(Error::new(code, why.clone()));
        }
        self.cancel.cancel();
    }

    fn remove(&self, id: u32) {
        self.table().streams.remove(&id);
    }
}

/// One multiplexed session over a transport. Cloning shares it.
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
    accept_rx: Arc<tokio::sync::Mutex<mpsc::Receiver<MuxStream>>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("role", &self.shared.role).field("closed", &self.is_closed()).finish()
    }
}

impl Session {
    /// Start a session over an authenticated transport: spawns its reader and writer tasks.
    pub fn new(role: Role, source: FrameSource, sink: FrameSink, config: MuxConfig) -> Session {
        let (ordered_tx, ordered_rx) = mpsc::unbounded_channel();
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let (accept_tx, accept_rx) = mpsc::channel(config.accept_backlog.max(1));
        let shared = Arc::new(Shared {
            role,
            table: Mutex::new(Table {
                streams: HashMap::new(),
                next_id: if role == Role::Client { 1 } else { 2 },
                peer_last: 0,
                accept_tx: Some(accept_tx),
                go_away: false,
                notice: None,
                closed: None,
            }),
            ordered_tx,
            control_tx,
            budget: Arc::new(Semaphore::new(config.write_budget.max(MAX_DATA))),
            cancel: CancellationToken::new(),
            owed_replies: std::sync::atomic::AtomicUsize::new(0),
            max_streams: config.max_streams,
        });
        let last_heard = Arc::new(Mutex::new(Instant::now()));
        tokio::spawn(reader_task(shared.clone(), source, last_heard.clone()));
        tokio::spawn(writer_task(shared.clone(), sink, ordered_rx, control_rx, last_heard, config));
        Session { shared, accept_rx: Arc::new(tokio::sync::Mutex::new(accept_rx)) }
    }

    /// Open a stream to the peer. Costs no round trip: the `Open` frame goes out with the first data.
    pub fn open(&self) -> Result<MuxStream, Error> {
        let mut t = self.shared.table();
        if let Some((code, msg)) = &t.closed {
            return Err(Error::new(*code, msg.clone()));
        }
        if t.go_away {
            return Err(Error::new(
                ErrorCode::RelayUnavailable,
                "the relay is shutting down and takes no new streams; retry to reach another relay session",
            ));
        }
        if t.streams.len() >= self.shared.max_streams {
            return Err(Error::new(
                ErrorCode::General,
                format!("this session already has {} open streams (the limit); close some first", self.shared.max_streams),
            ));
        }
        let id = t.next_id;
        if id > u32::MAX - 2 {
            return Err(Error::new(ErrorCode::RelayUnavailable, "stream ids on this session are used up; open a new session"));
        }
        t.next_id += 2;
        let s = StreamShared::new(id);
        t.streams.insert(id, s.clone());
        // Queue the `Open` before releasing the table: ids must reach the peer in increasing order
        // (it kills the session otherwise), and concurrent opens would race between the two.
        let _ = self.shared.ordered_tx.send(Frame::encode(FrameKind::Open, id, &[]));
        drop(t);
        Ok(MuxStream::new(s, self.shared.clone()))
    }

    /// Wait for the next stream the peer opens; `None` once the session has ended.
    pub async fn accept(&self) -> Option<MuxStream> {
        self.accept_rx.lock().await.recv().await
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.table().closed.is_some()
    }

    /// Why the session ended, if it has.
    pub fn close_reason(&self) -> Option<Error> {
        self.shared.closed_error()
    }

    /// Resolves when the session has ended.
    pub async fn closed(&self) {
        self.shared.cancel.cancelled().await
    }

    /// Number of streams currently open.
    pub fn stream_count(&self) -> usize {
        self.shared.table().streams.len()
    }

    /// Wait until every stream has finished (both directions, so no data is in flight) or
    /// `limit` passes, then close the session; returns whether it drained in time. The peer
    /// should have been told to open nothing new ([`Session::go_away`]).
    pub async fn drain(&self, limit: Duration, why: &str) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        // No event marks "the last stream ended"; a short tick bounds the wait (as the relay's
        // own drain does).
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let drained = loop {
            if self.is_closed() || self.stream_count() == 0 {
                break true;
            }
            if tokio::time::Instant::now() >= deadline {
                break false;
            }
            tick.tick().await;
        };
        self.close(ErrorCode::Closed, why);
        drained
    }

    /// Tell the peer we accept no new streams; existing streams continue.
    pub fn go_away(&self) {
        self.shared.send_control(Frame::encode(FrameKind::GoAway, 0, &[]));
    }

    /// End the session now; every open stream fails with `code`.
    pub fn close(&self, code: ErrorCode, why: impl Into<String>) {
        self.shared.close(code, why.into());
    }

    /// End the session and tell the peer why: a `GoAway` carrying `code` and `why` is sent before
    /// the transport closes, so the peer's [`Session::close_reason`] reports them instead of a bare
    /// "the peer closed the session" (a replaced listener uses it to stop reconnecting).
    pub fn close_with_notice(&self, code: ErrorCode, why: impl Into<String>) {
        let why = why.into();
        let mut payload = code.number().to_be_bytes().to_vec();
        payload.extend_from_slice(&why.as_bytes()[..why.len().min(MAX_NOTICE)]);
        self.shared.send_control(Frame::encode(FrameKind::GoAway, 0, &payload));
        self.shared.close(code, why);
    }
}

/// The largest ping payload a peer may send (ours are 8 bytes).
const MAX_PING: usize = 64;
/// Control frames queued before a peer's further pings or opens count as abuse.
const MAX_OWED_REPLIES: usize = 16 * 1024;

/// The longest reason a `GoAway` notice carries (bytes).
const MAX_NOTICE: usize = 512;

/// Decode a `GoAway` payload: `[code u32 BE][reason UTF-8]`, or empty for a plain drain.
fn decode_notice(payload: &[u8]) -> Option<(ErrorCode, String)> {
    let n = u32::from_be_bytes(payload.get(..4)?.try_into().ok()?);
    let code = ErrorCode::ALL.iter().copied().find(|c| c.number() == n)?;
    let why = String::from_utf8_lossy(&payload[4..payload.len().min(4 + MAX_NOTICE)]).into_owned();
    Some((code, why))
}

async fn reader_task(shared: Arc<Shared>, mut source: FrameSource, last_heard: Arc<Mutex<Instant>>) {
    let (code, why): (ErrorCode, String) = loop {
        let next = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            n = source.next() => n,
        };
        let bytes = match next {
            None => break (ErrorCode::RelayUnavailable, "the peer closed the session".to_string()),
            Some(Err(e)) => {
                let code = if e.kind() == io::ErrorKind::InvalidData { ErrorCode::Protocol } else { ErrorCode::RelayUnavailable };
                break (code, format!("the session's transport failed: {e}"));
            }
            Some(Ok(b)) => b,
        };
        *last_heard.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        let frame = match Frame::decode(bytes) {
            Ok(f) => f,
            Err(e) => break (ErrorCode::Protocol, e.message().to_string()),
        };
        if let Err(why) = on_frame(&shared, frame) {
            break (ErrorCode::Protocol, why);
        }
    };
    // A peer that announced why it is closing (a `GoAway` notice) is believed over the bare
    // transport end that follows it.
    let (code, why) = match shared.table().notice.take() {
        Some((c, w)) if code == ErrorCode::RelayUnavailable => (c, w),
        _ => (code, why),
    };
    tracing::debug!(%code, %why, "mux session ended");
    shared.close(code, why);
}

/// File one frame; `Err` is a protocol violation that ends the session.
fn on_frame(shared: &Arc<Shared>, f: Frame) -> Result<(), String> {
    match f.kind {
        FrameKind::Data => {
            let Some(s) = shared.table().streams.get(&f.stream).cloned() else {
                return Ok(()); // a stream we already closed: drop late data
            };
            let mut st = s.lock();
            let n = f.payload.len();
            if n > st.recv_window as usize {
                return Err(format!("peer sent {n} bytes on stream {} with only {} bytes of window", f.stream, st.recv_window));
            }
            if st.recv_fin {
                return Err(format!("peer sent data on stream {} after finishing it", f.stream));
            }
            st.recv_window -= n as u32;
            if n > 0 {
                st.recv.push_back(f.payload);
            }
            if let Some(w) = st.read_waker.take() {
                w.wake();
            }
        }
        FrameKind::Window => {
            let inc = f.payload_u32().ok_or("malformed window frame")?;
            if let Some(s) = shared.table().streams.get(&f.stream).cloned() {
                let mut st = s.lock();
                st.send_credit = st.send_credit.saturating_add(inc).min(16 * WINDOW);
                if let Some(w) = st.write_waker.take() {
                    w.wake();
                }
            }
        }
        FrameKind::Fin => {
            let s = shared.table().streams.get(&f.stream).cloned();
            if let Some(s) = s {
                let mut st = s.lock();
                st.recv_fin = true;
                let done = st.sent_fin;
                if let Some(w) = st.read_waker.take() {
                    w.wake();
                }
                drop(st);
                if done {
                    shared.remove(f.stream);
                }
            }
        }
        FrameKind::Rst => {
            let code = f.payload_u32().and_then(|n| ErrorCode::ALL.iter().copied().find(|c| c.number() == n)).unwrap_or(ErrorCode::Closed);
            let s = shared.table().streams.remove(&f.stream);
            if let Some(s) = s {
                s.fail(Error::new(code, "the peer reset the stream"));
            }
        }
        FrameKind::Open => {
            let id = f.stream;
            let peer_parity = if shared.role == Role::Client { 0 } else { 1 };
            let mut t = shared.table();
            if id % 2 != peer_parity || id <= t.peer_last {
                return Err(format!("peer opened stream {id}, which is not a fresh id of its own"));
            }
            t.peer_last = id;
            let refuse = if t.streams.len() >= shared.max_streams {
                Some(ErrorCode::General)
            } else if t.accept_tx.is_none() {
                Some(ErrorCode::Closed)
            } else {
                None
            };
            if let Some(code) = refuse {
                drop(t);
                return shared.owe_reply(Frame::rst(id, code));
            }
            let s = StreamShared::new(id);
            t.streams.insert(id, s.clone());
            let tx = t.accept_tx.clone().expect("checked above");
            drop(t);
            if tx.try_send(MuxStream::new(s, shared.clone())).is_err() {
                // backlog full: the dropped handle resets the stream
                tracing::debug!(stream = id, "accept backlog full; refusing stream");
            }
        }
        FrameKind::Ping => {
            if f.payload.len() > MAX_PING {
                return Err(format!("peer sent a {}-byte ping (at most {MAX_PING})", f.payload.len()));
            }
            return shared.owe_reply(Frame::encode(FrameKind::Pong, 0, &f.payload));
        }
        FrameKind::Pong => {}
        FrameKind::GoAway => {
            let mut t = shared.table();
            t.go_away = true;
            if let Some(notice) = decode_notice(&f.payload) {
                t.notice = Some(notice);
            }
        }
    }
    Ok(())
}

async fn writer_task(
    shared: Arc<Shared>,
    mut sink: FrameSink,
    mut ordered_rx: mpsc::UnboundedReceiver<Bytes>,
    mut control_rx: mpsc::UnboundedReceiver<Bytes>,
    last_heard: Arc<Mutex<Instant>>,
    config: MuxConfig,
) {
    let mut tick = tokio::time::interval(config.keepalive_interval.min(config.keepalive_timeout / 2).max(Duration::from_millis(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let budget = shared.budget.clone();
    let feed = |sink: &mut FrameSink, f: Bytes| {
        let data = if f.first() == Some(&(FrameKind::Data as u8)) { f.len() - FRAME_HEADER } else { 0 };
        let r = sink.as_mut().start_send(f);
        if data > 0 {
            budget.add_permits(data);
        }
        r
    };
    let result: io::Result<()> = async {
        loop {
            let first = tokio::select! {
                biased;
                _ = shared.cancel.cancelled() => return Ok(()),
                Some(f) = control_rx.recv() => { shared.owed_replies.fetch_sub(1, std::sync::atomic::Ordering::Relaxed); f }
                Some(f) = ordered_rx.recv() => f,
                _ = tick.tick() => {
                    let silent = last_heard.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
                    if silent >= config.keepalive_timeout {
                        shared.close(ErrorCode::RelayUnavailable, format!("the peer sent nothing for {}s (keepalive timeout); the session is dropped", silent.as_secs()));
                        return Ok(());
                    }
                    if silent < config.keepalive_interval {
                        continue;
                    }
                    Frame::encode(FrameKind::Ping, 0, &[0; 8])
                }
                else => return Ok(()),
            };
            poll_fn(|cx| sink.as_mut().poll_ready(cx)).await?;
            feed(&mut sink, first)?;
            // Drain whatever else is queued before flushing, so a burst costs one flush.
            for _ in 0..64 {
                let next = match control_rx.try_recv() {
                    Ok(f) => {
                        shared.owed_replies.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                        f
                    }
                    Err(_) => match ordered_rx.try_recv() {
                        Ok(f) => f,
                        Err(_) => break,
                    },
                };
                poll_fn(|cx| sink.as_mut().poll_ready(cx)).await?;
                feed(&mut sink, next)?;
            }
            poll_fn(|cx| sink.as_mut().poll_flush(cx)).await?;
        }
    }
    .await;
    match result {
        Ok(()) => {
            // Control frames queued before the close (a `GoAway` notice, resets) still go out.
            let flush_and_close = async {
                while let Ok(f) = control_rx.try_recv() {
                    if poll_fn(|cx| sink.as_mut().poll_ready(cx)).await.is_err() || feed(&mut sink, f).is_err() {
                        break;
                    }
                }
                let _ = sink.close().await;
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), flush_and_close).await;
        }
        Err(e) => shared.close(ErrorCode::RelayUnavailable, format!("writing to the session's transport failed: {e}")),
    }
}

/// One stream of a [`Session`]: `AsyncRead + AsyncWrite` with half-close via `shutdown`.
///
/// Dropping it finishes the write side (data already written is delivered) and, if the peer was
/// still sending, resets the stream so the peer stops.
pub struct MuxStream {
    s: Arc<StreamShared>,
    session: Arc<Shared>,
    budget: PollSemaphore,
    /// Budget permits acquired but not yet spent on a frame.
    reserved: usize,
    /// Part of a received chunk not yet handed to `poll_read`.
    partial: Bytes,
}

impl std::fmt::Debug for MuxStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxStream").field("id", &self.s.id).finish()
    }
}

impl MuxStream {
    fn new(s: Arc<StreamShared>, session: Arc<Shared>) -> MuxStream {
        let budget = PollSemaphore::new(session.budget.clone());
        MuxStream { s, session, budget, reserved: 0, partial: Bytes::new() }
    }

    /// The stream id on its session.
    pub fn id(&self) -> u32 {
        self.s.id
    }

    /// Abort the stream: the peer's reads and writes fail with `code`.
    pub fn reset(&mut self, code: ErrorCode) {
        let mut st = self.s.lock();
        if st.reset.is_none() {
            st.reset = Some(Error::new(ErrorCode::Closed, "the stream was reset locally"));
            st.sent_fin = true;
            drop(st);
            self.session.send_control(Frame::rst(self.s.id, code));
            self.session.remove(self.s.id);
        }
    }

    fn write_error(&self, st: &StreamState) -> Option<io::Error> {
        if let Some(e) = &st.reset {
            return Some(Error::new(e.code(), e.message().to_string()).into_io());
        }
        if st.sent_fin {
            return Some(io::Error::new(io::ErrorKind::BrokenPipe, "write after shutdown on a tunnel stream"));
        }
        None
    }

    /// Wait until up to `want` bytes may be sent (window credit and session budget). Returns how
    /// many; the reservation is spent by `send_frame`.
    pub fn poll_reserve(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        let want = want.clamp(1, MAX_DATA);
        let credit = {
            let mut st = self.s.lock();
            if let Some(e) = self.write_error(&st) {
                return Poll::Ready(Err(e));
            }
            if st.send_credit == 0 {
                // The reader task raises the credit under this same lock, then wakes us.
                st.write_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            st.send_credit as usize
        };
        let n = want.min(credit);
        if self.reserved < n {
            let extra = n - self.reserved;
            match self.budget.poll_acquire_many(cx, extra as u32) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "session closed"))),
                Poll::Ready(Some(p)) => {
                    p.forget();
                    self.reserved += extra;
                }
            }
        }
        Poll::Ready(Ok(n))
    }

    /// Send a `Data` frame built in place: `frame` holds [`FRAME_HEADER`] bytes of room followed by
    /// at most the reserved number of payload bytes. Zero-copy path used by the bridge.
    pub fn send_frame(&mut self, mut frame: BytesMut) -> io::Result<()> {
        let n = frame.len() - FRAME_HEADER;
        let mut st = self.s.lock();
        if let Some(e) = self.write_error(&st) {
            return Err(e);
        }
        assert!(n <= st.send_credit as usize && n <= self.reserved, "send_frame beyond reservation");
        st.send_credit -= n as u32;
        self.reserved -= n;
        drop(st);
        frame[0] = FrameKind::Data as u8;
        frame[1..FRAME_HEADER].copy_from_slice(&self.s.id.to_be_bytes());
        self.session.ordered_tx.send(frame.freeze()).map_err(|_| io::Error::new(io::ErrorKind::ConnectionReset, "session closed"))
    }

    /// Give back budget reserved but not used.
    pub fn release_reservation(&mut self) {
        if self.reserved > 0 {
            self.session.budget.add_permits(self.reserved);
            self.reserved = 0;
        }
    }

    /// The next received chunk, without copying; `None` at end of stream.
    pub fn poll_recv_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.partial.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.partial))));
        }
        let mut st = self.s.lock();
        if let Some(chunk) = st.recv.pop_front() {
            self.consumed(&mut st, chunk.len() as u32);
            return Poll::Ready(Ok(Some(chunk)));
        }
        if st.recv_fin {
            return Poll::Ready(Ok(None));
        }
        if let Some(e) = &st.reset {
            return Poll::Ready(Err(Error::new(e.code(), e.message().to_string()).into_io()));
        }
        st.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Await the next received chunk.
    pub async fn recv_chunk(&mut self) -> io::Result<Option<Bytes>> {
        poll_fn(|cx| self.poll_recv_chunk(cx)).await
    }

    fn consumed(&self, st: &mut StreamState, n: u32) {
        st.consumed += n;
        if st.consumed >= WINDOW_UPDATE_AT {
            let grant = st.consumed;
            st.consumed = 0;
            st.recv_window += grant;
            self.session.send_control(Frame::window(self.s.id, grant));
        }
    }

    /// Half-close: tell the peer we will write no more.
    pub fn finish(&mut self) {
        self.release_reservation();
        let mut st = self.s.lock();
        if st.sent_fin || st.reset.is_some() {
            return;
        }
        st.sent_fin = true;
        let done = st.recv_fin;
        drop(st);
        let _ = self.session.ordered_tx.send(Frame::encode(FrameKind::Fin, self.s.id, &[]));
        if done {
            self.session.remove(self.s.id);
        }
    }
}

impl AsyncRead for MuxStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let mut chunk = match this.poll_recv_chunk(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(None)) => return Poll::Ready(Ok(())),
            Poll::Ready(Ok(Some(c))) => c,
        };
        let n = chunk.len().min(buf.remaining());
        buf.put_slice(&chunk[..n]);
        chunk.advance(n);
        this.partial = chunk;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        let n = match this.poll_reserve(cx, buf.len()) {
            Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        let mut frame = BytesMut::with_capacity(FRAME_HEADER + n);
        frame.put_bytes(0, FRAME_HEADER);
        frame.put_slice(&buf[..n]);
        this.send_frame(frame)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.finish();
        Poll::Ready(Ok(()))
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        self.release_reservation();
        let st = self.s.lock();
        let (sent_fin, recv_done) = (st.sent_fin, st.recv_fin || st.reset.is_some());
        let was_reset = st.reset.is_some();
        drop(st);
        if !sent_fin && !was_reset {
            let _ = self.session.ordered_tx.send(Frame::encode(FrameKind::Fin, self.s.id, &[]));
        }
        if !recv_done {
            let _ = self.session.ordered_tx.send(Frame::rst(self.s.id, ErrorCode::Closed));
        }
        self.session.remove(self.s.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::stream;

    /// A transport whose reader we feed and whose writer never drains (a peer that stops reading).
    fn stuck_peer() -> (mpsc::UnboundedSender<io::Result<Bytes>>, Session) {
        let (tx, rx) = mpsc::unbounded_channel();
        let source: FrameSource = Box::pin(stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) }));
        let sink: FrameSink = Box::pin(futures_util::sink::unfold((), |(), _f: Bytes| std::future::pending::<io::Result<()>>()));
        (tx, Session::new(Role::Server, source, sink, MuxConfig::default()))
    }

    #[tokio::test]
    async fn a_peer_that_pings_without_reading_is_cut_off() {
        let (tx, session) = stuck_peer();
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
        let (tx, session) = stuck_peer();
        tx.send(Ok(Frame::encode(FrameKind::Ping, 0, &[0; MAX_PING + 1]))).expect("send");
        tokio::time::timeout(Duration::from_secs(10), session.closed()).await.expect("closed");
        assert_eq!(session.close_reason().expect("a reason").code(), ErrorCode::Protocol);
    }
}
