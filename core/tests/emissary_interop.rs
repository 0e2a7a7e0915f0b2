//! Interop with Encore's Emissary (Go), both directions, against the real thing:
//!
//! 1. Emissary's own Go dialer (`emissary.NewWebsocketDialer` + `DialContext`, in the small probe
//!    program `tests/interop/emissary/dial`) → our relay (in process) → a local echo server.
//! 2. Our [`Dialer`] in classic mode → Emissary's own server (`go.encore.dev/emissary/server`, built
//!    and run as a separate process) → a local echo server.
//!
//! Emissary (MPL-2.0) is never vendored: the harness copies our Go module to a scratch directory
//! under `target/`, resolves `go.encore.dev/emissary` and `go.encore.dev/emissary/server` through
//! the Go module proxy, and builds there. Knobs:
//!
//! - `LIBTUNNEL_EMISSARY_VERSION`: module version to resolve when `go.mod` pins none (default `latest`).
//! - `LIBTUNNEL_EMISSARY_DIR`: use a local Emissary checkout instead of the proxy (a `replace`).
//! - `LIBTUNNEL_REQUIRE_EMISSARY=1`: fail instead of skipping when Go or the module is unavailable.
//!
//! When `go` is missing or the module cannot be fetched, each test prints a line starting with
//! `SKIPPED emissary interop:` and the exact error, then returns. All traffic stays on 127.0.0.1
//! (Emissary's server binds every interface, but only loopback is dialled), and every wait is bounded.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use libtunnel::auth::KeySet;
use libtunnel::relay::allowlist::Allowlist;
use libtunnel::{Dialer, ErrorCode, Key, Mode, RelayConfig, Server};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;

const KID: u32 = 7;
const SECRET: &[u8] = b"libtunnel-emissary-interop-secret";
const WRONG_SECRET: &[u8] = b"not-the-secret-the-server-knows!!";
/// Bytes pushed through each tunnel (and echoed back).
const PAYLOAD: usize = 4 * 1024 * 1024;

const EMISSARY: &str = "go.encore.dev/emissary";
const EMISSARY_SERVER: &str = "go.encore.dev/emissary/server";
/// Version used in `require` lines when a local checkout replaces the module.
const ZERO_VERSION: &str = "v0.0.0-00010101000000-000000000000";

// ---------------------------------------------------------------------------------------------
// Building the Go side (once per test binary)
// ---------------------------------------------------------------------------------------------

struct GoTools {
    /// Our probe program, linked against Emissary's dialer.
    dial: PathBuf,
    /// Emissary's own server binary.
    server: PathBuf,
    /// `go list -m` of the two Emissary modules.
    versions: String,
}

/// The built tools, or why the interop tests cannot run here (the skip reason).
fn go_tools() -> &'static Result<GoTools, String> {
    static TOOLS: OnceLock<Result<GoTools, String>> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let started = Instant::now();
        let r = build_go_tools();
        if let Ok(t) = &r {
            println!("emissary interop: Go tools ready in {:.1}s; modules:\n{}", started.elapsed().as_secs_f64(), t.versions);
        }
        r
    })
}

/// Print a skip line, and append it to `$LIBTUNNEL_SKIP_LOG` when set, so the test script's
/// summary lists every skip with its reason (libtest hides a passing test's output).
fn report_skip(line: &str) {
    println!("{line}");
    if let Some(path) = std::env::var_os("LIBTUNNEL_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// Unwrap the tools or report the skip (and return from the test).
macro_rules! tools_or_skip {
    () => {
        match go_tools() {
            Ok(t) => t,
            Err(why) => {
                if std::env::var("LIBTUNNEL_REQUIRE_EMISSARY").is_ok_and(|v| v == "1") {
                    panic!("emissary interop could not run and LIBTUNNEL_REQUIRE_EMISSARY=1: {why}");
                }
                report_skip(&format!("SKIPPED emissary interop: {why}"));
                return;
            }
        }
    };
}

fn work_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("emissary-interop")
}

fn module_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/interop/emissary")
}

