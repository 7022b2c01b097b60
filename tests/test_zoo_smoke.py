"""Every toy zoo entry trains, decomposes, saves, reloads and evaluates (a few steps each)."""

import math

import pytest
import torch

from spd_mcp.model.config import parse_config
from spd_mcp.model.decompose import decompose
from spd_mcp.model.evaluate import evaluate_run
from spd_mcp.model.run_io import load_run
from spd_mcp.model.zoo import get_entry

TOYS = [
    "tms-5-2", "tms-5-2-id", "tms-40-10", "tms-40-10-id", "resid-mlp", "resid-mlp-2", "resid-mlp-3",
    "induction",
]


@pytest.mark.parametrize("name", TOYS)
def test_zoo_entry_end_to_end(name, tmp_path):
    entry = get_entry(name)
    cfg = entry.default_config()
    cfg.update(steps=3, eval_every=3, batch_size=8, eval_batch_size=16)
    out = decompose(parse_config(cfg), out=tmp_path / name, target_steps=3)
    run = load_run(out)
    x = run.target.sampler(4, "cpu")
    out_t, ci = run.model.ci_for(x)
    masks = {n: torch.ones_like(g) for n, g in ci.lower.items()}
    full = run.model(x, masks=masks, delta_masks={n: 1.0 for n in masks})
    assert torch.allclose(full, out_t, atol=1e-5)
    result = evaluate_run(run, n_samples=64)
    assert set(result["layers"]) == set(run.model.layer_names)
    for row in result["layers"].values():
        assert 0 <= row["alive"] <= row["C"] and math.isfinite(row["delta_ratio"])


def test_tms_ground_truth_pieces_sum_to_the_weights():
    entry = get_entry("tms-5-2")
    model = entry.build_model()
    truth = entry.ground_truth(model)
    assert torch.allclose(truth["linear1"].sum(0), model.linear1.weight)
    assert torch.allclose(truth["linear2"].sum(0), model.linear2.weight)


def test_evaluation_scores_a_perfect_decomposition_as_perfect():
    """Set components to the true pieces by hand: MMCS = ML2R = 1 and 5 alive."""
    from spd_mcp.model.evaluate import mmcs_ml2r

    entry = get_entry("tms-5-2")
    model = entry.build_model()
    for layer, pieces in entry.ground_truth(model).items():
        shuffled = pieces[torch.randperm(pieces.shape[0])]
        extra = torch.randn(3, *pieces.shape[1:]) * 1e-3  # small junk components
        scores = mmcs_ml2r(pieces, torch.cat([shuffled, extra]))
        assert scores["mmcs"] == pytest.approx(1.0, abs=1e-6), layer
        assert scores["ml2r"] == pytest.approx(1.0, abs=1e-6), layer
        rotated = mmcs_ml2r(pieces, torch.cat([shuffled * 0.5, extra]))
        assert rotated["ml2r"] == pytest.approx(0.5, abs=1e-6)
