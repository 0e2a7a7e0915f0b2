//! One function per fuzz target, each taking raw peer bytes. Shared by the cargo-fuzz targets
//! (`fuzz/fuzz_targets/*.rs`) and the stable regression test `core/tests/it/fuzz_regressions.rs`,
//! which includes this file with `#[path]`, so it may use only `libtunnel` and the crates libtunnel
//! itself depends on.
//!
//! Each entry must never panic on any input, and asserts that whatever the parser accepts is sane:
//! answers are bounded, accepted values re-encode to the bytes they came from, normalised hosts are
//! stable, and nothing unauthenticated is accepted. Every wait is bounded.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::FutureExt;
use libtunnel::auth::KeySet;
use libtunnel::egress::allowlist::{Allowlist, NameDecision, TargetHost};
use libtunnel::identity::{derived_name, valid_name, verify_registration, DERIVED_NAME_LEN};
use libtunnel::mux::{Connection, MuxConfig, Recv, Reserve, Role};
use libtunnel::protocol::{self, Frame, Hello, HelloAck, ListenAck, ListenHello, ServerConnect, StreamHeader};
use libtunnel::socks::{self, ServerAuth, Target};
use libtunnel::{Dialer, Key, Mode, RelayConfig};
use socks5_proto::Address;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The key every entry's relay side accepts.
pub const KID: u32 = 7;
const SECRET: &[u8] = b"fuzz-shared-secret-0123456789abcdef";
/// The relay nonce the entries use (what a `ServerConnect` would have carried).
pub const NONCE: [u8; 32] = [0x5a; 32];
/// Most bytes the relay side may write in answer to one input.
const MAX_ANSWER: usize = 64 * 1024;

pub fn key() -> Key {
    Key::new(KID, SECRET.to_vec()).expect("non-empty secret")
}

fn keyset() -> KeySet {
    KeySet::new([key()]).expect("one key")
}

/// The allowlist the parsers are checked against: a private range, a name, and a wildcard — but
/// never loopback.
fn allowlist() -> &'static Allowlist {
    static A: OnceLock<Allowlist> = OnceLock::new();
    A.get_or_init(|| {
        Allowlist::from_json(
            r#"[{"host":"10.0.0.0/8","port":"*"},{"host":"db.internal","port":5432},{"host":"*.svc.test","port":"8000-8100"}]"#,
            "TUNNEL_ALLOW",
        )
        .expect("valid rules")
    })
}

/// A peer in memory: reads come from the input then EOF, writes are kept (and bounded).
struct Wire<'a> {
    input: &'a [u8],
    out: Vec<u8>,
}

impl<'a> Wire<'a> {
    fn new(input: &'a [u8]) -> Self {
        Wire { input, out: Vec::new() }
    }
}

impl AsyncRead for Wire<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let n = self.input.len().min(buf.remaining());
        buf.put_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Wire<'_> {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        assert!(self.out.len() + buf.len() <= MAX_ANSWER, "answered {} input bytes with more than {MAX_ANSWER} bytes", self.input.len());
        self.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Run a future that only does in-memory I/O: it must finish without waiting.
fn at_once<F: std::future::Future>(f: F) -> F::Output {
    f.now_or_never().expect("a parser over an always-ready in-memory peer must not wait")
}

/// A current-thread runtime per calling thread (fuzzers are single-threaded; tests are not).
fn with_runtime<T>(f: impl FnOnce(&tokio::runtime::Runtime) -> T) -> T {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    }
    RT.with(|rt| f(rt))
}

// ---------------------------------------------------------------------------------------------
// SOCKS5 requests (relay side) and the host normalisation behind the allowlist
// ---------------------------------------------------------------------------------------------

