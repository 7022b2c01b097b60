"""Harvest speed and memory on the shipped ``tales`` run, printed as one JSON object.

- throughput: harvest accumulation vs a plain forward + CI pass (``forward_with_inputs`` +
  ``compute_ci``) over the same pre-tokenised batches, interleaved batch by batch (so machine
  load hits both alike) for ``--repeats`` rounds; ratio = harvest tokens/s / baseline tokens/s.
  Also against a lean baseline (forward + lower CI only, what the harvest needs), and the
  end-to-end ``harvest()`` (documents, plan, checkpoints, writing the stage) tokens/s.
- memory: peak RSS (VmHWM) of a full harvest in a fresh subprocess at each ``--rss-tokens``
  size; constant memory means it does not grow with tokens.
- co-firing memory in components: for each ``--cofire-sizes`` S, a fresh subprocess logs random
  sparse firing (every component fires ~20 times, 6 components per token) and builds the
  co-firing table as a merge does; peak RSS, its rise over the process before the build, the
  table's bytes (a dense table: S² x 8), and the exponent of each fitted over S.

    python benchmarks/harvest.py [--threads 1] [--tokens 40000] [--rss-tokens 20000,80000]
                                 [--cofire-sizes 2000,8000,32000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_child(tokens: int, threads: int) -> None:
    """Run one full harvest in a private data directory; print peak RSS (MB) as JSON."""
    import torch

    torch.set_num_threads(threads)
    from spd_mcp.harvest import HarvestConfig, harvest
    from spd_mcp.model.session import RunSession

    session = RunSession.load("tales")
    with tempfile.TemporaryDirectory() as home:
        os.environ["SPD_MCP_HOME"] = home
        t0 = time.perf_counter()
        out = harvest(session, HarvestConfig(n_tokens=tokens))
        seconds = time.perf_counter() - t0
    print(json.dumps({"tokens": out.n_tokens, "peak_rss_mb": round(_vm_hwm_mb(), 1),
                      "seconds": round(seconds, 2)}))


def _vm_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cofire_child(S: int, threads: int) -> None:
    """Log random sparse firing over S components, build the table; print memory as JSON."""
    import torch

    from spd_mcp.harvest import cofire

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    N, m, batch = S * 20 // 6, 6, 4096
    fire = torch.zeros(S, dtype=torch.long)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / cofire.FIRINGS
        with cofire.FiringLog(path) as log:
            for a in range(0, N, batch):
                n = min(batch, N - a)
                c = torch.multinomial(torch.ones(S), n * m, replacement=True, generator=g)
                c, _ = c.view(n, m).sort(1)
                new = torch.ones_like(c, dtype=torch.bool)
                new[:, 1:] = c[:, 1:] != c[:, :-1]
                log.append(n, torch.arange(n)[:, None].expand(n, m)[new], c[new])
                fire += torch.bincount(c[new], minlength=S)
        before = _vm_rss_mb()
        t0 = time.perf_counter()
        table = cofire.table_from_logs([path], fire)
        seconds = time.perf_counter() - t0
        log_bytes = path.stat().st_size
    peak = _vm_hwm_mb()
    print(json.dumps({
        "components": S, "tokens": N, "log_mb": round(log_bytes / 2**20, 2),
        "table_mb": round(sum(v.numel() * v.element_size() for v in table.values()) / 2**20, 3),
        "dense_table_mb": round(S * S * 8 / 2**20, 1), "peak_rss_mb": round(peak, 1),
        "rise_mb": round(peak - before, 1), "seconds": round(seconds, 2)}))


def _exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y on log x."""
    import math

    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mx) ** 2 for a in lx)


