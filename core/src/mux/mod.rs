//! Many streams over one transport: the stream table, per-stream credit flow control with
//! auto-tuned windows, fair sending, half-close, reset and keepalive. Owned by a dialer or a
//! listener (client side, odd stream ids) or by the relay (server side, even ids); frames arrive
//! and leave through [`FrameSource`]/[`FrameSink`] supplied by `transport`.
//!
//! Data flow. A writer (`MuxStream::poll_write`, or the bridge's zero-copy
//! [`MuxStream::send_frame`]) waits for window credit, for room in its own send queue and for room
//! in the session's write budget, then queues a `Data` frame on its stream. One writer task per
//! session takes frames round-robin across streams (control frames first), so a bulk stream never
//! holds an interactive one behind its backlog, and flushes in batches. One reader task per session
//! decodes frames and files each under its stream; it never blocks, because a peer may only send
//! what we granted (a peer that exceeds its credit, or sends on a stream it never opened, breaks
//! the protocol and the session ends).
//!
//! Liveness does not depend on the transport: a keepalive task beside the writer drops the session
//! when the peer has been silent for `keepalive_timeout`, or when the transport has refused our
//! writes for that long (a peer that stopped reading). When a session ends every stream fails with
//! the reason, every waiting reader and writer wakes, and the tasks and the transport are freed.
//!
//! Memory per session is bounded by the settings (see [`MuxConfig`]): received data waits in at
//! most `max(receive_budget, open streams × WINDOW)` bytes of windows, small frames are copied out
//! of the transport's read buffer (so a stream of 1-byte frames cannot pin whole buffers), and at
//! most `write_budget` bytes wait to be sent.

mod flow;
mod stream;

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use flow::WINDOW;
use flow::{RecvFlow, Rtt};
pub use stream::MuxStream;

use crate::error::{Error, ErrorCode};
use crate::protocol::{Frame, FrameKind, FRAME_HEADER};

/// Frames from the peer, one per WebSocket message.
pub type FrameSource = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;
/// Frames to the peer.
pub type FrameSink = Pin<Box<dyn Sink<Bytes, Error = io::Error> + Send>>;

/// Largest payload of one `Data` frame.
pub const MAX_DATA: usize = 128 * 1024;
/// Most data bytes one stream may have waiting for the writer task: enough to keep the transport
/// busy, small enough that round-robin sending keeps other streams' latency low.
const STREAM_QUEUE: usize = 256 * 1024;
/// Received chunks smaller than this are copied out of the transport's read buffer instead of
/// keeping the whole buffer alive (a stream of 1-byte frames would pin one buffer per byte).
const COPY_BELOW: usize = 8 * 1024;
/// Larger chunks are kept without copying while a stream holds fewer than this many such chunks
/// and its reader keeps up; once it falls behind they are copied, so a stalled stream pins at most
/// a couple of transport buffers.
const MAX_PINNED: usize = 2;
/// The largest ping payload a peer may send (ours are 8 bytes).
const MAX_PING: usize = 64;
/// Control frames queued before a peer's further pings, refused opens or late data count as
/// abuse (it asks for replies faster than it reads them).
const MAX_OWED_REPLIES: usize = 16 * 1024;
/// The longest reason a `GoAway` notice carries (bytes).
const MAX_NOTICE: usize = 512;
/// How often a session with open streams refreshes its round-trip estimate.
const RTT_REFRESH: Duration = Duration::from_secs(5);
/// Frames the writer hands to the transport before it flushes and lets other tasks run.
const WRITE_BATCH: usize = 64;

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
    /// Drop the session after this long without hearing from the peer, or after the transport
    /// refused our writes for this long.
    pub keepalive_timeout: Duration,
    /// Most streams open at once on this session (either direction).
    pub max_streams: usize,
    /// Most peer-opened streams waiting for `accept`.
    pub accept_backlog: usize,
    /// Most bytes of data queued for the transport across all streams.
    pub write_budget: usize,
    /// Largest receive window one stream may grow to (bytes).
    pub max_stream_window: u32,
    /// Most window all streams of the session may have granted together beyond their initial
    /// [`WINDOW`] each (bytes): the bound on received data waiting for readers.
    pub receive_budget: usize,
}

