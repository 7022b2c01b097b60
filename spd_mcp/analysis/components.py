"""Per-prompt component views: active components, a component's probe, its vectors and search by
examples. (Generation lives in :mod:`spd_mcp.model.text`.)"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from spd_mcp.errors import AnalysisError
from spd_mcp.keys import BlockLayer, ComponentKey, component_key
from spd_mcp.model.session import RunSession
from spd_mcp.model.text import dataset_texts, encode_document


class ActiveComponent(BaseModel):
    key: str
    ci: float
    act: float = Field(description="component activation x·V[:, c]")


class PositionCI(BaseModel):
    pos: int
    token: str
    n_active: int = Field(description="components with CI > threshold at this position")
    top: list[ActiveComponent]


class CIResult(BaseModel):
    tokens: list[str]
    threshold: float
    layers: list[str]
    n_active_total: int
    positions: list[PositionCI]
    truncated: bool = Field(description="true when some positions list only their top components")


@torch.no_grad()
def active_components(
    session: RunSession,
    ids: list[int],
    *,
    threshold: float = 0.0,
    layers: Sequence[str] | None = None,
    positions: Sequence[int] | None = None,
    top_per_position: int = 10,
) -> CIResult:
    nat = session.natural_ci(ids)
    names = list(layers) if layers else session.layers
    rows = []
    truncated = False
    show = list(positions) if positions is not None else list(range(len(ids)))
    # Flatten (layer, c) per position with tensor ops; C may differ between layers.
    flat_ci = torch.cat([nat.ci[n] for n in names], dim=-1)  # (T, ΣC)
    flat_act = torch.cat([nat.acts[n] for n in names], dim=-1)  # (T, ΣC)
    owners = [(n, c) for n in names for c in range(session.keys.Cs[n])]
    active = flat_ci > threshold  # (T, ΣC)
    counts = active.sum(-1).tolist()
    total = int(sum(counts[p] for p in show))
    k = min(top_per_position, flat_ci.shape[-1])
    vals, idx = flat_ci.masked_fill(~active, -1.0).topk(k, dim=-1)  # (T, k)
    for p in show:
        top = []
        for v, i in zip(vals[p].tolist(), idx[p].tolist(), strict=True):
            if v < 0:
                break
            n, c = owners[i]
            top.append(ActiveComponent(key=component_key(n, c), ci=round(v, 4),
                                       act=round(float(flat_act[p, i]), 4)))
        truncated |= counts[p] > len(top)
        rows.append(PositionCI(pos=p, token=session.token_str(ids[p]), n_active=counts[p], top=top))
    return CIResult(tokens=session.tokens(ids), threshold=threshold, layers=names,
                    n_active_total=total, positions=rows, truncated=truncated)


class ProbeRow(BaseModel):
    pos: int
    token: str
    ci: float
    act: float


class ProbeResult(BaseModel):
    key: str
    max_ci: float
    firing_positions: list[int] = Field(description="positions where CI > 0")
    positions: list[ProbeRow]


@torch.no_grad()
def probe_component(session: RunSession, ids: list[int], key: ComponentKey) -> ProbeResult:
    nat = session.natural_ci(ids)
    g = nat.ci[key.layer][:, key.c]  # (T,)
    a = nat.acts[key.layer][:, key.c]  # (T,)
    rows = [
        ProbeRow(pos=p, token=session.token_str(t), ci=round(ci, 4), act=round(act, 4))
        for p, (t, ci, act) in enumerate(zip(ids, g.tolist(), a.tolist(), strict=True))
    ]
    return ProbeResult(key=str(key), max_ci=round(float(g.max()), 4),
                       firing_positions=(g > 0).nonzero().flatten().tolist(), positions=rows)


class TokenScore(BaseModel):
    token: str
    score: float


class KeyScore(BaseModel):
    key: str
    score: float


class SignStats(BaseModel):
    """How a component's activation is signed where it fires."""

    source: str = Field(description="where these numbers come from")
    n_firing: int
    mean_act: float = Field(description="mean activation x·V[:, c] where it fires")
    frac_positive: float | None = Field(description="fraction of firings with activation > 0")


