"""Attribution graphs, stored get-or-create: natural (compute_graph) and optimised
(optimize_graph) graphs of a prompt, and stored graphs by id."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from spd_mcp.analysis.graph import AttributionGraph, compute_graph
from spd_mcp.analysis.graph_view import (
    GraphEdge,
    GraphNode,
    graph_from_bytes,
    graph_to_bytes,
    summarize_nodes,
    view_graph,
)
from spd_mcp.analysis.intervene import random_node_sets, run_intervention
from spd_mcp.analysis.optimize import (
    OptimizedCI,
    OptimizeMetrics,
    OptimizeSettings,
    Task,
    circuit_nodes,
    optimize_ci,
)
from spd_mcp.errors import InputError
from spd_mcp.keys import OUTPUT, NodeKey, is_special_layer
from spd_mcp.model.session import RunSession

from .model_info import validity_note
from .prompts import check_position, label_id, resolve_prompt
from .state import AppState, ProgressFn, compute
from .worker import remote

MAX_STORED_EDGES = 200_000
PREVIEW_EDGES = 15
GRAPH_KINDS = ("graph", "optimized_graph")


class GraphSummary(BaseModel):
    graph_id: int
    cached: bool = Field(description="true when an identical earlier call's graph was returned")
    tokens: list[str]
    n_nodes: int
    n_edges: int
    outputs: list[GraphNode] = Field(description="output nodes with target probabilities")
    top_edges: list[GraphEdge] = Field(description=f"the {PREVIEW_EDGES} largest |signed| edges")
    hint: str = "use get_graph(graph_id=…) to filter edges by node, CI threshold, sign, or page"
    validity_note: str | None = Field(
        None, description="a caution when the decomposition fails its validity checks")
    remainder_note: str | None = Field(None, description="why a node's act ≠ its in_sum")


class NecessityCheck(BaseModel):
    """The circuit's nodes ablated in the full model (delta kept), against random same-size
    sets of alive nodes at the same layers and positions."""

    prompt: int = Field(description="index of the prompt (0: the graph's prompt)")
    n_nodes: int
    target_prob: float
    ablated_prob: float
    random_prob_mean: float
    random_prob_min: float
    n_random: int


class OptimizedGraph(GraphSummary):
    metrics: OptimizeMetrics
    claim: str = Field(description="what this circuit shows, and what it does not")
    necessity: list[NecessityCheck] = Field(
        description="label probability with the circuit ablated vs random same-size sets")
    components: list[str] = Field(description="the circuit's components (shared across prompts)")
    per_prompt: list[OptimizeMetrics] | None = Field(
        None, description="metrics for every prompt (multi-prompt circuits)")
    circuit: list[GraphNode] = Field(description="component nodes kept by the optimisation")


class PromptTask(BaseModel):
    """One prediction a multi-prompt circuit must keep."""

    model_config = ConfigDict(extra="forbid")
    text: str
    label_token: str
    contrast_token: str | None = None
    position: int = -1


G = TypeVar("G", bound=GraphSummary)


def _summary(session: RunSession, gid: int, g: AttributionGraph, cached: bool) -> GraphSummary:
    view = view_graph(session, gid, g, top_k=PREVIEW_EDGES)
    outputs = [n for n in view.nodes if NodeKey.parse(n.key).layer == OUTPUT]
    return GraphSummary(graph_id=gid, cached=cached, tokens=view.tokens, n_nodes=g.n_nodes,
                        n_edges=g.n_edges, outputs=outputs, top_edges=view.edges,
                        remainder_note=view.remainder_note)


async def _store_graph(
    st: AppState, kind: str, params: dict[str, Any], prompt_id: int, g: AttributionGraph,
    extra: dict[str, Any],
) -> int:
    blob = await asyncio.to_thread(graph_to_bytes, g)
    summary = {"n_nodes": g.n_nodes, "n_edges": g.n_edges, **extra}
    return await st.store.put_result(kind, params, summary, blob, prompt_id)


async def _load_graph(st: AppState, kind: str, params: dict[str, Any]
                      ) -> tuple[int, AttributionGraph, dict[str, Any]] | None:
    found = await st.store.find_result(kind, params)
    if found is None or found[2] is None:
        return None
    gid, summary, blob = found
    return gid, await asyncio.to_thread(graph_from_bytes, blob), summary


def _natural_graph(s: RunSession, ids: list[int], *, ci_threshold: float, pos: int,
                   top_k_outputs: int, label: int | None,
                   progress: ProgressFn | None = None
                   ) -> tuple[AttributionGraph, GraphSummary]:
    """The graph and its summary (graph id 0 until stored: the summary is built where the
    graph is, so a worker process spares the server that work)."""
    nat = s.natural_ci(ids)
    g = compute_graph(
        s.cm, s.topology, ids, s.to_module_dict(nat.ci), ci_threshold=ci_threshold,
        output_positions=[pos], top_k_outputs=top_k_outputs, label_token=label,
        max_edges=MAX_STORED_EDGES, progress=progress)
    return g, _summary(s, 0, g, False)


async def natural_graph(
    st: AppState, *, text: str | None, prompt_id: int | None, ci_threshold: float = 0.0,
    output_position: int = -1, top_k_outputs: int = 5, label_token: str | None = None,
    progress: ProgressFn | None = None,
) -> GraphSummary:
    """The attribution graph of a prompt with natural CI (stored get-or-create)."""
    ids, pid = await resolve_prompt(st, text, prompt_id)
    pos = check_position(output_position, len(ids), "output_position")
    label = label_id(st, label_token)
    params = {"prompt_id": pid, "ci_threshold": ci_threshold, "output_position": pos,
              "top_k_outputs": top_k_outputs, "label_token": label}
    hit = await _load_graph(st, "graph", params)
    if hit is not None:
        found = await asyncio.to_thread(_summary, st.session, hit[0], hit[1], True)
        return await _noted(st, found, hit[1])
    s = st.session
    g, out = await compute(st, "compute_graph", remote(
        _natural_graph, s, ids, ci_threshold=ci_threshold, pos=pos,
        top_k_outputs=top_k_outputs, label=label, progress=progress))
    gid = await _store_graph(st, "graph", params, pid, g, {"kind": "natural"})
    out.graph_id = gid
    return await _noted(st, out, g)


N_RANDOM = 8
"""Random same-size node sets in an optimised circuit's necessity check."""


