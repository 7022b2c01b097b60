"""`spd-mcp investigate` end to end: the real server, the real Claude Code CLI, a fake model API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from spd_mcp.launch.local import LaunchOptions, find_claude, launch_argv, stop_group
from spd_mcp.launch.slurm import SlurmOptions, sbatch_script
from tests.realclients.clients import (
    ClaudeRun,
    claude_env,
    http_server,
    run_bounded,
)
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
SERVE = [*CLI, "serve", "--run", "tales", "--threads", "1"]


@pytest.fixture(scope="module")
def node() -> NodeTools:
    return require_node_tools()


def _env(home: Path, fake: FakeMessagesAPI, node: NodeTools) -> dict[str, str]:
    return claude_env(home, base_url=fake.base_url, extra={"SPD_MCP_CLAUDE": str(node.claude)})


def _investigate(tmp: Path, fake: FakeMessagesAPI, node: NodeTools, *args: str,
                 timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    done = run_bounded([*CLI, "investigate", "tales", *args, "--root", str(tmp / "tasks"),
                        "--server-threads", "1"], tmp / "logs", f"inv-{time.monotonic_ns()}",
                       timeout=timeout, env=_env(tmp / "home", fake, node), cwd=tmp)
    return subprocess.CompletedProcess([], done.returncode, done.stdout, done.stderr)


def _tasks(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.glob("*/task.json"))


def _events(task: Path) -> list[dict[str, Any]]:
    """The task's events so far (none yet while create_task is still writing the directory)."""
    path = task / "events.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _agent_run(task: Path) -> ClaudeRun:
    lines = [json.loads(x) for x in (task / "agent_output.jsonl").read_text().splitlines()
             if x.strip()]
    return ClaudeRun(0, lines, "", task / "agent_output.jsonl")


def _gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        pass
    else:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# -- pure parts ------------------------------------------------------------------------------------
def test_find_claude_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = tmp_path / "claude-x"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("SPD_MCP_CLAUDE", str(exe))
    assert find_claude() == str(exe.resolve())
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("SPD_MCP_CLAUDE")
    with pytest.raises(RuntimeError, match="not found"):
        find_claude()


def test_sbatch_script_array_and_options(tmp_path: Path) -> None:
    opts = LaunchOptions(run="tales", question="why?", agents=3, root=tmp_path)
    slurm = SlurmOptions(partition="gpu", time="1:00:00", gpus=1, mem="8G", dependency="42")
    text = sbatch_script("x", launch_argv(opts, tmp_path / "q.md"), tmp_path, slurm, array=3)
    for want in ("#SBATCH --array=0-2", "#SBATCH --partition=gpu", "#SBATCH --time=1:00:00",
                 "#SBATCH --gpus=1", "#SBATCH --mem=8G", "#SBATCH --dependency=afterok:42",
                 sys.executable, f"@{tmp_path / 'q.md'}"):
        assert want in text, want


