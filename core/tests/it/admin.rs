//! The admin endpoint (`admin_listen`): JSON for listeners, sessions and the config in force,
//! `/metrics`, all behind the bearer token (`/healthz` aside); no secret in any answer; and
//! `tunnel status --admin URL` printing it. Real sockets on loopback, bounded waits.

use std::time::Duration;

use libtunnel::auth::KeySet;
use libtunnel::egress::allowlist::Allowlist;
use libtunnel::{Dialer, Identity, Key, Listener, RelayConfig, Server};
use testkit::{eventually, holds};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TOKEN: &str = "admin-token-for-the-tests-0123456789";
const SECRET: &[u8] = b"admin-tests-shared-secret-0123456789";

async fn get(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect to the admin endpoint");
    let auth = token.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: admin\r\n{auth}connection: close\r\n\r\n").as_bytes()).await.expect("write");
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await.expect("answer in time").expect("read");
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out)
}

/// `tunnel status ARGS`, run off the runtime's threads.
async fn tunnel_status(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_tunnel"))
            .arg("status")
            .args(args)
            .env_remove("TUNNEL_ADMIN_TOKEN")
            .output()
            .expect("run tunnel status")
    })
    .await
    .expect("the status command ran")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_needs_the_token_and_shows_no_secret() {
    let key = Key::new(3, SECRET.to_vec()).expect("key");
    let allow = Allowlist::from_json(r#"[{"host":"127.0.0.1","port":9}]"#, "TUNNEL_ALLOW").expect("rules");
    let mut cfg = RelayConfig::new(KeySet::new([key.clone()]).expect("keys"), allow);
    cfg.listeners_open = true;
    cfg.admin_listen = Some("127.0.0.1:0".parse().expect("addr"));
    cfg.admin_token = Some(TOKEN.into());
    let relay = Server::bind(cfg).await.expect("relay binds").spawn();
    let admin = relay.admin_addr().expect("an admin address");
    let id = Identity::generate();
    let listener = Listener::builder(relay.url(), id.clone()).bind().await.expect("listener registers");
    let dialer = Dialer::new(relay.url(), key).expect("dialer");
    dialer.connect().await.expect("a dialer session");

    assert_eq!(get(admin, "/healthz", None).await.0, 200);
    for path in ["/listeners", "/sessions", "/config", "/metrics"] {
        let (status, body) = get(admin, path, None).await;
        assert_eq!(status, 401, "{path} without the token: {body}");
        assert!(body.contains("www-authenticate: Bearer") && body.contains("admin_token"), "{body}");
        assert_eq!(get(admin, path, Some("not-the-token-at-all-0000")).await.0, 401, "{path} with a wrong token");
    }
    // The relay answers a registration just before it lists the listener: poll, bounded.
    let (status, body) = eventually("the listener in /listeners", || async {
        holds(get(admin, "/listeners", Some(TOKEN)).await, |(status, body)| *status != 200 || body.contains(&listener.name()))
    })
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&listener.name()) && body.contains(&id.public_key_base64()), "{body}");
    let (status, body) = get(admin, "/sessions", Some(TOKEN)).await;
    assert_eq!(status, 200);
    assert!(body.contains("\"dialer_sessions\": 1") && body.contains("\"listener_sessions\": 1"), "a listener and a dialer session: {body}");
    let (status, body) = get(admin, "/config", Some(TOKEN)).await;
    assert_eq!(status, 200);
    use base64::Engine;
    let secret_b64 = base64::engine::general_purpose::STANDARD.encode(SECRET);
    assert!(body.contains("\"auth_key_ids\"") && body.contains('3'), "{body}");
    assert!(!body.contains(&secret_b64) && !body.contains(TOKEN), "a secret in /config: {body}");
    let (status, body) = get(admin, "/metrics", Some(TOKEN)).await;
    assert!(status == 200 && body.contains("libtunnel_sessions_active"), "{body}");

    // `tunnel status` prints the same, and names the fix for a missing or wrong token.
    let url = format!("http://{admin}");
    let ok = tunnel_status(vec!["--admin".into(), url.clone(), "--token".into(), TOKEN.into()]).await;
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(
        ok.status.success() && text.contains(&listener.name()) && text.contains("1 listener session(s) under 1 name(s); 1 dialer session(s)"),
        "{text}{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let wrong = tunnel_status(vec!["--admin".into(), url.clone(), "--token".into(), "wrong-token-0000000000".into()]).await;
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("AUTH_FAILED"), "{}", String::from_utf8_lossy(&wrong.stderr));
    let missing = tunnel_status(vec!["--admin".into(), url]).await;
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("TUNNEL_ADMIN_TOKEN"));
    listener.close();
    dialer.close().await;
    relay.abort();
}

