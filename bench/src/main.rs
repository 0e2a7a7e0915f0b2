//! `tunnel-bench`: the load generator of libtunnel's benchmark suite. `bench/run.sh`,
//! `bench/lossy.sh` and `bench/http.sh` drive it; every path under test (direct, libtunnel classic
//! and multiplexed, the peers wstunnel and frp, rathole, bore) is measured with the same client
//! code against the same server, so only the path in between differs.
//!
//! Subcommands:
//! - `server`: an echo/sink server. The first byte of a connection picks its job: `S` + u64 BE
//!   length = read that many bytes and answer one byte (throughput, no half-close needed, so it
//!   works through classic mode and every peer); `Q` = answer how many other connections are open
//!   (used to wait until a path has torn its connections down); `R` + u64 BE milliseconds = sink
//!   for that long from the first byte, then answer the bytes received and the exact time (the
//!   fixed-duration throughput of long links); `Z` + u32 BE seconds = read nothing for that long
//!   (a stopped reader), then drain; anything else = echo everything.
//! - `throughput`: N parallel streams sharing a total byte count (or each sending for `--secs`);
//!   wall time from the first byte to the last acknowledgement, and the CPU time the tunnel
//!   processes (`--pids`) spent.
//! - `connect`: sequential connect + first echoed byte, percentiles.
//! - `pingpong`: 64-byte request/response on one connection, percentiles; with `--load`, while a
//!   second connection to the same address pushes bulk data (fairness of a shared session).
//! - `stall`: N connections whose server never reads, each written until it blocks; the growth of
//!   the tunnel processes' resident memory (what a session buffers for stopped readers).
//! - `delay`: a delay line (emulated long link): a TCP forwarder that releases every chunk a fixed
//!   one-way delay after it crossed a shared per-direction rate cap.
//! - `hold`: open N idle connections (each proven end to end by one echoed byte) and report the
//!   growth of the tunnel processes' resident memory per connection.
//! - `tun-link`: the lossy link of `bench/lossy.sh`, an IP-level forwarder between two TUN devices
//!   in two network namespaces: random loss, a drop-tail queue in front of a rate cap, a delay
//!   (`tun_link`).
//! - `coldstart`: wall time of a new process (e.g. `tunnel dial`) that sends 5 bytes to an echo
//!   target through its stdin and reads them back on its stdout; or of a new direct connection.
//! - `proxy`: a plain TCP forwarder; two chained are the hop-count-matched floor of run.sh.
//! - `http-server`: a minimal HTTP/1.1 keep-alive target for bench/http.sh.
//! - `hyper-server`: HTTP/1.1 + HTTP/2 target (TLS or h2c) for bench/http.sh (`hyper_server`).
//! - `settle`, `freeport`: helpers for the driver.
//!
//! Results are one line of `key=value` pairs on stdout, for the driver to parse. Benchmarks report
//! figures; nothing here asserts a timing. Every loop is bounded by a count and by socket timeouts.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

