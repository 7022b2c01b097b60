"""Dataset attributions (DESIGN §7): direct effects summed over a dataset sample.

With the leaf forward of :mod:`spd_mcp.attributions.forward` (the graph's semantics: component
activations cut into leaves, weight delta constant) and sums over documents, target positions p
and source positions p' (cross-position terms through attention included):

- component → component: ``A[s, t] = Σ (∂ a_t[p] / ∂ a_s[p']) · a_s[p'] · ci_s[p']``;
- input token → component: ``A_in[tok, t] = Σ (∂ a_t[p] / ∂ e[p']) · e[p']`` over positions p'
  holding ``tok`` (e: the embedding output);
- component → output token: ``A_out[s, v] = Σ (∂ logit_v[p] / ∂ a_s[p']) · a_s[p'] · ci_s[p']``
  over the full vocabulary; likewise input token → output token (the direct embed → logit path).

Fast algebra (:class:`Accumulator`): the targets of a decomposed linear layer are linear in its
input x (``a_t = x · V[:, t]``) and the logits in the unembedding's input, so one backward per
input dimension d (``∂ Σ_p x_d[p] / ∂ sources``, target positions summed inside the backward)
gives every target of the layer after a contraction with V (or W_Uᵀ); where C < d_in the rows
are V's columns instead. Rows run batched (``is_grads_batched``); gradients are taken at the
source layers' outputs and contracted (sparse CSR product) with the write vectors of the
CI-weighted source activations, which are nonzero only where CI is. Per-row sums accumulate in
fp64 and are contracted with V once, at the end (everything is linear).

:func:`reference_attributions` runs one plain backward per target component (and per vocabulary
token) w.r.t. the leaves, through the unmodified forward; tests compare the two.

Stored are signed sums only: |contribution| per target position would need a backward per
(target, position), the very thing the summed backward avoids.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from spd_mcp.model.component_model import ComponentModel
from spd_mcp.model.topology import Topology

from .config import AttributionError
from .forward import (
    Forward,
    batched_grads,
    embed_module,
    head_module,
    layout,
    leaf_forward,
)

CIFn = Callable[[dict[str, Tensor]], dict[str, Tensor]]
"""``ci_fn(inputs)``: module path → layer input (B, T, d_in) ↦ module path → CI (B, T, C)."""

Batch = tuple[Tensor, Tensor]
"""(ids (B, T) right-padded, lengths (B,))."""

SUM_TENSORS = ("comp_comp", "token_comp", "comp_output", "token_output")
FP32_ABOVE = 1 << 28
"""Sum tables are stored fp32 once S² exceeds this (16k components: 2 GB for ``comp_comp`` in
fp64; 40k components would take 13 GB). Rows are still accumulated in fp64."""
COUNT_TENSORS = ("token_count", "fire_count", "act_sum", "abs_act_sum", "ci_sum", "weight_sum")


def natural_ci_fn(cm: ComponentModel) -> CIFn:
    """The run's own (lower) causal importances."""
    return lambda inputs: cm.compute_ci(inputs).lower


@dataclass
class AttributionSums:
    """Raw sums (fp64) and counts over a sample; global component index = layer offset + c.

    Sums: ``comp_comp`` (S, S) [source, target], zero unless the source layer precedes the
    target's; ``token_comp`` (V, S); ``comp_output`` (S, V); ``token_output`` (V, V).
    Counts over valid tokens: ``token_count`` (V,) input occurrences; ``fire_count`` (S,) tokens
    with ci > 0; ``act_sum`` / ``abs_act_sum`` / ``ci_sum`` / ``weight_sum`` (S,): Σ a, Σ |a|,
    Σ ci, Σ a·ci.
    """

    layers: list[str]
    offsets: list[int]
    vocab_size: int
    tensors: dict[str, Tensor]
    n_tokens: int = 0
    n_docs: int = 0

    @classmethod
    def empty(cls, layers: list[str], offsets: list[int], vocab: int, *, sums: bool = True
              ) -> AttributionSums:
        """Zero sums and counts (``sums=False``: the counts only)."""
        S, V = offsets[-1], vocab
        f64, i64 = torch.float64, torch.long
        shapes = {"comp_comp": (S, S), "token_comp": (V, S), "comp_output": (S, V),
                  "token_output": (V, V), "token_count": (V,), "fire_count": (S,),
                  "act_sum": (S,), "abs_act_sum": (S,), "ci_sum": (S,), "weight_sum": (S,)}
        return cls(layers, offsets, vocab, {
            k: torch.zeros(s, dtype=i64 if k.endswith("count") else sum_dtype(S)
                           if k in SUM_TENSORS else f64)
            for k, s in shapes.items() if sums or k not in SUM_TENSORS})

    @property
    def n_components(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]


