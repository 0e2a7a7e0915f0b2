//! [`Connection`]: the whole `libtunnel.v1` session as a sans-IO state machine (in the shape of
//! quinn-proto's `Connection`). It owns no socket, no timer, no task and no lock, and never reads
//! the clock: time is an argument.
//!
//! - Frames in: [`Connection::handle_input`] (one transport message each), and
//!   [`Connection::transport_ended`] when the transport closes or fails.
//! - Frames out: [`Connection::poll_transmit`] hands every ready frame (control frames first, then
//!   one frame per ready stream, round-robin), [`Connection::on_transmitted`] says the transport
//!   took them (until then the write-stall deadline runs).
//! - Deadlines: [`Connection::poll_timeout`] / [`Connection::handle_timeout`] (keepalive pings,
//!   the silence deadline, the write-stall deadline, round-trip refreshes).
//! - Events: [`Connection::poll_event`] says which stream became readable or writable, that a
//!   peer-opened stream waits, that budget was freed, that the last stream ended, that the session
//!   ended. A driver turns them into wake-ups.
//! - Streams are operated on by id: open, accept, reserve and send, receive, finish, reset, drop.
//!
//! A peer that breaks the protocol (more data than its credit, frames on streams it never opened,
//! replies asked for faster than it reads them) ends the session with `PROTOCOL`.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::flow::{Rtt, WINDOW};
use super::frame::{decode_notice, encode_notice, Frame, FrameKind, FRAME_HEADER};
use super::recv::RecvState;
use super::send::SendState;
use super::{MuxConfig, Role, SessionStats, MAX_DATA};
use crate::error::{Error, ErrorCode};

/// The largest ping payload a peer may send (ours are 8 bytes).
pub(super) const MAX_PING: usize = 64;
/// Control frames queued before a peer's further pings, refused opens or late data count as
/// abuse (it asks for replies faster than it reads them).
pub(super) const MAX_OWED_REPLIES: usize = 16 * 1024;
/// How often a session with open streams refreshes its round-trip estimate.
const RTT_REFRESH: Duration = Duration::from_secs(5);

/// Something the driver should act on (usually: wake whoever waits for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A peer-opened stream waits for [`Connection::accept`].
    Incoming,
    /// The stream has data to read.
    Readable(u32),
    /// The stream may send again (credit arrived, or its queue drained).
    Writable(u32),
    /// The stream finished receiving or was reset: its reader, writer and cut-off watcher wake.
    Ended(u32),
    /// Room appeared in the session's write budget.
    BudgetFreed,
    /// No stream is open any more.
    Idle,
    /// The session ended ([`Connection::close_reason`] says why).
    Closed,
}

/// What [`Connection::reserve`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reserve {
    /// This many bytes may be sent now.
    Ready(usize),
    /// Wait for [`Event::Writable`] of this stream (credit or room in its queue).
    WaitStream,
    /// Wait for [`Event::BudgetFreed`].
    WaitBudget,
}

/// What [`Connection::recv`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recv {
    /// The next chunk.
    Chunk(Bytes),
    /// The peer finished: no more data.
    End,
    /// Nothing yet: wait for [`Event::Readable`] or [`Event::Ended`].
    Blocked,
}

/// One stream's state.
#[derive(Debug)]
struct StreamState {
    recv: RecvState,
    send: SendState,
    /// Why the stream was reset (by the peer, locally, or because the session ended).
    reset: Option<(ErrorCode, String)>,
    /// A handle (or a queued accept) refers to it.
    handle: bool,
    /// Finished both ways or reset: no longer counted as open.
    retired: bool,
    /// Of a retired stream, the received bytes still unread and still counted in the session's
    /// `granted`: retiring returns only the part of the window that holds no data, and the rest
    /// comes back as the reader takes it (or drops it), so what unread finished streams buffer
    /// stays within the session budget.
    held: usize,
}

impl StreamState {
    fn new(now: Instant, open_sent: bool) -> StreamState {
        StreamState { recv: RecvState::new(now), send: SendState::new(open_sent), reset: None, handle: true, retired: false, held: 0 }
    }

    fn finished(&self) -> bool {
        self.reset.is_some() || (self.recv.fin && self.send.fin)
    }
}