impl Default for MuxConfig {
    fn default() -> Self {
        MuxConfig {
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            max_streams: 4096,
            accept_backlog: 1024,
            write_budget: 4 * 1024 * 1024,
            max_stream_window: 16 * 1024 * 1024,
            receive_budget: 64 * 1024 * 1024,
        }
    }
}

/// Figures of one session, for tests, metrics and the benchmark.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Streams open (not yet finished both ways or reset).
    pub streams: usize,
    /// Received bytes waiting for readers, all streams.
    pub buffered: usize,
    /// Sum of the open streams' receive windows.
    pub granted: usize,
    /// Data bytes queued (or reserved) for the transport.
    pub queued: usize,
    /// Smoothed round-trip time, once measured.
    pub rtt: Option<Duration>,
}

/// One stream's state, kept in the session's table.
struct StreamState {
    flow: RecvFlow,
    /// Received data not yet read, in order, then `tail`; `true` marks a zero-copy chunk that
    /// keeps the transport's read buffer alive.
    recv: VecDeque<(Bytes, bool)>,
    /// Zero-copy chunks in `recv` (at most [`MAX_PINNED`]).
    pinned: usize,
    /// Small or late chunks, copied and coalesced.
    tail: BytesMut,
    /// Bytes in `recv` and `tail`.
    recv_bytes: usize,
    /// The peer half-closed (sent `Fin`).
    recv_fin: bool,
    /// Why the stream was reset (by the peer, locally, or because the session ended).
    reset: Option<(ErrorCode, String)>,
    /// Bytes we may still send.
    send_credit: u32,
    /// We half-closed (our `Fin` is queued or sent).
    sent_fin: bool,
    /// Frames waiting for the writer task, in order (`Open`, `Data`, `Fin`, drop-time `Rst`).
    queue: VecDeque<Bytes>,
    /// Data bytes in `queue` plus `reserved`.
    queued: usize,
    /// Budget reserved by `poll_reserve` and not yet spent.
    reserved: usize,
    /// In the session's round-robin ring (or being served by the writer).
    scheduled: bool,
    /// Our `Open` has been handed to the transport (always true for peer-opened streams).
    open_sent: bool,
    /// A [`MuxStream`] handle exists.
    handle: bool,
    /// Finished both ways or reset: no longer counted as open.
    retired: bool,
    read_waker: Option<Waker>,
    write_waker: Option<Waker>,
    cut_waker: Option<Waker>,
}

impl StreamState {
    fn new(open_sent: bool) -> StreamState {
        StreamState {
            flow: RecvFlow::new(Instant::now()),
            recv: VecDeque::new(),
            pinned: 0,
            tail: BytesMut::new(),
            recv_bytes: 0,
            recv_fin: false,
            reset: None,
            send_credit: WINDOW,
            sent_fin: false,
            queue: VecDeque::new(),
            queued: 0,
            reserved: 0,
            scheduled: false,
            open_sent,
            handle: true,
            retired: false,
            read_waker: None,
            write_waker: None,
            cut_waker: None,
        }
    }

    fn finished(&self) -> bool {
        self.reset.is_some() || (self.recv_fin && self.sent_fin)
    }

    fn wake_all(&mut self) {
        for w in [self.read_waker.take(), self.write_waker.take(), self.cut_waker.take()].into_iter().flatten() {
            w.wake();
        }
    }

    fn fail(&mut self, code: ErrorCode, why: &str) {
        if self.reset.is_none() {
            self.reset = Some((code, why.to_string()));
        }
        self.wake_all();
    }
}

/// Everything mutable about a session, under one lock (as h2 does): the stream table, the send
/// scheduler and the budgets. Critical sections are short and never await.
struct Inner {
    streams: HashMap<u32, StreamState>,
    /// Streams not yet retired.
    live: usize,
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
    /// `Window`, `Ping`, `Pong`, `GoAway` and protocol `Rst` frames: sent before stream frames.
    control: VecDeque<Bytes>,
    /// Streams with frames queued, served round-robin.
    ready: VecDeque<u32>,
    /// Data bytes queued or reserved across streams (bounded by `write_budget`).
    queued_total: usize,
    /// Writers waiting for room in the write budget.
    budget_waiters: Vec<Waker>,
    /// The writer task, waiting for frames.
    writer_waker: Option<Waker>,
    /// Sum of the live streams' receive windows.
    granted: usize,
    /// Received bytes waiting for readers.
    buffered: usize,
    /// Credit the peer still had on streams we closed while it was sending: late data on closed
    /// streams is allowed up to this much (and answered with `Rst`), never more.
    late_credit: u64,
    rtt: Rtt,
}

