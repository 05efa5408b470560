"""The coordinator's human page (``/``): a node table, a grid map of alive experts and their replication.

One self-contained HTML document (no external scripts, fonts or CDNs: operators may watch a swarm
from a machine without internet). The script fetches ``/status`` every two seconds and rebuilds the
tables with ``textContent`` only, never ``innerHTML``: node ids and endpoints come from DHT records
that anyone can write, so they must never be interpreted as markup.
"""

from __future__ import annotations

PAGE_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dmoe swarm</title>
<style>
  :root { --bg: #f7f7f5; --fg: #1d1d1f; --muted: #6b6b70; --line: #d9d9de;
          --dead: #e9e3e3; --one: #9fd8a4; --two: #4cae5a; --many: #1f7a35; --warn: #b3261e; }
  * { box-sizing: border-box; }
  body { margin: 0; padding: 20px 28px; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif;
         background: var(--bg); color: var(--fg); }
  h1 { font-size: 20px; margin: 0 0 4px; }
  h2 { font-size: 16px; margin: 22px 0 8px; }
  .muted { color: var(--muted); }
  .warn { color: var(--warn); }
  code { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; word-break: break-all; }
  .cards { display: flex; gap: 12px; flex-wrap: wrap; margin: 14px 0; }
  .card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 8px 14px; min-width: 130px; }
  .card .v { font-size: 22px; font-weight: 600; }
  table.nodes { border-collapse: collapse; background: #fff; border: 1px solid var(--line); min-width: 60%; }
  table.nodes th, table.nodes td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: left; }
  table.nodes th { background: #efeff2; font-weight: 600; }
  table.nodes td.num { text-align: right; font-variant-numeric: tabular-nums; }
  .grid { display: inline-grid; gap: 2px; background: #fff; padding: 6px; border: 1px solid var(--line);
          border-radius: 6px; }
  .cell { width: 14px; height: 14px; border-radius: 2px; background: var(--dead); }
  .cell.r1 { background: var(--one); } .cell.r2 { background: var(--two); } .cell.r3 { background: var(--many); }
  .rowlabel { font: 10px ui-monospace, monospace; color: var(--muted); padding-right: 4px; line-height: 14px; }
  .legend span { display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin: 0 4px 0 12px;
                 vertical-align: -2px; }
  ul.gone { margin: 4px 0; padding-left: 18px; }
  .replication { margin: 2px 0 6px; }
  .at-risk { margin: 6px 0 0; max-width: 100ch; }
  .at-risk code { margin-right: 6px; }
</style>
</head>
<body>
<h1>dmoe swarm</h1>
<div class="muted">coordinator <code id="peer-id">?</code> &middot; bootstrap with
  <code id="maddrs">?</code></div>
<div id="state" class="muted">loading&hellip;</div>
<div class="cards" id="cards"></div>

<h2>Nodes</h2>
<table class="nodes" id="nodes">
  <thead><tr><th>node</th><th>endpoint</th><th>experts</th><th>load</th><th>last announce</th><th>up</th></tr></thead>
  <tbody id="node-rows"><tr><td colspan="6" class="muted">waiting for the first refresh</td></tr></tbody>
</table>

<h2>Alive experts</h2>
<div class="legend muted">replicas:<span class="cell"></span>0<span class="cell r1"></span>1
  <span class="cell r2"></span>2<span class="cell r3"></span>3+</div>
<div id="grids"></div>

<h2>Recently gone</h2>
<div id="gone" class="muted">nothing yet</div>

<script>
"use strict";
const REFRESH_MS = 2000;

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "?";
  if (seconds < 90) return seconds.toFixed(1) + " s ago";
  if (seconds < 5400) return (seconds / 60).toFixed(1) + " min ago";
  return (seconds / 3600).toFixed(1) + " h ago";
}

function duration(seconds) { return ago(seconds).replace(" ago", ""); }

function renderCards(status) {
  const cards = document.getElementById("cards");
  cards.replaceChildren();
  const add = (label, value) => {
    const card = el("div", {class: "card"});
    card.append(el("div", {class: "v"}, value), el("div", {class: "muted"}, label));
    cards.append(card);
  };
  add("nodes", status.nodes.length);
  for (const [name, p] of Object.entries(status.prefixes)) {
    add(name + " experts alive", p.alive + (p.cells ? " / " + p.cells : ""));
    add(name + " coverage", (100 * p.coverage).toFixed(1) + " %");
  }
  add("experts at risk (1 holder)", status.experts_at_risk);
  add("experts unserved", status.experts_unserved);
  add("gone recently", status.gone.nodes.length + " nodes, " + status.gone.experts.length + " experts");
}

function renderNodes(status) {
  const body = document.getElementById("node-rows");
  body.replaceChildren();
  if (!status.nodes.length) {
    const row = el("tr");
    row.append(el("td", {colspan: 6, class: "muted"}, "no nodes announced"));
    body.append(row);
    return;
  }
  for (const n of status.nodes) {
    const row = el("tr", {class: "node-row", "data-node-id": n.node_id});
    row.append(el("td", {}, n.node_id), el("td", {}, n.endpoint), el("td", {class: "num", title: n.experts.join(" ")},
      n.num_experts), el("td", {class: "num"}, Number(n.load).toFixed(3)), el("td", {class: "num"}, ago(n.last_seen_s)),
      el("td", {class: "num"}, duration(n.up_s)));
    body.append(row);
  }
}

