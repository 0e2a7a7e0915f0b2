//! The E2E flags of the `tunnel` binary against an in-process relay: `tunnel listen --e2e
//! --allow-peer KEY` exposing a local service, `tunnel forward --e2e --e2e-identity FILE` carrying
//! 8 MiB (hashed, half-closed) to it, `tunnel dial --e2e` with an unlisted key failing with
//! `E2E_REFUSED`, and a chosen name refused without `--e2e-pin` (`E2E_IDENTITY`). Every child is
//! killed when dropped and every wait is bounded.

use std::path::Path;
use std::process::Stdio;

use libtunnel::Identity;
use testkit::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

fn tunnel(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tunnel"));
    c.args(args).kill_on_drop(true).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("TUNNEL_") || k.starts_with("EMISSARY_") || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    c
}

/// Start `cmd` and wait for a stdout line starting with `prefix`; returns the child and the rest
/// of that line. Stdout keeps being read afterwards.
async fn spawn_until(mut cmd: Command, prefix: &'static str) -> (Child, String) {
    let mut child = cmd.spawn().expect("start tunnel");
    let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut tx = Some(tx);
        while let Ok(Some(line)) = out.next_line().await {
            if let Some(rest) = line.strip_prefix(prefix) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(rest.to_string());
                }
            }
        }
    });
    let rest = within(STEP, prefix, rx).await.unwrap_or_else(|_| panic!("tunnel exited before printing {prefix:?}"));
    (child, rest)
}

fn save(dir: &Path, file: &str, id: &Identity) -> String {
    let p = dir.join(file);
    let _ = std::fs::remove_file(&p);
    id.save(&p).expect("write key");
    p.to_str().expect("utf8").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_e2e_listen_forward_and_dial() {
    init_tracing();
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("e2e-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let (listener_id, friend, stranger) = (Identity::generate(), Identity::generate(), Identity::generate());
    let (lkey, fkey, skey) = (save(&dir, "l.pem", &listener_id), save(&dir, "f.pem", &friend), save(&dir, "s.pem", &stranger));
    let mut cfg = relay_config(allow_ports(&[9]));
    cfg.listeners_open = true;
    let relay = start_relay(cfg).await;
    let url = relay.url().to_string();
    let key_arg = format!("{KID}:{}", base64_secret());
    let service = echo_server().await.to_string();

    let friend_key = friend.public_key_base64();
    let (_listen, name) =
        spawn_until(tunnel(&["listen", "--to", &service, "--relay", &url, "--key", &lkey, "--e2e", "--allow-peer", &friend_key]), "listening as: ")
            .await;
    assert_eq!(name, listener_id.name());

    // tunnel forward --e2e with the admitted key: bytes in = bytes out, half-close honoured.
    let target = format!("{name}:0");
    let (_fwd, line) = spawn_until(
        tunnel(&["forward", "127.0.0.1:0", &target, "--relay", &url, "--key", &key_arg, "--e2e", "--e2e-identity", &fkey]),
        "forwarding ",
    )
    .await;
    let local = line.split_whitespace().next().expect("forwarding ADDR -> ...").to_string();
    let data = payload(8 * MIB, 7);
    let s = within(STEP, "connecting to the forward", TcpStream::connect(&local)).await.expect("connect");
    let got = within(BULK, "echo through tunnel forward --e2e", echo_roundtrip(s, &data, true)).await.expect("echo");
    assert_eq!(got, sha256(&data));

    // tunnel dial --e2e with a key the listener does not list: E2E_REFUSED, naming the fix.
    let out = within(STEP, "tunnel dial", tunnel(&["dial", &target, "--relay", &url, "--key", &key_arg, "--e2e", "--e2e-identity", &skey]).output())
        .await
        .expect("run tunnel dial");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused dial must fail");
    assert!(err.contains("E2E_REFUSED") && err.contains("--allow-peer"), "stderr: {err}");

    // A chosen name with nothing pinned: refused before anything is sent.
    let out = within(STEP, "tunnel dial", tunnel(&["dial", "api:0", "--relay", &url, "--key", &key_arg, "--e2e"]).output()).await.expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("E2E_IDENTITY") && err.contains("--e2e-pin"), "stderr: {err}");

    // Pins are only meaningful with --e2e.
    let out = within(STEP, "tunnel dial", tunnel(&["dial", "api:0", "--relay", &url, "--key", &key_arg, "--e2e-pin", "api=x"]).output())
        .await
        .expect("run");
    assert!(!out.status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

fn base64_secret() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(SECRET)
}
