//! The cluster's name table in Redis: which node holds which listener name, for which key, in
//! which mode. Every change is one Lua script, so each is atomic on the Redis server, and every
//! time is the Redis server's clock (no clock agreement between nodes is needed).
//!
//! **Cost grows with nodes, not names.** A claim has no expiry of its own: it is valid exactly
//! while its holder's node key lives, so a node's refresh is one `ANNOUNCE` (its node key) each
//! third of `claim_ttl`, whatever it holds. Lookups and claims ignore a holder whose node key is
//! gone at once; the names a dead node left are then removed by whichever node runs `COLLECT`
//! first (every node does on its refresh tick, a batch at a time).
//!
//! Keys, under the namespace `NS`:
//! - `NS:node:ID` → the URL other nodes reach node `ID` at, expiring `claim_ttl` after the node's
//!   last refresh: a node that dies loses every name it held when this key expires.
//! - `NS:nodes` → the set of node ids that announced themselves (live or not yet collected).
//! - `NS:held:ID` → the set of names node `ID` claimed: what `COLLECT` removes once `ID` is dead.
//! - `NS:name:NAME` → a hash: `owner` (the listener key, hex), `mode` (`pool`, `exit`, `h2c`,
//!   `tls` flags), and one field `n:ID` per node holding it, whose value is that node's claim
//!   epoch. A holder whose node key has expired is dead: lookups skip it, the next claim removes
//!   it, and so does `COLLECT`. A cluster that stopped whole leaves its names until a node of it
//!   starts again (its first `COLLECT` removes them).
//! - `NS:retired:NAME` → the listener instances a newer registration of the same key replaced
//!   (for 10 minutes): one of them coming back, on any node, is refused instead of taking the
//!   name back (`registry`'s rule, cluster-wide). Each holder's instance is its `i:ID` field.
//! - `NS:epoch` → a counter: every registration gets a new epoch, and a release removes a holder
//!   only if the epoch is still its own, so a node can never delete a newer claim.
//! - `NS:tcp` → a hash of public TCP ports to the listener name each is assigned to: the node
//!   holding the listener binds the port, and every other node with `tcp_ports` binds it too (a
//!   mirror) and forwards its connections, so a load balancer may send the port to any node.
//! - channel `NS:events` ← a name, published whenever its holders change: every node drops its
//!   cached route for it, and the node whose claim was replaced closes its listener; `:tcp` when
//!   the port table changed.
//!
//! The rules are the relay's `NAME_TAKEN` rules (see `registry`), across nodes: a name belongs to
//! one key; a pool (every holder registered with `pool`, in the same exit mode) may span nodes,
//! with any keys the relays grant the name to; the same key registering again (not as a pool)
//! replaces the old holder, wherever it is.

use std::time::{Duration, Instant};

use std::sync::Arc;

use redis::aio::ConnectionManager;
use redis::Script;

use super::sentinel::Primary;
use crate::relay::names::{Holders, Registration, Speaks};

/// A registration as a claim stores it in Redis (`pool`, `exit`, and `h2c` or `tls`); the
/// joining rule compares `pool` and `exit` only.
fn encode(r: Registration) -> String {
    let speaks = match r.speaks {
        Speaks::Http1 => None,
        Speaks::H2c => Some("h2c"),
        Speaks::TlsPassthrough => Some("tls"),
    };
    [r.pool.then_some("pool"), r.exit.then_some("exit"), speaks].into_iter().flatten().collect::<Vec<_>>().join(",")
}

/// A stored claim's registration (`tls` wins over `h2c`, as at registration).
pub(crate) fn decode(s: &str) -> Registration {
    let has = |f: &str| s.split(',').any(|x| x == f);
    let speaks = if has("tls") {
        Speaks::TlsPassthrough
    } else if has("h2c") {
        Speaks::H2c
    } else {
        Speaks::Http1
    };
    Registration { pool: has("pool"), exit: has("exit"), speaks }
}

/// The part of a registration the joining rule compares (`pool`, `exit`).
fn joining(r: Registration) -> String {
    format!("{}{}", if r.pool { "pool" } else { "-" }, if r.exit { "exit" } else { "-" })
}

