//! The relays a client may use: one URL (a relay, or a load balancer in front of a cluster), or
//! several separated by commas (`ws://a:7835,ws://b:7835`), tried in turn. A client keeps using
//! the relay that last worked; when it cannot be reached, the next is tried, so a dialer's new
//! session and a listener's reconnect land on a live one. Only unreachable relays are skipped:
//! a relay that answers with a refusal (a wrong key, a name taken) ends the attempt, since the
//! others of a cluster would say the same.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use crate::error::{Error, ErrorCode, Result};
use crate::transport::RelayUrl;

/// Check a relay setting (`URL[,URL...]`) the way clients will parse it.
pub fn check_relay_urls(s: &str) -> Result<()> {
    RelayList::parse(s).map(|_| ())
}

/// One or more relay URLs and which one is in use.
#[derive(Debug)]
pub(crate) struct RelayList {
    urls: Vec<RelayUrl>,
    current: AtomicUsize,
}

impl Clone for RelayList {
    fn clone(&self) -> Self {
        RelayList { urls: self.urls.clone(), current: AtomicUsize::new(self.current.load(Relaxed)) }
    }
}

/// Whether an error means the relay could not be reached (so another may be tried).
fn unreachable(e: &Error) -> bool {
    matches!(e.code(), ErrorCode::RelayUnavailable | ErrorCode::Timeout | ErrorCode::Io)
}

impl RelayList {
    /// Parse `URL[,URL...]`; every URL is checked.
    pub(crate) fn parse(s: &str) -> Result<RelayList> {
        let urls = s.split(',').map(str::trim).filter(|u| !u.is_empty()).map(RelayUrl::parse).collect::<Result<Vec<_>>>()?;
        if urls.is_empty() {
            return Err(Error::argument("no relay URL given; write it like ws://relay.example:7835 (several: separated by commas)"));
        }
        Ok(RelayList { urls, current: AtomicUsize::new(0) })
    }

    /// Reach each relay through the proxy `rules` pick for it.
    pub(crate) fn with_proxy(mut self, rules: &super::proxy::ProxyRules) -> RelayList {
        super::proxy::apply(&mut self.urls, rules);
        self
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
        let start = self.current.load(Relaxed);
        let mut failures = Vec::new();
        for k in 0..self.urls.len() {
            let i = (start + k) % self.urls.len();
            match attempt(self.urls[i].clone()).await {
                Ok(v) => {
                    if k > 0 {
                        tracing::info!(relay = %self.urls[i].url, "using the next relay URL");
                    }
                    self.current.store(i, Relaxed);
                    return Ok(v);
                }
                Err(e) if unreachable(&e) && self.urls.len() > 1 => {
                    tracing::warn!(relay = %self.urls[i].url, error = %e, "relay unreachable; trying the next URL");
                    failures.push(e);
                }
                Err(e) => {
                    self.current.store(i, Relaxed);
                    return Err(e);
                }
            }
        }
        // Next time, start past the relay that failed first.
        self.current.store(start + 1, Relaxed);
        let last = failures.pop().expect("at least one URL was tried");
        if failures.is_empty() {
            return Err(last);
        }
        Err(Error::new(last.code(), format!("none of the {} relay URLs answered; the last: {}", self.urls.len(), last.message())))
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
}
