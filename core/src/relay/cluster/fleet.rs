//! The fleet as Redis sees it, for the admin endpoint (`GET /cluster/nodes`,
//! `GET /cluster/listeners`, the dashboard): every node answers for the whole cluster from one
//! read of the name table (`claims` describes the keys), so an operator may ask any node.
//!
//! One Lua script reads it all (consistent, one round trip): the nodes in `NS:nodes` with their
//! URL and how long their key has left (a node whose key is gone is dead and not yet collected),
//! then the names each node holds (`NS:held:ID`), counted, and for at most as many as the caller
//! asks ([`MAX_NAMES`] for `/cluster/listeners`, none for `/cluster/nodes`, a page's worth for the
//! dashboard) their key, mode and live holders (the answer says when it stopped there): an admin
//! page must not hold Redis for long on a fleet of a million names. Measured on one debug node
//! with 10,000 names: `/cluster/listeners` 0.25–0.49 s and 3.2 MB; reading every name's row for
//! `/cluster/nodes` too took 0.2–0.35 s.

use serde_json::{json, Value};

use super::claims;
use super::Cluster;
use crate::relay::names::Speaks;

/// Most listener names one answer lists.
pub(crate) const MAX_NAMES: usize = 10_000;

// ARGV: namespace, most names. Reply: {nodes, names, truncated, count}; nodes: {id, url, pttl,
// held}; names: {name, owner, mode, live holder ids...}; count: distinct names held.
const FLEET: &str = r#"
local ns, cap = ARGV[1], tonumber(ARGV[2])
local nodes, names, seen, truncated, count = {}, {}, {}, 0, 0
local ids = redis.call('SMEMBERS', ns .. ':nodes')
table.sort(ids)
for _, id in ipairs(ids) do
  local k = ns .. ':node:' .. id
  table.insert(nodes, {id, redis.call('GET', k) or '', redis.call('PTTL', k), redis.call('SCARD', ns .. ':held:' .. id)})
end
for _, id in ipairs(ids) do
  for _, name in ipairs(redis.call('SMEMBERS', ns .. ':held:' .. id)) do
    if not seen[name] then
      seen[name] = true
      count = count + 1
      if #names >= cap then
        truncated = 1
      else
        local h = ns .. ':name:' .. name
        local row = {name, redis.call('HGET', h, 'owner') or '', redis.call('HGET', h, 'mode') or ''}
        for _, f in ipairs(redis.call('HKEYS', h)) do
          if string.sub(f, 1, 2) == 'n:' and redis.call('EXISTS', ns .. ':node:' .. string.sub(f, 3)) == 1 then
            table.insert(row, string.sub(f, 3))
          end
        end
        if #row > 3 then table.insert(names, row) end
      end
    end
  end
end
return {nodes, names, truncated, count}
"#;

/// The cluster's nodes and names, as one read of Redis found them.
pub(crate) struct Fleet {
    /// `{id, url, alive, expires_in_ms, names, this}` per node.
    pub(crate) nodes: Vec<Value>,
    /// `{name, owner, pool, exit, h2c, tls, nodes: [{id, url}]}` per name held by a live node.
    pub(crate) listeners: Vec<Value>,
    /// More names are held than were asked for: `listeners` lists the first ones.
    pub(crate) truncated: bool,
    /// Distinct names the nodes hold (listed or not).
    pub(crate) names: usize,
}

type Reply = (Vec<(String, String, i64, i64)>, Vec<Vec<String>>, i64, i64);

impl Cluster {
    /// Read the whole fleet from Redis (one script call), with the rows of at most `rows` names.
    pub(crate) async fn fleet(&self, rows: usize) -> redis::RedisResult<Fleet> {
        let (mut conn, ns) = self.claims.connection()?;
        let (nodes, names, truncated, count): Reply = redis::Script::new(FLEET).arg(ns).arg(rows).invoke_async(&mut conn).await?;
        let url_of: std::collections::HashMap<&str, &str> = nodes.iter().map(|(id, url, _, _)| (id.as_str(), url.as_str())).collect();
        let listeners = names
            .iter()
            .filter(|row| row.len() > 3)
            .map(|row| {
                let mode = claims::decode(&row[2]);
                let holders: Vec<Value> =
                    row[3..].iter().map(|id| json!({"id": id, "url": url_of.get(id.as_str()).copied().unwrap_or("")})).collect();
                json!({
                    "name": row[0],
                    "public_key": hex_to_base64(&row[1]),
                    "pool": mode.pool,
                    "exit": mode.exit,
                    "h2c": mode.speaks == Speaks::H2c,
                    "tls": mode.speaks == Speaks::TlsPassthrough,
                    "replicas": holders.len(),
                    "nodes": holders,
                })
            })
            .collect::<Vec<_>>();
        let mut listeners = listeners;
        listeners.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        let nodes = nodes
            .into_iter()
            .map(|(id, url, pttl, held)| {
                // PTTL: -2 the key is gone (dead), -1 no expiry (never set by a node; counted live).
                let alive = pttl != -2;
                json!({
                    "id": id,
                    "url": url,
                    "alive": alive,
                    "expires_in_ms": (pttl >= 0).then_some(pttl),
                    "names": held,
                    "this": id == self.node_id,
                })
            })
            .collect();
        Ok(Fleet { nodes, listeners, truncated: truncated == 1, names: count.max(0) as usize })
    }
}

/// Redis keeps a listener's key as hex; the admin endpoint shows keys as base64 (as `/listeners`).
fn hex_to_base64(hex: &str) -> String {
    use base64::Engine;
    match data_encoding::HEXLOWER.decode(hex.as_bytes()) {
        Ok(b) => base64::engine::general_purpose::STANDARD.encode(b),
        Err(_) => hex.to_string(),
    }
}
