//! The first hour with the `tunnel` binary, as a new user and an operator meet it (issue 28):
//! refusals that reach the CLI as their code with a non-zero exit (and public HTTP as a 403 naming
//! the cause), `tunnel forward` stopping at a wrong key, `tunnel dial --via`, the lines `tunnel
//! listen` prints (and a pool replica's drain), `tunnel status` against a real admin endpoint,
//! the help texts (`--set help`, `server --help`), `keygen` labels, logging flags, the relay's
//! readiness notice to systemd (with a TLS endpoint) and `.env` files written for Emissary.
//! Real processes on loopback; every wait is bounded.

use testkit::pki;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use testkit::procs::{run, scratch, tunnel, Proc};
use testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A relay process (`tunnel server`) with the test key, open listeners, a public HTTP port and
/// `env`; returns it with its tunnel URL and public HTTP address.
async fn relay(dir: &Path, allow: &str, env: &[(&str, &str)]) -> (Proc, String, SocketAddr) {
    let mut cmd = tunnel(dir, &["server"]);
    cmd.env("TUNNEL_LISTEN", "127.0.0.1:0")
        .env("TUNNEL_HTTP_LISTEN", "127.0.0.1:0")
        .env("TUNNEL_AUTH_KEYS", auth_keys_json())
        .env("TUNNEL_ALLOW", allow)
        .env("TUNNEL_LISTENERS_OPEN", "true")
        .envs(env.iter().copied());
    let mut p = Proc::spawn("tunnel", cmd);
    let url = p.line("relay listening: ").await;
    let http = p.line("public http listening: http://").await.parse().expect("http addr");
    (p, url, http)
}

/// `tunnel listen ARGS` with a fresh key under `dir`; returns it and its name.
async fn listen(dir: &Path, url: &str, args: &[&str]) -> (Proc, String) {
    let keyfile = dir.join(format!("listener-{}.pem", rand::random::<u32>()));
    libtunnel::Identity::generate().save(&keyfile).expect("key");
    listen_with(dir, url, &keyfile, args).await
}

/// `tunnel listen ARGS` with the key file `keyfile`.
async fn listen_with(dir: &Path, url: &str, keyfile: &Path, args: &[&str]) -> (Proc, String) {
    let mut cmd = tunnel(dir, &["listen", "--relay", url, "--key", keyfile.to_str().expect("utf8")]);
    cmd.args(args);
    let mut p = Proc::spawn("tunnel", cmd);
    let name = p.line("listening as: ").await;
    (p, name)
}

