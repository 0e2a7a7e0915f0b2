//! End-to-end encryption through an untrusted relay, over real loopback sockets: byte-capturing
//! TCP taps between dialer and relay and between relay and listener (the marker must not appear
//! in either while 64 MiB cross both ways intact, half-closed), a listener answering for a name
//! with another key (`E2E_IDENTITY`, nothing reaches it), mutual mode (unlisted or missing dialer
//! key → `E2E_REFUSED`, a listed one admitted and named in `PeerInfo`), and downgrades (a
//! plaintext dial to an e2e listener is refused; an e2e dial to a plaintext listener fails).
//! Every wait is bounded.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use libtunnel::config::ListenerGrant;
use libtunnel::e2e::{DialerE2e, ListenerE2e};
use libtunnel::{Dialer, ErrorCode, Identity, Listener, ServerHandle, TunnelStream};
use sha2::{Digest, Sha256};
use testkit::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// 32 bytes that appear in the payloads and must never appear on the wire.
const MARKER: &[u8; 32] = b"E2E-MARKER:relay-must-not-see-me";

// ---------------------------------------------------------------------------------------------
// the tap
// ---------------------------------------------------------------------------------------------

/// What one direction of a tap carried.
#[derive(Default)]
struct Capture {
    bytes: AtomicU64,
    markers: AtomicU64,
}

impl Capture {
    fn seen(&self) -> (u64, u64) {
        (self.bytes.load(Ordering::Relaxed), self.markers.load(Ordering::Relaxed))
    }
}

/// A TCP forwarder on loopback that scans every byte it carries for [`MARKER`], each direction
/// on its own (a streaming capture: it keeps the last 31 bytes of a direction so a marker split
/// across reads still counts). Returns its address and the (toward upstream, from upstream)
/// captures.
async fn tap(upstream: SocketAddr) -> (SocketAddr, [Arc<Capture>; 2]) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind tap");
    let addr = l.local_addr().expect("addr");
    let caps = [Arc::new(Capture::default()), Arc::new(Capture::default())];
    let c = caps.clone();
    tokio::spawn(async move {
        while let Ok((down, _)) = l.accept().await {
            let Ok(up) = TcpStream::connect(upstream).await else { continue };
            let (dr, dw) = down.into_split();
            let (ur, uw) = up.into_split();
            tokio::spawn(pump(dr, uw, c[0].clone()));
            tokio::spawn(pump(ur, dw, c[1].clone()));
        }
    });
    (addr, caps)
}

async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, cap: Arc<Capture>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut tail: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        cap.bytes.fetch_add(n as u64, Ordering::Relaxed);
        tail.extend_from_slice(&buf[..n]);
        let hits = tail.windows(MARKER.len()).filter(|w| w == MARKER).count();
        cap.markers.fetch_add(hits as u64, Ordering::Relaxed);
        let keep = tail.len().min(MARKER.len() - 1);
        tail.drain(..tail.len() - keep);
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------------

/// The relay's raw-TCP tunnel endpoint: the same session bytes as WebSocket without the client
/// masking, so a tap sees exactly what the relay reads and writes.
fn relay_tcp(relay: &ServerHandle) -> SocketAddr {
    relay.tcp_addr().expect("relay has a raw-TCP endpoint")
}

/// A relay with open listener registration and these chosen-name grants.
async fn relay(grants: Vec<ListenerGrant>) -> ServerHandle {
    let mut cfg = relay_config(allow_ports(&[9]));
    cfg.tcp_listen = Some("127.0.0.1:0".parse().expect("addr"));
    cfg.listeners_open = true;
    cfg.listener_keys = grants;
    start_relay(cfg).await
}

fn dialer(url: &str, e2e: Option<DialerE2e>) -> Dialer {
    let mut b = Dialer::builder(url).key(key()).timeout(STEP);
    if let Some(e) = e2e {
        b = b.e2e(e);
    }
    b.build().expect("dialer")
}

async fn listener(url: &str, id: Identity, name: Option<&str>, e2e: Option<ListenerE2e>) -> Arc<Listener> {
    let mut b = Listener::builder(url, id).max_backoff(std::time::Duration::from_millis(300));
    if let Some(n) = name {
        b = b.name(n);
    }
    if let Some(e) = e2e {
        b = b.e2e(e);
    }
    Arc::new(within(STEP, "binding a listener", b.bind()).await.expect("listener registers"))
}

/// `len` random bytes with the marker at the start, the middle and the end.
fn marked(len: usize, seed: u64) -> Vec<u8> {
    let mut v = payload(len, seed);
    for at in [0, len / 2, len - MARKER.len()] {
        v[at..at + MARKER.len()].copy_from_slice(MARKER);
    }
    v
}

/// Write `data` then half-close, while reading the other direction to EOF; returns the SHA-256
/// of what was read.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: S, data: &[u8]) -> std::io::Result<[u8; 32]> {
    let (mut r, mut w) = tokio::io::split(s);
    let write = async {
        for c in data.chunks(256 * 1024) {
            w.write_all(c).await?;
        }
        w.shutdown().await
    };
    let read = async {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 128 * 1024];
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(h.finalize().into());
            }
            h.update(&buf[..n]);
        }
    };
    let (w, r) = tokio::join!(write, read);
    w?;
    r
}

