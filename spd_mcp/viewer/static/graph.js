/* Attribution-graph renderer (SVG): canonical layer order as rows (embed at the bottom, outputs at
   the top), token positions as columns; q/k/v and up/gate share a row. Edges are coloured by sign
   (blue +, red -) with opacity and width by |value|; hovering a node keeps only its neighbourhood
   lit; clicking pins it. Input: a graph artifact {nodes, edges, layers?, prompt: {tokens}}. */
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
const SUBLAYER_COLOURS = {
  q: "#7c3aed", k: "#a855f7", v: "#c084fc", o: "#0d9488",
  up: "#d97706", gate: "#f59e0b", down: "#b45309",
  embed: "#6b7280", output: "#111827", other: "#2563eb",
};
const POS_COLOUR = "#2563eb";
const NEG_COLOUR = "#dc2626";
const BLOCK_RE = /^(\d+)\.(attn|mlp|glu)\.(\w+)$/;

function sublayer(layer) {
  if (layer === "embed" || layer === "output") return layer;
  const m = BLOCK_RE.exec(layer);
  return m ? m[3] : "other";
}

/* The row a layer is drawn in: q/k/v together, up/gate together, everything else alone. */
function rowOf(layer) {
  const m = BLOCK_RE.exec(layer);
  if (!m) return layer;
  const [, block, kind, part] = m;
  if (kind === "attn" && (part === "q" || part === "k" || part === "v")) return `${block}.attn.q/k/v`;
  if ((kind === "mlp" || kind === "glu") && (part === "up" || part === "gate")) return `${block}.${kind}.${kind === "glu" ? "up/gate" : "up"}`;
  return layer;
}

