//! End-to-end tests of the `tunnel` binary: `tunnel server` configured through the environment,
//! reached by `curl` through `tunnel socks`, by plain TCP clients through `tunnel forward`, and by
//! `tunnel dial` on stdin/stdout; `tunnel keygen` output accepted by both ends; config errors that
//! name the variable to set. Every child process is killed when its guard drops, and every wait is
//! bounded.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use testkit::procs::{self, Proc};
use testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio::sync::mpsc;

// ---------------------------------------------------------------------------------------------
// running the binary
// ---------------------------------------------------------------------------------------------

/// A working directory without a `.env`, so the binary sees only the variables a test sets.
fn clean_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| procs::scratch("cli-cwd")).clone()
}

/// `tunnel ARGS` in [`clean_dir`] with a clean environment.
fn tunnel(args: &[&str]) -> Command {
    procs::tunnel(&clean_dir(), args)
}

/// The address part of `ws://127.0.0.1:PORT` (or `tcp://…`).
fn url_addr(url: &str) -> SocketAddr {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.trim_end_matches('/').parse().unwrap_or_else(|_| panic!("no address in {url:?}"))
}

/// The first token of `rest` as a socket address (`ADDR -> …`, `ADDR via …`).
fn first_addr(rest: &str) -> SocketAddr {
    let tok = rest.split_whitespace().next().unwrap_or_default();
    tok.parse().unwrap_or_else(|_| panic!("no address at the start of {rest:?}"))
}

/// `tunnel server` on an ephemeral loopback port, configured only through the environment.
async fn start_server(auth_keys: &str, allow_json: &str) -> (Proc, String) {
    let mut cmd = tunnel(&["server"]);
    cmd.env("TUNNEL_LISTEN", "127.0.0.1:0").env("TUNNEL_AUTH_KEYS", auth_keys).env("TUNNEL_ALLOW", allow_json);
    let mut p = Proc::spawn("tunnel server", cmd);
    let url = p.line("relay listening: ").await.trim().to_string();
    assert!(url.starts_with("ws://127.0.0.1:"), "unexpected relay URL {url:?}");
    (p, url)
}

/// The relay's `/metrics`, fetched over HTTP from the child process.
async fn relay_metrics(url: &str) -> String {
    let (status, body) = http_get(url_addr(url), "/metrics").await;
    assert_eq!(status, 200);
    body
}

/// A tiny HTTP/1.1 server: answers every request with `body`, and reports each request head.
async fn http_server(body: Arc<Vec<u8>>) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (tx, body) = (tx.clone(), body.clone());
            tokio::spawn(async move {
                let Some(head) = read_http_head(&mut s).await else { return };
                let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.write_all(&body).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, rx)
}

