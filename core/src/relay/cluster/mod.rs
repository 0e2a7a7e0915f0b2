//! A relay as one node of a cluster on Redis (`cluster_redis`; off by default). What it adds to a
//! relay on its own:
//! - **claims** (`claims`): a listener that registers here is also claimed in Redis, under the same
//!   `NAME_TAKEN` rules across the cluster; a claim lives exactly as long as its node's key in
//!   Redis, which the node refreshes every third of `cluster_ttl` (one command per node, however
//!   many names it holds), so the claims of a node that dies die `cluster_ttl` after it; nodes
//!   collect the names dead nodes left;
//! - **public TCP ports** (`mirrors`): assigned cluster-wide, and bound by every node;
//! - **routes**: a stream for a name no local listener holds (dial by name, public HTTP or TCP,
//!   `via` an exit) is looked up in Redis (cached; every change is published, and each node drops
//!   what it cached for that name) and forwarded to the node that holds it (`peers`);
//! - **failure rules**: Redis unreachable (down, or failing over behind Sentinel) → local
//!   listeners keep working, registrations are held locally and claimed when Redis returns, a
//!   remote name this node routed in the last [`ROUTE_CACHE_FOR`] keeps that route (the holder
//!   still confirms every stream over its authenticated session, and answers offline if it no
//!   longer holds the name), other remote names fail with `RELAY_UNAVAILABLE` naming Redis; a
//!   node that dies → its streams fail on both ends, its listeners reconnect to another
//!   node (through the load balancer, or their next relay URL) and claim again.
//!
//! Bodies and stream bytes never pass through Redis: only names, node URLs and epochs.
//!
//! **What Redis is trusted for.** Redis says *where* a name is held, never *who* may carry its
//! traffic: only a node that proves the cluster key (`node_auth`, both directions, bound to both
//! node ids and the URL) gets a stream, so anyone who can write Redis but lacks the cluster key
//! can make names unreachable (or send their traffic to the wrong real node, which answers
//! "offline"), but cannot read or answer any of it. The same holds for the decisions Redis
//! drives: a claim that says another node took a name over is believed only once that node
//! confirms it over an authenticated session (`confirm_holders`); until then the local listener
//! keeps its name, and a holder no authenticated node confirms is removed. The node that holds an
//! exit listener checks the dialer's `exits` grant itself.

pub(crate) mod claims;
pub(crate) mod fleet;
mod mirrors;
mod node_auth;
pub(crate) mod peers;
pub(crate) mod sentinel;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::names::{Holders, Registration};
use super::route::RouteError;
use super::RelayState;
use crate::config::ClusterConfig;
use crate::error::{Error, ErrorCode, Result};
use crate::session::SessionStream;
use claims::{Claimed, Claims};

/// How long a cached route may be used without a change notice (a safety net: notices are what
/// keep the cache right, and the cache is dropped whenever the subscription is lost).
const ROUTE_CACHE_FOR: Duration = Duration::from_secs(30);
/// How long a lookup that found no live holder may be used: a holder whose node key comes back
/// (its announcement reached Redis again, e.g. after a Sentinel failover) publishes no notice.
const OFFLINE_CACHE_FOR: Duration = Duration::from_secs(1);
/// After a failed announcement the next one is tried this soon (doubling up to the normal
/// period): a node's key must not expire because one refresh met a Redis that was moving.
const ANNOUNCE_RETRY: Duration = Duration::from_millis(200);
/// Claims re-asserted at once (after the node's key was lost, or the change notices were).
const REASSERT_IN_FLIGHT: usize = 64;
/// Names of dead nodes removed by one `COLLECT` call (bounds how long one script holds Redis).
const COLLECT_BATCH: usize = 500;
/// Most `COLLECT` calls per refresh tick (the rest waits for the next tick: lookups already
/// ignore a dead node's names).
const COLLECT_CALLS_PER_TICK: usize = 20;
/// Held names checked against Redis per refresh tick (one pipelined round trip of `HEXISTS`): a
/// claim deleted from Redis without a notice is made again within a rotation (10,000 names,
/// `cluster_ttl` 10 s: ~9 minutes), at ~20 cheap commands/s per node.
const VERIFY_PER_TICK: usize = 64;
/// Most routes cached (then the cache starts over).
const ROUTE_CACHE_MAX: usize = 10_000;

