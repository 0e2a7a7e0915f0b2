//! The relays a client may use: one URL (a relay, or a load balancer in front of a cluster), or
//! several separated by commas, tried in turn. They may be several relays
//! (`ws://a:7835,ws://b:7835`) or several transports to one, in order of preference
//! (`grpcs://relay:443,wss://relay:443`: gRPC where the network passes it, WebSocket where it
//! does not). A client keeps using the URL that last worked; when it cannot be reached, or a
//! middlebox refuses its transport, the next is tried, so a dialer's new session and a
//! listener's reconnect land on one that works. Each attempt is bounded by [`ATTEMPT_BOUND`] when
//! there is another URL to try (a firewall that drops packets would otherwise hold the client
//! for minutes). A client that left the first URL tries it again [`PREFERRED_AGAIN_AFTER`] later
//! (on its next session: a dialer's next dial, a listener's next reconnect, or the move
//! `preferred_due` lets a dialer make), so a transport that was blocked for a while is used again
//! once it passes. Refusals are not skipped: a relay that answers with one (a wrong key, a name
//! taken) ends the attempt, since the others of a cluster would say the same.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{Error, ErrorCode, Result};
use crate::transport::RelayUrl;

/// Check a relay setting (`URL[,URL...]`) the way clients will parse it.
pub fn check_relay_urls(s: &str) -> Result<()> {
    RelayList::parse(s).map(|_| ())
}

/// How long one attempt at a URL may take while another URL remains to be tried.
pub const ATTEMPT_BOUND: Duration = Duration::from_secs(5);

/// How long a client stays on a later URL before it tries the first one again.
pub const PREFERRED_AGAIN_AFTER: Duration = Duration::from_secs(60);

/// One or more relay URLs and which one is in use.
#[derive(Debug)]
pub(crate) struct RelayList {
    urls: Vec<RelayUrl>,
    current: AtomicUsize,
    /// When the client last left (or failed to get back to) the first URL, while not on it.
    off_first_since: Mutex<Option<Instant>>,
    /// [`PREFERRED_AGAIN_AFTER`], shorter in tests.
    again_after: Duration,
    /// [`ATTEMPT_BOUND`], shorter in tests.
    attempt_bound: Duration,
}

impl Clone for RelayList {
    fn clone(&self) -> Self {
        RelayList {
            urls: self.urls.clone(),
            current: AtomicUsize::new(self.current.load(Relaxed)),
            off_first_since: Mutex::new(*self.off_first_since.lock().unwrap_or_else(|p| p.into_inner())),
            again_after: self.again_after,
            attempt_bound: self.attempt_bound,
        }
    }
}

/// Whether an error means the relay could not be reached, or its transport did not get through
/// (so another URL may be tried).
fn unreachable(e: &Error) -> bool {
    matches!(e.code(), ErrorCode::RelayUnavailable | ErrorCode::Timeout | ErrorCode::Io | ErrorCode::Protocol)
}

impl RelayList {
    /// Parse `URL[,URL...]`; every URL is checked.
    pub(crate) fn parse(s: &str) -> Result<RelayList> {
        let urls = s.split(',').map(str::trim).filter(|u| !u.is_empty()).map(RelayUrl::parse).collect::<Result<Vec<_>>>()?;
        if urls.is_empty() {
            return Err(Error::argument("no relay URL given; write it like ws://relay.example:7835 (several: separated by commas)"));
        }
        Ok(RelayList {
            urls,
            current: AtomicUsize::new(0),
            off_first_since: Mutex::new(None),
            again_after: PREFERRED_AGAIN_AFTER,
            attempt_bound: ATTEMPT_BOUND,
        })
    }

    /// Try the first URL again after `again` instead of [`PREFERRED_AGAIN_AFTER`], and bound
    /// attempts by `attempt` instead of [`ATTEMPT_BOUND`] (tests).
    pub(crate) fn with_timing(mut self, again: Duration, attempt: Duration) -> RelayList {
        self.again_after = again;
        self.attempt_bound = attempt;
        self
    }

