//! `tunnel-bench tun-link`: the emulated lossy link of `bench/lossy.sh`, at the IP layer.
//!
//! `tc netem` is not available here, so the link is built in user space: two network namespaces
//! (the client's side A and the server's side B, made by the script) each hold a TUN device, and
//! this forwarder carries every IP packet from one device to the other. Per direction a packet
//! 1. is lost at random with probability `--loss-pct` (a seeded xorshift, so runs are repeatable),
//! 2. joins a drop-tail queue in front of a line of `--rate-mbit`: it is dropped when the bytes
//!    still waiting to be serialised (the packet's own included) would exceed `--queue-bytes`
//!    (default: one RTT at the rate, 625,000 bytes at 100 Mbit/s and 50 ms),
//! 3. leaves the line after its serialisation time and arrives `--delay-ms` later.
//!
//! Real kernel TCP on both sides sees real loss, real queueing delay and real slow start, which a
//! TCP-level delay line (`tunnel-bench delay`) cannot show. The shaping decision is the pure
//! `Shaper` (unit-tested on a virtual clock); the I/O is two threads per direction: a reader that
//! stamps and admits packets, and a writer that sleeps until each packet is due.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// What the link does with one packet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Random loss (before the queue).
    Lost,
    /// The drop-tail queue is full.
    Dropped,
    /// Delivered at this time (since the link's epoch).
    Deliver(Duration),
}

/// One direction of the link: random loss, a drop-tail queue in front of a rate-limited line, and
/// a fixed propagation delay. Time is an argument (a duration since the link's epoch), so the
/// decisions are deterministic and testable without a clock.
pub struct Shaper {
    /// Bytes per second of the line.
    rate: f64,
    delay: Duration,
    /// Bytes the queue holds, the packet on the line included.
    queue_bytes: f64,
    /// Probability of a random loss, 0..=1.
    loss: f64,
    rng: u64,
    /// When the line finishes serialising the last admitted packet.
    busy_until: Duration,
}

impl Shaper {
    pub fn new(rate_mbit: f64, delay: Duration, queue_bytes: usize, loss_pct: f64, seed: u64) -> Shaper {
        Shaper {
            rate: rate_mbit * 1e6 / 8.0,
            delay,
            queue_bytes: queue_bytes as f64,
            loss: (loss_pct / 100.0).clamp(0.0, 1.0),
            rng: seed | 1,
            busy_until: Duration::ZERO,
        }
    }

    /// xorshift64*: uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Bytes waiting for the line at `now` (the one being serialised included).
    pub fn backlog(&self, now: Duration) -> f64 {
        self.busy_until.saturating_sub(now).as_secs_f64() * self.rate
    }

    /// Decide the fate of a packet of `len` bytes arriving at `now`.
    pub fn admit(&mut self, now: Duration, len: usize) -> Verdict {
        if self.loss > 0.0 && self.uniform() < self.loss {
            return Verdict::Lost;
        }
        if self.backlog(now) + len as f64 > self.queue_bytes {
            return Verdict::Dropped;
        }
        let start = self.busy_until.max(now);
        self.busy_until = start + Duration::from_secs_f64(len as f64 / self.rate);
        Verdict::Deliver(self.busy_until + self.delay)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot enter network namespace {path}: {source} (the script makes them with `ip netns add`; run as root)")]
    Netns { path: String, source: std::io::Error },
    #[error("cannot attach TUN device {dev}: {source} (create it first: `ip -n NS tuntap add dev {dev} mode tun`; needs root and /dev/net/tun)")]
    Tun { dev: String, source: std::io::Error },
}

/// Move the calling thread into the network namespace at `path` (e.g. /run/netns/NAME).
fn enter_netns(path: &str) -> Result<(), LinkError> {
    let err = |source| LinkError::Netns { path: path.to_string(), source };
    let f = File::open(path).map_err(err)?;
    // SAFETY: setns only reads the descriptor, which `f` keeps open for the call.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Attach to the existing TUN device `dev` of the current network namespace (no packet info header).
fn open_tun(dev: &str) -> Result<File, LinkError> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    let err = |source| LinkError::Tun { dev: dev.to_string(), source };
    if dev.is_empty() || dev.len() >= libc::IFNAMSIZ {
        return Err(err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad interface name")));
    }
    let f = OpenOptions::new().read(true).write(true).open("/dev/net/tun").map_err(err)?;
    // struct ifreq: the name (IFNAMSIZ bytes), then a union whose first member is the short flags.
    let mut ifr = [0u8; 40];
    ifr[..dev.len()].copy_from_slice(dev.as_bytes());
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    ifr[libc::IFNAMSIZ..libc::IFNAMSIZ + 2].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes one struct ifreq, which `ifr` is large enough to hold.
    if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF as _, ifr.as_mut_ptr()) } != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    Ok(f)
}

#[derive(Default)]
struct Counters {
    packets: AtomicU64,
    lost: AtomicU64,
    dropped: AtomicU64,
}

pub struct Options {
    pub netns_a: String,
    pub dev_a: String,
    pub netns_b: String,
    pub dev_b: String,
    pub delay_ms: f64,
    pub rate_mbit: f64,
    pub queue_bytes: usize,
    pub loss_pct: f64,
    pub seed: u64,
}

