"""What a component fires on and what it does, from the harvest (and dataset attributions when
present): the views behind get_component_info, get_component_activation_examples and
search_components."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, Field

from spd_mcp.errors import AnalysisError
from spd_mcp.harvest.examples import component_examples
from spd_mcp.harvest.stats import (
    PMI_PRIOR,
    ComponentSummary,
    component_summary,
    components_for_token,
    correlated,
    top_tokens,
)
from spd_mcp.harvest.store import Harvest
from spd_mcp.keys import ComponentKey, layer_of
from spd_mcp.model.session import RunSession
from spd_mcp.model.text import encode_document

BIAS_DENSITY = 0.5
"""A component firing on more than this fraction of tokens is an always-on "bias" component."""

TokenRank = Literal["smoothed_pmi", "pmi", "precision", "recall", "count"]
TOKEN_RANKS = "smoothed_pmi (default), pmi, precision, recall or count"

_RANKS: dict[str, tuple[str, str]] = {  # by -> (tokens of a component, components of a token)
    "smoothed_pmi": (
        f"smoothed PMI = log(P̂(fire | token) / P(fire)), P̂ = (count + {PMI_PRIOR:g}·P(fire)) / "
        f"(token_count + {PMI_PRIOR:g}): PMI shrunk by {PMI_PRIOR:g} pseudo-tokens, so a token "
        "seen more often ranks higher (raw PMI ties at log(1/P(fire)) whenever recall is 1)",
        f"smoothed PMI = log(P̂(token | fire) / P(token)), P̂ = (count + {PMI_PRIOR:g}·P(token)) / "
        f"(fire_count + {PMI_PRIOR:g}): PMI shrunk by {PMI_PRIOR:g} pseudo-firings, so a "
        "component with more evidence ranks higher (raw PMI ties whenever precision is 1)"),
    "pmi": ("raw PMI log(P(token, fire) / (P(token) P(fire))); ties at log(1/P(fire)) for "
            "every token with recall 1",
            "raw PMI log(P(token, fire) / (P(token) P(fire))); ties for every component with "
            "precision 1"),
    "precision": ("precision P(token | fires), ties by count",) * 2,
    "recall": ("recall P(fires | token), ties by count",) * 2,
    "count": ("count of firing tokens with the token",) * 2,
}


def rank_text(by: str, listing: Literal["tokens", "components"]) -> str:
    """What ranks a token list (tokens of a component) or a component list (of a token)."""
    return f"{by}: {_RANKS[by][0 if listing == 'tokens' else 1]}"


class TokenStat(BaseModel):
    token: str
    count: int = Field(description="firing tokens with this token")
    precision: float = Field(description="P(token | component fires)")
    recall: float = Field(description="P(component fires | token)")
    pmi: float
    smoothed_pmi: float


class RelatedComponent(BaseModel):
    key: str
    count: int = Field(description="tokens where both fire")
    jaccard: float
    pmi: float


class ComponentInfo(BaseModel):
    key: str
    summary: ComponentSummary
    is_bias: bool = Field(description=f"fires on more than {BIAS_DENSITY:.0%} of tokens")
    top_input_tokens: list[TokenStat] = Field(description="tokens it fires on")
    top_output_tokens: list[TokenStat] = Field(
        description="the target's predicted next token where it fires")
    tokens_ranked_by: str = Field(description="the statistic ordering both token lists")
    correlated: list[RelatedComponent] = Field(description="components that co-fire with it")
    label: str | None = Field(None, description="LLM-written label, when labels exist")
    label_info: dict[str, str | float | None] | None = Field(
        None, description="where the label comes from: kind, confidence, reasoning")
    harvest: str = Field(description="harvest stage (config hash) these statistics come from")
    n_tokens: int


def _tokens(session: RunSession, rows: list, k: int) -> list[TokenStat]:
    return [TokenStat(token=session.token_str(r.token_id), count=r.count,
                      precision=round(r.precision, 5), recall=round(r.recall, 5),
                      pmi=round(r.pmi, 4), smoothed_pmi=round(r.smoothed_pmi, 4))
            for r in rows[:k]]


def component_info(
    session: RunSession, h: Harvest, key: str, *, by: TokenRank = "smoothed_pmi", k: int = 10,
    min_count: int = 3, label: str | None = None,
    label_info: dict[str, str | float | None] | None = None,
) -> ComponentInfo:
    s = h.stats
    comp = session.keys.component(key)
    summary = component_summary(s, str(comp))
    ins = top_tokens(s, str(comp), kind="input", by=by, k=k, min_count=min_count)
    outs = top_tokens(s, str(comp), kind="output", by=by, k=k, min_count=min_count)
    rel = correlated(s, str(comp), by="jaccard", k=k, min_count=min_count)
    return ComponentInfo(
        key=str(comp), summary=summary, is_bias=summary.density > BIAS_DENSITY,
        top_input_tokens=_tokens(session, ins, k), top_output_tokens=_tokens(session, outs, k),
        tokens_ranked_by=rank_text(by, "tokens"),
        correlated=[RelatedComponent(key=r.key, count=r.count, jaccard=round(r.jaccard, 5),
                                     pmi=round(r.pmi, 4)) for r in rel],
        label=label, label_info=label_info, harvest=h.manifest.config_hash, n_tokens=s.n_tokens,
    )


class ExampleWindow(BaseModel):
    doc: int
    pos: int = Field(description="position of the firing token in its document (BOS = 0)")
    text: str = Field(description="the window with the firing token in [[ ]]")
    tokens: list[str]
    firing_index: int = Field(description="index of the firing token in tokens / ci")
    ci: list[float] = Field(description="this component's CI at each window token")
    act: float = Field(description="activation at the firing token")


class ActivationExamples(BaseModel):
    key: str
    fire_count: int
    n_stored: int = Field(description="examples stored (a uniform sample of firing tokens)")
    examples: list[ExampleWindow]
    next_offset: int | None = None


def activation_examples(
    session: RunSession, h: Harvest, key: str, *, limit: int = 10, offset: int = 0,
    order: Literal["random", "ci", "act"] = "random",
) -> ActivationExamples:
    comp = str(session.keys.component(key))
    rows = component_examples(h, comp, order=order)
    page = rows[offset : offset + limit]
    out = []
    for r in page:
        toks = session.tokens(r.token_ids)
        marked = [f"[[{t}]]" if i == r.offset else t for i, t in enumerate(toks)]
        text = session.join_tokens(marked)
        out.append(ExampleWindow(doc=r.doc, pos=r.pos, text=text, tokens=toks,
                                 firing_index=r.offset, ci=[round(c, 4) for c in r.ci],
                                 act=round(r.act, 4)))
    fire = int(h.stats.t["fire_count"][h.stats.index(comp)])
    nxt = offset + limit if offset + limit < len(rows) else None
    return ActivationExamples(key=comp, fire_count=fire, n_stored=len(rows), examples=out,
                              next_offset=nxt)


class FoundComponent(BaseModel):
    key: str
    score: float
    density: float | None = Field(description="firing density (None without a harvest)")
    is_bias: bool
    detail: dict[str, float] = Field(default_factory=dict)
    label: str | None = None
    alive_on_prompt: bool | None = Field(
        None, description="natural CI > 0 somewhere on the active_on prompt (None: not asked)")


class ComponentSearch(BaseModel):
    query: dict[str, str | None]
    ranked_by: str
    n_matching: int
    components: list[FoundComponent]
    excluded_bias: int = Field(description="always-on components left out (include_bias=false)")
    notice: str | None = None


def search_by_token(
    session: RunSession, h: Harvest, token: str, *, kind: Literal["input", "output"],
    by: TokenRank = "smoothed_pmi", layer: str | None = None, k: int = 20, min_count: int = 3,
    include_bias: bool = False,
) -> ComponentSearch:
    """Components most associated with an input token (fires on it) or an output token (fires
    where the target predicts it), by smoothed PMI / PMI / precision / recall / count."""
    tid = session.token_id(token)
    density = h.stats.density()
    rows = components_for_token(h.stats, tid, kind=kind, by=by, k=h.stats.t["fire_count"].numel(),
                                min_count=min_count)
    if layer is not None:
        session.keys.layer(layer)
        rows = [r for r in rows if layer_of(r.key) == layer]
    kept, bias = [], 0
    for r in rows:
        d = float(density[r.index])
        if d > BIAS_DENSITY and not include_bias:
            bias += 1
            continue
        kept.append(FoundComponent(key=r.key, score=round(float(getattr(r, by)), 5),
                                   density=round(d, 5), is_bias=d > BIAS_DENSITY,
                                   detail={"precision": round(r.precision, 5),
                                           "recall": round(r.recall, 5), "pmi": round(r.pmi, 4),
                                           "smoothed_pmi": round(r.smoothed_pmi, 4),
                                           "count": r.count}))
    return ComponentSearch(query={f"{kind}_token": token, "layer": layer}, ranked_by=by,
                           n_matching=len(kept), components=kept[:k], excluded_bias=bias,
                           notice=f"score = {rank_text(by, 'components')}; detail keeps the raw "
                                  "statistics")


def search_by_layer(
    session: RunSession, h: Harvest, layer: str, *, k: int = 20, include_bias: bool = False,
) -> ComponentSearch:
    """A layer's components by firing density (most active first)."""
    session.keys.layer(layer)
    lo = h.stats.offsets[h.stats.layers.index(layer)]
    C = session.keys.Cs[layer]
    dens = h.stats.density()[lo : lo + C]
    order = torch.argsort(dens, descending=True).tolist()
    kept, bias = [], 0
    for c in order:
        d = float(dens[c])
        if d == 0:
            break
        if d > BIAS_DENSITY and not include_bias:
            bias += 1
            continue
        kept.append(FoundComponent(key=str(ComponentKey(layer, c)), score=round(d, 5),
                                   density=round(d, 5), is_bias=d > BIAS_DENSITY))
    return ComponentSearch(query={"layer": layer}, ranked_by="density", n_matching=len(kept),
                           components=kept[:k], excluded_bias=bias)


