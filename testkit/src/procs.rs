//! Child processes of the `tunnel` binary (built by cargo for tests of `libtunnel` with the `cli`
//! feature): a relay (`tunnel server`) and listeners (`tunnel listen`) that report their address
//! or name, any `tunnel` command with a clean environment in a scratch directory, and [`Proc`], a
//! running child whose output is kept for assertions and failure messages.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// A `tunnel listen --to TO` process with a fresh key under `dir`, registered with `relay`, and
/// its name. Its stdout is kept read for its whole life, so its status lines never meet a closed
/// pipe.
pub async fn listen_process(relay: &str, to: &str, dir: &Path) -> (Child, String) {
    std::fs::create_dir_all(dir).expect("scratch dir");
    let key = dir.join("listener.pem");
    libtunnel::Identity::generate().save(&key).expect("write the listener key");
    listen_process_with(relay, &key, &["--to", to]).await
}

/// A `tunnel listen` process with the key file `key` and further `args` (`--pool`, `--exit`,
/// `--allow JSON`, `--to ADDR`, `--name N`), registered with `relay`, and its name.
pub async fn listen_process_with(relay: &str, key: &Path, args: &[&str]) -> (Child, String) {
    let mut child = Command::new(tunnel_bin())
        .args(["listen", "--relay", relay, "--key", key.to_str().expect("utf8")])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start tunnel listen");
    let mut out = tokio::io::BufReader::new(child.stdout.take().expect("stdout"));
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut tx = Some(tx);
        let mut line = String::new();
        while out.read_line(&mut line).await.is_ok_and(|n| n > 0) {
            if let Some(n) = line.trim().strip_prefix("listening as: ") {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(n.to_string());
                }
            }
            line.clear();
        }
    });
    let name = tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("tunnel listen printed its name within 10 s")
        .expect("tunnel listen exited before registering");
    (child, name)
}

/// A `tunnel server` process on loopback port 0 with the test key ([`crate::auth_keys_json`])
/// and the `TUNNEL_*` settings in `env` (a clean environment otherwise), once it printed the
/// address of every endpoint `env` asks for (`TUNNEL_HTTP_LISTEN`, `TUNNEL_TCP_LISTEN`,
/// `TUNNEL_ADMIN_LISTEN`). Its stdout is kept read for its whole life; killed when dropped.
pub struct RelayProcess {
    pub child: Child,
    /// `ws://127.0.0.1:PORT` (`wss://` when it has a certificate).
    pub url: String,
    /// The tunnel port's address.
    pub ws: SocketAddr,
    pub http: Option<SocketAddr>,
    pub tcp: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    /// The QUIC endpoint (UDP), when `TUNNEL_QUIC_LISTEN` asked for one.
    pub quic: Option<SocketAddr>,
}

impl RelayProcess {
    pub async fn start(env: &[(&str, &str)]) -> RelayProcess {
        let mut cmd = Command::new(tunnel_bin());
        cmd.arg("server").env("TUNNEL_LISTEN", "127.0.0.1:0").env("TUNNEL_AUTH_KEYS", crate::auth_keys_json());
        for (k, _) in std::env::vars() {
            if k.starts_with("TUNNEL_") || k.starts_with("EMISSARY_") || k == "RUST_LOG" || k == "NOTIFY_SOCKET" {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd
            .envs(env.iter().copied())
            .current_dir(std::env::temp_dir())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start tunnel server");
        let wants = |k: &str| env.iter().any(|(key, _)| *key == k);
        let (want_http, want_tcp, want_admin) = (wants("TUNNEL_HTTP_LISTEN"), wants("TUNNEL_TCP_LISTEN"), wants("TUNNEL_ADMIN_LISTEN"));
        let want_quic = wants("TUNNEL_QUIC_LISTEN");
        let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let (mut ws, mut http, mut tcp, mut admin, mut quic) = (None, None, None, None, None);
        let mut tls = false;
        crate::within(crate::STEP, "tunnel server to print its addresses", async {
            while ws.is_none()
                || (want_http && http.is_none())
                || (want_tcp && tcp.is_none())
                || (want_admin && admin.is_none())
                || (want_quic && quic.is_none())
            {
                let line = out.next_line().await.expect("stdout").expect("the relay exited before it listened");
                let addr =
                    |prefix: &str| line.trim().strip_prefix(prefix).map(|a| a.trim_end_matches('/').parse::<SocketAddr>().expect("an address"));
                ws = ws.or(addr("relay listening: ws://"));
                if ws.is_none() {
                    ws = addr("relay listening: wss://");
                    tls |= ws.is_some();
                }
                http = http.or(addr("public http listening: http://"));
                tcp = tcp.or(addr("raw tcp listening: tcp://"));
                admin = admin.or(addr("admin listening: http://"));
                quic = quic.or(addr("quic listening: quic://"));
            }
        })
        .await;
        tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });
        let ws = ws.expect("the tunnel address");
        let url = if tls { format!("wss://{ws}") } else { format!("ws://{ws}") };
        RelayProcess { child, url, ws, http, tcp, admin, quic }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the relay runs")
    }

