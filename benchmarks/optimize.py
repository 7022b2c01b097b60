"""``optimize_graph`` recipes on held-out ``tales`` probes, printed as JSON.

For each recipe: wall time per circuit (median, one torch thread unless ``--threads``), circuit
size, and the label probability of the circuit under CI, stochastic and adversarial masks (the
adversarial regime re-measured with ``run_intervention``'s PGD, 20 steps, on the circuit's
nodes), plus the necessity check (the circuit's nodes ablated in the full model). ``today`` is
the recipe before issue 18 (no adversarial term), ``adv1_fresh`` the agents' fix (a fresh
10-step PGD adversary every step), ``default`` the current default (a persistent adversary).

    python benchmarks/optimize.py [--threads 1] [--per-behaviour 5] [--recipes today,default]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

import torch

from spd_mcp.analysis.intervene import run_intervention
from spd_mcp.analysis.optimize import OptimizeSettings, circuit_nodes, optimize_ci
from spd_mcp.model.session import RunSession
from spd_mcp.model.zoo.tales.corpus import BEHAVIOURS

RECIPES: dict[str, dict[str, Any]] = {
    "today": {"steps": 200, "mask_type": "both", "adv_coeff": 0.0},
    "adv1_fresh": {"steps": 200, "mask_type": "both", "adv_coeff": 1.0, "adv_mode": "fresh",
                   "pgd_steps": 10},
    "default": {},
}
BEHAVIOUR_NAMES = ("pronoun", "agreement", "attribute", "induction")


def probes(per: int) -> list[tuple[str, str, str]]:
    out = []
    for name in BEHAVIOUR_NAMES:
        out += [(name, p.prompt, p.expected) for p in BEHAVIOURS[name].probes(seed=4242, n=per)]
    return out


def measure(session: RunSession, recipe: dict[str, Any], items: list[tuple[str, str, str]]
            ) -> dict[str, Any]:
    settings = OptimizeSettings(**recipe)
    rows = []
    for name, prompt, expected in items:
        ids = session.encode(prompt)
        label = session.token_id(expected)
        t0 = time.perf_counter()
        opt = optimize_ci(session, ids, label_token=label, settings=settings)
        dt = time.perf_counter() - t0
        nodes = circuit_nodes(opt)
        r = run_intervention(session, ids, nodes, regimes=["ci", "adversarial", "ablated"],
                             loss="label", label_token=label)
        assert r.label_prob is not None
        rows.append({"behaviour": name, "seconds": round(dt, 3), "n_nodes": len(nodes),
                     **{k: r.label_prob[k] for k in ("target", "ci", "adversarial", "ablated")}})
    adv = [r["adversarial"] for r in rows]
    return {
        "settings": settings.model_dump(),
        "median_seconds": round(statistics.median(r["seconds"] for r in rows), 3),
        "median_nodes": statistics.median(r["n_nodes"] for r in rows),
        "adversarial_median": round(statistics.median(adv), 4),
        "adversarial_min": round(min(adv), 4),
        "adversarial_below_0.5": sum(a < 0.5 for a in adv),
        "ci_median": round(statistics.median(r["ci"] for r in rows), 4),
        "ablated_median": round(statistics.median(r["ablated"] for r in rows), 4),
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--per-behaviour", type=int, default=5)
    ap.add_argument("--recipes", default="today,default,adv1_fresh")
    ap.add_argument("--rows", action="store_true", help="print per-probe rows too")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    session = RunSession.load("tales")
    items = probes(a.per_behaviour)
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "threads": a.threads,
                                       "platform": platform.platform()},
                           "n_probes": len(items), "recipes": {}}
    for name in a.recipes.split(","):
        res = measure(session, RECIPES[name], items)
        if not a.rows:
            res.pop("rows")
        out["recipes"][name] = res
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
