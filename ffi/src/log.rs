//! `tunnel_set_log_callback`: libtunnel's `tracing` events, delivered to one C function. A
//! subscriber is installed process-wide on the first call; the callback, its userdata and the
//! most verbose level can be replaced or removed (NULL) at any time.

use std::ffi::{c_char, c_void, CString};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::RwLock;

use once_cell::sync::OnceCell;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

use crate::boundary::fallible;
use crate::error::{tunnel_result, Fail};

/// Severity of a log message; the numbers grow with verbosity.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum tunnel_log_level {
    /// Nothing is logged.
    Off = 0,
    /// A bug in libtunnel.
    Error = 1,
    /// Something went wrong that libtunnel handles (a relay dropped, a reconnect).
    Warn = 2,
    /// Lifecycle events (a relay listening, a listener registered).
    Info = 3,
    /// Per-connection detail.
    Debug = 4,
    /// Everything.
    Trace = 5,
}

/// Receives one log message. `userdata` is what was given to `tunnel_set_log_callback`;
/// `message` is NUL-terminated and valid only during the call (copy it to keep it). Called on
/// whichever thread logs (usually a `libtunnel-rt` runtime thread), possibly from several
/// threads at once. It must not block, and must not call blocking libtunnel functions (they
/// return `TUNNEL_RESULT_WRONG_THREAD`). Messages never hold secrets.
pub type tunnel_log_callback = Option<unsafe extern "C" fn(userdata: *mut c_void, level: tunnel_log_level, message: *const c_char)>;

#[derive(Clone, Copy)]
struct Sink {
    callback: unsafe extern "C" fn(*mut c_void, tunnel_log_level, *const c_char),
    /// The caller's pointer, passed back untouched (kept as an integer to be shareable).
    userdata: usize,
}

/// The current sink; `None` when no callback is set.
static SINK: RwLock<Option<Sink>> = RwLock::new(None);
/// The most verbose level delivered (a `tunnel_log_level` number; 0 = off).
static MAX_LEVEL: AtomicU8 = AtomicU8::new(0);
/// Whether our subscriber became the global one (set once per process).
static INSTALLED: OnceCell<Result<(), String>> = OnceCell::new();

fn level_of(l: &Level) -> tunnel_log_level {
    match *l {
        Level::ERROR => tunnel_log_level::Error,
        Level::WARN => tunnel_log_level::Warn,
        Level::INFO => tunnel_log_level::Info,
        Level::DEBUG => tunnel_log_level::Debug,
        Level::TRACE => tunnel_log_level::Trace,
    }
}

struct CallbackLayer;

impl<S: Subscriber> Layer<S> for CallbackLayer {
    fn register_callsite(&self, _: &'static Metadata<'static>) -> tracing::subscriber::Interest {
        // The level can change at any time, so never let tracing cache a decision.
        tracing::subscriber::Interest::sometimes()
    }

    fn enabled(&self, meta: &Metadata<'_>, _: Context<'_, S>) -> bool {
        (level_of(meta.level()) as u8) <= MAX_LEVEL.load(Ordering::Relaxed)
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let Some(sink) = *SINK.read().unwrap_or_else(|p| p.into_inner()) else { return };
        let line = format!("{}: {}", event.metadata().target(), libtunnel::log_line::event_line(event));
        let text = CString::new(line.replace('\0', "\\0")).expect("NULs were escaped");
        // SAFETY: the C caller registered this function with this userdata and promised it is
        // callable from any thread; `text` outlives the call.
        unsafe { (sink.callback)(sink.userdata as *mut c_void, level_of(event.metadata().level()), text.as_ptr()) };
    }
}

/// Send libtunnel's log messages up to `max_level` to `callback` with `userdata` (see
/// `tunnel_log_callback` for the thread rules). A NULL `callback` or `TUNNEL_LOG_LEVEL_OFF`
/// stops logging. The previous callback may still be running on another thread when this
/// returns. Fails with `TUNNEL_RESULT_GENERAL` if the process already has another global
/// `tracing` subscriber (a Rust host program), which then keeps receiving the events.
///
/// # Safety
/// `callback` must be NULL or a function that stays callable, with `userdata`, until it is
/// replaced.
#[no_mangle]
pub unsafe extern "C" fn tunnel_set_log_callback(callback: tunnel_log_callback, userdata: *mut c_void, max_level: u32) -> tunnel_result {
    fallible(|| {
        // An integer, not the enum: C may pass any value, and an out-of-range enum is undefined
        // behaviour in Rust (rustls-ffi's rule).
        if max_level > tunnel_log_level::Trace as u32 {
            return Err(Fail::new(
                tunnel_result::InvalidArgument,
                format!("max_level {max_level} is not a tunnel_log_level (0 = TUNNEL_LOG_LEVEL_OFF … 5 = TUNNEL_LOG_LEVEL_TRACE)"),
            ));
        }
        let installed = INSTALLED.get_or_init(|| {
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(CallbackLayer)).map_err(|e| {
                format!("another tracing subscriber is already installed in this process ({e}); libtunnel's log callback cannot be used")
            })
        });
        installed.clone().map_err(|e| Fail::new(tunnel_result::General, e))?;
        let mut sink = SINK.write().unwrap_or_else(|p| p.into_inner());
        *sink = callback.map(|callback| Sink { callback, userdata: userdata as usize });
        let level = if sink.is_some() { max_level as u8 } else { 0 };
        MAX_LEVEL.store(level, Ordering::Relaxed);
        tracing::callsite::rebuild_interest_cache();
        Ok(())
    })
}
