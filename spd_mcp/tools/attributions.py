"""Dataset-attribution tools: get_component_attributions, get_attribution_strength."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.tools.base import Tool
from pydantic import BaseModel, Field

from spd_mcp.attributions.query import AttributionEntry, strength, top_sources, top_targets
from spd_mcp.service.prepare import ensure_attributions

from .common import READ_ONLY, Progress, state, strict_tool

NormArg = Annotated[Literal["raw", "mean", "fraction"], Field(
    description="raw sum; mean per dataset token; fraction of the target's total |attribution|")]


class AttributionList(BaseModel):
    key: str
    direction: Literal["sources", "targets"]
    signed: bool
    normalize: str
    n_tokens: int
    entries: list[AttributionEntry]


async def get_component_attributions(
    ctx: Context,
    key: Annotated[str, Field(description="'LAYER:C', 'embed:ID', 'output:ID' or a word")],
    direction: Literal["sources", "targets"] = "sources",
    signed: Annotated[bool, Field(description="rank by signed value, else |value|")] = True,
    normalize: NormArg = "fraction",
    top_k: Annotated[int, Field(ge=1, le=100)] = 10,
) -> AttributionList:
    """Dataset attributions (gradient × activation, weighted by the source's CI, summed over a
    dataset sample; direct effects): a component's or token's strongest sources (what drives
    it) or targets (what it drives)."""
    st = state(ctx)
    a = await ensure_attributions(st, Progress(ctx, "building dataset attributions"))
    tok = st.session.tokenizer
    fn = top_sources if direction == "sources" else top_targets
    entries = await asyncio.to_thread(lambda: fn(
        a, key, top_k, signed=signed, normalize=normalize, tokenizer=tok))
    return AttributionList(key=key, direction=direction, signed=signed, normalize=normalize,
                           n_tokens=int(a.manifest.n_tokens), entries=entries)


class Strength(BaseModel):
    source: str
    target: str
    value: float
    normalize: str


async def get_attribution_strength(
    ctx: Context,
    source: Annotated[str, Field(description="'LAYER:C' or input token")],
    target: Annotated[str, Field(description="'LAYER:C' or output token")],
    normalize: NormArg = "fraction",
) -> Strength:
    """One source's dataset attribution to one target (0 if the source is not upstream).
    Example: get_attribution_strength(source="0.attn.o:5", target="output:she")."""
    st = state(ctx)
    a = await ensure_attributions(st, Progress(ctx, "building dataset attributions"))
    tok = st.session.tokenizer
    v = await asyncio.to_thread(lambda: strength(
        a, source, target, normalize=normalize, tokenizer=tok))
    return Strength(source=source, target=target, value=v, normalize=normalize)


def tools() -> list[Tool]:
    return [
        strict_tool(get_component_attributions, READ_ONLY, "Dataset attributions"),
        strict_tool(get_attribution_strength, READ_ONLY, "Attribution strength"),
    ]