class TypicalActivation(SignStats):
    sign: Literal["positive", "negative", "mixed", "never fires"]
    effect: str = Field(description="what the component does with its typical activation")


class FlippedWrite(BaseModel):
    boosts: list[str] = Field(description="= top_suppressed: raised when the activation is < 0")
    suppresses: list[str] = Field(description="= top_boosted: lowered when the activation is < 0")


EFFECT_RULE = (
    "the component adds activation × U[c] to its layer's output, where activation = x·V[:, c] "
    "can be positive or negative (CI only gates it): top_boosted / top_suppressed are for a "
    "POSITIVE activation; a negative activation swaps them (if_negative), so read "
    "typical_activation before calling a component a booster or a suppressor")
MIXED = 0.8
"""A sign is typical when at least this fraction of firings has it; otherwise 'mixed'."""


class ComponentVectors(BaseModel):
    key: str
    d_in: int
    d_out: int
    read_norm: float
    write_norm: float
    reads_from: str = Field(description="what the read vector V[:, c] is applied to")
    writes_to: str = Field(description="where the write vector U[c] goes")
    effect_rule: str = EFFECT_RULE
    typical_activation: TypicalActivation | None = None
    top_boosted: list[TokenScore] | None = Field(
        None, description="tokens whose logits rise most per unit of POSITIVE activation "
        "(direct path through the unembedding)")
    top_suppressed: list[TokenScore] | None = Field(
        None, description="tokens whose logits fall most per unit of positive activation")
    if_negative: FlippedWrite | None = Field(
        None, description="the same direct path for a negative activation (lists swapped)")
    top_reading: list[TokenScore] | None = Field(
        None, description="tokens whose (normalised) embeddings give the most positive "
        "activation (direct path)")
    top_reading_negative: list[TokenScore] | None = Field(
        None, description="tokens whose embeddings give the most negative activation")
    reading_components: dict[str, list[KeyScore]] | None = Field(
        None, description="upstream components (the same block's up / v matrix) whose write "
        "vector at unit activation gives this component the most positive / negative "
        "activation, U_up[c']·V[:, c] (ignoring the MLP nonlinearity / attention mixing)")
    write_parts: dict[str, float] | None = Field(
        None, description="fused qkv matrix: norm of the write vector's query, key and value "
        "parts (a component may write to all three)")
    write_heads: dict[str, list[float]] | None = Field(
        None, description="q / k / v matrices (fused or not): the write vector's norm per "
        "attention head (which heads it feeds)")
    read_heads: list[float] | None = Field(
        None, description="attention output (o) matrix: the read vector's norm per head "
        "(which heads' outputs it reads)")
    read_vector: list[float] | None = None
    write_vector: list[float] | None = None


