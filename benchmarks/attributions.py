"""Dataset-attribution speed on the shipped ``tales`` run, printed as JSON.

(a) tokens/s of the fast pass (:class:`Accumulator`) vs the per-target-component reference
    (:func:`reference_attributions`, one backward per component / vocabulary token) on the same
    small sample (``--ref-docs`` documents, one batch), best of ``--repeats`` for the fast pass,
    with their largest relative difference;
(b) wall time of the default configuration end to end (``compute_attributions`` into a
    temporary $SPD_MCP_HOME: document encoding, all batches, writing the stage).

    python benchmarks/attributions.py [--threads 1] [--ref-docs 16] [--repeats 3] [--skip-default]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from typing import Any

import torch

from spd_mcp.attributions import (
    Accumulator,
    AttributionConfig,
    compute_attributions,
    make_batches,
    reference_attributions,
)
from spd_mcp.attributions.compute import SUM_TENSORS
from spd_mcp.attributions.runner import encode_doc
from spd_mcp.model.session import RunSession


def run(threads: int, ref_docs: int, repeats: int, skip_default: bool) -> dict[str, Any]:
    torch.set_num_threads(threads)
    session = RunSession.load("tales")
    docs = [encode_doc(session, i) for i in range(ref_docs)]
    batch = next(make_batches(docs, ref_docs, session.tokenizer.pad_id))
    n_tok = int(batch[1].sum())

    def fast() -> Any:
        acc = Accumulator(session.cm, session.topology)
        acc.add(*batch)
        return acc.result()

    fast()  # warm-up
    t_fast = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f = fast()
        t_fast = min(t_fast, time.perf_counter() - t)
    t = time.perf_counter()
    r = reference_attributions(session.cm, session.topology, [batch])
    t_ref = time.perf_counter() - t
    rel = max(float((f[k] - r[k]).abs().max() / r[k].abs().max()) for k in SUM_TENSORS)
    out: dict[str, Any] = {
        "run": session.run.meta["run_id"], "threads": threads,
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "sample_docs": len(docs), "sample_tokens": n_tok,
        "fast_tok_s": round(n_tok / t_fast, 1), "reference_tok_s": round(n_tok / t_ref, 2),
        "speedup": round(t_ref / t_fast, 1), "max_rel_diff": float(f"{rel:.2e}"),
    }
    if not skip_default:
        cfg = AttributionConfig()
        with tempfile.TemporaryDirectory() as home:
            os.environ["SPD_MCP_HOME"] = home
            t = time.perf_counter()
            res = compute_attributions(session, cfg)
            wall = time.perf_counter() - t
        out |= {"default_config": cfg.model_dump(), "default_tokens": res.n_tokens,
                "default_seconds": round(wall, 1),
                "default_tok_s": round(res.n_tokens / wall, 1)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ref-docs", type=int, default=16, help="documents timed with the reference")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-default", action="store_true", help="skip the default-config run")
    a = p.parse_args()
    print(json.dumps(run(a.threads, a.ref_docs, a.repeats, a.skip_default)))


if __name__ == "__main__":
    main()