/// A name this node holds in the cluster.
#[derive(Debug, Clone)]
struct Held {
    owner: String,
    /// The listener instance (hex) that holds it here.
    instance: String,
    mode: Registration,
    /// The claim's epoch; 0 while it could not be claimed (Redis unreachable).
    epoch: u64,
}

/// One node's view of the cluster.
pub(crate) struct Cluster {
    pub(crate) cfg: ClusterConfig,
    /// This process's node id (new at every start, so a restarted node never inherits claims).
    pub(crate) node_id: String,
    /// The URL other nodes reach this one at.
    pub(crate) advertise: String,
    claims: Claims,
    /// Where Redis is (a fixed server, or the primary the sentinels name).
    primary: Arc<sentinel::Primary>,
    held: Mutex<HashMap<String, Held>>,
    /// Cached routes, with when their lookup started.
    routes: Mutex<HashMap<String, (Holders, Instant)>>,
    /// The change subscription is live, so cached routes can be trusted...
    subscribed: AtomicBool,
    /// ...those looked up since it was last made. Older ones stand in only while Redis does
    /// not answer (kept, not dropped, so a lookup that fails as the primary moves still finds
    /// the route it knew).
    subscribed_at: Mutex<Instant>,
    /// The last Redis command succeeded (for logging transitions once).
    redis_up: AtomicBool,
    peers: peers::Peers,
    /// Round-robin over the nodes of a pool that spans nodes.
    turn: std::sync::atomic::AtomicUsize,
    mirrors: mirrors::Mirrors,
    /// Where the rotating check of held names goes on ([`Cluster::verify_some`]).
    verify_cursor: std::sync::atomic::AtomicUsize,
}

/// Why a remote lookup failed.
#[derive(Debug)]
pub(crate) struct RedisDown;

/// What the holders Redis names for a name said over authenticated sessions.
#[derive(Debug)]
enum Confirmation {
    /// A node proving the cluster key holds the name.
    Confirmed,
    /// None does (the unconfirmed holders were removed from Redis).
    Disproved,
    /// A holder could not be asked (why): decide later.
    Unknown(String),
}