impl Inner {
    fn wake_writer(&mut self) {
        if let Some(w) = self.writer_waker.take() {
            w.wake();
        }
    }

    fn wake_budget_waiters(&mut self) {
        for w in self.budget_waiters.drain(..) {
            w.wake();
        }
    }

    fn push_control(&mut self, frame: Bytes) {
        if self.closed.is_none() {
            self.control.push_back(frame);
            self.wake_writer();
        }
    }

    /// Queue a reply the peer asked for; refuses (a protocol error) when the peer asks faster
    /// than it reads the answers.
    fn owe_reply(&mut self, frame: Bytes) -> Result<(), String> {
        if self.control.len() >= MAX_OWED_REPLIES {
            return Err(format!("the peer has {} pings, refused opens or late frames unanswered: it asks faster than it reads", self.control.len()));
        }
        self.push_control(frame);
        Ok(())
    }

    /// Queue a frame of stream `id` behind its earlier frames.
    fn enqueue(&mut self, id: u32, frame: Bytes) {
        if self.closed.is_some() {
            return;
        }
        let Some(st) = self.streams.get_mut(&id) else { return };
        st.queue.push_back(frame);
        if !st.scheduled {
            st.scheduled = true;
            self.ready.push_back(id);
        }
        self.wake_writer();
    }

    fn has_frames(&self) -> bool {
        !self.control.is_empty() || !self.ready.is_empty()
    }

    /// The next frame for the transport: control frames first, then one frame of the next ready
    /// stream in round-robin order.
    fn next_frame(&mut self, write_budget: usize) -> Option<Bytes> {
        if let Some(f) = self.control.pop_front() {
            return Some(f);
        }
        while let Some(id) = self.ready.pop_front() {
            let Some(st) = self.streams.get_mut(&id) else { continue };
            let Some(frame) = st.queue.pop_front() else {
                st.scheduled = false;
                continue;
            };
            match FrameKind::of(&frame) {
                Some(FrameKind::Data) => {
                    let n = frame.len() - FRAME_HEADER;
                    st.queued -= n;
                    self.queued_total -= n;
                    if st.queued < STREAM_QUEUE {
                        if let Some(w) = st.write_waker.take() {
                            w.wake();
                        }
                    }
                }
                Some(FrameKind::Open) => st.open_sent = true,
                _ => {}
            }
            let more = !st.queue.is_empty();
            if !more {
                st.scheduled = false;
            }
            if self.queued_total < write_budget && !self.budget_waiters.is_empty() {
                self.wake_budget_waiters();
            }
            if !more {
                self.forget_if_done(id);
            } else {
                self.ready.push_back(id);
            }
            return Some(frame);
        }
        None
    }

    /// Retire a stream that has finished (no longer counted as open, its window returned to the
    /// budget) and drop it from the table once nothing refers to it.
    fn forget_if_done(&mut self, id: u32) {
        let Some(st) = self.streams.get_mut(&id) else { return };
        if st.finished() && !st.retired {
            st.retired = true;
            self.live -= 1;
            self.granted -= st.flow.window() as usize;
        }
        if st.retired && !st.handle && st.queue.is_empty() {
            let st = self.streams.remove(&id).expect("present");
            self.buffered -= st.recv_bytes;
            self.queued_total -= st.queued;
            if !st.recv_fin {
                self.late_credit += u64::from(st.flow.credit());
            }
        }
    }

    /// Drop a stream's queued data frames (it was reset): their budget is returned.
    fn discard_queue(&mut self, id: u32) {
        let Some(st) = self.streams.get_mut(&id) else { return };
        let dropped = st.queued - st.reserved;
        st.queue.clear();
        st.queued = st.reserved;
        self.queued_total -= dropped;
        self.wake_budget_waiters();
    }

    /// Drop what a stream has received and not read (it was reset locally).
    fn discard_received(&mut self, id: u32) {
        let Some(st) = self.streams.get_mut(&id) else { return };
        self.buffered -= st.recv_bytes;
        st.recv.clear();
        st.pinned = 0;
        st.tail = BytesMut::new();
        st.recv_bytes = 0;
    }

