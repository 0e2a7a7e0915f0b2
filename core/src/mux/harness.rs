//! Two [`Connection`]s joined by a simulated link on a virtual clock (quinn-proto's `Pair` is the
//! model), and the session's protocol tests on it: window growth, the session budget, fairness
//! with an exact bound, keepalive and write-stall deadlines, half-close, resets, `GoAway` and
//! drain. No runtime, no sleep, no real clock: every figure is exact and every test runs in
//! milliseconds.
//!
//! The link, each way: frames are serialised at `rate` bytes/s and arrive `delay` later. The
//! sender's transport takes frames while at most `queue` bytes wait to be serialised (a socket
//! buffer), so a full link pushes back on the connection as a real one does.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

use super::connection::{Connection, Event, Recv, Reserve, MAX_OWED_REPLIES, MAX_PING};
use super::frame::{Frame, FrameKind, FRAME_HEADER};
use super::{MuxConfig, Role, MAX_DATA, WINDOW};
use crate::error::{Error, ErrorCode};

/// One end: its connection, what is on its way to it, and its outgoing link.
pub(super) struct End {
    pub(super) conn: Connection,
    /// Messages in flight towards this end, by arrival time.
    inbound: VecDeque<(Instant, Bytes)>,
    /// When the outgoing link finishes serialising what it was given.
    link_free: Instant,
    /// The transport takes frames but never reports them written (a peer that stopped reading).
    pub(super) stuck: bool,
    /// A stuck end handed its batch to the transport.
    stalled: bool,
    /// Everything this end sends is lost (the peer hears nothing).
    pub(super) mute: bool,
    /// Events seen, for assertions.
    pub(super) events: Vec<Event>,
}

/// Two connections over a simulated link.
pub(super) struct Pair {
    pub(super) now: Instant,
    pub(super) client: End,
    pub(super) server: End,
    delay: Duration,
    rate: f64,
    queue: usize,
}

/// Which end.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Side {
    Client,
    Server,
}

impl Pair {
    pub(super) fn new(delay: Duration, rate: f64, queue: usize, cfg: MuxConfig) -> Pair {
        let now = Instant::now();
        let end = |role| End {
            conn: Connection::new(role, cfg.clone(), now),
            inbound: VecDeque::new(),
            link_free: now,
            stuck: false,
            stalled: false,
            mute: false,
            events: Vec::new(),
        };
        Pair { now, client: end(Role::Client), server: end(Role::Server), delay, rate, queue }
    }

    pub(super) fn end(&mut self, side: Side) -> &mut End {
        match side {
            Side::Client => &mut self.client,
            Side::Server => &mut self.server,
        }
    }

    fn serialise(&self, n: usize) -> Duration {
        Duration::from_secs_f64(n as f64 / self.rate)
    }

    /// Move frames out of `from`'s connection onto the link towards the other end, while the
    /// link's backlog is within `queue`. A stuck end takes one batch and never finishes writing it.
    fn transmit(&mut self, from: Side) {
        let (now, delay, rate) = (self.now, self.delay, self.rate);
        let queue = self.serialise(self.queue);
        let to = if from == Side::Client { Side::Server } else { Side::Client };
        let mut out = Vec::new();
        loop {
            let e = self.end(from);
            if e.stuck {
                if !e.stalled {
                    e.conn.poll_transmit(now, &mut out, usize::MAX, usize::MAX);
                    e.stalled = !out.is_empty();
                }
                return;
            }
            if e.link_free.saturating_duration_since(now) > queue {
                return;
            }
            out.clear();
            if e.conn.poll_transmit(now, &mut out, 1, 1) == 0 {
                return;
            }
            e.conn.on_transmitted();
            let f = out.pop().expect("one frame");
            e.link_free = e.link_free.max(now) + Duration::from_secs_f64(f.len() as f64 / rate);
            let (arrive, mute) = (e.link_free + delay, e.mute);
            if !mute {
                self.end(to).inbound.push_back((arrive, f));
            }
        }
    }

