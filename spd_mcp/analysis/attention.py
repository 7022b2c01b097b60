"""Attention patterns per block and head, and one pre-softmax score split into q-term × k-term
pairs.

The patterns come from the model's own ``scaled_dot_product_attention`` calls, recorded during an
exact target forward: weights = softmax(scale · q kᵀ + mask) with the call's scale, mask and
causality (grouped-query attention maps query head h to key head h // (H / H_kv)).

The split. Block b's query at position p is a linear function of the q projection's output row
y_q(p) (head split, rotary, fused-qkv slicing are all linear and per position): q_h(p) = J y_q(p)
with J read off by autograd at that row. The projection output is a sum of terms,

    y_q(p) = Σ_{c alive} a_c(p) U_c + Σ_{c dead} a_c(p) U_c + (y_q(p) − a(p) U − b) + b,

named ``LAYER:C`` (alive: natural CI > 0), ``q.other``, ``q.delta`` (the weight delta's share,
taken as the remainder so the terms sum to the target's output) and ``q.bias``; likewise for
the key at p'. The score scale · q_h(p) · k_h(p') is then exactly Σ_ij scale · (J_q t_i)·(J_k t_j).
An undecomposed q (or k) matrix is one term, ``q.all`` (``k.all``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import Tensor
from torch.overrides import TorchFunctionMode

from spd_mcp.errors import AnalysisError
from spd_mcp.keys import component_key
from spd_mcp.model.session import RunSession

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
              "enable_gqa")
_MASKED = -1e30
"""Logits at or below this are masked out (an additive mask of -inf or the dtype's minimum)."""


# ------------------------------------------------------------------------------------ results
class KeyWeight(BaseModel):
    pos: int
    token: str
    weight: float


class HeadPattern(BaseModel):
    layer: int
    head: int
    query_pos: int
    keys: list[KeyWeight] = Field(description="the keys with the largest attention weights")


class Term(BaseModel):
    term: str = Field(description="'LAYER:C' (an alive component), or q./k. other | delta | "
                                  "bias | all")
    value: float = Field(description="its total contribution to the score")
    ci: float | None = Field(None, description="the component's CI at its position")


class TermPair(BaseModel):
    q: str
    k: str
    value: float


class ScoreSplit(BaseModel):
    layer: int
    head: int
    kv_head: int = Field(description="the key head the query head reads (grouped-query attention)")
    query_pos: int
    query_token: str
    key_pos: int
    key_token: str
    q_layer: str
    k_layer: str
    weight: float = Field(description="attention weight of this key")
    score: float = Field(description="the model's pre-softmax score scale·q·k (mask excluded)")
    sum_of_terms: float = Field(description="sum over every (q-term, k-term) pair; equals score")
    n_q_terms: int
    n_k_terms: int
    top_pairs: list[TermPair] = Field(description="(q-term, k-term) pairs by |value|")
    top_pairs_sum: float
    by_kind: dict[str, float] = Field(
        description="the score summed by (q kind, k kind), nonzero only; kinds: components "
                    "(alive), other (dead components), delta, bias, all (undecomposed)")
    q_totals: list[Term] = Field(description="per q-term: its sum over every k-term")
    k_totals: list[Term] = Field(description="per k-term: its sum over every q-term")
    note: str = Field(
        "'other' lumps components with natural CI 0 here: their activations are not zero, so "
        "their terms are part of the exact score; CI 0 says they could be masked on this input "
        "without changing the output (the stochastic / adversarial regimes test that), not that "
        "they contribute nothing", description="how to read the dead-component terms")


class AttentionResult(BaseModel):
    tokens: list[str]
    n_layers: int
    n_heads: int
    patterns: list[HeadPattern]
    split: ScoreSplit | None = None


# -------------------------------------------------------------------------------------- forward
@dataclass
class AttnCall:
    """One recorded attention call; ``query`` and ``key`` are (1, H, T, dh) / (1, H_kv, S, dh)."""

    query: Tensor
    key: Tensor
    value: Tensor
    out: Tensor
    mask: Tensor | None
    causal: bool
    scale: float

    def logits(self) -> Tensor:
        """(H, T, S) float64 pre-softmax logits with the mask and causality applied."""
        q, k = self.query.detach()[0].double(), self.key.detach()[0].double()
        H = q.shape[0]
        k = k.repeat_interleave(H // k.shape[0], 0)
        s = torch.einsum("htd,hsd->hts", q, k) * self.scale
        T, S = s.shape[-2:]
        if self.mask is not None:
            m = self.mask.detach()
            m = m.reshape(m.shape[-3:]) if m.dim() >= 3 else m  # (1|H, T, S) or (T, S)
            if m.dtype == torch.bool:
                s = s.masked_fill(~m.expand_as(s), -torch.inf)
            else:
                s = s + m.double().expand_as(s)
        if self.causal:
            upper = torch.ones(T, S, dtype=torch.bool, device=s.device).triu(1)
            s = s.masked_fill(upper, -torch.inf)
        return s

    def weights(self) -> Tensor:
        """(H, T, S) attention weights (float64)."""
        return self.logits().softmax(-1)

    def kv_head(self, head: int) -> int:
        """The index into ``key`` that query head ``head`` reads."""
        return head // (self.query.shape[1] // self.key.shape[1])


class _Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[AttnCall] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            a: dict[str, Any] = {**dict(zip(_SDPA_ARGS, args, strict=False)), **kwargs}
            q, k = a["query"], a["key"]
            scale = a.get("scale")
            self.calls.append(AttnCall(
                q, k, a["value"], out, a.get("attn_mask"), bool(a.get("is_causal")),
                float(scale) if scale is not None else q.shape[-1] ** -0.5))
        return out


@dataclass
class _Proj:
    """A projection feeding attention: its input and output (a grad leaf) at every position."""

    x: Tensor
    y: Tensor


@dataclass
class AttnForward:
    """One exact target forward: each block's attention call, and the split block's q/k
    projections (their outputs are autograd leaves the call's query and key depend on)."""

    calls: list[AttnCall]
    proj: dict[str, _Proj] = field(default_factory=dict)


def _qk_modules(session: RunSession, block: int) -> tuple[str, str] | None:
    """Canonical names of the matrices writing block ``block``'s query and key."""
    names = session.topology.qkv_layers(block)
    if names is None or any(session.topology.module_of(n) is None for n in names[:2]):
        return None
    return names[0], names[1]


def attention_forward(session: RunSession, ids: Sequence[int], *,
                      leaves_in: int | None = None) -> AttnForward:
    """Record every block's attention call; with ``leaves_in``, that block's q and k projection
    outputs become grad leaves (for the split)."""
    topo = session.topology
    target = session.cm.target
    recorder = _Recorder()
    first_call: dict[int, int] = {}
    proj: dict[str, _Proj] = {}
    handles = []

    def marker(b: int):
        def hook(_m: torch.nn.Module, _a: tuple, _o: Tensor) -> None:
            first_call.setdefault(b, len(recorder.calls))
        return hook

    def leaf(name: str):
        def hook(_m: torch.nn.Module, args: tuple, out: Tensor) -> Tensor:
            y = out.detach().requires_grad_(True)
            proj[name] = _Proj(args[0].detach(), y)
            return y
        return hook

    for b in range(topo.n_blocks):
        names = _qk_modules(session, b)
        if names is None:
            continue
        handles.append(target.get_submodule(topo.to_module(names[0])).register_forward_hook(
            marker(b)))
        if b == leaves_in:
            for n in dict.fromkeys(names):
                handles.append(target.get_submodule(topo.to_module(n)).register_forward_hook(
                    leaf(n)))
    try:
        with torch.enable_grad() if leaves_in is not None else torch.no_grad(), recorder:
            target(session.ids_tensor(list(ids)))
    finally:
        for h in handles:
            h.remove()
    calls = recorder.calls
    if first_call and len(first_call) == topo.n_blocks and len(calls) >= topo.n_blocks:
        picked = [calls[first_call[b]] if first_call[b] < len(calls) else None
                  for b in range(topo.n_blocks)]
    elif len(calls) == topo.n_blocks:
        picked = list(calls)
    else:
        picked = []
    if len(picked) != topo.n_blocks or any(c is None for c in picked):
        raise AnalysisError(
            f"could not match the model's {len(calls)} attention calls to its {topo.n_blocks} "
            "blocks (get_attention needs torch's scaled_dot_product_attention, one call per block)")
    out = [c for c in picked if c is not None]
    for c in out:
        if c.query.dim() != 4 or c.query.shape[0] != 1 or c.query.shape[1] % c.key.shape[1]:
            raise AnalysisError(f"unsupported attention call shapes: query "
                                f"{tuple(c.query.shape)}, key {tuple(c.key.shape)}")
    return AttnForward(out, proj)


# -------------------------------------------------------------------------------------- patterns
def head_patterns(session: RunSession, ids: Sequence[int], fwd: AttnForward, layers: list[int],
                  heads: list[int] | None, query_positions: list[int], top_k: int
                  ) -> list[HeadPattern]:
    """Top keys by attention weight for each (layer, head, query position)."""
    toks = session.tokens(list(ids))
    out = []
    for b in layers:
        call = fwd.calls[b]
        logits = call.logits()
        w = logits.softmax(-1)
        for h in heads if heads is not None else range(w.shape[0]):
            for p in query_positions:
                valid = int((logits[h, p] > _MASKED).sum())
                vals, idx = w[h, p].topk(min(top_k, valid))
                out.append(HeadPattern(layer=b, head=h, query_pos=p, keys=[
                    KeyWeight(pos=i, token=toks[i], weight=round(v, 4))
                    for v, i in zip(vals.tolist(), idx.tolist(), strict=True)]))
    return out


# ----------------------------------------------------------------------------------------- split
@dataclass
class RawSplit:
    """The full split: ``M[i, j]`` is q-term i × k-term j (float64); ``score`` the model's."""

    q_names: list[str]
    k_names: list[str]
    q_kinds: list[str]
    k_kinds: list[str]
    q_ci: list[float | None]
    k_ci: list[float | None]
    M: Tensor
    score: float
    weight: float
    kv_head: int
    q_layer: str
    k_layer: str


def _row_map(out: Tensor, leaf: Tensor, head: int, pos: int, what: str) -> Tensor:
    """(dh, d_out) float64: the linear map from ``leaf``'s row ``pos`` to ``out[0, head, pos]``."""
    dh = out.shape[-1]
    E = out.new_zeros(dh, *out.shape)
    r = torch.arange(dh, device=out.device)
    E[r, 0, head, pos, r] = 1
    (g,) = torch.autograd.grad(out, leaf, E, retain_graph=True, is_grads_batched=True,
                               allow_unused=True)
    if g is None:
        raise AnalysisError(f"the attention {what} does not depend on its projection")
    J = g[:, 0, pos].double().clone()
    g[:, 0, pos] = 0
    if g.any():
        raise AnalysisError(f"the attention {what} at one position reads the projection at "
                            "other positions: the split needs a per-position map")
    return J


def _terms(session: RunSession, layer: str, proj: _Proj, pos: int, ci: dict[str, Tensor],
           side: str) -> tuple[list[str], list[str], list[float | None], Tensor]:
    """(names, kinds, CI, vectors (n, d_out) float64) summing to the projection's output row."""
    y = proj.y.detach()[0, pos].double()
    module = session.to_module.get(layer)
    if module is None or module not in session.cm.Cs:
        return [f"{side}.all"], ["all"], [None], y[None]
    comp = session.cm.component(module)
    x = proj.x[0, pos].double()
    U = comp.U.detach().double()
    a = x @ comp.V.detach().double()  # (C,)
    g = ci[layer][pos]
    alive = (g > 0).nonzero().flatten()
    dead = torch.ones_like(a, dtype=torch.bool)
    dead[alive] = False
    vecs = [a[alive, None] * U[alive], ((a * dead) @ U)[None]]
    names = [component_key(layer, c) for c in alive.tolist()] + [f"{side}.other"]
    kinds = ["components"] * len(alive) + ["other"]
    cis: list[float | None] = [float(v) for v in g[alive].tolist()] + [None]
    b = comp.bias.double() if comp.bias is not None else torch.zeros_like(y)
    vecs.append((y - a @ U - b)[None])
    names.append(f"{side}.delta")
    kinds.append("delta")
    cis.append(None)
    if comp.bias is not None:
        vecs.append(b[None])
        names.append(f"{side}.bias")
        kinds.append("bias")
        cis.append(None)
    return names, kinds, cis, torch.cat(vecs)


def split_score(session: RunSession, ids: Sequence[int], layer: int, head: int, query_pos: int,
                key_pos: int) -> RawSplit:
    """Split one pre-softmax score into every (q-term, k-term) pair (see the module docstring)."""
    names = _qk_modules(session, layer)
    if names is None:
        raise AnalysisError(f"block {layer} has no q and k (or fused qkv) matrices in the "
                            "topology; its score cannot be split")
    q_layer, k_layer = names
    nci = session.natural_ci(list(ids))
    fwd = attention_forward(session, ids, leaves_in=layer)
    call = fwd.calls[layer]
    H = call.query.shape[1]
    if not 0 <= head < H:
        raise AnalysisError(f"split.head {head} out of range ({H} heads: 0..{H - 1})")
    logits = call.logits()
    if logits[head, query_pos, key_pos] <= _MASKED:
        valid = (logits[head, query_pos] > _MASKED).nonzero().flatten().tolist()
        raise AnalysisError(
            f"split.key_position {key_pos} is masked for query position {query_pos} (causal "
            f"attention: valid key positions are {_ranges(valid)})")
    kvh = call.kv_head(head)
    qp, kp = fwd.proj[q_layer], fwd.proj[k_layer]
    Jq = _row_map(call.query, qp.y, head, query_pos, "query")
    Jk = _row_map(call.key, kp.y, kvh, key_pos, "key")
    qn, qk_, qc, qv = _terms(session, q_layer, qp, query_pos, nci.ci, "q")
    kn, kk, kc, kv = _terms(session, k_layer, kp, key_pos, nci.ci, "k")
    Qt, Kt = qv @ Jq.T, kv @ Jk.T  # (n_q, dh), (n_k, dh): terms at attention's input
    q_true = call.query.detach()[0, head, query_pos].double()
    k_true = call.key.detach()[0, kvh, key_pos].double()
    for what, got, true in (("query", Qt.sum(0), q_true), ("key", Kt.sum(0), k_true)):
        if (got - true).abs().max() > 1e-4 * (1 + true.abs().max()):
            raise AnalysisError(
                f"the attention {what} is not a linear function of its projection's output "
                "(e.g. a q/k norm); its score cannot be split exactly")
    M = (Qt @ Kt.T) * call.scale
    return RawSplit(
        q_names=qn, k_names=kn, q_kinds=qk_, k_kinds=kk, q_ci=qc, k_ci=kc, M=M,
        score=float(q_true @ k_true) * call.scale,
        weight=float(logits[head, query_pos].softmax(-1)[key_pos]), kv_head=kvh,
        q_layer=q_layer, k_layer=k_layer)


def _ranges(pos: list[int]) -> str:
    return f"{pos[0]}..{pos[-1]}" if pos and pos == list(range(pos[0], pos[-1] + 1)) else str(pos)


def _totals(names: list[str], kinds: list[str], cis: list[float | None], vals: Tensor,
            top: int) -> list[Term]:
    order = vals.abs().argsort(descending=True).tolist()
    keep = order[:top] + [i for i in order[top:] if kinds[i] != "components"]
    return [Term(term=names[i], value=round(float(vals[i]), 5),
                 ci=None if cis[i] is None else round(cis[i], 4)) for i in keep]


def summarise_split(session: RunSession, ids: Sequence[int], raw: RawSplit, layer: int,
                    head: int, query_pos: int, key_pos: int, top: int) -> ScoreSplit:
    """The compact view of a split: top pairs, totals per term and per kind."""
    M = raw.M
    flat = M.flatten()
    idx = flat.abs().argsort(descending=True)[:top].tolist()
    nk = M.shape[1]
    pairs = [TermPair(q=raw.q_names[i // nk], k=raw.k_names[i % nk], value=round(float(flat[i]), 5))
             for i in idx]
    by_kind: dict[str, float] = {}
    for i, qk in enumerate(raw.q_kinds):
        for j, kk in enumerate(raw.k_kinds):
            name = f"q.{qk} x k.{kk}"
            by_kind[name] = by_kind.get(name, 0.0) + float(M[i, j])
    toks = session.tokens(list(ids))
    return ScoreSplit(
        layer=layer, head=head, kv_head=raw.kv_head, query_pos=query_pos,
        query_token=toks[query_pos], key_pos=key_pos, key_token=toks[key_pos],
        q_layer=raw.q_layer, k_layer=raw.k_layer, weight=round(raw.weight, 5),
        score=round(raw.score, 6), sum_of_terms=round(float(M.sum()), 6),
        n_q_terms=M.shape[0], n_k_terms=nk, top_pairs=pairs,
        top_pairs_sum=round(float(flat[idx].sum()), 5),
        by_kind={k: round(v, 5) for k, v in by_kind.items() if round(v, 5)},
        q_totals=_totals(raw.q_names, raw.q_kinds, raw.q_ci, M.sum(1), top),
        k_totals=_totals(raw.k_names, raw.k_kinds, raw.k_ci, M.sum(0), top))


# ------------------------------------------------------------------------------------------ tool
def get_attention(
    session: RunSession, ids: Sequence[int], *, layers: list[int], heads: list[int] | None,
    query_positions: list[int], top_k: int = 5,
    split: tuple[int, int, int, int] | None = None, top_pairs: int = 10,
) -> AttentionResult:
    """Attention patterns for ``layers`` × ``heads`` (None: all) × ``query_positions`` and,
    with ``split`` = (layer, head, query position, key position), that score split."""
    if session.topology.n_blocks == 0:
        raise AnalysisError(f"run {session.run.name!r} is not a transformer (no attention blocks)")
    fwd = attention_forward(session, ids)
    H = fwd.calls[0].query.shape[1]
    for h in heads or []:
        if not 0 <= h < H:
            raise AnalysisError(f"head {h} out of range ({H} heads: 0..{H - 1})")
    out = AttentionResult(
        tokens=session.tokens(list(ids)), n_layers=len(fwd.calls), n_heads=H,
        patterns=head_patterns(session, ids, fwd, layers, heads, query_positions, top_k))
    if split is not None:
        raw = split_score(session, ids, *split)
        out.split = summarise_split(session, ids, raw, *split, top=top_pairs)
    return out