/// What a claim script answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Claimed {
    /// Held, with this epoch.
    Held(u64),
    /// Another key (or a pool / non-pool mismatch) holds the name on another node.
    Taken { owner: String, mode: Registration },
    /// (Refresh only) our claim is gone and another node holds the name now: a newer
    /// registration of the same key replaced ours, or another key took it while we could not
    /// reach Redis.
    Lost,
    /// This listener instance was replaced by a newer registration of its key: it may not come
    /// back.
    Retired,
}

// KEYS: name hash, retired set, this node's held set. ARGV: node id, owner hex, mode, joining part of mode,
// namespace, 'claim' (a registration: may replace the same key elsewhere; new epoch) or 'keep'
// (a refresh), the listener's instance (hex, may be empty), how long the replaced are refused (ms).
const CLAIM: &str = r#"
local h, me, owner, mode, joining, ns, kind = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local instance = ARGV[7]
if instance ~= '' and redis.call('SISMEMBER', KEYS[2], instance) == 1 then return {'retired'} end
local cur_owner = redis.call('HGET', h, 'owner')
local cur_mode = redis.call('HGET', h, 'mode') or ''
local mine = redis.call('HGET', h, 'n:' .. me)
local others = {}
for _, f in ipairs(redis.call('HKEYS', h)) do
  if string.sub(f, 1, 2) == 'n:' and f ~= 'n:' .. me then
    if redis.call('EXISTS', ns .. ':node:' .. string.sub(f, 3)) == 1 then
      table.insert(others, f)
    else
      redis.call('HDEL', h, f, 'i:' .. string.sub(f, 3))
      redis.call('SREM', ns .. ':held:' .. string.sub(f, 3), string.sub(h, string.len(ns) + 7))
    end
  end
end
local function joining_of(m)
  local p, e = '-', '-'
  for flag in string.gmatch(m, '[^,]+') do
    if flag == 'pool' then p = 'pool' elseif flag == 'exit' then e = 'exit' end
  end
  return p .. e
end
if #others > 0 then
  local pool_join = string.sub(joining, 1, 4) == 'pool' and joining_of(cur_mode) == joining
  if not pool_join then
    if kind == 'keep' and not mine then return {'lost'} end
    if cur_owner ~= owner then return {'taken', cur_owner or '', cur_mode} end
    if kind == 'keep' then
      -- same key on another node, not a pool: whichever registered last holds it
      return {'lost'}
    end
    for _, f in ipairs(others) do
      local theirs = redis.call('HGET', h, 'i:' .. string.sub(f, 3))
      if theirs and theirs ~= '' and theirs ~= instance then
        redis.call('SADD', KEYS[2], theirs)
        redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[8]))
      end
      redis.call('HDEL', h, f, 'i:' .. string.sub(f, 3))
      redis.call('SREM', ns .. ':held:' .. string.sub(f, 3), string.sub(h, string.len(ns) + 7))
    end
  end
end
local epoch
if kind == 'keep' and mine then epoch = mine else epoch = redis.call('INCR', ns .. ':epoch') end
redis.call('HSET', h, 'owner', owner, 'mode', mode, 'n:' .. me, epoch, 'i:' .. me, instance)
redis.call('SADD', KEYS[3], string.sub(h, string.len(ns) + 7))
if kind ~= 'keep' or not mine then redis.call('PUBLISH', ns .. ':events', string.sub(h, string.len(ns) + 7)) end
return {'held', tostring(epoch)}
"#;

// KEYS: name hash, this node's held set. ARGV: node id, epoch, namespace.
const RELEASE: &str = r#"
local h = KEYS[1]
local name = string.sub(h, string.len(ARGV[3]) + 7)
local cur = redis.call('HGET', h, 'n:' .. ARGV[1])
if cur == ARGV[2] then
  redis.call('HDEL', h, 'n:' .. ARGV[1], 'i:' .. ARGV[1])
  redis.call('SREM', KEYS[2], name)
  if redis.call('HLEN', h) <= 2 then redis.call('DEL', h) end
  redis.call('PUBLISH', ARGV[3] .. ':events', name)
  return 1
end
if not cur then redis.call('SREM', KEYS[2], name) end
return 0
"#;