function renderGrid(name, p) {
  const box = el("div");
  box.append(el("h3", {}, name + "  (" + p.grid.map(r => r[1] - r[0]).join(" \\u00d7 ") + ", " + p.alive + " alive)"));
  if (!p.grid.length) { box.append(el("div", {class: "muted"}, "no experts seen yet")); return box; }
  box.append(replicationLine(name, p));
  const dims = p.grid.map(r => r[1] - r[0]);
  const cols = dims[dims.length - 1];
  const rows = dims.slice(0, -1).reduce((a, b) => a * b, 1);
  const grid = el("div", {class: "grid", "data-prefix": name});
  grid.style.gridTemplateColumns = "auto repeat(" + cols + ", 14px)";
  for (let r = 0; r < rows; r++) {
    const head = [];  // row-major coordinates of all dimensions but the last
    let rest = r;
    for (let d = dims.length - 2; d >= 0; d--) {
      head.unshift(p.grid[d][0] + rest % dims[d]);
      rest = Math.floor(rest / dims[d]);
    }
    grid.append(el("div", {class: "rowlabel"}, head.join(".")));
    for (let c = 0; c < cols; c++) {
      const uid = [name, ...head, p.grid[dims.length - 1][0] + c].join(".");
      const replicas = (p.experts[uid] || []);
      const cls = "cell" + (replicas.length >= 3 ? " r3" : replicas.length ? " r" + replicas.length : "");
      grid.append(el("div", {class: cls, "data-uid": uid,
        title: uid + ": " + replicas.length + " replica(s) " + replicas.map(e => e.endpoint).join(" ")}));
    }
  }
  box.append(grid);
  const risky = renderAtRisk(name, p);
  if (risky) box.append(risky);
  return box;
}

function replicationLine(name, p) {
  const counts = {};
  for (const n of Object.values(p.replication)) counts[n] = (counts[n] || 0) + 1;
  const parts = Object.keys(counts).map(Number).sort((a, b) => a - b)
    .map(n => counts[n] + " with " + n + " holder" + (n === 1 ? "" : "s"));
  if (p.unserved.length) parts.push(p.unserved.length + " unserved");
  return el("div", {class: "muted replication", "data-prefix": name},
    "replication: " + (parts.join(", ") || "no experts"));
}

function renderAtRisk(name, p) {
  if (!p.at_risk.length) return null;
  const box = el("div", {class: "warn at-risk", "data-prefix": name},
    p.at_risk.length + " at risk (one holder): ");
  const shown = p.at_risk.slice(0, 50);
  for (const uid of shown) {
    const holder = (p.experts[uid] || [])[0];
    box.append(el("code", {class: "risky", "data-uid": uid, title: holder ? holder.endpoint : ""}, uid));
  }
  if (p.at_risk.length > shown.length) box.append("\u2026 and " + (p.at_risk.length - shown.length) + " more");
  return box;
}

function renderGone(status) {
  const box = document.getElementById("gone");
  box.replaceChildren();
  const {nodes, experts} = status.gone;
  if (!nodes.length && !experts.length) {
    box.textContent = "nothing in the last " + duration(status.gone.forget_after_s);
    return;
  }
  const list = el("ul", {class: "gone"});
  for (const g of nodes) {
    list.append(el("li", {}, "node " + g.id + " at " + g.endpoint + " (" + g.num_experts + " experts), "
      + ago(g.gone_s_ago)));
  }
  const shown = experts.slice(0, 50);
  for (const g of shown) list.append(el("li", {}, "expert " + g.id + ", " + ago(g.gone_s_ago)));
  if (experts.length > shown.length) {
    list.append(el("li", {}, "\\u2026 and " + (experts.length - shown.length) + " more experts"));
  }
  box.append(list);
}

function render(status) {
  document.getElementById("peer-id").textContent = status.coordinator.peer_id;
  document.getElementById("maddrs").textContent = (status.coordinator.dht || []).join("  ");
  const state = document.getElementById("state");
  state.className = status.counters.last_error && status.age_s > 3 * status.refresh_period_s ? "warn" : "muted";
  state.textContent = status.taken_at
    ? "view refreshed " + ago(status.age_s) + " (DHT lookups took "
      + (1000 * status.refresh_seconds).toFixed(0) + " ms)"
    : "waiting for the first DHT refresh";
  renderCards(status);
  renderNodes(status);
  const grids = document.getElementById("grids");
  grids.replaceChildren(...Object.entries(status.prefixes).map(([name, p]) => renderGrid(name, p)));
  if (!Object.keys(status.prefixes).length) grids.append(el("div", {class: "muted"}, "no grid prefixes seen yet"));
  renderGone(status);
  document.body.dataset.rendered = String(Date.now());
}

async function refresh() {
  try {
    const response = await fetch("/status", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
  } catch (err) {
    const state = document.getElementById("state");
    state.className = "warn";
    state.textContent = "cannot reach the coordinator (" + err.message + "); retrying";
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}
refresh();
</script>
</body>
</html>
"""
