"""Intervention tools: run_intervention (ci / stochastic / adversarial / ablated), run_ablation,
sweep_ablation (one-at-a-time effects and a greedy necessary set)."""

from __future__ import annotations

from typing import Annotated, Literal

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.tools.base import Tool
from pydantic import Field

from spd_mcp.service.interventions import (
    StoredIntervention,
    StoredSweep,
    ablation,
    intervention,
    sweep,
)

from .common import (
    STORES,
    ComponentsArg,
    ContrastArg,
    ControlsArg,
    LabelArg,
    NodesArg,
    Pending,
    PromptIdArg,
    TextArg,
    as_job,
    job_tool,
    state,
)

MAX_NODES = 4096


async def run_intervention_tool(
    ctx: Context,
    nodes: NodesArg,
    text: TextArg = None,
    prompt_id: PromptIdArg = None,
    regimes: Annotated[tuple[Literal["ci", "stochastic", "adversarial", "ablated"], ...], Field(
        min_length=1)] = ("ci", "stochastic", "adversarial", "ablated"),
    loss: Annotated[Literal["kl", "label"], Field(
        description="kl: mean KL to target over positions; label: CE of label_token")] = "kl",
    label_token: Annotated[str | None, Field(description="token to report (and for loss)")
                           ] = None,
    label_position: Annotated[int | None, Field(description="default last")] = None,
    contrast_token: ContrastArg = None,
    random_controls: ControlsArg = 0,
    positions: Annotated[list[int] | None, Field(
        description="positions to show; default label_position")] = None,
    top_k: Annotated[int, Field(ge=1, le=20)] = 5,
    n_samples: Annotated[int, Field(ge=1, le=64, description="stochastic samples")] = 8,
    pgd_steps: Annotated[int, Field(ge=1, le=200)] = 20,
    pgd_step_size: Annotated[float, Field(gt=0, le=1)] = 0.1,
    seed: int = 0,
) -> StoredIntervention | Pending:
    """Test a circuit: run its nodes under each regime and compare top-k predictions, loss and
    P(label_token) with the target. Regimes: ci = only the nodes on; stochastic = nodes on, the
    rest random; adversarial = nodes on, the rest chosen by PGD to hurt; ablated = full model
    with only the nodes off. Example: run_intervention(text="...", nodes=["1.attn.o:57:12"],
    loss="label", label_token="she")."""
    st = state(ctx)
    return await as_job(ctx, "run_intervention", lambda progress: intervention(
        st, nodes=nodes, text=text, prompt_id=prompt_id, regimes=regimes, loss=loss,
        label_token=label_token, label_position=label_position, positions=positions, top_k=top_k,
        n_samples=n_samples, pgd_steps=pgd_steps, pgd_step_size=pgd_step_size, seed=seed,
        contrast_token=contrast_token, random_controls=random_controls, progress=progress),
        stages={"intervention"}, unit="steps", message="intervention")


run_intervention_tool.__name__ = "run_intervention"


async def run_ablation(
    ctx: Context,
    components: ComponentsArg,
    text: TextArg = None,
    prompt_id: PromptIdArg = None,
    label_token: LabelArg = None,
    contrast_token: ContrastArg = None,
    random_controls: ControlsArg = 0,
    positions: Annotated[list[int] | None, Field(description="default last")] = None,
    top_k: Annotated[int, Field(ge=1, le=20)] = 5,
    seed: int = 0,
) -> StoredIntervention | Pending:
    """Ablate components at every position of the full model (weight delta kept); report KL to
    the target per token and predictions."""
    st = state(ctx)
    return await as_job(ctx, "run_ablation", lambda progress: ablation(
        st, components=components, text=text, prompt_id=prompt_id, label_token=label_token,
        positions=positions, top_k=top_k, contrast_token=contrast_token,
        random_controls=random_controls, seed=seed, progress=progress),
        stages={"ablation"}, unit="steps", message="ablation")


async def sweep_ablation(
    ctx: Context,
    label_token: str,
    text: TextArg = None,
    prompt_id: PromptIdArg = None,
    contrast_token: ContrastArg = None,
    label_position: Annotated[int | None, Field(description="default last")] = None,
    candidates: Annotated[list[str] | None, Field(
        max_length=MAX_NODES, description="keys or patterns; default all alive")] = None,
    base: Annotated[list[str], Field(
        max_length=MAX_NODES, description="ablated in every row")
    ] = [],  # noqa: B006 (pydantic copies defaults)
    top: Annotated[int, Field(ge=1, le=200)] = 20,
    greedy_steps: Annotated[int, Field(
        ge=0, le=64, description="grow the set: add the strongest, re-sweep; max steps")] = 0,
    stop_prob: Annotated[float, Field(
        gt=0, lt=1, description="stop once P(label) <= stop_prob x target")] = 0.01,
    random_controls: Annotated[int, Field(
        ge=0, le=100, description="random same-size alive sets (per layer) vs the greedy set")
    ] = 0,
    seed: int = 0,
) -> StoredSweep | Pending:
    """Necessity: ablate each candidate component everywhere, one at a time, ranked by how much
    P(label_token) drops; greedy_steps grows the smallest set found that removes the behaviour,
    checked against random same-size sets. Example: sweep_ablation(text="...",
    label_token="she", contrast_token="he", greedy_steps=16, random_controls=10)."""
    st = state(ctx)
    return await as_job(ctx, "sweep_ablation", lambda progress: sweep(
        st, text=text, prompt_id=prompt_id, label_token=label_token,
        contrast_token=contrast_token, label_position=label_position, candidates=candidates,
        base=base, top=top, greedy_steps=greedy_steps, stop_prob=stop_prob,
        random_controls=random_controls, seed=seed, progress=progress),
        stages={"ablation_sweep"}, unit="ablated rows", message="ablation sweep")


def tools() -> list[Tool]:
    return [
        job_tool(run_intervention_tool, STORES, "Run an intervention"),
        job_tool(run_ablation, STORES, "Ablate components"),
        job_tool(sweep_ablation, STORES, "Sweep ablations for necessity"),
    ]