def require(h: Harvest | None, session: RunSession) -> Harvest:
    if h is None:
        raise AnalysisError(
            f"no harvest for run {session.run.name!r}: build one with `spd-mcp harvest "
            f"{session.run.name}` (about 20 s on one CPU core for tales)"
        )
    return h


def output_token_effects(
    session: RunSession, token_id: int, *, n_docs: int = 400, max_positions: int = 256,
    batch_size: int = 32,
) -> tuple[torch.Tensor, int]:
    """First-order effect of removing each component on log P(token) where the target predicts
    it: Σ over dataset positions whose top-1 prediction is the token of ∂ log p / ∂ m_c (masks all
    1, delta on, so the forward is the exact target), summed over every source position.

    Returns (effect per component in canonical order (ΣC,), number of positions used). A positive
    effect means ablating the component lowers the token's log-probability.
    """
    cm = session.cm
    texts = session.require_lm().dataset_text
    pad = session.tok.pad_id
    total = {m: torch.zeros(C, dtype=torch.float64, device=session.device)
             for m, C in cm.Cs.items()}
    used = 0
    for start in range(0, n_docs, batch_size):
        if used >= max_positions:
            break
        rows = [encode_document(session, texts(i))
                for i in range(start, min(n_docs, start + batch_size))]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), pad, dtype=torch.long, device=session.device)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r)
        with torch.no_grad():
            logits = cm.target(ids)
        hit = (logits.argmax(-1) == token_id) & (ids != pad)  # (B, T)
        if not hit.any():
            continue
        keep = hit.nonzero()[: max_positions - used]
        sel = torch.zeros_like(hit)
        sel[keep[:, 0], keep[:, 1]] = True
        masks = {m: torch.ones(len(rows), T, C, device=session.device, requires_grad=True)
                 for m, C in cm.Cs.items()}
        with torch.enable_grad():
            out = cm(ids, masks=masks, delta_masks={m: 1.0 for m in masks})
            lp = torch.log_softmax(out.float(), -1)[..., token_id]  # (B, T)
            grads = torch.autograd.grad(lp[sel].sum(), list(masks.values()))
        for m, g in zip(masks, grads, strict=True):
            total[m] += g.sum((0, 1)).double()
        used += int(sel.sum())
    flat = torch.cat([total[session.to_module[c]] for c in session.layers])
    return flat / max(used, 1), used


