"""Dataset-attribution tools: get_component_attributions, get_attribution_strength. A first call
that builds the attributions becomes a background job when it runs past the server's limit."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.tools.base import Tool
from pydantic import BaseModel, Field

from spd_mcp.attributions.query import AttributionEntry, strength, top_sources, top_targets
from spd_mcp.service.prepare import ensure_attributions
from spd_mcp.service.state import ProgressFn

from .common import READ_ONLY, Pending, R, as_job, job_tool, state


async def _with_attributions(ctx: Context, tool: str,
                             work: Callable[[ProgressFn], Coroutine[Any, Any, R]]) -> R | Pending:
    """``work(progress)`` (which may build the attributions on first use): a background job
    past the server's limit."""
    return await as_job(ctx, tool, work, stages={"attributions"}, unit="tokens",
                        message="building dataset attributions (first use)")

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
) -> AttributionList | Pending:
    """Dataset attributions (gradient × activation, weighted by the source's CI, summed over a
    dataset sample; direct effects): a component's or token's strongest sources (what drives
    it) or targets (what it drives)."""
    st = state(ctx)

    async def work(progress: ProgressFn) -> AttributionList:
        a = await ensure_attributions(st, progress)
        tok = st.session.tokenizer
        fn = top_sources if direction == "sources" else top_targets
        entries = await asyncio.to_thread(lambda: fn(
            a, key, top_k, signed=signed, normalize=normalize, tokenizer=tok))
        return AttributionList(key=key, direction=direction, signed=signed, normalize=normalize,
                               n_tokens=int(a.manifest.n_tokens), entries=entries)

    return await _with_attributions(ctx, "get_component_attributions", work)


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
) -> Strength | Pending:
    """One source's dataset attribution to one target (0 if the source is not upstream).
    Example: get_attribution_strength(source="0.attn.o:5", target="output:she")."""
    st = state(ctx)

    async def work(progress: ProgressFn) -> Strength:
        a = await ensure_attributions(st, progress)
        tok = st.session.tokenizer
        v = await asyncio.to_thread(lambda: strength(
            a, source, target, normalize=normalize, tokenizer=tok))
        return Strength(source=source, target=target, value=v, normalize=normalize)

    return await _with_attributions(ctx, "get_attribution_strength", work)


def tools() -> list[Tool]:
    return [
        job_tool(get_component_attributions, READ_ONLY, "Dataset attributions"),
        job_tool(get_attribution_strength, READ_ONLY, "Attribution strength"),
    ]
