"""The weight delta is reused while W, V and U stay the same and recomputed when any changes
(in place or replaced); with gradients it is never cached."""

from __future__ import annotations

import torch

from spd_mcp.model.session import RunSession


def test_weight_delta_cache_follows_every_change() -> None:
    cm = RunSession.load("tms-5-2").cm
    name = cm.layer_names[0]
    comp = cm.component(name)
    fresh = lambda: (cm.target_weight(name) - comp.weight()).detach()  # noqa: E731
    with torch.no_grad():
        d1 = cm.weight_delta(name)
        assert cm.weight_delta(name) is d1  # reused
        comp.V.mul_(0.5)  # in place: recomputed
        d2 = cm.weight_delta(name)
        assert d2 is not d1 and torch.equal(d2, fresh())
        comp.U.data = comp.U.data * 2  # new storage: recomputed
        d3 = cm.weight_delta(name)
        assert d3 is not d2 and torch.equal(d3, fresh())
    # training: a fresh, differentiable delta every time
    d4 = cm.weight_delta(name)
    assert d4.requires_grad and d4 is not cm.weight_delta(name)
    d4.sum().backward()
    assert comp.V.grad is not None
