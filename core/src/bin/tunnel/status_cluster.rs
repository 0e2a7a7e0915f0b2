//! `tunnel status --cluster`: the whole cluster as one node's admin endpoint reads it from Redis
//! (`GET /cluster/nodes`, `GET /cluster/listeners`), as two aligned tables.

use serde_json::Value;

/// Columns as wide as their widest cell; the columns in `numeric` right-aligned.
fn aligned(table: &[Vec<String>], numeric: &[usize]) -> String {
    let cols = table.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols).map(|c| table.iter().map(|row| row[c].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in table {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, v)| if numeric.contains(&c) { format!("{v:>w$}", w = widths[c]) } else { format!("{v:<w$}", w = widths[c]) })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The nodes table, the listeners table, and a totals line.
pub(crate) fn table(nodes: &Value, listeners: &Value) -> String {
    let nodes = nodes.as_array().cloned().unwrap_or_default();
    let listeners = listeners.as_array().cloned().unwrap_or_default();
    let mut t = vec![["NODE", "URL", "STATE", "NAMES"].map(String::from).to_vec()];
    for n in &nodes {
        let mut id = n["id"].as_str().unwrap_or("-").to_string();
        if n["this"].as_bool().unwrap_or(false) {
            id.push_str(" *");
        }
        let state = if n["alive"].as_bool().unwrap_or(false) { "alive" } else { "dead" };
        t.push(vec![id, n["url"].as_str().unwrap_or("-").to_string(), state.into(), n["names"].as_u64().unwrap_or(0).to_string()]);
    }
    let mut out = aligned(&t, &[3]);
    out.push('\n');
    let mut t = vec![["LISTENER", "KIND", "REPLICAS", "NODES", "PUBLIC KEY"].map(String::from).to_vec()];
    for l in &listeners {
        let mut kind = Vec::new();
        if l["pool"].as_bool().unwrap_or(false) {
            kind.push("pool");
        }
        if l["exit"].as_bool().unwrap_or(false) {
            kind.push("exit");
        }
        let held: Vec<&str> = l["nodes"].as_array().map(|a| a.iter().filter_map(|n| n["id"].as_str()).collect()).unwrap_or_default();
        t.push(vec![
            l["name"].as_str().unwrap_or("-").to_string(),
            if kind.is_empty() { "-".into() } else { kind.join(", ") },
            l["replicas"].as_u64().unwrap_or(0).to_string(),
            held.join(","),
            l["public_key"].as_str().unwrap_or("-").to_string(),
        ]);
    }
    out.push_str(&aligned(&t, &[2]));
    let alive = nodes.iter().filter(|n| n["alive"].as_bool().unwrap_or(false)).count();
    out.push_str(&format!("{alive} of {} node(s) alive (* the node asked); {} listener name(s) in the cluster\n", nodes.len(), listeners.len()));
    out
}
