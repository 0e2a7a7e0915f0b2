// The relay dashboard: fetches /dashboard/data from this origin (with the admin token as a
// bearer token) every few seconds and draws tables and SVG bar charts. No other origin is used.
"use strict";
(function () {
  const params = new URLSearchParams(location.search);
  let token = params.get("token") || sessionStorage.getItem("tunnel-admin-token") || "";
  if (params.has("token")) {
    sessionStorage.setItem("tunnel-admin-token", token);
    history.replaceState(null, "", location.pathname); // keep the token out of the address bar
  }
  const $ = (id) => document.getElementById(id);
  const SVG = $("chart-traffic").namespaceURI; // the SVG namespace, from the page's own <svg>
  const text = (id, v) => { $(id).textContent = String(v); };

  function rows(tableId, list, cells) {
    const body = $(tableId).querySelector("tbody");
    body.replaceChildren();
    for (const item of list) {
      const tr = document.createElement("tr");
      for (const c of cells(item)) {
        const td = document.createElement("td");
        if (typeof c === "object" && c !== null) {
          td.textContent = c.text;
          if (c.cls) td.className = c.cls;
        } else {
          td.textContent = String(c);
          if (typeof c === "number") td.className = "num";
        }
        tr.appendChild(td);
      }
      body.appendChild(tr);
    }
  }

  function human(n) {
    const u = ["", "k", "M", "G", "T"];
    let i = 0;
    while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
    return (i ? n.toFixed(1) : String(Math.round(n))) + u[i];
  }

  // Bars of each series in `keys` (side by side), one group per minute; newest on the right.
  function chart(id, points, keys) {
    const svg = $(id);
    svg.replaceChildren();
    const W = 600, H = 120, top = 14, bottom = 16, left = 4, slots = 60;
    let max = 1;
    for (const p of points) for (const k of keys) max = Math.max(max, p[k] || 0);
    const line = document.createElementNS(SVG, "line");
    line.setAttribute("x1", 0); line.setAttribute("x2", W);
    line.setAttribute("y1", H - bottom); line.setAttribute("y2", H - bottom);
    svg.appendChild(line);
    const label = document.createElementNS(SVG, "text");
    label.setAttribute("x", 2); label.setAttribute("y", 11);
    label.textContent = "max " + human(max);
    svg.appendChild(label);
    const slot = (W - left) / slots, bw = Math.max(1, slot / keys.length - 1);
    const start = slots - points.length;
    points.forEach((p, i) => {
      keys.forEach((k, j) => {
        const v = p[k] || 0;
        const h = v ? Math.max(1, (H - top - bottom) * v / max) : 0;
        const r = document.createElementNS(SVG, "rect");
        r.setAttribute("class", j ? "bar alt" : "bar");
        r.setAttribute("x", (left + (start + i) * slot + j * bw).toFixed(1));
        r.setAttribute("y", (H - bottom - h).toFixed(1));
        r.setAttribute("width", bw.toFixed(1));
        r.setAttribute("height", h.toFixed(1));
        const t = document.createElementNS(SVG, "title");
        t.textContent = new Date(p.at * 1000).toLocaleTimeString() + " " + k + ": " + v;
        r.appendChild(t);
        svg.appendChild(r);
      });
    });
    const ago = document.createElementNS(SVG, "text");
    ago.setAttribute("x", 2); ago.setAttribute("y", H - 3);
    ago.textContent = "−60 min";
    svg.appendChild(ago);
    const now = document.createElementNS(SVG, "text");
    now.setAttribute("x", W - 24); now.setAttribute("y", H - 3);
    now.textContent = "now";
    svg.appendChild(now);
  }

  function render(d) {
    const c = d.cluster;
    const local = d.listeners || [];
    let names, count, note;
    if (c && c.listeners) {
      const alive = c.nodes.filter((n) => n.alive);
      text("where", "cluster node " + c.node_id + " · " + alive.length + " of " + c.nodes.length + " nodes alive");
      text("node-count", alive.length);
      rows("nodes", c.nodes, (n) => [
        n.id + (n.this ? " (this)" : ""), n.url,
        n.alive ? { text: "alive" } : { text: "dead (names not yet collected)", cls: "dead" }, n.names,
      ]);
      text("nodes-note", "");
      names = c.listeners.map((l) => ({
        name: l.name, pool: l.pool, exit: l.exit, replicas: l.replicas,
        nodes: l.nodes.map((n) => n.id).join(", "), key: l.public_key,
      }));
      count = c.listener_count ?? names.length;
      note = c.truncated ? "the first " + names.length + " of " + count + " names; GET /cluster/listeners lists them all" : "";
    } else {
      text("where", c && c.error ? c.error : "single relay (no cluster)");
      text("node-count", 1);
      rows("nodes", [], () => []);
      text("nodes-note", c && c.error ? c.error : "this relay is not a node of a cluster");
      const by = new Map();
      for (const l of local) {
        const e = by.get(l.name) || { name: l.name, pool: l.pool, exit: l.exit, replicas: 0, nodes: "this relay", key: l.public_key };
        e.replicas++;
        by.set(l.name, e);
      }
      names = [...by.values()];
      count = d.listener_names ?? names.length;
      note = count > names.length ? "the first " + names.length + " of " + count + " names; GET /listeners lists them all" : "";
    }
    text("listeners-note", note);
    text("listener-count", count);
    rows("listeners", names, (l) => [
      l.name, [l.pool ? "pool" : "", l.exit ? "exit" : ""].filter(Boolean).join(", ") || "-", l.replicas, l.nodes, l.key,
    ]);
    const s = d.sessions || {};
    text("listener-sessions", s.listener_sessions ?? 0);
    text("dialer-sessions", s.dialer_sessions ?? 0);
    text("stream-count", s.streams_active ?? 0);
    const h = d.history || [];
    chart("chart-traffic", h, ["bytes"]);
    chart("chart-streams", h, ["streams", "http_requests"]);
    chart("chart-refusals", h, ["refusals"]);
    chart("chart-sessions", h.map((p) => ({ at: p.at, listeners: p.listeners, dialers: p.dialer_sessions })), ["listeners", "dialers"]);
    const errors = d.errors || [];
    rows("errors", errors.length ? errors : [{ reason: "none in the last hour", count: 0 }], (e) => [e.reason, e.count]);
    const st = $("status");
    st.className = "";
    st.textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.loaded = "1";
  }

  async function refresh() {
    try {
      const r = await fetch("/dashboard/data", { headers: { Authorization: "Bearer " + token }, cache: "no-store" });
      if (r.status === 401) throw new Error("the relay refused the token: open /dashboard?token=ADMIN_TOKEN");
      if (!r.ok) throw new Error("the relay answered " + r.status);
      render(await r.json());
    } catch (e) {
      const st = $("status");
      st.className = "error";
      st.textContent = String(e.message || e);
    }
  }

  refresh();
  setInterval(refresh, 5000);
})();
