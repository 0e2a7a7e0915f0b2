//! [`Session`]: a [`Connection`] driven by one task over a transport, shared with its stream
//! handles. The driver owns the transport and polls, in one place, the transport's reads, its
//! writes (every ready frame gathered into one batch, flushed once), the connection's deadline
//! and the session's end, so a blocked write can never hide a deadline. Handles and the driver
//! share the connection under one short lock; the connection's events become wake-ups here, and
//! nowhere else.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::io;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Sink, SinkExt, Stream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::connection::{Connection, Event};
use super::{MuxConfig, MuxStream, Role, SessionStats};
use crate::error::{Error, ErrorCode};

/// Frames from the peer, one per WebSocket message.
pub type FrameSource = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;
/// Frames to the peer.
pub type FrameSink = Pin<Box<dyn Sink<Bytes, Error = io::Error> + Send>>;

/// Messages the driver takes from the transport before it hands them to the connection.
const READ_BATCH: usize = 64;
/// Most frames the driver gathers into one write (one flush).
pub(super) const WRITE_BATCH: usize = 256;
/// Bytes after which the driver stops gathering: a frame queued meanwhile waits behind one batch
/// at most (about 0.4 ms at 600 MB/s), so round-robin fairness survives batching.
const WRITE_BATCH_BYTES: usize = 256 * 1024;
/// Rounds of reading and writing in one poll of the driver before it yields to other tasks.
const ROUNDS: usize = 8;
/// How long the frames queued before the end (a `GoAway` notice, resets) may take to leave.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// Who waits for what.
#[derive(Default)]
struct Wakers {
    read: HashMap<u32, Waker>,
    write: HashMap<u32, Waker>,
    cut: HashMap<u32, Waker>,
    budget: Vec<Waker>,
    accept: Vec<Waker>,
    driver: Option<Waker>,
}

fn wake(w: Option<Waker>) {
    if let Some(w) = w {
        w.wake();
    }
}

fn store(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// The connection and its waiters, under the lock.
pub(super) struct State {
    pub(super) conn: Connection,
    wakers: Wakers,
}

impl State {
    pub(super) fn wait_read(&mut self, id: u32, cx: &Context<'_>) {
        self.wakers.read.insert(id, cx.waker().clone());
    }

    pub(super) fn wait_write(&mut self, id: u32, cx: &Context<'_>) {
        self.wakers.write.insert(id, cx.waker().clone());
    }

    pub(super) fn wait_cut(&mut self, id: u32, cx: &Context<'_>) {
        self.wakers.cut.insert(id, cx.waker().clone());
    }

    pub(super) fn wait_budget(&mut self, cx: &Context<'_>) {
        self.wakers.budget.push(cx.waker().clone());
    }

    pub(super) fn forget(&mut self, id: u32) {
        self.wakers.read.remove(&id);
        self.wakers.write.remove(&id);
        self.wakers.cut.remove(&id);
    }
}

/// The state shared by a session's driver, its [`Session`] handles and its streams.
pub(super) struct Shared {
    state: Mutex<State>,
    /// Cancelled when the session ends.
    closed: CancellationToken,
    /// Cancelled when the driver has ended: after `closed`, once the last frames went out (or
    /// [`CLOSE_FLUSH`] passed) and the transport closed.
    finished: CancellationToken,
    /// Notified when the last open stream ends (drain).
    idle: Notify,
}

/// The lock on [`State`]; on release it turns the connection's events into wake-ups.
pub(super) struct Guard<'a> {
    guard: MutexGuard<'a, State>,
    shared: &'a Shared,
}

impl Deref for Guard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.guard
    }
}

impl DerefMut for Guard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.guard
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let st = &mut *self.guard;
        while let Some(ev) = st.conn.poll_event() {
            let w = &mut st.wakers;
            match ev {
                Event::Readable(id) => wake(w.read.remove(&id)),
                Event::Writable(id) => wake(w.write.remove(&id)),
                Event::Ended(id) => {
                    wake(w.read.remove(&id));
                    wake(w.write.remove(&id));
                    wake(w.cut.remove(&id));
                }
                Event::BudgetFreed => w.budget.drain(..).for_each(Waker::wake),
                Event::Incoming => w.accept.drain(..).for_each(Waker::wake),
                Event::Idle => self.shared.idle.notify_waiters(),
                Event::Closed => {
                    for w in w.read.drain().chain(w.write.drain()).chain(w.cut.drain()).map(|(_, w)| w) {
                        w.wake();
                    }
                    wake(w.driver.take());
                    self.shared.idle.notify_waiters();
                    self.shared.closed.cancel();
                }
            }
        }
        if st.conn.wants_transmit() {
            wake(st.wakers.driver.take());
        }
    }
}

