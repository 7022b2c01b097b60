"""Graph tools: compute_graph, optimize_graph, get_graph (graphs are stored and cached)."""

from __future__ import annotations

from typing import Annotated, Literal

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.tools.base import Tool
from pydantic import Field

from spd_mcp.analysis.graph_view import GraphView, view_graph
from spd_mcp.analysis.optimize import OptimizeSettings
from spd_mcp.service.graphs import (
    GraphSummary,
    OptimizedGraph,
    PromptTask,
    natural_graph,
    optimized_graph,
    stored_graph,
)

from .common import (
    READ_ONLY,
    STORES,
    GraphIdArg,
    Pending,
    PositionArg,
    PromptIdArg,
    TextArg,
    as_job,
    job_tool,
    state,
    strict_tool,
)


async def compute_graph_tool(
    ctx: Context,
    text: TextArg = None,
    prompt_id: PromptIdArg = None,
    ci_threshold: Annotated[float, Field(ge=0, le=1, description="node alive if CI > this")] = 0.0,
    output_position: PositionArg = -1,
    top_k_outputs: Annotated[int, Field(ge=1, le=20)] = 5,
    label_token: Annotated[str | None, Field(description="also include this output")] = None,
) -> GraphSummary | Pending:
    """Attribution graph of a prompt under natural CI: nodes are alive components at positions
    (plus embed and output tokens); an edge is gradient × source activation on the exact target
    (a direct effect). Nodes report in_sum and the remainder act − in_sum split into pruned,
    dead, delta, bias, unexplained (≈ act through a norm)."""
    st = state(ctx)
    return await as_job(ctx, "compute_graph", lambda progress: natural_graph(
        st, text=text, prompt_id=prompt_id, ci_threshold=ci_threshold,
        output_position=output_position, top_k_outputs=top_k_outputs, label_token=label_token,
        progress=progress), stages={"compute_graph"}, unit="target nodes",
        message="attribution graph")


compute_graph_tool.__name__ = "compute_graph"


async def optimize_graph(
    ctx: Context,
    text: TextArg = None,
    prompt_id: PromptIdArg = None,
    label_token: Annotated[str | None, Field(description="prediction to keep (ce / logit)")
                           ] = None,
    contrast_token: Annotated[str | None, Field(
        description="keep label ahead of this token (logit_diff)")] = None,
    prompts: Annotated[list[PromptTask] | None, Field(
        max_length=16, description="instead of text: several, sharing one component set")
    ] = None,
    position: PositionArg = -1,
    loss: Annotated[Literal["ce", "kl", "logit", "logit_diff"], Field(
        description="ce: CE of label (logit_diff with contrast); kl: KL to target; logit: "
        "-logit; logit_diff: softplus(contrast - label)")] = "ce",
    steps: Annotated[int, Field(ge=1, le=2000)] = 200,
    lr: Annotated[float, Field(gt=0, le=10)] = 0.1,
    imp_coeff: Annotated[float, Field(ge=0, description="importance-minimality weight")] = 0.003,
    p: Annotated[float, Field(gt=0, le=2, description="its exponent")] = 0.5,
    mask_type: Annotated[Literal["ci", "stochastic", "both"], Field(
        description="both = ci + stochastic losses; ci = rest off")] = "both",
    adv_coeff: Annotated[float, Field(
        ge=0, description="persistent adversary weight (0 = off: faster, often fragile)")] = 1.0,
    pgd_steps: Annotated[int, Field(ge=1, le=100)] = 10,
    seed: int = 0,
) -> OptimizedGraph | Pending:
    """Find a sparse circuit: optimise CI to keep a prediction (or the label's lead over
    contrast_token) with few nodes, robust to an adversary; returns its attribution graph, what
    it shows (sufficiency under masks computed from this input) and a necessity check (circuit
    ablated vs random same-size sets). Example: optimize_graph(text="the house behind the old
    ducks", label_token="is", contrast_token="are")."""
    st = state(ctx)
    return await as_job(ctx, "optimize_graph", lambda progress: optimized_graph(
        st, text=text, prompt_id=prompt_id, label_token=label_token, position=position,
        contrast_token=contrast_token, prompts=prompts,
        settings=OptimizeSettings(loss=loss, steps=steps, lr=lr, imp_coeff=imp_coeff, p=p,
                                  mask_type=mask_type, adv_coeff=adv_coeff, pgd_steps=pgd_steps,
                                  seed=seed),
        progress=progress), stages={"optimize_graph"}, unit="steps", message="optimising CI")


async def get_graph(
    ctx: Context,
    graph_id: GraphIdArg,
    edge_kind: Annotated[Literal["signed", "abs"], Field(
        description="abs: the target's sign folded in")] = "signed",
    ci_threshold: Annotated[float, Field(ge=0, le=1, description="hide CI ≤ this")] = 0.0,
    node: Annotated[str | None, Field(description="only edges into / out of this node")] = None,
    top_k: Annotated[int, Field(ge=1, le=500, description="edges per page")] = 50,
    offset: Annotated[int, Field(ge=0)] = 0,
) -> GraphView:
    """Read a stored graph: the largest edges after filters, with the nodes they touch (in_sum
    and, for outputs and well-connected nodes, the remainder act − in_sum). Example:
    get_graph(graph_id=1, node="output:12:57", top_k=20)."""
    st = state(ctx)
    g = await stored_graph(st, graph_id)
    return view_graph(st.session, graph_id, g, edge_kind=edge_kind, ci_threshold=ci_threshold,
                      node=node, top_k=top_k, offset=offset)


def tools() -> list[Tool]:
    return [
        job_tool(compute_graph_tool, STORES, "Compute attribution graph"),
        job_tool(optimize_graph, STORES, "Optimise a sparse circuit graph"),
        strict_tool(get_graph, READ_ONLY, "Read a stored graph"),
    ]