@torch.no_grad()
def component_vectors(
    session: RunSession, key: ComponentKey, *, top_k: int = 10, include_vectors: bool = False,
    sign: SignStats | None = None,
) -> ComponentVectors:
    """Read / write vectors of a component and their direct token paths, with the typical sign
    of its activation (from ``sign``, e.g. the harvest, else a dataset sample)."""
    V, U = session.component_vectors(key)
    model, topo = session.run.target.model, session.topology
    out = ComponentVectors(
        key=str(key), d_in=V.shape[0], d_out=U.shape[0], read_norm=round(float(V.norm()), 5),
        write_norm=round(float(U.norm()), 5), reads_from="layer input", writes_to="layer output",
    )
    role = BlockLayer.parse(key.layer)
    d = topo.d_model
    embed, unembed = topo.module_of("embed"), topo.module_of("output")
    if role is not None and d is not None and session.is_language_model and embed and unembed:
        if role.matrix in ("o", "down") and U.shape[0] == d and topo.final_norm is not None:
            out.writes_to = "residual stream"
            # Direct path to the logits: the final norm's linear part (LayerNorm: centring;
            # both: the gain), then the unembedding.
            gain = model.get_submodule(topo.final_norm).weight  # (d,)
            w = U - U.mean() if topo.norm == "layer" else U
            logits = model.get_submodule(unembed).weight @ (w * gain)  # (vocab,)
            out.top_boosted = _token_scores(session, logits, top_k)
            out.top_suppressed = _token_scores(session, -logits, top_k, negate=True)
            out.if_negative = FlippedWrite(boosts=[t.token for t in out.top_suppressed],
                                           suppresses=[t.token for t in out.top_boosted])
        norm = topo.input_norm(key.layer)
        if norm is not None and V.shape[0] == d:
            out.reads_from = "normalised residual stream"
            nmod = model.get_submodule(norm)
            emb = model.get_submodule(embed).weight  # (vocab, d)
            if topo.norm == "layer":  # LayerNorm of each token embedding
                emb = F.layer_norm(emb, (d,), nmod.weight, getattr(nmod, "bias", None))
            else:  # RMSNorm of each token embedding
                emb = F.normalize(emb, dim=-1) * d**0.5 * nmod.weight
            out.top_reading = _token_scores(session, emb @ V, top_k)
            out.top_reading_negative = _token_scores(session, -(emb @ V), top_k, negate=True)
        out.reading_components = _upstream(session, key, V, role, top_k)
    parts = topo.qkv_parts(U.shape[0]) if role is not None and role.matrix == "qkv" else None
    if parts is not None:
        out.writes_to = "attention queries, keys and values (fused qkv)"
        heads = {p: [round(float(U[s].norm()), 4) for s in sl] for p, sl in parts.items()}
        out.write_heads = heads
        out.write_parts = {p: round(sum(v * v for v in h) ** 0.5, 4) for p, h in heads.items()}
    n_heads = topo.n_heads
    if role is not None and role.kind == "attn" and n_heads and d and parts is None:
        dh = d // n_heads
        if role.matrix in ("q", "k", "v") and U.shape[0] % dh == 0:
            out.write_heads = {role.matrix: [round(float(x), 4)
                                             for x in U.reshape(-1, dh).norm(dim=-1)]}
        elif role.matrix == "o" and V.shape[0] % dh == 0:
            out.read_heads = [round(float(x), 4) for x in V.reshape(-1, dh).norm(dim=-1)]
    if include_vectors:
        out.read_vector = [round(v, 5) for v in V.tolist()]
        out.write_vector = [round(v, 5) for v in U.tolist()]
    if session.is_language_model:
        out.typical_activation = typical_activation(sign or sample_sign(session, key), out)
    return out


def _upstream(session: RunSession, key: ComponentKey, V: torch.Tensor, role: BlockLayer | None,
              k: int) -> dict[str, list[KeyScore]] | None:
    """Components of the matrix feeding this one inside its block (mlp.up → mlp.down,
    attn.v → attn.o) ranked by U_up[c'] · V[:, c], both signs."""
    feeds = {("mlp", "down"): "up", ("attn", "o"): "v"}
    src = feeds.get((role.kind, role.matrix)) if role is not None else None
    if role is None or src is None:
        return None
    up = f"{role.block}.{role.kind}.{src}"
    if up not in session.keys.Cs:
        return None
    U_up = session.cm.component(session.to_module[up]).U.detach()  # (C', d)
    if U_up.shape[-1] != V.shape[0]:
        return None
    scores = U_up @ V
    n = min(k, scores.shape[0])

    def top(x: torch.Tensor, sgn: float) -> list[KeyScore]:
        vals, idx = x.topk(n)
        return [KeyScore(key=component_key(up, i), score=round(sgn * v, 4))
                for v, i in zip(vals.tolist(), idx.tolist(), strict=True)]

    return {"positive": top(scores, 1.0), "negative": top(-scores, -1.0)}