/// The sans-IO session (see the module doc).
#[derive(Debug)]
pub struct Connection {
    role: Role,
    cfg: MuxConfig,
    /// Time origin of ping timestamps.
    epoch: Instant,
    streams: HashMap<u32, StreamState>,
    /// Streams not yet retired.
    live: usize,
    next_id: u32,
    /// Highest id the peer has opened (peer ids must increase).
    peer_last: u32,
    /// Peer-opened streams waiting for `accept`.
    incoming: VecDeque<u32>,
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
    /// Data bytes queued or reserved across streams, or handed to the transport and not yet
    /// written (bounded by `write_budget`).
    queued_total: usize,
    /// Data bytes handed out by `poll_transmit` that the transport has not taken yet.
    transmitting: usize,
    /// A writer waits for room in the write budget.
    budget_waiting: bool,
    /// Sum of the live streams' receive windows.
    granted: usize,
    /// Received bytes waiting for readers.
    buffered: usize,
    /// Credit the peer still had on streams we closed while it was sending: late data on closed
    /// streams is allowed up to this much (and answered with `Rst`), never more.
    late_credit: u64,
    rtt: Rtt,
    last_heard: Instant,
    last_ping: Instant,
    /// Since when frames handed out by `poll_transmit` wait for the transport to take them.
    writing_since: Option<Instant>,
    events: VecDeque<Event>,
}

impl Connection {
    /// A new session at `now`; a first ping (to measure the round trip before any stream needs
    /// a bigger window) is queued.
    pub fn new(role: Role, config: MuxConfig, now: Instant) -> Connection {
        let cfg = MuxConfig { write_budget: config.write_budget.max(MAX_DATA), max_stream_window: config.max_stream_window.max(WINDOW), ..config };
        let mut c = Connection {
            role,
            cfg,
            epoch: now,
            streams: HashMap::new(),
            live: 0,
            next_id: if role == Role::Client { 1 } else { 2 },
            peer_last: 0,
            incoming: VecDeque::new(),
            go_away: false,
            notice: None,
            closed: None,
            control: VecDeque::new(),
            ready: VecDeque::new(),
            queued_total: 0,
            transmitting: 0,
            budget_waiting: false,
            granted: 0,
            buffered: 0,
            late_credit: 0,
            rtt: Rtt::default(),
            last_heard: now,
            last_ping: now,
            writing_since: None,
            events: VecDeque::new(),
        };
        c.send_ping(now);
        c
    }

    /// The settings in force (budgets raised to their floors).
    pub fn config(&self) -> &MuxConfig {
        &self.cfg
    }

    /// Which end we are.
    pub fn role(&self) -> Role {
        self.role
    }

    // -----------------------------------------------------------------------------------------
    // Session state
    // -----------------------------------------------------------------------------------------

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Why the session ended, if it has.
    pub fn close_reason(&self) -> Option<Error> {
        self.closed.as_ref().map(|(c, m)| Error::new(*c, m.clone()))
    }

    /// Whether the session has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    /// Streams open (not yet finished both ways or reset).
    pub fn stream_count(&self) -> usize {
        self.live
    }

    /// The session's figures now.
    pub fn stats(&self) -> SessionStats {
        SessionStats { streams: self.live, buffered: self.buffered, granted: self.granted, queued: self.queued_total, rtt: self.rtt.get() }
    }