impl Cluster {
    /// Set up (no connection is made yet: Redis may come up after the relay).
    pub(crate) fn new(cfg: ClusterConfig, advertise: String) -> Result<Cluster> {
        let bad =
            |e: &dyn std::fmt::Display| Error::config(format!("TUNNEL_CLUSTER_REDIS {:?} is not a usable Redis URL: {e}", cfg.redacted_redis()));
        let primary = if cfg.redis.starts_with(sentinel::SCHEME) {
            let url = sentinel::SentinelUrl::parse(&cfg.redis).map_err(|e| bad(&e))?;
            if cfg.redis_ca.is_some() {
                return Err(Error::config("TUNNEL_CLUSTER_REDIS_CA applies to rediss:// only; redis+sentinel:// connects without TLS"));
            }
            sentinel::Primary::sentinel(&url).map_err(|e| bad(&e))?
        } else {
            let client = match &cfg.redis_ca {
                Some(ca) => {
                    let pem = std::fs::read(ca).map_err(|e| Error::config(format!("TUNNEL_CLUSTER_REDIS_CA {}: {e}", ca.display())))?;
                    redis::Client::build_with_tls(cfg.redis.as_str(), redis::TlsCertificates { client_tls: None, root_cert: Some(pem) })
                        .map_err(|e| bad(&e))?
                }
                None => redis::Client::open(cfg.redis.as_str()).map_err(|e| bad(&e))?,
            };
            sentinel::Primary::fixed(client)
                .map_err(|e| Error::config(format!("cannot set up the Redis connection to {}: {e}", cfg.redacted_redis())))?
        };
        let primary = Arc::new(primary);
        let node_id = format!("{:016x}", rand::random::<u64>());
        let peers = peers::Peers::new(cfg.key.clone(), node_id.clone());
        let claims = Claims::new(primary.clone(), &cfg.namespace, &node_id);
        Ok(Cluster {
            cfg,
            node_id,
            advertise,
            claims,
            primary,
            held: Mutex::default(),
            routes: Mutex::default(),
            subscribed: AtomicBool::new(false),
            subscribed_at: Mutex::new(Instant::now()),
            redis_up: AtomicBool::new(true),
            peers,
            turn: std::sync::atomic::AtomicUsize::new(0),
            mirrors: mirrors::Mirrors::default(),
            verify_cursor: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    fn redis_failed(&self, state: &RelayState, what: &str, e: &redis::RedisError) {
        state.metrics.cluster.redis_errors.fetch_add(1, Relaxed);
        // Behind Sentinel: the primary may have moved (it died, or answers READONLY now).
        self.primary.recheck();
        let was_up = self.redis_up.swap(false, Relaxed);
        if was_up && matches!(e.code(), Some("CROSSSLOT" | "MOVED" | "ASK" | "CLUSTERDOWN")) {
            tracing::error!(redis = %self.cfg.redacted_redis(), error = %e, "cluster_redis is a Redis Cluster, which the relay cluster does not support: a name's claim script also reads the liveness key of each node holding it, and those keys live in other hash slots; use a standalone Redis, or a primary with replicas behind Sentinel (redis+sentinel://host:26379,…/MASTER)");
        } else if was_up {
            tracing::warn!(redis = %self.cfg.redacted_redis(), error = %e, "cluster registry (Redis) unreachable while {what}; serving local listeners only until it returns");
        } else {
            tracing::debug!(error = %e, "Redis still unreachable ({what})");
        }
    }

    fn redis_ok(&self) {
        if !self.redis_up.swap(true, Relaxed) {
            tracing::info!(redis = %self.cfg.redacted_redis(), "cluster registry (Redis) reachable again");
        }
    }

    /// Claim `name` for a listener that just registered here. `Err` only when the cluster says
    /// another key (or an incompatible pool, or a newer registration of the same key) holds it
    /// *and* a node holding it confirms that over an authenticated session; an unreachable Redis
    /// keeps the claim local until it returns.
    pub(crate) async fn claim(&self, state: &RelayState, name: &str, owner: &[u8; 32], instance: &[u8], mode: Registration) -> Result<()> {
        let owner = data_encoding::HEXLOWER.encode(owner);
        let instance = data_encoding::HEXLOWER.encode(instance);
        let mut checked = false;
        let epoch = loop {
            let res = self.claims.claim(name, &owner, &instance, mode, false).await;
            // (Whether a holder's own key confirms the refusal: Redis's `owner` field is not
            // believed either, so a holder of our own key is a registration to replace.)
            let (refusal, other_key_only) = match res {
                Ok(Claimed::Held(e)) => {
                    self.redis_ok();
                    break e;
                }
                Ok(Claimed::Taken { mode: theirs, .. }) => (taken_error(name, mode, theirs), true),
                Ok(Claimed::Retired) => (super::registry::retired_error(name), false),
                Ok(Claimed::Lost) => {
                    self.redis_ok();
                    break 0;
                }
                Err(e) => {
                    self.redis_failed(state, "claiming a listener name", &e);
                    break 0;
                }
            };
            self.redis_ok();
            // Believe Redis only once a node proving the cluster key confirms the holder.
            let confirms = |o: &[u8; 32]| !other_key_only || data_encoding::HEXLOWER.encode(o) != owner;
            match self.confirm_holders(state, name, &instance, confirms).await {
                Confirmation::Confirmed => return Err(refusal),
                Confirmation::Disproved if !checked => checked = true,
                Confirmation::Disproved => return Err(refusal),
                Confirmation::Unknown(why) => return Err(unconfirmed_error(name, &why)),
            }
        };
        self.held.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), Held { owner, instance, mode, epoch });
        state.metrics.cluster.claims.store(self.held_count() as i64, Relaxed);
        Ok(())
    }

    /// Ask the nodes Redis lists as holders of `name` (other than this one), over authenticated
    /// sessions, whether they hold it; a holder whose listener's key `confirms` says so confirms
    /// Redis. Holders that are no nodes of this cluster (they failed the cluster key) or that do
    /// not confirm are removed from Redis, with this node's listener `instance` taken off the
    /// name's retired list.
    async fn confirm_holders(&self, state: &RelayState, name: &str, instance: &str, confirms: impl Fn(&[u8; 32]) -> bool) -> Confirmation {
        let holders = match self.claims.lookup(name).await {
            Ok(h) => h,
            Err(e) => {
                self.redis_failed(state, "checking who holds a listener name", &e);
                return Confirmation::Unknown("the cluster registry (Redis) is unreachable".into());
            }
        };
        let deadline = tokio::time::Instant::now() + state.cfg.limits.handshake_timeout;
        let (mut disproved, mut unknown) = (Vec::new(), None);
        for (id, url) in holders.nodes.iter().filter(|(id, _)| *id != self.node_id) {
            match self.peers.holds(state, (id, url), name, deadline).await {
                Ok(Some(o)) if confirms(&o) => return Confirmation::Confirmed,
                Ok(Some(_)) => disproved.push(id.clone()),
                Ok(None) => disproved.push(id.clone()),
                Err(e) if peers::disproved(&e) => disproved.push(id.clone()),
                Err(e) => unknown = Some(e.to_string()),
            }
        }
        if let Some(why) = unknown {
            tracing::warn!(%name, reason = %why, "the cluster registry names another holder that cannot be asked; keeping the local listener");
            return Confirmation::Unknown(why);
        }
        if !disproved.is_empty() {
            tracing::warn!(%name, holders = ?disproved, "the cluster registry names holders no node of the cluster confirms (a stale entry, or a write to Redis without the cluster key); removing them");
            state.metrics.cluster.claims_disproved.fetch_add(disproved.len() as u64, Relaxed);
        }
        if let Err(e) = self.claims.evict(name, instance, &disproved).await {
            self.redis_failed(state, "removing unconfirmed holders", &e);
            return Confirmation::Unknown("the cluster registry (Redis) is unreachable".into());
        }
        Confirmation::Disproved
    }

    /// Count one public request to `name`, which another node holds, on that node. `None` when
    /// no node can be asked (Redis, or every holder, unreachable; or none holds it): the caller
    /// counts it locally. A pool on several nodes is counted on one of them (the lowest id), so
    /// every node of the cluster counts its requests in the same place.
    pub(crate) async fn admit_remote(
        &self,
        state: &RelayState,
        name: &str,
    ) -> Option<std::result::Result<SessionStream, super::listener_limits::Refused>> {
        use super::listener_limits::Refused;
        let holders = self.lookup(state, name).await.ok()?;
        let (id, url) = holders.nodes.iter().filter(|(id, _)| *id != self.node_id).min_by(|a, b| a.0.cmp(&b.0))?;
        let deadline = tokio::time::Instant::now() + state.cfg.limits.handshake_timeout;
        match self.peers.admit(state, (id, url), name, deadline).await {
            Ok((peers::Admission::Admitted, Some(stream))) => Some(Ok(stream)),
            Ok((peers::Admission::Rate(wait), _)) => Some(Err(Refused::Rate(wait))),
            Ok((peers::Admission::Busy(limit), _)) => Some(Err(Refused::Busy(limit))),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(node = %id, %name, error = %e, "cannot count a request where its listener is held; counting it here");
                None
            }
        }
    }