def sum_dtype(S: int) -> torch.dtype:
    """dtype of the stored sum tables for S components (see FP32_ABOVE)."""
    return torch.float32 if S * S > FP32_ABOVE else torch.float64


def _valid(ids: Tensor, lengths: Tensor) -> Tensor:
    return torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]


def _ci(ci_fn: CIFn, fwd: Forward, ids: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        ci = ci_fn({lay.module: lay.x.detach() for lay in fwd.layers if lay.x is not None})
    for lay in fwd.layers:
        if lay.module not in ci:
            raise AttributionError(f"ci_fn gave no CI for {lay.module!r}")
        if tuple(ci[lay.module].shape) != (*ids.shape, lay.C):
            raise AttributionError(f"CI of {lay.module!r} has shape "
                                   f"{tuple(ci[lay.module].shape)}, want {(*ids.shape, lay.C)}")
    return ci


def _count(acc: AttributionSums, fwd: Forward, ci: dict[str, Tensor], ids: Tensor,
           mask: Tensor) -> dict[str, Tensor]:
    """Update the counts of ``acc``; return per-layer source weights a·ci (B, T, C), 0 at pads."""
    t = acc.tensors
    acc.n_tokens += int(mask.sum())
    acc.n_docs += int(ids.shape[0])
    t["token_count"] += torch.bincount(ids[mask], minlength=acc.vocab_size).cpu()
    weights = {}
    for lay in fwd.layers:
        assert lay.leaf is not None
        a = lay.leaf.detach()[mask].double()
        c = ci[lay.module].detach()[mask].double()
        sl = slice(lay.offset, lay.offset + lay.C)
        t["fire_count"][sl] += (c > 0).sum(0).cpu()
        t["act_sum"][sl] += a.sum(0).cpu()
        t["abs_act_sum"][sl] += a.abs().sum(0).cpu()
        t["ci_sum"][sl] += c.sum(0).cpu()
        t["weight_sum"][sl] += (a * c).sum(0).cpu()
        w = lay.leaf.detach() * ci[lay.module].detach().to(lay.leaf.dtype)
        weights[lay.module] = w * mask[..., None]
    return weights


def _vocab(cm: ComponentModel, topology: Topology) -> int:
    head = head_module(cm, topology)
    if head is not None:
        return head.out_features
    emb = embed_module(cm, topology)
    mod = cm.target.get_submodule(emb) if emb is not None else None
    if isinstance(mod, nn.Embedding):
        return mod.num_embeddings
    raise AttributionError("cannot tell the vocabulary size (no Linear head, no Embedding)")


def empty_sums(cm: ComponentModel, topology: Topology, *, sums: bool = True) -> AttributionSums:
    lays = layout(cm, topology)
    offsets = [lay.offset for lay in lays] + [lays[-1].offset + lays[-1].C if lays else 0]
    return AttributionSums.empty([lay.canonical for lay in lays], offsets, _vocab(cm, topology),
                                 sums=sums)


# -------------------------------------------------------------------------------------- fast
@dataclass
class _Target:
    """A block of targets: rows R (r, d_root) of its root, contraction K (r, n_targets)."""

    name: str  # module path, or "output"
    R: Tensor
    K: Tensor
    M: Tensor  # (r, S_up) fp64: Σ over tokens of row gradient · source weight, for the
    # components upstream of the target (global indices 0 .. S_up − 1; all S for the output)
    M_in: Tensor  # (r, V) fp64: the same per input token
    identity: bool  # R is the identity: targets reading one root share their rows


@dataclass
class _Source:
    tensor: Tensor  # gradients are taken w.r.t. this: a layer's output, or the embedding leaf
    offset: int = 0
    Z: Tensor | None = None  # CSR write matrix (C, N·d); None for the embedding


def _write_matrix(w: Tensor, U: Tensor) -> Tensor:
    """CSR (C, N·d) whose row c holds w[n, c] · U[c] at columns n·d .. n·d + d − 1: the
    CI-weighted writes of one source layer (nonzero only where CI is)."""
    N, C = w.shape
    d = U.shape[1]
    c, n = w.T.nonzero(as_tuple=True)  # sorted by c
    crow = torch.zeros(C + 1, dtype=torch.long, device=w.device)
    crow[1:] = torch.cumsum(torch.bincount(c, minlength=C) * d, 0)
    col = (n[:, None] * d + torch.arange(d, device=w.device)).flatten()
    val = (w[n, c, None] * U[c]).flatten()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, val, (C, N * d), check_invariants=False)