    /// Check the memory bounds docs/design/sessions.md states; `Err` names the one broken (tests and fuzzing).
    pub fn check_bounds(&self) -> Result<(), String> {
        let held = self.streams.len();
        let recv_bound = self.cfg.receive_budget + held * WINDOW as usize;
        if self.buffered > recv_bound {
            return Err(format!("{} bytes buffered for readers, more than the bound {recv_bound}", self.buffered));
        }
        // Every buffered byte lies within a window the session still counts (a finished, unread
        // stream's bytes included), and windows grow only within the budget.
        if self.buffered > self.granted {
            return Err(format!("{} bytes buffered for readers, more than the {} bytes of window counted", self.buffered, self.granted));
        }
        if self.granted > self.cfg.receive_budget + held * WINDOW as usize {
            return Err(format!("{} bytes of window granted, more than the budget allows", self.granted));
        }
        if self.queued_total > self.cfg.write_budget + MAX_DATA {
            return Err(format!("{} bytes queued for the transport, more than the write budget", self.queued_total));
        }
        if self.control.len() > MAX_OWED_REPLIES + held + 2 {
            return Err(format!("{} control frames queued", self.control.len()));
        }
        if self.live > self.cfg.max_streams || self.incoming.len() > self.cfg.accept_backlog.max(1) {
            return Err(format!("{} streams open, {} waiting for accept", self.live, self.incoming.len()));
        }
        let buffered: usize = self.streams.values().map(|s| s.recv.bytes).sum();
        let queued: usize = self.streams.values().map(|s| s.send.queued).sum::<usize>() + self.transmitting;
        if buffered != self.buffered || queued != self.queued_total {
            return Err(format!("totals drifted: buffered {buffered} vs {}, queued {queued} vs {}", self.buffered, self.queued_total));
        }
        Ok(())
    }

    /// End the session now: every open stream fails with `code`, nothing more is sent but the
    /// control frames already queued (a `GoAway` notice, resets). Handles keep what they already
    /// received (a finished stream still reads to its end).
    pub fn close(&mut self, code: ErrorCode, why: impl Into<String>) {
        if self.closed.is_some() {
            return;
        }
        let why = why.into();
        tracing::debug!(%code, %why, "mux session ended");
        self.ready.clear();
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for id in ids {
            let st = self.streams.get_mut(&id).expect("present");
            st.send.discard();
            st.send.reserved = 0;
            st.send.queued = 0;
            st.send.scheduled = false;
            if st.reset.is_none() {
                st.reset = Some((code, why.clone()));
            }
            self.events.push_back(Event::Ended(id));
            self.forget_if_done(id);
        }
        self.queued_total = 0;
        self.transmitting = 0;
        self.closed = Some((code, why));
        self.events.push_back(Event::BudgetFreed);
        self.events.push_back(Event::Incoming);
        self.events.push_back(Event::Closed);
    }

    /// Tell the peer we accept no new streams; existing streams continue.
    pub fn go_away(&mut self) {
        self.push_control(Frame::encode(FrameKind::GoAway, 0, &[]));
    }

    /// End the session and tell the peer why: a `GoAway` carrying `code` and `why` goes out
    /// before the transport closes.
    pub fn close_with_notice(&mut self, code: ErrorCode, why: impl Into<String>) {
        let why = why.into();
        self.push_control(encode_notice(code, &why));
        self.close(code, why);
    }

    /// The transport ended: `None` at a clean end, else its error. A peer that announced why it
    /// is closing (a `GoAway` notice) is believed over the bare end that follows it; one that only
    /// drained (a plain `GoAway`: a relay shutting down or restarting) is named as such, not as a
    /// session that merely ended.
    pub fn transport_ended(&mut self, error: Option<io::Error>) {
        let (code, why) = match error {
            None => (ErrorCode::RelayUnavailable, "the peer closed the session".to_string()),
            Some(e) => {
                let code = if e.kind() == io::ErrorKind::InvalidData { ErrorCode::Protocol } else { ErrorCode::RelayUnavailable };
                (code, format!("the session's transport failed: {e}"))
            }
        };
        let (code, why) = match self.notice.take() {
            Some((c, w)) if code == ErrorCode::RelayUnavailable => (c, w),
            None if self.go_away && code == ErrorCode::RelayUnavailable => {
                let who = if self.role == Role::Client { "the relay" } else { "the peer" };
                (code, format!("{who} drained the session and closed it (a graceful shutdown or restart)"))
            }
            _ => (code, why),
        };
        self.close(code, why);
    }

    // -----------------------------------------------------------------------------------------
    // Frames in
    // -----------------------------------------------------------------------------------------

    /// One transport message from the peer at `now`. A protocol violation ends the session.
    pub fn handle_input(&mut self, now: Instant, message: Bytes) {
        if self.closed.is_some() {
            return;
        }
        self.last_heard = now;
        let result = match Frame::decode(message) {
            Ok(f) => self.on_frame(now, f),
            Err(e) => Err(e.message().to_string()),
        };
        if let Err(why) = result {
            self.close(ErrorCode::Protocol, why);
        }
    }