    fn stats(&self) -> SessionStats {
        SessionStats { streams: self.live, buffered: self.buffered, granted: self.granted, queued: self.queued_total, rtt: self.rtt.get() }
    }
}

/// The state shared by a session's tasks and its streams.
struct Shared {
    role: Role,
    cfg: MuxConfig,
    inner: Mutex<Inner>,
    /// Cancels the reader and writer tasks.
    cancel: CancellationToken,
    /// Time origin of the session (ping timestamps, the atomics below).
    epoch: Instant,
    /// When the peer was last heard from (ns since `epoch`).
    last_heard: AtomicU64,
    /// Since when the transport has refused our writes (ns since `epoch` + 1), 0 when it takes them.
    write_blocked_since: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn nanos(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn closed_error(&self) -> Option<Error> {
        self.lock().closed.as_ref().map(|(c, m)| Error::new(*c, m.clone()))
    }

    /// End the session: fail every stream, stop accepting, wake every waiter, stop the tasks.
    /// Handles keep what they already received (a finished stream still reads to its end).
    fn close(&self, code: ErrorCode, why: String) {
        let mut inner = self.lock();
        if inner.closed.is_some() {
            return;
        }
        inner.closed = Some((code, why.clone()));
        inner.accept_tx = None;
        inner.ready.clear();
        let ids: Vec<u32> = inner.streams.keys().copied().collect();
        for id in ids {
            inner.discard_queue(id);
            let st = inner.streams.get_mut(&id).expect("present");
            st.reserved = 0;
            st.queued = 0;
            st.fail(code, &why);
            inner.forget_if_done(id);
        }
        inner.queued_total = 0;
        inner.wake_budget_waiters();
        inner.wake_writer();
        drop(inner);
        self.cancel.cancel();
    }

    fn send_ping(&self) {
        let payload = self.nanos().to_be_bytes();
        self.lock().push_control(Frame::encode(FrameKind::Ping, 0, &payload));
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
        let (accept_tx, accept_rx) = mpsc::channel(config.accept_backlog.max(1));
        let shared = Arc::new(Shared {
            role,
            inner: Mutex::new(Inner {
                streams: HashMap::new(),
                live: 0,
                next_id: if role == Role::Client { 1 } else { 2 },
                peer_last: 0,
                accept_tx: Some(accept_tx),
                go_away: false,
                notice: None,
                closed: None,
                control: VecDeque::new(),
                ready: VecDeque::new(),
                queued_total: 0,
                budget_waiters: Vec::new(),
                writer_waker: None,
                granted: 0,
                buffered: 0,
                late_credit: 0,
                rtt: Rtt::default(),
            }),
            cfg: MuxConfig { write_budget: config.write_budget.max(MAX_DATA), max_stream_window: config.max_stream_window.max(WINDOW), ..config },
            cancel: CancellationToken::new(),
            epoch: Instant::now(),
            last_heard: AtomicU64::new(0),
            write_blocked_since: AtomicU64::new(0),
        });
        // A first ping measures the round trip before any stream needs a bigger window.
        shared.send_ping();
        tokio::spawn(reader_task(shared.clone(), source));
        tokio::spawn(writer_task(shared.clone(), sink));
        Session { shared, accept_rx: Arc::new(tokio::sync::Mutex::new(accept_rx)) }
    }

    /// Open a stream to the peer. Costs no round trip: the `Open` frame goes out with the first data.
    pub fn open(&self) -> Result<MuxStream, Error> {
        let mut inner = self.shared.lock();
        if let Some((code, msg)) = &inner.closed {
            return Err(Error::new(*code, msg.clone()));
        }
        if inner.go_away {
            return Err(Error::new(
                ErrorCode::RelayUnavailable,
                "the relay is shutting down and takes no new streams; retry to reach another relay session",
            ));
        }
        if inner.live >= self.shared.cfg.max_streams {
            return Err(Error::new(
                ErrorCode::General,
                format!("this session already has {} open streams (the limit); close some first", self.shared.cfg.max_streams),
            ));
        }
        let id = inner.next_id;
        if id > u32::MAX - 2 {
            return Err(Error::new(ErrorCode::RelayUnavailable, "stream ids on this session are used up; open a new session"));
        }
        inner.next_id += 2;
        inner.streams.insert(id, StreamState::new(false));
        inner.live += 1;
        inner.granted += WINDOW as usize;
        // Streams enter the round-robin ring in id order with their `Open` first, so ids reach
        // the peer in increasing order (it kills the session otherwise).
        inner.enqueue(id, Frame::encode(FrameKind::Open, id, &[]));
        drop(inner);
        Ok(MuxStream::new(self.shared.clone(), id))
    }

    /// Wait for the next stream the peer opens; `None` once the session has ended.
    pub async fn accept(&self) -> Option<MuxStream> {
        self.accept_rx.lock().await.recv().await
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed.is_some()
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
        self.shared.lock().live
    }

    /// The session's figures now (open streams, buffered, granted and queued bytes, RTT).
    pub fn stats(&self) -> SessionStats {
        self.shared.lock().stats()
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
        self.shared.lock().push_control(Frame::encode(FrameKind::GoAway, 0, &[]));
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
        self.shared.lock().push_control(Frame::encode(FrameKind::GoAway, 0, &payload));
        self.shared.close(code, why);
    }
}

/// Decode a `GoAway` payload: `[code u32 BE][reason UTF-8]`, or empty for a plain drain.
fn decode_notice(payload: &[u8]) -> Option<(ErrorCode, String)> {
    let n = u32::from_be_bytes(payload.get(..4)?.try_into().ok()?);
    let code = ErrorCode::from_number(n)?;
    let why = String::from_utf8_lossy(&payload[4..payload.len().min(4 + MAX_NOTICE)]).into_owned();
    Some((code, why))
}

async fn reader_task(shared: Arc<Shared>, mut source: FrameSource) {
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
        shared.last_heard.store(shared.nanos(), Relaxed);
        let frame = match Frame::decode(bytes) {
            Ok(f) => f,
            Err(e) => break (ErrorCode::Protocol, e.message().to_string()),
        };
        if let Err(why) = on_frame(&shared, frame) {
            break (ErrorCode::Protocol, why);
        }
    };
    // A peer that announced why it is closing (a `GoAway` notice) is believed over the bare
    // transport end that follows it; one that only drained (a plain `GoAway`: a relay shutting
    // down or restarting) is named as such, not as a session that merely ended.
    let (notice, drained) = {
        let mut inner = shared.lock();
        (inner.notice.take(), inner.go_away)
    };
    let (code, why) = match notice {
        Some((c, w)) if code == ErrorCode::RelayUnavailable => (c, w),
        None if drained && code == ErrorCode::RelayUnavailable => {
            let who = if shared.role == Role::Client { "the relay" } else { "the peer" };
            (code, format!("{who} drained the session and closed it (a graceful shutdown or restart)"))
        }
        _ => (code, why),
    };
    tracing::debug!(%code, %why, "mux session ended");
    shared.close(code, why);
}

