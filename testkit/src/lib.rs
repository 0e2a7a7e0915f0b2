//! The helpers libtunnel's Rust tests share (`core/tests/it`, `ffi/tests`): the test key, relays
//! on loopback (in process here, as `tunnel` processes in [`procs`], a Redis + HAProxy cluster in
//! [`cluster`], behind nginx as a gRPC-only proxy in [`nginx`]), local targets (echo, "hash after
//! EOF", "reply then close"), payloads and hashed round trips, HTTP/1 exchanges, metrics, and
//! bounded waits ([`within`], [`eventually`]).
//! Test-only: a dev-dependency, never published. Every wait is bounded.

pub mod cluster;
pub mod dns;
pub mod h2raw;
pub mod nginx;
pub mod pki;
pub mod procs;
pub mod raw;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use libtunnel::auth::KeySet;
use libtunnel::egress::allowlist::Allowlist;
use libtunnel::{Key, RelayConfig, Server, ServerHandle};
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Key id and secret every relay in these tests accepts.
pub const KID: u32 = 3;
pub const SECRET: &[u8] = b"libtunnel-e2e-test-secret-0123456789";

/// Upper bound for any single step that should be quick (connect, dial, a small exchange).
pub const STEP: Duration = Duration::from_secs(10);
/// Upper bound for a bulk transfer.
pub const BULK: Duration = Duration::from_secs(60);

pub const MIB: usize = 1024 * 1024;

/// Log to the test's captured output when `RUST_LOG` is set.
pub fn init_tracing() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
    }
}

pub fn key() -> Key {
    Key::new(KID, SECRET.to_vec()).expect("non-empty secret")
}

/// [`key`] as `KID:BASE64`, the form of `TUNNEL_KEY` and of `--key`.
pub fn key_string() -> String {
    key().to_key_string()
}

/// `TUNNEL_AUTH_KEYS` JSON for [`key`].
pub fn auth_keys_json() -> String {
    use base64::Engine;
    format!(r#"[{{"kid":{KID},"data":"{}"}}]"#, base64::engine::general_purpose::STANDARD.encode(SECRET))
}

pub fn keyset() -> KeySet {
    KeySet::new([key()]).expect("one key")
}

pub fn allow(json: &str) -> Allowlist {
    Allowlist::from_json(json, "TUNNEL_ALLOW").expect("valid allow rules")
}

/// Allow exactly these loopback ports on 127.0.0.1.
pub fn allow_ports(ports: &[u16]) -> Allowlist {
    allow(&allow_json(ports))
}

/// `TUNNEL_ALLOW` JSON admitting exactly these ports on 127.0.0.1.
pub fn allow_json(ports: &[u16]) -> String {
    let rules: Vec<String> = ports.iter().map(|p| format!(r#"{{"host":"127.0.0.1","port":{p}}}"#)).collect();
    format!("[{}]", rules.join(","))
}

pub fn relay_config(allow: Allowlist) -> RelayConfig {
    RelayConfig::new(keyset(), allow)
}

pub async fn start_relay(cfg: RelayConfig) -> ServerHandle {
    Server::bind(cfg).await.expect("relay binds on loopback").spawn()
}

/// Await `f`, failing the test with `what` if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {:.1}s", limit.as_secs_f64()),
    }
}

/// Deterministic pseudo-random bytes (distinct per seed).
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

pub fn sha256(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

/// A port on 127.0.0.1 with nothing listening on it (bound then released).
pub async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr").port()
}

async fn serve_forever<F, Fut>(l: TcpListener, handler: F)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    while let Ok((s, _)) = l.accept().await {
        tokio::spawn(handler(s));
    }
}

/// An echo server: copies what it reads back, and half-closes after the client's EOF.
pub async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(serve_forever(l, |s| async move {
        let (mut r, mut w) = s.into_split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    }));
    addr
}

/// Answers only after the client's EOF: sends the SHA-256 of everything it read, then closes.
pub async fn hash_after_eof_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(serve_forever(l, |mut s| async move {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => h.update(&buf[..n]),
                Err(_) => return,
            }
        }
        let d: [u8; 32] = h.finalize().into();
        let _ = s.write_all(&d).await;
        let _ = s.shutdown().await;
    }));
    addr
}

/// On `ip` (a loopback address such as 127.0.0.2, to tell it from targets on 127.0.0.1): answers
/// each connection's first four bytes with the same four bytes.
pub async fn word_echo(ip: &str) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).await.unwrap_or_else(|e| panic!("bind {ip}: {e}"));
    let addr = l.local_addr().expect("addr");
    tokio::spawn(serve_forever(l, |mut s| async move {
        let mut word = [0u8; 4];
        if s.read_exact(&mut word).await.is_ok() {
            let _ = s.write_all(&word).await;
        }
    }));
    addr
}

