//! Result codes at the C edge: `tunnel_result`, its names, and [`Fail`] (a code with its
//! message). Core failures map from the one `libtunnel::ErrorCode` table (code N becomes
//! 7000 + N); failures only the C edge can have (NULL, bad UTF-8, panic, wrong thread, forked
//! child) live at 7100 and up. How a call turns a `Fail` into a return value and a last-error
//! message is `boundary`'s job.

use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use libtunnel::ErrorCode;

/// The outcome of every fallible libtunnel call. `TUNNEL_RESULT_OK` is 0; every failure is at
/// least 7000, so it never looks like an errno. `tunnel_result_name` gives the SCREAMING name
/// (the core's name for 7001-7099) and `tunnel_last_error_message` says what went wrong on this
/// thread. Numbers are stable: new codes are added, retired numbers stay reserved.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum tunnel_result {
    /// Success; out-pointers were written.
    Ok = 0,
    /// The relay rejected the credentials (wrong secret, replayed proof).
    AuthFailed = 7001,
    /// The relay has no key with this key id.
    AuthUnknownKey = 7002,
    /// Client and relay clocks differ by more than 15 minutes.
    AuthClockSkew = 7003,
    /// The target is not in the relay's allowlist.
    NotAllowed = 7004,
    /// The relay could not resolve or reach the target.
    Unreachable = 7005,
    /// The target refused the relay's connection.
    Refused = 7006,
    /// An operation did not finish in time (a dial, or an accept with a timeout).
    Timeout = 7007,
    /// The peer broke the protocol.
    Protocol = 7008,
    /// The relay could not be reached, or the session to it died.
    RelayUnavailable = 7009,
    /// A relay setting is missing or malformed.
    InvalidConfig = 7010,
    /// An argument (URL, target, key, timeout) is malformed.
    InvalidArgument = 7011,
    /// The dialer, listener or stream was closed.
    Closed = 7012,
    /// A local I/O error.
    Io = 7013,
    /// Any other failure (see the message).
    General = 7014,
    /// A listener name belongs to another key.
    NameTaken = 7015,
    /// End to end: the listener's key does not prove the name dialed (or a chosen name has no pin).
    E2eIdentity = 7016,
    /// End to end: the listener does not admit this dialer's key, or refused a plaintext stream.
    E2eRefused = 7017,
    /// A pointer argument was NULL; the message names it.
    NullParameter = 7101,
    /// A string argument was not valid UTF-8; the message names it.
    InvalidUtf8 = 7102,
    /// libtunnel panicked (a bug); the message holds the panic text. The process can go on.
    Panic = 7103,
    /// A blocking call came from a libtunnel runtime thread (for example inside a log callback).
    WrongThread = 7104,
    /// The call came from a child forked after libtunnel started its runtime; use libtunnel
    /// only in the parent, or exec first.
    ForkedChild = 7105,
    /// The runtime (its threads) could not be started.
    RuntimeFailed = 7106,
}

/// First number of the core's codes: core code N is `CORE_BASE + N`.
pub const CORE_BASE: u32 = 7000;

impl tunnel_result {
    /// The C code for a core error code. A code the core adds later maps to `General` until
    /// this table learns it (the `every_core_code_has_its_own_number` test fails meanwhile).
    pub fn from_code(code: ErrorCode) -> tunnel_result {
        use tunnel_result as R;
        match code {
            ErrorCode::AuthFailed => R::AuthFailed,
            ErrorCode::AuthUnknownKey => R::AuthUnknownKey,
            ErrorCode::AuthClockSkew => R::AuthClockSkew,
            ErrorCode::NotAllowed => R::NotAllowed,
            ErrorCode::Unreachable => R::Unreachable,
            ErrorCode::Refused => R::Refused,
            ErrorCode::Timeout => R::Timeout,
            ErrorCode::Protocol => R::Protocol,
            ErrorCode::RelayUnavailable => R::RelayUnavailable,
            ErrorCode::InvalidConfig => R::InvalidConfig,
            ErrorCode::InvalidArgument => R::InvalidArgument,
            ErrorCode::Closed => R::Closed,
            ErrorCode::Io => R::Io,
            ErrorCode::General => R::General,
            ErrorCode::NameTaken => R::NameTaken,
            ErrorCode::E2eIdentity => R::E2eIdentity,
            ErrorCode::E2eRefused => R::E2eRefused,
            _ => R::General,
        }
    }

