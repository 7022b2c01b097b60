"""The patching tool: run_patching (activation patching of components between two prompts)."""

from __future__ import annotations

from typing import Annotated, Literal

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.tools.base import Tool
from pydantic import Field

from spd_mcp.analysis.patching import LayerPositions
from spd_mcp.service.patching import StoredPatching, patching

from .common import STORES, Pending, as_job, job_tool, state


async def run_patching(
    ctx: Context,
    label_token: str,
    clean: str | None = None,
    corrupt: str | None = None,
    clean_prompt_id: int | None = None,
    corrupt_prompt_id: int | None = None,
    contrast_token: Annotated[str | None, Field(
        description="measure logit(label) - logit(contrast) (recommended)")] = None,
    nodes: Annotated[list[str] | None, Field(
        max_length=4096, description="'LAYER:POS:C' (clean positions) or patterns as in "
        "run_intervention; 'embed:POS:0' = the token embedding")] = None,
    components: Annotated[list[str] | None, Field(
        max_length=4096, description="'LAYER:C' or patterns, at every position")] = None,
    layers_at_positions: Annotated[list[LayerPositions] | None, Field(max_length=256)] = None,
    direction: Literal["denoising", "noising"] = "denoising",
    position_map: Annotated[dict[int, int] | None, Field(
        description="clean pos -> corrupt pos, one-to-one; only mapped positions patch")] = None,
    sweep: Annotated[Literal["nodes", "components", "layers"] | None, Field(
        description="also patch each alive node / alive component / layer×position alone, "
        "ranked")] = None,
    top: Annotated[int, Field(ge=1, le=200, description="sweep rows")] = 20,
) -> StoredPatching | Pending:
    """Activation patching: run one prompt with chosen component activations (x·V[:, c]) taken
    from the other, downstream recomputed. nodes / components patch activations only;
    layers_at_positions also the layer's weight-delta term. denoising runs corrupt and patches
    in clean (sufficiency); noising the reverse (necessity). fraction_recovered = (patched -
    run) / (other - run) of the logit difference (label log-prob without contrast) at the last
    position: 0 = no effect, 1 = like the other prompt. Token counts must match unless
    position_map. Example: run_patching(clean="the dog near the trees", corrupt="the dogs near
    the trees", label_token="is", contrast_token="are", sweep="layers")."""
    st = state(ctx)
    return await as_job(ctx, "run_patching", lambda progress: patching(
        st, clean=clean, clean_prompt_id=clean_prompt_id, corrupt=corrupt,
        corrupt_prompt_id=corrupt_prompt_id, label_token=label_token,
        contrast_token=contrast_token, nodes=nodes, components=components,
        layers_at_positions=layers_at_positions, direction=direction, position_map=position_map,
        sweep=sweep, top=top, progress=progress),
        stages={"patching"}, unit="patches", message="patching")


def tools() -> list[Tool]:
    return [job_tool(run_patching, STORES, "Patch activations between prompts")]