fn build_go_tools() -> Result<GoTools, String> {
    match std::process::Command::new("go").arg("version").output() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err("`go` is not on PATH".into()),
        Err(e) => return Err(format!("cannot run `go version`: {e}")),
        Ok(o) if !o.status.success() => return Err(format!("`go version` failed: {}", String::from_utf8_lossy(&o.stderr).trim())),
        Ok(_) => {}
    }

    // Work on a scratch copy so `go get` / `-mod=mod` never edit the source tree.
    let work = work_dir();
    let src = work.join("module");
    let bin = work.join("bin");
    let logs = work.join("logs");
    let _ = std::fs::remove_dir_all(&src);
    for d in [&src, &bin, &logs] {
        std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("cannot create {}: {e}", d.display()));
    }
    copy_go_module(&module_source(), &src);

    let go_mod = std::fs::read_to_string(src.join("go.mod")).expect("tests/interop/emissary/go.mod");
    let pinned = go_mod.lines().any(|l| {
        let l = l.trim_start().trim_start_matches("require").trim();
        l.starts_with(&format!("{EMISSARY} ")) && !l.starts_with("//")
    });
    let fetch_limit = Duration::from_secs(300);

    if let Ok(dir) = std::env::var("LIBTUNNEL_EMISSARY_DIR") {
        let dir = std::fs::canonicalize(&dir).map_err(|e| format!("LIBTUNNEL_EMISSARY_DIR={dir}: {e}"))?;
        let edit = [
            format!("-require={EMISSARY}@{ZERO_VERSION}"),
            format!("-require={EMISSARY_SERVER}@{ZERO_VERSION}"),
            format!("-replace={EMISSARY}={}", dir.display()),
            format!("-replace={EMISSARY_SERVER}={}", dir.join("server").display()),
        ];
        let mut args = vec!["mod", "edit"];
        args.extend(edit.iter().map(String::as_str));
        let out = run_go(&src, &logs, "mod-edit", &args, Duration::from_secs(30));
        if !out.ok {
            panic!("`go mod edit` failed on the scratch module:\n{}", out.text);
        }
    } else if !pinned {
        let version = std::env::var("LIBTUNNEL_EMISSARY_VERSION").unwrap_or_else(|_| "latest".into());
        let a = format!("{EMISSARY}@{version}");
        let b = format!("{EMISSARY_SERVER}@{version}");
        let out = run_go(&src, &logs, "get", &["get", &a, &b], fetch_limit);
        if !out.ok {
            return Err(format!("fetching Emissary through the Go module proxy failed (`go get {a} {b}`):\n{}", out.text.trim()));
        }
    } else {
        let out = run_go(&src, &logs, "download", &["mod", "download", EMISSARY, EMISSARY_SERVER], fetch_limit);
        if !out.ok {
            return Err(format!("fetching the pinned Emissary modules failed (`go mod download`):\n{}", out.text.trim()));
        }
    }

    let list = run_go(
        &src,
        &logs,
        "list",
        &["list", "-m", "-f", "{{.Path}} {{.Version}}{{with .Replace}} => {{.Path}}{{end}}", EMISSARY, EMISSARY_SERVER],
        fetch_limit,
    );
    if !list.ok {
        return Err(classify_fetch(&list.text, "resolving the Emissary module versions (`go list -m`)"));
    }

    let dial = bin.join("emissary-interop-dial");
    let server = bin.join("emissary-server");
    let dial_s = dial.to_string_lossy().into_owned();
    let server_s = server.to_string_lossy().into_owned();
    for (name, args) in [
        ("build-dial", vec!["build", "-trimpath", "-o", dial_s.as_str(), "./dial"]),
        ("build-server", vec!["build", "-trimpath", "-o", server_s.as_str(), EMISSARY_SERVER]),
    ] {
        let out = run_go(&src, &logs, name, &args, fetch_limit);
        if !out.ok {
            if is_fetch_error(&out.text) {
                return Err(format!("fetching Emissary's dependencies failed (`go {}`):\n{}", args.join(" "), out.text.trim()));
            }
            // Our probe does not compile against this Emissary, or its server does not build: a
            // real failure, not a skip.
            panic!("`go {}` failed (not a download problem):\n{}", args.join(" "), out.text);
        }
    }
    Ok(GoTools { dial, server, versions: list.text.trim().to_string() })
}