/// Whether `id` names a stream that was opened at some point (by either side).
fn ever_opened(inner: &Inner, role: Role, id: u32) -> bool {
    let ours = (id % 2 == 1) == (role == Role::Client);
    id != 0 && if ours { id < inner.next_id } else { id <= inner.peer_last }
}

/// File one frame; `Err` is a protocol violation that ends the session.
fn on_frame(shared: &Arc<Shared>, f: Frame) -> Result<(), String> {
    if f.kind == FrameKind::Open {
        return on_open(shared, f.stream);
    }
    let mut inner = shared.lock();
    let inner = &mut *inner;
    match f.kind {
        FrameKind::Data => {
            let n = f.payload.len();
            if n > MAX_DATA {
                return Err(format!("peer sent a {n}-byte data frame (at most {MAX_DATA})"));
            }
            let Some(st) = inner.streams.get_mut(&f.stream) else {
                if !ever_opened(inner, shared.role, f.stream) {
                    return Err(format!("peer sent data on stream {}, which was never opened", f.stream));
                }
                // Late data on a stream we closed: allowed up to the credit the peer had.
                if inner.late_credit < n as u64 {
                    return Err(format!("peer sent {n} bytes on closed stream {} beyond the credit it had", f.stream));
                }
                inner.late_credit -= n as u64;
                return inner.owe_reply(Frame::rst(f.stream, ErrorCode::Closed));
            };
            if st.recv_fin {
                return Err(format!("peer sent data on stream {} after finishing it", f.stream));
            }
            if let Err(credit) = st.flow.on_data(n as u32) {
                return Err(format!("peer sent {n} bytes on stream {} with only {credit} bytes of window", f.stream));
            }
            if st.reset.is_some() || n == 0 {
                return Ok(()); // reset locally: the bytes have no reader
            }
            if st.pinned > 0 && st.recv.len() >= 2 {
                // The reader fell behind: copy the chunks that keep transport buffers alive (once
                // each), so a stalled stream holds what it buffered and no more.
                for (c, pinned) in st.recv.iter_mut().filter(|(_, p)| *p) {
                    *c = Bytes::copy_from_slice(c);
                    *pinned = false;
                }
                st.pinned = 0;
            }
            if n >= COPY_BELOW && st.pinned < MAX_PINNED {
                if !st.tail.is_empty() {
                    let copied = st.tail.split().freeze();
                    st.recv.push_back((copied, false));
                }
                st.recv.push_back((f.payload, true));
                st.pinned += 1;
            } else {
                st.tail.extend_from_slice(&f.payload);
                if st.tail.len() >= MAX_DATA {
                    let copied = st.tail.split().freeze();
                    st.recv.push_back((copied, false));
                }
            }
            st.recv_bytes += n;
            inner.buffered += n;
            if let Some(w) = st.read_waker.take() {
                w.wake();
            }
        }
        FrameKind::Window => {
            let inc = f.payload_u32().ok_or("malformed window frame")?;
            if let Some(st) = inner.streams.get_mut(&f.stream) {
                st.send_credit = st.send_credit.saturating_add(inc);
                if let Some(w) = st.write_waker.take() {
                    w.wake();
                }
            }
        }
        FrameKind::Fin => {
            if let Some(st) = inner.streams.get_mut(&f.stream) {
                if st.recv_fin {
                    return Err(format!("peer finished stream {} twice", f.stream));
                }
                st.recv_fin = true;
                if let Some(w) = st.read_waker.take() {
                    w.wake();
                }
                if let Some(w) = st.cut_waker.take() {
                    w.wake();
                }
                inner.forget_if_done(f.stream);
            }
        }
        FrameKind::Rst => {
            let code = f.payload_u32().and_then(ErrorCode::from_number).unwrap_or(ErrorCode::Closed);
            if inner.streams.get(&f.stream).is_some_and(|st| st.reset.is_none()) {
                inner.discard_queue(f.stream);
                let st = inner.streams.get_mut(&f.stream).expect("present");
                st.sent_fin = true;
                st.fail(code, "the peer reset the stream");
                inner.forget_if_done(f.stream);
            }
        }
        FrameKind::Open => unreachable!("opens are filed by on_open"),
        FrameKind::Ping => {
            if f.payload.len() > MAX_PING {
                return Err(format!("peer sent a {}-byte ping (at most {MAX_PING})", f.payload.len()));
            }
            return inner.owe_reply(Frame::encode(FrameKind::Pong, 0, &f.payload));
        }
        FrameKind::Pong => {
            if let Ok(sent) = <[u8; 8]>::try_from(&f.payload[..]) {
                let (sent, now) = (u64::from_be_bytes(sent), shared.nanos());
                if sent <= now && now - sent < 60_000_000_000 {
                    inner.rtt.sample(Duration::from_nanos(now - sent));
                }
            }
        }
        FrameKind::GoAway => {
            inner.go_away = true;
            if let Some(notice) = decode_notice(&f.payload) {
                inner.notice = Some(notice);
            }
        }
    }
    Ok(())
}

