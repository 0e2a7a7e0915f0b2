//! `tunnel-bench`: the load generator of libtunnel's benchmark suite. `bench/run.sh` drives it;
//! every path under test (direct, libtunnel classic and multiplexed, rathole, bore) is measured
//! with the same client code against the same server, so only the path in between differs.
//!
//! Subcommands:
//! - `server`: an echo/sink server. The first byte of a connection picks its job: `S` + u64 BE
//!   length = read that many bytes and answer one byte (throughput, no half-close needed, so it
//!   works through classic mode and every peer); `Q` = answer how many other connections are open
//!   (used to wait until a path has torn its connections down); anything else = echo everything.
//! - `throughput`: N parallel streams sharing a total byte count; wall time from the first byte
//!   to the last acknowledgement, and the CPU time the tunnel processes (`--pids`) spent.
//! - `connect`: sequential connect + first echoed byte, percentiles.
//! - `pingpong`: 64-byte request/response on one connection, percentiles.
//! - `hold`: open N idle connections (each proven end to end by one echoed byte) and report the
//!   growth of the tunnel processes' resident memory per connection.
//! - `settle`, `freeport`: helpers for the driver.
//!
//! Results are one line of `key=value` pairs on stdout, for the driver to parse. Benchmarks report
//! figures; nothing here asserts a timing. Every loop is bounded by a count and by socket timeouts.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
#[command(name = "tunnel-bench", about = "Load generator for libtunnel's benchmark suite (see bench/README.md)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo/sink server; prints `listening ADDR` once bound.
    Server {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Runtime worker threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Push bytes through N parallel streams.
    Throughput {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        streams: usize,
        /// Total bytes over all streams.
        #[arg(long, default_value_t = 2 << 30)]
        bytes: u64,
        /// Comma-separated PIDs whose CPU time (utime + stime) is charged to the run.
        #[arg(long, default_value = "")]
        pids: String,
    },
    /// Sequential connect + first echoed byte.
    Connect {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 2000)]
        count: usize,
        #[arg(long, default_value_t = 50)]
        warmup: usize,
    },
    /// Request/response round trips on one connection.
    Pingpong {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 20000)]
        count: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 1000)]
        warmup: usize,
    },
    /// Hold N idle connections and report RSS growth of `--pids` per connection.
    Hold {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        count: usize,
        #[arg(long, default_value = "")]
        pids: String,
        /// Seconds one connection may take to echo its first byte.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
    /// Wait until the server has no other open connection (at most `--timeout` seconds).
    Settle {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
    },
    /// A plain TCP forwarder (copy both ways, no framing): two chained make the hop-count-matched
    /// floor (`proxy` path), the kernel's share of any tunnel. Prints `listening ADDR`.
    Proxy {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        #[arg(long)]
        to: SocketAddr,
    },
    /// A minimal HTTP/1.1 keep-alive server answering every request with a fixed 13-byte body
    /// (the target of bench/http.sh). Prints `listening ADDR`.
    HttpServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Print a free loopback TCP port.
    Freeport,
}

fn main() {
    raise_fd_limit();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Server { listen, threads } => server(listen, threads),
        Cmd::Throughput { addr, streams, bytes, pids } => throughput(addr, streams.max(1), bytes, &parse_pids(&pids)),
        Cmd::Connect { addr, count, warmup } => connect_latency(addr, count.max(1), warmup),
        Cmd::Pingpong { addr, count, size, warmup } => pingpong(addr, count.max(1), size.clamp(1, 65536), warmup),
        Cmd::Hold { addr, count, pids, timeout } => hold(addr, count, &parse_pids(&pids), Duration::from_secs_f64(timeout)),
        Cmd::Settle { addr, timeout } => settle(addr, Duration::from_secs_f64(timeout)),
        Cmd::Proxy { listen, to } => proxy(listen, to),
        Cmd::HttpServer { listen, threads } => http_server(listen, threads),
        Cmd::Freeport => std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| println!("{}", a.port())),
    };
    if let Err(e) = r {
        // One parseable line even on failure, so the driver can show why a figure is missing.
        println!("error msg={:?}", e.to_string());
        std::process::exit(1);
    }
}

/// Holding 10,000 connections needs more than the usual 1024 descriptors.
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

fn fd_limit() -> u64 {
    // SAFETY: as above.
    unsafe {
        let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur as u64
    }
}

fn parse_pids(s: &str) -> Vec<u32> {
    s.split(',').filter_map(|p| p.trim().parse().ok()).collect()
}

// ---------------------------------------------------------------------------------------------
// /proc sampling

