"""Labels over MCP: stored labels appear in get_component_info and search_components, and
label_component labels on demand through the real anthropic SDK against the local fake."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from spd_mcp.harvest import HarvestConfig, harvest
from spd_mcp.interp.store import LabelRow, LabelStore, labels_path
from spd_mcp.model.session import RunSession
from spd_mcp.server import build_server
from tests.realclients.fake_messages_api import FakeMessagesAPI, text_block, user_text


@pytest.fixture(scope="module")
def session() -> RunSession:
    return RunSession.load("tales")


def call(session: RunSession, db: Path, calls: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    async def main() -> list[Any]:
        async with Client(build_server(session=session, db_path=db, auto_prepare=False)) as c:
            return [await c.call_tool(name, args) for name, args in calls]

    return asyncio.run(main())


def test_stored_labels_are_served(session: RunSession, tmp_path: Path) -> None:
    harvest(session, HarvestConfig(n_tokens=3000, batch_size=16))
    run_id = str(session.run.meta["run_id"])
    with LabelStore(labels_path(run_id)) as store:
        stage = store.stage("autointerp", {"test": 1})
        for key, label, conf in [("1.attn.o:5", "colour words after 'the'", 0.7),
                                 ("0.mlp.up:3", "female names", 0.9)]:
            store.put_label(LabelRow(stage_id=stage, kind="autointerp", component=key,
                                     status="ok", label=label, confidence=conf, reasoning="r",
                                     related=[], error=None, cost_usd=0.0,
                                     created=time.time()))
    info, search, none, model = call(session, tmp_path / "a.db", [
        ("get_component_info", {"component": "1.attn.o:5"}),
        ("search_components", {"label": "COLOUR"}),
        ("search_components", {"label": "nothing like this"}),
        ("get_model_info", {}),
    ])
    assert info.structured_content["label"] == "colour words after 'the'"
    assert info.structured_content["label_info"]["confidence"] == 0.7
    hits = search.structured_content["components"]
    assert [h["key"] for h in hits] == ["1.attn.o:5"] and hits[0]["label"].startswith("colour")
    assert not none.is_error and none.structured_content["components"] == []
    assert model.structured_content["analyses"]["labels"] is True


def test_label_component_on_demand(session: RunSession, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    harvest(session, HarvestConfig(n_tokens=3000, batch_size=16))
    answer = {"label": "the word ball", "confidence": 0.6, "reasoning": "fires on ball"}
    with FakeMessagesAPI(lambda body: [text_block(json.dumps(answer))],
                         toolless_reply=None) as fake:
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.base_url)
        monkeypatch.setenv("ANTHROPIC_API_KEY", "fake")
        labelled, info = call(session, tmp_path / "a.db", [
            ("label_component", {"component": "0.attn.q:7"}),
            ("get_component_info", {"component": "0.attn.q:7"}),
        ])
        prompts = [user_text(r.body or {}) for r in fake.messages_requests()]
    assert not labelled.is_error, labelled.content
    assert labelled.structured_content["label"] == "the word ball"
    assert info.structured_content["label"] == "the word ball"
    assert len(prompts) == 1 and "«" in prompts[0]  # one LLM call, with marked examples
