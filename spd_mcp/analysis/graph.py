"""Attribution graphs: direct effects between alive components on one prompt (DESIGN §6).

The forward is the exact target: every decomposed layer writes ``a U + x Δᵀ + b`` with all masks 1,
where its component activations ``a`` are cut into leaves (detached copies of ``x V``) and the
weight-delta term ``x Δᵀ`` is a constant (taken as the layer's target output minus ``a U + b``, so
forward values are bitwise the target's). The gradient of a node w.r.t. a leaf is then the DIRECT
effect of that leaf on the node: no path runs through another leaf or through a delta term.

Nodes: alive components ``"{layer}:{pos}:{c}"`` (ci > ci_threshold); one ``"embed:{pos}:0"`` per
position (the embedding output, or the input vector of a positionless toy model) unless the
embedding itself is decomposed; ``"output:{pos}:{token}"`` for the top output tokens. An edge
s → t has value (∂ value_t / ∂ leaf_s) · act_s (an embed source: gradient · embedding vector),
and an "abs-target" value sign(value_t) · that. Edges of value exactly 0 are not kept.

Two implementations with the same signature and the same result:

- :func:`compute_graph` batches target nodes into few backward passes (``is_grads_batched``),
  taking gradients w.r.t. each source layer's output and contracting them with the write
  directions of its alive components only. Strategies per target layer:

  * ``local``: every leaf the target depends on is at its own position (q/k/v/up/down/logits of a
    Transformer whose attention outputs ``o`` are decomposed, or any positionless model); one
    backward row carries one target per position.
  * ``attn``: an ``o`` target of a block with q/k/v decomposed; q → o is same-position, k/v → o
    crosses positions (p' ≤ p). The block's ``scaled_dot_product_attention`` call is recorded in
    the forward; attention's backward for the target's single query is written out (softmax
    Jacobian) per query position, so no O(T² d) attention backward runs per target.
  * ``general``: anything else (undecomposed attention, unknown sequence models): one backward
    row per target node over all positions.
- :func:`compute_graph_reference` runs one backward per target node w.r.t. the leaves.

Remainders: a node's value is not the sum of its edges. Its direct function (everything else
frozen) reads every source layer's output ``alive writes + dead writes + x Δᵀ + b``; the
gradient · input of each part is exact, so value = in_sum + pruned + dead + delta + bias +
unexplained, where unexplained = value − gradient · (all of it): the nonlinearity (a norm's
rescaling — RMSNorm is scale invariant, so gradient · input over the whole residual is ≈ 0 —,
attention's softmax, GELU) and constants outside decomposed layers. See :func:`remainders`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from spd_mcp.keys import BlockLayer, node_key
from spd_mcp.model.component_model import ComponentModel
from spd_mcp.model.topology import Topology

PARTS = ("pruned", "dead", "delta", "bias")
"""Columns of ``AttributionGraph.node_parts``."""
REMAINDER = ("in_sum", *PARTS, "unexplained")
"""Columns of :func:`remainders`."""
REMAINDER_NOTE = (
    "act = in_sum + pruned (edges cut by threshold / cap) + dead (CI ≤ threshold, not nodes) + "
    "delta (weight delta) + bias + unexplained. Edges are gradient × activation with other "
    "layers frozen: exact marginal direct effects, not shares of act. A norm is scale "
    "invariant, so for nodes read through one (logits, q/k/v/up) in_sum + pruned + dead + "
    "delta + bias ≈ 0 and unexplained ≈ act; elsewhere unexplained is softmax / GELU "
    "nonlinearity and constants outside decomposed layers."
)
Progress = Callable[[int, int], None]
"""progress(done, total) — target nodes processed so far."""

Mode = Literal["local", "attn", "general"]
_CHUNK = 64
_PARTS_BUDGET = 1 << 26  # gradient elements held at once while computing remainder parts
_IDX = torch.int32  # node indices while edges are generated (int64 in the result)
_EDGE_SLACK = 1 << 22  # edges collected beyond the cap before cutting back to it
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@dataclass
class AttributionGraph:
    """Nodes in canonical order (layer order, pos, index); edges sorted by (tgt, src).

    ``node_idx`` is the component index, the token id (output nodes) or 0 (embed nodes).
    ``node_act`` is the component activation, the logit (output), or the embedding's L2 norm.
    ``output_prob`` is the target probability for output nodes and NaN elsewhere.
    ``tokens`` is empty for a positionless (float vector) input.
    ``node_parts`` (n, 4): a node's remainder parts (:data:`PARTS`, gradient · input of what the
    graph does not show), NaN where not computed (embed nodes, nodes past the cap).
    """

    tokens: list[int]
    node_keys: list[str]
    node_layer: list[str]
    node_pos: Tensor
    node_idx: Tensor
    node_act: Tensor
    node_ci: Tensor
    output_prob: Tensor
    edge_src: Tensor
    edge_tgt: Tensor
    edge_val: Tensor
    edge_val_abs: Tensor
    node_parts: Tensor | None = None

    @property
    def n_nodes(self) -> int:
        return len(self.node_keys)

    @property
    def n_edges(self) -> int:
        return int(self.edge_src.numel())


# ------------------------------------------------------------------------------------ forward
@dataclass
class _Rec:
    """What the leaf forward recorded for one decomposed layer (batch dim 1 kept)."""

    x: Tensor  # layer input (graph-connected)
    leaf: Tensor  # component activations, a leaf (1, T, C) / (1, C)
    out: Tensor  # layer output a U + const + b (graph-connected)
    n_sdpa: int  # attention calls seen before this layer ran


@dataclass
class _SDPA:
    """One recorded ``scaled_dot_product_attention`` call."""

    args: dict[str, Any]
    out: Tensor


class _SDPARecorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[_SDPA] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            self.calls.append(_SDPA({**dict(zip(_SDPA_ARGS, args, strict=False)), **kwargs}, out))
        return out


@dataclass
class _Forward:
    T: int
    tokens: list[int]
    logits: Tensor  # (T, V), graph-connected
    recs: dict[str, _Rec]
    embed_leaf: Tensor | None  # embedding output / input vector leaf, when not decomposed
    sdpa: list[_SDPA] = field(default_factory=list)


def _leaf_forward(cm: ComponentModel, topology: Topology, ids: Tensor) -> _Forward:
    """Exact target forward with component activations (and the embedding) cut into leaves."""
    if ids.dtype.is_floating_point:  # positionless toy input (d,): the input is the embed leaf
        if ids.dim() != 1:
            raise ValueError(f"float input must be one vector (d,), got shape {tuple(ids.shape)}")
        inp, T, tokens = ids[None].detach().clone().requires_grad_(True), 1, []
    else:
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"ids must be a (T,) token sequence, got shape {tuple(ids.shape)}")
        inp, T, tokens = ids[None], int(ids.numel()), [int(t) for t in ids.tolist()]
    recs: dict[str, _Rec] = {}
    embed: list[Tensor] = [inp] if inp.requires_grad else []
    recorder = _SDPARecorder()

    def layer_hook(name: str):
        comp = cm.component(name)

        def hook(_m: torch.nn.Module, args: tuple, target_out: Tensor) -> Tensor:
            x = args[0]
            with torch.no_grad():
                leaf = comp.component_acts(x)
            leaf.requires_grad_(True)
            y = comp(x, acts=leaf)  # a U + b (x is not read when acts are given)
            # target_out − (a U + b) = x Δᵀ, the weight-delta term, enters as a constant: the
            # value is the target's own output and the gradient flows to the leaf only.
            out = target_out.detach() + (y - y.detach())
            recs[name] = _Rec(x, leaf, out, len(recorder.calls))
            return out

        return hook

    def embed_hook(_m: torch.nn.Module, _args: tuple, out: Tensor) -> Tensor:
        leaf = out.detach().requires_grad_(True)
        embed.append(leaf)
        return leaf

    handles = [
        cm.target.get_submodule(n).register_forward_hook(layer_hook(n)) for n in cm.layer_names
    ]
    emb_mod = topology.to_module("embed") if "embed" in topology else None
    if emb_mod is not None and emb_mod not in cm.Cs and not inp.requires_grad:
        handles.append(cm.target.get_submodule(emb_mod).register_forward_hook(embed_hook))
    try:
        with torch.enable_grad(), recorder:
            out = cm.target(inp)
    finally:
        for h in handles:
            h.remove()
    return _Forward(
        T, tokens, out.reshape(T, -1), recs, embed[0] if embed else None, recorder.calls
    )


# -------------------------------------------------------------------------------------- nodes
@dataclass
class _Group:
    """A contiguous block of nodes of one layer, sorted by (pos, idx)."""

    name: str  # canonical layer
    module: str | None  # module path of a decomposed layer; None for embed / output
    offset: int
    pos: Tensor  # (n,)
    idx: Tensor  # (n,)
    act: Tensor  # (n,)
    ci: Tensor  # (n,)
    out: Tensor | None = None  # source role: tensor whose gradient is contracted with `dirs`
    dirs: Tensor | None = None  # (n, d_out): write direction x act (embed: the vector itself)
    leaf: Tensor | None = None  # source role for the reference
    root: Tensor | None = None  # target role: tensor whose contraction with `read` is the value
    read: Tensor | None = None  # (n, d_root) read direction (V column or one-hot)

    @property
    def n(self) -> int:
        return int(self.pos.numel())

    @property
    def is_target(self) -> bool:
        return self.root is not None

    def nodes(self, sl: slice | None = None) -> Tensor:
        start, stop = (0, self.n) if sl is None else (sl.start, sl.stop)
        return torch.arange(
            self.offset + start, self.offset + stop, dtype=_IDX, device=self.pos.device
        )


def _ci_table(
    cm: ComponentModel, topology: Topology, ci: dict[str, Tensor], T: int, dev: torch.device
) -> dict[str, Tensor]:
    table: dict[str, Tensor] = {}
    for key, v in ci.items():
        mod = key if key in cm.Cs else topology.to_module(key)
        if mod not in cm.Cs:
            raise ValueError(f"CI given for {key!r}, which is not a decomposed layer")
        table[mod] = v.detach().to(dev).reshape(T, cm.Cs[mod])
    if missing := [m for m in cm.layer_names if m not in table]:
        raise ValueError(f"CI missing for layers {missing}")
    return table


def _output_tokens(
    probs: Tensor, top_k: int, cum_prob: float | None, label_token: int | None
) -> list[int]:
    top = probs.topk(min(top_k, probs.numel()))
    n = top.values.numel()
    if cum_prob is not None:
        n = min(n, int((top.values.cumsum(0) < cum_prob).sum()) + 1)
    toks = set(top.indices[:n].tolist())
    if label_token is not None:
        if not 0 <= label_token < probs.numel():
            raise ValueError(f"label_token {label_token} out of range (vocab {probs.numel()})")
        toks.add(int(label_token))
    return sorted(toks)


def _build(
    cm: ComponentModel,
    topology: Topology,
    ids: Tensor | list[int],
    ci: dict[str, Tensor],
    ci_threshold: float,
    output_positions: list[int] | None,
    top_k_outputs: int,
    cum_prob: float | None,
    label_token: int | None,
) -> tuple[_Forward, list[_Group]]:
    """Run the leaf forward and lay out the node groups (embed, layers in order, output)."""
    dev = next(cm.parameters()).device
    fwd = _leaf_forward(cm, topology, torch.as_tensor(ids, device=dev))
    T = fwd.T
    table = _ci_table(cm, topology, ci, T, dev)
    order = {m: i for i, m in enumerate(topology.module_paths)}
    for m in cm.layer_names:
        if m not in order:
            raise ValueError(f"decomposed layer {m!r} is not in the topology")
        if topology.to_canonical(m) == "output":
            raise ValueError(f"the output layer {m!r} is decomposed: unsupported (node keys clash)")
    groups: list[_Group] = []
    offset = 0
    if fwd.embed_leaf is not None:
        e = fwd.embed_leaf.detach().reshape(T, -1)
        ar = torch.arange(T, device=dev)
        groups.append(
            _Group(
                "embed",
                None,
                0,
                ar,
                torch.zeros_like(ar),
                e.norm(dim=-1),
                torch.ones_like(e[:, 0]),
                out=fwd.embed_leaf,
                dirs=e,
                leaf=fwd.embed_leaf,
            )
        )
        offset = T
    for m in sorted(cm.layer_names, key=order.__getitem__):
        comp, rec = cm.component(m), fwd.recs[m]
        pos, c = (table[m] > ci_threshold).nonzero(as_tuple=True)
        act = rec.leaf.detach().reshape(T, -1)[pos, c]
        g = _Group(
            topology.to_canonical(m),
            m,
            offset,
            pos,
            c,
            act,
            table[m][pos, c],
            out=rec.out,
            dirs=comp.U.detach()[c] * act[:, None],
            leaf=rec.leaf,
        )
        if comp.kind == "linear":
            g.root, g.read = rec.x, comp.V.detach().T[c]
        groups.append(g)
        offset += g.n
    logits = fwd.logits.detach()
    positions = [T - 1] if output_positions is None else list(output_positions)
    pos_l, tok_l = [], []
    for p in sorted({p % T if -T <= p < T else p for p in positions}):
        if not 0 <= p < T:
            raise ValueError(f"output position {p} out of range for {T} positions")
        toks = _output_tokens(logits[p].softmax(-1), top_k_outputs, cum_prob, label_token)
        pos_l += [p] * len(toks)
        tok_l += toks
    pos = torch.tensor(pos_l, dtype=torch.long, device=dev)
    tok = torch.tensor(tok_l, dtype=torch.long, device=dev)
    val = logits[pos, tok]
    groups.append(
        _Group(
            "output",
            None,
            offset,
            pos,
            tok,
            val,
            torch.ones_like(val),
            root=fwd.logits,
            read=F.one_hot(tok, logits.shape[-1]).to(logits.dtype),
        )
    )
    return fwd, groups


# -------------------------------------------------------------------------------------- edges
class _Edges:
    """Collects (src, tgt, val, abs-target val) edge tensors.

    Ordered pieces arrive in canonical (tgt, src) order over increasing target ranges; unordered
    pieces are gathered into a segment that is sorted when closed (before the next ordered one).
    With a cap (``max_edges``), the collected edges are cut to the cap's largest |values|
    whenever they exceed it by ``_EDGE_SLACK`` (the top edges of everything equal the top
    edges of the top edges so far and the rest; the cut values go to ``dropped``): a long
    prompt of a large run has billions of nonzero edges, far too many to hold before the cut.
    """

    def __init__(self, threshold: float, groups: list[_Group], max_edges: int | None = None
                 ) -> None:
        self.threshold = threshold
        self.max_edges = max_edges
        self.sign = torch.cat([g.act for g in groups]).sign()  # of each node's value
        self.n_nodes = int(self.sign.numel())
        self.open: list[tuple[Tensor, ...]] = []
        self.done: list[tuple[Tensor, ...]] = []
        self.n_open = self.n_done = 0
        self.dropped = self.sign.new_zeros(self.n_nodes)
        """Per node, the sum of its incoming edges cut so far."""

    def keep(self, val: Tensor) -> Tensor:
        """Edges that survive: nonzero and |val| >= threshold."""
        k = val != 0
        return k & (val.abs() >= self.threshold) if self.threshold > 0 else k

    def push(self, src: Tensor, tgt: Tensor, val: Tensor, *, ordered: bool = True) -> None:
        part = (src, tgt, val, val * self.sign.index_select(0, tgt))
        if ordered:
            self.close()
            self.done.append(part)
            self.n_done += int(val.numel())
            self._cut()
        else:
            self.open.append(part)
            self.n_open += int(val.numel())
            if self.max_edges is not None and self.n_open > self.max_edges + _EDGE_SLACK:
                self.open, self.n_open = self._top(self.open)  # sorted when closed

    def close(self) -> None:
        if not self.open:
            return
        cols = [torch.cat(t) for t in zip(*self.open, strict=True)]
        order = (cols[1].long() * self.n_nodes + cols[0]).argsort()
        self.done.append(tuple(c[order] for c in cols))
        self.n_done += self.n_open
        self.open, self.n_open = [], 0
        self._cut()

    def _cut(self) -> None:
        """Cut the closed pieces to the cap once they exceed it by the slack."""
        if self.max_edges is not None and self.n_done > self.max_edges + _EDGE_SLACK:
            self.done, self.n_done = self._top(self.done)

    def _top(self, pieces: list[tuple[Tensor, ...]]) -> tuple[list[tuple[Tensor, ...]], int]:
        """The ``max_edges`` largest |values| of ``pieces`` as one piece, in their order (the
        canonical order of closed pieces), and its size; the cut values go to ``dropped``."""
        assert self.max_edges is not None
        cols = [torch.cat(t) for t in zip(*pieces, strict=True)]
        val = cols[2]
        keep = val.abs().topk(self.max_edges).indices.sort().values
        self.dropped.index_add_(0, cols[1], val).index_add_(0, cols[1][keep], -val[keep])
        return [tuple(c[keep] for c in cols)], self.max_edges

    def result(self, max_edges: int | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(src, tgt) as int64, values, abs-target values; the ``max_edges`` largest |values|;
        per node, the sum of its incoming edges that ``max_edges`` dropped."""
        self.close()
        dev = self.sign.device
        empty = torch.zeros(0, dtype=_IDX, device=dev)
        none = self.sign.new_zeros(0)
        parts = [(empty, empty, none, none), *self.done]
        n = sum(int(p[2].numel()) for p in parts)
        src, tgt = (torch.empty(n, dtype=torch.long, device=dev) for _ in range(2))
        torch.cat([p[0] for p in parts], out=src)
        torch.cat([p[1] for p in parts], out=tgt)
        val, val_abs = (torch.cat([p[i] for p in parts]) for i in (2, 3))
        self.done, self.n_done = [], 0
        dropped = self.dropped
        if max_edges is not None and n > max_edges:
            keep = val.abs().topk(max_edges).indices.sort().values
            dropped.index_add_(0, tgt, val).index_add_(0, tgt[keep], -val[keep])
            src, tgt, val, val_abs = src[keep], tgt[keep], val[keep], val_abs[keep]
        return src, tgt, val, val_abs, dropped