/// `tunnel dial` with the test key, `input` on stdin: (status, stdout bytes, stderr).
async fn dial(dir: &Path, url: &str, args: &[&str], input: &[u8]) -> (ExitStatus, Vec<u8>, String) {
    let mut cmd = tunnel(dir, &["dial"]);
    cmd.args(args).env("TUNNEL_RELAY", url).env("TUNNEL_KEY", key_string()).stdin(Stdio::piped());
    let mut child = cmd.spawn().expect("start tunnel dial");
    let mut stdin = child.stdin.take().expect("stdin");
    let data = input.to_vec();
    tokio::spawn(async move {
        let _ = stdin.write_all(&data).await;
        let _ = stdin.shutdown().await;
    });
    let out = within(Duration::from_secs(30), "tunnel dial", child.wait_with_output()).await.expect("tunnel dial");
    (out.status, out.stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A public HTTP request for `name` at the relay's HTTP port: (status, body).
async fn public_get(http: SocketAddr, name: &str) -> (u16, String) {
    http_exchange(http, &format!("GET / HTTP/1.1\r\nHost: {name}.localhost\r\nConnection: close\r\n\r\n")).await
}

// ---------------------------------------------------------------------------------------------
// refusals reach the CLI as their code
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_reach_the_cli_as_their_code_and_public_http_as_a_403_naming_the_cause() {
    let dir = scratch("first-hour-refusals");
    let echo = echo_server().await;
    let (_relay, url, http) = relay(&dir, &allow_json(&[echo.port()]), &[]).await;

    // A plaintext dial to an --e2e listener: E2E_REFUSED, exit 1, nothing on stdout (no TLS
    // alert bytes).
    let (e2e, e2e_name) = listen(&dir, &url, &["--to", &echo.to_string(), "--e2e"]).await;
    let (status, out, err) = dial(&dir, &url, &[&format!("{e2e_name}:0")], b"hello").await;
    assert_eq!(status.code(), Some(1), "stderr: {err}");
    assert!(out.is_empty(), "stdout got {out:?}");
    assert!(err.contains("error [E2E_REFUSED]") && err.contains("--e2e"), "{err}");
    // A silent plaintext dialer (an ssh ProxyCommand waiting for the server to speak first):
    // E2E_REFUSED as well, after the listener's 2 s wait for a handshake, not CLOSED after 10 s.
    let started = std::time::Instant::now();
    let mut cmd = tunnel(&dir, &["dial", &format!("{e2e_name}:0")]);
    cmd.env("TUNNEL_RELAY", &url).env("TUNNEL_KEY", key_string()).stdin(Stdio::piped());
    let mut child = cmd.spawn().expect("start tunnel dial");
    let stdin = child.stdin.take(); // held open, nothing written
    let out = within(Duration::from_secs(30), "silent tunnel dial", child.wait_with_output()).await.expect("tunnel dial");
    drop(stdin);
    let (err, took) = (String::from_utf8_lossy(&out.stderr), started.elapsed());
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(out.stdout.is_empty() && err.contains("error [E2E_REFUSED]") && err.contains("--e2e"), "{err}");
    assert!(took < Duration::from_secs(6), "refused after {took:?}");
    // ...while an e2e dial goes through (hashed echo).
    let data = payload(256 * 1024, 28);
    let (status, out, err) = dial(&dir, &url, &[&format!("{e2e_name}:0"), "--e2e"], &data).await;
    assert!(status.success(), "{err}");
    assert_eq!(sha256(&out), sha256(&data));
    // Public HTTP to it: a 403 that names the cause.
    let (code, body) = public_get(http, &e2e_name).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("E2E_REFUSED") && body.contains("end-to-end encrypted"), "{body}");
    // `tunnel listen --e2e` offers only e2e dials.
    let printed = e2e.stdout();
    assert!(printed.contains("--e2e") && !printed.contains("http:"), "{printed}");

    // An exit listener without --to: a dial to its name is NOT_ALLOWED, exit 1.
    let (mut exit, exit_name) = listen(&dir, &url, &["--exit", "--allow", &allow_json(&[echo.port()])]).await;
    let (status, out, err) = dial(&dir, &url, &[&format!("{exit_name}:0")], b"hello").await;
    assert_eq!(status.code(), Some(1), "stderr: {err}");
    assert!(out.is_empty());
    assert!(err.contains("error [NOT_ALLOWED]") && err.contains("exposes no service") && err.contains("--via"), "{err}");
    // Emissary's classic wire carries the refusal too: it comes before the stream is accepted,
    // as the CONNECT's SOCKS5 reply.
    let (status, out, err) = dial(&dir, &url, &[&format!("{exit_name}:0"), "--classic"], b"hello").await;
    assert_eq!(status.code(), Some(1), "stderr: {err}");
    assert!(out.is_empty() && err.contains("error [NOT_ALLOWED]") && err.contains("exposes no service"), "{err}");
    let (code, body) = public_get(http, &exit_name).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("NOT_ALLOWED") && body.contains("exit listener"), "{body}");
    // It prints neither a dial: nor an http: line, but how to use it.
    let _ = exit.line("exit: ").await;
    let printed = exit.stdout();
    assert!(!printed.contains("dial:") && !printed.contains("http:"), "{printed}");
    drop(e2e);
}

