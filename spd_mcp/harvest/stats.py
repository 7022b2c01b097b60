"""Accumulated per-component statistics and the query functions derived from them.

Components of all decomposed layers share one axis of length S = ΣC (canonical layer order;
``offsets[l]`` is layer l's first index). Counts are int64, sums fp64; densities, precision,
recall, PMI and Jaccard are derived at query time. Co-firing is a table of each component's
partners that queries can return (``cofire.py``), built when a harvest's shards are merged.

The component x token tables (``fire_token``, ``fire_pred``) are dense (S, V) while S·V is at most
``DENSE_SV_LIMIT``; above it (a seed-size run: 40k components x 8k tokens would be 2.6 GB per
table) they are kept sparse, as CSR over components of the pairs that occurred:
``<name>_ptr`` (S + 1,), ``<name>_tok`` (nnz,) int32 token ids ascending per component,
``<name>_n`` (nnz,) int64 counts — memory linear in the firing events, not in S·V. Queries read
one component's row or one token's column either way.

PMI saturates at log(1 / P(fire)) for every token the component fires on each time it occurs
(recall 1), however rare; ``smoothed_pmi`` shrinks the conditional probability of the ranked side
toward its base rate with ``PMI_PRIOR`` pseudo-observations, so more evidence ranks higher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, Field
from torch import Tensor

from spd_mcp.keys import KeySpace, component_key

from .cofire import TABLE_FIELDS, jaccard, table_from_dense
from .config import HarvestError

TokenKind = Literal["input", "output"]
TokenRank = Literal["smoothed_pmi", "pmi", "precision", "recall", "count"]
CoRank = Literal["jaccard", "precision", "count"]
"""Co-firing rankings the table answers exactly (precision orders partners as count does)."""

# name → (dtype, shape kind): "S" per component, "V" per vocab token, "SV"
STAT_FIELDS: dict[str, tuple[torch.dtype, str]] = {
    "fire_count": (torch.int64, "S"),  # tokens where CI > fire_threshold
    "sum_ci": (torch.float64, "S"),  # Σ CI over all tokens
    "sum_act": (torch.float64, "S"),  # Σ component activation x·V[:, c] over all tokens
    "sum_ci_fire": (torch.float64, "S"),  # Σ CI over firing tokens
    "sum_act_fire": (torch.float64, "S"),  # Σ activation over firing tokens
    "max_abs_act_fire": (torch.float64, "S"),  # max |activation| over firing tokens
    "pos_fire_count": (torch.int64, "S"),  # firing tokens with activation > 0
    "token_count": (torch.int64, "V"),  # input token counts
    "pred_count": (torch.int64, "V"),  # target model's top-1 predicted next-token counts
    "fire_token": (torch.int64, "SV"),  # fires while the input token is v
    "fire_pred": (torch.int64, "SV"),  # fires while the top-1 prediction is v
}
SV_FIELDS = ("fire_token", "fire_pred")
SPARSE_SUFFIXES = ("_ptr", "_tok", "_n")
DENSE_SV_LIMIT = 1 << 24
"""Largest S·V kept as dense (S, V) tables (128 MB each at int64); larger ones are sparse."""
OPTIONAL_FIELDS = frozenset({"pos_fire_count"})
"""Fields added after harvests were first stored: older harvests load without them."""
PMI_PRIOR = 10.0
"""Pseudo-observations at the base rate behind ``smoothed_pmi``."""


@dataclass
class HarvestStats:
    """Sufficient statistics of a harvest; ``+`` merges two disjoint harvests exactly, except
    the co-firing table (rebuilt from the shards' firing logs), which it drops."""

    layers: list[str]
    offsets: list[int]  # len(layers) + 1
    vocab_size: int
    n_tokens: int
    t: dict[str, Tensor]

    # ------------------------------------------------------------------------- construction
    @classmethod
    def zeros(
        cls, layers: list[str], Cs: list[int], vocab_size: int, device: torch.device | str = "cpu",
        *, sparse: bool | None = None,
    ) -> HarvestStats:
        """Empty statistics; ``sparse`` token tables (default: when S·V > DENSE_SV_LIMIT)."""
        offsets = [0]
        for C in Cs:
            offsets.append(offsets[-1] + C)
        S, V = offsets[-1], vocab_size
        sparse = S * V > DENSE_SV_LIMIT if sparse is None else sparse
        dims = {"S": (S,), "V": (V,), "SV": (S, V)}
        t = {
            k: torch.zeros(dims[kind], dtype=dt, device=device)
            for k, (dt, kind) in STAT_FIELDS.items() if not (sparse and kind == "SV")
        }
        if sparse:
            for k in SV_FIELDS:
                t.update(_empty_csr(k, S, device))
        return cls(list(layers), offsets, vocab_size, 0, t)

    @property
    def sparse_tokens(self) -> bool:
        """Whether the component x token tables are sparse (CSR)."""
        return SV_FIELDS[0] not in self.t

    def add_pairs(self, name: str, comp: Tensor, tok: Tensor, count: Tensor | None = None
                  ) -> None:
        """Count (component, token) pairs into table ``name`` (``count`` each, default 1)."""
        S, V = self.n_components, self.vocab_size
        count = torch.ones_like(comp) if count is None else count
        if not self.sparse_tokens:
            self.t[name].view(-1).index_add_(0, comp * V + tok, count)
            return
        keys = torch.cat([_csr_keys(self.t, name, V), comp * V + tok])
        n = torch.cat([self.t[name + "_n"], count])
        self.t.update(_csr_from_keys(name, keys, n, S, V))

    def __add__(self, other: HarvestStats) -> HarvestStats:
        if (self.layers, self.offsets, self.vocab_size) != (
            other.layers, other.offsets, other.vocab_size,
        ):
            raise HarvestError("cannot merge harvests of different layer sets or vocabularies")
        t = {}
        sparse = self.sparse_tokens or other.sparse_tokens
        a, b = (self.to_sparse_tokens(), other.to_sparse_tokens()) if sparse else (self, other)
        for k, v in a.t.items():
            if k not in b.t or k in TABLE_FIELDS:  # optional on one side / not additive
                continue
            if sparse and k.startswith(SV_FIELDS):
                continue
            w = b.t[k].to(v.device)
            t[k] = torch.maximum(v, w) if k.startswith("max_") else v + w
        if sparse:
            S, V = self.n_components, self.vocab_size
            for k in SV_FIELDS:
                dev = a.t[k + "_n"].device
                keys = torch.cat([_csr_keys(a.t, k, V), _csr_keys(b.t, k, V).to(dev)])
                n = torch.cat([a.t[k + "_n"], b.t[k + "_n"].to(dev)])
                t.update(_csr_from_keys(k, keys, n, S, V))
        return HarvestStats(self.layers, self.offsets, self.vocab_size,
                            self.n_tokens + other.n_tokens, t)

    def to_sparse_tokens(self) -> HarvestStats:
        """The same statistics with sparse (CSR) token tables."""
        if self.sparse_tokens:
            return self
        t = {k: v for k, v in self.t.items() if k not in SV_FIELDS}
        for k in SV_FIELDS:
            dense = self.t[k]
            c, v = dense.nonzero(as_tuple=True)
            t.update(_csr_from_keys(k, c * self.vocab_size + v, dense[c, v],
                                    self.n_components, self.vocab_size))
        return HarvestStats(self.layers, self.offsets, self.vocab_size, self.n_tokens, t)

    def token_row(self, name: str, index: int) -> Tensor:
        """Row ``index`` (V,) of token table ``name``: the component's joint counts."""
        if not self.sparse_tokens:
            return self.t[name][index]
        a, b = self.t[name + "_ptr"][index : index + 2].tolist()
        row = torch.zeros(self.vocab_size, dtype=torch.int64, device=self.t[name + "_n"].device)
        row[self.t[name + "_tok"][a:b].long()] = self.t[name + "_n"][a:b]
        return row

    def token_col(self, name: str, token: int) -> Tensor:
        """Column ``token`` (S,) of token table ``name``: every component's joint count."""
        if not self.sparse_tokens:
            return self.t[name][:, token]
        ptr, tok, n = (self.t[name + s] for s in SPARSE_SUFFIXES)
        hit = (tok == token).nonzero().squeeze(1)
        comp = torch.searchsorted(ptr, hit, right=True) - 1  # the row holding each hit
        col = torch.zeros(self.n_components, dtype=torch.int64, device=n.device)
        col[comp] = n[hit]
        return col

    def to(self, device: torch.device | str) -> HarvestStats:
        t = {k: v.to(device) for k, v in self.t.items()}
        return HarvestStats(self.layers, self.offsets, self.vocab_size, self.n_tokens, t)

    def __getattr__(self, name: str) -> Tensor:
        t = self.__dict__.get("t")
        if t is not None and name in t:
            return t[name]
        raise AttributeError(name)

    # -------------------------------------------------------------------------------- keys
    @property
    def n_components(self) -> int:
        return self.offsets[-1]

    @property
    def Cs(self) -> list[int]:
        return [b - a for a, b in zip(self.offsets, self.offsets[1:], strict=False)]

    def index(self, key: str | int) -> int:
        """Global index of a component key ``"layer:c"`` (an int passes through, range-checked)."""
        if isinstance(key, int):
            if not 0 <= key < self.n_components:
                raise HarvestError(f"component index {key} out of range 0..{self.n_components - 1}")
            return key
        ck = KeySpace(dict(zip(self.layers, self.Cs, strict=True))).component(key)
        return self.offsets[self.layers.index(ck.layer)] + ck.c

    def key(self, index: int) -> str:
        layer = max(i for i, o in enumerate(self.offsets[:-1]) if o <= index)
        return component_key(self.layers[layer], index - self.offsets[layer])

    def keys(self) -> list[str]:
        return [component_key(layer, c) for layer, C in zip(self.layers, self.Cs, strict=True)
                for c in range(C)]

    # ----------------------------------------------------------------------------- derived
    def density(self) -> Tensor:
        """P(fire) per component (S,)."""
        return self.t["fire_count"].double() / max(self.n_tokens, 1)

    def mean_ci(self) -> Tensor:
        return self.t["sum_ci"] / max(self.n_tokens, 1)

    def mean_act(self) -> Tensor:
        return self.t["sum_act"] / max(self.n_tokens, 1)

    def mean_ci_fire(self) -> Tensor:
        return self.t["sum_ci_fire"] / self.t["fire_count"].clamp(min=1)

    def mean_act_fire(self) -> Tensor:
        return self.t["sum_act_fire"] / self.t["fire_count"].clamp(min=1)

    def tensors(self) -> dict[str, Tensor]:
        """Everything as CPU tensors (``n_tokens`` as a 0-d int64) for safetensors."""
        out = {k: v.detach().cpu().contiguous() for k, v in self.t.items()}
        out["n_tokens"] = torch.tensor(self.n_tokens, dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(
        cls, t: dict[str, Tensor], layers: list[str], offsets: list[int], vocab_size: int
    ) -> HarvestStats:
        """Statistics as stored; a format-1 dense ``cofire`` matrix becomes the table."""
        sparse = {k + s for k in SV_FIELDS for s in SPARSE_SUFFIXES}
        need = set(STAT_FIELDS) - OPTIONAL_FIELDS
        if sparse <= set(t):
            need -= set(SV_FIELDS)
        missing = sorted(need - set(t))
        if missing:
            raise HarvestError(f"harvest statistics lack {missing}; re-run the harvest")
        out = {k: t[k] for k in (*STAT_FIELDS, *TABLE_FIELDS, *sorted(sparse)) if k in t}
        if "cofire" in t and "cofire_ptr" not in t:
            out.update(table_from_dense(t["cofire"], t["fire_count"]))
        return cls(list(layers), list(offsets), vocab_size, int(t["n_tokens"]), out)

    def cofire_partners(self, index: int) -> tuple[Tensor, Tensor]:
        """(partner indices ascending, co-firing counts) kept for one component (see cofire)."""
        if "cofire_ptr" not in self.t:
            raise HarvestError("these statistics have no co-firing table (a shard's, or a sum); "
                               "load the merged harvest stage")
        a, b = self.t["cofire_ptr"][index : index + 2].tolist()
        return self.t["cofire_idx"][a:b].long(), self.t["cofire_count"][a:b]


def _empty_csr(name: str, S: int, device: torch.device | str) -> dict[str, Tensor]:
    return {name + "_ptr": torch.zeros(S + 1, dtype=torch.int64, device=device),
            name + "_tok": torch.zeros(0, dtype=torch.int32, device=device),
            name + "_n": torch.zeros(0, dtype=torch.int64, device=device)}


def _csr_keys(t: dict[str, Tensor], name: str, V: int) -> Tensor:
    """The stored pairs of sparse table ``name`` as keys component·V + token (nnz,)."""
    ptr, tok = t[name + "_ptr"], t[name + "_tok"]
    rows = torch.repeat_interleave(torch.arange(len(ptr) - 1, device=ptr.device), ptr.diff())
    return rows * V + tok.long()


def _csr_from_keys(name: str, keys: Tensor, n: Tensor, S: int, V: int) -> dict[str, Tensor]:
    """Sparse table ``name`` from (possibly repeated) keys component·V + token with counts."""
    uniq, inv = torch.unique(keys, sorted=True, return_inverse=True)
    counts = torch.zeros(len(uniq), dtype=torch.int64, device=n.device).index_add_(0, inv, n)
    per = torch.bincount(uniq // V, minlength=S)
    ptr = torch.zeros(S + 1, dtype=torch.int64, device=n.device)
    torch.cumsum(per, 0, out=ptr[1:])
    return {name + "_ptr": ptr, name + "_tok": (uniq % V).to(torch.int32), name + "_n": counts}


# --------------------------------------------------------------------------- query models
_P_TOK = "P(token | component fires)"
_R_TOK = "P(component fires | token)"
_PMI = "natural-log pointwise mutual information log P(a, b) / (P(a) P(b))"
_SPMI_TOK = (f"PMI with P(fire | token) shrunk toward P(fire) by {PMI_PRIOR:g} pseudo-tokens: "
             f"log((count + {PMI_PRIOR:g}·P(fire)) / (token_count + {PMI_PRIOR:g}) / P(fire))")
_SPMI_COMP = (f"PMI with P(token | fire) shrunk toward P(token) by {PMI_PRIOR:g} pseudo-firings: "
              f"log((count + {PMI_PRIOR:g}·P(token)) / (fire_count + {PMI_PRIOR:g}) / P(token))")


class ComponentSummary(BaseModel):
    index: int = Field(description="global component index (canonical layer order)")
    key: str
    fire_count: int = Field(description="tokens where CI > fire_threshold")
    density: float = Field(description="fire_count / tokens")
    mean_ci: float = Field(description="mean CI over all tokens")
    mean_act: float = Field(description="mean component activation x·V[:, c] over all tokens")
    mean_ci_when_firing: float
    mean_act_when_firing: float
    max_abs_act_when_firing: float
    frac_positive_when_firing: float | None = Field(
        None, description="fraction of firing tokens with activation > 0 (None: older harvest)")


class TokenAssociation(BaseModel):
    """How one (input or predicted-output) token relates to one component's firing."""

    token_id: int
    count: int = Field(description="tokens where the component fires with this token")
    token_count: int = Field(description="tokens with this token")
    precision: float = Field(description=_P_TOK)
    recall: float = Field(description=_R_TOK)
    pmi: float = Field(description=_PMI)
    smoothed_pmi: float = Field(description=_SPMI_TOK)


class ComponentAssociation(BaseModel):
    """How another component's firing relates to this one's (co-firing at the same token)."""

    index: int
    key: str
    count: int = Field(description="tokens where both fire")
    fire_count: int = Field(description="the other component's firing count")
    jaccard: float = Field(description="count / (tokens where either fires)")
    pmi: float = Field(description=_PMI)
    precision: float = Field(description="P(other fires | this fires)")
    recall: float = Field(description="P(this fires | other fires)")


class TokenComponent(BaseModel):
    """A component ranked for one token (see ``components_for_token``)."""

    index: int
    key: str
    count: int = Field(description="tokens where the component fires with this token")
    fire_count: int
    precision: float = Field(description=_P_TOK)
    recall: float = Field(description=_R_TOK)
    pmi: float = Field(description=_PMI)
    smoothed_pmi: float = Field(description=_SPMI_COMP)


def component_summary(stats: HarvestStats, comp: str | int) -> ComponentSummary:
    i = stats.index(comp)
    fire = int(stats.t["fire_count"][i])
    pos = stats.t.get("pos_fire_count")
    return ComponentSummary(
        index=i, key=stats.key(i), fire_count=fire,
        density=float(stats.density()[i]), mean_ci=float(stats.mean_ci()[i]),
        mean_act=float(stats.mean_act()[i]), mean_ci_when_firing=float(stats.mean_ci_fire()[i]),
        mean_act_when_firing=float(stats.mean_act_fire()[i]),
        max_abs_act_when_firing=float(stats.t["max_abs_act_fire"][i]),
        frac_positive_when_firing=(None if pos is None or fire == 0
                                   else int(pos[i]) / fire),
    )


def _pmi(joint: Tensor, a: Tensor, b: Tensor, n: int) -> Tensor:
    """log(joint·n / (a·b)) in fp64; -inf where joint is 0, nan where a or b is 0."""
    return torch.log(joint.double() * n) - torch.log(a.double()) - torch.log(b.double())


def _shrunk_pmi(joint: Tensor, given: Tensor, base: Tensor) -> Tensor:
    """log(P̂(x | given) / P(x)) with P̂ = (joint + PMI_PRIOR·base) / (given + PMI_PRIOR), fp64;
    ``base`` = P(x). Equals PMI as the prior vanishes; never saturates at recall 1."""
    b = base.double()
    return torch.log((joint.double() + PMI_PRIOR * b) / (given.double() + PMI_PRIOR)) - torch.log(b)


def _token_arrays(kind: TokenKind) -> tuple[str, str]:
    """(joint table, token counts) field names of ``kind``."""
    if kind == "input":
        return "fire_token", "token_count"
    if kind == "output":
        return "fire_pred", "pred_count"
    raise HarvestError(f"kind must be 'input' or 'output', got {kind!r}")


def _rank(scores: dict[str, Tensor], counts: Tensor, by: str, k: int, ok: Tensor) -> Tensor:
    if by not in scores:
        raise HarvestError(f"by must be one of {sorted(scores)}, got {by!r}")
    if k < 1:
        raise HarvestError(f"k must be >= 1, got {k}")
    s = torch.where(ok, scores[by].double(), torch.full_like(scores[by].double(), -math.inf))
    # score descending, then joint count descending, then index ascending
    order = torch.argsort(-counts.double(), stable=True)
    order = order[torch.argsort(-s[order], stable=True)]
    return order[ok[order]][:k]


def token_scores(stats: HarvestStats, comp: str | int, kind: TokenKind = "input") -> dict:
    """All-vocabulary precision / recall / (smoothed) PMI / count for one component (V,) each."""
    i = stats.index(comp)
    table, counts = _token_arrays(kind)
    joint, tok = stats.token_row(table, i), stats.t[counts]
    fire = stats.t["fire_count"][i]
    density = fire.double() / max(stats.n_tokens, 1)
    return {
        "count": joint,
        "precision": joint.double() / fire.clamp(min=1),
        "recall": joint.double() / tok.clamp(min=1),
        "pmi": _pmi(joint, fire.expand_as(tok), tok, stats.n_tokens),
        "smoothed_pmi": _shrunk_pmi(joint, tok, density.expand_as(tok)),
    }


def top_tokens(
    stats: HarvestStats, comp: str | int, *, kind: TokenKind = "input",
    by: TokenRank = "smoothed_pmi", k: int = 10, min_count: int = 1,
) -> list[TokenAssociation]:
    """The k tokens most associated with a component's firing (joint count >= min_count)."""
    tok = stats.t[_token_arrays(kind)[1]]
    sc = token_scores(stats, comp, kind)
    ok = sc["count"] >= max(min_count, 1)
    idx = _rank(sc, sc["count"], by, k, ok)
    return [
        TokenAssociation(
            token_id=int(v), count=int(sc["count"][v]), token_count=int(tok[v]),
            precision=float(sc["precision"][v]), recall=float(sc["recall"][v]),
            pmi=float(sc["pmi"][v]), smoothed_pmi=float(sc["smoothed_pmi"][v]),
        )
        for v in idx.tolist()
    ]


def correlated(
    stats: HarvestStats, comp: str | int, *, by: CoRank = "jaccard", k: int = 10,
    min_count: int = 1,
) -> list[ComponentAssociation]:
    """The k components whose firing co-occurs most with this one's (itself excluded); exact
    for k up to the table's ``cofire_k``."""
    i = stats.index(comp)
    j, co = stats.cofire_partners(i)
    top = int(stats.t["cofire_k"])
    if k > top:
        raise HarvestError(f"the co-firing table keeps {top} partners per ranking; ask k <= {top}")
    fire = stats.t["fire_count"]
    fi, fj = fire[i], fire[j]
    scores = {"count": co, "jaccard": jaccard(co, fi, fj),
              "precision": co.double() / fi.clamp(min=1)}
    pmi = _pmi(co, fi.expand_as(fj), fj, stats.n_tokens)
    recall = co.double() / fj.clamp(min=1)
    idx = _rank(scores, co, by, k, co >= max(min_count, 1))
    return [
        ComponentAssociation(
            index=int(j[p]), key=stats.key(int(j[p])), count=int(co[p]), fire_count=int(fj[p]),
            jaccard=float(scores["jaccard"][p]), pmi=float(pmi[p]),
            precision=float(scores["precision"][p]), recall=float(recall[p]),
        )
        for p in idx.tolist()
    ]


def components_for_token(
    stats: HarvestStats, token_id: int, *, kind: TokenKind = "input",
    by: TokenRank = "smoothed_pmi", k: int = 10, min_count: int = 1,
) -> list[TokenComponent]:
    """The k components most associated with one token (for component search)."""
    if not 0 <= token_id < stats.vocab_size:
        raise HarvestError(f"token id {token_id} out of range 0..{stats.vocab_size - 1}")
    table, counts = _token_arrays(kind)
    joint, tok = stats.token_col(table, token_id), stats.t[counts]
    fire = stats.t["fire_count"]
    tc = tok[token_id]
    scores = {
        "count": joint,
        "precision": joint.double() / fire.clamp(min=1),
        "recall": joint.double() / tc.clamp(min=1),
        "pmi": _pmi(joint, fire, tc.expand_as(fire), stats.n_tokens),
        "smoothed_pmi": _shrunk_pmi(joint, fire, (tc.double() / max(stats.n_tokens, 1))
                                    .expand_as(fire)),
    }
    ok = joint >= max(min_count, 1)
    idx = _rank(scores, joint, by, k, ok)
    return [
        TokenComponent(
            index=j, key=stats.key(j), count=int(joint[j]), fire_count=int(fire[j]),
            precision=float(scores["precision"][j]), recall=float(scores["recall"][j]),
            pmi=float(scores["pmi"][j]), smoothed_pmi=float(scores["smoothed_pmi"][j]),
        )
        for j in idx.tolist()
    ]