def typical_activation(sign: SignStats, vec: ComponentVectors) -> TypicalActivation:
    """The typical sign of a component's activation and what it then does to the output."""
    frac = sign.frac_positive
    if sign.n_firing == 0:
        kind: Literal["positive", "negative", "mixed", "never fires"] = "never fires"
    elif frac is None:  # an older harvest: only the mean is known
        kind = "positive" if sign.mean_act > 0 else "negative"
    else:
        kind = "positive" if frac >= MIXED else "negative" if frac <= 1 - MIXED else "mixed"
    how = (f"{frac:.0%} of {sign.n_firing} firings positive, mean activation {sign.mean_act:+.3g}"
           if frac is not None else f"mean activation {sign.mean_act:+.3g} over "
           f"{sign.n_firing} firings")
    plus = [t.token for t in (vec.top_boosted or [])[:5]]
    minus = [t.token for t in (vec.top_suppressed or [])[:5]]
    if kind == "never fires":
        effect = "it never fired in this sample, so it has no typical sign"
    elif kind == "mixed":
        effect = (f"its activation takes both signs ({how}): its effect flips with it "
                  "(check the sign at your position with probe_component)")
    elif not plus:
        effect = (f"it writes {'+' if kind == 'positive' else '−'}U[c] (scaled) to "
                  f"{vec.writes_to} ({how})")
    elif kind == "positive":
        effect = f"usually positive ({how}): it boosts {plus} and suppresses {minus}"
    else:
        effect = (f"usually NEGATIVE ({how}): activation × U[c] then boosts {minus} and "
                  f"suppresses {plus} — the reverse of top_boosted / top_suppressed")
    return TypicalActivation(**sign.model_dump(), sign=kind, effect=effect)


def sample_sign(session: RunSession, key: ComponentKey) -> SignStats:
    """Activation sign of a component where its natural CI > 0 over the background sample."""
    st = _sample(session)
    i = _flat_index(session, key)
    n = int(st["n_alive"][i])
    return SignStats(
        source=f"dataset sample ({BACKGROUND_DOCS} documents, where CI > 0); no harvest",
        n_firing=n, mean_act=round(float(st["sum_act"][i]) / max(n, 1), 4),
        frac_positive=round(float(st["n_pos"][i]) / n, 4) if n else None)


def _flat_index(session: RunSession, key: ComponentKey) -> int:
    off = 0
    for n in session.layers:
        if n == key.layer:
            return off + key.c
        off += session.keys.Cs[n]
    raise AnalysisError(f"unknown layer {key.layer!r}")


def _token_scores(
    session: RunSession, scores: torch.Tensor, k: int, *, negate: bool = False
) -> list[TokenScore]:
    vals, idx = scores.topk(min(k, scores.shape[0]))
    sign = -1.0 if negate else 1.0
    return [TokenScore(token=session.token_str(i), score=round(sign * v, 4))
            for v, i in zip(vals.tolist(), idx.tolist(), strict=True)]


class ExampleScore(BaseModel):
    key: str
    mean_ci: float = Field(description="mean CI at the example positions")
    frac_firing: float = Field(description="fraction of examples where CI > 0")
    background_mean_ci: float = Field(description="mean CI over a dataset sample")
    negatives_mean_ci: float | None = Field(None, description="mean CI at the negatives")
    negatives_frac_firing: float | None = Field(
        None, description="fraction of negatives where CI > 0")
    score: float = Field(description="see ExamplesResult.score")


class ExamplesResult(BaseModel):
    n_examples: int
    n_negatives: int
    score: str = Field(description="how candidates are ranked")
    candidates: list[ExampleScore]


BACKGROUND_DOCS = 32


