"""Feature tasks on the shipped toy `tms-5-2`: claimed components are matched to the known
feature pieces and re-checked causally on held-out feature probes; an agent finds the answer
through the MCP tools (feature inputs instead of text)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from mcp import Client

from spd_mcp.analysis.features import feature_components
from spd_mcp.bench import Answer, BenchTask, TaskError, grade, load_task, load_tasks
from spd_mcp.bench.grade import GradeResult
from spd_mcp.bench.tasks import RESERVED_SEEDS, TOY_RESERVED_SEEDS, TOY_TASKS_DIR
from spd_mcp.model.evaluate import evaluate_run
from spd_mcp.model.session import RunSession
from spd_mcp.server import build_server
from tests.bench_support import answer, failed

RUN = "tms-5-2"


@pytest.fixture(scope="module")
def session() -> RunSession:
    return RunSession.load(RUN)


@pytest.fixture(scope="module")
def tasks() -> dict[str, BenchTask]:
    return {t.id: t for t in load_tasks(TOY_TASKS_DIR)}



def _failed(r: GradeResult) -> set[str]:
    assert r.scores is not None and r.scores.match is not None
    return failed(r)


def _truth(session: RunSession, feature: int) -> list[str]:
    return [str(k) for k in feature_components(session, feature)]



# ------------------------------------------------------------------------------ the run
def test_shipped_toy_recovers_every_feature(session: RunSession) -> None:
    result = evaluate_run(session.run, n_samples=4096)
    for layer in ("linear1", "linear2"):
        row = result["layers"][layer]
        assert row["alive"] == 5 and row["mmcs"] >= 0.99 and 0.95 <= row["ml2r"] <= 1.05, row
    # One component per feature in each matrix, and a different one for every feature.
    truth = [_truth(session, f) for f in range(5)]
    assert all(len(t) == 2 for t in truth) and len({k for t in truth for k in t}) == 10


# ---------------------------------------------------------------------------- the tasks
def test_toy_tasks_load_apart_from_the_default_suite(tasks: dict[str, BenchTask]) -> None:
    assert len(tasks) >= 2 and all(t.run == RUN and t.is_feature for t in tasks.values())
    assert all(t.behaviour == f"feature-{t.feature}" for t in tasks.values())
    assert not {t.probe_seed for t in tasks.values()} & (RESERVED_SEEDS | TOY_RESERVED_SEEDS)
    assert not any(t.is_feature for t in load_tasks(suite="tales"))  # the LM suite: no features


@pytest.mark.parametrize(("text", "field"), [
    ("feature: -1\n", "'feature'"),
    ("feature: two\n", "'feature'"),
    ("feature: 2\nmetric: prob\n", "metric is 'recon' or 'accuracy'"),
    ("feature: 2\nbehaviour: pronoun\n", "behaviour is 'feature-2'"),
    ("feature: 2\nprobe_seed: 1234\n", "not held out"),
])
def test_bad_feature_task_files_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "t.yaml"
    seed = "" if "probe_seed" in text else "probe_seed: 5\n"
    path.write_text(f"id: t\nrun: tms-5-2\nquestion: q\nthreshold: 0.8\ntolerance: 0.1\n"
                    f"budget: 2\n{seed}{text}")
    with pytest.raises(TaskError, match=str(path)) as e:
        load_task(path)
    assert field in str(e.value)


def test_unknown_feature_is_a_task_error(session: RunSession,
                                         tasks: dict[str, BenchTask]) -> None:
    task = tasks["tms-carry-feature-1"].model_copy(update={"feature": 7,
                                                           "behaviour": "feature-7"})
    r = grade(session, task, answer(_truth(session, 1)))
    assert r.outcome == "invalid" and r.scores is None
    assert r.reason == ("task field 'feature': 7 is not a feature of run 'tms-5-2' (it has 5: "
                        "0..4)")


# --------------------------------------------------------------------------- the grading
def test_ground_truth_components_pass(session: RunSession,
                                      tasks: dict[str, BenchTask]) -> None:
    for task in tasks.values():
        assert task.feature is not None
        truth = _truth(session, task.feature)
        keys = truth if task.complete else truth[:1]
        r = grade(session, task, answer(keys))
        assert r.outcome == "success", (task.id, r.reason)
        assert r.scores is not None and r.scores.matches is not None
        assert [m.feature for m in r.scores.matches] == [task.feature] * len(keys)
        assert r.scores.own.drop >= 0.95 and r.scores.random.mean_drop < 0.1
        assert max(o.drop for o in r.scores.others) <= 0.05 and r.seconds < 5


def test_another_features_components_are_wrong(session: RunSession,
                                               tasks: dict[str, BenchTask]) -> None:
    task = tasks["tms-carry-feature-1"]
    r = grade(session, task, answer(_truth(session, 2)))
    assert r.outcome == "wrong"
    assert _failed(r) == {"necessity", "specificity", "match"}
    assert f"{_truth(session, 2)[0]} is feature 2's (|cos| 1.00)" in r.reason
    # Half right: feature 1's piece in one matrix and feature 2's in the other.
    mixed = [_truth(session, 1)[0], _truth(session, 2)[1]]
    assert _failed(grade(session, task, answer(mixed))) == {"specificity", "match"}


def test_a_random_set_fails(session: RunSession, tasks: dict[str, BenchTask]) -> None:
    task = tasks["tms-carry-feature-4"]
    truth = set(_truth(session, 4))
    pool = [f"{la}:{c}" for la in session.layers for c in range(session.keys.Cs[la])
            if f"{la}:{c}" not in truth]
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        keys = [pool[i] for i in torch.randperm(len(pool), generator=gen)[:2].tolist()]
        r = grade(session, task, answer(keys))
        assert r.outcome == "wrong" and {"necessity", "match"} <= _failed(r), keys


def test_oversized_set_fails_on_size(session: RunSession,
                                     tasks: dict[str, BenchTask]) -> None:
    task = tasks["tms-one-component-feature-3"]
    r = grade(session, task, answer(_truth(session, 3)))
    assert r.outcome == "wrong" and _failed(r) == {"size"}
    assert r.reason == "size: 2 components (budget 1)"


def test_incomplete_and_inconclusive_answers(session: RunSession,
                                             tasks: dict[str, BenchTask]) -> None:
    task = tasks["tms-carry-feature-1"]
    r = grade(session, task, answer(_truth(session, 1)[:1]))
    assert r.outcome == "wrong" and _failed(r) == {"match"} and "linear2" in r.reason
    r = grade(session, task, answer(_truth(session, 1), status="inconclusive"))
    assert r.outcome == "inconclusive" and r.scores is not None


def test_feature_task_on_a_language_model_is_invalid(
        tasks: dict[str, BenchTask]) -> None:
    tales = RunSession.load("tales")
    task = tasks["tms-carry-feature-1"].model_copy(update={"run": "tales"})
    r = grade(tales, task, answer(["0.mlp.up:1"]))
    assert r.outcome == "invalid" and "has no known input features" in r.reason


# ----------------------------------------------------------------- an agent, through MCP
def test_an_agent_answers_through_the_tools(tmp_path: Path, session: RunSession,
                                            tasks: dict[str, BenchTask]) -> None:
    """Feature inputs instead of text: get_ci finds the components that fire on feature 4;
    get_component_vectors shows what each reads and writes; the saved answer grades success."""
    task = tasks["tms-carry-feature-4"]

    async def main() -> dict[str, Any]:
        server = build_server(session=session, db_path=tmp_path / "app.db", auto_prepare=False,
                              task_dir=tmp_path / "task")
        out: dict[str, Any] = {}
        async with Client(server) as c:
            async def call(name: str, args: dict[str, Any]) -> Any:
                r = await c.call_tool(name, args)
                if r.is_error:
                    return r.content[0].text  # type: ignore[union-attr]
                return r.structured_content

            out["info"] = await call("get_model_info", {})
            out["ci"] = await call("get_ci", {"features": {"4": 1.0}})
            out["bad"] = await call("get_ci", {"features": {"5": 1.0}})
            out["both"] = await call("get_ci", {"features": {"4": 1.0}, "text": "a"})
            out["edit"] = await call("edit_components", {
                "components": [{"component": "linear1:3", "scale": 0}]})
            top = out["ci"]["positions"][0]["top"]
            picked = [max((t for t in top if t["key"].startswith(la + ":")),
                          key=lambda t: t["ci"])["key"] for la in ("linear1", "linear2")]
            out["picked"] = picked
            out["vectors"] = [await call("get_component_vectors", {"component": k})
                              for k in picked]
            await call("save_explanation", {
                "behaviour": "feature 4", "confidence": 0.9,
                "components": [{"key": k, "role": "carries feature 4"} for k in picked],
                "evidence": [{"type": "ablation", "description": "output 4 drops",
                              "value": out["vectors"][0]["features"]["writes"][0]["change"]}]})
            await call("set_investigation_summary", {"title": "feature 4", "summary": "found",
                                                     "status": "completed"})
        return out

    out = asyncio.run(main())
    assert out["info"]["input_features"]["n_features"] == 5
    assert out["picked"] == _truth(session, 4)
    assert "feature 5 out of range" in out["bad"] and "0..4" in out["bad"]
    assert "features replaces text" in out["both"]
    assert "no tokenizer (a toy model)" in out["edit"]  # an edit nothing could use: refused
    assert "do not apply" in out["info"]["input_features"]["how"]
    for v in out["vectors"]:
        f = v["features"]
        assert f["reads"][0]["feature"] == 4 and f["reads"][0]["ci"] > 0.5
        assert f["writes"][0]["output"] == 4 and f["writes"][0]["change"] < -0.5
    r = grade(session, task, Answer.from_task_dir(tmp_path / "task"))
    assert r.outcome == "success", r.reason
    json.dumps(r.model_dump())  # the record the runner writes


def test_feature_inputs_are_refused_on_a_language_model(tmp_path: Path) -> None:
    async def main() -> str:
        server = build_server(session=RunSession.load("tales"), db_path=tmp_path / "app.db",
                              auto_prepare=False, task_dir=tmp_path / "task")
        async with Client(server) as c:
            r = await c.call_tool("get_ci", {"features": {"1": 1.0}})
            assert r.is_error
            return r.content[0].text  # type: ignore[union-attr]

    assert "is a language model: feature inputs need a toy" in asyncio.run(main())
