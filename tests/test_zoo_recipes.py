"""Trainer features the zoo recipes use (restarts, warm-up weight decay) and the recipe scores."""

import json
import subprocess
import sys

import pytest
import torch

from spd_mcp.model.component_model import ComponentModel
from spd_mcp.model.config import ConfigError, ModulePattern, parse_config
from spd_mcp.model.decompose import decompose
from spd_mcp.model.run_io import load_run
from spd_mcp.model.zoo import get_entry, zoo_names
from spd_mcp.model.zoo.resid_mlp import neuron_contribution_scores, one_hot_ci_scores


def _tiny(name: str = "tms-5-2", **over) -> dict:
    cfg = get_entry(name).default_config()
    cfg.update(steps=12, eval_every=6, batch_size=16, eval_batch_size=16,
               faithfulness_warmup_steps=2)
    return {**cfg, **over}


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_run(run_dir).model.state_dict()


def test_restarts_are_validated_with_clear_errors():
    with pytest.raises(ConfigError, match=r"restarts.steps \(20\) exceeds steps \(12\)"):
        parse_config(_tiny(restarts={"n": 2, "steps": 20}))
    with pytest.raises(ConfigError, match=r"restarts\.n"):
        parse_config(_tiny(restarts={"n": 0}))
    with pytest.raises(ConfigError, match=r"unknown key 'restarts\.seeds'"):
        parse_config(_tiny(restarts={"n": 2, "seeds": [1, 2]}))
    assert parse_config(_tiny()).restarts is None  # opt-in


def test_one_restart_is_the_plain_run(tmp_path):
    a = decompose(parse_config(_tiny()), out=tmp_path / "a", target_steps=5)
    b = decompose(parse_config(_tiny(restarts={"n": 1})), out=tmp_path / "b", target_steps=5)
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_restarts_keep_the_lowest_training_loss_and_record_it(tmp_path):
    cfg = _tiny(restarts={"n": 3, "steps": 4, "select_batches": 2})
    out = decompose(parse_config(cfg), out=tmp_path / "r", target_steps=5)
    record = json.loads((out / "run.json").read_text())["summary"]["restarts"]
    losses = [c["loss"] for c in record["candidates"]]
    assert len(losses) == 3 and len({c["seed"] for c in record["candidates"]}) == 3
    assert record["chosen"] == losses.index(min(losses))
    assert record["criterion"] == "training objective" and record["steps"] == 4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["restart"] for r in rows if "restart" in r] == [record["chosen"]]
    assert max(r["step"] for r in rows) == 12  # the chosen candidate was trained to the end


def test_warmup_weight_decay_is_a_config_field(tmp_path):
    base = _tiny(steps=0)
    a = decompose(parse_config(base), out=tmp_path / "a", target_steps=3)
    b = decompose(parse_config({**base, "faithfulness_warmup_weight_decay": 0.5}),
                  out=tmp_path / "b", target_steps=3)
    assert not torch.equal(_weights(a)["components.linear1.V"], _weights(b)["components.linear1.V"])


def test_new_toys_are_registered_with_the_papers_expected_counts():
    assert {"tms-40-10-id", "resid-mlp-2", "resid-mlp-3"} <= set(zoo_names())
    assert get_entry("tms-40-10-id").expected_alive() == {
        "linear1": 40, "linear2": 40, "hidden_layers.0": 10}
    assert get_entry("resid-mlp-3").expected_alive() == {
        **{f"layers.{i}.mlp_in": 24 for i in range(3)},
        **{f"layers.{i}.mlp_out": 4 for i in range(3)},
    }


