//! Exit listeners end to end on loopback: a real relay, a real exit listener (in-process, and as
//! a `tunnel listen --exit` process where it must die), real dialers and real TCP targets.
//!
//! The relay's own allowlist admits none of the targets here, so everything that connects went
//! through the exit and was judged by the exit's rules (the relay's allowlist code, run there).

use testkit::dns;
use testkit::procs;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;

use libtunnel::config::ExitGrant;
use libtunnel::relay::metrics::Refusal;
use libtunnel::{Dialer, ErrorCode, Identity, Key, Listener};
use testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A second dialer key the relay accepts but does not let use the exit.
const OTHER_KID: u32 = 4;

fn other_key() -> Key {
    Key::new(OTHER_KID, b"another-dialer-secret-0123456789".to_vec()).expect("key")
}

fn records() -> HashMap<&'static str, Vec<IpAddr>> {
    let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
    HashMap::from([
        ("evil.test", vec![ip("127.0.0.1")]),
        ("mapped.test", vec![ip("::ffff:127.0.0.1")]),
        ("many.test", vec![ip("127.0.0.1"), ip("169.254.169.254")]),
        ("rebind.allowed.test", vec![ip("127.0.0.1")]),
        ("rebind6.allowed.test", vec![ip("::1")]),
        ("zero.allowed.test", vec![ip("0.0.0.0")]),
        ("metadata.allowed.test", vec![ip("169.254.169.254")]),
        ("nat64.allowed.test", vec![ip("64:ff9b::7f00:1")]),
        ("ok.allowed.test", vec![ip("127.0.0.2")]),
        ("private.test", vec![ip("192.168.1.1")]),
    ])
}

/// A slice of the relay's allowlist table (core/tests/allowlist_table.rs): loopback spellings and
/// names whose DNS answer is forbidden, each of which the exit must refuse as the relay does.
/// `pb` is the port of a live server on 127.0.0.1 that must never see a connection.
fn forbidden_rows(pb: u16) -> Vec<(String, u16)> {
    [
        "127.0.0.1",
        "127.1",
        "2130706433",
        "0x7f.1",
        "0177.0.0.1",
        "127.0.0.1.",
        "[::ffff:127.0.0.1]",
        "[::ffff:7f00:1]",
        "[::127.0.0.1]",
        "[::1]",
        "0.0.0.0",
        "localhost",
        "LOCALHOST.",
        "ｌｏｃａｌｈｏｓｔ",
        "evil.test",
        "mapped.test",
        "many.test",
        "rebind.allowed.test",
        "rebind6.allowed.test",
        "zero.allowed.test",
        "metadata.allowed.test",
        "nat64.allowed.test",
        "private.test",
    ]
    .iter()
    .map(|h| (h.to_string(), pb))
    .collect()
}

