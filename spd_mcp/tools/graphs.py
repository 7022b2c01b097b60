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

from .common import READ_ONLY, STORES, Progress, PromptIdArg, TextArg, state, strict_tool


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
    (a direct effect). Nodes report in_sum (their edges) and a remainder splitting act − in_sum
    (pruned, dead, delta, bias, unexplained; through a norm unexplained ≈ act). Example:
    compute_graph(text="mia found a ball . the ball was")."""
    progress = Progress(ctx, "attribution graph")
    return await natural_graph(state(ctx), text=text, prompt_id=prompt_id,
                               ci_threshold=ci_threshold, output_position=output_position,
                               top_k_outputs=top_k_outputs, label_token=label_token,
                               progress=progress)


compute_graph_tool.__name__ = "compute_graph"


async def optimize_graph(
    ctx: Context,
    text: TextArg = None,
    prompt_id: PromptIdArg = None,
    label_token: Annotated[str | None, Field(
        description="token whose prediction to explain (for ce / logit)")] = None,
    contrast_token: Annotated[str | None, Field(
        description="contrastive circuit: keep label ahead of this token (logit_diff loss)")
    ] = None,
    prompts: Annotated[list[PromptTask] | None, Field(
        max_length=16, description="instead of text: several {text, label_token, "
        "contrast_token?, position?} sharing one component set")] = None,
    position: Annotated[int, Field(description="prediction position; -1 = last")] = -1,
    loss: Annotated[Literal["ce", "kl", "logit", "logit_diff"], Field(
        description="ce: CE of label_token (logit_diff when contrast_token is given); kl: KL "
        "to target; logit: -logit; logit_diff: softplus(contrast - label)")] = "ce",
    steps: Annotated[int, Field(ge=1, le=2000)] = 200,
    lr: Annotated[float, Field(gt=0, le=10)] = 0.1,
    imp_coeff: Annotated[float, Field(ge=0, description="importance-minimality weight")] = 0.003,
    p: Annotated[float, Field(gt=0, le=2, description="importance-minimality exponent")] = 0.5,
    mask_type: Annotated[Literal["ci", "stochastic", "both"], Field(
        description="both = ci + stochastic losses; ci = all else off")] = "both",
    adv_coeff: Annotated[float, Field(
        ge=0, description="weight of the persistent adversarial term (0: off, faster, often "
        "fragile under the adversarial regime)")] = 1.0,
    pgd_steps: Annotated[int, Field(ge=1, le=100)] = 10,
    seed: int = 0,
) -> OptimizedGraph:
    """Find a sparse circuit: optimise CI of the alive components to keep a prediction (or, with
    contrast_token, the label's lead over the contrast) with as few nodes as possible, robust to
    an adversary, then build its attribution graph. With prompts, one component set serves them
    all. The result states what the circuit shows (sufficiency under masks computed from this
    input) and its necessity check (the circuit ablated vs random same-size sets).
    Example: optimize_graph(text="... the house behind the old ducks", label_token="is",
    contrast_token="are")."""
    progress = Progress(ctx, "optimising CI")
    return await optimized_graph(
        state(ctx), text=text, prompt_id=prompt_id, label_token=label_token, position=position,
        contrast_token=contrast_token, prompts=prompts,
        settings=OptimizeSettings(loss=loss, steps=steps, lr=lr, imp_coeff=imp_coeff, p=p,
                                  mask_type=mask_type, adv_coeff=adv_coeff, pgd_steps=pgd_steps,
                                  seed=seed),
        progress=progress)


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
    """Read a stored graph: the largest edges after filters, with the nodes they touch (each with
    in_sum and, for outputs and well-connected nodes, the remainder act − in_sum).
    Example: get_graph(graph_id=1, node="output:12:57", top_k=20)."""
    st = state(ctx)
    g = await stored_graph(st, graph_id)
    return view_graph(st.session, graph_id, g, edge_kind=edge_kind, ci_threshold=ci_threshold,
                      node=node, top_k=top_k, offset=offset)


def tools() -> list[Tool]:
    return [
        strict_tool(compute_graph_tool, STORES, "Compute attribution graph"),
        strict_tool(optimize_graph, STORES, "Optimise a sparse circuit graph"),
        strict_tool(get_graph, READ_ONLY, "Read a stored graph"),
    ]