fn classify_fetch(text: &str, what: &str) -> String {
    format!("{what} failed:\n{}", text.trim())
}

fn is_fetch_error(text: &str) -> bool {
    [
        "reading https://",
        "403 Forbidden",
        "404 Not Found",
        "410 Gone",
        "dial tcp",
        "no such host",
        "unknown revision",
        "invalid version",
        "verifying ",
        "i/o timeout",
        "TLS handshake",
        "module lookup disabled",
        "missing go.sum entry",
    ]
    .iter()
    .any(|p| text.contains(p))
}

/// Copy the Go sources of our probe module (only `.go`, `go.mod`, `go.sum`).
fn copy_go_module(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("cannot read {}: {e}", from.display())) {
        let entry = entry.unwrap();
        let path = entry.path();
        let dest = to.join(entry.file_name());
        if path.is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
            copy_go_module(&path, &dest);
        } else {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".go") || name == "go.mod" || name == "go.sum" {
                std::fs::copy(&path, &dest).unwrap_or_else(|e| panic!("cannot copy {}: {e}", path.display()));
            }
        }
    }
}

struct GoRun {
    ok: bool,
    text: String,
}

/// Run `go ARGS` in `dir` with output in a log file, killing it after `limit`.
fn run_go(dir: &Path, logs: &Path, name: &str, args: &[&str], limit: Duration) -> GoRun {
    let log = logs.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).unwrap();
    let mut goflags = std::env::var("GOFLAGS").unwrap_or_default();
    if !goflags.split_whitespace().any(|f| f.starts_with("-mod=")) {
        goflags = format!("{goflags} -mod=mod").trim().to_string();
    }
    let mut child = std::process::Command::new("go")
        .args(args)
        .current_dir(dir)
        .env("GOFLAGS", goflags)
        .env("GOWORK", "off")
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "0")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `go {}`: {e}", args.join(" ")));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut text = std::fs::read_to_string(&log).unwrap_or_default();
    if status.is_none() {
        text.push_str(&format!("\n(`go {}` killed after {}s)", args.join(" "), limit.as_secs()));
    }
    GoRun { ok: status.is_some_and(|s| s.success()), text }
}

// ---------------------------------------------------------------------------------------------
// Local helpers: payload, echo server, sentinel
// ---------------------------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (xorshift64*), so nothing compresses or repeats.
fn payload(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x243F_6A88_85A3_08D3;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

fn sha_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

#[derive(Debug)]
struct Echoed {
    bytes: usize,
    sha256: String,
}

/// A TCP echo server on 127.0.0.1 that reports, per connection, what it received once it ends.
struct Echo {
    addr: SocketAddr,
    done: mpsc::UnboundedReceiver<Echoed>,
}

impl Echo {
    async fn start() -> Echo {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, done) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let (mut h, mut n, mut buf) = (Sha256::new(), 0usize, vec![0u8; 64 * 1024]);
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(k) => {
                                h.update(&buf[..k]);
                                n += k;
                                if s.write_all(&buf[..k]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = tx.send(Echoed { bytes: n, sha256: hex::encode(h.finalize()) });
                });
            }
        });
        Echo { addr, done }
    }

    /// What the next finished connection received (bounded wait).
    async fn next_finished(&mut self, within: Duration) -> Option<Echoed> {
        timeout(within, self.done.recv()).await.ok().flatten()
    }
}

/// A listener that is deliberately NOT in any allowlist: nothing may ever connect to it.
struct Sentinel {
    listener: TcpListener,
    addr: SocketAddr,
}

impl Sentinel {
    async fn start() -> Sentinel {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        Sentinel { listener, addr }
    }

    async fn assert_untouched(&self, who: &str) {
        if let Ok(Ok((_, peer))) = timeout(Duration::from_millis(200), self.listener.accept()).await {
            panic!("{who} connected to a target outside the allowlist ({} from {peer})", self.addr);
        }
    }
}

