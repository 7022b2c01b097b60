"""Component-knowledge tools (harvest-backed): get_component_info,
get_component_activation_examples, search_components, label_component. A first call that builds
the harvest becomes a background job when it runs past the server's limit."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.tools.base import Tool
from pydantic import Field

from spd_mcp.errors import InputError
from spd_mcp.harvest import query as K
from spd_mcp.interp.store import LabelRow
from spd_mcp.keys import layer_of
from spd_mcp.service.knowledge import component_info
from spd_mcp.service.labels import best_labels, search_labels
from spd_mcp.service.prepare import ensure_harvest
from spd_mcp.service.state import AppState, ProgressFn, compute

from .common import READ_ONLY, STORES, ComponentArg, Pending, R, as_job, job_tool, state


async def get_component_info(
    ctx: Context,
    component: ComponentArg,
    rank_tokens_by: Annotated[K.TokenRank, Field(
        description="smoothed_pmi = PMI shrunk toward 0 for rare tokens")] = "smoothed_pmi",
    top_k: Annotated[int, Field(ge=1, le=50)] = 10,
    min_count: Annotated[int, Field(ge=1, description="ignore rarer token pairs")] = 3,
) -> K.ComponentInfo | Pending:
    """What a component fires on (from the harvest): density, mean CI / activation (and the
    fraction of firings with a positive activation), top input tokens and predicted output
    tokens (count, precision, recall, PMI, smoothed PMI), co-firing components, label if any."""
    st = state(ctx)
    st.session.keys.component(component)

    async def work(progress: ProgressFn) -> K.ComponentInfo:
        h = await ensure_harvest(st, progress)
        return await component_info(st, h, component, rank_tokens_by=rank_tokens_by,
                                    top_k=top_k, min_count=min_count)

    return await _with_harvest(ctx, "get_component_info", work)


async def _with_harvest(ctx: Context, tool: str,
                        work: Callable[[ProgressFn], Coroutine[Any, Any, R]]) -> R | Pending:
    """``work(progress)`` (which may build the harvest on first use): a background job past the
    server's limit."""
    return await as_job(ctx, tool, work, stages={"harvest"}, unit="tokens",
                        message="building the harvest (first use)")


async def get_component_activation_examples(
    ctx: Context,
    component: ComponentArg,
    limit: Annotated[int, Field(ge=1, le=50)] = 10,
    offset: Annotated[int, Field(ge=0)] = 0,
    order: Annotated[Literal["random", "ci", "act"], Field(
        description="a uniform sample, or strongest first")] = "random",
) -> K.ActivationExamples | Pending:
    """Dataset windows where a component fires, the firing token in [[ ]], with the component's
    CI at every window token."""
    st = state(ctx)
    st.session.keys.component(component)

    async def work(progress: ProgressFn) -> K.ActivationExamples:
        h = await ensure_harvest(st, progress)
        return await asyncio.to_thread(lambda: K.activation_examples(
            st.session, h, component, limit=limit, offset=offset, order=order))

    return await _with_harvest(ctx, "get_component_activation_examples", work)


async def search_components(
    ctx: Context,
    output_token: Annotated[str | None, Field(
        description="components driving / accompanying its prediction")] = None,
    input_token: Annotated[str | None, Field(description="components firing on it")] = None,
    label: Annotated[str | None, Field(description="text in component labels")] = None,
    layer: Annotated[str | None, Field(description="one canonical layer")] = None,
    rank_by: Annotated[Literal["effect", "smoothed_pmi", "pmi", "precision", "recall", "count"]
                       | None, Field(
        description="effect (output_token default): first-order drop in log P(token) when "
        "ablated; the others: firing association from the harvest (smoothed_pmi default)")
    ] = None,
    min_count: Annotated[int, Field(ge=1)] = 3,
    limit: Annotated[int, Field(ge=1, le=100)] = 10,
    include_bias: Annotated[bool, Field(description="include always-on 'bias' components")
                            ] = False,
    active_on: Annotated[str | None, Field(
        description="a prompt: flag hits not alive on it (CI 0 everywhere)")] = None,
) -> K.ComponentSearch | Pending:
    """Find components by their effect on a predicted token (output_token), the tokens they
    fire on (input_token) or label text, or list a layer's components by density. Rankings
    other than effect and label need the harvest. Example:
    search_components(output_token="she", active_on="... and there")."""
    st = state(ctx)
    s = st.session
    given = [x for x in (output_token, input_token, label) if x is not None]
    if len(given) > 1:
        raise InputError("give at most one of output_token, input_token, label")
    if not given and layer is None:
        raise InputError("give output_token, input_token, label or layer")
    if layer is not None:
        s.keys.layer(layer)
    ids = None
    if active_on is not None:
        try:
            ids = s.encode(active_on)
        except InputError as e:
            raise InputError(f"active_on: {e}") from None

    async def work(progress: ProgressFn) -> K.ComponentSearch:
        found = await _search(st, progress, output_token, input_token, label, layer, rank_by,
                              min_count, limit, include_bias)
        if active_on is None or ids is None:
            return found
        text, prompt = active_on, ids
        return await compute(st, "search_components",
                             lambda: K.mark_alive(s, found, text, prompt))

    return await _with_harvest(ctx, "search_components", work)