class Accumulator:
    """Streams batches into :class:`AttributionSums` with the fast algebra (module docstring).

    chunk: backward rows per batched pass (memory ∝ chunk · B · T · d).
    """

    def __init__(self, cm: ComponentModel, topology: Topology, ci_fn: CIFn | None = None,
                 *, chunk: int = 16) -> None:
        if chunk < 1:
            raise AttributionError(f"chunk must be >= 1, got {chunk}")
        self.cm, self.topology, self.chunk = cm, topology, chunk
        self.ci_fn = ci_fn or natural_ci_fn(cm)
        self.head = head_module(cm, topology)
        self.sums = empty_sums(cm, topology, sums=False)  # the counts; sums come from M
        self.targets: list[_Target] = []
        for lay in layout(cm, topology):
            comp = cm.component(lay.module)
            if comp.kind == "linear":  # an embedding's activations depend on no source
                self.targets.append(self._target(lay.module, comp.V.detach(), lay.offset))
        W = (self.head.weight.detach().T if self.head is not None
             else torch.eye(self.sums.vocab_size, device=self._dev))
        self.targets.append(self._target("output", W, self.sums.n_components))

    @property
    def _dev(self) -> torch.device:
        return next(self.cm.parameters()).device

    def _target(self, name: str, V: Tensor, upstream: int) -> _Target:
        """Target block of a layer (or the output) whose sources are components
        0 .. upstream − 1 (layers precede their targets in the global order)."""
        d_in, C = V.shape
        eye = torch.eye(min(d_in, C), device=V.device, dtype=V.dtype)
        R, K = (eye, V) if d_in <= C else (V.T.contiguous(), eye)
        z = lambda n: torch.zeros(R.shape[0], n, dtype=torch.float64, device=V.device)  # noqa: E731
        return _Target(name, R, K.double(), z(upstream), z(self.sums.vocab_size), d_in <= C)

    @torch.no_grad()
    def add(self, ids: Tensor, lengths: Tensor) -> int:
        """Accumulate one right-padded batch; returns its number of (valid) tokens."""
        ids, lengths = ids.to(self._dev), lengths.to(self._dev)
        mask = _valid(ids, lengths)
        fwd = leaf_forward(self.cm, self.topology, ids)
        weights = _count(self.sums, fwd, _ci(self.ci_fn, fwd, ids), ids, mask)
        srcs = [] if fwd.embed is None else [_Source(fwd.embed)]
        upto = {}
        for lay in fwd.layers:
            upto[lay.module] = len(srcs)
            assert lay.out is not None
            U = self.cm.component(lay.module).U.detach()
            Z = _write_matrix(weights[lay.module].flatten(0, 1), U)
            srcs.append(_Source(lay.out, lay.offset, Z))
        # targets reading the same root with identity rows (e.g. q, k, v of a block) share
        # one backward: (root, number of upstream sources, targets)
        groups: dict[int, tuple[Tensor, int, list[_Target]]] = {}
        for tgt in self.targets:
            if tgt.name == "output":
                root, k = (fwd.head_in if self.head is not None else fwd.logits), len(srcs)
            else:
                root = next(lay.x for lay in fwd.layers if lay.module == tgt.name)
                k = upto[tgt.name]
            assert root is not None
            key = id(root) if tgt.identity else id(tgt)
            if key in groups:
                r, k0, members = groups[key]
                groups[key] = (r, min(k0, k), [*members, tgt])
            else:
                groups[key] = (root, k, [tgt])
        for root, k, members in groups.values():
            if k:
                self._backward(members, root, mask, srcs[:k], fwd, ids.flatten())
        return int(mask.sum())

    def _backward(self, tgts: list[_Target], root: Tensor, mask: Tensor, srcs: list[_Source],
                  fwd: Forward, flat_ids: Tensor) -> None:
        """Rows of ``tgts`` (one R) in chunks: ∂ Σ_{valid p} R_r · root[p] / ∂ sources,
        contracted with the sources' CI-weighted writes (components) or embedding vectors."""
        m = mask.to(root.dtype)[None, ..., None]
        tgt = tgts[0]
        width = max((s.offset + s.Z.shape[0] for s in srcs if s.Z is not None), default=0)
        assert all(t.M.shape[1] >= width for t in tgts), "a source is not upstream of its target"
        for r0 in range(0, tgt.R.shape[0], self.chunk):
            R = tgt.R[r0:r0 + self.chunk]
            rows = R.shape[0]
            with torch.enable_grad():
                grads = batched_grads(root, R[:, None, None, :] * m, [s.tensor for s in srcs],
                                      fwd.attns, mask)
            P = torch.zeros(rows, width, device=root.device, dtype=root.dtype)
            flat: dict[tuple, Tensor] = {}  # residual writers share a gradient: transpose once
            for src, g in zip(srcs, grads, strict=True):
                if g is None:
                    continue
                if src.Z is None:  # the embedding: Σ_d grad · e, summed per input token
                    assert fwd.embed is not None
                    per_tok = torch.einsum("rnd,nd->rn", g.reshape(rows, -1, g.shape[-1]),
                                           fwd.embed.detach().flatten(0, 1)) * m.flatten()
                    for t in tgts:
                        t.M_in[r0:r0 + rows].index_add_(1, flat_ids, per_tok.double())
                    continue
                key = (g.data_ptr(), g.shape, g.stride())
                if key not in flat:
                    flat[key] = g.reshape(rows, -1).T.contiguous()  # (N·d, rows)
                C = src.Z.shape[0]
                P[:, src.offset:src.offset + C] += (src.Z @ flat[key]).T
            for t in tgts:
                t.M[r0:r0 + rows, :width] += P

    def result(self) -> AttributionSums:
        """The sums so far: accumulated rows contracted with V / W_Uᵀ in fp64 (stored in
        :func:`sum_dtype`), one target block at a time."""
        s = self.sums
        out = empty_sums(self.cm, self.topology)
        out.n_tokens, out.n_docs = s.n_tokens, s.n_docs
        t = out.tensors
        for k, v in s.tensors.items():
            t[k].copy_(v)
        lays = {lay.module: lay for lay in layout(self.cm, self.topology)}
        for tgt in self.targets:
            up = tgt.M.shape[1]
            if tgt.name == "output":
                t["comp_output"][:up] = (tgt.M.T @ tgt.K).cpu()
                t["token_output"][:] = (tgt.M_in.T @ tgt.K).cpu()
            else:
                cols = slice(lays[tgt.name].offset, lays[tgt.name].offset + lays[tgt.name].C)
                t["comp_comp"][:up, cols] = (tgt.M.T @ tgt.K).cpu()  # downstream rows stay 0
                t["token_comp"][:, cols] = (tgt.M_in.T @ tgt.K).cpu()
        return out


