"""``spd-mcp view [--run RUN] [--port P] [--bench DIR]``: the viewer on 127.0.0.1 (light imports).

The viewer binds loopback only: it can launch investigations and run computations, and it has no
authentication, so ``--host`` accepts only loopback addresses. To look at it from another machine,
forward the port over SSH (``ssh -L 8780:127.0.0.1:8780 host``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spd_mcp.http import LOOPBACK


def add_view_parser(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("view", help="local web viewer: runs, graphs, interventions, investigations")
    v.add_argument("--run", default="tales", help="run shown first (default: tales)")
    v.add_argument("--port", type=int, default=8780, help="port (default 8780; 0 = OS-assigned)")
    v.add_argument("--host", default="127.0.0.1",
                   help="loopback address to bind (127.0.0.1, localhost or ::1 only)")
    v.add_argument("--device", default="cpu", help="cpu | cuda | auto (default: cpu)")
    v.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    v.add_argument("--no-worker", action="store_true",
                   help="run heavy analyses in the viewer's process (also SPD_MCP_WORKER=0)")
    v.add_argument("--bench", type=Path, action="append", default=[], metavar="DIR",
                   help="a `spd-mcp bench run` results directory to show besides those under "
                        "$SPD_MCP_HOME/bench (repeatable)")


def view_command(args: argparse.Namespace) -> int:
    if args.host not in LOOPBACK:
        print("spd-mcp: error: the viewer binds loopback only (127.0.0.1, localhost, ::1), not "
              f"{args.host!r}; use an SSH tunnel to reach it from elsewhere", file=sys.stderr)
        return 2
    if not 0 <= args.port < 65536:
        print(f"spd-mcp: error: --port must be 0..65535, got {args.port}", file=sys.stderr)
        return 2
    for d in args.bench:
        if not (d / "results.jsonl").is_file() and not any(d.glob("shard-*/results.jsonl")):
            print(f"spd-mcp: error: --bench {d}: no results.jsonl there", file=sys.stderr)
            return 2
    import asyncio

    from spd_mcp.viewer.app import extra_bench_dirs
    from spd_mcp.viewer.server import serve

    try:
        extra_bench_dirs(args.bench)
    except ValueError as err:
        print(f"spd-mcp: error: {err}", file=sys.stderr)
        return 2

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from spd_mcp.model.decompose import resolve_device
    from spd_mcp.service.worker import worker_enabled

    asyncio.run(serve(args.run, host=args.host, port=args.port,
                      device=resolve_device(args.device), bench_dirs=args.bench,
                      worker=not args.no_worker and worker_enabled()))
    return 0
