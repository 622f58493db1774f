// mechanic's attribution-graph viewer: canvas drawing, pan/zoom, hover details, selection, supernodes, pruning.
// All text from the graph is shown with textContent or canvas fillText, never parsed as HTML.
(() => {
  "use strict";
  const D = JSON.parse(document.getElementById("graph-data").textContent);
  const KIND = Object.fromEntries(D.kinds.map((k, i) => [k, i]));
  const COLORS = ["#0f766e", "#94a3b8", "#b45309", "#be185d"];        // feature, error, token, logit
  const SUPER = "#7c3aed", POS = "37,99,235", NEG = "220,38,38";
  const WIDTHS = [0.6, 1.1, 2, 3.4], ALPHAS = [0.22, 0.38, 0.6, 0.85];
  const COLW = 120, ROWH = 60, LEFT = 44, BOTTOM = 26;
  const nd = D.nodes, N = nd.kind.length, E = D.edges.src.length, L = D.n_layers;
  const kind = Int8Array.from(nd.kind), layer = Int32Array.from(nd.layer), pos = Int32Array.from(nd.pos);
  const cum = Float64Array.from(nd.c);
  const esrc = Int32Array.from(D.edges.src), edst = Int32Array.from(D.edges.dst);
  const ew = Float64Array.from(D.edges.w), ec = Float64Array.from(D.edges.c);
  let P = D.prompt_tokens.length;
  for (let i = 0; i < N; i++) P = Math.max(P, pos[i] + 1);
  const NROWS = L + 2;
  const rowOf = (i) => (kind[i] === KIND.token ? 0 : kind[i] === KIND.logit ? L + 1 : layer[i] + 1);

  const canvas = document.getElementById("graph"), overlay = document.getElementById("overlay");
  const ctx = canvas.getContext("2d"), octx = overlay.getContext("2d");
  const $ = (id) => document.getElementById(id);
  const el = (tag, text, cls) => { const e = document.createElement(tag); if (text !== undefined) e.textContent = String(text); if (cls) e.className = cls; return e; };
  const fmt = (x, d = 4) => (x === null || x === undefined ? "—" : Number(x).toPrecision(d));

  // ---- state ----
  const S = {
    nodeThr: D.node_threshold, edgeThr: D.edge_threshold, scale: 1, vx: 0, vy: 0,
    selected: new Set(), hovered: -1, supers: [], memberOf: new Int32Array(N).fill(-1),
  };
  const visible = new Uint8Array(N);
  const X = new Float64Array(N), Y = new Float64Array(N), R = new Float64Array(N);
  let shown = new Int32Array(0);                       // drawn node indices (visible, not in a supernode)
  let superShown = [];                                 // [{s, x, y, r}]
  let dA = new Int32Array(E), dB = new Int32Array(E), dW = new Float64Array(E), nE = 0, maxW = 1;
  const drawn = { nodes: 0, edges: 0, supernodes: 0, highlighted: 0, frames: 0, firstDrawMs: null, lastDrawMs: null,
                  visibleNodes: 0 };
  window.__drawn = drawn;

  const repOf = (i) => (S.memberOf[i] >= 0 ? N + S.memberOf[i] : i);
  const repX = (r) => (r < N ? X[r] : S.supers[r - N].x);
  const repY = (r) => (r < N ? Y[r] : S.supers[r - N].y);

  // ---- pruning, layout and edge aggregation (on threshold or supernode changes) ----
  function recompute() {
    for (let i = 0; i < N; i++) {
      visible[i] = kind[i] === KIND.token || kind[i] === KIND.logit || S.nodeThr >= 1 || cum[i] < S.nodeThr ? 1 : 0;
    }
    const order = [];
    for (let i = 0; i < N; i++) if (visible[i]) order.push(i);
    order.sort((a, b) => cum[a] - cum[b] || a - b);
    const cells = new Map();
    for (const i of order) {
      const key = rowOf(i) * P + pos[i];
      let c = cells.get(key);
      if (!c) cells.set(key, (c = []));
      c.push(i);
    }
    for (const [key, c] of cells) {
      const row = Math.floor(key / P), p = key % P, n = c.length;
      const cols = Math.max(1, Math.ceil(Math.sqrt((n * COLW) / ROWH))), rows = Math.ceil(n / cols);
      const sw = (COLW * 0.9) / cols, sh = (ROWH * 0.8) / rows, r = Math.min(6, Math.min(sw, sh) * 0.4);
      const x0 = p * COLW + COLW * 0.05, y0 = (NROWS - 1 - row) * ROWH + ROWH * 0.1;
      c.forEach((i, j) => { X[i] = x0 + ((j % cols) + 0.5) * sw; Y[i] = y0 + (Math.floor(j / cols) + 0.5) * sh; R[i] = r; });
    }
    for (const s of S.supers) {
      const m = s.members.filter((i) => visible[i]);
      s.live = m.length > 0;
      s.x = m.reduce((a, i) => a + X[i], 0) / Math.max(1, m.length);
      s.y = m.reduce((a, i) => a + Y[i], 0) / Math.max(1, m.length);
    }
    shown = Int32Array.from(order.filter((i) => S.memberOf[i] < 0));
    superShown = S.supers.map((s, k) => ({ k, s })).filter((o) => o.s.live);
    nE = 0; maxW = 0;
    const agg = new Map(), M = N + S.supers.length;
    for (let e = 0; e < E; e++) {
      if (S.edgeThr < 1 && ec[e] >= S.edgeThr) continue;
      const s = esrc[e], t = edst[e];
      if (!visible[s] || !visible[t]) continue;
      const a = repOf(s), b = repOf(t);
      if (a === b) continue;
      if (a >= N || b >= N) { const k = a * M + b; agg.set(k, (agg.get(k) || 0) + ew[e]); continue; }
      dA[nE] = a; dB[nE] = b; dW[nE] = ew[e]; nE++;
    }
    if (nE + agg.size > dA.length) {                       // supernode edges can outnumber the graph's edges
      const grow = (old, T) => { const n = new T(nE + agg.size); n.set(old.subarray(0, nE)); return n; };
      dA = grow(dA, Int32Array); dB = grow(dB, Int32Array); dW = grow(dW, Float64Array);
    }
    for (const [k, w] of agg) { dA[nE] = Math.floor(k / M); dB[nE] = k % M; dW[nE] = w; nE++; }
    for (let e = 0; e < nE; e++) maxW = Math.max(maxW, Math.abs(dW[e]));
    maxW = maxW || 1;
    updateStats();
  }

  // ---- drawing ----
  function size() {
    const dpr = window.devicePixelRatio || 1, w = canvas.clientWidth, h = canvas.clientHeight;
    for (const c of [canvas, overlay]) { c.width = Math.round(w * dpr); c.height = Math.round(h * dpr); }
    return { dpr, w, h };
  }
  let view = size();
  const sx = (x) => LEFT + (x - S.vx) * S.scale, sy = (y) => (y - S.vy) * S.scale;

  function fit() {
    const W = P * COLW, H = NROWS * ROWH;
    S.scale = Math.min((view.w - LEFT - 8) / W, (view.h - BOTTOM - 8) / H);
    S.vx = -((view.w - LEFT) / S.scale - W) / 2;
    S.vy = -((view.h - BOTTOM) / S.scale - H) / 2;
  }

  function bucket(w) { const r = Math.abs(w) / maxW; return r > 0.5 ? 3 : r > 0.2 ? 2 : r > 0.05 ? 1 : 0; }

  function draw() {
    const t = performance.now();
    const { dpr, w, h } = view;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    axes();
    const sel = selectedReps(), onScreen = (x, y) => x > -20 && x < w + 20 && y > -20 && y < h + 20;
    let nEdges = 0, nHigh = 0;
    const paths = Array.from({ length: 8 }, () => new Path2D()), high = Array.from({ length: 8 }, () => new Path2D());
    for (let e = 0; e < nE; e++) {
      const a = dA[e], b = dB[e];
      const x1 = sx(repX(a)), y1 = sy(repY(a)), x2 = sx(repX(b)), y2 = sy(repY(b));
      if ((x1 < 0 && x2 < 0) || (x1 > w && x2 > w) || (y1 < 0 && y2 < 0) || (y1 > h && y2 > h)) continue;
      const k = bucket(dW[e]) + (dW[e] < 0 ? 4 : 0);
      const isHigh = sel.size && (sel.has(a) || sel.has(b));
      const path = isHigh ? high[k] : paths[k];
      path.moveTo(x1, y1); path.lineTo(x2, y2);
      nEdges++; if (isHigh) nHigh++;
    }
    for (let k = 0; k < 8; k++) {
      ctx.lineWidth = WIDTHS[k % 4];
      ctx.strokeStyle = `rgba(${k < 4 ? POS : NEG},${sel.size ? 0.08 : ALPHAS[k % 4]})`;
      ctx.stroke(paths[k]);
    }
    for (let k = 0; k < 8; k++) {
      ctx.lineWidth = WIDTHS[k % 4] + 1;
      ctx.strokeStyle = `rgba(${k < 4 ? POS : NEG},0.95)`;
      ctx.stroke(high[k]);
    }
    const byKind = COLORS.map(() => new Path2D());
    let nNodes = 0;
    for (const i of shown) {
      const x = sx(X[i]), y = sy(Y[i]);
      if (!onScreen(x, y)) continue;
      const r = Math.max(1.6, R[i] * S.scale);
      byKind[kind[i]].rect(x - r, y - r, 2 * r, 2 * r);
      nNodes++;
    }
    byKind.forEach((p, k) => { ctx.fillStyle = COLORS[k]; ctx.fill(p); });
    ctx.font = "600 11px system-ui, sans-serif";
    for (const { s } of superShown) {
      const x = sx(s.x), y = sy(s.y), r = Math.max(6, 7 * S.scale);
      ctx.fillStyle = SUPER; ctx.fillRect(x - r, y - r, 2 * r, 2 * r);
      ctx.fillStyle = "#4c1d95"; ctx.fillText(s.name.slice(0, 40), x + r + 3, y + 4);
    }
    ctx.lineWidth = 2; ctx.strokeStyle = "#111827";
    for (const r of sel) { const x = sx(repX(r)), y = sy(repY(r)), q = (r < N ? Math.max(1.6, R[r] * S.scale) : Math.max(6, 7 * S.scale)) + 3; ctx.strokeRect(x - q, y - q, 2 * q, 2 * q); }
    Object.assign(drawn, { nodes: nNodes, edges: nEdges, supernodes: superShown.length, highlighted: nHigh,
                           visibleNodes: shown.length, frames: drawn.frames + 1, lastDrawMs: performance.now() - t });
    drawHover();
  }

  function axes() {
    ctx.font = "11px system-ui, sans-serif"; ctx.fillStyle = "#616e7c"; ctx.textAlign = "right";
    for (let r = 0; r < NROWS; r++) {
      const y = sy((NROWS - 1 - r + 0.5) * ROWH);
      if (y < 0 || y > view.h) continue;
      ctx.fillText(r === 0 ? "emb" : r === NROWS - 1 ? "out" : `L${r - 1}`, LEFT - 6, y + 4);
      ctx.strokeStyle = "#f1f3f5"; ctx.lineWidth = 1; ctx.beginPath();
      ctx.moveTo(LEFT, sy((NROWS - 1 - r) * ROWH)); ctx.lineTo(view.w, sy((NROWS - 1 - r) * ROWH)); ctx.stroke();
    }
    ctx.textAlign = "center";
    const every = Math.max(1, Math.ceil(60 / (COLW * S.scale)));
    for (let p = 0; p < P; p += every) {
      const x = sx((p + 0.5) * COLW);
      if (x < LEFT || x > view.w) continue;
      const t = D.prompt_tokens[p];
      ctx.fillText(t === undefined ? String(p) : JSON.stringify(t).slice(1, -1).slice(0, 14), x,
                   Math.min(view.h - 8, sy(NROWS * ROWH) + 14));
    }
    ctx.textAlign = "start";
  }

  function drawHover() {
    const { dpr, w, h } = view;
    octx.setTransform(dpr, 0, 0, dpr, 0, 0);
    octx.clearRect(0, 0, w, h);
    if (S.hovered < 0) return;
    const r = S.hovered, x = sx(repX(r)), y = sy(repY(r));
    const q = (r < N ? Math.max(1.6, R[r] * S.scale) : Math.max(6, 7 * S.scale)) + 5;
    octx.lineWidth = 2; octx.strokeStyle = "#f59e0b"; octx.strokeRect(x - q, y - q, 2 * q, 2 * q);
  }

  // ---- hit testing, hover details, selection ----
  function hit(mx, my) {
    let best = -1, bestD = Infinity;
    for (const i of shown) {
      const dx = sx(X[i]) - mx, dy = sy(Y[i]) - my, d = dx * dx + dy * dy;
      const lim = Math.max(5, R[i] * S.scale + 2);
      if (d <= lim * lim && d < bestD) { best = i; bestD = d; }
    }
    for (const { k, s } of superShown) {
      const dx = sx(s.x) - mx, dy = sy(s.y) - my, d = dx * dx + dy * dy, lim = Math.max(8, 7 * S.scale + 2);
      if (d <= lim * lim && d < bestD) { best = N + k; bestD = d; }
    }
    return best;
  }

  function selectedReps() { const s = new Set(); for (const r of S.selected) s.add(r < N ? repOf(r) : r); return s; }

  function tableRows(t, rows) {
    for (const [k, v, cls] of rows) { const tr = el("tr"); tr.append(el("th", k)); tr.append(el("td", v, cls)); t.append(tr); }
  }

  function edgeList(title, list) {
    const box = document.createDocumentFragment();
    box.append(el("h3", title));
    if (!list.length) { box.append(el("p", "none", "note")); return box; }
    const t = el("table");
    for (const [j, w] of list) {
      const tr = el("tr"); tr.append(el("th", nd.label[j])); tr.append(el("td", fmt(w), "num " + (w < 0 ? "neg" : "pos"))); t.append(tr);
    }
    box.append(t); return box;
  }

  function details(r) {
    const box = $("details");
    box.replaceChildren();
    box.dataset.node = String(r);
    if (r < 0) return;
    if (r >= N) {
      const s = S.supers[r - N];
      box.append(el("h2", s.name), el("p", `supernode of ${s.members.length} nodes`, "note"));
      const t = el("table"); tableRows(t, s.members.slice(0, 30).map((i) => [nd.id[i], nd.label[i]])); box.append(t);
      return;
    }
    const i = r, kindName = D.kinds[kind[i]];
    box.append(el("h2", nd.label[i]));
    const t = el("table");
    const rows = [["id", nd.id[i]], ["kind", kindName], ["layer", kind[i] === KIND.token ? "embedding" : kind[i] === KIND.logit ? "output" : layer[i]],
                  ["position", `${pos[i]}  ${JSON.stringify(D.prompt_tokens[pos[i]] ?? "")}`]];
    if (kind[i] === KIND.feature) rows.push(["feature", nd.feature[i]], ["activation", fmt(nd.value[i])]);
    else if (kind[i] === KIND.logit) rows.push(["token id", nd.feature[i]], ["demeaned logit", fmt(nd.value[i])]);
    else if (kind[i] === KIND.token) rows.push(["token id", nd.feature[i]], ["|embedding|", fmt(nd.value[i])]);
    else rows.push(["|error|", fmt(nd.value[i])]);
    rows.push(["influence", fmt(nd.influence[i])], ["cumulative rank", fmt(cum[i])]);
    tableRows(t, rows); box.append(t);
    const ins = [], outs = [];
    for (let e = 0; e < E; e++) { if (edst[e] === i) ins.push([esrc[e], ew[e]]); else if (esrc[e] === i) outs.push([edst[e], ew[e]]); }
    const top = (l) => l.sort((a, b) => Math.abs(b[1]) - Math.abs(a[1])).slice(0, 6);
    box.append(edgeList(`strongest inputs (${ins.length})`, top(ins)), edgeList(`strongest outputs (${outs.length})`, top(outs)));
    const page = kind[i] === KIND.feature ? D.pages[`${layer[i]}_${nd.feature[i]}`] : undefined;
    if (page) {
      box.append(el("h3", "top contexts"));
      for (const [before, tok, after, v] of page.ctx) {
        const c = el("div", undefined, "ctx"); c.append(el("span", fmt(v, 3), "v"), el("span", before), el("mark", tok), el("span", after)); box.append(c);
      }
      for (const [name, list] of [["promotes", page.up], ["suppresses", page.down]]) {
        box.append(el("h3", name)); const lt = el("table", undefined, "logits");
        for (const [tok, v] of list) { const tr = el("tr"); tr.append(el("th", JSON.stringify(tok))); tr.append(el("td", fmt(v, 3), "num")); lt.append(tr); }
        box.append(lt);
      }
    }
  }

  function updateStats() {
    const sc = Object.entries(D.scores).map(([k, v]) => `${k} ${fmt(v, 3)}`).join(" · ");
    let nodes = 0; for (let i = 0; i < N; i++) nodes += visible[i];
    const capped = N < D.meta.nodes || E < D.meta.edges ? ` (page keeps the strongest ${N} nodes, ${E} edges)` : "";
    $("stats").textContent = `${D.meta.model} · ${D.meta.nodes} nodes, ${D.meta.edges} edges${capped}` +
      `${sc ? " · " + sc : ""} · shown ${nodes} nodes, ${nE} edges`;
    $("node-threshold-value").textContent = S.nodeThr.toFixed(3);
    $("edge-threshold-value").textContent = S.edgeThr.toFixed(3);
  }

  function supernodeList() {
    const ul = $("supernodes");
    ul.replaceChildren();
    S.supers.forEach((s, k) => {
      const li = el("li"); li.dataset.supernode = String(k);
      const b = el("button", "ungroup"); b.type = "button";
      b.addEventListener("click", () => ungroup(k));
      li.append(el("span", s.name, "name"), el("span", `${s.members.length} nodes`, "note"), b); ul.append(li);
    });
    $("supernodes-json").textContent = JSON.stringify(S.supers.map((s) => [s.name, ...s.members.map((i) => nd.id[i])]));
  }

  function group(name) {
    const members = [...S.selected].filter((r) => r < N && S.memberOf[r] < 0);
    if (members.length < 2) { $("supernode-name").placeholder = "select two or more nodes first (shift-click)"; return false; }
    const k = S.supers.length;
    S.supers.push({ name: name.trim() || `supernode ${k + 1}`, members, x: 0, y: 0, live: true });
    for (const i of members) S.memberOf[i] = k;
    S.selected.clear(); S.hovered = -1;
    recompute(); supernodeList(); draw();
    return true;
  }

  function ungroup(k) {
    S.supers.splice(k, 1);
    S.memberOf.fill(-1);
    S.supers.forEach((s, j) => s.members.forEach((i) => { S.memberOf[i] = j; }));
    S.selected.clear(); S.hovered = -1;
    recompute(); supernodeList(); draw();
  }

  // ---- events ----
  let drag = null, pending = false;
  const later = () => { if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; draw(); }); } };
  const local = (ev) => { const b = canvas.getBoundingClientRect(); return [ev.clientX - b.left, ev.clientY - b.top]; };
  canvas.addEventListener("mousedown", (ev) => { const [x, y] = local(ev); drag = { x, y, vx: S.vx, vy: S.vy, moved: false }; });
  window.addEventListener("mouseup", (ev) => {
    if (!drag) return;
    const wasDrag = drag.moved; drag = null;
    if (wasDrag) return;
    const [x, y] = local(ev), r = hit(x, y);
    if (r < 0) S.selected.clear();
    else if (ev.shiftKey) { if (S.selected.has(r)) S.selected.delete(r); else S.selected.add(r); }
    else { S.selected.clear(); S.selected.add(r); }
    draw();
  });
  canvas.addEventListener("mousemove", (ev) => {
    const [x, y] = local(ev);
    if (drag) {
      if (Math.abs(x - drag.x) + Math.abs(y - drag.y) > 3) drag.moved = true;
      if (drag.moved) { S.vx = drag.vx - (x - drag.x) / S.scale; S.vy = drag.vy - (y - drag.y) / S.scale; later(); }
      return;
    }
    const r = hit(x, y);
    if (r !== S.hovered) { S.hovered = r; if (r >= 0) details(r); drawHover(); }
  });
  canvas.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const [x, y] = local(ev), f = Math.exp(-ev.deltaY * 0.0015);
    const wx = (x - LEFT) / S.scale + S.vx, wy = y / S.scale + S.vy;
    S.scale *= f; S.vx = wx - (x - LEFT) / S.scale; S.vy = wy - y / S.scale;
    later();
  }, { passive: false });
  for (const [id, key] of [["node-threshold", "nodeThr"], ["edge-threshold", "edgeThr"]]) {
    const input = $(id);
    input.value = String(S[key]);
    input.addEventListener("input", () => { S[key] = Number(input.value); recompute(); draw(); });
  }
  $("group-button").addEventListener("click", () => { if (group($("supernode-name").value)) $("supernode-name").value = ""; });
  $("fit").addEventListener("click", () => { fit(); draw(); });
  window.addEventListener("resize", () => { view = size(); draw(); });

  window.__viewer = {
    // page coordinates of a node's (or supernode N + k's) centre, or null when it is not drawn
    screenPos(r) {
      if (r < N && (!visible[r] || S.memberOf[r] >= 0)) return null;
      if (r >= N && !(S.supers[r - N] && S.supers[r - N].live)) return null;
      const b = canvas.getBoundingClientRect();
      return [b.left + sx(repX(r)), b.top + sy(repY(r))];
    },
    colorOf: (i) => COLORS[kind[i]],
    shown: () => Array.from(shown),
    selected: () => Array.from(S.selected),
    supernodes: () => S.supers.map((s) => ({ name: s.name, members: s.members.map((i) => nd.id[i]) })),
    visibleNodes: () => visible.reduce((a, v) => a + v, 0),
  };

  $("title").textContent = D.title;
  recompute(); supernodeList(); fit(); draw();
  drawn.firstDrawMs = performance.now();              // since navigation start: parse, layout and first frame
})();
