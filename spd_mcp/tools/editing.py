"""Editing tools: edit_components, train_component_edit, measure_edit, list_edits, export_edit."""

from __future__ import annotations

from typing import Annotated, Literal

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.tools.base import Tool
from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field

from spd_mcp.editing.book import EditInfo
from spd_mcp.editing.edit import ComponentScale
from spd_mcp.editing.measure import MeasureSettings, Probe
from spd_mcp.editing.train import EditTarget, TrainSettings
from spd_mcp.service.edits import Measured, export, measure
from spd_mcp.service.state import ProgressFn, compute

from .common import READ_ONLY, STORES, Pending, Progress, as_job, job_tool, state, strict_tool

WRITES_FILES = ToolAnnotations(readOnlyHint=False, destructiveHint=False, idempotentHint=True,
                               openWorldHint=False)


class EditCreated(EditInfo):
    cached: bool = Field(description="true if this exact edit was already stored")


async def edit_components(
    ctx: Context,
    components: Annotated[list[ComponentScale], Field(min_length=1, max_length=256)],
    name: Annotated[str | None, Field(max_length=200)] = None,
) -> EditCreated:
    """Create a runtime edit scaling components (0 = ablate, >1 = boost), everywhere or only
    where natural CI > ci_threshold. The baseline is the full model (weight delta included), so
    the edit changes only what it names. Pass its edit_id to measure_edit, generate / create_prompt
    (edit=ID) and export_edit. Example: edit_components(components=[{"component":
    "1.mlp.down:17", "scale": 0}])."""
    state(ctx).session.require_lm()  # nothing can use an edit of a toy: say so now
    info, cached = await state(ctx).edits.scale(components, name=name)
    return EditCreated(**info.model_dump(), cached=cached)


class TrainedEdit(EditCreated):
    pass


async def train_component_edit(
    ctx: Context,
    components: Annotated[list[str], Field(min_length=1, max_length=64)],
    targets: Annotated[list[EditTarget], Field(min_length=1, max_length=256)],
    preserve: Annotated[list[str], Field(
        max_length=256, description="prompts whose predictions must not change")
    ] = [],  # noqa: B006
    vectors: Annotated[Literal["read", "write", "both"], Field(
        description="read = V columns, write = U rows")] = "both",
    mode: Annotated[Literal["components", "full_matrix"], Field(
        description="full_matrix: baseline fine-tuning the whole matrices")] = "components",
    steps: Annotated[int, Field(ge=1, le=2000)] = 200,
    lr: Annotated[float, Field(gt=0, le=1)] = 0.01,
    kl_coeff: Annotated[float, Field(ge=0, le=1000, description="KL-to-original weight on "
                                     "other text")] = 5.0,
    n_kl_texts: Annotated[int, Field(ge=0, le=1000)] = 64,
    name: Annotated[str | None, Field(max_length=200)] = None,
) -> TrainedEdit | Pending:
    """Train rank-1 adapters: only the given components' vectors move, from the exact target, to
    raise / lower tokens after prompts while a KL penalty keeps other text unchanged. Stored as
    an edit (the run is untouched). Example: train_component_edit(components=["1.attn.v:15"],
    targets=[{"prompt": "the ball was", "token": "blue"}], preserve=["the spoon was"])."""
    st = state(ctx)
    settings = TrainSettings(vectors=vectors, mode=mode, steps=steps, lr=lr, kl_coeff=kl_coeff,
                             n_kl_texts=n_kl_texts)

    async def work(progress: ProgressFn) -> TrainedEdit:
        info, cached, _ = await st.edits.train(
            components, targets, settings, preserve=preserve, name=name,
            run=lambda fn: compute(st, "train_component_edit", fn), progress=progress)
        return TrainedEdit(**info.model_dump(), cached=cached)

    return await as_job(ctx, "train_component_edit", work, stages={"train_component_edit"},
                        unit="steps", message="training edit")


async def measure_edit_tool(
    ctx: Context,
    edit_id: int,
    probes: Annotated[list[Probe], Field(
        max_length=500, description="P(expected) before / after")] = [],  # noqa: B006
    token_groups: Annotated[dict[str, list[str]], Field(
        description="name → tokens: probability shift on held-out text")] = {},  # noqa: B006
    generation_prompts: Annotated[list[str], Field(
        max_length=16, description="continued greedily, target vs edited")] = [],  # noqa: B006
    n_texts: Annotated[int, Field(ge=1, le=1000, description="held-out documents")] = 64,
    behaviours: Annotated[bool, Field(description="planted-behaviour accuracy")] = True,
    control: Annotated[bool, Field(description="random same-size components as a control "
                                   "(retrained for trained edits)")] = True,
    control_seed: int = 0,
) -> Measured:
    """Measure an edit against the exact target: KL and perplexity change on held-out text,
    token-group shifts, probe probabilities, planted-behaviour accuracy, greedy generations
    side by side, and the same for a random control (concentration ratio). Example:
    measure_edit(edit_id=1, probes=[{"prompt": "... and there", "expected": "she"}],
    token_groups={"she": ["she"]})."""
    settings = MeasureSettings(probes=probes, token_groups=token_groups,
                               generation_prompts=generation_prompts, n_texts=n_texts,
                               behaviours=behaviours, control=control, control_seed=control_seed)
    return await measure(state(ctx), edit_id, settings, Progress(ctx, "measuring edit"))


measure_edit_tool.__name__ = "measure_edit"


class EditList(BaseModel):
    edits: list[EditInfo]
    notice: str


async def list_edits(
    ctx: Context, limit: Annotated[int, Field(ge=1, le=200)] = 50,
) -> EditList:
    """Stored edits of this run, newest first (scalings and trained adapters)."""
    edits = await state(ctx).edits.list(limit)
    return EditList(edits=edits, notice=(
        "edits are applied only where you pass edit=ID; the run's weights are never modified"))


class Exported(BaseModel):
    edit_id: int
    path: str
    files: list[str]
    load_with: str


async def export_edit(
    ctx: Context,
    edit_id: Annotated[int, Field(description="an ungated edit")],
) -> Exported:
    """Bake an edit into plain target weights and write a standalone target checkpoint under
    $SPD_MCP_HOME/exports/. CI-gated edits depend on the input and cannot be baked."""
    path, _ = await export(state(ctx), edit_id)
    return Exported(edit_id=edit_id, path=str(path), files=sorted(p.name for p in path.iterdir()),
                    load_with="spd_mcp.editing.bake.load_edited_target(path)")


def tools() -> list[Tool]:
    return [
        strict_tool(edit_components, STORES, "Edit components (scale / ablate)"),
        job_tool(train_component_edit, STORES, "Train a rank-1 component edit"),
        strict_tool(measure_edit_tool, STORES, "Measure an edit"),
        strict_tool(list_edits, READ_ONLY, "List edits"),
        strict_tool(export_edit, WRITES_FILES, "Export a baked edit"),
    ]
