"""Tied components (TMS's W and Wᵀ): shared parameters while training, independent once saved."""

import pytest
import torch

from spd_mcp.model.component_model import ComponentModel
from spd_mcp.model.config import ModulePattern, parse_config
from spd_mcp.model.decompose import decompose
from spd_mcp.model.run_io import load_run
from spd_mcp.model.zoo import get_entry


def _cm(C: int = 6) -> ComponentModel:
    model = get_entry("tms-5-2").build_model()
    return ComponentModel(model, [ModulePattern(pattern="linear*", C=C)])


def _n_params(cm: ComponentModel) -> int:
    return sum(p.numel() for p in cm.trainable_parameters())


def test_tied_follower_is_the_transpose_and_shares_gradients():
    cm = _cm()
    before = _n_params(cm)
    cm.tie("linear1", "linear2")
    l1, l2 = cm.component("linear1"), cm.component("linear2")
    assert _n_params(cm) == before - l1.V.numel() - l1.U.numel()
    assert torch.equal(l2.component_weights(), l1.component_weights().transpose(1, 2))
    x = torch.rand(7, 5)
    masks = {n: torch.rand(7, 6) for n in cm.layer_names}
    cm(x, masks={"linear2": masks["linear2"]}).pow(2).sum().backward()  # linear2 path only
    assert l1.V.grad is not None and l1.V.grad.abs().sum() > 0
    with torch.no_grad():  # an optimiser's in-place update reaches the follower
        l1.U.add_(1.0)
    cm.refresh_ties()
    assert torch.equal(l2.V, l1.U.T)


def test_untie_keeps_values_and_restores_independent_parameters():
    cm = _cm()
    n_before = _n_params(cm)
    cm.tie("linear1", "linear2")
    tied = cm.component("linear2").component_weights().detach().clone()
    cm.untie()
    l1, l2 = cm.component("linear1"), cm.component("linear2")
    assert _n_params(cm) == n_before
    assert torch.equal(l2.component_weights(), tied)
    assert set(cm.components.state_dict()) >= {"linear2.V", "linear2.U", "linear1.V", "linear1.U"}
    with torch.no_grad():
        l1.U.add_(1.0)
    assert torch.equal(l2.component_weights(), tied)  # no longer follows linear1


@pytest.mark.parametrize(
    ("source", "follower"), [("linear1", "linear1"), ("linear1", "nope"), ("nope", "linear2")]
)
def test_bad_ties_are_refused_with_the_layer_names(source, follower):
    with pytest.raises(ValueError, match="linear1, linear2"):
        _cm().tie(source, follower)


def test_ties_need_transposed_shapes():
    from spd_mcp.model.zoo.tms import TMSModel

    cm = ComponentModel(TMSModel(5, 2, 1), [ModulePattern(pattern="*", C=4)])
    with pytest.raises(ValueError, match="transposes"):
        cm.tie("linear1", "hidden_layers.0")


def test_a_tied_run_saves_both_layers_and_reloads(tmp_path):
    cfg = get_entry("tms-5-2").default_config()
    assert cfg["tied"] == [["linear1", "linear2"]]
    cfg.update(steps=5, eval_every=5, batch_size=16, eval_batch_size=16,
               faithfulness_warmup_steps=3)
    out = decompose(parse_config(cfg), out=tmp_path / "tied", target_steps=3)
    run = load_run(out)
    l1, l2 = run.model.component("linear1"), run.model.component("linear2")
    assert torch.allclose(l2.component_weights(), l1.component_weights().transpose(1, 2))
    assert run.config.tied == [("linear1", "linear2")]