// KEYS: this node's key, the node set. ARGV: URL, ttl ms, node id. Announces the node for another
// ttl; returns 0 when its key was gone (first start, expired while Redis was unreachable, or a
// Redis that lost its data): the node's claims are dead then and must be made again.
const ANNOUNCE: &str = r#"
local had = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
redis.call('SADD', KEYS[2], ARGV[3])
return had
"#;

// KEYS: the node set. ARGV: namespace, batch. Removes up to `batch` names of dead nodes (node key
// gone) from their hashes (dropping a hash no node holds any more), and forgets a dead node once
// all its names are gone (published as `:node:ID`, so nodes drop routes through it). Returns how
// many names it took off dead nodes (`batch`: there may be more, call again).
const COLLECT: &str = r#"
local ns, batch = ARGV[1], tonumber(ARGV[2])
local done = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if done >= batch then break end
  if redis.call('EXISTS', ns .. ':node:' .. id) == 0 then
    local set = ns .. ':held:' .. id
    for _, name in ipairs(redis.call('SPOP', set, batch - done)) do
      local h = ns .. ':name:' .. name
      if redis.call('HDEL', h, 'n:' .. id, 'i:' .. id) > 0 and redis.call('HLEN', h) <= 2 then redis.call('DEL', h) end
      done = done + 1
    end
    if redis.call('EXISTS', set) == 0 then
      redis.call('SREM', KEYS[1], id)
      redis.call('PUBLISH', ns .. ':events', ':node:' .. id)
    end
  end
end
return done
"#;

// KEYS: name hash. ARGV: namespace. Returns owner, mode, then node id / URL pairs of live holders.
const LOOKUP: &str = r#"
local h, ns = KEYS[1], ARGV[1]
local t = redis.call('HGETALL', h)
local owner, mode, out = '', '', {}
for i = 1, #t, 2 do
  local f = t[i]
  if f == 'owner' then owner = t[i + 1]
  elseif f == 'mode' then mode = t[i + 1]
  elseif string.sub(f, 1, 2) == 'n:' then
    local url = redis.call('GET', ns .. ':node:' .. string.sub(f, 3))
    if url then table.insert(out, string.sub(f, 3)); table.insert(out, url) end
  end
end
table.insert(out, 1, mode)
table.insert(out, 1, owner)
return out
"#;

// KEYS: name hash, retired set. ARGV: namespace, this node's listener instance (hex, may be empty),
// then the ids of the holders to remove. Removes holders no node proving the cluster key
// confirmed, and un-retires our instance (an entry only such a holder's claim could justify).
const EVICT: &str = r#"
local h, ns, instance = KEYS[1], ARGV[1], ARGV[2]
for i = 3, #ARGV do
  redis.call('HDEL', h, 'n:' .. ARGV[i], 'i:' .. ARGV[i])
  redis.call('SREM', ns .. ':held:' .. ARGV[i], string.sub(h, string.len(ns) + 7))
end
if instance ~= '' then redis.call('SREM', KEYS[2], instance) end
redis.call('PUBLISH', ns .. ':events', string.sub(h, string.len(ns) + 7))
return 1
"#;

// KEYS: the port table. ARGV: port, name, namespace. Takes the port for `name` if it is free, held
// by `name` already, or held by a name with no live holder. Returns 1 when taken.
const TAKE_PORT: &str = r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and cur ~= ARGV[2] then
  local h = ARGV[3] .. ':name:' .. cur
  for _, f in ipairs(redis.call('HKEYS', h)) do
    if string.sub(f, 1, 2) == 'n:' and redis.call('EXISTS', ARGV[3] .. ':node:' .. string.sub(f, 3)) == 1 then return 0 end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[3] .. ':events', ':tcp')
return 1
"#;

// KEYS: the port table. ARGV: port, name, namespace. Frees the port if `name` still holds it.
const FREE_PORT: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('PUBLISH', ARGV[3] .. ':events', ':tcp')
  return 1
end
return 0
"#;

/// The Redis side of the cluster: one multiplexed, self-reconnecting connection to the primary
/// (`sentinel`).
pub(crate) struct Claims {
    primary: Arc<Primary>,
    ns: String,
    node: String,
    claim: Script,
    release: Script,
    lookup: Script,
    take_port: Script,
    free_port: Script,
    evict: Script,
    announce: Script,
    collect: Script,
}