# -- end to end ------------------------------------------------------------------------------------
def test_investigate_end_to_end(tmp_path: Path, node: NodeTools) -> None:
    def explain(body: Body) -> list[dict[str, Any]]:
        seen = [r.name for r in tool_results(body)]
        assert "mcp__spd__update_research_log" in seen, seen
        return [tool_use_block("mcp__spd__save_explanation", {
            "behaviour": "names are copied to the answer position",
            "components": [{"key": "1.attn.o:5", "role": "copies the name"}],
            "evidence": [{"type": "ablation", "description": "ablating drops p(name)",
                          "value": 0.4}],
            "confidence": 0.6,
        })]

    script = scripted(
        [tool_use_block("mcp__spd__get_model_info", {})],
        [tool_use_block("mcp__spd__update_research_log",
                        {"entry": "Plan: find the copy circuit.", "title": "start"})],
        explain,
        [tool_use_block("Bash", {"command": "touch /tmp/spd-mcp-should-not-exist"}),
         tool_use_block("Write", {"file_path": str(tmp_path / "nope.txt"), "content": "x"})],
        [tool_use_block("mcp__spd__get_investigation", {})],
        [text_block("The copy circuit is 1.attn.o:5.")],
    )
    with FakeMessagesAPI(script) as fake:
        done = _investigate(tmp_path, fake, node, "Which components copy names?",
                            "--max-turns", "12")
    (task,) = _tasks(tmp_path / "tasks")
    assert done.returncode == 0, done.stderr + (task / "server.log").read_text()[-3000:]
    run = _agent_run(task)
    init = run.init
    assert init is not None
    assert {"name": "spd", "status": "connected"} in init["mcp_servers"], init["mcp_servers"]
    assert run.result is not None and run.result["subtype"] == "success", run.describe()
    assert "1.attn.o:5" in run.final_text
    # Bash / Write refused: listed as permission denials, answered with error tool_results
    denied = {d["tool_name"] for d in run.result.get("permission_denials", [])}
    assert {"Bash", "Write"} <= denied, run.describe()
    errors = {b["tool_use_id"] for b in run.tool_results() if b.get("is_error")}
    assert all(u["id"] in errors for n in ("Bash", "Write") for u in run.tool_uses(n))
    assert not Path("/tmp/spd-mcp-should-not-exist").exists()
    assert not (tmp_path / "nope.txt").exists()
    # the task directory is complete
    info = json.loads((task / "task.json").read_text())
    assert info["run"] == "tales" and info["launcher"]["python"] == sys.executable
    assert {"version", "host"} <= set(info["launcher"])
    assert "Which components copy names?" in (task / "prompt.md").read_text()
    mcp = json.loads((task / "mcp.json").read_text())["mcpServers"]["spd"]
    assert mcp["type"] == "http" and mcp["headers"]["Authorization"].startswith("Bearer ")
    types = [e["type"] for e in _events(task)]
    for want in ("launcher_started", "server_ready", "agent_started", "agent_finished"):
        assert want in types, types
    finished = next(e for e in _events(task) if e["type"] == "agent_finished")
    assert finished["data"]["exit_code"] == 0 and finished["data"]["subtype"] == "success"
    assert "copy circuit" in (task / "research_log.md").read_text()
    (expl,) = [json.loads(x) for x in (task / "explanations.jsonl").read_text().splitlines()]
    assert expl["components"][0]["key"] == "1.attn.o:5"
    assert "READY" in (task / "server.log").read_text()
    for e in _events(task):
        if e["source"] == "launcher" and e["type"] in ("server_started", "agent_started"):
            assert _gone(e["data"]["pid"])


def test_sigterm_leaves_no_children(tmp_path: Path, node: NodeTools) -> None:
    root = tmp_path / "tasks"
    with FakeMessagesAPI(scripted([text_block("never")]), delay_s=60) as fake:
        out = open(tmp_path / "launcher.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [*CLI, "investigate", "tales", "slow question", "--root", str(root),
             "--server-threads", "1"], stdout=out, stderr=out, stdin=subprocess.DEVNULL,
            env=_env(tmp_path / "home", fake, node), start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                tasks = _tasks(root)
                if tasks and "agent_started" in {e["type"] for e in _events(tasks[0])}:
                    break
                assert proc.poll() is None, (tmp_path / "launcher.log").read_text()
                time.sleep(0.2)
            else:
                pytest.fail("agent never started")
            deadline = time.monotonic() + 30
            while not fake.in_flight and time.monotonic() < deadline:
                time.sleep(0.1)  # claude is now waiting on the (slow) model
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=60)
        finally:
            stop_group(proc, 2)
            out.close()
    assert rc == 128 + signal.SIGTERM, (tmp_path / "launcher.log").read_text()
    (task,) = _tasks(root)
    events = _events(task)
    pids = [e["data"]["pid"] for e in events
            if e["source"] == "launcher" and e["type"] in ("server_started", "agent_started")]
    assert len(pids) == 2
    assert all(_gone(pid) for pid in pids), pids
    assert "launcher_interrupted" in {e["type"] for e in events}


