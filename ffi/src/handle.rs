//! The typed casts between C handles and Rust values, and the argument checks every export
//! uses: a NULL pointer becomes `TUNNEL_RESULT_NULL_PARAMETER` and bad UTF-8
//! `TUNNEL_RESULT_INVALID_UTF8`, each with a message naming the argument.

use std::ffi::{c_char, CStr};

use crate::error::{tunnel_result, Fail};

/// Ties an opaque C type to the Rust value C holds a `Box` of.
pub trait Castable {
    /// The Rust value behind the C pointer.
    type Rust;
}

/// Move `value` to the heap and hand C the pointer; the matching `_free` calls [`free_box`].
pub fn into_raw<C: Castable>(value: C::Rust) -> *mut C {
    Box::into_raw(Box::new(value)).cast()
}

/// Borrow the value behind a handle, refusing NULL.
///
/// # Safety
/// `ptr` must be NULL or a live pointer made by [`into_raw`] for the same `C`.
pub unsafe fn try_ref<'a, C: Castable>(ptr: *const C, what: &str) -> Result<&'a C::Rust, Fail> {
    // SAFETY: the caller guarantees `ptr` came from `into_raw::<C>` and is not freed yet.
    unsafe { ptr.cast::<C::Rust>().as_ref() }.ok_or_else(|| null(what))
}

/// Mutably borrow the value behind a handle, refusing NULL.
///
/// # Safety
/// As for [`try_ref`], and no other reference to the value may be live.
pub unsafe fn try_mut<'a, C: Castable>(ptr: *mut C, what: &str) -> Result<&'a mut C::Rust, Fail> {
    // SAFETY: the caller guarantees `ptr` came from `into_raw::<C>` and is used exclusively.
    unsafe { ptr.cast::<C::Rust>().as_mut() }.ok_or_else(|| null(what))
}

/// Drop the value behind a handle; NULL is a no-op.
///
/// # Safety
/// `ptr` must be NULL or a pointer made by [`into_raw`] for the same `C`, not freed before.
pub unsafe fn free_box<C: Castable>(ptr: *mut C) {
    if !ptr.is_null() {
        // SAFETY: the caller guarantees `ptr` came from `Box::into_raw` in `into_raw::<C>`.
        drop(unsafe { Box::from_raw(ptr.cast::<C::Rust>()) });
    }
}

/// The NULL-argument failure.
pub fn null(what: &str) -> Fail {
    Fail::new(tunnel_result::NullParameter, format!("argument `{what}` is NULL"))
}

/// Check that an out-pointer is not NULL, before any work is done.
pub fn out_ptr<T>(ptr: *mut T, what: &str) -> Result<*mut T, Fail> {
    if ptr.is_null() {
        Err(null(what))
    } else {
        Ok(ptr)
    }
}

/// Borrow a C string argument as UTF-8.
///
/// # Safety
/// `ptr` must be NULL or point to a NUL-terminated string that outlives `'a`.
pub unsafe fn str_arg<'a>(ptr: *const c_char, what: &str) -> Result<&'a str, Fail> {
    if ptr.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-NULL and NUL-terminated, as the caller guarantees.
    let bytes = unsafe { CStr::from_ptr(ptr) };
    bytes
        .to_str()
        .map_err(|e| Fail::new(tunnel_result::InvalidUtf8, format!("argument `{what}` is not valid UTF-8 (bad byte at offset {})", e.valid_up_to())))
}

/// Copy `s` into a caller's buffer the way `snprintf` does: at most `len - 1` bytes and a NUL,
/// nothing at all when `len` is 0; `*out_n` (when not NULL) gets the full length.
///
/// # Safety
/// `buf` must be NULL or point to `len` writable bytes; `out_n` must be NULL or writable.
pub unsafe fn write_str(s: &str, buf: *mut c_char, len: usize, out_n: *mut usize) -> Result<(), Fail> {
    if buf.is_null() && len != 0 {
        return Err(null("buf"));
    }
    if len != 0 {
        let n = s.len().min(len - 1);
        // SAFETY: `buf` has `len` bytes (caller's guarantee) and `n < len`, so the copy and the
        // NUL fit; `s` cannot overlap a buffer C owns.
        unsafe {
            std::ptr::copy_nonoverlapping(s.as_ptr().cast::<c_char>(), buf, n);
            *buf.add(n) = 0;
        }
    }
    if !out_n.is_null() {
        // SAFETY: non-NULL and writable, as the caller guarantees.
        unsafe { *out_n = s.len() };
    }
    Ok(())
}
