"""Graph tools: compute_graph, optimize_graph, get_graph (graphs are stored and cached)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.tools.base import Tool
from pydantic import BaseModel, Field

from spd_mcp.analysis.graph import AttributionGraph, compute_graph
from spd_mcp.analysis.graph_view import (
    GraphEdge,
    GraphNode,
    GraphView,
    graph_from_bytes,
    graph_to_bytes,
    summarize_nodes,
    view_graph,
)
from spd_mcp.analysis.optimize import OptimizeMetrics, OptimizeSettings, optimize_ci
from spd_mcp.analysis.session import RunSession

from .common import (
    READ_ONLY,
    STORES,
    AppState,
    Progress,
    ProgressFn,
    check_position,
    compute_on,
    fail,
    guard,
    resolve_prompt,
    state,
    strict_tool,
)

TextArg = Annotated[str | None, Field(description="prompt text (or give prompt_id)")]
PromptIdArg = Annotated[int | None, Field(description="a stored prompt's id (or give text)")]
MAX_STORED_EDGES = 200_000
PREVIEW_EDGES = 15


class GraphSummary(BaseModel):
    graph_id: int
    cached: bool = Field(description="true when an identical earlier call's graph was returned")
    tokens: list[str]
    n_nodes: int
    n_edges: int
    outputs: list[GraphNode] = Field(description="output nodes with target probabilities")
    top_edges: list[GraphEdge] = Field(description=f"the {PREVIEW_EDGES} largest |signed| edges")
    hint: str = "use get_graph(graph_id=…) to filter edges by node, CI threshold, sign, or page"


class OptimizedGraph(GraphSummary):
    metrics: OptimizeMetrics
    circuit: list[GraphNode] = Field(description="component nodes kept by the optimisation")


def _summary(session: RunSession, gid: int, g: AttributionGraph, cached: bool) -> GraphSummary:
    view = view_graph(session, gid, g, top_k=PREVIEW_EDGES)
    outputs = [n for n in view.nodes if n.key.startswith("output:")]
    return GraphSummary(graph_id=gid, cached=cached, tokens=view.tokens, n_nodes=g.n_nodes,
                        n_edges=g.n_edges, outputs=outputs, top_edges=view.edges)


async def _store_graph(
    st: AppState, kind: str, params: dict, prompt_id: int, g: AttributionGraph, extra: dict
) -> int:
    blob = await asyncio.to_thread(graph_to_bytes, g)
    summary = {"n_nodes": g.n_nodes, "n_edges": g.n_edges, **extra}
    return await st.store.put_result(kind, params, summary, blob, prompt_id)


async def _load_graph(st: AppState, kind: str, params: dict) -> tuple[int, AttributionGraph,
                                                                    dict] | None:
    found = await st.store.find_result(kind, params)
    if found is None or found[2] is None:
        return None
    gid, summary, blob = found
    return gid, await asyncio.to_thread(graph_from_bytes, blob), summary


def _label(st: AppState, label_token: str | None) -> int | None:
    if label_token is None:
        return None
    return guard(lambda: st.session.token_id(label_token))


async def compute_graph_tool(
    ctx: Context,
    text: TextArg = None,
    prompt_id: PromptIdArg = None,
    ci_threshold: Annotated[float, Field(ge=0, le=1, description="node alive if CI > this")] = 0.0,
    output_position: Annotated[int, Field(description="output position; -1 last")] = -1,
    top_k_outputs: Annotated[int, Field(ge=1, le=20)] = 5,
    label_token: Annotated[str | None, Field(description="also include this output token")] = None,
) -> GraphSummary:
    """Attribution graph of a prompt with natural CI: nodes are alive components at positions
    (plus embed and output tokens); an edge is gradient × source activation on the exact target
    (a direct effect). Example: compute_graph(text="mia found a ball . the ball was")."""
    progress = Progress(ctx, asyncio.get_running_loop(), "attribution graph")
    return await natural_graph(state(ctx), text=text, prompt_id=prompt_id,
                               ci_threshold=ci_threshold, output_position=output_position,
                               top_k_outputs=top_k_outputs, label_token=label_token,
                               progress=progress)


async def natural_graph(
    st: AppState, *, text: str | None, prompt_id: int | None, ci_threshold: float = 0.0,
    output_position: int = -1, top_k_outputs: int = 5, label_token: str | None = None,
    progress: ProgressFn | None = None,
) -> GraphSummary:
    """compute_graph without an MCP context (shared with the viewer); stored get-or-create."""
    ids, pid = await resolve_prompt(st, text, prompt_id)
    pos = check_position(output_position, len(ids), "output_position")
    label = _label(st, label_token)
    params = {"prompt_id": pid, "ci_threshold": ci_threshold, "output_position": pos,
              "top_k_outputs": top_k_outputs, "label_token": label}
    hit = await _load_graph(st, "graph", params)
    if hit is not None:
        return _summary(st.session, hit[0], hit[1], True)
    s = st.session

    def work() -> AttributionGraph:
        nat = s.natural_ci(ids)
        return compute_graph(
            s.cm, s.topology, ids, s.to_module_dict(nat.ci), ci_threshold=ci_threshold,
            output_positions=[pos], top_k_outputs=top_k_outputs, label_token=label,
            max_edges=MAX_STORED_EDGES, progress=progress)

    g = await compute_on(st, "compute_graph", work)
    gid = await _store_graph(st, "graph", params, pid, g, {"kind": "natural"})
    return _summary(s, gid, g, False)


compute_graph_tool.__name__ = "compute_graph"


async def optimize_graph(
    ctx: Context,
    text: TextArg = None,
    prompt_id: PromptIdArg = None,
    label_token: Annotated[str | None, Field(
        description="token whose prediction to explain (for ce / logit)")] = None,
    position: Annotated[int, Field(description="prediction position; -1 = last")] = -1,
    loss: Annotated[Literal["ce", "kl", "logit"], Field(
        description="ce: CE of label_token; kl: KL to target; logit: -logit")] = "ce",
    steps: Annotated[int, Field(ge=1, le=2000)] = 200,
    lr: Annotated[float, Field(gt=0, le=10)] = 0.1,
    imp_coeff: Annotated[float, Field(ge=0, description="importance-minimality weight")] = 0.003,
    p: Annotated[float, Field(gt=0, le=2, description="importance-minimality exponent")] = 0.5,
    mask_type: Annotated[Literal["ci", "stochastic", "both"], Field(
        description="both = ci + stochastic losses; ci = all else off")] = "both",
    adv_coeff: Annotated[float, Field(ge=0, description="weight of an adversarial PGD term")] = 0.0,
    pgd_steps: Annotated[int, Field(ge=1, le=100)] = 10,
    seed: int = 0,
) -> OptimizedGraph:
    """Find a sparse circuit for one prediction: optimise CI of the alive components to keep the
    label token's probability with as few components as possible, then build its attribution
    graph. Reports the label probability under CI, stochastic and adversarial masks and in the
    target. Example: optimize_graph(text="... stella played all day , and then",
    label_token="she")."""
    progress = Progress(ctx, asyncio.get_running_loop(), "optimising CI")
    return await optimized_graph(
        state(ctx), text=text, prompt_id=prompt_id, label_token=label_token, position=position,
        settings=OptimizeSettings(loss=loss, steps=steps, lr=lr, imp_coeff=imp_coeff, p=p,
                                  mask_type=mask_type, adv_coeff=adv_coeff, pgd_steps=pgd_steps,
                                  seed=seed),
        progress=progress)


async def optimized_graph(
    st: AppState, *, text: str | None, prompt_id: int | None, label_token: str | None,
    position: int = -1, settings: OptimizeSettings, progress: ProgressFn | None = None,
) -> OptimizedGraph:
    """optimize_graph without an MCP context (shared with the viewer); stored get-or-create."""
    s = st.session
    ids, pid = await resolve_prompt(st, text, prompt_id)
    pos = check_position(position, len(ids))
    label = _label(st, label_token)
    loss = settings.loss
    if loss in ("ce", "logit") and label is None:
        raise fail(f"loss={loss!r} needs label_token (a vocabulary word); or use loss='kl'")
    params = {"prompt_id": pid, "position": pos, "label_token": label,
              **settings.model_dump()}
    hit = await _load_graph(st, "optimized_graph", params)
    if hit is not None:
        gid, g, summary = hit
        return _optimized(s, gid, g, True, OptimizeMetrics.model_validate(summary["metrics"]))

    def work() -> tuple[AttributionGraph, OptimizeMetrics]:
        opt = optimize_ci(s, ids, position=pos, label_token=label, settings=settings,
                          progress=progress)
        g = compute_graph(s.cm, s.topology, ids, s.to_module_dict(opt.ci), ci_threshold=0.0,
                          output_positions=[pos], label_token=label, max_edges=MAX_STORED_EDGES)
        return g, opt.metrics

    g, metrics = await compute_on(st, "optimize_graph", work)
    gid = await _store_graph(st, "optimized_graph", params, pid, g,
                             {"kind": "optimized", "metrics": metrics.model_dump()})
    return _optimized(s, gid, g, False, metrics)


def _optimized(s: RunSession, gid: int, g: AttributionGraph, cached: bool,
               metrics: OptimizeMetrics) -> OptimizedGraph:
    base = _summary(s, gid, g, cached)
    comp = [i for i, lay in enumerate(g.node_layer) if lay not in ("embed", "output")]
    comp.sort(key=lambda i: -float(g.node_ci[i]))
    return OptimizedGraph(**base.model_dump(), metrics=metrics,
                          circuit=summarize_nodes(s, g, comp[:200]))


async def get_graph(
    ctx: Context,
    graph_id: Annotated[int, Field(description="id returned by compute_graph / optimize_graph")],
    edge_kind: Annotated[Literal["signed", "abs"], Field(
        description="signed edges, or abs-target edges (sign of the target's value folded in)")
    ] = "signed",
    ci_threshold: Annotated[float, Field(ge=0, le=1, description="hide CI ≤ this")] = 0.0,
    node: Annotated[str | None, Field(description="only edges into / out of this node key")] = None,
    top_k: Annotated[int, Field(ge=1, le=500, description="edges per page")] = 50,
    offset: Annotated[int, Field(ge=0)] = 0,
) -> GraphView:
    """Read a stored graph: the largest edges after filters, with the nodes they touch.
    Example: get_graph(graph_id=1, node="output:12:57", top_k=20)."""
    st = state(ctx)
    g = await stored_graph(st, graph_id)
    return guard(lambda: view_graph(st.session, graph_id, g, edge_kind=edge_kind,
                                    ci_threshold=ci_threshold, node=node, top_k=top_k,
                                    offset=offset))


async def stored_graph(st: AppState, graph_id: int) -> AttributionGraph:
    """A stored graph (natural or optimised) by id; a ToolError naming recent ids if absent."""
    for kind in ("graph", "optimized_graph"):
        row = await st.store.get_result(kind, graph_id)
        if row is not None and row[2] is not None:
            return await asyncio.to_thread(graph_from_bytes, row[2])
    recent = [i for k in ("graph", "optimized_graph")
              for i, _ in await st.store.list_results(k, 5)]
    raise fail(f"graph_id {graph_id} does not exist; recent graph ids: {sorted(recent)}")


def tools() -> list[Tool]:
    return [
        strict_tool(compute_graph_tool, STORES, "Compute attribution graph"),
        strict_tool(optimize_graph, STORES, "Optimise a sparse circuit graph"),
        strict_tool(get_graph, READ_ONLY, "Read a stored graph"),
    ]