    /// Do everything due at `now` on both ends: deliver, time out, transmit; collect events.
    pub(super) fn drive(&mut self) {
        for side in [Side::Client, Side::Server] {
            let now = self.now;
            let e = self.end(side);
            while e.inbound.front().is_some_and(|(t, _)| *t <= now) {
                let (_, m) = e.inbound.pop_front().expect("checked");
                e.conn.handle_input(now, m);
            }
            if e.conn.poll_timeout().is_some_and(|t| t <= now) {
                e.conn.handle_timeout(now);
            }
            self.transmit(side);
            let e = self.end(side);
            while let Some(ev) = e.conn.poll_event() {
                e.events.push(ev);
            }
        }
    }

    /// The next instant something is due on either end (an arrival, a deadline, link room).
    fn next_due(&mut self) -> Option<Instant> {
        let now = self.now;
        let queue = self.serialise(self.queue);
        let mut due: Option<Instant> = None;
        let mut at = |t: Instant| due = Some(due.map_or(t, |d| d.min(t)));
        for e in [&self.client, &self.server] {
            if let Some((t, _)) = e.inbound.front() {
                at(*t);
            }
            if let Some(t) = e.conn.poll_timeout() {
                at(t);
            }
            if e.conn.wants_transmit() && !e.stuck && e.link_free > now + queue {
                at(e.link_free - queue);
            }
        }
        due.map(|t| t.max(now))
    }

    /// Drive both ends, letting `step` act at every instant something happens, until it returns
    /// `true` or `limit` of virtual time passes; returns the virtual time it took.
    pub(super) fn run(&mut self, limit: Duration, mut step: impl FnMut(&mut Pair) -> bool) -> Duration {
        let start = self.now;
        let mut same_instant = 0;
        loop {
            self.drive();
            if step(self) {
                return self.now - start;
            }
            self.drive();
            let next = self.next_due().expect("something is always due while the session lives");
            assert!(next - start <= limit, "not done within {limit:?} of virtual time");
            if next > self.now {
                self.now = next;
                same_instant = 0;
            } else {
                same_instant += 1;
                assert!(same_instant < 100_000, "no progress at one instant");
            }
        }
    }

    /// Step until the deadline `limit` from now (nothing to wait for).
    pub(super) fn idle_for(&mut self, d: Duration) {
        let until = self.now + d;
        loop {
            self.drive();
            match self.next_due() {
                Some(t) if t <= until => self.now = t.max(self.now + Duration::from_nanos(1)),
                _ => break,
            }
        }
        self.now = until;
        self.drive();
    }
}

/// Write as much of `data` as the stream takes now; returns how many bytes.
pub(super) fn write(conn: &mut Connection, id: u32, data: &[u8]) -> usize {
    let mut done = 0;
    while done < data.len() {
        match conn.reserve(id, data.len() - done) {
            Ok(Reserve::Ready(n)) => {
                let mut f = BytesMut::with_capacity(FRAME_HEADER + n);
                f.put_bytes(0, FRAME_HEADER);
                f.put_slice(&data[done..done + n]);
                conn.send_data(id, f).expect("reserved");
                done += n;
            }
            Ok(_) => break,
            Err(e) => panic!("write on stream {id} failed: {e}"),
        }
    }
    done
}

/// Read what the stream has now into `into`; `true` once it ended.
pub(super) fn read(conn: &mut Connection, id: u32, now: Instant, into: &mut Vec<u8>) -> bool {
    loop {
        match conn.recv(id, now).expect("read") {
            Recv::Chunk(c) => into.extend_from_slice(&c),
            Recv::End => return true,
            Recv::Blocked => return false,
        }
    }
}

/// Read and discard; returns the bytes read.
fn sink(conn: &mut Connection, id: u32, now: Instant) -> usize {
    let mut n = 0;
    while let Ok(Recv::Chunk(c)) = conn.recv(id, now) {
        n += c.len();
    }
    n
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n as u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect()
}

fn short_keepalive() -> MuxConfig {
    MuxConfig { keepalive_interval: Duration::from_millis(100), keepalive_timeout: Duration::from_millis(400), ..MuxConfig::default() }
}

fn code_of(e: std::io::Error) -> ErrorCode {
    Error::from_io(e, "").code()
}

