//! Child processes of the `tunnel` binary for tests built with the `cli` feature (the binary's
//! path only exists for them, so this is not part of `common`).

#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use tokio::process::Child;

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
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tunnel"))
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

/// A `tunnel server` process with the test key (`common::auth_keys_json`, passed in as
/// `auth_keys`) and the `TUNNEL_*` settings in `env`, and its URL once it listens. Its stdout is
/// kept read for its whole life.
pub async fn relay_process(auth_keys: &str, env: &[(&str, &str)]) -> (Child, String) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tunnel"))
        .arg("server")
        .env("TUNNEL_LISTEN", "127.0.0.1:0")
        .env("TUNNEL_AUTH_KEYS", auth_keys)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start tunnel server");
    let mut out = tokio::io::BufReader::new(child.stdout.take().expect("stdout"));
    let url = tokio::time::timeout(Duration::from_secs(10), async {
        use tokio::io::AsyncBufReadExt;
        let mut line = String::new();
        loop {
            line.clear();
            assert!(out.read_line(&mut line).await.expect("stdout") > 0, "the relay exited before it listened");
            if let Some(u) = line.trim().strip_prefix("relay listening: ") {
                return u.to_string();
            }
        }
    })
    .await
    .expect("tunnel server printed its URL within 10 s");
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut sink = Vec::new();
        let _ = out.read_to_end(&mut sink).await;
    });
    (child, url)
}