def _claim(m: OptimizeMetrics, nec: NecessityCheck, n_prompts: int) -> str:
    lp = m.label_prob or {}
    what = (f"kept '{m.label_token}'" + (f" over '{m.contrast_token}'" if m.contrast_token
                                         else ""))
    multi = f" shared by {n_prompts} prompts" if n_prompts > 1 else ""
    verdict = ("necessary" if nec.ablated_prob < 0.5 * nec.target_prob
               and nec.random_prob_mean >= 0.8 * nec.target_prob else
               "NOT shown necessary" if nec.ablated_prob >= 0.5 * nec.target_prob
               else "not specific (random sets hurt too)")
    return (f"Sufficient{multi}: with only these nodes on, the model {what} "
            f"(P {lp.get('ci', 0):.3f} under CI masks, {lp.get('adversarial', 0):.3f} under "
            "adversarial masks). The masks "
            "are computed from this input, so the circuit may carry the answer from this prompt "
            "itself: it shows what suffices here, not what generalises; test it on other "
            f"prompts. Necessity: ablating its {nec.n_nodes} nodes in the full model gives P "
            f"{nec.ablated_prob:.3f} (target {nec.target_prob:.3f}; {nec.n_random} random "
            f"same-size sets: mean {nec.random_prob_mean:.3f}) — {verdict}.")


def _necessity(s: RunSession, opt: OptimizedCI, tasks: list[Task]) -> list[NecessityCheck]:
    out = []
    for i, t in enumerate(tasks):
        nodes = circuit_nodes(opt, i)
        if t.label is None or not nodes:
            continue
        nat = s.natural_ci(t.ids)
        alive = [NodeKey(la, int(p), int(c)) for la, g in nat.ci.items()
                 for p, c in torch.nonzero(g > 0).tolist()]
        controls, _ = random_node_sets(nodes, alive, s.keys.Cs, N_RANDOM,
                                       torch.Generator().manual_seed(i))
        r = run_intervention(s, t.ids, nodes, regimes=["ablated"], loss="label",
                             label_token=t.label, label_position=t.position, controls=controls)
        assert r.label_prob is not None and r.controls is not None and r.controls.label
        spread = r.controls.label["ablated"]
        out.append(NecessityCheck(
            prompt=i, n_nodes=len(nodes), target_prob=r.label_prob["target"],
            ablated_prob=r.label_prob["ablated"], random_prob_mean=spread.prob_mean,
            random_prob_min=spread.prob_min, n_random=N_RANDOM))
    return out


def _optimized_graph(s: RunSession, tasks: list[Task], settings: OptimizeSettings,
                     progress: ProgressFn | None = None
                     ) -> tuple[AttributionGraph, dict[str, Any], OptimizedGraph]:
    """The optimised circuit of ``tasks``, its graph on the first, its necessity check, and the
    summary (graph id 0 until stored)."""
    t0 = tasks[0]
    opt = optimize_ci(s, tasks=tasks, settings=settings, progress=progress)
    g = compute_graph(s.cm, s.topology, t0.ids, s.to_module_dict(opt.ci), ci_threshold=0.0,
                      output_positions=[t0.position], label_token=t0.label,
                      max_edges=MAX_STORED_EDGES)
    nec = _necessity(s, opt, tasks)
    claim = _claim(opt.metrics, nec[0], len(tasks)) if nec else (
        "Sufficient under masks computed from this input (a KL circuit: no label, so no "
        "necessity check was run).")
    extra = {"kind": "optimized", "metrics": opt.metrics.model_dump(),
             "per_prompt": ([m.model_dump() for m in opt.per_prompt] if len(tasks) > 1
                            else None),
             "components": opt.components, "claim": claim,
             "necessity": [n.model_dump() for n in nec]}
    return g, extra, _optimized(s, 0, g, False, extra)