#[test]
fn a_fast_reader_grows_its_window_while_an_idle_stream_keeps_the_initial_one() {
    let mut p = Pair::new(Duration::from_millis(10), 200e6, 256 * 1024, MuxConfig::default());
    p.run(Duration::from_secs(1), |p| p.server.conn.stats().rtt.is_some());
    let bulk = p.client.conn.open(p.now).unwrap();
    let idle = p.client.conn.open(p.now).unwrap();
    assert_eq!(write(&mut p.client.conn, idle, b"x"), 1);
    let total = 24 * 1024 * 1024;
    let data = pattern(total);
    let (mut sent, mut got, mut ids) = (0, Vec::new(), Vec::new());
    let t = p.run(Duration::from_secs(10), |p| {
        while let Some(id) = p.server.conn.accept() {
            ids.push(id);
        }
        sent += write(&mut p.client.conn, bulk, &data[sent..]);
        if sent == total {
            p.client.conn.finish(bulk);
        }
        if let Some(&id) = ids.first() {
            read(&mut p.server.conn, id, p.now, &mut got);
        }
        got.len() == total
    });
    assert!(got == data, "bytes differ");
    let (bulk_in, idle_in) = (ids[0], ids[1]);
    let grown = p.server.conn.window(bulk_in);
    assert!(grown >= 16 * WINDOW, "the bulk stream's window grew to {grown} only");
    assert_eq!(p.server.conn.window(idle_in), WINDOW, "an idle stream keeps the initial window");
    // 24 MiB at 200 MB/s is 126 ms on the wire; slow-start of the window adds a few round trips.
    assert!(t < Duration::from_millis(126 + 10 * 20), "took {t:?} of virtual time");
    p.client.conn.check_bounds().unwrap();
    p.server.conn.check_bounds().unwrap();
}

#[test]
fn the_session_budget_bounds_what_stalled_readers_hold_and_another_stream_keeps_moving() {
    let budget = 40 * 1024 * 1024;
    let cfg = MuxConfig { receive_budget: budget, ..MuxConfig::default() };
    let mut p = Pair::new(Duration::from_millis(5), 400e6, 512 * 1024, cfg);
    p.run(Duration::from_secs(1), |p| p.server.conn.stats().rtt.is_some());
    let chunk = vec![2u8; MAX_DATA];
    let outs: Vec<u32> = (0..100).map(|_| p.client.conn.open(p.now).unwrap()).collect();
    let mut ins: Vec<(u32, usize)> = Vec::new();
    let (mut peak, mut stalled_at) = (0, None);
    // Every reader reads 2 MiB fast (so windows grow), then stops for good; writers never stop.
    p.run(Duration::from_secs(5), |p| {
        for &o in &outs {
            write(&mut p.client.conn, o, &chunk);
        }
        while let Some(id) = p.server.conn.accept() {
            ins.push((id, 0));
        }
        for (id, n) in ins.iter_mut() {
            if *n < 2 * 1024 * 1024 {
                *n += sink(&mut p.server.conn, *id, p.now);
            }
        }
        let st = p.server.conn.stats();
        peak = peak.max(st.buffered);
        assert!(st.granted <= budget.max(100 * WINDOW as usize), "granted {} with a budget of {budget}", st.granted);
        p.server.conn.check_bounds().unwrap();
        if stalled_at.is_none() && ins.len() == 100 && ins.iter().all(|(_, n)| *n >= 2 * 1024 * 1024) {
            stalled_at = Some(p.now);
        }
        // Then the writers keep pushing for 200 ms (40 round trips) against the stalled readers.
        stalled_at.is_some_and(|t| p.now >= t + Duration::from_millis(200))
    });
    assert!(peak <= budget, "stalled readers hold {peak} bytes with a budget of {budget}");
    assert!(p.server.conn.stats().buffered >= 100 * WINDOW as usize, "the streams did fill their windows ({peak})");
    // A fresh stream still moves 8 MiB both ways, hashed.
    let a = p.client.conn.open(p.now).unwrap();
    let data = pattern(8 * 1024 * 1024);
    let (mut sent, mut back_sent, mut b, mut got, mut back) = (0, 0, None, Vec::new(), Vec::new());
    p.run(Duration::from_secs(5), |p| {
        sent += write(&mut p.client.conn, a, &data[sent..]);
        if b.is_none() {
            b = p.server.conn.accept();
        }
        if let Some(b) = b {
            read(&mut p.server.conn, b, p.now, &mut got);
            back_sent += write(&mut p.server.conn, b, &data[back_sent..got.len()]);
        }
        read(&mut p.client.conn, a, p.now, &mut back);
        back.len() == data.len()
    });
    assert!(got == data && back == data, "bytes differ");
}