impl Shared {
    pub(super) fn lock(&self) -> Guard<'_> {
        Guard { guard: self.state.lock().unwrap_or_else(|p| p.into_inner()), shared: self }
    }
}

/// One multiplexed session over a transport. Cloning shares it.
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("closed", &self.is_closed()).finish()
    }
}

/// The driver task of a session, held by whoever decides how long the session lives (the relay's
/// task serving a connection). Dropping it ends the session, as [`Session::close`] does: every
/// stream fails, the frames queued before the end still go out (within a second), then the driver
/// frees the transport.
pub struct SessionTask {
    shared: Arc<Shared>,
    /// The driver; it ends by itself once the session has ended.
    _task: tokio::task::JoinHandle<()>,
}

impl SessionTask {
    /// Wait for the driver to end, at most twice [`CLOSE_FLUSH`]: once the session is closed, the
    /// frames queued before its end (a `GoAway` notice) go out and the transport closes. A relay
    /// awaits this before it exits, so its last words reach the peer.
    pub async fn finished(&mut self) {
        let _ = tokio::time::timeout(CLOSE_FLUSH * 2, &mut self._task).await;
    }
}

impl Session {
    /// Resolves when the session's driver has ended (see [`SessionTask::finished`]; bounded the
    /// same way): after [`Session::closed`], once its last frames went out and the transport
    /// closed. A process awaits it before exiting, so its close reaches the peer.
    pub async fn finished(&self) {
        let _ = tokio::time::timeout(CLOSE_FLUSH * 2, self.shared.finished.cancelled()).await;
    }
}

impl Drop for SessionTask {
    fn drop(&mut self) {
        self.shared.lock().conn.close(ErrorCode::RelayUnavailable, "the session ended with the task that owned it");
    }
}

impl Session {
    /// Start a session over an authenticated transport: spawns its driver task, which lives until
    /// the session ends (the peer leaves, the transport fails, a deadline passes, or it is closed).
    pub fn new(role: Role, source: FrameSource, sink: FrameSink, config: MuxConfig) -> Session {
        let (shared, _detached) = Session::start(role, source, sink, config);
        Session { shared }
    }

    /// Start a session whose lifetime is the returned [`SessionTask`]'s: dropping the task handle
    /// ends the session.
    pub fn owned(role: Role, source: FrameSource, sink: FrameSink, config: MuxConfig) -> (Session, SessionTask) {
        let (shared, task) = Session::start(role, source, sink, config);
        (Session { shared: shared.clone() }, SessionTask { shared, _task: task })
    }

    fn start(role: Role, source: FrameSource, sink: FrameSink, config: MuxConfig) -> (Arc<Shared>, tokio::task::JoinHandle<()>) {
        let shared = Arc::new(Shared {
            state: Mutex::new(State { conn: Connection::new(role, config, Instant::now()), wakers: Wakers::default() }),
            closed: CancellationToken::new(),
            finished: CancellationToken::new(),
            idle: Notify::new(),
        });
        let task = tokio::spawn(drive(shared.clone(), source, sink));
        (shared, task)
    }

    /// Open a stream to the peer. Costs no round trip: the `Open` frame goes out with the first data.
    pub fn open(&self) -> Result<MuxStream, Error> {
        let id = self.shared.lock().conn.open(Instant::now())?;
        Ok(MuxStream::new(self.shared.clone(), id))
    }

    /// Wait for the next stream the peer opens; `None` once the session has ended.
    pub async fn accept(&self) -> Option<MuxStream> {
        let id = poll_fn(|cx| {
            let mut st = self.shared.lock();
            if let Some(id) = st.conn.accept() {
                return Poll::Ready(Some(id));
            }
            if st.conn.is_closed() {
                return Poll::Ready(None);
            }
            st.wakers.accept.push(cx.waker().clone());
            Poll::Pending
        })
        .await?;
        Some(MuxStream::new(self.shared.clone(), id))
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.is_cancelled()
    }

    /// Why the session ended, if it has.
    pub fn close_reason(&self) -> Option<Error> {
        self.shared.lock().conn.close_reason()
    }

