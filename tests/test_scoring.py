"""Label scoring (detection, fuzzing) against the scripted fake Messages API."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import threading
from pathlib import Path

import pytest

from spd_mcp.harvest import HarvestConfig, component_examples, harvest, load_harvest
from spd_mcp.harvest.examples import ActivationExample
from spd_mcp.interp.client import LLMSettings
from spd_mcp.interp.graph_interp import mark_window
from spd_mcp.interp.scoring import (
    ScoringConfig,
    Trial,
    Window,
    detection_score,
    fuzzing_score,
    fuzzing_trials,
    score_labels,
)
from spd_mcp.interp.store import LabelRow, LabelStore
from spd_mcp.model.session import RunSession
from tests.realclients.fake_messages_api import FakeMessagesAPI, text_block, user_text


def _w(truth: bool) -> Window:
    return Window(token_ids=[1, 2, 3], marked=0, truth=truth)


def test_detection_score_is_pooled_balanced_accuracy() -> None:
    t1 = Trial(windows=[_w(True), _w(False), _w(True), _w(False), _w(False)])
    t2 = Trial(windows=[_w(False), _w(True)])
    # t1: said {1, 2} (+ 9 out of range): TP=1 (w1) FP=1 (w2) FN=1 (w3) TN=2 (w4, w5)
    # t2: said {2}: TP=1 TN=1 -> pooled TP=2 FN=1 TN=3 FP=1: (2/3 + 3/4) / 2 = 17/24
    score, d = detection_score([(t1, [1, 2, 9]), (t2, [2])])
    assert d == {"tp": 2, "fn": 1, "tn": 3, "fp": 1, "invalid": 1}
    assert score == pytest.approx(17 / 24)
    assert detection_score([(t2, [1, 2])])[0] == pytest.approx(0.5)  # says yes to everything


def test_fuzzing_trials_and_score() -> None:
    def ex(doc: int, offset: int, toks: list[int], ci: list[float]) -> ActivationExample:
        return ActivationExample(doc=doc, pos=offset, offset=offset, token_ids=toks, ci=ci,
                                 act=1.0, firing_ci=ci[offset], key=0.0)

    # firing token at the window's start (a document edge), not the centre
    exs = [ex(0, 0, [10, 11, 12, 10], [0.9, 0.0, 0.2, 0.0]),  # wrong candidates: {1}
           ex(1, 3, [5, 6, 7, 8], [0.0, 0.0, 0.0, 0.5]),  # {0, 1, 2}
           ex(2, 1, [4, 4, 4, 4], [0.0, 0.7, 0.0, 0.0]),  # none (all the same token)
           ex(3, 2, [1, 2, 3, 4], [0.3, 0.3, 0.6, 0.3])]  # none (CI > 0 everywhere)
    cfg = ScoringConfig(n_trials=2, n_windows=4, seed=7)
    trials = fuzzing_trials("0.mlp.up:1", exs, cfg)
    assert trials == fuzzing_trials("0.mlp.up:1", exs, cfg)  # deterministic
    for t in trials:
        ws = t.windows
        assert [w.truth for w in ws] == [False, False, True, True]  # only 0 and 1 can be wrong
        assert ws[0].marked == 1 and ws[1].marked in {0, 1, 2}
        assert [w.marked for w in ws[2:]] == [1, 2]  # the stored offsets
    # answers: trial 1 says windows 1 and 3 are correct -> right on 2, 3... hand count:
    # w1 F said yes (wrong), w2 F said no (right), w3 T yes (right), w4 T no (wrong) -> 2/4
    # trial 2 says 3, 4 -> 4/4; pooled 6/8
    score, d = fuzzing_score([(trials[0], [1, 3]), (trials[1], [3, 4, 0])])
    assert d == {"right": 6, "total": 8, "invalid": 1}
    assert score == pytest.approx(0.75)


# ------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    home = tmp_path_factory.mktemp("sc_built")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPD_MCP_HOME", str(home))
        session = RunSession.load("tales")
        harvest(session, HarvestConfig(n_tokens=3000, batch_size=16))
        run_id = str(session.run.meta["run_id"])
    return home, run_id


def _setup(built: tuple[Path, str], n: int = 2) -> tuple[RunSession, list[str]]:
    home, run_id = built
    dst = Path(os.environ["SPD_MCP_HOME"]) / "runs" / run_id
    dst.mkdir(parents=True)
    (dst / "harvest").symlink_to(home / "runs" / run_id / "harvest")
    session = RunSession.load("tales")
    h = load_harvest(session)
    counts = h.stats.t["fire_count"]
    keys = [k for i, k in enumerate(h.stats.keys()) if int(counts[i]) >= 12][:n]
    with LabelStore.open(run_id) as st:
        for k in keys:
            st.put_label(LabelRow(stage_id="autointerp-test", kind="autointerp", component=k,
                                  status="ok", label=f"label of {k}", confidence=0.5))
    return session, keys


ANSWERS = [[1, 2, 3], [2, 4, 6, 8], [], [1, 5, 7, 9, 10, 12]]


def _scripted(field: str, fail_for: str | None = None):
    counter = itertools.count()
    lock = threading.Lock()

    def planner(body: dict) -> list[dict]:
        if fail_for is not None and f"Component: {fail_for}\n" in user_text(body):
            return [text_block("no idea")]
        with lock:
            i = next(counter)
        return [text_block(json.dumps({field: ANSWERS[i % len(ANSWERS)]}))]

    return planner


def _settings(fake: FakeMessagesAPI) -> LLMSettings:
    return LLMSettings(base_url=fake.base_url, api_key="test", max_concurrency=3,
                       backoff_base_s=0.0, max_reasks=0)


def _windows(prompt: str) -> list[str]:
    return re.findall(r"^Window \d+: (.*)$", prompt, re.M)


@pytest.mark.parametrize("method", ["detection", "fuzzing"])
def test_scores_equal_hand_computed_values(built, method: str) -> None:
    session, keys = _setup(built)
    h = load_harvest(session)
    field = "matching" if method == "detection" else "correct"
    cfg = ScoringConfig(n_trials=2, n_pos=4, n_neg=4, n_windows=6)
    with FakeMessagesAPI(_scripted(field), toolless_reply=None) as fake:
        out = asyncio.run(score_labels(session, _settings(fake), method=method, config=cfg))
        reqs = fake.messages_requests("planned")
    assert out.scored == len(keys) == 2 and len(reqs) == 4
    with LabelStore.open(built[1]) as st:
        rows = st.scores(out.stage_id)
    for k in keys:
        # the true markings of k: each stored example marked at its stored offset
        true_texts = {mark_window(session.tokens(e.token_ids), e.offset)
                      for e in component_examples(h, k)}
        tp = fn = tn = fp = 0
        for r in reqs:
            prompt = user_text(r.body)
            if f"Component: {k}\n" not in prompt:
                continue
            said = set(json.loads(r.response[0]["text"])[field])
            for i, text in enumerate(_windows(prompt), start=1):
                truth, yes = text in true_texts, i in said
                tp, fn = tp + (truth and yes), fn + (truth and not yes)
                tn, fp = tn + (not truth and not yes), fp + (not truth and yes)
        if method == "detection":
            assert tp + fn == 8 and tn + fp == 8  # 4 + 4 windows in each of 2 trials
            expected = (tp / (tp + fn) + tn / (tn + fp)) / 2
        else:
            assert tp + fn + tn + fp == 12 and tn + fp == 6  # half the marks are wrong
            expected = (tp + tn) / 12
        row = rows[k]
        assert row.score == pytest.approx(expected)
        assert (row.n_trials, row.n_success, row.method) == (2, 2, method)
        assert row.details["label"] == f"label of {k}"

    if method == "detection":  # negatives: k's CI is 0 at the marked token (recomputed)
        k = keys[0]
        layer, _, c = k.rpartition(":")
        from spd_mcp.harvest.accumulate import encode_doc

        true_texts = {mark_window(session.tokens(e.token_ids), e.offset)
                      for e in component_examples(h, k)}
        found = 0
        for r in reqs:
            prompt = user_text(r.body)
            if f"Component: {k}\n" in prompt:
                found += sum(t not in true_texts for t in _windows(prompt))
        assert found == 8
        ex0 = component_examples(h, k)[0]
        ci = session.natural_ci(encode_doc(session, ex0.doc)).ci[layer][:, int(c)]
        assert float(ci[ex0.pos]) == pytest.approx(ex0.firing_ci, abs=1e-4)  # CI is reproducible

    # resume: same labels -> nothing re-asked
    with FakeMessagesAPI(_scripted(field), toolless_reply=None) as fake:
        again = asyncio.run(score_labels(session, _settings(fake), method=method, config=cfg))
        assert fake.messages_requests() == []
    assert again.reused == 2 and again.scored == 0


def test_zero_successful_trials_writes_no_score_row(built) -> None:
    session, keys = _setup(built)
    bad, good = keys
    cfg = ScoringConfig(n_trials=2, n_windows=4)
    with FakeMessagesAPI(_scripted("correct", fail_for=bad), toolless_reply=None) as fake:
        out = asyncio.run(score_labels(session, _settings(fake), method="fuzzing", config=cfg))
    assert (out.scored, out.no_score) == (1, 1)
    with LabelStore.open(built[1]) as st:
        rows = st.scores(out.stage_id)
        assert set(rows) == {good}
        assert rows[good].n_success == 2
        assert st.ledger(out.stage_id).failed == 2