/// A stream that received `Fin` and whose reader stopped keeps its unread bytes counted in the
/// session budget after it retires: another stream cannot grow its window into that room, so
/// what the session buffers stays within the budget (the hole was: retiring returned the whole
/// window while its data stayed buffered). Reading the finished stream, then dropping it, gives
/// the room back.
#[test]
fn a_finished_unread_stream_keeps_its_bytes_in_the_session_budget() {
    let budget = 8 * 1024 * 1024;
    let cfg = MuxConfig { receive_budget: budget, ..MuxConfig::default() };
    let mut p = Pair::new(Duration::from_millis(5), 400e6, 512 * 1024, cfg);
    p.run(Duration::from_secs(1), |p| p.server.conn.stats().rtt.is_some());
    let chunk = vec![5u8; MAX_DATA];
    // Stream A: the server finishes its side at once and reads fast until A's window has taken
    // the whole budget, then stops reading; the client fills the window and finishes.
    let a = p.client.conn.open(p.now).unwrap();
    write(&mut p.client.conn, a, b"a");
    let mut a_in = None;
    p.run(Duration::from_secs(5), |p| {
        write(&mut p.client.conn, a, &chunk);
        if a_in.is_none() {
            a_in = p.server.conn.accept();
            if let Some(id) = a_in {
                p.server.conn.finish(id);
            }
        }
        if let Some(id) = a_in {
            sink(&mut p.server.conn, id, p.now);
            return p.server.conn.window(id) as usize >= budget;
        }
        false
    });
    let a_in = a_in.expect("accepted");
    let t = p.now;
    p.run(Duration::from_secs(5), |p| {
        write(&mut p.client.conn, a, &chunk);
        p.now >= t + Duration::from_millis(100)
    });
    p.client.conn.finish(a);
    p.run(Duration::from_secs(1), |p| p.server.conn.stream_count() == 0);
    let held = p.server.conn.stats().buffered;
    assert!(held >= budget / 2, "the finished stream A buffers {held} bytes unread");
    // Stream B reads fast for 200 ms (it would grow into whatever room the budget shows), then
    // stops for 200 ms while its writer keeps pushing.
    let b = p.client.conn.open(p.now).unwrap();
    write(&mut p.client.conn, b, b"b");
    let (mut b_in, mut b_read, mut peak) = (None, 0, 0);
    let t = p.now;
    p.run(Duration::from_secs(5), |p| {
        write(&mut p.client.conn, b, &chunk);
        if b_in.is_none() {
            b_in = p.server.conn.accept();
        }
        if let Some(id) = b_in {
            if p.now < t + Duration::from_millis(200) {
                b_read += sink(&mut p.server.conn, id, p.now);
            }
        }
        let st = p.server.conn.stats();
        peak = peak.max(st.buffered);
        p.server.conn.check_bounds().unwrap();
        p.now >= t + Duration::from_millis(400)
    });
    let b_in = b_in.expect("accepted");
    assert!(b_read >= 2 * 1024 * 1024, "B moved only {b_read} bytes while A sat unread");
    assert!(peak <= budget + 2 * WINDOW as usize, "A unread and B stalled buffer {peak} bytes with a budget of {budget}");
    // Reading A to its end returns its room, and B grows into it once its reader is back.
    let granted = p.server.conn.stats().granted;
    let mut got = Vec::new();
    assert!(read(&mut p.server.conn, a_in, p.now, &mut got), "A reads to its end");
    assert_eq!(got.len(), held);
    assert_eq!(p.server.conn.stats().granted, granted - held, "A's bytes leave the budget as they are read");
    let before = p.server.conn.window(b_in);
    let t = p.now;
    p.run(Duration::from_secs(5), |p| {
        write(&mut p.client.conn, b, &chunk);
        sink(&mut p.server.conn, b_in, p.now);
        p.server.conn.check_bounds().unwrap();
        p.now >= t + Duration::from_millis(300)
    });
    assert!(p.server.conn.window(b_in) > before, "B's window stayed at {before} after A was read");
    p.server.conn.stream_dropped(a_in);
    p.server.conn.check_bounds().unwrap();
}

