"""Latency of cheap tools over stdio, against an echo tool (`ping`) on the same server.

    python benchmarks/tool_latency.py [--run tales] [--n 200]

Prints one JSON object: p50 / p99 in milliseconds per tool and each cheap tool's p50 as a ratio
to the echo tool's (the baseline measured in the same run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

from mcp import ClientSession, StdioServerParameters, stdio_client

TEXT = "once upon a time , a kind girl named mia lived in a cottage . the ball was"
CALLS = {
    "ping": {"message": "x"},
    "tokenize": {"text": TEXT},
    "get_model_info": {},
    "create_prompt": {"text": TEXT},
    "search_dataset": {"query": "friend called", "limit": 5},
    "get_component_vectors": {"component": "1.mlp.down:5"},
}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def main(run: str, n: int) -> dict[str, object]:
    params = StdioServerParameters(command=sys.executable,
                                   args=["-m", "spd_mcp.cli", "serve", "--run", run])
    out: dict[str, object] = {"run": run, "n": n, "transport": "stdio"}
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        for tool, args in CALLS.items():  # warm up (e.g. the dataset index is built once)
            await session.call_tool(tool, args)
        stats: dict[str, dict[str, float]] = {}
        for tool, args in CALLS.items():
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                res = await session.call_tool(tool, args)
                times.append((time.perf_counter() - t0) * 1e3)
                assert not res.is_error, res.content
            stats[tool] = {"p50_ms": round(statistics.median(times), 3),
                           "p99_ms": round(pct(times, 0.99), 3)}
        base = stats["ping"]["p50_ms"]
        for s in stats.values():
            s["p50_vs_ping"] = round(s["p50_ms"] / base, 2)
        out["tools"] = stats
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="tales")
    ap.add_argument("--n", type=int, default=200)
    a = ap.parse_args()
    print(json.dumps(asyncio.run(main(a.run, a.n))))
