"""Attribution-graph speed: batched ``compute_graph`` vs the per-node reference, printed as JSON.

(a) the shipped ``tales`` run on a 22-token prompt (natural CI), reference run in full;
(b) a random Transformer (4 layers, d_model 256, 4 heads, d_mlp 1024, C = 512 on every q/k/v/o/
up/down, 64 tokens, 5% of components alive per position). The reference on (b) takes minutes on a
CPU (~3 min, one thread): by default it is timed on a random sample of target nodes and
extrapolated (fixed cost + per-node cost x number of targets; the sample tends to underestimate
the full run); ``--full-reference`` runs it fully. Values are compared on the edges into the
reference's targets (an edge missing on one side counts as 0: exact and numerical zeros are not
kept, so values ~1e-8 may appear on one side only). Timings are the best of ``--repeats``,
fast and reference interleaved so that both see the same load on a shared CPU.

    python benchmarks/graph.py [--device cpu|cuda] [--threads N] [--reference-sample 300]
                               [--full-reference] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from spd_mcp.analysis.graph import (
    AttributionGraph,
    compute_graph,
    compute_graph_reference,
    reference_graph_for,
)
from spd_mcp.model.component_model import ComponentModel
from spd_mcp.model.config import ModulePattern
from spd_mcp.model.run_io import load_run
from spd_mcp.model.topology import Topology
from spd_mcp.model.zoo.transformer import Transformer, TransformerConfig

PROMPT = (
    "once upon a time there was a little girl named lily . she liked to play in the park with her"
)


def _timed(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def _best(fn: Callable[[], Any], device: str, repeats: int) -> tuple[Any, float]:
    out, best = _timed(fn, device)
    for _ in range(repeats - 1):
        out, t = _timed(fn, device)
        best = min(best, t)
    return out, best


def compare(fast: AttributionGraph, ref: AttributionGraph, targets: Tensor | None) -> dict:
    """Max |difference| over the union of edges (an edge missing on one side counts as 0),
    restricted to the edges into ``targets`` (None: all)."""
    assert fast.node_keys == ref.node_keys, "node lists differ"
    N = fast.n_nodes
    sel = torch.ones_like(fast.edge_tgt, dtype=torch.bool)
    if targets is not None:
        sel = torch.isin(fast.edge_tgt, targets.to(fast.edge_tgt.device))
    fk = (fast.edge_tgt * N + fast.edge_src)[sel]
    rk = ref.edge_tgt * N + ref.edge_src
    keys, inv = torch.unique(torch.cat([fk, rk]), return_inverse=True)
    in_f = torch.zeros(len(keys), dtype=torch.bool, device=keys.device)
    in_r = torch.zeros_like(in_f)
    in_f[inv[: len(fk)]] = True
    in_r[inv[len(fk) :]] = True
    out: dict[str, Any] = {}
    for name, attr in (("signed", "edge_val"), ("abs_target", "edge_val_abs")):
        a = torch.zeros(len(keys), dtype=torch.float64, device=keys.device)
        b = torch.zeros_like(a)
        a[inv[: len(fk)]] = getattr(fast, attr)[sel].double()
        b[inv[len(fk) :]] = getattr(ref, attr).double()
        diff = (a - b).abs()
        out[f"max_abs_diff_{name}"] = float(diff.max()) if len(keys) else 0.0
        if name == "signed":
            only = in_f ^ in_r  # numerical zeros kept on one side only
            out["edges_compared"] = int(rk.numel())
            out["edges_in_one_only"] = int(only.sum())
            out["max_abs_in_one_only"] = float(diff[only].max()) if bool(only.any()) else 0.0
    out["max_ref_abs"] = float(ref.edge_val.abs().max()) if ref.n_edges else 0.0
    return out


def bench_tales(device: str, repeats: int) -> dict:
    run = load_run("tales", device=device)
    cm = run.model
    ids = torch.tensor(run.target.entry.tokenizer.encode(PROMPT), device=device)
    with torch.no_grad():
        _, ci = cm.ci_for(ids[None])
    ci_t = {k: v[0] for k, v in ci.lower.items()}
    topo = Topology.for_transformer(run.target.model.config)
    compute_graph(cm, topo, ids, ci_t)  # warm-up
    fast, t_fast = _best(lambda: compute_graph(cm, topo, ids, ci_t), device, repeats)
    ref, t_ref = _timed(lambda: compute_graph_reference(cm, topo, ids, ci_t), device)
    return {
        "tokens": int(ids.numel()),
        "nodes": fast.n_nodes,
        "target_nodes": sum(layer != "embed" for layer in fast.node_layer),
        "edges": fast.n_edges,
        "fast_s": round(t_fast, 4),
        "reference_s": round(t_ref, 3),
        "speedup": round(t_ref / t_fast, 1),
        **compare(fast, ref, None),
    }


def random_model(device: str) -> tuple[ComponentModel, Topology, Tensor, dict[str, Tensor]]:
    torch.manual_seed(0)
    cfg = TransformerConfig(
        vocab_size=1000, d_model=256, n_layers=4, n_heads=4, d_mlp=1024, max_len=64
    )
    pats = [ModulePattern(pattern=p, C=512) for p in ("blocks.*.attn.*", "blocks.*.mlp.*")]
    cm = ComponentModel(Transformer(cfg), pats).to(device)
    T = 64
    ids = torch.randint(0, cfg.vocab_size, (T,), device=device)
    ci = {
        n: (torch.rand(T, C, device=device) < 0.05) * torch.rand(T, C, device=device).clamp(0.01)
        for n, C in cm.Cs.items()
    }
    return cm, Topology.for_transformer(cfg), ids, ci


def bench_random(device: str, repeats: int, sample: int, full: bool) -> dict:
    """Fast and (sampled) reference timings interleaved, best of ``repeats`` each: the CPU may be
    shared, and interleaving exposes both to the same load."""
    cm, topo, ids, ci = random_model(device)
    compute_graph(cm, topo, ids[:16], {k: v[:16] for k, v in ci.items()})  # warm-up
    fast = compute_graph(cm, topo, ids, ci)
    targets = torch.tensor([layer != "embed" for layer in fast.node_layer]).nonzero()[:, 0]
    n_targets = int(targets.numel())
    g = torch.Generator().manual_seed(1)
    pick = targets[torch.randperm(n_targets, generator=g)[:sample]].sort().values
    empty = torch.zeros(0, dtype=torch.long)
    t_fast, t_fixed, t_sample = [], [], []
    for _ in range(repeats):
        fast, t = _timed(lambda: compute_graph(cm, topo, ids, ci), device)
        t_fast.append(t)
        if not full:
            _, t = _timed(lambda: reference_graph_for(cm, topo, ids, ci, empty), device)
            t_fixed.append(t)
            ref, t = _timed(lambda: reference_graph_for(cm, topo, ids, ci, pick), device)
            t_sample.append(t)
    res: dict[str, Any] = {
        "model": "Transformer(d_model=256, n_layers=4, n_heads=4, d_mlp=1024), C=512 x 24",
        "tokens": int(ids.numel()),
        "alive_frac": 0.05,
        "nodes": fast.n_nodes,
        "target_nodes": n_targets,
        "edges": fast.n_edges,
        "fast_s": round(min(t_fast), 3),
        "fast_s_runs": [round(t, 3) for t in t_fast],
    }
    if full:
        ref, t_ref = _timed(lambda: compute_graph_reference(cm, topo, ids, ci), device)
        res |= {
            "reference": {"mode": "full", "measured_s": round(t_ref, 1)},
            "speedup": round(t_ref / min(t_fast), 1),
            **compare(fast, ref, None),
        }
        return res
    per_node = max(min(t_sample) - min(t_fixed), 0.0) / len(pick)
    t_ref = min(t_fixed) + per_node * n_targets
    res |= {
        "reference": {
            "mode": "sample",
            "sample_targets": len(pick),
            "measured_s": round(min(t_sample), 2),
            "fixed_s": round(min(t_fixed), 3),
            "per_node_ms": round(per_node * 1e3, 3),
            "extrapolated_s": round(t_ref, 1),
        },
        "speedup": round(t_ref / min(t_fast), 1),
        **compare(fast, ref, pick),
    }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="timings: best of N")
    ap.add_argument("--reference-sample", type=int, default=300, help="target nodes to time")
    ap.add_argument("--full-reference", action="store_true", help="run the reference fully")
    args = ap.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {
        "benchmark": "attribution_graph",
        "device": args.device,
        "device_name": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tales": bench_tales(args.device, args.repeats),
        "random": bench_random(
            args.device, args.repeats, args.reference_sample, args.full_reference
        ),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