fn relay_with_exit(exit: &str) -> libtunnel::RelayConfig {
    // The relay's allowlist admits nothing used here: targets behind an exit are the exit's to judge.
    let mut cfg = relay_config(allow(r#"[{"host":"127.0.0.3","port":1}]"#));
    cfg.auth_keys = libtunnel::auth::KeySet::new([key(), other_key()]).expect("keyset");
    cfg.listeners_open = true;
    cfg.exits = vec![ExitGrant { name: exit.to_string(), key_ids: vec![KID] }];
    cfg
}

fn dialer(url: &str, key: Key) -> Dialer {
    Dialer::builder(url).key(key).timeout(STEP).build().expect("dialer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_connects_inside_its_network_and_enforces_its_own_allowlist() {
    init_tracing();
    let word = word_echo("127.0.0.2").await;
    let echo = echo_server().await;
    let (forbidden, hits) = counting_echo_server().await;
    let refused_port = closed_port().await;
    let dns = dns::fake_dns(records()).await;
    let id = Identity::generate();
    let exit_name = id.name();
    let relay = start_relay(relay_with_exit(&exit_name)).await;
    let rules = format!(
        r#"[{{"host":"127.0.0.2","port":{}}},{{"host":"127.0.0.1","port":{}}},{{"host":"127.0.0.1","port":{refused_port}}},{{"host":"*.allowed.test","port":"*"}},{{"host":"10.0.0.0/8","port":"*"}}]"#,
        word.port(),
        echo.port()
    );
    let exit = within(STEP, "exit bind", Listener::builder(relay.url(), id).exit(allow(&rules)).exit_dns_servers(vec![dns]).bind())
        .await
        .expect("the exit registers");
    assert!(exit.is_exit());
    let d = dialer(relay.url(), key());

    // Bytes in equal bytes out through the exit, with half-close.
    let data = payload(2 * MIB, 20);
    let s = within(STEP, "dial via exit", d.dial_via(&echo.to_string(), &exit_name)).await.expect("dial via the exit");
    let got = within(BULK, "echo through the exit", echo_roundtrip(s, &data, true)).await.expect("round trip");
    assert_eq!(got, sha256(&data), "the bytes through the exit came back unchanged");
    // A name the exit resolves (its own DNS) to an address its rules admit.
    let mut s =
        within(STEP, "dial a name via exit", d.dial_via(&format!("ok.allowed.test:{}", word.port()), &exit_name)).await.expect("name via exit");
    s.write_all(b"ping").await.expect("write");
    let mut b = [0u8; 4];
    within(STEP, "word echo", s.read_exact(&mut b)).await.expect("read");
    assert_eq!(&b, b"ping");
    // The same target without `via` meets the relay's allowlist, which does not admit it.
    let e = within(STEP, "direct dial", d.dial(&echo.to_string())).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotAllowed, "{e}");
    assert!(e.message().contains("TUNNEL_ALLOW"), "{e}");

    // The exit keeps the relay's reply codes: a closed port is REFUSED.
    let e = within(STEP, "refused via exit", d.dial_via(&format!("127.0.0.1:{refused_port}"), &exit_name)).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Refused, "{e}");

    // Outside the exit's rules, loopback spellings and names resolving to forbidden addresses:
    // NOT_ALLOWED, naming the exit, decided by the exit (its counter), never connected.
    let before = exit.exit_stats().expect("exit stats");
    let rows = forbidden_rows(forbidden.port());
    let mut wrong = Vec::new();
    for (host, port) in &rows {
        let target = libtunnel::socks::Target { host: host.trim_start_matches('[').trim_end_matches(']').to_string(), port: *port };
        let routed = target.through_exit(&exit_name).expect("route");
        match within(STEP + STEP, "refused dial via exit", d.dial_target(&routed)).await {
            Ok(_) => wrong.push(format!("{host}:{port}: admitted")),
            Err(e) if e.code() != ErrorCode::NotAllowed => wrong.push(format!("{host}:{port}: [{}] {e}", e.code())),
            Err(e) if !e.message().contains(&exit_name) => wrong.push(format!("{host}:{port}: the message does not name the exit: {e}")),
            Err(_) => {}
        }
    }
    assert!(wrong.is_empty(), "{} of {} rows went wrong:\n{}", wrong.len(), rows.len(), wrong.join("\n"));
    let after = exit.exit_stats().expect("exit stats");
    assert_eq!(after.not_allowed - before.not_allowed, rows.len() as u64, "every refusal was the exit's: {after:?}");
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the exit connected to the forbidden server on 127.0.0.1");

    // A key the relay does not let use this exit: refused by the relay; the exit never sees it.
    let before = exit.exit_stats().expect("exit stats");
    let relay_refusals = relay.metrics().refusals(Refusal::NotAllowed);
    let e = within(STEP, "other key via exit", dialer(relay.url(), other_key()).dial_via(&echo.to_string(), &exit_name)).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotAllowed, "{e}");
    assert!(e.message().contains(&exit_name) && e.message().contains("TUNNEL_EXITS"), "{e}");
    assert_eq!(exit.exit_stats().expect("exit stats"), before, "the exit saw no stream for a key the relay refused");
    assert_eq!(relay.metrics().refusals(Refusal::NotAllowed), relay_refusals + 1);

    // `via` a listener that is not an exit, and via a name nobody holds.
    let plain = within(STEP, "plain bind", Listener::bind(relay.url(), Identity::generate())).await.expect("plain listener");
    let mut cfg = relay_with_exit(&exit_name);
    cfg.exits.push(ExitGrant { name: plain.name(), key_ids: vec![KID] });
    relay.reload(&cfg).expect("reload");
    let e = within(STEP, "via a plain listener", d.dial_via(&echo.to_string(), &plain.name())).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::NotAllowed, "{e}");
    cfg.exits.push(ExitGrant { name: "nobody-here".into(), key_ids: vec![KID] });
    relay.reload(&cfg).expect("reload");
    let e = within(STEP, "via an offline exit", d.dial_via(&echo.to_string(), "nobody-here")).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unreachable, "{e}");
    // An exit the relay's `exits` setting does not name is unknown, like an offline name.
    let e = within(STEP, "via an unknown exit", d.dial_via(&echo.to_string(), "not-configured")).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unreachable, "{e}");
    // A bad exit name is refused before anything is sent.
    let e = d.dial_via(&echo.to_string(), "Not A Name").await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::InvalidArgument, "{e}");

    let stats = exit.exit_stats().expect("exit stats");
    assert_eq!(stats.connected, 2, "{stats:?}");
    assert!(stats.bytes_to_targets >= data.len() as u64 && stats.bytes_from_targets >= data.len() as u64, "{stats:?}");
    relay.abort();
}

/// A server that sends bytes forever to every connection.
async fn firehose() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let chunk = vec![7u8; 16 * 1024];
                while s.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_killed_mid_transfer_errors_the_stream_and_a_new_exit_serves_again() {
    init_tracing();
    let hose = firehose().await;
    let dir = std::env::temp_dir().join(format!("libtunnel-exit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let key_file = dir.join("exit.pem");
    let id = Identity::generate();
    id.save(&key_file).expect("save key");
    let relay = start_relay(relay_with_exit(&id.name())).await;
    let rules = format!(r#"[{{"host":"127.0.0.1","port":{}}}]"#, hose.port());
    let args = ["--exit", "--allow", rules.as_str()];
    let (mut child, name) = procs::listen_process_with(relay.url(), &key_file, &args).await;
    assert_eq!(name, id.name());
    let d = dialer(relay.url(), key());
    let mut s = within(STEP, "dial via the exit process", d.dial_via(&hose.to_string(), &name)).await.expect("dial");
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0usize;
    while got < 256 * 1024 {
        let n = within(STEP, "bytes through the exit", s.read(&mut buf)).await.expect("read");
        assert!(n > 0, "clean EOF before the kill");
        got += n;
    }
    child.start_kill().expect("kill -9 the exit");
    child.wait().await.expect("reap");
    // The stream must end in an error, never a clean EOF (the transfer did not finish).
    let end = within(STEP + STEP, "the stream ends after the exit died", async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    assert!(end.is_err(), "a stream cut off by the exit's death read as a clean EOF");

    // Once an exit is back under the name, a new dial works.
    let (_child, again) = procs::listen_process_with(relay.url(), &key_file, &args).await;
    assert_eq!(again, name);
    let mut s = within(STEP, "dial after the exit came back", d.dial_via(&hose.to_string(), &name)).await.expect("dial again");
    let n = within(STEP, "bytes again", s.read(&mut buf)).await.expect("read");
    assert!(n > 0);
    relay.abort();
    let _ = std::fs::remove_dir_all(&dir);
}
