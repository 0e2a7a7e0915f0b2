//! The allowlist against every spelling of a forbidden address we know, through the real relay:
//! each entry is dialed with the core [`Dialer`] (multiplexed and classic) at a relay whose rules
//! admit a private range, the "this network" range 0.0.0.0/8, a wildcard name and one port on
//! 127.0.0.2, but never 127.0.0.1. Each dial must fail with its exact code (`NOT_ALLOWED`, or
//! `INVALID_ARGUMENT` for a port the client cannot even encode, or `UNREACHABLE` for a host the
//! relay cannot parse or an offline listener name), a live server on 127.0.0.1 must never see a
//! connection, and the relay must keep serving the allowed target between refusals.
//!
//! Names that resolve to forbidden addresses come from a small DNS responder on loopback UDP,
//! set as the relay's `dns_servers`. Streams to listeners are covered at the end.

use testkit::dns;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;

use libtunnel::relay::metrics::Refusal;
use libtunnel::socks::Target;
use libtunnel::{Dialer, ErrorCode, Identity, Listener, Mode};
use testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What a forbidden spelling must produce.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// The relay refuses it by its rules (SOCKS5 reply 0x02).
    NotAllowed,
    /// The client refuses it before contacting the relay (the port cannot be encoded).
    BadArgument,
    /// The relay cannot parse the host, or routes it to a listener that is not online (0x04).
    Unreachable,
}

impl Want {
    fn code(self) -> ErrorCode {
        match self {
            Want::NotAllowed => ErrorCode::NotAllowed,
            Want::BadArgument => ErrorCode::InvalidArgument,
            Want::Unreachable => ErrorCode::Unreachable,
        }
    }
}

/// One of the relay host's own non-loopback addresses of each family (none on a host that has
/// only loopback), outside the ranges the table's IP rules admit.
fn host_addresses() -> (Option<IpAddr>, Option<IpAddr>) {
    let all = libtunnel::egress::resolve::host_addresses();
    let usable = |ip: &&IpAddr| match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && v4.octets()[0] != 10 && v4.octets()[0] != 0,
        IpAddr::V6(v6) => !v6.is_loopback() && (v6.segments()[0] & 0xffc0) != 0xfe80,
    };
    (all.iter().filter(usable).find(|ip| ip.is_ipv4()).copied(), all.iter().filter(usable).find(|ip| ip.is_ipv6()).copied())
}

/// Names the fake DNS server answers, and with what. Everything else gets an empty answer.
fn dns_records() -> HashMap<&'static str, Vec<IpAddr>> {
    let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
    let (host4, host6) = host_addresses();
    let mut extra: Vec<(&'static str, Vec<IpAddr>)> = vec![
        // Cloud metadata services, for a name a wildcard rule admits.
        ("ec2v6.allowed.test", vec![ip("fd00:ec2::254")]),
        ("alibaba.allowed.test", vec![ip("100.100.100.200")]),
        ("oracle.allowed.test", vec![ip("192.0.0.192")]),
        ("ecs.allowed.test", vec![ip("169.254.170.2")]),
        // IPv6 spellings that carry 127.0.0.1 or 169.254.169.254.
        ("compat.allowed.test", vec![ip("::127.0.0.1")]),
        ("nat64.allowed.test", vec![ip("64:ff9b::7f00:1")]),
        ("nat64meta.allowed.test", vec![ip("64:ff9b::a9fe:a9fe")]),
        ("sixtofour.allowed.test", vec![ip("2002:7f00:1::1")]),
        ("translated.allowed.test", vec![ip("::ffff:0:7f00:1")]),
        ("teredo.allowed.test", vec![ip("2001:0:1:2:3:4:80ff:fffe")]),
        // A mixed answer with nothing admitted: loopback and the host itself.
        ("mixed.allowed.test", std::iter::once(ip("127.0.0.1")).chain(host4).collect()),
    ];
    if let Some(h) = host4 {
        extra.push(("host.allowed.test", vec![h]));
        extra.push(("host-mapped.allowed.test", vec![ip(&format!("::ffff:{h}"))]));
        // The host first, then the one admitted target: only the second may be connected.
        extra.push(("mixed-ok.allowed.test", vec![h, ip("127.0.0.2")]));
    }
    if let Some(h) = host6 {
        extra.push(("host6.allowed.test", vec![h]));
    }
    let mut records = HashMap::from([
        ("evil.test", vec![ip("127.0.0.1")]),
        ("mapped.test", vec![ip("::ffff:127.0.0.1")]),
        ("six.test", vec![ip("::1")]),
        ("zero.test", vec![ip("0.0.0.0")]),
        ("many.test", vec![ip("127.0.0.1"), ip("127.0.0.2"), ip("169.254.169.254")]),
        ("private.test", vec![ip("192.168.1.1")]),
        ("localhost.localdomain", vec![ip("127.0.0.1")]),
        // Resolves to a forbidden address although the wildcard name rule is close by.
        ("allowed.test.evil.test", vec![ip("127.0.0.1")]),
        // Names a wildcard rule admits, answered with the relay's own addresses (DNS rebinding).
        ("rebind.allowed.test", vec![ip("127.0.0.1")]),
        ("rebind6.allowed.test", vec![ip("::1")]),
        ("zero.allowed.test", vec![ip("0.0.0.0")]),
        ("metadata.allowed.test", vec![ip("169.254.169.254")]),
    ]);
    records.extend(extra);
    records
}