    /// Whether the client runs on a later URL than the first, long enough that the first is due
    /// for another try.
    pub(crate) fn preferred_due(&self) -> bool {
        self.current.load(Relaxed) % self.urls.len() != 0
            && self.off_first_since.lock().unwrap_or_else(|p| p.into_inner()).is_some_and(|t| t.elapsed() >= self.again_after)
    }

    /// Record that URL `i` is in use; `tried_first` says whether the first URL was just tried
    /// (and failed, if `i` is another): the wait for its next try starts again then.
    fn use_url(&self, i: usize, tried_first: bool) {
        self.current.store(i, Relaxed);
        let mut off = self.off_first_since.lock().unwrap_or_else(|p| p.into_inner());
        if i == 0 {
            *off = None;
        } else if tried_first || off.is_none() {
            *off = Some(Instant::now());
        }
    }

    /// Reach each relay through the proxy `rules` pick for it.
    pub(crate) fn with_proxy(mut self, rules: &super::proxy::ProxyRules) -> RelayList {
        super::proxy::apply(&mut self.urls, rules);
        self
    }

    /// Whether there is more than one URL to try.
    pub(crate) fn has_alternatives(&self) -> bool {
        self.urls.len() > 1
    }

    /// The relay in use now (the first until one fails).
    pub(crate) fn current(&self) -> &RelayUrl {
        &self.urls[self.current.load(Relaxed) % self.urls.len()]
    }