/// `socks5`: first byte picks the auth mode (bit 0: classic proof, else session) and whether to
/// also run the client-side answer parser with a pipelined greeting (bit 1); the rest is what a
/// client sends. Every input is also tried as a SOCKS5 domain name against the allowlist.
pub fn socks5(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let keys = keyset();
    let auth =
        if mode & 1 == 1 { ServerAuth::Proof { keys: &keys, nonce: &NONCE, fail_delay: std::time::Duration::ZERO } } else { ServerAuth::Session };
    let mut wire = Wire::new(rest);
    if let Ok(addr) = at_once(socks::server_handshake(&mut wire, auth)) {
        check_target(&addr);
    }
    // The dialer's parser of the relay's answers (greeting choice, auth status, CONNECT reply).
    let target = Target { host: "db.internal".into(), port: 5432 };
    let mut wire = Wire::new(rest);
    let _ = at_once(socks::client_connect(&mut wire, &target, mode & 2 == 2));
    let mut wire = Wire::new(rest);
    let _ = at_once(socks::client_auth(&mut wire, &key(), &NONCE));
    // The same bytes as a domain in a CONNECT.
    let port = u16::from_be_bytes([mode, rest.first().copied().unwrap_or(0)]);
    check_target(&Address::DomainAddress(rest[..rest.len().min(255)].to_vec(), port));
}