/// A DNS server on loopback UDP answering A and AAAA queries from [`dns_records`].
async fn fake_dns() -> SocketAddr {
    dns::fake_dns(dns_records()).await
}

/// Every spelling, as (host, port text, expected outcome). `pa` is the allowed port on 127.0.0.2,
/// `pb` the port of the forbidden server on 127.0.0.1.
fn table(pa: u16, pb: u16) -> Vec<(String, String, Want)> {
    use Want::*;
    let (pa, pb) = (pa.to_string(), pb.to_string());
    // Without a non-loopback address of a family, its rows name nothing the responder knows.
    let (host4, host6) = host_addresses();
    let (host, host6) = (if host4.is_some() { NotAllowed } else { Unreachable }, if host6.is_some() { NotAllowed } else { Unreachable });
    let t: Vec<(&str, &str, Want)> = vec![
        // IPv4 in decimal, octal, hex, short and mixed forms.
        ("127.0.0.1", &pb, NotAllowed),
        ("127.1", &pb, NotAllowed),
        ("127.0.1", &pb, NotAllowed),
        ("2130706433", &pb, NotAllowed),
        ("0x7f000001", &pb, NotAllowed),
        ("0X7F000001", &pb, NotAllowed),
        ("0x7f.1", &pb, NotAllowed),
        ("0x7f.0.0.1", &pb, NotAllowed),
        ("0x0000007f.0x0.0x0.0x1", &pb, NotAllowed),
        ("0177.0.0.1", &pb, NotAllowed),
        ("0177.0.0.01", &pb, NotAllowed),
        ("017700000001", &pb, NotAllowed),
        ("127.000.000.001", &pb, NotAllowed),
        ("127.0.0.1.", &pb, NotAllowed),
        ("%31%32%37.0.0.1", &pb, NotAllowed),
        // IPv4-mapped, IPv4-compatible and plain IPv6 loopback.
        ("[::ffff:127.0.0.1]", &pb, NotAllowed),
        ("[::ffff:7f00:1]", &pb, NotAllowed),
        ("[0:0:0:0:0:ffff:127.0.0.1]", &pb, NotAllowed),
        ("[::FFFF:7F00:0001]", &pb, NotAllowed),
        ("[::127.0.0.1]", &pb, NotAllowed),
        ("[::7f00:1]", &pb, NotAllowed),
        ("[::1]", &pb, NotAllowed),
        ("[0:0:0:0:0:0:0:1]", &pb, NotAllowed),
        // The unspecified address connects to the relay's own host, even though 0.0.0.0/8 is
        // an allowed range here.
        ("0.0.0.0", &pb, NotAllowed),
        ("0", &pb, NotAllowed),
        ("0x0", &pb, NotAllowed),
        ("0.0", &pb, NotAllowed),
        ("[::]", &pb, NotAllowed),
        ("[::ffff:0.0.0.0]", &pb, NotAllowed),
        // localhost, in case, trailing-dot, percent-encoded and Unicode (IDNA) spellings.
        ("localhost", &pb, NotAllowed),
        ("LOCALHOST", &pb, NotAllowed),
        ("LocalHost", &pb, NotAllowed),
        ("localhost.", &pb, NotAllowed),
        ("LOCALHOST.", &pb, NotAllowed),
        ("localhost.localdomain", &pb, NotAllowed),
        ("%6c%6f%63%61%6c%68%6f%73%74", &pb, NotAllowed),
        ("ｌｏｃａｌｈｏｓｔ", &pb, NotAllowed),
        ("ＬＯＣＡＬＨＯＳＴ", &pb, NotAllowed),
        ("ⓛⓞⓒⓐⓛⓗⓞⓢⓣ", &pb, NotAllowed),
        ("１２７.０.０.１", &pb, NotAllowed),
        ("127。0。0。1", &pb, NotAllowed),
        // Names whose DNS answer is forbidden (A, AAAA, mapped, several addresses, 0.0.0.0).
        ("evil.test", &pb, NotAllowed),
        ("EVIL.Test.", &pb, NotAllowed),
        ("mapped.test", &pb, NotAllowed),
        ("six.test", &pb, NotAllowed),
        ("zero.test", &pb, NotAllowed),
        ("many.test", &pb, NotAllowed),
        ("allowed.test.evil.test", &pb, NotAllowed),
        ("rebind.allowed.test", &pb, NotAllowed),
        ("rebind6.allowed.test", &pb, NotAllowed),
        ("zero.allowed.test", &pb, NotAllowed),
        ("metadata.allowed.test", &pb, NotAllowed),
        ("metadata.allowed.test", &pa, NotAllowed),
        // Special-purpose addresses a name rule never reaches: cloud metadata, IPv6 spellings that
        // carry a forbidden IPv4 address, and the relay host's own addresses (rows with a name
        // the DNS responder does not know resolve to nothing: UNREACHABLE, on a loopback-only host).
        ("ec2v6.allowed.test", &pa, NotAllowed),
        ("alibaba.allowed.test", &pa, NotAllowed),
        ("oracle.allowed.test", &pa, NotAllowed),
        ("ecs.allowed.test", &pa, NotAllowed),
        ("compat.allowed.test", &pb, NotAllowed),
        ("nat64.allowed.test", &pb, NotAllowed),
        ("nat64meta.allowed.test", &pa, NotAllowed),
        ("sixtofour.allowed.test", &pb, NotAllowed),
        ("translated.allowed.test", &pb, NotAllowed),
        ("teredo.allowed.test", &pb, NotAllowed),
        ("mixed.allowed.test", &pb, NotAllowed),
        ("host.allowed.test", &pb, host),
        ("host.allowed.test", "22", host),
        ("host-mapped.allowed.test", &pb, host),
        ("host6.allowed.test", &pb, host6),
        ("private.test", &pa, NotAllowed),
        // The allowed host on another port, other hosts on the allowed port.
        ("127.0.0.2", &pb, NotAllowed),
        ("0x7f000002", &pb, NotAllowed),
        ("127.0.0.1", &pa, NotAllowed),
        ("127.0.0.3", &pa, NotAllowed),
        ("localhost", &pa, NotAllowed),
        // Private, link-local and metadata ranges that no rule admits.
        ("192.168.1.1", &pa, NotAllowed),
        ("172.16.0.1", &pa, NotAllowed),
        ("169.254.169.254", &pa, NotAllowed),
        ("0xa9fea9fe", &pa, NotAllowed),
        ("[::ffff:192.168.0.1]", &pa, NotAllowed),
        ("[fd00::1]", &pa, NotAllowed),
        ("[fe80::1]", &pa, NotAllowed),
        // Metadata addresses and embedded-IPv4 spellings as literal targets.
        ("[fd00:ec2::254]", &pa, NotAllowed),
        ("100.100.100.200", &pa, NotAllowed),
        ("192.0.0.192", &pa, NotAllowed),
        ("[64:ff9b::7f00:1]", &pb, NotAllowed),
        ("[64:ff9b::127.0.0.1]", &pb, NotAllowed),
        ("[64:ff9b:1::7f00:1]", &pb, NotAllowed),
        ("[64:ff9b::a9fe:a9fe]", &pa, NotAllowed),
        ("[2002:7f00:1::1]", &pb, NotAllowed),
        ("[2002:a9fe:a9fe::]", &pa, NotAllowed),
        ("[::ffff:0:7f00:1]", &pb, NotAllowed),
        ("[::ffff:0:127.0.0.1]", &pb, NotAllowed),
        ("[2001:0:1:2:3:4:80ff:fffe]", &pb, NotAllowed),
        // Port 0 (never allowed) and ports out of range (refused by the client).
        ("127.0.0.1", "0", NotAllowed),
        ("127.0.0.2", "0", NotAllowed),
        ("localhost", "0", NotAllowed),
        ("127.0.0.1", "65536", BadArgument),
        ("127.0.0.2", "99999", BadArgument),
        ("127.0.0.1", "-1", BadArgument),
        ("localhost", "70000", BadArgument),
        ("127.0.0.1", "0x50", BadArgument),
        ("[::1]", "65536", BadArgument),
        // Hosts the relay cannot parse, including NUL and '@' tricks aimed at the wildcard rule.
        ("localhost%00.allowed.test", &pb, Unreachable),
        ("a@localhost", &pb, Unreachable),
        ("localhost/.allowed.test", &pb, Unreachable),
        ("127.0.0.1 ", &pb, Unreachable),
        // Under the relay's domain: a listener route; none is online under that name.
        ("nosuch.localhost", &pb, Unreachable),
    ];
    t.into_iter().map(|(h, p, w)| (h.to_string(), p.to_string(), w)).collect()
}