impl Claims {
    /// A handle; the connection is made lazily and remade by itself after a failure.
    pub(crate) fn new(primary: Arc<Primary>, ns: &str, node: &str) -> Claims {
        Claims {
            primary,
            ns: ns.to_string(),
            node: node.to_string(),
            claim: Script::new(CLAIM),
            release: Script::new(RELEASE),
            lookup: Script::new(LOOKUP),
            take_port: Script::new(TAKE_PORT),
            free_port: Script::new(FREE_PORT),
            evict: Script::new(EVICT),
            announce: Script::new(ANNOUNCE),
            collect: Script::new(COLLECT),
        }
    }

    /// The shared connection and the namespace, for reads of the whole table (`fleet`).
    pub(super) fn connection(&self) -> redis::RedisResult<(ConnectionManager, &str)> {
        Ok((self.primary.conn()?, &self.ns))
    }

    fn name_key(&self, name: &str) -> String {
        format!("{}:name:{name}", self.ns)
    }

    /// The channel name changes are published on.
    pub(crate) fn events_channel(&self) -> String {
        format!("{}:events", self.ns)
    }

    fn held_key(&self) -> String {
        format!("{}:held:{}", self.ns, self.node)
    }

    /// Announce this node (its URL) for another `ttl`: the one refresh that keeps every claim of
    /// this node alive. Returns the round trip, and whether the node's key was still there
    /// (false: every claim of this node is dead and must be made again).
    pub(crate) async fn announce(&self, url: &str, ttl: Duration) -> redis::RedisResult<(Duration, bool)> {
        let t = Instant::now();
        let mut c = self.primary.conn()?;
        let had: i64 = self
            .announce
            .key(format!("{}:node:{}", self.ns, self.node))
            .key(format!("{}:nodes", self.ns))
            .arg(url)
            .arg(ttl.as_millis() as u64)
            .arg(&self.node)
            .invoke_async(&mut c)
            .await?;
        Ok((t.elapsed(), had == 1))
    }

    /// Remove up to `batch` names left by dead nodes; returns how many it removed.
    pub(crate) async fn collect(&self, batch: usize) -> redis::RedisResult<usize> {
        let mut c = self.primary.conn()?;
        let n: i64 = self.collect.key(format!("{}:nodes", self.ns)).arg(&self.ns).arg(batch).invoke_async(&mut c).await?;
        Ok(n.max(0) as usize)
    }

    /// Remove this node's announcement (a clean shutdown: its names are dead at once).
    pub(crate) async fn withdraw(&self) -> redis::RedisResult<()> {
        let mut c = self.primary.conn()?;
        redis::cmd("DEL").arg(format!("{}:node:{}", self.ns, self.node)).query_async(&mut c).await
    }

    /// Claim `name` for `owner` (a registration, `refresh == false`) or re-assert an existing
    /// claim (`refresh == true`).
    pub(crate) async fn claim(&self, name: &str, owner: &str, instance: &str, mode: Registration, refresh: bool) -> redis::RedisResult<Claimed> {
        let mut c = self.primary.conn()?;
        let r: Vec<String> = self
            .claim
            .key(self.name_key(name))
            .key(format!("{}:retired:{name}", self.ns))
            .key(self.held_key())
            .arg(&self.node)
            .arg(owner)
            .arg(encode(mode))
            .arg(joining(mode))
            .arg(&self.ns)
            .arg(if refresh { "keep" } else { "claim" })
            .arg(instance)
            .arg(crate::relay::registry::RETIRED_FOR.as_millis() as u64)
            .invoke_async(&mut c)
            .await?;
        Ok(match r.first().map(String::as_str) {
            Some("held") => Claimed::Held(r.get(1).and_then(|e| e.parse().ok()).unwrap_or(0)),
            Some("retired") => Claimed::Retired,
            Some("taken") => {
                Claimed::Taken { owner: r.get(1).cloned().unwrap_or_default(), mode: decode(r.get(2).map(String::as_str).unwrap_or("")) }
            }
            _ => Claimed::Lost,
        })
    }