/// The exact fairness bound: a ping's frame waits behind at most what the link already holds
/// (`queue` bytes and the frame being serialised) plus one frame of each bulk stream ahead of it in
/// the ring, each way; without round-robin it would wait behind the bulk streams' whole queues.
#[test]
fn an_interactive_stream_waits_behind_one_frame_per_bulk_stream_at_most() {
    let (delay, rate, queue, chunk) = (Duration::from_millis(2), 50e6, 64 * 1024, 16 * 1024);
    let mut p = Pair::new(delay, rate, queue, MuxConfig::default());
    let bulks: Vec<u32> = (0..4).map(|_| p.client.conn.open(p.now).unwrap()).collect();
    let mut bulk_in: Vec<u32> = Vec::new();
    let data = vec![3u8; chunk];
    let pump = |p: &mut Pair, bulk_in: &mut Vec<u32>| {
        for &b in &bulks {
            while write(&mut p.client.conn, b, &data) == chunk {}
        }
        while bulk_in.len() < bulks.len() {
            let Some(id) = p.server.conn.accept() else { break };
            bulk_in.push(id);
        }
        for &id in bulk_in.iter() {
            sink(&mut p.server.conn, id, p.now);
        }
    };
    // Let the bulk stream's window grow and its queue fill.
    let t0 = p.now;
    p.run(Duration::from_secs(1), |p| {
        pump(p, &mut bulk_in);
        p.now >= t0 + Duration::from_millis(300)
    });
    let ping = p.client.conn.open(p.now).unwrap();
    let mut pong = None;
    assert_eq!(bulk_in.len(), bulks.len());
    let secs = |n: usize| Duration::from_secs_f64(n as f64 / rate);
    let one_way = delay + secs(queue) + (bulks.len() + 1) as u32 * secs(FRAME_HEADER + chunk) + secs(2 * FRAME_HEADER + 1);
    let bound = 2 * one_way;
    let mut worst = Duration::ZERO;
    let mut least_backlog = usize::MAX;
    for i in 0..50u8 {
        least_backlog = least_backlog.min(p.client.conn.stats().queued);
        let t = p.now;
        assert_eq!(write(&mut p.client.conn, ping, &[i]), 1);
        let mut got = Vec::new();
        p.run(Duration::from_secs(1), |p| {
            pump(p, &mut bulk_in);
            if pong.is_none() {
                pong = p.server.conn.accept();
            }
            if let Some(id) = pong {
                let mut b = Vec::new();
                read(&mut p.server.conn, id, p.now, &mut b);
                if !b.is_empty() {
                    assert_eq!(write(&mut p.server.conn, id, &b), b.len());
                }
            }
            read(&mut p.client.conn, ping, p.now, &mut got);
            !got.is_empty()
        });
        assert_eq!(got, [i]);
        worst = worst.max(p.now - t);
    }
    let unfair = 2 * (delay + secs(queue) + secs(least_backlog));
    assert!(worst <= bound, "a round trip took {worst:?}, more than {bound:?}");
    assert!(bound * 3 / 2 < unfair, "the bound ({bound:?}) is well below waiting behind the bulk queue ({unfair:?}, {least_backlog} bytes)");
}

