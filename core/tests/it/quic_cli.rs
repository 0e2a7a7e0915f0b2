//! The QUIC transport (`quic://`) through the `tunnel` binary: a real `tunnel server` with
//! `TUNNEL_QUIC_LISTEN` and a self-signed certificate for `localhost`, its `quic listening:` line
//! read from its output, then `tunnel forward`, `tunnel dial` and `tunnel listen` over
//! `quic://localhost:PORT --ca CERT`, every byte hashed; a wrong key (exit 2, `AUTH_FAILED`);
//! `--classic` with a `quic://` URL (a clear error naming the fix); the admin `/config` and
//! `/metrics` showing the QUIC endpoint and its sessions; `tunnel server --help` and `--set help`
//! listing the QUIC settings. Every child is killed when its guard drops; every wait is bounded.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};

use testkit::procs::{self, Proc};
use testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ADMIN_TOKEN: &str = "quic-cli-admin-token-0123456789abcdef";

/// A `tunnel server` with the tunnel endpoint over TLS (`wss://`), the QUIC endpoint, the admin
/// endpoint and open listener registration, all on loopback port 0.
struct QuicServer {
    proc: Proc,
    /// `quic://localhost:PORT` (the certificate names `localhost`).
    quic: String,
    /// `wss://localhost:PORT`, the tunnel endpoint over TLS with the same certificate.
    wss: String,
    /// The relay's certificate, which clients trust with `--ca`.
    ca: PathBuf,
    admin: SocketAddr,
    dir: PathBuf,
}

async fn quic_server(allow: &[u16]) -> QuicServer {
    let dir = procs::scratch("quic-cli");
    let (cert, key, _) = self_signed_cert_in(&dir);
    let mut cmd = procs::tunnel(&dir, &["server"]);
    cmd.env("TUNNEL_LISTEN", "127.0.0.1:0")
        .env("TUNNEL_AUTH_KEYS", auth_keys_json())
        .env("TUNNEL_ALLOW", allow_json(allow))
        .env("TUNNEL_TLS_CERT", &cert)
        .env("TUNNEL_TLS_KEY", &key)
        .env("TUNNEL_QUIC_LISTEN", "127.0.0.1:0")
        .env("TUNNEL_LISTENERS_OPEN", "true")
        .env("TUNNEL_ADMIN_LISTEN", "127.0.0.1:0")
        .env("TUNNEL_ADMIN_TOKEN", ADMIN_TOKEN);
    let mut proc = Proc::spawn("tunnel server (quic_listen)", cmd);
    // The ready lines come in this order: tunnel endpoint, admin, then QUIC.
    let wss = proc.line("relay listening: ").await;
    assert!(wss.starts_with("wss://127.0.0.1:"), "the tunnel endpoint is TLS with the certificate: {wss}");
    let admin: SocketAddr = proc.line("admin listening: http://").await.trim().trim_end_matches('/').parse().expect("the admin address");
    let quic = proc.line("quic listening: ").await;
    let port = quic
        .trim()
        .strip_prefix("quic://127.0.0.1:")
        .and_then(|p| p.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("`quic listening:` should give quic://127.0.0.1:PORT, not {quic:?}"));
    assert_ne!(port, 0, "the chosen UDP port is printed, not :0");
    let wss = wss.trim().replace("127.0.0.1", "localhost");
    QuicServer { proc, quic: format!("quic://localhost:{port}"), wss, ca: cert, admin, dir }
}

impl QuicServer {
    fn ca(&self) -> &str {
        self.ca.to_str().expect("utf8 path")
    }

    /// GET `path` on the admin endpoint with the token: (status, body).
    async fn admin(&self, path: &str) -> (u16, String) {
        let req = format!("GET {path} HTTP/1.1\r\nhost: admin\r\nauthorization: Bearer {ADMIN_TOKEN}\r\nconnection: close\r\n\r\n");
        http_exchange(self.admin, &req).await
    }
}