/// utime + stime of a whole process (all its threads, dead ones included), in seconds.
fn cpu_seconds(pid: u32) -> std::io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces; fields after the last ')' are plain.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((ticks(11) + ticks(12)) as f64 / hz)
}

fn cpu_total(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| cpu_seconds(*p).ok()).sum()
}

/// Resident set size in KiB (VmRSS).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok())))
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// server

static ACTIVE: AtomicUsize = AtomicUsize::new(0);

struct ActiveGuard;
impl ActiveGuard {
    fn new() -> ActiveGuard {
        ACTIVE.fetch_add(1, Ordering::Relaxed);
        ActiveGuard
    }
}
impl Drop for ActiveGuard {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::Relaxed);
    }
}

fn server(listen: SocketAddr, threads: usize) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(threads.max(1)).enable_all().build()?;
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind(listen).await?;
        println!("listening {}", l.local_addr()?);
        std::io::stdout().flush()?;
        loop {
            match l.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(serve_conn(s));
                }
                Err(e) => {
                    eprintln!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

async fn serve_conn(mut s: tokio::net::TcpStream) -> std::io::Result<()> {
    let _g = ActiveGuard::new();
    let _ = s.set_nodelay(true);
    loop {
        let cmd = match s.read_u8().await {
            Ok(b) => b,
            Err(_) => return Ok(()),
        };
        match cmd {
            b'S' => {
                let mut left = s.read_u64().await?;
                let mut buf = vec![0u8; 256 * 1024];
                while left > 0 {
                    let want = buf.len().min(left as usize);
                    let n = s.read(&mut buf[..want]).await?;
                    if n == 0 {
                        return Ok(());
                    }
                    left -= n as u64;
                }
                s.write_all(&[1]).await?;
            }
            b'Q' => {
                let others = ACTIVE.load(Ordering::Relaxed).saturating_sub(1) as u64;
                s.write_all(&others.to_be_bytes()).await?;
                return Ok(());
            }
            first => {
                s.write_all(&[first]).await?;
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = s.read(&mut buf).await?;
                    if n == 0 {
                        return Ok(());
                    }
                    s.write_all(&buf[..n]).await?;
                }
            }
        }
    }
}

fn proxy(listen: SocketAddr, to: SocketAddr) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind(listen).await?;
        println!("listening {}", l.local_addr()?);
        std::io::stdout().flush()?;
        loop {
            let (mut a, _) = match l.accept().await {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let _ = a.set_nodelay(true);
                if let Ok(mut b) = tokio::net::TcpStream::connect(to).await {
                    let _ = b.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, 256 * 1024, 256 * 1024).await;
                }
            });
        }
    })
}

/// Serve `HTTP/1.1 200` with "Hello, world!" to every request on a connection, until the client
/// closes it. Requests are delimited by their blank line; bodies are not expected (GET load).
fn http_server(listen: SocketAddr, threads: usize) -> std::io::Result<()> {
    const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nHello, world!";
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(threads.max(1)).enable_all().build()?;
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind(listen).await?;
        println!("listening {}", l.local_addr()?);
        std::io::stdout().flush()?;
        loop {
            let (mut s, _) = match l.accept().await {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut buf = Vec::with_capacity(8192);
                let mut chunk = [0u8; 8192];
                loop {
                    let n = match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    let mut answers = 0;
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        answers += 1;
                    }
                    if buf.len() > 64 * 1024 {
                        return; // not a GET load: refuse to buffer
                    }
                    for _ in 0..answers {
                        if s.write_all(RESPONSE).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    })
}

// ---------------------------------------------------------------------------------------------
// clients (blocking sockets: the least client overhead, and the same for every path)

fn dial(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

fn ctx(what: String) -> impl FnOnce(std::io::Error) -> std::io::Error {
    move |e| std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn throughput(addr: SocketAddr, streams: usize, bytes: u64, pids: &[u32]) -> std::io::Result<()> {
    let per = bytes / streams as u64;
    let start = Arc::new(Barrier::new(streams + 1));
    let mut handles = Vec::new();
    for i in 0..streams {
        let start = start.clone();
        handles.push(std::thread::spawn(move || -> std::io::Result<()> {
            let conn = dial(addr, Duration::from_secs(60)).map_err(ctx(format!("stream {i}: connect")));
            start.wait();
            let mut s = conn?;
            let mut head = vec![b'S'];
            head.extend_from_slice(&per.to_be_bytes());
            s.write_all(&head)?;
            let buf = vec![0x5au8; 256 * 1024];
            let mut left = per;
            while left > 0 {
                let n = buf.len().min(left as usize);
                s.write_all(&buf[..n]).map_err(ctx(format!("stream {i}: write with {left} bytes left")))?;
                left -= n as u64;
            }
            let mut ack = [0u8; 1];
            s.read_exact(&mut ack).map_err(ctx(format!("stream {i}: waiting for the acknowledgement")))?;
            Ok(())
        }));
    }
    start.wait();
    let cpu0 = cpu_total(pids);
    let t0 = Instant::now();
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => first_err = first_err.or(Some(e)),
            Err(_) => first_err = first_err.or(Some(std::io::Error::other("a stream thread panicked"))),
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_total(pids) - cpu0;
    if let Some(e) = first_err {
        return Err(e);
    }
    let total = per * streams as u64;
    println!(
        "throughput streams={streams} bytes={total} secs={secs:.3} mib_s={:.1} cpu_s={cpu:.2} cpu_s_per_gb={:.3}",
        total as f64 / secs / (1024.0 * 1024.0),
        cpu / (total as f64 / 1e9)
    );
    Ok(())
}

fn percentiles(name: &str, mut v: Vec<f64>) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let at = |p: f64| v[((p / 100.0 * n as f64).ceil() as usize).clamp(1, n) - 1];
    let mean = v.iter().sum::<f64>() / n as f64;
    format!("{name} n={n} p50_us={:.1} p99_us={:.1} mean_us={mean:.1} max_us={:.1}", at(50.0), at(99.0), v[n - 1])
}

fn connect_latency(addr: SocketAddr, count: usize, warmup: usize) -> std::io::Result<()> {
    let mut lat = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let t = Instant::now();
        let mut s = dial(addr, Duration::from_secs(10)).map_err(ctx(format!("connection {i}: connect")))?;
        s.write_all(b"c")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).map_err(ctx(format!("connection {i}: first byte")))?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        drop(s);
        if i >= warmup {
            lat.push(us);
        }
    }
    println!("{}", percentiles("connect", lat));
    Ok(())
}

