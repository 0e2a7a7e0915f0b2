//! The public endpoint with real clients: curl over HTTPS (a test CA's wildcard certificate for
//! `*.test.example`) with HTTP/1.1 and h2, h2c with prior knowledge on the plain port, a local
//! service of either kind (HTTP/1.1, or h2c behind an `h2c` listener), 10 MiB bodies both ways
//! hashed, 421 for a request naming another host than the connection's SNI, certificates
//! reloaded, TLS passthrough by SNI to a service with its own certificate (which the client
//! verifies, not the relay's), path routing `/t/NAME/x`, the per-listener rate (429 +
//! Retry-After, then 200 again) and the per-listener metrics on `/metrics`.

use testkit::h2raw;
use testkit::pki;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use libtunnel::{Identity, Listener, ServerHandle};
use pki::{make_pki, Pki};
use testkit::*;
use tokio::net::TcpListener;

const DOMAIN: &str = "test.example";

/// A scratch directory of this test process.
fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("libtunnel-public-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// A CA and a leaf certificate it signed for `names`, written as `ca.pem`, `cert.pem`,
/// `key.pem` under `dir`.
/// The local service behind the listeners (HTTP/1.1 and h2c on one port, as hyper's auto server
/// detects): `POST /hash` answers the SHA-256 (hex) of the body; `GET /bytes?n=N` answers N
/// deterministic bytes; every answer echoes the path it saw and the forwarding headers.
async fn local_service() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let seen = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
                    let h = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                    let (proto, fwd, version) = (h("x-forwarded-proto"), h("forwarded"), format!("{:?}", req.version()));
                    if req.uri().path() == "/big" {
                        let n = req.uri().query().and_then(|q| q.strip_prefix("n=")).and_then(|n| n.parse().ok()).unwrap_or(0);
                        return Ok::<_, Infallible>(Response::new(Big::new(n).boxed()));
                    }
                    let body = if req.uri().path() == "/hash" {
                        let b = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                        Bytes::from(hex::encode(sha256(&b)))
                    } else if let Some(n) = req.uri().query().and_then(|q| q.strip_prefix("n=")).and_then(|n| n.parse().ok()) {
                        Bytes::from(payload(n, 19))
                    } else {
                        Bytes::from_static(b"hello")
                    };
                    let resp = Response::builder()
                        .header("x-seen-path", seen)
                        .header("x-seen-proto", proto)
                        .header("x-seen-forwarded", fwd)
                        .header("x-seen-version", version)
                        .body(Full::new(body).map_err(|e| match e {}).boxed())
                        .expect("response");
                    Ok::<_, Infallible>(resp)
                });
                let b = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
                let _ = b.serve_connection(hyper_util::rt::TokioIo::new(sock), svc).await;
            });
        }
    });
    addr
}

/// `GET /big?n=N`: N bytes of [`big_bytes`], made as they are sent (64 KiB at a time), so a
/// response nobody reads costs the service nothing.
struct Big {
    left: usize,
    at: usize,
}

/// Byte `i` of every `/big` body.
fn big_byte(i: usize) -> u8 {
    (i % 251) as u8
}

/// The first `n` bytes of every `/big` body.
fn big_bytes(n: usize) -> Vec<u8> {
    (0..n).map(big_byte).collect()
}

impl Big {
    fn new(n: usize) -> Big {
        Big { left: n, at: 0 }
    }
}

impl hyper::body::Body for Big {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        let n = self.left.min(64 * 1024);
        let chunk: Bytes = (self.at..self.at + n).map(big_byte).collect::<Vec<u8>>().into();
        self.left -= n;
        self.at += n;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(chunk))))
    }
}

struct Setup {
    relay: ServerHandle,
    pki: Pki,
    dir: ScratchDir,
}

/// A scratch directory (certificates, 10 MiB transfer files) removed when the test ends.
struct ScratchDir(PathBuf);

