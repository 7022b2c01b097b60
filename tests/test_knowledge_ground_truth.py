"""Ground truth: search_components by a planted pronoun's output token returns components whose
ablation lowers that pronoun's probability on held-out probes (and a random set does not)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from mcp import Client

from spd_mcp.analysis.intervene import run_intervention
from spd_mcp.keys import NodeKey
from spd_mcp.model.session import RunSession
from spd_mcp.model.zoo.tales.corpus import BEHAVIOURS
from spd_mcp.server import build_server

HELD_OUT_SEED = 99  # the SPD data stream and the dataset sample use seed 1


def mean_drop(session: RunSession, keys: list[str], pronoun: str, n: int = 10) -> float:
    probes = [p for p in BEHAVIOURS["pronoun"].probes(seed=HELD_OUT_SEED, n=4 * n)
              if p.expected == pronoun][:n]
    comps = session.keys.components(keys)
    tok = session.token_id(pronoun)
    drops = []
    for p in probes:
        ids = session.encode(p.prompt)
        nodes = [NodeKey(c.layer, q, c.c) for c in comps for q in range(len(ids))]
        r = run_intervention(session, ids, nodes, regimes=["ablated"], loss="label",
                             label_token=tok, positions=[])
        assert r.label_prob is not None
        drops.append(1 - r.label_prob["ablated"] / r.label_prob["target"])
    return sum(drops) / len(drops)


@pytest.mark.parametrize("pronoun", ["she", "he"])
def test_search_by_output_token_finds_necessary_components(pronoun: str, tmp_path: Path) -> None:
    session = RunSession.load("tales")

    async def main() -> list[str]:
        async with Client(build_server(session=session, db_path=tmp_path / "a.db")) as c:
            res = await c.call_tool("search_components", {"output_token": pronoun, "limit": 10})
            assert not res.is_error, res.content
            assert res.structured_content["ranked_by"] == "effect"
            return [x["key"] for x in res.structured_content["components"]]

    keys = asyncio.run(main())
    assert len(keys) == 10
    found = mean_drop(session, keys, pronoun)
    rng = random.Random(0)
    every = [f"{layer}:{c}" for layer, C in session.keys.Cs.items() for c in range(C)]
    control = mean_drop(session, rng.sample(every, 10), pronoun)
    print(f"\n{pronoun}: ablating the 10 found components lowers P on held-out probes by "
          f"{found:.1%}; 10 random components: {control:.1%}")
    assert found >= 0.5
    assert control < 0.1
