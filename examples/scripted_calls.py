"""Scripted tool calls against the spd-mcp server over stdio (the same protocol agents use).
Self-checking: it asserts what it prints and exits non-zero when a claim fails.

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
        layers = [x["name"] for x in info.structured_content["layers"]]
        print("layers:", layers)
        assert not info.is_error and layers, info

        graph = await session.call_tool(
            "optimize_graph", {"text": PROMPT, "label_token": "he"}
        )
        assert not graph.is_error, graph.content
        g = graph.structured_content
        probs = g["metrics"]["label_prob"]
        print("label prob:", json.dumps(probs))
        assert probs["target"] > 0.5 and probs["ci"] > 0.5, probs
        circuit = [n["key"] for n in g["circuit"]]
        alive = g["metrics"]["n_alive_start"]
        print(f"circuit: {len(circuit)} of {alive} alive nodes:", circuit)
        assert 0 < len(circuit) < alive, (len(circuit), alive)

        res = await session.call_tool("run_intervention", {
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
    asyncio.run(main(ap.parse_args().run))
