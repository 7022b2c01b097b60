"""Dead-component revival (``config.revive``): validation, what a revival touches, and opt-in."""

import json

import pytest
import torch

from spd_mcp.model.component_model import ComponentModel
from spd_mcp.model.config import ConfigError, parse_config
from spd_mcp.model.decompose import _Trainer, decompose, seed_everything
from spd_mcp.model.run_io import load_run
from spd_mcp.model.targets import resolve_target
from spd_mcp.model.zoo import get_entry


def _tiny(**over) -> dict:
    cfg = get_entry("tms-5-2").default_config()
    cfg.update(steps=12, eval_every=6, batch_size=16, eval_batch_size=64,
               faithfulness_warmup_steps=2)
    return {**cfg, **over}


def test_revive_is_validated_with_clear_errors():
    with pytest.raises(ConfigError, match=r"revive\.every: Input should be greater than 0"):
        parse_config(_tiny(revive={"every": 0}))
    with pytest.raises(ConfigError, match=r"revive\.until_frac: Input should be less than or"):
        parse_config(_tiny(revive={"every": 4, "until_frac": 1.5}))
    with pytest.raises(ConfigError, match=r"revive\.threshold: Input should be greater than or"):
        parse_config(_tiny(revive={"every": 4, "threshold": -0.1}))
    with pytest.raises(ConfigError, match=r"revive\.batches: Input should be greater than or"):
        parse_config(_tiny(revive={"every": 4, "batches": 0}))
    with pytest.raises(ConfigError, match=r"unknown key 'revive\.steps'"):
        parse_config(_tiny(revive={"every": 4, "steps": 3}))
    with pytest.raises(ConfigError, match=r"revive\.every: Field required"):
        parse_config(_tiny(revive={"until_frac": 0.5}))
    assert parse_config(_tiny()).revive is None  # opt-in
    rv = parse_config(_tiny(revive={"every": 4})).revive
    assert (rv.until_frac, rv.threshold, rv.batches) == (0.5, None, 4)


def _trainer(cfg: dict) -> _Trainer:
    """A trainer set up the way ``decompose`` sets one up (target trained for a few steps)."""
    config = parse_config(cfg)
    seed_everything(config.seed)
    target = resolve_target(config.target)
    target.entry.train_target(target.model, steps=5, device="cpu", seed=0, progress=None)
    target.model.eval()
    seed_everything(config.seed + 1)
    cm = ComponentModel(target.model, config.modules, config.ci_fn)
    return _Trainer(cm, target, config, device="cpu", reporter=None)


def _slices(tr: _Trainer) -> dict[str, tuple[torch.Tensor, int]]:
    """Every per-component tensor (parameters and AdamW moments) with its component dim."""
    out = {}
    for layer in ("linear1", "linear2"):
        fn = tr.cm.per_component_ci_fn(layer)
        for name, p in fn.named_parameters():
            out[f"{layer}.ci.{name}"] = (p, 0)
    comp = tr.cm.component("linear1")  # linear2's V, U are views of these (tied)
    out["V"], out["U"] = (comp.V, 1), (comp.U, 0)
    for key in list(out):
        p, dim = out[key]
        for m in ("exp_avg", "exp_avg_sq"):
            out[f"{key}.{m}"] = (tr.opt.state[p][m], dim)
    return out


def test_a_dead_component_is_revived_and_nothing_else_moves():
    tr = _trainer(_tiny(revive={"every": 4, "until_frac": 0.5, "batches": 2}))
    tr.run(0, 4)  # trains steps 0-3; the check at step 4 has not happened yet
    cm = tr.cm
    dead, half = 3, 5  # component 5 is dead in linear1 only: the tie keeps it
    with torch.no_grad():
        comp = cm.component("linear1")
        comp.V[:, dead] = 0.0
        comp.U[dead] = 0.0
        for layer in ("linear1", "linear2"):
            cm.per_component_ci_fn(layer).b_out[dead] = -10.0
        cm.per_component_ci_fn("linear1").b_out[half] = -10.0
        cm.per_component_ci_fn("linear2").b_out[half] = 10.0
    cm.refresh_ties()
    before = {k: t.detach().clone() for k, (t, _) in _slices(tr).items()}
    rng = torch.get_rng_state()

    revived = tr.revive(4)

    assert torch.equal(torch.get_rng_state(), rng)  # the training stream is left as it was

    idx = revived["linear1"].tolist()
    assert dead in idx and half not in idx
    assert revived["linear2"].tolist() == idx  # one shared set of components
    comp = cm.component("linear1")
    assert comp.V[:, dead].norm() > 0 and comp.U[dead].norm() > 0
    assert cm.per_component_ci_fn("linear1").b_out[dead] == 0.0  # re-drawn (biases start at 0)
    assert torch.equal(cm.component("linear2").V, comp.U.T)  # ties refreshed
    keep = [c for c in range(comp.C) if c not in idx]
    for key, (t, dim) in _slices(tr).items():
        old = before[key]
        assert torch.equal(t.index_select(dim, torch.tensor(keep)),
                           old.index_select(dim, torch.tensor(keep))), key
        if key.endswith(("exp_avg", "exp_avg_sq")):
            assert not t.index_select(dim, torch.tensor(idx)).any(), key
    assert not torch.equal(comp.V, before["V"]) and not torch.equal(comp.U, before["U"])
    row = tr.metrics[-1]
    assert row == {"step": 4, "revived": {"linear1": len(idx), "linear2": len(idx)}}