    fn held_count(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The last local listener of `name` is gone: give up the claim (only if it is still ours).
    pub(crate) fn released(self: &Arc<Self>, state: &Arc<RelayState>, name: &str) {
        let Some(h) = self.held.lock().unwrap_or_else(|p| p.into_inner()).remove(name) else { return };
        state.metrics.cluster.claims.store(self.held_count() as i64, Relaxed);
        if h.epoch == 0 {
            return;
        }
        let (me, st, name) = (self.clone(), state.clone(), name.to_string());
        state.tasks.spawn(async move {
            if let Err(e) = me.claims.release(&name, h.epoch).await {
                me.redis_failed(&st, "releasing a listener name", &e);
            }
        });
    }

    /// Assign public TCP `port` to the listener `name` cluster-wide; false when a live listener
    /// elsewhere has it (try the next port). Redis unreachable: the port is used locally only.
    pub(crate) async fn take_port(&self, state: &RelayState, port: u16, name: &str) -> bool {
        match self.claims.take_port(port, name).await {
            Ok(taken) => taken,
            Err(e) => {
                self.redis_failed(state, "assigning a public TCP port", &e);
                true
            }
        }
    }

    /// The listener `name` gave up public TCP `port`.
    pub(crate) fn port_released(self: &Arc<Self>, state: &Arc<RelayState>, port: u16, name: &str) {
        let (me, st, name) = (self.clone(), state.clone(), name.to_string());
        state.tasks.spawn(async move {
            if let Err(e) = me.claims.free_port(port, &name).await {
                me.redis_failed(&st, "freeing a public TCP port", &e);
            }
        });
    }

    /// Where `name` is held in the cluster (cached while the change subscription is live).
    pub(crate) async fn lookup(&self, state: &RelayState, name: &str) -> std::result::Result<Holders, RedisDown> {
        if self.subscribed.load(Relaxed) {
            let since = *self.subscribed_at.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((h, at)) = self.routes.lock().unwrap_or_else(|p| p.into_inner()).get(name) {
                if *at >= since && at.elapsed() < if h.nodes.is_empty() { OFFLINE_CACHE_FOR } else { ROUTE_CACHE_FOR } {
                    return Ok(h.clone());
                }
            }
        }
        let t = Instant::now();
        match self.claims.lookup(name).await {
            Ok(h) => {
                self.redis_ok();
                state.metrics.cluster.redis_rtt_micros.store(t.elapsed().as_micros() as i64, Relaxed);
                if self.subscribed.load(Relaxed) {
                    let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
                    if routes.len() >= ROUTE_CACHE_MAX {
                        routes.clear();
                    }
                    // Dated from before the read: a read that raced a resubscription is not
                    // trusted after it.
                    routes.insert(name.to_string(), (h.clone(), t));
                }
                Ok(h)
            }
            Err(e) => {
                self.redis_failed(state, "looking up a listener name", &e);
                // Redis is down or moving: a route known a moment ago is better than none.
                let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
                match routes.get(name) {
                    Some((h, at)) if !h.nodes.is_empty() && at.elapsed() < ROUTE_CACHE_FOR => Ok(h.clone()),
                    _ => Err(RedisDown),
                }
            }
        }
    }

    /// Open a stream to the listener `name` on the node that holds it (never this one: local
    /// listeners are tried first by `route`). Tries each holding node until one accepts.
    pub(crate) async fn open_remote(
        &self,
        state: &RelayState,
        name: &str,
        header: &[u8],
        wait: Duration,
    ) -> std::result::Result<SessionStream, RouteError> {
        let holders = self.lookup(state, name).await.map_err(|_| RouteError::ClusterUnavailable)?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut last = RouteError::Offline;
        let mut nodes: Vec<&(String, String)> = holders.nodes.iter().filter(|(id, _)| *id != self.node_id).collect();
        if nodes.len() > 1 {
            // A pool on several nodes: each stream starts one node further along.
            let turn = self.turn.fetch_add(1, Relaxed) % nodes.len();
            nodes.rotate_left(turn);
        }
        for (id, url) in nodes {
            match self.peers.forward(state, (id, url), name, header, deadline).await {
                Ok(s) => {
                    state.metrics.cluster.forwarded_out.fetch_add(1, Relaxed);
                    return Ok(s);
                }
                Err(peers::PeerError::Route(RouteError::Timeout)) => return Err(RouteError::Timeout),
                Err(peers::PeerError::Route(e)) => {
                    // The holder answered that it no longer has the listener: the cached route
                    // is stale.
                    self.forget_route(name);
                    last = e;
                }
                Err(peers::PeerError::Node(e)) => {
                    tracing::info!(node = %id, %url, error = %e, "cannot reach a node of the cluster");
                    self.peers.forget(id);
                    self.forget_node(id);
                    last = RouteError::Busy;
                }
            }
        }
        Err(last)
    }

    fn forget_route(&self, name: &str) {
        self.routes.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
    }

    /// Drop every cached route through node `id` (its session failed).
    fn forget_node(&self, id: &str) {
        self.routes.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, (h, _)| !h.nodes.iter().any(|(n, _)| n == id));
    }