    /// Resolves when the session has ended.
    pub async fn closed(&self) {
        self.shared.closed.cancelled().await
    }

    /// Number of streams currently open.
    pub fn stream_count(&self) -> usize {
        self.shared.lock().conn.stream_count()
    }

    /// The session's figures now (open streams, buffered, granted and queued bytes, RTT).
    pub fn stats(&self) -> SessionStats {
        self.shared.lock().conn.stats()
    }

    /// Wait until every stream has finished (both directions, so no data is in flight) or
    /// `limit` passes, then close the session; returns whether it drained in time. The peer
    /// should have been told to open nothing new ([`Session::go_away`]).
    pub async fn drain(&self, limit: Duration, why: &str) -> bool {
        let drained = tokio::time::timeout(limit, async {
            loop {
                let idle = self.shared.idle.notified();
                tokio::pin!(idle);
                idle.as_mut().enable();
                {
                    let st = self.shared.lock();
                    if st.conn.is_closed() || st.conn.stream_count() == 0 {
                        return;
                    }
                }
                idle.await;
            }
        })
        .await
        .is_ok();
        self.close(ErrorCode::Closed, why);
        drained
    }

    /// Tell the peer we accept no new streams; existing streams continue.
    pub fn go_away(&self) {
        self.shared.lock().conn.go_away();
    }

    /// End the session now; every open stream fails with `code`.
    pub fn close(&self, code: ErrorCode, why: impl Into<String>) {
        self.shared.lock().conn.close(code, why);
    }

    /// End the session and tell the peer why: a `GoAway` carrying `code` and `why` is sent before
    /// the transport closes, so the peer's [`Session::close_reason`] reports them instead of a bare
    /// "the peer closed the session" (a replaced listener uses it to stop reconnecting).
    pub fn close_with_notice(&self, code: ErrorCode, why: impl Into<String>) {
        self.shared.lock().conn.close_with_notice(code, why);
    }
}

/// The driver's own state: the transport and the write in progress.
struct Driver {
    shared: Arc<Shared>,
    source: FrameSource,
    sink: FrameSink,
    /// Messages read and not yet handed to the connection (reused buffer).
    inbox: Vec<Bytes>,
    /// Frames taken from the connection and not yet handed to the sink, in order.
    outbox: std::collections::VecDeque<Bytes>,
    batch: Vec<Bytes>,
    /// Frames handed to the sink since the last completed flush.
    unflushed: bool,
    timer: Pin<Box<tokio::time::Sleep>>,
    timer_at: Option<Instant>,
}

impl Drop for Driver {
    /// A driver dropped before the end (its runtime shut down) ends the session, so no stream
    /// waits for a transport nobody polls.
    fn drop(&mut self) {
        self.shared.lock().conn.close(ErrorCode::RelayUnavailable, "the task driving the session stopped");
    }
}

