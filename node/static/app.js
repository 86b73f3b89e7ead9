// The node's status page: fetch /status every few seconds and draw it.
// Plain DOM and inline SVG, no libraries (nodes run offline). Every value goes in
// through textContent, never as HTML: /status carries names that peers chose.
"use strict";

const REFRESH_MS = 3000;
const ROUNDS_SHOWN = 12;
const TERMINAL = new Set(["final", "aborted"]);
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function table(head, rows) {
  return el("table", {}, el("tr", {}, head.map((h) => el("th", {}, h))),
    rows.map((row) => el("tr", {}, row.map((cell) => el("td", {}, cell)))));
}

const num = (v, digits = 3) => (typeof v === "number" ? v.toFixed(digits) : "-");
const secs = (v) => (typeof v !== "number" ? "-" : v < 120 ? v.toFixed(1) + " s" : (v / 60).toFixed(1) + " min");
const mark = (text, cls) => el("span", { class: cls }, text);
const short = (hotkey) => (hotkey ? String(hotkey).slice(0, 8) + "…" : "-");

function namesOf(doc) {
  const names = {};
  for (const m of (doc.presence || {}).members || []) names[m.hotkey] = m.name || short(m.hotkey);
  if (doc.hotkey) names[doc.hotkey] = doc.name || "this node";
  return (hotkey) => names[hotkey] || short(hotkey);
}

function drawNode(doc) {
  $("title").textContent = `sealmesh ${doc.mesh_id || "?"}: ${doc.role || "?"} ${doc.name || ""}`;
  $("node").textContent = `hotkey ${doc.hotkey || "?"} · peer ${doc.peer_id || "-"} · up ${secs(doc.uptime_s)}` +
    ` · ${(doc.peers || []).length} peers connected`;
}

function drawProblems(doc) {
  const items = [];
  for (const p of doc.problems || []) {
    items.push(typeof p === "object" ? el("li", {}, p.problem, p.fix ? el("div", { class: "muted" }, "fix: " + p.fix) : null)
      : el("li", {}, p));
  }
  for (const [name, s] of Object.entries(doc.sections || {})) {
    for (const p of (s && s.problems) || []) items.push(el("li", {}, `${name}: ${p}`));
  }
  $("problems").replaceChildren(...(items.length ? [el("h2", {}, "Problems"), el("ul", {}, items)] : []));
}

function drawMembers(doc) {
  const presence = doc.presence || {};
  const connected = new Set(doc.peers || []);
  const rows = (presence.members || []).map((m) => [
    m.name || "?", (m.roles || []).join(", ") || "-",
    m.alive ? mark("alive", "ok") : m.last_seen_s == null ? mark("never heard", "bad") : mark("gone", "bad"),
    m.last_seen_s == null ? "-" : secs(m.last_seen_s) + " ago",
    m.peer_id ? (connected.has(m.peer_id) ? mark("connected", "ok") : mark("not connected", "warn")) : "-",
    el("span", { class: "mono" }, short(m.hotkey)),
  ]);
  const alive = (presence.members || []).filter((m) => m.alive).length;
  $("members").replaceChildren(
    el("p", {}, `${alive} of ${rows.length} others alive (window ${secs(presence.window_s)})`),
    table(["member", "roles", "state", "last seen", "reachable", "hotkey"], rows));
}

// Loss per round as one SVG: eval loss before (grey) and after (blue) each round.
function lossChart(rounds) {
  const points = rounds.filter((r) => typeof r.loss_after === "number");
  if (!points.length) return el("p", { class: "muted" }, "no evaluated round yet");
  const W = 440, H = 150, L = 44, B = 22, T = 8;
  const values = points.flatMap((r) => [r.loss_after, r.loss_before].filter((v) => typeof v === "number"));
  let lo = Math.min(...values), hi = Math.max(...values);
  if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
  const x = (i) => L + (points.length === 1 ? (W - L) / 2 : (i * (W - L - 10)) / (points.length - 1));
  const y = (v) => T + ((hi - v) * (H - T - B)) / (hi - lo);
  const chart = svg("svg", { width: W, height: H, role: "img", "aria-label": "eval loss per round" });
  chart.append(svg("line", { x1: L, y1: H - B, x2: W, y2: H - B, stroke: "#999" }),
    svg("text", { x: 2, y: y(hi) + 4 }, hi.toFixed(3)), svg("text", { x: 2, y: y(lo) + 4 }, lo.toFixed(3)));
  for (const [key, color] of [["loss_before", "#aab4be"], ["loss_after", "#1f6fb2"]]) {
    const pts = points.map((r, i) => (typeof r[key] === "number" ? `${x(i)},${y(r[key])}` : null)).filter(Boolean);
    chart.append(svg("polyline", { points: pts.join(" "), fill: "none", stroke: color, "stroke-width": 2 }));
    for (const p of pts) {
      const [cx, cy] = p.split(",");
      chart.append(svg("circle", { cx, cy, r: 3, fill: color }));
    }
  }
  points.forEach((r, i) => chart.append(svg("text", { x: x(i) - 4, y: H - 6 }, r.round)));
  return el("div", {}, chart, el("p", { class: "muted" }, "eval loss per round: grey before, blue after"));
}

