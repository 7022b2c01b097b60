"""Rank-1 subcomponents of one weight matrix.

Conventions (DESIGN §3): a linear weight W is (d_out, d_in) as in ``nn.Linear``; its C subcomponents
are V ∈ R^{d_in×C} (read directions, columns) and U ∈ R^{C×d_out} (write directions, rows), with
W ≈ (V U)ᵀ. The component activation is a = x V. An embedding (vocab, d) has V ∈ R^{vocab×C} indexed
by token id and W ≈ V U. Biases are never decomposed: they are copied frozen and added unmasked.

The masked forward is  y = ((x V) ⊙ m) U + m_δ · (x Δᵀ) + b  with Δ = W − (V U)ᵀ the weight delta.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

LayerKind = Literal["linear", "embedding"]


class Components(nn.Module):
    """Base: V, U and a frozen copy of the target's bias; subclasses define how inputs are read."""

    kind: LayerKind

    def __init__(self, d_in: int, d_out: int, C: int, bias: Tensor | None) -> None:
        super().__init__()
        assert C > 0, f"C must be positive, got {C}"
        self.d_in, self.d_out, self.C = d_in, d_out, C
        self.V = nn.Parameter(torch.empty(d_in, C))
        self.U = nn.Parameter(torch.empty(C, d_out))
        nn.init.normal_(self.V, std=1 / math.sqrt(d_out))
        nn.init.normal_(self.U, std=1 / math.sqrt(C))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def target_shaped(self, VU: Tensor) -> Tensor:
        """Lay out a (d_in, d_out) product the way the target stores its weight."""
        raise NotImplementedError

    def weight(self) -> Tensor:
        """The reconstructed weight (V U) in the target's layout."""
        return self.target_shaped(self.V @ self.U)

    def component_weights(self) -> Tensor:
        """(C, *target weight shape): the rank-1 matrix of each component."""
        per = torch.einsum("ic,co->cio", self.V, self.U)  # (C, d_in, d_out)
        return per.transpose(1, 2) if self.kind == "linear" else per

    def component_acts(self, x: Tensor) -> Tensor:
        """Component activations (..., C) for this layer's input."""
        raise NotImplementedError

    def delta_out(self, x: Tensor, delta: Tensor) -> Tensor:
        """Contribution (..., d_out) of the weight delta for input x."""
        raise NotImplementedError

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        *,
        delta: Tensor | None = None,
        delta_mask: Tensor | float | None = None,
        acts: Tensor | None = None,
    ) -> Tensor:
        """Masked component forward; ``mask`` (..., C) defaults to all ones.

        ``delta`` (the weight delta), when given, is scaled by ``delta_mask`` (...) (default 1).
        ``acts`` lets callers pass precomputed (possibly leaf) component activations.
        """
        a = self.component_acts(x) if acts is None else acts  # (..., C)
        if mask is not None:
            a = a * mask
        out = a @ self.U  # (..., d_out)
        if delta is not None:
            d = self.delta_out(x, delta)  # (..., d_out)
            if isinstance(delta_mask, Tensor):
                d = d * delta_mask.unsqueeze(-1)
            elif delta_mask is not None:
                d = d * delta_mask
            out = out + d
        if self.bias is not None:
            out = out + self.bias
        return out


class LinearComponents(Components):
    kind: LayerKind = "linear"

    @classmethod
    def for_module(cls, module: nn.Linear, C: int) -> LinearComponents:
        return cls(module.in_features, module.out_features, C, module.bias)

    def target_shaped(self, VU: Tensor) -> Tensor:
        return VU.T  # (d_out, d_in)

    def component_acts(self, x: Tensor) -> Tensor:
        return x @ self.V  # (..., C)

    def delta_out(self, x: Tensor, delta: Tensor) -> Tensor:
        return x @ delta.T  # (..., d_out)


class Conv1DComponents(LinearComponents):
    """A ``transformers`` ``Conv1D`` (GPT-2): the weight is stored (d_in, d_out) and the layer
    computes x W + b. Components read and write exactly as for a Linear; only the weight layout
    differs."""

    @classmethod
    def for_conv1d(cls, module: nn.Module, C: int) -> Conv1DComponents:
        d_in, d_out = module.weight.shape
        return cls(d_in, d_out, C, module.bias)

    def target_shaped(self, VU: Tensor) -> Tensor:
        return VU  # (d_in, d_out)

    def component_weights(self) -> Tensor:
        return torch.einsum("ic,co->cio", self.V, self.U)  # (C, d_in, d_out)

    def delta_out(self, x: Tensor, delta: Tensor) -> Tensor:
        return x @ delta  # (..., d_out)


def is_conv1d(module: nn.Module) -> bool:
    """A ``transformers.pytorch_utils.Conv1D`` (checked without importing transformers)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_decomposable(module: nn.Module) -> bool:
    """Whether SPD can decompose this module: nn.Linear, nn.Embedding or a GPT-2 Conv1D."""
    return isinstance(module, nn.Linear | nn.Embedding) or is_conv1d(module)


class EmbeddingComponents(Components):
    """Embedding table (vocab, d): d_in is the vocabulary size, input is token ids."""

    kind: LayerKind = "embedding"

    def __init__(self, vocab: int, d_embed: int, C: int) -> None:
        super().__init__(vocab, d_embed, C, bias=None)

    @classmethod
    def for_module(cls, module: nn.Embedding, C: int) -> EmbeddingComponents:
        return cls(module.num_embeddings, module.embedding_dim, C)

    def target_shaped(self, VU: Tensor) -> Tensor:
        return VU  # (vocab, d)

    def component_acts(self, x: Tensor) -> Tensor:
        return self.V[x]  # (..., C) for ids (...)

    def delta_out(self, x: Tensor, delta: Tensor) -> Tensor:
        return delta[x]  # (..., d)


def components_for(module: nn.Module, C: int) -> Components:
    """Build components matching a target module (nn.Linear, nn.Embedding or Conv1D)."""
    if isinstance(module, nn.Linear):
        return LinearComponents.for_module(module, C)
    if isinstance(module, nn.Embedding):
        return EmbeddingComponents.for_module(module, C)
    if is_conv1d(module):
        return Conv1DComponents.for_conv1d(module, C)
    raise TypeError(
        f"cannot decompose {type(module).__name__}: only nn.Linear, nn.Embedding and "
        "transformers' Conv1D are supported"
    )