impl std::ops::Deref for ScratchDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn setup(tag: &str, tweak: impl FnOnce(&mut libtunnel::RelayConfig)) -> Setup {
    init_tracing();
    let dir = scratch(tag);
    let pki = make_pki(&dir.join("relay"), &[&format!("*.{DOMAIN}"), DOMAIN]);
    let mut cfg = relay_config(allow_ports(&[9]));
    cfg.domain = DOMAIN.into();
    cfg.listeners_open = true;
    cfg.http_listen = Some("127.0.0.1:0".parse().expect("addr"));
    cfg.https_listen = Some("127.0.0.1:0".parse().expect("addr"));
    cfg.public_tls_cert = vec![pki.cert.clone()];
    cfg.public_tls_key = vec![pki.key.clone()];
    tweak(&mut cfg);
    Setup { relay: start_relay(cfg).await, pki, dir: ScratchDir(dir) }
}

/// Register a listener (HTTP/1.1, h2c or TLS passthrough) serving `to`; its name.
async fn listen(relay: &ServerHandle, to: SocketAddr, h2c: bool, passthrough: bool) -> String {
    let l = within(STEP, "listener registers", Listener::builder(relay.url(), Identity::generate()).h2c(h2c).tls_passthrough(passthrough).bind())
        .await
        .expect("listener registers");
    let name = l.name();
    tokio::spawn(libtunnel::forward::expose(l, to.to_string(), false, std::future::pending()));
    name
}