def _finish(
    fwd: _Forward, groups: list[_Group], edges: _Edges, max_edges: int | None
) -> AttributionGraph:
    node_act = torch.cat([g.act for g in groups])
    src, tgt, val, val_abs, dropped = edges.result(max_edges)
    parts = node_act.new_full((node_act.numel(), len(PARTS)), float("nan"))
    if edges.threshold <= 0:  # only the cap dropped nonzero edges: pruned is known everywhere
        for g in groups:  # not for sources only (embeddings): no incoming edges
            if g.is_target:
                parts[g.offset : g.offset + g.n, 0] = dropped[g.offset : g.offset + g.n]
    out = groups[-1]
    prob = torch.full_like(node_act, float("nan"))
    if out.n:
        prob[out.offset :] = fwd.logits.detach().softmax(-1)[out.pos, out.idx]
    keys, layers = [], []
    for g in groups:
        keys += [node_key(g.name, p, i)
                 for p, i in zip(g.pos.tolist(), g.idx.tolist(), strict=True)]
        layers += [g.name] * g.n
    return AttributionGraph(
        tokens=fwd.tokens,
        node_keys=keys,
        node_layer=layers,
        node_pos=torch.cat([g.pos for g in groups]),
        node_idx=torch.cat([g.idx for g in groups]),
        node_act=node_act,
        node_ci=torch.cat([g.ci for g in groups]),
        output_prob=prob,
        edge_src=src,
        edge_tgt=tgt,
        edge_val=val,
        edge_val_abs=val_abs,
        node_parts=parts,
    )


