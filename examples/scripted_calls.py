"""Scripted tool calls against the spd-mcp server over stdio (the same protocol agents use).
Self-checking: it asserts what it prints and exits non-zero when a claim fails.

    python examples/scripted_calls.py [--run tales] [--job-after SECONDS]

Finds a sparse circuit for a planted pronoun and tests it with interventions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.types import CallToolResult

PROMPT = (
    "once upon a time , a kind girl named mia lived in a cottage . mia had a friend called tom ."
    " tom walked to the park , and there"
)


async def call(session: ClientSession, tool: str, args: dict[str, Any]) -> CallToolResult:
    """Call a tool; a long call may answer with a background-job handle, so follow it with
    get_job until the tool's own result arrives (what an agent does)."""
    res = await session.call_tool(tool, args)
    while not res.is_error and set(res.structured_content or {}) == {"job"}:
        job = res.structured_content["job"]
        print(f"  {tool}: job {job['job_id']} {job['status']} ({job.get('stage', '')})")
        res = await session.call_tool("get_job", {"job_id": job["job_id"], "wait_s": 30})
        status = res.structured_content["job"] if not res.is_error else {}
        if status.get("status") in ("failed", "cancelled"):
            raise RuntimeError(f"{tool} (job {job['job_id']}): {status.get('error')}")
        if status.get("status") == "done":
            res.structured_content.pop("job")  # the rest is the tool's result
    return res


async def main(run: str, job_after: float | None) -> None:
    extra = ["--job-after", str(job_after)] if job_after is not None else []
    params = StdioServerParameters(command=sys.executable,  # env: keep SPD_MCP_HOME & co.
                                   args=["-m", "spd_mcp.cli", "serve", "--run", run, *extra],
                                   env=dict(os.environ))
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        info = await session.call_tool("get_model_info", {})
        layers = [x["name"] for x in info.structured_content["layers"]]
        print("layers:", layers)
        assert not info.is_error and layers, info

        graph = await call(session, "optimize_graph", {"text": PROMPT, "label_token": "he"})
        assert not graph.is_error, graph.content
        g = graph.structured_content
        probs = g["metrics"]["label_prob"]
        print("label prob:", json.dumps(probs))
        assert probs["target"] > 0.5 and probs["ci"] > 0.5, probs
        circuit = [n["key"] for n in g["circuit"]]
        alive = g["metrics"]["n_alive_start"]
        print(f"circuit: {len(circuit)} of {alive} alive nodes:", circuit)
        assert 0 < len(circuit) < alive, (len(circuit), alive)

        res = await call(session, "run_intervention", {
            "text": PROMPT, "nodes": circuit, "loss": "label", "label_token": "he",
        })
        assert not res.is_error, res.content
        lp = res.structured_content["label_prob"]
        print("intervention:", json.dumps(lp))
        # only the circuit on keeps P(he); the full model without the circuit loses it
        assert lp["ci"] > 0.5 and lp["ablated"] < lp["target"], lp

        bad = await session.call_tool("run_intervention", {"text": PROMPT, "nodes": ["nope"]})
        print("a bad key:", bad.content[0].text)
        assert bad.is_error and "node key 'nope'" in bad.content[0].text
    print("ok")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="tales")
    ap.add_argument("--job-after", type=float, default=None,
                    help="the server's job limit (0: every long call answers with a job handle)")
    a = ap.parse_args()
    asyncio.run(main(a.run, a.job_after))