    /// Run the node's background work until the relay drains: announce this node each third of
    /// `cluster_ttl` (which keeps all its claims alive), claim what could not be claimed yet,
    /// collect dead nodes' names; follow change notices.
    pub(crate) fn start(self: &Arc<Self>, state: &Arc<RelayState>) {
        // Behind Sentinel: find the primary before the first command needs it.
        self.primary.recheck();
        state.tasks.spawn(refresh_loop(self.clone(), state.clone()));
        state.tasks.spawn(notice_loop(self.clone(), state.clone()));
    }

    /// Re-assert every claim this node holds (`unclaimed_only`: those not claimed yet, because
    /// Redis was unreachable), [`REASSERT_IN_FLIGHT`] at a time (the Redis connection pipelines
    /// them). Only needed when this node's key was lost (all its claims died with it), after
    /// change notices were missed, and for registrations made while Redis was unreachable.
    async fn reassert_all(&self, state: &RelayState, unclaimed_only: bool) {
        let names: Vec<String> = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, h)| !unclaimed_only || h.epoch == 0)
            .map(|(n, _)| n.clone())
            .collect();
        futures_util::stream::iter(names).for_each_concurrent(REASSERT_IN_FLIGHT, |name| async move { self.reassert(state, &name).await }).await;
    }

    /// Check the next [`VERIFY_PER_TICK`] held names (in name order, wrapping) against Redis and
    /// claim again those whose claim is gone: a claim deleted without a notice (by hand, or by a
    /// Redis that lost some keys but not this node's) would otherwise be noticed only when the
    /// change subscription is remade.
    async fn verify_some(&self, state: &RelayState) {
        let slice: Vec<String> = {
            let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            let mut names: Vec<&String> = held.iter().filter(|(_, h)| h.epoch != 0).map(|(n, _)| n).collect();
            if names.is_empty() {
                return;
            }
            names.sort_unstable();
            let start = self.verify_cursor.fetch_add(VERIFY_PER_TICK, Relaxed) % names.len();
            names.iter().cycle().skip(start).take(VERIFY_PER_TICK.min(names.len())).map(|n| (*n).clone()).collect()
        };
        match self.claims.missing(&slice).await {
            Ok(gone) => {
                for name in gone {
                    tracing::info!(%name, "this node's claim was gone from the cluster registry with no notice; claiming it again");
                    self.reassert(state, &name).await;
                }
            }
            Err(e) => self.redis_failed(state, "checking this node's claims", &e),
        }
    }

    /// Remove the names dead nodes left, [`COLLECT_BATCH`] at a time, at most
    /// [`COLLECT_CALLS_PER_TICK`] batches.
    async fn collect_dead(&self, state: &RelayState) {
        for _ in 0..COLLECT_CALLS_PER_TICK {
            match self.claims.collect(COLLECT_BATCH).await {
                Ok(n) if n < COLLECT_BATCH => return,
                Ok(_) => {}
                Err(e) => return self.redis_failed(state, "removing the names of dead nodes", &e),
            }
        }
    }

    /// Re-assert the claim on `name` (after a notice, or on the refresh tick); close the local
    /// listeners of a name this node lost.
    async fn reassert(&self, state: &RelayState, name: &str) {
        let Some(h) = self.held.lock().unwrap_or_else(|p| p.into_inner()).get(name).cloned() else { return };
        // Never claimed (Redis was down at registration): claim now, as the registration would have.
        let refresh = h.epoch != 0;
        match self.claims.claim(name, &h.owner, &h.instance, h.mode, refresh).await {
            Ok(Claimed::Held(epoch)) => {
                self.redis_ok();
                if let Some(x) = self.held.lock().unwrap_or_else(|p| p.into_inner()).get_mut(name) {
                    x.epoch = epoch;
                }
            }
            Ok(Claimed::Taken { .. } | Claimed::Lost | Claimed::Retired) => {
                self.redis_ok();
                // A replacement elsewhere ends the local listener only once that node confirms
                // it: a write to Redis alone never does.
                match self.confirm_holders(state, name, &h.instance, |_| true).await {
                    Confirmation::Confirmed => {}
                    Confirmation::Disproved => {
                        // Claim again (never claimed: as the registration would have).
                        if let Ok(Claimed::Held(epoch)) = self.claims.claim(name, &h.owner, &h.instance, h.mode, true).await {
                            if let Some(x) = self.held.lock().unwrap_or_else(|p| p.into_inner()).get_mut(name) {
                                x.epoch = epoch;
                            }
                        }
                        return;
                    }
                    // Asked again on the next refresh.
                    Confirmation::Unknown(_) => return,
                }
                self.held.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
                state.metrics.cluster.claims.store(self.held_count() as i64, Relaxed);
                let why = format!(
                    "the name {name:?} is now held on another relay of the cluster (registered again there by the same key, or by another key while this relay could not reach Redis); this listener stops (run one listener per key and name, or start every replica with --pool)"
                );
                tracing::info!(%name, "lost the cluster claim (the holding node confirmed it); closing the local listener");
                for (n, _, session) in state.registry.live() {
                    if n == name {
                        session.close_with_notice(ErrorCode::NameTaken, why.clone());
                    }
                }
            }
            Err(e) => self.redis_failed(state, "refreshing a listener claim", &e),
        }
    }
}

