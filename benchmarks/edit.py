"""Editing on the shipped ``tales`` run, printed as one JSON object (issue 8's figures).

- ``pronoun``: ablate the K components ``search_components(output_token=P)`` ranks first, only
  where their CI > 0; P's probability drop on held-out probes, KL / perplexity on held-out text,
  and the same for K random components alive on that text (the concentration ratio).
  ``he`` is also shown after screening out candidates whose solo ablation changes training text
  by more than 0.005 nats/token (``screen_components``).
- ``flip``: train the 4 components ``rank_for_change`` picks (read + write vectors, rank-1
  adapters) to turn kite → green, vs fine-tuning the same layers' whole matrices for the same
  steps with the same objective, optimiser and penalty; and both without the KL penalty.
  Reported: flip rate on held-out probes, worst other-object accuracy, held-out KL, seconds.
- ``exactness``: empty-edit KL and |baked − runtime| for an ablation.

    python benchmarks/edit.py [--threads 1] [--steps 150]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch


def pronoun(session, pron: str, k: int, max_kl: float | None) -> dict:
    from spd_mcp.editing.edit import ComponentScale, scale_edit
    from spd_mcp.editing.measure import (
        MeasureSettings,
        Probe,
        measure_edit,
        screen_components,
    )
    from spd_mcp.harvest.query import search_by_effect
    from spd_mcp.model.zoo.tales.corpus import BEHAVIOURS

    cands = [c.key for c in search_by_effect(session, None, pron, k=4 * k).components]
    if max_kl is not None:
        cands = [key for key, kl in screen_components(session, cands) if kl <= max_kl]
    keys = cands[:k]
    probes = [Probe(prompt=p.prompt, expected=p.expected)
              for p in BEHAVIOURS["pronoun"].probes(seed=99, n=4 * 40) if p.expected == pron][:40]
    edit = scale_edit(session, [ComponentScale(component=key, scale=0.0, ci_threshold=0.0)
                                for key in keys])
    m = measure_edit(session, edit, MeasureSettings(probes=probes, token_groups={pron: [pron]},
                                                    behaviours=False))
    assert m.probes and m.control and m.control.probes
    return {"k": len(keys), "screened_max_kl": max_kl, "components": keys,
            "drop_pct": m.probes.drop_pct, "top1_after": m.probes.edited_accuracy,
            "heldout_kl": m.text.kl, "kl_outside_pronoun_positions": m.text.kl_outside_groups,
            "ppl_change_pct": m.text.ppl_change_pct,
            "random_drop_pct": m.control.probes.drop_pct, "random_kl": m.control.text.kl,
            "kl_ratio": (m.concentration or {}).get("kl_ratio")}


def flip(session, steps: int, mode: str, kl_coeff: float) -> dict:
    from spd_mcp.editing.edit import applied
    from spd_mcp.editing.measure import MeasureSettings, measure_edit
    from spd_mcp.editing.train import (
        EditTarget,
        TrainSettings,
        rank_for_change,
        train_edit,
    )
    from spd_mcp.model.text import prompt_batch
    from spd_mcp.model.zoo.tales.corpus import OBJECT_COLOUR, attribute_probes_by_object

    obj, new = "kite", "green"  # (ball → blue also turns the other red objects blue: README)
    train = attribute_probes_by_object(7, 600)
    held = attribute_probes_by_object(99, 600)
    prompts = [p.prompt for p in train[obj][:16]]
    preserve = [p.prompt for o, ps in train.items() if o != obj for p in ps[:3]]
    comps = [k for k, _ in rank_for_change(session, prompts, OBJECT_COLOUR[obj], new, k=4)]
    edit, rep = train_edit(session, comps, [EditTarget(prompt=p, token=new) for p in prompts],
                           TrainSettings(steps=steps, kl_coeff=kl_coeff, kl_batch_size=8,
                                         mode=mode), preserve=preserve)

    @torch.no_grad()
    def acc(ps: list, want: str | None) -> float:
        b = prompt_batch(session, [p.prompt for p in ps])
        with applied(session, edit):
            lg = session.cm.target(b.ids)[torch.arange(len(ps)), b.last]
        top = [session.token_str(t) for t in lg.argmax(-1).tolist()]
        return sum(t == (want or p.expected) for t, p in zip(top, ps, strict=True)) / len(ps)

    others = {o: acc(ps, None) for o, ps in held.items() if o != obj}
    worst = min(others, key=others.__getitem__)
    m = measure_edit(session, edit, MeasureSettings(control=False))
    return {"mode": mode, "kl_coeff": kl_coeff, "components": comps,
            "n_trainable": rep.n_trainable, "steps": steps, "train_seconds": rep.seconds,
            "flip_rate": acc(held[obj], new), "n_flip_probes": len(held[obj]),
            "worst_other_object": [worst, others[worst]],
            "mean_other_object_accuracy": sum(others.values()) / len(others),
            "heldout_kl": m.text.kl, "ppl_change_pct": m.text.ppl_change_pct,
            "behaviours": {b.behaviour: b.edited for b in m.behaviours}}


@torch.no_grad()
def exactness(session) -> dict:
    from spd_mcp.editing.bake import export_baked, load_edited_target
    from spd_mcp.editing.edit import ComponentScale, Edit, edited_logits, scale_edit
    from spd_mcp.editing.measure import MeasureSettings, measure_edit

    empty = measure_edit(session, Edit(), MeasureSettings(control=False, behaviours=False))
    x = session.ids_tensor(session.encode(
        "once upon a time , a kind girl named mia lived in a cottage . mia walked to the park"))
    edit = scale_edit(session, [ComponentScale(component=k, scale=0.0)
                                for k in ("1.mlp.down:3", "0.attn.v:10", "1.attn.o:5")])
    with tempfile.TemporaryDirectory() as d:
        baked = load_edited_target(export_baked(session, edit, Path(d) / "e"))(x)
    runtime = edited_logits(session, edit, x)
    return {"empty_edit_kl": empty.text.kl,
            "baked_vs_runtime_max_abs_logit": float((baked - runtime).abs().max()),
            "baked_vs_runtime_max_abs_prob": float(
                (baked.softmax(-1) - runtime.softmax(-1)).abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from spd_mcp.model.session import RunSession

    t0 = time.time()
    s = RunSession.load("tales")
    out = {
        "device": "cpu", "threads": args.threads, "machine": platform.machine(),
        "exactness": exactness(s),
        "pronoun": {"she": pronoun(s, "she", 15, None), "he": pronoun(s, "he", 15, None),
                    "he_screened": pronoun(s, "he", 15, 0.005)},
        "flip": [flip(s, args.steps, mode, kl)
                 for kl in (5.0, 0.0) for mode in ("components", "full_matrix")],
    }
    out["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