@torch.no_grad()
def _sample(session: RunSession) -> dict[str, torch.Tensor]:
    """Per-component sums over the first BACKGROUND_DOCS dataset documents, flat in canonical
    order (cached on the session): mean CI, and where CI > 0 the count, Σ activation and the
    count of positive activations."""
    cached = session.memo.get("background_sample")
    if cached is not None:
        return cached
    if not session.is_language_model:
        raise AnalysisError(f"run {session.run.name!r} has no text dataset for a background")
    S = sum(session.keys.Cs[n] for n in session.layers)
    acc = {k: torch.zeros(S, dtype=torch.float64, device=session.device)
           for k in ("sum_ci", "n_alive", "sum_act", "n_pos")}
    count = 0
    for text in dataset_texts(session, BACKGROUND_DOCS):
        ids = encode_document(session, text)
        nat = session.natural_ci(ids)
        ci = torch.cat([nat.ci[n] for n in session.layers], -1).double()  # (T, S)
        act = torch.cat([nat.acts[n] for n in session.layers], -1).double()
        alive = ci > 0
        acc["sum_ci"] += ci.sum(0)
        acc["n_alive"] += alive.sum(0)
        acc["sum_act"] += (act * alive).sum(0)
        acc["n_pos"] += (alive & (act > 0)).sum(0)
        count += len(ids)
    acc["mean_ci"] = acc["sum_ci"] / max(count, 1)
    session.memo["background_sample"] = acc
    return acc


def background_ci(session: RunSession) -> dict[str, torch.Tensor]:
    """Mean natural CI per component over a dataset sample (cached on the session)."""
    flat = _sample(session)["mean_ci"].float()
    out, off = {}, 0
    for n in session.layers:
        C = session.keys.Cs[n]
        out[n] = flat[off : off + C]
        off += C
    return out


def _ci_at(session: RunSession, examples: Sequence[tuple[list[int], int]], names: list[str]
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean CI, fraction with CI > 0) per component (flat over ``names``) at the examples."""
    ci = []
    for ids, pos in examples:
        nat = session.natural_ci(ids)
        ci.append(torch.cat([nat.ci[n][pos] for n in names]))
    g = torch.stack(ci)  # (E, ΣC)
    return g.mean(0), (g > 0).float().mean(0)


@torch.no_grad()
def find_by_examples(
    session: RunSession,
    examples: Sequence[tuple[list[int], int]],
    *,
    negatives: Sequence[tuple[list[int], int]] = (),
    layers: Sequence[str] | None = None,
    top_k: int = 20,
    min_frac: float = 0.5,
) -> ExamplesResult:
    """Components whose CI is high at the given (ids, position) examples relative to the
    negatives (a contrast set) when given, else relative to a dataset background."""
    names = list(layers) if layers else session.layers
    bg = background_ci(session)
    flat_mean, flat_frac = _ci_at(session, examples, names)
    flat_bg = torch.cat([bg[n] for n in names])
    neg_mean = neg_frac = None
    if negatives:
        neg_mean, neg_frac = _ci_at(session, negatives, names)
        how = ("mean CI at the examples − mean CI at the negatives (CI of each component at each "
               "text's given position)")
    else:
        how = f"mean CI at the examples − mean CI over {BACKGROUND_DOCS} dataset documents"
    base = neg_mean if neg_mean is not None else flat_bg
    score = (flat_mean - base).masked_fill(flat_frac < min_frac, float("-inf"))
    owners = [(n, c) for n in names for c in range(session.keys.Cs[n])]
    vals, idx = score.topk(min(top_k, score.shape[0]))
    out = []
    for v, i in zip(vals.tolist(), idx.tolist(), strict=True):
        if v == float("-inf"):
            break
        n, c = owners[i]
        out.append(ExampleScore(
            key=component_key(n, c), mean_ci=round(float(flat_mean[i]), 4),
            frac_firing=round(float(flat_frac[i]), 4),
            background_mean_ci=round(float(flat_bg[i]), 4),
            negatives_mean_ci=None if neg_mean is None else round(float(neg_mean[i]), 4),
            negatives_frac_firing=None if neg_frac is None else round(float(neg_frac[i]), 4),
            score=round(v, 4)))
    return ExamplesResult(
        n_examples=len(examples), n_negatives=len(negatives),
        score=f"{how}; only components with CI > 0 on at least {min_frac:g} of the examples",
        candidates=out)