def test_ten_concurrent_investigations(tmp_path: Path, node: NodeTools) -> None:
    with FakeMessagesAPI(scripted([text_block("short answer")])) as fake:
        done = _investigate(tmp_path, fake, node, "q?", "--agents", "10", "--max-turns", "2",
                            timeout=420)
    tasks = _tasks(tmp_path / "tasks")
    assert done.returncode == 0, done.stderr
    assert len(tasks) == 10
    urls, tokens = set(), set()
    for task in tasks:
        ready = next(e for e in _events(task) if e["type"] == "server_ready")
        urls.add(ready["data"]["url"])
        tokens.add(json.loads((task / "mcp.json").read_text())["mcpServers"]["spd"]["headers"][
            "Authorization"])
        assert _agent_run(task).result is not None
    assert len(urls) == 10 and len(tokens) == 10


def test_token_required(tmp_path: Path) -> None:
    with http_server(SERVE, tmp_path, token="s3cret") as server:
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
        headers = {"accept": "application/json, text/event-stream"}
        bare = httpx.post(server.url, json=body, headers=headers, timeout=30)
        wrong = httpx.post(server.url, json=body, timeout=30,
                           headers={**headers, "authorization": "Bearer nope"})
        assert bare.status_code == 401 and wrong.status_code == 401


# -- SLURM (a single-node cluster on this machine) -------------------------------------------------
REPO = Path(__file__).resolve().parents[1]
# `-m slurm` / `-m "not slurm"` select these; built directly because pyproject.toml does not
# register the marker (yet) and unknown marks are errors here.
SLURM = pytest.mark.slurm


@pytest.fixture(scope="module")
def slurm_conf() -> str:
    """`scripts/slurm-local.sh up` (installs and starts SLURM); skip when that cannot run here."""
    if os.geteuid() != 0:
        pytest.skip("SLURM tests need root (scripts/slurm-local.sh starts munged/slurmctld/slurmd)")
    try:
        done = subprocess.run([str(REPO / "scripts" / "slurm-local.sh"), "up"], capture_output=True,
                              text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"scripts/slurm-local.sh up could not run: {exc}")
    if done.returncode != 0 or "SLURM_CONF=" not in done.stdout:
        pytest.skip(f"scripts/slurm-local.sh up failed ({done.returncode}): {done.stderr[-800:]}")
    return done.stdout.strip().rsplit("SLURM_CONF=", 1)[1]


def _wait_jobs(jobs: list[str], env: dict[str, str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(jobs), "-o", "%i %T"],
                             capture_output=True, text=True, env=env, check=False).stdout
        if not out.strip():
            return
        time.sleep(0.5)
    subprocess.run(["scancel", *jobs], env=env, check=False)
    pytest.fail(f"SLURM jobs {jobs} still queued/running after {timeout:g}s")