impl Driver {
    /// Run until the session ends. Reads, writes and the deadline are polled together.
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // Whoever queues a frame or ends the session wakes us, whatever we wait on below.
        store(&mut self.shared.lock().wakers.driver, cx);
        for _ in 0..ROUNDS {
            let mut progress = false;
            // Reads: take what the transport has, then file it under one lock.
            let mut ended = None;
            while self.inbox.len() < READ_BATCH {
                match self.source.as_mut().poll_next(cx) {
                    Poll::Ready(Some(Ok(m))) => self.inbox.push(m),
                    Poll::Ready(Some(Err(e))) => {
                        ended = Some(Some(e));
                        break;
                    }
                    Poll::Ready(None) => {
                        ended = Some(None);
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            if !self.inbox.is_empty() || ended.is_some() {
                progress |= self.inbox.len() >= READ_BATCH;
                let now = Instant::now();
                let mut st = self.shared.lock();
                for m in self.inbox.drain(..) {
                    st.conn.handle_input(now, m);
                }
                if let Some(e) = ended {
                    st.conn.transport_ended(e);
                }
            }
            // Writes: once the sink takes frames, gather every ready frame, hand them all to
            // it, flush once; repeat while frames keep coming (a few batches per round).
            for _ in 0..2 {
                // The sink said it takes a frame, and none was given to it since.
                let mut ready = false;
                if self.outbox.is_empty() {
                    if self.unflushed {
                        match self.sink.as_mut().poll_flush(cx) {
                            Poll::Ready(Ok(())) => {
                                self.unflushed = false;
                                self.shared.lock().conn.on_transmitted();
                            }
                            Poll::Ready(Err(e)) => return self.write_failed(e),
                            Poll::Pending => {
                                self.shared.lock().conn.write_blocked(Instant::now());
                                break;
                            }
                        }
                    }
                    let sink_ready = self.sink.as_mut().poll_ready(cx);
                    let mut st = self.shared.lock();
                    if st.conn.is_closed() {
                        return Poll::Ready(());
                    }
                    match sink_ready {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(e)) => {
                            drop(st);
                            return self.write_failed(e);
                        }
                        Poll::Pending => {
                            // The sink wakes us when it has room; the stall deadline runs.
                            if st.conn.wants_transmit() {
                                st.conn.write_blocked(Instant::now());
                            }
                            break;
                        }
                    }
                    st.conn.poll_transmit(Instant::now(), &mut self.batch, WRITE_BATCH, WRITE_BATCH_BYTES);
                    if self.batch.is_empty() {
                        break;
                    }
                    drop(st);
                    self.outbox.extend(self.batch.drain(..));
                    ready = true;
                }
                let mut blocked = false;
                while !self.outbox.is_empty() {
                    if !ready {
                        match self.sink.as_mut().poll_ready(cx) {
                            Poll::Ready(Ok(())) => {}
                            Poll::Ready(Err(e)) => return self.write_failed(e),
                            Poll::Pending => {
                                self.shared.lock().conn.write_blocked(Instant::now());
                                blocked = true;
                                break;
                            }
                        }
                    }
                    ready = false;
                    let f = self.outbox.pop_front().expect("not empty");
                    if let Err(e) = self.sink.as_mut().start_send(f) {
                        return self.write_failed(e);
                    }
                    self.unflushed = true;
                }
                if blocked {
                    break;
                }
                progress = true;
            }
            // The deadline: keep the timer at or before the connection's next deadline.
            let next = {
                let st = self.shared.lock();
                if st.conn.is_closed() {
                    return Poll::Ready(());
                }
                st.conn.poll_timeout()
            };
            if let Some(t) = next {
                if !self.timer_at.is_some_and(|at| at <= t) {
                    self.timer.as_mut().reset(tokio::time::Instant::from_std(t));
                    self.timer_at = Some(t);
                }
                if self.timer.as_mut().poll(cx).is_ready() {
                    self.timer_at = None;
                    let mut st = self.shared.lock();
                    st.conn.handle_timeout(Instant::now());
                    if st.conn.is_closed() {
                        return Poll::Ready(());
                    }
                    progress = true;
                }
            }
            if !progress {
                return Poll::Pending;
            }
        }
        // Still busy: let other tasks run, then carry on.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn write_failed(&mut self, e: io::Error) -> Poll<()> {
        self.shared.lock().conn.close(ErrorCode::RelayUnavailable, format!("writing to the session's transport failed: {e}"));
        self.outbox.clear();
        Poll::Ready(())
    }

    /// After the end: the frames queued before it (a `GoAway` notice, resets) still go out, if
    /// the transport takes them within [`CLOSE_FLUSH`]; then the transport closes.
    async fn finish(&mut self) {
        let flush = async {
            loop {
                self.shared.lock().conn.poll_transmit(Instant::now(), &mut self.batch, WRITE_BATCH, WRITE_BATCH_BYTES);
                self.outbox.extend(self.batch.drain(..));
                let Some(f) = self.outbox.pop_front() else { break };
                if self.sink.feed(f).await.is_err() {
                    return;
                }
            }
            let _ = self.sink.close().await;
        };
        let _ = tokio::time::timeout(CLOSE_FLUSH, flush).await;
    }
}

async fn drive(shared: Arc<Shared>, source: FrameSource, sink: FrameSink) {
    let mut d = Driver {
        shared,
        source,
        sink,
        inbox: Vec::with_capacity(READ_BATCH),
        outbox: std::collections::VecDeque::new(),
        batch: Vec::with_capacity(WRITE_BATCH),
        unflushed: false,
        timer: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
        timer_at: None,
    };
    poll_fn(|cx| d.poll_run(cx)).await;
    // Frames handed to the connection before the end but not to the sink are stream data of a
    // closed session: only what the connection still yields (control frames) goes out.
    d.outbox.clear();
    d.finish().await;
    d.shared.finished.cancel();
}
