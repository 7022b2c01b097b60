"""Causal-importance functions: map a layer's clean input to CI pre-activations z (..., C).

Variants (DESIGN §3):
- ``mlp``: one tiny scalar MLP per component, input its own activation a_c.
- ``vector_mlp``: one MLP per component, input the layer's full input x (..., d_in).
- ``shared_mlp``: one MLP per layer, d_in → hidden → C.
- ``global_shared_mlp``: one MLP over the concatenated inputs of every decomposed layer → Σ C.
Embedding layers have token ids as input, so every variant feeds them their component activations.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CIFnType = Literal["mlp", "vector_mlp", "shared_mlp", "global_shared_mlp"]


def _param(*shape: int, fan_in: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * math.sqrt(2.0 / fan_in))


class PerComponentMLP(nn.Module):
    """C independent MLPs evaluated in one batched einsum; input width ``d_in`` (1 for scalar)."""

    def __init__(self, C: int, d_in: int, hidden: list[int]) -> None:
        super().__init__()
        widths = [d_in, *hidden]
        self.weights = nn.ParameterList(
            [_param(C, a, b, fan_in=a) for a, b in itertools.pairwise(widths)]
        )
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(C, b)) for b in hidden])
        self.w_out = _param(C, widths[-1], fan_in=widths[-1])
        self.b_out = nn.Parameter(torch.zeros(C))

    def forward(self, h: Tensor, *, shared_input: bool = False) -> Tensor:
        """h: (..., C, d_in), or (..., d_in) read by every component when ``shared_input``.

        Returns z: (..., C).
        """
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            if i == 0 and shared_input:
                h = torch.einsum("...i,cih->...ch", h, w)  # (..., C, hidden)
            elif i == 0 and h.shape[-1] == 1:
                h = h * w[:, 0]  # scalar input: a broadcast multiply beats a batched matmul
            else:
                h = torch.einsum("...ci,cih->...ch", h, w)  # (..., C, hidden)
            h = F.gelu(h + b)
        if shared_input and not self.biases:
            return torch.einsum("...h,ch->...c", h, self.w_out) + self.b_out
        return (h * self.w_out).sum(-1) + self.b_out  # (..., C)


class SharedMLP(nn.Module):
    def __init__(self, d_in: int, hidden: list[int], d_out: int) -> None:
        super().__init__()
        widths = [d_in, *hidden, d_out]
        self.layers = nn.ModuleList(
            [nn.Linear(a, b) for a, b in itertools.pairwise(widths)]
        )

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.gelu(x)
        return x


def _safe(name: str) -> str:
    return name.replace(".", "__")


class CIFunctions(nn.Module):
    """All layers' CI functions; ``forward`` returns pre-activations per layer."""

    def __init__(
        self,
        fn_type: CIFnType,
        hidden: list[int],
        layers: dict[str, tuple[int, int, bool]],
    ) -> None:
        """``layers``: name → (d_in, C, is_embedding)."""
        super().__init__()
        self.fn_type = fn_type
        self.layer_names = list(layers)
        self.Cs = {n: C for n, (_, C, _) in layers.items()}
        self.is_embedding = {n: emb for n, (_, _, emb) in layers.items()}
        width = {n: (C if emb else d_in) for n, (d_in, C, emb) in layers.items()}
        if fn_type == "global_shared_mlp":
            self.global_mlp = SharedMLP(sum(width.values()), hidden, sum(self.Cs.values()))
            return
        fns = {}
        for n, (_, C, emb) in layers.items():
            if fn_type == "mlp" or (emb and fn_type == "vector_mlp"):
                fns[_safe(n)] = PerComponentMLP(C, 1, hidden)
            elif fn_type == "vector_mlp":
                fns[_safe(n)] = PerComponentMLP(C, width[n], hidden)
            elif fn_type == "shared_mlp":
                fns[_safe(n)] = SharedMLP(width[n], hidden, C)
            else:
                raise ValueError(f"unknown CI function type {fn_type!r}")
        self.fns = nn.ModuleDict(fns)

    def _input(self, name: str, x: Tensor, acts: Tensor) -> Tensor:
        return acts if self.is_embedding[name] else x

    def forward(self, inputs: dict[str, Tensor], acts: dict[str, Tensor]) -> dict[str, Tensor]:
        """inputs: layer → clean input (..., d_in) (ids for embeddings); acts: layer → (..., C)."""
        if self.fn_type == "global_shared_mlp":
            xs = [self._input(n, inputs[n], acts[n]) for n in self.layer_names]
            z = self.global_mlp(torch.cat(xs, dim=-1))  # (..., ΣC)
            return dict(zip(self.layer_names, z.split(list(self.Cs.values()), -1), strict=True))
        out = {}
        for n in self.layer_names:
            fn = self.fns[_safe(n)]
            a = acts[n]
            if isinstance(fn, PerComponentMLP):
                if self.fn_type == "mlp" or self.is_embedding[n]:
                    out[n] = fn(a.unsqueeze(-1))  # scalar input (..., C, 1)
                else:
                    out[n] = fn(inputs[n], shared_input=True)  # full input (..., d_in)
            else:
                out[n] = fn(self._input(n, inputs[n], a))
        return out
