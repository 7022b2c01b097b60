"""``spd-mcp bench``: tasks run as investigations through the MCP server (one server and task
directory each), graded, recorded; a broken task is graded invalid, never a runner crash."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spd_mcp.bench.results import RunRecord, wilson
from spd_mcp.bench.tasks import load_tasks
from spd_mcp.benchrun import report, run_bench


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPD_MCP_HOME", str(tmp_path / "home"))


def test_scripted_runs_are_graded_and_recorded(tmp_path: Path) -> None:
    tasks = {t.id: t for t in load_tasks()}
    count = tasks["count-next-number"]
    broken = count.model_copy(update={"id": "broken", "behaviour": "juggling"})
    no_run = count.model_copy(update={"id": "no-run", "run": "nosuchrun"})
    out = tmp_path / "bench"
    records = run_bench([count, broken, no_run], "scripted", out, log=lambda _m: None)
    lines = (out / "results.jsonl").read_text().splitlines()
    assert [json.loads(x)["task_id"] for x in lines] == ["count-next-number", "broken", "no-run"]
    ok, bad, missing = records
    # A task naming a run that does not exist: no agent starts, graded invalid with the reason.
    assert missing.outcome == "invalid" and "'nosuchrun', which cannot be loaded" in missing.reason
    assert missing.tool_calls is None and missing.task_dir == ""
    # The scripted agent answered through the tools; the grader re-checked it causally.
    assert ok.outcome in ("success", "wrong") and ok.components and ok.tool_calls == 4
    assert ok.own_drop is not None and ok.own_drop > 0.5  # its set is necessary for counting
    assert (Path(ok.task_dir) / "explanations.jsonl").is_file()
    # A task naming an unknown behaviour: the agent fails, the run is graded invalid.
    assert bad.outcome == "invalid" and "juggling" in bad.reason and bad.tool_errors == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_runs"] == 3 and summary["outcomes"]["invalid"] == 2
    md = report(out)
    assert "| count-next-number | 0 | scripted |" in md and (out / "results.md").is_file()


def test_wilson_interval() -> None:
    assert wilson(0, 13) == (0.0, 0.2281)
    lo, hi = wilson(5, 10)
    assert lo < 0.5 < hi and wilson(0, 0) == (0.0, 1.0)


def test_cli_lists_tasks_and_rejects_unknown_ones(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "spd_mcp.cli", "bench"]
    listed = subprocess.run([*run, "list"], capture_output=True, text=True, check=True)
    lines = listed.stdout.splitlines()
    assert lines[0] == "suites: tales, toys" or lines[0].startswith("suites: tales, tales-llama")
    assert len(lines) - 1 == len(load_tasks()) >= 12
    toys = subprocess.run([*run, "list", "toys"], capture_output=True, text=True, check=True)
    assert [x.split()[0] for x in toys.stdout.splitlines()] == [
        t.id for t in load_tasks(suite="toys")]
    bad_suite = subprocess.run([*run, "run", "nosuite", "--out", str(tmp_path / "o")],
                               capture_output=True, text=True)
    assert bad_suite.returncode == 2 and "unknown suite 'nosuite'" in bad_suite.stderr
    res = tmp_path / "res"
    res.mkdir()
    (res / "results.jsonl").write_text(RunRecord(
        task_id="count-next-number", repeat=0, agent="scripted", outcome="wrong",
        success=False, reason="specificity").model_dump_json() + "\n")
    shown = subprocess.run([*run, "report", str(res)], capture_output=True, text=True)
    assert shown.returncode == 0 and "count-next-number" in shown.stdout  # the rich table
    assert "success 0/1" in shown.stdout and (res / "results.md").is_file()
    empty = subprocess.run([*run, "report", str(tmp_path)], capture_output=True, text=True)
    assert empty.returncode == 2 and "no results.jsonl" in empty.stderr
    bad = subprocess.run([*run, "run", "--tasks", "nope", "--out", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown task(s) nope" in bad.stderr
    agent = subprocess.run([*run, "run", "--agent", "gpt", "--out", str(tmp_path / "o")],
                           capture_output=True, text=True)
    assert agent.returncode == 2 and "unknown agent 'gpt'" in agent.stderr
