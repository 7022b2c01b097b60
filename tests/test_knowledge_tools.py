"""Harvest-backed tools through the SDK client: info, examples, search, and the missing-harvest
error."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from spd_mcp.harvest import HarvestConfig, harvest
from spd_mcp.model.session import RunSession
from spd_mcp.server import build_server


@pytest.fixture(scope="module")
def session() -> RunSession:
    return RunSession.load("tales")


def call(session: RunSession, db: Path, calls: list[tuple[str, dict[str, Any]]],
         auto_prepare: bool = False) -> list[Any]:
    async def main() -> list[Any]:
        server = build_server(session=session, db_path=db, auto_prepare=auto_prepare)
        async with Client(server) as c:
            return [await c.call_tool(name, args) for name, args in calls]

    return asyncio.run(main())


def test_missing_harvest_is_a_clear_error(session: RunSession, tmp_path: Path) -> None:
    [res] = call(session, tmp_path / "a.db", [("get_component_info", {"component": "0.attn.q:0"})])
    assert res.is_error and "spd-mcp harvest tales" in res.content[0].text


def test_info_examples_search(session: RunSession, tmp_path: Path) -> None:
    harvest(session, HarvestConfig(n_tokens=6000, batch_size=16))
    probe_text = "mia found a ball in the park . the ball was"
    found, = call(session, tmp_path / "a.db", [
        ("search_components", {"input_token": "ball", "rank_by": "precision", "limit": 5})])
    assert not found.is_error, found.content
    top = found.structured_content["components"][0]
    assert top["detail"]["recall"] > 0 and not top["is_bias"]
    key = top["key"]
    info, ex, probe, bad, layer, model = call(session, tmp_path / "a.db", [
        ("get_component_info", {"component": key}),
        ("get_component_activation_examples", {"component": key, "limit": 5, "order": "ci"}),
        ("probe_component", {"component": key, "text": probe_text}),
        ("get_component_info", {"component": "1.attn.o:999"}),
        ("search_components", {"layer": "0.attn.q", "limit": 100, "include_bias": True}),
        ("get_model_info", {}),
    ])
    assert model.structured_content["analyses"]["harvest"] is True
    info = info.structured_content
    assert info["key"] == key and info["summary"]["fire_count"] > 0
    assert "ball" in [t["token"] for t in info["top_input_tokens"]]
    # The component found for "ball" fires on "ball" in a fresh prompt.
    rows = probe.structured_content["positions"]
    assert any(r["token"] == "ball" and r["ci"] > 0 for r in rows)
    exs = ex.structured_content["examples"]
    assert exs and all(f"[[{e['tokens'][e['firing_index']]}]]" in e["text"] for e in exs)
    assert all(e["ci"][e["firing_index"]] > 0 for e in exs)
    cis = [e["ci"][e["firing_index"]] for e in exs]
    assert cis == sorted(cis, reverse=True)
    assert bad.is_error and "C=128" in bad.content[0].text
    comps = layer.structured_content["components"]
    dens = [c["density"] for c in comps]
    assert dens == sorted(dens, reverse=True)
    assert all(c["is_bias"] == (c["density"] > 0.5) for c in comps)
    assert layer.structured_content["excluded_bias"] == 0


def test_attribution_tools(session: RunSession, tmp_path: Path) -> None:
    from spd_mcp.attributions import AttributionConfig, compute_attributions

    missing, = call(session, tmp_path / "a.db", [("get_component_attributions", {"key": "x"})])
    assert missing.is_error and "spd-mcp attributions tales" in missing.content[0].text
    compute_attributions(session, AttributionConfig(n_tokens=1500, batch_size=8))
    src, tgt, one, bad, info = call(session, tmp_path / "a.db", [
        ("get_component_attributions", {"key": "1.mlp.down:5", "top_k": 5}),
        ("get_component_attributions", {"key": "0.attn.o:5", "direction": "targets",
                                        "signed": False, "top_k": 5}),
        ("get_attribution_strength", {"source": "0.attn.o:5", "target": "1.mlp.up:3"}),
        ("get_attribution_strength", {"source": "1.mlp.down:5", "target": "0.attn.q:1"}),
        ("get_model_info", {}),
    ])
    assert info.structured_content["analyses"]["dataset_attributions"] is True
    entries = src.structured_content["entries"]
    assert entries and all(not e["key"].startswith("1.mlp.down") for e in entries)
    vals = [e["value"] for e in entries]
    assert vals == sorted(vals, reverse=True)
    absvals = [abs(e["value"]) for e in tgt.structured_content["entries"]]
    assert absvals == sorted(absvals, reverse=True)
    assert isinstance(one.structured_content["value"], float)
    assert not bad.is_error and bad.structured_content["value"] == 0.0  # not upstream


def test_harvest_is_built_on_first_use_with_progress(session: RunSession, tmp_path: Path) -> None:
    seen: list[tuple[float, float | None, str | None]] = []

    async def main() -> Any:
        server = build_server(session=session, db_path=tmp_path / "a.db")
        async with Client(server) as c:
            async def on_progress(done: float, total: float | None, msg: str | None) -> None:
                seen.append((done, total, msg))

            info = await c.call_tool("get_component_info", {"component": "0.attn.q:0"},
                                     progress_callback=on_progress)
            again = await c.call_tool("get_model_info", {})
            return info, again

    info, model = asyncio.run(main())
    assert not info.is_error, info.content
    assert info.structured_content["n_tokens"] >= 200_000
    assert seen and "harvest" in (seen[-1][2] or "") and seen[-1][0] == seen[-1][1]
    assert model.structured_content["analyses"]["harvest"] is True