#[test]
fn a_silent_peer_is_dropped_exactly_at_the_keepalive_timeout() {
    let cfg = short_keepalive();
    let mut p = Pair::new(Duration::from_millis(1), 1e9, 1 << 20, cfg.clone());
    p.idle_for(Duration::from_secs(2));
    assert!(!p.client.conn.is_closed(), "pings keep a quiet session alive");
    let id = p.client.conn.open(p.now).unwrap();
    p.server.mute = true;
    let heard = p.now; // the last pong is in flight for at most 2 ms
    p.run(Duration::from_secs(2), |p| p.client.conn.is_closed());
    let e = p.client.conn.close_reason().unwrap();
    assert_eq!(e.code(), ErrorCode::RelayUnavailable);
    assert!(e.message().contains("keepalive timeout"), "{e}");
    let after = p.now - heard;
    assert!(after >= cfg.keepalive_timeout - Duration::from_millis(100) && after <= cfg.keepalive_timeout, "closed {after:?} after the last word");
    assert!(p.client.events.contains(&Event::Ended(id)) && p.client.events.contains(&Event::Closed));
    assert_eq!(code_of(p.client.conn.recv(id, p.now).unwrap_err()), ErrorCode::RelayUnavailable, "a stream of a dead session fails");
}

#[test]
fn a_peer_that_stops_reading_is_dropped_at_the_write_stall_deadline() {
    let cfg = short_keepalive();
    let mut p = Pair::new(Duration::from_millis(1), 1e9, 1 << 20, cfg.clone());
    p.client.stuck = true;
    let id = p.client.conn.open(p.now).unwrap();
    write(&mut p.client.conn, id, &[7; 1000]);
    let t0 = p.now;
    p.run(Duration::from_secs(2), |p| p.client.conn.is_closed());
    let e = p.client.conn.close_reason().unwrap();
    assert!(e.message().contains("write stall"), "{e}");
    assert_eq!(p.now - t0, cfg.keepalive_timeout, "the deadline is exact");
    assert!(p.client.events.contains(&Event::Ended(id)), "the writer is woken");
    assert!(p.client.conn.reserve(id, 1).is_err());
}

#[test]
fn half_close_delivers_both_ways_and_retires_the_stream() {
    let mut p = Pair::new(Duration::from_millis(3), 100e6, 1 << 20, MuxConfig::default());
    let a = p.client.conn.open(p.now).unwrap();
    write(&mut p.client.conn, a, b"hello");
    p.client.conn.finish(a);
    assert!(p.client.conn.reserve(a, 1).is_err(), "no writes after finish");
    let (mut b, mut got, mut back, mut answered) = (None, Vec::new(), Vec::new(), false);
    p.run(Duration::from_secs(1), |p| {
        if b.is_none() {
            b = p.server.conn.accept();
        }
        if let Some(b) = b {
            if read(&mut p.server.conn, b, p.now, &mut got) && !answered {
                write(&mut p.server.conn, b, b"world");
                p.server.conn.finish(b);
                answered = true;
            }
        }
        let _ = read(&mut p.client.conn, a, p.now, &mut back);
        answered && p.client.conn.stream_count() == 0 && p.server.conn.stream_count() == 0
    });
    assert_eq!((&got[..], &back[..]), (&b"hello"[..], &b"world"[..]));
    assert_eq!(p.client.conn.recv(a, p.now).unwrap(), Recv::End);
    assert!(p.client.events.contains(&Event::Idle) && p.server.events.contains(&Event::Idle));
    p.client.conn.stream_dropped(a);
    p.server.conn.stream_dropped(b.unwrap());
    p.idle_for(Duration::from_millis(20));
    assert_eq!(p.client.conn.stats(), super::SessionStats { rtt: p.client.conn.stats().rtt, ..Default::default() });
    assert_eq!(p.server.conn.stats(), super::SessionStats { rtt: p.server.conn.stats().rtt, ..Default::default() });
}

#[test]
fn a_reset_reaches_the_peer_with_its_code_and_frees_the_budget() {
    let mut p = Pair::new(Duration::from_millis(3), 100e6, 1 << 20, MuxConfig::default());
    let a = p.client.conn.open(p.now).unwrap();
    write(&mut p.client.conn, a, &[1; 100_000]);
    let mut b = None;
    p.run(Duration::from_secs(1), |p| {
        b = b.or_else(|| p.server.conn.accept());
        b.is_some() && p.server.conn.stats().buffered == 100_000
    });
    let b = b.unwrap();
    p.server.conn.reset(b, ErrorCode::NotAllowed);
    assert_eq!(p.server.conn.stats().buffered, 0, "a local reset drops what was received");
    p.run(Duration::from_secs(1), |p| p.client.conn.cut_off(a).is_some());
    let e = p.client.conn.reserve(a, 1).unwrap_err();
    assert_eq!(code_of(e), ErrorCode::NotAllowed);
    assert!(p.client.events.contains(&Event::Ended(a)));
    assert_eq!(p.client.conn.stream_count(), 0);
    assert_eq!(p.client.conn.stats().queued, 0);
    // Late data the client had queued before it heard of the reset is dropped, not an error.
    p.idle_for(Duration::from_millis(50));
    assert!(!p.server.conn.is_closed() && !p.client.conn.is_closed());
}

