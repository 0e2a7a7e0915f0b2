//! End-to-end tests of the reverse-tunnel commands of the `tunnel` binary: `tunnel keygen
//! --listener --out FILE` and `tunnel listen --to ... --relay ... --key FILE` (with and without
//! `--proxy-protocol`) against an in-process relay, fetched through the relay's public HTTP port.
//! Every child process is killed when its guard drops, and every wait is bounded.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use libtunnel::{Identity, Server, ServerHandle};
use testkit::procs::{self, tunnel, Proc};
use testkit::{allow_ports, relay_config, start_relay, within, STEP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

async fn relay() -> ServerHandle {
    let mut cfg = relay_config(allow_ports(&[9]));
    cfg.http_listen = Some("127.0.0.1:0".parse().expect("addr"));
    cfg.listeners_open = true;
    start_relay(cfg).await
}

async fn keygen(dir: &Path) -> (PathBuf, String) {
    let path = dir.join("listener.pem");
    let out = within(STEP, "tunnel keygen", tunnel(dir, &["keygen", "--listener", "--out", path.to_str().expect("utf8")]).output())
        .await
        .expect("run keygen");
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
    let dir = procs::scratch("listener-cli-keygen");
    let (path, name) = keygen(&dir).await;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("key file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the key file must be private");
    }
    let id = Identity::load(&path).expect("a loadable key");
    assert_eq!(name, id.name(), "the printed name is the key's derived name");

    // It never overwrites a key, and --listener needs --out.
    let again =
        within(STEP, "keygen again", tunnel(&dir, &["keygen", "--listener", "--out", path.to_str().expect("utf8")]).output()).await.expect("run");
    assert!(!again.status.success(), "keygen overwrote an existing key");
    assert_eq!(Identity::load(&path).expect("key").public_key(), id.public_key(), "the key file is unchanged");
    let no_out = within(STEP, "keygen without --out", tunnel(&dir, &["keygen", "--listener"]).output()).await.expect("run");
    assert_eq!(no_out.status.code(), Some(2), "stderr: {}", String::from_utf8_lossy(&no_out.stderr));
    assert!(String::from_utf8_lossy(&no_out.stderr).contains("--out"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_exposes_a_local_http_service() {
    let dir = procs::scratch("listener-cli-listen");
    let (key_path, name) = keygen(&dir).await;
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
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(format!(
                        "hello from {} xff={xff} host={host}",
                        req.uri().path()
                    )))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), f).await;
            });
        }
    });

    let mut p = Proc::spawn(
        "tunnel",
        tunnel(&dir, &["listen", "--to", &svc_addr.to_string(), "--relay", relay.url(), "--key", key_path.to_str().expect("utf8")]),
    );
    assert_eq!(p.line("listening as:").await.trim().to_string(), name);
    let url = p.line("http:").await.trim().to_string();
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
    let dir = procs::scratch("listener-cli-proxy");
    let (key_path, name) = keygen(&dir).await;
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

    let mut p = Proc::spawn(
        "tunnel",
        tunnel(
            &dir,
            &["listen", "--to", &svc_addr.to_string(), "--relay", relay.url(), "--key", key_path.to_str().expect("utf8"), "--proxy-protocol"],
        ),
    );
    assert_eq!(p.line("listening as:").await.trim().to_string(), name);
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

// ---------------------------------------------------------------------------------------------
// A 1 GiB upload through the public HTTP port of a `tunnel server` process, whose memory is
// sampled from /proc while the body streams: it must stay flat (bodies are streamed, never
// buffered).
// ---------------------------------------------------------------------------------------------

/// Resident set size of `pid` in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the relay process is alive");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024
}

/// POST `total` bytes (a streamed body of 256 KiB chunks) to `host` through `relay_http`; returns
/// the response text and the SHA-256 of what was sent.
async fn upload(relay_http: SocketAddr, host: &str, total: usize) -> (StatusCode, String, String) {
    use sha2::{Digest, Sha256};
    const CHUNK: usize = 256 * 1024;
    let tcp = within(STEP, "connect", TcpStream::connect(relay_http)).await.expect("connect");
    let (mut sender, conn) = within(STEP, "handshake", hyper::client::conn::http1::handshake(TokioIo::new(tcp))).await.expect("handshake");
    tokio::spawn(conn);
    let (tx, rx) = mpsc::channel::<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>(4);
    let hasher = tokio::spawn(async move {
        let mut h = Sha256::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut sent = 0;
        while sent < total {
            let n = CHUNK.min(total - sent);
            let mut chunk = vec![0u8; n];
            for w in chunk.chunks_mut(8) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                w.copy_from_slice(&seed.to_le_bytes()[..w.len()]);
            }
            h.update(&chunk);
            if tx.send(Ok(hyper::body::Frame::data(Bytes::from(chunk)))).await.is_err() {
                break;
            }
            sent += n;
        }
        hex::encode(h.finalize())
    });
    let body = http_body_util::StreamBody::new(tokio_stream_from(rx));
    let req = Request::post("/upload").header(header::HOST, host).header(header::CONTENT_LENGTH, total).body(body).expect("request");
    let resp = within(Duration::from_secs(300), "the upload's response", sender.send_request(req)).await.expect("response");
    let status = resp.status();
    let text = String::from_utf8_lossy(&within(STEP, "the body", resp.into_body().collect()).await.expect("body").to_bytes()).into_owned();
    (status, text, hasher.await.expect("hasher"))
}