function layout(art, opts) {
  const nodes = art.nodes;
  const order = art.layers && art.layers.length ? art.layers : [...new Set(nodes.map((n) => n.layer))];
  const rows = [];
  for (const layer of ["embed", ...order, "output"]) {
    const r = rowOf(layer);
    if (!rows.includes(r)) rows.push(r);
  }
  for (const n of nodes) if (!rows.includes(rowOf(n.layer))) rows.splice(rows.length - 1, 0, rowOf(n.layer));
  const usedRows = rows.filter((r) => nodes.some((n) => rowOf(n.layer) === r));
  const tokens = (art.prompt && art.prompt.tokens) || [];
  const T = Math.max(tokens.length, 1 + Math.max(0, ...nodes.map((n) => n.pos)));
  const cells = new Map();
  for (const n of nodes) {
    const key = `${rowOf(n.layer)}|${n.pos}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(n);
  }
  const colCount = new Array(T).fill(0);
  for (const [key, list] of cells) {
    const pos = Number(key.split("|")[1]);
    colCount[pos] = Math.max(colCount[pos], list.length);
  }
  const sp = opts.spacing, pad = 10, left = opts.compact ? 70 : 96;
  const colX = [];
  let x = left;
  for (let p = 0; p < T; p++) {
    const w = colCount[p] ? Math.max(opts.minCol, colCount[p] * sp + pad) : opts.emptyCol;
    colX.push([x, w]);
    x += w;
  }
  const rowH = opts.rowHeight, top = 40;
  const height = top + usedRows.length * rowH + 74;
  const rowY = new Map(usedRows.map((r, i) => [r, top + (usedRows.length - 1 - i) * rowH + rowH / 2]));
  const place = new Map();
  for (const [key, list] of cells) {
    const [r, posStr] = key.split("|");
    const pos = Number(posStr);
    list.sort((a, b) => (a.layer < b.layer ? -1 : a.layer > b.layer ? 1 : a.index - b.index));
    const [cx, w] = colX[pos];
    const start = cx + w / 2 - ((list.length - 1) * sp) / 2;
    list.forEach((n, i) => place.set(n.key, [start + i * sp, rowY.get(r)]));
  }
  return { rows: usedRows, rowY, colX, width: x + 16, height, place, tokens, T };
}

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

/* Draw `art` into `container`; returns a controller {setEdgeKind, pinned, destroy, svg}. */
function renderGraph(container, art, options) {
  const opts = Object.assign({ spacing: art.nodes.length < 150 ? 20 : 9, minCol: 30, emptyCol: 16, rowHeight: 46, compact: false, edgeKind: "signed",
    onNodeClick: null, onPinChange: null, pinned: [] }, options || {});
  const L = layout(art, opts);
  const idx = new Map(art.nodes.map((n, i) => [n.key, i]));
  const edges = art.edges.filter((e) => idx.has(e.src) && idx.has(e.tgt) && L.place.has(e.src) && L.place.has(e.tgt));
  const nodeEdges = art.nodes.map(() => []);
  edges.forEach((e, i) => { nodeEdges[idx.get(e.src)].push(i); nodeEdges[idx.get(e.tgt)].push(i); });

  const parts = [];
  // Four stacked layers: the grid and labels; all edges; all nodes (mouse events); on top, an
  // overlay that ignores the mouse. Hovering dims the edge and node layers as a whole (the
  // compositor does that without repainting thousands of elements) and copies the hovered node's
  // neighbourhood into the overlay.
  const size = `width="${L.width}" height="${L.height}" viewBox="0 0 ${L.width} ${L.height}"`;
  // Row labels live in a zero-size sticky box, so they stay readable when the graph scrolls.
  parts.push(`<div class="graph-stack"><div class="row-labels"><svg xmlns="${SVGNS}" width="1" height="1">`);
  for (const r of L.rows) {
    const y = L.rowY.get(r);
    parts.push(`<rect x="2" y="${y - 7}" width="${6 * r.length + 6}" height="14" rx="3"/><text class="rowlabel" x="5" y="${y + 4}">${esc(r)}</text>`);
  }
  parts.push(`</svg></div><svg xmlns="${SVGNS}" class="graph-grid" ${size}>`);
  parts.push('<g class="rows">');
  for (const r of L.rows) {
    const y = L.rowY.get(r);
    parts.push(`<line class="rowline" x1="0" x2="${L.width}" y1="${y}" y2="${y}"/>`);
  }
  L.colX.forEach(([x, w], p) => {
    const tok = L.tokens[p] !== undefined ? L.tokens[p] : String(p);
    const cx = x + w / 2, ty = L.height - 62;
    parts.push(`<line class="colline" x1="${x}" x2="${x}" y1="8" y2="${ty - 8}"/>`);
    parts.push(`<text class="posno" x="${cx}" y="${ty - 2}">${p}</text><text class="tok" x="${cx + 3}" y="${ty + 8}" transform="rotate(-45 ${cx + 3} ${ty + 8})" data-pos="${p}">${esc(tok)}</text>`);
  });
  parts.push(`</g></svg><svg xmlns="${SVGNS}" class="graph-base" ${size}>`);
  // Edges: smallest first so that the strongest are drawn on top.
  const order = edges.map((_, i) => i).sort((a, b) => Math.abs(edges[a].value) - Math.abs(edges[b].value));
  parts.push('<g class="edges">');
  for (const i of order) {
    const e = edges[i];
    const [x1, y1] = L.place.get(e.src);
    const [x2, y2] = L.place.get(e.tgt);
    const dy = (y1 - y2) * 0.45;
    parts.push(`<path class="edge" data-i="${i}" d="M${x1.toFixed(1)},${y1.toFixed(1)} C${x1.toFixed(1)},${(y1 - dy).toFixed(1)} ${x2.toFixed(1)},${(y2 + dy).toFixed(1)} ${x2.toFixed(1)},${y2.toFixed(1)}"/>`);
  }
  parts.push(`</g></svg><svg xmlns="${SVGNS}" class="graph" ${size} data-n-nodes="${art.nodes.length}" data-n-edges="${edges.length}"><g class="nodes">`);
  art.nodes.forEach((n, i) => {
    if (!L.place.has(n.key)) return;
    const [x, y] = L.place.get(n.key);
    const sub = sublayer(n.layer);
    const r = n.layer === "output" ? 5.5 : 4.2;
    if (n.layer === "output") parts.push(`<text class="outlabel" x="${x.toFixed(1)}" y="${(y - 8).toFixed(1)}" transform="rotate(-50 ${x.toFixed(1)} ${(y - 8).toFixed(1)})">${esc(n.output_token ?? "")}</text>`);
    parts.push(`<circle class="node n-${sub}" data-i="${i}" data-key="${esc(n.key)}" cx="${x.toFixed(1)}" cy="${y.toFixed(1)}" r="${r}" fill="${SUBLAYER_COLOURS[sub] || SUBLAYER_COLOURS.other}"/>`);
  });
  parts.push(`</g></svg><svg xmlns="${SVGNS}" class="graph-hl" ${size}><g class="hl-edges"></g><g class="hl-nodes"></g></svg></div>`);
  container.innerHTML = parts.join("");
  const svg = container.querySelector("svg.graph");
  const base = container.querySelector("svg.graph-base");
  const overlay = container.querySelector("svg.graph-hl");
  const hlEdges = overlay.querySelector("g.hl-edges");
  const hlNodes = overlay.querySelector("g.hl-nodes");
  const edgeEls = new Array(edges.length);
  base.querySelectorAll("path.edge").forEach((el) => { edgeEls[Number(el.dataset.i)] = el; });
  const nodeEls = new Map();
  svg.querySelectorAll("circle.node").forEach((el) => nodeEls.set(Number(el.dataset.i), el));

  function colour(kind) {
    const vals = edges.map((e) => (kind === "abs" && e.value_abs !== undefined ? e.value_abs : e.value));
    const max = Math.max(1e-12, ...vals.map(Math.abs));
    vals.forEach((v, i) => {
      const el = edgeEls[i];
      const s = Math.abs(v) / max;
      el.setAttribute("stroke", v >= 0 ? POS_COLOUR : NEG_COLOUR);
      el.setAttribute("stroke-opacity", (0.12 + 0.88 * s).toFixed(3));
      el.setAttribute("stroke-width", (0.6 + 2.6 * s).toFixed(2));
    });
    svg.dataset.edgeKind = kind;
  }
  colour(opts.edgeKind);

  function copyInto(group, el, cls) {
    const copy = el.cloneNode(false);
    copy.setAttribute("class", cls);
    group.appendChild(copy);
  }
  function spotlight(i) {
    clear();
    base.classList.add("dim");
    svg.classList.add("spot");
    const seen = new Set([i]);
    for (const ei of nodeEdges[i]) {
      copyInto(hlEdges, edgeEls[ei], "edge-hl");
      const e = edges[ei];
      seen.add(idx.get(e.src === art.nodes[i].key ? e.tgt : e.src));
    }
    for (const j of seen) {
      const el = nodeEls.get(j);
      if (el) copyInto(hlNodes, el, `node-hl ${el.classList.contains("pinned") ? "pinned" : ""}`);
    }
  }
  function clear() {
    base.classList.remove("dim");
    svg.classList.remove("spot");
    hlEdges.replaceChildren();
    hlNodes.replaceChildren();
  }
  const pinned = new Set(opts.pinned.filter((k) => idx.has(k)));
  for (const k of pinned) { const el = nodeEls.get(idx.get(k)); if (el) el.classList.add("pinned"); }

  const info = document.createElement("div");
  info.className = "hoverinfo";
  container.appendChild(info);
  const nodeGroup = svg.querySelector("g.nodes");
  nodeGroup.addEventListener("mouseover", (ev) => {
    const t = ev.target;
    if (!(t instanceof SVGElement) || !t.classList.contains("node")) return;
    const i = Number(t.dataset.i);
    spotlight(i);
    const n = art.nodes[i];
    const what = n.layer === "output" ? `→ "${n.output_token}" p=${(n.prob || 0).toFixed(3)}` : `CI ${Number(n.ci).toFixed(3)} · act ${Number(n.act).toFixed(3)}`;
    info.textContent = `${n.key}  "${n.token ?? ""}"  ${what}${n.label ? "  — " + n.label : ""}  (${nodeEdges[i].length} edges)`;
    info.classList.add("show");
  });
  nodeGroup.addEventListener("mouseout", (ev) => {
    const t = ev.target;
    if (t instanceof SVGElement && t.classList.contains("node")) { clear(); info.classList.remove("show"); }
  });
  nodeGroup.addEventListener("click", (ev) => {
    const t = ev.target;
    if (!(t instanceof SVGElement) || !t.classList.contains("node")) return;
    const n = art.nodes[Number(t.dataset.i)];
    const special = n.layer === "embed" || n.layer === "output";
    if (!special) {
      if (pinned.has(n.key)) { pinned.delete(n.key); t.classList.remove("pinned"); }
      else { pinned.add(n.key); t.classList.add("pinned"); }
      if (opts.onPinChange) opts.onPinChange([...pinned]);
    }
    if (opts.onNodeClick) opts.onNodeClick(n);
  });
  // Start scrolled to the outputs (the last positions), where a graph's story ends.
  container.scrollLeft = container.scrollWidth;
  svg.dataset.ready = "1";
  const controller = {
    svg,
    base,
    overlay,
    edges,
    setEdgeKind: colour,
    pinned: () => [...pinned],
    neighbours: (key) => (idx.has(key) ? nodeEdges[idx.get(key)].slice() : []),
  };
  window.SPDGraph.last = controller; // the most recently drawn graph (tests, benchmark, console)
  return controller;
}

window.SPDGraph = { renderGraph, rowOf, layout };