#[test]
fn go_away_refuses_new_streams_and_drain_ends_on_the_last_stream() {
    let mut p = Pair::new(Duration::from_millis(3), 100e6, 1 << 20, MuxConfig::default());
    let a = p.client.conn.open(p.now).unwrap();
    write(&mut p.client.conn, a, b"x");
    let mut b = None;
    p.run(Duration::from_secs(1), |p| {
        b = b.or_else(|| p.server.conn.accept());
        b.is_some()
    });
    p.server.conn.go_away();
    p.idle_for(Duration::from_millis(20)); // the GoAway arrives
    assert_eq!(p.client.conn.open(p.now).unwrap_err().code(), ErrorCode::RelayUnavailable);
    // The existing stream still works both ways; when it ends the server sees `Idle`.
    let b = b.unwrap();
    write(&mut p.server.conn, b, b"y");
    p.server.conn.finish(b);
    let mut got = Vec::new();
    p.run(Duration::from_secs(1), |p| {
        if read(&mut p.client.conn, a, p.now, &mut got) {
            p.client.conn.finish(a);
        }
        p.server.events.contains(&Event::Idle)
    });
    assert_eq!(got, b"y");
    assert_eq!(p.server.conn.stream_count(), 0);
    // Closing with a notice: the client reports the notice's code once the transport ends.
    p.server.conn.close_with_notice(ErrorCode::NameTaken, "the name was taken over");
    p.run(Duration::from_secs(1), |p| p.client.inbound.is_empty() && !p.server.conn.wants_transmit());
    p.client.conn.transport_ended(None);
    let e = p.client.conn.close_reason().unwrap();
    assert_eq!((e.code(), e.message()), (ErrorCode::NameTaken, "the name was taken over"));
}

#[test]
fn a_peer_beyond_its_credit_breaks_the_protocol() {
    let mut c = Connection::new(Role::Server, MuxConfig::default(), Instant::now());
    let now = Instant::now();
    c.handle_input(now, Frame::encode(FrameKind::Open, 1, &[]));
    for _ in 0..WINDOW as usize / MAX_DATA {
        c.handle_input(now, Frame::encode(FrameKind::Data, 1, &vec![0; MAX_DATA]));
    }
    assert!(!c.is_closed());
    c.handle_input(now, Frame::encode(FrameKind::Data, 1, &[0]));
    let e = c.close_reason().unwrap();
    assert_eq!(e.code(), ErrorCode::Protocol);
    assert!(e.message().contains("window"), "{e}");
}

#[test]
fn hostile_frames_end_the_session_with_protocol() {
    let now = Instant::now();
    let cases: Vec<(Vec<Bytes>, &str)> = vec![
        (vec![Frame::encode(FrameKind::Data, 9, &[0; 10])], "never opened"),
        (vec![Frame::encode(FrameKind::Ping, 0, &[0; MAX_PING + 1])], "ping"),
        (vec![Frame::encode(FrameKind::Open, 2, &[])], "not a fresh id"),
        (vec![Frame::encode(FrameKind::Open, 1, &[]), Frame::encode(FrameKind::Open, 1, &[])], "not a fresh id"),
        (vec![Frame::encode(FrameKind::Open, 1, &[]), Frame::encode(FrameKind::Fin, 1, &[]), Frame::encode(FrameKind::Fin, 1, &[])], "twice"),
        (vec![Frame::encode(FrameKind::Data, 0, &vec![0; MAX_DATA + 1])], "data frame"),
        (vec![Bytes::from_static(b"\x63\0\0\0\0")], "unknown"),
        (vec![Frame::encode(FrameKind::Ping, 0, &[0; 8]); MAX_OWED_REPLIES + 1], "faster than it reads"),
    ];
    for (frames, what) in cases {
        let mut c = Connection::new(Role::Server, MuxConfig::default(), now);
        for f in frames {
            c.handle_input(now, f);
        }
        let e = c.close_reason().unwrap_or_else(|| panic!("{what}: still open"));
        assert_eq!(e.code(), ErrorCode::Protocol, "{what}: {e}");
        assert!(e.message().contains(what), "{what}: {e}");
        c.check_bounds().unwrap();
    }
}