/// Run curl; its stdout (the `-w` line last) and exit status.
async fn curl(args: &[String]) -> (bool, String) {
    let out =
        within(BULK, "curl", tokio::process::Command::new("curl").args(["-sS", "--max-time", "60"]).args(args).output()).await.expect("curl runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

fn s(v: &str) -> String {
    v.to_string()
}

/// curl arguments reaching `NAME.test.example` on `port` at 127.0.0.1, trusting `ca`.
fn https_args(name: &str, port: u16, ca: &Path, path: &str) -> Vec<String> {
    let host = format!("{name}.{DOMAIN}");
    vec![s("--cacert"), ca.display().to_string(), s("--resolve"), format!("{host}:{port}:127.0.0.1"), format!("https://{host}:{port}{path}")]
}

/// The value of response header `name` in curl `-D -` output.
fn header_of(out: &str, name: &str) -> Option<String> {
    out.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

/// 10 MiB up (hashed by the service) and 10 MiB down (hashed here) with curl's `flag`
/// (`--http1.1`, `--http2`, `--http2-prior-knowledge`) against `base_args` (URL last, path
/// replaced); returns the HTTP version curl used.
async fn ten_mib_both_ways(dir: &Path, flag: &str, base: impl Fn(&str) -> Vec<String>) -> String {
    let up = payload(10 * MIB, 7);
    let up_file = dir.join(format!("up{flag}"));
    std::fs::write(&up_file, &up).expect("write");
    let mut args = vec![s(flag), s("--data-binary"), format!("@{}", up_file.display()), s("-H"), s("content-type: application/octet-stream")];
    args.extend(base("/hash"));
    let (ok, out) = curl(&args).await;
    assert!(ok, "curl {flag} upload failed: {out}");
    assert_eq!(out.trim(), hex::encode(sha256(&up)), "{flag}: the service hashed the 10 MiB it received");

    let down_file = dir.join(format!("down{flag}"));
    let mut args = vec![s(flag), s("-o"), down_file.display().to_string(), s("-w"), s("%{http_version} %{http_code}")];
    args.extend(base(&format!("/bytes?n={}", 10 * MIB)));
    let (ok, out) = curl(&args).await;
    assert!(ok, "curl {flag} download failed: {out}");
    let got = std::fs::read(&down_file).expect("downloaded");
    assert_eq!(got.len(), 10 * MIB, "{flag}: 10 MiB downloaded");
    assert_eq!(sha256(&got), sha256(&payload(10 * MIB, 19)), "{flag}: downloaded bytes hash equal");
    let (version, code) = out.trim().split_once(' ').expect("version and code");
    assert_eq!(code, "200");
    version.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn https_h1_and_h2_and_h2c_carry_10_mib_both_ways_to_either_kind_of_service() {
    let st = setup("bulk", |_| {}).await;
    let https = st.relay.https_addr().expect("https port").port();
    let http = st.relay.http_addr().expect("http port").port();
    let svc = local_service().await;
    let h1_name = listen(&st.relay, svc, false, false).await;
    let h2c_name = listen(&st.relay, svc, true, false).await;
    for name in [&h1_name, &h2c_name] {
        let ca = st.pki.ca.clone();
        assert_eq!(ten_mib_both_ways(&st.dir, "--http1.1", |p| https_args(name, https, &ca, p)).await, "1.1");
        assert_eq!(ten_mib_both_ways(&st.dir, "--http2", |p| https_args(name, https, &ca, p)).await, "2");
        let plain = |p: &str| {
            let host = format!("{name}.{DOMAIN}");
            vec![s("--resolve"), format!("{host}:{http}:127.0.0.1"), format!("http://{host}:{http}{p}")]
        };
        assert_eq!(ten_mib_both_ways(&st.dir, "--http2-prior-knowledge", plain).await, "2");
    }

    // A plain-port `curl --http2` asks for `Upgrade: h2c`: answered over HTTP/1.1, and an h2c
    // listener still gets the request (as HTTP/2), not a refused upgrade.
    for name in [&h1_name, &h2c_name] {
        let host = format!("{name}.{DOMAIN}");
        let args = [
            s("--http2"),
            s("-o"),
            s("/dev/null"),
            s("-w"),
            s("%{http_version} %{http_code}"),
            s("--resolve"),
            format!("{host}:{http}:127.0.0.1"),
            format!("http://{host}:{http}/"),
        ];
        let (ok, out) = curl(&args).await;
        assert!(ok && out.trim() == "1.1 200", "{name}: {out}");
    }

    // What the services saw: the scheme the client used, and the protocol of their own kind.
    let (ok, out) = curl(&[vec![s("--http2"), s("-D"), s("-")], https_args(&h2c_name, https, &st.pki.ca, "/x?y=1")].concat()).await;
    assert!(ok, "{out}");
    assert_eq!(header_of(&out, "x-seen-proto").as_deref(), Some("https"));
    assert!(header_of(&out, "x-seen-forwarded").is_some_and(|f| f.contains("proto=https")), "{out}");
    assert_eq!(header_of(&out, "x-seen-version").as_deref(), Some("HTTP/2.0"), "an h2c listener's service gets HTTP/2");
    assert_eq!(header_of(&out, "x-seen-path").as_deref(), Some("/x?y=1"));
    let (ok, out) = curl(&[vec![s("--http2"), s("-D"), s("-")], https_args(&h1_name, https, &st.pki.ca, "/x")].concat()).await;
    assert!(ok, "{out}");
    assert_eq!(header_of(&out, "x-seen-version").as_deref(), Some("HTTP/1.1"), "an HTTP/1.1 listener's service gets HTTP/1.1 from an h2 client");
    assert_eq!(header_of(&out, "x-seen-proto").as_deref(), Some("https"));

    // The certificate is the relay's wildcard: a client trusting another CA refuses it.
    let other = make_pki(&st.dir.join("other"), &["x.invalid"]);
    let (ok, out) = curl(&https_args(&h1_name, https, &other.ca, "/")).await;
    assert!(!ok && out.contains("certificate"), "curl must refuse a certificate from a CA it does not trust: {out}");
    st.relay.shutdown().await.expect("relay stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_naming_another_listener_on_a_coalesced_connection_gets_421() {
    let st = setup("misdirected", |_| {}).await;
    let https = st.relay.https_addr().expect("https port").port();
    let svc = local_service().await;
    let a = listen(&st.relay, svc, false, false).await;
    let b = listen(&st.relay, svc, false, false).await;
    for flag in ["--http2", "--http1.1"] {
        // SNI (from the URL) names `a`, the request's authority names `b`.
        let args = [
            vec![s(flag), s("-o"), s("/dev/null"), s("-w"), s("%{http_code}"), s("-H"), format!("Host: {b}.{DOMAIN}")],
            https_args(&a, https, &st.pki.ca, "/"),
        ]
        .concat();
        let (ok, out) = curl(&args).await;
        assert!(ok, "{out}");
        assert_eq!(out.trim(), "421", "{flag}: a request for {b} on a connection opened for {a}");
        // The same request on its own connection is served.
        let (ok, out) =
            curl(&[vec![s(flag), s("-o"), s("/dev/null"), s("-w"), s("%{http_code}")], https_args(&b, https, &st.pki.ca, "/")].concat()).await;
        assert!(ok && out.trim() == "200", "{flag}: {out}");
    }
    // Unknown names keep their meaning over TLS: 502.
    let (ok, out) =
        curl(&[vec![s("--http2"), s("-o"), s("/dev/null"), s("-w"), s("%{http_code}")], https_args("nobody", https, &st.pki.ca, "/")].concat()).await;
    assert!(ok && out.trim() == "502", "{out}");
    let metrics = curl(&[format!("http://{}/metrics", st.relay.local_addr().expect("tunnel endpoint"))]).await.1;
    assert_eq!(metric(&metrics, "libtunnel_refusals_total{reason=\"misdirected\"}"), 2, "{metrics}");
    st.relay.shutdown().await.expect("relay stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloaded_certificates_serve_new_connections() {
    let st = setup("reload", |_| {}).await;
    let https = st.relay.https_addr().expect("https port").port();
    let svc = local_service().await;
    let name = listen(&st.relay, svc, false, false).await;
    let fresh = make_pki(&st.dir.join("fresh"), &[&format!("*.{DOMAIN}")]);
    let (ok, out) = curl(&https_args(&name, https, &fresh.ca, "/")).await;
    assert!(!ok, "the new CA is not in use yet: {out}");
    let mut cfg = relay_config(allow_ports(&[9]));
    (cfg.listeners_open, cfg.domain) = (true, DOMAIN.into());
    cfg.public_tls_cert = vec![fresh.cert.clone()];
    cfg.public_tls_key = vec![st.pki.key.clone()];
    let err = st.relay.reload(&cfg).expect_err("a key that does not fit the certificate is refused");
    assert!(err.to_string().contains("does not fit"), "{err}");
    cfg.public_tls_key = vec![fresh.key.clone()];
    st.relay.reload(&cfg).expect("reload");
    let (ok, out) = curl(&https_args(&name, https, &fresh.ca, "/")).await;
    assert!(ok && out == "hello", "after the reload the new certificate serves: {out}");
    let (ok, _) = curl(&https_args(&name, https, &st.pki.ca, "/")).await;
    assert!(!ok, "the old certificate is gone");
    st.relay.shutdown().await.expect("relay stops");
}

/// A TLS service with its own certificate: answers `tls-echo:` + the first line it reads, then
/// closes.
async fn tls_service(pki: &Pki) -> SocketAddr {
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(&pki.cert).expect("pem").map(|c| c.expect("cert")).collect();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&pki.key).expect("key");
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("cert fits");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = l.accept().await else { return };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
                let Ok(tls) = acceptor.accept(sock).await else { return };
                let (r, mut w) = tokio::io::split(tls);
                let mut lines = tokio::io::BufReader::new(r).lines();
                // One line, one answer, then close (close_notify), so the client's run ends.
                if let Ok(Some(line)) = lines.next_line().await {
                    let _ = w.write_all(format!("tls-echo:{line}\n").as_bytes()).await;
                }
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_passthrough_hands_the_raw_connection_to_the_listeners_own_tls() {
    let st = setup("passthrough", |_| {}).await;
    let https = st.relay.https_addr().expect("https port").port();
    let id = Identity::generate();
    let name = libtunnel::identity::derived_name(&id.public_key());
    // The service's certificate comes from its own CA, for its own name only.
    let own = make_pki(&st.dir.join("own"), &[&format!("{name}.{DOMAIN}")]);
    let svc = tls_service(&own).await;
    let l = Listener::builder(st.relay.url(), id).tls_passthrough(true).bind().await.expect("listener registers");
    tokio::spawn(libtunnel::forward::expose(l, svc.to_string(), false, std::future::pending()));

    // openssl's client verifies the service's certificate against the service's CA only.
    let host = format!("{name}.{DOMAIN}");
    let run = |ca: PathBuf| {
        let host = host.clone();
        async move {
            let mut child = tokio::process::Command::new("openssl")
                .args(["s_client", "-quiet", "-verify_return_error", "-verify_hostname", &host, "-servername", &host, "-CAfile"])
                .arg(&ca)
                .args(["-connect", &format!("127.0.0.1:{https}")])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("openssl runs");
            use tokio::io::AsyncWriteExt;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(b"ping through the relay\n").await.expect("write");
            drop(stdin);
            let out = within(STEP, "openssl s_client", child.wait_with_output()).await.expect("openssl output");
            (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
        }
    };
    let (ok, out, err) = run(own.ca.clone()).await;
    assert!(ok, "handshake with the listener's own certificate: {err}");
    assert_eq!(out, "tls-echo:ping through the relay\n", "{err}");
    // The relay's CA does not vouch for the service's certificate: the relay did not terminate.
    let (ok, out, err) = run(st.pki.ca.clone()).await;
    assert!(!ok && out.is_empty(), "a client trusting only the relay's CA must fail: {out} {err}");
    // Other names on the same port still get the relay's certificate.
    let svc_http = local_service().await;
    let other = listen(&st.relay, svc_http, false, false).await;
    let (ok, out) = curl(&https_args(&other, https, &st.pki.ca, "/")).await;
    assert!(ok && out == "hello", "{out}");
    st.relay.shutdown().await.expect("relay stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_routing_rate_limit_and_per_listener_metrics() {
    let st = setup("paths", |c| {
        c.http_path_prefix = Some("/t".into());
        c.http_listener_rate = Some((3, Duration::from_secs(1)));
    })
    .await;
    let https = st.relay.https_addr().expect("https port").port();
    let svc = local_service().await;
    let name = listen(&st.relay, svc, false, false).await;

    // https://test.example/t/NAME/x reaches NAME as /x.
    let url = format!("https://{DOMAIN}:{https}/t/{name}/x?q=1");
    let base = vec![s("--cacert"), st.pki.ca.display().to_string(), s("--resolve"), format!("{DOMAIN}:{https}:127.0.0.1"), s("-D"), s("-")];
    let (ok, out) = curl(&[base.clone(), vec![url]].concat()).await;
    assert!(ok, "{out}");
    assert_eq!(header_of(&out, "x-seen-path").as_deref(), Some("/x?q=1"), "{out}");

    // Two more requests fill the window of 3; the fourth gets 429 with Retry-After.
    for _ in 0..2 {
        let (ok, out) = curl(&[vec![s("-o"), s("/dev/null"), s("-w"), s("%{http_code}")], https_args(&name, https, &st.pki.ca, "/")].concat()).await;
        assert!(ok && out.trim() == "200", "{out}");
    }
    let (ok, out) = curl(&[vec![s("-D"), s("-")], https_args(&name, https, &st.pki.ca, "/")].concat()).await;
    assert!(ok && out.starts_with("HTTP/2 429"), "{out}");
    let retry: u64 = header_of(&out, "retry-after").expect("Retry-After").parse().expect("seconds");
    assert_eq!(retry, 1);
    // After the window, 200 again (bounded: a few windows at most).
    eventually("the next window to admit requests again", || async {
        let code = curl(&[vec![s("-o"), s("/dev/null"), s("-w"), s("%{http_code}")], https_args(&name, https, &st.pki.ca, "/")].concat()).await.1;
        holds(code.trim().to_string(), |c| c == "200")
    })
    .await;

    let metrics = curl(&[format!("http://{}/metrics", st.relay.local_addr().expect("tunnel endpoint"))]).await.1;
    let series = |code: u16| metric(&metrics, &format!("libtunnel_http_listener_responses_total{{listener=\"{name}\",code=\"{code}\"}}"));
    assert!(series(200) >= 4, "{metrics}");
    assert!(series(429) >= 1, "{metrics}");
    assert!(metric(&metrics, &format!("libtunnel_http_listener_bytes_total{{listener=\"{name}\",direction=\"out\"}}")) >= 5 * 4, "{metrics}");
    let count = metric(&metrics, &format!("libtunnel_http_listener_latency_seconds_count{{listener=\"{name}\"}}"));
    assert_eq!(count, series(200) + series(429), "every response is in the latency histogram");
    assert!(metric(&metrics, "libtunnel_refusals_total{reason=\"http_listener_rate\"}") >= 1);
    st.relay.shutdown().await.expect("relay stops");
}

/// An h2c (prior knowledge) client connection to the relay's plain port.
async fn h2c_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>> {
    let sock = within(STEP, "connect", tokio::net::TcpStream::connect(addr)).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .handshake(hyper_util::rt::TokioIo::new(sock))
        .await
        .expect("h2c handshake");
    tokio::spawn(conn);
    sender
}

/// `GET /big?n=N` from `NAME.test.example` over `client`: the body's SHA-256.
async fn fetch_big(client: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>, name: &str, n: usize) -> [u8; 32] {
    let req = Request::get(format!("http://{name}.{DOMAIN}/big?n={n}")).body(http_body_util::Empty::new()).expect("request");
    let resp = client.send_request(req).await.expect("response head");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("the whole body").to_bytes();
    sha256(&body)
}

/// Poll `get` until `ok` holds of it (within `limit`); its last value.
async fn until<T: std::fmt::Debug>(limit: Duration, what: &str, get: impl Fn() -> T, ok: impl Fn(&T) -> bool) -> T {
    eventually_within(limit, what, || async { holds(get(), &ok) }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unread_responses_on_an_h2c_listener_hold_no_one_elses_window() {
    const HOLD: Duration = Duration::from_secs(8);
    let st = setup("h2c-isolation", |c| c.limits.http_timeout = HOLD).await;
    let http = st.relay.http_addr().expect("http port");
    let svc = local_service().await;
    let name = listen(&st.relay, svc, true, false).await;
    let authority = format!("{name}.{DOMAIN}");
    let m = st.relay.metrics();
    let big = |stream: u32| h2raw::headers(stream, "GET", &format!("/big?n={}", 8 * MIB), &authority, true);

    // Rapid resets: 3 connections of 2,000 HEADERS + RST_STREAM each (the relay closes each one
    // at its reset limit); then 200 responses cancelled mid-body.
    let t0 = std::time::Instant::now();
    for _ in 0..3 {
        let frames: Vec<Vec<u8>> = (0..2000u32).flat_map(|i| [big(2 * i + 1), h2raw::reset(2 * i + 1)]).collect();
        if let Ok(mut s) = h2raw::send(http, None, 1 << 30, &frames).await {
            let mut sink = Vec::new();
            let _ = within(STEP, "the relay to end a rapid-reset connection", tokio::io::AsyncReadExt::read_to_end(&mut s, &mut sink)).await;
        }
    }
    eprintln!("3 x 2,000 rapid resets: {:?}", t0.elapsed());
    let t0 = std::time::Instant::now();
    // (One at a time: this client's own connection window would hold unread bodies back.)
    for _ in 0..20 {
        let mut c = h2c_client(http).await;
        for _ in 0..10 {
            let req = Request::get(format!("http://{authority}/big?n={}", 8 * MIB)).body(http_body_util::Empty::new()).expect("request");
            let resp = within(STEP, "a response head", c.send_request(req)).await.expect("head");
            let mut body = resp.into_body();
            within(STEP, "the first body frame", body.frame()).await.expect("a frame").expect("data");
            drop(body); // mid-body: the stream is reset
        }
    }
    eprintln!("200 responses cancelled mid-body: {:?}", t0.elapsed());
    until(STEP, "requests in progress after the resets", || m.http_requests_open(), |n| *n == 0).await;

    // A client's normal time, before any attack.
    let mut victim = h2c_client(http).await;
    let want = sha256(&big_bytes(MIB));
    let t0 = std::time::Instant::now();
    for _ in 0..10 {
        assert_eq!(fetch_big(&mut victim, &name, MIB).await, want);
    }
    let normal = t0.elapsed();

    // One connection asks for 40 responses of 8 MiB with every window wide open, and never reads
    // its socket.
    let frames: Vec<Vec<u8>> = (0..40u32).map(|i| big(2 * i + 1)).collect();
    let attacker = h2raw::send(http, None, (1 << 31) - 1, &frames).await.expect("attacker connects");
    until(STEP, "the 40 requests in progress", || m.http_requests_open(), |n| *n == 40).await;
    // Their data fills what the relay grants each stream, and stays there.
    let held = until(STEP, "unread data held on the h2c connections", || m.h2c_stream_window_held(), |h| *h >= 20 * 128 * 1024).await;

    // Meanwhile another client's requests complete, hashed, in about their normal time.
    let t0 = std::time::Instant::now();
    for _ in 0..10 {
        assert_eq!(within(STEP, "a 1 MiB response while the attacker holds 40", fetch_big(&mut victim, &name, MIB)).await, want);
    }
    let during = t0.elapsed();
    eprintln!("10 x 1 MiB: {normal:?} before, {during:?} while one client held 40 unread responses ({held} bytes of stream windows held)");
    assert!(during < normal * 5 + Duration::from_secs(1), "{during:?} while held, {normal:?} before");
    assert!(t0.elapsed() < HOLD, "the requests finished before any deadline could have helped");

    // The attacker still holds on: after `http_timeout` without taking anything, its responses
    // are reset, and the windows they held come back while its connection is still open.
    let stalled = until(HOLD + STEP, "the unread responses to be reset", || m.http_stalled_responses(), |n| *n >= 30).await;
    until(STEP, "stream windows back to full", || m.h2c_stream_window_held(), |h| *h == 0).await;
    assert!(m.http_requests_open() <= 40 - stalled as i64, "the cut responses' request slots are free again");
    eprintln!("{stalled} unread responses reset after http_timeout ({HOLD:?})");
    drop(attacker);
    until(STEP, "requests in progress after the attacker left", || m.http_requests_open(), |n| *n == 0).await;
    assert_eq!(m.h2c_stream_window_held(), 0);
    // Connection windows: granted back up to h2's lazy threshold (a third of each).
    let open = m.h2c_upstreams_open();
    let conn_held = m.h2c_window_held();
    eprintln!("after: {open} h2c connections, connection windows held {conn_held} bytes, stream windows held 0");
    assert!(open >= 1 && conn_held <= open * i64::from(16u32 << 20) / 3, "{conn_held} bytes held on {open} connections");
    assert_eq!(fetch_big(&mut victim, &name, MIB).await, want, "served after the attack");
    // An open client connection would keep the draining relay waiting for its drain timeout.
    drop(victim);
    st.relay.shutdown().await.expect("relay stops");
}
