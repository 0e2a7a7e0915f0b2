//! A relay as one node of a cluster on Redis (`cluster_redis`; off by default). What it adds to a
//! relay on its own:
//! - **claims** (`claims`): a listener that registers here is also claimed in Redis, under the same
//!   `NAME_TAKEN` rules across the cluster; the claim is refreshed every third of `cluster_ttl`
//!   and dies that long after its node does;
//! - **public TCP ports** (`mirrors`): assigned cluster-wide, and bound by every node;
//! - **routes**: a stream for a name no local listener holds (dial by name, public HTTP or TCP,
//!   `via` an exit) is looked up in Redis (cached; every change is published, and each node drops
//!   what it cached for that name) and forwarded to the node that holds it (`peers`);
//! - **failure rules**: Redis unreachable → local listeners keep working, registrations are held
//!   locally and claimed when Redis returns, remote names fail with `RELAY_UNAVAILABLE` naming
//!   Redis; a node that dies → its streams fail on both ends, its listeners reconnect to another
//!   node (through the load balancer, or their next relay URL) and claim again.
//!
//! Bodies and stream bytes never pass through Redis: only names, node URLs and epochs.

pub(crate) mod claims;
mod mirrors;
pub(crate) mod peers;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::registry::Joining;
use super::route::RouteError;
use super::RelayState;
use crate::config::ClusterConfig;
use crate::error::{Error, ErrorCode, Result};
use crate::session::SessionStream;
use claims::{ClaimMode, Claimed, Claims, Holders};

/// How long a cached route may be used without a change notice (a safety net: notices are what
/// keep the cache right, and the cache is dropped whenever the subscription is lost).
const ROUTE_CACHE_FOR: Duration = Duration::from_secs(30);
/// Claims re-asserted at once on each refresh.
const REASSERT_IN_FLIGHT: usize = 64;
/// Most routes cached (then the cache starts over).
const ROUTE_CACHE_MAX: usize = 10_000;

/// A name this node holds in the cluster.
#[derive(Debug, Clone)]
struct Held {
    owner: String,
    /// The listener instance (hex) that holds it here.
    instance: String,
    mode: ClaimMode,
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
    client: redis::Client,
    held: Mutex<HashMap<String, Held>>,
    routes: Mutex<HashMap<String, (Holders, Instant)>>,
    /// The change subscription is live, so cached routes can be trusted.
    subscribed: AtomicBool,
    /// The last Redis command succeeded (for logging transitions once).
    redis_up: AtomicBool,
    peers: peers::Peers,
    /// Round-robin over the nodes of a pool that spans nodes.
    turn: std::sync::atomic::AtomicUsize,
    mirrors: mirrors::Mirrors,
}

/// Why a remote lookup failed.
#[derive(Debug)]
pub(crate) struct RedisDown;

impl Cluster {
    /// Set up (no connection is made yet: Redis may come up after the relay).
    pub(crate) fn new(cfg: ClusterConfig, advertise: String) -> Result<Cluster> {
        let bad = |e: redis::RedisError| Error::config(format!("TUNNEL_CLUSTER_REDIS {:?} is not a usable Redis URL: {e}", cfg.redacted_redis()));
        let client = match &cfg.redis_ca {
            Some(ca) => {
                let pem = std::fs::read(ca).map_err(|e| Error::config(format!("TUNNEL_CLUSTER_REDIS_CA {}: {e}", ca.display())))?;
                redis::Client::build_with_tls(cfg.redis.as_str(), redis::TlsCertificates { client_tls: None, root_cert: Some(pem) }).map_err(bad)?
            }
            None => redis::Client::open(cfg.redis.as_str()).map_err(bad)?,
        };
        let node_id = format!("{:016x}", rand::random::<u64>());
        let claims = Claims::new(&client, &cfg.namespace, &node_id)
            .map_err(|e| Error::config(format!("cannot set up the Redis connection to {}: {e}", cfg.redacted_redis())))?;
        Ok(Cluster {
            cfg,
            node_id,
            advertise,
            claims,
            client,
            held: Mutex::default(),
            routes: Mutex::default(),
            subscribed: AtomicBool::new(false),
            redis_up: AtomicBool::new(true),
            peers: peers::Peers::default(),
            turn: std::sync::atomic::AtomicUsize::new(0),
            mirrors: mirrors::Mirrors::default(),
        })
    }

