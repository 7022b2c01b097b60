"""``spd-mcp bench run`` with launched agents, graded end to end: a ``cmd:`` agent, the real
Claude Code CLI and the built-in ``sdk`` agent (both driven by the local fake Messages API, no
network), each with its own server and task directory; plus the scripted baseline on the whole
suite, and parallel runs."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from spd_mcp.bench.results import RunRecord, read_results
from spd_mcp.bench.tasks import load_tasks
from spd_mcp.benchrun import stream_usage
from tests.realclients.clients import claude_env, run_bounded
from tests.realclients.fake_messages_api import (
    Body,
    FakeMessagesAPI,
    scripted,
    text_block,
    tool_results,
    tool_use_block,
)
from tests.realclients.node_tools import NodeTools, require_node_tools

CLI = [sys.executable, "-m", "spd_mcp.cli"]
TASK = "count-next-number"
BEHAVIOUR = "count"


def _bench(tmp: Path, env: dict[str, str], *args: str, timeout: float = 600.0) -> list[RunRecord]:
    out = tmp / "bench"
    done = run_bounded([*CLI, "bench", "run", "--out", str(out), *args], tmp / "logs",
                       f"bench-{time.monotonic_ns()}", timeout=timeout, env=env, cwd=tmp)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    return read_results(out)


def _json(text: str) -> dict[str, Any]:
    return json.loads(text)


def investigator(seen: dict[str, Any]) -> Any:
    """A fake model that investigates like a careful agent would, from what the server answers:
    the behaviour's example → a greedy necessary set → an explanation → the summary."""

    def sweep(body: Body) -> list[dict[str, Any]]:
        info = _json(tool_results(body)[-1].text)
        [b] = [b for b in info["planted_behaviours"] if b["name"] == BEHAVIOUR]
        return [tool_use_block("mcp__spd__sweep_ablation", {
            "text": b["example_prompt"], "label_token": b["expected_next_token"],
            "greedy_steps": 6, "stop_prob": 0.05, "top": 5})]

    def explain(body: Body) -> list[dict[str, Any]]:
        r = _json(tool_results(body)[-1].text)
        seen["set"] = r["necessary_set"]
        return [tool_use_block("mcp__spd__save_explanation", {
            "behaviour": "counting", "confidence": 0.6,
            "components": [{"key": k, "role": "necessary on the example"} for k in seen["set"]],
            "evidence": [{"type": "ablation", "description": "greedy sweep",
                          "value": r["target"]["prob"]}]})]

    return scripted(
        [tool_use_block("mcp__spd__get_model_info", {})], sweep, explain,
        [tool_use_block("mcp__spd__set_investigation_summary", {
            "title": "count", "summary": "greedy set", "status": "completed"})],
        [text_block("The components named in the saved explanation carry counting.")])


def _check_graded(rec: RunRecord, seen: dict[str, Any], agent: str) -> None:
    assert rec.task_id == TASK and rec.agent == agent
    # the grader re-checked the agent's own set causally on held-out probes
    assert rec.components == seen["set"] and rec.outcome in ("success", "wrong")
    assert rec.own_drop is not None and rec.own_drop > 0.5 and rec.random_drop is not None
    # usage came from the agent's stream-json transcript
    assert rec.tool_calls == 4 and rec.tool_errors == 0 and rec.agent_exit == "success"
    assert rec.input_tokens and rec.output_tokens and rec.cost_usd and rec.cost_usd > 0
    task = json.loads((Path(rec.task_dir) / "task.json").read_text())
    assert task["launcher"]["agent"] == agent and task["launcher"]["bench"]["task"] == TASK
    assert "save_explanation" in task["question"]  # the answer format was appended


@pytest.fixture(scope="module")
def node() -> NodeTools:
    return require_node_tools()


def test_claude_code_task_is_graded(tmp_path: Path, node: NodeTools) -> None:
    seen: dict[str, Any] = {}
    with FakeMessagesAPI(investigator(seen)) as fake:
        env = claude_env(tmp_path / "home", base_url=fake.base_url)
        [rec] = _bench(tmp_path, env, "--agent", "claude", "--claude", str(node.claude),
                       "--tasks", TASK, "--max-turns", "8")
    _check_graded(rec, seen, "claude")