/// Run the link until killed. Prints `link up ...` once both devices are attached, then a line of
/// counters every 10 s.
pub fn run(o: Options) -> std::io::Result<()> {
    // Timer slack: the writers sleep until each packet is due; the default 50 µs slack would add
    // to every delay.
    // SAFETY: PR_SET_TIMERSLACK takes one integer argument and only affects this process's threads.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    let attach = |ns: &str, dev: &str| -> Result<File, LinkError> {
        enter_netns(ns)?;
        open_tun(dev)
    };
    let a = Arc::new(attach(&o.netns_a, &o.dev_a).map_err(std::io::Error::other)?);
    let b = Arc::new(attach(&o.netns_b, &o.dev_b).map_err(std::io::Error::other)?);
    let epoch = Instant::now();
    let delay = Duration::from_secs_f64(o.delay_ms.max(0.0) / 1e3);
    let stats = [Arc::new(Counters::default()), Arc::new(Counters::default())];
    let mut threads = Vec::new();
    for (i, (from, to)) in [(a.clone(), b.clone()), (b, a)].into_iter().enumerate() {
        let mut shaper = Shaper::new(o.rate_mbit, delay, o.queue_bytes, o.loss_pct, o.seed.wrapping_add(i as u64 * 0x9E37_79B9));
        let (tx, rx) = mpsc::channel::<(Duration, Vec<u8>)>();
        let c = stats[i].clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            loop {
                let n = match (&*from).read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        eprintln!("tun read failed: {e}");
                        return;
                    }
                };
                c.packets.fetch_add(1, Ordering::Relaxed);
                match shaper.admit(epoch.elapsed(), n) {
                    Verdict::Lost => {
                        c.lost.fetch_add(1, Ordering::Relaxed);
                    }
                    Verdict::Dropped => {
                        c.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    Verdict::Deliver(at) => {
                        if tx.send((at, buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                }
            }
        }));
        threads.push(std::thread::spawn(move || {
            while let Ok((at, pkt)) = rx.recv() {
                let now = epoch.elapsed();
                if at > now {
                    std::thread::sleep(at - now);
                }
                // A write the kernel refuses (the far side's device is going down) loses the packet.
                let _ = (&*to).write(&pkt);
            }
        }));
    }
    println!(
        "link up: {} <-> {}, one-way delay {} ms, {} Mbit/s, drop-tail queue {} bytes, random loss {} % each way",
        o.dev_a, o.dev_b, o.delay_ms, o.rate_mbit, o.queue_bytes, o.loss_pct
    );
    std::io::stdout().flush()?;
    loop {
        std::thread::sleep(Duration::from_secs(10));
        let line: Vec<String> = ["a->b", "b->a"]
            .iter()
            .zip(&stats)
            .map(|(d, c)| {
                format!(
                    "{d} packets={} lost={} dropped={}",
                    c.packets.load(Ordering::Relaxed),
                    c.lost.load(Ordering::Relaxed),
                    c.dropped.load(Ordering::Relaxed)
                )
            })
            .collect();
        println!("{}", line.join(" "));
        std::io::stdout().flush()?;
        if threads.iter().any(|t| t.is_finished()) {
            return Err(std::io::Error::other("a link thread ended (see the error above)"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delivers_after_serialisation_and_delay() {
        // 100 Mbit/s: 1500 bytes take 120 µs on the line.
        let mut s = Shaper::new(100.0, 25 * MS, 625_000, 0.0, 1);
        assert_eq!(s.admit(Duration::ZERO, 1500), Verdict::Deliver(Duration::from_micros(120) + 25 * MS));
        // A second packet at the same instant waits for the first.
        assert_eq!(s.admit(Duration::ZERO, 1500), Verdict::Deliver(Duration::from_micros(240) + 25 * MS));
        // An idle line: a packet long after starts at once.
        assert_eq!(s.admit(10 * MS, 1500), Verdict::Deliver(10 * MS + Duration::from_micros(120) + 25 * MS));
    }

    #[test]
    fn drop_tail_queue_holds_its_bytes_then_drains_at_the_rate() {
        let mut s = Shaper::new(100.0, 25 * MS, 15_000, 0.0, 1);
        // A burst at t=0: ten 1500-byte packets fit exactly, the eleventh is dropped.
        for _ in 0..10 {
            assert!(matches!(s.admit(Duration::ZERO, 1500), Verdict::Deliver(_)));
        }
        assert_eq!(s.admit(Duration::ZERO, 1500), Verdict::Dropped);
        assert!((s.backlog(Duration::ZERO) - 15_000.0).abs() < 1.0);
        // After one packet's serialisation time there is room for exactly one more.
        let t = Duration::from_micros(120);
        assert!(matches!(s.admit(t, 1500), Verdict::Deliver(_)));
        assert_eq!(s.admit(t, 1500), Verdict::Dropped);
        // Once the line is idle the queue is empty again.
        assert_eq!(s.backlog(10 * MS), 0.0);
    }

    #[test]
    fn random_loss_is_near_its_rate_and_repeatable() {
        let run = |seed| {
            let mut s = Shaper::new(1e6, Duration::ZERO, usize::MAX, 1.0, seed);
            (0..100_000).filter(|i| s.admit(Duration::from_millis(*i), 100) == Verdict::Lost).count()
        };
        let lost = run(7);
        assert!((800..1200).contains(&lost), "1 % of 100,000 packets lost, got {lost}");
        assert_eq!(lost, run(7), "the same seed loses the same packets");
        let mut none = Shaper::new(100.0, Duration::ZERO, usize::MAX, 0.0, 7);
        assert!((0..10_000).all(|i| matches!(none.admit(Duration::from_millis(i), 100), Verdict::Deliver(_))));
    }
}
