"""Autointerp and the label store, through the real anthropic SDK against the fake API."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from spd_mcp.harvest import HarvestConfig, component_examples, harvest, load_harvest
from spd_mcp.interp.autointerp import (
    N_EXAMPLES,
    build_prompts,
    label_components,
    label_one,
    mark_window,
    select_components,
)
from spd_mcp.interp.client import LLMSettings
from spd_mcp.interp.store import LabelRow, LabelStore, ScoreRow
from spd_mcp.model.session import RunSession
from tests.realclients.fake_messages_api import FakeMessagesAPI, text_block, user_text

COMPONENT = re.compile(r"Component (\S+) \(layer")


@pytest.fixture(scope="module")
def _built(tmp_path_factory) -> Path:
    """One small harvest of 'tales' per module (copied into each test's SPD_MCP_HOME)."""
    home = tmp_path_factory.mktemp("harvest_home")
    old = os.environ.get("SPD_MCP_HOME")
    os.environ["SPD_MCP_HOME"] = str(home)
    try:
        harvest(RunSession.load("tales"), HarvestConfig(n_tokens=3000, batch_size=16))
    finally:
        if old is None:
            del os.environ["SPD_MCP_HOME"]
        else:
            os.environ["SPD_MCP_HOME"] = old
    return home


@pytest.fixture
def tales(_built):
    """(session, harvest, store) with the harvest in this test's SPD_MCP_HOME."""
    shutil.copytree(_built / "runs", Path(os.environ["SPD_MCP_HOME"]) / "runs",
                    dirs_exist_ok=True)
    session = RunSession.load("tales")
    store = LabelStore.open(session.run.meta["run_id"])
    yield session, load_harvest(session), store
    store.close()


def component_of(body) -> str:
    m = COMPONENT.search(user_text(body))
    assert m, user_text(body)[:200]
    return m.group(1)


def answer(body, usage=None):
    key = component_of(body)
    text = json.dumps({"label": f"label of {key}", "confidence": 0.7, "reasoning": "because"})
    return {"content": [text_block(text)], **({"usage": usage} if usage else {})}


def _settings(fake, **kw) -> LLMSettings:
    return LLMSettings(base_url=fake.base_url, api_key="test", backoff_base_s=0.01, **kw)


def test_labels_all_components_with_bounded_concurrency(tales):
    session, h, store = tales
    keys = select_components(h, 8)
    dens = h.stats.density()
    assert [float(dens[h.stats.index(k)]) for k in keys] == sorted(
        (float(dens[h.stats.index(k)]) for k in keys), reverse=True)
    assert all(float(dens[h.stats.index(k)]) > 0 for k in select_components(h))

    def slow(body):
        time.sleep(0.1)
        return answer(body)

    seen: list[tuple[int, int]] = []
    with FakeMessagesAPI(slow, toolless_reply=None) as fake:
        stage = asyncio.run(label_components(
            session, h, keys, _settings(fake, max_concurrency=3), store,
            progress=lambda d, t: seen.append((d, t))))
        assert fake.max_in_flight == 3
        assert sorted(component_of(r.body) for r in fake.messages_requests()) == sorted(keys)
        # finished stage: nothing is asked again
        assert asyncio.run(label_components(session, h, keys, _settings(fake), store)) == stage
        assert len(fake.messages_requests()) == len(keys)
    rows = store.labels(stage)
    assert set(rows) == set(keys) and all(r.status == "ok" for r in rows.values())
    assert rows[keys[0]].label == f"label of {keys[0]}" and rows[keys[0]].confidence == 0.7
    assert store.is_done(stage) and seen[-1] == (8, 8)
    assert store.ledger(stage).calls == 8
    assert store.search("LABEL OF " + keys[1])[0].component == keys[1]


def test_invalid_answers_become_failed_rows(tales):
    session, h, store = tales
    keys = select_components(h, 2)
    with FakeMessagesAPI(lambda b: [text_block('{"label": "far too many words in this label '
                                               'for the schema to accept it", "confidence": 2}')],
                         toolless_reply=None) as fake:
        stage = asyncio.run(label_components(session, h, keys, _settings(fake, max_reasks=1),
                                             store))
        assert len(fake.messages_requests()) == 4  # 2 components x (ask + 1 re-ask)
    rows = store.labels(stage)
    assert all(r.status == "failed" and "schema" in (r.error or "") for r in rows.values())
    assert store.is_done(stage)  # failed rows are final for the stage


def test_budget_cap_records_skipped_rows_then_resume_completes(tales):
    session, h, store = tales
    keys = select_components(h, 8)
    usage = {"input_tokens": 1500, "output_tokens": 150}  # $0.00225 per call
    with FakeMessagesAPI(lambda b: answer(b, usage), toolless_reply=None) as fake:
        s = _settings(fake, max_concurrency=1, budget_usd=0.008, max_tokens=200)
        stage = asyncio.run(label_components(session, h, keys, s, store))
        first = [component_of(r.body) for r in fake.messages_requests()]
        rows = store.labels(stage)
        ok = [k for k, r in rows.items() if r.status == "ok"]
        assert 0 < len(first) < len(keys) and sorted(ok) == sorted(first)
        assert set(rows) == set(keys)  # never silently missing
        assert all(rows[k].status == "skipped" and "budget" in rows[k].error
                   for k in keys if k not in ok)
        assert not store.is_done(stage) and store.ledger(stage).cost_usd <= 0.008
        # re-run without a cap: only the skipped ones are asked
        s2 = s.model_copy(update={"budget_usd": None})
        assert asyncio.run(label_components(session, h, keys, s2, store)) == stage
        asked = [component_of(r.body) for r in fake.messages_requests()]
    assert Counter(asked) == Counter(keys)
    assert store.is_done(stage) and all(r.status == "ok" for r in store.labels(stage).values())
    assert store.ledger(stage).calls == len(keys)


def test_killed_cli_run_resumes_without_relabelling(tales, tmp_path, monkeypatch, capsys):
    from spd_mcp.cli import main

    _, h, store = tales
    n_keys, n_first = 8, 3
    keys = select_components(h, n_keys)
    lock = threading.Lock()
    gate = threading.Event()
    delivered: list[str] = []

    def planner(body):
        key = component_of(body)
        with lock:
            block = len(delivered) >= n_first and not gate.is_set()
            if not block:
                delivered.append(key)
        if block:
            gate.wait(60)  # answered only after the process is gone
        return answer(body)

    env = {**os.environ, "ANTHROPIC_API_KEY": "test"}
    with FakeMessagesAPI(planner, toolless_reply=None) as fake:
        cmd = [sys.executable, "-m", "spd_mcp.cli", "label", "tales", "--limit", str(n_keys),
               "--concurrency", "2", "--base-url", fake.base_url]
        log = tmp_path / "first.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 120
            while time.time() < deadline:
                stages = store.stages("autointerp")
                if stages and len(store.finished(stages[0].stage_id)) >= n_first:
                    break
                assert proc.poll() is None, log.read_text()
                time.sleep(0.05)
            else:
                pytest.fail("first run did not label anything")
        finally:
            proc.kill()
            proc.wait()
        first = list(delivered)
        gate.set()  # blocked requests now answer a dead client
        stage = store.stages("autointerp")[0].stage_id
        assert store.finished(stage) == set(first) and not store.is_done(stage)

        monkeypatch.setenv("ANTHROPIC_API_KEY", "test")
        assert main(cmd[3:]) == 0  # the same command again, in-process
        out = capsys.readouterr().out
        assert "ledger" in out and stage in out and f"{n_keys} ok" in out
        second = delivered[len(first):]
    assert len(first) == n_first
    assert Counter(first + second) == Counter(keys)  # each component answered exactly once
    assert store.is_done(stage)
    assert all(r.status == "ok" for r in store.labels(stage).values())


def test_prompt_marks_the_firing_token_at_the_stored_offset(tales):
    session, h, store = tales
    window = h.manifest.config.window
    found = None
    for key in select_components(h):
        for ex in component_examples(h, key, k=N_EXAMPLES, order="ci"):
            if ex.offset != window:  # a window at a document edge
                found = key, ex
                break
        if found:
            break
    assert found is not None
    key, ex = found
    toks = session.tokens(ex.token_ids)
    marked = mark_window(toks, ex.offset)
    assert f"«{toks[ex.offset]}»" in marked
    assert marked != mark_window(toks, len(toks) // 2)
    with FakeMessagesAPI(answer, toolless_reply=None) as fake:
        row = label_one(session, h, key, _settings(fake), store)
        row = asyncio.run(row)
        prompt = user_text(fake.messages_requests()[0].body)
        assert asyncio.run(label_one(session, h, key, _settings(fake), store)) == row  # cached
        assert len(fake.messages_requests()) == 1
    assert marked in prompt and prompt == build_prompts(session, h, key)[1]
    assert row.status == "ok" and row.label == f"label of {key}"


def test_store_best_labels_search_and_scores(tmp_path):
    store = LabelStore(tmp_path / "labels.db")
    a = store.stage("autointerp", {"x": 1})
    assert a == store.stage("autointerp", {"x": 1}) and a.startswith("autointerp-")
    u = store.stage("graph_interp_unified", {"x": 1})
    store.put_label(LabelRow(stage_id=u, kind="graph_interp_unified", component="c:1",
                             status="ok", label="Unified Dog", confidence=0.4, created=1.0))
    store.put_label(LabelRow(stage_id=a, kind="autointerp", component="c:1", status="ok",
                             label="auto dog", confidence=0.9, created=2.0))
    store.put_label(LabelRow(stage_id=a, kind="autointerp", component="c:2", status="ok",
                             label="hot dogs", confidence=0.8, related=["c:1"]))
    store.put_label(LabelRow(stage_id=a, kind="autointerp", component="c:3", status="skipped",
                             error="budget"))
    store.put_label(LabelRow(stage_id=a, kind="autointerp", component="c:4", status="failed",
                             error="bad"))
    assert store.finished(a) == {"c:1", "c:2", "c:4"}
    best = store.best_labels()
    assert best["c:1"].label == "Unified Dog" and set(best) == {"c:1", "c:2"}
    assert [r.component for r in store.search("DOG")] == ["c:2", "c:1"]
    assert store.labels(a)["c:2"].related == ["c:1"]
    store.put_score(ScoreRow(stage_id="s", component="c:1", method="detection", score=0.75,
                             n_trials=4, n_success=3, details={"a": [1]}))
    assert store.scores("s")["c:1"].details == {"a": [1]}
    assert store.ledger(a) is None and not store.is_done(a)
    store.mark_done(a)
    assert store.is_done(a)
    store.close()


def test_cli_errors_without_key_or_harvest(monkeypatch, capsys):
    from spd_mcp.cli import main

    for var in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    assert main(["label", "tales"]) == 2
    assert "ANTHROPIC_API_KEY" in capsys.readouterr().err
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test")
    assert main(["label", "tales"]) == 2
    assert "spd-mcp harvest" in capsys.readouterr().err
