"""The validity verdict on an exact (oracle) decomposition, and on mutations of it: each mutation
makes the verdict name exactly what is wrong."""

from __future__ import annotations

import json

import pytest
import torch

from spd_mcp.model.component_model import ComponentModel
from spd_mcp.model.config import CIFnConfig, ModulePattern
from spd_mcp.model.validity import Validity, evaluate_validity
from spd_mcp.model.zoo.tms import TMSModel, sparse_features

N, C = 5, 8  # 5 features, 5 oracle components + 3 dead ones per matrix


def oracle() -> ComponentModel:
    """TMS with an orthonormal W (no superposition), decomposed exactly: component i of linear1
    reads feature i and writes W[:, i]; component i of linear2 reads W[:, i] and writes output i.
    Both read x_i exactly, and a steep CI function fires iff x_i > 0."""
    torch.manual_seed(0)
    model = TMSModel(N, N)
    Q, _ = torch.linalg.qr(torch.randn(N, N))
    with torch.no_grad():
        model.linear1.weight.copy_(Q)
        model.tie()
        model.linear2.bias.zero_()
    cm = ComponentModel(model, [ModulePattern(pattern="linear*", C=C)],
                        CIFnConfig(type="mlp", hidden=[1]))
    eye = torch.eye(N)
    with torch.no_grad():
        for name, V, U in (("linear1", eye, Q.T), ("linear2", Q, eye)):
            comp = cm.component(name)
            comp.V.zero_()
            comp.U.zero_()
            comp.V[:, :N] = V  # (d_in, N) read directions
            comp.U[:N] = U  # (N, d_out) write directions
            fn = cm.ci_fns.fns[name]
            # z = gelu(1000 a − 1): CI 0 for a ≤ 0.001 (float noise included), 1 once a > 0.0025
            fn.weights[0].fill_(1000.0)
            fn.biases[0].fill_(-1.0)
            fn.w_out.fill_(1.0)
            fn.b_out.zero_()
    return cm


def check(cm: ComponentModel) -> Validity:
    def batches() -> list[tuple[torch.Tensor, None]]:
        return [(sparse_features(4096, N, 0.05, "cpu"), None) for _ in range(2)]

    return evaluate_validity(cm, batches, run="oracle", output_loss="mse",
                             sampling="continuous", alive_threshold=0.1, data="tms draws")


def test_the_oracle_decomposition_is_valid() -> None:
    v = check(oracle())
    assert v.failures == [] and v.ok
    assert v.verdict == "valid: every check within its threshold"
    assert v.recon["unmasked"].divergence < 1e-10  # the components sum to W exactly
    assert all(r.ratio < 0.01 for r in v.recon.values()), v.recon
    for m in v.matrices:
        assert (m.alive, m.dead, m.duplicates) == (N, C - N, [])
        assert m.delta_ratio < 1e-6
        assert m.l0 == pytest.approx(N * 0.05, rel=0.1)  # one component per active feature
    assert json.loads(v.model_dump_json())["verdict"] == v.verdict


def test_a_zeroed_write_vector_is_named() -> None:
    cm = oracle()
    with torch.no_grad():
        cm.component("linear1").U[2].zero_()
    v = check(cm)
    assert not v.ok
    assert any(f.startswith("reconstruction with all components on (no delta)")
               for f in v.failures), v.failures
    assert any(f.startswith("linear1: ‖W − VU‖/‖W‖") for f in v.failures), v.failures
    assert not any(f.startswith("linear2:") for f in v.failures), v.failures
    assert v.verdict.startswith(f"fails {len(v.failures)} checks: ")


def test_a_component_split_in_two_is_named() -> None:
    cm = oracle()
    with torch.no_grad():
        comp, fn = cm.component("linear1"), cm.ci_fns.fns["linear1"]
        comp.V[:, 6] = comp.V[:, 2]
        comp.U[2] /= 2
        comp.U[6] = comp.U[2]
        for p in (*fn.weights, *fn.biases, fn.w_out, fn.b_out):
            p[6] = p[2]
    v = check(cm)
    # the function is unchanged, so only the duplicate is reported
    assert v.failures == ["linear1: components 2 and 6 are duplicates (parallel weights, "
                          "cos > 0.99: one mechanism split in two)"]


def test_ci_forced_to_one_is_named() -> None:
    cm = oracle()
    with torch.no_grad():
        for name in ("linear1", "linear2"):
            cm.ci_fns.fns[name].b_out.fill_(5.0)  # z ≥ 5 − 0.17: CI 1 everywhere
    v = check(cm)
    for name in ("linear1", "linear2"):
        assert f"{name}: L0 8.00 of C=8 (100.0%) > 5%" in v.failures, v.failures
    assert all(m.dead == 0 for m in v.matrices)
