//! The client configuration every face shares (`libtunnel::client`), tried through the `tunnel`
//! binary: the bad-input table of `tests/fixtures/client_config_cases.json` (the Python, Node and
//! C faces run the same table), and one `.env` holding both the relay's and the clients'
//! variables that starts `tunnel server` and configures `tunnel forward` with no flag at all.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn fixture() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/client_config_cases.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("read the shared case table")).expect("the case table is JSON")
}

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("client-config-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create a scratch dir");
    d
}

/// `tunnel ARGS` in `dir`, with no inherited TUNNEL_* variables.
fn tunnel(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tunnel"));
    c.args(args).current_dir(dir).stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("TUNNEL_") || k.starts_with("EMISSARY_") || k.starts_with("LIBTUNNEL_") {
            c.env_remove(k);
        }
    }
    c
}

#[test]
fn the_shared_bad_input_table_through_the_cli() {
    let table = fixture();
    let secret = table["secret"].as_str().unwrap();
    let good_key = table["good_key"].as_str().unwrap();
    let dir = scratch("table");
    let listener_key = dir.join("listener.pem");
    libtunnel::Identity::generate().save(&listener_key).unwrap();
    // Port 9 on loopback: nothing listens, and no case may get as far as connecting.
    let relay = "ws://127.0.0.1:9";
    for case in table["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let listener = case["role"] == "listener";
        let key =
            case["key"].as_str().map(str::to_string).unwrap_or_else(
                || {
                    if listener {
                        listener_key.display().to_string()
                    } else {
                        good_key.to_string()
                    }
                },
            );
        let mut args: Vec<String> =
            if listener { vec!["listen".into(), "--to".into(), "127.0.0.1:9".into()] } else { vec!["dial".into(), "db.internal:5432".into()] };
        args.extend(["--relay".into(), relay.into(), "--key".into(), key]);
        if let Some(t) = case["timeout"].as_str() {
            args.push(format!("--timeout={t}"));
        }
        let started = Instant::now();
        let out = tunnel(&dir, &args.iter().map(String::as_str).collect::<Vec<_>>()).output().expect("run tunnel");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: exit code 2 (bad input); stderr: {stderr}");
        let code = case["code"].as_str().unwrap();
        assert!(stderr.contains(&format!("error [{code}]")), "{name}: code {code} in {stderr:?}");
        for n in case["names"].as_array().unwrap() {
            assert!(stderr.contains(n.as_str().unwrap()), "{name}: message names {n}: {stderr:?}");
        }
        assert!(!stderr.contains(secret), "{name}: the secret leaked: {stderr:?}");
        assert!(started.elapsed() < Duration::from_secs(10), "{name}: refused before any network wait");
    }
}

