"""Graph-interp passes against the scripted fake Messages API (real anthropic SDK)."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

import pytest

from spd_mcp.attributions import AttributionConfig, compute_attributions, load_attributions
from spd_mcp.attributions.query import top_sources, top_targets
from spd_mcp.harvest import HarvestConfig, harvest, load_harvest
from spd_mcp.interp.client import LLMSettings
from spd_mcp.interp.graph_interp import (
    INPUT_KIND,
    OUTPUT_KIND,
    UNIFIED_KIND,
    GraphInterpError,
    LabelAnswer,
    graph_interp,
)
from spd_mcp.interp.store import LabelStore
from spd_mcp.model.session import RunSession
from tests.realclients.fake_messages_api import FakeMessagesAPI, text_block, user_text

LABEL_RE = re.compile(r'"(OUT|IN|UNI) (\S+)"')


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    """Harvest + attributions of 'tales' built once, in a private home."""
    home = tmp_path_factory.mktemp("gi_built")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPD_MCP_HOME", str(home))
        session = RunSession.load("tales")
        harvest(session, HarvestConfig(n_tokens=3000, batch_size=16))
        compute_attributions(session, AttributionConfig(n_tokens=800, batch_size=8))
        run_id = str(session.run.meta["run_id"])
    return home, run_id


def _link(built: tuple[Path, str], *stages: str) -> RunSession:
    """Link the built stages into this test's SPD_MCP_HOME."""
    home, run_id = built
    dst = Path(os.environ["SPD_MCP_HOME"]) / "runs" / run_id
    dst.mkdir(parents=True, exist_ok=True)
    for s in stages:
        (dst / s).symlink_to(home / "runs" / run_id / s)
    return RunSession.load("tales")


def _planner(body: dict) -> list[dict]:
    system = body.get("system") or ""
    if isinstance(system, list):
        system = " ".join(b.get("text", "") for b in system)
    key = re.search(r"^Component: (\S+)$", user_text(body), re.M).group(1)  # type: ignore[union-attr]
    tag = ("OUT" if "output-function pass" in system else
           "IN" if "input-function pass" in system else "UNI")
    return [text_block(json.dumps({"label": f"{tag} {key}", "confidence": 0.5,
                                   "reasoning": f"scripted for {key}"}))]


def _selection(session: RunSession) -> tuple[str, list[str], list[str], list[str]]:
    """A middle component X with firing downstream targets and upstream sources."""
    h = load_harvest(session)
    attr = load_attributions(session)
    counts = h.stats.t["fire_count"]
    firing = {k for i, k in enumerate(h.stats.keys()) if int(counts[i]) > 0}
    for x in sorted(firing, key=h.stats.index):
        if not x.startswith(("0.mlp.down:", "1.attn.v:")):
            continue
        tg = [e.key for e in top_targets(attr, x, 10, signed=False, normalize="fraction",
                                         include=["component"]) if e.key in firing][:3]
        src = [e.key for e in top_sources(attr, x, 10, signed=False, normalize="fraction",
                                          include=["component"]) if e.key in firing][:3]
        if len(tg) >= 2 and len(src) >= 2:
            return x, tg, src, sorted({x, *tg, *src}, key=h.stats.index)
    raise AssertionError("no suitable component")


def _settings(fake: FakeMessagesAPI, **kw: object) -> LLMSettings:
    return LLMSettings(base_url=fake.base_url, api_key="test", max_concurrency=4,
                       backoff_base_s=0.0, **kw)  # type: ignore[arg-type]


def test_label_answer_schema() -> None:
    assert LabelAnswer(label="  fires  on 'the' ", confidence=1, reasoning="").label == \
        "fires on 'the'"
    with pytest.raises(ValueError, match="at most 8"):
        LabelAnswer(label="one two three four five six seven eight nine", confidence=0.5,
                    reasoning="")
    with pytest.raises(ValueError):
        LabelAnswer(label="x", confidence=1.5, reasoning="")