#[test]
fn an_admin_endpoint_without_a_strong_token_is_refused() {
    let env = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
    let base = [("TUNNEL_AUTH_KEYS", r#"[{"kid":1,"data":"c2VjcmV0"}]"#), ("TUNNEL_ALLOW", r#"[{"host":"db","port":5432}]"#)];
    let mut e = env(&base);
    e.push(("TUNNEL_ADMIN_LISTEN".into(), "127.0.0.1:0".into()));
    let err = RelayConfig::from_sources(None, &[], &e, &[]).unwrap_err();
    assert!(err.message().contains("TUNNEL_ADMIN_TOKEN"), "{err}");
    e.push(("TUNNEL_ADMIN_TOKEN".into(), "short".into()));
    let err = RelayConfig::from_sources(None, &[], &e, &[]).unwrap_err();
    assert!(err.message().contains("at least 16"), "{err}");
}

/// A relay with one dialer key (kid 3) on loopback, with or without an admin endpoint.
async fn relay_with_admin(admin: bool) -> libtunnel::ServerHandle {
    let key = Key::new(3, SECRET.to_vec()).expect("key");
    let allow = Allowlist::from_json(r#"[{"host":"127.0.0.1","port":9}]"#, "TUNNEL_ALLOW").expect("rules");
    let mut cfg = RelayConfig::new(KeySet::new([key]).expect("keys"), allow);
    if admin {
        cfg.admin_listen = Some("127.0.0.1:0".parse().expect("addr"));
        cfg.admin_token = Some(TOKEN.into());
    }
    Server::bind(cfg).await.expect("relay binds").spawn()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_admin_endpoint_the_tunnel_port_serves_no_metrics() {
    let relay = relay_with_admin(true).await;
    let tunnel = relay.local_addr().expect("a tunnel address");
    let (status, body) = get(tunnel, "/metrics", None).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("admin endpoint") && !body.contains("libtunnel_"), "{body}");
    // The admin address is not given away either.
    let admin = relay.admin_addr().expect("an admin address");
    assert!(!body.contains(&admin.port().to_string()), "{body}");
    let (status, body) = get(admin, "/metrics", Some(TOKEN)).await;
    assert!(status == 200 && body.contains("libtunnel_sessions_active"), "{body}");
    // The health path stays as Emissary has it.
    let (status, body) = get(tunnel, "/healthz", None).await;
    assert!(status == 200 && body.ends_with(r#"{"key_ids":[3],"ok":true}"#), "{body}");
    relay.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_admin_endpoint_the_tunnel_port_keeps_its_metrics() {
    let relay = relay_with_admin(false).await;
    let (status, body) = get(relay.local_addr().expect("a tunnel address"), "/metrics", None).await;
    assert!(status == 200 && body.contains("libtunnel_sessions_active"), "{body}");
    relay.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_key_id_is_refused_without_listing_the_relays_key_ids() {
    let relay = relay_with_admin(true).await;
    let stranger = Dialer::new(relay.url(), Key::new(41, b"another-secret-entirely-0123456789".to_vec()).expect("key")).expect("dialer");
    let err = tokio::time::timeout(Duration::from_secs(10), stranger.connect()).await.expect("refused in time").unwrap_err();
    assert_eq!(err.code(), libtunnel::ErrorCode::AuthUnknownKey, "{err}");
    assert!(err.message().contains("41") && err.message().contains("TUNNEL_AUTH_KEYS"), "{err}");
    assert!(!err.message().contains("key ids") && !err.message().contains("[3]"), "the relay's key ids leaked: {err}");
    relay.abort();
}

/// A relay on its own: `/cluster/*` says it is no node of a cluster; the dashboard's page needs
/// the token (header or `?token=`), its script and style do not, and its data lists this relay's
/// listeners with no cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_relays_dashboard_and_cluster_paths() {
    let key = Key::new(3, SECRET.to_vec()).expect("key");
    let allow = Allowlist::from_json(r#"[{"host":"127.0.0.1","port":9}]"#, "TUNNEL_ALLOW").expect("rules");
    let mut cfg = RelayConfig::new(KeySet::new([key]).expect("keys"), allow);
    cfg.listeners_open = true;
    cfg.admin_listen = Some("127.0.0.1:0".parse().expect("addr"));
    cfg.admin_token = Some(TOKEN.into());
    let relay = Server::bind(cfg).await.expect("relay binds").spawn();
    let admin = relay.admin_addr().expect("an admin address");
    let listener = Listener::builder(relay.url(), Identity::generate()).bind().await.expect("listener registers");

    for path in ["/cluster/nodes", "/cluster/listeners"] {
        let (status, body) = get(admin, path, Some(TOKEN)).await;
        assert_eq!(status, 404, "{body}");
        assert!(body.contains("not a node of a cluster (cluster_redis is unset)"), "{body}");
    }
    assert_eq!(get(admin, "/dashboard", None).await.0, 401);
    assert_eq!(get(admin, "/dashboard?token=not-the-token-at-all-0000", None).await.0, 401);
    // The query token opens the page only, not the data.
    assert_eq!(get(admin, &format!("/dashboard/data?token={TOKEN}"), None).await.0, 401);
    for (path, token) in [("/dashboard", Some(TOKEN)), ("/dashboard/app.js", None), ("/dashboard/app.css", None)] {
        let (status, body) = get(admin, path, token).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert!(body.to_ascii_lowercase().contains("content-security-policy: default-src 'self'"), "{path}: {body}");
        assert!(body.to_ascii_lowercase().contains("referrer-policy: no-referrer"), "{path}: {body}");
    }
    let (status, body) = get(admin, "/dashboard/data", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let data: serde_json::Value = serde_json::from_str(body.split_once("\r\n\r\n").expect("a body").1).expect("JSON");
    assert_eq!(data["cluster"], serde_json::Value::Null);
    assert_eq!(data["listeners"][0]["name"].as_str(), Some(listener.name().as_str()), "{data:#}");
    assert_eq!(data["listener_names"], 1, "{data:#}");
    assert_eq!(data["sample_secs"], 60);
    assert_eq!(data["history"].as_array().map(Vec::len), Some(1), "one sample at start, then up to now: {data:#}");
    assert_eq!(data["errors"], serde_json::json!([]));
}