# --------------------------------------------------------------------------------- remainders
def remainders(g: AttributionGraph) -> Tensor:
    """(n, 6) per node, columns :data:`REMAINDER`: in_sum (kept incoming edges), the parts and
    unexplained = value − in_sum − parts, where value is ``node_act`` (logit, activation). Rows
    without computed parts are NaN past in_sum."""
    in_sum = g.node_act.new_zeros(g.n_nodes).index_add_(0, g.edge_tgt, g.edge_val)
    parts = g.node_parts
    if parts is None:
        parts = g.node_act.new_full((g.n_nodes, len(PARTS)), float("nan"))
    rest = g.node_act - in_sum - parts.sum(1)
    return torch.cat([in_sum[:, None], parts, rest[:, None]], dim=1)


def _split_out(cm: ComponentModel, fwd: _Forward, g: _Group) -> Tensor:
    """A source's output split (4, T, d_out): alive writes, dead writes, x Δᵀ, bias."""
    assert g.out is not None and g.dirs is not None
    T = fwd.T
    alive = g.dirs.new_zeros(T, g.dirs.shape[-1]).index_add_(0, g.pos, g.dirs)
    if g.module is None:  # the embedding output / input vector: one alive node per position
        zero = torch.zeros_like(alive)
        return torch.stack([alive, zero, zero, zero])
    comp, rec = cm.component(g.module), fwd.recs[g.module]
    full = rec.leaf.detach().reshape(T, -1) @ comp.U.detach()
    bias = torch.zeros_like(full) if comp.bias is None else comp.bias.expand_as(full)
    delta = rec.out.detach().reshape(T, -1) - full - bias
    return torch.stack([alive, full - alive, delta, bias])


