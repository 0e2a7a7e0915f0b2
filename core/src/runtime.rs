//! The Tokio runtime every face runs libtunnel on, built one way: named `libtunnel-rt` threads
//! with SIGPIPE blocked ([`block_sigpipe`]), all drivers enabled, and `TUNNEL_WORKER_THREADS` (the old `LIBTUNNEL_WORKER_THREADS` still
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
        .on_thread_start(block_sigpipe)
        .build()
        .map_err(|e| Error::new(ErrorCode::Io, format!("cannot start libtunnel's runtime threads: {e}")))
}

/// A write to a connection its peer closed raises SIGPIPE, whose default action ends the process.
/// Rust programs, Python and Node ignore it; a C program linking libtunnel usually does not, and
/// the relay's or a session's writes on these threads then killed it (the C test of an embedded
/// relay died so, at its end). Blocked on the runtime's own threads, the signal stays pending and
/// the write fails with `EPIPE`, which the code handles; the host's disposition is left alone.
fn block_sigpipe() {
    #[cfg(unix)]
    // SAFETY: the set is initialised by sigemptyset before use, and pthread_sigmask changes only
    // the calling thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGPIPE);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}