#[test]
fn late_data_on_a_closed_stream_is_bounded_by_the_credit_the_peer_had() {
    let now = Instant::now();
    let mut c = Connection::new(Role::Server, MuxConfig::default(), now);
    c.handle_input(now, Frame::encode(FrameKind::Open, 1, &[]));
    let id = c.accept().unwrap();
    c.reset(id, ErrorCode::Closed);
    c.stream_dropped(id);
    let chunk = vec![0u8; MAX_DATA];
    for _ in 0..(WINDOW as usize / MAX_DATA) {
        c.handle_input(now, Frame::encode(FrameKind::Data, 1, &chunk));
    }
    assert!(!c.is_closed(), "late data within the peer's credit is legitimate");
    c.handle_input(now, Frame::encode(FrameKind::Data, 1, &chunk));
    assert!(c.close_reason().unwrap().message().contains("beyond the credit"));
}

#[test]
fn a_full_accept_backlog_refuses_with_a_reset_and_tolerates_the_early_data() {
    let now = Instant::now();
    let mut c = Connection::new(Role::Server, MuxConfig { accept_backlog: 1, ..MuxConfig::default() }, now);
    c.handle_input(now, Frame::encode(FrameKind::Open, 1, &[]));
    c.handle_input(now, Frame::encode(FrameKind::Open, 3, &[]));
    c.handle_input(now, Frame::encode(FrameKind::Data, 3, &[1; 1000]));
    assert!(!c.is_closed());
    let mut out = Vec::new();
    c.poll_transmit(now, &mut out, 100, usize::MAX);
    let rsts: Vec<Frame> = out.into_iter().map(|f| Frame::decode(f).unwrap()).filter(|f| f.kind == FrameKind::Rst).collect();
    assert_eq!(rsts.len(), 2, "the refusal, and the answer to the late data");
    assert!(rsts.iter().all(|f| f.stream == 3));
    assert_eq!(c.accept(), Some(1));
    assert_eq!(c.accept(), None);
}

#[test]
fn the_round_trip_is_measured_from_pings_on_the_virtual_clock() {
    let mut p = Pair::new(Duration::from_millis(25), 1e9, 1 << 20, MuxConfig::default());
    p.run(Duration::from_secs(1), |p| p.client.conn.stats().rtt.is_some() && p.server.conn.stats().rtt.is_some());
    let rtt = p.client.conn.stats().rtt.unwrap();
    assert!(rtt >= Duration::from_millis(50) && rtt < Duration::from_micros(50_100), "{rtt:?}");
}

#[test]
fn frames_handed_to_a_transport_that_has_not_written_them_stay_in_the_write_budget() {
    let cfg = MuxConfig::default();
    let mut p = Pair::new(Duration::from_millis(1), 1e9, 1 << 20, cfg.clone());
    p.client.stuck = true;
    let ids: Vec<u32> = (0..40).map(|_| p.client.conn.open(p.now).unwrap()).collect();
    let chunk = vec![5u8; MAX_DATA];
    let mut written = 0;
    for _ in 0..3 {
        for &id in &ids {
            loop {
                let n = write(&mut p.client.conn, id, &chunk);
                if n == 0 {
                    break;
                }
                written += n;
            }
        }
        p.idle_for(Duration::from_millis(5)); // the stuck transport takes one batch, then nothing
    }
    let queued = p.client.conn.stats().queued;
    assert!(written <= cfg.write_budget + MAX_DATA, "{written} bytes accepted with a write budget of {}", cfg.write_budget);
    assert!(queued >= cfg.write_budget / 2 && queued <= cfg.write_budget + MAX_DATA, "{queued} bytes queued");
    p.client.conn.check_bounds().unwrap();
}