/// Write `data` and read the same number of bytes back, concurrently (bounded).
async fn echo_roundtrip<S>(stream: S, data: Arc<Vec<u8>>, within: Duration) -> io::Result<Vec<u8>>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let work = async move {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let d = data.clone();
        let writer = tokio::spawn(async move {
            for c in d.chunks(32 * 1024) {
                wr.write_all(c).await?;
            }
            wr.flush().await?;
            Ok::<_, io::Error>(wr)
        });
        let mut got = vec![0u8; data.len()];
        let read = rd.read_exact(&mut got).await;
        let wr = writer.await.map_err(io::Error::other)?;
        read?;
        drop((rd, wr?));
        Ok(got)
    };
    timeout(within, work).await.map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "echo round trip timed out"))?
}

/// `RUST_LOG=libtunnel=debug` shows the relay's own log in these tests.
fn init_tracing() {
    let _ = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).with_test_writer().try_init();
}

/// Collects failed checks so one run reports every interop problem, not just the first.
#[derive(Default)]
struct Checks {
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let msg = what();
            println!("emissary interop: FAILED CHECK: {msg}");
            self.failed.push(msg);
        }
    }

    fn finish(self, direction: &str) {
        assert!(self.failed.is_empty(), "{direction}: {} check(s) failed:\n- {}", self.failed.len(), self.failed.join("\n- "));
    }
}

// ---------------------------------------------------------------------------------------------
// Emissary's Go dialer → our relay
// ---------------------------------------------------------------------------------------------

