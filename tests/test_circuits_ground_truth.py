"""Circuits on `tales` against planted truth: a contrastive circuit on a minimal pair finds the
agreement head noun, multi-prompt circuits share one component set, the default recipe survives
the adversarial regime, and every circuit result reports what it shows and its necessity."""

from __future__ import annotations

import collections
import math
from pathlib import Path

import pytest
import torch

from spd_mcp.analysis.intervene import run_intervention
from spd_mcp.analysis.optimize import OptimizeSettings, Task, circuit_nodes, optimize_ci
from spd_mcp.keys import ComponentKey, NodeKey
from spd_mcp.model.session import RunSession
from spd_mcp.model.zoo.tales.corpus import BEHAVIOURS, OBJECT_COLOUR
from tests.test_patching import _pair
from tests.test_server import with_client


@pytest.fixture(scope="module")
def session() -> RunSession:
    return RunSession.load("tales")


def test_minimal_pair_contrastive_circuit_contains_the_head_noun(session: RunSession) -> None:
    s = session
    IS, ARE = s.token_id("is"), s.token_id("are")
    probes = [p for p in BEHAVIOURS["agreement"].probes(seed=2027, n=30) if p.expected == "is"]
    for p in probes[:3]:
        clean, corrupt, head = _pair(s, p.prompt)
        a, b = s.encode(clean), s.encode(corrupt)
        opt = optimize_ci(s, tasks=[Task(a, len(a) - 1, IS, ARE), Task(b, len(b) - 1, ARE, IS)])
        # One shared component set keeps both answers ahead of their contrast …
        for m in opt.per_prompt:
            assert m.logit_diff is not None and m.logit_diff["ci"] > 2, m
        assert opt.components == sorted(opt.components) and opt.components
        for ci in opt.cis:  # … and uses no component outside it on either prompt
            used = {str(ComponentKey(la, int(c))) for la, g in ci.items()
                    for c in torch.nonzero((g > 0).any(0)).flatten().tolist()}
            assert used <= set(opt.components)
        # … and reads the head noun: components alive at its position on the singular prompt.
        at_head = [la for la, g in opt.ci.items() if float(g[head].max()) > 0]
        assert at_head, (clean, head)


def test_default_circuits_survive_the_adversarial_regime(session: RunSession) -> None:
    s = session
    for name in ("pronoun", "induction"):
        p = BEHAVIOURS[name].probes(seed=2028, n=1)[0]
        ids = s.encode(p.prompt)
        opt = optimize_ci(s, ids, label_token=s.token_id(p.expected))
        lp = opt.metrics.label_prob
        assert lp is not None and lp["adversarial"] > 0.5, (name, lp)
        # The fresh 20-step PGD of run_intervention agrees on the circuit's nodes.
        r = run_intervention(s, ids, circuit_nodes(opt), regimes=["adversarial"], loss="label",
                             label_token=s.token_id(p.expected))
        assert r.label_prob is not None and r.label_prob["adversarial"] > 0.5, (name, r.label_prob)
    assert OptimizeSettings().adv_coeff > 0 and OptimizeSettings().adv_mode == "persistent"


def _object(prompt: str) -> str | None:
    words = prompt.split()
    last = max(i for i, w in enumerate(words) if w == ".") + 1
    sent = words[last:]
    return sent[sent.index("the") + 1] if "the" in sent else None


def test_attribute_multi_prompt_circuit_specificity(session: RunSession) -> None:
    """A contrastive circuit shared by three prompts about one object, ablated everywhere on
    held-out prompts: it removes that object's colour, and hurts other objects' colours less on
    average (the specificity is small: colour prediction shares machinery across objects)."""
    s = session
    by: dict[str, list] = collections.defaultdict(list)
    for p in BEHAVIOURS["attribute"].probes(seed=77, n=400):
        if (o := _object(p.prompt)) is not None:
            by[o].append(p)
    objs = sorted(by, key=lambda o: (-len(by[o]), o))[:6]
    A, others = objs[0], objs[1:]
    colours = sorted(set(OBJECT_COLOUR.values()))
    tasks = []
    for p in by[A][:3]:
        ids = s.encode(p.prompt)
        logits = s.natural_ci(ids).logits[-1]
        rival = max((c for c in colours if c != p.expected), key=lambda c: float(
            logits[s.token_id(c)]))
        tasks.append(Task(ids, len(ids) - 1, s.token_id(p.expected), s.token_id(rival)))
    opt = optimize_ci(s, tasks=tasks)
    comps = [ComponentKey.parse(c) for c in opt.components]

    def drop(p) -> float:
        ids = s.encode(p.prompt)
        nodes = [NodeKey(c.layer, q, c.c) for c in comps for q in range(len(ids))]
        r = run_intervention(s, ids, nodes, regimes=["ablated"], loss="label",
                             label_token=s.token_id(p.expected))
        assert r.label_prob is not None
        return r.label_prob["target"] - r.label_prob["ablated"]

    own = [drop(p) for p in by[A][3:7]]
    rest = [drop(p) for o in others for p in by[o][:2]]
    specificity = sum(own) / len(own) - sum(rest) / len(rest)
    print(f"attribute: {len(comps)} components for '{A}'; held-out drop {sum(own) / len(own):.3f}"
          f", other objects {sum(rest) / len(rest):.3f}, specificity {specificity:.3f}")
    assert min(own) > 0.9
    assert specificity > 0.02


def test_optimize_graph_states_its_claim_and_necessity(session: RunSession, tmp_path: Path
                                                       ) -> None:
    p = BEHAVIOURS["agreement"].probes(seed=2029, n=12)
    sing = next(x for x in p if x.expected == "is")
    clean, corrupt, _ = _pair(session, sing.prompt)

    async def fn(c):
        one = await c.call_tool("optimize_graph", {"text": clean, "label_token": "is",
                                                   "contrast_token": "are", "steps": 60})
        two = await c.call_tool("optimize_graph", {"steps": 60, "prompts": [
            {"text": clean, "label_token": "is", "contrast_token": "are"},
            {"text": corrupt, "label_token": "are", "contrast_token": "is"}]})
        return one, two

    one, two = with_client(session, tmp_path / "app.db", fn)
    assert not one.is_error and not two.is_error, (one.content, two.content)
    o = one.structured_content
    assert o["metrics"]["contrast_token"] == "are" and o["metrics"]["logit_diff"]["target"] > 0
    assert "Sufficient" in o["claim"] and "computed from this input" in o["claim"]
    (nec,) = o["necessity"]
    assert nec["n_nodes"] == len(o["circuit"]) and nec["n_random"] == 8
    assert nec["ablated_prob"] <= nec["target_prob"] and math.isfinite(nec["random_prob_mean"])
    t = two.structured_content
    assert len(t["per_prompt"]) == 2 and t["components"] and len(t["necessity"]) == 2
    assert "shared by 2 prompts" in t["claim"]