#[test]
fn missing_relay_and_key_name_the_variables() {
    let dir = scratch("missing");
    let out = tunnel(&dir, &["dial", "db.internal:5432"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("TUNNEL_RELAY"), "{stderr}");
    let out = tunnel(&dir, &["dial", "db.internal:5432", "--relay", "ws://127.0.0.1:9"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("TUNNEL_KEY") && stderr.contains("tunnel keygen"), "{stderr}");
    let out = tunnel(&dir, &["listen", "--to", "127.0.0.1:9", "--relay", "ws://127.0.0.1:9"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("TUNNEL_LISTENER_KEY") && stderr.contains("tunnel keygen --listener"), "{stderr}");
}

/// Kills the child when dropped.
struct Running(Child);
impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The first stdout line of `child` that starts with `prefix`, within 60 s (builds are done; the
/// wait covers a loaded machine).
fn line_starting(child: &mut Child, prefix: &str) -> String {
    let mut out = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = prefix.to_string();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while out.read(&mut byte).map(|n| n == 1).unwrap_or(false) {
            if byte[0] == b'\n' {
                let line = String::from_utf8_lossy(&buf).to_string();
                if line.starts_with(&wanted) {
                    let _ = tx.send(line);
                    // Keep draining so the child never blocks on a full pipe.
                }
                buf.clear();
            } else {
                buf.push(byte[0]);
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("no line starting with {prefix:?}"))
}

#[test]
fn one_dotenv_serves_the_relay_and_the_clients() {
    let dir = scratch("dotenv");
    // A target the relay allows: it echoes what it reads.
    let echo = TcpListener::bind("127.0.0.1:0").unwrap();
    let echo_addr = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let mut w = s;
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    let relay_port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listener_key = dir.join("listener.pem");
    libtunnel::Identity::generate().save(&listener_key).unwrap();
    let keys = libtunnel::client::keys::SharedKeyText::generate(4);
    // Client and relay variables side by side, as in one compose file; the old worker-thread name
    // too, which must only be warned about.
    let dotenv = format!(
        "TUNNEL_LISTEN=127.0.0.1:{relay_port}\nTUNNEL_AUTH_KEYS='{}'\nTUNNEL_ALLOW='[{{\"host\":\"127.0.0.1\",\"port\":{}}}]'\n\
         TUNNEL_RELAY=ws://127.0.0.1:{relay_port}\nTUNNEL_KEY={}\nTUNNEL_LISTENER_KEY={}\nTUNNEL_CA=\nTUNNEL_TIMEOUT=15\nTUNNEL_MODE=multiplexed\n\
         TUNNEL_WORKER_THREADS=2\nLIBTUNNEL_WORKER_THREADS=2\n",
        keys.auth_keys,
        echo_addr.port(),
        keys.key,
        listener_key.display()
    );
    std::fs::write(dir.join(".env"), dotenv).unwrap();
    let mut server = tunnel(&dir, &["server"]).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
    let line = line_starting(&mut server, "relay listening:");
    let _server = Running(server);
    assert!(line.contains(&relay_port.to_string()), "{line}");
    let forward_log = dir.join("forward.log");
    let mut forward = tunnel(&dir, &["forward", "127.0.0.1:0", &echo_addr.to_string()])
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&forward_log).unwrap())
        .spawn()
        .unwrap();
    let line = line_starting(&mut forward, "forwarding ");
    let _forward = Running(forward);
    let local: SocketAddr = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut s = TcpStream::connect(local).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + 3) as u8).collect();
    s.write_all(&payload).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    assert!(back == payload, "echoed bytes differ ({} of {} back)", back.len(), payload.len());
    // One connection log line at the default level: who, where, bytes both ways, outcome; no
    // colour codes in a file.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(&forward_log).unwrap();
        if let Some(line) = log.lines().find(|l| l.contains("forwarded connection ended")) {
            assert!(line.contains("sent=200000") && line.contains("received=200000") && line.contains(&echo_addr.to_string()), "{line}");
            assert!(!log.contains('\u{1b}'), "ANSI escapes in a log file: {log:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no connection log line in {log:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `tunnel demo` (what `make demo` runs) tells the whole story, the listener half included, with
/// no log line interleaved.
#[test]
fn the_demo_runs_both_halves_without_log_noise() {
    let dir = scratch("demo");
    let out = tunnel(&dir, &["demo"]).output().expect("run tunnel demo");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "demo failed: {stdout}\n{stderr}");
    for step in [
        "3a. multiplexed mode",
        "3b. classic",
        "4. a target outside the allowlist",
        "5. a wrong secret",
        "6a. dialed it by name",
        "6b. a public HTTP request",
        "7. relay shut down cleanly",
    ] {
        assert!(stdout.contains(step), "step {step:?} missing from:\n{stdout}");
    }
    assert_eq!(stdout.matches("HTTP/1.1 200 OK").count(), 2, "{stdout}");
    assert!(stderr.trim().is_empty(), "log lines interleaved with the story: {stderr}");
}

// ---------------------------------------------------------------------------------------------
// Upstream proxies (`--proxy`, TUNNEL_PROXY, NO_PROXY): real squid (HTTP CONNECT, Basic auth)
// and microsocks (SOCKS5, RFC 1929 password) from Debian, each on loopback with its own config
// in a scratch dir, in front of a real `tunnel server`.

/// Every variable that may choose a proxy: removed from each child, so the host's own settings
/// cannot steer a test.
const PROXY_VARS: &[&str] =
    &["TUNNEL_PROXY", "https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"];

/// `tunnel ARGS` with neither TUNNEL_* nor proxy variables inherited.
fn tunnel_clean(dir: &Path, args: &[&str]) -> Command {
    tunnel_in(None, dir, args)
}

/// [`tunnel_clean`], run inside the network namespace of process `netns` if given.
fn tunnel_in(netns: Option<u32>, dir: &Path, args: &[&str]) -> Command {
    let mut c = match netns {
        None => tunnel(dir, args),
        Some(pid) => {
            let mut c = Command::new("nsenter");
            c.args(["-t", &pid.to_string(), "-n", "--", env!("CARGO_BIN_EXE_tunnel")]).args(args).current_dir(dir).stdin(Stdio::null());
            for (k, _) in std::env::vars() {
                if k.starts_with("TUNNEL_") || k.starts_with("EMISSARY_") || k.starts_with("LIBTUNNEL_") {
                    c.env_remove(k);
                }
            }
            c
        }
    };
    for v in PROXY_VARS {
        c.env_remove(v);
    }
    c
}

/// The path of `name` (PATH or the sbin directories), or `None` with a line in the skip log
/// (scripts/test.sh installs squid and microsocks).
fn proxy_program(name: &str, package: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path.split(':').chain(["/usr/sbin", "/sbin"]).map(|d| Path::new(d).join(name)).find(|p| p.is_file());
    if found.is_none() {
        let why = format!("proxy test skipped: {name} not installed (apt-get install {package}; scripts/test.sh does)");
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("{why}");
        if let Some(log) = std::env::var_os("LIBTUNNEL_SKIP_LOG") {
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
                let _ = writeln!(f, "{why}");
            }
        }
    }
    found
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Reads `r` to its end on a thread; sends the first line containing `wanted`.
fn watch_for(r: impl Read + Send + 'static, wanted: &str) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = wanted.to_string();
    std::thread::spawn(move || {
        let mut r = std::io::BufReader::new(r);
        let mut line = String::new();
        while std::io::BufRead::read_line(&mut r, &mut line).map(|n| n > 0).unwrap_or(false) {
            if line.contains(&wanted) {
                let _ = tx.send(line.trim().to_string());
            }
            line.clear();
        }
    });
    rx
}

/// An echo server on loopback (a target the relay allows).
fn echo_server() -> SocketAddr {
    serve_echo(TcpListener::bind("127.0.0.1:0").unwrap())
}

/// An echo server on the loopback of the network namespace of process `pid` (a thread joins
/// that namespace to bind it; the socket stays there).
fn echo_server_in(pid: u32) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
        // SAFETY: setns on this thread only, with a namespace fd that stays open for the call.
        let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        let _ = tx.send(TcpListener::bind("127.0.0.1:0").unwrap());
    });
    serve_echo(rx.recv_timeout(Duration::from_secs(10)).expect("a listener in the namespace"))
}

