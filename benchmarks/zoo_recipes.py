"""Rebuild zoo toys with their default recipes over several seeds and score them against the paper.

Each (toy, seed) is one ``spd-mcp zoo build`` (target training + SPD, on the CPU with one torch
thread) followed by its evaluation; the bar is the toy's ``paper_shortfalls`` (SPD paper
Table 1 for TMS, Figs. 6-8 and 10-13 for the residual MLPs). Prints one JSON line per build and
a Markdown table at the end; exits 1 if any build falls short.

    python benchmarks/zoo_recipes.py [--toys tms-5-2 tms-40-10 ...] [--seeds 0 1 2] [--jobs 2]
                                     [--keep DIR] [--json FILE]
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


def build_and_score(name: str, seed: int, root: str) -> dict[str, Any]:
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
    t0, cpu0 = time.time(), time.process_time()
    out = decompose(parse_config(cfg), out=Path(root) / f"{name}-s{seed}", device="cpu",
                    threads=1, overwrite=True)
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    run = load_run(out)
    result = entry.evaluate_run(run) or evaluate_run(run)
    shortfalls = entry.paper_shortfalls(result)  # type: ignore[attr-defined]
    summary = json.loads((out / "run.json").read_text())["summary"]
    return {
        "toy": name,
        "seed": seed,
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
    args = p.parse_args()
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="zoo-recipes-")
    root = str(args.keep or tmp.name)  # type: ignore[union-attr]
    jobs = [(t, s) for t in args.toys for s in args.seeds]
    rows: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(build_and_score, t, s, root) for t, s in jobs]
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
