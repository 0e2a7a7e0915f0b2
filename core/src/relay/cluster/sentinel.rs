//! Where the cluster's Redis is: one fixed server (`redis://`, `rediss://`, `unix://`), or the
//! primary a set of Redis Sentinels names (`redis+sentinel://…/MASTER`), found again after a
//! failover. Every Redis command of the node (`claims`, `fleet`) and its change subscription go
//! through [`Primary`].
//!
//! With Sentinel: the node asks the sentinels for the primary of `MASTER` (the `redis` crate's
//! `SentinelClient`, which also checks that the server it names answers `ROLE` as a primary) and
//! keeps one self-reconnecting connection to it. Whenever a command fails ([`Primary::recheck`]:
//! the primary died, or a demoted one answers `READONLY`), it asks again, at most every
//! [`RESOLVE_EVERY`]; once the sentinels have promoted a replica, the connection moves there.
//! The change subscription, which ended with the old primary's connection, is remade on the new
//! one, and that resubscription re-asserts every claim of the node (`notice_loop`), so claims the
//! old primary had not yet passed to its replica are made again.
//!
//! URL: `redis+sentinel://[user:password@]host:port[,host:port…]/MASTER[?db=N]`. The sentinels
//! are asked without credentials; `user:password` and `db` are for the primary.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};

/// The URL scheme of Redis behind Sentinel.
pub(crate) const SCHEME: &str = "redis+sentinel://";

/// Asking the sentinels again after a failure waits at least this long since the last time.
pub(crate) const RESOLVE_EVERY: Duration = Duration::from_millis(200);
/// How long one round of asking the sentinels (and checking the primary's role) may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a `redis+sentinel://` URL cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SentinelUrlError {
    #[error("names no sentinel (redis+sentinel://host:port[,host:port…]/MASTER)")]
    NoSentinel,
    #[error("names no primary after the sentinels (redis+sentinel://host:port/MASTER, MASTER as in the sentinels' `sentinel monitor`)")]
    NoMaster,
    #[error("sentinel address {0:?} is not host:port")]
    BadAddress(String),
    #[error("db {0:?} is not a number")]
    BadDb(String),
}

/// A parsed `redis+sentinel://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SentinelUrl {
    /// `redis://host:port` of each sentinel.
    pub(crate) sentinels: Vec<String>,
    pub(crate) master: String,
    pub(crate) db: i64,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
}

impl SentinelUrl {
    /// Parse `redis+sentinel://[user:password@]host:port[,host:port…]/MASTER[?db=N]`.
    pub(crate) fn parse(url: &str) -> Result<SentinelUrl, SentinelUrlError> {
        let rest = url.strip_prefix(SCHEME).unwrap_or(url);
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, master) = rest.split_once('/').unwrap_or((rest, ""));
        let master = master.trim_end_matches('/');
        if master.is_empty() {
            return Err(SentinelUrlError::NoMaster);
        }
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let decode = |s: &str| url::form_urlencoded::parse(format!("x={s}").as_bytes()).next().map(|(_, v)| v.into_owned()).unwrap_or_default();
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => match u.split_once(':') {
                Some((user, pass)) => ((!user.is_empty()).then(|| decode(user)), Some(decode(pass))),
                None => ((!u.is_empty()).then(|| decode(u)), None),
            },
        };
        let mut sentinels = Vec::new();
        for h in hosts.split(',').filter(|h| !h.is_empty()) {
            let ok = h.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(SentinelUrlError::BadAddress(h.to_string()));
            }
            sentinels.push(format!("redis://{h}"));
        }
        if sentinels.is_empty() {
            return Err(SentinelUrlError::NoSentinel);
        }
        let mut db = 0;
        for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
            if k == "db" {
                db = v.parse().map_err(|_| SentinelUrlError::BadDb(v.to_string()))?;
            }
        }
        Ok(SentinelUrl { sentinels, master: master.to_string(), db, username, password })
    }
}

/// The connection the node's commands use now, and the client it came from (for the change
/// subscription).
#[derive(Clone)]
struct Current {
    client: redis::Client,
    conn: ConnectionManager,
    /// `host:port` of the server (for logs).
    addr: String,
}

/// The cluster's Redis: a fixed server, or the primary the sentinels name.
pub(crate) struct Primary {
    current: Mutex<Option<Current>>,
    sentinel: Option<tokio::sync::Mutex<SentinelClient>>,
    /// The master name (for logs and errors).
    master: String,
    resolving: AtomicBool,
    last_resolve: Mutex<Option<Instant>>,
    /// Woken when the connection moved to a new primary (the change subscription waits on it).
    moved: tokio::sync::Notify,
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(1)))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500))
}

fn addr_of(client: &redis::Client) -> String {
    client.get_connection_info().addr().to_string()
}

impl Primary {
    /// One fixed server (no connection is made yet: Redis may come up after the relay).
    pub(crate) fn fixed(client: redis::Client) -> redis::RedisResult<Primary> {
        let conn = client.get_connection_manager_lazy(manager_config())?;
        let addr = addr_of(&client);
        Ok(Primary {
            current: Mutex::new(Some(Current { client, conn, addr })),
            sentinel: None,
            master: String::new(),
            resolving: AtomicBool::new(false),
            last_resolve: Mutex::new(None),
            moved: tokio::sync::Notify::new(),
        })
    }