def _throughput(tokens: int, repeats: int) -> dict:
    import torch

    from spd_mcp.harvest import HarvestConfig, harvest
    from spd_mcp.harvest.accumulate import Accumulator, encode_doc, make_batch
    from spd_mcp.harvest.cofire import FIRINGS, FiringLog
    from spd_mcp.harvest.config import make_plan
    from spd_mcp.harvest.runner import resolve_config
    from spd_mcp.model.session import RunSession

    session = RunSession.load("tales")
    cm = session.cm
    _, cfg = resolve_config(session, HarvestConfig(n_tokens=tokens))
    plan = make_plan(lambda i: len(encode_doc(session, i)), cfg.n_tokens, cfg.batch_size)
    batches = [make_batch(session, plan.batch_docs(j)) for j in range(plan.n_batches)]

    @torch.inference_mode()
    def baseline(ids: torch.Tensor) -> None:
        _, inputs, _ = cm.forward_with_inputs(ids)
        cm.compute_ci(inputs)

    @torch.inference_mode()
    def lean(ids: torch.Tensor) -> None:
        _, inputs, _ = cm.forward_with_inputs(ids)
        acts = {m: cm.component(m).component_acts(inputs[m]) for m in cm.layer_names}
        for z in cm.ci_fns(inputs, acts).values():
            z.clamp(0.0, 1.0)

    for b in batches[:2]:  # warm-up
        baseline(b[0])
        lean(b[0])
        Accumulator(session, cfg).process(*b)
    t_base = t_lean = t_harv = 0.0
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp, FiringLog(Path(tmp) / FIRINGS) as log:
            acc = Accumulator(session, cfg, log)  # co-firing is counted at merge (end to end)
            for b in batches:
                t = time.perf_counter()
                baseline(b[0])
                t_base += time.perf_counter() - t
                t = time.perf_counter()
                acc.process(*b)
                t_harv += time.perf_counter() - t
                t = time.perf_counter()
                lean(b[0])
                t_lean += time.perf_counter() - t
    n = plan.n_tokens * repeats
    with tempfile.TemporaryDirectory() as home:
        os.environ["SPD_MCP_HOME"] = home
        t = time.perf_counter()
        harvest(session, cfg)
        t_e2e = time.perf_counter() - t
    base_tps, harv_tps = n / t_base, n / t_harv
    return {
        "tokens": plan.n_tokens, "batches": plan.n_batches, "repeats": repeats,
        "baseline_forward_ci_tok_s": round(base_tps),
        "lean_forward_lower_ci_tok_s": round(n / t_lean),
        "harvest_accumulate_tok_s": round(harv_tps),
        "ratio_harvest_vs_forward_ci": round(harv_tps / base_tps, 3),
        "ratio_harvest_vs_lean": round(t_lean / t_harv, 3),
        "harvest_end_to_end_tok_s": round(plan.n_tokens / t_e2e),
        "ratio_end_to_end_vs_forward_ci": round(plan.n_tokens / t_e2e / base_tps, 3),
        "end_to_end_seconds": round(t_e2e, 2),
    }


def _child(flag: str, n: int, threads: int) -> dict:
    """Run this script's ``flag n`` in a fresh process; its last line of JSON."""
    out = subprocess.run([sys.executable, __file__, flag, str(n), "--threads", str(threads)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", type=int, default=40_000, help="tokens for the throughput test")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rss-tokens", default="20000,80000", help="harvest sizes for peak RSS")
    p.add_argument("--rss-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cofire-sizes", default="2000,8000,32000",
                   help="component counts for co-firing memory ('' skips)")
    p.add_argument("--cofire-child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rss_child is not None:
        _rss_child(args.rss_child, args.threads)
        return
    if args.cofire_child is not None:
        _cofire_child(args.cofire_child, args.threads)
        return
    import torch

    torch.set_num_threads(args.threads)
    result: dict = {"benchmark": "harvest", "run": "tales", "threads": args.threads,
                    "torch": torch.__version__, "machine": platform.machine(),
                    "cpu_count": os.cpu_count()}
    result["throughput"] = _throughput(args.tokens, args.repeats)
    rss = [_child("--rss-child", int(n), args.threads) for n in args.rss_tokens.split(",")]
    result["peak_rss"] = rss
    result["rss_growth_mb"] = round(rss[-1]["peak_rss_mb"] - rss[0]["peak_rss_mb"], 1)
    if args.cofire_sizes:
        co = [_child("--cofire-child", int(S), args.threads)
              for S in args.cofire_sizes.split(",")]
        S = [r["components"] for r in co]
        result["cofire"] = co
        result["cofire_exponent"] = {k: round(_exponent(S, [r[k] for r in co]), 3)
                                     for k in ("peak_rss_mb", "rise_mb", "table_mb")}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