/// The (retryable) refusal of a registration whose name Redis says another node holds, when
/// that node cannot be asked to confirm it.
fn unconfirmed_error(name: &str, why: &str) -> Error {
    Error::new(
        ErrorCode::RelayUnavailable,
        format!("the cluster registry says {name:?} is held on another node, which could not be asked to confirm it ({why}); retry shortly"),
    )
}

/// The `NAME_TAKEN` error for a claim another node holds, in the words of the local rules.
fn taken_error(name: &str, ours: Registration, theirs: Registration) -> Error {
    let why = if theirs.pool && !ours.pool {
        format!(
            "the name {name:?} is served by a pool of listeners on another relay of the cluster; start this one with --pool (pool=True) to join it"
        )
    } else if theirs.pool && ours.pool {
        format!("the name {name:?} is served by a pool of listeners on another relay of the cluster; replicas must all be exits or all not")
    } else {
        format!("the name {name:?} is registered by another key on another relay of the cluster; pick another name, use that key, or start every replica with --pool")
    };
    Error::new(ErrorCode::NameTaken, why)
}

async fn refresh_loop(me: Arc<Cluster>, state: Arc<RelayState>) {
    let every = me.cfg.claim_ttl / 3;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut retry = ANNOUNCE_RETRY;
    let mut announced = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.draining.cancelled() => break,
        }
        let alive = match me.claims.announce(&me.advertise, me.cfg.claim_ttl).await {
            Ok((rtt, alive)) => {
                me.redis_ok();
                state.metrics.cluster.redis_rtt_micros.store(rtt.as_micros() as i64, Relaxed);
                retry = ANNOUNCE_RETRY;
                alive
            }
            Err(e) => {
                me.redis_failed(&state, "announcing this node", &e);
                tick.reset_after(retry.min(every));
                retry = (retry * 2).min(every);
                continue;
            }
        };
        // (The first announcement of a node that started while Redis was unreachable, or before
        // the sentinels named the primary, finds no key either: nothing had expired.)
        if !alive && me.held_count() > 0 && announced {
            tracing::warn!(names = me.held_count(), "this node's key had expired in the cluster registry (Redis unreachable for longer than cluster_ttl, or Redis lost its data): claiming its names again");
        }
        announced = true;
        // The node's key was gone: every claim of this node died with it.
        me.reassert_all(&state, alive).await;
        if alive {
            me.verify_some(&state).await;
        }
        me.collect_dead(&state).await;
        me.mirrors.reconcile(&me, &state).await;
    }
    // A clean stop: other nodes stop routing here at once (the listeners' sessions end with the
    // relay and release their names too).
    me.peers.close_all();
    me.mirrors.close_all();
    let _ = tokio::time::timeout(Duration::from_secs(1), me.claims.withdraw()).await;
}