def _parts(cm: ComponentModel, fwd: _Forward, groups: list[_Group], want: Tensor) -> Tensor:
    """(len(want), 4) per target node: gradient · (alive writes, dead writes, x Δᵀ, bias) summed
    over every source layer's output at every position (one backward row per node)."""
    T = fwd.T
    splits = [None if g.out is None else _split_out(cm, fwd, g) for g in groups]
    res = torch.zeros(want.numel(), len(PARTS), dtype=groups[-1].act.dtype, device=want.device)
    for k, tgt in enumerate(groups):
        sel = ((want >= tgt.offset) & (want < tgt.offset + tgt.n)).nonzero().flatten()
        if not (tgt.is_target and sel.numel()):
            continue
        assert tgt.root is not None and tgt.read is not None
        src = [(s.out, w) for s, w in zip(groups[:k], splits[:k], strict=True) if w is not None]
        width = T * sum(w.shape[-1] for _, w in src)  # gradient elements per row
        chunk = max(1, min(_CHUNK, _PARTS_BUDGET // max(width, 1)))
        for i0 in range(0, int(sel.numel()), chunk):
            rows = sel[i0 : i0 + chunk]
            local = want[rows] - tgt.offset
            G = tgt.read.new_zeros(rows.numel(), T, tgt.read.shape[-1])
            G[torch.arange(rows.numel(), device=G.device), tgt.pos[local]] = tgt.read[local]
            grads = _batched_grad(tgt.root, [o for o, _ in src], G) if src else ()
            for grad, (_, w) in zip(grads, src, strict=True):
                if grad is not None:
                    res[rows] += torch.einsum("rtd,ktd->rk", grad.reshape(rows.numel(), T, -1), w)
    return res


def _add_parts(
    cm: ComponentModel, fwd: _Forward, groups: list[_Group], g: AttributionGraph, n_top: int
) -> None:
    """Fill ``g.node_parts`` for the output nodes and the ``n_top`` component nodes with the
    largest total |edge|; pruned = alive writes − in_sum where the threshold dropped edges."""
    assert g.node_parts is not None
    mass = g.node_act.new_zeros(g.n_nodes)
    mass.index_add_(0, g.edge_tgt, g.edge_val.abs()).index_add_(0, g.edge_src, g.edge_val.abs())
    out, comp = groups[-1], [grp for grp in groups[:-1] if grp.is_target]
    cand = torch.cat([grp.nodes().long() for grp in comp]) if comp else out.nodes().long()[:0]
    top = cand[mass[cand].argsort(descending=True)[:n_top]]
    want = torch.cat([top.sort().values, out.nodes().long()])
    if not want.numel():
        return
    vals = _parts(cm, fwd, groups, want)
    in_sum = g.node_act.new_zeros(g.n_nodes).index_add_(0, g.edge_tgt, g.edge_val)[want]
    pruned = g.node_parts[want, 0]
    vals[:, 0] = torch.where(pruned.isnan(), vals[:, 0] - in_sum, pruned)
    g.node_parts[want] = vals


# ---------------------------------------------------------------------------- fast strategies
@dataclass
class _SrcTable:
    """A source group's alive nodes padded per position: dirs (T, A, d), node index (T, A)."""

    dirs: Tensor
    node: Tensor


def _rank_in_pos(g: _Group, T: int) -> Tensor:
    counts = torch.bincount(g.pos, minlength=T)
    return torch.arange(g.n, device=g.pos.device) - (torch.cumsum(counts, 0) - counts)[g.pos]


def _src_table(g: _Group, T: int) -> _SrcTable:
    assert g.dirs is not None
    A = max(int(torch.bincount(g.pos, minlength=T).max()), 1) if g.n else 1
    rank = _rank_in_pos(g, T)
    dirs = g.dirs.new_zeros(T, A, g.dirs.shape[-1])
    node = torch.full((T, A), -1, dtype=_IDX, device=g.pos.device)
    dirs[g.pos, rank] = g.dirs
    node[g.pos, rank] = g.nodes()
    return _SrcTable(dirs, node)


def _batched_grad(root: Tensor, inputs: list[Tensor], G: Tensor) -> tuple[Tensor | None, ...]:
    """Gradients of rows G (R, *root.shape) contracted with ``root`` w.r.t. ``inputs``."""
    return torch.autograd.grad(
        root,
        inputs,
        G.reshape(G.shape[0], *root.shape),
        retain_graph=True,
        allow_unused=True,
        is_grads_batched=True,
    )


def _source_outs(sources: list[_Group]) -> list[Tensor]:
    outs = [s.out for s in sources]
    assert all(o is not None for o in outs)
    return outs  # type: ignore[return-value]


def _emit_rows(edges: _Edges, tgt_nodes: Tensor, parts: list[tuple[Tensor, Tensor]]) -> None:
    """Rows r → target node tgt_nodes[r]; parts (D (R, K), src node (K,) or -1) laid out in
    source-node order, so a row-major scan yields canonical (tgt, src) order."""
    if not parts:
        return
    D = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts], dim=1)
    src = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts])
    mask = edges.keep(D) & (src >= 0)[None]
    edges.push(
        torch.masked_select(src.expand_as(mask).contiguous(), mask),
        tgt_nodes.repeat_interleave(mask.sum(1)),
        torch.masked_select(D, mask),
    )