def test_sdk_agent_task_is_graded(tmp_path: Path) -> None:
    seen: dict[str, Any] = {}
    with FakeMessagesAPI(investigator(seen), toolless_reply=None) as fake:
        env = claude_env(tmp_path / "home", base_url=fake.base_url)
        [rec] = _bench(tmp_path, env, "--agent", "sdk", "--tasks", TASK, "--max-turns", "8",
                       "--budget-usd", "5")
    _check_graded(rec, seen, "sdk")
    # the sdk agent prices opus at $5 / $25 per million input / output tokens
    assert rec.cost_usd == pytest.approx(
        (5 * rec.input_tokens + 25 * rec.output_tokens) / 1e6, rel=1e-3)


def test_cmd_agent_gets_the_server_and_reports_usage(tmp_path: Path) -> None:
    agent = f"cmd:{sys.executable} {Path(__file__).with_name('bench_cmd_agent.py')} {BEHAVIOUR}"
    env = claude_env(tmp_path / "home")
    [rec] = _bench(tmp_path, env, "--agent", agent, "--tasks", TASK)
    assert rec.outcome in ("success", "wrong") and len(rec.components) == 4
    assert rec.own_drop is not None and rec.random_drop is not None
    # its result line's numbers; no transcript of tool calls, so those are unknown
    assert (rec.cost_usd, rec.input_tokens, rec.output_tokens) == (0.25, 1000, 50)
    assert rec.tool_calls is None and rec.turns == 4
    summary = json.loads((Path(rec.task_dir) / "summary.json").read_text())
    question = {t.id: t for t in load_tasks()}[TASK].question
    assert summary["summary"] == question[:100]  # it read SPD_MCP_QUESTION_FILE


def test_broken_agent_is_graded_invalid_and_the_suite_goes_on(tmp_path: Path) -> None:
    env = claude_env(tmp_path / "home")
    records = _bench(tmp_path, env, "--agent", "cmd:exit 3", "--tasks",
                     f"{TASK},quote-closing-mark", "--parallel", "2")
    assert [r.task_id for r in records] == [TASK, "quote-closing-mark"]
    for r in records:
        assert r.outcome == "invalid" and r.reason == "no explanation saved"
        assert r.agent_exit == "exit 3"


def test_stream_usage_counts_only_this_servers_calls(tmp_path: Path) -> None:
    lines = [
        {"type": "assistant", "message": {"content": [
            {"type": "tool_use", "id": "a", "name": "mcp__spd__get_model_info"},
            {"type": "tool_use", "id": "b", "name": "ToolSearch"}]}},
        {"type": "user", "message": {"content": [
            {"type": "tool_result", "tool_use_id": "a", "is_error": True},
            {"type": "tool_result", "tool_use_id": "b", "is_error": True}]}},
        {"type": "result", "subtype": "error_max_turns", "num_turns": 2, "total_cost_usd": 0.5,
         "usage": {"input_tokens": 10, "cache_read_input_tokens": 90, "output_tokens": 7}},
    ]
    path = tmp_path / "agent_output.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    u = stream_usage(path)
    assert (u.tool_calls, u.tool_errors, u.turns, u.input_tokens, u.output_tokens,
            u.cost_usd, u.agent_exit) == (1, 1, 2, 100, 7, 0.5, "error_max_turns")


def test_scripted_runs_the_whole_suite(tmp_path: Path) -> None:
    """The scripted investigator through every shipped task, two at a time; every run graded
    by the causal re-check (no invalid runs, no tool errors)."""
    tasks = load_tasks()
    env = claude_env(tmp_path / "home")
    records = _bench(tmp_path, env, "--agent", "scripted", "--parallel", "2", timeout=1200)
    assert [r.task_id for r in records] == [t.id for t in tasks]
    for r in records:
        assert r.outcome in ("success", "wrong"), (r.task_id, r.reason)
        assert r.tool_errors == 0 and r.own_drop is not None and r.components
    summary = json.loads((tmp_path / "bench" / "summary.json").read_text())
    assert summary["n_runs"] == len(tasks)
    assert (tmp_path / "bench" / "results.md").read_text().count("| scripted |") == len(tasks)
