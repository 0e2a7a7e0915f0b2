//! The one error table every face maps from.
//!
//! Internally each operation fails with a typed [`Error`] carrying an [`ErrorCode`] and a message
//! that names the cause and the fix. The C ABI turns the code into a `tunnel_result` number, Python
//! into an exception class, Node into `err.code`. Numbers and names are stable: add new codes at the
//! end, never renumber.

use std::fmt;
use std::io;

/// Stable error codes (number + SCREAMING name + Node-style `E…` code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u32)]
pub enum ErrorCode {
    /// The relay rejected our credentials (wrong secret, replayed proof), or an upstream proxy
    /// refused (or asked for) the credentials of its URL.
    AuthFailed = 1,
    /// The relay has no key with our key id.
    AuthUnknownKey = 2,
    /// Our clock and the relay's differ by more than the allowed skew (15 minutes).
    AuthClockSkew = 3,
    /// The target is not in the relay's allowlist (SOCKS5 reply 0x02).
    NotAllowed = 4,
    /// The relay could not resolve or reach the target (SOCKS5 replies 0x03, 0x04).
    Unreachable = 5,
    /// The target refused the connection (SOCKS5 reply 0x05).
    Refused = 6,
    /// An operation did not finish in time (SOCKS5 reply 0x06, or a local deadline).
    Timeout = 7,
    /// The peer broke the protocol (malformed bytes, oversized frame, wrong subprotocol).
    Protocol = 8,
    /// The relay could not be reached or the session to it died.
    RelayUnavailable = 9,
    /// Configuration is missing or malformed.
    InvalidConfig = 10,
    /// An argument (URL, target, key) is malformed.
    InvalidArgument = 11,
    /// The stream or session was closed or reset.
    Closed = 12,
    /// A local I/O error (bind, accept, file).
    Io = 13,
    /// The relay answered with a general failure (SOCKS5 reply 0x01) or an internal error happened.
    General = 14,
    /// A listener name is registered by another key, or this key may not use it.
    NameTaken = 15,
    /// End to end: the listener's key does not prove the name dialed (or nothing pins a chosen name).
    E2eIdentity = 16,
    /// End to end: the listener does not admit this dialer's key, or refused a plaintext stream.
    E2eRefused = 17,
}

