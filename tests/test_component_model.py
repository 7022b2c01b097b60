import pytest
import torch
from torch import nn

from spd_mcp.model.component_model import ComponentModel, PatternError
from spd_mcp.model.config import CIFnConfig, ModulePattern
from spd_mcp.model.masks import ones_masks
from tests.byo_model import Tiny

CI_TYPES = ["mlp", "vector_mlp", "shared_mlp", "global_shared_mlp"]


def _cm(ci_type: str = "mlp", C: int = 5) -> ComponentModel:
    target = Tiny()
    pats = [ModulePattern(pattern=p, C=C) for p in ("embed", "up", "down")]
    return ComponentModel(target, pats, CIFnConfig(type=ci_type, hidden=[4]))


@pytest.mark.parametrize("ci_type", CI_TYPES)
def test_all_ones_with_delta_reproduces_target(ci_type):
    cm = _cm(ci_type)
    ids = torch.randint(0, 11, (3, 4))
    out, ci = cm.ci_for(ids)
    masks = ones_masks(ci.lower)
    got = cm(ids, masks=masks, delta_masks={n: 1.0 for n in cm.layer_names})
    assert torch.allclose(got, out, atol=1e-5)
    # and with per-position delta masks of ones
    dm = {n: torch.ones(3, 4) for n in cm.layer_names}
    assert torch.allclose(cm(ids, masks=masks, delta_masks=dm), out, atol=1e-5)
    for g in ci.lower.values():
        assert g.shape[-1] == 5 and g.min() >= 0 and g.max() <= 1


def test_ci_mask_of_ones_without_delta_is_rank_C_reconstruction():
    cm = _cm()
    ids = torch.randint(0, 11, (2, 4))
    _, ci = cm.ci_for(ids)
    got = cm(ids, masks=ones_masks(ci.lower))
    recon = Tiny()
    recon.load_state_dict(cm.target.state_dict())
    with torch.no_grad():
        for n in cm.layer_names:
            recon.get_submodule(n).weight.copy_(cm.component(n).weight())
    assert torch.allclose(got, recon(ids), atol=1e-5)
    assert not torch.allclose(got, cm.target(ids), atol=1e-3)  # the delta really matters


def test_masks_zero_out_components_and_routing_keeps_target():
    cm = _cm()
    ids = torch.randint(0, 11, (2, 4))
    out, ci = cm.ci_for(ids)
    zeros = {n: torch.zeros_like(g) for n, g in ci.lower.items()}
    # routing only "up" through zeroed components with the delta on = replacing W_up by Δ
    got = cm(ids, masks={"up": zeros["up"]}, delta_masks={"up": 1.0})
    ref = Tiny()
    ref.load_state_dict(cm.target.state_dict())
    with torch.no_grad():
        ref.up.weight.copy_(cm.weight_delta("up"))
    assert torch.allclose(got, ref(ids), atol=1e-5)
    # per-datapoint routes: rows routed False give the target output exactly
    route = torch.tensor([[True] * 4, [False] * 4])
    got = cm(ids, masks={"up": zeros["up"]}, routes={"up": route})
    assert torch.allclose(got[1], out[1])
    assert not torch.allclose(got[0], out[0])


def test_pattern_matching_nothing_is_an_error_naming_it():
    with pytest.raises(PatternError, match=r"'nope\*' matches no .*embed, up, down"):
        ComponentModel(Tiny(), [ModulePattern(pattern="nope*", C=3)])


def test_module_matched_twice_is_an_error():
    pats = [ModulePattern(pattern="up", C=3), ModulePattern(pattern="u*", C=4)]
    with pytest.raises(PatternError, match=r"'up' is matched by two patterns"):
        ComponentModel(Tiny(), pats)


def test_non_decomposable_modules_are_ignored_by_patterns():
    class WithNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(4)
            self.lin = nn.Linear(4, 4)

    cm = ComponentModel(WithNorm(), [ModulePattern(pattern="*", C=2)])
    assert cm.layer_names == ["lin"]


def test_component_activation_capture():
    cm = _cm()
    ids = torch.randint(0, 11, (2, 4))
    _, inputs, acts = cm.forward_with_inputs(ids, acts=True)
    assert acts is not None
    assert torch.equal(acts["embed"], cm.component("embed").V[ids])
    assert torch.allclose(acts["up"], inputs["up"] @ cm.component("up").V)
