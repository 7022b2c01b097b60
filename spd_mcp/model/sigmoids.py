"""Leaky hard sigmoids that squash CI pre-activations into [0, 1].

Two views of one pre-activation z:
- ``lower_leaky_hard_sigmoid`` (used for masks): forward is clamp(z, 0, 1). Its backward passes
  gradient inside (0, 1) and, below 0, a fraction ``alpha`` of any gradient that would *raise* z,
  so a component whose CI died (z < 0 everywhere) can still be revived by the reconstruction
  losses.
- ``upper_leaky_hard_sigmoid`` (used by the importance-minimality penalty): 0 below 0, z on [0, 1],
  1 + alpha * (z - 1) above 1, so the penalty keeps pushing values that overshoot 1.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _LowerLeakyHardSigmoid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, alpha: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(z)
        ctx.alpha = alpha
        return z.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (z,) = ctx.saved_tensors
        inside = (z >= 0) & (z <= 1)
        # Below zero only the part of the gradient that increases z (grad < 0 under descent) leaks.
        revive = (z < 0) & (grad < 0)
        out = torch.where(inside, grad, torch.zeros_like(grad))
        out = torch.where(revive, ctx.alpha * grad, out)
        return out, None


def lower_leaky_hard_sigmoid(z: Tensor, alpha: float = 0.01) -> Tensor:
    """clamp(z, 0, 1) whose backward lets a dead (z < 0) unit recover with slope ``alpha``."""
    return _LowerLeakyHardSigmoid.apply(z, alpha)


def upper_leaky_hard_sigmoid(z: Tensor, alpha: float = 0.01) -> Tensor:
    """0 below 0, identity on [0, 1], slope ``alpha`` above 1."""
    return torch.where(z > 1, 1 + alpha * (z - 1), z.clamp(min=0.0))
