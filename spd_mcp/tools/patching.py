"""The patching tool: run_patching (activation patching of components between two prompts)."""

from __future__ import annotations

from typing import Annotated, Literal

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.tools.base import Tool
from pydantic import Field

from spd_mcp.analysis.patching import LayerPositions
from spd_mcp.service.patching import StoredPatching, patching

from .common import STORES, Progress, state, strict_tool


async def run_patching(
    ctx: Context,
    label_token: Annotated[str, Field(description="token whose prediction is measured")],
    clean: Annotated[str | None, Field(description="clean prompt text (or clean_prompt_id)")
                     ] = None,
    corrupt: Annotated[str | None, Field(
        description="corrupt prompt text (or corrupt_prompt_id): the counterfactual")] = None,
    clean_prompt_id: Annotated[int | None, Field(description="a stored prompt as clean")] = None,
    corrupt_prompt_id: Annotated[int | None, Field(description="a stored prompt as corrupt")
                                 ] = None,
    contrast_token: Annotated[str | None, Field(
        description="measure logit(label) - logit(contrast) (recommended)")] = None,
    nodes: Annotated[list[str] | None, Field(
        max_length=4096, description="node keys 'LAYER:POS:C' (clean positions) or patterns "
        "as in run_intervention; 'embed:POS:0' patches the token embedding")] = None,
    components: Annotated[list[str] | None, Field(
        max_length=4096, description="component keys 'LAYER:C' or patterns, patched at every "
        "position")] = None,
    layers_at_positions: Annotated[list[LayerPositions] | None, Field(
        max_length=256, description="[{layer, positions}]: every component of the layer plus "
        "its weight-delta term (the whole output) at those clean positions")] = None,
    direction: Annotated[Literal["denoising", "noising"], Field(
        description="denoising: run corrupt, patch in clean values; noising: run clean, "
        "patch in corrupt values")] = "denoising",
    position_map: Annotated[dict[int, int] | None, Field(
        description="clean position -> corrupt position, one-to-one (needed when the token "
        "counts differ; only mapped positions are patched)")] = None,
    sweep: Annotated[Literal["nodes", "components", "layers"] | None, Field(
        description="also patch one at a time and rank: each alive node, each alive component "
        "(all positions), or each layer (and embedding) at each position")] = None,
    top: Annotated[int, Field(ge=1, le=200, description="sweep rows to return")] = 20,
) -> StoredPatching:
    """Activation patching: run one prompt with selected component activations taken from the
    other, to find where the information that separates them lives. A component's activation
    at a position is a_c(p) = x(p)·V[:, c]; downstream of a patch everything is recomputed.
    Nodes and components patch activations only (the run's own weight-delta term stays); a whole
    layer at a position also takes the other prompt's delta term. Patching every embedding
    reproduces the other prompt's run exactly.
    denoising (default) runs corrupt and patches in clean values (sufficiency: do they restore
    the clean behaviour?); noising runs clean and patches in corrupt values (necessity: does
    corrupting them break it?). Metrics are read at each prompt's last position;
    fraction_recovered = (patched - run) / (other - run) of the logit difference (of the
    label log-prob without contrast_token): 0 = no effect, 1 = behaves like the other prompt.
    Prompts must have the same token count unless position_map is given.
    Example: run_patching(clean="... the dog near the old trees", corrupt="... the dogs near
    the old trees", label_token="is", contrast_token="are", layers_at_positions=[{"layer":
    "1.attn.k", "positions": [40]}], sweep="layers")."""
    return await patching(
        state(ctx), clean=clean, clean_prompt_id=clean_prompt_id, corrupt=corrupt,
        corrupt_prompt_id=corrupt_prompt_id, label_token=label_token,
        contrast_token=contrast_token, nodes=nodes, components=components,
        layers_at_positions=layers_at_positions, direction=direction, position_map=position_map,
        sweep=sweep, top=top, progress=Progress(ctx, "patching"))


def tools() -> list[Tool]:
    return [strict_tool(run_patching, STORES, "Patch activations between prompts")]
