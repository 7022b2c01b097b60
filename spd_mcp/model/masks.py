"""Masks m = g + (1 − g)·s from causal importances g and a source s, and layer routing.

Sources: ``continuous`` s ~ U(0, 1); ``binomial`` s ~ Bernoulli(½); ``ci`` s = 0 (CI-masking);
adversarial sources come from PGD (``spd_mcp.model.pgd``). The weight delta has its own per-position
scalar mask m_δ = s_δ (its CI is 0). Routing picks which layers run through components.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

SourceKind = Literal["continuous", "binomial"]


def sample_like(t: Tensor, kind: SourceKind) -> Tensor:
    if kind == "continuous":
        return torch.rand_like(t)
    if kind == "binomial":
        return torch.randint_like(t, 0, 2)
    raise ValueError(f"unknown source kind {kind!r}; expected 'continuous' or 'binomial'")


def masks_from_sources(ci: dict[str, Tensor], sources: dict[str, Tensor]) -> dict[str, Tensor]:
    """m = g + (1 − g)·s per layer (s broadcasts, so shared (C,) sources work)."""
    return {n: g + (1 - g) * sources[n] for n, g in ci.items()}


def stochastic_masks(ci: dict[str, Tensor], kind: SourceKind) -> dict[str, Tensor]:
    return masks_from_sources(ci, {n: sample_like(g, kind) for n, g in ci.items()})


def delta_masks(ci: dict[str, Tensor], kind: SourceKind) -> dict[str, Tensor]:
    """Per-position delta masks (...) sampled from the same source distribution."""
    return {n: sample_like(g[..., 0], kind) for n, g in ci.items()}


def ones_masks(ci: dict[str, Tensor]) -> dict[str, Tensor]:
    return {n: torch.ones_like(g) for n, g in ci.items()}


RoutingKind = Literal["all", "layerwise", "subset"]


def route_sets(
    kind: RoutingKind, layers: list[str], sample: int | None = None
) -> list[list[str]]:
    """Layer sets for one loss evaluation: all layers at once, or one layer at a time
    (``sample`` of them, drawn uniformly without replacement, when given)."""
    if kind == "all" or kind == "subset":
        return [list(layers)]
    if kind == "layerwise":
        if sample is not None and sample < len(layers):
            picks = torch.randperm(len(layers))[:sample].sort().values.tolist()
            return [[layers[i]] for i in picks]
        return [[n] for n in layers]
    raise ValueError(f"unknown routing {kind!r}")


def subset_routes(layers: list[str], leading: tuple[int, ...], device: torch.device) -> dict[
    str, Tensor
]:
    """Per datapoint, a uniformly random non-empty subset of layers: k ~ U{1..L}, then k layers."""
    L = len(layers)
    rank = torch.rand(*leading, L, device=device).argsort(-1).argsort(-1)  # (..., L) random ranks
    k = torch.randint(1, L + 1, leading, device=device)  # (...)
    routed = rank < k.unsqueeze(-1)  # (..., L)
    return {n: routed[..., i] for i, n in enumerate(layers)}