/// An mpsc receiver as a `Stream` (what `StreamBody` wants).
fn tokio_stream_from<T>(mut rx: mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gib_upload_through_public_http_keeps_relay_memory_flat() {
    use sha2::{Digest, Sha256};
    let dir = procs::scratch("listener-cli-gib");
    let auth = format!(r#"[{{"kid":5,"data":"{}"}}]"#, base64_of(b"listener-cli-tests-secret-0123456789"));
    let mut cmd = tunnel(&dir, &["server"]);
    cmd.env("TUNNEL_LISTEN", "127.0.0.1:0")
        .env("TUNNEL_HTTP_LISTEN", "127.0.0.1:0")
        .env("TUNNEL_AUTH_KEYS", auth)
        .env("TUNNEL_ALLOW", r#"[{"host":"127.0.0.1","port":9}]"#)
        .env("TUNNEL_LISTENERS_OPEN", "true");
    let mut relay = Proc::spawn("tunnel", cmd);
    let url = relay.line("relay listening:").await.trim().to_string();
    let http: SocketAddr = relay.line("public http listening: http://").await.trim().to_string().parse().expect("ip:port");
    let pid = relay.child.id().expect("the relay runs");

    // The service behind the listener: hashes the request body as it streams in.
    let listener = Arc::new(within(STEP, "bind", libtunnel::Listener::bind(&url, Identity::generate())).await.expect("listener registers"));
    let host = format!("{}.localhost", listener.name());
    let l = listener.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let f = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let mut body = req.into_body();
                    let mut h = Sha256::new();
                    let mut n = 0usize;
                    while let Some(frame) = body.frame().await {
                        if let Ok(d) = frame.expect("request body frame").into_data() {
                            n += d.len();
                            h.update(&d);
                        }
                    }
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(format!("{n} {}", hex::encode(h.finalize()))))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), f).await;
            });
        }
    });

    // Warm up (buffers, pools, first session) with 16 MiB, then take the baseline.
    let (status, text, sent) = upload(http, &host, 16 << 20).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(text, format!("{} {sent}", 16 << 20));
    let baseline = rss_bytes(pid);

    let total = 1usize << 30;
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let stop = sampling.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            while !stop.is_cancelled() {
                tick.tick().await;
                peak = peak.max(rss_bytes(pid));
            }
            peak
        })
    };
    let (status, text, sent) = upload(http, &host, total).await;
    sampling.cancel();
    let peak = sampler.await.expect("sampler");
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(text, format!("{total} {sent}"), "the listener saw other bytes than were uploaded");
    let growth = peak.saturating_sub(baseline);
    eprintln!("relay RSS: baseline {} MiB, peak during 1 GiB upload {} MiB", baseline >> 20, peak >> 20);
    assert!(growth < 32 << 20, "relay memory grew by {} MiB during a 1 GiB upload (baseline {} MiB)", growth >> 20, baseline >> 20);
    listener.close();
}

fn base64_of(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Boot order: `tunnel listen` started before its relay keeps retrying (each attempt logged) and
/// registers once the relay comes up; `keygen --out` creates a missing folder (0700).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_waits_for_a_relay_that_starts_later() {
    let dir = procs::scratch("listener-cli-late-relay");
    let key_path = dir.join("new").join("folder").join("listener.pem");
    let out = within(STEP, "tunnel keygen", tunnel(&dir, &["keygen", "--listener", "--out", key_path.to_str().expect("utf8")]).output())
        .await
        .expect("run keygen");
    assert!(out.status.success(), "keygen into a missing folder: {}", String::from_utf8_lossy(&out.stderr));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(key_path.parent().expect("folder")).expect("folder").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "the new key folder is private");
    }
    // A port nobody listens on yet.
    let port = TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr").port();
    let relay_url = format!("ws://127.0.0.1:{port}");
    let mut listen =
        Proc::spawn("tunnel", tunnel(&dir, &["listen", "--to", "127.0.0.1:9", "--relay", &relay_url, "--key", key_path.to_str().expect("utf8")]));
    // Its first attempt fails and is logged; it does not exit.
    listen.stderr_count("a logged failed attempt", "cannot register with the relay yet", 1).await;
    assert!(listen.child.try_wait().expect("wait").is_none(), "tunnel listen exited while the relay was down");
    let mut cfg = relay_config(allow_ports(&[9]));
    cfg.listen = Some(format!("127.0.0.1:{port}").parse().expect("addr"));
    cfg.listeners_open = true;
    let _relay = Server::bind(cfg).await.expect("relay binds the port").spawn();
    let name = within(Duration::from_secs(5), "registration after the relay came up", listen.line("listening as:")).await.trim().to_string();
    assert_eq!(name, Identity::load(&key_path).expect("key").name());
}