    /// Which of `names` this node has no claim on in Redis any more (one pipelined round trip).
    pub(crate) async fn missing(&self, names: &[String]) -> redis::RedisResult<Vec<String>> {
        let mut c = self.primary.conn()?;
        let field = format!("n:{}", self.node);
        let mut p = redis::pipe();
        for n in names {
            p.cmd("HEXISTS").arg(self.name_key(n)).arg(&field);
        }
        let found: Vec<bool> = p.query_async(&mut c).await?;
        Ok(names.iter().zip(found).filter(|(_, f)| !*f).map(|(n, _)| n.clone()).collect())
    }

    /// Give up this node's claim on `name` if it is still the one made with `epoch`.
    pub(crate) async fn release(&self, name: &str, epoch: u64) -> redis::RedisResult<bool> {
        let mut c = self.primary.conn()?;
        let n: i64 = self
            .release
            .key(self.name_key(name))
            .key(self.held_key())
            .arg(&self.node)
            .arg(epoch.to_string())
            .arg(&self.ns)
            .invoke_async(&mut c)
            .await?;
        Ok(n == 1)
    }

    /// Remove the holders `nodes` of `name` (none of them proved it holds the name) and take
    /// this node's listener `instance` off the name's retired list.
    pub(crate) async fn evict(&self, name: &str, instance: &str, nodes: &[String]) -> redis::RedisResult<()> {
        let mut c = self.primary.conn()?;
        let mut inv = self.evict.key(self.name_key(name));
        inv.key(format!("{}:retired:{name}", self.ns)).arg(&self.ns).arg(instance);
        for n in nodes {
            inv.arg(n);
        }
        let _: i64 = inv.invoke_async(&mut c).await?;
        Ok(())
    }

    /// The live holders of `name` (none: offline everywhere).
    pub(crate) async fn lookup(&self, name: &str) -> redis::RedisResult<Holders> {
        let mut c = self.primary.conn()?;
        let r: Vec<String> = self.lookup.key(self.name_key(name)).arg(&self.ns).invoke_async(&mut c).await?;
        let mut it = r.into_iter();
        let owner = it.next().unwrap_or_default();
        let registration = decode(&it.next().unwrap_or_default());
        let mut nodes = Vec::new();
        while let (Some(id), Some(url)) = (it.next(), it.next()) {
            nodes.push((id, url));
        }
        Ok(Holders { owner, registration, nodes })
    }
}

impl Claims {
    fn port_table(&self) -> String {
        format!("{}:tcp", self.ns)
    }

    /// Assign public TCP `port` to `name` cluster-wide (false: another live listener has it).
    pub(crate) async fn take_port(&self, port: u16, name: &str) -> redis::RedisResult<bool> {
        let mut c = self.primary.conn()?;
        let n: i64 = self.take_port.key(self.port_table()).arg(port).arg(name).arg(&self.ns).invoke_async(&mut c).await?;
        Ok(n == 1)
    }

    /// Free `port` if `name` still has it.
    pub(crate) async fn free_port(&self, port: u16, name: &str) -> redis::RedisResult<()> {
        let mut c = self.primary.conn()?;
        let _: i64 = self.free_port.key(self.port_table()).arg(port).arg(name).arg(&self.ns).invoke_async(&mut c).await?;
        Ok(())
    }

    /// Every assigned public TCP port and its listener name.
    pub(crate) async fn ports(&self) -> redis::RedisResult<Vec<(u16, String)>> {
        let mut c = self.primary.conn()?;
        let m: std::collections::HashMap<String, String> = redis::cmd("HGETALL").arg(self.port_table()).query_async(&mut c).await?;
        Ok(m.into_iter().filter_map(|(p, n)| Some((p.parse().ok()?, n))).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_round_trip() {
        for m in [
            Registration::default(),
            Registration { pool: true, ..Default::default() },
            Registration { pool: true, exit: true, speaks: Speaks::H2c },
            Registration { speaks: Speaks::TlsPassthrough, ..Default::default() },
        ] {
            assert_eq!(decode(&encode(m)), m);
        }
        // Claims stored before `tls` replaced `h2c` when both were asked for.
        assert_eq!(decode("pool,h2c,tls").speaks, Speaks::TlsPassthrough);
        assert_eq!(joining(Registration { pool: true, speaks: Speaks::H2c, ..Default::default() }), "pool-");
        assert_eq!(joining(Registration { exit: true, ..Default::default() }), "-exit");
    }
}
