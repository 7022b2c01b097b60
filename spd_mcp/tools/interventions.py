"""Intervention tools: run_intervention (ci / stochastic / adversarial / ablated), run_ablation."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Annotated, Literal

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.tools.base import Tool
from pydantic import Field

from spd_mcp.analysis.intervene import REGIMES, InterventionResult, Regime, run_intervention
from spd_mcp.keys import NodeKey

from .common import (
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
MAX_NODES = 4096


class StoredIntervention(InterventionResult):
    run_id: int
    cached: bool


async def _run(st: AppState, kind: str, ids: list[int], pid: int, nodes: list[NodeKey],
               params: dict, progress: ProgressFn | None, **kw) -> StoredIntervention:
    key = {"prompt_id": pid, "nodes": sorted(str(n) for n in nodes), **params}
    found = await st.store.find_result(kind, key)
    if found is not None:
        return StoredIntervention(**found[1], run_id=found[0], cached=True)
    res = await compute_on(st, kind, lambda: run_intervention(
        st.session, ids, nodes, progress=progress, **kw))
    rid = await st.store.put_result(kind, key, res.model_dump(), None, pid)
    return StoredIntervention(**res.model_dump(), run_id=rid, cached=False)


async def run_intervention_tool(
    ctx: Context,
    nodes: Annotated[list[str], Field(
        max_length=MAX_NODES, description="node keys 'LAYER:POS:C', e.g. ['1.attn.o:12:5']")],
    text: TextArg = None,
    prompt_id: PromptIdArg = None,
    regimes: Annotated[tuple[Literal["ci", "stochastic", "adversarial", "ablated"], ...], Field(
        min_length=1, description="ci: only the nodes on; stochastic: nodes on, the rest "
        "random; adversarial: nodes on, the rest chosen by PGD to hurt; ablated: full model "
        "with only the nodes off")] = ("ci", "stochastic", "adversarial", "ablated"),
    loss: Annotated[Literal["kl", "label"], Field(
        description="kl: mean KL to the target over positions; label: CE of label_token")] = "kl",
    label_token: Annotated[str | None, Field(description="token to report (and use for loss)")
                           ] = None,
    label_position: Annotated[int | None, Field(description="label position; default last")
                              ] = None,
    positions: Annotated[list[int] | None, Field(
        description="positions to show predictions for; default the label position or last")
    ] = None,
    top_k: Annotated[int, Field(ge=1, le=20)] = 5,
    n_samples: Annotated[int, Field(ge=1, le=64, description="stochastic samples")] = 8,
    pgd_steps: Annotated[int, Field(ge=1, le=200)] = 20,
    pgd_step_size: Annotated[float, Field(gt=0, le=1)] = 0.1,
    seed: int = 0,
) -> StoredIntervention:
    """Test a circuit: run its nodes under the ci / stochastic / adversarial / ablated regimes and
    compare top-k predictions, the loss and the label token's probability with the target.
    Example: run_intervention(text="...", nodes=["1.attn.o:57:12"], loss="label",
    label_token="she")."""
    progress = Progress(ctx, asyncio.get_running_loop(), "intervention")
    return await intervention(
        state(ctx), nodes=nodes, text=text, prompt_id=prompt_id, regimes=regimes, loss=loss,
        label_token=label_token, label_position=label_position, positions=positions, top_k=top_k,
        n_samples=n_samples, pgd_steps=pgd_steps, pgd_step_size=pgd_step_size, seed=seed,
        progress=progress)


async def intervention(
    st: AppState, *, nodes: list[str], text: str | None, prompt_id: int | None,
    regimes: Sequence[Regime] = REGIMES, loss: Literal["kl", "label"] = "kl",
    label_token: str | None = None, label_position: int | None = None,
    positions: list[int] | None = None, top_k: int = 5, n_samples: int = 8, pgd_steps: int = 20,
    pgd_step_size: float = 0.1, seed: int = 0, progress: ProgressFn | None = None,
) -> StoredIntervention:
    """run_intervention without an MCP context (shared with the viewer); stored get-or-create."""
    s = st.session
    ids, pid = await resolve_prompt(st, text, prompt_id)
    T = len(ids)
    keys = [guard(lambda k=k: s.keys.node(k, T, allow_special=False)) for k in nodes]
    label = guard(lambda: s.token_id(label_token)) if label_token is not None else None
    if loss == "label" and label is None:
        raise fail("loss='label' needs label_token")
    lpos = check_position(label_position, T, "label_position") if label is not None else None
    show = ([check_position(p, T, "positions[]") for p in positions] if positions is not None
            else [lpos if lpos is not None else T - 1])
    regs: list[Regime] = list(dict.fromkeys(regimes))
    params = {"regimes": regs, "loss": loss, "label": label, "label_position": lpos,
              "positions": show, "top_k": top_k, "n_samples": n_samples, "pgd_steps": pgd_steps,
              "pgd_step_size": pgd_step_size, "seed": seed}
    return await _run(st, "intervention", ids, pid, keys, params, progress, regimes=regs,
                      loss=loss,
                      label_token=label, label_position=lpos, positions=show, top_k=top_k,
                      n_samples=n_samples, pgd_steps=pgd_steps, pgd_step_size=pgd_step_size,
                      seed=seed)


run_intervention_tool.__name__ = "run_intervention"


async def run_ablation(
    ctx: Context,
    components: Annotated[list[str], Field(
        min_length=1, max_length=512,
        description="component keys 'LAYER:C' to switch off at every position")],
    text: TextArg = None,
    prompt_id: PromptIdArg = None,
    label_token: Annotated[str | None, Field(description="token whose probability to report")
                           ] = None,
    positions: Annotated[list[int] | None, Field(description="positions to show; default last")
                         ] = None,
    top_k: Annotated[int, Field(ge=1, le=20)] = 5,
) -> StoredIntervention:
    """Ablate components everywhere in the full model (weight delta kept) and compare with the
    target: KL per token and predictions. Example: run_ablation(components=["1.attn.o:5"],
    text="...", label_token="she")."""
    st = state(ctx)
    s = st.session
    ids, pid = await resolve_prompt(st, text, prompt_id)
    T = len(ids)
    comps = [guard(lambda k=k: s.keys.component(k)) for k in components]
    keys = [NodeKey(c.layer, p, c.c) for c in comps for p in range(T)]
    label = guard(lambda: s.token_id(label_token)) if label_token is not None else None
    show = ([check_position(p, T, "positions[]") for p in positions] if positions is not None
            else [T - 1])
    params = {"components": sorted(components), "label": label, "positions": show, "top_k": top_k}
    progress = Progress(ctx, asyncio.get_running_loop(), "ablation")
    return await _run(st, "ablation", ids, pid, keys, params, progress, regimes=["ablated"],
                      loss="kl",
                      label_token=label, label_position=T - 1 if label is not None else None,
                      positions=show, top_k=top_k)




def tools() -> list[Tool]:
    return [
        strict_tool(run_intervention_tool, STORES, "Run an intervention"),
        strict_tool(run_ablation, STORES, "Ablate components"),
    ]