/// Reads `expect` bytes, writes `reply`, and closes its side (it never waits for the client's EOF).
pub async fn reply_then_close_server(expect: usize, reply: Vec<u8>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(serve_forever(l, move |mut s| {
        let reply = reply.clone();
        async move {
            let mut got = vec![0u8; expect];
            if s.read_exact(&mut got).await.is_err() {
                return;
            }
            let _ = s.write_all(&reply).await;
            let _ = s.shutdown().await;
            // Linger until the client goes, so the close is a FIN, not a reset.
            let mut sink = [0u8; 1024];
            while let Ok(n) = s.read(&mut sink).await {
                if n == 0 {
                    break;
                }
            }
        }
    }));
    addr
}

/// Write `data` while reading the echo back, hashing what arrives. With `half_close`, the write
/// side is shut down right after the data (multiplexed mode) and EOF must follow the echo;
/// otherwise (classic mode, where shutdown closes the whole tunnel) it is shut down only after
/// the whole echo arrived. Returns the SHA-256 of the bytes read.
pub async fn echo_roundtrip<S>(stream: S, data: &[u8], half_close: bool) -> io::Result<[u8; 32]>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let write = async {
        for chunk in data.chunks(256 * 1024) {
            wr.write_all(chunk).await?;
        }
        wr.flush().await?;
        if !half_close {
            // Classic: closing our side closes the tunnel, so wait for the whole echo first.
            let _ = done_rx.await;
        }
        wr.shutdown().await?;
        Ok::<_, io::Error>(())
    };
    let read = async {
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 128 * 1024];
        let mut got = 0usize;
        while got < data.len() {
            let want = buf.len().min(data.len() - got);
            let n = rd.read(&mut buf[..want]).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("echo ended after {got} of {} bytes", data.len())));
            }
            h.update(&buf[..n]);
            got += n;
        }
        let _ = done_tx.send(());
        if half_close {
            let n = rd.read(&mut buf).await?;
            if n != 0 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{n} bytes beyond the echo")));
            }
        }
        Ok::<_, io::Error>(h.finalize().into())
    };
    let (w, r) = tokio::join!(write, read);
    let digest = r?;
    w?;
    Ok(digest)
}

/// Read one HTTP/1.1 request head (through the blank line) for a tiny test server; `None` when
/// the client goes first.
pub async fn read_http_head<R: AsyncRead + Unpin>(r: &mut R) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}

/// Accept every stream `listener` gets and hold it, never reading: a service that stalls. The
/// streams stay open while the returned list lives.
pub fn hold_streams(listener: libtunnel::Listener) -> std::sync::Arc<std::sync::Mutex<Vec<libtunnel::TunnelStream>>> {
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let h = held.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            h.lock().expect("held").push(s);
        }
    });
    held
}

/// Read until EOF (bounded by the caller).
pub async fn read_to_end<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Vec<u8>> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).await?;
    Ok(v)
}

/// One HTTP/1.1 GET on a fresh connection; returns (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    http_exchange(addr, &req).await
}

/// Send a raw HTTP/1.1 request on a fresh connection and read one response; returns (status, body).
pub async fn http_exchange(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = within(STEP, "connecting for HTTP", TcpStream::connect(addr)).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("send request");
    within(STEP, "reading the HTTP response", read_http_response(&mut s)).await
}

/// Read one HTTP/1.1 response with a `Content-Length` body (or a body that ends at close).
pub async fn read_http_response<R: AsyncRead + Unpin>(r: &mut R) -> (u16, String) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = r.read(&mut buf).await.expect("read HTTP response head");
        assert!(n > 0, "connection closed inside the HTTP head: {:?}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no HTTP status in {head:?}"));
    let len = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok()).flatten()
    });
    let mut body = raw[head_end..].to_vec();
    match len {
        Some(len) => {
            while body.len() < len {
                let n = r.read(&mut buf).await.expect("read HTTP body");
                assert!(n > 0, "connection closed inside the HTTP body");
                body.extend_from_slice(&buf[..n]);
            }
        }
        None => {
            r.read_to_end(&mut body).await.expect("read HTTP body");
        }
    }
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The value of one metric line (`name{labels} value`) in a Prometheus exposition.
pub fn metric(text: &str, series: &str) -> i64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("metric {series} not found in:\n{text}"))
}

/// An echo server that counts the connections it accepted (to prove a refused target was never reached).
pub async fn counting_echo_server() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, hits)
}

/// How long [`eventually`] waits for something that should follow quickly from what a test did.
pub const EVENTUALLY: Duration = Duration::from_secs(10);

/// Await a state the test cannot be told about (a metric, a log line, a registration that lands
/// a moment after its answer): `attempt` is polled (5 ms, backing off to 100 ms) until it returns
/// `Ok(value)`, within [`EVENTUALLY`]. `Err(observed)` means "not yet" and carries what it saw,
/// so the failure reads "`what` did not happen within 10.0s; last observed: …". An attempt that
/// itself hangs past the deadline fails the same way.
pub async fn eventually<T, E, F, Fut>(what: &str, attempt: F) -> T
where
    E: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    eventually_within(EVENTUALLY, what, attempt).await
}