def test_passes_see_only_earlier_labels_in_their_direction(built) -> None:
    session = _link(built, "harvest", "attributions")
    x, targets, sources, keys = _selection(session)
    layer = {name: i for i, name in enumerate(session.layers)}

    def li(key: str) -> int:
        return layer[key.rpartition(":")[0]]

    with FakeMessagesAPI(_planner, toolless_reply=None) as fake:
        out = asyncio.run(graph_interp(session, _settings(fake), keys=keys))
        reqs = fake.messages_requests("planned")
    assert [p.kind for p in out.passes] == [OUTPUT_KIND, INPUT_KIND, UNIFIED_KIND]
    assert all(p.ok == len(keys) and p.components == len(keys) for p in out.passes)
    assert not any(p.done for p in out.passes)  # a keys selection never marks a stage DONE
    assert len(reqs) == 3 * len(keys)

    first: dict[tuple[str, str], int] = {}
    for i, r in enumerate(reqs):
        tag = r.response[0]["text"].split('"label": "')[1].split(" ")[0]
        key = re.search(r"^Component: (\S+)$", user_text(r.body), re.M).group(1)
        first[(tag, key)] = i
    n_seen = {"OUT": 0, "IN": 0}
    for i, r in enumerate(reqs):
        prompt = user_text(r.body)
        key = re.search(r"^Component: (\S+)$", prompt, re.M).group(1)
        shown = LABEL_RE.findall(prompt)
        tag = r.response[0]["text"].split('"label": "')[1].split(" ")[0]
        if tag == "UNI":  # both directional labels of this component, nothing else
            assert sorted(shown) == [("IN", key), ("OUT", key)]
            assert first[("OUT", key)] < i and first[("IN", key)] < i
            continue
        for t, other in shown:
            assert t == tag, (key, shown)  # labels from this same pass only
            assert first[(t, other)] < i  # labelled earlier
            if tag == "OUT":
                assert li(other) > li(key)  # downstream
            else:
                assert li(other) < li(key)  # upstream
            n_seen[tag] += 1
    x_out = user_text(reqs[first[("OUT", x)]].body)
    x_in = user_text(reqs[first[("IN", x)]].body)
    assert any(f'"OUT {t}"' in x_out for t in targets)  # not vacuous
    assert any(f'"IN {s}"' in x_in for s in sources)
    assert n_seen["OUT"] and n_seen["IN"]
    # layer order: output pass late -> early, input pass early -> late
    out_order = [li(k) for (t, k), _ in sorted(first.items(), key=lambda kv: kv[1]) if t == "OUT"]
    in_order = [li(k) for (t, k), _ in sorted(first.items(), key=lambda kv: kv[1]) if t == "IN"]
    assert out_order == sorted(out_order, reverse=True)
    assert in_order == sorted(in_order)

    run_id = built[1]
    with LabelStore.open(run_id) as st:
        rows = st.labels(out.passes[0].stage_id)
        assert set(rows) == set(keys)
        assert set(targets) <= set(rows[x].related)
        assert set(sources) <= set(st.labels(out.passes[1].stage_id)[x].related)
        best = st.best_labels()
        assert best[x].label == f"UNI {x}" and best[x].kind == UNIFIED_KIND
        assert st.ledger(out.passes[0].stage_id).calls == len(keys)

    # resume: everything is finished, no new requests
    with FakeMessagesAPI(_planner, toolless_reply=None) as fake:
        again = asyncio.run(graph_interp(session, _settings(fake), keys=keys))
        assert fake.messages_requests() == []
    assert [p.reused for p in again.passes] == [len(keys)] * 3


def test_budget_skips_are_recorded_and_retried(built) -> None:
    session = _link(built, "harvest", "attributions")
    keys = _selection(session)[3][:3]
    with FakeMessagesAPI(_planner, toolless_reply=None) as fake:
        out = asyncio.run(graph_interp(session, _settings(fake, budget_usd=0.0), keys=keys))
        assert fake.messages_requests() == []
    assert [(p.ok, p.skipped) for p in out.passes] == [(0, 3)] * 3
    with LabelStore.open(built[1]) as st:
        assert {r.status for r in st.labels(out.passes[0].stage_id).values()} == {"skipped"}
    with FakeMessagesAPI(_planner, toolless_reply=None) as fake:  # resume with money
        out = asyncio.run(graph_interp(session, _settings(fake), keys=keys))
        assert len(fake.messages_requests("planned")) == 9
    assert [(p.ok, p.reused) for p in out.passes] == [(3, 0)] * 3


def test_missing_attributions_say_how_to_build_them(built) -> None:
    session = _link(built, "harvest")
    with pytest.raises(GraphInterpError, match="spd-mcp attributions tales"):
        asyncio.run(graph_interp(session, LLMSettings(api_key="x"), limit=2))