    /// The SCREAMING name, without the `TUNNEL_RESULT_` prefix; core codes use the core's name.
    pub fn name(self) -> &'static CStr {
        use tunnel_result as R;
        match self {
            R::Ok => c"OK",
            R::NullParameter => c"NULL_PARAMETER",
            R::InvalidUtf8 => c"INVALID_UTF8",
            R::Panic => c"PANIC",
            R::WrongThread => c"WRONG_THREAD",
            R::ForkedChild => c"FORKED_CHILD",
            R::RuntimeFailed => c"RUNTIME_FAILED",
            core => core_name(core as u32 - CORE_BASE),
        }
    }
}

/// The core's name for code `n`, NUL-terminated once per process.
fn core_name(n: u32) -> &'static CStr {
    static NAMES: once_cell::sync::Lazy<Vec<(u32, CString)>> =
        once_cell::sync::Lazy::new(|| ErrorCode::ALL.iter().map(|c| (c.number(), CString::new(c.name()).expect("code names have no NUL"))).collect());
    NAMES.iter().find(|(k, _)| *k == n).map(|(_, s)| s.as_c_str()).unwrap_or(c"UNKNOWN")
}

/// A failure on its way to C: the code to return and the message to store.
#[derive(Debug)]
pub struct Fail {
    /// Returned to the caller.
    pub code: tunnel_result,
    /// Stored as the thread's last error.
    pub message: String,
}

impl Fail {
    /// A failure with an explicit code.
    pub fn new(code: tunnel_result, message: impl Into<String>) -> Fail {
        Fail { code, message: message.into() }
    }
}

impl From<libtunnel::Error> for Fail {
    fn from(e: libtunnel::Error) -> Fail {
        Fail { code: tunnel_result::from_code(e.code()), message: e.message().to_string() }
    }
}

/// The SCREAMING name of a result code without its prefix ("OK", "NOT_ALLOWED",
/// "NULL_PARAMETER"; "UNKNOWN" for a number this library does not know). The string is static:
/// never free it.
#[no_mangle]
pub extern "C" fn tunnel_result_name(result: u32) -> *const c_char {
    catch_unwind(AssertUnwindSafe(|| match result {
        0 => c"OK".as_ptr(),
        n if n > CORE_BASE && n < CORE_BASE + 100 => core_name(n - CORE_BASE).as_ptr(),
        n => FFI_CODES.iter().find(|r| **r as u32 == n).map(|r| r.name().as_ptr()).unwrap_or(c"UNKNOWN".as_ptr()),
    }))
    .unwrap_or(c"UNKNOWN".as_ptr())
}

/// The codes that only the C edge produces.
const FFI_CODES: &[tunnel_result] = &[
    tunnel_result::NullParameter,
    tunnel_result::InvalidUtf8,
    tunnel_result::Panic,
    tunnel_result::WrongThread,
    tunnel_result::ForkedChild,
    tunnel_result::RuntimeFailed,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_core_code_has_its_own_number() {
        for c in ErrorCode::ALL {
            let r = tunnel_result::from_code(*c);
            assert_eq!(r as u32, CORE_BASE + c.number(), "{c} needs its own tunnel_result variant");
            assert_eq!(r.name().to_str().unwrap(), c.name());
            // SAFETY: tunnel_result_name returns a static NUL-terminated string.
            let via_export = unsafe { CStr::from_ptr(tunnel_result_name(r as u32)) };
            assert_eq!(via_export.to_str().unwrap(), c.name());
        }
    }

    #[test]
    fn ffi_codes_have_names_and_unknown_numbers_do_not() {
        for r in FFI_CODES {
            // SAFETY: static NUL-terminated string.
            let n = unsafe { CStr::from_ptr(tunnel_result_name(*r as u32)) };
            assert_eq!(n, r.name());
            assert_ne!(n, c"UNKNOWN");
        }
        // SAFETY: static NUL-terminated string.
        assert_eq!(unsafe { CStr::from_ptr(tunnel_result_name(12345)) }, c"UNKNOWN");
    }
}
