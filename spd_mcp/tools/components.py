"""Component tools: get_ci, probe_component, get_component_vectors, find_components_by_examples."""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.tools.base import Tool
from pydantic import BaseModel, ConfigDict, Field

from spd_mcp.analysis.components import (
    CIResult,
    ExamplesResult,
    ProbeResult,
    SignStats,
    active_components,
    component_vectors,
    find_by_examples,
    probe_component,
)
from spd_mcp.analysis.features import ComponentFeatures, feature_ci, feature_input, with_features
from spd_mcp.errors import InputError
from spd_mcp.harvest.stats import component_summary
from spd_mcp.service.prompts import check_position, resolve_prompt
from spd_mcp.service.state import AppState, compute
from spd_mcp.service.worker import remote

from .common import READ_ONLY, ComponentArg, LayersArg, PromptIdArg, TextArg, state, strict_tool


async def get_ci(
    ctx: Context,
    text: TextArg = None,
    prompt_id: PromptIdArg = None,
    threshold: Annotated[float, Field(ge=0, le=1, description="list CI above this")] = 0.0,
    layers: LayersArg = None,
    positions: list[int] | None = None,
    top_per_position: Annotated[int, Field(ge=1, le=100)] = 10,
    features: Annotated[dict[str, float] | None, Field(
        description="toy runs: {feature index: value} instead of text")] = None,
) -> CIResult:
    """Natural causal importance (CI) per position: which components the model needs where."""
    st = state(ctx)
    if layers is not None:
        layers = [st.session.keys.layer(n) for n in layers]
    if features is not None:
        if text is not None or prompt_id is not None or positions is not None:
            raise InputError("features replaces text / prompt_id / positions; give only it")
        return await compute(st, "get_ci", remote(
            feature_ci, st.session, feature_input(st.session, features), threshold=threshold,
            layers=layers, top=top_per_position))
    ids, _ = await resolve_prompt(st, text, prompt_id)
    if positions is not None:
        positions = [check_position(p, len(ids), "positions[]") for p in positions]
    return await compute(st, "get_ci", remote(
        active_components, st.session, ids, threshold=threshold, layers=layers,
        positions=positions, top_per_position=top_per_position))


async def probe_component_tool(
    ctx: Context,
    component: ComponentArg,
    text: TextArg = None,
    prompt_id: PromptIdArg = None,
) -> ProbeResult:
    """One component's CI and activation at every position of a prompt."""
    st = state(ctx)
    key = st.session.keys.component(component)
    ids, _ = await resolve_prompt(st, text, prompt_id)
    return await compute(st, "probe_component", remote(probe_component, st.session, ids,
                                                          key))


probe_component_tool.__name__ = "probe_component"


async def get_component_vectors(
    ctx: Context,
    component: ComponentArg,
    top_k: Annotated[int, Field(ge=1, le=50)] = 10,
    include_vectors: Annotated[bool, Field(description="also the raw vectors")] = False,
) -> ComponentFeatures:
    """A component's read (V column) and write (U row) vectors: norms; tokens a positive
    activation boosts / suppresses via the unembedding (reversed if negative); tokens and
    upstream components that most raise / lower its activation; its typical sign. The output
    changes by activation × U[c]; direct paths only. Toy runs: the input features it reads
    and the outputs it writes."""
    st = state(ctx)
    key = st.session.keys.component(component)
    sign = await _harvest_sign(st, str(key))
    return await compute(st, "get_component_vectors", lambda: with_features(
        st.session, key, component_vectors(
            st.session, key, top_k=top_k, include_vectors=include_vectors, sign=sign), top_k))


async def _harvest_sign(st: AppState, key: str) -> SignStats | None:
    """The activation sign where the component fires, from the harvest (None without one)."""
    h = await st.harvest()
    if h is None:
        return None
    s = component_summary(h.stats, key)
    frac = s.frac_positive_when_firing
    return SignStats(source=f"harvest {h.config_hash} ({h.stats.n_tokens} tokens, where it "
                     "fires)", n_firing=s.fire_count, mean_act=round(s.mean_act_when_firing, 4),
                     frac_positive=None if frac is None else round(frac, 4))


class Example(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str
    position: int = Field(-1, description="-1 = last")


async def find_components_by_examples(
    ctx: Context,
    examples: Annotated[list[Example], Field(min_length=1, max_length=32)],
    negatives: Annotated[list[Example], Field(max_length=32, description="contrast set")
                         ] = [],  # noqa: B006
    layers: LayersArg = None,
    top_k: Annotated[int, Field(ge=1, le=100)] = 20,
    min_frac: Annotated[float, Field(ge=0, le=1, description="must fire on this fraction")] = 0.5,
) -> ExamplesResult:
    """Components firing at the example positions more than on ordinary text (score = mean CI
    at examples - mean CI over a dataset sample) or, with negatives, more than at the
    negatives' positions; only those with CI > 0 on at least min_frac of the examples.
    Example: examples=[{"text": "the girl flew a kite"}], negatives=[{"text": "the girl rang a
    bell"}]."""
    st = state(ctx)
    s = st.session
    if layers is not None:
        layers = [s.keys.layer(n) for n in layers]
    pos = _parse_examples(st, examples, "examples")
    neg = _parse_examples(st, negatives, "negatives")
    return await compute(st, "find_components_by_examples", remote(
        find_by_examples, s, pos, negatives=neg, layers=layers, top_k=top_k, min_frac=min_frac))


def _parse_examples(st: AppState, examples: list[Example], arg: str) -> list[tuple[list[int], int]]:
    """Encoded examples; every bad one is named in one error (not only the first)."""
    out, bad = [], []
    for i, ex in enumerate(examples):
        try:
            ids = st.session.encode(ex.text)
        except InputError as e:
            bad.append(f"{arg}[{i}].text: {e}")
            continue
        try:
            out.append((ids, check_position(ex.position, len(ids), f"{arg}[{i}].position")))
        except InputError as e:
            bad.append(str(e))
    if bad:
        raise InputError("; ".join(bad))
    return out


def tools() -> list[Tool]:
    return [
        strict_tool(get_ci, READ_ONLY, "Causal importance"),
        strict_tool(probe_component_tool, READ_ONLY, "Probe component"),
        strict_tool(get_component_vectors, READ_ONLY, "Component vectors"),
        strict_tool(find_components_by_examples, READ_ONLY, "Find components by examples"),
    ]