    /// The primary the sentinels of `url` name (asked at the first command).
    pub(crate) fn sentinel(url: &SentinelUrl) -> redis::RedisResult<Primary> {
        let mut info = redis::RedisConnectionInfo::default().set_db(url.db);
        if let Some(u) = &url.username {
            info = info.set_username(u);
        }
        if let Some(p) = &url.password {
            info = info.set_password(p);
        }
        let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(info);
        let client = SentinelClient::build(url.sentinels.clone(), url.master.clone(), Some(node), SentinelServerType::Master)?;
        Ok(Primary {
            current: Mutex::new(None),
            sentinel: Some(tokio::sync::Mutex::new(client)),
            master: url.master.clone(),
            resolving: AtomicBool::new(false),
            last_resolve: Mutex::new(None),
            moved: tokio::sync::Notify::new(),
        })
    }

    fn now(&self) -> Option<Current> {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn not_yet(&self) -> redis::RedisError {
        redis::RedisError::from((
            redis::ErrorKind::Io,
            "no primary known yet",
            format!("the sentinels have not named a reachable primary for {:?} yet (check that they monitor it under that name)", self.master),
        ))
    }

    /// The connection to use now (with Sentinel and no primary known yet: an error, and the
    /// sentinels are asked).
    pub(crate) fn conn(self: &Arc<Self>) -> redis::RedisResult<ConnectionManager> {
        match self.now() {
            Some(c) => Ok(c.conn),
            None => {
                self.recheck();
                Err(self.not_yet())
            }
        }
    }

    /// A client for the server the commands go to now (the change subscription's).
    pub(crate) fn client(self: &Arc<Self>) -> redis::RedisResult<redis::Client> {
        match self.now() {
            Some(c) => Ok(c.client),
            None => {
                self.recheck();
                Err(self.not_yet())
            }
        }
    }

    /// Until the connection moves to a new primary (never, for a fixed server).
    pub(crate) async fn moved(&self) {
        self.moved.notified().await
    }

    /// With Sentinel, ask the sentinels where the primary is now (at start, and whenever a
    /// command failed), at most one round at a time and at most every [`RESOLVE_EVERY`].
    pub(crate) fn recheck(self: &Arc<Self>) {
        if self.sentinel.is_none() || self.resolving.swap(true, Relaxed) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let last = *me.last_resolve.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(wait) = last.and_then(|at| RESOLVE_EVERY.checked_sub(at.elapsed())) {
                tokio::time::sleep(wait).await;
            }
            me.resolve().await;
            *me.last_resolve.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
            me.resolving.store(false, Relaxed);
        });
    }

    /// Ask the sentinels for the primary; move the connection there if it changed.
    async fn resolve(&self) {
        let Some(sentinel) = &self.sentinel else { return };
        let asked = async { sentinel.lock().await.async_get_client().await };
        let client = match tokio::time::timeout(RESOLVE_TIMEOUT, asked).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!(master = %self.master, error = %e, "the sentinels name no reachable primary yet");
                return;
            }
            Err(_) => {
                tracing::debug!(master = %self.master, "asking the sentinels for the primary timed out");
                return;
            }
        };
        let addr = addr_of(&client);
        if self.now().is_some_and(|c| c.addr == addr) {
            return;
        }
        let conn = match client.get_connection_manager_lazy(manager_config()) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(master = %self.master, %addr, error = %e, "cannot set up a connection to the primary the sentinels named");
                return;
            }
        };
        let old = self.current.lock().unwrap_or_else(|p| p.into_inner()).replace(Current { client, conn, addr: addr.clone() });
        self.moved.notify_waiters();
        match old {
            Some(o) => {
                tracing::warn!(master = %self.master, from = %o.addr, to = %addr, "the sentinels named a new Redis primary (failover); the cluster registry moves there")
            }
            None => tracing::info!(master = %self.master, %addr, "the sentinels named the Redis primary"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_parse() {
        let u = SentinelUrl::parse("redis+sentinel://:s%40cret@10.0.0.1:26379,10.0.0.2:26380/relays?db=3").unwrap();
        assert_eq!(u.sentinels, ["redis://10.0.0.1:26379", "redis://10.0.0.2:26380"]);
        assert_eq!((u.master.as_str(), u.db, u.username, u.password.as_deref()), ("relays", 3, None, Some("s@cret")));
        let u = SentinelUrl::parse("redis+sentinel://app:pw@[::1]:26379/m").unwrap();
        assert_eq!((u.sentinels[0].as_str(), u.username.as_deref(), u.password.as_deref()), ("redis://[::1]:26379", Some("app"), Some("pw")));
        assert!(matches!(SentinelUrl::parse("redis+sentinel://h:26379"), Err(SentinelUrlError::NoMaster)));
        assert!(matches!(SentinelUrl::parse("redis+sentinel:///m"), Err(SentinelUrlError::NoSentinel)));
        assert!(matches!(SentinelUrl::parse("redis+sentinel://h/m"), Err(SentinelUrlError::BadAddress(_))));
        assert!(matches!(SentinelUrl::parse("redis+sentinel://h:1/m?db=x"), Err(SentinelUrlError::BadDb(_))));
    }

    #[test]
    fn a_sentinel_urls_password_is_redacted() {
        let cfg = crate::config::ClusterConfig {
            redis: "redis+sentinel://app:s3cret@10.0.0.1:26379,10.0.0.2:26379/relays".into(),
            redis_ca: None,
            key: crate::auth::Key::new(1, b"k".to_vec()).unwrap(),
            advertise: None,
            claim_ttl: Duration::from_secs(10),
            namespace: "libtunnel".into(),
        };
        assert_eq!(cfg.redacted_redis(), "redis+sentinel://app:***@10.0.0.1:26379,10.0.0.2:26379/relays");
    }
}