struct GoDial {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl GoDial {
    /// The probe's `ERROR: ...` line (Emissary's error text).
    fn error_line(&self) -> String {
        self.stderr.lines().find(|l| l.starts_with("ERROR: ")).unwrap_or(self.stderr.trim()).to_string()
    }
}

/// Run the Go probe: dial `target` through `url` with Emissary's dialer, send `input`, read it back.
async fn go_dial(tools: &GoTools, url: &str, target: &str, kid: u32, secret: &[u8], input: Arc<Vec<u8>>) -> GoDial {
    go_dial_chunked(tools, url, target, kid, secret, input, 32 * 1024).await
}

/// [`go_dial`] with the probe writing `chunk` bytes per `Write` (one WebSocket message each).
async fn go_dial_chunked(tools: &GoTools, url: &str, target: &str, kid: u32, secret: &[u8], input: Arc<Vec<u8>>, chunk: usize) -> GoDial {
    let (kid, chunk) = (kid.to_string(), chunk.to_string());
    let mut child = tokio::process::Command::new(&tools.dial)
        .args(["-url", url, "-target", target, "-kid", &kid, "-chunk", &chunk, "-timeout", "30s"])
        .env("EMISSARY_INTEROP_KEY", STANDARD.encode(secret))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the Go dial probe");
    let mut stdin = child.stdin.take().unwrap();
    let feeder = tokio::spawn(async move {
        let _ = stdin.write_all(&input).await;
    });
    let out = timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the Go dial probe did not finish within 60 s")
        .expect("wait for the Go dial probe");
    let _ = feeder.await;
    GoDial {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Parse `OK sent=N sha256_sent=H recv=N sha256_recv=H`.
fn parse_ok(stdout: &str) -> (usize, String, usize, String) {
    let line = stdout.lines().find(|l| l.starts_with("OK ")).unwrap_or_else(|| panic!("no OK line in {stdout:?}"));
    let field = |k: &str| {
        line.split_whitespace().find_map(|f| f.strip_prefix(&format!("{k}=")).map(str::to_string)).unwrap_or_else(|| panic!("no {k} in {line:?}"))
    };
    (field("sent").parse().unwrap(), field("sha256_sent"), field("recv").parse().unwrap(), field("sha256_recv"))
}

#[tokio::test(flavor = "multi_thread")]
async fn emissary_go_dialer_through_libtunnel_relay() {
    let tools = tools_or_skip!();
    init_tracing();
    let started = Instant::now();
    let mut echo = Echo::start().await;
    let sentinel = Sentinel::start().await;

    let allow = Allowlist::from_json(&format!(r#"[{{"host": "127.0.0.1", "port": {}}}]"#, echo.addr.port()), "test allowlist").expect("allowlist");
    let keys = KeySet::new([Key::new(KID, SECRET.to_vec()).unwrap()]).unwrap();
    let mut cfg = RelayConfig::new(keys, allow);
    cfg.limits.drain_timeout = Duration::from_secs(2);
    let relay = Server::bind(cfg).await.expect("bind relay").spawn();
    let url = format!("{}/", relay.url());
    let target = echo.addr.to_string();
    let mut checks = Checks::default();

    // 1. Bytes in == bytes out, through Emissary's dialer and our relay, written the way io.Copy
    //    from a socket writes (32 KiB WebSocket messages) and as one 4 MiB message (an app calling
    //    conn.Write with a big buffer; Emissary sets no read limit).
    let data = Arc::new(payload(PAYLOAD));
    let want = sha_hex(&data);
    for chunk in [32 * 1024, PAYLOAD] {
        let r = go_dial_chunked(tools, &url, &target, KID, SECRET, data.clone(), chunk).await;
        checks.check(r.ok, || {
            let why = if chunk > 1024 * 1024 {
                " [COMPATIBILITY GAP: Emissary's server sets no WebSocket read limit, libtunnel's relay refuses messages over \
                 transport::MAX_MESSAGE (1 MiB) and drops the TCP connection]"
            } else {
                ""
            };
            format!(
                "INTEROP FAILURE (Emissary Go dialer -> libtunnel relay, {chunk}-byte writes){why}: {}\nstdout: {}\nstderr: {}",
                r.error_line(),
                r.stdout,
                r.stderr
            )
        });
        if !r.ok {
            continue;
        }
        let (sent, sha_sent, recv, sha_recv) = parse_ok(&r.stdout);
        assert_eq!((sent, sha_sent.as_str()), (PAYLOAD, want.as_str()), "the Go probe did not send what we gave it");
        checks.check(recv == PAYLOAD && sha_recv == want, || {
            format!("INTEROP FAILURE (Emissary Go dialer -> libtunnel relay, {chunk}-byte writes): got {recv} bytes sha256 {sha_recv}, want {PAYLOAD} bytes sha256 {want}")
        });
        match echo.next_finished(Duration::from_secs(10)).await {
            Some(seen) => checks.check(seen.bytes == PAYLOAD && seen.sha256 == want, || {
                format!("the target received {} bytes sha256 {}, want {PAYLOAD} bytes sha256 {want}", seen.bytes, seen.sha256)
            }),
            None => checks
                .check(false, || "INTEROP FAILURE: the relay did not close the target connection within 10 s after Emissary's dialer closed".into()),
        }
        println!("emissary interop: Go dialer -> libtunnel relay ({chunk}-byte writes): {PAYLOAD} bytes each way, sha256 {want}");
    }

    // 2. Wrong secret for a known key id: Emissary's client reports the RFC 1929 failure.
    let small = Arc::new(b"hello".to_vec());
    let r = go_dial(tools, &url, &target, KID, WRONG_SECRET, small.clone()).await;
    assert!(!r.ok, "a wrong secret was accepted by our relay: {}", r.stdout);
    checks.check(r.error_line().contains("username/password authentication failed"), || {
        format!("INTEROP FAILURE: wrong secret should give Go's \"username/password authentication failed\"; got: {}", r.error_line())
    });
    println!("emissary interop: wrong secret -> {}", r.error_line());

    // 3. Unknown key id: same RFC 1929 failure (Emissary's protocol has no separate code for it).
    let r = go_dial(tools, &url, &target, KID + 1, SECRET, small.clone()).await;
    assert!(!r.ok, "an unknown key id was accepted by our relay: {}", r.stdout);
    checks.check(r.error_line().contains("username/password authentication failed"), || {
        format!("INTEROP FAILURE: unknown key id should give Go's \"username/password authentication failed\"; got: {}", r.error_line())
    });

    // 4. Target outside the allowlist: SOCKS5 reply 0x02, which Go spells out.
    let r = go_dial(tools, &url, &sentinel.addr.to_string(), KID, SECRET, small.clone()).await;
    assert!(!r.ok, "our relay let Emissary's dialer reach a target outside the allowlist: {}", r.stdout);
    checks.check(r.error_line().contains("connection not allowed by ruleset"), || {
        format!("INTEROP FAILURE: a disallowed target should give Go's \"connection not allowed by ruleset\"; got: {}", r.error_line())
    });
    sentinel.assert_untouched("our relay").await;
    println!("emissary interop: disallowed target -> {}", r.error_line());

    timeout(Duration::from_secs(10), relay.shutdown()).await.expect("relay shutdown within 10 s").expect("relay shutdown");
    println!("emissary interop: Go dialer -> libtunnel relay finished in {:.2}s", started.elapsed().as_secs_f64());
    checks.finish("Emissary Go dialer -> libtunnel relay");
}

// ---------------------------------------------------------------------------------------------
// Our dialer → Emissary's server
// ---------------------------------------------------------------------------------------------

/// Emissary's server process; killed when dropped.
struct EmissaryServer {
    child: tokio::process::Child,
    port: u16,
    log: PathBuf,
}

impl Drop for EmissaryServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl EmissaryServer {
    async fn start(tools: &GoTools, keys: &[(u32, &[u8])], targets: &[SocketAddr]) -> EmissaryServer {
        let port = free_port();
        // An empty working directory: Emissary also reads `./.env` and `./config`.
        let dir = work_dir().join(format!("server-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("emissary.log");
        let file = std::fs::File::create(&log).unwrap();
        let keys_json =
            serde_json::Value::Array(keys.iter().map(|(kid, secret)| serde_json::json!({"kid": kid, "data": STANDARD.encode(secret)})).collect());
        let targets_json =
            serde_json::Value::Array(targets.iter().map(|a| serde_json::json!({"host": a.ip().to_string(), "port": a.port()})).collect());
        let mut cmd = tokio::process::Command::new(&tools.server);
        for (k, _) in std::env::vars() {
            if k.starts_with("EMISSARY_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .current_dir(&dir)
            .env("EMISSARY_HTTP_PORT", port.to_string())
            .env("EMISSARY_TCP_PORT", "0")
            .env("EMISSARY_AUTH_KEYS", keys_json.to_string())
            .env("EMISSARY_ALLOWED_PROXY_TARGETS", targets_json.to_string())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("start Emissary's server");
        let mut server = EmissaryServer { child, port, log };
        server.wait_healthy().await;
        server
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Poll `GET /healthz` every 50 ms for up to 30 s.
    async fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((200, body)) = http_get(self.port, "/healthz").await {
                println!("emissary interop: Emissary server up on 127.0.0.1:{}; /healthz -> {}", self.port, body.trim());
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("Emissary's server exited ({status}) before becoming healthy; its log:\n{}", self.log_text());
            }
            if Instant::now() >= deadline {
                panic!("Emissary's server was not healthy on port {} within 30 s; its log:\n{}", self.port, self.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A minimal HTTP/1.1 GET on 127.0.0.1 (1 s bound): `(status, body)`.
async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let work = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Some((status, body))
    };
    timeout(Duration::from_secs(1), work).await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread")]
async fn libtunnel_dialer_through_emissary_server() {
    let tools = tools_or_skip!();
    init_tracing();
    let started = Instant::now();
    let mut echo = Echo::start().await;
    let sentinel = Sentinel::start().await;
    let server = EmissaryServer::start(tools, &[(KID, SECRET)], &[echo.addr]).await;
    let url = format!("ws://127.0.0.1:{}/", server.port);
    let target = echo.addr.to_string();
    let log = server.log.clone();
    let emissary_log = move || std::fs::read_to_string(&log).unwrap_or_default();
    let mut checks = Checks::default();

    let classic = |key: Key| Dialer::builder(&url).key(key).mode(Mode::Classic).timeout(Duration::from_secs(20)).build().unwrap();

    // 1. Bytes in == bytes out, through our dialer and Emissary's server.
    let dialer = classic(Key::new(KID, SECRET.to_vec()).unwrap());
    let stream = dialer.dial(&target).await.unwrap_or_else(|e| {
        panic!("INTEROP FAILURE (libtunnel dialer -> Emissary server): dial failed: [{}] {e}\nEmissary log:\n{}", e.code(), emissary_log())
    });
    let data = Arc::new(payload(PAYLOAD));
    let want = sha_hex(&data);
    let got = echo_roundtrip(stream, data.clone(), Duration::from_secs(30)).await.unwrap_or_else(|e| {
        panic!("INTEROP FAILURE (libtunnel dialer -> Emissary server): echo round trip failed: {e}\nEmissary log:\n{}", emissary_log())
    });
    checks
        .check(sha_hex(&got) == want, || format!("INTEROP FAILURE (libtunnel dialer -> Emissary server): got sha256 {}, want {want}", sha_hex(&got)));
    match echo.next_finished(Duration::from_secs(10)).await {
        Some(seen) => checks.check(seen.bytes == PAYLOAD && seen.sha256 == want, || {
            format!("the target received {} bytes sha256 {}, want {PAYLOAD} bytes sha256 {want}", seen.bytes, seen.sha256)
        }),
        None => checks.check(false, || "Emissary did not close the target connection within 10 s after our dialer closed the tunnel".into()),
    }
    println!("emissary interop: libtunnel dialer -> Emissary server: {PAYLOAD} bytes each way, sha256 {want}");

    // 2. Wrong secret for the right key id, and 3. an unknown key id: Emissary (armon/go-socks5)
    //    answers the RFC 1929 sub-negotiation with status 0x01 (bytes 01 01) in both cases.
    for (what, key) in
        [("wrong secret", Key::new(KID, WRONG_SECRET.to_vec()).unwrap()), ("unknown key id", Key::new(KID + 1, SECRET.to_vec()).unwrap())]
    {
        match classic(key).dial(&target).await {
            Ok(_) => checks.check(false, || format!("Emissary accepted a {what}?!")),
            Err(e) => {
                println!("emissary interop: {what} -> [{}] {e}", e.code());
                checks.check(e.code() == ErrorCode::AuthFailed, || {
                    format!("INTEROP FAILURE (libtunnel dialer -> Emissary server): {what} gave [{}] {e}; want AUTH_FAILED", e.code())
                });
            }
        }
    }

    // 4. Target outside Emissary's allowlist: SOCKS5 reply 0x02.
    match classic(Key::new(KID, SECRET.to_vec()).unwrap()).dial(&sentinel.addr.to_string()).await {
        Ok(_) => checks.check(false, || "Emissary let us reach a target outside its allowlist?!".into()),
        Err(e) => {
            println!("emissary interop: disallowed target -> [{}] {e}", e.code());
            checks.check(e.code() == ErrorCode::NotAllowed, || {
                format!("INTEROP FAILURE (libtunnel dialer -> Emissary server): disallowed target gave [{}] {e}; want NOT_ALLOWED", e.code())
            });
        }
    }
    sentinel.assert_untouched("Emissary").await;

    // 5. Multiplexed mode cannot work against Emissary; it must fail fast and say why, not hang.
    let mux = Dialer::builder(&url).key(Key::new(KID, SECRET.to_vec()).unwrap()).timeout(Duration::from_secs(10)).build().unwrap();
    match mux.dial(&target).await {
        Ok(_) => checks.check(false, || "multiplexed mode against Emissary succeeded?!".into()),
        Err(e) => {
            println!("emissary interop: multiplexed mode against Emissary -> [{}] {e}", e.code());
            checks.check(e.code() == ErrorCode::Protocol, || {
                format!("multiplexed mode against Emissary should be a PROTOCOL error naming classic mode; got [{}] {e}", e.code())
            });
        }
    }

    server.stop().await;
    println!("emissary interop: libtunnel dialer -> Emissary server finished in {:.2}s", started.elapsed().as_secs_f64());
    checks.finish("libtunnel dialer -> Emissary server");
}

// ---------------------------------------------------------------------------------------------
// Our relay's RFC 1929 answer, byte for byte (no Go needed)
// ---------------------------------------------------------------------------------------------

/// Emissary's server (armon/go-socks5 `UserPassAuthenticator`) answers the RFC 1929
/// sub-negotiation with `01 00` on success and `01 01` on failure (SEEDS.md §1.2 step 6, §6 item 4).
/// Go's client accepts any non-zero status as failure, so a different failure byte still
/// interoperates with Emissary's dialer; this pins the bytes themselves.
#[tokio::test(flavor = "multi_thread")]
async fn relay_rfc1929_answers_match_emissary_bytes() {
    init_tracing();
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let allow = Allowlist::from_json(r#"[{"host": "127.0.0.1", "port": 9}]"#, "test allowlist").unwrap();
    let key = Key::new(KID, SECRET.to_vec()).unwrap();
    let mut cfg = RelayConfig::new(KeySet::new([key.clone()]).unwrap(), allow);
    cfg.limits.drain_timeout = Duration::from_secs(2);
    let relay = Server::bind(cfg).await.expect("bind relay").spawn();

    // Classic mode, by hand: preamble, greeting (05 02 00 02), then credentials.
    async fn auth_answer(url: &str, key: &Key) -> Vec<u8> {
        let work = async {
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.expect("WebSocket upgrade");
            let pre = loop {
                match ws.next().await.expect("preamble").expect("preamble") {
                    Message::Binary(b) => break b,
                    Message::Ping(_) | Message::Pong(_) => continue,
                    m => panic!("unexpected preamble message {m:?}"),
                }
            };
            assert!(pre.len() < 1024, "preamble is {} bytes; Emissary's client reads it with one 1024-byte read", pre.len());
            let nonce = libtunnel::protocol::ServerConnect::decode_checked(&pre).expect("preamble decodes");
            let (date, sig) = key.sign(&nonce, std::time::SystemTime::now());
            let mut creds = vec![0x01, date.len() as u8];
            creds.extend_from_slice(date.as_bytes());
            creds.push(sig.len() as u8);
            creds.extend_from_slice(sig.as_bytes());
            ws.send(Message::Binary(vec![0x05, 0x02, 0x00, 0x02].into())).await.unwrap();
            ws.send(Message::Binary(creds.into())).await.unwrap();
            // Greeting answer (2 bytes) then the RFC 1929 answer (2 bytes); boundaries mean nothing.
            let mut got = Vec::new();
            while got.len() < 4 {
                match ws.next().await {
                    Some(Ok(Message::Binary(b))) => got.extend_from_slice(&b),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    _ => break,
                }
            }
            got
        };
        timeout(Duration::from_secs(10), work).await.expect("relay answered within 10 s")
    }

    let url = format!("{}/", relay.url());
    let good = auth_answer(&url, &key).await;
    let bad = auth_answer(&url, &Key::new(KID, WRONG_SECRET.to_vec()).unwrap()).await;
    timeout(Duration::from_secs(10), relay.shutdown()).await.expect("relay shutdown within 10 s").expect("relay shutdown");

    assert_eq!(good, [0x05, 0x02, 0x01, 0x00], "greeting + RFC 1929 success answer");
    assert_eq!(bad, [0x05, 0x02, 0x01, 0x01], "WIRE DIFFERENCE FROM EMISSARY (core/src): RFC 1929 failure answer should be 01 01 as Emissary sends");
}

// ---------------------------------------------------------------------------------------------
// The documented test vector (../shared/SEEDS.md section 6)
// ---------------------------------------------------------------------------------------------

/// Emissary's signer (`internal/auth.SignRequest`) is in an `internal` package and always signs
/// `time.Now()`, so the fixed-date vector cannot be computed through Emissary's code. The live
/// cross-check is the two tests above: Emissary's server accepts our signature and our relay
/// accepts Emissary's. This pins the documented vector through the public API.
#[test]
fn documented_test_vector() {
    let key = Key::new(7, b"emissary-test-key-0123456789abcd".to_vec()).unwrap();
    let nonce: Vec<u8> = (1u8..=32).collect();
    assert_eq!(key.sign_with_date(&nonce, "Tue, 30 Jan 2024 10:00:00 GMT"), "AAAABw2s4eJLOs+fbxqIxkU89y2DI0kK3uMbOe2SAPxe5YIz");
    assert_eq!(STANDARD.encode(key.secret()), "ZW1pc3NhcnktdGVzdC1rZXktMDEyMzQ1Njc4OWFiY2Q=");
}
