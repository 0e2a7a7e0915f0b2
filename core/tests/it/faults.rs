//! Faults, each with hashed data and bounded waits: a target that resets mid-stream, a stream
//! whose reader stops (its writer blocks; the session's other streams keep flowing), and a
//! half-open transport (a relay process frozen with SIGSTOP) found by the keepalive.

use testkit::procs;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libtunnel::mux::MuxConfig;
use libtunnel::{Dialer, ErrorCode, Mode};
use testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const STEP: Duration = Duration::from_secs(10);
const MIB: usize = 1024 * 1024;

fn dialer(url: &str, mode: Mode) -> Dialer {
    Dialer::builder(url).key(key()).mode(mode).timeout(STEP).build().expect("valid dialer settings")
}

/// A target that waits for one byte (so the relay's connect has surely completed), sends `before`
/// bytes, then resets the connection (linger 0).
async fn resetting_server(before: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let data = payload(before, 3);
                let mut go = [0u8; 1];
                if s.read_exact(&mut go).await.is_ok() && s.write_all(&data).await.is_ok() {
                    let _ = s.set_zero_linger();
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_reset_mid_stream_is_an_error_not_an_end() {
    init_tracing();
    let target = resetting_server(MIB).await;
    let relay = start_relay(relay_config(allow_ports(&[target.port()]))).await;
    for mode in [Mode::Multiplexed, Mode::Classic] {
        let d = dialer(relay.url(), mode);
        let mut s = within(STEP, "dial", d.dial(&target.to_string())).await.expect("dial");
        s.write_all(b"g").await.expect("write");
        s.flush().await.expect("flush");
        let mut got = Vec::new();
        let r = within(STEP, "the read to end", s.read_to_end(&mut got)).await;
        let want = payload(MIB, 3);
        assert!(got.len() <= want.len() && got == want[..got.len()], "{mode:?}: bytes before the reset were corrupted");
        if mode == Mode::Multiplexed {
            let e = r.expect_err("a reset target must not read as a clean end of stream");
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{mode:?}: {e}");
        }
        // Classic mode is Emissary's protocol: the relay closes the WebSocket; what the client
        // sees is a close (there is no reset frame), but never more or other bytes.
    }
    relay.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_that_stops_reading_does_not_stall_its_session() {
    init_tracing();
    let echo = echo_server().await;
    let relay = start_relay(relay_config(allow_ports(&[echo.port()]))).await;
    let d = dialer(relay.url(), Mode::Multiplexed);
    // Stream A: we write to an echo target but never read the echo back, so its window and then
    // the target's socket buffers fill, and our writes stop completing.
    let mut a = within(STEP, "dial A", d.dial(&echo.to_string())).await.expect("dial A");
    let chunk = vec![7u8; 64 * 1024];
    let mut written = 0usize;
    let blocked = loop {
        match tokio::time::timeout(Duration::from_millis(500), a.write_all(&chunk)).await {
            Ok(Ok(())) => written += chunk.len(),
            Ok(Err(e)) => panic!("stream A failed instead of blocking: {e}"),
            Err(_) => break true,
        }
        assert!(written < 256 * MIB, "stream A never applied backpressure");
    };
    assert!(blocked);
    // Stream B on the same session: 32 MiB each way, hashed, while A is stuck.
    let b = within(STEP, "dial B", d.dial(&echo.to_string())).await.expect("dial B");
    let data = payload(32 * MIB, 8);
    let t0 = Instant::now();
    let got = within(Duration::from_secs(30), "32 MiB on B while A is stuck", echo_roundtrip(b, &data, true)).await.expect("B round trip");
    assert_eq!(got, sha256(&data), "stream B's bytes changed");
    eprintln!("stream A blocked after {} KiB; B moved 32 MiB each way in {:?}", written / 1024, t0.elapsed());
    // A is still intact: reading drains its echo and its writer moves again.
    let mut buf = vec![0u8; 64 * 1024];
    within(STEP, "A's echo", a.read_exact(&mut buf)).await.expect("A reads its echo");
    assert!(buf.iter().all(|&b| b == 7), "A's echo differs");
    relay.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_relay_is_found_by_the_keepalive() {
    init_tracing();
    let echo = echo_server().await;
    // A relay process we can freeze with SIGSTOP: packets go nowhere, nothing is closed.
    let allow = format!(r#"[{{"host":"127.0.0.1","port":{}}}]"#, echo.port());
    let (mut relay, url) = procs::relay_process(&[("TUNNEL_ALLOW", allow.as_str())]).await;
    let cfg = MuxConfig { keepalive_interval: Duration::from_millis(300), keepalive_timeout: Duration::from_secs(1), ..MuxConfig::default() };
    let d = Dialer::builder(&url).key(key()).timeout(STEP).mux_config(cfg).build().expect("dialer");
    let mut s = within(STEP, "dial", d.dial(&echo.to_string())).await.expect("dial");
    s.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    within(STEP, "echo", s.read_exact(&mut buf)).await.expect("echo");

    let pid = relay.id().expect("running").to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().expect("kill").success());
    let t0 = Instant::now();
    let r = within(STEP, "the frozen session to be dropped", s.read(&mut buf)).await;
    let waited = t0.elapsed();
    let _ = std::process::Command::new("kill").args(["-CONT", &pid]).status();
    let e = r.expect_err("a stream over a frozen relay must fail, not hang or end cleanly");
    let e = libtunnel::Error::from_io(e, "read");
    assert_eq!(e.code(), ErrorCode::RelayUnavailable, "{e}");
    assert!(waited < Duration::from_secs(5), "the keepalive took {waited:?} (timeout 1 s)");
    eprintln!("frozen relay detected after {waited:?}");
    let _ = relay.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_or_frozen_listener_process_frees_its_name() {
    init_tracing();
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("faults-listen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let mut cfg = relay_config(allow_ports(&[9]));
    cfg.listeners_open = true;
    cfg.limits.keepalive_interval = Duration::from_millis(300);
    cfg.limits.keepalive_timeout = Duration::from_secs(1);
    let relay = start_relay(cfg).await;

    // Killed: the kernel closes its connection, the relay frees the name at once.
    let (mut killed, _) = procs::listen_process(relay.url(), "127.0.0.1:9", &dir.join("a")).await;
    // The relay answers the registration before it counts the listener as active.
    eventually("the listener to count as active", || async { holds(relay.metrics().listeners_active(), |n| *n == 1) }).await;
    killed.kill().await.expect("SIGKILL");
    let t0 = Instant::now();
    eventually("the killed listener's name to be freed", || async { holds(relay.metrics().listeners_active(), |n| *n == 0) }).await;
    eprintln!("killed listener freed after {:?}", t0.elapsed());

    // Frozen (SIGSTOP): nothing is closed; the keepalive finds it within its timeout.
    let (mut frozen, name) = procs::listen_process(relay.url(), "127.0.0.1:9", &dir.join("b")).await;
    eventually("the second listener to count as active", || async { holds(relay.metrics().listeners_active(), |n| *n == 1) }).await;
    let pid = frozen.id().expect("running").to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().expect("kill").success());
    let t0 = Instant::now();
    eventually("the frozen listener's name to be freed", || async { holds(relay.metrics().listeners_active(), |n| *n == 0) }).await;
    let waited = t0.elapsed();
    let _ = std::process::Command::new("kill").args(["-CONT", &pid]).status();
    assert!(waited < Duration::from_secs(5), "the relay took {waited:?} to drop a silent listener (timeout 1 s)");
    eprintln!("frozen listener freed after {waited:?}");
    let e = within(STEP, "a dial to the freed name", dialer(relay.url(), Mode::Multiplexed).dial(&format!("{name}:0"))).await;
    assert!(e.is_err(), "a freed name must not be reachable");
    let _ = frozen.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    relay.abort();
}