/// An HTTP/1.1 server that answers every request `ok` and closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_dials_and_public_requests_are_not_logged_as_errors() {
    let dir = scratch("first-hour-quiet-successes");
    let (echo, web) = (echo_server().await, http_ok_server().await);
    let (relay, url, http) = relay(&dir, &allow_json(&[echo.port()]), &[]).await;
    for i in 0..3 {
        let data = payload(64 * 1024, i);
        let (status, out, err) = dial(&dir, &url, &[&echo.to_string()], &data).await;
        assert!(status.success() && err.is_empty(), "{err}");
        assert_eq!(sha256(&out), sha256(&data));
    }
    let (l, name) = listen(&dir, &url, &["--to", &web.to_string()]).await;
    for _ in 0..15 {
        assert_eq!(public_get(http, &name).await, (200, "ok".to_string()));
    }
    let logged = l.stderr_count("15 connection lines at the listener", "exposed http connection ended", 15).await;
    assert!(!logged.contains("error") && !logged.contains("reset the stream"), "{logged}");
    // `received` is what came back from the service (its 61-byte answer), as in `tunnel forward`'s
    // lines: `sent` is the client's side.
    let answer = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".len();
    assert!(logged.lines().filter(|l| l.contains("outcome=\"closed\"")).all(|l| l.contains(&format!("received={answer} "))), "{logged}");
    let relayed = relay.stderr();
    for bad in ["without a closing handshake", "transport failed", "ERROR", "WARN"] {
        assert!(!relayed.contains(bad), "the relay logged {bad:?}:\n{relayed}");
    }
}

