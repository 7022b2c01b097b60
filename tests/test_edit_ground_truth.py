"""Ground truth for editing on tales (issue 8's figures):

- ablating the components found for a planted pronoun removes it on held-out probes while text
  elsewhere barely changes, and a random set of the same size does nothing;
- training ≤ 4 components' vectors flips one object's colour on held-out probes and keeps every
  other object's colour.
"""

from __future__ import annotations

import pytest
import torch

from spd_mcp.editing.edit import ComponentScale, applied, scale_edit
from spd_mcp.editing.measure import MeasureSettings, Probe, measure_edit
from spd_mcp.editing.train import EditTarget, TrainSettings, rank_for_change, train_edit
from spd_mcp.harvest.query import search_by_effect
from spd_mcp.model.session import RunSession
from spd_mcp.model.text import prompt_batch
from spd_mcp.model.zoo.tales.corpus import (
    BEHAVIOURS,
    OBJECT_COLOUR,
    attribute_probes_by_object,
)

HELD_OUT_SEED = 99  # probes for measurement; edits are built from seed 7
EDIT_SEED = 7

# The recipes (also in benchmarks/edit.py and the README).
PRONOUN = "he"
PRONOUN_K = 8  # components from search_components(output_token=...), ablated where CI > 0
FLIP = {"object": "kite", "new": "green", "k": 4, "steps": 150, "n_train": 16,
        "preserve_per_object": 3, "kl_coeff": 5.0}


@pytest.fixture(scope="module")
def session() -> RunSession:
    return RunSession.load("tales")


def pronoun_probes(pronoun: str, seed: int, n: int) -> list[Probe]:
    return [Probe(prompt=p.prompt, expected=p.expected)
            for p in BEHAVIOURS["pronoun"].probes(seed=seed, n=4 * n)
            if p.expected == pronoun][:n]


@pytest.mark.slow
def test_ablating_found_pronoun_components(session: RunSession) -> None:
    # `he`; `she` is not concentrated this way in the shipped run (its top components also carry
    # induction and quote): see benchmarks/edit.py for its numbers.
    pronoun = PRONOUN
    found = search_by_effect(session, None, pronoun, k=PRONOUN_K)
    keys = [c.key for c in found.components]
    assert len(keys) == PRONOUN_K
    edit = scale_edit(session, [ComponentScale(component=k, scale=0.0, ci_threshold=0.0)
                                for k in keys])
    m = measure_edit(session, edit, MeasureSettings(
        probes=pronoun_probes(pronoun, HELD_OUT_SEED, 40), token_groups={pronoun: [pronoun]},
        n_texts=64, n_behaviour_probes=50))
    assert m.probes is not None and m.control is not None and m.control.probes is not None
    print(f"\n{pronoun}: ablating {PRONOUN_K} found components (where CI>0): P({pronoun}) on 40 "
          f"held-out probes −{m.probes.drop_pct:.1f}% (top-1 {m.probes.target_accuracy:.2f}→"
          f"{m.probes.edited_accuracy:.2f}); held-out KL {m.text.kl:.4f} nats/token "
          f"(outside {pronoun}-positions {m.text.kl_outside_groups:.4f}), ppl "
          f"{m.text.ppl_change_pct:+.2f}%; random {PRONOUN_K}: drop "
          f"{m.control.probes.drop_pct:.2f}%, KL {m.control.text.kl:.4f}; "
          f"concentration {m.concentration}")
    assert m.probes.drop_pct >= 80.0
    assert m.text.kl_outside_groups <= 0.05  # text elsewhere barely changes
    assert m.text.kl <= 0.1  # (the pronoun positions themselves are meant to change)
    assert m.control.probes.drop_pct < 10.0
    assert m.concentration is not None and m.concentration["probe_drop_ratio"] > 8
    # the other planted behaviours are intact
    for b in m.behaviours:
        if b.behaviour != "pronoun":
            assert b.edited >= 0.95 * b.target, b


@torch.no_grad()
def top1(session: RunSession, edit, prompts: list[str]) -> list[str]:
    out: list[str] = []
    for i in range(0, len(prompts), 64):
        b = prompt_batch(session, prompts[i : i + 64])
        with applied(session, edit):
            lg = session.cm.target(b.ids)[torch.arange(b.ids.shape[0]), b.last]
        out += [session.token_str(t) for t in lg.argmax(-1).tolist()]
    return out


@pytest.mark.slow
def test_training_four_components_flips_one_colour(session: RunSession) -> None:
    obj, new = FLIP["object"], FLIP["new"]
    old = OBJECT_COLOUR[obj]
    train = attribute_probes_by_object(EDIT_SEED, 600)
    held = attribute_probes_by_object(HELD_OUT_SEED, 600)
    prompts = [p.prompt for p in train[obj][: FLIP["n_train"]]]
    # the locality set: the same template with every other object
    preserve = [p.prompt for o, ps in train.items() if o != obj
                for p in ps[: FLIP["preserve_per_object"]]]
    comps = [k for k, _ in rank_for_change(session, prompts, old, new, k=FLIP["k"])]
    edit, report = train_edit(
        session, comps, [EditTarget(prompt=p, token=new) for p in prompts],
        TrainSettings(steps=FLIP["steps"], kl_coeff=FLIP["kl_coeff"], kl_batch_size=8),
        preserve=preserve)
    flipped = held[obj]
    assert len(flipped) >= 20
    rate = sum(t == new for t in top1(session, edit, [p.prompt for p in flipped])) / len(flipped)
    per_object = {}
    for o, ps in held.items():
        if o != obj:
            pred = top1(session, edit, [p.prompt for p in ps])
            per_object[o] = sum(t == p.expected for t, p in zip(pred, ps, strict=True)) / len(ps)
    others = sum(len(ps) for o, ps in held.items() if o != obj)
    m = measure_edit(session, edit, MeasureSettings(n_texts=64, control=False))
    worst = min(per_object, key=per_object.__getitem__)
    print(f"\n{obj}: {old}→{new} training {comps} ({report.n_trainable} scalars, "
          f"{report.steps} steps, {report.seconds:.1f} s): flipped on {rate:.1%} of "
          f"{len(flipped)} held-out probes; other objects worst {worst} "
          f"{per_object[worst]:.1%} ({len(per_object)} objects, {others} probes); held-out KL "
          f"{m.text.kl:.4f}; behaviours {[(b.behaviour, b.edited) for b in m.behaviours]}")
    assert len(comps) <= 4
    assert rate >= 0.9
    assert all(v >= 0.95 for v in per_object.values()), per_object
    assert m.text.kl <= 0.05
    for b in m.behaviours:
        if b.behaviour != "attribute":
            assert b.edited >= 0.95, b
