"""The batched leaf forward behind dataset attributions, and its piecewise batched backward.

Leaf semantics as in :mod:`spd_mcp.analysis.graph`: the exact target forward where each
decomposed layer writes ``a U + const`` with its component activations ``a`` cut into leaves and
the weight-delta term a constant, so a gradient w.r.t. a leaf is a direct effect.

``is_grads_batched`` runs on the legacy vmap, which loops over rows (and stacks the results) for
ops without a batching rule — gelu_backward, softmax backward, CPU flash-attention backward. With
``fast=True`` the forward is rewritten so that no such op is on a backward path, values unchanged:

- an elementwise activation f becomes ``f(x) + f'(x) · (x − x̄)`` (x̄ = x detached);
- each attention call's output becomes a fresh leaf ``z``; the backward reaching ``z`` is carried
  to the call's q / k / v by hand (:func:`_attn_vjp`, from the probabilities P saved in the
  forward) and continues from there. When the gradient at ``z`` is the same vector at every valid
  query (the case of a target summed over positions that reads z position-wise, e.g. an ``o``
  layer), no per-row T x T tensor is formed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from spd_mcp.model.component_model import ComponentModel
from spd_mcp.model.topology import Topology

from .config import AttributionError

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_UNARY = (F.gelu, F.silu, F.relu, torch.tanh, torch.sigmoid)


@dataclass
class Layer:
    """A decomposed layer: global component offset, and what the forward recorded."""

    module: str
    canonical: str
    offset: int
    C: int
    x: Tensor | None = None  # layer input (graph-connected)
    leaf: Tensor | None = None  # component activations, a leaf (B, T, C)
    out: Tensor | None = None  # a U + const: graph-connected to the leaf only


@dataclass
class Attn:
    """One attention call, cut: ``z`` is a leaf standing for its output."""

    q: Tensor
    k: Tensor
    v: Tensor
    P: Tensor  # (B, H, T, S) attention probabilities, detached
    scale: float
    z: Tensor


@dataclass
class Forward:
    layers: list[Layer]  # decomposed layers in forward order
    embed: Tensor | None  # embedding output leaf (B, T, d) when the embedding is not decomposed
    head_in: Tensor | None  # the unembedding's input (B, T, d) when it is a plain Linear
    logits: Tensor  # (B, T, V)
    attns: list[Attn] = field(default_factory=list)


def layout(cm: ComponentModel, topology: Topology) -> list[Layer]:
    """Decomposed layers in forward (topology) order with global component offsets."""
    order = {m: i for i, m in enumerate(topology.module_paths)}
    for m in cm.layer_names:
        if m not in order:
            raise AttributionError(f"decomposed layer {m!r} is not in the topology")
        if topology.to_canonical(m) == "output":
            raise AttributionError(f"the output layer {m!r} is decomposed: unsupported")
    out, offset = [], 0
    for m in sorted(cm.layer_names, key=order.__getitem__):
        out.append(Layer(m, topology.to_canonical(m), offset, cm.Cs[m]))
        offset += cm.Cs[m]
    return out


def head_module(cm: ComponentModel, topology: Topology) -> nn.Linear | None:
    if "output" not in topology:
        return None
    mod = cm.target.get_submodule(topology.to_module("output"))
    return mod if isinstance(mod, nn.Linear) else None


def embed_module(cm: ComponentModel, topology: Topology) -> str | None:
    """Module path of the embedding when it exists and is not decomposed."""
    if "embed" not in topology:
        return None
    m = topology.to_module("embed")
    return None if m in cm.Cs else m


# ---------------------------------------------------------------------------- rewriting mode
def _lin_unary(func: Callable, args: tuple, kwargs: dict) -> Tensor:
    x = args[0]
    with torch.enable_grad():
        xd = x.detach().requires_grad_(True)
        y = func(xd, *args[1:], **kwargs)
        (d,) = torch.autograd.grad(y, xd, torch.ones_like(y))
    return y.detach() + d * (x - x.detach())


def _cut_attention(func: Callable, args: tuple, kwargs: dict, attns: list[Attn]) -> Tensor | None:
    a = {**dict(zip(_SDPA_ARGS, args, strict=False)), **kwargs}
    q, k, v, mask = a.get("query"), a.get("key"), a.get("value"), a.get("attn_mask")
    if a.get("dropout_p") or a.get("enable_gqa") or not all(
        isinstance(t, Tensor) and t.dim() == 4 for t in (q, k, v)
    ):
        return None
    assert isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
    out = func(*args, **kwargs).detach()
    scale = float(a.get("scale") or q.shape[-1] ** -0.5)
    with torch.no_grad():
        s = (q @ k.transpose(-2, -1)) * scale
        T, S = s.shape[-2:]
        if a.get("is_causal"):
            keep = torch.ones(T, S, dtype=torch.bool, device=s.device).tril()
            s = s.masked_fill(~keep, -torch.inf)
        if mask is not None:
            s = s.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else s + mask
        P = s.softmax(-1).nan_to_num()
    z = out.requires_grad_(True)
    attns.append(Attn(q, k, v, P, scale, z))
    return z


class _Rewrite(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.attns: list[Attn] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        grad = any(isinstance(t, Tensor) and t.requires_grad
                   for t in (*args, *kwargs.values()))
        if grad and func in _UNARY and args and isinstance(args[0], Tensor):
            return _lin_unary(func, args, kwargs)
        if grad and func is F.scaled_dot_product_attention:
            z = _cut_attention(func, args, kwargs, self.attns)
            if z is not None:
                return z
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------- forward
def leaf_forward(cm: ComponentModel, topology: Topology, ids: Tensor, *,
                 fast: bool = True) -> Forward:
    """Exact target forward on ids (B, T) with leaves cut (``fast``: rewritten, see module)."""
    layers = layout(cm, topology)
    got: dict[str, Tensor] = {}

    def layer_hook(lay: Layer):
        comp = cm.component(lay.module)

        def hook(_m: nn.Module, args: tuple, target_out: Tensor) -> Tensor:
            x = args[0]
            with torch.no_grad():
                leaf = comp.component_acts(x)
            leaf.requires_grad_(True)
            y = comp(x, acts=leaf)
            lay.x, lay.leaf = x, leaf
            lay.out = target_out.detach() + (y - y.detach())  # weight delta: a constant
            return lay.out

        return hook

    def embed_hook(_m: nn.Module, _a: tuple, out: Tensor) -> Tensor:
        got["embed"] = out.detach().requires_grad_(True)
        return got["embed"]

    def head_hook(_m: nn.Module, args: tuple) -> None:
        got["head_in"] = args[0]

    tgt = cm.target
    handles = [tgt.get_submodule(lay.module).register_forward_hook(layer_hook(lay))
               for lay in layers]
    if (emb := embed_module(cm, topology)) is not None:
        handles.append(tgt.get_submodule(emb).register_forward_hook(embed_hook))
    if (head := head_module(cm, topology)) is not None:
        handles.append(head.register_forward_pre_hook(head_hook))
    mode = _Rewrite()
    try:
        with torch.enable_grad():
            if fast:
                with mode:
                    logits = tgt(ids)
            else:
                logits = tgt(ids)
    finally:
        for h in handles:
            h.remove()
    if logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise AttributionError(
            f"dataset attributions need a sequence model with logits (B, T, V); got "
            f"{tuple(logits.shape)} for ids {tuple(ids.shape)}"
        )
    return Forward(layers, got.get("embed"), got.get("head_in"), logits, mode.attns)


# --------------------------------------------------------------------------------- backward
def _wide(P: Tensor, X: Tensor) -> Tensor:
    """P (B, H, T, S) @ X (R, B, H, S, e) → (R, B, H, T, e) as one matmul (rows into columns)."""
    R, B, H, S, e = X.shape
    Y = P @ X.permute(1, 2, 3, 0, 4).reshape(B, H, S, R * e)
    return Y.reshape(B, H, P.shape[-2], R, e).permute(3, 0, 1, 2, 4)


def _attn_vjp(a: Attn, gz: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) for rows of gradients gz (R, B, H, T, dh) at the attention output."""
    q, k, v, P = a.q.detach(), a.k.detach(), a.v.detach(), a.P
    m = mask.to(gz.dtype)[None, :, None, :, None]  # (1, B, 1, T, 1)
    gamma = gz[:, :1, :, :1]  # (R, 1, H, 1, dh): the vector at b = 0, p = 0
    if q.shape[-2] == mask.shape[1] and torch.equal(gz, gamma * m):
        # gz[r, b, h, p] = γ[r, h] m[b, p]: u = v·γ, ū = P u; no (R, T, T) tensor.
        c = (P * m[0, :, :, :, 0, None]).sum(-2)  # (B, H, S): Σ_p m[p] P[p, p']
        dv = c[None, ..., None] * gamma
        u = torch.einsum("bhse,rhe->rbhs", v, gamma[:, 0, :, 0])  # (R, B, H, S)
        ubar = torch.einsum("bhts,rbhs->rbht", P, u)  # (R, B, H, T)
        Pk = P @ k  # (B, H, T, dh)
        dq = a.scale * m * (_wide(P, u[..., None] * k) - ubar[..., None] * Pk)
        Ptq = P.transpose(-2, -1) @ (q * m[0])  # (B, H, S, dh)
        dk = a.scale * (u[..., None] * Ptq - _wide(P.transpose(-2, -1), ubar[..., None] * q * m))
        return dq, dk, dv
    dv = _wide(P.transpose(-2, -1), gz)
    dP = gz @ v.transpose(-2, -1)  # (R, B, H, T, S)
    ds = P * (dP - (P * dP).sum(-1, keepdim=True))
    return a.scale * (ds @ k), a.scale * (ds.transpose(-2, -1) @ q), dv


def batched_grads(root: Tensor, G: Tensor, sources: list[Tensor], attns: list[Attn],
                  mask: Tensor) -> list[Tensor | None]:
    """Rows G (R, *root.shape) pulled back from ``root`` to ``sources``, carrying gradients that
    reach a cut attention output through the call by hand (latest call first)."""
    n = len(sources)
    zs = [a.z for a in attns]
    grads = list(torch.autograd.grad(root, sources + zs, G, retain_graph=True, allow_unused=True,
                                     is_grads_batched=True))
    for i in range(len(attns) - 1, -1, -1):
        gz = grads[n + i]
        if gz is None or not gz.any():
            continue
        a = attns[i]
        outs, gouts = [], []
        for t, g in zip((a.q, a.k, a.v), _attn_vjp(a, gz, mask), strict=True):
            if t.requires_grad:
                outs.append(t)
                gouts.append(g)
        if not outs:
            continue
        more = torch.autograd.grad(outs, sources + zs[:i], gouts, retain_graph=True,
                                   allow_unused=True, is_grads_batched=True)
        for j, g in enumerate(more):
            if g is not None:
                grads[j] = g if grads[j] is None else grads[j] + g
    return grads[:n]