def search_by_effect(
    session: RunSession, h: Harvest | None, token: str, *, layer: str | None = None, k: int = 20,
    include_bias: bool = False, n_docs: int = 400, max_positions: int = 256,
) -> ComponentSearch:
    """Components whose removal most lowers P(token) where the model predicts it."""
    tid = session.token_id(token)
    cache: dict[tuple, tuple[torch.Tensor, int]] = session.__dict__.setdefault("_effects", {})
    ck = (tid, n_docs, max_positions)
    if ck not in cache:
        cache[ck] = output_token_effects(session, tid, n_docs=n_docs, max_positions=max_positions)
    effect, used = cache[ck]
    if used == 0:
        raise AnalysisError(
            f"the model never predicts {token!r} (top-1) in the first {n_docs} dataset documents; "
            "rank by pmi / precision / recall instead")
    keys = [str(ComponentKey(layer_, c)) for layer_ in session.layers
            for c in range(session.keys.Cs[layer_])]
    density = h.stats.density() if h is not None else None
    order = torch.argsort(effect, descending=True).tolist()
    kept, bias = [], 0
    for i in order:
        if effect[i] <= 0:
            break
        key = keys[i]
        if layer is not None and layer_of(key) != layer:
            continue
        d = float(density[i]) if density is not None else None
        is_bias = d is not None and d > BIAS_DENSITY
        if is_bias and not include_bias:
            bias += 1
            continue
        kept.append(FoundComponent(key=key, score=round(float(effect[i]), 5),
                                   density=None if d is None else round(d, 5), is_bias=is_bias))
    notice = (f"effect = first-order drop in log P({token}) when the component is ablated, "
              f"averaged over {used} dataset positions where the model predicts it")
    if h is None:
        notice += (f". No harvest for run {session.run.name!r} yet: densities are unknown and "
                   "always-on 'bias' components are NOT excluded. Input-token / layer searches, "
                   "pmi-style rankings and get_component_info use one (a served run builds it "
                   "on their first call; from a shell: `spd-mcp prepare "
                   f"{session.run.name}`); run this search again afterwards")
    return ComponentSearch(
        query={"output_token": token, "layer": layer}, ranked_by="effect", n_matching=len(kept),
        components=kept[:k], excluded_bias=bias, notice=notice)


@torch.no_grad()
def mark_alive(session: RunSession, found: ComponentSearch, text: str, ids: list[int]
               ) -> ComponentSearch:
    """Flag each hit alive (natural CI > 0 at some position) or not on the prompt ``ids``."""
    nat = session.natural_ci(ids)
    alive = {n: (g > 0).any(0) for n, g in nat.ci.items()}
    dead = []
    for c in found.components:
        ck = session.keys.component(c.key)
        c.alive_on_prompt = bool(alive[ck.layer][ck.c])
        if not c.alive_on_prompt:
            dead.append(c.key)
    note = (f"{len(dead)} of {len(found.components)} hits are not alive on the active_on prompt "
            f"(natural CI 0 at every position, so they cannot matter there): {dead}"
            if dead else f"all {len(found.components)} hits are alive on the active_on prompt")
    found.notice = f"{found.notice}. {note}" if found.notice else note
    found.query["active_on"] = text
    return found
