//! Several relays as one cluster on a real Redis, behind a real HAProxy, on loopback. A listener
//! holds its name on one node; dials by name and public HTTP requests reach it through the other
//! nodes (directly and through the load balancer), byte for byte; names stay exclusive across
//! the cluster; a node killed with SIGKILL fails its streams on both ends and its listener is
//! reachable again through the others; a Redis outage leaves local names (and remote ones routed
//! a moment before) working, fails other remote ones with RELAY_UNAVAILABLE naming Redis, and
//! heals by itself; behind Sentinel, the cluster follows a failover.

use testkit::cluster;
use testkit::pki;
use testkit::raw;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cluster::{Balancer, Node, Redis};
use http::{header, Request, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use libtunnel::{Dialer, ErrorCode, Identity, Listener};
use sha2::{Digest, Sha256};
use testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The tests start several processes each: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

type Body = BoxBody<Bytes, std::io::Error>;

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// Serve a listener: dial streams are echoed (half-close passed on), HTTP streams get a hyper
/// server that streams each request body back and answers `GET /x` with `x from NAME`.
fn serve(listener: Arc<Listener>) {
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let name = listener.name();
            tokio::spawn(async move {
                if peer.via == libtunnel::protocol::Via::Http {
                    let client = peer.client.clone();
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (name, client) = (name.clone(), client.clone());
                        async move {
                            let resp = if req.uri().path() == "/peer" {
                                hyper::Response::new(full(client))
                            } else if req.method() == http::Method::POST {
                                hyper::Response::new(req.into_body().map_err(std::io::Error::other).boxed())
                            } else {
                                hyper::Response::new(full(format!("{} from {name}", req.uri().path())))
                            };
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                } else {
                    let (mut r, mut w) = tokio::io::split(stream);
                    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                        let _ = w.shutdown().await;
                    }
                }
            });
        }
    });
}

fn dialer(url: &str) -> Dialer {
    Dialer::new(url, key()).expect("dialer")
}

/// 64 MiB each way through a dial by name, half-closed, hashed at both ends.
async fn dial_64_mib(via: &str, name: &str, seed: u64) {
    let d = dialer(via);
    let s = within(STEP, "dial by name", d.dial(&format!("{name}:0"))).await.unwrap_or_else(|e| panic!("dial {name} via {via}: {e}"));
    let data = payload(64 * MIB, seed);
    let got = within(BULK, "64 MiB echo", echo_roundtrip(s, &data, true)).await.expect("echo");
    assert_eq!(got, sha256(&data), "64 MiB through {via} came back unchanged");
}

/// POST 64 MiB to the listener through a public HTTP port; the body comes back streamed.
async fn post_64_mib(http: std::net::SocketAddr, host: &str, seed: u64) {
    let data = Bytes::from(payload(64 * MIB, seed));
    let tcp = within(STEP, "connect to the public port", TcpStream::connect(http)).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(tcp)).await.expect("handshake");
    tokio::spawn(conn);
    let chunks: Vec<Result<hyper::body::Frame<Bytes>, std::io::Error>> =
        (0..data.len()).step_by(256 * 1024).map(|o| Ok(hyper::body::Frame::data(data.slice(o..(o + 256 * 1024).min(data.len()))))).collect();
    let body = BodyExt::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(chunks)));
    let req = Request::post("/echo").header(header::HOST, host).body(body).expect("request");
    let resp = within(BULK, "response head", sender.send_request(req)).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut h = Sha256::new();
    let mut n = 0;
    let mut body = resp.into_body();
    while let Some(f) = within(BULK, "response body", body.frame()).await {
        if let Ok(d) = f.expect("body frame").into_data() {
            n += d.len();
            h.update(&d);
        }
    }
    assert_eq!(n, data.len());
    assert_eq!(<[u8; 32]>::from(h.finalize()), sha256(&data), "the 64 MiB body through {http} came back unchanged");
}

/// `GET path` with `Host: host` on a fresh connection: (status, body).
async fn get(http: std::net::SocketAddr, host: &str, path: &str) -> (u16, String) {
    http_exchange(http, &format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")).await
}

async fn start_cluster(n: usize, extra: &[String]) -> (Redis, Vec<Node>) {
    let redis = Redis::start(cluster::free_port().await).await;
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(Node::start(&redis.url(), extra).await);
    }
    (redis, nodes)
}

/// The node whose `/metrics` count the one listener (the count follows the registration's
/// answer by a moment, so it is polled).
async fn holder_of(nodes: &[Node]) -> usize {
    eventually("a single node to report the listener", || async {
        let mut holding = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            if n.metric("libtunnel_listeners_active").await == 1 {
                holding.push(i);
            }
        }
        match holding[..] {
            [one] => Ok(one),
            _ => Err(holding),
        }
    })
    .await
}

