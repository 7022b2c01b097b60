"""Per-prompt component views: active components, a component's probe, its vectors and search by
examples. (Generation lives in :mod:`spd_mcp.model.text`.)"""

from __future__ import annotations

from collections.abc import Sequence

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


class ComponentVectors(BaseModel):
    key: str
    d_in: int
    d_out: int
    read_norm: float
    write_norm: float
    reads_from: str = Field(description="what the read vector V[:, c] is applied to")
    writes_to: str = Field(description="where the write vector U[c] goes")
    top_boosted: list[TokenScore] | None = Field(
        None, description="tokens whose logits the write vector raises most (direct path)"
    )
    top_suppressed: list[TokenScore] | None = None
    top_reading: list[TokenScore] | None = Field(
        None, description="tokens whose embeddings most excite the read vector (direct path)"
    )
    write_parts: dict[str, float] | None = Field(
        None, description="fused qkv matrix: norm of the write vector's query, key and value "
        "parts (a component may write to all three)")
    write_heads: dict[str, list[float]] | None = Field(
        None, description="fused qkv matrix: those norms per attention head")
    read_vector: list[float] | None = None
    write_vector: list[float] | None = None


@torch.no_grad()
def component_vectors(
    session: RunSession, key: ComponentKey, *, top_k: int = 10, include_vectors: bool = False
) -> ComponentVectors:
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
    parts = topo.qkv_parts(U.shape[0]) if role is not None and role.matrix == "qkv" else None
    if parts is not None:
        out.writes_to = "attention queries, keys and values (fused qkv)"
        heads = {p: [round(float(U[s].norm()), 4) for s in sl] for p, sl in parts.items()}
        out.write_heads = heads
        out.write_parts = {p: round(sum(v * v for v in h) ** 0.5, 4) for p, h in heads.items()}
    if include_vectors:
        out.read_vector = [round(v, 5) for v in V.tolist()]
        out.write_vector = [round(v, 5) for v in U.tolist()]
    return out


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
    score: float = Field(description="mean_ci − background_mean_ci")


class ExamplesResult(BaseModel):
    n_examples: int
    candidates: list[ExampleScore]


@torch.no_grad()
def background_ci(session: RunSession, n_docs: int = 32) -> dict[str, torch.Tensor]:
    """Mean natural CI per component over a dataset sample (cached on the session)."""
    cached = session.memo.get("background_ci")
    if cached is not None:
        return cached
    if not session.is_language_model:
        raise AnalysisError(f"run {session.run.name!r} has no text dataset for a background")
    sums = {n: torch.zeros(C, device=session.device) for n, C in session.keys.Cs.items()}
    count = 0
    for text in dataset_texts(session, n_docs):
        ids = encode_document(session, text)
        nat = session.natural_ci(ids)
        for n, g in nat.ci.items():
            sums[n] += g.sum(0)
        count += len(ids)
    out = {n: s / max(count, 1) for n, s in sums.items()}
    session.memo["background_ci"] = out
    return out


@torch.no_grad()
def find_by_examples(
    session: RunSession,
    examples: Sequence[tuple[list[int], int]],
    *,
    layers: Sequence[str] | None = None,
    top_k: int = 20,
    min_frac: float = 0.5,
) -> ExamplesResult:
    """Components whose CI is high at the given (ids, position) examples relative to background."""
    names = list(layers) if layers else session.layers
    bg = background_ci(session)
    sums = {n: torch.zeros(session.keys.Cs[n], device=session.device) for n in names}
    fires = {n: torch.zeros_like(s) for n, s in sums.items()}
    for ids, pos in examples:
        nat = session.natural_ci(ids)
        for n in names:
            g = nat.ci[n][pos]
            sums[n] += g
            fires[n] += (g > 0).float()
    E = len(examples)
    flat_mean = torch.cat([sums[n] / E for n in names])
    flat_frac = torch.cat([fires[n] / E for n in names])
    flat_bg = torch.cat([bg[n] for n in names])
    score = (flat_mean - flat_bg).masked_fill(flat_frac < min_frac, float("-inf"))
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
            background_mean_ci=round(float(flat_bg[i]), 4), score=round(v, 4)))
    return ExamplesResult(n_examples=E, candidates=out)
