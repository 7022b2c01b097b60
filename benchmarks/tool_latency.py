"""Latency of cheap tools over stdio, against an echo tool (`ping`) on the same server.

    python benchmarks/tool_latency.py [--run tales] [--n 200]
    python benchmarks/tool_latency.py --load 4 [--n 200]

Prints one JSON object: p50 / p99 in milliseconds per tool and each cheap tool's p50 as a ratio
to the echo tool's (the baseline measured in the same run).

With ``--load N``: for a server with the worker process and one without (``--no-worker``), the
p50 / p99 of ``--n`` cheap calls (ping, tokenize, get_model_info, search_dataset, get_graph in
turn) on the idle server, then while N ``compute_graph`` calls are kept in flight (each on new
parameters, so none is a cache hit); the idle figures are the baseline of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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


STORY = ("one cold morning , a little boy named kai woke up early . the rabbit played with the "
         "boy named kai . kai liked a doll and a yellow bell . the doll was pink . the trees "
         "behind the house are sad . the end . ")
HEAVY = STORY + STORY.replace("kai", "mia").replace("boy", "girl") + "once upon a time"
"""~100 tokens: one natural graph of it takes about a second on one CPU thread."""
CHEAP = [("ping", {"message": "x"}), ("tokenize", {"text": TEXT}), ("get_model_info", {}),
         ("search_dataset", {"query": "friend called", "limit": 5})]


async def _timed(session: ClientSession, calls: list[tuple[str, dict[str, object]]], n: int
                 ) -> dict[str, float]:
    times = []
    for i in range(n):
        tool, args = calls[i % len(calls)]
        t0 = time.perf_counter()
        res = await session.call_tool(tool, args)
        times.append((time.perf_counter() - t0) * 1e3)
        assert not res.is_error, (tool, res.content)
    return {"p50_ms": round(statistics.median(times), 3), "p99_ms": round(pct(times, 0.99), 3),
            "max_ms": round(max(times), 3)}


async def under_load(run: str, n: int, load: int, worker: bool, threads: int
                     ) -> dict[str, object]:
    """Cheap-call latency idle and while ``load`` compute_graph calls are in flight."""
    args = ["-m", "spd_mcp.cli", "serve", "--run", run, "--threads", str(threads)]
    params = StdioServerParameters(command=sys.executable,
                                   args=args + ([] if worker else ["--no-worker"]))
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        g = await session.call_tool("compute_graph", {"text": TEXT})  # warm: worker, caches
        calls = [*CHEAP, ("get_graph", {"graph_id": g.structured_content["graph_id"]})]
        for tool, a in calls:
            await session.call_tool(tool, a)
        idle = await _timed(session, calls, n)
        stop, done, k = asyncio.Event(), [0], [0]

        async def heavy() -> None:
            while not stop.is_set():
                k[0] += 1  # a new threshold each time: never a cache hit
                res = await session.call_tool("compute_graph",
                                              {"text": HEAVY, "ci_threshold": 1e-7 * k[0]})
                assert not res.is_error, res.content
                done[0] += 1

        loads = [asyncio.create_task(heavy()) for _ in range(load)]
        await asyncio.sleep(1.0)  # the first heavy call is running
        t0 = time.perf_counter()
        loaded = await _timed(session, calls, n)
        wall = time.perf_counter() - t0
        stop.set()
        await asyncio.gather(*loads)
    return {"worker": worker, "idle": idle, "under_load": loaded,
            "p99_ratio": round(loaded["p99_ms"] / idle["p99_ms"], 2),
            "p50_ratio": round(loaded["p50_ms"] / idle["p50_ms"], 2),
            "heavy_calls_finished_during_measurement": done[0], "measure_wall_s": round(wall, 2)}


async def load_main(run: str, n: int, load: int, threads: int) -> dict[str, object]:
    out: dict[str, object] = {"run": run, "n": n, "heavy_in_flight": load, "threads": threads,
                              "transport": "stdio", "cpus": os.cpu_count()}
    out["modes"] = [await under_load(run, n, load, worker, threads) for worker in (False, True)]
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="tales")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--load", type=int, default=0,
                    help="heavy compute_graph calls kept in flight (0: per-tool latency only)")
    ap.add_argument("--threads", type=int, default=1, help="each server's torch threads")
    a = ap.parse_args()
    result = (asyncio.run(load_main(a.run, a.n, a.load, a.threads)) if a.load
              else asyncio.run(main(a.run, a.n)))
    print(json.dumps(result))