/// What the relay would decide for a CONNECT address, with sanity checks on the normalisation.
fn check_target(addr: &Address) {
    let Ok(t) = Target::from_address(addr) else {
        return;
    };
    let allow = allowlist();
    match TargetHost::parse(&t.host) {
        Ok(TargetHost::Ip(ip)) => {
            if let IpAddr::V6(v6) = ip {
                assert!(v6.to_ipv4_mapped().is_none(), "{:?} normalised to a mapped address {ip}", t.host);
            }
            if allow.ip_allowed(ip, t.port) {
                assert!(matches!(ip, IpAddr::V4(v4) if v4.octets()[0] == 10), "{:?} ({ip}) admitted outside 10.0.0.0/8", t.host);
            }
            assert!(!(ip.is_loopback() && allow.ip_allowed(ip, t.port)), "loopback admitted: {:?}", t.host);
        }
        Ok(TargetHost::Name(n)) => {
            assert!(!n.is_empty() && n.len() <= 253, "{:?} normalised to a name of {} bytes", t.host, n.len());
            assert!(!n.ends_with('.'), "{:?} kept a trailing dot: {n:?}", t.host);
            assert!(!n.bytes().any(|b| b.is_ascii_uppercase() || !b.is_ascii()), "{:?} normalised to {n:?}", t.host);
            assert!(n.parse::<IpAddr>().is_err(), "{:?} normalised to the name {n:?}, which is an IP", t.host);
            // The resolver treats an all-numeric last label as an IPv4 number (inet_aton); the
            // normaliser must have turned such a host into an IP or refused it.
            let last = n.rsplit('.').next().unwrap_or_default();
            assert!(!last.bytes().all(|b| b.is_ascii_digit()), "{:?} normalised to the name {n:?}, which ends in a number", t.host);
            assert_eq!(TargetHost::parse(&n).ok(), Some(TargetHost::Name(n.clone())), "normalising {n:?} again changes it");
            let d = allow.check_name(&n, t.port);
            if d == NameDecision::Allowed {
                assert!(n == "db.internal" || n.ends_with(".svc.test"), "{:?} admitted by name as {n:?}", t.host);
            }
        }
        Err(_) => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Multiplexed framing
// ---------------------------------------------------------------------------------------------

/// `mux_frames`: first byte picks the role (bit 0: we are the client side); the rest is records
/// `len u16 BE | frame bytes`, fed as transport messages, 1 ms of virtual time apart, to a sans-IO
/// [`Connection`] whose accepted streams are read to their end and answered. No runtime, no
/// timeout: the connection's memory bounds are checked after every input, no stream yields more
/// than the input carried, and every stream ends (cleanly or with an error) once the input does.
pub fn mux_frames(data: &[u8]) {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let mut frames = Vec::new();
    while rest.len() >= 2 && frames.len() < 512 {
        let n = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        frames.push(Bytes::copy_from_slice(&rest[2..2 + n]));
        rest = &rest[2 + n..];
    }
    for f in &frames {
        if let Ok(fr) = Frame::decode(f.clone()) {
            assert_eq!(&Frame::encode(fr.kind, fr.stream, &fr.payload)[..], &f[..], "a decoded frame re-encodes differently");
        }
    }
    let role = if flags & 1 == 1 { Role::Client } else { Role::Server };
    let total: usize = frames.iter().map(|f| f.len()).sum();
    let cfg = MuxConfig { max_streams: 8, accept_backlog: 4, write_budget: 256 * 1024, ..MuxConfig::default() };
    let mut now = std::time::Instant::now();
    let mut conn = Connection::new(role, cfg, now);
    // Streams we hold: id, bytes read, whether it ended (and was answered).
    let mut streams: Vec<(u32, usize, bool)> = Vec::new();
    // One stream of our own, so frames for our id parity find a stream too.
    if let Ok(id) = conn.open(now) {
        if let Ok(Reserve::Ready(n)) = conn.reserve(id, 1024) {
            let mut f = bytes::BytesMut::zeroed(libtunnel::protocol::FRAME_HEADER);
            f.extend_from_slice(&vec![0x42; n]);
            conn.send_data(id, f).expect("reserved");
        }
        streams.push((id, 0, false));
    }
    let mut out = Vec::new();
    for f in frames {
        now += Duration::from_millis(1);
        conn.handle_input(now, f);
        if let Err(e) = conn.check_bounds() {
            panic!("memory bound broken after an input: {e}");
        }
        while let Some(id) = conn.accept() {
            streams.push((id, 0, false));
        }
        for (id, got, ended) in streams.iter_mut().filter(|s| !s.2) {
            loop {
                match conn.recv(*id, now) {
                    Ok(Recv::Chunk(c)) => {
                        *got += c.len();
                        assert!(*got <= total, "a stream yielded {got} bytes from {total} bytes of frames");
                    }
                    Ok(Recv::End) => {
                        if let Ok(Reserve::Ready(n)) = conn.reserve(*id, 6) {
                            let mut f = bytes::BytesMut::zeroed(libtunnel::protocol::FRAME_HEADER);
                            f.extend_from_slice(&b"answer"[..n]);
                            let _ = conn.send_data(*id, f);
                        }
                        conn.finish(*id);
                        *ended = true;
                        break;
                    }
                    Ok(Recv::Blocked) => break,
                    Err(_) => {
                        *ended = true;
                        break;
                    }
                }
            }
        }
        out.clear();
        conn.poll_transmit(now, &mut out, usize::MAX, usize::MAX);
        conn.on_transmitted();
        if conn.poll_timeout().is_some_and(|t| t <= now) {
            conn.handle_timeout(now);
        }
        while conn.poll_event().is_some() {}
        if let Err(e) = conn.check_bounds() {
            panic!("memory bound broken after serving an input: {e}");
        }
    }
    conn.transport_ended(None);
    assert!(conn.is_closed(), "the session outlived its transport");
    for (id, _, ended) in &streams {
        if !ended {
            assert!(!matches!(conn.recv(*id, now), Ok(Recv::Blocked)), "stream {id} still waits after the session ended");
        }
        conn.stream_dropped(*id);
    }
    if let Err(e) = conn.check_bounds() {
        panic!("memory bound broken at the end: {e}");
    }
}

// ---------------------------------------------------------------------------------------------
// ServerConnect preamble (dialer side)
// ---------------------------------------------------------------------------------------------

fn check_nonce(n: &[u8]) {
    assert_eq!(n.len(), 32, "accepted a nonce of {} bytes", n.len());
    assert!(n.iter().any(|b| *b != 0), "accepted an all-zero nonce");
}

/// `server_connect`: the bytes as one WebSocket preamble message, and as the raw-TCP stream.
pub fn server_connect(data: &[u8]) {
    if let Ok(n) = ServerConnect::decode_checked(data) {
        check_nonce(&n);
        assert!(data.len() < protocol::MAX_PREAMBLE);
    }
    let mut r = data;
    if let Ok(n) = at_once(protocol::read_server_connect(&mut r)) {
        check_nonce(&n);
        let used = data.len() - r.len();
        assert!(used <= 4 * protocol::MAX_PREAMBLE, "read {used} bytes of preamble");
        assert_eq!(ServerConnect::decode_checked(&data[..used]).ok(), Some(n), "the two preamble readers disagree");
    }
}

// ---------------------------------------------------------------------------------------------
// Auth proof (relay side)
// ---------------------------------------------------------------------------------------------

/// `auth_proof`: the bytes as a session hello, and as an RFC 1929 (date, proof) pair split at the
/// first NUL. The relay's clock is set to the date given, so the HMAC comparison is reached.
pub fn auth_proof(data: &[u8]) {
    if let Ok(h) = Hello::decode(data) {
        assert_eq!(&h.encode()[..], data, "a decoded hello re-encodes differently");
        verify_one(&h.date, &h.sig);
    }
    let (d, s) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    verify_one(&String::from_utf8_lossy(d), &String::from_utf8_lossy(s));
    if let Ok(ack) = HelloAck::decode(data) {
        if let Some((_, msg)) = ack.refusal {
            assert!(msg.len() <= data.len() * 3, "a refusal message longer than its input");
        }
    }
}

fn verify_one(date: &str, sig: &str) {
    let now = httpdate::parse_http_date(date).unwrap_or(SystemTime::UNIX_EPOCH + Duration::from_secs(1_706_608_800));
    if let Ok(kid) = keyset().verify(&NONCE, date, sig, now) {
        assert_eq!(kid, KID);
        assert_eq!(key().sign_with_date(&NONCE, date), sig, "accepted a proof that is not the canonical one");
        assert!(keyset().verify(&[0x5b; 32], date, sig, now).is_err(), "a proof verified against another nonce");
    }
}

// ---------------------------------------------------------------------------------------------
// Listener registration (relay side) and the relay's answers (listener side)
// ---------------------------------------------------------------------------------------------

/// `listen_hello`: the bytes as a registration frame, a registration answer, and a stream header.
pub fn listen_hello(data: &[u8]) {
    if let Ok(h) = ListenHello::decode_frame(data) {
        let pk: [u8; 32] = h.public_key.as_slice().try_into().expect("decode_frame checks the key length");
        assert_eq!(h.signature.len(), 64);
        assert!(h.name.len() <= 63);
        let name = derived_name(&pk);
        assert!(name.len() == DERIVED_NAME_LEN && valid_name(&name), "derived name {name:?}");
        if verify_registration(&pk, &h.signature, &NONCE, &h.name) {
            assert!(!verify_registration(&pk, &h.signature, &[0x5b; 32], &h.name), "a registration verified against another nonce");
            let other = format!("{}x", h.name);
            assert!(!verify_registration(&pk, &h.signature, &NONCE, &other), "a registration verified for another name");
        }
        let _ = valid_name(&h.name);
    }
    if let Ok(ack) = ListenAck::decode_frame(data) {
        assert_eq!(ack.status, 0);
    }
    let mut r = data;
    if let Ok(h) = at_once(StreamHeader::read_from(&mut r)) {
        let used = data.len() - r.len();
        assert_eq!(h.encode(), &data[..used], "a stream header re-encodes differently");
    }
}

// ---------------------------------------------------------------------------------------------
// Through a live relay: public HTTP Host routing, and dial-by-name routing
// ---------------------------------------------------------------------------------------------

struct LiveRelay {
    http: SocketAddr,
    url: String,
    rt: tokio::runtime::Handle,
    dialer: Dialer,
}

/// One relay for the whole process, on its own runtime thread: a public HTTP port, no listener
/// registered, and an allowlist that admits nothing a dial could reach without DNS.
fn live_relay() -> &'static LiveRelay {
    static R: OnceLock<LiveRelay> = OnceLock::new();
    R.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("fuzz-relay".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
                let handle = rt.handle().clone();
                rt.block_on(async move {
                    let allow = Allowlist::from_json(r#"[{"host":"db.internal","port":1}]"#, "TUNNEL_ALLOW").expect("rules");
                    let mut cfg = RelayConfig::new(keyset(), allow);
                    cfg.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
                    cfg.domain = "relay.test".into();
                    cfg.limits.connect_timeout = Duration::from_secs(1);
                    cfg.limits.handshake_timeout = Duration::from_secs(2);
                    cfg.limits.http_timeout = Duration::from_secs(2);
                    let relay = libtunnel::Server::bind(cfg).await.expect("relay binds on loopback").spawn();
                    let url = relay.url().to_string();
                    let dialer = Dialer::builder(&url).key(key()).mode(Mode::Multiplexed).timeout(Duration::from_secs(5)).build().expect("dialer");
                    tx.send(LiveRelay { http: relay.http_addr().expect("http port"), url, rt: handle, dialer }).expect("send");
                    std::future::pending::<()>().await;
                })
            })
            .expect("relay thread");
        rx.recv_timeout(Duration::from_secs(30)).expect("the fuzz relay starts")
    })
}

