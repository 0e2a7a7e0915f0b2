//! Admission guards around authentication: a per-source-address count of failed
//! authentications (past the limit, that address's failures are answered slowly and logged once
//! per minute rather than once per try; its valid proofs still pass), and a count of open
//! multiplexed sessions per shared key (`max_sessions_per_key`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window failures are counted in.
const WINDOW: Duration = Duration::from_secs(60);
/// Most addresses tracked at once; past this, expired entries are dropped, then the oldest.
const MAX_TRACKED: usize = 16_384;

struct Failures {
    since: Instant,
    count: usize,
    /// Whether the "rate limited" warning was logged in this window.
    warned: bool,
}

/// What the limiter says about an address that is about to authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Check its credentials.
    Check,
    /// Too many failures in this window (which ends in this long): answer failures slowly.
    Refuse(Duration),
}

/// Failed authentications per source address in the current minute.
pub(crate) struct AuthLimiter {
    per_minute: usize,
    table: Mutex<HashMap<IpAddr, Failures>>,
}

impl AuthLimiter {
    pub(crate) fn new(per_minute: usize) -> AuthLimiter {
        AuthLimiter { per_minute, table: Mutex::new(HashMap::new()) }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Failures>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// May `ip` try to authenticate now?
    pub(crate) fn admit(&self, ip: IpAddr) -> Admission {
        let now = Instant::now();
        let t = self.table();
        match t.get(&ip) {
            Some(f) if f.count >= self.per_minute && now.duration_since(f.since) < WINDOW => Admission::Refuse(WINDOW - now.duration_since(f.since)),
            _ => Admission::Check,
        }
    }

    /// Count a failure (or a refused attempt); returns whether this is the first time in the
    /// window that `ip` went over the limit (log a warning then, and only then).
    pub(crate) fn failed(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let mut t = self.table();
        if t.len() >= MAX_TRACKED && !t.contains_key(&ip) {
            t.retain(|_, f| now.duration_since(f.since) < WINDOW);
            if t.len() >= MAX_TRACKED {
                if let Some(oldest) = t.iter().min_by_key(|(_, f)| f.since).map(|(k, _)| *k) {
                    t.remove(&oldest);
                }
            }
        }
        let f = t.entry(ip).or_insert(Failures { since: now, count: 0, warned: false });
        if now.duration_since(f.since) >= WINDOW {
            *f = Failures { since: now, count: 0, warned: false };
        }
        f.count += 1;
        if f.count > self.per_minute && !f.warned {
            f.warned = true;
            return true;
        }
        false
    }

    /// Clear the address's record. The relay does not call it on success: a valid key from a
    /// shared address must not reset a guesser's count (failures expire with their minute).
    #[cfg(test)]
    pub(crate) fn succeeded(&self, ip: IpAddr) {
        self.table().remove(&ip);
    }
}

/// Open multiplexed sessions per key id.
#[derive(Default)]
pub(crate) struct KeySessions {
    open: Mutex<HashMap<u32, usize>>,
}

/// One counted session; uncounted when dropped.
pub(crate) struct KeySession<'a> {
    owner: &'a KeySessions,
    kid: u32,
}

impl KeySessions {
    /// Count a new session for `kid`, unless `limit` are already open.
    pub(crate) fn enter(&self, kid: u32, limit: usize) -> Option<KeySession<'_>> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(kid).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(KeySession { owner: self, kid })
    }
}

impl Drop for KeySession<'_> {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.kid) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.kid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_after_the_limit_and_warns_once() {
        let l = AuthLimiter::new(3);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(l.admit(ip), Admission::Check);
            assert!(!l.failed(ip));
        }
        assert!(matches!(l.admit(ip), Admission::Refuse(d) if d <= WINDOW));
        assert!(l.failed(ip), "the first attempt over the limit is logged");
        assert!(!l.failed(ip), "later ones in the same minute are not");
        assert_eq!(l.admit(other), Admission::Check, "other addresses are not affected");
        l.succeeded(ip);
        assert_eq!(l.admit(ip), Admission::Check);
    }

    #[test]
    fn key_sessions_are_bounded_and_released() {
        let k = KeySessions::default();
        let a = k.enter(1, 2).expect("first");
        let _b = k.enter(1, 2).expect("second");
        assert!(k.enter(1, 2).is_none(), "third over the limit");
        assert!(k.enter(2, 2).is_some(), "other keys have their own count");
        drop(a);
        assert!(k.enter(1, 2).is_some(), "a closed session frees its place");
    }
}
