//! Real C programs against the built `libtunnel.so` / `libtunnel.a` and `include/tunnel.h`:
//! compiled by the system `cc` with `-Wall -Wextra -Werror -pedantic` (and AddressSanitizer),
//! run against a live relay on loopback started here, their TAP output checked. The examples
//! run under valgrind, and `ffi/install.mk` installs into a temp prefix that pkg-config then
//! builds an example from. The library must be built first (`scripts/test-c.sh` does it).
//! Every wait is bounded.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use libtunnel::ServerHandle;
use testkit::{allow_ports, auth_keys_json, closed_port, echo_server, key_string, relay_config, start_relay, KID};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::Command;

/// A secret the relay does not hold, under the test key's id.
const WRONG_B64: &str = "bm90LXRoZS1yaWdodC1zZWNyZXQ=";
/// Bound for one C program (valgrind is slow).
const RUN: Duration = Duration::from_secs(180);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where cargo put `libtunnel.so` / `libtunnel.a` (override with `LIBTUNNEL_LIB_DIR`).
fn built_lib_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LIBTUNNEL_LIB_DIR") {
        return PathBuf::from(d);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"));
    target.join("debug")
}

/// A private lib dir with the shared library under its SONAME (`libtunnel.so.0.1`) plus the
/// `libtunnel.so` link name, and the static library; made once per test process.
fn lib_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let src = built_lib_dir();
        for f in ["libtunnel.so", "libtunnel.a"] {
            assert!(src.join(f).exists(), "{} is missing: run `cargo build -p libtunnel-ffi` first (scripts/test-c.sh does)", src.join(f).display());
        }
        let dir = scratch("lib");
        let soname = format!("libtunnel.so.{}.{}", env!("CARGO_PKG_VERSION_MAJOR"), env!("CARGO_PKG_VERSION_MINOR"));
        // Links, not copies: the debug libraries are hundreds of MiB.
        std::os::unix::fs::symlink(src.join("libtunnel.so"), dir.join(&soname)).expect("link the SONAME");
        std::os::unix::fs::symlink(&soname, dir.join("libtunnel.so")).expect("link libtunnel.so");
        std::os::unix::fs::symlink(src.join("libtunnel.a"), dir.join("libtunnel.a")).expect("link libtunnel.a");
        dir
    })
}

/// A fresh directory under the target dir, emptied at the start of each run and kept after it
/// (for post-mortems); one per test, so concurrent tests never share one.
fn scratch(name: &str) -> PathBuf {
    let base = built_lib_dir().join("c-tests").join(name);
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).expect("create scratch dir");
    base
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Link {
    Shared,
    Static,
}

/// Compile C sources into `out` with the strict flags, against include/ and the library.
fn compile(sources: &[&str], out: &Path, link: Link, asan: bool) {
    let root = root();
    let mut cmd = std::process::Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()));
    cmd.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-g", "-O1"]).arg("-I").arg(root.join("include"));
    if asan {
        cmd.args(["-fsanitize=address", "-fno-omit-frame-pointer"]);
    }
    for s in sources {
        cmd.arg(root.join(s));
    }
    cmd.arg("-o").arg(out);
    match link {
        Link::Shared => {
            cmd.arg(format!("-L{}", lib_dir().display())).arg("-ltunnel").arg(format!("-Wl,-rpath,{}", lib_dir().display()));
        }
        Link::Static => {
            cmd.arg(lib_dir().join("libtunnel.a")).args(["-lpthread", "-ldl", "-lm", "-lrt", "-lutil", "-lgcc_s"]);
        }
    }
    let o = cmd.output().expect("run cc");
    assert!(o.status.success(), "cc {sources:?} ({link:?}) failed:\n{}", String::from_utf8_lossy(&o.stderr));
}

/// Run a program with a deadline; returns its output.
async fn run(mut cmd: Command, what: &str) -> Output {
    cmd.kill_on_drop(true).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    match tokio::time::timeout(RUN, cmd.output()).await {
        Ok(o) => o.unwrap_or_else(|e| panic!("cannot run {what}: {e}")),
        Err(_) => panic!("{what} did not finish within {RUN:?}"),
    }
}

