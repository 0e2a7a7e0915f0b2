//! End-to-end tests of the reverse-tunnel commands of the `tunnel` binary: `tunnel keygen
//! --listener --out FILE` and `tunnel listen --to ... --relay ... --key FILE` (with and without
//! `--proxy-protocol`) against an in-process relay, fetched through the relay's public HTTP port.
//! Every child process is killed when its guard drops, and every wait is bounded.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use libtunnel::auth::KeySet;
use libtunnel::relay::allowlist::Allowlist;
use libtunnel::{Identity, Key, RelayConfig, Server, ServerHandle};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

const STEP: Duration = Duration::from_secs(10);

async fn within<T>(limit: Duration, what: &str, f: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {:.1}s", limit.as_secs_f64()),
    }
}

/// A fresh scratch directory (no `.env`), removed when dropped.
struct Scratch(PathBuf);
impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("listener-cli-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("create scratch dir");
        Scratch(d)
    }
}
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `tunnel ARGS` in `dir` with no inherited TUNNEL_*/EMISSARY_* variables.
fn tunnel(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tunnel"));
    c.args(args).current_dir(dir).kill_on_drop(true).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("TUNNEL_") || k.starts_with("EMISSARY_") || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    c
}

/// A running `tunnel` process: stdout as lines, stderr collected; killed on drop.
struct Proc {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd.spawn().expect("start `tunnel`");
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().expect("piped");
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut r = BufReader::new(err).lines();
            while let Ok(Some(l)) = r.next_line().await {
                let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
                s.push_str(&l);
                s.push('\n');
            }
        });
        let out = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut r = BufReader::new(out).lines();
            while let Ok(Some(l)) = r.next_line().await {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines, stderr }
    }

    /// Read stdout lines until one starts with `prefix`; returns the rest of that line.
    async fn line_starting(&mut self, prefix: &str) -> String {
        let r = tokio::time::timeout(STEP, async {
            while let Some(l) = self.lines.recv().await {
                if let Some(rest) = l.strip_prefix(prefix) {
                    return Some(rest.trim().to_string());
                }
            }
            None
        })
        .await;
        match r {
            Ok(Some(v)) => v,
            _ => panic!("`tunnel` printed no {prefix:?} line; stderr:\n{}", self.stderr.lock().unwrap_or_else(|p| p.into_inner())),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.try_wait();
    }
}

fn key() -> Key {
    Key::new(5, b"listener-cli-tests-secret-0123456789".to_vec()).expect("key")
}

