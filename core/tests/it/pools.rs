//! Listener pools end to end on loopback: replicas of one name (real `tunnel listen --pool`
//! processes in front of real local HTTP servers, and in-process listeners), requests through the
//! relay's public HTTP port and dials by name. What is asserted: the spread over replicas, that a
//! replica killed with SIGKILL loses no request sent after its death (and in-flight ones fail
//! with 502 or a reset, never hang), that a SIGTERM'd replica (a rolling restart) fails nothing,
//! that a full replica is skipped, that a retired one gets nothing new while its open streams
//! finish, and that registering without `--pool` keeps today's NAME_TAKEN rules.

use testkit::procs;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libtunnel::config::ListenerGrant;
use libtunnel::{Dialer, ErrorCode, Identity, Listener};
use testkit::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The tests of this file run one at a time: the process-pool test loads both cores, and the
/// registration-order tests must not share them with it (their replaced-session notices then
/// raced the transport's close on a loaded CI machine).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A local HTTP/1.1 server answering every request with `replica-ID` (after 300 ms for paths
/// starting `/slow`), one request per connection.
async fn replica_server(id: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let Some(head) = read_http_head(&mut s).await else { return };
                if head.starts_with(b"GET /slow") {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                let body = format!("replica-{id}");
                let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// One request on a fresh connection: `Ok((status, body))`, or `Err` for a reset or a close
/// before the answer. A request that takes longer than 15 s is reported as a hang.
async fn try_get(http: SocketAddr, host: &str, path: &str) -> Result<(u16, String), String> {
    let work = async {
        let mut s = TcpStream::connect(http).await.map_err(|e| format!("connect: {e}"))?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| format!("no status in {text:?}"))?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Ok((status, body))
    };
    match tokio::time::timeout(Duration::from_secs(15), work).await {
        Ok(r) => r,
        Err(_) => Err("HANG".into()),
    }
}

struct Outcome {
    started: Instant,
    result: Result<(u16, String), String>,
}

/// `total` requests from `workers` concurrent clients; `at` (after that many have finished)
/// runs `event` once, which returns when it happened.
async fn run_requests<F, Fut>(
    http: SocketAddr,
    host: &str,
    total: usize,
    workers: usize,
    slow_every: usize,
    at: usize,
    event: F,
) -> (Vec<Outcome>, Option<Instant>)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Instant> + Send + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    // How many requests have finished; the mid-run event awaits a count.
    let (done, mut finished) = tokio::sync::watch::channel(0usize);
    let done = Arc::new(done);
    let outcomes = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let host = host.to_string();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (next, done, outcomes, host) = (next.clone(), done.clone(), outcomes.clone(), host.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= total {
                    return;
                }
                let path = if slow_every > 0 && i % slow_every == 0 { "/slow" } else { "/" };
                let started = Instant::now();
                let result = try_get(http, &host, path).await;
                outcomes.lock().unwrap().push(Outcome { started, result });
                done.send_modify(|n| *n += 1);
            }
        }));
    }
    let event = (at < total).then(|| {
        tokio::spawn(async move {
            finished.wait_for(|n| *n >= at).await.expect("the counter lives while the workers run");
            event().await
        })
    });
    for t in tasks {
        within(Duration::from_secs(300), "the request workers", t).await.expect("worker");
    }
    let when = match event {
        Some(e) => Some(within(STEP, "the mid-run event", e).await.expect("event task")),
        None => None,
    };
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap());
    (outcomes, when)
}

