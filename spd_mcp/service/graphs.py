"""Attribution graphs, stored get-or-create: natural (compute_graph) and optimised
(optimize_graph) graphs of a prompt, and stored graphs by id."""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

from pydantic import BaseModel, Field

from spd_mcp.analysis.graph import AttributionGraph, compute_graph
from spd_mcp.analysis.graph_view import (
    GraphEdge,
    GraphNode,
    graph_from_bytes,
    graph_to_bytes,
    summarize_nodes,
    view_graph,
)
from spd_mcp.analysis.optimize import OptimizeMetrics, OptimizeSettings, optimize_ci
from spd_mcp.errors import InputError
from spd_mcp.keys import OUTPUT, NodeKey, is_special_layer
from spd_mcp.model.session import RunSession

from .model_info import validity_note
from .prompts import check_position, label_id, resolve_prompt
from .state import AppState, ProgressFn, compute

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


class OptimizedGraph(GraphSummary):
    metrics: OptimizeMetrics
    circuit: list[GraphNode] = Field(description="component nodes kept by the optimisation")


G = TypeVar("G", bound=GraphSummary)


def _summary(session: RunSession, gid: int, g: AttributionGraph, cached: bool) -> GraphSummary:
    view = view_graph(session, gid, g, top_k=PREVIEW_EDGES)
    outputs = [n for n in view.nodes if NodeKey.parse(n.key).layer == OUTPUT]
    return GraphSummary(graph_id=gid, cached=cached, tokens=view.tokens, n_nodes=g.n_nodes,
                        n_edges=g.n_edges, outputs=outputs, top_edges=view.edges)


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
        return await _noted(st, _summary(st.session, hit[0], hit[1], True), hit[1])
    s = st.session

    def work() -> AttributionGraph:
        nat = s.natural_ci(ids)
        return compute_graph(
            s.cm, s.topology, ids, s.to_module_dict(nat.ci), ci_threshold=ci_threshold,
            output_positions=[pos], top_k_outputs=top_k_outputs, label_token=label,
            max_edges=MAX_STORED_EDGES, progress=progress)

    g = await compute(st, "compute_graph", work)
    gid = await _store_graph(st, "graph", params, pid, g, {"kind": "natural"})
    return await _noted(st, _summary(s, gid, g, False), g)


async def optimized_graph(
    st: AppState, *, text: str | None, prompt_id: int | None, label_token: str | None,
    position: int = -1, settings: OptimizeSettings, progress: ProgressFn | None = None,
) -> OptimizedGraph:
    """A sparse circuit for one prediction and its graph (stored get-or-create)."""
    s = st.session
    ids, pid = await resolve_prompt(st, text, prompt_id)
    pos = check_position(position, len(ids))
    label = label_id(st, label_token)
    loss = settings.loss
    if loss in ("ce", "logit") and label is None:
        raise InputError(f"loss={loss!r} needs label_token (a vocabulary word); or use loss='kl'")
    params = {"prompt_id": pid, "position": pos, "label_token": label, **settings.model_dump()}
    hit = await _load_graph(st, "optimized_graph", params)
    if hit is not None:
        gid, g, summary = hit
        return await _noted(st, _optimized(
            s, gid, g, True, OptimizeMetrics.model_validate(summary["metrics"])), g)

    def work() -> tuple[AttributionGraph, OptimizeMetrics]:
        opt = optimize_ci(s, ids, position=pos, label_token=label, settings=settings,
                          progress=progress)
        g = compute_graph(s.cm, s.topology, ids, s.to_module_dict(opt.ci), ci_threshold=0.0,
                          output_positions=[pos], label_token=label, max_edges=MAX_STORED_EDGES)
        return g, opt.metrics

    g, metrics = await compute(st, "optimize_graph", work)
    gid = await _store_graph(st, "optimized_graph", params, pid, g,
                             {"kind": "optimized", "metrics": metrics.model_dump()})
    return await _noted(st, _optimized(s, gid, g, False, metrics), g)


async def _noted(st: AppState, out: G, g: AttributionGraph) -> G:
    """``out`` with the validity caution for the layers the graph's components lie in."""
    out.validity_note = await validity_note(st, {lay for lay in g.node_layer
                                                 if not is_special_layer(lay)})
    return out


def _optimized(s: RunSession, gid: int, g: AttributionGraph, cached: bool,
               metrics: OptimizeMetrics) -> OptimizedGraph:
    base = _summary(s, gid, g, cached)
    comp = [i for i, lay in enumerate(g.node_layer) if not is_special_layer(lay)]
    comp.sort(key=lambda i: -float(g.node_ci[i]))
    return OptimizedGraph(**base.model_dump(), metrics=metrics,
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