// ---------------------------------------------------------------------------------------------
// tests
// ---------------------------------------------------------------------------------------------

/// The relay sees only ciphertext: with taps on both of its sides, 64 MiB each way (marked) go
/// through an E2E dial by name intact and half-closed, and neither tap sees the marker. The same
/// exchange without e2e shows the marker on both taps, so the taps do see the relay's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_sees_only_ciphertext() {
    init_tracing();
    let relay = relay(vec![]).await;
    for e2e in [false, true] {
        let (listen_tap, listen_cap) = tap(relay_tcp(&relay)).await;
        let (dial_tap, dial_cap) = tap(relay_tcp(&relay)).await;
        let id = Identity::generate();
        let name = id.name();
        let size = if e2e { 64 * MIB } else { MIB };
        let up = marked(size, 1);
        let down = marked(size, 2);
        let l = listener(&format!("tcp://{listen_tap}"), id, None, e2e.then(ListenerE2e::new)).await;
        let d = dialer(&format!("tcp://{dial_tap}"), e2e.then(DialerE2e::new));
        let service = {
            let (l, down) = (l.clone(), down.clone());
            tokio::spawn(async move {
                let (s, peer) = l.accept().await.expect("accept");
                assert_eq!(peer.e2e, e2e);
                assert!(peer.dialer_key.is_none(), "not mutual: the dialer presented no key");
                assert_eq!(s.is_e2e(), e2e);
                exchange(s, &down).await.expect("listener side of the exchange")
            })
        };
        let s = within(STEP, "dialing by name", d.dial(&format!("{name}:0"))).await.expect("dial by name");
        assert_eq!(s.is_e2e(), e2e);
        let got_down = within(BULK, "the dialer's exchange", exchange(s, &up)).await.expect("dialer side of the exchange");
        let got_up = within(BULK, "the listener's exchange", service).await.expect("service task");
        assert_eq!(got_up, sha256(&up), "the listener's service read the dialer's bytes in plaintext, intact");
        assert_eq!(got_down, sha256(&down), "the dialer read the service's bytes intact");
        // dialer -> relay, relay -> dialer, listener -> relay, relay -> listener
        let seen = [dial_cap[0].seen(), dial_cap[1].seen(), listen_cap[0].seen(), listen_cap[1].seen()];
        for (what, (bytes, markers)) in ["dialer->relay", "relay->dialer", "listener->relay", "relay->listener"].iter().zip(seen) {
            assert!(bytes as usize > size, "{what} carried the transfer ({bytes} bytes)");
            if e2e {
                assert_eq!(markers, 0, "{what}: the relay's wire must carry no plaintext marker");
            } else {
                // Three per payload; one may straddle a frame header.
                assert!(markers >= 2, "plaintext control: {what} shows the markers ({markers})");
            }
        }
        l.close();
        d.close().await;
    }
}

/// A listener registered under a granted name with another key answers for it: the dialer (which
/// pinned the real key) fails with E2E_IDENTITY, and nothing reaches the impersonator's service.
/// Unpinned chosen names are refused before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impersonating_listener_is_caught() {
    init_tracing();
    let real = Identity::generate();
    let fake = Identity::generate();
    let relay = relay(vec![ListenerGrant { public_key: fake.public_key_base64(), names: vec!["api".into()] }]).await;
    let imp = listener(relay.url(), fake.clone(), Some("api"), Some(ListenerE2e::new())).await;

    let unpinned = dialer(relay.url(), Some(DialerE2e::new()));
    let e = within(STEP, "dialing an unpinned chosen name", unpinned.dial("api:0")).await.expect_err("no pin, no dial");
    assert_eq!(e.code(), ErrorCode::E2eIdentity, "{e}");
    assert!(e.message().contains("--e2e-pin api="), "the message names the fix: {e}");

    let pinned = dialer(relay.url(), Some(DialerE2e::new().pin("api", &real.public_key_base64()).expect("pin")));
    let e = within(STEP, "dialing the impersonated name", pinned.dial("api:0")).await.expect_err("wrong key");
    assert_eq!(e.code(), ErrorCode::E2eIdentity, "{e}");
    assert!(e.message().contains(&fake.name()) && e.message().contains("impersonating"), "{e}");

    // The impersonator's service never got that stream: the next one it accepts is a dial that
    // pinned its real key (pin by key-derived name this time), carrying a marker.
    let honest = dialer(relay.url(), Some(DialerE2e::new().pin_spec(&format!("api={}", fake.name())).expect("pin")));
    let mut s = within(STEP, "dialing with the right pin", honest.dial("api:0")).await.expect("pinned dial");
    s.write_all(MARKER).await.expect("write");
    s.shutdown().await.expect("half-close");
    let (mut got, _) = within(STEP, "accepting", imp.accept()).await.expect("accept");
    let first = within(STEP, "reading", read_to_end(&mut got)).await.expect("read");
    assert_eq!(first, MARKER, "the first stream the service saw is the honest dial");
}