    /// Whether `id` names a stream that was opened at some point (by either side).
    fn ever_opened(&self, id: u32) -> bool {
        let ours = (id % 2 == 1) == (self.role == Role::Client);
        id != 0 && if ours { id < self.next_id } else { id <= self.peer_last }
    }

    fn on_frame(&mut self, now: Instant, f: Frame) -> Result<(), String> {
        match f.kind {
            FrameKind::Open => return self.on_open(now, f.stream),
            FrameKind::Data => {
                let n = f.payload.len();
                if n > MAX_DATA {
                    return Err(format!("peer sent a {n}-byte data frame (at most {MAX_DATA})"));
                }
                let Some(st) = self.streams.get_mut(&f.stream) else {
                    if !self.ever_opened(f.stream) {
                        return Err(format!("peer sent data on stream {}, which was never opened", f.stream));
                    }
                    // Late data on a stream we closed: allowed up to the credit the peer had.
                    if self.late_credit < n as u64 {
                        return Err(format!("peer sent {n} bytes on closed stream {} beyond the credit it had", f.stream));
                    }
                    self.late_credit -= n as u64;
                    return self.owe_reply(Frame::rst(f.stream, ErrorCode::Closed));
                };
                if st.recv.fin {
                    return Err(format!("peer sent data on stream {} after finishing it", f.stream));
                }
                if let Err(credit) = st.recv.flow.on_data(n as u32) {
                    return Err(format!("peer sent {n} bytes on stream {} with only {credit} bytes of window", f.stream));
                }
                if st.reset.is_some() || n == 0 {
                    return Ok(()); // reset locally: the bytes have no reader
                }
                st.recv.push(f.payload);
                self.buffered += n;
                self.events.push_back(Event::Readable(f.stream));
            }
            FrameKind::Window => {
                let inc = f.payload_u32().ok_or("malformed window frame")?;
                if let Some(st) = self.streams.get_mut(&f.stream) {
                    st.send.credit = st.send.credit.saturating_add(inc);
                    self.events.push_back(Event::Writable(f.stream));
                }
            }
            FrameKind::Fin => {
                if let Some(st) = self.streams.get_mut(&f.stream) {
                    if st.recv.fin {
                        return Err(format!("peer finished stream {} twice", f.stream));
                    }
                    st.recv.fin = true;
                    self.events.push_back(Event::Ended(f.stream));
                    self.forget_if_done(f.stream);
                }
            }
            FrameKind::Rst => {
                let code = f.payload_u32().and_then(ErrorCode::from_number).unwrap_or(ErrorCode::Closed);
                if self.streams.get(&f.stream).is_some_and(|st| st.reset.is_none()) {
                    self.discard_queue(f.stream);
                    let st = self.streams.get_mut(&f.stream).expect("present");
                    st.send.fin = true;
                    st.reset = Some((code, "the peer reset the stream".into()));
                    self.events.push_back(Event::Ended(f.stream));
                    self.forget_if_done(f.stream);
                }
            }
            FrameKind::Ping => {
                if f.payload.len() > MAX_PING {
                    return Err(format!("peer sent a {}-byte ping (at most {MAX_PING})", f.payload.len()));
                }
                return self.owe_reply(Frame::encode(FrameKind::Pong, 0, &f.payload));
            }
            FrameKind::Pong => {
                if let Ok(sent) = <[u8; 8]>::try_from(&f.payload[..]) {
                    let sent = self.epoch + Duration::from_nanos(u64::from_be_bytes(sent));
                    if let Some(rtt) = now.checked_duration_since(sent).filter(|d| *d < Duration::from_secs(60)) {
                        self.rtt.sample(rtt);
                    }
                }
            }
            FrameKind::GoAway => {
                self.go_away = true;
                if let Some(notice) = decode_notice(&f.payload) {
                    self.notice = Some(notice);
                }
            }
        }
        Ok(())
    }

