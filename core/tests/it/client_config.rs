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