/// [`eventually`] with another bound (a cluster's TTL, a keepalive timeout).
pub async fn eventually_within<T, E, F, Fut>(limit: Duration, what: &str, mut attempt: F) -> T
where
    E: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    let mut pause = Duration::from_millis(5);
    let mut last: Option<E> = None;
    loop {
        match tokio::time::timeout_at(deadline, attempt()).await {
            Ok(Ok(v)) => return v,
            Ok(Err(seen)) => last = Some(seen),
            Err(_) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            match last {
                Some(seen) => panic!("{what} did not happen within {:.1}s; last observed: {seen:?}", limit.as_secs_f64()),
                None => panic!("{what} did not happen within {:.1}s (no attempt returned)", limit.as_secs_f64()),
            }
        }
        tokio::time::sleep(pause.min(deadline.saturating_duration_since(tokio::time::Instant::now()))).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// `Ok(v)` when `pred(&v)` holds, else `Err(v)`: the usual body of an [`eventually`] attempt
/// (`eventually("3 listeners", || async { holds(count().await, |n| *n == 3) })`).
pub fn holds<V>(v: V, pred: impl FnOnce(&V) -> bool) -> Result<V, V> {
    if pred(&v) {
        Ok(v)
    } else {
        Err(v)
    }
}

/// A self-signed certificate for `localhost` and 127.0.0.1 written into `dir` as `cert.pem` and
/// `key.pem`: (cert path, key path, cert PEM). Clients trust it with `ClientTls::from_pem`.
pub fn self_signed_cert_in(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("rcgen makes a cert");
    std::fs::create_dir_all(dir).expect("create the cert dir");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let pem = ck.cert.pem();
    std::fs::write(&cert, &pem).expect("write cert");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
    (cert, key, pem)
}

/// [`self_signed_cert_in`] a fresh scratch directory.
pub fn self_signed_cert() -> (std::path::PathBuf, std::path::PathBuf, String) {
    self_signed_cert_in(&procs::scratch("tls"))
}

/// The payload the Go test programs generate (xorshift64* from a fixed seed: `makePayload` in
/// `interop/grpc-go/main.go`, and `tests/interop/emissary/dial/main.go`), so the Rust side knows
/// the hash to expect.
pub fn go_payload(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// A test that cannot run here says why: on stderr and as a line of the skip log
/// (`LIBTUNNEL_SKIP_LOG`, which `scripts/test.sh` prints at the end). Under `CI`, where
/// `scripts/test.sh` installed everything, a skip is a failure.
pub fn skip(why: &str) {
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("{why}");
    if let Some(log) = std::env::var_os("LIBTUNNEL_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = writeln!(f, "{why}");
        }
    }
}

/// Dial `target` (an echo server) through `d`, send `len` bytes of [`payload`]`(len, seed)`,
/// half-close, and require the same bytes back (hashed); how long the echo took.
pub async fn echo_through(d: &libtunnel::Dialer, target: SocketAddr, len: usize, seed: u64) -> Duration {
    let data = payload(len, seed);
    let s = within(STEP, "dial", d.dial(&target.to_string())).await.unwrap_or_else(|e| panic!("dial via {}: [{}] {e}", d.relay(), e.code()));
    let t0 = std::time::Instant::now();
    let got = within(BULK, "echo", echo_roundtrip(s, &data, true)).await.unwrap_or_else(|e| panic!("echo of {len} bytes via {}: {e}", d.relay()));
    let took = t0.elapsed();
    assert_eq!(got, sha256(&data), "echoed bytes differ ({len} bytes via {})", d.relay());
    took
}

/// Half-close through `d`: the target ([`hash_after_eof_server`]) reads to EOF, then answers the
/// hash of what it read, which must be that of the `len` bytes sent.
pub async fn half_close_through(d: &libtunnel::Dialer, hasher: SocketAddr, len: usize, seed: u64) {
    let data = payload(len, seed);
    let mut s = within(STEP, "dial", d.dial(&hasher.to_string())).await.expect("dial the hashing target");
    within(BULK, "writing", s.write_all(&data)).await.expect("write");
    within(STEP, "half-close", s.shutdown()).await.expect("shutdown");
    let reply = within(STEP, "the reply after our EOF", read_to_end(&mut s)).await.expect("read side open after shutdown");
    assert_eq!(reply, sha256(&data), "the target saw exactly our bytes, then our EOF");
}

/// An HTTP/1.1 server that answers every request `200 ok` and closes.
pub async fn http_ok_server() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let Some(_head) = read_http_head(&mut s).await else { return };
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok").await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// A target that reads and discards everything.
pub async fn sink_server() -> SocketAddr {
    counting_sink_server().await.0
}

/// [`sink_server`], counting the connections it accepted.
pub async fn counting_sink_server() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
            });
        }
    });
    (addr, count)
}

/// The relay URL of the next `Connected` event (other events are skipped).
pub async fn next_connected(events: &mut libtunnel::client::events::Events) -> String {
    loop {
        match within(STEP, "a connection event", events.next()).await.expect("events") {
            libtunnel::client::events::Event::Connected { relay, .. } => return relay,
            _ => continue,
        }
    }
}