/// A stream the peer opens: hand it to `accept`, or refuse it.
fn on_open(shared: &Arc<Shared>, id: u32) -> Result<(), String> {
    let mut inner = shared.lock();
    let peer_parity = if shared.role == Role::Client { 0 } else { 1 };
    if id % 2 != peer_parity || id <= inner.peer_last {
        return Err(format!("peer opened stream {id}, which is not a fresh id of its own"));
    }
    inner.peer_last = id;
    let refuse = if inner.live >= shared.cfg.max_streams {
        Some(ErrorCode::General)
    } else if inner.accept_tx.is_none() {
        Some(ErrorCode::Closed)
    } else {
        None
    };
    if let Some(code) = refuse {
        return inner.owe_reply(Frame::rst(id, code));
    }
    inner.streams.insert(id, StreamState::new(true));
    inner.live += 1;
    inner.granted += WINDOW as usize;
    let tx = inner.accept_tx.clone().expect("checked above");
    drop(inner);
    if tx.try_send(MuxStream::new(shared.clone(), id)).is_err() {
        // Backlog full: the dropped handle resets the stream.
        tracing::debug!(stream = id, "accept backlog full; refusing stream");
    }
    Ok(())
}

/// Hand queued frames to the transport until it fails; returns only with its error.
async fn drive_writes(shared: &Shared, sink: &mut FrameSink) -> io::Result<()> {
    let budget = shared.cfg.write_budget;
    let blocked = |shared: &Shared| {
        let _ = shared.write_blocked_since.compare_exchange(0, shared.nanos() + 1, Relaxed, Relaxed);
    };
    let mut unflushed = false;
    poll_fn(|cx| {
        let mut batch = 0;
        loop {
            if !shared.lock().has_frames() || batch >= WRITE_BATCH {
                break;
            }
            match sink.as_mut().poll_ready(cx) {
                Poll::Pending => {
                    blocked(shared);
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => shared.write_blocked_since.store(0, Relaxed),
            }
            let Some(frame) = shared.lock().next_frame(budget) else { break };
            sink.as_mut().start_send(frame)?;
            unflushed = true;
            batch += 1;
        }
        if unflushed {
            match sink.as_mut().poll_flush(cx) {
                Poll::Pending => {
                    blocked(shared);
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    unflushed = false;
                    shared.write_blocked_since.store(0, Relaxed);
                }
            }
        }
        let mut inner = shared.lock();
        if inner.has_frames() {
            // More to send: yield to other tasks, then carry on.
            cx.waker().wake_by_ref();
        } else {
            inner.writer_waker = Some(cx.waker().clone());
        }
        Poll::Pending
    })
    .await
}

/// Ping when the session is quiet, refresh the round-trip estimate, and end the session when the
/// peer has been silent, or has not taken our writes, for `keepalive_timeout`. Returns once it
/// has closed the session.
async fn keepalive(shared: &Shared) {
    let cfg = &shared.cfg;
    let period = cfg.keepalive_interval.min(cfg.keepalive_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_ping = Instant::now();
    loop {
        tick.tick().await;
        let now = shared.nanos();
        let silent = Duration::from_nanos(now.saturating_sub(shared.last_heard.load(Relaxed)));
        if silent >= cfg.keepalive_timeout {
            shared.close(
                ErrorCode::RelayUnavailable,
                format!("the peer sent nothing for {}s (keepalive timeout); the session is dropped", silent.as_secs()),
            );
            return;
        }
        let since = shared.write_blocked_since.load(Relaxed);
        if since != 0 {
            let stalled = Duration::from_nanos(now.saturating_sub(since - 1));
            if stalled >= cfg.keepalive_timeout {
                shared.close(
                    ErrorCode::RelayUnavailable,
                    format!("the peer has not read from the session for {}s (write stall); the session is dropped", stalled.as_secs()),
                );
                return;
            }
        }
        let busy = shared.lock().live > 0;
        if silent >= cfg.keepalive_interval || (busy && last_ping.elapsed() >= RTT_REFRESH) {
            shared.send_ping();
            last_ping = Instant::now();
        }
    }
}

async fn writer_task(shared: Arc<Shared>, mut sink: FrameSink) {
    let result = tokio::select! {
        r = drive_writes(&shared, &mut sink) => r,
        () = keepalive(&shared) => Ok(()),
        () = shared.cancel.cancelled() => Ok(()),
    };
    match result {
        Ok(()) => {
            // Control frames queued before the close (a `GoAway` notice, resets) still go out,
            // if the transport takes them within a second.
            let flush_and_close = async {
                loop {
                    let next = shared.lock().control.pop_front();
                    let Some(f) = next else { break };
                    if sink.feed(f).await.is_err() {
                        return;
                    }
                }
                let _ = sink.close().await;
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), flush_and_close).await;
        }
        Err(e) => shared.close(ErrorCode::RelayUnavailable, format!("writing to the session's transport failed: {e}")),
    }
    shared.lock().control.clear();
}

#[cfg(test)]
mod tests;