async fn relay() -> ServerHandle {
    let allow = Allowlist::from_json(r#"[{"host":"127.0.0.1","port":9}]"#, "TUNNEL_ALLOW").expect("rules");
    let mut cfg = RelayConfig::new(KeySet::new([key()]).expect("keys"), allow);
    cfg.http_listen = Some("127.0.0.1:0".parse().expect("addr"));
    cfg.listeners_open = true;
    Server::bind(cfg).await.expect("relay binds").spawn()
}

async fn keygen(dir: &Path) -> (PathBuf, String) {
    let path = dir.join("listener.pem");
    let out = within(STEP, "tunnel keygen", tunnel(dir, &["keygen", "--listener", "--out", path.to_str().expect("utf8")]).output()).await.expect("run keygen");
    assert!(out.status.success(), "keygen failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).expect("utf8");
    let name = stdout.lines().find_map(|l| l.strip_prefix("name: ")).unwrap_or_else(|| panic!("no `name:` line in {stdout:?}")).trim().to_string();
    (path, name)
}

/// GET through the relay's public HTTP port with `Host: host`; returns the response and the
/// client's own address.
async fn fetch(relay_http: SocketAddr, host: &str, path: &str) -> (Response<Incoming>, SocketAddr) {
    let tcp = within(STEP, "connect", TcpStream::connect(relay_http)).await.expect("connect");
    let local = tcp.local_addr().expect("local");
    let (mut sender, conn) = within(STEP, "handshake", hyper::client::conn::http1::handshake(TokioIo::new(tcp))).await.expect("handshake");
    tokio::spawn(conn);
    let req = Request::get(path).header(header::HOST, host).body(Full::new(Bytes::new())).expect("request");
    (within(STEP, "response", sender.send_request(req)).await.expect("response"), local)
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keygen_listener_writes_a_private_key_and_prints_its_name() {
    let dir = Scratch::new("keygen");
    let (path, name) = keygen(&dir.0).await;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("key file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the key file must be private");
    }
    let id = Identity::load(&path).expect("a loadable key");
    assert_eq!(name, id.name(), "the printed name is the key's derived name");

    // It never overwrites a key, and --listener needs --out.
    let again = within(STEP, "keygen again", tunnel(&dir.0, &["keygen", "--listener", "--out", path.to_str().expect("utf8")]).output()).await.expect("run");
    assert!(!again.status.success(), "keygen overwrote an existing key");
    assert_eq!(Identity::load(&path).expect("key").public_key(), id.public_key(), "the key file is unchanged");
    let no_out = within(STEP, "keygen without --out", tunnel(&dir.0, &["keygen", "--listener"]).output()).await.expect("run");
    assert_eq!(no_out.status.code(), Some(2), "stderr: {}", String::from_utf8_lossy(&no_out.stderr));
    assert!(String::from_utf8_lossy(&no_out.stderr).contains("--out"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_exposes_a_local_http_service() {
    let dir = Scratch::new("listen");
    let (key_path, name) = keygen(&dir.0).await;
    let relay = relay().await;
    let http = relay.http_addr().expect("http port");

    // The local service: answers with what it saw.
    let svc = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let svc_addr = svc.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = svc.accept().await {
            tokio::spawn(async move {
                let f = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let xff = req.headers().get("x-forwarded-for").and_then(|v| v.to_str().ok()).unwrap_or("<absent>").to_string();
                    let host = req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("<absent>").to_string();
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(format!("hello from {} xff={xff} host={host}", req.uri().path())))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), f).await;
            });
        }
    });

    let mut p = Proc::spawn(tunnel(&dir.0, &["listen", "--to", &svc_addr.to_string(), "--relay", relay.url(), "--key", key_path.to_str().expect("utf8")]));
    assert_eq!(p.line_starting("listening as:").await, name);
    let url = p.line_starting("http:").await;
    let expected_host = format!("{name}.localhost:{}", http.port());
    assert_eq!(url, format!("http://{expected_host}"));

    let (resp, _) = fetch(http, &expected_host, "/index.html").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = within(STEP, "body", resp.into_body().collect()).await.expect("body").to_bytes();
    assert_eq!(String::from_utf8_lossy(&body), format!("hello from /index.html xff=127.0.0.1 host={expected_host}"));
    relay.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_with_proxy_protocol_sends_a_v2_header() {
    let dir = Scratch::new("proxy");
    let (key_path, name) = keygen(&dir.0).await;
    let relay = relay().await;
    let http = relay.http_addr().expect("http port");

    // A local service that parses the PROXY v2 header, then answers one HTTP request.
    let svc = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let svc_addr = svc.local_addr().expect("addr");
    let (hdr_tx, mut hdr_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = svc.accept().await {
            let hdr_tx = hdr_tx.clone();
            tokio::spawn(async move {
                let mut fixed = [0u8; 16];
                if s.read_exact(&mut fixed).await.is_err() {
                    return;
                }
                let len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
                let mut rest = vec![0u8; len];
                if s.read_exact(&mut rest).await.is_err() {
                    return;
                }
                let mut whole = fixed.to_vec();
                whole.extend_from_slice(&rest);
                let _ = hdr_tx.send(whole);
                // Then the HTTP request head.
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(1) => head.push(b[0]),
                        _ => return,
                    }
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nproxied").await;
                let _ = s.shutdown().await;
            });
        }
    });

    let mut p = Proc::spawn(tunnel(
        &dir.0,
        &["listen", "--to", &svc_addr.to_string(), "--relay", relay.url(), "--key", key_path.to_str().expect("utf8"), "--proxy-protocol"],
    ));
    assert_eq!(p.line_starting("listening as:").await, name);
    let (resp, client) = fetch(http, &format!("{name}.localhost:{}", http.port()), "/").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = within(STEP, "body", resp.into_body().collect()).await.expect("body").to_bytes();
    assert_eq!(&body[..], b"proxied");

    let h = within(STEP, "the PROXY header", hdr_rx.recv()).await.expect("header");
    assert_eq!(&h[..12], b"\r\n\r\n\0\r\nQUIT\n", "PROXY v2 signature");
    assert_eq!(h[12], 0x21, "version 2, command PROXY");
    assert_eq!(h[13], 0x11, "TCP over IPv4");
    assert!(h.len() >= 16 + 12, "IPv4 addresses follow: {h:?}");
    let src_ip = std::net::Ipv4Addr::new(h[16], h[17], h[18], h[19]);
    let dst_ip = std::net::Ipv4Addr::new(h[20], h[21], h[22], h[23]);
    let src_port = u16::from_be_bytes([h[24], h[25]]);
    let dst_port = u16::from_be_bytes([h[26], h[27]]);
    assert_eq!(src_ip, std::net::Ipv4Addr::LOCALHOST, "the source is the original client");
    assert_eq!(src_port, client.port(), "the source port is the HTTP client's");
    assert_eq!(SocketAddr::from((dst_ip, dst_port)), svc_addr, "the destination is the local service");
    relay.abort();
}
