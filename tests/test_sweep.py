"""Ablation sweeps on `tales`: each row equals the ablated regime, and the greedy necessary set
for a held-out pronoun removes it while random same-size sets do not."""

from __future__ import annotations

import math

import pytest
import torch

from spd_mcp.analysis.intervene import run_intervention
from spd_mcp.analysis.sweep import ablation_sweep, alive_components
from spd_mcp.keys import ComponentKey, NodeKey
from spd_mcp.model.session import RunSession
from spd_mcp.model.zoo.tales.corpus import BEHAVIOURS


@pytest.fixture(scope="module")
def session() -> RunSession:
    return RunSession.load("tales")


def _ablated_prob(s: RunSession, ids: list[int], comps: list[str], label: int) -> float:
    nodes = [NodeKey(k.layer, p, k.c) for k in map(ComponentKey.parse, comps)
             for p in range(len(ids))]
    r = run_intervention(s, ids, nodes, regimes=["ablated"], loss="label", label_token=label)
    assert r.label_prob is not None
    return r.label_prob["ablated"]


def test_sweep_rows_equal_the_ablated_regime(session: RunSession) -> None:
    probe = BEHAVIOURS["pronoun"].probes(seed=31, n=1)[0]
    ids = session.encode(probe.prompt)
    label = session.token_id(probe.expected)
    other = session.token_id("he" if probe.expected == "she" else "she")
    r = ablation_sweep(session, ids, label, contrast=other, top=5)
    assert r.n_candidates == len(alive_components(session, session.natural_ci(ids).ci))
    assert r.target.prob > 0.9 and r.target.logit_diff is not None and r.target.logit_diff > 0
    lps = [e.ablated.logprob for e in r.ranked]
    assert lps == sorted(lps)  # strongest first
    for e in r.ranked[:3]:
        assert e.ablated.prob == pytest.approx(
            _ablated_prob(session, ids, [e.component], label), abs=1e-5)
        assert e.ablated.prob == pytest.approx(math.exp(e.ablated.logprob), abs=1e-5)
    # A base set is ablated in every row: the row for X on base B equals ablating B + X.
    base = [ComponentKey.parse(r.ranked[0].component)]
    rb = ablation_sweep(session, ids, label, base=base, top=2)
    assert rb.base_ablated is not None
    assert rb.base_ablated.prob == pytest.approx(r.ranked[0].ablated.prob, abs=1e-6)
    assert r.ranked[0].component not in {e.component for e in rb.ranked}
    assert rb.ranked[0].ablated.prob == pytest.approx(
        _ablated_prob(session, ids, [r.ranked[0].component, rb.ranked[0].component], label),
        abs=1e-5)


@pytest.mark.parametrize("seed", [101, 202])
def test_greedy_set_is_necessary_and_random_controls_are_not(session: RunSession,
                                                             seed: int) -> None:
    probe = BEHAVIOURS["pronoun"].probes(seed=seed, n=1)[0]
    ids = session.encode(probe.prompt)
    label = session.token_id(probe.expected)
    torch.manual_seed(0)
    r = ablation_sweep(session, ids, label, greedy_steps=16, stop_prob=0.01, random_controls=20)
    assert r.reached, [g.model_dump() for g in r.greedy]
    assert len(r.necessary_set) <= 16
    final = r.greedy[-1].ablated.prob
    assert final <= 0.01 * r.target.prob
    assert final == pytest.approx(_ablated_prob(session, ids, r.necessary_set, label), abs=1e-5)
    probs = [g.ablated.prob for g in r.greedy]
    assert r.control is not None and r.control.n == 20
    assert r.control.prob_mean > 0.9 * r.target.prob  # random same-size sets barely matter
    for s in r.control.sets:  # same layers, same counts, disjoint from the set
        assert sorted(ComponentKey.parse(k).layer for k in s) == sorted(
            ComponentKey.parse(k).layer for k in r.necessary_set)
        assert not set(s) & set(r.necessary_set)
        assert not set(s) & {e.component for e in r.ranked}  # never the strongest candidates
    assert all(0 <= e.ci_at_label <= e.natural_ci_max for e in r.ranked)
    assert probs[-1] == min(probs)