// ---------------------------------------------------------------------------------------------
// tunnel forward: a wrong key stops it at start; --classic counts what it sent
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_with_a_wrong_key_exits_2_at_start() {
    let dir = scratch("first-hour-forward-wrong-key");
    let echo = echo_server().await;
    let (_relay, url, _) = relay(&dir, &allow_json(&[echo.port()]), &[]).await;
    let wrong = libtunnel::Key::new(KID, b"not-the-secret-the-relay-knows!!".to_vec()).expect("key").to_key_string();
    let mut cmd = tunnel(&dir, &["forward", "127.0.0.1:0", &echo.to_string()]);
    cmd.env("TUNNEL_RELAY", &url).env("TUNNEL_KEY", wrong);
    let (status, _out, err) = run(&mut cmd).await;
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("error [AUTH_FAILED]"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_forward_logs_the_bytes_it_sent_when_the_target_closes_first() {
    let dir = scratch("first-hour-classic-sent");
    let upload = 100 * 1024;
    let target = reply_then_close_server(upload, b"thanks".to_vec()).await;
    let (_relay, url, _) = relay(&dir, &allow_json(&[target.port()]), &[]).await;
    let mut cmd = tunnel(&dir, &["forward", "--classic", "127.0.0.1:0", &target.to_string()]);
    cmd.env("TUNNEL_RELAY", &url).env("TUNNEL_KEY", key_string());
    let mut fwd = Proc::spawn("tunnel", cmd);
    let local: SocketAddr = fwd.line("forwarding ").await.split_whitespace().next().expect("addr").parse().expect("addr");
    let mut s = within(STEP, "connect", TcpStream::connect(local)).await.expect("connect");
    // Keep our side open until the target has answered and closed (as a client that waits for
    // the reply does): the target's side ends first.
    s.write_all(&payload(upload, 4)).await.expect("upload");
    let mut reply = Vec::new();
    within(STEP, "the reply", s.read_to_end(&mut reply)).await.expect("read");
    assert_eq!(reply, b"thanks");
    drop(s);
    let logged = fwd.stderr_count("the connection log line", "forwarded connection ended", 1).await;
    assert!(logged.contains(&format!("sent={upload}")) && logged.contains("received=6"), "{logged}");
}

// ---------------------------------------------------------------------------------------------
// tunnel dial --via, listen lines, pool drain
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_via_an_exit_and_a_pool_replica_says_when_it_drains() {
    let dir = scratch("first-hour-via");
    let echo = echo_server().await;
    // The relay may not reach the echo itself: only the exit can.
    let exits = format!(r#"[{{"name":"office","key_ids":[{KID}]}}]"#);
    let id = libtunnel::Identity::generate();
    let keyfile = dir.join("office.pem");
    id.save(&keyfile).expect("key");
    let grants = format!(r#"[{{"public_key":"{}","names":["office"]}}]"#, id.public_key_base64());
    let (relay, url, _) = relay(&dir, &allow_json(&[1]), &[("TUNNEL_EXITS", &exits), ("TUNNEL_LISTENER_KEYS", &grants)]).await;
    let (_exit, name) = listen_with(&dir, &url, &keyfile, &["--exit", "--name", "office", "--allow", &allow_json(&[echo.port()])]).await;
    assert_eq!(name, "office");
    let data = payload(512 * 1024, 16);
    let (status, out, err) = dial(&dir, &url, &["--via", "office", &echo.to_string()], &data).await;
    assert!(status.success(), "{err}");
    assert_eq!(sha256(&out), sha256(&data), "the echo through the exit");
    // Not in the exit's allowlist: NOT_ALLOWED naming the exit.
    let (status, _, err) = dial(&dir, &url, &["--via", "office", "127.0.0.1:1"], b"x").await;
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("error [NOT_ALLOWED]") && err.contains("office"), "{err}");

    // A pool replica stopped with SIGTERM says it drains, then that it exited.
    let (mut replica, _) = listen(&dir, &url, &["--pool", "--to", &echo.to_string()]).await;
    let _ = replica.line("pool: joined").await;
    // Printed once its signal handler is in place.
    let _ = replica.line("forwarding to: ").await;
    replica.signal("TERM");
    let draining = replica.line("draining: ").await;
    assert!(draining.contains("retired from the pool"), "{draining}");
    let _ = replica.line("exited: ").await;
    assert!(replica.exit(STEP).await.success(), "{}", replica.stderr());
    assert!(!replica.stderr().contains("WARN"), "a drained replica logs no warning:\n{}", replica.stderr());
    // A plain listener stopped with Ctrl-C neither warns of a lost session nor reconnects.
    for _ in 0..3 {
        let (mut plain, _) = listen(&dir, &url, &["--to", &echo.to_string()]).await;
        let _ = plain.line("forwarding to: ").await;
        plain.signal("INT");
        assert!(plain.exit(STEP).await.success(), "{}", plain.stderr());
        assert!(!plain.stderr().contains("WARN"), "Ctrl-C logs no warning:\n{}", plain.stderr());
    }
    // The relay saw a session closed on purpose, not a failed transport.
    let ended = relay
        .stderr_line("the relay's log of the replica's end", |l| {
            (l.contains("listener session ended") && !l.contains("name=office")).then(|| l.to_string())
        })
        .await;
    // A pool replica drains (it says so with a GoAway before closing): the relay names that.
    assert!(ended.contains("the peer drained the session and closed it") && !ended.contains("failed"), "{ended}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_prints_the_https_url_when_the_relay_has_an_https_port() {
    let dir = scratch("first-hour-https-url");
    let pki = pki::make_pki(&dir.join("pki"), &["*.localhost", "localhost"]);
    let echo = echo_server().await;
    let mut cmd = tunnel(&dir, &["server"]);
    cmd.env("TUNNEL_LISTEN", "127.0.0.1:0")
        .env("TUNNEL_HTTPS_LISTEN", "127.0.0.1:0")
        .env("TUNNEL_PUBLIC_TLS_CERT", &pki.cert)
        .env("TUNNEL_PUBLIC_TLS_KEY", &pki.key)
        .env("TUNNEL_LISTENERS_OPEN", "true");
    let mut relay = Proc::spawn("tunnel", cmd);
    let url = relay.line("relay listening: ").await;
    let https: SocketAddr = relay.line("public https listening: https://").await.parse().expect("addr");
    let (mut l, name) = listen(&dir, &url, &["--to", &echo.to_string()]).await;
    let printed = l.line("https: ").await;
    assert_eq!(printed, format!("https://{name}.localhost:{}", https.port()));
}

// ---------------------------------------------------------------------------------------------
// tunnel status, admin /config and /metrics
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_the_token_from_dotenv_takes_an_address_without_scheme_and_marks_pools() {
    let dir = scratch("first-hour-status");
    let echo = echo_server().await;
    let token = "first-hour-admin-token-0123456789";
    let (_relay, url, _) = relay(&dir, &allow_json(&[echo.port()]), &[("TUNNEL_ADMIN_LISTEN", "127.0.0.1:0"), ("TUNNEL_ADMIN_TOKEN", token)]).await;
    // The admin line comes after the others; read the relay's stdout so far.
    let admin = _relay.stdout_line("the admin line", |l| l.strip_prefix("admin listening: http://").map(str::to_string)).await;
    let keyfile = dir.join("pool.pem");
    libtunnel::Identity::generate().save(&keyfile).expect("key");
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let mut cmd = tunnel(&dir, &["listen", "--relay", &url, "--key", keyfile.to_str().unwrap(), "--pool", "--to", &echo.to_string()]);
        cmd.env_remove("TUNNEL_KEY");
        let mut p = Proc::spawn("tunnel", cmd);
        let _ = p.line("pool: joined").await;
        replicas.push(p);
    }
    let (_single, single) = listen(&dir, &url, &["--to", &echo.to_string()]).await;
    std::fs::write(dir.join(".env"), format!("# the operator's .env\nexport TUNNEL_ADMIN_TOKEN='{token}'\n")).expect(".env");
    let (status, out, err) = run(&mut tunnel(&dir, &["status", "--admin", &admin])).await;
    assert!(status.success(), "{err}");
    assert!(err.is_empty(), "stderr: {err}");
    assert!(!out.contains("null"), "{out}");
    assert!(out.contains("pool 1/2") && out.contains("pool 2/2"), "{out}");
    assert!(out.contains("3 listener session(s) under 2 name(s); 0 dialer session(s)"), "{out}");
    assert!(out.lines().any(|l| l.starts_with(&single)), "{out}");
    // Aligned: every row's PUBLIC KEY column starts where its header does.
    let header = out.lines().next().expect("header");
    let col = header.find("PUBLIC KEY").expect("column");
    for row in out.lines().skip(1).filter(|l| l.contains(" - ") || l.contains("pool")) {
        let key = row[col..].split_whitespace().next().expect("a key");
        assert_eq!(key.len(), 44, "the key column is misaligned in {row:?}\n{out}");
    }

    // /config: JSON all through, with https_listen, tcp_ports and exits; /metrics counts the
    // listener sessions /sessions reports.
    let admin: SocketAddr = admin.parse().expect("addr");
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n");
    let (code, body) = http_exchange(admin, &get("/config")).await;
    assert_eq!(code, 200);
    let cfg: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert!(cfg["limits"]["max_streams"].as_u64() == Some(4096) && cfg["limits"]["http_timeout"].as_f64() == Some(30.0), "{body}");
    for k in ["https_listen", "tcp_ports", "exits"] {
        assert!(cfg.get(k).is_some(), "/config lacks {k}: {body}");
    }
    let (_, metrics) = http_exchange(admin, &get("/metrics")).await;
    assert_eq!(metric(&metrics, "libtunnel_listener_sessions_active"), 3, "{metrics}");
}

// ---------------------------------------------------------------------------------------------
// help texts, keygen, logging flags
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_lists_every_setting_with_its_default_aligned() {
    let dir = scratch("first-hour-help");
    let (status, out, err) = run(&mut tunnel(&dir, &["server", "--set", "help"])).await;
    assert!(status.success() && err.is_empty(), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), libtunnel::config::SETTINGS.len() + 1, "{out}");
    let default_col = lines[0].find("DEFAULT").expect("header");
    let what_col = lines[0].find("WHAT").expect("header");
    for s in libtunnel::config::SETTINGS {
        let line = lines.iter().find(|l| l.split_whitespace().next() == Some(s.name)).unwrap_or_else(|| panic!("{} missing:\n{out}", s.name));
        assert_eq!(&line[default_col..default_col + s.default.len()], s.default, "{line}");
        assert!(line[what_col..].starts_with(s.help), "misaligned: {line}");
    }
    let (status, out, _) = run(&mut tunnel(&dir, &["server", "--help"])).await;
    assert!(status.success());
    assert!(!out.contains("see the list below"), "{out}");
    for s in libtunnel::config::SETTINGS {
        assert!(out.contains(&format!("\n{} ", s.name)), "server --help does not list {}", s.name);
    }
    let (_, out, _) = run(&mut tunnel(&dir, &["--help"])).await;
    assert!(out.contains("RUST_LOG") && out.contains("--log-format") && out.contains("--verbose") && out.contains("--quiet"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keygen_labels_each_use_of_its_key() {
    let dir = scratch("first-hour-keygen");
    let (status, out, err) = run(&mut tunnel(&dir, &["keygen", "--cluster", "--kid", "9"])).await;
    assert!(status.success() && err.is_empty(), "{err}");
    let key = out.lines().find_map(|l| l.strip_prefix("TUNNEL_CLUSTER_KEY=")).expect("a cluster key");
    assert!(key.starts_with("9:") && out.contains("every node") && !out.contains("TUNNEL_KEY=") && !out.contains("dialers (tunnel"), "{out}");
    let (status, out, err) = run(&mut tunnel(&dir, &["keygen"])).await;
    assert!(status.success() && err.is_empty() && out.contains("For dialers") && out.contains("TUNNEL_AUTH_KEYS="), "{out}");
    let pem = dir.join("id.pem");
    let (status, out, err) = run(&mut tunnel(&dir, &["keygen", "--listener", "--out", pem.to_str().unwrap()])).await;
    assert!(status.success() && err.is_empty(), "{err}");
    let public = out.lines().find_map(|l| l.strip_prefix("public key: ")).expect("public key");
    assert!(out.contains("TUNNEL_LISTENER_KEYS=") && out.contains("e2e dialer identity"), "{out}");
    assert!(out.lines().any(|l| l == format!("--allow-peer {public}")), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_flags_set_the_level_and_the_format() {
    let dir = scratch("first-hour-logging");
    // An unknown EMISSARY_ variable makes the relay warn at start.
    let start = |args: &[&str]| {
        let mut cmd = tunnel(&dir, args);
        cmd.env("TUNNEL_LISTEN", "127.0.0.1:0").env("TUNNEL_LISTENERS_OPEN", "true").env("EMISSARY_NOT_A_SETTING", "1");
        Proc::spawn("tunnel", cmd)
    };
    let mut json = start(&["--log-format", "json", "server"]);
    let _ = json.line("relay listening: ").await;
    let warned = json.stderr_line("the warning", |l| l.contains("EMISSARY_NOT_A_SETTING").then(|| l.to_string())).await;
    let v: serde_json::Value = serde_json::from_str(&warned).unwrap_or_else(|e| panic!("not JSON ({e}): {warned}"));
    assert_eq!(v["level"], "WARN", "{warned}");
    assert!(v["timestamp"].is_string(), "{warned}");
    // -qq: errors only, so nothing at all here; RUST_LOG does not override it.
    let mut cmd = tunnel(&dir, &["-qq", "server"]);
    cmd.env("TUNNEL_LISTEN", "127.0.0.1:0").env("TUNNEL_LISTENERS_OPEN", "true").env("EMISSARY_NOT_A_SETTING", "1").env("RUST_LOG", "trace");
    let mut quiet = Proc::spawn("tunnel", cmd);
    let _ = quiet.line("relay listening: ").await;
    quiet.signal("TERM");
    assert!(quiet.exit(STEP).await.success());
    assert!(quiet.stderr().is_empty(), "-qq printed: {}", quiet.stderr());
}

// ---------------------------------------------------------------------------------------------
// systemd readiness with a TLS endpoint
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_tells_systemd_it_is_ready_once_its_tls_endpoint_is_bound() {
    let dir = scratch("first-hour-notify");
    let pki = pki::make_pki(&dir.join("pki"), &["localhost", "127.0.0.1"]);
    let socket = dir.join("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&socket).expect("bind the notify socket");
    let mut cmd = tunnel(&dir, &["server"]);
    cmd.env("TUNNEL_LISTEN", "127.0.0.1:0")
        .env("TUNNEL_TLS_CERT", &pki.cert)
        .env("TUNNEL_TLS_KEY", &pki.key)
        .env("TUNNEL_LISTENERS_OPEN", "true")
        .env("NOTIFY_SOCKET", &socket);
    let mut relay = Proc::spawn("tunnel", cmd);
    let mut buf = [0u8; 256];
    let n = within(STEP, "READY=1 from the relay", sock.recv(&mut buf)).await.expect("recv");
    assert_eq!(buf[..n].trim_ascii(), b"READY=1");
    // By then the wss:// endpoint answers its health path over TLS.
    let url = relay.line("relay listening: ").await;
    assert!(url.starts_with("wss://127.0.0.1:"), "{url}");
    let addr: SocketAddr = url.trim_start_matches("wss://").trim_end_matches('/').parse().expect("addr");
    let status = tls_health(addr, &pki.ca).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    relay.signal("TERM");
    let n = within(STEP, "STOPPING=1 from the relay", sock.recv(&mut buf)).await.expect("recv");
    assert_eq!(buf[..n].trim_ascii(), b"STOPPING=1");
    assert!(relay.exit(Duration::from_secs(40)).await.success(), "{}", relay.stderr());

    // A relay that cannot start never says it is ready: systemd sees the exit.
    let mut cmd = tunnel(&dir, &["server"]);
    cmd.env("TUNNEL_LISTEN", "127.0.0.1:0")
        .env("TUNNEL_TLS_CERT", dir.join("missing.pem"))
        .env("TUNNEL_TLS_KEY", &pki.key)
        .env("TUNNEL_LISTENERS_OPEN", "true")
        .env("NOTIFY_SOCKET", &socket);
    let (status, _, err) = run(&mut cmd).await;
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("missing.pem"), "{err}");
    assert!(sock.try_recv(&mut buf).is_err(), "a failed relay sent a notice");
}

/// GET /healthz over TLS (trusting `ca`); the status line.
async fn tls_health(addr: SocketAddr, ca: &Path) -> String {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca).expect("ca");
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
        roots.add(c.expect("ca pem")).expect("add ca");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = within(STEP, "connect", TcpStream::connect(addr)).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = within(STEP, "TLS handshake", tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp)).await.expect("tls");
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.expect("write");
    let mut out = Vec::new();
    let _ = within(STEP, "the answer", tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).lines().next().unwrap_or_default().to_string()
}

// ---------------------------------------------------------------------------------------------
// .env files as Emissary writes them
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dotenv_with_unquoted_json_export_and_comments_starts_the_relay() {
    let dir = scratch("first-hour-dotenv");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    use base64::Engine;
    let secret = base64::engine::general_purpose::STANDARD.encode(SECRET);
    std::fs::write(
        dir.join(".env"),
        format!(
            "# written for Emissary\nexport EMISSARY_HTTP_PORT={port} # the port\nEMISSARY_AUTH_KEYS=[{{\"kid\":{KID},\"data\":\"{secret}\"}}]\n\
             EMISSARY_ALLOWED_PROXY_TARGETS=[{{ \"host\": \"db.internal\", \"port\": 5432 }}]\nEMISSARY_HEALTH_PATH=\"/health\"\n"
        ),
    )
    .expect(".env");
    let mut relay = Proc::spawn("tunnel", tunnel(&dir, &["server"]));
    let url = relay.line("relay listening: ").await;
    assert!(url.ends_with(&format!(":{port}")), "{url}");
    let (code, body) = http_get(SocketAddr::from(([127, 0, 0, 1], port)), "/health").await;
    assert_eq!((code, body.as_str()), (200, format!(r#"{{"key_ids":[{KID}],"ok":true}}"#).as_str()));
    drop(relay);

    // A quote at one end only: the error says the quoting is the cause.
    std::fs::write(dir.join(".env"), format!("EMISSARY_HTTP_PORT={port}\nEMISSARY_AUTH_KEYS='[{{\"kid\":1,\"data\":\"{secret}\"}}]\n"))
        .expect(".env");
    let (status, _, err) = run(&mut tunnel(&dir, &["server"])).await;
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("EMISSARY_AUTH_KEYS") && err.contains("at one end only"), "{err}");
}
