"""Scripted tool calls against the spd-mcp server over stdio (the same protocol agents use).

    python examples/scripted_calls.py [--run tales]

Finds a sparse circuit for a planted pronoun and tests it with interventions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from mcp import ClientSession, StdioServerParameters, stdio_client

PROMPT = (
    "once upon a time , a kind girl named mia lived in a cottage . mia had a friend called tom ."
    " tom walked to the park , and there"
)


async def main(run: str) -> None:
    params = StdioServerParameters(command=sys.executable,
                                   args=["-m", "spd_mcp.cli", "serve", "--run", run])
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        info = await session.call_tool("get_model_info", {})
        print("layers:", [x["name"] for x in info.structured_content["layers"]])
        graph = await session.call_tool(
            "optimize_graph", {"text": PROMPT, "label_token": "he"}
        )
        g = graph.structured_content
        print("label prob:", json.dumps(g["metrics"]["label_prob"]))
        circuit = [n["key"] for n in g["circuit"]]
        print(f"circuit: {len(circuit)} of {g['metrics']['n_alive_start']} alive nodes:", circuit)
        res = await session.call_tool("run_intervention", {
            "text": PROMPT, "nodes": circuit, "loss": "label", "label_token": "he",
        })
        print("intervention:", json.dumps(res.structured_content["label_prob"]))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="tales")
    asyncio.run(main(ap.parse_args().run))
