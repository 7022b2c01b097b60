"""Component-knowledge tools (harvest-backed): get_component_info,
get_component_activation_examples, search_components."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.tools.base import Tool
from pydantic import Field

from spd_mcp.analysis import knowledge as K

from .common import READ_ONLY, compute, ensure_harvest, fail, guard, state, strict_tool

ComponentArg = Annotated[str, Field(description="component key 'LAYER:C', e.g. '1.attn.o:5'")]


async def get_component_info(
    ctx: Context,
    component: ComponentArg,
    rank_tokens_by: Annotated[Literal["pmi", "precision", "recall", "count"], Field(
        description="how to rank associated tokens")] = "pmi",
    top_k: Annotated[int, Field(ge=1, le=50)] = 10,
    min_count: Annotated[int, Field(ge=1, description="ignore rarer token pairs")] = 3,
) -> K.ComponentInfo:
    """What a component fires on and where: density, mean CI / activation, top input tokens and
    predicted output tokens (PMI / precision / recall), co-firing components, label if any.
    Example: get_component_info(component="1.attn.o:5")."""
    st = state(ctx)
    guard(lambda: st.session.keys.component(component))
    h = await ensure_harvest(ctx)
    return await asyncio.to_thread(lambda: guard(lambda: K.component_info(
        st.session, h, component, by=rank_tokens_by, k=top_k, min_count=min_count)))


async def get_component_activation_examples(
    ctx: Context,
    component: ComponentArg,
    limit: Annotated[int, Field(ge=1, le=50)] = 10,
    offset: Annotated[int, Field(ge=0)] = 0,
    order: Annotated[Literal["random", "ci", "act"], Field(
        description="random = a uniform sample; ci / act = strongest first")] = "random",
) -> K.ActivationExamples:
    """Dataset windows where a component fires, the firing token in [[ ]], with the component's
    CI at every window token. Example: get_component_activation_examples(component="0.mlp.up:3")."""
    st = state(ctx)
    guard(lambda: st.session.keys.component(component))
    h = await ensure_harvest(ctx)
    return await asyncio.to_thread(lambda: guard(lambda: K.activation_examples(
        st.session, h, component, limit=limit, offset=offset, order=order)))


async def search_components(
    ctx: Context,
    output_token: Annotated[str | None, Field(
        description="components that drive / accompany the model predicting this token")] = None,
    input_token: Annotated[str | None, Field(description="components firing on this token")
                           ] = None,
    label: Annotated[str | None, Field(description="text to find in component labels")] = None,
    layer: Annotated[str | None, Field(description="restrict to one canonical layer")] = None,
    rank_by: Annotated[Literal["effect", "pmi", "precision", "recall", "count"] | None, Field(
        description="effect (output_token only, the default there): first-order drop in "
        "log P(token) when the component is ablated, over dataset positions predicting it; "
        "pmi / precision / recall / count: firing association from the harvest (default for "
        "input_token)")] = None,
    min_count: Annotated[int, Field(ge=1)] = 3,
    limit: Annotated[int, Field(ge=1, le=100)] = 10,
    include_bias: Annotated[bool, Field(
        description="include always-on 'bias' components (excluded by default)")] = False,
) -> K.ComponentSearch:
    """Find components by what they do for a predicted token (output_token), by the tokens they
    fire on (input_token), by label text, or list a layer's components by density.
    Example: search_components(output_token="she", limit=10)."""
    st = state(ctx)
    s = st.session
    given = [x for x in (output_token, input_token, label) if x is not None]
    if len(given) > 1:
        raise fail("give at most one of output_token, input_token, label")
    if not given and layer is None:
        raise fail("give output_token, input_token, label or layer")
    if layer is not None:
        guard(lambda: s.keys.layer(layer))
    if label is not None:
        raise fail("no labels exist for this run yet (labelling comes with `spd-mcp label`); "
                   "search by input_token, output_token or layer")
    if rank_by == "effect" and output_token is None:
        raise fail("rank_by='effect' needs output_token")
    if output_token is not None and rank_by in (None, "effect"):
        tok = output_token
        guard(lambda: s.token_id(tok))
        h_opt = await st.harvest()
        return await compute(ctx, "search_components", lambda: K.search_by_effect(
            s, h_opt, tok, layer=layer, k=limit, include_bias=include_bias))
    h = await ensure_harvest(ctx)
    by = rank_by or "pmi"
    assert by != "effect"
    if output_token is not None or input_token is not None:
        kind: Literal["input", "output"] = "output" if output_token is not None else "input"
        tok = output_token if output_token is not None else input_token
        assert tok is not None
        return await asyncio.to_thread(lambda: guard(lambda: K.search_by_token(
            s, h, tok, kind=kind, by=by, layer=layer, k=limit, min_count=min_count,
            include_bias=include_bias)))
    assert layer is not None
    return guard(lambda: K.search_by_layer(s, h, layer, k=limit, include_bias=include_bias))


def tools() -> list[Tool]:
    return [
        strict_tool(get_component_info, READ_ONLY, "Component info"),
        strict_tool(get_component_activation_examples, READ_ONLY, "Activation examples"),
        strict_tool(search_components, READ_ONLY, "Search components"),
    ]