@SLURM
def test_slurm_two_agents(tmp_path: Path, node: NodeTools, slurm_conf: str) -> None:
    root = tmp_path / "tasks"
    with FakeMessagesAPI(scripted([tool_use_block("mcp__spd__get_model_info", {})],
                                  [text_block("answer from the node")])) as fake:
        env = {**_env(tmp_path / "home", fake, node), "SLURM_CONF": slurm_conf}
        done = run_bounded([*CLI, "investigate", "tales", "q on slurm", "--slurm", "--agents", "2",
                            "--root", str(root), "--server-threads", "1", "--max-turns", "4",
                            "--time", "10:00"], tmp_path / "logs", "submit", timeout=60,
                           env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        job = done.stdout.strip().splitlines()[-1]
        assert job.isdigit(), done.stdout
        _wait_jobs([job], env, 300)
    logs = "\n".join(p.read_text() for p in root.glob("slurm/*/*.out"))
    tasks = _tasks(root)
    assert len(tasks) == 2, logs
    for task in tasks:
        info = json.loads((task / "task.json").read_text())
        assert info["launcher"]["slurm_array_job_id"] == job, info
        assert info["launcher"]["python"] == sys.executable
        run = _agent_run(task)
        assert run.final_text == "answer from the node", logs
        assert {"name": "spd", "status": "connected"} in (run.init or {})["mcp_servers"]
    listed = run_bounded([*CLI, "investigations", "list", "--root", str(root)], tmp_path / "logs",
                         "list", timeout=60, env={**os.environ, "COLUMNS": "250"})
    assert listed.returncode == 0, listed.stderr
    for task in tasks:
        assert task.name[:15] in listed.stdout, listed.stdout


@SLURM
def test_slurm_sharded_harvest_equals_unsharded(tmp_path: Path, slurm_conf: str) -> None:
    from spd_mcp.harvest import load_harvest

    flags = ["--tokens", "3000", "--batch-size", "8", "--n-examples", "5", "--threads", "1"]
    whole_env = {**os.environ, "SPD_MCP_HOME": str(tmp_path / "whole")}
    done = run_bounded([*CLI, "harvest", "tales", *flags], tmp_path / "logs", "whole",
                       timeout=300, env=whole_env)
    assert done.returncode == 0, done.stderr
    env = {**os.environ, "SPD_MCP_HOME": str(tmp_path / "sharded"), "SLURM_CONF": slurm_conf}
    done = run_bounded([*CLI, "harvest", "tales", *flags, "--slurm", "--shards", "3"],
                       tmp_path / "logs", "submit", timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    array_job, merge_job = done.stdout.split()[-2:]
    _wait_jobs([array_job, merge_job], env, 400)
    logs = "\n".join(p.read_text() for p in (tmp_path / "sharded").glob("slurm/*/*.out"))
    os.environ["SPD_MCP_HOME"] = str(tmp_path / "whole")
    whole = load_harvest("tales")
    os.environ["SPD_MCP_HOME"] = str(tmp_path / "sharded")
    try:
        merged = load_harvest("tales")
    except Exception as exc:
        pytest.fail(f"no merged harvest ({exc}):\n{logs}")
    assert merged.manifest.plan.n_shards == 3
    assert whole.stats.n_tokens == merged.stats.n_tokens
    import torch

    for k, v in whole.stats.t.items():
        torch.testing.assert_close(v, merged.stats.t[k], rtol=1e-12, atol=1e-9, msg=k)
    for k, v in whole.examples.tensors().items():
        assert torch.equal(v, merged.examples.tensors()[k]), k


@SLURM
def test_slurm_bench_array_then_report(tmp_path: Path, slurm_conf: str) -> None:
    """`bench run --slurm`: one array element per task x repeat (each graded on the node into
    its shard), then a report job merging the shards."""
    out = tmp_path / "bench"
    env = {**os.environ, "SLURM_CONF": slurm_conf, "SPD_MCP_HOME": str(tmp_path / "home")}
    done = run_bounded([*CLI, "bench", "run", "--agent", "topk", "--tasks",
                        "count-next-number,quote-closing-mark", "--slurm", "--out", str(out),
                        "--time", "10:00"], tmp_path / "logs", "bench", timeout=60, env=env,
                       cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    array, report = done.stdout.split()
    _wait_jobs([array, report], env, 400)
    logs = "\n".join(p.read_text() for p in out.glob("slurm/*/*.out"))
    shards = sorted(p.parent.name for p in out.glob("shard-*/results.jsonl"))
    assert shards == ["shard-0000", "shard-0001"], logs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_runs"] == 2 and summary["tool_errors"] == 0, logs
    md = (out / "results.md").read_text()
    assert "| count-next-number | 0 | topk |" in md and "| quote-closing-mark | 0 | topk |" in md
    for line in (out / "shard-0000" / "results.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert rec["outcome"] in ("success", "wrong") and rec["own_drop"] is not None