    /// A stream the peer opens: queue it for `accept`, or refuse it.
    fn on_open(&mut self, now: Instant, id: u32) -> Result<(), String> {
        let peer_parity = if self.role == Role::Client { 0 } else { 1 };
        if id % 2 != peer_parity || id <= self.peer_last {
            return Err(format!("peer opened stream {id}, which is not a fresh id of its own"));
        }
        self.peer_last = id;
        let refuse = if self.live >= self.cfg.max_streams {
            Some(ErrorCode::General)
        } else if self.incoming.len() >= self.cfg.accept_backlog.max(1) {
            tracing::debug!(stream = id, "accept backlog full; refusing stream");
            Some(ErrorCode::Closed)
        } else {
            None
        };
        if let Some(code) = refuse {
            // The peer may already be sending on it with the initial credit: allow that much.
            self.late_credit += u64::from(WINDOW);
            return self.owe_reply(Frame::rst(id, code));
        }
        self.streams.insert(id, StreamState::new(now, true));
        self.live += 1;
        self.granted += WINDOW as usize;
        self.incoming.push_back(id);
        self.events.push_back(Event::Incoming);
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Frames out
    // -----------------------------------------------------------------------------------------

    fn push_control(&mut self, frame: Bytes) {
        if self.closed.is_none() {
            self.control.push_back(frame);
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
        st.send.queue.push_back(frame);
        if !st.send.scheduled {
            st.send.scheduled = true;
            self.ready.push_back(id);
        }
    }

    /// Whether frames wait for [`Connection::poll_transmit`].
    pub fn wants_transmit(&self) -> bool {
        !self.control.is_empty() || !self.ready.is_empty()
    }

    /// Append ready frames to `out` (control frames first, then one frame of each ready stream in
    /// turn) until it holds `max_frames` frames or `max_bytes` bytes (at least one frame); returns
    /// how many. A small batch keeps fairness: a frame queued later waits behind one batch at
    /// most. Once the session has ended only the control frames queued before the end (a
    /// `GoAway` notice) remain. The write-stall deadline runs from `now` until
    /// [`Connection::on_transmitted`].
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Vec<Bytes>, max_frames: usize, max_bytes: usize) -> usize {
        let (mut n, mut bytes) = (0, 0);
        while n < max_frames && (n == 0 || bytes < max_bytes) {
            let Some(f) = self.next_frame() else { break };
            bytes += f.len();
            out.push(f);
            n += 1;
        }
        if n > 0 && self.writing_since.is_none() {
            self.writing_since = Some(now);
        }
        n
    }

    /// The transport refuses frames since `now` (the write-stall deadline runs, unless it already
    /// does).
    pub fn write_blocked(&mut self, now: Instant) {
        self.writing_since.get_or_insert(now);
    }

    /// The transport took every frame handed out so far: their bytes leave the write budget.
    pub fn on_transmitted(&mut self) {
        self.writing_since = None;
        self.queued_total -= std::mem::take(&mut self.transmitting);
        if self.budget_waiting && self.queued_total < self.cfg.write_budget {
            self.budget_waiting = false;
            self.events.push_back(Event::BudgetFreed);
        }
    }

    fn next_frame(&mut self) -> Option<Bytes> {
        if let Some(f) = self.control.pop_front() {
            return Some(f);
        }
        while let Some(id) = self.ready.pop_front() {
            let Some(st) = self.streams.get_mut(&id) else { continue };
            let Some(frame) = st.send.queue.pop_front() else {
                st.send.scheduled = false;
                continue;
            };
            match FrameKind::of(&frame) {
                Some(FrameKind::Data) => {
                    let n = frame.len() - FRAME_HEADER;
                    let had_room = st.send.has_room();
                    st.send.queued -= n;
                    self.transmitting += n;
                    if !had_room && st.send.has_room() {
                        self.events.push_back(Event::Writable(id));
                    }
                }
                Some(FrameKind::Open) => st.send.open_sent = true,
                _ => {}
            }
            let more = !st.send.queue.is_empty();
            if !more {
                st.send.scheduled = false;
            }
            if more {
                self.ready.push_back(id);
            } else {
                self.forget_if_done(id);
            }
            return Some(frame);
        }
        None
    }

    // -----------------------------------------------------------------------------------------
    // Deadlines
    // -----------------------------------------------------------------------------------------

    /// How often a silent peer is pinged.
    fn ping_period(&self) -> Duration {
        self.cfg.keepalive_interval.min(self.cfg.keepalive_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    fn send_ping(&mut self, now: Instant) {
        let stamp = u64::try_from(now.duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        self.push_control(Frame::encode(FrameKind::Ping, 0, &stamp.to_be_bytes()));
        self.last_ping = now;
    }

    /// The next instant [`Connection::handle_timeout`] has something to do; `None` once closed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed.is_some() {
            return None;
        }
        let mut t = self.last_heard + self.cfg.keepalive_timeout;
        if let Some(since) = self.writing_since {
            t = t.min(since + self.cfg.keepalive_timeout);
        }
        t = t.min((self.last_heard + self.cfg.keepalive_interval).max(self.last_ping + self.ping_period()));
        if self.live > 0 {
            t = t.min(self.last_ping + RTT_REFRESH);
        }
        Some(t)
    }

    /// Act on the deadlines due at `now`: end a session whose peer was silent, or did not take
    /// our writes, for `keepalive_timeout`; ping a quiet peer; refresh the round-trip estimate.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed.is_some() {
            return;
        }
        // A peer that does not read is the more specific diagnosis when both are due.
        if let Some(since) = self.writing_since {
            let stalled = now.saturating_duration_since(since);
            if stalled >= self.cfg.keepalive_timeout {
                let why = format!("the peer has not read from the session for {}s (write stall); the session is dropped", stalled.as_secs());
                self.close(ErrorCode::RelayUnavailable, why);
                return;
            }
        }
        let silent = now.saturating_duration_since(self.last_heard);
        if silent >= self.cfg.keepalive_timeout {
            let why = format!("the peer sent nothing for {}s (keepalive timeout); the session is dropped", silent.as_secs());
            self.close(ErrorCode::RelayUnavailable, why);
            return;
        }
        let since_ping = now.saturating_duration_since(self.last_ping);
        if (silent >= self.cfg.keepalive_interval && since_ping >= self.ping_period()) || (self.live > 0 && since_ping >= RTT_REFRESH) {
            self.send_ping(now);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Streams
    // -----------------------------------------------------------------------------------------

    /// Open a stream to the peer. Costs no round trip: the `Open` frame goes out with the first
    /// data.
    pub fn open(&mut self, now: Instant) -> Result<u32, Error> {
        if let Some(e) = self.close_reason() {
            return Err(e);
        }
        if self.go_away {
            return Err(Error::new(
                ErrorCode::RelayUnavailable,
                "the relay is shutting down and takes no new streams; retry to reach another relay session",
            ));
        }
        if self.live >= self.cfg.max_streams {
            return Err(Error::new(
                ErrorCode::General,
                format!("this session already has {} open streams (the limit); close some first", self.cfg.max_streams),
            ));
        }
        let id = self.next_id;
        if id > u32::MAX - 2 {
            return Err(Error::new(ErrorCode::RelayUnavailable, "stream ids on this session are used up; open a new session"));
        }
        self.next_id += 2;
        self.streams.insert(id, StreamState::new(now, false));
        self.live += 1;
        self.granted += WINDOW as usize;
        // Streams enter the round-robin ring in id order with their `Open` first, so ids reach
        // the peer in increasing order (it kills the session otherwise).
        self.enqueue(id, Frame::encode(FrameKind::Open, id, &[]));
        Ok(id)
    }

    /// The next stream the peer opened, if one waits (its handle is the caller's from now on).
    pub fn accept(&mut self) -> Option<u32> {
        self.incoming.pop_front()
    }

    /// The stream's current receive window.
    pub fn window(&self, id: u32) -> u32 {
        self.streams.get(&id).map_or(0, |st| st.recv.flow.window())
    }

    fn gone(&self) -> io::Error {
        match &self.closed {
            Some((code, why)) => Error::new(*code, why.clone()).into_io(),
            None => io::Error::new(io::ErrorKind::ConnectionReset, "the stream is closed"),
        }
    }

    fn write_error(st: &StreamState) -> Option<io::Error> {
        if let Some((code, why)) = &st.reset {
            return Some(Error::new(*code, why.clone()).into_io());
        }
        if st.send.fin {
            return Some(io::Error::new(io::ErrorKind::BrokenPipe, "write after shutdown on a tunnel stream"));
        }
        None
    }

    /// Reserve up to `want` bytes of stream `id` (window credit, room in its queue and in the
    /// session's write budget); spent by [`Connection::send_data`].
    pub fn reserve(&mut self, id: u32, want: usize) -> io::Result<Reserve> {
        let want = want.clamp(1, MAX_DATA);
        let budget = self.cfg.write_budget;
        let Some(st) = self.streams.get_mut(&id) else { return Err(self.gone()) };
        if let Some(e) = Self::write_error(st) {
            return Err(e);
        }
        if st.send.credit == 0 {
            return Ok(Reserve::WaitStream);
        }
        let n = want.min(st.send.credit as usize);
        if st.send.reserved >= n {
            return Ok(Reserve::Ready(n));
        }
        if !st.send.has_room() {
            return Ok(Reserve::WaitStream);
        }
        let extra = n - st.send.reserved;
        if self.queued_total + extra > budget && self.queued_total > 0 {
            self.budget_waiting = true;
            return Ok(Reserve::WaitBudget);
        }
        st.send.reserved += extra;
        st.send.queued += extra;
        self.queued_total += extra;
        Ok(Reserve::Ready(n))
    }

    /// Queue a `Data` frame built in place: `frame` holds [`FRAME_HEADER`] bytes of room followed
    /// by at most the reserved number of payload bytes.
    pub fn send_data(&mut self, id: u32, mut frame: BytesMut) -> io::Result<()> {
        let n = frame.len() - FRAME_HEADER;
        frame[0] = FrameKind::Data as u8;
        frame[1..FRAME_HEADER].copy_from_slice(&id.to_be_bytes());
        let Some(st) = self.streams.get_mut(&id) else { return Err(self.gone()) };
        if let Some(e) = Self::write_error(st) {
            return Err(e);
        }
        assert!(n <= st.send.credit as usize && n <= st.send.reserved, "send_data beyond the reservation");
        st.send.credit -= n as u32;
        st.send.reserved -= n;
        self.enqueue(id, frame.freeze());
        Ok(())
    }

    /// Give back budget reserved but not used.
    pub fn release_reservation(&mut self, id: u32) {
        let Some(st) = self.streams.get_mut(&id) else { return };
        let r = std::mem::take(&mut st.send.reserved);
        if r > 0 {
            st.send.queued -= r;
            self.queued_total -= r;
            self.events.push_back(Event::BudgetFreed);
        }
    }

    /// The next received chunk of stream `id`, without copying; the window it frees is granted
    /// back to the peer (and grows while the reader keeps up, see `flow`).
    pub fn recv(&mut self, id: u32, now: Instant) -> io::Result<Recv> {
        let (max, budget) = (self.cfg.max_stream_window, self.cfg.receive_budget);
        let Some(st) = self.streams.get_mut(&id) else { return Err(self.gone()) };
        if let Some(chunk) = st.recv.pop() {
            let n = chunk.len();
            self.buffered -= n;
            if st.retired {
                // Nothing more can arrive: the bytes read leave the budget, no grant is due.
                let freed = n.min(st.held);
                st.held -= freed;
                self.granted -= freed;
            } else if st.reset.is_none() {
                let budget_left = budget.saturating_sub(self.granted);
                if let Some(g) = st.recv.flow.on_consumed(n as u32, now, self.rtt.for_growth(), max, budget_left) {
                    self.granted += g.growth as usize;
                    self.push_control(Frame::window(id, g.grant));
                }
            }
            return Ok(Recv::Chunk(chunk));
        }
        if st.recv.fin {
            return Ok(Recv::End);
        }
        if let Some((code, why)) = &st.reset {
            return Err(Error::new(*code, why.clone()).into_io());
        }
        Ok(Recv::Blocked)
    }

    /// The error once stream `id` was cut off (reset, or its session ended) before the peer
    /// finished sending; `None` while it lives (wait for [`Event::Ended`]).
    pub fn cut_off(&self, id: u32) -> Option<io::Error> {
        let Some(st) = self.streams.get(&id) else { return Some(self.gone()) };
        match &st.reset {
            Some((code, why)) if !st.recv.fin => Some(Error::new(*code, why.clone()).into_io()),
            _ => None,
        }
    }

    /// Half-close stream `id`: we will write no more.
    pub fn finish(&mut self, id: u32) {
        self.release_reservation(id);
        let Some(st) = self.streams.get_mut(&id) else { return };
        if st.send.fin || st.reset.is_some() {
            return;
        }
        st.send.fin = true;
        self.enqueue(id, Frame::encode(FrameKind::Fin, id, &[]));
        self.forget_if_done(id);
    }

    /// Abort stream `id`: the peer's reads and writes fail with `code`. Unsent data is dropped; a
    /// stream whose `Open` never left is forgotten without a word to the peer.
    pub fn reset(&mut self, id: u32, code: ErrorCode) {
        let Some(st) = self.streams.get_mut(&id) else { return };
        if st.reset.is_some() {
            return;
        }
        st.reset = Some((ErrorCode::Closed, "the stream was reset locally".into()));
        st.send.fin = true;
        let announce = st.send.open_sent;
        self.events.push_back(Event::Ended(id));
        self.discard_queue(id);
        self.discard_received(id);
        if announce {
            self.push_control(Frame::rst(id, code));
        }
        self.forget_if_done(id);
    }

    /// The handle of stream `id` is gone: finish our side (data already queued is delivered) and,
    /// if the peer is still sending, reset the stream so it stops.
    pub fn stream_dropped(&mut self, id: u32) {
        let Some(st) = self.streams.get_mut(&id) else { return };
        st.handle = false;
        let r = std::mem::take(&mut st.send.reserved);
        st.send.queued -= r;
        self.queued_total -= r;
        if r > 0 {
            self.events.push_back(Event::BudgetFreed);
        }
        let st = self.streams.get_mut(&id).expect("present");
        if st.reset.is_none() {
            let recv_done = st.recv.fin;
            if !st.send.fin {
                st.send.fin = true;
                self.enqueue(id, Frame::encode(FrameKind::Fin, id, &[]));
            }
            if !recv_done {
                // The peer is still sending and nobody will read: tell it to stop, after the data
                // and `Fin` already queued.
                self.enqueue(id, Frame::rst(id, ErrorCode::Closed));
                self.discard_received(id);
                let st = self.streams.get_mut(&id).expect("present");
                st.reset = Some((ErrorCode::Closed, "the stream was dropped".into()));
            }
        }
        self.forget_if_done(id);
    }

    /// Retire a stream that has finished (no longer counted as open, its window returned to the
    /// budget) and drop it from the table once nothing refers to it.
    fn forget_if_done(&mut self, id: u32) {
        let Some(st) = self.streams.get_mut(&id) else { return };
        if st.finished() && !st.retired {
            st.retired = true;
            self.live -= 1;
            // The window's room that holds no data goes back to the budget now; the unread bytes
            // stay counted until they are read or dropped.
            st.held = st.recv.bytes.min(st.recv.flow.window() as usize);
            self.granted -= st.recv.flow.window() as usize - st.held;
            if self.live == 0 {
                self.events.push_back(Event::Idle);
            }
        }
        if st.retired && !st.handle && st.send.queue.is_empty() {
            let st = self.streams.remove(&id).expect("present");
            self.buffered -= st.recv.bytes;
            self.granted -= st.held;
            self.queued_total -= st.send.queued;
            if !st.recv.fin {
                self.late_credit += u64::from(st.recv.flow.credit());
            }
        }
    }

    /// Drop a stream's queued data frames (it was reset): their budget is returned.
    fn discard_queue(&mut self, id: u32) {
        let Some(st) = self.streams.get_mut(&id) else { return };
        let dropped = st.send.discard();
        self.queued_total -= dropped;
        self.events.push_back(Event::BudgetFreed);
    }

    /// Drop what a stream has received and not read (it was reset locally).
    fn discard_received(&mut self, id: u32) {
        let Some(st) = self.streams.get_mut(&id) else { return };
        self.buffered -= st.recv.discard();
        self.granted -= std::mem::take(&mut st.held);
    }
}