/// `http_host`: first byte 0 sends the rest as a whole raw HTTP request; otherwise the rest is a
/// `Host` header value. No listener is registered, so no request may get a 1xx/2xx answer.
pub fn http_host(data: &[u8]) {
    use std::io::{Read, Write};
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let relay = live_relay();
    let mut req = Vec::new();
    if mode == 0 {
        req.extend_from_slice(rest);
    } else {
        req.extend_from_slice(b"GET /x HTTP/1.1\r\nHost: ");
        req.extend_from_slice(rest);
        req.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    }
    let mut s = std::net::TcpStream::connect_timeout(&relay.http, Duration::from_secs(5)).expect("connect to the relay's HTTP port");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.set_write_timeout(Some(Duration::from_secs(10))).expect("timeout");
    if s.write_all(&req).is_err() {
        return; // the relay closed early on garbage: fine
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                assert!(answer.len() <= MAX_ANSWER, "the relay answered with more than {MAX_ANSWER} bytes");
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
                panic!("the relay's HTTP port did not answer or close within 10 s")
            }
            Err(_) => break,
        }
    }
    // Every response on the connection (pipelined requests give several).
    let text = String::from_utf8_lossy(&answer);
    for line in text.split("\r\n").filter(|l| l.starts_with("HTTP/1.")) {
        let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        assert!(status >= 300 || status == 0, "no listener is online, yet the relay answered {line:?} for {:?}", String::from_utf8_lossy(&req));
    }
}

