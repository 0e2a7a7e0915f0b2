//! The QUIC transport (`quic://`) against a real relay on loopback: a dialer's session whose
//! tunnel streams are QUIC streams (64 MiB hashed both ways, half-close, 1,000 streams at once), a
//! listener served over QUIC (dial by name, public HTTP), end-to-end encryption over it, every
//! refusal with its code, a relay frozen under uploads, connection migration, and a flood of
//! Initials from one source.

use libtunnel::{Dialer, ErrorCode, Identity, Listener, Mode};
use testkit::*;

struct QuicRelay {
    relay: libtunnel::ServerHandle,
    trust: libtunnel::transport::ClientTls,
    _dir: std::path::PathBuf,
}

impl QuicRelay {
    fn url(&self) -> String {
        format!("quic://localhost:{}", self.relay.quic_addr().expect("QUIC endpoint").port())
    }

    fn dialer(&self) -> Dialer {
        Dialer::builder(&self.url()).key(key()).tls(self.trust.clone()).timeout(STEP).build().expect("dialer")
    }
}

/// A relay with a QUIC endpoint (and its WebSocket one over TLS) with a self-signed certificate
/// for `localhost`.
async fn quic_relay(mut cfg: libtunnel::RelayConfig) -> QuicRelay {
    let (cert, tls_key, pem) = self_signed_cert();
    let dir = cert.parent().expect("cert dir").to_path_buf();
    cfg.tls_cert = Some(cert);
    cfg.tls_key = Some(tls_key);
    cfg.quic_listen = Some("127.0.0.1:0".parse().expect("addr"));
    let relay = start_relay(cfg).await;
    let trust = libtunnel::transport::ClientTls::from_pem(pem.as_bytes()).expect("CA bundle");
    QuicRelay { relay, trust, _dir: dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialer_over_quic_moves_64_mib_both_ways_and_half_closes() {
    init_tracing();
    let echo = echo_server().await;
    let hasher = hash_after_eof_server().await;
    let q = quic_relay(relay_config(allow_ports(&[echo.port(), hasher.port()]))).await;
    let d = q.dialer();
    let t0 = std::time::Instant::now();
    echo_through(&d, echo, 64 * MIB, 1).await;
    eprintln!("64 MiB each way over quic://: {:?}", t0.elapsed());
    half_close_through(&d, hasher, 3 * MIB + 17, 5).await;
    let runs: Vec<_> = (0..8).map(|i| echo_through(&d, echo, 256 * 1024, 10 + i)).collect();
    futures_util::future::join_all(runs).await;
    let m = q.relay.metrics().render();
    assert_eq!(metric(&m, "libtunnel_sessions_total{mode=\"quic\"}"), 1, "one QUIC session carried every stream: {m}");
    assert_eq!(metric(&m, "libtunnel_sessions_total{mode=\"multiplexed\"}"), 0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_over_quic_serves_dials_by_name_public_http_and_e2e() {
    use libtunnel::e2e::{DialerE2e, ListenerE2e};
    init_tracing();
    let echo = echo_server().await;
    let web = http_ok_server().await;
    let mut cfg = relay_config(allow_ports(&[9]));
    cfg.listeners_open = true;
    cfg.http_listen = Some("127.0.0.1:0".parse().expect("addr"));
    let q = quic_relay(cfg).await;
    let url = q.url();
    let bind = |e2e: Option<ListenerE2e>| {
        let mut b = Listener::builder(&url, Identity::generate()).tls(q.trust.clone());
        if let Some(e) = e2e {
            b = b.e2e(e);
        }
        b.bind()
    };
    // A listener over QUIC, dialed by name by a dialer over QUIC: the relay splices two QUIC streams.
    let plain = within(STEP, "listener binds over quic://", bind(None)).await.expect("bind");
    let plain_name = plain.name();
    tokio::spawn(libtunnel::forward::expose(plain, echo.to_string(), false, std::future::pending()));
    let d = q.dialer();
    let data = payload(16 * MIB, 7);
    let s = within(STEP, "dial by name", d.dial(&format!("{plain_name}:80"))).await.expect("dial the listener by name");
    let got = within(BULK, "echo through the listener", echo_roundtrip(s, &data, true)).await.expect("echo");
    assert_eq!(got, sha256(&data));
    // And by a dialer over WebSocket: both transports are sessions of one relay.
    let ws = Dialer::builder(&format!("wss://localhost:{}", q.relay.local_addr().expect("addr").port()))
        .key(key())
        .tls(q.trust.clone())
        .timeout(STEP)
        .build()
        .expect("dialer");
    let s = within(STEP, "dial by name over wss", ws.dial(&format!("{plain_name}:80"))).await.expect("dial");
    let small = payload(MIB, 8);
    assert_eq!(within(STEP, "echo", echo_roundtrip(s, &small, true)).await.expect("echo"), sha256(&small));
    // Public HTTP to a listener whose session is QUIC.
    let site = within(STEP, "listener binds over quic://", bind(None)).await.expect("bind");
    let site_name = site.name();
    tokio::spawn(libtunnel::forward::expose(site, web.to_string(), false, std::future::pending()));
    let http = q.relay.http_addr().expect("public http");
    let (status, body) = http_exchange(http, &format!("GET / HTTP/1.1\r\nHost: {site_name}.localhost\r\nConnection: close\r\n\r\n")).await;
    assert_eq!((status, body.as_str()), (200, "ok"), "public HTTP through a QUIC listener session");
    // End to end over QUIC: the relay sees ciphertext; 16 MiB hashed both ways.
    let sealed = within(STEP, "e2e listener binds over quic://", bind(Some(ListenerE2e::new()))).await.expect("bind");
    let sealed_name = sealed.name();
    tokio::spawn(libtunnel::forward::expose(sealed, echo.to_string(), false, std::future::pending()));
    let de2e = Dialer::builder(&url).key(key()).tls(q.trust.clone()).timeout(STEP).e2e(DialerE2e::new()).build().expect("dialer");
    let s = within(STEP, "e2e dial by name", de2e.dial(&format!("{sealed_name}:80"))).await.expect("e2e dial");
    assert!(s.is_e2e());
    let got = within(BULK, "e2e echo", echo_roundtrip(s, &data, true)).await.expect("echo");
    assert_eq!(got, sha256(&data));
    // A plaintext dial to the e2e listener is refused with its code, over QUIC too.
    let e = match within(STEP, "plaintext dial", d.dial(&format!("{sealed_name}:80"))).await {
        Err(e) => e,
        Ok(s) => libtunnel::Error::from_io(echo_roundtrip(s, b"x", true).await.expect_err("refused"), "plaintext dial"),
    };
    assert_eq!(e.code(), ErrorCode::E2eRefused, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_over_quic_carry_their_code_and_fix() {
    init_tracing();
    let echo = echo_server().await;
    let q = quic_relay(relay_config(allow_ports(&[echo.port()]))).await;
    let url = q.url();
    // A wrong key: refused by the hello, as over a WebSocket.
    let wrong = Dialer::builder(&url)
        .key(libtunnel::Key::new(KID, b"not the relay's secret".to_vec()).expect("key"))
        .tls(q.trust.clone())
        .timeout(STEP)
        .build()
        .expect("dialer");
    let e = within(STEP, "wrong key", wrong.dial(&echo.to_string())).await.expect_err("a wrong key is refused");
    assert_eq!(e.code(), ErrorCode::AuthFailed, "{e}");
    // A target outside the allowlist.
    let d = q.dialer();
    let e = within(STEP, "not allowed", d.dial("127.0.0.1:1")).await.expect_err("outside the allowlist");
    assert_eq!(e.code(), ErrorCode::NotAllowed, "{e}");
    // Classic mode is Emissary's WebSocket protocol.
    let classic = Dialer::builder(&url).key(key()).tls(q.trust.clone()).mode(Mode::Classic).timeout(STEP).build().expect("dialer");
    let e = within(STEP, "classic over quic", classic.dial(&echo.to_string())).await.expect_err("classic mode needs a WebSocket");
    assert!(e.message().contains("ws://"), "{e}");
    // A certificate the client does not trust: the error names --ca.
    let untrusted = Dialer::builder(&url).key(key()).timeout(STEP).build().expect("dialer");
    let e = within(STEP, "untrusted certificate", untrusted.dial(&echo.to_string())).await.expect_err("self-signed, not trusted");
    assert_eq!(e.code(), ErrorCode::RelayUnavailable, "{e}");
    assert!(e.message().contains("--ca"), "{e}");
    // Still serving.
    echo_through(&d, echo, 64 * 1024, 3).await;
    let m = q.relay.metrics().render();
    assert!(metric(&m, "libtunnel_auth_failures_total") >= 1, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_streams_at_once_share_one_quic_connection() {
    init_tracing();
    let echo = echo_server().await;
    let q = quic_relay(relay_config(allow_ports(&[echo.port()]))).await;
    let d = std::sync::Arc::new(q.dialer());
    let mut runs = tokio::task::JoinSet::new();
    for i in 0..1000u64 {
        let d = d.clone();
        runs.spawn(async move {
            let data = payload(4096 + i as usize, i);
            let s = d.dial(&echo.to_string()).await.expect("dial");
            let got = echo_roundtrip(s, &data, true).await.expect("echo");
            assert_eq!(got, sha256(&data), "stream {i}");
        });
    }
    within(BULK, "1,000 concurrent echoes", async {
        while let Some(r) = runs.join_next().await {
            r.expect("an echo task");
        }
    })
    .await;
    let m = q.relay.metrics().render();
    assert_eq!(metric(&m, "libtunnel_sessions_total{mode=\"quic\"}"), 1, "{m}");
    assert_eq!(metric(&m, "libtunnel_streams_total"), 1000, "{m}");
}

/// What [`udp_gate`] does with datagrams.
const OPEN: u8 = 0;
const SILENT: u8 = 1;

/// A UDP forwarder to `to` standing for a network path: `OPEN` forwards each client's datagrams
/// from a socket of its own, `SILENT` drops them (UDP blocked). `rebind` gives every client a new
/// upstream socket, so the relay sees its address change mid-connection (a NAT rebinding).
struct UdpGate {
    addr: std::net::SocketAddr,
    state: std::sync::Arc<std::sync::atomic::AtomicU8>,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl UdpGate {
    fn set(&self, state: u8) {
        self.state.store(state, std::sync::atomic::Ordering::SeqCst);
    }
    fn rebind(&self) {
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn udp_gate(to: std::net::SocketAddr) -> UdpGate {
    udp_gate_from(to, "127.0.0.1").await
}

/// [`udp_gate`] whose upstream sockets are bound to `from_ip` (the relay sees that source).
async fn udp_gate_from(to: std::net::SocketAddr, from_ip: &'static str) -> UdpGate {
    use std::sync::atomic::Ordering::SeqCst;
    use std::sync::Arc;
    let sock = Arc::new(tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind udp"));
    let addr = sock.local_addr().expect("addr");
    let state = Arc::new(std::sync::atomic::AtomicU8::new(OPEN));
    let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (st, gen) = (state.clone(), generation.clone());
    tokio::spawn(async move {
        let mut upstreams: std::collections::HashMap<std::net::SocketAddr, (u64, Arc<tokio::net::UdpSocket>)> = Default::default();
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else { return };
            if st.load(SeqCst) == SILENT {
                continue;
            }
            let g = gen.load(SeqCst);
            let fresh = upstreams.get(&from).is_none_or(|(ug, _)| *ug != g);
            if fresh {
                let up = Arc::new(tokio::net::UdpSocket::bind((from_ip, 0)).await.expect("bind upstream"));
                let (back, down, st) = (up.clone(), sock.clone(), st.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65536];
                    while let Ok(n) = back.recv(&mut buf).await {
                        if st.load(SeqCst) != SILENT {
                            let _ = down.send_to(&buf[..n], from).await;
                        }
                    }
                });
                up.connect(to).await.expect("connect upstream");
                upstreams.insert(from, (g, up));
            }
            let _ = upstreams[&from].1.send(&buf[..n]).await;
        }
    });
    UdpGate { addr, state, generation }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_udp_blocked_a_dialer_falls_back_to_wss_and_returns_to_quic_once_it_passes() {
    use tokio::io::AsyncWriteExt;
    init_tracing();
    let echo = echo_server().await;
    let q = quic_relay(relay_config(allow_ports(&[echo.port()]))).await;
    let gate = udp_gate(q.relay.quic_addr().expect("quic")).await;
    let wss = format!("wss://localhost:{}", q.relay.local_addr().expect("addr").port());
    let urls = format!("quic://localhost:{},{wss}", gate.addr.port());
    let again = std::time::Duration::from_millis(500);
    let bound = std::time::Duration::from_secs(1);
    // UDP blocked: the QUIC attempt is cut at the bound, then WebSocket carries the dial.
    gate.set(SILENT);
    let d = Dialer::builder(&urls).key(key()).tls(q.trust.clone()).timeout(STEP).relay_timing(again, bound).build().expect("dialer");
    let mut events = d.events();
    let t0 = std::time::Instant::now();
    echo_through(&d, echo, MIB, 1).await;
    let took = t0.elapsed();
    eprintln!("UDP blocked: a dial over wss:// in {took:?} (attempt bound {bound:?})");
    assert!(took >= bound && took < bound * 3, "fell back after {took:?}");
    assert!(next_connected(&mut events).await.starts_with("wss://"), "the event names the transport in use");
    // A stream open on the WebSocket session across the move back.
    let data = payload(4 * MIB, 2);
    let mut long = within(STEP, "dial", d.dial(&echo.to_string())).await.expect("dial");
    within(STEP, "first half", long.write_all(&data[..data.len() / 2])).await.expect("write");
    // UDP passes again: once the wait is over, a dial moves the dialer back to QUIC.
    gate.set(OPEN);
    eventually("the dialer to move back to quic://", || async {
        echo_through(&d, echo, 1024, 3).await;
        holds(d.relay().to_string(), |r| r.starts_with("quic://"))
    })
    .await;
    assert!(next_connected(&mut events).await.starts_with("quic://"), "a Connected names QUIC again");
    echo_through(&d, echo, MIB, 4).await;
    within(STEP, "second half", long.write_all(&data[data.len() / 2..])).await.expect("write");
    within(STEP, "half-close", long.shutdown()).await.expect("shutdown");
    let back = within(STEP, "the echo", read_to_end(&mut long)).await.expect("read");
    assert_eq!(sha256(&back), sha256(&data), "the stream across the move lost or changed bytes");
    let m = q.relay.metrics().render();
    assert!(metric(&m, "libtunnel_sessions_total{mode=\"quic\"}") >= 1, "{m}");
    // A refusal is final: a wrong key is refused over QUIC and not tried again over wss://.
    let wrong = Dialer::builder(&urls)
        .key(libtunnel::Key::new(KID, b"not the relay's secret".to_vec()).expect("key"))
        .tls(q.trust.clone())
        .timeout(STEP)
        .relay_timing(again, bound)
        .build()
        .expect("dialer");
    let before = metric(&q.relay.metrics().render(), "libtunnel_auth_failures_total");
    let e = within(STEP, "wrong key", wrong.dial(&echo.to_string())).await.expect_err("refused");
    assert_eq!(e.code(), ErrorCode::AuthFailed, "{e}");
    assert!(e.message().contains("quic://"), "refused by the QUIC relay, not after a fallback: {e}");
    assert_eq!(metric(&q.relay.metrics().render(), "libtunnel_auth_failures_total"), before + 1, "one refusal, no second try over wss://");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_survives_the_clients_address_changing_mid_way() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    init_tracing();
    let echo = echo_server().await;
    let q = quic_relay(relay_config(allow_ports(&[echo.port()]))).await;
    let gate = udp_gate(q.relay.quic_addr().expect("quic")).await;
    let d = Dialer::builder(&format!("quic://localhost:{}", gate.addr.port())).key(key()).tls(q.trust.clone()).timeout(STEP).build().expect("dialer");
    let data = payload(16 * MIB, 9);
    let s = within(STEP, "dial", d.dial(&echo.to_string())).await.expect("dial");
    let (mut r, mut w) = tokio::io::split(s);
    let (half_tx, half_rx) = tokio::sync::oneshot::channel();
    let writer = {
        let data = data.clone();
        tokio::spawn(async move {
            let (a, b) = data.split_at(data.len() / 2);
            w.write_all(a).await.expect("first half");
            let _ = half_tx.send(());
            w.write_all(b).await.expect("second half");
            w.shutdown().await.expect("half-close");
        })
    };
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.map(|_| got)
    });
    within(STEP, "half the bytes sent", half_rx).await.expect("writer");
    // The client's address as the relay sees it changes (every datagram from now on comes from
    // another port); the connection and its stream carry on.
    gate.rebind();
    within(BULK, "the writer", writer).await.expect("writer task");
    let got = within(BULK, "the echo", reader).await.expect("reader task").expect("read");
    assert_eq!(sha256(&got), sha256(&data), "bytes lost or changed across the address change");
}

/// A `tunnel server` process with a QUIC endpoint (self-signed for localhost) allowing `ports`,
/// with a 0.3 s / 1 s keepalive, and the trust for its certificate.
async fn quic_relay_process(ports: &[u16], extra: &[(&str, &str)]) -> (testkit::procs::RelayProcess, libtunnel::transport::ClientTls) {
    let (cert, tls_key, pem) = self_signed_cert();
    let allow = allow_json(ports);
    let (cert, tls_key) = (cert.display().to_string(), tls_key.display().to_string());
    let mut env = vec![
        ("TUNNEL_ALLOW", allow.as_str()),
        ("TUNNEL_KEEPALIVE_INTERVAL", "0.3"),
        ("TUNNEL_KEEPALIVE_TIMEOUT", "1"),
        ("TUNNEL_TLS_CERT", cert.as_str()),
        ("TUNNEL_TLS_KEY", tls_key.as_str()),
        ("TUNNEL_QUIC_LISTEN", "127.0.0.1:0"),
    ];
    env.extend_from_slice(extra);
    let relay = testkit::procs::RelayProcess::start(&env).await;
    (relay, libtunnel::transport::ClientTls::from_pem(pem.as_bytes()).expect("CA bundle"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_relay_fails_every_quic_upload_within_the_keepalive_and_new_dials_work_after() {
    use std::time::{Duration, Instant};
    use tokio::io::AsyncWriteExt;
    init_tracing();
    let sink = sink_server().await;
    let echo = echo_server().await;
    let (relay, trust) = quic_relay_process(&[sink.port(), echo.port()], &[]).await;
    let url = format!("quic://localhost:{}", relay.quic.expect("quic").port());
    let short =
        libtunnel::mux::MuxConfig { keepalive_interval: Duration::from_millis(300), keepalive_timeout: Duration::from_secs(1), ..Default::default() };
    let d = Dialer::builder(&url).key(key()).tls(trust).timeout(Duration::from_secs(3)).mux_config(short).build().expect("dialer");
    let mut uploads = tokio::task::JoinSet::new();
    let in_flight = std::sync::Arc::new(tokio::sync::Barrier::new(201));
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
    relay.signal("STOP");
    let t0 = Instant::now();
    let (mut worst, mut failed) = (Duration::ZERO, 0);
    while let Some(r) = within(Duration::from_secs(15), "every upload to fail", uploads.join_next()).await {
        let (at, e) = r.expect("upload task");
        let e = libtunnel::Error::from_io(e, "upload");
        assert_eq!(e.code(), ErrorCode::RelayUnavailable, "{e}");
        worst = worst.max(at.duration_since(t0));
        failed += 1;
    }
    assert_eq!(failed, 200);
    assert!(worst < Duration::from_secs(4), "the last upload failed {worst:?} after the freeze (keepalive timeout 1 s)");
    eprintln!("200 QUIC uploads over a frozen relay all failed within {worst:?} (keepalive timeout 1 s)");
    let r = tokio::time::timeout(Duration::from_secs(10), d.dial(&echo.to_string())).await.expect("a dial to a frozen relay is bounded");
    assert!(r.is_err(), "a dial through a frozen relay cannot succeed");
    relay.signal("CONT");
    let s = within(STEP, "dial after the relay is back", d.dial(&echo.to_string())).await.expect("dial after resume");
    let data = payload(MIB, 4);
    assert_eq!(within(STEP, "1 MiB round trip", echo_roundtrip(s, &data, true)).await.expect("round trip"), sha256(&data));
}

/// `n` real QUIC Initial datagrams, each opening a connection of its own (distinct destination
/// connection ids): a bare quinn client starts `n` handshakes toward a socket that never answers,
/// and the first datagram of each is kept.
async fn initials(n: usize) -> Vec<Vec<u8>> {
    let trap = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let to = trap.local_addr().expect("addr");
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
    let roots = rustls::RootCertStore::empty();
    let mut tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"libtunnel.v1".to_vec()];
    let cfg = quinn::ClientConfig::new(std::sync::Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls")));
    let mut attempts = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 2048];
    // In rounds of 50, so the trap's receive buffer never overflows.
    while out.len() < n {
        let want = (out.len() + 50).min(n);
        attempts.extend((out.len()..want).map(|_| ep.connect_with(cfg.clone(), to, "localhost").expect("connect")));
        while out.len() < want {
            let got = within(STEP, "QUIC Initials", trap.recv(&mut buf)).await.expect("recv");
            let d = &buf[..got];
            assert!(got >= 1200 && d[0] & 0xf0 == 0xc0, "a long-header Initial padded to 1,200 bytes: {got} bytes, first {:#x}", d[0]);
            let dcid = d[6..6 + d[5] as usize].to_vec();
            if seen.insert(dcid) {
                out.push(d.to_vec());
            }
        }
    }
    drop(attempts);
    ep.close(0u32.into(), b"");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_initials_from_one_source_and_from_many_leave_others_connecting_and_memory_bounded() {
    use std::time::Duration;
    init_tracing();
    let echo = echo_server().await;
    let (relay, trust) =
        quic_relay_process(&[echo.port()], &[("TUNNEL_ADMIN_LISTEN", "127.0.0.1:0"), ("TUNNEL_ADMIN_TOKEN", "flood-test-token")]).await;
    let metrics = || async {
        let admin = relay.admin.expect("admin");
        http_exchange(admin, "GET /metrics HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer flood-test-token\r\nConnection: close\r\n\r\n").await.1
    };
    let quic = relay.quic.expect("quic");
    let flood = std::sync::Arc::new(initials(2000).await);
    // Connection attempts spread over sockets bound to `ips`, none of which will ever finish its
    // handshake (nothing answers the relay from there, as from a spoofed address).
    let send_flood = |flood: std::sync::Arc<Vec<Vec<u8>>>, ips: Vec<String>| async move {
        let mut floods = tokio::task::JoinSet::new();
        let per = flood.len() / ips.len();
        for (part, ip) in ips.into_iter().enumerate() {
            let flood = flood.clone();
            floods.spawn(async move {
                let s = tokio::net::UdpSocket::bind((ip.as_str(), 0)).await.expect("bind");
                for initial in &flood[part * per..(part + 1) * per] {
                    let _ = s.send_to(initial, quic).await;
                }
                // Keep the port a while (the relay's answers land here and are dropped).
                tokio::time::sleep(Duration::from_secs(2)).await;
            });
        }
        floods
    };
    let rss0 = relay.rss_kib();
    // First, 2,000 attempts from 20 ports of one source, 127.0.0.1.
    let mut floods = send_flood(flood.clone(), vec!["127.0.0.1".to_string(); 20]).await;
    // Meanwhile a client from another source address (127.0.0.2, through a forwarder bound there)
    // connects and moves bytes.
    let other = udp_gate_from(quic, "127.0.0.2").await;
    let d = Dialer::builder(&format!("quic://localhost:{}", other.addr.port())).key(key()).tls(trust).timeout(STEP).build().expect("dialer");
    let t0 = std::time::Instant::now();
    echo_through(&d, echo, MIB, 1).await;
    eprintln!("a client from another source connected and echoed 1 MiB during the flood in {:?}", t0.elapsed());
    while floods.join_next().await.is_some() {}
    let rss1 = relay.rss_kib();
    let body = metrics().await;
    let (retries, held) = (metric(&body, "libtunnel_quic_retries_total"), metric(&body, "libtunnel_handshakes_open"));
    eprintln!("relay RSS {rss0} KiB before the flood, {rss1} KiB after it; {retries} Retries, {held} handshakes held");
    assert!(retries > 0, "a flood is answered with Retry: {body}");
    assert!(held <= 128, "one source holds at most max_handshakes_per_source (128) handshakes: {held}");
    assert!(rss1 < rss0 + 24 * 1024, "2,000 Initials grew the relay from {rss0} KiB to {rss1} KiB");
    // The held handshakes end at the handshake deadline (10 s); a second flood as large takes
    // no more memory than the first left (the endpoint's buffers and the allocator's arenas are
    // reused, not grown).
    let t0 = std::time::Instant::now();
    eventually_within(Duration::from_secs(30), "the flood's handshakes to end", || async {
        let held = metric(&metrics().await, "libtunnel_handshakes_open");
        holds(held, |h| *h == 0)
    })
    .await;
    eprintln!("the flood's handshakes ended {:?} after it; RSS {} KiB", t0.elapsed(), relay.rss_kib());
    // Then 2,000 attempts from 200 addresses (127.0.1.1 to 127.0.1.200: sources that never answer,
    // as spoofed ones): per-source limits do not hold them, the global handshake bound and Retry
    // do; the client from 127.0.0.2 still connects meanwhile.
    let again = initials(2000).await;
    let ips = (1..=200).map(|i| format!("127.0.1.{i}")).collect();
    let mut floods = send_flood(std::sync::Arc::new(again), ips).await;
    let t0 = std::time::Instant::now();
    echo_through(&d, echo, MIB, 2).await;
    eprintln!("the client connected and echoed 1 MiB during the flood from 200 sources in {:?}", t0.elapsed());
    while floods.join_next().await.is_some() {}
    let rss2 = relay.rss_kib();
    let body = metrics().await;
    let (retries2, held2) = (metric(&body, "libtunnel_quic_retries_total"), metric(&body, "libtunnel_handshakes_open"));
    eprintln!("after the flood from 200 sources: RSS {rss2} KiB (first flood {rss1} KiB, baseline {rss0} KiB); {retries2} Retries in all, {held2} handshakes held");
    assert!(retries2 > retries, "the flood from many sources is answered with Retry too");
    assert!(held2 <= 1024, "at most max_handshakes (1024) handshakes are held: {held2}");
    assert!(rss2 < rss1 + 8 * 1024, "a second flood grew the relay again: {rss1} KiB -> {rss2} KiB");
    echo_through(&d, echo, MIB, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_stopped_gracefully_tells_its_quic_listener_and_dialer_it_drained() {
    use libtunnel::client::events::Event;
    init_tracing();
    let echo = echo_server().await;
    let (relay, trust) = quic_relay_process(&[echo.port()], &[("TUNNEL_LISTENERS_OPEN", "true")]).await;
    let url = format!("quic://localhost:{}", relay.quic.expect("quic").port());
    let listener =
        within(STEP, "bind over quic://", Listener::builder(&url, Identity::generate()).tls(trust.clone()).bind()).await.expect("registers");
    let mut listener_events = listener.events();
    let dialer = Dialer::builder(&url).key(key()).tls(trust).timeout(STEP).build().expect("dialer");
    echo_through(&dialer, echo, 64 * 1024, 1).await;
    let mut dialer_events = dialer.events();
    relay.signal("TERM");
    for (events, who) in [(&mut listener_events, "listener"), (&mut dialer_events, "dialer")] {
        let e = loop {
            match within(STEP, "a disconnected event", events.next()).await.expect("events") {
                Event::Disconnected { code, message } => break (code, message),
                _ => continue,
            }
        };
        assert_eq!(e.0, ErrorCode::RelayUnavailable, "{who}: {}", e.1);
        assert!(e.1.contains("drained"), "{who} is told the relay drained: {}", e.1);
    }
}

/// Trusts any certificate: the measurement below holds QUIC connections to a relay and never
/// authenticates (the relay's certificate is not what is tested).
#[derive(Debug)]
struct AnyCert;

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider().signature_verification_algorithms.supported_schemes()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_quic_connections_cost_bounded_memory_and_end_at_the_handshake_deadline() {
    use std::time::{Duration, Instant};
    init_tracing();
    const HELD: usize = 100;
    let (relay, _) = quic_relay_process(
        &[9],
        &[("TUNNEL_HANDSHAKE_TIMEOUT", "3"), ("TUNNEL_ADMIN_LISTEN", "127.0.0.1:0"), ("TUNNEL_ADMIN_TOKEN", "held-test-token-16")],
    )
    .await;
    let quic = relay.quic.expect("quic");
    let admin = relay.admin.expect("admin");
    let handshakes = || async {
        let body =
            http_exchange(admin, "GET /metrics HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer held-test-token-16\r\nConnection: close\r\n\r\n")
                .await
                .1;
        metric(&body, "libtunnel_handshakes_open")
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyCert))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"libtunnel.v1".to_vec()];
    let cfg = quinn::ClientConfig::new(std::sync::Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls")));
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
    let rss0 = relay.rss_kib();
    // HELD connections that finish the QUIC handshake and then say nothing (no control stream,
    // no hello): what a client that connects and stalls costs the relay.
    let mut held = Vec::new();
    for _ in 0..HELD {
        let c = within(STEP, "a QUIC handshake", ep.connect_with(cfg.clone(), quic, "localhost").expect("connect")).await.expect("handshake");
        held.push(c);
    }
    let t0 = Instant::now();
    assert_eq!(handshakes().await, HELD as i64, "each held connection is an unauthenticated handshake");
    let rss1 = relay.rss_kib();
    let per = (rss1.saturating_sub(rss0)) as f64 / HELD as f64;
    eprintln!("{HELD} unauthenticated QUIC connections: relay RSS {rss0} -> {rss1} KiB, {per:.1} KiB each");
    assert!(per < 96.0, "an unauthenticated QUIC connection costs the relay {per:.1} KiB");
    // The handshake deadline (3 s) closes every one of them.
    for c in &held {
        let e = within(Duration::from_secs(10), "the relay to close a silent connection", c.closed()).await;
        assert!(
            matches!(
                e,
                quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::ConnectionClosed(_) | quinn::ConnectionError::TimedOut
            ),
            "{e}"
        );
    }
    let took = t0.elapsed();
    eprintln!("all {HELD} closed {took:?} after they were held (handshake_timeout 3 s)");
    assert!(took < Duration::from_secs(8), "{took:?}");
    eventually("the relay to count no handshake", || async { holds(handshakes().await, |h| *h == 0) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_and_a_pool_of_replicas_serve_over_quic() {
    use libtunnel::config::ExitGrant;
    init_tracing();
    let echo = echo_server().await;
    let exit_id = Identity::generate();
    let exit_name = exit_id.name();
    // The relay's allowlist admits nothing used here: the exit judges its own targets.
    let mut cfg = relay_config(allow_ports(&[9]));
    cfg.listeners_open = true;
    cfg.exits = vec![ExitGrant { name: exit_name.clone(), key_ids: vec![KID] }];
    let q = quic_relay(cfg).await;
    let url = q.url();
    // An exit over QUIC: a dialer over QUIC reaches a target inside the exit's network.
    let exit = within(STEP, "exit bind over quic://", Listener::builder(&url, exit_id).tls(q.trust.clone()).exit(allow_ports(&[echo.port()])).bind())
        .await
        .expect("the exit registers");
    assert!(exit.is_exit());
    let d = q.dialer();
    let data = payload(4 * MIB, 40);
    let s = within(STEP, "dial via the exit", d.dial_via(&echo.to_string(), &exit_name)).await.expect("dial via the exit");
    assert_eq!(within(BULK, "echo via the exit", echo_roundtrip(s, &data, true)).await.expect("echo"), sha256(&data));
    // Two replicas of one pool over QUIC share a name; dials reach both.
    let id = Identity::generate();
    let bind = || Listener::builder(&url, id.clone()).tls(q.trust.clone()).pool(true).bind();
    let (a, b) = (within(STEP, "replica A", bind()).await.expect("bind A"), within(STEP, "replica B", bind()).await.expect("bind B"));
    let name = a.name();
    assert_eq!(b.name(), name);
    let served = std::sync::Arc::new([std::sync::atomic::AtomicUsize::new(0), std::sync::atomic::AtomicUsize::new(0)]);
    for (i, l) in [a, b].into_iter().enumerate() {
        let served = served.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                served[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::spawn(async move {
                    let (mut r, mut w) = tokio::io::split(&mut s);
                    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                        let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
                    }
                });
            }
        });
    }
    for i in 0..40u64 {
        let small = payload(1024, 100 + i);
        let s = within(STEP, "dial the pool", d.dial(&format!("{name}:80"))).await.expect("dial the pool by name");
        assert_eq!(within(STEP, "echo", echo_roundtrip(s, &small, true)).await.expect("echo"), sha256(&small));
    }
    let (sa, sb) = (served[0].load(std::sync::atomic::Ordering::Relaxed), served[1].load(std::sync::atomic::Ordering::Relaxed));
    assert_eq!(sa + sb, 40);
    assert!(sa > 0 && sb > 0, "both replicas served dials: {sa} and {sb}");
}