def _perfect_resid_cm(name: str) -> tuple[ComponentModel, object]:
    """A ResidMLP decomposition built by hand: mlp_in component i = W_in e_i e_iᵀ (dual basis)."""
    entry = get_entry(name)
    model = entry.build_model()
    k = entry.kwargs
    cm = ComponentModel(model, [ModulePattern(pattern="layers.*.mlp_*", C=k.n_features)])
    E = model.W_E  # (n, d)
    dual = torch.linalg.pinv(E)  # (d, n): E @ dual = I
    with torch.no_grad():
        for i in range(k.n_layers):
            comp = cm.component(f"layers.{i}.mlp_in")
            W_in = cm.target_weight(f"layers.{i}.mlp_in")  # (h, d)
            comp.V.copy_(dual)  # (d, n): reads feature c only
            comp.U.copy_(E @ W_in.T)  # (n, h): writes W_in e_c
    return cm, entry


@pytest.mark.parametrize("name", ["resid-mlp", "resid-mlp-3"])
def test_neuron_contributions_score_a_perfect_mlp_in_as_perfect(name):
    cm, entry = _perfect_resid_cm(name)
    scores = neuron_contribution_scores(cm, entry.kwargs)
    assert scores["mmcs"] == pytest.approx(1.0, abs=1e-5)
    assert scores["ml2r"] == pytest.approx(1.0, abs=1e-4)
    assert scores["r2_diagonal"] == pytest.approx(1.0, abs=1e-4)


def test_one_hot_ci_counts_features_with_their_own_component():
    cm, entry = _perfect_resid_cm("resid-mlp")
    n = entry.kwargs.n_features

    def fake_ci(pre):  # CI = the one-hot's own component only, except features 0 and 1 share 0
        def ci_for(x):
            g = (x != 0).float()  # (n, n)
            g[1, 0], g[1, 1] = 1.0, 0.0
            return None, type("CI", (), {"lower": {n_: g for n_ in cm.layer_names}})()
        return ci_for

    cm.ci_for = fake_ci(None)  # type: ignore[method-assign]
    row = one_hot_ci_scores(cm, entry.kwargs, threshold=0.1)["layers.0.mlp_in"]
    assert row == {"features_with_one_component": n, "distinct_components": n - 1,
                   "n_features": n}


def test_paper_shortfalls_name_what_is_missing():
    tms = get_entry("tms-5-2-id")
    good = {"layers": {"linear1": {"alive": 5, "mmcs": 0.999, "ml2r": 1.0},
                       "linear2": {"alive": 5, "mmcs": 0.999, "ml2r": 1.0},
                       "hidden_layers.0": {"alive": 2}}}
    assert tms.paper_shortfalls(good) == []
    bad = json.loads(json.dumps(good))
    bad["layers"]["linear1"].update(alive=4, mmcs=0.98)
    bad["layers"]["hidden_layers.0"]["alive"] = 3
    assert tms.paper_shortfalls(bad) == [
        "linear1: 4 alive, expected 5", "linear1: MMCS 0.9800 < 0.99",
        "hidden_layers.0: 3 alive, expected 2",
    ]


def _zoo_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spd_mcp.cli", "zoo", "build", *args],
                          capture_output=True, text=True, timeout=120)


def test_zoo_build_takes_target_kwargs_and_names_bad_ones():
    r = _zoo_cli("tales", "--target-kwarg", "grammar=v1", "--print-config")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["target"]["kwargs"]["grammar"] == "v1"
    r = _zoo_cli("resid-mlp", "--target-kwarg", "n_layers=2", "--print-config")
    assert json.loads(r.stdout)["target"]["kwargs"] == {"n_layers": 2}  # JSON values typed
    r = _zoo_cli("tales", "--target-kwarg", "grammar=v9", "--print-config")
    assert r.returncode == 2 and "--target-kwarg for tales: grammar: Input should be" in r.stderr
    r = _zoo_cli("tms-5-2", "--target-kwarg", "colour=1", "--print-config")
    assert r.returncode == 2 and "colour: Extra inputs are not permitted" in r.stderr
    r = _zoo_cli("tms-5-2", "--target-kwarg", "n_features", "--print-config")
    assert r.returncode == 2 and "expected KEY=VALUE, got 'n_features'" in r.stderr