async def optimized_graph(
    st: AppState, *, text: str | None, prompt_id: int | None, label_token: str | None,
    position: int = -1, settings: OptimizeSettings, contrast_token: str | None = None,
    prompts: list[PromptTask] | None = None, progress: ProgressFn | None = None,
) -> OptimizedGraph:
    """A sparse circuit for one prediction (or one shared by several prompts) and its graph,
    with its necessity check (stored get-or-create)."""
    s = st.session
    if prompts:
        if text is not None or prompt_id is not None or label_token is not None:
            raise InputError("give either prompts (a list of {text, label_token, ...}) or "
                             "text / prompt_id with label_token, not both")
        tasks, pids = [], []
        for i, pt in enumerate(prompts):
            try:
                ids, pid = await resolve_prompt(st, pt.text, None)
            except InputError as e:
                raise InputError(f"prompts[{i}].{e}") from None
            try:
                lab = s.token_id(pt.label_token)
                con = label_id(st, pt.contrast_token)
            except InputError as e:
                raise InputError(f"prompts[{i}]: {e}") from None
            tasks.append(Task(ids, check_position(pt.position, len(ids),
                                                  f"prompts[{i}].position"), lab, con))
            pids.append(pid)
    else:
        ids, pid = await resolve_prompt(st, text, prompt_id)
        lab = label_id(st, label_token)
        con = label_id(st, contrast_token)
        if con is not None and lab is None:
            raise InputError("contrast_token needs label_token")
        tasks, pids = [Task(ids, check_position(position, len(ids)), lab, con)], [pid]
    for i, t in enumerate(tasks):
        if t.contrast is not None and t.contrast == t.label:
            where = f"prompts[{i}]." if prompts else ""
            raise InputError(f"{where}contrast_token equals "
                             "label_token; give a different token")
    loss = settings.loss
    if loss in ("ce", "logit", "logit_diff") and any(t.label is None for t in tasks):
        raise InputError(f"loss={loss!r} needs label_token (a vocabulary word); or use loss='kl'")
    if loss == "logit_diff" and any(t.contrast is None for t in tasks):
        raise InputError("loss='logit_diff' needs contrast_token")
    t0 = tasks[0]
    params = {"prompt_id": pids[0], "position": t0.position, "label_token": t0.label,
              **settings.model_dump()}
    if t0.contrast is not None or len(tasks) > 1:
        params["tasks"] = [[p, t.position, t.label, t.contrast] for p, t in zip(pids, tasks,
                                                                                 strict=True)]
    hit = await _load_graph(st, "optimized_graph", params)
    if hit is not None:
        gid, g, summary = hit
        found = await asyncio.to_thread(_optimized, s, gid, g, True, summary)
        return await _noted(st, found, g)

    g, extra, out = await compute(st, "optimize_graph", remote(
        _optimized_graph, s, tasks, settings, progress=progress))
    gid = await _store_graph(st, "optimized_graph", params, pids[0], g, extra)
    out.graph_id = gid
    return await _noted(st, out, g)


async def _noted(st: AppState, out: G, g: AttributionGraph) -> G:
    """``out`` with the validity caution for the layers the graph's components lie in."""
    out.validity_note = await validity_note(st, {lay for lay in g.node_layer
                                                 if not is_special_layer(lay)})
    return out


def _optimized(s: RunSession, gid: int, g: AttributionGraph, cached: bool,
               summary: dict[str, Any]) -> OptimizedGraph:
    base = _summary(s, gid, g, cached)
    comp = [i for i, lay in enumerate(g.node_layer) if not is_special_layer(lay)]
    comp.sort(key=lambda i: -float(g.node_ci[i]))
    return OptimizedGraph(
        **base.model_dump(), metrics=OptimizeMetrics.model_validate(summary["metrics"]),
        claim=summary.get("claim", ""), necessity=summary.get("necessity", []),
        components=summary.get("components", []), per_prompt=summary.get("per_prompt"),
        circuit=summarize_nodes(s, g, comp[:200]))


async def stored_graph_row(st: AppState, graph_id: int
                           ) -> tuple[str, dict[str, Any], dict[str, Any], bytes, int | None]:
    """(kind, params, summary, blob, prompt id) of a stored graph; an error naming recent ids."""
    for kind in GRAPH_KINDS:
        row = await st.store.get_result(kind, graph_id)
        if row is not None and row[2] is not None:
            params, summary, blob, prompt_id = row
            return kind, params, summary, blob, prompt_id
    recent = [i for k in GRAPH_KINDS for i, _ in await st.store.list_results(k, 5)]
    raise InputError(f"graph_id {graph_id} does not exist; recent graph ids: {sorted(recent)} "
                     "(compute one with compute_graph or optimize_graph)")


async def stored_graph(st: AppState, graph_id: int) -> AttributionGraph:
    """A stored graph (natural or optimised) by id."""
    *_, blob, _ = await stored_graph_row(st, graph_id)
    return await asyncio.to_thread(graph_from_bytes, blob)