impl ErrorCode {
    /// Every code, in numeric order (used by the faces to build their tables).
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::AuthFailed,
        ErrorCode::AuthUnknownKey,
        ErrorCode::AuthClockSkew,
        ErrorCode::NotAllowed,
        ErrorCode::Unreachable,
        ErrorCode::Refused,
        ErrorCode::Timeout,
        ErrorCode::Protocol,
        ErrorCode::RelayUnavailable,
        ErrorCode::InvalidConfig,
        ErrorCode::InvalidArgument,
        ErrorCode::Closed,
        ErrorCode::Io,
        ErrorCode::General,
        ErrorCode::NameTaken,
        ErrorCode::E2eIdentity,
        ErrorCode::E2eRefused,
    ];

    /// The stable number.
    pub fn number(self) -> u32 {
        self as u32
    }

    /// The stable SCREAMING name (Python's `.code`).
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::AuthFailed => "AUTH_FAILED",
            ErrorCode::AuthUnknownKey => "AUTH_UNKNOWN_KEY",
            ErrorCode::AuthClockSkew => "AUTH_CLOCK_SKEW",
            ErrorCode::NotAllowed => "NOT_ALLOWED",
            ErrorCode::Unreachable => "UNREACHABLE",
            ErrorCode::Refused => "REFUSED",
            ErrorCode::Timeout => "TIMEOUT",
            ErrorCode::Protocol => "PROTOCOL",
            ErrorCode::RelayUnavailable => "RELAY_UNAVAILABLE",
            ErrorCode::InvalidConfig => "INVALID_CONFIG",
            ErrorCode::InvalidArgument => "INVALID_ARGUMENT",
            ErrorCode::Closed => "CLOSED",
            ErrorCode::Io => "IO",
            ErrorCode::General => "GENERAL",
            ErrorCode::NameTaken => "NAME_TAKEN",
            ErrorCode::E2eIdentity => "E2E_IDENTITY",
            ErrorCode::E2eRefused => "E2E_REFUSED",
        }
    }

    /// The Node-style code (`err.code` in Node).
    pub fn errno_name(self) -> &'static str {
        match self {
            ErrorCode::AuthFailed => "EAUTH",
            ErrorCode::AuthUnknownKey => "EAUTHKEY",
            ErrorCode::AuthClockSkew => "EAUTHCLOCK",
            ErrorCode::NotAllowed => "ENOTALLOWED",
            ErrorCode::Unreachable => "EUNREACHABLE",
            ErrorCode::Refused => "ECONNREFUSED",
            ErrorCode::Timeout => "ETIMEDOUT",
            ErrorCode::Protocol => "EPROTO",
            ErrorCode::RelayUnavailable => "ERELAYUNAVAILABLE",
            ErrorCode::InvalidConfig => "EINVALIDCONFIG",
            ErrorCode::InvalidArgument => "EINVAL",
            ErrorCode::Closed => "ECLOSED",
            ErrorCode::Io => "EIO",
            ErrorCode::General => "EGENERAL",
            ErrorCode::NameTaken => "ENAMETAKEN",
            ErrorCode::E2eIdentity => "EE2EIDENTITY",
            ErrorCode::E2eRefused => "EE2EREFUSED",
        }
    }

    /// Whether trying the same thing again cannot succeed until something changes: a refusal of
    /// who we are or what we asked (a wrong or unknown key, a clock off, a target or name not
    /// allowed, a name another key holds, bad input, an end-to-end refusal). The rest (the relay
    /// unreachable, a timeout, a lost connection, a busy or failed target, a protocol hiccup) may
    /// pass on their own. The one rule every face and the CLI use to decide between retrying and
    /// stopping: a listener stops reconnecting on a final close or registration refusal, `tunnel
    /// forward`/`listen` stop at start, Node emits `'error'` once and stops.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            ErrorCode::AuthFailed
                | ErrorCode::AuthUnknownKey
                | ErrorCode::AuthClockSkew
                | ErrorCode::NotAllowed
                | ErrorCode::InvalidConfig
                | ErrorCode::InvalidArgument
                | ErrorCode::NameTaken
                | ErrorCode::E2eIdentity
                | ErrorCode::E2eRefused
        )
    }

    /// The code with this stable number (a wire `Rst` or `GoAway` payload, a C result).
    pub fn from_number(n: u32) -> Option<ErrorCode> {
        Self::ALL.iter().copied().find(|c| c.number() == n)
    }

    /// Parse a SCREAMING name back into a code.
    pub fn from_name(name: &str) -> Option<ErrorCode> {
        Self::ALL.iter().copied().find(|c| c.name() == name)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The error type of every public libtunnel operation: a stable code plus a message that says
/// what went wrong and what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    code: ErrorCode,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// A new error with a code and a message (which should name the cause and the fix).
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error { code, message: message.into(), source: None }
    }

    /// Attach the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The stable code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The human message (without the code).
    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::InvalidConfig, message)
    }

    pub(crate) fn argument(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::InvalidArgument, message)
    }

    pub(crate) fn protocol(message: impl Into<String>) -> Self {
        Error::new(ErrorCode::Protocol, message)
    }

    /// Convert into an `io::Error` whose inner error is this one (so the code survives the trip
    /// through `AsyncRead`/`AsyncWrite` and can be recovered with [`Error::from_io`]).
    pub fn into_io(self) -> io::Error {
        let kind = match self.code {
            ErrorCode::Timeout => io::ErrorKind::TimedOut,
            ErrorCode::Refused => io::ErrorKind::ConnectionRefused,
            ErrorCode::Closed => io::ErrorKind::ConnectionReset,
            ErrorCode::NotAllowed | ErrorCode::AuthFailed | ErrorCode::E2eRefused => io::ErrorKind::PermissionDenied,
            ErrorCode::InvalidArgument | ErrorCode::InvalidConfig => io::ErrorKind::InvalidInput,
            ErrorCode::Protocol => io::ErrorKind::InvalidData,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }

    /// Recover a libtunnel error from an `io::Error`, classifying plain I/O errors.
    pub fn from_io(err: io::Error, context: &str) -> Self {
        if err.get_ref().is_some_and(|e| e.is::<Error>()) {
            let inner = err.into_inner().expect("checked get_ref above");
            return *inner.downcast::<Error>().expect("checked is::<Error> above");
        }
        let code = match err.kind() {
            io::ErrorKind::TimedOut => ErrorCode::Timeout,
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof => {
                ErrorCode::Closed
            }
            io::ErrorKind::InvalidData => ErrorCode::Protocol,
            _ => ErrorCode::Io,
        };
        Error::new(code, format!("{context}: {err}")).with_source(err)
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> io::Error {
        e.into_io()
    }
}

/// `Result` with libtunnel's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_names_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for (i, c) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(c.number(), i as u32 + 1, "codes are dense and ordered");
            assert!(seen.insert(c.name()));
            assert_eq!(ErrorCode::from_name(c.name()), Some(*c));
        }
    }

    #[test]
    fn refusals_are_final_and_transient_failures_are_not() {
        for c in [ErrorCode::AuthFailed, ErrorCode::NotAllowed, ErrorCode::NameTaken, ErrorCode::InvalidArgument, ErrorCode::E2eRefused] {
            assert!(c.is_final(), "{c}");
        }
        for c in [ErrorCode::RelayUnavailable, ErrorCode::Timeout, ErrorCode::Io, ErrorCode::Closed, ErrorCode::Refused, ErrorCode::Protocol] {
            assert!(!c.is_final(), "{c}");
        }
    }

    #[test]
    fn code_survives_io_round_trip() {
        let e = Error::new(ErrorCode::NotAllowed, "target x:1 is not allowed");
        let io = e.into_io();
        assert_eq!(io.kind(), io::ErrorKind::PermissionDenied);
        let back = Error::from_io(io, "ctx");
        assert_eq!(back.code(), ErrorCode::NotAllowed);
        assert_eq!(back.message(), "target x:1 is not allowed");
    }
}
