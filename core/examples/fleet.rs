//! `fleet`: the density load generator (issue 35; `cargo build -p libtunnel --features cli
//! --example fleet`). Registers many listeners from one
//! process through the Rust API (one `Listener` each, its own key and session, as many
//! independent clients would) against one relay URL, then holds them idle and reports, every
//! `--every` seconds, how many are connected. Driven by `bench/fleet.sh`, which measures the
//! relay's memory and Redis's commands per second around it; run alone it prints:
//!
//! - `registered=N secs=S rate_per_s=R failed=F` once every listener has bound (or failed);
//! - `t=SECS connected=K` every `--every` seconds while holding (a node restart shows as a drop
//!   and the climb back; the listeners' own jittered backoff spaces the re-registrations).
//!
//! Every wait is bounded: `--hold` seconds at most, and each bind by `--timeout`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::StreamExt;
use libtunnel::{Identity, Listener};

#[derive(Parser)]
#[command(name = "fleet", about = "Register many idle listeners from one process (driven by bench/fleet.sh)")]
struct Args {
    /// Relay URL (ws://, wss://, tcp://).
    #[arg(long)]
    relay: String,
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
    let a = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(a.threads.max(1)).enable_all().build().expect("runtime");
    rt.block_on(run(a));
}

async fn run(a: Args) {
    let failed = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let timeout = Duration::from_secs_f64(a.timeout);
    let listeners: Vec<Listener> = futures_util::stream::iter(0..a.count)
        .map(|_| {
            let (relay, failed) = (a.relay.clone(), failed.clone());
            let backoff = Duration::from_secs_f64(a.max_backoff);
            async move {
                let b = Listener::builder(&relay, Identity::generate()).max_backoff(backoff).timeout(timeout);
                match tokio::time::timeout(timeout, b.bind()).await {
                    Ok(Ok(l)) => Some(l),
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
    if a.hold <= 0.0 {
        return;
    }
    let start = Instant::now();
    let every = Duration::from_secs_f64(a.every.max(0.05));
    while start.elapsed().as_secs_f64() < a.hold {
        tokio::time::sleep(every).await;
        let k = listeners.iter().filter(|l| l.is_connected()).count();
        println!("t={:.1} connected={k}", start.elapsed().as_secs_f64());
    }
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
