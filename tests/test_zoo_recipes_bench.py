"""benchmarks/zoo_recipes.py: recipe overrides and the ground-truth start (fast; no build)."""

from __future__ import annotations

import argparse

import pytest
import torch

from spd_mcp.model.component_model import ComponentModel
from spd_mcp.model.config import parse_config
from spd_mcp.model.targets import resolve_target
from spd_mcp.model.zoo import get_entry
from tests.scripts import load_benchmark


def test_set_overrides_reach_nested_recipe_settings():
    bench = load_benchmark("zoo_recipes")
    cfg = get_entry("tms-40-10").default_config()
    for item in ("modules.0.C=200", "losses.0.coeff=2e-3", "lr=1e-3",
                 "schedule.type=constant", "name=other"):
        bench.set_path(cfg, *bench.parse_set(item))
    assert cfg["modules"][0]["C"] == 200 and cfg["losses"][0]["coeff"] == 2e-3
    assert cfg["lr"] == 1e-3 and cfg["schedule"]["type"] == "constant"
    assert cfg["name"] == "other"
    parse_config(cfg)  # still a valid config
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        bench.parse_set("lr")


@pytest.mark.parametrize("name", ["tms-5-2", "tms-5-2-id"])
def test_ground_truth_init_puts_the_known_pieces_first(name):
    bench = load_benchmark("zoo_recipes")
    entry = get_entry(name)
    config = parse_config(entry.default_config())
    target = resolve_target(config.target)
    torch.manual_seed(0)
    cm = ComponentModel(target.model, config.modules, config.ci_fn, target.aliases())
    before = {n: cm.component(n).V.detach().clone() for n in cm.layer_names}
    bench.init_at_ground_truth(cm, target)
    truth = entry.ground_truth(target.model)
    for layer, pieces in truth.items():
        comp = cm.component(layer)
        k = pieces.shape[0]
        got = torch.einsum("ck,cj->cjk", comp.V[:, :k].T, comp.U[:k])  # U_iᵀ V_iᵀ per piece
        assert torch.allclose(got, pieces, atol=1e-5), layer
        assert torch.allclose(comp.V[:, k:], before[layer][:, k:] * 0.1)