def _same(a: Tensor, b: Tensor) -> bool:
    """Bitwise-equal tensors (shared storage is checked first: autograd often hands one
    gradient to every summand of an addition)."""
    if a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride():
        return True
    return torch.equal(a, b)


def _merged(
    grads: tuple[Tensor | None, ...], tables: list[_SrcTable]
) -> list[tuple[Tensor, list[_SrcTable]]]:
    """(gradient, tables) per run of consecutive sources with bitwise-equal gradients (e.g. all
    residual-stream writers upstream of a target): the gradient is laid out once per run and
    contracted with each table in turn. (Concatenating a run's tables instead would copy every
    upstream table again for each target layer: gigabytes at seed size.)"""
    runs: list[tuple[Tensor, list[_SrcTable]]] = []
    for i, g in enumerate(grads):
        if g is None:
            continue
        if runs and _same(runs[-1][0], g):
            runs[-1][1].append(tables[i])
        else:
            runs.append((g, [tables[i]]))
    return runs


def _local(
    tgt: _Group,
    sources: list[_Group],
    tables: list[_SrcTable],
    T: int,
    edges: _Edges,
    tick: Callable[[int], None],
) -> None:
    """Targets whose leaf dependencies are all at their own position: one target per position
    per backward row (row r holds the r-th alive target of every position)."""
    assert tgt.root is not None and tgt.read is not None
    rank = _rank_in_pos(tgt, T)
    R = int(rank.max()) + 1
    nodes = tgt.nodes()
    outs = _source_outs(sources)
    for r0 in range(0, R, _CHUNK):
        sel = (rank >= r0) & (rank < r0 + _CHUNK)
        rows = min(_CHUNK, R - r0)
        G = tgt.read.new_zeros(rows, T, tgt.read.shape[-1])
        G[rank[sel] - r0, tgt.pos[sel]] = tgt.read[sel]
        tmap = torch.full((T, rows), -1, dtype=_IDX, device=G.device)
        tmap[tgt.pos[sel], rank[sel] - r0] = nodes[sel]
        runs = _merged(_batched_grad(tgt.root, outs, G), tables)
        if runs:
            Ds, srcs = [], []
            for g, tabs in runs:
                gt = g.reshape(rows, T, -1).transpose(0, 1)  # (T, R, d)
                for tab in tabs:
                    Ds.append(torch.bmm(gt, tab.dirs.transpose(1, 2)))  # (T, R, A)
                    srcs.append(tab.node)
            D = Ds[0] if len(Ds) == 1 else torch.cat(Ds, dim=2)  # (T, R, M)
            src = torch.cat(srcs, dim=1)  # (T, M)
            mask = edges.keep(D) & (tmap >= 0)[:, :, None] & (src >= 0)[:, None, :]
            edges.push(  # (t, r, m) scan order is canonical when one chunk holds all rows
                torch.masked_select(src[:, None, :].expand_as(mask).contiguous(), mask),
                tmap.flatten().repeat_interleave(mask.sum(2).flatten()),
                torch.masked_select(D, mask),
                ordered=R <= _CHUNK,
            )
        tick(int(sel.sum()))
    edges.close()