fn replica_of(o: &Outcome) -> Option<usize> {
    match &o.result {
        Ok((200, body)) => body.strip_prefix("replica-").and_then(|s| s.parse().ok()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_three_processes_spreads_survives_a_kill_and_drains_on_sigterm() {
    let _one_at_a_time = SERIAL.lock().await;
    init_tracing();
    let mut cfg = relay_config(allow_ports(&[1]));
    cfg.http_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    cfg.listeners_open = true;
    let relay = start_relay(cfg).await;
    let http = relay.http_addr().expect("http port");
    let dir = std::env::temp_dir().join(format!("libtunnel-pools-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let key = dir.join("pool.pem");
    Identity::generate().save(&key).expect("key");
    let mut children = Vec::new();
    let mut name = String::new();
    for id in 0..3 {
        let to = replica_server(id).await.to_string();
        let (child, n) = procs::listen_process_with(relay.url(), &key, &["--pool", "--to", &to]).await;
        name = n;
        children.push(child);
    }
    let host = format!("{name}.localhost");

    // 1. Spread: 3,000 requests, each replica between 20% and 47%.
    let (outcomes, _) = run_requests(http, &host, 3000, 8, 0, usize::MAX, || async { Instant::now() }).await;
    let mut counts = [0usize; 3];
    for o in &outcomes {
        match replica_of(o) {
            Some(r) => counts[r] += 1,
            None => panic!("a request failed with every replica up: {:?}", o.result),
        }
    }
    eprintln!("spread over 3 replicas (3000 requests): {counts:?}");
    for (i, c) in counts.iter().enumerate() {
        let share = *c as f64 / 3000.0;
        assert!((0.20..=0.47).contains(&share), "replica {i} got {c} of 3000 ({:.1}%): {counts:?}", share * 100.0);
    }

    // 2. kill -9 replica 0 mid-run: nothing started after the kill is lost; in-flight ones fail
    //    with 502 (or a reset), never hang.
    let mut victim = children.remove(0);
    let (outcomes, killed) = run_requests(http, &host, 1200, 8, 0, 300, move || async move {
        victim.start_kill().expect("SIGKILL");
        victim.wait().await.expect("reap");
        Instant::now()
    })
    .await;
    let killed = killed.expect("the kill happened");
    let (mut after, mut lost, mut inflight_failed) = (0, Vec::new(), Vec::new());
    for o in &outcomes {
        if let Err(e) = &o.result {
            assert_ne!(e, "HANG", "a request hung");
        }
        if o.started > killed {
            after += 1;
            if replica_of(o).is_none() {
                lost.push(format!("{:?}", o.result));
            }
        } else if replica_of(o).is_none() {
            match &o.result {
                Ok((502, _)) | Err(_) => inflight_failed.push(format!("{:?}", o.result)),
                other => panic!("an in-flight request failed otherwise than 502 or reset: {other:?}"),
            }
        }
    }
    eprintln!("kill -9: {after} requests started after the kill, {} lost; {} in flight failed", lost.len(), inflight_failed.len());
    assert!(after >= 800, "most requests ran after the kill ({after})");
    assert!(lost.is_empty(), "requests started after the kill failed: {lost:?}");
    assert!(outcomes.iter().filter(|o| o.started > killed).all(|o| replica_of(o) != Some(0)));

    // 3. SIGTERM replica 1 mid-run (a rolling restart), with slow requests in flight: zero
    //    failures; it exits on its own once drained.
    let pid = children[0].id().expect("pid").to_string();
    let (outcomes, termed) = run_requests(http, &host, 1200, 8, 4, 300, move || async move {
        let ok = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("run kill").success();
        assert!(ok, "kill -TERM");
        Instant::now()
    })
    .await;
    let termed = termed.expect("the SIGTERM happened");
    let failed: Vec<String> = outcomes.iter().filter(|o| replica_of(o).is_none()).map(|o| format!("{:?}", o.result)).collect();
    let drained_on_1 = outcomes.iter().filter(|o| o.started <= termed && replica_of(o) == Some(1)).count();
    eprintln!("SIGTERM: {} of 1200 requests failed; replica 1 served {drained_on_1} before it left", failed.len());
    assert!(failed.is_empty(), "requests failed during a rolling restart: {failed:?}");
    let status = within(Duration::from_secs(40), "the SIGTERM'd replica exits", children[0].wait()).await.expect("wait");
    assert!(status.success(), "a drained replica exits cleanly: {status:?}");
    let last = outcomes.iter().filter(|o| o.started > termed + Duration::from_millis(500)).filter_map(replica_of).collect::<Vec<_>>();
    assert!(!last.is_empty() && last.iter().all(|r| *r == 2), "after the restart only replica 2 serves");
    relay.abort();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pool_a_second_registration_gets_name_taken() {
    let _one_at_a_time = SERIAL.lock().await;
    init_tracing();
    let (a, b) = (Identity::generate(), Identity::generate());
    let mut cfg = relay_config(allow_ports(&[1]));
    cfg.listener_keys = vec![
        ListenerGrant { public_key: a.public_key_base64(), names: vec!["api".into()] },
        ListenerGrant { public_key: b.public_key_base64(), names: vec!["api".into()] },
    ];
    let relay = start_relay(cfg).await;
    let dir = std::env::temp_dir().join(format!("libtunnel-pool-taken-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (ka, kb) = (dir.join("a.pem"), dir.join("b.pem"));
    a.save(&ka).expect("key a");
    b.save(&kb).expect("key b");
    let to = replica_server(0).await.to_string();
    let (_first, name) = procs::listen_process_with(relay.url(), &ka, &["--pool", "--name", "api", "--to", &to]).await;
    assert_eq!(name, "api");
    // A second process, another key granted the same name, without --pool: NAME_TAKEN.
    let out = within(
        STEP,
        "the second listener gives up",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_tunnel"))
            .args(["listen", "--relay", relay.url(), "--key", kb.to_str().unwrap(), "--name", "api", "--to", &to])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("run tunnel listen");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("NAME_TAKEN") && stderr.contains("--pool"), "{stderr}");
    // With --pool it joins.
    let (_second, name) = procs::listen_process_with(relay.url(), &kb, &["--pool", "--name", "api", "--to", &to]).await;
    assert_eq!(name, "api");

    let _ = std::fs::remove_dir_all(&dir);
    relay.abort();
}

fn pool_relay_config() -> libtunnel::RelayConfig {
    let mut cfg = relay_config(allow_ports(&[1]));
    cfg.listeners_open = true;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_without_pool_replaces_and_with_pool_joins() {
    let _one_at_a_time = SERIAL.lock().await;
    init_tracing();
    let relay = start_relay(pool_relay_config()).await;
    let id = Identity::generate();
    let a = within(STEP, "bind a", Listener::builder(relay.url(), id.clone()).pool(true).bind()).await.expect("a");
    let b = within(STEP, "bind b", Listener::builder(relay.url(), id.clone()).pool(true).bind()).await.expect("b joins");
    assert!(a.is_connected() && b.is_connected());
    let c = within(STEP, "bind c", Listener::builder(relay.url(), id.clone()).bind()).await.expect("c replaces");
    for (l, what) in [(&a, "a"), (&b, "b")] {
        let e = within(STEP, "replaced replica stops", l.accept()).await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::NameTaken, "{what}: {e}");
    }
    // And a pool registration meeting a lone (non-pool) holder of the same key replaces it too.
    let d = within(STEP, "bind d", Listener::builder(relay.url(), id).pool(true).bind()).await.expect("d");
    let e = within(STEP, "c stops", c.accept()).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::NameTaken, "{e}");
    drop(d);
    relay.abort();
}

/// Accept streams on `l`, echo them, and count them.
fn serve_echo(l: Arc<Listener>, count: Arc<AtomicUsize>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    })
}

async fn ping(d: &Dialer, name: &str) -> libtunnel::Result<libtunnel::TunnelStream> {
    let mut s = within(STEP, "dial the pool", d.dial(&format!("{name}:0"))).await?;
    s.write_all(b"ping").await.map_err(|e| libtunnel::Error::from_io(e, "write"))?;
    let mut b = [0u8; 4];
    within(STEP, "echo from the pool", s.read_exact(&mut b)).await.map_err(|e| libtunnel::Error::from_io(e, "read"))?;
    assert_eq!(&b, b"ping");
    Ok(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_replica_is_skipped_and_a_retired_one_finishes_its_streams() {
    let _one_at_a_time = SERIAL.lock().await;
    init_tracing();
    let relay = start_relay(pool_relay_config()).await;
    let id = Identity::generate();
    let d = Dialer::builder(relay.url()).key(key()).timeout(STEP).build().expect("dialer");

    // A replica that never accepts, with room for one queued stream, next to one that serves.
    let stuck = within(STEP, "bind stuck", Listener::builder(relay.url(), id.clone()).pool(true).backlog(1).bind()).await.expect("stuck");
    let serving = Arc::new(within(STEP, "bind serving", Listener::builder(relay.url(), id.clone()).pool(true).bind()).await.expect("serving"));
    let served = Arc::new(AtomicUsize::new(0));
    serve_echo(serving.clone(), served.clone());
    let name = serving.name();
    let mut ok = 0;
    let mut open = Vec::new();
    for _ in 0..20 {
        // Dials succeed even when the stuck replica's one queue place is taken (that stream waits
        // in its queue: the dial succeeds, nobody answers, so it is not pinged).
        let s = within(STEP, "dial the pool", d.dial(&format!("{name}:0"))).await.expect("every dial reaches a replica");
        open.push(s);
    }
    for s in &mut open {
        let _ = s.write_all(b"ping").await;
        let mut b = [0u8; 4];
        if tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut b)).await.is_ok_and(|r| r.is_ok()) {
            ok += 1;
        }
    }
    assert!(ok >= 19, "the full replica was skipped: {ok} of 20 streams were served");
    assert_eq!(served.load(Ordering::SeqCst), ok);
    drop(open);
    drop(stuck);

    // Retire: a replica with an open stream leaves the rotation at once; the open stream keeps
    // working; new streams all go to the other replica.
    let leaving = Arc::new(within(STEP, "bind leaving", Listener::builder(relay.url(), id.clone()).pool(true).bind()).await.expect("leaving"));
    let on_leaving = Arc::new(AtomicUsize::new(0));
    serve_echo(leaving.clone(), on_leaving.clone());
    let mut held = None;
    for _ in 0..20 {
        let before = on_leaving.load(Ordering::SeqCst);
        let s = ping(&d, &name).await.expect("dial");
        if on_leaving.load(Ordering::SeqCst) > before {
            held = Some(s);
            break;
        }
    }
    let mut held = held.expect("round-robin reached the second replica within 20 dials");
    leaving.retire();
    let before = (on_leaving.load(Ordering::SeqCst), served.load(Ordering::SeqCst));
    for _ in 0..20 {
        ping(&d, &name).await.expect("dial after retire");
    }
    assert_eq!(on_leaving.load(Ordering::SeqCst), before.0, "a retired replica got a new stream");
    assert_eq!(served.load(Ordering::SeqCst), before.1 + 20);
    held.write_all(b"more").await.expect("the retired replica's open stream still writes");
    let mut b = [0u8; 4];
    within(STEP, "echo on the retired replica", held.read_exact(&mut b)).await.expect("still echoes");
    assert_eq!(&b, b"more");
    held.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    within(STEP, "clean end", held.read_to_end(&mut rest)).await.expect("the open stream finishes cleanly");
    assert!(within(STEP, "drain", leaving.shutdown(STEP)).await, "the retired replica drained");
    relay.abort();
}