function drawTraining(doc, name) {
  const s = (doc.sections || {}).training;
  if (!s) return $("training").replaceChildren(el("p", { class: "muted" }, "this node runs no rounds"));
  if (s.disabled) return $("training").replaceChildren(el("p", { class: "bad" }, "disabled: " + s.disabled));
  const rounds = (s.rounds || []).slice(-ROUNDS_SHOWN);
  const current = [...rounds].reverse().find((r) => !TERMINAL.has(r.phase));
  const head = current
    ? el("p", {}, `current round ${current.round}: phase `, mark(current.phase, "warn"),
      current.committee_phase ? `, committee ${current.committee_phase}` : "")
    : el("p", {}, rounds.length ? `no round open; last was round ${rounds[rounds.length - 1].round}` : "no round yet");
  const rows = rounds.slice().reverse().map((r) => [
    r.round, r.phase === "aborted" ? mark(`aborted ${r.abort_reason || ""}`, "bad") : r.phase,
    "contributors" in r ? (r.contributors || []).map(name).join(", ") || "none"
      : r.included == null ? "-" : r.included ? "included" : "not included",
    "loss_before" in r ? `${num(r.loss_before, 4)} → ${num(r.loss_after, 4)}` : `${num(r.first_loss, 4)} → ${num(r.last_loss, 4)}`,
    r.seconds && Object.keys(r.seconds).length ? secs(Object.values(r.seconds).reduce((a, b) => a + b, 0)) : "-",
  ]);
  $("training").replaceChildren(head, lossChart(rounds),
    table(["round", "phase", s.role === "validator" ? "contributors" : "contribution", "loss", "took"], rows));
}

function drawFhe(doc, name) {
  const s = (doc.sections || {}).fhe;
  if (!s) return $("fhe").replaceChildren(el("p", { class: "muted" }, "this node runs no FHE epochs"));
  if (s.role === "miner") {
    const total = (o) => Object.values(o || {}).reduce((a, b) => a + b, 0);
    return $("fhe").replaceChildren(el("p", {}, `miner of ${s.model || "-"}: ready ${s.ready ? "yes" : "no"}, ` +
      `served ${total(s.served)}, refused ${total(s.refused)}, keys ${s.keys || 0}`));
  }
  const failures = {};  // miner -> "class: count" of its failed challenges
  for (const o of s.outcomes || []) {
    if (o.outcome === "ok") continue;
    const key = o.error_reason ? `${o.outcome} (${o.error_reason})` : o.outcome;
    (failures[o.miner] = failures[o.miner] || {})[key] = ((failures[o.miner] || {})[key] || 0) + 1;
  }
  const rows = Object.entries(s.miners || {}).map(([miner, m]) => [
    name(miner), num(m.score), num(m.weight), m.challenges || 0, m.ok || 0, m.wrong || 0, m.timeout || 0, m.error || 0,
    secs(m.median_latency_s),
    Object.entries(failures[miner] || {}).map(([k, n]) => `${k}: ${n}`).join(", ") || "-",
  ]);
  const epochs = (s.epochs_done || []).map((e) => `${e.epoch} (${secs(e.seconds)})`).join(", ") || "none yet";
  $("fhe").replaceChildren(
    el("p", {}, `model ${s.model || "-"}; epochs done: ${epochs}${s.epochs ? ` of ${s.epochs}` : ""}`),
    rows.length ? table(["miner", "score", "weight", "challenges", "ok", "wrong", "timeout", "error", "median", "failures"], rows)
      : el("p", { class: "muted" }, "no miner scored yet"));
}

function drawHead(doc, name) {
  const s = (doc.sections || {}).settlement;
  if (!s) return $("head").replaceChildren(el("p", { class: "muted" }, "this node holds no head"));
  const balances = Object.entries(s.balances || {}).map(([k, v]) => [k === "reward_pool" ? k : name(k), v]);
  const records = (s.records || []).slice(-5).reverse().map((r) => [
    r.snapshot ?? "-", r.kind, r.round ?? r.epoch ?? "-",
    Object.entries(r.rewards || {}).map(([k, v]) => `${name(k)} +${v}`).join(", ") || "-",
  ]);
  $("head").replaceChildren(
    el("p", {}, `${s.backend || "embedded"} head: `, mark(s.state || "?", s.state === "Final" || s.state === "Open" ? "ok" : "warn"),
      `, snapshot ${s.snapshots_confirmed ?? 0} confirmed, ${s.pending_txs ?? 0} pending, conserved `,
      s.conserved ? mark("yes", "ok") : mark("no", "bad")),
    table(["account", "balance"], balances),
    el("h3", {}, "last snapshots"),
    records.length ? table(["snapshot", "record", "round/epoch", "rewards"], records) : el("p", { class: "muted" }, "none yet"));
}

async function refresh() {
  try {
    const response = await fetch("/status", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const doc = await response.json();
    const name = namesOf(doc);
    drawNode(doc);
    drawProblems(doc);
    drawMembers(doc);
    drawTraining(doc, name);
    drawFhe(doc, name);
    drawHead(doc, name);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) {
    $("updated").textContent = `could not read /status (${err.message}); retrying`;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