def _per_node(
    tgt: _Group,
    sources: list[_Group],
    tables: list[_SrcTable],
    T: int,
    edges: _Edges,
    tick: Callable[[int], None],
) -> None:
    """One backward row per target node, over all positions."""
    assert tgt.root is not None and tgt.read is not None
    outs = _source_outs(sources)
    for i0 in range(0, tgt.n, _CHUNK):
        sl = slice(i0, min(i0 + _CHUNK, tgt.n))
        rows = sl.stop - sl.start
        p = tgt.pos[sl]
        G = tgt.read.new_zeros(rows, T, tgt.read.shape[-1])
        G[torch.arange(rows, device=G.device), p] = tgt.read[sl]
        parts = [
            (
                torch.einsum("rtd,tad->rta", grad.reshape(rows, T, -1), tab.dirs).reshape(rows, -1),
                tab.node.reshape(-1),
            )
            for grad, tabs in _merged(_batched_grad(tgt.root, outs, G), tables)
            for tab in tabs
        ]
        _emit_rows(edges, tgt.nodes(sl), parts)
        tick(rows)


def _qkv_modules(topology: Topology, o_layer: str) -> list[str] | None:
    """Module paths feeding attention's q, k, v in the block of attention output ``o_layer``
    (one fused qkv matrix appears three times)."""
    role = BlockLayer.parse(o_layer)
    if role is None:
        return None
    names = topology.qkv_layers(role.block)
    if names is None:
        return None
    mods = [topology.module_of(n) for n in names]
    return None if any(m is None for m in mods) else [m for m in mods if m is not None]


def _attn_call(fwd: _Forward, tgt: _Group, topology: Topology) -> _SDPA | None:
    """The attention call feeding an ``o`` target, if its backward can be done per query row."""
    assert tgt.module is not None
    rec = fwd.recs[tgt.module]
    qkv = _qkv_modules(topology, tgt.name)
    if qkv is None or any(m not in fwd.recs for m in qkv):
        return None
    before = [fwd.recs[m].n_sdpa for m in set(qkv)]
    if rec.n_sdpa != max(before) + 1:
        return None
    call = fwd.sdpa[rec.n_sdpa - 1]
    a = call.args
    q, k, v = a.get("query"), a.get("key"), a.get("value")
    ok = (
        all(isinstance(t, Tensor) for t in (q, k, v))
        and q.dim() == 4
        and q.shape[0] == 1
        and q.shape[-2] == fwd.T  # type: ignore[union-attr]
        and k.shape == v.shape  # type: ignore[union-attr]
        and _heads_match(q, k, bool(a.get("enable_gqa")))  # type: ignore[arg-type]
        and a.get("attn_mask") is None
        and not a.get("dropout_p")
    )
    return call if ok else None


def _heads_match(q: Tensor, k: Tensor, gqa: bool) -> bool:
    """Same shape, or (grouped-query attention) k/v heads dividing q's."""
    if q.shape == k.shape:
        return True
    same_rest = q.shape[:1] == k.shape[:1] and q.shape[2:] == k.shape[2:]
    return gqa and same_rest and q.shape[1] % k.shape[1] == 0


def _push_forward(inp: Tensor, src: _Group, tab: _SrcTable) -> Tensor | None:
    """Write directions of ``src`` carried to attention input ``inp`` (1, H, T, dh) through the
    position-wise map between them (RoPE, head split): (T, A, H, dh). Uses J v = ∂(Jᵀu · v)/∂u."""
    assert src.out is not None
    u = torch.zeros_like(inp, requires_grad=True)
    (jt_u,) = torch.autograd.grad(
        inp, src.out, u, retain_graph=True, create_graph=True, allow_unused=True
    )
    if jt_u is None:
        return None
    A = tab.dirs.shape[1]
    tangents = tab.dirs.transpose(0, 1).reshape(A, *src.out.shape)  # row a: rank a at every pos
    (jv,) = torch.autograd.grad(jt_u, u, tangents, is_grads_batched=True)  # (A, 1, H, T, dh)
    return jv[:, 0].permute(2, 0, 1, 3)