/// Mutual mode: the listener requires the dialer's key and admits listed ones only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_mode_admits_listed_keys_only() {
    init_tracing();
    let relay = relay(vec![]).await;
    let id = Identity::generate();
    let name = id.name();
    let friend = Identity::generate();
    let stranger = Identity::generate();
    let l = listener(relay.url(), id, None, Some(ListenerE2e::new().allow_peer(&friend.public_key_base64()).expect("allow"))).await;
    let target = format!("{name}:0");

    let d = dialer(relay.url(), Some(DialerE2e::new().identity(stranger.clone())));
    let e = within(STEP, "an unlisted key", d.dial(&target)).await.expect_err("unlisted key refused");
    assert_eq!(e.code(), ErrorCode::E2eRefused, "{e}");
    assert!(e.message().contains(&stranger.name()) && e.message().contains("--allow-peer"), "{e}");

    let d = dialer(relay.url(), Some(DialerE2e::new()));
    let e = within(STEP, "no key at all", d.dial(&target)).await.expect_err("keyless dialer refused");
    assert_eq!(e.code(), ErrorCode::E2eRefused, "{e}");
    assert!(e.message().contains("--e2e-identity"), "{e}");

    let d = dialer(relay.url(), Some(DialerE2e::new().identity(friend.clone())));
    let data = marked(256 * 1024, 3);
    let service = {
        let l = l.clone();
        tokio::spawn(async move {
            let (s, peer) = l.accept().await.expect("accept");
            let (mut r, mut w) = tokio::io::split(s);
            tokio::io::copy(&mut r, &mut w).await.expect("echo");
            w.shutdown().await.expect("half-close");
            peer
        })
    };
    let s = within(STEP, "a listed key", d.dial(&target)).await.expect("listed key admitted");
    let echoed = within(BULK, "echo", echo_roundtrip(s, &data, true)).await.expect("echo through mutual e2e");
    assert_eq!(echoed, sha256(&data));
    let peer = within(STEP, "service", service).await.expect("service");
    assert!(peer.e2e);
    assert_eq!(peer.dialer_key, Some(friend.public_key()));
    assert_eq!(peer.dialer_name.as_deref(), Some(friend.name().as_str()));
}

/// No downgrade: a plaintext dial to an e2e listener never reaches its service (the stream ends
/// with no byte), and an e2e dial to a plaintext listener fails instead of sending plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downgrades_are_refused() {
    init_tracing();
    let relay = relay(vec![]).await;
    let id = Identity::generate();
    let name = id.name();
    let l = listener(relay.url(), id, None, Some(ListenerE2e::new())).await;

    let plain = dialer(relay.url(), None);
    let mut s: TunnelStream = within(STEP, "plaintext dial", plain.dial(&format!("{name}:0"))).await.expect("the relay connects the stream");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let mut buf = Vec::new();
    let r = within(STEP, "the e2e listener's answer", s.read_to_end(&mut buf)).await;
    // At most the listener's TLS alert (content type 0x15, one 7-byte record), then the end.
    assert!(buf.is_empty() || (buf[0] == 0x15 && buf.len() <= 7), "no plaintext answer: {r:?} {buf:?}");
    // The service's first stream is an e2e one dialed afterwards, not the plaintext one.
    let e2e = dialer(relay.url(), Some(DialerE2e::new()));
    let mut s = within(STEP, "e2e dial", e2e.dial(&format!("{name}:0"))).await.expect("e2e dial");
    s.write_all(MARKER).await.expect("write");
    s.shutdown().await.expect("half-close");
    let (mut got, peer) = within(STEP, "accept", l.accept()).await.expect("accept");
    assert!(peer.e2e);
    assert_eq!(within(STEP, "read", read_to_end(&mut got)).await.expect("read"), MARKER);

    // The other way: an echoing plaintext listener sends the ClientHello back; the dialer fails.
    let pid = Identity::generate();
    let pname = pid.name();
    let pl = listener(relay.url(), pid, None, None).await;
    tokio::spawn(async move {
        while let Ok((s, _)) = pl.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(s);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    let e = within(STEP, "e2e dial to a plaintext listener", e2e.dial(&format!("{pname}:0"))).await.expect_err("not e2e");
    assert_eq!(e.code(), ErrorCode::E2eIdentity, "{e}");
    assert!(e.message().contains("--e2e"), "{e}");

    // An offline name fails as it does without e2e (the relay's answer keeps its code).
    let offline = format!("{}:0", Identity::generate().name());
    let plain_err = within(STEP, "plaintext dial to an offline name", plain.dial(&offline)).await.expect_err("offline");
    let e2e_err = within(STEP, "e2e dial to an offline name", e2e.dial(&offline)).await.expect_err("offline");
    assert_eq!(e2e_err.code(), plain_err.code(), "{e2e_err} / {plain_err}");

    // And e2e is for names only.
    let e = within(STEP, "e2e dial to a host", e2e.dial("127.0.0.1:9")).await.expect_err("not a name");
    assert_eq!(e.code(), ErrorCode::InvalidArgument, "{e}");
}