mod hyper_server;
mod tun_link;
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
        /// Send for this many seconds per stream instead of a byte count (the server counts what
        /// arrives in that time from its first byte; 0 = use `--bytes`).
        #[arg(long, default_value_t = 0.0)]
        secs: f64,
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
        /// Stop after this many seconds even if `--count` is not reached (0 = no limit).
        #[arg(long, default_value_t = 0.0)]
        secs: f64,
        /// Meanwhile a second connection to the same address pushes bulk data, starting this
        /// many seconds before the first round trip (0 = no load).
        #[arg(long, default_value_t = 0.0)]
        load: f64,
    },
    /// N connections whose server reads nothing, each written until it blocks; reports the RSS
    /// growth of `--pids` (what the path buffers for stopped readers).
    Stall {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// Write for at most this many seconds (stops earlier once no stream moved for 2 s).
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        #[arg(long, default_value = "")]
        pids: String,
    },
    /// A delay line: forwards each accepted connection to `--to`, releasing every chunk
    /// `--delay-ms` after it crossed a rate cap shared by all connections of one direction
    /// (an emulated link). Prints `listening ADDR`.
    Delay {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        #[arg(long)]
        to: SocketAddr,
        /// One-way delay in milliseconds, each direction (RTT = 2x).
        #[arg(long, default_value_t = 25.0)]
        delay_ms: f64,
        /// Rate cap per direction in Mbit/s (10^6 bit/s), shared by all connections; 0 = none.
        #[arg(long, default_value_t = 1000.0)]
        rate_mbit: f64,
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
    /// An HTTP/1.1 + HTTP/2 server (hyper; TLS with `--cert`/`--key`, else h2c) answering a
    /// fixed 13-byte body (the target of bench/http.sh's HTTPS and h2 runs). Prints `listening ADDR`.
    HyperServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        #[arg(long, requires = "key")]
        cert: Option<std::path::PathBuf>,
        #[arg(long, requires = "cert")]
        key: Option<std::path::PathBuf>,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// The lossy link: forward IP packets between TUN device `--dev-a` in network namespace
    /// `--netns-a` and `--dev-b` in `--netns-b`, each way with random loss, a drop-tail queue in
    /// front of a rate cap, and a delay. Prints `link up ...`, then counters every 10 s.
    TunLink {
        #[arg(long)]
        netns_a: String,
        #[arg(long, default_value = "lt0")]
        dev_a: String,
        #[arg(long)]
        netns_b: String,
        #[arg(long, default_value = "lt0")]
        dev_b: String,
        /// One-way delay in milliseconds, each direction (RTT = 2x).
        #[arg(long, default_value_t = 25.0)]
        delay_ms: f64,
        /// Line rate per direction in Mbit/s.
        #[arg(long, default_value_t = 100.0)]
        rate_mbit: f64,
        /// Drop-tail queue per direction in bytes (0 = one RTT at the rate).
        #[arg(long, default_value_t = 0)]
        queue_bytes: usize,
        /// Random loss per direction, in percent.
        #[arg(long, default_value_t = 0.0)]
        loss_pct: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Cold start: `--count` times, start the command after `--` (or, without one, open a new TCP
    /// connection to `--addr`), write 5 bytes to it and read them back echoed; wall time from
    /// spawn (or connect) to the last byte, percentiles.
    Coldstart {
        #[arg(long)]
        addr: Option<SocketAddr>,
        #[arg(long, default_value_t = 5)]
        count: usize,
        /// Seconds one try may take.
        #[arg(long, default_value_t = 20.0)]
        timeout: f64,
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// Print a free loopback TCP port.
    Freeport,
}

fn main() {
    raise_fd_limit();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Server { listen, threads } => server(listen, threads),
        Cmd::Throughput { addr, streams, pids, secs, .. } if secs > 0.0 => {
            throughput_for(addr, streams.max(1), Duration::from_secs_f64(secs), &parse_pids(&pids))
        }
        Cmd::Throughput { addr, streams, bytes, pids, .. } => throughput(addr, streams.max(1), bytes, &parse_pids(&pids)),
        Cmd::Connect { addr, count, warmup } => connect_latency(addr, count.max(1), warmup),
        Cmd::Pingpong { addr, count, size, warmup, secs, load } => pingpong(addr, count.max(1), size.clamp(1, 65536), warmup, secs, load),
        Cmd::Stall { addr, count, secs, pids } => stall(addr, count.max(1), Duration::from_secs_f64(secs), &parse_pids(&pids)),
        Cmd::Delay { listen, to, delay_ms, rate_mbit } => delay_line(listen, to, delay_ms, rate_mbit),
        Cmd::Hold { addr, count, pids, timeout } => hold(addr, count, &parse_pids(&pids), Duration::from_secs_f64(timeout)),
        Cmd::Settle { addr, timeout } => settle(addr, Duration::from_secs_f64(timeout)),
        Cmd::Proxy { listen, to } => proxy(listen, to),
        Cmd::HttpServer { listen, threads } => http_server(listen, threads),
        Cmd::HyperServer { listen, cert, key, threads } => hyper_server::run(listen, cert.zip(key), threads),
        Cmd::TunLink { netns_a, dev_a, netns_b, dev_b, delay_ms, rate_mbit, queue_bytes, loss_pct, seed } => {
            let queue_bytes = if queue_bytes > 0 { queue_bytes } else { (rate_mbit * 1e6 / 8.0 * 2.0 * delay_ms / 1e3) as usize };
            tun_link::run(tun_link::Options { netns_a, dev_a, netns_b, dev_b, delay_ms, rate_mbit, queue_bytes, loss_pct, seed })
        }
        Cmd::Coldstart { addr, count, timeout, cmd } => coldstart(addr, &cmd, count.max(1), Duration::from_secs_f64(timeout)),
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
        r.rlim_cur
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
            b'R' => {
                let window = Duration::from_millis(s.read_u64().await?);
                let mut buf = vec![0u8; 256 * 1024];
                let mut got = match s.read(&mut buf).await? {
                    0 => return Ok(()),
                    n => n as u64,
                };
                let t0 = tokio::time::Instant::now();
                loop {
                    match tokio::time::timeout_at(t0 + window, s.read(&mut buf)).await {
                        Ok(Ok(0)) => return Ok(()),
                        Ok(Ok(n)) => got += n as u64,
                        Ok(Err(e)) => return Err(e),
                        Err(_) => break,
                    }
                }
                let us = t0.elapsed().as_micros() as u64;
                let mut answer = got.to_be_bytes().to_vec();
                answer.extend_from_slice(&us.to_be_bytes());
                s.write_all(&answer).await?;
                // The client stops when it reads the answer; drain what is still on the way.
                while s.read(&mut buf).await? > 0 {}
                return Ok(());
            }
            b'Z' => {
                let secs = s.read_u32().await?;
                tokio::time::sleep(Duration::from_secs(secs.into())).await;
                let mut buf = vec![0u8; 256 * 1024];
                while s.read(&mut buf).await? > 0 {}
                return Ok(());
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
    set_tcp_cc(&s)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

/// `BENCH_TCP_CC` (e.g. `cubic`): the congestion controller of the clients' own TCP sockets
/// (`bench/lossy.sh` `LOSSY_TCP_CC`: the direct path's senders), where the namespace's default
/// cannot be changed; the kernel's default when unset.
fn set_tcp_cc(s: &TcpStream) -> std::io::Result<()> {
    let Ok(cc) = std::env::var("BENCH_TCP_CC") else { return Ok(()) };
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt reads `cc.len()` bytes from the string, which outlives the call.
    let r = unsafe { libc::setsockopt(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_CONGESTION, cc.as_ptr().cast(), cc.len() as libc::socklen_t) };
    if r != 0 {
        return Err(ctx(format!("BENCH_TCP_CC={cc}: setsockopt(TCP_CONGESTION)"))(std::io::Error::last_os_error()));
    }
    Ok(())
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

fn pingpong(addr: SocketAddr, count: usize, size: usize, warmup: usize, secs: f64, load: f64) -> std::io::Result<()> {
    // The bulk stream first, so the round trips share the path with a saturating transfer (through a
    // tunnel, both connections are streams of one session).
    let stop = Arc::new(AtomicBool::new(false));
    let bulk = if load > 0.0 {
        // Its read timeout must outlast the ping phase: no answer comes before it is stopped.
        let conn = dial(addr, Duration::from_secs(60)).map_err(ctx("bulk stream: connect".into()))?;
        let stop = stop.clone();
        let h = std::thread::spawn(move || timed_stream(conn, BULK_WINDOW, &stop));
        std::thread::sleep(Duration::from_secs_f64(load));
        Some(h)
    } else {
        None
    };
    let limit = (secs > 0.0).then(|| Duration::from_secs_f64(secs));
    let mut s = dial(addr, Duration::from_secs(10))?;
    let msg = vec![b'p'; size];
    let mut back = vec![0u8; size];
    let mut lat = Vec::with_capacity(count);
    let t0 = Instant::now();
    for i in 0..warmup + count {
        if limit.is_some_and(|l| t0.elapsed() >= l) && !lat.is_empty() {
            break;
        }
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back).map_err(ctx(format!("round trip {i}")))?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        if i >= warmup {
            lat.push(us);
        }
    }
    let pings_secs = t0.elapsed().as_secs_f64();
    let mut line = percentiles("pingpong", lat);
    if let Some(h) = bulk {
        stop.store(true, Ordering::Relaxed);
        let (_, _, written, wsecs) = h.join().map_err(|_| std::io::Error::other("the bulk thread panicked"))?.map_err(ctx("bulk stream".into()))?;
        line += &format!(" load_mib_s={:.1} pings_secs={pings_secs:.2}", written as f64 / wsecs / MIB);
    }
    println!("{line}");
    Ok(())
}

const MIB: f64 = 1024.0 * 1024.0;
/// The server-side window of a bulk stream that is stopped by the client (`pingpong --load`); it
/// stays below the sockets' 60 s read timeout.
const BULK_WINDOW: Duration = Duration::from_secs(50);

/// One stream of a fixed-duration transfer (server command `R`): write until the server's answer
/// arrives or `stop` is set. Returns (bytes the server counted, the server's seconds, bytes
/// written, seconds written).
fn timed_stream(mut s: TcpStream, window: Duration, stop: &AtomicBool) -> std::io::Result<(u64, f64, u64, f64)> {
    let mut head = vec![b'R'];
    head.extend_from_slice(&(window.as_millis() as u64).to_be_bytes());
    s.write_all(&head)?;
    let mut r = s.try_clone()?;
    let answered = Arc::new(AtomicBool::new(false));
    let flag = answered.clone();
    let reader = std::thread::spawn(move || -> std::io::Result<(u64, f64)> {
        let mut a = [0u8; 16];
        let res = r.read_exact(&mut a);
        flag.store(true, Ordering::Relaxed);
        res?;
        let num = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap_or([0; 8]));
        Ok((num(&a[..8]), num(&a[8..]) as f64 / 1e6))
    });
    let buf = vec![0x5au8; 256 * 1024];
    let mut written = 0u64;
    let t0 = Instant::now();
    let mut failure = None;
    while !answered.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
        match s.write(&buf) {
            Ok(n) => written += n as u64,
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let wsecs = t0.elapsed().as_secs_f64();
    let stopped = stop.load(Ordering::Relaxed) && !answered.load(Ordering::Relaxed);
    if stopped || failure.is_some() {
        // Unblock the reader: no answer is coming.
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    let answer = reader.join().map_err(|_| std::io::Error::other("the reader thread panicked"))?;
    if stopped {
        return Ok((0, 0.0, written, wsecs));
    }
    match (answer, failure) {
        (Ok((got, secs)), _) => Ok((got, secs, written, wsecs)),
        (Err(e), None) => Err(ctx(format!("waiting for the answer after {written} bytes written"))(e)),
        (Err(_), Some(e)) => Err(ctx(format!("write after {written} bytes"))(e)),
    }
}

/// `throughput --secs`: every stream sends for the same time; the servers count what arrived.
fn throughput_for(addr: SocketAddr, streams: usize, window: Duration, pids: &[u32]) -> std::io::Result<()> {
    let start = Arc::new(Barrier::new(streams + 1));
    let mut handles = Vec::new();
    for i in 0..streams {
        let start = start.clone();
        handles.push(std::thread::spawn(move || {
            let conn = dial(addr, Duration::from_secs(60)).map_err(ctx(format!("stream {i}: connect")));
            start.wait();
            timed_stream(conn?, window, &AtomicBool::new(false)).map_err(ctx(format!("stream {i}")))
        }));
    }
    start.wait();
    let cpu0 = cpu_total(pids);
    let mut first_err = None;
    let mut per = Vec::new();
    let (mut got, mut written, mut secs) = (0u64, 0u64, 0f64);
    for h in handles {
        match h.join() {
            Ok(Ok((g, s, w, _))) => {
                got += g;
                written += w;
                secs = secs.max(s);
                per.push(g as f64 / s.max(1e-6) / MIB);
            }
            Ok(Err(e)) => first_err = first_err.or(Some(e)),
            Err(_) => first_err = first_err.or(Some(std::io::Error::other("a stream thread panicked"))),
        }
    }
    let cpu = cpu_total(pids) - cpu0;
    if let Some(e) = first_err {
        return Err(e);
    }
    per.sort_by(|a, b| a.total_cmp(b));
    println!(
        "throughput streams={streams} secs={secs:.3} bytes={got} mib_s={:.1} min_stream_mib_s={:.1} max_stream_mib_s={:.1} written={written} cpu_s={cpu:.2} cpu_s_per_gb={:.3}",
        got as f64 / secs.max(1e-6) / MIB,
        per.first().copied().unwrap_or(0.0),
        per.last().copied().unwrap_or(0.0),
        cpu / (written as f64 / 1e9)
    );
    Ok(())
}

/// `stall`: streams whose reader stopped. Each connection asks the server to read nothing, then is
/// written (non-blocking) until no stream has moved for 2 s; the growth of the tunnel processes'
/// RSS is what the path buffers for them (kernel socket buffers are not in RSS).
fn stall(addr: SocketAddr, count: usize, max: Duration, pids: &[u32]) -> std::io::Result<()> {
    let before: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
    let mut conns = Vec::with_capacity(count);
    let hold = max.as_secs() as u32 + 3;
    for i in 0..count {
        let mut s = dial(addr, Duration::from_secs(10)).map_err(ctx(format!("connection {i}: connect")))?;
        let mut head = vec![b'Z'];
        head.extend_from_slice(&hold.to_be_bytes());
        s.write_all(&head)?;
        s.set_nonblocking(true)?;
        conns.push(s);
    }
    let buf = vec![0x5au8; 64 * 1024];
    let mut written = vec![0u64; count];
    let t0 = Instant::now();
    let mut last_move = Instant::now();
    while t0.elapsed() < max && last_move.elapsed() < Duration::from_secs(2) {
        let mut moved = false;
        for (i, s) in conns.iter_mut().enumerate() {
            while t0.elapsed() < max {
                match s.write(&buf) {
                    Ok(n) => {
                        written[i] += n as u64;
                        moved = true;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(ctx(format!("connection {i}: write after {} bytes", written[i]))(e)),
                }
            }
        }
        if moved {
            last_move = Instant::now();
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let after: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
    let total: u64 = written.iter().sum();
    let min = written.iter().min().copied().unwrap_or(0);
    let mut line = format!("stall n={count} secs={secs:.2} written_mib={:.1} min_stream_kib={:.0}", total as f64 / MIB, min as f64 / 1024.0);
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        line += &format!(" rss{i}_growth_mib={:.1}", (*a as f64 - *b as f64) / 1024.0);
    }
    let each: Vec<String> = pids.iter().zip(before.iter().zip(&after)).map(|(p, (b, a))| format!("{p}:{b}->{a}")).collect();
    println!("{line} procs={}", each.join(","));
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

// ---------------------------------------------------------------------------------------------
// cold start

/// Wall time of one new client: spawn `cmd` (stdin/stdout piped) or connect to `addr`, write 5
/// bytes, read the 5 echoed bytes. The child is killed after each try.
fn coldstart(addr: Option<SocketAddr>, cmd: &[String], count: usize, timeout: Duration) -> std::io::Result<()> {
    const MSG: &[u8] = b"hello";
    let mut times = Vec::with_capacity(count);
    for i in 0..count {
        let t0 = Instant::now();
        let mut back = [0u8; 5];
        if let Some(program) = cmd.first() {
            let mut child = std::process::Command::new(program)
                .args(&cmd[1..])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .map_err(ctx(format!("start {program}")))?;
            let mut stdin = child.stdin.take().expect("piped stdin");
            let mut stdout = child.stdout.take().expect("piped stdout");
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let r = stdin.write_all(MSG).and_then(|_| stdin.flush()).and_then(|_| stdout.read_exact(&mut back));
                let _ = tx.send(r.map(|_| back));
                drop(stdin);
            });
            let r = rx.recv_timeout(timeout);
            let _ = child.kill();
            let status = child.wait();
            match r {
                Ok(Ok(b)) => back = b,
                Ok(Err(e)) => return Err(std::io::Error::other(format!("try {i}: {program} did not echo 5 bytes: {e} (exit {status:?})"))),
                Err(_) => return Err(std::io::Error::other(format!("try {i}: no echo from {program} within {timeout:?}"))),
            }
        } else {
            let addr = addr.ok_or_else(|| std::io::Error::other("coldstart needs --addr or a command after --"))?;
            let mut s = dial(addr, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            s.write_all(MSG)?;
            s.read_exact(&mut back).map_err(ctx(format!("try {i}: read the echo from {addr}")))?;
        }
        let dt = t0.elapsed();
        if back != MSG {
            return Err(std::io::Error::other(format!("try {i}: echoed {back:?}, not {MSG:?}")));
        }
        times.push(dt.as_secs_f64() * 1e3);
    }
    let min = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    println!("count={count} p50_ms={:.1} min_ms={min:.1} max_ms={:.1}", sorted[sorted.len() / 2], sorted[sorted.len() - 1]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// delay line (an emulated long link)

/// One direction of a link: the time until which its wire is busy. Every chunk of every connection
/// reserves `len / rate` of wire time after the previous reservation (a shared rate cap with no
/// queue of its own: a sender beyond the rate waits in its socket, as behind a real bottleneck),
/// and is released `delay` after its reservation ends.
struct Wire {
    busy_until: std::sync::Mutex<tokio::time::Instant>,
}

struct Link {
    /// Bytes per second; 0 = no cap.
    rate: f64,
    delay: Duration,
    /// Bytes one direction of one connection may hold between read and release: twice what the
    /// wire holds at the cap (rate x delay), plus 4 MiB, so the line never limits a flow itself.
    cap: usize,
    up: Wire,
    down: Wire,
}

const DELAY_CHUNK: usize = 64 * 1024;
/// How far ahead of the wire clock a reader may run before it sleeps (tokio's timer ticks in ms).
const DELAY_SLACK: Duration = Duration::from_millis(2);
const DELAY_TIMER_LEAD: Duration = Duration::from_millis(1);

fn delay_line(listen: SocketAddr, to: SocketAddr, delay_ms: f64, rate_mbit: f64) -> std::io::Result<()> {
    let rate = rate_mbit.max(0.0) * 1e6 / 8.0;
    let delay = Duration::from_secs_f64(delay_ms.max(0.0) / 1e3);
    let cap = if rate > 0.0 { (2.0 * rate * delay.as_secs_f64()) as usize + (4 << 20) } else { 256 << 20 };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let now = tokio::time::Instant::now();
        let link = Arc::new(Link {
            rate,
            delay,
            cap: cap.min(u32::MAX as usize >> 1),
            up: Wire { busy_until: std::sync::Mutex::new(now) },
            down: Wire { busy_until: std::sync::Mutex::new(now) },
        });
        let l = tokio::net::TcpListener::bind(listen).await?;
        println!(
            "listening {} (one-way delay {delay_ms} ms, {rate_mbit} Mbit/s each way, {} KiB per direction and connection)",
            l.local_addr()?,
            link.cap / 1024
        );
        std::io::stdout().flush()?;
        loop {
            let (a, _) = match l.accept().await {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let link = link.clone();
            tokio::spawn(async move {
                let b = match tokio::net::TcpStream::connect(to).await {
                    Ok(b) => b,
                    Err(e) => {
                        eprintln!("connect {to} failed: {e}");
                        return;
                    }
                };
                let _ = a.set_nodelay(true);
                let _ = b.set_nodelay(true);
                let (ar, aw) = a.into_split();
                let (br, bw) = b.into_split();
                let up = tokio::spawn(delay_pipe(ar, bw, link.clone(), true));
                delay_pipe(br, aw, link, false).await;
                let _ = up.await;
            });
        }
    })
}

async fn delay_pipe(mut r: tokio::net::tcp::OwnedReadHalf, mut w: tokio::net::tcp::OwnedWriteHalf, link: Arc<Link>, up: bool) {
    use tokio::time::{sleep_until, Instant};
    let room = Arc::new(tokio::sync::Semaphore::new(link.cap));
    // (release time, bytes); None = the sender half-closed.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Option<Vec<u8>>)>();
    let freed = room.clone();
    let writer = tokio::spawn(async move {
        while let Some((at, data)) = rx.recv().await {
            // tokio's timer fires on the first millisecond tick at or after the deadline (about
            // 1.2 ms late on average here): aim one tick early so the mean delay is the configured one.
            sleep_until(at - DELAY_TIMER_LEAD).await;
            match data {
                Some(d) => {
                    if w.write_all(&d).await.is_err() {
                        freed.close(); // the reader stops too
                        return;
                    }
                    freed.add_permits(d.len());
                }
                None => {
                    let _ = w.shutdown().await;
                    return;
                }
            }
        }
    });
    let wire = if up { &link.up } else { &link.down };
    loop {
        let mut buf = vec![0u8; DELAY_CHUNK];
        let n = match r.read(&mut buf).await {
            Ok(n) => n,
            Err(_) => break,
        };
        if n == 0 {
            let at = (*wire.busy_until.lock().unwrap()).max(Instant::now()) + link.delay;
            let _ = tx.send((at, None));
            break;
        }
        if n < DELAY_CHUNK / 4 {
            buf = buf[..n].to_vec();
        } else {
            buf.truncate(n);
        }
        match room.acquire_many(n as u32).await {
            Ok(p) => p.forget(),
            Err(_) => break,
        }
        let now = Instant::now();
        let sent = if link.rate > 0.0 {
            let mut busy = wire.busy_until.lock().unwrap();
            *busy = (*busy).max(now) + Duration::from_secs_f64(n as f64 / link.rate);
            *busy
        } else {
            now
        };
        if tx.send((sent + link.delay, Some(buf))).is_err() {
            break;
        }
        if sent > now + DELAY_SLACK {
            sleep_until(sent - DELAY_SLACK).await;
        }
    }
    drop(tx);
    let _ = writer.await;
}
