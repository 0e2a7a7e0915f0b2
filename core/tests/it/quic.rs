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
