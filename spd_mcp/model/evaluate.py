"""Evaluation of a finished run against ground truth (toys) and per-layer diagnostics.

MMCS / ML2R (SPD paper): a toy's ground truth is one rank-1 piece W_i per feature, non-zero only on
that feature's slice of the weight (linear1: column i, the direction feature i is written to;
linear2: row i, the direction output i reads). Each feature direction is matched to the alive
component whose weight A_c, read on the same slice, has the highest cosine similarity with it;
MMCS is the mean of those cosines, ML2R the mean of ‖A_c on the slice‖ / ‖W_i‖.
We also report a stricter ``mmcs_full``: the cosine between whole flattened matrices, which is 1
only if the component is also zero off the feature's slice (pure read and write directions).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from spd_mcp.model.diagnostics import diagnose_batch
from spd_mcp.model.run_io import LoadedRun


@torch.no_grad()
def mmcs_ml2r(true_pieces: Tensor, comp_weights: Tensor) -> dict[str, float]:
    """true_pieces (n, ...) (each zero off its feature's slice) and comp_weights (K, ...).

    Returns MMCS and ML2R on the feature slices (the paper's), and ``mmcs_full`` on whole matrices.
    """
    t = true_pieces.flatten(1)  # (n, D)
    c = comp_weights.flatten(1)  # (K, D)
    support = (t != 0).to(c.dtype)  # (n, D) each feature's slice
    on_slice = c.unsqueeze(0) * support.unsqueeze(1)  # (n, K, D) component read on slice i
    dots = (on_slice * t.unsqueeze(1)).sum(-1)  # (n, K)
    slice_norm = on_slice.norm(dim=-1)  # (n, K)
    t_norm = t.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (n, 1)
    cos = dots / (t_norm * slice_norm + 1e-12)  # (n, K)
    best_cos, best = cos.max(dim=1)
    ml2r = slice_norm.gather(1, best[:, None]).squeeze(1) / t_norm.squeeze(1)
    full = (t @ c.T) / (t_norm * c.norm(dim=1) + 1e-12)  # (n, K)
    return {
        "mmcs": best_cos.mean().item(),
        "ml2r": ml2r.mean().item(),
        "mmcs_full": full.max(dim=1).values.mean().item(),
    }


@torch.no_grad()
def evaluate_run(run: LoadedRun, *, n_samples: int = 20_000, seed: int = 1234) -> dict[str, Any]:
    """Ground-truth and diagnostic evaluation of a toy run (zoo entries with data samplers)."""
    torch.manual_seed(seed)
    cm, cfg = run.model, run.config
    device = next(cm.parameters()).device.type
    output_loss = cfg.output_loss or run.target.output_loss
    x = run.target.sampler(n_samples, device)
    diag, alive = diagnose_batch(
        cm, x, output_loss=output_loss, sampling=cfg.sampling, alive_threshold=cfg.alive_threshold
    )
    entry = run.target.entry
    truth = entry.ground_truth(run.target.model) if entry is not None else {}
    expected = entry.expected_alive() if entry is not None else {}
    layers: dict[str, dict[str, Any]] = {}
    for n in cm.layer_names:
        row: dict[str, Any] = dict(diag["layers"][n])  # C, alive, l0, delta_ratio
        if n in expected:
            row["expected_alive"] = expected[n]
        if n in truth and alive[n].any():
            weights = cm.component(n).component_weights()[alive[n]]
            row.update(mmcs_ml2r(truth[n].to(weights), weights))
        layers[n] = row
    return {
        "run": run.name,
        "n_samples": n_samples,
        "ci_masked_recon": diag["ci_masked_recon"],
        "stochastic_recon": diag["stochastic_recon"],
        "layers": layers,
    }