fn pingpong(addr: SocketAddr, count: usize, size: usize, warmup: usize) -> std::io::Result<()> {
    let mut s = dial(addr, Duration::from_secs(10))?;
    let msg = vec![b'p'; size];
    let mut back = vec![0u8; size];
    let mut lat = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back).map_err(ctx(format!("round trip {i}")))?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        if i >= warmup {
            lat.push(us);
        }
    }
    println!("{}", percentiles("pingpong", lat));
    Ok(())
}

fn open_held(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let mut s = dial(addr, timeout)?;
    s.write_all(b"h")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(s)
}

fn hold(addr: SocketAddr, count: usize, pids: &[u32], timeout: Duration) -> std::io::Result<()> {
    // Warm the path so one-off allocations (first stream, buffers, tables) are not charged to
    // the held connections.
    for _ in 0..20 {
        drop(open_held(addr, timeout)?);
    }
    std::thread::sleep(Duration::from_millis(300));
    let before: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
    let mut held = Vec::with_capacity(count);
    let mut failure = None;
    let t0 = Instant::now();
    for i in 0..count {
        match open_held(addr, timeout) {
            Ok(s) => held.push(s),
            Err(e) => {
                failure = Some(format!(
                    "connection {} of {count} failed after {:.1}s: {e} (this client's fd limit is {})",
                    i + 1,
                    t0.elapsed().as_secs_f64(),
                    fd_limit()
                ));
                break;
            }
        }
    }
    let open_secs = t0.elapsed().as_secs_f64();
    // Let every process finish its per-connection work (task spawns, buffers) before sampling.
    std::thread::sleep(Duration::from_millis(500));
    let after: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
    let (b, a): (u64, u64) = (before.iter().sum(), after.iter().sum());
    let per = if held.is_empty() { 0.0 } else { (a as f64 - b as f64) / held.len() as f64 };
    let each: Vec<String> = pids.iter().zip(before.iter().zip(&after)).map(|(p, (b, a))| format!("{p}:{b}->{a}")).collect();
    print!(
        "hold n={count} ok={} open_secs={open_secs:.2} rss_before_kib={b} rss_after_kib={a} kib_per_conn={per:.2} procs={}",
        held.len(),
        each.join(",")
    );
    if let Some(f) = failure {
        print!(" error={f:?}");
    }
    println!();
    Ok(())
}

fn settle(addr: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let t0 = Instant::now();
    let mut polls = 0u32;
    loop {
        polls += 1;
        let mut s = dial(addr, Duration::from_secs(5))?;
        s.write_all(b"Q")?;
        let mut n = [0u8; 8];
        s.read_exact(&mut n)?;
        let active = u64::from_be_bytes(n);
        if active == 0 || t0.elapsed() >= timeout {
            println!("settle active={active} waited_ms={} polls={polls}", t0.elapsed().as_millis());
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
