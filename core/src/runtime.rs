//! The Tokio runtime every face runs libtunnel on, built one way: named `libtunnel-rt` threads,
//! all drivers enabled, and `TUNNEL_WORKER_THREADS` (the old `LIBTUNNEL_WORKER_THREADS` still
//! read, with a warning) choosing the worker count, checked to be 1..=1024. The default is one
//! worker per core ([`Workers::PerCore`], a multi-thread runtime, which the libraries need: their
//! callers block on it from their own threads while its workers drive the background tasks)
//! everywhere except the CLI's client commands, which move one session's bytes and are cheapest
//! on the main thread alone ([`Workers::One`]).

use tokio::runtime::{Builder, Runtime};

use crate::client::config::{ClientEnv, CLIENT_VARS, WORKER_THREADS_VAR};
use crate::error::{Error, ErrorCode, Result};

/// The worker count when `TUNNEL_WORKER_THREADS` is not set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    /// A multi-thread runtime, one worker per core unless the variable says otherwise.
    PerCore,
    /// A current-thread runtime unless the variable asks for more than one worker.
    One,
}

/// `TUNNEL_WORKER_THREADS` from `env`, checked: `None` when unset.
pub fn worker_threads(env: &ClientEnv) -> Result<Option<usize>> {
    let var = CLIENT_VARS.iter().find(|v| v.name == WORKER_THREADS_VAR).expect("listed");
    match env.var(var)? {
        None => Ok(None),
        Some(v) => v.trim().parse::<usize>().ok().filter(|n| (1..=1024).contains(n)).map(Some).ok_or_else(|| {
            Error::new(ErrorCode::InvalidConfig, format!("{WORKER_THREADS_VAR} must be a whole number of threads between 1 and 1024, got {v:?}"))
        }),
    }
}

/// Build the runtime: `TUNNEL_WORKER_THREADS` workers, else `default`.
pub fn build(default: Workers) -> Result<Runtime> {
    let mut b = match (worker_threads(&ClientEnv::Process)?, default) {
        (Some(1) | None, Workers::One) => Builder::new_current_thread(),
        (Some(n), _) => {
            let mut b = Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        (None, Workers::PerCore) => Builder::new_multi_thread(),
    };
    b.enable_all()
        .thread_name("libtunnel-rt")
        .build()
        .map_err(|e| Error::new(ErrorCode::Io, format!("cannot start libtunnel's runtime threads: {e}")))
}

/// Keep glibc's allocator from handing memory back to the system after every large free: with
/// its defaults, each 128 KiB-plus buffer a busy stream frees shrinks a thread's arena
/// (`madvise`), and the next allocation faults fresh zeroed pages in. Measured on a loopback
/// transfer through `tunnel forward` and `tunnel server`, CPU per GB of both: 1.66-1.92 s with
/// the defaults, 1.44-1.61 s with both tuned, 1.57-1.67 s with only `forward` tuned. The relay
/// keeps the defaults: tuned, it held 29-35 MiB instead of 16 MiB after a flood of 200 uploads
/// (`malloc_trim` returns less). Process-wide, so only programs call it (`tunnel`'s client
/// commands do); a library does not change its host's allocator. Other allocators: nothing to do.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
    }
}