/// `dial_route`: the bytes as the host of a CONNECT (first two bytes: the port) on an
/// authenticated multiplexed session, so the relay's listener routing and allowlist both see it.
/// Nothing reachable is allowed and no listener is online: every dial must fail, promptly.
pub fn dial_route(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let relay = live_relay();
    let port = u16::from_be_bytes([data[0], data[1]]);
    let host = String::from_utf8_lossy(&data[2..data.len().min(2 + 255)]).into_owned();
    let target = Target { host, port };
    let dialer = relay.dialer.clone();
    let r = relay.rt.block_on(async move { tokio::time::timeout(Duration::from_secs(10), dialer.dial_target(&target)).await });
    match r {
        Err(_) => panic!("a dial through {} did not finish within 10 s", relay.url),
        Ok(Ok(_)) => panic!("a dial was admitted though nothing is allowed or listening: {:?}", String::from_utf8_lossy(data)),
        Ok(Err(_)) => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Config loaders
// ---------------------------------------------------------------------------------------------

/// `config`: NUL-separated parts: a TOML file, `.env` lines, environment lines and flag lines
/// (`KEY=VALUE` per line). Whatever loads must be a config the relay can start with.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let toml = parts.next().filter(|t| !t.is_empty());
    let pairs = |p: Option<&str>| -> Vec<(String, String)> {
        p.unwrap_or_default().lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    let (dotenv, env, flags) = (pairs(parts.next()), pairs(parts.next()), pairs(parts.next()));
    if let Ok(cfg) = RelayConfig::from_sources(toml, &dotenv, &env, &flags) {
        assert!(!cfg.auth_keys.is_empty(), "a config without keys loaded");
        assert!(!cfg.allow.is_empty(), "a config without allow rules loaded");
        assert!(cfg.listen.is_some() || cfg.tcp_listen.is_some(), "a config without endpoints loaded");
        let l = &cfg.limits;
        assert!(l.max_connections <= tokio::sync::Semaphore::MAX_PERMITS, "max_connections {} cannot size a semaphore", l.max_connections);
        for (what, d) in [
            ("handshake_timeout", l.handshake_timeout),
            ("connect_timeout", l.connect_timeout),
            ("drain_timeout", l.drain_timeout),
            ("keepalive_interval", l.keepalive_interval),
            ("keepalive_timeout", l.keepalive_timeout),
            ("http_timeout", l.http_timeout),
        ] {
            assert!(!d.is_zero(), "{what} loaded as zero");
            assert!(d.checked_mul(4).and_then(|d4| tokio::time::Instant::now().checked_add(d4)).is_some(), "{what} = {d:?} overflows a deadline");
        }
        if let Some((lo, hi)) = cfg.tcp_ports {
            assert!(lo != 0 && lo <= hi);
        }
        assert!(cfg.health_path.starts_with('/'));
    }
    // The single-value parsers the loaders use.
    let _ = Allowlist::from_json(&text, "TUNNEL_ALLOW");
    let _ = Key::parse(&text);
    if let Ok(t) = Target::parse(&text) {
        assert!(!t.host.is_empty() && t.host.len() <= 255, "target host of {} bytes", t.host.len());
    }
}
