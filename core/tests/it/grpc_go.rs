//! The gRPC contract is real (issue 31): a Go client generated from the published
//! `proto/libtunnel/v1/tunnel.proto` (Debian's `protoc`, `protoc-gen-go` and `protoc-gen-go-grpc`
//! from the Go module proxy) and written only from the documented frames (`interop/grpc-go`)
//! opens a session, authenticates and dials an echo target through an in-process relay.
//!
//! The harness runs the commands `interop/grpc-go/README.md` lists (and checks that it still lists
//! them) in a copy under the target dir that keeps the repository's layout (`proto/` beside
//! `interop/grpc-go/`); the build is reused while the sources, the `.proto` and the commands are
//! unchanged. Without `go` or `protoc` the tests are skipped (the reason goes to stderr and to
//! `LIBTUNNEL_SKIP_LOG`), except under CI, where they fail.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine;
use sha2::{Digest, Sha256};
use testkit::*;

/// `protoc-gen-go`, the version of the `google.golang.org/protobuf` module the client requires.
const GEN_GO: &str = "google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12";
/// `protoc-gen-go-grpc` (its own module).
const GEN_GO_GRPC: &str = "google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.5.1";
/// The interop module's path; the generated package goes to `tunnelv1/` inside it.
const MODULE: &str = "libtunnel.dev/interop/grpc-go";
const BINARY: &str = "bin/grpc-go-client";
/// Bytes each run sends and expects back.
const BYTES: usize = 8 * MIB;

/// The `protoc` arguments, run in `interop/grpc-go` (the `.proto` is `../../proto/...`).
fn protoc_args() -> Vec<String> {
    let place = format!("Mlibtunnel/v1/tunnel.proto={MODULE}/tunnelv1");
    [
        "-I ../../proto",
        "--go_out=.",
        "--go-grpc_out=.",
        &format!("--go_opt=module={MODULE}"),
        &format!("--go-grpc_opt=module={MODULE}"),
        &format!("--go_opt={place}"),
        &format!("--go-grpc_opt={place}"),
        "libtunnel/v1/tunnel.proto",
    ]
    .iter()
    .flat_map(|a| a.split(' ').map(str::to_string).collect::<Vec<_>>())
    .collect()
}

/// The commands as README.md writes them.
fn readme_commands() -> Vec<String> {
    vec![
        format!("GOBIN=$PWD/bin go install {GEN_GO}"),
        format!("GOBIN=$PWD/bin go install {GEN_GO_GRPC}"),
        format!("PATH=$PWD/bin:$PATH protoc {}", protoc_args().join(" ")),
        format!("go build -o {BINARY} ."),
    ]
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn have(tool: &str, arg: &str) -> bool {
    std::process::Command::new(tool).arg(arg).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// The built client, or `None` (after [`skip`]) when `go` or `protoc` is missing. Built once per
/// test binary, and not again while its inputs are unchanged.
fn go_client() -> Option<PathBuf> {
    static CLIENT: OnceLock<Option<PathBuf>> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            let tools = [
                ("go", "version", "install Go 1.26 or later: https://go.dev/dl/"),
                ("protoc", "--version", "apt-get install protobuf-compiler; scripts/test.sh does"),
            ];
            for (tool, arg, hint) in tools {
                if !have(tool, arg) {
                    skip(&format!("gRPC Go client checks skipped: `{tool}` is not on PATH ({hint})"));
                    return None;
                }
            }
            let started = Instant::now();
            let bin = build();
            println!("grpc-go: client ready in {:.1}s", started.elapsed().as_secs_f64());
            Some(bin)
        })
        .clone()
}

fn build() -> PathBuf {
    let src = repo().join("interop/grpc-go");
    let readme = std::fs::read_to_string(src.join("README.md")).expect("interop/grpc-go/README.md");
    for c in readme_commands() {
        assert!(readme.contains(&c), "interop/grpc-go/README.md must list the command the test runs:\n{c}");
    }
    // The copy keeps the repository's layout, so the README's relative paths hold.
    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("grpc-go-interop");
    let (module, proto) = (work.join("interop/grpc-go"), work.join("proto/libtunnel/v1"));
    let mut inputs: Vec<(String, Vec<u8>)> = std::fs::read_dir(&src)
        .expect("read interop/grpc-go")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n.to_string_lossy().ends_with(".go") || n == "go.mod" || n == "go.sum"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).expect("read a source")))
        .collect();
    inputs.sort();
    let tunnel_proto = std::fs::read(repo().join("proto/libtunnel/v1/tunnel.proto")).expect("read tunnel.proto");
    let mut stamp = Sha256::new();
    for (name, body) in &inputs {
        stamp.update(name.as_bytes());
        stamp.update(body);
    }
    stamp.update(&tunnel_proto);
    stamp.update(readme_commands().join("\n").as_bytes());
    let stamp = hex::encode(stamp.finalize());
    let (client, stamp_file) = (module.join(BINARY), module.join("bin/inputs.sha256"));
    if client.is_file() && std::fs::read_to_string(&stamp_file).is_ok_and(|s| s == stamp) {
        return client;
    }
    let _ = std::fs::remove_dir_all(&work);
    for d in [&module.join("bin"), &proto] {
        std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
    }
    std::fs::write(proto.join("tunnel.proto"), &tunnel_proto).expect("copy tunnel.proto");
    for (name, body) in &inputs {
        std::fs::write(module.join(name), body).expect("copy a source");
    }
    let bin = module.join("bin");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let gobin = bin.to_string_lossy().into_owned();
    run(&module, "go", &["install", GEN_GO], &[("GOBIN", &gobin)]);
    run(&module, "go", &["install", GEN_GO_GRPC], &[("GOBIN", &gobin)]);
    let args = protoc_args();
    run(&module, "protoc", &args.iter().map(String::as_str).collect::<Vec<_>>(), &[("PATH", &path)]);
    run(&module, "go", &["build", "-o", BINARY, "."], &[]);
    std::fs::write(&stamp_file, stamp).expect("write the build stamp");
    client
}

