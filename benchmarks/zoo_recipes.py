"""Rebuild zoo toys with their default recipes over several seeds and score them against the paper.

Each (toy, seed) is one ``spd-mcp zoo build`` (target training + SPD, on the CPU with one torch
thread) followed by its evaluation; the bar is the toy's ``paper_shortfalls`` (SPD paper
Table 1 for TMS, Figs. 6-8 and 10-13 for the residual MLPs). Prints one JSON line per build and
a Markdown table at the end; exits 1 if any build falls short.

    python benchmarks/zoo_recipes.py [--toys tms-5-2 tms-40-10 ...] [--seeds 0 1 2] [--jobs 2]
                                     [--keep DIR] [--json FILE] [--set KEY=VALUE ...]

``--set`` tries a recipe change without editing the entry: KEY is a dotted path into the config
(list items by index: ``modules.0.C=200``, ``losses.0.coeff=2e-3``, ``lr=1e-3``), VALUE is JSON
(a bare word is a string). ``--ground-truth-init`` starts each decomposition at the toy's known
solution (its first components set to the ground-truth pieces, the rest shrunk tenfold): a build
that keeps the solution shows it is a stable point of the recipe, so a random start that misses it
is an optimisation failure, not an objective that prefers something else.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

TOYS = [
    "tms-5-2", "tms-5-2-id", "tms-40-10", "tms-40-10-id", "resid-mlp", "resid-mlp-2",
    "resid-mlp-3",
]


def set_path(cfg: dict[str, Any], key: str, value: Any) -> None:
    """Set ``cfg[a][b][0]...`` for the dotted ``key`` ``a.b.0...`` (the last part may be new)."""
    *parents, last = key.split(".")
    node: Any = cfg
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def parse_set(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set wants KEY=VALUE, got {item!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def init_at_ground_truth(cm: Any, target: Any) -> None:
    """Set each decomposed layer's first k components to the toy's k ground-truth pieces
    (rank-1 by SVD) and shrink the other components tenfold."""
    import torch

    pieces = target.entry.ground_truth(target.model)
    names = {alias: path for path, alias in target.aliases().items()}
    with torch.no_grad():
        for layer, truth in pieces.items():
            comp = cm.component(names.get(layer, layer))
            k = truth.shape[0]
            if k > comp.C:
                raise ValueError(f"{layer}: {k} ground-truth pieces but C = {comp.C}")
            a, s, bh = torch.linalg.svd(truth.to(comp.V.dtype))  # truth_i = U_iᵀ V_iᵀ
            root = s[:, :1].sqrt()  # (k, 1)
            comp.V.mul_(0.1)
            comp.U.mul_(0.1)
            comp.V[:, :k] = (bh[:, 0, :] * root).T.to(comp.V.device)
            comp.U[:k] = (a[:, :, 0] * root).to(comp.U.device)


def build_and_score(
    name: str, seed: int, root: str, overrides: dict[str, Any] | None = None,
    ground_truth_init: bool = False,
) -> dict[str, Any]:
    """One build on one CPU thread, its evaluation and its shortfalls against the paper."""
    import torch

    torch.set_num_threads(1)
    from spd_mcp.model.config import parse_config
    from spd_mcp.model.decompose import decompose
    from spd_mcp.model.evaluate import evaluate_run
    from spd_mcp.model.run_io import load_run
    from spd_mcp.model.zoo import get_entry

    entry = get_entry(name)
    cfg = {**entry.default_config(), "seed": seed}
    for key, value in (overrides or {}).items():
        set_path(cfg, key, value)
    t0, cpu0 = time.time(), time.process_time()
    out = decompose(parse_config(cfg), out=Path(root) / f"{name}-s{seed}", device="cpu",
                    threads=1, overwrite=True,
                    init=init_at_ground_truth if ground_truth_init else None)
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    run = load_run(out)
    result = entry.evaluate_run(run) or evaluate_run(run)
    shortfalls = entry.paper_shortfalls(result)  # type: ignore[attr-defined]
    summary = json.loads((out / "run.json").read_text())["summary"]
    return {
        "toy": name,
        "seed": seed,
        "overrides": overrides or {},
        "ground_truth_init": ground_truth_init,
        "build_wall_s": round(wall, 1),
        "build_cpu_s": round(cpu, 1),
        "restarts": summary.get("restarts"),
        "ci_masked_recon": result["ci_masked_recon"],
        "stochastic_recon": result["stochastic_recon"],
        "layers": {
            n: {k: row[k] for k in ("alive", "expected_alive", "mmcs", "ml2r") if k in row}
            for n, row in result["layers"].items()
        },
        **{k: result[k] for k in ("neuron_contributions", "one_component_per_feature")
           if k in result},
        "shortfalls": shortfalls,
    }


def _cell(row: dict[str, Any]) -> str:
    parts = []
    for n, r in row["layers"].items():
        s = f"{n} {r['alive']}/{r.get('expected_alive', '?')}"
        if "mmcs" in r:
            s += f" MMCS {r['mmcs']:.3f} ML2R {r['ml2r']:.3f}"
        parts.append(s)
    nc = row.get("neuron_contributions")
    if nc:
        parts.append(f"NC cos {nc['mmcs']:.3f} ratio {nc['ml2r']:.3f} R² {nc['r2_diagonal']:.3f}")
    return "; ".join(parts)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| toy | seed | ours | recon (CI / stochastic) | build s (cpu) | meets paper |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ok = "yes" if not r["shortfalls"] else "no: " + "; ".join(r["shortfalls"])
        lines.append(
            f"| `{r['toy']}` | {r['seed']} | {_cell(r)} | {r['ci_masked_recon']:.2e} / "
            f"{r['stochastic_recon']:.2e} | {r['build_cpu_s']:.0f} | {ok} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--toys", nargs="+", default=TOYS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1, help="builds run side by side (1 thread each)")
    p.add_argument("--keep", type=Path, help="keep the run directories here")
    p.add_argument("--json", type=Path, help="also write the rows to this file")
    p.add_argument("--set", dest="overrides", type=parse_set, action="append", default=[],
                   metavar="KEY=VALUE", help="override a recipe setting (dotted path, JSON value)")
    p.add_argument("--ground-truth-init", action="store_true",
                   help="start at the toy's known solution (is it a stable point of the recipe?)")
    args = p.parse_args()
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="zoo-recipes-")
    root = str(args.keep or tmp.name)  # type: ignore[union-attr]
    jobs = [(t, s) for t in args.toys for s in args.seeds]
    rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(build_and_score, t, s, root, dict(args.overrides),
                               args.ground_truth_init) for t, s in jobs]
        for fut in futures:
            row = fut.result()
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\ndevice: cpu, 1 torch thread per build, {args.jobs} build(s) at a time, "
          f"{platform.machine()}\n")
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 1 if any(r["shortfalls"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
