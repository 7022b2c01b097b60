"""Per-layer diagnostics of a decomposition: L0, alive components, ‖Δ‖/‖W‖, reconstructions."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from spd_mcp.model.component_model import ComponentModel
from spd_mcp.model.losses import OutputLoss, output_divergence
from spd_mcp.model.masks import SourceKind, delta_masks, stochastic_masks


@torch.no_grad()
def alive_mask(ci_lower: dict[str, Tensor], threshold: float) -> dict[str, Tensor]:
    """Layer → (C,) bool: the component's CI exceeded ``threshold`` on some datapoint."""
    return {n: (g > threshold).flatten(0, -2).any(0) for n, g in ci_lower.items()}


def _masked_mean(v: Tensor, mask: Tensor | None) -> float:
    if mask is None:
        return v.mean().item()
    return ((v * mask).sum() / mask.sum().clamp_min(1)).item()


@torch.no_grad()
def delta_ratios(cm: ComponentModel) -> dict[str, float]:
    return {
        n: (cm.weight_delta(n).norm() / cm.target_weight(n).norm().clamp_min(1e-12)).item()
        for n in cm.layer_names
    }


@torch.no_grad()
def diagnose_batch(
    cm: ComponentModel,
    x: Tensor,
    *,
    output_loss: OutputLoss,
    sampling: SourceKind,
    alive_threshold: float,
    mask: Tensor | None = None,
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Diagnostics on one batch — recon under CI and stochastic masks, per-layer L0 / alive / Δ —
    and the per-layer (C,) alive masks behind the counts."""
    out, ci = cm.ci_for(x)
    ci_out = cm(x, masks=ci.lower)
    st_out = cm(
        x,
        masks=stochastic_masks(ci.lower, sampling),
        delta_masks=delta_masks(ci.lower, sampling),  # type: ignore[arg-type]
    )
    if mask is not None:  # padding positions neither count as firing nor enter L0
        ci.lower = {n: g * mask.unsqueeze(-1) for n, g in ci.lower.items()}
    alive = alive_mask(ci.lower, alive_threshold)
    ratios = delta_ratios(cm)
    layers = {
        n: {
            "l0": _masked_mean((g > 0).sum(-1).float(), mask),
            "alive": int(alive[n].sum().item()),
            "C": g.shape[-1],
            "delta_ratio": ratios[n],
        }
        for n, g in ci.lower.items()
    }
    summary = {
        "ci_masked_recon": output_divergence(output_loss, out, ci_out, mask).item(),
        "stochastic_recon": output_divergence(output_loss, out, st_out, mask).item(),
        "layers": layers,
    }
    return summary, alive