    fn redis_failed(&self, state: &RelayState, what: &str, e: &redis::RedisError) {
        state.metrics.cluster.redis_errors.fetch_add(1, Relaxed);
        if self.redis_up.swap(false, Relaxed) {
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
    /// another key (or an incompatible pool) holds it; an unreachable Redis keeps the claim
    /// local until it returns.
    pub(crate) async fn claim(&self, state: &RelayState, name: &str, owner: &[u8; 32], instance: &[u8], mode: ClaimMode) -> Result<()> {
        let owner = data_encoding::HEXLOWER.encode(owner);
        let instance = data_encoding::HEXLOWER.encode(instance);
        let res = self.claims.claim(name, &owner, &instance, mode, self.cfg.claim_ttl, false).await;
        let epoch = match res {
            Ok(Claimed::Held(e)) => {
                self.redis_ok();
                e
            }
            Ok(Claimed::Taken { mode: theirs, .. }) => {
                self.redis_ok();
                return Err(taken_error(name, mode, theirs));
            }
            Ok(Claimed::Retired) => {
                self.redis_ok();
                return Err(super::registry::retired_error(name));
            }
            Ok(Claimed::Lost) => 0,
            Err(e) => {
                self.redis_failed(state, "claiming a listener name", &e);
                0
            }
        };
        self.held.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), Held { owner, instance, mode, epoch });
        state.metrics.cluster.claims.store(self.held_count() as i64, Relaxed);
        Ok(())
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
            if let Some((h, at)) = self.routes.lock().unwrap_or_else(|p| p.into_inner()).get(name) {
                if at.elapsed() < ROUTE_CACHE_FOR {
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
                    routes.insert(name.to_string(), (h.clone(), Instant::now()));
                }
                Ok(h)
            }
            Err(e) => {
                self.redis_failed(state, "looking up a listener name", &e);
                Err(RedisDown)
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
            match self.peers.forward(state, &self.cfg.key, (id, url), name, header, deadline).await {
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

    /// Run the node's background work until the relay drains: announce this node and refresh
    /// every claim each third of `cluster_ttl`; follow change notices.
    pub(crate) fn start(self: &Arc<Self>, state: &Arc<RelayState>) {
        state.tasks.spawn(refresh_loop(self.clone(), state.clone()));
        state.tasks.spawn(notice_loop(self.clone(), state.clone()));
    }

    /// Re-assert every claim this node holds, [`REASSERT_IN_FLIGHT`] at a time (the Redis
    /// connection pipelines them).
    async fn reassert_all(&self, state: &RelayState) {
        let names: Vec<String> = self.held.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        futures_util::stream::iter(names).for_each_concurrent(REASSERT_IN_FLIGHT, |name| async move { self.reassert(state, &name).await }).await;
    }

    /// Re-assert the claim on `name` (after a notice, or on the refresh tick); close the local
    /// listeners of a name this node lost.
    async fn reassert(&self, state: &RelayState, name: &str) {
        let Some(h) = self.held.lock().unwrap_or_else(|p| p.into_inner()).get(name).cloned() else { return };
        // Never claimed (Redis was down at registration): claim now, as the registration would have.
        let refresh = h.epoch != 0;
        match self.claims.claim(name, &h.owner, &h.instance, h.mode, self.cfg.claim_ttl, refresh).await {
            Ok(Claimed::Held(epoch)) => {
                self.redis_ok();
                if let Some(x) = self.held.lock().unwrap_or_else(|p| p.into_inner()).get_mut(name) {
                    x.epoch = epoch;
                }
            }
            Ok(Claimed::Taken { .. } | Claimed::Lost | Claimed::Retired) => {
                self.redis_ok();
                self.held.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
                state.metrics.cluster.claims.store(self.held_count() as i64, Relaxed);
                let why = format!(
                    "the name {name:?} is now held on another relay of the cluster (registered again there by the same key, or by another key while this relay could not reach Redis); this listener stops (run one listener per key and name, or start every replica with --pool)"
                );
                tracing::info!(%name, "lost the cluster claim; closing the local listener");
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

/// The `NAME_TAKEN` error for a claim another node holds, in the words of the local rules.
fn taken_error(name: &str, ours: ClaimMode, theirs: ClaimMode) -> Error {
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
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = state.draining.cancelled() => break,
        }
        match me.claims.announce(&me.advertise, me.cfg.claim_ttl).await {
            Ok(rtt) => {
                me.redis_ok();
                state.metrics.cluster.redis_rtt_micros.store(rtt.as_micros() as i64, Relaxed);
            }
            Err(e) => {
                me.redis_failed(&state, "announcing this node", &e);
                continue;
            }
        }
        me.reassert_all(&state).await;
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
/// cache is not used, and it is dropped whenever the subscription is remade.
async fn notice_loop(me: Arc<Cluster>, state: Arc<RelayState>) {
    let mut delay = Duration::from_millis(100);
    loop {
        let subscribed = async {
            let mut ps = tokio::time::timeout(Duration::from_secs(2), me.client.get_async_pubsub())
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
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = state.draining.cancelled() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        delay = Duration::from_millis(100);
        me.routes.lock().unwrap_or_else(|p| p.into_inner()).clear();
        me.subscribed.store(true, Relaxed);
        // Claims made while we were not subscribed may have replaced ours: check them all.
        me.reassert_all(&state).await;
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
            if name == ":tcp" {
                let (me, st) = (me.clone(), state.clone());
                state.tasks.spawn(async move { me.mirrors.reconcile(&me, &st).await });
                continue;
            }
            me.forget_route(&name);
            if me.held.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&name) {
                me.reassert(&state, &name).await;
            }
        }
        me.subscribed.store(false, Relaxed);
        me.routes.lock().unwrap_or_else(|p| p.into_inner()).clear();
        tracing::debug!("lost the cluster's change notices; resubscribing");
    }
}

/// The claim mode of a registration.
pub(crate) fn mode_of(joining: Joining, h2c: bool, tls: bool) -> ClaimMode {
    ClaimMode { pool: joining.pool, exit: joining.exit, h2c, tls }
}