/// Wait until `f` is true (within `limit`); returns the time it took.
async fn until<F: std::future::Future<Output = bool>>(limit: Duration, what: &str, mut f: impl FnMut() -> F) -> Duration {
    let t = Instant::now();
    eventually_within(limit, what, || {
        let check = f();
        async move { holds(check.await, |ok| *ok) }
    })
    .await;
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dials_and_http_cross_nodes_directly_and_through_the_balancer() {
    let _one = SERIAL.lock().await;
    init_tracing();
    if !cluster::cluster_programs() {
        return;
    }
    // Every request comes from 127.0.0.1 (and, through the balancer, from HAProxy's address):
    // per-source limits sized for one source sending 1,000 at once (and a listener limit whose
    // per-source share, 1/16 of it, is not reached by that one source).
    let limits: Vec<String> = [
        "http_max_requests_per_source=4096",
        "http_max_requests_per_listener=4096",
        "max_handshakes_per_source=4096",
        "max_connections_per_source=4096",
        // HAProxy names each client in a PROXY header (from 127.0.0.9; direct clients are 127.0.0.1).
        "proxy_protocol_from=127.0.0.9",
    ]
    .map(String::from)
    .to_vec();
    let (redis, nodes) = start_cluster(3, &limits).await;
    let lb = Balancer::start_with(&nodes.iter().collect::<Vec<_>>(), true).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    // A backlog for 1,000 requests at once (the default 128 answers the rest 503, by design).
    let listener =
        Arc::new(within(STEP, "bind on node A", Listener::builder(&a.url, Identity::generate()).backlog(1024).bind()).await.expect("bind"));
    let name = listener.name();
    serve(listener.clone());
    let host = format!("{name}.localhost");

    // Through the balancer the listener sees the client itself, not HAProxy (PROXY protocol).
    for http in [lb.http, b.http] {
        let mut s = within(STEP, "connect", TcpStream::connect(http)).await.expect("connect");
        let me = s.local_addr().expect("local addr");
        s.write_all(format!("GET /peer HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).await.expect("send");
        let (status, body) = within(STEP, "response", read_http_response(&mut s)).await;
        assert_eq!((status, body.as_str()), (200, me.to_string().as_str()), "the client address the listener sees through {http}");
    }

    dial_64_mib(&b.url, &name, 1).await;
    dial_64_mib(&c.url, &name, 2).await;
    dial_64_mib(&lb.url, &name, 3).await;
    post_64_mib(b.http, &host, 4).await;
    post_64_mib(c.http, &host, 5).await;
    post_64_mib(lb.http, &host, 6).await;
    assert!(b.metric("libtunnel_cluster_forwarded_streams_total{direction=\"out\"}").await >= 2);
    assert!(a.metric("libtunnel_cluster_forwarded_streams_total{direction=\"in\"}").await >= 4);
    assert_eq!(a.metric("libtunnel_cluster_claims").await, 1);

    // 1,000 concurrent requests spread over the nodes (the balancer and each node directly).
    let ports = [lb.http, b.http, c.http, a.http];
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let (http, host) = (ports[i % ports.len()], host.clone());
        tasks.spawn(async move { (i, get(http, &host, &format!("/r{i}")).await) });
    }
    let mut ok = 0;
    while let Some(r) = within(BULK, "1,000 requests", tasks.join_next()).await {
        let (i, (status, body)) = r.expect("task");
        assert_eq!((status, body.as_str()), (200, format!("/r{i} from {name}").as_str()), "request {i}");
        ok += 1;
    }
    assert_eq!(ok, 1000);

    // End-to-end encryption across the hop: the dialer verifies the listener's key through B.
    let secret = Arc::new(
        within(STEP, "e2e listener on A", Listener::builder(&a.url, Identity::generate()).e2e(libtunnel::e2e::ListenerE2e::new()).bind())
            .await
            .expect("bind e2e"),
    );
    serve(secret.clone());
    let d = Dialer::builder(&b.url).key(key()).e2e(libtunnel::e2e::DialerE2e::new()).build().expect("e2e dialer");
    let s = within(STEP, "e2e dial via B", d.dial(&format!("{}:0", secret.name()))).await.expect("e2e dial across nodes");
    assert!(s.is_e2e());
    let data = payload(MIB, 9);
    assert_eq!(within(BULK, "e2e echo", echo_roundtrip(s, &data, true)).await.expect("echo"), sha256(&data));
    secret.close();

    // An unknown name is offline everywhere, with the words of a relay of its own.
    let e = dialer(&b.url).dial("nosuchname:0").await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::Unreachable, "{e}");
    let (status, body) = get(c.http, "nosuchname.localhost", "/").await;
    assert_eq!(status, 502, "{body}");
    // Released names leave nothing behind in Redis.
    until(STEP, "the e2e listener's released name leaves one name held", || async { redis.count_keys("libtunnel:name:*").await == 1 }).await;
    listener.close();
    until(STEP, "the released name's key is gone from Redis", || async { redis.count_keys("libtunnel:name:*").await == 0 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_exclusive_across_the_cluster() {
    let _one = SERIAL.lock().await;
    init_tracing();
    if !cluster::cluster_programs() {
        return;
    }
    let (k1, k2) = (Identity::generate(), Identity::generate());
    let grants = format!(
        "listener_keys=[{{\"public_key\": \"{}\", \"names\": [\"shared\"]}}, {{\"public_key\": \"{}\", \"names\": [\"shared\"]}}]",
        k1.public_key_base64(),
        k2.public_key_base64()
    );
    let (_redis, nodes) = start_cluster(3, &[grants]).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let first = Arc::new(within(STEP, "k1 on A", Listener::builder(&a.url, k1.clone()).name("shared").bind()).await.expect("k1 registers"));
    serve(first.clone());

    // Another key, another node: NAME_TAKEN, naming the cluster.
    let e = within(STEP, "k2 on C", Listener::builder(&c.url, k2.clone()).name("shared").bind()).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::NameTaken, "{e}");
    assert!(e.to_string().contains("another relay of the cluster"), "{e}");
    // Still held by k1 on A, reachable through B.
    let s = within(STEP, "dial shared via B", dialer(&b.url).dial("shared:0")).await.expect("dial");
    assert_eq!(within(STEP, "echo", echo_roundtrip(s, b"still k1", true)).await.expect("echo"), sha256(b"still k1"));

    // A stale registration of k1 on B (a process about to be replaced)...
    let stale = |n: &[u8]| libtunnel::protocol::ListenHello { instance: vec![5; 16], ..raw::hello(&k1, n, "shared") };
    let (_stale_ws, ack) = raw::raw_register(&b.url, stale).await;
    assert!(ack.is_ok(), "the same key replaces A's listener: {ack:?}");
    let e = within(STEP, "A's listener is replaced", first.accept()).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::NameTaken, "{e}");
    let first = Arc::new(within(STEP, "k1 on A again", Listener::builder(&a.url, k1.clone()).name("shared").bind()).await.expect("k1 once more"));
    serve(first.clone());
    // ...that comes back (on another node) after the newer one replaced it: refused cluster-wide.
    let (_again, ack) = raw::raw_register(&c.url, stale).await;
    let e = ack.expect_err("a replaced instance may not take the name back on any node");
    assert_eq!(e.code(), ErrorCode::NameTaken, "{e}");
    assert!(e.message().contains("newer registration"), "{e}");
    let s = within(STEP, "dial shared via C", dialer(&c.url).dial("shared:0")).await.expect("dial");
    assert_eq!(within(STEP, "echo", echo_roundtrip(s, b"newer", true)).await.expect("echo"), sha256(b"newer"));

    // The same key again on C (not a pool): the new registration wins cluster-wide, and A's
    // listener is told why and stops.
    let second = Arc::new(within(STEP, "k1 on C", Listener::builder(&c.url, k1.clone()).name("shared").bind()).await.expect("k1 again"));
    let e = within(STEP, "A's listener is replaced", first.accept()).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::NameTaken, "{e}");
    serve(second.clone());
    for via in [&a.url, &b.url] {
        let s = within(STEP, "dial shared", dialer(via).dial("shared:0")).await.expect("dial the new holder");
        assert_eq!(within(STEP, "echo", echo_roundtrip(s, b"k1 on C", true)).await.expect("echo"), sha256(b"k1 on C"));
    }
    second.close();
    // Once released, the other key may take it.
    until(STEP, "k2 registers once k1 left", || {
        let (url, k2) = (b.url.clone(), k2.clone());
        async move {
            match Listener::builder(&url, k2).name("shared").bind().await {
                Ok(l) => {
                    l.close();
                    true
                }
                Err(e) => {
                    assert_eq!(e.code(), ErrorCode::NameTaken, "{e}");
                    false
                }
            }
        }
    })
    .await;

    // Pools span nodes: both keys as replicas, on A and on C.
    // (k2's listener above was just closed: its node releases the name a moment later.)
    let p1 = eventually("pool k1 on A once the name is released", || async {
        match Listener::builder(&a.url, k1.clone()).name("shared").pool(true).bind().await {
            Ok(l) => Ok(Arc::new(l)),
            Err(e) if e.code() == ErrorCode::NameTaken => Err(e),
            Err(e) => panic!("pool 1: {e}"),
        }
    })
    .await;
    let p2 = Arc::new(within(STEP, "pool k2 on C", Listener::builder(&c.url, k2).name("shared").pool(true).bind()).await.expect("pool 2 joins"));
    serve(p1.clone());
    serve(p2.clone());
    for i in 0..20u8 {
        let s = within(STEP, "dial the pool via B", dialer(&b.url).dial("shared:0")).await.expect("dial pool");
        assert_eq!(within(STEP, "echo", echo_roundtrip(s, &[i; 100], true)).await.expect("echo"), sha256(&[i; 100]));
    }
    assert!(a.metric("libtunnel_cluster_forwarded_streams_total{direction=\"in\"}").await >= 1);
    assert!(c.metric("libtunnel_cluster_forwarded_streams_total{direction=\"in\"}").await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_fails_its_streams_and_its_listener_comes_back_elsewhere() {
    let _one = SERIAL.lock().await;
    init_tracing();
    if !cluster::cluster_programs() {
        return;
    }
    let (_redis, mut nodes) = start_cluster(3, &[]).await;
    let lb = Balancer::start(&nodes.iter().collect::<Vec<_>>()).await;
    // The listener knows one URL, the balancer's.
    let listener = Arc::new(within(STEP, "bind through the balancer", Listener::bind(&lb.url, Identity::generate())).await.expect("bind"));
    let name = listener.name();
    let holder = holder_of(&nodes).await;
    let other = (holder + 1) % 3;
    let other_url = nodes[other].url.clone();

    // A stream crossing other → holder, mid-transfer when the holder dies; the listener's end is
    // served here, so what it sees can be checked too.
    let dial = tokio::spawn({
        let (url, name) = (other_url.clone(), name.clone());
        async move { dialer(&url).dial(&format!("{name}:0")).await }
    });
    let (mut ls, _) = within(STEP, "the listener accepts", listener.accept()).await.expect("accept");
    let mut s = within(STEP, "dial", dial).await.expect("task").expect("dial");
    let mut buf = [0u8; 1000];
    s.write_all(&[7u8; 1000]).await.expect("write");
    ls.read_exact(&mut buf).await.expect("the listener reads");
    ls.write_all(&buf).await.expect("the listener writes");
    s.read_exact(&mut buf).await.expect("echoed before the kill");
    nodes[holder].kill9().await;
    let killed = Instant::now();
    // The dialer's stream errors (never a clean EOF): reading it gives an error, not Ok(0).
    let r = within(STEP, "the stream fails", async {
        loop {
            let _ = s.write_all(&[1u8; 1000]).await;
            match s.read(&mut buf).await {
                Ok(0) => return Ok(0),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    assert!(r.is_err(), "the cut-off stream must fail, not end cleanly: {r:?}");
    let l = within(STEP, "the listener's stream fails", async {
        loop {
            match ls.read(&mut buf).await {
                Ok(0) => return Ok(0),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    assert!(l.is_err(), "the listener's end must fail too, not end cleanly: {l:?}");
    serve(listener.clone());

    // Reachable again through a surviving node: the listener reconnects through the balancer
    // to a live node and claims its name there.
    let back = until(Duration::from_secs(25), "the listener is reachable again", || {
        let (url, name) = (other_url.clone(), name.clone());
        async move {
            match tokio::time::timeout(Duration::from_secs(2), async {
                let s = dialer(&url).dial(&format!("{name}:0")).await?;
                echo_roundtrip(s, b"again", true).await.map_err(|e| libtunnel::Error::new(ErrorCode::Io, e.to_string()))
            })
            .await
            {
                Ok(Ok(h)) => h == sha256(b"again"),
                _ => false,
            }
        }
    })
    .await;
    let total = killed.elapsed();
    println!(
        "listener reachable again {:.2} s after the SIGKILL (first successful dial after {:.2} s of polling)",
        total.as_secs_f64(),
        back.as_secs_f64()
    );
    assert!(total < Duration::from_secs(25), "took {total:?}");
    // Every request from now on succeeds, through every surviving node and the balancer.
    let live: Vec<usize> = (0..3).filter(|i| *i != holder).collect();
    for round in 0..10u8 {
        for &i in &live {
            let s = within(STEP, "dial after recovery", dialer(&nodes[i].url).dial(&format!("{name}:0"))).await.expect("no stale route");
            assert_eq!(within(STEP, "echo", echo_roundtrip(s, &[round; 64], true)).await.expect("echo"), sha256(&[round; 64]));
            let (status, body) = get(nodes[i].http, &format!("{name}.localhost"), "/after").await;
            assert_eq!((status, body.as_str()), (200, format!("/after from {name}").as_str()));
        }
        let (status, _) = get(lb.http, &format!("{name}.localhost"), "/after").await;
        assert_eq!(status, 200);
    }
    listener.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_keeps_local_names_fails_remote_ones_clearly_and_heals() {
    let _one = SERIAL.lock().await;
    init_tracing();
    if !cluster::cluster_programs() {
        return;
    }
    let (mut redis, nodes) = start_cluster(2, &["cluster_ttl=3".to_string()]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let la = Arc::new(within(STEP, "bind on A", Listener::bind(&a.url, Identity::generate())).await.expect("bind a"));
    let lb = Arc::new(within(STEP, "bind on B", Listener::bind(&b.url, Identity::generate())).await.expect("bind b"));
    serve(la.clone());
    serve(lb.clone());
    let (na, nb) = (la.name(), lb.name());
    let works = |url: String, name: String| async move {
        let s = dialer(&url).dial(&format!("{name}:0")).await?;
        echo_roundtrip(s, b"ping", true)
            .await
            .map_err(|e| libtunnel::Error::new(ErrorCode::Io, e.to_string()))
            .map(|h| assert_eq!(h, sha256(b"ping")))
    };
    within(STEP, "remote before the outage", works(a.url.clone(), nb.clone())).await.expect("A reaches B's listener");
    // A second listener on B that A never routed to.
    let lb2 = Arc::new(within(STEP, "bind on B", Listener::bind(&b.url, Identity::generate())).await.expect("bind b2"));
    serve(lb2.clone());
    let nb2 = lb2.name();

    let port = redis.port;
    redis.stop().await;
    let outage = Instant::now();
    // Local names keep working on each node; a remote name A routed a moment ago keeps its
    // route (B still confirms each stream); other remote ones fail with the clear error.
    let mut checks = 0;
    while outage.elapsed() < Duration::from_secs(10) {
        within(STEP, "local on A", works(a.url.clone(), na.clone())).await.expect("A's own listener works without Redis");
        within(STEP, "local on B", works(b.url.clone(), nb.clone())).await.expect("B's own listener works without Redis");
        within(STEP, "routed on A", works(a.url.clone(), nb.clone())).await.expect("A keeps the route it knew to B's listener");
        let e = within(STEP, "remote on A", works(a.url.clone(), nb2.clone())).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::RelayUnavailable, "{e}");
        assert!(e.to_string().contains("Redis"), "{e}");
        let (status, body) = get(a.http, &format!("{nb2}.localhost"), "/").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("Redis"), "{body}");
        checks += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(checks >= 5);
    // A listener that registers during the outage is held locally, and claimed when Redis returns.
    let t = Instant::now();
    let lc = Arc::new(within(STEP, "bind on A without Redis", Listener::bind(&a.url, Identity::generate())).await.expect("bind c"));
    println!("registration without Redis took {:.2} s", t.elapsed().as_secs_f64());
    serve(lc.clone());
    let nc = lc.name();
    within(STEP, "new local name on A", works(a.url.clone(), nc.clone())).await.expect("A serves a listener registered without Redis");

    // Redis returns (empty: no persistence); the nodes announce and claim again by themselves.
    let _redis = Redis::start(port).await;
    let healed = until(Duration::from_secs(15), "remote names work again", || {
        let (a, b, na, nb2, nc) = (a.url.clone(), b.url.clone(), na.clone(), nb2.clone(), nc.clone());
        async move {
            let ab = tokio::time::timeout(Duration::from_secs(2), works(a, nb2)).await.is_ok_and(|r| r.is_ok());
            let ba = tokio::time::timeout(Duration::from_secs(2), works(b.clone(), na)).await.is_ok_and(|r| r.is_ok());
            let bc = tokio::time::timeout(Duration::from_secs(2), works(b, nc)).await.is_ok_and(|r| r.is_ok());
            ab && ba && bc
        }
    })
    .await;
    println!("remote names reachable again {:.2} s after Redis came back", healed.as_secs_f64());
    la.close();
    lb.close();
    lb2.close();
    lc.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_with_several_relay_urls_fail_over_without_a_balancer() {
    let _one = SERIAL.lock().await;
    init_tracing();
    if !cluster::cluster_programs() {
        return;
    }
    let (_redis, mut nodes) = start_cluster(2, &[]).await;
    let urls = format!("{},{}", nodes[0].url, nodes[1].url);
    let listener = Arc::new(within(STEP, "bind", Listener::bind(&urls, Identity::generate())).await.expect("bind"));
    serve(listener.clone());
    let name = listener.name();
    assert_eq!(holder_of(&nodes).await, 0, "the first URL is used while it answers");
    let d = dialer(&urls);
    let s = within(STEP, "dial", d.dial(&format!("{name}:0"))).await.expect("dial");
    assert_eq!(within(STEP, "echo", echo_roundtrip(s, b"one", true)).await.expect("echo"), sha256(b"one"));

    nodes[0].kill9().await;
    let t = until(Duration::from_secs(25), "dialer and listener move to the second relay", || {
        let (d, name) = (d.clone(), name.clone());
        async move {
            match tokio::time::timeout(Duration::from_secs(2), d.dial(&format!("{name}:0"))).await {
                Ok(Ok(s)) => tokio::time::timeout(Duration::from_secs(2), echo_roundtrip(s, b"two", true))
                    .await
                    .is_ok_and(|h| h.is_ok_and(|h| h == sha256(b"two"))),
                _ => false,
            }
        }
    })
    .await;
    println!("several URLs: reachable through the second relay {:.2} s after the first was killed", t.as_secs_f64());
    assert_eq!(holder_of(&nodes[1..]).await, 0, "the listener moved to the second relay");
    assert_eq!(d.relay().trim_end_matches('/'), nodes[1].url.as_str());
    listener.close();
}

#[tokio::test]
async fn a_node_on_every_address_must_say_where_other_nodes_reach_it() {
    let mut cfg = relay_config(allow_ports(&[1]));
    cfg.listen = Some("0.0.0.0:0".parse().unwrap());
    cfg.cluster = Some(libtunnel::config::ClusterConfig {
        redis: "redis://127.0.0.1:1".into(),
        redis_ca: None,
        key: libtunnel::Key::parse(cluster::CLUSTER_KEY).unwrap(),
        advertise: None,
        claim_ttl: Duration::from_secs(10),
        namespace: "t".into(),
    });
    let e = libtunnel::Server::bind(cfg.clone()).await.unwrap_err();
    assert!(e.message().contains("TUNNEL_CLUSTER_ADVERTISE"), "{e}");
    // With it, the node starts even though Redis is not there yet (it connects when it can).
    cfg.cluster.as_mut().unwrap().advertise = Some("ws://10.0.0.5:7835".into());
    let s = libtunnel::Server::bind(cfg).await.expect("binds without Redis");
    drop(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_tcp_port_is_served_by_every_node() {
    let _one = SERIAL.lock().await;
    init_tracing();
    if !cluster::cluster_programs() {
        return;
    }
    // Two nodes on one host: each binds public ports on its own loopback address, the same range.
    let base = cluster::free_port().await;
    let range = format!("tcp_ports={base}-{}", base + 3);
    let redis = Redis::start(cluster::free_port().await).await;
    let a = Node::start(&redis.url(), &[range.clone(), "tcp_ports_bind=127.0.0.2".into()]).await;
    let b = Node::start(&redis.url(), &[range, "tcp_ports_bind=127.0.0.3".into()]).await;
    let listener = Arc::new(
        within(STEP, "bind with a TCP port on A", Listener::builder(&a.url, Identity::generate()).tcp_port(true).bind()).await.expect("bind"),
    );
    serve(listener.clone());
    let on_a: std::net::SocketAddr = listener.registration().tcp_addr.expect("a public TCP port").parse().expect("addr");
    assert_eq!(on_a.ip().to_string(), "127.0.0.2");
    let on_b = std::net::SocketAddr::from(([127, 0, 0, 3], on_a.port()));
    // The same port on node B forwards to the listener on A (once B has read the port table).
    until(STEP, "node B mirrors the port", || async move { TcpStream::connect(on_b).await.is_ok() }).await;
    for addr in [on_a, on_b] {
        let s = within(STEP, "connect", TcpStream::connect(addr)).await.expect("connect");
        let data = payload(4 * MIB, u64::from(addr.port()));
        assert_eq!(within(BULK, "echo", echo_roundtrip(s, &data, true)).await.expect("echo"), sha256(&data), "through {addr}");
    }
    // A second listener gets another port: no two listeners of the cluster share one.
    let other = within(STEP, "bind with a TCP port on B", Listener::builder(&b.url, Identity::generate()).tcp_port(true).bind()).await.expect("bind");
    let other_port: std::net::SocketAddr = other.registration().tcp_addr.expect("a port").parse().expect("addr");
    assert_ne!(other_port.port(), on_a.port());
    // The listener leaves: its port's mirror closes.
    listener.close();
    until(STEP, "node B closes the mirror", || async move { TcpStream::connect(on_b).await.is_err() }).await;
    other.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_is_left_after_the_keepalive_window() {
    let _one = SERIAL.lock().await;
    init_tracing();
    if !cluster::cluster_programs() {
        return;
    }
    let (_redis, nodes) = start_cluster(3, &[]).await;
    let lb = Balancer::start(&nodes.iter().collect::<Vec<_>>()).await;
    // A node that stops without closing its sockets (SIGSTOP: no RST, its port still accepts) is
    // noticed by the listener's keepalive; here tuned to 1 s / 3 s (default 10 s / 20 s).
    let mux = libtunnel::MuxConfig { keepalive_interval: Duration::from_secs(1), keepalive_timeout: Duration::from_secs(3), ..Default::default() };
    let listener = Arc::new(
        within(
            STEP,
            "bind through the balancer",
            Listener::builder(&lb.url, Identity::generate()).mux_config(mux).timeout(Duration::from_secs(2)).bind(),
        )
        .await
        .expect("bind"),
    );
    serve(listener.clone());
    let name = listener.name();
    let holder = holder_of(&nodes).await;
    let other = nodes[(holder + 1) % 3].url.clone();
    let pid = nodes[holder].child.id().expect("pid") as i32;
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let frozen = Instant::now();
    let back = until(Duration::from_secs(25), "the listener is reachable through a live node", || {
        let (url, name) = (other.clone(), name.clone());
        async move {
            tokio::time::timeout(Duration::from_secs(2), async {
                let s = dialer(&url).dial(&format!("{name}:0")).await.ok()?;
                echo_roundtrip(s, b"thawed", true).await.ok()
            })
            .await
            .ok()
            .flatten()
                == Some(sha256(b"thawed"))
        }
    })
    .await;
    println!("frozen node: the listener was reachable again after {:.2} s (keepalive 1 s / 3 s)", frozen.elapsed().as_secs_f64());
    assert!(back < Duration::from_secs(25));
    // The frozen node wakes up: it finds its claim replaced and routes nothing back to itself.
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    for _ in 0..10 {
        let s = within(STEP, "dial after the thaw", dialer(&nodes[holder].url).dial(&format!("{name}:0"))).await.expect("dial via the thawed node");
        assert_eq!(within(STEP, "echo", echo_roundtrip(s, b"x", true)).await.expect("echo"), sha256(b"x"));
    }
    listener.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_reach_redis_over_tls() {
    let _one = SERIAL.lock().await;
    init_tracing();
    if !cluster::cluster_programs() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("libtunnel-redis-tls-{}", std::process::id()));
    let pki = pki::make_pki(&dir, &["127.0.0.1", "localhost"]);
    let redis = Redis::start_tls(cluster::free_port().await, &pki.cert, &pki.key, &pki.ca).await;
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let ca = format!("cluster_redis_ca={}", pki.ca.display());
    let a = Node::start(&url, std::slice::from_ref(&ca)).await;
    let b = Node::start(&url, &[ca]).await;
    let listener = Arc::new(within(STEP, "bind on A", Listener::bind(&a.url, Identity::generate())).await.expect("bind"));
    serve(listener.clone());
    let s = within(STEP, "dial via B", dialer(&b.url).dial(&format!("{}:0", listener.name()))).await.expect("a remote name through a TLS Redis");
    assert_eq!(within(STEP, "echo", echo_roundtrip(s, b"tls", true)).await.expect("echo"), sha256(b"tls"));
    // A node that does not trust the Redis certificate cannot use the cluster registry: its
    // remote names fail with the error naming Redis, its own listeners still work.
    let c = Node::start(&url, &[]).await;
    let e = within(STEP, "dial via C", dialer(&c.url).dial(&format!("{}:0", listener.name()))).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::RelayUnavailable, "{e}");
    assert!(e.to_string().contains("Redis"), "{e}");
    listener.close();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_listener_on_another_node_gets_its_requests_over_a_few_kept_connections() {
    let _one = SERIAL.lock().await;
    init_tracing();
    if !cluster::cluster_programs() {
        return;
    }
    let (_redis, nodes) = start_cluster(2, &[]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let listener = Arc::new(within(STEP, "bind h2c on A", Listener::builder(&a.url, Identity::generate()).h2c(true).bind()).await.expect("bind"));
    let name = listener.name();
    let streams = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let (listener, streams) = (listener.clone(), streams.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                streams.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(full(format!("h2 {} {:?}", req.uri().path(), req.version()))))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    }
    let host = format!("{name}.localhost");
    for i in 0..40 {
        let (status, body) = get(b.http, &host, &format!("/g{i}")).await;
        assert_eq!((status, body.as_str()), (200, format!("h2 /g{i} HTTP/2.0").as_str()), "request {i} through B");
    }
    let used = streams.load(std::sync::atomic::Ordering::SeqCst);
    assert!((1..=4).contains(&used), "40 requests through B took {used} HTTP/2 connections to the listener on A (kept: at most 4)");
    listener.close();
}

/// How the [`FakeNode`] answers the real node that dials it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fake {
    /// An accepting answer with a made-up proof (it has no cluster key to make a real one).
    ForgedAnswer,
    /// Reflection: take a nonce from the real node at this URL, offer it to the dialing node as
    /// its own, pass the dialing node's signed hello on to the real node and its answer back.
    Reflect(String),
}

/// What the fake node saw on one connection from a real node.
#[derive(Debug, Clone, Default)]
struct FakeConn {
    /// The real node's hello arrived.
    hello: bool,
    /// (Reflection) the answer of the node the hello was passed on to.
    reflected: Option<Bytes>,
    /// Frames the dialing node sent after the answer (a stream would start with one).
    frames_after: usize,
    /// The dialing node closed the connection after the answer.
    closed: bool,
}

/// A "node" anyone with write access to the cluster's Redis can list: it speaks the relay
/// protocol on raw TCP but has no cluster key.
struct FakeNode {
    url: String,
    mode: Arc<std::sync::Mutex<Fake>>,
    conns: Arc<std::sync::Mutex<Vec<FakeConn>>>,
}

/// The fake node's id in Redis.
const FAKE_ID: &str = "fa4efa4efa4efa4e";

impl FakeNode {
    async fn start(mode: Fake) -> FakeNode {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("tcp://{}", l.local_addr().expect("addr"));
        let (mode, conns) = (Arc::new(std::sync::Mutex::new(mode)), Arc::new(std::sync::Mutex::new(Vec::new())));
        let (m, c) = (mode.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((sock, _)) = l.accept().await {
                let (mode, c) = (m.lock().unwrap().clone(), c.clone());
                tokio::spawn(async move {
                    let seen = fake_conn(sock, mode).await;
                    c.lock().unwrap().push(seen);
                });
            }
        });
        FakeNode { url, mode, conns }
    }

    fn conns(&self) -> Vec<FakeConn> {
        self.conns.lock().unwrap().clone()
    }

    /// List it in Redis as the holder of `name` (what a write to Redis without the key can do).
    async fn list_as_holder(&self, redis: &Redis, name: &str, owner_hex: &str) {
        redis.cmd(&["SET", &format!("libtunnel:node:{FAKE_ID}"), &self.url]).await;
        redis
            .cmd(&[
                "HSET",
                &format!("libtunnel:name:{name}"),
                "owner",
                owner_hex,
                "mode",
                "",
                &format!("n:{FAKE_ID}"),
                "1",
                &format!("i:{FAKE_ID}"),
                "ab",
            ])
            .await;
        redis.cmd(&["PUBLISH", "libtunnel:events", name]).await;
    }
}

async fn fake_conn(mut sock: TcpStream, mode: Fake) -> FakeConn {
    use futures_util::{SinkExt, StreamExt};
    let mut seen = FakeConn::default();
    // Reflection: the real node's nonce, from a connection of our own to it.
    let mut real = None;
    let nonce = match &mode {
        Fake::ForgedAnswer => vec![0x5a; 32],
        Fake::Reflect(url) => {
            let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url.as_str()).expect("request");
            req.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, http::HeaderValue::from_static(libtunnel::protocol::MUX_SUBPROTOCOL));
            let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("ws to the real node");
            let pre = raw::next_binary(&mut ws).await.expect("the real node's preamble");
            let n = libtunnel::protocol::ServerConnect::decode_checked(&pre).expect("preamble");
            real = Some(ws);
            n
        }
    };
    sock.write_all(&libtunnel::protocol::ServerConnect::new(&nonce).encode_bytes()).await.expect("preamble");
    let mut magic = [0u8; 4];
    if sock.read_exact(&mut magic).await.is_err() {
        return seen;
    }
    let (mut source, mut sink) = libtunnel::transport::tcp_frames(Box::new(sock));
    let Some(Ok(hello)) = within(STEP, "the dialing node's hello", source.next()).await else { return seen };
    seen.hello = true;
    let answer = match real.as_mut() {
        Some(ws) => {
            ws.send(tokio_tungstenite::tungstenite::Message::Binary(hello)).await.expect("pass the hello on");
            let a = raw::next_binary(ws).await.unwrap_or_default();
            seen.reflected = Some(a.clone());
            a
        }
        None => {
            let mut a = libtunnel::protocol::HelloAck { refusal: None }.encode().to_vec();
            a.extend_from_slice(&[9u8; 36]);
            a.into()
        }
    };
    let _ = sink.send(answer).await;
    loop {
        match tokio::time::timeout(Duration::from_secs(3), source.next()).await {
            Ok(Some(Ok(_))) => seen.frames_after += 1,
            Ok(_) => {
                seen.closed = true;
                break;
            }
            Err(_) => break,
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_cluster_key_gets_no_request_and_cannot_reflect_a_nonce() {
    let _one = SERIAL.lock().await;
    init_tracing();
    if !cluster::cluster_programs() {
        return;
    }
    let (redis, nodes) = start_cluster(2, &[]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    // Reflection first: B dials the fake node, which hands B a nonce of A's and passes B's
    // signed hello on to A, to be taken for a node there.
    let fake = FakeNode::start(Fake::Reflect(a.url.clone())).await;
    fake.list_as_holder(&redis, "victim", &"00".repeat(32)).await;
    let (status, body) = get(b.http, "victim.localhost", "/secret").await;
    assert!(status == 502 || status == 503, "a request for a name only the fake node holds is not served: {status} {body}");
    let e = within(STEP, "dial by name", dialer(&b.url).dial("victim:0")).await.expect_err("no stream reaches the fake node");
    assert!(matches!(e.code(), ErrorCode::Refused | ErrorCode::Unreachable), "{e}");
    let conns = fake.conns();
    assert!(!conns.is_empty() && conns.iter().all(|c| c.hello), "B dialed the fake node: {conns:?}");
    for c in &conns {
        let refusal = libtunnel::protocol::HelloAck::decode(c.reflected.as_ref().expect("passed on")).expect("an answer").refusal;
        let (code, msg) = refusal.expect("A refuses B's hello passed on by the fake node");
        assert_eq!(code, ErrorCode::AuthFailed, "{msg}");
        assert!(msg.contains("expected node"), "{msg}");
        assert_eq!(c.frames_after, 0, "B sent nothing after the handshake: {c:?}");
    }
    assert!(a.metric("libtunnel_cluster_node_auth_failures_total").await >= 1);

    // Then an accepting answer with a made-up proof: B refuses it and closes, no stream opened.
    // (B dials a node whose handshake failed again only a second later: wait for that.)
    *fake.mode.lock().unwrap() = Fake::ForgedAnswer;
    let before = fake.conns().len();
    until(STEP, "B dials the fake node again", || async {
        let (status, body) = get(b.http, "victim.localhost", "/secret").await;
        assert!(status == 502 || status == 503, "{status} {body}");
        fake.conns().len() > before
    })
    .await;
    let e = within(STEP, "dial by name", dialer(&b.url).dial("victim:0")).await.expect_err("no stream reaches the fake node");
    assert!(matches!(e.code(), ErrorCode::Refused | ErrorCode::Unreachable), "{e}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let conns = fake.conns();
    for c in &conns[before..] {
        assert!(c.hello && c.closed && c.frames_after == 0, "B closed the session without a frame after the forged answer: {c:?}");
    }
    assert!(b.metric("libtunnel_cluster_node_auth_failures_total").await >= 1);
    assert_eq!(b.metric("libtunnel_cluster_forwarded_streams_total{direction=\"out\"}").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_forward_to_an_exit_from_an_unproved_session_never_reaches_it() {
    use futures_util::SinkExt;
    use libtunnel::protocol::{ExitHeader, Frame, FrameKind};
    let _one = SERIAL.lock().await;
    init_tracing();
    if !cluster::cluster_programs() {
        return;
    }
    let exit_id = Identity::generate();
    let exit_name = exit_id.name();
    let grant = format!("exits=[{{\"name\": \"{exit_name}\", \"key_ids\": [{KID}]}}]");
    let (_redis, nodes) = start_cluster(1, &[grant]).await;
    let a = &nodes[0];
    // The target behind the exit counts every connection it gets.
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let target_addr = target.local_addr().expect("addr");
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((_s, _)) = target.accept().await {
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let rules = format!(r#"[{{"host":"127.0.0.1","port":{}}}]"#, target_addr.port());
    let exit = within(STEP, "exit bind", Listener::builder(&a.url, exit_id).exit(allow(&rules)).bind()).await.expect("the exit registers");
    // The exit works for a real dialer through the node.
    let s = within(STEP, "dial via the exit", dialer(&a.url).dial_via(&target_addr.to_string(), &exit_name)).await.expect("dial via exit");
    drop(s);
    until(STEP, "the target saw the real dial", || {
        let n = hits.load(std::sync::atomic::Ordering::SeqCst);
        async move { n == 1 }
    })
    .await;

    // Node-to-node hellos without the cluster key (a dialer's key instead, malformed, v1), each
    // followed at once by a Forward of an ExitHeader and the CONNECT behind it.
    let mut forward = vec![1u8, exit_name.len() as u8];
    forward.extend_from_slice(exit_name.as_bytes());
    let header = ExitHeader { kid: KID, client: "203.0.113.7:4444".into() }.encode();
    forward.extend_from_slice(&(header.len() as u16).to_be_bytes());
    forward.extend_from_slice(&header);
    forward.extend_from_slice(&5000u32.to_be_bytes());
    forward.extend_from_slice(&[5, 1, 0, 1, 127, 0, 0, 1]);
    forward.extend_from_slice(&target_addr.port().to_be_bytes());
    type MakeHello = Box<dyn Fn(&[u8]) -> Vec<u8>>;
    let hellos: Vec<MakeHello> = vec![
        // v1 (the dialer-only proof), made with a dialer key.
        Box::new(|n: &[u8]| {
            let (date, sig) = key().sign(n, std::time::SystemTime::now());
            [&[b'C'][..], &libtunnel::protocol::Hello { date, sig }.encode()[..]].concat()
        }),
        // v2 with a made-up proof.
        Box::new(|_: &[u8]| {
            let mut b = vec![b'C', 2];
            b.extend_from_slice(&[7u8; 32]);
            b.push(16);
            b.extend_from_slice(FAKE_ID.as_bytes());
            b.push(16);
            b.extend_from_slice(b"0000000000000000");
            b.extend_from_slice(&(3u16).to_be_bytes());
            b.extend_from_slice(b"x:1");
            b.extend_from_slice(&9u32.to_be_bytes());
            b.extend_from_slice(&[1u8; 32]);
            b
        }),
    ];
    for make in &hellos {
        let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(a.url.as_str()).expect("request");
        req.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, http::HeaderValue::from_static(libtunnel::protocol::MUX_SUBPROTOCOL));
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("ws");
        let pre = raw::next_binary(&mut ws).await.expect("preamble");
        let nonce = libtunnel::protocol::ServerConnect::decode_checked(&pre).expect("nonce");
        use tokio_tungstenite::tungstenite::Message;
        ws.send(Message::Binary(make(&nonce).into())).await.expect("hello");
        let _ = ws.send(Message::Binary(Frame::encode(FrameKind::Open, 1, &[]))).await;
        let _ = ws.send(Message::Binary(Frame::encode(FrameKind::Data, 1, &forward))).await;
        let answer = raw::next_binary(&mut ws).await.expect("an answer");
        let (code, msg) = libtunnel::protocol::HelloAck::decode(&answer).expect("answer").refusal.expect("refused");
        assert!(matches!(code, ErrorCode::AuthFailed | ErrorCode::Protocol), "{code:?} {msg}");
        assert!(msg.contains("TUNNEL_CLUSTER_KEY") || msg.contains("same libtunnel version"), "the refusal names the fix: {msg}");
        assert!(raw::next_binary(&mut ws).await.is_none(), "the node closes the session after refusing it");
    }
    // Give a stream that got through every chance to arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1, "only the real dial reached the target");
    let stats = exit.exit_stats().expect("stats");
    assert_eq!((stats.connected, stats.not_allowed, stats.failed), (1, 0, 0), "only the real dial reached the exit: {stats:?}");
    assert_eq!(a.metric("libtunnel_cluster_forwarded_streams_total{direction=\"in\"}").await, 0);
    assert!(a.metric("libtunnel_cluster_node_auth_failures_total").await >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_rate_holds_whichever_node_requests_enter() {
    let _one = SERIAL.lock().await;
    init_tracing();
    if !cluster::cluster_programs() {
        return;
    }
    let (_redis, nodes) = start_cluster(2, &["http_listener_rate=5/60".to_string()]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let listener = Arc::new(within(STEP, "bind on A", Listener::builder(&a.url, Identity::generate()).bind()).await.expect("bind"));
    serve(listener.clone());
    let host = format!("{}.localhost", listener.name());
    let mut statuses = Vec::new();
    // Most through the node that does not hold the listener, which alone counted none before.
    for i in 0..12 {
        let via = if i % 3 == 2 { a.http } else { b.http };
        statuses.push(get(via, &host, "/x").await.0);
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(ok, 5, "5 requests per 60 s for the listener in all, across both nodes: {statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200 || *s == 429), "{statuses:?}");
    assert!(b.metric("libtunnel_cluster_forwarded_streams_total{direction=\"out\"}").await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_redis_does_not_end_a_listener() {
    let _one = SERIAL.lock().await;
    init_tracing();
    if !cluster::cluster_programs() {
        return;
    }
    let (redis, nodes) = start_cluster(2, &[]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let id = Identity::generate();
    let listener = Arc::new(within(STEP, "bind on A", Listener::builder(&a.url, id.clone()).bind()).await.expect("bind"));
    let name = listener.name();
    serve(listener.clone());
    let key = format!("libtunnel:name:{name}");
    let fields = redis.cmd(&["HKEYS", &key]).await;
    let a_id = fields.iter().find_map(|f| f.strip_prefix("n:")).expect("A's holder entry").to_string();
    let owner = redis.cmd(&["HGET", &key, "owner"]).await.remove(0);
    let reachable_via_b = || {
        let (url, name) = (b.url.clone(), name.clone());
        async move {
            match dialer(&url).dial(&format!("{name}:0")).await {
                Ok(s) => matches!(echo_roundtrip(s, b"still here", true).await, Ok(h) if h == sha256(b"still here")),
                Err(_) => false,
            }
        }
    };

    // The holder entry deleted (and the change announced): A claims the name again.
    redis.cmd(&["DEL", &key]).await;
    redis.cmd(&["PUBLISH", "libtunnel:events", &name]).await;
    let took = until(STEP, "reachable through B after the holder entry was deleted", reachable_via_b).await;
    eprintln!("reachable again through B {took:?} after the holder entry was deleted");

    // A's entry replaced by a node without the cluster key, "holding" it for the same key: A
    // asks that node, which cannot prove the key; A removes it and keeps its listener.
    let fake = FakeNode::start(Fake::ForgedAnswer).await;
    redis.cmd(&["HDEL", &key, &format!("n:{a_id}"), &format!("i:{a_id}")]).await;
    let t = Instant::now();
    fake.list_as_holder(&redis, &name, &owner).await;
    until(STEP, "A removes the forged holder and claims the name again", || {
        let (redis, key, a_id) = (&redis, key.clone(), a_id.clone());
        async move {
            let fields = redis.cmd(&["HKEYS", &key]).await;
            fields.contains(&format!("n:{a_id}")) && !fields.contains(&format!("n:{FAKE_ID}"))
        }
    })
    .await;
    until(STEP, "reachable through B after a forged holder", reachable_via_b).await;
    eprintln!("reachable again through B {:?} after a forged holder entry", t.elapsed());
    assert!(a.metric("libtunnel_cluster_claims_disproved_total").await >= 1);
    assert!(fake.conns().iter().all(|c| c.frames_after == 0), "the fake node got no stream: {:?}", fake.conns());
    // The listener never stopped: it still serves through its own node.
    let s = within(STEP, "dial on A", dialer(&a.url).dial(&format!("{name}:0"))).await.expect("A still has the listener");
    assert_eq!(within(STEP, "echo", echo_roundtrip(s, b"direct", true)).await.expect("echo"), sha256(b"direct"));
    assert_eq!(a.metric("libtunnel_listeners_active").await, 1);

    // Redis's owner field rewritten to another key: the same key registering again on B still
    // replaces A's listener, as it would without the write (A's node confirms it holds the name,
    // but for this very key).
    redis.cmd(&["HSET", &key, "owner", &"11".repeat(32)]).await;
    let second = Arc::new(within(STEP, "the same key on B", Listener::builder(&b.url, id).bind()).await.expect("the same key replaces"));
    serve(second.clone());
    let e = within(STEP, "A's listener is replaced", listener.accept()).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::NameTaken, "{e}");
    let s = within(STEP, "dial via A", dialer(&a.url).dial(&format!("{name}:0"))).await.expect("reaches the listener on B");
    assert_eq!(within(STEP, "echo", echo_roundtrip(s, b"on B", true)).await.expect("echo"), sha256(b"on B"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_progress_for_a_listener_are_counted_where_it_is_held() {
    let _one = SERIAL.lock().await;
    init_tracing();
    if !cluster::cluster_programs() {
        return;
    }
    let (_redis, nodes) = start_cluster(2, &["http_max_requests_per_listener=2".to_string()]).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let listener = Arc::new(within(STEP, "bind on A", Listener::builder(&a.url, Identity::generate()).bind()).await.expect("bind"));
    serve(listener.clone());
    let host = format!("{}.localhost", listener.name());
    // Two uploads in progress through B (the listener streams each body back as it comes, so
    // the response has begun but not ended).
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = within(STEP, "connect to B", TcpStream::connect(b.http)).await.expect("connect");
        s.write_all(format!("POST /hold HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1000\r\n\r\nx").as_bytes()).await.expect("send");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            within(STEP, "response head", s.read_exact(&mut byte)).await.expect("head");
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
        held.push(s);
    }
    // The listener's two places are taken on A, whichever node the next request enters.
    for via in [a.http, b.http] {
        let (status, body) = get(via, &host, "/x").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("http_max_requests_per_listener = 2"), "{body}");
    }
    // Once the uploads end (the clients go away), the places come back.
    drop(held);
    until(STEP, "the places are given back", || async { get(b.http, &host, "/x").await.0 == 200 }).await;
    assert_eq!(get(a.http, &host, "/x").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_holding_an_exit_checks_the_grant_itself() {
    let _one = SERIAL.lock().await;
    init_tracing();
    if !cluster::cluster_programs() {
        return;
    }
    use base64::Engine;
    let other = libtunnel::Key::new(4, b"another-dialer-secret-0123456789".to_vec()).expect("key");
    let exit_id = Identity::generate();
    let exit_name = exit_id.name();
    let redis = Redis::start(cluster::free_port().await).await;
    // A holds the exit and grants it to KID only; B (wrongly, or by an attacker's hand) also
    // grants it to key 4.
    let a = Node::start(&redis.url(), &[format!("exits=[{{\"name\": \"{exit_name}\", \"key_ids\": [{KID}]}}]")]).await;
    let keys = format!(
        r#"auth_keys=[{{"kid":{KID},"data":"{}"}},{{"kid":4,"data":"{}"}}]"#,
        base64::engine::general_purpose::STANDARD.encode(SECRET),
        base64::engine::general_purpose::STANDARD.encode(other.secret())
    );
    let b = Node::start(&redis.url(), &[keys, format!("exits=[{{\"name\": \"{exit_name}\", \"key_ids\": [{KID}, 4]}}]")]).await;
    let target = echo_server().await;
    let rules = format!(r#"[{{"host":"127.0.0.1","port":{}}}]"#, target.port());
    let exit = within(STEP, "exit bind on A", Listener::builder(&a.url, exit_id).exit(allow(&rules)).bind()).await.expect("the exit registers");
    // A key both grant: through B to the exit on A.
    let s = within(STEP, "dial via the exit through B", dialer(&b.url).dial_via(&target.to_string(), &exit_name)).await.expect("granted");
    assert_eq!(within(STEP, "echo", echo_roundtrip(s, b"granted", true)).await.expect("echo"), sha256(b"granted"));
    // Key 4: B lets it through, A refuses it.
    let d = Dialer::builder(&b.url).key(other).timeout(STEP).build().expect("dialer");
    let e = within(STEP, "dial via the exit with key 4", d.dial_via(&target.to_string(), &exit_name)).await.expect_err("A's grant decides");
    assert_eq!(e.code(), ErrorCode::NotAllowed, "{e}");
    let stats = exit.exit_stats().expect("stats");
    assert_eq!(stats.connected, 1, "only the granted stream reached the exit: {stats:?}");
}

/// Redis `INFO commandstats`: calls of `cmd` since the last `CONFIG RESETSTAT`.
async fn redis_calls(redis: &Redis, cmd: &str) -> u64 {
    let info = redis.cmd(&["INFO", "commandstats"]).await.join("\n");
    info.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("cmdstat_{cmd}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_names_cost_redis_one_refresh_per_node_and_a_dead_nodes_names_are_collected() {
    let _one = SERIAL.lock().await;
    init_tracing();
    if !cluster::cluster_programs() {
        return;
    }
    // cluster_ttl = 1 s: each node refreshes every 1/3 s.
    let (redis, mut nodes) = start_cluster(2, &["cluster_ttl=1".to_string()]).await;
    const N: usize = 50;
    let mut listeners = Vec::new();
    for _ in 0..N {
        listeners.push(Arc::new(within(STEP, "bind on A", Listener::bind(&nodes[0].url, Identity::generate())).await.expect("bind")));
    }
    let probe = listeners[0].clone();
    let name = probe.name();
    serve(probe.clone());
    until(STEP, "node A claims every name", || async { nodes[0].metric("libtunnel_cluster_claims").await == N as i64 }).await;

    // Holding the names: over 3 s (9 refresh ticks per node), Redis runs a fixed number of
    // scripts per node and tick (announce, collect), none per name. Refreshing each name would
    // be N × 9 = 450 script calls from node A alone.
    let _ = redis.cmd(&["CONFIG", "RESETSTAT"]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let scripts = redis_calls(&redis, "evalsha").await + redis_calls(&redis, "eval").await;
    println!("{N} names held for 3 s with cluster_ttl=1: {scripts} script calls in all (2 nodes)");
    assert!(scripts <= 2 * 2 * 12, "{scripts} script calls in 3 s: the refresh must not grow with the names held");
    // Three TTLs without a per-name refresh: the names still resolve through node B.
    let (status, body) = get(nodes[1].http, &format!("{name}.localhost"), "/held").await;
    assert_eq!((status, body.as_str()), (200, format!("/held from {name}").as_str()));

    // Node A dies (its listeners know only A's URL, so they stay away): B collects every name A
    // held within the TTL and a few ticks, and forgets A.
    nodes[0].kill9().await;
    let took = until(Duration::from_secs(10), "B collects the dead node's names", || async {
        redis.count_keys("libtunnel:name:*").await == 0 && redis.count_keys("libtunnel:held:*").await == 0
    })
    .await;
    println!("a dead node's {N} names collected {:.2} s after its SIGKILL (cluster_ttl=1)", took.as_secs_f64());
    let left = redis.cmd(&["SMEMBERS", "libtunnel:nodes"]).await;
    assert_eq!(left.len(), 1, "only the live node stays listed: {left:?}");
    // And the dead node's name now answers as offline, not as a route to a dead node.
    let (status, body) = get(nodes[1].http, &format!("{name}.localhost"), "/gone").await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("is online"), "{body}");
    for l in &listeners {
        l.close();
    }
}

/// The admin token of the fleet-view test's nodes.
const ADMIN_TOKEN: &str = "fleet-view-admin-token-0123456789";

/// `GET path` on an admin endpoint (with `Authorization: Bearer` when `token`): status, the raw
/// response (head and body).
async fn admin_get(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let mut s = within(STEP, "connect to the admin endpoint", TcpStream::connect(addr)).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: admin\r\n{auth}Connection: close\r\n\r\n").as_bytes()).await.expect("send");
    let mut out = String::new();
    within(STEP, "the admin answer", s.read_to_string(&mut out)).await.expect("read");
    (out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0), out)
}

/// The JSON body of an admin answer.
fn json_body(raw: &str) -> serde_json::Value {
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("no JSON in {raw:?}: {e}"))
}

/// Headless Chromium (Debian's `chromium`), or `None` with the reason in the skip log.
fn chromium() -> Option<std::path::PathBuf> {
    if let Some(p) = cluster::program("chromium").or_else(|| cluster::program("chromium-browser")) {
        return Some(p);
    }
    let why = "dashboard browser check skipped: chromium not installed (apt-get install chromium; scripts/test.sh does)";
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("{why}");
    if let Some(log) = std::env::var_os("LIBTUNNEL_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = writeln!(f, "{why}");
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_shows_the_whole_fleet_and_the_dashboard_draws_it_from_loopback_only() {
    let _one = SERIAL.lock().await;
    init_tracing();
    if !cluster::cluster_programs() {
        return;
    }
    let (k, k_solo) = (Identity::generate(), Identity::generate());
    let grants = format!(
        "listener_keys=[{{\"public_key\": \"{}\", \"names\": [\"shared\"]}}, {{\"public_key\": \"{}\", \"names\": [\"solo\"]}}]",
        k.public_key_base64(),
        k_solo.public_key_base64()
    );
    let redis = Redis::start(cluster::free_port().await).await;
    let mut nodes = Vec::new();
    let mut admins = Vec::new();
    for _ in 0..2 {
        let port = cluster::free_port().await;
        let admin: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        nodes.push(Node::start(&redis.url(), &[grants.clone(), format!("admin_listen={admin}"), format!("admin_token={ADMIN_TOKEN}")]).await);
        admins.push(admin);
    }
    let (a, b) = (&nodes[0], &nodes[1]);
    // One plain listener on A; a pool with a replica on each node.
    let solo = Arc::new(within(STEP, "bind solo on A", Listener::builder(&a.url, k_solo).name("solo").bind()).await.expect("bind solo"));
    let p1 = within(STEP, "pool on A", Listener::builder(&a.url, k.clone()).name("shared").pool(true).bind()).await.expect("pool on A");
    let p2 = within(STEP, "pool on B", Listener::builder(&b.url, k).name("shared").pool(true).bind()).await.expect("pool on B");
    serve(solo.clone());

    // Each node answers for the whole cluster (asked on B, which holds only a replica).
    let t = Instant::now();
    let listeners = loop {
        let (status, raw) = admin_get(admins[1], "/cluster/listeners", Some(ADMIN_TOKEN)).await;
        assert_eq!(status, 200, "{raw}");
        let listeners = json_body(&raw);
        if listeners.as_array().is_some_and(|l| l.len() == 2 && l[0]["replicas"] == 2) {
            break listeners;
        }
        assert!(t.elapsed() < STEP, "both names with their holders in /cluster/listeners: {listeners:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (status, raw) = admin_get(admins[1], "/cluster/nodes", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{raw}");
    let fleet = json_body(&raw);
    let fleet_nodes = fleet.as_array().expect("an array of nodes");
    assert_eq!(fleet_nodes.len(), 2, "{fleet:#}");
    assert!(fleet_nodes.iter().all(|n| n["alive"] == true && n["url"].as_str().is_some_and(|u| u.starts_with("ws"))), "{fleet:#}");
    assert_eq!(fleet_nodes.iter().filter(|n| n["this"] == true).count(), 1, "{fleet:#}");
    let id_of = |url: &str| fleet_nodes.iter().find(|n| n["url"] == url).map(|n| n["id"].as_str().unwrap_or("").to_string());
    let a_id = id_of(&a.url).unwrap_or_else(|| panic!("node A ({}) in {fleet:#}", a.url));
    assert_eq!(fleet_nodes.iter().find(|n| n["id"] == a_id.as_str()).map(|n| n["names"].clone()), Some(serde_json::json!(2)));
    let (shared, solo_row) = (&listeners[0], &listeners[1]);
    assert_eq!((shared["name"].as_str(), shared["pool"].as_bool(), shared["exit"].as_bool()), (Some("shared"), Some(true), Some(false)));
    assert_eq!((solo_row["name"].as_str(), solo_row["replicas"].as_u64(), solo_row["pool"].as_bool()), (Some("solo"), Some(1), Some(false)));
    assert_eq!(solo_row["nodes"][0]["id"].as_str(), Some(a_id.as_str()), "{listeners:#}");
    // Without the token: refused.
    assert_eq!(admin_get(admins[0], "/cluster/nodes", None).await.0, 401);

    // `tunnel status --cluster`: aligned tables from either node.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tunnel"))
        .args(["status", "--cluster", "--admin", &admins[0].to_string(), "--token", ADMIN_TOKEN])
        .env_remove("TUNNEL_ADMIN_TOKEN")
        .output()
        .await
        .expect("run tunnel status --cluster");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && out.stderr.is_empty(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("NODE") && lines[0].ends_with("NAMES"), "{text}");
    let header = lines.iter().position(|l| l.starts_with("LISTENER")).expect("the listeners table");
    let col = lines[header].find("REPLICAS").expect("a REPLICAS column");
    let shared_line = lines[header + 1];
    assert!(shared_line.starts_with("shared") && shared_line.contains("pool"), "{text}");
    // Right-aligned under its header: the count ends where the header ends.
    assert_eq!(&shared_line[col..col + "REPLICAS".len()], "       2", "{text}");
    assert!(text.trim_end().ends_with("2 of 2 node(s) alive (* the node asked); 2 listener name(s) in the cluster"), "{text}");

    // Some traffic and a refusal on A, for the charts of A's page below (a node counts the
    // bodies of the listeners it holds), and a refusal on B.
    let (status, _) = get(a.http, "solo.localhost", "/x").await;
    assert_eq!(status, 200);
    assert_eq!(get(a.http, "nobody.localhost", "/x").await.0, 502);
    assert_eq!(get(b.http, "nobody.localhost", "/x").await.0, 502);

    // The dashboard: behind the token, compiled in, kept on its own origin.
    assert_eq!(admin_get(admins[0], "/dashboard", None).await.0, 401);
    let (status, raw) = admin_get(admins[0], &format!("/dashboard?token={ADMIN_TOKEN}"), None).await;
    assert_eq!(status, 200, "{raw}");
    let csp = raw.lines().find(|l| l.to_ascii_lowercase().starts_with("content-security-policy:")).unwrap_or_else(|| panic!("a CSP in {raw}"));
    assert!(csp.contains("default-src 'self'"), "{csp}");
    let mut assets = raw.clone();
    for path in ["/dashboard/app.js", "/dashboard/app.css"] {
        let (status, raw) = admin_get(admins[0], path, None).await;
        assert_eq!(status, 200, "{path}: {raw}");
        assets.push_str(&raw);
    }
    // No address of any other origin anywhere in the page or its assets.
    assert!(!assets.contains("://") && !assets.contains("src=\"//") && !assets.contains("href=\"//"), "an external reference in the dashboard");
    let (status, raw) = admin_get(admins[1], "/dashboard/data", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{raw}");
    let data = json_body(&raw);
    assert_eq!(data["cluster"]["listeners"].as_array().map(Vec::len), Some(2), "{data:#}");
    assert_eq!((&data["cluster"]["listener_count"], &data["cluster"]["truncated"]), (&serde_json::json!(2), &serde_json::json!(false)), "{data:#}");
    assert_eq!(data["errors"], serde_json::json!([{"reason": "listener_offline", "count": 1}]), "{data:#}");
    assert!(data["history"].as_array().is_some_and(|h| !h.is_empty()), "{data:#}");

    if let Some(browser) = chromium() {
        let profile = std::env::temp_dir().join(format!("libtunnel-chromium-{}", std::process::id()));
        let netlog = profile.with_extension("netlog.json");
        let origin = format!("http://{}", admins[0]);
        let url = format!("{origin}/dashboard?token={ADMIN_TOKEN}");
        let chromium = |out: &[String]| {
            let mut cmd = tokio::process::Command::new(&browser);
            cmd.args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions"])
                .args(["--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-default-apps"])
                // Any name but loopback fails to resolve (an address literal still would not:
                // the net log below is what shows where the page went).
                .arg("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")
                .arg(format!("--user-data-dir={}", profile.display()))
                .args(["--window-size=1280,1000", "--virtual-time-budget=10000"])
                .args(out)
                .arg(&url)
                .kill_on_drop(true);
            cmd
        };
        let mut run = chromium(&[format!("--log-net-log={}", netlog.display()), "--dump-dom".into()]);
        let out = within(Duration::from_secs(90), "chromium --dump-dom", run.output()).await.expect("run chromium");
        let dom = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
        // Every request the page made (its own document, assets, data polls, and anything it
        // would have fetched elsewhere) went to the admin endpoint on loopback.
        let log: serde_json::Value = serde_json::from_slice(&std::fs::read(&netlog).expect("chromium's net log")).expect("a whole JSON net log");
        let asked = page_requests(&log, &origin);
        assert!(asked.iter().all(|u| u.starts_with(&format!("{origin}/"))), "the page asked beyond {origin}: {asked:#?}");
        for path in ["/dashboard?", "/dashboard/app.js", "/dashboard/app.css", "/dashboard/data"] {
            assert!(asked.iter().any(|u| u.starts_with(&format!("{origin}{path}"))), "{path} among the page's requests: {asked:#?}");
        }
        assert!(dom.contains("data-loaded=\"1\""), "the page drew its data: {dom}");
        assert!(dom.contains("id=\"listener-count\">2<") && dom.contains("id=\"node-count\">2<"), "2 names on 2 nodes: {dom}");
        for chart in ["chart-traffic", "chart-streams", "chart-refusals", "chart-sessions"] {
            let at = dom.find(&format!("id=\"{chart}\"")).unwrap_or_else(|| panic!("{chart} in {dom}"));
            let svg = &dom[at..at + dom[at..].find("</svg>").expect("the chart's end")];
            assert!(svg.contains("<rect class=\"bar"), "{chart} has bars: {svg}");
        }
        assert!(dom.contains(">solo<") && dom.contains(">shared<") && dom.contains(">listener_offline<"), "{dom}");
        // A screenshot, kept for a person to look at: the page renders at the window's size.
        let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
        let mut run = chromium(&[format!("--screenshot={}", shot.display())]);
        let out = within(Duration::from_secs(90), "chromium --screenshot", run.output()).await.expect("run chromium");
        assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
        let png = std::fs::read(&shot).expect("the screenshot");
        assert_eq!((&png[..8], &png[16..24]), (&b"\x89PNG\r\n\x1a\n"[..], &[0, 0, 5, 0, 0, 0, 3, 232][..]), "a 1280x1000 PNG at {}", shot.display());
        // The screenshot read back by the browser (a canvas stands in for a PNG decoder): the
        // bars' colours (dashboard.css) in four separate panels, two columns of two, as the
        // page lays its charts out at this width.
        let check = profile.with_extension("check.html");
        let png_b64 = {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(&png)
        };
        std::fs::write(&check, format!("<!doctype html><pre id=\"out\">none</pre><script>{SCREENSHOT_BARS}</script><img id=\"shot\" src=\"data:image/png;base64,{png_b64}\">"))
            .expect("write the check page");
        let out = tokio::process::Command::new(&browser)
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions", "--disable-background-networking"])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(["--virtual-time-budget=5000", "--dump-dom"])
            .arg(format!("file://{}", check.display()))
            .kill_on_drop(true)
            .output();
        let out = within(Duration::from_secs(90), "chromium reading the screenshot", out).await.expect("run chromium");
        let _ = std::fs::remove_file(&check);
        let dom = String::from_utf8_lossy(&out.stdout);
        let panels = dom.split_once("<pre id=\"out\">").and_then(|(_, r)| r.split_once('<')).map_or("", |(p, _)| p);
        // Per column (left, right), the vertical runs of bar pixels: "y0-y1" each.
        let columns: Vec<Vec<&str>> = panels.split('|').map(|c| c.split(' ').filter(|r| !r.is_empty()).collect()).collect();
        assert!(columns.len() == 2 && columns.iter().all(|runs| runs.len() == 2), "bars in two charts per column in {}: {panels:?}", shot.display());
        eprintln!(
            "dashboard screenshot: {} ({} bytes), bars at {panels}; {} requests from the page, all to {origin}",
            shot.display(),
            png.len(),
            asked.len()
        );
        let _ = std::fs::remove_dir_all(&profile);
        let _ = std::fs::remove_file(&netlog);
    }
    drop((p1, p2, solo));
}

/// Run in a page holding a screenshot (`<img id="shot">`): finds the pixels of the chart bars'
/// colours (#3a6ea5, #e08a2c), and writes, for the left and the right half of the image, the
/// vertical runs they form ("y0-y1 y0-y1|y0-y1 ..."; a gap of 20 rows ends a run).
const SCREENSHOT_BARS: &str = r#"
addEventListener("load", () => {
  const img = document.getElementById("shot");
  const c = document.createElement("canvas");
  c.width = img.naturalWidth;
  c.height = img.naturalHeight;
  const g = c.getContext("2d");
  g.drawImage(img, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  const rows = [new Set(), new Set()];
  for (let y = 0; y < c.height; y++) {
    for (let x = 0; x < c.width; x++) {
      const i = (y * c.width + x) * 4;
      const [r, gr, b] = [d[i], d[i + 1], d[i + 2]];
      if ((r === 0x3a && gr === 0x6e && b === 0xa5) || (r === 0xe0 && gr === 0x8a && b === 0x2c)) rows[x < c.width / 2 ? 0 : 1].add(y);
    }
  }
  document.getElementById("out").textContent = rows.map((set) => {
    const ys = [...set].sort((a, b) => a - b);
    const runs = [];
    for (const y of ys) {
      if (runs.length && y - runs[runs.length - 1][1] <= 20) runs[runs.length - 1][1] = y;
      else runs.push([y, y]);
    }
    return runs.map(([a, b]) => a + "-" + b).join(" ");
  }).join("|");
});
"#;

/// The URLs a page asked for, from a Chromium net log (`--log-net-log`): the requests its
/// origin started, and every request under its top frame (keyed by the page's site), as opposed
/// to the browser's own background requests.
fn page_requests(netlog: &serde_json::Value, origin: &str) -> Vec<String> {
    let start = netlog["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"].as_u64().expect("URL_REQUEST_START_JOB in the net log's constants");
    let site = format!("{} ", origin.rsplit_once(':').map_or(origin, |(s, _)| s));
    let events = netlog["events"].as_array().expect("the net log's events");
    events
        .iter()
        .filter(|e| e["type"].as_u64() == Some(start))
        .map(|e| &e["params"])
        .filter(|p| p["initiator"] == origin || p["network_isolation_key"].as_str().is_some_and(|k| k.starts_with(&site)))
        .filter_map(|p| p["url"].as_str().map(String::from))
        .collect()
}

/// A field of a flat `SENTINEL MASTER` reply.
fn field<'a>(reply: &'a [String], name: &str) -> Option<&'a str> {
    reply.chunks(2).find(|kv| kv[0] == name).and_then(|kv| kv.get(1)).map(String::as_str)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_sentinel_the_cluster_follows_a_failover_and_claims_nothing_twice() {
    let _one = SERIAL.lock().await;
    init_tracing();
    if !cluster::cluster_programs() || !cluster::sentinel_program() {
        return;
    }
    const MASTER: &str = "relays";
    let dir = std::env::temp_dir().join(format!("libtunnel-sentinel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut primary = Redis::start(cluster::free_port().await).await;
    let replica = Redis::start_replica(cluster::free_port().await, primary.port, &dir).await;
    let mut sentinels = Vec::new();
    for _ in 0..3 {
        sentinels.push(Redis::start_sentinel(cluster::free_port().await, primary.port, MASTER, &dir).await);
    }
    // Each sentinel knows the replica and the two other sentinels (they find each other through
    // the primary), so a failover can be agreed.
    let t = Instant::now();
    for s in &sentinels {
        loop {
            let m = s.cmd(&["SENTINEL", "MASTER", MASTER]).await;
            if field(&m, "num-slaves") == Some("1") && field(&m, "num-other-sentinels") == Some("2") {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "the sentinels did not find the replica and each other within 30 s: {m:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let (k1, k2) = (Identity::generate(), Identity::generate());
    let grants = format!(
        "listener_keys=[{{\"public_key\": \"{}\", \"names\": [\"survivor\"]}}, {{\"public_key\": \"{}\", \"names\": [\"survivor\"]}}]",
        k1.public_key_base64(),
        k2.public_key_base64()
    );
    let url = format!("redis+sentinel://{}/{MASTER}", sentinels.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect::<Vec<_>>().join(","));
    // Node keys must outlive the failover: about 2.5 s here, but a split vote among the
    // sentinels adds twice their failover-timeout (2 s) per round. A node key that expires
    // meanwhile takes its names with it until the node claims them again.
    let settings = [grants, "cluster_ttl=30".to_string()];
    let a = Node::start(&url, &settings).await;
    let b = Node::start(&url, &settings).await;
    let listener = Arc::new(within(STEP, "bind on A", Listener::builder(&a.url, k1).name("survivor").bind()).await.expect("bind"));
    serve(listener.clone());
    // Claimed on the primary and passed on to the replica before the primary dies (the first
    // claim may wait for the nodes to ask the sentinels where the primary is).
    async fn holders(r: &Redis) -> usize {
        r.cmd_ok(&["HKEYS", "libtunnel:name:survivor"]).await.unwrap_or_default().iter().filter(|f| f.starts_with("n:")).count()
    }
    let r = &replica;
    until(
        STEP,
        "the claim and both node keys reach the replica",
        || async move { holders(r).await == 1 && r.count_keys("libtunnel:node:*").await == 2 },
    )
    .await;

    // Dials by name through B (the listener is on A) and through A, every 20 ms, until told to
    // stop: (when it started, how long it took, through B?, the error code if it failed).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut traffic = Vec::new();
    for (via, through_b) in [(b.url.clone(), true), (a.url.clone(), false)] {
        let (stop, ok) = (stop.clone(), ok.clone());
        traffic.push(tokio::spawn(async move {
            let d = dialer(&via);
            let mut log = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                let r: Result<(), ErrorCode> = within(STEP, "a dial by name", async {
                    let s = d.dial("survivor:0").await.map_err(|e| e.code())?;
                    echo_roundtrip(s, b"through the failover", true).await.map(|_| ()).map_err(|_| ErrorCode::Io)
                })
                .await;
                if r.is_ok() {
                    ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                log.push((started, started.elapsed(), through_b, r.err()));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            log
        }));
    }
    let ok_count = &ok;
    until(STEP, "dials flow", || async move { ok_count.load(std::sync::atomic::Ordering::Relaxed) >= 10 }).await;

    let killed = Instant::now();
    primary.stop().await;
    // The sentinels promote the replica...
    let port = replica.port.to_string();
    until(Duration::from_secs(30), "the sentinels promote the replica", || {
        let (s, port) = (&sentinels[0], port.clone());
        async move { s.cmd(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER]).await.get(1) == Some(&port) }
    })
    .await;
    let promoted = killed.elapsed();
    // ...and the cluster follows: both nodes subscribe to the change notices on the new primary.
    until(Duration::from_secs(30), "both nodes follow to the new primary", || async move {
        r.cmd(&["PUBSUB", "NUMSUB", "libtunnel:events"]).await.get(1).map(String::as_str) == Some("2")
    })
    .await;
    let followed = killed.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut log: Vec<(Instant, Duration, bool, Option<ErrorCode>)> = Vec::new();
    for t in traffic {
        log.extend(t.await.expect("traffic task"));
    }
    type Dial<'a> = &'a (Instant, Duration, bool, Option<ErrorCode>);
    let (via_a, via_b): (Vec<Dial>, Vec<Dial>) = log.iter().partition(|(_, _, through_b, _)| !through_b);
    // The name kept resolving through the failover: on A (its own listener), and on B (the route
    // it knew, used while no primary answered; A confirmed each stream).
    assert!(via_a.iter().all(|(.., e)| e.is_none()), "dials through A failed: {via_a:?}");
    let since_kill =
        |at: &Instant| at.checked_duration_since(killed).map_or(-(killed.duration_since(*at).as_millis() as i128), |d| d.as_millis() as i128);
    let failed: Vec<_> = via_b.iter().filter_map(|(at, took, _, e)| e.map(|e| (since_kill(at), took.as_millis(), e))).collect();
    assert!(
        failed.is_empty(),
        "dials through B failed (ms after the kill, ms taken, code); promoted {promoted:?}, followed {followed:?}: {failed:?}"
    );
    // ...and it was asked to, all through the time no primary answered (from the kill until both
    // nodes were on the new one).
    let during: Vec<_> = via_b.iter().filter(|(at, ..)| *at >= killed).collect();
    assert!(during.len() >= 20, "only {} dials through B after the kill: {via_b:?}", during.len());
    let before_promotion = during.iter().filter(|(at, ..)| at.duration_since(killed) < promoted).count();
    assert!(before_promotion >= 10, "only {before_promotion} dials through B before the promotion: {during:?}");
    let slowest = during.iter().map(|(_, took, ..)| *took).max().unwrap_or_default();
    eprintln!(
        "sentinel failover: promoted {:.2} s after the kill, both nodes on the new primary {:.2} s after the kill; {} dials through B after the kill ({} before the promotion, slowest {} ms) and {} through A in all, none failed",
        promoted.as_secs_f64(),
        followed.as_secs_f64(),
        during.len(),
        before_promotion,
        slowest.as_millis(),
        via_a.len(),
    );

    // Nothing claimed twice: one holder on the new primary, and another key is refused the name.
    assert_eq!(holders(r).await, 1);
    let e = within(STEP, "k2 on B", Listener::builder(&b.url, k2).name("survivor").bind()).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::NameTaken, "{e}");
    assert_eq!(a.metric("libtunnel_cluster_claims").await, 1);
    assert_eq!(b.metric("libtunnel_cluster_claims").await, 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_over_quic_to_one_node_reaches_a_listener_held_by_another() {
    let _one = SERIAL.lock().await;
    init_tracing();
    if !cluster::cluster_programs() {
        return;
    }
    let redis = Redis::start(cluster::free_port().await).await;
    // Node A serves QUIC (with a certificate for localhost); node B holds the listener.
    let (cert, tls_key, pem) = self_signed_cert();
    let quic_set = [format!("tls_cert={}", cert.display()), format!("tls_key={}", tls_key.display()), "quic_listen=127.0.0.1:0".into()];
    let a = Node::start(&redis.url(), &quic_set).await;
    let b = Node::start(&redis.url(), &[]).await;
    let listener = Arc::new(within(STEP, "bind on node B", Listener::builder(&b.url, Identity::generate()).bind()).await.expect("bind"));
    let name = listener.name();
    serve(listener.clone());
    let trust = libtunnel::transport::ClientTls::from_pem(pem.as_bytes()).expect("CA bundle");
    let url = format!("quic://localhost:{}", a.quic.expect("node A's QUIC endpoint").port());
    let d = Dialer::builder(&url).key(key()).tls(trust).timeout(STEP).build().expect("dialer");
    // The name is B's: A forwards the stream over its node-to-node session.
    let s = within(STEP, "dial by name through A", d.dial(&format!("{name}:0"))).await.expect("dial by name across nodes");
    let data = payload(64 * MIB, 31);
    let got = within(BULK, "64 MiB echo", echo_roundtrip(s, &data, true)).await.expect("echo");
    assert_eq!(got, sha256(&data), "64 MiB over QUIC to A, then to B's listener, came back unchanged");
    assert_eq!(b.metric("libtunnel_cluster_forwarded_streams_total{direction=\"in\"}").await, 1, "B took the stream from A");
}