/// Run a build step in `dir` (Go kept to the local toolchain and the module proxy); panics with
/// its output when it fails or takes over five minutes.
fn run(dir: &Path, program: &str, args: &[&str], env: &[(&str, &str)]) {
    let mut child = std::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("GOWORK", "off")
        .env("GOTOOLCHAIN", "local")
        .env("CGO_ENABLED", "0")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(300);
    while child.try_wait().expect("poll a build step").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("a build step's output");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let hint = if text.contains("dial tcp") || text.contains("proxy.golang.org") {
        " (the Go modules come from the Go module proxy: check network access or GOPROXY)"
    } else {
        ""
    };
    assert!(out.status.success(), "`{program} {}` in {} failed ({}){hint}:\n{text}", args.join(" "), dir.display(), out.status);
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Run the client against `relay` with `key` (`KID:BASE64`) for an echo `target`.
async fn client(bin: &Path, relay: &libtunnel::ServerHandle, key: &str, target: std::net::SocketAddr) -> Run {
    let url = format!("grpc://127.0.0.1:{}", relay.local_addr().expect("relay address").port());
    let out = tokio::process::Command::new(bin)
        .args(["-relay", &url, "-key", key, "-target", &target.to_string(), "-bytes", &BYTES.to_string()])
        .env_remove("TUNNEL_KEY")
        .env_remove("TUNNEL_RELAY")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = within(BULK, "the Go client", out).await.expect("run the Go client");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A successful run: exit 0, nothing on stderr, both hashes those of the payload.
fn assert_echoed(r: &Run) {
    assert!(r.ok && r.stderr.is_empty(), "the Go client failed:\nstdout:\n{}\nstderr:\n{}", r.stdout, r.stderr);
    let hash = hex::encode(Sha256::digest(go_payload(BYTES)));
    for line in [format!("sent     {BYTES} bytes sha256 {hash}"), format!("received {BYTES} bytes sha256 {hash}"), "ok".to_string()] {
        assert!(r.stdout.lines().any(|l| l == line), "missing {line:?} in the Go client's output:\n{}", r.stdout);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_client_generated_from_the_proto_dials_through_the_relay() {
    init_tracing();
    let Some(bin) = tokio::task::spawn_blocking(go_client).await.expect("build the Go client") else { return };
    let echo = echo_server().await;
    let relay = start_relay(relay_config(allow_ports(&[echo.port()]))).await;
    let t0 = Instant::now();
    let r = client(&bin, &relay, &key_string(), echo).await;
    eprintln!("grpc-go: {} MiB each way in {:?}", BYTES / MIB, t0.elapsed());
    assert_echoed(&r);
    let m = relay.metrics().render();
    assert_eq!(metric(&m, "libtunnel_sessions_total{mode=\"multiplexed\"}"), 1, "one session: {m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_client_with_a_wrong_secret_gets_the_relays_reason_and_the_right_key_still_works() {
    init_tracing();
    let Some(bin) = tokio::task::spawn_blocking(go_client).await.expect("build the Go client") else { return };
    let echo = echo_server().await;
    let relay = start_relay(relay_config(allow_ports(&[echo.port()]))).await;
    let wrong = format!("{KID}:{}", base64::engine::general_purpose::STANDARD.encode(b"not the secret the relay knows"));
    let r = client(&bin, &relay, &wrong, echo).await;
    assert!(!r.ok, "a wrong secret must fail:\n{}", r.stdout);
    let reason = format!("grpc-go: the relay refused the session: [AUTH_FAILED] the proof for key id {KID} does not match");
    assert!(r.stderr.starts_with(&reason) && r.stderr.lines().count() == 1, "stderr:\n{}", r.stderr);
    assert!(r.stdout.is_empty(), "stdout:\n{}", r.stdout);
    let m = relay.metrics().render();
    assert_eq!(metric(&m, "libtunnel_auth_failures_total"), 1, "{m}");
    // The relay keeps serving: the same client with the right key.
    assert_echoed(&client(&bin, &relay, &key_string(), echo).await);
}