def accumulate(cm: ComponentModel, topology: Topology, batches: Iterable[Batch],
               ci_fn: CIFn | None = None, *, chunk: int = 16) -> AttributionSums:
    """Fast attribution sums over ``batches`` of (ids (B, T), lengths (B,))."""
    acc = Accumulator(cm, topology, ci_fn, chunk=chunk)
    for ids, lengths in batches:
        acc.add(ids, lengths)
    return acc.result()


# --------------------------------------------------------------------------------- reference
@torch.no_grad()
def reference_attributions(cm: ComponentModel, topology: Topology, batches: Iterable[Batch],
                           ci_fn: CIFn | None = None) -> AttributionSums:
    """The same sums with one plain backward per target component / vocabulary token through
    the unmodified forward (slow)."""
    ci_fn = ci_fn or natural_ci_fn(cm)
    acc = empty_sums(cm, topology)
    t = acc.tensors
    dev = next(cm.parameters()).device
    for ids, lengths in batches:
        ids, lengths = ids.to(dev), lengths.to(dev)
        mask = _valid(ids, lengths)
        fwd = leaf_forward(cm, topology, ids, fast=False)
        weights = _count(acc, fwd, _ci(ci_fn, fwd, ids), ids, mask)
        leaves: list[Tensor] = [] if fwd.embed is None else [fwd.embed]
        owner: list[int] = [-1] * len(leaves)
        for i, lay in enumerate(fwd.layers):
            assert lay.leaf is not None
            leaves.append(lay.leaf)
            owner.append(i)
        with torch.enable_grad():
            blocks = [(fwd.logits, len(leaves), t["comp_output"], t["token_output"])]
            for i, lay in enumerate(fwd.layers):
                comp = cm.component(lay.module)
                if comp.kind == "linear" and lay.x is not None:
                    sl = slice(lay.offset, lay.offset + lay.C)
                    blocks.append((comp.component_acts(lay.x), owner.index(i),
                                   t["comp_comp"][:, sl], t["token_comp"][:, sl]))
            for values, upto, cc, tc in blocks:
                for j in range(values.shape[-1] if upto else 0):
                    v = (values[..., j] * mask).sum()
                    grads = torch.autograd.grad(v, leaves[:upto], retain_graph=True,
                                                allow_unused=True)
                    for i, g in zip(owner, grads, strict=False):
                        if g is None:
                            continue
                        if i < 0:  # embedding: grad · e per position, by token id
                            assert fwd.embed is not None
                            per = (g * fwd.embed.detach()).sum(-1)[mask].double()
                            tc[:, j].index_add_(0, ids[mask], per)
                        else:
                            lay = fwd.layers[i]
                            cc[lay.offset:lay.offset + lay.C, j] += (
                                g * weights[lay.module]).double().sum((0, 1))
    return acc
