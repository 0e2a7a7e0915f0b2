//! `fleet`: the density load generator (issue 35; `cargo build -p libtunnel --features cli
//! --example fleet`). Registers many listeners from one process through the Rust API (one
//! `Listener` each, its own key and session, as many independent clients would) against one
//! relay, or the nodes of one cluster, then holds them idle and reports, every `--every`
//! seconds, how many are connected. Driven by `bench/fleet.sh`, which measures the relay's
//! memory and Redis's commands per second around it; run alone it prints:
//!
//! - `registered=N secs=S rate_per_s=R failed=F` once every listener has bound (or failed);
//!   with several `--relay` URLs (the nodes of one cluster) listener `i` registers at URL
//!   `i mod k`, so the rate is the cluster's;
//! - with `--check K`: `checked=K ok=X failed=Y secs=S`, after K sampled listeners (spread over
//!   the list) were each dialed by name through the *next* URL in the list (another node of the
//!   cluster, or the same one when there is one URL) and echoed 16 bytes back;
//! - `t=SECS at=UNIX_SECS connected=K attempts=A reconnected=R last_reconnected_at=UNIX_SECS`
//!   every `--every` seconds while holding (a node restart shows as a drop and the climb back;
//!   the listeners' own jittered backoff spaces the re-registrations): `A` counts every
//!   re-registration attempt so far, failed or not, `R` the successful ones, and the last field
//!   is when the latest of them succeeded.
//!
//! With `RUST_LOG=libtunnel::listener=warn` each failed re-registration is logged with its error
//! (`bench/fleet.sh` counts them by error). Every wait is bounded: `--hold` seconds at most, and
//! each bind by `--timeout`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::StreamExt;
use libtunnel::client::events::Event;
use libtunnel::{Dialer, Identity, Key, Listener};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
#[command(name = "fleet", about = "Register many idle listeners from one process (driven by bench/fleet.sh)")]
struct Args {
    /// Relay URL (ws://, wss://, tcp://); repeat it (or separate with commas) for the nodes of
    /// one cluster: listener `i` registers at URL `i mod k`.
    #[arg(long, required = true, value_delimiter = ',')]
    relay: Vec<String>,
    /// After registering, dial this many listeners by name, each through the next URL of
    /// `--relay` (another node), and check an echo.
    #[arg(long, default_value_t = 0)]
    check: usize,
    /// The dialers' key (`TUNNEL_KEY` of `tunnel keygen`), for `--check`.
    #[arg(long, env = "TUNNEL_KEY", default_value = "")]
    key: String,
    /// Listeners to register.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Registrations in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds to hold the listeners after registering (0: exit at once).
    #[arg(long, default_value_t = 0.0)]
    hold: f64,
    /// Seconds between `connected=` lines while holding.
    #[arg(long, default_value_t = 1.0)]
    every: f64,
    /// Cap of each listener's reconnect backoff, seconds.
    #[arg(long, default_value_t = 10.0)]
    max_backoff: f64,
    /// Seconds one bind may take.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

fn main() {
    raise_fd_limit();
    // RUST_LOG=libtunnel::listener=warn: each failed re-registration, with its error.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    tracing_subscriber::fmt().with_env_filter(filter).with_ansi(false).with_writer(std::io::stderr).init();
    let a = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(a.threads.max(1)).enable_all().build().expect("runtime");
    rt.block_on(run(a));
}

async fn run(a: Args) {
    let failed = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let timeout = Duration::from_secs_f64(a.timeout);
    let listeners: Vec<(usize, Listener)> = futures_util::stream::iter(0..a.count)
        .map(|i| {
            let (relay, failed) = (a.relay[i % a.relay.len()].clone(), failed.clone());
            let backoff = Duration::from_secs_f64(a.max_backoff);
            async move {
                let b = Listener::builder(&relay, Identity::generate()).max_backoff(backoff).timeout(timeout);
                match tokio::time::timeout(timeout, b.bind()).await {
                    Ok(Ok(l)) => Some((i, l)),
                    Ok(Err(e)) => {
                        if failed.fetch_add(1, Ordering::Relaxed) == 0 {
                            eprintln!("first failed bind: {e}");
                        }
                        None
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        None
                    }
                }
            }
        })
        .buffer_unordered(a.concurrency.max(1))
        .filter_map(|l| async move { l })
        .collect()
        .await;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "registered={} secs={secs:.2} rate_per_s={:.0} failed={}",
        listeners.len(),
        listeners.len() as f64 / secs.max(1e-9),
        failed.load(Ordering::Relaxed)
    );
    let listeners: Vec<(usize, Arc<Listener>)> = listeners.into_iter().map(|(i, l)| (i, Arc::new(l))).collect();
    if a.check > 0 && !listeners.is_empty() {
        check(&a, &listeners).await;
    }
    if a.hold <= 0.0 {
        return;
    }
    let attempts = Arc::new(AtomicUsize::new(0));
    let back = Arc::new(AtomicUsize::new(0));
    let last_back_ms = Arc::new(AtomicU64::new(0));
    for (_, l) in &listeners {
        let (mut events, attempts, back, last_back_ms) = (l.events(), attempts.clone(), back.clone(), last_back_ms.clone());
        tokio::spawn(async move {
            while let Some(e) = events.next().await {
                match e {
                    Event::Reconnecting { .. } => {
                        attempts.fetch_add(1, Ordering::Relaxed);
                    }
                    Event::Connected { .. } => {
                        last_back_ms.fetch_max((unix_secs() * 1000.0) as u64, Ordering::Relaxed);
                        back.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        });
    }
    let start = Instant::now();
    let every = Duration::from_secs_f64(a.every.max(0.05));
    while start.elapsed().as_secs_f64() < a.hold {
        tokio::time::sleep(every).await;
        let k = listeners.iter().filter(|(_, l)| l.is_connected()).count();
        println!(
            "t={:.1} at={:.3} connected={k} attempts={} reconnected={} last_reconnected_at={:.3}",
            start.elapsed().as_secs_f64(),
            unix_secs(),
            attempts.load(Ordering::Relaxed),
            back.load(Ordering::Relaxed),
            last_back_ms.load(Ordering::Relaxed) as f64 / 1000.0
        );
    }
}

/// Dial `--check` listeners (spread evenly over those registered) by name, each through the URL
/// after the one it registered at, and check that 16 bytes come back. Prints one line.
async fn check(a: &Args, listeners: &[(usize, Arc<Listener>)]) {
    let key = match Key::parse(&a.key) {
        Ok(k) => k,
        Err(e) => {
            println!("checked=0 ok=0 failed=0 error=no_key ({e})");
            return;
        }
    };
    let k = a.check.min(listeners.len());
    let step = listeners.len() / k;
    let t = Instant::now();
    let timeout = Duration::from_secs_f64(a.timeout);
    let results: Vec<Result<(), String>> = futures_util::stream::iter((0..k).map(|j| &listeners[j * step]))
        .map(|(i, l)| {
            let via = a.relay[(i + 1) % a.relay.len()].clone();
            let (l, key) = (l.clone(), key.clone());
            async move {
                let name = l.name();
                let echo = tokio::spawn({
                    let l = l.clone();
                    async move {
                        let (mut s, _) = l.accept().await.map_err(|e| format!("accept: {e}"))?;
                        let mut b = [0u8; 16];
                        s.read_exact(&mut b).await.map_err(|e| format!("read: {e}"))?;
                        s.write_all(&b).await.map_err(|e| format!("write: {e}"))?;
                        s.shutdown().await.map_err(|e| format!("shutdown: {e}"))
                    }
                });
                let dial = async {
                    let d = Dialer::new(&via, key).map_err(|e| format!("dialer: {e}"))?;
                    let mut s = d.dial(&format!("{name}:0")).await.map_err(|e| format!("dial {name} via {via}: {e}"))?;
                    let sent: [u8; 16] = rand::random();
                    s.write_all(&sent).await.map_err(|e| format!("write: {e}"))?;
                    let mut got = [0u8; 16];
                    s.read_exact(&mut got).await.map_err(|e| format!("read: {e}"))?;
                    d.close().await;
                    if got == sent {
                        Ok(())
                    } else {
                        Err(format!("{name}: the echo differs"))
                    }
                };
                let r = tokio::time::timeout(timeout, dial).await.unwrap_or_else(|_| Err(format!("dial {name} via {via}: timed out")));
                echo.abort();
                r
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    if let Some(e) = failed.first() {
        eprintln!("first failed check: {e}");
    }
    println!("checked={k} ok={} failed={} secs={:.2}", k - failed.len(), failed.len(), t.elapsed().as_secs_f64());
}

fn unix_secs() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}
