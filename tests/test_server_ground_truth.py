"""Ground truth through the tools: a planted `tales` pronoun has a small, necessary circuit."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mcp import Client

from spd_mcp.model.session import RunSession
from spd_mcp.model.zoo.tales.corpus import BEHAVIOURS
from spd_mcp.server import build_server


def test_pronoun_circuit_is_sparse_sufficient_and_necessary(tmp_path: Path) -> None:
    probe = BEHAVIOURS["pronoun"].probes(seed=7, n=1)[0]
    assert probe.expected in ("he", "she")
    session = RunSession.load("tales")

    async def main() -> tuple[dict, dict]:
        async with Client(build_server(session=session, db_path=tmp_path / "app.db")) as c:
            seen: list[tuple[float, float | None]] = []

            async def on_progress(done: float, total: float | None, message: str | None) -> None:
                seen.append((done, total))

            g = await c.call_tool("optimize_graph", {"text": probe.prompt,
                                                     "label_token": probe.expected},
                                  progress_callback=on_progress)
            assert len(seen) >= 3 and seen[-1][0] == seen[-1][1]  # progress reached the client
            assert not g.is_error, g.content
            graph = g.structured_content
            nodes = [n["key"] for n in graph["circuit"]]
            r = await c.call_tool("run_intervention", {
                "text": probe.prompt, "nodes": nodes, "regimes": ["ci", "ablated"],
                "loss": "label", "label_token": probe.expected,
            })
            assert not r.is_error, r.content
            return graph, r.structured_content

    graph, inter = asyncio.run(main())
    m = graph["metrics"]
    n_circuit = len(graph["circuit"])
    print(f"\npronoun probe: {n_circuit} of {m['n_alive_start']} alive nodes; label prob "
          f"{m['label_prob']}; intervention {inter['label_prob']}")
    assert n_circuit == m["n_active"] and 0 < n_circuit <= m["n_alive_start"] / 50
    assert m["label_prob"]["ci"] >= 0.5
    assert inter["label_prob"]["ci"] >= 0.5  # the circuit alone predicts the pronoun
    target = inter["label_prob"]["target"]
    assert target > 0.9
    assert inter["label_prob"]["ablated"] <= 0.5 * target  # and the model needs it
    # The graph is built on the optimised CI: its component nodes are exactly the circuit.
    assert graph["n_nodes"] >= n_circuit