fn show(o: &Output) -> String {
    format!("status: {}\n--- stdout\n{}\n--- stderr\n{}", o.status, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// 64-bit FNV-1a, as tests/c/check.h computes it.
fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Reads until EOF, then answers `LEN FNVHEX\n` and closes.
async fn sink_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut h, mut n, mut buf) = (0xcbf29ce484222325u64, 0usize, vec![0u8; 65536]);
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(k) => {
                            h = fnv1a(h, &buf[..k]);
                            n += k;
                        }
                        Err(_) => return,
                    }
                }
                let _ = s.write_all(format!("{n} {h:016x}\n").as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// A relay on loopback that allows exactly `ports` on 127.0.0.1 and any listener key.
async fn relay(ports: &[u16]) -> ServerHandle {
    let mut cfg = relay_config(allow_ports(ports));
    cfg.listeners_open = true;
    start_relay(cfg).await
}

/// microsocks (a SOCKS5 proxy) on a free loopback port, user `carol` with `password`; `None`
/// (and the reason, on stderr and in `LIBTUNNEL_SKIP_LOG`) when it is not installed, a failure
/// under CI. Killed when dropped.
async fn microsocks(password: &str) -> Option<(tokio::process::Child, u16)> {
    let path = std::env::var("PATH").unwrap_or_default();
    let Some(exe) = path.split(':').map(|d| Path::new(d).join("microsocks")).find(|p| p.is_file()) else {
        let why = "C proxy checks skipped: microsocks not installed (apt-get install microsocks; scripts/test-c.sh does)";
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("{why}");
        if let Some(log) = std::env::var_os("LIBTUNNEL_SKIP_LOG") {
            let _ = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .map(|mut f| std::io::Write::write_all(&mut f, format!("{why}\n").as_bytes()));
        }
        return None;
    };
    let port = closed_port().await;
    let child = Command::new(exe)
        .args(["-i", "127.0.0.1", "-p", &port.to_string(), "-u", "carol", "-P", password])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start microsocks");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "microsocks did not listen within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Some((child, port))
}

async fn client_suite(link: Link) {
    let dir = scratch(&format!("client-{link:?}"));
    let exe = dir.join("test_client");
    compile(&["tests/c/test_client.c"], &exe, link, true);
    let (echo, sink) = (echo_server().await, sink_server().await);
    let relay = relay(&[echo.port(), sink.port()]).await;
    // An exit listener's key, and a grant letting the test key dial via it.
    let exit_key = dir.join("exit.pem");
    let exit_id = libtunnel::Identity::generate();
    exit_id.save(&exit_key).expect("write the exit key");
    let mut cfg = relay_config(allow_ports(&[echo.port(), sink.port()]));
    cfg.listeners_open = true;
    cfg.exits = vec![libtunnel::config::ExitGrant { name: exit_id.name(), key_ids: vec![KID] }];
    relay.reload(&cfg).expect("reload with the exit grant");
    let denied = format!("127.0.0.1:{}", closed_port().await);
    let down = format!("ws://127.0.0.1:{}", closed_port().await);
    let mut cmd = Command::new(&exe);
    cmd.env("TEST_RELAY", relay.url())
        .env("TEST_KEY", key_string())
        .env("TEST_WRONG_KEY", format!("{KID}:{WRONG_B64}"))
        .env("TEST_ECHO", echo.to_string())
        .env("TEST_SINK", sink.to_string())
        .env("TEST_DENIED", &denied)
        .env("TEST_DOWN", &down)
        .env("TEST_IDENTITY", dir.join("listener.pem"))
        .env("TEST_EXIT_IDENTITY", &exit_key)
        .env("ASAN_OPTIONS", "detect_leaks=1:fast_unwind_on_malloc=0");
    // The relay through a SOCKS5 proxy with a password (tunnel_config_set_proxy).
    let socks = microsocks("c-pr0xy-pw").await;
    if let Some((_, port)) = &socks {
        cmd.env("TEST_PROXY", format!("socks5://carol:c-pr0xy-pw@127.0.0.1:{port}"))
            .env("TEST_BAD_PROXY", format!("socks5://carol:wr0ng-pw@127.0.0.1:{port}"))
            .env("TEST_BAD_PROXY_PASSWORD", "wr0ng-pw");
    }
    let o = run(cmd, "test_client").await;
    println!("{}", show(&o));
    assert!(o.status.success(), "test_client ({link:?}) failed:\n{}", show(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("not ok"));
    if socks.is_some() {
        assert!(String::from_utf8_lossy(&o.stdout).contains("wrong proxy password"), "the proxy checks did not run:\n{}", show(&o));
    }
    relay.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_shared_asan() {
    client_suite(Link::Shared).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_static_asan() {
    client_suite(Link::Static).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_relay_start_stop_100_times_shared_and_static() {
    for link in [Link::Shared, Link::Static] {
        let dir = scratch(&format!("server-{link:?}"));
        let exe = dir.join("test_server");
        compile(&["tests/c/test_server.c"], &exe, link, true);
        let mut cmd = Command::new(&exe);
        cmd.env("TEST_KEY_JSON", auth_keys_json()).env("TEST_KEY", key_string());
        let o = run(cmd, "test_server").await;
        println!("{}", show(&o));
        assert!(o.status.success(), "test_server ({link:?}) failed:\n{}", show(&o));
    }
}

/// `valgrind` with leak checking that fails on definite leaks and memory errors.
fn valgrind(exe: &Path) -> Command {
    let mut c = Command::new("valgrind");
    c.args(["--quiet", "--leak-check=full", "--show-leak-kinds=definite", "--errors-for-leak-kinds=definite", "--error-exitcode=99"]).arg(exe);
    c
}

/// Start the embedded-relay example (under valgrind) and read the URL it prints.
async fn start_relay_example(exe: &Path, echo: SocketAddr) -> (tokio::process::Child, String) {
    let mut cmd = valgrind(exe);
    cmd.arg("listen=127.0.0.1:0")
        .arg(format!("auth_keys={}", auth_keys_json()))
        .arg(format!(r#"allow=[{{"host":"127.0.0.1","port":{}}}]"#, echo.port()))
        .arg("listeners_open=true")
        .kill_on_drop(true)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run the relay example");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = tokio::time::timeout(RUN, lines.next_line()).await.expect("the relay example prints its URL in time").expect("read");
    let url = first.and_then(|l| l.strip_prefix("relay listening: ").map(str::to_string)).expect("`relay listening: URL` line");
    (child, url)
}

/// Run the dial example (under valgrind) with `input` on stdin; returns its output.
async fn dial_example(exe: &Path, relay: &str, target: &str, input: &[u8]) -> Output {
    let mut cmd = valgrind(exe);
    cmd.arg(target).env("TUNNEL_RELAY", relay).env("TUNNEL_KEY", key_string());
    cmd.kill_on_drop(true).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run dial");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input).await.expect("feed dial");
    drop(stdin);
    tokio::time::timeout(RUN, child.wait_with_output()).await.expect("dial finishes in time").expect("dial output")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn examples_run_clean_under_valgrind() {
    let dir = scratch("examples");
    let exes: Vec<PathBuf> = ["dial", "listen_echo", "relay"]
        .iter()
        .map(|name| {
            let exe = dir.join(name);
            compile(&[&format!("examples/c/{name}.c")], &exe, Link::Shared, false);
            exe
        })
        .collect();
    let echo = echo_server().await;
    let (mut relay, url) = start_relay_example(&exes[2], echo).await;

    // dial -> embedded relay -> echo server, with half-close at stdin's EOF.
    let input: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let o = dial_example(&exes[0], &url, &echo.to_string(), &input).await;
    assert!(o.status.success() && o.stdout == input, "dial example through the relay example:\n{}", show(&o));

    // dial -> relay -> listen_echo, which stops at its stdin's EOF.
    let mut listen = valgrind(&exes[1]);
    listen.arg(dir.join("listener.pem")).env("TUNNEL_RELAY", &url);
    listen.kill_on_drop(true).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut listen = listen.spawn().expect("run listen_echo");
    let mut lines = BufReader::new(listen.stdout.take().expect("stdout")).lines();
    let first = tokio::time::timeout(RUN, lines.next_line()).await.expect("listen_echo registers in time").expect("read");
    let name = first.and_then(|l| l.strip_prefix("listening as: ").map(str::to_string)).expect("`listening as: NAME` line");
    let o = dial_example(&exes[0], &url, &format!("{name}:0"), b"hello\nsecond line\n").await;
    assert!(o.status.success() && o.stdout == b"hello\nsecond line\n", "dial example to listen_echo:\n{}", show(&o));
    drop(listen.stdin.take());
    let lo = tokio::time::timeout(RUN, listen.wait_with_output()).await.expect("listen_echo exits").expect("output");
    assert!(lo.status.success(), "listen_echo under valgrind:\n{}", show(&lo));

    // A refused dial exits 1 with the code and the cause.
    let o = dial_example(&exes[0], &url, "127.0.0.1:1", b"").await;
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.code() == Some(1) && err.contains("error [NOT_ALLOWED]") && err.contains("127.0.0.1:1"), "refused dial:\n{}", show(&o));

    drop(relay.stdin.take()); // EOF: the relay example stops and exits
    let ro = tokio::time::timeout(RUN, relay.wait_with_output()).await.expect("relay example exits").expect("output");
    assert!(ro.status.success(), "relay example under valgrind:\n{}", show(&ro));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn make_install_then_pkg_config_build() {
    let prefix = scratch("prefix");
    let o = std::process::Command::new("make")
        .arg("-f")
        .arg(root().join("ffi/install.mk"))
        .arg("install")
        .arg(format!("PREFIX={}", prefix.display()))
        // The debug build the other tests use (install always goes through cargo, which finds
        // it current); a release build here would only cost CI minutes.
        .arg("PROFILE=debug")
        .arg(format!("BUILT={}", built_lib_dir().display()))
        .output()
        .expect("run make");
    assert!(o.status.success(), "make install failed:\n{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    for f in ["include/tunnel.h", "lib/libtunnel.a", "lib/libtunnel.so", "lib/pkgconfig/tunnel.pc"] {
        assert!(prefix.join(f).exists(), "make install did not install {f}");
    }
    let pc = std::process::Command::new("pkg-config")
        .args(["--cflags", "--libs", "tunnel"])
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
        .output()
        .expect("run pkg-config");
    assert!(pc.status.success(), "pkg-config: {}", String::from_utf8_lossy(&pc.stderr));
    let flags = String::from_utf8(pc.stdout).expect("utf-8");
    let exe = prefix.join("dial");
    let o = std::process::Command::new("cc")
        .args(["-Wall", "-Wextra", "-Werror", "-pedantic"])
        .arg(root().join("examples/c/dial.c"))
        .arg("-o")
        .arg(&exe)
        .args(flags.split_whitespace())
        .arg(format!("-Wl,-rpath,{}", prefix.join("lib").display()))
        .output()
        .expect("run cc");
    assert!(o.status.success(), "cc dial.c $(pkg-config --cflags --libs tunnel) failed:\n{}", String::from_utf8_lossy(&o.stderr));

    let echo = echo_server().await;
    let relay = relay(&[echo.port()]).await;

    // Every C program of every README, built the same way and run as pasted (its placeholders
    // filled by scripts/readme_blocks.py, which finds the blocks): exit 0, nothing on stderr.
    let key = key_string();
    let o = std::process::Command::new("python3")
        .arg(root().join("scripts/readme_blocks.py"))
        .args(["c".as_ref(), prefix.join("readme").as_os_str()])
        .args([relay.url(), key.as_str(), &echo.to_string()])
        .output()
        .expect("run python3 scripts/readme_blocks.py");
    assert!(o.status.success(), "readme_blocks.py c:\n{}", show(&o));
    let sources = String::from_utf8(o.stdout).expect("utf-8");
    assert!(sources.lines().count() >= 2, "the C blocks of README.md and ffi/README.md: {sources}");
    for src in sources.lines() {
        let exe = PathBuf::from(src).with_extension("");
        let o = std::process::Command::new("cc")
            .args(["-Wall", "-Wextra", "-Werror", "-pedantic"])
            .arg(src)
            .arg("-o")
            .arg(&exe)
            .args(flags.split_whitespace())
            .arg(format!("-Wl,-rpath,{}", prefix.join("lib").display()))
            .output()
            .expect("run cc");
        assert!(o.status.success(), "the README's C program {src} does not build:\n{}", String::from_utf8_lossy(&o.stderr));
        let mut cmd = Command::new(&exe);
        cmd.env("TUNNEL_KEY", &key).env_remove("TUNNEL_RELAY").kill_on_drop(true).stdin(Stdio::null());
        let o = tokio::time::timeout(RUN, cmd.output()).await.expect("the README's program exits").expect("run it");
        assert!(o.status.success() && o.stderr.is_empty(), "the README's C program {src}:\n{}", show(&o));
    }

    let mut cmd = Command::new(&exe);
    cmd.arg(echo.to_string()).env("TUNNEL_RELAY", relay.url()).env("TUNNEL_KEY", key_string());
    cmd.kill_on_drop(true).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run installed dial");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"installed\n").await.expect("write");
    drop(stdin);
    let o = tokio::time::timeout(RUN, child.wait_with_output()).await.expect("dial exits").expect("output");
    assert!(o.status.success() && o.stdout == b"installed\n", "installed dial:\n{}", show(&o));
    relay.abort();
}

/// tests/c/test_e2e.c: an e2e listener admitting one dialer key and an e2e dialer holding it,
/// 4 MiB by name echoed and hashed from C, and a keyless dialer refused with E2E_REFUSED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_dial_by_name_from_c() {
    let dir = scratch("e2e");
    let exe = dir.join("test_e2e");
    compile(&["tests/c/test_e2e.c"], &exe, Link::Shared, true);
    let relay = relay(&[9]).await;
    let (listener, dialer) = (libtunnel::Identity::generate(), libtunnel::Identity::generate());
    let (lid, did) = (dir.join("listener.pem"), dir.join("dialer.pem"));
    listener.save(&lid).expect("write listener key");
    dialer.save(&did).expect("write dialer key");
    let mut cmd = Command::new(&exe);
    cmd.env("TEST_RELAY", relay.url())
        .env("TEST_KEY", key_string())
        .env("TEST_LISTENER_ID", &lid)
        .env("TEST_DIALER_ID", &did)
        .env("TEST_DIALER_KEY", dialer.public_key_base64())
        .env("TEST_DIALER_NAME", dialer.name())
        .env("ASAN_OPTIONS", "detect_leaks=1:fast_unwind_on_malloc=0");
    let o = run(cmd, "test_e2e").await;
    println!("{}", show(&o));
    assert!(o.status.success(), "test_e2e failed:\n{}", show(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("not ok"));
    relay.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_callbacks_across_a_relay_restart_from_c() {
    let dir = scratch("events");
    let exe = dir.join("test_events");
    compile(&["tests/c/test_events.c"], &exe, Link::Shared, true);
    let echo = echo_server().await;
    let id = dir.join("listener.pem");
    libtunnel::Identity::generate().save(&id).expect("write the listener key");
    let mut cmd = Command::new(&exe);
    cmd.env("TEST_KEY_JSON", auth_keys_json())
        .env("TEST_KEY", key_string())
        .env("TEST_IDENTITY", &id)
        .env("TEST_ECHO", echo.to_string())
        .env("ASAN_OPTIONS", "detect_leaks=1:fast_unwind_on_malloc=0");
    let o = run(cmd, "test_events").await;
    println!("{}", show(&o));
    assert!(o.status.success(), "test_events failed:\n{}", show(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("not ok"));
}

/// tests/c/test_quic.c: the C face over `quic://` with the relay's self-signed certificate
/// trusted through `tunnel_config_set_ca_file` (no new call): 1 MiB echoed and hashed both ways,
/// 1 MiB half-closed to a hashing sink, a wrong key (AUTH_FAILED), a denied target (NOT_ALLOWED),
/// no CA (the certificate refused), and a listener bound over `quic://` echoing 1 MiB dialed by
/// name over `wss://` and over `quic://`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_and_listen_over_quic_from_c() {
    let dir = scratch("quic");
    let exe = dir.join("test_quic");
    compile(&["tests/c/test_quic.c"], &exe, Link::Shared, true);
    let (echo, sink) = (echo_server().await, sink_server().await);
    let (cert, tls_key, _) = testkit::self_signed_cert_in(&dir.join("tls"));
    let mut cfg = relay_config(allow_ports(&[echo.port(), sink.port()]));
    cfg.listeners_open = true;
    cfg.tls_cert = Some(cert.clone());
    cfg.tls_key = Some(tls_key);
    cfg.quic_listen = Some("127.0.0.1:0".parse().expect("addr"));
    let relay = start_relay(cfg).await;
    let quic = relay.quic_addr().expect("the QUIC endpoint");
    let wss = relay.local_addr().expect("the tunnel endpoint");
    let mut cmd = Command::new(&exe);
    cmd.env("TEST_QUIC", format!("quic://localhost:{}", quic.port()))
        .env("TEST_WSS", format!("wss://localhost:{}", wss.port()))
        .env("TEST_CA", &cert)
        .env("TEST_KEY", key_string())
        .env("TEST_WRONG_KEY", format!("{KID}:{WRONG_B64}"))
        .env("TEST_ECHO", echo.to_string())
        .env("TEST_SINK", sink.to_string())
        .env("TEST_DENIED", format!("127.0.0.1:{}", closed_port().await))
        .env("TEST_IDENTITY", dir.join("listener.pem"))
        .env("ASAN_OPTIONS", "detect_leaks=1:fast_unwind_on_malloc=0");
    let o = run(cmd, "test_quic").await;
    println!("{}", show(&o));
    assert!(o.status.success(), "test_quic failed:\n{}", show(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("not ok"));
    let m = relay.metrics().render();
    assert!(testkit::metric(&m, "libtunnel_sessions_total{mode=\"quic\"}") >= 1, "the C dialer's session was QUIC:\n{m}");
    relay.abort();
}