fn dialer(url: &str, mode: Mode) -> Dialer {
    Dialer::builder(url).key(key()).mode(mode).timeout(STEP).build().expect("valid dialer settings")
}

/// Dial `host:port` (as a user would type it, or as a raw SOCKS5 name when it cannot be typed).
async fn dial(d: &Dialer, host: &str, port: &str) -> libtunnel::Result<libtunnel::TunnelStream> {
    let text = if host.starts_with('[') || !host.contains(['\0', ' ', '@', '/']) { format!("{host}:{port}") } else { String::new() };
    let work = async {
        if text.is_empty() {
            let port = port.parse().expect("raw names use valid ports");
            d.dial_target(&Target { host: host.to_string(), port }).await
        } else {
            d.dial(&text).await
        }
    };
    within(STEP + STEP, "a refused dial", work).await
}

async fn still_serves(d: &Dialer, allowed: SocketAddr) {
    let mut s = dial(d, "127.0.0.2", &allowed.port().to_string())
        .await
        .unwrap_or_else(|e| panic!("the allowed target stopped working ({:?}): [{}] {e}", d.mode(), e.code()));
    s.write_all(b"ping").await.expect("write");
    let mut b = [0u8; 4];
    within(STEP, "echo from the allowed target", s.read_exact(&mut b)).await.expect("echo");
    assert_eq!(&b, b"ping");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_spellings_are_refused_through_the_relay() {
    init_tracing();
    let allowed = word_echo("127.0.0.2").await;
    let (forbidden, hits) = counting_echo_server().await;
    let (pa, pb) = (allowed.port(), forbidden.port());
    let rules = format!(
        r#"[{{"host":"127.0.0.2","port":{pa}}},{{"host":"10.0.0.0/8","port":"*"}},{{"host":"0.0.0.0/8","port":"*"}},{{"host":"*.allowed.test","port":"*"}}]"#
    );
    let mut cfg = relay_config(allow(&rules));
    cfg.dns_servers = vec![fake_dns().await];
    let relay = start_relay(cfg).await;
    let rows = table(pa, pb);
    assert!(rows.len() >= 100, "the table has {} spellings", rows.len());

    let mut refused_by_relay = 0;
    let mut failures = Vec::new();
    for mode in [Mode::Multiplexed, Mode::Classic] {
        let d = dialer(relay.url(), mode);
        still_serves(&d, allowed).await;
        for (host, port, want) in &rows {
            match dial(&d, host, port).await {
                Ok(_) => failures.push(format!("{mode:?} {host:?}:{port}: admitted; want {}", want.code())),
                Err(e) if e.code() != want.code() => failures.push(format!("{mode:?} {host:?}:{port}: [{}] {e}; want {}", e.code(), want.code())),
                Err(e) => {
                    if matches!(want, Want::NotAllowed) {
                        assert!(e.message().contains("TUNNEL_ALLOW"), "the refusal names the setting: {e}");
                        refused_by_relay += 1;
                    }
                }
            }
        }
        // Rules are applied per stream: the same session still reaches the allowed target.
        still_serves(&d, allowed).await;
        // A mixed answer (the host's own address first, then the admitted 127.0.0.2) connects
        // to the admitted address only.
        if host_addresses().0.is_some() {
            let mut s = dial(&d, "mixed-ok.allowed.test", &pa.to_string()).await.unwrap_or_else(|e| panic!("{mode:?} mixed-ok: [{}] {e}", e.code()));
            s.write_all(b"mix!").await.expect("write");
            let mut b = [0u8; 4];
            within(STEP, "echo through the mixed answer", s.read_exact(&mut b)).await.expect("echo");
            assert_eq!(&b, b"mix!");
        }
    }
    assert!(failures.is_empty(), "{} of {} dials went wrong:\n{}", failures.len(), rows.len() * 2, failures.join("\n"));
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the relay connected to the forbidden server on 127.0.0.1");
    assert_eq!(relay.metrics().refusals(Refusal::NotAllowed), refused_by_relay, "every NOT_ALLOWED came from the relay");
    relay.abort();
}

/// What the allowlist means for listeners: a dial to a registered listener's name is routed to
/// the listener and is *not* subject to the allowlist (registration and its key grants govern
/// who may be reached that way). What the rules still guarantee: a listener-shaped name never
/// reaches a TCP target, and every other stream on the same session is checked on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_to_listeners_and_the_allowlist() {
    init_tracing();
    let allowed = word_echo("127.0.0.2").await;
    let (forbidden, hits) = counting_echo_server().await;
    let (pa, pb) = (allowed.port(), forbidden.port());
    let mut cfg = relay_config(allow(&format!(r#"[{{"host":"127.0.0.2","port":{pa}}}]"#)));
    cfg.listeners_open = true;
    let relay = start_relay(cfg).await;
    let listener = within(STEP, "listener bind", Listener::bind(relay.url(), Identity::generate())).await.expect("open registration");
    let name = listener.name();
    let l = std::sync::Arc::new(listener);
    let acceptor = l.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = acceptor.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(s);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let d = dialer(relay.url(), Mode::Multiplexed);
    for target in [format!("{name}:0"), format!("{name}:{pb}"), format!("{}.localhost:80", name.to_uppercase())] {
        let mut s = within(STEP, "dial the listener", d.dial(&target)).await.unwrap_or_else(|e| panic!("{target}: [{}] {e}", e.code()));
        s.write_all(b"hi").await.expect("write");
        let mut b = [0u8; 2];
        within(STEP, "echo from the listener", s.read_exact(&mut b)).await.expect("echo");
        assert_eq!(&b, b"hi", "{target}");
        // While that listener stream is open, the same session's other streams are still checked.
        for (host, port) in [("127.0.0.1", pb.to_string()), ("localhost", pb.to_string()), ("0x7f.1", pb.to_string())] {
            let e = dial(&d, host, &port).await.err().unwrap_or_else(|| panic!("{host}:{port} admitted"));
            assert_eq!(e.code(), ErrorCode::NotAllowed, "{host}:{port}: {e}");
        }
        still_serves(&d, allowed).await;
    }
    // Listener-shaped names that are not online never fall through to a TCP target.
    let offline = Identity::generate().name();
    for target in [format!("{offline}:{pb}"), format!("other.localhost:{pb}"), format!("{offline}.localhost:{pb}")] {
        let e = within(STEP, "dial offline", d.dial(&target)).await.err().unwrap_or_else(|| panic!("{target} admitted"));
        assert_eq!(e.code(), ErrorCode::Unreachable, "{target}: {e}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0, "the relay connected to the forbidden server on 127.0.0.1");
    l.close();
    relay.abort();
}

/// Inside a private network namespace (`unshare -rn`, created by this test for itself): the
/// "host" has 169.254.169.254, 10.77.0.1 and fd00:ec2::254 on `lo` besides loopback, a server
/// listens on each, and a fake DNS server names them. Broad rules (`0.0.0.0/0` and `::/0`, or `*`)
/// reach none of them, by IP or by name, through the relay or an exit's connect; rules naming
/// each address exactly reach it. Nothing leaves the namespace.
#[test]
fn broad_rules_never_reach_metadata_loopback_or_the_host_itself() {
    const INNER: &str = "LIBTUNNEL_TEST_IN_NETNS";
    if std::env::var_os(INNER).is_some() {
        return tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime").block_on(in_namespace());
    }
    let exe = std::env::current_exe().expect("this test binary");
    let probe = std::process::Command::new("unshare").args(["-rn", "true"]).status();
    if !probe.is_ok_and(|s| s.success()) {
        // No user (or network) namespaces here: nothing to run this in without touching the host.
        eprintln!("SKIPPED: `unshare -rn` is not available, so no private network namespace can be made");
        return;
    }
    let out = std::process::Command::new("unshare")
        .arg("-rn")
        .arg(&exe)
        .args(["--exact", "allowlist_table::broad_rules_never_reach_metadata_loopback_or_the_host_itself", "--nocapture", "--test-threads=1"])
        .env(INNER, "1")
        .output()
        .expect("run the test in a network namespace");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}");
    assert!(out.status.success() && text.contains("1 passed"), "the test in the namespace failed:\n{text}");
}

/// The body of [`broad_rules_never_reach_metadata_loopback_or_the_host_itself`], in its namespace.
async fn in_namespace() {
    init_tracing();
    let ip_cmd = |args: &[&str]| {
        let st = std::process::Command::new("ip").args(args).status().expect("run ip");
        assert!(st.success(), "ip {args:?} failed");
    };
    ip_cmd(&["link", "set", "lo", "up"]);
    ip_cmd(&["addr", "add", "169.254.169.254/32", "dev", "lo"]);
    ip_cmd(&["addr", "add", "10.77.0.1/32", "dev", "lo"]);
    let v6 =
        std::process::Command::new("ip").args(["-6", "addr", "add", "fd00:ec2::254/128", "dev", "lo", "nodad"]).status().is_ok_and(|s| s.success());
    let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
    let mut specials = vec![("169.254.169.254", "metadata.test"), ("127.0.0.1", "loop.test"), ("10.77.0.1", "self.test")];
    if v6 {
        specials.push(("fd00:ec2::254", "ec2v6.test"));
    }
    // A counting echo server on each special address, one port for all.
    let first = TcpListener::bind("169.254.169.254:0").await.expect("bind the metadata address");
    let port = first.local_addr().expect("addr").port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut listeners = vec![first];
    for (addr, _) in &specials[1..] {
        listeners.push(TcpListener::bind(SocketAddr::new(ip(addr), port)).await.expect("bind a special address"));
    }
    for l in listeners {
        let h = hits.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                h.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut word = [0u8; 4];
                    if s.read_exact(&mut word).await.is_ok() {
                        let _ = s.write_all(&word).await;
                    }
                });
            }
        });
    }
    let records: HashMap<&'static str, Vec<IpAddr>> = specials.iter().map(|(a, n)| (*n, vec![ip(a)])).collect();
    let dns = dns::fake_dns(records).await;
    let host = libtunnel::egress::resolve::interface_addresses().expect("list this namespace's addresses");
    assert!(host.contains(&ip("10.77.0.1")), "{host:?}");

    for broad in [r#"[{"host":"0.0.0.0/0","port":"*"},{"host":"::/0","port":"*"}]"#, r#"[{"host":"*","port":"*"}]"#] {
        let rules = allow(broad);
        let notes = rules.broad_rule_notes(&host);
        assert!(!notes.is_empty() && notes.iter().all(|n| n.contains("169.254.0.0/16") && n.contains("does not reach")), "{notes:?}");
        let mut cfg = relay_config(rules.clone());
        cfg.dns_servers = vec![dns];
        let relay = start_relay(cfg).await;
        let d = dialer(relay.url(), Mode::Multiplexed);
        let resolver = libtunnel::egress::resolve::TargetResolver::new(&[dns]).expect("resolver");
        for (addr, name) in &specials {
            let literal = if addr.contains(':') { format!("[{addr}]") } else { addr.to_string() };
            for target in [literal.as_str(), name] {
                let e = dial(&d, target, &port.to_string()).await.err().unwrap_or_else(|| panic!("{broad}: {target} admitted"));
                assert_eq!(e.code(), ErrorCode::NotAllowed, "{broad}: {target}: {e}");
                // An exit listener checks its streams with the same code.
                let socks = if target == literal {
                    socks5_proto::Address::SocketAddress(SocketAddr::new(ip(addr), port))
                } else {
                    socks5_proto::Address::DomainAddress(target.as_bytes().to_vec(), port)
                };
                let refused = libtunnel::egress::connect::connect_target(&socks, &rules, &resolver, STEP).await.expect_err("an exit refuses it too");
                assert_eq!(refused.reason, libtunnel::egress::connect::Cause::NotAllowed, "{broad}: exit {target}: {}", refused.detail);
            }
        }
        relay.abort();
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0, "a broad rule reached a special address");

    // Rules naming each address exactly reach it, by IP and by name.
    let exact: Vec<String> = specials
        .iter()
        .map(|(a, _)| if a.contains(':') { format!(r#"{{"host":"{a}/128","port":{port}}}"#) } else { format!(r#"{{"host":"{a}","port":{port}}}"#) })
        .collect();
    let mut cfg = relay_config(allow(&format!("[{}]", exact.join(","))));
    cfg.dns_servers = vec![dns];
    let relay = start_relay(cfg).await;
    let d = dialer(relay.url(), Mode::Multiplexed);
    for (addr, name) in &specials {
        let literal = if addr.contains(':') { format!("[{addr}]") } else { addr.to_string() };
        for target in [literal.as_str(), name] {
            let mut s = dial(&d, target, &port.to_string()).await.unwrap_or_else(|e| panic!("exact rule: {target}: [{}] {e}", e.code()));
            s.write_all(b"meta").await.expect("write");
            let mut b = [0u8; 4];
            within(STEP, "echo", s.read_exact(&mut b)).await.expect("echo");
            assert_eq!(&b, b"meta");
        }
    }
    assert_eq!(hits.load(Ordering::SeqCst), specials.len() * 2);
    relay.abort();
}