def _attn(
    tgt: _Group,
    sources: list[_Group],
    tables: list[_SrcTable],
    T: int,
    edges: _Edges,
    tick: Callable[[int], None],
    call: _SDPA,
    topology: Topology,
) -> bool:
    """``o`` targets of a block with q/k/v decomposed. Per block: the gradient of each target at
    the recorded attention output (one target per position per row), and the q/k/v write
    directions carried to attention's inputs. Per target row, attention's backward is written
    out for its query alone (O(T d)). Returns False (having emitted nothing) if o's input does
    not read query p's attention output at position p alone, or q/k/v do not feed attention."""
    assert tgt.root is not None and tgt.read is not None and tgt.module is not None
    a = call.args
    q, k, v = a["query"], a["key"], a["value"]  # (1, H, T, dh), graph-connected
    qd, kd, vd = q.detach()[0], k.detach()[0], v.detach()[0]  # (H, T, dh); k, v: (Hkv, T, dh)
    H, dh = qd.shape[0], qd.shape[-1]
    rep = H // kd.shape[0]  # query heads per key/value head (grouped-query attention)
    kd, vd = kd.repeat_interleave(rep, 0), vd.repeat_interleave(rep, 0)
    scale = a.get("scale") or dh**-0.5
    causal = bool(a.get("is_causal"))
    which = {s.module: i for i, s in enumerate(sources)}
    mods = _qkv_modules(topology, tgt.name)
    if mods is None or any(m not in which for m in mods):
        return False
    qkv = [which[m] for m in mods]
    fused = len(set(mods)) == 1  # one qkv matrix: its nodes get q, k and v contributions
    # gradient at the attention output per target node: (n, H, dh)
    rank = _rank_in_pos(tgt, T)
    gz = tgt.read.new_zeros(tgt.n, H, dh)
    for r0 in range(0, int(rank.max()) + 1, _CHUNK):
        sel = (rank >= r0) & (rank < r0 + _CHUNK)
        rows = int((rank[sel] - r0).max()) + 1
        rr, pp = rank[sel] - r0, tgt.pos[sel]
        G = tgt.read.new_zeros(rows, T, tgt.read.shape[-1])
        G[rr, pp] = tgt.read[sel]
        (g,) = _batched_grad(tgt.root, [call.out], G)  # (rows, 1, H, T, dh)
        if g is None or g.shape[1:] != q.shape:
            return False
        gz[sel] = g[rr, 0, :, pp]
        g[rr, 0, :, pp] = 0
        if g.any():
            return False
    dirs_in = [_push_forward(t, sources[i], tables[i]) for t, i in zip((q, k, v), qkv, strict=True)]
    if any(d is None for d in dirs_in):
        return False
    din_q, din_k, din_v = dirs_in  # (T, A, H, dh) each (k, v: Hkv heads)
    assert din_q is not None and din_k is not None and din_v is not None
    din_k, din_v = din_k.repeat_interleave(rep, 2), din_v.repeat_interleave(rep, 2)
    s = torch.einsum("hpd,htd->hpt", qd, kd) * scale
    if causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=s.device).triu(1), -torch.inf)
    P = s.softmax(-1)  # (H, T query, T key)
    # per alive node (flat, in node order): directions (n, H, dh), positions, node indices
    flat = []
    for din, i in zip((din_q, din_k, din_v), qkv, strict=True):
        grp = sources[i]
        flat.append((din[grp.pos, _rank_in_pos(grp, T)], grp.pos, grp.nodes()))
    (dq_n, pos_q, node_q), (dk_n, pos_k, node_k), (dv_n, pos_v, node_v) = flat
    q_end = torch.searchsorted(pos_q, torch.arange(1, T + 1, device=pos_q.device)).tolist()
    k_end = torch.searchsorted(pos_k, torch.arange(1, T + 1, device=pos_k.device)).tolist()
    v_end = torch.searchsorted(pos_v, torch.arange(1, T + 1, device=pos_v.device)).tolist()
    dq_n = dq_n.flatten(1) * scale  # (n_q, H dh)
    dk_h = dk_n.permute(1, 2, 0)  # (H, dh, n_k)
    dv_h = dv_n.permute(1, 2, 0)
    gz_h = gz.transpose(0, 1)  # (H, n, dh)
    counts = torch.bincount(tgt.pos, minlength=T).tolist()
    start = 0
    for p, R in enumerate(counts):
        if not R:
            continue
        sl = slice(start, start + R)
        start += R
        t = p + 1 if causal else T
        q0, q1 = q_end[p - 1] if p else 0, q_end[p]
        ck, cv = (k_end[p], v_end[p]) if causal else (len(pos_k), len(pos_v))
        g = gz_h[:, sl]  # (H, R, dh): each row's gradient at query p's attention output
        Pp = P[:, p, None, :t]  # (H, 1, t)
        dP = torch.bmm(g, vd[:, :t].transpose(1, 2))  # (H, R, t)
        dS = Pp * (dP - (Pp * dP).sum(-1, keepdim=True))  # ∂ value / ∂ score[h, p, t]
        dq = torch.bmm(dS, kd[:, :t]).transpose(0, 1).reshape(R, -1)  # (R, H dh), unscaled
        qk = torch.bmm(qd[:, p, None] * scale, dk_h[:, :, :ck])  # (H, 1, ck): ∂ score / ∂ dir
        D = g.new_empty(R, q1 - q0 + ck + cv)
        torch.mm(dq, dq_n[q0:q1].T, out=D[:, : q1 - q0])
        torch.sum(dS.index_select(2, pos_k[:ck]) * qk, dim=0, out=D[:, q1 - q0 : q1 - q0 + ck])
        Y = torch.bmm(g, dv_h[:, :, :cv])  # (H, R, cv)
        torch.sum(Y * P[:, p].index_select(1, pos_v[:cv])[:, None], dim=0, out=D[:, q1 - q0 + ck :])
        if fused:  # the same nodes read as q (position p), k and v: one column per node
            nq = q1 - q0
            Df = D[:, nq : nq + ck] + D[:, nq + ck :]
            Df[:, q0:q1] += D[:, :nq]
            _emit_rows(edges, tgt.nodes(sl), [(Df, node_k[:ck])])
        else:
            src = torch.cat([node_q[q0:q1], node_k[:ck], node_v[:cv]])
            _emit_rows(edges, tgt.nodes(sl), [(D, src)])
        tick(R)
    return True


def _modes(cm: ComponentModel, topology: Topology, T: int) -> dict[str, Mode]:
    """Backward strategy per target module path (``"output"`` for the logits)."""
    targets = [*cm.layer_names, "output"]
    if T == 1:
        return dict.fromkeys(targets, "local")
    n = topology.n_blocks
    if n == 0:  # not a transformer: nothing known about how positions mix
        return dict.fromkeys(targets, "general")

    def decomposed(b: int, kind: str, matrix: str) -> bool:
        mod = topology.module_of(str(BlockLayer(b, kind, matrix)))
        return mod is not None and mod in cm.Cs

    sealed = [decomposed(b, "attn", "o") for b in range(n)]  # attention mixes only into o

    def qkv_decomposed(b: int) -> bool:
        names = topology.qkv_layers(b)
        return names is not None and all(topology.module_of(x) in cm.Cs for x in names)

    qkv = [qkv_decomposed(b) for b in range(n)]
    modes: dict[str, Mode] = {}
    for name in targets:
        role = BlockLayer.parse(topology.to_canonical(name)) if name != "output" else None
        if role is None:  # output logits (or an embedding, never a target)
            modes[name] = "local" if all(sealed) else "general"
            continue
        b = role.block
        if role.kind == "attn" and role.matrix == "o":
            modes[name] = "attn" if qkv[b] else "general"
        else:
            upto = b if role.kind == "attn" else b + 1
            modes[name] = "local" if all(sealed[:upto]) else "general"
    return modes


