"""Node and component patterns expand to exactly the hand-written keys; interventions and
ablations report log-prob, logits and logit differences and random same-size controls."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from mcp import Client

from spd_mcp.keys import BadKeyError
from spd_mcp.model.session import RunSession
from spd_mcp.server import build_server

PROMPT = "mia found a ball in the park . the ball was"


@pytest.fixture(scope="module")
def session() -> RunSession:
    return RunSession.load("tales")


def test_patterns_expand_to_the_hand_written_keys(session: RunSession) -> None:
    ks, T = session.keys, 12
    C = ks.Cs

    def nodes(pats: list[str], **kw: Any) -> list[str]:
        return [str(n) for n in ks.expand_nodes(pats, T, **kw)[0]]

    assert nodes(["1.attn.v:5:*"]) == [f"1.attn.v:5:{c}" for c in range(C["1.attn.v"])]
    assert nodes(["*:5:*"]) == [f"{la}:5:{c}" for la in C for c in range(C[la])]
    assert nodes(["1.mlp.up:*:7"]) == [f"1.mlp.up:{p}:7" for p in range(T)]
    assert nodes(["0.attn.q:*"]) == [f"0.attn.q:{p}:{c}" for p in range(T)
                                     for c in range(C["0.attn.q"])]
    # Duplicates collapse, order is kept, and plain keys pass through.
    assert nodes(["1.attn.v:5:3", "1.attn.v:5:*"])[:2] == ["1.attn.v:5:3", "1.attn.v:5:0"]
    assert len(nodes(["1.attn.v:5:3", "1.attn.v:5:*"])) == C["1.attn.v"]
    # @alive keeps exactly the nodes with natural CI > 0.
    ids = session.encode(PROMPT)
    ci = session.natural_ci(ids).ci
    alive = {la: [(int(p), int(c)) for p, c in torch.nonzero(g > 0).tolist()]
             for la, g in ci.items()}
    want = sorted(f"{la}:5:{c}" for la, g in ci.items()
                  for c in torch.nonzero(g[5] > 0).flatten().tolist())
    assert sorted(nodes(["*:5:*@alive"], alive=alive)) == want
    assert len(nodes(["alive"], alive=alive)) == sum(int((g > 0).sum()) for g in ci.values())
    comps, counts = ks.expand_components(["1.mlp.down:*", "0.attn.k:3"])
    assert [str(c) for c in comps] == [f"1.mlp.down:{c}" for c in range(C["1.mlp.down"])] + [
        "0.attn.k:3"]
    assert counts == {"1.mlp.down:*": C["1.mlp.down"]}
    with pytest.raises(BadKeyError, match=r"'\*:\*:\*' expands to \d+ nodes; at most 4096"):
        ks.expand_nodes(["*:*:*"], T)
    with pytest.raises(BadKeyError, match="position 12 out of range"):
        ks.expand_nodes(["1.attn.v:12:*"], T)
    with pytest.raises(BadKeyError, match=r"unknown layer '9\.attn\.v'"):
        ks.expand_nodes(["9.attn.v:1:*"], T)
    with pytest.raises(BadKeyError, match="must look like"):
        ks.expand_components(["1.attn.v:*:*"])


def _call(session: RunSession, db: Path, calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    async def main() -> list[Any]:
        out = []
        async with Client(build_server(session=session, db_path=db, auto_prepare=False)) as c:
            for name, args in calls:
                r = await c.call_tool(name, args)
                out.append(r)
        return out

    return asyncio.run(main())


def test_tools_expand_patterns_and_report_metrics_and_controls(session: RunSession,
                                                               tmp_path: Path) -> None:
    ids = session.encode(PROMPT)
    ci = session.natural_ci(ids).ci
    hand = [f"{la}:9:{c}" for la, g in ci.items()
            for c in torch.nonzero(g[9] > 0).flatten().tolist()]
    args = {"text": PROMPT, "regimes": ["ablated"], "loss": "label", "label_token": "red",
            "contrast_token": "blue"}
    pat, listed, abl, bad, ok = _call(session, tmp_path / "app.db", [
        ("run_intervention", {**args, "nodes": ["*:9:*@alive"], "random_controls": 4}),
        ("run_intervention", {**args, "nodes": hand}),
        ("run_ablation", {"text": PROMPT, "components": ["1.mlp.down:*@alive"],
                          "label_token": "red", "contrast_token": "blue", "random_controls": 3}),
        ("run_intervention", {**args, "nodes": ["*:*:*"]}),
        ("get_model_info", {}),
    ])
    p, h = pat.structured_content, listed.structured_content
    assert not pat.is_error and not listed.is_error
    assert p["expanded"] == {"*:9:*@alive": len(hand)} and p["n_nodes"] == len(hand)
    assert p["label_prob"] == h["label_prob"]  # the pattern is the hand-written list
    m = p["label_metrics"]
    logits = session.natural_ci(ids).logits
    red, blue = session.token_id("red"), session.token_id("blue")
    assert m["target"]["logit_diff"] == pytest.approx(float(logits[-1, red] - logits[-1, blue]),
                                                      abs=1e-4)
    for reg in ("target", "ablated"):
        assert m[reg]["prob"] == pytest.approx(math.exp(m[reg]["logprob"]), abs=1e-5)
        assert m[reg]["prob"] == pytest.approx(p["label_prob"][reg], abs=1e-6)
    ctrl = p["controls"]
    assert ctrl["n"] == 4 and len(ctrl["sets"]) == 3
    for s in ctrl["sets"]:  # same size, same (layer, position) groups, disjoint from the set
        assert len(s) == len(hand) and not set(s) & set(hand)
        assert sorted(k.rsplit(":", 1)[0] for k in s) == sorted(k.rsplit(":", 1)[0] for k in hand)
    # Every alive node at position 9 is in the set: controls are completed with dead nodes.
    assert any("completed with dead components" in n for n in p["notes"])
    spread = ctrl["label"]["ablated"]
    assert spread["prob_min"] <= spread["prob_mean"] <= spread["prob_max"]
    a = abl.structured_content
    assert not abl.is_error and a["controls"]["n"] == 3 and a["label_metrics"]["ablated"]
    n_alive_down = int((ci["1.mlp.down"] > 0).any(0).sum())
    assert a["expanded"] == {"1.mlp.down:*@alive": n_alive_down}
    assert bad.is_error and "'*:*:*' expands to" in bad.content[0].text
    assert not ok.is_error
