//! The call boundary: every fallible export runs inside [`fallible`], which catches panics,
//! stores the failure's message in a thread-local for `tunnel_last_error_message`, and returns
//! the `tunnel_result`; exports that cannot fail run inside [`infallible`]. No panic crosses
//! into C.

use std::cell::RefCell;
use std::ffi::c_char;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{tunnel_result, Fail};
use crate::handle::write_str;

thread_local! {
    /// The message of the last failed call on this thread; replaced by the next failure.
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

fn set_last_error(message: String) {
    LAST_ERROR.with(|l| *l.borrow_mut() = message);
}

/// Run an export's body: catch panics, record the message of a failure, return the code.
pub fn fallible(body: impl FnOnce() -> Result<(), Fail>) -> tunnel_result {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => tunnel_result::Ok,
        Ok(Err(fail)) => {
            set_last_error(fail.message);
            fail.code
        }
        Err(panic) => {
            let text = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".into());
            set_last_error(format!("libtunnel panicked (a bug; please report it): {text}"));
            tunnel_result::Panic
        }
    }
}

/// Run an export that cannot report failure: a panic yields `default`.
pub fn infallible<T>(default: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(default)
}

/// Copy the message of the last failed libtunnel call on this thread into `buf`, as `snprintf`
/// does: at most `len - 1` bytes plus a NUL (nothing when `len` is 0, and then `buf` may be
/// NULL). `*out_n` (optional, may be NULL) receives the full message length without the NUL, so
/// a caller can retry with a bigger buffer. The message is empty when nothing failed yet.
/// Successful calls do not clear it. Returns `TUNNEL_RESULT_NULL_PARAMETER` only when `buf` is
/// NULL and `len` is not 0.
///
/// # Safety
/// `buf` must point to `len` writable bytes; `out_n` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn tunnel_last_error_message(buf: *mut c_char, len: usize, out_n: *mut usize) -> tunnel_result {
    // Not through `fallible`: reading the message must not replace it.
    infallible(tunnel_result::Panic, || {
        LAST_ERROR.with(|l| {
            // SAFETY: the caller guarantees `buf` has `len` bytes and `out_n` is NULL or writable.
            match unsafe { write_str(&l.borrow(), buf, len, out_n) } {
                Ok(()) => tunnel_result::Ok,
                Err(f) => f.code,
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use std::ffi::CStr;

    use super::*;

    #[test]
    fn a_panic_becomes_a_code_and_a_message() {
        let r = fallible(|| panic!("boom"));
        assert_eq!(r, tunnel_result::Panic);
        let mut buf = [0 as c_char; 128];
        let mut n = 0usize;
        // SAFETY: buf has 128 bytes, n is writable.
        assert_eq!(unsafe { tunnel_last_error_message(buf.as_mut_ptr(), buf.len(), &mut n) }, tunnel_result::Ok);
        // SAFETY: write_str NUL-terminates within len.
        let msg = unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap();
        assert!(msg.contains("boom"), "{msg}");
        assert_eq!(n, msg.len());
    }
}
