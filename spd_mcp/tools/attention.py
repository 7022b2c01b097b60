"""The attention tool: per-head patterns and a pre-softmax score split into q×k component pairs."""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.tools.base import Tool
from pydantic import Field

from spd_mcp.service.attention import SplitArg, StoredAttention, attention

from .common import STORES, EditArg, PromptIdArg, TextArg, state, strict_tool


async def get_attention(
    ctx: Context,
    text: TextArg = None,
    prompt_id: PromptIdArg = None,
    layers: Annotated[list[int] | None, Field(max_length=256)] = None,
    heads: Annotated[list[int] | None, Field(max_length=256)] = None,
    query_positions: Annotated[list[int] | None, Field(
        min_length=1, max_length=16, description="default [-1] (last)")] = None,
    top_k: Annotated[int, Field(ge=1, le=20, description="keys per head and query")] = 5,
    split: Annotated[SplitArg | None, Field(
        description="terms: alive 'LAYER:C', q./k.other (dead), q./k.delta, q./k.bias")] = None,
    top_pairs: Annotated[int, Field(ge=1, le=100, description="pairs and totals listed")] = 10,
    edit: EditArg = None,
) -> StoredAttention:
    """Attention patterns: for each block and head, the keys a query position attends to most.
    With split, one pre-softmax score (scale·q·k, rotary applied) decomposed exactly into
    (q-term, k-term) pairs of SPD components, with per-term totals; sum_of_terms = score.
    With edit=ID (e.g. components scaled to 0 by edit_components), the edited model's patterns.
    Example: get_attention(text="...", layers=[1], split={"layer": 1, "head": 2,
    "key_position": 9})."""
    return await attention(
        state(ctx), text=text, prompt_id=prompt_id, layers=layers, heads=heads,
        query_positions=query_positions, top_k=top_k, split=split, top_pairs=top_pairs,
        edit=edit)


def tools() -> list[Tool]:
    return [strict_tool(get_attention, STORES, "Attention patterns and q×k score split")]