def test_revival_runs_in_decompose_and_records_its_checks(tmp_path):
    cfg = _tiny(revive={"every": 3, "until_frac": 0.75, "threshold": 1.0})  # all dead
    out = decompose(parse_config(cfg), out=tmp_path / "r", target_steps=5)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    checks = [r for r in rows if "revived" in r]
    assert [r["step"] for r in checks] == [3, 6]  # 9 is not below 0.75 · 12
    assert all(r["revived"] == {"linear1": 20, "linear2": 20} for r in checks)
    assert max(r["step"] for r in rows) == 12


def test_without_revive_a_run_is_unchanged(tmp_path):
    a = decompose(parse_config(_tiny()), out=tmp_path / "a", target_steps=5)
    b = decompose(parse_config(_tiny(revive=None)), out=tmp_path / "b", target_steps=5)
    wa, wb = load_run(a).model.state_dict(), load_run(b).model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = ((r / "metrics.jsonl").read_text().splitlines() for r in (a, b))
    strip = [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in ra]
    assert strip == [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in rb]
    assert not any("revived" in line for line in ra)


def _sparse_inputs(n: int, m: int, p: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(m, n, generator=g) < p
    return torch.rand(m, n, generator=g) * active


def test_a_component_that_reads_two_features_is_split_into_both():
    """Component 0 reads features 0 and 1 at once (a merged piece); its firing inputs are two
    groups that rarely meet, so a split gives features 0 and 1 a component each, each writing
    the target's own column; components firing on one feature and one on dense input stay."""
    tr = _trainer(_tiny(revive={"every": 4, "split": 0.3}))
    cm, comp = tr.cm, tr.cm.component("linear1")
    W = cm.target_weight("linear1")  # (2, 5)
    with torch.no_grad():
        comp.V[:, 0] = torch.tensor([1.0, 1.0, 0, 0, 0])
        comp.U[0] = (W[:, 0] + W[:, 1]) / 2
    before = {c: (comp.V[:, c].clone(), comp.U[c].clone()) for c in range(comp.C)}
    x = _sparse_inputs(5, 4000, 0.05)
    dense = torch.randn(4000, 5)
    x = torch.cat([x, dense])
    on = torch.zeros(x.shape[0], comp.C, dtype=torch.bool)
    on[:4000, 0] = (x[:4000, 0] > 0) | (x[:4000, 1] > 0)
    for c, f in ((2, 2), (3, 3), (4, 4)):
        on[:4000, c] = x[:4000, f] > 0
    on[4000:, 5] = True  # a component firing on dense inputs: one group, not two
    alive = torch.zeros(comp.C, dtype=torch.bool)
    alive[[0, 2, 3, 4, 5]] = True
    spare = torch.tensor([7, 9])
    taken = tr._split_components("linear1", x, on, spare=spare, alive=alive)
    assert taken.tolist() == [7]
    truth = get_entry("tms-5-2").ground_truth(tr.target.model)["linear1"]  # (5, 2, 5)
    comp_v, comp_u = comp.V.detach(), comp.U.detach()
    for c in (0, 7):  # each reads one of features 0, 1 (nearly; co-firing inputs tilt it)
        v = comp_v[:, c] / comp_v[:, c].norm()
        f = int(v.abs().argmax())
        assert f in (0, 1) and v[f].abs() > 0.97, (c, v)
        piece = torch.outer(comp_u[c], comp_v[:, c])  # (2, 5), what it does to the input
        cos = (piece.flatten() @ truth[f].flatten()) / (piece.norm() * truth[f].norm())
        assert cos > 0.95, (c, f, cos)
    reads = {int((comp_v[:, c].abs()).argmax()) for c in (0, 7)}
    assert reads == {0, 1}
    assert comp_v[:, 0].norm().item() == pytest.approx(before[0][0].norm().item(), rel=1e-5)
    for c in range(comp.C):
        if c not in (0, 7):
            assert torch.equal(comp.V[:, c], before[c][0]) and torch.equal(comp.U[c], before[c][1])


def test_split_runs_in_decompose_and_records_its_checks(tmp_path):
    cfg = _tiny(revive={"every": 3, "until_frac": 0.75, "split": 0.5, "split_min_fires": 2})
    out = decompose(parse_config(cfg), out=tmp_path / "s", target_steps=5)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    checks = [r for r in rows if "revived" in r]
    assert [r["step"] for r in checks] == [3, 6]
    assert all(set(r["split"]) <= {"linear1"} for r in checks)  # the tied follower is never split
    assert parse_config(_tiny(revive={"every": 4})).revive.split is None  # opt-in
    with pytest.raises(ConfigError, match=r"revive\.split: Input should be greater than 0"):
        parse_config(_tiny(revive={"every": 4, "split": 0}))


def test_split_only_revival_leaves_other_dead_components_alone(tmp_path):
    """``reaim: false``: a check touches only the spares that took a split half."""
    with pytest.raises(ConfigError, match="reaim: false leaves nothing to do without split"):
        parse_config(_tiny(revive={"every": 4, "reaim": False}))
    tr = _trainer(_tiny(revive={"every": 4, "split": 0.3, "reaim": False, "threshold": 1.0}))
    tr.run(0, 4)
    before = tr.cm.component("linear1").V.detach().clone()
    revived = tr.revive(4)  # threshold 1: every component is dead, so none can be split
    assert revived["linear1"].numel() == 0 and revived["linear2"].numel() == 0
    assert torch.equal(tr.cm.component("linear1").V, before)
    assert tr.metrics[-1] == {"step": 4, "revived": {"linear1": 0, "linear2": 0},
                              "split": {"linear1": 0}}


def test_a_collapsed_component_is_retired_and_nothing_else_moves():
    """``retire``: a component whose weight collapsed (alive or dead at the check), under the bar
    at the previous check too or lighter than then, is zeroed, its CI silenced in both tied
    layers, and counted dead; one that was under the bar and has grown since, and every other
    slice, are left as they were."""
    with pytest.raises(ConfigError, match=r"revive\.retire: Input should be less than 1"):
        parse_config(_tiny(revive={"every": 4, "retire": 1.0}))
    assert parse_config(_tiny(revive={"every": 4, "retire": 0.1, "reaim": False})).revive
    tr = _trainer(_tiny(revive={"every": 4, "retire": 0.1, "reaim": False, "threshold": 0.0}))
    tr.run(0, 4)
    cm, faded, hidden, grows, shrinks = tr.cm, [2, 7], 7, 11, 13  # 7 is dead at the check
    with torch.no_grad():
        comp = cm.component("linear1")
        comp.V[:, faded] *= 0.05  # weight 0.05 × 0.2 = 1% of what it was
        comp.U[faded] *= 0.2
        for layer in ("linear1", "linear2"):
            cm.per_component_ci_fn(layer).b_out[2] = 5.0  # firing everywhere
            cm.per_component_ci_fn(layer).b_out[hidden] = -10.0  # silent on these batches
        grown = comp.V[:, grows].clone()
        comp.V[:, grows] *= 0.01
    cm.refresh_ties()
    weight = comp.V.norm(dim=0) * comp.U.norm(dim=1)
    rest = torch.tensor([c for c in range(comp.C) if c not in faded])
    assert (weight[[*faded, grows]] < 0.1 * weight.median()).all()
    assert not (weight[rest[rest != grows]] < 0.1 * weight.median()).any()
    first = {k: t.detach().clone() for k, (t, _) in _slices(tr).items()}
    tr.revive(4)  # the first check only records who is under the bar
    assert tr.metrics[-1]["retired"] == {"linear1": 0, "linear2": 0}
    for key, (t, _) in _slices(tr).items():
        assert torch.equal(t, first[key]), key
    with torch.no_grad():
        comp.V[:, grows] = grown  # it grew past the bar by the next check
        comp.V[:, shrinks] *= 0.01  # and this one fell under it
    cm.refresh_ties()
    faded.append(shrinks)
    rest = torch.tensor([c for c in range(comp.C) if c not in faded])
    before = {k: t.detach().clone() for k, (t, _) in _slices(tr).items()}

    revived = tr.revive(4)

    assert revived["linear1"].numel() == 0  # reaim false: retired, not re-aimed
    follower = cm.component("linear2")  # the tie sees it
    for c in faded:
        assert not comp.V[:, c].any() and not comp.U[c].any()
        assert not follower.V[:, c].any() and not follower.U[c].any()
    x = tr.target.sampler(256, "cpu")
    _, inputs, _ = cm.forward_with_inputs(x)
    ci = cm.compute_ci(inputs)
    for layer in ("linear1", "linear2"):
        assert not ci.lower[layer][:, faded].any()  # silent on every input
    for key, (t, dim) in _slices(tr).items():
        assert torch.equal(t.index_select(dim, rest), before[key].index_select(dim, rest)), key
    assert tr.metrics[-1] == {"step": 4, "revived": {"linear1": 0, "linear2": 0},
                              "retired": {"linear1": 3, "linear2": 3}}
    assert comp.V[:, grows].any()
    tr.revive(4)  # zero weight now: a further check retires nothing
    assert tr.metrics[-1]["retired"] == {"linear1": 0, "linear2": 0}
    assert set(tr.state_dict()["below"]) == {"linear1"}  # resumed runs keep the record


def test_retire_measures_against_the_weight_weighted_median():
    """Ten real components and 94 near-zero ones (an identity layer): the plain median sits
    among the tiny ones, the weight-weighted median at the real ones."""
    from spd_mcp.model.decompose import _mass_median

    w = torch.tensor([1.1] * 10 + [0.008] * 94)
    assert float(w.median()) == pytest.approx(0.008)
    assert _mass_median(w) == pytest.approx(1.1)
    assert _mass_median(torch.tensor([1.0, 2.0, 3.0, 4.0])) == 3.0  # 4 + 3 ≥ half of 10


def test_a_resumed_run_keeps_the_retire_record(tmp_path):
    """A check retires what was under the bar at the previous check too; a run preempted between
    two checks and resumed from its checkpoint retires the same components, bit for bit."""
    cfg = parse_config(_tiny(steps=24, revive={"every": 6, "until_frac": 0.75, "retire": 0.9,
                                               "reaim": False, "threshold": 0.0}))
    full = decompose(cfg, out=tmp_path / "full", target_steps=5, reporter=lambda *_: None)

    class Preempted(Exception):
        pass

    def stop(step: int, total: int, latest: dict) -> None:
        if step == 11:  # step 10 trained after checkpoint 8, between the checks at 6 and 12
            raise Preempted

    out = tmp_path / "part"
    with pytest.raises(Preempted):
        decompose(cfg, out=out, target_steps=5, checkpoint_every=8, reporter=stop)
    resumed = decompose(cfg, out=out, target_steps=5, checkpoint_every=8, resume=True,
                        reporter=lambda *_: None)

    def rows(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]

    checks = [r for r in rows(full) if "retired" in r]
    assert [r["step"] for r in checks] == [6, 12]
    assert checks[0]["retired"]["linear1"] == 0 < checks[1]["retired"]["linear1"]
    assert rows(resumed) == rows(full)
    a, b = load_run(full).model.state_dict(), load_run(resumed).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_parallel_duplicates_are_merged_into_the_heavier():
    """``merge``: two live components with parallel rank-1 weights become one (the heavier
    carries both pieces), the lighter is zeroed and silenced; nothing else moves."""
    with pytest.raises(ConfigError, match=r"revive\.merge: Input should be less than 1"):
        parse_config(_tiny(revive={"every": 4, "merge": 1.0}))
    tr = _trainer(_tiny(revive={"every": 4, "merge": 0.99, "reaim": False, "threshold": 0.0}))
    tr.run(0, 4)
    cm, light, heavy = tr.cm, 3, 5
    comp = cm.component("linear1")
    with torch.no_grad():
        comp.V[:, light] = 0.5 * comp.V[:, heavy]
        comp.U[light] = comp.U[heavy]
        for layer in ("linear1", "linear2"):
            cm.per_component_ci_fn(layer).b_out[[light, heavy]] = 5.0  # both alive
    cm.refresh_ties()
    piece = torch.outer(comp.V[:, heavy], comp.U[heavy]).detach() * 1.5  # both together
    rest = torch.tensor([c for c in range(comp.C) if c not in (light, heavy)])
    before = {k: t.detach().clone() for k, (t, _) in _slices(tr).items()}

    tr.revive(4)

    assert tr.metrics[-1]["merged"] == {"linear1": 1, "linear2": 1}
    assert torch.allclose(torch.outer(comp.V[:, heavy], comp.U[heavy]), piece, atol=1e-6)
    assert not comp.V[:, light].any() and not comp.U[light].any()
    x = tr.target.sampler(256, "cpu")
    _, inputs, _ = cm.forward_with_inputs(x)
    ci = cm.compute_ci(inputs)
    assert not ci.lower["linear1"][:, light].any() and not ci.lower["linear2"][:, light].any()
    for key, (t, dim) in _slices(tr).items():
        assert torch.equal(t.index_select(dim, rest), before[key].index_select(dim, rest)), key
    tr.revive(4)  # nothing parallel is left
    assert tr.metrics[-1]["merged"] == {"linear1": 0, "linear2": 0}