/// `tunnel dial TARGET --relay URL ARGS` with `input` on stdin (closed after it): (status,
/// stdout bytes, stderr).
async fn dial(dir: &std::path::Path, url: &str, key: &str, target: &str, extra: &[&str], input: &[u8]) -> (ExitStatus, Vec<u8>, String) {
    let mut args = vec!["dial", target, "--relay", url];
    args.extend_from_slice(extra);
    let mut cmd = procs::tunnel(dir, &args);
    cmd.env("TUNNEL_KEY", key).stdin(Stdio::piped());
    let mut p = Proc::spawn_raw_stdout("tunnel dial (quic)", cmd);
    let mut stdin = p.child.stdin.take().expect("stdin is piped");
    let mut stdout = p.child.stdout.take().expect("stdout is piped");
    let write = async {
        let _ = stdin.write_all(input).await;
        drop(stdin);
    };
    let read = async {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out).await;
        out
    };
    let ((), out) = within(BULK, "tunnel dial's output", async { tokio::join!(write, read) }).await;
    let status = p.exit(STEP).await;
    (status, out, p.stderr())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_dial_and_listen_over_quic_with_the_relays_ca() {
    init_tracing();
    let echo = echo_server().await;
    let s = quic_server(&[echo.port()]).await;

    // tunnel forward: four clients at once through one QUIC session, each hashed both ways.
    let target = echo.to_string();
    let mut cmd = procs::tunnel(&s.dir, &["forward", "127.0.0.1:0", &target, "--relay", &s.quic, "--ca", s.ca()]);
    cmd.env("TUNNEL_KEY", key_string());
    let mut fwd = Proc::spawn("tunnel forward (quic)", cmd);
    let rest = fwd.line("forwarding ").await;
    assert!(rest.contains(&s.quic), "the forward names the QUIC relay: {rest}");
    let local: SocketAddr = rest.split_whitespace().next().and_then(|a| a.parse().ok()).expect("the local address");
    let runs: Vec<_> = (0..4u64)
        .map(|i| async move {
            let data = payload(2 * MIB + i as usize * 4099, 3200 + i);
            let c = within(STEP, "connecting to the forward", TcpStream::connect(local)).await.expect("connect");
            let got = within(BULK, "round trip through tunnel forward over quic://", echo_roundtrip(c, &data, true)).await;
            (got.map_err(|e| e.to_string()), sha256(&data))
        })
        .collect();
    for (got, want) in futures_util::future::join_all(runs).await {
        let got = got.unwrap_or_else(|e| panic!("forward over quic:// failed: {e}\nstderr:\n{}\nrelay:\n{}", fwd.stderr(), s.proc.stderr()));
        assert_eq!(got, want, "forward over quic:// returned other bytes");
    }
    drop(fwd);

    // tunnel dial: stdin to the echo, half-closed at EOF, the echo on stdout.
    let data = payload(4 * MIB + 5, 3300);
    let (status, out, err) = dial(&s.dir, &s.quic, &key_string(), &target, &["--ca", s.ca()], &data).await;
    assert!(status.success(), "tunnel dial over quic:// failed ({status}): {err}");
    assert_eq!(out.len(), data.len(), "stderr: {err}");
    assert_eq!(sha256(&out), sha256(&data), "tunnel dial over quic:// returned other bytes");

    // tunnel listen over quic://, dialed by name through tunnel dial over wss:// (the relay joins
    // a QUIC stream to a WebSocket one; QUIC to QUIC: a_listener_over_quic_dialed_over_quic_keeps_the_relay_up).
    let key = s.dir.join("listener.pem");
    libtunnel::Identity::generate().save(&key).expect("write the listener key");
    let (_listener, name) = procs::listen_process_with(&s.quic, &key, &["--to", &target, "--ca", s.ca()]).await;
    let data = payload(3 * MIB + 11, 3400);
    let (status, out, err) = dial(&s.dir, &s.wss, &key_string(), &format!("{name}:0"), &["--ca", s.ca()], &data).await;
    assert!(status.success(), "dial by name to a listener over quic:// failed ({status}): {err}\nrelay:\n{}", s.proc.stderr());
    assert_eq!(sha256(&out), sha256(&data), "the listener's echo over quic:// differs ({} of {} bytes)", out.len(), data.len());

    // The forward's and the dial's sessions were QUIC, the dial by name's a WebSocket (dialer
    // sessions; the listener's is counted apart).
    let (code, m) = s.admin("/metrics").await;
    assert_eq!(code, 200, "{m}");
    assert_eq!(metric(&m, "libtunnel_sessions_total{mode=\"quic\"}"), 2, "{m}");
    assert_eq!(metric(&m, "libtunnel_sessions_total{mode=\"multiplexed\"}"), 1, "{m}");
    assert_eq!(metric(&m, "libtunnel_listeners_active"), 1, "{m}");
    // /config shows the QUIC endpoint and its congestion controller.
    let (code, cfg) = s.admin("/config").await;
    assert_eq!(code, 200, "{cfg}");
    assert!(cfg.contains(r#""quic_listen": "127.0.0.1:0""#), "/config shows quic_listen: {cfg}");
    assert!(cfg.contains(r#""quic_congestion": "cubic""#), "/config shows quic_congestion: {cfg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_refusals_exit_with_their_codes() {
    init_tracing();
    let echo = echo_server().await;
    let s = quic_server(&[echo.port()]).await;
    let target = echo.to_string();
    let ca = ["--ca", s.ca()];

    // A wrong key: `tunnel forward` refuses to start (exit 2, like ssh -L), `tunnel dial` fails
    // (exit 1); both name AUTH_FAILED.
    let wrong = format!("{KID}:bm90LXRoZS1yaWdodC1zZWNyZXQtMDEyMzQ1Njc4OQ==");
    // A refusal is sometimes reported as the connection dropped in the handshake (RELAY_UNAVAILABLE):
    // a core bug, `a_wrong_key_over_quic_is_always_auth_failed` below; retried here so this test
    // checks the CLI, not that race.
    let mut tries = 0;
    let (status, err) = loop {
        let mut cmd = procs::tunnel(&s.dir, &["forward", "127.0.0.1:0", &target, "--relay", &s.quic, "--ca", s.ca()]);
        cmd.env("TUNNEL_KEY", &wrong);
        let (status, _, err) = procs::run(&mut cmd).await;
        tries += 1;
        if !err.contains("RELAY_UNAVAILABLE") || tries == 4 {
            break (status, err);
        }
    };
    assert_eq!(status.code(), Some(2), "a refused key stops tunnel forward with 2: {err}");
    assert!(err.contains("AUTH_FAILED") && err.contains(&s.quic), "stderr carries the code and the URL: {err}");
    let mut tries = 0;
    let (status, out, err) = loop {
        let (status, out, err) = dial(&s.dir, &s.quic, &wrong, &target, &ca, b"x").await;
        tries += 1;
        if !err.contains("RELAY_UNAVAILABLE") || tries == 4 {
            break (status, out, err);
        }
    };
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(out.is_empty() && err.contains("AUTH_FAILED"), "stderr carries the code: {err}");

    // A target outside the allowlist: NOT_ALLOWED.
    let denied = format!("127.0.0.1:{}", closed_port().await);
    let (status, out, err) = dial(&s.dir, &s.quic, &key_string(), &denied, &ca, b"").await;
    assert!(!status.success() && out.is_empty(), "{status}");
    assert!(err.contains("NOT_ALLOWED"), "{err}");

    // Without --ca the self-signed certificate is not trusted: a TLS failure, not a hang.
    let (status, _, err) = dial(&s.dir, &s.quic, &key_string(), &target, &[], b"x").await;
    assert!(!status.success(), "a certificate nobody vouches for must be refused");
    assert!(err.to_ascii_lowercase().contains("certificate"), "the error names the certificate: {err}");

    // --classic is Emissary's WebSocket protocol: a quic:// URL cannot carry it, and the message
    // names the fix.
    let (status, out, err) = dial(&s.dir, &s.quic, &key_string(), &target, &["--ca", s.ca(), "--classic"], b"x").await;
    assert!(!status.success() && out.is_empty(), "{status}");
    assert!(err.contains("INVALID_ARGUMENT"), "{err}");
    assert!(err.contains("quic://") && err.contains("classic mode") && err.contains("needs ws:// or wss://"), "the error names the fix: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_help_lists_the_quic_settings() {
    let dir = procs::scratch("quic-help");
    let (status, out, err) = procs::run(&mut procs::tunnel(&dir, &["server", "--help"])).await;
    assert!(status.success(), "{err}");
    for name in ["quic_listen", "quic_congestion"] {
        assert!(out.contains(name), "`tunnel server --help` lists {name}:\n{out}");
    }
    let (status, out, err) = procs::run(&mut procs::tunnel(&dir, &["server", "--set", "help"])).await;
    assert!(status.success(), "{err}");
    let all = format!("{out}{err}");
    for needle in ["quic_listen", "quic_congestion", "cubic, bbr or newreno", "TUNNEL_QUIC_CONGESTION"] {
        assert!(all.contains(needle), "`tunnel server --set help` lists {needle}:\n{all}");
    }
    // A congestion controller that does not exist is named with the choices.
    let mut cmd = procs::tunnel(&dir, &["server"]);
    cmd.env("TUNNEL_LISTEN", "127.0.0.1:0")
        .env("TUNNEL_AUTH_KEYS", auth_keys_json())
        .env("TUNNEL_ALLOW", allow_json(&[80]))
        .env("TUNNEL_QUIC_CONGESTION", "vegas");
    let (status, _, err) = procs::run(&mut cmd).await;
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("TUNNEL_QUIC_CONGESTION") && err.contains("bbr"), "{err}");
}

/// A listener on QUIC dialed by name over QUIC: the relay joins two QUIC streams, five times, and
/// stays up without a panic. Before main's `QuicStream::poll_cut_off` stopped using quinn's
/// `received_reset()` (which left a reader registered on a stream read to its end), a debug relay
/// panicked in quinn's `RecvStream` drop assertion here, twice in one unwinding, and aborted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_over_quic_dialed_over_quic_keeps_the_relay_up() {
    init_tracing();
    let echo = echo_server().await;
    let mut s = quic_server(&[echo.port()]).await;
    let key = s.dir.join("listener.pem");
    libtunnel::Identity::generate().save(&key).expect("write the listener key");
    let (_listener, name) = procs::listen_process_with(&s.quic, &key, &["--to", &echo.to_string(), "--ca", s.ca()]).await;
    for seed in 0..5u64 {
        let data = payload(MIB + seed as usize, 3500 + seed);
        let (status, out, err) = dial(&s.dir, &s.quic, &key_string(), &format!("{name}:0"), &["--ca", s.ca()], &data).await;
        assert!(status.success(), "dial {seed} by name over quic:// failed ({status}): {err}\nrelay:\n{}", s.proc.stderr());
        assert_eq!(sha256(&out), sha256(&data), "dial {seed}");
    }
    assert!(s.proc.child.try_wait().expect("the relay's status").is_none(), "the relay died:\n{}", s.proc.stderr());
    assert!(!s.proc.stderr().contains("panicked"), "the relay panicked:\n{}", s.proc.stderr());
}

/// A wrong key over `quic://` must always fail with AUTH_FAILED (final: a relay list must not fall
/// back to `wss://` on it). About one connect in 150 used to report RELAY_UNAVAILABLE ("the relay
/// at quic://… dropped the connection during the handshake"): the relay closed the connection
/// once its refusal was acknowledged, and the client's QUIC stack discarded the refusal unread.
/// The relay now waits for the client to close. 150 connects (`LIBTUNNEL_WRONG_KEY_CONNECTS` for
/// more: 600 passed once the relay waited, 0 of them RELAY_UNAVAILABLE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_over_quic_is_always_auth_failed() {
    init_tracing();
    let (cert, tls_key, pem) = self_signed_cert();
    let mut cfg = relay_config(allow_ports(&[9]));
    cfg.tls_cert = Some(cert);
    cfg.tls_key = Some(tls_key);
    cfg.quic_listen = Some("127.0.0.1:0".parse().expect("addr"));
    cfg.limits.max_handshakes_per_source = 100_000;
    // Every refusal answered at once (not slowed as a source's repeated failures are).
    cfg.limits.auth_failures_per_minute = 1_000_000;
    let relay = start_relay(cfg).await;
    let url = format!("quic://localhost:{}", relay.quic_addr().expect("the QUIC endpoint").port());
    let trust = libtunnel::transport::ClientTls::from_pem(pem.as_bytes()).expect("CA bundle");
    let wrong = libtunnel::Key::parse(&format!("{KID}:bm90LXRoZS1yaWdodC1zZWNyZXQtMDEyMzQ1Njc4OQ==")).expect("a key");
    let mut other = Vec::new();
    let connects: usize = std::env::var("LIBTUNNEL_WRONG_KEY_CONNECTS").ok().and_then(|v| v.parse().ok()).unwrap_or(150);
    for i in 0..connects {
        let d = libtunnel::Dialer::builder(&url).key(wrong.clone()).tls(trust.clone()).timeout(STEP).build().expect("dialer");
        match within(STEP, "a refused connect", d.connect()).await {
            Ok(()) => panic!("connect {i} with a wrong key succeeded"),
            Err(e) if e.code() == libtunnel::ErrorCode::AuthFailed => {}
            Err(e) => other.push(format!("connect {i}: [{}] {e}", e.code())),
        }
    }
    assert!(other.is_empty(), "{} of {connects} wrong-key connects were not AUTH_FAILED:\n{}", other.len(), other.join("\n"));
}