/// Run curl through a SOCKS5 proxy (names resolved by the proxy); returns (status, stdout, stderr).
async fn curl_socks(proxy: SocketAddr, url: &str) -> (ExitStatus, Vec<u8>, String) {
    let mut c = Command::new("curl");
    c.args(["--silent", "--show-error", "--fail", "--max-time", "20", "--output", "-"])
        .arg("--socks5-hostname")
        .arg(proxy.to_string())
        .arg(url)
        .kill_on_drop(true)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Proxy variables could send curl around the tunnel (NO_PROXY=localhost would bypass it).
    for v in ["ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"] {
        c.env_remove(v);
    }
    let child = match c.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("`curl` is not installed; these tests need it: install curl (e.g. `apt-get install curl`) and rerun")
        }
        Err(e) => panic!("cannot run curl: {e}"),
    };
    let out = within(Duration::from_secs(25), "curl", child.wait_with_output()).await.expect("curl output");
    (out.status, out.stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

// ---------------------------------------------------------------------------------------------
// tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_tunnel_socks_reaches_a_local_http_server() {
    init_tracing();
    let body = Arc::new(payload(2 * MIB, 501));
    let (web, mut heads) = http_server(body.clone()).await;
    let forbidden = closed_port().await;
    // The relay allows the web server by name (it resolves the name, as curl --socks5-hostname asks).
    let rules = format!(r#"[{{"host":"localhost","port":{}}}]"#, web.port());
    let (server, url) = start_server(&auth_keys_json(), &rules).await;
    let mut socks_cmd = tunnel(&["socks", "--listen", "127.0.0.1:0", "--relay", &url]);
    socks_cmd.env("TUNNEL_KEY", key_string());
    let mut socks = Proc::spawn("tunnel socks", socks_cmd);
    let proxy = first_addr(&socks.line("socks5 proxy on ").await);

    let (status, out, err) = curl_socks(proxy, &format!("http://localhost:{}/through/the/tunnel", web.port())).await;
    assert!(status.success(), "curl failed ({status}): {err}\nsocks stderr:\n{}\nserver stderr:\n{}", socks.stderr(), server.stderr());
    assert_eq!(out.len(), body.len(), "curl received a body of another length");
    assert_eq!(sha256(&out), sha256(&body), "curl received other bytes than the server sent");
    let head = within(STEP, "the request head", heads.recv()).await.expect("the web server saw the request");
    assert!(head.starts_with("GET /through/the/tunnel HTTP/1.1\r\n"), "{head}");
    assert!(head.to_ascii_lowercase().contains(&format!("host: localhost:{}", web.port())), "{head}");

    // A target the relay does not allow: the proxy answers with a SOCKS5 failure, curl fails.
    let (status, out, err) = curl_socks(proxy, &format!("http://localhost:{forbidden}/")).await;
    assert!(!status.success() && out.is_empty(), "curl to a forbidden target must fail: {status} {err}");

    let m = relay_metrics(&url).await;
    assert_eq!(metric(&m, "libtunnel_streams_total"), 1, "exactly one stream went through the relay:\n{m}");
    assert_eq!(metric(&m, "libtunnel_refusals_total{reason=\"not_allowed\"}"), 1, "{m}");
    drop(socks);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_forward_carries_hashed_tcp_round_trips_in_both_modes() {
    init_tracing();
    let echo = echo_server().await;
    let (server, url) = start_server(&auth_keys_json(), &allow_json(&[echo.port()])).await;
    for (classic, seed) in [(false, 600u64), (true, 700)] {
        let target = echo.to_string();
        let mut args = vec!["forward", "127.0.0.1:0", target.as_str(), "--relay", url.as_str()];
        if classic {
            args.push("--classic");
        }
        let mut cmd = tunnel(&args);
        cmd.env("TUNNEL_KEY", key_string());
        let mut fwd = Proc::spawn("tunnel forward", cmd);
        let rest = fwd.line("forwarding ").await;
        let local = first_addr(&rest);
        assert!(rest.contains(&target), "{rest}");
        // Several clients at once, each with its own data.
        let runs: Vec<_> = (0..4u64)
            .map(|i| async move {
                let data = payload(4 * MIB + i as usize * 4099, seed + i);
                let s = within(STEP, "connecting to the forward", TcpStream::connect(local)).await.expect("connect");
                let got = within(BULK, "round trip through tunnel forward", echo_roundtrip(s, &data, !classic)).await;
                (got.map_err(|e| e.to_string()), sha256(&data))
            })
            .collect();
        for (got, want) in futures_util::future::join_all(runs).await {
            let got = got.unwrap_or_else(|e| panic!("forward (classic={classic}) failed: {e}\nstderr:\n{}", fwd.stderr()));
            assert_eq!(got, want, "forward (classic={classic}) returned other bytes");
        }
    }
    let m = relay_metrics(&url).await;
    assert_eq!(metric(&m, "libtunnel_streams_total"), 8, "{m}");
    assert_eq!(metric(&m, "libtunnel_sessions_total{mode=\"multiplexed\"}"), 1, "the multiplexed forward shares one session:\n{m}");
    assert_eq!(metric(&m, "libtunnel_sessions_total{mode=\"classic\"}"), 4, "{m}");
    drop(server);
}

/// `tunnel dial TARGET` with stdin/stdout piped: send `input`, close stdin, collect stdout.
async fn dial_stdio(url: &str, key: &str, target: &str, extra: &[&str], input: &[u8], close_stdin: bool) -> (ExitStatus, Vec<u8>, String) {
    let mut args = vec!["dial", target, "--relay", url];
    args.extend_from_slice(extra);
    let mut cmd = tunnel(&args);
    cmd.env("TUNNEL_KEY", key).stdin(Stdio::piped());
    let mut p = Proc::spawn_raw_stdout("tunnel dial", cmd);
    let mut stdin = p.child.stdin.take().expect("stdin is piped");
    let mut stdout = p.child.stdout.take().expect("stdout is piped");
    let write = async {
        let r = stdin.write_all(input).await;
        if close_stdin {
            drop(stdin);
            None
        } else {
            let _ = stdin.flush().await;
            Some((stdin, r)) // keep stdin open until the process is done
        }
    };
    let read = async {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out).await;
        out
    };
    let (_kept, out) = within(BULK, "tunnel dial's output", async { tokio::join!(write, read) }).await;
    let status = p.exit(STEP).await;
    let err = p.stderr();
    (status, out, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_dial_pipes_stdin_and_stdout() {
    init_tracing();
    let echo = echo_server().await;
    let replier = reply_then_close_server(4, b"bye from the target\n".to_vec()).await;
    let (server, url) = start_server(&auth_keys_json(), &allow_json(&[echo.port(), replier.port()])).await;
    // Multiplexed: stdin EOF half-closes; the whole echo still comes back, then dial exits 0.
    let data = payload(4 * MIB + 3, 800);
    let (status, out, err) = dial_stdio(&url, &key_string(), &echo.to_string(), &[], &data, true).await;
    assert!(status.success(), "tunnel dial failed ({status}): {err}");
    assert_eq!(out.len(), data.len(), "stderr: {err}");
    assert_eq!(sha256(&out), sha256(&data));
    // Classic, ProxyCommand style: stdin stays open; the target finishing ends the session.
    for extra in [&[][..], &["--classic"][..]] {
        let (status, out, err) = dial_stdio(&url, &key_string(), &replier.to_string(), extra, b"ping", false).await;
        assert!(status.success(), "tunnel dial {extra:?} failed ({status}): {err}");
        assert_eq!(out, b"bye from the target\n", "{extra:?}");
    }
    // A refused target: non-zero exit and the code on stderr.
    let (status, out, err) = dial_stdio(&url, &key_string(), &format!("127.0.0.1:{}", closed_port().await), &[], b"", true).await;
    assert!(!status.success() && out.is_empty(), "{status}");
    assert!(err.contains("NOT_ALLOWED"), "stderr should carry the error code: {err}");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keygen_output_is_accepted_by_server_and_client() {
    init_tracing();
    let out = within(STEP, "tunnel keygen", tunnel(&["keygen", "--kid", "42"]).output()).await.expect("run keygen");
    assert!(out.status.success(), "keygen failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("keygen prints text");
    let value = |var: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{var}=")))
            .unwrap_or_else(|| panic!("keygen printed no {var}= line:\n{text}"))
            .trim()
            .trim_matches('\'')
            .to_string()
    };
    let (client, relay_keys) = (value("TUNNEL_KEY"), value("TUNNEL_AUTH_KEYS"));
    assert!(client.starts_with("42:"), "{client}");
    let echo = echo_server().await;
    let (server, url) = start_server(&relay_keys, &allow_json(&[echo.port()])).await;
    let data = payload(MIB, 900);
    let (status, got, err) = dial_stdio(&url, &client, &echo.to_string(), &[], &data, true).await;
    assert!(status.success(), "the generated key was refused ({status}): {err}");
    assert_eq!(sha256(&got), sha256(&data));
    // A second keygen makes a different secret, which this relay refuses.
    let other = within(STEP, "tunnel keygen", tunnel(&["keygen", "--kid", "42"]).output()).await.expect("run keygen");
    let other = String::from_utf8(other.stdout).expect("text");
    let other_key = other.lines().find_map(|l| l.strip_prefix("TUNNEL_KEY=")).expect("a key").trim().to_string();
    assert_ne!(other_key, client, "keygen must make a fresh secret each time");
    let (status, got, err) = dial_stdio(&url, &other_key, &echo.to_string(), &[], b"x", true).await;
    assert!(!status.success() && got.is_empty(), "{status}");
    assert!(err.contains("AUTH_FAILED"), "{err}");
    drop(server);
}

/// `tunnel server` that must refuse to start: exit code 2 and stderr naming `needle`.
async fn server_refuses(envs: &[(&str, &str)], needle: &str) {
    let mut cmd = tunnel(&["server"]);
    cmd.env("TUNNEL_LISTEN", "127.0.0.1:0");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut p = Proc::spawn("tunnel server (bad config)", cmd);
    let status = p.exit(STEP).await;
    let err = p.stderr();
    assert!(!status.success(), "the server started with {envs:?}");
    assert_eq!(status.code(), Some(2), "config errors exit with 2: {err}");
    assert!(err.contains(needle), "stderr should name {needle}: {err}");
    assert!(err.contains("INVALID_CONFIG"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_config_errors_name_the_variable_to_set() {
    init_tracing();
    let allow = allow_json(&[80]);
    let keys = auth_keys_json();
    server_refuses(&[("TUNNEL_ALLOW", &allow)], "TUNNEL_AUTH_KEYS").await;
    server_refuses(&[("TUNNEL_AUTH_KEYS", "[]"), ("TUNNEL_ALLOW", &allow)], "TUNNEL_AUTH_KEYS").await;
    server_refuses(&[("TUNNEL_AUTH_KEYS", &keys), ("TUNNEL_ALLOW", "[]")], "TUNNEL_ALLOW").await;
    server_refuses(&[("TUNNEL_AUTH_KEYS", &keys)], "TUNNEL_ALLOW").await;
    server_refuses(&[("TUNNEL_AUTH_KEYS", &keys), ("TUNNEL_ALLOW", &allow), ("TUNNEL_ALOW", "x")], "did you mean TUNNEL_ALLOW").await;
    // The public HTTPS port needs its certificate, readable.
    let https = ("TUNNEL_HTTPS_LISTEN", "127.0.0.1:0");
    server_refuses(&[("TUNNEL_AUTH_KEYS", &keys), ("TUNNEL_ALLOW", &allow), https], "TUNNEL_PUBLIC_TLS_CERT").await;
    let missing = [("TUNNEL_PUBLIC_TLS_CERT", "/nonexistent/cert.pem"), ("TUNNEL_PUBLIC_TLS_KEY", "/nonexistent/key.pem")];
    server_refuses(
        &[("TUNNEL_AUTH_KEYS", &keys), ("TUNNEL_ALLOW", &allow), https, missing[0], missing[1]],
        "cannot read TUNNEL_PUBLIC_TLS_CERT /nonexistent/cert.pem",
    )
    .await;
    // QUIC always runs TLS: its endpoint needs the tunnel endpoint's certificate.
    let quic = ("TUNNEL_QUIC_LISTEN", "127.0.0.1:0");
    server_refuses(&[("TUNNEL_AUTH_KEYS", &keys), ("TUNNEL_ALLOW", &allow), quic], "set TUNNEL_TLS_CERT and TUNNEL_TLS_KEY").await;
}

// ---------------------------------------------------------------------------------------------
// Graceful shutdown of `tunnel server`: SIGTERM stops accepting and lets open streams finish; a
// second signal exits at once.
// ---------------------------------------------------------------------------------------------

/// Wait (bounded) until the relay at `url` refuses new connections.
async fn stopped_accepting(url: &str) {
    eventually("the relay to stop accepting", || async {
        match TcpStream::connect(url_addr(url)).await {
            Ok(_) => Err("a new connection was accepted"),
            Err(_) => Ok(()),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_open_streams_and_a_second_signal_exits_at_once() {
    let echo = echo_server().await;
    let (mut relay, url) = start_server(&auth_keys_json(), &allow_json(&[echo.port()])).await;
    let d = libtunnel::Dialer::builder(&url).key(key()).timeout(STEP).build().expect("dialer");
    let mut s = within(STEP, "dial", d.dial(&echo.to_string())).await.expect("dial");
    let mut buf = [0u8; 6];
    s.write_all(b"before").await.expect("write");
    within(STEP, "echo", s.read_exact(&mut buf)).await.expect("echo before SIGTERM");

    relay.signal("TERM");
    // New connections are refused once the relay stops accepting...
    stopped_accepting(&url).await;
    // ...while the open stream keeps working, in both directions.
    let data = payload(4 << 20, 77);
    let got = within(STEP, "4 MiB through the draining relay", async {
        let (mut rd, mut wr) = tokio::io::split(&mut s);
        let mut got = vec![0u8; data.len()];
        let (w, r) = tokio::join!(wr.write_all(&data), rd.read_exact(&mut got));
        w.expect("the open stream takes writes while draining");
        r.expect("the open stream delivers while draining");
        got
    })
    .await;
    assert_eq!(sha256(&got), sha256(&data), "bytes changed while draining");
    assert!(relay.child.try_wait().expect("poll").is_none(), "the relay exited with a stream still open");
    // Once the stream ends, the relay finishes on its own.
    drop(s);
    d.close().await;
    let status = relay.exit(STEP).await;
    assert!(status.success(), "a drained relay exits 0, got {status:?}; stderr:\n{}", relay.stderr());
    assert!(relay.stderr().contains("draining"), "the relay should say it is draining; stderr:\n{}", relay.stderr());

    // A second signal does not wait for the open stream.
    let (mut relay, url) = start_server(&auth_keys_json(), &allow_json(&[echo.port()])).await;
    let d = libtunnel::Dialer::builder(&url).key(key()).timeout(STEP).build().expect("dialer");
    let mut s = within(STEP, "dial", d.dial(&echo.to_string())).await.expect("dial");
    s.write_all(b"before").await.expect("write");
    within(STEP, "echo", s.read_exact(&mut buf)).await.expect("echo");
    relay.signal("TERM");
    stopped_accepting(&url).await;
    relay.signal("TERM");
    let status = relay.exit(Duration::from_secs(3)).await;
    assert_eq!(status.code(), Some(130), "a second signal exits at once with 130; stderr:\n{}", relay.stderr());
    let r = within(STEP, "the stream to fail", s.read(&mut buf)).await;
    assert!(r.is_err(), "a stream cut by the exit must fail, got {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_keys_from_the_config_file() {
    use base64::Engine;
    let echo = echo_server().await;
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("sighup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let file = dir.join("relay.toml");
    let new_secret = b"rotated secret for the SIGHUP test";
    let write_config = |kid: u32, secret: &[u8]| {
        let data = base64::engine::general_purpose::STANDARD.encode(secret);
        let text = format!(
            "listen = \"127.0.0.1:0\"\nauth_keys = [{{kid = {kid}, data = \"{data}\"}}]\nallow = [{{host = \"127.0.0.1\", port = {}}}]\n",
            echo.port()
        );
        std::fs::write(&file, text).expect("write config");
    };
    write_config(KID, SECRET);
    let mut relay = Proc::spawn("tunnel server --config", tunnel(&["server", "--config", file.to_str().expect("utf8")]));
    let url = relay.line("relay listening: ").await.trim().to_string();
    let d = libtunnel::Dialer::builder(&url).key(key()).timeout(STEP).build().expect("dialer");
    within(STEP, "dial with the first key", d.dial(&echo.to_string())).await.expect("first key works");

    write_config(KID + 1, new_secret);
    relay.signal("HUP");
    relay.stderr_count("the reload", "reloaded keys", 1).await;
    let old = libtunnel::Dialer::builder(&url).key(key()).timeout(STEP).build().expect("dialer");
    let e = within(STEP, "dial with the removed key", old.dial(&echo.to_string())).await.expect_err("removed key");
    assert_eq!(e.code(), libtunnel::ErrorCode::AuthUnknownKey, "{e}");
    let new_key = libtunnel::Key::new(KID + 1, new_secret.to_vec()).expect("key");
    let new = libtunnel::Dialer::builder(&url).key(new_key).timeout(STEP).build().expect("dialer");
    within(STEP, "dial with the new key", new.dial(&echo.to_string())).await.expect("new key works after SIGHUP");

    // A broken file is refused and the running keys stay.
    std::fs::write(&file, "auth_keys = [").expect("write");
    relay.signal("HUP");
    relay.stderr_count("the failed reload", "reload failed", 1).await;
    within(STEP, "dial after a failed reload", new.dial(&echo.to_string())).await.expect("keys unchanged");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `tunnel completions SHELL` prints a script the shell accepts (bash registers it), and
/// `tunnel man` a man page naming every command; both come from the same clap definition.
#[test]
fn completions_and_man_page_come_from_the_cli_definition() {
    let bin = env!("CARGO_BIN_EXE_tunnel");
    let script = std::process::Command::new(bin).args(["completions", "bash"]).output().expect("run completions");
    assert!(script.status.success());
    let dir = clean_dir();
    let path = dir.join("tunnel.bash");
    std::fs::write(&path, &script.stdout).expect("write the script");
    let check = std::process::Command::new("bash").arg("-c").arg(format!("source {} && complete -p tunnel", path.display())).output().expect("bash");
    assert!(check.status.success(), "bash refused the script: {}", String::from_utf8_lossy(&check.stderr));
    assert!(String::from_utf8_lossy(&check.stdout).contains("tunnel"), "{}", String::from_utf8_lossy(&check.stdout));
    for shell in ["zsh", "fish"] {
        let out = std::process::Command::new(bin).args(["completions", shell]).output().expect("run completions");
        assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("forward"), "{shell}");
    }
    let man = std::process::Command::new(bin).arg("man").output().expect("run man");
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(man.status.success() && page.contains(".TH tunnel 1"), "{page}");
    for cmd in ["server", "forward", "socks", "dial", "listen", "keygen", "demo"] {
        assert!(page.contains(cmd), "the man page names {cmd}");
    }
}
