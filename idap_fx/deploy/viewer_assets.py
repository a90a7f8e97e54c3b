"""The viewer page (HTML, CSS and a hand-written script) that ``idap_fx.visualize`` fills in.

``__TITLE__`` and ``__DATA__`` are replaced by the title and the JSON of
``visualize.viewer_data``. The script lays the graph out itself (layers by longest path,
barycentre ordering, dummy vertices for short skips, side arcs for long ones), draws SVG,
and handles pan/zoom, collapsing blocks, hover and the detail panel. It loads nothing.

Options in the URL fragment (used by the tests, handy for sharing a view):
``#collapse=none|blocks|depthN``, ``select=NODE``, ``group=GROUP_ID``, ``colour=group|plan``.
The page marks ``<body data-ready="1">`` once drawn, ``<svg data-rendered="N">`` with the
number of boxes (``data-render-ms`` how long layout and drawing took), and ``<html data-errors="...">`` if a script error happened.
"""

PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<script>
window.__idapErrors = [];
window.addEventListener("error", function (e) {
  window.__idapErrors.push(String(e.message || e));
  document.documentElement.setAttribute("data-errors", window.__idapErrors.join(" | "));
});
</script>
<style>
html,body{margin:0;height:100%;font:13px/1.35 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1d2330;background:#f6f7f9}
#app{display:grid;grid-template-columns:250px minmax(0,1fr) 370px;grid-template-rows:auto minmax(0,1fr);height:100vh}
header{grid-column:1/4;display:flex;gap:10px;align-items:center;padding:6px 10px;background:#fff;border-bottom:1px solid #d8dce3;flex-wrap:wrap}
header h1{font-size:14px;margin:0 8px 0 0;font-weight:600}
header button,header select,header input{font:inherit;padding:2px 6px}
#status{color:#5b6475;margin-left:auto}
#side{overflow:auto;border-right:1px solid #d8dce3;background:#fff;padding:6px 8px}
#side h3,#panel h3{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:#5b6475;margin:10px 0 4px}
#main{position:relative;overflow:hidden}
#panel{overflow:auto;border-left:1px solid #d8dce3;background:#fff;padding:8px 12px}
#panel h2{font-size:15px;margin:4px 0 6px;word-break:break-all}
svg#canvas{width:100%;height:100%;display:block;cursor:grab;background:#fbfbfc;user-select:none}
svg#canvas.dragging{cursor:grabbing}
.node{cursor:pointer}
.node rect.box{stroke:#4a5160;stroke-width:1}
.node.frozen rect.box{stroke-dasharray:5 3}
.node.boundary rect.box{stroke:#d0021b;stroke-width:3}
.node.block rect.box{stroke-width:2.2}
.node.block rect.shadow{fill:none;stroke:#4a5160;stroke-width:1}
.node.ingroup rect.box{stroke:#111;stroke-width:2.5}
.node.coupler rect.box{stroke:#111;stroke-width:3;stroke-dasharray:none}
.node.sel rect.box{stroke:#0b57d0;stroke-width:4;stroke-dasharray:none}
.node text{font-size:11px;fill:#1d2330;pointer-events:none}
.node text.sub{font-size:10px;fill:#3c4454}
.node .mark{fill:#111}
.dim{opacity:.16}
.edge{fill:none;stroke:#9aa3b2;stroke-width:1.2}
.edge.long{stroke-dasharray:3 3;opacity:.35}
.edge.hl{stroke:#1d2330;stroke-width:2.2;opacity:1}
.elabel{font-size:9px;fill:#5b6475}
#tip{position:absolute;pointer-events:none;background:rgba(20,24,33,.93);color:#fff;padding:6px 8px;border-radius:4px;font-size:12px;max-width:440px;display:none;white-space:pre-wrap;z-index:5}
#legend{position:absolute;left:8px;bottom:8px;background:rgba(255,255,255,.92);border:1px solid #d8dce3;border-radius:4px;padding:4px 8px;font-size:11px;color:#3c4454}
#legend span.k{display:inline-block;width:18px;height:10px;border:1px solid #4a5160;vertical-align:middle;margin:0 3px 0 8px;background:#fff}
.glist{list-style:none;margin:0;padding:0}
.glist li{padding:2px 3px;cursor:pointer;display:flex;gap:6px;align-items:center;border-radius:3px}
.glist li:hover,.glist li.on{background:#eef2fb}
.glist .id{flex:1;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.sw{display:inline-block;width:12px;height:12px;border:1px solid #4a5160;border-radius:2px;flex:none;vertical-align:middle}
.small{color:#5b6475;font-size:11px}
.card{border:1px solid #d8dce3;border-radius:5px;padding:6px 8px;margin:6px 0}
.card .title{font-weight:600;word-break:break-all}
.bad{color:#b3261e}.good{color:#1e7d32}
.warn{background:#fdecea;border:1px solid #f3b8b3;border-radius:4px;padding:4px 6px;margin:4px 0}
a.ln{color:#0b57d0;cursor:pointer;text-decoration:none;word-break:break-all}
a.ln:hover{text-decoration:underline}
table.kv{border-collapse:collapse;width:100%}
table.kv td{padding:1px 4px 1px 0;vertical-align:top;overflow-wrap:anywhere}
table.kv td:first-child{color:#5b6475;white-space:nowrap;width:1%}
ul.plain{margin:2px 0;padding-left:16px}
</style></head>
<body>
<div id="app">
<header>
  <h1>__TITLE__</h1>
  <button id="fit" title="fit the graph (key f)">Fit</button>
  <button id="zin" title="zoom in (+)">+</button><button id="zout" title="zoom out (-)">&minus;</button>
  <label>Collapse <select id="collapse"></select></label>
  <label>Colour <select id="colour"><option value="group">by channel group</option><option value="plan">by plan (share removed)</option></select></label>
  <input id="search" placeholder="find node or group, Enter" list="names" size="26">
  <datalist id="names"></datalist>
  <span id="status"></span>
</header>
<aside id="side"></aside>
<div id="main">
  <svg id="canvas" xmlns="http://www.w3.org/2000/svg">
    <defs><marker id="arrow" viewBox="0 0 8 8" refX="7" refY="4" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L8,4 L0,8 z" fill="#9aa3b2"></path></marker></defs>
    <g id="vp"><g id="edges"></g><g id="nodes"></g></g>
  </svg>
  <div id="tip"></div>
  <div id="legend"></div>
</div>
<section id="panel"></section>
</div>
<script type="application/json" id="idap-data">__DATA__</script>
<script>
(function () {
"use strict";
var D = JSON.parse(document.getElementById("idap-data").textContent);
var NS = "http://www.w3.org/2000/svg";
var nodes = D.nodes, groups = D.groups, blocks = D.blocks;
var nodeIdx = new Map(nodes.map(function (n, i) { return [n.name, i]; }));
var groupById = new Map(groups.map(function (g) { return [g.id, g]; }));
var inputs = nodes.map(function () { return []; }), users = nodes.map(function () { return []; });
D.edges.forEach(function (e) { inputs[e[1]].push(e[0]); users[e[0]].push(e[1]); });
var NODE_W = 176, NODE_H = 40, SMALL_W = 124, SMALL_H = 28, BLOCK_W = 214, BLOCK_H = 56, DUMMY_W = 14;
var GAP_X = 26, GAP_Y = 30, MAX_SPAN = 10;

var svg = document.getElementById("canvas"), vp = document.getElementById("vp");
var edgesG = document.getElementById("edges"), nodesG = document.getElementById("nodes");
var tip = document.getElementById("tip"), panel = document.getElementById("panel"), side = document.getElementById("side");
var collapsed = new Set(), colourMode = "group", selected = null, view = {x: 0, y: 0, k: 1}, L = null;

function svgEl(tag, attrs, parent) {
  var e = document.createElementNS(NS, tag);
  for (var k in attrs) e.setAttribute(k, attrs[k]);
  if (parent) parent.appendChild(e);
  return e;
}
function h(tag, cls, text) {
  var e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = text;
  return e;
}
function clip(s, n) { return s.length > n ? s.slice(0, Math.ceil(n / 2) - 1) + "\u2026" + s.slice(s.length - Math.floor(n / 2)) : s; }
function pct(a, b) { return b ? Math.round(100 * a / b) + "%" : "0%"; }

// ---- what a box stands for -------------------------------------------------------------
function repOf(i) {
  var ch = nodes[i].chain;
  for (var j = 0; j < ch.length; j++) if (collapsed.has(ch[j])) return "b" + ch[j];
  return "n" + i;
}
function unitMembers(u) { return u.kind === "block" ? u.members : [u.idx]; }
function isSmall(n) { return !n.group && !n.owns.length && !n.shape.length; }
function buildUnits() {
  var byKey = new Map(), list = [];
  nodes.forEach(function (n, i) {
    var key = repOf(i), u = byKey.get(key);
    if (!u) {
      var block = key[0] === "b";
      u = {key: key, kind: block ? "block" : "node", idx: +key.slice(1), members: [], order: i};
      if (block) { u.w = BLOCK_W; u.h = BLOCK_H; }
      else if (isSmall(n)) { u.w = SMALL_W; u.h = SMALL_H; }
      else { u.w = NODE_W; u.h = NODE_H; }
      byKey.set(key, u); list.push(u);
    }
    u.members.push(i);
  });
  list.sort(function (a, b) { return a.order - b.order; });
  list.forEach(function (u, j) { u.pos = j; });
  var seen = new Map();
  D.edges.forEach(function (e) {
    var a = byKey.get(repOf(e[0])), b = byKey.get(repOf(e[1]));
    if (a === b) return;
    if (a.pos > b.pos) { var t = a; a = b; b = t; }
    var key = a.pos + ">" + b.pos;
    if (!seen.has(key)) seen.set(key, {s: a, t: b, label: e[2] || null});
  });
  return {units: list, edges: Array.from(seen.values()), byKey: byKey};
}

// ---- layered layout --------------------------------------------------------------------
function layoutGraph(U) {
  var units = U.units, n = units.length, rank = new Array(n).fill(0), preds = units.map(function () { return []; });
  U.edges.forEach(function (e) { preds[e.t.pos].push(e.s.pos); });
  // the coupling view has few edges: keep graph order top to bottom so it does not spread into one row
  if (D.mode === "coupling") for (var c = 1; c < n; c++) preds[c].push(c - 1);
  for (var v = 0; v < n; v++) preds[v].forEach(function (u) { rank[v] = Math.max(rank[v], rank[u] + 1); });
  var nR = 0; rank.forEach(function (r) { nR = Math.max(nR, r + 1); });
  var V = units.map(function (u, i) { return {unit: u, r: rank[i], w: u.w, h: u.h, up: [], down: [], order: i}; });
  function link(a, b) { V[a].down.push(b); V[b].up.push(a); }
  // a skip edge gets dummy vertices (its own lane) unless it is very long or its source fans out
  // to many later nodes (DenseNet): those are drawn as arcs to the right instead
  var fan = units.map(function () { return 0; });
  U.edges.forEach(function (e) { if (rank[e.t.pos] - rank[e.s.pos] > 1) fan[e.s.pos]++; });
  U.edges.forEach(function (e) {
    var a = e.s.pos, b = e.t.pos, span = rank[b] - rank[a];
    e.chain = [a];
    e.long = span > MAX_SPAN || (span > 1 && fan[a] > 2);
    if (e.long) { e.chain.push(b); return; }
    var prev = a;
    for (var r = rank[a] + 1; r < rank[b]; r++) {
      var d = V.length;
      V.push({unit: null, r: r, w: DUMMY_W, h: 0, up: [], down: [], order: a + 0.5});
      link(prev, d); e.chain.push(d); prev = d;
    }
    link(prev, b); e.chain.push(b);
  });
  var layers = [];
  for (var r = 0; r < nR; r++) layers.push([]);
  V.forEach(function (x, i) { layers[x.r].push(i); });
  layers.forEach(function (layer) {
    layer.sort(function (a, b) { return V[a].order - V[b].order; });
    layer.forEach(function (x, i) { V[x].i = i; });
  });
  for (var it = 0; it < 8; it++) {
    var down = it % 2 === 0;
    for (var k = 1; k < nR; k++) {
      var rr = down ? k : nR - 1 - k;
      var layer = layers[rr];
      var keyed = layer.map(function (x) {
        var nb = down ? V[x].up : V[x].down;
        if (!nb.length) return [V[x].i, V[x].i, x];
        var s = 0; nb.forEach(function (u) { s += V[u].i; });
        return [s / nb.length, V[x].i, x];
      });
      keyed.sort(function (a, b) { return a[0] - b[0] || a[1] - b[1]; });
      layers[rr] = keyed.map(function (q) { return q[2]; });
      layers[rr].forEach(function (x, i) { V[x].i = i; });
    }
  }
  function sep(a, b) { return (V[a].w + V[b].w) / 2 + GAP_X; }
  function pack(layer, want) {
    var m = layer.length, lft = want.slice(), rgt = want.slice(), i;
    for (i = 1; i < m; i++) lft[i] = Math.max(lft[i], lft[i - 1] + sep(layer[i - 1], layer[i]));
    for (i = m - 2; i >= 0; i--) rgt[i] = Math.min(rgt[i], rgt[i + 1] - sep(layer[i], layer[i + 1]));
    var xs = want.map(function (_, j) { return (lft[j] + rgt[j]) / 2; });
    for (i = 1; i < m; i++) xs[i] = Math.max(xs[i], xs[i - 1] + sep(layer[i - 1], layer[i]));
    layer.forEach(function (x, j) { V[x].x = xs[j]; });
  }
  layers.forEach(function (layer) { pack(layer, layer.map(function () { return 0; })); });
  for (it = 0; it < 16; it++) {
    down = it % 2 === 0;
    for (k = 0; k < nR; k++) {
      rr = down ? k : nR - 1 - k;
      layer = layers[rr];
      pack(layer, layer.map(function (x) {
        var nb = V[x].up.concat(V[x].down);
        if (!nb.length) return V[x].x;
        var s = 0; nb.forEach(function (u) { s += V[u].x; });
        return s / nb.length;
      }));
    }
  }
  var y = 0, right = [];
  layers.forEach(function (layer, r) {
    var hmax = 0, xr = -Infinity;
    layer.forEach(function (x) { hmax = Math.max(hmax, V[x].h); xr = Math.max(xr, V[x].x + V[x].w / 2); });
    layer.forEach(function (x) { V[x].y = y + hmax / 2; });
    right[r] = xr;
    y += (hmax || 10) + GAP_Y;
  });
  var minX = Infinity, maxX = -Infinity, maxY = 0;
  V.forEach(function (x) { minX = Math.min(minX, x.x - x.w / 2); maxX = Math.max(maxX, x.x + x.w / 2); maxY = Math.max(maxY, x.y + x.h / 2); });
  U.edges.forEach(function (e, j) {
    if (!e.long) return;
    var a = V[e.chain[0]], b = V[e.chain[1]], xr = -Infinity;
    for (var q = a.r; q <= b.r; q++) xr = Math.max(xr, right[q]);
    e.lane = xr + 24 + (j % 6) * 7;
    maxX = Math.max(maxX, e.lane + 10);
  });
  return {V: V, U: U, box: {x: minX - 20, y: -20, w: maxX - minX + 40, h: maxY + 40}};
}

// ---- colours ---------------------------------------------------------------------------
function mix(a, b, t) {
  var pa = [1, 3, 5].map(function (i) { return parseInt(a.substr(i, 2), 16); });
  var pb = [1, 3, 5].map(function (i) { return parseInt(b.substr(i, 2), 16); });
  return "#" + pa.map(function (c, i) { return Math.round(c + (pb[i] - c) * t).toString(16).padStart(2, "0"); }).join("");
}
function fillOf(gid) {
  if (!gid) return "#ffffff";
  var g = groupById.get(gid);
  if (colourMode === "plan") {
    if (!g.prunable) return "#e3e5e9";
    var share = g.removed ? g.removed.length / g.size : 0;
    return mix("#f4f8ff", "#d7301f", Math.min(1, share * 1.6));
  }
  return g.colour;
}
function blockGroups(members) {
  var out = [];
  members.forEach(function (i) { var g = nodes[i].group; if (g && out.indexOf(g) < 0) out.push(g); });
  return out;
}
function blockExit(members) {
  var inside = new Set(members), exit = members[members.length - 1];
  members.forEach(function (i) { if (users[i].some(function (u) { return !inside.has(u); })) exit = i; });
  return exit;
}

// ---- drawing ---------------------------------------------------------------------------
function render() {
  var t0 = performance.now();
  var U = buildUnits();
  L = layoutGraph(U);
  edgesG.textContent = ""; nodesG.textContent = "";
  var V = L.V;
  U.edges.forEach(function (e) {
    var pts = e.chain.map(function (x) { return V[x]; });
    var s = pts[0], t = pts[pts.length - 1], d;
    if (e.long) {
      var y0 = s.y, y1 = t.y;
      d = "M" + (s.x + s.w / 2) + "," + y0 + " C" + e.lane + "," + y0 + " " + e.lane + "," + y1 + " " + (t.x + t.w / 2) + "," + y1;
    } else {
      var p = pts.map(function (x, j) { return {x: x.x, y: j === 0 ? x.y + x.h / 2 : (j === pts.length - 1 ? x.y - x.h / 2 : x.y)}; });
      d = "M" + p[0].x + "," + p[0].y;
      for (var j = 1; j < p.length; j++) {
        var my = (p[j - 1].y + p[j].y) / 2;
        d += " C" + p[j - 1].x + "," + my + " " + p[j].x + "," + my + " " + p[j].x + "," + p[j].y;
      }
    }
    var path = svgEl("path", {d: d, "class": "edge" + (e.long ? " long" : ""), "marker-end": "url(#arrow)"}, edgesG);
    path.__e = e;
    e.el = path;
    if (e.label) {
      var mid = pts[Math.floor(pts.length / 2)];
      svgEl("text", {x: mid.x + 6, y: mid.y - (pts.length > 2 ? 0 : 12), "class": "elabel"}, edgesG).textContent = clip(e.label, 40);
    }
  });
  var count = 0;
  V.forEach(function (v) { if (v.unit) { drawUnit(v.unit, v); count++; } });
  svg.setAttribute("data-rendered", String(count));
  svg.setAttribute("data-render-ms", String(Math.round(performance.now() - t0)));
  var prunable = groups.filter(function (g) { return g.prunable; }).length;
  document.getElementById("status").textContent = count + " boxes \u00b7 " + nodes.length + " nodes \u00b7 " +
    groups.length + " groups (" + prunable + " prunable) \u00b7 " + Object.keys(D.boundaries).length + " boundaries";
  applyHighlight();
}
function drawUnit(u, v) {
  var g = svgEl("g", {transform: "translate(" + (v.x - v.w / 2) + "," + (v.y - v.h / 2) + ")"}, nodesG);
  u.el = g; g.__u = u;
  var cls = ["node"];
  if (u.kind === "block") {
    var b = blocks[u.idx], members = u.members, exit = nodes[blockExit(members)];
    g.setAttribute("data-block", b.path);
    g.setAttribute("data-group", exit.group || "");
    cls.push("block");
    svgEl("rect", {x: 4, y: 4, width: v.w, height: v.h, rx: 6, "class": "shadow"}, g);
    svgEl("rect", {width: v.w, height: v.h, rx: 6, fill: fillOf(exit.group), "class": "box"}, g);
    svgEl("text", {x: 8, y: 15}, g).textContent = "\u25b8 " + clip(b.path, 30);
    var shape = exit.after && exit.after[0] ? exit.after[0] : exit.shape[0] || "";
    svgEl("text", {x: 8, y: 29, "class": "sub"}, g).textContent = clip(b.type + " \u00b7 " + members.length + " nodes \u00b7 " + shape, 38);
    blockGroups(members).slice(0, 14).forEach(function (gid, j) {
      svgEl("rect", {x: 8 + j * 14, y: 37, width: 11, height: 11, rx: 2, fill: fillOf(gid), stroke: "#4a5160", "stroke-width": 0.6}, g);
    });
    if (members.some(function (i) { return nodes[i].boundary; })) cls.push("boundary");
  } else {
    var n = nodes[u.idx], grp = n.group ? groupById.get(n.group) : null;
    g.setAttribute("data-name", n.name);
    g.setAttribute("data-group", n.group || "");
    if (grp && !grp.prunable) cls.push("frozen");
    if (n.boundary) cls.push("boundary");
    svgEl("rect", {width: v.w, height: v.h, rx: 5, fill: fillOf(n.group), "class": "box"}, g);
    var outs = [];
    n.groups.forEach(function (e) { if (outs.indexOf(e[0]) < 0) outs.push(e[0]); });
    if (outs.length > 1) {
      var sw = (v.w - 10) / Math.min(outs.length, 24);
      outs.slice(0, 24).forEach(function (gid, j) { svgEl("rect", {x: 5 + j * sw, y: v.h - 6, width: sw, height: 4, fill: fillOf(gid)}, g); });
    }
    var inner = n.owns.filter(function (gid) { return outs.indexOf(gid) < 0; });
    if (inner.length) svgEl("rect", {x: 0, y: 0, width: 6, height: v.h, rx: 2, fill: fillOf(inner[0]), stroke: "#4a5160", "stroke-width": 0.6}, g);
    if (n.couples.length) svgEl("path", {d: "M" + (v.w - 12) + ",2 l5,5 l-5,5 l-5,-5 z", "class": "mark"}, g);
    if (isSmall(n)) {
      svgEl("text", {x: 8, y: 18, "class": "sub"}, g).textContent = clip(n.kind + " " + n.name, 20);
    } else {
      svgEl("text", {x: 9, y: 15}, g).textContent = clip(n.kind + "  " + (n.shape[0] || ""), 30);
      var after = n.after && n.after[0] && n.after[0] !== n.shape[0] ? "\u2192 " + n.after[0] + "  " : "";
      svgEl("text", {x: 9, y: 30, "class": "sub"}, g).textContent = clip(after + n.name, 30);
    }
  }
  g.setAttribute("class", cls.join(" "));
  g.addEventListener("mouseenter", function (ev) { showTip(u, ev); });
  g.addEventListener("mousemove", moveTip);
  g.addEventListener("mouseleave", function () { tip.style.display = "none"; });
  g.addEventListener("click", function (ev) { if (!drag.moved) { ev.stopPropagation(); select(u.kind === "block" ? {kind: "block", key: u.idx} : {kind: "node", key: u.idx}); } });
  g.addEventListener("dblclick", function (ev) { ev.stopPropagation(); if (u.kind === "block") { collapsed.delete(u.idx); render(); } });
}

// ---- hover -----------------------------------------------------------------------------
function groupLine(gid) {
  var g = groupById.get(gid);
  var s = "group " + gid + ": " + g.size + " units, " + g.channels + " channels, " + (g.prunable ? "prunable" : "frozen (" + g.frozen_reason + ")");
  if (g.removed) s += "\n  plan removes " + g.removed.length + "/" + g.size + " units";
  return s;
}
function showTip(u, ev) {
  var lines;
  if (u.kind === "block") {
    var b = blocks[u.idx];
    lines = [b.path + " (" + b.type + "), " + u.members.length + " nodes, collapsed", "groups inside: " + blockGroups(u.members).length, "double-click to expand"];
  } else {
    var n = nodes[u.idx];
    lines = [n.name + "  [" + n.op + "] " + n.target];
    if (n.shape.length) lines.push("shape " + n.shape.join(", ") + (n.after && n.after.join() !== n.shape.join() ? "  \u2192  " + n.after.join(", ") : ""));
    if (n.group) lines.push(groupLine(n.group));
    if (n.couples.length) lines.push("couples channels of: " + n.couples.join(", "));
    if (n.boundary) lines.push("BOUNDARY: " + n.boundary);
  }
  tip.textContent = lines.join("\n");
  tip.style.display = "block";
  moveTip(ev);
}
function moveTip(ev) {
  var r = document.getElementById("main").getBoundingClientRect();
  tip.style.left = Math.min(ev.clientX - r.left + 14, r.width - 300) + "px";
  tip.style.top = (ev.clientY - r.top + 14) + "px";
}

// ---- selection & highlight -------------------------------------------------------------
function inGroup(i, gid) {
  var n = nodes[i];
  return n.group === gid || n.owns.indexOf(gid) >= 0 || n.groups.some(function (e) { return e[0] === gid; });
}
function applyHighlight() {
  if (!L) return;
  var gid = selected && selected.kind === "group" ? selected.key : null;
  var couplers = gid ? new Set(groupById.get(gid).couplers) : null;
  L.V.forEach(function (v) {
    if (!v.unit || !v.unit.el) return;
    var u = v.unit, el = u.el, members = unitMembers(u);
    var isSel = selected && ((selected.kind === "node" && u.kind === "node" && u.idx === selected.key) ||
      (selected.kind === "block" && u.kind === "block" && u.idx === selected.key));
    el.classList.toggle("sel", !!isSel);
    var hit = gid ? members.some(function (i) { return inGroup(i, gid); }) : false;
    var coup = gid ? members.some(function (i) { return couplers.has(nodes[i].name); }) : false;
    el.classList.toggle("ingroup", hit);
    el.classList.toggle("coupler", coup);
    el.classList.toggle("dim", !!gid && !hit && !coup);
  });
  var selUnit = selected && selected.kind !== "group" ? selected : null;
  L.U.edges.forEach(function (e) {
    var on = false;
    if (selUnit) on = [e.s, e.t].some(function (u) { return (selUnit.kind === "node" ? u.kind === "node" : u.kind === "block") && u.idx === selUnit.key; });
    e.el.classList.toggle("hl", on);
    e.el.classList.toggle("dim", !!gid);
  });
  Array.prototype.forEach.call(side.querySelectorAll("li[data-gid]"), function (li) { li.classList.toggle("on", li.getAttribute("data-gid") === gid); });
}
function select(sel) {
  selected = sel;
  applyHighlight();
  showPanel();
}
function findUnit(i) {
  var key = repOf(i);
  return L.V.filter(function (v) { return v.unit && v.unit.key === key; })[0];
}
function reveal(i) {
  nodes[i].chain.forEach(function (b) { collapsed.delete(b); });
  render();
  var v = findUnit(i);
  var r = svg.getBoundingClientRect();
  view.k = Math.max(view.k, 0.8);
  view.x = r.width / 2 - v.x * view.k; view.y = r.height / 2 - v.y * view.k;
  applyView();
  select({kind: "node", key: i});
}
function nodeLink(name) {
  if (!nodeIdx.has(name)) return document.createTextNode(name);
  var a = h("a", "ln", name);
  a.addEventListener("click", function () { reveal(nodeIdx.get(name)); });
  return a;
}
function groupLink(gid) {
  var span = h("span");
  var sw = h("span", "sw"); sw.style.background = fillOf(gid);
  var a = h("a", "ln", " " + gid);
  a.addEventListener("click", function () { select({kind: "group", key: gid}); });
  span.appendChild(sw); span.appendChild(a);
  return span;
}
function linkify(text) {
  var frag = document.createDocumentFragment(), re = /[A-Za-z_][A-Za-z0-9_]*/g, last = 0, m;
  while ((m = re.exec(text))) {
    if (!nodeIdx.has(m[0])) continue;
    frag.appendChild(document.createTextNode(text.slice(last, m.index)));
    frag.appendChild(nodeLink(m[0]));
    last = m.index + m[0].length;
  }
  frag.appendChild(document.createTextNode(text.slice(last)));
  return frag;
}
function kv(table, key, value) {
  var tr = h("tr"), td = h("td", null, key), tv = h("td");
  if (typeof value === "string") tv.textContent = value; else tv.appendChild(value);
  tr.appendChild(td); tr.appendChild(tv); table.appendChild(tr);
}
function nodeList(idxs, limit) {
  var span = h("span");
  idxs.slice(0, limit).forEach(function (i, j) { if (j) span.appendChild(document.createTextNode(", ")); span.appendChild(nodeLink(nodes[i].name)); });
  if (idxs.length > limit) span.appendChild(document.createTextNode(" +" + (idxs.length - limit) + " more"));
  if (!idxs.length) span.textContent = "\u2014";
  return span;
}
function scoreChart(g) {
  var vals = g.scores.map(function (s, i) { return {s: s === null ? Infinity : s, i: i}; });
  vals.sort(function (a, b) { return a.s - b.s; });
  var finite = vals.filter(function (v) { return isFinite(v.s); }).map(function (v) { return v.s; });
  var lo = finite.length ? Math.min(0, finite[0]) : 0, hi = finite.length ? finite[finite.length - 1] : 1;
  var W = 330, H = 70, gone = new Set(g.removed || []);
  var s = svgEl("svg", {width: W, height: H + 4, "class": "scores"});
  var bw = W / vals.length;
  vals.forEach(function (v, j) {
    var val = isFinite(v.s) ? v.s : hi, hh = hi > lo ? Math.max(1, (val - lo) / (hi - lo) * H) : H / 2;
    svgEl("rect", {x: j * bw, y: H - hh, width: Math.max(bw - (bw > 3 ? 1 : 0), 0.5), height: hh, fill: gone.has(v.i) ? "#d7301f" : "#7a8699"}, s);
  });
  svgEl("line", {x1: 0, y1: H + 0.5, x2: W, y2: H + 0.5, stroke: "#4a5160"}, s);
  var wrap = h("div");
  wrap.appendChild(s);
  var mid = finite.length ? finite[Math.floor(finite.length / 2)] : NaN;
  var fmt = function (x) { return isFinite(x) ? Number(x).toPrecision(3) : "inf"; };
  wrap.appendChild(h("div", "small", "units sorted by score (low = pruned first)" + (g.removed ? "; red = removed by the plan" : "") +
    ". min " + fmt(finite[0]) + ", median " + fmt(mid) + ", max " + fmt(hi) + (finite.length < vals.length ? ", " + (vals.length - finite.length) + " inf" : "")));
  return wrap;
}
function groupCard(gid, role) {
  var g = groupById.get(gid), card = h("div", "card");
  var t = h("div", "title"); t.appendChild(groupLink(gid));
  if (role) t.appendChild(h("span", "small", "  (" + role + ")"));
  card.appendChild(t);
  var tb = h("table", "kv");
  kv(tb, "units", g.size + " (" + g.channels + " channels)");
  var st = h("span", g.prunable ? "good" : "bad");
  if (g.prunable) st.textContent = "prunable"; else { st.textContent = "frozen: "; st.appendChild(linkify(g.frozen_reason || "")); }
  kv(tb, "status", st);
  if (!g.exact) kv(tb, "exact", linkify("no: " + g.inexact_reason));
  if (g.pinned_reason) kv(tb, "pinned", linkify("channels in no unit, always kept: " + g.pinned_reason));
  if (g.removed) kv(tb, "plan", g.removed.length ? "removes " + g.removed.length + " of " + g.size + " units (" + pct(g.removed.length, g.size) + "), " + g.removed_channels + " channels" : "nothing removed");
  if (g.parts.length) kv(tb, "parts", g.parts.join("; "));
  card.appendChild(tb);
  if (g.scores) card.appendChild(scoreChart(g));
  if (g.couplings.length) {
    card.appendChild(h("div", "small", "coupled by (" + g.couplings.length + "):"));
    var ul = h("ul", "plain");
    g.couplings.slice(0, 24).forEach(function (c) {
      var li = h("li");
      li.appendChild(linkify(c[0] + " \u21c4 " + c[1] + " via " + c[2].join(", ")));
      ul.appendChild(li);
    });
    if (g.couplings.length > 24) ul.appendChild(h("li", "small", "+" + (g.couplings.length - 24) + " more"));
    card.appendChild(ul);
  } else {
    card.appendChild(h("div", "small", "one producer: no op couples it to another layer"));
  }
  var mem = h("div", "small", "members (" + g.members.length + "): ");
  g.members.slice(0, 10).forEach(function (m, j) {
    if (j) mem.appendChild(document.createTextNode("; "));
    mem.appendChild(nodeLink(m[0]));
    mem.appendChild(document.createTextNode(" " + m[1] + " dim " + m[2] + " " + m[3]));
  });
  if (g.members.length > 10) mem.appendChild(document.createTextNode(" +" + (g.members.length - 10) + " more"));
  card.appendChild(mem);
  return card;
}
function showPanel() {
  panel.textContent = "";
  if (!selected) { panel.appendChild(overview()); return; }
  if (selected.kind === "group") {
    panel.appendChild(h("h2", null, "group " + selected.key));
    var gm = nodes.map(function (_, i) { return i; }).filter(function (i) { return inGroup(i, selected.key); });
    panel.appendChild(groupCard(selected.key, null));
    var p = h("div"); p.appendChild(h("h3", null, "nodes carrying it (" + gm.length + ")")); p.appendChild(nodeList(gm, 60));
    panel.appendChild(p);
    return;
  }
  if (selected.kind === "block") {
    var b = blocks[selected.key];
    panel.appendChild(h("h2", null, b.path));
    var tb = h("table", "kv");
    kv(tb, "module", b.type);
    kv(tb, "nodes", nodeList(b.nodes, 80));
    panel.appendChild(tb);
    var btn = h("button", null, "Expand block");
    btn.addEventListener("click", function () { collapsed.delete(selected.key); render(); });
    panel.appendChild(btn);
    panel.appendChild(h("h3", null, "groups inside"));
    blockGroups(b.nodes).forEach(function (gid) { panel.appendChild(groupCard(gid, null)); });
    return;
  }
  var i = selected.key, n = nodes[i];
  panel.appendChild(h("h2", null, n.name));
  tb = h("table", "kv");
  kv(tb, "op", n.op + (n.module ? " (" + n.module + ")" : ""));
  kv(tb, "target", n.target);
  if (n.shape.length) kv(tb, "shape", n.shape.join(", "));
  if (n.after) kv(tb, "after plan", n.after.join(", "));
  if (n.groups.length) kv(tb, "output dims", n.groups.map(function (e) { return "dim " + e[1].join("+") + ": " + e[0]; }).join("; "));
  kv(tb, "inputs", nodeList(inputs[i], 12));
  kv(tb, "users", nodeList(users[i], 12));
  if (n.chain.length) {
    var bl = h("span");
    n.chain.forEach(function (bi, j) {
      if (j) bl.appendChild(document.createTextNode(" \u203a "));
      var a = h("a", "ln", blocks[bi].path);
      a.title = "collapse this block";
      a.addEventListener("click", function () { collapsed.add(bi); render(); select({kind: "block", key: bi}); });
      bl.appendChild(a);
    });
    kv(tb, "in blocks", bl);
  }
  panel.appendChild(tb);
  if (n.boundary) { var w = h("div", "warn"); w.appendChild(h("b", null, "Boundary: ")); w.appendChild(linkify(n.boundary)); panel.appendChild(w); }
  if (n.couples.length) {
    var c = h("div", "card");
    c.appendChild(h("div", "title", "This op couples channels"));
    n.couples.forEach(function (gid) {
      groupById.get(gid).couplings.filter(function (cp) { return cp[2].some(function (r) { return r.split(/[:\s]/)[0] === n.name; }); }).forEach(function (cp) {
        var d = h("div", "small"); d.appendChild(linkify(cp[0] + " \u21c4 " + cp[1] + " (group " + gid + ")")); c.appendChild(d);
      });
    });
    panel.appendChild(c);
  }
  var shown = [];
  function card(gid, role) { if (shown.indexOf(gid) < 0) { shown.push(gid); panel.appendChild(groupCard(gid, role)); } }
  n.groups.forEach(function (e) { card(e[0], "output"); });
  n.owns.forEach(function (gid) { card(gid, "its parameters"); });
  n.reads.forEach(function (gid) { card(gid, "input channels it reads"); });
  if (!shown.length) panel.appendChild(h("div", "small", "carries no channel group (a size, a flag, or a tensor no parameter sees)"));
}
function overview() {
  var d = h("div");
  d.appendChild(h("h2", null, D.title));
  d.appendChild(h("div", "small", "Click a box for its shapes, groups and why they are coupled; click a group on the left to highlight every node that carries it (coupling ops get a black border). Drag to pan, wheel to zoom, double-click a block to expand it."));
  if (D.mode === "coupling") d.appendChild(h("div", "warn", "Coupling view: built from a DependencyGraph alone, so edges are couplings (labelled by the ops), not data flow. Pass the GraphModule too for the full graph."));
  var b = Object.keys(D.boundaries);
  d.appendChild(h("h3", null, "boundaries (" + b.length + ")"));
  if (!b.length) d.appendChild(h("div", "small", "none: the analyzer knew every op"));
  b.forEach(function (k) { var w = h("div", "warn"); w.appendChild(nodeLink(k)); w.appendChild(document.createTextNode(": " + D.boundaries[k])); d.appendChild(w); });
  if (D.has_plan) {
    var gone = 0, tot = 0;
    groups.forEach(function (g) { if (g.prunable) { tot += g.size; gone += g.removed.length; } });
    d.appendChild(h("h3", null, "plan"));
    d.appendChild(h("div", null, "removes " + gone + " of " + tot + " prunable units (" + pct(gone, tot) + ") in " + groups.filter(function (g) { return g.removed && g.removed.length; }).length + " groups"));
  }
  return d;
}
function sideList() {
  side.textContent = "";
  side.appendChild(h("h3", null, "groups (" + groups.length + ")"));
  var ul = h("ul", "glist");
  groups.forEach(function (g) {
    var li = h("li"); li.setAttribute("data-gid", g.id); li.title = g.id + (g.prunable ? ": prunable" : ": frozen, " + g.frozen_reason);
    var sw = h("span", "sw"); sw.style.background = g.colour;
    li.appendChild(sw);
    li.appendChild(h("span", "id", clip(g.id, 26)));
    var extra = g.removed && g.removed.length ? "\u2212" + g.removed.length + "/" : "";
    li.appendChild(h("span", "small " + (g.prunable ? "" : "bad"), extra + g.size + (g.prunable ? "" : " \u2744")));
    li.addEventListener("click", function () { select(selected && selected.kind === "group" && selected.key === g.id ? null : {kind: "group", key: g.id}); });
    ul.appendChild(li);
  });
  side.appendChild(ul);
}
function legend() {
  var lg = document.getElementById("legend");
  lg.innerHTML = "fill = channel group of the output" + (colourMode === "plan" ? " (here: share the plan removes)" : "") +
    '<span class="k" style="border-style:dashed"></span>frozen<span class="k" style="border:3px solid #d0021b"></span>boundary' +
    '<span class="k" style="border-width:2px;box-shadow:3px 3px 0 #4a5160"></span>collapsed block \u25c6 couples groups';
}

// ---- pan / zoom ------------------------------------------------------------------------
function applyView() { vp.setAttribute("transform", "translate(" + view.x + "," + view.y + ") scale(" + view.k + ")"); }
function fit(initial) {
  var r = svg.getBoundingClientRect(), b = L.box;
  var k = Math.min(r.width / b.w, r.height / b.h);
  if (initial && k < 0.75) {
    k = Math.min(0.85, r.width / b.w);
    view = {k: k, x: (r.width - b.w * k) / 2 - b.x * k, y: 8 - b.y * k};
  } else {
    k = Math.min(k, 1.5);
    view = {k: k, x: (r.width - b.w * k) / 2 - b.x * k, y: (r.height - b.h * k) / 2 - b.y * k};
  }
  applyView();
}
function zoomAt(f, mx, my) {
  var k = Math.max(0.02, Math.min(5, view.k * f));
  view.x = mx - (mx - view.x) * (k / view.k); view.y = my - (my - view.y) * (k / view.k); view.k = k;
  applyView();
}
var drag = {on: false, moved: false, x: 0, y: 0};
svg.addEventListener("wheel", function (e) {
  e.preventDefault();
  var r = svg.getBoundingClientRect();
  zoomAt(Math.exp(-e.deltaY * 0.0015), e.clientX - r.left, e.clientY - r.top);
}, {passive: false});
svg.addEventListener("mousedown", function (e) { drag = {on: true, moved: false, x: e.clientX, y: e.clientY}; });
window.addEventListener("mousemove", function (e) {
  if (!drag.on) return;
  var dx = e.clientX - drag.x, dy = e.clientY - drag.y;
  if (!drag.moved && Math.abs(dx) + Math.abs(dy) < 4) return;
  drag.moved = true; svg.classList.add("dragging");
  view.x += dx; view.y += dy; drag.x = e.clientX; drag.y = e.clientY;
  applyView();
});
window.addEventListener("mouseup", function () { drag.on = false; svg.classList.remove("dragging"); setTimeout(function () { drag.moved = false; }, 0); });
svg.addEventListener("click", function () { if (!drag.moved && selected) select(null); });
window.addEventListener("keydown", function (e) {
  if (e.target.tagName === "INPUT") return;
  var r = svg.getBoundingClientRect();
  if (e.key === "f") fit(false);
  if (e.key === "+" || e.key === "=") zoomAt(1.25, r.width / 2, r.height / 2);
  if (e.key === "-") zoomAt(0.8, r.width / 2, r.height / 2);
});
document.getElementById("fit").addEventListener("click", function () { fit(false); });
document.getElementById("zin").addEventListener("click", function () { var r = svg.getBoundingClientRect(); zoomAt(1.25, r.width / 2, r.height / 2); });
document.getElementById("zout").addEventListener("click", function () { var r = svg.getBoundingClientRect(); zoomAt(0.8, r.width / 2, r.height / 2); });

// ---- controls --------------------------------------------------------------------------
function setCollapse(mode) {
  collapsed = new Set();
  blocks.forEach(function (b, i) {
    if (mode === "blocks" ? b.collapse : mode.indexOf("depth") === 0 && b.depth === +mode.slice(5)) collapsed.add(i);
  });
  document.getElementById("collapse").value = mode;
}
(function controls() {
  var sel = document.getElementById("collapse"), opts = [["none", "nothing (every node)"]];
  if (blocks.some(function (b) { return b.repeated; })) opts.push(["blocks", "repeated blocks"]);
  var depths = Array.from(new Set(blocks.map(function (b) { return b.depth; }))).sort(function (a, b) { return a - b; });
  depths.forEach(function (d) { opts.push(["depth" + d, "modules at depth " + d]); });
  opts.forEach(function (o) { var op = h("option", null, o[1]); op.value = o[0]; sel.appendChild(op); });
  sel.addEventListener("change", function () { setCollapse(sel.value); render(); fit(true); });
  var col = document.getElementById("colour");
  if (!D.has_plan) col.querySelector('option[value="plan"]').disabled = true;
  col.addEventListener("change", function () { colourMode = col.value; render(); legend(); });
  var dl = document.getElementById("names");
  nodes.forEach(function (n) { dl.appendChild(h("option", null, n.name)); });
  groups.forEach(function (g) { if (!nodeIdx.has(g.id)) dl.appendChild(h("option", null, g.id)); });
  document.getElementById("search").addEventListener("keydown", function (e) {
    if (e.key !== "Enter") return;
    var q = e.target.value.trim();
    if (nodeIdx.has(q)) reveal(nodeIdx.get(q));
    else if (groupById.has(q)) select({kind: "group", key: q});
    else {
      var hit = nodes.findIndex(function (n) { return n.name.indexOf(q) >= 0; });
      if (hit >= 0) reveal(hit);
    }
  });
})();

var opts = {};
location.hash.replace(/^#/, "").split("&").forEach(function (kvp) {
  var p = kvp.split("="); if (p[0]) opts[decodeURIComponent(p[0])] = decodeURIComponent(p.slice(1).join("="));
});
setCollapse(opts.collapse || D.collapse_default);
if (opts.colour === "plan" && D.has_plan) { colourMode = "plan"; document.getElementById("colour").value = "plan"; }
sideList(); legend();
render();
fit(true);
if (opts.select && nodeIdx.has(opts.select)) reveal(nodeIdx.get(opts.select));
else if (opts.group && groupById.has(opts.group)) select({kind: "group", key: opts.group});
else showPanel();
document.body.setAttribute("data-ready", "1");
})();
</script>
</body></html>
"""
