"""Evaluation of a finished run against ground truth (toys) and per-layer diagnostics.

MMCS / ML2R (SPD paper): each true rank-1 piece W_i of a layer is matched to the alive component
whose rank-1 matrix A_c has the highest cosine similarity with it (both flattened); MMCS is the
mean of those cosines, ML2R the mean of ‖A_c‖/‖W_i‖ for the matched components.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from spd_mcp.model.diagnostics import alive_mask, delta_ratios, evaluate_batch
from spd_mcp.model.run_io import LoadedRun


@torch.no_grad()
def mmcs_ml2r(true_pieces: Tensor, comp_weights: Tensor) -> tuple[float, float, list[int]]:
    """true_pieces (n, ...) and comp_weights (C_alive, ...) → (MMCS, ML2R, best match per piece)."""
    t = true_pieces.flatten(1)  # (n, D)
    c = comp_weights.flatten(1)  # (K, D)
    cos = (t @ c.T) / (t.norm(dim=1, keepdim=True) * c.norm(dim=1) + 1e-12)  # (n, K)
    best_cos, best = cos.max(dim=1)
    ratio = c[best].norm(dim=1) / t.norm(dim=1).clamp_min(1e-12)
    return best_cos.mean().item(), ratio.mean().item(), best.tolist()


@torch.no_grad()
def evaluate_run(run: LoadedRun, *, n_samples: int = 20_000, seed: int = 1234) -> dict[str, Any]:
    """Ground-truth and diagnostic evaluation of a toy run (zoo entries with data samplers)."""
    torch.manual_seed(seed)
    cm, cfg = run.model, run.config
    device = next(cm.parameters()).device.type
    output_loss = cfg.output_loss or run.target.output_loss
    x = run.target.sampler(n_samples, device)
    diag = evaluate_batch(
        cm, x, output_loss=output_loss, sampling=cfg.sampling, alive_threshold=cfg.alive_threshold
    )
    _, ci = cm.ci_for(x)
    alive = alive_mask(ci.lower, cfg.alive_threshold)
    entry = run.target.entry
    truth = entry.ground_truth(run.target.model) if entry is not None else {}
    expected = entry.expected_alive() if entry is not None else {}
    ratios = delta_ratios(cm)
    layers: dict[str, dict[str, Any]] = {}
    for n in cm.layer_names:
        row: dict[str, Any] = {
            "C": cm.Cs[n],
            "alive": int(alive[n].sum()),
            "l0": diag["layers"][n]["l0"],
            "delta_ratio": ratios[n],
        }
        if n in expected:
            row["expected_alive"] = expected[n]
        if n in truth and alive[n].any():
            weights = cm.component(n).component_weights()[alive[n]]
            row["mmcs"], row["ml2r"], _ = mmcs_ml2r(truth[n].to(weights), weights)
        layers[n] = row
    return {
        "run": run.name,
        "n_samples": n_samples,
        "ci_masked_recon": diag["ci_masked_recon"],
        "stochastic_recon": diag["stochastic_recon"],
        "layers": layers,
    }