@torch.enable_grad()
def compute_graph(
    cm: ComponentModel,
    topology: Topology,
    ids: Tensor | list[int],
    ci: dict[str, Tensor],
    *,
    ci_threshold: float = 0.0,
    output_positions: list[int] | None = None,
    top_k_outputs: int = 5,
    cum_prob: float | None = None,
    label_token: int | None = None,
    edge_threshold: float = 0.0,
    max_edges: int | None = None,
    progress: Progress | None = None,
    remainder_nodes: int = 256,
) -> AttributionGraph:
    """Attribution graph of one prompt with batched backward passes (see module docstring).

    ids: (T,) token ids, or a (d,) float input vector for positionless toy models (T = 1).
    ci: module path (or canonical name) → (T, C) CI; a node is alive where ci > ci_threshold.
    output_positions: positions with output nodes (default: the last); top_k_outputs tokens by
        target probability (softmax of the output; for a toy model, of its output vector), cut
        where the cumulative probability reaches ``cum_prob``, plus ``label_token``.
    Edges with value 0 or |value| < edge_threshold are dropped; then the ``max_edges`` largest
    |value| are kept. ``progress(done, total)`` counts target nodes.
    ``node_parts`` (remainders) are computed for the output nodes and the ``remainder_nodes``
    component nodes with the largest total |edge| (one extra backward row per node).
    """
    fwd, groups = _build(
        cm, topology, ids, ci, ci_threshold, output_positions, top_k_outputs, cum_prob, label_token
    )
    T = fwd.T
    modes = _modes(cm, topology, T)
    edges = _Edges(edge_threshold, groups, max_edges)
    total = sum(g.n for g in groups if g.is_target)
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    tables: list[_SrcTable] = []
    for k, tgt in enumerate(groups):
        if tgt.is_target and tgt.n and k:
            sources = groups[:k]
            mode = modes[tgt.module or "output"]
            if mode == "local":
                _local(tgt, sources, tables, T, edges, tick)
            elif mode == "general":
                _per_node(tgt, sources, tables, T, edges, tick)
            else:
                call = _attn_call(fwd, tgt, topology)
                if call is None or not _attn(tgt, sources, tables, T, edges, tick, call,
                                             topology):
                    _per_node(tgt, sources, tables, T, edges, tick)
        if tgt.out is not None:
            tables.append(_src_table(tgt, T))
    g = _finish(fwd, groups, edges, max_edges)
    _add_parts(cm, fwd, groups, g, remainder_nodes)
    return g


# ---------------------------------------------------------------------------------- reference
def compute_graph_reference(
    cm: ComponentModel,
    topology: Topology,
    ids: Tensor | list[int],
    ci: dict[str, Tensor],
    *,
    ci_threshold: float = 0.0,
    output_positions: list[int] | None = None,
    top_k_outputs: int = 5,
    cum_prob: float | None = None,
    label_token: int | None = None,
    edge_threshold: float = 0.0,
    max_edges: int | None = None,
    progress: Progress | None = None,
) -> AttributionGraph:
    """The same graph with one backward pass per target node w.r.t. all leaves (slow)."""
    return reference_graph_for(
        cm,
        topology,
        ids,
        ci,
        None,
        ci_threshold=ci_threshold,
        output_positions=output_positions,
        top_k_outputs=top_k_outputs,
        cum_prob=cum_prob,
        label_token=label_token,
        edge_threshold=edge_threshold,
        max_edges=max_edges,
        progress=progress,
    )


@torch.enable_grad()
def reference_graph_for(
    cm: ComponentModel,
    topology: Topology,
    ids: Tensor | list[int],
    ci: dict[str, Tensor],
    targets: Tensor | None,
    *,
    ci_threshold: float = 0.0,
    output_positions: list[int] | None = None,
    top_k_outputs: int = 5,
    cum_prob: float | None = None,
    label_token: int | None = None,
    edge_threshold: float = 0.0,
    max_edges: int | None = None,
    progress: Progress | None = None,
) -> AttributionGraph:
    """:func:`compute_graph_reference` with only the edges into ``targets`` (node indices; None:
    all); every node is returned. Lets benchmarks time the reference on a sample of targets."""
    fwd, groups = _build(
        cm, topology, ids, ci, ci_threshold, output_positions, top_k_outputs, cum_prob, label_token
    )
    T = fwd.T
    edges = _Edges(edge_threshold, groups)
    wanted = None if targets is None else set(torch.as_tensor(targets).tolist())
    total = sum(g.n for g in groups if g.is_target) if wanted is None else len(wanted)
    done = 0
    for k, tgt in enumerate(groups):
        if not (tgt.is_target and tgt.n and k):
            continue
        if tgt.module is None:
            values = fwd.logits
        else:
            values = cm.component(tgt.module).component_acts(fwd.recs[tgt.module].x)
        values = values.reshape(T, -1)
        sources = [s for s in groups[:k] if s.leaf is not None and s.n]
        leaves: list[Tensor] = [s.leaf for s in sources]  # type: ignore[misc]
        for i, (p, c) in enumerate(zip(tgt.pos.tolist(), tgt.idx.tolist(), strict=True)):
            if wanted is not None and tgt.offset + i not in wanted:
                continue
            grads = torch.autograd.grad(values[p, c], leaves, retain_graph=True, allow_unused=True)
            for s, g in zip(sources, grads, strict=True):
                if g is None:
                    continue
                g = g.reshape(T, -1)
                if s.module is None:  # embed: grad · embedding vector
                    val = (g * s.leaf.detach().reshape(T, -1)).sum(-1)[s.pos]  # type: ignore[union-attr]
                else:
                    val = g[s.pos, s.idx] * s.act
                keep = edges.keep(val)
                src = s.nodes()[keep]
                edges.push(src, torch.full_like(src, tgt.offset + i), val[keep])
            done += 1
            if progress is not None:
                progress(done, total)
    return _finish(fwd, groups, edges, max_edges)