async def _search(
    st: AppState, progress: ProgressFn, output_token: str | None, input_token: str | None,
    label: str | None, layer: str | None, rank_by: str | None, min_count: int, limit: int,
    include_bias: bool,
) -> K.ComponentSearch:
    s = st.session
    if label is not None:
        rows = await search_labels(st, label, 10_000)
        if layer is not None:
            rows = [r for r in rows if layer_of(r.component) == layer]
        if not rows and not await best_labels(st):
            raise InputError("this run has no labels yet: build them with `spd-mcp label "
                       f"{s.run.name}` (or label_component for one component); meanwhile search "
                       "by input_token, output_token or layer")
        found = [K.FoundComponent(key=r.component, score=round(r.confidence or 0.0, 4),
                                  density=None, is_bias=False, label=r.label) for r in rows]
        return K.ComponentSearch(query={"label": label, "layer": layer}, ranked_by="confidence",
                                 n_matching=len(found), components=found[:limit],
                                 excluded_bias=0)
    if rank_by == "effect" and output_token is None:
        raise InputError("rank_by='effect' needs output_token")
    if output_token is not None and rank_by in (None, "effect"):
        tok = output_token
        s.token_id(tok)
        h_opt = await st.harvest()
        return await compute(st, "search_components", lambda: K.search_by_effect(
            s, h_opt, tok, layer=layer, k=limit, include_bias=include_bias))
    by: K.TokenRank = rank_by or "smoothed_pmi"  # type: ignore[assignment]
    assert by != "effect"
    try:
        h = await ensure_harvest(st, progress)
    except InputError as e:
        what = (f"rank_by={by!r}" if output_token is not None or input_token is not None
                else "listing a layer by density")
        raise InputError(f"search_components: {what} ranks by harvest statistics, and {e}; "
                         "meanwhile search_components(output_token=..., rank_by='effect') and "
                         "label search work without one") from None
    if output_token is not None or input_token is not None:
        kind: Literal["input", "output"] = "output" if output_token is not None else "input"
        tok = output_token if output_token is not None else input_token
        assert tok is not None
        return await asyncio.to_thread(lambda: K.search_by_token(
            s, h, tok, kind=kind, by=by, layer=layer, k=limit, min_count=min_count,
            include_bias=include_bias))
    assert layer is not None
    return K.search_by_layer(s, h, layer, k=limit, include_bias=include_bias)


async def label_component(
    ctx: Context,
    component: ComponentArg,
    refresh: Annotated[bool, Field(description="relabel even if labelled")] = False,
    model: Annotated[str | None, Field(description="Anthropic model")] = None,
) -> LabelRow | Pending:
    """Label one component now with an LLM (from its activation examples and token statistics);
    needs ANTHROPIC_API_KEY (or ANTHROPIC_BASE_URL) in the server's environment."""
    from spd_mcp.interp.autointerp import label_one
    from spd_mcp.interp.client import NO_KEY, LLMSettings, api_key_configured
    from spd_mcp.interp.store import LabelStore, labels_path

    st = state(ctx)
    key = str(st.session.keys.component(component))
    settings = LLMSettings(max_concurrency=1, **({"model": model} if model else {}))
    if not api_key_configured(settings):
        raise InputError(f"cannot label: {NO_KEY} in the environment of `spd-mcp serve`, then "
                         "restart it (or run `spd-mcp label RUN` offline)")

    async def work(progress: ProgressFn) -> LabelRow:
        h = await ensure_harvest(st, progress)
        with LabelStore(labels_path(st.session.run_id)) as store:
            row = await label_one(st.session, h, key, settings, store, refresh=refresh)
        if row.status != "ok":
            raise InputError(f"labelling {key} {row.status}: {row.error}")
        return row

    return await _with_harvest(ctx, "label_component", work)


def tools() -> list[Tool]:
    return [
        job_tool(get_component_info, READ_ONLY, "Component info"),
        job_tool(get_component_activation_examples, READ_ONLY, "Activation examples"),
        job_tool(search_components, READ_ONLY, "Search components"),
        job_tool(label_component, STORES, "Label a component"),
    ]