    /// Run `attempt` against the relay in use, then, while relays cannot be reached, against
    /// each of the others once; the one that answered becomes the one in use.
    pub(crate) async fn try_each<T, F, Fut>(&self, mut attempt: F) -> Result<T>
    where
        F: FnMut(RelayUrl) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let n = self.urls.len();
        let start = if self.preferred_due() {
            tracing::info!(relay = %self.urls[0].url, "trying the preferred relay URL again");
            0
        } else {
            self.current.load(Relaxed) % n
        };
        let mut failures = Vec::new();
        for k in 0..n {
            let i = (start + k) % n;
            let url = &self.urls[i];
            let outcome = if n > 1 {
                match tokio::time::timeout(self.attempt_bound, attempt(url.clone())).await {
                    Ok(r) => r,
                    Err(_) => Err(Error::new(
                        ErrorCode::Timeout,
                        format!("the relay at {} did not answer within {:.1} s", url.url, self.attempt_bound.as_secs_f64()),
                    )),
                }
            } else {
                attempt(url.clone()).await
            };
            match outcome {
                Ok(v) => {
                    if i != self.current.load(Relaxed) % n {
                        tracing::info!(relay = %url.url, "using this relay URL");
                    }
                    self.use_url(i, start == 0);
                    return Ok(v);
                }
                Err(e) if unreachable(&e) && n > 1 => {
                    tracing::warn!(relay = %url.url, error = %e, "relay unreachable; trying the next URL");
                    failures.push(e);
                }
                Err(e) => {
                    self.use_url(i, start == 0);
                    return Err(e);
                }
            }
        }
        // Next time, start past the relay that failed first.
        self.use_url((start + 1) % n, start == 0);
        let last = failures.pop().expect("at least one URL was tried");
        if failures.is_empty() {
            return Err(last);
        }
        Err(Error::new(last.code(), format!("none of the {n} relay URLs answered; the last: {}", last.message())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_one_or_several() {
        assert_eq!(RelayList::parse("ws://a:1").unwrap().urls.len(), 1);
        let l = RelayList::parse(" ws://a:1 , tcp://b:2,").unwrap();
        assert_eq!(l.urls.len(), 2);
        assert_eq!(l.current().port, 1);
        assert!(RelayList::parse("ws://a:1,nonsense").is_err());
        assert!(RelayList::parse(" , ").is_err());
    }

    #[tokio::test]
    async fn skips_unreachable_relays_and_keeps_the_one_that_answered() {
        let l = RelayList::parse("ws://a:1,ws://b:2,ws://c:3").unwrap();
        let r = l
            .try_each(|u| {
                let port = u.port;
                async move {
                    if port == 3 {
                        Ok(port)
                    } else {
                        Err(Error::new(ErrorCode::RelayUnavailable, "down"))
                    }
                }
            })
            .await;
        assert_eq!(r.unwrap(), 3);
        assert_eq!(l.current().port, 3);
        // A refusal is not skipped.
        let r: Result<()> = l.try_each(|_| async { Err(Error::new(ErrorCode::AuthFailed, "wrong key")) }).await;
        assert_eq!(r.unwrap_err().code(), ErrorCode::AuthFailed);
        // All down: one error naming how many were tried.
        let r: Result<()> = l.try_each(|_| async { Err(Error::new(ErrorCode::RelayUnavailable, "down")) }).await;
        let e = r.unwrap_err();
        assert_eq!(e.code(), ErrorCode::RelayUnavailable);
        assert!(e.message().contains("none of the 3"), "{e}");
    }

    fn answer_on(ports: &'static [u16]) -> impl FnMut(RelayUrl) -> std::future::Ready<Result<u16>> {
        move |u| std::future::ready(if ports.contains(&u.port) { Ok(u.port) } else { Err(Error::new(ErrorCode::RelayUnavailable, "blocked")) })
    }

    const WAIT: Duration = Duration::from_millis(200);

    #[tokio::test]
    async fn falls_back_in_order_and_returns_to_the_preferred_url_once_due() {
        let l = RelayList::parse("grpc://r:1,ws://r:2").unwrap().with_timing(WAIT, ATTEMPT_BOUND);
        // The preferred transport is blocked: the next one is used.
        assert_eq!(l.try_each(answer_on(&[2])).await.unwrap(), 2);
        assert!(!l.preferred_due());
        // New sessions stay on it until the wait is over, even once the first works again.
        assert_eq!(l.try_each(answer_on(&[1, 2])).await.unwrap(), 2);
        tokio::time::sleep(WAIT).await;
        assert!(l.preferred_due());
        // Due, but still blocked: back on the second, and the wait starts again.
        assert_eq!(l.try_each(answer_on(&[2])).await.unwrap(), 2);
        assert!(!l.preferred_due());
        tokio::time::sleep(WAIT).await;
        // Due and open: the preferred one is used, and stays.
        assert_eq!(l.try_each(answer_on(&[1, 2])).await.unwrap(), 1);
        assert!(!l.preferred_due());
        assert_eq!(l.current().port, 1);
    }

    #[tokio::test]
    async fn an_attempt_that_hangs_is_cut_at_the_bound_when_another_url_remains() {
        let l = RelayList::parse("grpc://r:1,ws://r:2").unwrap().with_timing(PREFERRED_AGAIN_AFTER, WAIT);
        let t0 = Instant::now();
        let r = l
            .try_each(|u| async move {
                if u.port == 1 {
                    std::future::pending::<()>().await;
                }
                Ok(u.port)
            })
            .await;
        assert_eq!(r.unwrap(), 2);
        assert!(t0.elapsed() >= WAIT && t0.elapsed() < 10 * WAIT, "{:?}", t0.elapsed());
        // A middlebox that refuses the transport (a protocol error) is skipped too.
        let l = RelayList::parse("ws://r:1,grpc://r:2").unwrap();
        let r = l
            .try_each(|u| async move {
                if u.port == 1 {
                    Err(Error::protocol("HTTP 400 to the upgrade"))
                } else {
                    Ok(u.port)
                }
            })
            .await;
        assert_eq!(r.unwrap(), 2);
    }
}