fn serve_echo(echo: TcpListener) -> SocketAddr {
    let addr = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let mut w = s;
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

/// A relay allowing `echo` (by address and as `localhost`), open to listeners; its URL.
fn proxy_test_relay(dir: &Path, echo: SocketAddr, keys: &libtunnel::client::keys::SharedKeyText) -> (Running, String) {
    let allow = format!("[{{\"host\":\"127.0.0.1\",\"port\":{0}}},{{\"host\":\"localhost\",\"port\":{0}}}]", echo.port());
    let mut server = tunnel_clean(dir, &["server"])
        .env("TUNNEL_LISTEN", "127.0.0.1:0")
        .env("TUNNEL_AUTH_KEYS", &keys.auth_keys)
        .env("TUNNEL_ALLOW", allow)
        .env("TUNNEL_LISTENERS_OPEN", "true")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let line = line_starting(&mut server, "relay listening:");
    let url = line.trim_start_matches("relay listening:").trim().to_string();
    (Running(server), url)
}

/// `tunnel dial TARGET ARGS` with `payload` on stdin: (exit code, stdout, stderr), within 60 s.
fn dial_with(dir: &Path, target: &str, args: &[&str], env: &[(&str, &str)], payload: &[u8]) -> (Option<i32>, Vec<u8>, String) {
    dial_in(None, dir, target, args, env, payload)
}

/// [`dial_with`] inside the network namespace of process `netns`, if given.
fn dial_in(netns: Option<u32>, dir: &Path, target: &str, args: &[&str], env: &[(&str, &str)], payload: &[u8]) -> (Option<i32>, Vec<u8>, String) {
    let mut all = vec!["dial", target, "--timeout", "20"];
    all.extend_from_slice(args);
    let mut child = tunnel_in(netns, dir, &all)
        .envs(env.iter().copied())
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = payload.to_vec();
    std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx.recv_timeout(Duration::from_secs(60)).expect("tunnel dial finished within 60 s").unwrap();
    (out.status.code(), out.stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn sha(b: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(b))
}

/// 1 MiB through the relay to the echo server and back, hashed both ways.
fn mib_roundtrip(dir: &Path, target: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    mib_roundtrip_in(None, dir, target, args, env)
}

/// [`mib_roundtrip`] inside the network namespace of process `netns`, if given.
fn mib_roundtrip_in(netns: Option<u32>, dir: &Path, target: &str, args: &[&str], env: &[(&str, &str)]) -> String {
    let payload: Vec<u8> = (0..1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let (code, back, stderr) = dial_in(netns, dir, target, args, env, &payload);
    assert_eq!(code, Some(0), "dial failed: {stderr}");
    assert_eq!(sha(&back), sha(&payload), "{} of {} bytes back; stderr: {stderr}", back.len(), payload.len());
    stderr
}

/// Waits until `count(file)` reaches `n` (a proxy writes its log line when a tunnel ends), then
/// returns the file.
fn wait_count(file: &Path, n: usize, count: impl Fn(&str) -> usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if count(&text) >= n {
            return text;
        }
        assert!(Instant::now() < deadline, "{n} lines never appeared in {}: {text}", file.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// squid on a free loopback port with Basic auth (alice / `password`), refusing CONNECT to port
/// 9, speaking TLS with `tls` (certificate, key) if given; its port and access log.
fn start_squid(squid: &Path, dir: &Path, password: &str, tls: Option<(&Path, &Path)>) -> (Squid, u16, PathBuf) {
    start_squid_on("127.0.0.1", squid, dir, password, tls)
}

/// [`start_squid`] listening on `ip`.
fn start_squid_on(ip: &str, squid: &Path, dir: &Path, password: &str, tls: Option<(&Path, &Path)>) -> (Squid, u16, PathBuf) {
    // squid drops root for its `proxy` user, which must write the logs and read the password file.
    let sq = dir.join(if tls.is_some() { "squid-tls" } else { "squid" });
    std::fs::create_dir_all(&sq).unwrap();
    for d in [&sq, dir] {
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    }
    let hash = Command::new("openssl").args(["passwd", "-apr1", password]).output().expect("openssl passwd");
    std::fs::write(sq.join("passwd"), format!("alice:{}", String::from_utf8_lossy(&hash.stdout))).unwrap();
    let port = free_port();
    let d = sq.display();
    let conf = format!(
        "{}pid_filename {d}/squid.pid\naccess_log stdio:{d}/access.log\ncache_log {d}/cache.log\n\
         cache_store_log none\ncoredump_dir {d}\ncache deny all\nshutdown_lifetime 0 seconds\npinger_enable off\n\
         auth_param basic program /usr/lib/squid/basic_ncsa_auth {d}/passwd\nauth_param basic realm libtunnel-test\n\
         acl authed proxy_auth REQUIRED\nacl blocked port 9\nhttp_access deny blocked\nhttp_access allow authed\nhttp_access deny all\n",
        match tls {
            Some((cert, key)) => format!("https_port {ip}:{port} tls-cert={} tls-key={}\n", cert.display(), key.display()),
            None => format!("http_port {ip}:{port}\n"),
        }
    );
    std::fs::write(sq.join("squid.conf"), conf).unwrap();
    // squid names its shared-memory segments after its service name (/dev/shm/NAME-cf__*.shm):
    // one per instance, so squids of parallel tests (and other checkouts) never collide.
    let service = format!("lt{}p{port}", std::process::id());
    let mut child = Command::new(squid)
        .args(["-N", "-d", "1", "-n", &service, "-f"])
        .arg(sq.join("squid.conf"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ready = watch_for(child.stderr.take().unwrap(), if tls.is_some() { "Accepting HTTPS Socket" } else { "Accepting HTTP Socket" });
    let running = Squid(Running(child), service);
    if let Err(e) = ready.recv_timeout(Duration::from_secs(30)) {
        panic!("squid did not start within 30 s ({e}): {}", std::fs::read_to_string(sq.join("cache.log")).unwrap_or_default());
    }
    // squid logs that line before its listen() has run: wait until a connection is accepted.
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect((ip, port)).is_err() {
        assert!(Instant::now() < deadline, "squid did not accept connections on {ip}:{port} within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    (running, port, sq.join("access.log"))
}

/// A running squid; killed (SIGKILL) on drop, its shared-memory segments removed after it.
struct Squid(Running, String);
impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.0 .0.kill();
        let _ = self.0 .0.wait();
        for e in std::fs::read_dir("/dev/shm").into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(&format!("{}-", self.1)) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn connects(log: &str) -> usize {
    log.lines().filter(|l| l.contains(" CONNECT ")).count()
}

#[test]
fn squid_with_basic_auth_carries_dialers_and_listeners() {
    let Some(squid) = proxy_program("squid", "squid") else { return };
    let dir = scratch("squid");
    let (_squid, port, access) = start_squid(&squid, &dir, "s3cret", None);
    let echo = echo_server();
    let keys = libtunnel::client::keys::SharedKeyText::generate(3);
    let (_relay, relay) = proxy_test_relay(&dir, echo, &keys);
    let proxy = format!("http://alice:s3cret@127.0.0.1:{port}");
    let target = echo.to_string();
    let base = ["--relay", relay.as_str(), "--key", keys.key.as_str()];

    // --proxy, then TUNNEL_PROXY: 1 MiB each way, one CONNECT per session.
    // At trace level the proxy is logged, its password masked (neither plain nor as Basic credentials).
    let stderr = mib_roundtrip(&dir, &target, &[&base[..], &["-vv", "--proxy", &proxy]].concat(), &[]);
    assert!(stderr.contains(&format!("http://alice:***@127.0.0.1:{port}")), "the proxy is not in the trace log: {stderr}");
    assert!(!stderr.contains("s3cret") && !stderr.contains("YWxpY2U6czNjcmV0"), "the proxy password leaked: {stderr}");
    mib_roundtrip(&dir, &target, &base, &[("TUNNEL_PROXY", &proxy)]);
    let log = wait_count(&access, 2, connects);
    assert_eq!(connects(&log), 2, "{log}");
    assert!(log.lines().all(|l| !l.contains(" CONNECT ") || (l.contains(" alice ") && l.contains(&relay[5..]))), "{log}");

    // NO_PROXY: the next session goes direct; a proxied one after it is the only new line.
    let relay_port = relay.rsplit(':').next().unwrap().to_string();
    for no in ["127.0.0.1", "127.0.0.0/8", &format!("127.0.0.1:{relay_port}"), "*"] {
        mib_roundtrip(&dir, &target, &base, &[("TUNNEL_PROXY", &proxy), ("NO_PROXY", no)]);
    }
    // `--proxy none` wins over TUNNEL_PROXY.
    mib_roundtrip(&dir, &target, &[&base[..], &["--proxy", "none"]].concat(), &[("TUNNEL_PROXY", &proxy)]);
    mib_roundtrip(&dir, &target, &base, &[("TUNNEL_PROXY", &proxy), ("NO_PROXY", "relay.example,10.0.0.0/8")]);
    let log = wait_count(&access, 3, connects);
    assert_eq!(connects(&log), 3, "bypassed sessions went through the proxy: {log}");

    // A listener registers through the proxy; a dialer (also proxied) reaches it by name.
    let key_file = dir.join("listener.pem");
    libtunnel::Identity::generate().save(&key_file).unwrap();
    let listen_log = dir.join("listen.log");
    let mut listen =
        tunnel_clean(&dir, &["listen", "-vv", "--relay", &relay, "--key", key_file.to_str().unwrap(), "--to", &target, "--proxy", &proxy])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&listen_log).unwrap())
            .spawn()
            .unwrap();
    let name = line_starting(&mut listen, "listening as:").trim_start_matches("listening as:").trim().to_string();
    let listener = Running(listen);
    mib_roundtrip(&dir, &format!("{name}:80"), &base, &[("TUNNEL_PROXY", &proxy)]);
    drop(listener);
    let listen_log = std::fs::read_to_string(&listen_log).unwrap();
    assert!(listen_log.contains("alice:***@") && !listen_log.contains("s3cret") && !listen_log.contains("YWxpY2U6czNjcmV0"), "{listen_log}");
    let log = wait_count(&access, 5, connects);
    assert_eq!(connects(&log), 5, "{log}");

    // Wrong password: AUTH_FAILED naming the proxy, never the password; `tunnel forward` stops
    // at once with exit code 2, as for a wrong key.
    let wrong = format!("http://alice:hunter2@127.0.0.1:{port}");
    let out = tunnel_clean(&dir, &["forward", "127.0.0.1:0", &target, "--proxy", &wrong, "--relay", &relay, "--key", &keys.key])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("error [AUTH_FAILED]") && stderr.contains(&format!("the proxy http://alice:***@127.0.0.1:{port} refused the credentials")),
        "{stderr}"
    );
    assert!(stderr.contains("407") && !stderr.contains("hunter2"), "{stderr}");
    // No credentials at all: the fix is named.
    let (code, _, stderr) = dial_with(&dir, &target, &[&base[..], &["--proxy", &format!("http://127.0.0.1:{port}")]].concat(), &[], b"");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("wants credentials: put them in the proxy URL (http://user:pass@host:port)"), "{stderr}");
    // The proxy refuses the destination: its status line.
    let (code, _, stderr) = dial_with(&dir, &target, &["--relay", "ws://127.0.0.1:9", "--key", &keys.key, "--proxy", &proxy], &[], b"");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("error [RELAY_UNAVAILABLE]") && stderr.contains("HTTP/1.1 403 Forbidden") && !stderr.contains("s3cret"), "{stderr}");
    // An unreachable proxy is named, not the relay.
    let closed = free_port();
    let (code, _, stderr) =
        dial_with(&dir, &target, &[&base[..], &["--proxy", &format!("http://alice:s3cret@127.0.0.1:{closed}")]].concat(), &[], b"");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&format!("cannot reach the proxy http://alice:***@127.0.0.1:{closed}")) && !stderr.contains("s3cret"), "{stderr}");
    // A malformed proxy URL is refused before any network I/O, without echoing it.
    let (code, _, stderr) = dial_with(&dir, &target, &base, &[("TUNNEL_PROXY", "gopher://alice:s3cret@x")], b"");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("error [INVALID_CONFIG]") && stderr.contains("TUNNEL_PROXY") && !stderr.contains("s3cret"), "{stderr}");
}

#[test]
fn socks5_with_a_password_resolves_the_relay_remotely() {
    let Some(microsocks) = proxy_program("microsocks", "microsocks") else { return };
    let dir = scratch("socks5");
    let port = free_port();
    let mut child = Command::new(microsocks)
        .args(["-i", "127.0.0.1", "-p", &port.to_string(), "-u", "bob", "-P", "pw0rd"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // microsocks logs one line per connection on stderr: keep it in a file.
    let log_path = dir.join("microsocks.log");
    let mut err = child.stderr.take().unwrap();
    let mut log_file = std::fs::File::create(&log_path).unwrap();
    std::thread::spawn(move || std::io::copy(&mut err, &mut log_file));
    let _socks = Running(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "microsocks did not listen within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let echo = echo_server();
    let keys = libtunnel::client::keys::SharedKeyText::generate(5);
    let (_relay, relay) = proxy_test_relay(&dir, echo, &keys);
    // The relay by name: the proxy, not this process, resolves it (its log shows the name).
    let relay_port = relay.rsplit(':').next().unwrap().to_string();
    let by_name = format!("ws://localhost:{relay_port}");
    let proxy = format!("socks5://bob:pw0rd@127.0.0.1:{port}");
    let base = ["--relay", by_name.as_str(), "--key", keys.key.as_str()];
    let target = echo.to_string();
    let stderr = mib_roundtrip(&dir, &target, &[&base[..], &["-vv", "--proxy", &proxy]].concat(), &[]);
    assert!(stderr.contains(&format!("socks5://bob:***@127.0.0.1:{port}")) && !stderr.contains("pw0rd"), "{stderr}");
    mib_roundtrip(&dir, &target, &base, &[("TUNNEL_PROXY", &proxy)]);
    let count = |l: &str| l.lines().filter(|l| l.contains("connected to")).count();
    let log = wait_count(&log_path, 2, count);
    assert!(log.lines().filter(|l| l.contains(&format!("connected to localhost:{relay_port}"))).count() == 2, "{log}");
    // NO_PROXY by host name: direct, no new line after a proxied session.
    mib_roundtrip(&dir, &target, &base, &[("TUNNEL_PROXY", &proxy), ("NO_PROXY", "localhost")]);
    mib_roundtrip(&dir, &target, &base, &[("TUNNEL_PROXY", &proxy)]);
    let log = wait_count(&log_path, 3, count);
    assert_eq!(count(&log), 3, "{log}");

    // Wrong password: AUTH_FAILED, exit 2 from `tunnel forward`, no password in the output.
    let wrong = format!("socks5://bob:hunter2@127.0.0.1:{port}");
    let out = tunnel_clean(&dir, &["forward", "127.0.0.1:0", &target, "--proxy", &wrong, "--relay", &by_name, "--key", &keys.key])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("error [AUTH_FAILED]")
            && stderr.contains(&format!("the SOCKS5 proxy socks5://bob:***@127.0.0.1:{port} refused the credentials")),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
    // A relay the proxy cannot reach: its SOCKS5 reply, by name.
    let closed = free_port();
    let (code, _, stderr) =
        dial_with(&dir, &target, &["--relay", &format!("ws://127.0.0.1:{closed}"), "--key", &keys.key, "--proxy", &proxy], &[], b"");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("error [RELAY_UNAVAILABLE]") && stderr.contains("connection refused (reply 5)"), "{stderr}");
}

/// dante (`danted`), the SOCKS5 server the issue names, with `socksmethod: username`: it checks
/// RFC 1929 credentials against the system's password files, so it runs in a private mount
/// namespace (`unshare -m`) where /etc/passwd and /etc/shadow are bind-mounted copies holding
/// only root, nobody and the test user `dave` (the machine's accounts are neither read nor
/// changed). Dialers (by --proxy and TUNNEL_PROXY) and a listener reach the relay through it,
/// one `tcp/connect` pass per session in its log; a wrong password is AUTH_FAILED, exit 2.
#[test]
fn dante_with_a_password_carries_dialers_and_a_listener() {
    let Some(danted) = proxy_program("danted", "dante-server") else { return };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let why = "dante test skipped: it needs root (unshare -m and bind mounts for its password files)";
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("{why}");
        if let Some(log) = std::env::var_os("LIBTUNNEL_SKIP_LOG") {
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
                let _ = writeln!(f, "{why}");
            }
        }
        return;
    }
    let dir = scratch("dante");
    let hash = Command::new("openssl").args(["passwd", "-6", "d4nte-pw"]).output().expect("openssl passwd");
    let hash = String::from_utf8_lossy(&hash.stdout).trim().to_string();
    std::fs::write(
        dir.join("passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\ndave:x:4242:4242::/nonexistent:/usr/sbin/nologin\n",
    )
    .unwrap();
    std::fs::write(dir.join("shadow"), format!("root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\ndave:{hash}:19000:0:99999:7:::\n")).unwrap();
    let port = free_port();
    let log_path = dir.join("danted.log");
    std::fs::write(
        dir.join("danted.conf"),
        format!(
            "logoutput: {log}\ninternal: 127.0.0.1 port = {port}\nexternal: 127.0.0.1\nclientmethod: none\nsocksmethod: username\n\
             user.privileged: root\nuser.unprivileged: nobody\n\
             client pass {{\n  from: 127.0.0.0/8 to: 0.0.0.0/0\n  log: error\n}}\n\
             socks pass {{\n  from: 127.0.0.0/8 to: 0.0.0.0/0\n  command: connect\n  log: connect error\n}}\n",
            log = log_path.display()
        ),
    )
    .unwrap();
    let d = dir.display();
    let script =
        format!("mount --bind {d}/passwd /etc/passwd && mount --bind {d}/shadow /etc/shadow && exec {} -f {d}/danted.conf", danted.display());
    let child = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("unshare");
    // danted's processes end with their mother; SIGTERM lets it stop them.
    struct Dante(Child);
    impl Drop for Dante {
        fn drop(&mut self) {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let _ = self.0.wait();
        }
    }
    let mut dante = Dante(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = dante.0.try_wait() {
            let mut err = String::new();
            let _ = dante.0.stderr.take().unwrap().read_to_string(&mut err);
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            panic!("danted exited ({status}) (it needs root and unshare -m): {err}{log}");
        }
        assert!(Instant::now() < deadline, "danted did not listen within 10 s: {}", std::fs::read_to_string(&log_path).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(20));
    }

    let echo = echo_server();
    let keys = libtunnel::client::keys::SharedKeyText::generate(9);
    let (_relay, relay) = proxy_test_relay(&dir, echo, &keys);
    let proxy = format!("socks5://dave:d4nte-pw@127.0.0.1:{port}");
    let base = ["--relay", relay.as_str(), "--key", keys.key.as_str()];
    let target = echo.to_string();
    let stderr = mib_roundtrip(&dir, &target, &[&base[..], &["-vv", "--proxy", &proxy]].concat(), &[]);
    assert!(stderr.contains(&format!("socks5://dave:***@127.0.0.1:{port}")) && !stderr.contains("d4nte-pw"), "{stderr}");
    mib_roundtrip(&dir, &target, &base, &[("TUNNEL_PROXY", &proxy)]);
    // A listener through dante, a dialer straight to the relay.
    let key_file = dir.join("listener.pem");
    libtunnel::Identity::generate().save(&key_file).unwrap();
    let mut listen = tunnel_clean(&dir, &["listen", "--relay", &relay, "--key", key_file.to_str().unwrap(), "--to", &target, "--proxy", &proxy])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let name = line_starting(&mut listen, "listening as:").trim_start_matches("listening as:").trim().to_string();
    let listener = Running(listen);
    mib_roundtrip(&dir, &format!("{name}:80"), &base, &[]);
    drop(listener);
    let relay_port = relay.rsplit(':').next().unwrap();
    let count =
        |l: &str| l.lines().filter(|l| l.contains("tcp/connect [: username%dave@") && l.ends_with(&format!("127.0.0.1.{relay_port}"))).count();
    let log = wait_count(&log_path, 3, count);
    assert_eq!(count(&log), 3, "{log}");

    // Wrong password: AUTH_FAILED, exit 2, the password nowhere.
    let wrong = format!("socks5://dave:hunter2@127.0.0.1:{port}");
    let out = tunnel_clean(&dir, &["forward", "127.0.0.1:0", &target, "--proxy", &wrong, "--relay", &relay, "--key", &keys.key])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("error [AUTH_FAILED]")
            && stderr.contains(&format!("the SOCKS5 proxy socks5://dave:***@127.0.0.1:{port} refused the credentials"))
            && !stderr.contains("hunter2"),
        "{stderr}"
    );
}

#[test]
fn an_https_proxy_is_reached_over_tls_with_the_given_ca() {
    let Some(squid) = proxy_program("squid", "squid") else { return };
    let dir = scratch("squid-https");
    let (cert, key) = (dir.join("proxy-cert.pem"), dir.join("proxy-key.pem"));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost", "-days", "2", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(Stdio::null())
        .status()
        .expect("openssl req");
    assert!(made.success());
    for f in [&cert, &key] {
        std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    }
    let (_squid, port, access) = start_squid(&squid, &dir, "s3cret", Some((&cert, &key)));
    let echo = echo_server();
    let keys = libtunnel::client::keys::SharedKeyText::generate(6);
    let (_relay, relay) = proxy_test_relay(&dir, echo, &keys);
    let proxy = format!("https://alice:s3cret@localhost:{port}");
    let base = ["--relay", relay.as_str(), "--key", keys.key.as_str(), "--proxy", proxy.as_str()];
    mib_roundtrip(&dir, &echo.to_string(), &[&base[..], &["--ca", cert.to_str().unwrap()]].concat(), &[]);
    let log = wait_count(&access, 1, connects);
    assert_eq!(connects(&log), 1, "{log}");
    // Without the proxy's CA: a TLS error naming the proxy and the fix.
    let (code, _, stderr) = dial_with(&dir, &echo.to_string(), &base, &[], b"");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("TLS handshake with the proxy https://alice:***@localhost:{port} failed")) && stderr.contains("--ca"),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret"), "{stderr}");
}