/// Follow change notices: drop the cached route of each name that changed, re-assert our claim
/// on a name we hold (a replacement elsewhere closes our listener). Without a subscription the
/// cache only stands in for Redis while it does not answer, and what it held before the
/// subscription was remade is not trusted after.
async fn notice_loop(me: Arc<Cluster>, state: Arc<RelayState>) {
    let mut delay = Duration::from_millis(100);
    loop {
        let subscribed = async {
            let client = me.primary.client().map_err(|e| e.to_string())?;
            let mut ps = tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub())
                .await
                .map_err(|_| "timed out".to_string())?
                .map_err(|e| e.to_string())?;
            ps.subscribe(me.claims.events_channel()).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(ps)
        };
        let ps = tokio::select! {
            r = subscribed => r,
            _ = state.draining.cancelled() => return,
        };
        let ps = match ps {
            Ok(ps) => ps,
            Err(e) => {
                tracing::debug!(error = %e, "cannot subscribe to the cluster's change notices; retrying");
                // Behind Sentinel, ask where the primary is now: a node that makes no other
                // call to Redis (no lookups) would otherwise learn only at its next announcement.
                me.primary.recheck();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    // Behind Sentinel: a new primary was named, subscribe there at once.
                    _ = me.primary.moved() => {}
                    _ = state.draining.cancelled() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        delay = Duration::from_millis(100);
        *me.subscribed_at.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        me.subscribed.store(true, Relaxed);
        // Claims made while we were not subscribed may have replaced ours: check them all.
        me.reassert_all(&state, false).await;
        me.mirrors.reconcile(&me, &state).await;
        let mut stream = ps.into_on_message();
        loop {
            let msg = tokio::select! {
                m = stream.next() => m,
                _ = state.draining.cancelled() => {
                    me.subscribed.store(false, Relaxed);
                    return;
                }
            };
            let Some(msg) = msg else { break };
            let name = String::from_utf8_lossy(msg.get_payload_bytes()).into_owned();
            if let Some(id) = name.strip_prefix(":node:") {
                // A dead node's names were collected: no route goes through it any more.
                me.peers.forget(id);
                me.forget_node(id);
                continue;
            }
            if name == ":tcp" {
                let (me, st) = (me.clone(), state.clone());
                state.tasks.spawn(async move { me.mirrors.reconcile(&me, &st).await });
                continue;
            }
            me.forget_route(&name);
            if me.held.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&name) {
                // In a task: checking a replacement with the other node takes a round trip, and
                // other notices must not wait for it.
                let (me, st) = (me.clone(), state.clone());
                state.tasks.spawn(async move { me.reassert(&st, &name).await });
            }
        }
        // The cached routes are no longer kept right by notices: not used while Redis answers,
        // only in its place while it does not (`lookup`), and not trusted after resubscribing.
        me.subscribed.store(false, Relaxed);
        tracing::debug!("lost the cluster's change notices; resubscribing");
    }
}
