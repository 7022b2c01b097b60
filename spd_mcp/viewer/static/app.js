/* spd-mcp viewer: a hash-routed single page (runs, graph explorer, interventions, investigations,
   benchmark results).
   Everything is fetched from this origin; text goes into the DOM as text, except the research log
   and summary, which the server renders from markdown with raw HTML disabled. */
"use strict";

const REGIMES = ["ci", "stochastic", "adversarial", "ablated"];
const S = {
  run: null, runInfo: null, runs: null,
  graph: null, // {gid, art, text, label, mode, threshold, maxEdges, edgeKind, controller}
  pinned: [],
  interv: null, // {text, nodes, label, result, ablated}
  timers: [],
};

// -- small helpers ------------------------------------------------------------------------------
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "style") el.style.cssText = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

async function api(path, body) {
  const init = body === undefined ? {} : { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) };
  const res = await fetch(path, init);
  let data;
  try { data = await res.json(); } catch { data = { error: `HTTP ${res.status}` }; }
  if (!res.ok) throw new Error(data.error || `HTTP ${res.status}`);
  return data;
}

function runPath(run) { return `/api/runs/${encodeURIComponent(run)}`; }

function fmtAge(s) {
  if (s === null || s === undefined) return "—";
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

function errorBox(msg) { return h("div", { class: "error", role: "alert" }, msg); }

function clearTimers() { S.timers.forEach(clearInterval); S.timers = []; }

/* Poll a job until it ends; `onProgress(job)` on every tick. Resolves with the job's result. */
async function waitJob(job, onProgress) {
  for (;;) {
    if (onProgress) onProgress(job);
    if (job.status === "done") return job.result;
    if (job.status === "error") throw new Error(job.error);
    await new Promise((r) => setTimeout(r, 200));
    job = await api(`/api/jobs/${job.id}`);
  }
}

function progressBar() {
  const bar = h("div", { class: "progress" }, h("div", { class: "fill" }), h("span", { class: "label" }));
  bar.update = (job) => {
    const frac = job.total ? job.done / job.total : 0;
    bar.querySelector(".fill").style.width = `${Math.round(frac * 100)}%`;
    bar.querySelector(".label").textContent = `${job.message} — ${job.total ? `${job.done}/${job.total}` : "queued"} · ${job.elapsed_s.toFixed(1)} s`;
  };
  return bar;
}

async function ensureRun() {
  if (!S.runs) {
    const data = await api("/api/runs");
    S.runs = data.runs;
    if (!S.run) S.run = sessionStorage.getItem("spd-run") || data.default_run;
  }
  if (!S.runInfo || S.runInfo.run_key !== S.run) {
    S.runInfo = await api(`${runPath(S.run)}/info`);
    S.runInfo.run_key = S.run;
  }
  document.getElementById("run-pill").textContent = `run: ${S.run}`;
}

function selectRun(name) {
  S.run = name; S.runInfo = null; S.graph = null; S.pinned = []; S.interv = null;
  sessionStorage.setItem("spd-run", name);
}

// -- pages ---------------------------------------------------------------------------------------
async function pageRuns(view) {
  const data = await api("/api/runs");
  S.runs = data.runs;
  if (!S.run) S.run = sessionStorage.getItem("spd-run") || data.default_run;
  const badge = (ok, name) => h("span", { class: `badge ${ok ? "ok" : "no"}` }, `${ok ? "✓" : "✗"} ${name}`);
  const rows = data.runs.map((r) => h("tr", { class: r.name === S.run ? "selected" : "" },
    h("td", {}, h("b", {}, r.name), r.error ? h("div", { class: "error" }, r.error) : null),
    h("td", {}, r.target || ""),
    h("td", {}, r.layers ? `${r.layers.length} layers · ${r.n_components} components` : "",
      r.layers ? h("div", { class: "muted small" }, r.layers.map((l) => `${l.module} C=${l.C}`).join(", ")) : null),
    h("td", {}, r.analyses ? [badge(r.analyses.harvest, "harvest"), badge(r.analyses.attributions, "attributions"), badge(r.analyses.labels, "labels")] : null),
    h("td", {}, r.created ? r.created.slice(0, 19).replace("T", " ") : ""),
    h("td", {}, r.error ? null : h("button", { onclick: () => { selectRun(r.name); location.hash = "#/graph"; } }, r.name === S.run ? "Open" : "Select"))));
  view.replaceChildren(
    h("h1", {}, "Runs"),
    h("p", { class: "muted" }, "Local runs (under $SPD_MCP_HOME/runs) and the ones shipped with the package. Build missing analyses with ", h("code", {}, "spd-mcp prepare RUN"), "."),
    h("table", { class: "grid", id: "runs-table" },
      h("thead", {}, h("tr", {}, ["run", "target", "architecture", "analyses", "created", ""].map((c) => h("th", {}, c)))),
      h("tbody", {}, rows)));
  try {
    await ensureRun();
    const info = S.runInfo;
    view.appendChild(h("section", { class: "card" },
      h("h2", {}, `${info.run} (${info.architecture.type})`),
      h("p", { class: "muted" }, `run id ${info.run_id} · vocab ${info.vocab_size ?? "—"} · context ${info.max_len ?? "—"} · device ${info.device}`),
      h("table", { class: "grid compact" }, h("thead", {}, h("tr", {}, ["layer", "C", "d_in", "d_out"].map((c) => h("th", {}, c)))),
        h("tbody", {}, info.layers.map((l) => h("tr", {}, h("td", {}, l.name), h("td", {}, l.C), h("td", {}, l.d_in), h("td", {}, l.d_out))))),
      info.planted_behaviours.length ? h("div", {}, h("h3", {}, "Planted behaviours"),
        h("ul", {}, info.planted_behaviours.map((b) => h("li", {}, h("b", {}, b.name), `: ${b.rule} `,
          h("a", { href: "#/graph", onclick: () => { S.graph = { text: b.example_prompt, label: b.expected_next_token }; } }, "open in graph explorer"))))) : null));
  } catch (e) { view.appendChild(errorBox(e.message)); }
}

function defaultPrompt() {
  const b = S.runInfo && S.runInfo.planted_behaviours[0];
  return b ? { text: b.example_prompt, label: b.expected_next_token } : { text: "", label: "" };
}

async function pageGraph(view) {
  await ensureRun();
  const g = S.graph || (S.graph = defaultPrompt());
  const prompt = h("textarea", { id: "prompt", rows: 2, spellcheck: "false" });
  prompt.value = g.text || "";
  const label = h("input", { id: "target-token", placeholder: "target token (optional)", value: g.label || "" });
  const mode = h("select", { id: "mode" }, h("option", { value: "natural" }, "natural CI graph"), h("option", { value: "optimized" }, "optimised sparse circuit"));
  mode.value = g.mode || "natural";
  const steps = h("input", { id: "steps", type: "number", min: 1, max: 2000, value: g.steps || 200, title: "optimisation steps" });
  const status = h("div", { class: "status" });
  const thr = h("input", { id: "ci-threshold", type: "range", min: 0, max: 1, step: 0.01, value: g.threshold ?? 0 });
  const thrOut = h("output", { id: "ci-threshold-value" }, Number(thr.value).toFixed(2));
  const maxEdges = h("input", { id: "max-edges", type: "number", min: 1, max: 20000, value: g.maxEdges || 2000 });
  const kindSigned = h("input", { type: "radio", name: "edge-kind", id: "edge-signed", value: "signed" });
  const kindAbs = h("input", { type: "radio", name: "edge-kind", id: "edge-abs", value: "abs" });
  (g.edgeKind === "abs" ? kindAbs : kindSigned).checked = true;
  const counts = h("span", { id: "graph-counts", class: "muted" });
  const canvas = h("div", { id: "graph", class: "graph-wrap" });
  const card = h("aside", { id: "node-card", class: "node-card" }, h("p", { class: "muted" }, "Click a node to pin it and see its component card."));
  const pinnedBox = h("div", { id: "pinned", class: "pinned" });

  function showPinned() {
    pinnedBox.replaceChildren(h("b", {}, `Pinned (${S.pinned.length}): `),
      S.pinned.length ? S.pinned.map((k) => h("code", { class: "chip" }, k)) : h("span", { class: "muted" }, "none"),
      " ", h("button", { id: "to-interventions", disabled: S.pinned.length ? null : true, onclick: () => {
        S.interv = { text: S.graph.text, nodes: S.pinned.slice(), label: S.graph.label, graphId: S.graph.gid };
        location.hash = "#/interventions";
      } }, "Intervene on pinned →"),
      " ", h("button", { class: "ghost", disabled: S.pinned.length ? null : true, onclick: () => { S.pinned = []; draw(); showPinned(); } }, "clear"));
  }

  async function load() {
    if (!g.gid) return;
    status.replaceChildren(h("span", { class: "muted" }, "loading graph…"));
    try {
      const art = await api(`${runPath(S.run)}/graphs/${g.gid}?ci_threshold=${g.threshold ?? 0}&max_edges=${g.maxEdges || 2000}`);
      g.art = art;
      draw();
      const m = art.metadata;
      counts.textContent = `${art.nodes.length} nodes · ${art.edges.length} edges shown (of ${m.n_edges_total} stored; CI > ${Number(m.ci_threshold).toFixed(2)}${art.edges.length >= (g.maxEdges || 2000) ? `, capped at ${g.maxEdges || 2000}` : ""})`;
      const metrics = m.metrics ? ` · P(label): ${Object.entries(m.metrics.label_prob || {}).map(([k, v]) => `${k} ${Number(v).toFixed(3)}`).join(", ")}` : "";
      status.replaceChildren(h("span", {}, `graph ${g.gid} (${m.graph_kind})${metrics}`));
    } catch (e) { status.replaceChildren(errorBox(e.message)); }
  }

  function draw() {
    if (!g.art) return;
    g.controller = window.SPDGraph.renderGraph(canvas, g.art, {
      edgeKind: g.edgeKind || "signed", pinned: S.pinned,
      onPinChange: (keys) => { S.pinned = keys; showPinned(); },
      onNodeClick: (n) => showCard(card, n),
    });
    g.controller.svg.dataset.graphId = String(g.gid);
  }

  async function compute() {
    g.text = prompt.value.trim(); g.label = label.value.trim(); g.mode = mode.value; g.steps = Number(steps.value);
    const bar = progressBar();
    status.replaceChildren(bar);
    try {
      const job = await api(`${runPath(S.run)}/graphs`, { text: g.text, label_token: g.label || null, mode: g.mode, steps: g.steps });
      const res = await waitJob(job, bar.update);
      g.gid = res.graph_id; S.pinned = [];
      showPinned();
      await load();
    } catch (e) { status.replaceChildren(errorBox(e.message)); }
  }

  let debounce = null;
  thr.addEventListener("input", () => {
    thrOut.textContent = Number(thr.value).toFixed(2);
    clearTimeout(debounce);
    debounce = setTimeout(() => { g.threshold = Number(thr.value); load(); }, 250);
  });
  maxEdges.addEventListener("change", () => { g.maxEdges = Number(maxEdges.value); load(); });
  for (const r of [kindSigned, kindAbs]) r.addEventListener("change", () => {
    g.edgeKind = r.value;
    if (g.controller) g.controller.setEdgeKind(g.edgeKind);
  });

  view.replaceChildren(
    h("h1", {}, "Graph explorer"),
    h("div", { class: "form" },
      h("label", {}, "Prompt", prompt),
      h("div", { class: "row" }, h("label", {}, "Target token", label), h("label", {}, "Graph", mode), h("label", {}, "Steps", steps),
        h("button", { id: "compute", class: "primary", onclick: compute }, "Compute graph"))),
    status,
    h("div", { class: "controls" },
      h("span", { class: "toggle" }, kindSigned, h("label", { for: "edge-signed" }, "signed"), kindAbs, h("label", { for: "edge-abs" }, "abs-target")),
      h("label", {}, "CI threshold ", thr, thrOut),
      h("label", {}, "max edges ", maxEdges),
      counts,
      h("span", { class: "legend" }, h("i", { class: "sw pos" }), "positive ", h("i", { class: "sw neg" }), "negative")),
    pinnedBox,
    h("div", { class: "graph-layout" }, canvas, card));
  showPinned();
  if (g.gid) await load();
}

async function showCard(card, n) {
  card.replaceChildren(h("h3", {}, n.key));
  const facts = n.layer === "output"
    ? `output "${n.output_token}" · p ${Number(n.prob || 0).toFixed(4)} · logit ${Number(n.act).toFixed(3)}`
    : `token "${n.token ?? ""}" at position ${n.pos} · CI ${Number(n.ci).toFixed(3)} · act ${Number(n.act).toFixed(3)}`;
  card.appendChild(h("p", { class: "muted" }, facts));
  if (n.layer === "embed" || n.layer === "output") return;
  const comp = `${n.layer}:${n.index}`;
  card.appendChild(h("p", { class: "muted" }, "loading component…"));
  try {
    const c = await api(`${runPath(S.run)}/components/${encodeURIComponent(comp)}`);
    card.lastChild.remove();
    if (c.notice) { card.appendChild(h("p", { class: "notice", id: "card-notice" }, c.notice)); return; }
    const info = c.info;
    card.appendChild(h("p", { class: "label-line" }, info.label ? h("b", {}, info.label) : h("span", { class: "muted" }, "no label yet (spd-mcp label RUN)")));
    card.appendChild(h("p", { class: "muted small" }, `density ${(info.summary.density * 100).toFixed(2)}% ${info.is_bias ? "· always-on (bias)" : ""}`));
    const toks = (list) => list.length ? list.map((t) => h("span", { class: "chip" }, t.token, h("small", {}, ` ${t.pmi.toFixed(1)}`))) : h("span", { class: "muted" }, "—");
    card.appendChild(h("div", {}, h("b", {}, "fires on: "), toks(info.top_input_tokens)));
    card.appendChild(h("div", {}, h("b", {}, "predicts: "), toks(info.top_output_tokens)));
    card.appendChild(h("h4", {}, "Activation examples"));
    card.appendChild(h("ol", { class: "examples" }, c.examples.examples.map((ex) => h("li", {}, renderExample(ex)))));
  } catch (e) { card.lastChild.remove(); card.appendChild(errorBox(e.message)); }
}

/* An example window: the firing token in bold, every token shaded by the component's CI. */
function renderExample(ex) {
  if (!ex.tokens) return ex.text;
  return h("span", {}, ex.tokens.map((t, i) => {
    const ci = ex.ci ? ex.ci[i] : 0;
    return h("span", { class: i === ex.firing_index ? "tok firing" : "tok", style: `background: rgba(217,119,6,${Math.min(0.8, ci).toFixed(2)})` }, t, " ");
  }));
}

async function pageInterventions(view) {
  await ensureRun();
  const iv = S.interv || (S.interv = { text: (S.graph && S.graph.text) || defaultPrompt().text, nodes: S.pinned.slice(), label: (S.graph && S.graph.label) || defaultPrompt().label, graphId: S.graph && S.graph.gid });
  const prompt = h("textarea", { id: "iv-prompt", rows: 2 }); prompt.value = iv.text || "";
  const nodes = h("textarea", { id: "iv-nodes", rows: 2, placeholder: "node keys LAYER:POS:C, comma or space separated" }); nodes.value = (iv.nodes || []).join(", ");
  const label = h("input", { id: "iv-label", value: iv.label || "", placeholder: "label token" });
  const pgdSteps = h("input", { id: "pgd-steps", type: "number", min: 1, max: 200, value: iv.pgdSteps || 20 });
  const pgdSize = h("input", { id: "pgd-step-size", type: "number", min: 0.001, max: 1, step: 0.01, value: iv.pgdStepSize || 0.1 });
  const topk = h("input", { id: "top-k", type: "number", min: 1, max: 20, value: iv.topK || 5 });
  const rest = h("input", { id: "ablate-rest", type: "checkbox", disabled: iv.graphId ? null : true });
  rest.checked = Boolean(iv.ablateRest && iv.graphId);
  const status = h("div", { class: "status" });
  const out = h("div", { id: "iv-results" });

  async function run() {
    iv.text = prompt.value.trim(); iv.label = label.value.trim();
    iv.nodes = nodes.value.split(/[\s,]+/).filter(Boolean);
    iv.pgdSteps = Number(pgdSteps.value); iv.pgdStepSize = Number(pgdSize.value); iv.topK = Number(topk.value); iv.ablateRest = rest.checked;
    const bar = progressBar();
    status.replaceChildren(bar);
    try {
      const job = await api(`${runPath(S.run)}/interventions`, { text: iv.text, nodes: iv.nodes, label_token: iv.label || null,
        pgd_steps: iv.pgdSteps, pgd_step_size: iv.pgdStepSize, top_k: iv.topK, ablate_rest_of: rest.checked ? iv.graphId : null });
      const res = await waitJob(job, bar.update);
      iv.result = res.result; iv.ablated = res.ablated_nodes;
      status.replaceChildren();
      renderIntervention(out, iv);
    } catch (e) { status.replaceChildren(errorBox(e.message)); }
  }

  view.replaceChildren(
    h("h1", {}, "Interventions"),
    h("p", { class: "muted" }, "Run the selected nodes under four regimes — ci (only these nodes on), stochastic (the rest random), adversarial (the rest chosen by PGD to hurt), ablated (the full model with these nodes off, or with the rest of the graph off) — and compare each position's predictions with the target model's."),
    h("div", { class: "form" },
      h("label", {}, "Prompt", prompt), h("label", {}, "Nodes", nodes),
      h("div", { class: "row" }, h("label", {}, "Label token", label), h("label", {}, "PGD steps", pgdSteps), h("label", {}, "PGD step size", pgdSize), h("label", {}, "top-k", topk),
        h("label", { class: "check", title: iv.graphId ? "ablated regime: switch off the graph's other component nodes" : "compute a graph for this prompt first" }, rest, ` ablate the rest of graph ${iv.graphId ?? "—"}`),
        h("button", { id: "run-intervention", class: "primary", onclick: run }, "Run"))),
    status, out);
  if (iv.result) renderIntervention(out, iv);
}

function renderIntervention(out, iv) {
  const r = iv.result;
  const label = r.label_token;
  const summary = h("table", { class: "grid compact", id: "iv-summary" },
    h("thead", {}, h("tr", {}, h("th", {}, ""), h("th", {}, "target"), REGIMES.map((g) => h("th", {}, g)))),
    h("tbody", {},
      h("tr", {}, h("td", {}, r.loss_context === "kl" ? "KL to target" : `CE of "${label}"`), h("td", {}, Number(r.loss.target).toFixed(4)), REGIMES.map((g) => h("td", {}, r.loss[g] !== undefined ? Number(r.loss[g]).toFixed(4) : "—"))),
      r.label_prob ? h("tr", {}, h("td", {}, `P("${label}") at position ${r.label_position}`), h("td", {}, Number(r.label_prob.target).toFixed(4)), REGIMES.map((g) => h("td", {}, r.label_prob[g] !== undefined ? Number(r.label_prob[g]).toFixed(4) : "—"))) : null));
  const cell = (list, labelP, regime) => {
    const inTop = list.some((t) => t.token === label);
    return h("td", { class: "preds", dataset: { regime } },
      h("ol", {}, list.map((t) => h("li", { class: t.token === label ? "label-token" : "" }, h("span", { class: "ptok" }, t.token), h("span", { class: "prob" }, Number(t.prob).toFixed(3)), h("span", { class: "bar", style: `width:${Math.round(t.prob * 60)}px` })))),
      label && !inTop && labelP !== undefined ? h("div", { class: "label-token outside", title: "label token, outside the top-k" }, h("span", { class: "ptok" }, `${label}`), h("span", { class: "prob" }, Number(labelP).toFixed(4))) : null);
  };
  const rows = r.predictions.map((p) => h("tr", { dataset: { pos: p.pos } },
    h("th", { class: "pos" }, `${p.pos}`, h("div", { class: "muted small" }, `"${p.input_token}"`)),
    cell(p.target, p.label && p.label.target, "target"),
    REGIMES.map((g) => cell(p.regimes[g] || [], p.label && p.label[g], g))));
  out.replaceChildren(
    h("p", {}, `${r.n_nodes} nodes kept`, iv.ablated && iv.ablateRest ? `; the ablated regime switches off the graph's other ${iv.ablated.length} component nodes` : "", label ? ` · label token "${label}" is highlighted` : ""),
    summary,
    h("table", { class: "grid preds-table", id: "iv-table" },
      h("thead", {}, h("tr", {}, h("th", {}, "position"), h("th", {}, "target model"), REGIMES.map((g) => h("th", { class: "regime" }, g)))),
      h("tbody", {}, rows)));
}

async function pageInvestigations(view) {
  await ensureRun();
  const onlyRun = h("input", { type: "checkbox", id: "only-run" });
  onlyRun.checked = sessionStorage.getItem("spd-only-run") === "1";
  const list = h("div", { id: "inv-list" });
  const question = h("textarea", { id: "question", rows: 3, placeholder: "What should the investigator find out? (or upload a .md / .txt file)" });
  const file = h("input", { type: "file", id: "question-file", accept: ".md,.txt,text/plain,text/markdown" });
  const launchStatus = h("div", { id: "launch-status" });
  file.addEventListener("change", async () => {
    if (file.files && file.files[0]) question.value = await file.files[0].text();
  });
  async function launch() {
    launchStatus.replaceChildren(h("span", { class: "muted" }, "launching…"));
    try {
      const res = await api("/api/investigations", { run: S.run, question: question.value });
      launchStatus.replaceChildren(
        res.notice ? h("div", { class: "notice", id: "launch-notice" }, res.notice) : h("div", { class: "ok" }, "Claude Code investigation started."),
        res.task_id ? h("a", { href: `#/investigation/${encodeURIComponent(res.task_id)}` }, `open ${res.task_id} →`) : h("span", { class: "muted" }, `the task directory has not appeared yet; launcher log: ${res.log}`));
      refresh();
    } catch (e) { launchStatus.replaceChildren(errorBox(e.message)); }
  }
  async function refresh() {
    try {
      const data = await api(`/api/investigations${onlyRun.checked ? `?run=${encodeURIComponent(S.run)}` : ""}`);
      const rows = data.investigations.map((t) => h("tr", {},
        h("td", {}, h("span", { class: `status-badge ${t.status}` }, t.status.replace("_", " "))),
        h("td", {}, h("a", { href: `#/investigation/${encodeURIComponent(t.dir)}` }, t.title || "(untitled)")),
        h("td", { class: "q" }, t.question.length > 160 ? `${t.question.slice(0, 160)}…` : t.question),
        h("td", {}, t.run),
        h("td", {}, t.last_event ? `${t.last_event.type}: ${t.last_event.message.slice(0, 80)}` : "—"),
        h("td", {}, fmtAge(t.age_s))));
      list.replaceChildren(rows.length ? h("table", { class: "grid", id: "inv-table" },
        h("thead", {}, h("tr", {}, ["status", "title", "question", "run", "last event", "age"].map((c) => h("th", {}, c)))), h("tbody", {}, rows))
        : h("p", { class: "muted" }, `No investigations under ${data.root} yet.`));
    } catch (e) { list.replaceChildren(errorBox(e.message)); }
  }
  onlyRun.addEventListener("change", () => { sessionStorage.setItem("spd-only-run", onlyRun.checked ? "1" : "0"); refresh(); });
  view.replaceChildren(
    h("h1", {}, "Investigations"),
    h("label", { class: "check" }, onlyRun, ` only run ${S.run}`),
    list,
    h("section", { class: "card" }, h("h2", {}, "New investigation"),
      h("p", { class: "muted" }, `Runs Claude Code against an MCP server for run ${S.run} (spd-mcp investigate); without Claude Code or an API key, the built-in scripted investigator runs instead.`),
      question, h("div", { class: "row" }, file, h("button", { id: "launch", class: "primary", onclick: launch }, "Launch")), launchStatus));
  await refresh();
  S.timers.push(setInterval(refresh, 3000));
}

/* A task directory: an investigation (base /api/investigations/ID) or a benchmark run's task. */
async function pageInvestigation(view, id, base = `/api/investigations/${encodeURIComponent(id)}`, back = ["#/investigations", "← investigations"]) {
  try { await ensureRun(); } catch { /* the log does not need the run */ }
  let lastStamp = null;
  const artifacts = new Map();
  async function refresh() {
    let d;
    try { d = await api(base); } catch (e) { view.replaceChildren(errorBox(e.message)); clearTimers(); return; }
    const stamp = `${d.log_chars}|${d.events.length}|${d.summary.status}|${d.explanations.length}|${d.summary.updated}`;
    if (stamp === lastStamp) return;
    lastStamp = stamp;
    const log = h("div", { class: "log markdown", id: "research-log" });
    log.innerHTML = d.log_html; // sanitised server-side (raw HTML off, link allow-list)
    const summary = h("div", { class: "markdown" });
    summary.innerHTML = d.summary_html;
    const scroll = window.scrollY;
    view.replaceChildren(
      h("p", {}, h("a", { href: back[0] }, back[1])),
      h("h1", {}, d.summary.title || "(untitled investigation)", " ", h("span", { class: `status-badge ${d.summary.status}`, id: "inv-status" }, d.summary.status.replace("_", " "))),
      h("p", { class: "question" }, h("b", {}, "Question: "), d.info.question),
      h("p", { class: "muted small" }, `run ${d.info.run} · ${d.id} · created ${d.info.created} · ${d.info.launcher ? `launcher ${d.info.launcher.kind || ""}` : ""}`),
      d.summary.summary ? h("section", { class: "card" }, h("h2", {}, "Summary"), summary) : "",
      d.explanations.length ? h("section", {}, h("h2", {}, "Explanations"), d.explanations.map(explanationCard)) : "",
      h("div", { class: "inv-layout" },
        h("section", { class: "log-col" }, h("h2", {}, "Research log"), log),
        h("aside", { class: "timeline" }, h("h2", {}, `Events (${d.events.length})`),
          h("ol", { id: "timeline" }, d.events.slice().reverse().map((e) => h("li", {}, h("span", { class: "ts" }, e.ts.slice(11, 19)), " ", h("b", {}, e.type), ` ${e.source}: ${e.message}`))))));
    for (const slot of summary.querySelectorAll(".artifact-slot")) {
      slot.replaceChildren(h("a", { href: location.hash, onclick: (ev) => {
        ev.preventDefault();
        const target = log.querySelector(`.artifact-slot[data-artifact="${CSS.escape(slot.dataset.artifact)}"]`);
        if (target) target.scrollIntoView({ behavior: "smooth" });
      } }, `[graph ${slot.dataset.artifact}]`));
    }
    for (const slot of log.querySelectorAll(".artifact-slot")) await fillArtifact(slot, base, artifacts);
    window.scrollTo(0, scroll);
    if (d.summary.status !== "in_progress") clearTimers();
  }
  await refresh();
  S.timers.push(setInterval(refresh, 2000));
}

async function fillArtifact(slot, base, cache) {
  const aid = slot.dataset.artifact;
  try {
    if (!cache.has(aid)) cache.set(aid, await api(`${base}/artifacts/${encodeURIComponent(aid)}`));
    const art = cache.get(aid);
    const canvas = h("div", { class: "graph-wrap inline" });
    const signed = h("button", { class: "ghost", onclick: () => ctl.setEdgeKind("signed") }, "signed");
    const abs = h("button", { class: "ghost", onclick: () => ctl.setEdgeKind("abs") }, "abs-target");
    slot.replaceChildren(h("div", { class: "artifact" },
      h("div", { class: "artifact-head" }, h("b", {}, art.title), ` · ${art.nodes.length} nodes, ${art.edges.length} edges · `, signed, abs),
      art.caption ? h("p", { class: "muted small" }, art.caption) : null, canvas));
    const ctl = window.SPDGraph.renderGraph(canvas, art, { compact: true, rowHeight: 36 });
    ctl.svg.dataset.artifact = aid;
  } catch (e) { slot.replaceChildren(errorBox(`artifact ${aid}: ${e.message}`)); }
}

function explanationCard(x) {
  return h("article", { class: "card explanation" },
    h("h3", {}, x.behaviour, " ", h("span", { class: "conf" }, `confidence ${Number(x.confidence).toFixed(2)}`)),
    h("div", { class: "cols" },
      h("div", {}, h("h4", {}, "Components"), h("ul", {}, (x.components || []).map((c) => h("li", {}, h("code", {}, c.key), ` ${c.role}`)))),
      h("div", {}, h("h4", {}, "Evidence"), h("ul", {}, (x.evidence || []).map((e) => h("li", {}, h("span", { class: "chip" }, e.type), ` ${e.description}`, e.value !== null && e.value !== undefined ? h("span", { class: "muted" }, ` (${typeof e.value === "number" ? e.value.toFixed(3) : e.value})`) : null))))),
    (x.alternatives || []).length ? h("p", { class: "small" }, h("b", {}, "Alternatives: "), x.alternatives.join("; ")) : null,
    (x.limitations || []).length ? h("p", { class: "small" }, h("b", {}, "Limitations: "), x.limitations.join("; ")) : null);
}

// -- benchmark results -----------------------------------------------------------------------------
const OUTCOMES = ["success", "wrong", "inconclusive", "invalid"];
const pct = (x) => `${Math.round(100 * x)}%`;
const fmtNum = (x, digits = 2) => (x === null || x === undefined ? "—" : Number(x).toFixed(digits));
const fmtCost = (x) => (x === null || x === undefined ? "—" : `$${Number(x).toFixed(x < 0.1 ? 4 : 2)}`);
const fmtInt = (x) => (x === null || x === undefined ? "—" : Number(x).toLocaleString("en"));
const rateText = (s) => `${s.successes}/${s.n_runs} = ${pct(s.success_rate)} (95% CI ${pct(s.ci95[0])}–${pct(s.ci95[1])})`;
const outcomeBadge = (o, text) => h("span", { class: `outcome ${o}` }, text ?? o);

async function pageBenchList(view) {
  const data = await api("/api/bench");
  const rows = data.results.map((b) => h("tr", {},
    h("td", {}, h("a", { href: `#/bench/${encodeURIComponent(b.name)}` }, b.name), b.error ? errorBox(b.error) : null),
    h("td", {}, (b.agents || []).join(", ")),
    h("td", {}, b.error ? "" : rateText(b)),
    h("td", { class: "num" }, fmtCost(b.cost_usd)),
    h("td", { class: "num" }, b.error ? "" : fmtAge(b.agent_seconds + b.grade_seconds)),
    h("td", {}, b.updated.slice(0, 19).replace("T", " "))));
  view.replaceChildren(
    h("h1", {}, "Bench"),
    h("p", { class: "muted" }, "Results of ", h("code", {}, "spd-mcp bench run"), " under ", h("code", {}, data.root), " (and any ", h("code", {}, "spd-mcp view --bench DIR"), "), most recently updated first."),
    rows.length ? h("table", { class: "grid", id: "bench-table" },
      h("thead", {}, h("tr", {}, ["results", "agents", "success (95% CI)", "cost", "time", "updated (UTC)"].map((c) => h("th", {}, c)))),
      h("tbody", {}, rows))
      : h("p", { class: "muted" }, "No benchmark results yet."));
}

async function pageBench(view, name) {
  let lastStamp = null;
  const taskHref = (l) => (l.kind === "investigation" ? `#/investigation/${encodeURIComponent(l.id)}` : `#/bench-task/${encodeURIComponent(name)}/${encodeURIComponent(l.id)}`);
  async function refresh() {
    let d;
    try { d = await api(`/api/bench/${encodeURIComponent(name)}`); } catch (e) { view.replaceChildren(errorBox(e.message)); clearTimers(); return; }
    const stamp = `${d.updated}|${d.records.length}`;
    if (stamp === lastStamp) return;
    lastStamp = stamp;
    const s = d.summary;
    const runs = d.records.map((r) => h("tr", { dataset: { outcome: r.outcome } },
      h("td", {}, r.task_link ? h("a", { href: taskHref(r.task_link) }, r.task_id) : [r.task_id, r.task_dir ? h("div", { class: "muted small" }, r.task_dir) : null]),
      h("td", { class: "num" }, r.repeat), h("td", {}, r.agent),
      h("td", {}, outcomeBadge(r.outcome)),
      h("td", { class: "num" }, fmtNum(r.own_drop)), h("td", { class: "num" }, fmtNum(r.max_other_drop)), h("td", { class: "num" }, fmtNum(r.random_drop)),
      h("td", { class: "num", title: r.components.join(", ") }, r.components.length),
      h("td", { class: "num" }, fmtInt(r.tool_calls), r.tool_errors ? h("span", { class: "muted" }, ` (${r.tool_errors} err)`) : null),
      h("td", { class: "num" }, fmtCost(r.cost_usd)),
      h("td", { class: "reason" }, r.reason)));
    const tasks = Object.entries(s.tasks).map(([t, x]) => h("tr", {},
      h("td", {}, t), h("td", {}, `${pct(x.success_rate)} (${pct(x.ci95[0])}–${pct(x.ci95[1])})`),
      h("td", {}, x.outcomes.map((o) => outcomeBadge(o))), h("td", { class: "num" }, fmtInt(x.tool_calls)), h("td", { class: "num" }, fmtCost(x.cost_usd))));
    view.replaceChildren(
      h("p", {}, h("a", { href: "#/bench" }, "← bench")),
      h("h1", {}, name),
      h("p", { class: "muted small" }, d.path),
      h("section", { class: "card", id: "bench-summary" },
        h("p", {}, h("b", {}, `Success ${rateText(s)}`)),
        h("p", { class: "outcomes" }, OUTCOMES.map((o) => outcomeBadge(o, `${o} ${s.outcomes[o]}`))),
        h("p", { class: "muted" }, `${fmtInt(s.tool_calls)} tool calls · ${fmtInt(s.tool_errors)} errors · tokens ${fmtInt(s.input_tokens)} in, ${fmtInt(s.output_tokens)} out · cost ${fmtCost(s.cost_usd)} · agents ${fmtAge(s.agent_seconds)} · grading ${fmtAge(s.grade_seconds)}`)),
      h("h2", {}, "Tasks"),
      h("table", { class: "grid compact", id: "bench-tasks" },
        h("thead", {}, h("tr", {}, ["task", "success (95% CI)", "outcomes", "tool calls", "cost"].map((c) => h("th", {}, c)))),
        h("tbody", {}, tasks)),
      h("h2", {}, `Runs (${d.records.length})`),
      h("table", { class: "grid", id: "bench-runs" },
        h("thead", {}, h("tr", {}, ["task", "repeat", "agent", "outcome", "own drop", "max other drop", "random drop", "components", "tool calls", "cost", "reason"].map((c) => h("th", {}, c)))),
        h("tbody", {}, runs)));
  }
  await refresh();
  S.timers.push(setInterval(refresh, 5000)); // a run still in progress appends results
}

// -- router --------------------------------------------------------------------------------------
async function route() {
  clearTimers();
  const view = document.getElementById("view");
  const hash = location.hash || "#/runs";
  const [, page, arg] = hash.match(/^#\/([^/]*)\/?(.*)$/) || [null, "runs", ""];
  const nav = { investigation: "investigations", "bench-task": "bench" }[page] || page;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.nav === nav);
  view.replaceChildren(h("p", { class: "muted" }, "loading…"));
  try {
    if (page === "graph") await pageGraph(view);
    else if (page === "interventions") await pageInterventions(view);
    else if (page === "investigations") await pageInvestigations(view);
    else if (page === "investigation") await pageInvestigation(view, decodeURIComponent(arg));
    else if (page === "bench" && arg) await pageBench(view, decodeURIComponent(arg));
    else if (page === "bench") await pageBenchList(view);
    else if (page === "bench-task") {
      const [name, id] = arg.split("/").map(decodeURIComponent);
      await pageInvestigation(view, id, `/api/bench/${encodeURIComponent(name)}/tasks/${encodeURIComponent(id)}`, [`#/bench/${encodeURIComponent(name)}`, `← bench ${name}`]);
    }
    else await pageRuns(view);
  } catch (e) { view.replaceChildren(errorBox(e.message)); }
  document.body.dataset.page = page || "runs";
  document.body.dataset.loaded = String(Date.now());
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", route);