/// A network namespace whose only way out is squid: a veth pair links it to this one, and the
/// proxy listens on this side's address. A client inside cannot reach the relay (on this
/// namespace's loopback) directly; through the proxy, a dialer moves 1 MiB and a listener
/// serves a dialer outside.
#[test]
fn from_a_network_namespace_whose_only_way_out_is_the_proxy() {
    let Some(squid) = proxy_program("squid", "squid") else { return };
    let skip = |why: &str| {
        let why = format!("proxy namespace test skipped: {why} (needs root, unshare, nsenter and ip)");
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("{why}");
        if let Some(log) = std::env::var_os("LIBTUNNEL_SKIP_LOG") {
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
                let _ = writeln!(f, "{why}");
            }
        }
    };
    let Ok(ns) = Command::new("unshare").args(["-n", "--", "sleep", "600"]).stdin(Stdio::null()).spawn() else {
        return skip("unshare did not start");
    };
    let pid = ns.id();
    let ns = Running(ns);
    // unshare creates the namespace before it runs sleep: wait for the switch.
    let own = std::fs::read_link("/proc/self/ns/net").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_link(format!("/proc/{pid}/ns/net")).map_or(true, |l| l == own) {
        assert!(Instant::now() < deadline, "unshare -n did not create a namespace");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (outside, inside) = (format!("pxo{}", pid % 100_000), format!("pxi{}", pid % 100_000));
    let ip = |args: &[&str]| Command::new("ip").args(args).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if !ip(&["link", "add", &outside, "type", "veth", "peer", "name", &inside, "netns", &pid.to_string()]) {
        return skip("cannot create a veth pair");
    }
    // Deleting one end deletes both (and the namespace's end goes with the namespace anyway).
    struct Link(String);
    impl Drop for Link {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).stderr(Stdio::null()).status();
        }
    }
    let _link = Link(outside.clone());
    let net = format!("10.213.{}.", pid % 250);
    assert!(ip(&["addr", "add", &format!("{net}1/30"), "dev", &outside]) && ip(&["link", "set", &outside, "up"]));
    let inns =
        |args: &[&str]| Command::new("nsenter").args(["-t", &pid.to_string(), "-n", "--", "ip"]).args(args).status().is_ok_and(|s| s.success());
    assert!(
        inns(&["addr", "add", &format!("{net}2/30"), "dev", &inside]) && inns(&["link", "set", &inside, "up"]) && inns(&["link", "set", "lo", "up"])
    );

    let dir = scratch("netns");
    let (_squid, port, access) = start_squid_on(&format!("{net}1"), &squid, &dir, "s3cret", None);
    let echo = echo_server();
    let keys = libtunnel::client::keys::SharedKeyText::generate(7);
    let (_relay, relay) = proxy_test_relay(&dir, echo, &keys);
    let proxy = format!("http://alice:s3cret@{net}1:{port}");
    let base = ["--relay", relay.as_str(), "--key", keys.key.as_str()];
    let target = echo.to_string();

    // Directly: the relay is not there.
    let (code, _, stderr) = dial_in(Some(pid), &dir, &target, &base, &[], b"");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("error [RELAY_UNAVAILABLE]") && stderr.contains("cannot reach the relay"), "{stderr}");
    // Through the proxy (from TUNNEL_PROXY, as in a CI job's environment).
    mib_roundtrip_in(Some(pid), &dir, &target, &base, &[("TUNNEL_PROXY", &proxy)]);
    // A listener inside, a dialer outside (direct).
    let key_file = dir.join("listener.pem");
    libtunnel::Identity::generate().save(&key_file).unwrap();
    let service = echo_server_in(pid).to_string();
    let mut listen =
        tunnel_in(Some(pid), &dir, &["listen", "--relay", &relay, "--key", key_file.to_str().unwrap(), "--to", &service, "--proxy", &proxy])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
    let name = line_starting(&mut listen, "listening as:").trim_start_matches("listening as:").trim().to_string();
    let listener = Running(listen);
    mib_roundtrip(&dir, &format!("{name}:80"), &base, &[]);
    drop(listener);
    let log = wait_count(&access, 2, connects);
    assert_eq!(connects(&log), 2, "{log}");
    drop(ns);
}