    /// Send a signal by name (`TERM`, `STOP`, `-CONT`, …).
    pub fn signal(&self, sig: &str) {
        let sig = sig.trim_start_matches('-');
        assert!(std::process::Command::new("kill").args([format!("-{sig}"), self.pid().to_string()]).status().expect("kill").success());
    }

    /// File descriptors the relay has open.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map(|d| d.count()).unwrap_or(0)
    }

    /// The relay's resident memory in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
    }
}

/// A `tunnel server` process ([`RelayProcess`]) with the settings in `env`: the child and its URL.
pub async fn relay_process(env: &[(&str, &str)]) -> (Child, String) {
    let r = RelayProcess::start(env).await;
    (r.child, r.url)
}

/// The `tunnel` binary cargo built for this test run: `$LIBTUNNEL_TUNNEL_BIN`, else `target/debug/tunnel`
/// beside the test executable (`target/debug/deps/…`). Tests of `libtunnel` with the `cli`
/// feature always have it; others fail here with the command that builds it.
pub fn tunnel_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LIBTUNNEL_TUNNEL_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile = exe.parent().and_then(Path::parent).expect("the test executable lives in target/PROFILE/deps");
    let bin = profile.join("tunnel");
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build -p libtunnel --features cli --bin tunnel` (or set LIBTUNNEL_TUNNEL_BIN)",
        bin.display()
    );
    bin
}

/// A fresh, empty directory under the target dir's `tmp/` (no `.env` unless a test writes one),
/// distinct per call; kept after the run for post-mortems.
pub fn scratch(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let exe = std::env::current_exe().expect("the test executable's path");
    let target = exe.ancestors().nth(3).expect("the test executable lives in target/PROFILE/deps");
    let d = target.join("tmp").join(format!("{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create a scratch dir");
    d
}

/// `tunnel ARGS` run in `dir`, its output piped, with none of the caller's `TUNNEL_*`,
/// `EMISSARY_*`, `RUST_LOG` or `NOTIFY_SOCKET` variables: the binary sees only what a test sets.
pub fn tunnel(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(tunnel_bin());
    c.args(args).current_dir(dir).kill_on_drop(true).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("TUNNEL_") || k.starts_with("EMISSARY_") || k == "RUST_LOG" || k == "NOTIFY_SOCKET" {
            c.env_remove(k);
        }
    }
    c
}

/// Run to completion within 30 s: (status, stdout, stderr).
pub async fn run(cmd: &mut Command) -> (ExitStatus, String, String) {
    let out = crate::within(Duration::from_secs(30), "a tunnel command", cmd.output()).await.expect("run tunnel");
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A running child process (a `tunnel` command): stdout read as lines (and kept), stderr kept,
/// both shown when a wait fails; killed when dropped, so no test leaks a process.
pub struct Proc {
    name: String,
    pub child: Child,
    lines: Option<mpsc::UnboundedReceiver<String>>,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

fn keep(
    pipe: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    into: Arc<Mutex<String>>,
    lines: Option<mpsc::UnboundedSender<String>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut r = BufReader::new(pipe).lines();
        while let Ok(Some(l)) = r.next_line().await {
            {
                let mut s = into.lock().unwrap_or_else(|p| p.into_inner());
                s.push_str(&l);
                s.push('\n');
            }
            if let Some(tx) = &lines {
                let _ = tx.send(l);
            }
        }
    })
}

impl Proc {
    /// Spawn `cmd` (its stdout and stderr piped); `name` says which process a failure is about.
    pub fn spawn(name: &str, cmd: Command) -> Proc {
        Proc::start(name, cmd, true)
    }

    /// Spawn `cmd` and leave its stdout in `child.stdout` for the test to read raw bytes from.
    pub fn spawn_raw_stdout(name: &str, cmd: Command) -> Proc {
        Proc::start(name, cmd, false)
    }

    fn start(name: &str, mut cmd: Command, read_stdout: bool) -> Proc {
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let (out, err) = (Arc::new(Mutex::new(String::new())), Arc::new(Mutex::new(String::new())));
        let mut readers = Vec::new();
        if let Some(e) = child.stderr.take() {
            readers.push(keep(e, err.clone(), None));
        }
        let lines = match child.stdout.take() {
            Some(o) if read_stdout => {
                let (tx, rx) = mpsc::unbounded_channel();
                readers.push(keep(o, out.clone(), Some(tx)));
                Some(rx)
            }
            o => {
                child.stdout = o;
                None
            }
        };
        Proc { name: name.to_string(), child, lines, out, err, readers }
    }

    /// Everything it printed on stderr so far.
    pub fn stderr(&self) -> String {
        self.err.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Everything it printed on stdout so far.
    pub fn stdout(&self) -> String {
        self.out.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The rest of the next stdout line starting with `prefix` (earlier lines are skipped), within 10 s.
    pub async fn line(&mut self, prefix: &str) -> String {
        let rx = self.lines.as_mut().expect("stdout is read as lines (not spawn_raw_stdout)");
        let found = tokio::time::timeout(crate::STEP, async {
            while let Some(l) = rx.recv().await {
                if let Some(rest) = l.strip_prefix(prefix) {
                    return Some(rest.to_string());
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(rest)) => rest,
            Ok(None) => panic!("{} exited before printing {prefix:?}; stdout:\n{}\nstderr:\n{}", self.name, self.stdout(), self.stderr()),
            Err(_) => {
                panic!("{} did not print {prefix:?} within {:?}; stdout:\n{}\nstderr:\n{}", self.name, crate::STEP, self.stdout(), self.stderr())
            }
        }
    }

    /// The first stderr line for which `pick` returns something, as soon as it is printed (within 10 s).
    pub async fn stderr_line<T>(&self, what: &str, pick: impl Fn(&str) -> Option<T>) -> T {
        crate::eventually(what, || async {
            let e = self.stderr();
            e.lines().find_map(&pick).ok_or(Tail(e))
        })
        .await
    }

    /// The first stdout line so far for which `pick` returns something (within 10 s); unlike
    /// [`Proc::line`] it does not consume lines.
    pub async fn stdout_line<T>(&self, what: &str, pick: impl Fn(&str) -> Option<T>) -> T {
        crate::eventually(what, || async {
            let o = self.stdout();
            o.lines().find_map(&pick).ok_or(Tail(o))
        })
        .await
    }

    /// Wait for stderr to hold `needle` `count` times (within 10 s); returns the stderr.
    pub async fn stderr_count(&self, what: &str, needle: &str, count: usize) -> String {
        crate::eventually(what, || async {
            let e = self.stderr();
            if e.matches(needle).count() >= count {
                Ok(e)
            } else {
                Err(Tail(e))
            }
        })
        .await
    }

    /// Wait (bounded) for the process to exit and for its output to be read to the end.
    pub async fn exit(&mut self, limit: Duration) -> ExitStatus {
        let status = match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(s) => s.expect("wait for the child"),
            Err(_) => panic!("{} did not exit within {limit:?}; stderr:\n{}", self.name, self.stderr()),
        };
        for r in std::mem::take(&mut self.readers) {
            crate::within(crate::STEP, "reading the exited process's output", r).await.expect("an output reader");
        }
        status
    }

    /// Send a signal by name (`TERM`, `HUP`, `STOP`, …).
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("the process is running").to_string();
        let sig = sig.trim_start_matches('-');
        assert!(std::process::Command::new("kill").args([&format!("-{sig}"), &pid]).status().expect("kill").success(), "kill -{sig} {pid}");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        // Reap it if it is already gone; otherwise tokio's orphan reaper does.
        let _ = self.child.try_wait();
    }
}

/// The last lines of a process's output, as an [`crate::eventually`] observation.
pub struct Tail(pub String);

impl std::fmt::Debug for Tail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lines: Vec<&str> = self.0.lines().collect();
        let from = lines.len().saturating_sub(8);
        write!(f, "the last {} lines:\n{}", lines.len() - from, lines[from..].join("\n"))
    }
}
